//! `TcpStore`: one blocking TCP connection to a c10d TCPStore server (torch's or ours), behind a
//! mutex so one handle serves several threads, one query at a time — as torch's client does with
//! its `activeOpLock_`.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Result, StoreError};
use crate::prefix::PrefixStore;
use crate::wire::{self, Message, Query, MAX_KEY_COUNT, MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::Store;

/// torch's `TCPStore` puts this before every key a caller names (`keyPrefix_`), so a Python
/// `store.set("k", ...)` stores `/k` on the server; we do the same to share its keys.
const KEY_PREFIX: &str = "/";

/// The shortest read timeout we set: `set_read_timeout` refuses zero, and a zero wait means
/// "check once".
const MIN_READ_TIMEOUT: Duration = Duration::from_millis(1);

/// Retry delays while the server is not up yet: doubling from the first, capped at the last.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(10);
const MAX_RETRY_DELAY: Duration = Duration::from_millis(500);

/// A client of a c10d TCPStore. `Send + Sync`; queries from several threads take turns on the
/// one connection (a thread blocked in `wait` or `get` holds it until the keys come or time
/// runs out — give a thread that waits its own [`TcpStore::clone_connection`]).
pub struct TcpStore {
    host: String,
    port: u16,
    addr: String,
    timeout: Duration,
    conn: Mutex<Connection>,
}

struct Connection {
    stream: TcpStream,
    /// Set when a failure may have left a reply half-read; every later query is refused.
    broken: Option<String>,
}

enum Attempt {
    /// Not reachable (yet): try again until the deadline.
    Retry(String),
    /// Reached, and definitely not a TCPStore.
    Fatal(StoreError),
}

impl TcpStore {
    /// Connects to the TCPStore at `host:port`, retrying until `timeout` while the server is not
    /// up yet (as torch's client does while rank 0 or the agent starts it), then sends the
    /// VALIDATE handshake and a PING. `timeout` is also the store's timeout: how long `get` and
    /// `multi_get` wait for their keys, and how long any reply may take.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStore> {
        let addr = format_addr(host, port);
        let deadline = Instant::now() + timeout;
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            match attempt_connect(host, port, &addr, deadline, timeout) {
                Ok(stream) => {
                    return Ok(TcpStore {
                        host: host.to_string(),
                        port,
                        addr,
                        timeout,
                        conn: Mutex::new(Connection {
                            stream,
                            broken: None,
                        }),
                    })
                }
                Err(Attempt::Fatal(err)) => return Err(err),
                Err(Attempt::Retry(why)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(StoreError::Connect {
                            addr,
                            timeout,
                            last_error: why,
                        });
                    }
                    std::thread::sleep(delay.min(deadline - now));
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }

    /// A second, independent connection to the same server with the same timeout (torch's
    /// `TCPStore.clone()`).
    pub fn clone_connection(&self) -> Result<TcpStore> {
        TcpStore::connect(&self.host, self.port, self.timeout)
    }

    /// Wraps this store so every key becomes `<prefix>/<key>`, as torch's `PrefixStore` does.
    pub fn with_prefix(self, prefix: impl Into<String>) -> PrefixStore<TcpStore> {
        PrefixStore::new(prefix, self)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Round-trips a nonce through the server.
    pub fn ping(&self) -> Result<()> {
        let nonce = std::process::id();
        let reply = self.query(
            "ping",
            Message::query(Query::Ping).u32(nonce),
            wire::read_u32,
        )?;
        if reply == nonce {
            Ok(())
        } else {
            Err(self.protocol("ping", format!("nonce {nonce} came back as {reply}")))
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>> {
        // A panic in another thread mid-query leaves the connection out of step; refuse it.
        let conn = match self.conn.lock() {
            Ok(conn) => conn,
            Err(poisoned) => {
                let mut conn = poisoned.into_inner();
                conn.broken
                    .get_or_insert_with(|| "a thread panicked mid-query".to_string());
                conn
            }
        };
        match &conn.broken {
            Some(why) => Err(StoreError::Broken {
                addr: self.addr.clone(),
                why: why.clone(),
            }),
            None => Ok(conn),
        }
    }

    /// Sends `message` and reads its reply with `read` (within the store timeout).
    fn query<T>(
        &self,
        op: &'static str,
        message: Message,
        read: impl FnOnce(&mut TcpStream) -> io::Result<T>,
    ) -> Result<T> {
        let mut conn = self.lock()?;
        self.exchange(&mut conn, op, message, read)
    }

    fn exchange<T>(
        &self,
        conn: &mut Connection,
        op: &'static str,
        message: Message,
        read: impl FnOnce(&mut TcpStream) -> io::Result<T>,
    ) -> Result<T> {
        let result = conn
            .stream
            .set_read_timeout(Some(self.timeout.max(MIN_READ_TIMEOUT)))
            .and_then(|()| conn.stream.write_all(&message.into_bytes()))
            .and_then(|()| read(&mut conn.stream));
        result.map_err(|err| self.fail(conn, op, err))
    }

    /// Sends a message that has no reply.
    fn send(&self, op: &'static str, message: Message) -> Result<()> {
        self.query(op, message, |_| Ok(()))
    }

    fn fail(&self, conn: &mut Connection, op: &'static str, err: io::Error) -> StoreError {
        let err = if is_timeout(&err) {
            io::Error::new(
                err.kind(),
                format!("no reply within the store timeout ({:?})", self.timeout),
            )
        } else {
            err
        };
        conn.broken = Some(format!("{op}: {err}"));
        StoreError::Io {
            addr: self.addr.clone(),
            op,
            source: err,
        }
    }

    fn protocol(&self, op: &'static str, why: String) -> StoreError {
        if let Ok(mut conn) = self.conn.lock() {
            conn.broken = Some(format!("{op}: {why}"));
        }
        StoreError::Protocol {
            addr: self.addr.clone(),
            op,
            why,
        }
    }

    /// WAIT for `wire_keys` (already prefixed) on a locked connection; on timeout, CANCEL_WAIT
    /// and read the server's acknowledgement so the connection stays in step (torch's
    /// `doWait`).
    fn wait_locked(
        &self,
        conn: &mut Connection,
        keys: &[&str],
        wire_keys: &[Vec<u8>],
        timeout: Duration,
    ) -> Result<()> {
        let mut message = Message::query(Query::Wait).u64(wire_keys.len() as u64);
        for key in wire_keys {
            message = message.bytes(key);
        }
        let sent = conn.stream.write_all(&message.into_bytes()).and_then(|()| {
            conn.stream
                .set_read_timeout(Some(timeout.max(MIN_READ_TIMEOUT)))
        });
        if let Err(err) = sent {
            return Err(self.fail(conn, "wait", err));
        }
        match wire::read_u8(&mut conn.stream) {
            Ok(wire::STOP_WAITING) => return Ok(()),
            Ok(other) => {
                conn.broken = Some(format!("wait answered {other}"));
                return Err(StoreError::Protocol {
                    addr: self.addr.clone(),
                    op: "wait",
                    why: format!("{other} where STOP_WAITING (0) belongs"),
                });
            }
            Err(err) if is_timeout(&err) => {}
            Err(err) => return Err(self.fail(conn, "wait", err)),
        }
        // Out of time: withdraw the wait. The keys may have come just now, in which case
        // STOP_WAITING arrives before the acknowledgement.
        let arrived = self.exchange(
            conn,
            "cancel_wait",
            Message::query(Query::CancelWait),
            |stream| {
                let first = wire::read_u8(stream)?;
                if first == wire::STOP_WAITING {
                    Ok((true, wire::read_u8(stream)?))
                } else {
                    Ok((false, first))
                }
            },
        )?;
        match arrived {
            (true, wire::WAIT_CANCELED) => Ok(()),
            (false, wire::WAIT_CANCELED) => Err(StoreError::Timeout {
                addr: self.addr.clone(),
                keys: keys.iter().map(|k| k.to_string()).collect(),
                timeout,
            }),
            (_, other) => {
                conn.broken = Some(format!("cancel_wait answered {other}"));
                Err(StoreError::Protocol {
                    addr: self.addr.clone(),
                    op: "cancel_wait",
                    why: format!("{other} where WAIT_CANCELED (1) belongs"),
                })
            }
        }
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let wire_key = wire_key(key)?;
        check_value(key, value)?;
        self.send(
            "set",
            Message::query(Query::Set).bytes(&wire_key).bytes(value),
        )
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let wire_key = wire_key(key)?;
        let mut conn = self.lock()?;
        self.wait_locked(
            &mut conn,
            &[key],
            std::slice::from_ref(&wire_key),
            self.timeout,
        )?;
        self.exchange(
            &mut conn,
            "get",
            Message::query(Query::Get).bytes(&wire_key),
            |stream| wire::read_bytes(stream, None),
        )
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let wire_key = wire_key(key)?;
        self.query(
            "add",
            Message::query(Query::Add).bytes(&wire_key).i64(delta),
            wire::read_i64,
        )
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        let wire_key = wire_key(key)?;
        check_value(key, expected)?;
        check_value(key, desired)?;
        self.query(
            "compare_set",
            Message::query(Query::CompareSet)
                .bytes(&wire_key)
                .bytes(expected)
                .bytes(desired),
            |stream| wire::read_bytes(stream, None),
        )
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let wire_keys = wire_keys("check", keys)?;
        let mut message = Message::query(Query::Check).u64(wire_keys.len() as u64);
        for key in &wire_keys {
            message = message.bytes(key);
        }
        match self.query("check", message, wire::read_u8)? {
            wire::CHECK_READY => Ok(true),
            wire::CHECK_NOT_READY => Ok(false),
            other => Err(self.protocol(
                "check",
                format!("{other} where READY (0) or NOT_READY (1) belongs"),
            )),
        }
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let wire_keys = wire_keys("wait", keys)?;
        let mut conn = self.lock()?;
        self.wait_locked(&mut conn, keys, &wire_keys, timeout)
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        let wire_key = wire_key(key)?;
        let deleted = self.query(
            "delete_key",
            Message::query(Query::DeleteKey).bytes(&wire_key),
            wire::read_i64,
        )?;
        Ok(deleted == 1)
    }

    fn num_keys(&self) -> Result<i64> {
        self.query(
            "num_keys",
            Message::query(Query::GetNumKeys),
            wire::read_i64,
        )
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        let wire_key = wire_key(key)?;
        check_value(key, value)?;
        self.send(
            "append",
            Message::query(Query::Append).bytes(&wire_key).bytes(value),
        )
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        let wire_keys = wire_keys("multi_get", keys)?;
        let mut conn = self.lock()?;
        self.wait_locked(&mut conn, keys, &wire_keys, self.timeout)?;
        let mut message = Message::query(Query::MultiGet).u64(wire_keys.len() as u64);
        for key in &wire_keys {
            message = message.bytes(key);
        }
        self.exchange(&mut conn, "multi_get", message, |stream| {
            (0..wire_keys.len())
                .map(|_| wire::read_bytes(stream, None))
                .collect()
        })
    }

    fn multi_set(&self, pairs: &[(&str, &[u8])]) -> Result<()> {
        check_count("multi_set", pairs.len())?;
        let mut message = Message::query(Query::MultiSet).u64(pairs.len() as u64);
        for (key, value) in pairs {
            check_value(key, value)?;
            message = message.bytes(&wire_key(key)?).bytes(value);
        }
        self.send("multi_set", message)
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl std::fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStore")
            .field("addr", &self.addr)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One attempt: resolve, connect to the first address that takes us, VALIDATE, PING.
fn attempt_connect(
    host: &str,
    port: u16,
    addr: &str,
    deadline: Instant,
    store_timeout: Duration,
) -> std::result::Result<TcpStream, Attempt> {
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_READ_TIMEOUT)
    };
    let candidates: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|err| Attempt::Retry(format!("resolving {host}: {err}")))?
        .collect();
    let mut last_error = format!("{host} resolves to no address");
    let mut connected = None;
    for candidate in candidates {
        match TcpStream::connect_timeout(&candidate, remaining()) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(err) => last_error = format!("connecting to {candidate}: {err}"),
        }
    }
    let mut stream = connected.ok_or(Attempt::Retry(last_error))?;
    let retry = |err: io::Error| Attempt::Retry(format!("handshake with {addr}: {err}"));
    stream.set_nodelay(true).map_err(retry)?;
    // A server that stops reading must not block a query forever.
    stream
        .set_write_timeout(Some(store_timeout.max(MIN_READ_TIMEOUT)))
        .map_err(retry)?;
    let nonce = std::process::id();
    let handshake = Message::query(Query::Validate)
        .u32(wire::VALIDATION_MAGIC)
        .byte(Query::Ping as u8)
        .u32(nonce);
    stream.write_all(&handshake.into_bytes()).map_err(retry)?;
    stream.set_read_timeout(Some(remaining())).map_err(retry)?;
    let reply = wire::read_u32(&mut stream).map_err(retry)?;
    if reply != nonce {
        return Err(Attempt::Fatal(StoreError::NotAStore {
            addr: addr.to_string(),
            why: format!(
                "it answered the PING nonce {nonce:#010x} with {reply:#010x} ({:?})",
                String::from_utf8_lossy(&reply.to_le_bytes())
            ),
        }));
    }
    Ok(stream)
}

fn format_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The key as the server stores it (`/` + key), refused past torch's limit.
fn wire_key(key: &str) -> Result<Vec<u8>> {
    let wire = format!("{KEY_PREFIX}{key}").into_bytes();
    if wire.len() > MAX_KEY_LEN {
        return Err(StoreError::KeyTooLong {
            key: key.chars().take(64).collect(),
            len: wire.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(wire)
}

fn wire_keys(op: &'static str, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
    check_count(op, keys.len())?;
    keys.iter().map(|key| wire_key(key)).collect()
}

fn check_count(op: &'static str, count: usize) -> Result<()> {
    if count > MAX_KEY_COUNT {
        return Err(StoreError::TooManyKeys {
            op,
            count,
            max: MAX_KEY_COUNT,
        });
    }
    Ok(())
}

fn check_value(key: &str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(StoreError::ValueTooLarge {
            key: key.chars().take(64).collect(),
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}
