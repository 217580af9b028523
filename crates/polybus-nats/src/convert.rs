//! Event <-> NATS message, following the CloudEvents NATS protocol binding (1.0.3).
//!
//! Binary mode (the default): each CloudEvents attribute becomes a `ce-<name>` header whose
//! value is percent-encoded as the binding requires (space, `"`, `%` and every byte outside
//! printable ASCII as `%XY`, upper-case hex); the payload is the event data unchanged. The
//! content type travels as `ce-datacontenttype` and, for readers that do not speak
//! CloudEvents, as `Content-Type` too. Headers that are not CloudEvents extensions (W3C
//! `traceparent`, `X-Request-Id`, ...) are plain NATS headers with their values unchanged.
//!
//! Structured mode: the payload is the JSON event format and `Content-Type` is
//! `application/cloudevents+json`.
//!
//! On receive the mode is detected as the binding says: a `Content-Type` starting with
//! `application/cloudevents` means structured, anything else binary. A message without
//! `ce-specversion` was not written as a CloudEvent and becomes a plain event (fresh id,
//! default kind and source) with every header kept; [`decode_event_with`] lets the caller
//! give such an event what the broker knows about the message (JetStream: a stable id).

use std::borrow::Cow;
use std::fmt::Write as _;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use polybus_core::cloudevents::{self, BinaryDecoder, Mode, WireFormat};
use polybus_core::{Error, ErrorKind, Event, Result};

/// The prefix of CloudEvents attribute headers in the NATS binding.
pub const CE_PREFIX: &str = "ce-";
/// The NATS header carrying the content type.
pub const CONTENT_TYPE: &str = "Content-Type";

/// Encodes `event` as NATS headers and payload in `mode`. The payload is not copied in binary
/// mode (a reference-counted clone of the event's `Bytes`). `backend` tags errors.
///
/// # Errors
/// [`ErrorKind::InvalidHeader`] for a plain header named `ce-...` (reserved for attributes) or
/// one NATS cannot carry; [`ErrorKind::Codec`] when structured mode cannot encode the payload.
///
/// ```
/// use polybus_core::{Event, cloudevents::Mode};
///
/// let ev = Event::builder().source("urn:shop orders").kind("order.created").build()?;
/// let (headers, _payload) = polybus_nats::encode_event(&ev, Mode::Binary, "nats")?;
/// assert_eq!(headers.get("ce-source").map(|v| v.as_str()), Some("urn:shop%20orders"));
/// assert_eq!(headers.get("ce-specversion").map(|v| v.as_str()), Some("1.0"));
/// # Ok::<(), polybus_core::Error>(())
/// ```
pub fn encode_event(
    event: &Event,
    mode: Mode,
    backend: &'static str,
) -> Result<(HeaderMap, Bytes)> {
    match mode {
        Mode::Structured => encode_structured(event, backend),
        _ => encode_binary(event.clone(), backend, None),
    }
}

fn encode_structured(event: &Event, backend: &'static str) -> Result<(HeaderMap, Bytes)> {
    let mut headers = HeaderMap::new();
    let mut failure: Option<Error> = None;
    let (json, plain) = cloudevents::to_structured(event, backend)?;
    for (name, value) in plain {
        put_plain(&mut headers, name, value, backend, &mut failure);
    }
    put(
        &mut headers,
        CONTENT_TYPE,
        cloudevents::STRUCTURED_CONTENT_TYPE,
        backend,
        &mut failure,
    );
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((headers, Bytes::from(json)))
}

/// The attributes a [`Template`] holds; `write_binary` skips them when one is used.
fn in_template(attribute: &str) -> bool {
    matches!(
        attribute,
        "specversion" | "source" | "type" | "datacontenttype"
    )
}

