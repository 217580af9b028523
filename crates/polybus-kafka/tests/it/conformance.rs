//! The polybus conformance suite against a real Kafka-protocol broker (tansu).

use std::time::Duration;

use polybus_core::{Capabilities, Result};
use polybus_kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
use polybus_testkit::brokers::{BrokerProcess, TansuStorage};
use polybus_testkit::{Fixture, PrivateBroker};

use crate::common::{brokers, test_config};

struct KafkaFixture {
    cfg: KafkaConfig,
}

impl KafkaFixture {
    async fn new() -> anyhow::Result<Self> {
        Ok(KafkaFixture {
            cfg: test_config(&brokers(), "unused"),
        })
    }
}

impl Fixture for KafkaFixture {
    type Publisher = KafkaProducer;
    type Consumer = KafkaConsumer;

    fn name(&self) -> &'static str {
        "kafka"
    }
    fn capabilities(&self) -> Capabilities {
        self.cfg.capabilities()
    }
    async fn publisher(&self) -> Result<KafkaProducer> {
        KafkaProducer::new_with_config(&self.cfg)
    }
    async fn consumer(&self, group: Option<&str>) -> Result<KafkaConsumer> {
        match group {
            Some(g) => KafkaConsumer::new(&self.cfg.clone().with_group_id(g)),
            None => KafkaConsumer::new_anonymous(&self.cfg),
        }
    }
    async fn private_broker(&self) -> anyhow::Result<PrivateBroker<Self>> {
        let broker = BrokerProcess::tansu(TansuStorage::Sqlite).await?;
        let fixture = KafkaFixture {
            cfg: test_config(&broker.url(), "unused"),
        };
        Ok(PrivateBroker {
            fixture,
            broker: Box::new(broker),
        })
    }
    fn subscribe_settle(&self) -> Duration {
        Duration::from_secs(3)
    }
    fn receive_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
    fn quiet_period(&self) -> Duration {
        Duration::from_millis(1500)
    }
}

polybus_testkit::conformance!(KafkaFixture::new().await?, #[ignore = "needs brokers: cargo xtask test"]);
