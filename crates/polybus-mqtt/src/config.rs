//! The connection builder: protocol, session, credentials, TLS, last will, limits.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use polybus_core::cloudevents::Mode;
use polybus_core::telemetry::TracePolicy;
use polybus_core::{Error, ErrorKind, Result};

use crate::BACKEND;
use crate::client::MqttClient;

/// The MQTT protocol version spoken on the connection.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 5.0 (the default): user properties carry the CloudEvents attributes and headers.
    #[default]
    V5,
    /// MQTT 3.1.1: no headers exist, events travel as structured JSON CloudEvents.
    V311,
}

/// An MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    /// QoS 0: at most once, nothing is acknowledged.
    AtMostOnce,
    /// QoS 1: at least once, acknowledged by PUBACK (the default).
    #[default]
    AtLeastOnce,
    /// QoS 2: exactly once between two hops, acknowledged by PUBREC/PUBREL/PUBCOMP.
    ExactlyOnce,
}

impl QoS {
    /// The level as a number (0, 1 or 2).
    pub fn level(self) -> u8 {
        match self {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        }
    }

    /// The QoS of a level, as the seed writes it (`c.subscribe("t", 1)`).
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] for a level above 2.
    ///
    /// ```
    /// use polybus_mqtt::QoS;
    /// assert_eq!(QoS::from_level(2)?, QoS::ExactlyOnce);
    /// assert!(QoS::from_level(3).is_err());
    /// # Ok::<(), polybus_core::Error>(())
    /// ```
    pub fn from_level(level: u8) -> Result<QoS> {
        match level {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            n => Err(Error::unsupported(
                BACKEND,
                format!("QoS {n} does not exist: MQTT has QoS 0, 1 and 2"),
            )),
        }
    }
}

impl TryFrom<u8> for QoS {
    type Error = Error;
    fn try_from(level: u8) -> Result<QoS> {
        QoS::from_level(level)
    }
}

/// The message the broker publishes on the client's behalf when the client goes away without
/// a DISCONNECT (a crash, a lost network, an expired keep-alive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
}

impl LastWill {
    /// A will published to `topic` with `payload`, at QoS 1 and not retained.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        LastWill {
            topic: topic.into(),
            payload: payload.into(),
            qos: QoS::AtLeastOnce,
            retain: false,
        }
    }
    /// Sets the QoS of the will.
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }
    /// Makes the will a retained message.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }
}

/// TLS settings, built on rustls with the *ring* provider.
///
/// ```
/// # fn pem() -> Vec<u8> { Vec::new() }
/// use polybus_mqtt::TlsOptions;
/// let tls = TlsOptions::new().ca_pem(pem()).client_auth_pem(pem(), pem());
/// assert!(format!("{tls:?}").contains("<redacted>"));
/// ```
#[derive(Clone, Default)]
pub struct TlsOptions {
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) client_auth: Option<(Vec<u8>, Vec<u8>)>,
    pub(crate) alpn: Vec<Vec<u8>>,
    pub(crate) rustls: Option<Arc<rustls::ClientConfig>>,
}

impl TlsOptions {
    /// TLS without trusted certificates yet: add a CA with [`ca_pem`](Self::ca_pem).
    pub fn new() -> Self {
        Self::default()
    }
    /// Trusts the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks; a system
    /// bundle such as `/etc/ssl/certs/ca-certificates.crt` works too). May be called again to
    /// add more.
    pub fn ca_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.ca_pem.extend_from_slice(pem.as_ref());
        self.ca_pem.push(b'\n');
        self
    }
    /// Authenticates the client with a certificate chain and its private key (PKCS#1, PKCS#8
    /// or SEC1), both PEM.
    pub fn client_auth_pem(
        mut self,
        cert_chain: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_auth = Some((cert_chain.into(), key.into()));
        self
    }
    /// Offers ALPN protocols (for example `mqtt` on port 443).
    pub fn alpn(mut self, protocols: impl IntoIterator<Item = impl Into<Vec<u8>>>) -> Self {
        self.alpn = protocols.into_iter().map(Into::into).collect();
        self
    }
    /// Uses a ready rustls configuration instead (the other settings are then ignored).
    pub fn rustls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.rustls = Some(config);
        self
    }

    pub(crate) fn build(&self) -> Result<Arc<rustls::ClientConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        if let Some(cfg) = &self.rustls {
            return Ok(cfg.clone());
        }
        let bad = |msg: String| Error::new(ErrorKind::Connect, BACKEND).with_message(msg);
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| bad(format!("TLS CA certificate PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("TLS CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad(
                "TLS needs at least one CA certificate (TlsOptions::ca_pem)".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS protocol versions: {e}")))?
            .with_root_certificates(roots);
        let mut config = match &self.client_auth {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("TLS client certificate PEM: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| bad(format!("TLS client key PEM: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(format!("TLS client certificate: {e}")))?
            }
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(Arc::new(config))
    }
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field(
                "client_auth",
                &self
                    .client_auth
                    .as_ref()
                    .map(|_| "<cert chain>, <redacted>"),
            )
            .field("alpn", &self.alpn.len())
            .field("rustls_config", &self.rustls.is_some())
            .finish()
    }
}

