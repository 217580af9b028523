//! `KafkaConsumer`: consumer groups with at-least-once delivery (offsets committed only for
//! what was acknowledged), local nack redelivery, rebalance handling and lag.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::stream::BoxStream;
use polybus_core::{
    AckFuture, Acker, Capabilities, Consumer, Delivery, Error, ErrorKind, Event, MessageConsumer,
    Result,
};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, ConsumerGroupMetadata, Rebalance,
    RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::KafkaConfig;
use crate::admin::{TopicEnsurer, blocking, validate_topic};
use crate::convert;
use crate::error::{BACKEND, closed, from_kafka, kind_of_code};

/// The lag of one assigned partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset the next produced record will get (high watermark).
    pub high_watermark: i64,
    /// The group's committed offset (the next record to process), if any.
    pub committed: Option<i64>,
    /// Records not yet committed by the group: `high_watermark - committed` (or minus the low
    /// watermark when nothing is committed).
    pub lag: i64,
}

// ---------------------------------------------------------------------------------------------
// Offset tracking: per partition, the offsets delivered and not yet settled. The offset stored
// for commit is the lowest unsettled offset (or one past the highest delivered), so an
// unsettled record is never committed past. Every offset in `inflight` belongs to a delivery
// the subscription's `Flight` counts, so the sets together hold at most `max_in_flight`
// offsets; a revoked partition's state is removed whole.

#[derive(Debug)]
struct PartState {
    epoch: u64,
    inflight: BTreeSet<i64>,
    next: i64,
    stored: i64,
}

#[derive(Debug, Default)]
struct Tracker {
    epoch: u64,
    parts: HashMap<(Arc<str>, i32), PartState>,
}

impl Tracker {
    fn fresh(&mut self) -> PartState {
        self.epoch += 1;
        PartState {
            epoch: self.epoch,
            inflight: BTreeSet::new(),
            next: -1,
            stored: -1,
        }
    }

