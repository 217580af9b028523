//! What a handler returns: an [`Outcome`], and the [`HandlerError`] a failure carries.

use std::fmt;
use std::time::Duration;

use polybus_core::{BoxError, ErrorKind, Event};

/// What to do with a handled event.
///
/// Handlers usually return `()` ([`Ack`](Outcome::Ack)), a `Result` (an `Err` becomes
/// [`Fail`](Outcome::Fail)), or an [`Outbound`] / `Vec<Outbound>` (publish, then ack); see
/// [`IntoOutcome`].
///
/// ```
/// use std::time::Duration;
/// use polybus_runtime::{HandlerError, Outcome};
/// let later = Outcome::Retry(Some(Duration::from_secs(5)));
/// let poison = Outcome::Terminate(HandlerError::permanent("unknown schema version"));
/// assert!(matches!(later, Outcome::Retry(_)));
/// assert!(matches!(poison, Outcome::Terminate(_)));
/// ```
#[non_exhaustive]
#[derive(Debug)]
pub enum Outcome {
    /// Done: acknowledge.
    Ack,
    /// Publish these events (with the app's publisher), then acknowledge. A failed publish
    /// counts as a transient failure: the event is retried, so an event may be published more
    /// than once (at-least-once).
    Publish(Vec<Outbound>),
    /// Reply to the request with this event (see [`Reply`]), then acknowledge. A failed
    /// publish is retried like [`Publish`](Outcome::Publish)'s; an event without a reply
    /// address fails permanently with kind `unsupported` (it is dead-lettered).
    Reply(Event),
    /// Try again after this delay, or after the retry policy's backoff when `None`. Counts as
    /// an attempt: after the last one the event is dead-lettered.
    Retry(Option<Duration>),
    /// Give up at once: dead-letter the event (or terminate it when the app has no
    /// dead-letter topic).
    Terminate(HandlerError),
    /// The handler failed: retried if the error is transient, terminated if it is permanent
    /// (see [`HandlerError`] for the rule).
    Fail(HandlerError),
}

/// An event to publish as a handler's result.
///
/// ```
/// use polybus_core::Event;
/// use polybus_runtime::Outbound;
/// let out = Outbound::new("invoices", Event::new(b"{}"));
/// assert_eq!(out.topic(), "invoices");
/// ```
#[derive(Debug, Clone)]
pub struct Outbound {
    topic: String,
    event: Event,
}

impl Outbound {
    /// `event` to be published to `topic`.
    pub fn new(topic: impl Into<String>, event: Event) -> Self {
        Outbound {
            topic: topic.into(),
            event,
        }
    }
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }
    pub(crate) fn into_parts(self) -> (String, Event) {
        (self.topic, self.event)
    }
}

/// The header a request names its reply topic in.
///
/// A [`Reply`] is published to this topic, on the app's publisher. It works on every
/// backend: the requester subscribes to its reply topic (on NATS core an inbox subject) and
/// publishes the request with this header.
pub const REPLY_TO: &str = "x-reply-to";

/// The header a reply carries the request's `id` in (unless the handler set one).
pub const CORRELATION_ID: &str = "x-correlation-id";

/// A handler's reply to a request ([`Outcome::Reply`]): the event is published to the
/// request's reply address, with the request's `id` in [`CORRELATION_ID`], and then the
/// request is acknowledged. The reply address is the broker's own where the request came as
/// one (a core NATS request, as `NatsProducer::request` or `nats req` send it:
/// [`Delivery::reply_to`](polybus_core::Delivery::reply_to)), else the topic the request names
/// in its [`REPLY_TO`] header. A request with neither fails permanently (kind `unsupported`:
/// dead-lettered), since nobody could get the answer.
///
/// ```
/// use polybus_core::Event;
/// use polybus_runtime::{App, Reply, TestApp, REPLY_TO};
///
/// async fn price(ev: Event) -> Reply {
///     Reply(Event::new(format!("price of {}: 42", String::from_utf8_lossy(ev.data()))))
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let mut t = TestApp::start(App::new().route("prices", price)).await?;
/// let ask = Event::builder().data("tea").header(REPLY_TO, "prices.reply.1").build()?;
/// let id = ask.id().to_owned();
/// t.publish("prices", ask).await?;
/// t.settled(&id).await?;
/// assert_eq!(t.published("prices.reply.1")[0].data().as_ref(), b"price of tea: 42");
/// # t.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Reply(pub Event);

impl IntoOutcome for Reply {
    fn into_outcome(self) -> Outcome {
        Outcome::Reply(self.0)
    }
}

/// A handler failure: the error, the kind written into a dead letter's `x-exception-kind`,
/// and whether it is worth retrying.
///
/// The rule, applied by `From` (so `?` works on any error):
/// * a [`polybus_core::Error`] whose kind is about the input or the setup (`codec error`,
///   `invalid topic`, `invalid header`, `payload too large`, `unauthorized`, `unsupported`) is
///   **permanent**: the event is dead-lettered without further attempts;
/// * every other error (other `polybus_core::Error` kinds, timeouts of the timeout layer,
///   `anyhow` errors, I/O errors, strings) is **transient**: retried with backoff until the
///   policy's attempts are used up, then dead-lettered;
/// * a panic in the handler is transient, with kind `panic`;
/// * an extractor that cannot build its argument (a payload that is not valid JSON for
///   [`Json<T>`](crate::Json)) is permanent, kind `codec error`.
///
/// Use [`HandlerError::permanent`] / [`HandlerError::transient`] to say it explicitly.
///
/// ```
/// use polybus_core::{Error, ErrorKind};
/// use polybus_runtime::HandlerError;
/// let e: HandlerError = Error::new(ErrorKind::Codec, "app").into();
/// assert!(e.is_permanent());
/// let e: HandlerError = Error::new(ErrorKind::Timeout, "app").into();
/// assert!(!e.is_permanent());
/// let e: HandlerError = std::io::Error::other("db down").into();
/// assert_eq!((e.kind(), e.is_permanent()), ("error", false));
/// ```
pub struct HandlerError {
    error: BoxError,
    kind: String,
    permanent: bool,
}

