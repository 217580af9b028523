//! `cargo xtask broker up|down|status nats-cluster`: a three-node nats-server cluster with
//! JetStream on 127.0.0.1, for trying replicated streams and failover by hand (the cluster
//! tests start their own on free ports, see `polybus_testkit::brokers::cluster`).
//!
//! Node `i` (`server_name` `n<i>`) listens for clients on `BASE + i`, for routes on
//! `BASE + 100 + i` and for monitoring on `BASE + 200 + i`, where `BASE` is
//! `$POLYBUS_NATS_CLUSTER_PORT` (default 14222). State lives in `$CACHE/run/nats-cluster/n<i>/`:
//! `nats.conf`, `log`, `data/`, and the `pid` of the process `up` started; `down` stops exactly
//! those pids (checked against `/proc/<pid>/cmdline`, never by name).

use std::{
    fs::{self, File, OpenOptions},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use xshell::Shell;

use crate::{
    config::{Broker, HOST, Paths},
    install,
    nats_cluster::{self, NODES, NodePorts},
    process::{self, PidState},
};

/// The environment variable that moves the cluster's ports.
const PORT_VAR: &str = "POLYBUS_NATS_CLUSTER_PORT";
/// The default first client port.
const DEFAULT_BASE: u16 = 14222;
/// How long the cluster gets to elect a meta leader.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node gets to shut down after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The name on the command line and of the state directory.
pub(crate) const NAME: &str = "nats-cluster";

/// The ports of every node, from `$POLYBUS_NATS_CLUSTER_PORT`.
fn ports() -> Result<Vec<NodePorts>> {
    let base = match std::env::var(PORT_VAR).ok().as_deref().map(str::trim) {
        None | Some("") => DEFAULT_BASE,
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p != 0 && usize::from(p) + 200 + NODES <= usize::from(u16::MAX) => p,
            _ => bail!("{PORT_VAR}={v:?} is not a port number (1-65300)"),
        },
    };
    Ok(ports_from(base))
}

fn ports_from(base: u16) -> Vec<NodePorts> {
    (0..NODES as u16)
        .map(|i| NodePorts {
            client: base + i,
            cluster: base + 100 + i,
            http: base + 200 + i,
        })
        .collect()
}

/// The files of node `i`.
struct Node {
    dir: PathBuf,
    pid: PathBuf,
    log: PathBuf,
    conf: PathBuf,
    data: PathBuf,
}

impl Node {
    fn new(paths: &Paths, i: usize) -> Node {
        let dir = paths
            .cache()
            .join("run")
            .join(NAME)
            .join(nats_cluster::server_name(i));
        Node {
            pid: dir.join("pid"),
            log: dir.join("log"),
            conf: dir.join("nats.conf"),
            data: dir.join("data"),
            dir,
        }
    }
}

/// Serialises `up`/`down` of the cluster across concurrent xtask runs.
fn lock(paths: &Paths) -> Result<File> {
    let dir = paths.cache().join("run").join(NAME);
    fs::create_dir_all(&dir)?;
    let file = File::create(dir.join("lock"))?;
    file.lock().context("locking the cluster state directory")?;
    Ok(file)
}

/// Entry point for `cargo xtask broker ACTION nats-cluster`.
pub(crate) fn run(sh: &Shell, paths: &Paths, action: &str) -> Result<()> {
    match action {
        "install" => install::ensure(sh, paths, Broker::Nats).map(drop),
        "up" => up(sh, paths),
        "down" => down(paths),
        "status" => status(paths),
        other => bail!("unknown broker action `{other}` for {NAME}: install|up|down|status"),
    }
}

