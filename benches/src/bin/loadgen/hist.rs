//! Latency histograms (HdrHistogram) and what a run reports of them.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A latency histogram in nanoseconds, 3 significant digits, 1 ns to 100 s.
pub(crate) struct Latency {
    hist: Histogram<u64>,
}

impl Latency {
    pub(crate) fn new() -> Self {
        Latency {
            hist: Histogram::new_with_bounds(1, 100_000_000_000, 3)
                .expect("constant, valid histogram bounds"),
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns.max(1));
    }

    pub(crate) fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Percentiles in microseconds, and the percentile curve for the plots.
    pub(crate) fn summary(&self) -> Option<Summary> {
        if self.hist.is_empty() {
            return None;
        }
        let us = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        // The classic HdrHistogram percentile distribution: 1 - 10^(-k/10), from 0 to 99.999 %.
        let curve = (0..=50)
            .map(|k| 1.0 - 10f64.powf(-f64::from(k) / 10.0))
            .map(|q| (q * 100.0, us(q)))
            .chain(std::iter::once((100.0, self.hist.max() as f64 / 1000.0)))
            .collect();
        Some(Summary {
            count: self.hist.len(),
            mean_us: self.hist.mean() / 1000.0,
            p50_us: us(0.50),
            p90_us: us(0.90),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: self.hist.max() as f64 / 1000.0,
            curve,
        })
    }
}

/// Percentiles of one run, in microseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) mean_us: f64,
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
    /// (percentile in %, latency in µs), for the percentile plots.
    pub(crate) curve: Vec<(f64, f64)>,
}
