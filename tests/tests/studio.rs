//! The studio in a real browser: the release build in app/dist, served by a tiny static server,
//! driven in headless Chromium. Needs `trunk build --release` output and chromium +
//! chromedriver (`.ci/install-studio-tools`); each test says how when they are missing.

use serde_json::{json, Value};
use whet_shared::config::TruncationStrategy;
use whet_shared::preview::{
    self, BadRow, DatasetPreview, DatasetSummary, FormatCount, LengthDistribution, PreviewRow,
    PreviewToken, RowOrigin, Truncation,
};
use whet_shared::{files, presets, share, JobConfig};
use whet_tests::browser::Browser;
use whet_tests::static_server::{FakeApi, StaticServer};
use whet_tests::whet_server::WhetServer;
use whet_tests::{app_dist, artifacts_dir};

/// A browser on the studio served from app/dist, in English.
async fn studio() -> (StaticServer, Browser) {
    let server = StaticServer::start(app_dist()).await;
    let browser = Browser::start().await;
    browser.goto(&format!("{}/", server.base_url)).await;
    browser.wait_text("button[data-preset=seed]").await;
    set_language(&browser, "en").await;
    (server, browser)
}

/// Switches the page's language: the switch names the language it switches to.
async fn set_language(browser: &Browser, lang: &str) {
    let switch_to = if lang == "en" { "English" } else { "中文" };
    if browser.wait_text("#lang").await == switch_to {
        browser.click("#lang").await;
    }
    let other = if lang == "en" { "中文" } else { "English" };
    browser.wait_text_eq("#lang", other).await;
}

