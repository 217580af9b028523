//! Event <-> MQTT PUBLISH, following the CloudEvents MQTT protocol binding.
//!
//! * MQTT 5, binary mode (default): every CloudEvents attribute except `datacontenttype`
//!   becomes a User Property named exactly like the attribute (`specversion`, `id`, `source`,
//!   `type`, `time`, `partitionkey`, extensions); `datacontenttype` is the Content Type
//!   property; plain headers are further User Properties; the payload is the event data.
//! * MQTT 5, structured mode: the payload is the JSON event format, Content Type
//!   `application/cloudevents+json`; plain headers are User Properties.
//! * MQTT 3.1.1: always structured JSON (3.1.1 has no properties). Headers that are not legal
//!   extension attributes cannot travel and are refused with [`ErrorKind::InvalidHeader`];
//!   `traceparent`/`tracestate` are carried as extension attributes.
//!
//! On receive the mode is detected: a Content Type starting with `application/cloudevents`
//! means structured; otherwise the User Properties are read as binary mode. A message without
//! properties whose payload is a JSON object with `specversion` (an MQTT 3.1.1 publisher) is
//! read as structured. Anything else is a raw message: a plain event around the payload.

use bytes::Bytes;
use polybus_core::cloudevents::{self, BinaryDecoder, Mode, PLAIN_HEADERS};
use polybus_core::{Error, ErrorKind, Event, Result};
use serde_json::Value;

use crate::BACKEND;
use crate::config::Protocol;

/// What an event becomes on the wire.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) payload: Bytes,
    pub(crate) user_properties: Vec<(String, String)>,
    pub(crate) content_type: Option<String>,
}

/// CloudEvents context attribute names (and the structured-mode data members): as MQTT 5 user
/// properties they mean the attribute.
const CONTEXT_ATTRIBUTES: [&str; 11] = [
    "id",
    "source",
    "type",
    "specversion",
    "time",
    "datacontenttype",
    "dataschema",
    "subject",
    "partitionkey",
    "data",
    "data_base64",
];

/// Encodes `ev` for `protocol` in `mode`. The payload is not copied in binary mode.
#[cfg(test)]
pub(crate) fn encode(ev: &Event, protocol: Protocol, mode: Mode) -> Result<Encoded> {
    encode_owned(ev.clone(), protocol, mode)
}

/// [`encode`] for an event the publisher owns: its id, time and header values move into the
/// user properties instead of being copied.
pub(crate) fn encode_owned(ev: Event, protocol: Protocol, mode: Mode) -> Result<Encoded> {
    if (protocol, mode) == (Protocol::V5, Mode::Binary) {
        return encode_binary_v5(ev);
    }
    let ev = &ev;
    match (protocol, mode) {
        (Protocol::V5, _) => {
            let (json, plain) = cloudevents::to_structured(ev, BACKEND)?;
            Ok(Encoded {
                payload: Bytes::from(json),
                user_properties: plain
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v.to_owned()))
                    .collect(),
                content_type: Some(cloudevents::STRUCTURED_CONTENT_TYPE.to_owned()),
            })
        }
        (Protocol::V311, _) => {
            let (json, plain) = cloudevents::to_structured(ev, BACKEND)?;
            if plain.is_empty() {
                return Ok(Encoded {
                    payload: Bytes::from(json),
                    user_properties: Vec::new(),
                    content_type: None,
                });
            }
            if let Some((name, _)) = plain.iter().find(|(n, _)| !PLAIN_HEADERS.contains(n)) {
                return Err(
                    Error::new(ErrorKind::InvalidHeader, BACKEND).with_message(format!(
                        "MQTT 3.1.1 has no headers: {name:?} is not a CloudEvents extension name \
                     (lowercase letters and digits, at most 20), so it cannot travel; use MQTT 5"
                    )),
                );
            }
            // The trace headers become members of the document, appended as they are: the
            // document is not parsed and written again, which would reorder its members and
            // turn JSON `data` numbers beyond 64 bits into floats.
            let mut json = json;
            if json.last() != Some(&b'}') {
                return Err(Error::new(ErrorKind::Codec, BACKEND)
                    .with_message("the structured document does not end with `}`"));
            }
            let mut seen: Vec<&str> = Vec::with_capacity(plain.len());
            for (name, value) in plain {
                // One member per name: a second `traceparent` would replace the first.
                if seen.contains(&name) {
                    return Err(Error::new(ErrorKind::InvalidHeader, BACKEND).with_message(
                        format!(
                            "MQTT 3.1.1 has no headers: a second {name:?} cannot travel as an \
                             extension attribute; use MQTT 5"
                        ),
                    ));
                }
                seen.push(name);
                json.pop();
                if json.last() != Some(&b'{') {
                    json.push(b',');
                }
                serde_json::to_writer(&mut json, name)
                    .and_then(|()| {
                        json.push(b':');
                        serde_json::to_writer(&mut json, value)
                    })
                    .map_err(|e| Error::new(ErrorKind::Codec, BACKEND).with_source(e))?;
                json.push(b'}');
            }
            Ok(Encoded {
                payload: Bytes::from(json),
                user_properties: Vec::new(),
                content_type: None,
            })
        }
    }
}

