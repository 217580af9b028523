//! What a publish returns ([`Receipt`]) and what a consumer yields ([`Delivery`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tracing::{Instrument as _, Span};

use crate::metrics::Instruments;
use crate::{Error, Event, Result};

/// What the broker said about a publish.
///
/// ```
/// use polybus_core::Receipt;
/// let r = Receipt::new("orders").with_partition(3).with_sequence(42);
/// assert_eq!((r.topic(), r.partition(), r.sequence()), ("orders", Some(3), Some(42)));
/// assert!(!r.is_duplicate());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    // Shared: a publisher that keeps its last topic hands out receipts without allocating.
    topic: Arc<str>,
    partition: Option<i32>,
    sequence: Option<u64>,
    duplicate: bool,
}

impl Receipt {
    /// A receipt for `topic` with no position. Pass an `Arc<str>` the publisher keeps to
    /// make one without allocating.
    pub fn new(topic: impl Into<Arc<str>>) -> Self {
        Receipt {
            topic: topic.into(),
            partition: None,
            sequence: None,
            duplicate: false,
        }
    }
    /// Sets the partition (Kafka).
    #[inline]
    pub fn with_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Sets the sequence or offset (JetStream stream sequence, Kafka offset).
    #[inline]
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = Some(sequence);
        self
    }
    /// Marks the publish as a duplicate the broker recognised and did not store again.
    pub fn with_duplicate(mut self, duplicate: bool) -> Self {
        self.duplicate = duplicate;
        self
    }
    /// The topic or subject published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The partition, where the broker has partitions.
    pub fn partition(&self) -> Option<i32> {
        self.partition
    }
    /// The stream sequence or offset, where the broker assigns one.
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }
    /// Whether the broker reported this publish as a duplicate (JetStream `Nats-Msg-Id`).
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }
}

/// The future an [`Acker`] returns: either already finished (no allocation) or boxed.
pub enum AckFuture<'a> {
    /// The settlement already finished.
    Ready(Option<Result<()>>),
    /// The settlement needs I/O.
    Pending(BoxFuture<'a, Result<()>>),
}

impl AckFuture<'_> {
    /// An already finished settlement.
    pub fn ready(result: Result<()>) -> Self {
        AckFuture::Ready(Some(result))
    }
}

impl fmt::Debug for AckFuture<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckFuture::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            AckFuture::Pending(_) => f.write_str("Pending"),
        }
    }
}

impl Future for AckFuture<'_> {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match self.get_mut() {
            AckFuture::Ready(r) => Poll::Ready(r.take().unwrap_or(Ok(()))),
            AckFuture::Pending(f) => f.as_mut().poll(cx),
        }
    }
}

/// How a backend settles one delivery. Adapters implement it; users call the methods on
/// [`Delivery`].
///
/// Each method is called at most once per delivery, except that a failed call may be retried
/// through [`AckError::into_delivery`]. A backend that cannot honour an operation returns
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) (the defaults do exactly that).
/// What happens to a delivery dropped unsettled is the backend's choice and is documented by
/// its [`Capabilities::unsettled`](crate::Capabilities::unsettled).
pub trait Acker: Send + Sync + 'static {
    /// The backend name used in errors.
    fn backend(&self) -> &'static str;
    /// Confirms processing.
    fn ack(&mut self) -> AckFuture<'_>;
    /// Asks for redelivery after `delay`.
    fn nack(&mut self, delay: Duration) -> AckFuture<'_> {
        let _ = delay;
        AckFuture::ready(Err(Error::unsupported(
            self.backend(),
            "nack: this broker cannot redeliver on request",
        )))
    }
    /// Never deliver this message again (poison message).
    fn term(&mut self) -> AckFuture<'_> {
        AckFuture::ready(Err(Error::unsupported(
            self.backend(),
            "term: this broker cannot terminate a delivery",
        )))
    }
    /// Tells the broker that processing goes on, so it does not redeliver yet.
    fn in_progress(&mut self) -> AckFuture<'_> {
        AckFuture::ready(Err(Error::unsupported(
            self.backend(),
            "in_progress: this broker has no ack deadline to extend",
        )))
    }
}

/// An acker for brokers where delivery is already final (core NATS, MQTT QoS 0): `ack` and
/// `term` succeed without doing anything, `nack` is unsupported.
#[derive(Debug, Clone, Copy)]
pub struct NoopAcker(pub &'static str);

impl Acker for NoopAcker {
    fn backend(&self) -> &'static str {
        self.0
    }
    fn ack(&mut self) -> AckFuture<'_> {
        AckFuture::ready(Ok(()))
    }
    fn term(&mut self) -> AckFuture<'_> {
        AckFuture::ready(Ok(()))
    }
}

