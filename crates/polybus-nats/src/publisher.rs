//! The core NATS publisher: at-most-once publish, request-reply.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use async_nats::message::OutboundMessage;
use async_nats::{Client, HeaderMap, PublishError, Subject};
use bytes::Bytes;
use futures_util::FutureExt as _;
use polybus_core::telemetry::{PublishScope, Telemetry};
use polybus_core::{Error, Event, Publisher, Receipt, Result};
use tokio::sync::Notify;

use crate::config::{NatsConnection, NatsOptions};
use crate::convert::{Encoder, decode_event};
use crate::error::{self, BACKEND};
use crate::permissions::Op;
use crate::subject::SubjectCache;

/// Publishes events to NATS subjects (core NATS, at-most-once).
///
/// `publish` resolves once the message is queued in the client; `flush` waits until it is
/// written to the server; `close` flushes, drains and closes the connection, losing no buffered
/// publish. While the server is unreachable, publishes are buffered by the client and sent after
/// the reconnect. Core NATS stores nothing: a message published while no subscriber listens is
/// gone.
///
/// Clones share the connection and the closed state. Dropping the last clone without
/// `close` flushes in a background task.
///
/// ```no_run
/// use polybus_core::mq::MessageProducer; // the seed's `send`
/// use polybus_core::{Event, Publisher};
/// use polybus_nats::NatsProducer;
///
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let prod = NatsProducer::connect("nats://127.0.0.1:4222").await?;
/// prod.send("t", b"hello").await?;
/// prod.publish("orders.created", Event::builder().kind("order.created").build()?).await?;
/// prod.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct NatsProducer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: NatsConnection,
    source: Option<Cow<'static, str>>,
    encoder: Encoder,
    request_timeout: Option<Duration>,
    close_timeout: Duration,
    gate: Gate,
    owns_connection: bool,
    telemetry: Telemetry,
    check_permissions: bool,
    subjects: SubjectCache,
}

impl Drop for Inner {
    /// Dropping the last clone without `close` still sends what is buffered: a background
    /// task flushes (and, when the producer made its own connection, drains and closes it).
    /// It needs a Tokio runtime; without one, buffered messages may be lost: call `close`.
    fn drop(&mut self) {
        if self.gate.is_closed() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("nats: producer dropped outside a runtime without close");
            return;
        };
        let client = self.conn.client.clone();
        let owned = self.owns_connection;
        let timeout = self.close_timeout;
        handle.spawn(async move {
            let _ = tokio::time::timeout(timeout, client.flush()).await;
            if owned {
                let _ = client.drain().await;
            }
        });
    }
}

