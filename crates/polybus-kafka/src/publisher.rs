//! `KafkaProducer`: an idempotent producer that publishes events as CloudEvents records.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use polybus_core::cloudevents::{Mode, WireFormat};
use polybus_core::telemetry::PublishScope;
use polybus_core::{
    Backlog, Capabilities, Error, ErrorKind, Event, Ordering, Publisher, Receipt, Result, Unsettled,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::KafkaConfig;
use crate::admin::{TopicEnsurer, blocking, validate_topic};
use crate::convert::{self, Encoded};
use crate::error::{BACKEND, closed, from_kafka};

/// What producers and consumers of the default configuration
/// ([`KafkaConfig::new`](crate::KafkaConfig::new) with nothing changed) guarantee, as a
/// constant. A given configuration can differ (`auto.offset.reset = latest` misses the
/// backlog, a producer without idempotence may reorder, another `message.max.bytes`...):
/// [`KafkaConfig::capabilities`](crate::KafkaConfig::capabilities) derives them, and
/// [`KafkaProducer::capabilities`] and [`KafkaConsumer::capabilities`](crate::KafkaConsumer::capabilities)
/// return those of their configuration.
///
/// `exactly_once_publish` is `false`: the idempotent producer only keeps its own retries from
/// duplicating a record; the same event published twice is stored twice.
pub const CAPABILITIES: Capabilities = Capabilities::NONE
    .with_persistent(true)
    .with_redelivery_on_nack(true)
    .with_nack_delay(true)
    .with_unsettled(Unsettled::RedeliveredFromPosition)
    .with_consumer_groups(true)
    .with_durable_groups(true)
    .with_ordering(Ordering::PerKey)
    .with_backlog(Backlog::Delivered)
    .with_exactly_once_publish(false)
    .with_headers(true)
    .with_request_reply(false)
    .with_max_payload(Some(crate::config::DEFAULT_MESSAGE_MAX_BYTES));

/// Publishes events to Kafka topics.
///
/// Cheap to clone (all clones share one librdkafka producer). The producer is idempotent by
/// default, so librdkafka's retries never duplicate or reorder a record within a partition.
/// The event key becomes the record key, so events with the same key land on one partition in
/// publish order. Missing topics are created first when the config allows it.
///
/// When the local queue is full, `publish` waits for room (it never drops); `flush` waits for
/// every queued record; `close` flushes and refuses later publishes with `Closed`.
///
/// ```no_run
/// use polybus_core::mq::MessageProducer;
/// use polybus_kafka::{KafkaConfig, KafkaProducer};
/// # #[allow(dead_code)] async fn demo() -> anyhow::Result<()> {
/// let producer = KafkaProducer::new_with_config(&KafkaConfig::new("127.0.0.1:9092", "g1"))?;
/// let receipt = producer.send("t", b"hello").await?;
/// println!("partition {:?} offset {:?}", receipt.partition(), receipt.sequence());
/// producer.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaProducer {
    inner: Arc<Inner>,
}

struct Inner {
    producer: FutureProducer,
    topics: Arc<TopicEnsurer>,
    /// The last topic published to (checked and ensured): see `KafkaProducer::last_topic`.
    last_topic: Mutex<Option<Arc<str>>>,
    closed: AtomicBool,
    mode: Mode,
    wire_format: WireFormat,
    source: Option<Cow<'static, str>>,
    max_bytes: usize,
    capabilities: Capabilities,
    brokers: String,
    key_mapper: crate::config::KeyMapper,
    telemetry: polybus_core::telemetry::Telemetry,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("brokers", &self.inner.brokers)
            .field("mode", &self.inner.mode)
            .field("wire_format", &self.inner.wire_format)
            .field("closed", &self.inner.closed.load(AtomicOrdering::Relaxed))
            .finish()
    }
}

