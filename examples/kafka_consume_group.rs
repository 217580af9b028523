//! Two members of one consumer group share a topic; each acks what it processes, and the
//! group's per-partition lag is printed at the end. `POLYBUS_KAFKA_BROKERS` (default
//! 127.0.0.1:9092).

use std::time::Duration;

use futures_util::StreamExt as _;
use polybus::kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
use polybus::{Consumer, Event};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let brokers =
        std::env::var("POLYBUS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = format!("example-group-{}", polybus::new_id());
    let group = format!("billing-{}", polybus::new_id());
    let cfg = KafkaConfig::new(brokers, group)
        .with_auto_offset_reset("earliest")
        .with_session_timeout(Duration::from_secs(6), Duration::from_millis(500));

    let consumer = KafkaConsumer::new(&cfg)?;
    let mut members = [consumer.subscribe(&topic), consumer.subscribe(&topic)];

    let producer = KafkaProducer::new_with_config(&cfg)?;
    for i in 0..20 {
        let ev = Event::builder()
            .key(format!("k{i}"))
            .data(format!("invoice-{i}"))
            .build()?;
        producer.publish(&topic, ev).await?;
    }

    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done < 20 && tokio::time::Instant::now() < deadline {
        for (m, stream) in members.iter_mut().enumerate() {
            if let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(100), stream.next()).await
            {
                let d = d?;
                println!(
                    "member {m}: {} (partition {:?}, offset {:?})",
                    String::from_utf8_lossy(d.payload()),
                    d.partition(),
                    d.sequence()
                );
                d.ack().await?;
                done += 1;
            }
        }
    }
    for (m, stream) in members.iter().enumerate() {
        for lag in stream.lag().await? {
            println!(
                "member {m}: {}/{} lag {}",
                lag.topic, lag.partition, lag.lag
            );
        }
    }
    anyhow::ensure!(done == 20, "processed {done} of 20");
    Ok(())
}
