//! The seed's MQTT snippet (seed 000, `mq-mqtt`), verbatim but for the crate path.
//!
//! Needs mosquitto on 127.0.0.1:1883 (`cargo xtask broker up mqtt`).
//! Run: `cargo run -p polybus-mqtt --example seed_mqtt`

use polybus::mq::{MessageConsumer, MessageProducer};
use polybus::mqtt_client::{MqttConsumer, MqttProducer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // --- the seed ---
    let (p, mut c) = MqttProducer::connect("127.0.0.1", 1883, "client-1").await?;
    c.subscribe("t", 1).await?; // QoS 1
    p.publish("t", b"hello", 1).await?;
    let msg = c.next().await?;
    // --- end of the seed ---
    println!(
        "received {:?} on {} (QoS 1, id {})",
        String::from_utf8_lossy(msg.payload()),
        msg.topic(),
        msg.event().id()
    );
    msg.ack().await?; // the PUBACK goes out only now (manual acks)

    // The seed's generic interface works on the same pair.
    p.send("t", b"hello via MessageProducer::send").await?;
    let msg = MessageConsumer::next(&mut c).await?;
    println!("received {:?}", String::from_utf8_lossy(msg.payload()));
    msg.ack().await?;

    let _: &MqttConsumer = &c;
    p.close().await?;
    Ok(())
}
