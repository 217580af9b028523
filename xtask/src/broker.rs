//! `cargo xtask broker install|up|down|status [nats|mqtt|kafka|all]`: native brokers on loopback.
//!
//! State per broker lives in `$CACHE/run/<nats|mqtt|kafka>/`: `pid` and `port` of the process
//! we started, its `log`, generated config and `data/`. A broker that already answers on the
//! port is reused (and never stopped by us); anything else on the port is an error.
//!
//! How each broker is started (flags checked against the installed binaries):
//! - nats: `nats-server -a 127.0.0.1 -p PORT -js -sd run/nats/data`.
//! - mqtt: `mosquitto -c run/mqtt/mosquitto.conf` (config generated below).
//! - kafka: `tansu broker --listener-url tcp://127.0.0.1:PORT --advertised-listener-url
//!   tcp://127.0.0.1:PORT --storage-engine memory://tansu/`. tansu 0.6.0's `broker` subcommand
//!   accepts exactly these (`--kafka-listener-url` etc. are aliases) plus `--cluster-id`,
//!   `--schema-registry`, `--otlp-endpoint-url`, `--authentication`, `--cert`/`--key` and
//!   `--silent`; each also reads an env var (`LISTENER_URL`, `STORAGE_ENGINE`, ...), which we
//!   clear so the caller's environment cannot change the broker. `--storage-engine` takes
//!   `memory://tansu/` or, with the `libsql` feature, `sqlite://FILE`.

use std::{
    fs::{self, File, OpenOptions},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use xshell::Shell;

use crate::{
    cluster,
    config::{Broker, HOST, Paths},
    install,
    probe::{self, Probe},
    process::{self, PidState},
};

/// How long a freshly started broker gets to answer its probe.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a broker gets to shut down after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// tansu's storage; in-memory, so every `up` starts empty.
const TANSU_STORAGE: &str = "memory://tansu/";
/// Environment variables tansu reads as defaults for its flags; cleared before starting it.
const TANSU_ENV: [&str; 9] = [
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "DATA_LAKE",
    "ICEBERG_CATALOG",
    "ICEBERG_WAREHOUSE",
];

/// Entry point for `cargo xtask broker ...`.
pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    let usage =
        "usage: cargo xtask broker install|up|down|status [nats|mqtt|kafka|all|nats-cluster]";
    let Some(action) = args.first() else {
        bail!("{usage}")
    };
    if args.len() > 2 {
        bail!("{usage} (got extra argument `{}`)", args[2]);
    }
    let paths = Paths::from_env()?;
    if args.get(1).map(String::as_str) == Some(cluster::NAME) {
        return cluster::run(sh, &paths, action);
    }
    let brokers = Broker::parse_selection(args.get(1).map(String::as_str))?;
    match action.as_str() {
        "install" => {
            for broker in brokers {
                install::ensure(sh, &paths, broker)?;
            }
            Ok(())
        }
        "up" => {
            let mut started = Vec::new();
            up(sh, &paths, &brokers, &mut started)?;
            println!(
                "brokers are up; `cargo xtask broker status` shows them, `cargo xtask broker down` stops the ones xtask started"
            );
            Ok(())
        }
        "down" => down(&paths, &brokers),
        "status" => {
            status(&paths, &brokers)?;
            // `status` (all) also shows a cluster that `up nats-cluster` started.
            if brokers == Broker::ALL && cluster::has_state(&paths) {
                cluster::status(&paths)?;
            }
            Ok(())
        }
        other => bail!("unknown broker action `{other}`; {usage}"),
    }
}

/// The files of one broker's state directory.
#[derive(Debug)]
struct State {
    dir: PathBuf,
    pid: PathBuf,
    port: PathBuf,
    log: PathBuf,
    data: PathBuf,
}

impl State {
    fn new(paths: &Paths, broker: Broker) -> State {
        let dir = paths.run_dir(broker);
        State {
            pid: dir.join("pid"),
            port: dir.join("port"),
            log: dir.join("log"),
            data: dir.join("data"),
            dir,
        }
    }

    fn recorded_port(&self) -> Option<u16> {
        fs::read_to_string(&self.port).ok()?.trim().parse().ok()
    }

    /// Serialises `up`/`down` of this broker across concurrent xtask runs.
    fn lock(&self) -> Result<File> {
        fs::create_dir_all(&self.dir)?;
        let file = File::create(self.dir.join("lock"))?;
        file.lock().context("locking the broker state directory")?;
        Ok(file)
    }

    fn forget(&self) -> Result<()> {
        process::remove_files(&[self.pid.clone(), self.port.clone()])
    }
}

/// Starts the selected brokers (installing them first if needed). Pushes the ones this call
/// started onto `started`, also when a later broker fails, so callers can stop exactly those.
pub(crate) fn up(
    sh: &Shell,
    paths: &Paths,
    brokers: &[Broker],
    started: &mut Vec<Broker>,
) -> Result<()> {
    let mut errors = Vec::new();
    for &broker in brokers {
        match up_one(sh, paths, broker) {
            Ok(true) => started.push(broker),
            Ok(false) => {}
            Err(e) => {
                eprintln!("{}: FAILED: {e:#}", broker.name());
                errors.push(broker.name());
            }
        }
    }
    if !errors.is_empty() {
        bail!("broker up failed for {} (details above)", errors.join(", "));
    }
    Ok(())
}

