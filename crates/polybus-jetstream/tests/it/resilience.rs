//! nats-server killed (SIGKILL) and restarted on the same store in the middle of a
//! 10,000-message JetStream run: every message the server acknowledged is consumed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use polybus_core::{Consumer, Event, Publisher};
use polybus_jetstream::{ConsumerSettings, JsOptions, StreamPolicy};
use polybus_testkit::brokers::BrokerProcess;
use tokio::sync::Mutex;

const TOTAL: usize = 10_000;

#[derive(Default)]
struct Figures {
    publish_attempts: AtomicUsize,
    publish_errors: AtomicUsize,
    duplicate_receipts: AtomicUsize,
    acked: Mutex<HashSet<String>>,
    deliveries: AtomicUsize,
    consumed: Mutex<HashMap<String, usize>>,
    stream_errors: AtomicUsize,
    ack_errors: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn broker_restart_mid_run_loses_no_acknowledged_message() -> anyhow::Result<()> {
    let mut server = BrokerProcess::nats("").await?;
    let url = server.url();
    let opts = JsOptions::new(&url)
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "R_".into(),
        })
        .publish_timeout(Duration::from_secs(1))
        .consumer_settings(ConsumerSettings::default().ack_wait(Duration::from_secs(5)));
    let topic = "resilience.events";
    let figures = Arc::new(Figures::default());
    let publishing_done = Arc::new(AtomicBool::new(false));

    // The consumer: one durable group member, acking each delivery.
    let consumer = opts.clone().group("resilience").consumer().await?;
    let consumer_task = {
        let figures = figures.clone();
        let done = publishing_done.clone();
        tokio::spawn(async move {
            let mut deliveries = std::pin::pin!(consumer.subscribe(topic));
            let deadline = Instant::now() + Duration::from_secs(180);
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(1), deliveries.next()).await {
                    Ok(Some(Ok(d))) => {
                        figures.deliveries.fetch_add(1, Ordering::Relaxed);
                        *figures
                            .consumed
                            .lock()
                            .await
                            .entry(d.event().id().to_owned())
                            .or_default() += 1;
                        if d.ack().await.is_err() {
                            figures.ack_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Err(_))) => {
                        figures.stream_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                if done.load(Ordering::Acquire) {
                    let acked = figures.acked.lock().await;
                    let consumed = figures.consumed.lock().await;
                    if acked.iter().all(|id| consumed.contains_key(id)) {
                        break;
                    }
                }
            }
        })
    };

    // The producer: 10,000 events with ids of their own; a failed publish is retried with
    // the same event (same Nats-Msg-Id), so a publish the server stored but whose ack was
    // lost is not stored twice.
    let producer = opts.clone().producer().await?;
    let producer_task = {
        let figures = figures.clone();
        let done = publishing_done.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                let ev = Event::builder()
                    .id(format!("evt-{i:05}"))
                    .data(format!("{i}"))
                    .build()
                    .expect("valid event");
                loop {
                    figures.publish_attempts.fetch_add(1, Ordering::Relaxed);
                    match producer.publish(topic, ev.clone()).await {
                        Ok(receipt) => {
                            if receipt.is_duplicate() {
                                figures.duplicate_receipts.fetch_add(1, Ordering::Relaxed);
                            }
                            figures.acked.lock().await.insert(ev.id().to_owned());
                            break;
                        }
                        Err(_) => {
                            figures.publish_errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            done.store(true, Ordering::Release);
        })
    };

    // Kill the server a third of the way in, keep it down for a second, restart it on the
    // same port and store.
    while figures.acked.lock().await.len() < TOTAL / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked_at_kill = figures.acked.lock().await.len();
    server.kill().await;
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start().await?;
    let outage = down.elapsed();

    producer_task.await?;
    consumer_task.await?;

    let acked = figures.acked.lock().await;
    let consumed = figures.consumed.lock().await;
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !consumed.contains_key(*id))
        .collect();
    let duplicates: usize = consumed.values().map(|n| n - 1).sum();
    println!(
        "jetstream restart run: published {TOTAL} events in {} attempts ({} failed attempts, \
         {} duplicate receipts), acked by the server {}, killed at {acked_at_kill} acked, \
         outage {outage:?}; consumed {} distinct in {} deliveries, duplicates {duplicates}, \
         lost {}, stream errors {}, ack errors {}",
        figures.publish_attempts.load(Ordering::Relaxed),
        figures.publish_errors.load(Ordering::Relaxed),
        figures.duplicate_receipts.load(Ordering::Relaxed),
        acked.len(),
        consumed.len(),
        figures.deliveries.load(Ordering::Relaxed),
        lost.len(),
        figures.stream_errors.load(Ordering::Relaxed),
        figures.ack_errors.load(Ordering::Relaxed),
    );
    assert_eq!(
        acked.len(),
        TOTAL,
        "every event was eventually acknowledged"
    );
    assert!(
        lost.is_empty(),
        "lost {} acknowledged events, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        consumed.keys().all(|id| acked.contains(id)),
        "consumed an event nobody published"
    );
    Ok(())
}
