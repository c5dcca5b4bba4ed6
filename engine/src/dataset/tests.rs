use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;

use super::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whet-dataset-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options() -> LoadOptions {
    LoadOptions {
        dataset_shuffle: true,
        strict: false,
        model_name: vec!["小黄".into(), "Xiao Huang".into()],
        model_author: vec!["whet".into()],
        hub: HubSettings {
            offline: true,
            cache_dir: Some(std::env::temp_dir().join("whet-no-hub-cache")),
            ..HubSettings::default()
        },
    }
}

fn load_one(spec: &str, options: &LoadOptions) -> Result<LoadedDataset, DatasetError> {
    load(spec, "dataset", options, &mut data_rng(42))
}

#[test]
fn reads_jsonl_json_and_csv_and_drops_bad_rows() {
    let dir = temp_dir("files");
    std::fs::write(
        dir.join("a.jsonl"),
        "{\"query\": \"1+1\", \"response\": \"2\"}\nnot json\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n{\"foo\": 1}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.json"),
        r#"[{"instruction": "add", "input": "2 3", "output": "5"}]"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("c.csv"),
        "question,answer\n\"what, exactly?\",this\nx,y\n",
    )
    .unwrap();

    let a = load_one(dir.join("a.jsonl").to_str().unwrap(), &options()).unwrap();
    assert_eq!((a.rows.len(), a.dropped), (2, 2));
    let b = load_one(dir.join("b.json").to_str().unwrap(), &options()).unwrap();
    assert_eq!(b.rows[0].messages[0].content, "add\n2 3");
    let c = load_one(dir.join("c.csv").to_str().unwrap(), &options()).unwrap();
    assert_eq!(c.rows.len(), 2);
    assert_eq!(c.rows[0].messages[0].content, "what, exactly?");

    // --strict stops at the first bad row and says where it is.
    let strict = LoadOptions {
        strict: true,
        ..options()
    };
    let error = load_one(dir.join("a.jsonl").to_str().unwrap(), &strict)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("row 2") && error.contains("--strict"),
        "{error}"
    );

    // A folder reads all its data files; #N samples across them.
    let all = load_one(&format!("{}#4", dir.display()), &options()).unwrap();
    assert_eq!(all.rows.len(), 4);
    let missing = load_one("./no/such/file.jsonl", &options())
        .unwrap_err()
        .to_string();
    assert!(missing.contains("no such file"), "{missing}");
}

#[test]
fn sampling_is_seeded_and_repeats_small_datasets() {
    let dir = temp_dir("sample");
    let rows: String = (0..10)
        .map(|i| format!("{{\"query\": \"q{i}\", \"response\": \"r{i}\"}}\n"))
        .collect();
    let path = dir.join("d.jsonl");
    std::fs::write(&path, rows).unwrap();
    let spec = format!("{}#25", path.display());
    let a = load_one(&spec, &options()).unwrap();
    let b = load_one(&spec, &options()).unwrap();
    assert_eq!(a.rows.len(), 25);
    assert_eq!(a.rows, b.rows);
    let first = |d: &LoadedDataset| d.rows[0].messages[0].content.clone();
    let sequential = load_one(
        &format!("{}#3", path.display()),
        &LoadOptions {
            dataset_shuffle: false,
            ..options()
        },
    )
    .unwrap();
    assert_eq!(first(&sequential), "q0");
}

#[test]
fn self_cognition_is_built_in() {
    let rows = load_one("self-cognition#100", &options()).unwrap().rows;
    assert_eq!(rows.len(), 100);
    assert!(rows.iter().any(|r| r.messages[1].content.contains("小黄")));
    assert!(rows
        .iter()
        .any(|r| r.messages[1].content.contains("Xiao Huang")));
    assert!(rows
        .iter()
        .all(|r| !r.messages[1].content.contains("{{AUTHOR}}")));
    let qwen3 = load_one("swift/self-cognition:qwen3", &options())
        .unwrap()
        .rows;
    assert!(qwen3[0].messages[0].content.ends_with("/no_think"));
}

