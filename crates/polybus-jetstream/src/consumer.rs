//! The JetStream consumer: pull subscriptions with explicit acks, durable groups, bounded
//! in-flight, nak on drop.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{Batch, BatchError};
use async_nats::jetstream::consumer::{DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, Acker as NatsAcker, Info};
use async_nats::jetstream::stream::StorageType;
use futures_core::Stream;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use polybus_core::{
    AckFuture, Acker, Backlog, Capabilities, Consumer, Delivery, Error, ErrorKind, MessageConsumer,
    Ordering, Result, Unsettled,
};

use crate::client::JetStream;
use crate::config::JsOptions;
use crate::error::{self, BACKEND};
use crate::publisher::MSG_ID_HEADER;

/// What JetStream guarantees with the default settings (the consumer's
/// [`capabilities`](Consumer::capabilities) adapts `backlog` to the deliver policy, `persistent`
/// to the storage of created streams, and adds the server's `max_payload`):
///
/// * persistent (file storage): stored messages survive a server restart;
/// * at-least-once: `ack` settles, `nack(delay)` redelivers after the delay (`-NAK` with
///   delay), `term` stops redelivery, `in_progress` extends the ack deadline (`+WPI`); a
///   delivery dropped unsettled is nak'ed at once (fire-and-forget) and comes back, or after
///   `ack_wait` if the nak is lost;
/// * exactly-once publish: `Nats-Msg-Id` = event id, a duplicate within the stream's window
///   is stored once and reported in the receipt;
/// * consumer groups are durable pull consumers named after the group: members share the
///   messages, every group gets each one, and a group keeps its position while no member is
///   connected;
/// * order: the stream's order, for a single subscriber (redeliveries can reorder);
/// * a subscriber without a group gets the stream's backlog (`DeliverPolicy::All`).
pub const CAPABILITIES: Capabilities = Capabilities::NONE
    .with_persistent(true)
    .with_redelivery_on_nack(true)
    .with_nack_delay(true)
    .with_unsettled(Unsettled::Redelivered)
    .with_consumer_groups(true)
    .with_durable_groups(true)
    .with_ordering(Ordering::PerTopic)
    .with_backlog(Backlog::Delivered)
    .with_exactly_once_publish(true)
    .with_headers(true);

/// Receives events from JetStream through pull consumers.
///
/// * As a [`Consumer`], each `subscribe(topic)` opens a subscription on the stream covering
///   the topic (see [`StreamPolicy`](crate::StreamPolicy)): with a group, the durable pull
///   consumer named after the group; without one, an ephemeral consumer filtered to the topic.
/// * As the seed's [`MessageConsumer`], a consumer made by [`connect`](Self::connect) pulls
///   from the named durable consumer; `subscribe` adds topic subscriptions.
///
/// Deliveries must be settled: `ack`, `nack(delay)`, `term`. The server never hands out more
/// than `max_ack_pending` unsettled deliveries per consumer. A delivery dropped unsettled is
/// nak'ed; messages pulled but not yet handed out when a subscription is dropped are nak'ed
/// too, so they return quickly to the other members of the group. Acks are sent without
/// waiting for the server (like async-nats's `ack`) unless
/// [`ConsumerSettings::confirm_acks`](crate::ConsumerSettings) is set: a process about to exit
/// calls [`close`](Self::close), which drains the connection so queued acks reach the server.
/// An ack lost otherwise means a redelivery, never a lost message.
///
/// ```no_run
/// use polybus_jetstream::{JsConsumer, JsProducer};
///
/// # #[tokio::main] async fn main() -> anyhow::Result<()> {
/// let p = JsProducer::connect("nats://127.0.0.1:4222", "stream", "subject").await?;
/// let mut c = JsConsumer::connect("nats://127.0.0.1:4222", "stream", "consumer").await?;
/// p.send(b"hello").await?;
/// let msg = c.next().await?;
/// println!("delivery {} of {:?}", msg.delivery_count(), msg.sequence());
/// msg.ack().await?;
/// # Ok(()) }
/// ```
pub struct JsConsumer {
    js: JetStream,
    group: Option<String>,
    bound: Option<Mutex<JsSubscription>>,
    subscriptions: Vec<Mutex<JsSubscription>>,
    next_index: usize,
    owns_connection: bool,
}

