//! Shared pieces of the polybus fuzz targets: the input formats (how a target reads a message
//! out of the fuzzer's bytes, and how the seed generator writes real messages in the same
//! form), the checks every round trip makes, and the seed corpus generator.
//!
//! Input formats (one per target family, see fuzz/README.md):
//!
//! * NATS: the message as the server delivers it in an `HMSG`: the header block
//!   (`NATS/1.0\r\nName: value\r\n...\r\n\r\n`) followed by the payload. Input that does not
//!   start with `NATS/1.0` is a message without headers (an `MSG`).
//! * Kafka, MQTT 5: length-prefixed frames ([`Frames`]): a `u16` little-endian length, then
//!   that many bytes; the length `0xFFFF` is a null (a header without a value, no content
//!   type). A truncated last frame takes what is left.
//! * everything else: the bytes as they are (spool record) or as UTF-8 text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use polybus_core::{ErrorKind, Event};
use polybus_nats::async_nats::{HeaderMap, HeaderName, HeaderValue};

/// The frame length that stands for "no value".
pub const NULL: u16 = u16::MAX;

/// Reads length-prefixed frames.
#[derive(Debug)]
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Frames<'a> {
    /// Frames of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Frames { rest: data }
    }

    /// The next frame: `None` at the end of the input, `Some(None)` for a null.
    pub fn next_frame(&mut self) -> Option<Option<&'a [u8]>> {
        let (len, rest) = match self.rest {
            [] => return None,
            [only] => (u16::from(*only), &[][..]),
            [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        };
        if len == NULL {
            self.rest = rest;
            return Some(None);
        }
        let n = usize::from(len).min(rest.len());
        let (frame, rest) = rest.split_at(n);
        self.rest = rest;
        Some(Some(frame))
    }

    /// The next frame, a null or missing one as empty.
    pub fn bytes(&mut self) -> &'a [u8] {
        self.next_frame().flatten().unwrap_or_default()
    }

    /// The first 8 bytes of the next frame as a little-endian `i64`, if it has them.
    pub fn i64(&mut self) -> Option<i64> {
        let b = self.next_frame().flatten()?;
        Some(i64::from_le_bytes(b.get(..8)?.try_into().ok()?))
    }
}

/// Writes length-prefixed frames (the seed generator's side of [`Frames`]).
#[derive(Debug, Default)]
pub struct FrameWriter(pub Vec<u8>);

impl FrameWriter {
    /// Appends a frame (`None`: a null). Frames longer than 65,534 bytes are cut.
    pub fn frame(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.0.extend_from_slice(&NULL.to_le_bytes()),
            Some(v) => {
                let v = &v[..v.len().min(usize::from(NULL) - 1)];
                let len = u16::try_from(v.len()).unwrap_or(NULL - 1);
                self.0.extend_from_slice(&len.to_le_bytes());
                self.0.extend_from_slice(v);
            }
        }
        self
    }
}

/// Splits a NATS message (see the module docs) into its header map and payload. `None` when
/// the header block is one the client refuses (it drops the connection; nothing is decoded).
///
/// The parsing is async-nats 0.51's (`Connection::try_read_op`, `HMSG`): UTF-8, a
/// `NATS/1.0` version line, `Name: value` lines, values trimmed, continuation lines (starting
/// with whitespace) appended, empty lines skipped. That parser is private to the client.
pub fn nats_message(data: &[u8]) -> Option<(Option<HeaderMap>, Bytes)> {
    if !data.starts_with(b"NATS/1.0") {
        return Some((None, Bytes::copy_from_slice(data)));
    }
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(data.len(), |i| i + 4);
    let (block, payload) = data.split_at(end);
    let text = std::str::from_utf8(block).ok()?;
    let mut lines = text.lines().peekable();
    let version = lines.next()?.strip_prefix("NATS/1.0")?.trim();
    if !version.is_empty() {
        // A status line (`NATS/1.0 503`): the client makes it a status message, never an event.
        return None;
    }
    let mut headers = HeaderMap::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':')?;
        let name: HeaderName = name.parse().ok()?;
        let mut value = value.trim_start().to_owned();
        while let Some(v) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(v);
        }
        value.truncate(value.trim_end().len());
        let value: HeaderValue = value.parse().ok()?;
        headers.append(name, value);
    }
    Some((Some(headers), Bytes::copy_from_slice(payload)))
}

