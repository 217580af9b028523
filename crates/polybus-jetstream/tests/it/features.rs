//! JetStream-specific behaviour beyond the conformance suite: dedup receipts, sequences,
//! bounded in-flight, confirmed acks, in-progress, stream policies, the seed API.

use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::mq::MessageConsumer;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_jetstream::{
    ConsumerSettings, JsConsumer, JsOptions, JsProducer, StreamPolicy, StreamSettings,
};
use polybus_testkit::batch;

fn topic() -> String {
    format!("polybus.test.{}", uuid::Uuid::new_v4().simple())
}

fn per_topic(url: &str) -> JsOptions {
    JsOptions::new(url)
        .stream_policy(StreamPolicy::PerTopic {
            prefix: crate::TEST_PREFIX.into(),
        })
        .stream_settings(StreamSettings::default().max_age(crate::TEST_STREAM_AGE))
}

async fn next(
    s: &mut std::pin::Pin<&mut polybus_jetstream::JsSubscription>,
    within: Duration,
) -> Option<polybus_core::Delivery> {
    match tokio::time::timeout(within, s.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("subscription error: {e}"),
        _ => None,
    }
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn duplicate_publish_is_stored_once_and_reported() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let js = per_topic(&url).connect().await?;
    let p = js.producer();
    let t = topic();
    let ev = Event::new("once");
    let first = p.publish(&t, ev.clone()).await?;
    let again = p.publish(&t, ev.clone()).await?;
    assert!(!first.is_duplicate());
    assert!(again.is_duplicate(), "{again:?}");
    assert_eq!(
        first.sequence(),
        again.sequence(),
        "the stored copy's sequence"
    );
    let other = p.publish(&t, Event::new("other")).await?;
    assert_eq!(other.sequence(), first.sequence().map(|s| s + 1));

    let c = js.consumer(None);
    let mut s = std::pin::pin!(c.subscribe(&t));
    let d = next(&mut s, Duration::from_secs(10)).await.expect("first");
    assert_eq!(d.event().id(), ev.id());
    assert_eq!(
        d.sequence(),
        first.sequence(),
        "receipt sequence = stream sequence"
    );
    assert!(d.event().headers().get("Nats-Msg-Id").is_none());
    d.ack().await?;
    let d = next(&mut s, Duration::from_secs(10)).await.expect("second");
    assert_eq!(d.payload(), b"other", "the duplicate was not stored");
    d.ack().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn in_flight_is_bounded_by_max_ack_pending() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let t = topic();
    let c = per_topic(&url)
        .consumer_settings(ConsumerSettings::default().max_ack_pending(5))
        .group("bounded")
        .consumer()
        .await?;
    let mut s = std::pin::pin!(c.subscribe(&t));
    let p = per_topic(&url).producer().await?;
    for i in 0..20 {
        p.publish(&t, Event::new(format!("{i}"))).await?;
    }
    let mut held = Vec::new();
    while let Some(d) = next(&mut s, Duration::from_secs(3)).await {
        held.push(d);
    }
    assert_eq!(held.len(), 5, "never more than max_ack_pending unsettled");
    held.remove(0).ack().await?;
    let more = next(&mut s, Duration::from_secs(5))
        .await
        .expect("one more after an ack");
    assert!(next(&mut s, Duration::from_millis(500)).await.is_none());
    held.push(more);
    for d in held {
        d.ack().await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn confirmed_acks_in_progress_nak_delay_and_redelivery_count() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let t = topic();
    let c = per_topic(&url)
        .consumer_settings(
            ConsumerSettings::default()
                .confirm_acks(true)
                .ack_wait(Duration::from_secs(2)),
        )
        .group("confirm")
        .consumer()
        .await?;
    let mut s = std::pin::pin!(c.subscribe(&t));
    let p = per_topic(&url).producer().await?;
    p.publish(&t, Event::new("slow")).await?;
    let mut d = next(&mut s, Duration::from_secs(10))
        .await
        .expect("delivery");
    assert_eq!(d.delivery_count(), 1);
    // Working for 3 s with `in_progress` every second keeps the 2 s ack deadline away.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.in_progress().await?;
    }
    assert!(
        next(&mut s, Duration::from_millis(300)).await.is_none(),
        "in_progress must prevent redelivery"
    );
    let t0 = std::time::Instant::now();
    d.nack(Duration::from_millis(800)).await?;
    let again = next(&mut s, Duration::from_secs(10))
        .await
        .expect("redelivery");
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(again.delivery_count(), 2);
    assert!(again.is_redelivered());
    again.ack().await?; // confirmed by the server (double ack)
    assert!(
        next(&mut s, Duration::from_secs(3)).await.is_none(),
        "acked for good"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn existing_policy_needs_a_covering_stream() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let js = JsOptions::new(&url).connect().await?;
    let t = topic();
    let e = js
        .producer()
        .publish(&t, Event::new("x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let c = js.consumer(None);
    let mut s = std::pin::pin!(c.subscribe(&t));
    let first = s.next().await.expect("an item");
    assert_eq!(first.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(s.next().await.is_none(), "the stream ends after the error");

    // A wildcard stream made with ensure_stream covers every topic under it.
    let prefix = format!("polybus.test.{}", uuid::Uuid::new_v4().simple());
    let name = format!("{}{}", crate::TEST_PREFIX, uuid::Uuid::new_v4().simple());
    js.ensure_stream(
        &name,
        &[&format!("{prefix}.>")],
        &StreamSettings::default().max_age(crate::TEST_STREAM_AGE),
    )
    .await?;
    let r = js
        .producer()
        .publish(&format!("{prefix}.a"), Event::new("a"))
        .await?;
    assert_eq!(r.sequence(), Some(1));
    // A group is one durable per stream and topic: another topic on the same stream is refused.
    js.ensure_consumer(
        &name,
        "g",
        Some(&format!("{prefix}.a")),
        &ConsumerSettings::default(),
    )
    .await?;
    let e = js
        .ensure_consumer(
            &name,
            "g",
            Some(&format!("{prefix}.b")),
            &ConsumerSettings::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Rejected, "{e}");
    let e = js
        .ensure_consumer(
            "NO_SUCH_STREAM_POLYBUS",
            "g",
            None,
            &ConsumerSettings::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = js
        .ensure_stream("bad.name", &["x"], &StreamSettings::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{e}");
    js.context().delete_stream(&name).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn seed_api_connect_send_next_ack() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let stream = format!(
        "{}SEED_{}",
        crate::TEST_PREFIX,
        uuid::Uuid::new_v4().simple()
    );
    let subject = topic();
    let p = JsProducer::connect(&url, &stream, &subject).await?;
    let mut c = JsConsumer::connect(&url, &stream, "consumer").await?;
    let receipt = p.send(b"hello").await?;
    let msg = c.next().await?;
    assert_eq!(msg.payload(), b"hello");
    assert_eq!(msg.sequence(), receipt.sequence());
    msg.ack().await?;
    // A consumer that goes away gives back what it pulled ahead (nak), so the next one
    // bound to the same durable gets it at once rather than after `ack_wait`.
    drop(c);
    // Binding again reuses the stream and the durable consumer (its position included).
    let p2 = JsProducer::connect(&url, &stream, &subject).await?;
    p2.send(b"second").await?;
    let mut c2 = JsConsumer::connect(&url, &stream, "consumer").await?;
    let msg = c2.next().await?;
    assert_eq!(msg.payload(), b"second");
    msg.ack().await?;
    // A stream that does not cover the subject is refused.
    let e = JsProducer::connect(&url, &stream, "elsewhere.subject")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Rejected, "{e}");
    p.jetstream().context().delete_stream(&stream).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn message_consumer_subscribe_misses_nothing_with_deliver_new() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let t = topic();
    let p = per_topic(&url).producer().await?;
    p.publish(&t, Event::new("before")).await?;
    let mut c = per_topic(&url)
        .consumer_settings(
            ConsumerSettings::default().deliver_policy(polybus_jetstream::DeliverPolicy::New),
        )
        .consumer()
        .await?;
    assert_eq!(c.capabilities().backlog, polybus_core::Backlog::Missed);
    MessageConsumer::subscribe(&mut c, &t).await?;
    p.publish(&t, Event::new("after")).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"after");
    d.ack().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn foreign_messages_get_a_stable_id_from_the_stream() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let js = per_topic(&url).connect().await?;
    let t = topic();
    // A polybus event first: it creates the stream and keeps its own id.
    let ours = Event::new("ours");
    js.producer().publish(&t, ours.clone()).await?;

    // Plain async-nats publishers: no CloudEvents headers at all, and only a Nats-Msg-Id.
    let raw = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let bare = raw.publish(t.clone(), "bare".into()).await?.await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-17");
    let with_id = raw
        .publish_with_headers(t.clone(), headers, "with id".into())
        .await?
        .await?;
    assert_eq!(bare.stream, with_id.stream);
    assert_eq!(with_id.sequence, bare.sequence + 1);

    let c = js.consumer(Some("foreign-ids"));
    let mut s = std::pin::pin!(c.subscribe(&t));
    let d = next(&mut s, Duration::from_secs(10)).await.expect("ours");
    assert_eq!(d.event().id(), ours.id(), "a CloudEvent keeps its id");
    d.ack().await?;

    let first = next(&mut s, Duration::from_secs(10)).await.expect("bare");
    assert_eq!(first.payload(), b"bare");
    assert_eq!(first.sequence(), Some(bare.sequence));
    let expected = format!("jetstream:{}:{}", bare.stream, bare.sequence);
    let source = format!("jetstream:{}", bare.stream);
    assert_eq!(first.event().id(), expected);
    assert_eq!(first.event().source(), source);
    let stored_at = first.event().time();
    let age = std::time::SystemTime::now()
        .duration_since(stored_at)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "stored {age:?} ago");
    let nacked_at = std::time::SystemTime::now();
    first.nack(Duration::ZERO).await?;

    // The redelivery of the same stored message: same id, same time.
    let again = loop {
        let d = next(&mut s, Duration::from_secs(10))
            .await
            .expect("the nacked message again");
        if d.payload() == b"bare" {
            break d;
        }
        // The message with a Nats-Msg-Id may come first; settle it later.
        assert_eq!(d.event().id(), "order-17");
        d.nack(Duration::ZERO).await?;
    };
    assert_eq!(again.delivery_count(), 2);
    assert_eq!(again.event().id(), expected);
    assert_eq!(again.event().source(), source);
    assert_eq!(again.event().time(), stored_at);
    assert!(
        again.event().time() < nacked_at,
        "the store time, not the receive time"
    );
    again.ack().await?;

    // The publisher's Nats-Msg-Id is the id, as polybus's own event id is.
    let d = next(&mut s, Duration::from_secs(10))
        .await
        .expect("with a Nats-Msg-Id");
    assert_eq!(d.payload(), b"with id");
    assert_eq!(d.event().id(), "order-17");
    assert_eq!(
        d.event().source(),
        source,
        "a Nats-Msg-Id is unique within its stream"
    );
    assert_eq!(d.sequence(), Some(with_id.sequence));
    assert!(d.event().headers().get("Nats-Msg-Id").is_none());
    d.ack().await?;
    assert!(next(&mut s, Duration::from_millis(500)).await.is_none());
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn publish_batch_stores_in_order_with_receipts_in_order() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let js = per_topic(&url).connect().await?;
    let p = js.producer();
    let t = topic();
    let c = js.consumer(None);
    let (events, receipts) =
        batch::publish_batch_in_order(&p, &c, &t, 500, Duration::from_secs(10)).await?;

    // Sent again: every event is a duplicate (Nats-Msg-Id), with the stored sequence.
    let again = p.publish_batch(&t, events).await?;
    assert!(again.iter().all(polybus_core::Receipt::is_duplicate));
    assert_eq!(
        again.iter().map(|r| r.sequence()).collect::<Vec<_>>(),
        receipts.iter().map(|r| r.sequence()).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn publish_batch_with_an_invalid_event_sends_nothing() -> anyhow::Result<()> {
    let url = crate::nats_url();
    let js = per_topic(&url).connect().await?;
    // A payload over the server's limit fails the check every event goes through before
    // anything is sent; the stream's first sequence is 1.
    let max = js.connection().max_payload();
    batch::publish_batch_all_or_nothing(&js.producer(), &topic(), max + 1, 1).await
}
