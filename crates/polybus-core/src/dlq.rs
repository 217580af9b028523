//! The one dead-letter format of polybus: the headers a dead letter carries and how its topic
//! is named. The composed bus (`polybus-compose`) and the runtime (`polybus-runtime`) both
//! write it, so one redrive tool reads both.
//!
//! Modelled on Spring Cloud Stream's `x-original-*` / `x-exception-*` headers. A dead letter
//! keeps the event's key, id, source, payload and every original header, and adds:
//!
//! | header | value |
//! |---|---|
//! | [`X_ORIGINAL_TOPIC`] | the topic the event was read from (or meant for) |
//! | [`X_ORIGINAL_SUBJECT`] | the NATS subject it was published to (bus forwards only) |
//! | [`X_ORIGINAL_PARTITION`], [`X_ORIGINAL_OFFSET`] | where it was read, when the backend has positions |
//! | [`X_EXCEPTION_KIND`] | the kind of the last error ([`ErrorKind::as_str`](crate::ErrorKind::as_str), or `panic`) |
//! | [`X_EXCEPTION_MESSAGE`] | the last error as text, at most 1 KiB, control characters replaced |
//! | [`X_ATTEMPTS`] | how many attempts were made |
//!
//! ```
//! use polybus_core::dlq::{self, DeadLetter, X_ATTEMPTS, X_ORIGINAL_TOPIC};
//! use polybus_core::Event;
//!
//! let ev = Event::builder().key("k1").header("tenant", "eu").build()?;
//! let dead = DeadLetter::new("orders", "rejected", "no such customer", 5).apply(ev);
//! assert_eq!(dead.headers().get(X_ORIGINAL_TOPIC), Some("orders"));
//! assert_eq!(dead.headers().get(X_ATTEMPTS), Some("5"));
//! assert_eq!(dead.key(), Some(&b"k1"[..]));
//! let (back, topic) = dlq::strip(dead);
//! assert_eq!(topic.as_deref(), Some("orders"));
//! assert_eq!(back.headers().len(), 1);
//! # Ok::<(), polybus_core::Error>(())
//! ```

use crate::Event;

/// Header: the topic the event was read from (runtime) or meant for (bus forwards).
pub const X_ORIGINAL_TOPIC: &str = "x-original-topic";
/// Header: the NATS subject the event was published to (bus forwards only).
pub const X_ORIGINAL_SUBJECT: &str = "x-original-subject";
/// Header: the partition the event was read from.
pub const X_ORIGINAL_PARTITION: &str = "x-original-partition";
/// Header: the offset or stream sequence the event was read from.
pub const X_ORIGINAL_OFFSET: &str = "x-original-offset";
/// Header: the last error, as text.
pub const X_EXCEPTION_MESSAGE: &str = "x-exception-message";
/// Header: the kind of the last error (`rejected`, `payload too large`, `panic`, ...).
pub const X_EXCEPTION_KIND: &str = "x-exception-kind";
/// Header: how many attempts were made.
pub const X_ATTEMPTS: &str = "x-attempts";
/// Header: the id a redriven event had when the target deduplicates by id (JetStream) and so
/// it had to be published again under a new id (written by the runtime's redrive, not part of
/// a dead letter).
pub const X_ORIGINAL_ID: &str = "x-original-id";

/// Every header a dead letter gets (and [`strip`] removes).
pub const DEAD_LETTER_HEADERS: [&str; 7] = [
    X_ORIGINAL_TOPIC,
    X_ORIGINAL_SUBJECT,
    X_ORIGINAL_PARTITION,
    X_ORIGINAL_OFFSET,
    X_EXCEPTION_MESSAGE,
    X_EXCEPTION_KIND,
    X_ATTEMPTS,
];

/// The longest [`X_EXCEPTION_MESSAGE`] written, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// How the dead-letter topic of a topic is named.
///
/// ```
/// use polybus_core::dlq::DeadLetterTopic;
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

/// Why an event became a dead letter: what [`apply`](Self::apply) writes into its headers.
///
/// ```
/// use polybus_core::dlq::{DeadLetter, X_ORIGINAL_OFFSET};
/// use polybus_core::Event;
/// let dead = DeadLetter::new("t", "codec error", "bad json", 1)
///     .partition(Some(2))
///     .offset(Some(41))
///     .apply(Event::new(b"{"));
/// assert_eq!(dead.headers().get(X_ORIGINAL_OFFSET), Some("41"));
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    topic: &'a str,
    subject: Option<&'a str>,
    partition: Option<i32>,
    offset: Option<u64>,
    kind: &'a str,
    message: &'a str,
    attempts: u32,
}

