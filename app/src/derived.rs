//! The derived panel: diagnostics at a glance, effective batch with its formula, steps,
//! warm-up, evals and saves, the learning-rate schedule, memory per GPU against the chosen GPU,
//! and disk for the kept checkpoints. Every figure comes from whet-shared's check report.

use leptos::prelude::*;
use whet_shared::gpus::{self, GPUS};
use whet_shared::memory::{params_text, trainable_percent};
use whet_shared::schedule;

use crate::chart::{short, LineChart};
use crate::form::diagnostic_list;
use crate::i18n::t;
use crate::studio::use_studio;

fn opt(n: Option<u64>) -> String {
    n.map_or_else(|| "?".to_string(), |n| n.to_string())
}

fn gib(x: f64) -> String {
    format!("{x:.1} GiB")
}

#[component]
pub fn DerivedPanel() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let report = studio.report;
    let derived = Memo::new(move |_| report.with(|r| r.derived.clone()));

    let counts = move || {
        report.with(|r| {
            let errors = r.diagnostics.iter().filter(|d| d.is_error()).count();
            let others = r.diagnostics.len() - errors;
            (errors, others)
        })
    };
    let summary = move || {
        let (errors, others) = counts();
        let lang = lang.get();
        if errors == 0 && others == 0 {
            lang.pick("No problems found.", "未发现问题。").to_string()
        } else {
            match lang {
                crate::i18n::Lang::En => format!("{errors} error(s), {others} warning(s)/note(s)"),
                crate::i18n::Lang::Zh => format!("{errors} 个错误，{others} 个警告/提示"),
            }
        }
    };
    let check_ms = move || {
        report.track();
        let ms = studio.check_ms.get_value();
        (format!("{ms:.3}"), format!("{ms:.2} ms"))
    };

    let formula = move || {
        let d = derived.get();
        let per_device = studio
            .config
            .with(|c| c.sft.per_device_train_batch_size.max(1));
        format!(
            "{per_device} × {} × {} = {}",
            d.world_size, d.gradient_accumulation_steps, d.effective_batch_size
        )
    };
    let needs_rows =
        move || studio.dataset_rows.get().is_some() || derived.with(|d| d.train_rows.is_none());
    let lr_curve = Signal::derive(move || {
        let curve = studio
            .config
            .with(|c| derived.with(|d| schedule::schedule(c, d)))
            .map(|s| s.curve(160))
            .unwrap_or_default();
        curve
            .into_iter()
            .map(|(step, lr)| (step as f64, lr))
            .collect::<Vec<_>>()
    });
    let lr_title = Signal::derive(move || {
        let d = derived.get();
        let scheduler = studio.config.with(|c| {
            serde_json::to_value(c.sft.lr_scheduler_type)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        });
        format!(
            "{} — {scheduler}, {} {}, warmup {}",
            lang.get().pick("Learning rate", "学习率"),
            lang.get().pick("peak", "峰值"),
            short(d.learning_rate),
            opt(d.warmup_steps)
        )
    });

    view! {
        <section class="panel derived" id="derived">
            <h2>{t(lang, "Derived figures", "推导结果")}</h2>
            <p class="summary" id="summary" class:has-errors=move || { counts().0 > 0 }>
                {summary}
                <span class="timing" id="check-ms" data-ms=move || check_ms().0>
                    {move || format!(" · {} {}", lang.get().pick("checked in", "校验用时"), check_ms().1)}
                </span>
            </p>
            <div class="all-diagnostics" id="all-diagnostics">
                {move || diagnostic_list(report.with(|r| r.diagnostics.clone()), lang.get())}
            </div>
            <dl class="figures">
                <dt>{t(lang, "Effective batch", "有效批大小")}</dt>
                <dd>
                    <strong id="effective-batch">{move || derived.get().effective_batch_size}</strong>
                    <span class="formula" id="effective-batch-formula">{formula}</span>
                    <div class="note">{t(lang, "per device × processes × accumulation", "每卡批大小 × 进程数 × 梯度累积")}</div>
                </dd>
                <dt>{t(lang, "Learning rate", "学习率")}</dt>
                <dd id="learning-rate">{move || short(derived.get().learning_rate)}</dd>
                <dt>{t(lang, "Trainable parameters", "可训练参数")}</dt>
                <dd id="trainable-params">{move || derived.with(|d| match &d.memory {
                    Some(m) => format!(
                        "{} / {} ({})",
                        params_text(m.trainable_params),
                        params_text(m.total_params),
                        trainable_percent(m)
                    ),
                    None => "?".to_string(),
                })}</dd>
                <dt>{t(lang, "Training rows", "训练样本数")}</dt>
                <dd id="train-rows">{move || opt(derived.get().train_rows)}</dd>
                <dt>{t(lang, "Steps per epoch", "每轮步数")}</dt>
                <dd id="steps-per-epoch">{move || opt(derived.get().steps_per_epoch)}</dd>
                <dt>{t(lang, "Total steps", "总步数")}</dt>
                <dd id="total-steps">{move || opt(derived.get().total_steps)}</dd>
                <dt>{t(lang, "Warm-up steps", "预热步数")}</dt>
                <dd id="warmup-steps">{move || opt(derived.get().warmup_steps)}</dd>
                <dt>{t(lang, "Evaluations", "评估次数")}</dt>
                <dd id="num-evals">{move || {
                    let d = derived.get();
                    format!("{} ({})", opt(d.num_evals), d.eval_strategy)
                }}</dd>
                <dt>{t(lang, "Checkpoints saved", "保存次数")}</dt>
                <dd id="num-saves">{move || opt(derived.get().num_saves)}</dd>
            </dl>
            <Show when=needs_rows>
                <label class="rows">
                    {t(lang, "Dataset rows (the specs give no #N):", "数据集行数（数据集未写 #N）：")}
                    <input
                        type="text"
                        id="dataset-rows"
                        class="in"
                        inputmode="numeric"
                        placeholder="1000"
                        on:input=move |ev| {
                            let text = event_target_value(&ev);
                            studio.dataset_rows.set(text.trim().parse::<u64>().ok().filter(|n| *n > 0));
                        }
                    />
                </label>
            </Show>
            <LineChart id="lr-plot" title=lr_title main=lr_curve from_zero=true />
            <MemoryBar />
            <Disk />
        </section>
    }
}

