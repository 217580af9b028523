//! The Kafka adapter of [polybus](https://crates.io/crates/polybus), over
//! [rdkafka](https://docs.rs/rdkafka) (librdkafka).
//!
//! * [`KafkaProducer`]: idempotent by default; the event key is the record key (order per
//!   key); CloudEvents Kafka binding in headers (`ce_id`, `ce_source`, `ce_type`, `ce_time`,
//!   `ce_specversion`, `ce_partitionkey`, `ce_<extension>`, `content-type`), structured mode
//!   on request, or the lean wire format ([`KafkaConfig::with_wire_format`]: value, key and
//!   the caller's headers only); `traceparent` only when there is a trace to continue
//!   ([`KafkaConfig::with_trace_policy`]); a [`Receipt`](polybus_core::Receipt) with
//!   partition and offset; a bounded queue that waits when full; `message.max.bytes` enforced
//!   before sending.
//! * [`KafkaConsumer`]: consumer groups with at-least-once delivery (only acknowledged
//!   offsets are committed, never past an unsettled record), local nack redelivery with a
//!   delay, rebalance handling, per-partition lag.
//! * [`KafkaTransactionalProducer`]: transactions and consume-transform-produce.
//! * [`KafkaAdmin`] and [`validate_topic`]: topic administration and name checks. Missing
//!   topics are created on first use (tansu does not auto-create them).
//!
//! ```no_run
//! use polybus_core::mq::{MessageConsumer, MessageProducer};
//! use polybus_kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let cfg = KafkaConfig::new("localhost:9092", "g1")
//!     .with_idempotent_producer(true)
//!     .with_auto_offset_reset("earliest");
//! let producer = KafkaProducer::new_with_config(&cfg)?;
//! let mut consumer = KafkaConsumer::new_with_config(&cfg, &["t"])?;
//! producer.send("t", b"hello").await?;
//! let msg = consumer.next().await?;
//! assert_eq!(msg.payload(), b"hello");
//! msg.ack().await?;
//! # Ok(()) }
//! ```
//!
//! # Delivery semantics
//!
//! | | |
//! |---|---|
//! | publish | idempotent producer (no duplicates or reordering from retries), acknowledged by the partition leader; a full local queue makes `publish` wait, never drop |
//! | duplicate publish | not deduplicated: the idempotent producer only keeps its *own* retries from duplicating, so the same event (same id) published twice is stored and delivered twice; `exactly_once_publish` is `false`. Deduplicate on the consumer side (`source` + `id`) |
//! | consume | at-least-once: an offset is committed only once every earlier delivered record of its partition was acked (or termed) |
//! | in flight | at most [`KafkaConfig::with_max_in_flight`] deliveries (1000 by default) of one subscription are unsettled, nacked ones waiting for redelivery included; at the limit `next` waits instead of reading more |
//! | nack | local redelivery after the delay, with `delivery_count` + 1; the offset stays uncommitted meanwhile, so a crash or rebalance also redelivers it |
//! | term | Kafka cannot delete a record: commits past it like `ack` |
//! | dropped unsettled delivery | handed back to the subscription and redelivered (best effort); the capabilities say [`Unsettled::RedeliveredFromPosition`](polybus_core::Unsettled::RedeliveredFromPosition): once the subscription is gone, a record acked *after* an unsettled one on the same partition is redelivered too (Kafka commits one offset per partition) |
//! | order | per partition, so per key; a nacked record comes back after later ones |
//! | groups | durable consumer groups; a new group starts at `auto.offset.reset` (`earliest` by default here), or at a point in time with [`KafkaConfig::with_start_time`] (ListOffsets by timestamp, for partitions without a committed offset) |
//! | records of plain producers | a record without CloudEvents headers gets the id `kafka:<topic>:<partition>:<offset>` and the source `kafka:<topic>`, so every copy of it has the same id (see docs/WIRE-FORMAT.md) |
//! | rebalance | acked offsets are committed on revoke; settling a revoked partition's delivery is a no-op; the new owner resumes from the committed offset |
//!
//! # Capabilities
//!
//! [`KafkaConfig::capabilities`] derives what a configuration guarantees (the consumer's and
//! producer's `capabilities()` return it): the backlog follows `auto.offset.reset`
//! (`earliest` delivers it, `latest` and `error` do not), per-key order needs the idempotent
//! producer (or no pipelined retries), durable groups need the consumer to commit
//! (`with_auto_commit`), `max_payload` is `message.max.bytes`. `exactly_once_publish` is always
//! `false`, see above. [`CAPABILITIES`] is the answer for the default configuration.
//!
//! # Topics
//!
//! tansu does not create topics on first use, so producers and consumers create a missing
//! topic (3 partitions, replication 1 by default; [`KafkaConfig::with_create_topics`] turns it
//! off). Topic names are checked first: `[a-zA-Z0-9._-]`, at most 249 characters, not `.` or
//! `..` ([`ErrorKind::InvalidTopic`](polybus_core::ErrorKind::InvalidTopic)). The topic check
//! doubles as the connection check: no broker within the connect timeout gives
//! [`ErrorKind::Connect`](polybus_core::ErrorKind::Connect), refused SASL credentials
//! [`ErrorKind::Unauthorized`](polybus_core::ErrorKind::Unauthorized).
//!
//! # Transactions
//!
//! tansu has no transaction support. The transaction code path is tested against
//! librdkafka's `MockCluster` (`rdkafka::mocking`), which answers the transaction API but
//! writes no transaction markers and does not apply transactional offset commits, so it
//! proves the API flow only. Exactly-once semantics (read_committed isolation, offsets
//! committed with the outputs) are verified only against Apache Kafka, by the
//! `transaction_exactly_once_read_committed` test, which runs when `POLYBUS_KAFKA_TXN_BROKERS`
//! is set (the GitHub workflow's apache/kafka service) and is `#[ignore]`d otherwise.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod admin;
mod config;
mod consumer;
mod convert;
mod error;
/// Entry points for the fuzz targets (`fuzz/`); not API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod publisher;
mod transaction;

pub use admin::{KafkaAdmin, MAX_TOPIC_LEN, validate_topic};
pub use config::{DEFAULT_MAX_IN_FLIGHT, KafkaConfig, KeyFn, KeyMapper, SaslMechanism};
pub use consumer::{KafkaConsumer, KafkaStream, PartitionLag};
pub use publisher::{CAPABILITIES, KafkaProducer};
pub use transaction::{KafkaTransactionalProducer, next_offsets};

/// The rdkafka crate, for what polybus does not wrap.
pub use rdkafka;
