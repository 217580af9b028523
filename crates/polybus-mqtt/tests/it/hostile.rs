//! Hostile input against a real mosquitto: bad topics and headers through the public API, a
//! broker packet-size limit, and garbage published by `mosquitto_pub` (a raw client) in both
//! protocol versions. Typed errors, no panic, and a bad message does not sink its neighbours.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt as _;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_mqtt::{LastWill, MqttConfig, Protocol};
use polybus_testkit::brokers::{BrokerProcess, mqtt_addr};

use crate::support;

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_topics_and_headers_are_typed_errors() -> anyhow::Result<()> {
    for protocol in [Protocol::V5, Protocol::V311] {
        let client = support::config("hostile")
            .protocol(protocol)
            .connect()
            .await?;
        let p = client.producer();
        let long = "t".repeat(65_536);
        for bad in [
            "",
            " ",
            "a b",
            "tab\t",
            "nl\n",
            "cr\r",
            "nul\0",
            "esc\u{1b}",
            "del\u{7f}",
            "nbsp\u{a0}",
            "a/+",
            "a/#",
            "#",
            "+",
            long.as_str(),
        ] {
            let e = p.publish(bad, b"x", 1).await.expect_err(bad);
            assert_eq!(
                e.kind(),
                ErrorKind::InvalidTopic,
                "{protocol:?} publish {bad:?}: {e}"
            );
        }
        let sub = client.subscriber(None);
        for bad in ["", "a/#/b", "a+", "#a", "nul\0", "nl\n", long.as_str()] {
            let mut s = std::pin::pin!(sub.subscribe(bad));
            let e = s.next().await.expect("an item").expect_err(bad);
            assert_eq!(
                e.kind(),
                ErrorKind::InvalidTopic,
                "{protocol:?} subscribe {bad:?}: {e}"
            );
        }
        // Headers the binding cannot carry: refused before sending.
        let e = Event::builder()
            .header("x", "a\r\nb")
            .build()
            .expect_err("control character");
        assert_eq!(e.kind(), ErrorKind::InvalidHeader);
        if protocol == Protocol::V311 {
            // 3.1.1 carries only CloudEvents extension attributes (structured JSON).
            let ev = Event::builder().header("X-Not-An-Extension", "v").build()?;
            let e = Publisher::publish(&p, &support::topic(), ev)
                .await
                .expect_err("3.1.1 plain header");
            assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{e}");
        }
        // The connection is still fine.
        p.publish(&support::topic(), b"ok", 1).await?;
        client.close().await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_payload_over_the_broker_limit() -> anyhow::Result<()> {
    // mosquitto announces its Maximum Packet Size in the MQTT 5 CONNACK.
    let broker = BrokerProcess::mosquitto("max_packet_size 4096\n").await?;
    let client = MqttConfig::new("127.0.0.1", broker.port(), support::client_id("limit"))
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await?;
    let topic = support::topic();
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    let p = client.producer();
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        p.publish(&topic, vec![0u8; 8192], 1),
    )
    .await?
    .expect_err("over the broker's limit");
    println!("8 KiB to a 4 KiB broker ({:?}): {e}", started.elapsed());
    assert!(
        matches!(e.kind(), ErrorKind::PayloadTooLarge | ErrorKind::Connect),
        "{e}"
    );
    // The client recovers (reconnecting if the broker dropped it) and small messages go on.
    let ok = polybus_testkit::brokers::retry(Duration::from_secs(10), || {
        p.publish(&topic, b"small".to_vec(), 1)
    })
    .await;
    ok?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"small");
    d.ack().await?;
    client.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn broker_max_packet_size_lowers_the_declared_payload_limit() -> anyhow::Result<()> {
    // mosquitto's `max_packet_size` reaches an MQTT 5 client as the CONNACK's Maximum Packet
    // Size; ours stays the default 1 MiB.
    let broker = BrokerProcess::mosquitto("max_packet_size 2048\n").await?;
    let will_topic = support::topic();
    let cfg = MqttConfig::new("127.0.0.1", broker.port(), support::client_id("limit2k"))
        .connect_timeout(Duration::from_secs(3))
        .last_will(LastWill::new(will_topic.clone(), "dropped"));
    // Before connecting only the configuration is known.
    assert_eq!(cfg.capabilities().max_payload, Some(cfg.max_payload()));
    assert!(cfg.max_payload() > 2048);
    // A second client sees the last will if the broker ever drops the first one.
    let watcher = MqttConfig::new("127.0.0.1", broker.port(), support::client_id("watch"))
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await?;
    let mut wills = watcher.consumer();
    wills.subscribe(&will_topic, 1).await?;

    let client = cfg.connect().await?;
    let limit = client.capabilities().max_payload.expect("a declared limit");
    assert!(limit > 0 && limit < 2048, "limit {limit}");
    let p = client.producer();
    assert_eq!(p.capabilities().max_payload, Some(limit));
    assert_eq!(client.consumer().capabilities().max_payload, Some(limit));
    assert_eq!(
        Consumer::capabilities(&client.subscriber(None)).max_payload,
        Some(limit)
    );

    let topic = support::topic();
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    // Just over the declared limit, and a payload that fits our packet size but not the
    // broker's: both refused before anything is sent.
    for size in [limit + 1, 2048, 4096] {
        let started = std::time::Instant::now();
        let e = p
            .publish(&topic, vec![0u8; size], 1)
            .await
            .expect_err("over the broker's limit");
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{size} bytes: {e}");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{size} bytes: refused before sending, not after a round trip"
        );
    }
    // The connection is still up, and a payload of exactly the declared limit (a default
    // event: id, source, type, time as user properties) fits the broker's packet.
    assert!(client.is_connected());
    p.publish(&topic, vec![7u8; limit], 1).await?;
    p.publish(&topic, b"small".to_vec(), 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload().len(), limit);
    d.ack().await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"small");
    d.ack().await?;
    // A clean close sends DISCONNECT, so a will now would mean the broker dropped the
    // connection earlier.
    client.close().await?;
    let will = tokio::time::timeout(Duration::from_millis(500), wills.next()).await;
    assert!(
        will.is_err(),
        "the broker dropped the connection: {:?}",
        will.map(|d| d.map(|d| d.payload().to_vec()))
    );
    watcher.close().await?;
    Ok(())
}