impl KafkaProducer {
    /// A producer for the brokers of `cfg`. librdkafka connects in the background; an
    /// unreachable broker shows up as `Connect` on the first publish (after the connect
    /// timeout) rather than here.
    ///
    /// # Errors
    /// A configuration librdkafka refuses (unknown property, bad value).
    pub fn new_with_config(cfg: &KafkaConfig) -> Result<Self> {
        cfg.check()?;
        let producer: FutureProducer = cfg
            .producer_client_config()
            .create()
            .map_err(|e| from_kafka(e, "creating the producer"))?;
        Ok(Self::from_parts(producer, cfg))
    }

    pub(crate) fn from_parts(producer: FutureProducer, cfg: &KafkaConfig) -> Self {
        KafkaProducer {
            inner: Arc::new(Inner {
                producer,
                topics: TopicEnsurer::new(cfg),
                last_topic: Mutex::new(None),
                closed: AtomicBool::new(false),
                mode: cfg.mode(),
                wire_format: cfg.wire_format(),
                source: cfg.source().cloned(),
                max_bytes: cfg.message_max_bytes(),
                capabilities: cfg.capabilities(),
                brokers: cfg.brokers().to_owned(),
                key_mapper: cfg.key_mapper().clone(),
                telemetry: polybus_core::telemetry::Telemetry::new(BACKEND)
                    .with_trace_policy(cfg.trace_policy()),
            }),
        }
    }

    /// The librdkafka producer underneath, for what polybus does not wrap.
    pub fn client(&self) -> &FutureProducer {
        &self.inner.producer
    }

    /// What this producer's configuration guarantees
    /// ([`KafkaConfig::capabilities`](crate::KafkaConfig::capabilities)).
    pub fn capabilities(&self) -> Capabilities {
        self.inner.capabilities
    }

    /// Publishes `event` to `topic` and waits for the broker's acknowledgement.
    ///
    /// When the future is first polled (inside the caller's span, so the publish span is its
    /// child), the event is checked, encoded and handed to librdkafka; the future then waits
    /// for its delivery report. A small hand-written future (no `async fn` state holding the
    /// event, the topic check and librdkafka's send future at once), so the thousands a
    /// producer keeps in flight stay small; the first publish to a topic (its check or
    /// creation) and a full local queue take a boxed slow path.
    ///
    /// # Errors
    /// `Closed` after [`close`](Self::close); `InvalidTopic`; `PayloadTooLarge` when key +
    /// value + headers exceed `message.max.bytes` (checked before sending); `Connect` when no
    /// broker answers while the topic is checked; `Timeout` when the record could not be
    /// delivered within `message.timeout.ms`; `Unauthorized` without permission.
    pub fn publish<'a, 't>(
        &'a self,
        topic: &'t str,
        event: Event,
    ) -> impl Future<Output = Result<Receipt>> + Send + use<'a, 't> {
        PublishFuture {
            producer: self,
            topic,
            scope: None,
            step: Step::Start(event),
        }
    }

    /// What `publish` does on the first poll: the closed and topic checks and the encoding. `known`: the topic's shared name when it is the last topic published to
    /// (checked and ensured already).
    fn prepare(
        &self,
        topic: &str,
        event: &mut Event,
    ) -> Result<(Encoded, Option<i64>, Option<Arc<str>>)> {
        if self.inner.closed.load(AtomicOrdering::Acquire) {
            return Err(closed("the producer"));
        }
        let known = self.last_topic(topic);
        if known.is_none() {
            validate_topic(topic)?;
        }
        let encoded = self.encode(event)?;
        Ok((encoded, convert::millis(event.time()), known))
    }

    /// The last topic published to, if it is `topic`: valid and ensured, and the name its
    /// receipts share (no allocation per receipt, no name check, no lookup in the ensurer's
    /// set per publish).
    fn last_topic(&self, topic: &str) -> Option<Arc<str>> {
        let last = self.inner.last_topic.lock().ok()?;
        last.as_ref().filter(|t| ***t == *topic).cloned()
    }