    fn assign(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            let fresh = self.fresh();
            self.parts
                .insert((Arc::from(e.topic()), e.partition()), fresh);
        }
    }

    fn revoke(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            self.parts.remove(&(Arc::from(e.topic()), e.partition()));
        }
    }

    /// Records a delivery; returns the epoch of the partition's assignment.
    fn delivered(&mut self, topic: &Arc<str>, partition: i32, offset: i64) -> u64 {
        let key = (Arc::clone(topic), partition);
        if !self.parts.contains_key(&key) {
            let fresh = self.fresh();
            self.parts.insert(key.clone(), fresh);
        }
        let Some(p) = self.parts.get_mut(&key) else {
            return 0;
        };
        p.inflight.insert(offset);
        p.next = p.next.max(offset + 1);
        p.epoch
    }

    fn is_current(&self, topic: &Arc<str>, partition: i32, epoch: u64) -> bool {
        self.parts
            .get(&(Arc::clone(topic), partition))
            .is_some_and(|p| p.epoch == epoch)
    }

    /// Settles `offset`; returns the new offset to store, if it advanced.
    fn settled(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
        epoch: u64,
    ) -> Option<i64> {
        let p = self.parts.get_mut(&(Arc::clone(topic), partition))?;
        if p.epoch != epoch {
            return None; // revoked since: harmless, the new owner has it
        }
        p.inflight.remove(&offset);
        let point = p.inflight.first().copied().unwrap_or(p.next);
        (point > p.stored).then(|| {
            p.stored = point;
            point
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The librdkafka consumer with a context that follows rebalances.

struct Ctx {
    tracker: Arc<Mutex<Tracker>>,
    flight: Arc<Flight>,
    telemetry: polybus_core::telemetry::Telemetry,
    start: Option<Arc<StartAt>>,
}

/// [`KafkaConfig::with_start_time`]: where newly assigned partitions without a committed
/// offset start, and the error of the last lookup for the reader to yield.
struct StartAt {
    /// Milliseconds since the Unix epoch (Kafka record timestamps).
    millis: i64,
    timeout: Duration,
    error: Mutex<Option<Error>>,
    /// Partitions positioned by time that have not yet delivered a record at or after it:
    /// records before the time are skipped there (settled, not delivered). Kafka answers
    /// the first offset at or after the time, so this skips nothing; tansu 0.6.0 answers
    /// offset 0 when no record is that late (docs/BROKER-NOTES.md), and this keeps the
    /// subscription from replaying the partition then.
    seeking: Mutex<std::collections::HashSet<(String, i32)>>,
}

impl StartAt {
    fn new(time: std::time::SystemTime, timeout: Duration) -> StartAt {
        let millis = match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(_) => 0, // before 1970: every record is after it
        };
        StartAt {
            millis,
            timeout,
            error: Mutex::new(None),
            seeking: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Whether a record of `timestamp` (milliseconds) on a partition positioned by time is
    /// before the start time and so skipped; the first one that is not ends the skipping on
    /// its partition.
    fn skips(&self, topic: &str, partition: i32, timestamp: Option<i64>) -> bool {
        let Ok(mut seeking) = self.seeking.lock() else {
            return false;
        };
        if seeking.is_empty() || !seeking.contains(&(topic.to_owned(), partition)) {
            return false;
        }
        if timestamp.is_some_and(|t| t < self.millis) {
            return true;
        }
        seeking.remove(&(topic.to_owned(), partition));
        false
    }

    /// Sets the offset of every partition of `tpl` the group has no committed offset for to
    /// the first record at or after the start time (the end when there is none).
    fn apply(&self, base: &BaseConsumer<Ctx>, tpl: &mut TopicPartitionList) -> Result<()> {
        if let Ok(mut seeking) = self.seeking.lock() {
            for e in tpl.elements() {
                seeking.remove(&(e.topic().to_owned(), e.partition()));
            }
        }
        let committed = base
            .committed_offsets(tpl.clone(), self.timeout)
            .map_err(|e| start_error(e, "reading committed offsets"))?;
        let mut times = TopicPartitionList::new();
        for e in committed.elements() {
            if !matches!(e.offset(), Offset::Offset(_)) {
                times
                    .add_partition_offset(e.topic(), e.partition(), Offset::Offset(self.millis))
                    .map_err(|e| start_error(e, "listing offsets by time"))?;
            }
        }
        if times.count() == 0 {
            return Ok(());
        }
        let offsets = base
            .offsets_for_times(times, self.timeout)
            .map_err(|e| start_error(e, "listing offsets by time"))?;
        for e in offsets.elements() {
            if let Err(err) = e.error() {
                return Err(start_error(err, "listing offsets by time"));
            }
            // librdkafka answers -1 (End) for a partition without a record that late.
            let offset = match e.offset() {
                Offset::Offset(o) if o >= 0 => Offset::Offset(o),
                _ => Offset::End,
            };
            tpl.set_partition_offset(e.topic(), e.partition(), offset)
                .map_err(|e| start_error(e, "setting the start offsets"))?;
            if let Ok(mut seeking) = self.seeking.lock() {
                seeking.insert((e.topic().to_owned(), e.partition()));
            }
        }
        Ok(())
    }
}

/// An error of the start-time lookup: `Unsupported` when the broker does not know the
/// request (or its version).
fn start_error(e: KafkaError, doing: &str) -> Error {
    use rdkafka::error::RDKafkaErrorCode as C;
    match crate::error::code_of(&e) {
        Some(C::UnsupportedVersion | C::UnsupportedFeature | C::InvalidRequest) => {
            Error::new(ErrorKind::Unsupported, BACKEND).with_message(format!(
                "{doing} for the start time: the broker does not support it ({e})"
            ))
        }
        _ => from_kafka(e, format!("{doing} for the start time")),
    }
}

impl ClientContext for Ctx {
    /// librdkafka's statistics (every `statistics.interval.ms`): the summed consumer lag of
    /// the partitions this member consumes goes to the `polybus_consumer_lag` gauge.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.telemetry
            .instruments()
            .set_consumer_lag(u64::try_from(lag).unwrap_or(0));
    }
}

impl ConsumerContext for Ctx {
    /// rdkafka's default rebalance (pre-rebalance, assign or unassign for the group's
    /// protocol, post-rebalance), with the start time applied to an assignment first.
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign
            && let Some(start) = &self.start
            && let Err(e) = start.apply(base, tpl)
        {
            tracing::warn!(target: "polybus_kafka", "start time: {e}");
            if let Ok(mut slot) = start.error.lock() {
                *slot = Some(e);
            }
            self.flight.changed.notify_one();
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => {
                let code: rdkafka::error::RDKafkaErrorCode = other.into();
                tracing::error!(target: "polybus_kafka", "rebalance error: {code}");
                Rebalance::Error(KafkaError::Rebalance(code))
            }
        };
        self.pre_rebalance(base, &rebalance);
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let done = match (assign, cooperative) {
            (true, true) => base.incremental_assign(tpl),
            (true, false) => base.assign(tpl),
            (false, true) => base.incremental_unassign(tpl),
            (false, false) => base.unassign(),
        };
        if let Err(e) = done {
            tracing::error!(target: "polybus_kafka", "rebalance: {e}");
        }
        self.post_rebalance(base, &rebalance);
    }

    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what was acknowledged before the partitions go to another member. Async:
            // this callback runs on the thread polling the consumer (an async worker), and
            // librdkafka also commits stored offsets on unassign when auto-commit is on.
            if let Err(e) = base.commit_consumer_state(CommitMode::Async) {
                tracing::debug!(target: "polybus_kafka", "commit on revoke: {e}");
            }
            if let Ok(mut t) = self.tracker.lock() {
                t.revoke(tpl);
            }
            // Redeliveries of revoked partitions belong to the next owner now: they stop
            // counting against this member's limit at once, whatever their delay.
            self.flight.forget(tpl);
        }
    }
    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance
            && let Ok(mut t) = self.tracker.lock()
        {
            t.assign(tpl);
        }
    }
}