fn up(sh: &Shell, paths: &Paths) -> Result<()> {
    let _lock = lock(paths)?;
    let bin = install::ensure(sh, paths, Broker::Nats)?;
    let ports = ports()?;
    let mut running = 0;
    for i in 0..NODES {
        let node = Node::new(paths, i);
        match process::check(&node.pid, &bin)? {
            PidState::Running(pid) => {
                println!("{NAME}: n{i} already running (pid {pid})");
                running += 1;
            }
            PidState::Stale { reason, .. } => {
                println!("{NAME}: n{i}: removing stale pid file ({reason})");
                process::remove_files(&[node.pid])?;
            }
            PidState::Missing => {}
        }
    }
    if running == NODES {
        let leader = nats_cluster::wait_ready(&http_nodes(&ports), READY_TIMEOUT, || None)?;
        println!(
            "{NAME}: already up (meta leader n{leader}); {}",
            urls(&ports)
        );
        return Ok(());
    }
    if running > 0 {
        bail!(
            "{NAME}: {running} of {NODES} nodes run; `cargo xtask broker down {NAME}` first, \
             then `up` again"
        );
    }
    for (i, p) in ports.iter().enumerate() {
        for (what, port) in [
            ("client", p.client),
            ("route", p.cluster),
            ("monitoring", p.http),
        ] {
            if std::net::TcpStream::connect((HOST, port)).is_ok() {
                bail!(
                    "{NAME}: n{i}'s {what} port {HOST}:{port} is in use; stop whatever listens \
                     there or set {PORT_VAR} to another base port"
                );
            }
        }
    }

    let t0 = Instant::now();
    let mut pids = Vec::new();
    let result = (|| -> Result<usize> {
        for i in 0..NODES {
            let node = Node::new(paths, i);
            fs::create_dir_all(&node.data)?;
            fs::write(&node.conf, nats_cluster::node_conf(i, &ports, &node.data))
                .with_context(|| format!("writing {}", node.conf.display()))?;
            File::create(&node.log)?;
            let log = OpenOptions::new().append(true).open(&node.log)?;
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&node.conf)
                .current_dir(&node.dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Own process group: outlives xtask until `broker down`, Ctrl-C does not reach it.
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            process::write_pid_file(&node.pid, child.id())?;
            println!(
                "{NAME}: n{i} started (pid {}, client {HOST}:{}, log {})",
                child.id(),
                ports[i].client,
                node.log.display()
            );
            pids.push(child);
        }
        nats_cluster::wait_ready(&http_nodes(&ports), READY_TIMEOUT, || {
            pids.iter_mut().enumerate().find_map(|(i, c)| {
                c.try_wait()
                    .ok()
                    .flatten()
                    .map(|s| format!("n{i} exited ({s}); see its log"))
            })
        })
    })();
    match result {
        Ok(leader) => {
            println!(
                "{NAME}: ready after {:.1}s (meta leader n{leader}); clients: {}",
                t0.elapsed().as_secs_f64(),
                urls(&ports)
            );
            println!("{NAME}: `cargo xtask broker down {NAME}` stops exactly these {NODES} pids");
            Ok(())
        }
        Err(e) => {
            for (i, mut child) in pids.into_iter().enumerate() {
                let _ = child.kill();
                let _ = child.wait();
                let _ = process::remove_files(&[Node::new(paths, i).pid]);
            }
            Err(e)
        }
    }
}

fn down(paths: &Paths) -> Result<()> {
    let _lock = lock(paths)?;
    let bin = paths.bin(Broker::Nats);
    let mut errors = Vec::new();
    for i in 0..NODES {
        let node = Node::new(paths, i);
        match process::check(&node.pid, &bin)? {
            PidState::Running(pid) => {
                println!(
                    "{NAME}: stopping n{i} (pid {pid}; SIGTERM, SIGKILL after {}s)",
                    STOP_GRACE.as_secs()
                );
                match process::terminate(pid, &bin, STOP_GRACE) {
                    Ok(()) => process::remove_files(&[node.pid])?,
                    Err(e) => {
                        eprintln!("{NAME}: n{i}: FAILED: {e:#}");
                        errors.push(i);
                    }
                }
            }
            PidState::Stale { reason, .. } => {
                process::remove_files(&[node.pid])?;
                println!("{NAME}: n{i} not running; removed stale pid file ({reason})");
            }
            PidState::Missing => println!("{NAME}: n{i} not started by xtask"),
        }
    }
    if !errors.is_empty() {
        bail!("{NAME}: could not stop {} node(s)", errors.len());
    }
    Ok(())
}

/// Whether `up` recorded a pid for any node.
pub(crate) fn has_state(paths: &Paths) -> bool {
    (0..NODES).any(|i| Node::new(paths, i).pid.exists())
}

/// Prints one line per node and the cluster's readiness.
pub(crate) fn status(paths: &Paths) -> Result<()> {
    let bin = paths.bin(Broker::Nats);
    let ports = ports()?;
    let mut running = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let node = Node::new(paths, i);
        let line = match process::check(&node.pid, &bin)? {
            PidState::Running(pid) => {
                running.push((i, p.http));
                format!(
                    "running (pid {pid}, client {HOST}:{}, monitoring {HOST}:{})",
                    p.client, p.http
                )
            }
            PidState::Stale { reason, .. } => format!("not running (stale pid file: {reason})"),
            PidState::Missing => "not running".to_owned(),
        };
        println!("{NAME} n{i}  {line}");
    }
    if !running.is_empty() {
        match nats_cluster::probe(&running) {
            Ok(leader) => println!("{NAME}     ready, meta leader n{leader}; {}", urls(&ports)),
            Err(e) => println!("{NAME}     NOT ready: {e}"),
        }
    }
    Ok(())
}

fn http_nodes(ports: &[NodePorts]) -> Vec<(usize, u16)> {
    ports.iter().enumerate().map(|(i, p)| (i, p.http)).collect()
}

fn urls(ports: &[NodePorts]) -> String {
    ports
        .iter()
        .map(|p| format!("nats://{HOST}:{}", p.client))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_layout() {
        let p = ports_from(14222);
        assert_eq!(p.len(), NODES);
        assert_eq!(
            (p[0].client, p[0].cluster, p[0].http),
            (14222, 14322, 14422)
        );
        assert_eq!(
            (p[2].client, p[2].cluster, p[2].http),
            (14224, 14324, 14424)
        );
        assert_eq!(
            urls(&p),
            "nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
        );
    }
}
