//! Other programs read what polybus writes and polybus reads what they write: nats-py (the
//! venv of `cargo xtask broker install`) on the CloudEvents NATS binary mode.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use polybus_core::mq::MessageConsumer;
use polybus_core::{Event, Publisher};
use polybus_nats::{NatsConsumer, NatsProducer};
use polybus_testkit::brokers::python;

const PY: &str = r#"
import asyncio, json, sys
import nats

async def main():
    url, mode, subject = sys.argv[1], sys.argv[2], sys.argv[3]
    nc = await nats.connect(url)
    if mode == "sub":
        sub = await nc.subscribe(subject)
        await nc.flush()
        print("ready", flush=True)
        msg = await sub.next_msg(timeout=10)
        print(json.dumps({"headers": msg.headers, "data": msg.data.decode()}), flush=True)
    else:
        await nc.publish(subject, b'{"from":"python"}', headers={
            "ce-specversion": "1.0",
            "ce-id": "py-1",
            "ce-source": "urn:python%20sdk",
            "ce-type": "py.event",
            "ce-time": "2026-01-02T03:04:05Z",
            "ce-tenant": '"eu west"',
            "Content-Type": "application/json",
            "X-Plain": "kept",
        })
        await nc.flush()
    await nc.close()

asyncio.run(main())
"#;

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn nats_py_reads_polybus_binary_mode() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let subject = format!("polybus.test.interop.{}", uuid::Uuid::new_v4().simple());
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

    let p = NatsProducer::connect(&url).await?;
    let ev = Event::builder()
        .id("id-1")
        .source("urn:polybus test")
        .kind("order.created")
        .content_type("application/json")
        .header("tenant", "eu €")
        .header("X-Request-Id", "r-42")
        .data(r#"{"order":1}"#)
        .build()?;
    p.publish(&subject, ev).await?;
    p.flush().await?;
    let line = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await?
        .expect("nats-py printed the message");
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let h = &v["headers"];
    assert_eq!(h["ce-specversion"], "1.0");
    assert_eq!(h["ce-id"], "id-1");
    assert_eq!(h["ce-source"], "urn:polybus%20test");
    assert_eq!(h["ce-type"], "order.created");
    assert_eq!(h["ce-datacontenttype"], "application/json");
    assert_eq!(h["Content-Type"], "application/json");
    assert_eq!(h["ce-tenant"], "eu%20%E2%82%AC");
    assert_eq!(h["X-Request-Id"], "r-42");
    assert!(h["ce-time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(v["data"], r#"{"order":1}"#);
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn polybus_reads_nats_py_binary_mode() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let subject = format!("polybus.test.interop.{}", uuid::Uuid::new_v4().simple());
    let mut c = NatsConsumer::connect(&url).await?;
    c.subscribe(&subject).await?;
    let status = Command::new(python())
        .args(["-c", PY, &url, "pub", &subject])
        .status()?;
    assert!(status.success());
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    let ev = d.event();
    assert_eq!(ev.id(), "py-1");
    assert_eq!(ev.source(), "urn:python sdk", "percent-decoded");
    assert_eq!(ev.kind(), "py.event");
    assert_eq!(ev.content_type(), Some("application/json"));
    assert_eq!(
        ev.headers().get("tenant"),
        Some("eu west"),
        "quoted value unquoted"
    );
    assert_eq!(ev.headers().get("x-plain"), Some("kept"));
    assert_eq!(
        Some(ev.time()),
        polybus_core::time::parse_rfc3339("2026-01-02T03:04:05Z")
    );
    assert_eq!(d.payload(), br#"{"from":"python"}"#);
    Ok(())
}