/// Binary mode. With `template` (the headers of `specversion`, `source`, `type` and the
/// content type of this very event, see [`Encoder`]) only the other attributes are added.
/// The event's owned strings (id, time, header values) move into the headers uncopied.
fn encode_binary(
    event: Event,
    backend: &'static str,
    template: Option<HeaderMap>,
) -> Result<(HeaderMap, Bytes)> {
    let templated = template.is_some();
    let content_type = match event.content_type() {
        Some(ct) if !templated && !is_structured(ct) => Some(ct.to_owned()),
        _ => None,
    };
    // Both callbacks of `write_binary_owned` fill the same map.
    let state = std::cell::RefCell::new((template.unwrap_or_default(), None));
    let data = cloudevents::write_binary_owned(
        event,
        |name, value| {
            if templated && in_template(&name) {
                return;
            }
            let (headers, failure) = &mut *state.borrow_mut();
            if failure.is_some() {
                return;
            }
            let value = encoded_value(value);
            match attribute_header(&name) {
                Some(known) => headers.insert(known, value),
                None => match HeaderName::try_from(format!("{CE_PREFIX}{name}")) {
                    Ok(n) => headers.append(n, value),
                    Err(_) => *failure = Some(cannot_carry(&name, backend)),
                },
            }
        },
        |name, value| {
            let (headers, failure) = &mut *state.borrow_mut();
            put_plain_checked(headers, name, value, backend, failure);
        },
    );
    let (mut headers, mut failure) = state.into_inner();
    if let Some(ct) = content_type {
        put(&mut headers, CONTENT_TYPE, &ct, backend, &mut failure);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((headers, data))
}

/// The lean wire format ([`WireFormat::Lean`]): the payload, the event's headers as plain NATS
/// headers (values moved), the key as `ce-partitionkey` (percent-encoded, when UTF-8) and the
/// content type as `Content-Type`; nothing else. An event with none of these gives an empty
/// map, which the publishers send as a message without headers.
///
/// # Errors
/// [`ErrorKind::InvalidHeader`] for a header named `ce-...` or `Content-Type` (reserved, as in
/// the CloudEvents binding) or one NATS cannot carry.
///
/// ```
/// use polybus_core::Event;
///
/// let (headers, payload) = polybus_nats::encode_lean(Event::new(b"hot"), "nats")?;
/// assert!(headers.is_empty());
/// assert_eq!(payload, "hot");
/// let ev = Event::builder().key("k 1").header("tenant", "eu").data("x").build()?;
/// let (headers, _) = polybus_nats::encode_lean(ev, "nats")?;
/// assert_eq!(headers.get("tenant").map(|v| v.as_str()), Some("eu"));
/// assert_eq!(headers.get("ce-partitionkey").map(|v| v.as_str()), Some("k%201"));
/// assert!(headers.get("ce-id").is_none());
/// # Ok::<(), polybus_core::Error>(())
/// ```
pub fn encode_lean(event: Event, backend: &'static str) -> Result<(HeaderMap, Bytes)> {
    if event.headers().is_empty() && event.key().is_none() && event.content_type().is_none() {
        // The hot path: nothing but the payload.
        return Ok((HeaderMap::new(), event.into_data()));
    }
    let mut headers = HeaderMap::new();
    let mut failure = None;
    let parts = cloudevents::write_lean_owned(event, |name, value| {
        put_plain_checked(&mut headers, name, value, backend, &mut failure);
    });
    if let Some(key) = parts
        .key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
    {
        put_attribute(
            &mut headers,
            HeaderName::from_static("ce-partitionkey"),
            &percent_encode(key),
            backend,
            &mut failure,
        );
    }
    if let Some(ct) = parts.content_type {
        put(&mut headers, CONTENT_TYPE, &ct, backend, &mut failure);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((headers, parts.data))
}

/// An attribute value percent-encoded as the binding says, moved when it needs no encoding.
/// Encoded values hold only printable ASCII, so NATS can carry every one.
fn encoded_value(value: Cow<'_, str>) -> HeaderValue {
    if any_needs_encoding(&value) {
        HeaderValue::from(percent_encode(&value).into_owned())
    } else {
        HeaderValue::from(value.into_owned())
    }
}

/// Encodes the events of one publisher like [`encode_event`], faster in binary mode: the
/// headers of the attributes that rarely change from one event to the next (`specversion`,
/// `source`, `type`, the content type) are built once and cloned, so only `id`, `time` and
/// what else an event carries are added per event. The output is exactly what
/// [`encode_event`] makes.
///
/// Shared by all the tasks publishing through one producer; it never blocks (while another
/// task updates the template, an event is encoded from scratch).
///
/// ```
/// use polybus_core::{Event, cloudevents::Mode};
/// use polybus_nats::{Encoder, encode_event};
///
/// let encoder = Encoder::new(Mode::Binary);
/// for kind in ["a", "a", "b"] {
///     let ev = Event::builder().kind(kind).build()?;
///     let (fast, _) = encoder.encode(&ev, "nats")?;
///     let (plain, _) = encode_event(&ev, Mode::Binary, "nats")?;
///     assert_eq!(fast, plain);
/// }
/// # Ok::<(), polybus_core::Error>(())
/// ```
#[derive(Debug)]
pub struct Encoder {
    mode: Mode,
    format: WireFormat,
    template: std::sync::Mutex<Option<Template>>,
}

/// The constant headers of the last event's `source`, `type` and content type.
#[derive(Debug)]
struct Template {
    source: String,
    kind: String,
    content_type: Option<String>,
    headers: HeaderMap,
}

impl Template {
    fn matches(&self, event: &Event) -> bool {
        self.source == event.source()
            && self.kind == event.kind()
            && self.content_type.as_deref() == event.content_type()
    }

    fn build(event: &Event, backend: &'static str) -> Result<Template> {
        let mut headers = HeaderMap::new();
        let mut failure = None;
        let ce = |name| HeaderName::from_static(name);
        put_attribute(
            &mut headers,
            ce("ce-specversion"),
            cloudevents::SPECVERSION,
            backend,
            &mut failure,
        );
        put_attribute(
            &mut headers,
            ce("ce-source"),
            &percent_encode(event.source()),
            backend,
            &mut failure,
        );
        put_attribute(
            &mut headers,
            ce("ce-type"),
            &percent_encode(event.kind()),
            backend,
            &mut failure,
        );
        if let Some(ct) = event.content_type() {
            put_attribute(
                &mut headers,
                ce("ce-datacontenttype"),
                &percent_encode(ct),
                backend,
                &mut failure,
            );
            if !is_structured(ct) {
                put(&mut headers, CONTENT_TYPE, ct, backend, &mut failure);
            }
        }
        // Placeholders for `id` and `time`, which every event sets (`write_binary` always emits
        // both): setting them on a clone replaces a value instead of growing the table.
        for name in ["ce-id", "ce-time"] {
            headers.insert(ce(name), HeaderValue::new());
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(Template {
            source: event.source().to_owned(),
            kind: event.kind().to_owned(),
            content_type: event.content_type().map(str::to_owned),
            headers,
        })
    }
}

impl Encoder {
    /// An encoder for `mode`.
    pub fn new(mode: Mode) -> Self {
        Self::with_format(mode, WireFormat::CloudEvents)
    }

    /// An encoder writing `format`: the CloudEvents binding in `mode`, or the lean format (see
    /// [`encode_lean`]; `mode` is then ignored).
    ///
    /// ```
    /// use polybus_core::{Event, cloudevents::{Mode, WireFormat}};
    ///
    /// let lean = polybus_nats::Encoder::with_format(Mode::Binary, WireFormat::Lean);
    /// let (headers, _) = lean.encode(&Event::new(b"x"), "nats")?;
    /// assert!(headers.is_empty());
    /// # Ok::<(), polybus_core::Error>(())
    /// ```
    pub fn with_format(mode: Mode, format: WireFormat) -> Self {
        Encoder {
            mode,
            format,
            template: std::sync::Mutex::new(None),
        }
    }

    /// The wire format this encoder writes.
    pub fn wire_format(&self) -> WireFormat {
        self.format
    }

    /// The mode this encoder writes.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Encodes `event`; see [`encode_event`].
    ///
    /// # Errors
    /// As for [`encode_event`].
    pub fn encode(&self, event: &Event, backend: &'static str) -> Result<(HeaderMap, Bytes)> {
        self.encode_owned(event.clone(), backend)
    }

    /// Encodes `event` like [`encode`](Self::encode), moving its strings (id, time, header
    /// values) into the headers instead of copying them.
    ///
    /// # Errors
    /// As for [`encode_event`].
    pub fn encode_owned(&self, event: Event, backend: &'static str) -> Result<(HeaderMap, Bytes)> {
        if self.format.is_lean() {
            return encode_lean(event, backend);
        }
        if matches!(self.mode, Mode::Structured) {
            return encode_structured(&event, backend);
        }
        let Ok(mut slot) = self.template.try_lock() else {
            return encode_binary(event, backend, None);
        };
        let headers = match slot.as_ref() {
            Some(t) if t.matches(&event) => t.headers.clone(),
            _ => {
                let t = Template::build(&event, backend)?;
                let headers = t.headers.clone();
                *slot = Some(t);
                headers
            }
        };
        drop(slot);
        encode_binary(event, backend, Some(headers))
    }
}

/// Decodes a received NATS message into an [`Event`], detecting the content mode. `backend`
/// tags errors.
///
/// # Errors
/// [`ErrorKind::Codec`] when the message claims to be a CloudEvent but is malformed (missing
/// required attribute, bad percent-encoding, invalid structured JSON).
///
/// ```
/// use polybus_core::{Event, cloudevents::Mode};
///
/// let ev = Event::builder().kind("order.created").header("tenant", "eu west").data("x").build()?;
/// let (headers, payload) = polybus_nats::encode_event(&ev, Mode::Binary, "nats")?;
/// let back = polybus_nats::decode_event(Some(&headers), payload, "nats")?;
/// assert_eq!(back.id(), ev.id());
/// assert_eq!(back.headers().get("tenant"), Some("eu west"));
/// # Ok::<(), polybus_core::Error>(())
/// ```
pub fn decode_event(
    headers: Option<&HeaderMap>,
    payload: Bytes,
    backend: &'static str,
) -> Result<Event> {
    decode_event_with(headers, payload, backend, |_| {})
}

/// [`decode_event`], then `foreign` on the event when the message was not a CloudEvent (no
/// `ce-specversion` header and not structured mode: a plain NATS publisher sent it). Such an
/// event has a fresh UUIDv7 id, the receive time and default source and kind; `foreign` can
/// replace them with what the broker knows about the message, such as a JetStream stream
/// sequence, so that every delivery of the same stored message gets the same id.
///
/// # Errors
/// As [`decode_event`].
///
/// ```
/// use bytes::Bytes;
///
/// let ev = polybus_nats::decode_event_with(None, Bytes::from_static(b"raw"), "nats", |ev| {
///     ev.set_id("orders:42")
/// })?;
/// assert_eq!(ev.id(), "orders:42");
/// assert_eq!(ev.data(), b"raw".as_slice());
/// # Ok::<(), polybus_core::Error>(())
/// ```
pub fn decode_event_with(
    headers: Option<&HeaderMap>,
    payload: Bytes,
    backend: &'static str,
    foreign: impl FnOnce(&mut Event),
) -> Result<Event> {
    let Some(headers) = headers.filter(|h| !h.is_empty()) else {
        let mut event = BinaryDecoder::new().finish(payload, backend)?;
        foreign(&mut event);
        return Ok(event);
    };
    let content_type = headers
        .iter()
        .find(|(n, _)| AsRef::<str>::as_ref(n).eq_ignore_ascii_case(CONTENT_TYPE))
        .and_then(|(_, v)| v.first())
        .map(HeaderValue::as_str);
    if content_type.is_some_and(is_structured) {
        let mut event = cloudevents::from_structured(&payload, backend)?;
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if name.eq_ignore_ascii_case(CONTENT_TYPE) || has_ce_prefix(name) {
                continue;
            }
            for v in values {
                event.headers_mut().append_unchecked(name, v.as_str());
            }
        }
        return Ok(event);
    }
    let mut dec = BinaryDecoder::new();
    let mut cloudevent = false;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if has_ce_prefix(name) {
            // Header names are case-insensitive; polybus and most producers write lower case,
            // so lower-case them only when needed (this runs for each attribute of each
            // received message).
            let attr = &name[CE_PREFIX.len()..];
            let attr: Cow<'_, str> = if attr.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(attr.to_ascii_lowercase())
            } else {
                Cow::Borrowed(attr)
            };
            for v in values {
                let value = percent_decode(v.as_str()).map_err(|why| {
                    Error::new(ErrorKind::Codec, backend)
                        .with_message(format!("header {name}: {why}"))
                })?;
                dec.attribute(&attr, value);
            }
            cloudevent |= attr == "specversion";
        } else if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            if let Some(v) = values.first() {
                dec.content_type(v.as_str());
            }
        } else {
            for v in values {
                dec.header(name, v.as_str());
            }
        }
    }
    let mut event = dec.finish(payload, backend)?;
    if !cloudevent {
        foreign(&mut event);
    }
    Ok(event)
}