/// The config the page shows, read back from its JSON export.
async fn page_config(browser: &Browser) -> JobConfig {
    let json = browser.wait_text("#config-json").await;
    files::parse_config_text(&json, files::Format::Json).expect("the page's JSON export parses")
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_preset_gives_effective_batch_80() {
    let (_server, browser) = studio().await;
    browser.click("button[data-preset=seed]").await;
    browser.wait_text_eq("#effective-batch", "80").await;
    assert_eq!(
        browser.wait_text("#effective-batch-formula").await,
        "2 × 5 × 8 = 80"
    );
    assert_eq!(browser.wait_text("#total-steps").await, "39");
    assert_eq!(browser.wait_text("#warmup-steps").await, "4");
    assert_eq!(
        browser.value_of("#field-model input").await.as_deref(),
        Some("Qwen/Qwen3-30B-A3B-Thinking-2507")
    );
    assert_eq!(
        browser.wait_text("#devices-value").await,
        "CUDA_VISIBLE_DEVICES=0,1,2,3,4"
    );
    // The learning-rate plot has its curve and the memory bar its five parts.
    let points = browser
        .js(
            "return document.querySelector('#lr-plot polyline.line').getAttribute('points');",
            vec![],
        )
        .await;
    assert!(
        points.as_str().unwrap_or("").split(' ').count() > 10,
        "{points}"
    );
    assert_eq!(browser.count("#memory-bar rect.mem").await, 5);
    assert_eq!(
        page_config(&browser).await,
        presets::find("seed").unwrap().config()
    );
    // No server: no Data tab.
    assert_eq!(browser.count("#nav-data").await, 0);
    browser.screenshot("studio-editor.png").await;
    set_language(&browser, "zh").await;
    browser.screenshot("studio-editor-zh.png").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nproc_device_mismatch_shows_in_both_languages_and_clears_when_fixed() {
    let (_server, browser) = studio().await;
    browser.click("button[data-preset=seed]").await;
    browser.wait_text_eq("#effective-batch", "80").await;
    let diag = "#field-nproc_per_node .diag[data-code=nproc_device_mismatch] .msg";
    assert_eq!(browser.count(diag).await, 0);

    browser.type_into("#field-nproc_per_node input", "4").await;
    let english = browser.wait_text(diag).await;
    assert_eq!(
        english,
        "nproc_per_node is 4 but CUDA_VISIBLE_DEVICES lists 5 GPUs; each process needs exactly one GPU"
    );
    assert!(browser
        .wait_text("#field-nproc_per_node .fix")
        .await
        .contains("set --nproc_per_node 5"));
    browser
        .wait_text_eq("#effective-batch-formula", "2 × 4 × 8 = 64")
        .await;
    browser.screenshot("studio-nproc-error-en.png").await;

    set_language(&browser, "zh").await;
    browser
        .wait_text_eq(
            diag,
            "nproc_per_node 为 4，但 CUDA_VISIBLE_DEVICES 列出了 5 张 GPU；每个进程必须对应一张 GPU",
        )
        .await;
    let help = browser.wait_text("#field-nproc_per_node .help").await;
    assert!(help.contains("进程数"), "the help switches too: {help}");
    browser.screenshot("studio-nproc-error-zh.png").await;

    browser.type_into("#field-nproc_per_node input", "5").await;
    browser
        .until("the mismatch to go", || async {
            (browser.count(diag).await == 0).then_some(())
        })
        .await;
    browser.wait_text_eq("#effective-batch", "80").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pasted_script_fills_the_form_and_bad_flags_are_explained() {
    let (_server, browser) = studio().await;
    let script = "NPROC_PER_NODE=2 CUDA_VISIBLE_DEVICES=0,1 \\\n\
        swift sft --model Qwen/Qwen3-8B --train_type lora \\\n\
        --dataset 'a#600' 'b#400' --per_device_train_batch_size 4 \\\n\
        --gradient_accumulation_steps 2 --lora_rank 16 --learning_rate 2e-4";
    browser.paste_into("#import-text", script).await;
    browser.click("#import-button").await;
    browser.wait_text("#import-ok").await;
    browser
        .wait_text_eq("#effective-batch-formula", "4 × 2 × 2 = 16")
        .await;
    assert_eq!(
        browser.value_of("#field-model input").await.as_deref(),
        Some("Qwen/Qwen3-8B")
    );
    assert_eq!(
        browser.value_of("#field-lora_rank input").await.as_deref(),
        Some("16")
    );
    assert_eq!(browser.count("[data-list=dataset] input").await, 2);
    assert_eq!(
        page_config(&browser).await,
        whet_shared::parse_shell(script).unwrap()
    );

    // The seed's own command fills the whole form.
    browser
        .paste_into("#import-text", presets::SEED_SCRIPT)
        .await;
    browser.click("#import-button").await;
    browser.wait_text_eq("#effective-batch", "80").await;
    assert_eq!(
        page_config(&browser).await,
        presets::find("seed").unwrap().config()
    );

    // A misspelt flag: the error names it and the closest flag, in both languages.
    browser
        .paste_into("#import-text", "swift sft --modle Qwen/Qwen3-8B")
        .await;
    browser.click("#import-button").await;
    let english = browser.wait_text("#import-errors .diag.error").await;
    assert!(
        english.contains("modle") && english.contains("--model"),
        "{english}"
    );
    set_language(&browser, "zh").await;
    let chinese = browser.wait_text("#import-errors .diag.error").await;
    assert_ne!(chinese, english);
    assert!(chinese.contains("modle"), "{chinese}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lora_and_qlora_presets_show_what_they_train_and_hold() {
    let (_server, browser) = studio().await;
    let memory = |text: String| -> f64 {
        text.trim_end_matches(" GiB")
            .parse()
            .unwrap_or_else(|_| panic!("memory total `{text}`"))
    };
    browser.click("button[data-preset=qwen3-8b-lora]").await;
    // LoRA r8 on every projection of Qwen3-8B: 21,823,488 of 8,190,735,360 parameters.
    browser
        .wait_text_eq("#trainable-params", "21.8M / 8.19B (0.27%)")
        .await;
    let lora = memory(browser.wait_text("#memory-total").await);
    browser.click("button[data-preset=qwen3-8b-qlora]").await;
    let qlora = browser
        .until("the QLoRA preset's memory", || async {
            browser
                .text_of("#memory-total")
                .await
                .map(memory)
                .filter(|m| *m != lora)
        })
        .await;
    browser
        .wait_text_eq("#trainable-params", "21.8M / 8.19B (0.27%)")
        .await;
    assert!(qlora < lora, "QLoRA {qlora} GiB, LoRA {lora} GiB");
    // The adapter fields are in the tuner section.
    for field in [
        "target_modules",
        "target_regex",
        "use_rslora",
        "lora_bias",
        "modules_to_save",
        "quant_bits",
    ] {
        assert_eq!(
            browser.count(&format!("#group-tuner #field-{field}")).await,
            1,
            "{field}"
        );
    }
    browser.type_into("#field-quant_bits input", "8").await;
    browser
        .wait_text("#field-quant_bits .diag.error[data-code=quant_bits_8_unsupported]")
        .await;
    browser.screenshot("studio-qlora.png").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn share_link_restores_the_same_config_in_a_new_page() {
    let (server, browser) = studio().await;
    browser.click("button[data-preset=qwen3-8b-qlora]").await;
    browser.wait_text_eq("#effective-batch", "16").await;
    browser.type_into("#field-lora_rank input", "32").await;
    browser
        .until("lora_rank 32 in the script", || async {
            browser
                .text_of("#script-swift")
                .await
                .filter(|s| s.contains("--lora_rank 32"))
        })
        .await;
    let before = page_config(&browser).await;
    browser.click("#copy-link").await;
    let link = browser
        .until("the share link", || async {
            browser
                .value_of("#share-link")
                .await
                .filter(|l| !l.is_empty())
        })
        .await;
    assert!(
        link.starts_with(&format!("{}/#cfg=v1.", server.base_url)),
        "{link}"
    );
    assert!(link.len() < 2000, "a link of {} characters", link.len());
    assert_eq!(share::decode(&link).unwrap(), before);

    // A new page (new window) opens the link and shows the same config.
    let window = browser
        .client
        .new_window(false)
        .await
        .expect("a new window");
    browser
        .client
        .switch_to_window(window.handle)
        .await
        .expect("switching windows");
    browser.goto(&link).await;
    browser
        .until("the shared config", || async {
            browser
                .text_of("#script-swift")
                .await
                .filter(|s| s.contains("--lora_rank 32"))
        })
        .await;
    assert_eq!(page_config(&browser).await, before);
    assert_eq!(
        browser.value_of("#field-lora_rank input").await.as_deref(),
        Some("32")
    );

    // A broken link says so instead of loading.
    browser
        .goto(&format!("{}/#cfg=v1.broken!", server.base_url))
        .await;
    browser.wait_text("#load-errors .diag").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn validation_of_a_changed_field_takes_under_a_millisecond() {
    let (_server, browser) = studio().await;
    browser.click("button[data-preset=seed]").await;
    browser.wait_text_eq("#effective-batch", "80").await;
    // Change per_device_train_batch_size 60 times; for each, the page's own timing of the
    // check (validate + derive, performance.now() around it) and the time from the input
    // event until the derived figure shows the new value.
    let result = browser
        .js(
            r#"
            const input = document.querySelector('#field-per_device_train_batch_size input');
            const formula = document.querySelector('#effective-batch-formula');
            const check = [], update = [];
            for (let i = 0; i < 60; i++) {
                const value = String(1 + (i % 4));
                const start = performance.now();
                input.value = value;
                input.dispatchEvent(new Event('input', {bubbles: true}));
                while (!formula.textContent.startsWith(value + ' ×')) {
                    await new Promise(r => setTimeout(r, 0));
                }
                update.push(performance.now() - start);
                check.push(parseFloat(document.querySelector('#check-ms').dataset.ms));
            }
            return {check, update};
            "#,
            vec![],
        )
        .await;
    let stats = |key: &str| {
        let mut values: Vec<f64> = result[key]
            .as_array()
            .expect("an array of timings")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        values.sort_by(f64::total_cmp);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        (
            mean,
            values[values.len() / 2],
            values[values.len() * 9 / 10],
        )
    };
    let (check_mean, check_median, check_p90) = stats("check");
    let (update_mean, update_median, update_p90) = stats("update");
    let report = json!({
        "check_ms": {"mean": check_mean, "median": check_median, "p90": check_p90},
        "input_to_dom_ms": {"mean": update_mean, "median": update_median, "p90": update_p90},
        "samples": 60,
    });
    println!("studio validation timing: {report}");
    std::fs::write(
        artifacts_dir().join("studio-validation-timing.json"),
        report.to_string(),
    )
    .unwrap();
    // The goal is under 1 ms; the bound here leaves room for a busy CI machine.
    assert!(
        check_median < 10.0,
        "validating one change took {check_median} ms (median)"
    );
    browser.close().await;
}

/// The studio's side of the server API against a stand-in server: short share links and
/// `/s/<id>`, submit with the bearer token, the jobs list, the live job view and cancel.
#[tokio::test(flavor = "multi_thread")]
async fn with_a_backend_short_links_submit_and_the_live_job_view_work() {
    let api = FakeApi::new("secret-token");
    let server = StaticServer::start_with_api(app_dist(), api.clone()).await;
    let browser = Browser::start().await;
    browser.goto(&format!("{}/", server.base_url)).await;
    set_language(&browser, "en").await;
    // /api/health answered: the short-link and submit controls appear.
    browser.wait_text("#short-link").await;
    browser.wait_text("#submit-job").await;

    browser.click("button[data-preset=seed]").await;
    browser.wait_text_eq("#effective-batch", "80").await;
    browser.paste_into("#token", "secret-token").await;
    browser.click("#short-link").await;
    let short = browser
        .until("the short link", || async {
            browser
                .value_of("#short-share-link")
                .await
                .filter(|l| !l.is_empty())
        })
        .await;
    assert_eq!(short, format!("{}/s/s1", server.base_url));
    let shared: JobConfig =
        serde_json::from_str(&api.received("POST", "/api/shares")[0].body).expect("JobConfig JSON");
    assert_eq!(shared, presets::find("seed").unwrap().config());

    // /s/<id> loads the shared config into the form.
    browser.goto(&format!("{}/", server.base_url)).await;
    browser.wait_text_eq("#effective-batch", "16").await;
    browser.goto(&short).await;
    browser.wait_text_eq("#effective-batch", "80").await;
    assert_eq!(page_config(&browser).await, shared);

    // Submit the demo: the page posts the JobConfig with the token and opens the job.
    browser.goto(&format!("{}/", server.base_url)).await;
    browser.click("button[data-preset=demo]").await;
    browser
        .until("the demo preset", || async {
            browser
                .value_of("#field-model input")
                .await
                .filter(|m| m == "examples/tiny-qwen3")
        })
        .await;
    browser.click("#submit-job").await;
    browser.wait_text("#job-status").await;
    let submitted = api.received("POST", "/api/jobs");
    assert_eq!(submitted.len(), 1);
    assert_eq!(
        submitted[0].authorization.as_deref(),
        Some("Bearer secret-token")
    );
    let job: JobConfig = serde_json::from_str(&submitted[0].body).expect("JobConfig JSON");
    assert_eq!(job, presets::find("demo").unwrap().config());

    // The event stream fills the log and the three charts.
    browser.wait_text_eq("#job-status", "running").await;
    for chart in ["#chart-loss", "#chart-lr", "#chart-acc"] {
        browser
            .until(&format!("10 points on {chart}"), || async {
                let points = browser
                    .js(
                        "return document.querySelector(arguments[0]).dataset.points;",
                        vec![json!(chart)],
                    )
                    .await;
                (points.as_str() == Some("10")).then_some(())
            })
            .await;
    }
    assert!(browser
        .wait_text("#job-log")
        .await
        .contains("step 10/10 loss"));
    assert_eq!(
        browser.count("#chart-loss circle.dot.extra").await,
        1,
        "the eval loss point"
    );
    browser.screenshot("studio-job.png").await;

    browser.click("#cancel-job").await;
    browser
        .until("the cancel request", || async {
            let cancels = api.received("POST", "/api/jobs/1/cancel");
            (cancels.len() == 1).then_some(())
        })
        .await;

    browser.goto(&format!("{}/#/jobs", server.base_url)).await;
    browser.wait_text_eq(".job-row a", "1").await;
    browser.close().await;
}

/// A real whet-server (`whet_tests::whet_server`) with its page open in `browser`, in English.
async fn open_whet_server(browser: &Browser) -> WhetServer {
    let server = WhetServer::start("studio-test-token").await;
    browser.goto(&format!("{}/", server.base_url)).await;
    set_language(browser, "en").await;
    server
}

/// Submits the demo to a running whet-server and watches the loss chart fill.
#[tokio::test(flavor = "multi_thread")]
async fn demo_job_streams_loss_points_from_whet_server() {
    let browser = Browser::start().await;
    let server = open_whet_server(&browser).await;
    browser.wait_text("#submit-job").await;
    browser.click("button[data-preset=demo]").await;
    browser.paste_into("#token", &server.token).await;
    browser.click("#submit-job").await;
    browser.wait_text("#job-status").await;
    let points = browser
        .until("loss points on the chart", || async {
            let n: usize = browser
                .js(
                    "const c = document.querySelector('#chart-loss'); return c ? c.dataset.points : '0';",
                    vec![],
                )
                .await
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (n >= 2).then_some(n)
        })
        .await;
    println!("the loss chart has {points} points");
    browser.screenshot("studio-job.png").await;
    browser.click("#cancel-job").await;
    browser.close().await;
    drop(server);
}

/// The texts of the tokens matching `css` inside the `index`-th (0-based) `.preview-row`, joined.
async fn row_tokens(browser: &Browser, index: usize, css: &str) -> String {
    browser
        .js(
            "const row = document.querySelectorAll('#preview-rowlist .preview-row')[arguments[0]]; \
             return row ? Array.from(row.querySelectorAll(arguments[1])).map(t => t.textContent).join('') : null;",
            vec![json!(index), json!(css)],
        )
        .await
        .as_str()
        .unwrap_or_else(|| panic!("no preview row {index}"))
        .to_string()
}

/// An attribute of the first element matching `css`.
async fn attribute(browser: &Browser, css: &str, name: &str) -> Option<String> {
    browser
        .js(
            "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
            vec![json!(css), json!(name)],
        )
        .await
        .as_str()
        .map(String::from)
}

async fn wait_rows(browser: &Browser, rows: usize) {
    browser
        .until(&format!("{rows} preview row(s)"), || async {
            (browser.count("#preview-rowlist .preview-row").await == rows).then_some(())
        })
        .await;
}

/// The Data tab on the demo against the real whet-server and `whet dataset preview`: the
/// assistant's reasoning, answer and `<|im_end|>` take loss, the question does not, the think
/// block is marked, the histogram has its bins, and the legend follows the language.
#[tokio::test(flavor = "multi_thread")]
async fn data_tab_previews_the_demo_through_whet_server() {
    let browser = Browser::start().await;
    let server = open_whet_server(&browser).await;
    // The empty config has no dataset: the server's 422 names the field.
    browser.click("#nav-data").await;
    browser
        .wait_text("#preview-errors .diag.error[data-field=dataset]")
        .await;
    assert_eq!(
        browser
            .count("#preview-errors .diag[data-code=server_error]")
            .await,
        0
    );
    browser.click("#nav-editor").await;
    browser.click("button[data-preset=demo]").await;
    browser.click("#nav-data").await;
    wait_rows(&browser, preview::DEFAULT_ROWS).await;
    assert_eq!(browser.count("#preview-errors .diag").await, 0);

    // The demo's first training row, as its data file has it.
    let demo = std::fs::read_to_string(whet_tests::workspace().join("examples/demo/train.jsonl"))
        .expect("the demo data");
    let first: Value = serde_json::from_str(demo.lines().next().unwrap()).unwrap();
    let messages = first["messages"].as_array().unwrap();
    let said = |role: &str, key: &str| {
        messages
            .iter()
            .find(|m| m["role"] == role)
            .and_then(|m| m[key].as_str())
            .unwrap_or_else(|| panic!("the demo row has no {role} {key}"))
            .to_string()
    };
    let (question, answer) = (said("user", "content"), said("assistant", "content"));
    let reasoning = said("assistant", "reasoning_content");

    assert!(browser.count("#preview-rowlist span.tok.trained").await > 0);
    assert!(
        browser
            .count("#preview-rowlist span.tok:not(.trained)")
            .await
            > 0
    );
    let origin = browser
        .wait_text("#preview-rowlist .preview-row .origin")
        .await;
    assert!(origin.ends_with("train.jsonl"), "{origin}");
    assert_eq!(
        attribute(&browser, "#preview-rowlist .preview-row", "data-row")
            .await
            .as_deref(),
        Some("1")
    );
    let trained = row_tokens(&browser, 0, "span.tok.trained").await;
    let untrained = row_tokens(&browser, 0, "span.tok:not(.trained)").await;
    assert!(trained.contains(&answer), "{trained:?}");
    assert!(trained.contains(&reasoning), "{trained:?}");
    assert!(trained.ends_with("<|im_end|>"), "{trained:?}");
    assert!(untrained.contains(&question), "{untrained:?}");
    assert!(untrained.contains("<|im_start|>user"), "{untrained:?}");
    assert!(!trained.contains(&question), "{trained:?}");
    // qwen3_thinking trains the think block: it is marked, and it takes loss.
    let think = row_tokens(&browser, 0, "span.tok.think").await;
    assert!(
        think.starts_with("<think>") && think.ends_with("</think>"),
        "{think:?}"
    );
    assert!(think.contains(&reasoning), "{think:?}");
    assert!(
        browser
            .count("#preview-rowlist span.tok.think.trained")
            .await
            > 0
    );
    // Every token says its id.
    let id = attribute(&browser, "#preview-rowlist span.tok", "title")
        .await
        .unwrap_or_default();
    assert!(id.parse::<u32>().is_ok(), "{id:?}");

    let bins: usize = attribute(&browser, "#length-histogram", "data-bins")
        .await
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    assert!(bins > 0);
    assert_eq!(browser.count("#length-histogram rect.bar").await, bins);
    assert_eq!(browser.count("#length-histogram line.max-length").await, 1);
    assert!(browser
        .wait_text("#preview-summary")
        .await
        .contains("qwen3_thinking"));
    let datasets = browser.wait_text("#preview-datasets").await;
    assert!(
        datasets.contains("examples/demo/train.jsonl") && datasets.contains("messages 4000"),
        "{datasets}"
    );
    browser.screenshot("studio-data.png").await;

    // The rows count goes with the request.
    browser.paste_into("#preview-rows", "2").await;
    browser.click("#preview-run").await;
    wait_rows(&browser, 2).await;

    let legend_en = browser.wait_text("#preview-legend").await;
    assert!(legend_en.contains("takes loss"), "{legend_en}");
    set_language(&browser, "zh").await;
    let legend_zh = browser.wait_text("#preview-legend").await;
    assert_ne!(legend_zh, legend_en);
    assert!(legend_zh.contains("计算损失"), "{legend_zh}");
    assert!(browser.wait_text("#nav-data").await.contains("数据"));
    browser.screenshot("studio-data-zh.png").await;
    set_language(&browser, "en").await;
    browser.close().await;
    drop(server);
}

/// Tokens from `(text, trained, think)`; the last `cut` of them cut off.
fn tokens(parts: &[(&str, bool, bool)], cut: usize) -> Vec<PreviewToken> {
    let keep = parts.len() - cut;
    parts
        .iter()
        .enumerate()
        .map(|(i, &(text, trained, think))| PreviewToken {
            id: 100 + i as u32,
            text: text.to_string(),
            trained,
            cut: i >= keep,
            think,
        })
        .collect()
}

/// A preview with one row that fits and one cut on the right, warnings, and an unreadable row.
fn fake_preview() -> DatasetPreview {
    let reply: &[(&str, bool, bool)] = &[
        ("<|im_start|>", false, false),
        ("user", false, false),
        ("\n", false, false),
        ("What is 1 + 2?", false, false),
        ("<|im_end|>", false, false),
        ("\n", false, false),
        ("<|im_start|>", false, false),
        ("assistant", false, false),
        ("\n", false, false),
        ("<think>", true, true),
        ("\n1+2=3\n", true, true),
        ("</think>", true, true),
        ("\n\n", true, false),
        ("3", true, false),
        ("<|im_end|>", true, false),
    ];
    let mut long = reply.to_vec();
    long.extend([
        ("\n", false, false),
        ("<|im_start|>", false, false),
        ("user", false, false),
        ("\n", false, false),
        ("more", false, false),
    ]);
    let origin = |row| RowOrigin {
        spec: "train.jsonl".into(),
        file: "data/train.jsonl".into(),
        row,
    };
    let row = |row, tokens: Vec<PreviewToken>, truncation| PreviewRow {
        origin: origin(row),
        text: tokens.iter().map(|t| t.text.as_str()).collect(),
        num_tokens: tokens.len() as u64,
        num_trained: tokens.iter().filter(|t| t.trained && !t.cut).count() as u64,
        tokens,
        truncation,
    };
    let strategy = TruncationStrategy::Right;
    DatasetPreview {
        model: "examples/tiny-qwen3".into(),
        template: "qwen3_thinking".into(),
        max_length: 16,
        truncation_strategy: strategy,
        datasets: vec![
            DatasetSummary {
                spec: "train.jsonl".into(),
                field: "dataset".into(),
                rows: 100,
                bad_rows: 1,
                formats: vec![
                    FormatCount {
                        format: "messages".into(),
                        rows: 98,
                    },
                    FormatCount {
                        format: "alpaca".into(),
                        rows: 2,
                    },
                ],
            },
            DatasetSummary {
                spec: "val.jsonl".into(),
                field: "val_dataset".into(),
                rows: 10,
                bad_rows: 0,
                formats: vec![FormatCount {
                    format: "messages".into(),
                    rows: 10,
                }],
            },
        ],
        rows: vec![
            row(1, tokens(reply, 0), Truncation::Fits),
            row(2, tokens(&long, 4), Truncation::CutRight),
        ],
        lengths: LengthDistribution::new(&[15, 20, 12, 30], 100, 16, strategy),
        bad_rows: vec![BadRow {
            origin: origin(7),
            error: "missing field `messages`".into(),
        }],
        diagnostics: vec![
            preview::over_max_length(2, 4, 16, strategy),
            preview::unreadable_rows(1, false),
        ],
    }
}

/// The Data tab against a stand-in server: what it posts (the editor's config, `?rows=N`), and
/// every part of the answer drawn — summary, datasets, warnings, histogram, marked tokens, cut
/// rows, unreadable rows — in both languages; a 422's diagnostics; no Data tab without a server.
#[tokio::test(flavor = "multi_thread")]
async fn data_tab_draws_every_part_of_a_preview() {
    let api = FakeApi::new("secret-token");
    let fake = fake_preview();
    api.set_preview(serde_json::to_string(&fake).unwrap());
    let server = StaticServer::start_with_api(app_dist(), api.clone()).await;
    let browser = Browser::start().await;

    // Opened directly on a config without a dataset: the server's 422 is shown.
    browser.goto(&format!("{}/#/data", server.base_url)).await;
    set_language(&browser, "en").await;
    browser
        .wait_text("#preview-errors .diag[data-code=required]")
        .await;
    assert_eq!(browser.count(".preview-row").await, 0);

    browser.goto(&format!("{}/", server.base_url)).await;
    browser.click("button[data-preset=demo]").await;
    browser.click("#nav-data").await;
    wait_rows(&browser, 2).await;
    let posted = api.received("POST", "/api/datasets/preview");
    let last = posted.last().unwrap();
    assert_eq!(last.query, "rows=5");
    let body: JobConfig = serde_json::from_str(&last.body).expect("JobConfig JSON");
    assert_eq!(body, presets::find("demo").unwrap().config());
    assert_eq!(browser.count("#preview-errors .diag").await, 0);

    let summary = browser.wait_text("#preview-summary").await;
    for part in ["examples/tiny-qwen3", "qwen3_thinking", "16", "right"] {
        assert!(summary.contains(part), "{summary}");
    }
    let datasets = browser.wait_text("#preview-datasets").await;
    assert!(datasets.contains("messages 98, alpaca 2"), "{datasets}");
    assert_eq!(browser.count("#preview-datasets .dataset-row").await, 2);
    assert_eq!(browser.count("#preview-datasets td.bad").await, 1);
    assert_eq!(
        browser
            .count("#preview-warnings .diag[data-code=rows_over_max_length]")
            .await,
        1
    );
    assert_eq!(
        browser
            .count("#preview-warnings .diag[data-code=unreadable_rows]")
            .await,
        1
    );

    // The histogram: a bar per bin, max_length's line, the rows past it marked.
    assert_eq!(
        attribute(&browser, "#length-histogram", "data-bins").await,
        Some(fake.lengths.bins.len().to_string())
    );
    assert_eq!(
        attribute(&browser, "#length-histogram", "data-over").await,
        Some("2".into())
    );
    assert_eq!(
        browser.count("#length-histogram rect.bar").await,
        fake.lengths.bins.len()
    );
    assert_eq!(browser.count("#length-histogram line.max-length").await, 1);
    assert!(browser.count("#length-histogram rect.bar.over").await > 0);
    assert_eq!(
        browser.wait_text("#length-caption").await,
        "4 of 100 rows measured; 2 longer than max_length (cut on the right)"
    );

    // The rows: origin, lengths, badges, and the tokens with their marks.
    let head = browser
        .wait_text("#preview-rowlist .preview-row .row-head")
        .await;
    for part in [
        "data/train.jsonl",
        "row 1",
        "15 / 16 tokens",
        "6 trained",
        "fits",
    ] {
        assert!(head.contains(part), "{head}");
    }
    assert_eq!(
        row_tokens(&browser, 0, "span.tok.trained").await,
        "<think>\n1+2=3\n</think>\n\n3<|im_end|>"
    );
    assert_eq!(
        row_tokens(&browser, 0, "span.tok.think").await,
        "<think>\n1+2=3\n</think>"
    );
    assert!(row_tokens(&browser, 0, "span.tok:not(.trained)")
        .await
        .contains("What is 1 + 2?"));
    // The whole text, whitespace and all (the line-break marks are not text).
    assert_eq!(row_tokens(&browser, 0, "span.tok").await, fake.rows[0].text);
    assert_eq!(
        attribute(&browser, "#preview-rowlist span.tok", "title").await,
        Some("100".into())
    );
    assert_eq!(
        browser
            .count("#preview-rowlist .preview-row[data-truncation=cut-right]")
            .await,
        1
    );
    assert_eq!(
        row_tokens(&browser, 1, "span.tok.cut").await,
        "<|im_start|>user\nmore"
    );
    assert!(browser
        .wait_text("#preview-rowlist .preview-row[data-truncation=cut-right] .badge")
        .await
        .contains("cut right"));
    assert_eq!(
        browser.wait_text("#bad-rows").await,
        "data/train.jsonl row 7: missing field `messages`"
    );
    browser.screenshot("studio-data-fake.png").await;

    // Fewer rows: `?rows=1`.
    browser.paste_into("#preview-rows", "1").await;
    browser.click("#preview-run").await;
    wait_rows(&browser, 1).await;
    let posted = api.received("POST", "/api/datasets/preview");
    assert_eq!(posted.last().unwrap().query, "rows=1");

    // Chinese: the legend, the caption, the badges and the warnings.
    let legend_en = browser.wait_text("#preview-legend").await;
    set_language(&browser, "zh").await;
    let legend_zh = browser.wait_text("#preview-legend").await;
    assert_ne!(legend_en, legend_zh);
    assert!(legend_zh.contains("计算损失"), "{legend_zh}");
    assert!(browser
        .wait_text("#length-caption")
        .await
        .contains("截掉结尾"));
    assert!(browser
        .wait_text("#preview-warnings")
        .await
        .contains("超过 max_length"));
    assert!(browser.wait_text("#bad-rows").await.contains("第 7 行"));
    browser.screenshot("studio-data-fake-zh.png").await;
    set_language(&browser, "en").await;
    browser.close().await;
}
