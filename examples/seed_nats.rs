//! The seed's NATS snippet (seed 000, "NATS 示例"), with only the crate paths changed and a
//! `connect` where the seed's unit structs had none. Needs nats-server on 127.0.0.1:4222.

use polybus::mq::{MessageConsumer, MessageProducer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let prod = polybus::nats_client::NatsProducer::connect("nats://127.0.0.1:4222").await?;
    let mut cons = polybus::nats_client::NatsConsumer::connect("nats://127.0.0.1:4222").await?;
    cons.subscribe("t").await?;
    prod.send("t", b"hello").await?;
    let msg = cons.next().await?;
    assert_eq!(msg.payload(), b"hello");
    println!(
        "received {:?} on {}",
        String::from_utf8_lossy(msg.payload()),
        msg.topic()
    );
    Ok(())
}
