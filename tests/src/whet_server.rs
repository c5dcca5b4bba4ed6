//! A real whet-server for browser tests: started from the workspace root (so the demo's
//! `examples/` paths resolve) with the `whet` binary, a fresh data folder, a token and the
//! studio's `app/dist`; stopped and its data removed on drop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::prerequisites::workspace_binary;

pub struct WhetServer {
    pub base_url: String,
    pub token: String,
    child: Child,
    data: PathBuf,
}

impl WhetServer {
    /// Builds whet and whet-server when needed, starts the server and waits until it listens.
    pub async fn start(token: &str) -> WhetServer {
        let server_bin = workspace_binary("whet-server", "whet-server");
        let whet_bin = workspace_binary("whet-engine", "whet");
        let dist = crate::app_dist();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().expect("local address").port()
        };
        let data =
            std::env::temp_dir().join(format!("whet-server-test-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("creating the data folder");
        let child = Command::new(server_bin)
            .current_dir(crate::workspace())
            .env("WHET_TOKEN", token)
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args([
                "--database-url",
                &format!("sqlite://{}/whet.db", data.display()),
            ])
            .arg("--data-dir")
            .arg(&data)
            .arg("--static-dir")
            .arg(&dist)
            .arg("--whet-bin")
            .arg(&whet_bin)
            .kill_on_drop(true)
            .spawn()
            .expect("starting whet-server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "whet-server did not start listening on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        WhetServer {
            base_url: format!("http://127.0.0.1:{port}"),
            token: token.to_string(),
            child,
            data,
        }
    }
}

impl Drop for WhetServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
