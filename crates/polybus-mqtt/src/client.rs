//! The connection handle.

use std::fmt;
use std::sync::Arc;

use polybus_core::{Backlog, Capabilities, Ordering, Result, Unsettled};

use crate::config::{MqttConfig, Protocol};
use crate::conn::Inner;
use crate::consumer::{MqttConsumer, MqttSubscriber};
use crate::publisher::MqttProducer;

/// Keeps the connection open while any handle lives; the last one to go sends DISCONNECT.
pub(crate) struct Handle {
    pub(crate) inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close_nowait();
    }
}

/// One MQTT connection, driven by a background task. Cheap to clone, `Send + Sync`.
///
/// Producers and consumers made from it share the connection (one client id, one session).
/// The task reconnects with exponential backoff and jitter when the connection drops,
/// subscribes again when the broker did not keep the session, and sends again every publish
/// the broker had not acknowledged. The connection closes with [`close`](Self::close) or when
/// the last handle (client, producer, consumer, subscription) is dropped.
///
/// ```no_run
/// use polybus_mqtt::MqttClient;
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let client = MqttClient::connect("127.0.0.1", 1883, "worker-1").await?;
/// let producer = client.producer();
/// let mut consumer = client.consumer();
/// consumer.subscribe("jobs/+", 1).await?;
/// producer.publish("jobs/42", b"run", 1).await?;
/// let job = consumer.next().await?;
/// job.ack().await?;
/// client.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MqttClient {
    pub(crate) handle: Arc<Handle>,
}

impl fmt::Debug for MqttClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.handle.inner;
        f.debug_struct("MqttClient")
            .field(
                "broker",
                &format_args!("{}:{}", inner.cfg.host, inner.cfg.port),
            )
            .field("client_id", &inner.cfg.client_id)
            .field("protocol", &inner.cfg.protocol)
            .field("connected", &inner.is_connected())
            .finish()
    }
}

impl MqttClient {
    /// A builder for everything beyond host, port and client id.
    pub fn builder(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> MqttConfig {
        MqttConfig::new(host, port, client_id)
    }

    /// Connects with the default settings (MQTT 5, clean start).
    ///
    /// # Errors
    /// As [`MqttConfig::connect`].
    pub async fn connect(
        host: impl Into<String>,
        port: u16,
        client_id: impl Into<String>,
    ) -> Result<MqttClient> {
        MqttConfig::new(host, port, client_id).connect().await
    }

    pub(crate) async fn connect_with(cfg: MqttConfig) -> Result<MqttClient> {
        let inner = Inner::connect(cfg).await?;
        Ok(MqttClient {
            handle: Arc::new(Handle { inner }),
        })
    }

    /// A producer on this connection.
    pub fn producer(&self) -> MqttProducer {
        MqttProducer::new(self.handle.clone())
    }

    /// The seed's consumer on this connection: `subscribe(topic, qos)` as often as needed, then
    /// `next()` yields deliveries from all of them.
    pub fn consumer(&self) -> MqttConsumer {
        MqttConsumer::new(self.handle.clone())
    }

    /// A [`Consumer`](polybus_core::Consumer) on this connection. `Some(group)` makes every
    /// subscription the shared subscription `$share/<group>/<topic>`: the members of a group
    /// (on any connection) share the messages.
    pub fn subscriber(&self, group: Option<&str>) -> MqttSubscriber {
        MqttSubscriber::new(self.handle.clone(), group.map(str::to_owned))
    }

    /// The delivery semantics of this connection (they depend on protocol and session).
    ///
    /// `max_payload` is the configured limit ([`MqttConfig::max_payload`]), lowered when the
    /// broker announced a smaller Maximum Packet Size in its MQTT 5 CONNACK: then it is that
    /// packet size less room for topic and properties (16 KiB, or half the packet for
    /// packets under 32 KiB). It follows the latest CONNACK. MQTT 3.1.1 brokers announce no
    /// limit, so there it is always the configured one.
    pub fn capabilities(&self) -> Capabilities {
        self.handle.inner.capabilities()
    }

    /// The client identifier.
    pub fn client_id(&self) -> &str {
        &self.handle.inner.cfg.client_id
    }

    /// Whether the connection is up right now (it may be reconnecting).
    pub fn is_connected(&self) -> bool {
        self.handle.inner.is_connected()
    }

    /// Waits for outstanding publishes (bounded by the close timeout), sends DISCONNECT and
    /// stops the task. Later operations on any handle of this connection fail with
    /// [`ErrorKind::Closed`](polybus_core::ErrorKind::Closed). Closing twice is fine.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`](polybus_core::ErrorKind::Timeout) when publishes were still
    /// unacknowledged at the close timeout (the connection is closed all the same).
    pub async fn close(&self) -> Result<()> {
        self.handle.inner.close(true).await
    }

    /// Drops the network connection at once, without DISCONNECT, as a crash would: the broker
    /// publishes the last will. Pending publishes fail with `Closed`.
    pub fn abort(&self) {
        self.handle.inner.abort();
    }
}

/// The capabilities of a connection configured by `cfg`, before the broker's limits are
/// known (`Inner::capabilities` lowers `max_payload` to the broker's).
pub(crate) fn capabilities(cfg: &MqttConfig) -> Capabilities {
    let persistent_session = !cfg.clean_start
        && (cfg.protocol == Protocol::V311 || cfg.session_expiry.is_some_and(|d| !d.is_zero()));
    Capabilities::NONE
        // Queued QoS 1/2 messages outlive the broker only for persistent sessions, and only
        // when the broker persists (mosquitto `persistence true`).
        .with_persistent(persistent_session)
        .with_redelivery_on_nack(false)
        .with_nack_delay(false)
        .with_unsettled(Unsettled::Lost)
        .with_consumer_groups(true)
        .with_durable_groups(persistent_session)
        .with_ordering(Ordering::PerTopic)
        .with_backlog(Backlog::Missed)
        .with_exactly_once_publish(false)
        .with_headers(cfg.protocol == Protocol::V5)
        .with_request_reply(false)
        .with_max_payload(Some(cfg.max_payload()))
}
