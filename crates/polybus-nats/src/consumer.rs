//! The core NATS consumer: subscriptions, queue groups, the seed's `subscribe` + `next`, and
//! the serving side of request-reply.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_nats::{Message, Subject, Subscriber};
use futures_core::Stream;
use futures_util::future::BoxFuture;
use polybus_core::cloudevents::Mode;
use polybus_core::telemetry::Telemetry;
use polybus_core::{
    Backlog, Capabilities, Consumer, Delivery, Error, Event, MessageConsumer, NoopAcker, Ordering,
    Result,
};

use crate::config::{NatsConnection, NatsOptions};
use crate::convert::{decode_event, encode_event};
use crate::error::{self, BACKEND};
use crate::permissions::Op;
use crate::publisher::check_size;
use crate::subject::validate_subscribe_subject;

/// What core NATS guarantees (the `max_payload` comes from the server at run time, see
/// [`Consumer::capabilities`]):
///
/// * not persistent: a message nobody is subscribed to is gone, a late subscriber misses what
///   was published before ([`Backlog::Missed`]);
/// * at-most-once: `ack` and `term` succeed and do nothing, `nack` is `Unsupported`, a delivery
///   dropped unsettled is not redelivered;
/// * consumer groups are NATS queue groups: every group gets each message, one member per group
///   receives it; a group keeps nothing while it has no member (not durable);
/// * order: messages from one publisher on one subject arrive in publish order;
/// * headers travel (CloudEvents binary mode); request-reply is available.
pub const CAPABILITIES: Capabilities = Capabilities::NONE
    .with_consumer_groups(true)
    .with_ordering(Ordering::PerTopic)
    .with_backlog(Backlog::Missed)
    .with_headers(true)
    .with_request_reply(true);

/// Receives events from NATS subjects, optionally in a queue group.
///
/// As a [`Consumer`], each `subscribe` opens its own subscription (wildcards allowed); as the
/// seed's [`MessageConsumer`], `subscribe` adds a subscription and `next` takes deliveries
/// from all of them. Deliveries are final on arrival (at-most-once, see [`CAPABILITIES`]).
/// Subscriptions survive reconnects: the client subscribes again and the stream goes on
/// (messages published while disconnected are lost, as core NATS does).
///
/// ```no_run
/// use polybus_core::mq::{MessageConsumer, MessageProducer};
/// use polybus_nats::{NatsConsumer, NatsProducer};
///
/// # #[tokio::main] async fn main() -> anyhow::Result<()> {
/// let url = "nats://127.0.0.1:4222";
/// let prod = NatsProducer::connect(url).await?;
/// let mut cons = NatsConsumer::connect(url).await?;
/// cons.subscribe("t").await?;
/// prod.send("t", b"hello").await?;
/// let msg = cons.next().await?;
/// assert_eq!(msg.payload(), b"hello");
/// # Ok(()) }
/// ```
pub struct NatsConsumer {
    conn: NatsConnection,
    group: Option<String>,
    source: Option<Cow<'static, str>>,
    mode: Mode,
    close_timeout: std::time::Duration,
    subscriptions: Vec<(String, Subscriber)>,
    next_index: usize,
    telemetry: Telemetry,
    last_topic: Option<Arc<str>>,
}

