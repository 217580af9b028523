//! `publish_batch` against single publishes with the same window (issue 16): JetStream and
//! Kafka. The polybus side publishes batches of `window` events one batch after the other
//! (`Publisher::publish_batch`: all sent, then the acknowledgements awaited); the raw side is
//! the same polybus publisher with single `publish` calls, `window` of them in flight (the
//! loop of the `js.publish` and `kafka.produce` workloads). Same payloads, same CloudEvents
//! envelope, same brokers: the ratio is what the batch path saves.

use std::time::Instant;

use anyhow::{Result, anyhow};
use polybus_core::{Event, Publisher};
use polybus_jetstream::JsOptions;
use polybus_kafka::{KafkaAdmin, KafkaConfig, KafkaProducer};

use super::jetstream::fresh_stream;
use super::{Env, payload, windowed};
use crate::child::{ChildArgs, Outcome};
use crate::hist::Latency;
use crate::meter::Meter;
use crate::spec::Side;

/// Publishes N events through `p`: in batches of `window` (polybus side) or one at a time
/// with `window` in flight (raw side).
async fn run<P: Publisher>(
    p: &P,
    topic: &str,
    a: &ChildArgs,
    meter: &Meter,
) -> Result<std::time::Duration> {
    let data = payload(a.size);
    let window = a.window.max(1) as u64;
    let t0 = Instant::now();
    if a.side == Side::Polybus {
        let mut sent = 0;
        while sent < a.messages {
            let k = window.min(a.messages - sent);
            let events = (0..k).map(|_| Event::new(data.clone())).collect();
            let receipts = p.publish_batch(topic, events).await?;
            if receipts.len() as u64 != k {
                return Err(anyhow!("{} receipts for {k} events", receipts.len()));
            }
            meter.add(k);
            sent += k;
        }
    } else {
        let mut latency = Latency::new();
        windowed(a.messages, a.window, meter, &mut latency, |_| {
            let ev = Event::new(data.clone());
            async move {
                p.publish(topic, ev).await?;
                Ok(())
            }
        })
        .await?;
    }
    Ok(t0.elapsed())
}

/// JetStream, into a fresh file-storage stream the harness makes (deleted afterwards).
pub(crate) async fn jetstream(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let (stream, subject) = (
        format!("BENCH_BATCH_{}", a.tag),
        format!("bench.batch.{}", a.tag),
    );
    let admin = fresh_stream(env, &stream, &subject).await?;
    let js = JsOptions::new(env.nats_url.as_str()).connect().await?;
    let p = js.producer();
    let elapsed = run(&p, &subject, a, meter).await;
    p.close().await?;
    let _ = admin.delete_stream(&stream).await;
    Ok(outcome(a.messages, elapsed?))
}

/// Kafka, into a fresh topic of 3 partitions (deleted afterwards); one unmeasured publish
/// first (metadata, connections, the topic check).
pub(crate) async fn kafka(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let topic = format!("bench.batch.{}", a.tag);
    let cfg = KafkaConfig::new(env.kafka_brokers.as_str(), format!("bench-{}", a.tag));
    let admin = KafkaAdmin::new(&cfg)?;
    let _ = admin.delete_topic(&topic).await;
    admin
        .create_topic(&topic, super::kafka::PARTITIONS, 1)
        .await?;
    let p = KafkaProducer::new_with_config(&cfg)?;
    Publisher::publish(&p, &topic, Event::new(payload(a.size))).await?;
    let elapsed = run(&p, &topic, a, meter).await;
    p.close().await?;
    let _ = admin.delete_topic(&topic).await;
    Ok(outcome(a.messages, elapsed?))
}

fn outcome(count: u64, elapsed: std::time::Duration) -> Outcome {
    Outcome {
        count,
        elapsed,
        latency: None,
        notes: Vec::new(),
    }
}
