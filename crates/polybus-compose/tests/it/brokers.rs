//! Acceptance runs against real brokers: nats-server (shared, JetStream) and tansu (shared, or
//! an own instance where the test kills it). Ignored under plain `cargo test`; run with
//! `cargo xtask test` or `cargo test -p polybus-compose --test it -- --include-ignored`.
//!
//! Each test prints a `FIGURES` line: published, acknowledged, records in Kafka, duplicates
//! removed, spool max depth.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use polybus_compose::{
    Bus, BusBuilder, Channel, RedriveOptions, RetryPolicy, Switches, X_ATTEMPTS, X_EXCEPTION_KIND,
    X_EXCEPTION_MESSAGE, X_ORIGINAL_SUBJECT, X_ORIGINAL_TOPIC, write_switches,
};
use polybus_core::Event;
use polybus_jetstream::JsOptions;
use polybus_kafka::{KafkaConfig, KafkaProducer};
use polybus_testkit::brokers::{self, BrokerProcess, TansuStorage};
use tokio::sync::Mutex;

use crate::crash::run_child_and_kill;
use crate::support::{Flaky, keyed};

pub(crate) fn subject(name: &str) -> String {
    format!("compose.{name}.{}", uuid::Uuid::now_v7().simple())
}

/// A bus over real brokers with retries fast enough for tests.
pub(crate) fn builder(nats: &str, kafka: &str, spool: &std::path::Path) -> BusBuilder {
    Bus::builder()
        .nats(nats)
        .kafka_config(kafka_config(kafka))
        .spool_dir(spool)
        .retry(
            RetryPolicy::default()
                .max_attempts(3)
                .initial_backoff(Duration::from_millis(20))
                .max_backoff(Duration::from_secs(1)),
        )
        .drain_timeout(Duration::from_secs(20))
}

pub(crate) fn kafka_config(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers, "polybus-compose-tests").with_topic_defaults(3, 1)
}

/// Every record of `topic`, read from the beginning of each partition by one plain librdkafka
/// consumer with manual assignment (no consumer group, so the check does not depend on the
/// broker's group coordinator). Events are rebuilt from the CloudEvents Kafka binding: `ce_id`,
/// the record key, the payload, extensions (`ce_<name>`) and plain headers.
///
/// One reader, no second chance: once every wanted id has come it reads on to the end of the
/// topic (each partition's high watermark, taken at that moment), so a later copy of a wanted
/// event is read and counted; it stops early when nothing has come for `idle`.
/// `auto.offset.reset = error` turns a failed start-offset lookup into an error instead of a
/// silent jump to the end of a partition (librdkafka's default, `latest`).
pub(crate) async fn read_kafka(
    brokers: &str,
    topic: &str,
    want: &HashSet<String>,
    idle: Duration,
) -> Result<Vec<Event>> {
    use polybus_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
    use polybus_kafka::rdkafka::message::Headers as _;
    use polybus_kafka::rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

    let (brokers, topic, want) = (brokers.to_owned(), topic.to_owned(), want.clone());
    tokio::task::spawn_blocking(move || -> Result<Vec<Event>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "polybus-compose-verify-unused")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "error")
            .create()?;
        let started = Instant::now();
        let partitions = loop {
            let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10));
            match md {
                Ok(md) => {
                    let n = md
                        .topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .map_or(0, |t| t.partitions().len());
                    if n > 0 {
                        break n;
                    }
                }
                Err(e) if started.elapsed() > Duration::from_secs(60) => return Err(e.into()),
                Err(_) => {}
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("topic {topic} has no partitions");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, i32::try_from(p)?, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut last = Instant::now();
        // Per partition: the next offset to read, and (once every wanted id has come) the
        // high watermark to read up to.
        let mut next = vec![0i64; partitions];
        let mut end: Option<Vec<i64>> = None;
        while last.elapsed() < idle {
            if end.is_none() && want.is_subset(&seen) {
                let mut highs = Vec::with_capacity(partitions);
                for p in 0..partitions {
                    let (_, high) = consumer.fetch_watermarks(
                        &topic,
                        i32::try_from(p)?,
                        Duration::from_secs(10),
                    )?;
                    highs.push(high);
                }
                end = Some(highs);
            }
            if end
                .as_ref()
                .is_some_and(|e| e.iter().zip(&next).all(|(high, next)| next >= high))
            {
                break;
            }
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            last = Instant::now();
            if let Some(n) = usize::try_from(m.partition())
                .ok()
                .and_then(|p| next.get_mut(p))
            {
                *n = m.offset() + 1;
            }
            let mut id = None;
            let mut headers = Vec::new();
            if let Some(h) = m.headers() {
                for hdr in h.iter() {
                    let v = hdr
                        .value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    match hdr.key.strip_prefix("ce_") {
                        Some("id") => id = Some(v),
                        Some(
                            "source" | "type" | "time" | "specversion" | "partitionkey"
                            | "datacontenttype",
                        ) => {}
                        Some(ext) => headers.push((ext.to_owned(), v)),
                        None if hdr.key == "content-type" => {}
                        None => headers.push((hdr.key.to_owned(), v)),
                    }
                }
            }
            let id = id.context("a record without ce_id")?;
            seen.insert(id.clone());
            let mut b = Event::builder().id(id);
            if let Some(k) = m.key() {
                b = b.key(k.to_vec());
            }
            if let Some(p) = m.payload() {
                b = b.data(p.to_vec());
            }
            let mut ev = b.build()?;
            for (k, v) in headers {
                ev.headers_mut().append_unchecked(k, v);
            }
            out.push(ev);
        }
        Ok(out)
    })
    .await?
}

