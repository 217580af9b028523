//! CloudEvents 1.0 mapping shared by every broker binding.
//!
//! An [`Event`] maps onto CloudEvents like this: `id` → `id`, `source` → `source`, `kind` →
//! `type`, `time` → `time`, `content_type` → `datacontenttype`, `key` (when UTF-8) →
//! `partitionkey`, and each header whose name is a legal extension name (lowercase ASCII
//! letters and digits, at most 20 characters) → that extension. Other headers, and the W3C
//! trace headers `traceparent`/`tracestate`, travel as plain broker headers.
//!
//! Bindings call [`write_binary`] to emit attributes in binary mode and feed what they receive
//! into a [`BinaryDecoder`]; [`to_structured`] and [`from_structured`] handle structured mode
//! (`application/cloudevents+json`).

use std::borrow::Cow;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::{Error, ErrorKind, Event, Headers, Result, time};

/// The CloudEvents spec version polybus writes and reads.
pub const SPECVERSION: &str = "1.0";
/// The content type of a structured-mode JSON CloudEvent.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Headers that stay plain broker headers even though their names are legal extension names:
/// W3C trace context is propagated under its own names on every broker.
pub const PLAIN_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Which CloudEvents content mode a binding writes.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Attributes in broker headers, payload as the message body (the default).
    #[default]
    Binary,
    /// The whole event as one `application/cloudevents+json` document.
    Structured,
}

/// What a publisher writes around the payload: the CloudEvents binding (the default) or the
/// lean format for hot paths.
///
/// * [`CloudEvents`](WireFormat::CloudEvents): every attribute (`specversion`, `id`, `source`,
///   `type`, `time`, ...) in the binding's headers or, with [`Mode::Structured`], in a JSON
///   document. Any CloudEvents reader understands the message, and the id travels, so
///   consumers can deduplicate by `source` + `id`.
/// * [`Lean`](WireFormat::Lean): the payload plus only what the caller set on the event (its
///   key, its headers, its content type) and the trace context when there is a trace to
///   continue. No `specversion`, `id`, `source`, `type` or `time`: a consumer reads the message
///   as one from a plain client and fills id and time from what the broker knows (see
///   docs/WIRE-FORMAT.md, "Messages without a CloudEvents id"). The content mode is ignored.
///
/// Bindings that do not offer the lean format yet write the CloudEvents binding.
///
/// ```
/// use polybus_core::cloudevents::WireFormat;
///
/// assert_eq!(WireFormat::default(), WireFormat::CloudEvents);
/// assert!(WireFormat::Lean.is_lean());
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireFormat {
    /// The full CloudEvents binding (the default).
    #[default]
    CloudEvents,
    /// The payload and what the caller set, nothing more.
    Lean,
}

impl WireFormat {
    /// Whether this is [`WireFormat::Lean`].
    pub fn is_lean(self) -> bool {
        matches!(self, WireFormat::Lean)
    }
}

/// Whether `name` is a legal CloudEvents extension attribute name that polybus maps
/// (lowercase ASCII letters and digits, 1 to 20 characters, not a trace header).
pub fn is_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !PLAIN_HEADERS.contains(&name)
        && !is_context_attribute(name)
}

fn is_context_attribute(name: &str) -> bool {
    matches!(
        name,
        "id" | "source"
            | "type"
            | "specversion"
            | "time"
            | "datacontenttype"
            | "dataschema"
            | "subject"
            | "partitionkey"
            | "data"
            | "data_base64"
    )
}

/// Emits `ev` in binary mode: `attr(name, value)` for each CloudEvents attribute (context
/// attributes, `datacontenttype`, `partitionkey`, extensions) and `header(name, value)` for each
/// header that is not an extension. The binding adds its prefix and encoding.
///
/// [`write_binary_owned`] does the same without copying what it hands over; this one clones
/// the event for it.
pub fn write_binary(
    ev: &Event,
    mut attr: impl FnMut(&str, &str),
    mut header: impl FnMut(&str, &str),
) {
    write_binary_owned(
        ev.clone(),
        |name, value| attr(&name, &value),
        |name, value| header(&name, &value),
    );
}