/// User name and password. The password never appears in `Debug` output.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Everything about one MQTT connection, built by value and finished with
/// [`connect`](Self::connect).
///
/// Defaults: MQTT 5, keep-alive 30 s, clean start (no persistent session), QoS 1 for the
/// generic [`Publisher`](polybus_core::Publisher) and [`Consumer`](polybus_core::Consumer),
/// 1 MiB maximum packet size, CloudEvents binary mode, reconnect backoff from 100 ms to 30 s
/// with jitter, 10 s to connect.
///
/// ```no_run
/// use std::time::Duration;
/// use polybus_mqtt::{LastWill, MqttConfig, Protocol, QoS};
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let client = MqttConfig::new("127.0.0.1", 1883, "sensor-7")
///     .protocol(Protocol::V5)
///     .keep_alive(Duration::from_secs(15))
///     .credentials("sensor", "s3cret")
///     .clean_start(false)
///     .session_expiry(Duration::from_secs(3600))
///     .last_will(LastWill::new("sensors/7/status", "offline").retain(true))
///     .default_qos(QoS::AtLeastOnce)
///     .max_packet_size(256 * 1024)
///     .connect()
///     .await?;
/// let producer = client.producer();
/// producer.publish_retained("sensors/7/status", b"online", 1).await?;
/// client.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "call .connect().await to open the connection"]
pub struct MqttConfig {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) client_id: String,
    pub(crate) protocol: Protocol,
    pub(crate) keep_alive: Duration,
    pub(crate) credentials: Option<Credentials>,
    pub(crate) tls: Option<TlsOptions>,
    pub(crate) clean_start: bool,
    pub(crate) session_expiry: Option<Duration>,
    pub(crate) last_will: Option<LastWill>,
    pub(crate) max_packet_size: u32,
    pub(crate) default_qos: QoS,
    pub(crate) mode: Mode,
    pub(crate) trace_policy: TracePolicy,
    pub(crate) source: Option<Cow<'static, str>>,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) receive_maximum: u16,
    pub(crate) buffer: usize,
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("protocol", &self.protocol)
            .field("keep_alive", &self.keep_alive)
            .field("credentials", &self.credentials)
            .field("tls", &self.tls)
            .field("clean_start", &self.clean_start)
            .field("session_expiry", &self.session_expiry)
            .field("last_will", &self.last_will)
            .field("max_packet_size", &self.max_packet_size)
            .field("default_qos", &self.default_qos)
            .field("mode", &self.mode)
            .field("trace_policy", &self.trace_policy)
            .field("source", &self.source)
            .field("backoff", &(self.backoff_min, self.backoff_max))
            .field("connect_timeout", &self.connect_timeout)
            .field("receive_maximum", &self.receive_maximum)
            .field("buffer", &self.buffer)
            .finish()
    }
}

/// Bytes of a PUBLISH packet kept for the fixed header, topic and properties when the payload
/// limit is derived from the maximum packet size.
pub(crate) const PACKET_OVERHEAD: u32 = 16 * 1024;

/// The payload limit derived from a broker's maximum packet size `packet`: the packet less
/// [`PACKET_OVERHEAD`] for topic and properties, or less half the packet when the packet is
/// under twice that (a broker configured with a few KiB still leaves room for the topic and
/// the CloudEvents attributes, about 200 bytes, and for the payload).
pub(crate) fn payload_limit(packet: u32) -> usize {
    (packet - PACKET_OVERHEAD.min(packet / 2)) as usize
}

