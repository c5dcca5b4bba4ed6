use std::path::PathBuf;

use super::*;
use crate::hub::test_server::{TestRepo, TestServer};
use crate::hub::HubAccess;

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
            hf: HubAccess {
                cache_dir: Some(std::env::temp_dir().join("whet-no-hub-cache")),
                ..HubAccess::default()
            },
            modelscope: HubAccess {
                cache_dir: Some(std::env::temp_dir().join("whet-no-hub-cache")),
                ..HubAccess::default()
            },
            ..HubSettings::default()
        },
    }
}

/// Settings for one hub at `endpoint` with its cache in `cache`.
fn hub_settings(use_hf: bool, endpoint: String, cache: PathBuf) -> HubSettings {
    let access = HubAccess {
        endpoint: Some(endpoint),
        token: None,
        cache_dir: Some(cache),
    };
    HubSettings {
        use_hf,
        hf: access.clone(),
        modelscope: access,
        ..HubSettings::default()
    }
}

fn repo(id: &str, files: &[(&str, &[u8])]) -> TestRepo {
    TestRepo::new(
        id,
        files
            .iter()
            .map(|(name, bytes)| (name.to_string(), bytes.to_vec()))
            .collect(),
    )
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

#[test]
fn hub_datasets_download_through_hf_endpoint_then_work_offline() {
    let rows = "{\"instruction\": \"hi\", \"input\": \"\", \"output\": \"hello\"}\n{\"instruction\": \"bye\", \"input\": \"\", \"output\": \"see you\"}\n";
    let server = TestServer::hugging_face(vec![repo(
        "someone/tiny-sft",
        &[
            ("data/train.jsonl", rows.as_bytes()),
            ("README.md", b"# card"),
        ],
    )]);
    let cache = temp_dir("hub-cache");
    // `hf::` picks Hugging Face although use_hf is false.
    let online = LoadOptions {
        hub: hub_settings(false, server.url(), cache.clone()),
        ..options()
    };
    let loaded = load_one("hf::someone/tiny-sft", &online).unwrap();
    assert_eq!(loaded.rows.len(), 2);
    assert_eq!(loaded.rows[1].messages[1].content, "see you");
    assert!(server
        .requests()
        .iter()
        .any(|r| r.path == "/datasets/someone/tiny-sft/resolve/main/data/train.jsonl"));
    drop(server);
    // Offline, the same id (with use_hf true) reads the cache.
    let offline = LoadOptions {
        hub: HubSettings {
            offline: true,
            ..hub_settings(true, String::new(), cache)
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

#[test]
fn modelscope_datasets_download_for_ms_prefix_and_bare_ids_then_work_offline() {
    let first = "{\"query\": \"1+1\", \"response\": \"2\"}\n";
    let second = "{\"query\": \"2+2\", \"response\": \"4\"}\n";
    let third = "[{\"query\": \"3+3\", \"response\": \"6\"}]";
    let server = TestServer::modelscope(vec![repo(
        "someone/ms-sft",
        &[
            ("README.md", b"# card"),
            ("a.jsonl", first.as_bytes()),
            ("sub/b.jsonl", second.as_bytes()),
            ("c.json", third.as_bytes()),
        ],
    )]);
    let cache = temp_dir("ms-dataset-cache");
    let online = LoadOptions {
        hub: hub_settings(true, server.url(), cache.clone()),
        ..options()
    };
    // `ms::` picks ModelScope although use_hf is true; the listing comes in pages.
    let loaded = load_one("ms::someone/ms-sft", &online).unwrap();
    assert_eq!(loaded.rows.len(), 3);
    let requests = server.requests();
    let pages: Vec<&str> = requests
        .iter()
        .filter(|r| r.path == "/api/v1/datasets/1000/repo/tree")
        .filter_map(|r| r.query("PageNumber"))
        .collect();
    assert_eq!(pages, ["1", "2", "3"]);
    assert!(requests
        .iter()
        .any(|r| r.path == "/api/v1/datasets/someone/ms-sft/repo"
            && r.query("FilePath") == Some("sub/b.jsonl")
            && r.query("Revision") == Some("master")));
    assert!(cache.join("datasets/someone/ms-sft/sub/b.jsonl").is_file());
    assert!(!cache.join("datasets/someone/ms-sft/README.md").exists());
    drop(server);
    // A bare id goes to ModelScope when use_hf is false, as in ms-swift; offline reads the cache.
    let offline = LoadOptions {
        hub: HubSettings {
            offline: true,
            ..hub_settings(false, String::new(), cache)
        },
        ..options()
    };
    assert_eq!(
        load_one("someone/ms-sft", &offline).unwrap().rows,
        loaded.rows
    );
}

/// Parquet files written here with the parquet crate's own writer, in the shape pyarrow gives
/// Hugging Face datasets: nullable columns, and lists as `LIST` groups of `list.element`.
mod parquet_files {
    use std::path::Path;
    use std::sync::Arc;

    use parquet::basic::{Compression, GzipLevel, ZstdLevel};
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    fn text(values: &[&str]) -> Vec<ByteArray> {
        values.iter().map(|v| ByteArray::from(*v)).collect()
    }

    /// Columns query, response (strings), system (a null in row 2) and id (int64).
    fn write_query_response(path: &Path, compression: Compression) {
        let schema = parse_message_type(
            "message schema {
                optional binary query (STRING);
                optional binary response (STRING);
                optional binary system (STRING);
                optional int64 id;
            }",
        )
        .unwrap();
        let properties = WriterProperties::builder()
            .set_compression(compression)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer =
            SerializedFileWriter::new(file, Arc::new(schema), Arc::new(properties)).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let columns: [(Vec<ByteArray>, Vec<i16>); 3] = [
            (text(&["1+1", "capital of France?"]), vec![1, 1]),
            (text(&["2", "Paris"]), vec![1, 1]),
            (text(&["be brief"]), vec![1, 0]),
        ];
        for (values, definitions) in &columns {
            let mut column = group.next_column().unwrap().unwrap();
            column
                .typed::<ByteArrayType>()
                .write_batch(values, Some(definitions), None)
                .unwrap();
            column.close().unwrap();
        }
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<Int64Type>()
            .write_batch(&[7, 8], Some(&[1, 1]), None)
            .unwrap();
        column.close().unwrap();
        assert!(group.next_column().unwrap().is_none());
        group.close().unwrap();
        writer.close().unwrap();
    }

    /// A `messages` list of role/content structs: a 2-turn and a 3-turn conversation.
    fn write_messages(path: &Path) {
        let schema = parse_message_type(
            "message schema {
                optional group messages (LIST) {
                    repeated group list {
                        optional group element {
                            optional binary role (STRING);
                            optional binary content (STRING);
                        }
                    }
                }
            }",
        )
        .unwrap();
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer =
            SerializedFileWriter::new(file, Arc::new(schema), Arc::new(properties)).unwrap();
        let mut group = writer.next_row_group().unwrap();
        // Every leaf is defined (level 4); repetition 0 starts a row, 1 continues its list.
        let definitions = [4; 5];
        let repetitions = [0, 1, 0, 1, 1];
        let roles = text(&["user", "assistant", "system", "user", "assistant"]);
        let contents = text(&["hi", "hello", "you are whet", "2*3?", "6"]);
        for values in [roles, contents] {
            let mut column = group.next_column().unwrap().unwrap();
            column
                .typed::<ByteArrayType>()
                .write_batch(&values, Some(&definitions), Some(&repetitions))
                .unwrap();
            column.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn reads_parquet_rows_as_json() {
        let dir = temp_dir("parquet-json");
        let path = dir.join("qr.parquet");
        write_query_response(&path, Compression::SNAPPY);
        let rows: Vec<Value> = read_rows(&path)
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            rows,
            vec![
                serde_json::json!({"query": "1+1", "response": "2", "system": "be brief", "id": 7}),
                serde_json::json!({"query": "capital of France?", "response": "Paris", "system": null, "id": 8}),
            ]
        );
        let messages = dir.join("m.parquet");
        write_messages(&messages);
        let rows = read_rows(&messages).unwrap();
        assert_eq!(
            rows[0].as_ref().unwrap(),
            &serde_json::json!({"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]})
        );
        // Not parquet: the whole file is an error, not zero rows.
        std::fs::write(dir.join("bad.parquet"), "not parquet").unwrap();
        assert!(read_rows(&dir.join("bad.parquet")).is_err());
    }

    #[test]
    fn loads_parquet_query_response_with_each_codec() {
        let dir = temp_dir("parquet-codecs");
        for (name, compression) in [
            ("none", Compression::UNCOMPRESSED),
            ("snappy", Compression::SNAPPY),
            ("zstd", Compression::ZSTD(ZstdLevel::default())),
            ("gzip", Compression::GZIP(GzipLevel::default())),
        ] {
            let path = dir.join(format!("{name}.parquet"));
            write_query_response(&path, compression);
            let loaded = load_one(path.to_str().unwrap(), &options()).unwrap();
            assert_eq!((loaded.rows.len(), loaded.dropped), (2, 0), "{name}");
            let first = &loaded.rows[0].messages;
            assert_eq!(
                first
                    .iter()
                    .map(|m| (m.role, m.content.as_str()))
                    .collect::<Vec<_>>(),
                [
                    (Role::System, "be brief"),
                    (Role::User, "1+1"),
                    (Role::Assistant, "2")
                ],
                "{name}"
            );
            // The null system column is no system message.
            let second = &loaded.rows[1].messages;
            assert_eq!(second.len(), 2, "{name}");
            assert_eq!(second[1].content, "Paris", "{name}");
        }
    }

    #[test]
    fn loads_a_messages_column_and_a_folder_of_parquet_files() {
        let dir = temp_dir("parquet-folder");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        write_messages(&dir.join("data/train-00000-of-00001.parquet"));
        write_query_response(
            &dir.join("data/test-00000-of-00001.parquet"),
            Compression::SNAPPY,
        );

        let file = dir.join("data/train-00000-of-00001.parquet");
        let loaded = load_one(file.to_str().unwrap(), &options()).unwrap();
        assert_eq!(loaded.rows.len(), 2);
        assert_eq!(
            loaded.rows[1].messages,
            vec![
                Message::new(Role::System, "you are whet"),
                Message::new(Role::User, "2*3?"),
                Message::new(Role::Assistant, "6"),
            ]
        );

        // A folder laid out like a hub dataset: only the train split is read.
        let folder = load_one(dir.to_str().unwrap(), &options()).unwrap();
        assert_eq!(folder.rows, loaded.rows);
        // Without a train split every parquet file is read.
        std::fs::rename(
            dir.join("data/train-00000-of-00001.parquet"),
            dir.join("data/part-0.parquet"),
        )
        .unwrap();
        let all = load_one(dir.to_str().unwrap(), &options()).unwrap();
        assert_eq!(all.rows.len(), 4);
    }

    #[test]
    fn hub_datasets_in_parquet_download_and_load() {
        let dir = temp_dir("parquet-hub-source");
        let path = dir.join("train.parquet");
        write_messages(&path);
        let parquet = std::fs::read(&path).unwrap();
        let server = TestServer::hugging_face(vec![repo(
            "someone/parquet-sft",
            &[
                ("data/train-00000-of-00001.parquet", &parquet),
                ("README.md", b"# card"),
            ],
        )]);
        let online = LoadOptions {
            hub: hub_settings(true, server.url(), temp_dir("parquet-hub-cache")),
            ..options()
        };
        let loaded = load_one("someone/parquet-sft", &online).unwrap();
        assert_eq!(loaded.rows.len(), 2);
        assert_eq!(loaded.rows[0].messages[1].content, "hello");
    }
}
