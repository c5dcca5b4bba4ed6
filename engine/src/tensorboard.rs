//! TensorBoard event files written (and read back) without TensorFlow or a protobuf crate.
//!
//! An event file is a sequence of TFRecords — `u64 length`, masked CRC32C of the length, the
//! payload, masked CRC32C of the payload, all little-endian — whose payloads are `Event`
//! protobufs. We only ever write two kinds: the first record carries
//! `file_version = "brain.Event:2"`, every later one a `Summary` with scalar values. The
//! subset of `tensorflow/core/util/event.proto` and `summary.proto` used:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! The reader here parses only what the writer writes; it exists for tests and tooling.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The version string TensorBoard expects in a file's first event.
pub const FILE_VERSION: &str = "brain.Event:2";

// ---- CRC32C (Castagnoli) and TFRecord framing ----------------------------------------------

/// Lookup table for the reflected Castagnoli polynomial 0x82F63B78.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C of `data` (the checksum TFRecord uses).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC32C_TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotating and offsetting keeps a CRC of data that itself contains
/// CRCs from being degenerate.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// Frames `payload` as one TFRecord.
fn frame_record(payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(payload.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    record.extend_from_slice(payload);
    record.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    record
}

// ---- protobuf encoding ----------------------------------------------------------------------

const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(buf, (field << 3) | wire_type);
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// `Event` with `wall_time`, `step` and either a file version or a summary.
fn encode_event(wall_time: f64, step: i64, what: EventWhat<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    put_key(&mut buf, 1, WIRE_FIXED64);
    buf.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut buf, 2, WIRE_VARINT);
        // int64 is encoded as its two's-complement u64.
        put_varint(&mut buf, step as u64);
    }
    match what {
        EventWhat::FileVersion(version) => put_bytes(&mut buf, 3, version.as_bytes()),
        EventWhat::Scalar { tag, value } => {
            let mut value_msg = Vec::new();
            put_bytes(&mut value_msg, 1, tag.as_bytes());
            put_key(&mut value_msg, 2, WIRE_FIXED32);
            value_msg.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            put_bytes(&mut summary, 1, &value_msg);
            put_bytes(&mut buf, 5, &summary);
        }
    }
    buf
}

enum EventWhat<'a> {
    FileVersion(&'a str),
    Scalar { tag: &'a str, value: f32 },
}

// ---- writer ---------------------------------------------------------------------------------

/// Appends scalar events to one `events.out.tfevents.<secs>.<host>` file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

/// The machine's name for event file names: `/etc/hostname`, else "localhost".
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(['/', '\\']))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Seconds since the Unix epoch, as event wall times are recorded.
pub fn unix_time_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it named after `wall_time_secs` (the
    /// caller's clock, so that tests are deterministic) and this host, and writes the
    /// file-version event.
    pub fn create(dir: impl AsRef<Path>, wall_time_secs: f64) -> io::Result<Self> {
        Self::create_for_host(dir, wall_time_secs, &hostname())
    }

    /// [`EventWriter::create`] with an explicit host name.
    pub fn create_for_host(
        dir: impl AsRef<Path>,
        wall_time_secs: f64,
        host: &str,
    ) -> io::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}",
            wall_time_secs.floor() as i64
        ));
        let file = File::create(&path)?;
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        writer.write_event(&encode_event(
            wall_time_secs,
            0,
            EventWhat::FileVersion(FILE_VERSION),
        ))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `value` under `tag` (e.g. `train/loss`) at `step`; flushed at once, so a crash
    /// keeps everything written so far.
    pub fn add_scalar(
        &mut self,
        tag: &str,
        value: f32,
        step: i64,
        wall_time: f64,
    ) -> io::Result<()> {
        self.write_event(&encode_event(
            wall_time,
            step,
            EventWhat::Scalar { tag, value },
        ))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    fn write_event(&mut self, payload: &[u8]) -> io::Result<()> {
        self.file.write_all(&frame_record(payload))?;
        self.file.flush()
    }
}

