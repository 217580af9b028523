//! The value stored for one spooled event: the event itself (every attribute, header and the
//! payload), where it goes, and its forwarding state.
//!
//! The store is redb; this module only turns one record into bytes and back. The layout is
//! versioned (first byte) so a later release can read what an earlier one spooled.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use polybus_core::{Error, ErrorKind, Event, Result};

const VERSION: u8 = 1;
const BACKEND: &str = "spool";

/// What the forwarder does with a spooled record next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordState {
    /// Forward to the Kafka topic.
    Forward,
    /// Retries are exhausted: publish to the dead-letter topic.
    DeadLetter,
}

/// One spooled event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpoolRecord {
    /// The NATS subject the event was published to.
    pub(crate) subject: String,
    /// The Kafka topic it is forwarded to.
    pub(crate) topic: String,
    /// Forward attempts made so far (every failed attempt counts).
    pub(crate) attempts: u32,
    /// Failed attempts that count towards the dead-letter limit.
    pub(crate) failures: u32,
    /// When the event entered the spool, in milliseconds since the Unix epoch.
    pub(crate) enqueued_ms: u64,
    pub(crate) state: RecordState,
    /// The error of the last failed attempt, for `x-exception-message`.
    pub(crate) last_error: Option<String>,
    /// The kind of that error, for `x-exception-kind`.
    pub(crate) last_error_kind: Option<String>,
    pub(crate) event: Event,
}

impl SpoolRecord {
    /// A fresh record for `event`, enqueued now.
    pub(crate) fn new(subject: &str, topic: &str, event: Event) -> Self {
        SpoolRecord {
            subject: subject.to_owned(),
            topic: topic.to_owned(),
            attempts: 0,
            failures: 0,
            enqueued_ms: now_ms(),
            state: RecordState::Forward,
            last_error: None,
            last_error_kind: None,
            event,
        }
    }

    /// Encodes the record.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let ev = &self.event;
        let mut w = Writer(Vec::with_capacity(
            96 + self.subject.len() + self.topic.len() + ev.data().len() + ev.id().len(),
        ));
        w.u8(VERSION);
        w.u8(match self.state {
            RecordState::Forward => 0,
            RecordState::DeadLetter => 1,
        });
        w.u32(self.attempts);
        w.u32(self.failures);
        w.u64(self.enqueued_ms);
        w.str(&self.subject);
        w.str(&self.topic);
        w.opt_str(self.last_error.as_deref());
        w.opt_str(self.last_error_kind.as_deref());
        // The event.
        w.str(ev.id());
        w.opt_str(ev.has_source().then(|| ev.source()));
        let (neg, secs, nanos) = split_time(ev.time());
        w.u8(u8::from(neg));
        w.u64(secs);
        w.u32(nanos);
        w.opt_bytes(ev.key());
        w.str(ev.kind());
        w.opt_str(ev.content_type());
        w.u32(u32::try_from(ev.headers().len()).unwrap_or(u32::MAX));
        for (name, value) in ev.headers().iter() {
            w.str(name);
            w.str(value);
        }
        w.bytes(ev.data());
        w.0
    }

    /// Decodes a record written by [`encode`](Self::encode).
    ///
    /// # Errors
    /// [`ErrorKind::Codec`] for truncated or unknown input.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(codec(format!("unknown spool record version {version}")));
        }
        let state = match r.u8()? {
            0 => RecordState::Forward,
            1 => RecordState::DeadLetter,
            other => return Err(codec(format!("unknown spool record state {other}"))),
        };
        let attempts = r.u32()?;
        let failures = r.u32()?;
        let enqueued_ms = r.u64()?;
        let subject = r.string()?;
        let topic = r.string()?;
        let last_error = r.opt_string()?;
        let last_error_kind = r.opt_string()?;

        let id = r.string()?;
        let source = r.opt_string()?;
        let neg = r.u8()? != 0;
        let secs = r.u64()?;
        let nanos = r.u32()?;
        let key = r.opt_bytes()?;
        let kind = r.string()?;
        let content_type = r.opt_string()?;
        let n_headers = r.u32()?;
        let mut event = Event::new(Bytes::new());
        event.set_id(id);
        if let Some(source) = source {
            event.set_source(source);
        }
        event.set_time(join_time(neg, secs, nanos));
        event.set_key(key.map(Bytes::copy_from_slice));
        event.set_kind(kind);
        event.set_content_type(content_type.map(Into::into));
        for _ in 0..n_headers {
            let name = r.string()?;
            let value = r.string()?;
            // These headers were valid when the event was spooled.
            event.headers_mut().append_unchecked(name, value);
        }
        let data = r.bytes()?;
        event.set_data(Bytes::copy_from_slice(data));
        if r.pos != bytes.len() {
            return Err(codec("trailing bytes after a spool record"));
        }
        Ok(SpoolRecord {
            subject,
            topic,
            attempts,
            failures,
            enqueued_ms,
            state,
            last_error,
            last_error_kind,
            event,
        })
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn split_time(t: SystemTime) -> (bool, u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (false, d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            (true, d.as_secs(), d.subsec_nanos())
        }
    }
}