const PARTS: [(&str, &str, &str); 5] = [
    ("weights", "weights", "权重"),
    ("gradients", "gradients", "梯度"),
    ("optimizer", "optimizer", "优化器"),
    ("activations", "activations", "激活"),
    ("overhead", "overhead", "其他开销"),
];

#[component]
fn MemoryBar() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let memory = Memo::new(move |_| studio.report.with(|r| r.derived.memory.clone()));
    let bar = move || {
        let gpu = studio.gpu.get();
        let lang = lang.get();
        let Some(m) = memory.get() else {
            return view! {
                <p class="note" id="memory-unknown">
                    {lang.pick(
                        "Memory: the model is not in the built-in catalog, so there is no estimate.",
                        "显存：模型不在内置目录中，无法估算。",
                    )}
                </p>
            }
            .into_any();
        };
        let values = [
            m.weights_gib,
            m.gradients_gib,
            m.optimizer_gib,
            m.activations_gib,
            m.overhead_gib,
        ];
        let scale = m.per_gpu_gib.max(gpu.memory_gib) * 1.05;
        let width = 300.0;
        let mut x = 0.0;
        let rects = values
            .iter()
            .zip(PARTS)
            .map(|(value, (class, en, zh))| {
                let w = value / scale * width;
                let rect = view! {
                    <rect class=format!("mem {class}") x=x y=4 width=w height=22>
                        <title>{format!("{}: {}", lang.pick(en, zh), gib(*value))}</title>
                    </rect>
                };
                x += w;
                rect
            })
            .collect_view();
        let limit = gpu.memory_gib / scale * width;
        let over = m.per_gpu_gib > gpu.memory_gib;
        view! {
            <div class="memory" id="memory">
                <p>
                    <strong id="memory-total" class:over=over>{gib(m.per_gpu_gib)}</strong>
                    {format!(" {} {} ({})", lang.pick("per GPU vs", "每卡，对比"), gib(gpu.memory_gib), gpu.name)}
                </p>
                <svg viewBox="0 0 300 40" class="membar" id="memory-bar">
                    {rects}
                    <line class="limit" x1=limit x2=limit y1=0 y2=30 />
                    <text class="axis" x=limit y=38 text-anchor="middle">{format!("{:.0}", gpu.memory_gib)}</text>
                </svg>
                <ul class="legend">
                    {values
                        .iter()
                        .zip(PARTS)
                        .map(|(value, (class, en, zh))| view! {
                            <li><span class=format!("swatch {class}")></span>{format!("{} {}", lang.pick(en, zh), gib(*value))}</li>
                        })
                        .collect_view()}
                </ul>
                {(m.cpu_offload_gib > 0.0).then(|| view! {
                    <p class="note">{format!("{} {}", lang.pick("Offloaded to CPU memory:", "卸载到内存："), gib(m.cpu_offload_gib))}</p>
                })}
            </div>
        }
        .into_any()
    };
    view! {
        <h3>{t(lang, "Memory per GPU", "每卡显存")}</h3>
        <label class="gpu-picker">
            {t(lang, "GPU:", "GPU：")}
            <select
                id="gpu"
                class="in"
                on:change=move |ev| {
                    if let Some(gpu) = gpus::find(&event_target_value(&ev)) {
                        studio.gpu.set(gpu);
                    }
                }
            >
                {GPUS
                    .iter()
                    .map(|g| view! {
                        <option value=g.id prop:selected=move || studio.gpu.get().id == g.id>
                            {format!("{} ({:.0} GiB)", g.name, g.memory_gib)}
                        </option>
                    })
                    .collect_view()}
            </select>
        </label>
        {bar}
    }
}

#[component]
fn Disk() -> impl IntoView {
    let studio = use_studio();
    let lang = studio.lang;
    let text = move || {
        let lang = lang.get();
        studio.report.with(|r| {
            let d = &r.derived;
            match (d.checkpoint_gib, d.disk_gib) {
                (Some(one), Some(all)) => {
                    let kept = studio.config.with(|c| c.sft.save_total_limit);
                    format!(
                        "{} {} ({} {} + {} {}); {} {} {}",
                        lang.pick("Each checkpoint", "每个检查点"),
                        gib(one),
                        lang.pick("weights", "权重"),
                        gib(d.checkpoint_weights_gib.unwrap_or(0.0)),
                        lang.pick("optimizer state", "优化器状态"),
                        gib(d.checkpoint_optimizer_gib.unwrap_or(0.0)),
                        gib(all),
                        lang.pick("for the kept checkpoints", "用于保留的检查点"),
                        kept.map(|k| format!("(save_total_limit {k})"))
                            .unwrap_or_default(),
                    )
                }
                (Some(one), None) => format!(
                    "{} {}",
                    lang.pick("Each checkpoint", "每个检查点"),
                    gib(one)
                ),
                _ => lang
                    .pick(
                        "Disk: unknown (model not in the catalog).",
                        "磁盘：未知（模型不在目录中）。",
                    )
                    .to_string(),
            }
        })
    };
    view! {
        <h3>{t(lang, "Disk", "磁盘")}</h3>
        <p id="disk">{text}</p>
    }
}