type Native = StreamConsumer<Ctx>;

/// One librdkafka group member and what settles its deliveries.
struct Core {
    consumer: Option<Native>,
    tracker: Arc<Mutex<Tracker>>,
    /// The subscription's unsettled deliveries (one `Core` per subscription).
    flight: Arc<Flight>,
    topics: Arc<TopicEnsurer>,
    group: String,
    timeout: Duration,
    telemetry: polybus_core::telemetry::Telemetry,
    /// The start time's lookup, shared with the context (which records its errors).
    start: Option<Arc<StartAt>>,
}

impl Core {
    fn new(cfg: &KafkaConfig, group: &str) -> Result<Arc<Core>> {
        cfg.check()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(ErrorKind::Other, BACKEND)
                .with_message("a Kafka consumer must be created inside a tokio runtime"));
        }
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let flight = Flight::new(cfg.max_in_flight());
        let telemetry = polybus_core::telemetry::Telemetry::new(BACKEND);
        let start = cfg
            .start_time()
            .map(|t| Arc::new(StartAt::new(t, cfg.connect_timeout())));
        let consumer: Native = cfg
            .consumer_client_config(group)
            .create_with_context(Ctx {
                tracker: Arc::clone(&tracker),
                flight: Arc::clone(&flight),
                telemetry: telemetry.clone(),
                start: start.clone(),
            })
            .map_err(|e| from_kafka(e, "creating the consumer"))?;
        Ok(Arc::new(Core {
            consumer: Some(consumer),
            tracker,
            flight,
            topics: TopicEnsurer::new(cfg),
            group: group.to_owned(),
            timeout: cfg.connect_timeout(),
            telemetry,
            start,
        }))
    }

    fn native(&self) -> Result<&Native> {
        self.consumer.as_ref().ok_or_else(|| closed("the consumer"))
    }

    fn store(&self, topic: &str, partition: i32, offset: i64) {
        let Ok(c) = self.native() else { return };
        let mut tpl = TopicPartitionList::with_capacity(1);
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_ok()
            && let Err(e) = c.store_offsets(&tpl)
        {
            // Not assigned any more (revoked): harmless, the next owner redelivers.
            tracing::debug!(target: "polybus_kafka", "storing offset {offset} of {topic}/{partition}: {e}");
        }
    }

    async fn subscribe(&self, topics: &[String]) -> Result<()> {
        for t in topics {
            validate_topic(t)?;
        }
        for t in topics {
            self.topics.ensure(t).await?;
        }
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.native()?
            .subscribe(&refs)
            .map_err(|e| from_kafka(e, format!("subscribing to {topics:?}")))
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // Closing commits the stored offsets and leaves the group; it blocks, so it runs on
        // the blocking pool when there is a runtime.
        if let Some(c) = self.consumer.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || drop(c));
                }
                Err(_) => drop(c),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settlement.

/// A delivery waiting for local redelivery (after a nack or a drop).
struct Pending {
    event: Event,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
    count: u32,
}

/// What one subscription has taken from librdkafka and not yet acked or termed: deliveries
/// the application holds plus those waiting for local redelivery. The reader reads no more
/// records while `unsettled` is at `max`, so the redelivery queue (a subset) is bounded by
/// `max` too, and so are the tracker's offset sets. Ackers hold it weakly: once the
/// subscription is gone, the queue goes with it. A revoke drops the waiting redeliveries of
/// the revoked partitions.
struct Flight {
    state: Mutex<FlightState>,
    /// Wakes the reader when a delivery is settled or handed back. A `Notify` keeps at most
    /// one permit, so signals need no queue of their own.
    changed: Notify,
}

struct FlightState {
    max: usize,
    unsettled: usize,
    seq: u64,
    /// Local redeliveries by due time (and arrival, for ties).
    due: BTreeMap<(Instant, u64), Pending>,
}

/// What the reader does next.
#[allow(clippy::large_enum_variant)] // one short-lived value per step, moved once
enum Step {
    /// Deliver this local redelivery now.
    Redeliver(Pending),
    /// Wait for a change, the next redelivery's due time, or (when `read`) a record.
    Wait { wake: Option<Instant>, read: bool },
}

