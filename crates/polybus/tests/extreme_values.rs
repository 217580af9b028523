//! No panic on any caller-supplied value (#14 item 11): every public setter that takes a
//! `Duration` or a size, and the in-memory broker, the dedup layer and the composed bus end to
//! end, driven with 0, 1 ns, `u64::MAX` seconds, `Duration::MAX`, `usize::MAX` and random
//! values. Each case checks the outcome as well: the value is kept, saturates at the limit the
//! client or broker takes, or the operation fails with a typed error of the expected kind.
//!
//! No broker: this runs under plain `cargo test` (the connect cases use a closed local port).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use polybus::{Consumer, Delivery, ErrorKind, Event, MemoryBroker, MemoryConfig, Publisher};
use proptest::prelude::*;

// The adapter crates directly (dev-dependencies), so this runs without the facade's features.
use polybus_compose::{
    Bus, Dedup, DedupKey, DedupStore, MemoryDedupStore, RedriveOptions, RetryPolicy, SpoolConfig,
};
use polybus_jetstream::{ConsumerSettings, JsOptions, StreamSettings};
use polybus_kafka::{KafkaConfig, KafkaConsumer, KafkaProducer, KafkaTransactionalProducer};
use polybus_mqtt::{MqttConfig, Protocol};
use polybus_nats::NatsOptions;

/// Go's `time.Duration` (nanoseconds in an `i64`): the longest duration a NATS server takes.
const NATS_MAX: Duration = Duration::from_nanos(i64::MAX as u64);
/// rdkafka passes timeouts as `i32` milliseconds.
const RDKAFKA_MAX: Duration = Duration::from_millis(i32::MAX as u64);
/// The largest bound of a tokio channel or semaphore.
const PERMITS: usize = tokio::sync::Semaphore::MAX_PERMITS;
/// How long a case waits for something that should happen at once.
const SOON: Duration = Duration::from_secs(10);

/// The durations every case must survive.
const EDGE_DURATIONS: [Duration; 12] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    Duration::from_millis(1),
    Duration::from_secs(1),
    Duration::from_secs(3_600),
    Duration::from_secs(86_400),
    Duration::from_secs(u16::MAX as u64 + 1),
    RDKAFKA_MAX,
    NATS_MAX,
    Duration::from_nanos(u64::MAX),
    Duration::from_secs(u64::MAX),
    Duration::MAX,
];

/// The sizes every case must survive.
const EDGE_SIZES: [usize; 9] = [
    0,
    1,
    2,
    PERMITS - 1,
    PERMITS,
    PERMITS + 1,
    usize::MAX / 2,
    usize::MAX - 1,
    usize::MAX,
];

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => prop::sample::select(EDGE_DURATIONS.to_vec()),
        1 => (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        1 => (0u64..100_000_000_000).prop_map(Duration::from_nanos),
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(EDGE_SIZES.to_vec()),
        1 => any::<usize>(),
        1 => 0usize..4096,
    ]
}

fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 2, u64::MAX - 1, u64::MAX]),
        any::<u64>(),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        prop::sample::select(vec![
            0.0,
            -1.0,
            0.5,
            1.0,
            2.0,
            1e300,
            f64::MAX,
            f64::MIN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::EPSILON,
        ]),
        any::<f64>(),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn event(id: &str, payload: Vec<u8>) -> Event {
    Event::builder()
        .id(id)
        .data(payload)
        .build()
        .expect("a valid event")
}

