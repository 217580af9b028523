//! One trace from an MQTT publisher to the MQTT consumer, MQTT 5 (user properties) and 3.1.1
//! (the JSON body): with OpenTelemetry (the `opentelemetry` feature of polybus-core and an
//! `OpenTelemetryLayer`) the delivery span has the publisher's trace id.
//!
//! A test binary of its own: these tests install a thread-local subscriber, and tracing caches
//! callsite interest process-wide (tokio-rs/tracing#2874).

#![allow(clippy::await_holding_lock)] // the `serial` lock is held across awaits on purpose

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use polybus_core::Event;
use polybus_mqtt::{MqttConfig, Protocol};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

fn otel_trace_id(span: &tracing::Span) -> [u8; 16] {
    span.context().span().span_context().trace_id().to_bytes()
}

fn config(protocol: Protocol) -> MqttConfig {
    let host = std::env::var("POLYBUS_MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("POLYBUS_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    let id = format!("polybus-trace-{}", uuid::Uuid::new_v4().simple());
    MqttConfig::new(host, port, id)
        .protocol(protocol)
        .connect_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn mqtt_consumer_span_continues_the_publisher_trace() -> anyhow::Result<()> {
    let _serial = serial();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("polybus-it")));
    let _guard = tracing::subscriber::set_default(subscriber);

    for protocol in [Protocol::V5, Protocol::V311] {
        let client = config(protocol).connect().await?;
        let topic = format!("polybus/test/trace/{}", uuid::Uuid::new_v4().simple());
        let mut consumer = client.consumer();
        consumer.subscribe(&topic, 1).await?;
        let root = tracing::info_span!("checkout");
        let trace = otel_trace_id(&root);
        assert_ne!(trace, [0; 16]);
        client
            .producer()
            .publish_event(&topic, Event::builder().kind("order.created").build()?)
            .instrument(root)
            .await?;
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await??;
        assert_eq!(otel_trace_id(d.span()), trace, "{protocol:?}");
        assert_eq!(
            d.trace_context().map(|tc| tc.trace_id),
            Some(trace),
            "{protocol:?}"
        );
        d.ack().await?;
        client.close().await?;
    }
    Ok(())
}

/// The default `TracePolicy::Continue` writes no `traceparent` when there is no trace to
/// continue (no tracing system, none on the event), on MQTT 5 and 3.1.1; a trace the event
/// carries travels unchanged; `StartRoot`, when chosen, starts one per message.
#[tokio::test(flavor = "current_thread")]
#[ignore = "needs brokers: cargo xtask test"]
async fn trace_context_only_when_there_is_a_trace_unless_start_root_is_chosen() -> anyhow::Result<()>
{
    use polybus_core::telemetry::{TraceContext, TracePolicy};
    let _serial = serial();
    for protocol in [Protocol::V5, Protocol::V311] {
        assert_eq!(config(protocol).trace_policy_value(), TracePolicy::Continue);
        let carried = TraceContext::new_root();
        for (policy, event, want) in [
            (TracePolicy::Continue, Event::new(b"plain"), "none"),
            (
                TracePolicy::Continue,
                Event::builder()
                    .header("traceparent", carried.to_string())
                    .data("carried")
                    .build()?,
                "carried",
            ),
            (TracePolicy::StartRoot, Event::new(b"a"), "new"),
            (TracePolicy::StartRoot, Event::new(b"b"), "new"),
        ] {
            let client = config(protocol).trace_policy(policy).connect().await?;
            let topic = format!("polybus/test/trace/{}", uuid::Uuid::new_v4().simple());
            let mut consumer = client.consumer();
            consumer.subscribe(&topic, 1).await?;
            client.producer().publish_event(&topic, event).await?;
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await??;
            let header = d.event().headers().get("traceparent").map(str::to_owned);
            let context = d.trace_context();
            d.ack().await?;
            client.close().await?;
            let why = format!("{protocol:?} {policy:?} {want}: {header:?}");
            match want {
                "none" => {
                    assert_eq!(header, None, "{why}");
                    assert_eq!(context, None, "{why}");
                }
                "carried" => assert_eq!(context, Some(carried), "{why}"),
                _ => {
                    let tc = header.as_deref().and_then(TraceContext::parse);
                    assert!(tc.is_some(), "{why}");
                    assert_ne!(tc.map(|t| t.trace_id), Some(carried.trace_id), "{why}");
                }
            }
        }
    }
    Ok(())
}

/// Tests that set a thread-local subscriber run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