impl Flight {
    fn new(max: usize) -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(FlightState {
                max: max.max(1),
                unsettled: 0,
                seq: 0,
                due: BTreeMap::new(),
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, FlightState> {
        // Nothing here can leave the state half-written, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A record was taken from librdkafka and handed out.
    fn taken(&self) {
        self.lock().unsettled += 1;
    }

    /// A delivery was acked or termed, or a waiting redelivery was dropped.
    fn settled(&self) {
        {
            let mut s = self.lock();
            s.unsettled = s.unsettled.saturating_sub(1);
        }
        self.changed.notify_one();
    }

    /// A delivery was nacked or dropped: it waits for redelivery at `at` (still unsettled).
    fn hand_back(&self, pending: Pending, at: Instant) {
        {
            let mut s = self.lock();
            s.seq = s.seq.wrapping_add(1);
            let seq = s.seq;
            s.due.insert((at, seq), pending);
        }
        self.changed.notify_one();
    }

    /// Drops the waiting redeliveries of the partitions in `revoked`; they no longer count.
    fn forget(&self, revoked: &TopicPartitionList) {
        let gone: Vec<(String, i32)> = revoked
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        self.forget_where(|p| {
            gone.iter()
                .any(|(t, part)| *part == p.partition && **t == *p.topic)
        });
    }

    fn forget_where(&self, revoked: impl Fn(&Pending) -> bool) {
        let forgotten = {
            let mut s = self.lock();
            let before = s.due.len();
            s.due.retain(|_, p| !revoked(p));
            let forgotten = before - s.due.len();
            s.unsettled = s.unsettled.saturating_sub(forgotten);
            forgotten
        };
        if forgotten > 0 {
            self.changed.notify_one();
        }
    }

    fn step(&self, now: Instant) -> Step {
        let mut s = self.lock();
        if let Some(entry) = s.due.first_entry()
            && entry.key().0 <= now
        {
            return Step::Redeliver(entry.remove());
        }
        Step::Wait {
            wake: s.due.first_key_value().map(|(k, _)| k.0),
            read: s.unsettled < s.max,
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.unsettled, s.due.len())
    }
}

/// Settles `offset` in the tracker and stores the offset that is now safe to commit.
fn settle_offset(core: &Core, topic: &Arc<str>, partition: i32, offset: i64, epoch: u64) {
    let point = core
        .tracker
        .lock()
        .ok()
        .and_then(|mut t| t.settled(topic, partition, offset, epoch));
    if let Some(p) = point {
        core.store(topic, partition, p);
    }
}

struct KafkaAcker {
    core: Weak<Core>,
    flight: Weak<Flight>,
    /// The event while the delivery is unsettled; `None` once acked, termed or handed back
    /// (later calls are no-ops).
    event: Option<Event>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
    count: u32,
}

fn subscription_gone() -> Error {
    closed("the subscription").with_message(
        "the subscription is closed; the record stays uncommitted and is delivered again",
    )
}

impl KafkaAcker {
    fn settle(&mut self) -> Result<()> {
        if self.event.take().is_none() {
            return Ok(());
        }
        let Some(core) = self.core.upgrade() else {
            return Err(subscription_gone());
        };
        settle_offset(&core, &self.topic, self.partition, self.offset, self.epoch);
        if let Some(flight) = self.flight.upgrade() {
            flight.settled();
        }
        Ok(())
    }

    fn requeue(&mut self, delay: Duration) -> Result<()> {
        let Some(event) = self.event.take() else {
            return Ok(());
        };
        let Some(flight) = self.flight.upgrade() else {
            return Err(subscription_gone());
        };
        let pending = Pending {
            event,
            topic: Arc::clone(&self.topic),
            partition: self.partition,
            offset: self.offset,
            epoch: self.epoch,
            count: self.count.saturating_add(1),
        };
        flight.hand_back(pending, polybus_core::time::deadline_after(delay));
        Ok(())
    }
}

impl Acker for KafkaAcker {
    fn backend(&self) -> &'static str {
        BACKEND
    }
    fn ack(&mut self) -> AckFuture<'_> {
        AckFuture::ready(self.settle())
    }
    fn nack(&mut self, delay: Duration) -> AckFuture<'_> {
        AckFuture::ready(self.requeue(delay))
    }
    /// Kafka cannot delete a record: `term` commits past it like `ack`, so it is never
    /// delivered again to this group.
    fn term(&mut self) -> AckFuture<'_> {
        AckFuture::ready(self.settle())
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        // Dropped unsettled: hand it back to the subscription at once (best effort; if the
        // subscription is gone the record is uncommitted and the group delivers it again).
        let _ = self.requeue(Duration::ZERO);
    }
}

// ---------------------------------------------------------------------------------------------
// The subscription stream.

