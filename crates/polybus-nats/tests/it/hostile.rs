//! Hostile input against a real nats-server: bad subjects and headers through the public
//! API, payloads at and over the server's limit, and garbage a raw client puts on the wire.
//! Every refusal is a typed error, nothing panics, and a bad message does not sink its
//! neighbours.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_nats::async_nats::HeaderMap;
use polybus_nats::{
    NatsConsumer, NatsProducer, validate_publish_subject, validate_subscribe_subject,
};
use polybus_testkit::brokers::BrokerProcess;

/// Subjects the public API must refuse with `InvalidTopic` on publish (and, but for the
/// wildcards, on subscribe).
fn bad_subjects() -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = [
        ("", true),
        (" ", true),
        ("a b", true),
        ("tab\tx", true),
        ("cr\rx", true),
        ("nl\nx", true),
        ("nul\0x", true),
        ("del\u{7f}x", true),
        ("esc\u{1b}x", true),
        ("nbsp\u{a0}x", true),
        (".a", true),
        ("a.", true),
        ("a..b", true),
        ("a.*", false),
        ("a.>", false),
        ("*", false),
        ("a.>.b", true),
        ("PUB x 1\r\n", true),
    ]
    .iter()
    .map(|(s, on_subscribe)| ((*s).to_owned(), *on_subscribe))
    .collect();
    v.push(("a".repeat(polybus_nats::MAX_SUBJECT_LEN + 1), true));
    v
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_subjects_and_headers_are_typed_errors() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let p = NatsProducer::connect(&url).await?;
    let c = NatsConsumer::connect(&url).await?;
    for (subject, refused_on_subscribe) in bad_subjects() {
        let e = p.publish(&subject, Event::new("x")).await.unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidTopic,
            "publish {subject:?}: {e}"
        );
        if refused_on_subscribe {
            let mut s = std::pin::pin!(c.subscribe(&subject));
            let e = s.next().await.expect("an item").unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::InvalidTopic,
                "subscribe {subject:?}: {e}"
            );
        }
    }
    // Header names and values the API refuses before anything is sent.
    for (name, value) in [
        ("", "v"),
        ("has space", "v"),
        ("colon:", "v"),
        ("nl\n", "v"),
        ("ok", "a\r\nInjected: 1"),
        ("ok", "nul\0"),
    ] {
        let e = Event::builder()
            .header(name, value)
            .build()
            .expect_err("bad header");
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidHeader,
            "{name:?}={value:?}: {e}"
        );
    }
    // Header values with spaces, quotes, percent signs and non-ASCII travel intact.
    let subject = format!("hostile.hdr.{}", uuid::Uuid::new_v4().simple());
    let mut s = std::pin::pin!(c.subscribe(&subject));
    let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
    let odd = "a \"quoted\" 100% value: ü € 😀\ttab";
    let ev = Event::builder()
        .header("x-odd", odd)
        .header("tenant", odd)
        .build()?;
    p.publish(&subject, ev).await?;
    let d = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .expect("open")?;
    assert_eq!(d.event().headers().get("x-odd"), Some(odd));
    assert_eq!(d.event().headers().get("tenant"), Some(odd));
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_payloads_at_and_over_the_limit() -> anyhow::Result<()> {
    let server = BrokerProcess::nats("max_payload: 65536\n").await?;
    let p = NatsProducer::connect(&server.url()).await?;
    let c = NatsConsumer::connect(&server.url()).await?;
    let mut s = std::pin::pin!(c.subscribe("limit"));
    let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
    // Raw events carry CloudEvents headers; find the largest payload that fits exactly.
    let ev = |n: usize| {
        Event::builder()
            .id("i")
            .source("s")
            .kind("k")
            .data(vec![7u8; n])
            .build()
    };
    let mut fits = 65536;
    let e = loop {
        match p.publish("limit", ev(fits)?).await {
            Ok(_) => break None,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
                fits -= 1;
                if fits < 60_000 {
                    break Some(e);
                }
            }
        }
    };
    assert!(e.is_none(), "nothing near the limit fits");
    let d = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .expect("open")?;
    assert_eq!(
        d.payload().len(),
        fits,
        "exactly at the limit arrives intact"
    );
    let e = p.publish("limit", ev(fits + 1)?).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "one byte over: {e}");
    let e = p.publish("limit", ev(10 << 20)?).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "10 MiB: {e}");
    // Empty payload is fine.
    p.publish("limit", Event::new(Bytes::new())).await?;
    let d = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .expect("open")?;
    assert!(d.payload().is_empty());
    Ok(())
}

