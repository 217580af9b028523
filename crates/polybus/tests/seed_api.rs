//! The seed documents' snippets, as DESIGN.md 'The seed API, exactly' writes them, compiled and
//! run against the local brokers on their default ports (one function per snippet). Only
//! `c12_middlewares` became `polybus`, and `connect` calls replace the seed's unit structs.
#![cfg(feature = "full")]

use polybus::mq::{MessageConsumer, MessageProducer};

/// Durable consumers may hold messages from earlier runs: ack them until our "hello" (within
/// 30 s).
async fn ack_until_hello(consumer: &mut impl MessageConsumer) -> anyhow::Result<()> {
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let msg = consumer.next().await?;
            let ours = msg.payload() == b"hello";
            msg.ack().await?;
            if ours {
                return anyhow::Ok(());
            }
        }
    })
    .await?
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn seed_nats() -> anyhow::Result<()> {
    let prod = polybus::nats_client::NatsProducer::connect("nats://127.0.0.1:4222").await?;
    let mut cons = polybus::nats_client::NatsConsumer::connect("nats://127.0.0.1:4222").await?;
    cons.subscribe("t").await?;
    prod.send("t", b"hello").await?;
    let msg = cons.next().await?;
    assert_eq!(msg.payload(), b"hello");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn seed_jetstream() -> anyhow::Result<()> {
    use polybus::nats_client::jetstream::{JsConsumer, JsProducer};
    let p = JsProducer::connect("nats://127.0.0.1:4222", "stream", "subject").await?;
    let mut c = JsConsumer::connect("nats://127.0.0.1:4222", "stream", "consumer").await?;
    p.send(b"hello").await?;
    ack_until_hello(&mut c).await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn seed_kafka() -> anyhow::Result<()> {
    use polybus::kafka_client::{KafkaConfig, KafkaConsumer, KafkaProducer};
    let cfg = KafkaConfig::new("localhost:9092", "g1")
        .with_idempotent_producer(true)
        .with_auto_offset_reset("earliest");
    let producer = KafkaProducer::new_with_config(&cfg)?;
    let mut consumer = KafkaConsumer::new_with_config(&cfg, &["t"])?;
    producer.send("t", b"hello").await?;
    ack_until_hello(&mut consumer).await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn seed_compose() -> anyhow::Result<()> {
    // The seed writes `./spool`; a temp dir keeps the source tree clean.
    let spool = std::env::temp_dir().join("polybus-seed-compose-spool");
    let bus = polybus::compose::Bus::builder()
        .nats("nats://127.0.0.1:4222")
        .kafka("localhost:9092")
        .spool_dir(spool)
        .build()
        .await?;
    bus.publish("orders.created", bytes::Bytes::from_static(b"{...}"))
        .await?;
    anyhow::ensure!(
        bus.wait_forwarded(std::time::Duration::from_secs(30)).await,
        "forwarded to Kafka"
    );
    bus.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn seed_mqtt() -> anyhow::Result<()> {
    use polybus::mqtt_client::{MqttConsumer, MqttProducer};
    let (p, mut c): (MqttProducer, MqttConsumer) =
        MqttProducer::connect("127.0.0.1", 1883, "client-1").await?;
    c.subscribe("t", 1).await?; // QoS 1
    p.publish("t", b"hello", 1).await?;
    let msg = c.next().await?;
    assert_eq!(msg.payload(), b"hello");
    msg.ack().await?;
    Ok(())
}
