//! Options: the NATS connection, where streams come from, and the stream and consumer settings
//! used when polybus creates them.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use polybus_core::Result;
use polybus_core::cloudevents::{Mode, WireFormat};
use polybus_nats::NatsOptions;

use crate::{JetStream, JsConsumer, JsProducer};

/// The longest duration the server takes: Go's `time.Duration` is nanoseconds in an `i64`
/// (about 292 years). The client writes `as_nanos() as i64`, so anything longer would wrap.
pub(crate) const MAX_SERVER_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

/// `d`, saturated to what the server takes ([`MAX_SERVER_DURATION`]).
pub(crate) fn server_duration(d: Duration) -> Duration {
    d.min(MAX_SERVER_DURATION)
}

/// Where the stream holding a topic comes from when the generic [`Publisher`] and [`Consumer`]
/// traits are used with arbitrary topics.
///
/// [`Publisher`]: polybus_core::Publisher
/// [`Consumer`]: polybus_core::Consumer
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamPolicy {
    /// Streams are managed elsewhere (or with [`JetStream::ensure_stream`]); a topic no stream
    /// covers fails with `NotFound`. The default.
    Existing,
    /// The first publish or subscribe to a topic that no stream covers creates a stream for it,
    /// named `<prefix><topic with '.' and other illegal characters as '_'>_<hash>`, with the
    /// topic as its only subject and the [`StreamSettings`] of the options. A topic an existing
    /// stream already covers (for example a wildcard stream) uses that stream.
    PerTopic {
        /// Prefix of the created stream names.
        prefix: String,
    },
}

/// Settings of the streams polybus creates (create-or-bind: an existing stream keeps its own
/// configuration).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSettings {
    /// Retention policy (default `Limits`: keep messages until a limit is reached).
    pub retention: RetentionPolicy,
    /// Storage (default `File`: messages survive a server restart).
    pub storage: StorageType,
    /// The window in which a repeated `Nats-Msg-Id` is recognised as a duplicate (default
    /// 2 minutes).
    pub duplicate_window: Duration,
    /// Maximum age of messages (default zero: unlimited).
    pub max_age: Duration,
    /// Maximum number of messages (default -1: unlimited).
    pub max_messages: i64,
    /// Maximum bytes (default -1: unlimited).
    pub max_bytes: i64,
    /// Replicas (default 1).
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            max_messages: -1,
            max_bytes: -1,
            replicas: 1,
        }
    }
}

impl StreamSettings {
    /// Sets [`retention`](Self::retention).
    pub fn retention(mut self, v: RetentionPolicy) -> Self {
        self.retention = v;
        self
    }
    /// Sets [`storage`](Self::storage).
    pub fn storage(mut self, v: StorageType) -> Self {
        self.storage = v;
        self
    }
    /// Sets [`duplicate_window`](Self::duplicate_window) (at most about 292 years, the server's
    /// limit; longer saturates).
    pub fn duplicate_window(mut self, v: Duration) -> Self {
        self.duplicate_window = server_duration(v);
        self
    }
    /// Sets [`max_age`](Self::max_age) (at most about 292 years; longer saturates).
    pub fn max_age(mut self, v: Duration) -> Self {
        self.max_age = server_duration(v);
        self
    }
    /// Sets [`max_messages`](Self::max_messages).
    pub fn max_messages(mut self, v: i64) -> Self {
        self.max_messages = v;
        self
    }
    /// Sets [`max_bytes`](Self::max_bytes).
    pub fn max_bytes(mut self, v: i64) -> Self {
        self.max_bytes = v;
        self
    }
    /// Sets [`replicas`](Self::replicas).
    pub fn replicas(mut self, v: usize) -> Self {
        self.replicas = v.max(1);
        self
    }
}

/// Settings of the pull consumers polybus creates, and of how it pulls from them.
/// Create-or-bind: an existing durable consumer keeps its own configuration.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSettings {
    /// How long the server waits for an ack before redelivering (default 30 s).
    pub ack_wait: Duration,
    /// Deliveries before the server gives up on a message (default -1: unlimited).
    pub max_deliver: i64,
    /// Redelivery delays after an ack timeout (default none: `ack_wait` each time). The server
    /// requires `max_deliver` to be larger than the number of delays.
    pub backoff: Vec<Duration>,
    /// Unacknowledged deliveries the server hands to the consumer at most (default 1000): the
    /// consumer never holds more unsettled deliveries than this.
    pub max_ack_pending: i64,
    /// Where a new consumer starts (default `All`: the whole stream, so a late subscriber gets
    /// the backlog; `New` makes it miss what was published before).
    pub deliver_policy: DeliverPolicy,
    /// Messages asked for per pull request (default 100).
    pub fetch_batch: usize,
    /// How long one pull request waits for messages (default 1 s).
    pub fetch_expiry: Duration,
    /// How long the server keeps an ephemeral consumer (one without a group) after its
    /// subscriber went away (default 30 s; polybus also deletes it when the subscription is
    /// dropped).
    pub inactive_threshold: Duration,
    /// Whether `ack` waits for the server to confirm it (double ack; default false: the ack
    /// is sent and not confirmed).
    pub confirm_acks: bool,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            backoff: Vec::new(),
            max_ack_pending: 1000,
            deliver_policy: DeliverPolicy::All,
            fetch_batch: 100,
            fetch_expiry: Duration::from_secs(1),
            inactive_threshold: Duration::from_secs(30),
            confirm_acks: false,
        }
    }
}