// ---- reader ---------------------------------------------------------------------------------

/// One event as the writer wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// `(tag, simple_value)` pairs of the event's summary.
    pub scalars: Vec<(String, f32)>,
}

/// Why an event file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read event file: {0}")]
    Io(#[from] io::Error),
    #[error("record at byte {offset} is truncated")]
    Truncated { offset: usize },
    #[error("record at byte {offset}: {what} CRC mismatch")]
    BadCrc { offset: usize, what: &'static str },
    #[error("record at byte {offset}: malformed protobuf ({message})")]
    Malformed { offset: usize, message: String },
}

/// Splits a TFRecord stream into payloads, checking both CRCs of every record.
pub fn read_records(bytes: &[u8]) -> Result<Vec<&[u8]>, ReadError> {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        if rest.len() < 12 {
            return Err(ReadError::Truncated { offset });
        }
        let length_bytes = &rest[..8];
        let length = u64::from_le_bytes(length_bytes.try_into().expect("8 bytes")) as usize;
        let length_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        if masked_crc32c(length_bytes) != length_crc {
            return Err(ReadError::BadCrc {
                offset,
                what: "length",
            });
        }
        let end = length
            .checked_add(16)
            .filter(|&end| end <= rest.len())
            .ok_or(ReadError::Truncated { offset })?;
        let payload = &rest[12..12 + length];
        let data_crc = u32::from_le_bytes(rest[12 + length..end].try_into().expect("4 bytes"));
        if masked_crc32c(payload) != data_crc {
            return Err(ReadError::BadCrc {
                offset,
                what: "data",
            });
        }
        records.push(payload);
        offset += end;
    }
    Ok(records)
}

/// A cursor over one protobuf message.
struct ProtoReader<'a> {
    buf: &'a [u8],
}

/// A field's value, by wire type.
enum FieldValue<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

