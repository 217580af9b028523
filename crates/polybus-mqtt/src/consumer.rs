//! Consumers: the seed's `MqttConsumer` and the generic `MqttSubscriber`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use polybus_core::{Capabilities, Consumer, Delivery, Error, MessageConsumer, Result};
use tokio::sync::{mpsc, oneshot, watch};

use crate::BACKEND;
use crate::client::Handle;
use crate::config::QoS;
use crate::conn::Sink;
use crate::topic;

fn channel(handle: &Handle) -> (Sink, mpsc::Receiver<Result<Delivery>>) {
    let cfg = &handle.inner.cfg;
    let n = cfg.buffer.max(usize::from(cfg.receive_maximum));
    mpsc::channel(n.min(tokio::sync::Semaphore::MAX_PERMITS))
}

/// The seed's consumer: subscribe to topic filters with a QoS, then take deliveries from all
/// of them with [`next`](Self::next).
///
/// QoS 1/2 deliveries are acknowledged to the broker only by [`Delivery::ack`] (manual acks).
/// `nack` is unsupported: MQTT has no negative acknowledgement. A delivery dropped without
/// ack: with a persistent session (`clean_start(false)` and a session expiry) it stays
/// unacknowledged and the broker delivers it again after the next reconnect (until then it
/// holds one of the broker's in-flight slots); with a clean session it could never come back,
/// so it is acknowledged and gone. QoS 2 duplicates the broker resends are recognised by
/// packet id and not delivered twice.
///
/// Filters may use wildcards (`+`, `#`) and shared subscriptions (`$share/<group>/<filter>`).
///
/// ```no_run
/// use polybus_mqtt::MqttProducer;
/// # #[tokio::main] async fn main() -> anyhow::Result<()> {
/// let (p, mut c) = MqttProducer::connect("127.0.0.1", 1883, "client-1").await?;
/// c.subscribe("t", 1).await?; // QoS 1
/// p.publish("t", b"hello", 1).await?;
/// let msg = c.next().await?;
/// assert_eq!(msg.payload(), b"hello");
/// msg.ack().await?;
/// # Ok(()) }
/// ```
pub struct MqttConsumer {
    handle: Arc<Handle>,
    tx: Sink,
    rx: mpsc::Receiver<Result<Delivery>>,
    done: watch::Receiver<bool>,
    subs: Vec<u32>,
}

impl fmt::Debug for MqttConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConsumer")
            .field("client_id", &self.handle.inner.cfg.client_id)
            .field("subscriptions", &self.subs.len())
            .finish()
    }
}

impl MqttConsumer {
    pub(crate) fn new(handle: Arc<Handle>) -> Self {
        let (tx, rx) = channel(&handle);
        let done = handle.inner.done();
        MqttConsumer {
            handle,
            tx,
            rx,
            done,
            subs: Vec::new(),
        }
    }