impl ConsumerSettings {
    /// Sets [`ack_wait`](Self::ack_wait) (at most about 292 years; longer saturates).
    pub fn ack_wait(mut self, v: Duration) -> Self {
        self.ack_wait = server_duration(v);
        self
    }
    /// Sets [`max_deliver`](Self::max_deliver).
    pub fn max_deliver(mut self, v: i64) -> Self {
        self.max_deliver = v;
        self
    }
    /// Sets [`backoff`](Self::backoff) (each delay at most about 292 years; longer saturates).
    pub fn backoff(mut self, v: Vec<Duration>) -> Self {
        self.backoff = v.into_iter().map(server_duration).collect();
        self
    }
    /// Sets [`max_ack_pending`](Self::max_ack_pending).
    pub fn max_ack_pending(mut self, v: i64) -> Self {
        self.max_ack_pending = v;
        self
    }
    /// Sets [`deliver_policy`](Self::deliver_policy).
    pub fn deliver_policy(mut self, v: DeliverPolicy) -> Self {
        self.deliver_policy = v;
        self
    }
    /// Sets [`fetch_batch`](Self::fetch_batch) (at least 1).
    pub fn fetch_batch(mut self, v: usize) -> Self {
        self.fetch_batch = v.max(1);
        self
    }
    /// Sets [`fetch_expiry`](Self::fetch_expiry) (at least 10 ms, at most about 292 years).
    pub fn fetch_expiry(mut self, v: Duration) -> Self {
        self.fetch_expiry = server_duration(v.max(Duration::from_millis(10)));
        self
    }
    /// Sets [`inactive_threshold`](Self::inactive_threshold) (at most about 292 years; longer
    /// saturates).
    pub fn inactive_threshold(mut self, v: Duration) -> Self {
        self.inactive_threshold = server_duration(v);
        self
    }
    /// Sets [`confirm_acks`](Self::confirm_acks).
    pub fn confirm_acks(mut self, v: bool) -> Self {
        self.confirm_acks = v;
        self
    }
}

/// How to connect and how to use JetStream: a by-value builder ending in
/// [`connect`](Self::connect), [`producer`](Self::producer) or [`consumer`](Self::consumer).
///
/// Connection settings (credentials, TLS, timeouts, CloudEvents mode, source) are those of
/// [`NatsOptions`]; the rest says where streams come from ([`StreamPolicy`]) and how polybus
/// creates streams and consumers.
///
/// ```no_run
/// use std::time::Duration;
/// use polybus_jetstream::{ConsumerSettings, JsOptions, StreamPolicy};
///
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let _consumer = JsOptions::new("nats://127.0.0.1:4222")
///     .stream_policy(StreamPolicy::PerTopic { prefix: "EV_".into() })
///     .consumer_settings(ConsumerSettings::default().max_ack_pending(64).ack_wait(Duration::from_secs(10)))
///     .group("billing")
///     .consumer()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JsOptions {
    pub(crate) nats: NatsOptions,
    pub(crate) policy: StreamPolicy,
    pub(crate) stream: StreamSettings,
    pub(crate) consumer: ConsumerSettings,
    pub(crate) group: Option<String>,
    pub(crate) publish_timeout: Duration,
    /// Whether publishes carry `Nats-Msg-Id`; `None`: with the CloudEvents format only.
    pub(crate) msg_id: Option<bool>,
}

impl JsOptions {
    /// Options for the server(s) at `url`, with [`StreamPolicy::Existing`] and default
    /// settings.
    pub fn new(url: impl Into<String>) -> Self {
        Self::from_nats(NatsOptions::new(url))
    }

    /// JetStream options over NATS connection options built elsewhere.
    pub fn from_nats(nats: NatsOptions) -> Self {
        JsOptions {
            nats,
            policy: StreamPolicy::Existing,
            stream: StreamSettings::default(),
            consumer: ConsumerSettings::default(),
            group: None,
            publish_timeout: Duration::from_secs(10),
            msg_id: None,
        }
    }

