//! Dead letters: where events go after their retries are exhausted, and the headers that say
//! why. The format (header names, topic naming) is `polybus_core::dlq`, shared with
//! polybus-runtime: one dead-letter format for the bus and the runtime.

use polybus_core::dlq::DeadLetter;
#[cfg(test)]
use polybus_core::dlq::MAX_MESSAGE_LEN;
pub use polybus_core::dlq::{
    DEAD_LETTER_HEADERS, DeadLetterTopic, X_ATTEMPTS, X_EXCEPTION_KIND, X_EXCEPTION_MESSAGE,
    X_ORIGINAL_OFFSET, X_ORIGINAL_PARTITION, X_ORIGINAL_SUBJECT, X_ORIGINAL_TOPIC,
};
use polybus_core::{Delivery, Error, Event};

use crate::codec::SpoolRecord;

/// The dead letter of a spooled record whose forward retries are exhausted.
pub(crate) fn from_record(record: &SpoolRecord) -> Event {
    DeadLetter::new(
        &record.topic,
        record.last_error_kind.as_deref().unwrap_or("error"),
        record.last_error.as_deref().unwrap_or("unknown"),
        record.attempts,
    )
    .subject(Some(&record.subject))
    .apply(record.event.clone())
}

/// The dead letter of a consumed delivery whose processing failed `attempts` times.
pub(crate) fn from_delivery(d: &Delivery, error: &Error, attempts: u32) -> Event {
    DeadLetter::new(
        d.topic(),
        error.kind().as_str(),
        &error.to_string(),
        attempts,
    )
    .partition(d.partition())
    .offset(d.sequence())
    .apply(d.event().clone())
}

/// Removes the dead-letter headers; returns the original topic and subject if they were
/// there.
pub(crate) fn strip(ev: Event) -> (Event, Option<String>, Option<String>) {
    let subject = ev.headers().get(X_ORIGINAL_SUBJECT).map(str::to_owned);
    let (ev, topic) = polybus_core::dlq::strip(ev);
    (ev, topic, subject)
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::{ErrorKind, NoopAcker, validate_header};

    #[test]
    fn record_dead_letters_keep_key_and_headers_and_explain() {
        let ev = Event::builder()
            .id("e1")
            .key("k1")
            .header("tenant", "eu")
            .header(X_ATTEMPTS, "stale")
            .build()
            .unwrap();
        let mut rec = SpoolRecord::new("orders.created", "orders.created", ev);
        rec.attempts = 5;
        rec.last_error = Some("kafka: rejected:\nbroker said no".into());
        rec.last_error_kind = Some("rejected".into());
        let dl = from_record(&rec);
        assert_eq!(dl.key(), Some(&b"k1"[..]));
        assert_eq!(dl.id(), "e1");
        let h = dl.headers();
        assert_eq!(h.get("tenant"), Some("eu"));
        assert_eq!(h.get(X_ORIGINAL_TOPIC), Some("orders.created"));
        assert_eq!(h.get(X_ORIGINAL_SUBJECT), Some("orders.created"));
        assert_eq!(
            h.get(X_EXCEPTION_MESSAGE),
            Some("kafka: rejected: broker said no")
        );
        assert_eq!(h.get(X_EXCEPTION_KIND), Some("rejected"));
        assert_eq!(h.get_all(X_ATTEMPTS).collect::<Vec<_>>(), ["5"]);
        for (n, v) in h.iter() {
            validate_header(n, v).unwrap();
        }
        let (back, topic, subject) = strip(dl);
        assert_eq!(topic.as_deref(), Some("orders.created"));
        assert_eq!(subject.as_deref(), Some("orders.created"));
        assert_eq!(back.headers().len(), 1);
        assert_eq!(back.headers().get("tenant"), Some("eu"));
    }

    #[test]
    fn delivery_dead_letters_carry_partition_and_offset() {
        let d = Delivery::new(
            Event::builder().key("k").build().unwrap(),
            "t",
            NoopAcker("x"),
        )
        .with_partition(2)
        .with_sequence(41);
        let err = Error::new(ErrorKind::Codec, "app").with_message("x".repeat(5000));
        let dl = from_delivery(&d, &err, 3);
        let h = dl.headers();
        assert_eq!(h.get(X_ORIGINAL_PARTITION), Some("2"));
        assert_eq!(h.get(X_ORIGINAL_OFFSET), Some("41"));
        assert_eq!(h.get(X_ATTEMPTS), Some("3"));
        assert_eq!(h.get(X_EXCEPTION_MESSAGE).unwrap().len(), MAX_MESSAGE_LEN);
        assert_eq!(dl.key(), Some(&b"k"[..]));
    }
}
