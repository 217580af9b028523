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
    Ok(n + interop(dir)?)
}

/// The CloudEvent the interop tests publish with the Python SDK (`cloudevents`), in its own
/// encodings: `to_binary` / `to_structured` for HTTP (what the NATS interop test publishes with
/// nats-py) and for Kafka (what kafka-python sends), one JSON line each with hex bytes. The
/// data has an integer past 64 bits, which Python's `json` writes exactly.
const PYTHON_SDK: &str = r#"
import json
from datetime import datetime, timezone
from cloudevents.core.bindings import http as ce_http, kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

def hexed(b):
    return (b if isinstance(b, bytes) else str(b).encode()).hex()

ev = CloudEvent({
    "id": "py-1", "source": "urn:python sdk/\u20ac", "type": "py.event", "specversion": "1.0",
    "time": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc),
    "datacontenttype": "application/json", "partitionkey": "customer 42", "tenant": "eu west",
}, {"from": "python", "big": 18446744073709551616})
trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
for mode in ["binary", "structured"]:
    m = (ce_http.to_binary if mode == "binary" else ce_http.to_structured)(ev, JSONFormat())
    headers = dict(m.headers)
    headers["traceparent"] = trace
    print(json.dumps({"what": "nats_" + mode,
        "headers": [[k, hexed(v)] for k, v in headers.items()], "body": hexed(m.body)}))
    m = (ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured)(ev, JSONFormat())
    headers = list(m.headers.items()) + [("traceparent", trace.encode())]
    print(json.dumps({"what": "kafka_" + mode, "key": None if m.key is None else hexed(m.key),
        "headers": [[k, hexed(v)] for k, v in headers], "body": hexed(m.value)}))
"#;

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Seeds from messages other programs write in the interop tests: the Python CloudEvents SDK's
/// binary and structured encodings for NATS (HTTP form, as nats-py publishes them) and Kafka
/// (as kafka-python sends them; also a 3.1.1 payload, the structured JSON), and the MQTT 5
/// PUBLISH `mosquitto_pub` sends in the MQTT interop test. Needs the venv Python
/// (`POLYBUS_PYTHON`, else `$POLYBUS_CACHE/venv/bin/python`); without it only the
/// mosquitto_pub seed is written, and a note says so.
fn interop(dir: &Path) -> std::io::Result<usize> {
    // mosquitto_pub -V mqttv5 -m '{"temp":21.5}' -D publish user-property k v
    //   -D publish user-property X-Trace abc -D publish content-type application/json
    let props = [("k", "v"), ("X-Trace", "abc")].map(|(n, v)| (n.to_owned(), v.to_owned()));
    write(
        dir,
        "mqtt_v5",
        "interop_mosquitto_pub",
        &mqtt_input(Some("application/json"), br#"{"temp":21.5}"#, &props),
    )?;
    let mut n = 1;
    let python = std::env::var_os("POLYBUS_PYTHON").map_or_else(
        || {
            let cache = std::env::var_os("POLYBUS_CACHE").map_or_else(
                || Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/polybus"),
                std::path::PathBuf::from,
            );
            cache.join("venv/bin/python")
        },
        std::path::PathBuf::from,
    );
    let out = match std::process::Command::new(&python)
        .args(["-c", PYTHON_SDK])
        .output()
    {
        Ok(out) if out.status.success() => out.stdout,
        Ok(out) => {
            eprintln!(
                "interop seeds: the Python SDK script failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return Ok(n);
        }
        Err(e) => {
            eprintln!("interop seeds: no Python at {} ({e})", python.display());
            return Ok(n);
        }
    };
    let bad = |what: &str| std::io::Error::other(format!("interop seeds: {what}"));
    for line in String::from_utf8_lossy(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad(line))?;
        let what = v["what"].as_str().ok_or_else(|| bad("what"))?;
        let body =
            unhex(v["body"].as_str().ok_or_else(|| bad("body"))?).ok_or_else(|| bad("hex"))?;
        let headers: Vec<(String, Vec<u8>)> = v["headers"]
            .as_array()
            .ok_or_else(|| bad("headers"))?
            .iter()
            .map(|h| {
                let name = h[0].as_str()?.to_owned();
                Some((name, unhex(h[1].as_str()?)?))
            })
            .collect::<Option<_>>()
            .ok_or_else(|| bad("a header"))?;
        match what {
            "nats_binary" | "nats_structured" => {
                let mut map = polybus_nats::async_nats::HeaderMap::new();
                for (name, value) in &headers {
                    map.append(name.as_str(), String::from_utf8_lossy(value).as_ref());
                }
                write(dir, what, "interop_python_sdk", &nats_wire(&map, &body))?;
            }
            "kafka_binary" | "kafka_structured" => {
                let key = v["key"].as_str().and_then(unhex);
                let hs: Vec<(&str, Option<&[u8]>)> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), Some(v.as_slice())))
                    .collect();
                let name = format!("interop_python_sdk_{}", &what[6..]);
                write(
                    dir,
                    "kafka",
                    &name,
                    &kafka_input(Some(1_767_323_045_123), key.as_deref(), &body, &hs),
                )?;
                if what == "kafka_structured" {
                    // The structured JSON is also what a 3.1.1 CloudEvents producer sends.
                    write(dir, "mqtt_v311", "interop_python_sdk", &body)?;
                    n += 1;
                }
            }
            other => return Err(bad(other)),
        }
        n += 1;
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