impl<'a> ProtoReader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!("field needs {n} bytes, {} left", self.buf.len()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn next_field(&mut self) -> Result<Option<(u64, FieldValue<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            WIRE_VARINT => FieldValue::Varint(self.varint()?),
            WIRE_FIXED64 => FieldValue::Fixed64(self.take(8)?.try_into().expect("8 bytes")),
            WIRE_LEN => {
                let n = self.varint()? as usize;
                FieldValue::Bytes(self.take(n)?)
            }
            WIRE_FIXED32 => FieldValue::Fixed32(self.take(4)?.try_into().expect("4 bytes")),
            other => return Err(format!("unsupported wire type {other}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn decode_value(bytes: &[u8]) -> Result<Option<(String, f32)>, String> {
    let mut reader = ProtoReader { buf: bytes };
    let (mut tag, mut value) = (None, None);
    while let Some((field, v)) = reader.next_field()? {
        match (field, v) {
            (1, FieldValue::Bytes(b)) => {
                tag = Some(String::from_utf8(b.to_vec()).map_err(|e| e.to_string())?)
            }
            (2, FieldValue::Fixed32(b)) => value = Some(f32::from_le_bytes(b)),
            _ => {}
        }
    }
    Ok(tag.zip(value))
}

fn decode_event(bytes: &[u8]) -> Result<Event, String> {
    let mut reader = ProtoReader { buf: bytes };
    let mut event = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        scalars: Vec::new(),
    };
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, FieldValue::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, FieldValue::Varint(v)) => event.step = v as i64,
            (3, FieldValue::Bytes(b)) => {
                event.file_version = Some(String::from_utf8(b.to_vec()).map_err(|e| e.to_string())?)
            }
            (5, FieldValue::Bytes(summary)) => {
                let mut summary = ProtoReader { buf: summary };
                while let Some((field, value)) = summary.next_field()? {
                    if let (1, FieldValue::Bytes(v)) = (field, value) {
                        event.scalars.extend(decode_value(v)?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(event)
}

/// Every event of an event file, checking CRCs.
pub fn read_events(path: impl AsRef<Path>) -> Result<Vec<Event>, ReadError> {
    let bytes = std::fs::read(path)?;
    let mut offset = 0;
    read_records(&bytes)?
        .into_iter()
        .map(|payload| {
            let event =
                decode_event(payload).map_err(|message| ReadError::Malformed { offset, message });
            offset += payload.len() + 16;
            event
        })
        .collect()
}

/// A scalar as read back: `(step, wall_time, value)`.
pub type ScalarPoint = (i64, f64, f32);

/// The scalar series of an event file by tag, in file order.
pub fn read_scalars(
    path: impl AsRef<Path>,
) -> Result<std::collections::BTreeMap<String, Vec<ScalarPoint>>, ReadError> {
    let mut series = std::collections::BTreeMap::<String, Vec<ScalarPoint>>::new();
    for event in read_events(path)? {
        for (tag, value) in event.scalars {
            series
                .entry(tag)
                .or_default()
                .push((event.step, event.wall_time, value));
        }
    }
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("whet-tb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 B.4 test vectors.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn first_record_matches_tensorflow_bytes() {
        // The file-version event for wall time 0 as TensorFlow's writer frames it:
        // payload = 09 <8 zero bytes> 1A 0D "brain.Event:2".
        let payload = encode_event(0.0, 0, EventWhat::FileVersion(FILE_VERSION));
        let mut expected = vec![0x09];
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[0x1A, 13]);
        expected.extend_from_slice(b"brain.Event:2");
        assert_eq!(payload, expected);
        let record = frame_record(&payload);
        assert_eq!(record.len(), payload.len() + 16);
        assert_eq!(read_records(&record).unwrap(), vec![payload.as_slice()]);
    }

    #[test]
    fn scalars_round_trip_with_names_and_steps() {
        let dir = temp_dir("roundtrip");
        let mut writer = EventWriter::create_for_host(&dir, 1_700_000_000.25, "testhost").unwrap();
        assert_eq!(
            writer.path().file_name().unwrap().to_str().unwrap(),
            "events.out.tfevents.1700000000.testhost"
        );
        writer
            .add_scalar("train/loss", 2.5, 1, 1_700_000_001.5)
            .unwrap();
        writer
            .add_scalar("train/learning_rate", 1e-4, 1, 1_700_000_001.5)
            .unwrap();
        writer
            .add_scalar("train/loss", 1.25, 300, 1_700_000_002.0)
            .unwrap();
        writer.add_scalar("eval/loss", -0.5, -3, 0.0).unwrap();
        // No explicit flush: every record is already on disk.
        let events = read_events(writer.path()).unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert_eq!(events[0].wall_time, 1_700_000_000.25);
        assert_eq!(events[1].scalars, vec![("train/loss".to_string(), 2.5f32)]);
        let scalars = read_scalars(writer.path()).unwrap();
        assert_eq!(
            scalars["train/loss"],
            vec![(1, 1_700_000_001.5, 2.5), (300, 1_700_000_002.0, 1.25)]
        );
        assert_eq!(
            scalars["train/learning_rate"],
            vec![(1, 1_700_000_001.5, 1e-4)]
        );
        assert_eq!(scalars["eval/loss"], vec![(-3, 0.0, -0.5)]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn corruption_is_detected() {
        let dir = temp_dir("corrupt");
        let mut writer = EventWriter::create_for_host(&dir, 10.0, "h").unwrap();
        writer.add_scalar("train/loss", 1.0, 1, 11.0).unwrap();
        let mut bytes = std::fs::read(writer.path()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 0x40;
        assert!(matches!(
            read_records(&bytes),
            Err(ReadError::BadCrc { what: "data", .. })
        ));
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(
            read_records(&bytes),
            Err(ReadError::Truncated { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }
}
