//! The polybus conformance suite against mosquitto, MQTT 5 and MQTT 3.1.1.

use std::time::Duration;

use polybus_core::{Capabilities, Result};
use polybus_mqtt::{MqttConfig, MqttProducer, MqttSubscriber, Protocol};
use polybus_testkit::brokers::BrokerProcess;
use polybus_testkit::{Fixture, PrivateBroker};

use crate::support;

/// A fresh connection per publisher and per consumer, clean sessions.
pub(crate) struct MqttFixture {
    protocol: Protocol,
    port: u16,
}

impl MqttFixture {
    pub(crate) fn new(protocol: Protocol) -> Self {
        MqttFixture {
            protocol,
            port: support::broker().1,
        }
    }

    fn config(&self, what: &str) -> MqttConfig {
        MqttConfig::new("127.0.0.1", self.port, support::client_id(what))
            .connect_timeout(Duration::from_secs(5))
            .protocol(self.protocol)
    }
}

impl Fixture for MqttFixture {
    type Publisher = MqttProducer;
    type Consumer = MqttSubscriber;

    fn name(&self) -> &'static str {
        match self.protocol {
            Protocol::V311 => "mqtt-3.1.1",
            _ => "mqtt-5",
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.config("caps").capabilities()
    }

    async fn publisher(&self) -> Result<MqttProducer> {
        let client = self.config("pub").connect().await?;
        Ok(client.producer())
    }

    async fn consumer(&self, group: Option<&str>) -> Result<MqttSubscriber> {
        let client = self.config("sub").connect().await?;
        Ok(client.subscriber(group))
    }

    async fn private_broker(&self) -> anyhow::Result<PrivateBroker<Self>> {
        let broker = BrokerProcess::mosquitto("").await?;
        let fixture = MqttFixture {
            protocol: self.protocol,
            port: broker.port(),
        };
        Ok(PrivateBroker {
            fixture,
            broker: Box::new(broker),
        })
    }

    fn topic(&self) -> String {
        support::topic()
    }

    fn subscribe_settle(&self) -> Duration {
        // A SUBSCRIBE on one connection races a PUBLISH on another; give the SUBACK time.
        Duration::from_millis(200)
    }
}

mod v5 {
    use super::*;
    polybus_testkit::conformance!(MqttFixture::new(Protocol::V5), #[ignore = "needs brokers: cargo xtask test"]);
}

mod v311 {
    use super::*;
    polybus_testkit::conformance!(MqttFixture::new(Protocol::V311), #[ignore = "needs brokers: cargo xtask test"]);
}
