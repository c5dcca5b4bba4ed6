use std::path::{Path, PathBuf};

use super::test_server::{fixture_model_files, fixtures, TestRepo, TestServer};
use super::*;
use crate::model::{Model, ModelOptions};
use crate::train::data::ChatTokenizer;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whet-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny fixture model as a hub repository holds it, with files whet must not fetch.
fn model_files() -> Vec<(String, Vec<u8>)> {
    let mut files = fixture_model_files();
    files.push(("pytorch_model.bin".into(), b"torch weights".to_vec()));
    files.push(("README.md".into(), b"# a model card".to_vec()));
    files
}

/// The same model with its weights in two shards and an index.
fn sharded_model_files() -> Vec<(String, Vec<u8>)> {
    let mut files = model_files();
    let position = files
        .iter()
        .position(|(n, _)| n == "model.safetensors")
        .unwrap();
    let (_, bytes) = files.remove(position);
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), tensors.tensor(n).unwrap()))
            .collect();
        for name in part.iter() {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        files.push((file, safetensors::serialize(views, None).unwrap()));
    }
    let index =
        serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    files.push((files::WEIGHTS_INDEX.into(), index.to_string().into_bytes()));
    files
}

fn hf_settings(server: &TestServer, cache: &Path) -> HubSettings {
    HubSettings {
        use_hf: true,
        hf: HubAccess {
            endpoint: Some(server.url()),
            token: Some("hf_secret".into()),
            cache_dir: Some(cache.to_path_buf()),
        },
        ..HubSettings::default()
    }
}

fn modelscope_settings(server: &TestServer, cache: &Path) -> HubSettings {
    HubSettings {
        use_hf: false,
        modelscope: HubAccess {
            endpoint: Some(server.url()),
            token: Some("ms_secret".into()),
            cache_dir: Some(cache.to_path_buf()),
        },
        ..HubSettings::default()
    }
}

fn offline(settings: &HubSettings) -> HubSettings {
    HubSettings {
        offline: true,
        ..settings.clone()
    }
}

/// What a training start needs from the folder: the model loads and the tokenizer reads.
fn assert_loads(dir: &Path) -> Model {
    ChatTokenizer::from_model_dir(dir).unwrap();
    Model::from_pretrained(dir, ModelOptions::default()).unwrap()
}

