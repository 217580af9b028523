//! Consumer-side dedup: drop deliveries of events this consumer group already processed.
//!
//! The key is the event's `source` + `id` ([`Event::dedup_key`]), or a business key and
//! version you extract ([`DedupKey::versioned`]): then a delivery is a duplicate when a version
//! at least as new was processed (upsert semantics: version 3 after version 5 is dropped).
//!
//! A key is recorded only when the delivery is **acked**, i.e. after your downstream write
//! succeeded; recording on receipt would turn a crash during processing into a lost event.
//! A duplicate is acked on the broker (so the group moves past it) and not yielded.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use polybus_core::{AckFuture, Acker, Capabilities, Consumer, Delivery, Event, Result};
use tokio::time::Instant;

use crate::metrics as m;
use crate::stats::Counters;

/// Where processed keys are remembered. Implement it for a shared store (the NATS KV one
/// shares dedup across processes); [`MemoryDedupStore`] keeps them in the process.
pub trait DedupStore: Send + Sync + 'static {
    /// The highest version recorded for `key`, if it is still remembered.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>>>;
    /// Records that `version` of `key` was processed (keeping the highest version).
    fn record<'a>(&'a self, key: &'a str, version: u64) -> BoxFuture<'a, Result<()>>;
}

impl<S: DedupStore + ?Sized> DedupStore for Arc<S> {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>>> {
        (**self).get(key)
    }
    fn record<'a>(&'a self, key: &'a str, version: u64) -> BoxFuture<'a, Result<()>> {
        (**self).record(key, version)
    }
}

/// An in-process [`DedupStore`]: keys expire `ttl` after they were recorded, and at most
/// `max_keys` are kept (the oldest go first).
///
/// ```
/// use std::time::Duration;
/// use polybus_compose::{DedupStore, MemoryDedupStore};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> polybus_core::Result<()> {
/// let store = MemoryDedupStore::new(Duration::from_secs(600));
/// assert_eq!(store.get("k").await?, None);
/// store.record("k", 2).await?;
/// store.record("k", 1).await?; // keeps the highest
/// assert_eq!(store.get("k").await?, Some(2));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryDedupStore {
    inner: Arc<Mutex<MemoryInner>>,
    ttl: Duration,
    max_keys: usize,
}

#[derive(Default)]
struct MemoryInner {
    keys: HashMap<String, (u64, Instant)>,
    order: VecDeque<(Instant, String)>,
}

impl MemoryDedupStore {
    /// A store forgetting keys `ttl` after they were recorded, holding at most 1 000 000.
    pub fn new(ttl: Duration) -> Self {
        MemoryDedupStore {
            inner: Arc::default(),
            ttl,
            max_keys: 1_000_000,
        }
    }
    /// Caps the number of keys kept (at least 1).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n.max(1);
        self
    }
    /// Keys currently remembered (expired ones may still count until the next operation).
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }
    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sweep(inner: &mut MemoryInner, now: Instant, max_keys: usize) {
        while let Some((expiry, _)) = inner.order.front() {
            if *expiry > now && inner.keys.len() <= max_keys {
                break;
            }
            if let Some((expiry, key)) = inner.order.pop_front() {
                // Remove only if this queue entry is the key's current one.
                if inner.keys.get(&key).is_some_and(|(_, e)| *e == expiry) {
                    inner.keys.remove(&key);
                }
            }
        }
    }
}

impl fmt::Debug for MemoryDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDedupStore")
            .field("ttl", &self.ttl)
            .field("max_keys", &self.max_keys)
            .field("len", &self.len())
            .finish()
    }
}

