//! Maps async-nats errors into polybus errors with an honest kind.

use async_nats::client::{FlushErrorKind, PublishErrorKind, RequestErrorKind, SubscribeErrorKind};
use async_nats::{ConnectErrorKind, client};
use polybus_core::{Error, ErrorKind};

pub(crate) const BACKEND: &str = "nats";

pub(crate) fn connect(e: async_nats::ConnectError, backend: &'static str, url: &str) -> Error {
    let kind = match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            ErrorKind::Unauthorized
        }
        ConnectErrorKind::TimedOut => ErrorKind::Timeout,
        ConnectErrorKind::ServerParse => ErrorKind::Other,
        ConnectErrorKind::Dns
        | ConnectErrorKind::Tls
        | ConnectErrorKind::Io
        | ConnectErrorKind::MaxReconnects => ErrorKind::Connect,
    };
    Error::new(kind, backend)
        .with_message(format!("connecting to {url}"))
        .with_source(e)
}

pub(crate) fn publish(e: client::PublishError, backend: &'static str) -> Error {
    let kind = match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
        PublishErrorKind::InvalidSubject => ErrorKind::InvalidTopic,
        // The command channel is closed: the connection was closed or drained.
        PublishErrorKind::Send => ErrorKind::Closed,
    };
    Error::new(kind, backend).with_source(e)
}

pub(crate) fn subscribe(e: client::SubscribeError, backend: &'static str) -> Error {
    let kind = match e.kind() {
        SubscribeErrorKind::InvalidSubject | SubscribeErrorKind::InvalidQueueName => {
            ErrorKind::InvalidTopic
        }
        SubscribeErrorKind::Other => ErrorKind::Closed,
    };
    Error::new(kind, backend).with_source(e)
}

/// No responders is [`ErrorKind::NotFound`]: nobody serves the subject, the NATS answer to a
/// request that cannot be routed (like HTTP 503 from the server, status code 503 on the wire).
pub(crate) fn request(e: client::RequestError, backend: &'static str) -> Error {
    let (kind, msg) = match e.kind() {
        RequestErrorKind::TimedOut => (ErrorKind::Timeout, "no reply in time"),
        RequestErrorKind::NoResponders => (ErrorKind::NotFound, "no responders for the subject"),
        RequestErrorKind::InvalidSubject => (ErrorKind::InvalidTopic, "invalid subject"),
        RequestErrorKind::MaxPayloadExceeded => (ErrorKind::PayloadTooLarge, "request too large"),
        RequestErrorKind::Other => (ErrorKind::Connect, "request failed"),
    };
    Error::new(kind, backend).with_message(msg).with_source(e)
}

pub(crate) fn flush(e: client::FlushError, backend: &'static str) -> Error {
    let kind = match e.kind() {
        FlushErrorKind::SendError => ErrorKind::Closed,
        FlushErrorKind::FlushError => ErrorKind::Connect,
    };
    Error::new(kind, backend).with_source(e)
}

pub(crate) fn payload_too_large(backend: &'static str, size: usize, max: usize) -> Error {
    Error::new(ErrorKind::PayloadTooLarge, backend).with_message(format!(
        "message is {size} bytes (payload and headers), the server accepts {max}"
    ))
}
