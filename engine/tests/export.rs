//! `whet export --merge_lora true`: the fixture's PEFT adapter merged into the fixture model
//! gives the unmerged model's (and PEFT's) logits; rsLoRA scaling, a replaced `modules_to_save`
//! tensor, the base's dtype and sharding; the refusals; and, with the reference Python, the
//! merged folder loading in transformers as PEFT's own `merge_and_unload` computes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use whet_engine::model::{adapter, Model, ModelOptions, Trainable};
use whet_engine::tensor_files;

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{fixtures, load_batch};

#[path = "../../tests/src/prerequisites.rs"]
mod prerequisites;

/// A fresh temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("whet-export-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn export(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_whet"));
    command.arg("export");
    for arg in args {
        command.arg(arg);
    }
    command.output().unwrap()
}

fn check_ok(output: &Output) {
    assert!(
        output.status.success(),
        "whet export failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn frozen() -> ModelOptions {
    ModelOptions {
        trainable: Trainable::Nothing,
        ..ModelOptions::default()
    }
}

fn logits(model: &Model) -> Tensor {
    let batch = load_batch();
    model
        .forward(&batch.input_ids, &batch.attention_mask)
        .unwrap()
        .logits
}

/// A copy of the fixture adapter in `dir`, its config changed by `config` and its tensors by
/// `tensors`.
fn adapter_copy(
    dir: &Path,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) {
    std::fs::create_dir_all(dir).unwrap();
    let source = fixtures().join("lora");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("adapter_config.json")).unwrap())
            .unwrap();
    json["base_model_name_or_path"] = fixtures().display().to_string().into();
    config(&mut json);
    std::fs::write(dir.join("adapter_config.json"), json.to_string()).unwrap();
    let mut weights =
        tensor_files::read_all(&source.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    tensors(&mut weights);
    tensor_files::write(
        &dir.join("adapter_model.safetensors"),
        weights.into_iter().collect(),
        tensor_files::pt_metadata(),
    )
    .unwrap();
}

