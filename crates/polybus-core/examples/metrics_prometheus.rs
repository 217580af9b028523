//! polybus metrics in Prometheus: installs `metrics-exporter-prometheus` as the `metrics`
//! recorder, runs a little traffic through the in-memory broker (publishes, acks, a nack and
//! its redelivery, one delivery left in flight) and prints the scrape.
//!
//! ```text
//! cargo run -p polybus-core --example metrics_prometheus
//! ```
//!
//! With a real broker it is the same: install the recorder first, then build the producers
//! and consumers (their metric handles bind to the recorder present when they are created),
//! and serve `handle.render()` on your `/metrics` endpoint.

use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::{Consumer, Event, MemoryBroker, Publisher};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;

    let broker = MemoryBroker::new();
    let publisher = broker.publisher();
    let consumer = broker.consumer_group("billing");
    let mut orders = std::pin::pin!(consumer.subscribe("orders.created"));

    for i in 0..10 {
        publisher
            .publish(
                "orders.created",
                Event::builder()
                    .kind("order.created")
                    .data(format!("{{\"id\":{i}}}"))
                    .build()?,
            )
            .await?;
    }
    // A bad topic: counted in polybus_publish_errors_total{kind="invalid_topic"}.
    let _ = publisher.publish("", Event::new(b"x")).await;

    for _ in 0..8 {
        let d = orders.next().await.expect("open")?;
        d.ack().await?;
    }
    let d = orders.next().await.expect("open")?;
    d.nack(Duration::ZERO).await?;
    let _held = orders.next().await.expect("open")?; // in flight while we scrape
    let again = orders.next().await.expect("open")?; // the nack'ed one, redelivered
    again.ack().await?;

    let scrape = handle.render();
    println!("{scrape}");
    assert!(scrape.contains("polybus_published_total{system=\"memory\"} 10"));
    assert!(scrape.contains("polybus_deliveries_in_flight{system=\"memory\"} 1"));
    Ok(())
}