impl NatsConsumer {
    /// Connects to `url` with default [`NatsOptions`].
    ///
    /// # Errors
    /// See [`NatsOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        NatsOptions::new(url).consumer().await
    }

    /// Options to connect with (credentials, TLS, queue group, ...).
    pub fn builder(url: impl Into<String>) -> NatsOptions {
        NatsOptions::new(url)
    }

    /// A consumer on an existing connection.
    pub fn from_connection(conn: NatsConnection) -> Self {
        Self::from_parts(conn, &NatsOptions::new(""))
    }

    pub(crate) fn from_parts(conn: NatsConnection, opts: &NatsOptions) -> Self {
        NatsConsumer {
            conn,
            group: opts.queue_group.clone(),
            source: opts.source.clone(),
            mode: opts.mode,
            close_timeout: opts.close_timeout,
            subscriptions: Vec::new(),
            next_index: 0,
            telemetry: Telemetry::new(BACKEND),
            last_topic: None,
        }
    }

    /// Joins the queue group `group`: every group receives each message once, shared among
    /// its members. Applies to subscriptions made afterwards.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _workers = polybus_nats::NatsConsumer::connect("nats://127.0.0.1:4222")
    ///     .await?
    ///     .queue_group("workers");
    /// # Ok(()) }
    /// ```
    pub fn queue_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The queue group, if any.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The connection (counters, the raw client).
    pub fn connection(&self) -> &NatsConnection {
        &self.conn
    }

    /// Messages dropped so far because a subscription of this connection was too slow (its
    /// buffer was full), a lower bound: see [`NatsConnection::slow_consumer_drops`].
    pub fn slow_consumer_drops(&self) -> u64 {
        self.conn.slow_consumer_drops()
    }

    /// Serves requests on `subject` (in the consumer's queue group, if any): a stream of
    /// [`NatsRequest`]s to answer with [`NatsRequest::respond`].
    ///
    /// ```no_run
    /// use futures_util::StreamExt;
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// # let cons = polybus_nats::NatsConsumer::connect("nats://127.0.0.1:4222").await?;
    /// let mut requests = std::pin::pin!(cons.serve("time.now"));
    /// while let Some(req) = requests.next().await {
    ///     let req = req?;
    ///     req.respond(polybus_core::Event::new(b"12:00")).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn serve(&self, subject: &str) -> NatsRequests {
        NatsRequests {
            inner: self.open(subject),
            conn: self.conn.clone(),
            source: self.source.clone(),
            mode: self.mode,
        }
    }

    /// Closes the connection: subscriptions receive what is in flight, then end.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`](polybus_core::ErrorKind::Timeout) when the connection did not
    /// drain within the close timeout.
    pub async fn close(&self) -> Result<()> {
        self.conn.close_for(self.close_timeout, BACKEND).await
    }

    fn open(&self, subject: &str) -> NatsSubscription {
        if let Err(e) = validate_subscribe_subject(subject, BACKEND) {
            return NatsSubscription {
                state: State::Failed(Some(e)),
                telemetry: self.telemetry.clone(),
                last_topic: None,
            };
        }
        let conn = self.conn.clone();
        let subject = subject.to_owned();
        let group = self.group.clone();
        NatsSubscription {
            state: State::Subscribing(Box::pin(
                async move { subscribe(&conn, subject, group).await },
            )),
            telemetry: self.telemetry.clone(),
            last_topic: None,
        }
    }
}

impl fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("group", &self.group)
            .field(
                "subscriptions",
                &self
                    .subscriptions
                    .iter()
                    .map(|(s, _)| s)
                    .collect::<Vec<_>>(),
            )
            .field("slow_consumer_drops", &self.slow_consumer_drops())
            .finish()
    }
}

/// Subscribes and waits until the server has registered the subscription, so a message
/// published afterwards (from any connection) reaches it.
async fn subscribe(
    conn: &NatsConnection,
    subject: String,
    group: Option<String>,
) -> Result<Subscriber> {
    let since = conn.violation_mark();
    let sub = match group {
        Some(g) => conn.client.queue_subscribe(subject.clone(), g).await,
        None => conn.client.subscribe(subject.clone()).await,
    }
    .map_err(|e| error::subscribe(e, BACKEND))?;
    // The round trip makes sure the server has the subscription, and that a permission
    // violation it sent for it has arrived: a refused subscription fails here, `Unauthorized`.
    conn.confirm(Op::Subscribe, &subject, since, BACKEND)
        .await?;
    Ok(sub)
}

/// Decodes `msg` into a delivery with its span and metrics (a decode failure is counted).
/// `last_topic` is the subject of the subscription's previous message: a delivery on the
/// same subject shares it instead of copying it.
#[inline]
fn delivery(
    msg: Message,
    telemetry: &Telemetry,
    last_topic: &mut Option<Arc<str>>,
) -> Result<Delivery> {
    let topic = match last_topic {
        Some(t) if **t == *msg.subject.as_str() => t.clone(),
        _ => {
            let t: Arc<str> = Arc::from(msg.subject.as_str());
            *last_topic = Some(t.clone());
            t
        }
    };
    match decode_event(msg.headers.as_ref(), msg.payload, BACKEND) {
        Ok(event) => {
            let mut d = Delivery::new(event, topic, NoopAcker(BACKEND));
            // A request: the requester waits on this subject (an allocation only for requests).
            if let Some(reply) = msg.reply {
                d = d.with_reply_to(reply.as_str());
            }
            Ok(telemetry.delivered(d))
        }
        Err(e) => {
            telemetry.decode_failed(&e);
            Err(e)
        }
    }
}

impl Consumer for NatsConsumer {
    type Stream<'a> = NatsSubscription;

    fn subscribe<'a>(&'a self, topic: &'a str) -> NatsSubscription {
        self.open(topic)
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES.with_max_payload(Some(self.conn.max_payload()))
    }
}

impl MessageConsumer for NatsConsumer {
    async fn subscribe(&mut self, topic: &str) -> Result<()> {
        validate_subscribe_subject(topic, BACKEND)?;
        let sub = subscribe(&self.conn, topic.to_owned(), self.group.clone()).await?;
        self.subscriptions.push((topic.to_owned(), sub));
        Ok(())
    }

