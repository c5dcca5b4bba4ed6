//! Which files a job may name. The server decides where runs write (under the data dir) and
//! which folders a job's local inputs may lie in: the data dir, the repository's `examples/` and
//! every `--allow-read` folder. A path is judged after `canonicalize` (so neither `..` nor a
//! symlink can lead out) by a component-wise prefix check. The same roots bound what
//! `/api/check` reads from disk (a local model's config.json, row counts, `--config` files).

use std::path::{Path, PathBuf};

use whet_shared::config::ZeroSettings;
use whet_shared::dataset_spec::DatasetSpec;
use whet_shared::{Diagnostic, JobConfig};

/// Environment variables a config may not set for its run: they change what program runs or
/// how it loads, or would expose the server's secret (and [`LAUNCHER_ENV`]).
const FORBIDDEN_ENV_PREFIXES: &[&str] = &["LD_", "DYLD_", "PYTHON", "WHET_TOKEN"];
const FORBIDDEN_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "SHELL",
    "BASH_ENV",
    "ENV",
    "IFS",
    "CUDA_VISIBLE_DEVICES",
];

/// An outer launcher's variables (torchrun's, and NPROC_PER_NODE): the server launches a job
/// from its config alone, so a config may not set them and the server's own are not passed on
/// (they would make the job's launcher a rank, or start more ranks than it has devices).
pub const LAUNCHER_ENV: &[&str] = &[
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "NPROC_PER_NODE",
];

/// Largest file `/api/check` reads to learn row counts (a bigger one counts as unknown rows).
pub const MAX_READ_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
    /// Inside the roots but never readable by a job: the server's own secrets and database.
    denied: Vec<PathBuf>,
}