    /// The slow path of a publish: ensures the topic (the first publish to it), remembers it
    /// as the last topic, then sends the record, waiting for room while the local queue is
    /// full.
    async fn publish_slow(
        &self,
        topic: &str,
        record: Encoded,
        timestamp: Option<i64>,
        known: Option<Arc<str>>,
    ) -> Result<Receipt> {
        let shared = match known {
            Some(t) => t,
            None => {
                self.inner.topics.ensure(topic).await?;
                let shared: Arc<str> = Arc::from(topic);
                if let Ok(mut last) = self.inner.last_topic.lock() {
                    *last = Some(shared.clone());
                }
                shared
            }
        };
        let Encoded {
            key,
            value,
            headers,
            ..
        } = record;
        let record = future_record(topic, key.as_deref(), &value, headers, timestamp);
        // Timeout::Never: when the local queue is full, wait and retry; never drop.
        match self.inner.producer.send(record, Timeout::Never).await {
            Ok(d) => Ok(receipt(shared, d.partition, d.offset)),
            Err((e, _)) => Err(from_kafka(e, format!("publishing to {topic:?}"))),
        }
    }

    /// Checks and encodes one event (default source, size against `message.max.bytes`).
    fn encode(&self, event: &mut Event) -> Result<Encoded> {
        if let Some(src) = &self.inner.source {
            event.set_source_if_unset(src);
        }
        let encoded = if self.inner.wire_format.is_lean() {
            convert::encode_lean(event, &self.inner.key_mapper)?
        } else {
            convert::encode(event, self.inner.mode, &self.inner.key_mapper)?
        };
        if encoded.size > self.inner.max_bytes {
            return Err(
                Error::new(ErrorKind::PayloadTooLarge, BACKEND).with_message(format!(
                    "record of {} bytes (key + value + headers) exceeds message.max.bytes = {}",
                    encoded.size, self.inner.max_bytes
                )),
            );
        }
        Ok(encoded)
    }

    /// Publishes `events` to `topic` in order: every event is checked and encoded first (one
    /// that cannot be fails the batch with nothing sent), then all records are enqueued in
    /// librdkafka, then the delivery reports are awaited in order. When librdkafka's queue
    /// is full (`queue.buffering.max.messages`), the oldest report still outstanding is
    /// awaited before enqueueing more: the queue bounds what is in flight.
    ///
    /// A failure fails the batch with the first error; the records before it are written,
    /// later ones may be. With the idempotent producer (the default configuration) records
    /// with the same key keep their order in their partition. The receipts are in the order
    /// of the events.
    ///
    /// # Errors
    /// As [`publish`](Self::publish), for the first event that failed.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_kafka::{KafkaConfig, KafkaProducer};
    /// let producer = KafkaProducer::new_with_config(&KafkaConfig::new("127.0.0.1:9092", "g1"))?;
    /// let events = (0..100).map(|i| polybus_core::Event::new(format!("{i}"))).collect();
    /// let receipts = producer.publish_batch("orders", events).await?;
    /// assert_eq!(receipts.len(), 100);
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch(&self, topic: &str, events: Vec<Event>) -> Result<Vec<Receipt>> {
        if self.inner.closed.load(AtomicOrdering::Acquire) {
            return Err(closed("the producer"));
        }
        validate_topic(topic)?;
        let telemetry = &self.inner.telemetry;
        let mut encoded = Vec::with_capacity(events.len());
        for mut event in events {
            let scope = telemetry.publish(topic, &mut event);
            match self.encode(&mut event) {
                Ok(record) => encoded.push((scope, record, convert::millis(event.time()))),
                Err(e) => {
                    let failed = Err(e);
                    scope.finish(&failed);
                    return failed.map(|_: Receipt| Vec::new());
                }
            }
        }
        self.inner.topics.ensure(topic).await?;
        let shared: Arc<str> = Arc::from(topic);
        let mut receipts = Vec::with_capacity(encoded.len());
        // Reports not awaited yet, in the order of the events (`receipts` holds the others).
        let mut pending = std::collections::VecDeque::with_capacity(encoded.len());
        for (scope, record, timestamp) in encoded {
            let Encoded {
                key,
                value,
                headers,
                ..
            } = record;
            let mut record = future_record(topic, key.as_deref(), &value, headers, timestamp);
            loop {
                match self.inner.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back((scope, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        // The queue is full: wait for the oldest report (it frees a place),
                        // or, with none outstanding (other publishes filled the queue), a
                        // moment, as librdkafka's own `send` does.
                        match pending.pop_front() {
                            Some((scope, delivery)) => {
                                receipts.push(report(&shared, scope, delivery).await?);
                            }
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((e, _)) => {
                        let failed = Err(from_kafka(e, format!("publishing to {topic:?}")));
                        scope.finish(&failed);
                        return failed.map(|_: Receipt| Vec::new());
                    }
                }
            }
        }
        for (scope, delivery) in pending {
            receipts.push(report(&shared, scope, delivery).await?);
        }
        Ok(receipts)
    }

    /// Waits until every queued record has been delivered (or failed).
    ///
    /// # Errors
    /// `Timeout` if records are still queued after `message.timeout.ms`-like limits (60 s here).
    pub async fn flush(&self) -> Result<()> {
        let producer = self.inner.producer.clone();
        blocking(move || {
            producer
                .flush(Timeout::After(Duration::from_secs(60)))
                .map_err(|e| from_kafka(e, "flushing the producer"))
        })
        .await
    }

    /// Flushes, then refuses later publishes with `Closed`. Closing twice is fine.
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    pub async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, AtomicOrdering::Release);
        self.flush().await
    }
}

