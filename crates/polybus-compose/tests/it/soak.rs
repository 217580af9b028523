//! Chaos soak: the composed bus and the adapters under steady, bounded load while a seeded
//! schedule SIGKILLs and restarts brokers, pauses them (SIGSTOP/SIGCONT) and SIGKILLs the bus
//! process. `cargo xtask soak [--minutes N] [--seed S]` runs it for minutes; under
//! `cargo xtask test` (CI) it runs a short smoke of the same code (40 s, seed 1).
//!
//! Every broker is the soak's own, on free ports, and only those pids are signalled: a
//! three-node NATS cluster ([`NatsCluster`]), tansu on SQLite, mosquitto with persistence. The
//! legs:
//!
//! * `bus`: a child process (this test binary, re-executed with [`CHILD_ENV`]) runs a
//!   [`polybus_compose::Bus`] over the cluster (R3 stream) and tansu with a spool that outlives
//!   it, and prints `ACK <id>` per acknowledged publish. At the end a bus on the same spool
//!   forwards what is left, and every acknowledged id must be in Kafka.
//! * `jetstream`: a polybus-jetstream producer on an R3 stream and a durable consumer.
//! * `kafka`: a polybus-kafka producer on tansu and a consumer group.
//! * `nats-core`: core NATS on the cluster; at most once, so counted, never required.
//! * `mqtt`: polybus-mqtt through the `polybus` command (this crate does not depend on
//!   polybus-mqtt): one `polybus pub` per event (acknowledged = exit 0 after the PUBACK) and a
//!   `polybus tail --json` started again whenever it ends. Counted, not required: the URL's
//!   client has a clean session (what is published while it reconnects is not queued for it),
//!   and mosquitto persists by periodic snapshot, so a SIGKILL loses the last second. Runs when
//!   [`CLI_ENV`] names the binary (`cargo xtask soak` builds it), else reported as not run.
//!
//! The same seed gives the same schedule (printed first). At the end: a table (acknowledged,
//! delivered, lost, duplicates, errors; spool max depth; per fault the longest stall of each
//! affected leg and how long after the broker was back the leg acknowledged again) and the same
//! as JSON under `$POLYBUS_SOAK_OUT` (`cargo xtask soak`: `target/soak/`). The test fails if a
//! leg that promises at-least-once lost an acknowledged event, or a leg acknowledged nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::StreamExt;
use polybus_core::{Consumer, Publisher};
use polybus_jetstream::{JsOptions, StreamPolicy, StreamSettings};
use polybus_kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
use polybus_nats::NatsOptions;
use polybus_testkit::brokers::{BrokerProcess, TansuStorage, cluster::NatsCluster};

use crate::brokers::{builder, dedup, read_kafka};
use crate::support::keyed;

/// Minutes to run (`cargo xtask soak --minutes`); unset: the 40 s smoke.
pub(crate) const MINUTES_ENV: &str = "POLYBUS_SOAK_MINUTES";
/// The schedule's seed (`cargo xtask soak --seed`); unset: 1.
pub(crate) const SEED_ENV: &str = "POLYBUS_SOAK_SEED";
/// Directory for the JSON summary; unset: none written.
pub(crate) const OUT_ENV: &str = "POLYBUS_SOAK_OUT";
/// The `polybus` command for the MQTT leg.
pub(crate) const CLI_ENV: &str = "POLYBUS_CLI_BIN";
/// Set in the bus child: `urls|kafka|spool|subject|generation`.
const CHILD_ENV: &str = "POLYBUS_SOAK_BUS_CHILD";
const TEST_NAME: &str = "soak::chaos_soak";
/// The smoke run's length when [`MINUTES_ENV`] is unset.
const SMOKE: Duration = Duration::from_secs(40);
/// Events per second per leg (the bus: in total over its tasks).
const BUS_RATE: u64 = 100;
const BUS_TASKS: u64 = 4;
const LEG_RATE: u64 = 50;
const KEYS: usize = 32;
const STREAM_PREFIX: &str = "SOAK_";
/// How long the end waits for consumers to see every acknowledged event.
const SETTLE: Duration = Duration::from_secs(120);

