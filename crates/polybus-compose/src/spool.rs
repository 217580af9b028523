//! The durable spool: events acknowledged to the caller but not yet confirmed by Kafka.
//!
//! Storage is a [redb](https://docs.rs/redb) database (`spool.redb` in the spool directory):
//! crash-safe, copy-on-write B-trees with checksummed commits. Tables:
//!
//! * `events`: `(bucket, seq) → record` (see `codec`). `seq` grows monotonically across
//!   restarts; `bucket` is the forwarder that owns the event (a hash of its ordering key), so
//!   each forwarder reads its own events in order with one range scan.
//! * `forwarded`: `dedup key → expiry` for events already written to Kafka, and
//!   `forwarded_by_expiry` to sweep them, so the same event published again (same `source` +
//!   `id`), also after a restart, is not written to Kafka twice while its key is remembered.
//! * `meta`: the next sequence number and the bucket count.
//!
//! One writer thread owns every write transaction and batches whatever is queued into one
//! commit (group commit). Appends commit with `Durability::Immediate` (fsync) before the
//! publisher is answered. Deletions after a Kafka acknowledgement commit with
//! `Durability::None` and become durable with the next durable commit (at most
//! [`SYNC_INTERVAL`] later): a crash can make an already forwarded event come back and be
//! forwarded again (a duplicate, which consumers remove by `source` + `id`), never lose one.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polybus_core::{Error, ErrorKind, Event, Result};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::{Notify, Semaphore, TryAcquireError, mpsc, oneshot};

use crate::codec::{SpoolRecord, now_ms};
use crate::metrics as m;

const BACKEND: &str = "spool";
const FILE_NAME: &str = "spool.redb";

const EVENTS: TableDefinition<'_, (u32, u64), &[u8]> = TableDefinition::new("events");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const FORWARDED: TableDefinition<'_, &str, u64> = TableDefinition::new("forwarded");
const FORWARDED_BY_EXPIRY: TableDefinition<'_, (u64, &str), ()> =
    TableDefinition::new("forwarded_by_expiry");

/// Non-durable commits become durable at most this long after they were made.
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Expired forwarded keys are swept this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Ops one commit takes at most.
const MAX_BATCH: usize = 2048;

/// What a publish does when the spool is full.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Wait until the forwarders make room (backpressure to the caller). The default.
    #[default]
    Block,
    /// Fail at once with [`ErrorKind::Rejected`].
    Reject,
}

/// Where the spool lives and how big it may grow.
///
/// ```
/// use polybus_compose::{SpoolConfig, WhenFull};
/// let cfg = SpoolConfig::new("./spool").capacity(100_000).when_full(WhenFull::Reject);
/// assert_eq!(cfg.dir(), std::path::Path::new("./spool"));
/// ```
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    dir: PathBuf,
    capacity: u64,
    when_full: WhenFull,
    forwarded_ttl: Option<Duration>,
    cache_bytes: usize,
}

/// The default memory for the spool database's page cache: 32 MiB.
pub const DEFAULT_SPOOL_CACHE_BYTES: usize = 32 << 20;

