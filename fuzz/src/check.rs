//! Round trips through each binding: encode an event as the publisher does, put it on the wire
//! as the broker delivers it, decode it as the consumer does, and require the same event back.
//! An encode error must be a typed refusal; decoding what polybus encoded must succeed.

use bytes::Bytes;
use polybus_core::Event;
use polybus_core::cloudevents::{self, Mode};
use polybus_mqtt::Protocol;
use polybus_nats::async_nats::HeaderMap;

use crate::{Same, assert_encode_error, assert_same_event, nats_message, nats_wire, normalized};

/// The partition and offset the Kafka target's records sit at.
pub const KAFKA_AT: (i32, i64) = (2, 41);

/// Every binding and mode (the consumer side of each decode target calls this on what it
/// decoded, the header target on events it builds).
pub fn all_bindings(ev: &Event) {
    for mode in [Mode::Binary, Mode::Structured] {
        nats(ev, mode);
        kafka(ev, mode);
        mqtt(ev, Protocol::V5, mode);
    }
    mqtt(ev, Protocol::V311, Mode::Structured);
}

/// `ev` (normalized) without its key when the key is not UTF-8: NATS and MQTT carry the key
/// as the `partitionkey` attribute, which is text (WIRE-FORMAT.md); Kafka has a record key.
fn without_binary_key(ev: &Event) -> Event {
    let mut out = normalized(ev);
    if out.key().is_some_and(|k| std::str::from_utf8(k).is_err()) {
        out.set_key(None);
    }
    out
}

/// What a trip through MQTT keeps of `ev`: in structured mode the consumer skips User
/// Properties that repeat an attribute of the JSON body, name and value (a writer may copy
/// them, WIRE-FORMAT.md), so a header value repeating its extension's value exactly is one.
fn mqtt_expected(ev: &Event, protocol: Protocol, mode: Mode) -> Event {
    let mut out = without_binary_key(ev);
    if protocol == Protocol::V5 && mode == Mode::Binary {
        return out;
    }
    let entries: Vec<(String, String)> = out
        .headers()
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let is_attr = |i: usize| {
        let n = &entries[i].0;
        cloudevents::is_extension_name(n)
            && !entries[..i].iter().any(|(m, _)| m.eq_ignore_ascii_case(n))
    };
    let attrs: Vec<usize> = (0..entries.len()).filter(|i| is_attr(*i)).collect();
    let h = out.headers_mut();
    *h = polybus_core::Headers::new();
    for (i, (n, v)) in entries.iter().enumerate() {
        let copy =
            !attrs.contains(&i) && attrs.iter().any(|&j| entries[j] == (n.clone(), v.clone()));
        if !copy {
            h.append_unchecked(n.clone(), v.clone());
        }
    }
    out
}

/// What a trip through NATS keeps of `ev`: a NATS client trims the values of plain headers
/// (those that are not a first extension attribute of their name), as async-nats does.
fn nats_expected(ev: &Event) -> Event {
    let mut out = without_binary_key(ev);
    let entries: Vec<(String, String)> = ev
        .headers()
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let h = out.headers_mut();
    for (n, _) in &entries {
        h.remove(n);
    }
    for (i, (n, v)) in entries.iter().enumerate() {
        let attribute = cloudevents::is_extension_name(n)
            && !entries[..i].iter().any(|(m, _)| m.eq_ignore_ascii_case(n));
        let v = if attribute { v.as_str() } else { v.trim() };
        h.append_unchecked(n.clone(), v);
    }
    out
}

