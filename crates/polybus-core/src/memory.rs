//! The in-memory backend: a broker inside the process, for tests and embedded use.
//!
//! Semantics (its [`Capabilities`]):
//! * every named consumer group gets every event published after the group first subscribed;
//!   members of one group share them (each event goes to one member);
//! * a group keeps its queue while no member is connected (durable within the process);
//!   a subscriber without a group gets a private queue that goes away with its stream;
//! * `nack(delay)` redelivers after `delay`; a delivery dropped unsettled is redelivered at
//!   once; `term` drops it;
//! * each subscription holds at most `max_in_flight` unsettled deliveries;
//! * each queue holds at most `queue_capacity` waiting events: a publish to a full queue waits
//!   (backpressure), it never drops;
//! * nothing survives the process (not persistent).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_core::Stream;

use crate::telemetry::Telemetry;
use crate::traits::MessageConsumer;
use crate::{
    AckFuture, Acker, Backlog, Capabilities, Consumer, Delivery, Error, ErrorKind, Event, Ordering,
    Publisher, Receipt, Result, Unsettled, topic,
};

const BACKEND: &str = "memory";

/// Limits of a [`MemoryBroker`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Largest payload accepted (default 1 MiB, like NATS).
    pub max_payload: usize,
    /// Events a queue holds before publishers wait (default 65 536).
    pub queue_capacity: usize,
    /// Unsettled deliveries one subscription may hold (default 1 024).
    pub max_in_flight: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_payload: 1024 * 1024,
            queue_capacity: 65_536,
            max_in_flight: 1024,
        }
    }
}

impl MemoryConfig {
    /// Sets [`max_payload`](Self::max_payload).
    pub fn max_payload(mut self, v: usize) -> Self {
        self.max_payload = v;
        self
    }
    /// Sets [`queue_capacity`](Self::queue_capacity) (at least 1).
    pub fn queue_capacity(mut self, v: usize) -> Self {
        self.queue_capacity = v.max(1);
        self
    }
    /// Sets [`max_in_flight`](Self::max_in_flight) (at least 1).
    pub fn max_in_flight(mut self, v: usize) -> Self {
        self.max_in_flight = v.max(1);
        self
    }
}

/// A broker in the process. Cheap to clone; clones share the topics.
///
/// ```
/// use futures_util::StreamExt;
/// use polybus_core::{Consumer, MemoryBroker, PublisherExt};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let broker = MemoryBroker::new();
/// let (a, b) = (broker.consumer_group("a"), broker.consumer_group("b"));
/// let (mut sa, mut sb) = (std::pin::pin!(a.subscribe("t")), std::pin::pin!(b.subscribe("t")));
/// broker.publisher().send("t", b"fan-out").await?;
/// // Two groups, each gets the event.
/// sa.next().await.unwrap()?.ack().await?;
/// sb.next().await.unwrap()?.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<BrokerInner>,
}

#[derive(Default)]
struct BrokerInner {
    config: MemoryConfig,
    topics: Mutex<HashMap<String, TopicState>>,
}

#[derive(Default)]
struct TopicState {
    next_offset: u64,
    groups: HashMap<String, Arc<Queue>>,
    private: Vec<Weak<Queue>>,
}

impl MemoryBroker {
    /// The semantics of the in-memory backend.
    pub const CAPABILITIES: Capabilities = Capabilities::NONE
        .with_redelivery_on_nack(true)
        .with_nack_delay(true)
        .with_unsettled(Unsettled::Redelivered)
        .with_consumer_groups(true)
        .with_durable_groups(true)
        .with_ordering(Ordering::PerTopic)
        .with_backlog(Backlog::Missed)
        .with_headers(true);

    /// A broker with default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker with the given limits.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBroker {
            inner: Arc::new(BrokerInner {
                config,
                topics: Mutex::default(),
            }),
        }
    }

    /// A new publisher.
    pub fn publisher(&self) -> MemoryPublisher {
        MemoryPublisher {
            broker: self.clone(),
            closed: Arc::new(AtomicBool::new(false)),
            source: None,
            telemetry: Telemetry::new(BACKEND),
        }
    }

    /// A consumer without a group: each subscription gets its own copy of every event.
    pub fn consumer(&self) -> MemoryConsumer {
        MemoryConsumer {
            broker: self.clone(),
            group: None,
            telemetry: Telemetry::new(BACKEND),
        }
    }

    /// A consumer in group `group`: groups each get every event, members share them.
    pub fn consumer_group(&self, group: impl Into<String>) -> MemoryConsumer {
        MemoryConsumer {
            broker: self.clone(),
            group: Some(group.into()),
            telemetry: Telemetry::new(BACKEND),
        }
    }

    /// The seed's simple consumer (`subscribe` then `next`), without a group.
    pub fn message_consumer(&self) -> MemoryMessageConsumer {
        MemoryMessageConsumer {
            consumer: self.consumer(),
            subscriptions: Vec::new(),
            next_index: 0,
        }
    }

    /// Events waiting (not yet delivered) in `group`'s queue on `topic`.
    pub fn pending(&self, topic: &str, group: &str) -> usize {
        let topics = lock(&self.inner.topics);
        topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map_or(0, |q| lock(&q.state).ready.len())
    }

    fn subscribe_queue(&self, topic: &str, group: Option<&str>) -> Arc<Queue> {
        let mut topics = lock(&self.inner.topics);
        let state = topics.entry(topic.to_owned()).or_default();
        match group {
            Some(g) => state
                .groups
                .entry(g.to_owned())
                .or_insert_with(Queue::new)
                .clone(),
            None => {
                let q = Queue::new();
                state.private.retain(|w| w.strong_count() > 0);
                state.private.push(Arc::downgrade(&q));
                q
            }
        }
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.inner.config)
            .field("topics", &lock(&self.inner.topics).len())
            .finish()
    }
}

