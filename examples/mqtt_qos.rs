//! MQTT QoS 0, 1 and 2, retained messages and manual acks.
//!
//! Every publish resolves when the broker acknowledged it: QoS 0 when written, QoS 1 on
//! PUBACK, QoS 2 on PUBCOMP. A QoS 1/2 delivery is acknowledged to the broker only by
//! `ack()`.
//!
//! Needs mosquitto (`cargo xtask broker up mqtt`; `POLYBUS_MQTT_HOST`/`POLYBUS_MQTT_PORT`
//! override 127.0.0.1:1883). Run: `cargo run -p polybus-mqtt --example mqtt_qos`

use std::time::{Duration, Instant};

use polybus::mqtt::{MqttClient, QoS};
use polybus::{Event, Publisher};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("POLYBUS_MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("POLYBUS_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    let run = uuid_like();
    let topic = format!("polybus/examples/qos/{run}");

    let client = MqttClient::builder(&host, port, format!("polybus-qos-{run}"))
        .source("urn:polybus:examples:mqtt_qos")
        .connect()
        .await?;
    let producer = client.producer();
    let mut consumer = client.consumer();
    consumer.subscribe(&format!("{topic}/+"), 2).await?; // up to QoS 2, wildcard filter

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let ev = Event::builder()
            .kind("polybus.example.reading")
            .header("unit", "celsius")
            .content_type("text/plain")
            .data(format!("21.{}", qos.level()))
            .build()?;
        let started = Instant::now();
        producer
            .publish_event_with(&format!("{topic}/{}", qos.level()), ev, qos, false)
            .await?;
        println!(
            "QoS {} publish acknowledged after {:?}",
            qos.level(),
            started.elapsed()
        );
    }
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await??;
        println!(
            "got {} = {} {} (type {}, delivery #{})",
            d.topic(),
            String::from_utf8_lossy(d.payload()),
            d.event().headers().get("unit").unwrap_or("?"),
            d.event().kind(),
            d.delivery_count()
        );
        d.ack().await?;
    }

    // A retained message: the broker hands the last one to every new subscriber.
    let status = format!("{topic}/status");
    producer.publish_retained(&status, b"online", 1).await?;
    let late = MqttClient::builder(&host, port, format!("polybus-qos-late-{run}"))
        .connect()
        .await?;
    let mut late_consumer = late.consumer();
    late_consumer.subscribe(&status, 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), late_consumer.next()).await??;
    println!(
        "a late subscriber got the retained {:?}",
        String::from_utf8_lossy(d.payload())
    );
    d.ack().await?;
    // An empty retained payload clears it.
    producer.publish_retained(&status, b"", 1).await?;

    // nack does not exist in MQTT.
    Publisher::publish(&producer, &format!("{topic}/9"), Event::new("x")).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await??;
    let err = d.nack(Duration::ZERO).await.expect_err("unsupported");
    println!("nack: {}", err.error());
    err.into_delivery().ack().await?;

    late.close().await?;
    client.close().await?;
    Ok(())
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}
