//! `whet export --adapters DIR --merge_lora true`: a LoRA adapter merged into its base and
//! written as a full Hugging Face model folder (config.json, generation_config.json, safetensors
//! sharded past 5 GB, the base's tokenizer files, the run's args.json), atomically: everything
//! goes into a temporary folder beside `--output_dir`, renamed when complete.
//!
//! The base is `--model` if given, else the `model` of the run's args.json (the adapter folder's
//! own, as whet and ms-swift write one into each checkpoint, else its parent run folder's), else
//! adapter_config.json's `base_model_name_or_path`. A relative path from either file is looked
//! for beside the adapter folder first (PEFT folders such as the fixtures' say `..`), then from
//! the current directory (where the training command ran); anything else is a hub id.
//!
//! Only args.json's `model`, `model_revision` and `use_hf` are read: a QLoRA run's
//! `quant_method`/`quant_bits` are not, since its adapter merges into the unquantized base
//! (see [`adapter::merge_adapter`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use crate::dataset::HubSettings;
use crate::model::adapter;
use crate::train::checkpoint::{copy_tokenizer_files, write_model_config, MAX_SHARD_BYTES};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The PEFT LoRA adapter folder to merge (adapter_config.json, adapter_model.safetensors),
    /// e.g. a `whet sft --tuner_type lora` checkpoint.
    #[arg(long)]
    pub adapters: PathBuf,
    /// The base model folder or hub id; default: the run's args.json, else adapter_config.json's
    /// base_model_name_or_path.
    #[arg(long)]
    pub model: Option<String>,
    /// A hub id's revision (branch, tag or commit).
    #[arg(long = "model_revision", alias = "model-revision")]
    pub model_revision: Option<String>,
    /// Hub ids come from Hugging Face rather than ModelScope.
    #[arg(long = "use_hf", alias = "use-hf", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub use_hf: Option<bool>,
    /// Merge the adapter into the base's weights; required, since merging is what whet exports.
    #[arg(long = "merge_lora", alias = "merge-lora", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub merge_lora: Option<bool>,
    /// Where the merged model goes (a new or empty folder); default `<adapters>-merged`, as
    /// ms-swift names it.
    #[arg(long = "output_dir", alias = "output-dir")]
    pub output_dir: Option<PathBuf>,
}

/// The base model a run or an adapter names, and where the name came from.
struct NamedBase {
    name: String,
    revision: Option<String>,
    use_hf: Option<bool>,
    source: PathBuf,
}

/// The `model` of the args.json in `adapters` or, failing that, in its parent (the run folder).
fn base_from_args_json(adapters: &Path) -> anyhow::Result<Option<NamedBase>> {
    let candidates = [
        Some(adapters.join("args.json")),
        adapters.parent().map(|run| run.join("args.json")),
    ];
    for path in candidates.into_iter().flatten() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let args: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        if let Some(model) = args["model"].as_str() {
            return Ok(Some(NamedBase {
                name: model.to_string(),
                revision: args["model_revision"].as_str().map(String::from),
                use_hf: args["use_hf"].as_bool(),
                source: path,
            }));
        }
    }
    Ok(None)
}

/// The local folder of a base named in `base.source`: beside the adapter folder, else as the
/// hub module finds it (a folder from the current directory, else a hub id).
fn locate(base: &NamedBase, adapters: &Path, use_hf: bool) -> anyhow::Result<PathBuf> {
    let path = Path::new(&base.name);
    if path.is_relative() {
        let beside = adapters.join(path);
        if beside.join("config.json").is_file() {
            return Ok(beside);
        }
    }
    let hub = HubSettings::from_env(base.use_hf.unwrap_or(false) || use_hf);
    crate::hub::model_dir(&base.name, base.revision.as_deref(), &hub).with_context(|| {
        format!(
            "the base model `{}` named in {} was not found; pass --model with the base folder or hub id",
            base.name,
            base.source.display()
        )
    })
}

