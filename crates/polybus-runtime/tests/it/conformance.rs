//! The runtime conformance suite: the same scenarios on every backend. Memory runs under
//! plain `cargo test`; NATS, JetStream, Kafka, MQTT and the composed bus need the brokers (`cargo xtask test`).
//!
//! * `retry_dead_letter_redrive`: a failing handler is tried `3` times with the backoff's
//!   delays (redelivery where the backend has `nack_delay`, in process where not), the dead
//!   letter has the event's key, payload and headers plus the shared `x-` headers, and a
//!   redrive (backends with durable groups) brings it back to a healed handler;
//! * `per_key_order`: concurrency 8 with random handler latency keeps each key's order;
//! * `panic_survived`: a handler that panics once is retried, the app goes on;
//! * `batch_outcomes`: a batch route gets at most `max` events at once and settles each by its
//!   own outcome (ack, retry, dead letter).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use polybus_core::dlq::{
    X_ATTEMPTS, X_EXCEPTION_KIND, X_EXCEPTION_MESSAGE, X_ORIGINAL_ID, X_ORIGINAL_TOPIC,
};
use polybus_core::{Capabilities, Consumer, Event, Publisher, Result};
use polybus_runtime::{
    App, Attempt, HandlerError, Key, RedriveOptions, Report, RetryPolicy, Route, Settlement, State,
    redrive,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::Recorder;

const PROBE: &str = "polybus.runtime.probe";

/// What a backend provides to the runtime suite.
pub(crate) trait Backend: Send + Sync + 'static {
    type P: Publisher + 'static;
    type C: Consumer + 'static;
    fn name(&self) -> &'static str;
    fn publisher(&self) -> impl Future<Output = Result<Self::P>> + Send;
    fn consumer(&self, group: &str) -> impl Future<Output = Result<Self::C>> + Send;
    fn topic(&self) -> String {
        format!("polybus-rt-{}", uuid::Uuid::new_v4().simple())
    }
    /// How long a redrive waits for the next dead letter before it stops.
    fn redrive_idle(&self) -> Duration {
        Duration::from_secs(3)
    }
    /// Whether the publisher drops a second publish of the same event id (JetStream's
    /// `Nats-Msg-Id`, the composed bus), so a redrive must rename the copy.
    fn dedups_by_id(&self) -> bool {
        false
    }
    /// How long to wait for what must happen.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

fn group() -> String {
    format!("g{}", uuid::Uuid::new_v4().simple())
}

/// An app running on the backend, with a probe route that shows it is subscribed.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.expect("app task").expect("app run");
    }
}

async fn ack_probe() {}

async fn start<B: Backend, S: Clone + Send + Sync + 'static>(
    b: &B,
    app: App<S>,
    topic: &str,
    rec: &Recorder,
) -> Running {
    let app = app
        .add_route(Route::new(topic.to_owned(), ack_probe).kind(PROBE))
        .on_report(rec.observer());
    let consumer = b.consumer(&group()).await.expect("consumer");
    let publisher = b.publisher().await.expect("publisher");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(consumer, publisher, async move {
        let _ = stopped.await;
    }));
    // Subscriptions start when first polled (and a Kafka group must join): probe until one
    // probe event is handled.
    let probe_publisher = b.publisher().await.expect("publisher");
    let deadline = Instant::now() + b.timeout();
    loop {
        let probe = Event::builder().kind(PROBE).build().unwrap();
        probe_publisher
            .publish(topic, probe)
            .await
            .expect("probe publish");
        let seen = tokio::time::timeout(
            Duration::from_millis(500),
            rec.wait_until(b.timeout(), "a probe", |rs| {
                rs.iter().any(|(_, r)| r.settlement() == &Settlement::Acked)
            }),
        )
        .await;
        if seen.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the app never received a probe",
            b.name()
        );
    }
    probe_publisher.close().await.expect("close");
    Running {
        stop: Some(stop),
        task,
    }
}