impl JsConsumer {
    /// The seed's constructor: connects to `url` and binds the durable pull consumer
    /// `consumer` on `stream`, creating it (all subjects, default settings) if it does not
    /// exist. [`next`](MessageConsumer::next) pulls from it.
    ///
    /// # Errors
    /// Connection errors as for [`JsOptions::connect`]; `NotFound` when the stream does not
    /// exist; `InvalidTopic` for illegal names.
    pub async fn connect(url: &str, stream: &str, consumer: &str) -> Result<Self> {
        let opts = JsOptions::new(url);
        let settings = opts.consumer.clone();
        let js = opts.connect().await?;
        let pull = js
            .ensure_consumer(stream, consumer, None, &settings)
            .await?;
        let bound = JsSubscription::bound(js.clone(), pull);
        Ok(JsConsumer::new(js, None, Some(bound), true))
    }

    /// Options to connect with.
    pub fn builder(url: impl Into<String>) -> JsOptions {
        JsOptions::new(url)
    }

    pub(crate) fn new(
        js: JetStream,
        group: Option<String>,
        bound: Option<JsSubscription>,
        owns_connection: bool,
    ) -> Self {
        JsConsumer {
            js,
            group,
            bound: bound.map(Mutex::new),
            subscriptions: Vec::new(),
            next_index: 0,
            owns_connection,
        }
    }

    /// Joins the consumer group `group` (a durable pull consumer named `group` on each
    /// topic's stream) for subscriptions made afterwards.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").consumer().await?.group("billing");
    /// # Ok(()) }
    /// ```
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The next delivery, as the seed writes it (`c.next().await?`): the same as
    /// [`MessageConsumer::next`], callable without importing the trait.
    ///
    /// # Errors
    /// As for [`MessageConsumer::next`].
    pub async fn next(&mut self) -> Result<Delivery> {
        MessageConsumer::next(self).await
    }

    /// The JetStream handle (management, KV, object store) on this consumer's connection.
    pub fn jetstream(&self) -> &JetStream {
        &self.js
    }

    /// A subscription to an existing durable pull consumer, whatever its filter.
    pub fn bind(&self, pull: PullConsumer) -> JsSubscription {
        JsSubscription::bound(self.js.clone(), pull)
    }

    /// Closes the connection if this consumer made it (subscriptions end).
    ///
    /// # Errors
    /// `Timeout` when the connection did not drain in time.
    pub async fn close(&self) -> Result<()> {
        if self.owns_connection {
            self.js
                .connection()
                .close_for(self.js.options().nats.close_timeout_value(), BACKEND)
                .await?;
        }
        Ok(())
    }
}

impl fmt::Debug for JsConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsConsumer")
            .field("group", &self.group)
            .field("bound", &self.bound.is_some())
            .field("subscriptions", &self.subscriptions.len())
            .finish()
    }
}

impl Consumer for JsConsumer {
    type Stream<'a> = JsSubscription;

    fn subscribe<'a>(&'a self, topic: &'a str) -> JsSubscription {
        JsSubscription::opening(self.js.clone(), topic, self.group.clone())
    }

    fn capabilities(&self) -> Capabilities {
        let opts = self.js.options();
        let backlog = match opts.consumer.deliver_policy {
            DeliverPolicy::All | DeliverPolicy::ByStartSequence { .. } => Backlog::Delivered,
            _ => Backlog::Missed,
        };
        CAPABILITIES
            .with_backlog(backlog)
            .with_persistent(opts.stream.storage == StorageType::File)
            .with_max_payload(Some(self.js.max_payload()))
    }
}

impl MessageConsumer for JsConsumer {
    /// Opens a subscription to `topic` (creating the group's durable consumer or an ephemeral
    /// one) before returning, so nothing published afterwards is missed.
    async fn subscribe(&mut self, topic: &str) -> Result<()> {
        let consumer = open_consumer(self.js.clone(), topic.to_owned(), self.group.clone()).await?;
        let sub = JsSubscription::from_opened(self.js.clone(), consumer);
        self.subscriptions.push(Mutex::new(sub));
        Ok(())
    }

    fn next(&mut self) -> impl Future<Output = Result<Delivery>> + Send {
        std::future::poll_fn(move |cx| {
            let mut subs: Vec<&mut JsSubscription> = self
                .bound
                .iter_mut()
                .chain(self.subscriptions.iter_mut())
                .map(|m| m.get_mut().unwrap_or_else(|e| e.into_inner()))
                .collect();
            if subs.is_empty() {
                return Poll::Ready(Err(Error::closed(BACKEND).with_message(
                    "nothing to pull from: connect to a consumer or subscribe first",
                )));
            }
            let n = subs.len();
            let mut ended = 0;
            for i in 0..n {
                let idx = (self.next_index + i) % n;
                match Pin::new(&mut *subs[idx]).poll_next(cx) {
                    Poll::Ready(Some(item)) => {
                        self.next_index = idx + 1;
                        return Poll::Ready(item);
                    }
                    Poll::Ready(None) => ended += 1,
                    Poll::Pending => {}
                }
            }
            if ended == n {
                return Poll::Ready(Err(
                    Error::closed(BACKEND).with_message("every subscription ended")
                ));
            }
            Poll::Pending
        })
    }
}

