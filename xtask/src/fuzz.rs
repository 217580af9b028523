//! `cargo xtask fuzz [TARGET] [--seconds N] [--write-seeds]`: the coverage-guided fuzz targets
//! of `fuzz/` (cargo-fuzz, libFuzzer).
//!
//! cargo-fuzz needs nightly compiler flags (`-Zsanitizer`, `-Cpasses=sancov-module`); this
//! project builds with stable Rust, so the builds run with `RUSTC_BOOTSTRAP=1`, which makes
//! stable rustc accept them. No sanitizer (`-s none`): the library forbids `unsafe`, so
//! AddressSanitizer would find nothing that a panic does not show, and costs a rebuild and
//! half the speed. Debug assertions and overflow checks are on (cargo-fuzz's default).
//!
//! Each target runs for N seconds (default 20) on a working corpus in
//! `fuzz/target/corpus/<target>/` seeded from the committed `fuzz/corpus/<target>/`; crash
//! reproducers go to `fuzz/artifacts/<target>/` (ignored by git). Prints executions per target
//! and every crash path, and fails if any target crashed.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::{cargo, project_root};

/// Seconds per target when `--seconds` is not given.
pub(crate) const DEFAULT_SECONDS: u64 = 20;

/// What one target's run found.
struct Outcome {
    target: String,
    execs: Option<u64>,
    seconds: f64,
    corpus: Option<u64>,
    crash: Option<String>,
    log: PathBuf,
}

/// Entry point for `cargo xtask fuzz`.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    let mut target = None;
    let mut seconds = DEFAULT_SECONDS;
    let mut write_seeds = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().context("--seconds needs a number")?;
                seconds = v
                    .parse()
                    .with_context(|| format!("--seconds {v:?} is not a number"))?;
            }
            "--write-seeds" => write_seeds = true,
            other if other.starts_with('-') => bail!("unknown option `{other}`"),
            other if target.is_none() => target = Some(other.to_owned()),
            other => bail!("one target at a time, got `{other}` too"),
        }
    }
    if write_seeds {
        return seeds(sh);
    }
    let all = targets()?;
    let chosen = match target {
        Some(t) if all.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target `{t}`; the targets are: {}", all.join(", ")),
        None => all,
    };
    fuzz(sh, &chosen, seconds)
}