impl AllowedRoots {
    /// Canonical forms of the folders that exist (a missing `--allow-read` folder is reported by
    /// the caller, not here).
    pub fn new<'a>(folders: impl IntoIterator<Item = &'a Path>) -> AllowedRoots {
        let mut roots: Vec<PathBuf> = folders
            .into_iter()
            .filter_map(|f| f.canonicalize().ok())
            .collect();
        roots.sort();
        roots.dedup();
        AllowedRoots {
            roots,
            denied: Vec::new(),
        }
    }

    /// Refuses these files (and anything under them) even inside a root.
    pub fn deny<'a>(mut self, paths: impl IntoIterator<Item = &'a Path>) -> AllowedRoots {
        self.denied
            .extend(paths.into_iter().map(|p| p.to_path_buf()));
        self
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The canonical path, if it exists and lies inside a root.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, Refusal> {
        let canonical = Path::new(path)
            .canonicalize()
            .map_err(|_| Refusal::NotFound)?;
        if self
            .denied
            .iter()
            .any(|denied| canonical.starts_with(denied))
        {
            return Err(Refusal::Outside);
        }
        if self.roots.iter().any(|root| canonical.starts_with(root)) {
            Ok(canonical)
        } else {
            Err(Refusal::Outside)
        }
    }

    /// A file's text if it lies inside the roots (the reader `/api/check` gives whet-shared).
    pub fn read_file(&self, path: &str) -> Option<String> {
        let path = self.resolve(path).ok()?;
        if std::fs::metadata(&path).ok()?.len() > MAX_READ_BYTES {
            return None;
        }
        std::fs::read_to_string(path).ok()
    }

    /// Diagnostics for every path in the config that is local and not allowed.
    pub fn check_job(&self, config: &JobConfig) -> Vec<Diagnostic> {
        let mut found = Vec::new();
        let sft = &config.sft;
        if let Some(model) = &sft.model {
            if is_local_path(model) {
                self.check_path("model", model, &mut found);
            }
        }
        for adapter in &sft.adapters {
            if is_local_path(adapter) {
                self.check_path("adapters", adapter, &mut found);
            }
        }
        for (field, specs) in [("dataset", &sft.dataset), ("val_dataset", &sft.val_dataset)] {
            for text in specs {
                // Unparsable specs are `validate`'s to report.
                if let Ok(spec) = DatasetSpec::parse(text, field) {
                    if spec.is_local || (spec.hub.is_none() && Path::new(&spec.id).exists()) {
                        self.check_path(field, &spec.id, &mut found);
                    }
                }
            }
        }
        if let Some(checkpoint) = &sft.resume_from_checkpoint {
            self.check_path("resume_from_checkpoint", checkpoint, &mut found);
        }
        if let Some(deepspeed) = &sft.deepspeed {
            if ZeroSettings::from_preset(deepspeed).is_none() {
                self.check_path("deepspeed", deepspeed, &mut found);
            }
        }
        for name in config.launch.env.keys() {
            let upper = name.to_ascii_uppercase();
            if FORBIDDEN_ENV.contains(&upper.as_str())
                || LAUNCHER_ENV.contains(&upper.as_str())
                || FORBIDDEN_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
            {
                found.push(
                    Diagnostic::error(
                        "env",
                        "env_not_allowed",
                        format!("the server does not let a job set the environment variable `{name}`"),
                        format!("服务器不允许任务设置环境变量 `{name}`"),
                    )
                    .with_fix(
                        "remove it from the script; the server sets the run's environment (devices included)",
                        "请从脚本中删除它；运行环境（包括设备）由服务器设置",
                    ),
                );
            }
        }
        found
    }

    fn check_path(&self, field: &str, path: &str, found: &mut Vec<Diagnostic>) {
        let roots = self
            .roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let diagnostic = match self.resolve(path) {
            Ok(_) => return,
            Err(Refusal::NotFound) => Diagnostic::error(
                field,
                "path_not_found",
                format!("`{field}` names `{path}`, which does not exist on the server"),
                format!("`{field}` 指向的 `{path}` 在服务器上不存在"),
            )
            .with_fix(
                format!("put it under one of the server's readable folders ({roots}) and name that path"),
                format!("请将其放到服务器可读的目录（{roots}）下并使用该路径"),
            ),
            Err(Refusal::Outside) => Diagnostic::error(
                field,
                "path_not_allowed",
                format!(
                    "`{field}` names `{path}`, which lies outside the folders this server lets jobs read"
                ),
                format!("`{field}` 指向的 `{path}` 不在服务器允许任务读取的目录内"),
            )
            .with_fix(
                format!("move it under one of {roots}, or start whet-server with --allow-read <folder>"),
                format!("请将其移到 {roots} 之一下，或用 --allow-read <目录> 启动 whet-server"),
            ),
        };
        found.push(diagnostic);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    Outside,
}

/// A model/adapter string names a local folder (rather than a hub id such as `Qwen/Qwen3-8B`)
/// when it looks like a path or exists on disk (ms-swift prefers an existing local folder).
pub fn is_local_path(text: &str) -> bool {
    text.starts_with('/')
        || text.starts_with('.')
        || text.starts_with('~')
        || text.contains('\\')
        || Path::new(text).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(f: impl FnOnce(&mut JobConfig)) -> JobConfig {
        let mut c = JobConfig::default();
        f(&mut c);
        c
    }

    fn fields(d: &[Diagnostic]) -> Vec<(&str, &str)> {
        d.iter()
            .map(|d| (d.field.as_str(), d.code.as_str()))
            .collect()
    }

    #[test]
    fn paths_inside_roots_pass_and_escapes_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("train.jsonl"), "{}\n").unwrap();
        std::fs::create_dir(root.path().join("model")).unwrap();
        std::fs::write(outside.path().join("secret.jsonl"), "{}\n").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.jsonl"),
            root.path().join("link.jsonl"),
        )
        .unwrap();
        let roots = AllowedRoots::new([root.path()]);
        let r = root.path().display();

        let ok = config(|c| {
            c.sft.model = Some(format!("{r}/model"));
            c.sft.dataset = vec![format!("{r}/train.jsonl#10"), "AI-ModelScope/alpaca".into()];
            c.sft.deepspeed = Some("zero2".into());
        });
        assert!(
            roots.check_job(&ok).is_empty(),
            "{:?}",
            roots.check_job(&ok)
        );

        let bad = config(|c| {
            c.sft.model = Some(format!("{r}/model/../../../etc"));
            c.sft.dataset = vec![format!("{r}/link.jsonl")];
            c.sft.val_dataset = vec![format!(
                "{r}/../{}/secret.jsonl",
                outside.path().file_name().unwrap().to_string_lossy()
            )];
            c.sft.resume_from_checkpoint = Some("/etc".into());
            c.sft.deepspeed = Some(format!("{r}/missing.json"));
            c.launch.env.insert("LD_PRELOAD".into(), "/x.so".into());
            c.launch.env.insert("MASTER_PORT".into(), "29501".into());
        });
        assert_eq!(
            fields(&roots.check_job(&bad)),
            vec![
                ("model", "path_not_allowed"),
                ("dataset", "path_not_allowed"),
                ("val_dataset", "path_not_allowed"),
                ("resume_from_checkpoint", "path_not_allowed"),
                ("deepspeed", "path_not_found"),
                ("env", "env_not_allowed"),
                ("env", "env_not_allowed"),
            ]
        );
    }

    #[test]
    fn denied_files_are_refused_inside_a_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("token"), "secret").unwrap();
        std::fs::write(root.path().join("data.jsonl"), "{}").unwrap();
        let token = root.path().canonicalize().unwrap().join("token");
        let roots = AllowedRoots::new([root.path()]).deny([token.as_path()]);
        let r = root.path().display();
        assert_eq!(roots.resolve(&format!("{r}/token")), Err(Refusal::Outside));
        assert_eq!(
            roots.resolve(&format!("{r}/./token")),
            Err(Refusal::Outside)
        );
        assert_eq!(roots.read_file(&format!("{r}/token")), None);
        assert!(roots.resolve(&format!("{r}/data.jsonl")).is_ok());
    }

    #[test]
    fn hub_ids_are_not_paths() {
        assert!(!is_local_path("Qwen/Qwen3-8B"));
        assert!(is_local_path("./models/q"));
        assert!(is_local_path("/models/q"));
    }

    #[test]
    fn read_file_only_reads_inside_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.json"), "in").unwrap();
        std::fs::write(outside.path().join("b.json"), "out").unwrap();
        let roots = AllowedRoots::new([root.path()]);
        assert_eq!(
            roots.read_file(&root.path().join("a.json").display().to_string()),
            Some("in".into())
        );
        assert_eq!(
            roots.read_file(&outside.path().join("b.json").display().to_string()),
            None
        );
    }
}
