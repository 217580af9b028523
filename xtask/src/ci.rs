//! `cargo xtask ci`: what CI runs, locally. Steps: fmt, clippy, test (brokers + nextest + doc
//! tests), docs, cargo-deny (licenses, bans, sources; advisories when the advisory database can
//! be fetched). Stops at the first failing step; always stops the brokers this run started
//! (brokers that were already running are left alone).

use std::{thread, time::Instant};

use anyhow::{Result, bail};
use xshell::{Shell, cmd};

use crate::{
    broker, cargo,
    config::{Broker, Paths},
    install, test,
};

const STEPS: [&str; 5] = [
    "cargo fmt --all --check",
    "cargo clippy --workspace --all-targets --all-features -- -D warnings",
    "cargo xtask test (brokers up, cargo nextest run, cargo test --doc)",
    "RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --all-features --no-deps",
    "cargo deny check licenses bans sources (and advisories when the database can be fetched)",
];

/// Entry point for `cargo xtask ci`.
pub(crate) fn run(sh: &Shell) -> Result<()> {
    let paths = Paths::from_env()?;
    let t0 = Instant::now();
    let mut started = Vec::new();
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    let result = steps(sh, &paths, t0, &mut started, &mut done, &mut skipped);

    let teardown = if started.is_empty() {
        Ok(())
    } else {
        let names: Vec<_> = started.iter().map(|b| b.name()).collect();
        println!(
            "==> [{:>6.1}s] stopping the brokers this run started: {}",
            t0.elapsed().as_secs_f64(),
            names.join(", ")
        );
        broker::down(&paths, &started)
    };

    println!("==> summary ({:.1}s total)", t0.elapsed().as_secs_f64());
    for (step, secs) in &done {
        println!("    ok     {secs:>6.1}s  {step}");
    }
    if let (Err(e), Some(step)) = (&result, STEPS.get(done.len())) {
        println!("    FAILED          {step}: {e:#}");
    }
    for what in &skipped {
        println!("    skipped         {what}");
    }
    result?;
    teardown?;
    if skipped.is_empty() {
        println!("==> ci passed");
    } else {
        println!(
            "==> ci passed, with {} check(s) skipped here (listed above; GitHub runs them)",
            skipped.len()
        );
    }
    Ok(())
}

fn steps(
    sh: &Shell,
    paths: &Paths,
    t0: Instant,
    started: &mut Vec<Broker>,
    done: &mut Vec<(&'static str, f64)>,
    skipped: &mut Vec<String>,
) -> Result<()> {
    let cargo = cargo();
    // On a fresh machine the tansu build (8-14 min) is the longest step: run it beside fmt and
    // clippy instead of after them; the test step waits for it.
    let tansu_build = (!install::tansu_installed(paths)).then(|| {
        println!(
            "==> [{:>6.1}s] tansu is not installed: building it in the background while fmt and \
             clippy run (its lines start with [tansu])",
            t0.elapsed().as_secs_f64()
        );
        let paths = paths.clone();
        thread::spawn(move || install::ensure_tansu(&paths))
    });
    let mut step = |i: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        println!(
            "==> [{:>6.1}s] step {}/{}: {}",
            t0.elapsed().as_secs_f64(),
            i + 1,
            STEPS.len(),
            STEPS[i]
        );
        let s = Instant::now();
        f()?;
        done.push((STEPS[i], s.elapsed().as_secs_f64()));
        Ok(())
    };

    step(0, &mut || {
        cmd!(sh, "{cargo} fmt --all --check")
            .run()
            .or_else(|_| bail!("formatting differs; run `cargo fmt --all`"))
    })?;
    step(1, &mut || {
        Ok(cmd!(
            sh,
            "{cargo} clippy --workspace --all-targets --all-features -- -D warnings"
        )
        .run()?)
    })?;
    if let Some(build) = tansu_build {
        println!(
            "==> [{:>6.1}s] waiting for the tansu build to finish",
            t0.elapsed().as_secs_f64()
        );
        build
            .join()
            .map_err(|_| anyhow::anyhow!("the tansu build thread panicked"))??;
    }
    step(2, &mut || {
        broker::up(sh, paths, &Broker::ALL, started)?;
        skipped.extend(test::skipped_tests());
        test::run_tests(sh, paths, &[])
    })?;
    step(3, &mut || {
        Ok(cmd!(sh, "{cargo} doc --workspace --all-features --no-deps")
            .env("RUSTDOCFLAGS", "-D warnings")
            .run()?)
    })?;
    step(4, &mut || {
        skipped.extend(deny(sh)?);
        Ok(())
    })?;
    Ok(())
}

/// cargo-deny, if installed (the GitHub audit workflow always runs it). The advisory database
/// lives on github.com; where that cannot be fetched the advisories check is skipped, saying so.
/// Returns the checks it skipped.
fn deny(sh: &Shell) -> Result<Vec<String>> {
    let cargo = cargo();
    if cmd!(sh, "{cargo} deny --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        let what = "cargo deny (not installed: `cargo install cargo-deny --locked`; \
                    .github/workflows/audit.yml runs it)";
        println!("    skipped: {what}");
        return Ok(vec![what.to_owned()]);
    }
    cmd!(sh, "{cargo} deny check licenses bans sources").run()?;
    if cmd!(sh, "{cargo} deny fetch db")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        let what = "cargo deny check advisories (the RustSec database on github.com cannot be \
                    fetched from here; .github/workflows/audit.yml checks advisories weekly)";
        println!("    skipped: {what}");
        return Ok(vec![what.to_owned()]);
    }
    cmd!(sh, "{cargo} deny check advisories").run()?;
    Ok(Vec::new())
}
