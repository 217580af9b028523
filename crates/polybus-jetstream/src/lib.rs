//! NATS JetStream backend of [polybus](https://crates.io/crates/polybus): streams, pull
//! consumers with explicit acks, `Nats-Msg-Id` deduplication, KV and object store, over
//! [async-nats].
//!
//! * [`JsProducer`] implements [`Publisher`](polybus_core::Publisher): each publish waits for
//!   the stream's acknowledgement; the receipt carries the stream sequence and says whether
//!   the server recognised a duplicate (`Nats-Msg-Id` = event id). The seed's
//!   `JsProducer::connect(url, stream, subject)` and one-argument `send(payload)` are here.
//! * [`JsConsumer`] implements [`Consumer`](polybus_core::Consumer) (groups are durable pull
//!   consumers named after the group; without a group, an ephemeral consumer per
//!   subscription) and the seed's [`MessageConsumer`](polybus_core::MessageConsumer)
//!   (`JsConsumer::connect(url, stream, consumer)`, then `next`).
//! * [`JetStream`] manages streams and durable consumers (create-or-bind with
//!   [`StreamSettings`] and [`ConsumerSettings`]: subjects, retention, storage, duplicate
//!   window, `max_deliver`, `ack_wait`, backoff, `max_ack_pending`) and opens [`KvBucket`]s
//!   (get/put/create/update with revision/delete/watch) and [`ObjectBucket`]s.
//!
//! # Topics and streams
//!
//! Topics are subjects, and a stream must cover them. With [`StreamPolicy::Existing`] (the
//! default) streams are managed elsewhere and an uncovered topic fails with `NotFound`; with
//! [`StreamPolicy::PerTopic`] the first publish or subscribe to an uncovered topic creates a
//! stream for it (see [`per_topic_stream_name`]), which is how the conformance suite uses
//! fresh topics.
//!
//! # Clusters
//!
//! Give the URLs of all servers, comma-separated (`nats://a:4222,nats://b:4222,nats://c:4222`):
//! the connection moves to another server when its own dies. A stream created with
//! [`StreamSettings::replicas`] `3` keeps every acknowledged message through the loss of one
//! server. While a stream has no leader (nats-server takes some 4-8 s to elect one after the
//! leader died) the server answers a publish with "no responders", as it does for a subject no
//! stream covers: the producer sends it again, 100 ms apart, until the publish timeout, and then
//! fails with `Timeout` (a subject no stream covers is still `NotFound` at once). A publish in
//! flight when the connection's server dies waits out the publish timeout. A durable consumer
//! continues on its new leader; acks sent to the dead one are lost, so those deliveries come
//! again. A subscription whose pull request died with its server pulls again 2 s after the
//! request's expiry. `tests/it/cluster.rs` measures all of this on a real three-node cluster
//! (figures in docs/BROKER-NOTES.md).
//!
//! # Semantics (see [`CAPABILITIES`])
//!
//! At-least-once with explicit settlement: `ack` (optionally confirmed by the server),
//! `nack(delay)` (`-NAK` with delay), `term`, `in_progress` (`+WPI`); the redelivery count comes
//! from the message metadata. The server holds back deliveries beyond `max_ack_pending`
//! unsettled ones. A delivery dropped unsettled is nak'ed so it returns at once. Messages are
//! persistent with file storage, deduplicated on publish within the duplicate window, ordered
//! per stream for a single subscriber.
//!
//! A stored message without CloudEvents headers (from a plain NATS publisher) is delivered
//! with an id that every redelivery shares: its `Nats-Msg-Id` when the publisher set one,
//! otherwise `jetstream:<stream>:<stream sequence>`; its source is `jetstream:<stream>` and its
//! time is when the stream stored it.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use polybus_core::{Consumer, Event, Publisher};
//! use polybus_jetstream::{JsOptions, StreamPolicy};
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let js = JsOptions::new("nats://127.0.0.1:4222")
//!     .stream_policy(StreamPolicy::PerTopic { prefix: "EV_".into() })
//!     .connect()
//!     .await?;
//! let consumer = js.consumer(Some("billing"));
//! let mut orders = std::pin::pin!(consumer.subscribe("orders.created"));
//!
//! let producer = js.producer();
//! let event = Event::builder().kind("order.created").data("{}").build()?;
//! let receipt = producer.publish("orders.created", event.clone()).await?;
//! assert!(!receipt.is_duplicate());
//! assert!(producer.publish("orders.created", event).await?.is_duplicate());
//!
//! let delivery = orders.next().await.expect("subscription open")?;
//! assert_eq!(delivery.sequence(), receipt.sequence());
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! [async-nats]: https://docs.rs/async-nats
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod client;
mod config;
mod consumer;
mod error;
mod kv;
mod object;
mod publisher;

pub use client::{JetStream, per_topic_stream_name};
pub use config::{ConsumerSettings, JsOptions, StreamPolicy, StreamSettings};
pub use consumer::{CAPABILITIES, JsConsumer, JsSubscription};
pub use kv::{KvBucket, KvEntry, KvOperation, KvWatch};
pub use object::ObjectBucket;
pub use publisher::{JsProducer, MSG_ID_HEADER};

/// Stream and consumer policies used by [`StreamSettings`] and [`ConsumerSettings`].
pub use async_nats::jetstream::consumer::DeliverPolicy;
pub use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