impl DedupStore for MemoryDedupStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>>> {
        let now = Instant::now();
        let mut inner = self.lock();
        Self::sweep(&mut inner, now, self.max_keys);
        let hit = inner
            .keys
            .get(key)
            .filter(|(_, expiry)| *expiry > now)
            .map(|(v, _)| *v);
        Box::pin(std::future::ready(Ok(hit)))
    }

    fn record<'a>(&'a self, key: &'a str, version: u64) -> BoxFuture<'a, Result<()>> {
        let expiry = polybus_core::time::deadline_after(self.ttl);
        let now = Instant::now();
        let mut inner = self.lock();
        let version = inner
            .keys
            .get(key)
            .filter(|(_, e)| *e > now)
            .map_or(version, |(v, _)| (*v).max(version));
        inner.keys.insert(key.to_owned(), (version, expiry));
        inner.order.push_back((expiry, key.to_owned()));
        Self::sweep(&mut inner, now, self.max_keys);
        Box::pin(std::future::ready(Ok(())))
    }
}

type VersionFn = dyn Fn(&Event) -> Option<(String, u64)> + Send + Sync;

/// What identifies an event for dedup.
#[derive(Clone, Default)]
pub enum DedupKey {
    /// `source` + `id` (the CloudEvents rule). The default.
    #[default]
    Id,
    /// A business key and version taken from the event; events for which the function returns
    /// `None` fall back to `source` + `id`.
    Versioned(Arc<VersionFn>),
}

impl DedupKey {
    /// Dedup by a business key and version, e.g. from headers:
    ///
    /// ```
    /// use polybus_compose::DedupKey;
    /// let by = DedupKey::versioned(|ev| {
    ///     let id = ev.headers().get("order-id")?.to_owned();
    ///     let version = ev.headers().get("order-version")?.parse().ok()?;
    ///     Some((id, version))
    /// });
    /// # let _ = by;
    /// ```
    pub fn versioned(f: impl Fn(&Event) -> Option<(String, u64)> + Send + Sync + 'static) -> Self {
        DedupKey::Versioned(Arc::new(f))
    }

    /// The store key and version of `event`.
    pub fn of(&self, event: &Event) -> (String, u64) {
        if let DedupKey::Versioned(f) = self
            && let Some((key, version)) = f(event)
        {
            return (format!("v:{key}"), version);
        }
        (format!("id:{}", event.dedup_key()), 0)
    }
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DedupKey::Id => f.write_str("Id"),
            DedupKey::Versioned(_) => f.write_str("Versioned(..)"),
        }
    }
}

/// A [`Consumer`] wrapper that drops duplicates (see the module docs).
///
/// `scope` (typically the consumer group) prefixes every key, so two groups processing the
/// same events do not hide them from each other.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use futures_util::StreamExt;
/// use polybus_compose::{Dedup, DedupKey, MemoryDedupStore};
/// use polybus_core::{Consumer, Event, MemoryBroker, Publisher};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let broker = MemoryBroker::new();
/// let store = Arc::new(MemoryDedupStore::new(Duration::from_secs(60)));
/// let consumer = Dedup::new(broker.consumer_group("g"), store, DedupKey::Id, "g");
/// let mut stream = std::pin::pin!(consumer.subscribe("t"));
/// let ev = Event::builder().id("once").build()?;
/// let publisher = broker.publisher();
/// publisher.publish("t", ev.clone()).await?;
/// publisher.publish("t", ev).await?;
/// publisher.publish("t", Event::new(b"other")).await?;
/// let first = stream.next().await.unwrap()?;
/// assert_eq!(first.event().id(), "once");
/// first.ack().await?; // recorded now
/// let next = stream.next().await.unwrap()?; // the copy of "once" was skipped
/// assert_eq!(next.payload(), b"other");
/// # Ok(()) }
/// ```
pub struct Dedup<C> {
    inner: C,
    filter: DedupFilter,
}

impl<C> Dedup<C> {
    /// Wraps `inner`.
    pub fn new(
        inner: C,
        store: Arc<dyn DedupStore>,
        by: DedupKey,
        scope: impl Into<String>,
    ) -> Self {
        Dedup {
            inner,
            filter: DedupFilter::new(store, by, scope.into(), None),
        }
    }
    /// The wrapped consumer.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }
    /// Unwraps the consumer.
    pub fn into_inner(self) -> C {
        self.inner
    }
}