/// MQTT 5 binary mode: attributes and headers as user properties, the content type in the
/// PUBLISH property.
fn encode_binary_v5(ev: Event) -> Result<Encoded> {
    let mut props = Vec::with_capacity(6 + ev.headers().len());
    let mut plain: Vec<(String, String)> = Vec::new();
    let mut content_type = None;
    let payload = cloudevents::write_binary_owned(
        ev,
        |name, value| {
            // A content type the consumer would take for structured mode travels as the
            // `datacontenttype` user property instead (as NATS uses `ce-datacontenttype`).
            if name == "datacontenttype" && !reads_as_structured(&value) {
                content_type = Some(value.into_owned());
            } else {
                props.push((name.into_owned(), value.into_owned()));
            }
        },
        |name, value| plain.push((name.into_owned(), value)),
    );
    // User properties carry attributes without a prefix, so a plain header named like a
    // context attribute would be read back as that attribute.
    if let Some((name, _)) = plain
        .iter()
        .find(|(n, _)| CONTEXT_ATTRIBUTES.contains(&n.as_str()))
    {
        return Err(
            Error::new(ErrorKind::InvalidHeader, BACKEND).with_message(format!(
                "header {name:?} is a CloudEvents attribute name, which MQTT 5 binary mode \
             carries as a user property of the same name; rename it or use structured mode"
            )),
        );
    }
    props.append(&mut plain);
    Ok(Encoded {
        payload,
        user_properties: props,
        content_type,
    })
}

/// Decodes a received PUBLISH into an event.
#[cfg(test)]
pub(crate) fn decode(
    payload: &Bytes,
    user_properties: &[(String, String)],
    content_type: Option<&str>,
) -> Result<Event> {
    decode_owned(payload.clone(), user_properties.to_vec(), content_type)
}

/// [`decode`] taking the user properties over: their strings move into the event.
pub(crate) fn decode_owned(
    payload: Bytes,
    user_properties: Vec<(String, String)>,
    content_type: Option<&str>,
) -> Result<Event> {
    // A CloudEvents media type other than JSON (for example Avro) is an event format we
    // cannot read: the binding allows treating it as binary mode and passing it on as it is.
    if let Some(ct) = content_type
        && reads_as_structured(ct)
    {
        let mut ev = cloudevents::from_structured(&payload, BACKEND)?;
        // User properties that repeat an attribute of the JSON body, name and value (a writer
        // may copy them), are skipped; every other one is a header, repeated names included
        // (a second value of an extension travels as a user property of the same name).
        let from_json = ev.headers().len();
        for (name, value) in user_properties {
            let in_body = ev
                .headers()
                .iter()
                .take(from_json)
                .any(|(n, v)| n == name.as_str() && v == value.as_str());
            if !in_body {
                ev.headers_mut().append_unchecked(name, value);
            }
        }
        return Ok(ev);
    }
    let has_specversion = user_properties.iter().any(|(n, _)| n == "specversion");
    if !has_specversion
        && content_type.is_none()
        && user_properties.is_empty()
        && looks_structured(&payload)
    {
        return cloudevents::from_structured(&payload, BACKEND);
    }
    let mut dec = BinaryDecoder::new();
    for (name, value) in user_properties {
        dec.attribute(&name, value);
    }
    if let Some(ct) = content_type {
        dec.content_type(ct);
    }
    dec.finish(payload, BACKEND)
}

/// Whether a Content Type property announces structured mode: a CloudEvents JSON media type.
fn reads_as_structured(ct: &str) -> bool {
    ct.trim_start()
        .to_ascii_lowercase()
        .starts_with("application/cloudevents")
        && (cloudevents::is_structured_content_type(ct) || ct.contains("+json"))
}

