//! NATS KV backed parts of the bus: the live switches and a dedup store shared across
//! processes.

use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use polybus_core::{Error, ErrorKind, Result};
use polybus_jetstream::{JetStream, KvBucket, KvEntry, KvOperation};
use polybus_nats::async_nats::jetstream::kv;

use crate::dedup::DedupStore;
use crate::switches::{SwitchHandle, SwitchSource, Switches};

/// The switch keys a [`KvSwitchSource`] reads.
pub const SWITCH_KEYS: [&str; 3] = ["dual_write", "single_channel", "pause_forwarding"];

/// Feeds the bus's switches from a NATS KV bucket, watched: a write to one of the keys
/// [`SWITCH_KEYS`] takes effect at once (the server pushes it), without a restart. Values as
/// [`Switches::apply`] reads them; unknown keys are ignored, unreadable values are logged and
/// ignored.
///
/// **A watch that breaks or stalls is re-opened**, which replays the current values. Breaking
/// is the easy case (the client reports it). Stalling is not: when the server holding the
/// watch's consumer dies, async-nats re-creates that consumer under a fixed name, and if the
/// first attempt was placed on the dead node, every retry reuses the dead assignment and the
/// watch delivers nothing, without an error, until that node returns (seen on a 3-node
/// cluster with the stream leader SIGKILLed). So every [`check_every`](Self::check_every)
/// (default [`DEFAULT_CHECK_EVERY`](Self::DEFAULT_CHECK_EVERY), one `STREAM.INFO` request each) the source reads the
/// bucket's latest revision; if the watch has not delivered a revision the bucket already had
/// at the previous check, it is re-opened. A write therefore takes effect within about two
/// check periods of the cluster being able to answer, whatever happened to the watch.
/// Re-opening after errors backs off from 1 s to 16 s and resets once an entry arrives.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// use polybus_compose::{Bus, KvSwitchSource};
/// let js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").connect().await?;
/// let bus = Bus::builder()
///     .nats("nats://127.0.0.1:4222")
///     .kafka("localhost:9092")
///     .switch_source(KvSwitchSource::open(&js, "polybus-switches").await?)
///     .build()
///     .await?;
/// // Elsewhere (or: nats kv put polybus-switches dual_write off):
/// let bucket = js.kv("polybus-switches").await?;
/// bucket.put("dual_write", "off").await?;
/// # bus.close().await?; Ok(()) }
/// ```
pub struct KvSwitchSource {
    bucket: KvBucket,
    check_every: Duration,
}

/// The first and the longest wait before re-opening a watch that failed.
const REOPEN_MIN: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(16);

impl KvSwitchSource {
    /// How often the source checks, by default, that its watch keeps up with the bucket.
    pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(5);

    /// Watches `bucket`.
    pub fn new(bucket: KvBucket) -> Self {
        KvSwitchSource {
            bucket,
            check_every: Self::DEFAULT_CHECK_EVERY,
        }
    }

    /// Opens (creating if needed) the bucket `bucket` and watches it.
    ///
    /// # Errors
    /// As [`JetStream::kv`].
    pub async fn open(js: &JetStream, bucket: &str) -> Result<Self> {
        Ok(Self::new(js.kv(bucket).await?))
    }

    /// How often to check that the watch has delivered the bucket's latest revision (default
    /// [`DEFAULT_CHECK_EVERY`](Self::DEFAULT_CHECK_EVERY); at least 100 ms). A stalled watch is noticed within two
    /// periods; each check is one request to the bucket's stream leader.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use std::time::Duration;
    /// use polybus_compose::{Bus, KvSwitchSource};
    /// let js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").connect().await?;
    /// let source = KvSwitchSource::open(&js, "polybus-switches")
    ///     .await?
    ///     .check_every(Duration::from_secs(2));
    /// let bus = Bus::builder()
    ///     .nats("nats://127.0.0.1:4222")
    ///     .kafka("localhost:9092")
    ///     .switch_source(source)
    ///     .build()
    ///     .await?;
    /// # bus.close().await?; Ok(()) }
    /// ```
    pub fn check_every(mut self, every: Duration) -> Self {
        self.check_every = every.max(Duration::from_millis(100));
        self
    }

    /// The watched bucket.
    pub fn bucket(&self) -> &KvBucket {
        &self.bucket
    }
}

impl fmt::Debug for KvSwitchSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvSwitchSource")
            .field("bucket", &self.bucket.name())
            .field("check_every", &self.check_every)
            .finish()
    }
}

impl SwitchSource for KvSwitchSource {
    fn run(self: Box<Self>, handle: SwitchHandle) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let name = self.bucket.name().to_owned();
            // The highest revision the switches reflect.
            let mut seen = 0;
            let mut reopen = REOPEN_MIN;
            loop {
                // A new watch replays the latest value of every key, so it covers every
                // revision the bucket has before it is opened.
                let floor = self.bucket.last_revision().await.ok();
                let why = match self.bucket.watch_all().await {
                    Ok(watch) => {
                        seen = seen.max(floor.unwrap_or(0));
                        let mut watch = std::pin::pin!(watch);
                        let mut checks = tokio::time::interval_at(
                            tokio::time::Instant::now() + self.check_every,
                            self.check_every,
                        );
                        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        // A revision the bucket had at the previous check.
                        let mut due: Option<u64> = None;
                        loop {
                            tokio::select! {
                                item = watch.next() => match item {
                                    Some(Ok(entry)) => {
                                        seen = seen.max(entry.revision);
                                        reopen = REOPEN_MIN;
                                        apply_entry(&handle, &name, &entry);
                                    }
                                    Some(Err(e)) => break format!("the watch failed: {e}"),
                                    None => break "the watch ended".to_owned(),
                                },
                                _ = checks.tick() => {
                                    if let Some(rev) = due.filter(|rev| seen < *rev) {
                                        break format!(
                                            "the watch has not delivered revision {rev} after \
                                             {:?} (last delivered: {seen})",
                                            self.check_every
                                        );
                                    }
                                    // Unanswered (no stream leader yet): check again next time.
                                    due = self.bucket.last_revision().await.ok();
                                }
                            }
                        }
                    }
                    Err(e) => format!("cannot watch: {e}"),
                };
                tracing::warn!(bucket = %name, reason = %why, retry_in = ?reopen, "re-opening the switch watch");
                tokio::time::sleep(reopen).await;
                reopen = (reopen * 2).min(REOPEN_MAX);
            }
        })
    }
}

