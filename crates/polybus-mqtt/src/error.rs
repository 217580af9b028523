//! Mapping rumqttc errors and MQTT reason codes into `polybus_core::Error`.

use polybus_core::{Error, ErrorKind};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5 as p5;

use crate::BACKEND;
use crate::config::QoS;

pub(crate) fn err(kind: ErrorKind, msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(kind, BACKEND).with_message(msg)
}

/// What a TLS failure means, for the error message.
fn tls_note(tls: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match tls {
        rustls::Error::InvalidCertificate(c) => format!(
            "TLS: the broker's certificate was refused ({c:?}: an untrusted CA, another host \
             name, or expired)"
        ),
        rustls::Error::AlertReceived(
            alert @ (A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::UnsupportedCertificate
            | A::AccessDenied),
        ) => format!("TLS: the broker refused our client certificate (alert {alert:?})"),
        other => format!("TLS handshake failed: {other}"),
    }
}

fn io_tls(io: &std::io::Error) -> Option<&rustls::Error> {
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// `Error::new(kind)` with the source, and a message when `tls` failed.
fn with_tls_note(
    kind: ErrorKind,
    tls: Option<&rustls::Error>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    let err = Error::new(kind, BACKEND);
    let err = match tls {
        Some(tls) => err.with_message(tls_note(tls)),
        None => err,
    };
    err.with_source(e)
}

/// A connection-level error of MQTT 5.
pub(crate) fn connection_v5(e: rumqttc::v5::ConnectionError) -> Error {
    use rumqttc::v5::{ConnectionError as C, StateError as S};
    let kind = match &e {
        C::ConnectionRefused(code) => connack_code_v5(*code),
        C::MqttState(S::ConnFail { reason }) => connack_code_v5(*reason),
        C::MqttState(S::ServerDisconnect { reason_code, .. }) => match reason_code {
            p5::DisconnectReasonCode::NotAuthorized => ErrorKind::Unauthorized,
            p5::DisconnectReasonCode::PacketTooLarge => ErrorKind::PayloadTooLarge,
            p5::DisconnectReasonCode::TopicNameInvalid
            | p5::DisconnectReasonCode::TopicFilterInvalid => ErrorKind::InvalidTopic,
            _ => ErrorKind::Connect,
        },
        C::MqttState(S::OutgoingPacketTooLarge { .. } | S::IncomingPacketTooLarge { .. }) => {
            ErrorKind::PayloadTooLarge
        }
        C::MqttState(S::Deserialization(rumqttc::v5::mqttbytes::Error::Io(io))) | C::Io(io) => {
            io_kind(io)
        }
        C::MqttState(S::Io(io)) | C::Tls(rumqttc::TlsError::Io(io)) => io_kind(io),
        C::Tls(rumqttc::TlsError::TLS(tls)) => tls_kind(tls),
        C::MqttState(S::Deserialization(_)) | C::NotConnAck(_) => ErrorKind::Codec,
        C::Timeout(_) => ErrorKind::Connect,
        C::Tls(_) | C::MqttState(_) => ErrorKind::Connect,
        C::RequestsDone => ErrorKind::Closed,
    };
    let tls = match &e {
        C::MqttState(S::Deserialization(rumqttc::v5::mqttbytes::Error::Io(io)))
        | C::Io(io)
        | C::MqttState(S::Io(io))
        | C::Tls(rumqttc::TlsError::Io(io)) => io_tls(io),
        C::Tls(rumqttc::TlsError::TLS(tls)) => Some(tls),
        _ => None,
    }
    .cloned();
    with_tls_note(kind, tls.as_ref(), e)
}

/// An I/O error: `Connect`, unless it carries the broker's TLS refusal of our client
/// certificate, which is `Unauthorized`.
fn io_kind(e: &std::io::Error) -> ErrorKind {
    match io_tls(e) {
        Some(tls) => tls_kind(tls),
        None => ErrorKind::Connect,
    }
}

fn tls_kind(e: &rustls::Error) -> ErrorKind {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::UnsupportedCertificate
            | A::AccessDenied,
        ) => ErrorKind::Unauthorized,
        _ => ErrorKind::Connect,
    }
}

/// A connection-level error of MQTT 3.1.1.
pub(crate) fn connection_v4(e: rumqttc::ConnectionError) -> Error {
    use rumqttc::{ConnectReturnCode as R, ConnectionError as C, StateError as S};
    let kind = match &e {
        C::ConnectionRefused(R::BadUserNamePassword | R::NotAuthorized) => ErrorKind::Unauthorized,
        C::ConnectionRefused(R::RefusedProtocolVersion) => ErrorKind::Unsupported,
        C::ConnectionRefused(R::BadClientId) => ErrorKind::Rejected,
        C::ConnectionRefused(_) => ErrorKind::Connect,
        C::Io(io)
        | C::MqttState(S::Io(io))
        | C::MqttState(S::Deserialization(rumqttc::Error::Io(io)))
        | C::Tls(rumqttc::TlsError::Io(io)) => io_kind(io),
        C::Tls(rumqttc::TlsError::TLS(tls)) => tls_kind(tls),
        C::MqttState(S::Deserialization(_)) | C::NotConnAck(_) => ErrorKind::Codec,
        C::RequestsDone => ErrorKind::Closed,
        _ => ErrorKind::Connect,
    };
    let tls = match &e {
        C::Io(io)
        | C::MqttState(S::Io(io))
        | C::MqttState(S::Deserialization(rumqttc::Error::Io(io)))
        | C::Tls(rumqttc::TlsError::Io(io)) => io_tls(io),
        C::Tls(rumqttc::TlsError::TLS(tls)) => Some(tls),
        _ => None,
    }
    .cloned();
    with_tls_note(kind, tls.as_ref(), e)
}

