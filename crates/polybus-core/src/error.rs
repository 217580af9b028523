//! The one error type of polybus and its kinds.

use std::borrow::Cow;
use std::fmt;

/// A boxed error usable as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
///
/// Match on the kind, never on the `Display` text: messages are for humans and logs.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The broker could not be reached or the connection broke.
    Connect,
    /// An operation did not finish in time.
    Timeout,
    /// The publisher, consumer or connection was closed.
    Closed,
    /// The topic or subject name is not legal for this broker.
    InvalidTopic,
    /// A header name or value is not legal for this broker or binding.
    InvalidHeader,
    /// The event is bigger than the broker accepts.
    PayloadTooLarge,
    /// Bytes on the wire could not be turned into an event, or the other way round.
    Codec,
    /// Credentials were refused or a permission is missing.
    Unauthorized,
    /// The backend cannot do this (for example nack on MQTT); see its `Capabilities`.
    Unsupported,
    /// The broker (or a local bound such as a full spool) refused the operation.
    Rejected,
    /// Something was asked for that does not exist (a stream, a key, a consumer).
    NotFound,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// A short lowercase description, used by `Display`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connection failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Closed => "closed",
            ErrorKind::InvalidTopic => "invalid topic",
            ErrorKind::InvalidHeader => "invalid header",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::Codec => "codec error",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Rejected => "rejected",
            ErrorKind::NotFound => "not found",
            ErrorKind::Other => "error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every polybus operation: a [`ErrorKind`], the backend that raised it,
/// an optional message and an optional source error.
///
/// ```
/// use polybus_core::{Error, ErrorKind};
///
/// let err = Error::new(ErrorKind::InvalidTopic, "memory").with_message("topic is empty");
/// assert_eq!(err.kind(), ErrorKind::InvalidTopic);
/// assert_eq!(err.backend(), "memory");
/// assert!(!err.is_retryable());
/// assert_eq!(err.to_string(), "memory: invalid topic: topic is empty");
/// ```
pub struct Error {
    kind: ErrorKind,
    backend: &'static str,
    message: Option<Cow<'static, str>>,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` raised by `backend` (`"nats"`, `"kafka"`, `"memory"`, ...).
    pub fn new(kind: ErrorKind, backend: &'static str) -> Self {
        Error {
            kind,
            backend,
            message: None,
            source: None,
        }
    }

    /// Adds a human-readable message.
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Adds the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Shorthand for `Error::new(ErrorKind::Unsupported, backend).with_message(what)`.
    pub fn unsupported(backend: &'static str, what: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::Unsupported, backend).with_message(what)
    }

    /// Shorthand for a [`ErrorKind::Closed`] error.
    pub fn closed(backend: &'static str) -> Self {
        Error::new(ErrorKind::Closed, backend)
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The backend that raised the error.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The message, if any.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// Whether trying the same operation again may succeed (connection loss, timeout, a
    /// transient refusal). Invalid input, missing permissions and unsupported operations are
    /// not retryable.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Connect | ErrorKind::Timeout)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("backend", &self.backend);
        if let Some(m) = &self.message {
            d.field("message", m);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.backend, self.kind)?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_backend_kind_message_and_source() {
        let io = std::io::Error::other("refused");
        let err = Error::new(ErrorKind::Connect, "nats")
            .with_message("127.0.0.1:4222")
            .with_source(io);
        assert_eq!(
            err.to_string(),
            "nats: connection failed: 127.0.0.1:4222: refused"
        );
        assert!(err.is_retryable());
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn every_kind_has_a_distinct_description() {
        let kinds = [
            ErrorKind::Connect,
            ErrorKind::Timeout,
            ErrorKind::Closed,
            ErrorKind::InvalidTopic,
            ErrorKind::InvalidHeader,
            ErrorKind::PayloadTooLarge,
            ErrorKind::Codec,
            ErrorKind::Unauthorized,
            ErrorKind::Unsupported,
            ErrorKind::Rejected,
            ErrorKind::NotFound,
            ErrorKind::Other,
        ];
        let mut seen = std::collections::HashSet::new();
        for k in kinds {
            assert!(seen.insert(k.to_string()), "duplicate text for {k:?}");
            assert_eq!(Error::new(k, "x").to_string(), format!("x: {k}"));
        }
    }

    #[test]
    fn error_is_send_sync_static() {
        fn assert<T: Send + Sync + 'static + std::error::Error>() {}
        assert::<Error>();
    }
}
