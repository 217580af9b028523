//! The polybus conformance suite and test fixtures.
//!
//! Every backend implements [`Fixture`] and runs the whole suite with one macro call:
//!
//! ```text
//! polybus_testkit::conformance!(MemoryFixture::default());
//! // for a real broker, the tests are ignored under plain `cargo test`:
//! polybus_testkit::conformance!(NatsFixture::from_env().await?, #[ignore = "needs brokers: cargo xtask test"]);
//! ```
//!
//! The scenarios live in [`suite`]; each one is gated by the fixture's
//! [`Capabilities`](polybus_core::Capabilities) and checks the declared answer where a
//! capability is off. [`MemoryFixture`] runs them against the in-memory backend.

pub mod batch;
pub mod brokers;
mod fixture;
// One readiness probe for xtask and the tests: the file lives with xtask, which has no
// library to depend on, and both compile it.
#[path = "../../../xtask/src/probe.rs"]
#[allow(dead_code, unreachable_pub)]
mod probe;
/// What the shared probe module expects from its host crate.
mod config {
    pub(crate) use crate::brokers::Kind as Broker;
    pub(crate) const HOST: &str = "127.0.0.1";
}
// The NATS cluster's configuration and readiness probe, shared with xtask like `probe`.
mod memory;
pub mod mutation;
#[path = "../../../xtask/src/nats_cluster.rs"]
#[allow(dead_code, unreachable_pub)]
mod nats_cluster;
#[cfg(feature = "proptest")]
pub mod strategies;
pub mod suite;
pub mod support;
pub mod tls;

pub use fixture::{Fixture, PrivateBroker, Restart};
pub use memory::MemoryFixture;

/// Generates one `#[tokio::test]` per scenario of [`suite`] for the fixture `$fixture` (an
/// expression evaluated inside each async test, so it may `.await` and use `?` on an
/// `anyhow::Result`). Attributes after the fixture (such as `#[ignore = "..."]`) go on every
/// test.
#[macro_export]
macro_rules! conformance {
    ($fixture:expr $(, $(#[$attr:meta])*)?) => {
        $crate::__conformance_tests! {
            ($fixture) { $($(#[$attr])*)? }
            publish_subscribe headers_roundtrip topic_isolation many_publishers_many_subscribers
            many_topics ack_consumes nack_redelivers nack_after_delay_honoured
            term_is_not_redelivered out_of_order_ack_is_safe unsettled_delivery_returns
            no_loss_across_subscriber_restart continue_after_errors consumer_group_fanout
            consumer_group_balance per_key_order concurrent_close flush_on_close_loses_nothing
            use_after_close_errors late_subscriber_backlog oversized_payload_rejected
            invalid_topic_rejected publish_json_sets_content_type boxed_backends_work
            spawned_tasks_work capabilities_match_the_backend persistent_across_broker_restart
            duplicate_publish_stored_once request_reply_as_declared
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    (($fixture:expr) $attrs:tt $($name:ident)*) => {
        $(
            $crate::__with_attrs! {
                $attrs
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> ::anyhow::Result<()> {
                    let fixture = $fixture;
                    $crate::suite::$name(&fixture).await
                }
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __with_attrs {
    ({ $($attr:tt)* } $($item:tt)*) => {
        $($attr)* $($item)*
    };
}
