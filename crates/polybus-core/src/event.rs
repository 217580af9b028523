//! The event model: one CloudEvents-shaped `Event` for every broker.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::{Error, ErrorKind, Headers, Result};

/// The `source` an event gets when neither the caller nor the publisher sets one.
pub const DEFAULT_SOURCE: &str = "urn:polybus";
/// The `type` (CloudEvents) / `kind` an event gets when the caller sets none.
pub const DEFAULT_KIND: &str = "polybus.event";

/// One event: CloudEvents attributes, an optional partition key, headers and a payload.
///
/// * `id` is unique per `source` (a UUIDv7 by default); `source` + `id` is the dedup key.
///   A default id is made the first time something asks for it ([`Event::id`], a clone, a
///   CloudEvents encoding): an event published in the lean wire format, or received without
///   one, never pays for an id nobody reads. Once made it does not change.
/// * `key` is the ordering/partition key (the Kafka record key; other brokers carry it in the
///   `partitionkey` attribute).
/// * `kind` is the CloudEvents `type`.
/// * `data` is a [`Bytes`]: cloning an event never copies the payload.
/// * `headers` become CloudEvents extension attributes or plain broker headers.
///
/// ```
/// use polybus_core::Event;
///
/// let ev = Event::builder()
///     .kind("order.created")
///     .source("urn:shop:orders")
///     .key("customer-42")
///     .header("tenant", "eu")
///     .content_type("application/json")
///     .data(&b"{\"id\":1}"[..])
///     .build()?;
/// assert_eq!(ev.kind(), "order.created");
/// assert_eq!(ev.key(), Some(&b"customer-42"[..]));
/// assert_eq!(ev.headers().get("tenant"), Some("eu"));
/// assert_eq!(ev.id().len(), 36); // a UUIDv7
/// # Ok::<(), polybus_core::Error>(())
/// ```
pub struct Event {
    /// Empty until the id is set or first asked for (see [`Event::id`]).
    id: OnceLock<String>,
    source: Option<Cow<'static, str>>,
    ts: SystemTime,
    key: Option<Bytes>,
    kind: Cow<'static, str>,
    data: Bytes,
    headers: Headers,
    content_type: Option<Cow<'static, str>>,
}

impl Event {
    /// An event with `data`, a fresh UUIDv7 id, the current time and default kind and source.
    ///
    /// The id is made when it is first needed (see [`Event::id`]), so an event that never
    /// needs one (the lean wire format) costs no id.
    ///
    /// ```
    /// let ev = polybus_core::Event::new(b"hello");
    /// assert_eq!(ev.data(), &b"hello"[..]);
    /// assert_eq!(ev.id(), ev.clone().id(), "made once, then kept");
    /// ```
    pub fn new(data: impl IntoPayload) -> Self {
        Event {
            id: OnceLock::new(),
            source: None,
            ts: SystemTime::now(),
            key: None,
            kind: Cow::Borrowed(DEFAULT_KIND),
            data: data.into_payload(),
            headers: Headers::new(),
            content_type: None,
        }
    }

    /// An event with a given id (a received one), the current time and default kind and
    /// source; no id is generated.
    pub(crate) fn with_id(id: String, data: impl IntoPayload) -> Self {
        Event {
            id: OnceLock::from(id),
            source: None,
            ts: SystemTime::now(),
            key: None,
            kind: Cow::Borrowed(DEFAULT_KIND),
            data: data.into_payload(),
            headers: Headers::new(),
            content_type: None,
        }
    }

    /// A builder that validates what it is given when [`EventBuilder::build`] runs.
    pub fn builder() -> EventBuilder {
        EventBuilder {
            event: Event::new(Bytes::new()),
            error: None,
        }
    }

    /// The id, unique per source. An event made without one gets a fresh UUIDv7 (for the
    /// current time) on the first call, and keeps it.
    pub fn id(&self) -> &str {
        self.id.get_or_init(new_id)
    }

