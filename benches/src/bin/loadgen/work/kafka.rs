//! Kafka: produce with `window` records awaiting their delivery report, into a fresh topic of
//! 3 partitions (polybus' default), then consume that topic in a fresh group, acking each
//! record (polybus: `Delivery::ack`; raw: `store_offset_from_message`, both committed in the
//! background every second). Both sides use the same librdkafka configuration: the raw one
//! is `KafkaConfig::producer_client_config()` / `consumer_client_config()`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use polybus_core::cloudevents::WireFormat;
use polybus_core::{Event, Publisher};
use polybus_kafka::{KafkaAdmin, KafkaConfig, KafkaConsumer, KafkaProducer};
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::{Env, RawCloudEvent, consume_deliveries, consume_n, payload, windowed};
use crate::child::{ChildArgs, Outcome};
use crate::hist::Latency;
use crate::meter::Meter;
use crate::spec::Side;

pub(crate) const PARTITIONS: i32 = 3;

fn topic(tag: &str) -> String {
    format!("bench.kafka.{tag}")
}

fn config(env: &Env, group: &str) -> KafkaConfig {
    KafkaConfig::new(env.kafka_brokers.as_str(), group).with_auto_offset_reset("earliest")
}

/// The CloudEvents Kafka binding headers a raw producer writes: what polybus writes for an
/// event without key, content type or headers. No `traceparent`: polybus writes one only when
/// there is a trace to continue (`TracePolicy::Continue`, its default), and here there is none.
pub(crate) fn raw_headers(ce: &RawCloudEvent) -> OwnedHeaders {
    fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
        Header {
            key,
            value: Some(value),
        }
    }
    let (id, time) = (RawCloudEvent::id(), RawCloudEvent::time());
    OwnedHeaders::new_with_capacity(5)
        .insert(h("ce_specversion", "1.0"))
        .insert(h("ce_id", &id))
        .insert(h("ce_source", ce.source))
        .insert(h("ce_type", ce.kind))
        .insert(h("ce_time", &time))
}

/// Sends one record as the raw side does (payload and headers, no key) and awaits its
/// delivery report.
pub(crate) async fn send_raw(
    producer: &FutureProducer,
    topic: &str,
    data: Bytes,
    headers: OwnedHeaders,
) -> Result<()> {
    let record = FutureRecord::<[u8], [u8]>::to(topic)
        .payload(&data[..])
        .headers(headers);
    producer
        .send(record, Timeout::Never)
        .await
        .map_err(|(e, _)| anyhow!("produce: {e}"))?;
    Ok(())
}

/// Sends one record with the payload alone (no key, no header), as polybus' lean wire format
/// writes an event without key, content type or headers, and awaits its delivery report.
async fn send_bare(producer: &FutureProducer, topic: &str, data: &Bytes) -> Result<()> {
    let record = FutureRecord::<[u8], [u8]>::to(topic).payload(&data[..]);
    producer
        .send(record, Timeout::Never)
        .await
        .map_err(|(e, _)| anyhow!("produce: {e}"))?;
    Ok(())
}

/// Connects RustStream's Kafka broker outside an app (its documented one-off use).
///
/// Its producer is made idempotent, as polybus' default producer and the `raw` and `bare`
/// sides (`KafkaConfig::producer_client_config`) are: RustStream leaves librdkafka's default
/// (`enable.idempotence=false`), which allows up to a million requests in flight per
/// connection, so unchanged it would measure a producer without polybus' ordering and
/// no-duplicate guarantee (and with more in flight per partition than polybus' 5).
async fn rs_connect(env: &Env) -> Result<ruststream_rdkafka::ConnectedKafkaBroker> {
    use ruststream::Broker as _;
    Ok(
        ruststream_rdkafka::KafkaBroker::new([env.kafka_brokers.as_str()])
            .producer_config("enable.idempotence", "true")
            .connect()
            .await?,
    )
}

/// One RustStream publish awaiting its delivery report.
async fn rs_publish(
    p: &ruststream_rdkafka::KafkaPublisher,
    topic: &str,
    data: &Bytes,
) -> Result<()> {
    // Its Kafka publisher borrows the payload (librdkafka copies it when enqueueing).
    let msg = ruststream::OutgoingMessage::with_payload(topic, &data[..]);
    ruststream::Publisher::publish(p, msg, None).await?;
    Ok(())
}