/// A subscription to `topic` that is known to be live (it received a probe).
async fn live_reader<'a, C: Consumer>(
    b: &impl Backend,
    consumer: &'a C,
    topic: &'a str,
) -> std::pin::Pin<Box<C::Stream<'a>>> {
    let mut stream = Box::pin(consumer.subscribe(topic));
    let publisher = b.publisher().await.expect("publisher");
    let deadline = Instant::now() + b.timeout();
    loop {
        let probe = Event::builder().kind(PROBE).build().unwrap();
        publisher
            .publish(topic, probe)
            .await
            .expect("probe publish");
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
            let d = d.expect("reader delivery");
            d.ack().await.expect("ack probe");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: reader never live on {topic}",
            b.name()
        );
    }
    publisher.close().await.expect("close");
    stream
}

fn terminal_for<'a>(rs: &'a [(Instant, Report)], id: &str) -> Option<&'a Report> {
    rs.iter()
        .map(|(_, r)| r)
        .find(|r| r.id() == id && r.settlement().is_terminal())
}

#[derive(Clone, Default)]
struct Failing {
    calls: Arc<Mutex<Vec<Instant>>>,
    healed: Arc<AtomicBool>,
    /// (id handled, its x-original-id or its id) once healed.
    recovered: Arc<Mutex<Vec<(String, String)>>>,
}

async fn fail_until_healed(
    State(s): State<Failing>,
    ev: Event,
) -> std::result::Result<(), HandlerError> {
    s.calls.lock().unwrap().push(Instant::now());
    if s.healed.load(Ordering::SeqCst) {
        let original = ev
            .headers()
            .get(X_ORIGINAL_ID)
            .unwrap_or(ev.id())
            .to_owned();
        s.recovered
            .lock()
            .unwrap()
            .push((ev.id().to_owned(), original));
        Ok(())
    } else {
        Err(HandlerError::transient("database down"))
    }
}

