//! The retry policy the composed bus and the runtime share: how many attempts, how long
//! between them, and which failures count.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, ErrorKind};

type Classifier = dyn Fn(&Error) -> bool + Send + Sync;

/// Exponential backoff with jitter, a bound on attempts, and which failures count towards it.
///
/// One type for every user: the composed bus's Kafka forward
/// (`polybus_compose::BusBuilder::retry`) and the runtime's handlers
/// (`polybus_runtime::App::retry`, `RetryLayer`), re-exported by both crates.
///
/// **Delay.** After attempt `n` failed, the next comes after
/// `min(initial × multiplier^(n-1), max)`, jittered: a uniformly random part of `jitter`
/// (0 to 1) of it is taken off, so `jitter = 0.2` waits 80 % to 100 % of the nominal delay.
/// Retries of many events failing together spread out, and no delay exceeds the maximum.
///
/// **Attempts.** An event gets `max_attempts` attempts in all; after as many failures that
/// [`counts`](Self::counts) it is dead-lettered. By default the failures that count are the
/// event's fault: every error that is not [`is_retryable`](Error::is_retryable) and not
/// [`ErrorKind::Closed`] (a rejected record, an oversized payload, an invalid topic, a missing
/// permission). An unavailable downstream (connection lost, timeout, closed) does not count:
/// the bus retries it with the same backoff for as long as it takes, so a Kafka outage fills
/// the spool instead of the dead-letter topic. [`dead_letter_if`](Self::dead_letter_if)
/// replaces the classification; the runtime decides by the handler's outcome instead and does
/// not consult it.
///
/// Two vocabularies name the same settings, both kept: the bus's
/// ([`initial_backoff`](Self::initial_backoff), [`max_backoff`](Self::max_backoff),
/// [`backoff`](Self::backoff), [`backoff_jittered`](Self::backoff_jittered),
/// [`attempts_limit`](Self::attempts_limit)) and the runtime's
/// ([`exponential`](Self::exponential), [`max_delay`](Self::max_delay),
/// [`nominal_delay`](Self::nominal_delay), [`delay`](Self::delay), [`attempts`](Self::attempts)).
///
/// ```
/// use std::time::Duration;
/// use polybus_core::RetryPolicy;
/// let p = RetryPolicy::exponential(Duration::from_millis(100))
///     .max_attempts(4)
///     .max_delay(Duration::from_millis(250))
///     .jitter(0.0);
/// assert_eq!(p.delay(1), Duration::from_millis(100));
/// assert_eq!(p.delay(2), Duration::from_millis(200));
/// assert_eq!(p.delay(3), Duration::from_millis(250));
/// assert_eq!(p.attempts(), 4);
///
/// // The same policy in the bus's words.
/// let q = RetryPolicy::default()
///     .initial_backoff(Duration::from_millis(100))
///     .max_backoff(Duration::from_millis(250))
///     .max_attempts(4)
///     .jitter(0.0);
/// assert_eq!(p, q);
/// assert_eq!(q.backoff(2), Duration::from_millis(200));
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    /// `None`: the default classification.
    counts: Option<Arc<Classifier>>,
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling up to 30 s, 20 % jitter, the default classification.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
            counts: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy starting at `initial`.
    pub fn exponential(initial: Duration) -> Self {
        RetryPolicy::default().initial_backoff(initial)
    }
    /// No retry: the first failure dead-letters.
    pub fn none() -> Self {
        RetryPolicy::default().max_attempts(1)
    }
    /// Sets how many attempts an event gets in all (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Sets the first delay.
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }
    /// Sets the longest delay.
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }
    /// Sets the longest delay: [`max_delay`](Self::max_delay) in the bus's words.
    pub fn max_backoff(self, max: Duration) -> Self {
        self.max_delay(max)
    }
    /// Sets the growth factor between attempts (at least 1; a value that is not finite is 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 1.0 };
        self
    }
    /// Sets the jitter, 0 (none) to 1 (anywhere between 0 and the nominal delay); a value that
    /// is not finite is 0.
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() {
            j.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }
    /// Decides which errors count towards dead-lettering (`true`: the event's fault).
    ///
    /// ```
    /// use polybus_core::{Error, ErrorKind, RetryPolicy};
    /// let p = RetryPolicy::default();
    /// assert!(!p.counts(&Error::new(ErrorKind::Timeout, "kafka")));
    /// let every = p.dead_letter_if(|_| true);
    /// assert!(every.counts(&Error::new(ErrorKind::Timeout, "kafka")));
    /// ```
    pub fn dead_letter_if(mut self, f: impl Fn(&Error) -> bool + Send + Sync + 'static) -> Self {
        self.counts = Some(Arc::new(f));
        self
    }

    /// How many attempts an event gets in all.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }
    /// How many attempts an event gets in all: [`attempts`](Self::attempts) in the bus's
    /// words.
    pub fn attempts_limit(&self) -> u32 {
        self.attempts()
    }
    /// Whether `error` counts towards dead-lettering.
    pub fn counts(&self, error: &Error) -> bool {
        match &self.counts {
            Some(f) => f(error),
            None => !error.is_retryable() && error.kind() != ErrorKind::Closed,
        }
    }

    /// The delay after attempt `attempt` failed (1 for the first), before jitter.
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        self.jittered(attempt, 0.0)
    }
    /// The delay after attempt `failures` failed, before jitter: [`nominal_delay`](Self::nominal_delay)
    /// in the bus's words.
    pub fn backoff(&self, failures: u32) -> Duration {
        self.nominal_delay(failures)
    }
    /// The delay after attempt `attempt` failed, jittered (a draw from the thread's RNG).
    pub fn delay(&self, attempt: u32) -> Duration {
        if self.jitter == 0.0 {
            return self.nominal_delay(attempt);
        }
        self.jittered(attempt, rand::random::<f64>())
    }
    /// The delay after attempt `failures` failed, jittered: [`delay`](Self::delay) in the
    /// bus's words.
    pub fn backoff_jittered(&self, failures: u32) -> Duration {
        self.delay(failures)
    }

    /// The delay after attempt `attempt` failed with `unit` (0 to 1) of the jitter taken off:
    /// 0 is the nominal delay, 1 the shortest.
    fn jittered(&self, attempt: u32, unit: f64) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1).min(64)).unwrap_or(64);
        let max = self.max.as_secs_f64();
        let nominal = (self.initial.as_secs_f64() * self.multiplier.powi(exp)).min(max);
        let secs = nominal * (1.0 - self.jitter * unit.clamp(0.0, 1.0));
        // `as_secs_f64` rounds: a result a hair over the maximum (or beyond `Duration`) is the
        // maximum.
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