impl SpoolConfig {
    /// A spool in `dir` (created if missing) holding up to 1 000 000 events, blocking when
    /// full, remembering forwarded events for 24 hours, with a 32 MiB page cache.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            capacity: 1_000_000,
            when_full: WhenFull::Block,
            forwarded_ttl: Some(Duration::from_secs(24 * 3600)),
            cache_bytes: DEFAULT_SPOOL_CACHE_BYTES,
        }
    }
    /// The memory the spool database may use to cache its pages (default
    /// [`DEFAULT_SPOOL_CACHE_BYTES`]; at least 1 MiB). What does not fit stays on disk, so this
    /// bounds the bus' memory however many forwarded-event keys the spool remembers (redb's
    /// own default is 1 GiB, which the 24 h of keys fill at high rates).
    ///
    /// ```
    /// let cfg = polybus_compose::SpoolConfig::new("/var/lib/app/spool").cache_size(16 << 20);
    /// assert_eq!(cfg.cache_bytes(), 16 << 20);
    /// ```
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes.max(1 << 20);
        self
    }
    /// The configured page cache size in bytes.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }
    /// The most events the spool holds (at least 1).
    pub fn capacity(mut self, events: u64) -> Self {
        self.capacity = events.max(1);
        self
    }
    /// What a publish does when the spool is full.
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.when_full = policy;
        self
    }
    /// How long the dedup keys of forwarded events are kept, so a republished event is not
    /// forwarded again; `None` turns this producer-side dedup off.
    pub fn forwarded_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.forwarded_ttl = ttl;
        self
    }
    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The configured capacity.
    pub fn capacity_limit(&self) -> u64 {
        self.capacity
    }
    /// The configured full policy.
    pub fn full_policy(&self) -> WhenFull {
        self.when_full
    }
    pub(crate) fn forwarded_ttl_value(&self) -> Option<Duration> {
        self.forwarded_ttl
    }
}

/// The bucket (forwarder) of an event: FNV-1a of its ordering key, or of its dedup key when it
/// has none. Stable across processes and releases.
pub(crate) fn route_hash(event: &Event) -> u64 {
    match event.key() {
        Some(k) => fnv1a(k),
        None => fnv1a(event.dedup_key().as_bytes()),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One spooled entry as a forwarder reads it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) record: SpoolRecord,
}