/// The base model folder to merge into.
fn base_model_dir(args: &ExportArgs) -> anyhow::Result<(PathBuf, String)> {
    let use_hf = args.use_hf.unwrap_or(false);
    if let Some(model) = &args.model {
        let hub = HubSettings::from_env(use_hf);
        let dir = crate::hub::model_dir(model, args.model_revision.as_deref(), &hub)?;
        return Ok((dir, "--model".to_string()));
    }
    let named = match base_from_args_json(&args.adapters)? {
        Some(named) => named,
        None => {
            let config_path = args.adapters.join("adapter_config.json");
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
            let Some(name) = config["base_model_name_or_path"].as_str() else {
                bail!(
                    "no base model: {} has no args.json beside it and {} no base_model_name_or_path; pass --model",
                    args.adapters.display(),
                    config_path.display()
                );
            };
            NamedBase {
                name: name.to_string(),
                revision: config["revision"].as_str().map(String::from),
                use_hf: None,
                source: config_path,
            }
        }
    };
    let dir = locate(&named, &args.adapters, use_hf)?;
    Ok((dir, named.source.display().to_string()))
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    if args.merge_lora != Some(true) {
        eprintln!(
            "error: whet export merges a LoRA adapter into its base model and exports nothing else yet; pass --merge_lora true"
        );
        return Ok(ExitCode::from(2));
    }
    let adapters = &args.adapters;
    if !adapters.join("adapter_config.json").is_file() {
        bail!(
            "--adapters {} is not a PEFT adapter folder (no adapter_config.json); pass a LoRA checkpoint folder such as output/v0-…/checkpoint-100",
            adapters.display()
        );
    }
    let output_dir = match &args.output_dir {
        Some(dir) => dir.clone(),
        None => {
            let mut name = adapters
                .file_name()
                .context("--adapters has no folder name; pass --output_dir")?
                .to_os_string();
            name.push("-merged");
            adapters.with_file_name(name)
        }
    };
    if output_dir.exists() {
        let empty = output_dir.is_dir()
            && std::fs::read_dir(&output_dir)
                .with_context(|| format!("cannot read --output_dir {}", output_dir.display()))?
                .next()
                .is_none();
        if !empty {
            bail!(
                "--output_dir {} already exists and is not empty; name a new folder (or remove that one)",
                output_dir.display()
            );
        }
    }

    let (base_dir, found_by) = base_model_dir(&args)?;
    if !crate::model::WeightSource::has_weights(&base_dir) {
        bail!(
            "the base model {} has no weights (a folder with only config.json, such as the demo's, is initialised at random when training starts); merging needs the base's safetensors: pass --model with the folder or hub id the adapter was trained on",
            base_dir.display()
        );
    }
    eprintln!(
        "Merging {} into the base model {} (from {found_by})",
        adapters.display(),
        base_dir.display()
    );
    let merged = adapter::merge_adapter(&base_dir, adapters)
        .with_context(|| format!("merging {} into {}", adapters.display(), base_dir.display()))?;

    let name = output_dir
        .file_name()
        .context("--output_dir has no folder name")?
        .to_string_lossy()
        .into_owned();
    let parent = match output_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = (|| -> anyhow::Result<()> {
        merged.write(&tmp, MAX_SHARD_BYTES)?;
        write_model_config(&base_dir, &tmp, merged.dtype())?;
        copy_tokenizer_files(&base_dir, &tmp)?;
        // The run's settings (the template among them) travel with the model, as in ms-swift.
        let args_json = adapters.join("args.json");
        if args_json.is_file() {
            std::fs::copy(&args_json, tmp.join("args.json"))?;
        }
        if output_dir.exists() {
            std::fs::remove_dir(&output_dir)?;
        }
        std::fs::rename(&tmp, &output_dir)?;
        Ok(())
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(error.context(format!("writing {}", output_dir.display())));
    }
    eprintln!(
        "Wrote {} ({}): {} LoRA linear layers merged, {} tensors taken from the adapter",
        output_dir.display(),
        crate::dtype::torch_name(merged.dtype()),
        merged.num_adapted(),
        merged.num_replaced(),
    );
    Ok(ExitCode::SUCCESS)
}
