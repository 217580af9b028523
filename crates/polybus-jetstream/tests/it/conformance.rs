//! The polybus conformance suite against JetStream, with a stream per topic.

use std::sync::OnceLock;
use std::time::Duration;

use polybus_core::{Capabilities, Consumer, Result};
use polybus_jetstream::{
    ConsumerSettings, JsConsumer, JsOptions, JsProducer, StreamPolicy, StreamSettings,
};
use polybus_testkit::brokers::BrokerProcess;
use polybus_testkit::{Fixture, PrivateBroker};

/// The fixture's `ack_wait`: short, so that "must not come back" checks (a quiet period of
/// [`QUIET`]) outlast a redelivery by the server.
const ACK_WAIT: Duration = Duration::from_secs(2);
const QUIET: Duration = Duration::from_millis(2600);

pub(crate) struct JsFixture {
    url: String,
    caps: Capabilities,
}

fn options(url: &str) -> JsOptions {
    JsOptions::new(url)
        .stream_policy(StreamPolicy::PerTopic {
            prefix: crate::TEST_PREFIX.into(),
        })
        .stream_settings(StreamSettings::default().max_age(crate::TEST_STREAM_AGE))
        // Acks confirmed by the server (double ack): an ack the suite relies on has landed.
        .consumer_settings(
            ConsumerSettings::default()
                .ack_wait(ACK_WAIT)
                .confirm_acks(true),
        )
}

impl JsFixture {
    pub(crate) async fn new() -> anyhow::Result<Self> {
        Self::on(crate::nats_url()).await
    }

    async fn on(url: String) -> anyhow::Result<Self> {
        static CLEANED: OnceLock<()> = OnceLock::new();
        let probe = options(&url).consumer().await?;
        if CLEANED.set(()).is_ok() {
            crate::delete_stale_test_streams(probe.jetstream()).await;
        }
        let caps = probe.capabilities();
        Ok(JsFixture { url, caps })
    }
}

impl Fixture for JsFixture {
    type Publisher = JsProducer;
    type Consumer = JsConsumer;

    fn name(&self) -> &'static str {
        "jetstream"
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn publisher(&self) -> Result<JsProducer> {
        options(&self.url).producer().await
    }

    async fn consumer(&self, group: Option<&str>) -> Result<JsConsumer> {
        let mut opts = options(&self.url);
        if let Some(g) = group {
            opts = opts.group(g);
        }
        opts.consumer().await
    }

    async fn private_broker(&self) -> anyhow::Result<PrivateBroker<Self>> {
        let broker = BrokerProcess::nats("").await?;
        let fixture = JsFixture::on(broker.url()).await?;
        Ok(PrivateBroker {
            fixture,
            broker: Box::new(broker),
        })
    }

    fn quiet_period(&self) -> Duration {
        QUIET
    }

    fn topic(&self) -> String {
        format!("polybus.test.{}", uuid::Uuid::new_v4().simple())
    }

    fn subscribe_settle(&self) -> Duration {
        // Opening a subscription resolves or creates the stream and the consumer (a few API
        // round trips) before the first pull.
        Duration::from_millis(300)
    }
}

polybus_testkit::conformance!(
    JsFixture::new().await?,
    #[ignore = "needs brokers: cargo xtask test"]
);