/// Percent-encodes a header value as the CloudEvents NATS binding requires: space, `"`, `%`
/// and every byte outside `0x21..=0x7E` become `%XY` (upper-case hex); everything else stays.
///
/// ```
/// assert_eq!(polybus_nats::percent_encode("Euro € 😀"), "Euro%20%E2%82%AC%20%F0%9F%98%80");
/// assert_eq!(polybus_nats::percent_encode("plain-1.0"), "plain-1.0");
/// ```
pub fn percent_encode(value: &str) -> Cow<'_, str> {
    if !any_needs_encoding(value) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 16);
    for b in value.bytes() {
        if needs_encoding(b) {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
    Cow::Owned(out)
}

/// Decodes a header value written by [`percent_encode`] or by another implementation of the
/// binding: a double-quoted value is unquoted first (RFC 7230 quoted-string, backslash
/// escapes), then one round of percent-decoding; lower-case hex is accepted.
///
/// # Errors
/// A description when a `%` is not followed by two hex digits, a quoted string is
/// unterminated, or the decoded bytes are not UTF-8 (overlong forms such as `%C0%A0` are
/// rejected).
///
/// ```
/// assert_eq!(polybus_nats::percent_decode("a%20b%e2%82%ac").unwrap(), "a b€");
/// assert_eq!(polybus_nats::percent_decode("\"quoted \\\"x\\\"\"").unwrap(), "quoted \"x\"");
/// assert!(polybus_nats::percent_decode("%C0%A0").is_err());
/// ```
pub fn percent_decode(value: &str) -> Result<Cow<'_, str>, &'static str> {
    let unquoted = unquote(value)?;
    if !unquoted.contains('%') {
        return Ok(unquoted);
    }
    let bytes = unquoted.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or("a percent sign is not followed by two hex digits")?;
            let hi = hex_value(hex[0]).ok_or("a percent sign is not followed by two hex digits")?;
            let lo = hex_value(hex[1]).ok_or("a percent sign is not followed by two hex digits")?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| "the percent-decoded value is not UTF-8")
}

