//! Property tests of the CloudEvents NATS binding (no broker): arbitrary events round-trip
//! through binary and structured mode with every attribute intact, and decoding arbitrary
//! headers and payloads never panics. 10,000 cases each.

use std::time::{Duration, UNIX_EPOCH};

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use polybus_core::Event;
use polybus_core::cloudevents::Mode;
use polybus_nats::{decode_event, encode_event, percent_decode, percent_encode};
use proptest::prelude::*;

/// Attribute values: any non-control text, including spaces, quotes, `%` and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{1,24}"
}

fn extension_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,11}".prop_filter("not a context attribute", |n| {
        polybus_core::cloudevents::is_extension_name(n)
    })
}

/// Plain header values as a NATS server carries them: printable ASCII, no surrounding space.
fn plain_value() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,16}[!-~])?"
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("application/json".to_owned())),
        Just(Some("application/json; charset=utf-8".to_owned())),
        Just(Some("application/vnd.order+json".to_owned())),
        Just(Some("text/plain; charset=\"utf-8\"".to_owned())),
        Just(Some("application/octet-stream".to_owned())),
        Just(Some("application/cloudevents+json".to_owned())),
        "[a-z]{1,8}/[a-z0-9.+-]{1,12}".prop_map(Some),
    ]
}

/// A JSON document (so a structured event with a JSON content type can embed it).
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
struct Case {
    id: String,
    source: String,
    kind: String,
    micros: u64,
    key: Option<String>,
    content_type: Option<String>,
    extensions: Vec<(String, String)>,
    plain: Vec<(String, String)>,
    traceparent: bool,
    bytes: Vec<u8>,
    json: serde_json::Value,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (text(), text(), text(), 0u64..253_402_300_799_000_000),
        (proptest::option::of("[^\\p{Cc}]{0,16}"), content_type()),
        (
            prop::collection::vec((extension_name(), "[^\\p{Cc}]{0,16}"), 0..4),
            prop::collection::vec(("X-[A-Za-z0-9-]{1,10}", plain_value()), 0..4),
            any::<bool>(),
        ),
        (prop::collection::vec(any::<u8>(), 0..64), json()),
    )
        .prop_map(
            |(
                (id, source, kind, micros),
                (key, content_type),
                (extensions, plain, tp),
                (bytes, json),
            )| Case {
                id,
                source,
                kind,
                micros,
                key,
                content_type,
                extensions,
                plain,
                traceparent: tp,
                bytes,
                json,
            },
        )
}

impl Case {
    fn is_json(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(polybus_core::cloudevents::is_json_content_type)
    }

    fn event(&self, mode: Mode) -> Event {
        let data = if mode == Mode::Structured && self.is_json() {
            serde_json::to_vec(&self.json).expect("a Value serializes")
        } else {
            self.bytes.clone()
        };
        let mut b = Event::builder()
            .id(self.id.clone())
            .source(self.source.clone())
            .kind(self.kind.clone())
            .time(UNIX_EPOCH + Duration::from_micros(self.micros))
            .data(data);
        if let Some(k) = &self.key {
            b = b.key(k.clone().into_bytes());
        }
        if let Some(ct) = &self.content_type {
            b = b.content_type(ct.clone());
        }
        for (n, v) in self.extensions.iter().chain(&self.plain) {
            b = b.header(n.clone(), v.clone());
        }
        if self.traceparent {
            b = b.header(
                "traceparent",
                polybus_core::telemetry::TraceContext::new_root().to_string(),
            );
        }
        b.build().expect("the strategy makes valid events")
    }
}

fn sorted_headers(ev: &Event) -> Vec<(String, String)> {
    let mut h: Vec<_> = ev
        .headers()
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    h.sort();
    h
}

fn assert_same(sent: &Event, got: &Event, json: bool) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.id(), sent.id());
    prop_assert_eq!(got.source(), sent.source());
    prop_assert_eq!(got.kind(), sent.kind());
    prop_assert_eq!(got.time(), sent.time());
    prop_assert_eq!(got.key(), sent.key());
    prop_assert_eq!(got.content_type(), sent.content_type());
    prop_assert_eq!(sorted_headers(got), sorted_headers(sent));
    if json && !sent.data().is_empty() {
        let b: serde_json::Value = serde_json::from_slice(sent.data()).expect("JSON sent");
        if b.is_null() && got.data().is_empty() {
            // `"data": null` and no data are the same event in the JSON format.
            return Ok(());
        }
        let a: serde_json::Value = serde_json::from_slice(got.data()).expect("JSON back");
        prop_assert_eq!(a, b);
    } else {
        prop_assert_eq!(got.data(), sent.data());
    }
    Ok(())
}

/// Arbitrary header names: CloudEvents ones in any case, the content type, anything legal.
fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "(ce|CE|Ce)-(specversion|id|source|type|time|datacontenttype|partitionkey|[a-z]{1,8})",
        Just("Content-Type".to_owned()),
        Just("content-type".to_owned()),
        Just("traceparent".to_owned()),
        "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}",
    ]
}

/// Arbitrary header values: percent signs, quotes, backslashes, non-ASCII, and the values a
/// valid event has.
fn any_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1.0".to_owned()),
        Just("application/cloudevents+json".to_owned()),
        Just("2026-01-02T03:04:05Z".to_owned()),
        "[%\"\\\\ a-fA-F0-9]{0,12}",
        "[^\\r\\n]{0,24}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn binary_mode_round_trips_every_attribute(c in case()) {
        let sent = c.event(Mode::Binary);
        let (headers, payload) = encode_event(&sent, Mode::Binary, "nats").expect("encodes");
        prop_assert_eq!(payload.as_ptr(), sent.data().as_ptr(), "payload not copied");
        let got = decode_event(Some(&headers), payload, "nats").expect("decodes");
        assert_same(&sent, &got, false)?;
    }

    #[test]
    fn structured_mode_round_trips_every_attribute(c in case()) {
        let sent = c.event(Mode::Structured);
        let (headers, payload) = encode_event(&sent, Mode::Structured, "nats").expect("encodes");
        let got = decode_event(Some(&headers), payload, "nats").expect("decodes");
        assert_same(&sent, &got, c.is_json())?;
    }

    #[test]
    fn decoding_arbitrary_messages_never_panics(
        headers in prop::collection::vec((any_name(), any_value()), 0..8),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut map = HeaderMap::new();
        for (n, v) in &headers {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(n.as_str()), v.parse::<HeaderValue>()) {
                map.append(n, v);
            }
        }
        let _ = decode_event(Some(&map), Bytes::from(payload), "nats");
    }

    #[test]
    fn percent_decoding_rejects_exactly_the_invalid_utf8(bytes in prop::collection::vec(any::<u8>(), 0..24)) {
        let encoded: String = bytes.iter().map(|b| format!("%{b:02x}")).collect();
        match (percent_decode(&encoded), std::str::from_utf8(&bytes)) {
            (Ok(s), Ok(t)) => prop_assert_eq!(s.as_ref(), t),
            (Err(_), Err(_)) => {}
            (got, want) => prop_assert!(false, "{got:?} vs {want:?}"),
        }
    }

    #[test]
    fn percent_encoding_round_trips_any_text(s in "\\PC{0,32}") {
        let enc = percent_encode(&s);
        prop_assert!(enc.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'"'));
        let back = percent_decode(&enc).expect("decodes");
        prop_assert_eq!(back.as_ref(), s.as_str());
    }
}
