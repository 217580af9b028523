//! The polybus conformance suite against mosquitto, MQTT 5 and MQTT 3.1.1.

use std::time::Duration;

use polybus_core::{Capabilities, Result};
use polybus_mqtt::{MqttProducer, MqttSubscriber, Protocol};
use polybus_testkit::Fixture;

use crate::support;

/// A fresh connection per publisher and per consumer, clean sessions.
pub(crate) struct MqttFixture {
    protocol: Protocol,
}

impl MqttFixture {
    pub(crate) fn new(protocol: Protocol) -> Self {
        MqttFixture { protocol }
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
        support::config("caps")
            .protocol(self.protocol)
            .capabilities()
    }

    async fn publisher(&self) -> Result<MqttProducer> {
        let client = support::config("pub")
            .protocol(self.protocol)
            .connect()
            .await?;
        Ok(client.producer())
    }

    async fn consumer(&self, group: Option<&str>) -> Result<MqttSubscriber> {
        let client = support::config("sub")
            .protocol(self.protocol)
            .connect()
            .await?;
        Ok(client.subscriber(group))
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
