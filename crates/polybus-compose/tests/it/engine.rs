//! The bus engine over in-memory brokers (plain `cargo test`).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use polybus_compose::{
    Channel, DeadLetterTopic, RedriveOptions, SwitchHandle, Switches, WhenFull, X_ATTEMPTS,
    X_EXCEPTION_KIND, X_EXCEPTION_MESSAGE, X_ORIGINAL_SUBJECT, X_ORIGINAL_TOPIC,
};
use polybus_core::{Consumer, ErrorKind, Event, Publisher};

use crate::support::{Env, check_exactly_once_in_order, keyed, next_within};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn publish_acks_then_forwards_in_key_order() -> Result<()> {
    let env = Env::new();
    env.track("orders.created", "check");
    let bus = env.bus().await;
    let mut notes = bus.notifications("orders.created").await?;
    let mut want = HashSet::new();
    for i in 0..300 {
        let r = bus.publish("orders.created", keyed("e", i, 7)).await?;
        assert_eq!(r.kafka_topic(), "orders.created");
        assert!(r.nats().is_some());
        want.insert(r.id().to_owned());
    }
    assert!(bus.wait_forwarded(WAIT).await, "spool drained");
    let got = env.drain_kafka("orders.created", "check", 300).await?;
    check_exactly_once_in_order(&got, &want)?;
    // The same events were on NATS, in real time.
    let first = next_within(&mut notes, WAIT).await.expect("a notification");
    assert_eq!(first.event().id(), "e-0");
    let s = bus.stats();
    assert_eq!((s.published, s.forwarded, s.spool_depth), (300, 300, 0));
    assert!(s.spool_max_depth >= 1);
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn payloads_become_events_with_the_bus_source() -> Result<()> {
    let env = Env::new();
    env.track("a.b", "check");
    let bus = env.builder().source("urn:test:bus").build().await?;
    bus.publish("a.b", bytes::Bytes::from_static(b"{...}"))
        .await?;
    bus.publish("a.b", b"raw").await?;
    assert!(bus.wait_forwarded(WAIT).await);
    let got = env.drain_kafka("a.b", "check", 2).await?;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|e| e.source() == "urn:test:bus"));
    assert_eq!(got[0].data().as_ref(), b"{...}");
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_kafka_outage_is_absorbed_by_the_spool_and_drained_after() -> Result<()> {
    let env = Env::new();
    env.track("t", "check");
    let bus = env.bus().await;
    env.kafka_pub.set_down(true);
    let mut want = HashSet::new();
    for i in 0..400 {
        want.insert(bus.publish("t", keyed("o", i, 5)).await?.id().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = bus.stats();
    assert_eq!(during.spool_depth, 400, "everything waits in the spool");
    assert!(during.retries > 0);
    assert_eq!(during.dead_letters, 0, "an outage does not dead-letter");
    env.kafka_pub.set_down(false);
    assert!(bus.wait_forwarded(WAIT).await);
    let got = env.drain_kafka("t", "check", 400).await?;
    check_exactly_once_in_order(&got, &want)?;
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_after_n_attempts_and_redriven() -> Result<()> {
    let env = Env::new();
    env.track("orders.created", "check");
    env.track("orders.created.dlq", "dlq-check");
    env.track("orders.created.dlq", "polybus-redrive");
    let bus = env.bus().await;
    let poison = Event::builder()
        .id("bad-1")
        .key("cust-1")
        .header("poison", "yes")
        .header("tenant", "eu")
        .build()?;
    bus.publish("orders.created", poison).await?;
    bus.publish("orders.created", keyed("fine", 0, 1)).await?;
    assert!(bus.wait_forwarded(WAIT).await);
    let s = bus.stats();
    assert_eq!(s.dead_letters, 1);
    assert_eq!(s.forwarded, 1);

    let dead = env
        .drain_kafka("orders.created.dlq", "dlq-check", 1)
        .await?;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.id(), "bad-1");
    assert_eq!(d.key(), Some(&b"cust-1"[..]));
    assert_eq!(d.headers().get("tenant"), Some("eu"));
    assert_eq!(d.headers().get(X_ORIGINAL_TOPIC), Some("orders.created"));
    assert_eq!(d.headers().get(X_ORIGINAL_SUBJECT), Some("orders.created"));
    assert_eq!(d.headers().get(X_ATTEMPTS), Some("3"));
    assert_eq!(d.headers().get(X_EXCEPTION_KIND), Some("rejected"));
    assert!(
        d.headers()
            .get(X_EXCEPTION_MESSAGE)
            .unwrap()
            .contains("poison record")
    );
    assert_eq!(
        bus.dead_letter_topic("orders.created")?,
        "orders.created.dlq"
    );

    // Fix the cause (the downstream stops rejecting), then redrive.
    env.kafka_pub.reject_poison.store(false, Ordering::SeqCst);
    let moved = bus
        .redrive(
            "orders.created",
            RedriveOptions::default().idle(Duration::from_millis(300)),
        )
        .await?;
    assert!(bus.wait_forwarded(WAIT).await);
    assert_eq!(bus.stats().redriven, 1);
    bus.close().await?;
    assert_eq!(moved, 1);
    let back = env.drain_kafka("orders.created", "check", 2).await?;
    let ids: Vec<_> = back.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(ids, ["fine-0", "bad-1"]);
    let redriven = back.iter().find(|e| e.id() == "bad-1").unwrap();
    assert!(
        redriven.headers().get(X_ATTEMPTS).is_none(),
        "dead-letter headers removed"
    );
    assert_eq!(redriven.key(), Some(&b"cust-1"[..]));
    Ok(())
}

#[tokio::test]
async fn the_same_event_published_three_times_across_a_restart_is_forwarded_once() -> Result<()> {
    let env = Env::new();
    env.track("t", "check");
    let ev = Event::builder()
        .id("same")
        .source("urn:s")
        .key("k")
        .build()?;
    let bus = env.bus().await;
    bus.publish("t", ev.clone()).await?;
    bus.publish("t", ev.clone()).await?;
    assert!(bus.wait_forwarded(WAIT).await);
    bus.close().await?;
    drop(bus);
    let bus = env.bus().await;
    bus.publish("t", ev.clone()).await?;
    assert!(bus.wait_forwarded(WAIT).await);
    assert_eq!(bus.stats().forward_duplicates, 1);
    bus.close().await?;
    let got = env.drain_kafka("t", "check", 3).await?;
    assert_eq!(got.len(), 1, "one Kafka record for three publishes");
    Ok(())
}

#[tokio::test]
async fn consume_drops_duplicates_and_records_keys_only_on_ack() -> Result<()> {
    let env = Env::new();
    let bus = env.bus().await;
    let mut sub = bus.consume("t", "billing").await?;
    // Copies written straight to "Kafka", as a crash between forward and spool delete would.
    let kafka = env.kafka.publisher();
    let ev = Event::builder().id("dup").build()?;
    kafka.publish("t", ev.clone()).await?;
    kafka.publish("t", ev.clone()).await?;
    kafka
        .publish("t", Event::builder().id("other").build()?)
        .await?;

    let first = next_within(&mut sub, WAIT).await.expect("first");
    assert_eq!(first.event().id(), "dup");
    // Not acked yet: a redelivery (here: nack) must come back, not be deduped.
    first.nack(Duration::ZERO).await?;
    let again = next_within(&mut sub, WAIT).await.expect("redelivered");
    assert_eq!(again.event().id(), "dup");
    again.ack().await?;
    let next = next_within(&mut sub, WAIT).await.expect("other");
    assert_eq!(
        next.event().id(),
        "other",
        "the second copy of dup was dropped"
    );
    next.ack().await?;
    // The remaining copy of "dup" is dropped (and acked) when it reaches the caller.
    assert!(
        next_within(&mut sub, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(bus.stats().consume_duplicates, 1);
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn nats_only_holds_forwards_and_dual_write_releases_them() -> Result<()> {
    let env = Env::new();
    env.track("t", "check");
    let switches = SwitchHandle::default();
    let bus = env.builder().switches(switches.clone()).build().await?;
    let mut notes = bus.notifications("t").await?;
    let mut want = HashSet::new();
    for i in 0..50 {
        want.insert(bus.publish("t", keyed("a", i, 3)).await?.id().to_owned());
    }
    switches.set(
        Switches::default()
            .with_dual_write(false)
            .with_single_channel(Channel::Nats),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let forwarded_before = bus.stats().forwarded;
    for i in 50..100 {
        want.insert(bus.publish("t", keyed("a", i, 3)).await?.id().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = bus.stats();
    assert!(held.spool_depth >= 50, "held in the spool: {held:?}");
    assert!(held.forwarded <= forwarded_before + 1);
    switches.set(Switches::default());
    assert!(bus.wait_forwarded(WAIT).await);
    let got = env.drain_kafka("t", "check", 100).await?;
    check_exactly_once_in_order(&got, &want)?;
    // NATS saw all 100 in both modes.
    let mut n = 0;
    while let Some(d) = next_within(&mut notes, Duration::from_millis(300)).await {
        d.ack().await?;
        n += 1;
    }
    assert_eq!(n, 100);
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn kafka_only_skips_nats_and_pause_holds_forwarding() -> Result<()> {
    let env = Env::new();
    env.track("t", "check");
    let bus = env
        .builder()
        .initial_switches(
            Switches::default()
                .with_dual_write(false)
                .with_single_channel(Channel::Kafka),
        )
        .build()
        .await?;
    let mut notes = bus.notifications("t").await?;
    let r = bus.publish("t", b"x").await?;
    assert!(r.nats().is_none());
    assert!(bus.wait_forwarded(WAIT).await);
    assert!(
        next_within(&mut notes, Duration::from_millis(200))
            .await
            .is_none()
    );

    bus.switches()
        .update(|s| *s = s.with_pause_forwarding(true));
    bus.publish("t", b"y").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bus.spool_depth(), 1, "paused");
    bus.switches()
        .update(|s| *s = s.with_pause_forwarding(false));
    assert!(bus.wait_forwarded(WAIT).await);
    assert_eq!(env.drain_kafka("t", "check", 2).await?.len(), 2);
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_full_spool_rejects_or_blocks_never_drops() -> Result<()> {
    let env = Env::new();
    env.kafka_pub.set_down(true);
    let bus = env
        .builder()
        .spool_capacity(5)
        .when_full(WhenFull::Reject)
        .build()
        .await?;
    for i in 0..5 {
        bus.publish("t", keyed("r", i, 1)).await?;
    }
    let err = bus.publish("t", keyed("r", 5, 1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert_eq!(bus.stats().publish_errors, 1);
    bus.close().await?;
    drop(bus);

    // Same spool (5 events still in it), blocking policy: the next publish waits for room.
    let bus = env.builder().spool_capacity(5).build().await?;
    assert_eq!(bus.spool_depth(), 5);
    let b2 = bus.clone();
    let blocked = tokio::spawn(async move { b2.publish("t", keyed("r", 6, 1)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!blocked.is_finished(), "blocked on a full spool");
    env.kafka_pub.set_down(false);
    tokio::time::timeout(WAIT, blocked)
        .await??
        .expect("published once room was made");
    assert!(bus.wait_forwarded(WAIT).await);
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn restart_forwards_the_old_spool_before_new_events_per_key() -> Result<()> {
    let env = Env::new();
    env.track("t", "check");
    env.kafka_pub.set_down(true);
    let bus = env
        .builder()
        .drain_timeout(Duration::from_millis(100))
        .build()
        .await?;
    let mut want = HashSet::new();
    for i in 0..20 {
        want.insert(bus.publish("t", keyed("x", i, 2)).await?.id().to_owned());
    }
    bus.close().await?;
    assert_eq!(bus.stats().spool_depth, 20, "left for the next run");
    drop(bus);
    env.kafka_pub.set_down(false);
    let bus = env.bus().await;
    for i in 20..40 {
        want.insert(bus.publish("t", keyed("x", i, 2)).await?.id().to_owned());
    }
    assert!(bus.wait_forwarded(WAIT).await);
    let got = env.drain_kafka("t", "check", 40).await?;
    check_exactly_once_in_order(&got, &want)?;
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn close_drains_in_flight_forwards_and_then_refuses_publishes() -> Result<()> {
    let mut env = Env::new();
    env.kafka_pub = env.kafka_pub.clone().with_delay(Duration::from_millis(5));
    env.track("t", "check");
    // Forwarding paused while publishing, resumed right before close: close starts with a
    // full spool and has to drain it.
    let bus = env
        .builder()
        .max_in_flight(4)
        .initial_switches(Switches::default().with_pause_forwarding(true))
        .build()
        .await?;
    for i in 0..200 {
        bus.publish("t", keyed("c", i, 10)).await?;
    }
    assert_eq!(bus.spool_depth(), 200);
    bus.switches().set(Switches::default());
    bus.close().await?;
    assert_eq!(bus.spool_depth(), 0, "close drained the spool into Kafka");
    assert_eq!(env.drain_kafka("t", "check", 200).await?.len(), 200);
    let err = bus.publish("t", b"late").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    bus.close().await?; // twice is fine
    Ok(())
}

#[tokio::test]
async fn replay_rereads_from_a_time_in_a_fresh_group() -> Result<()> {
    let env = Env::new();
    let bus = env.bus().await;
    // Memory groups see what is published after they subscribe: the replay subscribes first.
    let cut = std::time::SystemTime::now() + Duration::from_secs(3600);
    let mut old = Event::new(b"old");
    old.set_time(cut - Duration::from_secs(10));
    let mut new = Event::new(b"new");
    new.set_time(cut + Duration::from_secs(10));
    let mut replay = bus
        .replay("t", "audit", polybus_compose::ReplayFrom::Time(cut))
        .await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    bus.publish("t", old).await?;
    bus.publish("t", new).await?;
    let d = next_within(&mut replay, WAIT).await.expect("the new event");
    assert_eq!(d.payload(), b"new");
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn dead_letter_of_a_consumed_delivery_keeps_position_headers() -> Result<()> {
    let env = Env::new();
    env.track("t.dlq", "check");
    let bus = env
        .builder()
        .dead_letter_topic(DeadLetterTopic::Suffix(".dlq".into()))
        .build()
        .await?;
    let mut sub = bus.consume("t", "g").await?;
    bus.publish("t", Event::builder().key("k").build()?).await?;
    let d = next_within(&mut sub, WAIT).await.expect("delivery");
    let err = polybus_core::Error::new(ErrorKind::Codec, "app").with_message("bad json");
    bus.dead_letter(&d, &err, 4).await?;
    d.ack().await?;
    let dead = env.drain_kafka("t.dlq", "check", 1).await?;
    assert_eq!(
        dead[0].headers().get(polybus_compose::X_ORIGINAL_OFFSET),
        Some("0")
    );
    assert_eq!(dead[0].headers().get(X_ATTEMPTS), Some("4"));
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_bus_is_a_publisher_and_its_futures_are_send() -> Result<()> {
    fn require_send<T: Send>(_: &T) {}
    let env = Env::new();
    let bus = env.bus().await;
    let fut = bus.publish("t", b"x");
    require_send(&fut);
    fut.await?;
    Publisher::publish(&bus, "t", Event::new(b"y")).await?;
    Publisher::flush(&bus).await?;
    let spawned = bus.clone();
    tokio::spawn(async move { spawned.publish("t", b"z").await }).await??;
    assert_eq!(bus.stats().published, 3);
    Publisher::close(&bus).await?;
    Ok(())
}

#[tokio::test]
async fn invalid_subjects_are_rejected_before_anything_is_written() -> Result<()> {
    let env = Env::new();
    let bus = env.bus().await;
    for bad in ["", "orders.*", "a b"] {
        let e = bus.publish(bad, b"x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}");
    }
    assert_eq!(bus.spool_depth(), 0);
    assert_eq!(env.kafka_pub.attempts.load(Ordering::Relaxed), 0);
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn subscriptions_are_bounded_and_stop_when_dropped() -> Result<()> {
    let env = Env::new();
    let bus = env.builder().consume_buffer(2).build().await?;
    let sub = bus.consume("t", "g").await?;
    for i in 0..10 {
        bus.publish("t", keyed("b", i, 1)).await?;
    }
    assert!(bus.wait_forwarded(WAIT).await);
    drop(sub);
    // The group's events not taken by the dropped subscription are still there.
    let c = env.kafka.consumer_group("g");
    let mut s = std::pin::pin!(c.subscribe("t"));
    let d = tokio::time::timeout(WAIT, s.next()).await?.expect("open")?;
    assert!(d.event().id().starts_with("b-"));
    bus.close().await?;
    Ok(())
}

#[tokio::test]
async fn close_with_a_hanging_kafka_returns_after_the_drain_timeout_and_keeps_the_spool()
-> Result<()> {
    let mut env = Env::new();
    env.track("t", "check");
    // A producer that neither acks nor fails (librdkafka queueing during an outage).
    env.kafka_pub = env.kafka_pub.clone().with_delay(Duration::from_secs(3600));
    let bus = env
        .builder()
        .drain_timeout(Duration::from_millis(300))
        .build()
        .await?;
    for i in 0..5 {
        bus.publish("t", keyed("h", i, 2)).await?;
    }
    let t = std::time::Instant::now();
    bus.close().await?;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "close took {:?}",
        t.elapsed()
    );
    assert_eq!(bus.stats().spool_depth, 5);
    drop(bus);
    env.kafka_pub = env.kafka_pub.clone().with_delay(Duration::ZERO);
    let bus = env.bus().await;
    assert!(bus.wait_forwarded(WAIT).await);
    assert_eq!(env.drain_kafka("t", "check", 5).await?.len(), 5);
    bus.close().await?;
    Ok(())
}

/// `Duration::MAX` wherever a caller can pass a duration: drain timeout, retry backoff,
/// `wait_forwarded`, a dedup TTL. Each means "as long as it takes", never a panic from
/// `Instant + Duration`.
#[tokio::test]
async fn durations_of_any_size_do_not_panic() -> Result<()> {
    use polybus_compose::{Bus, DedupStore, MemoryDedupStore, RetryPolicy};
    let (nats, kafka) = (
        polybus_core::MemoryBroker::new(),
        polybus_core::MemoryBroker::new(),
    );
    let dir = tempfile::tempdir()?;
    let bus = Bus::builder()
        .memory(&nats, &kafka)
        .spool_dir(dir.path())
        .drain_timeout(Duration::MAX)
        .retry(
            RetryPolicy::default()
                .initial_backoff(Duration::MAX)
                .max_backoff(Duration::MAX),
        )
        .build()
        .await?;
    bus.publish("extreme.durations", b"x").await?;
    assert!(bus.wait_forwarded(Duration::MAX).await);
    bus.close().await?;

    let store = MemoryDedupStore::new(Duration::MAX);
    store.record("key", 3).await?;
    assert_eq!(store.get("key").await?, Some(3));
    Ok(())
}

/// A Kafka publisher (user code) that panics on events with the header `panic`.
struct Panicky(polybus_core::MemoryPublisher);

impl Publisher for Panicky {
    async fn publish(
        &self,
        topic: &str,
        event: Event,
    ) -> polybus_core::Result<polybus_core::Receipt> {
        assert!(
            !event.headers().contains("panic") || topic.ends_with(".dlq"),
            "the user's publisher panicked"
        );
        self.0.publish(topic, event).await
    }
    async fn flush(&self) -> polybus_core::Result<()> {
        self.0.flush().await
    }
    async fn close(&self) -> polybus_core::Result<()> {
        self.0.close().await
    }
}

/// A panic in the Kafka publisher fails that one event like an error (retried, then
/// dead-lettered with the panic's message); the forwarder lives on, the events after it are
/// forwarded and publishing never stops.
#[tokio::test]
async fn a_panicking_kafka_publisher_fails_the_event_not_the_forwarder() -> Result<()> {
    let env = Env::new();
    env.track("orders.created", "check");
    env.track("orders.created.dlq", "dlq-check");
    let bus = env
        .builder()
        .forwarders(1)
        .kafka_publisher(Panicky(env.kafka.publisher()))
        .build()
        .await?;
    let boom = Event::builder()
        .id("boom-1")
        .header("panic", "yes")
        .build()?;
    bus.publish("orders.created", boom).await?;
    for i in 0..20 {
        bus.publish("orders.created", keyed("after", i, 1)).await?;
    }
    assert!(bus.wait_forwarded(WAIT).await, "{:?}", bus.stats());
    let s = bus.stats();
    assert_eq!((s.forwarded, s.dead_letters), (20, 1), "{s:?}");
    let dead = env
        .drain_kafka("orders.created.dlq", "dlq-check", 1)
        .await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id(), "boom-1");
    assert!(
        dead[0]
            .headers()
            .get(X_EXCEPTION_MESSAGE)
            .is_some_and(|m| m.contains("panicked") && m.contains("the user's publisher panicked")),
        "{:?}",
        dead[0].headers()
    );
    assert_eq!(
        env.drain_kafka("orders.created", "check", 20).await?.len(),
        20
    );
    bus.close().await?;
    Ok(())
}
