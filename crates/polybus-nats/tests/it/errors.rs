//! Every failure the adapter promises is a typed error: invalid subjects, oversized payloads,
//! no responders, timeouts, refused credentials, unreachable servers, use after close.

use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::mq::MessageConsumer;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_nats::{NatsConsumer, NatsOptions, NatsProducer};
use polybus_testkit::brokers::{BrokerProcess, free_port};

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn invalid_subjects_are_invalid_topic_everywhere() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let p = NatsProducer::connect(&url).await?;
    let mut c = NatsConsumer::connect(&url).await?;
    for bad in [
        "", "a b", "a..b", ".a", "a.", "a.*", "a.>", "tab\tx", "nl\nx",
    ] {
        let e = p.publish(bad, Event::new("x")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "publish {bad:?}: {e}");
        let e = p.request(bad, Event::new("x")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "request {bad:?}: {e}");
    }
    for bad in ["", "a b", "a..b", ".a", "a.", "a.>.b"] {
        let e = MessageConsumer::subscribe(&mut c, bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "subscribe {bad:?}: {e}");
        let mut s = std::pin::pin!(Consumer::subscribe(&c, bad));
        let first = s.next().await.expect("an error item");
        assert_eq!(first.unwrap_err().kind(), ErrorKind::InvalidTopic);
        assert!(s.next().await.is_none(), "the stream ends after the error");
    }
    // Wildcards are fine on subscribe.
    MessageConsumer::subscribe(&mut c, "polybus.test.*.x").await?;
    MessageConsumer::subscribe(&mut c, "polybus.test.>").await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn payload_limit_comes_from_the_server() -> anyhow::Result<()> {
    let server = BrokerProcess::nats("max_payload: 4096\n").await?;
    let p = NatsProducer::connect(&server.url()).await?;
    let c = NatsConsumer::connect(&server.url()).await?;
    assert_eq!(p.connection().max_payload(), 4096);
    assert_eq!(c.capabilities().max_payload, Some(4096));
    let mut s = std::pin::pin!(Consumer::subscribe(&c, "limits"));
    // Poll once so the subscription is set up.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s.next())
            .await
            .is_err()
    );
    let e = p
        .publish("limits", Event::new(vec![0u8; 4096]))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::PayloadTooLarge,
        "headers count too: {e}"
    );
    let e = p
        .request("limits", Event::new(vec![0u8; 5000]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    // A message that fits goes through, and the connection is still fine.
    p.publish("limits", Event::new(vec![1u8; 3000])).await?;
    let d = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .expect("open")?;
    assert_eq!(d.payload().len(), 3000);
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn request_without_responder_is_not_found_and_slow_responder_times_out() -> anyhow::Result<()>
{
    let url = crate::nats_url();
    let p = NatsOptions::new(&url)
        .request_timeout(Duration::from_millis(300))
        .producer()
        .await?;
    let subject = format!("polybus.test.rpc.{}", uuid::Uuid::new_v4().simple());
    let e = p.request(&subject, Event::new("ping")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "no responders: {e}");

    // A responder that never answers: the request times out.
    let silent = NatsConsumer::connect(&url).await?;
    let mut requests = std::pin::pin!(silent.serve(&subject));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), requests.next())
            .await
            .is_err()
    );
    let started = std::time::Instant::now();
    let e = p.request(&subject, Event::new("ping")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(3));
    let e = p
        .request_with_timeout(
            &subject,
            Event::new("ping"),
            Some(Duration::from_millis(50)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn request_reply_round_trip_keeps_attributes() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let subject = format!("polybus.test.rpc.{}", uuid::Uuid::new_v4().simple());
    let server = NatsConsumer::connect(&url).await?.queue_group("time");
    let mut requests = Box::pin(server.serve(&subject));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), requests.next())
            .await
            .is_err()
    );
    let task = tokio::spawn(async move {
        let req = requests.next().await.expect("open")?;
        assert!(req.expects_reply());
        let answer = Event::builder()
            .kind("time.reply")
            .header("tenant", req.event().headers().get("tenant").unwrap_or("?"))
            .data(format!(
                "re: {}",
                String::from_utf8_lossy(req.event().data())
            ))
            .build()?;
        req.respond(answer).await
    });
    let p = NatsProducer::connect(&url).await?;
    let reply = p
        .request(
            &subject,
            Event::builder()
                .header("tenant", "eu")
                .data("now?")
                .build()?,
        )
        .await?;
    assert_eq!(reply.data().as_ref(), b"re: now?");
    assert_eq!(reply.kind(), "time.reply");
    assert_eq!(reply.headers().get("tenant"), Some("eu"));
    task.await??;
    Ok(())
}