/// The stream of one subscription: yields [`Delivery`]s until dropped.
///
/// Owns its group member; dropping it commits acknowledged offsets and leaves the group (in
/// the background). Also offers [`lag`](Self::lag) and the group metadata for transactions.
pub struct KafkaStream {
    inner: BoxStream<'static, Result<Delivery>>,
    core: Option<Arc<Core>>,
}

impl std::fmt::Debug for KafkaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaStream")
            .field("group", &self.core.as_ref().map(|c| c.group.as_str()))
            .finish()
    }
}

impl KafkaStream {
    /// Per-partition lag of the partitions currently assigned to this member.
    ///
    /// # Errors
    /// `Closed` if the subscription failed; broker errors.
    pub async fn lag(&self) -> Result<Vec<PartitionLag>> {
        match &self.core {
            Some(c) => lag(Arc::clone(c)).await,
            None => Err(closed("the subscription")),
        }
    }

    /// The group metadata for `send_offsets_to_transaction`.
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.core.as_ref()?.native().ok()?.group_metadata()
    }
}

impl Stream for KafkaStream {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct Reader {
    core: Arc<Core>,
    topics: Vec<String>,
    subscribed: bool,
    flight: Arc<Flight>,
}

impl Reader {
    fn new(core: Arc<Core>, topics: Vec<String>) -> Self {
        Reader {
            flight: Arc::clone(&core.flight),
            core,
            topics,
            subscribed: false,
        }
    }

    fn delivery(
        &self,
        event: Event,
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        epoch: u64,
        count: u32,
    ) -> Delivery {
        let acker = KafkaAcker {
            core: Arc::downgrade(&self.core),
            flight: Arc::downgrade(&self.flight),
            event: Some(event.clone()),
            topic: Arc::clone(&topic),
            partition,
            offset,
            epoch,
            count,
        };
        let mut d = Delivery::new(event, topic, acker)
            .with_partition(partition)
            .with_delivery_count(count);
        if let Ok(o) = u64::try_from(offset) {
            d = d.with_sequence(o);
        }
        self.core.telemetry.delivered(d)
    }

