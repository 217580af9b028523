//! Shared helpers: broker address from the environment, fresh names.

use std::time::Duration;

use polybus_mqtt::{MqttClient, MqttConfig};

/// The shared broker: `POLYBUS_MQTT_HOST` / `POLYBUS_MQTT_PORT` (default 127.0.0.1:1883).
pub(crate) fn broker() -> (String, u16) {
    let host = std::env::var("POLYBUS_MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("POLYBUS_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    (host, port)
}

/// A fresh, MQTT-legal topic.
pub(crate) fn topic() -> String {
    format!("polybus/test/{}", uuid::Uuid::new_v4().simple())
}

/// A fresh client id.
pub(crate) fn client_id(what: &str) -> String {
    format!("polybus-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A config for the shared broker with a fresh client id.
pub(crate) fn config(what: &str) -> MqttConfig {
    let (host, port) = broker();
    MqttConfig::new(host, port, client_id(what)).connect_timeout(Duration::from_secs(5))
}

/// Connects to the shared broker.
#[allow(dead_code)]
pub(crate) async fn connect(what: &str) -> polybus_core::Result<MqttClient> {
    config(what).connect().await
}
