//! The JetStream publisher: at-least-once publish acknowledged by the stream, deduplicated by
//! `Nats-Msg-Id`.

use std::collections::HashSet;
use std::future::{Future, IntoFuture as _};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::{HeaderMap, HeaderName, HeaderValue, Subject};
use bytes::Bytes;
use polybus_core::telemetry::Telemetry;
use polybus_core::{Error, ErrorKind, Event, IntoPayload, Publisher, Receipt, Result};
use tokio::sync::Notify;

use crate::client::{JetStream, subject_matches};
use crate::config::{JsOptions, StreamPolicy};
use crate::error::{self, BACKEND};

/// The header JetStream deduplicates publishes by.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Publishes events to JetStream streams.
///
/// `publish` resolves when the stream has stored the event and returns a [`Receipt`] with the
/// stream sequence. The event id travels as `Nats-Msg-Id`, so publishing the same event again
/// within the stream's duplicate window stores it once: the receipt then says
/// [`is_duplicate`](Receipt::is_duplicate) and carries the sequence of the stored copy.
///
/// Topics are subjects; a stream must cover them (see [`StreamPolicy`]). The seed's
/// constructor [`connect`](Self::connect) binds a default subject for [`send`](Self::send).
///
/// ```no_run
/// use polybus_core::{Event, Publisher};
/// use polybus_jetstream::JsProducer;
///
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let p = JsProducer::connect("nats://127.0.0.1:4222", "stream", "subject").await?;
/// let receipt = p.send(b"hello").await?;
/// println!("stored at {:?}", receipt.sequence());
/// let ev = Event::new(b"once");
/// p.publish("subject", ev.clone()).await?;
/// assert!(p.publish("subject", ev).await?.is_duplicate());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct JsProducer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    js: JetStream,
    subject: Option<String>,
    owns_connection: bool,
    /// Topics known to be covered by a stream (only tracked under `StreamPolicy::PerTopic`).
    ensured: Mutex<HashSet<String>>,
    gate: Gate,
    /// Reuses the constant CloudEvents headers from one event to the next.
    encoder: polybus_nats::Encoder,
    subjects: polybus_nats::SubjectCache,
    /// The connection's telemetry with the trace policy of these options.
    telemetry: Telemetry,
    /// Whether publishes carry `Nats-Msg-Id`.
    msg_id: bool,
    /// Whether the server is part of a cluster (its INFO names one): there "no responders"
    /// may mean a stream between leaders, and the publish is sent again.
    clustered: bool,
}

impl JsProducer {
    /// The seed's constructor: connects to `url`, creates the stream `stream` with the subject
    /// `subject` (or binds to it if it exists and covers the subject), and makes `subject` the
    /// target of [`send`](Self::send).
    ///
    /// # Errors
    /// Connection errors as for [`JsOptions::connect`]; `Rejected` when the stream exists and
    /// does not cover `subject`; `InvalidTopic` for an illegal stream name or subject.
    pub async fn connect(url: &str, stream: &str, subject: &str) -> Result<Self> {
        let opts = JsOptions::new(url);
        let settings = opts.stream.clone();
        let js = opts.connect().await?;
        polybus_nats::validate_publish_subject(subject, BACKEND)?;
        let info = js.ensure_stream(stream, &[subject], &settings).await?;
        if !info
            .config
            .subjects
            .iter()
            .any(|p| subject_matches(p, subject))
        {
            return Err(
                Error::new(ErrorKind::Rejected, BACKEND).with_message(format!(
                    "stream {stream:?} exists with subjects {:?}, which do not cover {subject:?}",
                    info.config.subjects
                )),
            );
        }
        Ok(js.into_producer(Some(subject.to_owned()), true))
    }

    /// Options to connect with.
    pub fn builder(url: impl Into<String>) -> JsOptions {
        JsOptions::new(url)
    }

    pub(crate) fn new(js: JetStream, subject: Option<String>, owns_connection: bool) -> Self {
        let opts = js.options();
        let encoder = polybus_nats::Encoder::with_format(
            opts.nats.content_mode(),
            opts.nats.wire_format_value(),
        );
        let telemetry = js
            .telemetry()
            .clone()
            .with_trace_policy(opts.nats.trace_policy_value());
        let msg_id = opts.msg_id_value();
        let clustered = js.connection().client().server_info().cluster.is_some();
        JsProducer {
            inner: Arc::new(Inner {
                encoder,
                telemetry,
                msg_id,
                clustered,
                subjects: polybus_nats::SubjectCache::default(),
                js,
                subject,
                owns_connection,
                ensured: Mutex::default(),
                gate: Gate::default(),
            }),
        }
    }

