//! Test doubles and helpers for the engine tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures_util::StreamExt;
use polybus_compose::{Bus, BusBuilder, RetryPolicy, Subscription};
use polybus_core::{
    Consumer, Error, ErrorKind, Event, MemoryBroker, MemoryPublisher, Publisher, Receipt,
};

/// A publisher wrapper that can be "down" (every publish fails with `Connect` after a short
/// delay, like a producer timing out) and that rejects events carrying the header `poison`.
#[derive(Clone)]
pub(crate) struct Flaky<P> {
    inner: P,
    pub(crate) down: Arc<AtomicBool>,
    pub(crate) reject_poison: Arc<AtomicBool>,
    pub(crate) attempts: Arc<AtomicU64>,
    pub(crate) delay: Duration,
}

impl<P> Flaky<P> {
    pub(crate) fn new(inner: P) -> Self {
        Flaky {
            inner,
            down: Arc::new(AtomicBool::new(false)),
            reject_poison: Arc::new(AtomicBool::new(true)),
            attempts: Arc::new(AtomicU64::new(0)),
            delay: Duration::ZERO,
        }
    }
    /// A new wrapper around `inner` sharing this one's switches and counters (a bus closes
    /// its publishers, so each bus gets its own).
    pub(crate) fn fresh<Q>(&self, inner: Q) -> Flaky<Q> {
        Flaky {
            inner,
            down: self.down.clone(),
            reject_poison: self.reject_poison.clone(),
            attempts: self.attempts.clone(),
            delay: self.delay,
        }
    }
    pub(crate) fn with_delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl<P: Publisher> Publisher for Flaky<P> {
    async fn publish(&self, topic: &str, event: Event) -> polybus_core::Result<Receipt> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.down.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(2)).await;
            return Err(Error::new(ErrorKind::Connect, "kafka").with_message("broker down"));
        }
        if self.reject_poison.load(Ordering::SeqCst)
            && event.headers().contains("poison")
            && !topic.ends_with(".dlq")
        {
            return Err(Error::new(ErrorKind::Rejected, "kafka").with_message("poison record"));
        }
        self.inner.publish(topic, event).await
    }
    async fn flush(&self) -> polybus_core::Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> polybus_core::Result<()> {
        self.inner.close().await
    }
}

/// Two in-process brokers standing in for NATS and Kafka.
pub(crate) struct Env {
    pub(crate) nats: MemoryBroker,
    pub(crate) kafka: MemoryBroker,
    pub(crate) kafka_pub: Flaky<MemoryPublisher>,
    pub(crate) dir: tempfile::TempDir,
}

impl Env {
    pub(crate) fn new() -> Self {
        let kafka = MemoryBroker::new();
        Env {
            nats: MemoryBroker::new(),
            kafka_pub: Flaky::new(kafka.publisher()),
            kafka,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A builder over these brokers and this spool, with fast retries.
    pub(crate) fn builder(&self) -> BusBuilder {
        Bus::builder()
            .memory(&self.nats, &self.kafka)
            .kafka_publisher(self.kafka_pub.fresh(self.kafka.publisher()))
            .spool_dir(self.dir.path())
            .forwarders(4)
            .retry(
                RetryPolicy::default()
                    .max_attempts(3)
                    .initial_backoff(Duration::from_millis(5))
                    .max_backoff(Duration::from_millis(50)),
            )
            .drain_timeout(Duration::from_secs(2))
    }

    pub(crate) async fn bus(&self) -> Bus {
        self.builder().build().await.expect("bus starts")
    }

    /// Makes the in-memory Kafka keep `topic` for `group` from now on (a memory group only
    /// sees events published after it first subscribed).
    pub(crate) fn track(&self, topic: &str, group: &str) {
        let c = self.kafka.consumer_group(group);
        drop(c.subscribe(topic));
    }

    /// Reads `topic` as `group` until `n` events arrived or nothing came for 500 ms; acks them.
    pub(crate) async fn drain_kafka(
        &self,
        topic: &str,
        group: &str,
        n: usize,
    ) -> Result<Vec<Event>> {
        let c = self.kafka.consumer_group(group);
        let mut s = std::pin::pin!(c.subscribe(topic));
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(Duration::from_millis(500), s.next()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(d)) => {
                    let d = d?;
                    out.push(d.event().clone());
                    d.ack().await?;
                }
            }
        }
        Ok(out)
    }
}

/// Events with ids `{prefix}-{i}`, keys `k{i % keys}` and a `seq` header.
pub(crate) fn keyed(prefix: &str, i: usize, keys: usize) -> Event {
    Event::builder()
        .id(format!("{prefix}-{i}"))
        .key(format!("k{}", i % keys))
        .header("seq", i.to_string())
        .data(format!("payload {i}"))
        .build()
        .expect("valid event")
}

/// Asserts every id appears exactly once and per-key order follows `seq`.
pub(crate) fn check_exactly_once_in_order(events: &[Event], want: &HashSet<String>) -> Result<()> {
    let mut seen = HashSet::new();
    for e in events {
        if !seen.insert(e.id().to_owned()) {
            bail!("duplicate {}", e.id());
        }
    }
    let missing: Vec<_> = want.difference(&seen).take(5).collect();
    if !missing.is_empty() {
        bail!(
            "{} missing, e.g. {missing:?}",
            want.len() - want.intersection(&seen).count()
        );
    }
    let mut last: HashMap<Vec<u8>, usize> = HashMap::new();
    for e in events {
        let key = e.key().unwrap_or_default().to_vec();
        let seq: usize = e.headers().get("seq").context("seq header")?.parse()?;
        if let Some(prev) = last.insert(key.clone(), seq)
            && prev > seq
        {
            bail!(
                "order broken for key {}: {prev} before {seq}",
                String::from_utf8_lossy(&key)
            );
        }
    }
    Ok(())
}

/// The next delivery of a subscription within `d`.
pub(crate) async fn next_within(
    s: &mut Subscription,
    d: Duration,
) -> Option<polybus_core::Delivery> {
    match tokio::time::timeout(d, s.recv()).await {
        Ok(Some(Ok(d))) => Some(d),
        _ => None,
    }
}