enum Op {
    Append {
        bucket: u32,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Complete {
        bucket: u32,
        seqs: Vec<u64>,
        forwarded: Vec<String>,
        reply: oneshot::Sender<Result<()>>,
    },
    Update {
        bucket: u32,
        seq: u64,
        bytes: Vec<u8>,
    },
    Sync {
        reply: oneshot::Sender<Result<()>>,
    },
    Tick,
    Shutdown {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The spool. Cheap to share behind an `Arc`.
pub(crate) struct Spool {
    db: Arc<Database>,
    ops: mpsc::Sender<Op>,
    buckets: u32,
    notify: Arc<Vec<Notify>>,
    capacity: Arc<Capacity>,
    depth: Arc<AtomicU64>,
    max_depth: Arc<AtomicU64>,
    when_full: WhenFull,
    ttl: Option<Duration>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    dir: PathBuf,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("buckets", &self.buckets)
            .field("depth", &self.depth())
            .finish()
    }
}

impl Spool {
    /// Opens (or creates) the spool in `cfg.dir()` with `buckets` forwarders. Blocking: call
    /// it from `spawn_blocking` in async code.
    ///
    /// Entries spooled by an earlier run with a different bucket count are re-bucketed.
    ///
    /// # Errors
    /// [`ErrorKind::Rejected`] if another process has the spool open, [`ErrorKind::Other`]
    /// for I/O or corruption.
    pub(crate) fn open(cfg: &SpoolConfig, buckets: u32) -> Result<Spool> {
        let buckets = buckets.max(1);
        std::fs::create_dir_all(&cfg.dir).map_err(|e| {
            storage("cannot create the spool directory")
                .with_message(format!("cannot create {}", cfg.dir.display()))
                .with_source(e)
        })?;
        let path = cfg.dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(cfg.cache_bytes)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    Error::new(ErrorKind::Rejected, BACKEND)
                        .with_message(format!("{} is open in another process", path.display()))
                }
                e => storage("cannot open the spool").with_source(redb::Error::from(e)),
            })?;
        let (next_seq, depth) =
            prepare(&db, buckets).map_err(|e| storage("cannot read the spool").with_source(e))?;
        let db = Arc::new(db);
        let depth_now = Arc::new(AtomicU64::new(depth));
        let max_depth = Arc::new(AtomicU64::new(depth));
        let capacity = Arc::new(Capacity::new(cfg.capacity, depth));
        let notify: Arc<Vec<Notify>> = Arc::new((0..buckets).map(|_| Notify::new()).collect());
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let state = WriterState {
            db: db.clone(),
            next_seq,
            depth: depth_now.clone(),
            max_depth: max_depth.clone(),
            capacity: capacity.clone(),
            notify: notify.clone(),
            ttl: cfg.forwarded_ttl,
            dirty: false,
            last_sweep: Instant::now(),
        };
        let writer = std::thread::Builder::new()
            .name("polybus-spool".into())
            .spawn(move || writer_loop(state, rx))
            .map_err(|e| storage("cannot start the spool writer").with_source(e))?;
        metrics::gauge!(m::SPOOL_DEPTH).set(depth as f64);
        if depth > 0 {
            tracing::info!(
                spool = %cfg.dir.display(),
                depth,
                "spool holds events from an earlier run; they are forwarded before new ones"
            );
        }
        Ok(Spool {
            db,
            ops: tx,
            buckets,
            notify,
            capacity,
            depth: depth_now,
            max_depth,
            when_full: cfg.when_full,
            ttl: cfg.forwarded_ttl,
            writer: Mutex::new(Some(writer)),
            dir: cfg.dir.clone(),
        })
    }

    /// The number of forwarder buckets.
    pub(crate) fn buckets(&self) -> u32 {
        self.buckets
    }

    /// The bucket of `event`.
    pub(crate) fn bucket_of(&self, event: &Event) -> u32 {
        (route_hash(event) % u64::from(self.buckets)) as u32
    }

    /// Events in the spool now.
    pub(crate) fn depth(&self) -> u64 {
        self.depth.load(Ordering::Acquire)
    }

    /// The most events the spool held at once since it was opened.
    pub(crate) fn max_depth(&self) -> u64 {
        self.max_depth.load(Ordering::Acquire)
    }

    /// Whether forwarded keys are remembered.
    pub(crate) fn remembers_forwarded(&self) -> bool {
        self.ttl.is_some()
    }

    /// The wake-up of bucket `bucket`, notified after each commit that appended to it.
    pub(crate) fn notified(&self, bucket: u32) -> &Notify {
        &self.notify[bucket as usize % self.notify.len()]
    }

    /// Reserves room for one event, waiting or failing per the full policy.
    ///
    /// # Errors
    /// [`ErrorKind::Rejected`] when full under [`WhenFull::Reject`]; [`ErrorKind::Closed`]
    /// after [`close_capacity`](Self::close_capacity).
    pub(crate) async fn reserve(&self) -> Result<Reservation<'_>> {
        self.capacity.acquire(self.when_full).await?;
        Ok(Reservation {
            capacity: &self.capacity,
            armed: true,
        })
    }

    /// Fails every waiting and later [`reserve`](Self::reserve) with `Closed`.
    pub(crate) fn close_capacity(&self) {
        self.capacity.sem.close();
    }

    /// Appends a record to `bucket` and returns its sequence number once the commit is
    /// durable.
    ///
    /// # Errors
    /// Storage errors, or `Closed` after shutdown.
    pub(crate) async fn append(
        &self,
        mut reservation: Reservation<'_>,
        bucket: u32,
        record: &SpoolRecord,
    ) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Append {
            bucket,
            bytes: record.encode(),
            reply,
        };
        self.ops.send(op).await.map_err(|_| closed())?;
        let seq = rx.await.map_err(|_| closed())??;
        // The entry now owns the reserved room; the writer gives it back on deletion.
        reservation.armed = false;
        Ok(seq)
    }

    /// Deletes forwarded (or skipped) entries of `bucket` and remembers the dedup keys of the
    /// events that reached Kafka.
    pub(crate) async fn complete(
        &self,
        bucket: u32,
        seqs: Vec<u64>,
        forwarded: Vec<String>,
    ) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let forwarded = if self.ttl.is_some() {
            forwarded
        } else {
            Vec::new()
        };
        let (reply, rx) = oneshot::channel();
        let op = Op::Complete {
            bucket,
            seqs,
            forwarded,
            reply,
        };
        self.ops.send(op).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Rewrites an entry (attempt counters, dead-letter state) if it is still there.
    pub(crate) async fn update(&self, bucket: u32, seq: u64, record: &SpoolRecord) -> Result<()> {
        let op = Op::Update {
            bucket,
            seq,
            bytes: record.encode(),
        };
        self.ops.send(op).await.map_err(|_| closed())
    }

    /// Makes every commit so far durable.
    pub(crate) async fn sync(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::Sync { reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Asks the writer for housekeeping: a durable commit if one is due, sweeping expired keys.
    pub(crate) fn tick(&self) {
        let _ = self.ops.try_send(Op::Tick);
    }

    /// Reads up to `limit` entries of `bucket` with `seq >= from`, in order. Blocking.
    #[cfg(test)]
    pub(crate) fn read_bucket(&self, bucket: u32, from: u64, limit: usize) -> Result<Vec<Entry>> {
        read_bucket(&self.db, bucket, from, limit)
    }

    /// A handle for reading from a blocking task.
    pub(crate) fn reader(&self) -> SpoolReader {
        SpoolReader {
            db: self.db.clone(),
        }
    }

    /// For each key, whether an event with that dedup key was forwarded and is still
    /// remembered. Blocking.
    #[cfg(test)]
    pub(crate) fn forwarded(&self, keys: &[String]) -> Result<Vec<bool>> {
        self.reader().forwarded(keys)
    }

    /// Final durable commit; the writer thread ends. Later writes fail with `Closed`.
    pub(crate) async fn shutdown(&self) -> Result<()> {
        self.close_capacity();
        let (reply, rx) = oneshot::channel();
        let sent = self.ops.send(Op::Shutdown { reply }).await.is_ok();
        let result = if sent {
            rx.await.unwrap_or(Ok(()))
        } else {
            Ok(())
        };
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        result
    }
}

/// Read access for blocking tasks.
#[derive(Clone)]
pub(crate) struct SpoolReader {
    db: Arc<Database>,
}

impl SpoolReader {
    pub(crate) fn read_bucket(&self, bucket: u32, from: u64, limit: usize) -> Result<Vec<Entry>> {
        read_bucket(&self.db, bucket, from, limit)
    }

    pub(crate) fn forwarded(&self, keys: &[String]) -> Result<Vec<bool>> {
        let now = now_ms();
        let inner = || -> std::result::Result<Vec<bool>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(FORWARDED)?;
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                let hit = table.get(k.as_str())?.is_some_and(|v| v.value() > now);
                out.push(hit);
            }
            Ok(out)
        };
        inner().map_err(|e| storage("cannot read the spool").with_source(e))
    }
}

