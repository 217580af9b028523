//! The metrics hooks: every `polybus_compose_*` metric the docs name is reported through the
//! `metrics` facade during a run with an outage, a retry and a dead letter.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use polybus_compose::metrics as m;
use polybus_core::Event;

use crate::support::Env;

#[derive(Clone, Default)]
struct Names(Arc<Mutex<HashSet<String>>>);

impl Names {
    fn seen(&self, key: &Key) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.name().to_owned());
    }
    fn has(&self, name: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }
}

impl Recorder for Names {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.seen(key);
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.seen(key);
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.seen(key);
        Histogram::noop()
    }
}

#[tokio::test]
async fn metrics_are_reported_through_the_facade() -> Result<()> {
    let names = Names::default();
    // The one global recorder of this test binary; other tests' metrics land here too.
    metrics::set_global_recorder(names.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;

    let env = Env::new();
    env.track("m.t", "check");
    let bus = env.bus().await;
    env.kafka_pub.set_down(true);
    bus.publish("m.t", b"during the outage").await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    env.kafka_pub.set_down(false);
    let poison = Event::builder().header("poison", "1").build()?;
    bus.publish("m.t", poison).await?;
    assert!(bus.wait_forwarded(Duration::from_secs(10)).await);
    bus.close().await?;

    for name in [
        m::PUBLISHED,
        m::ACK_LATENCY,
        m::NATS_LATENCY,
        m::FORWARDED,
        m::FORWARD_LATENCY,
        m::RETRIES,
        m::DEAD_LETTERS,
        m::SPOOL_DEPTH,
    ] {
        assert!(names.has(name), "{name} was not reported");
    }
    Ok(())
}
