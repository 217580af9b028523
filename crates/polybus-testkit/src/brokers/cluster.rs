//! A test's own three-node NATS cluster with JetStream: [`NatsCluster`].
//!
//! Three nats-server processes on 127.0.0.1, each with its own free client, route and
//! monitoring ports, its own JetStream store and `server_name` (`n0`, `n1`, `n2`), routes to
//! the other two. [`NatsCluster::new`] returns once the cluster is ready: every node answers
//! `/healthz?js-enabled-only=true`, all name the same meta leader, and the leader reports the
//! others current (the probe is shared with `cargo xtask broker up nats-cluster`; no sleeps).
//! Nodes are killed with SIGKILL and started again on the same ports and store; all are killed
//! when the cluster is dropped.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use polybus_testkit::brokers::cluster::NatsCluster;
//! let mut cluster = NatsCluster::new().await?;
//! let urls = cluster.urls(); // the three client URLs, comma-separated
//! // ... create an R3 stream "ORDERS" through `urls` ...
//! let leader = cluster.stream_leader("ORDERS").await?;
//! cluster.kill(leader).await;
//! cluster.start(leader).await?;
//! # let _ = urls; Ok(()) }
//! ```

use std::fmt;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::{BrokerProcess, Kind, Readiness, binary, cache_dir, tempdir};
use crate::nats_cluster::{self, NODES, NodePorts};

/// How long the cluster (or a restarted node) may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`NatsCluster::stream_leader`] and [`NatsCluster::consumer_leader`] wait for a
/// leader on a running node.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Three nats-server processes forming one JetStream cluster, owned by one test.
pub struct NatsCluster {
    nodes: Vec<BrokerProcess>,
    ports: Vec<NodePorts>,
}

