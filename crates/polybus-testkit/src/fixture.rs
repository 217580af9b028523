//! What a backend provides to run the conformance suite.

use std::future::Future;
use std::time::Duration;

use polybus_core::{Capabilities, Consumer, Publisher, Result};

/// A backend under test: how to make publishers, consumers, topic and group names.
///
/// Implement it once per adapter (usually in the adapter's `tests/it/main.rs`) and hand it to
/// [`conformance!`](crate::conformance).
pub trait Fixture: Send + Sync + 'static {
    /// The publisher type.
    type Publisher: Publisher + 'static;
    /// The consumer type.
    type Consumer: Consumer + 'static;

    /// The backend's name, for messages.
    fn name(&self) -> &'static str;

    /// The semantics the suite checks.
    fn capabilities(&self) -> Capabilities;

    /// A new, connected publisher.
    fn publisher(&self) -> impl Future<Output = Result<Self::Publisher>> + Send;

    /// A new, connected consumer; `Some(group)` joins that consumer group, `None` makes a
    /// subscriber that gets its own copy of every message.
    fn consumer(&self, group: Option<&str>) -> impl Future<Output = Result<Self::Consumer>> + Send;

    /// A fresh topic name that is legal on this broker and unused by any other test.
    fn topic(&self) -> String {
        format!("polybus-test-{}", uuid::Uuid::new_v4().simple())
    }

    /// A fresh consumer-group name.
    fn group(&self) -> String {
        format!("g{}", uuid::Uuid::new_v4().simple())
    }

    /// How long a new subscription needs before it sees what is published (for example a
    /// Kafka group join). The suite waits this long after subscribing.
    fn subscribe_settle(&self) -> Duration {
        Duration::ZERO
    }

    /// How long to wait for expected messages before failing.
    fn receive_timeout(&self) -> Duration {
        Duration::from_secs(20)
    }

    /// How long to wait to be confident that a message does *not* arrive.
    fn quiet_period(&self) -> Duration {
        Duration::from_millis(500)
    }
}
