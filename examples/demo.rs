//! `cargo xtask demo`: the composed bus end to end, narrated.
//!
//! NATS/JetStream gives the fast acknowledgement and the real-time stream; Kafka is the
//! durable backbone; a crash-safe spool on local disk sits between them. The demo publishes a
//! stream of order events, shows the NATS ack latency and the forward to Kafka, absorbs a Kafka
//! outage in the spool and drains it afterwards, produces a dead letter, and flips a live
//! switch in a NATS KV bucket. Last, a polybus-runtime app on JetStream: a retry, a dead
//! letter, its redrive, and a graceful stop that lets the running handler finish.
//!
//! Needs nats-server with JetStream (`cargo xtask broker up nats`; `--nats URL` or
//! `POLYBUS_NATS_URL` to use another). Kafka is an embedded librdkafka MockCluster by default;
//! `--kafka host:port` uses a real Kafka instead (its outage is then simulated, since the demo
//! cannot stop your broker).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use polybus::compose::{
    Bus, RetryPolicy, Switches, X_ATTEMPTS, X_EXCEPTION_KIND, X_EXCEPTION_MESSAGE,
    X_ORIGINAL_TOPIC, write_switches,
};
use polybus::jetstream::JsOptions;
use polybus::kafka::rdkafka::mocking::MockCluster;
use polybus::kafka::{KafkaConfig, KafkaProducer};
use polybus::{Error, ErrorKind, Event, Publisher, Receipt};
use tokio::sync::Mutex;

