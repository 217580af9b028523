//! The Kafka adapter of [polybus](https://crates.io/crates/polybus), over
//! [rdkafka](https://docs.rs/rdkafka) (librdkafka).
//!
//! * [`KafkaProducer`]: idempotent by default; the event key is the record key (order per
//!   key); CloudEvents Kafka binding in headers (`ce_id`, `ce_source`, `ce_type`, `ce_time`,
//!   `ce_specversion`, `ce_partitionkey`, `ce_<extension>`, `content-type`), structured mode
//!   on request; a [`Receipt`](polybus_core::Receipt) with partition and offset; a bounded
//!   queue that waits when full; `message.max.bytes` enforced before sending.
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
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod admin;
mod config;
mod consumer;
mod convert;
mod error;
mod publisher;
mod transaction;

pub use admin::{KafkaAdmin, MAX_TOPIC_LEN, validate_topic};
pub use config::{KafkaConfig, SaslMechanism};
pub use consumer::{KafkaConsumer, KafkaStream, PartitionLag};
pub use publisher::{CAPABILITIES, KafkaProducer};
pub use transaction::{KafkaTransactionalProducer, next_offsets};

/// The rdkafka crate, for what polybus does not wrap.
pub use rdkafka;