    /// Sets the subject [`send`](Self::send) publishes to.
    pub fn with_subject(self, subject: impl Into<String>) -> Self {
        let inner = &self.inner;
        JsProducer::new(
            inner.js.clone(),
            Some(subject.into()),
            inner.owns_connection,
        )
    }

    /// The JetStream handle (management, KV, object store) on this producer's connection.
    pub fn jetstream(&self) -> &JetStream {
        &self.inner.js
    }

    /// The seed's one-argument send: publishes `payload` as a new event to the producer's
    /// subject (the one given to [`connect`](Self::connect)).
    ///
    /// This inherent method shadows `PublisherExt::send(topic, payload)`; for that one call
    /// `polybus_core::PublisherExt::send(&producer, topic, payload)` or use `publish`.
    ///
    /// # Errors
    /// `Unsupported` when the producer has no subject; otherwise as for `publish`.
    pub async fn send(&self, payload: impl IntoPayload) -> Result<Receipt> {
        let Some(subject) = self.inner.subject.as_deref() else {
            return Err(Error::unsupported(
                BACKEND,
                "this producer has no default subject: use publish(topic, event)",
            ));
        };
        self.publish_event(subject, Event::new(payload)).await
    }

    /// Not an `async fn`: the telemetry scope wraps the publish future directly, so the
    /// future every publish returns holds it once (an `async fn` here added ~500 bytes).
    fn publish_event(
        &self,
        topic: &str,
        mut event: Event,
    ) -> impl Future<Output = Result<Receipt>> + Send {
        let scope = self.inner.telemetry.publish(topic, &mut event);
        scope.run(self.publish_traced(topic, event))
    }

    async fn publish_traced(&self, topic: &str, event: Event) -> Result<Receipt> {
        let _guard = self.inner.gate.enter()?;
        let (shared_topic, subject) = self.inner.subjects.get(topic, BACKEND)?;
        let (headers, payload) = self.encode(event)?;
        self.ensure_stream(topic).await?;
        // In a cluster "no responders" also means that the stream has no leader for a moment
        // (an election after a node died): nothing was stored, and the publish is sent again
        // until the publish timeout. A single server says it only when no stream covers the
        // subject, so there no copy is kept for a resend.
        let resend = self
            .inner
            .clustered
            .then(|| (headers.clone(), payload.clone()));
        let ack = match self
            .send_once(topic, subject.clone(), headers, payload)
            .await
        {
            Err(e) if e.kind() == ErrorKind::NotFound => match resend {
                // Boxed: the rare path does not grow every publish future.
                Some((headers, payload)) => {
                    Box::pin(self.resend_without_leader(topic, subject, headers, payload, e))
                        .await?
                }
                None => return Err(e),
            },
            ack => ack?,
        };
        Ok(Receipt::new(shared_topic)
            .with_sequence(ack.sequence)
            .with_duplicate(ack.duplicate))
    }

