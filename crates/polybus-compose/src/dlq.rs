//! Dead letters: where events go after their retries are exhausted, and the headers that say
//! why. Modelled on Spring Cloud Stream's `x-original-*` / `x-exception-*` headers; the
//! event keeps its key, id, source and every original header.

use polybus_core::{Delivery, Error, Event};

use crate::codec::SpoolRecord;

/// Header: the Kafka topic the event was meant for.
pub const X_ORIGINAL_TOPIC: &str = "x-original-topic";
/// Header: the NATS subject the event was published to (bus forwards only).
pub const X_ORIGINAL_SUBJECT: &str = "x-original-subject";
/// Header: the partition the event was read from (consumer-side dead letters).
pub const X_ORIGINAL_PARTITION: &str = "x-original-partition";
/// Header: the offset the event was read from (consumer-side dead letters).
pub const X_ORIGINAL_OFFSET: &str = "x-original-offset";
/// Header: the last error, as text.
pub const X_EXCEPTION_MESSAGE: &str = "x-exception-message";
/// Header: the kind of the last error (`rejected`, `payload too large`, ...).
pub const X_EXCEPTION_KIND: &str = "x-exception-kind";
/// Header: how many attempts were made.
pub const X_ATTEMPTS: &str = "x-attempts";

/// Every header the bus adds to a dead letter (and `redrive` removes).
pub const DEAD_LETTER_HEADERS: [&str; 7] = [
    X_ORIGINAL_TOPIC,
    X_ORIGINAL_SUBJECT,
    X_ORIGINAL_PARTITION,
    X_ORIGINAL_OFFSET,
    X_EXCEPTION_MESSAGE,
    X_EXCEPTION_KIND,
    X_ATTEMPTS,
];

const MAX_MESSAGE_LEN: usize = 1024;

/// How the dead-letter topic of a Kafka topic is named.
///
/// ```
/// use polybus_compose::DeadLetterTopic;
/// assert_eq!(DeadLetterTopic::default().topic_for("orders.created"), "orders.created.dlq");
/// assert_eq!(DeadLetterTopic::Fixed("dead".into()).topic_for("orders.created"), "dead");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterTopic {
    /// The topic name plus this suffix (default `.dlq`).
    Suffix(String),
    /// One topic for every dead letter.
    Fixed(String),
}

impl Default for DeadLetterTopic {
    fn default() -> Self {
        DeadLetterTopic::Suffix(".dlq".into())
    }
}

impl DeadLetterTopic {
    /// The dead-letter topic for `topic`.
    pub fn topic_for(&self, topic: &str) -> String {
        match self {
            DeadLetterTopic::Suffix(s) => format!("{topic}{s}"),
            DeadLetterTopic::Fixed(t) => t.clone(),
        }
    }
}

/// The dead letter of a spooled record whose forward retries are exhausted.
pub(crate) fn from_record(record: &SpoolRecord) -> Event {
    let mut ev = record.event.clone();
    let h = ev.headers_mut();
    for name in DEAD_LETTER_HEADERS {
        h.remove(name);
    }
    h.append_unchecked(X_ORIGINAL_TOPIC, clean(&record.topic));
    h.append_unchecked(X_ORIGINAL_SUBJECT, clean(&record.subject));
    h.append_unchecked(
        X_EXCEPTION_MESSAGE,
        clean(record.last_error.as_deref().unwrap_or("unknown")),
    );
    h.append_unchecked(
        X_EXCEPTION_KIND,
        clean(record.last_error_kind.as_deref().unwrap_or("error")),
    );
    h.append_unchecked(X_ATTEMPTS, record.attempts.to_string());
    ev
}

/// The dead letter of a consumed delivery whose processing failed `attempts` times.
pub(crate) fn from_delivery(d: &Delivery, error: &Error, attempts: u32) -> Event {
    let mut ev = d.event().clone();
    let h = ev.headers_mut();
    for name in DEAD_LETTER_HEADERS {
        h.remove(name);
    }
    h.append_unchecked(X_ORIGINAL_TOPIC, clean(d.topic()));
    if let Some(p) = d.partition() {
        h.append_unchecked(X_ORIGINAL_PARTITION, p.to_string());
    }
    if let Some(o) = d.sequence() {
        h.append_unchecked(X_ORIGINAL_OFFSET, o.to_string());
    }
    h.append_unchecked(X_EXCEPTION_MESSAGE, clean(&error.to_string()));
    h.append_unchecked(X_EXCEPTION_KIND, clean(error.kind().as_str()));
    h.append_unchecked(X_ATTEMPTS, attempts.to_string());
    ev
}

/// Removes the dead-letter headers; returns the original topic and subject if they were
/// there.
pub(crate) fn strip(mut ev: Event) -> (Event, Option<String>, Option<String>) {
    let topic = ev.headers().get(X_ORIGINAL_TOPIC).map(str::to_owned);
    let subject = ev.headers().get(X_ORIGINAL_SUBJECT).map(str::to_owned);
    let h = ev.headers_mut();
    for name in DEAD_LETTER_HEADERS {
        h.remove(name);
    }
    (ev, topic, subject)
}

/// A header value: control characters become spaces, at most 1 KiB.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect();
    if out.len() > MAX_MESSAGE_LEN {
        let mut cut = MAX_MESSAGE_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
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
