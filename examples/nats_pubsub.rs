//! Core NATS publish/subscribe with queue groups: two groups each get every event, and the two
//! members of a group share them. Needs nats-server (`POLYBUS_NATS_URL`, default
//! nats://127.0.0.1:4222).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use polybus::nats::{NatsConsumer, NatsOptions};
use polybus::{Consumer, Event, Publisher};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let subject = "examples.orders.created";

    // Group "billing" has two members; group "audit" has one.
    let billing_a = NatsConsumer::connect(&url).await?.queue_group("billing");
    let billing_b = NatsConsumer::connect(&url).await?.queue_group("billing");
    let audit = NatsConsumer::connect(&url).await?.queue_group("audit");
    let mut streams = vec![
        ("billing-a", Box::pin(billing_a.subscribe(subject))),
        ("billing-b", Box::pin(billing_b.subscribe(subject))),
        ("audit", Box::pin(audit.subscribe(subject))),
    ];
    // Poll each stream once so its subscription is registered before publishing.
    for (_, s) in &mut streams {
        let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
    }

    let producer = NatsOptions::new(&url)
        .source("urn:examples:shop")
        .producer()
        .await?;
    for i in 0..10 {
        let event = Event::builder()
            .kind("order.created")
            .key(format!("customer-{}", i % 3))
            .header("tenant", "eu")
            .content_type("application/json")
            .data(format!(r#"{{"order":{i}}}"#))
            .build()?;
        producer.publish(subject, event).await?;
    }
    producer.close().await?; // flushes: nothing buffered is lost

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (name, stream) in &mut streams {
        while let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(300), stream.next()).await
        {
            let delivery = delivery?;
            *counts.entry(*name).or_default() += 1;
            delivery.ack().await?; // a no-op: core NATS is at-most-once
        }
    }
    println!("deliveries per member: {counts:?}");
    assert_eq!(counts.get("audit"), Some(&10), "audit gets every event");
    assert_eq!(
        counts.get("billing-a").unwrap_or(&0) + counts.get("billing-b").unwrap_or(&0),
        10,
        "billing members share the events"
    );
    println!(
        "slow-consumer drops: {}",
        billing_a.slow_consumer_drops() + billing_b.slow_consumer_drops()
    );
    Ok(())
}
