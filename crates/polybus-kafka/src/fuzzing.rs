//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Not part of the API: no
//! semver promise, hidden from the docs. They call the crate's private CloudEvents Kafka
//! binding with plain values instead of rdkafka messages, so a fuzz target needs no broker.

use bytes::Bytes;
use polybus_core::cloudevents::Mode;
use polybus_core::{Event, Result};
use rdkafka::message::Headers as _;

use crate::KeyMapper;
use crate::convert::{self, Origin};

/// A record as the producer would send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record key.
    pub key: Option<Bytes>,
    /// The record value.
    pub value: Bytes,
    /// The headers in order; `None` is a header without a value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Encodes `event` as the producer does in `mode`, with the default key mapper (the event key).
///
/// # Errors
/// What the producer's encoding returns (a JSON payload that does not parse in structured
/// mode, ...).
pub fn encode(event: &Event, mode: Mode) -> Result<Record> {
    let enc = convert::encode(event, mode, &KeyMapper::EventKey)?;
    let headers = enc
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
        .collect();
    Ok(Record {
        key: enc.key,
        value: enc.value,
        headers,
    })
}

/// Decodes a received record from its parts, as the consumer does for a record of `topic` at
/// `partition` and `offset`.
///
/// # Errors
/// [`ErrorKind::Codec`](polybus_core::ErrorKind::Codec) for a malformed CloudEvent.
pub fn decode(
    value: Bytes,
    key: Option<Bytes>,
    headers: &[(&str, Option<&[u8]>)],
    timestamp_ms: Option<i64>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Event> {
    let origin = Origin {
        topic,
        partition,
        offset,
    };
    convert::decode_parts(value, key, headers, timestamp_ms, &origin)
}
