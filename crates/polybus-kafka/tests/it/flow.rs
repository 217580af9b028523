//! Flow control on tansu: a subscription keeps at most `max_in_flight` deliveries unsettled
//! (nacked ones waiting for redelivery included) and reads nothing more until one is settled;
//! a handler that nacks everything keeps the process's memory flat.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use polybus_core::{Consumer, Delivery, Event};
use polybus_kafka::{KafkaAdmin, KafkaConsumer, KafkaProducer, KafkaStream};

use crate::common::{brokers, test_config, topic};

/// The next delivery within `secs`, or an error saying what was awaited.
async fn next_within(s: &mut KafkaStream, secs: u64, what: &str) -> anyhow::Result<Delivery> {
    let item = tokio::time::timeout(Duration::from_secs(secs), s.next())
        .await
        .with_context(|| format!("no {what} within {secs} s"))?
        .context("the stream ended")?;
    Ok(item?)
}

/// Publishes `n` events with payloads `"{prefix}-{i}"` to `topic`.
async fn publish_n(p: &KafkaProducer, topic: &str, prefix: &str, n: usize) -> anyhow::Result<()> {
    let sends = (0..n).map(|i| p.publish(topic, Event::new(format!("{prefix}-{i}"))));
    for r in futures_util::future::join_all(sends).await {
        r?;
    }
    Ok(())
}

fn payload(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

/// With `max_in_flight = 8`, eight unsettled deliveries stop the subscription: no 9th comes
/// within 3 s although 12 records are there (fetches answer within 50 ms here). A nack or a
/// drop hands a delivery back and gets *that* record again, not a new one (it is still
/// unsettled). One ack lets the 9th record in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn max_in_flight_holds_back_the_next_record_until_one_is_settled() -> anyhow::Result<()> {
    const MAX: usize = 8;
    let group = topic("flow-g");
    let cfg = test_config(&brokers(), &group).with_max_in_flight(MAX);
    let t = topic("flow-limit");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let p = KafkaProducer::new_with_config(&cfg)?;
    publish_n(&p, &t, "r", 12).await?;

    let consumer = KafkaConsumer::new(&cfg)?;
    let mut s = consumer.subscribe(&t);
    let mut held = Vec::new();
    for i in 0..MAX {
        held.push(next_within(&mut s, 30, &format!("delivery {i}")).await?);
    }
    let mut seen: HashSet<String> = held.iter().map(payload).collect();
    ensure!(
        seen.len() == MAX,
        "duplicates among the first {MAX}: {seen:?}"
    );

    let waited = Instant::now();
    let ninth = tokio::time::timeout(Duration::from_secs(3), s.next()).await;
    ensure!(
        ninth.is_err(),
        "a 9th delivery came with {MAX} unsettled: {:?}",
        ninth.ok().flatten().map(|r| r.map(|d| payload(&d)))
    );
    eprintln!(
        "no 9th delivery within {:?} with {MAX} unsettled",
        waited.elapsed()
    );

    // A nacked delivery is still unsettled: what comes next is that record again.
    let nacked = held.pop().context("held is empty")?;
    let nacked_payload = payload(&nacked);
    nacked.nack(Duration::ZERO).await?;
    let again = next_within(&mut s, 10, "the nacked record again").await?;
    ensure!(payload(&again) == nacked_payload && again.delivery_count() == 2);
    // So is a dropped one.
    let dropped_payload = payload(&again);
    drop(again);
    let again = next_within(&mut s, 10, "the dropped record again").await?;
    ensure!(payload(&again) == dropped_payload && again.delivery_count() == 3);
    held.push(again);
    let still = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
    ensure!(
        still.is_err(),
        "a new record came in after a nack and a drop with {MAX} unsettled"
    );

    // One ack makes room for exactly one more record.
    held.remove(0).ack().await?;
    let ninth = next_within(&mut s, 30, "the 9th record after an ack").await?;
    ensure!(
        seen.insert(payload(&ninth)),
        "the 9th delivery {} is not a new record",
        payload(&ninth)
    );
    ensure!(ninth.delivery_count() == 1);
    held.push(ninth);
    let tenth = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
    ensure!(tenth.is_err(), "a 10th delivery came after a single ack");

    // Settling the rest lets the remaining records through.
    for d in held.drain(..) {
        d.ack().await?;
    }
    for i in seen.len()..12 {
        let d = next_within(&mut s, 30, &format!("record {i}")).await?;
        ensure!(seen.insert(payload(&d)), "{} came twice", payload(&d));
        d.ack().await?;
    }
    ensure!(seen.len() == 12);
    Ok(())
}