impl NatsProducer {
    /// Connects to `url` with default [`NatsOptions`].
    ///
    /// # Errors
    /// See [`NatsOptions::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        NatsOptions::new(url).producer().await
    }

    /// Options to connect with (credentials, TLS, CloudEvents mode, ...).
    pub fn builder(url: impl Into<String>) -> NatsOptions {
        NatsOptions::new(url)
    }

    /// A producer on an existing connection, with default options. `close` closes that
    /// connection.
    pub fn from_connection(conn: NatsConnection) -> Self {
        Self::from_parts(conn, &NatsOptions::new(""), false)
    }

    pub(crate) fn from_parts(
        conn: NatsConnection,
        opts: &NatsOptions,
        owns_connection: bool,
    ) -> Self {
        NatsProducer {
            inner: Arc::new(Inner {
                conn,
                source: opts.source.clone(),
                encoder: Encoder::with_format(opts.mode, opts.wire_format),
                request_timeout: opts.request_timeout,
                close_timeout: opts.close_timeout,
                gate: Gate::default(),
                owns_connection,
                telemetry: Telemetry::new(BACKEND).with_trace_policy(opts.trace_policy),
                check_permissions: opts.check_publish_permissions,
                subjects: SubjectCache::default(),
            }),
        }
    }

    /// The connection (counters, the raw client).
    pub fn connection(&self) -> &NatsConnection {
        &self.inner.conn
    }

    /// Sends `event` as a request on `subject` and waits for the reply, at most the configured
    /// request timeout.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`](polybus_core::ErrorKind::Timeout) when no reply arrives in time;
    /// [`ErrorKind::NotFound`](polybus_core::ErrorKind::NotFound) when nobody serves the
    /// subject (the server's "no responders"); `InvalidTopic`, `PayloadTooLarge`, `Closed` as
    /// for `publish`; `Codec` when the reply cannot be decoded.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// # let prod = polybus_nats::NatsProducer::connect("nats://127.0.0.1:4222").await?;
    /// let reply = prod.request("time.now", polybus_core::Event::new(b"?")).await?;
    /// println!("{:?}", reply.data());
    /// # Ok(()) }
    /// ```
    pub async fn request(&self, subject: &str, event: Event) -> Result<Event> {
        self.request_with_timeout(subject, event, self.inner.request_timeout)
            .await
    }

    /// [`request`](Self::request) with its own timeout (`None`: wait forever).
    ///
    /// # Errors
    /// As for [`request`](Self::request).
    pub async fn request_with_timeout(
        &self,
        subject: &str,
        event: Event,
        timeout: Option<Duration>,
    ) -> Result<Event> {
        let _guard = self.inner.gate.enter()?;
        let mut event = event;
        // A request is a publish with a reply: the same span, trace context and metrics.
        let scope = self.inner.telemetry.publish(subject, &mut event);
        let mut reply = None;
        let sent = scope
            .run(async {
                let (topic, subj, headers, payload) = self.prepare(subject, event)?;
                let request = async_nats::Request::new()
                    .headers(headers)
                    .payload(payload)
                    .timeout(timeout);
                let message = self
                    .inner
                    .conn
                    .client
                    .send_request(subj, request)
                    .await
                    .map_err(|e| error::request(e, BACKEND))?;
                reply = Some(message);
                Ok(Receipt::new(topic))
            })
            .await;
        sent?;
        let reply = reply.ok_or_else(|| Error::closed(BACKEND).with_message("no reply"))?;
        decode_event(reply.headers.as_ref(), reply.payload, BACKEND)
    }

    /// Checks and encodes a publish: the subject (validated once per subject), the event,
    /// the size against the server's limit.
    fn prepare(&self, subject: &str, mut event: Event) -> Result<Prepared> {
        let (topic, subj) = self.inner.subjects.get(subject, BACKEND)?;
        self.inner.conn.earlier_publish_refused(subject, BACKEND)?;
        if !self.inner.encoder.wire_format().is_lean() {
            // The lean format writes no id, source or type: nothing to check or default.
            event.validate()?;
            if let Some(src) = &self.inner.source {
                event.set_source_if_unset(src);
            }
        } else if event.content_type().is_some() {
            event.validate()?;
        }
        let (headers, payload) = self.inner.encoder.encode_owned(event, BACKEND)?;
        check_size(&self.inner.conn, &headers, payload.len(), BACKEND)?;
        Ok((topic, subj, headers, payload))
    }

    /// Checks and encodes the event when `publish` is called and returns one hand-written
    /// future ([`PublishFuture`]) holding the message, the telemetry scope and, once polled,
    /// the client's send: no layers of combinators, each of which would move the whole state
    /// once more per publish.
    #[inline]
    fn publish_event<'a, 's>(
        &'a self,
        subject: &'s str,
        mut event: Event,
    ) -> PublishFuture<'a, 's, impl MakeSend<'a, Fut: Send> + Send> {
        let scope = self.inner.telemetry.publish(subject, &mut event);
        let (message, topic, error) = match self.prepare(subject, event) {
            Ok((topic, subject, headers, payload)) => {
                let message = OutboundMessage {
                    subject,
                    reply: None,
                    payload,
                    headers: (!headers.is_empty()).then_some(headers),
                };
                (Some(message), Some(topic), None)
            }
            Err(e) => (None, None, Some(e)),
        };
        PublishFuture {
            inner: &self.inner,
            subject,
            make: send,
            message,
            send: None,
            guard: None,
            topic,
            error,
            scope: Some(scope),
            since: None,
            confirm: None,
        }
    }
}

