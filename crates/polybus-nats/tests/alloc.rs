//! Allocations per message of the NATS binding, counted by a global allocator that only this
//! test binary installs (so no other test pays for the counting). The bounds pin today's
//! figures: a change that adds an allocation to building, encoding or decoding the envelope
//! fails here instead of slipping into the benchmarks unnoticed.
//!
//! Counted per message (`Event::new` + `Encoder::encode_owned` on a warm encoder, and
//! `decode_event` of what that wrote); docs/PERFORMANCE.md quotes the same figures.

use std::alloc::System;

use std::sync::Arc;

use bytes::Bytes;
use polybus_core::cloudevents::{Mode, WireFormat};
use polybus_core::telemetry::Telemetry;
use polybus_core::{Delivery, Event, NoopAcker};
use polybus_nats::{Encoder, decode_event};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations (and reallocations) `f` makes, averaged over `rounds` calls after two warm-up
/// calls. The counter is process-wide: the measurements run one after the other in the one
/// test of this binary.
fn allocations_per_call(rounds: u64, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let region = Region::new(GLOBAL);
    for _ in 0..rounds {
        f();
    }
    let stats = region.change();
    (stats.allocations + stats.reallocations) as f64 / rounds as f64
}

const ROUNDS: u64 = 1000;

fn payload() -> Bytes {
    Bytes::from_static(br#"{"id":1234567,"name":"abcdefghijklmnopqrstuvwxyzabcdefghijklmn"}"#)
}

/// One test: the allocation counter is shared by every thread of the process.
#[test]
fn allocations_per_message_are_pinned() {
    full_cloudevents_publish();
    lean_publish();
    full_cloudevents_receive();
    lean_receive();
    lean_delivery();
    cheapest_raw_program();
}

fn full_cloudevents_publish() {
    let encoder = Encoder::new(Mode::Binary);
    let data = payload();
    let per_message = allocations_per_call(ROUNDS, || {
        let ev = Event::new(data.clone());
        let encoded = encoder.encode_owned(ev, "nats").expect("encodes");
        std::hint::black_box(encoded);
    });
    println!("full CloudEvents: Event::new + encode = {per_message} allocations per message");
    assert!(
        per_message < FULL_PUBLISH + SLACK,
        "{per_message} allocations per message (pinned: {FULL_PUBLISH})"
    );
}

fn lean_publish() {
    let encoder = Encoder::with_format(Mode::Binary, WireFormat::Lean);
    let data = payload();
    let per_message = allocations_per_call(ROUNDS, || {
        let ev = Event::new(data.clone());
        let encoded = encoder.encode_owned(ev, "nats").expect("encodes");
        std::hint::black_box(encoded);
    });
    println!("lean: Event::new + encode = {per_message} allocations per message");
    assert!(
        per_message < LEAN_PUBLISH + SLACK,
        "{per_message} allocations per message (pinned: {LEAN_PUBLISH})"
    );
}

fn full_cloudevents_receive() {
    let encoder = Encoder::new(Mode::Binary);
    let (headers, data) = encoder
        .encode_owned(Event::new(payload()), "nats")
        .expect("encodes");
    let per_message = allocations_per_call(ROUNDS, || {
        let ev = decode_event(Some(&headers), data.clone(), "nats").expect("decodes");
        std::hint::black_box(ev);
    });
    println!("full CloudEvents: decode = {per_message} allocations per message");
    assert!(
        per_message < FULL_DECODE + SLACK,
        "{per_message} allocations per message (pinned: {FULL_DECODE})"
    );
}

fn lean_receive() {
    let encoder = Encoder::with_format(Mode::Binary, WireFormat::Lean);
    let (headers, data) = encoder
        .encode_owned(Event::new(payload()), "nats")
        .expect("encodes");
    assert!(headers.is_empty(), "a lean message without headers");
    let per_message = allocations_per_call(ROUNDS, || {
        let ev = decode_event(None, data.clone(), "nats").expect("decodes");
        std::hint::black_box(ev);
    });
    println!("lean: decode = {per_message} allocations per message");
    assert!(
        per_message < LEAN_DECODE + SLACK,
        "{per_message} allocations per message (pinned: {LEAN_DECODE})"
    );
}

fn lean_delivery() {
    // What the subscription does per message of a lean publisher: decode, a `Delivery` with
    // the core NATS acker (kept inline, not boxed) and the telemetry (no metrics recorder
    // installed: no in-flight count), then the handler drops it.
    let telemetry = Telemetry::new("nats");
    let topic: Arc<str> = Arc::from("orders");
    let data = payload();
    let per_message = allocations_per_call(ROUNDS, || {
        let ev = decode_event(None, data.clone(), "nats").expect("decodes");
        let d = telemetry.delivered(Delivery::new(ev, topic.clone(), NoopAcker("nats")));
        std::hint::black_box(d);
    });
    println!("lean: decode + delivery = {per_message} allocations per message");
    assert!(
        per_message < LEAN_DELIVERY + SLACK,
        "{per_message} allocations per message (pinned: {LEAN_DELIVERY})"
    );
}

/// The cheapest raw async-nats program writing the same headers as polybus' full mode (the
/// `template` side of the benchmarks): one prebuilt map of every header, cloned per message,
/// a fresh id and time written into the clone. polybus' full publish must not allocate more.
fn cheapest_raw_program() {
    let encoder = Encoder::new(Mode::Binary);
    let (template, _) = encoder
        .encode_owned(Event::new(payload()), "nats")
        .expect("encodes");
    assert_eq!(template.len(), 5, "specversion, id, source, type, time");
    let id = Event::new(payload()).id().to_owned();
    let per_message = allocations_per_call(ROUNDS, || {
        let mut h = template.clone();
        h.insert("ce-id", id.clone());
        h.insert(
            "ce-time",
            polybus_core::time::format_rfc3339(std::time::SystemTime::now()),
        );
        std::hint::black_box(h);
    });
    println!("raw, prebuilt headers: clone + id + time = {per_message} allocations per message");
    assert!(
        FULL_PUBLISH <= per_message,
        "polybus' full publish ({FULL_PUBLISH}) allocates more than the prebuilt-template program ({per_message})"
    );

    // The bench's `raw` side: a template of the three constant headers, id and time inserted
    // (the map grows once). Fewer allocations than cloning all five; polybus may not make more
    // than it either.
    let mut constant = async_nats::HeaderMap::new();
    for name in ["ce-specversion", "ce-source", "ce-type"] {
        let value = template.get(name).expect("in the template").as_str();
        constant.insert(name, value);
    }
    let per_message = allocations_per_call(ROUNDS, || {
        let mut h = constant.clone();
        h.insert("ce-id", id.clone());
        h.insert(
            "ce-time",
            polybus_core::time::format_rfc3339(std::time::SystemTime::now()),
        );
        std::hint::black_box(h);
    });
    println!("raw, same headers: clone of 3 + id + time = {per_message} allocations per message");
    assert!(
        FULL_PUBLISH <= per_message + SLACK,
        "polybus' full publish ({FULL_PUBLISH}) allocates more than the raw program ({per_message})"
    );
}

/// Another thread of the test harness may allocate while a measurement runs (the counter is
/// process-wide): up to half an allocation per message on average is not ours.
const SLACK: f64 = 0.5;

/// The pinned figures (allocations per message); lower them when a change saves one.
///
/// Full: the event's id (1, made when the encoder asks for it); the clone of the per-publisher header template (the table, and
/// per header async-nats' `Vec` of values and, for `specversion`, `source` and `type`, the
/// value's `String`: 9); the id moved into a new value list (1); the time formatted (1) into a
/// new value list (1). async-nats keeps each header as a `Vec<HeaderValue(String)>` in a
/// `HashMap`, so a raw program writing the same five headers makes about as many.
const FULL_PUBLISH: f64 = 13.0;
/// Lean: nothing (the payload is a reference-counted clone; the event's id, which lean does
/// not write, is never made).
const LEAN_PUBLISH: f64 = 0.0;
/// Decode: the id, source and type strings of the event.
const FULL_DECODE: f64 = 3.0;
/// Lean decode of a message without headers: nothing (the event's id is made only if asked).
const LEAN_DECODE: f64 = 0.0;
/// Lean decode and the delivery around it: nothing (the `NoopAcker` is kept inline; without a
/// metrics recorder the delivery holds no metric handles).
const LEAN_DELIVERY: f64 = 0.0;
