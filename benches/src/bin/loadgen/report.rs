//! Results: what was measured (results.json), the summary rows (medians, ratios, targets),
//! the Markdown report and the plots.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::child::RunResult;
use crate::hist::Summary;
use crate::plot;
use crate::spec::{Kind, Side, Step};

/// Throughput target: polybus >= this x raw.
pub(crate) const THROUGHPUT_TARGET: f64 = 0.97;
/// Latency target: polybus p99 <= this x raw.
pub(crate) const P99_TARGET: f64 = 1.05;

/// Everything one `loadgen` run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Results {
    pub(crate) meta: Meta,
    pub(crate) steps: Vec<StepRecord>,
}

/// When and where it ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) started_unix: u64,
    pub(crate) started_utc: String,
    pub(crate) quick: bool,
    pub(crate) rounds: usize,
    pub(crate) run_id: u64,
    pub(crate) cores: usize,
    pub(crate) loadavg_before: String,
    pub(crate) loadavg_after: String,
    pub(crate) duration_s: f64,
    pub(crate) nats_url: String,
    pub(crate) kafka_brokers: String,
    pub(crate) mqtt: String,
}

impl Meta {
    pub(crate) fn now(quick: bool, rounds: usize, run_id: u64) -> Meta {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let env = crate::work::Env::from_env();
        Meta {
            started_unix: now,
            started_utc: utc(now),
            quick,
            rounds,
            run_id,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            loadavg_before: loadavg(),
            loadavg_after: String::new(),
            duration_s: 0.0,
            nats_url: env.nats_url,
            kafka_brokers: env.kafka_brokers,
            mqtt: format!("{}:{}", env.mqtt_host, env.mqtt_port),
        }
    }

    pub(crate) fn finish(&mut self, took: Duration) {
        self.loadavg_after = loadavg();
        self.duration_s = took.as_secs_f64();
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds (civil-from-days, no date crate needed).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// One step and all its runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StepRecord {
    pub(crate) id: String,
    pub(crate) title: String,
    pub(crate) kind: Kind,
    pub(crate) messages: u64,
    pub(crate) size: usize,
    pub(crate) window: usize,
    pub(crate) throughput_target: f64,
    pub(crate) runs: Vec<Run>,
}

impl StepRecord {
    pub(crate) fn new(step: &Step) -> Self {
        StepRecord {
            id: step.id.to_owned(),
            title: step.title.to_owned(),
            kind: step.kind,
            messages: step.messages,
            size: step.size,
            window: step.window,
            throughput_target: step.throughput_target,
            runs: Vec::new(),
        }
    }

    /// The successful runs of `side`, by round.
    pub(crate) fn of(&self, side: Side) -> Vec<(usize, &RunResult)> {
        self.runs
            .iter()
            .filter(|r| r.side == side)
            .filter_map(|r| r.result.as_ref().map(|res| (r.round, res)))
            .collect()
    }

    /// The run of `side` whose value of `f` is the median (for the latency curves).
    pub(crate) fn median_run(
        &self,
        side: Side,
        f: impl Fn(&RunResult) -> f64,
    ) -> Option<&RunResult> {
        let mut runs: Vec<&RunResult> = self.of(side).into_iter().map(|(_, r)| r).collect();
        runs.sort_by(|a, b| f(a).total_cmp(&f(b)));
        runs.get(runs.len().saturating_sub(1) / 2).copied()
    }

    /// Median over rounds of `f(a) / f(b)`, pairing the runs of one round.
    fn paired_ratio(&self, a: Side, b: Side, f: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
        let bs = self.of(b);
        let ratios: Vec<f64> = self
            .of(a)
            .into_iter()
            .filter_map(|(round, ra)| {
                let rb = bs.iter().find(|(r, _)| *r == round)?.1;
                let (x, y) = (f(ra)?, f(rb)?);
                (y > 0.0).then_some(x / y)
            })
            .collect();
        median(ratios)
    }

    fn median_of(&self, side: Side, f: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
        median(
            self.of(side)
                .into_iter()
                .filter_map(|(_, r)| f(r))
                .collect(),
        )
    }
}

/// One run of one side.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Run {
    pub(crate) side: Side,
    pub(crate) round: usize,
    /// Position within the round (0 = went first).
    pub(crate) position: usize,
    pub(crate) result: Option<RunResult>,
    pub(crate) error: Option<String>,
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A target a ratio must meet.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(t) => ratio >= t,
            Target::AtMost(t) => ratio <= t,
        }
    }
    fn show(self) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {t:.2}"),
            Target::AtMost(t) => format!("<= {t:.2}"),
        }
    }
}

/// One line of the summary table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Row {
    pub(crate) step: String,
    pub(crate) figure: String,
    pub(crate) unit: String,
    pub(crate) polybus: Option<f64>,
    pub(crate) raw: Option<f64>,
    /// Median over rounds of polybus / raw (runs of one round paired).
    pub(crate) ratio: Option<f64>,
    pub(crate) target: Option<Target>,
    pub(crate) met: Option<bool>,
}

