//! The core NATS publisher: at-most-once publish, request-reply.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use polybus_core::telemetry::Telemetry;
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

    /// Not an `async fn`: the telemetry scope wraps the publish future directly, so the
    /// future every publish returns holds it once. The event is checked and encoded here,
    /// when the publish is called, so the future holds the message, not the event and the
    /// subject as well (an `async fn` keeps its arguments for its whole life: the future was
    /// 1 928 bytes, copied several times per publish on its way to the caller's `.await`).
    fn publish_event(
        &self,
        subject: &str,
        mut event: Event,
    ) -> impl Future<Output = Result<Receipt>> + Send + use<'_> {
        let scope = self.inner.telemetry.publish(subject, &mut event);
        let prepared = self.prepare(subject, event);
        scope.run(self.send_prepared(prepared))
    }

    async fn send_prepared(&self, prepared: Result<Prepared>) -> Result<Receipt> {
        let _guard = self.inner.gate.enter()?;
        let (topic, subj, headers, payload) = prepared?;
        let client = &self.inner.conn.client;
        // The lean format of an event without headers, key or content type has no headers:
        // a plain `PUB`, as a payload-only client sends.
        let sent = if headers.is_empty() {
            client.publish(subj, payload).await
        } else {
            client.publish_with_headers(subj, headers, payload).await
        };
        sent.map_err(|e| error::publish(e, BACKEND))?;
        Ok(Receipt::new(topic))
    }
}

impl Publisher for NatsProducer {
    /// Not an `async fn`: without the permission check, the publish future is
    /// `publish_event`'s own, not wrapped in another state machine that would copy it (every
    /// layer of futures moves the whole state once more per publish).
    fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send {
        use futures_util::future::Either;
        if !self.inner.check_permissions {
            return Either::Left(self.publish_event(topic, event));
        }
        // Boxed: the checked publish is the rarer one, and should not make every publish
        // future as large as itself.
        Either::Right(Box::pin(async move {
            let since = self.inner.conn.violation_mark();
            let receipt = self.publish_event(topic, event).await?;
            self.inner
                .conn
                .confirm(Op::Publish, topic, since, BACKEND)
                .await?;
            Ok(receipt)
        }))
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