fn unquote(value: &str) -> Result<Cow<'_, str>, &'static str> {
    let trimmed = value.trim_matches([' ', '\t']);
    let Some(inner) = trimmed.strip_prefix('"') else {
        return Ok(Cow::Borrowed(trimmed));
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().ok_or("a quoted value ends in a backslash")?),
            '"' => {
                return if chars.as_str().is_empty() {
                    Ok(Cow::Owned(out))
                } else {
                    Err("text follows a quoted value")
                };
            }
            c => out.push(c),
        }
    }
    Err("a quoted value is not terminated")
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether any byte of `value` needs encoding. A fold without early exit compiles to a
/// vector loop (this runs for every attribute of every publish).
fn any_needs_encoding(value: &str) -> bool {
    value
        .bytes()
        .fold(false, |seen, b| seen | needs_encoding(b))
}

fn needs_encoding(b: u8) -> bool {
    !(0x21..=0x7e).contains(&b) || b == b'"' || b == b'%'
}

fn has_ce_prefix(name: &str) -> bool {
    name.len() > CE_PREFIX.len()
        && name.as_bytes()[..CE_PREFIX.len()].eq_ignore_ascii_case(CE_PREFIX.as_bytes())
}

/// Whether a content type announces structured mode (`application/cloudevents`, with any
/// `+format` suffix or parameters), matched case-insensitively as the binding says.
pub(crate) fn is_structured(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..23)
        .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents"))
}