/// A raw client publishes, in order: good, malformed CloudEvents of several kinds, garbage,
/// good. The polybus subscriber yields each good one, a `Codec` error for each malformed one,
/// and keeps going.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn hostile_wire_garbage_yields_codec_errors_and_the_stream_goes_on() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let raw = polybus_nats::async_nats::connect(&url).await?;
    let c = NatsConsumer::connect(&url).await?;
    let subject = format!("hostile.wire.{}", uuid::Uuid::new_v4().simple());
    let mut s = std::pin::pin!(c.subscribe(&subject));
    let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;

    let headers = |pairs: &[(&str, &str)]| {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, *v);
        }
        h
    };
    let ce = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "s"),
        ("ce-type", "t"),
    ];
    let mut garbage: Vec<(&str, HeaderMap, Bytes)> = vec![
        (
            "binary CloudEvent without id",
            headers(&[
                ("ce-specversion", "1.0"),
                ("ce-source", "s"),
                ("ce-type", "t"),
            ]),
            Bytes::from_static(b"x"),
        ),
        (
            "unsupported specversion",
            headers(&[
                ("ce-specversion", "0.3"),
                ("ce-id", "1"),
                ("ce-source", "s"),
                ("ce-type", "t"),
            ]),
            Bytes::from_static(b"x"),
        ),
        (
            "time that is not RFC 3339",
            {
                let mut h = headers(&ce);
                h.insert("ce-time", "yesterday");
                h
            },
            Bytes::from_static(b"x"),
        ),
        (
            "bad percent-encoding",
            {
                let mut h = headers(&ce);
                h.insert("ce-tenant", "%zz");
                h
            },
            Bytes::from_static(b"x"),
        ),
        (
            "percent-encoded invalid UTF-8",
            {
                let mut h = headers(&ce);
                h.insert("ce-tenant", "%C0%A0%FF");
                h
            },
            Bytes::from_static(b"x"),
        ),
        (
            "structured mode, not JSON",
            headers(&[("content-type", "application/cloudevents+json")]),
            Bytes::from_static(b"\xff\xfe{{{ not json"),
        ),
        (
            "structured mode, JSON array",
            headers(&[("content-type", "application/cloudevents+json")]),
            Bytes::from_static(b"[1,2,3]"),
        ),
        (
            "structured mode, bad base64",
            headers(&[(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )]),
            Bytes::from_static(
                br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"!!!"}"#,
            ),
        ),
    ];
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    garbage.push((
        "structured mode, random bytes",
        headers(&[("content-type", "application/cloudevents+json")]),
        Bytes::from(random.clone()),
    ));

    raw.publish(subject.clone(), Bytes::from_static(b"good-0"))
        .await?;
    for (i, (_, h, payload)) in garbage.iter().enumerate() {
        raw.publish_with_headers(subject.clone(), h.clone(), payload.clone())
            .await?;
        raw.publish(subject.clone(), Bytes::from(format!("good-{}", i + 1)))
            .await?;
    }
    // Random bytes without headers are a valid raw message: delivered as they are.
    raw.publish(subject.clone(), Bytes::from(random.clone()))
        .await?;
    raw.flush().await?;

    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("in time")
            .expect("stream open")
    };
    assert_eq!(next().await?.payload(), b"good-0");
    for (i, (what, _, _)) in garbage.iter().enumerate() {
        let e = next().await.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::Codec, "{what}: {e}");
        assert_eq!(e.backend(), "nats");
        println!("nats {what}: {e}");
        let good = next().await?;
        assert_eq!(
            good.payload(),
            format!("good-{}", i + 1).as_bytes(),
            "after {what}"
        );
    }
    assert_eq!(next().await?.payload(), &random[..]);
    Ok(())
}

#[test]
fn subject_validators_agree_with_the_rules() {
    // A small deterministic sweep over every ASCII character in every position of a
    // three-token subject (the property tests of core cover arbitrary strings).
    for c in (0u8..=127).map(char::from) {
        for subject in [
            format!("{c}"),
            format!("a.{c}.b"),
            format!("a{c}b"),
            format!("a.b{c}"),
        ] {
            let publish = validate_publish_subject(&subject, "nats");
            let subscribe = validate_subscribe_subject(&subject, "nats");
            let bad_char = c.is_whitespace() || c.is_control();
            let bad_token = subject.split('.').any(str::is_empty);
            if bad_char || bad_token {
                assert!(publish.is_err() && subscribe.is_err(), "{subject:?}");
            }
            if let Err(e) = publish {
                assert_eq!(e.kind(), ErrorKind::InvalidTopic);
            }
            if subscribe.is_ok() && !subject.split('.').any(|t| t == "*" || t == ">") {
                assert!(
                    validate_publish_subject(&subject, "nats").is_ok(),
                    "{subject:?}"
                );
            }
        }
    }
}