/// SplitMix64: small, seedable, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Nats(usize),
    Tansu,
    Mosquitto,
    Bus,
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Nats(i) => format!("nats n{i}"),
            Target::Tansu => "tansu".into(),
            Target::Mosquitto => "mosquitto".into(),
            Target::Bus => "bus process".into(),
        }
    }
    /// The legs whose acknowledgements depend on this target.
    fn legs(self) -> &'static [&'static str] {
        match self {
            Target::Nats(_) => &["bus", "jetstream", "nats-core"],
            Target::Tansu => &["bus", "kafka"],
            Target::Mosquitto => &["mqtt"],
            Target::Bus => &["bus"],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    at: Duration,
    target: Target,
    fault: Fault,
    down: Duration,
}

impl Step {
    fn describe(&self) -> String {
        let what = match (self.fault, self.target) {
            (Fault::Kill, Target::Bus) => "SIGKILL, start again".to_owned(),
            (Fault::Kill, _) => format!("SIGKILL, restart after {:.1}s", self.down.as_secs_f64()),
            (Fault::Pause, _) => format!("SIGSTOP, SIGCONT after {:.1}s", self.down.as_secs_f64()),
        };
        format!(
            "t+{:>6.1}s  {:<12} {what}",
            self.at.as_secs_f64(),
            self.target.name()
        )
    }
}

/// The faults of a run of `chaos_for`, from `seed`: one at a time, 4-12 s apart.
fn schedule(seed: u64, chaos_for: Duration) -> Vec<Step> {
    let mut rng = Rng(seed);
    let mut steps = Vec::new();
    let mut at = rng.millis(3_000, 6_000);
    loop {
        let target = match rng.below(8) {
            0..=2 => Target::Nats(rng.below(3) as usize),
            3 | 4 => Target::Tansu,
            5 => Target::Mosquitto,
            _ => Target::Bus,
        };
        let fault = if target == Target::Bus || rng.below(2) == 0 {
            Fault::Kill
        } else {
            Fault::Pause
        };
        let down = if target == Target::Bus {
            Duration::ZERO
        } else {
            rng.millis(1_000, 6_000)
        };
        if at + down > chaos_for {
            return steps;
        }
        steps.push(Step {
            at,
            target,
            fault,
            down,
        });
        at += down + rng.millis(4_000, 12_000);
    }
}

/// What one leg saw.
struct Leg {
    name: &'static str,
    /// Promises at-least-once for acknowledged events.
    promised: bool,
    acked: Mutex<Vec<String>>,
    ack_times: Mutex<Vec<Instant>>,
    errors: Mutex<BTreeMap<String, u64>>,
    seen: Mutex<HashMap<String, u32>>,
    resubscribes: AtomicU64,
}

impl Leg {
    fn new(name: &'static str, promised: bool) -> Arc<Self> {
        Arc::new(Leg {
            name,
            promised,
            acked: Mutex::default(),
            ack_times: Mutex::default(),
            errors: Mutex::default(),
            seen: Mutex::default(),
            resubscribes: AtomicU64::new(0),
        })
    }
    fn ack(&self, id: String, at: Instant) {
        lock(&self.acked).push(id);
        lock(&self.ack_times).push(at);
    }
    fn error(&self, what: String) {
        *lock(&self.errors).entry(what).or_default() += 1;
    }
    fn saw(&self, id: &str) {
        *lock(&self.seen).entry(id.to_owned()).or_default() += 1;
    }
    fn missing(&self) -> usize {
        let seen = lock(&self.seen);
        lock(&self.acked)
            .iter()
            .filter(|id| !seen.contains_key(*id))
            .count()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Publishes `{prefix}-{i}` at `rate` per second until `stop`; records acknowledgements.
async fn publish_loop<P: Publisher>(
    publisher: P,
    topic: String,
    prefix: &'static str,
    rate: u64,
    leg: Arc<Leg>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let event = keyed(prefix, i, KEYS);
        let id = event.id().to_owned();
        i += 1;
        match publisher.publish(&topic, event).await {
            Ok(_) => leg.ack(id, Instant::now()),
            Err(e) => leg.error(format!("{:?}", e.kind())),
        }
    }
    let _ = publisher.close().await;
}

/// Consumes `topic` until `stop`, acking each delivery; a subscription that ends is opened
/// again (counted).
async fn consume_loop<C: Consumer>(
    consumer: C,
    topic: String,
    leg: Arc<Leg>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut stream = std::pin::pin!(consumer.subscribe(&topic));
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                Err(_) => {}
                Ok(None) => break,
                Ok(Some(Err(e))) => leg.error(format!("consume {:?}", e.kind())),
                Ok(Some(Ok(d))) => {
                    leg.saw(d.event().id());
                    if let Err(e) = d.ack().await {
                        leg.error(format!("ack {:?}", e.error().kind()));
                    }
                }
            }
        }
        leg.resubscribes.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// MQTT events per second (one `polybus pub` process each).
const MQTT_RATE: u64 = 10;

/// `polybus pub` of `mqtt-<run>-<i>` at [`MQTT_RATE`] until `stop`; exit 0 is an
/// acknowledgement, a run over 10 s is killed and counted.
fn mqtt_publish(
    cli: std::path::PathBuf,
    url: String,
    topic: String,
    run: String,
    leg: Arc<Leg>,
    stop: Arc<AtomicBool>,
) {
    let period = Duration::from_millis(1_000 / MQTT_RATE);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let data = format!("mqtt-{run}-{i}");
        i += 1;
        let child = Command::new(&cli)
            .args(["pub", &url, &topic, &data, "--quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                leg.error(format!("spawn {}", e.kind()));
                std::thread::sleep(period);
                continue;
            }
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if t0.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        match status {
            Some(s) if s.success() => leg.ack(data, Instant::now()),
            Some(s) => leg.error(format!("pub exit {}", s.code().unwrap_or(-1))),
            None => leg.error("pub over 10 s".into()),
        }
        std::thread::sleep(period.saturating_sub(t0.elapsed()));
    }
}

/// `polybus tail --json` of `topic` until `stop`, started again when it ends (counted);
/// every `mqtt-<run>-<i>` in its output is a delivery.
fn mqtt_tail(
    cli: std::path::PathBuf,
    url: String,
    topic: String,
    run: String,
    leg: Arc<Leg>,
    stop: Arc<AtomicBool>,
) {
    let marker = format!("\"data\":\"mqtt-{run}-");
    while !stop.load(Ordering::Relaxed) {
        let child = Command::new(&cli)
            .args(["tail", &url, &topic, "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                leg.error(format!("spawn {}", e.kind()));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        let Some(out) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            continue;
        };
        let (reader_leg, marker) = (leg.clone(), marker.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find(&marker) {
                    let rest = &line[at + "\"data\":\"".len()..];
                    if let Some(end) = rest.find('"') {
                        reader_leg.saw(&rest[..end]);
                    }
                }
            }
        });
        loop {
            if stop.load(Ordering::Relaxed) {
                let _ = child.kill();
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                leg.resubscribes.fetch_add(1, Ordering::Relaxed);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.wait();
        let _ = reader.join();
        if !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The bus child: publishes keyed events at [`BUS_RATE`] until killed, `ACK <id>` per
/// acknowledged one, `DEPTH <n>` four times a second.
async fn bus_child(config: String) -> Result<()> {
    let parts: Vec<&str> = config.split('|').collect();
    let [urls, kafka, spool, subject, generation] = parts[..] else {
        bail!("bad {CHILD_ENV}: {config}");
    };
    let bus = bus_builder(urls, kafka, std::path::Path::new(spool))
        .build()
        .await?;
    println!("STARTED");
    let stats = bus.clone();
    tokio::spawn(async move {
        loop {
            println!("DEPTH {}", stats.stats().spool_max_depth);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut tasks = Vec::new();
    for t in 0..BUS_TASKS {
        let (bus, subject, prefix) = (
            bus.clone(),
            subject.to_owned(),
            format!("bus-g{generation}"),
        );
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * BUS_TASKS / BUS_RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Task t publishes t, t + TASKS, ...: each key's events come from one task.
            for i in (t as usize..).step_by(BUS_TASKS as usize) {
                tick.tick().await;
                match bus.publish(&subject, keyed(&prefix, i, KEYS)).await {
                    Ok(r) => println!("ACK {}", r.id()),
                    Err(e) => println!("ERR {:?}", e.kind()),
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

fn bus_builder(urls: &str, kafka: &str, spool: &std::path::Path) -> polybus_compose::BusBuilder {
    builder(urls, kafka, spool).nats_options(
        JsOptions::new(urls)
            .stream_policy(StreamPolicy::PerTopic {
                prefix: STREAM_PREFIX.into(),
            })
            .stream_settings(StreamSettings::default().replicas(3))
            .publish_timeout(Duration::from_secs(2)),
    )
}

/// The running bus child and the thread reading its output into the `bus` leg.
struct BusChild {
    config: String,
    generation: u64,
    child: Option<(Child, std::thread::JoinHandle<()>)>,
    max_depth: Arc<AtomicU64>,
    starts: u64,
}

impl BusChild {
    fn spawn(&mut self, leg: &Arc<Leg>) -> Result<()> {
        self.generation += 1;
        self.starts += 1;
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                TEST_NAME,
                "--exact",
                "--nocapture",
                "--include-ignored",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{}|{}", self.config, self.generation))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the bus child")?;
        let out = child.stdout.take().context("child stdout")?;
        let (leg, depth) = (leg.clone(), self.max_depth.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ACK ") {
                    leg.ack(id.to_owned(), Instant::now());
                } else if let Some(kind) = line.strip_prefix("ERR ") {
                    leg.error(kind.to_owned());
                } else if let Some(d) = line.strip_prefix("DEPTH ") {
                    depth.fetch_max(d.parse().unwrap_or(0), Ordering::Relaxed);
                }
            }
        });
        self.child = Some((child, reader));
        Ok(())
    }

    /// SIGKILL, and every line it wrote before dying read.
    fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let (mut child, reader) = self.child.take()?;
        let exited = child.try_wait().ok().flatten();
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        exited
    }

    /// Starts it again if it exited by itself (a bus that could not start); counted.
    fn check(&mut self, leg: &Arc<Leg>) -> Result<()> {
        let exited = match &mut self.child {
            Some((child, _)) => child.try_wait()?.is_some(),
            None => true,
        };
        if exited {
            if let Some(status) = self.kill() {
                leg.error(format!("bus child exited ({status})"));
            }
            self.spawn(leg)?;
        }
        Ok(())
    }
}

impl Drop for BusChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: Option<u32>, sig: &str) -> Result<()> {
    let Some(pid) = pid else {
        bail!("no process to send {sig} to")
    };
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill {sig} {pid}: {status}");
    Ok(())
}

/// What happened to one step.
struct Done {
    step: Step,
    fault_at: Instant,
    back_at: Instant,
    error: Option<String>,
}

/// The longest gap between acknowledgements of `times` (sorted) within `from..to` (the fault
/// and the next one), and how long after `back` (the broker back, the bus process started
/// again) the leg acknowledged again (`None`: not before `to`).
fn stall(
    times: &[Instant],
    from: Instant,
    back: Instant,
    to: Instant,
) -> (Duration, Option<Duration>) {
    let mut prev = from;
    let mut worst = Duration::ZERO;
    let mut recovery = None;
    for &t in times.iter().filter(|&&t| t > from && t <= to) {
        worst = worst.max(t - prev);
        if recovery.is_none() && t >= back {
            recovery = Some(t - back);
        }
        prev = t;
    }
    (worst.max(to.saturating_duration_since(prev)), recovery)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn chaos_soak() -> Result<()> {
    if let Ok(config) = std::env::var(CHILD_ENV) {
        return bus_child(config).await;
    }
    let length = match std::env::var(MINUTES_ENV) {
        Ok(m) => Duration::from_secs_f64(
            m.parse::<f64>()
                .with_context(|| format!("{MINUTES_ENV}={m}"))?
                * 60.0,
        ),
        Err(_) => SMOKE,
    };
    let seed: u64 = match std::env::var(SEED_ENV) {
        Ok(s) => s.parse().with_context(|| format!("{SEED_ENV}={s}"))?,
        Err(_) => 1,
    };
    // Faults stop a fifth of the run (at least 10 s) before the load does.
    let chaos_for = length.saturating_sub((length / 5).max(Duration::from_secs(10)));
    let steps = schedule(seed, chaos_for);
    println!(
        "SOAK: seed {seed}, {:.1} min of load, faults in the first {:.1} min; schedule:",
        length.as_secs_f64() / 60.0,
        chaos_for.as_secs_f64() / 60.0
    );
    for s in &steps {
        println!("  {}", s.describe());
    }

    let mut cluster = NatsCluster::new().await?;
    let mut tansu = BrokerProcess::tansu(TansuStorage::Sqlite).await?;
    let mut mosquitto = BrokerProcess::mosquitto("").await?;
    let urls = cluster.urls();
    let kafka_url = tansu.url();
    println!(
        "SOAK: brokers: nats {urls} (pids {:?}), tansu {kafka_url} (pid {:?}), mosquitto {} (pid {:?})",
        (0..cluster.len())
            .map(|i| cluster.pid(i))
            .collect::<Vec<_>>(),
        tansu.pid(),
        mosquitto.url(),
        mosquitto.pid()
    );
    let run = uuid::Uuid::now_v7().simple().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_consumers = Arc::new(AtomicBool::new(false));

    // Legs in this process.
    let js_leg = Leg::new("jetstream", true);
    let kafka_leg = Leg::new("kafka", true);
    let core_leg = Leg::new("nats-core", false);
    let bus_leg = Leg::new("bus", true);
    let js_subject = format!("soak.js.{run}");
    let js = || {
        JsOptions::new(&urls)
            .stream_policy(StreamPolicy::PerTopic {
                prefix: STREAM_PREFIX.into(),
            })
            .stream_settings(StreamSettings::default().replicas(3))
            .publish_timeout(Duration::from_secs(2))
    };
    let js_producer = js().producer().await?;
    // The first publish creates the R3 stream the consumer reads.
    js_producer
        .publish(&js_subject, keyed("js-first", 0, KEYS))
        .await?;
    js_leg.ack("js-first-0".to_owned(), Instant::now());
    let js_consumer = js().group("soak").consumer().await?;
    let kafka_topic = format!("soak.kafka.{run}");
    let kafka_cfg = KafkaConfig::new(&kafka_url, "soak-kafka").with_topic_defaults(3, 1);
    let kafka_producer = KafkaProducer::new_with_config(&kafka_cfg)?;
    kafka_producer
        .publish(&kafka_topic, keyed("kafka-first", 0, KEYS))
        .await?;
    kafka_leg.ack("kafka-first-0".to_owned(), Instant::now());
    let kafka_consumer = KafkaConsumer::new(&kafka_cfg.clone().with_auto_offset_reset("earliest"))?;
    let core_subject = format!("soak.core.{run}");
    let core_consumer = NatsOptions::new(&urls).consumer().await?;
    let core_producer = NatsOptions::new(&urls).producer().await?;

    let consumers = vec![
        tokio::spawn(consume_loop(
            js_consumer,
            js_subject.clone(),
            js_leg.clone(),
            stop_consumers.clone(),
        )),
        tokio::spawn(consume_loop(
            kafka_consumer,
            kafka_topic.clone(),
            kafka_leg.clone(),
            stop_consumers.clone(),
        )),
        tokio::spawn(consume_loop(
            core_consumer,
            core_subject.clone(),
            core_leg.clone(),
            stop_consumers.clone(),
        )),
    ];
    // Core NATS has no history: give the subscription a moment before publishing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publishers = vec![
        tokio::spawn(publish_loop(
            js_producer,
            js_subject,
            "js",
            LEG_RATE,
            js_leg.clone(),
            stop.clone(),
        )),
        tokio::spawn(publish_loop(
            kafka_producer,
            kafka_topic,
            "kafka",
            LEG_RATE,
            kafka_leg.clone(),
            stop.clone(),
        )),
        tokio::spawn(publish_loop(
            core_producer,
            core_subject,
            "core",
            LEG_RATE,
            core_leg.clone(),
            stop.clone(),
        )),
    ];

    // MQTT through the polybus command, if there is one.
    let mqtt_leg = Leg::new("mqtt", false);
    let cli = std::env::var_os(CLI_ENV)
        .map(std::path::PathBuf::from)
        .filter(|p| p.exists());
    let mut mqtt_threads = Vec::new();
    if let Some(cli) = &cli {
        let url = format!("mqtt://{}", mosquitto.url());
        let topic = format!("soak/mqtt/{run}");
        let tail_url = format!("{url}?client_id=soak-tail-{run}");
        let (c, r, l, s) = (
            cli.clone(),
            run.clone(),
            mqtt_leg.clone(),
            stop_consumers.clone(),
        );
        let t = topic.clone();
        mqtt_threads.push(std::thread::spawn(move || {
            mqtt_tail(c, tail_url, t, r, l, s)
        }));
        // Give the tail a moment to subscribe (a clean session keeps nothing from before).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (c, r, l, s) = (cli.clone(), run.clone(), mqtt_leg.clone(), stop.clone());
        mqtt_threads.push(std::thread::spawn(move || {
            mqtt_publish(c, url, topic, r, l, s)
        }));
    } else {
        println!(
            "SOAK: no {CLI_ENV}: the MQTT leg does not run (cargo xtask soak builds the polybus command)"
        );
    }

    // The bus, in a child process.
    let spool = tempfile::tempdir()?;
    let bus_subject = format!("soak.bus.{run}");
    let mut bus = BusChild {
        config: format!(
            "{urls}|{kafka_url}|{}|{bus_subject}",
            spool.path().display()
        ),
        generation: 0,
        child: None,
        max_depth: Arc::new(AtomicU64::new(0)),
        starts: 0,
    };
    bus.spawn(&bus_leg)?;

    // The schedule.
    let started = Instant::now();
    let mut done = Vec::new();
    for step in &steps {
        while started.elapsed() < step.at {
            bus.check(&bus_leg)?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let fault_at = Instant::now();
        println!(
            "SOAK: t+{:.1}s {}",
            started.elapsed().as_secs_f64(),
            step.describe()
        );
        let pid = match step.target {
            Target::Nats(i) => cluster.pid(i),
            Target::Tansu => tansu.pid(),
            Target::Mosquitto => mosquitto.pid(),
            Target::Bus => None,
        };
        let mut error = None;
        match (step.target, step.fault) {
            (Target::Bus, _) => {
                bus.kill();
                bus.spawn(&bus_leg)?;
            }
            (_, Fault::Pause) => {
                signal(pid, "-STOP")?;
                tokio::time::sleep(step.down).await;
                signal(pid, "-CONT")?;
            }
            (Target::Nats(i), Fault::Kill) => {
                cluster.kill(i).await;
                tokio::time::sleep(step.down).await;
                if let Err(e) = cluster.start(i).await {
                    error = Some(format!("{e:#}"));
                }
            }
            (Target::Tansu, Fault::Kill) => {
                tansu.kill().await;
                tokio::time::sleep(step.down).await;
                if let Err(e) = tansu.start().await {
                    error = Some(format!("{e:#}"));
                }
            }
            (Target::Mosquitto, Fault::Kill) => {
                mosquitto.kill().await;
                tokio::time::sleep(step.down).await;
                if let Err(e) = mosquitto.start().await {
                    error = Some(format!("{e:#}"));
                }
            }
        }
        if let Some(e) = &error {
            println!("SOAK: {} did not come back: {e}", step.target.name());
        }
        done.push(Done {
            step: *step,
            fault_at,
            back_at: Instant::now(),
            error,
        });
    }
    while started.elapsed() < length {
        bus.check(&bus_leg)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load_ended = Instant::now();
    println!(
        "SOAK: t+{:.1}s load stops; checking",
        started.elapsed().as_secs_f64()
    );

    // The end: stop the load, let the consumers catch up.
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await?;
    }
    bus.kill();
    let settle_from = Instant::now();
    while settle_from.elapsed() < SETTLE && (js_leg.missing() > 0 || kafka_leg.missing() > 0) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Core NATS and MQTT: whatever is still in flight arrives within a few seconds.
    let tail_from = Instant::now();
    while tail_from.elapsed() < Duration::from_secs(5) && mqtt_leg.missing() > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_consumers.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await?;
    }
    for t in mqtt_threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }

    // The bus: a bus on the same spool forwards the rest; every acknowledged id in Kafka.
    let final_bus = bus_builder(&urls, &kafka_url, spool.path()).build().await?;
    let spooled_at_end = final_bus.spool_depth();
    let drained = final_bus.wait_forwarded(Duration::from_secs(180)).await;
    let final_stats = final_bus.stats();
    let bus_topic = final_bus.topic_map().kafka_topic(&bus_subject)?;
    final_bus.close().await?;
    let bus_acked: HashSet<String> = lock(&bus_leg.acked).iter().cloned().collect();
    let records = read_kafka(&kafka_url, &bus_topic, &bus_acked, Duration::from_secs(30)).await?;
    let (_, bus_dups) = dedup(&records);
    for r in &records {
        bus_leg.saw(r.id());
    }
    let max_depth = bus
        .max_depth
        .load(Ordering::Relaxed)
        .max(final_stats.spool_max_depth);

    // The report.
    let mut legs = vec![&bus_leg, &js_leg, &kafka_leg, &core_leg];
    if cli.is_some() {
        legs.push(&mqtt_leg);
    }
    let mut table = String::new();
    let mut json = format!(
        "{{\"seed\":{seed},\"minutes\":{:.2},\"steps\":{},\"bus_starts\":{},\"spool_max_depth\":{max_depth},\"spooled_at_end\":{spooled_at_end},\"drained\":{drained},\"legs\":[",
        length.as_secs_f64() / 60.0,
        steps.len(),
        bus.starts
    );
    let _ = writeln!(
        table,
        "{:<10} {:<14} {:>9} {:>9} {:>6} {:>6} {:>6}  errors",
        "leg", "promise", "acked", "delivered", "lost", "dups", "resub"
    );
    let mut failures = Vec::new();
    for (n, leg) in legs.iter().enumerate() {
        let acked: HashSet<String> = lock(&leg.acked).iter().cloned().collect();
        let seen = lock(&leg.seen).clone();
        let delivered = acked.iter().filter(|id| seen.contains_key(*id)).count();
        let lost = acked.len() - delivered;
        let dups: u64 = if leg.name == "bus" {
            bus_dups as u64
        } else {
            seen.values().map(|&c| u64::from(c.saturating_sub(1))).sum()
        };
        let errors = lock(&leg.errors).clone();
        let promise = match (leg.promised, leg.name) {
            (true, _) => "at-least-once",
            (false, "nats-core") => "at-most-once",
            (false, _) => "not required",
        };
        let _ = writeln!(
            table,
            "{:<10} {:<14} {:>9} {:>9} {:>6} {:>6} {:>6}  {errors:?}",
            leg.name,
            promise,
            acked.len(),
            delivered,
            lost,
            dups,
            leg.resubscribes.load(Ordering::Relaxed)
        );
        let _ = write!(
            json,
            "{}{{\"leg\":\"{}\",\"promise\":\"{promise}\",\"acked\":{},\"delivered\":{delivered},\"lost\":{lost},\"duplicates\":{dups},\"resubscribes\":{},\"errors\":{{{}}}}}",
            if n == 0 { "" } else { "," },
            leg.name,
            acked.len(),
            leg.resubscribes.load(Ordering::Relaxed),
            errors
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        if leg.promised && lost > 0 {
            let sample: Vec<&String> = acked
                .iter()
                .filter(|id| !seen.contains_key(*id))
                .take(5)
                .collect();
            failures.push(format!(
                "{}: {lost} acknowledged events lost, e.g. {sample:?}",
                leg.name
            ));
        }
        if acked.len() < 10 {
            failures.push(format!("{}: only {} acknowledged", leg.name, acked.len()));
        }
    }
    json.push_str("],\"faults\":[");
    let _ = writeln!(
        table,
        "\nspool max depth {max_depth}, spooled at the end {spooled_at_end}, drained {drained}, \
         bus processes started {}\n\nfaults (stall: longest time without an acknowledgement on the \
         leg from the fault to the next fault; recovery: from the broker back, or the bus process \
         started, to the leg's next acknowledgement; JSON -1 for none):",
        bus.starts
    );
    let mut ack_times: HashMap<&str, Vec<Instant>> = HashMap::new();
    for leg in legs {
        let mut t = lock(&leg.ack_times).clone();
        t.sort();
        ack_times.insert(leg.name, t);
    }
    for (n, d) in done.iter().enumerate() {
        let until = done.get(n + 1).map_or(load_ended, |next| next.fault_at);
        let mut parts = Vec::new();
        let mut json_parts = Vec::new();
        for leg in d.step.target.legs() {
            let Some(times) = ack_times.get(leg) else {
                continue;
            };
            let (gap, recovery) = stall(times, d.fault_at, d.back_at, until);
            let recovery_s = recovery.map_or(-1.0, |r| r.as_secs_f64());
            parts.push(format!(
                "{leg} stall {:.2}s recovery {}",
                gap.as_secs_f64(),
                recovery.map_or("none".to_owned(), |r| format!("{:.2}s", r.as_secs_f64()))
            ));
            json_parts.push(format!(
                "{{\"leg\":\"{leg}\",\"stall_s\":{:.3},\"recovery_s\":{recovery_s:.3}}}",
                gap.as_secs_f64(),
            ));
        }
        let _ = writeln!(
            table,
            "  {}{}: {}",
            d.step.describe(),
            d.error
                .as_ref()
                .map_or(String::new(), |e| format!(" (NOT BACK: {e})")),
            parts.join(", ")
        );
        let _ = write!(
            json,
            "{}{{\"at_s\":{:.1},\"target\":\"{}\",\"fault\":\"{:?}\",\"down_s\":{:.1},\"back\":{},\"legs\":[{}]}}",
            if n == 0 { "" } else { "," },
            d.step.at.as_secs_f64(),
            d.step.target.name(),
            d.step.fault,
            d.step.down.as_secs_f64(),
            d.error.is_none(),
            json_parts.join(",")
        );
        if let Some(e) = &d.error {
            failures.push(format!("{} did not come back: {e}", d.step.target.name()));
        }
    }
    json.push_str("]}\n");
    println!("SOAK SUMMARY (seed {seed}):\n{table}");
    if let Ok(dir) = std::env::var(OUT_ENV) {
        std::fs::create_dir_all(&dir)?;
        let path = std::path::Path::new(&dir).join(format!("soak-seed{seed}-{run}.json"));
        std::fs::write(&path, &json)?;
        std::fs::write(
            std::path::Path::new(&dir).join(format!("soak-seed{seed}-{run}.txt")),
            &table,
        )?;
        println!("SOAK: wrote {}", path.display());
    }
    ensure!(drained, "the spool was not drained: {final_stats:?}");
    ensure!(failures.is_empty(), "soak failed: {failures:?}");
    drop((cluster, tansu, mosquitto));
    Ok(())
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    let a = schedule(7, Duration::from_secs(600));
    let b = schedule(7, Duration::from_secs(600));
    let c = schedule(8, Duration::from_secs(600));
    let text = |s: &[Step]| s.iter().map(Step::describe).collect::<Vec<_>>();
    assert_eq!(text(&a), text(&b));
    assert_ne!(text(&a), text(&c));
    assert!(a.len() > 20, "{} faults in 10 min", a.len());
    assert!(a.iter().all(|s| s.at + s.down <= Duration::from_secs(600)));
    for target in [
        Target::Nats(0),
        Target::Tansu,
        Target::Mosquitto,
        Target::Bus,
    ] {
        assert!(
            a.iter()
                .any(|s| std::mem::discriminant(&s.target) == std::mem::discriminant(&target)),
            "no fault on {target:?}"
        );
    }
    assert!(a.iter().any(|s| s.fault == Fault::Pause));
}
