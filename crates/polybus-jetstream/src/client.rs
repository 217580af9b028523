//! The JetStream handle: one connection, stream and consumer management, KV and object store.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::{ContextBuilder, GetStreamByNameErrorKind};
use async_nats::jetstream::{self, Context, stream};
use polybus_core::{Error, ErrorKind, Result};
use polybus_nats::NatsConnection;

use crate::config::{ConsumerSettings, JsOptions, StreamPolicy, StreamSettings, server_duration};
use crate::error::{self, BACKEND};
use crate::kv::KvBucket;
use crate::object::ObjectBucket;
use crate::{JsConsumer, JsProducer};

/// A JetStream connection: creates or binds streams and durable pull consumers, opens KV and
/// object-store buckets, and makes producers and consumers that share the connection.
/// Cheap to clone.
///
/// ```no_run
/// use polybus_jetstream::{JsOptions, StreamSettings};
///
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let js = JsOptions::new("nats://127.0.0.1:4222").connect().await?;
/// js.ensure_stream("ORDERS", &["orders.>"], &StreamSettings::default()).await?;
/// let _producer = js.producer();
/// let _consumer = js.consumer(Some("billing"));
/// let switches = js.kv("switches").await?;
/// switches.put("dual-write", "on").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct JetStream {
    inner: Arc<Shared>,
}

struct Shared {
    conn: NatsConnection,
    ctx: Context,
    opts: JsOptions,
    /// Topic -> the stream covering it, once resolved.
    streams: Mutex<HashMap<String, String>>,
    telemetry: polybus_core::telemetry::Telemetry,
}

impl Drop for Shared {
    /// Acks and naks are sent without waiting; before the connection goes away with the last
    /// handle (consumers, deliveries and background naks all hold one), a background task
    /// flushes what is buffered.
    fn drop(&mut self) {
        if self.conn.is_closed() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.conn.client().clone();
            let timeout = self.opts.nats.close_timeout_value();
            handle.spawn(async move {
                let _ = tokio::time::timeout(timeout, client.flush()).await;
            });
        }
    }
}

impl fmt::Debug for JetStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStream")
            .field("policy", &self.inner.opts.policy)
            .field("nats", &self.inner.opts.nats)
            .finish()
    }
}

impl JetStream {
    /// Connects with `opts`.
    ///
    /// # Errors
    /// As for [`polybus_nats::NatsOptions::connect`], tagged `jetstream`.
    pub async fn connect(opts: JsOptions) -> Result<Self> {
        let conn = opts.nats.connect_for(BACKEND).await?;
        Ok(Self::from_connection_with(conn, opts))
    }

    /// JetStream over an existing connection, with default options.
    pub fn from_connection(conn: NatsConnection) -> Self {
        Self::from_connection_with(conn, JsOptions::new(""))
    }

    fn from_connection_with(conn: NatsConnection, opts: JsOptions) -> Self {
        let ctx = ContextBuilder::new()
            .timeout(opts.publish_timeout)
            .backpressure_on_inflight(true)
            .build(conn.client().clone());
        JetStream {
            inner: Arc::new(Shared {
                conn,
                ctx,
                opts,
                streams: Mutex::default(),
                telemetry: polybus_core::telemetry::Telemetry::new(BACKEND),
            }),
        }
    }

    /// The connection (counters, the raw client).
    pub fn connection(&self) -> &NatsConnection {
        &self.inner.conn
    }