    /// Whether the id was set or already made: `false` for a new event whose id nobody asked
    /// for yet (it is made by [`id`](Self::id)).
    ///
    /// ```
    /// let ev = polybus_core::Event::new(b"x");
    /// assert!(!ev.has_id());
    /// let _ = ev.id();
    /// assert!(ev.has_id());
    /// ```
    pub fn has_id(&self) -> bool {
        self.id.get().is_some()
    }
    /// The source (CloudEvents `source`), [`DEFAULT_SOURCE`] when none was set.
    pub fn source(&self) -> &str {
        self.source.as_deref().unwrap_or(DEFAULT_SOURCE)
    }
    /// Whether a source was set explicitly.
    pub fn has_source(&self) -> bool {
        self.source.is_some()
    }
    /// When the event happened (CloudEvents `time`).
    pub fn time(&self) -> SystemTime {
        self.ts
    }
    /// The ordering / partition key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
    /// The key as `Bytes` (cheap clone).
    pub fn key_bytes(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }
    /// The event type (CloudEvents `type`).
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// The payload.
    pub fn data(&self) -> &Bytes {
        &self.data
    }
    /// The headers (CloudEvents extensions and plain headers).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// The headers, mutably.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }
    /// The content type of `data` (CloudEvents `datacontenttype`).
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }
    /// The dedup key: `source` and `id` joined by a space (which neither may contain unescaped
    /// in a well-formed CloudEvent's id, so the join is unambiguous in practice).
    pub fn dedup_key(&self) -> String {
        format!("{} {}", self.source(), self.id())
    }

    /// Takes the payload out.
    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// Takes the event apart, for the bindings that move its strings into a message. The id
    /// is `None` when it was never set nor asked for: a binding that writes it makes one.
    pub(crate) fn into_parts(self) -> EventParts {
        EventParts {
            id: self.id.into_inner(),
            source: self.source,
            time: self.ts,
            key: self.key,
            kind: self.kind,
            data: self.data,
            headers: self.headers,
            content_type: self.content_type,
        }
    }

    /// Sets the id. Empty ids are replaced by a fresh UUIDv7 on [`EventBuilder::build`] but
    /// are accepted here; adapters reject them on publish.
    pub fn set_id(&mut self, id: impl Into<String>) {
        self.id = OnceLock::from(id.into());
    }
    /// Sets the source.
    pub fn set_source(&mut self, source: impl Into<Cow<'static, str>>) {
        self.source = Some(source.into());
    }
    /// Sets the source only if none was set: publishers call this with their default source.
    #[allow(clippy::ptr_arg)] // a `&Cow` so a borrowed default stays borrowed when cloned
    pub fn set_source_if_unset(&mut self, source: &Cow<'static, str>) {
        if self.source.is_none() {
            self.source = Some(source.clone());
        }
    }
    /// Sets the time.
    pub fn set_time(&mut self, ts: SystemTime) {
        self.ts = ts;
    }
    /// Sets or clears the key.
    pub fn set_key(&mut self, key: Option<Bytes>) {
        self.key = key;
    }
    /// Sets the kind.
    pub fn set_kind(&mut self, kind: impl Into<Cow<'static, str>>) {
        self.kind = kind.into();
    }
    /// Sets the payload.
    pub fn set_data(&mut self, data: impl IntoPayload) {
        self.data = data.into_payload();
    }
    /// Sets or clears the content type.
    pub fn set_content_type(&mut self, ct: Option<Cow<'static, str>>) {
        self.content_type = ct;
    }

    /// Checks the attributes every binding needs: a non-empty id, source and kind without
    /// control characters.
    ///
    /// # Errors
    /// [`ErrorKind::Codec`] naming the bad attribute.
    pub fn validate(&self) -> Result<()> {
        // An id not made yet will be a valid UUIDv7: nothing to check, nothing to make.
        for (name, value) in [
            ("id", self.id.get().map_or("-", String::as_str)),
            ("source", self.source()),
            ("type", self.kind()),
        ] {
            if value.is_empty() {
                return Err(Error::new(ErrorKind::Codec, "core")
                    .with_message(format!("event attribute `{name}` is empty")));
            }
            if has_control(value) {
                return Err(Error::new(ErrorKind::Codec, "core").with_message(format!(
                    "event attribute `{name}` contains a control character"
                )));
            }
        }
        if self.content_type().is_some_and(has_control) {
            return Err(Error::new(ErrorKind::Codec, "core")
                .with_message("content type contains a control character"));
        }
        Ok(())
    }
}

/// Whether `s` holds a control character (Unicode `Cc`), by bytes first: every publish
/// validates its event, and almost every value is plain ASCII. `Cc` is U+0000..=U+001F,
/// U+007F and U+0080..=U+009F, the last encoded as 0xC2 0x80..=0x9F in UTF-8.
fn has_control(s: &str) -> bool {
    // A fold without early exit compiles to a vector loop: a few instructions per 16 bytes.
    let suspicious = s.bytes().fold(false, |seen, b| {
        seen | (b < 0x20) | (b == 0x7f) | (b == 0xc2)
    });
    suspicious && s.chars().any(char::is_control)
}

/// The fields of an [`Event`], as [`Event::into_parts`] hands them over.
pub(crate) struct EventParts {
    /// `None`: no id was set or made (see [`Event::into_parts`]).
    pub(crate) id: Option<String>,
    pub(crate) source: Option<Cow<'static, str>>,
    pub(crate) time: SystemTime,
    pub(crate) key: Option<Bytes>,
    pub(crate) kind: Cow<'static, str>,
    pub(crate) data: Bytes,
    pub(crate) headers: Headers,
    pub(crate) content_type: Option<Cow<'static, str>>,
}

