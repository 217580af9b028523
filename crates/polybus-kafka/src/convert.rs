//! Event <-> Kafka record, following the CloudEvents Kafka protocol binding (private).
//!
//! Binary mode: each CloudEvents attribute travels as a header `ce_<name>` (`ce_id`,
//! `ce_source`, `ce_type`, `ce_time`, `ce_specversion`, `ce_partitionkey`, extensions),
//! `datacontenttype` as the `content-type` header, the payload as the record value as-is.
//! Structured mode: the value is an `application/cloudevents+json` document and the
//! `content-type` header says so. In both modes the event key is the record key and headers
//! that are not extensions travel as plain Kafka headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use polybus_core::cloudevents::{self, BinaryDecoder, Mode};
use polybus_core::{Error, ErrorKind, Event, Result};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message, OwnedHeaders};

use crate::config::KeyMapper;
use crate::error::BACKEND;

/// The prefix of CloudEvents attribute headers.
pub(crate) const CE_PREFIX: &str = "ce_";
/// The header carrying `datacontenttype`.
pub(crate) const CONTENT_TYPE: &str = "content-type";

/// A record ready for the producer.
pub(crate) struct Encoded {
    pub(crate) key: Option<Bytes>,
    pub(crate) value: Bytes,
    /// `None` for a record without headers (a lean record of a bare event): librdkafka then
    /// allocates no header list for it.
    pub(crate) headers: Option<OwnedHeaders>,
    /// key + value + header names and values, in bytes.
    pub(crate) size: usize,
}

fn push(headers: OwnedHeaders, size: &mut usize, name: &str, value: &str) -> OwnedHeaders {
    *size += name.len() + value.len();
    headers.insert(Header {
        key: name,
        value: Some(value),
    })
}

/// The header of a known CloudEvents attribute (`datacontenttype` is `content-type`); `None`
/// for extensions, which get `ce_<name>`.
fn attribute_header(attribute: &str) -> Option<&'static str> {
    Some(match attribute {
        "specversion" => "ce_specversion",
        "id" => "ce_id",
        "source" => "ce_source",
        "type" => "ce_type",
        "time" => "ce_time",
        "datacontenttype" => CONTENT_TYPE,
        "partitionkey" => "ce_partitionkey",
        "subject" => "ce_subject",
        "dataschema" => "ce_dataschema",
        _ => return None,
    })
}

/// Refuses a plain header the binding cannot carry as it is: `content-type` (the decoder reads
/// the first one as the content type and mode), in binary mode a `ce_*` name (the decoder
/// reads it as an attribute), and a name with a NUL byte (librdkafka cuts header names there).
fn check_plain(name: &str, mode: Mode) -> Result<()> {
    let why = if name.eq_ignore_ascii_case(CONTENT_TYPE)
        || (mode != Mode::Structured && name.starts_with(CE_PREFIX))
    {
        "is reserved by the CloudEvents Kafka binding; use an extension name (lowercase letters \
         and digits) or the event's content type"
    } else if name.contains('\0') {
        "contains a NUL byte, which Kafka header names cannot carry"
    } else {
        return Ok(());
    };
    Err(Error::new(ErrorKind::InvalidHeader, BACKEND)
        .with_message(format!("header {name:?} {why}")))
}

