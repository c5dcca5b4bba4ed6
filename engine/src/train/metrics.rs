//! Where a run's numbers go: `logging.jsonl` in ms-swift's key order and formats, and the
//! [`ScalarSink`] hook that TensorBoard event files and PNG plots plug into.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde_json::Value;

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
