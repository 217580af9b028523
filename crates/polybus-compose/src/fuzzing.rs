//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Not part of the API: no
//! semver promise, hidden from the docs. They expose the spool record codec, which reads what
//! the spool finds on disk.

use polybus_core::{Event, Result};

use crate::codec::{RecordState, SpoolRecord};

/// One decoded spool record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record(SpoolRecord);

impl Record {
    /// The spooled event.
    pub fn event(&self) -> &Event {
        &self.0.event
    }

    /// The record's bytes, as the spool writes them.
    pub fn encode(&self) -> Vec<u8> {
        self.0.encode()
    }
}

/// Decodes a record as the spool does when it reads one back.
///
/// # Errors
/// [`ErrorKind::Codec`](polybus_core::ErrorKind::Codec) for truncated or unknown input.
pub fn decode(bytes: &[u8]) -> Result<Record> {
    SpoolRecord::decode(bytes).map(Record)
}

/// The bytes the spool writes for `event` published to `subject` and forwarded to `topic`,
/// after `attempts` failed forwards (dead-lettered when `dead_letter`, with `last_error`).
pub fn encode(
    subject: &str,
    topic: &str,
    event: Event,
    attempts: u32,
    dead_letter: bool,
    last_error: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut rec = SpoolRecord::new(subject, topic, event);
    rec.attempts = attempts;
    rec.failures = attempts;
    if dead_letter {
        rec.state = RecordState::DeadLetter;
    }
    if let Some((kind, message)) = last_error {
        rec.last_error_kind = Some(kind.to_owned());
        rec.last_error = Some(message.to_owned());
    }
    rec.encode()
}