/// An opened pull consumer and whether polybus made it ephemeral (to delete on drop).
struct Opened {
    pull: PullConsumer,
    ephemeral: bool,
}

async fn open_consumer(js: JetStream, topic: String, group: Option<String>) -> Result<Opened> {
    polybus_nats::validate_subscribe_subject(&topic, BACKEND)?;
    let stream = js.stream_for(&topic).await?;
    match group {
        Some(g) => {
            let settings = js.options().consumer.clone();
            let pull = js
                .ensure_consumer(&stream, &g, Some(&topic), &settings)
                .await?;
            Ok(Opened {
                pull,
                ephemeral: false,
            })
        }
        None => Ok(Opened {
            pull: js.ephemeral_consumer(&stream, &topic).await?,
            ephemeral: true,
        }),
    }
}

/// One subscription's stream of deliveries: pulls batches (`fetch_batch` messages, waiting at
/// most `fetch_expiry`) from its pull consumer and hands them out one by one. Owns what it
/// needs (`'static`).
///
/// The first item is an error if the subscription could not be opened (invalid subject, no
/// stream, refused consumer), and the stream ends; an opening that fails with `Timeout` or
/// `Connect` (no answer in time: a server gone, a cluster electing leaders) is yielded as an
/// item and tried again, with a growing pause. Later errors of a pull (a deleted consumer,
/// a server error) are yielded as items and the subscription keeps pulling, with a growing
/// pause; connection losses are waited out (the pull is repeated after the reconnect). A pull
/// request that neither delivered nor expired 2 s after its expiry (it died with the server the
/// connection was on) is given up and made again, instead of waiting out the client's own
/// 5 s safety margin.
///
/// Dropping it nak's the messages already pulled but not handed out (durable consumers), or
/// deletes the ephemeral consumer.
pub struct JsSubscription {
    js: JetStream,
    state: State,
    pull: Option<PullConsumer>,
    ephemeral: bool,
    failures: u32,
    /// Messages handed out from the active batch.
    handed: usize,
    /// The next batch, pulled while the active one is still being handed out, so the
    /// subscription does not sit idle for a round trip between batches.
    next: Next,
    /// When the active batch is given up as dead (see [`STALE_AFTER`]); set while it waits.
    stale: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The topic and group to open again after a transient failure to open.
    reopen: Option<(String, Option<String>)>,
}

/// How long after its expiry an unanswered pull request is given up. The server ends a pull at
/// its expiry; one that has not ended this long after died with the server the connection was
/// on (the server forgets a pull request whose reply subject lost its interest), and async-nats
/// would wait 5 s past the expiry before ending it.
const STALE_AFTER: Duration = Duration::from_secs(2);

/// The pull request made ahead of time.
enum Next {
    None,
    Fetching(BoxFuture<'static, Result<Batch, BatchError>>),
    Ready(Box<Batch>),
}

enum State {
    Opening(BoxFuture<'static, Result<Opened>>),
    Fetching(BoxFuture<'static, Result<Batch, BatchError>>),
    Active(Box<Batch>),
    Waiting(Pin<Box<tokio::time::Sleep>>),
    /// A pause before opening again after a `Timeout` or `Connect` error.
    Reopening(Pin<Box<tokio::time::Sleep>>),
    Failed(Option<Error>),
}

impl fmt::Debug for JsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Opening(_) => "opening",
            State::Fetching(_) => "fetching",
            State::Active(_) => "active",
            State::Waiting(_) => "waiting",
            State::Reopening(_) => "reopening",
            State::Failed(_) => "ended",
        };
        f.debug_struct("JsSubscription")
            .field("state", &state)
            .field(
                "consumer",
                &self.pull.as_ref().map(|p| p.cached_info().name.as_str()),
            )
            .field("ephemeral", &self.ephemeral)
            .finish()
    }
}

