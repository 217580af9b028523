//! Interop with kafka-python (the venv Python; `POLYBUS_PYTHON` overrides the path): it reads
//! what polybus writes (CloudEvents `ce_*` headers and the key), and polybus reads what it
//! writes (plain headers, and CloudEvents binary-mode headers) into events. The Python
//! `cloudevents` SDK's Kafka binding does the same in binary and structured mode, checking
//! every attribute (id, source, type, specversion, time, datacontenttype, partitionkey, an
//! extension), the record key, the data and the W3C `traceparent`.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use polybus_core::{Consumer, Event};
use polybus_kafka::{KafkaAdmin, KafkaConsumer, KafkaProducer};
use serde_json::Value;

use crate::common::{brokers, test_config, topic};

const READ: &str = r#"
import json, sys, uuid
from kafka import KafkaConsumer
c = KafkaConsumer(sys.argv[2], bootstrap_servers=sys.argv[1], group_id="py-" + uuid.uuid4().hex,
                  auto_offset_reset="earliest", consumer_timeout_ms=30000)
for m in c:
    print(json.dumps({
        "key": m.key.decode() if m.key is not None else None,
        "value": m.value.decode(),
        "headers": {k: v.decode() for k, v in m.headers},
    }))
    break
c.close()
"#;

const WRITE: &str = r#"
import sys
from kafka import KafkaProducer
p = KafkaProducer(bootstrap_servers=sys.argv[1])
p.send(sys.argv[2], key=b"py-key", value=b"from python",
       headers=[("trace", b"abc"), ("X-Origin", b"kafka-python")])
p.send(sys.argv[2], key=b"py-ce", value=b'{"n":1}',
       headers=[("ce_specversion", b"1.0"), ("ce_id", b"py-1"), ("ce_source", b"urn:python"),
                ("ce_type", b"py.created"), ("ce_time", b"2024-05-01T12:00:00Z"),
                ("ce_tenant", b"eu"), ("content-type", b"application/json")])
p.flush()
p.close()
"#;

async fn python(script: &str, args: &[&str]) -> anyhow::Result<String> {
    let py = polybus_testkit::brokers::python();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(&py)
            .arg("-c")
            .arg(script)
            .args(args)
            .output(),
    )
    .await
    .context("python timed out")?
    .with_context(|| format!("running {}", py.display()))?;
    ensure!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn kafka_python_reads_polybus_and_polybus_reads_kafka_python() -> anyhow::Result<()> {
    let b = brokers();
    let cfg = test_config(&b, "unused");

    // polybus -> kafka-python
    let t1 = topic("interop-out");
    let ev = Event::builder()
        .kind("order.created")
        .source("urn:polybus:interop")
        .key("k-1")
        .content_type("application/json")
        .header("tenant", "eu")
        .header("X-Plain", "yes")
        .data(&br#"{"id":1}"#[..])
        .build()?;
    KafkaProducer::new_with_config(&cfg)?
        .publish(&t1, ev.clone())
        .await?;
    let line = python(READ, &[&b, &t1]).await?;
    let rec: Value =
        serde_json::from_str(line.trim()).with_context(|| format!("python printed {line:?}"))?;
    let h = &rec["headers"];
    println!("kafka-python read: {rec}");
    ensure!(rec["key"] == "k-1", "key {}", rec["key"]);
    ensure!(rec["value"] == r#"{"id":1}"#, "value {}", rec["value"]);
    for (name, want) in [
        ("ce_id", ev.id()),
        ("ce_source", "urn:polybus:interop"),
        ("ce_type", "order.created"),
        ("ce_specversion", "1.0"),
        ("ce_partitionkey", "k-1"),
        ("ce_tenant", "eu"),
        ("content-type", "application/json"),
        ("X-Plain", "yes"),
    ] {
        ensure!(h[name] == want, "header {name}: {} (all: {h})", h[name]);
    }
    ensure!(
        h["ce_time"].as_str().is_some_and(|t| t.contains('T')),
        "ce_time {}",
        h["ce_time"]
    );

    // kafka-python -> polybus
    let t2 = topic("interop-in");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t2).await?;
    python(WRITE, &[&b, &t2]).await?;
    let consumer = KafkaConsumer::new_anonymous(&cfg)?;
    let mut stream = consumer.subscribe(&t2);
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("no record from kafka-python")?
            .context("stream ended")??;
        got.push(d.event().clone());
        d.ack().await?;
    }
    let raw = got
        .iter()
        .find(|e| e.key() == Some(&b"py-key"[..]))
        .context("raw record")?;
    ensure!(raw.data() == &b"from python"[..]);
    ensure!(
        raw.headers().get("trace") == Some("abc"),
        "{:?}",
        raw.headers()
    );
    ensure!(
        raw.headers().get("x-origin") == Some("kafka-python"),
        "{:?}",
        raw.headers()
    );
    let ce = got
        .iter()
        .find(|e| e.key() == Some(&b"py-ce"[..]))
        .context("CloudEvent record")?;
    ensure!(
        ce.id() == "py-1" && ce.source() == "urn:python" && ce.kind() == "py.created",
        "{ce:?}"
    );
    ensure!(ce.content_type() == Some("application/json"), "{ce:?}");
    ensure!(ce.headers().get("tenant") == Some("eu"), "{ce:?}");
    ensure!(
        polybus_core::time::format_rfc3339(ce.time()).starts_with("2024-05-01T12:00:00"),
        "{ce:?}"
    );
    Ok(())
}