/// A NATS message as the server delivers it (async-nats's `HeaderMap::to_bytes` layout, which is
/// private to the client), headers and payload.
pub fn nats_wire(headers: &HeaderMap, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    if !headers.is_empty() {
        buf.extend_from_slice(b"NATS/1.0\r\n");
        for (name, values) in headers.iter() {
            for v in values {
                buf.extend_from_slice(AsRef::<str>::as_ref(name).as_bytes());
                buf.extend_from_slice(b": ");
                buf.extend_from_slice(v.as_str().as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
        }
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(payload);
    buf
}

/// The latest time the CloudEvents `time` attribute can hold: 9999-12-31T23:59:59.999999Z.
pub fn latest() -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(253_402_300_799_999_999)
}

/// `t` as the CloudEvents `time` attribute keeps it: microseconds, clamped to 1970..=9999.
pub fn micros(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => u64::try_from(d.as_micros())
            .ok()
            .and_then(|us| UNIX_EPOCH.checked_add(Duration::from_micros(us)))
            .map_or(latest(), |t| t.min(latest())),
        Err(_) => UNIX_EPOCH,
    }
}

/// `ev` as it looks after one trip through a binding that writes `time` as text.
pub fn normalized(ev: &Event) -> Event {
    let mut ev = ev.clone();
    ev.set_time(micros(ev.time()));
    ev
}

/// Panics (the fuzzer's crash) unless `a` and `b` are the same event, field by field, so the
/// report names the field.
///
/// `how` says what the trip may change without losing anything: the order of the values of
/// one header name (NATS: async-nats keeps headers in a hash map, so `ce-x` and a repeated
/// plain `x` come back in either order), and the bytes of a JSON payload that structured mode
/// embeds as a JSON value (compared as JSON).
#[track_caller]
pub fn assert_same_event(what: &str, how: Same, a: &Event, b: &Event) {
    assert_eq!(a.id(), b.id(), "{what}: id");
    assert_eq!(a.source(), b.source(), "{what}: source");
    assert_eq!(a.kind(), b.kind(), "{what}: type");
    assert_eq!(a.time(), b.time(), "{what}: time");
    assert_eq!(a.key(), b.key(), "{what}: key");
    assert_eq!(a.content_type(), b.content_type(), "{what}: content type");
    // Names match case-insensitively (a client may write a standard header in its own case);
    // order between different names is not part of the contract, order within a name is.
    let sorted = |ev: &Event| {
        let mut h: Vec<(String, String)> = ev
            .headers()
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
            .collect();
        if how.header_order {
            h.sort_by(|x, y| x.0.cmp(&y.0));
        } else {
            h.sort();
        }
        h
    };
    let (ha, hb) = (sorted(a), sorted(b));
    assert_eq!(ha, hb, "{what}: headers");
    let json = how.json_data
        && !a.data().is_empty()
        && a.content_type()
            .is_some_and(polybus_core::cloudevents::is_json_content_type);
    if json {
        // Structured mode embeds a JSON payload as it is, less surrounding whitespace: the
        // bytes come back (numbers keep every digit).
        assert_eq!(a.data().trim_ascii(), &b.data()[..], "{what}: JSON data");
    } else {
        assert_eq!(a.data(), b.data(), "{what}: data");
    }
}

/// What a round trip may change (see [`assert_same_event`]).
#[derive(Debug, Clone, Copy)]
pub struct Same {
    /// The values of one header name keep their order.
    pub header_order: bool,
    /// A JSON payload may lose surrounding whitespace (it is embedded in a JSON document).
    pub json_data: bool,
}

/// Panics unless a decode error is one the decoders promise: a typed [`ErrorKind::Codec`].
#[track_caller]
pub fn assert_decode_error(what: &str, e: &polybus_core::Error) {
    assert_eq!(e.kind(), ErrorKind::Codec, "{what}: decode error {e:?}");
}

/// Panics unless an encode error is a typed refusal ([`ErrorKind::InvalidHeader`] for a
/// header the binding cannot carry, [`ErrorKind::Codec`] for a payload it cannot embed).
#[track_caller]
pub fn assert_encode_error(what: &str, e: &polybus_core::Error) {
    assert!(
        matches!(e.kind(), ErrorKind::InvalidHeader | ErrorKind::Codec),
        "{what}: encode error {e:?}"
    );
}

pub mod check;
pub mod seeds;
