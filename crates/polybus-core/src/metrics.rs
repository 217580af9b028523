//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: install any recorder (for
//! example `metrics-exporter-prometheus`) and polybus' counters, gauges and histograms appear
//! in it. Without a recorder they cost next to nothing.
//!
//! Every metric has the label `system` (the backend: `nats`, `jetstream`, `kafka`, `mqtt`,
//! `memory`); `polybus_publish_errors_total` adds `kind` (the [`ErrorKind`] code, see
//! [`kind_code`]). No metric is labelled by topic: topics are unbounded. Durations are in
//! seconds. The table of every name, including the composed bus', is docs/METRICS.md.
//!
//! Install the recorder before building producers and consumers: their handles bind to the
//! recorder present when they are created.

use metrics::{Counter, Gauge, Histogram};

use crate::ErrorKind;

/// Counter: events the broker accepted (for core NATS: handed to the client).
pub const PUBLISHED: &str = "polybus_published_total";
/// Counter: publishes that failed, labelled `kind`.
pub const PUBLISH_ERRORS: &str = "polybus_publish_errors_total";
/// Histogram (seconds): from `publish` to the broker's acknowledgement.
pub const PUBLISH_DURATION: &str = "polybus_publish_duration_seconds";
/// Counter: deliveries handed to the application.
pub const CONSUMED: &str = "polybus_consumed_total";
/// Counter: deliveries whose delivery count is above 1 (the broker delivered them again).
pub const REDELIVERED: &str = "polybus_redelivered_total";
/// Counter: received messages that could not be decoded into an event.
pub const DECODE_ERRORS: &str = "polybus_decode_errors_total";
/// Gauge: deliveries handed out and not yet settled or dropped.
pub const IN_FLIGHT: &str = "polybus_deliveries_in_flight";
/// Histogram (seconds): how long `ack` took (the settlement round trip).
pub const ACK_DURATION: &str = "polybus_ack_duration_seconds";
/// Counter: deliveries settled with `nack` (asked for redelivery).
pub const NACKED: &str = "polybus_nacked_total";
/// Counter: deliveries settled with `term` (never redelivered).
pub const TERMINATED: &str = "polybus_terminated_total";
/// Counter: settlements (`ack`, `nack`, `term`) that failed.
pub const SETTLE_ERRORS: &str = "polybus_settle_errors_total";
/// Counter: messages the client dropped because a subscriber was too slow (core NATS; a
/// lower bound, see the NATS adapter).
pub const SLOW_CONSUMER_DROPS: &str = "polybus_slow_consumer_drops_total";
/// Gauge: consumer lag in records, summed over the assigned partitions (Kafka).
pub const CONSUMER_LAG: &str = "polybus_consumer_lag";

/// Every metric name this module defines, with its type and description (the source of the
/// table in docs/METRICS.md; a test keeps them in step).
pub const ALL: [(&str, &str, &str); 13] = [
    (PUBLISHED, "counter", "events the broker accepted"),
    (PUBLISH_ERRORS, "counter", "failed publishes, by error kind"),
    (
        PUBLISH_DURATION,
        "histogram",
        "publish to broker acknowledgement, seconds",
    ),
    (CONSUMED, "counter", "deliveries handed to the application"),
    (
        REDELIVERED,
        "counter",
        "deliveries with a delivery count above 1",
    ),
    (DECODE_ERRORS, "counter", "received messages not decodable"),
    (IN_FLIGHT, "gauge", "deliveries not yet settled"),
    (ACK_DURATION, "histogram", "ack round trip, seconds"),
    (NACKED, "counter", "deliveries nack'ed"),
    (TERMINATED, "counter", "deliveries terminated"),
    (SETTLE_ERRORS, "counter", "failed settlements"),
    (
        SLOW_CONSUMER_DROPS,
        "counter",
        "messages dropped for a slow subscriber",
    ),
    (CONSUMER_LAG, "gauge", "records behind the high watermark"),
];

/// The metric handles of one messaging system, registered once so the hot path only touches
/// atomics.
#[derive(Debug)]
pub struct Instruments {
    system: &'static str,
    pub(crate) published: Counter,
    pub(crate) publish_duration: Histogram,
    pub(crate) consumed: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) decode_errors: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) ack_duration: Histogram,
    pub(crate) nacked: Counter,
    pub(crate) terminated: Counter,
    pub(crate) settle_errors: Counter,
    slow_consumer_drops: Counter,
    consumer_lag: Gauge,
    timed: bool,
}

