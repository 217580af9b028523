//! Topic names and topic administration.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::{Error, ErrorKind, Result};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::OnceCell;

use crate::KafkaConfig;
use crate::error::{BACKEND, code_of, from_code, from_kafka, kind_of_code};

/// The longest legal Kafka topic name.
pub const MAX_TOPIC_LEN: usize = 249;

/// Checks a Kafka topic name: 1 to 249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// [`ErrorKind::InvalidTopic`] naming what is wrong.
///
/// ```
/// use polybus_kafka::validate_topic;
/// assert!(validate_topic("orders.created-v1_2").is_ok());
/// for bad in ["", ".", "..", "a b", "a/b", "a*", "ünï"] {
///     assert_eq!(validate_topic(bad).unwrap_err().kind(), polybus_core::ErrorKind::InvalidTopic);
/// }
/// ```
pub fn validate_topic(topic: &str) -> Result<()> {
    let bad = |msg: String| Err(Error::new(ErrorKind::InvalidTopic, BACKEND).with_message(msg));
    if topic.is_empty() {
        return bad("topic is empty".into());
    }
    if topic.len() > MAX_TOPIC_LEN {
        return bad(format!(
            "topic is {} characters, the limit is {MAX_TOPIC_LEN}",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return bad(format!("topic {topic:?} is reserved"));
    }
    // Byte by byte first (this runs on every publish); characters only to name a bad one.
    if topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Ok(());
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(format!(
            "topic {topic:?} contains {c:?}; Kafka allows [a-zA-Z0-9._-]"
        ));
    }
    Ok(())
}

/// Topic administration over librdkafka's admin API.
///
/// ```no_run
/// use polybus_kafka::{KafkaAdmin, KafkaConfig};
/// # #[allow(dead_code)] async fn demo() -> polybus_core::Result<()> {
/// let admin = KafkaAdmin::new(&KafkaConfig::new("127.0.0.1:9092", "g1"))?;
/// admin.create_topic("orders", 6, 1).await?; // fails if it exists
/// admin.ensure_topic("orders").await?;       // fine if it exists
/// # Ok(()) }
/// ```
pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    cfg: KafkaConfig,
}

impl std::fmt::Debug for KafkaAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAdmin")
            .field("brokers", &self.cfg.brokers())
            .finish()
    }
}

impl KafkaAdmin {
    /// An admin client for the brokers of `cfg`. It connects on first use.
    ///
    /// # Errors
    /// A configuration librdkafka refuses.
    pub fn new(cfg: &KafkaConfig) -> Result<Self> {
        cfg.check()?;
        let client = cfg
            .admin_client_config()
            .create()
            .map_err(|e| from_kafka(e, "creating the admin client"))?;
        Ok(KafkaAdmin {
            client: Arc::new(client),
            cfg: cfg.clone(),
        })
    }

    fn options(&self) -> AdminOptions {
        let t = self.cfg.connect_timeout();
        AdminOptions::new()
            .request_timeout(Some(t))
            .operation_timeout(Some(t))
    }

    /// Creates `topic` with `partitions` partitions and `replication` replicas.
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal name, `Rejected` if it exists already (or the broker
    /// refuses the settings), `Unauthorized` without permission, `Connect` when no broker
    /// answers within the connect timeout.
    pub async fn create_topic(&self, topic: &str, partitions: i32, replication: i32) -> Result<()> {
        match self.create(topic, partitions, replication).await? {
            None => Ok(()),
            Some(code) => Err(from_code(code, format!("creating topic {topic:?}"))),
        }
    }

    /// Creates `topic` with the configured defaults unless it exists.
    ///
    /// # Errors
    /// As [`create_topic`](Self::create_topic), except that an existing topic is fine.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let (partitions, replication) = self.cfg.topic_defaults();
        match self.create(topic, partitions, replication).await? {
            None | Some(RDKafkaErrorCode::TopicAlreadyExists) => Ok(()),
            Some(code)
                if kind_of_code(code) == ErrorKind::Unauthorized && self.exists(topic).await? =>
            {
                // No permission to create, but it is there: fine.
                Ok(())
            }
            Some(code) => Err(from_code(code, format!("creating topic {topic:?}"))),
        }
    }

