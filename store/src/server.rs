//! `TcpStoreServer`: a c10d TCPStore server that torch's clients and ours both use — what
//! `whet sft --nproc_per_node` hosts, as torchrun's agent does.
//!
//! A thread accepts connections; each connection has a reader thread (parse a query, apply it
//! under the one state lock) and a writer thread draining that client's outbox. Every reply is
//! queued while the state lock is held, so a client's replies leave in the order the state
//! changed: a STOP_WAITING woken by another client's SET can never overtake the WAIT_CANCELED
//! that answers its own CANCEL_WAIT. No reply is written under the lock, so a client that stops
//! reading stalls only itself.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::net::ToSocketAddrs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::{Result, StoreError};
use crate::wire::{self, Message, Query, MAX_KEY_LEN, MAX_VALUE_LEN};

/// A running TCPStore server. Dropping it stops accepting, closes every connection and joins
/// its threads; the port is free again afterwards.
pub struct TcpStoreServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Notified when a client starts waiting ([`TcpStoreServer::await_waiting_clients`]).
    waiters_changed: Condvar,
    stopping: AtomicBool,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

type ClientId = u64;

#[derive(Default)]
struct State {
    values: HashMap<Vec<u8>, Vec<u8>>,
    queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
    /// Key → the clients waiting for it (a client appears once per time it named the key).
    waiting: HashMap<Vec<u8>, Vec<ClientId>>,
    /// Client → how many of its awaited keys are still missing.
    awaited: HashMap<ClientId, usize>,
    clients: HashMap<ClientId, Client>,
    next_client: ClientId,
}

struct Client {
    outbox: Sender<Vec<u8>>,
    /// Another handle on the socket, to close it when the server stops.
    socket: TcpStream,
}

