//! Our client and server against torch's (the reference environment's `torch.distributed`):
//! our client on torch's TCPStore servers (libuv and legacy backends), torch's client on ours,
//! torchrun's agent-store layout, and two torch ranks meeting through our server with gloo.
//! Without the reference Python each test says `SKIPPED: ...` (a failure under
//! WHET_REQUIRE_ALL=1). The Python halves are `tests/torch/*.py`; they report `ok`/`FAIL` lines.

#[path = "../../tests/src/prerequisites.rs"]
mod prerequisites;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use whet_store::{RankEnv, Store, StoreError, TcpStore, TcpStoreServer};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The reference Python, or None after saying why the test is skipped.
fn torch_python(test: &str) -> Option<PathBuf> {
    match prerequisites::reference_python_with("torch.distributed") {
        Ok(python) => Some(python),
        Err(why) => {
            prerequisites::skip(test, &why);
            None
        }
    }
}

/// A running `tests/torch/<script>`, read line by line; killed if the test panics first.
struct Script {
    name: String,
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<String>>,
    seen: Vec<String>,
}

impl Script {
    fn start(python: &PathBuf, script: &str, args: &[String], env: &[(&str, String)]) -> Script {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/torch");
        let mut child = Command::new(python)
            .arg("-u")
            .arg(script)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} {script}: {e}", python.display()));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut stderr = child.stderr.take().unwrap();
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Script {
            name: script.to_string(),
            child,
            stdout,
            stderr: Some(stderr),
            seen: Vec::new(),
        }
    }

    /// The next line's words; panics with the script's output if it ended first.
    fn next(&mut self) -> Vec<String> {
        let mut line = String::new();
        let read = self.stdout.read_line(&mut line).unwrap();
        if read == 0 {
            self.fail("ended early");
        }
        self.seen.push(line.trim_end().to_string());
        line.split_whitespace().map(str::to_string).collect()
    }

    /// Reads up to the line starting with `first`, checking the `ok`/`FAIL` lines on the way.
    fn until(&mut self, first: &str) -> Vec<String> {
        loop {
            let words = self.next();
            match words.first().map(String::as_str) {
                Some(word) if word == first => return words,
                Some("ok") => {}
                _ => self.fail(&format!("{words:?} before {first:?}")),
            }
        }
    }

    /// Reads to `done`, then requires a clean exit.
    fn finish(mut self) {
        self.until("done");
        let status = self.child.wait().unwrap();
        if !status.success() {
            self.fail(&format!("exited with {status}"));
        }
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        panic!(
            "{}: {what}\n--- its stdout ---\n{}\n--- its stderr ---\n{stderr}",
            self.name,
            self.seen.join("\n")
        );
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn port_of(words: &[String]) -> u16 {
    words.last().unwrap().parse().unwrap()
}

#[test]
fn our_client_against_torchs_servers() {
    let test = "our_client_against_torchs_servers";
    let Some(python) = torch_python(test) else {
        return;
    };
    let backends = ["libuv", "legacy"];
    let mut script = Script::start(&python, "torch_server.py", &backends.map(String::from), &[]);
    let version = script.until("torch");
    eprintln!("{test}: torch {}", version[1]);
    let ports: Vec<u16> = backends
        .iter()
        .map(|backend| {
            let words = script.until("port");
            assert_eq!(words[1], *backend);
            port_of(&words)
        })
        .collect();

    for (backend, port) in backends.iter().zip(ports) {
        let store = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap();
        store.ping().unwrap();
        // torch's set → our get (which waits until torch gets there).
        assert_eq!(store.get("from_py").unwrap(), b"hello", "{backend}");
        store.wait(&["py_added"], TIMEOUT).unwrap();
        assert_eq!(store.add("counter", 3).unwrap(), 8, "{backend}");
        store.set("from_rust", b"world").unwrap();
        store.set("binary", &[0, 255, 10]).unwrap();

        // A wait that times out is withdrawn with CANCEL_WAIT; torch's server acknowledges it and
        // the connection carries on.
        let err = store
            .wait(&["never"], Duration::from_millis(200))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Timeout { .. }),
            "{backend}: {err:?}"
        );
        assert_eq!(store.get("from_py").unwrap(), b"hello", "{backend}");

        assert!(store.check(&["from_py", "counter"]).unwrap());
        assert!(!store.check(&["from_py", "never"]).unwrap());
        assert_eq!(store.compare_set("cas", b"", b"one").unwrap(), b"one");
        assert_eq!(store.compare_set("cas", b"zzz", b"x").unwrap(), b"one");
        assert_eq!(store.compare_set("cas", b"one", b"two").unwrap(), b"two");
        store.append("log", b"ab").unwrap();
        store.append("log", b"cd").unwrap();
        store.set("gone", b"x").unwrap();
        assert!(store.delete_key("gone").unwrap());
        assert!(!store.delete_key("gone").unwrap());
        store
            .multi_set(&[("m1", b"1".as_slice()), ("m2", b"22".as_slice())])
            .unwrap();
        assert_eq!(
            store.multi_get(&["m2", "from_py"]).unwrap(),
            [b"22".to_vec(), b"hello".to_vec()]
        );
        let prefixed = store
            .clone_connection()
            .unwrap()
            .with_prefix("/worker/attempt_0");
        prefixed.set("rdzv", b"from-rust").unwrap();
        // SET has no reply; a PING on the same connection comes back only after it is applied.
        prefixed.inner().ping().unwrap();
        // from_py counter py_added from_rust binary cas log m1 m2 /worker/attempt_0/rdzv
        assert_eq!(store.num_keys().unwrap(), 10, "{backend}");
        store.set("rust_done", b"").unwrap();
    }
    script.finish();
}

