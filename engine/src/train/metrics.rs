//! Where a run's numbers go: `logging.jsonl` in ms-swift's key order and formats (the train,
//! eval, end-of-train and summary records), and the [`ScalarSink`] hook that TensorBoard event
//! files and PNG plots plug into.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::checkpoint::TrainerState;
use super::step::StepLoss;

/// One logging.jsonl record: keys in the order they are written.
pub type Record = Vec<(String, Value)>;

/// Receives every numeric metric under its TensorBoard tag (`train/loss`, `eval/loss`, ...).
/// The TensorBoard `EventWriter` (event files under `runs/`) and the `images/` plotter implement
/// this; the recipe calls every sink it was given and knows nothing else about them.
pub trait ScalarSink {
    fn log_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> anyhow::Result<()>;

    /// Called once when training ends (a plotter draws its PNGs here).
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

impl ScalarSink for crate::tensorboard::EventWriter {
    fn log_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> anyhow::Result<()> {
        let now = crate::tensorboard::unix_time_now();
        for (tag, value) in scalars {
            self.add_scalar(tag, *value as f32, step as i64, now)?;
        }
        Ok(())
    }
}

/// Collects every scalar and draws `images/<tag>.png` when the run ends (as ms-swift does).
pub struct CurvePlotter {
    dir: std::path::PathBuf,
    history: std::collections::BTreeMap<String, Vec<(u64, f64)>>,
}

impl CurvePlotter {
    pub fn new(dir: std::path::PathBuf) -> Self {
        Self {
            dir,
            history: Default::default(),
        }
    }
}

impl ScalarSink for CurvePlotter {
    fn log_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> anyhow::Result<()> {
        for (tag, value) in scalars {
            self.history
                .entry(tag.to_string())
                .or_default()
                .push((step, *value));
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        crate::plot::write_images(&self.dir, &self.history)?;
        Ok(())
    }
}

/// Python's `round(value, 8)`, which ms-swift applies to every float it logs.
pub fn round8(value: f64) -> f64 {
    round_to(value, 8)
}

pub fn round_to(value: f64, decimals: i32) -> f64 {
    if !value.is_finite() {
        return value;
    }
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// A float as a JSON value; non-finite numbers (which JSON lacks) become strings like "nan".
pub fn float(value: f64) -> Value {
    serde_json::Number::from_f64(value)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(value.to_string().to_lowercase()))
}

/// ms-swift's `format_time`: `1d 2h 3m 4s`, `2h 3m 4s`, `3m 4s` or `4s`.
pub fn format_time(seconds: f64) -> String {
    let total = seconds.max(0.0) as u64;
    let (days, hours, minutes, secs) = (
        total / 86_400,
        total % 86_400 / 3600,
        total % 3600 / 60,
        total % 60,
    );
    if days > 0 {
        format!("{days}d {hours}h {minutes}m {secs}s")
    } else if hours > 0 {
        format!("{hours}h {minutes}m {secs}s")
    } else if minutes > 0 {
        format!("{minutes}m {secs}s")
    } else {
        format!("{secs}s")
    }
}

/// A record as one JSON line with Python's `json.dumps` separators (`", "` and `": "`).
pub fn to_json_line(record: &[(String, Value)]) -> String {
    let fields: Vec<String> = record
        .iter()
        .map(|(key, value)| format!("{}: {}", Value::String(key.clone()), python_json(value)))
        .collect();
    format!("{{{}}}", fields.join(", "))
}

fn python_json(value: &Value) -> String {
    match value {
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(python_json).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// Appends records to `<run_dir>/logging.jsonl`, one line each, flushed at once so that a
/// reader (the server, a killed run's post-mortem) sees every line written so far.
pub struct JsonlLogger {
    file: File,
}

impl JsonlLogger {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file })
    }

