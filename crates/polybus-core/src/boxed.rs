//! Type-erased publishers and consumers, for brokers chosen at run time.
//!
//! Written by hand (see STYLE.md part B): a private object-safe trait with a blanket impl,
//! and public wrappers that implement the real traits. Only the dyn path allocates (one box
//! per call); static dispatch stays allocation-free.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};

use crate::{Capabilities, Consumer, Delivery, Event, Publisher, Receipt, Result};

trait ErasedPublisher: Send + Sync {
    fn publish_boxed<'a>(&'a self, topic: &'a str, event: Event) -> BoxFuture<'a, Result<Receipt>>;
    fn publish_batch_boxed<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>>>;
    fn flush_boxed(&self) -> BoxFuture<'_, Result<()>>;
    fn close_boxed(&self) -> BoxFuture<'_, Result<()>>;
}

impl<P: Publisher> ErasedPublisher for P {
    fn publish_boxed<'a>(&'a self, topic: &'a str, event: Event) -> BoxFuture<'a, Result<Receipt>> {
        self.publish(topic, event).boxed()
    }
    fn publish_batch_boxed<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<Vec<Receipt>>> {
        self.publish_batch(topic, events).boxed()
    }
    fn flush_boxed(&self) -> BoxFuture<'_, Result<()>> {
        self.flush().boxed()
    }
    fn close_boxed(&self) -> BoxFuture<'_, Result<()>> {
        self.close().boxed()
    }
}

/// A publisher of any backend behind one type. Cheap to clone (an `Arc`).
///
/// ```
/// use polybus_core::{BoxPublisher, MemoryBroker, PublisherExt};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> polybus_core::Result<()> {
/// let publishers: Vec<BoxPublisher> = vec![
///     MemoryBroker::new().publisher().boxed(),
///     MemoryBroker::new().publisher().boxed(),
/// ];
/// for p in &publishers {
///     p.send("t", b"x").await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BoxPublisher(Arc<dyn ErasedPublisher>);

impl BoxPublisher {
    /// Erases `publisher`.
    pub fn new<P: Publisher + 'static>(publisher: P) -> Self {
        BoxPublisher(Arc::new(publisher))
    }
}

impl fmt::Debug for BoxPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxPublisher")
    }
}

impl Publisher for BoxPublisher {
    async fn publish(&self, topic: &str, event: Event) -> Result<Receipt> {
        self.0.publish_boxed(topic, event).await
    }
    async fn publish_batch(&self, topic: &str, events: Vec<Event>) -> Result<Vec<Receipt>> {
        self.0.publish_batch_boxed(topic, events).await
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        self.0.flush_boxed()
    }
    fn close(&self) -> impl Future<Output = Result<()>> + Send {
        self.0.close_boxed()
    }
}

trait ErasedConsumer: Send + Sync {
    fn subscribe_boxed<'a>(&'a self, topic: &'a str) -> BoxStream<'a, Result<Delivery>>;
    fn capabilities(&self) -> Capabilities;
}

impl<C: Consumer> ErasedConsumer for C {
    fn subscribe_boxed<'a>(&'a self, topic: &'a str) -> BoxStream<'a, Result<Delivery>> {
        self.subscribe(topic).boxed()
    }
    fn capabilities(&self) -> Capabilities {
        Consumer::capabilities(self)
    }
}

/// A consumer of any backend behind one type.
///
/// ```
/// use polybus_core::{BoxConsumer, Consumer, MemoryBroker};
/// let consumer = BoxConsumer::new(MemoryBroker::new().consumer());
/// assert!(consumer.capabilities().redelivery_on_nack);
/// ```
pub struct BoxConsumer(Box<dyn ErasedConsumer>);

impl BoxConsumer {
    /// Erases `consumer`.
    pub fn new<C: Consumer + 'static>(consumer: C) -> Self {
        BoxConsumer(Box::new(consumer))
    }
}

impl fmt::Debug for BoxConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxConsumer")
    }
}

impl Consumer for BoxConsumer {
    type Stream<'a> = BoxStream<'a, Result<Delivery>>;
    fn subscribe<'a>(&'a self, topic: &'a str) -> Self::Stream<'a> {
        self.0.subscribe_boxed(topic)
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
}