fn join_time(neg: bool, secs: u64, nanos: u32) -> SystemTime {
    let d = Duration::new(secs, nanos.min(999_999_999));
    let t = if neg {
        UNIX_EPOCH.checked_sub(d)
    } else {
        UNIX_EPOCH.checked_add(d)
    };
    t.unwrap_or(UNIX_EPOCH)
}

fn codec(msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Codec, BACKEND).with_message(msg)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        // Events are far below 4 GiB (brokers cap them at a few MiB).
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn opt_bytes(&mut self, v: Option<&[u8]>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.bytes(v);
            }
            None => self.u8(0),
        }
    }
    fn opt_str(&mut self, v: Option<&str>) {
        self.opt_bytes(v.map(str::as_bytes));
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| codec("truncated spool record"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| codec("a spool record string is not UTF-8"))
    }
    fn opt_bytes(&mut self) -> Result<Option<&'a [u8]>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes()?)),
            _ => Err(codec("bad option tag in a spool record")),
        }
    }
    fn opt_string(&mut self) -> Result<Option<String>> {
        match self.opt_bytes()? {
            None => Ok(None),
            Some(b) => String::from_utf8(b.to_vec())
                .map(Some)
                .map_err(|_| codec("a spool record string is not UTF-8")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_event() -> Event {
        Event::builder()
            .id("evt-1")
            .source("urn:test")
            .kind("order.created")
            .key("customer-7")
            .content_type("application/json")
            .header("tenant", "eu")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("X-Multi", "a")
            .header("x-multi", "b")
            .data(&b"{\"n\":1}"[..])
            .build()
            .expect("valid event")
    }

    #[test]
    fn round_trips_every_field() {
        let mut rec = SpoolRecord::new("orders.created", "orders.created", full_event());
        rec.attempts = 3;
        rec.failures = 2;
        rec.state = RecordState::DeadLetter;
        rec.last_error = Some("kafka: rejected: nope".into());
        rec.last_error_kind = Some("rejected".into());
        let back = SpoolRecord::decode(&rec.encode()).expect("decodes");
        assert_eq!(back, rec);
        assert_eq!(back.event.dedup_key(), "urn:test evt-1");
        assert_eq!(
            back.event.headers().get_all("x-multi").collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn keeps_an_unset_source_unset_and_times_before_the_epoch() {
        let mut ev = Event::new(b"raw");
        ev.set_time(UNIX_EPOCH - Duration::new(5, 7));
        let rec = SpoolRecord::new("s", "t", ev);
        let back = SpoolRecord::decode(&rec.encode()).expect("decodes");
        assert!(!back.event.has_source());
        assert_eq!(back.event.time(), UNIX_EPOCH - Duration::new(5, 7));
        assert_eq!(back, rec);
    }

    #[test]
    fn rejects_truncated_and_foreign_input_without_panicking() {
        let bytes = SpoolRecord::new("s", "t", full_event()).encode();
        for n in 0..bytes.len() {
            let err = SpoolRecord::decode(&bytes[..n]).expect_err("truncated");
            assert_eq!(err.kind(), ErrorKind::Codec);
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(SpoolRecord::decode(&extra).is_err());
        let mut other = bytes;
        other[0] = 99;
        assert!(SpoolRecord::decode(&other).is_err());
        assert!(SpoolRecord::decode(&[1, 0, 255, 255, 255, 255]).is_err());
    }
}
