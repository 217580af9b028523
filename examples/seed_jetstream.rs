//! The seed's JetStream snippet (seed 000, "NATS JetStream（草案）"), with only the crate
//! paths changed; the ack follows DESIGN.md. Needs nats-server with JetStream on
//! 127.0.0.1:4222.

use polybus::nats_client::jetstream::{JsConsumer, JsProducer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let p = JsProducer::connect("nats://127.0.0.1:4222", "stream", "subject").await?;
    let mut c = JsConsumer::connect("nats://127.0.0.1:4222", "stream", "consumer").await?;
    p.send(b"hello").await?;
    let msg = c.next().await?;
    println!(
        "received {:?} (stream sequence {:?}, delivery {})",
        String::from_utf8_lossy(msg.payload()),
        msg.sequence(),
        msg.delivery_count()
    );
    msg.ack().await?;
    // Acks are queued, not confirmed: drain the connection before the process exits.
    c.close().await?;
    Ok(())
}
