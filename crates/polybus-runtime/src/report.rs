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
