//! The Data tab: the config in the editor sent to `POST /api/datasets/preview?rows=N`, and the
//! answer (whet-shared's `DatasetPreview`, filled by the engine) drawn — the datasets and the
//! formats found in them, the data warnings, the length histogram against max_length, and the
//! first rows token by token with the tokens that take loss, think blocks and cut tokens marked.

use leptos::prelude::*;
use leptos::task::spawn_local;
use whet_shared::config::TruncationStrategy;
use whet_shared::preview::{
    DatasetPreview, DatasetSummary, LengthDistribution, PreviewRow, PreviewToken, Truncation,
    DEFAULT_ROWS,
};
use whet_shared::Diagnostic;

use crate::api;
use crate::chart::{Bar, Histogram, Marker};
use crate::form::diagnostic_list;
use crate::i18n::{t, Lang};
use crate::studio::use_studio;

/// The most rows the server shows in full.
const MAX_ROWS: u32 = 50;

fn strategy_name(strategy: TruncationStrategy) -> &'static str {
    match strategy {
        TruncationStrategy::Delete => "delete",
        TruncationStrategy::Left => "left",
        TruncationStrategy::Right => "right",
    }
}

/// The rows-count input's text as a count the server accepts.
fn rows_wanted(text: &str) -> u32 {
    text.trim()
        .parse::<u32>()
        .map_or(DEFAULT_ROWS as u32, |n| n.clamp(1, MAX_ROWS))
}

#[component]
pub fn DataView() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let rows_text = RwSignal::new(DEFAULT_ROWS.to_string());
    let preview = RwSignal::new(None::<DatasetPreview>);
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let busy = RwSignal::new(false);
    // Only the answer to the latest request is shown.
    let latest = StoredValue::new(0u64);

    let run = move || {
        let body = studio
            .config
            .with_untracked(|c| serde_json::to_string(c).unwrap_or_default());
        let rows = rows_wanted(&rows_text.get_untracked());
        rows_text.set(rows.to_string());
        latest.update_value(|n| *n += 1);
        let this = latest.get_value();
        busy.set(true);
        spawn_local(async move {
            let url = format!("/api/datasets/preview?rows={rows}");
            let result = api::request("POST", &url, Some(body), None).await;
            if latest.try_get_value() != Some(this) {
                return;
            }
            let _ = busy.try_set(false);
            match result {
                Ok((200, answer)) => match serde_json::from_str::<DatasetPreview>(&answer) {
                    Ok(answer) => {
                        let _ = errors.try_set(Vec::new());
                        let _ = preview.try_set(Some(answer));
                    }
                    Err(_) => {
                        let _ = errors.try_set(api::diagnostics_of(200, &answer));
                    }
                },
                Ok((status, answer)) => {
                    let _ = preview.try_set(None);
                    let _ = errors.try_set(api::diagnostics_of(status, &answer));
                }
                Err(e) => {
                    let _ = errors.try_set(api::unreachable(e));
                }
            }
        });
    };
    // Once when the tab opens (or as soon as the server has answered /api/health).
    let started = StoredValue::new(false);
    Effect::new(move |_| {
        if studio.backend.get() && !started.get_value() {
            started.set_value(true);
            run();
        }
    });

    view! {
        <main class="data" id="data" class:busy=move || busy.get()>
            <div class="data-controls">
                <h2>{t(lang, "Data preview", "数据预览")}</h2>
                <label>
                    {t(lang, "Rows shown:", "显示行数：")}
                    " "
                    <input
                        id="preview-rows"
                        class="in"
                        type="number"
                        min=1
                        max=MAX_ROWS
                        prop:value=move || rows_text.get()
                        on:input=move |ev| rows_text.set(event_target_value(&ev))
                        on:keydown=move |ev| {
                            if ev.key() == "Enter" {
                                run();
                            }
                        }
                    />
                </label>
                <button id="preview-run" disabled=move || busy.get() on:click=move |_| run()>
                    {move || if busy.get() {
                        lang.get().pick("Previewing…", "预览中…")
                    } else {
                        lang.get().pick("Preview", "预览")
                    }}
                </button>
                <span class="note">{t(
                    lang,
                    "The config in the editor, rendered by the model's tokenizer and template as training reads it.",
                    "编辑器中的配置，按训练时的方式用模型的分词器和模板渲染。",
                )}</span>
            </div>
            <Show when=move || !studio.backend.get()>
                <p class="note" id="preview-offline">{t(
                    lang,
                    "No whet-server answers on this address: the preview needs the server, which reads the data files and the tokenizer (cargo xtask studio).",
                    "此地址上没有 whet-server：预览需要服务器读取数据文件和分词器（cargo xtask studio）。",
                )}</p>
            </Show>
            <div id="preview-errors">{move || diagnostic_list(errors.get(), lang.get())}</div>
            {move || preview.get().map(|p| view! { <PreviewBody preview=p /> })}
        </main>
    }
}