fn read_bucket(db: &Database, bucket: u32, from: u64, limit: usize) -> Result<Vec<Entry>> {
    let inner = || -> std::result::Result<Vec<(u64, Vec<u8>)>, redb::Error> {
        let txn = db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for item in table.range((bucket, from)..=(bucket, u64::MAX))? {
            let (k, v) = item?;
            out.push((k.value().1, v.value().to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    };
    let raw = inner().map_err(|e| storage("cannot read the spool").with_source(e))?;
    let mut entries = Vec::with_capacity(raw.len());
    for (seq, bytes) in raw {
        match SpoolRecord::decode(&bytes) {
            Ok(record) => entries.push(Entry { seq, record }),
            // Only a foreign or damaged file gets here; the entry stays for inspection.
            Err(e) => tracing::error!(seq, bucket, error = %e, "undecodable spool entry skipped"),
        }
    }
    Ok(entries)
}

/// Creates the tables, re-buckets if the bucket count changed, and returns the next sequence
/// number and the depth.
fn prepare(db: &Database, buckets: u32) -> std::result::Result<(u64, u64), redb::Error> {
    let txn = db.begin_write()?;
    let (next_seq, depth) = {
        let mut events = txn.open_table(EVENTS)?;
        let mut meta = txn.open_table(META)?;
        txn.open_table(FORWARDED)?;
        txn.open_table(FORWARDED_BY_EXPIRY)?;
        let mut max_seq = None::<u64>;
        for item in events.iter()? {
            let (k, _) = item?;
            let seq = k.value().1;
            max_seq = Some(max_seq.map_or(seq, |m: u64| m.max(seq)));
        }
        let stored_next = meta.get("next_seq")?.map(|v| v.value());
        let next_seq = stored_next.unwrap_or(0).max(max_seq.map_or(0, |m| m + 1));
        let old_buckets = meta.get("buckets")?.map(|v| v.value());
        if old_buckets.is_some_and(|b| b != u64::from(buckets)) {
            let mut all = Vec::new();
            for item in events.iter()? {
                let (k, v) = item?;
                all.push((k.value(), v.value().to_vec()));
            }
            for (key, bytes) in all {
                let new_bucket = match SpoolRecord::decode(&bytes) {
                    Ok(r) => (route_hash(&r.event) % u64::from(buckets)) as u32,
                    Err(_) => 0,
                };
                if new_bucket != key.0 {
                    events.remove(key)?;
                    events.insert((new_bucket, key.1), bytes.as_slice())?;
                }
            }
            tracing::info!(
                from = old_buckets,
                to = buckets,
                "spool re-bucketed for a new forwarder count"
            );
        }
        meta.insert("buckets", u64::from(buckets))?;
        meta.insert("next_seq", next_seq)?;
        (next_seq, events.len()?)
    };
    txn.commit()?;
    Ok((next_seq, depth))
}

/// Room in the spool: one permit per event. Entries found at open time that exceed the
/// capacity (a smaller capacity than the last run) are a debt paid back before new permits.
struct Capacity {
    sem: Semaphore,
    debt: Mutex<u64>,
}

impl Capacity {
    fn new(limit: u64, existing: u64) -> Self {
        let free = limit.saturating_sub(existing);
        let free = usize::try_from(free)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Capacity {
            sem: Semaphore::new(free),
            debt: Mutex::new(existing.saturating_sub(limit)),
        }
    }

    async fn acquire(&self, policy: WhenFull) -> Result<()> {
        match policy {
            WhenFull::Block => match self.sem.try_acquire() {
                Ok(p) => p.forget(),
                Err(TryAcquireError::Closed) => return Err(closed()),
                Err(TryAcquireError::NoPermits) => {
                    metrics::counter!(m::SPOOL_FULL_WAITS).increment(1);
                    self.sem.acquire().await.map_err(|_| closed())?.forget();
                }
            },
            WhenFull::Reject => match self.sem.try_acquire() {
                Ok(p) => p.forget(),
                Err(TryAcquireError::Closed) => return Err(closed()),
                Err(TryAcquireError::NoPermits) => {
                    metrics::counter!(m::SPOOL_REJECTED).increment(1);
                    return Err(Error::new(ErrorKind::Rejected, BACKEND)
                        .with_message("the spool is full (policy: reject)"));
                }
            },
        }
        Ok(())
    }

    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut debt = self.debt.lock().unwrap_or_else(|e| e.into_inner());
        let paid = (*debt).min(n);
        *debt -= paid;
        let give = usize::try_from(n - paid).unwrap_or(usize::MAX);
        drop(debt);
        if give > 0 {
            self.sem
                .add_permits(give.min(Semaphore::MAX_PERMITS - self.sem.available_permits()));
        }
    }
}

/// Room reserved for one event; given back on drop unless the event was appended.
pub(crate) struct Reservation<'a> {
    capacity: &'a Capacity,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.capacity.release(1);
        }
    }
}