/// One received event with its position and a settlement handle.
///
/// Settle it with [`ack`](Self::ack), [`nack`](Self::nack) or [`term`](Self::term); each
/// consumes the delivery and on failure hands it back inside the [`AckError`].
///
/// ```
/// # use polybus_core::{Delivery, Event, NoopAcker};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let d = Delivery::new(Event::new(b"hello"), "t", NoopAcker("doc"));
/// assert_eq!(d.payload(), b"hello");
/// d.ack().await?; // AckError converts into anyhow::Error
/// # Ok(()) }
/// ```
pub struct Delivery {
    event: Event,
    // Shared: a subscription that keeps its last topic hands it to each delivery uncopied.
    topic: Arc<str>,
    partition: Option<i32>,
    sequence: Option<u64>,
    reply_to: Option<Arc<str>>,
    delivery_count: u32,
    acker: AckerSlot,
    span: Span,
    metrics: Option<InFlight>,
}

/// The settlement handle of a delivery: a [`NoopAcker`] is kept inline (the brokers without
/// settlement hand out one per message, which would otherwise be an allocation per delivery),
/// any other acker is boxed.
enum AckerSlot {
    Noop(NoopAcker),
    Boxed(Box<dyn Acker>),
}

impl AckerSlot {
    #[inline]
    fn new<A: Acker>(acker: A) -> Self {
        // `A` is a concrete type: the check is decided at compile time.
        match (&acker as &dyn std::any::Any).downcast_ref::<NoopAcker>() {
            Some(noop) => AckerSlot::Noop(*noop),
            None => AckerSlot::Boxed(Box::new(acker)),
        }
    }

    fn get(&mut self) -> &mut dyn Acker {
        match self {
            AckerSlot::Noop(a) => a,
            AckerSlot::Boxed(b) => b.as_mut(),
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            AckerSlot::Noop(a) => a.0,
            AckerSlot::Boxed(b) => b.backend(),
        }
    }

    fn into_box(self) -> Box<dyn Acker> {
        match self {
            AckerSlot::Noop(a) => Box::new(a),
            AckerSlot::Boxed(b) => b,
        }
    }
}

/// Counts a delivery in the in-flight gauge until it is settled or dropped.
struct InFlight(Arc<Instruments>);

impl InFlight {
    fn new(m: Arc<Instruments>) -> Self {
        m.in_flight.increment(1.0);
        InFlight(m)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.decrement(1.0);
    }
}

/// Which settlement, for the metrics.
#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Nack,
    Term,
}