/// The client's send of one message (`headers: None`: a plain `PUB`, as a payload-only client
/// sends, for the lean format of an event without headers, key or content type).
#[inline(always)]
fn send(
    client: &Client,
    message: OutboundMessage,
) -> impl Future<Output = std::result::Result<(), PublishError>> + Send + '_ {
    async_nats::client::traits::Publisher::publish_message(client, message)
}

/// A message ready to send.
type Message = OutboundMessage;

/// Makes the client's send future (implemented by [`send`]; a trait so that the future's
/// type, which has no name, can be a field of [`PublishFuture`]).
trait MakeSend<'a> {
    type Fut: Future<Output = std::result::Result<(), PublishError>>;
    fn make(&self, client: &'a Client, message: Message) -> Self::Fut;
}

impl<'a, M, F> MakeSend<'a> for M
where
    M: Fn(&'a Client, Message) -> F,
    F: Future<Output = std::result::Result<(), PublishError>>,
{
    type Fut = F;
    #[inline(always)]
    fn make(&self, client: &'a Client, message: Message) -> F {
        self(client, message)
    }
}

pin_project_lite::pin_project! {
    /// One core NATS publish: enters the producer's gate when first polled (so `close` waits
    /// for it), makes and runs the client's send inside the publish span, records the outcome
    /// and, with publish permissions checked, waits for the server's verdict.
    struct PublishFuture<'a, 's, M: MakeSend<'a>> {
        inner: &'a Inner,
        subject: &'s str,
        make: M,
        message: Option<Message>,
        // Made on the first poll, in place: the future returned by `publish` stays small
        // until then and is not copied with the client's future inside.
        #[pin]
        send: Option<M::Fut>,
        guard: Option<GateGuard<'a>>,
        topic: Option<Arc<str>>,
        error: Option<Error>,
        scope: Option<PublishScope<'a>>,
        // Set when publish permissions are checked: the violation mark before the publish.
        since: Option<u64>,
        confirm: Option<futures_util::future::BoxFuture<'a, Result<()>>>,
    }
}

impl<'a, M: MakeSend<'a>> Future for PublishFuture<'a, '_, M> {
    type Output = Result<Receipt>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Receipt>> {
        let mut this = self.project();
        if let Some(confirm) = this.confirm.as_mut() {
            let confirmed = std::task::ready!(confirm.as_mut().poll(cx));
            *this.confirm = None;
            return Poll::Ready(confirmed.and_then(|()| receipt(this.topic.take())));
        }
        let inner = *this.inner;
        let result = if this.guard.is_none()
            && let Err(e) = inner.gate.enter().map(|g| *this.guard = Some(g))
        {
            Err(e)
        } else if let Some(e) = this.error.take() {
            Err(e)
        } else {
            if let Some(message) = this.message.take() {
                this.send
                    .set(Some(this.make.make(&inner.conn.client, message)));
            }
            let Some(send) = this.send.as_mut().as_pin_mut() else {
                return Poll::Ready(Err(polled_again()));
            };
            let polled = {
                let _entered = this.scope.as_ref().map(|s| s.span().enter());
                send.poll(cx)
            };
            let Poll::Ready(sent) = polled else {
                return Poll::Pending;
            };
            this.send.set(None);
            sent.map_err(|e| error::publish(e, BACKEND))
        };
        *this.guard = None;
        let result = result.and_then(|()| {
            if this.since.is_some() {
                // Checked below: the topic is kept for the receipt after the server's verdict.
                receipt(this.topic.clone())
            } else {
                receipt(this.topic.take())
            }
        });
        if let Some(scope) = this.scope.take() {
            scope.finish(&result);
        }
        match (result, *this.since) {
            (Ok(_), Some(since)) => {
                // The rare path (a server with authentication, permissions checked): boxed,
                // with its own copy of the subject.
                let (conn, subject) = (&inner.conn, this.subject.to_owned());
                let confirm = this.confirm.insert(
                    async move { conn.confirm(Op::Publish, &subject, since, BACKEND).await }
                        .boxed(),
                );
                let confirmed = std::task::ready!(confirm.as_mut().poll(cx));
                *this.confirm = None;
                Poll::Ready(confirmed.and_then(|()| receipt(this.topic.take())))
            }
            (result, _) => Poll::Ready(result),
        }
    }
}

