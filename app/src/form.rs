//! The form: one section per group of the seed's guide, one row per field with an input that
//! fits its kind, its default, its help and its diagnostics (live, on every change).

use leptos::prelude::*;
use serde_json::Value;
use whet_shared::config::DEEPSPEED_PRESETS;
use whet_shared::fields::{Field, Group, Kind, FIELDS, TEMPLATES};
use whet_shared::validate::parse_devices;
use whet_shared::{form, lora, models, Diagnostic, Severity};

use crate::i18n::{t, Lang};
use crate::studio::use_studio;

/// Diagnostics as a list (messages and fixes in `lang`).
pub fn diagnostic_list(diagnostics: Vec<Diagnostic>, lang: Lang) -> impl IntoView {
    diagnostics
        .into_iter()
        .map(|d| diagnostic_view(&d, lang))
        .collect_view()
}

pub fn diagnostic_view(d: &Diagnostic, lang: Lang) -> impl IntoView {
    let (class, label) = match d.severity {
        Severity::Error => ("diag error", lang.pick("error", "错误")),
        Severity::Warning => ("diag warning", lang.pick("warning", "警告")),
        Severity::Info => ("diag info", lang.pick("info", "提示")),
    };
    let fix = lang.fix(d);
    view! {
        <div class=class data-code=d.code.clone() data-field=d.field.clone()>
            <span class="sev">{label}</span>
            " "
            <span class="msg">{lang.message(d)}</span>
            {(!fix.is_empty()).then(|| view! { <div class="fix">"→ " {fix}</div> })}
        </div>
    }
}

#[component]
pub fn GroupSection(group: Group) -> impl IntoView {
    let lang = use_studio().lang;
    let fields: Vec<&'static Field> = FIELDS.iter().filter(|f| f.group == group).collect();
    let id = format!(
        "group-{}",
        serde_json::to_value(group)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    );
    view! {
        <details class="group" open=true id=id>
            <summary>
                <span class="title">{move || lang.get().pick(group.title_en(), group.title_zh())}</span>
                <span class="subtitle">{move || lang.get().pick(group.title_zh(), group.title_en())}</span>
            </summary>
            {fields.into_iter().map(|field| view! { <FieldRow field /> }).collect_view()}
        </details>
    }
}

#[component]
fn FieldRow(field: &'static Field) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let input = match field.kind {
        _ if field.name == "cuda_visible_devices" => view! { <DevicePicker field /> }.into_any(),
        Kind::Bool => view! { <BoolInput field /> }.into_any(),
        Kind::Choice(choices) => view! { <ChoiceInput field choices /> }.into_any(),
        Kind::List => view! { <ListInput field /> }.into_any(),
        Kind::Int | Kind::Float | Kind::Str => view! { <TextInput field /> }.into_any(),
    };
    let flag = match (field.is_flag, field.env) {
        (false, Some(env)) => env.to_string(),
        (true, Some(env)) => format!("--{} · {env}", field.name),
        _ => format!("--{}", field.name),
    };
    let default = form::default_text(field).replace('\n', ", ");
    let default_label = move || {
        let lang = lang.get();
        if default.is_empty() && field.kind == Kind::List {
            format!(
                "{} {}",
                lang.pick("default:", "默认："),
                lang.pick("none", "无")
            )
        } else if default.is_empty() {
            format!(
                "{} {}",
                lang.pick("default:", "默认："),
                lang.pick("auto / unset", "自动 / 不设置")
            )
        } else {
            format!("{} {default}", lang.pick("default:", "默认："))
        }
    };
    let diagnostics = move || diagnostic_list(studio.field_diagnostics(field), lang.get());
    let has_error = move || {
        studio.input_errors.with(|e| e.contains_key(field.name))
            || studio.report.with(|r| {
                r.diagnostics
                    .iter()
                    .any(|d| d.field == field.name && d.is_error())
            })
    };
    view! {
        <div class="field" class:invalid=has_error id=format!("field-{}", field.name) data-field=field.name>
            <div class="field-head">
                <code class="flag">{flag}</code>
                <span class="default">{default_label}</span>
            </div>
            {input}
            <p class="help">{move || lang.get().pick(field.help_en, field.help_zh)}</p>
            <div class="diagnostics">{diagnostics}</div>
        </div>
    }
}