/// The header of a CloudEvents attribute every event may carry, made without parsing or
/// allocating (this runs for each attribute of each publish). `None` for extensions.
fn attribute_header(name: &str) -> Option<HeaderName> {
    Some(match name {
        "specversion" => HeaderName::from_static("ce-specversion"),
        "id" => HeaderName::from_static("ce-id"),
        "source" => HeaderName::from_static("ce-source"),
        "type" => HeaderName::from_static("ce-type"),
        "time" => HeaderName::from_static("ce-time"),
        "datacontenttype" => HeaderName::from_static("ce-datacontenttype"),
        "partitionkey" => HeaderName::from_static("ce-partitionkey"),
        "subject" => HeaderName::from_static("ce-subject"),
        "dataschema" => HeaderName::from_static("ce-dataschema"),
        _ => return None,
    })
}

/// Sets a known attribute's header. `write_binary` emits each of these once per event (an
/// extension can never have their names), so `insert` is enough: one hash, not two.
fn put_attribute(
    headers: &mut HeaderMap,
    name: HeaderName,
    value: &str,
    backend: &'static str,
    failure: &mut Option<Error>,
) {
    if failure.is_some() {
        return;
    }
    match value.parse::<HeaderValue>() {
        Ok(v) => headers.insert(name, v),
        Err(_) => {
            *failure = Some(
                Error::new(ErrorKind::InvalidHeader, backend)
                    .with_message(format!("NATS cannot carry the value of the header {name}")),
            );
        }
    }
}

