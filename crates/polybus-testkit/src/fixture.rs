//! What a backend provides to run the conformance suite.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use polybus_core::{Capabilities, Consumer, Error, ErrorKind, Event, Publisher, Result};

use crate::brokers::BrokerProcess;

/// A broker the suite may restart (kill and start again with the same data): what the
/// `persistent` scenario needs.
pub trait Restart: Send {
    /// Kills the broker without a clean shutdown and starts it again on the same address with
    /// the same data; resolves once it is ready.
    fn restart(&mut self) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + '_>>;
}

impl Restart for BrokerProcess {
    fn restart(&mut self) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + '_>> {
        Box::pin(BrokerProcess::restart(self))
    }
}

/// A fixture bound to a broker of its own, and that broker (see [`Fixture::private_broker`]).
pub struct PrivateBroker<F> {
    /// The fixture, talking to [`broker`](Self::broker) only.
    pub fixture: F,
    /// The broker, restartable.
    pub broker: Box<dyn Restart>,
}

impl<F> std::fmt::Debug for PrivateBroker<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateBroker")
    }
}

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

    /// The same fixture on a broker of its own that the suite may restart (the `persistent`
    /// scenario kills it with unsettled events stored). Every fixture provides one: a backend
    /// that cannot be restarted cannot show what its `persistent` declaration means.
    fn private_broker(&self) -> impl Future<Output = anyhow::Result<PrivateBroker<Self>>> + Send
    where
        Self: Sized;

    /// Sends `request` to `topic`, where the fixture runs a responder that answers each request
    /// with its data, and returns the reply. Backends without request-reply keep this default,
    /// which fails with [`ErrorKind::Unsupported`].
    fn request_echo(
        &self,
        topic: &str,
        request: Event,
    ) -> impl Future<Output = Result<Event>> + Send {
        let _ = (topic, request);
        let backend = self.name();
        async move {
            Err(Error::new(ErrorKind::Unsupported, backend)
                .with_message("the backend has no request-reply"))
        }
    }

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

    /// How long to wait to be confident that a message does *not* arrive. It must outlast the
    /// broker's redelivery timer (JetStream `ack_wait`) so that "must not come back" checks
    /// cover a redelivery.
    fn quiet_period(&self) -> Duration {
        Duration::from_millis(500)
    }
}