/// The Python `cloudevents` SDK's Kafka binding over kafka-python: reads one record and
/// prints every attribute, or writes one event in binary or structured mode.
const SDK: &str = r#"
import base64, json, sys, uuid
from datetime import datetime, timedelta, timezone
from kafka import KafkaConsumer, KafkaProducer
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
brokers, mode, topic = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "read":
    c = KafkaConsumer(topic, bootstrap_servers=brokers, group_id="py-" + uuid.uuid4().hex,
                      auto_offset_reset="earliest", consumer_timeout_ms=30000)
    for m in c:
        headers = {k: v for k, v in m.headers}
        ev = ce_kafka.from_kafka(ce_kafka.KafkaMessage(headers=headers, key=m.key, value=m.value or b""), JSONFormat())
        data = ev.get_data()
        if isinstance(data, (bytes, bytearray)):
            data = {"base64": base64.b64encode(data).decode()}
        print(json.dumps({
            "key": m.key.decode() if m.key is not None else None,
            "headers": {k: v.decode() for k, v in m.headers},
            "event": {
                "id": ev.get_id(), "source": ev.get_source(), "type": ev.get_type(),
                "specversion": ev.get_specversion(),
                "time_micros": (ev.get_time() - EPOCH) // timedelta(microseconds=1),
                "datacontenttype": ev.get_datacontenttype(),
                "partitionkey": ev.get_extension("partitionkey"),
                "tenant": ev.get_extension("tenant"),
                "data": data,
            },
        }))
        break
    c.close()
else:
    ev = CloudEvent({
        "id": "py-1", "source": "urn:python sdk/€", "type": "py.event", "specversion": "1.0",
        "time": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc),
        "datacontenttype": "application/json", "partitionkey": "customer 42", "tenant": "eu west",
    }, {"from": "python"})
    m = ce_kafka.to_binary(ev, JSONFormat()) if mode == "write-binary" else ce_kafka.to_structured(ev, JSONFormat())
    key = m.key.encode() if isinstance(m.key, str) else m.key
    headers = list(m.headers.items()) + [("traceparent", sys.argv[4].encode())]
    p = KafkaProducer(bootstrap_servers=brokers)
    p.send(topic, key=key, value=m.value, headers=headers)
    p.flush()
    p.close()
"#;

/// 2026-01-02T03:04:05.123456Z in microseconds since the epoch.
const TIME_MICROS: u64 = 1_767_323_045_123_456;

