//! The studio's job tools against a real whet-server and the real `whet`: checkpoints, resume
//! from a cancelled run, chat with a trained checkpoint (and the base model beside it), and
//! runs compared — one test, since it trains the whole demo once (minutes on a CPU) and every
//! check uses that server's jobs. Merge-export (the demo's base has no weights to merge into)
//! and the chat's wire details are checked against a stand-in server.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use whet_shared::api::ChatRequest;
use whet_tests::app_dist;
use whet_tests::browser::Browser;
use whet_tests::static_server::{FakeApi, StaticServer};
use whet_tests::whet_server::WhetServer;

const TOKEN: &str = "studio-jobs-test-token";

/// Switches the page to English (the switch names the language it switches to).
async fn english(browser: &Browser) {
    if browser.wait_text("#lang").await == "English" {
        browser.click("#lang").await;
    }
    browser.wait_text_eq("#lang", "中文").await;
}

/// Waits up to `patience` for `check` (a training run takes minutes: longer than
/// `Browser::until` waits).
async fn wait_long<T, F, Fut>(browser: &Browser, what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            let path = browser.screenshot("studio-jobs-timeout.png").await;
            let log = browser.text_of("#job-log").await.unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "timed out waiting for {what} (screenshot: {}); the log ends:\n{}",
                path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_status(browser: &Browser, status: &str, patience: Duration) {
    wait_long(
        browser,
        &format!("the job to be {status}"),
        patience,
        || async {
            let now = browser.text_of("#job-status").await.unwrap_or_default();
            assert!(
                !(now == "failed" && status != "failed"),
                "the job failed:\n{}",
                browser.text_of("#job-log").await.unwrap_or_default()
            );
            (now == status).then_some(())
        },
    )
    .await;
}

/// No chat reply is streaming (the stop button is off).
async fn chat_idle(browser: &Browser) -> bool {
    browser
        .js(
            "const b = document.querySelector('#chat-cancel'); return b ? b.disabled : false;",
            vec![],
        )
        .await
        .as_bool()
        .unwrap_or(false)
}

/// The id of the job the page shows.
async fn shown_job(browser: &Browser) -> i64 {
    browser
        .until("a job view", || async {
            browser
                .js(
                    "const j = document.querySelector('#job'); return j ? j.dataset.job : null;",
                    vec![],
                )
                .await
                .as_str()
                .and_then(|id| id.parse().ok())
        })
        .await
}

/// The steps of the logging.jsonl records in the job's log (`"global_step/max_steps": "25/625"`).
fn logged_steps(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|record| {
            record
                .get("global_step/max_steps")?
                .as_str()?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Fills the editor with the demo preset and `fields` (flag name, text), submits it and
/// answers the new job's id once its view shows.
async fn submit_demo(browser: &Browser, base: &str, fields: &[(&str, &str)]) -> i64 {
    browser.goto(&format!("{base}/#/")).await;
    browser.wait_text("#submit-job").await;
    browser.click("button[data-preset=demo]").await;
    browser
        .until("the demo preset", || async {
            browser
                .value_of("#field-model input")
                .await
                .filter(|m| m == "examples/tiny-qwen3")
        })
        .await;
    for (field, text) in fields {
        browser
            .paste_into(&format!("#field-{field} input"), text)
            .await;
    }
    browser.paste_into("#token", TOKEN).await;
    for (field, _) in fields {
        assert_eq!(
            browser.count(&format!("#field-{field}.invalid")).await,
            0,
            "{field} takes the value"
        );
    }
    browser.click("#submit-job").await;
    shown_job(browser).await
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_resume_chat_and_compare_with_whet_server() {
    let server = WhetServer::start(TOKEN).await;
    let base = server.base_url.clone();
    let browser = Browser::start().await;
    browser.goto(&format!("{base}/")).await;
    english(&browser).await;

    // A demo with a lower learning rate that saves every 20 steps: cancelled after its first
    // checkpoint, it offers to resume, and the new job carries on after that checkpoint.
    let first = submit_demo(
        &browser,
        &base,
        &[
            ("learning_rate", "1e-3"),
            ("save_steps", "20"),
            ("logging_steps", "5"),
        ],
    )
    .await;
    wait_long(
        &browser,
        "a checkpoint in the table",
        Duration::from_secs(300),
        || async { (browser.count("tr.checkpoint").await >= 1).then_some(()) },
    )
    .await;
    browser.click("#cancel-job").await;
    wait_status(&browser, "cancelled", Duration::from_secs(120)).await;
    browser.wait_text("#resume-job").await;
    let resumed_from: u64 = browser
        .js(
            "const rows = document.querySelectorAll('tr.checkpoint'); \
             return rows[rows.length - 1].dataset.step;",
            vec![],
        )
        .await
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the latest checkpoint's step");
    assert!(resumed_from >= 20, "checkpoint at step {resumed_from}");
    assert_eq!(
        browser
            .text_of("tr.checkpoint:last-child td:nth-child(3)")
            .await
            .as_deref(),
        Some("full")
    );
    browser.click("#resume-job").await;
    let resumed = browser
        .until("the resumed job's view", || async {
            let id = shown_job(&browser).await;
            (id != first).then_some(id)
        })
        .await;
    let steps = wait_long(
        &browser,
        "the resumed job's first logged step",
        Duration::from_secs(300),
        || async {
            let steps = logged_steps(&browser.text_of("#job-log").await.unwrap_or_default());
            (!steps.is_empty()).then_some(steps)
        },
    )
    .await;
    assert!(
        steps[0] > resumed_from,
        "job {resumed} resumed from step {resumed_from} but first logged step {}",
        steps[0]
    );
    assert!(browser
        .wait_text("#job-log")
        .await
        .contains(&format!("at step {resumed_from}")));
    browser.click("#cancel-job").await;
    wait_status(&browser, "cancelled", Duration::from_secs(120)).await;

    // The whole demo: then chat with its last checkpoint.
    let demo = submit_demo(&browser, &base, &[]).await;
    wait_status(&browser, "succeeded", Duration::from_secs(1200)).await;
    let saved = browser
        .until("the demo's checkpoints", || async {
            let n = browser.count("tr.checkpoint").await;
            (n >= 1).then_some(n)
        })
        .await;
    assert!(saved <= 2, "save_total_limit 2 keeps {saved}");
    let best = browser
        .js(
            "return [...document.querySelectorAll('tr.checkpoint td.best')].filter(td => td.textContent.includes('★')).length;",
            vec![],
        )
        .await;
    assert_eq!(best, json!(1), "one checkpoint is marked best");

    browser.paste_into("#chat-input", "What is 23 + 58?").await;
    browser.click("#chat-send").await;
    let reply = wait_long(
        &browser,
        "the checkpoint's reply",
        Duration::from_secs(300),
        || async {
            let errors = browser.text_of("#chat-errors").await.unwrap_or_default();
            assert!(errors.is_empty(), "chat errors: {errors}");
            // The answer after the think block (the block's own sums are not it).
            browser
                .text_of("#chat-reply .answer")
                .await
                .filter(|r| r.contains("81"))
        },
    )
    .await;
    println!("the demo answered: {reply:?}");
    assert!(
        browser.count("#chat-reply .think").await >= 1,
        "the think block shows apart"
    );
    // Once more with the base model beside it (after the checkpoint's reply).
    browser
        .until("the reply to end", || async {
            chat_idle(&browser).await.then_some(())
        })
        .await;
    browser.click("#chat-with-base").await;
    browser.paste_into("#chat-input", "What is 23 + 58?").await;
    browser.click("#chat-send").await;
    let base_reply = wait_long(
        &browser,
        "the base model's reply",
        Duration::from_secs(300),
        || async {
            let errors = browser.text_of("#chat-errors").await.unwrap_or_default();
            assert!(errors.is_empty(), "chat errors: {errors}");
            let idle = chat_idle(&browser).await;
            let text = browser
                .text_of("#chat-base-reply")
                .await
                .unwrap_or_default();
            (idle && !text.trim().is_empty()).then_some(text)
        },
    )
    .await;
    println!("the base model answered: {base_reply:?}");
    assert_eq!(
        browser.count(".chat-turn").await,
        2,
        "the conversation keeps both turns"
    );
    browser.screenshot("studio-chat.png").await;

    // Compare the lower-learning-rate run with the demo.
    browser.goto(&format!("{base}/#/jobs")).await;
    browser
        .until("three jobs in the list", || async {
            (browser.count("tr.job-row").await == 3).then_some(())
        })
        .await;
    for id in [first, demo] {
        browser
            .click(&format!("input.compare-pick[data-job='{id}']"))
            .await;
    }
    browser.click("#compare-jobs").await;
    let series = |chart: &'static str| {
        let browser = &browser;
        async move {
            browser
                .js(
                    "const c = document.querySelector(arguments[0]); return c ? c.dataset.series : null;",
                    vec![json!(chart)],
                )
                .await
                .as_str()
                .map(String::from)
        }
    };
    browser
        .until("two runs on the loss chart", || async {
            (series("#compare-loss").await.as_deref() == Some("2")).then_some(())
        })
        .await;
    assert_eq!(series("#compare-lr").await.as_deref(), Some("2"));
    // The first run was cancelled before its first evaluation (step 125).
    assert_eq!(series("#compare-eval-loss").await.as_deref(), Some("1"));
    browser
        .until("the learning rate among the differing fields", || async {
            (browser
                .count("#compare-diff tr.diff-field[data-field*='learning_rate']")
                .await
                >= 1)
                .then_some(())
        })
        .await;
    assert!(
        browser
            .count("#compare-diff tr.diff-field[data-field='sft.save_steps']")
            .await
            == 1
    );
    assert_eq!(
        browser
            .count("#compare-diff tr.diff-field[data-field='sft.model']")
            .await,
        0,
        "a field both runs share is not listed"
    );
    assert_eq!(browser.count("#compare-final tr.final-row").await, 2);
    assert_eq!(
        browser
            .text_of(&format!(
                "#compare-final tr.final-row[data-job='{demo}'] .final-steps"
            ))
            .await
            .as_deref(),
        Some("625/625")
    );
    browser.click("#compare-by-epoch").await;
    browser
        .until("the loss chart by epoch", || async {
            (series("#compare-loss").await.as_deref() == Some("2")).then_some(())
        })
        .await;
    browser.screenshot("studio-compare.png").await;

    browser.close().await;
    drop(server);
}

/// The studio's side of checkpoints, resume, merge-export and a streamed chat reply, against a
/// stand-in server with one ended adapter run.
#[tokio::test(flavor = "multi_thread")]
async fn adapter_run_exports_resumes_and_chats_with_a_stand_in_server() {
    let api = FakeApi::new(TOKEN);
    let (json, sse) = ("application/json", "text/event-stream");
    let job = json!({
        "id": 2, "status": "succeeded", "created_at": "2026-01-01T00:00:00Z",
        "run_dir": "/data/runs/2",
        "config": {"sft": {"model": "examples/tiny-qwen3", "tuner_type": "lora"}},
    });
    api.answer_with("GET", "/api/jobs/2", "200 OK", json, &job.to_string());
    api.answer_with(
        "GET",
        "/api/jobs/2/events",
        "200 OK",
        sse,
        "event: status\ndata: {\"status\":\"succeeded\",\"exit_code\":0}\n\n",
    );
    let checkpoint = |step: u64, loss: f64| {
        json!({
            "name": format!("checkpoint-{step}"), "step": step,
            "path": format!("/data/runs/2/output/v0/checkpoint-{step}"), "kind": "adapter",
            "size_bytes": 123_456_789, "best": true,
            "metrics": {"loss": loss, "eval_loss": loss + 0.5, "step": step},
        })
    };
    let checkpoints = json!({"checkpoints": [checkpoint(10, 1.5), checkpoint(20, 0.75)]});
    api.answer_with(
        "GET",
        "/api/jobs/2/checkpoints",
        "200 OK",
        json,
        &checkpoints.to_string(),
    );
    let exported = json!({
        "checkpoint": "checkpoint-20",
        "output_dir": "/data/runs/2/output/v0/checkpoint-20-merged",
        "size_bytes": 2_147_483_648u64,
    });
    api.answer_with(
        "POST",
        "/api/jobs/2/export",
        "200 OK",
        json,
        &exported.to_string(),
    );
    api.answer_with(
        "POST",
        "/api/jobs/2/resume",
        "201 Created",
        json,
        r#"{"id":7,"status":"queued"}"#,
    );
    // The first message finds the job busy; then replies stream in pieces.
    api.answer_with(
        "POST",
        "/api/jobs/2/chat",
        "409 Conflict",
        json,
        r#"{"error":{"code":"conflict","message":"job 2 is already answering a chat message"}}"#,
    );
    let reply = [
        "event: text\ndata: \"<think>\\nfour\"\n\n",
        ": keep-alive\n\n",
        "event: text\ndata: \"\\n</think>\\n\\n4\"\n\n",
        "event: text\ndata: \"2 \u{1F600}\"\n\n",
        "event: done\ndata: {\"answered_by\":\"checkpoint-20\",\"cancelled\":false}\n\n",
    ]
    .concat();
    api.answer_with("POST", "/api/jobs/2/chat", "200 OK", sse, &reply);

    let server = StaticServer::start_with_api(app_dist(), api.clone()).await;
    let browser = Browser::start().await;
    browser.goto(&format!("{}/", server.base_url)).await;
    english(&browser).await;
    browser.wait_text("#submit-job").await;
    browser.paste_into("#token", TOKEN).await;
    browser.goto(&format!("{}/#/jobs/2", server.base_url)).await;
    browser.wait_text_eq("#job-status", "succeeded").await;
    browser
        .until("two checkpoints", || async {
            (browser.count("tr.checkpoint").await == 2).then_some(())
        })
        .await;
    // Each checkpoint's own trainer_state.json named itself best when saved: the newest wins.
    assert_eq!(
        browser
            .text_of("tr.checkpoint[data-name='checkpoint-20'] td.best")
            .await
            .as_deref(),
        Some("★")
    );
    assert_eq!(
        browser
            .text_of("tr.checkpoint[data-name='checkpoint-10'] td.best")
            .await
            .as_deref(),
        Some("")
    );
    assert_eq!(
        browser
            .text_of("tr.checkpoint[data-name='checkpoint-20'] td:nth-child(4)")
            .await
            .as_deref(),
        Some("117.7 MiB")
    );

    browser.click("#export-job").await;
    let result = browser.wait_text("#export-result").await;
    assert!(
        result.contains("checkpoint-20-merged") && result.contains("2.0 GiB"),
        "{result}"
    );
    let export = api.received("POST", "/api/jobs/2/export");
    assert_eq!(export.len(), 1);
    assert_eq!(
        export[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(export[0].body, "{}", "the latest checkpoint");

    // Chat: the server's refusal shows; then a reply streams, its think block apart.
    browser.paste_into("#chat-input", "2 + 2?").await;
    browser.click("#chat-send").await;
    let errors = browser
        .until("the refusal", || async {
            browser
                .text_of("#chat-errors")
                .await
                .filter(|e| !e.is_empty())
        })
        .await;
    assert!(
        errors.contains("already answering a chat message"),
        "{errors}"
    );
    browser.paste_into("#chat-input", "2 + 2?").await;
    browser.click("#chat-send").await;
    browser
        .until("the streamed reply", || async {
            browser
                .text_of("#chat-reply .answer")
                .await
                .filter(|r| r == "42 \u{1F600}")
        })
        .await;
    assert_eq!(
        browser.text_of("#chat-reply .think").await.as_deref(),
        Some("four")
    );
    assert_eq!(browser.wait_text("#chat-errors").await, "");
    // The next message carries the conversation: the refused turn is left out.
    browser.paste_into("#chat-input", "and 3 + 3?").await;
    browser.click("#chat-send").await;
    browser
        .until("the third request", || async {
            (api.received("POST", "/api/jobs/2/chat").len() == 3).then_some(())
        })
        .await;
    let sent: Vec<ChatRequest> = api
        .received("POST", "/api/jobs/2/chat")
        .iter()
        .map(|r| serde_json::from_str(&r.body).expect("a ChatRequest"))
        .collect();
    let roles = |r: &ChatRequest| {
        r.messages
            .iter()
            .map(|m| m.role.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(roles(&sent[1]), ["user"]);
    assert_eq!(roles(&sent[2]), ["user", "assistant", "user"]);
    assert_eq!(
        sent[2].messages[1].content,
        "<think>\nfour\n</think>\n\n42 \u{1F600}"
    );
    assert_eq!(
        (
            sent[2].max_new_tokens,
            sent[2].temperature,
            sent[2].top_p,
            sent[2].base
        ),
        (256, 0.0, 1.0, false)
    );
    assert_eq!(sent[2].checkpoint, None, "the latest checkpoint");

    // Resume opens the new job.
    browser.click("#resume-job").await;
    browser
        .until("the resumed job's view", || async {
            (browser.js("return location.hash;", vec![]).await == json!("#/jobs/7")).then_some(())
        })
        .await;
    browser.close().await;
}