const SUBJECT: &str = "orders.created";
const SWITCH_BUCKET: &str = "polybus-demo-switches";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    println!("polybus demo: the composed bus (NATS fast path, Kafka backbone, durable spool)\n");

    // --- Kafka: an embedded MockCluster unless --kafka is given ---------------------------
    let mock = match &args.kafka {
        Some(_) => None,
        None => {
            let mock = MockCluster::new(1).context("starting the embedded Kafka")?;
            mock.create_topic(SUBJECT, 3, 1)?;
            mock.create_topic(&format!("{SUBJECT}.dlq"), 1, 1)?;
            Some(mock)
        }
    };
    let brokers = match (&args.kafka, &mock) {
        (Some(b), _) => b.clone(),
        (None, Some(m)) => m.bootstrap_servers(),
        (None, None) => unreachable!("a mock exists when no --kafka is given"),
    };
    let kafka_cfg = KafkaConfig::new(&brokers, "polybus-demo")
        .with_create_topics(mock.is_none())
        .set("message.timeout.ms", "120000");

    let spool = tempfile::Builder::new().prefix("polybus-demo-").tempdir()?;
    println!("  NATS   {} (JetStream)", args.nats);
    match &mock {
        Some(_) => println!(
            "  Kafka  embedded MockCluster at {brokers} (--kafka host:port for a real one)"
        ),
        None => println!("  Kafka  {brokers}"),
    }
    println!("  Spool  {}", spool.path().display());
    println!("  Switches in the NATS KV bucket {SWITCH_BUCKET}\n");

    // --- The switches live in NATS KV; start from dual-write ------------------------------
    let js = JsOptions::new(&args.nats)
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach NATS at {}: start it with `cargo xtask broker up nats`",
                args.nats
            )
        })?;
    let switches = js.kv(SWITCH_BUCKET).await?;
    write_switches(&switches, Switches::default()).await?;

    // --- The bus ----------------------------------------------------------------------------
    let outage = Arc::new(AtomicBool::new(false));
    let kafka = Guarded {
        inner: KafkaProducer::new_with_config(&kafka_cfg)?,
        outage: outage.clone(),
    };
    let bus = Bus::builder()
        .nats(&args.nats)
        .kafka_config(kafka_cfg.clone())
        .kafka_publisher(kafka)
        .spool_dir(spool.path())
        .source("urn:polybus:demo")
        .switch_bucket(SWITCH_BUCKET)
        .retry(
            RetryPolicy::default()
                .max_attempts(3)
                .initial_backoff(Duration::from_millis(100))
                .max_backoff(Duration::from_secs(1)),
        )
        .build()
        .await?;

    // A Kafka consumer group (the source of truth, with dedup) and the NATS real-time stream.
    let in_kafka = Counter::default();
    let consumer = {
        let mut sub = bus.consume(SUBJECT, "billing").await?;
        let seen = in_kafka.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = sub.recv().await {
                seen.add(d.event()).await;
                let _ = d.ack().await;
            }
        })
    };
    let on_nats = Counter::default();
    let notifier = {
        let mut sub = bus.notifications(SUBJECT).await?;
        let seen = on_nats.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = sub.recv().await {
                seen.add(d.event()).await;
                let _ = d.ack().await;
            }
        })
    };

    // --- 1. A stream of events ---------------------------------------------------------------
    println!("1. Publish 500 order events (20 customers; the customer is the ordering key)");
    let started = Instant::now();
    let mut nats_lat = Vec::new();
    let mut ack_lat = Vec::new();
    for i in 0..500 {
        let r = bus.publish(SUBJECT, order(i)).await?;
        nats_lat.extend(r.nats_latency());
        ack_lat.push(r.latency());
    }
    println!(
        "   500 acknowledged in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "   NATS/JetStream ack latency            p50 {}  p99 {}",
        ms(percentile(&mut nats_lat, 0.5)),
        ms(percentile(&mut nats_lat, 0.99))
    );
    println!(
        "   publish ack (JetStream + spool fsync)  p50 {}  p99 {}",
        ms(percentile(&mut ack_lat, 0.5)),
        ms(percentile(&mut ack_lat, 0.99))
    );
    let t = Instant::now();
    wait(
        || bus.spool_depth() == 0,
        Duration::from_secs(60),
        "the forward to Kafka",
    )
    .await?;
    println!(
        "   forwarded to Kafka in the background: spool empty {:.2} s later",
        t.elapsed().as_secs_f64()
    );
    wait_count(&in_kafka, 500, "the Kafka consumer").await?;
    wait_count(&on_nats, 500, "the NATS notifications").await?;
    println!(
        "   Kafka consumer group 'billing' has {} events, NATS notifications {}\n",
        in_kafka.len().await,
        on_nats.len().await
    );

    // --- 2. Kafka goes down --------------------------------------------------------------------
    println!("2. Kafka outage");
    match &mock {
        Some(m) => {
            m.broker_down(1)?;
            println!("   Kafka broker 1 is DOWN");
        }
        None => {
            outage.store(true, Ordering::SeqCst);
            println!("   Kafka is DOWN (simulated: every write fails as if unreachable)");
        }
    }
    let mut lat = Vec::new();
    for i in 500..700 {
        lat.push(bus.publish(SUBJECT, order(i)).await?.latency());
    }
    println!(
        "   published 200 more: all acknowledged (ack p99 {}); the spool holds {}",
        ms(percentile(&mut lat, 0.99)),
        bus.spool_depth()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "   3 s later: spool {}, Kafka consumer still at {}, forwards waiting (failed forward attempts so far {})",
        bus.spool_depth(),
        in_kafka.len().await,
        bus.stats().retries
    );
    match &mock {
        Some(m) => m.broker_up(1)?,
        None => outage.store(false, Ordering::SeqCst),
    }
    println!("   Kafka is UP again");
    let t = Instant::now();
    wait(
        || bus.spool_depth() == 0,
        Duration::from_secs(120),
        "the spool to drain",
    )
    .await?;
    println!("   spool drained in {:.2} s", t.elapsed().as_secs_f64());
    wait_count(&in_kafka, 700, "the Kafka consumer").await?;
    println!(
        "   Kafka consumer group 'billing' has {} events: nothing acknowledged was lost\n",
        in_kafka.len().await
    );

    // --- 3. A dead letter ----------------------------------------------------------------------
    println!("3. A dead letter");
    println!("   the Kafka side checks that payloads are JSON; publish one that is not");
    let bad = Event::builder()
        .header("demorun", run_id())
        .key("customer-13")
        .content_type("text/plain")
        .data("this is not JSON")
        .build()?;
    let bad_id = bus.publish(SUBJECT, bad).await?.id().to_owned();
    wait(
        || bus.stats().dead_letters == 1,
        Duration::from_secs(30),
        "the dead letter",
    )
    .await?;
    let dlq = bus.dead_letter_topic(SUBJECT)?;
    let mut letters = bus.dead_letters(SUBJECT, "demo-dlq-reader").await?;
    let letter = tokio::time::timeout(Duration::from_secs(30), letters.recv())
        .await
        .context("no dead letter arrived")?
        .context("dead-letter stream ended")??;
    if letter.event().id() != bad_id {
        bail!("unexpected dead letter {}", letter.event().id());
    }
    let h = letter.event().headers();
    println!("   after 3 attempts it went to {dlq}:");
    println!(
        "     key                  {}",
        String::from_utf8_lossy(letter.event().key().unwrap_or_default())
    );
    for name in [
        X_ORIGINAL_TOPIC,
        X_EXCEPTION_KIND,
        X_EXCEPTION_MESSAGE,
        X_ATTEMPTS,
    ] {
        println!("     {name:<20} {}", h.get(name).unwrap_or("-"));
    }
    letter.ack().await?;
    drop(letters);
    println!("   (Bus::redrive moves dead letters back once the cause is fixed)\n");

    // --- 4. A live switch ------------------------------------------------------------------------
    println!("4. A live switch (NATS KV, watched; no restart)");
    let before_kafka = in_kafka.len().await;
    let before_nats = on_nats.len().await;
    println!("   nats kv put {SWITCH_BUCKET} dual_write off      -> NATS only");
    let t = Instant::now();
    switches.put("dual_write", "off").await?;
    wait(
        || !bus.switches().get().dual_write(),
        Duration::from_secs(5),
        "the switch",
    )
    .await?;
    println!(
        "   applied after {} (mode now: {})",
        ms(t.elapsed()),
        bus.switches().get()
    );
    for i in 700..800 {
        bus.publish(SUBJECT, order(i)).await?;
    }
    wait_count(&on_nats, before_nats + 100, "the NATS notifications").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "   published 100: NATS notifications +{}, Kafka consumer +{}, spool {} (the Kafka copies wait)",
        on_nats.len().await - before_nats,
        in_kafka.len().await - before_kafka,
        bus.spool_depth()
    );
    println!("   nats kv put {SWITCH_BUCKET} dual_write on       -> dual-write");
    let t = Instant::now();
    switches.put("dual_write", "on").await?;
    wait(
        || bus.switches().get().dual_write(),
        Duration::from_secs(5),
        "the switch",
    )
    .await?;
    println!("   applied after {}", ms(t.elapsed()));
    wait(
        || bus.spool_depth() == 0,
        Duration::from_secs(60),
        "the spool to drain",
    )
    .await?;
    wait_count(&in_kafka, before_kafka + 100, "the Kafka consumer").await?;
    println!(
        "   the held events were forwarded: Kafka consumer +{}\n",
        in_kafka.len().await - before_kafka
    );

    // --- The runtime -------------------------------------------------------------------------------
    runtime_section(&js).await?;

    // --- Summary -----------------------------------------------------------------------------------
    let s = bus.stats();
    println!("Summary");
    println!(
        "   published {}, forwarded to Kafka {}, dead letters {}, failed forward attempts {}, spool max depth {}",
        s.published, s.forwarded, s.dead_letters, s.retries, s.spool_max_depth
    );
    println!(
        "   Kafka consumer saw {} distinct events (duplicates dropped: {}), NATS saw {}",
        in_kafka.len().await,
        s.consume_duplicates,
        on_nats.len().await
    );
    consumer.abort();
    notifier.abort();
    bus.close().await?;
    // Let the consumers leave their groups while the embedded Kafka still runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    write_switches(&switches, Switches::default()).await?;
    println!("   bus closed; the spool is empty");
    drop(mock);
    Ok(())
}