/// A clone is the same event: an id not made yet is made first, so both have the same one.
impl Clone for Event {
    fn clone(&self) -> Self {
        Event {
            id: OnceLock::from(self.id().to_owned()),
            source: self.source.clone(),
            ts: self.ts,
            key: self.key.clone(),
            kind: self.kind.clone(),
            data: self.data.clone(),
            headers: self.headers.clone(),
            content_type: self.content_type.clone(),
        }
    }
}

/// Every attribute, the id included (an id not made yet is made to compare it).
impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
            && self.source == other.source
            && self.ts == other.ts
            && self.key == other.key
            && self.kind == other.kind
            && self.data == other.data
            && self.headers == other.headers
            && self.content_type == other.content_type
    }
}

impl Eq for Event {}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id())
            .field("source", &self.source())
            .field("kind", &self.kind)
            .field("key", &self.key.as_deref().map(String::from_utf8_lossy))
            .field("content_type", &self.content_type)
            .field("headers", &self.headers)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// A fresh UUIDv7 (RFC 9562) as a lowercase hyphenated string, for the current time.
///
/// The 48-bit Unix time in milliseconds is followed by a 12-bit counter (RFC 9562 section
/// 6.2, method 1) that starts at a random value below 2048 each millisecond and counts up
/// within it, so the ids of one process are strictly increasing, and by 62 random bits from
/// the thread's generator (no system call per id).
///
/// ```
/// let (a, b) = (polybus_core::new_id(), polybus_core::new_id());
/// assert!(a < b);
/// assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 7);
/// ```
pub fn new_id() -> String {
    id_at(SystemTime::now())
}

/// The last (milliseconds << 12 | counter) handed out in this process.
static LAST_ID_CLOCK: AtomicU64 = AtomicU64::new(0);

/// A UUIDv7 for time `t` (see [`new_id`]).
fn id_at(t: SystemTime) -> String {
    use rand::Rng as _;
    const MILLIS_MASK: u64 = (1 << 48) - 1;
    let millis = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(MILLIS_MASK))
        & MILLIS_MASK;
    let random: u128 = rand::rng().random();
    // The top 11 random bits seed the counter, the low 64 fill `rand_b` (62 bits kept).
    let start = millis << 12 | (random >> 117) as u64;
    let clock = match LAST_ID_CLOCK.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
        Some(start.max(last + 1))
    }) {
        Ok(last) | Err(last) => start.max(last + 1),
    };
    let mut bytes = [0u8; 10];
    bytes[..2].copy_from_slice(&((clock & 0xfff) as u16).to_be_bytes());
    bytes[2..].copy_from_slice(&(random as u64).to_be_bytes());
    let id = uuid::Builder::from_unix_timestamp_millis(clock >> 12, &bytes).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_owned()
}

/// Builds an [`Event`]; see [`Event::builder`].
#[derive(Debug)]
#[must_use = "call .build() to get the event"]
pub struct EventBuilder {
    event: Event,
    error: Option<Error>,
}

impl EventBuilder {
    /// Sets the id (default: a fresh UUIDv7).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.event.id = OnceLock::from(id.into());
        self
    }
    /// Sets the source (default: the publisher's, else [`DEFAULT_SOURCE`]).
    pub fn source(mut self, source: impl Into<Cow<'static, str>>) -> Self {
        self.event.source = Some(source.into());
        self
    }
    /// Sets the time (default: now).
    pub fn time(mut self, ts: SystemTime) -> Self {
        self.event.ts = ts;
        self
    }
    /// Sets the partition key.
    pub fn key(mut self, key: impl IntoPayload) -> Self {
        self.event.key = Some(key.into_payload());
        self
    }
    /// Sets the kind (CloudEvents `type`).
    pub fn kind(mut self, kind: impl Into<Cow<'static, str>>) -> Self {
        self.event.kind = kind.into();
        self
    }
    /// Sets the payload.
    pub fn data(mut self, data: impl IntoPayload) -> Self {
        self.event.data = data.into_payload();
        self
    }
    /// Sets the content type.
    pub fn content_type(mut self, ct: impl Into<Cow<'static, str>>) -> Self {
        self.event.content_type = Some(ct.into());
        self
    }
    /// Appends a header; an invalid one makes [`build`](Self::build) fail.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if self.error.is_none()
            && let Err(e) = self.event.headers.append(name, value)
        {
            self.error = Some(e);
        }
        self
    }
    /// Finishes the event.
    ///
    /// # Errors
    /// The first invalid header ([`ErrorKind::InvalidHeader`]) or attribute
    /// ([`ErrorKind::Codec`]).
    pub fn build(self) -> Result<Event> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut event = self.event;
        if event.id.get().is_some_and(String::is_empty) {
            // Made when first asked for, like the id of `Event::new`.
            event.id = OnceLock::new();
        }
        event.validate()?;
        Ok(event)
    }
}

