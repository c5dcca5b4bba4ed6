//! Our client against our server over loopback: every query, timeouts, many clients at once,
//! prefixes, connecting before the server is up, a taken port and shutdown. Servers bind port 0
//! so tests run in parallel.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use whet_store::{RankEnv, Store, StoreError, TcpStore, TcpStoreServer, MAX_VALUE_LEN};

const TIMEOUT: Duration = Duration::from_secs(10);

fn server() -> TcpStoreServer {
    TcpStoreServer::bind("127.0.0.1", 0).expect("binding an ephemeral port")
}

fn client(server: &TcpStoreServer) -> TcpStore {
    TcpStore::connect("127.0.0.1", server.port(), TIMEOUT).expect("connecting to our server")
}

#[test]
fn set_get_round_trip_bytes() {
    let server = server();
    let store = client(&server);
    store.set("empty", b"").unwrap();
    store.set("binary", &[0, 255, 10, 13, 0]).unwrap();
    store.set("text", "日本語".as_bytes()).unwrap();
    assert_eq!(store.get("empty").unwrap(), b"");
    assert_eq!(store.get("binary").unwrap(), [0, 255, 10, 13, 0]);
    assert_eq!(store.get("text").unwrap(), "日本語".as_bytes());
    store.set("text", b"replaced").unwrap();
    assert_eq!(store.get("text").unwrap(), b"replaced");
    // A second client sees the first one's keys.
    assert_eq!(client(&server).get("binary").unwrap(), [0, 255, 10, 13, 0]);
    store.ping().unwrap();
}

#[test]
fn get_waits_for_a_key_set_later() {
    let server = server();
    let getter = client(&server);
    let reader = thread::spawn(move || getter.get("late").unwrap());
    assert!(
        server.await_waiting_clients(1, TIMEOUT),
        "the getter never waited"
    );
    client(&server).set("late", b"here").unwrap();
    assert_eq!(reader.join().unwrap(), b"here");
}

#[test]
fn wait_for_several_keys_wakes_after_the_last() {
    let server = server();
    let waiter = client(&server);
    let setter = client(&server);
    setter.set("a", b"1").unwrap();
    let waiting = thread::spawn(move || waiter.wait(&["a", "b", "c"], TIMEOUT));
    assert!(server.await_waiting_clients(1, TIMEOUT));
    assert!(!setter.check(&["a", "b", "c"]).unwrap());
    setter.set("b", b"2").unwrap();
    setter.add("c", 1).unwrap();
    waiting.join().unwrap().unwrap();
    assert!(setter.check(&["a", "b", "c"]).unwrap());
    assert!(setter.check(&[]).unwrap());
}

#[test]
fn wait_times_out_and_the_connection_stays_usable() {
    let server = server();
    let store = client(&server);
    let started = Instant::now();
    let err = store
        .wait(&["never"], Duration::from_millis(100))
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(100));
    match &err {
        StoreError::Timeout { keys, timeout, .. } => {
            assert_eq!(keys, &["never"]);
            assert_eq!(*timeout, Duration::from_millis(100));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.to_string().contains("never"), "{err}");
    // CANCEL_WAIT was acknowledged: the connection is still in step.
    store.set("after", b"ok").unwrap();
    assert_eq!(store.get("after").unwrap(), b"ok");
    // A zero timeout checks once.
    store.wait(&["after"], Duration::ZERO).unwrap();
    assert!(matches!(
        store.wait(&["never"], Duration::ZERO),
        Err(StoreError::Timeout { .. })
    ));
    // Setting the key later does not send a stale STOP_WAITING into the stream.
    store.set("never", b"now").unwrap();
    assert_eq!(store.add("counter", 2).unwrap(), 2);
    assert_eq!(store.get("never").unwrap(), b"now");
}