pub(crate) async fn retry_dead_letter_redrive<B: Backend>(b: &B, caps: Capabilities) {
    let topic = b.topic();
    let dlq_topic = format!("{topic}.dlq");
    let initial = Duration::from_millis(300);
    let state = Failing::default();
    let rec = Recorder::default();
    let app = App::with_state(state.clone())
        .route(topic.clone(), fail_until_healed)
        .retry(
            RetryPolicy::exponential(initial)
                .max_attempts(3)
                .jitter(0.0),
        );

    let dlq_consumer = b.consumer(&group()).await.expect("dlq consumer");
    let mut dead = live_reader(b, &dlq_consumer, &dlq_topic).await;
    // The redrive group exists before the dead letter is written (memory keeps no backlog).
    let redrive_consumer = b.consumer(&group()).await.expect("redrive consumer");
    drop(redrive_consumer.subscribe(&dlq_topic));

    let running = start(b, app, &topic, &rec).await;
    let publisher = b.publisher().await.expect("publisher");
    let ev = Event::builder()
        .key("k1")
        .header("tenant", "eu")
        .data(b"payload".as_slice())
        .build()
        .unwrap();
    let id = ev.id().to_owned();
    publisher.publish(&topic, ev).await.expect("publish");
    let reports = rec
        .wait_until(b.timeout(), "the dead letter", |rs| {
            terminal_for(rs, &id).is_some()
        })
        .await;
    let last = terminal_for(&reports, &id).unwrap();
    assert_eq!(last.attempt(), 3, "{}", b.name());
    assert!(
        matches!(last.settlement(), Settlement::DeadLettered { topic: t, .. } if *t == dlq_topic),
        "{}: {:?}",
        b.name(),
        last.settlement()
    );
    let retries: Vec<(u32, Duration, bool)> = reports
        .iter()
        .filter(|(_, r)| r.id() == id)
        .filter_map(|(_, r)| match r.settlement() {
            Settlement::Retrying { after, in_process } => Some((r.attempt(), *after, *in_process)),
            _ => None,
        })
        .collect();
    let in_process = !caps.nack_delay;
    assert_eq!(
        retries,
        [(1, initial, in_process), (2, initial * 2, in_process)],
        "{}",
        b.name()
    );
    // The delays were waited: each gap at least the nominal delay, and not much more.
    let calls = state.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "{}", b.name());
    for (gap, nominal) in calls
        .windows(2)
        .map(|w| w[1] - w[0])
        .zip([initial, initial * 2])
    {
        assert!(
            gap >= nominal && gap < nominal + Duration::from_secs(5),
            "{}: gap {gap:?} for a delay of {nominal:?}",
            b.name()
        );
    }

    // The dead letter: the event as it was, plus the shared x- headers.
    let d = loop {
        let d = tokio::time::timeout(b.timeout(), dead.next())
            .await
            .expect("a dead letter in time")
            .expect("open stream")
            .expect("delivery");
        if d.event().kind() == PROBE {
            d.ack().await.expect("ack");
            continue;
        }
        break d;
    };
    let ev = d.event();
    assert_eq!(ev.id(), id);
    assert_eq!(ev.key(), Some(&b"k1"[..]));
    assert_eq!(ev.data().as_ref(), b"payload");
    let h = ev.headers();
    assert_eq!(h.get("tenant"), Some("eu"), "{}", b.name());
    assert_eq!(h.get(X_ORIGINAL_TOPIC), Some(topic.as_str()));
    assert_eq!(h.get(X_ATTEMPTS), Some("3"));
    assert_eq!(h.get(X_EXCEPTION_KIND), Some("error"));
    assert_eq!(h.get(X_EXCEPTION_MESSAGE), Some("database down"));
    d.ack().await.expect("ack dead letter");
    drop(dead);

    // Redrive needs a dead-letter topic that keeps what it holds for a group.
    if caps.durable_groups {
        state.healed.store(true, Ordering::SeqCst);
        let report = redrive(
            &redrive_consumer,
            &dlq_topic,
            &publisher,
            |ev| ev.kind() != PROBE,
            RedriveOptions::default().idle(b.redrive_idle()),
        )
        .await
        .expect("redrive");
        assert_eq!(report.moved, 1, "{}: {report:?}", b.name());
        // JetStream and the bus deduplicate by id: the redrive renames the copy and says so.
        assert_eq!(
            report.renamed,
            usize::from(b.dedups_by_id()),
            "{}",
            b.name()
        );
        let recovered = state.recovered.clone();
        rec.wait_until(b.timeout(), "the redriven event handled", |rs| {
            let recovered = recovered.lock().unwrap();
            recovered.iter().any(|(handled, original)| {
                original == &id
                    && rs
                        .iter()
                        .any(|(_, r)| r.id() == handled && r.settlement() == &Settlement::Acked)
            })
        })
        .await;
    }
    publisher.close().await.expect("close");
    running.stop().await;
}

#[derive(Clone, Default)]
struct Order {
    by_key: Arc<Mutex<HashMap<Vec<u8>, Vec<u32>>>>,
}

async fn record_order(State(s): State<Order>, Key(k): Key, ev: Event) {
    let latency = rand::random::<u64>() % 5;
    tokio::time::sleep(Duration::from_millis(latency)).await;
    let n: u32 = String::from_utf8_lossy(ev.data())
        .parse()
        .unwrap_or(u32::MAX);
    s.by_key
        .lock()
        .unwrap()
        .entry(k.unwrap_or_default().to_vec())
        .or_default()
        .push(n);
}

