//! Maps async-nats JetStream errors into polybus errors with an honest kind.

use std::fmt::Display;

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::stream::ConsumerErrorKind;
use polybus_core::{Error, ErrorKind};

pub(crate) const BACKEND: &str = "jetstream";

/// An error of `kind` with a message and the client error as source.
pub(crate) fn err<E>(kind: ErrorKind, msg: impl Into<String>, source: E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    Error::new(kind, BACKEND)
        .with_message(msg.into())
        .with_source(source)
}

/// A server-side JetStream API error: 404 is `NotFound`, 503 (JetStream unavailable) is
/// `Connect`, 401/403 `Unauthorized`, anything else the server refused is `Rejected`.
pub(crate) fn api_kind(code: usize) -> ErrorKind {
    match code {
        404 => ErrorKind::NotFound,
        503 => ErrorKind::Connect,
        401 | 403 => ErrorKind::Unauthorized,
        408 => ErrorKind::Timeout,
        _ => ErrorKind::Rejected,
    }
}

pub(crate) fn publish(e: async_nats::jetstream::context::PublishError, topic: &str) -> Error {
    let kind = match e.kind() {
        PublishErrorKind::StreamNotFound => {
            return err(
                ErrorKind::NotFound,
                format!("no stream covers the subject {topic:?}"),
                e,
            );
        }
        PublishErrorKind::TimedOut => ErrorKind::Timeout,
        PublishErrorKind::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
        PublishErrorKind::BrokenPipe => ErrorKind::Connect,
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::Other => ErrorKind::Rejected,
    };
    err(kind, format!("publishing to {topic:?}"), e)
}

pub(crate) fn create_stream(
    e: async_nats::jetstream::context::CreateStreamError,
    name: &str,
) -> Error {
    let kind = match e.kind() {
        CreateStreamErrorKind::EmptyStreamName | CreateStreamErrorKind::InvalidStreamName => {
            ErrorKind::InvalidTopic
        }
        CreateStreamErrorKind::JetStreamUnavailable => ErrorKind::Connect,
        CreateStreamErrorKind::TimedOut => ErrorKind::Timeout,
        CreateStreamErrorKind::NotFound => ErrorKind::NotFound,
        CreateStreamErrorKind::JetStream(ref js) => api_kind(js.code()),
        CreateStreamErrorKind::DomainAndExternalSet
        | CreateStreamErrorKind::Response
        | CreateStreamErrorKind::ResponseParse => ErrorKind::Rejected,
    };
    err(kind, format!("creating stream {name:?}"), e)
}

pub(crate) fn get_stream(e: async_nats::jetstream::context::GetStreamError, name: &str) -> Error {
    let kind = match e.kind() {
        GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => {
            ErrorKind::InvalidTopic
        }
        GetStreamErrorKind::Request => ErrorKind::Connect,
        GetStreamErrorKind::JetStream(ref js) => api_kind(js.code()),
    };
    err(kind, format!("looking up stream {name:?}"), e)
}

pub(crate) fn consumer(e: async_nats::jetstream::stream::ConsumerError, name: &str) -> Error {
    let kind = match e.kind() {
        ConsumerErrorKind::TimedOut => ErrorKind::Timeout,
        ConsumerErrorKind::Request => ErrorKind::Connect,
        ConsumerErrorKind::InvalidName => ErrorKind::InvalidTopic,
        ConsumerErrorKind::InvalidConsumerType => ErrorKind::Rejected,
        ConsumerErrorKind::JetStream(ref js) => api_kind(js.code()),
        ConsumerErrorKind::Other => ErrorKind::Rejected,
    };
    err(kind, format!("creating or binding consumer {name:?}"), e)
}

/// A boxed async-nats error (acks, batches): a timeout is `Timeout`, anything else is a
/// connection problem.
pub(crate) fn boxed(e: async_nats::Error, what: impl Display) -> Error {
    let kind = if is_timeout(&*e) {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connect
    };
    Error::new(kind, BACKEND)
        .with_message(what.to_string())
        .with_source(e)
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<tokio::time::error::Elapsed>() || e.to_string().contains("timed out") {
            return true;
        }
        cur = e.source();
    }
    false
}

pub(crate) fn invalid_name(what: &str, name: &str) -> Error {
    Error::new(ErrorKind::InvalidTopic, BACKEND).with_message(format!(
        "{what} name {name:?} is not legal: it must be non-empty, without whitespace, '.', '*', \
         '>', '/' or '\\'"
    ))
}

/// Whether `name` is a legal stream or consumer name.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !".*>/\\".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("ORDERS_1-a"));
        for bad in ["", "a.b", "a b", "a*", ">", "a/b", "a\\b"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert_eq!(
            invalid_name("stream", "a.b").kind(),
            ErrorKind::InvalidTopic
        );
    }

    #[test]
    fn api_codes() {
        assert_eq!(api_kind(404), ErrorKind::NotFound);
        assert_eq!(api_kind(400), ErrorKind::Rejected);
        assert_eq!(api_kind(503), ErrorKind::Connect);
    }
}
