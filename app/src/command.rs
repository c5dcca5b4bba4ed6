//! The command panel (the config as an ms-swift script, a whet script, JSON and YAML, each with
//! a copy button), the import box, share links and job submission.

use leptos::prelude::*;
use leptos::task::spawn_local;
use whet_shared::api::{JobCreated, ShareCreated};
use whet_shared::files::{self, Format};
use whet_shared::{form, share, to_shell, Diagnostic, Dialect};

use crate::api;
use crate::form::diagnostic_list;
use crate::i18n::t;
use crate::route;
use crate::studio::{storage_set, use_studio, Studio};

fn copy_to_clipboard(text: &str) {
    let clipboard = window().navigator().clipboard();
    let _ = clipboard.write_text(text);
}

#[component]
fn CopyBlock(
    id: &'static str,
    title: &'static str,
    #[prop(into)] text: Signal<String>,
) -> impl IntoView {
    let lang = use_studio().lang;
    let copied = RwSignal::new(false);
    view! {
        <div class="copy-block">
            <div class="copy-head">
                <span>{title}</span>
                <button
                    class="copy"
                    id=format!("copy-{id}")
                    on:click=move |_| {
                        copy_to_clipboard(&text.get_untracked());
                        copied.set(true);
                    }
                >
                    {move || if copied.get() { lang.get().pick("copied", "已复制") } else { lang.get().pick("copy", "复制") }}
                </button>
            </div>
            <pre id=id>{move || text.get()}</pre>
        </div>
    }
}

#[component]
pub fn CommandPanel() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let config = studio.config;
    let swift = Signal::derive(move || config.with(|c| to_shell(c, Dialect::Swift)));
    let whet = Signal::derive(move || config.with(|c| to_shell(c, Dialect::Whet)));
    let json =
        Signal::derive(move || config.with(|c| files::to_config_text(c, Format::Json, false)));
    let yaml =
        Signal::derive(move || config.with(|c| files::to_config_text(c, Format::Yaml, false)));
    view! {
        <section class="panel command" id="command">
            <h2>{t(lang, "Command", "命令")}</h2>
            <CopyBlock id="script-swift" title="ms-swift" text=swift />
            <CopyBlock id="script-whet" title="whet" text=whet />
            <details>
                <summary>"JSON / YAML"</summary>
                <CopyBlock id="config-json" title="JSON" text=json />
                <CopyBlock id="config-yaml" title="YAML" text=yaml />
            </details>
        </section>
    }
}

#[component]
pub fn ImportBox() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let text = RwSignal::new(String::new());
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let imported = RwSignal::new(false);
    let import = move |_| match form::import_text(&text.get_untracked()) {
        Ok(config) => {
            errors.set(Vec::new());
            studio.replace(config);
            imported.set(true);
        }
        Err(diagnostics) => {
            imported.set(false);
            errors.set(diagnostics.0);
        }
    };
    view! {
        <section class="panel import" id="import">
            <h2>{t(lang, "Import", "导入")}</h2>
            <p class="note">{t(
                lang,
                "Paste a training script (torchrun … swift sft …, whet sft …), a JSON/YAML config or a share link.",
                "粘贴训练脚本（torchrun … swift sft …、whet sft …）、JSON/YAML 配置或分享链接。",
            )}</p>
            <textarea
                id="import-text"
                rows=6
                spellcheck="false"
                prop:value=move || text.get()
                on:input=move |ev| text.set(event_target_value(&ev))
            ></textarea>
            <button id="import-button" on:click=import>{t(lang, "Import", "导入")}</button>
            <Show when=move || imported.get()>
                <span class="ok" id="import-ok">{t(lang, " ✓ form filled", " ✓ 已填入表单")}</span>
            </Show>
            <div class="import-errors" id="import-errors">
                {move || diagnostic_list(errors.get(), lang.get())}
            </div>
        </section>
    }
}

/// Opens `/s/<id>`: loads the shared config from the server.
pub fn load_short_link(studio: Studio, id: String) {
    spawn_local(async move {
        let url = format!("/api/shares/{id}");
        match api::request("GET", &url, None, None).await {
            Ok((200, body)) => {
                // The answer is the shared JobConfig, read as a config file is (diagnostics).
                match files::parse_config_text(&body, Format::Json) {
                    Ok(config) => studio.replace(config),
                    Err(d) => studio.load_errors.set(d.0),
                }
            }
            Ok((status, body)) => studio.load_errors.set(api::diagnostics_of(status, &body)),
            Err(e) => studio.load_errors.set(api::unreachable(e)),
        }
    });
}