    /// Changes the NATS connection options (credentials, TLS, ...).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222")
    ///     .nats(|n| n.user_password("app", "s3cret").name("billing"))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn nats(mut self, f: impl FnOnce(NatsOptions) -> NatsOptions) -> Self {
        self.nats = f(self.nats);
        self
    }

    /// Authenticates with a user name and password (shorthand for `nats(|n|
    /// n.user_password(..))`).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").user_password("u", "p").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn user_password(self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.nats(|n| n.user_password(user, password))
    }

    /// Authenticates with a token.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").token("t").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn token(self, token: impl Into<String>) -> Self {
        self.nats(|n| n.token(token))
    }

    /// Authenticates with a `.creds` file.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").credentials_file("app.creds").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn credentials_file(self, path: impl Into<PathBuf>) -> Self {
        self.nats(|n| n.credentials_file(path))
    }

    /// The CloudEvents `source` given to published events that have none.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _p = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").source("urn:billing").producer().await?;
    /// # Ok(()) }
    /// ```
    pub fn source(self, source: impl Into<Cow<'static, str>>) -> Self {
        self.nats(|n| n.source(source))
    }

    /// The CloudEvents content mode to write (binary by default).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_core::cloudevents::Mode;
    /// let _p = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").mode(Mode::Structured).producer().await?;
    /// # Ok(()) }
    /// ```
    pub fn mode(self, mode: Mode) -> Self {
        self.nats(|n| n.mode(mode))
    }

    /// What publishers write around the payload (default: the CloudEvents binding); see
    /// `NatsOptions::wire_format`. With [`WireFormat::Lean`] a publish carries no
    /// `Nats-Msg-Id` unless [`msg_id`](Self::msg_id) asks for it, and consumers name each
    /// message `jetstream:<stream>:<sequence>` (source `jetstream:<stream>`, time when the
    /// stream stored it).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_core::cloudevents::WireFormat;
    /// let _p = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222")
    ///     .wire_format(WireFormat::Lean)
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn wire_format(self, format: WireFormat) -> Self {
        self.nats(|n| n.wire_format(format))
    }

    /// Whether each publish carries the event id as `Nats-Msg-Id`, so that the stream stores
    /// an event published twice within its duplicate window once (default: yes with the
    /// CloudEvents format, no with the lean one). The server keeps every id of the window
    /// (2 minutes by default) in memory and checks each publish against them; the header adds
    /// ~50 bytes per message. A lean message with `Nats-Msg-Id` is read back with that id.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_core::cloudevents::WireFormat;
    /// let _p = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222")
    ///     .wire_format(WireFormat::Lean)
    ///     .msg_id(true) // lean, but deduplicated by the server
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn msg_id(mut self, on: bool) -> Self {
        self.msg_id = Some(on);
        self
    }

    /// Whether publishes carry `Nats-Msg-Id` (see [`msg_id`](Self::msg_id)).
    pub fn msg_id_value(&self) -> bool {
        self.msg_id
            .unwrap_or(!self.nats.wire_format_value().is_lean())
    }

    /// Where streams for topics come from (default [`StreamPolicy::Existing`]).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_jetstream::StreamPolicy;
    /// let _p = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222")
    ///     .stream_policy(StreamPolicy::PerTopic { prefix: "EV_".into() })
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn stream_policy(mut self, policy: StreamPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Settings of streams polybus creates.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_jetstream::StreamSettings;
    /// let _p = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222")
    ///     .stream_settings(StreamSettings::default().max_age(std::time::Duration::from_secs(3600)))
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn stream_settings(mut self, settings: StreamSettings) -> Self {
        self.stream = settings;
        self
    }

    /// Settings of consumers polybus creates and of pulling.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_jetstream::ConsumerSettings;
    /// let _c = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222")
    ///     .consumer_settings(ConsumerSettings::default().max_deliver(5))
    ///     .consumer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn consumer_settings(mut self, settings: ConsumerSettings) -> Self {
        self.consumer = settings;
        self
    }

    /// The consumer group consumers made from these options join: a durable pull consumer
    /// named `group` on the topic's stream.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").group("billing").consumer().await?;
    /// # Ok(()) }
    /// ```
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// How long a publish waits for the server's acknowledgement (default 10 s).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _p = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222")
    ///     .publish_timeout(std::time::Duration::from_secs(2))
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Connects.
    ///
    /// # Errors
    /// As for [`NatsOptions::connect`], tagged `jetstream`.
    pub async fn connect(self) -> Result<JetStream> {
        JetStream::connect(self).await
    }

    /// Connects and returns a producer (it owns the connection: `close` closes it).
    ///
    /// # Errors
    /// As for [`connect`](Self::connect).
    pub async fn producer(self) -> Result<JsProducer> {
        Ok(self.connect().await?.into_producer(None, true))
    }

    /// Connects and returns a consumer (in the group set with [`group`](Self::group), if
    /// any).
    ///
    /// # Errors
    /// As for [`connect`](Self::connect).
    pub async fn consumer(self) -> Result<JsConsumer> {
        let group = self.group.clone();
        let js = self.connect().await?;
        Ok(JsConsumer::new(js, group, None, true))
    }
}
