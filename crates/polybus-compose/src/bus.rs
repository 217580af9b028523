//! The composed bus.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use polybus_core::{
    BoxPublisher, Consumer, Delivery, Error, ErrorKind, Event, Publisher, Receipt, Result,
};
use tokio::sync::{RwLock, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::BACKEND;
use crate::builder::{BusBuilder, Parts};
use crate::codec::SpoolRecord;
use crate::consume::{self, ConsumerFactory, ConsumerSpec, ReplayFrom, Start, Subscription};
use crate::dedup::{DedupFilter, DedupKey, DedupStore};
use crate::dlq::{self, DeadLetterTopic};
use crate::forwarder::{self, Phase, Shared};
use crate::metrics as m;
use crate::spool::{SYNC_INTERVAL, Spool};
use crate::stats::{BusStats, Counters};
use crate::switches::SwitchHandle;
use crate::topic_map::TopicMap;

/// Values [`Bus::publish`] accepts: an [`Event`], or a payload that becomes a new event with a
/// fresh id (`Bytes`, `Vec<u8>`, `String`, `&'static str`, `&'static [u8]`, `b"..."`).
pub trait IntoEvent {
    /// Converts into an event.
    fn into_event(self) -> Event;
}

impl IntoEvent for Event {
    fn into_event(self) -> Event {
        self
    }
}

macro_rules! payload_into_event {
    ($($t:ty),*) => {$(
        impl IntoEvent for $t {
            fn into_event(self) -> Event {
                Event::new(self)
            }
        }
    )*};
}
payload_into_event!(
    Bytes,
    BytesMut,
    Vec<u8>,
    String,
    &'static str,
    &'static [u8]
);

impl<const N: usize> IntoEvent for &'static [u8; N] {
    fn into_event(self) -> Event {
        Event::new(self)
    }
}

/// What [`Bus::publish`] returns: the event is durable (JetStream + spool, or spool alone in
/// Kafka-only mode) and on its way to Kafka.
#[derive(Debug, Clone)]
pub struct BusReceipt {
    id: String,
    subject: String,
    topic: Arc<str>,
    spool_sequence: u64,
    nats: Option<Receipt>,
    nats_latency: Option<Duration>,
    latency: Duration,
}

impl BusReceipt {
    /// The event id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The NATS subject published to.
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// The Kafka topic the event is forwarded to.
    pub fn kafka_topic(&self) -> &str {
        &self.topic
    }
    /// The event's sequence number in the spool.
    pub fn spool_sequence(&self) -> u64 {
        self.spool_sequence
    }
    /// The JetStream receipt, unless the bus runs Kafka-only.
    pub fn nats(&self) -> Option<&Receipt> {
        self.nats.as_ref()
    }
    /// How long the NATS/JetStream publish took.
    pub fn nats_latency(&self) -> Option<Duration> {
        self.nats_latency
    }
    /// How long the whole publish took (NATS receipt and spool commit).
    pub fn latency(&self) -> Duration {
        self.latency
    }
    /// Whether JetStream recognised the event as a duplicate (same `Nats-Msg-Id`).
    pub fn is_duplicate(&self) -> bool {
        self.nats.as_ref().is_some_and(Receipt::is_duplicate)
    }
}

/// Options of [`Bus::redrive`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// The consumer group reading the dead-letter topic (default `polybus-redrive`).
    pub group: String,
    /// Stop after this long without a dead letter (default 2 s).
    pub idle: Duration,
    /// Stop after moving this many (default: no limit).
    pub max: usize,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        RedriveOptions {
            group: "polybus-redrive".into(),
            idle: Duration::from_secs(2),
            max: usize::MAX,
        }
    }
}

impl RedriveOptions {
    /// Sets [`group`](Self::group).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }
    /// Sets [`idle`](Self::idle).
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }
    /// Sets [`max`](Self::max).
    pub fn max(mut self, max: usize) -> Self {
        self.max = max;
        self
    }
}

/// The composed bus: NATS/JetStream for the fast acknowledgement and real-time notifications,
/// Kafka as the durable, replayable source of truth, and a crash-safe spool in between.
///
/// Generic over the two publishers so the engine can run on anything that implements
/// [`Publisher`] (the tests use [`MemoryBroker`](polybus_core::MemoryBroker)); the builder
/// makes `Bus<BoxPublisher, BoxPublisher>`, the default type. Cheap to clone (an `Arc`).
///
/// See the crate docs for the write path, the read path and their guarantees.
pub struct Bus<F = BoxPublisher, K = BoxPublisher> {
    inner: Arc<Inner<F, K>>,
}