fn parameter_sum(model: &Model) -> f64 {
    model
        .trainable_parameters()
        .iter()
        .map(|(_, v)| v.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
        .sum()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_hugging_face_model_downloads_with_the_token_then_loads_offline() {
    let server = TestServer::hugging_face(vec![TestRepo::new("someone/tiny-qwen3", model_files())]);
    let cache = temp_dir("hf-model");
    let settings = hf_settings(&server, &cache);
    let dir = model_dir("someone/tiny-qwen3", None, &settings).unwrap();
    assert!(
        dir.starts_with(cache.join("models--someone--tiny-qwen3/snapshots")),
        "{dir:?}"
    );
    assert_eq!(
        listing(&dir),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let local = assert_loads(&fixtures());
    assert_eq!(parameter_sum(&assert_loads(&dir)), parameter_sum(&local));
    let requests = server.requests();
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer hf_secret")));
    assert!(requests
        .iter()
        .any(|r| r.path == "/api/models/someone/tiny-qwen3/revision/main"));

    // The server gone: offline reads the cache; online falls back to it with a note.
    drop(server);
    assert_eq!(
        model_dir("someone/tiny-qwen3", None, &offline(&settings)).unwrap(),
        dir
    );
    assert_eq!(
        model_dir("someone/tiny-qwen3", None, &settings).unwrap(),
        dir
    );
    let error = model_dir("someone/other", None, &offline(&settings))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("someone/other")
            && error.contains("HF_HUB_OFFLINE")
            && error.contains("not in the Hugging Face cache"),
        "{error}"
    );
}

/// A preview needs the tokenizer only: the weights stay on the hub until a run loads the model,
/// on both hubs; the tokenizer-only copy then completes without fetching its files again.
#[test]
fn a_model_without_its_weights_fetches_only_the_config_and_tokenizer_files() {
    for (name, server) in [
        (
            "hf",
            TestServer::hugging_face(vec![TestRepo::new("someone/tiny-qwen3", model_files())]),
        ),
        (
            "ms",
            TestServer::modelscope(vec![TestRepo::new("someone/tiny-qwen3", model_files())]),
        ),
    ] {
        let cache = temp_dir(&format!("{name}-text-only"));
        let settings = match name {
            "hf" => hf_settings(&server, &cache),
            _ => modelscope_settings(&server, &cache),
        };
        let dir = model_dir_with(
            "someone/tiny-qwen3",
            None,
            &settings,
            ModelFiles::WithoutWeights,
        )
        .unwrap();
        assert_eq!(
            listing(&dir),
            [
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ],
            "{name}"
        );
        let fetched = |server: &TestServer, file: &str| {
            server
                .requests()
                .iter()
                .filter(|r| r.path.contains(file))
                .count()
        };
        assert_eq!(fetched(&server, "model.safetensors"), 0, "{name}");
        // Offline, the text-only copy is complete for a preview but not for training.
        assert_eq!(
            model_dir_with(
                "someone/tiny-qwen3",
                None,
                &offline(&settings),
                ModelFiles::WithoutWeights
            )
            .unwrap(),
            dir
        );
        assert!(model_dir("someone/tiny-qwen3", None, &offline(&settings)).is_err());
        let full = model_dir("someone/tiny-qwen3", None, &settings).unwrap();
        assert!(
            listing(&full).contains(&"model.safetensors".to_string()),
            "{name}"
        );
        assert_loads(&full);
    }
}

#[test]
fn a_sharded_model_at_a_revision_downloads_every_shard() {
    let server = TestServer::hugging_face(vec![TestRepo::new(
        "someone/tiny-sharded",
        sharded_model_files(),
    )]);
    let cache = temp_dir("hf-sharded");
    let settings = HubSettings {
        hf: HubAccess {
            token: None,
            ..hf_settings(&server, &cache).hf
        },
        ..hf_settings(&server, &cache)
    };
    let dir = model_dir("someone/tiny-sharded", Some("v1.0"), &settings).unwrap();
    assert_eq!(
        listing(&dir),
        [
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(
        parameter_sum(&assert_loads(&dir)),
        parameter_sum(&assert_loads(&fixtures()))
    );
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.header("authorization").is_none()));
    assert!(requests
        .iter()
        .any(|r| r.path == "/api/models/someone/tiny-sharded/revision/v1.0"));
    assert!(requests
        .iter()
        .any(|r| r.path == "/someone/tiny-sharded/resolve/v1.0/model-00002-of-00002.safetensors"));
    drop(server);
    // Offline, the revision's ref finds the snapshot; another revision was never fetched.
    assert_eq!(
        model_dir("someone/tiny-sharded", Some("v1.0"), &offline(&settings)).unwrap(),
        dir
    );
    let error = model_dir("someone/tiny-sharded", None, &offline(&settings)).unwrap_err();
    assert!(matches!(error, HubError::NotCached { .. }), "{error}");
}

#[test]
fn an_unreachable_hub_names_its_variables() {
    // A port that was free a moment ago: nothing listens there.
    let url = TestServer::start(|_| test_server::Response::not_found()).url();
    let cache = temp_dir("unreachable");
    let settings = HubSettings {
        use_hf: true,
        hf: HubAccess {
            endpoint: Some(url.clone()),
            cache_dir: Some(cache.clone()),
            ..HubAccess::default()
        },
        modelscope: HubAccess {
            endpoint: Some(url.clone()),
            cache_dir: Some(cache.clone()),
            ..HubAccess::default()
        },
        ..HubSettings::default()
    };
    let error = model_dir("Qwen/Qwen3-0.6B", None, &settings)
        .unwrap_err()
        .to_string();
    for part in [
        &url,
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "Qwen/Qwen3-0.6B",
        "local folder",
    ] {
        assert!(error.contains(part), "{part} missing in: {error}");
    }
    let modelscope = HubSettings {
        use_hf: false,
        ..settings
    };
    let error = model_dir("Qwen/Qwen3-0.6B", None, &modelscope)
        .unwrap_err()
        .to_string();
    for part in [&url, "ModelScope", "MODELSCOPE_DOMAIN", "HF_HUB_OFFLINE"] {
        assert!(error.contains(part), "{part} missing in: {error}");
    }
}

#[test]
fn a_missing_repository_and_one_without_safetensors_are_clear_errors() {
    let mut bin_only = model_files();
    bin_only.retain(|(n, _)| n != "model.safetensors");
    let server = TestServer::hugging_face(vec![TestRepo::new("someone/bin-only", bin_only)]);
    let settings = hf_settings(&server, &temp_dir("errors"));
    let error = model_dir("someone/absent", None, &settings).unwrap_err();
    assert!(
        matches!(&error, HubError::Refused { status: 404, .. })
            && error.to_string().contains("--model_revision"),
        "{error}"
    );
    let error = model_dir("someone/bin-only", None, &settings)
        .unwrap_err()
        .to_string();
    assert!(error.contains("safetensors"), "{error}");
}

#[test]
fn local_folders_are_used_as_they_are_and_paths_are_never_hub_ids() {
    let settings = HubSettings {
        offline: true,
        ..HubSettings::default()
    };
    let fixtures = fixtures();
    assert_eq!(
        model_dir(fixtures.to_str().unwrap(), None, &settings).unwrap(),
        fixtures
    );
    let error = model_dir("./no/such/model", None, &settings).unwrap_err();
    assert!(matches!(error, HubError::NoSuchFolder(_)), "{error}");
    let empty = temp_dir("empty-folder");
    let error = model_dir(empty.to_str().unwrap(), None, &settings).unwrap_err();
    assert!(matches!(error, HubError::NotAModelFolder(_)), "{error}");
    for bad in ["owner/../etc", "a/b c"] {
        let error = model_dir(bad, None, &settings).unwrap_err();
        assert!(
            matches!(error, HubError::BadId(_) | HubError::NoSuchFolder(_)),
            "{bad}: {error}"
        );
    }
    let error = model_dir("owner/name", Some("../x"), &settings).unwrap_err();
    assert!(matches!(error, HubError::BadRevision(_)), "{error}");
}

#[test]
fn a_modelscope_model_downloads_into_its_cache_then_loads_offline() {
    // A name with `.`, which the SDK stores as `___`.
    let server = TestServer::modelscope(vec![TestRepo::new(
        "someone/Tiny-0.6B",
        sharded_model_files(),
    )]);
    let cache = temp_dir("ms-model");
    let settings = modelscope_settings(&server, &cache);
    let dir = model_dir("someone/Tiny-0.6B", Some("v2"), &settings).unwrap();
    assert_eq!(dir, cache.join("models/someone/Tiny-0___6B"));
    assert!(cache.join("models/someone/Tiny-0.6B/config.json").is_file());
    assert!(!dir.join("pytorch_model.bin").exists() && !dir.join("README.md").exists());
    assert_eq!(
        parameter_sum(&assert_loads(&dir)),
        parameter_sum(&assert_loads(&fixtures()))
    );
    let requests = server.requests();
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer ms_secret")));
    let listing = requests
        .iter()
        .find(|r| r.path == "/api/v1/models/someone/Tiny-0.6B/repo/files")
        .expect("the file listing");
    assert_eq!(listing.query("Revision"), Some("v2"));
    assert!(requests
        .iter()
        .any(|r| r.path == "/api/v1/models/someone/Tiny-0.6B/repo"
            && r.query("FilePath") == Some("model-00001-of-00002.safetensors")
            && r.query("Revision") == Some("v2")));
    // No temporary files are left behind.
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".part")));
    drop(server);
    assert_eq!(
        model_dir("someone/Tiny-0.6B", None, &offline(&settings)).unwrap(),
        cache.join("models/someone/Tiny-0.6B")
    );
}