fn put(
    headers: &mut HeaderMap,
    name: &str,
    value: &str,
    backend: &'static str,
    failure: &mut Option<Error>,
) {
    if failure.is_some() {
        return;
    }
    match (HeaderName::try_from(name), value.parse::<HeaderValue>()) {
        (Ok(n), Ok(v)) => headers.append(n, v),
        _ => *failure = Some(cannot_carry(name, backend)),
    }
}

/// A plain header of a structured-mode message; names reserved by the binding are refused, as
/// in binary mode (the decoder skips `ce-*` headers there and reads `Content-Type` as the mode).
fn put_plain(
    headers: &mut HeaderMap,
    name: &str,
    value: &str,
    backend: &'static str,
    failure: &mut Option<Error>,
) {
    if failure.is_none() && is_reserved(name) {
        *failure = Some(reserved(name, backend));
        return;
    }
    put(headers, name, value, backend, failure);
}

/// Whether a plain header name is reserved by the binding: `ce-*` and `Content-Type`.
fn is_reserved(name: &str) -> bool {
    has_ce_prefix(name) || name.eq_ignore_ascii_case(CONTENT_TYPE)
}

fn reserved(name: &str, backend: &'static str) -> Error {
    Error::new(ErrorKind::InvalidHeader, backend).with_message(format!(
        "header {name:?} is reserved by the CloudEvents NATS binding; use an extension name \
         (lowercase letters and digits) or the event's content type"
    ))
}

fn cannot_carry(name: &str, backend: &'static str) -> Error {
    Error::new(ErrorKind::InvalidHeader, backend)
        .with_message(format!("NATS cannot carry the header {name:?}"))
}