    /// Publishes `events` in order with all of them in flight at once: every event is checked
    /// and encoded first (one that cannot be sends nothing), then all are sent, then the
    /// acknowledgements are awaited in order. The client's limit of acknowledgements in flight
    /// (`max_ack_inflight`) holds the sending back when it is reached.
    async fn publish_batch_traced(&self, topic: &str, events: Vec<Event>) -> Result<Vec<Receipt>> {
        let _guard = self.inner.gate.enter()?;
        let (shared_topic, subject) = self.inner.subjects.get(topic, BACKEND)?;
        let telemetry = &self.inner.telemetry;
        let mut encoded = Vec::with_capacity(events.len());
        for mut event in events {
            let scope = telemetry.publish(topic, &mut event);
            match self.encode(event) {
                Ok(message) => encoded.push((scope, message)),
                Err(e) => {
                    let failed = Err(e);
                    scope.finish(&failed);
                    return failed.map(|_: Receipt| Vec::new());
                }
            }
        }
        self.ensure_stream(topic).await?;
        let conn = self.inner.js.connection();
        let since = if conn.auth_required() {
            Some(conn.violation_mark())
        } else {
            None
        };
        let mut pending = Vec::with_capacity(encoded.len());
        for (scope, (headers, payload)) in encoded {
            // A copy for a resend after "no responders" in a cluster, as for one publish.
            let resend = self
                .inner
                .clustered
                .then(|| (headers.clone(), payload.clone()));
            let sent = self
                .inner
                .js
                .context()
                .send_publish(subject.clone(), publish_message(headers, payload))
                .await
                .map_err(|e| error::publish(e, topic));
            match sent {
                Ok(ack) => pending.push((scope, ack, resend)),
                Err(e) => {
                    let failed = Err(e);
                    scope.finish(&failed);
                    return failed.map(|_: Receipt| Vec::new());
                }
            }
        }
        let mut receipts = Vec::with_capacity(pending.len());
        for (scope, ack, resend) in pending {
            let acked = match self.await_ack(topic, ack, since).await {
                Err(e) if e.kind() == ErrorKind::NotFound => match resend {
                    Some((headers, payload)) => {
                        Box::pin(self.resend_without_leader(
                            topic,
                            subject.clone(),
                            headers,
                            payload,
                            e,
                        ))
                        .await
                    }
                    None => Err(e),
                },
                acked => acked,
            };
            let receipt = acked.map(|ack| {
                Receipt::new(shared_topic.clone())
                    .with_sequence(ack.sequence)
                    .with_duplicate(ack.duplicate)
            });
            scope.finish(&receipt);
            receipts.push(receipt?);
        }
        Ok(receipts)
    }

    /// Checks and encodes one event: validation, default source, `Nats-Msg-Id`, the size
    /// against the server's limit.
    fn encode(&self, mut event: Event) -> Result<(HeaderMap, Bytes)> {
        let lean = self.inner.encoder.wire_format().is_lean();
        if !lean || self.inner.msg_id || event.content_type().is_some() {
            event.validate()?;
        }
        if !lean {
            let opts = self.inner.js.options();
            if let Some(src) = &opts.nats.default_source() {
                event.set_source_if_unset(src);
            }
        }
        let id: Option<HeaderValue> = if self.inner.msg_id {
            Some(event.id().parse().map_err(|_| {
                Error::new(ErrorKind::InvalidHeader, BACKEND)
                    .with_message("the event id cannot travel as Nats-Msg-Id")
            })?)
        } else {
            None
        };
        let (mut headers, payload) = self.inner.encoder.encode_owned(event, BACKEND)?;
        if let Some(id) = id {
            headers.insert(HeaderName::from_static(MSG_ID_HEADER), id);
        }
        polybus_nats::check_size(self.inner.js.connection(), &headers, payload.len(), BACKEND)?;
        Ok((headers, payload))
    }