async fn sdk_reads_polybus(mode: polybus_core::cloudevents::Mode) -> anyhow::Result<Value> {
    let b = brokers();
    let cfg = test_config(&b, "unused").with_mode(mode);
    let t = topic("interop-sdk-out");
    let ev = Event::builder()
        .id("id-1 ü")
        .source("urn:polybus test/€")
        .kind("order.created")
        .time(std::time::UNIX_EPOCH + Duration::from_micros(TIME_MICROS))
        .key("customer 42")
        .content_type("application/json")
        .header("tenant", "eu €")
        .header("X-Plain", "yes")
        .header("traceparent", TRACEPARENT)
        .data(&br#"{"order":1}"#[..])
        .build()?;
    KafkaProducer::new_with_config(&cfg)?
        .publish(&t, ev)
        .await?;
    let line = python(SDK, &[&b, "read", &t]).await?;
    serde_json::from_str(line.trim()).with_context(|| format!("python printed {line:?}"))
}

/// The trace the event of [`sdk_reads_polybus`] carries.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn ensure_every_attribute(v: &Value) -> anyhow::Result<()> {
    let e = &v["event"];
    for (name, want) in [
        ("id", serde_json::json!("id-1 ü")),
        ("source", serde_json::json!("urn:polybus test/€")),
        ("type", serde_json::json!("order.created")),
        ("specversion", serde_json::json!("1.0")),
        ("time_micros", serde_json::json!(TIME_MICROS)),
        ("datacontenttype", serde_json::json!("application/json")),
        ("partitionkey", serde_json::json!("customer 42")),
        ("tenant", serde_json::json!("eu €")),
        ("data", serde_json::json!({"order": 1})),
    ] {
        ensure!(e[name] == want, "{name}: {} (all: {v})", e[name]);
    }
    ensure!(v["key"] == "customer 42", "record key {}", v["key"]);
    ensure!(v["headers"]["X-Plain"] == "yes", "{v}");
    // The default trace policy continues the trace the event carries (and starts none).
    ensure!(
        v["headers"]["traceparent"] == TRACEPARENT,
        "traceparent {}",
        v["headers"]["traceparent"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn cloudevents_sdk_reads_polybus_binary_mode() -> anyhow::Result<()> {
    let v = sdk_reads_polybus(polybus_core::cloudevents::Mode::Binary).await?;
    ensure_every_attribute(&v)?;
    let h = &v["headers"];
    ensure!(h["ce_time"] == "2026-01-02T03:04:05.123456Z", "{h}");
    ensure!(
        h["ce_source"] == "urn:polybus test/€",
        "no percent-encoding on Kafka: {h}"
    );
    ensure!(h["content-type"] == "application/json", "{h}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn cloudevents_sdk_reads_polybus_structured_mode() -> anyhow::Result<()> {
    let v = sdk_reads_polybus(polybus_core::cloudevents::Mode::Structured).await?;
    ensure_every_attribute(&v)?;
    ensure!(
        v["headers"]["content-type"] == "application/cloudevents+json",
        "{v}"
    );
    Ok(())
}

async fn polybus_reads_sdk(mode: &str) -> anyhow::Result<()> {
    let b = brokers();
    let cfg = test_config(&b, "unused");
    let t = topic("interop-sdk-in");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let tc = polybus_core::telemetry::TraceContext::new_root();
    python(SDK, &[&b, mode, &t, &tc.to_string()]).await?;
    let consumer = KafkaConsumer::new_anonymous(&cfg)?;
    let mut stream = consumer.subscribe(&t);
    let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .context("no record from the SDK")?
        .context("stream ended")??;
    let ev = d.event();
    ensure!(ev.id() == "py-1", "{mode}: {ev:?}");
    ensure!(ev.source() == "urn:python sdk/€", "{mode}: {ev:?}");
    ensure!(ev.kind() == "py.event", "{mode}: {ev:?}");
    ensure!(
        ev.time() == std::time::UNIX_EPOCH + Duration::from_micros(TIME_MICROS),
        "{mode}: {}",
        polybus_core::time::format_rfc3339(ev.time())
    );
    ensure!(
        ev.content_type() == Some("application/json"),
        "{mode}: {ev:?}"
    );
    ensure!(ev.key() == Some(&b"customer 42"[..]), "{mode}: {ev:?}");
    ensure!(
        ev.headers().get("tenant") == Some("eu west"),
        "{mode}: {ev:?}"
    );
    let data: Value = serde_json::from_slice(d.payload())?;
    ensure!(
        data == serde_json::json!({"from": "python"}),
        "{mode}: {data}"
    );
    ensure!(
        d.trace_context() == Some(tc),
        "{mode}: traceparent extracted"
    );
    ensure!(d.partition().is_some() && d.sequence().is_some());
    d.ack().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn polybus_reads_cloudevents_sdk_binary_mode() -> anyhow::Result<()> {
    polybus_reads_sdk("write-binary").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn polybus_reads_cloudevents_sdk_structured_mode() -> anyhow::Result<()> {
    polybus_reads_sdk("write-structured").await
}

/// Records from a bare rdkafka producer (no headers at all) get the id
/// `kafka:<topic>:<partition>:<offset>` and the source `kafka:<topic>`, the same each time the
/// record is decoded: by a second member of the group after the first left without acking,
/// and by another group. So consumer-side dedup (`source` + `id`) recognises the copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn records_without_cloudevents_headers_keep_one_id_across_redeliveries() -> anyhow::Result<()>
{
    use polybus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
    use std::collections::BTreeMap;

    const N: usize = 6;
    let group = topic("raw-id-g");
    let cfg = test_config(&brokers(), &group);
    let t = topic("raw-id");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let raw: FutureProducer = cfg.producer_client_config().create()?;
    for i in 0..N {
        let payload = format!("plain-{i}");
        let key = format!("k{i}");
        raw.send(
            FutureRecord::to(&t).payload(&payload).key(&key),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    }

    // Reads every record once in a fresh member of `group`: payload -> (id, source, dedup
    // key); checks each id against the record's own coordinates.
    let read = |group: String, ack: bool| {
        let cfg = test_config(&brokers(), &group);
        let t = t.clone();
        async move {
            let consumer = KafkaConsumer::new(&cfg)?;
            let mut s = consumer.subscribe(&t);
            let mut got = BTreeMap::new();
            // Unacked deliveries are held until the member leaves (dropped, one would come
            // straight back to this member).
            let mut held = Vec::new();
            while got.len() < N {
                let d = tokio::time::timeout(Duration::from_secs(30), s.next())
                    .await
                    .context("no delivery within 30 s")?
                    .context("the stream ended")??;
                let ev = d.event();
                let (partition, offset) = (
                    d.partition().context("no partition")?,
                    d.sequence().context("no offset")?,
                );
                ensure!(
                    ev.id() == format!("kafka:{t}:{partition}:{offset}"),
                    "id {:?} of the record at {partition}@{offset}",
                    ev.id()
                );
                ensure!(
                    ev.source() == format!("kafka:{t}"),
                    "source {:?}",
                    ev.source()
                );
                ev.validate()?;
                got.insert(
                    String::from_utf8_lossy(d.payload()).into_owned(),
                    (ev.id().to_owned(), ev.dedup_key()),
                );
                if ack {
                    d.ack().await?;
                } else {
                    held.push(d);
                }
            }
            drop(s);
            drop(held);
            anyhow::Ok(got)
        }
    };

    // The first member never acks, so the group's next member gets the records again from
    // the broker (decoded anew), as after a crash.
    let first = read(group.clone(), false).await?;
    let second = read(group.clone(), true).await?;
    let other_group = read(topic("raw-id-other"), true).await?;
    ensure!(first.len() == N, "{first:?}");
    ensure!(
        first == second,
        "redelivered copies differ: {first:?} vs {second:?}"
    );
    ensure!(
        first == other_group,
        "another group's copies differ: {first:?} vs {other_group:?}"
    );
    let ids: std::collections::HashSet<_> = first.values().map(|(id, _)| id).collect();
    ensure!(ids.len() == N, "two records share an id: {first:?}");
    Ok(())
}

/// The lean wire format: kafka-python sees the value, the key and the caller's headers, no
/// `ce_*` attribute; a polybus consumer names the record by its position (the same id in
/// every group, so deduplication by id still works) and times it by its timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn a_lean_record_carries_only_what_the_caller_set() -> anyhow::Result<()> {
    let b = brokers();
    let cfg =
        test_config(&b, "unused").with_wire_format(polybus_core::cloudevents::WireFormat::Lean);
    let t = topic("interop-lean");
    let time = std::time::UNIX_EPOCH + Duration::from_millis(1_767_323_045_123);
    let ev = Event::builder()
        .kind("never.sent")
        .source("urn:never-sent")
        .time(time)
        .key("k-1")
        .content_type("application/json")
        .header("tenant", "eu")
        .data(&br#"{"id":1}"#[..])
        .build()?;
    let receipt = KafkaProducer::new_with_config(&cfg)?
        .publish(&t, ev.clone())
        .await?;
    let line = python(READ, &[&b, &t]).await?;
    let rec: Value =
        serde_json::from_str(line.trim()).with_context(|| format!("python printed {line:?}"))?;
    ensure!(rec["key"] == "k-1", "key {}", rec["key"]);
    ensure!(rec["value"] == r#"{"id":1}"#, "value {}", rec["value"]);
    ensure!(
        rec["headers"] == serde_json::json!({"tenant": "eu", "content-type": "application/json"}),
        "only the caller's headers and the content type: {}",
        rec["headers"]
    );

    let (partition, offset) = (
        receipt.partition().context("partition")?,
        receipt.sequence().context("offset")?,
    );
    let want_id = format!("kafka:{t}:{partition}:{offset}");
    for group in ["lean-a", "lean-b"] {
        let group = format!("{group}-{}", uuid::Uuid::new_v4().simple());
        let consumer = KafkaConsumer::new(&cfg.clone().with_group_id(group))?;
        let mut stream = consumer.subscribe(&t);
        let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("no record")?
            .context("stream ended")??;
        let got = d.event();
        ensure!(got.id() == want_id, "id {} != {want_id}", got.id());
        ensure!(
            got.source() == format!("kafka:{t}"),
            "source {}",
            got.source()
        );
        ensure!(got.time() == time, "the record timestamp is the time");
        ensure!(got.key() == Some(&b"k-1"[..]), "{got:?}");
        ensure!(got.content_type() == Some("application/json"), "{got:?}");
        ensure!(got.headers().get("tenant") == Some("eu"), "{got:?}");
        ensure!(got.headers().len() == 1, "{got:?}");
        ensure!(
            d.trace_context().is_none(),
            "no trace to continue, none written"
        );
        ensure!(d.payload() == &br#"{"id":1}"#[..]);
        d.ack().await?;
    }
    Ok(())
}
