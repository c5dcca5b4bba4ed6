//! GlooCollective with 1–4 ranks as threads of this process, each with its own TcpStore client
//! of one TcpStoreServer on an ephemeral port: the sums are exact, the shard rule holds for
//! lengths the world does not divide, and a rank that never comes makes the others fail within
//! the timeout instead of hanging.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Barrier, Mutex};
use std::time::{Duration, Instant};

use half::bf16;
use whet_collective::{
    shard_range, Collective, CollectiveError, GlooCollective, GlooOptions, Transport,
};
use whet_store::{StoreError, TcpStore, TcpStoreServer};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `body` as each of `world` ranks on its own thread and returns the results in rank
/// order.
fn with_ranks<R: Send>(world: usize, body: impl Fn(&GlooCollective) -> R + Sync) -> Vec<R> {
    let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let body = &body;
                scope.spawn(move || {
                    let store = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap();
                    let gloo = GlooCollective::new(&store, rank, world, TIMEOUT).unwrap();
                    assert_eq!((gloo.rank(), gloo.world_size()), (rank, world));
                    body(&gloo)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `rank`'s integer-valued contribution at index `i`, and the sum over `world` ranks.
fn value(rank: usize, i: usize) -> f64 {
    ((i % 97) * (rank + 1)) as f64 - rank as f64
}

fn sum(world: usize, i: usize) -> f64 {
    (0..world).map(|rank| value(rank, i)).sum()
}

#[test]
fn all_reduce_sums_exactly_on_2_3_and_4_ranks() {
    let len = 1009;
    for world in [2, 3, 4] {
        let results = with_ranks(world, |gloo| {
            let rank = gloo.rank();
            let mut in_place: Vec<f32> = (0..len).map(|i| value(rank, i) as f32).collect();
            let send = in_place.clone();
            gloo.all_reduce_in_place(&mut in_place).unwrap();
            let mut recv = vec![0f32; len];
            gloo.all_reduce(&send, &mut recv).unwrap();
            let mut wide: Vec<f64> = (0..len).map(|i| value(rank, i)).collect();
            gloo.all_reduce_in_place(&mut wide).unwrap();
            (in_place, recv, wide)
        });
        for (in_place, recv, wide) in results {
            let expected: Vec<f64> = (0..len).map(|i| sum(world, i)).collect();
            assert_eq!(
                in_place,
                expected.iter().map(|&x| x as f32).collect::<Vec<_>>()
            );
            assert_eq!(recv, in_place);
            assert_eq!(wide, expected);
        }
    }
}

#[test]
fn bf16_all_reduce_is_exact_on_integers_and_rounds_as_torch() {
    let len = 300;
    for world in [2, 3, 4] {
        for buffer in with_ranks(world, |gloo| {
            let mut buffer: Vec<bf16> = (0..len)
                .map(|i| bf16::from_f32(((i % 16) * (gloo.rank() + 1)) as f32))
                .collect();
            gloo.all_reduce_in_place(&mut buffer).unwrap();
            buffer
        }) {
            let expected: Vec<bf16> = (0..len)
                .map(|i| bf16::from_f32(((i % 16) * world * (world + 1) / 2) as f32))
                .collect();
            assert_eq!(buffer, expected, "world {world}");
        }
    }

    // Two ranks: one addition per element, so the result is exactly the f32 sum rounded to
    // nearest even — c10::BFloat16's `+`, and half's conversion.
    let operand = |rank: usize, i: usize| {
        let x = (i as f32 * 0.37 + rank as f32 * 1.91).sin() * 10f32.powi((i % 7) as i32 - 3);
        bf16::from_f32(x)
    };
    let len = 4096;
    for buffer in with_ranks(2, |gloo| {
        let mut buffer: Vec<bf16> = (0..len).map(|i| operand(gloo.rank(), i)).collect();
        gloo.all_reduce_in_place(&mut buffer).unwrap();
        buffer
    }) {
        for (i, got) in buffer.iter().enumerate() {
            let want = bf16::from_f32(operand(0, i).to_f32() + operand(1, i).to_f32());
            assert_eq!(got.to_bits(), want.to_bits(), "element {i}");
        }
    }
}

#[test]
fn reduce_scatter_keeps_each_ranks_uneven_shard_of_the_sum() {
    for world in [2, 3, 4] {
        for len in [1, 5, 10, 1001] {
            let results = with_ranks(world, |gloo| {
                let rank = gloo.rank();
                let send: Vec<f32> = (0..len).map(|i| value(rank, i) as f32).collect();
                let mut shard = vec![f32::NAN; gloo.shard(len).len()];
                gloo.reduce_scatter(&send, &mut shard).unwrap();
                let mut in_place = send.clone();
                gloo.reduce_scatter_in_place(&mut in_place).unwrap();
                (shard, in_place)
            });
            for (rank, (shard, in_place)) in results.into_iter().enumerate() {
                let range = shard_range(len, world, rank);
                let expected: Vec<f32> = range.clone().map(|i| sum(world, i) as f32).collect();
                assert_eq!(shard, expected, "world {world} len {len} rank {rank}");
                assert_eq!(in_place[range], expected[..]);
            }
        }
    }
}

#[test]
fn all_gather_puts_every_ranks_shard_in_place() {
    for world in [2, 3, 4] {
        for len in [1, 5, 10, 1001] {
            let owner = |i: usize| (0..world).find(|&r| shard_range(len, world, r).contains(&i));
            let expected: Vec<f32> = (0..len)
                .map(|i| (owner(i).unwrap() * 10_000 + i) as f32)
                .collect();
            let results = with_ranks(world, |gloo| {
                let rank = gloo.rank();
                let shard: Vec<f32> = gloo
                    .shard(len)
                    .map(|i| (rank * 10_000 + i) as f32)
                    .collect();
                let mut recv = vec![f32::NAN; len];
                gloo.all_gather(&shard, &mut recv).unwrap();
                let mut in_place = vec![-1f32; len];
                in_place[gloo.shard(len)].copy_from_slice(&shard);
                gloo.all_gather_in_place(&mut in_place).unwrap();
                (recv, in_place)
            });
            for (recv, in_place) in results {
                assert_eq!(recv, expected, "world {world} len {len}");
                assert_eq!(in_place, expected, "world {world} len {len}");
            }
        }
    }
}

#[test]
fn broadcast_from_a_non_zero_root() {
    let root = 2;
    for buffer in with_ranks(3, |gloo| {
        let mut buffer: Vec<bf16> = (0..77)
            .map(|i| bf16::from_f32((gloo.rank() * 100 + i) as f32))
            .collect();
        gloo.broadcast(&mut buffer, root).unwrap();
        buffer
    }) {
        let expected: Vec<bf16> = (0..77)
            .map(|i| bf16::from_f32((root * 100 + i) as f32))
            .collect();
        assert_eq!(buffer, expected);
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    let arrived = AtomicUsize::new(0);
    let seen = with_ranks(4, |gloo| {
        if gloo.rank() == 3 {
            // The last rank comes late; nobody may leave the barrier before it arrives.
            std::thread::sleep(Duration::from_millis(300));
        }
        arrived.fetch_add(1, Ordering::SeqCst);
        gloo.barrier().unwrap();
        let seen = arrived.load(Ordering::SeqCst);
        gloo.barrier().unwrap();
        seen
    });
    assert_eq!(seen, [4, 4, 4, 4]);
}

#[test]
fn ten_million_floats() {
    let len = 10_000_000;
    let started = Instant::now();
    for buffer in with_ranks(2, |gloo| {
        let mut buffer: Vec<f32> = (0..len)
            .map(|i| ((i % 1000) + gloo.rank()) as f32)
            .collect();
        gloo.all_reduce_in_place(&mut buffer).unwrap();
        buffer
    }) {
        assert!(buffer
            .iter()
            .enumerate()
            .all(|(i, &x)| x == (2 * (i % 1000) + 1) as f32));
    }
    eprintln!("10M-float all-reduce over 2 ranks: {:?}", started.elapsed());
}

#[test]
fn one_rank_is_its_own_world() {
    let [buffer] = with_ranks(1, |gloo| {
        let mut buffer = vec![1.5f32, 2.5];
        gloo.all_reduce_in_place(&mut buffer).unwrap();
        let mut shard = vec![0f32; 2];
        gloo.reduce_scatter(&buffer, &mut shard).unwrap();
        gloo.broadcast(&mut shard, 0).unwrap();
        gloo.barrier().unwrap();
        shard
    })
    .try_into()
    .unwrap();
    assert_eq!(buffer, [1.5, 2.5]);
}

#[test]
fn wrong_lengths_and_roots_are_refused_before_anything_is_sent() {
    for ok in with_ranks(2, |gloo| {
        let send = vec![1f32; 10];
        let mut short = vec![0f32; 9];
        let err = gloo.all_reduce(&send, &mut short).unwrap_err();
        assert!(matches!(err, CollectiveError::Length { .. }), "{err}");
        let mut wrong_shard = vec![0f32; 4];
        let err = gloo.reduce_scatter(&send, &mut wrong_shard).unwrap_err();
        assert!(err.to_string().contains("5 were expected"), "{err}");
        let err = gloo
            .all_gather(&short[..3], &mut short.clone())
            .unwrap_err();
        assert!(matches!(err, CollectiveError::Length { .. }), "{err}");
        let err = gloo.broadcast(&mut short, 2).unwrap_err();
        assert!(matches!(err, CollectiveError::InvalidRoot { .. }), "{err}");
        // Nothing was sent: the ranks are still in step.
        let mut buffer = vec![1f32; 3];
        gloo.all_reduce_in_place(&mut buffer).unwrap();
        buffer == [2.0; 3]
    }) {
        assert!(ok);
    }
}

/// A rank that never arrives: the others' rendezvous fails within the timeout, naming what
/// they waited for.
#[test]
fn a_missing_rank_times_out_the_rendezvous() {
    let timeout = Duration::from_millis(1500);
    let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    // Rank 0 of 3 is the one missing: the others wait for its host name first.
    let started = Instant::now();
    let errors: Vec<CollectiveError> = std::thread::scope(|scope| {
        let handles: Vec<_> = [1, 2]
            .map(|rank| {
                scope.spawn(move || {
                    let store = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap();
                    GlooCollective::new(&store, rank, 3, timeout).err().unwrap()
                })
            })
            .into();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < 4 * timeout, "{:?}", started.elapsed());
    for err in errors {
        assert!(err.is_timeout(), "{err}");
        let CollectiveError::Rendezvous {
            source: StoreError::Timeout { keys, .. },
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(keys, &["gloo/0/rank_0"], "{err}");
    }
}

/// All ranks connect; then one never joins an all-reduce: the others time out, and their
/// communicator refuses further work.
#[test]
fn a_rank_that_skips_an_operation_times_out_the_others() {
    let timeout = Duration::from_millis(1500);
    let (done, finished) = mpsc::channel::<()>();
    let finished = Mutex::new(finished);
    let connected = Barrier::new(3);
    let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    let results: Vec<Option<(CollectiveError, CollectiveError, Duration)>> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let (done, finished, connected) = (done.clone(), &finished, &connected);
                    scope.spawn(move || {
                        let store = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap();
                        let options = GlooOptions {
                            timeout,
                            transport: Transport::Hostname("127.0.0.1".into()),
                            group: "skip".into(),
                        };
                        let gloo = GlooCollective::with_options(&store, rank, 3, &options).unwrap();
                        connected.wait();
                        if rank == 2 {
                            // Stay connected, run nothing, until both others have failed.
                            let finished = finished.lock().unwrap();
                            finished.recv().unwrap();
                            finished.recv().unwrap();
                            return None;
                        }
                        let started = Instant::now();
                        let mut buffer = vec![1f32; 1000];
                        let first = gloo.all_reduce_in_place(&mut buffer).unwrap_err();
                        let elapsed = started.elapsed();
                        let second = gloo.barrier().unwrap_err();
                        done.send(()).unwrap();
                        Some((first, second, elapsed))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
    for (first, second, elapsed) in results.into_iter().flatten() {
        assert!(first.is_timeout(), "{first}");
        assert!(first.to_string().contains("all_reduce"), "{first}");
        assert!(elapsed < 3 * timeout, "{elapsed:?}");
        assert!(matches!(second, CollectiveError::Broken { .. }), "{second}");
    }
}

#[test]
fn groups_on_one_store_meet_separately() {
    let server = TcpStoreServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    let sums: Vec<(f32, f32)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                scope.spawn(move || {
                    let store = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap();
                    let group = |name: &str| GlooOptions {
                        group: name.into(),
                        ..GlooOptions::from_env(TIMEOUT).unwrap()
                    };
                    let a = GlooCollective::with_options(&store, rank, 2, &group("a")).unwrap();
                    let b = GlooCollective::with_options(&store, rank, 2, &group("b")).unwrap();
                    let mut x = [1f32];
                    let mut y = [10f32];
                    a.all_reduce_in_place(&mut x).unwrap();
                    b.all_reduce_in_place(&mut y).unwrap();
                    (x[0], y[0])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sums, [(2.0, 20.0), (2.0, 20.0)]);
}