impl PartialEq for RetryPolicy {
    /// Equal settings, and the same classifier: both the default, or the same one (a clone of
    /// the policy that set it).
    fn eq(&self, other: &Self) -> bool {
        let same_counts = match (&self.counts, &other.counts) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.max_attempts == other.max_attempts
            && self.initial == other.initial
            && self.max == other.max
            && self.multiplier == other.multiplier
            && self.jitter == other.jitter
            && same_counts
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("initial", &self.initial)
            .field("max", &self.max)
            .field("multiplier", &self.multiplier)
            .field("jitter", &self.jitter)
            .field(
                "counts",
                &if self.counts.is_some() {
                    "custom"
                } else {
                    "default"
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let p = RetryPolicy::exponential(Duration::from_millis(100))
            .max_delay(Duration::from_secs(1))
            .jitter(0.0);
        let got: Vec<_> = (1..=6).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(0).as_millis(), 100);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
        assert_eq!(
            RetryPolicy::default().jitter(0.0).delay(u32::MAX),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn jitter_takes_off_at_most_its_part() {
        let p = RetryPolicy::exponential(Duration::from_millis(1000)).jitter(0.25);
        assert_eq!(p.jittered(1, 0.0), Duration::from_millis(1000));
        assert_eq!(p.jittered(1, 1.0), Duration::from_millis(750));
        for _ in 0..1000 {
            let d = p.delay(1);
            assert!(
                d <= Duration::from_millis(1000) && d >= Duration::from_millis(750),
                "{d:?}"
            );
        }
        // Different draws differ (jitter is on).
        let draws: std::collections::HashSet<_> = (0..50).map(|_| p.delay(1)).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn extremes_stay_within_the_maximum() {
        let p = RetryPolicy::exponential(Duration::MAX)
            .max_delay(Duration::MAX)
            .jitter(0.5);
        assert_eq!(p.nominal_delay(u32::MAX), Duration::MAX);
        assert!(p.delay(u32::MAX) <= Duration::MAX);
        let nan = RetryPolicy::default().multiplier(f64::NAN).jitter(f64::NAN);
        assert_eq!(nan.nominal_delay(5), Duration::from_millis(200));
        assert_eq!(nan.delay(5), Duration::from_millis(200));
        assert_eq!(RetryPolicy::none().attempts(), 1);
        assert_eq!(RetryPolicy::default().max_attempts(0).attempts_limit(), 1);
    }

    #[test]
    fn classifies_outages_as_not_counting() {
        let p = RetryPolicy::default();
        assert!(!p.counts(&Error::new(ErrorKind::Connect, "kafka")));
        assert!(!p.counts(&Error::new(ErrorKind::Timeout, "kafka")));
        assert!(!p.counts(&Error::new(ErrorKind::Closed, "kafka")));
        assert!(p.counts(&Error::new(ErrorKind::Rejected, "kafka")));
        assert!(p.counts(&Error::new(ErrorKind::PayloadTooLarge, "kafka")));
        let all = p.clone().dead_letter_if(|_| true);
        assert!(all.counts(&Error::new(ErrorKind::Timeout, "kafka")));
        assert_ne!(p, all);
        assert_eq!(all, all.clone());
        assert_ne!(all, p.dead_letter_if(|_| true));
    }
}
