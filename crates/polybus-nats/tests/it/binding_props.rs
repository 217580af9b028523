//! Property tests of the CloudEvents NATS binding (no broker): arbitrary events round-trip
//! through binary and structured mode with every attribute intact, and decoding arbitrary
//! headers and payloads never panics. 10,000 cases each.

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use polybus_core::cloudevents::Mode;
use polybus_nats::{decode_event, encode_event, percent_decode, percent_encode};
use polybus_testkit::strategies::{self, EventCase, EventCases, assert_same};
use proptest::prelude::*;

/// Content types besides none: JSON ones (which structured mode embeds), parameters with
/// quotes, the structured type itself, and arbitrary media types.
const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/json; charset=utf-8",
    "application/vnd.order+json",
    "text/plain; charset=\"utf-8\"",
    "application/octet-stream",
    "application/cloudevents+json",
];

/// Events as NATS carries them: any content type, plain header values as a NATS server keeps
/// them (printable ASCII without surrounding space), and any JSON document as data.
fn case() -> impl Strategy<Value = EventCase> {
    EventCases {
        // None and each listed type (7) as likely as each other and as an arbitrary type.
        content_type: prop_oneof![
            7 => strategies::content_type(CONTENT_TYPES),
            1 => "[a-z]{1,8}/[a-z0-9.+-]{1,12}".prop_map(Some),
        ]
        .boxed(),
        plain: strategies::headers(
            strategies::plain_name(),
            strategies::printable_value(),
            0..4,
        ),
        ..EventCases::default()
    }
    .strategy()
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