/// The resident set size of this process in bytes (`/proc/self/statm`, second field, in
/// pages; the page size from the auxiliary vector, `AT_PAGESZ`).
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has no resident field")?
        .parse()?;
    let auxv = std::fs::read("/proc/self/auxv")?;
    let page = auxv
        .chunks_exact(16)
        .map(|c| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
            (word(&c[..8]), word(&c[8..]))
        })
        .find(|&(key, _)| key == 6) // AT_PAGESZ
        .map_or(4096, |(_, v)| v);
    Ok(pages * page)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A handler that nacks everything (`nack(Duration::ZERO)`) on 1,000 records, 1,000 times each:
/// 1,000,000 nack cycles with all 1,000 records unsettled at once (`max_in_flight = 1000`, the
/// redelivery queue full). The process's resident memory after the first round, halfway and at
/// the end stays flat (growth under 32 MiB). Every round delivers each record once, with its
/// delivery count going up by one. Prints a `FIGURES` line. nextest runs it in a process of
/// its own, so the RSS is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn nack_everything_keeps_memory_flat() -> anyhow::Result<()> {
    const RECORDS: usize = 1000;
    const ROUNDS: u32 = 1000;
    let group = topic("flow-nack-g");
    let cfg = test_config(&brokers(), &group).with_max_in_flight(RECORDS);
    let t = topic("flow-nack");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let p = KafkaProducer::new_with_config(&cfg)?;
    publish_n(&p, &t, "n", RECORDS).await?;

    let consumer = KafkaConsumer::new(&cfg)?;
    let mut s = consumer.subscribe(&t);
    let started = Instant::now();
    let rss_before = rss_bytes()?;
    let (mut rss_start, mut rss_middle) = (0, 0);
    let mut cycles: u64 = 0;
    let mut batch = Vec::with_capacity(RECORDS);
    for round in 1..=ROUNDS {
        let mut payloads = HashSet::with_capacity(RECORDS);
        for _ in 0..RECORDS {
            let d = next_within(&mut s, 30, &format!("a delivery of round {round}")).await?;
            ensure!(
                d.delivery_count() == round,
                "round {round} delivered {} with count {}",
                payload(&d),
                d.delivery_count()
            );
            ensure!(
                payloads.insert(payload(&d)),
                "{} twice in round {round}",
                payload(&d)
            );
            batch.push(d);
        }
        for d in batch.drain(..) {
            d.nack(Duration::ZERO).await?;
            cycles += 1;
        }
        match round {
            1 => rss_start = rss_bytes()?,
            r if r == ROUNDS / 2 => rss_middle = rss_bytes()?,
            _ => {}
        }
    }
    let rss_end = rss_bytes()?;
    let elapsed = started.elapsed();
    println!(
        "FIGURES kafka nack-everything: records={RECORDS}, cycles={cycles}, in_flight={RECORDS}, \
         rss_before={:.1} MiB, rss_start={:.1} MiB, rss_middle={:.1} MiB, rss_end={:.1} MiB, \
         growth={:.1} MiB, elapsed={:.1} s ({:.0} cycles/s)",
        mib(rss_before),
        mib(rss_start),
        mib(rss_middle),
        mib(rss_end),
        mib(rss_end.saturating_sub(rss_start)),
        elapsed.as_secs_f64(),
        cycles as f64 / elapsed.as_secs_f64()
    );
    ensure!(cycles == u64::from(ROUNDS) * RECORDS as u64);
    ensure!(
        rss_end.saturating_sub(rss_start) < 32 << 20,
        "memory grew by {:.1} MiB over {cycles} nack cycles",
        mib(rss_end.saturating_sub(rss_start))
    );
    Ok(())
}
