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
    let (kind, message) = match tls_failure(&e) {
        Some((tls_kind, what)) => (tls_kind, format!("connecting to {url}: TLS: {what}")),
        None if e.kind() == ConnectErrorKind::Tls => (
            ErrorKind::Connect,
            format!(
                "connecting to {url}: TLS could not be set up (CA or client certificate files, \
                 or the server name)"
            ),
        ),
        None => (kind, format!("connecting to {url}")),
    };
    Error::new(kind, backend)
        .with_message(message)
        .with_source(e)
}

/// A TLS handshake failure somewhere in the source chain of `e`: a server certificate we do
/// not trust is `Connect` (naming why: unknown CA, wrong host name, expired); the server
/// refusing our client certificate is `Unauthorized`.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<(ErrorKind, String)> {
    use async_nats::rustls::{AlertDescription as A, CertificateError as C, Error as Tls};
    let mut next = Some(e);
    while let Some(err) = next {
        let tls = err.downcast_ref::<Tls>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Tls>())
        });
        if let Some(tls) = tls {
            return Some(match tls {
                Tls::InvalidCertificate(cert) => {
                    let why = match cert {
                        C::UnknownIssuer => "it is not signed by a trusted CA".to_owned(),
                        C::NotValidForName | C::NotValidForNameContext { .. } => {
                            "it is not valid for the host name connected to".to_owned()
                        }
                        C::Expired | C::ExpiredContext { .. } => "it has expired".to_owned(),
                        other => format!("{other:?}"),
                    };
                    (
                        ErrorKind::Connect,
                        format!("the server certificate was refused: {why}"),
                    )
                }
                Tls::AlertReceived(
                    alert @ (A::CertificateRequired
                    | A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateUnknown
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::UnsupportedCertificate
                    | A::AccessDenied),
                ) => (
                    ErrorKind::Unauthorized,
                    format!("the server refused our client certificate (alert {alert:?})"),
                ),
                other => (ErrorKind::Connect, format!("handshake failed: {other}")),
            });
        }
        next = err.source();
    }
    None
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
