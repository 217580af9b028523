//! Hostile input: topic names through the public API (property test, no broker), records at
//! and over the size limit, and garbage a raw rdkafka producer writes to tansu: typed errors,
//! no panic, and a bad record does not sink its neighbours.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use polybus_core::{Consumer, ErrorKind, Event};
use polybus_kafka::rdkafka::message::{Header, OwnedHeaders};
use polybus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use polybus_kafka::{KafkaAdmin, KafkaConfig, KafkaConsumer, KafkaProducer, validate_topic};
use proptest::prelude::*;

use crate::common::{brokers, test_config, topic};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// `validate_topic` is total and accepts exactly Kafka's legal names.
    #[test]
    fn topic_validation_is_total_and_exact(name in "\\PC{0,8}|[a-zA-Z0-9._\\-]{0,260}|[\\x00-\\x7f]{0,12}") {
        let legal = !name.is_empty()
            && name.len() <= polybus_kafka::MAX_TOPIC_LEN
            && name != "."
            && name != ".."
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        match validate_topic(&name) {
            Ok(()) => prop_assert!(legal, "{name:?} accepted"),
            Err(e) => {
                prop_assert!(!legal, "{name:?} refused: {e}");
                prop_assert_eq!(e.kind(), ErrorKind::InvalidTopic);
            }
        }
    }
}

