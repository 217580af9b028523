//! The composed bus of [polybus](https://crates.io/crates/polybus): NATS/JetStream for fast
//! acknowledgement and real-time notification, Kafka as the durable, replayable source of
//! truth, and a crash-safe local spool between them.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> polybus_core::Result<()> {
//! let bus = polybus_compose::Bus::builder()
//!     .nats("nats://127.0.0.1:4222")
//!     .kafka("localhost:9092")
//!     .spool_dir("./spool")
//!     .build()
//!     .await?;
//! let receipt = bus.publish("orders.created", bytes::Bytes::from_static(b"{...}")).await?;
//! println!("durable after {:?}; Kafka topic {}", receipt.latency(), receipt.kafka_topic());
//! bus.close().await?; // drains in-flight forwards into Kafka or the spool
//! # Ok(()) }
//! ```
//!
//! # Write path
//!
//! [`Bus::publish`] publishes the event to JetStream (which dedups by `Nats-Msg-Id` = event
//! id) and, concurrently, commits it to the spool (a [redb](https://docs.rs/redb) database,
//! fsynced, group commit), and returns when both are done: **an acknowledged event is
//! durable**, in JetStream and in the spool. Forwarder tasks (one per bucket of ordering keys) write spooled events to the
//! mapped Kafka topic (idempotent producer) and delete them from the spool once Kafka
//! acknowledges, so at any time every acknowledged event is in Kafka or in the spool.
//!
//! * **NATS fails**: the publish fails with a typed error and is not acknowledged (NATS down:
//!   `Timeout` after the JetStream publish timeout, 10 s by default; no stream covers the
//!   subject: `NotFound`; the stream refuses: `Rejected`), but the spool write is not undone:
//!   the event still reaches Kafka, and publishing it again adds no copy (see
//!   [`Bus::publish`]). Once the client has reconnected, publishes acknowledge again, with
//!   nothing to restart.
//! * **Order**: events with the same key share a bucket and are forwarded in spool order.
//! * **Restart**: the spool is replayed first: forwarders start at its oldest entries.
//! * **Bounded**: the spool holds at most [`SpoolConfig::capacity`] events; when full a
//!   publish waits ([`WhenFull::Block`], the default) or fails with `ErrorKind::Rejected`
//!   ([`WhenFull::Reject`]). Nothing is ever dropped silently. Every channel is bounded.
//! * **Retries**: failed forwards are retried with exponential backoff and jitter
//!   ([`RetryPolicy`]). Failures that are the event's fault count; after `max_attempts` the
//!   event goes to the dead-letter topic ([`DeadLetterTopic`], default `<topic>.dlq`) with its
//!   key and the headers [`X_ORIGINAL_TOPIC`], [`X_ORIGINAL_SUBJECT`],
//!   [`X_EXCEPTION_MESSAGE`], [`X_EXCEPTION_KIND`] and [`X_ATTEMPTS`]. An unavailable Kafka
//!   (connection, timeout) does not count: the spool absorbs the outage. [`Bus::redrive`]
//!   moves dead letters back.
//! * **Idempotency**: JetStream dedups by `Nats-Msg-Id`, Kafka's idempotent producer dedups
//!   its own retries, and the spool remembers the `source`+`id` of forwarded events (24 h by
//!   default), so an event published again, also after a restart, is not written to Kafka
//!   twice. A crash can still repeat a forward (the deletion of a forwarded event becomes
//!   durable up to 200 ms later); consumers remove such copies.
//! * **Switches** ([`Switches`], watched through a [`SwitchHandle`], fed by a
//!   [`SwitchSource`] such as a NATS KV bucket) turn dual-write off, degrade to NATS only or
//!   Kafka only, or pause forwarding, live. NATS-only keeps the Kafka copy in the spool and
//!   forwards it when Kafka comes back.
//! * **Close**: [`Bus::close`] stops accepting, waits for publishes in flight, forwards what
//!   it can within the drain timeout and leaves the rest in the spool.
//!
//! # Read path
//!
//! [`Bus::consume`] reads the Kafka topic in a consumer group (at-least-once: ack after
//! processing) through a dedup layer ([`Dedup`], keyed by `source`+`id` or by a business key
//! and version, [`DedupKey`]) whose store is pluggable ([`DedupStore`]:
//! [`MemoryDedupStore`] with a TTL, or a shared one). A key is recorded when the delivery is
//! acked, after your downstream write, never on receipt. [`Bus::notifications`] is the
//! real-time NATS stream of the same events; [`Bus::replay`] re-reads Kafka from an offset
//! or a time (a compensation), in a fresh group.
//!
//! # Observability
//!
//! Metrics through the [`metrics`](https://docs.rs/metrics) facade, named in [`metrics`]
//! (`polybus_compose_*`: spool depth, retries, dead letters, forward latency, ...), tracing
//! spans per publish (`polybus.compose.publish`) and `tracing::info` for switch changes,
//! dead letters and lifecycle; [`Bus::stats`] for an in-process snapshot.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod builder;
mod bus;
mod codec;
mod consume;
mod dedup;
mod dlq;
mod forwarder;
/// Entry points for the fuzz targets (`fuzz/`); not API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
mod nats_kv;
mod spool;
mod stats;
mod switches;
mod topic_map;

pub use builder::{BusBuilder, DEFAULT_SPOOL_DIR, default_retry};
pub use bus::{Bus, BusReceipt, IntoEvent, RedriveOptions};
pub use consume::{ConsumerFactory, ConsumerSpec, ReplayFrom, Start, Subscription};
pub use dedup::{Dedup, DedupKey, DedupStore, MemoryDedupStore};
pub use dlq::{
    DEAD_LETTER_HEADERS, DeadLetterTopic, X_ATTEMPTS, X_EXCEPTION_KIND, X_EXCEPTION_MESSAGE,
    X_ORIGINAL_OFFSET, X_ORIGINAL_PARTITION, X_ORIGINAL_SUBJECT, X_ORIGINAL_TOPIC,
};
pub use nats_kv::{KvDedupStore, KvSwitchSource, SWITCH_KEYS, write_switches};
/// The retry policy of the forwarders, shared with the runtime (defined in `polybus-core`).
pub use polybus_core::RetryPolicy;
pub use spool::{DEFAULT_SPOOL_CACHE_BYTES, SpoolConfig, WhenFull};
pub use stats::BusStats;
pub use switches::{Channel, SwitchHandle, SwitchSource, Switches};
pub use topic_map::{KAFKA_TOPIC_MAX_LEN, TopicMap, validate_kafka_topic};

/// The backend name in errors raised by the bus itself.
const BACKEND: &str = "compose";