/// Produces N records with `window` awaiting their delivery report at once.
pub(crate) async fn produce(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let topic = topic(&a.tag);
    let cfg = config(env, &format!("bench-{}", a.tag));
    let admin = KafkaAdmin::new(&cfg)?;
    let _ = admin.delete_topic(&topic).await;
    admin.create_topic(&topic, PARTITIONS, 1).await?;

    let data = payload(a.size);
    let mut latency = Latency::new();
    let t0;
    match a.side {
        Side::Polybus | Side::Lean => {
            let cfg = if a.side == Side::Lean {
                cfg.clone().with_wire_format(WireFormat::Lean)
            } else {
                cfg.clone()
            };
            let p = KafkaProducer::new_with_config(&cfg)?;
            // One record before timing, on both sides: metadata, connections and (for polybus)
            // the topic check happen here, not in the measured window.
            Publisher::publish(&p, &topic, Event::new(data.clone())).await?;
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                let ev = Event::new(data.clone());
                let (p, topic) = (&p, topic.as_str());
                async move {
                    // The trait method, as every user of the generic API calls it.
                    Publisher::publish(p, topic, ev).await?;
                    Ok(())
                }
            })
            .await?;
            p.close().await?;
        }
        Side::RustStream => {
            // RustStream's Kafka publisher through its transport API (payload only), as the
            // NATS workloads use ruststream-nats.
            let broker = rs_connect(env).await?;
            let p = broker.publisher(ruststream_rdkafka::KafkaPublish::default());
            rs_publish(&p, &topic, &data).await?;
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                rs_publish(&p, &topic, &data)
            })
            .await?;
        }
        Side::Bare => {
            let producer: FutureProducer = cfg.producer_client_config().create()?;
            send_bare(&producer, &topic, &data).await?;
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                send_bare(&producer, &topic, &data)
            })
            .await?;
        }
        _ => {
            let producer: FutureProducer = cfg.producer_client_config().create()?;
            let ce = RawCloudEvent::new();
            send_raw(&producer, &topic, data.clone(), raw_headers(&ce)).await?;
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                send_raw(&producer, &topic, data.clone(), raw_headers(&ce))
            })
            .await?;
        }
    }
    Ok(Outcome::timed(latency, t0.elapsed()))
}

/// Consumes the N records of the produce step in a fresh group, acking each; measured from
/// the first record to the last (the group join is not measured). Deletes the topic after.
pub(crate) async fn consume(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let topic = topic(&a.tag);
    let group = format!("bench-{}-consume", a.tag);
    let cfg = config(env, &group);
    let n = a.messages;
    let stall = Duration::from_secs(60);
    let consumed =
        match a.side {
            // Lean reads the lean records of its produce step (named by their position).
            Side::Polybus | Side::Lean => {
                let consumer = KafkaConsumer::new(&cfg)?;
                consume_deliveries(&consumer, &topic, n, stall, meter).await?
            }
            Side::RustStream => {
                use ruststream::{IncomingMessage as _, Subscriber as _};
                use ruststream_rdkafka::{Commit, KafkaTopic, StartOffset};
                let broker = rs_connect(env).await?;
                // Per-message acks (`Commit::Tracked`), as polybus and the raw side store the
                // offset of each record.
                let mut sub = broker
                    .subscribe_with(
                        KafkaTopic::new(topic.clone())
                            .group(group.clone())
                            .start(StartOffset::Earliest)
                            .commit(Commit::Tracked),
                    )
                    .await?;
                let mut stream = std::pin::pin!(sub.stream());
                consume_n(
                    n,
                    stall,
                    meter,
                    "record",
                    async || {
                        use futures_util::StreamExt as _;
                        Some(stream.next().await?.map_err(anyhow::Error::from))
                    },
                    async |m| {
                        black_box(m.payload().len());
                        m.ack().await?;
                        Ok(())
                    },
                )
                .await?
            }
            _ => {
                let consumer: StreamConsumer = cfg.consumer_client_config(&group).create()?;
                consumer.subscribe(&[topic.as_str()])?;
                let consumer = &consumer;
                consume_n(
                    n,
                    stall,
                    meter,
                    "record",
                    async || Some(consumer.recv().await.map_err(anyhow::Error::from)),
                    async |m| {
                        black_box(m.payload().map(<[u8]>::len));
                        black_box(m.headers().and_then(|h| {
                            h.iter().find(|h| h.key == "ce_id").and_then(|h| h.value)
                        }));
                        consumer.store_offset_from_message(&m)?;
                        Ok(())
                    },
                )
                .await?
            }
        };
    let outcome = consumed.outcome();
    let admin = KafkaAdmin::new(&cfg)?;
    let _ = admin.delete_topic(&topic).await;
    Ok(outcome)
}