impl<'a> DeadLetter<'a> {
    /// A dead letter from `topic` after `attempts` attempts, the last failing with an error of
    /// `kind` (for example [`ErrorKind::as_str`](crate::ErrorKind::as_str)) and `message`.
    pub fn new(topic: &'a str, kind: &'a str, message: &'a str, attempts: u32) -> Self {
        DeadLetter {
            topic,
            subject: None,
            partition: None,
            offset: None,
            kind,
            message,
            attempts,
        }
    }
    /// Sets the NATS subject ([`X_ORIGINAL_SUBJECT`]).
    pub fn subject(mut self, subject: Option<&'a str>) -> Self {
        self.subject = subject;
        self
    }
    /// Sets the partition ([`X_ORIGINAL_PARTITION`]).
    pub fn partition(mut self, partition: Option<i32>) -> Self {
        self.partition = partition;
        self
    }
    /// Sets the offset or sequence ([`X_ORIGINAL_OFFSET`]).
    pub fn offset(mut self, offset: Option<u64>) -> Self {
        self.offset = offset;
        self
    }

    /// `event` as a dead letter: earlier dead-letter headers are replaced, everything else is
    /// kept.
    pub fn apply(&self, mut event: Event) -> Event {
        let h = event.headers_mut();
        for name in DEAD_LETTER_HEADERS {
            h.remove(name);
        }
        h.append_unchecked(X_ORIGINAL_TOPIC, clean(self.topic));
        if let Some(s) = self.subject {
            h.append_unchecked(X_ORIGINAL_SUBJECT, clean(s));
        }
        if let Some(p) = self.partition {
            h.append_unchecked(X_ORIGINAL_PARTITION, p.to_string());
        }
        if let Some(o) = self.offset {
            h.append_unchecked(X_ORIGINAL_OFFSET, o.to_string());
        }
        h.append_unchecked(X_EXCEPTION_MESSAGE, clean(self.message));
        h.append_unchecked(X_EXCEPTION_KIND, clean(self.kind));
        h.append_unchecked(X_ATTEMPTS, self.attempts.to_string());
        event
    }
}

/// Removes the dead-letter headers; returns the event and its original topic, if it had one.
/// Read [`X_ORIGINAL_SUBJECT`] before stripping where it matters.
pub fn strip(mut event: Event) -> (Event, Option<String>) {
    let topic = event.headers().get(X_ORIGINAL_TOPIC).map(str::to_owned);
    let h = event.headers_mut();
    for name in DEAD_LETTER_HEADERS {
        h.remove(name);
    }
    (event, topic)
}

/// A header value: control characters (but tab) become spaces, at most [`MAX_MESSAGE_LEN`]
/// bytes, cut on a character boundary.
pub fn clean(s: &str) -> String {
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
    use crate::validate_header;

    #[test]
    fn apply_replaces_stale_headers_and_keeps_the_rest() {
        let ev = Event::builder()
            .id("e1")
            .key("k1")
            .header("tenant", "eu")
            .header(X_ATTEMPTS, "stale")
            .build()
            .unwrap();
        let dead = DeadLetter::new("orders", "rejected", "a\nb", 3)
            .subject(Some("orders.s"))
            .apply(ev);
        let h = dead.headers();
        assert_eq!(h.get_all(X_ATTEMPTS).collect::<Vec<_>>(), ["3"]);
        assert_eq!(h.get(X_EXCEPTION_MESSAGE), Some("a b"));
        assert_eq!(h.get(X_ORIGINAL_SUBJECT), Some("orders.s"));
        assert_eq!(h.get(X_ORIGINAL_PARTITION), None);
        assert_eq!((dead.id(), dead.key()), ("e1", Some(&b"k1"[..])));
        for (n, v) in h.iter() {
            validate_header(n, v).unwrap();
        }
        let (back, topic) = strip(dead);
        assert_eq!(topic.as_deref(), Some("orders"));
        assert_eq!(back.headers().len(), 1);
    }

    #[test]
    fn clean_cuts_long_messages_on_a_char_boundary() {
        let s = "é".repeat(MAX_MESSAGE_LEN);
        let c = clean(&s);
        assert!(c.len() <= MAX_MESSAGE_LEN && c.len() >= MAX_MESSAGE_LEN - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
    }
}