impl fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("armed", &self.armed)
            .finish()
    }
}

struct WriterState {
    db: Arc<Database>,
    next_seq: u64,
    depth: Arc<AtomicU64>,
    max_depth: Arc<AtomicU64>,
    capacity: Arc<Capacity>,
    notify: Arc<Vec<Notify>>,
    ttl: Option<Duration>,
    /// Non-durable commits were made since the last durable one.
    dirty: bool,
    last_sweep: Instant,
}

fn writer_loop(mut st: WriterState, mut rx: mpsc::Receiver<Op>) {
    let mut last_durable = Instant::now();
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let shutdown = ops.iter().any(|op| matches!(op, Op::Shutdown { .. }));
        let needs_durable = ops.iter().any(|op| {
            matches!(
                op,
                Op::Append { .. } | Op::Sync { .. } | Op::Shutdown { .. }
            )
        }) || (st.dirty && last_durable.elapsed() >= SYNC_INTERVAL);
        let sweep = st.ttl.is_some() && st.last_sweep.elapsed() >= SWEEP_INTERVAL;
        let only_ticks = ops.iter().all(|op| matches!(op, Op::Tick));
        if only_ticks && !sweep && !(st.dirty && last_durable.elapsed() >= SYNC_INTERVAL) {
            continue;
        }
        let outcome = commit(&mut st, &ops, needs_durable, sweep);
        if sweep {
            st.last_sweep = Instant::now();
        }
        match outcome {
            Ok(done) => {
                if needs_durable {
                    st.dirty = false;
                    last_durable = Instant::now();
                } else {
                    st.dirty = true;
                }
                let depth = st
                    .depth
                    .load(Ordering::Acquire)
                    .saturating_add(done.appended)
                    .saturating_sub(done.removed);
                st.depth.store(depth, Ordering::Release);
                st.max_depth.fetch_max(depth, Ordering::AcqRel);
                metrics::gauge!(m::SPOOL_DEPTH).set(depth as f64);
                st.capacity.release(done.removed);
                for b in &done.touched {
                    st.notify[*b as usize % st.notify.len()].notify_one();
                }
                let mut seqs = done.seqs.into_iter();
                for op in ops {
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(seqs.next().ok_or_else(closed));
                        }
                        Op::Complete { reply, .. }
                        | Op::Sync { reply }
                        | Op::Shutdown { reply } => {
                            let _ = reply.send(Ok(()));
                        }
                        Op::Update { .. } | Op::Tick => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                let msg = e.to_string();
                for op in ops {
                    let err = || storage("spool commit failed").with_message(msg.clone());
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Err(err()));
                        }
                        Op::Complete { reply, .. }
                        | Op::Sync { reply }
                        | Op::Shutdown { reply } => {
                            let _ = reply.send(Err(err()));
                        }
                        Op::Update { .. } | Op::Tick => {}
                    }
                }
            }
        }
        if shutdown {
            break;
        }
    }
}