pub(crate) async fn per_key_order<B: Backend>(b: &B) {
    let topic = b.topic();
    let state = Order::default();
    let rec = Recorder::default();
    let app = App::with_state(state.clone())
        .route(topic.clone(), record_order)
        .concurrency(8);
    let running = start(b, app, &topic, &rec).await;
    let publisher = b.publisher().await.expect("publisher");
    let (keys, per_key) = (8u32, 20u32);
    let mut ids = Vec::new();
    for n in 0..per_key {
        let batch: Vec<Event> = (0..keys)
            .map(|k| {
                Event::builder()
                    .key(format!("key-{k}"))
                    .data(n.to_string())
                    .build()
                    .unwrap()
            })
            .collect();
        ids.extend(batch.iter().map(|e| e.id().to_owned()));
        publisher
            .publish_batch(&topic, batch)
            .await
            .expect("publish");
    }
    rec.wait_until(b.timeout(), "every event acked", |rs| {
        ids.iter().all(|id| terminal_for(rs, id).is_some())
    })
    .await;
    let by_key = state.by_key.lock().unwrap().clone();
    assert_eq!(by_key.len(), keys as usize, "{}", b.name());
    for (k, ns) in &by_key {
        assert_eq!(
            ns,
            &(0..per_key).collect::<Vec<_>>(),
            "{}: key {}",
            b.name(),
            String::from_utf8_lossy(k)
        );
    }
    publisher.close().await.expect("close");
    running.stop().await;
}

async fn panic_once(Attempt(n): Attempt, Key(k): Key) {
    if k.as_deref() == Some(b"boom") && n == 1 {
        panic!("handler bug on the first attempt");
    }
}

pub(crate) async fn panic_survived<B: Backend>(b: &B) {
    let topic = b.topic();
    let rec = Recorder::default();
    let app = App::new()
        .route(topic.clone(), panic_once)
        .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(3));
    let running = start(b, app, &topic, &rec).await;
    let publisher = b.publisher().await.expect("publisher");
    let boom = Event::builder().key("boom").build().unwrap();
    let fine = Event::builder().key("fine").build().unwrap();
    let (ib, i_f) = (boom.id().to_owned(), fine.id().to_owned());
    publisher.publish(&topic, boom).await.expect("publish");
    publisher.publish(&topic, fine).await.expect("publish");
    let rs = rec
        .wait_until(b.timeout(), "both events settled", |rs| {
            terminal_for(rs, &ib).is_some() && terminal_for(rs, &i_f).is_some()
        })
        .await;
    let boom = terminal_for(&rs, &ib).unwrap();
    assert_eq!(
        (boom.attempt(), boom.settlement()),
        (2, &Settlement::Acked),
        "{}",
        b.name()
    );
    assert_eq!(
        terminal_for(&rs, &i_f).unwrap().settlement(),
        &Settlement::Acked
    );
    publisher.close().await.expect("close");
    running.stop().await;
}

type Batches = Arc<Mutex<Vec<usize>>>;

async fn batch_handler(
    batch: Vec<polybus_runtime::Message>,
    State(sizes): State<Batches>,
) -> Vec<polybus_runtime::Outcome> {
    use polybus_runtime::Outcome;
    let real = batch.iter().filter(|m| m.event().kind() != PROBE).count();
    if real > 0 {
        sizes.lock().unwrap().push(batch.len());
    }
    batch
        .iter()
        .map(|m| match (m.event().data().as_ref(), m.attempt()) {
            (b"2", _) => Outcome::Terminate(HandlerError::permanent("poison")),
            (b"4", 1) => Outcome::Retry(Some(Duration::from_millis(200))),
            _ => Outcome::Ack,
        })
        .collect()
}

pub(crate) async fn batch_outcomes<B: Backend>(b: &B) {
    let topic = b.topic();
    let rec = Recorder::default();
    let sizes: Batches = Arc::default();
    let app = App::with_state(sizes.clone())
        .batch_route(
            topic.clone(),
            polybus_runtime::Batch::new(5, Duration::from_millis(200)),
            batch_handler,
        )
        .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(3));
    let running = start(b, app, &topic, &rec).await;
    let publisher = b.publisher().await.expect("publisher");
    let events: Vec<Event> = (0..10).map(|i| Event::new(i.to_string())).collect();
    let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    publisher
        .publish_batch(&topic, events)
        .await
        .expect("publish");
    let rs = rec
        .wait_until(b.timeout(), "every event settled", |rs| {
            ids.iter().all(|id| terminal_for(rs, id).is_some())
        })
        .await;
    for (i, id) in ids.iter().enumerate() {
        let r = terminal_for(&rs, id).unwrap();
        match i {
            2 => assert!(
                matches!(r.settlement(), Settlement::DeadLettered { .. }),
                "{}: {:?}",
                b.name(),
                r.settlement()
            ),
            4 => assert_eq!(
                (r.attempt(), r.settlement()),
                (2, &Settlement::Acked),
                "{}",
                b.name()
            ),
            _ => assert_eq!(
                (r.attempt(), r.settlement()),
                (1, &Settlement::Acked),
                "{}",
                b.name()
            ),
        }
    }
    let sizes = sizes.lock().unwrap().clone();
    assert!(sizes.iter().all(|n| *n <= 5), "{}: {sizes:?}", b.name());
    publisher.close().await.expect("close");
    running.stop().await;
}

