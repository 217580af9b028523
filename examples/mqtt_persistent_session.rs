//! A persistent session: the consumer goes away, messages are published meanwhile, and the
//! consumer gets every one of them when it comes back with the same client id.
//!
//! `clean_start(false)` plus a session expiry ask the broker to keep the session (its
//! subscriptions and queued QoS 1/2 messages) while the client is away.
//!
//! Needs mosquitto (`cargo xtask broker up mqtt`; `POLYBUS_MQTT_HOST`/`POLYBUS_MQTT_PORT`
//! override 127.0.0.1:1883). Run: `cargo run -p polybus-mqtt --example mqtt_persistent_session`

use std::time::Duration;

use polybus::mqtt::{MqttClient, MqttConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = std::env::var("POLYBUS_MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("POLYBUS_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let topic = format!("polybus/examples/session/{run:x}");
    let client_id = format!("polybus-session-{run:x}");
    let persistent = || {
        MqttConfig::new(&host, port, &client_id)
            .clean_start(false)
            .session_expiry(Duration::from_secs(300))
    };

    // 1. The consumer subscribes, then goes away. The session stays on the broker.
    let consumer = persistent().connect().await?;
    consumer.consumer().subscribe(&topic, 1).await?;
    consumer.close().await?;
    println!("consumer {client_id} left; its session and subscription stay");

    // 2. Meanwhile, 10 QoS 1 messages are published (each acknowledged by the broker).
    let producer = MqttClient::connect(&host, port, format!("polybus-session-pub-{run:x}")).await?;
    let p = producer.producer();
    for i in 0..10 {
        p.publish(&topic, format!("missed-{i}"), 1).await?;
    }
    producer.close().await?;
    println!("published 10 messages while the consumer was away");

    // 3. The consumer comes back with the same client id and gets all of them.
    let consumer = persistent().connect().await?;
    let mut c = consumer.consumer();
    c.subscribe(&topic, 1).await?; // routes the session's messages to this consumer
    for _ in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
        println!("after reconnect: {}", String::from_utf8_lossy(d.payload()));
        d.ack().await?;
    }
    c.unsubscribe(&topic);
    consumer.close().await?;

    // 4. Clean up: a clean start with no expiry ends the session on the broker.
    MqttConfig::new(&host, port, &client_id)
        .clean_start(true)
        .connect()
        .await?
        .close()
        .await?;
    Ok(())
}