/// Encodes `ev` for the wire in `mode`, the record key chosen by `keys`.
///
/// # Errors
/// [`ErrorKind::InvalidHeader`] for a plain header the binding cannot carry ([`check_plain`]);
/// [`ErrorKind::Codec`] when structured mode cannot embed the payload.
pub(crate) fn encode(ev: &Event, mode: Mode, keys: &KeyMapper) -> Result<Encoded> {
    let key = keys.key(ev);
    let mut size = key.as_ref().map_or(0, Bytes::len);
    let mut headers = OwnedHeaders::new_with_capacity(8 + ev.headers().len());
    let value = match mode {
        Mode::Structured => {
            let (doc, plain) = cloudevents::to_structured(ev, BACKEND)?;
            headers = push(
                headers,
                &mut size,
                CONTENT_TYPE,
                cloudevents::STRUCTURED_CONTENT_TYPE,
            );
            for (n, v) in plain {
                check_plain(n, Mode::Structured)?;
                headers = push(headers, &mut size, n, v);
            }
            Bytes::from(doc)
        }
        _ => {
            // Attributes go straight into the headers (no intermediate strings, static names
            // for the known ones: this runs for every record); plain headers, rare, follow
            // them as before.
            let state = std::cell::RefCell::new((Some(headers), size, String::with_capacity(24)));
            let mut plain: Vec<(String, String)> = Vec::new();
            cloudevents::write_binary(
                ev,
                |n, v| {
                    let (headers, size, buf) = &mut *state.borrow_mut();
                    let name = match attribute_header(n) {
                        // A content type the consumer would take for structured mode travels
                        // as `ce_datacontenttype` (as NATS uses `ce-datacontenttype`).
                        Some(CONTENT_TYPE) if cloudevents::is_structured_content_type(v) => {
                            "ce_datacontenttype"
                        }
                        Some(name) => name,
                        None => {
                            buf.clear();
                            buf.push_str(CE_PREFIX);
                            buf.push_str(n);
                            buf.as_str()
                        }
                    };
                    if let Some(h) = headers.take() {
                        *headers = Some(push(h, size, name, v));
                    }
                },
                |n, v| plain.push((n.to_owned(), v.to_owned())),
            );
            for (n, _) in &plain {
                check_plain(n, Mode::Binary)?;
            }
            let (written, written_size, _) = state.into_inner();
            headers = written.unwrap_or_default();
            size = written_size;
            for (n, v) in &plain {
                headers = push(headers, &mut size, n, v);
            }
            ev.data().clone()
        }
    };
    size += value.len();
    Ok(Encoded {
        key,
        value,
        headers: Some(headers),
        size,
    })
}

/// Encodes `ev` in the lean wire format ([`WireFormat::Lean`](polybus_core::cloudevents::WireFormat)):
/// the payload as the value, the record key chosen by `keys`, the event's headers as plain
/// Kafka headers and the content type as `content-type` (as `ce_datacontenttype` when it is
/// one the consumer would take for structured mode); no `ce_*` attribute. An event with no
/// header and no content type gives a record without headers.
///
/// # Errors
/// [`ErrorKind::InvalidHeader`] for a header the binding reserves (`content-type`, `ce_*`) or
/// one Kafka cannot carry ([`check_plain`]).
pub(crate) fn encode_lean(ev: &Event, keys: &KeyMapper) -> Result<Encoded> {
    let key = keys.key(ev);
    let value = ev.data().clone();
    let mut size = key.as_ref().map_or(0, Bytes::len) + value.len();
    let content_type = ev.content_type();
    if ev.headers().is_empty() && content_type.is_none() {
        // The hot path: nothing but the value and the key.
        return Ok(Encoded {
            key,
            value,
            headers: None,
            size,
        });
    }
    let mut headers = OwnedHeaders::new_with_capacity(1 + ev.headers().len());
    for (n, v) in ev.headers().iter() {
        check_plain(n, Mode::Binary)?;
        headers = push(headers, &mut size, n, v);
    }
    if let Some(ct) = content_type {
        let name = if cloudevents::is_structured_content_type(ct) {
            "ce_datacontenttype"
        } else {
            CONTENT_TYPE
        };
        headers = push(headers, &mut size, name, ct);
    }
    Ok(Encoded {
        key,
        value,
        headers: Some(headers),
        size,
    })
}

/// Where a record sits in the log: what names a record written by a plain Kafka client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

impl Origin<'_> {
    /// The id of a record without CloudEvents attributes: `kafka:<topic>:<partition>:<offset>`,
    /// the same for every copy of the record (a redelivery, another group, a replay), so
    /// consumer-side dedup works for it too. Topic names are `[a-zA-Z0-9._-]`, so the id has
    /// no control characters and no `:` besides the separators.
    ///
    /// Written by hand, not with `format!` (this runs for every such record received).
    pub(crate) fn id(&self) -> String {
        let mut id = String::with_capacity(6 + self.topic.len() + 2 + 11 + 20);
        id.push_str("kafka:");
        id.push_str(self.topic);
        id.push(':');
        push_decimal(&mut id, i64::from(self.partition));
        id.push(':');
        push_decimal(&mut id, self.offset);
        id
    }

    /// The source of such a record: `kafka:<topic>`.
    pub(crate) fn source(&self) -> String {
        ["kafka:", self.topic].concat()
    }
}