#[test]
fn get_gives_up_after_the_store_timeout() {
    let server = server();
    let store = TcpStore::connect("127.0.0.1", server.port(), Duration::from_millis(150)).unwrap();
    let err = store.get("missing").unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");
    store.set("missing", b"late").unwrap();
    assert_eq!(store.get("missing").unwrap(), b"late");
}

#[test]
fn add_compare_set_delete_append_and_counts() {
    let server = server();
    let store = client(&server);
    assert_eq!(store.add("n", 5).unwrap(), 5);
    assert_eq!(store.add("n", -7).unwrap(), -2);
    assert_eq!(store.get("n").unwrap(), b"-2", "counters are decimal text");
    store.set("m", b"40").unwrap();
    assert_eq!(store.add("m", 2).unwrap(), 42);

    assert_eq!(store.compare_set("cas", b"x", b"y").unwrap(), b"x");
    assert!(
        !store.check(&["cas"]).unwrap(),
        "a failed compare_set stores nothing"
    );
    assert_eq!(store.compare_set("cas", b"", b"first").unwrap(), b"first");
    assert_eq!(
        store.compare_set("cas", b"wrong", b"second").unwrap(),
        b"first"
    );
    assert_eq!(
        store.compare_set("cas", b"first", b"second").unwrap(),
        b"second"
    );

    store.append("log", b"ab").unwrap();
    store.append("log", b"cd").unwrap();
    assert_eq!(store.get("log").unwrap(), b"abcd");

    assert_eq!(store.num_keys().unwrap(), 4);
    assert!(store.delete_key("log").unwrap());
    assert!(!store.delete_key("log").unwrap());
    assert_eq!(store.num_keys().unwrap(), 3);

    store
        .multi_set(&[("x", b"1".as_slice()), ("y", b"22".as_slice())])
        .unwrap();
    assert_eq!(
        store.multi_get(&["y", "x", "n"]).unwrap(),
        [b"22".to_vec(), b"1".to_vec(), b"-2".to_vec()]
    );
}

#[test]
fn adding_to_text_closes_the_connection_as_torch_does() {
    let server = server();
    let store = client(&server);
    store.set("word", b"hello").unwrap();
    let err = store.add("word", 1).unwrap_err();
    assert!(matches!(err, StoreError::Io { op: "add", .. }), "{err:?}");
    let again = store.get("word").unwrap_err();
    assert!(matches!(again, StoreError::Broken { .. }), "{again:?}");
    // The server itself carries on.
    assert_eq!(client(&server).get("word").unwrap(), b"hello");
}

#[test]
fn many_clients_add_concurrently() {
    const CLIENTS: usize = 16;
    const ADDS: usize = 50;
    let server = server();
    let start = Arc::new(Barrier::new(CLIENTS));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let store = client(&server);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                (0..ADDS)
                    .map(|_| store.add("counter", 1).unwrap())
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let mut totals: Vec<i64> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    totals.sort_unstable();
    let expected: Vec<i64> = (1..=(CLIENTS * ADDS) as i64).collect();
    assert_eq!(totals, expected, "every add saw a distinct total");
}

#[test]
fn ranks_meet_through_the_store() {
    // Each "rank" publishes its address and waits for everyone else's, as a rendezvous does.
    const RANKS: usize = 24;
    let server = server();
    let ranks: Vec<_> = (0..RANKS)
        .map(|rank| {
            let store = client(&server).with_prefix("/worker/attempt_0");
            thread::spawn(move || {
                store
                    .set(&format!("addr/{rank}"), format!("host{rank}").as_bytes())
                    .unwrap();
                let keys: Vec<String> = (0..RANKS).map(|r| format!("addr/{r}")).collect();
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                store.wait(&keys, TIMEOUT).unwrap();
                let values = store.multi_get(&keys).unwrap();
                let arrived = store.add("arrived", 1).unwrap();
                (values, arrived)
            })
        })
        .collect();
    let expected: Vec<Vec<u8>> = (0..RANKS)
        .map(|r| format!("host{r}").into_bytes())
        .collect();
    let mut arrivals = Vec::new();
    for rank in ranks {
        let (values, arrived) = rank.join().unwrap();
        assert_eq!(values, expected);
        arrivals.push(arrived);
    }
    arrivals.sort_unstable();
    assert_eq!(arrivals, (1..=RANKS as i64).collect::<Vec<_>>());
}