fn connack_code_v5(code: p5::ConnectReturnCode) -> ErrorKind {
    use p5::ConnectReturnCode as R;
    match code {
        R::BadUserNamePassword | R::NotAuthorized | R::Banned | R::BadAuthenticationMethod => {
            ErrorKind::Unauthorized
        }
        R::RefusedProtocolVersion | R::UnsupportedProtocolVersion => ErrorKind::Unsupported,
        R::BadClientId | R::ClientIdentifierNotValid | R::QuotaExceeded => ErrorKind::Rejected,
        R::PacketTooLarge => ErrorKind::PayloadTooLarge,
        _ => ErrorKind::Connect,
    }
}

/// The error of a PUBACK/PUBREC reason code, `None` for success.
pub(crate) fn puback_v5(reason: p5::PubAckReason) -> Option<Error> {
    use p5::PubAckReason as R;
    let kind = match reason {
        R::Success | R::NoMatchingSubscribers => return None,
        R::NotAuthorized => ErrorKind::Unauthorized,
        R::TopicNameInvalid => ErrorKind::InvalidTopic,
        R::PayloadFormatInvalid => ErrorKind::Codec,
        R::QuotaExceeded
        | R::PacketIdentifierInUse
        | R::UnspecifiedError
        | R::ImplementationSpecificError => ErrorKind::Rejected,
    };
    Some(err(
        kind,
        format!("the broker refused the publish: {reason:?}"),
    ))
}

pub(crate) fn pubrec_v5(reason: p5::PubRecReason) -> Option<Error> {
    use p5::PubRecReason as R;
    let kind = match reason {
        R::Success | R::NoMatchingSubscribers => return None,
        R::NotAuthorized => ErrorKind::Unauthorized,
        R::TopicNameInvalid => ErrorKind::InvalidTopic,
        R::PayloadFormatInvalid => ErrorKind::Codec,
        _ => ErrorKind::Rejected,
    };
    Some(err(
        kind,
        format!("the broker refused the publish: {reason:?}"),
    ))
}

pub(crate) fn suback_v5(code: p5::SubscribeReasonCode) -> Result<QoS, Error> {
    use p5::SubscribeReasonCode as R;
    let kind = match code {
        R::Success(q) => return Ok(qos_from_v5(q)),
        R::NotAuthorized => ErrorKind::Unauthorized,
        R::TopicFilterInvalid => ErrorKind::InvalidTopic,
        R::SharedSubscriptionsNotSupported
        | R::WildcardSubscriptionsNotSupported
        | R::SubscriptionIdNotSupported => ErrorKind::Unsupported,
        _ => ErrorKind::Rejected,
    };
    Err(err(
        kind,
        format!("the broker refused the subscription: {code:?}"),
    ))
}

pub(crate) fn suback_v4(code: rumqttc::SubscribeReasonCode) -> Result<QoS, Error> {
    match code {
        rumqttc::SubscribeReasonCode::Success(q) => Ok(qos_from_v4(q)),
        // MQTT 3.1.1 has one failure code for every refusal; brokers send it for a filter
        // the client may not subscribe to (mosquitto: an ACL denial).
        rumqttc::SubscribeReasonCode::Failure => Err(err(
            ErrorKind::Unauthorized,
            "the broker refused the subscription (SUBACK 0x80; MQTT 3.1.1 gives no reason, \
             usually a missing permission)",
        )),
    }
}

pub(crate) fn qos_from_v5(q: Q5) -> QoS {
    match q {
        Q5::AtMostOnce => QoS::AtMostOnce,
        Q5::AtLeastOnce => QoS::AtLeastOnce,
        Q5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

pub(crate) fn qos_to_v5(q: QoS) -> Q5 {
    match q {
        QoS::AtMostOnce => Q5::AtMostOnce,
        QoS::AtLeastOnce => Q5::AtLeastOnce,
        QoS::ExactlyOnce => Q5::ExactlyOnce,
    }
}

pub(crate) fn qos_from_v4(q: rumqttc::QoS) -> QoS {
    match q {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

pub(crate) fn qos_to_v4(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_credentials_are_unauthorized() {
        let e = connection_v5(rumqttc::v5::ConnectionError::ConnectionRefused(
            p5::ConnectReturnCode::BadUserNamePassword,
        ));
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        let e = connection_v4(rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::NotAuthorized,
        ));
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            connection_v5(rumqttc::v5::ConnectionError::Io(io)).kind(),
            ErrorKind::Connect
        );
    }

    #[test]
    fn reason_codes() {
        assert!(puback_v5(p5::PubAckReason::NoMatchingSubscribers).is_none());
        assert_eq!(
            puback_v5(p5::PubAckReason::NotAuthorized).unwrap().kind(),
            ErrorKind::Unauthorized
        );
        assert_eq!(
            suback_v5(p5::SubscribeReasonCode::SharedSubscriptionsNotSupported)
                .unwrap_err()
                .kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(
            suback_v4(rumqttc::SubscribeReasonCode::Failure)
                .unwrap_err()
                .kind(),
            ErrorKind::Unauthorized
        );
        assert_eq!(
            suback_v5(p5::SubscribeReasonCode::NotAuthorized)
                .unwrap_err()
                .kind(),
            ErrorKind::Unauthorized
        );
        assert_eq!(
            suback_v4(rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::ExactlyOnce
            ))
            .unwrap(),
            QoS::ExactlyOnce
        );
    }
}