/// Appends `n` in decimal, as `Display` writes it.
fn push_decimal(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        // `v % 10` is below 10: the cast keeps it.
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// Decodes a received record into an event. A record without `ce_specversion` (written by a
/// plain Kafka client) becomes an event with the id and source of its position
/// ([`Origin::id`], [`Origin::source`]), the record timestamp as its time and every header
/// kept as a plain header.
pub(crate) fn decode(msg: &BorrowedMessage<'_>) -> Result<Event> {
    let payload = Bytes::copy_from_slice(msg.payload().unwrap_or_default());
    let key = msg.key().map(Bytes::copy_from_slice);
    let headers: Vec<(&str, Option<&[u8]>)> = msg
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    let origin = Origin {
        topic: msg.topic(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    decode_parts(payload, key, &headers, msg.timestamp().to_millis(), &origin)
}

/// Decodes a record from its parts. CloudEvents headers (`ce_*`, `content-type`) must be UTF-8
/// as the binding requires (a `Codec` error otherwise); other headers that are not UTF-8 are
/// kept with U+FFFD in place of the invalid bytes. A record that is not a CloudEvent (no
/// `ce_specversion`, not structured) is named by `origin`.
pub(crate) fn decode_parts(
    payload: Bytes,
    key: Option<Bytes>,
    headers: &[(&str, Option<&[u8]>)],
    timestamp_ms: Option<i64>,
    origin: &Origin<'_>,
) -> Result<Event> {
    let strict = |name: &str, value: Option<&[u8]>| -> Result<String> {
        std::str::from_utf8(value.unwrap_or_default())
            .map(str::to_owned)
            .map_err(|_| {
                Error::new(ErrorKind::Codec, BACKEND)
                    .with_message(format!("header {name:?} is not UTF-8"))
            })
    };
    let lossy =
        |value: Option<&[u8]>| String::from_utf8_lossy(value.unwrap_or_default()).into_owned();
    let mut content_type = None;
    for (n, v) in headers {
        if n.eq_ignore_ascii_case(CONTENT_TYPE) {
            content_type = Some(strict(n, *v)?);
            break;
        }
    }
    if content_type
        .as_deref()
        .is_some_and(cloudevents::is_structured_content_type)
    {
        let mut ev = cloudevents::from_structured(&payload, BACKEND)?;
        if key.is_some() {
            ev.set_key(key);
        }
        for (n, v) in headers {
            if !n.eq_ignore_ascii_case(CONTENT_TYPE) {
                ev.headers_mut().append_unchecked(*n, lossy(*v));
            }
        }
        return Ok(ev);
    }
    let mut dec = BinaryDecoder::new();
    let (mut has_time, mut cloudevent) = (false, false);
    for (n, v) in headers {
        if let Some(attr) = n.strip_prefix(CE_PREFIX) {
            has_time |= attr == "time";
            cloudevent |= attr == "specversion";
            dec.attribute(attr, strict(n, *v)?);
        } else if n.eq_ignore_ascii_case(CONTENT_TYPE) {
            dec.content_type(strict(n, *v)?);
        } else {
            dec.header(*n, lossy(*v));
        }
    }
    if let Some(k) = key {
        dec.key(k);
    }
    let mut ev = dec.finish(payload, BACKEND)?;
    if !cloudevent {
        // A plain producer's record: the decoder gave it a fresh id, which a redelivered copy
        // would not share. Its position names it instead.
        ev.set_id(origin.id());
        ev.set_source(origin.source());
    }
    // A plain record's `ce_time`, if any, is not an attribute: the record time is its time.
    if (!has_time || !cloudevent)
        && let Some(ms) = timestamp_ms.and_then(|ms| u64::try_from(ms).ok())
    {
        ev.set_time(UNIX_EPOCH + Duration::from_millis(ms));
    }
    Ok(ev)
}

/// Milliseconds since the epoch for a record timestamp.
pub(crate) fn millis(t: SystemTime) -> Option<i64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_ids_are_written_as_display_writes_them() {
        for (partition, offset) in [
            (0, 0),
            (2, 9),
            (10, 1_234_567),
            (i32::MAX, i64::MAX),
            (-1, -1),
            (i32::MIN, i64::MIN),
        ] {
            let o = Origin {
                topic: "orders.eu",
                partition,
                offset,
            };
            assert_eq!(o.id(), format!("kafka:orders.eu:{partition}:{offset}"));
        }
        let o = Origin {
            topic: "t",
            partition: 0,
            offset: 0,
        };
        assert_eq!(o.source(), "kafka:t");
    }

    fn names(h: &Option<OwnedHeaders>) -> Vec<(String, String)> {
        h.iter()
            .flat_map(|h| h.iter())
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect()
    }

    const AT: Origin<'static> = Origin {
        topic: "orders.v1",
        partition: 2,
        offset: 41,
    };

    fn raw(h: &[(String, String)]) -> Vec<(&str, Option<&[u8]>)> {
        h.iter()
            .map(|(n, v)| (n.as_str(), Some(v.as_bytes())))
            .collect()
    }

    fn sample() -> Event {
        Event::builder()
            .id("id-1")
            .source("urn:t")
            .kind("order.created")
            .key("k1")
            .content_type("application/json")
            .header("tenant", "eu")
            .header("X-Req", "r")
            .data(&br#"{"a":1}"#[..])
            .build()
            .unwrap()
    }

    #[test]
    fn binary_mode_uses_the_kafka_binding_names() {
        let ev = sample();
        let enc = encode(&ev, Mode::Binary, &KeyMapper::EventKey).unwrap();
        let h = names(&enc.headers);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("ce_specversion"), Some("1.0"));
        assert_eq!(get("ce_id"), Some("id-1"));
        assert_eq!(get("ce_source"), Some("urn:t"));
        assert_eq!(get("ce_type"), Some("order.created"));
        assert!(get("ce_time").is_some());
        assert_eq!(get("ce_partitionkey"), Some("k1"));
        assert_eq!(get("ce_tenant"), Some("eu"));
        assert_eq!(get("content-type"), Some("application/json"));
        assert_eq!(get("X-Req"), Some("r"));
        assert_eq!(enc.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(enc.value, ev.data());
        // Attributes in write_binary's order, then the plain headers; the size counts them.
        let order: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            order,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_time",
                "content-type",
                "ce_partitionkey",
                "ce_tenant",
                "X-Req"
            ]
        );
        let counted: usize = h.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(enc.size, counted + 2 + ev.data().len());

        let hv = raw(&h);
        let back = decode_parts(enc.value.clone(), enc.key.clone(), &hv, None, &AT).unwrap();
        assert_eq!(back.id(), "id-1");
        assert_eq!(back.kind(), "order.created");
        assert_eq!(back.key(), Some(&b"k1"[..]));
        assert_eq!(back.content_type(), Some("application/json"));
        assert_eq!(back.headers().get("tenant"), Some("eu"));
        assert_eq!(back.headers().get("x-req"), Some("r"));
    }

    /// An event whose data is itself a CloudEvent (`application/cloudevents+json`) in binary
    /// mode: a `content-type` header with that type would make the consumer read the value as
    /// a structured event, so the type travels as `ce_datacontenttype`.
    #[test]
    fn binary_mode_carries_a_structured_content_type_as_an_attribute() {
        let mut ev = sample();
        ev.set_content_type(Some("application/cloudevents+json".into()));
        ev.set_data(&b"not an event"[..]);
        let enc = encode(&ev, Mode::Binary, &KeyMapper::EventKey).unwrap();
        let h = names(&enc.headers);
        assert!(!h.iter().any(|(n, _)| n == CONTENT_TYPE), "{h:?}");
        let back = decode_parts(enc.value, enc.key, &raw(&h), None, &AT).unwrap();
        assert_eq!(back.content_type(), Some("application/cloudevents+json"));
        assert_eq!(back.data(), "not an event");
        assert_eq!(back.id(), ev.id());
    }

    /// Found by the `header` fuzz target: a plain header `ce_-` came back as the header `-`
    /// (read as an attribute), a plain `content-type` as the content type, and a name with a
    /// NUL byte cut short by librdkafka. They are refused instead.
    #[test]
    fn plain_headers_the_binding_cannot_carry_are_refused() {
        let with = |name: &str| {
            let mut ev = sample();
            ev.headers_mut().append_unchecked(name, "x");
            ev
        };
        for (name, modes) in [
            ("ce_-", &[Mode::Binary][..]),
            ("ce_id", &[Mode::Binary]),
            ("content-type", &[Mode::Binary, Mode::Structured]),
            ("Content-Type", &[Mode::Binary, Mode::Structured]),
            ("a\0b", &[Mode::Binary, Mode::Structured]),
        ] {
            for mode in modes {
                let e = encode(&with(name), *mode, &KeyMapper::EventKey)
                    .err()
                    .unwrap_or_else(|| panic!("{name:?} {mode:?} encoded"));
                assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{name:?} {mode:?}");
            }
        }
        // A structured record keeps `ce_*` plain headers as they are.
        let ev = with("ce_note");
        let enc = encode(&ev, Mode::Structured, &KeyMapper::EventKey).unwrap();
        let h = names(&enc.headers);
        let back = decode_parts(enc.value, enc.key, &raw(&h), None, &AT).unwrap();
        assert_eq!(back.headers().get("ce_note"), Some("x"));
    }

    #[test]
    fn structured_mode_round_trips() {
        let ev = sample();
        let enc = encode(&ev, Mode::Structured, &KeyMapper::EventKey).unwrap();
        let h = names(&enc.headers);
        assert!(h.contains(&("content-type".into(), "application/cloudevents+json".into())));
        let hv = raw(&h);
        let back = decode_parts(enc.value.clone(), enc.key.clone(), &hv, None, &AT).unwrap();
        assert_eq!(back.id(), "id-1");
        assert_eq!(back.data(), ev.data());
        assert_eq!(back.headers().get("X-Req"), Some("r"));
        assert_eq!(back.key(), Some(&b"k1"[..]));
    }

    #[test]
    fn raw_records_become_plain_events_with_the_record_time() {
        let ev = decode_parts(
            Bytes::from_static(b"raw"),
            Some(Bytes::from_static(b"k")),
            &[("trace", Some(&b"1"[..]))],
            Some(1_700_000_000_000),
            &AT,
        )
        .unwrap();
        assert_eq!(ev.data(), &Bytes::from_static(b"raw"));
        assert_eq!(ev.key(), Some(&b"k"[..]));
        assert_eq!(ev.headers().get("trace"), Some("1"));
        assert_eq!(millis(ev.time()), Some(1_700_000_000_000));
    }

    #[test]
    fn raw_records_are_named_by_their_position_every_time() {
        let decode = |at: &Origin<'_>| {
            decode_parts(
                Bytes::from_static(b"raw"),
                None,
                &[("ce_time", Some(&b"not a time"[..]))],
                Some(1_700_000_000_000),
                at,
            )
            .unwrap()
        };
        let first = decode(&AT);
        assert_eq!(first.id(), "kafka:orders.v1:2:41");
        assert_eq!(first.source(), "kafka:orders.v1");
        assert!(first.has_source());
        first.validate().unwrap();
        // The same record decoded again (a redelivery, another group) is the same event.
        let again = decode(&AT);
        assert_eq!(again.id(), first.id());
        assert_eq!(again.dedup_key(), first.dedup_key());
        // The record time wins over a plain record's `ce_time` header.
        assert_eq!(millis(first.time()), Some(1_700_000_000_000));
        // Another offset, partition or topic is another event.
        for other in [
            Origin { offset: 42, ..AT },
            Origin { partition: 1, ..AT },
            Origin {
                topic: "orders.v2",
                ..AT
            },
        ] {
            assert_ne!(decode(&other).dedup_key(), first.dedup_key(), "{other:?}");
        }
        // A CloudEvent keeps its own id and source, binary or structured.
        let ev = sample();
        for mode in [Mode::Binary, Mode::Structured] {
            let enc = encode(&ev, mode, &KeyMapper::EventKey).unwrap();
            let h = names(&enc.headers);
            let back = decode_parts(enc.value.clone(), None, &raw(&h), None, &AT).unwrap();
            assert_eq!((back.id(), back.source()), ("id-1", "urn:t"), "{mode:?}");
        }
    }

    mod props {
        //! Property tests of the CloudEvents Kafka binding: arbitrary events round-trip
        //! through binary and structured mode with every attribute, and decoding arbitrary
        //! headers, keys and values never panics. 10,000 cases each.

        use super::*;
        use polybus_testkit::strategies::{self, EventCase, EventCases, assert_same};
        use proptest::prelude::*;

        /// Events as Kafka carries them: a key of any bytes (the record key), Avro among the
        /// content types, and `{"n":<i64>}` as structured JSON data (so the data round-trips
        /// to the same bytes).
        fn case() -> impl Strategy<Value = EventCase> {
            EventCases {
                key: strategies::bytes_key().boxed(),
                content_type: strategies::content_type(&[
                    "application/json",
                    "text/plain; charset=utf-8",
                    "application/octet-stream",
                    "application/avro",
                ]),
                json: strategies::json_number().boxed(),
                ..EventCases::default()
            }
            .strategy()
        }

        fn round_trip(sent: &Event, mode: Mode) -> Result<(), TestCaseError> {
            let enc = encode(sent, mode, &KeyMapper::EventKey).expect("encodes");
            if mode == Mode::Binary {
                prop_assert_eq!(enc.value.as_ptr(), sent.data().as_ptr(), "value not copied");
            }
            let h = names(&enc.headers);
            let got = decode_parts(enc.value.clone(), enc.key.clone(), &raw(&h), None, &AT)
                .expect("decodes");
            // The record key is the event key; the data is the same bytes in both modes.
            assert_same(sent, &got, false)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            #[test]
            fn binary_mode_round_trips_every_attribute(c in case()) {
                round_trip(&c.event(Mode::Binary), Mode::Binary)?;
            }

            #[test]
            fn structured_mode_round_trips_every_attribute(c in case()) {
                round_trip(&c.event(Mode::Structured), Mode::Structured)?;
            }

            #[test]
            fn partition_key_mapper_uses_the_attribute_and_keeps_it(c in case()) {
                let ev = c.event(Mode::Binary);
                let enc = encode(&ev, Mode::Binary, &KeyMapper::PartitionKey).expect("encodes");
                let attr = names(&enc.headers)
                    .into_iter()
                    .find(|(n, _)| n == "ce_partitionkey")
                    .map(|(_, v)| v);
                prop_assert_eq!(enc.key.as_deref(), attr.as_deref().map(str::as_bytes));
            }

            #[test]
            fn decoding_arbitrary_records_never_panics(
                headers in prop::collection::vec(
                    (
                        prop_oneof![
                            "ce_(specversion|id|source|type|time|partitionkey|[a-z]{1,6})",
                            Just("content-type".to_owned()),
                            "[ -~]{0,10}",
                        ],
                        proptest::option::of(prop_oneof![
                            Just(b"1.0".to_vec()),
                            Just(b"application/cloudevents+json".to_vec()),
                            prop::collection::vec(any::<u8>(), 0..24),
                        ]),
                    ),
                    0..8,
                ),
                key in proptest::option::of(prop::collection::vec(any::<u8>(), 0..8)),
                value in prop::collection::vec(any::<u8>(), 0..64),
                ts in proptest::option::of(any::<i64>()),
            ) {
                let h: Vec<(&str, Option<&[u8]>)> =
                    headers.iter().map(|(n, v)| (n.as_str(), v.as_deref())).collect();
                let _ = decode_parts(Bytes::from(value), key.map(Bytes::from), &h, ts, &AT);
            }
        }

        #[test]
        fn attribute_headers_that_are_not_utf8_are_codec_errors() {
            let h: Vec<(&str, Option<&[u8]>)> = vec![
                ("ce_specversion", Some(b"1.0")),
                ("ce_id", Some(b"\xff\xfe")),
                ("ce_source", Some(b"s")),
                ("ce_type", Some(b"t")),
            ];
            let e = decode_parts(Bytes::new(), None, &h, None, &AT).unwrap_err();
            assert_eq!(e.kind(), polybus_core::ErrorKind::Codec);
            // A plain header keeps its text with U+FFFD.
            let h: Vec<(&str, Option<&[u8]>)> = vec![("x", Some(b"a\xffb"))];
            let ev = decode_parts(Bytes::new(), None, &h, None, &AT).unwrap();
            assert_eq!(ev.headers().get("x"), Some("a\u{fffd}b"));
        }
    }
}

