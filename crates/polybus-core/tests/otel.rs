//! The `opentelemetry` feature: with an OpenTelemetry layer installed, the publish span's
//! context travels in `traceparent` and the delivery span continues the publisher's trace,
//! across a forward to a second topic (what the composed bus does between NATS and Kafka).
#![allow(clippy::await_holding_lock)] // the `serial` lock is held across awaits on purpose

use futures_util::StreamExt;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use polybus_core::telemetry::TraceContext;
use polybus_core::{Consumer, Event, MemoryBroker, Publisher};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

fn otel_trace_id(span: &tracing::Span) -> [u8; 16] {
    span.context().span().span_context().trace_id().to_bytes()
}

#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_publisher_through_a_forward_to_the_last_consumer() -> anyhow::Result<()> {
    let _serial = serial();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("polybus-test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = MemoryBroker::new();
    let first = broker.consumer_group("forwarder");
    let mut first = std::pin::pin!(first.subscribe("edge"));
    let last = broker.consumer_group("reader");
    let mut last = std::pin::pin!(last.subscribe("backbone"));
    let publisher = broker.publisher();

    let root = tracing::info_span!("request");
    let root_trace = otel_trace_id(&root);
    assert_ne!(
        root_trace, [0; 16],
        "the OpenTelemetry layer gives the span a trace id"
    );
    publisher
        .publish("edge", Event::new(b"x"))
        .instrument(root.clone())
        .await?;

    // The forwarder republishes the event it received, outside any span (as a background
    // task does): the trace goes on from the message's traceparent.
    let d = first.next().await.expect("open")?;
    assert_eq!(
        otel_trace_id(d.span()),
        root_trace,
        "delivery span continues the trace"
    );
    let carried = d.trace_context().expect("traceparent carried");
    assert_eq!(carried.trace_id, root_trace);
    let event = d.event().clone();
    d.ack().await?;
    publisher.publish("backbone", event).await?;

    let d = last.next().await.expect("open")?;
    assert_eq!(
        otel_trace_id(d.span()),
        root_trace,
        "same trace after the forward"
    );
    let hop2 = d.trace_context().expect("traceparent carried");
    assert_eq!(hop2.trace_id, root_trace);
    assert_ne!(
        hop2.span_id, carried.span_id,
        "the second publish names its own span as parent"
    );
    d.ack().await?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn without_an_opentelemetry_layer_polybus_ids_are_used() -> anyhow::Result<()> {
    let _serial = serial();
    let broker = MemoryBroker::new();
    let c = broker.consumer();
    let mut s = std::pin::pin!(c.subscribe("t"));
    let tc = TraceContext::new_root();
    let ev = Event::builder()
        .header("traceparent", tc.to_string())
        .build()?;
    broker.publisher().publish("t", ev).await?;
    let d = s.next().await.expect("open")?;
    assert_eq!(d.trace_context(), Some(tc), "kept as it was");
    Ok(())
}

/// Tests that set a thread-local subscriber run one at a time: tracing caches each callsite's
/// interest globally, and a callsite first hit on a thread without a subscriber while another
/// thread installs one can stay disabled.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