/// `mosquitto_pub` with `args` to `topic` on the shared broker.
fn mosquitto_pub(topic: &str, args: &[&str]) -> anyhow::Result<()> {
    let (host, port) = mqtt_addr();
    let out = Command::new("mosquitto_pub")
        .args(["-h", &host, "-p", &port.to_string(), "-q", "1", "-t", topic])
        .args(args)
        .output()?;
    anyhow::ensure!(out.status.success(), "mosquitto_pub {args:?}: {out:?}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_wire_garbage_yields_codec_errors_and_the_stream_goes_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let random = dir.path().join("random.bin");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&random, &bytes)?;
    let random = random.display().to_string();
    let up = |n: &'static str, v: &'static str| ["-D", "publish", "user-property", n, v];
    let v5 = ["-V", "mqttv5"];
    let ce = "application/cloudevents+json";
    // (what, arguments) published between good messages; each must be a Codec error. The
    // MQTT 5 properties do not reach a 3.1.1 subscriber, so what is garbage only through them
    // is left out there (see `for_v311`).
    let garbage: Vec<(&str, Vec<String>)> = vec![
        ("v5 binary CloudEvent without id", {
            let mut a: Vec<&str> = v5.to_vec();
            a.extend(up("specversion", "1.0"));
            a.extend(up("source", "s"));
            a.extend(up("type", "t"));
            a.extend(["-m", "x"]);
            a.iter().map(|s| (*s).to_owned()).collect()
        }),
        ("v5 unsupported specversion", {
            let mut a: Vec<&str> = v5.to_vec();
            a.extend(up("specversion", "0.3"));
            a.extend(up("id", "1"));
            a.extend(up("source", "s"));
            a.extend(up("type", "t"));
            a.extend(["-m", "x"]);
            a.iter().map(|s| (*s).to_owned()).collect()
        }),
        ("v5 structured, not JSON", {
            let mut a: Vec<&str> = v5.to_vec();
            a.extend(["-D", "publish", "content-type", ce, "-f", &random]);
            a.iter().map(|s| (*s).to_owned()).collect()
        }),
        ("v5 structured, bad time", {
            let mut a: Vec<&str> = v5.to_vec();
            a.extend([
                "-D",
                "publish",
                "content-type",
                ce,
                "-m",
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"noon"}"#,
            ]);
            a.iter().map(|s| (*s).to_owned()).collect()
        }),
        (
            "3.1.1 structured, unsupported specversion",
            [
                "-V",
                "mqttv311",
                "-m",
                r#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        ),
        (
            "3.1.1 structured, missing type",
            [
                "-V",
                "mqttv311",
                "-m",
                r#"{"specversion":"1.0","id":"1","source":"s"}"#,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        ),
    ];

    let for_v311 = |what: &str| what.starts_with("3.1.1") || what.ends_with("bad time");
    for protocol in [Protocol::V5, Protocol::V311] {
        let garbage: Vec<_> = garbage
            .iter()
            .filter(|(what, _)| protocol == Protocol::V5 || for_v311(what))
            .collect();
        let client = support::config("garbage")
            .protocol(protocol)
            .connect()
            .await?;
        let topic = support::topic();
        let mut c = client.consumer();
        c.subscribe(&topic, 1).await?;
        mosquitto_pub(&topic, &["-m", "good-0"])?;
        for (i, (_, args)) in garbage.iter().enumerate() {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mosquitto_pub(&topic, &args)?;
            mosquitto_pub(&topic, &["-m", &format!("good-{}", i + 1)])?;
        }
        // Random bytes without properties are a valid raw message.
        mosquitto_pub(&topic, &["-f", &random])?;

        let next = async |c: &mut polybus_mqtt::MqttConsumer| {
            tokio::time::timeout(Duration::from_secs(10), c.next())
                .await
                .expect("in time")
        };
        let d = next(&mut c).await?;
        assert_eq!(d.payload(), b"good-0");
        d.ack().await?;
        for (i, (what, _)) in garbage.iter().enumerate() {
            let e = next(&mut c).await.expect_err(what);
            assert_eq!(e.kind(), ErrorKind::Codec, "{protocol:?} {what}: {e}");
            assert_eq!(e.backend(), "mqtt");
            println!("mqtt {protocol:?} {what}: {e}");
            let d = next(&mut c).await?;
            assert_eq!(
                d.payload(),
                format!("good-{}", i + 1).as_bytes(),
                "after {what}"
            );
            d.ack().await?;
        }
        let d = next(&mut c).await?;
        assert_eq!(d.payload(), &bytes[..]);
        d.ack().await?;
        client.close().await?;
    }
    Ok(())
}