/// Returns whether it started the broker (false: already running or reused).
fn up_one(sh: &Shell, paths: &Paths, broker: Broker) -> Result<bool> {
    let port = broker.port()?;
    let bin = paths.bin(broker);
    let state = State::new(paths, broker);
    let _lock = state.lock()?;
    let name = broker.name();

    let ours = process::check(&state.pid, &bin)?;
    if let PidState::Stale { reason, .. } = &ours {
        println!("{name}: removing stale pid file ({reason})");
        state.forget()?;
    }
    if let PidState::Running(pid) = ours {
        let recorded = state.recorded_port().unwrap_or(port);
        if recorded != port {
            bail!(
                "{broker} started by xtask (pid {pid}) listens on port {recorded}, but port {port} \
                 was asked for ({}); run `cargo xtask broker down {name}` first",
                broker.port_var()
            );
        }
        let what = probe::wait_ready(broker, port, READY_TIMEOUT, &state.log, || None)?;
        println!("{name}: already running (pid {pid}, {HOST}:{port}, {what})");
        return Ok(false);
    }

    match probe::probe(broker, port) {
        Probe::Ready(what) => {
            println!(
                "{name}: reusing the broker already answering on {HOST}:{port} ({what}); \
                 not started by xtask, so `broker down` leaves it alone"
            );
            return Ok(false);
        }
        Probe::Unexpected(what) => bail!(
            "port {port} is in use, but not by {}: {what}. Stop whatever listens on \
             {HOST}:{port} or set {} to a free port",
            broker.protocol(),
            broker.port_var()
        ),
        Probe::Closed => {}
    }

    install::ensure(sh, paths, broker)?;
    start(broker, port, &bin, &state)?;
    Ok(true)
}

fn start(broker: Broker, port: u16, bin: &Path, state: &State) -> Result<()> {
    let name = broker.name();
    fs::create_dir_all(&state.data)?;
    let mut command = Command::new(bin);
    match broker {
        Broker::Nats => {
            command
                .args(["-a", HOST, "-p", &port.to_string(), "-js", "-sd"])
                .arg(&state.data);
        }
        Broker::Mqtt => {
            let conf = state.dir.join("mosquitto.conf");
            fs::write(
                &conf,
                mosquitto_conf(port, &state.data, &state.log, install::is_root()),
            )
            .with_context(|| format!("writing {}", conf.display()))?;
            command.arg("-c").arg(conf);
        }
        Broker::Kafka => {
            let url = format!("tcp://{HOST}:{port}");
            command.args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ]);
            command.args(["--storage-engine", TANSU_STORAGE]);
            for var in TANSU_ENV {
                command.env_remove(var);
            }
        }
    }

    // Fresh log per start; append mode so mosquitto's own log_dest file shares it safely.
    File::create(&state.log).with_context(|| format!("creating {}", state.log.display()))?;
    let log = OpenOptions::new().append(true).open(&state.log)?;
    command
        .current_dir(&state.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: Ctrl-C in the terminal that ran `cargo xtask` does not reach it,
        // and it outlives xtask until `broker down`.
        .process_group(0);

    let line = format!("{} {}", bin.display(), shell_words(command.get_args()));
    println!("{name}: starting `{line}` (log: {})", state.log.display());
    let t0 = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    process::write_pid_file(&state.pid, pid)?;
    fs::write(&state.port, format!("{port}\n"))?;

    let ready = probe::wait_ready(broker, port, READY_TIMEOUT, &state.log, || {
        child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.to_string())
    });
    match ready {
        Ok(what) => {
            println!(
                "{name}: ready on {HOST}:{port} after {:.1}s (pid {pid}, {what}); state in {}",
                t0.elapsed().as_secs_f64(),
                state.dir.display()
            );
            Ok(())
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            state.forget()?;
            Err(e)
        }
    }
}

