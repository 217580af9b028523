//! Helpers the scenarios share: ready subscriptions, bulk publish, bounded receive.

use std::collections::HashSet;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures_util::StreamExt;
use futures_util::stream::Peekable;
use polybus_core::{Consumer, Delivery, Event, Publisher};

use crate::Fixture;

/// A subscription that is known to be active (its stream has been polled and the fixture's
/// settle time has passed).
pub struct Sub<'a, C: Consumer + 'a> {
    stream: Peekable<Pin<Box<C::Stream<'a>>>>,
    timeout: Duration,
    quiet: Duration,
}

impl<C: Consumer> std::fmt::Debug for Sub<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sub")
    }
}

/// Subscribes `consumer` to `topic` and waits until the subscription is live.
pub async fn subscribe<'a, F: Fixture>(
    fixture: &F,
    consumer: &'a F::Consumer,
    topic: &'a str,
) -> Sub<'a, F::Consumer> {
    let mut stream = Box::pin(consumer.subscribe(topic)).peekable();
    // Poll once so the subscription starts, then give the broker its settle time. An item
    // that arrives meanwhile stays in the peek buffer.
    let settle = fixture.subscribe_settle();
    let _ = tokio::time::timeout(settle, Pin::new(&mut stream).peek()).await;
    Sub {
        stream,
        timeout: fixture.receive_timeout(),
        quiet: fixture.quiet_period(),
    }
}

/// Subscribes a new consumer (a member of `group`, if any) to `topic`, runs `body` on the live
/// subscription and then drops both: the member goes away.
pub async fn with_member<F: Fixture, R>(
    fixture: &F,
    group: Option<&str>,
    topic: &str,
    body: impl AsyncFnOnce(&mut Sub<'_, F::Consumer>) -> Result<R>,
) -> Result<R> {
    let consumer = fixture.consumer(group).await?;
    let mut sub = subscribe(fixture, &consumer, topic).await;
    body(&mut sub).await
}

impl<C: Consumer> Sub<'_, C> {
    /// The next delivery within `within`; `Ok(None)` on timeout. A subscription that ends is
    /// an error: no scenario expects its stream to end, and a quiet check must not pass on a
    /// stream that can no longer deliver anything.
    pub async fn next_within(&mut self, within: Duration) -> Result<Option<Delivery>> {
        match tokio::time::timeout(within, self.stream.next()).await {
            Err(_) => Ok(None),
            Ok(None) => bail!("the subscription ended"),
            Ok(Some(item)) => Ok(Some(item.context("subscription yielded an error")?)),
        }
    }

    /// The next delivery within the fixture's receive timeout, or an error naming `what`.
    pub async fn next(&mut self, what: &str) -> Result<Delivery> {
        match self.next_within(self.timeout).await? {
            Some(d) => Ok(d),
            None => bail!(
                "no delivery within {:?} while waiting for {what}",
                self.timeout
            ),
        }
    }

    /// The next raw item (an error stays an error), within the receive timeout.
    pub async fn next_item(&mut self) -> Option<polybus_core::Result<Delivery>> {
        tokio::time::timeout(self.timeout, self.stream.next())
            .await
            .ok()
            .flatten()
    }

    /// Receives and acks until `ids` have all been seen (duplicates tolerated), returning the
    /// events in arrival order without duplicates.
    pub async fn collect_ids(&mut self, ids: &HashSet<String>) -> Result<Vec<Event>> {
        let mut seen = HashSet::new();
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        while !ids.iter().all(|id| seen.contains(id)) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(d) = self.next_within(left).await? else {
                bail!(
                    "received {} of {} expected events within {:?}",
                    ids.iter().filter(|id| seen.contains(*id)).count(),
                    ids.len(),
                    self.timeout
                );
            };
            let ev = d.event().clone();
            d.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            if ids.contains(ev.id()) && seen.insert(ev.id().to_owned()) {
                events.push(ev);
            }
        }
        Ok(events)
    }

    /// Receives and acks until `ids` have all been seen, failing on any event that is not one
    /// of them (an event of another topic or test); duplicates of `ids` are tolerated. Returns
    /// the events in arrival order without duplicates.
    pub async fn collect_exact(&mut self, ids: &HashSet<String>) -> Result<Vec<Event>> {
        let mut seen = HashSet::new();
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        while seen.len() < ids.len() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(d) = self.next_within(left).await? else {
                bail!(
                    "received {} of {} expected events within {:?}",
                    seen.len(),
                    ids.len(),
                    self.timeout
                );
            };
            let ev = d.event().clone();
            d.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            if !ids.contains(ev.id()) {
                bail!("a foreign event arrived: {ev:?}");
            }
            if seen.insert(ev.id().to_owned()) {
                events.push(ev);
            }
        }
        Ok(events)
    }

    /// Receives `n` deliveries (each within the receive timeout, or an error naming `what`)
    /// and nacks each without delay.
    pub async fn nack_next(&mut self, n: usize, what: &str) -> Result<()> {
        for _ in 0..n {
            self.next(what).await?.nack(Duration::ZERO).await?;
        }
        Ok(())
    }

    /// Asserts that nothing arrives during the fixture's quiet period (and that the
    /// subscription is still open).
    pub async fn expect_quiet(&mut self, why: &str) -> Result<()> {
        if let Some(d) = self.next_within(self.quiet).await? {
            bail!("{why}: unexpected delivery of {} ({:?})", d.event().id(), d);
        }
        Ok(())
    }

    /// The fixture's receive timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Publishes `n` events made by `make(i)` to `topic`, one after another, and returns their ids
/// in order.
pub async fn publish_n<P: Publisher>(
    publisher: &P,
    topic: &str,
    n: usize,
    make: impl Fn(usize) -> Event,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let ev = make(i);
        ids.push(ev.id().to_owned());
        publisher
            .publish(topic, ev)
            .await
            .with_context(|| format!("publishing event {i} to {topic}"))?;
    }
    Ok(ids)
}

/// An event whose payload is `"<prefix>-<i>"`.
pub fn numbered(prefix: &str, i: usize) -> Event {
    Event::new(format!("{prefix}-{i}"))
}

/// The set of ids.
pub fn id_set(ids: &[String]) -> HashSet<String> {
    ids.iter().cloned().collect()
}