    /// Deletes `topic`.
    ///
    /// # Errors
    /// `NotFound` if it does not exist, otherwise as [`create_topic`](Self::create_topic).
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        validate_topic(topic)?;
        let res = match self.client.delete_topics(&[topic], &self.options()).await {
            Ok(r) => r,
            Err(e) => return Err(self.request_error(e, "deleting a topic").await),
        };
        match res.into_iter().next() {
            Some(Err((_, code))) => Err(from_code(code, format!("deleting topic {topic:?}"))),
            _ => Ok(()),
        }
    }

    /// Whether `topic` exists, from the cluster metadata.
    ///
    /// # Errors
    /// `Connect` when no broker answers within the connect timeout.
    pub async fn exists(&self, topic: &str) -> Result<bool> {
        Ok(self.partitions(topic).await?.is_some_and(|n| n > 0))
    }

    /// The partition count of `topic`, `None` if it does not exist.
    ///
    /// # Errors
    /// `Connect` when no broker answers within the connect timeout.
    pub async fn partitions(&self, topic: &str) -> Result<Option<usize>> {
        validate_topic(topic)?;
        let client = Arc::clone(&self.client);
        let topic = topic.to_owned();
        let timeout = self.cfg.connect_timeout();
        let brokers = self.cfg.brokers().to_owned();
        let found = blocking(move || {
            let md = client
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| connect_error(e, &brokers, timeout))?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len()))
        })
        .await;
        match found {
            Err(e) if e.kind() == ErrorKind::Connect => Err(self.explain_unreachable(e).await),
            other => other,
        }
    }

    async fn create(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
    ) -> Result<Option<RDKafkaErrorCode>> {
        validate_topic(topic)?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        let res = match self.client.create_topics(&[new], &self.options()).await {
            Ok(r) => r,
            Err(e) => return Err(self.request_error(e, "creating a topic").await),
        };
        Ok(match res.into_iter().next() {
            Some(Err((_, code))) => match code {
                RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut => {
                    return Err(self.unreachable().await);
                }
                other => Some(other),
            },
            _ => None,
        })
    }

    async fn request_error(&self, e: KafkaError, what: &str) -> Error {
        match code_of(&e).map(kind_of_code) {
            Some(ErrorKind::Timeout | ErrorKind::Connect) => self.unreachable().await,
            _ => from_kafka(e, what.to_owned()),
        }
    }

    /// No answer in time: see [`explain_unreachable`](Self::explain_unreachable).
    async fn unreachable(&self) -> Error {
        self.explain_unreachable(timeout_connect(
            self.cfg.brokers(),
            self.cfg.connect_timeout(),
        ))
        .await
    }

    /// No answer in time (`connect`): when SASL or TLS is configured, a short probe asks
    /// librdkafka why. Refused credentials are `Unauthorized`; a failed TLS handshake stays
    /// `Connect` with librdkafka's reason (certificate verify failed, ...), or is
    /// `Unauthorized` when the broker refused our client certificate.
    async fn explain_unreachable(&self, connect: Error) -> Error {
        if !self.cfg.uses_sasl() && !self.cfg.uses_tls() {
            return connect;
        }
        let config = self.cfg.admin_client_config();
        let probe = blocking(move || Ok(probe_auth_failure(&config, Duration::from_secs(3)))).await;
        let brokers = self.cfg.brokers();
        match probe {
            Ok(Some(Failure::Auth(reason))) => Error::new(ErrorKind::Unauthorized, BACKEND)
                .with_message(format!(
                    "the broker at {brokers} refused the credentials: {reason}"
                )),
            Ok(Some(Failure::Tls(reason))) => {
                let refused_us = [
                    "alert",
                    "certificate required",
                    "unknown ca",
                    "bad certificate",
                ]
                .iter()
                .any(|s| reason.to_ascii_lowercase().contains(s))
                    && !reason.contains("certificate verify failed");
                let kind = if refused_us {
                    ErrorKind::Unauthorized
                } else {
                    ErrorKind::Connect
                };
                Error::new(kind, BACKEND).with_message(format!(
                    "TLS handshake with {brokers} failed (certificate not trusted, host name \
                     mismatch, or client certificate refused): {reason}"
                ))
            }
            _ => connect,
        }
    }
}

/// Why librdkafka could not talk to the broker.
enum Failure {
    /// SASL refused.
    Auth(String),
    /// The TLS handshake failed.
    Tls(String),
}

/// Collects what librdkafka reports while a throwaway producer connects.
#[derive(Default)]
struct ProbeCtx {
    failure: std::sync::Mutex<Option<Failure>>,
}

