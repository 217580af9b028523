//! The composed bus against the raw Kafka producer (the reference the design sets: the bus
//! should keep >= 0.8 x its throughput while acknowledging at NATS speed).
//!
//! polybus: `Bus::publish` with `window` in flight (JetStream publish, then the spool commit,
//! then the ack; forwarders write to Kafka in the background), timed until the last ack AND
//! the spool is empty again (everything is in Kafka), so the figure is sustained throughput,
//! not what the spool can absorb. raw: rdkafka `FutureProducer` with the same window, payload
//! and CloudEvents headers, timed until the last delivery report.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use polybus_compose::Bus;
use polybus_core::Event;
use polybus_kafka::{KafkaAdmin, KafkaConfig};
use rdkafka::producer::FutureProducer;

use super::kafka::{raw_headers, send_raw};
use super::{Env, RawCloudEvent, payload, windowed};
use crate::child::{ChildArgs, Outcome};
use crate::hist::Latency;
use crate::meter::Meter;
use crate::spec::Side;

pub(crate) async fn publish(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let data = payload(a.size);
    let mut latency = Latency::new();
    let mut notes = Vec::new();
    let cfg = KafkaConfig::new(env.kafka_brokers.as_str(), format!("bench-{}", a.tag));
    let admin = KafkaAdmin::new(&cfg)?;
    let elapsed = match a.side {
        Side::Polybus => {
            let subject = format!("bench.compose.{}", a.tag);
            let spool = std::env::temp_dir().join(format!("polybus-bench-spool-{}", a.tag));
            let _ = std::fs::remove_dir_all(&spool);
            let bus = Bus::builder()
                .nats(env.nats_url.as_str())
                .kafka(env.kafka_brokers.as_str())
                .spool_dir(&spool)
                .build()
                .await
                .context("building the bus")?;
            // One unmeasured publish: stream, topic and connections are set up here.
            bus.publish(&subject, Event::new(data.clone())).await?;
            if !bus.wait_forwarded(Duration::from_secs(30)).await {
                bail!("the warm-up event was not forwarded to Kafka within 30 s");
            }
            let t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                let (bus, subject, ev) = (&bus, subject.as_str(), Event::new(data.clone()));
                async move {
                    bus.publish(subject, ev).await?;
                    Ok(())
                }
            })
            .await?;
            let acked = t0.elapsed();
            if !bus.wait_forwarded(Duration::from_secs(120)).await {
                notes.push(format!(
                    "{} events still in the spool 120 s after the last ack",
                    bus.spool_depth()
                ));
            }
            let elapsed = t0.elapsed();
            notes.push(format!(
                "all acked after {:.2} s, all in Kafka after {:.2} s",
                acked.as_secs_f64(),
                elapsed.as_secs_f64()
            ));
            bus.close().await?;
            // Clean up what the run made: the stream, the Kafka topic, the spool.
            let topic = polybus_compose::TopicMap::new().kafka_topic(&subject)?;
            let _ = admin.delete_topic(&topic).await;
            let client = async_nats::connect(env.nats_url.as_str()).await?;
            let js = async_nats::jetstream::new(client);
            if let Ok(stream) = js.stream_by_subject(subject.as_str()).await {
                let _ = js.delete_stream(&stream).await;
            }
            let _ = std::fs::remove_dir_all(&spool);
            elapsed
        }
        _ => {
            let topic = format!("bench.compose.raw.{}", a.tag);
            let _ = admin.delete_topic(&topic).await;
            admin
                .create_topic(&topic, super::kafka::PARTITIONS, 1)
                .await?;
            let producer: FutureProducer = cfg.producer_client_config().create()?;
            let ce = RawCloudEvent::new();
            send_raw(&producer, &topic, data.clone(), raw_headers(&ce)).await?;
            let t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                send_raw(&producer, &topic, data.clone(), raw_headers(&ce))
            })
            .await?;
            let elapsed = t0.elapsed();
            let _ = admin.delete_topic(&topic).await;
            elapsed
        }
    };
    Ok(Outcome {
        notes,
        ..Outcome::timed(latency, elapsed)
    })
}
