//! `Publisher::publish_batch` scenarios, shared by the backends whose batch path is their own
//! (JetStream, Kafka).
//!
//! Unlike the [`suite`](crate::suite), they take the adapter's publisher and consumer, set up
//! by the backend's test: the receipts' positions are consecutive only within one stream or
//! partition (a Kafka topic made with one partition), and a backend may want a small send
//! queue that the batch has to wait on. What is the backend's own (JetStream's duplicate
//! receipts, Kafka's partition) its test checks on what the scenario returns.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use futures_util::StreamExt as _;
use polybus_core::{Consumer, ErrorKind, Event, Publisher, Receipt};

use crate::support::numbered;

/// Publishes `n` events (payloads `batch-0`, `batch-1`, ...) to `topic` with one
/// `publish_batch` and checks the answer: one receipt per event, in the events' order, at
/// consecutive positions, each naming `topic`, none a duplicate. Then `consumer` (subscribed
/// afterwards, reading from the start) delivers them in the batch's order, each within
/// `within`; each is acked.
///
/// `topic` must be one stream or one partition, fresh. Returns the events sent and their
/// receipts.
///
/// # Errors
/// A failed publish or delivery, or any check above.
pub async fn publish_batch_in_order<P: Publisher, C: Consumer>(
    publisher: &P,
    consumer: &C,
    topic: &str,
    n: usize,
    within: Duration,
) -> Result<(Vec<Event>, Vec<Receipt>)> {
    let events: Vec<Event> = (0..n).map(|i| numbered("batch", i)).collect();
    let receipts = publisher
        .publish_batch(topic, events.clone())
        .await
        .with_context(|| format!("publish_batch of {n} events to {topic}"))?;
    ensure!(
        receipts.len() == n,
        "{} receipts for {n} events",
        receipts.len()
    );
    let positions = receipts
        .iter()
        .map(|r| r.sequence().context("a receipt without a position"))
        .collect::<Result<Vec<u64>>>()?;
    if let Some(&first) = positions.first() {
        let expected: Vec<u64> = (first..).take(n).collect();
        ensure!(
            positions == expected,
            "receipts are not in the order of the events, stored one after the other: {positions:?}"
        );
    }
    for (i, r) in receipts.iter().enumerate() {
        ensure!(r.topic() == topic, "receipt {i} names {}", r.topic());
        ensure!(!r.is_duplicate(), "receipt {i} is a duplicate");
    }

    let mut deliveries = std::pin::pin!(consumer.subscribe(topic));
    for (i, sent) in events.iter().enumerate() {
        let d = tokio::time::timeout(within, deliveries.next())
            .await
            .with_context(|| format!("event {i} not delivered within {within:?}"))?
            .context("the subscription ended")??;
        ensure!(
            d.payload() == sent.data().as_ref(),
            "event {i} delivered out of order: {:?}",
            String::from_utf8_lossy(d.payload())
        );
        ensure!(d.event().id() == sent.id(), "event {i}: another id");
        d.ack().await?;
    }
    Ok((events, receipts))
}

/// `publish_batch` is all or nothing, with typed errors, and closes `publisher`:
///
/// * a batch holding a payload of `oversized` bytes (over the backend's limit) between two
///   valid events fails with `PayloadTooLarge` and sends nothing: the next single publish to
///   `topic` (fresh) is stored at `first_position`, the topic's first position;
/// * an empty batch is no error and sends nothing;
/// * a batch to an invalid topic fails with `InvalidTopic`;
/// * after `close`, a batch fails with `Closed`.
///
/// # Errors
/// A failed publish or close, or any check above.
pub async fn publish_batch_all_or_nothing<P: Publisher>(
    publisher: &P,
    topic: &str,
    oversized: usize,
    first_position: u64,
) -> Result<()> {
    let events = vec![
        Event::new("a"),
        Event::new(vec![b'x'; oversized]),
        Event::new("c"),
    ];
    let err = publisher
        .publish_batch(topic, events)
        .await
        .err()
        .context("a batch with an oversized event was accepted")?;
    ensure!(err.kind() == ErrorKind::PayloadTooLarge, "{err}");
    let receipt = publisher.publish(topic, Event::new("after")).await?;
    ensure!(
        receipt.sequence() == Some(first_position),
        "something of the batch was stored: the next publish is at {:?}",
        receipt.sequence()
    );

    ensure!(publisher.publish_batch(topic, Vec::new()).await?.is_empty());
    let err = publisher
        .publish_batch("has space", vec![Event::new("x")])
        .await
        .err()
        .context("a batch to an invalid topic was accepted")?;
    ensure!(err.kind() == ErrorKind::InvalidTopic, "{err}");

    publisher.close().await?;
    let err = publisher
        .publish_batch(topic, vec![Event::new("late")])
        .await
        .err()
        .context("a batch after close was accepted")?;
    ensure!(err.kind() == ErrorKind::Closed, "{err}");
    Ok(())
}