/// Waits for one delivery report of a batch and records it in the publish's telemetry.
async fn report(
    topic: &Arc<str>,
    scope: PublishScope<'_>,
    delivery: DeliveryFuture,
) -> Result<Receipt> {
    let receipt = match delivery.await {
        Ok(Ok(d)) => Ok(receipt(topic.clone(), d.partition, d.offset)),
        Ok(Err((e, _))) => Err(from_kafka(e, format!("publishing to {topic:?}"))),
        Err(_) => Err(closed("the producer (delivery report lost)")),
    };
    scope.finish(&receipt);
    receipt
}

/// A receipt for the record written at `partition` / `offset` of `topic`.
fn receipt(topic: Arc<str>, partition: i32, offset: i64) -> Receipt {
    let r = Receipt::new(topic).with_partition(partition);
    match u64::try_from(offset) {
        Ok(off) => r.with_sequence(off),
        Err(_) => r,
    }
}

/// Where a [`PublishFuture`] is.
enum Step<'a> {
    /// Not polled yet.
    Start(Event),
    /// In librdkafka's queue: waiting for the delivery report.
    Sent {
        delivery: DeliveryFuture,
        topic: Arc<str>,
    },
    /// The first publish to a topic, or a full local queue.
    Slow(BoxFuture<'a, Result<Receipt>>),
    Done,
}

/// One `KafkaProducer::publish` (see there). Every field is `Unpin`.
struct PublishFuture<'a, 't> {
    producer: &'a KafkaProducer,
    topic: &'t str,
    scope: Option<PublishScope<'a>>,
    step: Step<'t>,
}

impl<'t> PublishFuture<'_, 't> {
    /// Hands the record to librdkafka (inside the publish span): then its delivery report is
    /// awaited, or, with the local queue full, the slow path waits for room.
    fn enqueue(&mut self, record: Encoded, timestamp: Option<i64>, topic: Arc<str>) -> Result<()> {
        let Encoded {
            key,
            value,
            headers,
            size,
        } = record;
        let sent = {
            let span = self.scope.as_ref().map(PublishScope::span);
            let _entered = span.filter(|s| !s.is_disabled()).map(|s| s.enter());
            let record = future_record(self.topic, key.as_deref(), &value, headers, timestamp);
            // Only the headers come back with a refused record (the key and value are
            // borrowed).
            self.producer
                .inner
                .producer
                .send_result(record)
                .map_err(|(e, back)| (e, back.headers))
        };
        self.step = match sent {
            Ok(delivery) => Step::Sent { delivery, topic },
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), headers)) => {
                let record = Encoded {
                    key,
                    value,
                    headers,
                    size,
                };
                self.slow(record, timestamp, Some(topic))
            }
            Err((e, _)) => return Err(from_kafka(e, format!("publishing to {:?}", self.topic))),
        };
        Ok(())
    }

    /// The slow path, boxed with its own handle on the producer (it borrows the topic only).
    fn slow(&self, record: Encoded, timestamp: Option<i64>, known: Option<Arc<str>>) -> Step<'t> {
        let (producer, topic) = (self.producer.clone(), self.topic);
        Step::Slow(Box::pin(async move {
            producer.publish_slow(topic, record, timestamp, known).await
        }))
    }

    fn finish(&mut self, result: Result<Receipt>) -> Poll<Result<Receipt>> {
        if let Some(scope) = self.scope.take() {
            scope.finish(&result);
        }
        Poll::Ready(result)
    }
}

