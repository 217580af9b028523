//! `KafkaProducer`: an idempotent producer that publishes events as CloudEvents records.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;

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
    /// # Errors
    /// `Closed` after [`close`](Self::close); `InvalidTopic`; `PayloadTooLarge` when key +
    /// value + headers exceed `message.max.bytes` (checked before sending); `Connect` when no
    /// broker answers while the topic is checked; `Timeout` when the record could not be
    /// delivered within `message.timeout.ms`; `Unauthorized` without permission.
    pub async fn publish(&self, topic: &str, mut event: Event) -> Result<Receipt> {
        let scope = self.inner.telemetry.publish(topic, &mut event);
        scope.run(self.publish_traced(topic, event)).await
    }

    async fn publish_traced(&self, topic: &str, mut event: Event) -> Result<Receipt> {
        if self.inner.closed.load(AtomicOrdering::Acquire) {
            return Err(closed("the producer"));
        }
        validate_topic(topic)?;
        let encoded = self.encode(&mut event)?;
        self.inner.topics.ensure(topic).await?;
        self.send_encoded(topic, encoded, &event).await
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

    pub(crate) async fn send_encoded(
        &self,
        topic: &str,
        encoded: Encoded,
        event: &Event,
    ) -> Result<Receipt> {
        let Encoded {
            key,
            value,
            headers,
            ..
        } = encoded;
        let record = future_record(
            topic,
            key.as_deref(),
            &value,
            headers,
            convert::millis(event.time()),
        );
        // Timeout::Never: when the local queue is full, wait and retry; never drop.
        match self.inner.producer.send(record, Timeout::Never).await {
            Ok(d) => {
                let mut r = Receipt::new(topic).with_partition(d.partition);
                if let Ok(off) = u64::try_from(d.offset) {
                    r = r.with_sequence(off);
                }
                Ok(r)
            }
            Err((e, _)) => Err(from_kafka(e, format!("publishing to {topic:?}"))),
        }
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
        Ok(Ok(d)) => {
            let r = Receipt::new(topic.clone()).with_partition(d.partition);
            Ok(match u64::try_from(d.offset) {
                Ok(off) => r.with_sequence(off),
                Err(_) => r,
            })
        }
        Ok(Err((e, _))) => Err(from_kafka(e, format!("publishing to {topic:?}"))),
        Err(_) => Err(closed("the producer (delivery report lost)")),
    };
    scope.finish(&receipt);
    receipt
}

impl Publisher for KafkaProducer {
    async fn publish(&self, topic: &str, event: Event) -> Result<Receipt> {
        KafkaProducer::publish(self, topic, event).await
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