#[test]
fn one_handle_serves_several_threads() {
    let server = server();
    let store = Arc::new(client(&server));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                for i in 0..25 {
                    let key = format!("t{t}/{i}");
                    store.set(&key, key.as_bytes()).unwrap();
                    assert_eq!(store.get(&key).unwrap(), key.as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.num_keys().unwrap(), 100);
}

#[test]
fn prefixes_join_keys_as_torch_does() {
    let server = server();
    let plain = client(&server);
    let attempt = client(&server).with_prefix("/worker/attempt_0");
    attempt.set("k", b"v").unwrap();
    assert_eq!(plain.get("/worker/attempt_0/k").unwrap(), b"v");
    assert_eq!(attempt.add("n", 3).unwrap(), 3);
    assert!(plain.check(&["/worker/attempt_0/n"]).unwrap());

    // torch's init_process_group nests another prefix inside.
    let pg = client(&server)
        .with_prefix("/worker/attempt_0")
        .with_prefix("default_pg");
    pg.set("0", b"rank0").unwrap();
    assert_eq!(
        plain.get("/worker/attempt_0/default_pg/0").unwrap(),
        b"rank0"
    );
    assert_eq!(attempt.get("default_pg/0").unwrap(), b"rank0");

    // A later attempt does not see the last one's keys.
    let next = client(&server).with_prefix("/worker/attempt_1");
    assert!(!next.check(&["k"]).unwrap());
    assert_eq!(next.num_keys().unwrap(), 3, "num_keys counts every prefix");

    // As `&dyn Store`, through an Arc.
    let shared: Arc<dyn Store> = Arc::new(client(&server));
    let scoped = whet_store::PrefixStore::new("/worker/attempt_0", Arc::clone(&shared));
    assert_eq!(scoped.get("k").unwrap(), b"v");
    let dyn_store: &dyn Store = &scoped;
    assert_eq!(
        dyn_store.multi_get(&["k", "n"]).unwrap(),
        [b"v".to_vec(), b"3".to_vec()]
    );
}

#[test]
fn connect_retries_until_the_server_is_up() {
    let port = free_port();
    let connecting = thread::spawn(move || TcpStore::connect("127.0.0.1", port, TIMEOUT));
    let server = TcpStoreServer::bind("127.0.0.1", port).unwrap();
    let store = connecting
        .join()
        .unwrap()
        .expect("connecting while the server starts");
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v");
    drop(server);
}

#[test]
fn connect_times_out_naming_the_address() {
    let port = free_port();
    let started = Instant::now();
    let err = TcpStore::connect("127.0.0.1", port, Duration::from_millis(200)).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(matches!(err, StoreError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("MASTER_ADDR"), "{message}");
}

#[test]
fn something_else_on_the_port_is_not_a_store() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let http = thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut request = [0u8; 10];
        socket.read_exact(&mut request).unwrap();
        socket.write_all(b"HTTP/1.1 400\r\n\r\n").unwrap();
    });
    let err = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains("is not a c10d TCPStore"), "{err}");
    http.join().unwrap();
}

#[test]
fn a_client_that_skips_validate_is_dropped() {
    let server = server();
    let mut raw = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    // PING without VALIDATE first.
    raw.write_all(&[13, 1, 2, 3, 4]).unwrap();
    let mut reply = Vec::new();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    match raw.read_to_end(&mut reply) {
        Ok(_) => assert!(reply.is_empty(), "closed without a reply, got {reply:?}"),
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset),
    }
    client(&server).ping().unwrap();
}