    fn next(&mut self) -> impl Future<Output = Result<Delivery>> + Send {
        std::future::poll_fn(move |cx| {
            loop {
                if self.subscriptions.is_empty() {
                    return Poll::Ready(Err(
                        Error::closed(BACKEND).with_message("no open subscription")
                    ));
                }
                // Round-robin so one busy subject cannot starve the others.
                let n = self.subscriptions.len();
                let mut ended = None;
                for i in 0..n {
                    let idx = (self.next_index + i) % n;
                    match Pin::new(&mut self.subscriptions[idx].1).poll_next(cx) {
                        Poll::Ready(Some(msg)) => {
                            self.next_index = idx + 1;
                            return Poll::Ready(delivery(
                                msg,
                                &self.telemetry,
                                &mut self.last_topic,
                            ));
                        }
                        Poll::Ready(None) => {
                            ended = Some(idx);
                            break;
                        }
                        Poll::Pending => {}
                    }
                }
                match ended {
                    Some(idx) => {
                        self.subscriptions.swap_remove(idx);
                    }
                    None => return Poll::Pending,
                }
            }
        })
    }
}

/// One subscription's stream of deliveries. Owns its subscription (`'static`); dropping it
/// unsubscribes. The first item is an error if subscribing failed (invalid subject, closed
/// connection); a message that cannot be decoded yields a `Codec` error and the stream goes
/// on.
pub struct NatsSubscription {
    state: State,
    telemetry: Telemetry,
    last_topic: Option<Arc<str>>,
}

enum State {
    Subscribing(BoxFuture<'static, Result<Subscriber>>),
    Active(Subscriber),
    Failed(Option<Error>),
}

impl fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Subscribing(_) => "subscribing",
            State::Active(_) => "active",
            State::Failed(_) => "ended",
        };
        f.debug_struct("NatsSubscription")
            .field("state", &state)
            .finish()
    }
}

impl NatsSubscription {
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        loop {
            match &mut self.state {
                State::Subscribing(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(sub)) => self.state = State::Active(sub),
                    Poll::Ready(Err(e)) => self.state = State::Failed(Some(e)),
                },
                State::Active(sub) => return Pin::new(sub).poll_next(cx).map(|m| m.map(Ok)),
                State::Failed(e) => return Poll::Ready(e.take().map(Err)),
            }
        }
    }
}

impl Stream for NatsSubscription {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let polled = this.poll_message(cx);
        polled.map(|m| {
            m.map(|r| r.and_then(|msg| delivery(msg, &this.telemetry, &mut this.last_topic)))
        })
    }
}

/// Requests received by [`NatsConsumer::serve`].
pub struct NatsRequests {
    inner: NatsSubscription,
    conn: NatsConnection,
    source: Option<Cow<'static, str>>,
    mode: Mode,
}

impl fmt::Debug for NatsRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsRequests")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Stream for NatsRequests {
    type Item = Result<NatsRequest>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.inner.poll_message(cx).map(|m| {
            m.map(|r| {
                let msg = r?;
                let event = decode_event(msg.headers.as_ref(), msg.payload, BACKEND)?;
                Ok(NatsRequest {
                    event,
                    subject: msg.subject,
                    reply: msg.reply,
                    conn: this.conn.clone(),
                    source: this.source.clone(),
                    mode: this.mode,
                })
            })
        })
    }
}

/// One request to answer.
pub struct NatsRequest {
    event: Event,
    subject: Subject,
    reply: Option<Subject>,
    conn: NatsConnection,
    source: Option<Cow<'static, str>>,
    mode: Mode,
}

impl fmt::Debug for NatsRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsRequest")
            .field("subject", &self.subject)
            .field("reply", &self.reply)
            .field("event", &self.event)
            .finish()
    }
}

impl NatsRequest {
    /// The request event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The subject the request was sent to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Whether the sender waits for a reply (a plain publish has none).
    pub fn expects_reply(&self) -> bool {
        self.reply.is_some()
    }

    /// Sends `reply` to the requester.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](polybus_core::ErrorKind::Unsupported) when the message has
    /// no reply subject; otherwise as for a publish.
    pub async fn respond(self, mut reply: Event) -> Result<()> {
        let Some(to) = self.reply else {
            return Err(Error::unsupported(
                BACKEND,
                "the message has no reply subject: it was published, not requested",
            ));
        };
        reply.validate()?;
        if let Some(src) = &self.source {
            reply.set_source_if_unset(src);
        }
        let (headers, payload) = encode_event(&reply, self.mode, BACKEND)?;
        check_size(&self.conn, &headers, payload.len(), BACKEND)?;
        self.conn
            .client
            .publish_with_headers(to, headers, payload)
            .await
            .map_err(|e| error::publish(e, BACKEND))?;
        self.conn
            .client
            .flush()
            .await
            .map_err(|e| error::flush(e, BACKEND))
    }
}
