//! JetStream failures are typed errors: refused credentials, oversized payloads, invalid
//! subjects and names, acks that never come (server down), use after close.

use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_jetstream::{JsOptions, StreamPolicy};
use polybus_testkit::brokers::BrokerProcess;

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn wrong_credentials_are_unauthorized() -> anyhow::Result<()> {
    let server = BrokerProcess::nats(
        "authorization { users = [ { user: \"app\", password: \"s3cret\" } ] }\n",
    )
    .await?;
    let e = JsOptions::new(server.url())
        .user_password("app", "wrong")
        .producer()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert_eq!(e.backend(), "jetstream");
    let e = JsOptions::new(server.url()).consumer().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    let js = JsOptions::new(server.url())
        .user_password("app", "s3cret")
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "T_".into(),
        })
        .connect()
        .await?;
    let r = js.producer().publish("auth.ok", Event::new("x")).await?;
    assert_eq!(r.sequence(), Some(1));
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn payload_limit_and_invalid_subjects() -> anyhow::Result<()> {
    let server = BrokerProcess::nats("max_payload: 2048\n").await?;
    let js = JsOptions::new(server.url())
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "T_".into(),
        })
        .connect()
        .await?;
    let p = js.producer();
    let e = p
        .publish("big", Event::new(vec![0u8; 2048]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    p.publish("big", Event::new(vec![0u8; 1024])).await?;
    for bad in ["", "a b", "a.*", "a.>", "a..b"] {
        let e = p.publish(bad, Event::new("x")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}: {e}");
    }
    let c = js.consumer(Some("bad.group"));
    let mut s = std::pin::pin!(c.subscribe("big"));
    let e = s.next().await.expect("error item").unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidTopic,
        "group names are consumer names: {e}"
    );
    assert_eq!(js.consumer(None).capabilities().max_payload, Some(2048));
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn publish_without_ack_times_out_and_close_is_final() -> anyhow::Result<()> {
    let mut server = BrokerProcess::nats("").await?;
    let p = JsOptions::new(server.url())
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "T_".into(),
        })
        .publish_timeout(Duration::from_millis(500))
        .nats(|n| n.close_timeout(Duration::from_secs(1)))
        .producer()
        .await?;
    p.publish("down", Event::new("stored")).await?;
    server.kill().await;
    let started = std::time::Instant::now();
    let e = p.publish("down", Event::new("lost?")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Close cannot flush to a dead server: it says so, and the producer is closed anyway.
    let _ = p.close().await;
    let e = p.publish("down", Event::new("x")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    p.close().await?;
    Ok(())
}
