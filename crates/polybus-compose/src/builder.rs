//! Building a [`Bus`].

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use polybus_core::{
    BoxConsumer, BoxPublisher, DEFAULT_SOURCE, Error, ErrorKind, MemoryBroker, Publisher,
    PublisherExt, Result,
};

use polybus_jetstream::{JetStream, JsOptions, StreamPolicy};
use polybus_kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
use polybus_nats::NatsConsumer;

use crate::BACKEND;
use crate::RetryPolicy;
use crate::bus::Bus;
use crate::consume::{ConsumerFactory, ConsumerSpec};
use crate::dedup::{DedupKey, DedupStore, MemoryDedupStore};
use crate::dlq::DeadLetterTopic;
use crate::nats_kv::{KvDedupStore, KvSwitchSource};
use crate::spool::{SpoolConfig, WhenFull};
use crate::switches::{SwitchHandle, SwitchSource, Switches};
use crate::topic_map::TopicMap;

/// The spool directory used when none is set.
pub const DEFAULT_SPOOL_DIR: &str = "polybus-spool";

/// Builds a [`Bus`]. Every setting has a default; only the two brokers must be given (by URL,
/// or as publishers).
///
/// ```
/// use std::time::Duration;
/// use polybus_compose::{Bus, RetryPolicy, TopicMap, WhenFull};
/// use polybus_core::MemoryBroker;
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let (nats, kafka) = (MemoryBroker::new(), MemoryBroker::new());
/// let bus = Bus::builder()
///     .memory(&nats, &kafka) // in-process brokers; `.nats(url).kafka(brokers)` for real ones
///     .spool_dir(dir.path())
///     .spool_capacity(10_000)
///     .when_full(WhenFull::Reject)
///     .retry(RetryPolicy::default().max_attempts(3))
///     .topic_map(TopicMap::new().separator('-'))
///     .drain_timeout(Duration::from_secs(5))
///     .build()
///     .await?;
/// let receipt = bus.publish("orders.created", b"{}").await?;
/// assert_eq!(receipt.kafka_topic(), "orders-created");
/// bus.close().await?;
/// # Ok(()) }
/// ```
#[must_use = "call .build().await to start the bus"]
pub struct BusBuilder {
    nats_options: Option<JsOptions>,
    kafka_config: Option<KafkaConfig>,
    switch_bucket: Option<String>,
    dedup_bucket: Option<(String, Duration)>,
    nats: Option<BoxPublisher>,
    kafka: Option<BoxPublisher>,
    parts: Parts,
}

/// Everything but the publishers.
pub(crate) struct Parts {
    pub(crate) spool: SpoolConfig,
    pub(crate) forwarders: u32,
    pub(crate) max_in_flight: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) topics: TopicMap,
    pub(crate) dead_letters: DeadLetterTopic,
    pub(crate) source: Cow<'static, str>,
    pub(crate) switches: SwitchHandle,
    pub(crate) switch_source: Option<Box<dyn SwitchSource>>,
    pub(crate) kafka_consumers: Option<Arc<dyn ConsumerFactory>>,
    pub(crate) nats_consumers: Option<Arc<dyn ConsumerFactory>>,
    pub(crate) dedup: Arc<dyn DedupStore>,
    pub(crate) dedup_by: DedupKey,
    pub(crate) drain_timeout: Duration,
    pub(crate) consume_buffer: usize,
}

impl Default for BusBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The bus's retry policy when [`BusBuilder::retry`] sets none: [`RetryPolicy::default`]
/// (5 attempts, 20 % jitter, the default classification) with 100 ms doubling up to 5 s
/// instead of 200 ms up to 30 s, so that forwarding resumes within 5 s of Kafka coming back
/// from an outage (an outage does not count as an attempt; it is retried at this pace).
///
/// ```
/// use std::time::Duration;
/// use polybus_compose::{RetryPolicy, default_retry};
/// let p = default_retry().jitter(0.0);
/// assert_eq!(p.backoff(1), Duration::from_millis(100));
/// assert_eq!(p.backoff(10), Duration::from_secs(5));
/// assert_eq!(p.attempts_limit(), RetryPolicy::default().attempts_limit());
/// ```
pub fn default_retry() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(100)).max_backoff(Duration::from_secs(5))
}

