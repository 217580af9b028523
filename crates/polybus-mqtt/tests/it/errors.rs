//! Bad input and refusals come back as typed errors, promptly.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_mqtt::{MqttConfig, MqttProducer, Protocol};
use polybus_testkit::brokers::free_port;

use crate::support;

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn wildcards_and_bad_topics_are_invalid_topic() -> anyhow::Result<()> {
    let client = support::connect("errors").await?;
    let p = client.producer();
    for bad in [
        "a/+",
        "a/#",
        "#",
        "",
        "with space",
        "nul\0",
        &"x".repeat(65_536),
    ] {
        let e = p.publish(bad, b"x", 1).await.expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}: {e}");
        let e = Publisher::publish(&p, bad, Event::new("x"))
            .await
            .expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}: {e}");
    }
    // Wildcards are fine in subscriptions, malformed filters are not.
    let mut c = client.consumer();
    c.subscribe("polybus/test/+/x/#", 1).await?;
    for bad in ["a/#/b", "a+", "", "$share/g", "$share/g/"] {
        let e = c.subscribe(bad, 1).await.expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}: {e}");
    }
    let s = client.subscriber(None);
    let mut stream = std::pin::pin!(s.subscribe("a/#/b"));
    let first = stream.next().await.expect("an error item");
    assert_eq!(first.expect_err("invalid").kind(), ErrorKind::InvalidTopic);
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the error"
    );
    let bad_group = client.subscriber(Some("a/b"));
    let mut stream = std::pin::pin!(bad_group.subscribe("t"));
    let e = stream
        .next()
        .await
        .expect("an error item")
        .expect_err("group with '/'");
    assert_eq!(e.kind(), ErrorKind::InvalidTopic);
    // The connection still works.
    p.publish(&support::topic(), b"ok", 1).await?;
    client.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn oversized_payload_is_refused_before_sending() -> anyhow::Result<()> {
    let client = support::config("big")
        .max_packet_size(64 * 1024)
        .connect()
        .await?;
    let limit = client.capabilities().max_payload.expect("a declared limit");
    assert_eq!(limit, 48 * 1024);
    let topic = support::topic();
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    let p = client.producer();
    let started = Instant::now();
    let e = p
        .publish(&topic, vec![0u8; limit + 1], 1)
        .await
        .expect_err("too large");
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "refused before sending"
    );
    // Headers count too: a payload that fits with a huge header does not.
    let ev = Event::builder()
        .header("big", "h".repeat(20 * 1024))
        .data(vec![1u8; limit - 1024])
        .build()?;
    let e = Publisher::publish(&p, &topic, ev)
        .await
        .expect_err("packet too large");
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    // Exactly the limit is accepted and arrives intact.
    p.publish(&topic, vec![7u8; limit], 1).await?;
    let d = c.next().await?;
    assert_eq!(d.payload().len(), limit);
    d.ack().await?;
    client.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn refused_credentials_are_unauthorized() -> anyhow::Result<()> {
    let (_broker, port) = support::auth_broker("alice", "correct horse").await?;
    for protocol in [Protocol::V5, Protocol::V311] {
        let cfg = |user: Option<(&str, &str)>| {
            let c = MqttConfig::new("127.0.0.1", port, support::client_id("auth"))
                .protocol(protocol)
                .connect_timeout(Duration::from_secs(5));
            match user {
                Some((u, pw)) => c.credentials(u, pw),
                None => c,
            }
        };
        for creds in [Some(("alice", "wrong")), Some(("mallory", "x")), None] {
            let started = Instant::now();
            let e = cfg(creds).connect().await.expect_err("refused");
            assert_eq!(
                e.kind(),
                ErrorKind::Unauthorized,
                "{protocol:?} {creds:?}: {e}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(
                !e.to_string().contains("wrong"),
                "no password in errors: {e}"
            );
        }
        let ok = cfg(Some(("alice", "correct horse"))).connect().await?;
        ok.producer().publish("polybus/test/auth", b"in", 1).await?;
        ok.close().await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn broker_down_at_connect_is_a_connect_error_within_bounded_time() -> anyhow::Result<()> {
    // Nothing listens on a free port.
    let port = free_port()?;
    let started = Instant::now();
    let e = MqttProducer::connect("127.0.0.1", port, support::client_id("down"))
        .await
        .expect_err("nothing listens");
    assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    assert!(e.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Something accepts TCP but never answers CONNACK: the connect timeout bounds the wait.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent = listener.local_addr()?.port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let started = Instant::now();
    let e = MqttConfig::new("127.0.0.1", silent, support::client_id("silent"))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect_err("no CONNACK");
    assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    hold.abort();
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn nack_is_unsupported_and_bad_qos_is_refused() -> anyhow::Result<()> {
    let client = support::connect("nack").await?;
    let topic = support::topic();
    let mut c = client.consumer();
    assert_eq!(
        c.subscribe(&topic, 3).await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    c.subscribe(&topic, 1).await?;
    let p = client.producer();
    assert_eq!(
        p.publish(&topic, b"x", 7).await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    p.publish(&topic, b"x", 1).await?;
    let d = c.next().await?;
    let e = d.nack(Duration::ZERO).await.expect_err("MQTT has no nack");
    assert_eq!(e.error().kind(), ErrorKind::Unsupported);
    assert_eq!(e.error().backend(), "mqtt");
    e.into_delivery().ack().await?;
    client.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn closed_connection_refuses_work() -> anyhow::Result<()> {
    let client = support::connect("closed").await?;
    let p = client.producer();
    let mut c = client.consumer();
    let s = client.subscriber(None);
    client.close().await?;
    client.close().await?;
    let e = p.publish("polybus/test/x", b"x", 1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert_eq!(
        c.subscribe("polybus/test/x", 1).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(c.next().await.unwrap_err().kind(), ErrorKind::Closed);
    let mut stream = std::pin::pin!(s.subscribe("polybus/test/x"));
    let e = stream.next().await.expect("an error item").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn mqtt311_refuses_headers_it_cannot_carry() -> anyhow::Result<()> {
    let client = support::config("v311")
        .protocol(Protocol::V311)
        .connect()
        .await?;
    let p = client.producer();
    let ev = Event::builder()
        .header("X-Request-Id", "r1")
        .data("x")
        .build()?;
    let e = Publisher::publish(&p, &support::topic(), ev)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{e}");
    // Extension-style headers travel inside the structured event.
    let topic = support::topic();
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    let ev = Event::builder().header("tenant", "eu").data("x").build()?;
    Publisher::publish(&p, &topic, ev.clone()).await?;
    let d = c.next().await?;
    assert_eq!(d.event().id(), ev.id());
    assert_eq!(d.event().headers().get("tenant"), Some("eu"));
    d.ack().await?;
    client.close().await?;
    Ok(())
}