impl<F, K> Clone for Bus<F, K> {
    fn clone(&self) -> Self {
        Bus {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<F, K> {
    /// The fast path (JetStream).
    nats: F,
    /// The durable backbone (Kafka), shared with the forwarders.
    kafka: Arc<K>,
    spool: Arc<Spool>,
    topics: TopicMap,
    dead_letters: DeadLetterTopic,
    source: Cow<'static, str>,
    switches: SwitchHandle,
    counters: Arc<Counters>,
    closed: AtomicBool,
    /// Publishes hold it shared; `close` takes it exclusively to wait for them.
    inflight: RwLock<()>,
    phase: watch::Sender<Phase>,
    forwarders: Mutex<Vec<JoinHandle<()>>>,
    background: Mutex<Vec<JoinHandle<()>>>,
    close_done: tokio::sync::Mutex<bool>,
    drain_timeout: Duration,
    kafka_consumers: Option<Arc<dyn ConsumerFactory>>,
    nats_consumers: Option<Arc<dyn ConsumerFactory>>,
    dedup: Arc<dyn DedupStore>,
    dedup_by: DedupKey,
    consume_buffer: usize,
}

impl Bus {
    /// A builder for a bus over NATS/JetStream and Kafka (or any publishers you hand it).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let bus = polybus_compose::Bus::builder()
    ///     .nats("nats://127.0.0.1:4222")
    ///     .kafka("localhost:9092")
    ///     .spool_dir("./spool")
    ///     .build()
    ///     .await?;
    /// bus.publish("orders.created", bytes::Bytes::from_static(b"{...}")).await?;
    /// bus.close().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> BusBuilder {
        BusBuilder::new()
    }
}

impl<F, K> Bus<F, K>
where
    F: Publisher + 'static,
    K: Publisher + 'static,
{
    pub(crate) async fn start(nats: F, kafka: K, parts: Parts) -> Result<Self> {
        let spool_cfg = parts.spool.clone();
        let buckets = parts.forwarders;
        let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_cfg, buckets))
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Other, BACKEND)
                    .with_message("opening the spool panicked")
                    .with_source(e)
            })??;
        let spool = Arc::new(spool);
        let kafka = Arc::new(kafka);
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            spool: spool.clone(),
            kafka: kafka.clone(),
            retry: parts.retry.clone(),
            dead_letters: parts.dead_letters.clone(),
            counters: counters.clone(),
            max_in_flight: parts.max_in_flight,
        });
        let (phase, _) = watch::channel(Phase::Running);
        let forwarders = (0..spool.buckets())
            .map(|b| {
                let (shared, switches, phases) = (
                    shared.clone(),
                    parts.switches.subscribe(),
                    phase.subscribe(),
                );
                let supervised =
                    forwarder::supervise(b, parts.retry.clone(), phase.subscribe(), move || {
                        forwarder::run(b, shared.clone(), switches.clone(), phases.clone())
                    });
                tokio::spawn(async move {
                    supervised.await;
                })
            })
            .collect();

        let mut background = Vec::new();
        // Housekeeping: durable commits of deletions, sweeping forwarded keys.
        let ticking = spool.clone();
        background.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(SYNC_INTERVAL / 2);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                ticking.tick();
            }
        }));
        // Every switch change is logged.
        let mut watched = parts.switches.subscribe();
        background.push(tokio::spawn(async move {
            let mut before = *watched.borrow_and_update();
            while watched.changed().await.is_ok() {
                let now = *watched.borrow_and_update();
                if now != before {
                    metrics::counter!(m::SWITCH_CHANGES).increment(1);
                    tracing::info!(
                        from = %before,
                        to = %now,
                        dual_write = now.dual_write(),
                        single_channel = ?now.single_channel(),
                        pause_forwarding = now.pause_forwarding(),
                        "polybus-compose switches changed"
                    );
                    before = now;
                }
            }
        }));
        if let Some(source) = parts.switch_source {
            background.push(tokio::spawn(source.run(parts.switches.clone())));
        }
        tracing::info!(
            spool = %parts.spool.dir().display(),
            depth = spool.depth(),
            forwarders = spool.buckets(),
            switches = %parts.switches.get(),
            "polybus-compose bus started"
        );
        Ok(Bus {
            inner: Arc::new(Inner {
                nats,
                kafka,
                spool,
                topics: parts.topics,
                dead_letters: parts.dead_letters,
                source: parts.source,
                switches: parts.switches,
                counters,
                closed: AtomicBool::new(false),
                inflight: RwLock::new(()),
                phase,
                forwarders: Mutex::new(forwarders),
                background: Mutex::new(background),
                close_done: tokio::sync::Mutex::new(false),
                drain_timeout: parts.drain_timeout,
                kafka_consumers: parts.kafka_consumers,
                nats_consumers: parts.nats_consumers,
                dedup: parts.dedup,
                dedup_by: parts.dedup_by,
                consume_buffer: parts.consume_buffer,
            }),
        })
    }

    /// Publishes to the NATS subject `subject` and returns once the event is durable.
    ///
    /// In dual-write mode (the default): the event is published to JetStream (which dedups it
    /// by `Nats-Msg-Id` = id) and, concurrently, committed to the spool (fsync); the call
    /// returns when both are done. A forwarder writes it to the mapped Kafka topic in the
    /// background and deletes it from the spool when Kafka acknowledges. See [`Switches`](crate::Switches) for the other modes. When the spool is full
    /// the call waits or fails with [`ErrorKind::Rejected`], per its policy.
    ///
    /// # Errors
    /// * [`ErrorKind::Closed`] after [`close`](Self::close);
    /// * [`ErrorKind::InvalidTopic`] if `subject` is not a concrete subject or maps to no
    ///   legal Kafka topic; [`ErrorKind::Codec`] for an invalid event;
    /// * [`ErrorKind::Rejected`] when the spool is full under the `reject` policy;
    /// * the NATS publisher's error: while nats-server is down, [`ErrorKind::Timeout`] (or
    ///   [`ErrorKind::Connect`]) once the JetStream publish timeout has passed
    ///   ([`JsOptions::publish_timeout`](polybus_jetstream::JsOptions::publish_timeout),
    ///   default 10 s: the client keeps the message and reconnects in the background, so the
    ///   call waits that long rather than failing at once); [`ErrorKind::NotFound`] when no
    ///   stream covers the subject (`StreamPolicy::Existing`); [`ErrorKind::Rejected`] when
    ///   the stream refuses the message;
    /// * a spool error.
    ///
    /// A failed JetStream publish does not undo the spool write, which runs to its end all
    /// the same: the call fails, yet the event is spooled and **still reaches Kafka**. A
    /// publish that timed out may also still reach JetStream once the client has reconnected.
    /// So an error means "not acknowledged", not "went nowhere". Publishing the same
    /// [`Event`] again is safe: JetStream dedups it by `Nats-Msg-Id`, the spool's forwarded
    /// keys keep Kafka at one copy, and consumers dedup by `source` + `id`.
    pub async fn publish(&self, subject: &str, payload: impl IntoEvent) -> Result<BusReceipt> {
        let mut event = payload.into_event();
        event.set_source_if_unset(&self.inner.source);
        // One trace for the whole way: the trace context goes into the event before it is
        // cloned for NATS and spooled for Kafka, so the NATS publish, the Kafka forward (in a
        // background task, maybe after a restart) and every consumer continue it.
        let span = polybus_core::telemetry::publish_span(BACKEND, subject, &event);
        polybus_core::telemetry::inject(&span, &mut event);
        let result = self
            .publish_event(subject, event)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(_) => {
                Counters::add(&self.inner.counters.published, 1);
                metrics::counter!(m::PUBLISHED).increment(1);
            }
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", polybus_core::metrics::kind_code(e.kind()));
                Counters::add(&self.inner.counters.publish_errors, 1);
                metrics::counter!(
                    m::PUBLISH_ERRORS,
                    "kind" => polybus_core::metrics::kind_code(e.kind())
                )
                .increment(1);
            }
        }
        result
    }

    async fn publish_event(&self, subject: &str, event: Event) -> Result<BusReceipt> {
        let started = Instant::now();
        let inner = &*self.inner;
        let _inflight = inner.inflight.read().await;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::closed(BACKEND).with_message("the bus is closed"));
        }
        event.validate()?;
        let topic = inner.topics.kafka_topic_shared(subject)?;
        let switches = inner.switches.get();
        let reservation = inner.spool.reserve().await?;
        let id = event.id().to_owned();
        let record = SpoolRecord::new(subject, &topic, event);
        let bucket = inner.spool.bucket_of(&record.event);
        let spool_write = inner.spool.append(reservation, bucket, &record);
        // The JetStream publish and the spool commit run concurrently: the acknowledgement
        // waits for both, so its latency is the slower of the two, not their sum.
        let (nats, nats_latency, spooled) = if switches.writes_nats() {
            let nats_publish = async {
                let t = Instant::now();
                let r = inner.nats.publish(subject, record.event.clone()).await;
                (r, t.elapsed())
            };
            let ((receipt, took), spooled) = tokio::join!(nats_publish, spool_write);
            metrics::histogram!(m::NATS_LATENCY).record(took.as_secs_f64());
            (Some(receipt?), Some(took), spooled)
        } else {
            (None, None, spool_write.await)
        };
        let spool_sequence = spooled?;
        let latency = started.elapsed();
        metrics::histogram!(m::ACK_LATENCY).record(latency.as_secs_f64());
        Ok(BusReceipt {
            id,
            subject: subject.to_owned(),
            topic,
            spool_sequence,
            nats,
            nats_latency,
            latency,
        })
    }

    /// Drains and stops: new publishes fail with `Closed`, publishes in flight finish, the
    /// forwarders write what the spool holds to Kafka for up to the drain timeout (default
    /// 10 s; less if the spool empties), and what is left stays in the spool for the next
    /// start. Then the spool is committed durably and both publishers are flushed and closed
    /// (each bounded by the drain timeout, so a broker that is down does not hold `close`).
    /// Nothing acknowledged is lost. Closing twice is not an error.
    ///
    /// # Errors
    /// The first error of the final spool commit or of closing a publisher (all are tried).
    pub async fn close(&self) -> Result<()> {
        let inner = &*self.inner;
        let mut done = inner.close_done.lock().await;
        if *done {
            return Ok(());
        }
        inner.closed.store(true, Ordering::Release);
        inner.spool.close_capacity();
        drop(inner.inflight.write().await);

        let deadline = polybus_core::time::deadline_after(inner.drain_timeout);
        inner.phase.send_replace(Phase::Draining { deadline });
        let handles = std::mem::take(&mut *lock(&inner.forwarders));
        for h in handles {
            let _ = h.await;
        }
        for h in std::mem::take(&mut *lock(&inner.background)) {
            h.abort();
        }
        let left = inner.spool.depth();
        let mut first_error = inner.spool.shutdown().await.err();
        // A broker that is down must not hold close() much past the drain timeout: what the
        // publishers still hold is in the spool anyway.
        let bound = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let bounded = |what: &'static str, r: std::result::Result<Result<()>, _>| {
            r.unwrap_or_else(|_| {
                Err(Error::new(ErrorKind::Timeout, BACKEND)
                    .with_message(format!("{what} did not finish within {bound:?}")))
            })
        };
        let kafka_close = async {
            inner.kafka.flush().await?;
            inner.kafka.close().await
        };
        let nats_close = async {
            inner.nats.flush().await?;
            inner.nats.close().await
        };
        for r in [
            bounded(
                "closing the Kafka publisher",
                tokio::time::timeout(bound, kafka_close).await,
            ),
            bounded(
                "closing the NATS publisher",
                tokio::time::timeout(bound, nats_close).await,
            ),
        ] {
            if let Err(e) = r {
                tracing::warn!(error = %e, "closing a publisher of the bus failed");
                first_error.get_or_insert(e);
            }
        }
        if left > 0 {
            tracing::info!(
                left,
                "polybus-compose bus closed; events left in the spool are forwarded on the next start"
            );
        } else {
            tracing::info!("polybus-compose bus closed; the spool is empty");
        }
        *done = true;
        first_error.map_or(Ok(()), Err)
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Counters and the spool depth.
    pub fn stats(&self) -> BusStats {
        self.inner
            .counters
            .snapshot(self.inner.spool.depth(), self.inner.spool.max_depth())
    }

    /// Events in the spool (acknowledged, not yet confirmed by Kafka).
    pub fn spool_depth(&self) -> u64 {
        self.inner.spool.depth()
    }

    /// Waits until the spool is empty (everything acknowledged is in Kafka or a dead-letter
    /// topic), at most `timeout`. Returns whether it is empty.
    pub async fn wait_forwarded(&self, timeout: Duration) -> bool {
        let deadline = polybus_core::time::deadline_after(timeout);
        loop {
            if self.inner.spool.depth() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The live switches; [`SwitchHandle::set`] changes them at once.
    pub fn switches(&self) -> &SwitchHandle {
        &self.inner.switches
    }

    /// The subject → Kafka topic mapping.
    pub fn topic_map(&self) -> &TopicMap {
        &self.inner.topics
    }

    /// The dead-letter topic of `subject`'s Kafka topic.
    ///
    /// # Errors
    /// As [`TopicMap::kafka_topic`].
    pub fn dead_letter_topic(&self, subject: &str) -> Result<String> {
        let topic = self.inner.topics.kafka_topic(subject)?;
        Ok(self.inner.dead_letters.topic_for(&topic))
    }

    /// The fast-path (NATS/JetStream) publisher.
    pub fn nats(&self) -> &F {
        &self.inner.nats
    }

    /// The Kafka publisher.
    pub fn kafka(&self) -> &K {
        &self.inner.kafka
    }

    /// Reads `subject`'s Kafka topic as consumer group `group`: the source of truth,
    /// at-least-once (ack after processing), with duplicates (same `source`+`id`, or the
    /// configured business key and version) dropped. A delivery's key is recorded as
    /// processed when it is acked.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] without a Kafka consumer factory; the factory's errors.
    pub async fn consume(&self, subject: &str, group: &str) -> Result<Subscription> {
        let factory = self.factory(&self.inner.kafka_consumers, "Kafka")?;
        let topic = self.inner.topics.kafka_topic(subject)?;
        let consumer = factory
            .create(ConsumerSpec::new(Some(group.to_owned()), Start::Committed))
            .await?;
        let dedup = DedupFilter::new(
            self.inner.dedup.clone(),
            self.inner.dedup_by.clone(),
            group.to_owned(),
            Some(self.inner.counters.clone()),
        );
        Ok(consume::spawn(
            consumer,
            topic,
            self.inner.consume_buffer,
            None,
            Some(dedup),
        )
        .await)
    }

    /// The real-time NATS stream of `subject` (no group, no replay: what is published from
    /// now on). Kafka-only mode publishes nothing here.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] without a NATS consumer factory; the factory's errors.
    pub async fn notifications(&self, subject: &str) -> Result<Subscription> {
        let factory = self.factory(&self.inner.nats_consumers, "NATS")?;
        let consumer = factory
            .create(ConsumerSpec::new(None, Start::Committed))
            .await?;
        Ok(consume::spawn(
            consumer,
            subject.to_owned(),
            self.inner.consume_buffer,
            None,
            None,
        )
        .await)
    }

    /// A compensation replay: reads `subject`'s Kafka topic again from `from`, in a fresh
    /// consumer group `<group_prefix>-replay-<uuid>` that starts at the earliest retained
    /// event; events before `from` are skipped on the client side (the generic consumer
    /// interface has no seek). No dedup is applied: a replay is meant to reprocess.
    ///
    /// # Errors
    /// As [`consume`](Self::consume).
    pub async fn replay(
        &self,
        subject: &str,
        group_prefix: &str,
        from: ReplayFrom,
    ) -> Result<Subscription> {
        let factory = self.factory(&self.inner.kafka_consumers, "Kafka")?;
        let topic = self.inner.topics.kafka_topic(subject)?;
        let group = format!("{group_prefix}-replay-{}", uuid::Uuid::now_v7().simple());
        let consumer = factory
            .create(ConsumerSpec::new(Some(group), Start::Earliest))
            .await?;
        Ok(consume::spawn(consumer, topic, self.inner.consume_buffer, Some(from), None).await)
    }

    /// Reads the dead-letter topic of `subject` as group `group` (no dedup), for inspection.
    ///
    /// # Errors
    /// As [`consume`](Self::consume).
    pub async fn dead_letters(&self, subject: &str, group: &str) -> Result<Subscription> {
        let factory = self.factory(&self.inner.kafka_consumers, "Kafka")?;
        let topic = self.dead_letter_topic(subject)?;
        let consumer = factory
            .create(ConsumerSpec::new(Some(group.to_owned()), Start::Committed))
            .await?;
        Ok(consume::spawn(consumer, topic, self.inner.consume_buffer, None, None).await)
    }

    /// Moves dead letters of `subject` back: each is stripped of the dead-letter headers,
    /// spooled for its original topic (`x-original-topic`) with fresh attempt counters, and
    /// then acked on the dead-letter topic. Stops when no dead letter arrives for
    /// `options.idle` or after `options.max`. With a [`DeadLetterTopic::Fixed`] topic this
    /// moves every dead letter in it, whatever its subject.
    ///
    /// # Errors
    /// `Closed` after close; the consumer's and the spool's errors (letters moved so far stay
    /// moved).
    pub async fn redrive(&self, subject: &str, options: RedriveOptions) -> Result<usize> {
        let factory = self.factory(&self.inner.kafka_consumers, "Kafka")?;
        let topic = self.inner.topics.kafka_topic(subject)?;
        let dlq_topic = self.inner.dead_letters.topic_for(&topic);
        let consumer = factory
            .create(ConsumerSpec::new(
                Some(options.group.clone()),
                Start::Committed,
            ))
            .await?;
        let mut stream = std::pin::pin!(consumer.subscribe(&dlq_topic));
        let mut moved = 0usize;
        while moved < options.max {
            let d = match tokio::time::timeout(options.idle, stream.next()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(item)) => item?,
            };
            let _inflight = self.inner.inflight.read().await;
            if self.is_closed() {
                return Err(Error::closed(BACKEND).with_message("the bus is closed"));
            }
            let (event, original_topic, original_subject) = dlq::strip(d.event().clone());
            let target = original_topic.unwrap_or_else(|| topic.clone());
            let subj = original_subject.unwrap_or_else(|| subject.to_owned());
            let reservation = self.inner.spool.reserve().await?;
            let record = SpoolRecord::new(&subj, &target, event);
            let bucket = self.inner.spool.bucket_of(&record.event);
            self.inner
                .spool
                .append(reservation, bucket, &record)
                .await?;
            d.ack().await?;
            moved += 1;
        }
        Counters::add(&self.inner.counters.redriven, moved as u64);
        metrics::counter!(m::REDRIVEN).increment(moved as u64);
        tracing::info!(subject, dead_letter_topic = %dlq_topic, moved, "dead letters redriven");
        Ok(moved)
    }

    /// Dead-letters a consumed delivery whose processing failed `attempts` times: writes it
    /// to the dead-letter topic of the topic it came from, with its key, its headers,
    /// `x-original-topic`/`-partition`/`-offset`, `x-exception-message`/`-kind` and
    /// `x-attempts`. Settle (ack) the delivery afterwards.
    ///
    /// # Errors
    /// The Kafka publisher's error.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        error: &Error,
        attempts: u32,
    ) -> Result<()> {
        let topic = self.inner.dead_letters.topic_for(delivery.topic());
        self.inner
            .kafka
            .publish(&topic, dlq::from_delivery(delivery, error, attempts))
            .await?;
        Counters::add(&self.inner.counters.dead_letters, 1);
        metrics::counter!(m::DEAD_LETTERS).increment(1);
        Ok(())
    }

    fn factory<'a>(
        &self,
        f: &'a Option<Arc<dyn ConsumerFactory>>,
        what: &str,
    ) -> Result<&'a Arc<dyn ConsumerFactory>> {
        f.as_ref().ok_or_else(|| {
            Error::unsupported(
                BACKEND,
                format!("this bus has no {what} consumer factory (see BusBuilder)"),
            )
        })
    }
}