/// The Kafka side as the demo uses it: a schema check in front of the producer (payloads must
/// be JSON; dead-letter topics take anything) and a simulated outage for a real Kafka.
struct Guarded<P> {
    inner: P,
    outage: Arc<AtomicBool>,
}

impl<P: Publisher> Publisher for Guarded<P> {
    async fn publish(&self, topic: &str, event: Event) -> polybus::Result<Receipt> {
        if self.outage.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Err(Error::new(ErrorKind::Connect, "kafka").with_message("simulated outage"));
        }
        if !topic.ends_with(".dlq")
            && serde_json::from_slice::<serde_json::Value>(event.data()).is_err()
        {
            return Err(Error::new(ErrorKind::Rejected, "kafka")
                .with_message("schema check: the payload is not JSON"));
        }
        self.inner.publish(topic, event).await
    }
    async fn flush(&self) -> polybus::Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> polybus::Result<()> {
        self.inner.close().await
    }
}

/// Tags this run's events (the `demorun` CloudEvents extension).
fn run_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("{}-{t}", std::process::id())
    })
}

fn order(i: usize) -> Event {
    let customer = format!("customer-{}", i % 20);
    Event::builder()
        .kind("order.created")
        .header("demorun", run_id())
        .key(customer.clone())
        .content_type("application/json")
        .data(format!("{{\"order\":{i},\"customer\":\"{customer}\"}}"))
        .build()
        .expect("a valid event")
}