/// NATS round trip in `mode`; binary mode also checks that the template [`polybus_nats::Encoder`]
/// writes exactly what `encode_event` writes.
pub fn nats(ev: &Event, mode: Mode) {
    let (headers, payload) = match polybus_nats::encode_event(ev, mode, "nats") {
        Ok(x) => x,
        Err(e) => return assert_encode_error("nats encode", &e),
    };
    let encoder = polybus_nats::Encoder::new(mode);
    for _ in 0..2 {
        let (h, p) = encoder
            .encode(ev, "nats")
            .expect("Encoder accepts what encode_event accepts");
        assert_eq!(h, headers, "Encoder headers differ from encode_event");
        assert_eq!(p, payload, "Encoder payload differs from encode_event");
    }
    let wire = nats_wire(&headers, &payload);
    let (h, p) = nats_message(&wire).expect("the NATS client reads what polybus writes");
    let back = polybus_nats::decode_event(h.as_ref(), p, "nats")
        .unwrap_or_else(|e| panic!("NATS {mode:?}: decoding what polybus encoded: {e:?}"));
    let how = Same {
        header_order: false,
        json_data: mode == Mode::Structured,
    };
    assert_same_event(&format!("NATS {mode:?}"), how, &nats_expected(ev), &back);
}

/// Kafka round trip in `mode` (default key mapper).
pub fn kafka(ev: &Event, mode: Mode) {
    let r = match polybus_kafka::fuzzing::encode(ev, mode) {
        Ok(r) => r,
        Err(e) => return assert_encode_error("kafka encode", &e),
    };
    let headers: Vec<(&str, Option<&[u8]>)> = r
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_deref()))
        .collect();
    let back = polybus_kafka::fuzzing::decode(
        r.value.clone(),
        r.key.clone(),
        &headers,
        Some(0),
        crate::seeds::KAFKA_TOPIC,
        KAFKA_AT.0,
        KAFKA_AT.1,
    )
    .unwrap_or_else(|e| panic!("Kafka {mode:?}: decoding what polybus encoded: {e:?}"));
    let how = Same {
        header_order: true,
        json_data: mode == Mode::Structured,
    };
    assert_same_event(&format!("Kafka {mode:?}"), how, &normalized(ev), &back);
}

/// MQTT round trip for `protocol` in `mode`.
pub fn mqtt(ev: &Event, protocol: Protocol, mode: Mode) {
    let p = match polybus_mqtt::fuzzing::encode(ev.clone(), protocol, mode) {
        Ok(p) => p,
        Err(e) => return assert_encode_error("mqtt encode", &e),
    };
    let back = polybus_mqtt::fuzzing::decode(
        p.payload.clone(),
        p.user_properties.clone(),
        p.content_type.as_deref(),
    )
    .unwrap_or_else(|e| panic!("MQTT {protocol:?} {mode:?}: decoding what polybus encoded: {e:?}"));
    let how = Same {
        header_order: true,
        json_data: mode == Mode::Structured || protocol == Protocol::V311,
    };
    assert_same_event(
        &format!("MQTT {protocol:?} {mode:?}"),
        how,
        &mqtt_expected(ev, protocol, mode),
        &back,
    );
}

/// A NATS header map with `Content-Type` set to the structured CloudEvents type.
pub fn structured(headers: Option<HeaderMap>) -> HeaderMap {
    let mut h = headers.unwrap_or_default();
    h.insert("Content-Type", cloudevents::STRUCTURED_CONTENT_TYPE);
    h
}

/// Copies `data` (for decoders that take `Bytes`).
pub fn bytes(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

#[cfg(test)]
mod tests {
    use polybus_core::Event;
    use polybus_core::cloudevents::Mode;
    use polybus_mqtt::Protocol;

    /// An MQTT 3.1.1 event with a `traceparent` keeps its JSON data byte for byte: the
    /// encoder appends the trace members to the document. It parsed the document into a
    /// `serde_json::Map` and wrote it again (`2^64` arrived as `1.8446744073709552e19`, keys
    /// sorted); found by the mqtt targets (#18).
    #[test]
    fn v311_with_a_traceparent_keeps_json_data_exactly() {
        let data = r#"{"z":18446744073709551616,"a":1}"#;
        let ev = Event::builder()
            .id("1")
            .content_type("application/json")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .data(data)
            .build()
            .unwrap();
        let p = polybus_mqtt::fuzzing::encode(ev, Protocol::V311, Mode::Structured).unwrap();
        let back = polybus_mqtt::fuzzing::decode(p.payload, p.user_properties, None).unwrap();
        assert_eq!(&back.data()[..], data.as_bytes());
    }
}
