//! What the runtime did with each delivery: [`Report`]s for tests and observers, and the
//! app's [`Status`].

use std::time::Duration;

use bytes::Bytes;

/// What happened to one delivery (one attempt, or one in-process retry).
///
/// Every settlement produces one report, handed to the observer set with
/// [`App::on_report`](crate::App::on_report) (the test harness records them).
#[derive(Debug, Clone)]
pub struct Report {
    pub(crate) topic: String,
    pub(crate) id: String,
    pub(crate) key: Option<Bytes>,
    pub(crate) attempt: u32,
    pub(crate) settlement: Settlement,
}

impl Report {
    /// The topic the event arrived on.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The event's id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The event's key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
    /// The attempt this report is about (1 the first time).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// What was done.
    pub fn settlement(&self) -> &Settlement {
        &self.settlement
    }
}

/// What the runtime did with a delivery.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Handled and acknowledged (after publishing what the handler returned).
    Acked,
    /// Failed; tried again after `after`, by redelivery (`nack(after)`) or in process.
    Retrying {
        /// The delay before the next attempt.
        after: Duration,
        /// Whether the runtime retries in process ([`RetryMode::InProcess`](crate::RetryMode)).
        in_process: bool,
    },
    /// Written to the dead-letter topic `topic`, then settled with `term`.
    DeadLettered {
        /// The dead-letter topic.
        topic: String,
        /// The `x-exception-kind` written.
        kind: String,
    },
    /// Given up without a dead-letter topic (the app has none): settled with `term`.
    Terminated {
        /// The kind of the last error.
        kind: String,
    },
    /// Not finished when the drain timeout ran out: handed back (`nack(0)` where the backend
    /// redelivers on nack, otherwise dropped unsettled, see its `Capabilities::unsettled`).
    Released,
    /// Settling failed (the broker refused the ack, the dead-letter publish failed); the
    /// delivery was left to the backend's redelivery.
    SettleFailed {
        /// The error, as text.
        error: String,
    },
}

impl Settlement {
    /// Whether the event is done with: acked, dead-lettered or terminated.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Settlement::Acked | Settlement::DeadLettered { .. } | Settlement::Terminated { .. }
        )
    }
}

/// Where an app is in its life.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not yet subscribed.
    Starting,
    /// Subscribed to every route's topic, taking deliveries.
    Running,
    /// Shutting down: no new deliveries, in-flight handlers finishing.
    Draining,
    /// Stopped: publishers flushed and closed.
    Stopped,
}

/// A live view of an app for health checks: where it is, how much it holds. Cheap to clone;
/// take it with [`App::health`](crate::App::health) before `run`.
///
/// ```
/// use polybus_runtime::{App, Status};
/// async fn handle() {}
/// let app = App::new().route("orders", handle);
/// let health = app.health();
/// assert_eq!(health.status(), Status::Starting);
/// assert!(health.is_live() && !health.is_ready());
/// ```
#[derive(Debug, Clone)]
pub struct Health {
    pub(crate) status: tokio::sync::watch::Receiver<Status>,
    pub(crate) counters: std::sync::Arc<HealthCounters>,
}

#[derive(Debug, Default)]
pub(crate) struct HealthCounters {
    pub(crate) held: std::sync::atomic::AtomicUsize,
    pub(crate) running: std::sync::atomic::AtomicUsize,
    pub(crate) subscription_errors: std::sync::atomic::AtomicU64,
}

/// Counts one unit in a counter until dropped.
#[derive(Debug)]
pub(crate) struct Counted(
    std::sync::Arc<HealthCounters>,
    fn(&HealthCounters) -> &std::sync::atomic::AtomicUsize,
);

impl Counted {
    pub(crate) fn new(
        c: &std::sync::Arc<HealthCounters>,
        which: fn(&HealthCounters) -> &std::sync::atomic::AtomicUsize,
    ) -> Self {
        which(c).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Counted(c.clone(), which)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Health {
    /// Where the app is.
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }
    /// Liveness: the app has not stopped.
    pub fn is_live(&self) -> bool {
        self.status() != Status::Stopped
    }
    /// Readiness: subscribed to every route's topic and taking deliveries.
    pub fn is_ready(&self) -> bool {
        self.status() == Status::Running
    }
    /// Handlers running now.
    pub fn in_flight(&self) -> usize {
        self.counters
            .running
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Deliveries taken from the consumer and not yet settled (running, waiting in a lane or
    /// for a retry in process).
    pub fn held(&self) -> usize {
        self.counters
            .held
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Subscription errors the app logged and went on after.
    pub fn subscription_errors(&self) -> u64 {
        self.counters
            .subscription_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