/// [`write_binary`] for an event the binding owns: values are handed over as they are held
/// (the id, the time and header values owned, so a binding that needs owned strings moves them
/// instead of copying), attribute and header names as `Cow` (`'static` for the context
/// attributes and for polybus' own headers such as `traceparent`). Returns the payload.
///
/// The order of the calls is that of [`write_binary`]: `specversion`, `id`, `source`, `type`,
/// `time`, `datacontenttype`, `partitionkey`, then the headers in their order.
///
/// ```
/// use std::borrow::Cow;
/// use polybus_core::{Event, cloudevents::write_binary_owned};
///
/// let ev = Event::builder().kind("k").header("tenant", "eu").header("X-Req", "1").data("d").build()?;
/// let (mut attrs, mut plain) = (Vec::new(), Vec::new());
/// let data = write_binary_owned(
///     ev,
///     |name, value| attrs.push((name.into_owned(), value.into_owned())),
///     |name, value| plain.push((name, value)),
/// );
/// assert_eq!(attrs[0], ("specversion".to_owned(), "1.0".to_owned()));
/// assert!(attrs.contains(&("tenant".to_owned(), "eu".to_owned())));
/// assert_eq!(plain, [(Cow::Owned("X-Req".to_owned()), "1".to_owned())]);
/// assert_eq!(data, "d");
/// # Ok::<(), polybus_core::Error>(())
/// ```
pub fn write_binary_owned(
    ev: Event,
    mut attr: impl FnMut(Cow<'static, str>, Cow<'_, str>),
    mut header: impl FnMut(Cow<'static, str>, String),
) -> Bytes {
    let parts = ev.into_parts();
    attr(Cow::Borrowed("specversion"), Cow::Borrowed(SPECVERSION));
    attr(
        Cow::Borrowed("id"),
        Cow::Owned(parts.id.unwrap_or_else(crate::new_id)),
    );
    attr(
        Cow::Borrowed("source"),
        parts.source.unwrap_or(Cow::Borrowed(crate::DEFAULT_SOURCE)),
    );
    attr(Cow::Borrowed("type"), parts.kind);
    attr(
        Cow::Borrowed("time"),
        Cow::Owned(time::format_rfc3339(parts.time)),
    );
    if let Some(ct) = parts.content_type {
        attr(Cow::Borrowed("datacontenttype"), ct);
    }
    if let Some(key) = parts
        .key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
    {
        attr(Cow::Borrowed("partitionkey"), Cow::Borrowed(key));
    }
    // Which entries are attributes, decided before the names are moved out (the rule looks
    // back at earlier names). A bit per entry; a vector only past 64 entries.
    let mut small = 0u64;
    let mut large = Vec::new();
    for (i, (name, _)) in parts.headers.iter().enumerate() {
        let is_attr = is_attribute_entry(&parts.headers, i, name);
        match u32::try_from(i) {
            Ok(bit) if bit < 64 => small |= u64::from(is_attr) << bit,
            _ => large.push(is_attr),
        }
    }
    for (i, (name, value)) in parts.headers.into_entries().into_iter().enumerate() {
        let is_attr = match u32::try_from(i) {
            Ok(bit) if bit < 64 => small >> bit & 1 == 1,
            _ => large.get(i - 64).copied().unwrap_or(false),
        };
        if is_attr {
            attr(name, Cow::Owned(value));
        } else {
            header(name, value);
        }
    }
    parts.data
}

/// What the lean wire format ([`WireFormat::Lean`]) writes of an event, besides its headers:
/// see [`write_lean_owned`].
#[derive(Debug)]
#[non_exhaustive]
pub struct LeanParts {
    /// The payload.
    pub data: Bytes,
    /// The partition key, if the caller set one.
    pub key: Option<Bytes>,
    /// The content type, if the caller set one.
    pub content_type: Option<Cow<'static, str>>,
}

/// Takes `ev` apart for the lean wire format: `header(name, value)` for each header in order
/// (names and values moved, no extension mapping: every header is a plain header), and the
/// payload, key and content type returned. Nothing is formatted or allocated here: the id,
/// source, type and time of the event are not written.
///
/// ```
/// use polybus_core::{Event, cloudevents::write_lean_owned};
///
/// let ev = Event::builder().key("k").header("tenant", "eu").data("d").build()?;
/// let mut headers = Vec::new();
/// let parts = write_lean_owned(ev, |name, value| headers.push((name.into_owned(), value)));
/// assert_eq!(headers, [("tenant".to_owned(), "eu".to_owned())]);
/// assert_eq!(parts.data, "d");
/// assert_eq!(parts.key.as_deref(), Some(&b"k"[..]));
/// assert_eq!(parts.content_type, None);
/// # Ok::<(), polybus_core::Error>(())
/// ```
pub fn write_lean_owned(ev: Event, mut header: impl FnMut(Cow<'static, str>, String)) -> LeanParts {
    let parts = ev.into_parts();
    if !parts.headers.is_empty() {
        for (name, value) in parts.headers.into_entries() {
            header(name, value);
        }
    }
    LeanParts {
        data: parts.data,
        key: parts.key,
        content_type: parts.content_type,
    }
}

/// Whether header `i` (named `name`) becomes a CloudEvents extension attribute: its name is an
/// extension name and no earlier header has the same name (header names match
/// case-insensitively, so `Tenant` before `tenant` counts). CloudEvents attributes are
/// single-valued, so a second value of the same name travels as a plain header and comes back
/// as a header of that name: nothing is lost in either mode, and the first value stays first.
fn is_attribute_entry(headers: &Headers, i: usize, name: &str) -> bool {
    is_extension_name(name)
        && !headers
            .iter()
            .take(i)
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// Collects attributes and headers received in binary mode and builds the [`Event`].
///
/// If no `specversion` attribute arrives, the message was not written as a CloudEvent (a raw
/// client published it): it becomes an event with a fresh id, default source and kind, and
/// every header kept as a plain header.
#[derive(Debug, Default)]
pub struct BinaryDecoder {
    /// `Ok` for 1.0 (nothing kept), the value received otherwise.
    specversion: Option<std::result::Result<(), String>>,
    id: Option<String>,
    source: Option<String>,
    kind: Option<String>,
    /// Parsed on arrival; the text when it is not RFC 3339.
    time: Option<std::result::Result<SystemTime, String>>,
    content_type: Option<String>,
    key: Option<Bytes>,
    headers: Headers,
}

impl BinaryDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A CloudEvents attribute (name without the binding's prefix). The value is only
    /// copied where the event keeps it: `specversion` is checked and `time` parsed in place.
    pub fn attribute(&mut self, name: &str, value: impl AsRef<str> + Into<String>) {
        match name {
            "specversion" => {
                self.specversion = Some(if value.as_ref() == SPECVERSION {
                    Ok(())
                } else {
                    Err(value.into())
                });
            }
            "time" => {
                self.time = Some(time::parse_rfc3339(value.as_ref()).ok_or_else(|| value.into()));
            }
            "id" => self.id = Some(value.into()),
            "source" => self.source = Some(value.into()),
            "type" => self.kind = Some(value.into()),
            "datacontenttype" => self.content_type = Some(value.into()),
            "partitionkey" => {
                if self.key.is_none() {
                    self.key = Some(Bytes::from(value.into()));
                }
            }
            _ => self.headers.append_unchecked(name, value),
        }
    }

    /// A plain broker header.
    pub fn header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.headers.append_unchecked(name, value);
    }

    /// The content type from the binding's own header (Kafka `content-type`, MQTT Content
    /// Type property), unless an attribute already set it.
    pub fn content_type(&mut self, value: impl Into<String>) {
        if self.content_type.is_none() {
            self.content_type = Some(value.into());
        }
    }

    /// The partition key from the binding's own field (the Kafka record key); wins over the
    /// `partitionkey` attribute.
    pub fn key(&mut self, key: Bytes) {
        self.key = Some(key);
    }

    /// Builds the event around `data`.
    ///
    /// # Errors
    /// [`ErrorKind::Codec`] tagged with `backend` when the message claims to be a CloudEvent
    /// (has `specversion`) but a required attribute is missing, the spec version is not 1.0,
    /// or the time is not RFC 3339.
    pub fn finish(self, data: Bytes, backend: &'static str) -> Result<Event> {
        let Some(spec) = self.specversion else {
            let mut ev = Event::new(data);
            ev.set_key(self.key);
            ev.set_content_type(self.content_type.map(Cow::Owned));
            *ev.headers_mut() = self.headers;
            return Ok(ev);
        };
        let codec = |msg: String| Error::new(ErrorKind::Codec, backend).with_message(msg);
        if let Err(spec) = spec {
            return Err(codec(format!(
                "unsupported CloudEvents specversion {spec:?}"
            )));
        }
        let required = |v: Option<String>, name: &str| {
            v.filter(|s| !s.is_empty())
                .ok_or_else(|| codec(format!("CloudEvent without `{name}`")))
        };
        let id = required(self.id, "id")?;
        let source = required(self.source, "source")?;
        let kind = required(self.kind, "type")?;
        // With the received id from the start: a fresh one would cost a UUIDv7 (and a system
        // call for its random bits) per received message, only to be replaced.
        let mut ev = Event::with_id(id, data);
        ev.set_key(self.key);
        ev.set_content_type(self.content_type.map(Cow::Owned));
        *ev.headers_mut() = self.headers;
        ev.set_source(source);
        ev.set_kind(kind);
        if let Some(t) = self.time {
            let ts = t.map_err(|t| codec(format!("CloudEvent `time` {t:?} is not RFC 3339")))?;
            ev.set_time(ts);
        }
        Ok(ev)
    }
}

/// Headers a structured-mode event carries beside the JSON document, as `(name, value)`.
pub type PlainHeaders<'e> = Vec<(&'e str, &'e str)>;

/// Encodes `ev` as a structured-mode JSON CloudEvent. JSON payloads (content type
/// `application/json` or `*+json`) are embedded as `data`, UTF-8 text as a string `data`, and
/// anything else as `data_base64`. Headers that are not extensions are returned for the binding
/// to carry as broker headers.
///
/// # Errors
/// [`ErrorKind::Codec`] if the payload is declared JSON but does not parse.
pub fn to_structured<'e>(
    ev: &'e Event,
    backend: &'static str,
) -> Result<(Vec<u8>, PlainHeaders<'e>)> {
    let mut obj = Map::new();
    write_binary(
        ev,
        |name, value| {
            obj.insert(name.to_owned(), Value::String(value.to_owned()));
        },
        |_, _| {},
    );
    let plain: Vec<(&str, &str)> = ev
        .headers()
        .iter()
        .enumerate()
        .filter(|(i, (n, _))| !is_attribute_entry(ev.headers(), *i, n))
        .map(|(_, h)| h)
        .collect();
    let data = ev.data();
    let mut raw_json = None;
    if !data.is_empty() {
        let is_json = ev.content_type().is_some_and(is_json_content_type);
        if is_json {
            raw_json = Some(checked_json(data).ok_or_else(|| {
                Error::new(ErrorKind::Codec, backend)
                    .with_message("payload declared JSON does not parse")
            })?);
        } else if let (Some(true), Ok(text)) = (
            ev.content_type().map(|ct| ct.starts_with("text/")),
            std::str::from_utf8(data),
        ) {
            obj.insert("data".into(), Value::String(text.to_owned()));
        } else {
            obj.insert("data_base64".into(), Value::String(BASE64.encode(data)));
        }
    }
    let mut bytes = serde_json::to_vec(&Value::Object(obj))
        .map_err(|e| Error::new(ErrorKind::Codec, backend).with_source(e))?;
    if let Some(raw) = raw_json {
        // The payload goes in as it is (less surrounding whitespace), not re-serialized from a
        // parsed value: its numbers keep every digit (an integer beyond 64 bits is not turned
        // into a float), and the payload is not parsed into a tree on the publish path.
        // `bytes` is a JSON object with at least `specversion`, so it ends with `}`.
        bytes.pop();
        bytes.extend_from_slice(b",\"data\":");
        bytes.extend_from_slice(raw);
        bytes.push(b'}');
    }
    Ok((bytes, plain))
}

/// `data` without surrounding JSON whitespace if it is one JSON value (UTF-8, valid syntax,
/// nothing after it), else `None`.
fn checked_json(data: &[u8]) -> Option<&[u8]> {
    std::str::from_utf8(data).ok()?;
    serde_json::from_slice::<serde::de::IgnoredAny>(data).ok()?;
    Some(data.trim_ascii())
}

/// Decodes a structured-mode JSON CloudEvent.
///
/// # Errors
/// [`ErrorKind::Codec`] tagged with `backend` for anything that is not a JSON object with
/// `specversion` 1.0, `id`, `source` and `type`, or whose `data_base64` is not base64.
pub fn from_structured(bytes: &[u8], backend: &'static str) -> Result<Event> {
    let codec = |msg: &str| Error::new(ErrorKind::Codec, backend).with_message(msg.to_owned());
    let not_json = |e: Option<serde_json::Error>| {
        let err = codec("structured CloudEvent is not JSON");
        match e {
            Some(e) => err.with_source(e),
            None => err,
        }
    };
    // Validate the whole document first, then read its top-level members as text: values keep
    // their exact spelling (an integer beyond 64 bits stays an integer, `data` keeps its
    // bytes), and no tree of the payload is built.
    let text = std::str::from_utf8(bytes).map_err(|_| not_json(None))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| not_json(Some(e)))?;
    let Some(members) = json::object_members(text) else {
        return Err(codec("structured CloudEvent is not a JSON object"));
    };
    // A name given twice: the last value counts (as serde_json's map, which this replaces).
    let mut obj: std::collections::BTreeMap<String, &str> = std::collections::BTreeMap::new();
    for (name, value) in members {
        obj.insert(json::string(name).ok_or_else(|| not_json(None))?, value);
    }
    let mut dec = BinaryDecoder::new();
    let mut data = Bytes::new();
    let mut data_value = None;
    for (name, value) in obj {
        let first = value.as_bytes().first().copied();
        match (name.as_str(), first) {
            (_, Some(b'n')) => {}
            ("data", _) => data_value = Some(value),
            ("data_base64", Some(b'"')) => {
                let s = json::string(value).ok_or_else(|| not_json(None))?;
                data = Bytes::from(
                    BASE64
                        .decode(s.as_bytes())
                        .map_err(|e| codec("`data_base64` is not base64").with_source(e))?,
                );
            }
            ("data_base64", _) => return Err(codec("`data_base64` is not a string")),
            (_, Some(b'"')) => {
                dec.attribute(&name, json::string(value).ok_or_else(|| not_json(None))?);
            }
            // A number or a boolean, as written.
            (_, Some(b'-' | b'0'..=b'9' | b't' | b'f')) => dec.attribute(&name, value),
            (_, _) => return Err(codec("a CloudEvents attribute is not a scalar")),
        }
    }
    if dec.specversion.is_none() {
        return Err(codec("structured CloudEvent without `specversion`"));
    }
    // JSON event format, 3.1: with a JSON content type (or none, which implies JSON) `data`
    // is the payload as a JSON value, so a JSON string stays a quoted JSON string; with any
    // other content type a string `data` is the payload's text.
    match data_value {
        Some(v)
            if v.starts_with('"')
                && dec
                    .content_type
                    .as_deref()
                    .is_some_and(|ct| !is_json_content_type(ct)) =>
        {
            data = Bytes::from(json::string(v).ok_or_else(|| not_json(None))?);
        }
        Some(v) => data = Bytes::copy_from_slice(v.as_bytes()),
        None => {}
    }
    dec.finish(data, backend)
}