impl JsSubscription {
    fn opening(js: JetStream, topic: &str, group: Option<String>) -> Self {
        let fut = Box::pin(open_consumer(js.clone(), topic.to_owned(), group.clone()));
        JsSubscription {
            js,
            state: State::Opening(fut),
            pull: None,
            ephemeral: false,
            failures: 0,
            handed: 0,
            next: Next::None,
            stale: None,
            reopen: Some((topic.to_owned(), group)),
        }
    }

    fn from_opened(js: JetStream, opened: Opened) -> Self {
        let mut sub = JsSubscription {
            js,
            state: State::Failed(None),
            pull: Some(opened.pull),
            ephemeral: opened.ephemeral,
            failures: 0,
            handed: 0,
            next: Next::None,
            stale: None,
            reopen: None,
        };
        sub.state = sub.fetch();
        sub
    }

    fn bound(js: JetStream, pull: PullConsumer) -> Self {
        Self::from_opened(
            js,
            Opened {
                pull,
                ephemeral: false,
            },
        )
    }

    /// The name of the pull consumer, once opened.
    pub fn consumer_name(&self) -> Option<&str> {
        self.pull.as_ref().map(|p| p.cached_info().name.as_str())
    }

    fn pull_request(&self) -> Option<BoxFuture<'static, Result<Batch, BatchError>>> {
        let pull = self.pull.clone()?;
        let settings = &self.js.options().consumer;
        let (batch, expiry) = (
            settings.fetch_batch,
            crate::config::server_duration(settings.fetch_expiry),
        );
        Some(Box::pin(async move {
            pull.batch()
                .max_messages(batch)
                .expires(expiry)
                .messages()
                .await
        }))
    }

    /// The next batch: the one pulled ahead if there is one, else a new pull request.
    fn fetch(&mut self) -> State {
        self.handed = 0;
        self.stale = None;
        match std::mem::replace(&mut self.next, Next::None) {
            Next::Ready(batch) => State::Active(batch),
            Next::Fetching(fut) => State::Fetching(fut),
            Next::None => match self.pull_request() {
                Some(fut) => State::Fetching(fut),
                None => State::Failed(None),
            },
        }
    }

    /// Once half of the active batch is handed out, pulls the next one; drives that request.
    fn pull_ahead(&mut self, cx: &mut Context<'_>) {
        if matches!(self.next, Next::None)
            && self.handed * 2 >= self.js.options().consumer.fetch_batch
            && let Some(fut) = self.pull_request()
        {
            self.next = Next::Fetching(fut);
        }
        if let Next::Fetching(fut) = &mut self.next
            && let Poll::Ready(result) = fut.as_mut().poll(cx)
        {
            // A failed request ahead is dropped: the batch end pulls again as usual.
            self.next = match result {
                Ok(batch) => Next::Ready(Box::new(batch)),
                Err(_) => Next::None,
            };
        }
    }

    /// Whether the active batch has waited [`STALE_AFTER`] past its expiry (the timer starts
    /// when it first waits, after its request was sent).
    fn batch_is_stale(&mut self, cx: &mut Context<'_>) -> bool {
        let expiry = crate::config::server_duration(self.js.options().consumer.fetch_expiry);
        self.stale
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(expiry.saturating_add(STALE_AFTER))))
            .as_mut()
            .poll(cx)
            .is_ready()
    }

    /// Drops the batch pulled ahead (its request may have died too), nak'ing what it already
    /// holds.
    fn discard_next(&mut self) {
        match std::mem::replace(&mut self.next, Next::None) {
            Next::Ready(batch) => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(nak_rest(*batch, self.js.clone()));
                }
            }
            Next::Fetching(_) | Next::None => {}
        }
    }

    fn pause(&mut self) -> State {
        self.failures = self.failures.saturating_add(1);
        self.next = Next::None;
        let ms = 100u64 << self.failures.min(6);
        State::Waiting(Box::pin(tokio::time::sleep(Duration::from_millis(ms))))
    }

    fn delivery(&self, msg: async_nats::jetstream::Message) -> Result<Delivery> {
        let info = msg.info().ok();
        let (sequence, delivered) = info
            .as_ref()
            .map_or((None, 1), |i| (Some(i.stream_sequence), i.delivered));
        // The payload is reference counted: cloning it copies nothing.
        let decoded = polybus_nats::decode_event_with(
            msg.headers.as_ref(),
            msg.payload.clone(),
            BACKEND,
            |event| foreign_identity(event, info.as_ref()),
        );
        let (message, acker) = msg.split();
        let mut event = match decoded {
            Ok(event) => event,
            Err(e) => {
                // The acker drops here unsettled: the server redelivers after `ack_wait`
                // until `max_deliver`, as for any message the application cannot take.
                self.js.telemetry().decode_failed(&e);
                return Err(e);
            }
        };
        event.headers_mut().remove(MSG_ID_HEADER);
        let acker = JsAcker {
            acker: Some(acker),
            confirm: self.js.options().consumer.confirm_acks,
            js: self.js.clone(),
        };
        let mut d = Delivery::new(event, message.subject.as_str(), acker)
            .with_delivery_count(u32::try_from(delivered).unwrap_or(u32::MAX));
        if let Some(seq) = sequence {
            d = d.with_sequence(seq);
        }
        Ok(self.js.telemetry().delivered(d))
    }
}

