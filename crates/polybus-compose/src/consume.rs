//! The read path: where consumers come from, and the owned subscription stream the bus hands
//! out.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_core::Stream;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use polybus_core::{BoxConsumer, Consumer, Delivery, Result};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::dedup::DedupFilter;

/// Where a new consumer starts when its group has no committed position.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// The group's committed position; a new group starts at the earliest retained event.
    #[default]
    Committed,
    /// The earliest retained event (used with a fresh group for replays).
    Earliest,
}

/// What the bus asks a [`ConsumerFactory`] for.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// The consumer group, or `None` for a groupless subscriber (NATS notifications).
    pub group: Option<String>,
    /// Where a group without a committed position starts.
    pub start: Start,
}

impl ConsumerSpec {
    /// A spec for `group` starting at `start`.
    pub fn new(group: Option<String>, start: Start) -> Self {
        ConsumerSpec { group, start }
    }
}

/// Makes consumers for the bus's read path: Kafka consumers for
/// [`Bus::consume`](crate::Bus::consume), [`replay`](crate::Bus::replay) and
/// [`redrive`](crate::Bus::redrive), NATS subscribers for
/// [`notifications`](crate::Bus::notifications).
///
/// Any `Fn(ConsumerSpec) -> impl Future<Output = Result<BoxConsumer>>` is one:
///
/// ```
/// use polybus_compose::{ConsumerFactory, ConsumerSpec};
/// use polybus_core::{BoxConsumer, MemoryBroker};
/// let broker = MemoryBroker::new();
/// let factory = move |spec: ConsumerSpec| {
///     let broker = broker.clone();
///     async move {
///         Ok(BoxConsumer::new(match spec.group {
///             Some(g) => broker.consumer_group(g),
///             None => broker.consumer(),
///         }))
///     }
/// };
/// fn takes(_: impl ConsumerFactory) {}
/// takes(factory);
/// ```
pub trait ConsumerFactory: Send + Sync + 'static {
    /// A new consumer for `spec`.
    fn create(&self, spec: ConsumerSpec) -> BoxFuture<'static, Result<BoxConsumer>>;
}

impl<F, Fut> ConsumerFactory for F
where
    F: Fn(ConsumerSpec) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<BoxConsumer>> + Send + 'static,
{
    fn create(&self, spec: ConsumerSpec) -> BoxFuture<'static, Result<BoxConsumer>> {
        Box::pin(self(spec))
    }
}

/// Where a replay starts.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Every retained event.
    Earliest,
    /// Events whose time (CloudEvents `time`) is at or after this instant.
    Time(SystemTime),
    /// Per partition, events at or after the offset; partitions not listed replay from the
    /// earliest.
    Offsets(Vec<(i32, u64)>),
}

impl ReplayFrom {
    pub(crate) fn keeps(&self, d: &Delivery) -> bool {
        match self {
            ReplayFrom::Earliest => true,
            ReplayFrom::Time(t) => d.event().time() >= *t,
            ReplayFrom::Offsets(offsets) => match d.partition() {
                Some(p) => offsets
                    .iter()
                    .find(|(q, _)| *q == p)
                    .is_none_or(|(_, from)| d.sequence().is_none_or(|s| s >= *from)),
                None => true,
            },
        }
    }
}

/// An owned stream of deliveries from the bus's read path. A background task drives the
/// consumer and hands deliveries over a bounded channel (backpressure: it stops reading while
/// the channel is full). Dropping the subscription stops the task.
///
/// Implements [`Stream`]; [`recv`](Self::recv) is the same without importing `StreamExt`.
pub struct Subscription {
    rx: mpsc::Receiver<Result<Delivery>>,
    task: JoinHandle<()>,
    dedup: Option<Arc<DedupFilter>>,
    checking: Option<BoxFuture<'static, Option<Delivery>>>,
}

impl Subscription {
    /// The next delivery; `None` when the underlying subscription ended.
    pub async fn recv(&mut self) -> Option<Result<Delivery>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(check) = &mut this.checking {
                match check.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(found) => {
                        this.checking = None;
                        match found {
                            Some(d) => return Poll::Ready(Some(Ok(d))),
                            None => continue, // a duplicate, acked and dropped
                        }
                    }
                }
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(d))) => match &this.dedup {
                    Some(filter) => {
                        let filter = filter.clone();
                        this.checking = Some(Box::pin(async move { filter.check(d).await }));
                    }
                    None => return Poll::Ready(Some(Ok(d))),
                },
                other => return other,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("buffered", &self.rx.len())
            .finish_non_exhaustive()
    }
}

/// Spawns the task that owns `consumer` and feeds a [`Subscription`]; returns once the
/// subscription was made and polled once (so a publish after this returns is not missed by
/// a backend that only delivers to live subscriptions). Deliveries `keep` rejects are acked
/// and skipped.
pub(crate) async fn spawn<C: Consumer + 'static>(
    consumer: C,
    topic: String,
    buffer: usize,
    keep: Option<ReplayFrom>,
    dedup: Option<DedupFilter>,
) -> Subscription {
    let (tx, rx) = mpsc::channel(buffer.max(1));
    let (ready_tx, ready_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(consumer.subscribe(&topic));
        let mut first = std::future::poll_fn(|cx| {
            Poll::Ready(match stream.as_mut().poll_next(cx) {
                Poll::Ready(item) => Some(item),
                Poll::Pending => None,
            })
        })
        .await;
        let _ = ready_tx.send(());
        loop {
            let item = match first.take() {
                Some(item) => item,
                None => tokio::select! {
                    _ = tx.closed() => break,
                    item = stream.next() => item,
                },
            };
            let Some(item) = item else { break };
            if let (Ok(d), Some(keep)) = (&item, &keep)
                && !keep.keeps(d)
            {
                if let Ok(d) = item {
                    let _ = d.ack().await;
                }
                continue;
            }
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    let _ = ready_rx.await;
    Subscription {
        rx,
        task,
        dedup: dedup.map(Arc::new),
        checking: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::{Event, NoopAcker};
    use std::time::Duration;

    #[test]
    fn replay_filters() {
        let t0 = SystemTime::now();
        let mut ev = Event::new(b"x");
        ev.set_time(t0 - Duration::from_secs(10));
        let old = Delivery::new(ev, "t", NoopAcker("x"))
            .with_partition(1)
            .with_sequence(5);
        assert!(!ReplayFrom::Time(t0).keeps(&old));
        assert!(ReplayFrom::Time(t0 - Duration::from_secs(20)).keeps(&old));
        assert!(ReplayFrom::Offsets(vec![(1, 5)]).keeps(&old));
        assert!(!ReplayFrom::Offsets(vec![(1, 6)]).keeps(&old));
        assert!(ReplayFrom::Offsets(vec![(0, 99)]).keeps(&old));
        assert!(ReplayFrom::Earliest.keeps(&old));
    }
}