impl ClientContext for ProbeCtx {
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
    fn error(&self, error: KafkaError, reason: &str) {
        let failure = match code_of(&error) {
            Some(RDKafkaErrorCode::SSL) => Failure::Tls(reason.to_owned()),
            Some(code) if kind_of_code(code) == ErrorKind::Unauthorized => {
                Failure::Auth(reason.to_owned())
            }
            // A TLS failure is often reported as a transport failure naming SSL.
            _ if reason.contains("SSL") => Failure::Tls(reason.to_owned()),
            _ => return,
        };
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some(failure);
        }
    }
}

impl rdkafka::producer::ProducerContext for ProbeCtx {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Connects a throwaway producer with `config` for up to `wait` and returns the reason of an
/// authentication or TLS failure, if librdkafka reports one.
fn probe_auth_failure(config: &rdkafka::ClientConfig, wait: Duration) -> Option<Failure> {
    use rdkafka::producer::Producer as _;
    let producer: rdkafka::producer::BaseProducer<ProbeCtx> =
        config.create_with_context(ProbeCtx::default()).ok()?;
    let deadline = polybus_core::time::deadline_after(wait).into_std();
    // Ask for metadata so a connection (and the SASL handshake) starts.
    let _ = producer
        .client()
        .fetch_metadata(None, Duration::from_millis(500));
    while std::time::Instant::now() < deadline {
        producer.poll(Duration::from_millis(100));
        if let Some(failure) = producer
            .context()
            .failure
            .lock()
            .ok()
            .and_then(|mut f| f.take())
        {
            return Some(failure);
        }
    }
    None
}

fn timeout_connect(brokers: &str, timeout: Duration) -> Error {
    Error::new(ErrorKind::Connect, BACKEND).with_message(format!(
        "no Kafka broker at {brokers} answered within {timeout:?}"
    ))
}

fn connect_error(e: KafkaError, brokers: &str, timeout: Duration) -> Error {
    match code_of(&e).map(kind_of_code) {
        Some(ErrorKind::Timeout | ErrorKind::Connect) | None => {
            timeout_connect(brokers, timeout).with_source(e)
        }
        _ => from_kafka(e, "fetching metadata"),
    }
}

/// Runs blocking librdkafka calls off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(ErrorKind::Other, BACKEND)
            .with_message("a blocking librdkafka call failed")
            .with_source(e)
    })?
}

/// Creates missing topics once per name for a producer or consumer (when the config says so).
pub(crate) struct TopicEnsurer {
    cfg: KafkaConfig,
    admin: OnceCell<KafkaAdmin>,
    known: Mutex<HashSet<String>>,
    /// One check per topic at a time: concurrent first publishes to a topic wait for the
    /// same CreateTopics instead of each sending its own (10 000 in flight sent 10 000).
    pending: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
}

impl TopicEnsurer {
    pub(crate) fn new(cfg: &KafkaConfig) -> Arc<Self> {
        Arc::new(TopicEnsurer {
            cfg: cfg.clone(),
            admin: OnceCell::new(),
            known: Mutex::new(HashSet::new()),
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn is_known(&self, topic: &str) -> bool {
        self.known
            .lock()
            .map(|k| k.contains(topic))
            .unwrap_or(false)
    }

    pub(crate) async fn ensure(&self, topic: &str) -> Result<()> {
        if !self.cfg.creates_topics() || self.is_known(topic) {
            return Ok(());
        }
        let check = match self.pending.lock() {
            Ok(mut p) => Arc::clone(p.entry(topic.to_owned()).or_default()),
            Err(_) => Arc::new(OnceCell::new()),
        };
        // The first caller checks; the others wait for it (and retry if it failed).
        check
            .get_or_try_init(|| async {
                let admin = self
                    .admin
                    .get_or_try_init(|| async { KafkaAdmin::new(&self.cfg) })
                    .await?;
                admin.ensure_topic(topic).await
            })
            .await?;
        if let Ok(mut k) = self.known.lock() {
            k.insert(topic.to_owned());
        }
        if let Ok(mut p) = self.pending.lock() {
            p.remove(topic);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(validate_topic(&"a".repeat(249)).is_ok());
        assert!(validate_topic(&"a".repeat(250)).is_err());
        assert!(validate_topic("...").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "nul\0",
            "a.*",
            "a/#",
            "a+",
            "a>",
            "é",
        ] {
            assert_eq!(
                validate_topic(bad).unwrap_err().kind(),
                ErrorKind::InvalidTopic,
                "{bad:?}"
            );
        }
    }
}
