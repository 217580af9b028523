//! Other MQTT programs read what polybus writes and polybus reads what they write:
//! mosquitto_sub / mosquitto_pub (Debian mosquitto-clients), MQTT 5 and 3.1.1. Each direction
//! checks every CloudEvents attribute (id, source, type, specversion, time, datacontenttype,
//! partitionkey, an extension) and the W3C `traceparent`, not just the payload.

use std::process::Stdio;
use std::time::Duration;

use polybus_core::{Event, Publisher};
use polybus_mqtt::{MqttProducer, Protocol};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::support;

/// 2026-01-02T03:04:05.123456Z.
const TIME: &str = "2026-01-02T03:04:05.123456Z";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn fixed_time() -> std::time::SystemTime {
    polybus_core::time::parse_rfc3339(TIME).expect("valid")
}

const SUB: &str = "/usr/bin/mosquitto_sub";
const PUB: &str = "/usr/bin/mosquitto_pub";

/// Starts `mosquitto_sub` for one message on `topic`, printing `format`, then publishes with
/// `publish` every 200 ms until mosquitto_sub has its message (it has no "subscribed" signal).
async fn mosquitto_sub_reads(
    version: &str,
    topic: &str,
    format: &str,
    mut publish: impl AsyncFnMut() -> polybus_core::Result<()>,
) -> anyhow::Result<String> {
    let (host, port) = support::broker();
    let mut child = Command::new(SUB)
        .args([
            "-V",
            version,
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-t",
            topic,
        ])
        .args(["-C", "1", "-W", "20", "-F", format])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let status = loop {
        publish().await?;
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
            break status?;
        }
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .await?;
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err)
        .await?;
    anyhow::ensure!(status.success(), "mosquitto_sub failed: {status}: {err}");
    Ok(out.trim_end_matches('\n').to_owned())
}

