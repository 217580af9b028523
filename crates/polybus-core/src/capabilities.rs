//! What a backend can and cannot do, declared rather than implied.

/// Which order a backend keeps.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// No order guarantee.
    None,
    /// Events with the same key arrive in publish order (Kafka partitions).
    PerKey,
    /// Events on one topic from one publisher arrive in publish order to a single subscriber.
    PerTopic,
}

/// What a subscriber that joins late gets.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// It misses what was published before it subscribed.
    Missed,
    /// It receives what was published before it subscribed (replay from the start).
    Delivered,
}

/// What happens to a delivery that is dropped without `ack`, `nack` or `term`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsettled {
    /// It is gone: the backend delivered it at most once (core NATS, MQTT, where the broker
    /// considers a message delivered when the client received it).
    Lost,
    /// The broker delivers it again, to this subscription or another member of the group, and
    /// nothing that was settled comes back (JetStream after `ack_wait` or a nak, memory).
    Redelivered,
    /// The subscription delivers it again while it lives. Once the subscription is gone, the
    /// group resumes from its oldest unsettled delivery, so deliveries settled after that one
    /// come back too (Kafka: a group commits one offset per partition).
    RedeliveredFromPosition,
}

impl Unsettled {
    /// Whether a dropped delivery is delivered again (by either mechanism).
    pub const fn comes_back(self) -> bool {
        !matches!(self, Unsettled::Lost)
    }
}

/// The delivery semantics of a backend. The conformance suite runs the scenarios these enable
/// and checks the declared answers of the others (an `Unsupported` nack, a missed backlog).
///
/// ```
/// use polybus_core::{Backlog, Capabilities, Ordering};
/// const CAPS: Capabilities = Capabilities::NONE
///     .with_consumer_groups(true)
///     .with_ordering(Ordering::PerTopic)
///     .with_backlog(Backlog::Missed)
///     .with_headers(true);
/// assert!(CAPS.consumer_groups && !CAPS.persistent);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Messages survive a broker restart.
    pub persistent: bool,
    /// `nack` makes the broker deliver the message again.
    pub redelivery_on_nack: bool,
    /// `nack(delay)` waits at least `delay` before redelivering.
    pub nack_delay: bool,
    /// What happens to a delivery dropped without settlement.
    pub unsettled: Unsettled,
    /// Named consumer groups: every group gets each message, members of a group share them.
    pub consumer_groups: bool,
    /// A named group keeps its position while no member is connected, so a member that
    /// (re)joins resumes where the group left off.
    pub durable_groups: bool,
    /// The order the backend keeps.
    pub ordering: Ordering,
    /// What a late subscriber without a group position gets.
    pub backlog: Backlog,
    /// Publishing the same event (same `id`) twice stores and delivers it once (JetStream
    /// `Nats-Msg-Id` within the stream's duplicate window). A producer that only keeps its own
    /// retries from duplicating (Kafka's idempotent producer) does not qualify.
    pub exactly_once_publish: bool,
    /// Headers travel with the event.
    pub headers: bool,
    /// Request-reply is available.
    pub request_reply: bool,
    /// The largest payload the backend accepts, when it has a limit it can tell.
    pub max_payload: Option<usize>,
}

impl Capabilities {
    /// Nothing: the starting point for a declaration.
    pub const NONE: Capabilities = Capabilities {
        persistent: false,
        redelivery_on_nack: false,
        nack_delay: false,
        unsettled: Unsettled::Lost,
        consumer_groups: false,
        durable_groups: false,
        ordering: Ordering::None,
        backlog: Backlog::Missed,
        exactly_once_publish: false,
        headers: false,
        request_reply: false,
        max_payload: None,
    };

    /// Sets [`persistent`](Self::persistent).
    pub const fn with_persistent(mut self, v: bool) -> Self {
        self.persistent = v;
        self
    }
    /// Sets [`redelivery_on_nack`](Self::redelivery_on_nack).
    pub const fn with_redelivery_on_nack(mut self, v: bool) -> Self {
        self.redelivery_on_nack = v;
        self
    }
    /// Sets [`nack_delay`](Self::nack_delay).
    pub const fn with_nack_delay(mut self, v: bool) -> Self {
        self.nack_delay = v;
        self
    }
    /// Sets [`unsettled`](Self::unsettled).
    pub const fn with_unsettled(mut self, v: Unsettled) -> Self {
        self.unsettled = v;
        self
    }
    /// Sets [`consumer_groups`](Self::consumer_groups).
    pub const fn with_consumer_groups(mut self, v: bool) -> Self {
        self.consumer_groups = v;
        self
    }
    /// Sets [`durable_groups`](Self::durable_groups).
    pub const fn with_durable_groups(mut self, v: bool) -> Self {
        self.durable_groups = v;
        self
    }
    /// Sets [`ordering`](Self::ordering).
    pub const fn with_ordering(mut self, v: Ordering) -> Self {
        self.ordering = v;
        self
    }
    /// Sets [`backlog`](Self::backlog).
    pub const fn with_backlog(mut self, v: Backlog) -> Self {
        self.backlog = v;
        self
    }
    /// Sets [`exactly_once_publish`](Self::exactly_once_publish).
    pub const fn with_exactly_once_publish(mut self, v: bool) -> Self {
        self.exactly_once_publish = v;
        self
    }
    /// Sets [`headers`](Self::headers).
    pub const fn with_headers(mut self, v: bool) -> Self {
        self.headers = v;
        self
    }
    /// Sets [`request_reply`](Self::request_reply).
    pub const fn with_request_reply(mut self, v: bool) -> Self {
        self.request_reply = v;
        self
    }
    /// Sets [`max_payload`](Self::max_payload).
    pub const fn with_max_payload(mut self, v: Option<usize>) -> Self {
        self.max_payload = v;
        self
    }
}
