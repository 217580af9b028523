//! `cargo xtask soak [--minutes N] [--seed S]`: the chaos soak (not part of `ci`).
//!
//! Runs the test `soak::chaos_soak` of polybus-compose's `it` tests with `cargo test` (no
//! per-test timeout) for N minutes (default 3) with the fault schedule of seed S (default: from
//! the clock, printed, so a run can be replayed with `--seed`), after building the `polybus`
//! command (its MQTT leg runs polybus-mqtt through it). The test starts its own brokers
//! on free ports (a three-node NATS cluster, tansu on SQLite, mosquitto with persistence) and
//! signals only those pids; the shared brokers of `broker up` are not touched. It prints the
//! schedule and a summary table, writes `target/soak/soak-seed<S>-<run>.{json,txt}`, and fails
//! if a backend that promises at-least-once lost an acknowledged event.

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::{
    cargo,
    config::{Broker, Paths, test_env},
    install, project_root,
};

/// Minutes when `--minutes` is not given.
const DEFAULT_MINUTES: f64 = 3.0;

/// Entry point for `cargo xtask soak`.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    let (minutes, seed) = parse(args)?;
    let paths = Paths::from_env()?;
    for broker in Broker::ALL {
        install::ensure(sh, &paths, broker)?;
    }
    // The MQTT leg runs polybus-mqtt through the `polybus` command.
    let cargo = cargo();
    cmd!(sh, "{cargo} build -p polybus-cli --all-features").run()?;
    let cli = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| project_root().join("target"), std::path::PathBuf::from)
        .join("debug/polybus");
    let out = project_root().join("target/soak");
    println!(
        "soak: {minutes} min, seed {seed} (replay: cargo xtask soak --minutes {minutes} --seed {seed})"
    );
    let minutes_s = minutes.to_string();
    let seed_s = seed.to_string();
    let out_s = out.display().to_string();
    cmd!(
        sh,
        "{cargo} test -p polybus-compose --all-features --test it -- --ignored --exact soak::chaos_soak --nocapture"
    )
    .envs(test_env(&paths)?)
    .env("POLYBUS_SOAK_MINUTES", minutes_s)
    .env("POLYBUS_SOAK_SEED", seed_s)
    .env("POLYBUS_SOAK_OUT", out_s)
    .env("POLYBUS_CLI_BIN", cli)
    .run()
    .with_context(|| format!("the soak failed (seed {seed}); see the summary above"))?;
    println!("soak: passed; summary and JSON in {}", out.display());
    Ok(())
}

fn parse(args: &[String]) -> Result<(f64, u64)> {
    let mut minutes = DEFAULT_MINUTES;
    let mut seed = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => {
                let v = it.next().context("--minutes needs a number")?;
                minutes = v
                    .parse()
                    .ok()
                    .filter(|m: &f64| m.is_finite() && *m > 0.0 && *m <= 24.0 * 60.0)
                    .with_context(|| {
                        format!("--minutes {v:?}: a number of minutes, at most a day")
                    })?;
            }
            "--seed" => {
                let v = it.next().context("--seed needs a number")?;
                seed = Some(
                    v.parse()
                        .with_context(|| format!("--seed {v:?} is not a u64"))?,
                );
            }
            other => bail!("unknown argument `{other}` (soak takes --minutes N and --seed S)"),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    Ok((minutes, seed))
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse(&args(&["--minutes", "10", "--seed", "42"])).unwrap(),
            (10.0, 42)
        );
        assert_eq!(parse(&args(&["--seed", "7"])).unwrap(), (3.0, 7));
        assert!(parse(&args(&["--minutes", "0"])).is_err());
        assert!(parse(&args(&["--minutes"])).is_err());
        assert!(parse(&args(&["--seed", "-1"])).is_err());
        assert!(parse(&args(&["--fast"])).is_err());
    }
}
