//! The retry policy: how many attempts, how long between them, and how a retry is made.

use std::time::Duration;

/// Exponential backoff with jitter, and a bound on attempts.
///
/// The delay before attempt `n + 1` (after attempt `n` failed) is
/// `min(initial * multiplier^(n-1), max)`, then jittered: a uniformly random part of
/// `jitter` (0 to 1) of it is taken off, so `jitter = 0.2` gives 80 % to 100 % of the nominal
/// delay and spreads out retries of many events failing together.
///
/// ```
/// use std::time::Duration;
/// use polybus_runtime::RetryPolicy;
/// let p = RetryPolicy::exponential(Duration::from_millis(100))
///     .max_attempts(4)
///     .max_delay(Duration::from_millis(250))
///     .jitter(0.0);
/// assert_eq!(p.delay(1), Duration::from_millis(100));
/// assert_eq!(p.delay(2), Duration::from_millis(200));
/// assert_eq!(p.delay(3), Duration::from_millis(250));
/// assert_eq!(p.attempts(), 4);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling up to 30 s, 20 % jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The default policy starting at `initial`.
    pub fn exponential(initial: Duration) -> Self {
        RetryPolicy {
            initial,
            ..RetryPolicy::default()
        }
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
    /// Sets the longest delay.
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }
    /// Sets the growth factor (at least 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 1.0 };
        self
    }
    /// Sets the jitter, 0 (none) to 1 (anywhere between 0 and the nominal delay).
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() {
            j.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }
    /// How many attempts an event gets in all.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }
    /// The nominal delay after attempt `attempt` failed, before jitter.
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64);
        let factor = self.multiplier.powi(exp as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::try_from_secs_f64(secs).unwrap_or(self.max)
    }
    /// The delay after attempt `attempt` failed, jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let d = self.nominal_delay(attempt);
        if self.jitter == 0.0 {
            return d;
        }
        let cut = self.jitter * rand::random::<f64>();
        d.mul_f64(1.0 - cut)
    }
}

/// How a failed event is tried again.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryMode {
    /// [`Redeliver`](Self::Redeliver) where the consumer's
    /// [`Capabilities::nack_delay`](polybus_core::Capabilities::nack_delay) is true (memory,
    /// JetStream, Kafka), [`InProcess`](Self::InProcess) where it is not (core NATS, MQTT).
    #[default]
    Auto,
    /// `nack(delay)`: the broker (or the adapter) delivers the event again after the delay
    /// and counts the attempt (`delivery_count`). The event's slot is free meanwhile, so later
    /// events with the same key may be handled before the retry (as the broker would deliver
    /// them anyway).
    Redeliver,
    /// Hold the delivery and call the handler again after the delay, in the same key lane:
    /// per-key order is kept, and on at-most-once backends (core NATS, MQTT) it is the only
    /// retry that loses nothing more than the backend already loses. Chosen over republishing
    /// to the topic because a republish is a new event for every other subscriber and group
    /// of that topic, and needs headers to carry the attempt count. The lane (not a
    /// concurrency slot) waits during the delay; a shutdown ends the wait and releases the
    /// delivery.
    InProcess,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_band() {
        let p = RetryPolicy::exponential(Duration::from_millis(1000)).jitter(0.25);
        for _ in 0..200 {
            let d = p.delay(1);
            assert!(
                d <= Duration::from_millis(1000) && d >= Duration::from_millis(750),
                "{d:?}"
            );
        }
    }

    #[test]
    fn large_attempts_saturate_at_max() {
        let p = RetryPolicy::default().jitter(0.0);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(30));
        assert_eq!(RetryPolicy::none().attempts(), 1);
        assert_eq!(
            RetryPolicy::default().multiplier(f64::NAN).nominal_delay(5),
            Duration::from_millis(200)
        );
    }
}
