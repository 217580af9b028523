//! Retry policy of the Kafka forward: exponential backoff with jitter, and which failures
//! count towards dead-lettering.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use polybus_core::{Error, ErrorKind};

type Classifier = dyn Fn(&Error) -> bool + Send + Sync;

/// How failed forwards are retried and when an event is dead-lettered.
///
/// A failed forward is retried after `initial_backoff × multiplier^(n-1)` (capped at
/// `max_backoff`), each delay scaled by a random factor in `[1 - jitter, 1 + jitter]` so that
/// many forwarders do not retry in lock-step.
///
/// Failures are of two sorts:
/// * **the event's fault** (by default every error that is not
///   [`is_retryable`](Error::is_retryable) and not [`ErrorKind::Closed`]: a rejected record,
///   an oversized payload, an invalid topic, a missing permission). They count: after
///   `max_attempts` of them the event goes to the dead-letter topic;
/// * **the downstream is unavailable** (connection lost, timeout, closed): retried with the
///   same backoff for as long as it takes, without counting, so a Kafka outage fills the spool
///   instead of the dead-letter topic.
///
/// [`dead_letter_if`](Self::dead_letter_if) replaces the classification.
///
/// ```
/// use std::time::Duration;
/// use polybus_compose::RetryPolicy;
/// let p = RetryPolicy::default()
///     .max_attempts(3)
///     .initial_backoff(Duration::from_millis(10))
///     .jitter(0.0);
/// assert_eq!(p.backoff(1), Duration::from_millis(10));
/// assert_eq!(p.backoff(3), Duration::from_millis(40));
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    multiplier: f64,
    jitter: f64,
    counts: Arc<Classifier>,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms initial backoff doubling up to 5 s, jitter 0.2.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
            counts: Arc::new(default_counts),
        }
    }
}

fn default_counts(e: &Error) -> bool {
    !e.is_retryable() && e.kind() != ErrorKind::Closed
}

impl RetryPolicy {
    /// Failed attempts (of the event's fault) before the event is dead-lettered (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// The first backoff delay.
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }
    /// The longest backoff delay.
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }
    /// The growth factor between attempts (at least 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 2.0 };
        self
    }
    /// The jitter fraction, from 0 (none) to 1.
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() {
            j.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }
    /// Decides which errors count towards dead-lettering (`true`: the event's fault).
    pub fn dead_letter_if(mut self, f: impl Fn(&Error) -> bool + Send + Sync + 'static) -> Self {
        self.counts = Arc::new(f);
        self
    }

    /// The configured attempt limit.
    pub fn attempts_limit(&self) -> u32 {
        self.max_attempts
    }

    /// Whether `error` counts towards dead-lettering.
    pub fn counts(&self, error: &Error) -> bool {
        (self.counts)(error)
    }

    /// The delay before retry number `failures` (1 for the first retry), without jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        self.backoff_with(failures, 0.5)
    }

    /// The delay before retry number `failures` with jitter drawn from the thread RNG.
    pub fn backoff_jittered(&self, failures: u32) -> Duration {
        self.backoff_with(failures, rand::random::<f64>())
    }

    /// The delay for `failures` with `unit` in `[0, 1)` choosing the point in the jitter range
    /// (0.5 is the middle, i.e. no jitter).
    pub(crate) fn backoff_with(&self, failures: u32, unit: f64) -> Duration {
        let exp = i32::try_from(failures.saturating_sub(1).min(64)).unwrap_or(64);
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        let max = self.max_backoff.as_secs_f64();
        let base = base.min(max);
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let secs = (base * factor).clamp(0.0, max);
        // `as_secs_f64` rounds: a result a hair over the maximum (or beyond `Duration`) is the
        // maximum.
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("multiplier", &self.multiplier)
            .field("jitter", &self.jitter)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let p = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(1))
            .jitter(0.0);
        let got: Vec<_> = (1..=6).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(0).as_millis(), 100);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_its_range_and_under_the_cap() {
        let p = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(150))
            .jitter(0.5);
        assert_eq!(p.backoff_with(1, 0.0), Duration::from_millis(50));
        assert_eq!(p.backoff_with(1, 1.0), Duration::from_millis(150));
        // 200 ms capped at 150, then +50% is capped again.
        assert_eq!(p.backoff_with(2, 1.0), Duration::from_millis(150));
        for _ in 0..1000 {
            let d = p.backoff_jittered(1);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(150));
        }
        // Different draws differ (jitter is on).
        let draws: std::collections::HashSet<_> = (0..50).map(|_| p.backoff_jittered(1)).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn classifies_outages_as_not_counting() {
        let p = RetryPolicy::default();
        assert!(!p.counts(&Error::new(ErrorKind::Connect, "kafka")));
        assert!(!p.counts(&Error::new(ErrorKind::Timeout, "kafka")));
        assert!(!p.counts(&Error::new(ErrorKind::Closed, "kafka")));
        assert!(p.counts(&Error::new(ErrorKind::Rejected, "kafka")));
        assert!(p.counts(&Error::new(ErrorKind::PayloadTooLarge, "kafka")));
        let all = p.dead_letter_if(|_| true);
        assert!(all.counts(&Error::new(ErrorKind::Timeout, "kafka")));
    }
}
