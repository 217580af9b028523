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
use polybus_core::{Event, Result};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message, OwnedHeaders};

use crate::error::BACKEND;

/// The prefix of CloudEvents attribute headers.
pub(crate) const CE_PREFIX: &str = "ce_";
/// The header carrying `datacontenttype`.
pub(crate) const CONTENT_TYPE: &str = "content-type";

/// A record ready for the producer.
pub(crate) struct Encoded {
    pub(crate) key: Option<Bytes>,
    pub(crate) value: Bytes,
    pub(crate) headers: OwnedHeaders,
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

/// Encodes `ev` for the wire in `mode`.
pub(crate) fn encode(ev: &Event, mode: Mode) -> Result<Encoded> {
    let key = ev.key_bytes().cloned();
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
                headers = push(headers, &mut size, n, v);
            }
            Bytes::from(doc)
        }
        _ => {
            let mut attrs: Vec<(String, String)> = Vec::with_capacity(8);
            let mut plain: Vec<(String, String)> = Vec::new();
            cloudevents::write_binary(
                ev,
                |n, v| attrs.push((n.to_owned(), v.to_owned())),
                |n, v| plain.push((n.to_owned(), v.to_owned())),
            );
            for (n, v) in &attrs {
                if n == "datacontenttype" {
                    headers = push(headers, &mut size, CONTENT_TYPE, v);
                } else {
                    let name = format!("{CE_PREFIX}{n}");
                    headers = push(headers, &mut size, &name, v);
                }
            }
            // Plain headers as-is.
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
        headers,
        size,
    })
}

/// Decodes a received record into an event. A record without `ce_specversion` (written by a
/// plain Kafka client) becomes an event with a fresh id, the record timestamp as its time and
/// every header kept as a plain header.
pub(crate) fn decode(msg: &BorrowedMessage<'_>) -> Result<Event> {
    let payload = Bytes::copy_from_slice(msg.payload().unwrap_or_default());
    let key = msg.key().map(Bytes::copy_from_slice);
    let headers: Vec<(&str, String)> = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key,
                        h.value
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let timestamp = msg.timestamp().to_millis();
    decode_parts(payload, key, headers, timestamp)
}

pub(crate) fn decode_parts(
    payload: Bytes,
    key: Option<Bytes>,
    headers: Vec<(&str, String)>,
    timestamp_ms: Option<i64>,
) -> Result<Event> {
    let structured = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case(CONTENT_TYPE) && cloudevents::is_structured_content_type(v)
    });
    if structured {
        let mut ev = cloudevents::from_structured(&payload, BACKEND)?;
        if key.is_some() {
            ev.set_key(key);
        }
        for (n, v) in headers {
            if !n.eq_ignore_ascii_case(CONTENT_TYPE) {
                ev.headers_mut().append_unchecked(n, v);
            }
        }
        return Ok(ev);
    }
    let mut dec = BinaryDecoder::new();
    let mut has_time = false;
    for (n, v) in headers {
        if let Some(attr) = n.strip_prefix(CE_PREFIX) {
            has_time |= attr == "time";
            dec.attribute(attr, v);
        } else if n.eq_ignore_ascii_case(CONTENT_TYPE) {
            dec.content_type(v);
        } else {
            dec.header(n, v);
        }
    }
    if let Some(k) = key {
        dec.key(k);
    }
    let mut ev = dec.finish(payload, BACKEND)?;
    if !has_time && let Some(ms) = timestamp_ms.and_then(|ms| u64::try_from(ms).ok()) {
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

    fn names(h: &OwnedHeaders) -> Vec<(String, String)> {
        h.iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
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
        let enc = encode(&ev, Mode::Binary).unwrap();
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

        let hv: Vec<(&str, String)> = h.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
        let back = decode_parts(enc.value.clone(), enc.key.clone(), hv, None).unwrap();
        assert_eq!(back.id(), "id-1");
        assert_eq!(back.kind(), "order.created");
        assert_eq!(back.key(), Some(&b"k1"[..]));
        assert_eq!(back.content_type(), Some("application/json"));
        assert_eq!(back.headers().get("tenant"), Some("eu"));
        assert_eq!(back.headers().get("x-req"), Some("r"));
    }

    #[test]
    fn structured_mode_round_trips() {
        let ev = sample();
        let enc = encode(&ev, Mode::Structured).unwrap();
        let h = names(&enc.headers);
        assert!(h.contains(&("content-type".into(), "application/cloudevents+json".into())));
        let hv: Vec<(&str, String)> = h.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
        let back = decode_parts(enc.value.clone(), enc.key.clone(), hv, None).unwrap();
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
            vec![("trace", "1".into())],
            Some(1_700_000_000_000),
        )
        .unwrap();
        assert_eq!(ev.data(), &Bytes::from_static(b"raw"));
        assert_eq!(ev.key(), Some(&b"k"[..]));
        assert_eq!(ev.headers().get("trace"), Some("1"));
        assert_eq!(millis(ev.time()), Some(1_700_000_000_000));
    }
}