/// Dedup by id: (unique events, duplicates removed).
pub(crate) fn dedup(events: &[Event]) -> (Vec<Event>, usize) {
    let mut seen = HashSet::new();
    let mut unique = Vec::new();
    for e in events {
        if seen.insert(e.id().to_owned()) {
            unique.push(e.clone());
        }
    }
    let dups = events.len() - unique.len();
    (unique, dups)
}

/// Per-key order of the `seq` header among `events` (first copies): violations found.
pub(crate) fn order_violations(events: &[Event]) -> usize {
    let mut last: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut bad = 0;
    for e in events {
        let Some(seq) = e.headers().get("seq").and_then(|s| s.parse::<usize>().ok()) else {
            continue;
        };
        let key = e.key().unwrap_or_default().to_vec();
        if let Some(prev) = last.insert(key, seq)
            && prev > seq
        {
            bad += 1;
        }
    }
    bad
}

/// Publishes `n` keyed events from `tasks` concurrent tasks; returns the acknowledged ids.
/// `on_progress` is polled by the caller through the counter.
async fn publish_many(
    bus: &Bus,
    subject: &str,
    n: usize,
    tasks: usize,
    acked_count: Arc<AtomicUsize>,
) -> Result<HashSet<String>> {
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (bus, subject, acked, acked_count) = (
            bus.clone(),
            subject.to_owned(),
            acked.clone(),
            acked_count.clone(),
        );
        handles.push(tokio::spawn(async move {
            // Task t publishes i = t, t + tasks, ...: each key's events come from one task in
            // increasing order, so per-key order is defined.
            let mut i = t;
            while i < n {
                let ev = keyed("ev", i, tasks * 4);
                let r = bus.publish(&subject, ev).await?;
                acked.lock().await.insert(r.id().to_owned());
                acked_count.fetch_add(1, Ordering::Relaxed);
                i += tasks;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let acked = acked.lock().await.clone();
    Ok(acked)
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn kafka_down_10s_while_publishing_10000_events_loses_and_duplicates_nothing() -> Result<()> {
    let mut tansu = BrokerProcess::tansu(TansuStorage::Sqlite).await?;
    let kafka = tansu.url();
    let spool = tempfile::tempdir()?;
    let subject = subject("outage");
    let bus = builder(&brokers::nats_url(), &kafka, spool.path())
        .build()
        .await?;
    let topic = bus.topic_map().kafka_topic(&subject)?;

    let count = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (bus, subject, count) = (bus.clone(), subject.clone(), count.clone());
        tokio::spawn(async move { publish_many(&bus, &subject, 10_000, 16, count).await })
    };
    // Kill Kafka once a quarter is in, keep it down for 10 s while publishing goes on.
    while count.load(Ordering::Relaxed) < 2_500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tansu.kill().await;
    let down_at = count.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = bus.stats();
    let acked_while_down = count.load(Ordering::Relaxed) - down_at;
    tansu.start().await?;
    let acked = publisher.await??;
    let started = Instant::now();
    ensure!(
        bus.wait_forwarded(Duration::from_secs(180)).await,
        "spool not drained: {:?}",
        bus.stats()
    );
    let drain = started.elapsed();
    let stats = bus.stats();
    bus.close().await?;

    println!("stats after drain: {stats:?}");
    let records = read_kafka(&kafka, &topic, &acked, Duration::from_secs(30)).await?;
    let (unique, dups) = dedup(&records);
    let ids: HashSet<String> = unique.iter().map(|e| e.id().to_owned()).collect();
    let lost: Vec<_> = acked.difference(&ids).take(5).collect();
    println!(
        "FIGURES outage: published 10000, acked {}, acked while Kafka was down {acked_while_down}, \
         in Kafka {} records, duplicates removed {dups}, unique {}, spool max depth {}, \
         spool depth while down {}, retries {}, drain after restart {drain:?}, \
         per-key order violations {}",
        acked.len(),
        records.len(),
        unique.len(),
        stats.spool_max_depth,
        during.spool_depth,
        stats.retries,
        order_violations(&unique),
    );
    ensure!(acked.len() == 10_000, "acked {}", acked.len());
    ensure!(lost.is_empty(), "acknowledged but not in Kafka: {lost:?}");
    ensure!(ids.len() == acked.len(), "exactly once after dedup");
    // What the crate docs promise for an outage without a crash: the idempotent producer
    // dedups its own retries, and each key's events reach Kafka in publish order.
    ensure!(dups == 0, "{dups} duplicates in Kafka after a Kafka outage");
    let violations = order_violations(&unique);
    ensure!(
        violations == 0,
        "{violations} per-key order violations in Kafka"
    );
    ensure!(stats.spool_depth == 0, "spool empty at the end");
    ensure!(stats.dead_letters == 0, "an outage dead-lettered events");
    ensure!(acked_while_down > 0, "publishing went on during the outage");
    Ok(())
}

pub(crate) const REAL_CHILD_ENV: &str = "POLYBUS_COMPOSE_REAL_CHILD";

/// The child half of `sigkill_of_the_bus_process_loses_no_acknowledged_event`, which runs
/// itself again with `REAL_CHILD_ENV` set: publishes on real brokers until killed.
async fn real_sigkill_child(spec: String) -> Result<()> {
    let mut parts = spec.splitn(3, '|');
    let (dir, subject, kafka) = (
        parts.next().context("dir")?,
        parts.next().context("subject")?,
        parts.next().context("kafka")?,
    );
    let bus = builder(&brokers::nats_url(), kafka, dir.as_ref())
        .build()
        .await?;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (bus, subject) = (bus.clone(), subject.to_owned());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let r = bus
                    .publish(&subject, keyed(&format!("k{t}"), i, 16))
                    .await?;
                println!("ACK {}", r.id());
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn sigkill_of_the_bus_process_loses_no_acknowledged_event() -> Result<()> {
    if let Ok(spec) = std::env::var(REAL_CHILD_ENV) {
        return real_sigkill_child(spec).await;
    }
    let kafka = brokers::kafka_brokers();
    let spool = tempfile::tempdir()?;
    let subject = subject("sigkill");
    let spec = format!("{}|{subject}|{kafka}", spool.path().display());
    let acked = tokio::task::spawn_blocking(move || {
        run_child_and_kill(
            "brokers::sigkill_of_the_bus_process_loses_no_acknowledged_event",
            &[(REAL_CHILD_ENV, spec)],
            3_000,
        )
    })
    .await??;

    let bus = builder(&brokers::nats_url(), &kafka, spool.path())
        .build()
        .await?;
    let depth_at_restart = bus.spool_depth();
    ensure!(bus.wait_forwarded(Duration::from_secs(120)).await);
    let stats = bus.stats();
    let topic = bus.topic_map().kafka_topic(&subject)?;
    bus.close().await?;
    let records = read_kafka(&kafka, &topic, &acked, Duration::from_secs(30)).await?;
    let (unique, dups) = dedup(&records);
    let ids: HashSet<String> = unique.iter().map(|e| e.id().to_owned()).collect();
    let lost: Vec<_> = acked.difference(&ids).take(5).collect();
    println!(
        "FIGURES sigkill: acked before the kill {}, spooled at restart {depth_at_restart}, \
         forwarded after restart {}, in Kafka {} records ({} unique, incl. unacked in-flight \
         ones), duplicates removed {dups}, spool max depth after restart {}",
        acked.len(),
        stats.forwarded,
        records.len(),
        unique.len(),
        stats.spool_max_depth,
    );
    ensure!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    Ok(())
}

/// A Kafka publisher that rejects events with the header `poison` (not on dead-letter topics)
/// while `reject_poison` is on: a downstream that always fails for one event.
fn poison_rejecting(kafka: &str) -> Result<Flaky<KafkaProducer>> {
    Ok(Flaky::new(KafkaProducer::new_with_config(&kafka_config(
        kafka,
    ))?))
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn a_failing_event_is_dead_lettered_with_key_and_headers_and_redriven() -> Result<()> {
    let kafka = brokers::kafka_brokers();
    let spool = tempfile::tempdir()?;
    let subject = subject("dlq");
    let producer = poison_rejecting(&kafka)?;
    let reject = producer.reject_poison.clone();
    let bus = builder(&brokers::nats_url(), &kafka, spool.path())
        .kafka_publisher(producer.clone())
        .build()
        .await?;
    let topic = bus.topic_map().kafka_topic(&subject)?;
    let dlq = bus.dead_letter_topic(&subject)?;
    let poison = Event::builder()
        .id(format!("poison-{}", uuid::Uuid::now_v7().simple()))
        .key("customer-7")
        .header("poison", "yes")
        .header("tenant", "eu")
        .build()?;
    bus.publish(&subject, poison.clone()).await?;
    let fine = bus.publish(&subject, b"fine").await?;
    ensure!(bus.wait_forwarded(Duration::from_secs(60)).await);
    let stats = bus.stats();
    ensure!(stats.dead_letters == 1, "{stats:?}");

    let want: HashSet<String> = [poison.id().to_owned()].into();
    let dead = read_kafka(&kafka, &dlq, &want, Duration::from_secs(15)).await?;
    let d = dead.first().context("a dead letter")?;
    let h = d.headers();
    println!(
        "FIGURES dlq: dead letter in {dlq}: key {:?}, {X_ORIGINAL_TOPIC}={:?}, \
         {X_ORIGINAL_SUBJECT}={:?}, {X_EXCEPTION_MESSAGE}={:?}, {X_EXCEPTION_KIND}={:?}, \
         {X_ATTEMPTS}={:?}; attempts made by the wrapper {}",
        d.key().map(String::from_utf8_lossy),
        h.get(X_ORIGINAL_TOPIC),
        h.get(X_ORIGINAL_SUBJECT),
        h.get(X_EXCEPTION_MESSAGE),
        h.get(X_EXCEPTION_KIND),
        h.get(X_ATTEMPTS),
        producer.attempts.load(Ordering::Relaxed),
    );
    ensure!(d.id() == poison.id());
    ensure!(d.key() == Some(&b"customer-7"[..]), "key kept");
    ensure!(h.get("tenant") == Some("eu"), "headers kept");
    ensure!(h.get(X_ORIGINAL_TOPIC) == Some(topic.as_str()));
    ensure!(h.get(X_ORIGINAL_SUBJECT) == Some(subject.as_str()));
    ensure!(h.get(X_ATTEMPTS) == Some("3"));
    ensure!(h.get(X_EXCEPTION_KIND) == Some("rejected"));
    ensure!(
        h.get(X_EXCEPTION_MESSAGE)
            .is_some_and(|m| m.contains("poison record"))
    );

    // The cause is fixed; redrive moves it back and it reaches the topic.
    reject.store(false, Ordering::SeqCst);
    let moved = bus
        .redrive(
            &subject,
            RedriveOptions::default()
                .group(format!("redrive-{}", uuid::Uuid::now_v7().simple()))
                .idle(Duration::from_secs(5)),
        )
        .await?;
    ensure!(moved == 1, "moved {moved}");
    ensure!(bus.wait_forwarded(Duration::from_secs(60)).await);
    bus.close().await?;
    let want: HashSet<String> = [poison.id().to_owned(), fine.id().to_owned()].into();
    let back = read_kafka(&kafka, &topic, &want, Duration::from_secs(15)).await?;
    let redriven = back
        .iter()
        .find(|e| e.id() == poison.id())
        .context("redriven event in the topic")?;
    ensure!(redriven.headers().get(X_ATTEMPTS).is_none());
    ensure!(redriven.key() == Some(&b"customer-7"[..]));
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn the_same_event_three_times_across_a_restart_is_one_record_and_one_delivery() -> Result<()>
{
    let kafka = brokers::kafka_brokers();
    let spool = tempfile::tempdir()?;
    let subject = subject("dedup");
    let ev = Event::builder()
        .id(format!("same-{}", uuid::Uuid::now_v7().simple()))
        .source("urn:polybus:test")
        .key("k")
        .data("{\"n\":1}")
        .build()?;

    let bus = builder(&brokers::nats_url(), &kafka, spool.path())
        .build()
        .await?;
    let topic = bus.topic_map().kafka_topic(&subject)?;
    let first = bus.publish(&subject, ev.clone()).await?;
    let second = bus.publish(&subject, ev.clone()).await?;
    ensure!(bus.wait_forwarded(Duration::from_secs(30)).await);
    bus.close().await?;
    drop(bus);

    let bus = builder(&brokers::nats_url(), &kafka, spool.path())
        .build()
        .await?;
    let third = bus.publish(&subject, ev.clone()).await?;
    ensure!(bus.wait_forwarded(Duration::from_secs(30)).await);
    let stats = bus.stats();

    let want: HashSet<String> = [ev.id().to_owned()].into();
    let records = read_kafka(&kafka, &topic, &want, Duration::from_secs(5)).await?;
    let copies = records.iter().filter(|e| e.id() == ev.id()).count();

    // Consumer side: a copy written straight to Kafka (as a crash between the forward and the
    // spool deletion would leave) is dropped by Bus::consume.
    KafkaProducer::new_with_config(&kafka_config(&kafka))?
        .publish(&topic, ev.clone())
        .await?;
    let mut sub = bus
        .consume(
            &subject,
            &format!("fresh-{}", uuid::Uuid::now_v7().simple()),
        )
        .await?;
    let mut delivered = 0;
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(8), sub.recv()).await {
        let d = d?;
        if d.event().id() == ev.id() {
            delivered += 1;
        }
        d.ack().await?;
    }
    let consume_dups = bus.stats().consume_duplicates;
    bus.close().await?;
    println!(
        "FIGURES dedup: published 3 (2 + restart + 1), JetStream duplicates {:?}, \
         Kafka records {copies}, forward duplicates skipped {}, consumer deliveries {delivered} \
         (after one more raw copy), consumer duplicates removed {consume_dups}",
        [
            first.is_duplicate(),
            second.is_duplicate(),
            third.is_duplicate()
        ],
        stats.forward_duplicates,
    );
    ensure!(copies == 1, "{copies} Kafka records for one event");
    ensure!(
        second.is_duplicate() && third.is_duplicate(),
        "JetStream Nats-Msg-Id dedup"
    );
    ensure!(delivered == 1, "{delivered} deliveries");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn switch_flips_in_nats_kv_while_publishing_lose_nothing() -> Result<()> {
    let kafka = brokers::kafka_brokers();
    let nats = brokers::nats_url();
    let spool = tempfile::tempdir()?;
    let subject = subject("switch");
    let bucket_name = format!("switches-{}", uuid::Uuid::now_v7().simple());
    let js = JsOptions::new(&nats).connect().await?;
    let bucket = js.kv(&bucket_name).await?;
    write_switches(&bucket, Switches::default()).await?;
    let bus = builder(&nats, &kafka, spool.path())
        .switch_bucket(&bucket_name)
        .build()
        .await?;
    let topic = bus.topic_map().kafka_topic(&subject)?;
    let mut notes = bus.notifications(&subject).await?;

    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (bus, subject, count) = (bus.clone(), subject.clone(), count.clone());
        tokio::spawn(async move { publish_many(&bus, &subject, 3_000, 4, count).await })
    };
    let notified = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(200), notes.recv()).await
                {
                    n += 1;
                    d.ack().await?;
                }
            }
            anyhow::Ok(n)
        })
    };
    let wait_count = |n: usize| {
        let count = count.clone();
        async move {
            while count.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // Time from the start of the KV write to the bus applying it.
    let wait_switch = |want: Switches, t: Instant| {
        let bus = bus.clone();
        async move {
            while bus.switches().get() != want {
                if t.elapsed() > Duration::from_secs(5) {
                    bail!("switch not applied within 5 s");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(t.elapsed())
        }
    };

    wait_count(1_000).await;
    let nats_only = Switches::default()
        .with_dual_write(false)
        .with_single_channel(Channel::Nats);
    let t = Instant::now();
    write_switches(&bucket, nats_only).await?;
    let to_nats_only = wait_switch(nats_only, t).await?;
    let forwarded_at_flip = bus.stats().forwarded;
    wait_count(2_000).await;
    // Let the held forwards show: nothing more reaches Kafka while NATS-only.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = bus.stats();
    let t = Instant::now();
    write_switches(&bucket, Switches::default()).await?;
    let back_to_dual = wait_switch(Switches::default(), t).await?;
    let acked = publisher.await??;
    ensure!(bus.wait_forwarded(Duration::from_secs(60)).await);
    let stats = bus.stats();
    stop.store(true, Ordering::Relaxed);
    let notifications = notified.await??;
    bus.close().await?;

    let records = read_kafka(&kafka, &topic, &acked, Duration::from_secs(15)).await?;
    let (unique, dups) = dedup(&records);
    let ids: HashSet<String> = unique.iter().map(|e| e.id().to_owned()).collect();
    let lost: Vec<_> = acked.difference(&ids).take(5).collect();
    println!(
        "FIGURES switches: published 3000, acked {}, switch applied after {to_nats_only:?} \
         (to NATS-only) and {back_to_dual:?} (back), forwarded at the flip {forwarded_at_flip}, \
         while NATS-only: forwarded {} spool depth {}, in Kafka {} records, duplicates removed \
         {dups}, spool max depth {}, NATS notifications {notifications}",
        acked.len(),
        held.forwarded,
        held.spool_depth,
        records.len(),
        stats.spool_max_depth,
    );
    ensure!(to_nats_only < Duration::from_secs(1) && back_to_dual < Duration::from_secs(1));
    ensure!(
        held.spool_depth >= 900,
        "NATS-only held the forwards: {held:?}"
    );
    ensure!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    ensure!(ids.len() == 3_000);
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn consume_reads_kafka_and_notifications_read_nats() -> Result<()> {
    let kafka = brokers::kafka_brokers();
    let spool = tempfile::tempdir()?;
    let subject = subject("read");
    let bus = builder(&brokers::nats_url(), &kafka, spool.path())
        .build()
        .await?;
    let mut notes = bus.notifications(&subject).await?;
    let mut sub = bus
        .consume(&subject, &format!("g-{}", uuid::Uuid::now_v7().simple()))
        .await?;
    let mut want = HashSet::new();
    for i in 0..20 {
        want.insert(
            bus.publish(&subject, keyed("r", i, 3))
                .await?
                .id()
                .to_owned(),
        );
    }
    let mut from_nats = HashSet::new();
    while from_nats.len() < 20 {
        let d = tokio::time::timeout(Duration::from_secs(10), notes.recv())
            .await?
            .context("notifications ended")??;
        from_nats.insert(d.event().id().to_owned());
        d.ack().await?;
    }
    let mut from_kafka = HashSet::new();
    while from_kafka.len() < 20 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await?
            .context("consume ended")??;
        from_kafka.insert(d.event().id().to_owned());
        d.ack().await?;
    }
    ensure!(from_nats == want && from_kafka == want);
    // A compensation replay from the beginning sees them again, in a fresh group.
    let mut replay = bus
        .replay(&subject, "audit", polybus_compose::ReplayFrom::Earliest)
        .await?;
    let mut replayed = HashSet::new();
    while replayed.len() < 20 {
        let d = tokio::time::timeout(Duration::from_secs(30), replay.recv())
            .await?
            .context("replay ended")??;
        replayed.insert(d.event().id().to_owned());
        d.ack().await?;
    }
    bus.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn the_nats_kv_dedup_store_is_shared_and_keeps_the_highest_version() -> Result<()> {
    use polybus_compose::{DedupStore, KvDedupStore};
    let js = JsOptions::new(brokers::nats_url()).connect().await?;
    let bucket = format!("dedup-{}", uuid::Uuid::now_v7().simple());
    let a = KvDedupStore::open(&js, &bucket, Duration::from_secs(60)).await?;
    let b = KvDedupStore::open(&js, &bucket, Duration::from_secs(60)).await?;
    let key = "billing/id:urn:polybus 0191-x.y";
    ensure!(a.get(key).await?.is_none());
    a.record(key, 2).await?;
    b.record(key, 1).await?; // older: kept at 2
    ensure!(
        b.get(key).await? == Some(2),
        "shared across store instances"
    );
    b.record(key, 5).await?;
    ensure!(a.get(key).await? == Some(5));
    // Two buses (two "processes") consuming one group share what was processed.
    let kafka = brokers::kafka_brokers();
    let subject = subject("kvdedup");
    let group = format!("g-{}", uuid::Uuid::now_v7().simple());
    let (s1, s2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let bus1 = builder(&brokers::nats_url(), &kafka, s1.path())
        .dedup_bucket(&bucket, Duration::from_secs(60))
        .build()
        .await?;
    let ev = Event::builder()
        .id(format!("once-{}", uuid::Uuid::now_v7().simple()))
        .build()?;
    bus1.publish(&subject, ev.clone()).await?;
    let mut sub = bus1.consume(&subject, &group).await?;
    let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await?
        .context("stream ended")??;
    ensure!(d.event().id() == ev.id());
    d.ack().await?;
    drop(sub);
    // A raw copy reaches Kafka; the second bus, same group and bucket, drops it.
    let topic = bus1.topic_map().kafka_topic(&subject)?;
    KafkaProducer::new_with_config(&kafka_config(&kafka))?
        .publish(&topic, ev.clone())
        .await?;
    let bus2 = builder(&brokers::nats_url(), &kafka, s2.path())
        .dedup_bucket(&bucket, Duration::from_secs(60))
        .build()
        .await?;
    // Same group, another process: the copy (and the original, if bus1's offset commit had
    // not landed) is recognised through the shared bucket and dropped.
    let mut sub2 = bus2.consume(&subject, &group).await?;
    let got = tokio::time::timeout(Duration::from_secs(8), sub2.recv()).await;
    ensure!(got.is_err(), "bus2 delivered a duplicate: {got:?}");
    let dropped = bus2.stats().consume_duplicates;
    println!("FIGURES kv-dedup: bus2 dropped {dropped} duplicate(s) through the shared bucket");
    ensure!(dropped >= 1);
    drop(sub2);
    bus1.close().await?;
    bus2.close().await?;
    Ok(())
}
