//! The forwarders: one task per spool bucket, moving spooled events into Kafka.
//!
//! A bucket holds the events whose ordering key hashes to it, in spool order. Its forwarder
//! sends a window of up to `max_in_flight` of them concurrently (handed to the Kafka producer
//! in spool order, which keeps per-partition order with an idempotent producer), deletes the
//! ones Kafka acknowledged, and retries the others from the front of the bucket after a
//! backoff, so no later event of the bucket overtakes a failed one in a later window. Events
//! whose retries are exhausted become dead letters (written to the dead-letter topic by the
//! same path, so they stay in the spool until Kafka has them).
//!
//! A panic in the Kafka publisher (user code behind `kafka_publisher`) fails that send like an
//! error: retried, then dead-lettered. A panic anywhere else in a forwarder ends its task;
//! [`supervise`] logs it, counts it (`polybus_compose_forwarder_restarts_total`) and starts
//! the bucket's forwarder again after a backoff, from the spool: nothing spooled is left
//! behind, and what was in flight may be sent twice.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::join_all;
use polybus_core::{Error, ErrorKind, Event, Publisher};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::RetryPolicy;
use crate::codec::{RecordState, now_ms};
use crate::dlq::{self, DeadLetterTopic};
use crate::metrics as m;
use crate::spool::{Entry, Spool};
use crate::stats::Counters;
use crate::switches::Switches;

/// The life cycle the bus drives its forwarders through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Forward as events come.
    Running,
    /// Forward what is spooled until the spool bucket is empty or `deadline`, then stop.
    Draining { deadline: Instant },
    /// Stop now (the bus was dropped).
    Stop,
}

/// What every forwarder shares.
pub(crate) struct Shared<K> {
    pub(crate) spool: Arc<Spool>,
    pub(crate) kafka: Arc<K>,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letters: DeadLetterTopic,
    pub(crate) counters: Arc<Counters>,
    pub(crate) max_in_flight: usize,
}

struct Pending {
    entry: Entry,
    retry_at: Option<Instant>,
}

enum Outcome {
    Forwarded,
    DeadLettered,
    Skipped,
    Failed(Error),
}

