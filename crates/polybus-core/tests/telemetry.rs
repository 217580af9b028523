//! Spans and trace ids without OpenTelemetry: the publish span and the delivery span carry the
//! OpenTelemetry messaging attributes and the same `trace_id`, and the metrics reach the
//! installed recorder.
#![allow(clippy::await_holding_lock)] // the `serial` lock is held across awaits on purpose

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::{Consumer, Event, MemoryBroker, Publisher};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt as _};

type Spans = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

/// Every span's name and fields, as strings.
#[derive(Clone, Default)]
struct Capture(Spans, Arc<Mutex<HashMap<u64, usize>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);
impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.0.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        self.1
            .lock()
            .unwrap()
            .insert(id.into_u64(), spans.len() - 1);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let Some(&i) = self.1.lock().unwrap().get(&id.into_u64()) else {
            return;
        };
        values.record(&mut Fields(&mut self.0.lock().unwrap()[i].1));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn publish_and_delivery_spans_share_the_trace_id() -> anyhow::Result<()> {
    let _serial = serial();
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let broker = MemoryBroker::new();
    let c = broker.consumer_group("g");
    let mut s = std::pin::pin!(c.subscribe("orders"));
    let ev = Event::builder().id("ev-1").data("hello").build()?;
    let receipt = broker.publisher().publish("orders", ev).await?;
    let d = s.next().await.expect("open")?;
    let carried = d.trace_context().expect("polybus wrote a traceparent");
    d.ack().await?;

    let spans = capture.0.lock().unwrap().clone();
    let publish = &spans
        .iter()
        .find(|(n, _)| n == "publish")
        .expect("publish span")
        .1;
    let process = &spans
        .iter()
        .find(|(n, _)| n == "process")
        .expect("process span")
        .1;
    let trace = carried.trace_id_hex().to_string();
    assert_eq!(publish["trace_id"], trace);
    assert_eq!(process["trace_id"], trace);
    for f in [publish, process] {
        assert_eq!(f["messaging.system"], "memory");
        assert_eq!(f["messaging.destination.name"], "orders");
        assert_eq!(f["messaging.message.id"], "ev-1");
        assert_eq!(f["messaging.message.body.size"], "5");
    }
    assert_eq!(publish["messaging.operation.type"], "send");
    assert_eq!(publish["otel.kind"], "producer");
    assert_eq!(publish["otel.name"], "send orders");
    assert_eq!(process["messaging.operation.type"], "process");
    assert_eq!(process["otel.kind"], "consumer");
    assert_eq!(process["messaging.message.delivery_count"], "1");
    assert!(receipt.sequence().is_some());
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn failed_publish_records_the_error_kind() -> anyhow::Result<()> {
    let _serial = serial();
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let broker = MemoryBroker::new();
    let p = broker.publisher();
    p.close().await?;
    assert!(p.publish("t", Event::new(b"x")).await.is_err());
    let spans = capture.0.lock().unwrap().clone();
    let publish = &spans
        .iter()
        .find(|(n, _)| n == "publish")
        .expect("publish span")
        .1;
    assert_eq!(publish["error.type"], "closed");
    assert_eq!(publish["otel.status_code"], "ERROR");
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_reach_the_recorder() -> anyhow::Result<()> {
    let _serial = serial();
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let broker = MemoryBroker::new();
    let p = broker.publisher();
    let c = broker.consumer_group("g");
    let mut s = std::pin::pin!(c.subscribe("m"));
    for _ in 0..3 {
        p.publish("m", Event::new(b"x")).await?;
    }
    let d = s.next().await.expect("open")?;
    d.ack().await?;
    let d = s.next().await.expect("open")?;
    d.nack(Duration::ZERO).await?;
    let held = s.next().await.expect("open")?;
    let scrape = handle.render();
    let value = |name: &str| -> f64 {
        scrape
            .lines()
            .find(|l| l.starts_with(name) && l.contains("system=\"memory\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{scrape}"))
    };
    assert_eq!(value("polybus_published_total"), 3.0);
    assert_eq!(value("polybus_consumed_total"), 3.0);
    assert_eq!(value("polybus_nacked_total"), 1.0);
    assert_eq!(value("polybus_deliveries_in_flight"), 1.0);
    // With a recorder the publishes and the ack are timed (without one polybus reads no
    // clock for them): one sample per publish, one per ack.
    assert_eq!(value("polybus_publish_duration_seconds_count"), 3.0);
    assert_eq!(value("polybus_ack_duration_seconds_count"), 1.0);
    drop(held);
    let redelivered = s.next().await.expect("open")?;
    assert!(redelivered.is_redelivered());
    redelivered.ack().await?;
    let scrape = handle.render();
    assert!(
        scrape.contains("polybus_redelivered_total{system=\"memory\"} "),
        "{scrape}"
    );
    Ok(())
}

/// Tests that set a thread-local subscriber run one at a time: tracing caches each callsite's
/// interest globally, and a callsite first hit on a thread without a subscriber while another
/// thread installs one can stay disabled.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn every_metric_is_in_docs_metrics_md() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/METRICS.md");
    let doc = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    for (name, kind, _) in polybus_core::metrics::ALL {
        let row = format!("| `{name}` | {kind} |");
        assert!(doc.contains(&row), "docs/METRICS.md lacks the row {row}");
    }
}
