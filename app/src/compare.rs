//! Runs compared (`#/compare/1,2,3`): each job (`GET /api/jobs/{id}`) and its metrics history
//! (`GET /api/jobs/{id}/metrics`); loss, eval loss and learning rate overlaid one line per run
//! (by step or by epoch), each run's final metrics, and the config fields whose values differ.

use std::collections::{BTreeMap, BTreeSet};

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde_json::Value;
use whet_shared::api::{JobView as JobAnswer, MetricsHistory, MetricsRecord};
use whet_shared::Diagnostic;

use crate::api;
use crate::chart::{colour, short, MultiChart, Series};
use crate::form::diagnostic_list;
use crate::i18n::t;
use crate::jobs::{point_of, Point};
use crate::studio::use_studio;

/// A JSON value's leaves under dotted keys (`sft.learning_rate`); a list is one leaf.
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&key, value, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), value.clone());
        }
    }
}

/// The fields whose values are not the same in every config (a missing one reads as null),
/// with each config's value.
fn differing(configs: &[Value]) -> Vec<(String, Vec<Value>)> {
    let flat: Vec<BTreeMap<String, Value>> = configs
        .iter()
        .map(|config| {
            let mut out = BTreeMap::new();
            flatten("", config, &mut out);
            out
        })
        .collect();
    let keys: BTreeSet<&String> = flat.iter().flat_map(|f| f.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let values: Vec<Value> = flat
                .iter()
                .map(|f| f.get(key).cloned().unwrap_or(Value::Null))
                .collect();
            values
                .iter()
                .any(|v| v != &values[0])
                .then(|| (key.clone(), values))
        })
        .collect()
}

/// A value as a cell shows it: strings without quotes, null as a dash.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What one run's last records say.
fn last_of(points: &[Point], pick: fn(&Point) -> Option<f64>) -> String {
    points
        .iter()
        .rev()
        .find_map(pick)
        .map(short)
        .unwrap_or_else(|| "—".into())
}