    /// Subscribes to `filter` with QoS `qos` (0, 1 or 2) and waits for the broker's SUBACK.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidTopic`](polybus_core::ErrorKind::InvalidTopic) for a malformed
    /// filter, [`ErrorKind::Unsupported`](polybus_core::ErrorKind::Unsupported) for a QoS above
    /// 2, the broker's refusal (`Unauthorized`, `Rejected`), `Closed`.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<()> {
        let qos = QoS::from_level(qos)?;
        self.subscribe_with(filter, qos).await
    }

    /// Subscribes with a [`QoS`].
    ///
    /// # Errors
    /// As [`subscribe`](Self::subscribe).
    pub async fn subscribe_with(&mut self, filter: &str, qos: QoS) -> Result<()> {
        let (id, ready) = self
            .handle
            .inner
            .subscribe(filter.to_owned(), qos, self.tx.clone())?;
        self.subs.push(id);
        let verdict = ready
            .await
            .unwrap_or_else(|_| Err(Error::closed(BACKEND).with_message("connection closed")));
        if verdict.is_err() {
            self.subs.retain(|s| *s != id);
        }
        verdict
    }

    /// The next delivery from any subscription. Cancel safe: a delivery is never lost by
    /// dropping the future.
    ///
    /// # Errors
    /// [`ErrorKind::Closed`](polybus_core::ErrorKind::Closed) once the connection is closed
    /// and every buffered delivery was taken; a malformed CloudEvent as
    /// [`ErrorKind::Codec`](polybus_core::ErrorKind::Codec) (that message is consumed).
    pub async fn next(&mut self) -> Result<Delivery> {
        let item = self.next_raw().await;
        item.map(|d| self.handle.inner.telemetry.delivered(d))
    }

    async fn next_raw(&mut self) -> Result<Delivery> {
        tokio::select! {
            biased;
            item = self.rx.recv() => item.unwrap_or_else(|| Err(Error::closed(BACKEND))),
            _ = self.done.wait_for(|d| *d) => match self.rx.try_recv() {
                Ok(item) => item,
                Err(_) => Err(Error::closed(BACKEND).with_message("the connection is closed")),
            },
        }
    }

    /// Ends the subscriptions this consumer made to `filter`, on the broker too (UNSUBSCRIBE),
    /// also for a persistent session. Messages already buffered stay readable.
    pub fn unsubscribe(&mut self, filter: &str) {
        let inner = &self.handle.inner;
        let ids = inner.subscription_ids(filter);
        self.subs.retain(|id| {
            let mine = ids.contains(id);
            if mine {
                inner.unsubscribe(*id, true);
            }
            !mine
        });
    }

    /// The delivery semantics of this connection (as [`MqttClient::capabilities`](crate::MqttClient::capabilities)).
    pub fn capabilities(&self) -> Capabilities {
        self.handle.inner.capabilities()
    }

    /// Closes the connection (shared with the producer). A persistent session keeps its
    /// subscriptions on the broker.
    ///
    /// # Errors
    /// As [`MqttClient::close`](crate::MqttClient::close).
    pub async fn close(&mut self) -> Result<()> {
        self.handle.inner.close(true).await
    }
}

/// Dropping the consumer ends its subscriptions: with a clean session they are unsubscribed
/// on the broker; a persistent session keeps them there (its messages wait, unacknowledged,
/// until the next consumer subscribes; use [`MqttConsumer::unsubscribe`] to end them).
impl Drop for MqttConsumer {
    fn drop(&mut self) {
        for id in self.subs.drain(..) {
            self.handle.inner.unsubscribe(id, false);
        }
    }
}

impl MessageConsumer for MqttConsumer {
    /// Subscribes with the connection's default QoS.
    fn subscribe(&mut self, topic: &str) -> impl Future<Output = Result<()>> + Send {
        let qos = self.handle.inner.cfg.default_qos;
        self.subscribe_with(topic, qos)
    }
    fn next(&mut self) -> impl Future<Output = Result<Delivery>> + Send {
        MqttConsumer::next(self)
    }
}

/// The generic [`Consumer`]: each `subscribe` is one MQTT subscription with the connection's
/// default QoS, a shared subscription `$share/<group>/<topic>` when the subscriber has a
/// group.
///
/// Semantics as for [`MqttConsumer`]. Groups are durable only with a persistent session: the
/// broker queues a group's messages for a member's session while it is away.
///
/// ```no_run
/// use futures_util::StreamExt;
/// use polybus_core::Consumer;
/// use polybus_mqtt::MqttClient;
/// # #[tokio::main] async fn main() -> anyhow::Result<()> {
/// let client = MqttClient::connect("127.0.0.1", 1883, "billing-1").await?;
/// let workers = client.subscriber(Some("billing"));
/// let mut orders = std::pin::pin!(workers.subscribe("orders/+/created"));
/// while let Some(delivery) = orders.next().await {
///     let delivery = delivery?;
///     println!("{}", delivery.topic());
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MqttSubscriber {
    handle: Arc<Handle>,
    group: Option<String>,
}

