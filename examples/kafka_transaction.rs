//! Seed 7.5's Kafka transaction: consume-transform-produce with the consumed offsets committed
//! in the same transaction. Runs against librdkafka's MockCluster by default (it answers the
//! transaction API but writes no transaction markers); set `POLYBUS_KAFKA_TXN_BROKERS` to run
//! it against Apache Kafka (tansu has no transactions).

use std::time::Duration;

use polybus::Event;
use polybus::kafka::rdkafka::mocking::MockCluster;
use polybus::kafka::{KafkaConfig, KafkaConsumer, KafkaProducer, KafkaTransactionalProducer};
use polybus::mq::MessageConsumer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (input, output) = ("orders", "orders.enriched");
    let mock;
    let (brokers, create_topics) = match std::env::var("POLYBUS_KAFKA_TXN_BROKERS") {
        Ok(b) => (b, true),
        Err(_) => {
            mock = MockCluster::new(3)?;
            mock.create_topic(input, 1, 1)?;
            mock.create_topic(output, 1, 1)?;
            println!("using a MockCluster at {}", mock.bootstrap_servers());
            (mock.bootstrap_servers(), false)
        }
    };
    let group = format!("enricher-{}", polybus::new_id());
    let base = KafkaConfig::new(brokers, group).with_create_topics(create_topics);

    let plain = KafkaProducer::new_with_config(&base)?;
    for i in 0..3 {
        plain
            .publish(input, Event::new(format!("order-{i}")))
            .await?;
    }

    let cfg = base
        .with_transactional_id(format!("enricher-{}", polybus::new_id()))
        .with_auto_commit(false);
    let producer = KafkaTransactionalProducer::new_with_config(&cfg)?;
    producer.init_transactions().await?;
    let mut consumer = KafkaConsumer::new_with_config(&cfg, &[input])?;
    for _ in 0..3 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await??;
        let enriched = Event::new(format!(
            "{}:enriched",
            String::from_utf8_lossy(msg.payload())
        ));
        // begin, publish, send_offsets_to_transaction, commit (abort and redeliver on error)
        producer
            .transact(&consumer, vec![msg], vec![(output.to_owned(), enriched)])
            .await?;
        println!("committed one transaction");
    }
    consumer.close().await?;
    Ok(())
}
