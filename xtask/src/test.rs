//! `cargo xtask test [NEXTEST ARGS...]`: brokers up, then every test including the ignored
//! (broker-backed) ones, then the doc tests, with the `POLYBUS_*` variables exported.

use anyhow::{Result, bail};
use xshell::{Shell, cmd};

use crate::{
    broker, cargo,
    config::{Broker, Paths, test_env},
};

/// Entry point for `cargo xtask test`. Leaves the brokers running afterwards.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    let paths = Paths::from_env()?;
    println!("test: starting the brokers (cargo xtask broker up all)");
    let mut started = Vec::new();
    broker::up(sh, &paths, &Broker::ALL, &mut started)?;
    let result = run_tests(sh, &paths, args);
    if !started.is_empty() {
        let names: Vec<_> = started.iter().map(|b| b.name()).collect();
        println!(
            "test: left running the brokers started for this run ({}); `cargo xtask broker down` stops them",
            names.join(", ")
        );
    }
    result
}

/// Runs nextest and the doc tests against brokers that are already up.
pub(crate) fn run_tests(sh: &Shell, paths: &Paths, extra: &[String]) -> Result<()> {
    let env = test_env(paths)?;
    println!("test: environment for the tests:");
    for (k, v) in &env {
        println!("    {k}={v}");
    }
    ensure_nextest(sh)?;
    let cargo = cargo();

    println!("test: cargo nextest run (all features, ignored tests included)");
    let nextest = cmd!(
        sh,
        "{cargo} nextest run --workspace --all-features --run-ignored all --no-fail-fast {extra...}"
    )
    .envs(env.iter().map(|(k, v)| (k, v)))
    .run();

    println!("test: doc tests (cargo test --doc)");
    let doc = cmd!(sh, "{cargo} test --workspace --all-features --doc")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .run();

    match (nextest, doc) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(_), Ok(())) => bail!("nextest reported failures (see above)"),
        (Ok(()), Err(_)) => bail!("doc tests failed (see above)"),
        (Err(_), Err(_)) => bail!("nextest and the doc tests failed (see above)"),
    }
}

fn ensure_nextest(sh: &Shell) -> Result<()> {
    let cargo = cargo();
    if let Ok(v) = cmd!(sh, "{cargo} nextest --version")
        .quiet()
        .ignore_stderr()
        .read()
    {
        println!(
            "cargo-nextest already installed ({})",
            v.lines().next().unwrap_or("").trim()
        );
        return Ok(());
    }
    println!(
        "installing cargo-nextest (test runner; cargo install cargo-nextest --locked, ~5 min)"
    );
    cmd!(sh, "{cargo} install cargo-nextest --locked").run()?;
    Ok(())
}
