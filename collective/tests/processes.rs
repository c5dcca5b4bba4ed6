//! GlooCollective across real processes: this test binary runs itself once per rank (the
//! `rank_process` test, which does nothing unless `WHET_COLLECTIVE_TEST_ROLE` is set), each
//! rank given exactly the variables `whet sft --nproc_per_node` gives (torchrun's) and reaching
//! the store this process hosts through `RankEnv`, as a real rank does.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use half::bf16;
use whet_collective::{shard_range, Collective, CollectiveError, GlooCollective};
use whet_store::{RankEnv, TcpStoreServer};

const ROLE: &str = "WHET_COLLECTIVE_TEST_ROLE";
const TIMEOUT: Duration = Duration::from_secs(20);

/// One rank, when this binary was started as one: runs the role's script and panics (a
/// non-zero exit) on any wrong result.
#[test]
fn rank_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let env = RankEnv::from_env().unwrap().expect("a rank's variables");
    let store = env.connect_store(TIMEOUT).unwrap();
    let timeout = match role.as_str() {
        "dies" => Duration::from_secs(5),
        _ => TIMEOUT,
    };
    let gloo = GlooCollective::new(store.store(), env.rank, env.world_size, timeout).unwrap();
    match role.as_str() {
        "collectives" => collectives(&gloo),
        "dies" => dies(&gloo),
        other => panic!("unknown role {other}"),
    }
    println!("rank {} ok", env.rank);
}

fn collectives(gloo: &GlooCollective) {
    let (rank, world) = (gloo.rank(), gloo.world_size());
    let len = 100_003;
    let mut buffer: Vec<f32> = (0..len).map(|i| ((i % 50) * (rank + 1)) as f32).collect();
    gloo.all_reduce_in_place(&mut buffer).unwrap();
    let triangle = world * (world + 1) / 2;
    assert!(buffer
        .iter()
        .enumerate()
        .all(|(i, &x)| x == ((i % 50) * triangle) as f32));

    let mut halves: Vec<bf16> = (0..len).map(|i| bf16::from_f32((i % 8) as f32)).collect();
    gloo.all_reduce_in_place(&mut halves).unwrap();
    assert!(halves
        .iter()
        .enumerate()
        .all(|(i, &x)| x == bf16::from_f32(((i % 8) * world) as f32)));

    let send: Vec<f32> = (0..len).map(|i| (i % 10) as f32).collect();
    let mut shard = vec![0f32; gloo.shard(len).len()];
    gloo.reduce_scatter(&send, &mut shard).unwrap();
    let expected: Vec<f32> = gloo.shard(len).map(|i| ((i % 10) * world) as f32).collect();
    assert_eq!(shard, expected);

    let mut gathered = vec![0f32; len];
    let mine: Vec<f32> = gloo.shard(len).map(|_| rank as f32).collect();
    gloo.all_gather(&mine, &mut gathered).unwrap();
    for owner in 0..world {
        assert!(gathered[shard_range(len, world, owner)]
            .iter()
            .all(|&x| x == owner as f32));
    }

    let root = world - 1;
    let mut message = vec![rank as f64; 17];
    gloo.broadcast(&mut message, root).unwrap();
    assert_eq!(message, vec![root as f64; 17]);
    gloo.barrier().unwrap();
}

/// The last rank exits once connected; the others' next operation fails instead of hanging.
fn dies(gloo: &GlooCollective) {
    gloo.barrier().unwrap();
    if gloo.rank() == gloo.world_size() - 1 {
        std::process::exit(0);
    }
    let mut buffer = vec![1f32; 1000];
    let err = gloo.all_reduce_in_place(&mut buffer).unwrap_err();
    assert!(
        matches!(
            err,
            CollectiveError::Failed { .. } | CollectiveError::Timeout { .. }
        ),
        "{err}"
    );
    println!("rank {}: {err}", gloo.rank());
}

/// Starts `world` ranks of `role` against a store hosted here and returns each one's exit
/// status and output, killing any still running after `deadline`.
fn run_ranks(role: &str, world: usize, deadline: Duration) -> Vec<(bool, String)> {
    let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            let env = RankEnv::launched_by_whet(rank, world, "127.0.0.1", server.port());
            Command::new(&exe)
                .args(["--exact", "rank_process", "--nocapture", "--test-threads=1"])
                .envs(env.env_vars())
                .env(ROLE, role)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    let mut statuses = vec![None; world];
    while statuses.iter().any(Option::is_none) {
        for (child, status) in children.iter_mut().zip(&mut statuses) {
            if status.is_none() {
                *status = child.try_wait().unwrap();
            }
        }
        if started.elapsed() > deadline {
            for child in &mut children {
                let _ = child.kill();
            }
            panic!("ranks still running after {deadline:?}: {statuses:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .iter_mut()
        .zip(statuses)
        .map(|(child, status)| {
            let mut output = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut output)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut output)
                .unwrap();
            (status.unwrap().success(), output)
        })
        .collect()
}

#[test]
fn three_processes_run_every_collective() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    for (rank, (ok, output)) in run_ranks("collectives", 3, Duration::from_secs(60))
        .into_iter()
        .enumerate()
    {
        assert!(ok, "rank {rank} failed:\n{output}");
        assert!(output.contains(&format!("rank {rank} ok")), "{output}");
    }
}

#[test]
fn a_process_that_exits_fails_the_others_operation() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let results = run_ranks("dies", 3, Duration::from_secs(60));
    for (rank, (ok, output)) in results.iter().enumerate().take(2) {
        assert!(ok, "rank {rank} failed:\n{output}");
        assert!(output.contains(&format!("rank {rank} ok")), "{output}");
        assert!(output.contains("all_reduce on rank"), "{output}");
        eprintln!(
            "{}",
            output.lines().find(|l| l.contains("all_reduce")).unwrap()
        );
    }
}
