//! Publishes keyed CloudEvents to Kafka and prints each receipt (partition, offset).
//! `POLYBUS_KAFKA_BROKERS` (default 127.0.0.1:9092).

use polybus::Event;
use polybus::kafka::{KafkaConfig, KafkaProducer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let brokers =
        std::env::var("POLYBUS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let cfg = KafkaConfig::new(brokers, "unused").with_source("urn:polybus:examples");
    let producer = KafkaProducer::new_with_config(&cfg)?;
    for i in 0..6 {
        let event = Event::builder()
            .kind("order.created")
            .key(format!("customer-{}", i % 3)) // same key => same partition, in order
            .content_type("application/json")
            .header("tenant", "eu")
            .data(format!(r#"{{"order":{i}}}"#))
            .build()?;
        let receipt = producer.publish("orders.created", event).await?;
        println!(
            "order {i}: partition {:?} offset {:?}",
            receipt.partition(),
            receipt.sequence()
        );
    }
    producer.close().await?;
    Ok(())
}