#[tokio::test]
async fn hostile_topics_refused_before_any_broker_is_asked() -> anyhow::Result<()> {
    let cfg = KafkaConfig::new("127.0.0.1:1", "g");
    let p = KafkaProducer::new_with_config(&cfg)?;
    let c = KafkaConsumer::new(&cfg)?;
    let long = "a".repeat(polybus_kafka::MAX_TOPIC_LEN + 1);
    for bad in [
        "",
        ".",
        "..",
        "a b",
        "tab\t",
        "nl\n",
        "nul\0",
        "esc\u{1b}",
        "ü",
        "a/b",
        "a*",
        "a>",
        "a#",
        "a+",
        "$SYS",
        long.as_str(),
    ] {
        let e = p.publish(bad, Event::new("x")).await.expect_err(bad);
        ensure!(e.kind() == ErrorKind::InvalidTopic, "publish {bad:?}: {e}");
        let first = c.subscribe(bad).next().await.context("an item")?;
        ensure!(
            matches!(&first, Err(e) if e.kind() == ErrorKind::InvalidTopic),
            "subscribe {bad:?}: {first:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_records_at_and_over_the_size_limit() -> anyhow::Result<()> {
    let limit = 64 * 1024;
    let cfg = test_config(&brokers(), &topic("g"))
        .with_message_max_bytes(limit)
        .with_topic_defaults(1, 1);
    let p = KafkaProducer::new_with_config(&cfg)?;
    let t = topic("hostile-size");
    // The largest event that fits: the limit counts key, headers and record overhead.
    let ev = |n: usize| {
        Event::builder()
            .id("i")
            .source("s")
            .kind("k")
            .data(vec![9u8; n])
            .build()
    };
    let mut n = limit;
    loop {
        match p.publish(&t, ev(n)?).await {
            Ok(_) => break,
            Err(e) => {
                ensure!(e.kind() == ErrorKind::PayloadTooLarge, "{n}: {e}");
                n -= 16;
                ensure!(n > limit - 2048, "nothing near the limit fits");
            }
        }
    }
    let e = p.publish(&t, ev(n + 1024)?).await.expect_err("over");
    ensure!(e.kind() == ErrorKind::PayloadTooLarge, "{e}");
    let e = p.publish(&t, ev(16 << 20)?).await.expect_err("16 MiB");
    ensure!(e.kind() == ErrorKind::PayloadTooLarge, "{e}");
    println!("kafka: largest accepted payload with limit {limit}: {n} bytes");
    let c = KafkaConsumer::new(&cfg)?;
    let mut s = std::pin::pin!(c.subscribe(&t));
    let d = tokio::time::timeout(Duration::from_secs(30), s.next())
        .await?
        .context("open")??;
    ensure!(d.payload().len() == n, "{} != {n}", d.payload().len());
    d.ack().await?;
    Ok(())
}

/// A raw rdkafka producer writes good records and malformed CloudEvents of several kinds into
/// one partition; the polybus consumer yields each good one, a `Codec` error for each bad one,
/// and keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_wire_garbage_yields_codec_errors_and_the_stream_goes_on() -> anyhow::Result<()> {
    let cfg = test_config(&brokers(), &topic("g")).with_topic_defaults(1, 1);
    let t = topic("hostile-wire");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let raw: FutureProducer = cfg.producer_client_config().create()?;

    let hdrs = |pairs: &[(&str, &[u8])]| {
        pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(*v),
            })
        })
    };
    let ce: [(&str, &[u8]); 4] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"1"),
        ("ce_source", b"s"),
        ("ce_type", b"t"),
    ];
    let with = |extra: (&'static str, &'static [u8])| {
        let mut v = ce.to_vec();
        v.push(extra);
        hdrs(&v)
    };
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let structured = [("content-type", &b"application/cloudevents+json"[..])];
    let garbage: Vec<(&str, OwnedHeaders, Vec<u8>)> = vec![
        (
            "binary CloudEvent without id",
            hdrs(&[
                ("ce_specversion", b"1.0"),
                ("ce_source", b"s"),
                ("ce_type", b"t"),
            ]),
            b"x".to_vec(),
        ),
        (
            "unsupported specversion",
            hdrs(&[
                ("ce_specversion", b"0.3"),
                ("ce_id", b"1"),
                ("ce_source", b"s"),
                ("ce_type", b"t"),
            ]),
            b"x".to_vec(),
        ),
        (
            "time that is not RFC 3339",
            with(("ce_time", b"\xff\xfe")),
            b"x".to_vec(),
        ),
        (
            "structured, random bytes",
            hdrs(&structured),
            random.clone(),
        ),
        (
            "structured, JSON string",
            hdrs(&structured),
            br#""just a string""#.to_vec(),
        ),
        (
            "structured, nested attribute",
            hdrs(&structured),
            br#"{"specversion":"1.0","id":{"x":1},"source":"s","type":"t"}"#.to_vec(),
        ),
    ];

    let send = async |headers: Option<OwnedHeaders>, payload: &[u8], key: &[u8]| {
        let mut r = FutureRecord::to(&t).payload(payload).key(key);
        if let Some(h) = headers {
            r = r.headers(h);
        }
        raw.send(r, Duration::from_secs(10))
            .await
            .map(drop)
            .map_err(|(e, _)| anyhow::anyhow!("raw send: {e}"))
    };
    send(None, b"good-0", b"k").await?;
    for (i, (_, h, payload)) in garbage.iter().enumerate() {
        send(Some(h.clone()), payload, b"k").await?;
        send(None, format!("good-{}", i + 1).as_bytes(), b"k").await?;
    }
    // Random bytes, a binary key and header values that are not UTF-8, without CloudEvents
    // attributes: a raw record, delivered (header values decoded lossily).
    send(
        Some(hdrs(&[("x-bin", b"\xff\x00\xfe")])),
        &random,
        b"\x00\xff",
    )
    .await?;

    let c = KafkaConsumer::new(&cfg)?;
    let mut s = std::pin::pin!(c.subscribe(&t));
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("in time")
            .expect("stream open")
    };
    let d = next().await?;
    ensure!(d.payload() == b"good-0");
    d.ack().await?;
    for (i, (what, _, _)) in garbage.iter().enumerate() {
        let e = next().await.expect_err(what);
        ensure!(e.kind() == ErrorKind::Codec, "{what}: {e}");
        ensure!(e.backend() == "kafka");
        println!("kafka {what}: {e}");
        let d = next().await?;
        ensure!(
            d.payload() == format!("good-{}", i + 1).as_bytes(),
            "after {what}: {:?}",
            d.payload()
        );
        d.ack().await?;
    }
    let d = next().await?;
    ensure!(d.payload() == &random[..]);
    ensure!(d.event().key() == Some(&b"\x00\xff"[..]));
    ensure!(
        d.event().headers().get("x-bin") == Some("\u{fffd}\u{0}\u{fffd}"),
        "{:?}",
        d.event().headers()
    );
    d.ack().await?;
    Ok(())
}
