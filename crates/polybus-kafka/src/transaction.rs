//! Kafka transactions and the consume-transform-produce helper.

use std::collections::HashMap;
use std::time::Duration;

use polybus_core::{Delivery, Error, ErrorKind, Event, Receipt, Result};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::admin::{blocking, validate_topic};
use crate::error::{BACKEND, from_kafka};
use crate::{KafkaConfig, KafkaConsumer, KafkaProducer};

/// A transactional producer: `init_transactions`, then per transaction `begin`, publishes,
/// optionally `send_offsets_to_transaction`, and `commit` or `abort` (seed 7.5).
///
/// The blocking librdkafka calls run on the blocking thread pool, never on the async runtime.
/// [`transact`](Self::transact) does a whole consume-transform-produce step: the outputs and
/// the consumed offsets commit atomically, so a `read_committed` reader sees the outputs
/// exactly once per input.
///
/// Verification: the API flow is tested against librdkafka's `MockCluster` (which answers
/// the transaction requests but writes no transaction markers, so it cannot show isolation);
/// the exactly-once behaviour is tested only against Apache Kafka (the
/// `transaction_exactly_once_read_committed` test, run when `POLYBUS_KAFKA_TXN_BROKERS` is
/// set). tansu has no transaction support.
///
/// ```no_run
/// use polybus_core::Event;
/// use polybus_core::mq::MessageConsumer;
/// use polybus_kafka::{KafkaConfig, KafkaConsumer, KafkaTransactionalProducer};
/// # #[allow(dead_code)] async fn demo() -> anyhow::Result<()> {
/// let cfg = KafkaConfig::new("127.0.0.1:9092", "enricher")
///     .with_transactional_id("enricher-1")
///     .with_auto_commit(false);
/// let producer = KafkaTransactionalProducer::new_with_config(&cfg)?;
/// producer.init_transactions().await?;
/// let mut consumer = KafkaConsumer::new_with_config(&cfg, &["orders"])?;
/// let input = consumer.next().await?;
/// let output = Event::new(input.payload().to_ascii_uppercase());
/// producer
///     .transact(&consumer, vec![input], vec![("orders.enriched".to_owned(), output)])
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct KafkaTransactionalProducer {
    producer: KafkaProducer,
    timeout: Duration,
}

impl KafkaTransactionalProducer {
    /// A transactional producer; `cfg` must have a
    /// [`transactional_id`](KafkaConfig::with_transactional_id).
    ///
    /// # Errors
    /// `Other` without a transactional id or with a configuration librdkafka refuses.
    pub fn new_with_config(cfg: &KafkaConfig) -> Result<Self> {
        if cfg.transactional_id().is_none() {
            return Err(Error::new(ErrorKind::Other, BACKEND).with_message(
                "a transactional producer needs KafkaConfig::with_transactional_id",
            ));
        }
        Ok(KafkaTransactionalProducer {
            producer: KafkaProducer::new_with_config(cfg)?,
            timeout: cfg.connect_timeout().max(Duration::from_secs(10)),
        })
    }

