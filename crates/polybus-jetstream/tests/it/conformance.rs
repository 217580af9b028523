//! The polybus conformance suite against JetStream, with a stream per topic.

use std::sync::OnceLock;
use std::time::Duration;

use polybus_core::{Capabilities, Consumer, Result};
use polybus_jetstream::{JsConsumer, JsOptions, JsProducer, StreamPolicy, StreamSettings};
use polybus_testkit::Fixture;

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
}

impl JsFixture {
    pub(crate) async fn new() -> anyhow::Result<Self> {
        static CLEANED: OnceLock<()> = OnceLock::new();
        let url = crate::nats_url();
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