#[component]
pub fn SharePanel() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let link = RwSignal::new(String::new());
    let short = RwSignal::new(String::new());
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let copy_link = move |_| {
        let code = studio.config.with_untracked(share::encode);
        let url = format!("{}#cfg={code}", route::page_url());
        copy_to_clipboard(&url);
        link.set(url);
    };
    let short_link = move |_| {
        let body = studio
            .config
            .with_untracked(|c| serde_json::to_string(c).unwrap_or_default());
        let token = studio.token.get_untracked();
        spawn_local(async move {
            match api::request("POST", "/api/shares", Some(body), Some(token)).await {
                Ok((200 | 201, answer)) => {
                    let Ok(created) = serde_json::from_str::<ShareCreated>(&answer) else {
                        errors.set(api::diagnostics_of(201, &answer));
                        return;
                    };
                    let path = created.url;
                    let origin = window().location().origin().unwrap_or_default();
                    let url = format!("{origin}{path}");
                    copy_to_clipboard(&url);
                    errors.set(Vec::new());
                    short.set(url);
                }
                Ok((status, answer)) => errors.set(api::diagnostics_of(status, &answer)),
                Err(e) => errors.set(api::unreachable(e)),
            }
        });
    };
    view! {
        <section class="panel share" id="share">
            <h2>{t(lang, "Share", "分享")}</h2>
            <button id="copy-link" on:click=copy_link>{t(lang, "Copy link", "复制链接")}</button>
            <Show when=move || studio.backend.get()>
                <button id="short-link" on:click=short_link>{t(lang, "Short link", "短链接")}</button>
            </Show>
            <input id="share-link" class="in" readonly=true prop:value=move || link.get() />
            <Show when=move || !short.get().is_empty()>
                <input id="short-share-link" class="in" readonly=true prop:value=move || short.get() />
            </Show>
            <p class="note">{t(
                lang,
                "The link holds the whole config: it opens offline, with no server.",
                "链接包含完整配置：无需服务器即可离线打开。",
            )}</p>
            <div>{move || diagnostic_list(errors.get(), lang.get())}</div>
        </section>
    }
}

#[component]
pub fn SubmitPanel() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let busy = RwSignal::new(false);
    let has_errors = move || studio.report.with(|r| !r.ok);
    let submit = move |_| {
        let body = studio
            .config
            .with_untracked(|c| serde_json::to_string(c).unwrap_or_default());
        let token = studio.token.get_untracked();
        busy.set(true);
        spawn_local(async move {
            let result = api::request("POST", "/api/jobs", Some(body), Some(token)).await;
            let _ = busy.try_set(false);
            match result {
                Ok((200 | 201, answer)) => match serde_json::from_str::<JobCreated>(&answer) {
                    Ok(created) => {
                        let _ = errors.try_set(Vec::new());
                        route::go(&format!("#/jobs/{}", created.id));
                    }
                    Err(_) => {
                        let _ = errors.try_set(api::diagnostics_of(201, &answer));
                    }
                },
                Ok((status, answer)) => {
                    let _ = errors.try_set(api::diagnostics_of(status, &answer));
                }
                Err(e) => {
                    let _ = errors.try_set(api::unreachable(e));
                }
            }
        });
    };
    view! {
        <Show when=move || studio.backend.get()>
            <section class="panel submit" id="submit">
                <h2>{t(lang, "Run on the server", "提交到服务器")}</h2>
                <label>
                    {t(lang, "Token:", "令牌：")}
                    <input
                        id="token"
                        class="in"
                        type="password"
                        autocomplete="off"
                        prop:value=move || studio.token.get()
                        on:input=move |ev| {
                            let token = event_target_value(&ev);
                            storage_set("whet.token", &token);
                            studio.token.set(token);
                        }
                    />
                </label>
                <button id="submit-job" disabled=move || busy.get() || has_errors() on:click=submit>
                    {t(lang, "Start training", "开始训练")}
                </button>
                <Show when=has_errors>
                    <span class="note">{t(lang, " fix the errors first", " 请先修正错误")}</span>
                </Show>
                <div id="submit-errors">{move || diagnostic_list(errors.get(), lang.get())}</div>
            </section>
        </Show>
    }
}
