//! The jobs views: the list from `GET /api/jobs`, and one job streamed from
//! `GET /api/jobs/{id}/events` (Server-Sent Events `log`, `metrics`, `status`) with its log,
//! live charts of loss, learning rate and token accuracy, and a cancel button; its checkpoints
//! (`checkpoints.rs`) and chat (`chat.rs`). The list picks runs to compare (`compare.rs`).

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde_json::Value;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::JsCast;
use web_sys::{EventSource, MessageEvent};
use whet_shared::api::{
    JobList, JobStatus, JobView as JobAnswer, LogEvent, MetricsRecord, StatusEvent, LOG_EVENT,
    METRICS_EVENT, STATUS_EVENT,
};
use whet_shared::Diagnostic;

use crate::chart::LineChart;
use crate::chat::ChatBox;
use crate::checkpoints::{self, CheckpointsPanel};
use crate::form::diagnostic_list;
use crate::i18n::t;
use crate::studio::use_studio;
use crate::{api, route};

#[derive(Debug, Clone, PartialEq)]
struct JobRow {
    id: i64,
    status: &'static str,
    model: String,
    created: String,
}

fn job_rows(list: JobList) -> Vec<JobRow> {
    list.jobs
        .into_iter()
        .map(|job| JobRow {
            id: job.id,
            status: job.status.as_str(),
            model: job.config.and_then(|c| c.sft.model).unwrap_or_default(),
            created: job.created_at,
        })
        .collect()
}

