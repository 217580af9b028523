//! The CloudEvents bindings: encode and decode of one event, binary and structured mode.
//!
//! The NATS binding is public (`polybus_nats::{encode_event, decode_event}`; JetStream uses it
//! too) and is measured against what a raw async-nats producer does for the same headers. The
//! Kafka and MQTT bindings are private to their crates; what they share is measured here
//! (`cloudevents::write_binary`, `BinaryDecoder`, structured mode).

#![allow(missing_docs)]

use std::hint::black_box;

use async_nats::HeaderMap;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use polybus_core::Event;
use polybus_core::cloudevents::{self, BinaryDecoder, Mode};

fn event(size: usize) -> Event {
    Event::builder()
        .kind("order.created")
        .source("urn:shop:orders")
        .key("customer-42")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .data(Bytes::from(vec![b'x'; size]))
        .build()
        .expect("valid event")
}

fn nats(c: &mut Criterion) {
    let mut g = c.benchmark_group("nats");
    for size in [64usize, 1024] {
        let ev = event(size);
        g.bench_with_input(BenchmarkId::new("encode_binary", size), &ev, |b, ev| {
            b.iter(|| {
                polybus_nats::encode_event(black_box(ev), Mode::Binary, "nats").expect("encode")
            })
        });
        g.bench_with_input(BenchmarkId::new("encode_structured", size), &ev, |b, ev| {
            b.iter(|| {
                polybus_nats::encode_event(black_box(ev), Mode::Structured, "nats").expect("encode")
            })
        });
        let (h, p) = polybus_nats::encode_event(&ev, Mode::Binary, "nats").expect("encode");
        g.bench_with_input(
            BenchmarkId::new("decode_binary", size),
            &(h, p),
            |b, (h, p)| {
                b.iter(|| {
                    polybus_nats::decode_event(Some(black_box(h)), p.clone(), "nats")
                        .expect("decode")
                })
            },
        );
        let (h, p) = polybus_nats::encode_event(&ev, Mode::Structured, "nats").expect("encode");
        g.bench_with_input(
            BenchmarkId::new("decode_structured", size),
            &(h, p),
            |b, (h, p)| {
                b.iter(|| {
                    polybus_nats::decode_event(Some(black_box(h)), p.clone(), "nats")
                        .expect("decode")
                })
            },
        );
    }
    // The reference: a raw producer's headers for the same event (template clone + fresh id
    // and time), against Event::new + encode (plain, and through the publisher's Encoder),
    // which is what polybus does per publish.
    let mut template = HeaderMap::new();
    template.insert("ce-specversion", "1.0");
    template.insert("ce-source", "urn:polybus");
    template.insert("ce-type", "polybus.event");
    g.bench_function("raw_headers_reference", |b| {
        b.iter(|| {
            let mut h = template.clone();
            h.insert("ce-id", uuid::Uuid::now_v7().hyphenated().to_string());
            h.insert(
                "ce-time",
                polybus_core::time::format_rfc3339(std::time::SystemTime::now()),
            );
            h
        })
    });
    let payload = Bytes::from(vec![b'x'; 64]);
    g.bench_function("event_new_and_encode", |b| {
        b.iter(|| {
            let ev = Event::new(payload.clone());
            polybus_nats::encode_event(&ev, Mode::Binary, "nats").expect("encode")
        })
    });
    let encoder = polybus_nats::Encoder::new(Mode::Binary);
    g.bench_function("event_new_and_encoder", |b| {
        b.iter(|| {
            let ev = Event::new(payload.clone());
            encoder.encode(&ev, "nats").expect("encode")
        })
    });
    g.finish();
}

fn shared(c: &mut Criterion) {
    let mut g = c.benchmark_group("cloudevents");
    let ev = event(64);
    g.bench_function("write_binary", |b| {
        b.iter(|| {
            let n = std::cell::Cell::new(0usize);
            cloudevents::write_binary(
                black_box(&ev),
                |k, v| n.set(n.get() + k.len() + v.len()),
                |k, v| n.set(n.get() + k.len() + v.len()),
            );
            n.get()
        })
    });
    let mut attrs = Vec::new();
    let mut plain = Vec::new();
    cloudevents::write_binary(
        &ev,
        |k, v| attrs.push((k.to_owned(), v.to_owned())),
        |k, v| plain.push((k.to_owned(), v.to_owned())),
    );
    g.bench_function("binary_decoder", |b| {
        b.iter(|| {
            let mut d = BinaryDecoder::new();
            for (k, v) in &attrs {
                d.attribute(k, v.as_str());
            }
            for (k, v) in &plain {
                d.header(k.as_str(), v.as_str());
            }
            d.finish(ev.data().clone(), "bench").expect("decode")
        })
    });
    g.bench_function("to_structured", |b| {
        b.iter(|| cloudevents::to_structured(black_box(&ev), "bench").expect("encode"))
    });
    let (doc, _) = cloudevents::to_structured(&ev, "bench").expect("encode");
    g.bench_function("from_structured", |b| {
        b.iter(|| cloudevents::from_structured(black_box(&doc), "bench").expect("decode"))
    });
    g.finish();
}

criterion_group!(benches, nats, shared);
criterion_main!(benches);
