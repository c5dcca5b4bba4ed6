//! Dataset specs as ms-swift writes them: `[hf::|ms::]<id-or-path>[:subset1/subset2][#N]`.
//! `#N` is read from the right; `:subsets` are split by `/`.

use serde::Serialize;

use crate::diagnostics::{shorten, Diagnostic};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hub {
    Hf,
    Ms,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatasetSpec {
    /// Forced hub (`hf::` / `ms::`), if any.
    pub hub: Option<Hub>,
    /// Hub id, registered name (`self-cognition`) or local path.
    pub id: String,
    pub subsets: Vec<String>,
    /// `#N`: rows to sample (repeating the dataset when N is larger).
    pub sample: Option<u64>,
    /// Looks like a local file or folder rather than a hub id.
    pub is_local: bool,
}

const LOCAL_EXTENSIONS: &[&str] = &[".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv"];

impl DatasetSpec {
    /// Parses one spec; `field` is the flag it came from (`dataset` or `val_dataset`).
    pub fn parse(text: &str, field: &str) -> Result<DatasetSpec, Diagnostic> {
        let shown = shorten(text);
        let bad = |en: String, zh: String| {
            Diagnostic::error(field, "dataset_spec_invalid", en, zh).with_fix(
                "write [hf::]id-or-path[:subset][#N], e.g. 'liucong/Chinese-DeepSeek-R1-Distill-data-110k#1000' or /data/train.jsonl",
                "格式为 [hf::]ID或路径[:子集][#N]，例如 'liucong/Chinese-DeepSeek-R1-Distill-data-110k#1000' 或 /data/train.jsonl",
            )
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(bad(
                "a dataset spec is empty".into(),
                "数据集为空字符串".into(),
            ));
        }
        let (hub, rest) = if let Some(rest) = trimmed.strip_prefix("hf::") {
            (Some(Hub::Hf), rest)
        } else if let Some(rest) = trimmed.strip_prefix("ms::") {
            (Some(Hub::Ms), rest)
        } else {
            (None, trimmed)
        };
        let (rest, sample) = match rest.rsplit_once('#') {
            Some((head, count)) => {
                let n = count.trim().parse::<u64>().map_err(|_| {
                    bad(
                        format!(
                            "`#{}` in dataset `{shown}` is not a whole number of rows",
                            shorten(count)
                        ),
                        format!("数据集 `{shown}` 中的 `#{}` 不是整数行数", shorten(count)),
                    )
                })?;
                if n == 0 {
                    return Err(bad(
                        format!("`#0` in dataset `{shown}` samples no rows; N must be at least 1"),
                        format!("数据集 `{shown}` 中的 `#0` 不采样任何数据；N 至少为 1"),
                    ));
                }
                (head, Some(n))
            }
            None => (rest, None),
        };
        let looks_local = |s: &str| {
            s.starts_with('/')
                || s.starts_with("./")
                || s.starts_with("../")
                || s.starts_with('~')
                || LOCAL_EXTENSIONS
                    .iter()
                    .any(|ext| s.to_ascii_lowercase().ends_with(ext))
        };
        // A subset follows the last ':' unless the text is a local path (which may contain ':').
        let (id, subsets) = match rest.rsplit_once(':') {
            Some((id, subsets)) if !looks_local(rest) => {
                let subsets: Vec<String> = subsets.split('/').map(str::to_string).collect();
                if subsets.iter().any(|s| s.trim().is_empty()) {
                    return Err(bad(
                        format!("dataset `{shown}` has an empty subset after ':'"),
                        format!("数据集 `{shown}` 的 ':' 后子集为空"),
                    ));
                }
                (id, subsets)
            }
            _ => (rest, Vec::new()),
        };
        if id.trim().is_empty() {
            return Err(bad(
                format!("dataset `{shown}` has no id or path"),
                format!("数据集 `{shown}` 缺少 ID 或路径"),
            ));
        }
        Ok(DatasetSpec {
            hub,
            id: id.to_string(),
            subsets,
            sample,
            is_local: hub.is_none() && looks_local(id),
        })
    }
}

impl std::fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hub {
            Some(Hub::Hf) => write!(f, "hf::")?,
            Some(Hub::Ms) => write!(f, "ms::")?,
            None => {}
        }
        write!(f, "{}", self.id)?;
        if !self.subsets.is_empty() {
            write!(f, ":{}", self.subsets.join("/"))?;
        }
        if let Some(n) = self.sample {
            write!(f, "#{n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_seed_spec() {
        let spec = DatasetSpec::parse(
            "liucong/Chinese-DeepSeek-R1-Distill-data-110k#1000",
            "dataset",
        )
        .unwrap();
        assert_eq!(spec.id, "liucong/Chinese-DeepSeek-R1-Distill-data-110k");
        assert_eq!(spec.sample, Some(1000));
        assert!(spec.subsets.is_empty());
        assert!(!spec.is_local);
    }

    #[test]
    fn reads_hub_prefix_subsets_and_paths() {
        let spec = DatasetSpec::parse(
            "hf::modelscope/self-cognition:qwen3/empty_think#500",
            "dataset",
        )
        .unwrap();
        assert_eq!(spec.hub, Some(Hub::Hf));
        assert_eq!(spec.id, "modelscope/self-cognition");
        assert_eq!(spec.subsets, vec!["qwen3", "empty_think"]);
        assert_eq!(spec.sample, Some(500));
        assert_eq!(
            spec.to_string(),
            "hf::modelscope/self-cognition:qwen3/empty_think#500"
        );

        let local = DatasetSpec::parse("/data/my_dataset.jsonl", "dataset").unwrap();
        assert!(local.is_local);
        assert_eq!(local.id, "/data/my_dataset.jsonl");
        let local = DatasetSpec::parse("./train.jsonl#20", "dataset").unwrap();
        assert_eq!(
            (local.id.as_str(), local.sample),
            ("./train.jsonl", Some(20))
        );
    }

    #[test]
    fn rejects_bad_counts() {
        for bad in ["ds#abc", "ds#", "ds#0", "ds#-3", "#5", "", "ds:#3"] {
            let err = DatasetSpec::parse(bad, "dataset").unwrap_err();
            assert_eq!(err.code, "dataset_spec_invalid", "{bad}");
            assert!(!err.fix.is_empty());
        }
    }
}