fn shell_words<'a>(args: impl Iterator<Item = &'a std::ffi::OsStr>) -> String {
    args.map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The generated mosquitto config.
fn mosquitto_conf(port: u16, data: &Path, log: &Path, root: bool) -> String {
    let mut conf = format!(
        "# Generated by `cargo xtask broker up mqtt` on every start; edits are lost.\n\
         listener {port} {HOST}\n\
         allow_anonymous true\n\
         # Without it a publish and a subscription on one connection wait ~40 ms (Nagle).\n\
         set_tcp_nodelay true\n\
         persistence true\n\
         persistence_location {data}/\n\
         autosave_interval 60\n\
         # Room for persistent sessions that fall behind in the tests and benches.\n\
         max_queued_messages 100000\n\
         # No cap on QoS 1/2 messages in flight towards a client (MQTT v5 clients still bound\n\
         # it with their Receive Maximum); the default of 20 throttles the QoS 1 benchmarks.\n\
         max_inflight_messages 0\n\
         log_dest file {log}\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n\
         connection_messages true\n\
         log_timestamp true\n\
         log_timestamp_format %Y-%m-%dT%H:%M:%S\n",
        data = data.display(),
        log = log.display(),
    );
    if root {
        conf.push_str(
            "# Started as root: stay root instead of switching to the `mosquitto` user, which\n\
             # could not write the data and log files in this directory.\n\
             user root\n",
        );
    }
    conf
}

/// Stops the brokers that `up` started (by pid); leaves reused external brokers alone.
pub(crate) fn down(paths: &Paths, brokers: &[Broker]) -> Result<()> {
    let mut errors = Vec::new();
    for &broker in brokers {
        if let Err(e) = down_one(paths, broker) {
            eprintln!("{}: FAILED: {e:#}", broker.name());
            errors.push(broker.name());
        }
    }
    if !errors.is_empty() {
        bail!(
            "broker down failed for {} (details above)",
            errors.join(", ")
        );
    }
    Ok(())
}

fn down_one(paths: &Paths, broker: Broker) -> Result<()> {
    let name = broker.name();
    let bin = paths.bin(broker);
    let state = State::new(paths, broker);
    let _lock = state.lock()?;
    match process::check(&state.pid, &bin)? {
        PidState::Running(pid) => {
            let port = state
                .recorded_port()
                .map(|p| format!(" on port {p}"))
                .unwrap_or_default();
            println!(
                "{name}: stopping pid {pid}{port} (SIGTERM, SIGKILL after {}s)",
                STOP_GRACE.as_secs()
            );
            let t0 = Instant::now();
            process::terminate(pid, &bin, STOP_GRACE)?;
            state.forget()?;
            println!("{name}: stopped in {:.1}s", t0.elapsed().as_secs_f64());
        }
        PidState::Stale { reason, .. } => {
            state.forget()?;
            println!("{name}: not running; removed stale pid file ({reason})");
        }
        PidState::Missing => {
            let port = broker.port()?;
            match probe::probe(broker, port) {
                Probe::Ready(_) => println!(
                    "{name}: not started by xtask; leaving the broker on {HOST}:{port} alone"
                ),
                _ => println!("{name}: not running"),
            }
        }
    }
    Ok(())
}

fn status(paths: &Paths, brokers: &[Broker]) -> Result<()> {
    println!("cache: {}", paths.cache().display());
    for &broker in brokers {
        let name = broker.name();
        let bin = paths.bin(broker);
        let state = State::new(paths, broker);
        let line = match process::check(&state.pid, &bin)? {
            PidState::Running(pid) => {
                let port = state.recorded_port().unwrap_or(broker.port()?);
                match probe::probe(broker, port) {
                    Probe::Ready(what) => {
                        format!("running (pid {pid}, {HOST}:{port}, ready: {what})")
                    }
                    Probe::Closed => format!(
                        "running (pid {pid}, {HOST}:{port}) but NOT ready: nothing listening"
                    ),
                    Probe::Unexpected(what) => {
                        format!("running (pid {pid}, {HOST}:{port}) but NOT ready: {what}")
                    }
                }
            }
            other => {
                let stale = match other {
                    PidState::Stale { reason, .. } => format!(" (stale pid file: {reason})"),
                    _ => String::new(),
                };
                let port = broker.port()?;
                match probe::probe(broker, port) {
                    Probe::Ready(what) => format!(
                        "reused external ({HOST}:{port}, not started by xtask, ready: {what}){stale}"
                    ),
                    Probe::Closed => format!("not running (port {port} free){stale}"),
                    Probe::Unexpected(what) => {
                        format!("not running; port {port} is used by something else: {what}{stale}")
                    }
                }
            }
        };
        println!("{:<19} {line}", format!("{name} ({})", broker.program()));
        let building = match broker {
            Broker::Kafka => install::running_tansu_build(&paths.tansu_root()),
            _ => None,
        };
        let installed = match (bin.exists(), building) {
            (true, _) => "installed".to_owned(),
            (false, Some(pid)) => format!("NOT installed yet (cargo install running, pid {pid})"),
            (false, None) => "NOT installed (`cargo xtask broker install`)".to_owned(),
        };
        println!(
            "      binary {} {installed}; log {}",
            bin.display(),
            state.log.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_config() {
        let conf = mosquitto_conf(
            1883,
            Path::new("/c/run/mqtt/data"),
            Path::new("/c/run/mqtt/log"),
            false,
        );
        assert!(conf.contains("\nlistener 1883 127.0.0.1\n"));
        assert!(conf.contains("\npersistence_location /c/run/mqtt/data/\n"));
        assert!(conf.contains("\nallow_anonymous true\n"));
        assert!(conf.contains("\nlog_dest file /c/run/mqtt/log\n"));
        assert!(!conf.contains("user root"));
        assert!(mosquitto_conf(1, Path::new("/d"), Path::new("/l"), true).ends_with("user root\n"));
    }
}
