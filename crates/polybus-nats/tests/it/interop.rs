//! Other programs read what polybus writes and polybus reads what they write: nats-py and the
//! Python `cloudevents` SDK (the venv of `cargo xtask broker install`), in binary and
//! structured mode, checking every CloudEvents attribute (id, source, type, specversion, time,
//! datacontenttype, partitionkey, an extension), the data and the W3C `traceparent`.
//!
//! The Python SDK has no NATS binding; its HTTP binding uses the same `ce-` prefix and the
//! same percent-encoding of header values as the NATS binding, and the same
//! `application/cloudevents+json` structured mode, so it stands in for a NATS binding
//! written by someone else. The one difference (HTTP carries `datacontenttype` only as
//! `Content-Type`, NATS as `ce-datacontenttype`) is exercised both ways: polybus writes both
//! headers and reads either.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use polybus_core::cloudevents::Mode;
use polybus_core::mq::MessageConsumer;
use polybus_core::telemetry::TraceContext;
use polybus_core::{Event, Publisher};
use polybus_nats::{NatsConsumer, NatsProducer};
use polybus_testkit::brokers::python;

/// 2026-01-02T03:04:05.123456Z in microseconds since the epoch.
const TIME_MICROS: u64 = 1_767_323_045_123_456;

const PY: &str = r#"
import asyncio, base64, json, sys
from datetime import datetime, timedelta, timezone
import nats
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

def describe(ev):
    data = ev.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = {"base64": base64.b64encode(data).decode()}
    return {
        "id": ev.get_id(),
        "source": ev.get_source(),
        "type": ev.get_type(),
        "specversion": ev.get_specversion(),
        "time_micros": (ev.get_time() - EPOCH) // timedelta(microseconds=1),
        "datacontenttype": ev.get_datacontenttype(),
        "partitionkey": ev.get_extension("partitionkey"),
        "tenant": ev.get_extension("tenant"),
        "data": data,
    }

async def main():
    url, mode, subject = sys.argv[1], sys.argv[2], sys.argv[3]
    nc = await nats.connect(url)
    if mode == "sub":
        sub = await nc.subscribe(subject)
        await nc.flush()
        print("ready", flush=True)
        msg = await sub.next_msg(timeout=10)
        ev = ce_http.from_http(ce_http.HTTPMessage(headers=msg.headers or {}, body=msg.data), JSONFormat())
        print(json.dumps({"headers": msg.headers, "event": describe(ev)}), flush=True)
    else:
        ev = CloudEvent({
            "id": "py-1",
            "source": "urn:python sdk/€",
            "type": "py.event",
            "specversion": "1.0",
            "time": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc),
            "datacontenttype": "application/json",
            "partitionkey": "customer 42",
            "tenant": "eu west",
        }, {"from": "python"})
        if mode == "pub-binary":
            m = ce_http.to_binary(ev, JSONFormat())
        else:
            m = ce_http.to_structured(ev, JSONFormat())
        headers = dict(m.headers)
        headers["traceparent"] = sys.argv[4]
        await nc.publish(subject, m.body, headers=headers)
        await nc.flush()
    await nc.close()

asyncio.run(main())
"#;

fn subject() -> String {
    format!("polybus.test.interop.{}", uuid::Uuid::new_v4().simple())
}