impl<C: fmt::Debug> fmt::Debug for Dedup<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .field("by", &self.filter.by)
            .field("scope", &self.filter.scope)
            .finish_non_exhaustive()
    }
}

impl<C: Consumer> Consumer for Dedup<C> {
    type Stream<'a>
        = BoxStream<'a, Result<Delivery>>
    where
        Self: 'a;

    fn subscribe<'a>(&'a self, topic: &'a str) -> Self::Stream<'a> {
        self.inner
            .subscribe(topic)
            .filter_map(move |item| async move {
                match item {
                    Err(e) => Some(Err(e)),
                    Ok(d) => self.filter.check(d).await.map(Ok),
                }
            })
            .boxed()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// The dedup decision, shared by [`Dedup`] and the bus's subscriptions. The check runs when a
/// delivery is handed to the caller (not when it is prefetched), so a copy that arrives while
/// the first is being processed is caught once the first is acked.
#[derive(Clone)]
pub(crate) struct DedupFilter {
    store: Arc<dyn DedupStore>,
    by: DedupKey,
    scope: String,
    counters: Option<Arc<Counters>>,
}

impl DedupFilter {
    pub(crate) fn new(
        store: Arc<dyn DedupStore>,
        by: DedupKey,
        scope: String,
        counters: Option<Arc<Counters>>,
    ) -> Self {
        DedupFilter {
            store,
            by,
            scope,
            counters,
        }
    }

    /// `Some(wrapped delivery)` to yield, `None` for a duplicate (acked here).
    pub(crate) async fn check(&self, d: Delivery) -> Option<Delivery> {
        let (key, version) = self.by.of(d.event());
        let key = format!("{}/{key}", self.scope);
        match self.store.get(&key).await {
            Ok(Some(seen)) if seen >= version => {
                metrics::counter!(m::CONSUME_DEDUP).increment(1);
                if let Some(c) = &self.counters {
                    Counters::add(&c.consume_duplicates, 1);
                }
                tracing::debug!(id = d.event().id(), key, "duplicate delivery dropped");
                if let Err(e) = d.ack().await {
                    tracing::warn!(error = %e, "acking a duplicate failed");
                }
                None
            }
            Ok(_) => Some(wrap(d, self.store.clone(), key, version)),
            Err(e) => {
                // Fail open: a store outage must not stop consumption (at-least-once).
                tracing::warn!(error = %e, "dedup store unavailable; delivering without dedup");
                Some(wrap(d, self.store.clone(), key, version))
            }
        }
    }
}

fn wrap(d: Delivery, store: Arc<dyn DedupStore>, key: String, version: u64) -> Delivery {
    let topic = std::sync::Arc::<str>::from(d.topic());
    let partition = d.partition();
    let sequence = d.sequence();
    let count = d.delivery_count();
    let (event, acker) = d.into_parts();
    let mut out = Delivery::new(
        event,
        topic,
        DedupAcker {
            inner: acker,
            store,
            key,
            version,
            recorded: false,
        },
    )
    .with_delivery_count(count);
    if let Some(p) = partition {
        out = out.with_partition(p);
    }
    if let Some(s) = sequence {
        out = out.with_sequence(s);
    }
    out
}

/// Records the dedup key, then acks on the broker.
struct DedupAcker {
    inner: Box<dyn Acker>,
    store: Arc<dyn DedupStore>,
    key: String,
    version: u64,
    recorded: bool,
}

impl Acker for DedupAcker {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn ack(&mut self) -> AckFuture<'_> {
        AckFuture::Pending(Box::pin(async move {
            if !self.recorded {
                self.store.record(&self.key, self.version).await?;
                self.recorded = true;
            }
            self.inner.ack().await
        }))
    }
    fn nack(&mut self, delay: Duration) -> AckFuture<'_> {
        self.inner.nack(delay)
    }
    fn term(&mut self) -> AckFuture<'_> {
        self.inner.term()
    }
    fn in_progress(&mut self) -> AckFuture<'_> {
        self.inner.in_progress()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::{Error, ErrorKind, MemoryBroker, Publisher};

    #[tokio::test(start_paused = true)]
    async fn memory_store_expires_and_caps() {
        let s = MemoryDedupStore::new(Duration::from_secs(10)).max_keys(2);
        s.record("a", 0).await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        s.record("b", 0).await.unwrap();
        assert_eq!(s.get("a").await.unwrap(), Some(0));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(s.get("a").await.unwrap(), None, "expired");
        assert_eq!(s.get("b").await.unwrap(), Some(0));
        s.record("c", 0).await.unwrap();
        s.record("d", 0).await.unwrap();
        assert_eq!(s.len(), 2, "capped");
        assert_eq!(s.get("b").await.unwrap(), None, "oldest evicted");
        // Re-recording refreshes the expiry.
        s.record("d", 1).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(s.get("d").await.unwrap(), Some(1));
    }

    #[test]
    fn versioned_keys_fall_back_to_the_id() {
        let by = DedupKey::versioned(|ev| {
            Some((
                ev.headers().get("bk")?.to_owned(),
                ev.headers().get("ver")?.parse().ok()?,
            ))
        });
        let ev = Event::builder()
            .id("1")
            .header("bk", "order-9")
            .header("ver", "4")
            .build()
            .unwrap();
        assert_eq!(by.of(&ev), ("v:order-9".into(), 4));
        let plain = Event::builder().id("2").build().unwrap();
        assert_eq!(by.of(&plain), ("id:urn:polybus 2".into(), 0));
    }

    struct FailingStore;
    impl DedupStore for FailingStore {
        fn get<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<u64>>> {
            Box::pin(async { Ok(None) })
        }
        fn record<'a>(&'a self, _: &'a str, _: u64) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { Err(Error::new(ErrorKind::Connect, "kv")) })
        }
    }

    #[tokio::test]
    async fn a_failed_record_fails_the_ack_and_keeps_the_delivery() {
        let broker = MemoryBroker::new();
        let c = Dedup::new(
            broker.consumer_group("g"),
            Arc::new(FailingStore),
            DedupKey::Id,
            "g",
        );
        let mut s = std::pin::pin!(c.subscribe("t"));
        broker
            .publisher()
            .publish("t", Event::new(b"x"))
            .await
            .unwrap();
        let d = s.next().await.unwrap().unwrap();
        let err = d.ack().await.unwrap_err();
        assert_eq!(err.error().kind(), ErrorKind::Connect);
        let d = err.into_delivery();
        assert_eq!(d.payload(), b"x");
    }

    #[tokio::test]
    async fn versions_are_upserts_and_groups_are_separate() {
        let broker = MemoryBroker::new();
        let store: Arc<dyn DedupStore> = Arc::new(MemoryDedupStore::new(Duration::from_secs(60)));
        let by = DedupKey::versioned(|ev| {
            Some(("order".into(), ev.headers().get("ver")?.parse().ok()?))
        });
        let a = Dedup::new(broker.consumer_group("a"), store.clone(), by.clone(), "a");
        let b = Dedup::new(broker.consumer_group("b"), store, by, "b");
        let (mut sa, mut sb) = (
            std::pin::pin!(a.subscribe("t")),
            std::pin::pin!(b.subscribe("t")),
        );
        let p = broker.publisher();
        for ver in ["5", "3", "5", "6"] {
            let ev = Event::builder().header("ver", ver).build().unwrap();
            p.publish("t", ev).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..2 {
            let d = sa.next().await.unwrap().unwrap();
            got.push(d.event().headers().get("ver").unwrap().to_owned());
            d.ack().await.unwrap();
        }
        assert_eq!(got, ["5", "6"], "3 and the second 5 are older or equal");
        // Group b has its own keys: it sees version 5 too.
        let d = sb.next().await.unwrap().unwrap();
        assert_eq!(d.event().headers().get("ver"), Some("5"));
    }
}