type Pick = fn(&RunResult) -> Option<f64>;
/// A latency percentile row: its name, where it is in a summary, and its target.
type Percentile = (&'static str, fn(&Summary) -> f64, Option<Target>);

fn latency_of(f: fn(&Summary) -> f64) -> impl Fn(&RunResult) -> Option<f64> {
    move |r: &RunResult| r.latency.as_ref().map(f)
}

/// The summary rows: throughput of every step, and p50/p99/p99.9 where latency was recorded.
pub(crate) fn rows(results: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in &results.steps {
        let thr: Pick = |r| Some(r.throughput);
        let target = Target::AtLeast(s.throughput_target);
        let ratio = s.paired_ratio(Side::Polybus, Side::Raw, thr);
        rows.push(Row {
            step: s.id.clone(),
            figure: format!("{} (msg/s)", s.title),
            unit: "msg/s".into(),
            polybus: s.median_of(Side::Polybus, thr),
            raw: s.median_of(Side::Raw, thr),
            ratio,
            target: Some(target),
            met: ratio.map(|r| target.met(r)),
        });
        if !s.kind.has_latency() {
            continue;
        }
        let percentiles: [Percentile; 3] = [
            ("p50", |l| l.p50_us, None),
            ("p99", |l| l.p99_us, Some(Target::AtMost(P99_TARGET))),
            ("p99.9", |l| l.p999_us, None),
        ];
        for (name, f, target) in percentiles {
            let ratio = s.paired_ratio(Side::Polybus, Side::Raw, latency_of(f));
            rows.push(Row {
                step: s.id.clone(),
                figure: format!(
                    "{} {} {name} (µs, window {})",
                    s.title,
                    s.kind.latency_label(),
                    s.window
                ),
                unit: "µs".into(),
                polybus: s.median_of(Side::Polybus, latency_of(f)),
                raw: s.median_of(Side::Raw, latency_of(f)),
                ratio,
                target,
                met: target.zip(ratio).map(|(t, r)| t.met(r)),
            });
        }
    }
    rows
}

fn show(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".into(),
        Some(v) if unit == "msg/s" => thousands(v.round() as u64),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The Markdown table of the summary rows.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| figure | polybus | raw | ratio | target | met |\n|---|---:|---:|---:|---:|:-:|\n",
    );
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} |",
            r.figure,
            show(r.polybus, &r.unit),
            show(r.raw, &r.unit),
            r.ratio.map_or("-".into(), |x| format!("{x:.3}")),
            r.target.map_or(String::new(), Target::show),
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        );
    }
    t
}