fn polybus_event() -> anyhow::Result<Event> {
    Ok(Event::builder()
        .id("id-1 ü")
        .source("urn:polybus test/€")
        .kind("order.created")
        .time(UNIX_EPOCH + Duration::from_micros(TIME_MICROS))
        .key("customer 42")
        .content_type("application/json")
        .header("tenant", "eu €")
        .header("X-Request-Id", "r-42")
        .data(r#"{"order":1}"#)
        .build()?)
}

/// Starts the Python subscriber, publishes `ev` with polybus in `mode`, returns what Python
/// printed.
async fn python_reads(mode: Mode) -> anyhow::Result<serde_json::Value> {
    let url = crate::nats_url();
    let subject = subject();
    let mut child = Command::new(python())
        .args(["-c", PY, &url, "sub", &subject])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await?;
    assert_eq!(ready.as_deref(), Some("ready"));

    // A trace of polybus' own, so the Python side sees a `traceparent` it can parse.
    let p = NatsProducer::builder(&url)
        .mode(mode)
        .trace_policy(polybus_core::telemetry::TracePolicy::StartRoot)
        .producer()
        .await?;
    p.publish(&subject, polybus_event()?).await?;
    p.flush().await?;
    let line = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await?
        .expect("python printed the message");
    let _ = child.wait();
    Ok(serde_json::from_str(&line)?)
}

fn assert_every_attribute(ev: &serde_json::Value) {
    assert_eq!(ev["id"], "id-1 ü");
    assert_eq!(ev["source"], "urn:polybus test/€");
    assert_eq!(ev["type"], "order.created");
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["time_micros"], TIME_MICROS);
    assert_eq!(ev["datacontenttype"], "application/json");
    assert_eq!(ev["partitionkey"], "customer 42");
    assert_eq!(ev["tenant"], "eu €");
    assert_eq!(ev["data"], serde_json::json!({"order": 1}));
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn python_sdk_reads_polybus_binary_mode() -> anyhow::Result<()> {
    let v = python_reads(Mode::Binary).await?;
    assert_every_attribute(&v["event"]);
    // The raw headers, as the binding writes them.
    let h = &v["headers"];
    assert_eq!(h["ce-specversion"], "1.0");
    assert_eq!(h["ce-id"], "id-1%20%C3%BC");
    assert_eq!(h["ce-source"], "urn:polybus%20test/%E2%82%AC");
    assert_eq!(h["ce-type"], "order.created");
    assert_eq!(h["ce-time"], "2026-01-02T03:04:05.123456Z");
    assert_eq!(h["ce-datacontenttype"], "application/json");
    assert_eq!(h["Content-Type"], "application/json");
    assert_eq!(h["ce-partitionkey"], "customer%2042");
    assert_eq!(h["ce-tenant"], "eu%20%E2%82%AC");
    assert_eq!(h["X-Request-Id"], "r-42");
    let tp = h["traceparent"].as_str().expect("traceparent carried");
    assert!(TraceContext::parse(tp).is_some(), "{tp}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn python_sdk_reads_polybus_structured_mode() -> anyhow::Result<()> {
    let v = python_reads(Mode::Structured).await?;
    assert_every_attribute(&v["event"]);
    let h = &v["headers"];
    assert_eq!(h["Content-Type"], "application/cloudevents+json");
    assert!(
        h.get("ce-id").is_none(),
        "structured mode writes no ce- headers"
    );
    assert_eq!(h["X-Request-Id"], "r-42");
    assert!(
        h["traceparent"]
            .as_str()
            .and_then(TraceContext::parse)
            .is_some()
    );
    Ok(())
}

async fn polybus_reads(mode: &str) -> anyhow::Result<()> {
    let url = crate::nats_url();
    let subject = subject();
    let mut c = NatsConsumer::connect(&url).await?;
    c.subscribe(&subject).await?;
    let tc = TraceContext::new_root();
    let status = Command::new(python())
        .args(["-c", PY, &url, mode, &subject, &tc.to_string()])
        .status()?;
    assert!(status.success());
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    let ev = d.event();
    assert_eq!(ev.id(), "py-1", "{mode}");
    assert_eq!(ev.source(), "urn:python sdk/€", "{mode}");
    assert_eq!(ev.kind(), "py.event", "{mode}");
    assert_eq!(
        ev.time(),
        UNIX_EPOCH + Duration::from_micros(TIME_MICROS),
        "{mode}"
    );
    assert_eq!(ev.content_type(), Some("application/json"), "{mode}");
    assert_eq!(ev.key(), Some(&b"customer 42"[..]), "{mode}");
    assert_eq!(ev.headers().get("tenant"), Some("eu west"), "{mode}");
    let data: serde_json::Value = serde_json::from_slice(d.payload())?;
    assert_eq!(data, serde_json::json!({"from": "python"}), "{mode}");
    assert_eq!(d.trace_context(), Some(tc), "{mode}: traceparent extracted");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn polybus_reads_python_sdk_binary_mode() -> anyhow::Result<()> {
    polybus_reads("pub-binary").await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn polybus_reads_python_sdk_structured_mode() -> anyhow::Result<()> {
    polybus_reads("pub-structured").await
}

/// Hand-written headers as an older NATS binding wrote them: RFC 7230 quoted values,
/// mixed-case names, lower-case percent-encoding.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn polybus_reads_quoted_and_mixed_case_headers_from_nats_py() -> anyhow::Result<()> {
    const RAW: &str = r#"
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    await nc.publish(sys.argv[2], b'raw', headers={
        "CE-SpecVersion": "1.0",
        "ce-id": '"py \\"2\\""',
        "Ce-Source": "urn:python%20sdk%e2%82%ac",
        "ce-type": "py.event",
        "ce-time": "2026-01-02T04:04:05.123456+01:00",
        "ce-datacontenttype": "text/plain",
        "ce-partitionkey": '"k 1"',
        "ce-tenant": '"eu west"',
        "X-Plain": "kept",
    })
    await nc.flush()
    await nc.close()

asyncio.run(main())
"#;
    let url = crate::nats_url();
    let subject = subject();
    let mut c = NatsConsumer::connect(&url).await?;
    c.subscribe(&subject).await?;
    let status = Command::new(python())
        .args(["-c", RAW, &url, &subject])
        .status()?;
    assert!(status.success());
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    let ev = d.event();
    assert_eq!(ev.id(), "py \"2\"", "quoted value unquoted");
    assert_eq!(ev.source(), "urn:python sdk€", "lower-case hex accepted");
    assert_eq!(ev.kind(), "py.event");
    assert_eq!(ev.time(), UNIX_EPOCH + Duration::from_micros(TIME_MICROS));
    assert_eq!(ev.content_type(), Some("text/plain"));
    assert_eq!(ev.key(), Some(&b"k 1"[..]));
    assert_eq!(ev.headers().get("tenant"), Some("eu west"));
    assert_eq!(ev.headers().get("x-plain"), Some("kept"));
    assert_eq!(d.payload(), b"raw");
    Ok(())
}
