//! The polybus conformance suite against core NATS.

use std::time::Duration;

use polybus_core::{Capabilities, Consumer, Result};
use polybus_nats::{NatsConsumer, NatsOptions, NatsProducer};
use polybus_testkit::Fixture;

pub(crate) struct NatsFixture {
    url: String,
    caps: Capabilities,
}

impl NatsFixture {
    pub(crate) async fn new() -> anyhow::Result<Self> {
        let url = crate::nats_url();
        let probe = NatsConsumer::connect(&url).await?;
        let caps = probe.capabilities();
        probe.close().await?;
        Ok(NatsFixture { url, caps })
    }
}

impl Fixture for NatsFixture {
    type Publisher = NatsProducer;
    type Consumer = NatsConsumer;

    fn name(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn publisher(&self) -> Result<NatsProducer> {
        NatsProducer::connect(&self.url).await
    }

    async fn consumer(&self, group: Option<&str>) -> Result<NatsConsumer> {
        let mut opts = NatsOptions::new(&self.url);
        if let Some(g) = group {
            opts = opts.queue_group(g);
        }
        opts.consumer().await
    }

    fn topic(&self) -> String {
        format!("polybus.test.{}", uuid::Uuid::new_v4().simple())
    }

    fn subscribe_settle(&self) -> Duration {
        // Subscribing includes a round trip through the server; this only lets the stream be
        // polled until it completes.
        Duration::from_millis(100)
    }
}

polybus_testkit::conformance!(
    NatsFixture::new().await?,
    #[ignore = "needs brokers: cargo xtask test"]
);