impl Delivery {
    /// A delivery of `event` received on `topic`, settled through `acker`.
    #[inline]
    pub fn new(event: Event, topic: impl Into<Arc<str>>, acker: impl Acker) -> Self {
        Delivery {
            event,
            topic: topic.into(),
            partition: None,
            sequence: None,
            reply_to: None,
            delivery_count: 1,
            acker: AckerSlot::new(acker),
            span: Span::none(),
            metrics: None,
        }
    }
    /// Sets the partition.
    pub fn with_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Sets the sequence / offset.
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = Some(sequence);
        self
    }
    /// Sets where the sender waits for a reply (the reply subject of a NATS request).
    pub fn with_reply_to(mut self, reply_to: impl Into<Arc<str>>) -> Self {
        self.reply_to = Some(reply_to.into());
        self
    }
    /// Sets how many times this message has been delivered (1 = first time).
    #[inline]
    pub fn with_delivery_count(mut self, count: u32) -> Self {
        self.delivery_count = count.max(1);
        self
    }

    /// Attaches the delivery span and the metric handles (adapters call this through
    /// [`Telemetry::delivered`](crate::telemetry::Telemetry::delivered)). The delivery counts
    /// as in flight until it is settled or dropped.
    #[inline]
    pub fn with_telemetry(mut self, span: Span, metrics: Arc<Instruments>) -> Self {
        self.span = span;
        self.metrics = Some(InFlight::new(metrics));
        self
    }

    /// Attaches the delivery span only, without metrics (what
    /// [`Telemetry::delivered`](crate::telemetry::Telemetry::delivered) does when no `metrics`
    /// recorder is installed).
    ///
    /// ```
    /// # use polybus_core::{Delivery, Event, NoopAcker};
    /// let d = Delivery::new(Event::new(b"x"), "t", NoopAcker("doc"))
    ///     .with_span(tracing::info_span!("process"));
    /// # drop(d);
    /// ```
    #[must_use]
    #[inline]
    pub fn with_span(mut self, span: Span) -> Self {
        self.span = span;
        self
    }

    /// The delivery's span (`process`, see [`telemetry`](crate::telemetry)): a child of the
    /// publisher's span where the trace context allows. Instrument the processing with it:
    ///
    /// ```
    /// # use polybus_core::{Delivery, Event, NoopAcker};
    /// use tracing::Instrument as _;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
    /// # let delivery = Delivery::new(Event::new(b"x"), "t", NoopAcker("doc"));
    /// let span = delivery.span().clone();
    /// async {
    ///     tracing::info!("handling {}", delivery.event().id());
    ///     delivery.ack().await
    /// }
    /// .instrument(span)
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The W3C trace context the message carried (its `traceparent` header), if valid.
    pub fn trace_context(&self) -> Option<crate::telemetry::TraceContext> {
        crate::telemetry::TraceContext::from_headers(self.event.headers())
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }
    /// The event, to change or take in place (a consumer wrapper that rewrites it; the
    /// runtime lends it to a handler by value for the call, without a copy).
    ///
    /// ```
    /// use polybus_core::{Delivery, Event, NoopAcker};
    /// let mut d = Delivery::new(Event::new("a"), "t", NoopAcker("doc"));
    /// let taken = std::mem::replace(d.event_mut(), Event::new("b"));
    /// assert_eq!((taken.data().as_ref(), d.payload()), (&b"a"[..], &b"b"[..]));
    /// ```
    pub fn event_mut(&mut self) -> &mut Event {
        &mut self.event
    }
    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        self.event.data()
    }
    /// The payload as `Bytes` (cheap clone).
    pub fn data(&self) -> &Bytes {
        self.event.data()
    }
    /// The topic or subject the message arrived on.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The topic as the shared string the delivery holds: a clone is a reference count, not
    /// a copy of the name.
    ///
    /// ```
    /// use polybus_core::{Delivery, Event, NoopAcker};
    /// let d = Delivery::new(Event::new("a"), "orders", NoopAcker("doc"));
    /// assert_eq!(&*d.shared_topic(), "orders");
    /// ```
    pub fn shared_topic(&self) -> Arc<str> {
        self.topic.clone()
    }
    /// The partition, where the broker has partitions.
    pub fn partition(&self) -> Option<i32> {
        self.partition
    }
    /// The sequence or offset, where the broker has one.
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }
    /// Where the sender waits for a reply, when it sent a request the broker carries as such
    /// (core NATS request-reply: the request's reply subject); `None` for a plain publish.
    ///
    /// ```
    /// use polybus_core::{Delivery, Event, NoopAcker};
    /// let d = Delivery::new(Event::new("ping"), "svc.echo", NoopAcker("nats"))
    ///     .with_reply_to("_INBOX.abc.1");
    /// assert_eq!(d.reply_to(), Some("_INBOX.abc.1"));
    /// ```
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }
    /// How many times this message has been delivered, 1 for the first time.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }
    /// Whether this is a redelivery.
    pub fn is_redelivered(&self) -> bool {
        self.delivery_count > 1
    }
    /// The backend that delivered this message.
    pub fn backend(&self) -> &'static str {
        self.acker.backend()
    }

    /// Confirms processing; the broker will not deliver it again to this group.
    ///
    /// # Errors
    /// The broker did not take the ack; the error hands the delivery back for a retry.
    #[inline]
    pub fn ack(self) -> impl Future<Output = Result<(), AckError>> + Send {
        use futures_util::future::{Either, ready};
        // A delivery from a broker without settlement (core NATS, MQTT QoS 0) and without
        // metrics to record has nothing to do: done here, without moving the delivery into a
        // settlement future.
        if matches!(self.acker, AckerSlot::Noop(_)) && self.metrics.is_none() {
            return Either::Left(ready(Ok(())));
        }
        Either::Right(self.settle(Settle::Ack, Duration::ZERO))
    }

    /// Asks for redelivery after `delay` (`Duration::ZERO` for at once).
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) where the broker has no
    /// nack (core NATS, MQTT), or a broker error; the delivery comes back in the error.
    pub async fn nack(self, delay: Duration) -> Result<(), AckError> {
        self.settle(Settle::Nack, delay).await
    }

    /// Drops the message for good: it is not redelivered.
    ///
    /// # Errors
    /// As for [`ack`](Self::ack).
    pub async fn term(self) -> Result<(), AckError> {
        self.settle(Settle::Term, Duration::ZERO).await
    }

    async fn settle(mut self, how: Settle, delay: Duration) -> Result<(), AckError> {
        // The clock is read only when the ack duration goes to a recorder.
        let start = self
            .metrics
            .as_ref()
            .is_some_and(|m| m.0.is_recording())
            .then(Instant::now);
        let span = self.span.clone();
        let fut = match how {
            Settle::Ack => self.acker.get().ack(),
            Settle::Nack => self.acker.get().nack(delay),
            Settle::Term => self.acker.get().term(),
        };
        let result = fut.instrument(span).await;
        if let Some(m) = &self.metrics {
            let m = &m.0;
            match (&result, how) {
                (Ok(()), Settle::Ack) => {
                    if let Some(start) = start {
                        m.ack_duration.record(start.elapsed().as_secs_f64());
                    }
                }
                (Ok(()), Settle::Nack) => m.nacked.increment(1),
                (Ok(()), Settle::Term) => m.terminated.increment(1),
                (Err(_), _) => m.settle_errors.increment(1),
            }
        }
        match result {
            Ok(()) => Ok(()),
            Err(error) => Err(AckError::new(error, self)),
        }
    }

    /// Extends the ack deadline where the broker has one (JetStream `+WPI`).
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) where there is no deadline.
    pub async fn in_progress(&mut self) -> Result<()> {
        self.acker.get().in_progress().await
    }

    /// Splits the delivery into its event and its settlement handle.
    pub fn into_parts(self) -> (Event, Box<dyn Acker>) {
        (self.event, self.acker.into_box())
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("backend", &self.acker.backend())
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("sequence", &self.sequence)
            .field("reply_to", &self.reply_to)
            .field("delivery_count", &self.delivery_count)
            .field("event", &self.event)
            .finish()
    }
}

