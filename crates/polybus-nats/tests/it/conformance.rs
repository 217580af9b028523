//! The polybus conformance suite against core NATS.

use std::time::Duration;

use futures_util::StreamExt as _;
use polybus_core::{Capabilities, Consumer, Event, Result};
use polybus_nats::{NatsConsumer, NatsOptions, NatsProducer};
use polybus_testkit::brokers::BrokerProcess;
use polybus_testkit::{Fixture, PrivateBroker};

pub(crate) struct NatsFixture {
    url: String,
    caps: Capabilities,
}

impl NatsFixture {
    pub(crate) async fn new() -> anyhow::Result<Self> {
        Self::on(crate::nats_url()).await
    }

    async fn on(url: String) -> anyhow::Result<Self> {
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

    async fn private_broker(&self) -> anyhow::Result<PrivateBroker<Self>> {
        let broker = BrokerProcess::nats("").await?;
        let fixture = NatsFixture::on(broker.url()).await?;
        Ok(PrivateBroker {
            fixture,
            broker: Box::new(broker),
        })
    }

    async fn request_echo(&self, topic: &str, request: Event) -> Result<Event> {
        let responder = NatsConsumer::connect(&self.url).await?;
        let mut requests = Box::pin(responder.serve(topic));
        let serving = tokio::spawn(async move {
            while let Some(req) = requests.next().await {
                let req = req?;
                let echo = Event::new(req.event().data().clone());
                req.respond(echo).await?;
            }
            Result::<()>::Ok(())
        });
        // The subscription opens on the task's first poll; give it the settle time.
        tokio::time::sleep(self.subscribe_settle()).await;
        let reply = NatsProducer::connect(&self.url)
            .await?
            .request(topic, request)
            .await;
        serving.abort();
        reply
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
