//! JetStream on a real three-node NATS cluster (the test's own, on free ports: see
//! `polybus_testkit::brokers::cluster`), with R3 streams: the stream leader SIGKILLed under
//! publish load, the consumer leader SIGKILLed under a durable consumer, and clients given the
//! three URLs failing over when their server dies. Each test prints a `FIGURES:` line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures_util::StreamExt;
use polybus_core::{Consumer, Event, Publisher};
use polybus_jetstream::{ConsumerSettings, JetStream, JsOptions, JsProducer, StreamSettings};
use polybus_nats::NatsOptions;
use polybus_testkit::brokers::cluster::NatsCluster;
use tokio::sync::Mutex;

/// Publishing tasks sharing one producer.
const TASKS: usize = 32;
/// How long one publish waits for its ack before the task retries it.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Creates (or binds to) the R3 stream `name` over `subject` and checks it has three replicas.
async fn r3_stream(js: &JetStream, name: &str, subject: &str) -> Result<()> {
    let info = js
        .ensure_stream(name, &[subject], &StreamSettings::default().replicas(3))
        .await?;
    ensure!(
        info.config.num_replicas == 3,
        "stream {name} has {} replicas",
        info.config.num_replicas
    );
    Ok(())
}

fn event(i: usize) -> Event {
    Event::builder()
        .id(format!("evt-{i:05}"))
        .data(i.to_string())
        .build()
        .expect("a valid event")
}

/// What the publishing side saw.
#[derive(Default)]
struct Published {
    next: AtomicUsize,
    attempts: AtomicUsize,
    errors: AtomicUsize,
    duplicate_receipts: AtomicUsize,
    acked: Mutex<HashSet<String>>,
    acked_count: AtomicUsize,
    /// Failed attempts by error kind.
    kinds: std::sync::Mutex<BTreeMap<String, usize>>,
    /// The longest time between two successive acknowledgements, and when the last one came.
    gaps: std::sync::Mutex<(Duration, Option<Instant>)>,
}

impl Published {
    fn stall(&self) -> Duration {
        self.gaps.lock().map(|g| g.0).unwrap_or_default()
    }

    fn kinds(&self) -> BTreeMap<String, usize> {
        self.kinds.lock().map(|k| k.clone()).unwrap_or_default()
    }
}