fn steps_of(records: &[MetricsRecord]) -> String {
    records
        .iter()
        .rev()
        .find_map(|r| r.get("global_step/max_steps").and_then(Value::as_str))
        .map(String::from)
        .unwrap_or_else(|| "—".into())
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Run {
    job: Option<JobAnswer>,
    records: Vec<MetricsRecord>,
}

async fn get<T: serde::de::DeserializeOwned>(url: &str) -> Result<T, Vec<Diagnostic>> {
    match api::request("GET", url, None, None).await {
        Ok((200, body)) => {
            serde_json::from_str::<T>(&body).map_err(|_| api::diagnostics_of(200, &body))
        }
        Ok((code, body)) => Err(api::diagnostics_of(code, &body)),
        Err(e) => Err(api::unreachable(e)),
    }
}

#[component]
pub fn CompareView(ids: Vec<i64>) -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let runs = RwSignal::new(vec![Run::default(); ids.len()]);
    let errors = RwSignal::new(Vec::<Diagnostic>::new());
    let by_epoch = RwSignal::new(false);
    for (index, id) in ids.iter().copied().enumerate() {
        spawn_local(async move {
            let job = get::<JobAnswer>(&format!("/api/jobs/{id}")).await;
            let history = get::<MetricsHistory>(&format!("/api/jobs/{id}/metrics")).await;
            let mut failed = Vec::new();
            let _ = runs.try_update(|runs| {
                let run = &mut runs[index];
                match job {
                    Ok(job) => run.job = Some(job),
                    Err(e) => failed.extend(e),
                }
                match history {
                    Ok(history) => run.records = history.records,
                    Err(e) => failed.extend(e),
                }
            });
            if !failed.is_empty() {
                let _ = errors.try_update(|e| e.extend(failed));
            }
        });
    }
    let ids = StoredValue::new(ids);
    let points = Memo::new(move |_| {
        runs.with(|runs| {
            runs.iter()
                .map(|run| {
                    run.records
                        .iter()
                        .enumerate()
                        .map(|(i, r)| point_of(r, i as f64 + 1.0))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
    });
    let series = move |pick: fn(&Point) -> Option<f64>| {
        Signal::derive(move || {
            let by_epoch = by_epoch.get();
            points.with(|runs| {
                runs.iter()
                    .enumerate()
                    .map(|(index, points)| Series {
                        index,
                        points: points
                            .iter()
                            .filter_map(|p| {
                                let x = if by_epoch { p.epoch? } else { p.step };
                                Some((x, pick(p)?))
                            })
                            .collect(),
                    })
                    .collect::<Vec<_>>()
            })
        })
    };
    let title = move |en: &'static str, zh: &'static str| {
        Signal::derive(move || {
            let axis = match (by_epoch.get(), lang.get()) {
                (true, l) => l.pick("by epoch", "按轮次"),
                (false, l) => l.pick("by step", "按步数"),
            };
            format!("{} ({axis})", lang.get().pick(en, zh))
        })
    };
    let diff = Memo::new(move |_| {
        runs.with(|runs| {
            let configs: Vec<Value> = runs
                .iter()
                .map(|r| {
                    r.job
                        .as_ref()
                        .and_then(|j| j.config.as_ref())
                        .and_then(|c| serde_json::to_value(c).ok())
                        .unwrap_or(Value::Null)
                })
                .collect();
            differing(&configs)
        })
    });
    let header = move || {
        ids.get_value()
            .into_iter()
            .enumerate()
            .map(|(index, id)| {
                view! { <th><span class="swatch" style=format!("background: {}", colour(index))></span> {format!("#{id}")}</th> }
            })
            .collect_view()
    };

    view! {
        <main class="compare" id="compare">
            <h2>{t(lang, "Compare runs", "对比运行")}</h2>
            <p>
                <a href="#/jobs">{t(lang, "all jobs", "全部任务")}</a>
                " "
                <label class="check">
                    <input
                        id="compare-by-epoch"
                        type="checkbox"
                        prop:checked=move || by_epoch.get()
                        on:change=move |ev| by_epoch.set(event_target_checked(&ev))
                    />
                    " " {t(lang, "x axis: epoch (else step)", "横轴：轮次（否则为步数）")}
                </label>
            </p>
            <div>{move || diagnostic_list(errors.get(), lang.get())}</div>
            <ul class="legend" id="compare-legend">
                {move || runs.with(|runs| {
                    ids.get_value().into_iter().zip(runs.iter()).enumerate().map(|(index, (id, run))| {
                        let status = run.job.as_ref().map(|j| j.status.as_str()).unwrap_or("…");
                        let model = run
                            .job
                            .as_ref()
                            .and_then(|j| j.config.as_ref())
                            .and_then(|c| c.sft.model.clone())
                            .unwrap_or_default();
                        view! {
                            <li data-job=id>
                                <span class="swatch" style=format!("background: {}", colour(index))></span>
                                <a href=format!("#/jobs/{id}")>{format!("#{id}")}</a>
                                " " {model} " (" <span class=format!("status {status}")>{status}</span> ")"
                            </li>
                        }
                    }).collect_view()
                })}
            </ul>
            <div class="charts">
                <MultiChart id="compare-loss" title=title("Loss", "损失") series=series(|p| p.loss) />
                <MultiChart id="compare-eval-loss" title=title("Eval loss", "评估损失") series=series(|p| p.eval_loss) />
                <MultiChart id="compare-lr" title=title("Learning rate", "学习率") series=series(|p| p.learning_rate) from_zero=true />
            </div>
            <h3>{t(lang, "Final metrics", "最终指标")}</h3>
            <table class="job-table" id="compare-final">
                <thead><tr>
                    <th>{t(lang, "run", "运行")}</th>
                    <th>{t(lang, "status", "状态")}</th>
                    <th>"loss"</th>
                    <th>"eval_loss"</th>
                    <th>"token_acc"</th>
                    <th>{t(lang, "steps", "步数")}</th>
                </tr></thead>
                <tbody>
                    {move || runs.with(|runs| points.with(|points| {
                        ids.get_value().into_iter().enumerate().map(|(index, id)| {
                            let (run, points) = (&runs[index], &points[index]);
                            let status = run.job.as_ref().map(|j| j.status.as_str()).unwrap_or("…");
                            view! {
                                <tr class="final-row" data-job=id>
                                    <td><span class="swatch" style=format!("background: {}", colour(index))></span> {format!("#{id}")}</td>
                                    <td class=format!("status {status}")>{status}</td>
                                    <td class="final-loss">{last_of(points, |p| p.loss)}</td>
                                    <td class="final-eval-loss">{last_of(points, |p| p.eval_loss)}</td>
                                    <td class="final-token-acc">{last_of(points, |p| p.token_acc)}</td>
                                    <td class="final-steps">{steps_of(&run.records)}</td>
                                </tr>
                            }
                        }).collect_view()
                    }))}
                </tbody>
            </table>
            <h3>{t(lang, "Config fields that differ", "不同的配置字段")}</h3>
            <table class="job-table" id="compare-diff">
                <thead><tr><th>{t(lang, "field", "字段")}</th>{header}</tr></thead>
                <tbody>
                    {move || diff.get().into_iter().map(|(field, values)| view! {
                        <tr class="diff-field" data-field=field.clone()>
                            <td><code>{field.clone()}</code></td>
                            {values.iter().map(|v| view! { <td>{cell(v)}</td> }).collect_view()}
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
            <Show when=move || diff.with(Vec::is_empty) && runs.with(|r| r.iter().all(|r| r.job.is_some()))>
                <p class="note" id="compare-same">{t(lang, "The configs are the same.", "配置完全相同。")}</p>
            </Show>
        </main>
    }
}