impl<F, K> Publisher for Bus<F, K>
where
    F: Publisher + 'static,
    K: Publisher + 'static,
{
    async fn publish(&self, topic: &str, event: Event) -> Result<Receipt> {
        let r = Bus::publish(self, topic, event).await?;
        Ok(Receipt::new(topic)
            .with_sequence(r.spool_sequence)
            .with_duplicate(r.is_duplicate()))
    }

    /// Flushes the NATS publisher and makes the spool durable. Every acknowledged event is
    /// durable already; use [`Bus::wait_forwarded`] to wait for Kafka.
    async fn flush(&self) -> Result<()> {
        self.inner.nats.flush().await?;
        self.inner.spool.sync().await
    }

    async fn close(&self) -> Result<()> {
        Bus::close(self).await
    }
}

impl<F, K> fmt::Debug for Bus<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("spool", &self.inner.spool)
            .field("switches", &self.inner.switches.get())
            .field("topics", &self.inner.topics)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<F, K> Drop for Inner<F, K> {
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Stop);
        for h in lock(&self.background).drain(..) {
            h.abort();
        }
        if !*self.close_done.get_mut() {
            tracing::warn!(
                depth = self.spool.depth(),
                "polybus-compose bus dropped without close(); spooled events are forwarded on the next start"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