async fn next_within<S>(stream: &mut S, within: Duration) -> Option<Delivery>
where
    S: futures_util::Stream<Item = polybus::Result<Delivery>> + Unpin,
{
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(d)) => Some(d.expect("a delivery, not an error")),
        Ok(None) | Err(_) => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every setter taking a `Duration` or a size: no panic, and the value is kept or
    /// saturates where the client or server has a limit.
    #[test]
    fn extreme_values_config_setters_keep_or_saturate(
        d in duration(),
        d2 in duration(),
        n in size(),
        c in count(),
        packet in any::<u32>(),
        receive_maximum in any::<u16>(),
        forwarders in any::<u32>(),
        multiplier in float(),
        jitter in float(),
        failures in any::<u32>(),
    ) {
        // The in-memory broker.
        let m = MemoryConfig::default().max_payload(n).queue_capacity(n).max_in_flight(n);
        prop_assert_eq!(m.max_payload, n);
        prop_assert_eq!(m.queue_capacity, n.max(1));
        prop_assert_eq!(m.max_in_flight, n.max(1));

        // JetStream: durations go to the server as i64 nanoseconds and saturate there.
        let s = StreamSettings::default().duplicate_window(d).max_age(d).replicas(n);
        prop_assert_eq!(s.duplicate_window, d.min(NATS_MAX));
        prop_assert_eq!(s.max_age, d.min(NATS_MAX));
        prop_assert_eq!(s.replicas, n.max(1));
        let cs = ConsumerSettings::default()
            .ack_wait(d)
            .backoff(vec![d, Duration::ZERO, Duration::MAX])
            .fetch_batch(n)
            .fetch_expiry(d)
            .inactive_threshold(d);
        prop_assert_eq!(cs.ack_wait, d.min(NATS_MAX));
        prop_assert_eq!(&cs.backoff, &vec![d.min(NATS_MAX), Duration::ZERO, NATS_MAX]);
        prop_assert_eq!(cs.fetch_batch, n.max(1));
        prop_assert_eq!(cs.fetch_expiry, d.clamp(Duration::from_millis(10), NATS_MAX));
        prop_assert_eq!(cs.inactive_threshold, d.min(NATS_MAX));
        let _ = JsOptions::new("nats://127.0.0.1:4222")
            .publish_timeout(d)
            .stream_settings(s)
            .consumer_settings(cs)
            .nats(|o| o.connect_timeout(d2).close_timeout(d));

        // Core NATS: the subscription capacity becomes a tokio channel bound.
        let o = NatsOptions::new("nats://127.0.0.1:4222")
            .request_timeout(d)
            .connect_timeout(d2)
            .close_timeout(d)
            .subscription_capacity(n)
            .max_reconnects(n);
        prop_assert_eq!(o.close_timeout_value(), d);
        let shown = format!("{o:?}");
        let capacity = format!("subscription_capacity: {},", n.clamp(1, PERMITS));
        prop_assert!(shown.contains(&capacity), "{} lacks {}", shown, capacity);
        let _ = NatsOptions::new("nats://127.0.0.1:4222").request_timeout(None);

        // Kafka: what reaches librdkafka is within its ranges.
        let k = KafkaConfig::new("127.0.0.1:9092", "g")
            .with_lag_interval(d)
            .with_connect_timeout(d)
            .with_commit_interval(d)
            .with_session_timeout(d, d2)
            .with_queue_capacity(n)
            .with_message_max_bytes(n);
        prop_assert_eq!(k.connect_timeout(), d.min(RDKAFKA_MAX));
        prop_assert_eq!(k.message_max_bytes(), n.clamp(1000, 1_000_000_000));
        let consumer = k.consumer_client_config("g");
        let ms = |key: &str| -> u128 {
            consumer.get(key).expect("set").parse().expect("a number")
        };
        prop_assert_eq!(ms("auto.commit.interval.ms"), d.as_millis().clamp(1, 86_400_000));
        prop_assert_eq!(ms("statistics.interval.ms"), d.as_millis().min(86_400_000));
        prop_assert_eq!(ms("session.timeout.ms"), d.as_millis().clamp(1, 3_600_000));
        prop_assert_eq!(ms("heartbeat.interval.ms"), d2.as_millis().clamp(1, 3_600_000));
        let queue = n.clamp(1, i32::MAX as usize).to_string();
        let producer = k.producer_client_config();
        prop_assert_eq!(producer.get("queue.buffering.max.messages"), Some(queue.as_str()));

        // MQTT.
        for protocol in [Protocol::V5, Protocol::V311] {
            let cfg = MqttConfig::new("127.0.0.1", 1883, "extreme")
                .protocol(protocol)
                .keep_alive(d)
                .session_expiry(d2)
                .reconnect_backoff(d, d2)
                .connect_timeout(d)
                .close_timeout(d2)
                .buffer(n)
                .max_packet_size(packet)
                .receive_maximum(receive_maximum);
            let max = cfg.max_payload();
            prop_assert!(max > 0 && max < packet.max(16 * 1024 + 1) as usize, "{}", max);
        }

        // Compose: the retry policy never waits longer than its maximum.
        let retry = RetryPolicy::default()
            .initial_backoff(d)
            .max_backoff(d2)
            .multiplier(multiplier)
            .jitter(jitter)
            .max_attempts(failures);
        prop_assert_eq!(retry.attempts_limit(), failures.max(1));
        for f in [0, 1, 2, 64, 65, u32::MAX, failures] {
            prop_assert!(retry.backoff(f) <= d2, "backoff({}) = {:?} > {:?}", f, retry.backoff(f), d2);
            let jittered = retry.backoff_jittered(f);
            prop_assert!(jittered <= d2, "backoff_jittered({}) = {:?} > {:?}", f, jittered, d2);
        }
        let spool = SpoolConfig::new("/nonexistent/spool")
            .cache_size(n)
            .capacity(c)
            .forwarded_ttl(Some(d));
        prop_assert_eq!(spool.cache_bytes(), n.max(1 << 20));
        prop_assert_eq!(spool.capacity_limit(), c.max(1));
        let store = MemoryDedupStore::new(d).max_keys(n);
        let shown = format!("{store:?}");
        let keys = format!("max_keys: {},", n.max(1));
        prop_assert!(shown.contains(&keys), "{} lacks {}", shown, keys);
        let redrive = RedriveOptions::default().idle(d).max(n);
        prop_assert_eq!((redrive.idle, redrive.max), (d, n));
        let _ = Bus::builder()
            .drain_timeout(d)
            .dedup_bucket("dedup", d2)
            .spool_capacity(c)
            .forwarders(forwarders)
            .max_in_flight(n)
            .consume_buffer(n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The in-memory broker end to end with extreme sizes and nack delays: a payload over the
    /// limit is `PayloadTooLarge`, `nack(ZERO)` redelivers at once, a nack for an hour or more
    /// (up to `Duration::MAX`) keeps the event away without holding up the next one.
    #[test]
    fn extreme_values_memory_broker_end_to_end(
        max_payload in size(),
        capacity in size(),
        in_flight in size(),
        delay in duration(),
    ) {
        runtime().block_on(async {
            let broker = MemoryBroker::with_config(
                MemoryConfig::default()
                    .max_payload(max_payload)
                    .queue_capacity(capacity)
                    .max_in_flight(in_flight),
            );
            let publisher = broker.publisher();
            let group = broker.consumer_group("g");
            let mut sub = std::pin::pin!(group.subscribe("t"));

            publisher.publish("t", event("e1", Vec::new())).await.expect("an empty payload fits");
            let first = next_within(&mut sub, SOON).await.expect("e1 delivered");
            assert_eq!((first.event().id(), first.delivery_count()), ("e1", 1));
            first.nack(delay).await.expect("nack takes any delay");
            if delay.is_zero() {
                let again = next_within(&mut sub, SOON).await.expect("e1 redelivered at once");
                assert_eq!((again.event().id(), again.delivery_count()), ("e1", 2));
                again.ack().await.expect("ack");
            } else if delay >= Duration::from_secs(3_600) {
                assert!(
                    next_within(&mut sub, Duration::from_millis(20)).await.is_none(),
                    "e1 must not come back before {delay:?}"
                );
                // The delayed event does not hold the queue or an in-flight slot.
                publisher.publish("t", event("e2", Vec::new())).await.expect("room for e2");
                let second = next_within(&mut sub, SOON).await.expect("e2 delivered");
                assert_eq!(second.event().id(), "e2");
                second.ack().await.expect("ack");
            }

            let big = publisher.publish("t", event("e3", vec![7; 8])).await;
            if max_payload < 8 {
                assert_eq!(big.expect_err("over the limit").kind(), ErrorKind::PayloadTooLarge);
            } else {
                big.expect("within the limit");
                // Skip a nack-delayed e1 that came due (a delay between 0 and an hour).
                let mut third = next_within(&mut sub, SOON).await.expect("e3 delivered");
                while third.event().id() != "e3" {
                    third.ack().await.expect("ack");
                    third = next_within(&mut sub, SOON).await.expect("e3 delivered");
                }
                // Dropped unsettled: redelivered at once.
                drop(third);
                let again = next_within(&mut sub, SOON).await.expect("e3 redelivered");
                assert_eq!((again.event().id(), again.delivery_count()), ("e3", 2));
                again.term().await.expect("term");
            }
            if delay >= Duration::from_secs(3_600) {
                assert_eq!(broker.pending("t", "g"), 0, "e1 waits for its delay, not in the queue");
            }
        });
    }

    /// Dedup with extreme TTLs and key caps: a zero TTL remembers nothing, one of an hour or
    /// more (up to `Duration::MAX`) drops the copy.
    #[test]
    fn extreme_values_dedup_ttls(ttl in duration(), max_keys in size()) {
        runtime().block_on(async {
            let store = MemoryDedupStore::new(ttl).max_keys(max_keys);
            store.record("k", 3).await.expect("record");
            let hit = store.get("k").await.expect("get");
            if ttl.is_zero() {
                assert_eq!(hit, None, "a zero TTL forgets at once");
            } else if ttl >= Duration::from_secs(3_600) {
                assert_eq!(hit, Some(3));
            }

            let broker = MemoryBroker::new();
            let store: Arc<dyn DedupStore> = Arc::new(MemoryDedupStore::new(ttl).max_keys(max_keys));
            let consumer = Dedup::new(broker.consumer_group("g"), store, DedupKey::Id, "g");
            let mut sub = std::pin::pin!(consumer.subscribe("t"));
            let publisher = broker.publisher();
            publisher.publish("t", event("once", b"a".to_vec())).await.expect("publish");
            publisher.publish("t", event("once", b"a".to_vec())).await.expect("publish");
            publisher.publish("t", event("other", b"b".to_vec())).await.expect("publish");
            let first = next_within(&mut sub, SOON).await.expect("first");
            assert_eq!(first.event().id(), "once");
            first.ack().await.expect("ack records the key");
            let next = next_within(&mut sub, SOON).await.expect("next");
            if ttl.is_zero() {
                assert_eq!(next.event().id(), "once", "nothing remembered, the copy comes");
            } else if ttl >= Duration::from_secs(3_600) {
                assert_eq!(next.event().id(), "other", "the copy was dropped");
            }
            next.ack().await.expect("ack");
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The composed bus on in-memory brokers with extreme drain timeouts, TTLs, windows,
    /// buffers, capacities and backoffs: it builds, acknowledges, forwards, delivers, redrives
    /// and closes.
    #[test]
    fn extreme_values_composed_bus_on_memory(
        drain in duration(),
        wait in duration(),
        ttl in duration(),
        idle in duration(),
        backoff in duration(),
        max_backoff in duration(),
        in_flight in size(),
        buffer in size(),
        cache in size(),
        capacity in count(),
        forwarders in prop::sample::select(vec![0u32, 1, 2, u32::MAX]),
    ) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let (nats, kafka) = (MemoryBroker::new(), MemoryBroker::new());
            let bus = Bus::builder()
                .memory(&nats, &kafka)
                .spool(
                    SpoolConfig::new(dir.path())
                        .cache_size(cache)
                        .capacity(capacity)
                        .forwarded_ttl(Some(ttl)),
                )
                .drain_timeout(drain)
                .max_in_flight(in_flight)
                .consume_buffer(buffer)
                .forwarders(forwarders)
                .retry(RetryPolicy::default().initial_backoff(backoff).max_backoff(max_backoff))
                .dedup_store(MemoryDedupStore::new(ttl).max_keys(in_flight))
                .build()
                .await
                .expect("the bus builds");
            let mut sub = bus.consume("orders", "g").await.expect("consume");
            let receipt = bus.publish("orders", event("e-1", b"x".to_vec())).await.expect("publish");
            assert_eq!(receipt.kafka_topic(), "orders");

            match tokio::time::timeout(SOON, bus.wait_forwarded(wait)).await {
                Ok(true) => {}
                Ok(false) => assert!(wait < SOON, "wait_forwarded({wait:?}) gave up"),
                Err(_) => assert!(wait >= SOON, "wait_forwarded({wait:?}) overran"),
            }
            let forwarded = tokio::time::timeout(SOON, bus.wait_forwarded(Duration::MAX)).await;
            assert_eq!(forwarded.ok(), Some(true), "forwarded within {SOON:?}");
            let d = next_within(&mut sub, SOON).await.expect("consumed from Kafka");
            assert_eq!(d.event().id(), "e-1");
            d.ack().await.expect("ack");

            // No dead letters: an unbounded wait with `max(0)` and a zero idle both end at once.
            let r = tokio::time::timeout(SOON, bus.redrive("orders", RedriveOptions::default().idle(idle).max(0))).await;
            assert_eq!(r.expect("max(0) returns at once").expect("redrive"), 0);
            let r = bus.redrive("orders", RedriveOptions::default().idle(Duration::ZERO).max(usize::MAX)).await;
            assert_eq!(r.expect("redrive"), 0);

            let closed = tokio::time::timeout(SOON, bus.close()).await;
            closed.expect("close with an empty spool returns at once").expect("close");
            assert_eq!(bus.stats().spool_depth, 0);
        });
    }
}

/// librdkafka accepts the saturated settings: producers and consumers are created (no broker
/// needed), except where librdkafka itself refuses a combination, which is a typed error.
#[tokio::test]
async fn extreme_values_kafka_clients_accept_saturated_settings() {
    for d in EDGE_DURATIONS {
        let cfg = KafkaConfig::new("127.0.0.1:1", "g")
            .with_lag_interval(d)
            .with_commit_interval(d)
            .with_connect_timeout(d)
            .with_queue_capacity(usize::MAX)
            .with_message_max_bytes(usize::MAX);
        KafkaProducer::new_with_config(&cfg).expect("a producer");
        KafkaConsumer::new_with_config(&cfg, &["t"]).expect("a consumer");
        let txn = KafkaTransactionalProducer::new_with_config(&cfg.with_transactional_id("tx"))
            .expect("a transactional producer")
            .with_timeout(d);
        drop(txn);
    }
    for (session, heartbeat) in [
        (Duration::ZERO, Duration::ZERO),
        (Duration::from_nanos(1), Duration::MAX),
        (Duration::from_secs(300), Duration::from_secs(3)),
    ] {
        let cfg = KafkaConfig::new("127.0.0.1:1", "g").with_session_timeout(session, heartbeat);
        KafkaConsumer::new_with_config(&cfg, &["t"]).expect("a consumer");
    }
    // A session longer than `max.poll.interval.ms` (5 minutes by default) is librdkafka's
    // refusal, reported as a typed error rather than a panic.
    for session in [Duration::from_secs(301), Duration::MAX] {
        let cfg = KafkaConfig::new("127.0.0.1:1", "g").with_session_timeout(session, session);
        let err = KafkaConsumer::new_with_config(&cfg, &["t"]).expect_err("librdkafka refuses");
        assert_eq!(err.kind(), ErrorKind::Other, "{err}");
        assert!(err.to_string().contains("max.poll.interval.ms"), "{err}");
    }
}

/// Connecting with extreme settings to a port nothing listens on fails with a typed error
/// (MQTT: the client options are built, rumqttc's assertions included, before the connect).
#[tokio::test]
async fn extreme_values_connect_fails_typed_not_panicking() {
    let port = closed_port();
    for d in EDGE_DURATIONS {
        for protocol in [Protocol::V5, Protocol::V311] {
            let cfg = MqttConfig::new("127.0.0.1", port, "extreme")
                .protocol(protocol)
                .keep_alive(d)
                .session_expiry(d)
                .reconnect_backoff(d, d)
                .connect_timeout(d)
                .close_timeout(d)
                .buffer(usize::MAX);
            let r = tokio::time::timeout(SOON, cfg.connect()).await;
            let err = r.expect("refused at once").expect_err("nothing listens");
            assert_eq!(err.kind(), ErrorKind::Connect, "{protocol:?} {d:?}: {err}");
        }
        let nats = NatsOptions::new(format!("nats://127.0.0.1:{port}"))
            .connect_timeout(d.max(Duration::from_secs(1)))
            .request_timeout(d)
            .close_timeout(d)
            .subscription_capacity(usize::MAX)
            .max_reconnects(usize::MAX);
        let r = tokio::time::timeout(SOON, nats.connect()).await;
        let err = r.expect("refused at once").expect_err("nothing listens");
        assert_eq!(err.kind(), ErrorKind::Connect, "{d:?}: {err}");
        let js = JsOptions::new(format!("nats://127.0.0.1:{port}"))
            .publish_timeout(d)
            .consumer_settings(ConsumerSettings::default().fetch_expiry(d).ack_wait(d))
            .stream_settings(StreamSettings::default().max_age(d));
        let r = tokio::time::timeout(SOON, js.connect()).await;
        let err = r.expect("refused at once").expect_err("nothing listens");
        assert_eq!(err.kind(), ErrorKind::Connect, "{d:?}: {err}");
    }
}
