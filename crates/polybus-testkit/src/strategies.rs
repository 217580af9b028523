//! Proptest strategies for arbitrary events, CloudEvents attributes and headers: the one
//! source of the binding property tests (NATS, Kafka, MQTT).
//!
//! [`EventCases`] makes [`EventCase`]s, from which [`EventCase::event`] builds an [`Event`]
//! for binary or structured mode. Its [`Default`] is what every binding carries; a binding
//! replaces the parts its wire format treats differently (a Kafka key is any bytes, a NATS
//! server trims header values, ...). [`assert_same`] is the round-trip check.
//!
//! Behind the `proptest` feature.

use std::ops::Range;
use std::time::{Duration, UNIX_EPOCH};

use polybus_core::Event;
use polybus_core::cloudevents::{self, Mode};
use proptest::prelude::*;
use proptest::strategy::BoxedStrategy;
use serde_json::Value;

/// Attribute values (`id`, `source`, `type`): any non-control text, including spaces, quotes,
/// `%` and non-ASCII.
pub fn text() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{1,24}"
}

/// Header values and text keys: any non-control text, possibly empty.
pub fn header_value() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{0,16}"
}

/// Extension attribute names: lower-case letters and digits, never a context attribute.
pub fn extension_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,11}".prop_filter("not a context attribute", |n| {
        cloudevents::is_extension_name(n)
    })
}

/// Plain header names: not CloudEvents attributes on any binding.
pub fn plain_name() -> impl Strategy<Value = String> {
    "X-[A-Za-z0-9-]{1,10}"
}

/// Plain header values as a NATS server carries them: printable ASCII, no surrounding space.
pub fn printable_value() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,16}[!-~])?"
}

/// Event times, in microseconds since the epoch, up to the end of the year 9999.
pub fn micros() -> Range<u64> {
    0..253_402_300_799_000_000
}

/// An optional content type, out of `listed` (each as likely as none).
pub fn content_type(listed: &'static [&'static str]) -> BoxedStrategy<Option<String>> {
    let listed = listed.iter().map(|ct| Just(Some((*ct).to_owned())));
    proptest::strategy::Union::new(std::iter::once(Just(None)).chain(listed)).boxed()
}

/// The content types every binding carries in binary mode.
pub const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "text/plain; charset=utf-8",
    "application/octet-stream",
];

/// Keys as text (NATS and MQTT carry the key as a header or user property).
pub fn text_key() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(header_value().prop_map(String::into_bytes))
}

/// Keys as text or any bytes (a Kafka record key).
pub fn bytes_key() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(prop_oneof![
        header_value().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..16),
    ])
}

/// Headers `(name, value)` out of the two strategies, `count` of them (names may repeat).
pub fn headers(
    name: impl Strategy<Value = String> + 'static,
    value: impl Strategy<Value = String> + 'static,
    count: Range<usize>,
) -> BoxedStrategy<Vec<(String, String)>> {
    prop::collection::vec((name, value), count).boxed()
}

/// Headers `(name, value)` out of the two strategies, up to `count.end - 1` of them with
/// distinct names, sorted by name.
pub fn distinct_headers(
    name: impl Strategy<Value = String> + 'static,
    value: impl Strategy<Value = String> + 'static,
    count: Range<usize>,
) -> BoxedStrategy<Vec<(String, String)>> {
    prop::collection::btree_map(name, value, count)
        .prop_map(|m| m.into_iter().collect())
        .boxed()
}

/// A JSON document (so a structured event with a JSON content type can embed it).
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The JSON document `{"n":<any i64>}`: serialized, the same bytes as it is decoded again.
pub fn json_number() -> impl Strategy<Value = Value> {
    any::<i64>().prop_map(|n| serde_json::json!({ "n": n }))
}

/// The parts of an arbitrary event, before [`EventCase::event`] builds it for a mode.
#[derive(Debug, Clone)]
pub struct EventCase {
    /// `id`.
    pub id: String,
    /// `source`.
    pub source: String,
    /// `type`.
    pub kind: String,
    /// `time`, in microseconds since the epoch.
    pub micros: u64,
    /// The event key (`partitionkey`).
    pub key: Option<Vec<u8>>,
    /// `datacontenttype`.
    pub content_type: Option<String>,
    /// Extension attributes.
    pub extensions: Vec<(String, String)>,
    /// Plain headers (not CloudEvents attributes).
    pub plain: Vec<(String, String)>,
    /// Whether the event carries a fresh W3C `traceparent` header.
    pub traceparent: bool,
    /// The data in binary mode, and in structured mode unless the content type is JSON.
    pub data: Vec<u8>,
    /// The data in structured mode with a JSON content type.
    pub json: Value,
}

