//! Moving dead letters back to where they came from.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use polybus_core::dlq;
use polybus_core::{Consumer, Event, Publisher, Result};

/// Options of [`redrive`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// Stop after this long without a dead letter (default 2 s).
    pub idle: Duration,
    /// Stop after moving this many (default: no limit).
    pub max: usize,
    /// Publish to this topic instead of each dead letter's `x-original-topic`.
    pub to: Option<String>,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        RedriveOptions {
            idle: Duration::from_secs(2),
            max: usize::MAX,
            to: None,
        }
    }
}

impl RedriveOptions {
    /// Sets [`idle`](Self::idle).
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }
    /// Sets [`max`](Self::max).
    pub fn max(mut self, max: usize) -> Self {
        self.max = max;
        self
    }
    /// Sets [`to`](Self::to).
    pub fn to(mut self, topic: impl Into<String>) -> Self {
        self.to = Some(topic.into());
        self
    }
}

/// What [`redrive`] did.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Dead letters published back (headers stripped) and acknowledged.
    pub moved: usize,
    /// Dead letters the filter left (or without an original topic), published again to the
    /// dead-letter topic and acknowledged: they stay dead letters, at the end of the topic.
    pub kept: usize,
    /// Of the moved ones, those the target reported as duplicates of the original event (a
    /// backend that deduplicates by id, such as JetStream within its duplicate window, would
    /// drop them): published again under a new id, the old one in `x-original-id`.
    pub renamed: usize,
}

/// Reads `dead_letter_topic` with `consumer` (use a durable consumer group so the position
/// is kept) and, for each dead letter `filter` accepts, publishes it back to its
/// `x-original-topic` (or [`RedriveOptions::to`]) without the dead-letter headers, with its
/// id, key, payload and other headers, then acknowledges it. Dead letters the filter refuses
/// are published again to the dead-letter topic and acknowledged; meeting one of those again
/// ends the run (it is left unsettled, so it stays). Stops after
/// [`idle`](RedriveOptions::idle) without a dead letter, or after
/// [`max`](RedriveOptions::max) moved.
///
/// The format is [`polybus_core::dlq`], so this also redrives the composed bus's consumer-side
/// dead letters.
///
/// ```
/// use std::time::Duration;
/// use polybus_core::{Event, MemoryBroker, Publisher};
/// use polybus_core::dlq::DeadLetter;
/// use polybus_runtime::{RedriveOptions, redrive};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let broker = MemoryBroker::new();
/// let dlq = broker.consumer_group("redrive");
/// # use polybus_core::Consumer; drop(dlq.subscribe("orders.dlq"));
/// let dead = DeadLetter::new("orders", "timed out", "db", 5).apply(Event::new(b"x"));
/// broker.publisher().publish("orders.dlq", dead).await?;
/// let report = redrive(&dlq, "orders.dlq", &broker.publisher(), |_| true,
///     RedriveOptions::default().idle(Duration::from_millis(50))).await?;
/// assert_eq!(report.moved, 1);
/// # Ok(()) }
/// ```
///
/// # Errors
/// The first subscription or publish error; what was moved before it stays moved.
pub async fn redrive<C, P, F>(
    consumer: &C,
    dead_letter_topic: &str,
    publisher: &P,
    mut filter: F,
    options: RedriveOptions,
) -> Result<RedriveReport>
where
    C: Consumer,
    P: Publisher,
    F: FnMut(&Event) -> bool,
{
    let mut stream = std::pin::pin!(consumer.subscribe(dead_letter_topic));
    let mut report = RedriveReport::default();
    let mut kept_ids = HashSet::new();
    while report.moved < options.max {
        let delivery = match tokio::time::timeout(options.idle, stream.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(item)) => item?,
        };
        if kept_ids.contains(delivery.event().id()) {
            // Back to the first one we kept: everything before it is done.
            break;
        }
        let target = options.to.clone().or_else(|| {
            delivery
                .event()
                .headers()
                .get(dlq::X_ORIGINAL_TOPIC)
                .map(str::to_owned)
        });
        match target {
            Some(target) if filter(delivery.event()) => {
                let (event, _) = dlq::strip(delivery.event().clone());
                if publish_renaming_duplicates(publisher, &target, event).await? {
                    report.renamed += 1;
                }
                delivery.ack().await?;
                report.moved += 1;
            }
            _ => {
                kept_ids.insert(delivery.event().id().to_owned());
                publisher
                    .publish(dead_letter_topic, delivery.event().clone())
                    .await?;
                delivery.ack().await?;
                report.kept += 1;
            }
        }
    }
    tracing::info!(
        dead_letter_topic,
        moved = report.moved,
        kept = report.kept,
        "dead letters redriven"
    );
    Ok(report)
}

/// Publishes `event` to `topic`; when the backend reports it as a duplicate of an event it
/// already holds under the same id (JetStream's duplicate window, the composed bus), publishes
/// it again under a fresh id with the old one in `x-original-id`. Returns whether it renamed.
///
/// A backend that drops an id it has seen would otherwise drop a dead letter written to a
/// topic of the same stream as its original, or a redriven event whose id the target saw.
pub(crate) async fn publish_renaming_duplicates<P: Publisher + ?Sized>(
    publisher: &P,
    topic: &str,
    event: Event,
) -> Result<bool> {
    let receipt = publisher.publish(topic, event.clone()).await?;
    if !receipt.is_duplicate() {
        return Ok(false);
    }
    let mut renamed = event;
    let old = renamed.id().to_owned();
    renamed.set_id(polybus_core::new_id());
    renamed
        .headers_mut()
        .append_unchecked(dlq::X_ORIGINAL_ID, dlq::clean(&old));
    publisher.publish(topic, renamed).await?;
    Ok(true)
}
