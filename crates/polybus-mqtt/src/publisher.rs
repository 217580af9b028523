//! The producer.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use polybus_core::{Event, IntoPayload, Publisher, Receipt, Result};

use crate::client::{Handle, MqttClient};
use crate::config::{MqttConfig, QoS};
use crate::consumer::MqttConsumer;
use crate::convert;
use crate::driver::OutMsg;
use crate::topic;

/// Publishes to MQTT topics. Cheap to clone; clones share the connection.
///
/// Every publish resolves when the broker acknowledged it: PUBACK for QoS 1, PUBCOMP for
/// QoS 2, and as soon as it is written for QoS 0. Across a reconnect, unacknowledged
/// publishes are sent again (so QoS 1 is at least once end to end; QoS 2 is exactly once only
/// while the broker keeps the session).
///
/// The seed's `p.publish("t", b"hello", 1)` is the inherent [`publish`](Self::publish); the
/// generic [`Publisher::publish`] (topic and [`Event`], default QoS) is reachable as
/// [`publish_event`](Self::publish_event) or through the trait, and
/// `polybus_core::PublisherExt::send` works as everywhere.
///
/// ```no_run
/// use polybus_core::{Event, PublisherExt};
/// use polybus_mqtt::{MqttProducer, QoS};
/// # #[tokio::main] async fn main() -> anyhow::Result<()> {
/// let (p, _c) = MqttProducer::connect("127.0.0.1", 1883, "client-1").await?;
/// p.publish("t", b"hello", 1).await?;              // QoS 1, acknowledged
/// p.send("t", b"hello again").await?;               // the default QoS
/// let ev = Event::builder().kind("reading").header("unit", "C").data("21.5").build()?;
/// p.publish_event_with("sensors/1", ev, QoS::ExactlyOnce, true).await?; // retained, QoS 2
/// p.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MqttProducer {
    handle: Arc<Handle>,
}

impl fmt::Debug for MqttProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttProducer")
            .field("client_id", &self.handle.inner.cfg.client_id)
            .finish()
    }
}

impl MqttProducer {
    pub(crate) fn new(handle: Arc<Handle>) -> Self {
        MqttProducer { handle }
    }

    /// The seed's entry point: connects with default settings and returns a producer and a
    /// consumer sharing one connection.
    ///
    /// # Errors
    /// As [`MqttConfig::connect`].
    pub async fn connect(
        host: impl Into<String>,
        port: u16,
        client_id: impl Into<String>,
    ) -> Result<(MqttProducer, MqttConsumer)> {
        let client = MqttClient::connect(host, port, client_id).await?;
        Ok((client.producer(), client.consumer()))
    }

    /// A builder for everything else; finish it with `connect()` and take
    /// [`MqttClient::producer`] and [`MqttClient::consumer`].
    pub fn builder(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> MqttConfig {
        MqttConfig::new(host, port, client_id)
    }

    /// Publishes `payload` to `topic` with QoS `qos` (0, 1 or 2), as the seed writes it. The
    /// payload travels as the event data of a new event.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidTopic`](polybus_core::ErrorKind::InvalidTopic),
    /// [`ErrorKind::PayloadTooLarge`](polybus_core::ErrorKind::PayloadTooLarge) before sending;
    /// [`ErrorKind::Unsupported`](polybus_core::ErrorKind::Unsupported) for a QoS above 2;
    /// the broker's refusal; [`ErrorKind::Closed`](polybus_core::ErrorKind::Closed).
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl IntoPayload,
        qos: u8,
    ) -> Result<Receipt> {
        let qos = QoS::from_level(qos)?;
        self.publish_event_with(topic, Event::new(payload), qos, false)
            .await
    }

    /// Publishes `payload` as a retained message: the broker keeps the last one per topic and
    /// gives it to every new subscriber.
    ///
    /// # Errors
    /// As [`publish`](Self::publish).
    pub async fn publish_retained(
        &self,
        topic: &str,
        payload: impl IntoPayload,
        qos: u8,
    ) -> Result<Receipt> {
        let qos = QoS::from_level(qos)?;
        self.publish_event_with(topic, Event::new(payload), qos, true)
            .await
    }

    /// Publishes `event` with the default QoS (what [`Publisher::publish`] does).
    ///
    /// # Errors
    /// As [`publish`](Self::publish), plus
    /// [`ErrorKind::InvalidHeader`](polybus_core::ErrorKind::InvalidHeader) for a header MQTT
    /// 3.1.1 cannot carry.
    pub async fn publish_event(&self, topic: &str, event: Event) -> Result<Receipt> {
        let qos = self.handle.inner.cfg.default_qos;
        self.publish_event_with(topic, event, qos, false).await
    }

    /// Publishes `event` with an explicit QoS and retain flag.
    ///
    /// # Errors
    /// As [`publish_event`](Self::publish_event).
    pub async fn publish_event_with(
        &self,
        topic: &str,
        mut event: Event,
        qos: QoS,
        retain: bool,
    ) -> Result<Receipt> {
        let scope = self.handle.inner.telemetry.publish(topic, &mut event);
        scope
            .run(self.publish_traced(topic, event, qos, retain))
            .await
    }

    async fn publish_traced(
        &self,
        topic: &str,
        mut event: Event,
        qos: QoS,
        retain: bool,
    ) -> Result<Receipt> {
        let inner = &self.handle.inner;
        if inner.is_closed() {
            return Err(polybus_core::Error::closed(crate::BACKEND)
                .with_message("the connection is closed"));
        }
        topic::validate_name(topic)?;
        event.validate().map_err(retag)?;
        if let Some(src) = &inner.cfg.source {
            event.set_source_if_unset(src);
        }
        let enc = convert::encode_owned(event, inner.cfg.protocol, inner.cfg.mode)?;
        let msg = OutMsg {
            topic: topic.to_owned(),
            qos,
            retain,
            payload: enc.payload,
            user_properties: enc.user_properties,
            content_type: enc.content_type,
        };
        inner.publish(msg).await?;
        Ok(Receipt::new(topic))
    }

    /// The delivery semantics of this connection (as [`MqttClient::capabilities`]); its
    /// `max_payload` is the largest payload [`publish`](Self::publish) accepts.
    pub fn capabilities(&self) -> polybus_core::Capabilities {
        self.handle.inner.capabilities()
    }

    /// Waits until every publish made so far on this connection is acknowledged.
    ///
    /// # Errors
    /// [`ErrorKind::Closed`](polybus_core::ErrorKind::Closed) if the connection closes first.
    pub async fn flush(&self) -> Result<()> {
        self.handle.inner.flush().await
    }

    /// Flushes, then closes the connection (shared with the consumers made from the same
    /// client). Closing twice is fine.
    ///
    /// # Errors
    /// As [`MqttClient::close`].
    pub async fn close(&self) -> Result<()> {
        self.handle.inner.close(true).await
    }
}

/// Core validation errors are tagged "core"; re-tag them as ours.
fn retag(e: polybus_core::Error) -> polybus_core::Error {
    let msg = e.message().unwrap_or_default().to_owned();
    polybus_core::Error::new(e.kind(), crate::BACKEND).with_message(msg)
}

impl Publisher for MqttProducer {
    fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send {
        self.publish_event(topic, event)
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        MqttProducer::flush(self)
    }
    fn close(&self) -> impl Future<Output = Result<()>> + Send {
        MqttProducer::close(self)
    }
}
