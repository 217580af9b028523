//! The runtime's metric names, reported through the [`metrics`](https://docs.rs/metrics)
//! facade (install any recorder; without one the calls cost next to nothing). No metric is
//! labelled by topic or key, which would be unbounded. See docs/METRICS.md.

use crate::Settlement;

/// Counter, label `outcome`: settlements by what was done (`acked`, `retried`,
/// `dead_lettered`, `terminated`, `released`, `settle_failed`).
pub const SETTLED: &str = "polybus_runtime_settled_total";
/// Histogram, seconds: how long handler calls took (a batch handler's call counts once).
pub const HANDLER_DURATION: &str = "polybus_runtime_handler_duration_seconds";
/// Counter: handler calls that panicked (caught; the event failed).
pub const PANICS: &str = "polybus_runtime_handler_panics_total";

/// Registers the description and unit of the runtime's metrics with the installed recorder
/// (Prometheus `# HELP` lines). Every app calls it when it starts running.
pub fn describe() {
    metrics::describe_counter!(
        SETTLED,
        "Events settled by the runtime, by what was done (label outcome)"
    );
    metrics::describe_histogram!(
        HANDLER_DURATION,
        metrics::Unit::Seconds,
        "How long handler calls took (a batch handler's call counts once)"
    );
    metrics::describe_counter!(
        PANICS,
        "Handler calls that panicked (caught; the event failed)"
    );
}

pub(crate) fn settled(s: &Settlement) {
    let outcome = match s {
        Settlement::Acked => "acked",
        Settlement::Retrying { .. } => "retried",
        Settlement::DeadLettered { .. } => "dead_lettered",
        Settlement::Terminated { .. } => "terminated",
        Settlement::Released => "released",
        Settlement::SettleFailed { .. } => "settle_failed",
    };
    metrics::counter!(SETTLED, "outcome" => outcome).increment(1);
}

pub(crate) fn handler_call(started: std::time::Instant, panicked: bool) {
    metrics::histogram!(HANDLER_DURATION).record(started.elapsed().as_secs_f64());
    if panicked {
        metrics::counter!(PANICS).increment(1);
    }
}