/// The fixture adapter exported without `--model` (adapter_config.json's `..` is the fixture
/// model beside it) into an existing empty folder: a full model folder whose logits are the
/// unmerged model's and PEFT's.
#[test]
fn the_merged_model_computes_what_base_and_adapter_compute() {
    let tmp = TempDir::new("merge");
    let out = tmp.0.join("merged");
    std::fs::create_dir(&out).unwrap();
    let output = export(&[
        &"--adapters",
        &fixtures().join("lora"),
        &"--merge_lora",
        &"true",
        &"--output_dir",
        &out,
    ]);
    check_ok(&output);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("14 LoRA linear layers"), "{said}");
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["merged"], "no temporary folder is left behind");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float32");
    assert!(!out.join("adapter_config.json").exists());

    let merged = Model::from_pretrained(&out, frozen()).unwrap();
    assert_eq!(merged.trainable_parameters().len(), 0);
    let unmerged =
        adapter::from_pretrained_with_adapter(&fixtures(), &fixtures().join("lora"), frozen())
            .unwrap();
    let (got, want) = (logits(&merged), logits(&unmerged));
    let diff = max_diff(&got, &want);
    assert!(diff <= 1e-4, "merged vs unmerged logits differ by {diff:e}");

    let peft = tensor_files::read_all(
        &fixtures().join("expected/logits_sample0.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .remove("lora")
    .unwrap();
    let real = peft.dim(0).unwrap();
    let diff = max_diff(&got.get(0).unwrap().narrow(0, 0, real).unwrap(), &peft);
    assert!(diff <= 1e-4, "merged vs PEFT logits differ by {diff:e}");
}

/// rsLoRA's scaling, an adapter tensor that replaces the base's (PEFT's `modules_to_save`
/// lm_head), the base's torch_dtype for every tensor, and shards past the size limit.
#[test]
fn merging_scales_replaces_casts_and_shards() {
    let tmp = TempDir::new("shards");
    let adapter_dir = tmp.0.join("adapter");
    let head = Tensor::randn(0f32, 0.05, (512, 64), &Device::Cpu).unwrap();
    adapter_copy(
        &adapter_dir,
        |c| {
            c["use_rslora"] = true.into();
            c["modules_to_save"] = serde_json::json!(["lm_head"]);
        },
        |t| {
            t.insert("base_model.model.lm_head.weight".into(), head.clone());
        },
    );
    // The base as a bfloat16 model (its config says so; the file may hold f32).
    let base = tmp.0.join("base");
    std::fs::create_dir(&base).unwrap();
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixtures().join(file), base.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("config.json")).unwrap())
            .unwrap();
    config["dtype"] = "bfloat16".into();
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();

    let merged = adapter::merge_adapter(&base, &adapter_dir).unwrap();
    assert_eq!(merged.dtype(), DType::BF16);
    assert_eq!((merged.num_adapted(), merged.num_replaced()), (14, 1));
    let out = tmp.0.join("out");
    std::fs::create_dir(&out).unwrap();
    let files = merged.write(&out, 100_000).unwrap();
    assert!(files.len() > 2, "{files:?}");
    assert!(out.join("model.safetensors.index.json").is_file());

    let weights = whet_engine::tensor_files::MappedWeights::open_model_dir(&out).unwrap();
    let names: Vec<&String> = weights.names().iter().collect();
    assert_eq!(names.len(), 2 * 11 + 3, "every base tensor, once");
    for name in weights.names() {
        assert_eq!(
            weights.describe(name).unwrap().1,
            Some(DType::BF16),
            "{name}"
        );
    }
    let cpu = &Device::Cpu;
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    assert_eq!(
        values(&weights.load("lm_head.weight", cpu).unwrap()),
        values(&bf16(&head)),
        "modules_to_save replaces the base tensor"
    );
    let lora = tensor_files::read_all(&adapter_dir.join("adapter_model.safetensors"), cpu).unwrap();
    let prefix = "model.layers.1.self_attn.q_proj";
    let w = tensor_files::read_all(&fixtures().join("model.safetensors"), cpu)
        .unwrap()
        .remove(&format!("{prefix}.weight"))
        .unwrap();
    let delta = lora[&format!("base_model.model.{prefix}.lora_B.weight")]
        .matmul(&lora[&format!("base_model.model.{prefix}.lora_A.weight")])
        .unwrap();
    // rsLoRA: alpha / sqrt(r) = 32 / sqrt(8).
    let want = (w + (delta * (32.0 / 8f64.sqrt())).unwrap()).unwrap();
    assert_eq!(
        values(&weights.load(&format!("{prefix}.weight"), cpu).unwrap()),
        values(&bf16(&want))
    );
    let norm = "model.layers.0.input_layernorm.weight";
    assert_eq!(
        values(&weights.load(norm, cpu).unwrap()),
        values(&bf16(
            &tensor_files::read_all(&fixtures().join("model.safetensors"), cpu).unwrap()[norm]
        )),
        "tensors without an adapter are the base's"
    );
}