impl EventCase {
    /// Whether the content type is JSON (a structured event then embeds [`EventCase::json`]).
    pub fn is_json(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(cloudevents::is_json_content_type)
    }

    /// The same case without plain headers (for a binding that cannot carry them).
    #[must_use]
    pub fn without_plain(mut self) -> Self {
        self.plain.clear();
        self
    }

    /// The event, for `mode`: structured with a JSON content type embeds the JSON document,
    /// anything else the bytes.
    pub fn event(&self, mode: Mode) -> Event {
        let data = if mode == Mode::Structured && self.is_json() {
            serde_json::to_vec(&self.json).expect("a Value serializes")
        } else {
            self.data.clone()
        };
        let mut b = Event::builder()
            .id(self.id.clone())
            .source(self.source.clone())
            .kind(self.kind.clone())
            .time(UNIX_EPOCH + Duration::from_micros(self.micros))
            .data(data);
        if let Some(k) = &self.key {
            b = b.key(k.clone());
        }
        if let Some(ct) = &self.content_type {
            b = b.content_type(ct.clone());
        }
        for (n, v) in self.extensions.iter().chain(&self.plain) {
            b = b.header(n.clone(), v.clone());
        }
        if self.traceparent {
            b = b.header(
                "traceparent",
                polybus_core::telemetry::TraceContext::new_root().to_string(),
            );
        }
        b.build().expect("the strategy makes valid events")
    }
}

/// How a binding's arbitrary events are made, part by part.
#[derive(Debug)]
pub struct EventCases {
    /// The key: [`text_key`] by default.
    pub key: BoxedStrategy<Option<Vec<u8>>>,
    /// The content type: none or one of [`CONTENT_TYPES`] by default.
    pub content_type: BoxedStrategy<Option<String>>,
    /// Extension attributes: up to 3 of [`extension_name`] = [`header_value`] by default.
    pub extensions: BoxedStrategy<Vec<(String, String)>>,
    /// Plain headers: up to 3 of [`plain_name`] = [`header_value`] by default.
    pub plain: BoxedStrategy<Vec<(String, String)>>,
    /// Whether a `traceparent` header is added: either by default.
    pub traceparent: BoxedStrategy<bool>,
    /// The structured JSON data: any [`json`] document by default.
    pub json: BoxedStrategy<Value>,
}

impl Default for EventCases {
    fn default() -> Self {
        Self {
            key: text_key().boxed(),
            content_type: content_type(CONTENT_TYPES),
            extensions: headers(extension_name(), header_value(), 0..4),
            plain: headers(plain_name(), header_value(), 0..4),
            traceparent: any::<bool>().boxed(),
            json: json().boxed(),
        }
    }
}

impl EventCases {
    /// The strategy making the cases.
    pub fn strategy(self) -> impl Strategy<Value = EventCase> {
        (
            (text(), text(), text(), micros()),
            (self.key, self.content_type),
            (self.extensions, self.plain, self.traceparent),
            (prop::collection::vec(any::<u8>(), 0..64), self.json),
        )
            .prop_map(
                |(
                    (id, source, kind, micros),
                    (key, content_type),
                    (extensions, plain, traceparent),
                    (data, json),
                )| EventCase {
                    id,
                    source,
                    kind,
                    micros,
                    key,
                    content_type,
                    extensions,
                    plain,
                    traceparent,
                    data,
                    json,
                },
            )
    }
}

/// The headers of `ev`, sorted (the order a binding returns them in is its own).
pub fn sorted_headers(ev: &Event) -> Vec<(String, String)> {
    let mut h: Vec<_> = ev
        .headers()
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    h.sort();
    h
}

/// Checks that `got` is `sent` after a round trip: every attribute, every header (in any
/// order) and the data; with `json_data`, the data as equal JSON documents (`"data": null`
/// and no data being the same event in the JSON format), else as the same bytes.
///
/// # Errors
/// The first difference, as a failed test case.
pub fn assert_same(sent: &Event, got: &Event, json_data: bool) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.id(), sent.id());
    prop_assert_eq!(got.source(), sent.source());
    prop_assert_eq!(got.kind(), sent.kind());
    prop_assert_eq!(got.time(), sent.time());
    prop_assert_eq!(got.key(), sent.key(), "key");
    prop_assert_eq!(got.content_type(), sent.content_type());
    prop_assert_eq!(sorted_headers(got), sorted_headers(sent));
    if json_data && !sent.data().is_empty() {
        let b: Value = serde_json::from_slice(sent.data()).expect("JSON sent");
        if b.is_null() && got.data().is_empty() {
            return Ok(());
        }
        let a: Value = serde_json::from_slice(got.data()).expect("JSON back");
        prop_assert_eq!(a, b);
    } else {
        prop_assert_eq!(got.data(), sent.data());
    }
    Ok(())
}