/// A failed settlement: the error and the delivery, so the caller can retry or nack instead.
///
/// Implements `std::error::Error`, so `?` converts it into `anyhow::Error` or a boxed error.
pub struct AckError {
    error: Error,
    delivery: Box<Delivery>,
}

impl AckError {
    /// Wraps `error` with the delivery it failed to settle.
    pub fn new(error: Error, delivery: Delivery) -> Self {
        AckError {
            error,
            delivery: Box::new(delivery),
        }
    }
    /// The error.
    pub fn error(&self) -> &Error {
        &self.error
    }
    /// The delivery, for another attempt.
    pub fn into_delivery(self) -> Delivery {
        *self.delivery
    }
    /// The error and the delivery.
    pub fn into_parts(self) -> (Error, Delivery) {
        (self.error, *self.delivery)
    }
}

impl From<AckError> for Error {
    fn from(e: AckError) -> Error {
        e.error
    }
}

impl fmt::Debug for AckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckError")
            .field("error", &self.error)
            .field("topic", &self.delivery.topic)
            .field("id", &self.delivery.event.id())
            .finish()
    }
}

impl fmt::Display for AckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "settling event {} from {}: {}",
            self.delivery.event.id(),
            self.delivery.topic,
            self.error
        )
    }
}

impl std::error::Error for AckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    struct Failing(u32);
    impl Acker for Failing {
        fn backend(&self) -> &'static str {
            "test"
        }
        fn ack(&mut self) -> AckFuture<'_> {
            self.0 += 1;
            if self.0 < 2 {
                AckFuture::ready(Err(Error::new(ErrorKind::Timeout, "test")))
            } else {
                AckFuture::Pending(Box::pin(async { Ok(()) }))
            }
        }
    }

    #[tokio::test]
    async fn failed_ack_hands_the_delivery_back_for_a_retry() {
        let d = Delivery::new(Event::new(b"x"), "t", Failing(0)).with_delivery_count(2);
        let err = d.ack().await.unwrap_err();
        assert_eq!(err.error().kind(), ErrorKind::Timeout);
        assert!(err.to_string().contains("timed out"));
        let d = err.into_delivery();
        assert!(d.is_redelivered());
        d.ack().await.expect("second attempt succeeds");
    }

    #[tokio::test]
    async fn noop_acker_acks_and_refuses_nack() {
        let d = Delivery::new(Event::new(b"x"), "t", NoopAcker("nats"));
        let err = d.nack(Duration::ZERO).await.unwrap_err();
        assert_eq!(err.error().kind(), ErrorKind::Unsupported);
        assert_eq!(err.error().backend(), "nats");
        let mut d = err.into_delivery();
        assert_eq!(
            d.in_progress().await.unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        d.ack().await.unwrap();
    }

    #[test]
    fn ack_error_converts_into_anyhow_and_error() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<AckError>();
        let e = AckError::new(
            Error::closed("x"),
            Delivery::new(Event::new(b""), "t", NoopAcker("x")),
        );
        let e: Error = e.into();
        assert_eq!(e.kind(), ErrorKind::Closed);
    }
}
