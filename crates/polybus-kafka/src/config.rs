//! `KafkaConfig`: one configuration for producers, consumers, admin and transactions.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use polybus_core::cloudevents::{Mode, WireFormat};
use polybus_core::telemetry::TracePolicy;
use polybus_core::{Backlog, Capabilities, Error, ErrorKind, Event, Ordering, Result, Unsettled};
use rdkafka::ClientConfig;

use crate::error::BACKEND;

/// The SASL mechanisms polybus configures by name. Others (`GSSAPI`, `OAUTHBEARER`) can be set
/// through [`KafkaConfig::set`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// `PLAIN`: user name and password in clear text (use it with TLS).
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka name of the mechanism (`sasl.mechanism`).
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A secret string: shown as `"***"` by `Debug`.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sasl {
    mechanism: SaslMechanism,
    username: String,
    password: Secret,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tls {
    enabled: bool,
    ca_location: Option<String>,
    certificate_location: Option<String>,
    key_location: Option<String>,
    key_password: Option<Secret>,
}

/// How the record key of a published event is chosen (the CloudEvents Kafka binding's "Key
/// Mapper"). Whatever it returns, the event itself is not changed: its `partitionkey`
/// attribute is still written.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum KeyMapper {
    /// The event's key (the binding's default: the user-provided record key).
    #[default]
    EventKey,
    /// The `partitionkey` attribute as written, if present (the binding's opt-in mapper).
    /// polybus writes `partitionkey` from the event key when it is UTF-8, so this differs
    /// from [`EventKey`](Self::EventKey) only for keys that are not UTF-8: they get no record
    /// key (and so a random partition).
    PartitionKey,
    /// Any function of the event.
    Custom(KeyFn),
}

/// A custom key mapping function, for [`KeyMapper::Custom`].
pub type KeyFn = Arc<dyn Fn(&Event) -> Option<Bytes> + Send + Sync>;

impl KeyMapper {
    /// The record key for `event`.
    pub fn key(&self, event: &Event) -> Option<Bytes> {
        match self {
            KeyMapper::EventKey => event.key_bytes().cloned(),
            KeyMapper::PartitionKey => event
                .key_bytes()
                .filter(|k| std::str::from_utf8(k).is_ok())
                .cloned(),
            KeyMapper::Custom(f) => f(event),
        }
    }
}

impl fmt::Debug for KeyMapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyMapper::EventKey => "EventKey",
            KeyMapper::PartitionKey => "PartitionKey",
            KeyMapper::Custom(_) => "Custom(..)",
        })
    }
}

/// Configuration of a Kafka connection, as the seed writes it:
///
/// ```
/// use polybus_kafka::KafkaConfig;
/// let cfg = KafkaConfig::new("localhost:9092", "g1")
///     .with_idempotent_producer(true)
///     .with_auto_offset_reset("earliest");
/// assert_eq!(cfg.group_id(), "g1");
/// ```
///
/// Defaults: idempotent producer on, `auto.offset.reset = earliest`, CloudEvents binary mode,
/// missing topics created with 3 partitions and replication factor 1, `message.max.bytes =
/// 1000000`, stored offsets auto-committed every second, a 10 s connect timeout.
///
/// Secrets (SASL password, TLS key password, and passthrough properties whose name contains
/// `password`, `secret`, `token`, `credential`, `private` or `key.pem`, and
/// `sasl.oauthbearer.config`) never appear in `Debug` output:
///
/// ```
/// use polybus_kafka::{KafkaConfig, SaslMechanism};
/// let cfg = KafkaConfig::new("localhost:9092", "g1")
///     .with_sasl(SaslMechanism::ScramSha512, "alice", "s3cr3t")
///     .set("ssl.key.password", "hunter2");
/// let shown = format!("{cfg:?}");
/// assert!(!shown.contains("s3cr3t") && !shown.contains("hunter2"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    brokers: String,
    group_id: String,
    idempotent: bool,
    auto_offset_reset: String,
    mode: Mode,
    wire_format: WireFormat,
    trace_policy: TracePolicy,
    source: Option<Cow<'static, str>>,
    create_topics: bool,
    topic_partitions: i32,
    topic_replication: i32,
    message_max_bytes: usize,
    queue_capacity: Option<usize>,
    connect_timeout: Duration,
    commit_interval: Duration,
    auto_commit: bool,
    session_timeout: Option<Duration>,
    heartbeat_interval: Option<Duration>,
    transactional_id: Option<String>,
    isolation_read_committed: bool,
    sasl: Option<Sasl>,
    tls: Tls,
    extra: Vec<(String, String)>,
    key_mapper: KeyMapper,
    lag_interval: Duration,
    max_in_flight: usize,
    start_time: Option<std::time::SystemTime>,
}

