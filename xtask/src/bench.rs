//! `cargo xtask bench [--quick] [LOADGEN ARGS...]`: brokers up, then the broker workloads of
//! `polybus-benches` in release mode (polybus against the raw clients, alternating rounds,
//! medians), writing the table, the JSON and the plots to `target/bench/`.
//! `cargo xtask bench micro [CRITERION ARGS...]`: the criterion micro-benches (no broker).

use anyhow::Result;
use xshell::{Shell, cmd};

use crate::{
    broker, cargo,
    config::{Broker, Paths, test_env},
};

/// Entry point for `cargo xtask bench`. Leaves the brokers running afterwards.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    let cargo = cargo();
    if args.first().map(String::as_str) == Some("micro") {
        let rest = &args[1..];
        println!(
            "bench: cargo bench -p polybus-benches -- {}",
            rest.join(" ")
        );
        cmd!(sh, "{cargo} bench -p polybus-benches -- {rest...}").run()?;
        return Ok(());
    }
    let paths = Paths::from_env()?;
    println!("bench: starting the brokers (cargo xtask broker up all)");
    let mut started = Vec::new();
    broker::up(sh, &paths, &Broker::ALL, &mut started)?;
    let env = test_env(&paths)?;
    for (k, v) in env.iter().filter(|(k, _)| {
        k.ends_with("_URL") || k.contains("BROKERS") || k.starts_with("POLYBUS_MQTT")
    }) {
        println!("    {k}={v}");
    }
    println!(
        "bench: cargo run --release -p polybus-benches --bin loadgen -- {}",
        args.join(" ")
    );
    let result = cmd!(
        sh,
        "{cargo} run --release -p polybus-benches --bin loadgen -- {args...}"
    )
    .envs(env.iter().map(|(k, v)| (k, v)))
    .run();
    if !started.is_empty() {
        let names: Vec<_> = started.iter().map(|b| b.name()).collect();
        println!(
            "bench: left running the brokers started for this run ({}); `cargo xtask broker down` stops them",
            names.join(", ")
        );
    }
    result?;
    Ok(())
}
