//! Core NATS backend of [polybus](https://crates.io/crates/polybus): publish/subscribe, queue
//! groups, request-reply and CloudEvents headers over [async-nats].
//!
//! * [`NatsProducer`] implements [`Publisher`](polybus_core::Publisher) (and so the seed's
//!   `send` through `polybus_core::mq::MessageProducer`), plus [`NatsProducer::request`].
//! * [`NatsConsumer`] implements [`Consumer`](polybus_core::Consumer) (one stream per
//!   subscription, queue groups as consumer groups) and the seed's
//!   [`MessageConsumer`](polybus_core::MessageConsumer) (`subscribe`, then `next`), plus
//!   [`NatsConsumer::serve`] to answer requests.
//! * [`NatsOptions`] configures both: credentials (user/password, token, nkey, creds file),
//!   TLS (CA, client certificate, `require_tls`), name, default event source, CloudEvents
//!   [`Mode`](polybus_core::cloudevents::Mode), timeouts.
//!
//! # Semantics (see [`CAPABILITIES`])
//!
//! Core NATS is at-most-once and keeps nothing: a subscriber gets what is published while it
//! is subscribed. `ack`/`term` do nothing, `nack` is `Unsupported`. A slow subscriber whose
//! buffer fills up loses messages: the drops the client reports are logged with
//! `tracing::warn!` and counted ([`NatsConnection::slow_consumer_drops`], a lower bound under
//! bursts), never silent. `close` flushes and drains, so no
//! buffered publish is lost. After a reconnect the client subscribes again and streams go on.
//!
//! # Wire format
//!
//! The CloudEvents NATS binding: binary mode by default (`ce-` headers, percent-encoded
//! values, `Content-Type`), structured mode on request; see [`encode_event`] and
//! [`decode_event`]. A message without CloudEvents headers (from a plain NATS publisher)
//! becomes an event with a fresh UUIDv7 id for each subscriber that receives it: core NATS
//! keeps nothing and gives a message no identity to derive a stable id from (and never
//! redelivers it). Subjects are checked before anything is sent
//! ([`validate_publish_subject`], [`validate_subscribe_subject`]), and so is the size of each
//! message against the server's `max_payload`.
//!
//! # Errors
//!
//! `InvalidTopic` (bad subject), `PayloadTooLarge`, `InvalidHeader`, `Closed` (after close),
//! `Connect`, `Unauthorized` (credentials refused), `Timeout` (request without reply in time,
//! connect timeout), `NotFound` (request with no responders), `Codec` (undecodable message).
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use polybus_core::{Consumer, Event, Publisher};
//! use polybus_nats::{NatsConsumer, NatsProducer};
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let url = "nats://127.0.0.1:4222";
//! let consumer = NatsConsumer::connect(url).await?.queue_group("billing");
//! let mut orders = std::pin::pin!(consumer.subscribe("orders.*"));
//!
//! let producer = NatsProducer::builder(url).source("urn:shop").producer().await?;
//! producer
//!     .publish("orders.created", Event::builder().kind("order.created").data("{}").build()?)
//!     .await?;
//!
//! let delivery = orders.next().await.expect("subscription open")?;
//! assert_eq!(delivery.event().kind(), "order.created");
//! delivery.ack().await?; // a no-op on core NATS
//! producer.close().await?;
//! # Ok(()) }
//! ```
//!
//! [async-nats]: https://docs.rs/async-nats
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod config;
mod consumer;
mod convert;
mod error;
mod permissions;
mod publisher;
mod subject;

pub use config::{NatsConnection, NatsOptions};
pub use consumer::{CAPABILITIES, NatsConsumer, NatsRequest, NatsRequests, NatsSubscription};
pub use convert::{
    CE_PREFIX, CONTENT_TYPE, Encoder, decode_event, decode_event_with, encode_event, encode_lean,
    percent_decode, percent_encode,
};
pub use publisher::{NatsProducer, check_size};
pub use subject::{
    MAX_SUBJECT_LEN, SubjectCache, validate_publish_subject, validate_subscribe_subject,
};

/// The async-nats client crate, re-exported for [`NatsConnection::client`] users.
pub use async_nats;
