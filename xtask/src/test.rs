//! `cargo xtask test [NEXTEST ARGS...]`: brokers up, then every test including the ignored
//! (broker-backed) ones, then the doc tests, with the `POLYBUS_*` variables exported.

use anyhow::{Result, bail};
use xshell::{Shell, cmd};

use crate::{
    broker, cargo,
    config::{Broker, Paths, test_env},
    install,
};

/// Bootstrap servers of an Apache Kafka with transactions, for the exactly-once test.
const TXN_BROKERS: &str = "POLYBUS_KAFKA_TXN_BROKERS";
/// The test that needs them.
const TXN_TEST: &str = "transaction_exactly_once_read_committed";

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

/// The tests `run_tests` leaves out on this machine, each with the reason.
pub(crate) fn skipped_tests() -> Vec<String> {
    if std::env::var_os(TXN_BROKERS).is_some() {
        return Vec::new();
    }
    vec![format!(
        "test {TXN_TEST} (needs Apache Kafka with transactions in {TXN_BROKERS}; the GitHub \
         kafka-transactions job runs it)"
    )]
}

/// Runs nextest and the doc tests against brokers that are already up.
pub(crate) fn run_tests(sh: &Shell, paths: &Paths, extra: &[String]) -> Result<()> {
    let env = test_env(paths)?;
    println!("test: environment for the tests:");
    for (k, v) in &env {
        println!("    {k}={v}");
    }
    ensure_nextest(sh)?;
    install::ensure_python_packages(sh, paths)?;
    install::ensure_promtool(sh, paths)?;
    let cargo = cargo();

    // The exactly-once Kafka test needs Apache Kafka (tansu has no transactions). Without one
    // it is filtered out, so nextest counts it as skipped instead of passed.
    let skipped = skipped_tests();
    for what in &skipped {
        println!("test: skipping {what}");
    }
    let filter = if skipped.is_empty() {
        Vec::new()
    } else {
        vec!["-E".to_owned(), format!("not test({TXN_TEST})")]
    };
    println!("test: cargo nextest run (all features, ignored tests included)");
    let nextest = cmd!(
        sh,
        "{cargo} nextest run --workspace --all-features --run-ignored all --no-fail-fast {filter...} {extra...}"
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
