//! The in-memory backend as a fixture: the reference every broker is compared with.

use polybus_core::{
    Capabilities, Consumer, MemoryBroker, MemoryConfig, MemoryConsumer, MemoryPublisher, Result,
};

use crate::Fixture;

/// Runs the suite against a [`MemoryBroker`] with a 64 KiB payload limit.
#[derive(Debug, Clone)]
pub struct MemoryFixture {
    broker: MemoryBroker,
}

impl Default for MemoryFixture {
    fn default() -> Self {
        MemoryFixture {
            broker: MemoryBroker::with_config(MemoryConfig::default().max_payload(64 * 1024)),
        }
    }
}

impl Fixture for MemoryFixture {
    type Publisher = MemoryPublisher;
    type Consumer = MemoryConsumer;

    fn name(&self) -> &'static str {
        "memory"
    }
    fn capabilities(&self) -> Capabilities {
        self.broker.consumer().capabilities()
    }
    async fn publisher(&self) -> Result<MemoryPublisher> {
        Ok(self.broker.publisher())
    }
    async fn consumer(&self, group: Option<&str>) -> Result<MemoryConsumer> {
        Ok(match group {
            Some(g) => self.broker.consumer_group(g),
            None => self.broker.consumer(),
        })
    }
}