impl Future for PublishFuture<'_, '_> {
    type Output = Result<Receipt>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Receipt>> {
        let this = self.get_mut();
        loop {
            // The states polled more than once are polled in place (the enum is not moved).
            match &mut this.step {
                Step::Sent { delivery, topic } => {
                    let result = match std::task::ready!(Pin::new(delivery).poll(cx)) {
                        Ok(Ok(d)) => Ok(receipt(topic.clone(), d.partition, d.offset)),
                        Ok(Err((e, _))) => {
                            Err(from_kafka(e, format!("publishing to {:?}", this.topic)))
                        }
                        Err(_) => Err(closed("the producer (delivery report lost)")),
                    };
                    this.step = Step::Done;
                    return this.finish(result);
                }
                Step::Slow(slow) => {
                    let polled = {
                        let span = this.scope.as_ref().map(PublishScope::span);
                        let _entered = span.filter(|s| !s.is_disabled()).map(|s| s.enter());
                        slow.as_mut().poll(cx)
                    };
                    let result = std::task::ready!(polled);
                    this.step = Step::Done;
                    return this.finish(result);
                }
                _ => {}
            }
            match std::mem::replace(&mut this.step, Step::Done) {
                Step::Start(mut event) => {
                    let producer = this.producer;
                    let scope = producer.inner.telemetry.publish(this.topic, &mut event);
                    this.scope = Some(scope);
                    match producer.prepare(this.topic, &mut event) {
                        Ok((record, timestamp, Some(topic))) => {
                            drop(event);
                            if let Err(e) = this.enqueue(record, timestamp, topic) {
                                return this.finish(Err(e));
                            }
                        }
                        Ok((record, timestamp, None)) => {
                            this.step = this.slow(record, timestamp, None);
                        }
                        Err(e) => return this.finish(Err(e)),
                    }
                }
                Step::Sent { .. } | Step::Slow(_) | Step::Done => {
                    return Poll::Ready(Err(Error::closed(BACKEND)
                        .with_message("publish future polled after it completed")));
                }
            }
        }
    }
}

impl Publisher for KafkaProducer {
    /// See [`KafkaProducer::publish`]: the same small future, not wrapped in another.
    #[inline]
    fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send {
        KafkaProducer::publish(self, topic, event)
    }
    /// See [`KafkaProducer::publish_batch`]: all records enqueued, then the delivery reports
    /// awaited in order.
    async fn publish_batch(&self, topic: &str, events: Vec<Event>) -> Result<Vec<Receipt>> {
        KafkaProducer::publish_batch(self, topic, events).await
    }
    async fn flush(&self) -> Result<()> {
        KafkaProducer::flush(self).await
    }
    async fn close(&self) -> Result<()> {
        KafkaProducer::close(self).await
    }
}

/// The librdkafka record for `topic`: the headers moved in, key and value borrowed. An empty
/// value is a record without value (a tombstone: binary mode without data, as the binding
/// says; structured mode always has a value).
#[inline]
fn future_record<'a>(
    topic: &'a str,
    key: Option<&'a [u8]>,
    value: &'a [u8],
    headers: Option<rdkafka::message::OwnedHeaders>,
    timestamp: Option<i64>,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic);
    if let Some(headers) = headers {
        record = record.headers(headers);
    }
    if !value.is_empty() {
        record = record.payload(value);
    }
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(ms) = timestamp {
        record = record.timestamp(ms);
    }
    record
}