    pub fn write(&mut self, record: &[(String, Value)]) -> std::io::Result<()> {
        writeln!(self.file, "{}", to_json_line(record))?;
        self.file.flush()
    }
}

/// A log record's numeric entries under TensorBoard tags, as transformers' TensorBoard
/// callback rewrites them (`eval_loss` -> `eval/loss`, anything else -> `train/<key>`).
pub fn tensorboard_scalars(entry: &[(String, Value)]) -> Vec<(String, f64)> {
    entry
        .iter()
        .filter_map(|(key, value)| {
            let value = value.as_f64()?;
            let tag = match key.strip_prefix("eval_") {
                Some(rest) => format!("eval/{rest}"),
                None => format!("train/{key}"),
            };
            Some((tag, value))
        })
        .collect()
}

/// Every log event of a run: logging.jsonl plus the scalar sinks.
pub struct MetricLogger {
    jsonl: JsonlLogger,
    sinks: Vec<Box<dyn ScalarSink>>,
}

impl MetricLogger {
    pub fn new(jsonl: JsonlLogger, sinks: Vec<Box<dyn ScalarSink>>) -> Self {
        Self { jsonl, sinks }
    }

    /// Writes one event as a logging.jsonl line: `entry` (what transformers logs, which is also
    /// the trainer state's log_history entry) followed by `progress` (ms-swift's time fields,
    /// logging.jsonl only). The entry's numbers go to every sink. Returns the line.
    pub fn log(
        &mut self,
        step: u64,
        entry: &[(String, Value)],
        progress: &[(String, Value)],
    ) -> anyhow::Result<String> {
        let mut record: Record = entry.to_vec();
        record.extend_from_slice(progress);
        self.jsonl.write(&record)?;
        let scalars = tensorboard_scalars(entry);
        let scalars: Vec<(&str, f64)> = scalars.iter().map(|(t, v)| (t.as_str(), *v)).collect();
        for sink in &mut self.sinks {
            sink.log_scalars(step, &scalars)?;
        }
        Ok(to_json_line(&record))
    }

    /// A line for logging.jsonl only (the final summary).
    pub fn write_line(&mut self, record: &[(String, Value)]) -> std::io::Result<()> {
        self.jsonl.write(record)
    }

    pub fn finish(&mut self) -> anyhow::Result<()> {
        for sink in &mut self.sinks {
            sink.finish()?;
        }
        Ok(())
    }
}

/// A log entry as trainer_state.json's log_history holds it: the entry plus `step`.
pub fn history_entry(entry: Record, step: u64) -> serde_json::Map<String, Value> {
    let mut map: serde_json::Map<String, Value> = entry.into_iter().collect();
    map.insert("step".into(), Value::from(step));
    map
}

/// The logging interval not yet written: sums over its optimizer steps (saved in checkpoints,
/// so a resumed run logs the very numbers the uninterrupted one does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LogWindow {
    pub steps: u64,
    pub loss_sum: f64,
    pub aux_loss_sum: f64,
    pub label_tokens: u64,
    pub correct_tokens: u64,
}

impl LogWindow {
    pub fn add(&mut self, step: &StepLoss) {
        self.steps += 1;
        self.loss_sum += step.loss;
        self.aux_loss_sum += step.aux_loss;
        self.label_tokens += step.label_tokens;
        self.correct_tokens += step.correct_tokens;
    }

    /// The train log line of the window (ms-swift's keys and order); the window starts over.
    pub fn take_record(
        &mut self,
        grad_norm: f64,
        learning_rate: f64,
        epoch: f64,
        moe: bool,
    ) -> Record {
        let steps = self.steps.max(1) as f64;
        let mut entry: Record = vec![
            ("loss".into(), float(round8(self.loss_sum / steps))),
            ("grad_norm".into(), float(round8(grad_norm))),
            ("learning_rate".into(), float(round8(learning_rate))),
            (
                "token_acc".into(),
                float(round8(
                    self.correct_tokens as f64 / self.label_tokens.max(1) as f64,
                )),
            ),
        ];
        if moe {
            entry.push(("aux_loss".into(), float(round8(self.aux_loss_sum / steps))));
        }
        entry.push(("epoch".into(), float(round8(epoch))));
        *self = LogWindow::default();
        entry
    }
}

/// Wall time of this process's part of the run, for ms-swift's time fields.
pub struct RunClock {
    started: Instant,
    start_step: u64,
    /// The device whose peak reserved memory `memory(GiB)` reports (a GPU), if any.
    device: candle_core::Device,
}

