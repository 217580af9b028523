//! The composed bus when its NATS side fails: a nats-server of the test's own (JetStream,
//! file storage) is SIGKILLed under `Bus::publish` load and started again, and JetStream
//! publishes fail after the spool write succeeded. Kafka is the shared tansu.
//!
//! What the crate docs promise and these tests check: `publish` acknowledges only when the
//! JetStream receipt and the spool commit are both in; when the JetStream publish fails the
//! caller gets that typed error, the spool commit is not undone (the event still reaches
//! Kafka), and publishing the same event again is safe (forwarded once). Each test prints a
//! `FIGURES` line.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use polybus_compose::Switches;
use polybus_core::{ErrorKind, Event};
use polybus_jetstream::{JsOptions, StreamPolicy, StreamSettings, per_topic_stream_name};
use polybus_testkit::brokers::{self, BrokerProcess};

use crate::brokers::{builder, dedup, order_violations, read_kafka, subject};
use crate::support::keyed;

/// The outcome of one `Bus::publish` call.
struct Attempt {
    i: usize,
    started: Instant,
    ended: Instant,
    /// `Ok(duplicate)` when acknowledged, else the error kind.
    outcome: std::result::Result<bool, ErrorKind>,
}

/// How many messages the JetStream stream `stream` (covering `subject`) holds.
async fn stream_messages(url: &str, stream: &str, subject: &str) -> Result<u64> {
    let js = JsOptions::new(url).connect().await?;
    // Binds to the existing stream (its configuration is kept) and returns fresh information.
    let info = js
        .ensure_stream(stream, &[subject], &StreamSettings::default())
        .await?;
    Ok(info.state.messages)
}

