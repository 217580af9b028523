//! One trace from a Kafka publisher to the Kafka consumer: with OpenTelemetry (the
//! `opentelemetry` feature of polybus-core and an `OpenTelemetryLayer`) the delivery span has
//! the publisher's trace id; the record carries the publish span's `traceparent`.
//!
//! A test binary of its own, not a module of `tests/it`: these tests install a thread-local
//! subscriber, and tracing caches callsite interest process-wide, so a test of another module
//! hitting polybus' callsites on another thread at the same moment can leave the spans
//! disabled for this one (tokio-rs/tracing#2874).

#![allow(clippy::await_holding_lock)] // the `serial` lock is held across awaits on purpose

use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use polybus_core::{Consumer, Event};
use polybus_kafka::{KafkaAdmin, KafkaConsumer, KafkaProducer};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

fn brokers() -> String {
    std::env::var("POLYBUS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn test_config(brokers: &str, group: &str) -> polybus_kafka::KafkaConfig {
    polybus_kafka::KafkaConfig::new(brokers, group)
        .with_auto_offset_reset("earliest")
        .set("fetch.wait.max.ms", "50")
}

fn topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn otel_trace_id(span: &tracing::Span) -> [u8; 16] {
    span.context().span().span_context().trace_id().to_bytes()
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn kafka_consumer_span_continues_the_publisher_trace() -> anyhow::Result<()> {
    let _serial = serial();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("polybus-it")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let b = brokers();
    let cfg = test_config(&b, "unused");
    let t = topic("trace");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let root = tracing::info_span!("checkout");
    let trace = otel_trace_id(&root);
    assert_ne!(trace, [0; 16]);
    let receipt = KafkaProducer::new_with_config(&cfg)?
        .publish(&t, Event::builder().key("k").kind("order.created").build()?)
        .instrument(root)
        .await?;

    let consumer = KafkaConsumer::new_anonymous(&cfg)?;
    let mut stream = consumer.subscribe(&t);
    let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .context("no record")?
        .context("stream ended")??;
    assert_eq!(
        otel_trace_id(d.span()),
        trace,
        "consumer span in the publisher's trace"
    );
    assert_eq!(d.trace_context().map(|tc| tc.trace_id), Some(trace));
    assert_eq!(d.partition(), receipt.partition());
    assert_eq!(d.sequence(), receipt.sequence());
    d.ack().await?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn without_opentelemetry_the_traceparent_still_travels() -> anyhow::Result<()> {
    let _serial = serial();
    let b = brokers();
    let cfg = test_config(&b, "unused");
    let t = topic("trace-plain");
    KafkaAdmin::new(&cfg)?.ensure_topic(&t).await?;
    let tc = polybus_core::telemetry::TraceContext::new_root();
    let ev = Event::builder()
        .header("traceparent", tc.to_string())
        .build()?;
    KafkaProducer::new_with_config(&cfg)?
        .publish(&t, ev)
        .await?;
    let consumer = KafkaConsumer::new_anonymous(&cfg)?;
    let mut stream = consumer.subscribe(&t);
    let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .context("no record")?
        .context("stream ended")??;
    assert_eq!(d.trace_context(), Some(tc), "kept as the event had it");
    d.ack().await?;
    Ok(())
}

/// The `traceparent` header and the trace context of the first record of `t`, read (and
/// acknowledged) by an anonymous consumer.
async fn first_trace(
    cfg: &polybus_kafka::KafkaConfig,
    t: &str,
) -> anyhow::Result<(
    Option<String>,
    Option<polybus_core::telemetry::TraceContext>,
)> {
    let consumer = KafkaConsumer::new_anonymous(cfg)?;
    let mut stream = consumer.subscribe(t);
    let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .context("no record")?
        .context("stream ended")??;
    let seen = (
        d.event().headers().get("traceparent").map(str::to_owned),
        d.trace_context(),
    );
    d.ack().await?;
    Ok(seen)
}

/// The default `TracePolicy::Continue` writes no `traceparent` when there is no trace to
/// continue (no tracing system, none on the event); `StartRoot`, when chosen, starts one per
/// record. The lean format carries a trace the event brings, and nothing else.
#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn trace_context_only_when_there_is_a_trace_unless_start_root_is_chosen() -> anyhow::Result<()>
{
    use polybus_core::cloudevents::WireFormat;
    use polybus_core::telemetry::{TraceContext, TracePolicy};
    let _serial = serial();
    let b = brokers();
    let cfg = test_config(&b, "unused");
    assert_eq!(cfg.trace_policy(), TracePolicy::Continue, "the default");

    for format in [WireFormat::CloudEvents, WireFormat::Lean] {
        let cfg = cfg.clone().with_wire_format(format);
        // Continue, nothing to continue: no trace header.
        let t = topic("trace-none");
        KafkaProducer::new_with_config(&cfg)?
            .publish(&t, Event::builder().key("k").build()?)
            .await?;
        let (header, context) = first_trace(&cfg, &t).await?;
        assert_eq!(header, None, "{format:?}");
        assert_eq!(context, None, "{format:?}");

        // Continue, the event carries a trace: it travels unchanged.
        let t = topic("trace-carried");
        let tc = TraceContext::new_root();
        KafkaProducer::new_with_config(&cfg)?
            .publish(
                &t,
                Event::builder()
                    .header("traceparent", tc.to_string())
                    .build()?,
            )
            .await?;
        let (_, context) = first_trace(&cfg, &t).await?;
        assert_eq!(context, Some(tc), "{format:?}");

        // StartRoot: a new trace on a record that had none.
        let t = topic("trace-root");
        let root_cfg = cfg.clone().with_trace_policy(TracePolicy::StartRoot);
        let producer = KafkaProducer::new_with_config(&root_cfg)?;
        producer.publish(&t, Event::new(b"a")).await?;
        producer.publish(&t, Event::new(b"b")).await?;
        let consumer = KafkaConsumer::new_anonymous(&root_cfg)?;
        let mut stream = consumer.subscribe(&t);
        let mut traces = Vec::new();
        while traces.len() < 2 {
            let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .context("no record")?
                .context("stream ended")??;
            let tp = d.event().headers().get("traceparent").map(str::to_owned);
            let parsed = tp.as_deref().and_then(TraceContext::parse);
            assert!(parsed.is_some(), "{format:?}: traceparent {tp:?}");
            traces.push(parsed.map(|tc| tc.trace_id));
            d.ack().await?;
        }
        assert_ne!(traces[0], traces[1], "{format:?}: one new trace per record");
    }
    Ok(())
}

/// Tests that set a thread-local subscriber run one at a time (tracing caches callsite
/// interest globally).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