/// Appends a plain (non-attribute) header, moving its value; names reserved by the binding are
/// refused. polybus' own trace headers take their names without parsing or allocating.
fn put_plain_checked(
    headers: &mut HeaderMap,
    name: Cow<'static, str>,
    value: String,
    backend: &'static str,
    failure: &mut Option<Error>,
) {
    if failure.is_some() {
        return;
    }
    if is_reserved(&name) {
        *failure = Some(reserved(&name, backend));
        return;
    }
    // The rules `HeaderValue::from` and `HeaderName::try_from` apply, checked first so that
    // both strings can move; folds rather than `any`/`all` so they compile to vector loops.
    let line_break = value
        .bytes()
        .fold(false, |seen, b| seen | (b == b'\r') | (b == b'\n'));
    let bad_name = name
        .bytes()
        .fold(false, |seen, b| seen | !b.is_ascii_graphic() | (b == b':'));
    if line_break || bad_name {
        *failure = Some(cannot_carry(&name, backend));
        return;
    }
    let header_name = match name {
        Cow::Borrowed("traceparent") => Ok(HeaderName::from_static("traceparent")),
        Cow::Borrowed("tracestate") => Ok(HeaderName::from_static("tracestate")),
        Cow::Borrowed(n) => HeaderName::try_from(n),
        Cow::Owned(n) => HeaderName::try_from(n),
    };
    match header_name {
        // `HeaderValue::from` refuses only CR and LF, checked above.
        Ok(n) => headers.append(n, HeaderValue::from(value)),
        Err(_) => *failure = Some(cannot_carry("(a header)", backend)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_writes_what_encode_event_writes() {
        let events = [
            sample(),
            Event::new(b"plain"),
            Event::new(b"same kind and source again"),
            sample(),
            Event::builder()
                .kind("order.created")
                .content_type("application/cloudevents+json")
                .build()
                .unwrap(),
            Event::builder()
                .kind("k")
                .header("traceparent", "00-1")
                .build()
                .unwrap(),
            Event::builder().kind("k").key("key 2").build().unwrap(),
            Event::builder()
                .kind("k")
                .header("ce-bad", "reserved")
                .build()
                .unwrap(),
        ];
        for mode in [Mode::Binary, Mode::Structured] {
            let encoder = Encoder::new(mode);
            for ev in &events {
                let plain = encode_event(ev, mode, "nats");
                let fast = encoder.encode(ev, "nats");
                match (plain, fast) {
                    (Ok((h1, p1)), Ok((h2, p2))) => {
                        assert_eq!(h1, h2, "{ev:?}");
                        assert_eq!(p1, p2);
                    }
                    (Err(e1), Err(e2)) => assert_eq!(e1.kind(), e2.kind()),
                    (a, b) => panic!("{ev:?}: {a:?} vs {b:?}"),
                }
            }
        }
    }

    fn sample() -> Event {
        Event::builder()
            .id("id 1/ü")
            .source("urn:test \"quoted\" 100%")
            .kind("order.created")
            .key("k1")
            .content_type("text/plain; charset=utf-8")
            .header("tenant", "eu west €")
            .header("X-Request-Id", "r-42")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .data("hello")
            .build()
            .unwrap()
    }

    #[test]
    fn binary_mode_headers_follow_the_binding() {
        let ev = sample();
        let (h, payload) = encode_event(&ev, Mode::Binary, "nats").unwrap();
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce-id").as_deref(), Some("id%201/%C3%BC"));
        assert_eq!(
            get("ce-source").as_deref(),
            Some("urn:test%20%22quoted%22%20100%25")
        );
        assert_eq!(get("ce-type").as_deref(), Some("order.created"));
        assert_eq!(get("ce-partitionkey").as_deref(), Some("k1"));
        assert_eq!(
            get("ce-datacontenttype").as_deref(),
            Some("text/plain;%20charset=utf-8")
        );
        assert_eq!(
            get(CONTENT_TYPE).as_deref(),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(get("ce-tenant").as_deref(), Some("eu%20west%20%E2%82%AC"));
        assert_eq!(get("X-Request-Id").as_deref(), Some("r-42"));
        assert!(get("traceparent").is_some());
        assert!(get("ce-time").is_some_and(|t| t.ends_with('Z')));
        assert_eq!(payload.as_ptr(), ev.data().as_ptr(), "payload not copied");
    }

    #[test]
    fn both_modes_round_trip() {
        let ev = sample();
        for mode in [Mode::Binary, Mode::Structured] {
            let (h, payload) = encode_event(&ev, mode, "nats").unwrap();
            let back = decode_event(Some(&h), payload, "nats").unwrap();
            assert_eq!(back.id(), ev.id(), "{mode:?}");
            assert_eq!(back.source(), ev.source(), "{mode:?}");
            assert_eq!(back.kind(), ev.kind(), "{mode:?}");
            assert_eq!(back.key(), ev.key(), "{mode:?}");
            assert_eq!(back.content_type(), ev.content_type(), "{mode:?}");
            assert_eq!(back.data(), ev.data(), "{mode:?}");
            assert_eq!(back.headers().get("tenant"), Some("eu west €"), "{mode:?}");
            assert_eq!(back.headers().get("x-request-id"), Some("r-42"), "{mode:?}");
            assert_eq!(
                back.headers().get("traceparent"),
                ev.headers().get("traceparent"),
                "{mode:?}"
            );
            assert_eq!(back.headers().len(), 3, "{mode:?}: {:?}", back.headers());
        }
    }

    #[test]
    fn structured_mode_sets_the_content_type() {
        let (h, payload) = encode_event(&sample(), Mode::Structured, "nats").unwrap();
        assert_eq!(
            h.get(CONTENT_TYPE).map(|v| v.as_str()),
            Some("application/cloudevents+json")
        );
        assert!(h.get("ce-id").is_none());
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["specversion"], "1.0");
    }

    #[test]
    fn raw_messages_become_plain_events() {
        let ev = decode_event(None, Bytes::from_static(b"raw"), "nats").unwrap();
        assert_eq!(ev.data(), &Bytes::from_static(b"raw"));
        let mut h = HeaderMap::new();
        h.insert("X-Any", "1");
        h.insert("Content-Type", "application/json");
        let ev = decode_event(Some(&h), Bytes::new(), "nats").unwrap();
        assert_eq!(ev.headers().get("x-any"), Some("1"));
        assert_eq!(ev.content_type(), Some("application/json"));
    }

    #[test]
    fn the_foreign_hook_runs_for_plain_messages_only() {
        let stamp = |ev: &mut Event| ev.set_id("stream:7");
        let ev = decode_event_with(None, Bytes::from_static(b"raw"), "nats", stamp).unwrap();
        assert_eq!(ev.id(), "stream:7");
        let mut plain = HeaderMap::new();
        plain.insert("X-Any", "1");
        plain.insert("ce-not-a-cloudevent", "without specversion");
        let ev = decode_event_with(Some(&plain), Bytes::new(), "nats", stamp).unwrap();
        assert_eq!(ev.id(), "stream:7");
        assert_eq!(ev.headers().get("x-any"), Some("1"));
        let sent = sample();
        for mode in [Mode::Binary, Mode::Structured] {
            let (h, payload) = encode_event(&sent, mode, "nats").unwrap();
            let ev = decode_event_with(Some(&h), payload, "nats", stamp).unwrap();
            assert_eq!(ev.id(), sent.id(), "{mode:?}");
        }
        let mut upper = HeaderMap::new();
        upper.insert("CE-SpecVersion", "1.0");
        upper.insert("ce-id", "theirs");
        upper.insert("ce-source", "s");
        upper.insert("ce-type", "t");
        let ev = decode_event_with(Some(&upper), Bytes::new(), "nats", stamp).unwrap();
        assert_eq!(ev.id(), "theirs");
    }

    #[test]
    fn foreign_binary_events_decode_case_insensitively_and_quoted() {
        let mut h = HeaderMap::new();
        h.insert("CE-SpecVersion", "1.0");
        h.insert("Ce-Id", "\"a b\"");
        h.insert("ce-source", "%2fsrc");
        h.insert("ce-type", "t");
        let ev = decode_event(Some(&h), Bytes::new(), "nats").unwrap();
        assert_eq!(ev.id(), "a b");
        assert_eq!(ev.source(), "/src");
    }

    #[test]
    fn malformed_values_are_codec_errors() {
        for bad in ["%", "%4", "%zz", "%C0%A0", "%FF", "\"open", "\"a\"b"] {
            assert!(percent_decode(bad).is_err(), "{bad:?}");
            let mut h = HeaderMap::new();
            h.insert("ce-specversion", "1.0");
            h.insert("ce-id", bad);
            h.insert("ce-source", "s");
            h.insert("ce-type", "t");
            let e = decode_event(Some(&h), Bytes::new(), "jetstream").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Codec, "{bad:?}");
            assert_eq!(e.backend(), "jetstream");
        }
    }

    #[test]
    fn reserved_plain_headers_are_rejected() {
        let ev = Event::builder().header("ce-id", "x").build().unwrap();
        let e = encode_event(&ev, Mode::Binary, "nats").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidHeader);
    }

    /// Found by the `header` fuzz target: structured mode wrote a plain `ce-id` header, which
    /// the decoder skips (lost without an error), and a plain `Content-Type`, which the decoder
    /// reads before the structured one (the message came back as a raw binary message).
    #[test]
    fn reserved_plain_headers_are_rejected_in_structured_mode_too() {
        for name in ["ce-id", "CE-Source", "Content-Type", "content-type"] {
            let ev = Event::builder().header(name, "x").build().unwrap();
            for mode in [Mode::Binary, Mode::Structured] {
                let e = encode_event(&ev, mode, "nats").unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{name} {mode:?}");
                let e = Encoder::new(mode).encode(&ev, "nats").unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{name} {mode:?}");
            }
        }
    }

    #[test]
    fn percent_encoding_round_trips_every_char_class() {
        let all: String = (1u32..0x300).filter_map(char::from_u32).collect();
        let enc = percent_encode(&all);
        assert!(enc.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'"'));
        assert_eq!(percent_decode(&enc).unwrap(), all);
    }
}
