//! What a job's run folder holds, read from ms-swift's layout (DESIGN §3, outputs): the
//! newest `v<N>-<time>/` version folder under its output dir, and that folder's
//! `checkpoint-<step>/` folders with their kind, size, and the metrics trainer_state.json
//! logged at their step. Only ever paths under the server's own data dir.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use whet_shared::api::CheckpointInfo;

/// The output dir the server gives a job's run (`whet sft --output_dir`).
pub fn output_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("output")
}

/// The newest `v<N>-...` folder in `output_dir` that holds `file`.
pub fn version_dir_with(output_dir: &Path, file: &str) -> Option<PathBuf> {
    let mut versions: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let number = name
                .strip_prefix('v')?
                .split_once('-')?
                .0
                .parse::<u64>()
                .ok()?;
            Some((number, entry.path()))
        })
        .collect();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|(_, dir)| dir)
        .find(|dir| dir.join(file).exists())
}

/// The run's checkpoints, oldest first (complete ones only: a checkpoint is written under a
/// temporary name and renamed, so a `checkpoint-<step>` folder is whole).
pub fn checkpoints(run_dir: &Path) -> Vec<CheckpointInfo> {
    let Some(version) = version_dir_with(&output_dir(run_dir), "logging.jsonl") else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&version) else {
        return Vec::new();
    };
    let mut found: Vec<CheckpointInfo> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            let path = entry.path();
            if !path.join("trainer_state.json").is_file() {
                return None;
            }
            Some(describe(&path, name, step))
        })
        .collect();
    found.sort_by_key(|c| c.step);
    // Each checkpoint's trainer_state.json named the best as it stood then: the newest knows.
    let best = found
        .last()
        .and_then(|newest| best_of(Path::new(&newest.path)));
    for checkpoint in &mut found {
        checkpoint.best = best.as_deref() == Some(checkpoint.name.as_str());
    }
    found
}

/// The folder name of the best checkpoint `checkpoint`'s trainer_state.json names.
fn best_of(checkpoint: &Path) -> Option<String> {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer_state.json")).ok()?)
            .ok()?;
    let best = state["best_model_checkpoint"].as_str()?;
    Some(Path::new(best).file_name()?.to_string_lossy().into_owned())
}

/// The checkpoint named `name` (a folder name, never a path), or the latest.
pub fn find_checkpoint(run_dir: &Path, name: Option<&str>) -> Option<CheckpointInfo> {
    let all = checkpoints(run_dir);
    match name {
        Some(name) => all.into_iter().find(|c| c.name == name),
        None => all.into_iter().last(),
    }
}

fn describe(path: &Path, name: String, step: u64) -> CheckpointInfo {
    let state: Value = std::fs::read_to_string(path.join("trainer_state.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let mut metrics = Map::new();
    for record in state["log_history"].as_array().into_iter().flatten() {
        if record["step"].as_u64() == Some(step) {
            if let Some(fields) = record.as_object() {
                metrics.extend(fields.clone());
            }
        }
    }
    let kind = if path.join("adapter_config.json").is_file() {
        "adapter"
    } else {
        "full"
    };
    CheckpointInfo {
        name,
        step,
        path: path.display().to_string(),
        kind: kind.to_string(),
        size_bytes: folder_size(path),
        best: false,
        metrics,
    }
}

/// Bytes of the files under `path`.
pub fn folder_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => folder_size(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_complete_checkpoints_of_the_newest_version_with_their_metrics() {
        let run = tempfile::tempdir().unwrap();
        let output = output_dir(run.path());
        let old = output.join("v0-20260101-000000");
        let new = output.join("v1-20260102-000000");
        for dir in [&old, &new] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("logging.jsonl"), "{}\n").unwrap();
        }
        let history = json!([{"step": 10, "loss": 1.5}, {"step": 10, "eval_loss": 1.25}, {"step": 20, "loss": 1.0}]);
        // Each thought itself best when it was saved: the newest state's word counts.
        for step in [20, 10] {
            let dir = new.join(format!("checkpoint-{step}"));
            std::fs::create_dir_all(&dir).unwrap();
            let best = dir.display().to_string();
            let state = json!({"best_model_checkpoint": best, "log_history": history});
            std::fs::write(dir.join("trainer_state.json"), state.to_string()).unwrap();
            std::fs::write(dir.join("model.safetensors"), vec![0u8; 1000]).unwrap();
        }
        std::fs::create_dir_all(new.join("checkpoint-30.tmp")).unwrap();
        std::fs::create_dir_all(old.join("checkpoint-99")).unwrap();
        std::fs::write(new.join("checkpoint-20/adapter_config.json"), "{}").unwrap();

        let found = checkpoints(run.path());
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["checkpoint-10", "checkpoint-20"]);
        assert_eq!(found[0].metrics["eval_loss"], 1.25);
        assert_eq!(found[0].metrics["loss"], 1.5);
        assert!(!found[0].best && found[1].best);
        assert_eq!(
            (found[0].kind.as_str(), found[1].kind.as_str()),
            ("full", "adapter")
        );
        assert!(found[0].size_bytes >= 1000);
        assert_eq!(find_checkpoint(run.path(), None).unwrap().step, 20);
        assert_eq!(
            find_checkpoint(run.path(), Some("checkpoint-10"))
                .unwrap()
                .step,
            10
        );
        assert!(find_checkpoint(run.path(), Some("../checkpoint-10")).is_none());
    }
}
