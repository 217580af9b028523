//! `KafkaConfig::with_start_time` on tansu: a group without committed offsets starts at the
//! first record at or after the time (ListOffsets by timestamp), also when no record is that
//! late (tansu 0.6.0 answers offset 0 then; the consumer skips what is earlier).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use polybus_core::{Consumer, Event};
use polybus_kafka::{KafkaAdmin, KafkaConsumer, KafkaProducer, KafkaStream};

use crate::common::{brokers, test_config, topic};

/// Publishes `"{prefix}-{i}"` for `i` in `0..n`, each with its own key (so across partitions).
async fn publish_n(p: &KafkaProducer, topic: &str, prefix: &str, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        let ev = Event::builder()
            .key(format!("k{i}"))
            .data(format!("{prefix}-{i}"))
            .build()?;
        p.publish(topic, ev).await?;
    }
    Ok(())
}

/// Reads one delivery within `within` into `seen` (acked); `false` if none came.
async fn read_one(
    s: &mut KafkaStream,
    seen: &mut BTreeSet<String>,
    within: Duration,
) -> anyhow::Result<bool> {
    match tokio::time::timeout(within, s.next()).await {
        Err(_) => Ok(false),
        Ok(None) => anyhow::bail!("the stream ended"),
        Ok(Some(d)) => {
            let d = d?;
            seen.insert(String::from_utf8_lossy(d.payload()).into_owned());
            d.ack().await?;
            Ok(true)
        }
    }
}

/// The payloads `s` delivers (acked) until `n` arrived, then whatever else comes within
/// `extra`; fails if `n` do not come within 30 s.
async fn read(s: &mut KafkaStream, n: usize, extra: Duration) -> anyhow::Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < n {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {seen:?} within 30 s, {n} expected"
        );
        read_one(s, &mut seen, Duration::from_secs(1)).await?;
    }
    while read_one(s, &mut seen, extra).await? {}
    Ok(seen)
}

fn names(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Three events, a pause, the start time, a pause, three more: a new group with that start
/// time reads exactly the later three from the three partitions, nothing earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn a_new_group_starts_at_the_first_record_after_the_start_time() -> anyhow::Result<()> {
    let t = topic("start-time");
    let cfg = test_config(&brokers(), &topic("start-time-g"));
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let p = KafkaProducer::new_with_config(&cfg)?;
    publish_n(&p, &t, "before", 3).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish_n(&p, &t, "after", 3).await?;

    let consumer = KafkaConsumer::new(&cfg.clone().with_start_time(Some(start)))?;
    let mut s = consumer.subscribe(&t);
    let seen = read(&mut s, 3, Duration::from_secs(2))
        .await
        .context("reading from the start time")?;
    ensure!(seen == names("after", 3), "read {seen:?}");

    // Without a start time the same topic gives all six (the group default is earliest).
    let all = KafkaConsumer::new(&cfg.with_group_id(topic("start-time-all")))?;
    let mut s = all.subscribe(&t);
    let seen = read(&mut s, 6, Duration::from_millis(500)).await?;
    ensure!(seen.len() == 6, "read {seen:?}");
    Ok(())
}

/// A start time after every record: nothing of the backlog, then what is published later.
/// tansu 0.6.0 answers such a lookup with offset 0 (kafka answers the end), so this passes
/// only because the consumer skips records before the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn a_start_time_after_every_record_reads_only_newer_ones() -> anyhow::Result<()> {
    let t = topic("start-late");
    let cfg = test_config(&brokers(), &topic("start-late-g"));
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let p = KafkaProducer::new_with_config(&cfg)?;
    publish_n(&p, &t, "old", 6).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = SystemTime::now();
    let consumer = KafkaConsumer::new(&cfg.with_start_time(Some(start)))?;
    let mut s = consumer.subscribe(&t);
    // Whenever the partitions are assigned, the start time is before these.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish_n(&p, &t, "new", 2).await?;
    let seen = read(&mut s, 2, Duration::from_secs(2)).await?;
    ensure!(seen == names("new", 2), "read {seen:?}");
    Ok(())
}