/// Distinct event ids seen by a reader.
#[derive(Clone, Default)]
struct Counter(Arc<Mutex<HashSet<String>>>, Arc<AtomicUsize>);

impl Counter {
    /// Counts `event` if this run published it (a real Kafka keeps earlier runs' events).
    async fn add(&self, event: &Event) {
        if event.headers().get("demorun") != Some(run_id()) {
            return;
        }
        if self.0.lock().await.insert(event.id().to_owned()) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }
    async fn len(&self) -> usize {
        self.0.lock().await.len()
    }
}

async fn wait(mut cond: impl FnMut() -> bool, limit: Duration, what: &str) -> Result<()> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn wait_count(c: &Counter, n: usize, what: &str) -> Result<()> {
    let counter = c.1.clone();
    wait(
        || counter.load(Ordering::Relaxed) >= n,
        Duration::from_secs(60),
        what,
    )
    .await
}

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let idx = ((v.len() - 1) as f64 * q).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Args {
    nats: String,
    kafka: Option<String>,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut nats =
            std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let mut kafka = None;
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--kafka" => kafka = Some(it.next().context("--kafka needs host:port")?),
                "--nats" => nats = it.next().context("--nats needs a URL")?,
                "-h" | "--help" => {
                    println!("usage: demo [--nats nats://host:4222] [--kafka host:port]");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --help)"),
            }
        }
        Ok(Args { nats, kafka })
    }
}

/// What the runtime section's handler shares with the demo.
#[derive(Clone, Default)]
struct Payments {
    /// Off: the payment service is down for order 7 (every attempt fails).
    healed: Arc<AtomicBool>,
}

