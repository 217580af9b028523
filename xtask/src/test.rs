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
    let args = if skipped.is_empty() {
        extra.to_vec()
    } else {
        excluding(extra, &format!("test({TXN_TEST})"))
    };
    println!("test: cargo nextest run (all features, ignored tests included)");
    let nextest = cmd!(
        sh,
        "{cargo} nextest run --workspace --all-features --run-ignored all --no-fail-fast {args...}"
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

/// `args` (nextest's) with `skip` filtered out. nextest ORs several `-E` filters, so a
/// separate `-E "not ..."` would run every test beside the caller's selection: the caller's
/// expressions are joined and ANDed with it instead.
fn excluding(args: &[String], skip: &str) -> Vec<String> {
    let mut rest = Vec::with_capacity(args.len() + 2);
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-E" | "--filterset" | "--filter-expr" => chosen.extend(it.next().cloned()),
            _ => match a
                .strip_prefix("-E=")
                .or_else(|| a.strip_prefix("--filterset="))
                .or_else(|| a.strip_prefix("--filter-expr="))
            {
                Some(expr) => chosen.push(expr.to_owned()),
                None => rest.push(a.clone()),
            },
        }
    }
    let expr = if chosen.is_empty() {
        format!("not {skip}")
    } else {
        let any = chosen
            .iter()
            .map(|e| format!("({e})"))
            .collect::<Vec<_>>()
            .join(" or ");
        format!("({any}) and not {skip}")
    };
    rest.push("-E".to_owned());
    rest.push(expr);
    rest
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

#[cfg(test)]
mod tests {
    use super::excluding;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_skip_is_anded_with_the_callers_filters() {
        let skip = "test(txn)";
        assert_eq!(excluding(&[], skip), strings(&["-E", "not test(txn)"]));
        assert_eq!(
            excluding(&strings(&["-E", "test(a)", "--no-capture"]), skip),
            strings(&["--no-capture", "-E", "((test(a))) and not test(txn)"])
        );
        assert_eq!(
            excluding(&strings(&["-E=test(a)", "--filterset", "test(b)"]), skip),
            strings(&["-E", "((test(a)) or (test(b))) and not test(txn)"])
        );
    }
}