impl TcpStoreServer {
    /// Listens on `host:port` (the first address `host` resolves to that binds; port 0 picks a
    /// free one, see [`TcpStoreServer::port`]). A port in use is [`StoreError::PortTaken`],
    /// which names a port that was free a moment later.
    pub fn bind(host: &str, port: u16) -> Result<TcpStoreServer> {
        let addr = format!("{host}:{port}");
        let candidates = (host, port)
            .to_socket_addrs()
            .map_err(|source| StoreError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let mut last_error = io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("{host} resolves to no address"),
        );
        for candidate in candidates {
            match TcpListener::bind(candidate) {
                Ok(listener) => return TcpStoreServer::from_listener(listener),
                Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
                    return Err(StoreError::PortTaken {
                        host: host.to_string(),
                        port,
                        free_port: free_port(host),
                    })
                }
                Err(err) => last_error = err,
            }
        }
        Err(StoreError::Bind {
            addr,
            source: last_error,
        })
    }

    /// Listens on every interface, as torch's server does: `[::]` (IPv6 and, where the system
    /// allows, IPv4), else `0.0.0.0`.
    pub fn bind_all_interfaces(port: u16) -> Result<TcpStoreServer> {
        let bound = match TcpStoreServer::bind("::", port) {
            Err(StoreError::Bind { .. }) => TcpStoreServer::bind("0.0.0.0", port),
            bound => bound,
        };
        bound.map_err(|err| match err {
            StoreError::PortTaken {
                port, free_port, ..
            } => StoreError::PortTaken {
                host: "every interface".to_string(),
                port,
                free_port,
            },
            other => other,
        })
    }

    /// Serves on a listener the caller bound (torch's `masterListenFd`: bind early, hand it
    /// over, no window for another process to take the port).
    pub fn from_listener(listener: TcpListener) -> Result<TcpStoreServer> {
        let local_addr = listener.local_addr().map_err(|source| StoreError::Bind {
            addr: "the given listener".to_string(),
            source,
        })?;
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            waiters_changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            connections: Mutex::default(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("tcpstore-accept-{}", local_addr.port()))
                .spawn(move || accept_connections(shared, listener))
                .map_err(|source| StoreError::Bind {
                    addr: local_addr.to_string(),
                    source,
                })?
        };
        Ok(TcpStoreServer {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The port it listens on (the one picked when bound with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until at least `count` clients are blocked in WAIT (or BARRIER, or the wait
    /// inside a `get`); false if `timeout` passes first. Lets a test or a launcher know that
    /// ranks have arrived without polling.
    pub fn await_waiting_clients(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state();
        while state.awaited.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.shared.waiters_changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The acceptor is blocked in accept(): one connection wakes it to see the flag.
        let woken =
            TcpStream::connect_timeout(&reachable(self.local_addr), Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woken {
                let _ = acceptor.join();
            }
        }
        for client in self.shared.state().clients.values() {
            let _ = client.socket.shutdown(Shutdown::Both);
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for connection in connections {
            let _ = connection.join();
        }
    }
}

impl std::fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStoreServer")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// A port on `host` that was free a moment ago (bind port 0, read it, let it go).
fn free_port(host: &str) -> Option<u16> {
    let listener = TcpListener::bind((host, 0)).ok()?;
    Some(listener.local_addr().ok()?.port())
}

/// Where to connect to reach a listener bound to `addr` (a wildcard address means loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection thread must not take the whole store down with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn accept_connections(shared: Arc<Shared>, listener: TcpListener) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match incoming {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let for_thread = Arc::clone(&shared);
                let spawned = thread::Builder::new()
                    .name("tcpstore-client".to_string())
                    .spawn(move || serve_connection(for_thread, stream));
                // Out of threads: the stream is dropped and that client sees a closed socket.
                if let Ok(handle) = spawned {
                    let mut connections = lock(&shared.connections);
                    connections.retain(|handle| !handle.is_finished());
                    connections.push(handle);
                }
            }
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let (Ok(mut write_half), Ok(socket)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let (outbox, inbox) = mpsc::channel::<Vec<u8>>();
    let id = {
        let mut state = shared.state();
        let id = state.next_client;
        state.next_client += 1;
        state.clients.insert(id, Client { outbox, socket });
        // Registered after `drop` closed the clients it saw: close ourselves.
        if shared.stopping.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        id
    };
    let writer = thread::Builder::new()
        .name("tcpstore-client-writer".to_string())
        .spawn(move || {
            for reply in inbox {
                if write_half.write_all(&reply).is_err() {
                    let _ = write_half.shutdown(Shutdown::Both);
                    break;
                }
            }
        });
    if writer.is_ok() {
        // Ends at the client's EOF, on an I/O error, or on a query torch's server would also
        // refuse (it closes those connections too).
        let _ = serve_queries(&shared, id, &mut BufReader::new(&stream));
    }
    let _ = stream.shutdown(Shutdown::Both);
    shared.state().remove_client(id);
    if let Ok(writer) = writer {
        let _ = writer.join();
    }
}

fn refused(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn read_key(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    wire::read_bytes(reader, Some(MAX_KEY_LEN))
}

fn read_value(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    wire::read_bytes(reader, Some(MAX_VALUE_LEN))
}

fn read_keys(reader: &mut impl Read) -> io::Result<Vec<Vec<u8>>> {
    let count = wire::read_count(reader)?;
    (0..count).map(|_| read_key(reader)).collect()
}

/// The connection's queries, one at a time. The first must be VALIDATE with torch's magic
/// number, as torch's servers require.
fn serve_queries(shared: &Shared, id: ClientId, reader: &mut impl Read) -> io::Result<()> {
    let first = wire::read_u8(reader)?;
    if Query::from_byte(first) != Some(Query::Validate)
        || wire::read_u32(reader)? != wire::VALIDATION_MAGIC
    {
        return Err(refused(
            "the first query was not VALIDATE with c10d's magic number",
        ));
    }
    loop {
        let byte = match wire::read_u8(reader) {
            Ok(byte) => byte,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        };
        let query = Query::from_byte(byte).ok_or_else(|| refused(format!("query type {byte}")))?;
        serve_query(shared, id, query, reader)?;
    }
}

/// Reads one query's arguments (without the lock), then applies it and queues its reply (with
/// the lock).
fn serve_query(shared: &Shared, id: ClientId, query: Query, r: &mut impl Read) -> io::Result<()> {
    match query {
        Query::Validate => return Err(refused("VALIDATE after the handshake")),
        Query::Ping => {
            let nonce = wire::read_u32(r)?;
            shared.state().reply(id, Message::default().u32(nonce));
        }
        Query::Set => {
            let (key, value) = (read_key(r)?, read_value(r)?);
            shared.state().set(key, value);
        }
        Query::CompareSet => {
            let (key, expected, desired) = (read_key(r)?, read_value(r)?, read_value(r)?);
            let mut state = shared.state();
            let current = state.compare_set(key, expected, desired);
            state.reply(id, Message::default().bytes(&current));
        }
        Query::Get => {
            let key = read_key(r)?;
            let mut state = shared.state();
            // A missing key reads as empty, as torch's libuv server answers (clients wait first).
            let value = state.values.get(&key).cloned().unwrap_or_default();
            state.reply(id, Message::default().bytes(&value));
        }
        Query::Add => {
            let (key, delta) = (read_key(r)?, wire::read_i64(r)?);
            let mut state = shared.state();
            let total = state.add(key, delta)?;
            state.reply(id, Message::default().i64(total));
        }
        Query::Check => {
            let keys = read_keys(r)?;
            let mut state = shared.state();
            let ready = keys.iter().all(|key| state.present(key));
            let answer = if ready {
                wire::CHECK_READY
            } else {
                wire::CHECK_NOT_READY
            };
            state.reply(id, Message::default().byte(answer));
        }
        Query::Wait => {
            let keys = read_keys(r)?;
            let mut state = shared.state();
            if state.start_wait(id, &keys) {
                state.reply(id, Message::default().byte(wire::STOP_WAITING));
            } else {
                shared.waiters_changed.notify_all();
            }
        }
        Query::GetNumKeys => {
            let mut state = shared.state();
            let count = state.values.len() as i64;
            state.reply(id, Message::default().i64(count));
        }
        Query::DeleteKey => {
            let key = read_key(r)?;
            let mut state = shared.state();
            let deleted = i64::from(state.values.remove(&key).is_some());
            state.reply(id, Message::default().i64(deleted));
        }
        Query::Append => {
            let (key, value) = (read_key(r)?, read_value(r)?);
            shared.state().append(key, value);
        }
        Query::MultiGet => {
            let keys = read_keys(r)?;
            let mut state = shared.state();
            let mut reply = Message::default();
            for key in &keys {
                reply = reply.bytes(state.values.get(key).map_or(&[][..], Vec::as_slice));
            }
            state.reply(id, reply);
        }
        Query::MultiSet => {
            let count = wire::read_count(r)?;
            let pairs = (0..count)
                .map(|_| Ok((read_key(r)?, read_value(r)?)))
                .collect::<io::Result<Vec<_>>>()?;
            let mut state = shared.state();
            for (key, value) in pairs {
                state.set(key, value);
            }
        }
        Query::CancelWait => {
            let mut state = shared.state();
            state.clear_wait(id);
            state.reply(id, Message::default().byte(wire::WAIT_CANCELED));
        }
        Query::QueuePush => {
            let (key, value) = (read_key(r)?, read_value(r)?);
            let mut state = shared.state();
            state
                .queues
                .entry(key.clone())
                .or_default()
                .push_back(value);
            state.wake_one(&key);
        }
        Query::QueuePop => {
            let key = read_key(r)?;
            let mut state = shared.state();
            let mut reply = Message::default();
            if let Some(queue) = state.queues.get_mut(&key) {
                reply = reply.i64(queue.len() as i64);
                if let Some(front) = queue.pop_front() {
                    reply = reply.bytes(&front);
                }
                if queue.is_empty() {
                    state.queues.remove(&key);
                }
            } else {
                reply = reply.i64(0);
            }
            state.reply(id, reply);
        }
        Query::QueueLen => {
            let key = read_key(r)?;
            let mut state = shared.state();
            let len = state.queues.get(&key).map_or(0, VecDeque::len) as i64;
            state.reply(id, Message::default().i64(len));
        }
        Query::ListKeys => {
            let mut state = shared.state();
            let mut reply = Message::default().i64(state.values.len() as i64);
            for key in state.values.keys() {
                reply = reply.bytes(key);
            }
            state.reply(id, reply);
        }
        Query::Barrier => {
            let (key, world_size) = (read_key(r)?, wire::read_i64(r)?);
            let mut state = shared.state();
            // Counted without waking anyone: the waiters go when the last one arrives.
            let arrived = state.count(key.clone(), 1)?;
            if arrived >= world_size {
                state.wake(&key);
                state.reply(id, Message::default().byte(wire::STOP_WAITING));
            } else {
                state.clear_wait(id);
                state.waiting.entry(key).or_default().push(id);
                state.awaited.insert(id, 1);
                shared.waiters_changed.notify_all();
            }
        }
    }
    Ok(())
}

impl State {
    fn reply(&mut self, id: ClientId, message: Message) {
        if let Some(client) = self.clients.get(&id) {
            // The writer has gone only when the connection is closing.
            let _ = client.outbox.send(message.into_bytes());
        }
    }

    /// A key counts as there when it has a value or a non-empty queue (torch's `checkKeys`).
    fn present(&self, key: &[u8]) -> bool {
        self.values.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.values.insert(key.clone(), value);
        self.wake(&key);
    }

    fn append(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.values.entry(key.clone()).or_default().extend(value);
        self.wake(&key);
    }

    /// torch's answer: the value after the exchange; for a missing key, `desired` if
    /// `expected` was empty (and it is stored), else `expected` back (nothing stored).
    fn compare_set(&mut self, key: Vec<u8>, expected: Vec<u8>, desired: Vec<u8>) -> Vec<u8> {
        match self.values.get_mut(&key) {
            Some(current) => {
                if *current == expected {
                    *current = desired;
                }
                current.clone()
            }
            None if expected.is_empty() => {
                self.set(key, desired.clone());
                desired
            }
            None => expected,
        }
    }

    /// Adds to the decimal counter at `key` and wakes its waiters.
    fn add(&mut self, key: Vec<u8>, delta: i64) -> io::Result<i64> {
        let total = self.count(key.clone(), delta)?;
        self.wake(&key);
        Ok(total)
    }

    /// Adds to the decimal counter at `key` (missing is 0) and stores it back as decimal text.
    /// A value that is not a number is refused (torch's `std::stoll` throws and its server
    /// closes the connection).
    fn count(&mut self, key: Vec<u8>, delta: i64) -> io::Result<i64> {
        let total = match self.values.get(&key) {
            None => delta,
            Some(old) => parse_counter(old)
                .and_then(|old| old.checked_add(delta))
                .ok_or_else(|| {
                    refused(format!(
                        "ADD {delta} to {:?}, which is not a 64-bit integer",
                        String::from_utf8_lossy(old)
                    ))
                })?,
        };
        self.values.insert(key, total.to_string().into_bytes());
        Ok(total)
    }

    /// Registers `id` as waiting for `keys`; true if they are all there already.
    fn start_wait(&mut self, id: ClientId, keys: &[Vec<u8>]) -> bool {
        self.clear_wait(id);
        if keys.iter().all(|key| self.present(key)) {
            return true;
        }
        let mut missing = 0;
        for key in keys {
            if !self.present(key) {
                self.waiting.entry(key.clone()).or_default().push(id);
                missing += 1;
            }
        }
        self.awaited.insert(id, missing);
        false
    }

    /// `key` now has a value: every client waiting for it has one key fewer to wait for.
    fn wake(&mut self, key: &[u8]) {
        for id in self.waiting.remove(key).unwrap_or_default() {
            self.one_key_arrived(id);
        }
    }

    /// A queue item arrived: only the first waiting client may take it.
    fn wake_one(&mut self, key: &[u8]) {
        let Some(ids) = self.waiting.get_mut(key) else {
            return;
        };
        let id = ids.remove(0);
        if ids.is_empty() {
            self.waiting.remove(key);
        }
        self.one_key_arrived(id);
    }

    fn one_key_arrived(&mut self, id: ClientId) {
        if let Some(left) = self.awaited.get_mut(&id) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.awaited.remove(&id);
                self.reply(id, Message::default().byte(wire::STOP_WAITING));
            }
        }
    }

    fn clear_wait(&mut self, id: ClientId) {
        if self.awaited.remove(&id).is_some() {
            self.waiting.retain(|_, ids| {
                ids.retain(|&waiting| waiting != id);
                !ids.is_empty()
            });
        }
    }

    fn remove_client(&mut self, id: ClientId) {
        self.clear_wait(id);
        self.clients.remove(&id);
    }
}

/// `std::stoll` on a stored value: optional leading whitespace, an optional sign, digits;
/// anything after the digits is ignored. None when there are no digits or it overflows.
fn parse_counter(bytes: &[u8]) -> Option<i64> {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r'))?;
    let rest = &bytes[start..];
    let sign_len = usize::from(matches!(rest.first(), Some(b'+' | b'-')));
    let digits = rest[sign_len..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&rest[..sign_len + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_as_stoll_does() {
        assert_eq!(parse_counter(b"42"), Some(42));
        assert_eq!(parse_counter(b"  -7"), Some(-7));
        assert_eq!(parse_counter(b"+3"), Some(3));
        assert_eq!(parse_counter(b"12abc"), Some(12));
        assert_eq!(parse_counter(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_counter(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_counter(b"9223372036854775808"), None);
        assert_eq!(parse_counter(b""), None);
        assert_eq!(parse_counter(b"abc"), None);
        assert_eq!(parse_counter(b"-"), None);
    }

    #[test]
    fn waits_count_each_missing_key_once_per_mention() {
        let mut state = State::default();
        state.values.insert(b"a".to_vec(), b"1".to_vec());
        assert!(state.start_wait(7, &[b"a".to_vec()]));
        assert!(!state.start_wait(7, &[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]));
        assert_eq!(state.awaited[&7], 2);
        state.set(b"b".to_vec(), vec![]);
        assert_eq!(state.awaited[&7], 1);
        state.clear_wait(7);
        assert!(state.awaited.is_empty() && state.waiting.is_empty());
    }

    #[test]
    fn compare_set_answers_as_torch() {
        let mut state = State::default();
        // Missing key, non-empty expectation: nothing stored, the expectation comes back.
        assert_eq!(
            state.compare_set(b"k".to_vec(), b"x".to_vec(), b"y".to_vec()),
            b"x"
        );
        assert!(state.values.is_empty());
        // Missing key, empty expectation: stored.
        assert_eq!(
            state.compare_set(b"k".to_vec(), vec![], b"y".to_vec()),
            b"y"
        );
        // Mismatch: unchanged, current value back.
        assert_eq!(
            state.compare_set(b"k".to_vec(), b"z".to_vec(), b"w".to_vec()),
            b"y"
        );
        assert_eq!(
            state.compare_set(b"k".to_vec(), b"y".to_vec(), b"w".to_vec()),
            b"w"
        );
    }
}