impl BusBuilder {
    /// A builder with the defaults: spool in `./polybus-spool` (1 000 000 events, `block`
    /// when full), 8 forwarders with 64 forwards in flight each, [`default_retry`] (100 ms
    /// doubling up to 5 s), [`TopicMap::new`], dead letters in `<topic>.dlq`, dual-write
    /// switches, in-memory consumer dedup for 10 minutes, 10 s drain timeout on close.
    pub fn new() -> Self {
        BusBuilder {
            nats_options: None,
            kafka_config: None,
            switch_bucket: None,
            dedup_bucket: None,
            nats: None,
            kafka: None,
            parts: Parts {
                spool: SpoolConfig::new(DEFAULT_SPOOL_DIR),
                forwarders: 8,
                max_in_flight: 64,
                retry: default_retry(),
                topics: TopicMap::new(),
                dead_letters: DeadLetterTopic::default(),
                source: Cow::Borrowed(DEFAULT_SOURCE),
                switches: SwitchHandle::default(),
                switch_source: None,
                kafka_consumers: None,
                nats_consumers: None,
                dedup: Arc::new(MemoryDedupStore::new(Duration::from_secs(600))),
                dedup_by: DedupKey::Id,
                drain_timeout: Duration::from_secs(10),
                consume_buffer: 256,
            },
        }
    }

    /// The NATS server URL (JetStream enabled) for the fast path and notifications. A
    /// subject no stream covers gets a stream of its own on first use (named
    /// `POLYBUS_<subject>_<hash>`, see [`StreamPolicy::PerTopic`]); use
    /// [`nats_options`](Self::nats_options) to manage streams yourself.
    pub fn nats(mut self, url: impl Into<String>) -> Self {
        self.nats_options = Some(JsOptions::new(url).stream_policy(StreamPolicy::PerTopic {
            prefix: "POLYBUS_".into(),
        }));
        self
    }

    /// JetStream connection options (credentials, TLS, stream policy and settings).
    pub fn nats_options(mut self, options: JsOptions) -> Self {
        self.nats_options = Some(options);
        self
    }

    /// The Kafka bootstrap servers (`host:port[,host:port]`), with the adapter's defaults
    /// (idempotent producer, topics created on first use, consumer groups starting at the
    /// earliest record).
    pub fn kafka(mut self, brokers: impl Into<String>) -> Self {
        self.kafka_config = Some(KafkaConfig::new(brokers, "polybus-compose"));
        self
    }

    /// The whole Kafka configuration (SASL, TLS, librdkafka passthrough). Its group id is
    /// replaced by the group each read-path call names.
    pub fn kafka_config(mut self, config: KafkaConfig) -> Self {
        self.kafka_config = Some(config);
        self
    }

    /// Watches the NATS KV bucket `bucket` for the switches (see [`KvSwitchSource`]); needs
    /// [`nats`](Self::nats) or [`nats_options`](Self::nats_options).
    pub fn switch_bucket(mut self, bucket: impl Into<String>) -> Self {
        self.switch_bucket = Some(bucket.into());
        self
    }

    /// Keeps the consumer-side dedup keys in the NATS KV bucket `bucket` for `ttl`, shared by
    /// every process using that bucket (see [`KvDedupStore`]); needs
    /// [`nats`](Self::nats) or [`nats_options`](Self::nats_options).
    pub fn dedup_bucket(mut self, bucket: impl Into<String>, ttl: Duration) -> Self {
        self.dedup_bucket = Some((bucket.into(), ttl));
        self
    }

    /// Uses `publisher` for the fast path instead of connecting to [`nats`](Self::nats)
    /// (which, if also set, still provides notifications and KV buckets).
    pub fn nats_publisher(mut self, publisher: impl Publisher + 'static) -> Self {
        self.nats = Some(publisher.boxed());
        self
    }

    /// Uses `publisher` for Kafka instead of connecting to [`kafka`](Self::kafka) (which, if
    /// also set, still provides the read path's consumers).
    pub fn kafka_publisher(mut self, publisher: impl Publisher + 'static) -> Self {
        self.kafka = Some(publisher.boxed());
        self
    }

    /// Where [`Bus::consume`], [`Bus::replay`] and [`Bus::redrive`] get Kafka consumers.
    pub fn kafka_consumers(mut self, factory: impl ConsumerFactory) -> Self {
        self.parts.kafka_consumers = Some(Arc::new(factory));
        self
    }

    /// Where [`Bus::notifications`] gets NATS subscribers.
    pub fn nats_consumers(mut self, factory: impl ConsumerFactory) -> Self {
        self.parts.nats_consumers = Some(Arc::new(factory));
        self
    }

