//! The orchestrator: runs every step for every side and round as a child process, in
//! alternating order, shows progress, and writes the report.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::child::{ChildArgs, RunResult};
use crate::report::{self, Meta, Results, Run, StepRecord};
use crate::spec::{self, Group, Side};

pub(crate) const USAGE: &str = "\
loadgen [--quick] [--rounds N] [--only ID[,ID...]] [--out DIR]
    runs the broker workloads (polybus vs the raw client, alternating, medians) and writes
    DIR/results.json, DIR/results.md and DIR/*.svg (default DIR: target/bench)
    --only takes workload or step ids or prefixes (see `loadgen list`), e.g. --only nats,kafka
loadgen list          the workloads and their sizes
loadgen report [--out DIR]   rewrite results.md and the plots from DIR/results.json";

/// The longest a single run may take before it is killed.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

struct Opts {
    quick: bool,
    rounds: Option<usize>,
    only: Vec<String>,
    out: PathBuf,
}

fn default_out() -> PathBuf {
    // benches/ lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), |root| root.join("target"))
        .join("bench")
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut opts = Opts {
        quick: false,
        rounds: None,
        only: Vec::new(),
        out: default_out(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--rounds" => {
                let v = value("--rounds")?;
                let r: usize = v.parse().with_context(|| format!("--rounds {v}"))?;
                if r == 0 {
                    bail!("--rounds must be at least 1");
                }
                opts.rounds = Some(r);
            }
            "--only" => opts.only.extend(
                value("--only")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            "--out" => opts.out = PathBuf::from(value("--out")?),
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    Ok(opts)
}

fn selected(g: &Group, only: &[String]) -> Option<Group> {
    if only.is_empty() {
        return Some(g.clone());
    }
    let hit = |id: &str| only.iter().any(|o| id == o || id.starts_with(o.as_str()));
    if hit(g.id) {
        return Some(g.clone());
    }
    // A step id selects its whole group (a consume needs its publish).
    g.steps.iter().any(|s| hit(s.id)).then(|| g.clone())
}

/// `loadgen report`: redraws from an earlier results.json.
pub(crate) fn report_only(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let path = opts.out.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let results: Results = serde_json::from_str(&text)?;
    let table = report::write_all(&results, &opts.out)?;
    println!("{table}");
    Ok(())
}

pub(crate) fn main(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let groups: Vec<Group> = spec::groups(opts.quick)
        .iter()
        .filter_map(|g| selected(g, &opts.only))
        .collect();
    if groups.is_empty() {
        bail!(
            "--only {:?} selects no workload (see `loadgen list`)",
            opts.only
        );
    }
    let rounds = opts.rounds.unwrap_or(if opts.quick {
        spec::ROUNDS.1
    } else {
        spec::ROUNDS.0
    });
    let logs = opts.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let exe = std::env::current_exe().context("finding the loadgen binary")?;
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    let total_runs: u64 = groups
        .iter()
        .map(|g| {
            let runs: usize = g
                .steps
                .iter()
                .map(|s| g.sides.iter().filter(|&&side| s.runs(side)).count())
                .sum();
            (runs * rounds) as u64
        })
        .sum();
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
    let overall = multi.add(ProgressBar::new(total_runs));
    overall.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} runs  {msg}")
            .expect("constant template")
            .progress_chars("=> "),
    );
    let current = multi.add(ProgressBar::new(0));
    current.set_style(
        ProgressStyle::with_template(
            "  {msg:40} [{bar:30}] {human_pos}/{human_len} msgs, {elapsed} (eta {eta})",
        )
        .expect("constant template")
        .progress_chars("=> "),
    );

    let meta = Meta::now(opts.quick, rounds, run_id);
    let t_start = Instant::now();
    let mut records = Vec::new();
    for g in &groups {
        let mut steps: Vec<StepRecord> = g.steps.iter().map(StepRecord::new).collect();
        for round in 0..rounds {
            // Rotate the order every round: AB, BA, AB, ... (ABC, BCA, CAB with three sides).
            let n = g.sides.len();
            let order: Vec<Side> = (0..n).map(|i| g.sides[(i + round) % n]).collect();
            for (position, &side) in order.iter().enumerate() {
                let tag = format!(
                    "{}_{}_r{round}_{run_id}",
                    g.id.replace('.', "_"),
                    side.name()
                );
                for (i, step) in g.steps.iter().enumerate() {
                    if !step.runs(side) {
                        continue;
                    }
                    overall.set_message(format!("{} round {}/{rounds}", g.id, round + 1));
                    current.reset();
                    current.set_length(step.messages);
                    current.set_message(format!("{} ({})", step.id, side.name()));
                    let args = ChildArgs {
                        step: step.id.to_owned(),
                        kind: step.kind,
                        side,
                        messages: step.messages,
                        size: step.size,
                        window: step.window,
                        tag: tag.clone(),
                    };
                    let log = logs.join(format!("{}-{}-r{round}.log", step.id, side.name()));
                    let outcome = run_child(&exe, &args, &log, &current);
                    let (result, error) = match outcome {
                        Ok(r) => (Some(r), None),
                        Err(e) => {
                            let msg = format!("{e:#}");
                            multi.suspend(|| {
                                eprintln!(
                                    "FAILED: {} ({}, round {}): {msg}\n  log: {}\n{}",
                                    step.id,
                                    side.name(),
                                    round + 1,
                                    log.display(),
                                    tail(&log, 8)
                                );
                            });
                            (None, Some(msg))
                        }
                    };
                    steps[i].runs.push(Run {
                        side,
                        round,
                        position,
                        result,
                        error,
                    });
                    overall.inc(1);
                }
            }
        }
        records.extend(steps);
    }
    current.finish_and_clear();
    overall.finish_with_message(format!("done in {:.0} s", t_start.elapsed().as_secs_f64()));

    let mut results = Results {
        meta,
        steps: records,
    };
    results.meta.finish(t_start.elapsed());
    let table = report::write_all(&results, &opts.out)?;
    println!("\n{table}");
    println!(
        "wrote {}/results.json, results.md and the plots (*.svg); logs in {}",
        opts.out.display(),
        logs.display()
    );
    let failed = results
        .steps
        .iter()
        .flat_map(|s| &s.runs)
        .filter(|r| r.error.is_some())
        .count();
    if failed > 0 {
        bail!("{failed} run(s) failed (see above and the logs)");
    }
    Ok(())
}

/// Runs one child to completion, feeding its progress into `bar`.
fn run_child(exe: &Path, args: &ChildArgs, log: &Path, bar: &ProgressBar) -> Result<RunResult> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(exe)
        .arg("child")
        .arg(serde_json::to_string(args)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .context("starting a loadgen child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut result = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(n) = line.strip_prefix("progress ") {
                    if let Ok(n) = n.trim().parse::<u64>() {
                        bar.set_position(n);
                    }
                } else if let Some(json) = line.strip_prefix("result ") {
                    result = Some(serde_json::from_str::<RunResult>(json)?);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("killed after {RUN_TIMEOUT:?}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = reader.join();
    let status = child.wait()?;
    match result {
        Some(r) if status.success() => Ok(r),
        _ => bail!("child exited with {status}"),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