/// `TASKS` tasks publish events `0..total` to `topic`, each retried with the same event (same
/// `Nats-Msg-Id`) until the server acknowledges it.
fn publish_all(
    producer: Arc<JsProducer>,
    topic: &'static str,
    total: usize,
    published: Arc<Published>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..TASKS)
        .map(|_| {
            let (producer, p) = (producer.clone(), published.clone());
            tokio::spawn(async move {
                loop {
                    let i = p.next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let ev = event(i);
                    loop {
                        p.attempts.fetch_add(1, Ordering::Relaxed);
                        match producer.publish(topic, ev.clone()).await {
                            Ok(receipt) => {
                                if receipt.is_duplicate() {
                                    p.duplicate_receipts.fetch_add(1, Ordering::Relaxed);
                                }
                                p.acked.lock().await.insert(ev.id().to_owned());
                                p.acked_count.fetch_add(1, Ordering::Release);
                                let now = Instant::now();
                                if let Ok(mut g) = p.gaps.lock() {
                                    if let Some(last) = g.1 {
                                        g.0 = g.0.max(now - last);
                                    }
                                    g.1 = Some(now);
                                }
                                break;
                            }
                            Err(e) => {
                                p.errors.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut k) = p.kinds.lock() {
                                    *k.entry(format!("{:?}", e.kind())).or_default() += 1;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

/// What the consuming side saw.
#[derive(Default)]
struct Consumed {
    deliveries: AtomicUsize,
    redelivered: AtomicUsize,
    ids: Mutex<HashMap<String, usize>>,
    distinct: AtomicUsize,
    stream_errors: AtomicUsize,
    /// The first error the subscription yielded.
    first_error: std::sync::Mutex<Option<String>>,
    ack_errors: AtomicUsize,
    /// The longest time without a delivery, once the first came.
    gaps: std::sync::Mutex<(Duration, Option<Instant>)>,
}

impl Consumed {
    fn stall(&self) -> Duration {
        self.gaps.lock().map(|g| g.0).unwrap_or_default()
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|e| e.clone())
    }
}

/// Consumes `topic` in the durable group `group`, acking each delivery, until `done` says the
/// publishing is over and every id in `expected` was consumed, or `deadline`.
fn consume(
    consumer: polybus_jetstream::JsConsumer,
    topic: &'static str,
    consumed: Arc<Consumed>,
    expected: Arc<Published>,
    done: Arc<AtomicBool>,
    deadline: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut deliveries = std::pin::pin!(consumer.subscribe(topic));
        let deadline = Instant::now() + deadline;
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await {
                Ok(Some(Ok(d))) => {
                    consumed.deliveries.fetch_add(1, Ordering::Relaxed);
                    if d.is_redelivered() {
                        consumed.redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                    let now = Instant::now();
                    if let Ok(mut g) = consumed.gaps.lock() {
                        if let Some(last) = g.1 {
                            g.0 = g.0.max(now - last);
                        }
                        g.1 = Some(now);
                    }
                    let first = {
                        let mut ids = consumed.ids.lock().await;
                        let n = ids.entry(d.event().id().to_owned()).or_default();
                        *n += 1;
                        *n == 1
                    };
                    if first {
                        consumed.distinct.fetch_add(1, Ordering::Release);
                    }
                    if d.ack().await.is_err() {
                        consumed.ack_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Err(e))) => {
                    consumed.stream_errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut first) = consumed.first_error.lock() {
                        first.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                Ok(None) => {
                    if let Ok(mut first) = consumed.first_error.lock() {
                        let e = first.take().unwrap_or_default();
                        *first = Some(format!("{e} (then the subscription ended)"));
                    }
                    break;
                }
                Err(_) => {}
            }
            if done.load(Ordering::Acquire) {
                let acked = expected.acked.lock().await;
                let ids = consumed.ids.lock().await;
                if acked.iter().all(|id| ids.contains_key(id)) {
                    break;
                }
            }
        }
    })
}

/// Waits until `counter` reaches `n`, or fails after `within`.
async fn reach(counter: &AtomicUsize, n: usize, within: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + within;
    while counter.load(Ordering::Acquire) < n {
        ensure!(
            Instant::now() < deadline,
            "{what}: {} of {n} after {within:?}",
            counter.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Acknowledged ids never consumed, and the duplicate deliveries.
async fn losses(published: &Published, consumed: &Consumed) -> (Vec<String>, usize, usize) {
    let acked = published.acked.lock().await;
    let ids = consumed.ids.lock().await;
    let mut lost: Vec<String> = acked
        .iter()
        .filter(|id| !ids.contains_key(*id))
        .cloned()
        .collect();
    lost.sort();
    let duplicates = ids.values().map(|n| n - 1).sum();
    let foreign = ids.keys().filter(|id| !acked.contains(*id)).count();
    (lost, duplicates, foreign)
}

/// Proves: 20,000 events published by 32 tasks through one `JsProducer` given the three URLs,
/// to an R3 stream whose leader is SIGKILLed after 5,000 acknowledgements and started again
/// once 12,000 are in (so the cluster took publishes on two nodes under a new leader), are all
/// acknowledged in the end, and every acknowledged event is consumed at least once by a
/// durable consumer running alongside (none lost, nothing consumed that was not published);
/// the stream stores no event twice (retries carry the same `Nats-Msg-Id`), and a publish
/// fails only with `Timeout` or `Connect` while the stream has no leader (never `NotFound`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn stream_leader_killed_under_publish_load_loses_nothing() -> Result<()> {
    const TOTAL: usize = 20_000;
    const KILL_AT: usize = 5_000;
    const RESTART_AT: usize = 12_000;
    const STREAM: &str = "CLUSTER_PUBLISH";
    const TOPIC: &str = "cluster.publish";

    let started = Instant::now();
    let mut cluster = NatsCluster::new().await?;
    let opts = JsOptions::new(cluster.urls())
        .publish_timeout(PUBLISH_TIMEOUT)
        .consumer_settings(ConsumerSettings::default().ack_wait(Duration::from_secs(5)));
    let js = opts.clone().connect().await?;
    r3_stream(&js, STREAM, TOPIC).await?;

    let published = Arc::new(Published::default());
    let consumed = Arc::new(Consumed::default());
    let done = Arc::new(AtomicBool::new(false));
    let reader = consume(
        opts.clone().group("reader").consumer().await?,
        TOPIC,
        consumed.clone(),
        published.clone(),
        done.clone(),
        Duration::from_secs(180),
    );
    let producer = Arc::new(opts.clone().producer().await?);
    let t0 = Instant::now();
    let publishers = publish_all(producer.clone(), TOPIC, TOTAL, published.clone());

    reach(
        &published.acked_count,
        KILL_AT,
        Duration::from_secs(60),
        "acked before the kill",
    )
    .await?;
    let leader = cluster.stream_leader(STREAM).await?;
    cluster.kill(leader).await;
    let killed_at = Instant::now();
    let acked_at_kill = published.acked_count.load(Ordering::Acquire);
    let new_leader = cluster.stream_leader(STREAM).await?;
    let elected_in = killed_at.elapsed();
    ensure!(new_leader != leader, "n{leader} still leads after its kill");
    reach(
        &published.acked_count,
        RESTART_AT,
        Duration::from_secs(60),
        "acked with the old leader down",
    )
    .await?;
    cluster.start(leader).await?;
    let down_for = killed_at.elapsed();

    for p in publishers {
        p.await?;
    }
    let publish_time = t0.elapsed();
    done.store(true, Ordering::Release);
    reader.await?;

    let stored = js
        .ensure_stream(STREAM, &[TOPIC], &StreamSettings::default().replicas(3))
        .await?
        .state
        .messages;
    let (lost, duplicates, foreign) = losses(&published, &consumed).await;
    let acked = published.acked.lock().await.len();
    println!(
        "FIGURES: stream leader killed under publish load: acked {acked} / consumed {} / lost {} \
         / duplicates {duplicates} (deliveries {}, redelivered {}) / longest publish stall {:.2}s; \
         stored {stored}; leader n{leader} killed at {acked_at_kill} acked, the API named \
         n{new_leader} leader {:.2}s later, n{leader} down {:.2}s; publish attempts {} ({} failed: {:?}, {} \
         duplicate receipts), {TOTAL} events in {:.1}s; consumer stream errors {} (first: {:?}), ack errors {}; \
         test {:.1}s",
        consumed.ids.lock().await.len(),
        lost.len(),
        consumed.deliveries.load(Ordering::Relaxed),
        consumed.redelivered.load(Ordering::Relaxed),
        published.stall().as_secs_f64(),
        elected_in.as_secs_f64(),
        down_for.as_secs_f64(),
        published.attempts.load(Ordering::Relaxed),
        published.errors.load(Ordering::Relaxed),
        published.kinds(),
        published.duplicate_receipts.load(Ordering::Relaxed),
        publish_time.as_secs_f64(),
        consumed.stream_errors.load(Ordering::Relaxed),
        consumed.first_error(),
        consumed.ack_errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    ensure!(acked == TOTAL, "{acked} of {TOTAL} acknowledged");
    // A stream between leaders is not a missing stream: the producer waits for the new leader
    // up to its publish timeout, then says Timeout.
    ensure!(
        published
            .kinds()
            .keys()
            .all(|k| matches!(k.as_str(), "Timeout" | "Connect")),
        "publishes failed with {:?}",
        published.kinds()
    );
    ensure!(
        lost.is_empty(),
        "lost {} acknowledged events, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    ensure!(foreign == 0, "consumed {foreign} events nobody published");
    ensure!(
        stored == TOTAL as u64,
        "the stream holds {stored} messages for {TOTAL} events"
    );
    Ok(())
}

/// Proves: a durable consumer (R3, the stream's replicas) reading 10,000 acknowledged events
/// from an R3 stream keeps consuming when the node leading the consumer is SIGKILLed after
/// 3,000 were consumed: it reaches 7,000 with that node down (another node took the lead),
/// consumes every event at least once in the end (none lost), and the redeliveries (acks
/// sent to the dead leader) are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn consumer_leader_killed_durable_consumer_keeps_consuming() -> Result<()> {
    const TOTAL: usize = 10_000;
    const KILL_AT: usize = 3_000;
    const RESTART_AT: usize = 7_000;
    const STREAM: &str = "CLUSTER_CONSUME";
    const TOPIC: &str = "cluster.consume";
    const GROUP: &str = "durable";

    let started = Instant::now();
    let mut cluster = NatsCluster::new().await?;
    let opts = JsOptions::new(cluster.urls())
        .publish_timeout(PUBLISH_TIMEOUT)
        .consumer_settings(ConsumerSettings::default().ack_wait(Duration::from_secs(3)));
    let js = opts.clone().connect().await?;
    r3_stream(&js, STREAM, TOPIC).await?;

    let published = Arc::new(Published::default());
    let producer = Arc::new(opts.clone().producer().await?);
    for p in publish_all(producer, TOPIC, TOTAL, published.clone()) {
        p.await?;
    }
    ensure!(
        published.acked_count.load(Ordering::Acquire) == TOTAL,
        "publishing before the consumer"
    );

    let consumed = Arc::new(Consumed::default());
    let done = Arc::new(AtomicBool::new(true));
    let t0 = Instant::now();
    let reader = consume(
        opts.clone().group(GROUP).consumer().await?,
        TOPIC,
        consumed.clone(),
        published.clone(),
        done.clone(),
        Duration::from_secs(120),
    );
    reach(
        &consumed.distinct,
        KILL_AT,
        Duration::from_secs(60),
        "consumed before the kill",
    )
    .await?;
    let leader = cluster.consumer_leader(STREAM, GROUP).await?;
    let stream_leader = cluster.stream_leader(STREAM).await?;
    cluster.kill(leader).await;
    let killed_at = Instant::now();
    let consumed_at_kill = consumed.distinct.load(Ordering::Acquire);
    let new_leader = cluster.consumer_leader(STREAM, GROUP).await?;
    let elected_in = killed_at.elapsed();
    ensure!(
        new_leader != leader,
        "n{leader} still leads the consumer after its kill"
    );
    reach(
        &consumed.distinct,
        RESTART_AT,
        Duration::from_secs(60),
        "consumed with the consumer leader down",
    )
    .await?;
    let resumed_in = killed_at.elapsed();
    cluster.start(leader).await?;
    reader.await?;
    let consume_time = t0.elapsed();

    let (lost, duplicates, foreign) = losses(&published, &consumed).await;
    let distinct = consumed.ids.lock().await.len();
    println!(
        "FIGURES: consumer leader killed under a durable consumer: acked {TOTAL} / consumed \
         {distinct} / lost {} / duplicates {duplicates} / redelivered {} (deliveries {}) / \
         longest delivery stall {:.2}s; consumer leader n{leader} (stream leader n{stream_leader}) \
         killed at {consumed_at_kill} consumed, the API named n{new_leader} leader {:.2}s later, {RESTART_AT} \
         consumed {:.2}s after the kill; consumed in {:.1}s; stream errors {} (first: {:?}), ack errors {}; \
         test {:.1}s",
        lost.len(),
        consumed.redelivered.load(Ordering::Relaxed),
        consumed.deliveries.load(Ordering::Relaxed),
        consumed.stall().as_secs_f64(),
        elected_in.as_secs_f64(),
        resumed_in.as_secs_f64(),
        consume_time.as_secs_f64(),
        consumed.stream_errors.load(Ordering::Relaxed),
        consumed.first_error(),
        consumed.ack_errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    ensure!(
        lost.is_empty(),
        "lost {} acknowledged events, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    ensure!(foreign == 0, "consumed {foreign} events nobody published");
    ensure!(
        consumed.deliveries.load(Ordering::Relaxed) - distinct
            <= consumed.redelivered.load(Ordering::Relaxed),
        "every repeated delivery is marked redelivered"
    );
    Ok(())
}

/// How long a client given the three URLs may take to be served again after its server died
/// (the server led neither the stream nor the consumer the client uses, so no election): a
/// publish in flight at the kill waits out the publish timeout (2 s), a pull request in flight
/// is given up 2 s after its expiry (1 s); the rest is reconnecting, which takes milliseconds.
const RESUME_BOUND: Duration = Duration::from_secs(5);

/// Proves: a core NATS subscriber (polybus-nats, given the three URLs) whose server is
/// SIGKILLed reconnects to another node and receives messages published after the kill within
/// [`RESUME_BOUND`]; then the server of a JetStream producer (given the three URLs), which
/// leads neither the R3 stream nor the durable consumer, is SIGKILLed: the producer reconnects
/// to another node and its publishes are acknowledged again, and the consumer receives events
/// published after the kill, both within [`RESUME_BOUND`]; no acknowledged event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn clients_given_all_urls_fail_over() -> Result<()> {
    let started = Instant::now();
    let mut cluster = NatsCluster::new().await?;

    // Core NATS.
    let sub = NatsOptions::new(cluster.urls()).consumer().await?;
    let publisher = NatsOptions::new(cluster.urls()).producer().await?;
    let sub_node = cluster
        .node_of_port(sub.connection().client().server_info().port)
        .context("the subscriber's server")?;
    let pub_node = cluster
        .node_of_port(publisher.connection().client().server_info().port)
        .context("the publisher's server")?;
    let sent = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(std::sync::Mutex::new(Vec::<(usize, Instant)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let received = received.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut s = std::pin::pin!(sub.subscribe("cluster.core"));
            while !stop.load(Ordering::Acquire) {
                if let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(200), s.next()).await
                {
                    let seq: usize = std::str::from_utf8(d.payload())
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(usize::MAX);
                    if let Ok(mut r) = received.lock() {
                        r.push((seq, Instant::now()));
                    }
                }
            }
        })
    };
    let sender = {
        let (sent, stop) = (sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seq = 0usize;
            while !stop.load(Ordering::Acquire) {
                // A publish while reconnecting is buffered or fails: core NATS is at most once.
                let _ = publisher
                    .publish("cluster.core", Event::new(seq.to_string()))
                    .await;
                sent.store(seq, Ordering::Release);
                seq += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let count =
        |r: &Arc<std::sync::Mutex<Vec<(usize, Instant)>>>| r.lock().map(|v| v.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&received) < 20 {
        ensure!(
            Instant::now() < deadline,
            "the core subscriber received nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill(sub_node).await;
    let killed_at = Instant::now();
    let sent_at_kill = sent.load(Ordering::Acquire);
    let resumed = loop {
        let first_after = received.lock().ok().and_then(|r| {
            r.iter()
                .find(|(seq, _)| *seq > sent_at_kill && *seq != usize::MAX)
                .map(|(_, at)| *at)
        });
        if let Some(at) = first_after {
            break at - killed_at;
        }
        ensure!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the core subscriber received nothing published after its server died"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Release);
    sender.await?;
    receiver.await?;
    let (core_missed, core_total) = {
        let r = received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let got: HashSet<usize> = r.iter().map(|(s, _)| *s).collect();
        let last = sent.load(Ordering::Acquire);
        ((0..=last).filter(|s| !got.contains(s)).count(), last + 1)
    };
    cluster.start(sub_node).await?;

    // JetStream.
    const STREAM: &str = "CLUSTER_FAILOVER";
    const TOPIC: &str = "cluster.failover";
    let opts = JsOptions::new(cluster.urls())
        .publish_timeout(PUBLISH_TIMEOUT)
        .consumer_settings(ConsumerSettings::default().ack_wait(Duration::from_secs(3)));
    r3_stream(&opts.clone().connect().await?, STREAM, TOPIC).await?;
    let producer = opts.clone().producer().await?;
    let consumer = opts.clone().group("failover").consumer().await?;
    let js_node = cluster
        .node_of_port(
            producer
                .jetstream()
                .connection()
                .client()
                .server_info()
                .port,
        )
        .context("the producer's server")?;
    let consumer_node = cluster
        .node_of_port(
            consumer
                .jetstream()
                .connection()
                .client()
                .server_info()
                .port,
        )
        .context("the consumer's server")?;
    // Leadership off the node to kill: what is measured is the clients' failover, not an
    // election (the first test measures that).
    let stream_leader = cluster.move_stream_leader(STREAM, js_node).await?;
    let published = Arc::new(Published::default());
    let consumed = Arc::new(Consumed::default());
    let done = Arc::new(AtomicBool::new(false));
    let reader = consume(
        consumer,
        TOPIC,
        consumed.clone(),
        published.clone(),
        done.clone(),
        Duration::from_secs(90),
    );
    // One publisher, one event at a time: its acks show when publishing works again.
    let acks = Arc::new(std::sync::Mutex::new(
        Vec::<(usize, Instant, Instant)>::new(),
    ));
    let producer = Arc::new(producer);
    let js_stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (producer, acks, stop, p) = (
            producer.clone(),
            acks.clone(),
            js_stop.clone(),
            published.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let ev = event(i);
                loop {
                    let t = Instant::now();
                    if producer.publish(TOPIC, ev.clone()).await.is_ok() {
                        p.acked.lock().await.insert(ev.id().to_owned());
                        p.acked_count.fetch_add(1, Ordering::Release);
                        if let Ok(mut a) = acks.lock() {
                            a.push((i, t, Instant::now()));
                        }
                        break;
                    }
                    p.errors.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    reach(
        &consumed.distinct,
        50,
        Duration::from_secs(30),
        "JetStream consumed before the kill",
    )
    .await?;
    let consumer_leader = cluster
        .move_consumer_leader(STREAM, "failover", js_node)
        .await?;
    cluster.kill(js_node).await;
    let js_killed_at = Instant::now();
    let publish_resumed = loop {
        // The first acknowledgement of a publish that started after the kill.
        let first = acks.lock().ok().and_then(|a| {
            a.iter()
                .find(|(_, t, _)| *t > js_killed_at)
                .map(|(i, _, at)| (*i, *at))
        });
        if let Some(first) = first {
            break first;
        }
        ensure!(
            js_killed_at.elapsed() < Duration::from_secs(60),
            "no JetStream publish acknowledged after the producer's server died"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (first_after, publish_resumed_at) = publish_resumed;
    let deadline = Instant::now() + Duration::from_secs(60);
    let consume_resumed = loop {
        let ids = consumed.ids.lock().await;
        if ids.contains_key(event(first_after).id()) {
            break js_killed_at.elapsed();
        }
        drop(ids);
        ensure!(
            Instant::now() < deadline,
            "the JetStream consumer did not receive events published after the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Some more after the consumer resumed, then stop and drain.
    let more = published.acked_count.load(Ordering::Acquire) + 50;
    reach(
        &published.acked_count,
        more,
        Duration::from_secs(30),
        "JetStream published after the failover",
    )
    .await?;
    js_stop.store(true, Ordering::Release);
    writer.await?;
    done.store(true, Ordering::Release);
    reader.await?;
    let producer_now = cluster.node_of_port(
        producer
            .jetstream()
            .connection()
            .client()
            .server_info()
            .port,
    );
    let (lost, duplicates, _) = losses(&published, &consumed).await;
    let publish_resumed = publish_resumed_at - js_killed_at;
    println!(
        "FIGURES: failover: core NATS subscriber on n{sub_node} (publisher on n{pub_node}) \
         resumed {:.3}s after its server was killed, {core_missed} of {core_total} core \
         messages missed (at most once); JetStream producer on n{js_node} (consumer on \
         n{consumer_node}; stream leader n{stream_leader}, consumer leader n{consumer_leader}) \
         killed: publish acknowledged again \
         after {:.3}s (now on n{}), consumer received events published after the kill {:.3}s \
         after it; JetStream acked {} / consumed {} / lost {} / duplicates {duplicates} / \
         publish errors {}; test {:.1}s",
        resumed.as_secs_f64(),
        publish_resumed.as_secs_f64(),
        producer_now.map_or("?".to_owned(), |n| n.to_string()),
        consume_resumed.as_secs_f64(),
        published.acked_count.load(Ordering::Relaxed),
        consumed.ids.lock().await.len(),
        lost.len(),
        published.errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    ensure!(
        resumed < RESUME_BOUND,
        "the core subscriber resumed after {resumed:?} (bound {RESUME_BOUND:?})"
    );
    ensure!(
        publish_resumed < RESUME_BOUND,
        "JetStream publishing resumed after {publish_resumed:?} (bound {RESUME_BOUND:?})"
    );
    ensure!(
        consume_resumed < RESUME_BOUND,
        "the JetStream consumer resumed after {consume_resumed:?} (bound {RESUME_BOUND:?})"
    );
    ensure!(
        producer_now.is_some_and(|n| n != js_node),
        "the producer moved to another node"
    );
    ensure!(
        lost.is_empty(),
        "lost {} acknowledged JetStream events",
        lost.len()
    );
    Ok(())
}
