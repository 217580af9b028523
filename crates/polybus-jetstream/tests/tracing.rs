//! One trace across brokers: a span started by the publisher on core NATS goes on in the
//! consumer's span, through a relay that forwards the event to JetStream, to the JetStream
//! consumer (what the composed bus does between NATS and Kafka). With OpenTelemetry (the
//! `opentelemetry` feature and an `OpenTelemetryLayer`) the spans share the trace id; without
//! it the `traceparent` polybus writes is carried unchanged.
//!
//! A test binary of its own, not a module of `tests/it`: these tests install a thread-local
//! subscriber, and tracing caches callsite interest process-wide, so a test of another module
//! hitting polybus' callsites on another thread at the same moment can leave the spans
//! disabled for this one (tokio-rs/tracing#2874).

#![allow(clippy::await_holding_lock)] // the `serial` lock is held across awaits on purpose

use std::time::Duration;

use futures_util::StreamExt;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use polybus_core::telemetry::TracePolicy;
use polybus_core::{Consumer, Delivery, Event, MessageConsumer, Publisher};
use polybus_jetstream::{JsOptions, StreamPolicy, StreamSettings};
use polybus_nats::{NatsConsumer, NatsProducer};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

fn otel_trace_id(span: &tracing::Span) -> [u8; 16] {
    span.context().span().span_context().trace_id().to_bytes()
}

/// Publishes on core NATS under `root` with the trace `policy`, relays the delivery to
/// JetStream, returns both deliveries (NATS, JetStream).
async fn nats_relay_jetstream(
    root: tracing::Span,
    policy: TracePolicy,
) -> anyhow::Result<(Delivery, Delivery)> {
    let url =
        std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let edge = format!("polybus.test.trace.edge.{id}");
    let backbone = format!("polybus.test.trace.backbone.{id}");

    // Subscribed (registered with the server) before the publish: core NATS keeps nothing.
    let mut nats_consumer = NatsConsumer::connect(&url).await?;
    MessageConsumer::subscribe(&mut nats_consumer, &edge).await?;
    let js = JsOptions::new(&url)
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "POLYBUS_TEST_".into(),
        })
        .stream_settings(StreamSettings::default().max_age(Duration::from_secs(15 * 60)))
        .connect()
        .await?;
    let js_consumer = js.consumer(Some("trace-reader"));
    let mut backbone_sub = std::pin::pin!(js_consumer.subscribe(&backbone));

    let producer = NatsProducer::builder(url.as_str())
        .trace_policy(policy)
        .producer()
        .await?;
    async {
        producer
            .publish(&edge, Event::builder().kind("order.created").build()?)
            .await?;
        producer.flush().await
    }
    .instrument(root)
    .await?;

    let at_edge = tokio::time::timeout(Duration::from_secs(10), nats_consumer.next()).await??;
    // The relay forwards outside any span of its own, as a background task does.
    js.producer()
        .publish(&backbone, at_edge.event().clone())
        .await?;
    let at_backbone = tokio::time::timeout(Duration::from_secs(10), backbone_sub.next())
        .await?
        .expect("open")?;
    Ok((at_edge, at_backbone))
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn otel_trace_runs_from_nats_publisher_through_jetstream_to_the_consumer()
-> anyhow::Result<()> {
    let _serial = serial();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("polybus-it")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let root = tracing::info_span!("checkout");
    let trace = otel_trace_id(&root);
    assert_ne!(trace, [0; 16]);
    let (at_edge, at_backbone) = nats_relay_jetstream(root, TracePolicy::Continue).await?;

    assert_eq!(otel_trace_id(at_edge.span()), trace, "NATS consumer span");
    assert_eq!(
        otel_trace_id(at_backbone.span()),
        trace,
        "JetStream consumer span"
    );
    let edge_tc = at_edge.trace_context().expect("traceparent on NATS");
    let backbone_tc = at_backbone
        .trace_context()
        .expect("traceparent on JetStream");
    assert_eq!(edge_tc.trace_id, trace);
    assert_eq!(backbone_tc.trace_id, trace);
    assert_ne!(
        edge_tc.span_id, backbone_tc.span_id,
        "the JetStream publish is its own span in the trace"
    );
    assert!(
        at_backbone.sequence().is_some(),
        "JetStream sequence on the delivery"
    );
    at_backbone.ack().await?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn without_opentelemetry_the_polybus_traceparent_is_carried_end_to_end() -> anyhow::Result<()>
{
    let _serial = serial();
    // Without a trace to continue, the default policy writes none.
    let (at_edge, at_backbone) =
        nats_relay_jetstream(tracing::Span::none(), TracePolicy::Continue).await?;
    assert_eq!(at_edge.trace_context(), None, "no trace, no traceparent");
    assert_eq!(at_backbone.trace_context(), None);
    at_backbone.ack().await?;
    // `StartRoot` starts one, carried unchanged through the relay.
    let (at_edge, at_backbone) =
        nats_relay_jetstream(tracing::Span::none(), TracePolicy::StartRoot).await?;
    let edge_tc = at_edge
        .trace_context()
        .expect("polybus wrote a traceparent");
    assert_eq!(
        at_backbone.trace_context(),
        Some(edge_tc),
        "kept unchanged through the relay"
    );
    at_backbone.ack().await?;
    Ok(())
}

/// Tests that set a thread-local subscriber run one at a time (tracing caches callsite
/// interest globally).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