#[component]
fn PreviewBody(preview: DatasetPreview) -> impl IntoView {
    let lang = use_studio().lang;
    let DatasetPreview {
        model,
        template,
        max_length,
        truncation_strategy,
        datasets,
        rows,
        lengths,
        bad_rows,
        diagnostics,
    } = preview;
    let has_warnings = !diagnostics.is_empty();
    let has_bad_rows = !bad_rows.is_empty();
    let shown = rows.len();
    view! {
        <div class="data-top">
            <section class="panel">
                <p id="preview-summary" class="preview-summary">
                    {t(lang, "model", "模型")} " " <code class="model">{model}</code>
                    " · " {t(lang, "template", "模板")} " " <code class="template">{template}</code>
                    " · max_length " <code class="max-length">{max_length}</code>
                    " · truncation_strategy " <code class="strategy">{strategy_name(truncation_strategy)}</code>
                </p>
                <DatasetTable datasets />
                {has_warnings.then(|| view! { <h3>{t(lang, "Warnings", "警告")}</h3> })}
                <div id="preview-warnings">
                    {move || diagnostic_list(diagnostics.clone(), lang.get())}
                </div>
            </section>
            <section class="panel">
                <LengthChart lengths max_length strategy=truncation_strategy />
            </section>
        </div>
        <section class="panel rows-panel">
            <h3>
                {move || match lang.get() {
                    Lang::En => format!("The first {shown} row(s), as the model sees them"),
                    Lang::Zh => format!("前 {shown} 条数据，按模型所见"),
                }}
            </h3>
            <Legend />
            <div id="preview-rowlist">
                {rows.into_iter().map(|row| view! { <RowView row max_length /> }).collect_view()}
            </div>
        </section>
        {has_bad_rows.then(|| view! {
            <section class="panel">
                <h3>{t(lang, "Rows that could not be read", "无法读取的数据")}</h3>
                <ul id="bad-rows" class="bad-rows">
                    {bad_rows
                        .into_iter()
                        .map(|bad| {
                            let (file, row, error) = (bad.origin.file, bad.origin.row, bad.error);
                            view! {
                                <li class="bad-row" title=bad.origin.spec>
                                    <code>{file}</code>
                                    {move || match lang.get() {
                                        Lang::En => format!(" row {row}: "),
                                        Lang::Zh => format!(" 第 {row} 行："),
                                    }}
                                    <span class="error">{error}</span>
                                </li>
                            }
                        })
                        .collect_view()}
                </ul>
            </section>
        })}
    }
}

#[component]
fn DatasetTable(datasets: Vec<DatasetSummary>) -> impl IntoView {
    let lang = use_studio().lang;
    view! {
        <table class="job-table" id="preview-datasets">
            <thead><tr>
                <th>{t(lang, "dataset", "数据集")}</th>
                <th>{t(lang, "field", "参数")}</th>
                <th class="num">{t(lang, "rows", "行数")}</th>
                <th class="num">{t(lang, "bad rows", "无法读取")}</th>
                <th>{t(lang, "formats", "格式")}</th>
            </tr></thead>
            <tbody>
                {datasets
                    .into_iter()
                    .map(|d| {
                        let formats = d
                            .formats
                            .iter()
                            .map(|f| format!("{} {}", f.format, f.rows))
                            .collect::<Vec<_>>()
                            .join(", ");
                        let field = d.field.clone();
                        view! {
                            <tr class="dataset-row" data-field=field>
                                <td><code>{d.spec}</code></td>
                                <td><code>{d.field}</code></td>
                                <td class="num">{d.rows}</td>
                                <td class="num" class:bad={d.bad_rows > 0}>{d.bad_rows}</td>
                                <td class="formats">{formats}</td>
                            </tr>
                        }
                    })
                    .collect_view()}
            </tbody>
        </table>
    }
}

/// The length histogram with max_length marked, and what it says in words.
#[component]
fn LengthChart(
    lengths: LengthDistribution,
    max_length: u64,
    strategy: TruncationStrategy,
) -> impl IntoView {
    let lang = use_studio().lang;
    let bins = lengths.bins.clone();
    let bars = Signal::derive(move || {
        let lang = lang.get();
        bins.iter()
            .map(|b| Bar {
                from: b.from as f64,
                to: b.to as f64,
                count: b.rows as f64,
                tip: match lang {
                    Lang::En => format!("{}–{} tokens: {} row(s)", b.from, b.to - 1, b.rows),
                    Lang::Zh => format!("{}–{} 个 token：{} 条", b.from, b.to - 1, b.rows),
                },
            })
            .collect::<Vec<_>>()
    });
    // A row of max_length tokens fits: the line stands where a row one token longer starts.
    let marker = Signal::derive(move || {
        Some(Marker {
            x: max_length as f64 + 1.0,
            label: format!("max_length {max_length}"),
        })
    });
    let LengthDistribution {
        rows,
        total_rows,
        min,
        max,
        mean,
        over_max_length,
        ..
    } = lengths;
    let caption = move || {
        let (what_en, what_zh) = match strategy {
            TruncationStrategy::Delete => ("dropped", "丢弃"),
            TruncationStrategy::Left => ("cut on the left", "截掉开头"),
            TruncationStrategy::Right => ("cut on the right", "截掉结尾"),
        };
        match lang.get() {
            Lang::En => format!(
                "{rows} of {total_rows} rows measured; {over_max_length} longer than max_length ({what_en})"
            ),
            Lang::Zh => format!(
                "已测量 {total_rows} 条中的 {rows} 条；{over_max_length} 条超过 max_length（{what_zh}）"
            ),
        }
    };
    let stats = move || match lang.get() {
        Lang::En => format!("tokens per row: min {min} · mean {mean:.1} · max {max}"),
        Lang::Zh => format!("每条 token 数：最少 {min} · 平均 {mean:.1} · 最多 {max}"),
    };
    let bin_count = lengths.bins.len();
    view! {
        <figure class="chart lengths">
            <figcaption>{t(lang, "Tokens per row", "每条数据的 token 数")}</figcaption>
            <Histogram
                bars
                marker
                {..}
                id="length-histogram"
                data-bins=bin_count.to_string()
                data-over=over_max_length.to_string()
            />
            <p class="length-caption" id="length-caption" class:over={over_max_length > 0}>{caption}</p>
            <p class="note">{stats}</p>
        </figure>
    }
}

