//! The seed corpus: representative events encoded by the library's own encoders, written in
//! each target's input format to `fuzz/corpus/<target>/`. Regenerate with
//! `cargo xtask fuzz --write-seeds` (runs the ignored test `write_seed_corpus` of this crate).

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use polybus_core::Event;
use polybus_core::cloudevents::Mode;
use polybus_mqtt::Protocol;

use crate::{FrameWriter, nats_wire};

/// The topic the Kafka target decodes records of.
pub const KAFKA_TOPIC: &str = "orders.v1";

/// Events like the ones the interop tests exchange with other programs: every attribute, text
/// that needs percent-encoding, JSON / text / binary payloads, tracing headers, repeated and
/// plain headers, and a minimal event.
pub fn events() -> Vec<Event> {
    let at = UNIX_EPOCH + Duration::from_micros(1_767_323_045_123_456);
    let full = Event::builder()
        .id("0194f3c2-7a61-7cc3-9a2e-5f1d2c3b4a59")
        .source("urn:shop orders/€")
        .kind("order.created")
        .time(at)
        .key("customer-7")
        .content_type("application/json")
        .header("tenant", "eu west 100% \"quoted\"")
        .header("X-Request-Id", "r-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("tracestate", "vendor=opaque,other=1")
        .header("tenant", "us")
        .data(&br#"{"order":42,"items":["a","b"],"total":9.5}"#[..])
        .build();
    let text = Event::builder()
        .source("urn:t")
        .kind("note")
        .time(at)
        .content_type("text/plain; charset=utf-8")
        .data("hello, wörld")
        .build();
    let binary = Event::builder()
        .id("bin-1")
        .source("urn:b")
        .kind("blob")
        .time(at)
        .key(&[0xff, 0x00, 0x80][..])
        .content_type("application/octet-stream")
        .data(&[0u8, 1, 2, 0xfe, 0xff][..])
        .build();
    let minimal = Event::builder().id("m-1").time(at).build();
    [full, text, binary, minimal]
        .into_iter()
        .map(|r| r.expect("seed events are valid"))
        .collect()
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)
}

/// A Kafka record in the kafka target's input format.
pub fn kafka_input(
    timestamp_ms: Option<i64>,
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[(&str, Option<&[u8]>)],
) -> Vec<u8> {
    let mut w = FrameWriter::default();
    let ts = timestamp_ms.map(i64::to_le_bytes);
    w.frame(ts.as_ref().map(|b| &b[..]));
    w.frame(key);
    w.frame(Some(value));
    for (n, v) in headers {
        w.frame(Some(n.as_bytes())).frame(*v);
    }
    w.0
}

/// An MQTT 5 PUBLISH in the mqtt_v5 target's input format.
pub fn mqtt_input(
    content_type: Option<&str>,
    payload: &[u8],
    props: &[(String, String)],
) -> Vec<u8> {
    let mut w = FrameWriter::default();
    w.frame(content_type.map(str::as_bytes));
    w.frame(Some(payload));
    for (n, v) in props {
        w.frame(Some(n.as_bytes())).frame(Some(v.as_bytes()));
    }
    w.0
}

/// Writes every target's seeds under `dir` (`fuzz/corpus`). Returns the number of files.
pub fn write_all(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    let mut put = |target: &str, name: String, bytes: &[u8]| {
        n += 1;
        write(dir, target, &name, bytes)
    };
    for (i, ev) in events().into_iter().enumerate() {
        for (mode, m) in [(Mode::Binary, "binary"), (Mode::Structured, "structured")] {
            let (h, p) = polybus_nats::encode_event(&ev, mode, "nats").expect("NATS encodes");
            put(
                &format!("nats_{m}"),
                format!("event{i}"),
                &nats_wire(&h, &p),
            )?;

            let r = polybus_kafka::fuzzing::encode(&ev, mode).expect("Kafka encodes");
            let headers: Vec<(&str, Option<&[u8]>)> = r
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_deref()))
                .collect();
            let input = kafka_input(
                Some(1_767_323_045_123),
                r.key.as_deref(),
                &r.value,
                &headers,
            );
            put("kafka", format!("event{i}_{m}"), &input)?;

            let p = polybus_mqtt::fuzzing::encode(ev.clone(), Protocol::V5, mode)
                .expect("MQTT 5 encodes");
            let input = mqtt_input(p.content_type.as_deref(), &p.payload, &p.user_properties);
            put("mqtt_v5", format!("event{i}_{m}"), &input)?;
        }
        // 3.1.1 carries only extension attributes: one value of an extension name each.
        let mut v311 = ev.clone();
        let kept: Vec<(String, String)> = ev
            .headers()
            .iter()
            .enumerate()
            .filter(|(i, (n, _))| {
                polybus_core::cloudevents::is_extension_name(n)
                    && !ev.headers().iter().take(*i).any(|(m, _)| m == *n)
            })
            .map(|(_, (n, v))| (n.to_owned(), v.to_owned()))
            .collect();
        *v311.headers_mut() = polybus_core::Headers::new();
        for (n, v) in kept {
            v311.headers_mut().append_unchecked(n, v);
        }
        let p = polybus_mqtt::fuzzing::encode(v311, Protocol::V311, Mode::Structured)
            .expect("MQTT 3.1.1 encodes");
        put("mqtt_v311", format!("event{i}"), &p.payload)?;

        let err = (i == 1).then_some(("rejected", "kafka: rejected: message too large"));
        let rec =
            polybus_compose::fuzzing::encode("orders.created", KAFKA_TOPIC, ev, 3, i == 1, err);
        put("spool_record", format!("event{i}"), &rec)?;
    }
    // Messages of plain clients (no CloudEvents attributes).
    put("nats_binary", "raw_no_headers".into(), b"plain payload")?;
    put(
        "nats_binary",
        "raw_headers".into(),
        b"NATS/1.0\r\nX-Trace: a b\r\nNats-Msg-Id: 7\r\nContent-Type: text/plain\r\n\r\nhi",
    )?;
    put(
        "kafka",
        "raw_record".into(),
        &kafka_input(
            Some(5),
            Some(b"k"),
            b"{}",
            &[("x-app", Some(b"\xffbin")), ("empty", None)],
        ),
    )?;
    put(
        "mqtt_v5",
        "raw_publish".into(),
        &mqtt_input(None, b"21.5", &[]),
    )?;
    put("mqtt_v311", "raw_publish".into(), b"21.5")?;

    for (name, v) in [
        (
            "sampled",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        ),
        (
            "unsampled",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00".to_owned(),
        ),
        (
            "future_version",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-xyz".to_owned(),
        ),
        (
            "zero_trace",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-00".to_owned(),
        ),
    ] {
        put("traceparent", name.into(), v.as_bytes())?;
    }
    for (name, v) in [
        ("utc_micros", "2026-01-02T03:04:05.123456Z"),
        ("offset_nanos", "2023-11-14t23:13:20.123456789+01:00"),
        ("leap_second", "2016-12-31 23:59:60-00:30"),
        ("leap_day", "2024-02-29T00:00:00Z"),
    ] {
        put("rfc3339", name.into(), v.as_bytes())?;
    }
    for (name, v) in [
        ("plain", &b"X-Request-Id\0r-1"[..]),
        ("extension", b"tenant\0eu west"),
        ("tab_value", b"x-note\0a\tb"),
        ("control", b"x\0a\r\nb"),
        ("reserved", b"ce-id\0x"),
    ] {
        put("header", name.into(), v)?;
    }
    for (name, v) in [
        ("memory", "memory://?group=billing"),
        ("nats", "nats://127.0.0.1:4222?group=workers"),
        (
            "mqtt",
            "mqtt://svc%40eu:p%3Ass@broker:8883?client_id=c1&group=g1",
        ),
        (
            "kafka",
            "kafka://user:hunter2@127.0.0.1:9092/?group=g1&offset=earliest&sasl=plain",
        ),
        (
            "jetstream",
            "jetstream://tok@host:4222?group=g1&stream_prefix=x_",
        ),
    ] {
        put("connect_url", name.into(), v.as_bytes())?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    /// Writes the seed corpus into `fuzz/corpus` (`cargo xtask fuzz --write-seeds`).
    #[test]
    #[ignore = "writes fuzz/corpus; run by `cargo xtask fuzz --write-seeds`"]
    fn write_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let n = super::write_all(&dir).expect("writes the corpus");
        println!("wrote {n} seed files under {}", dir.display());
    }
}