    /// The next delivery. Cancel-safe: a message taken from librdkafka is returned in the
    /// same poll. At `max_in_flight` unsettled deliveries it reads nothing from librdkafka
    /// and waits for a settlement or a due redelivery.
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if !self.subscribed {
            if let Err(e) = self.core.subscribe(&self.topics).await {
                return Some(Err(e));
            }
            self.subscribed = true;
        }
        loop {
            // A failed start-time lookup is reported once; the partitions went on from
            // auto.offset.reset.
            if let Some(e) = self
                .core
                .start
                .as_ref()
                .and_then(|s| s.error.lock().ok()?.take())
            {
                return Some(Err(e));
            }
            // Due local redeliveries first, in the order they became due.
            let (wake, read) = match self.flight.step(Instant::now()) {
                Step::Redeliver(p) => {
                    let current = self
                        .core
                        .tracker
                        .lock()
                        .map(|t| t.is_current(&p.topic, p.partition, p.epoch))
                        .unwrap_or(false);
                    if current {
                        return Some(Ok(self.delivery(
                            p.event,
                            p.topic,
                            p.partition,
                            p.offset,
                            p.epoch,
                            p.count,
                        )));
                    }
                    // Revoked meanwhile: the new owner delivers it; it no longer counts here.
                    self.flight.settled();
                    continue;
                }
                Step::Wait { wake, read } => (wake, read),
            };
            let core = Arc::clone(&self.core);
            let native = match core.native() {
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            };
            tokio::select! {
                biased;
                () = self.flight.changed.notified() => {}
                () = sleep_until_opt(wake) => {}
                msg = native.recv(), if read => match msg {
                    Ok(m) => {
                        let topic: Arc<str> = Arc::from(m.topic());
                        let (partition, offset) = (m.partition(), m.offset());
                        let epoch = self.core.tracker.lock().map(|mut t| t.delivered(&topic, partition, offset)).unwrap_or(0);
                        if self.core.start.as_ref().is_some_and(|s| s.skips(&topic, partition, m.timestamp().to_millis())) {
                            settle_offset(&self.core, &topic, partition, offset, epoch);
                            continue;
                        }
                        match convert::decode(&m) {
                            Ok(ev) => {
                                self.flight.taken();
                                return Some(Ok(self.delivery(ev, topic, partition, offset, epoch, 1)));
                            }
                            Err(e) => {
                                // A record that claims to be a CloudEvent but is malformed: it is
                                // reported once and committed past (it can never be decoded).
                                self.core.telemetry.decode_failed(&e);
                                settle_offset(&self.core, &topic, partition, offset, epoch);
                                return Some(Err(e.with_message(format!("record at {}/{partition}@{offset} is not a valid CloudEvent", m.topic()))));
                            }
                        }
                    }
                    Err(e) => {
                        if let Some(err) = consume_error(e) {
                            return Some(Err(err));
                        }
                    }
                },
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Transient consumer errors (broker down, rebalancing) are logged and retried by librdkafka;
/// others are yielded.
fn consume_error(e: KafkaError) -> Option<Error> {
    let code = crate::error::code_of(&e);
    let kind = code.map_or(ErrorKind::Other, kind_of_code);
    match (kind, code) {
        (ErrorKind::Connect | ErrorKind::Timeout, _)
        | (_, Some(rdkafka::error::RDKafkaErrorCode::PartitionEOF)) => {
            tracing::warn!(target: "polybus_kafka", "consumer: {e} (librdkafka retries)");
            None
        }
        (ErrorKind::NotFound, _) => {
            tracing::warn!(target: "polybus_kafka", "consumer: {e}");
            None
        }
        _ => Some(from_kafka(e, "consuming")),
    }
}

fn stream_of(reader: Reader) -> KafkaStream {
    let core = Some(Arc::clone(&reader.core));
    let inner = futures_util::stream::unfold(reader, |mut r| async move {
        let item = r.next().await?;
        Some((item, r))
    });
    KafkaStream {
        inner: Box::pin(inner),
        core,
    }
}

fn failed(e: Error) -> KafkaStream {
    KafkaStream {
        inner: Box::pin(futures_util::stream::once(async move { Err(e) })),
        core: None,
    }
}

async fn lag(core: Arc<Core>) -> Result<Vec<PartitionLag>> {
    let timeout = core.timeout;
    blocking(move || {
        let c = core.native()?;
        let assignment = c
            .assignment()
            .map_err(|e| from_kafka(e, "reading the assignment"))?;
        let committed = c
            .committed_offsets(assignment.clone(), timeout)
            .map_err(|e| from_kafka(e, "reading committed offsets"))?;
        let mut out = Vec::new();
        for e in assignment.elements() {
            let (low, high) = c
                .fetch_watermarks(e.topic(), e.partition(), timeout)
                .map_err(|err| from_kafka(err, "fetching watermarks"))?;
            let committed =
                committed
                    .find_partition(e.topic(), e.partition())
                    .and_then(|p| match p.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
            out.push(PartitionLag {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                high_watermark: high,
                committed,
                lag: (high - committed.unwrap_or(low)).max(0),
            });
        }
        let total: i64 = out.iter().map(|p| p.lag).sum();
        core.telemetry
            .instruments()
            .set_consumer_lag(u64::try_from(total).unwrap_or(0));
        Ok(out)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The public consumer.

/// Consumes Kafka topics in a consumer group with at-least-once delivery.
///
/// * The seed's interface: [`new_with_config`](Self::new_with_config) subscribes to topics and
///   [`next`](MessageConsumer::next) returns one [`Delivery`] at a time.
/// * The generic [`Consumer`] trait: every `subscribe(topic)` starts its own group member and
///   returns a [`KafkaStream`].
///
/// Settlement: `ack` (and `term`) mark the record processed; the offset committed for a
/// partition is the lowest offset still unsettled there, so nothing unsettled is ever
/// committed past. Offsets are committed in the background, on revoke and on close. `nack`
/// redelivers the record locally after the delay (its offset stays uncommitted, so a crash or
/// rebalance meanwhile redelivers it through the group too). A delivery dropped unsettled is
/// handed back the same way. After a rebalance, settling a record of a revoked partition is a
/// harmless no-op and the new owner resumes from the committed offset.
///
/// Flow control: a subscription keeps at most
/// [`max_in_flight`](KafkaConfig::with_max_in_flight) deliveries unsettled (1000 by default),
/// counting nacked and dropped ones until they are redelivered and settled. At the limit,
/// `next` reads nothing more from librdkafka and waits for an `ack` or `term`, or for a
/// handed-back delivery to be due again. Local redeliveries wait in a queue ordered by due
/// time, bounded by the same limit.
///
/// ```no_run
/// use polybus_core::mq::{MessageConsumer, MessageProducer};
/// use polybus_kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
/// # #[allow(dead_code)] async fn demo() -> anyhow::Result<()> {
/// let cfg = KafkaConfig::new("localhost:9092", "g1")
///     .with_idempotent_producer(true)
///     .with_auto_offset_reset("earliest");
/// let producer = KafkaProducer::new_with_config(&cfg)?;
/// let mut consumer = KafkaConsumer::new_with_config(&cfg, &["t"])?;
/// producer.send("t", b"hello").await?;
/// let msg = consumer.next().await?;
/// msg.ack().await?;
/// # Ok(()) }
/// ```
pub struct KafkaConsumer {
    cfg: KafkaConfig,
    group: String,
    seed: Option<Reader>,
    pending_topics: Vec<String>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("brokers", &self.cfg.brokers())
            .field("group", &self.group)
            .field(
                "topics",
                &self
                    .seed
                    .as_ref()
                    .map(|r| r.topics.clone())
                    .unwrap_or_default(),
            )
            .finish()
    }
}

impl KafkaConsumer {
    /// A consumer in the group of `cfg` subscribed to `topics` (the seed's constructor). The
    /// topics are checked now; they are created if missing and joined on the first
    /// [`next`](MessageConsumer::next).
    ///
    /// # Errors
    /// `InvalidTopic`; a configuration librdkafka refuses; `Other` outside a tokio runtime.
    pub fn new_with_config(cfg: &KafkaConfig, topics: &[&str]) -> Result<Self> {
        let mut c = Self::new(cfg)?;
        for t in topics {
            validate_topic(t)?;
        }
        let core = Core::new(&c.cfg, &c.group)?;
        c.seed = Some(Reader::new(
            core,
            topics.iter().map(|t| (*t).to_owned()).collect(),
        ));
        Ok(c)
    }

    /// A consumer in the group of `cfg` without subscriptions yet (use
    /// [`Consumer::subscribe`] or [`MessageConsumer::subscribe`]).
    ///
    /// # Errors
    /// A configuration polybus refuses (no brokers).
    pub fn new(cfg: &KafkaConfig) -> Result<Self> {
        cfg.check()?;
        Ok(KafkaConsumer {
            cfg: cfg.clone(),
            group: cfg.group_id().to_owned(),
            seed: None,
            pending_topics: Vec::new(),
        })
    }

    /// A consumer in a fresh, unique group (`polybus-<uuid>`): it gets its own copy of every
    /// record, starting where `auto.offset.reset` says.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn new_anonymous(cfg: &KafkaConfig) -> Result<Self> {
        let group = format!("polybus-{}", uuid::Uuid::new_v4().simple());
        Self::new(&cfg.clone().with_group_id(group))
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        &self.group
    }

    /// What this consumer's configuration guarantees
    /// ([`KafkaConfig::capabilities`]): the backlog follows `auto.offset.reset`,
    /// `max_payload` is `message.max.bytes`, and so on.
    pub fn capabilities(&self) -> Capabilities {
        self.cfg.capabilities()
    }

    /// Per-partition lag of the seed subscription (the partitions assigned to it now).
    ///
    /// # Errors
    /// `Closed` before the first `next`; broker errors.
    pub async fn lag(&self) -> Result<Vec<PartitionLag>> {
        match &self.seed {
            Some(r) => lag(Arc::clone(&r.core)).await,
            None => Err(closed("the consumer (no subscription)")),
        }
    }

    /// The group metadata of the seed subscription, for
    /// [`send_offsets_to_transaction`](crate::KafkaTransactionalProducer::send_offsets_to_transaction).
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.seed.as_ref()?.core.native().ok()?.group_metadata()
    }

    /// Commits the acknowledged offsets of the seed subscription now.
    ///
    /// # Errors
    /// Broker errors; `Ok` when there is nothing to commit.
    pub async fn commit(&self) -> Result<()> {
        let Some(r) = &self.seed else { return Ok(()) };
        let core = Arc::clone(&r.core);
        blocking(
            move || match core.native()?.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => Ok(()),
                Err(e)
                    if crate::error::code_of(&e)
                        == Some(rdkafka::error::RDKafkaErrorCode::NoOffset) =>
                {
                    Ok(())
                }
                Err(e) => Err(from_kafka(e, "committing offsets")),
            },
        )
        .await
    }

    /// Commits acknowledged offsets and leaves the group. Later `next` calls fail with
    /// `Closed`.
    ///
    /// # Errors
    /// As [`commit`](Self::commit).
    pub async fn close(&mut self) -> Result<()> {
        let r = self.commit().await;
        // The last reference to the core closes the member on the blocking pool (see
        // Core::drop); the redelivery queue goes with the reader.
        drop(self.seed.take());
        self.pending_topics.clear();
        r
    }

    fn ensure_seed(&mut self) -> Result<&mut Reader> {
        if self.seed.is_none() {
            if self.pending_topics.is_empty() {
                return Err(closed("the consumer (no subscription)"));
            }
            let core = Core::new(&self.cfg, &self.group)?;
            self.seed = Some(Reader::new(core, std::mem::take(&mut self.pending_topics)));
        }
        self.seed
            .as_mut()
            .ok_or_else(|| closed("the consumer (no subscription)"))
    }
}

impl Consumer for KafkaConsumer {
    type Stream<'a> = KafkaStream;

    fn subscribe<'a>(&'a self, topic: &'a str) -> KafkaStream {
        if let Err(e) = validate_topic(topic) {
            return failed(e);
        }
        match Core::new(&self.cfg, &self.group) {
            Ok(core) => stream_of(Reader::new(core, vec![topic.to_owned()])),
            Err(e) => failed(e),
        }
    }

    fn capabilities(&self) -> Capabilities {
        KafkaConsumer::capabilities(self)
    }
}

impl MessageConsumer for KafkaConsumer {
    /// Adds `topic` to the seed subscription (re-subscribing on the next `next`).
    async fn subscribe(&mut self, topic: &str) -> Result<()> {
        validate_topic(topic)?;
        match &mut self.seed {
            Some(r) => {
                if !r.topics.iter().any(|t| t == topic) {
                    r.topics.push(topic.to_owned());
                    r.subscribed = false;
                }
            }
            None => self.pending_topics.push(topic.to_owned()),
        }
        Ok(())
    }

    /// The next delivery from the subscribed topics.
    async fn next(&mut self) -> Result<Delivery> {
        let reader = self.ensure_seed()?;
        match reader.next().await {
            Some(r) => r,
            None => Err(closed("the consumer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(offset: i64) -> Pending {
        Pending {
            event: Event::new(offset.to_string()),
            topic: Arc::from("t"),
            partition: 0,
            offset,
            epoch: 1,
            count: 2,
        }
    }

    fn read(step: Step) -> bool {
        match step {
            Step::Wait { read, .. } => read,
            Step::Redeliver(p) => panic!("unexpected redelivery of {}", p.offset),
        }
    }

    #[test]
    fn flight_stops_reading_at_the_limit_and_resumes_after_a_settlement() {
        let f = Flight::new(3);
        let now = Instant::now();
        for _ in 0..3 {
            assert!(read(f.step(now)));
            f.taken();
        }
        assert!(!read(f.step(now)), "a 4th record was read with 3 unsettled");
        f.settled();
        assert!(read(f.step(now)));
        assert_eq!(f.counts(), (2, 0));
    }

    #[test]
    fn handed_back_deliveries_still_count_and_come_back_by_due_time() {
        let f = Flight::new(3);
        let now = Instant::now();
        for _ in 0..3 {
            f.taken();
        }
        // Handed back in another order than they are due; ties keep arrival order.
        f.hand_back(pending(30), now + Duration::from_secs(30));
        f.hand_back(pending(10), now + Duration::from_secs(10));
        f.hand_back(pending(11), now + Duration::from_secs(10));
        assert_eq!(f.counts(), (3, 3));
        match f.step(now) {
            Step::Wait { wake, read } => {
                assert!(!read, "a nacked delivery is still unsettled");
                assert_eq!(wake, Some(now + Duration::from_secs(10)));
            }
            Step::Redeliver(p) => panic!("{} is not due yet", p.offset),
        }
        let later = now + Duration::from_secs(60);
        let mut order = Vec::new();
        while let Step::Redeliver(p) = f.step(later) {
            order.push(p.offset);
        }
        assert_eq!(order, [10, 11, 30]);
        assert_eq!(f.counts(), (3, 0));
    }

    #[test]
    fn revoked_redeliveries_stop_counting_at_once() {
        let f = Flight::new(2);
        let now = Instant::now();
        f.taken();
        f.taken();
        let mut other = pending(7);
        other.partition = 1;
        f.hand_back(pending(5), now + Duration::from_secs(3600));
        f.hand_back(other, now + Duration::from_secs(3600));
        assert!(!read(f.step(now)));
        let mut revoked = TopicPartitionList::new();
        revoked.add_partition("t", 0);
        revoked.add_partition("other", 1);
        f.forget(&revoked);
        assert_eq!(f.counts(), (1, 1));
        assert!(read(f.step(now)), "a revoked redelivery still holds a slot");
    }

    #[test]
    fn tracker_holds_only_unsettled_offsets() {
        let mut t = Tracker::default();
        let topic: Arc<str> = Arc::from("t");
        // 1,000 rounds of deliver-and-settle leave nothing behind.
        for offset in 0..1000 {
            let epoch = t.delivered(&topic, 0, offset);
            assert_eq!(t.settled(&topic, 0, offset, epoch), Some(offset + 1));
        }
        let held: usize = t.parts.values().map(|p| p.inflight.len()).sum();
        assert_eq!(held, 0);
        // An unsettled offset holds the commit point back; settling it releases it.
        let e = t.delivered(&topic, 0, 1000);
        t.delivered(&topic, 0, 1001);
        assert_eq!(t.settled(&topic, 0, 1001, e), None);
        assert_eq!(t.settled(&topic, 0, 1000, e), Some(1002));
    }
}