/// Runs the forwarder of `bucket` (a task from `start`) and starts it again whenever it
/// panics, after a backoff from `retry`, until it ends on its own (the phase said stop, or the
/// bus is gone). Returns how often it restarted.
pub(crate) async fn supervise<F, Fut>(
    bucket: u32,
    retry: RetryPolicy,
    mut phase: watch::Receiver<Phase>,
    start: F,
) -> u32
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut restarts: u32 = 0;
    loop {
        let panic = match tokio::spawn(start()).await {
            Ok(()) => return restarts,
            Err(e) if e.is_panic() => panic_message(&*e.into_panic()),
            Err(_) => return restarts, // cancelled: the runtime is shutting down
        };
        restarts = restarts.saturating_add(1);
        let delay = retry.backoff_jittered(restarts);
        metrics::counter!(m::FORWARDER_RESTARTS, "bucket" => bucket.to_string()).increment(1);
        tracing::error!(
            bucket,
            restarts,
            ?delay,
            panic,
            "a forwarder panicked; starting it again from the spool"
        );
        if *phase.borrow_and_update() == Phase::Stop {
            return restarts;
        }
        pause(delay, &mut phase).await;
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// `kafka.publish` with a panic turned into an error of this send.
async fn publish_caught<K: Publisher>(kafka: &K, topic: &str, event: Event) -> Result<(), Error> {
    let send = std::panic::AssertUnwindSafe(async { kafka.publish(topic, event).await });
    match send.catch_unwind().await {
        Ok(r) => r.map(drop),
        Err(payload) => Err(
            Error::new(ErrorKind::Other, crate::BACKEND).with_message(format!(
                "the Kafka publisher panicked: {}",
                panic_message(&*payload)
            )),
        ),
    }
}

/// Runs the forwarder of `bucket` until the phase says stop.
pub(crate) async fn run<K: Publisher + 'static>(
    bucket: u32,
    sh: Arc<Shared<K>>,
    mut switches: watch::Receiver<Switches>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut cursor: u64 = 0;
    let window = sh.max_in_flight.max(1);
    loop {
        let ph = *phase.borrow_and_update();
        let sw = *switches.borrow_and_update();
        let deadline = match ph {
            Phase::Stop => break,
            Phase::Draining { deadline } => Some(deadline),
            Phase::Running => None,
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if !sw.forwarding_active() {
            if deadline.is_some() {
                // Held forwards stay in the spool for the next run.
                break;
            }
            if !changed(&mut switches, &mut phase).await {
                break;
            }
            continue;
        }

        // Refill from the spool, in sequence order.
        if pending.len() < window {
            let reader = sh.spool.reader();
            let (from, want) = (cursor, window.saturating_mul(2) - pending.len());
            match tokio::task::spawn_blocking(move || reader.read_bucket(bucket, from, want)).await
            {
                Ok(Ok(entries)) => {
                    for entry in entries {
                        cursor = entry.seq + 1;
                        pending.push_back(Pending {
                            entry,
                            retry_at: None,
                        });
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(bucket, error = %e, "reading the spool failed; retrying");
                    pause(Duration::from_secs(1), &mut phase).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(bucket, error = %e, "spool reader task failed");
                    pause(Duration::from_secs(1), &mut phase).await;
                    continue;
                }
            }
        }

        if pending.is_empty() {
            if deadline.is_some() {
                break; // drained
            }
            let notified = sh.spool.notified(bucket).notified();
            tokio::select! {
                _ = notified => {}
                alive = changed(&mut switches, &mut phase) => if !alive { break },
            }
            continue;
        }

        // The head of the bucket may be waiting for its backoff.
        if let Some(at) = pending.front().and_then(|p| p.retry_at)
            && at > Instant::now()
        {
            if deadline.is_some_and(|d| at >= d) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                alive = changed(&mut switches, &mut phase) => if !alive { break },
            }
            continue;
        }

        // The window: in order, one event per dedup key (a second copy waits for the first).
        let now = Instant::now();
        let mut keys = HashSet::new();
        let mut n = 0;
        for p in pending.iter().take(window) {
            if n > 0 && p.retry_at.is_some_and(|at| at > now) {
                break;
            }
            if !keys.insert(p.entry.record.event.dedup_key()) {
                break;
            }
            n += 1;
        }
        let batch: Vec<Pending> = pending.drain(..n).collect();

        let already = forwarded_before(&sh, &batch).await;
        let sends = batch.iter().zip(&already).map(|(p, already)| {
            let sh = &sh;
            async move {
                let record = &p.entry.record;
                match record.state {
                    RecordState::Forward if *already => Outcome::Skipped,
                    RecordState::Forward => {
                        match publish_caught(&*sh.kafka, &record.topic, record.event.clone()).await
                        {
                            Ok(()) => Outcome::Forwarded,
                            Err(e) => Outcome::Failed(e),
                        }
                    }
                    RecordState::DeadLetter => {
                        let topic = sh.dead_letters.topic_for(&record.topic);
                        match publish_caught(&*sh.kafka, &topic, dlq::from_record(record)).await {
                            Ok(()) => Outcome::DeadLettered,
                            Err(e) => Outcome::Failed(e),
                        }
                    }
                }
            }
        });
        // Wait for the sends, watching the phase: a close that starts meanwhile bounds the wait
        // by its drain deadline (a send that never ends must not hold close()).
        let outcomes = {
            let mut sends = std::pin::pin!(join_all(sends));
            loop {
                let ph = *phase.borrow_and_update();
                match ph {
                    Phase::Stop => break None,
                    Phase::Draining { deadline } => {
                        break tokio::time::timeout_at(deadline, &mut sends).await.ok();
                    }
                    Phase::Running => tokio::select! {
                        o = &mut sends => break Some(o),
                        r = phase.changed() => if r.is_err() { break None },
                    },
                }
            }
        };
        // None: past the drain deadline or stopped; whatever was in flight stays spooled.
        let Some(outcomes) = outcomes else { break };

        let mut done = Vec::new();
        let mut done_keys = Vec::new();
        let mut failed = Vec::new();
        let mut first_error: Option<(u32, String)> = None;
        for (mut p, outcome) in batch.into_iter().zip(outcomes) {
            let rec = &mut p.entry.record;
            match outcome {
                Outcome::Skipped => {
                    Counters::add(&sh.counters.forward_duplicates, 1);
                    metrics::counter!(m::FORWARD_DEDUP).increment(1);
                    done.push(p.entry.seq);
                }
                Outcome::Forwarded => {
                    Counters::add(&sh.counters.forwarded, 1);
                    metrics::counter!(m::FORWARDED).increment(1);
                    let ms = now_ms().saturating_sub(rec.enqueued_ms);
                    metrics::histogram!(m::FORWARD_LATENCY).record(ms as f64 / 1000.0);
                    done.push(p.entry.seq);
                    done_keys.push(rec.event.dedup_key());
                }
                Outcome::DeadLettered => {
                    Counters::add(&sh.counters.dead_letters, 1);
                    metrics::counter!(m::DEAD_LETTERS).increment(1);
                    tracing::warn!(
                        id = rec.event.id(),
                        topic = %rec.topic,
                        dead_letter_topic = %sh.dead_letters.topic_for(&rec.topic),
                        attempts = rec.attempts,
                        error = rec.last_error.as_deref().unwrap_or(""),
                        "event dead-lettered"
                    );
                    done.push(p.entry.seq);
                }
                Outcome::Failed(e) => {
                    Counters::add(&sh.counters.retries, 1);
                    metrics::counter!(m::RETRIES).increment(1);
                    if rec.state == RecordState::Forward {
                        rec.attempts = rec.attempts.saturating_add(1);
                        rec.last_error = Some(e.to_string());
                        rec.last_error_kind = Some(e.kind().as_str().to_owned());
                        if sh.retry.counts(&e) {
                            rec.failures = rec.failures.saturating_add(1);
                            if rec.failures >= sh.retry.attempts_limit() {
                                rec.state = RecordState::DeadLetter;
                            }
                        }
                    }
                    tracing::debug!(
                        bucket,
                        id = rec.event.id(),
                        attempts = rec.attempts,
                        error = %e,
                        "forward failed; will retry"
                    );
                    if first_error.is_none() {
                        first_error = Some((rec.attempts.max(1), e.to_string()));
                    }
                    if let Err(e) = sh.spool.update(bucket, p.entry.seq, rec).await {
                        tracing::debug!(error = %e, "spool update failed");
                    }
                    failed.push(p);
                }
            }
        }
        if !done.is_empty()
            && let Err(e) = sh.spool.complete(bucket, done, done_keys).await
        {
            tracing::error!(bucket, error = %e, "deleting forwarded events failed; they may be sent again");
        }
        if let Some((attempts, error)) = first_error {
            let delay = sh.retry.backoff_jittered(attempts);
            tracing::info!(bucket, failed = failed.len(), ?delay, %error, "forward failed; backing off");
            let at = polybus_core::time::deadline_after(delay);
            for mut p in failed.into_iter().rev() {
                p.retry_at = Some(at);
                pending.push_front(p);
            }
        }
    }
}

/// Which events of `batch` Kafka already has (producer-side dedup through the spool).
async fn forwarded_before<K>(sh: &Shared<K>, batch: &[Pending]) -> Vec<bool> {
    if !sh.spool.remembers_forwarded() {
        return vec![false; batch.len()];
    }
    let keys: Vec<String> = batch
        .iter()
        .map(|p| p.entry.record.event.dedup_key())
        .collect();
    let reader = sh.spool.reader();
    match tokio::task::spawn_blocking(move || reader.forwarded(&keys)).await {
        Ok(Ok(v)) => v
            .into_iter()
            .zip(batch)
            .map(|(hit, p)| hit && p.entry.record.state == RecordState::Forward)
            .collect(),
        _ => vec![false; batch.len()],
    }
}

/// Waits for a switch or phase change; `false` when the bus is gone.
async fn changed(
    switches: &mut watch::Receiver<Switches>,
    phase: &mut watch::Receiver<Phase>,
) -> bool {
    tokio::select! {
        r = switches.changed() => r.is_ok(),
        r = phase.changed() => r.is_ok(),
    }
}

async fn pause(d: Duration, phase: &mut watch::Receiver<Phase>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        r = phase.changed() => if r.is_err() { tokio::time::sleep(d).await },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_forwarder_that_panics_is_started_again_until_it_ends() {
        let (_phase_tx, phase) = watch::channel(Phase::Running);
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let retry = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(1))
            .max_backoff(Duration::from_millis(5));
        let restarts = supervise(0, retry, phase, move || {
            let runs = counted.clone();
            async move {
                assert!(runs.fetch_add(1, Ordering::SeqCst) >= 2, "forwarder bug");
            }
        })
        .await;
        assert_eq!(restarts, 2);
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