/// Reading the top level of a JSON document that serde_json has already validated.
mod json {
    /// The members of the top-level object of `doc` (valid JSON): each name as its JSON string
    /// token (quotes included) and each value as its text; `None` if the top level is not an
    /// object.
    pub(super) fn object_members(doc: &str) -> Option<Vec<(&str, &str)>> {
        let b = doc.as_bytes();
        let mut i = skip_ws(b, 0);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let mut members = Vec::new();
        if b.get(i) == Some(&b'}') {
            return Some(members);
        }
        loop {
            let name_end = value_end(b, i)?;
            let name = doc.get(i..name_end)?;
            i = skip_ws(b, name_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(b, i + 1);
            let end = value_end(b, start)?;
            members.push((name, doc.get(start..end)?));
            i = skip_ws(b, end);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => return Some(members),
                _ => return None,
            }
        }
    }

    /// A JSON string token decoded (`None` if it is not one, or has a lone surrogate).
    pub(super) fn string(token: &str) -> Option<String> {
        match token.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(inner) if !inner.contains('\\') => Some(inner.to_owned()),
            _ => serde_json::from_str(token).ok(),
        }
    }

    fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while b
            .get(i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            i += 1;
        }
        i
    }

    /// The end of the value starting at `i` (valid JSON assumed; `None` past the end).
    fn value_end(b: &[u8], i: usize) -> Option<usize> {
        match *b.get(i)? {
            b'"' => {
                let mut j = i + 1;
                loop {
                    match *b.get(j)? {
                        b'\\' => j += 2,
                        b'"' => return Some(j + 1),
                        _ => j += 1,
                    }
                }
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    match *b.get(j)? {
                        b'"' => {
                            j = value_end(b, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            _ => {
                let mut j = i;
                while b.get(j).is_some_and(|c| {
                    !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                }) {
                    j += 1;
                }
                Some(j)
            }
        }
    }
}

/// Whether `ct` is a JSON media type (`application/json`, `*/*+json`, with parameters).
pub fn is_json_content_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json") || media.to_ascii_lowercase().ends_with("+json")
}

/// Whether `ct` announces a structured-mode CloudEvent.
pub fn is_structured_content_type(ct: &str) -> bool {
    ct.split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(STRUCTURED_CONTENT_TYPE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found by the `mqtt_v5` fuzz target: structured mode read the JSON number
    /// `6.6666666666666665e+41` as `6.666666666666667e+41` (serde_json's default float parser is
    /// not correctly rounded), so a JSON payload changed on every trip. `float_roundtrip` fixes it.
    #[test]
    fn structured_mode_keeps_json_numbers_exactly() {
        for n in [
            "6.6666666666666665e+41",
            "0.1",
            "1e-300",
            "2.2250738585072014e-308",
            "-0.0",
        ] {
            let doc = format!("{{\"n\":{n}}}");
            let ev = Event::builder()
                .content_type("application/json")
                .data(doc.clone())
                .build()
                .unwrap();
            let (json, _) = to_structured(&ev, "test").unwrap();
            let back = from_structured(&json, "test").unwrap();
            let sent: f64 = n.parse().unwrap();
            let v: serde_json::Value = serde_json::from_slice(back.data()).unwrap();
            assert_eq!(
                v["n"].as_f64().map(f64::to_bits),
                Some(sent.to_bits()),
                "{n}: {v}"
            );
        }
    }

    /// Integers beyond what an `f64` holds exactly (2^53 and up), and beyond 64 bits, keep
    /// every digit through structured mode, in `data` and in extensions; they were parsed into
    /// `serde_json::Value`, where anything past `u64`/`i64` became a float (`2^64` arrived as
    /// `18446744073709552000.0`).
    #[test]
    fn structured_mode_keeps_big_integers_exactly() {
        let numbers = [
            "9007199254740993",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1e400",
            "1.0",
        ];
        for n in numbers {
            let doc = format!("{{\"n\":{n},\"list\":[{n},{{\"deep\":{n}}}]}}");
            let ev = Event::builder()
                .content_type("application/json")
                .data(doc.clone())
                .build()
                .unwrap();
            let (json, _) = to_structured(&ev, "test").unwrap();
            let text = std::str::from_utf8(&json).unwrap();
            assert!(text.contains(&doc), "{n}: {text}");
            let back = from_structured(&json, "test").unwrap();
            assert_eq!(back.data(), doc.as_bytes(), "{n}");

            // A foreign structured event: a number in an extension and in `data`, spaced.
            let foreign = format!(
                "{{ \"specversion\": \"1.0\", \"id\": \"1\", \"source\": \"s\", \"type\": \"t\", \
                 \"seq\": {n}, \"datacontenttype\": \"application/json\", \"data\": {n} }}"
            );
            let ev = from_structured(foreign.as_bytes(), "test").unwrap();
            assert_eq!(ev.headers().get("seq"), Some(n), "{foreign}");
            assert_eq!(ev.data(), n.as_bytes(), "{foreign}");
            // And back out: the extension is a string attribute, `data` the number as written.
            let (json, _) = to_structured(&ev, "test").unwrap();
            let text = std::str::from_utf8(&json).unwrap();
            assert!(
                text.contains(&format!("\"seq\":\"{n}\""))
                    && text.ends_with(&format!(",\"data\":{n}}}")),
                "{text}"
            );
        }
    }

    /// The structured decoder reads the document's members itself (after serde_json
    /// validated it): escaped names, nesting, strings with brackets and escaped quotes, a name
    /// given twice (the last counts), and whitespace everywhere.
    #[test]
    fn structured_decoder_reads_members_like_serde_json() {
        let doc = br#" {
            "specversion" : "1.0", "id":"a\"b", "s\u006furce": "x}]", "type": "t",
            "ext": "first", "ext": "second", "flag": true, "datacontenttype": "text/plain",
            "data": "line \"one\" {["
        } "#;
        let ev = from_structured(doc, "test").unwrap();
        assert_eq!(ev.id(), "a\"b");
        assert_eq!(ev.source(), "x}]");
        assert_eq!(ev.headers().get("ext"), Some("second"));
        assert_eq!(ev.headers().get("flag"), Some("true"));
        assert_eq!(&ev.data()[..], b"line \"one\" {[");
        let json =
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":[1, "]}"]} }"#;
        assert_eq!(
            &from_structured(json, "test").unwrap().data()[..],
            br#"{"a":[1, "]}"]}"#
        );
        for bad in [
            &br#"{"specversion":"1.0","id":"1","source":"s","type":"t","x":[1]}"#[..],
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t"} x"#,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","x":"\ud800"}"#,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":1}"#,
            b"[1]",
            b"\xff",
        ] {
            let e = from_structured(bad, "test").unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::Codec,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Found by the `nats_structured` fuzz target: `tenAnt: a` then `tenant: b` (one header
    /// name, two values) wrote `b` as the extension and `a` as a plain header, so after a trip
    /// through Kafka or MQTT `headers().get("tenant")` was `b`. A value after an earlier one of
    /// the same name in another case is a plain header now, and the order is kept.
    #[test]
    fn a_name_repeated_in_another_case_is_not_an_extension() {
        let mut ev = Event::new(Bytes::new());
        ev.headers_mut().append("tenAnt", "a").unwrap();
        ev.headers_mut().append("tenant", "b").unwrap();
        let (mut attrs, mut plain) = (Vec::new(), Vec::new());
        write_binary(
            &ev,
            |n, _| attrs.push(n.to_owned()),
            |n, v| plain.push((n.to_owned(), v.to_owned())),
        );
        assert!(!attrs.iter().any(|n| n == "tenant"), "{attrs:?}");
        assert_eq!(
            plain,
            [
                ("tenAnt".to_owned(), "a".to_owned()),
                ("tenant".to_owned(), "b".to_owned())
            ]
        );
        let (_, plain) = to_structured(&ev, "test").unwrap();
        assert_eq!(plain, [("tenAnt", "a"), ("tenant", "b")]);
    }

    fn sample() -> Event {
        Event::builder()
            .id("id-1")
            .source("urn:test")
            .kind("order.created")
            .key("k1")
            .content_type("application/json")
            .header("tenant", "eu")
            .header("X-Custom", "v")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .data(&br#"{"a":1}"#[..])
            .build()
            .unwrap()
    }

    #[test]
    fn binary_round_trip_keeps_every_attribute() {
        let ev = sample();
        let mut dec = BinaryDecoder::new();
        let mut plain = Vec::new();
        write_binary(
            &ev,
            |n, v| dec.attribute(n, v),
            |n, v| plain.push((n.to_owned(), v.to_owned())),
        );
        assert_eq!(
            plain,
            [
                ("X-Custom".to_owned(), "v".to_owned()),
                (
                    "traceparent".to_owned(),
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()
                )
            ]
        );
        for (n, v) in plain {
            dec.header(n, v);
        }
        let back = dec.finish(ev.data().clone(), "t").unwrap();
        assert_eq!(back.id(), "id-1");
        assert_eq!(back.source(), "urn:test");
        assert_eq!(back.kind(), "order.created");
        assert_eq!(back.key(), Some(&b"k1"[..]));
        assert_eq!(back.content_type(), Some("application/json"));
        assert_eq!(back.headers().get("tenant"), Some("eu"));
        assert_eq!(back.headers().get("x-custom"), Some("v"));
        assert_eq!(
            time::format_rfc3339(back.time()),
            time::format_rfc3339(ev.time())
        );
    }

    #[test]
    fn structured_round_trip_embeds_json_and_base64() {
        let ev = sample();
        let (bytes, plain) = to_structured(&ev, "t").unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["data"]["a"], 1);
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(plain.len(), 2);
        let back = from_structured(&bytes, "t").unwrap();
        assert_eq!(back.id(), "id-1");
        assert_eq!(back.data(), &Bytes::from_static(br#"{"a":1}"#));

        let mut bin = Event::new(vec![0u8, 159, 146, 150]);
        bin.set_content_type(Some("application/octet-stream".into()));
        let (bytes, _) = to_structured(&bin, "t").unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.get("data_base64").is_some());
        assert_eq!(from_structured(&bytes, "t").unwrap().data(), bin.data());
    }

    #[test]
    fn raw_messages_without_specversion_are_plain_events() {
        let mut dec = BinaryDecoder::new();
        dec.header("X-Any", "1");
        let ev = dec.finish(Bytes::from_static(b"raw"), "t").unwrap();
        assert_eq!(ev.kind(), crate::event::DEFAULT_KIND);
        assert_eq!(ev.headers().get("x-any"), Some("1"));
    }

    #[test]
    fn malformed_cloudevents_are_codec_errors() {
        let mut dec = BinaryDecoder::new();
        dec.attribute("specversion", "1.0");
        dec.attribute("id", "x");
        let e = dec.finish(Bytes::new(), "t").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Codec);
        for bad in [
            &b"not json"[..],
            b"[1]",
            b"{\"id\":\"1\"}",
            b"{\"specversion\":\"0.3\",\"id\":\"1\",\"source\":\"s\",\"type\":\"t\"}",
            b"{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"s\",\"type\":\"t\",\"data_base64\":\"!!\"}",
            b"{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"s\",\"type\":\"t\",\"time\":\"noon\"}",
        ] {
            assert_eq!(from_structured(bad, "t").unwrap_err().kind(), ErrorKind::Codec);
        }
    }

    proptest! {
        #[test]
        fn structured_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = from_structured(&bytes, "t");
        }
    }
}