/// One test per scenario for a backend.
macro_rules! runtime_conformance {
    ($name:ident, $backend:expr $(, #[$attr:meta])?) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])?
            async fn retry_dead_letter_redrive() {
                let b = $backend;
                let caps = b.consumer("caps").await.expect("consumer").capabilities();
                super::retry_dead_letter_redrive(&b, caps).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])?
            async fn per_key_order() {
                super::per_key_order(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])?
            async fn panic_survived() {
                super::panic_survived(&$backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])?
            async fn batch_outcomes() {
                super::batch_outcomes(&$backend).await;
            }
        }
    };
}

// ---- memory ----

pub(crate) struct MemoryBackend(polybus_core::MemoryBroker);

impl Backend for MemoryBackend {
    type P = polybus_core::MemoryPublisher;
    type C = polybus_core::MemoryConsumer;
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn publisher(&self) -> Result<Self::P> {
        Ok(self.0.publisher())
    }
    async fn consumer(&self, group: &str) -> Result<Self::C> {
        Ok(self.0.consumer_group(group))
    }
    fn redrive_idle(&self) -> Duration {
        Duration::from_millis(200)
    }
}

runtime_conformance!(memory, MemoryBackend(polybus_core::MemoryBroker::new()));

// ---- NATS ----

fn nats_url() -> String {
    std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

pub(crate) struct NatsBackend;

impl Backend for NatsBackend {
    type P = polybus_nats::NatsProducer;
    type C = polybus_nats::NatsConsumer;
    fn name(&self) -> &'static str {
        "nats"
    }
    async fn publisher(&self) -> Result<Self::P> {
        polybus_nats::NatsProducer::connect(&nats_url()).await
    }
    async fn consumer(&self, group: &str) -> Result<Self::C> {
        polybus_nats::NatsOptions::new(nats_url())
            .queue_group(group)
            .consumer()
            .await
    }
    fn topic(&self) -> String {
        format!("polybus.rt.{}", uuid::Uuid::new_v4().simple())
    }
}