impl MqttConfig {
    /// A configuration for the broker at `host`:`port` with client identifier `client_id`.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        MqttConfig {
            host: host.into(),
            port,
            client_id: client_id.into(),
            protocol: Protocol::V5,
            keep_alive: Duration::from_secs(30),
            credentials: None,
            tls: None,
            clean_start: true,
            session_expiry: None,
            last_will: None,
            max_packet_size: 1024 * 1024,
            default_qos: QoS::AtLeastOnce,
            mode: Mode::Binary,
            trace_policy: TracePolicy::Continue,
            source: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(10),
            receive_maximum: 1024,
            buffer: 4096,
        }
    }

    /// The protocol version (default MQTT 5).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }
    /// The keep-alive interval (default 30 s; at least 1 s).
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive.max(Duration::from_secs(1));
        self
    }
    /// User name and password. The password is never printed by `Debug`.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials {
            username: username.into(),
            password: password.into(),
        });
        self
    }
    /// Connects over TLS.
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }
    /// Clean start (default `true`). With `false` the broker keeps the session (subscriptions
    /// and queued QoS 1/2 messages) while the client is away; with MQTT 5 also set
    /// [`session_expiry`](Self::session_expiry), since an expiry of 0 ends the session at
    /// disconnect.
    pub fn clean_start(mut self, clean_start: bool) -> Self {
        self.clean_start = clean_start;
        self
    }
    /// How long the broker keeps the session after the connection closes (MQTT 5 Session
    /// Expiry Interval; whole seconds, capped at `u32::MAX`, which means never).
    pub fn session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = Some(expiry);
        self
    }
    /// The last will.
    pub fn last_will(mut self, will: LastWill) -> Self {
        self.last_will = Some(will);
        self
    }
    /// The largest packet this client sends or accepts (default 1 MiB, at least 16 KiB + 1).
    /// Payloads above `max_packet_size - 16 KiB` (room for topic and properties) fail with
    /// [`ErrorKind::PayloadTooLarge`] before anything is sent.
    ///
    /// The broker's own limit applies too. An MQTT 5 broker announces it in the CONNACK
    /// (Maximum Packet Size; mosquitto's `max_packet_size`): when it is smaller, the
    /// connection's payload limit ([`MqttClient::capabilities`]) drops to match, and a
    /// publish whose payload or whole PUBLISH packet would exceed it fails with
    /// [`ErrorKind::PayloadTooLarge`] before sending, instead of the broker closing the
    /// connection. MQTT 3.1.1 has no such announcement, so a 3.1.1 connection knows only this
    /// limit: set it to the broker's. A 3.1.1 broker with a smaller limit closes the
    /// connection on a larger packet, and since an unacknowledged publish is sent again after
    /// every reconnect, that connection then keeps being closed.
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = bytes.max(PACKET_OVERHEAD + 1);
        self
    }
    /// The QoS the generic `Publisher::publish` and `Consumer::subscribe` use (default 1).
    pub fn default_qos(mut self, qos: QoS) -> Self {
        self.default_qos = qos;
        self
    }
    /// The CloudEvents content mode for MQTT 5 (default binary). MQTT 3.1.1 always uses
    /// structured mode.
    pub fn cloudevents_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// What a publish writes when the event carries no trace context and no tracing system
    /// gives one (default [`TracePolicy::Continue`]: nothing; [`TracePolicy::StartRoot`]: a
    /// new random trace per message, as polybus-mqtt did before). See
    /// `polybus_core::telemetry`.
    ///
    /// ```
    /// use polybus_core::telemetry::TracePolicy;
    /// let cfg = polybus_mqtt::MqttConfig::new("127.0.0.1", 1883, "c1")
    ///     .trace_policy(TracePolicy::StartRoot);
    /// assert_eq!(cfg.trace_policy_value(), TracePolicy::StartRoot);
    /// ```
    pub fn trace_policy(mut self, policy: TracePolicy) -> Self {
        self.trace_policy = policy;
        self
    }
    /// The trace policy set with [`trace_policy`](Self::trace_policy).
    pub fn trace_policy_value(&self) -> TracePolicy {
        self.trace_policy
    }
    /// The CloudEvents `source` given to events that have none.
    pub fn source(mut self, source: impl Into<Cow<'static, str>>) -> Self {
        self.source = Some(source.into());
        self
    }
    /// Reconnect backoff: the first retry waits about `min`, each further one twice as long up
    /// to `max`, each with random jitter (defaults 100 ms and 30 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_min);
        self
    }
    /// How long [`connect`](Self::connect) may take before it fails with
    /// [`ErrorKind::Connect`] (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }
    /// How long `close` waits for outstanding publishes and the DISCONNECT (default 10 s).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }
    /// Unacknowledged QoS 1/2 deliveries the broker may have in flight to this client (MQTT 5
    /// Receive Maximum, default 1024).
    pub fn receive_maximum(mut self, n: u16) -> Self {
        self.receive_maximum = n.max(1);
        self
    }
    /// Deliveries buffered per subscription (default 4096, at least the receive maximum).
    /// Nothing is dropped when a buffer is full: the connection stops reading from the broker
    /// until the consumer makes room (QoS 1/2 messages stay unacknowledged at the broker, TCP
    /// holds back the rest). Everything else read from that connection waits meanwhile: other
    /// subscriptions and the acknowledgements of its publishes. A consumer that pauses for
    /// longer than 1.5 keep-alive intervals gets the connection dropped by the broker; a
    /// persistent session then gets its unacknowledged messages again.
    pub fn buffer(mut self, n: usize) -> Self {
        self.buffer = n.max(1);
        self
    }

    /// The largest payload this configuration accepts before sending: `max_packet_size`
    /// less 16 KiB for topic and properties. A connection may accept less, when its broker
    /// announces a smaller Maximum Packet Size (see [`MqttClient::capabilities`]).
    pub fn max_payload(&self) -> usize {
        (self.max_packet_size - PACKET_OVERHEAD) as usize
    }

    /// The delivery semantics a connection with this configuration has, as far as the
    /// configuration tells: `max_payload` is [`max_payload`](Self::max_payload). The broker's
    /// limit is only known once connected, so a connection's
    /// [`MqttClient::capabilities`] may declare a smaller `max_payload` (MQTT 5 brokers with
    /// a smaller Maximum Packet Size); everything else is the same.
    pub fn capabilities(&self) -> polybus_core::Capabilities {
        crate::client::capabilities(self)
    }

    /// Opens the connection and waits for the broker's CONNACK.
    ///
    /// # Errors
    /// [`ErrorKind::Connect`] when the broker cannot be reached within the connect timeout,
    /// [`ErrorKind::Unauthorized`] when it refuses the credentials or the TLS client
    /// certificate, [`ErrorKind::Unsupported`] when it refuses the protocol version.
    pub async fn connect(self) -> Result<MqttClient> {
        MqttClient::connect_with(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_redacted_in_debug() {
        let cfg = MqttConfig::new("h", 1, "c").credentials("alice", "hunter2");
        let dbg = format!("{cfg:?}");
        assert!(dbg.contains("alice"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let tls = TlsOptions::new().client_auth_pem(b"CERT".to_vec(), b"SECRETKEY".to_vec());
        assert!(!format!("{tls:?}").contains("SECRETKEY"));
    }

    #[test]
    fn payload_limit_leaves_room_for_topic_and_properties() {
        assert_eq!(payload_limit(1024 * 1024), 1024 * 1024 - 16 * 1024);
        assert_eq!(payload_limit(32 * 1024), 16 * 1024);
        assert_eq!(payload_limit(2048), 1024);
        assert_eq!(payload_limit(1), 1);
        assert_eq!(payload_limit(0), 0);
        assert_eq!(
            payload_limit(u32::MAX),
            (u32::MAX - PACKET_OVERHEAD) as usize
        );
        // Continuous where the two rules meet: never more payload for a smaller packet.
        for p in (0..70_000).step_by(7) {
            assert!(payload_limit(p) <= payload_limit(p + 7), "{p}");
        }
    }

    #[test]
    fn qos_levels() {
        assert_eq!(QoS::from_level(0).unwrap(), QoS::AtMostOnce);
        assert_eq!(QoS::try_from(1).unwrap().level(), 1);
        assert_eq!(
            QoS::from_level(7).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn tls_without_ca_is_a_connect_error() {
        let err = TlsOptions::new().build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connect);
        let err = TlsOptions::new().ca_pem("not pem").build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connect);
    }
}
