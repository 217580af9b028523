//! `polybus::connect(url)` reaches each real broker and round-trips an event.
#![cfg(feature = "full")]

use std::time::Duration;

use futures_util::StreamExt;
use polybus::{Consumer, Event, Publisher};

async fn round_trip(url: &str, settle: Duration) -> anyhow::Result<()> {
    let (publisher, consumer) = polybus::connect(url).await?;
    let topic = format!("polybus-url-{}", polybus::new_id());
    let mut stream = Box::pin(consumer.subscribe(&topic)).peekable();
    // Start the subscription (and let a Kafka group join) before publishing.
    let _ = tokio::time::timeout(settle, std::pin::Pin::new(&mut stream).peek()).await;
    let event = Event::builder().kind("url.test").data("via url").build()?;
    publisher.publish(&topic, event.clone()).await?;
    let got = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
    anyhow::ensure!(
        got.event().id() == event.id(),
        "{url}: got {:?}",
        got.event()
    );
    anyhow::ensure!(got.event().kind() == "url.test");
    got.ack().await?;
    publisher.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn nats_url() -> anyhow::Result<()> {
    round_trip(
        "nats://127.0.0.1:4222?group=url",
        Duration::from_millis(200),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn jetstream_url() -> anyhow::Result<()> {
    round_trip(
        "jetstream://127.0.0.1:4222?group=url",
        Duration::from_millis(500),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn kafka_url() -> anyhow::Result<()> {
    round_trip("kafka://127.0.0.1:9092?group=url", Duration::from_secs(3)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn mqtt_url() -> anyhow::Result<()> {
    round_trip("mqtt://127.0.0.1:1883", Duration::from_millis(500)).await
}
