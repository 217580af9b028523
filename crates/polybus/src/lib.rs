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
//! | `full` | all of the above | |
//!
//! [`connect`] picks a backend from a URL at run time and hands back erased
//! [`BoxPublisher`]/[`BoxConsumer`].
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod url;

pub use polybus_core::*;
pub use url::connect;

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

/// The composed bus (`polybus-compose`): `polybus::compose::Bus::builder()`.
#[cfg(feature = "compose")]
#[cfg_attr(docsrs, doc(cfg(feature = "compose")))]
pub use polybus_compose as compose;

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