/// A QLoRA run's checkpoint (its args.json says bnb 4-bit) merges into the unquantized base that
/// args.json names: nothing on the way quantizes, so the logits are PEFT's. A base that is itself
/// quantized is refused.
#[test]
fn a_qlora_adapter_merges_into_the_unquantized_base() {
    let tmp = TempDir::new("qlora");
    let checkpoint = tmp.0.join("v0-20260101-000000/checkpoint-10");
    adapter_copy(
        &checkpoint,
        |c| c["base_model_name_or_path"] = "/somewhere/else".into(),
        |_| {},
    );
    let args = serde_json::json!({
        "model": fixtures().display().to_string(), "tuner_type": "lora", "quant_method": "bnb",
        "quant_bits": 4, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
    });
    // In the run folder only, as ms-swift leaves it when a checkpoint's copy is missing.
    std::fs::write(tmp.0.join("v0-20260101-000000/args.json"), args.to_string()).unwrap();
    let out = tmp.0.join("merged");
    let output = export(&[
        &"--adapters",
        &checkpoint,
        &"--merge_lora",
        &"--output_dir",
        &out,
    ]);
    check_ok(&output);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("v0-20260101-000000/args.json"), "{said}");
    let merged = Model::from_pretrained(&out, frozen()).unwrap();
    let peft = tensor_files::read_all(
        &fixtures().join("expected/logits_sample0.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .remove("lora")
    .unwrap();
    let got = logits(&merged)
        .get(0)
        .unwrap()
        .narrow(0, 0, peft.dim(0).unwrap())
        .unwrap();
    let diff = max_diff(&got, &peft);
    assert!(diff <= 1e-4, "merged vs PEFT logits differ by {diff:e}");

    let quantized = tmp.0.join("quantized");
    std::fs::create_dir(&quantized).unwrap();
    std::fs::copy(
        fixtures().join("model.safetensors"),
        quantized.join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("config.json")).unwrap())
            .unwrap();
    config["quantization_config"] =
        serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true});
    std::fs::write(quantized.join("config.json"), config.to_string()).unwrap();
    refused(
        &export(&[
            &"--adapters",
            &checkpoint,
            &"--model",
            &quantized,
            &"--merge_lora",
            &"true",
            &"--output_dir",
            &tmp.0.join("refused"),
        ]),
        1,
        "unquantized base",
    );
}

fn refused(output: &Output, code: i32, needle: &str) {
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{said}");
    assert!(said.contains(needle), "`{needle}` not in: {said}");
    assert!(!said.contains("panicked"), "{said}");
}