struct Committed {
    seqs: Vec<u64>,
    appended: u64,
    removed: u64,
    touched: BTreeSet<u32>,
}

fn commit(
    st: &mut WriterState,
    ops: &[Op],
    durable: bool,
    sweep: bool,
) -> std::result::Result<Committed, redb::Error> {
    let mut txn = st.db.begin_write()?;
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })?;
    let mut next_seq = st.next_seq;
    let mut done = Committed {
        seqs: Vec::new(),
        appended: 0,
        removed: 0,
        touched: BTreeSet::new(),
    };
    {
        let mut events = txn.open_table(EVENTS)?;
        let mut forwarded = txn.open_table(FORWARDED)?;
        let mut by_expiry = txn.open_table(FORWARDED_BY_EXPIRY)?;
        let now = now_ms();
        for op in ops {
            match op {
                Op::Append { bucket, bytes, .. } => {
                    let seq = next_seq;
                    next_seq += 1;
                    events.insert((*bucket, seq), bytes.as_slice())?;
                    done.seqs.push(seq);
                    done.appended += 1;
                    done.touched.insert(*bucket);
                }
                Op::Complete {
                    bucket,
                    seqs,
                    forwarded: keys,
                    ..
                } => {
                    for seq in seqs {
                        if events.remove((*bucket, *seq))?.is_some() {
                            done.removed += 1;
                        }
                    }
                    if let Some(ttl) = st.ttl {
                        let expiry =
                            now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                        for key in keys {
                            let old = forwarded.insert(key.as_str(), expiry)?.map(|v| v.value());
                            if let Some(old) = old {
                                by_expiry.remove((old, key.as_str()))?;
                            }
                            by_expiry.insert((expiry, key.as_str()), ())?;
                        }
                    }
                }
                Op::Update { bucket, seq, bytes } => {
                    let exists = events.get((*bucket, *seq))?.is_some();
                    if exists {
                        events.insert((*bucket, *seq), bytes.as_slice())?;
                    }
                }
                Op::Sync { .. } | Op::Tick | Op::Shutdown { .. } => {}
            }
        }
        if sweep {
            let mut expired = Vec::new();
            for item in by_expiry.range(..(now, ""))? {
                let (k, _) = item?;
                let (exp, key) = k.value();
                expired.push((exp, key.to_owned()));
                if expired.len() >= 10_000 {
                    break;
                }
            }
            for (exp, key) in &expired {
                by_expiry.remove((*exp, key.as_str()))?;
                let current = forwarded.get(key.as_str())?.map(|v| v.value());
                if current == Some(*exp) {
                    forwarded.remove(key.as_str())?;
                }
            }
        }
        if next_seq != st.next_seq {
            let mut meta = txn.open_table(META)?;
            meta.insert("next_seq", next_seq)?;
        }
    }
    txn.commit()?;
    st.next_seq = next_seq;
    Ok(done)
}

