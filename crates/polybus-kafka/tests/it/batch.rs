//! `publish_batch` on Kafka: every record enqueued, then the delivery reports awaited in
//! order; all or a typed error.

use std::time::Duration;

use anyhow::Context as _;
use polybus_core::{ErrorKind, Event};
use polybus_kafka::{KafkaAdmin, KafkaConsumer, KafkaProducer};
use polybus_testkit::batch;

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
    let c = KafkaConsumer::new(&test_config(&b, &format!("g-{t}")))?;
    let (_, receipts) =
        batch::publish_batch_in_order(&p, &c, &t, 3000, Duration::from_secs(20)).await?;
    assert!(receipts.iter().all(|r| r.partition() == Some(0)));
    p.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn publish_batch_with_an_invalid_event_sends_nothing() -> anyhow::Result<()> {
    let b = brokers();
    let p = KafkaProducer::new_with_config(&test_config(&b, "batch-invalid"))?;
    // Over the producer's 1 MB message limit; a new topic's first offset is 0.
    let too_large = 2 * 1024 * 1024;
    batch::publish_batch_all_or_nothing(&p, &topic("batch-invalid"), too_large, 0).await
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
