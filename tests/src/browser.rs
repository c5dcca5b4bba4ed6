//! Headless Chromium through chromedriver (fantoccini), with the few helpers the studio tests
//! need: wait for a condition, read text and values, set an input as a user would.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

/// How long a page may take to show what a test waits for (the machine may be busy).
pub const PATIENCE: Duration = Duration::from_secs(60);

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: TempDir,
}

/// A folder removed on drop (a fresh Chromium profile per session).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a local port");
    listener.local_addr().expect("local address").port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium, or panics saying how to install them.
    pub async fn start() -> Browser {
        let install = "install them with `.ci/install-studio-tools` (Debian: `apt-get install -y chromium chromium-driver`)";
        let chromium = find_program(&["chromium", "chromium-browser", "google-chrome"])
            .unwrap_or_else(|| panic!("no chromium on PATH: {install}"));
        let chromedriver = find_program(&["chromedriver"])
            .unwrap_or_else(|| panic!("no chromedriver on PATH: {install}"));
        let port = free_port().await;
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromedriver");
        // chromedriver answers once it listens; give it a few seconds on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start listening on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile =
            std::env::temp_dir().join(format!("whet-chromium-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--disable-quic", "--window-size=1400,1000", "--lang=en-US",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let client = ClientBuilder::native()
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("connecting to chromedriver (is chromium the same version as chromedriver?)");
        Browser {
            client,
            driver,
            _profile: TempDir(profile),
        }
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigating");
    }

    /// Runs JavaScript (a returned promise is awaited) and answers its result.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until `check` answers `Some`, polling the page.
    pub async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() > deadline {
                let shot = self.client.screenshot().await.unwrap_or_default();
                let path = crate::artifacts_dir().join("timeout.png");
                let _ = std::fs::write(&path, shot);
                panic!(
                    "timed out waiting for {what} (screenshot: {})",
                    path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element matching `css`, or `None` when there is none.
    pub async fn text_of(&self, css: &str) -> Option<String> {
        let value = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                vec![json!(css)],
            )
            .await;
        value.as_str().map(String::from)
    }

    /// Waits for an element and answers its text.
    pub async fn wait_text(&self, css: &str) -> String {
        self.until(&format!("`{css}`"), || self.text_of(css)).await
    }

    /// Waits until the element's text equals `expected`.
    pub async fn wait_text_eq(&self, css: &str, expected: &str) {
        self.until(&format!("`{css}` to read `{expected}`"), || async {
            (self.text_of(css).await.as_deref() == Some(expected)).then_some(())
        })
        .await
    }

    pub async fn count(&self, css: &str) -> usize {
        self.js(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(css)],
        )
        .await
        .as_u64()
        .unwrap_or(0) as usize
    }

    /// The `value` property of an input or textarea.
    pub async fn value_of(&self, css: &str) -> Option<String> {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.value : null;",
            vec![json!(css)],
        )
        .await
        .as_str()
        .map(String::from)
    }

    pub async fn click(&self, css: &str) {
        let element = self
            .client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` to click: {e}"));
        element
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking `{css}`: {e}"));
    }

    /// Empties an input, then types `text` into it key by key, as a user does.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self
            .client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` to type into: {e}"));
        self.js(
            "document.querySelector(arguments[0]).value = '';",
            vec![json!(css)],
        )
        .await;
        element
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into `{css}`: {e}"));
    }

    /// Sets an input's whole value at once and fires `input` (as pasting does).
    pub async fn paste_into(&self, css: &str, text: &str) {
        self.js(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1]; \
             e.dispatchEvent(new Event('input', {bubbles: true}));",
            vec![json!(css), json!(text)],
        )
        .await;
    }

    /// Saves a PNG screenshot of the window into the test artifacts; answers its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("taking a screenshot");
        let path = crate::artifacts_dir().join(name);
        std::fs::write(&path, png).expect("writing the screenshot");
        path
    }
}