impl fmt::Debug for MqttSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSubscriber")
            .field("client_id", &self.handle.inner.cfg.client_id)
            .field("group", &self.group)
            .finish()
    }
}

impl MqttSubscriber {
    pub(crate) fn new(handle: Arc<Handle>, group: Option<String>) -> Self {
        MqttSubscriber { handle, group }
    }

    /// Subscribes to `filter` (wildcards allowed) with an explicit QoS.
    pub fn subscribe_with(&self, filter: &str, qos: QoS) -> MqttSubscription {
        let filter = match &self.group {
            Some(g) => match topic::validate_group(g) {
                Ok(()) => format!("$share/{g}/{filter}"),
                Err(e) => return MqttSubscription::failed(self.handle.clone(), e),
            },
            None => filter.to_owned(),
        };
        let (tx, rx) = channel(&self.handle);
        match self.handle.inner.subscribe(filter, qos, tx) {
            Ok((id, ready)) => MqttSubscription {
                handle: self.handle.clone(),
                id: Some(id),
                ready: Some(ready),
                rx: Some(rx),
                error: None,
            },
            Err(e) => MqttSubscription::failed(self.handle.clone(), e),
        }
    }

    /// Closes the connection (shared with everything made from the same client).
    ///
    /// # Errors
    /// As [`MqttClient::close`](crate::MqttClient::close).
    pub async fn close(&self) -> Result<()> {
        self.handle.inner.close(true).await
    }
}

impl Consumer for MqttSubscriber {
    type Stream<'a> = MqttSubscription;

    fn subscribe<'a>(&'a self, topic: &'a str) -> MqttSubscription {
        self.subscribe_with(topic, self.handle.inner.cfg.default_qos)
    }

    fn capabilities(&self) -> Capabilities {
        self.handle.inner.capabilities()
    }
}

/// The deliveries of one subscription. The SUBSCRIBE is sent when the subscription is
/// created; a refusal (or an invalid filter) is the stream's first item. Dropping the stream
/// unsubscribes with a clean session; a persistent session keeps the subscription on the
/// broker ([`unsubscribe`](Self::unsubscribe) ends it there too). Owns its connection handle,
/// so it is `'static`.
pub struct MqttSubscription {
    handle: Arc<Handle>,
    id: Option<u32>,
    ready: Option<oneshot::Receiver<Result<()>>>,
    rx: Option<mpsc::Receiver<Result<Delivery>>>,
    error: Option<Error>,
}

impl fmt::Debug for MqttSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSubscription")
            .field("id", &self.id)
            .field("subscribed", &self.ready.is_none())
            .finish()
    }
}

impl MqttSubscription {
    fn failed(handle: Arc<Handle>, error: Error) -> Self {
        MqttSubscription {
            handle,
            id: None,
            ready: None,
            rx: None,
            error: Some(error),
        }
    }
}

impl MqttSubscription {
    /// Ends the subscription, on the broker too (UNSUBSCRIBE), also for a persistent session.
    pub fn unsubscribe(mut self) {
        if let Some(id) = self.id.take() {
            self.handle.inner.unsubscribe(id, true);
        }
    }
}

impl Stream for MqttSubscription {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            this.rx = None;
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(ready) = this.ready.as_mut() {
            match Pin::new(ready).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(verdict) => {
                    this.ready = None;
                    let verdict = verdict.unwrap_or_else(|_| Err(Error::closed(BACKEND)));
                    if let Err(e) = verdict {
                        this.rx = None;
                        this.id = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
        // The delivery span is opened here, in the consumer's task, not in the connection's.
        let telemetry = &this.handle.inner.telemetry;
        match this.rx.as_mut() {
            Some(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|r| r.map(|d| telemetry.delivered(d)))),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for MqttSubscription {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.handle.inner.unsubscribe(id, false);
        }
    }
}
