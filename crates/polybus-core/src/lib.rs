//! The core of [polybus](https://crates.io/crates/polybus): one event model and one pair of
//! async traits over NATS, JetStream, Kafka and MQTT.
//!
//! * [`Event`]: a CloudEvents-shaped event (`id`, `source`, `time`, `key`, `kind`, `data`,
//!   `headers`, `content_type`); [`Headers`] an ordered case-insensitive multimap.
//! * [`Publisher`] and [`Consumer`]: the traits every backend implements. Their futures and
//!   streams are `Send`. [`PublisherExt`] adds `send`, `publish_json` and `boxed`.
//! * [`Delivery`]: a received event with `ack`, `nack(delay)` and `term`; a failed settlement
//!   returns an [`AckError`] holding the delivery for a retry.
//! * [`Error`] with an [`ErrorKind`] to match on, the backend name and `is_retryable`.
//! * [`Capabilities`]: what a backend guarantees, declared.
//! * [`BoxPublisher`] / [`BoxConsumer`]: erased types for brokers chosen at run time.
//! * [`MemoryBroker`]: an in-process backend for tests and embedding.
//! * [`cloudevents`]: the CloudEvents mapping the broker bindings share.
//! * [`dlq`]: the dead-letter format (headers, topic naming) the bus and the runtime share;
//!   [`RetryPolicy`]: their retry policy (backoff, jitter, attempts, which failures count).
//! * [`telemetry`]: a `tracing` span per publish and per delivery with the OpenTelemetry
//!   messaging attributes, and W3C `traceparent` carried across brokers; [`metrics`]: counters,
//!   gauges and histograms through the `metrics` facade.
//!
//! This crate depends on no broker client.
//!
//! ```
//! use futures_util::StreamExt;
//! use polybus_core::{Consumer, Event, MemoryBroker, Publisher, PublisherExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
//! let broker = MemoryBroker::new();
//! let consumer = broker.consumer_group("billing");
//! let mut deliveries = std::pin::pin!(consumer.subscribe("orders.created"));
//!
//! let publisher = broker.publisher();
//! publisher.send("orders.created", b"{\"id\":1}").await?;
//! publisher
//!     .publish("orders.created", Event::builder().kind("order.created").key("c-42").build()?)
//!     .await?;
//!
//! let first = deliveries.next().await.expect("stream open")?;
//! assert_eq!(first.payload(), b"{\"id\":1}");
//! first.ack().await?;
//! let second = deliveries.next().await.expect("stream open")?;
//! assert_eq!(second.event().key(), Some(&b"c-42"[..]));
//! second.ack().await?;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod boxed;
mod capabilities;
pub mod cloudevents;
mod delivery;
pub mod dlq;
mod error;
mod event;
mod headers;
mod memory;
pub mod metrics;
mod retry;
pub mod telemetry;
pub mod time;
pub mod topic;
mod traits;

pub use boxed::{BoxConsumer, BoxPublisher};
pub use capabilities::{Backlog, Capabilities, Ordering, Unsettled};
pub use delivery::{AckError, AckFuture, Acker, Delivery, NoopAcker, Receipt};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use event::{DEFAULT_KIND, DEFAULT_SOURCE, Event, EventBuilder, IntoPayload, new_id};
pub use headers::{Headers, MAX_HEADER_NAME_LEN, validate as validate_header};
pub use memory::{
    MemoryBroker, MemoryConfig, MemoryConsumer, MemoryMessageConsumer, MemoryPublisher,
    MemorySubscription,
};
pub use retry::RetryPolicy;
pub use traits::{Consumer, MessageConsumer, Publisher, PublisherExt};

/// The seed's module path: `mq::{MessageProducer, MessageConsumer}`.
///
/// `MessageProducer` is [`PublisherExt`] under the seed's name, so `producer.send("t",
/// b"hello")` works on every publisher once it is imported.
pub mod mq {
    pub use crate::traits::{MessageConsumer, PublisherExt as MessageProducer};
}
