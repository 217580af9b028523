//! The seed's Kafka snippet, verbatim modulo paths (`c12_middlewares` -> `polybus_kafka`).
//! Needs a Kafka-protocol broker on localhost:9092 (`cargo xtask broker up kafka`).

use polybus::mq::{MessageConsumer, MessageProducer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    demo_kafka().await
}

async fn demo_kafka() -> anyhow::Result<()> {
    use polybus::kafka_client::{KafkaConfig, KafkaConsumer, KafkaProducer};

    let cfg = KafkaConfig::new("localhost:9092", "g1")
        .with_idempotent_producer(true)
        .with_auto_offset_reset("earliest");

    let producer = KafkaProducer::new_with_config(&cfg)?;
    let mut consumer = KafkaConsumer::new_with_config(&cfg, &["t"])?;

    producer.send("t", b"hello").await?; // 幂等生产建议开启
    let msg = consumer.next().await?; // 消费后按策略提交位点
    println!(
        "received {:?} from {}",
        String::from_utf8_lossy(msg.payload()),
        msg.topic()
    );
    msg.ack().await?;
    consumer.close().await?;
    Ok(())
}