/// Publishes into a [`MemoryBroker`]. Clones share the closed state.
#[derive(Clone, Debug)]
pub struct MemoryPublisher {
    broker: MemoryBroker,
    closed: Arc<AtomicBool>,
    source: Option<Cow<'static, str>>,
    telemetry: Telemetry,
}

impl MemoryPublisher {
    /// Sets the source given to events that have none.
    pub fn with_source(mut self, source: impl Into<Cow<'static, str>>) -> Self {
        self.source = Some(source.into());
        self
    }

    async fn publish_inner(&self, topic: &str, mut event: Event) -> Result<Receipt> {
        let scope = self.telemetry.publish(topic, &mut event);
        scope.run(self.publish_traced(topic, event)).await
    }

    async fn publish_traced(&self, topic: &str, mut event: Event) -> Result<Receipt> {
        if self.closed.load(AtomicOrdering::Acquire) {
            return Err(Error::closed(BACKEND).with_message("publisher is closed"));
        }
        topic::validate_name(topic, BACKEND, 255)?;
        let max = self.broker.inner.config.max_payload;
        if event.data().len() > max {
            return Err(
                Error::new(ErrorKind::PayloadTooLarge, BACKEND).with_message(format!(
                    "payload is {} bytes, the limit is {max}",
                    event.data().len()
                )),
            );
        }
        event.validate()?;
        if let Some(src) = &self.source {
            event.set_source_if_unset(src);
        }
        let (offset, queues) = {
            let mut topics = lock(&self.broker.inner.topics);
            let state = topics.entry(topic.to_owned()).or_default();
            let offset = state.next_offset;
            state.next_offset += 1;
            state.private.retain(|w| w.strong_count() > 0);
            let mut queues: Vec<Arc<Queue>> = state.groups.values().cloned().collect();
            queues.extend(state.private.iter().filter_map(Weak::upgrade));
            (offset, queues)
        };
        let capacity = self.broker.inner.config.queue_capacity;
        for q in queues {
            let pending = Pending {
                event: event.clone(),
                topic: topic.to_owned(),
                offset,
                attempt: 1,
            };
            q.push(pending, capacity).await;
        }
        Ok(Receipt::new(topic).with_sequence(offset))
    }
}

impl Publisher for MemoryPublisher {
    fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send {
        self.publish_inner(topic, event)
    }
    async fn flush(&self) -> Result<()> {
        // Publishing is synchronous with the queues; nothing is buffered.
        Ok(())
    }
    async fn close(&self) -> Result<()> {
        self.closed.store(true, AtomicOrdering::Release);
        Ok(())
    }
}

/// Consumes from a [`MemoryBroker`], optionally in a consumer group.
#[derive(Clone, Debug)]
pub struct MemoryConsumer {
    broker: MemoryBroker,
    group: Option<String>,
    telemetry: Telemetry,
}

impl Consumer for MemoryConsumer {
    type Stream<'a> = MemorySubscription;

