//! Inference: the KV cache gives the logits of a full forward pass, greedy generation follows
//! the argmax chain, and `whet infer` answers queries and validation files.

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use whet_engine::generate::{generate, SamplingOptions};
use whet_engine::model::qwen3::KvCache;
use whet_engine::model::{Model, ModelOptions};

fn fixture(sub: &str) -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/hf-reference"
    ))
    .join(sub);
    assert!(
        dir.join("config.json").exists(),
        "HF reference fixtures not found at {}; expected ../shared beside the repository",
        dir.display()
    );
    dir
}

fn prompt_ids() -> Vec<u32> {
    let batch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("").join("batch.json")).unwrap())
            .unwrap();
    serde_json::from_value::<Vec<u32>>(batch["input_ids"][1].clone()).unwrap()
}

#[test]
fn cached_decoding_matches_the_full_forward_pass() {
    for sub in ["", "moe"] {
        let model = Model::from_pretrained(fixture(sub), ModelOptions::default()).unwrap();
        let ids = prompt_ids();
        let n = ids.len();
        let input = Tensor::from_vec(ids.clone(), (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let full = model
            .forward(&input, &mask)
            .unwrap()
            .logits
            .squeeze(0)
            .unwrap();

        let mut cache = KvCache::new(model.layers().len());
        let split = 40;
        let head = Tensor::from_vec(ids[..split].to_vec(), (1, split), &Device::Cpu).unwrap();
        let mut pieces = vec![model
            .forward_cached(&head, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()];
        for &token in &ids[split..] {
            let one = Tensor::from_vec(vec![token], (1, 1), &Device::Cpu).unwrap();
            pieces.push(
                model
                    .forward_cached(&one, &mut cache)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), n);
        let cached = Tensor::cat(&pieces, 0).unwrap();
        let diff = (cached - &full)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{sub}: cached logits differ by {diff}");
    }
}

#[test]
fn greedy_generation_follows_the_argmax_chain() {
    let model = Model::from_pretrained(fixture(""), ModelOptions::default()).unwrap();
    let prompt = prompt_ids()[..30].to_vec();
    let (generated, _) = generate(
        &model,
        &prompt,
        &[],
        &SamplingOptions {
            max_new_tokens: 6,
            ..Default::default()
        },
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(generated.len(), 6);
    // Recompute each token with a full forward over everything so far.
    let mut sequence = prompt.clone();
    for &token in &generated {
        let n = sequence.len();
        let input = Tensor::from_vec(sequence.clone(), (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let logits = model.forward(&input, &mask).unwrap().logits;
        let last = logits.narrow(1, n - 1, 1).unwrap().flatten_all().unwrap();
        assert_eq!(last.argmax(0).unwrap().to_scalar::<u32>().unwrap(), token);
        sequence.push(token);
    }
}

#[test]
fn whet_infer_answers_a_query_and_a_validation_file() {
    let whet = env!("CARGO_BIN_EXE_whet");
    let output = Command::new(whet)
        .args([
            "infer",
            "--query",
            "What is 2 + 3?",
            "--max_new_tokens",
            "8",
            "--template",
            "qwen3_thinking",
            "--model",
        ])
        .arg(fixture(""))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply = String::from_utf8_lossy(&output.stdout);
    assert!(reply.starts_with("<think>\n"), "{reply}");
    let streamed = Command::new(whet)
        .args([
            "infer",
            "--query",
            "What is 2 + 3?",
            "--max_new_tokens",
            "8",
            "--template",
            "qwen3_thinking",
            "--stream",
            "--model",
        ])
        .arg(fixture(""))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&streamed.stdout),
        reply,
        "streaming prints the same text"
    );

    let dir = std::env::temp_dir().join(format!("whet-infer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let val = dir.join("val.jsonl");
    std::fs::write(&val, "{\"query\": \"1+1\", \"response\": \"2\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n").unwrap();
    let result = dir.join("answers.jsonl");
    let output = Command::new(whet)
        .args(["infer", "--max_new_tokens", "4", "--val_dataset"])
        .arg(&val)
        .arg("--result_path")
        .arg(&result)
        .arg("--model")
        .arg(fixture(""))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&result)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["labels"], "2");
    assert!(lines[1]["response"].is_string());
    let usage = Command::new(whet)
        .args(["infer", "--model"])
        .arg(fixture(""))
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
