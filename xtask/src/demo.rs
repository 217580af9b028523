//! `cargo xtask demo [ARGS...]`: runs the demo example.

use anyhow::Result;
use xshell::{Shell, cmd};

use crate::cargo;

/// Runs `cargo run -p polybus-examples --example demo -- ARGS`.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
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