/// The default `message.max.bytes`.
pub(crate) const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The default of [`KafkaConfig::with_max_in_flight`], JetStream's default `max_ack_pending`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1000;

impl KafkaConfig {
    /// A configuration for the brokers `brokers` (`host:port[,host:port...]`) and the consumer
    /// group `group_id` (used by consumers; producers ignore it).
    pub fn new(brokers: impl Into<String>, group_id: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            group_id: group_id.into(),
            idempotent: true,
            auto_offset_reset: "earliest".into(),
            mode: Mode::Binary,
            wire_format: WireFormat::CloudEvents,
            trace_policy: TracePolicy::Continue,
            source: None,
            create_topics: true,
            topic_partitions: 3,
            topic_replication: 1,
            message_max_bytes: DEFAULT_MESSAGE_MAX_BYTES,
            queue_capacity: None,
            connect_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            auto_commit: true,
            session_timeout: None,
            heartbeat_interval: None,
            transactional_id: None,
            isolation_read_committed: true,
            sasl: None,
            tls: Tls::default(),
            extra: Vec::new(),
            key_mapper: KeyMapper::EventKey,
            lag_interval: Duration::from_secs(10),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            start_time: None,
        }
    }

    /// Starts consumers at a point in time: a partition for which the group has no committed
    /// offset starts at the first record whose timestamp is at or after `time` (Kafka's
    /// ListOffsets by timestamp, librdkafka's `offsets_for_times`), or at the end of the
    /// partition when there is no such record. Partitions with a committed offset resume
    /// there, as always; `None` (the default) leaves new partitions to `auto.offset.reset`.
    ///
    /// The lookup runs when partitions are assigned (on the thread polling the consumer,
    /// bounded by the [connect timeout](Self::with_connect_timeout)). If the broker cannot
    /// answer it, the subscription yields one error ([`ErrorKind::Unsupported`] when the
    /// broker does not know the request) and the partitions start at `auto.offset.reset`.
    ///
    /// A record's timestamp is its producer's `CreateTime` unless the topic says
    /// `LogAppendTime`; producers that set times of their own make "after `time`" mean what
    /// they wrote.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use polybus_kafka::KafkaConfig;
    /// let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    /// let cfg = KafkaConfig::new("localhost:9092", "audit").with_start_time(Some(an_hour_ago));
    /// assert_eq!(cfg.start_time(), Some(an_hour_ago));
    /// ```
    pub fn with_start_time(mut self, time: Option<std::time::SystemTime>) -> Self {
        self.start_time = time;
        self
    }

    /// The start time set with [`with_start_time`](Self::with_start_time).
    pub fn start_time(&self) -> Option<std::time::SystemTime> {
        self.start_time
    }

    /// At most `n` deliveries of one subscription are unsettled at once (default
    /// [`DEFAULT_MAX_IN_FLIGHT`] = 1000, JetStream's default `max_ack_pending`; 0 counts as 1).
    ///
    /// A delivery counts from the moment the subscription takes its record from librdkafka
    /// until it is acked or termed; a nacked or dropped delivery still counts while it waits
    /// for its local redelivery. At the limit `next` waits (backpressure) until one is
    /// settled, or until a nacked one is due again, instead of reading more records. So the
    /// memory a subscription holds for unsettled deliveries is bounded by `n` events,
    /// whatever the application does.
    ///
    /// librdkafka is not polled while `next` waits here: a member that keeps `n` deliveries
    /// unsettled for longer than `max.poll.interval.ms` (5 minutes by default) leaves the
    /// group, exactly as if it stopped calling `next`, and its partitions go to another
    /// member.
    ///
    /// ```
    /// use polybus_kafka::KafkaConfig;
    /// let cfg = KafkaConfig::new("localhost:9092", "g1").with_max_in_flight(64);
    /// assert_eq!(cfg.max_in_flight(), 64);
    /// ```
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// The most deliveries one subscription keeps unsettled (see
    /// [`with_max_in_flight`](Self::with_max_in_flight)).
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// What producers and consumers of this configuration guarantee, derived from the
    /// settings that decide it:
    ///
    /// * `exactly_once_publish` is always `false`: the idempotent producer (and a
    ///   transactional one) only keeps its *own* retries from duplicating a record; publishing
    ///   the same event twice stores it twice.
    /// * `backlog`: [`Delivered`](Backlog::Delivered) when `auto.offset.reset` is `earliest`
    ///   (or `smallest`, `beginning`), [`Missed`](Backlog::Missed) for `latest` (`largest`,
    ///   `end`) and for `error`, where a group without a committed offset gets an error
    ///   instead of the backlog.
    /// * `ordering`: [`PerKey`](Ordering::PerKey) when producer retries cannot reorder a
    ///   partition: the idempotent (or transactional) producer, or at most one request in
    ///   flight per connection, or no retries. With idempotence off and pipelined retries,
    ///   a retried record can land after a later one: [`Ordering::None`].
    /// * `durable_groups`: only while offsets are committed by the consumer
    ///   ([`with_auto_commit`](Self::with_auto_commit), on by default). With it off, the
    ///   group position moves only through [`KafkaConsumer::commit`](crate::KafkaConsumer::commit)
    ///   or a transaction, not through `ack`, so a rejoining member starts over from the last
    ///   explicit commit.
    /// * `max_payload`: [`message_max_bytes`](Self::message_max_bytes), the limit on key +
    ///   value + headers.
    /// * always: `persistent`, consumer groups, `nack` with a delay, headers; a dropped
    ///   delivery is [`RedeliveredFromPosition`](Unsettled::RedeliveredFromPosition); no
    ///   request-reply.
    ///
    /// Passthrough properties ([`set`](Self::set)) count: they override the typed setters, as
    /// they do in the librdkafka configuration.
    ///
    /// ```
    /// use polybus_core::Backlog;
    /// use polybus_kafka::KafkaConfig;
    /// let cfg = KafkaConfig::new("localhost:9092", "g1").with_auto_offset_reset("latest");
    /// let caps = cfg.capabilities();
    /// assert_eq!(caps.backlog, Backlog::Missed);
    /// assert!(!caps.exactly_once_publish);
    /// assert_eq!(caps.max_payload, Some(cfg.message_max_bytes()));
    /// ```
    pub fn capabilities(&self) -> Capabilities {
        let reset = self
            .passthrough("auto.offset.reset")
            .unwrap_or(&self.auto_offset_reset);
        let backlog = if ["earliest", "smallest", "beginning"]
            .iter()
            .any(|v| reset.eq_ignore_ascii_case(v))
        {
            Backlog::Delivered
        } else {
            // latest, largest, end; `error` delivers no backlog either (the group gets an
            // error), and librdkafka refuses any other value when the client is created.
            Backlog::Missed
        };
        let ordering = if self.producer_keeps_order() {
            Ordering::PerKey
        } else {
            Ordering::None
        };
        let auto_commit = self
            .passthrough_bool("enable.auto.commit")
            .unwrap_or(self.auto_commit);
        Capabilities::NONE
            .with_persistent(true)
            .with_redelivery_on_nack(true)
            .with_nack_delay(true)
            .with_unsettled(Unsettled::RedeliveredFromPosition)
            .with_consumer_groups(true)
            .with_durable_groups(auto_commit)
            .with_ordering(ordering)
            .with_backlog(backlog)
            .with_exactly_once_publish(false)
            .with_headers(true)
            .with_request_reply(false)
            .with_max_payload(Some(self.message_max_bytes))
    }

    /// Whether the producer's retries keep the order of a partition.
    fn producer_keeps_order(&self) -> bool {
        let transactional =
            self.transactional_id.is_some() || self.passthrough("transactional.id").is_some();
        let idempotent = self
            .passthrough_bool("enable.idempotence")
            .unwrap_or(self.idempotent)
            || transactional;
        let number = |keys: &[&str]| {
            keys.iter()
                .filter_map(|k| self.passthrough(k))
                .next_back()
                .and_then(|v| v.parse::<u64>().ok())
        };
        idempotent
            || number(&["max.in.flight.requests.per.connection", "max.in.flight"])
                .is_some_and(|n| n <= 1)
            || number(&["message.send.max.retries", "retries"]) == Some(0)
    }

    /// The last passthrough value of the librdkafka property `key` (the one that wins).
    fn passthrough(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean passthrough property, read as librdkafka reads it (`true`, `t`, `1`;
    /// `false`, `f`, `0`; case-insensitive); `None` when unset or unreadable (librdkafka then
    /// refuses the configuration).
    fn passthrough_bool(&self, key: &str) -> Option<bool> {
        let v = self.passthrough(key)?;
        if v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("t") || v == "1" {
            Some(true)
        } else if v.eq_ignore_ascii_case("false") || v.eq_ignore_ascii_case("f") || v == "0" {
            Some(false)
        } else {
            None
        }
    }

    /// Chooses the record key of published events (default [`KeyMapper::EventKey`]).
    ///
    /// ```
    /// use polybus_kafka::{KafkaConfig, KeyMapper};
    /// let cfg = KafkaConfig::new("localhost:9092", "g1").with_key_mapper(KeyMapper::PartitionKey);
    /// assert!(matches!(cfg.key_mapper(), KeyMapper::PartitionKey));
    /// ```
    pub fn with_key_mapper(mut self, mapper: KeyMapper) -> Self {
        self.key_mapper = mapper;
        self
    }

    /// The key mapper.
    pub fn key_mapper(&self) -> &KeyMapper {
        &self.key_mapper
    }

    /// How often consumers report their lag to the `polybus_consumer_lag` gauge (librdkafka
    /// statistics, `statistics.interval.ms`; default 10 s, `Duration::ZERO` turns it off).
    pub fn with_lag_interval(mut self, interval: Duration) -> Self {
        // librdkafka's maximum (a day); longer saturates instead of failing the client.
        self.lag_interval = interval.min(Duration::from_secs(86_400));
        self
    }

    /// Turns the idempotent producer (`enable.idempotence`, on by default) on or off. With it,
    /// broker-side retries never duplicate or reorder records within a partition.
    pub fn with_idempotent_producer(mut self, on: bool) -> Self {
        self.idempotent = on;
        self
    }

    /// Where a group without a committed offset starts: `"earliest"` (the default here) or
    /// `"latest"` (`auto.offset.reset`).
    pub fn with_auto_offset_reset(mut self, reset: impl Into<String>) -> Self {
        self.auto_offset_reset = reset.into();
        self
    }

    /// Sets the consumer group.
    pub fn with_group_id(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = group_id.into();
        self
    }

    /// Chooses the CloudEvents content mode producers write (binary by default). Consumers
    /// detect the mode of each record.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// What producers write around the payload: the CloudEvents binding (default) or the
    /// lean format: the payload as the value, the record key, the event's headers and its
    /// content type (`content-type`), no `ce_*` attribute (see [`WireFormat`] and
    /// docs/WIRE-FORMAT.md). Consumers read either: a lean record is named by its position
    /// (`kafka:<topic>:<partition>:<offset>`) and timed by its timestamp.
    ///
    /// ```
    /// use polybus_core::cloudevents::WireFormat;
    /// use polybus_kafka::KafkaConfig;
    /// let cfg = KafkaConfig::new("127.0.0.1:9092", "g1").with_wire_format(WireFormat::Lean);
    /// assert_eq!(cfg.wire_format(), WireFormat::Lean);
    /// ```
    pub fn with_wire_format(mut self, format: WireFormat) -> Self {
        self.wire_format = format;
        self
    }

    /// What a publish writes when the event carries no trace context and no tracing system
    /// gives one (default [`TracePolicy::Continue`]: nothing; [`TracePolicy::StartRoot`]: a
    /// new random trace per record, as polybus-kafka did before). See
    /// `polybus_core::telemetry`.
    ///
    /// ```
    /// use polybus_core::telemetry::TracePolicy;
    /// use polybus_kafka::KafkaConfig;
    /// let cfg = KafkaConfig::new("127.0.0.1:9092", "g1").with_trace_policy(TracePolicy::StartRoot);
    /// assert_eq!(cfg.trace_policy(), TracePolicy::StartRoot);
    /// ```
    pub fn with_trace_policy(mut self, policy: TracePolicy) -> Self {
        self.trace_policy = policy;
        self
    }

    /// The CloudEvents `source` given to events that have none.
    pub fn with_source(mut self, source: impl Into<Cow<'static, str>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Whether producers and consumers create a missing topic (on by default) with
    /// [`with_topic_defaults`](Self::with_topic_defaults). Brokers such as tansu do not create
    /// topics on first use.
    pub fn with_create_topics(mut self, on: bool) -> Self {
        self.create_topics = on;
        self
    }

    /// Partition count and replication factor of topics created on demand (3 and 1).
    pub fn with_topic_defaults(mut self, partitions: i32, replication: i32) -> Self {
        self.topic_partitions = partitions.max(1);
        self.topic_replication = replication.max(1);
        self
    }

    /// The largest record (key + value + headers) a producer sends (`message.max.bytes`,
    /// 1 000 000 by default). Larger events fail with `PayloadTooLarge` before they are sent.
    pub fn with_message_max_bytes(mut self, bytes: usize) -> Self {
        self.message_max_bytes = bytes.clamp(1000, 1_000_000_000);
        self
    }

    /// Bounds the producer's local queue (`queue.buffering.max.messages`). When it is full a
    /// publish waits for room; nothing is dropped.
    pub fn with_queue_capacity(mut self, messages: usize) -> Self {
        self.queue_capacity = Some(messages.clamp(1, 2_147_483_647)); // librdkafka: 1..=i32::MAX
        self
    }

    /// How long topic checks and other admin requests wait for a broker before failing with
    /// `Connect` (10 s by default).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        // rdkafka passes timeouts as i32 milliseconds (`as i32`): saturate rather than wrap.
        self.connect_timeout = timeout.min(Duration::from_millis(2_147_483_647));
        self
    }

    /// How often acknowledged offsets are committed in the background
    /// (`auto.commit.interval.ms`, 1 s by default). They are also committed on revoke and on
    /// close.
    pub fn with_commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval.min(Duration::from_secs(86_400)); // librdkafka's maximum
        self
    }

    /// Whether acknowledged offsets are committed by the consumer (in the background, on
    /// revoke and on close; on by default). Turn it off when a
    /// [`KafkaTransactionalProducer`](crate::KafkaTransactionalProducer) commits the offsets
    /// inside its transactions, as librdkafka requires; acks then only advance the
    /// position [`KafkaConsumer::commit`](crate::KafkaConsumer::commit) would commit.
    pub fn with_auto_commit(mut self, on: bool) -> Self {
        self.auto_commit = on;
        self
    }

    /// Consumer `session.timeout.ms` and `heartbeat.interval.ms`; short values make group
    /// changes faster (tests), long ones tolerate pauses.
    pub fn with_session_timeout(mut self, session: Duration, heartbeat: Duration) -> Self {
        // librdkafka's maximum for both is an hour; longer saturates.
        self.session_timeout = Some(session.min(Duration::from_secs(3_600)));
        self.heartbeat_interval = Some(heartbeat.min(Duration::from_secs(3_600)));
        self
    }

    /// Makes producers transactional with this `transactional.id` (see
    /// [`KafkaTransactionalProducer`](crate::KafkaTransactionalProducer)).
    pub fn with_transactional_id(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// Whether consumers read only committed transactional records (`isolation.level =
    /// read_committed`, on by default as in librdkafka) or also records of open and aborted
    /// transactions (`read_uncommitted`).
    pub fn with_read_committed(mut self, on: bool) -> Self {
        self.isolation_read_committed = on;
        self
    }

    /// SASL authentication with `mechanism`, `username` and `password`. The security protocol
    /// becomes `SASL_PLAINTEXT`, or `SASL_SSL` together with TLS.
    pub fn with_sasl(
        mut self,
        mechanism: SaslMechanism,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.sasl = Some(Sasl {
            mechanism,
            username: username.into(),
            password: Secret(password.into()),
        });
        self
    }

    /// Turns TLS on (`SSL`, or `SASL_SSL` with SASL), verifying the broker with the system CAs
    /// unless [`with_tls_ca`](Self::with_tls_ca) names a file.
    pub fn with_tls(mut self, on: bool) -> Self {
        self.tls.enabled = on;
        self
    }

    /// TLS with the CA certificate(s) in the PEM file at `path` (`ssl.ca.location`).
    pub fn with_tls_ca(mut self, path: impl Into<String>) -> Self {
        self.tls.enabled = true;
        self.tls.ca_location = Some(path.into());
        self
    }

    /// Mutual TLS: the client certificate and private key (PEM files) and the key's password,
    /// if it has one.
    pub fn with_tls_client_cert(
        mut self,
        certificate: impl Into<String>,
        key: impl Into<String>,
        key_password: Option<String>,
    ) -> Self {
        self.tls.enabled = true;
        self.tls.certificate_location = Some(certificate.into());
        self.tls.key_location = Some(key.into());
        self.tls.key_password = key_password.map(Secret);
        self
    }

    /// Sets any librdkafka property (the escape hatch, as `rdkafka::ClientConfig::set`).
    /// Applied last, so it overrides what the typed setters produce.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((key.into(), value.into()));
        self
    }

    /// The bootstrap brokers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }
    /// The consumer group.
    pub fn group_id(&self) -> &str {
        &self.group_id
    }
    /// The CloudEvents mode producers write.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// The wire format set with [`with_wire_format`](Self::with_wire_format).
    pub fn wire_format(&self) -> WireFormat {
        self.wire_format
    }
    /// The trace policy set with [`with_trace_policy`](Self::with_trace_policy).
    pub fn trace_policy(&self) -> TracePolicy {
        self.trace_policy
    }
    /// `message.max.bytes`.
    pub fn message_max_bytes(&self) -> usize {
        self.message_max_bytes
    }
    /// Whether missing topics are created.
    pub fn creates_topics(&self) -> bool {
        self.create_topics
    }
    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// The transactional id, if set.
    pub fn transactional_id(&self) -> Option<&str> {
        self.transactional_id.as_deref()
    }
    pub(crate) fn uses_sasl(&self) -> bool {
        self.sasl.is_some()
            || self.extra.iter().any(|(k, v)| {
                k == "security.protocol" && v.to_ascii_uppercase().starts_with("SASL")
            })
    }
    pub(crate) fn uses_tls(&self) -> bool {
        self.tls.enabled
            || self
                .extra
                .iter()
                .any(|(k, v)| k == "security.protocol" && v.to_ascii_uppercase().ends_with("SSL"))
    }
    pub(crate) fn source(&self) -> Option<&Cow<'static, str>> {
        self.source.as_ref()
    }
    pub(crate) fn topic_defaults(&self) -> (i32, i32) {
        (self.topic_partitions, self.topic_replication)
    }

    /// The librdkafka properties every client gets: brokers, security, passthrough.
    pub fn common_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        let protocol = match (self.sasl.is_some(), self.tls.enabled) {
            (true, true) => Some("SASL_SSL"),
            (true, false) => Some("SASL_PLAINTEXT"),
            (false, true) => Some("SSL"),
            (false, false) => None,
        };
        if let Some(p) = protocol {
            c.set("security.protocol", p);
        }
        if let Some(s) = &self.sasl {
            c.set("sasl.mechanism", s.mechanism.as_str());
            c.set("sasl.username", &s.username);
            c.set("sasl.password", &s.password.0);
        }
        if let Some(v) = &self.tls.ca_location {
            c.set("ssl.ca.location", v);
        }
        if let Some(v) = &self.tls.certificate_location {
            c.set("ssl.certificate.location", v);
        }
        if let Some(v) = &self.tls.key_location {
            c.set("ssl.key.location", v);
        }
        if let Some(v) = &self.tls.key_password {
            c.set("ssl.key.password", &v.0);
        }
        c
    }

    fn apply_extra(&self, c: &mut ClientConfig) {
        for (k, v) in &self.extra {
            c.set(k, v);
        }
    }

    /// The librdkafka configuration of a producer.
    pub fn producer_client_config(&self) -> ClientConfig {
        let mut c = self.common_client_config();
        c.set(
            "enable.idempotence",
            if self.idempotent || self.transactional_id.is_some() {
                "true"
            } else {
                "false"
            },
        );
        c.set("message.max.bytes", self.message_max_bytes.to_string());
        if let Some(q) = self.queue_capacity {
            c.set("queue.buffering.max.messages", q.to_string());
        }
        if let Some(id) = &self.transactional_id {
            c.set("transactional.id", id);
        }
        self.apply_extra(&mut c);
        c
    }

    /// The librdkafka configuration of a consumer in `group`: offsets are stored only when a
    /// delivery is acknowledged (`enable.auto.offset.store = false`) and committed in the
    /// background (`enable.auto.commit = true`).
    pub fn consumer_client_config(&self, group: &str) -> ClientConfig {
        let mut c = self.common_client_config();
        c.set("group.id", group);
        c.set(
            "enable.auto.commit",
            if self.auto_commit { "true" } else { "false" },
        );
        c.set("enable.auto.offset.store", "false");
        c.set(
            "auto.commit.interval.ms",
            self.commit_interval.as_millis().max(1).to_string(),
        );
        c.set("auto.offset.reset", &self.auto_offset_reset);
        c.set(
            "statistics.interval.ms",
            self.lag_interval.as_millis().to_string(),
        );
        c.set(
            "isolation.level",
            if self.isolation_read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        );
        if let Some(s) = self.session_timeout {
            c.set("session.timeout.ms", s.as_millis().max(1).to_string());
        }
        if let Some(h) = self.heartbeat_interval {
            c.set("heartbeat.interval.ms", h.as_millis().max(1).to_string());
        }
        self.apply_extra(&mut c);
        c
    }

    /// The librdkafka configuration of an admin client.
    pub fn admin_client_config(&self) -> ClientConfig {
        let mut c = self.common_client_config();
        for (k, v) in &self.extra {
            // Producer/consumer-only properties would make the admin client refuse to start.
            if !k.starts_with("group.") && !k.starts_with("transactional.") {
                c.set(k, v);
            }
        }
        c
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.brokers.trim().is_empty() {
            return Err(
                Error::new(ErrorKind::Connect, BACKEND).with_message("no bootstrap brokers")
            );
        }
        Ok(())
    }
}

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("sasl.oauthbearer.config")
        // `ssl.key.pem`: the private key itself, inline.
        || k.contains("key.pem")
        || k.contains("private")
        || k.contains("token")
        || k.contains("credential")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret_key(k) { "***" } else { v.as_str() },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("idempotent", &self.idempotent)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("mode", &self.mode)
            .field("wire_format", &self.wire_format)
            .field("trace_policy", &self.trace_policy)
            .field("source", &self.source)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication", &self.topic_replication)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("queue_capacity", &self.queue_capacity)
            .field("connect_timeout", &self.connect_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("auto_commit", &self.auto_commit)
            .field("session_timeout", &self.session_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("transactional_id", &self.transactional_id)
            .field("read_committed", &self.isolation_read_committed)
            .field("sasl", &self.sasl)
            .field("tls", &self.tls)
            .field("extra", &extra)
            .field("key_mapper", &self.key_mapper)
            .field("lag_interval", &self.lag_interval)
            .field("max_in_flight", &self.max_in_flight)
            .field("start_time", &self.start_time)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_every_secret() {
        let cfg = KafkaConfig::new("b:9092", "g")
            .with_sasl(SaslMechanism::Plain, "u", "pw-sasl")
            .with_tls_client_cert("c.pem", "k.pem", Some("pw-key".into()))
            .set("sasl.oauthbearer.config", "pw-oauth")
            .set("some.secret.thing", "pw-other");
        let s = format!("{cfg:?}");
        for secret in ["pw-sasl", "pw-key", "pw-oauth", "pw-other"] {
            assert!(!s.contains(secret), "{secret} leaked: {s}");
        }
        assert!(s.contains("\"u\""));
    }

    #[test]
    fn security_protocol_follows_sasl_and_tls() {
        let get = |c: &KafkaConfig| {
            c.common_client_config()
                .get("security.protocol")
                .map(str::to_owned)
        };
        let base = KafkaConfig::new("b", "g");
        assert_eq!(get(&base), None);
        assert_eq!(get(&base.clone().with_tls(true)).as_deref(), Some("SSL"));
        let sasl = base.clone().with_sasl(SaslMechanism::ScramSha256, "u", "p");
        assert_eq!(get(&sasl).as_deref(), Some("SASL_PLAINTEXT"));
        assert_eq!(
            sasl.common_client_config().get("sasl.mechanism"),
            Some("SCRAM-SHA-256")
        );
        assert_eq!(
            get(&sasl.with_tls_ca("ca.pem")).as_deref(),
            Some("SASL_SSL")
        );
    }

    #[test]
    fn consumer_stores_offsets_only_on_ack_and_passthrough_wins() {
        let c = KafkaConfig::new("b", "g")
            .set("auto.commit.interval.ms", "250")
            .consumer_client_config("grp");
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("enable.auto.commit"), Some("true"));
        assert_eq!(c.get("group.id"), Some("grp"));
        assert_eq!(c.get("auto.commit.interval.ms"), Some("250"));
        let p = KafkaConfig::new("b", "g").producer_client_config();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("message.max.bytes"), Some("1000000"));
    }

    #[test]
    fn capabilities_of_the_default_configuration_are_the_constant() {
        let cfg = KafkaConfig::new("b", "g");
        let caps = cfg.capabilities();
        assert_eq!(caps, crate::CAPABILITIES);
        assert!(
            !caps.exactly_once_publish,
            "the idempotent producer does not dedup events"
        );
        assert_eq!(caps.backlog, Backlog::Delivered);
        assert_eq!(caps.ordering, Ordering::PerKey);
        assert_eq!(caps.unsettled, Unsettled::RedeliveredFromPosition);
        assert!(caps.persistent && caps.consumer_groups && caps.durable_groups);
        assert!(caps.redelivery_on_nack && caps.nack_delay && caps.headers);
        assert!(!caps.request_reply);
        assert_eq!(caps.max_payload, Some(1_000_000));
    }

    #[test]
    fn backlog_follows_auto_offset_reset() {
        let backlog = |reset: &str| {
            KafkaConfig::new("b", "g")
                .with_auto_offset_reset(reset)
                .capabilities()
                .backlog
        };
        for delivered in ["earliest", "smallest", "beginning", "EARLIEST"] {
            assert_eq!(backlog(delivered), Backlog::Delivered, "{delivered}");
        }
        // `error`: a group without a position gets an error, not the backlog.
        for missed in ["latest", "largest", "end", "Latest", "error"] {
            assert_eq!(backlog(missed), Backlog::Missed, "{missed}");
        }
        // The passthrough property wins, as it does in the client configuration.
        let cfg = KafkaConfig::new("b", "g").set("auto.offset.reset", "latest");
        assert_eq!(
            cfg.consumer_client_config("g").get("auto.offset.reset"),
            Some("latest")
        );
        assert_eq!(cfg.capabilities().backlog, Backlog::Missed);
        let cfg = KafkaConfig::new("b", "g")
            .with_auto_offset_reset("latest")
            .set("auto.offset.reset", "smallest");
        assert_eq!(cfg.capabilities().backlog, Backlog::Delivered);
    }

    #[test]
    fn max_payload_is_message_max_bytes() {
        for bytes in [1000, 65_536, 5_000_000] {
            let cfg = KafkaConfig::new("b", "g").with_message_max_bytes(bytes);
            assert_eq!(
                cfg.capabilities().max_payload,
                Some(cfg.message_max_bytes())
            );
            assert_eq!(cfg.capabilities().max_payload, Some(bytes));
        }
    }

    #[test]
    fn order_needs_a_producer_whose_retries_cannot_reorder() {
        let ordering = |cfg: KafkaConfig| cfg.capabilities().ordering;
        let plain = KafkaConfig::new("b", "g").with_idempotent_producer(false);
        assert_eq!(ordering(plain.clone()), Ordering::None);
        assert_eq!(
            ordering(plain.clone().with_transactional_id("tx")),
            Ordering::PerKey
        );
        assert_eq!(
            ordering(plain.clone().set("transactional.id", "tx")),
            Ordering::PerKey
        );
        assert_eq!(
            ordering(plain.clone().set("enable.idempotence", "true")),
            Ordering::PerKey
        );
        assert_eq!(
            ordering(plain.clone().set("max.in.flight", "1")),
            Ordering::PerKey
        );
        assert_eq!(
            ordering(
                plain
                    .clone()
                    .set("max.in.flight.requests.per.connection", "5")
            ),
            Ordering::None
        );
        assert_eq!(
            ordering(plain.clone().set("retries", "0")),
            Ordering::PerKey
        );
        assert_eq!(
            ordering(plain.set("message.send.max.retries", "3")),
            Ordering::None
        );
        // Idempotence turned off through the passthrough counts too.
        let off = KafkaConfig::new("b", "g").set("enable.idempotence", "f");
        assert_eq!(
            off.producer_client_config().get("enable.idempotence"),
            Some("f")
        );
        assert_eq!(ordering(off), Ordering::None);
        // Neither idempotence nor transactions make publishing the same event twice store it
        // once.
        for cfg in [
            KafkaConfig::new("b", "g"),
            KafkaConfig::new("b", "g").with_transactional_id("tx"),
        ] {
            assert!(!cfg.capabilities().exactly_once_publish);
        }
    }

    #[test]
    fn groups_are_durable_only_while_the_consumer_commits() {
        let durable = |cfg: KafkaConfig| cfg.capabilities().durable_groups;
        assert!(durable(KafkaConfig::new("b", "g")));
        assert!(!durable(KafkaConfig::new("b", "g").with_auto_commit(false)));
        assert!(!durable(
            KafkaConfig::new("b", "g").set("enable.auto.commit", "false")
        ));
        assert!(durable(
            KafkaConfig::new("b", "g")
                .with_auto_commit(false)
                .set("enable.auto.commit", "True")
        ));
        // Consumer groups, nack and the rest do not depend on the configuration.
        let caps = KafkaConfig::new("b", "g")
            .with_auto_commit(false)
            .capabilities();
        assert!(caps.consumer_groups && caps.redelivery_on_nack && caps.nack_delay);
        assert_eq!(caps.unsettled, Unsettled::RedeliveredFromPosition);
    }

    #[test]
    fn max_in_flight_defaults_to_jetstreams_max_ack_pending() {
        assert_eq!(KafkaConfig::new("b", "g").max_in_flight(), 1000);
        assert_eq!(
            KafkaConfig::new("b", "g")
                .with_max_in_flight(0)
                .max_in_flight(),
            1
        );
        assert_eq!(
            KafkaConfig::new("b", "g")
                .with_max_in_flight(8)
                .max_in_flight(),
            8
        );
    }
}