async fn mosquitto_pub(args: &[&str]) -> anyhow::Result<()> {
    let (host, port) = support::broker();
    let out = Command::new(PUB)
        .args(["-h", &host, "-p", &port.to_string()])
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The trace the events polybus publishes here carry.
const CARRIED_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn mosquitto_sub_reads_payload_and_user_properties_polybus_wrote() -> anyhow::Result<()> {
    let client = support::connect("interop-pub").await?;
    let p = client.producer();
    let topic = support::topic();
    let ev = Event::builder()
        .source("urn:polybus:interop")
        .kind("polybus.interop")
        .time(fixed_time())
        .key("k-7")
        .content_type("text/plain")
        .header("tenant", "eu")
        .header("X-Request-Id", "r-42")
        .header("traceparent", CARRIED_TRACEPARENT)
        .data("hello from polybus")
        .build()?;
    let line = mosquitto_sub_reads("mqttv5", &topic, "%t|%C|%P|%p", async || {
        Publisher::publish(&p, &topic, ev.clone()).await.map(drop)
    })
    .await?;
    println!("mosquitto_sub printed: {line}");
    let parts: Vec<&str> = line.splitn(4, '|').collect();
    assert_eq!(parts.len(), 4, "{line}");
    assert_eq!(parts[0], topic);
    assert_eq!(parts[1], "text/plain", "Content Type property");
    assert_eq!(parts[3], "hello from polybus", "payload untouched");
    let props: Vec<(&str, &str)> = parts[2]
        .split(' ')
        .filter_map(|kv| kv.split_once(':'))
        .collect();
    let get = |k: &str| props.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    assert_eq!(get("specversion"), Some("1.0"), "{props:?}");
    assert_eq!(get("id"), Some(ev.id()));
    assert_eq!(get("source"), Some("urn:polybus:interop"));
    assert_eq!(get("type"), Some("polybus.interop"));
    assert_eq!(get("partitionkey"), Some("k-7"));
    assert_eq!(get("tenant"), Some("eu"));
    assert_eq!(get("X-Request-Id"), Some("r-42"));
    assert_eq!(get("time"), Some(TIME));
    // The default trace policy continues the trace the event carries (and starts none).
    assert_eq!(get("traceparent"), Some(CARRIED_TRACEPARENT), "{props:?}");
    assert_eq!(
        get("datacontenttype"),
        None,
        "content type is the property, not a user property"
    );
    client.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn polybus_reads_what_mosquitto_pub_wrote_with_user_properties() -> anyhow::Result<()> {
    let client = support::connect("interop-sub").await?;
    let topic = support::topic();
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;

    // A plain MQTT 5 message with user properties: a raw event, properties become headers.
    mosquitto_pub(&[
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        &topic,
        "-m",
        "{\"temp\":21.5}",
        "-D",
        "publish",
        "user-property",
        "k",
        "v",
        "-D",
        "publish",
        "user-property",
        "X-Trace",
        "abc",
        "-D",
        "publish",
        "content-type",
        "application/json",
    ])
    .await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"{\"temp\":21.5}");
    assert_eq!(d.topic(), topic);
    let ev = d.event();
    assert_eq!(ev.headers().get("k"), Some("v"));
    assert_eq!(ev.headers().get("x-trace"), Some("abc"));
    assert_eq!(ev.content_type(), Some("application/json"));
    assert_eq!(ev.kind(), polybus_core::DEFAULT_KIND, "not a CloudEvent");
    d.ack().await?;

    // A binary-mode CloudEvent written by hand with mosquitto_pub.
    mosquitto_pub(&[
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        &topic,
        "-m",
        "ce-data",
        "-D",
        "publish",
        "user-property",
        "specversion",
        "1.0",
        "-D",
        "publish",
        "user-property",
        "id",
        "mp-1",
        "-D",
        "publish",
        "user-property",
        "source",
        "urn:mosquitto_pub",
        "-D",
        "publish",
        "user-property",
        "type",
        "org.example.reading",
        "-D",
        "publish",
        "user-property",
        "region",
        "north",
        "-D",
        "publish",
        "user-property",
        "time",
        TIME,
        "-D",
        "publish",
        "user-property",
        "partitionkey",
        "sensor-9",
        "-D",
        "publish",
        "user-property",
        "traceparent",
        TRACEPARENT,
        "-D",
        "publish",
        "content-type",
        "text/plain",
    ])
    .await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    let ev = d.event();
    assert_eq!(ev.id(), "mp-1");
    assert_eq!(ev.source(), "urn:mosquitto_pub");
    assert_eq!(ev.kind(), "org.example.reading");
    assert_eq!(ev.time(), fixed_time());
    assert_eq!(
        ev.content_type(),
        Some("text/plain"),
        "Content Type property"
    );
    assert_eq!(ev.key(), Some(&b"sensor-9"[..]), "partitionkey");
    assert_eq!(ev.headers().get("region"), Some("north"));
    assert_eq!(
        d.trace_context().map(|tc| tc.to_string()).as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(d.payload(), b"ce-data");
    d.ack().await?;

    // A structured JSON CloudEvent from an MQTT 3.1.1 publisher (no properties at all).
    let json = format!(
        r#"{{"specversion":"1.0","id":"mp-2","source":"urn:v311","type":"t.v311","time":"{TIME}","datacontenttype":"application/json","partitionkey":"p-1","region":"south","traceparent":"{TRACEPARENT}","data":{{"ok":true}}}}"#
    );
    mosquitto_pub(&["-V", "mqttv311", "-q", "1", "-t", &topic, "-m", &json]).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    let ev = d.event();
    assert_eq!(ev.id(), "mp-2");
    assert_eq!(ev.source(), "urn:v311");
    assert_eq!(ev.kind(), "t.v311");
    assert_eq!(ev.time(), fixed_time());
    assert_eq!(ev.content_type(), Some("application/json"));
    assert_eq!(ev.key(), Some(&b"p-1"[..]));
    assert_eq!(ev.headers().get("region"), Some("south"));
    assert_eq!(
        d.trace_context().map(|tc| tc.to_string()).as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(d.payload(), b"{\"ok\":true}");
    d.ack().await?;
    client.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn mqtt311_publishes_structured_json_mosquitto_sub_can_read() -> anyhow::Result<()> {
    let client = support::config("interop-311")
        .protocol(Protocol::V311)
        .connect()
        .await?;
    let p: MqttProducer = client.producer();
    let topic = support::topic();
    let ev = Event::builder()
        .source("urn:polybus:v311")
        .kind("t.v311")
        .time(fixed_time())
        .key("k-311")
        .content_type("application/json")
        .header("tenant", "eu")
        .header("traceparent", CARRIED_TRACEPARENT)
        .data(&br#"{"n":1}"#[..])
        .build()?;
    let line = mosquitto_sub_reads("mqttv311", &topic, "%p", async || {
        Publisher::publish(&p, &topic, ev.clone()).await.map(drop)
    })
    .await?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(v["id"], ev.id());
    assert_eq!(v["source"], "urn:polybus:v311");
    assert_eq!(v["type"], "t.v311");
    assert_eq!(v["time"], TIME);
    assert_eq!(v["datacontenttype"], "application/json");
    assert_eq!(v["partitionkey"], "k-311");
    assert_eq!(v["tenant"], "eu");
    assert_eq!(
        v["traceparent"], CARRIED_TRACEPARENT,
        "traceparent as an extension attribute: {v}"
    );
    assert_eq!(v["data"]["n"], 1);
    client.close().await?;
    Ok(())
}