    /// Sends one publish and waits for its acknowledgement (or the server's refusal).
    async fn send_once(
        &self,
        topic: &str,
        subject: Subject,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAck> {
        let conn = self.inner.js.connection();
        let since = conn.auth_required().then(|| conn.violation_mark());
        let ack = self
            .inner
            .js
            .context()
            .send_publish(subject, publish_message(headers, payload))
            .await
            .map_err(|e| error::publish(e, topic))?;
        self.await_ack(topic, ack, since).await
    }

    /// Waits for the acknowledgement of a publish sent. With `since` (the server requires
    /// authentication: the violation mark before the publish), a refusal of the publish ends
    /// the wait: the server drops a publish the user may not make and reports it
    /// asynchronously, so the acknowledgement would never come. (Without authentication the
    /// server has no permissions to refuse it.)
    async fn await_ack(
        &self,
        topic: &str,
        ack: PublishAckFuture,
        since: Option<u64>,
    ) -> Result<PublishAck> {
        let Some(since) = since else {
            return ack.await.map_err(|e| error::publish(e, topic));
        };
        let conn = self.inner.js.connection();
        let refused = conn.publish_refused(topic, since, BACKEND);
        let ack = std::pin::pin!(ack.into_future());
        match futures_util::future::select(ack, std::pin::pin!(refused)).await {
            futures_util::future::Either::Left((ack, _)) => {
                ack.map_err(|e| error::publish(e, topic))
            }
            futures_util::future::Either::Right((e, _)) => Err(e),
        }
    }

    /// After "no responders" in a cluster: sends the publish again, 100 ms apart, while the
    /// stream covering `topic` has no leader, until the publish timeout (counted from now). A
    /// subject no stream covers keeps its `NotFound` (`first`); a stream that stays without a
    /// leader is `Timeout`.
    async fn resend_without_leader(
        &self,
        topic: &str,
        subject: Subject,
        headers: HeaderMap,
        payload: Bytes,
        first: Error,
    ) -> Result<PublishAck> {
        let timeout = self.inner.js.options().publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let covered = tokio::time::timeout_at(deadline, self.inner.js.stream_for(topic)).await;
        if let Ok(Err(e)) = &covered
            && e.kind() == ErrorKind::NotFound
        {
            return Err(first);
        }
        let mut last = first;
        loop {
            let pause = tokio::time::Instant::now() + Duration::from_millis(100);
            if pause >= deadline {
                break;
            }
            tokio::time::sleep_until(pause).await;
            let send = self.send_once(topic, subject.clone(), headers.clone(), payload.clone());
            match tokio::time::timeout_at(deadline, send).await {
                Ok(Err(e)) if e.kind() == ErrorKind::NotFound => last = e,
                Ok(result) => return result,
                Err(_) => break,
            }
        }
        Err(Error::new(ErrorKind::Timeout, BACKEND)
            .with_message(format!(
                "publishing to {topic:?}: the stream had no leader (no responders) for {timeout:?}"
            ))
            .with_source(last))
    }

    async fn ensure_stream(&self, topic: &str) -> Result<()> {
        if !matches!(
            self.inner.js.options().policy,
            StreamPolicy::PerTopic { .. }
        ) {
            // Under `Existing` the server answers "no responders" for an uncovered subject,
            // which becomes `NotFound`.
            return Ok(());
        }
        if self
            .inner
            .ensured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(topic)
        {
            return Ok(());
        }
        // Boxed: this runs once per topic, and inline its future (stream lookup and creation)
        // would make every publish future several KiB larger, copied whenever it is moved.
        Box::pin(self.inner.js.stream_for(topic)).await?;
        self.inner
            .ensured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned());
        Ok(())
    }
}

/// A JetStream publish of `payload` with `headers` (none: no header block at all).
fn publish_message(headers: HeaderMap, payload: Bytes) -> PublishMessage {
    if headers.is_empty() {
        PublishMessage::build().payload(payload)
    } else {
        PublishMessage::build().payload(payload).headers(headers)
    }
}

impl Publisher for JsProducer {
    fn publish(&self, topic: &str, event: Event) -> impl Future<Output = Result<Receipt>> + Send {
        self.publish_event(topic, event)
    }

    /// Sends every event, then awaits the acknowledgements in order (an async publish
    /// window the size of the batch), instead of one round trip per event.
    ///
    /// All or a typed error: every event is checked and encoded before anything is sent, so
    /// an event that cannot be published fails the batch with nothing sent. An error while
    /// sending or acknowledging fails the batch with the first error; the events before it
    /// are stored (with `Nats-Msg-Id`, the default, sending the batch again stores no
    /// duplicate of them), later ones may be. The receipts are in the order of the events;
    /// the stream stores them in that order (in a cluster, one sent again after a leader
    /// election may come after later ones).
    ///
    /// ```no_run
    /// use polybus_core::{Event, Publisher};
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").connect().await?;
    /// let producer = js.producer();
    /// let events = (0..100).map(|i| Event::new(format!("{i}"))).collect();
    /// let receipts = producer.publish_batch("orders.created", events).await?;
    /// assert_eq!(receipts.len(), 100);
    /// # Ok(()) }
    /// ```
    fn publish_batch(
        &self,
        topic: &str,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Vec<Receipt>>> + Send {
        self.publish_batch_traced(topic, events)
    }

    /// Every publish waits for its acknowledgement, so `flush` only waits for the publishes in
    /// flight.
    async fn flush(&self) -> Result<()> {
        self.inner.gate.wait_idle().await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.inner.gate.close().await && self.inner.owns_connection {
            let conn = self.inner.js.connection();
            conn.close_for(self.inner.js.options().publish_timeout, BACKEND)
                .await?;
        }
        Ok(())
    }
}

/// Lets publishes in flight finish before `close`: `enter` fails once closing began, and
/// `close` waits until every entered publish is done.
#[derive(Debug, Default)]
struct Gate {
    closed: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

struct GateGuard<'a>(&'a Gate);

impl Gate {
    fn enter(&self) -> Result<GateGuard<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = GateGuard(self);
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::closed(BACKEND).with_message("the producer is closed"));
        }
        Ok(guard)
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::SeqCst);
        self.wait_idle().await;
        first
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
