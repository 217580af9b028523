//! `cargo xtask demo [ARGS...]`: runs the demo example (the composed bus end to end).

use anyhow::Result;
use xshell::{Shell, cmd};

use crate::broker;
use crate::cargo;
use crate::config::{Broker, Paths};

/// Makes sure nats-server is up (unless `--nats URL` points elsewhere; Kafka is embedded in
/// the demo unless `--kafka` is given), then runs
/// `cargo run -p polybus-examples --example demo -- ARGS`.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    if !args.iter().any(|a| a == "--nats") {
        let mut started = Vec::new();
        broker::up(sh, &Paths::from_env()?, &[Broker::Nats], &mut started)?;
    }
    let cargo = cargo();
    println!(
        "demo: cargo run -p polybus-examples --example demo -- {}",
        args.join(" ")
    );
    cmd!(
        sh,
        "{cargo} run -p polybus-examples --example demo -- {args...}"
    )
    .run()?;
    Ok(())
}