fn closed() -> Error {
    Error::closed(BACKEND).with_message("the spool is closed")
}

fn storage(msg: &'static str) -> Error {
    Error::new(ErrorKind::Other, BACKEND).with_message(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> SpoolConfig {
        SpoolConfig::new(dir).capacity(10)
    }

    fn record(i: usize, key: &str) -> SpoolRecord {
        let ev = Event::builder()
            .id(format!("e{i}"))
            .key(key.to_owned())
            .data(format!("payload {i}"))
            .build()
            .expect("event");
        SpoolRecord::new("s.t", "s.t", ev)
    }

    async fn append(spool: &Spool, r: &SpoolRecord) -> u64 {
        let res = spool.reserve().await.expect("room");
        let bucket = spool.bucket_of(&r.event);
        spool.append(res, bucket, r).await.expect("append")
    }

    fn all(spool: &Spool) -> Vec<(u32, Entry)> {
        let mut out = Vec::new();
        for b in 0..spool.buckets() {
            for e in spool.read_bucket(b, 0, usize::MAX).expect("read") {
                out.push((b, e));
            }
        }
        out.sort_by_key(|(_, e)| e.seq);
        out
    }

    #[tokio::test]
    async fn appended_events_survive_reopen_in_order_and_seq_keeps_growing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(dir.path()), 4).unwrap();
        let mut seqs = Vec::new();
        for i in 0..6 {
            seqs.push(append(&spool, &record(i, &format!("k{}", i % 2))).await);
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(spool.depth(), 6);
        // Forward (delete) the first two.
        let firsts = all(&spool);
        let (b0, e0) = &firsts[0];
        spool
            .complete(*b0, vec![e0.seq], vec![e0.record.event.dedup_key()])
            .await
            .unwrap();
        spool.shutdown().await.unwrap();
        drop(spool);

        let spool = Spool::open(&cfg(dir.path()), 4).unwrap();
        assert_eq!(spool.depth(), 5);
        let left: Vec<_> = all(&spool)
            .into_iter()
            .map(|(_, e)| e.record.event.id().to_owned())
            .collect();
        assert_eq!(left, ["e1", "e2", "e3", "e4", "e5"]);
        assert_eq!(
            spool
                .forwarded(&["urn:polybus e0".into(), "urn:polybus e1".into()])
                .unwrap(),
            [true, false]
        );
        let next = append(&spool, &record(9, "k")).await;
        assert!(next > *seqs.last().unwrap());
        spool.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_different_bucket_count_rebuckets_and_keeps_per_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(dir.path()), 3).unwrap();
        for i in 0..8 {
            append(&spool, &record(i, &format!("k{}", i % 3))).await;
        }
        spool.shutdown().await.unwrap();
        drop(spool);
        let spool = Spool::open(&cfg(dir.path()), 5).unwrap();
        let entries = all(&spool);
        assert_eq!(entries.len(), 8);
        for (b, e) in &entries {
            assert_eq!(*b, spool.bucket_of(&e.record.event));
        }
        for key in ["k0", "k1", "k2"] {
            let b = spool.bucket_of(&record(0, key).event);
            let ids: Vec<_> = spool
                .read_bucket(b, 0, usize::MAX)
                .unwrap()
                .into_iter()
                .filter(|e| e.record.event.key() == Some(key.as_bytes()))
                .map(|e| e.seq)
                .collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{key}: {ids:?}");
        }
        spool.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn full_spool_rejects_or_blocks_until_room() {
        let dir = tempfile::tempdir().unwrap();
        let c = SpoolConfig::new(dir.path())
            .capacity(2)
            .when_full(WhenFull::Reject);
        let spool = Spool::open(&c, 1).unwrap();
        append(&spool, &record(0, "k")).await;
        append(&spool, &record(1, "k")).await;
        let err = spool.reserve().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        // A reservation dropped without an append gives its room back.
        let first = spool.read_bucket(0, 0, 1).unwrap().remove(0);
        spool.complete(0, vec![first.seq], vec![]).await.unwrap();
        drop(spool.reserve().await.unwrap());
        append(&spool, &record(2, "k")).await;
        assert_eq!(spool.depth(), 2);
        assert_eq!(spool.max_depth(), 2);
        spool.shutdown().await.unwrap();
        drop(spool);

        let spool = Arc::new(Spool::open(&SpoolConfig::new(dir.path()).capacity(2), 1).unwrap());
        let s2 = spool.clone();
        let blocked = tokio::spawn(async move { s2.reserve().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "a full spool blocks");
        let first = spool.read_bucket(0, 0, 1).unwrap().remove(0);
        spool.complete(0, vec![first.seq], vec![]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), blocked)
            .await
            .expect("unblocked by the deletion")
            .unwrap()
            .unwrap();
        spool.shutdown().await.unwrap();
        assert_eq!(spool.reserve().await.unwrap_err().kind(), ErrorKind::Closed);
    }

    #[tokio::test]
    async fn a_smaller_capacity_than_the_content_is_a_debt() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(dir.path()), 1).unwrap();
        for i in 0..4 {
            append(&spool, &record(i, "k")).await;
        }
        spool.shutdown().await.unwrap();
        drop(spool);
        let c = SpoolConfig::new(dir.path())
            .capacity(2)
            .when_full(WhenFull::Reject);
        let spool = Spool::open(&c, 1).unwrap();
        let entries = spool.read_bucket(0, 0, usize::MAX).unwrap();
        spool
            .complete(0, vec![entries[0].seq, entries[1].seq], vec![])
            .await
            .unwrap();
        assert_eq!(
            spool.reserve().await.unwrap_err().kind(),
            ErrorKind::Rejected
        );
        spool
            .complete(0, vec![entries[2].seq], vec![])
            .await
            .unwrap();
        drop(spool.reserve().await.expect("room after the debt is paid"));
        spool.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_spool_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(dir.path()), 1).unwrap();
        let err = Spool::open(&cfg(dir.path()), 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
        spool.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn updates_apply_only_to_live_entries() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&cfg(dir.path()), 1).unwrap();
        let mut r = record(0, "k");
        let seq = append(&spool, &r).await;
        r.attempts = 2;
        spool.update(0, seq, &r).await.unwrap();
        spool.sync().await.unwrap();
        assert_eq!(spool.read_bucket(0, 0, 10).unwrap()[0].record.attempts, 2);
        spool.complete(0, vec![seq], vec![]).await.unwrap();
        spool.update(0, seq, &r).await.unwrap();
        spool.sync().await.unwrap();
        assert!(spool.read_bucket(0, 0, 10).unwrap().is_empty());
        assert_eq!(spool.depth(), 0);
        spool.shutdown().await.unwrap();
    }
}
