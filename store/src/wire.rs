//! The bytes of c10d's TCPStore protocol: query types, reply codes, limits, and the encoders and
//! decoders both ends use. Every integer is little-endian (torch writes its native byte order;
//! every machine torch runs on is little-endian); strings and byte vectors are a `u64` length and
//! the bytes.

use std::io::{self, Read};

/// The `u32` a client sends right after connecting (`validationMagicNumber`).
pub(crate) const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// torch's libuv server (the default) closes a connection that sends a longer key.
pub const MAX_KEY_LEN: usize = 8 * 1024;
/// torch's libuv server closes a connection that sends a longer value.
pub const MAX_VALUE_LEN: usize = 8 * 1024 * 1024;
/// torch's libuv server closes a connection that names more keys in one query.
pub const MAX_KEY_COUNT: usize = 128 * 1024;

/// `c10d::detail::QueryType`: the first byte of every request, in torch's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Query {
    Validate = 0,
    Set = 1,
    CompareSet = 2,
    Get = 3,
    Add = 4,
    Check = 5,
    Wait = 6,
    GetNumKeys = 7,
    DeleteKey = 8,
    Append = 9,
    MultiGet = 10,
    MultiSet = 11,
    CancelWait = 12,
    Ping = 13,
    QueuePush = 14,
    QueuePop = 15,
    QueueLen = 16,
    ListKeys = 17,
    Barrier = 18,
}

impl Query {
    pub(crate) fn from_byte(byte: u8) -> Option<Query> {
        use Query::*;
        const ALL: [Query; 19] = [
            Validate, Set, CompareSet, Get, Add, Check, Wait, GetNumKeys, DeleteKey, Append,
            MultiGet, MultiSet, CancelWait, Ping, QueuePush, QueuePop, QueueLen, ListKeys, Barrier,
        ];
        ALL.get(usize::from(byte)).copied()
    }
}

/// `CheckResponseType::READY` / `NOT_READY`: the one-byte answer to CHECK.
pub(crate) const CHECK_READY: u8 = 0;
pub(crate) const CHECK_NOT_READY: u8 = 1;
/// `WaitResponseType::STOP_WAITING` / `WAIT_CANCELED`: the one-byte answers to WAIT, BARRIER and
/// CANCEL_WAIT.
pub(crate) const STOP_WAITING: u8 = 0;
pub(crate) const WAIT_CANCELED: u8 = 1;

/// One message, built in memory and written with a single `write_all` (as torch's `SendBuffer`
/// does, so a request never sits half-sent behind Nagle's algorithm).
#[derive(Default)]
pub(crate) struct Message(Vec<u8>);

impl Message {
    pub(crate) fn query(query: Query) -> Message {
        Message(vec![query as u8])
    }

    pub(crate) fn byte(mut self, byte: u8) -> Message {
        self.0.push(byte);
        self
    }

    pub(crate) fn u32(mut self, value: u32) -> Message {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub(crate) fn u64(mut self, value: u64) -> Message {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub(crate) fn i64(mut self, value: i64) -> Message {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// A string or a byte vector: `u64` length, then the bytes.
    pub(crate) fn bytes(self, bytes: &[u8]) -> Message {
        let mut message = self.u64(bytes.len() as u64);
        message.0.extend_from_slice(bytes);
        message
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

pub(crate) fn read_u8(reader: &mut impl Read) -> io::Result<u8> {
    let mut buf = [0u8; 1];
    reader.read_exact(&mut buf)?;
    Ok(buf[0])
}

pub(crate) fn read_u32(reader: &mut impl Read) -> io::Result<u32> {
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf)?;
    Ok(u32::from_le_bytes(buf))
}

pub(crate) fn read_u64(reader: &mut impl Read) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    reader.read_exact(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

pub(crate) fn read_i64(reader: &mut impl Read) -> io::Result<i64> {
    let mut buf = [0u8; 8];
    reader.read_exact(&mut buf)?;
    Ok(i64::from_le_bytes(buf))
}

/// A length-prefixed string or byte vector of at most `max` bytes (`None`: no limit). The buffer
/// grows as bytes arrive, so a corrupt length cannot make us allocate it up front.
pub(crate) fn read_bytes(reader: &mut impl Read, max: Option<usize>) -> io::Result<Vec<u8>> {
    let len = read_u64(reader)?;
    if let Some(max) = max {
        if len > max as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a {len}-byte field where at most {max} bytes are allowed"),
            ));
        }
    }
    let mut bytes = Vec::new();
    reader.take(len).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(bytes)
}

/// A key count (CHECK, WAIT, MULTI_GET, MULTI_SET), refused past [`MAX_KEY_COUNT`].
pub(crate) fn read_count(reader: &mut impl Read) -> io::Result<usize> {
    let count = read_u64(reader)?;
    if count > MAX_KEY_COUNT as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{count} keys in one query where at most {MAX_KEY_COUNT} are allowed"),
        ));
    }
    Ok(count as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes torch 2.15's Python `TCPStore(is_master=False)` client sent to a recording
    /// socket for `set("key", b"val")` and `add("n", -7)` (its TCPStore puts "/" before keys).
    #[test]
    fn requests_match_bytes_torch_sends() {
        let set = Message::query(Query::Set)
            .bytes(b"/key")
            .bytes(b"val")
            .into_bytes();
        let mut expected = vec![1u8];
        expected.extend_from_slice(&4u64.to_le_bytes());
        expected.extend_from_slice(b"/key");
        expected.extend_from_slice(&3u64.to_le_bytes());
        expected.extend_from_slice(b"val");
        assert_eq!(set, expected);

        let add = Message::query(Query::Add).bytes(b"/n").i64(-7).into_bytes();
        let mut expected = vec![4u8];
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"/n");
        expected.extend_from_slice(&(-7i64).to_le_bytes());
        assert_eq!(add, expected);

        let validate = Message::query(Query::Validate)
            .u32(VALIDATION_MAGIC)
            .into_bytes();
        assert_eq!(validate, [0x00, 0xCE, 0xF7, 0x85, 0x3C]);
    }

    #[test]
    fn query_bytes_round_trip() {
        for byte in 0..=18u8 {
            assert_eq!(Query::from_byte(byte).map(|q| q as u8), Some(byte));
        }
        assert_eq!(Query::from_byte(19), None);
        assert_eq!(Query::from_byte(Query::Ping as u8), Some(Query::Ping));
    }

    #[test]
    fn byte_fields_round_trip_and_refuse_oversize() {
        let message = Message::default()
            .bytes(b"")
            .bytes(&[0xff, 0, 7])
            .into_bytes();
        let mut reader = &message[..];
        assert_eq!(read_bytes(&mut reader, Some(3)).unwrap(), b"");
        assert_eq!(read_bytes(&mut reader, Some(3)).unwrap(), [0xff, 0, 7]);

        let long = Message::default().bytes(&[1; 10]).into_bytes();
        let err = read_bytes(&mut &long[..], Some(9)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // A length that promises more than arrives.
        let truncated = Message::default().u64(1 << 40).into_bytes();
        let err = read_bytes(&mut &truncated[..], None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