#[test]
fn a_local_clone_of_a_registered_dataset_keeps_its_rules() {
    let dir = temp_dir("clone").join("Chinese-DeepSeek-R1-Distill-data-110k");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("distill_r1_110k.jsonl"),
        "{\"input\": \"1+1=?\", \"content\": \"2\", \"reasoning_content\": \"one and one\", \"repo_name\": \"x\"}\n",
    )
    .unwrap();
    let rows = load_one(dir.to_str().unwrap(), &options()).unwrap().rows;
    assert_eq!(
        rows[0].messages[1].content,
        "<think>\none and one\n</think>\n\n2"
    );
}

/// A hub-shaped HTTP server on loopback: the repo info and `resolve` endpoints hf-hub calls.
fn serve_hub(files: Vec<(&'static str, String)>, requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut range_start = None;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some(range) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = range
                        .trim()
                        .split('-')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok());
                    if range.trim() == "0-0" {
                        range_start = Some(usize::MAX);
                    }
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_string();
            let sha = "0123456789abcdef0123456789abcdef01234567";
            let (status, headers, body): (&str, String, Vec<u8>) = if path
                .starts_with("/api/datasets/")
            {
                let siblings: Vec<String> = files
                    .iter()
                    .map(|(n, _)| format!("{{\"rfilename\": \"{n}\"}}"))
                    .collect();
                (
                    "200 OK",
                    String::new(),
                    format!(
                        "{{\"sha\": \"{sha}\", \"siblings\": [{}]}}",
                        siblings.join(",")
                    )
                    .into_bytes(),
                )
            } else if let Some((_, content)) = files
                .iter()
                .find(|(n, _)| path.ends_with(&format!("/resolve/main/{n}")))
            {
                let bytes = content.as_bytes();
                let common = format!("x-repo-commit: {sha}\r\netag: \"etag-{}\"\r\n", bytes.len());
                match range_start {
                    Some(usize::MAX) => (
                        "206 Partial Content",
                        format!("{common}content-range: bytes 0-0/{}\r\n", bytes.len()),
                        bytes[..1].to_vec(),
                    ),
                    Some(start) => (
                        "206 Partial Content",
                        format!(
                            "{common}content-range: bytes {start}-{}/{}\r\n",
                            bytes.len() - 1,
                            bytes.len()
                        ),
                        bytes[start..].to_vec(),
                    ),
                    None => ("200 OK", common, bytes.to_vec()),
                }
            } else {
                ("404 Not Found", String::new(), b"{}".to_vec())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
            let _ = stream.write_all(&body);
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        }
    });
    address
}

#[test]
fn hub_datasets_download_through_hf_endpoint_then_work_offline() {
    let rows = "{\"instruction\": \"hi\", \"input\": \"\", \"output\": \"hello\"}\n{\"instruction\": \"bye\", \"input\": \"\", \"output\": \"see you\"}\n";
    let endpoint = serve_hub(
        vec![
            ("data/train.jsonl", rows.to_string()),
            ("README.md", "# card".into()),
        ],
        3,
    );
    let cache = temp_dir("hub-cache");
    let online = LoadOptions {
        hub: HubSettings {
            endpoint: Some(endpoint),
            token: Some("hf_test".into()),
            offline: false,
            cache_dir: Some(cache.clone()),
        },
        ..options()
    };
    let loaded = load_one("hf::someone/tiny-sft", &online).unwrap();
    assert_eq!(loaded.rows.len(), 2);
    assert_eq!(loaded.rows[1].messages[1].content, "see you");
    // Offline, the same spec reads the cache (the server is gone after 3 requests).
    let offline = LoadOptions {
        hub: HubSettings {
            offline: true,
            cache_dir: Some(cache),
            ..HubSettings::default()
        },
        ..options()
    };
    assert_eq!(
        load_one("someone/tiny-sft", &offline).unwrap().rows,
        loaded.rows
    );
    let error = load_one("someone/not-cached", &offline)
        .unwrap_err()
        .to_string();
    assert!(error.contains("HF_HUB_OFFLINE"), "{error}");
}
