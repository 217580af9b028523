//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Not part of the API: no
//! semver promise, hidden from the docs. They call the crate's private CloudEvents MQTT
//! binding with the parts of a PUBLISH, so a fuzz target needs no broker.

use bytes::Bytes;
use polybus_core::cloudevents::Mode;
use polybus_core::{Event, Result};

use crate::Protocol;
use crate::convert;

/// The parts of a PUBLISH the binding fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The payload.
    pub payload: Bytes,
    /// The MQTT 5 User Properties, in order (none on 3.1.1).
    pub user_properties: Vec<(String, String)>,
    /// The MQTT 5 Content Type property.
    pub content_type: Option<String>,
}

/// Encodes `event` as the publisher does for `protocol` in `mode` (3.1.1 is always
/// structured).
///
/// # Errors
/// What the publisher's encoding returns (a header 3.1.1 cannot carry, a JSON payload that
/// does not parse in structured mode, ...).
pub fn encode(event: Event, protocol: Protocol, mode: Mode) -> Result<Publish> {
    let enc = convert::encode_owned(event, protocol, mode)?;
    Ok(Publish {
        payload: enc.payload,
        user_properties: enc.user_properties,
        content_type: enc.content_type,
    })
}

/// Decodes a received PUBLISH as the consumer does.
///
/// # Errors
/// [`ErrorKind::Codec`](polybus_core::ErrorKind::Codec) for a malformed CloudEvent.
pub fn decode(
    payload: Bytes,
    user_properties: Vec<(String, String)>,
    content_type: Option<&str>,
) -> Result<Event> {
    convert::decode_owned(payload, user_properties, content_type)
}
