//! polybus metrics in Prometheus: installs `metrics-exporter-prometheus` as the `metrics`
//! recorder, runs a little traffic through core NATS and JetStream on 127.0.0.1:4222 (publishes,
//! acks, a nack and its redelivery, one delivery left in flight, a refused publish) and prints
//! the scrape. Every metric is described in docs/METRICS.md.
//!
//! ```text
//! cargo run -p polybus-examples --example metrics_prometheus
//! ```
//!
//! In a service: install the recorder first, then build producers and consumers (their metric
//! handles bind to the recorder present when they are created), and serve `handle.render()` on
//! your `/metrics` endpoint (or enable the exporter's HTTP listener).

use std::time::Duration;

use futures_util::StreamExt;
use polybus::jetstream::{JsOptions, StreamPolicy, StreamSettings};
use polybus::nats_client::{NatsConsumer, NatsProducer};
use polybus::{Consumer, Event, MessageConsumer, Publisher};

const URL: &str = "nats://127.0.0.1:4222";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let run = uuid_like();

    // Core NATS: 10 events published and consumed.
    let subject = format!("polybus.example.metrics.{run}");
    let mut consumer = NatsConsumer::connect(URL).await?;
    MessageConsumer::subscribe(&mut consumer, &subject).await?;
    let producer = NatsProducer::connect(URL).await?;
    for i in 0..10 {
        let ev = Event::builder()
            .kind("order.created")
            .data(format!("{{\"id\":{i}}}"))
            .build()?;
        producer.publish(&subject, ev).await?;
    }
    for _ in 0..10 {
        MessageConsumer::next(&mut consumer).await?.ack().await?;
    }
    // A refused publish: counted in polybus_publish_errors_total{kind="invalid_topic"}.
    let _ = producer.publish("bad subject", Event::new(b"x")).await;

    // JetStream: a nack and its redelivery, and one delivery still in flight at the scrape.
    let js = JsOptions::new(URL)
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "POLYBUS_EXAMPLE_".into(),
        })
        .stream_settings(StreamSettings::default().max_age(Duration::from_secs(600)))
        .connect()
        .await?;
    let topic = format!("polybus.example.metrics.js.{run}");
    let jsp = js.producer();
    for i in 0..3 {
        jsp.publish(&topic, Event::new(format!("job {i}"))).await?;
    }
    let jsc = js.consumer(Some("metrics-example"));
    let mut jobs = std::pin::pin!(jsc.subscribe(&topic));
    let first = jobs.next().await.expect("open")?;
    first.nack(Duration::ZERO).await?;
    let mut held = None;
    let mut acked = 0;
    while acked < 3 {
        let d = jobs.next().await.expect("open")?;
        if held.is_none() && !d.is_redelivered() {
            held = Some(d); // stays in flight until the scrape
        } else {
            d.ack().await?;
            acked += 1;
        }
        if acked == 2 && held.is_some() {
            break;
        }
    }

    let scrape = handle.render();
    println!("{scrape}");
    assert!(scrape.contains("polybus_published_total{system=\"nats\"} 10"));
    assert!(scrape.contains("polybus_redelivered_total{system=\"jetstream\"}"));

    if let Some(d) = held {
        d.ack().await?;
    }
    let stream = js.stream_for(&topic).await?;
    js.context().delete_stream(&stream).await?;
    producer.close().await?;
    consumer.close().await?;
    Ok(())
}

/// A short unique suffix for this run's subjects.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}