/// Proves: with a nats-server SIGKILLed for 3 s under 16 publishing tasks (3,000 keyed events)
/// and started again on the same port and store, every publish either acknowledges or fails
/// with a typed `Timeout`/`Connect` error, and only while NATS is down; every acknowledged
/// event is in Kafka (none lost); every failed one was spooled and reaches Kafka anyway (as
/// the docs of `Bus::publish` say); the caller's retry of the failed events with the same
/// `Event` acknowledges and adds no copy to Kafka (forwarded-keys dedup) nor to JetStream
/// (`Nats-Msg-Id`); per-key order holds in Kafka.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn nats_server_killed_under_publish_load_loses_and_duplicates_nothing() -> Result<()> {
    const EVENTS: usize = 3_000;
    const TASKS: usize = 16;
    const KEYS: usize = 64;
    const KILL_AFTER: usize = 1_000;
    const DOWN: Duration = Duration::from_secs(3);
    const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

    let mut nats = BrokerProcess::nats("").await?;
    let url = nats.url();
    let kafka = brokers::kafka_brokers();
    let spool = tempfile::tempdir()?;
    let subject = subject("natsdown");
    let bus = builder(&url, &kafka, spool.path())
        .nats_options(
            JsOptions::new(&url)
                .stream_policy(StreamPolicy::PerTopic {
                    prefix: "POLYBUS_".into(),
                })
                .publish_timeout(PUBLISH_TIMEOUT),
        )
        .build()
        .await?;
    let topic = bus.topic_map().kafka_topic(&subject)?;
    let events: Arc<Vec<Event>> = Arc::new((0..EVENTS).map(|i| keyed("ev", i, KEYS)).collect());

    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (bus, subject, events, done) =
            (bus.clone(), subject.clone(), events.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            // Task t publishes i = t, t + TASKS, ...: each key's events come from one task in
            // increasing order, so per-key order is defined.
            let mut attempts = Vec::new();
            for i in (t..EVENTS).step_by(TASKS) {
                let started = Instant::now();
                let r = bus.publish(&subject, events[i].clone()).await;
                attempts.push(Attempt {
                    i,
                    started,
                    ended: Instant::now(),
                    outcome: r.map(|r| r.is_duplicate()).map_err(|e| e.kind()),
                });
                done.fetch_add(1, Ordering::Relaxed);
            }
            attempts
        }));
    }
    while done.load(Ordering::Relaxed) < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = Instant::now();
    nats.kill().await;
    let done_at_kill = done.load(Ordering::Relaxed);
    tokio::time::sleep(DOWN).await;
    nats.start().await?;
    let restarted_at = Instant::now();
    let mut attempts = Vec::new();
    for t in tasks {
        attempts.extend(t.await?);
    }
    ensure!(attempts.len() == EVENTS, "{} attempts", attempts.len());

    let acked: HashSet<String> = attempts
        .iter()
        .filter(|a| a.outcome.is_ok())
        .map(|a| events[a.i].id().to_owned())
        .collect();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for a in &failed {
        if let Err(k) = a.outcome {
            *by_kind.entry(format!("{k:?}")).or_default() += 1;
        }
    }
    let longest_stall = attempts
        .iter()
        .map(|a| a.ended - a.started)
        .max()
        .unwrap_or_default();
    let recovered_at = attempts
        .iter()
        .filter(|a| a.outcome.is_ok() && a.ended > restarted_at)
        .map(|a| a.ended)
        .min()
        .context("no publish acknowledged after the restart")?;
    let recovery = recovered_at - restarted_at;
    // An error belongs to the outage: its call ended after the kill and began before NATS
    // acknowledged again.
    let outside: Vec<usize> = failed
        .iter()
        .filter(|a| a.ended < killed_at || a.started > recovered_at)
        .map(|a| a.i)
        .collect();
    let acked_during_outage = attempts
        .iter()
        .filter(|a| a.outcome.is_ok() && a.started > killed_at && a.ended < restarted_at)
        .count();

    // Before any retry: the acknowledged events and the failed ones (spooled) reach Kafka.
    ensure!(
        bus.wait_forwarded(Duration::from_secs(120)).await,
        "spool not drained: {:?}",
        bus.stats()
    );
    let all: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let records = read_kafka(&kafka, &topic, &all, Duration::from_secs(30)).await?;
    let (unique, dups_before_retry) = dedup(&records);
    let in_kafka: HashSet<String> = unique.iter().map(|e| e.id().to_owned()).collect();
    let lost: Vec<&String> = acked.difference(&in_kafka).collect();
    let failed_ids: HashSet<String> = failed.iter().map(|a| events[a.i].id().to_owned()).collect();
    let failed_missing: Vec<&String> = failed_ids.difference(&in_kafka).collect();

    // The caller retries each failed event once, with the same Event: NATS is back.
    let mut retry_errors = Vec::new();
    let mut retry_js_duplicates = 0;
    for a in &failed {
        match bus.publish(&subject, events[a.i].clone()).await {
            Ok(r) => retry_js_duplicates += usize::from(r.is_duplicate()),
            Err(e) => retry_errors.push(format!("{}: {e}", events[a.i].id())),
        }
    }
    ensure!(
        bus.wait_forwarded(Duration::from_secs(60)).await,
        "spool not drained after the retries: {:?}",
        bus.stats()
    );
    let stats = bus.stats();
    bus.close().await?;
    let records_after = read_kafka(&kafka, &topic, &all, Duration::from_secs(30)).await?;
    let (unique_after, dups) = dedup(&records_after);
    let ids_after: HashSet<String> = unique_after.iter().map(|e| e.id().to_owned()).collect();
    let violations = order_violations(&unique_after);
    let js_messages =
        stream_messages(&url, &per_topic_stream_name("POLYBUS_", &subject), &subject).await?;

    println!(
        "FIGURES nats-kill: sent {EVENTS}, acknowledged {}, errors {} by kind {by_kind:?}, \
         lost {}, failed but in Kafka anyway {}, duplicates in Kafka {dups_before_retry} before \
         and {dups} after the caller's retry of the failed ({} retried, JetStream said duplicate \
         to {retry_js_duplicates}, forwards skipped as already in Kafka {}), longest publish \
         stall {longest_stall:?}, time to recover after restart {recovery:?}, done at kill \
         {done_at_kill}, acknowledged while down {acked_during_outage}, JetStream messages \
         {js_messages}, Kafka records {}, per-key order violations {violations}, spool max \
         depth {}",
        acked.len(),
        failed.len(),
        lost.len(),
        failed_ids.len() - failed_missing.len(),
        failed.len(),
        stats.forward_duplicates,
        records_after.len(),
        stats.spool_max_depth,
    );
    ensure!(lost.is_empty(), "acknowledged but not in Kafka: {lost:?}");
    ensure!(
        !failed.is_empty(),
        "a 3 s outage with a 1 s publish timeout failed no publish"
    );
    let untyped: Vec<&String> = by_kind
        .keys()
        .filter(|k| !matches!(k.as_str(), "Timeout" | "Connect"))
        .collect();
    ensure!(
        untyped.is_empty(),
        "errors other than Timeout/Connect: {by_kind:?}"
    );
    ensure!(outside.is_empty(), "errors outside the outage: {outside:?}");
    ensure!(
        longest_stall < DOWN + PUBLISH_TIMEOUT + Duration::from_secs(5),
        "a publish stalled {longest_stall:?}"
    );
    ensure!(
        failed_missing.is_empty(),
        "failed publishes were spooled and must reach Kafka: {} missing",
        failed_missing.len()
    );
    ensure!(
        dups_before_retry == 0,
        "{dups_before_retry} copies in Kafka"
    );
    ensure!(retry_errors.is_empty(), "retries failed: {retry_errors:?}");
    ensure!(
        ids_after == all,
        "Kafka holds {} of {EVENTS}",
        ids_after.len()
    );
    ensure!(dups == 0, "{dups} copies in Kafka after the retries");
    ensure!(
        stats.forward_duplicates == failed.len() as u64,
        "each retried event was skipped as forwarded: {stats:?}"
    );
    ensure!(violations == 0, "{violations} per-key order violations");
    ensure!(
        js_messages == EVENTS as u64,
        "JetStream holds {js_messages} messages for {EVENTS} events"
    );
    ensure!(stats.dead_letters == 0, "{stats:?}");
    Ok(())
}