fn fuzz(sh: &Shell, chosen: &[String], seconds: u64) -> Result<()> {
    ensure_cargo_fuzz(sh)?;
    let cargo = cargo();
    let t0 = Instant::now();
    println!(
        "==> building the fuzz targets (RUSTC_BOOTSTRAP=1 cargo fuzz build -s none; fuzz/target)"
    );
    let mut build = match chosen {
        [one] => cmd!(sh, "{cargo} fuzz build -s none {one}"),
        _ => cmd!(sh, "{cargo} fuzz build -s none"),
    }
    .env("RUSTC_BOOTSTRAP", "1");
    for var in package_vars() {
        build = build.env_remove(var);
    }
    build.run()?;
    println!("    built in {:.1}s", t0.elapsed().as_secs_f64());

    let mut outcomes = Vec::new();
    for t in chosen {
        println!("==> fuzzing {t} for {seconds}s");
        let o = run_target(t, seconds)?;
        match &o.crash {
            Some(path) => println!("    CRASH {t}: {path} (log: {})", o.log.display()),
            None => println!(
                "    {t}: {} execs in {:.0}s, corpus {}",
                o.execs.map_or("?".into(), |n| n.to_string()),
                o.seconds,
                o.corpus.map_or("?".into(), |n| n.to_string())
            ),
        }
        outcomes.push(o);
    }

    println!(
        "==> fuzz summary ({:.0}s total)",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "    {:<16} {:>12} {:>10} {:>8}  result",
        "target", "execs", "execs/s", "corpus"
    );
    for o in &outcomes {
        let rate = o.execs.map(|n| n as f64 / o.seconds.max(0.001));
        println!(
            "    {:<16} {:>12} {:>10} {:>8}  {}",
            o.target,
            o.execs.map_or("?".into(), |n| n.to_string()),
            rate.map_or("?".into(), |r| format!("{r:.0}")),
            o.corpus.map_or("?".into(), |n| n.to_string()),
            o.crash
                .as_deref()
                .map_or("ok".to_owned(), |p| format!("CRASH {p}"))
        );
    }
    let crashed: Vec<_> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if !crashed.is_empty() {
        for o in &crashed {
            println!(
                "    reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run -s none {} {}",
                o.target,
                o.crash.as_deref().unwrap_or_default()
            );
        }
        bail!(
            "{} fuzz target(s) crashed: {}",
            crashed.len(),
            crashed
                .iter()
                .map(|o| o.target.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Runs one built target for `seconds`; libFuzzer's output goes to
/// `fuzz/target/logs/<target>.log`, with the crash report lines echoed.
fn run_target(target: &str, seconds: u64) -> Result<Outcome> {
    let root = project_root();
    let work = root.join("fuzz/target/corpus").join(target);
    let seeds = root.join("fuzz/corpus").join(target);
    let logs = root.join("fuzz/target/logs");
    fs::create_dir_all(&work)?;
    fs::create_dir_all(&seeds)?;
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log = fs::File::create(&log_path)?;
    let started = Instant::now();
    let mut command = Command::new(cargo());
    for var in package_vars() {
        command.env_remove(var);
    }
    let mut child = command
        .current_dir(&root)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", "-s", "none", target])
        .arg(&work)
        .arg(&seeds)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            // A hang counts as a crash; so does a run away allocation.
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo fuzz run")?;
    let stderr = child.stderr.take().context("libFuzzer's stderr")?;
    let (mut execs, mut corpus, mut crash) = (None, None, None);
    let mut echo = false;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            execs = n.trim().parse().ok();
        }
        // `#1234 DONE cov: 10 ft: 20 corp: 30/4Kb ...` and the progress lines before it.
        if let Some(rest) = line.split(" corp: ").nth(1) {
            corpus = rest.split('/').next().and_then(|n| n.trim().parse().ok());
        }
        // The panic message (up to its backtrace) and libFuzzer's verdict.
        if line.contains("panicked at") {
            echo = true;
        } else if line.starts_with("stack backtrace") || line.starts_with("note: run with") {
            echo = false;
        }
        if echo || (line.starts_with("==") && line.contains("ERROR: libFuzzer")) {
            println!("    | {line}");
        }
        if let Some(path) = line.split("Test unit written to ").nth(1) {
            crash = Some(path.trim().to_owned());
        }
    }
    let status = child.wait()?;
    if !status.success() && crash.is_none() {
        bail!(
            "cargo fuzz run {target} failed without a crash report ({status}); see {}",
            log_path.display()
        );
    }
    Ok(Outcome {
        target: target.to_owned(),
        execs,
        seconds: started.elapsed().as_secs_f64().min(seconds as f64),
        corpus,
        crash,
        log: log_path,
    })
}

/// The variables `cargo run` set for xtask itself (`CARGO_PKG_NAME=xtask`, ...). Build scripts
/// such as ring's watch some of them, so passing them on would rebuild those crates (and all
/// that depends on them) whenever the fuzz build alternates between `cargo xtask fuzz` and a
/// plain `cargo fuzz` in a shell.
fn package_vars() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
                || k == "CARGO_PRIMARY_PACKAGE"
        })
        .collect()
}

/// The targets `cargo fuzz list` names (the `[[bin]]`s of fuzz/Cargo.toml).
fn targets() -> Result<Vec<String>> {
    let manifest = fs::read_to_string(project_root().join("fuzz/Cargo.toml"))?;
    let names: Vec<String> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|section| {
            section.lines().find_map(|l| {
                let v = l.trim().strip_prefix("name")?.trim().strip_prefix('=')?;
                Some(v.trim().trim_matches('"').to_owned())
            })
        })
        .collect();
    if names.is_empty() {
        bail!("no [[bin]] targets in fuzz/Cargo.toml");
    }
    Ok(names)
}

/// Installs cargo-fuzz if `cargo fuzz` is missing, saying what it does.
fn ensure_cargo_fuzz(sh: &Shell) -> Result<()> {
    let cargo = cargo();
    let installed = cmd!(sh, "{cargo} fuzz --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok();
    if !installed {
        println!(
            "==> installing cargo-fuzz (the cargo subcommand that builds and runs libFuzzer \
             targets): cargo install cargo-fuzz --locked, about 2 minutes once"
        );
        cmd!(sh, "{cargo} install cargo-fuzz --locked").run()?;
    }
    Ok(())
}

/// Regenerates the committed seed corpus from events encoded by the library's own encoders
/// (`fuzz/src/seeds.rs`).
fn seeds(sh: &Shell) -> Result<()> {
    let cargo = cargo();
    let manifest: &Path = Path::new("fuzz/Cargo.toml");
    println!(
        "==> writing fuzz/corpus/<target>/ seeds (cargo test --manifest-path fuzz/Cargo.toml)"
    );
    cmd!(
        sh,
        "{cargo} test --manifest-path {manifest} --lib -- --ignored write_seed_corpus --nocapture"
    )
    .run()?;
    Ok(())
}