impl Instruments {
    /// Registers the handles for `system` with the recorder installed now.
    pub fn new(system: &'static str) -> Self {
        describe();
        Instruments {
            system,
            published: metrics::counter!(PUBLISHED, "system" => system),
            publish_duration: metrics::histogram!(PUBLISH_DURATION, "system" => system),
            consumed: metrics::counter!(CONSUMED, "system" => system),
            redelivered: metrics::counter!(REDELIVERED, "system" => system),
            decode_errors: metrics::counter!(DECODE_ERRORS, "system" => system),
            in_flight: metrics::gauge!(IN_FLIGHT, "system" => system),
            ack_duration: metrics::histogram!(ACK_DURATION, "system" => system),
            nacked: metrics::counter!(NACKED, "system" => system),
            terminated: metrics::counter!(TERMINATED, "system" => system),
            settle_errors: metrics::counter!(SETTLE_ERRORS, "system" => system),
            slow_consumer_drops: metrics::counter!(SLOW_CONSUMER_DROPS, "system" => system),
            consumer_lag: metrics::gauge!(CONSUMER_LAG, "system" => system),
            timed: recorder_installed(),
        }
    }

    /// Whether the handles were bound to a recorder. Without one, polybus skips the work whose
    /// only use is a metric: it does not read the clock to time publishes and acks (two clock
    /// reads per message, the largest cost of the metrics on a hot path) and does not count
    /// deliveries in flight.
    ///
    /// ```
    /// let m = polybus_core::metrics::Instruments::new("doc");
    /// assert!(!m.is_recording(), "no recorder installed in this example");
    /// ```
    pub fn is_recording(&self) -> bool {
        self.timed
    }

    /// The messaging system.
    pub fn system(&self) -> &'static str {
        self.system
    }

    /// Counts a failed publish (the error path: registers the labelled counter each time).
    pub fn publish_error(&self, kind: ErrorKind) {
        metrics::counter!(PUBLISH_ERRORS, "system" => self.system, "kind" => kind_code(kind))
            .increment(1);
    }

    /// Adds `n` messages dropped for a slow subscriber.
    pub fn slow_consumer_dropped(&self, n: u64) {
        self.slow_consumer_drops.increment(n);
    }

    /// Sets the consumer lag in records.
    pub fn set_consumer_lag(&self, records: u64) {
        // Lags beyond 2^53 records lose precision in an f64; no broker is that far behind.
        #[allow(clippy::cast_precision_loss)]
        self.consumer_lag.set(records as f64);
    }
}

/// Whether a `metrics` recorder (global, or local to this thread) is installed now.
///
/// The `metrics` facade does not say so directly; when none is installed it hands out its
/// [`NoopRecorder`](metrics::NoopRecorder), a zero-sized type, so a recorder whose value has
/// no size is taken for "none". A real recorder holds its registry (a zero-sized one that
/// keeps its state in statics would not get the duration histograms: wrap it in a struct
/// with a field).
///
/// ```
/// assert!(!polybus_core::metrics::recorder_installed());
/// ```
pub fn recorder_installed() -> bool {
    metrics::with_recorder(|r| std::mem::size_of_val(r) != 0)
}

/// Registers the description and unit of every metric in [`ALL`] with the installed recorder
/// (Prometheus `# HELP` lines). [`Instruments::new`] calls it.
pub fn describe() {
    for (name, kind, help) in ALL {
        let unit = name.ends_with("_seconds").then_some(metrics::Unit::Seconds);
        match (kind, unit) {
            ("counter", _) => metrics::describe_counter!(name, help),
            ("gauge", _) => metrics::describe_gauge!(name, help),
            (_, Some(unit)) => metrics::describe_histogram!(name, unit, help),
            (_, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// Counts `n` messages dropped for a slow subscriber of `system`, for code that holds no
/// [`Instruments`] (a connection's event handler).
pub fn record_slow_consumer_drops(system: &'static str, n: u64) {
    metrics::counter!(SLOW_CONSUMER_DROPS, "system" => system).increment(n);
}

/// A short stable code for `kind`, for metric labels and the span field `error.type`
/// (`connect`, `timeout`, `closed`, `invalid_topic`, ...).
pub fn kind_code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Connect => "connect",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Closed => "closed",
        ErrorKind::InvalidTopic => "invalid_topic",
        ErrorKind::InvalidHeader => "invalid_header",
        ErrorKind::PayloadTooLarge => "payload_too_large",
        ErrorKind::Codec => "codec",
        ErrorKind::Unauthorized => "unauthorized",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Rejected => "rejected",
        ErrorKind::NotFound => "not_found",
        ErrorKind::Other => "other",
    }
}