/// What export refuses, with its exit code and a message naming the fix; nothing is written.
#[test]
fn export_refuses_bad_requests_with_clear_messages() {
    let tmp = TempDir::new("refusals");
    let lora = fixtures().join("lora");
    let out = tmp.0.join("out");

    // Merging is what export does: no --merge_lora, or false, is a usage error.
    refused(
        &export(&[&"--adapters", &lora, &"--output_dir", &out]),
        2,
        "--merge_lora true",
    );
    refused(
        &export(&[
            &"--adapters",
            &lora,
            &"--merge_lora",
            &"false",
            &"--output_dir",
            &out,
        ]),
        2,
        "--merge_lora true",
    );
    let with = |adapters: &Path, out: &Path| {
        export(&[
            &"--adapters",
            &adapters,
            &"--merge_lora",
            &"true",
            &"--output_dir",
            &out,
        ])
    };
    // An existing non-empty output folder.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    refused(&with(&lora, &out), 1, "--output_dir");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );

    let fresh = tmp.0.join("fresh");
    // A folder that is no adapter, and one that does not exist.
    refused(&with(&fixtures(), &fresh), 1, "not a PEFT adapter folder");
    refused(
        &with(&tmp.0.join("nowhere"), &fresh),
        1,
        "not a PEFT adapter folder",
    );
    // r in the config does not fit the tensors.
    let wrong_rank = tmp.0.join("wrong-rank");
    adapter_copy(&wrong_rank, |c| c["r"] = 4.into(), |_| {});
    refused(&with(&wrong_rank, &fresh), 1, "shape mismatch");
    // Tensors whet cannot merge: a DoRA magnitude and a name the base does not have.
    let unknown = tmp.0.join("unknown");
    adapter_copy(
        &unknown,
        |_| {},
        |t| {
            let zeros = Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap();
            t.insert(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                zeros.clone(),
            );
            t.insert("base_model.model.model.extra.weight".into(), zeros);
        },
    );
    refused(&with(&unknown, &fresh), 1, "model.extra.weight");
    refused(&with(&unknown, &fresh), 1, "lora_magnitude_vector");
    // A base named by the adapter that is not there.
    let lost = tmp.0.join("lost");
    adapter_copy(
        &lost,
        |c| c["base_model_name_or_path"] = "/no/such/base".into(),
        |_| {},
    );
    refused(&with(&lost, &fresh), 1, "pass --model");
    assert!(!fresh.exists(), "a refused export writes nothing");
    let names: Vec<String> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

/// transformers loads the merged folder with every weight from its files, and its logits are
/// those of PEFT's `merge_and_unload` on the same base and adapter — for the fixture adapter and
/// for one PEFT makes here with rsLoRA and `modules_to_save=["lm_head"]`.
#[test]
fn transformers_loads_the_merged_model_as_peft_merges_it() {
    let python = match prerequisites::reference_python_with("peft") {
        Ok(python) => python,
        Err(why) => {
            return prerequisites::skip(
                "transformers_loads_the_merged_model_as_peft_merges_it",
                &why,
            )
        }
    };
    let tmp = TempDir::new("peft");
    let made = tmp.0.join("peft-adapter");
    let make = Command::new(&python)
        .arg("-c")
        .arg(MAKE_ADAPTER)
        .arg(fixtures())
        .arg(&made)
        .output()
        .unwrap();
    assert!(
        make.status.success(),
        "{}",
        String::from_utf8_lossy(&make.stderr)
    );
    for (adapter, out) in [
        (fixtures().join("lora"), tmp.0.join("fixture-merged")),
        (made.clone(), tmp.0.join("peft-merged")),
    ] {
        check_ok(&export(&[
            &"--adapters",
            &adapter,
            &"--merge_lora",
            &"true",
            &"--output_dir",
            &out,
        ]));
        let compare = Command::new(&python)
            .arg("-c")
            .arg(COMPARE)
            .arg(fixtures())
            .arg(&adapter)
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            compare.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&compare.stdout),
            String::from_utf8_lossy(&compare.stderr)
        );
    }
    // The shared checker: canonical key names, PEFT's reference logits.
    let checker = fixtures().join("../../tools/check_checkpoint.py");
    let expected = fixtures().join("expected/logits_sample0.safetensors");
    let check = Command::new(&python)
        .arg(&checker)
        .arg(tmp.0.join("fixture-merged"))
        .arg("--expect-logits")
        .arg(format!("{}:lora", expected.display()))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Makes a PEFT adapter on the fixture model (argv: base, output folder) with rsLoRA, a few
/// targets and lm_head in modules_to_save, every trained tensor moved off its initial value.
const MAKE_ADAPTER: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
base, out = sys.argv[1], sys.argv[2]
torch.manual_seed(7)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                    target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"])
model = get_peft_model(model, config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.05)
model.save_pretrained(out)
"#;

/// Loads the merged folder (argv: base, adapter, merged) with transformers, insisting on a clean
/// load, and compares its weights and batch logits with PEFT's merge_and_unload.
const COMPARE: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, merged_dir = sys.argv[1:4]
merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32,
                                                    attn_implementation="eager", output_loading_info=True)
problems = {k: v for k, v in info.items() if v}
assert not problems, f"loading {merged_dir}: {problems}"
reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
reference = PeftModel.from_pretrained(reference, adapter).merge_and_unload()
ours, theirs = merged.state_dict(), reference.state_dict()
assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
weights = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
batch = json.load(open(f"{base}/batch.json"))
ids = torch.tensor(batch["input_ids"])
mask = torch.tensor(batch["attention_mask"])
with torch.no_grad():
    a = merged(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    b = reference(input_ids=ids, attention_mask=mask).logits[mask.bool()]
logits = float((a - b).abs().max())
print(json.dumps({"weights_max_abs_diff": weights, "logits_max_abs_diff": logits}))
assert weights <= 1e-5, weights
assert logits <= 1e-4, logits
"#;