/// Suggestions for free-text fields that have well-known values.
fn suggestions(field: &Field) -> Option<Vec<String>> {
    match field.name {
        "model" => Some(models::catalog_ids()),
        "template" => Some(TEMPLATES.iter().map(|s| s.to_string()).collect()),
        "deepspeed" => Some(DEEPSPEED_PRESETS.iter().map(|s| s.to_string()).collect()),
        "model_type" => Some(
            ["qwen3", "qwen3_moe", "qwen2", "qwen2_5"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        // The bit width whet quantises to (8 is refused by validation).
        "quant_bits" => Some(vec!["4".into()]),
        "target_modules" => Some(
            std::iter::once("all-linear")
                .chain(lora::ALL_LINEAR.iter().copied())
                .map(String::from)
                .collect(),
        ),
        "modules_to_save" => Some(
            ["lm_head", "all-embedding", "all-norm"]
                .into_iter()
                .chain(lora::ALL_EMBEDDING.iter().copied())
                .chain(lora::ALL_NORM.iter().copied())
                .map(String::from)
                .collect(),
        ),
        _ => None,
    }
}

#[component]
fn TextInput(field: &'static Field) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    // Re-read only when the whole config is replaced, so typing "1e-" is never rewritten.
    let value = move || {
        studio.revision.track();
        studio.config.with_untracked(|c| form::text(c, field))
    };
    let placeholder = move || {
        if field.optional {
            lang.get().pick("auto", "自动").to_string()
        } else {
            String::new()
        }
    };
    let list_id = format!("list-{}", field.name);
    let datalist = suggestions(field).map(|items| {
        view! {
            <datalist id=list_id.clone()>
                {items.into_iter().map(|item| view! { <option value=item /> }).collect_view()}
            </datalist>
        }
    });
    let inputmode = match field.kind {
        Kind::Int => "numeric",
        Kind::Float => "decimal",
        _ => "text",
    };
    view! {
        <input
            type="text"
            class="in"
            name=field.name
            inputmode=inputmode
            autocomplete="off"
            spellcheck="false"
            list=datalist.is_some().then(|| list_id.clone())
            placeholder=placeholder
            prop:value=value
            on:input=move |ev| studio.set_text(field, &event_target_value(&ev))
        />
        {datalist}
    }
}

#[component]
fn BoolInput(field: &'static Field) -> impl IntoView {
    let studio = use_studio();
    let checked = move || studio.config.with(|c| form::text(c, field) == "true");
    view! {
        <label class="check">
            <input
                type="checkbox"
                name=field.name
                prop:checked=checked
                on:change=move |ev| {
                    let on = event_target_checked(&ev);
                    studio.set_text(field, if on { "true" } else { "false" })
                }
            />
            {move || if checked() { "true" } else { "false" }}
        </label>
    }
}

#[component]
fn ChoiceInput(field: &'static Field, choices: &'static [&'static str]) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let current = Memo::new(move |_| studio.config.with(|c| form::text(c, field)));
    view! {
        <select
            class="in"
            name=field.name
            on:change=move |ev| studio.set_text(field, &event_target_value(&ev))
        >
            {field.optional.then(|| view! {
                <option value="" prop:selected=move || current.get().is_empty()>
                    {move || lang.get().pick("auto", "自动")}
                </option>
            })}
            {choices
                .iter()
                .map(|choice| view! {
                    <option value=*choice prop:selected=move || current.get() == *choice>{*choice}</option>
                })
                .collect_view()}
        </select>
    }
}

/// One input per item, with remove and add buttons.
#[component]
fn ListInput(field: &'static Field) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let items = RwSignal::new(studio.config.with_untracked(|c| form::list(c, field)));
    Effect::new(move |previous: Option<u64>| {
        let revision = studio.revision.get();
        if previous.is_some_and(|p| p != revision) {
            items.set(studio.config.with_untracked(|c| form::list(c, field)));
        }
        revision
    });
    let count = Memo::new(move |_| items.with(Vec::len));
    let commit = move || items.with_untracked(|items| studio.set_list(field, items));
    let list_id = format!("list-{}", field.name);
    let datalist = suggestions(field).map(|items| {
        view! {
            <datalist id=list_id.clone()>
                {items.into_iter().map(|item| view! { <option value=item /> }).collect_view()}
            </datalist>
        }
    });
    let list_attr = datalist.is_some().then(|| list_id.clone());
    let rows = move || {
        (0..count.get())
            .map(|i| {
                view! {
                    <div class="list-row">
                        <input
                            type="text"
                            class="in"
                            name=format!("{}[{i}]", field.name)
                            autocomplete="off"
                            spellcheck="false"
                            list=list_attr.clone()
                            prop:value=move || items.with(|v| v.get(i).cloned().unwrap_or_default())
                            on:input=move |ev| {
                                let text = event_target_value(&ev);
                                items.update(|v| if let Some(item) = v.get_mut(i) { *item = text });
                                commit();
                            }
                        />
                        <button
                            class="remove"
                            title=move || lang.get().pick("remove", "删除")
                            on:click=move |_| {
                                items.update(|v| if i < v.len() { v.remove(i); });
                                commit();
                            }
                        >"×"</button>
                    </div>
                }
            })
            .collect_view()
    };
    view! {
        <div class="list" data-list=field.name>
            {datalist}
            {rows}
            <button class="add" on:click=move |_| items.update(|v| v.push(String::new()))>
                {t(lang, "+ add", "+ 添加")}
            </button>
        </div>
    }
}

/// CUDA_VISIBLE_DEVICES: GPUs 0–7, "all" (unset) or CPU (empty).
#[component]
fn DevicePicker(field: &'static Field) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let devices = Memo::new(move |_| {
        studio
            .config
            .with(|c| c.launch.cuda_visible_devices.clone())
    });
    let indices = move || {
        devices
            .get()
            .filter(|d| !d.trim().is_empty())
            .and_then(|d| parse_devices(&d).ok())
            .unwrap_or_default()
    };
    let set = move |text: Option<String>| {
        studio.set_value(field, text.map(Value::String).unwrap_or(Value::Null));
    };
    let toggle = move |index: u32, on: bool| {
        let mut chosen = indices();
        chosen.retain(|i| *i != index);
        if on {
            chosen.push(index);
        }
        set(form::devices_text(false, chosen.is_empty(), &chosen));
    };
    view! {
        <div class="devices">
            <label class="check">
                <input
                    type="checkbox"
                    name="devices-all"
                    prop:checked=move || devices.get().is_none()
                    on:change=move |ev| set(if event_target_checked(&ev) { None } else { Some("0".into()) })
                />
                {t(lang, "all", "全部")}
            </label>
            <label class="check">
                <input
                    type="checkbox"
                    name="devices-cpu"
                    prop:checked=move || devices.get().is_some_and(|d| d.trim().is_empty())
                    on:change=move |ev| set(if event_target_checked(&ev) { Some(String::new()) } else { None })
                />
                "CPU"
            </label>
            {(0..8u32)
                .map(|index| view! {
                    <label class="check gpu">
                        <input
                            type="checkbox"
                            name=format!("device-{index}")
                            prop:checked=move || indices().contains(&index)
                            on:change=move |ev| toggle(index, event_target_checked(&ev))
                        />
                        {index}
                    </label>
                })
                .collect_view()}
            <code class="devices-value" id="devices-value">
                {move || match devices.get() {
                    None => lang.get().pick("(unset: all GPUs)", "（不设置：全部 GPU）").to_string(),
                    Some(d) => format!("CUDA_VISIBLE_DEVICES={}", if d.is_empty() { "\"\"".into() } else { d }),
                }}
            </code>
        </div>
    }
}
