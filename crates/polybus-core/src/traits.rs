//! The two traits every backend implements, the extension trait users call, and the seed's
//! simple consumer interface.

use std::future::Future;
use std::sync::Arc;

use futures_core::Stream;

use crate::{
    BoxPublisher, Capabilities, Delivery, Error, ErrorKind, Event, IntoPayload, Receipt, Result,
};

/// Publishes events to topics (Kafka topics, NATS subjects, MQTT topics).
///
/// The futures are `Send`, so a publisher can be used from `tokio::spawn`ed tasks; implement
/// the methods with `async fn`. Users call conveniences from [`PublisherExt`].
///
/// ```
/// use polybus_core::{Event, MemoryBroker, Publisher};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> polybus_core::Result<()> {
/// let broker = MemoryBroker::new();
/// let publisher = broker.publisher();
/// let receipt = publisher.publish("orders", Event::new(b"{}")).await?;
/// assert_eq!(receipt.topic(), "orders");
/// publisher.close().await?;
/// # Ok(()) }
/// ```
#[diagnostic::on_unimplemented(
    note = "publishers come from the adapters: polybus-nats, polybus-jetstream, polybus-kafka, polybus-mqtt, or MemoryBroker::publisher()"
)]
pub trait Publisher: Send + Sync {
    /// Publishes `event` to `topic` and resolves when the broker has it, as far as the backend
    /// can tell (see its delivery semantics).
    fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send;

    /// Publishes `events` to `topic` in order and resolves with one receipt per event, once
    /// the broker has all of them.
    ///
    /// The default publishes one event after the other and stops at the first error: the
    /// events before it are published, the ones after it are not. Backends whose client
    /// batches override it.
    ///
    /// ```
    /// use polybus_core::{Event, MemoryBroker, Publisher};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> polybus_core::Result<()> {
    /// let publisher = MemoryBroker::new().publisher();
    /// let receipts = publisher
    ///     .publish_batch("orders", vec![Event::new(b"a"), Event::new(b"b")])
    ///     .await?;
    /// assert_eq!(receipts.len(), 2);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The first error `publish` returned.
    fn publish_batch(
        &self,
        topic: &str,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Vec<Receipt>>> + Send {
        async move {
            let mut receipts = Vec::with_capacity(events.len());
            for event in events {
                receipts.push(self.publish(topic, event).await?);
            }
            Ok(receipts)
        }
    }

    /// Waits until every event published so far has been handed to the broker.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Flushes, then closes. Later publishes fail with [`ErrorKind::Closed`]. Closing twice is
    /// not an error.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;
}

/// Subscribes to topics and yields [`Delivery`]s.
///
/// `subscribe` returns a stream borrowing the consumer; it is `Send`, so it can be driven from
/// a spawned task. Pin it (`std::pin::pin!`) to call `StreamExt::next`. Subscription errors
/// (invalid topic, connection refused) arrive as the stream's first item.
///
/// ```
/// use futures_util::StreamExt;
/// use polybus_core::{Consumer, Event, MemoryBroker, Publisher};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let broker = MemoryBroker::new();
/// let consumer = broker.consumer_group("billing");
/// let mut stream = std::pin::pin!(consumer.subscribe("orders"));
/// broker.publisher().publish("orders", Event::new(b"one")).await?;
/// let delivery = stream.next().await.expect("open stream")?;
/// assert_eq!(delivery.payload(), b"one");
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[diagnostic::on_unimplemented(
    note = "consumers come from the adapters: polybus-nats, polybus-jetstream, polybus-kafka, polybus-mqtt, or MemoryBroker::consumer()"
)]
pub trait Consumer: Send + Sync {
    /// The stream of deliveries of one subscription.
    type Stream<'a>: Stream<Item = Result<Delivery>> + Send + 'a
    where
        Self: 'a;

    /// Subscribes to `topic`.
    fn subscribe<'a>(&'a self, topic: &'a str) -> Self::Stream<'a>;

    /// The delivery semantics of this backend.
    fn capabilities(&self) -> Capabilities;
}

/// Conveniences for every [`Publisher`]. You must not implement this trait: it has a blanket
/// impl.
pub trait PublisherExt: Publisher {
    /// Publishes a payload as a new [`Event`] with default attributes, as the seed writes it:
    /// `producer.send("t", b"hello").await?`.
    fn send(
        &self,
        topic: &str,
        payload: impl IntoPayload,
    ) -> impl Future<Output = Result<Receipt>> + Send {
        self.publish(topic, Event::new(payload))
    }

    /// Serialises `value` as JSON and publishes it with content type `application/json`.
    ///
    /// # Errors
    /// [`ErrorKind::Codec`] if serialisation fails, otherwise what `publish` returns.
    fn publish_json<T: serde::Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> impl Future<Output = Result<Receipt>> + Send {
        let event = serde_json::to_vec(value)
            .map(|bytes| {
                let mut ev = Event::new(bytes);
                ev.set_content_type(Some("application/json".into()));
                ev
            })
            .map_err(|e| Error::new(ErrorKind::Codec, "core").with_source(e));
        async move { self.publish(topic, event?).await }
    }

    /// Erases the type, for brokers chosen at run time.
    fn boxed(self) -> BoxPublisher
    where
        Self: Sized + 'static,
    {
        BoxPublisher::new(self)
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}

/// The seed's simple consumer interface: subscribe to topics, then take deliveries one by one.
///
/// ```
/// use polybus_core::mq::MessageConsumer;
/// use polybus_core::{MemoryBroker, PublisherExt};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let broker = MemoryBroker::new();
/// let mut cons = broker.message_consumer();
/// cons.subscribe("t").await?;
/// broker.publisher().send("t", b"hello").await?;
/// let msg = cons.next().await?;
/// assert_eq!(msg.payload(), b"hello");
/// # Ok(()) }
/// ```
pub trait MessageConsumer: Send {
    /// Adds a subscription to `topic`.
    fn subscribe(&mut self, topic: &str) -> impl Future<Output = Result<()>> + Send;
    /// The next delivery from any subscription.
    ///
    /// # Errors
    /// [`ErrorKind::Closed`] once every subscription has ended; broker errors as they come.
    fn next(&mut self) -> impl Future<Output = Result<Delivery>> + Send;
}

/// Forwarding impls so `&P`, `Arc<P>` and `Box<P>` are publishers and consumers too.
macro_rules! forward {
    ($($ptr:ty),*) => {$(
        #[deny(unconditional_recursion)]
        impl<P: Publisher + ?Sized> Publisher for $ptr {
            fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send {
                (**self).publish(topic, event)
            }
            fn publish_batch(&self, topic: &str, events: Vec<Event>) -> impl Future<Output = Result<Vec<Receipt>>> + Send {
                (**self).publish_batch(topic, events)
            }
            fn flush(&self) -> impl Future<Output = Result<()>> + Send {
                (**self).flush()
            }
            fn close(&self) -> impl Future<Output = Result<()>> + Send {
                (**self).close()
            }
        }

        #[deny(unconditional_recursion)]
        impl<P: Consumer + ?Sized> Consumer for $ptr {
            type Stream<'a> = P::Stream<'a> where Self: 'a;
            fn subscribe<'a>(&'a self, topic: &'a str) -> Self::Stream<'a> {
                (**self).subscribe(topic)
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
        }
    )*};
}

forward!(&P, Arc<P>, Box<P>);
