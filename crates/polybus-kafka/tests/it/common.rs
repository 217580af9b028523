//! Shared helpers of the integration tests.

use std::time::Duration;

use polybus_kafka::KafkaConfig;

/// The shared broker (tansu by default).
pub(crate) fn brokers() -> String {
    std::env::var("POLYBUS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A config tuned for fast tests: short session and heartbeat, fast commits.
pub(crate) fn test_config(brokers: &str, group: &str) -> KafkaConfig {
    KafkaConfig::new(brokers, group)
        .with_auto_offset_reset("earliest")
        .with_session_timeout(Duration::from_secs(6), Duration::from_millis(500))
        .with_commit_interval(Duration::from_millis(200))
        .with_connect_timeout(Duration::from_secs(10))
        .set("fetch.wait.max.ms", "50")
        .set("topic.metadata.refresh.interval.ms", "2000")
}

/// A unique topic name.
#[allow(dead_code)]
pub(crate) fn topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
