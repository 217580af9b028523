//! The in-memory backend as a fixture: the reference every broker is compared with.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use polybus_core::{
    Capabilities, Consumer, MemoryBroker, MemoryConfig, MemoryConsumer, MemoryPublisher, Result,
};

use crate::{Fixture, PrivateBroker, Restart};

/// Runs the suite against a [`MemoryBroker`] with a 64 KiB payload limit.
#[derive(Debug, Clone)]
pub struct MemoryFixture {
    broker: Arc<RwLock<MemoryBroker>>,
}

fn config() -> MemoryConfig {
    MemoryConfig::default().max_payload(64 * 1024)
}

impl Default for MemoryFixture {
    fn default() -> Self {
        MemoryFixture {
            broker: Arc::new(RwLock::new(MemoryBroker::with_config(config()))),
        }
    }
}

impl MemoryFixture {
    fn broker(&self) -> MemoryBroker {
        // A poisoned lock only means a test panicked while swapping: the broker is still whole.
        self.broker
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// "Restarting" the in-memory broker is what a process restart does to it: everything it
/// held is gone, and new connections reach a fresh broker.
struct MemoryRestart(Arc<RwLock<MemoryBroker>>);

impl Restart for MemoryRestart {
    fn restart(&mut self) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + '_>> {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            MemoryBroker::with_config(config());
        Box::pin(async { Ok(()) })
    }
}

impl Fixture for MemoryFixture {
    type Publisher = MemoryPublisher;
    type Consumer = MemoryConsumer;

    fn name(&self) -> &'static str {
        "memory"
    }
    fn capabilities(&self) -> Capabilities {
        self.broker().consumer().capabilities()
    }
    async fn publisher(&self) -> Result<MemoryPublisher> {
        Ok(self.broker().publisher())
    }
    async fn consumer(&self, group: Option<&str>) -> Result<MemoryConsumer> {
        let broker = self.broker();
        Ok(match group {
            Some(g) => broker.consumer_group(g),
            None => broker.consumer(),
        })
    }
    async fn private_broker(&self) -> anyhow::Result<PrivateBroker<Self>> {
        let fixture = MemoryFixture::default();
        let broker = Box::new(MemoryRestart(Arc::clone(&fixture.broker)));
        Ok(PrivateBroker { fixture, broker })
    }
}