runtime_conformance!(nats, NatsBackend, #[ignore = "needs brokers: cargo xtask test"]);

// ---- JetStream ----

async fn reject_poison(Key(k): Key) -> std::result::Result<(), HandlerError> {
    if k.as_deref() == Some(&b"poison"[..]) {
        return Err(HandlerError::permanent("poison"));
    }
    Ok(())
}

/// A dead-letter topic in the same stream as its original topic: the dead letter keeps the
/// event's id, which the stream's duplicate window would drop as a repeat of the original
/// (the event was lost while the app reported it dead-lettered). It is written again under a
/// fresh id, with the event's id in `x-original-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn jetstream_dead_letter_sharing_the_originals_stream_is_kept() {
    let b = JsBackend;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let base = format!("polybus.rtsame.{tag}");
    let js = js_options().connect().await.expect("connect");
    js.ensure_stream(
        &format!("POLYBUS_TEST_SAME_{tag}"),
        &[&format!("{base}.>")],
        &polybus_jetstream::StreamSettings::default().max_age(Duration::from_secs(15 * 60)),
    )
    .await
    .expect("a stream over the topic and its dead letters");
    let topic = format!("{base}.orders");
    let app = App::new()
        .route(topic.clone(), reject_poison)
        .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(1));
    let dlq_topic = app.dead_letter_topic_for(&topic).expect("dead letters on");
    let reader_consumer = b.consumer(&group()).await.expect("consumer");
    let mut reader = live_reader(&b, &reader_consumer, &dlq_topic).await;
    let rec = Recorder::default();
    let running = start(&b, app, &topic, &rec).await;
    let publisher = b.publisher().await.expect("publisher");
    let poison = Event::builder().key("poison").data("bad").build().unwrap();
    let id = poison.id().to_owned();
    publisher.publish(&topic, poison).await.expect("publish");
    rec.wait_until(b.timeout(), "the poison event dead-lettered", |rs| {
        terminal_for(rs, &id)
            .is_some_and(|r| matches!(r.settlement(), Settlement::DeadLettered { .. }))
    })
    .await;
    let dead = loop {
        let d = tokio::time::timeout(b.timeout(), reader.next())
            .await
            .expect("no dead letter arrived: it was dropped")
            .expect("reader ended")
            .expect("reader delivery");
        let probe = d.event().kind() == PROBE;
        let ev = d.event().clone();
        d.ack().await.expect("ack");
        if !probe {
            break ev;
        }
    };
    assert_ne!(dead.id(), id, "the dead letter needed a fresh id");
    assert_eq!(dead.headers().get(X_ORIGINAL_ID), Some(id.as_str()));
    assert_eq!(dead.headers().get(X_ORIGINAL_TOPIC), Some(topic.as_str()));
    assert_eq!(dead.data().as_ref(), b"bad");
    assert_eq!(dead.key(), Some(&b"poison"[..]));
    running.stop().await;
}

pub(crate) struct JsBackend;

fn js_options() -> polybus_jetstream::JsOptions {
    use polybus_jetstream::{ConsumerSettings, JsOptions, StreamPolicy, StreamSettings};
    JsOptions::new(nats_url())
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "POLYBUS_TEST_".into(),
        })
        .stream_settings(StreamSettings::default().max_age(Duration::from_secs(15 * 60)))
        .consumer_settings(
            ConsumerSettings::default()
                .ack_wait(Duration::from_secs(10))
                .confirm_acks(true),
        )
}

impl Backend for JsBackend {
    type P = polybus_jetstream::JsProducer;
    type C = polybus_jetstream::JsConsumer;
    fn name(&self) -> &'static str {
        "jetstream"
    }
    fn dedups_by_id(&self) -> bool {
        true
    }
    async fn publisher(&self) -> Result<Self::P> {
        js_options().producer().await
    }
    async fn consumer(&self, group: &str) -> Result<Self::C> {
        js_options().group(group).consumer().await
    }
    fn topic(&self) -> String {
        format!("polybus.rt.{}", uuid::Uuid::new_v4().simple())
    }
}

runtime_conformance!(jetstream, JsBackend, #[ignore = "needs brokers: cargo xtask test"]);

// ---- Kafka (tansu) ----

pub(crate) struct KafkaBackend;

fn kafka_config(group: &str) -> polybus_kafka::KafkaConfig {
    let brokers =
        std::env::var("POLYBUS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    kafka_config_at(&brokers, group)
}

fn kafka_config_at(brokers: &str, group: &str) -> polybus_kafka::KafkaConfig {
    polybus_kafka::KafkaConfig::new(brokers, group)
        .with_auto_offset_reset("earliest")
        .with_session_timeout(Duration::from_secs(6), Duration::from_millis(500))
        .with_commit_interval(Duration::from_millis(200))
        .with_connect_timeout(Duration::from_secs(10))
        .set("fetch.wait.max.ms", "50")
        .set("topic.metadata.refresh.interval.ms", "2000")
}

impl Backend for KafkaBackend {
    type P = polybus_kafka::KafkaProducer;
    type C = polybus_kafka::KafkaConsumer;
    fn name(&self) -> &'static str {
        "kafka"
    }
    async fn publisher(&self) -> Result<Self::P> {
        polybus_kafka::KafkaProducer::new_with_config(&kafka_config("unused"))
    }
    async fn consumer(&self, group: &str) -> Result<Self::C> {
        polybus_kafka::KafkaConsumer::new(&kafka_config(group))
    }
    fn redrive_idle(&self) -> Duration {
        Duration::from_secs(12)
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(90)
    }
}

/// Kafka on a broker the test started itself (its address), with the shared broker's settings.
pub(crate) struct KafkaAt(pub(crate) String);

impl Backend for KafkaAt {
    type P = polybus_kafka::KafkaProducer;
    type C = polybus_kafka::KafkaConsumer;
    fn name(&self) -> &'static str {
        "kafka"
    }
    async fn publisher(&self) -> Result<Self::P> {
        polybus_kafka::KafkaProducer::new_with_config(&kafka_config_at(&self.0, "unused"))
    }
    async fn consumer(&self, group: &str) -> Result<Self::C> {
        polybus_kafka::KafkaConsumer::new(&kafka_config_at(&self.0, group))
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(90)
    }
}