const AUTH_CONF: &str = r#"
authorization {
  users = [
    { user: "app", password: "s3cret" }
  ]
}
"#;

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn wrong_credentials_are_unauthorized() -> anyhow::Result<()> {
    let server = BrokerProcess::nats(AUTH_CONF).await?;
    let url = server.url();
    for opts in [
        NatsOptions::new(&url),
        NatsOptions::new(&url).user_password("app", "wrong"),
        NatsOptions::new(&url).user_password("nobody", "s3cret"),
        NatsOptions::new(&url).token("not-a-token"),
    ] {
        let shown = format!("{opts:?}");
        let e = opts.connect().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "{shown}: {e}");
        assert!(!e.to_string().contains("s3cret"), "secret in {e}");
    }
    // Credentials in the URL are refused the same way and never shown.
    let e = NatsProducer::connect(&format!("nats://app:wrong@127.0.0.1:{}", server.port()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(!e.to_string().contains("wrong"), "password in {e}");
    let e = NatsOptions::new(&url)
        .credentials_file("/nonexistent/polybus.creds")
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    // The right ones work.
    let p = NatsOptions::new(&url)
        .user_password("app", "s3cret")
        .producer()
        .await?;
    p.publish("authorized", Event::new("ok")).await?;
    p.close().await?;
    // So do the right ones in the URL (taken out of the URL the client sees and logs).
    let p =
        NatsProducer::connect(&format!("nats://app:s3cret@127.0.0.1:{}", server.port())).await?;
    p.publish("authorized", Event::new("ok")).await?;
    p.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn token_auth_works_and_wrong_token_is_unauthorized() -> anyhow::Result<()> {
    let server = BrokerProcess::nats("authorization { token: \"t0ken\" }\n").await?;
    let e = NatsOptions::new(server.url())
        .token("nope")
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    NatsOptions::new(server.url())
        .token("t0ken")
        .connect()
        .await?;
    NatsOptions::new(format!("nats://t0ken@127.0.0.1:{}", server.port()))
        .connect()
        .await?;
    Ok(())
}

#[tokio::test]
async fn unreachable_server_is_connect() -> anyhow::Result<()> {
    let port = free_port()?;
    let e = NatsProducer::connect(&format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    assert!(e.is_retryable());
    assert_eq!(e.backend(), "nats");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn use_after_close_is_closed() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let p = NatsProducer::connect(&url).await?;
    let clone = p.clone();
    p.close().await?;
    for producer in [&p, &clone] {
        let e = producer
            .publish("polybus.test.closed", Event::new("x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed);
        let e = producer
            .request("polybus.test.closed", Event::new("x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed);
    }
    assert!(p.connection().is_closed());
    p.flush().await?;
    p.close().await?;

    let mut c = NatsConsumer::connect(&url).await?;
    MessageConsumer::subscribe(&mut c, "polybus.test.closed").await?;
    c.close().await?;
    let e = c.next().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn nack_is_unsupported_and_ack_term_are_no_ops() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let subject = format!("polybus.test.settle.{}", uuid::Uuid::new_v4().simple());
    let mut c = NatsConsumer::connect(&url).await?;
    MessageConsumer::subscribe(&mut c, &subject).await?;
    let p = NatsProducer::connect(&url).await?;
    p.publish(&subject, Event::new("one")).await?;
    p.publish(&subject, Event::new("two")).await?;
    let mut d = c.next().await?;
    assert_eq!(d.backend(), "nats");
    assert_eq!(d.delivery_count(), 1);
    let e = d.in_progress().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let e = d.nack(Duration::ZERO).await.unwrap_err();
    assert_eq!(e.error().kind(), ErrorKind::Unsupported);
    e.into_delivery().ack().await?;
    c.next().await?.term().await?;
    // Nothing comes back: at-most-once.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err()
    );
    Ok(())
}