#[component]
pub fn JobList() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let rows = RwSignal::new(Vec::<JobRow>::new());
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let picked = RwSignal::new(std::collections::BTreeSet::<i64>::new());
    let compare = move |_| {
        let ids: Vec<String> = picked.get_untracked().iter().map(i64::to_string).collect();
        route::go(&format!("#/compare/{}", ids.join(",")));
    };
    let load = move || {
        spawn_local(async move {
            match api::request_json::<JobList>("GET", "/api/jobs", None, None).await {
                Ok(list) => {
                    let _ = rows.try_set(job_rows(list));
                    let _ = errors.try_set(Vec::new());
                }
                Err(diagnostics) => {
                    let _ = errors.try_set(diagnostics);
                }
            }
        })
    };
    load();
    view! {
        <main class="jobs" id="jobs">
            <h2>{t(lang, "Jobs", "任务")}</h2>
            <button id="refresh-jobs" on:click=move |_| load()>{t(lang, "Refresh", "刷新")}</button>
            " "
            <button id="compare-jobs" disabled=move || picked.with(|p| p.len() < 2) on:click=compare>
                {t(lang, "Compare picked runs", "对比所选运行")}
            </button>
            <Show when=move || !studio.backend.get()>
                <p class="note">{t(
                    lang,
                    "No whet-server answers on this address: jobs need the server (cargo xtask studio).",
                    "此地址上没有 whet-server：运行任务需要服务器（cargo xtask studio）。",
                )}</p>
            </Show>
            <div>{move || diagnostic_list(errors.get(), lang.get())}</div>
            <table class="job-table">
                <thead><tr>
                    <th>{t(lang, "compare", "对比")}</th>
                    <th>"id"</th>
                    <th>{t(lang, "status", "状态")}</th>
                    <th>{t(lang, "model", "模型")}</th>
                    <th>{t(lang, "created", "创建时间")}</th>
                </tr></thead>
                <tbody>
                    {move || rows.get().into_iter().map(|row| view! {
                        <tr class="job-row" data-status=row.status data-job=row.id>
                            <td><input
                                type="checkbox"
                                class="compare-pick"
                                data-job=row.id
                                prop:checked=move || picked.with(|p| p.contains(&row.id))
                                on:change=move |ev| {
                                    let on = event_target_checked(&ev);
                                    picked.update(|p| {
                                        if on { p.insert(row.id); } else { p.remove(&row.id); }
                                    });
                                }
                            /></td>
                            <td><a href=format!("#/jobs/{}", row.id)>{row.id}</a></td>
                            <td class=format!("status {}", row.status)>{row.status}</td>
                            <td>{row.model.clone()}</td>
                            <td>{row.created.clone()}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
        </main>
    }
}

/// One logging.jsonl record, as far as the charts need it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Point {
    pub step: f64,
    pub epoch: Option<f64>,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub token_acc: Option<f64>,
    pub eval_loss: Option<f64>,
}

pub(crate) fn point_of(record: &MetricsRecord, fallback_step: f64) -> Point {
    let number = |key: &str| record.get(key).and_then(Value::as_f64);
    // `global_step/max_steps` is "3/60".
    let step = record
        .get("global_step/max_steps")
        .and_then(|s| s.as_str())
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .or_else(|| number("global_step"))
        .or_else(|| number("step"))
        .unwrap_or(fallback_step);
    Point {
        step,
        epoch: number("epoch"),
        loss: number("loss"),
        learning_rate: number("learning_rate"),
        token_acc: number("token_acc"),
        eval_loss: number("eval_loss"),
    }
}

const MAX_LOG_LINES: usize = 2000;

#[component]
pub fn JobView(id: String) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let status = RwSignal::new(None::<JobStatus>);
    let log = RwSignal::new(Vec::<String>::new());
    let points = RwSignal::new(Vec::<Point>::new());
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let saved = RwSignal::new(Vec::new());
    let saved_errors = RwSignal::new(Vec::<Diagnostic>::new());
    checkpoints::load(id.clone(), saved, saved_errors);
    // Again when the run saves one (its `Saved <dir>` line) and when it ends.
    {
        let id = id.clone();
        Effect::new(move |was_final: Option<bool>| {
            let now = status.get().is_some_and(JobStatus::is_terminal);
            if now && was_final == Some(false) {
                checkpoints::load(id.clone(), saved, saved_errors);
            }
            now
        });
    }
    let log_id = id.clone();

    // The job's current state, then its event stream.
    {
        let url = format!("/api/jobs/{id}");
        spawn_local(async move {
            match api::request("GET", &url, None, None).await {
                Ok((200, body)) => match serde_json::from_str::<JobAnswer>(&body) {
                    // The stream may have said more already.
                    Ok(job) => {
                        let _ = status.try_update(|s| {
                            s.get_or_insert(job.status);
                        });
                    }
                    Err(_) => {
                        let _ = errors.try_set(api::diagnostics_of(200, &body));
                    }
                },
                Ok((code, body)) => {
                    let _ = errors.try_set(api::diagnostics_of(code, &body));
                }
                Err(e) => {
                    let _ = errors.try_set(api::unreachable(e));
                }
            }
        });
    }
    if let Ok(source) = EventSource::new(&format!("/api/jobs/{id}/events")) {
        let on_log = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            let data = event.data().as_string().unwrap_or_default();
            // A line that is not a LogEvent is shown as it came.
            let line = serde_json::from_str::<LogEvent>(&data).map_or(data, |e| e.line);
            // (An ended job's replayed lines need none: it loaded them when it ended.)
            let ended = status.get_untracked().is_some_and(JobStatus::is_terminal);
            if line.starts_with("Saved ") && !ended {
                checkpoints::load(log_id.clone(), saved, saved_errors);
            }
            let _ = log.try_update(|log| {
                log.push(line);
                if log.len() > MAX_LOG_LINES {
                    log.drain(..log.len() - MAX_LOG_LINES);
                }
            });
        });
        let on_metrics = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            let data = event.data().as_string().unwrap_or_default();
            if let Ok(record) = serde_json::from_str::<MetricsRecord>(&data) {
                let _ = points.try_update(|p| {
                    let fallback = p.len() as f64 + 1.0;
                    p.push(point_of(&record, fallback));
                });
            }
        });
        let on_status = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            let data = event.data().as_string().unwrap_or_default();
            if let Ok(event) = serde_json::from_str::<StatusEvent>(&data) {
                let _ = status.try_set(Some(event.status));
            }
        });
        for (name, callback) in [
            (LOG_EVENT, &on_log),
            (METRICS_EVENT, &on_metrics),
            (STATUS_EVENT, &on_status),
        ] {
            let _ =
                source.add_event_listener_with_callback(name, callback.as_ref().unchecked_ref());
        }
        // The closures live as long as the source; both go when the view does.
        let kept = StoredValue::new_local((source, on_log, on_metrics, on_status));
        on_cleanup(move || {
            kept.with_value(|(source, ..)| source.close());
            kept.dispose();
        });
    }

    let series = move |pick: fn(&Point) -> Option<f64>| {
        Signal::derive(move || {
            points.with(|p| {
                p.iter()
                    .filter_map(|pt| pick(pt).map(|v| (pt.step, v)))
                    .collect::<Vec<_>>()
            })
        })
    };
    let loss = series(|p| p.loss);
    let eval_loss = series(|p| p.eval_loss);
    let learning_rate = series(|p| p.learning_rate);
    let token_acc = series(|p| p.token_acc);
    let title = move |en: &'static str, zh: &'static str| {
        Signal::derive(move || lang.get().pick(en, zh).to_string())
    };

    let cancel_id = id.clone();
    let cancel = move |_| {
        let url = format!("/api/jobs/{cancel_id}/cancel");
        let token = studio.token.get_untracked();
        spawn_local(async move {
            match api::request("POST", &url, Some("{}".into()), Some(token)).await {
                Ok((200..=299, _)) => {}
                Ok((code, body)) => {
                    let _ = errors.try_set(api::diagnostics_of(code, &body));
                }
                Err(e) => {
                    let _ = errors.try_set(api::unreachable(e));
                }
            }
        });
    };
    let finished = move || status.get().is_some_and(JobStatus::is_terminal);
    let status_text = move || status.get().map_or("", JobStatus::as_str);

    view! {
        <main class="job" id="job" data-job=id.clone()>
            <h2>{t(lang, "Job", "任务")} " " <code>{id.clone()}</code></h2>
            <p>
                {t(lang, "Status:", "状态：")} " "
                <strong id="job-status" class=move || format!("status {}", status_text())>{status_text}</strong>
                " "
                <button id="cancel-job" disabled=finished on:click=cancel>{t(lang, "Cancel", "取消")}</button>
                " "
                <a href="#/jobs">{t(lang, "all jobs", "全部任务")}</a>
            </p>
            <div>{move || diagnostic_list(errors.get(), lang.get())}</div>
            <div class="charts">
                <LineChart id="chart-loss" title=title("Loss (eval dotted)", "损失（虚线为评估）") main=loss extra=eval_loss />
                <LineChart id="chart-lr" title=title("Learning rate", "学习率") main=learning_rate from_zero=true />
                <LineChart id="chart-acc" title=title("Token accuracy", "Token 准确率") main=token_acc from_zero=true />
            </div>
            <div class="job-tools">
                <div>
                    <CheckpointsPanel id=id.clone() status=status checkpoints=saved />
                    <div>{move || diagnostic_list(saved_errors.get(), lang.get())}</div>
                </div>
                <ChatBox id=id.clone() checkpoints=saved />
            </div>
            <h3>{t(lang, "Log", "日志")}</h3>
            <pre class="log" id="job-log">{move || log.with(|l| l.join("\n"))}</pre>
        </main>
    }
}
