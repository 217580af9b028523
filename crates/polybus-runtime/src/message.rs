//! What a handler receives: the event and where it came from.

use std::sync::Arc;

use polybus_core::{Delivery, Event};

/// One event handed to a handler (and to the layers around it): the event, the topic it
/// arrived on, its position and which attempt this is. Cheap to clone: the event and the
/// topic are shared (the runtime lends the delivery's event for the call, without a copy).
///
/// ```
/// use polybus_core::Event;
/// use polybus_runtime::Message;
/// let msg = Message::new("orders", Event::new(b"{}"));
/// assert_eq!((msg.topic(), msg.attempt()), ("orders", 1));
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    event: Arc<Event>,
    topic: Arc<str>,
    partition: Option<i32>,
    sequence: Option<u64>,
    attempt: u32,
}

impl Message {
    /// A first attempt of `event` on `topic` (for tests of layers and handlers).
    pub fn new(topic: impl Into<Arc<str>>, event: Event) -> Self {
        Message {
            event: Arc::new(event),
            topic: topic.into(),
            partition: None,
            sequence: None,
            attempt: 1,
        }
    }

    pub(crate) fn from_delivery(d: &Delivery, attempt: u32) -> Self {
        Message::lent(Arc::new(d.event().clone()), d, attempt)
    }

    /// A message of `d` carrying `event` (the delivery's own, lent for the call).
    pub(crate) fn lent(event: Arc<Event>, d: &Delivery, attempt: u32) -> Self {
        Message {
            event,
            topic: d.shared_topic(),
            partition: d.partition(),
            sequence: d.sequence(),
            attempt,
        }
    }

    /// Sets the attempt number (1 for the first).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }
    /// The topic or subject the event arrived on.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The partition, where the backend has partitions.
    pub fn partition(&self) -> Option<i32> {
        self.partition
    }
    /// The offset or stream sequence, where the backend has one.
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }
    /// Which attempt this is: 1 the first time, then counted by the broker's redeliveries or
    /// by the runtime's in-process retries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The event, by value (a copy if a clone of this message still shares it).
    pub fn into_event(self) -> Event {
        Arc::unwrap_or_clone(self.event)
    }
}
