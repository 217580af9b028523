//! `publish_batch` on Kafka: every record enqueued, then the delivery reports awaited in
//! order; all or a typed error.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_kafka::{KafkaAdmin, KafkaConsumer, KafkaProducer};

use crate::common::{brokers, test_config, topic};

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn publish_batch_writes_in_order_with_receipts_in_order() -> anyhow::Result<()> {
    let b = brokers();
    let t = topic("batch");
    KafkaAdmin::new(&test_config(&b, "batch-admin"))?
        .create_topic(&t, 1, 1)
        .await?;
    // A small librdkafka queue: the batch of 3 000 has to wait for reports to fit.
    let p = KafkaProducer::new_with_config(&test_config(&b, "batch").with_queue_capacity(500))?;
    let events: Vec<Event> = (0..3000).map(|i| Event::new(format!("{i}"))).collect();
    let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let receipts = Publisher::publish_batch(&p, &t, events).await?;
    assert_eq!(receipts.len(), 3000);
    let offsets: Vec<u64> = receipts
        .iter()
        .map(|r| r.sequence().expect("an offset"))
        .collect();
    let first = offsets[0];
    assert_eq!(
        offsets,
        (first..first + 3000).collect::<Vec<_>>(),
        "receipts in the order of the events, written one after the other"
    );
    assert!(
        receipts
            .iter()
            .all(|r| r.partition() == Some(0) && r.topic() == t)
    );

    let c = KafkaConsumer::new(&test_config(&b, &format!("g-{t}")))?;
    let mut s = c.subscribe(&t);
    for (i, id) in ids.iter().enumerate() {
        let d = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .with_context(|| format!("record {i} not delivered"))?
            .context("the stream ended")??;
        assert_eq!(d.payload(), format!("{i}").as_bytes());
        assert_eq!(d.event().id(), id);
        d.ack().await?;
    }
    p.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn publish_batch_with_an_invalid_event_sends_nothing() -> anyhow::Result<()> {
    let b = brokers();
    let t = topic("batch-invalid");
    let p = KafkaProducer::new_with_config(&test_config(&b, "batch-invalid"))?;
    let too_large = vec![b'x'; 2 * 1024 * 1024];
    let events = vec![Event::new("a"), Event::new(too_large), Event::new("c")];
    let err = p.publish_batch(&t, events).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    let receipt = p.publish(&t, Event::new("after")).await?;
    assert_eq!(
        receipt.sequence(),
        Some(0),
        "nothing of the batch was written"
    );
    assert!(p.publish_batch(&t, Vec::new()).await?.is_empty());
    let err = p
        .publish_batch("bad topic!", vec![Event::new("x")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic);
    p.close().await?;
    let err = p
        .publish_batch(&t, vec![Event::new("late")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    Ok(())
}

/// Single publishes: with more in flight than librdkafka's queue holds, each waits for room
/// (the publish future's slow path) instead of failing; receipts name their own topic while
/// the producer alternates between two (its last-topic cache), and a topic published to for
/// the first time is checked (an invalid one fails, a new one is created).
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn single_publishes_wait_for_room_and_switch_topics() -> anyhow::Result<()> {
    let b = brokers();
    let (t1, t2) = (topic("single-a"), topic("single-b"));
    let p = KafkaProducer::new_with_config(&test_config(&b, "single").with_queue_capacity(100))?;
    let publishes = (0..2000).map(|i| {
        let (p, t) = (&p, if i % 2 == 0 { &t1 } else { &t2 });
        async move {
            let r = p.publish(t, Event::new(format!("{i}"))).await?;
            anyhow::ensure!(
                r.topic() == t.as_str(),
                "receipt of {i} names {}",
                r.topic()
            );
            let position = (r.partition(), r.sequence().context("an offset")?);
            Ok::<_, anyhow::Error>((i % 2, position))
        }
    });
    let done = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::try_join_all(publishes),
    )
    .await
    .context("2 000 publishes within 60 s")??;
    for side in 0..2 {
        let mut positions: Vec<(Option<i32>, u64)> = done
            .iter()
            .filter(|(s, _)| *s == side)
            .map(|(_, o)| *o)
            .collect();
        positions.sort_unstable();
        positions.dedup();
        assert_eq!(
            positions.len(),
            1000,
            "1 000 distinct positions on each topic"
        );
    }
    let err = p.publish("bad topic!", Event::new("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic);
    // The cache holds a checked topic only: the same bad name fails again.
    let err = p.publish("bad topic!", Event::new("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic);
    p.close().await?;
    let err = p.publish(&t1, Event::new("late")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    Ok(())
}
