//! Maps rdkafka errors into polybus errors (private).

use polybus_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

/// The backend name in every error of this crate.
pub(crate) const BACKEND: &str = "kafka";

/// The kind a librdkafka error code means for a caller.
pub(crate) fn kind_of_code(code: C) -> ErrorKind {
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            ErrorKind::PayloadTooLarge
        }
        C::MessageTimedOut
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue
        | C::PollExceeded => ErrorKind::Timeout,
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::SSL
        | C::DestroyBroker => ErrorKind::Connect,
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::DelegationTokenAuthorizationFailed => ErrorKind::Unauthorized,
        C::InvalidTopic => ErrorKind::InvalidTopic,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition | C::GroupIdNotFound => {
            ErrorKind::NotFound
        }
        C::UnsupportedVersion
        | C::UnsupportedFeature
        | C::NotImplemented
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType => ErrorKind::Unsupported,
        C::BrokerDestroy => ErrorKind::Closed,
        C::InvalidArgument | C::InvalidConfig | C::NotConfigured => ErrorKind::Other,
        C::QueueFull
        | C::PolicyViolation
        | C::InvalidRecord
        | C::InvalidMessage
        | C::BadMessage
        | C::Fenced
        | C::InvalidProducerEpoch
        | C::ProducerFenced
        | C::InvalidTransactionalState
        | C::OutOfOrderSequenceNumber
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::InvalidRequest
        | C::State => ErrorKind::Rejected,
        _ => ErrorKind::Other,
    }
}

/// The librdkafka code inside `e`, including admin errors.
pub(crate) fn code_of(e: &KafkaError) -> Option<C> {
    match e {
        KafkaError::AdminOp(c) => Some(*c),
        other => other.rdkafka_error_code(),
    }
}

/// A polybus error for `e`, with `context` as the message.
pub(crate) fn from_kafka(e: KafkaError, context: impl Into<String>) -> Error {
    let kind = match &e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Other,
        KafkaError::Canceled => ErrorKind::Closed,
        KafkaError::Nul(_) => ErrorKind::Codec,
        other => code_of(other).map_or(ErrorKind::Other, kind_of_code),
    };
    Error::new(kind, BACKEND)
        .with_message(context.into())
        .with_source(e)
}

/// A polybus error from a code alone.
pub(crate) fn from_code(code: C, context: impl Into<String>) -> Error {
    Error::new(kind_of_code(code), BACKEND).with_message(format!("{}: {code}", context.into()))
}

pub(crate) fn closed(what: &str) -> Error {
    Error::closed(BACKEND).with_message(format!("{what} is closed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_actionable_kinds() {
        for (code, kind) in [
            (C::MessageSizeTooLarge, ErrorKind::PayloadTooLarge),
            (C::MessageTimedOut, ErrorKind::Timeout),
            (C::AllBrokersDown, ErrorKind::Connect),
            (C::SaslAuthenticationFailed, ErrorKind::Unauthorized),
            (C::TopicAuthorizationFailed, ErrorKind::Unauthorized),
            (C::InvalidTopic, ErrorKind::InvalidTopic),
            (C::UnknownTopicOrPartition, ErrorKind::NotFound),
            (C::ProducerFenced, ErrorKind::Rejected),
        ] {
            assert_eq!(kind_of_code(code), kind, "{code:?}");
        }
        let e = from_kafka(
            KafkaError::MessageProduction(C::MessageSizeTooLarge),
            "publishing",
        );
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge);
        assert_eq!(e.backend(), "kafka");
        assert_eq!(
            from_kafka(KafkaError::AdminOp(C::ClusterAuthorizationFailed), "x").kind(),
            ErrorKind::Unauthorized
        );
    }
}