impl fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCluster")
            .field("ports", &self.ports)
            .field(
                "pids",
                &self
                    .nodes
                    .iter()
                    .map(BrokerProcess::pid)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl NatsCluster {
    /// Starts the three nodes and waits until the cluster is ready (see the module docs).
    ///
    /// The nine ports are free when chosen, but another process may take one before the node
    /// binds it: a node that exits with "address already in use" makes a new attempt on new
    /// ports (three attempts at most).
    ///
    /// # Errors
    /// nats-server is missing, a node exits, or the cluster is not ready within 60 s.
    pub async fn new() -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::launch().await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!(
                        "NatsCluster: a port was taken, new ports (attempt {attempt}): {e:#}"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn launch() -> Result<Self> {
        // All nine ports are held at once, so that they differ from each other.
        let ports: Vec<NodePorts> = {
            let listeners = (0..NODES * 3)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut p = listeners
                .iter()
                .map(|l| l.local_addr().map(|a| a.port()))
                .collect::<std::io::Result<Vec<_>>>()?
                .into_iter();
            (0..NODES)
                .map(|_| NodePorts {
                    client: p.next().unwrap_or_default(),
                    cluster: p.next().unwrap_or_default(),
                    http: p.next().unwrap_or_default(),
                })
                .collect()
        };
        let program = binary(
            "POLYBUS_NATS_SERVER_BIN",
            cache_dir().join("venv/bin/nats-server"),
        );
        if !program.exists() {
            bail!(
                "nats-server is not installed at {}: run `cargo xtask broker install nats`",
                program.display()
            );
        }
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let dir = tempdir(&format!("nats-{}", nats_cluster::server_name(i)))?;
            let conf = dir.path().join("nats.conf");
            fs::write(
                &conf,
                nats_cluster::node_conf(i, &ports, &dir.path().join("js")),
            )
            .with_context(|| format!("writing {}", conf.display()))?;
            let args = vec!["-c".to_owned(), conf.display().to_string()];
            // A node listens for clients before it has peers; the cluster probe follows.
            let node = BrokerProcess::launch(
                Kind::Nats,
                ports[i].client,
                program.clone(),
                args,
                dir,
                Readiness::TcpAccept,
            )
            .await?;
            nodes.push(node);
        }
        let mut cluster = NatsCluster { nodes, ports };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Number of nodes (3).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client URLs of all nodes, comma-separated (what a client that fails over is given).
    pub fn urls(&self) -> String {
        (0..self.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i].client)
    }

    /// The client, route and monitoring ports of node `i`.
    pub fn ports(&self, i: usize) -> (u16, u16, u16) {
        let p = self.ports[i];
        (p.client, p.cluster, p.http)
    }

    /// The node whose client port is `port` (for example a client's `server_info().port`).
    pub fn node_of_port(&self, port: u16) -> Option<usize> {
        self.ports.iter().position(|p| p.client == port)
    }

    /// The `server_name` of node `i` (`n<i>`).
    pub fn server_name(&self, i: usize) -> String {
        nats_cluster::server_name(i)
    }

    /// The process id of node `i` while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid()
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].pid().is_some()
    }

    /// The log file of node `i`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].log_path()
    }

    /// Kills node `i` with SIGKILL and waits for it to exit.
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].kill().await;
    }

    /// Starts node `i` again (same ports, same store) and waits until the running nodes form a
    /// ready cluster with it ([`wait_ready`](Self::wait_ready)).
    ///
    /// # Errors
    /// It already runs, exits, or the cluster is not ready within 60 s.
    pub async fn start(&mut self, i: usize) -> Result<()> {
        self.nodes[i].start().await?;
        self.wait_ready().await.map(drop)
    }

    /// Waits until the running nodes answer `/healthz?js-enabled-only=true`, agree on a meta
    /// leader among them, and the leader reports each of them current; returns the meta
    /// leader's index.
    ///
    /// # Errors
    /// A node exited, or the cluster is not ready within 60 s (the error has the tail of
    /// every node's log).
    pub async fn wait_ready(&mut self) -> Result<usize> {
        let nodes = self.running_http();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let probed = nodes.clone();
            let last =
                match tokio::task::spawn_blocking(move || nats_cluster::probe(&probed)).await? {
                    Ok(leader) => return Ok(leader),
                    Err(e) => e,
                };
            let exited = self.nodes.iter_mut().enumerate().find_map(|(i, node)| {
                let status = node.child.as_mut()?.try_wait().ok()??;
                Some(format!("n{i} exited ({status})"))
            });
            if let Some(exited) = exited {
                bail!("{exited} (last probe: {last})\n{}", self.log_tails());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the NATS cluster was not ready within {READY_TIMEOUT:?} (last probe: \
                     {last})\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tails(&self) -> String {
        (0..self.len())
            .map(|i| {
                let log = self.log_path(i);
                format!(
                    "n{i} ({}):\n{}",
                    log.display(),
                    crate::probe::log_tail(&log, 8)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until node `i` answers the full `/healthz` with ok: JetStream current with the
    /// meta leader and every stream and consumer it holds caught up.
    ///
    /// # Errors
    /// Not healthy within `within`.
    pub async fn wait_healthy(&self, i: usize, within: Duration) -> Result<()> {
        let http = self.ports[i].http;
        let deadline = Instant::now() + within;
        loop {
            let last =
                tokio::task::spawn_blocking(move || nats_cluster::healthz(http, false)).await?;
            match last {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("n{i} not healthy within {within:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The node leading stream `stream` (from `$JS.API.STREAM.INFO.<stream>`: `cluster.leader`),
    /// waiting up to 30 s for the stream to have a leader among the running nodes.
    ///
    /// # Errors
    /// No leader on a running node within 30 s (the last answer is in the error).
    pub async fn stream_leader(&self, stream: &str) -> Result<usize> {
        self.leader(|js| async move {
            let s = js.get_stream(stream).await?;
            Ok(s.cached_info().cluster.clone().and_then(|c| c.leader))
        })
        .await
        .with_context(|| format!("the leader of stream {stream}"))
    }

    /// The node leading the consumer `consumer` of stream `stream` (from
    /// `$JS.API.CONSUMER.INFO.<stream>.<consumer>`), waiting up to 30 s as for
    /// [`stream_leader`](Self::stream_leader).
    ///
    /// # Errors
    /// As for [`stream_leader`](Self::stream_leader).
    pub async fn consumer_leader(&self, stream: &str, consumer: &str) -> Result<usize> {
        self.leader(|js| async move {
            let s = js.get_stream(stream).await?;
            let info = s.consumer_info(consumer).await?;
            Ok(info.cluster.and_then(|c| c.leader))
        })
        .await
        .with_context(|| format!("the leader of consumer {consumer} on stream {stream}"))
    }

    /// Moves the leadership of stream `stream` off node `away_from` (asking the leader to step
    /// down, `$JS.API.STREAM.LEADER.STEPDOWN.<stream>`, until another node leads); returns the
    /// leader. For tests that kill a node and want no election on the way.
    ///
    /// # Errors
    /// The leader cannot be found, or still is `away_from` after 10 step-downs.
    pub async fn move_stream_leader(&self, stream: &str, away_from: usize) -> Result<usize> {
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
        self.move_leader(&subject, away_from, || self.stream_leader(stream))
            .await
    }

    /// Moves the leadership of consumer `consumer` of stream `stream` off node `away_from`
    /// (`$JS.API.CONSUMER.LEADER.STEPDOWN.<stream>.<consumer>`), as for
    /// [`move_stream_leader`](Self::move_stream_leader).
    ///
    /// # Errors
    /// As for [`move_stream_leader`](Self::move_stream_leader).
    pub async fn move_consumer_leader(
        &self,
        stream: &str,
        consumer: &str,
        away_from: usize,
    ) -> Result<usize> {
        let subject = format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}");
        self.move_leader(&subject, away_from, || {
            self.consumer_leader(stream, consumer)
        })
        .await
    }

    async fn move_leader<F, Fut>(
        &self,
        stepdown: &str,
        away_from: usize,
        leader: F,
    ) -> Result<usize>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<usize>>,
    {
        let client = self.client().await?;
        let mut current = leader().await?;
        for _ in 0..10 {
            if current != away_from {
                let _ = client.drain().await;
                return Ok(current);
            }
            client
                .request(stepdown.to_owned(), bytes::Bytes::new())
                .await
                .with_context(|| stepdown.to_owned())?;
            // The step-down answers before the new leader is elected: wait for another one.
            let deadline = Instant::now() + LEADER_TIMEOUT;
            loop {
                current = leader().await?;
                if current != away_from || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let _ = client.drain().await;
        bail!("n{away_from} still leads after 10 step-downs ({stepdown})")
    }

    /// A client connected to the running nodes.
    async fn client(&self) -> Result<async_nats::Client> {
        let urls: Vec<String> = (0..self.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.url(i))
            .collect();
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(Duration::from_secs(1)))
            .connect(urls)
            .await
            .context("connecting to the cluster")
    }

    async fn leader<F, Fut>(&self, info: F) -> Result<usize>
    where
        F: Fn(async_nats::jetstream::Context) -> Fut,
        Fut: Future<Output = Result<Option<String>, async_nats::Error>>,
    {
        let client = self.client().await?;
        let js = async_nats::jetstream::new(client.clone());
        let deadline = Instant::now() + LEADER_TIMEOUT;
        let result = loop {
            let last = match info(js.clone()).await {
                Ok(Some(name)) => match nats_cluster::node_index(&name) {
                    Some(i) if self.is_running(i) => break Ok(i),
                    _ => format!("leader {name} is not a running node"),
                },
                Ok(None) => "no leader".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                break Err(anyhow::anyhow!(
                    "none within {LEADER_TIMEOUT:?} (last answer: {last})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = client.drain().await;
        result
    }

    fn running_http(&self) -> Vec<(usize, u16)> {
        (0..self.len())
            .filter(|&i| self.is_running(i))
            .map(|i| (i, self.ports[i].http))
            .collect()
    }
}