runtime_conformance!(kafka, KafkaBackend, #[ignore = "needs brokers: cargo xtask test"]);

// ---- MQTT (mosquitto, MQTT 5) ----

pub(crate) struct MqttBackend;

fn mqtt_config(what: &str) -> polybus_mqtt::MqttConfig {
    let host = std::env::var("POLYBUS_MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let port = std::env::var("POLYBUS_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    let id = format!("polybus-rt-{what}-{}", uuid::Uuid::new_v4().simple());
    polybus_mqtt::MqttConfig::new(host, port, id)
        .connect_timeout(Duration::from_secs(5))
        .protocol(polybus_mqtt::Protocol::V5)
}

impl Backend for MqttBackend {
    type P = polybus_mqtt::MqttProducer;
    type C = polybus_mqtt::MqttSubscriber;
    fn name(&self) -> &'static str {
        "mqtt"
    }
    async fn publisher(&self) -> Result<Self::P> {
        Ok(mqtt_config("pub").connect().await?.producer())
    }
    async fn consumer(&self, group: &str) -> Result<Self::C> {
        Ok(mqtt_config("sub").connect().await?.subscriber(Some(group)))
    }
}

runtime_conformance!(mqtt, MqttBackend, #[ignore = "needs brokers: cargo xtask test"]);

// ---- The composed bus: publish through Bus (JetStream + spool, forwarded to Kafka), consume
// from Kafka ----

pub(crate) struct ComposeBackend;

impl Backend for ComposeBackend {
    type P = polybus_compose::Bus<polybus_jetstream::JsProducer, polybus_kafka::KafkaProducer>;
    type C = polybus_kafka::KafkaConsumer;
    fn name(&self) -> &'static str {
        "compose"
    }
    fn dedups_by_id(&self) -> bool {
        true
    }
    async fn publisher(&self) -> Result<Self::P> {
        // Each bus has its own spool; the directory outlives the test (it is small).
        let dir = tempfile::Builder::new()
            .prefix("polybus-rt-spool-")
            .tempdir()
            .map_err(|e| {
                polybus_core::Error::new(polybus_core::ErrorKind::Other, "test").with_source(e)
            })?
            .keep();
        let js = js_options().producer().await?;
        let kafka = polybus_kafka::KafkaProducer::new_with_config(&kafka_config("unused"))?;
        polybus_compose::Bus::builder()
            .spool_dir(dir)
            .build_with(js, kafka)
            .await
    }
    async fn consumer(&self, group: &str) -> Result<Self::C> {
        polybus_kafka::KafkaConsumer::new(&kafka_config(group))
    }
    fn topic(&self) -> String {
        // A NATS subject that the default topic map keeps as the Kafka topic name.
        format!("polybus.rt.{}", uuid::Uuid::new_v4().simple())
    }
    fn redrive_idle(&self) -> Duration {
        Duration::from_secs(12)
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(90)
    }
}

runtime_conformance!(compose, ComposeBackend, #[ignore = "needs brokers: cargo xtask test"]);
