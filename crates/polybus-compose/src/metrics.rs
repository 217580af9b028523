//! Metric names, reported through the [`metrics`](https://docs.rs/metrics) facade. Install any
//! recorder (Prometheus exporter, ...) to collect them; without one they cost next to nothing.

/// Counter: events acknowledged by [`Bus::publish`](crate::Bus::publish).
pub const PUBLISHED: &str = "polybus_compose_published_total";
/// Counter: publishes that failed (label `kind`: the error kind code,
/// [`polybus_core::metrics::kind_code`]).
pub const PUBLISH_ERRORS: &str = "polybus_compose_publish_errors_total";
/// Histogram (seconds): time from `publish` call to acknowledgement.
pub const ACK_LATENCY: &str = "polybus_compose_ack_latency_seconds";
/// Histogram (seconds): time of the NATS/JetStream publish alone.
pub const NATS_LATENCY: &str = "polybus_compose_nats_latency_seconds";
/// Counter: events written to Kafka by the forwarders.
pub const FORWARDED: &str = "polybus_compose_forwarded_total";
/// Histogram (seconds): time from entering the spool to the Kafka acknowledgement.
pub const FORWARD_LATENCY: &str = "polybus_compose_forward_latency_seconds";
/// Counter: failed forward attempts that will be retried.
pub const RETRIES: &str = "polybus_compose_retries_total";
/// Counter: events written to a dead-letter topic.
pub const DEAD_LETTERS: &str = "polybus_compose_dead_letters_total";
/// Counter: events moved back from a dead-letter topic by `redrive`.
pub const REDRIVEN: &str = "polybus_compose_redriven_total";
/// Counter: spooled events not forwarded because Kafka already had them (same `source`+`id`).
pub const FORWARD_DEDUP: &str = "polybus_compose_forward_duplicates_total";
/// Counter: deliveries dropped by the consumer-side dedup layer.
pub const CONSUME_DEDUP: &str = "polybus_compose_consume_duplicates_total";
/// Gauge: events in the spool.
pub const SPOOL_DEPTH: &str = "polybus_compose_spool_depth";
/// Counter: publishes that waited for room in a full spool (policy `block`).
pub const SPOOL_FULL_WAITS: &str = "polybus_compose_spool_full_waits_total";
/// Counter: publishes rejected by a full spool (policy `reject`).
pub const SPOOL_REJECTED: &str = "polybus_compose_spool_rejected_total";
/// Counter: switch changes applied.
pub const SWITCH_CHANGES: &str = "polybus_compose_switch_changes_total";
/// Counter: forwarders restarted after a panic (label `bucket`).
pub const FORWARDER_RESTARTS: &str = "polybus_compose_forwarder_restarts_total";

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_is_in_docs_metrics_md() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/METRICS.md");
        let doc = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for name in [
            super::PUBLISHED,
            super::PUBLISH_ERRORS,
            super::ACK_LATENCY,
            super::NATS_LATENCY,
            super::FORWARDED,
            super::FORWARD_LATENCY,
            super::RETRIES,
            super::DEAD_LETTERS,
            super::REDRIVEN,
            super::FORWARD_DEDUP,
            super::CONSUME_DEDUP,
            super::SPOOL_DEPTH,
            super::SPOOL_FULL_WAITS,
            super::SPOOL_REJECTED,
            super::SWITCH_CHANGES,
            super::FORWARDER_RESTARTS,
        ] {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "docs/METRICS.md lacks {name}"
            );
        }
    }
}