fn apply_entry(handle: &SwitchHandle, bucket: &str, entry: &KvEntry) {
    let value = match entry.operation {
        KvOperation::Put => match std::str::from_utf8(&entry.value) {
            Ok(v) => Some(v.to_owned()),
            Err(_) => {
                tracing::warn!(bucket, key = %entry.key, "switch value is not UTF-8; ignored");
                return;
            }
        },
        _ => None,
    };
    let mut switches = handle.get();
    match switches.apply(&entry.key, value.as_deref()) {
        Ok(true) => {
            tracing::info!(
                bucket,
                key = %entry.key,
                value = value.as_deref().unwrap_or("<deleted>"),
                revision = entry.revision,
                "switch key changed in NATS KV"
            );
            handle.set(switches);
        }
        Ok(false) => tracing::debug!(bucket, key = %entry.key, "unknown switch key ignored"),
        Err(e) => tracing::warn!(bucket, key = %entry.key, error = %e, "switch value ignored"),
    }
}

/// Writes `switches` to `bucket` (all of [`SWITCH_KEYS`]), as an operator would with
/// `nats kv put`.
///
/// # Errors
/// The bucket's errors.
pub async fn write_switches(bucket: &KvBucket, switches: Switches) -> Result<()> {
    let on_off = |b: bool| if b { "on" } else { "off" };
    bucket
        .put("dual_write", on_off(switches.dual_write()))
        .await?;
    let channel = match switches.single_channel() {
        crate::Channel::Kafka => "kafka",
        _ => "nats",
    };
    bucket.put("single_channel", channel).await?;
    bucket
        .put("pause_forwarding", on_off(switches.pause_forwarding()))
        .await?;
    Ok(())
}

/// A [`DedupStore`] in a NATS KV bucket, so consumers in several processes share what was
/// processed. Keys expire with the bucket's `max_age` (the TTL given to
/// [`open`](Self::open)). Each key holds the highest version recorded, updated with
/// compare-and-set on the revision.
#[derive(Clone)]
pub struct KvDedupStore {
    bucket: KvBucket,
}

impl KvDedupStore {
    /// A store over `bucket` (its `max_age` is the TTL).
    pub fn new(bucket: KvBucket) -> Self {
        KvDedupStore { bucket }
    }

    /// Opens (creating if needed) the bucket `bucket` with keys expiring after `ttl`.
    ///
    /// # Errors
    /// As [`JetStream::kv_with`].
    pub async fn open(js: &JetStream, bucket: &str, ttl: Duration) -> Result<Self> {
        let bucket = js
            .kv_with(kv::Config {
                bucket: bucket.to_owned(),
                history: 1,
                max_age: ttl,
                ..Default::default()
            })
            .await?;
        Ok(Self::new(bucket))
    }
}

impl fmt::Debug for KvDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvDedupStore")
            .field("bucket", &self.bucket.name())
            .finish()
    }
}

impl DedupStore for KvDedupStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<u64>>> {
        Box::pin(async move {
            let entry = self.bucket.entry(&kv_key(key)).await?;
            Ok(entry.and_then(|e| live_version(&e)))
        })
    }

    fn record<'a>(&'a self, key: &'a str, version: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let key = kv_key(key);
            let value = version.to_string();
            let mut last = None;
            for _ in 0..5 {
                let attempt = match self.bucket.entry(&key).await? {
                    Some(e) if e.operation == KvOperation::Put => {
                        if live_version(&e).is_some_and(|v| v >= version) {
                            return Ok(());
                        }
                        self.bucket
                            .update(&key, value.clone(), e.revision)
                            .await
                            .map(drop)
                    }
                    // Missing or deleted: a put is fine (create would refuse a deleted key).
                    Some(_) => self.bucket.put(&key, value.clone()).await.map(drop),
                    None => self.bucket.create(&key, value.clone()).await.map(drop),
                };
                match attempt {
                    Ok(()) => return Ok(()),
                    // Someone wrote meanwhile: read again.
                    Err(e) if e.kind() == ErrorKind::Rejected => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                Error::new(ErrorKind::Rejected, crate::BACKEND)
                    .with_message("dedup record contended")
            }))
        })
    }
}

fn live_version(e: &KvEntry) -> Option<u64> {
    if e.operation != KvOperation::Put {
        return None;
    }
    std::str::from_utf8(&e.value).ok()?.trim().parse().ok()
}

/// A NATS KV key for an arbitrary dedup key: ASCII letters, digits, `-` and `_` stay; every
/// other byte becomes `=XX` (hex), so keys are legal and distinct.
pub(crate) fn kv_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 8);
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push('=');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keys_are_legal_and_distinct() {
        let a = kv_key("billing/id:urn:polybus 0191-x.y");
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b))
        );
        assert_ne!(kv_key("a.b"), kv_key("a_b"));
        assert_ne!(kv_key("a=2Eb"), kv_key("a.b"));
        assert_eq!(kv_key("é"), "=C3=A9");
    }
}