    /// Sets how long the blocking transaction calls may take (at least the connect timeout,
    /// 10 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        // rdkafka passes it as i32 milliseconds (`as i32`): saturate rather than wrap.
        self.timeout = timeout.min(Duration::from_millis(2_147_483_647));
        self
    }

    /// The producer, for publishing inside a transaction with its usual API.
    pub fn producer(&self) -> &KafkaProducer {
        &self.producer
    }

    fn native(&self) -> FutureProducer {
        self.producer.client().clone()
    }

    /// Registers the transactional id with the coordinator and fences older instances. Call
    /// once before the first transaction.
    ///
    /// # Errors
    /// `Timeout`/`Connect` if the coordinator does not answer; `Unsupported` if the broker
    /// has no transactions; `Unauthorized` without permission.
    pub async fn init_transactions(&self) -> Result<()> {
        let (p, t) = (self.native(), self.timeout);
        blocking(move || {
            p.init_transactions(t)
                .map_err(|e| txn_error(e, "init_transactions"))
        })
        .await
    }

    /// Starts a transaction.
    ///
    /// # Errors
    /// `Rejected` when a transaction is already open or `init_transactions` was not called.
    pub fn begin(&self) -> Result<()> {
        self.native()
            .begin_transaction()
            .map_err(|e| txn_error(e, "begin_transaction"))
    }

    /// Publishes `event` to `topic` inside the open transaction.
    ///
    /// # Errors
    /// As [`KafkaProducer::publish`].
    pub async fn publish(&self, topic: &str, event: Event) -> Result<Receipt> {
        self.producer.publish(topic, event).await
    }

    /// Adds consumed `offsets` (the next offsets to read) of the group `group` to the
    /// transaction, so they commit with it.
    ///
    /// # Errors
    /// Broker errors; the transaction then needs an abort.
    pub async fn send_offsets_to_transaction(
        &self,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<()> {
        let (p, t) = (self.native(), self.timeout);
        blocking(move || {
            p.send_offsets_to_transaction(&offsets, &group, t)
                .map_err(|e| txn_error(e, "send_offsets_to_transaction"))
        })
        .await
    }

    /// Commits the open transaction (flushing its records first).
    ///
    /// # Errors
    /// Broker errors; after a failure that requires it, call [`abort`](Self::abort).
    pub async fn commit(&self) -> Result<()> {
        let (p, t) = (self.native(), self.timeout);
        blocking(move || {
            p.commit_transaction(t)
                .map_err(|e| txn_error(e, "commit_transaction"))
        })
        .await
    }

    /// Aborts the open transaction: its records are never visible to `read_committed`
    /// readers.
    ///
    /// # Errors
    /// Broker errors.
    pub async fn abort(&self) -> Result<()> {
        let (p, t) = (self.native(), self.timeout);
        blocking(move || {
            p.abort_transaction(t)
                .map_err(|e| txn_error(e, "abort_transaction"))
        })
        .await
    }

    /// One consume-transform-produce step: begins a transaction, publishes `output`, adds the
    /// offsets after each of `input` for `consumer`'s group, and commits. On success the
    /// inputs are acknowledged; on failure the transaction is aborted, the inputs are nacked
    /// (redelivered) and the error is returned.
    ///
    /// # Errors
    /// `NotFound` if `consumer` has no group member yet (call `next` first); otherwise the
    /// first failing step's error.
    pub async fn transact(
        &self,
        consumer: &KafkaConsumer,
        input: Vec<Delivery>,
        output: Vec<(String, Event)>,
    ) -> Result<()> {
        let Some(group) = consumer.group_metadata() else {
            return Err(Error::new(ErrorKind::NotFound, BACKEND)
                .with_message("the consumer has no group member yet: call next() first"));
        };
        let offsets = next_offsets(&input)?;
        self.begin()?;
        let result = async {
            for (topic, event) in output {
                validate_topic(&topic)?;
                self.publish(&topic, event).await?;
            }
            if offsets.count() > 0 {
                self.send_offsets_to_transaction(offsets, group).await?;
            }
            self.commit().await
        }
        .await;
        match result {
            Ok(()) => {
                for d in input {
                    d.ack().await.map_err(Error::from)?;
                }
                Ok(())
            }
            Err(e) => {
                if let Err(abort) = self.abort().await {
                    tracing::warn!(target: "polybus_kafka", "abort after a failed transaction: {abort}");
                }
                for d in input {
                    let _ = d.nack(Duration::ZERO).await;
                }
                Err(e)
            }
        }
    }
}

/// The offsets to commit after processing `deliveries`: per partition, one past the highest
/// offset.
///
/// # Errors
/// `Other` if a delivery has no partition or offset (it did not come from Kafka).
pub fn next_offsets(deliveries: &[Delivery]) -> Result<TopicPartitionList> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for d in deliveries {
        let (Some(p), Some(o)) = (d.partition(), d.sequence()) else {
            return Err(Error::new(ErrorKind::Other, BACKEND)
                .with_message("a delivery without partition/offset is not from Kafka"));
        };
        let o = i64::try_from(o).unwrap_or(i64::MAX - 1) + 1;
        let e = next.entry((d.topic(), p)).or_insert(o);
        *e = (*e).max(o);
    }
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for ((t, p), o) in next {
        tpl.add_partition_offset(t, p, Offset::Offset(o))
            .map_err(|e| from_kafka(e, "building the offset list"))?;
    }
    Ok(tpl)
}

fn txn_error(e: KafkaError, what: &str) -> Error {
    let hint = match &e {
        KafkaError::Transaction(t) if t.is_fatal() => " (fatal: create a new producer)",
        KafkaError::Transaction(t) if t.txn_requires_abort() => " (abort the transaction)",
        KafkaError::Transaction(t) if t.is_retriable() => " (retriable)",
        _ => "",
    };
    from_kafka(e, format!("{what}{hint}"))
}
