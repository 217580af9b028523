//! In-process counters, alongside the `metrics` facade, for tests, demos and health checks.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of what a [`Bus`](crate::Bus) did since it was built.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Publishes acknowledged to the caller.
    pub published: u64,
    /// Publishes that failed.
    pub publish_errors: u64,
    /// Events written to Kafka by the forwarders.
    pub forwarded: u64,
    /// Failed forward attempts (each is retried or dead-lettered).
    pub retries: u64,
    /// Events written to a dead-letter topic.
    pub dead_letters: u64,
    /// Spooled events not forwarded because Kafka already had them.
    pub forward_duplicates: u64,
    /// Events moved back from dead-letter topics.
    pub redriven: u64,
    /// Deliveries dropped by the consumer-side dedup layer of [`Bus::consume`](crate::Bus::consume).
    pub consume_duplicates: u64,
    /// Events in the spool now.
    pub spool_depth: u64,
    /// The most events the spool held at once.
    pub spool_max_depth: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) forward_duplicates: AtomicU64,
    pub(crate) redriven: AtomicU64,
    pub(crate) consume_duplicates: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, spool_depth: u64, spool_max_depth: u64) -> BusStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BusStats {
            published: get(&self.published),
            publish_errors: get(&self.publish_errors),
            forwarded: get(&self.forwarded),
            retries: get(&self.retries),
            dead_letters: get(&self.dead_letters),
            forward_duplicates: get(&self.forward_duplicates),
            redriven: get(&self.redriven),
            consume_duplicates: get(&self.consume_duplicates),
            spool_depth,
            spool_max_depth,
        }
    }
}