impl RunClock {
    pub fn start(start_step: u64, device: &candle_core::Device) -> Self {
        Self {
            started: Instant::now(),
            start_step,
            device: device.clone(),
        }
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn steps_done(&self, step: u64) -> u64 {
        step - self.start_step
    }

    /// The time and progress fields ms-swift appends to every logging.jsonl line (they stay out
    /// of trainer_state.json's log_history). `memory(GiB)` is the GPU's peak reserved memory
    /// (torch's max_memory_reserved), left out on the CPU, as ms-swift omits a zero one.
    pub fn progress_fields(&self, step: u64, total: u64) -> Record {
        let elapsed = self.elapsed();
        let speed = elapsed / self.steps_done(step).max(1) as f64;
        let mut fields: Record = vec![
            (
                "global_step/max_steps".into(),
                Value::from(format!("{step}/{total}")),
            ),
            ("elapsed_time".into(), Value::from(format_time(elapsed))),
            (
                "remaining_time".into(),
                Value::from(format_time(speed * total.saturating_sub(step) as f64)),
            ),
        ];
        if let Some(gib) = crate::device::peak_reserved_gib(&self.device).filter(|&g| g > 0.0) {
            fields.push(("memory(GiB)".into(), float(round_to(gib, 2))));
        }
        fields.push(("train_speed(s/it)".into(), float(round_to(speed, 6))));
        fields
    }
}

/// Counters over this process's part of the run, for the end-of-train line.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunTotals {
    pub input_tokens: u64,
    pub samples: u64,
}

impl RunTotals {
    pub fn add(&mut self, step: &StepLoss) {
        self.input_tokens += step.input_tokens;
        self.samples += step.samples;
    }
}

/// transformers' end-of-train line: runtime, throughput, total_flos, train_loss.
pub fn end_of_train_record(
    clock: &RunClock,
    totals: &RunTotals,
    state: &TrainerState,
    loss_sum: f64,
) -> Record {
    let runtime = clock.elapsed();
    let per_second = |n: f64| float(round_to(n / runtime.max(1e-9), 3));
    vec![
        ("train_runtime".into(), float(round_to(runtime, 4))),
        (
            "train_samples_per_second".into(),
            per_second(totals.samples as f64),
        ),
        (
            "train_steps_per_second".into(),
            per_second(clock.steps_done(state.global_step) as f64),
        ),
        ("total_flos".into(), float(state.total_flos)),
        (
            "train_loss".into(),
            float(round8(loss_sum / state.global_step.max(1) as f64)),
        ),
        ("epoch".into(), float(round8(state.epoch))),
    ]
}

/// ms-swift's last logging.jsonl line: the model, the datasets, the checkpoints, the history.
pub fn summary_record(
    parameter_info: String,
    train_dataset: Value,
    val_dataset: Value,
    last_checkpoint: Option<&Path>,
    state: &TrainerState,
) -> Record {
    vec![
        ("model_parameter_info".into(), Value::from(parameter_info)),
        ("train_dataset".into(), train_dataset),
        ("val_dataset".into(), val_dataset),
        (
            "last_model_checkpoint".into(),
            last_checkpoint.map_or(Value::Null, |p| Value::from(p.display().to_string())),
        ),
        (
            "best_model_checkpoint".into(),
            state
                .best_model_checkpoint
                .clone()
                .map_or(Value::Null, Value::from),
        ),
        (
            "best_metric".into(),
            state.best_metric.map_or(Value::Null, float),
        ),
        ("global_step".into(), Value::from(state.global_step)),
        (
            "log_history".into(),
            Value::Array(
                state
                    .log_history
                    .iter()
                    .cloned()
                    .map(Value::Object)
                    .collect(),
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_ms_swift() {
        assert_eq!(format_time(4.9), "4s");
        assert_eq!(format_time(62.0), "1m 2s");
        assert_eq!(format_time(3600.0 * 2.0 + 63.0), "2h 1m 3s");
        assert_eq!(format_time(86_400.0 + 3661.0), "1d 1h 1m 1s");
        assert_eq!(round8(0.123456789123), 0.12345679);
        let record: Record = vec![
            ("loss".into(), float(1.5)),
            ("global_step/max_steps".into(), Value::String("5/39".into())),
        ];
        assert_eq!(
            to_json_line(&record),
            r#"{"loss": 1.5, "global_step/max_steps": "5/39"}"#
        );
        assert_eq!(float(f64::NAN), Value::String("nan".into()));
    }
}
