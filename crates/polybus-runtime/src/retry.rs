//! How a retry is made ([`RetryMode`]); how many attempts and how long between them is the
//! [`RetryPolicy`](crate::RetryPolicy) the runtime shares with the composed bus (defined in
//! `polybus-core`).

/// How a failed event is tried again.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryMode {
    /// [`Redeliver`](Self::Redeliver) where the consumer's
    /// [`Capabilities::nack_delay`](polybus_core::Capabilities::nack_delay) is true (memory,
    /// JetStream, Kafka), [`InProcess`](Self::InProcess) where it is not (core NATS, MQTT).
    #[default]
    Auto,
    /// `nack(delay)`: the broker (or the adapter) delivers the event again after the delay
    /// and counts the attempt (`delivery_count`). The event's slot is free meanwhile, so later
    /// events with the same key may be handled before the retry (as the broker would deliver
    /// them anyway).
    Redeliver,
    /// Hold the delivery and call the handler again after the delay, in the same key lane:
    /// per-key order is kept, and on at-most-once backends (core NATS, MQTT) it is the only
    /// retry that loses nothing more than the backend already loses. Chosen over republishing
    /// to the topic because a republish is a new event for every other subscriber and group
    /// of that topic, and needs headers to carry the attempt count. The lane (not a
    /// concurrency slot) waits during the delay; a shutdown ends the wait and releases the
    /// delivery.
    InProcess,
}