#[test]
fn a_taken_port_names_a_free_one() {
    let first = server();
    let port = first.port();
    let err = TcpStoreServer::bind("127.0.0.1", port).unwrap_err();
    let StoreError::PortTaken {
        port: taken,
        free_port: Some(free),
        ..
    } = err
    else {
        panic!("expected PortTaken with a free port, got {err:?}");
    };
    assert_eq!(taken, port);
    assert_ne!(free, port);
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("--master_port {port} is taken on 127.0.0.1")),
        "{message}"
    );
    assert!(
        message.ends_with(&format!("use --master_port {free} (free now)")),
        "{message}"
    );
    // The suggestion is usable (unless another process took it in between).
    let _ = TcpStoreServer::bind("127.0.0.1", free);
}

#[test]
fn dropping_the_server_closes_its_clients_and_frees_the_port() {
    let server = server();
    let port = server.port();
    let store = client(&server);
    let waiter = client(&server);
    store.set("k", b"v").unwrap();
    let waiting = thread::spawn(move || waiter.wait(&["never"], TIMEOUT));
    assert!(server.await_waiting_clients(1, TIMEOUT));
    drop(server);
    let err = waiting.join().unwrap().unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(store.get("k").is_err());
    // The same port can be served again at once, and the new store starts empty.
    let again = TcpStoreServer::bind("127.0.0.1", port).unwrap();
    let fresh = client(&again);
    assert_eq!(fresh.num_keys().unwrap(), 0);
}

#[test]
fn oversized_values_are_refused_before_sending() {
    let server = server();
    let store = client(&server);
    let big = vec![0u8; MAX_VALUE_LEN + 1];
    let err = store.set("big", &big).unwrap_err();
    assert!(matches!(err, StoreError::ValueTooLarge { .. }), "{err:?}");
    let long_key = "k".repeat(9000);
    let err = store.set(&long_key, b"v").unwrap_err();
    assert!(matches!(err, StoreError::KeyTooLong { .. }), "{err:?}");
    // Refused locally: the connection is fine.
    let largest = vec![7u8; MAX_VALUE_LEN];
    store.set("largest", &largest).unwrap();
    assert_eq!(store.get("largest").unwrap(), largest);
}

#[test]
fn a_hosting_rank_serves_the_others() {
    let port = free_port();
    let env = |rank: usize| RankEnv {
        rank,
        local_rank: rank,
        world_size: 3,
        local_world_size: 3,
        node_rank: None,
        master_addr: "127.0.0.1".to_string(),
        master_port: port,
        use_agent_store: false,
        restart_count: 2,
    };
    let host = env(0).connect_store(TIMEOUT).unwrap();
    assert!(host.server().is_some());
    let others: Vec<_> = (1..3)
        .map(|rank| {
            let env = env(rank);
            thread::spawn(move || {
                let rank_store = env.connect_store(TIMEOUT).unwrap();
                assert!(rank_store.server().is_none());
                let store = rank_store.store();
                store.set(&format!("ready/{rank}"), b"1").unwrap();
                store.get("go").unwrap()
            })
        })
        .collect();
    let store = host.store();
    store.wait(&["ready/1", "ready/2"], TIMEOUT).unwrap();
    store.set("go", b"now").unwrap();
    for other in others {
        assert_eq!(other.join().unwrap(), b"now");
    }
    // Keys live under the attempt's prefix.
    let plain = TcpStore::connect("127.0.0.1", port, TIMEOUT).unwrap();
    assert!(plain.check(&["/worker/attempt_2/go"]).unwrap());
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_taken_port_on_every_interface_names_a_free_one() {
    let first = TcpStoreServer::bind_all_interfaces(0).unwrap();
    let err = TcpStoreServer::bind_all_interfaces(first.port()).unwrap_err();
    let message = err.to_string();
    let expected = format!("--master_port {} is taken on every interface", first.port());
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains("(free now)"), "{message}");
}