#[cfg(test)]
mod lean_tests {
    use super::*;

    const AT: Origin<'static> = Origin {
        topic: "hot.v1",
        partition: 1,
        offset: 7,
    };

    fn pairs(h: &Option<OwnedHeaders>) -> Vec<(String, Option<Vec<u8>>)> {
        h.iter()
            .flat_map(|h| h.iter())
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect()
    }

    fn decode_encoded(enc: &Encoded) -> Event {
        let owned = pairs(&enc.headers);
        let raw: Vec<(&str, Option<&[u8]>)> = owned
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_deref()))
            .collect();
        decode_parts(
            enc.value.clone(),
            enc.key.clone(),
            &raw,
            Some(1_767_323_045_123),
            &AT,
        )
        .unwrap()
    }

    #[test]
    fn a_bare_event_is_the_value_and_nothing_else() {
        let ev = Event::builder().data("hot").build().unwrap();
        let enc = encode_lean(&ev, &KeyMapper::EventKey).unwrap();
        assert!(enc.headers.is_none(), "no header list at all");
        assert_eq!(enc.key, None);
        assert_eq!(enc.value, "hot");
        assert_eq!(enc.size, 3);
        let back = decode_encoded(&enc);
        assert_eq!(back.id(), "kafka:hot.v1:1:7", "named by its position");
        assert_eq!(back.source(), "kafka:hot.v1");
        assert_eq!(
            back.time(),
            UNIX_EPOCH + Duration::from_millis(1_767_323_045_123),
            "timed by the record timestamp"
        );
        assert_eq!(back.data(), "hot");
        assert!(back.headers().is_empty());
    }

    #[test]
    fn key_headers_and_content_type_travel_attributes_do_not() {
        let ev = Event::builder()
            .id("never-sent")
            .source("urn:never")
            .kind("never.sent")
            .key("k 1")
            .content_type("application/json")
            .header("tenant", "eu")
            .header("X-Req", "r")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .data(&br#"{"a":1}"#[..])
            .build()
            .unwrap();
        let enc = encode_lean(&ev, &KeyMapper::EventKey).unwrap();
        let names: Vec<String> = pairs(&enc.headers).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["tenant", "X-Req", "traceparent", "content-type"]);
        assert_eq!(enc.key.as_deref(), Some(&b"k 1"[..]));
        let expected = 3 + 7 + names.iter().map(String::len).sum::<usize>() + 2 + 1 + 55 + 16;
        assert_eq!(enc.size, expected);
        let back = decode_encoded(&enc);
        assert_eq!(back.id(), "kafka:hot.v1:1:7");
        assert_eq!(back.kind(), Event::new(b"").kind(), "the default type");
        assert_eq!(back.key(), Some(&b"k 1"[..]));
        assert_eq!(back.content_type(), Some("application/json"));
        assert_eq!(back.headers().get("tenant"), Some("eu"));
        assert_eq!(back.headers().get("X-Req"), Some("r"));
        assert!(back.headers().get("traceparent").is_some());
        assert_eq!(back.data(), &br#"{"a":1}"#[..]);
    }

    #[test]
    fn a_structured_content_type_does_not_turn_the_value_into_a_document() {
        let ev = Event::builder()
            .content_type("application/cloudevents+json")
            .data("not a document")
            .build()
            .unwrap();
        let enc = encode_lean(&ev, &KeyMapper::EventKey).unwrap();
        let back = decode_encoded(&enc);
        assert_eq!(back.data(), "not a document");
        assert_eq!(back.content_type(), Some("application/cloudevents+json"));
    }

    #[test]
    fn reserved_header_names_are_refused() {
        for name in ["ce_id", "Content-Type"] {
            let ev = Event::builder().header(name, "x").build().unwrap();
            let err = encode_lean(&ev, &KeyMapper::EventKey).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::InvalidHeader, "{name}");
        }
    }
}