/// Gives an event decoded from a message that was not a CloudEvent (a plain NATS publisher
/// wrote it) an identity that every delivery of the stored message shares, instead of the
/// fresh UUIDv7 and receive time of a plain event:
///
/// * id: the publisher's `Nats-Msg-Id` when it set one (the id JetStream deduplicates by, as
///   polybus's own event id is), otherwise `jetstream:<stream>:<stream sequence>`;
/// * source: `jetstream:<stream>`, since a `Nats-Msg-Id` is unique only within its stream
///   (the dedup key is source and id);
/// * time: when the stream stored the message.
///
/// Without ack metadata (a message that did not come from a JetStream consumer) the event
/// keeps the plain-event identity.
fn foreign_identity(event: &mut polybus_core::Event, info: Option<&Info<'_>>) {
    let msg_id = event
        .headers()
        .get(MSG_ID_HEADER)
        .filter(|id| !id.is_empty() && !id.chars().any(char::is_control))
        .map(str::to_owned);
    if let Some(id) = msg_id {
        event.set_id(id);
    } else if let Some(info) = info {
        event.set_id(stored_message_id(info.stream, info.stream_sequence));
    }
    if let Some(info) = info {
        event.set_source(format!("jetstream:{}", info.stream));
        event.set_time(info.published.into());
    }
}

/// The id of a foreign message stored in `stream` at sequence `seq`. Stream names hold no
/// whitespace or non-printable characters, so the id is a valid event id; a name may hold
/// `:`, but the sequence is always what follows the last one.
fn stored_message_id(stream: &str, seq: u64) -> String {
    format!("jetstream:{stream}:{seq}")
}

impl Stream for JsSubscription {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Opening(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(opened)) => {
                        this.pull = Some(opened.pull);
                        this.ephemeral = opened.ephemeral;
                        this.state = this.fetch();
                    }
                    Poll::Ready(Err(e)) => {
                        let transient = matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Connect)
                            && !this.js.connection().is_closed()
                            && this.reopen.is_some();
                        this.state = if transient {
                            tracing::warn!(error = %e, "jetstream: opening the subscription failed; retrying");
                            this.failures = this.failures.saturating_add(1);
                            let ms = 100u64 << this.failures.min(6);
                            State::Reopening(Box::pin(tokio::time::sleep(Duration::from_millis(
                                ms,
                            ))))
                        } else {
                            State::Failed(None)
                        };
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Reopening(sleep) => match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => {
                        let Some((topic, group)) = this.reopen.clone() else {
                            this.state = State::Failed(None);
                            continue;
                        };
                        this.state =
                            State::Opening(Box::pin(open_consumer(this.js.clone(), topic, group)));
                    }
                },
                State::Fetching(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(batch)) => this.state = State::Active(Box::new(batch)),
                    Poll::Ready(Err(e)) => {
                        if this.js.connection().is_closed() {
                            this.state = State::Failed(None);
                            return Poll::Ready(Some(Err(Error::closed(BACKEND)
                                .with_message("the connection is closed")
                                .with_source(e))));
                        }
                        tracing::warn!(error = %e, "jetstream: pull request failed; retrying");
                        this.state = this.pause();
                    }
                },
                State::Active(batch) => match batch.poll_next_unpin(cx) {
                    Poll::Pending => {
                        this.pull_ahead(cx);
                        if this.batch_is_stale(cx) {
                            tracing::warn!(
                                "jetstream: a pull request was neither answered nor expired; \
                                 pulling again"
                            );
                            this.discard_next();
                            this.state = this.fetch();
                            continue;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(msg))) => {
                        this.failures = 0;
                        this.handed += 1;
                        this.pull_ahead(cx);
                        return Poll::Ready(Some(this.delivery(msg)));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::warn!(error = %e, "jetstream: pull failed");
                        this.state = this.pause();
                        return Poll::Ready(Some(Err(error::boxed(e, "pulling messages"))));
                    }
                    Poll::Ready(None) => {
                        if this.js.connection().is_closed() {
                            this.state = State::Failed(None);
                            return Poll::Ready(None);
                        }
                        this.state = this.fetch();
                    }
                },
                State::Waiting(sleep) => match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => this.state = this.fetch(),
                },
                State::Failed(e) => return Poll::Ready(e.take().map(Err)),
            }
        }
    }
}