/// Types that become an event payload without copying: `Bytes`, `Vec<u8>`, `String`, and
/// `'static` byte strings such as `b"hello"`.
pub trait IntoPayload {
    /// Converts into `Bytes`.
    fn into_payload(self) -> Bytes;
}

impl IntoPayload for Bytes {
    fn into_payload(self) -> Bytes {
        self
    }
}
impl IntoPayload for Vec<u8> {
    fn into_payload(self) -> Bytes {
        Bytes::from(self)
    }
}
impl IntoPayload for String {
    fn into_payload(self) -> Bytes {
        Bytes::from(self)
    }
}
impl IntoPayload for &'static str {
    fn into_payload(self) -> Bytes {
        Bytes::from_static(self.as_bytes())
    }
}
impl IntoPayload for &'static [u8] {
    fn into_payload(self) -> Bytes {
        Bytes::from_static(self)
    }
}
impl<const N: usize> IntoPayload for &'static [u8; N] {
    fn into_payload(self) -> Bytes {
        Bytes::from_static(self)
    }
}
impl IntoPayload for bytes::BytesMut {
    fn into_payload(self) -> Bytes {
        self.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_across_threads_and_carry_their_millisecond() {
        let per_thread: Vec<Vec<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..20_000).map(|_| new_id()).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all = std::collections::HashSet::new();
        for ids in &per_thread {
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "ids of one thread increase"
            );
            for id in ids {
                let u = uuid::Uuid::parse_str(id).unwrap();
                assert_eq!(u.get_version_num(), 7);
                assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
                assert!(all.insert(id.clone()), "duplicate id {id}");
            }
        }
        // The id's timestamp is the event's time (to the millisecond, or a little after when
        // more than 2048 ids were made in that millisecond).
        let ev = Event::new(b"x");
        let (secs, nanos) = uuid::Uuid::parse_str(ev.id())
            .unwrap()
            .get_timestamp()
            .unwrap()
            .to_unix();
        let id_ms = secs * 1000 + u64::from(nanos) / 1_000_000;
        let ev_ms = ev.time().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!((ev_ms..ev_ms + 50).contains(&id_ms), "{id_ms} vs {ev_ms}");
    }

    #[test]
    fn ids_are_unique_uuid_v7() {
        let a = Event::new(b"x");
        let b = Event::new(b"x");
        assert_ne!(a.id(), b.id());
        let u = uuid::Uuid::parse_str(a.id()).unwrap();
        assert_eq!(u.get_version_num(), 7);
    }

    #[test]
    fn payload_is_not_copied() {
        let data = Bytes::from(vec![7u8; 1024]);
        let ev = Event::new(data.clone());
        assert_eq!(ev.data().as_ptr(), data.as_ptr());
        let cloned = ev.clone();
        assert_eq!(cloned.data().as_ptr(), data.as_ptr());
    }

    #[test]
    fn builder_reports_the_first_bad_header() {
        let err = Event::builder()
            .header("ok", "1")
            .header("bad header", "2")
            .header("also bad", "3")
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidHeader);
        assert!(err.to_string().contains("bad header"), "{err}");
    }

    #[test]
    fn builder_rejects_empty_kind_and_control_chars() {
        assert_eq!(
            Event::builder().kind("").build().unwrap_err().kind(),
            ErrorKind::Codec
        );
        assert_eq!(
            Event::builder().source("a\nb").build().unwrap_err().kind(),
            ErrorKind::Codec
        );
        let ev = Event::builder().id("").build().unwrap();
        assert_eq!(ev.id().len(), 36, "empty id replaced by a fresh one");
    }

    #[test]
    fn control_characters_by_bytes_and_chars() {
        for (s, control) in [
            ("plain", false),
            ("tab\t", true),
            ("del\u{7f}", true),
            ("c1\u{85}", true),
            ("latin ¢ é", false),
            ("nbsp\u{a0}", false),
            ("", false),
        ] {
            assert_eq!(has_control(s), control, "{s:?}");
            assert_eq!(s.chars().any(char::is_control), control, "{s:?}");
        }
    }

    #[test]
    fn source_defaults_and_is_filled_once() {
        let mut ev = Event::new(b"x");
        assert_eq!(ev.source(), DEFAULT_SOURCE);
        assert!(!ev.has_source());
        ev.set_source_if_unset(&Cow::Borrowed("urn:a"));
        ev.set_source_if_unset(&Cow::Borrowed("urn:b"));
        assert_eq!(ev.source(), "urn:a");
        assert_eq!(ev.dedup_key(), format!("urn:a {}", ev.id()));
    }
}