fn sides_table(results: &Results) -> Option<String> {
    let thr: Pick = |r| Some(r.throughput);
    let mut t = String::from(
        "| figure | polybus (CloudEvents) | raw, same headers | raw, prebuilt headers | polybus lean | raw, payload only | RustStream \
         | polybus / raw same headers | polybus / raw prebuilt headers | lean / raw payload only | lean / RustStream | polybus / RustStream |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut any = false;
    let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
    for s in &results.steps {
        if [Side::Bare, Side::Lean, Side::RustStream, Side::Template]
            .iter()
            .all(|&side| s.of(side).is_empty())
        {
            continue;
        }
        any = true;
        let _ = writeln!(
            t,
            "| {} (msg/s) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.title,
            show(s.median_of(Side::Polybus, thr), "msg/s"),
            show(s.median_of(Side::Raw, thr), "msg/s"),
            show(s.median_of(Side::Template, thr), "msg/s"),
            show(s.median_of(Side::Lean, thr), "msg/s"),
            show(s.median_of(Side::Bare, thr), "msg/s"),
            show(s.median_of(Side::RustStream, thr), "msg/s"),
            ratio(s.paired_ratio(Side::Polybus, Side::Raw, thr)),
            ratio(s.paired_ratio(Side::Polybus, Side::Template, thr)),
            ratio(s.paired_ratio(Side::Lean, Side::Bare, thr)),
            ratio(s.paired_ratio(Side::Lean, Side::RustStream, thr)),
            ratio(s.paired_ratio(Side::Polybus, Side::RustStream, thr)),
        );
    }
    any.then_some(t)
}

fn memory_table(results: &Results) -> String {
    let mib = |kib: f64| kib / 1024.0;
    let mut t = String::from(
        "| step | side | messages | peak RSS (MiB) | RSS at 10 % -> 50 % -> 100 % (MiB) | slope 50-100 % (MiB per 1M msgs) |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for s in &results.steps {
        for side in Side::ALL {
            let runs = s.of(side);
            if runs.is_empty() {
                continue;
            }
            let peak = runs.iter().map(|(_, r)| r.peak_rss_kib).max().unwrap_or(0);
            // RSS at the first sample, at the sample closest to half-way, and at the last.
            let at = |r: &RunResult, which: usize| {
                let s = &r.rss_samples;
                let last = s.last().map_or(0, |&(d, _)| d);
                let pick = match which {
                    0 => s.first(),
                    1 => s.iter().min_by_key(|&&(d, _)| (d * 2).abs_diff(last)),
                    _ => s.last(),
                };
                pick.map_or(0.0, |&(_, k)| k as f64)
            };
            let med =
                |which| median(runs.iter().map(|(_, r)| at(r, which)).collect()).unwrap_or(0.0);
            let (from, half, to) = (med(0), med(1), med(2));
            let slope = median(
                runs.iter()
                    .map(|(_, r)| r.rss_slope_mib_per_million)
                    .collect(),
            )
            .unwrap_or(0.0);
            let _ = writeln!(
                t,
                "| {} | {} | {} | {:.1} | {:.1} -> {:.1} -> {:.1} | {:+.2} |",
                s.id,
                side.name(),
                thousands(s.messages),
                mib(peak as f64),
                mib(from),
                mib(half),
                mib(to),
                slope
            );
        }
    }
    t
}

/// The whole Markdown report.
pub(crate) fn markdown(results: &Results, rows: &[Row]) -> String {
    let m = &results.meta;
    let mut md = String::new();
    let _ = writeln!(md, "# polybus benchmarks\n");
    let _ = writeln!(
        md,
        "{}, {} mode, {} rounds per workload, {:.0} s in all; {} cores; load average {} before, {} after.\n\
         Brokers on loopback: NATS {}, Kafka (tansu, memory storage) {}, MQTT {}.\n\
         Every run is its own process; the sides alternate (polybus first in odd rounds, raw first in even ones);\n\
         values are medians over the rounds, and a ratio is the median of the per-round ratios polybus / raw.\n",
        m.started_utc,
        if m.quick { "quick" } else { "full" },
        m.rounds,
        m.duration_s,
        m.cores,
        m.loadavg_before,
        m.loadavg_after,
        m.nats_url,
        m.kafka_brokers,
        m.mqtt,
    );
    md.push_str(&table(rows));
    if let Some(h) = sides_table(results) {
        let _ = writeln!(
            md,
            "\n## Every side: the envelope, the lean wire format and the peer\n\npolybus with the CloudEvents binding (default) against the raw client writing the same headers (built per message, and cloned from one prebuilt map of every header with a fresh id and time: the cheapest raw program), polybus' lean wire format against the raw client sending the payload alone, and both against RustStream (ruststream-nats, and ruststream-rdkafka on Kafka: payload only), each ratio the median of the per-round ratios.\n"
        );
        md.push_str(&h);
    }
    let _ = writeln!(
        md,
        "\n## Memory\n\nPeak RSS (VmHWM) of the run's process (publisher and subscriber are one process where a step has both); RSS sampled at each 10 % of the messages; the least-squares slope over the samples from 50 % on, extrapolated to a million messages (0 = flat: no growth with the message count).\n"
    );
    md.push_str(&memory_table(results));
    let failures: Vec<String> = results
        .steps
        .iter()
        .flat_map(|s| {
            s.runs.iter().filter_map(move |r| {
                r.error
                    .as_ref()
                    .map(|e| format!("- {} {} round {}: {e}", s.id, r.side.name(), r.round + 1))
            })
        })
        .collect();
    let notes: Vec<String> = results
        .steps
        .iter()
        .flat_map(|s| {
            s.runs.iter().flat_map(move |r| {
                r.result.iter().flat_map(move |res| {
                    res.notes.iter().map(move |n| {
                        format!("- {} {} round {}: {n}", s.id, r.side.name(), r.round + 1)
                    })
                })
            })
        })
        .collect();
    if !failures.is_empty() || !notes.is_empty() {
        let _ = writeln!(md, "\n## Failures and notes\n");
        for l in failures.iter().chain(&notes) {
            let _ = writeln!(md, "{l}");
        }
    }
    let _ = writeln!(
        md,
        "\nPlots: throughput.svg, ratios.svg, latency-*.svg, memory.svg beside this file."
    );
    md
}

/// Writes results.json, results.md and the plots into `out`; returns the table.
pub(crate) fn write_all(results: &Results, out: &Path) -> Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rows = rows(results);
    #[derive(Serialize)]
    struct Json<'a> {
        #[serde(flatten)]
        results: &'a Results,
        summary: &'a [Row],
    }
    let json = serde_json::to_string_pretty(&Json {
        results,
        summary: &rows,
    })?;
    std::fs::write(out.join("results.json"), json)?;
    let md = markdown(results, &rows);
    std::fs::write(out.join("results.md"), &md)?;
    plot::all(results, &rows, out)?;
    Ok(table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn numbers() {
        assert_eq!(thousands(1_234_567), "1 234 567");
        assert_eq!(thousands(999), "999");
        assert_eq!(show(Some(12.34), "µs"), "12.3");
    }
}