impl Drop for JsSubscription {
    fn drop(&mut self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let state = std::mem::replace(&mut self.state, State::Failed(None));
        if self.ephemeral {
            if let Some(pull) = &self.pull {
                let info = pull.cached_info();
                let (stream, name) = (info.stream_name.clone(), info.name.clone());
                let ctx = self.js.context().clone();
                handle.spawn(async move {
                    let _ = ctx.delete_consumer_from_stream(&name, &stream).await;
                });
            }
            return;
        }
        // Give back what was pulled but not handed out, so other members get it at once
        // rather than after `ack_wait`. The batch ends by itself at its expiry.
        match std::mem::replace(&mut self.next, Next::None) {
            Next::Ready(batch) => {
                handle.spawn(nak_rest(*batch, self.js.clone()));
            }
            Next::Fetching(fut) => {
                let js = self.js.clone();
                handle.spawn(async move {
                    if let Ok(batch) = fut.await {
                        nak_rest(batch, js).await;
                    }
                });
            }
            Next::None => {}
        }
        match state {
            State::Active(batch) => {
                handle.spawn(nak_rest(*batch, self.js.clone()));
            }
            State::Fetching(fut) => {
                let js = self.js.clone();
                handle.spawn(async move {
                    if let Ok(batch) = fut.await {
                        nak_rest(batch, js).await;
                    }
                });
            }
            _ => {}
        }
    }
}

/// Naks what the batch still delivers until it ends (at its expiry at the latest). `_js` keeps
/// the connection open (and flushed on its last drop) until the naks are out.
async fn nak_rest(mut batch: Batch, _js: JetStream) {
    while let Some(item) = batch.next().await {
        if let Ok(msg) = item
            && let Err(e) = msg.ack_with(AckKind::Nak(None)).await
        {
            tracing::debug!(error = %e, "jetstream: nak of an unhanded message failed");
        }
    }
}

/// Settles one JetStream delivery.
struct JsAcker {
    acker: Option<NatsAcker>,
    confirm: bool,
    /// Keeps the connection alive, and flushed when its last handle drops, until the
    /// settlement is out.
    js: JetStream,
}

impl JsAcker {
    fn settle(&mut self, kind: AckKind, what: &'static str, keep: bool) -> AckFuture<'_> {
        AckFuture::Pending(Box::pin(async move {
            let acker = self.acker.as_ref().ok_or_else(|| {
                Error::new(ErrorKind::Closed, BACKEND)
                    .with_message("the delivery is already settled")
            })?;
            let result = if self.confirm && !matches!(kind, AckKind::Progress) {
                acker.double_ack_with(kind).await
            } else {
                acker.ack_with(kind).await
            };
            result.map_err(|e| error::boxed(e, what))?;
            if !keep {
                self.acker = None;
            }
            Ok(())
        }))
    }
}

impl Acker for JsAcker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn ack(&mut self) -> AckFuture<'_> {
        self.settle(AckKind::Ack, "ack", false)
    }

    fn nack(&mut self, delay: Duration) -> AckFuture<'_> {
        let delay = (!delay.is_zero()).then_some(crate::config::server_duration(delay));
        self.settle(AckKind::Nak(delay), "nak", false)
    }

    fn term(&mut self) -> AckFuture<'_> {
        self.settle(AckKind::Term, "term", false)
    }

    fn in_progress(&mut self) -> AckFuture<'_> {
        self.settle(AckKind::Progress, "in progress", true)
    }
}

impl Drop for JsAcker {
    /// An unsettled delivery is nak'ed (fire-and-forget) so it comes back at once; if that nak
    /// is lost (no runtime, connection gone), the server redelivers after `ack_wait`.
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let js = self.js.clone();
            handle.spawn(async move {
                if let Err(e) = acker.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(error = %e, "jetstream: nak of a dropped delivery failed");
                }
                drop(js);
            });
        }
    }
}