/// A JSON object with a `specversion` member: what an MQTT 3.1.1 CloudEvents publisher sends.
fn looks_structured(payload: &[u8]) -> bool {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return false;
    }
    matches!(serde_json::from_slice::<Value>(payload), Ok(Value::Object(o)) if o.contains_key("specversion"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the receiving side makes of `enc`.
    fn decoded(enc: &Encoded) -> Result<Event> {
        decode(
            &enc.payload,
            &enc.user_properties,
            enc.content_type.as_deref(),
        )
    }

    fn sample() -> Event {
        Event::builder()
            .source("urn:t")
            .kind("k")
            .key("key-1")
            .content_type("text/plain")
            .header("tenant", "eu")
            .header("X-Request-Id", "r1")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .data("hello")
            .build()
            .unwrap()
    }

    #[test]
    fn v5_binary_uses_unprefixed_user_properties_and_content_type() {
        let ev = sample();
        let enc = encode(&ev, Protocol::V5, Mode::Binary).unwrap();
        assert_eq!(
            enc.payload.as_ptr(),
            ev.data().as_ptr(),
            "payload not copied"
        );
        assert_eq!(enc.content_type.as_deref(), Some("text/plain"));
        let names: Vec<&str> = enc
            .user_properties
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        for n in [
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "partitionkey",
            "tenant",
            "X-Request-Id",
            "traceparent",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert!(!names.contains(&"datacontenttype"));
        let back = decoded(&enc).unwrap();
        assert_eq!(back.id(), ev.id());
        assert_eq!(back.source(), "urn:t");
        assert_eq!(back.key(), Some(&b"key-1"[..]));
        assert_eq!(back.content_type(), Some("text/plain"));
        assert_eq!(back.headers().get("x-request-id"), Some("r1"));
        assert_eq!(back.headers().get("tenant"), Some("eu"));
    }

    #[test]
    fn v5_structured_keeps_a_second_value_of_an_extension() {
        let ev = Event::builder()
            .header("tenant", "eu")
            .header("tenant", "us")
            .build()
            .unwrap();
        let back = decoded(&encode(&ev, Protocol::V5, Mode::Structured).unwrap()).unwrap();
        assert_eq!(
            back.headers().get_all("tenant").collect::<Vec<_>>(),
            ["eu", "us"]
        );
    }

    /// Found by the `kafka` fuzz target: an event whose data is itself a CloudEvent
    /// (`application/cloudevents+json`) went out in binary mode with that Content Type, and the
    /// consumer read the payload as a structured event (a `Codec` error, or the wrong event).
    #[test]
    fn v5_binary_carries_a_structured_looking_content_type_as_a_user_property() {
        for ct in [
            "application/cloudevents+json",
            "Application/CloudEvents+json; charset=x",
        ] {
            let ev = Event::builder()
                .content_type(ct)
                .data("not an event")
                .build()
                .unwrap();
            let enc = encode(&ev, Protocol::V5, Mode::Binary).unwrap();
            assert_eq!(enc.content_type, None, "{ct}");
            let back = decoded(&enc).unwrap();
            assert_eq!(back.content_type(), Some(ct));
            assert_eq!(back.data(), "not an event");
            assert_eq!(back.id(), ev.id());
        }
    }

    /// Found by the `nats_binary` fuzz target: an event with two `traceparent` headers went
    /// out on 3.1.1 with only the second (the JSON member was overwritten). It is refused.
    #[test]
    fn v311_refuses_a_repeated_trace_header() {
        let ev = Event::builder()
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .build()
            .unwrap();
        let e = encode(&ev, Protocol::V311, Mode::Structured).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidHeader);
        let back = decoded(&encode(&ev, Protocol::V5, Mode::Structured).unwrap()).unwrap();
        assert_eq!(back.headers().get_all("traceparent").count(), 2);
    }

    /// Found by the mqtt fuzz targets (#18): a 3.1.1 event with trace headers had its
    /// document parsed and written again to add them, so JSON data came back re-serialized
    /// (keys sorted, `2^64` as `1.8446744073709552e19`). The members are appended instead.
    #[test]
    fn v311_trace_headers_keep_json_data_exactly() {
        let data = r#"{"z":18446744073709551616,"a":1}"#;
        let ev = Event::builder()
            .content_type("application/json")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("tracestate", "vendor=\"quoted\"")
            .data(data)
            .build()
            .unwrap();
        let enc = encode(&ev, Protocol::V311, Mode::Structured).unwrap();
        let back = decoded(&enc).unwrap();
        assert_eq!(&back.data()[..], data.as_bytes());
        assert_eq!(
            back.headers().get("traceparent"),
            ev.headers().get("traceparent")
        );
        assert_eq!(back.headers().get("tracestate"), Some("vendor=\"quoted\""));
    }

    #[test]
    fn v5_structured_round_trip() {
        let ev = sample();
        let enc = encode(&ev, Protocol::V5, Mode::Structured).unwrap();
        assert_eq!(
            enc.content_type.as_deref(),
            Some("application/cloudevents+json")
        );
        let back = decoded(&enc).unwrap();
        assert_eq!(back.id(), ev.id());
        assert_eq!(back.data(), ev.data());
        assert_eq!(back.headers().get("X-Request-Id"), Some("r1"));
    }

    #[test]
    fn v311_is_structured_and_refuses_plain_headers() {
        let err = encode(&sample(), Protocol::V311, Mode::Binary).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidHeader);
        let ev = Event::builder()
            .header("tenant", "eu")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .data("x")
            .build()
            .unwrap();
        let enc = encode(&ev, Protocol::V311, Mode::Binary).unwrap();
        assert!(enc.user_properties.is_empty() && enc.content_type.is_none());
        let back = decode(&enc.payload, &[], None).unwrap();
        assert_eq!(back.id(), ev.id());
        assert_eq!(back.headers().get("tenant"), Some("eu"));
        assert!(back.headers().get("traceparent").is_some());
    }

    #[test]
    fn raw_messages_are_plain_events() {
        let raw = Bytes::from_static(b"{\"temp\": 21}");
        let ev = decode(&raw, &[("k".into(), "v".into())], None).unwrap();
        assert_eq!(ev.data(), &raw);
        assert_eq!(ev.headers().get("k"), Some("v"));
        let ev = decode(&raw, &[], None).unwrap();
        assert_eq!(ev.data(), &raw);
    }

    #[test]
    fn a_bad_structured_event_is_a_codec_error() {
        let bad = Bytes::from_static(b"{\"specversion\":\"1.0\"}");
        let e = decode(&bad, &[], Some("application/cloudevents+json")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Codec);
    }

    #[test]
    fn v5_binary_refuses_a_plain_header_named_like_an_attribute() {
        let ev = Event::builder().header("type", "x").build().unwrap();
        let e = encode(&ev, Protocol::V5, Mode::Binary).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidHeader);
        // Structured mode carries it (the attributes are in the JSON body).
        let enc = encode(&ev, Protocol::V5, Mode::Structured).unwrap();
        let back = decoded(&enc).unwrap();
        assert_eq!(back.headers().get("type"), Some("x"));
        assert_eq!(back.kind(), ev.kind());
    }

    mod props {
        //! Property tests of the CloudEvents MQTT binding (MQTT 5 binary and structured, MQTT
        //! 3.1.1 structured): arbitrary events round-trip with every attribute, and decoding
        //! arbitrary payloads and properties never panics. 10,000 cases each.

        use super::*;
        use polybus_testkit::strategies::{self, EventCase, EventCases, assert_same};
        use proptest::prelude::*;

        /// Events as MQTT carries them: the common content types (a `+json` one would mean
        /// structured mode), extension names that do not repeat (a repeated one would be a
        /// plain user property in structured mode), up to 2 plain headers, and `{"n":<i64>}`
        /// as structured JSON data (so the data round-trips to the same bytes).
        fn case() -> impl Strategy<Value = EventCase> {
            EventCases {
                extensions: strategies::distinct_headers(
                    strategies::extension_name(),
                    strategies::header_value(),
                    0..4,
                ),
                plain: strategies::headers(
                    strategies::plain_name(),
                    strategies::header_value(),
                    0..3,
                ),
                json: strategies::json_number().boxed(),
                ..EventCases::default()
            }
            .strategy()
        }

        fn round_trip(sent: &Event, protocol: Protocol, mode: Mode) -> Result<(), TestCaseError> {
            let enc = encode(sent, protocol, mode).expect("encodes");
            let got = decoded(&enc).expect("decodes");
            assert_same(sent, &got, false)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            #[test]
            fn v5_binary_round_trips_every_attribute(c in case()) {
                round_trip(&c.event(Mode::Binary), Protocol::V5, Mode::Binary)?;
            }

            #[test]
            fn v5_structured_round_trips_every_attribute(c in case()) {
                round_trip(&c.event(Mode::Structured), Protocol::V5, Mode::Structured)?;
            }

            #[test]
            fn v311_structured_round_trips_every_attribute(c in case()) {
                // MQTT 3.1.1 carries no plain headers.
                let c = c.without_plain();
                round_trip(&c.event(Mode::Structured), Protocol::V311, Mode::Structured)?;
            }

            #[test]
            fn decoding_arbitrary_messages_never_panics(
                payload in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..64),
                    "\\{\"specversion\":\"1.0\"[ -~]{0,40}".prop_map(String::into_bytes),
                ],
                props in prop::collection::vec(
                    (
                        prop_oneof![
                            "(specversion|id|source|type|time|partitionkey|datacontenttype)",
                            "[ -~]{0,10}",
                        ],
                        prop_oneof![Just("1.0".to_owned()), "\\PC{0,20}"],
                    ),
                    0..8,
                ),
                content_type in proptest::option::of(prop_oneof![
                    Just("application/cloudevents+json".to_owned()),
                    Just("application/cloudevents+avro".to_owned()),
                    "\\PC{0,20}",
                ]),
            ) {
                let _ = decode(&Bytes::from(payload), &props, content_type.as_deref());
            }
        }
    }
}