/// The runtime section's handler: order 3 times out once, order 7 fails until the service is
/// healed, order 9 takes 800 ms (still running when the stop comes).
async fn charge(
    polybus::runtime::Json(o): polybus::runtime::Json<serde_json::Value>,
    polybus::runtime::Attempt(attempt): polybus::runtime::Attempt,
    polybus::runtime::State(p): polybus::runtime::State<Payments>,
) -> Result<(), polybus::runtime::HandlerError> {
    use polybus::runtime::HandlerError;
    match o["order"].as_u64() {
        Some(3) if attempt == 1 => Err(HandlerError::transient("payment service timed out")),
        Some(7) if !p.healed.load(Ordering::SeqCst) => {
            Err(HandlerError::transient("payment service down"))
        }
        Some(9) => {
            tokio::time::sleep(Duration::from_millis(800)).await;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Section 5, polybus-runtime on JetStream: handlers instead of a consume loop. Checks what
/// happened and fails the demo when it is not what it should be.
async fn runtime_section(js: &polybus::jetstream::JetStream) -> Result<()> {
    use polybus::runtime::{App, RedriveOptions, Report, RetryPolicy, Settlement, Status, redrive};
    use std::collections::HashMap;

    println!(
        "5. polybus-runtime: a handler app on JetStream (retry, dead letter, redrive, graceful stop)"
    );
    let run = run_id();
    let stream = format!("POLYBUS_DEMO_RT_{}", run.replace('-', "_"));
    let topic = format!("demo.rt.{run}.payments");
    let dlq = format!("{topic}.dlq");
    // One stream per subject: JetStream deduplicates by event id (Nats-Msg-Id) per stream, and
    // a dead letter keeps its event's id.
    let settings = polybus::jetstream::StreamSettings::default();
    js.ensure_stream(&stream, &[&topic], &settings).await?;
    js.ensure_stream(&format!("{stream}_DLQ"), &[&dlq], &settings)
        .await?;
    let section = async {
        let payments = Payments::default();
        let reports: Arc<std::sync::Mutex<Vec<Report>>> = Arc::default();
        let rec = reports.clone();
        let app = App::with_state(payments.clone())
            .route(topic.clone(), charge)
            .retry(
                RetryPolicy::exponential(Duration::from_millis(200))
                    .max_attempts(3)
                    .jitter(0.0),
            )
            .concurrency(4)
            .drain_timeout(Duration::from_secs(5))
            .on_report(move |r| rec.lock().expect("reports").push(r.clone()));
        let mut status = app.status();
        let health = app.health();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let group = format!("demo-payments-{run}");
        let running =
            tokio::spawn(
                app.run_until(js.consumer(Some(&group)), js.producer(), async move {
                    let _ = stopped.await;
                }),
            );
        status.wait_for(|s| *s == Status::Running).await?;

        let producer = js.producer();
        let mut ids = HashMap::new();
        for i in 1..=8u64 {
            let ev = Event::builder()
                .key(format!("customer-{}", i % 3))
                .content_type("application/json")
                .data(format!(r#"{{"order":{i}}}"#))
                .build()?;
            ids.insert(ev.id().to_owned(), i);
            producer.publish(&topic, ev).await?;
        }
        let order_of = |r: &Report| ids.get(r.id()).copied();
        let final_of = |n: u64| {
            reports
                .lock()
                .expect("reports")
                .iter()
                .filter(|r| order_of(r) == Some(n) && r.settlement().is_terminal())
                .last()
                .cloned()
        };
        let settled = || (1..=8).filter(|n| final_of(*n).is_some()).count();
        wait(
            || settled() == 8,
            Duration::from_secs(30),
            "8 payments settled",
        )
        .await?;
        for r in reports.lock().expect("reports").iter() {
            if let Some(n) = order_of(r)
                && !matches!(r.settlement(), Settlement::Acked)
            {
                println!(
                    "   order {n}, attempt {}: {:?}",
                    r.attempt(),
                    r.settlement()
                );
            }
        }
        let three = final_of(3).expect("settled");
        if three.settlement() != &Settlement::Acked || three.attempt() != 2 {
            bail!("order 3 should be paid on attempt 2, got {three:?}");
        }
        let seven = final_of(7).expect("settled");
        if !matches!(seven.settlement(), Settlement::DeadLettered { topic, .. } if *topic == dlq)
            || seven.attempt() != 3
        {
            bail!("order 7 should be dead-lettered to {dlq} after 3 attempts, got {seven:?}");
        }
        let acked = (1..=8)
            .filter(|n| final_of(*n).is_some_and(|r| r.settlement() == &Settlement::Acked))
            .count();
        println!("   7 of 8 paid (order 3 on its retry); order 7 went to {dlq} after 3 attempts");
        if acked != 7 {
            bail!("expected 7 paid, got {acked}");
        }

        // The service is back: move the dead letter home and watch it go through.
        payments.healed.store(true, Ordering::SeqCst);
        let before = reports.lock().expect("reports").len();
        let redriver = js.consumer(Some(&format!("demo-redrive-{run}")));
        let moved = redrive(
            &redriver,
            &dlq,
            &producer,
            |_| true,
            RedriveOptions::default().idle(Duration::from_secs(3)),
        )
        .await?;
        println!(
            "   redrive moved {} dead letter(s) from {dlq} back to {topic}",
            moved.moved
        );
        if moved.moved != 1 {
            bail!("redrive should move 1 dead letter, moved {}", moved.moved);
        }
        wait(
            || {
                reports.lock().expect("reports")[before..]
                    .iter()
                    .any(|r| r.settlement() == &Settlement::Acked)
            },
            Duration::from_secs(30),
            "the redriven order 7 to be paid",
        )
        .await?;
        println!("   order 7 paid after the redrive");

        // A graceful stop while order 9 (800 ms) runs: it finishes and is acknowledged.
        let slow = Event::builder()
            .key("customer-0")
            .content_type("application/json")
            .data(r#"{"order":9}"#)
            .build()?;
        let slow_id = slow.id().to_owned();
        producer.publish(&topic, slow).await?;
        wait(
            || health.in_flight() > 0,
            Duration::from_secs(10),
            "order 9 to start",
        )
        .await?;
        let t = Instant::now();
        let _ = stop.send(());
        running.await??;
        let paid = reports
            .lock()
            .expect("reports")
            .iter()
            .any(|r| r.id() == slow_id && r.settlement() == &Settlement::Acked);
        println!(
            "   stop asked while order 9 ran: the app drained in {} and stopped ({:?}); order 9 {}",
            ms(t.elapsed()),
            *status.borrow(),
            if paid { "paid" } else { "NOT paid" }
        );
        if !paid || *status.borrow() != Status::Stopped {
            bail!("the graceful stop should finish order 9 and stop the app");
        }
        println!();
        Ok(())
    };
    let result = section.await;
    let _ = js.context().delete_stream(&stream).await;
    let _ = js.context().delete_stream(format!("{stream}_DLQ")).await;
    result
}
