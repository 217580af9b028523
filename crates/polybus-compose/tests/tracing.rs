//! The acceptance test of the trace: a span started by the caller, `Bus::publish` (JetStream
//! receipt, spool, background forward to Kafka), a Kafka consumer: the consumer's span has the
//! publisher's trace id (OpenTelemetry through the `opentelemetry` feature of polybus-core),
//! and without OpenTelemetry the event's `traceparent` arrives in Kafka unchanged.
//!
//! A test binary of its own: these tests install a thread-local subscriber, and tracing caches
//! callsite interest process-wide, so tests of other modules running at the same moment on
//! other threads could leave the spans disabled (tokio-rs/tracing#2874).

#![allow(clippy::await_holding_lock)] // the `serial` lock is held across awaits on purpose

use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use polybus_compose::Bus;
use polybus_core::telemetry::TraceContext;
use polybus_core::{Consumer, Delivery, Event};
use polybus_jetstream::{JsOptions, StreamPolicy, StreamSettings};
use polybus_kafka::{KafkaConfig, KafkaConsumer};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

fn otel_trace_id(span: &tracing::Span) -> [u8; 16] {
    span.context().span().span_context().trace_id().to_bytes()
}

fn nats_url() -> String {
    std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn kafka_brokers() -> String {
    std::env::var("POLYBUS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Publishes `event` through a bus under `parent`, waits for the Kafka forward and reads the
/// record back with a plain Kafka consumer in a group of its own (the delivery is not settled:
/// its consumer is gone when it is returned).
async fn through_the_bus(event: Event, parent: tracing::Span) -> anyhow::Result<Delivery> {
    let spool = tempfile::tempdir()?;
    let subject = format!("polybus.test.trace.{}", uuid::Uuid::new_v4().simple());
    let bus = Bus::builder()
        .nats_options(
            JsOptions::new(nats_url())
                .stream_policy(StreamPolicy::PerTopic {
                    prefix: "POLYBUS_TEST_".into(),
                })
                .stream_settings(StreamSettings::default().max_age(Duration::from_secs(15 * 60))),
        )
        .kafka(kafka_brokers())
        .spool_dir(spool.path())
        .build()
        .await?;
    let receipt = bus.publish(&subject, event).instrument(parent).await?;
    assert!(
        bus.wait_forwarded(Duration::from_secs(30)).await,
        "forwarded to Kafka"
    );
    bus.close().await?;

    let cfg = KafkaConfig::new(kafka_brokers(), "unused").with_auto_offset_reset("earliest");
    let consumer = KafkaConsumer::new_anonymous(&cfg)?;
    let mut stream = consumer.subscribe(receipt.kafka_topic());
    let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .context("no record in Kafka")?
        .context("stream ended")??;
    Ok(d)
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn kafka_consumer_span_has_the_trace_id_of_the_bus_publisher() -> anyhow::Result<()> {
    let _serial = serial();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("polybus-it")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let root = tracing::info_span!("checkout");
    let trace = otel_trace_id(&root);
    assert_ne!(trace, [0; 16]);
    let d = through_the_bus(Event::builder().key("order-1").build()?, root).await?;
    assert_eq!(
        otel_trace_id(d.span()),
        trace,
        "the Kafka consumer's span is in the publisher's trace"
    );
    assert_eq!(d.trace_context().map(|tc| tc.trace_id), Some(trace));
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn without_opentelemetry_the_events_traceparent_reaches_kafka() -> anyhow::Result<()> {
    let _serial = serial();
    let tc = TraceContext::new_root();
    let ev = Event::builder()
        .key("order-2")
        .header("traceparent", tc.to_string())
        .build()?;
    let d = through_the_bus(ev, tracing::Span::none()).await?;
    assert_eq!(d.trace_context(), Some(tc));
    Ok(())
}

/// Tests that set a thread-local subscriber run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
