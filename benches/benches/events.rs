//! Hot paths that need no broker: building events, and the in-memory backend's
//! publish -> receive -> ack.

#![allow(missing_docs)]

use std::hint::black_box;
use std::pin::pin;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt as _;
use polybus_core::{Consumer as _, Event, MemoryBroker, Publisher as _};

fn event_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("event");
    let payload = Bytes::from(vec![b'x'; 64]);
    g.bench_function("new", |b| b.iter(|| Event::new(black_box(payload.clone()))));
    g.bench_function("builder_full", |b| {
        b.iter(|| {
            Event::builder()
                .kind("order.created")
                .source("urn:shop:orders")
                .key("customer-42")
                .header("tenant", "eu")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .content_type("application/json")
                .data(black_box(payload.clone()))
                .build()
                .expect("valid event")
        })
    });
    g.bench_function("new_id", |b| b.iter(polybus_core::new_id));
    g.bench_function("format_time", |b| {
        let t = std::time::SystemTime::now();
        b.iter(|| polybus_core::time::format_rfc3339(black_box(t)))
    });
    g.finish();
}

fn memory_roundtrip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("memory");
    for size in [64usize, 1024] {
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("publish_receive_ack", size),
            &size,
            |b, &size| {
                let broker = MemoryBroker::new();
                let publisher = broker.publisher();
                let consumer = broker.consumer_group("bench");
                let payload = Bytes::from(vec![b'x'; size]);
                b.to_async(&rt).iter_custom(|iters| {
                    let (publisher, consumer, payload) = (&publisher, &consumer, payload.clone());
                    async move {
                        let mut stream = pin!(consumer.subscribe("bench.memory"));
                        // Subscribe before timing: the first publish must find the group.
                        publisher
                            .publish("bench.memory", Event::new(payload.clone()))
                            .await
                            .expect("publish");
                        stream
                            .next()
                            .await
                            .expect("open")
                            .expect("delivery")
                            .ack()
                            .await
                            .expect("ack");
                        let t0 = std::time::Instant::now();
                        for _ in 0..iters {
                            publisher
                                .publish("bench.memory", Event::new(payload.clone()))
                                .await
                                .expect("publish");
                            let d = stream.next().await.expect("open").expect("delivery");
                            black_box(d.payload());
                            d.ack().await.expect("ack");
                        }
                        t0.elapsed()
                    }
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, event_build, memory_roundtrip);
criterion_main!(benches);
