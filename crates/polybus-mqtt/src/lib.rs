//! The MQTT backend of [polybus](https://crates.io/crates/polybus): MQTT 5 and 3.1.1 over
//! [rumqttc](https://crates.io/crates/rumqttc), with QoS 0/1/2, persistent sessions, manual
//! acks, last will, retained messages, shared subscriptions and TLS (rustls with *ring*).
//!
//! * [`MqttClient`]: one connection, driven by one background task that owns rumqttc's event
//!   loop. Cheap to clone, `Send + Sync`. It reconnects with exponential backoff and jitter,
//!   subscribes again when the broker did not keep the session, and sends again every publish
//!   the broker had not acknowledged. [`MqttConfig`] configures everything.
//! * [`MqttProducer`]: publishes; each publish resolves when the broker acknowledged it (PUBACK
//!   for QoS 1, PUBCOMP for QoS 2, written for QoS 0). Implements
//!   [`Publisher`](polybus_core::Publisher). It writes `traceparent` only when there is a
//!   trace to continue ([`MqttConfig::trace_policy`]).
//! * [`MqttConsumer`]: the seed's consumer (`subscribe(topic, qos)`, `next()`), and
//!   [`MqttSubscriber`], the generic [`Consumer`](polybus_core::Consumer) (`Some(group)` uses
//!   `$share/<group>/<topic>`).
//!
//! # Semantics
//!
//! * QoS 1/2 messages are acknowledged to the broker only when the application calls
//!   [`Delivery::ack`](polybus_core::Delivery::ack) (`term` does the same). `nack` returns
//!   [`ErrorKind::Unsupported`](polybus_core::ErrorKind::Unsupported): MQTT has no negative
//!   acknowledgement. A message that is not acked is delivered again only after a reconnect,
//!   and only with a persistent session (`clean_start(false)` plus a session expiry).
//! * QoS 2 duplicates the broker resends are recognised by packet id and not delivered twice.
//!   Across a broker crash QoS 2 publishing is at least once: when the broker no longer knows
//!   a released message (a new session, or PUBCOMP "packet identifier not found") it is sent
//!   again, since the broker may have lost it; the event id lets consumers drop a duplicate.
//! * A slow consumer loses nothing: when a subscription's buffer
//!   ([`MqttConfig::buffer`]) is full the connection stops reading from the broker until the
//!   consumer makes room, so QoS 1/2 messages stay unacknowledged at the broker and TCP holds
//!   back the rest (QoS 0 included). Meanwhile the connection's other subscriptions and its
//!   publish acknowledgements wait too: give a slow subscription a connection of its own.
//! * Order is kept per topic from one publisher to one subscriber.
//! * A subscriber gets only messages published after it subscribed (retained messages aside).
//! * Topic names: UTF-8, not empty, at most 65 535 bytes, no wildcard, no NUL; polybus also
//!   refuses whitespace and control characters, as on every backend
//!   ([`ErrorKind::InvalidTopic`](polybus_core::ErrorKind::InvalidTopic)). Filters may use
//!   `+` and `#`.
//! * A payload over the maximum packet size (less 16 KiB for topic and properties) fails with
//!   [`ErrorKind::PayloadTooLarge`](polybus_core::ErrorKind::PayloadTooLarge) before sending.
//!   With MQTT 5 the broker's Maximum Packet Size (CONNACK) counts too when it is smaller,
//!   and the connection's `capabilities().max_payload` says so; MQTT 3.1.1 brokers announce
//!   no limit (see [`MqttConfig::max_packet_size`]).
//!
//! # Wire format
//!
//! The CloudEvents MQTT binding: with MQTT 5 in binary mode the attributes are User
//! Properties named like the attributes (`id`, `source`, `type`, `specversion`, `time`,
//! `partitionkey`, extensions), `datacontenttype` is the Content Type property, other headers
//! are further User Properties and the payload is the event data, untouched. MQTT 3.1.1 has
//! no properties, so events travel as structured JSON CloudEvents. Received messages are
//! decoded by mode; a message from a plain MQTT client becomes an event around its payload
//! with its User Properties as headers, and a fresh id each time it is received: MQTT gives
//! a message no identity (packet ids belong to one session and are reused, and a
//! redelivery after a reconnect is a new PUBLISH), so deduplicating such messages needs a
//! key of the application's own, in a User Property or the payload.
//!
//! # Example
//!
//! ```no_run
//! use polybus_core::mq::{MessageConsumer, MessageProducer};
//! use polybus_mqtt::{MqttConsumer, MqttProducer};
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let (p, mut c) = MqttProducer::connect("127.0.0.1", 1883, "client-1").await?;
//! c.subscribe("t", 1).await?; // QoS 1
//! p.publish("t", b"hello", 1).await?;
//! let msg = c.next().await?;
//! assert_eq!(msg.payload(), b"hello");
//! msg.ack().await?;
//!
//! // The generic traits work too.
//! p.send("t", b"via PublisherExt").await?;
//! let again = MessageConsumer::next(&mut c).await?;
//! again.ack().await?;
//! p.close().await?;
//! # let _: Option<MqttConsumer> = None;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod client;
mod config;
mod conn;
mod consumer;
mod convert;
mod driver;
mod error;
/// Entry points for the fuzz targets (`fuzz/`); not API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod publisher;
mod topic;

pub use client::MqttClient;
pub use config::{LastWill, MqttConfig, Protocol, QoS, TlsOptions};
pub use consumer::{MqttConsumer, MqttSubscriber, MqttSubscription};
pub use polybus_core::cloudevents::Mode as CloudEventsMode;
pub use publisher::MqttProducer;

/// The backend name in errors.
const BACKEND: &str = "mqtt";

#[cfg(test)]
mod send_sync {
    //! The handles are `Send + Sync` and their futures and streams are `Send`, so everything
    //! works from `tokio::spawn` (checked at compile time, like tokio's async_send_sync).
    use super::*;
    use polybus_core::{Consumer, Event, MessageConsumer, Publisher};

    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}

    #[allow(dead_code)]
    fn handles_and_futures(
        client: &MqttClient,
        producer: &MqttProducer,
        consumer: &mut MqttConsumer,
        subscriber: &MqttSubscriber,
    ) {
        send_sync(client);
        send_sync(producer);
        send_sync(&*consumer);
        send_sync(subscriber);
        send(&client.close());
        send(&producer.publish("t", b"x", 1));
        send(&Publisher::publish(producer, "t", Event::new("x")));
        send(&producer.flush());
        send(&consumer.subscribe("t", 1));
        send(&consumer.next());
        send(&MessageConsumer::next(consumer));
        send(&subscriber.subscribe("t"));
        send(&MqttConfig::new("h", 1, "c").connect());
    }
}