#[component]
fn Legend() -> impl IntoView {
    let lang = use_studio().lang;
    view! {
        <ul class="legend token-legend" id="preview-legend">
            <li>
                <span class="key trained">{t(lang, "trained", "训练")}</span>
                " " {t(lang, "takes loss: the model learns to predict it", "计算损失：模型学习预测它")}
            </li>
            <li>
                <span class="key">{t(lang, "prompt", "提示")}</span>
                " " {t(lang, "no loss (system, user, template)", "不计损失（系统、用户、模板）")}
            </li>
            <li>
                <span class="key think">{t(lang, "think", "思考")}</span>
                " " {t(lang, "inside a <think> block", "位于 <think> 块内")}
            </li>
            <li>
                <span class="key cut">{t(lang, "cut", "截掉")}</span>
                " " {t(lang, "cut off by max_length", "被 max_length 截掉")}
            </li>
            <li>
                <span class="key"><span class="eol"></span></span>
                " " {t(lang, "a line break", "换行")}
            </li>
            <li class="note">{t(lang, "hover a token for its id", "鼠标悬停可查看 token id")}</li>
        </ul>
    }
}

fn truncation_label(truncation: Truncation) -> (&'static str, &'static str, &'static str) {
    match truncation {
        Truncation::Fits => ("fits", "fits", "完整"),
        Truncation::Dropped => ("dropped", "dropped", "丢弃"),
        Truncation::CutLeft => ("cut-left", "cut left", "截掉开头"),
        Truncation::CutRight => ("cut-right", "cut right", "截掉结尾"),
    }
}

#[component]
fn RowView(row: PreviewRow, max_length: u64) -> impl IntoView {
    let lang = use_studio().lang;
    let (kind, en, zh) = truncation_label(row.truncation);
    let PreviewRow {
        origin,
        tokens,
        num_tokens,
        num_trained,
        ..
    } = row;
    let line = origin.row;
    let over = num_tokens > max_length;
    view! {
        <div class="preview-row" data-truncation=kind data-row=line>
            <div class="row-head">
                <code class="origin" title=origin.spec>{origin.file}</code>
                <span class="row-number">{move || match lang.get() {
                    Lang::En => format!("row {line}"),
                    Lang::Zh => format!("第 {line} 行"),
                }}</span>
                <span class="row-length" class:over=over>{move || match lang.get() {
                    Lang::En => format!("{num_tokens} / {max_length} tokens"),
                    Lang::Zh => format!("{num_tokens} / {max_length} 个 token"),
                }}</span>
                <span class="row-trained">{move || match lang.get() {
                    Lang::En => format!("{num_trained} trained"),
                    Lang::Zh => format!("{num_trained} 个训练 token"),
                }}</span>
                <span class=format!("badge {kind}")>{t(lang, en, zh)}</span>
            </div>
            <pre class="tokens">{tokens.iter().map(token_view).collect_view()}</pre>
        </div>
    }
}

fn token_class(token: &PreviewToken) -> String {
    let mut class = String::from("tok");
    for (on, name) in [
        (token.trained, " trained"),
        (token.think, " think"),
        (token.cut, " cut"),
        (
            token.text.starts_with("<|") && token.text.ends_with("|>"),
            " special",
        ),
    ] {
        if on {
            class.push_str(name);
        }
    }
    class
}

/// One token as a span; a line break in it gets a visible mark (CSS, outside the text).
fn token_view(token: &PreviewToken) -> impl IntoView {
    let mut parts = Vec::new();
    for (i, piece) in token.text.split('\n').enumerate() {
        if i > 0 {
            parts.push(view! { <span class="eol"></span> }.into_any());
            parts.push("\n".into_any());
        }
        if !piece.is_empty() {
            parts.push(piece.to_string().into_any());
        }
    }
    view! { <span class=token_class(token) title=token.id.to_string()>{parts}</span> }
}