#[test]
fn a_cut_short_modelscope_download_leaves_nothing_that_looks_cached() {
    // The listing promises more bytes than the download gives.
    let repos = vec![TestRepo::new("someone/tiny", model_files())];
    let server = TestServer::start(move |request| {
        if request.path.ends_with("/repo") && request.query("FilePath") == Some("model.safetensors")
        {
            return test_server::Response::ok(b"truncated".to_vec());
        }
        test_server::modelscope_answer(&repos, request)
    });
    let cache = temp_dir("ms-cut");
    let settings = modelscope_settings(&server, &cache);
    let error = model_dir("someone/tiny", None, &settings)
        .unwrap_err()
        .to_string();
    assert!(error.contains("cut short"), "{error}");
    let dir = cache.join("models/someone/tiny");
    assert!(!dir.join("model.safetensors").exists());
    assert!(
        listing(&dir).iter().all(|n| !n.ends_with(".part")),
        "{:?}",
        listing(&dir)
    );
    let error = model_dir("someone/tiny", None, &offline(&settings))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("model.safetensors") && error.contains("HF_HUB_OFFLINE"),
        "{error}"
    );
}

#[test]
fn the_download_bar_draws_without_a_terminal() {
    use hf_hub::api::Progress;
    let mut bar = progress::DownloadProgress::new(true);
    bar.init(10, "model.safetensors");
    bar.update(4);
    bar.init(10, "model.safetensors");
    bar.update(10);
    bar.finish();
}

#[test]
fn settings_come_from_the_variables_ms_swift_reads() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let settings = HubSettings::from_vars(
        false,
        vars(&[
            ("HOME", "/home/u"),
            ("USE_HF", "1"),
            ("HF_HUB_OFFLINE", "true"),
            ("HF_ENDPOINT", "https://hf-mirror.com"),
            ("MODELSCOPE_DOMAIN", "modelscope.example"),
            ("MODELSCOPE_CACHE", "~/ms"),
        ]),
    );
    assert!(settings.use_hf && settings.offline);
    assert_eq!(
        settings.hf.endpoint.as_deref(),
        Some("https://hf-mirror.com")
    );
    assert_eq!(
        settings.hf.cache_dir,
        Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
    );
    assert_eq!(
        settings.modelscope.endpoint.as_deref(),
        Some("https://modelscope.example")
    );
    assert_eq!(
        settings.modelscope.cache_dir,
        Some(PathBuf::from("/home/u/ms"))
    );
    let plain = HubSettings::from_vars(false, vars(&[("HF_HOME", "/hf"), ("HF_HUB_OFFLINE", "0")]));
    assert!(!plain.use_hf && !plain.offline);
    assert_eq!(plain.hub_for(None), Hub::Ms);
    assert_eq!(plain.hub_for(Some(Hub::Hf)), Hub::Hf);
    assert_eq!(plain.hf.cache_dir, Some(PathBuf::from("/hf/hub")));
    assert_eq!(plain.modelscope.cache_dir, None);
    let error = model_dir("owner/name", None, &plain).unwrap_err();
    assert!(error.to_string().contains("MODELSCOPE_CACHE"), "{error}");
}