    /// Runs the bus over two in-process brokers: `nats` plays NATS, `kafka` plays Kafka
    /// (publishers and consumer factories for both). For tests and demos.
    pub fn memory(self, nats: &MemoryBroker, kafka: &MemoryBroker) -> Self {
        let (n, k) = (nats.clone(), kafka.clone());
        self.nats_publisher(nats.publisher())
            .kafka_publisher(kafka.publisher())
            .nats_consumers(move |spec: ConsumerSpec| memory_consumer(n.clone(), spec))
            .kafka_consumers(move |spec: ConsumerSpec| memory_consumer(k.clone(), spec))
    }

    /// The spool directory (created if missing). Default `./polybus-spool`.
    pub fn spool_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        let old = std::mem::replace(&mut self.parts.spool, SpoolConfig::new(""));
        self.parts.spool = SpoolConfig::new(dir)
            .capacity(old.capacity_limit())
            .when_full(old.full_policy())
            .forwarded_ttl(old.forwarded_ttl_value());
        self
    }

    /// The whole spool configuration.
    pub fn spool(mut self, config: SpoolConfig) -> Self {
        self.parts.spool = config;
        self
    }

    /// The most events the spool holds (default 1 000 000).
    pub fn spool_capacity(mut self, events: u64) -> Self {
        self.parts.spool = self.parts.spool.capacity(events);
        self
    }

    /// What a publish does when the spool is full (default [`WhenFull::Block`]).
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.parts.spool = self.parts.spool.when_full(policy);
        self
    }

    /// Forwarder tasks (spool buckets; events with one key always share a bucket). Default 8.
    pub fn forwarders(mut self, n: u32) -> Self {
        self.parts.forwarders = n.clamp(1, 1024);
        self
    }

    /// Forwards one forwarder keeps in flight (default 64). 1 gives strict per-key order even
    /// with a downstream that reorders concurrent writes.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.parts.max_in_flight = n.max(1);
        self
    }

    /// Retry and dead-letter policy of the forwarders (default: [`default_retry`]).
    ///
    /// A policy built from [`RetryPolicy::default`] has the runtime's backoff (200 ms doubling
    /// up to 30 s) unless it sets its own: [`default_retry`] is the bus's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.parts.retry = policy;
        self
    }

    /// Subject → Kafka topic mapping.
    pub fn topic_map(mut self, map: TopicMap) -> Self {
        self.parts.topics = map;
        self
    }

    /// Dead-letter topic naming.
    pub fn dead_letter_topic(mut self, naming: DeadLetterTopic) -> Self {
        self.parts.dead_letters = naming;
        self
    }

    /// The CloudEvents `source` given to events that have none (default `urn:polybus`).
    pub fn source(mut self, source: impl Into<Cow<'static, str>>) -> Self {
        self.parts.source = source.into();
        self
    }

    /// The initial switches.
    pub fn initial_switches(self, switches: Switches) -> Self {
        self.parts.switches.set(switches);
        self
    }

    /// Shares `handle` with the bus: flipping it flips the bus.
    pub fn switches(mut self, handle: SwitchHandle) -> Self {
        self.parts.switches = handle;
        self
    }

    /// Feeds the switches from `source` (e.g. a NATS KV bucket), started with the bus.
    pub fn switch_source(mut self, source: impl SwitchSource) -> Self {
        self.parts.switch_source = Some(Box::new(source));
        self
    }

    /// The consumer-side dedup store (default: in memory, 10 minutes).
    pub fn dedup_store(mut self, store: impl DedupStore) -> Self {
        self.parts.dedup = Arc::new(store);
        self
    }

    /// What identifies an event for consumer-side dedup (default `source` + `id`).
    pub fn dedup_by(mut self, key: DedupKey) -> Self {
        self.parts.dedup_by = key;
        self
    }

    /// How long [`Bus::close`] keeps forwarding what the spool holds (default 10 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.parts.drain_timeout = timeout;
        self
    }

    /// Deliveries a subscription buffers ahead of the caller (default 256; at least 1, at most
    /// [`tokio::sync::Semaphore::MAX_PERMITS`], the bound of a channel).
    pub fn consume_buffer(mut self, n: usize) -> Self {
        self.parts.consume_buffer = n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// Opens the spool, starts the forwarders (which first forward what an earlier run left in
    /// the spool) and returns the bus.
    ///
    /// # Errors
    /// Missing brokers, connection errors, or a spool that cannot be opened
    /// ([`ErrorKind::Rejected`] if another process has it open).
    pub async fn build(self) -> Result<Bus> {
        let BusBuilder {
            nats_options,
            kafka_config,
            switch_bucket,
            dedup_bucket,
            nats,
            kafka,
            mut parts,
        } = self;
        let wants_kv = switch_bucket.is_some() || dedup_bucket.is_some();
        let wants_nats_reader = parts.nats_consumers.is_none();
        let js = match nats_options {
            Some(opts) if nats.is_none() || wants_kv || wants_nats_reader => {
                Some(JetStream::connect(opts.source(parts.source.clone())).await?)
            }
            _ => None,
        };
        if wants_kv && js.is_none() {
            return Err(missing(
                "NATS options (.nats(url)) for the switch or dedup bucket",
            ));
        }
        if let (Some(js), true) = (&js, wants_nats_reader) {
            let conn = js.connection().clone();
            parts.nats_consumers = Some(Arc::new(move |_spec: ConsumerSpec| {
                let conn = conn.clone();
                async move { Ok(BoxConsumer::new(NatsConsumer::from_connection(conn))) }
            }));
        }
        let nats = match (nats, &js) {
            (Some(p), _) => p,
            (None, Some(js)) => js.producer().boxed(),
            (None, None) => return Err(missing("NATS: call .nats(url) or .nats_publisher(p)")),
        };
        let kafka_config = kafka_config.map(|cfg| cfg.with_source(parts.source.clone()));
        if let (Some(cfg), None) = (&kafka_config, &parts.kafka_consumers) {
            let cfg = cfg.clone();
            parts.kafka_consumers = Some(Arc::new(move |spec: ConsumerSpec| {
                let cfg = cfg.clone();
                async move { kafka_consumer(&cfg, spec) }
            }));
        }
        let kafka = match (kafka, kafka_config) {
            (Some(p), _) => p,
            (None, Some(cfg)) => KafkaProducer::new_with_config(&cfg)?.boxed(),
            (None, None) => {
                return Err(missing(
                    "Kafka: call .kafka(brokers) or .kafka_publisher(p)",
                ));
            }
        };
        if let (Some(bucket), Some(js)) = (switch_bucket, &js) {
            parts.switch_source = Some(Box::new(KvSwitchSource::open(js, &bucket).await?));
        }
        if let (Some((bucket, ttl)), Some(js)) = (dedup_bucket, &js) {
            parts.dedup = Arc::new(KvDedupStore::open(js, &bucket, ttl).await?);
        }
        Bus::start(nats, kafka, parts).await
    }

    /// Like [`build`](Self::build) with statically typed publishers: `nats` for the fast path,
    /// `kafka` for the backbone (URLs and boxed publishers set on the builder are ignored).
    ///
    /// # Errors
    /// A spool that cannot be opened.
    pub async fn build_with<F, K>(self, nats: F, kafka: K) -> Result<Bus<F, K>>
    where
        F: Publisher + 'static,
        K: Publisher + 'static,
    {
        Bus::start(nats, kafka, self.parts).await
    }
}