fn receipt(topic: Option<Arc<str>>) -> Result<Receipt> {
    topic.map(Receipt::new).ok_or_else(polled_again)
}

fn polled_again() -> Error {
    Error::closed(BACKEND).with_message("publish future polled after it completed")
}

impl Publisher for NatsProducer {
    /// One hand-written future (no layers of combinators) for every publish; with publish
    /// permissions checked it also waits for the server's verdict (a boxed round trip).
    #[inline]
    fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send {
        let mut publish = self.publish_event(topic, event);
        if self.inner.check_permissions {
            publish.since = Some(self.inner.conn.violation_mark());
        }
        publish
    }

    /// Writes what is buffered to the server. When the server requires authentication, also
    /// makes a round trip through it and fails with `Unauthorized` if it refused a publish
    /// since the last report (core NATS answers refused publishes only asynchronously).
    async fn flush(&self) -> Result<()> {
        if self.inner.gate.is_closed() {
            return Ok(());
        }
        self.inner
            .conn
            .flush_for(self.inner.close_timeout, BACKEND)
            .await?;
        if self.inner.conn.auth_required() {
            self.inner.conn.confirm_publishes(BACKEND).await?;
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.inner.gate.close().await {
            self.inner
                .conn
                .close_for(self.inner.close_timeout, BACKEND)
                .await?;
        }
        Ok(())
    }
}

/// A publish checked and encoded: the subject's shared name, the subject, headers, payload.
type Prepared = (Arc<str>, Subject, HeaderMap, Bytes);

/// Rejects a message whose payload and headers exceed the server's `max_payload` (from its
/// `INFO`), before anything is sent.
pub fn check_size(
    conn: &NatsConnection,
    headers: &HeaderMap,
    payload_len: usize,
    backend: &'static str,
) -> Result<()> {
    let max = conn.max_payload();
    let size = payload_len + header_wire_len(headers);
    if size > max {
        return Err(error::payload_too_large(backend, size, max));
    }
    Ok(())
}

/// The bytes `headers` take on the wire (`NATS/1.0\r\n`, one `name: value\r\n` per value, a
/// closing `\r\n`), as the server counts them against `max_payload`.
fn header_wire_len(headers: &HeaderMap) -> usize {
    if headers.is_empty() {
        return 0;
    }
    let mut len = "NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for v in values {
            len += name.len() + 2 + v.as_str().len() + 2;
        }
    }
    len
}

/// Lets publishes in flight finish before `close` flushes: `enter` fails once closing began,
/// and `close` waits until every entered publish has handed its message to the client.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    closed: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

pub(crate) struct GateGuard<'a>(&'a Gate);

impl Gate {
    pub(crate) fn enter(&self) -> Result<GateGuard<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = GateGuard(self);
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::closed(BACKEND).with_message("the producer is closed"));
        }
        Ok(guard)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Marks the gate closed and waits for publishes in flight. Returns whether this call
    /// closed it (false if it was already closed).
    pub(crate) async fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::SeqCst);
        loop {
            let notified = self.idle.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return first;
            }
            notified.await;
        }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.closed.load(Ordering::SeqCst)
        {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gate_waits_for_publishes_in_flight() {
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let held = tokio::spawn(async move {
            let _guard = g.enter().unwrap();
            let _ = rx.await;
        });
        tokio::task::yield_now().await;
        let g = gate.clone();
        let closer = tokio::spawn(async move { g.close().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !closer.is_finished(),
            "close must wait for the publish in flight"
        );
        assert!(gate.enter().is_err(), "no new publish once closing");
        tx.send(()).unwrap();
        held.await.unwrap();
        assert!(closer.await.unwrap(), "first close");
        assert!(!gate.close().await, "second close");
    }

    #[test]
    fn header_wire_len_counts_every_value() {
        let mut h = HeaderMap::new();
        assert_eq!(header_wire_len(&h), 0);
        h.append("A", "1");
        h.append("A", "22");
        assert_eq!(header_wire_len(&h), 12 + (1 + 2 + 1 + 2) + (1 + 2 + 2 + 2));
    }
}