    /// The async-nats JetStream context, for anything polybus does not wrap.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    pub(crate) fn options(&self) -> &JsOptions {
        &self.inner.opts
    }

    pub(crate) fn telemetry(&self) -> &polybus_core::telemetry::Telemetry {
        &self.inner.telemetry
    }

    /// A producer sharing this connection (`close` does not close the connection).
    pub fn producer(&self) -> JsProducer {
        self.clone().into_producer(None, false)
    }

    pub(crate) fn into_producer(self, subject: Option<String>, owns: bool) -> JsProducer {
        JsProducer::new(self, subject, owns)
    }

    /// A consumer sharing this connection, in `group` (a durable pull consumer named after the
    /// group) or without one (an ephemeral consumer per subscription).
    pub fn consumer(&self, group: Option<&str>) -> JsConsumer {
        JsConsumer::new(self.clone(), group.map(str::to_owned), None, false)
    }

    /// Creates the stream `name` with `subjects` and `settings`, or binds to it if it exists
    /// (an existing stream keeps its configuration). Returns its current information.
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal name; `Rejected` when the server refuses (for example the
    /// subjects overlap another stream's, or a stream of that name exists with another
    /// configuration); `Connect`/`Timeout` when the server does not answer.
    pub async fn ensure_stream(
        &self,
        name: &str,
        subjects: &[&str],
        settings: &StreamSettings,
    ) -> Result<stream::Info> {
        if !error::is_valid_name(name) {
            return Err(error::invalid_name("stream", name));
        }
        for s in subjects {
            polybus_nats::validate_subscribe_subject(s, BACKEND)?;
        }
        let config = stream_config(name, subjects, settings);
        let stream = self
            .inner
            .ctx
            .get_or_create_stream(config)
            .await
            .map_err(|e| error::create_stream(e, name))?;
        Ok(stream.cached_info().clone())
    }

    /// Creates the durable pull consumer `durable` on `stream` (filtered to `filter` when given)
    /// with `settings`, or binds to it if it exists (keeping its configuration).
    ///
    /// # Errors
    /// `NotFound` when the stream does not exist; `InvalidTopic` for an illegal name or filter;
    /// `Rejected` when the existing consumer filters other subjects than `filter`.
    pub async fn ensure_consumer(
        &self,
        stream: &str,
        durable: &str,
        filter: Option<&str>,
        settings: &ConsumerSettings,
    ) -> Result<PullConsumer> {
        if !error::is_valid_name(durable) {
            return Err(error::invalid_name("consumer (group)", durable));
        }
        if !error::is_valid_name(stream) {
            return Err(error::invalid_name("stream", stream));
        }
        if let Some(f) = filter {
            polybus_nats::validate_subscribe_subject(f, BACKEND)?;
        }
        let handle = self
            .inner
            .ctx
            .get_stream(stream)
            .await
            .map_err(|e| error::get_stream(e, stream))?;
        let config = consumer_config(Some(durable), filter, settings);
        let consumer: PullConsumer = handle
            .get_or_create_consumer(durable, config)
            .await
            .map_err(|e| error::consumer(e, durable))?;
        if let Some(f) = filter {
            let cfg = &consumer.cached_info().config;
            let mut filters: Vec<&str> = cfg.filter_subjects.iter().map(String::as_str).collect();
            if !cfg.filter_subject.is_empty() {
                filters.push(&cfg.filter_subject);
            }
            if filters != [f] {
                return Err(Error::new(ErrorKind::Rejected, BACKEND).with_message(format!(
                    "the durable consumer {durable:?} on stream {stream:?} filters {filters:?}, \
                     not {f:?}: a group subscribes to one topic per stream"
                )));
            }
        }
        Ok(consumer)
    }

    /// Creates an ephemeral pull consumer on `stream` filtered to `filter`.
    pub(crate) async fn ephemeral_consumer(
        &self,
        stream: &str,
        filter: &str,
    ) -> Result<PullConsumer> {
        let handle = self
            .inner
            .ctx
            .get_stream(stream)
            .await
            .map_err(|e| error::get_stream(e, stream))?;
        let config = consumer_config(None, Some(filter), &self.inner.opts.consumer);
        handle
            .create_consumer(config)
            .await
            .map_err(|e| error::consumer(e, "(ephemeral)"))
    }

    /// The stream covering `topic`, per the [`StreamPolicy`]: an existing stream whose subjects
    /// match it, or (with [`StreamPolicy::PerTopic`]) one created for it.
    ///
    /// # Errors
    /// `NotFound` when no stream covers it under [`StreamPolicy::Existing`]; `InvalidTopic` for
    /// an illegal subject; others as for [`ensure_stream`](Self::ensure_stream).
    pub async fn stream_for(&self, topic: &str) -> Result<String> {
        // A user who may not call the JetStream API gets no answer, only the server's
        // permission violation: that ends the wait, as `Unauthorized`.
        let since = self.inner.conn.violation_mark();
        let refused = std::pin::pin!(
            self.inner
                .conn
                .publish_refused_under("$JS.API.", since, BACKEND)
        );
        let found = std::pin::pin!(self.find_stream(topic));
        match futures_util::future::select(found, refused).await {
            futures_util::future::Either::Left((found, _)) => found,
            futures_util::future::Either::Right((e, _)) => Err(e),
        }
    }

    async fn find_stream(&self, topic: &str) -> Result<String> {
        polybus_nats::validate_subscribe_subject(topic, BACKEND)?;
        if let Some(s) = lock(&self.inner.streams).get(topic) {
            return Ok(s.clone());
        }
        let name = match self.inner.ctx.stream_by_subject(topic).await {
            Ok(name) => name,
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                match &self.inner.opts.policy {
                    StreamPolicy::PerTopic { prefix } => {
                        let name = per_topic_stream_name(prefix, topic);
                        match self
                            .ensure_stream(&name, &[topic], &self.inner.opts.stream)
                            .await
                        {
                            Ok(_) => name,
                            // Another client may have created a covering stream meanwhile.
                            Err(create) => match self.inner.ctx.stream_by_subject(topic).await {
                                Ok(name) => name,
                                Err(_) => return Err(create),
                            },
                        }
                    }
                    _ => {
                        return Err(Error::new(ErrorKind::NotFound, BACKEND).with_message(
                            format!(
                                "no stream covers the subject {topic:?}; create one or use \
                         StreamPolicy::PerTopic"
                            ),
                        ));
                    }
                }
            }
            Err(e) => {
                let kind = match e.kind() {
                    GetStreamByNameErrorKind::InvalidSubject => ErrorKind::InvalidTopic,
                    GetStreamByNameErrorKind::JetStream(ref js) => error::api_kind(js.code()),
                    _ => ErrorKind::Connect,
                };
                return Err(error::err(
                    kind,
                    format!("finding the stream of {topic:?}"),
                    e,
                ));
            }
        };
        lock(&self.inner.streams).insert(topic.to_owned(), name.clone());
        Ok(name)
    }

    /// Opens the key-value bucket `bucket`, creating it (history 1, file storage) if it does
    /// not exist.
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal bucket name, `Connect`/`Timeout`/`Rejected` from the
    /// server.
    pub async fn kv(&self, bucket: &str) -> Result<KvBucket> {
        self.kv_with(jetstream::kv::Config {
            bucket: bucket.to_owned(),
            history: 1,
            ..Default::default()
        })
        .await
    }

    /// Opens the key-value bucket of `config.bucket`, creating it with `config` if it does not
    /// exist. A `max_age` longer than the server takes (about 292 years) saturates.
    ///
    /// # Errors
    /// As for [`kv`](Self::kv).
    pub async fn kv_with(&self, mut config: jetstream::kv::Config) -> Result<KvBucket> {
        config.max_age = server_duration(config.max_age);
        config.limit_markers = config.limit_markers.map(server_duration);
        KvBucket::open(&self.inner.ctx, config).await
    }

    /// Opens the object-store bucket `bucket`, creating it (file storage) if it does not
    /// exist.
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal bucket name, `Connect`/`Timeout`/`Rejected` from the
    /// server.
    pub async fn object_store(&self, bucket: &str) -> Result<ObjectBucket> {
        ObjectBucket::open(&self.inner.ctx, bucket).await
    }

    /// The largest message (payload and headers) the server accepts.
    pub fn max_payload(&self) -> usize {
        self.inner.conn.max_payload()
    }
}