impl HandlerError {
    /// A failure that retrying will not fix.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        let mut e = HandlerError::classify(error.into());
        e.permanent = true;
        e
    }
    /// A failure that may go away (a database down, a timeout).
    pub fn transient(error: impl Into<BoxError>) -> Self {
        let mut e = HandlerError::classify(error.into());
        e.permanent = false;
        e
    }
    /// Sets the kind written into dead letters.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    pub(crate) fn panic(message: String) -> Self {
        HandlerError {
            error: format!("handler panicked: {message}").into(),
            kind: "panic".into(),
            permanent: false,
        }
    }

    pub(crate) fn classify(error: BoxError) -> Self {
        if let Some(e) = error.downcast_ref::<polybus_core::Error>() {
            let permanent = matches!(
                e.kind(),
                ErrorKind::Codec
                    | ErrorKind::InvalidTopic
                    | ErrorKind::InvalidHeader
                    | ErrorKind::PayloadTooLarge
                    | ErrorKind::Unauthorized
                    | ErrorKind::Unsupported
            );
            return HandlerError {
                kind: e.kind().as_str().into(),
                error,
                permanent,
            };
        }
        let kind = if error.is::<tower::timeout::error::Elapsed>() {
            ErrorKind::Timeout.as_str()
        } else {
            ErrorKind::Other.as_str()
        };
        HandlerError {
            error,
            kind: kind.into(),
            permanent: false,
        }
    }

    /// A copy (the error as text), for a failure that applies to several events.
    pub(crate) fn duplicate(&self) -> Self {
        HandlerError {
            error: self.error.to_string().into(),
            kind: self.kind.clone(),
            permanent: self.permanent,
        }
    }

    /// Whether the event is dead-lettered without further attempts.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
    /// The kind written into a dead letter's `x-exception-kind`.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
    /// The underlying error, by value.
    pub fn into_error(self) -> BoxError {
        self.error
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::classify(error.into())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("permanent", &self.permanent)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

/// Turns what a handler returns into an [`Outcome`].
///
/// | returned | outcome |
/// |---|---|
/// | `()` | [`Outcome::Ack`] |
/// | [`Outcome`] | itself |
/// | [`Outbound`], `Vec<Outbound>` | [`Outcome::Publish`] |
/// | [`Reply`] | [`Outcome::Reply`] |
/// | `Option<T>` | `None` acks, `Some(t)` as `t` |
/// | `Result<T, E>` with `E: Into<HandlerError>` | `Ok(t)` as `t`, `Err(e)` [`Outcome::Fail`] |
///
/// ```
/// use polybus_runtime::{IntoOutcome, Outcome};
/// assert!(matches!(().into_outcome(), Outcome::Ack));
/// let failed: Result<(), std::io::Error> = Err(std::io::Error::other("x"));
/// assert!(matches!(failed.into_outcome(), Outcome::Fail(_)));
/// ```
pub trait IntoOutcome {
    /// The outcome.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Ack
    }
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for Outbound {
    fn into_outcome(self) -> Outcome {
        Outcome::Publish(vec![self])
    }
}

impl IntoOutcome for Vec<Outbound> {
    fn into_outcome(self) -> Outcome {
        Outcome::Publish(self)
    }
}

impl<T: IntoOutcome> IntoOutcome for Option<T> {
    fn into_outcome(self) -> Outcome {
        self.map_or(Outcome::Ack, IntoOutcome::into_outcome)
    }
}

impl<T: IntoOutcome, E: Into<HandlerError>> IntoOutcome for Result<T, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(t) => t.into_outcome(),
            Err(e) => Outcome::Fail(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classification_rule() {
        for (kind, permanent) in [
            (ErrorKind::Codec, true),
            (ErrorKind::Unsupported, true),
            (ErrorKind::PayloadTooLarge, true),
            (ErrorKind::Timeout, false),
            (ErrorKind::Connect, false),
            (ErrorKind::Rejected, false),
            (ErrorKind::Other, false),
        ] {
            let e: HandlerError = polybus_core::Error::new(kind, "t").into();
            assert_eq!(e.is_permanent(), permanent, "{kind:?}");
            assert_eq!(e.kind(), kind.as_str());
        }
        let e: HandlerError = "plain text".into();
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "plain text");
        let e: HandlerError = anyhow::anyhow!("from anyhow").into();
        assert!(!e.is_permanent());
        let e: HandlerError = tower::timeout::error::Elapsed::new().into();
        assert_eq!(e.kind(), "timed out");
        let e = HandlerError::permanent("no").with_kind("schema");
        assert_eq!((e.kind(), e.is_permanent()), ("schema", true));
        assert!(
            !HandlerError::transient(polybus_core::Error::new(ErrorKind::Codec, "t"))
                .is_permanent()
        );
    }

    #[test]
    fn into_outcome_table() {
        assert!(matches!(None::<Outcome>.into_outcome(), Outcome::Ack));
        let out = Outbound::new("t", Event::new(b"x"));
        assert!(matches!(Some(out.clone()).into_outcome(), Outcome::Publish(v) if v.len() == 1));
        let ok: Result<Vec<Outbound>, anyhow::Error> = Ok(vec![out.clone(), out]);
        assert!(matches!(ok.into_outcome(), Outcome::Publish(v) if v.len() == 2));
    }
}