impl fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusBuilder")
            .field("nats", &self.nats_options)
            .field("kafka", &self.kafka_config)
            .field("switch_bucket", &self.switch_bucket)
            .field("dedup_bucket", &self.dedup_bucket)
            .field("spool", &self.parts.spool)
            .field("forwarders", &self.parts.forwarders)
            .field("max_in_flight", &self.parts.max_in_flight)
            .field("retry", &self.parts.retry)
            .field("topics", &self.parts.topics)
            .field("dead_letters", &self.parts.dead_letters)
            .field("switches", &self.parts.switches)
            .finish_non_exhaustive()
    }
}

async fn memory_consumer(broker: MemoryBroker, spec: ConsumerSpec) -> Result<BoxConsumer> {
    Ok(BoxConsumer::new(match spec.group {
        Some(g) => broker.consumer_group(g),
        None => broker.consumer(),
    }))
}

fn missing(what: &'static str) -> Error {
    Error::new(ErrorKind::Other, BACKEND).with_message(format!("the bus needs {what}"))
}

/// A Kafka consumer for the read path: the spec's group (a fresh anonymous one without), new
/// groups starting at the earliest retained record.
fn kafka_consumer(cfg: &KafkaConfig, spec: ConsumerSpec) -> Result<BoxConsumer> {
    let cfg = cfg.clone().with_auto_offset_reset("earliest");
    let consumer = match spec.group {
        Some(g) => KafkaConsumer::new(&cfg.with_group_id(g))?,
        None => KafkaConsumer::new_anonymous(&cfg)?,
    };
    Ok(BoxConsumer::new(consumer))
}