    fn subscribe<'a>(&'a self, topic: &'a str) -> MemorySubscription {
        let error = topic::validate_name(topic, BACKEND, 255).err();
        let queue = self.broker.subscribe_queue(topic, self.group.as_deref());
        MemorySubscription {
            queue,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: self.broker.inner.config.max_in_flight,
            error,
            failed: false,
            telemetry: self.telemetry.clone(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        MemoryBroker::CAPABILITIES.with_max_payload(Some(self.broker.inner.config.max_payload))
    }
}

/// The stream of one in-memory subscription. Owns its queue, so it is `'static`.
pub struct MemorySubscription {
    queue: Arc<Queue>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    error: Option<Error>,
    failed: bool,
    telemetry: Telemetry,
}

impl fmt::Debug for MemorySubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscription")
            .field("in_flight", &self.in_flight.load(AtomicOrdering::Relaxed))
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

impl Stream for MemorySubscription {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            this.failed = true;
            return Poll::Ready(Some(Err(e)));
        }
        if this.failed {
            return Poll::Ready(None);
        }
        let mut state = lock(&this.queue.state);
        if this.in_flight.load(AtomicOrdering::Acquire) < this.max_in_flight
            && let Some(p) = state.ready.pop_front()
        {
            wake_all(&mut state.space_waiters);
            drop(state);
            this.in_flight.fetch_add(1, AtomicOrdering::AcqRel);
            let (event, topic, offset, attempt) = (
                p.event.clone(),
                Arc::<str>::from(p.topic.as_str()),
                p.offset,
                p.attempt,
            );
            let acker = MemoryAcker {
                queue: this.queue.clone(),
                in_flight: this.in_flight.clone(),
                pending: Some(p),
            };
            let delivery = Delivery::new(event, topic, acker)
                .with_sequence(offset)
                .with_delivery_count(attempt);
            return Poll::Ready(Some(Ok(this.telemetry.delivered(delivery))));
        }
        if !state.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            state.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The seed's simple consumer over a [`MemoryBroker`]: `subscribe` topics, then `next`.
#[derive(Debug)]
pub struct MemoryMessageConsumer {
    consumer: MemoryConsumer,
    subscriptions: Vec<MemorySubscription>,
    next_index: usize,
}

impl MessageConsumer for MemoryMessageConsumer {
    async fn subscribe(&mut self, topic: &str) -> Result<()> {
        topic::validate_name(topic, BACKEND, 255)?;
        let sub = self.consumer.subscribe(topic);
        self.subscriptions.push(sub);
        Ok(())
    }

    fn next(&mut self) -> impl Future<Output = Result<Delivery>> + Send {
        std::future::poll_fn(move |cx| {
            if self.subscriptions.is_empty() {
                return Poll::Ready(Err(Error::closed(BACKEND).with_message("no subscription")));
            }
            // Round-robin over the subscriptions so one busy topic cannot starve the others.
            let n = self.subscriptions.len();
            for i in 0..n {
                let idx = (self.next_index + i) % n;
                if let Poll::Ready(Some(item)) =
                    Pin::new(&mut self.subscriptions[idx]).poll_next(cx)
                {
                    self.next_index = idx + 1;
                    return Poll::Ready(item);
                }
            }
            Poll::Pending
        })
    }
}

struct Pending {
    event: Event,
    topic: String,
    offset: u64,
    attempt: u32,
}

struct Queue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Pending>,
    waiters: Vec<Waker>,
    space_waiters: Vec<Waker>,
}

impl Queue {
    fn new() -> Arc<Queue> {
        Arc::new(Queue {
            state: Mutex::default(),
        })
    }

    async fn push(&self, pending: Pending, capacity: usize) {
        let mut slot = Some(pending);
        std::future::poll_fn(|cx| {
            let mut state = lock(&self.state);
            if state.ready.len() >= capacity {
                state.space_waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            if let Some(p) = slot.take() {
                state.ready.push_back(p);
            }
            wake_all(&mut state.waiters);
            Poll::Ready(())
        })
        .await
    }

    fn requeue_front(&self, pending: Pending) {
        let mut state = lock(&self.state);
        state.ready.push_front(pending);
        wake_all(&mut state.waiters);
    }

    fn wake(&self) {
        wake_all(&mut lock(&self.state).waiters);
    }
}

struct MemoryAcker {
    queue: Arc<Queue>,
    in_flight: Arc<AtomicUsize>,
    pending: Option<Pending>,
}

impl MemoryAcker {
    fn settle(&mut self) -> Option<Pending> {
        let p = self.pending.take()?;
        self.in_flight.fetch_sub(1, AtomicOrdering::AcqRel);
        Some(p)
    }

    fn redeliver(&mut self, delay: Duration) {
        let Some(mut p) = self.settle() else { return };
        p.attempt = p.attempt.saturating_add(1);
        let queue = self.queue.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if !delay.is_zero() => {
                handle.spawn(async move {
                    tokio::time::sleep(delay).await;
                    queue.requeue_front(p);
                });
            }
            _ => queue.requeue_front(p),
        }
    }
}

impl Acker for MemoryAcker {
    fn backend(&self) -> &'static str {
        BACKEND
    }
    fn ack(&mut self) -> AckFuture<'_> {
        if self.settle().is_some() {
            self.queue.wake();
        }
        AckFuture::ready(Ok(()))
    }
    fn nack(&mut self, delay: Duration) -> AckFuture<'_> {
        self.redeliver(delay);
        AckFuture::ready(Ok(()))
    }
    fn term(&mut self) -> AckFuture<'_> {
        if self.settle().is_some() {
            self.queue.wake();
        }
        AckFuture::ready(Ok(()))
    }
    fn in_progress(&mut self) -> AckFuture<'_> {
        // There is no ack deadline in memory: nothing to extend, and nothing is redelivered.
        AckFuture::ready(Ok(()))
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // An unsettled delivery comes back at once.
        self.redeliver(Duration::ZERO);
    }
}

fn wake_all(wakers: &mut Vec<Waker>) {
    for w in wakers.drain(..) {
        w.wake();
    }
}

/// Locks a mutex, recovering from poisoning: the data here stays consistent because every
/// critical section is a few non-panicking container operations.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
