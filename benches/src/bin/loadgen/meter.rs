//! Progress and memory of a child run: the workload bumps one atomic counter; a sampler
//! thread reports progress to the parent (`progress N` lines on stdout) and reads the resident
//! set size each time another 10 % of the messages are done.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Counts done messages; cheap to clone and to bump from the hot loop.
#[derive(Clone, Debug)]
pub(crate) struct Meter {
    done: Arc<AtomicU64>,
}

impl Meter {
    /// A meter no sampler reads (for work that is not the progress of the run).
    pub(crate) fn detached() -> Meter {
        Meter {
            done: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// The sampler thread and what it collected.
pub(crate) struct Sampler {
    meter: Meter,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(u64, u64)>>>,
    total: u64,
}

impl Sampler {
    /// Starts sampling a run of `total` messages.
    pub(crate) fn start(total: u64) -> Sampler {
        let meter = Meter {
            done: Arc::new(AtomicU64::new(0)),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (meter.clone(), stop.clone());
        let thread = std::thread::spawn(move || sample(&m, &s, total));
        Sampler {
            meter,
            stop,
            thread: Some(thread),
            total,
        }
    }

    pub(crate) fn meter(&self) -> Meter {
        self.meter.clone()
    }

    /// Stops sampling; returns (messages done, RSS in KiB) at each 10 % step, and the last.
    pub(crate) fn finish(mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let done = self.meter.done.load(Ordering::Relaxed);
        if samples.last().is_none_or(|&(d, _)| d < done) && done > 0 && self.total > 0 {
            samples.push((done, rss_kib("VmRSS").unwrap_or(0)));
        }
        samples
    }
}

fn sample(meter: &Meter, stop: &AtomicBool, total: u64) -> Vec<(u64, u64)> {
    let mut samples = Vec::with_capacity(11);
    let mut next_decile = 1u64;
    let mut last_report = u64::MAX;
    let mut ticks = 0u32;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let done = meter.done.load(Ordering::Relaxed);
        while total > 0 && next_decile <= 10 && done * 10 >= total * next_decile {
            samples.push((done, rss_kib("VmRSS").unwrap_or(0)));
            next_decile += 1;
        }
        // Progress every 100 ms (every 4th tick) and at the end.
        if (ticks.is_multiple_of(4) || stopping) && done != last_report {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "progress {done}");
            let _ = out.flush();
            last_report = done;
        }
        if stopping {
            return samples;
        }
        ticks = ticks.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A `Vm*` line of /proc/self/status in KiB (`VmRSS` now, `VmHWM` the peak).
pub(crate) fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The least-squares slope of RSS over messages, as MiB per million messages, from the
/// samples of the second half of the run (50 %..100 %: buffers, allocator arenas and caches
/// fill up in the first half; what still grows after that grows with the message count).
/// Zero for fewer than three samples.
pub(crate) fn slope_mib_per_million(samples: &[(u64, u64)]) -> f64 {
    let last = samples.last().map_or(0, |&(done, _)| done);
    let samples: Vec<(u64, u64)> = samples
        .iter()
        .copied()
        .filter(|&(done, _)| done * 2 >= last)
        .collect();
    if samples.len() < 3 {
        return 0.0;
    }
    let n = samples.len() as f64;
    let mx = samples.iter().map(|&(x, _)| x as f64).sum::<f64>() / n;
    let my = samples.iter().map(|&(_, y)| y as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(x, y) in &samples {
        let (dx, dy) = (x as f64 - mx, y as f64 - my);
        sxy += dx * dy;
        sxx += dx * dx;
    }
    if sxx == 0.0 {
        return 0.0;
    }
    // KiB per message -> MiB per million messages.
    sxy / sxx * 1_000_000.0 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let flat: Vec<_> = (1..=10).map(|i| (i * 100_000, 50_000)).collect();
        assert_eq!(slope_mib_per_million(&flat), 0.0);
        // Growth in the first half only does not count.
        let warm: Vec<_> = (1..=10)
            .map(|i| (i * 100_000, if i < 5 { 40_000 + i * 1000 } else { 50_000 }))
            .collect();
        assert_eq!(slope_mib_per_million(&warm), 0.0);
        // 1 KiB per 1000 messages = 1000 KiB per million = ~0.98 MiB per million.
        let growing: Vec<_> = (1..=10).map(|i| (i * 1000, 100 + i)).collect();
        let s = slope_mib_per_million(&growing);
        assert!((s - 1000.0 / 1024.0).abs() < 1e-9, "{s}");
    }

    #[test]
    fn reads_own_rss() {
        let rss = rss_kib("VmRSS").expect("linux /proc");
        let hwm = rss_kib("VmHWM").expect("linux /proc");
        assert!(rss > 0 && hwm >= rss);
    }
}