#[test]
fn torchs_client_against_our_server() {
    let test = "torchs_client_against_our_server";
    let Some(python) = torch_python(test) else {
        return;
    };
    let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
    let store = TcpStore::connect("127.0.0.1", server.port(), TIMEOUT).unwrap();
    store.set("from_rust", b"rust").unwrap();

    let mut script = Script::start(
        &python,
        "torch_client.py",
        &[server.port().to_string()],
        &[],
    );
    script.until("waiting");
    // torch's client blocks in WAIT on our server; a SET from our client wakes it.
    assert!(
        server.await_waiting_clients(1, TIMEOUT),
        "torch never waited"
    );
    store.set("late", b"set-by-rust").unwrap();
    script.finish();

    // What torch wrote, read back by us.
    assert_eq!(store.get("from_py").unwrap(), b"py");
    assert_eq!(store.get("counter").unwrap(), b"5");
    assert_eq!(store.get("pair").unwrap(), b"2", "the barrier counted both");
    let rank = store
        .clone_connection()
        .unwrap()
        .with_prefix("/worker/attempt_0");
    assert_eq!(rank.get("rdzv").unwrap(), b"from-py");
}

#[test]
fn torchrun_agent_store_layout() {
    let test = "torchrun_agent_store_layout";
    let Some(python) = torch_python(test) else {
        return;
    };
    let mut script = Script::start(&python, "torch_agent_store.py", &[], &[]);
    let port = port_of(&script.until("port"));

    // Exactly what torchrun's agent gives a rank, read as a rank reads it.
    let vars = [
        ("RANK", "0".to_string()),
        ("LOCAL_RANK", "0".to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("LOCAL_WORLD_SIZE", "2".to_string()),
        ("GROUP_RANK", "0".to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
        ("TORCHELASTIC_USE_AGENT_STORE", "True".to_string()),
        ("TORCHELASTIC_RESTART_COUNT", "0".to_string()),
    ];
    let env = RankEnv::from_lookup(|var| {
        vars.iter()
            .find(|(name, _)| *name == var)
            .map(|(_, value)| value.clone())
    })
    .unwrap()
    .unwrap();
    assert!(!env.hosts_store(), "under the agent store no rank hosts");
    let rank_store = env.connect_store(TIMEOUT).unwrap();
    let store: &dyn Store = rank_store.store();
    assert_eq!(store.get("from_py").unwrap(), b"py-rank");
    store.set("from_rust", b"rust-rank").unwrap();
    script.finish();
}

#[test]
fn torch_ranks_meet_through_our_server() {
    let test = "torch_ranks_meet_through_our_server";
    let Some(python) = torch_python(test) else {
        return;
    };
    // Our server in the agent's place; the ranks get torchrun's variables from whet's launcher
    // helper, so this is also what `whet sft --nproc_per_node` will give them.
    let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
    const WORLD: usize = 2;
    let scripts: Vec<Script> = (0..WORLD)
        .map(|rank| {
            let env = RankEnv::launched_by_whet(rank, WORLD, "127.0.0.1", server.port());
            let mut vars = env.env_vars();
            vars.push(("GLOO_SOCKET_IFNAME", "lo".to_string()));
            vars.push(("OMP_NUM_THREADS", "1".to_string()));
            Script::start(&python, "torch_rank.py", &[], &vars)
        })
        .collect();
    for (rank, mut script) in scripts.into_iter().enumerate() {
        let words = script.until("rank");
        assert_eq!(words[1], rank.to_string());
        script.finish();
    }
    // Torch's rendezvous left its keys with us (its `init/` count among them).
    let store = TcpStore::connect("127.0.0.1", server.port(), TIMEOUT).unwrap();
    assert!(store.num_keys().unwrap() > 1);
}