/// Proves, deterministically, what happens when the JetStream publish fails after the spool
/// write succeeded (forwarding paused, so the spooled entry can be seen):
///
/// * no stream covers the subject (`StreamPolicy::Existing`): the call fails at once with
///   `NotFound`, the event is in the spool;
/// * nats-server is killed: the call fails with `Timeout` (or `Connect`) within the publish
///   timeout, the event is in the spool.
///
/// Then the caller publishes both events again (the stream exists, the server is back): both
/// acknowledge, and once forwarding resumes each event is in Kafka exactly once (the spooled
/// second copies are skipped as forwarded) and in JetStream exactly once.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn a_jetstream_publish_failing_after_the_spool_write_is_a_typed_error_and_forwarded_once()
-> Result<()> {
    const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
    let mut nats = BrokerProcess::nats("").await?;
    let url = nats.url();
    let kafka = brokers::kafka_brokers();
    let spool = tempfile::tempdir()?;
    let subject = subject("jsfail");
    let bus = builder(&url, &kafka, spool.path())
        .nats_options(
            JsOptions::new(&url)
                .stream_policy(StreamPolicy::Existing)
                .publish_timeout(PUBLISH_TIMEOUT),
        )
        .build()
        .await?;
    bus.switches()
        .set(Switches::default().with_pause_forwarding(true));
    let topic = bus.topic_map().kafka_topic(&subject)?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let uncovered = Event::builder()
        .id(format!("uncovered-{run}"))
        .key("k")
        .data("no stream")
        .build()?;
    let killed = Event::builder()
        .id(format!("killed-{run}"))
        .key("k")
        .data("server down")
        .build()?;

    // 1. No stream covers the subject.
    let t = Instant::now();
    let e = bus
        .publish(&subject, uncovered.clone())
        .await
        .err()
        .context("a publish to a subject no stream covers was acknowledged")?;
    let (uncovered_kind, uncovered_took) = (e.kind(), t.elapsed());
    let depth_after_uncovered = bus.spool_depth();
    println!("uncovered subject: {e} after {uncovered_took:?}");

    let stream = format!("JSFAIL_{run}");
    let js = JsOptions::new(&url).connect().await?;
    js.ensure_stream(&stream, &[subject.as_str()], &StreamSettings::default())
        .await?;

    // 2. The server is down.
    nats.kill().await;
    let t = Instant::now();
    let e = bus
        .publish(&subject, killed.clone())
        .await
        .err()
        .context("a publish with nats-server killed was acknowledged")?;
    let (killed_kind, killed_took) = (e.kind(), t.elapsed());
    let depth_after_killed = bus.spool_depth();
    println!("server killed: {e} after {killed_took:?}");
    nats.start().await?;

    // The caller publishes both again.
    let t = Instant::now();
    let again_uncovered = bus.publish(&subject, uncovered.clone()).await?;
    let again_killed = bus.publish(&subject, killed.clone()).await?;
    let retried_in = t.elapsed();
    let depth_before_forwarding = bus.spool_depth();
    bus.switches().set(Switches::default());
    ensure!(
        bus.wait_forwarded(Duration::from_secs(60)).await,
        "spool not drained: {:?}",
        bus.stats()
    );
    let stats = bus.stats();
    bus.close().await?;

    let want: HashSet<String> = [uncovered.id().to_owned(), killed.id().to_owned()].into();
    let records = read_kafka(&kafka, &topic, &want, Duration::from_secs(20)).await?;
    let copies = |id: &str| records.iter().filter(|e| e.id() == id).count();
    let (uncovered_copies, killed_copies) = (copies(uncovered.id()), copies(killed.id()));
    let js_messages = stream_messages(&url, &stream, &subject).await?;

    println!(
        "FIGURES js-fail-after-spool: uncovered subject -> {uncovered_kind:?} after \
         {uncovered_took:?}, spool depth {depth_after_uncovered}; server killed -> \
         {killed_kind:?} after {killed_took:?}, spool depth {depth_after_killed}; both \
         published again in {retried_in:?} (JetStream duplicate: {}, {}), spool depth \
         {depth_before_forwarding}; Kafka copies {uncovered_copies} and {killed_copies}, \
         forwarded {}, forwards skipped as already in Kafka {}, JetStream messages \
         {js_messages}",
        again_uncovered.is_duplicate(),
        again_killed.is_duplicate(),
        stats.forwarded,
        stats.forward_duplicates,
    );
    ensure!(uncovered_kind == ErrorKind::NotFound, "{uncovered_kind:?}");
    ensure!(
        uncovered_took < Duration::from_secs(2),
        "NotFound took {uncovered_took:?}"
    );
    ensure!(
        depth_after_uncovered == 1,
        "the failed publish was spooled (depth {depth_after_uncovered})"
    );
    ensure!(
        matches!(killed_kind, ErrorKind::Timeout | ErrorKind::Connect),
        "{killed_kind:?}"
    );
    ensure!(
        killed_took < PUBLISH_TIMEOUT + Duration::from_secs(2),
        "the caller waited {killed_took:?}"
    );
    ensure!(
        depth_after_killed == 2,
        "the failed publish was spooled (depth {depth_after_killed})"
    );
    ensure!(
        depth_before_forwarding == 4,
        "both copies spooled ({depth_before_forwarding})"
    );
    ensure!(
        uncovered_copies == 1 && killed_copies == 1,
        "Kafka copies {uncovered_copies} and {killed_copies}"
    );
    ensure!(records.len() == 2, "{} Kafka records", records.len());
    ensure!(
        stats.forwarded == 2 && stats.forward_duplicates == 2,
        "{stats:?}"
    );
    ensure!(js_messages == 2, "JetStream holds {js_messages} messages");
    Ok(())
}