/// The name [`StreamPolicy::PerTopic`] gives the stream of `topic`: the prefix, the topic with
/// characters illegal in stream names replaced by `_`, and a hash of the topic so distinct
/// topics never share a name.
///
/// ```
/// let a = polybus_jetstream::per_topic_stream_name("EV_", "orders.created");
/// let b = polybus_jetstream::per_topic_stream_name("EV_", "orders_created");
/// assert!(a.starts_with("EV_orders_created_"));
/// assert_ne!(a, b);
/// ```
pub fn per_topic_stream_name(prefix: &str, topic: &str) -> String {
    let mut name = String::with_capacity(prefix.len() + topic.len() + 17);
    name.push_str(prefix);
    for c in topic.chars().take(160) {
        name.push(if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        });
    }
    // FNV-1a, stable across runs and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    name.push('_');
    name.push_str(&format!("{:08x}", hash as u32));
    name
}

fn stream_config(name: &str, subjects: &[&str], s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention: s.retention,
        storage: s.storage,
        duplicate_window: server_duration(s.duplicate_window),
        max_age: server_duration(s.max_age),
        max_messages: s.max_messages,
        max_bytes: s.max_bytes,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

pub(crate) fn consumer_config(
    durable: Option<&str>,
    filter: Option<&str>,
    s: &ConsumerSettings,
) -> pull::Config {
    pull::Config {
        durable_name: durable.map(str::to_owned),
        name: durable.map(str::to_owned),
        deliver_policy: s.deliver_policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait: server_duration(s.ack_wait),
        max_deliver: s.max_deliver,
        backoff: s.backoff.iter().copied().map(server_duration).collect(),
        max_ack_pending: s.max_ack_pending,
        filter_subject: filter.unwrap_or_default().to_owned(),
        inactive_threshold: if durable.is_some() {
            std::time::Duration::ZERO
        } else {
            server_duration(s.inactive_threshold)
        },
        ..Default::default()
    }
}

/// Whether the NATS subject `pattern` (which may hold `*` and `>`) matches `subject`.
pub(crate) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(subject_matches(">", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(!subject_matches("a", "a.b"));
    }

    #[test]
    fn per_topic_names_are_legal_and_distinct() {
        let n = per_topic_stream_name("P_", "a.b/c d>*");
        assert!(error::is_valid_name(&n), "{n}");
        assert_ne!(
            per_topic_stream_name("P_", "a.b"),
            per_topic_stream_name("P_", "a_b")
        );
        assert_eq!(
            per_topic_stream_name("P_", "a.b"),
            per_topic_stream_name("P_", "a.b")
        );
    }
}
