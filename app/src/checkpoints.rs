//! A job's checkpoints (`GET /api/jobs/{id}/checkpoints`) with their size and metrics, resume
//! of an ended run from its latest one (`POST /api/jobs/{id}/resume`, a new job) and merge and
//! export of an ended adapter run's latest one (`POST /api/jobs/{id}/export`).

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde_json::Value;
use whet_shared::api::{
    CheckpointChoice, CheckpointInfo, CheckpointList, ExportAnswer, JobCreated, JobStatus,
};
use whet_shared::Diagnostic;

use crate::api;
use crate::chart::short;
use crate::form::diagnostic_list;
use crate::i18n::t;
use crate::route;
use crate::studio::use_studio;

/// Bytes in binary units (`12.3 MiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Loads the job's checkpoints into `into` (errors into `errors`).
pub fn load(id: String, into: RwSignal<Vec<CheckpointInfo>>, errors: RwSignal<Vec<Diagnostic>>) {
    spawn_local(async move {
        let url = format!("/api/jobs/{id}/checkpoints");
        match api::request_json::<CheckpointList>("GET", &url, None, None).await {
            Ok(list) => {
                let _ = into.try_set(list.checkpoints);
            }
            Err(diagnostics) => {
                let _ = errors.try_set(diagnostics);
            }
        }
    });
}

fn metric(checkpoint: &CheckpointInfo, key: &str) -> String {
    checkpoint
        .metrics
        .get(key)
        .and_then(Value::as_f64)
        .map(short)
        .unwrap_or_default()
}

/// The best checkpoint: each one's `best` says what its own trainer_state.json named best when
/// it was saved, so the newest one flagged names the run's best (an older flag is out of date).
fn best_of(checkpoints: &[CheckpointInfo]) -> Option<String> {
    checkpoints
        .iter()
        .rev()
        .find(|c| c.best)
        .map(|c| c.name.clone())
}

#[component]
pub fn CheckpointsPanel(
    id: String,
    #[prop(into)] status: Signal<Option<JobStatus>>,
    checkpoints: RwSignal<Vec<CheckpointInfo>>,
) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let busy = RwSignal::new(false);
    let exported = RwSignal::new(None::<ExportAnswer>);
    let id = StoredValue::new(id);

    let latest = move || checkpoints.with(|c| c.last().cloned());
    // Both take an ended job's checkpoint (409 while it runs).
    let ended = move || status.get().is_some_and(JobStatus::is_terminal);
    let can_resume = move || ended() && latest().is_some();
    let can_export = move || ended() && latest().is_some_and(|c| c.kind == "adapter");
    let choice = || serde_json::to_string(&CheckpointChoice::default()).unwrap_or_default();

    let resume = move |_| {
        let url = format!("/api/jobs/{}/resume", id.get_value());
        let token = studio.token.get_untracked();
        busy.set(true);
        spawn_local(async move {
            let result =
                api::request_json::<JobCreated>("POST", &url, Some(choice()), Some(token)).await;
            let _ = busy.try_set(false);
            match result {
                Ok(created) => route::go(&format!("#/jobs/{}", created.id)),
                Err(diagnostics) => {
                    let _ = errors.try_set(diagnostics);
                }
            }
        });
    };
    let export = move |_| {
        let url = format!("/api/jobs/{}/export", id.get_value());
        let token = studio.token.get_untracked();
        busy.set(true);
        exported.set(None);
        spawn_local(async move {
            let result =
                api::request_json::<ExportAnswer>("POST", &url, Some(choice()), Some(token)).await;
            let _ = busy.try_set(false);
            match result {
                Ok(answer) => {
                    let _ = exported.try_set(Some(answer));
                    let _ = errors.try_set(Vec::new());
                }
                Err(diagnostics) => {
                    let _ = errors.try_set(diagnostics);
                }
            }
        });
    };
    let latest_name = move || latest().map(|c| c.name).unwrap_or_default();

    view! {
        <section class="panel checkpoints" id="checkpoints">
            <h3>{t(lang, "Checkpoints", "检查点")}</h3>
            <Show
                when=move || checkpoints.with(|c| !c.is_empty())
                fallback=move || view! { <p class="note">{t(lang, "No checkpoint saved yet.", "尚未保存检查点。")}</p> }
            >
                <table class="job-table">
                    <thead><tr>
                        <th>{t(lang, "name", "名称")}</th>
                        <th>{t(lang, "step", "步数")}</th>
                        <th>{t(lang, "kind", "类型")}</th>
                        <th>{t(lang, "size", "大小")}</th>
                        <th>"loss"</th>
                        <th>"eval_loss"</th>
                        <th>{t(lang, "best", "最佳")}</th>
                    </tr></thead>
                    <tbody>
                        {move || {
                            let all = checkpoints.get();
                            let best = best_of(&all);
                            all.into_iter().map(|c| {
                            let (loss, eval_loss) = (metric(&c, "loss"), metric(&c, "eval_loss"));
                            let is_best = best.as_deref() == Some(c.name.as_str());
                            view! {
                                <tr class="checkpoint" data-name=c.name.clone() data-step=c.step data-kind=c.kind.clone()>
                                    <td><code>{c.name.clone()}</code></td>
                                    <td>{c.step}</td>
                                    <td>{c.kind.clone()}</td>
                                    <td title=c.size_bytes.to_string()>{human_bytes(c.size_bytes)}</td>
                                    <td>{loss}</td>
                                    <td>{eval_loss}</td>
                                    <td class="best">{is_best.then_some("★")}</td>
                                </tr>
                            }
                        }).collect_view()
                        }}
                    </tbody>
                </table>
            </Show>
            <p>
                <Show when=can_resume>
                    <button id="resume-job" disabled=move || busy.get() on:click=resume>
                        {move || format!("{} {}", lang.get().pick("Resume from", "从此继续训练："), latest_name())}
                    </button>
                    " "
                </Show>
                <Show when=can_export>
                    <button id="export-job" disabled=move || busy.get() on:click=export>
                        {move || format!("{} {}", lang.get().pick("Merge and export", "合并并导出"), latest_name())}
                    </button>
                </Show>
            </p>
            {move || exported.get().map(|answer| view! {
                <p id="export-result" class="ok">
                    {t(lang, "Merged", "已合并")} " " <code>{answer.checkpoint}</code> " → "
                    <code class="export-dir">{answer.output_dir}</code>
                    " (" {human_bytes(answer.size_bytes)} ")"
                </p>
            })}
            <div id="checkpoint-errors">{move || diagnostic_list(errors.get(), lang.get())}</div>
        </section>
    }
}
