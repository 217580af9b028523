#![doc = include_str!("../README.md")]
//!
//! # This crate
//!
//! The facade re-exports [`polybus_core`] at its root and each adapter behind a feature:
//!
//! | feature | module | crate |
//! |---|---|---|
//! | `nats` (alias `mq-nats`) | [`nats`], seed path `nats_client` | `polybus-nats` |
//! | `jetstream` | [`jetstream`], seed path `nats_client::jetstream` | `polybus-jetstream` |
//! | `kafka` (alias `mq-kafka`) | [`kafka`], seed path `kafka_client` | `polybus-kafka` |
//! | `mqtt` (alias `mq-mqtt`) | [`mqtt`], seed path `mqtt_client` | `polybus-mqtt` |
//! | `compose` | [`compose`] (`Bus`) | `polybus-compose` |
//! | `runtime` | [`runtime`] (`App`, handlers, layers, `TestApp`) | `polybus-runtime` |
//! | `full` | all of the above | |
//!
//! [`connect`] picks a backend from a URL at run time and hands back erased
//! [`BoxPublisher`]/[`BoxConsumer`].
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod url;

pub use polybus_core::*;
pub use url::connect;
/// Entry points for the fuzz targets (`fuzz/`); not API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use url::fuzzing;

/// Core NATS (`polybus-nats`).
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use polybus_nats as nats;

/// NATS JetStream (`polybus-jetstream`).
#[cfg(feature = "jetstream")]
#[cfg_attr(docsrs, doc(cfg(feature = "jetstream")))]
pub use polybus_jetstream as jetstream;

/// Kafka (`polybus-kafka`).
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use polybus_kafka as kafka;

/// MQTT 3.1.1 and 5 (`polybus-mqtt`).
#[cfg(feature = "mqtt")]
#[cfg_attr(docsrs, doc(cfg(feature = "mqtt")))]
pub use polybus_mqtt as mqtt;

/// The seed's MQTT module path: `polybus::mqtt_client::{MqttProducer, MqttConsumer}`.
#[cfg(feature = "mqtt")]
#[cfg_attr(docsrs, doc(cfg(feature = "mqtt")))]
pub mod mqtt_client {
    pub use polybus_mqtt::{MqttClient, MqttConfig, MqttConsumer, MqttProducer, QoS};
}

/// The composed bus (`polybus-compose`): `polybus::compose::Bus::builder()`.
#[cfg(feature = "compose")]
#[cfg_attr(docsrs, doc(cfg(feature = "compose")))]
pub use polybus_compose as compose;

/// The runtime (`polybus-runtime`): `polybus::runtime::App::new().route("orders", handler)`.
#[cfg(feature = "runtime")]
#[cfg_attr(docsrs, doc(cfg(feature = "runtime")))]
pub use polybus_runtime as runtime;

/// The seed's NATS module path: `polybus::nats_client::{NatsProducer, NatsConsumer}`.
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats_client {
    pub use polybus_nats::{NatsConsumer, NatsOptions, NatsProducer};

    /// The seed's JetStream module path: `polybus::nats_client::jetstream::{JsProducer,
    /// JsConsumer}`.
    #[cfg(feature = "jetstream")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jetstream")))]
    pub mod jetstream {
        pub use polybus_jetstream::{JsConsumer, JsOptions, JsProducer};
    }
}

/// The seed's Kafka module path: `polybus::kafka_client::{KafkaConfig, KafkaProducer,
/// KafkaConsumer}`.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka_client {
    pub use polybus_kafka::{
        KafkaConfig, KafkaConsumer, KafkaProducer, KafkaTransactionalProducer,
    };
}
