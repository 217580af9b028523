//! Interop with kafka-python (the venv Python; `POLYBUS_PYTHON` overrides the path): it reads
//! what polybus writes (CloudEvents `ce_*` headers and the key), and polybus reads what it
//! writes (plain headers, and CloudEvents binary-mode headers) into events.

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
