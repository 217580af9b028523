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
