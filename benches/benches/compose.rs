//! The composed bus without brokers: the consumer dedup lookup, and the spool's append /
//! forward / complete cycle (`Bus::publish` over in-memory NATS and Kafka stand-ins, so what
//! is measured is the bus itself and its redb spool).

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use polybus_compose::{Bus, DedupStore, MemoryDedupStore};
use polybus_core::{Event, MemoryBroker};

fn dedup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("dedup");
    for keys in [1_000usize, 100_000] {
        let store = MemoryDedupStore::new(Duration::from_secs(3600));
        let ids: Vec<String> = (0..keys)
            .map(|i| format!("urn:bench {}", uuid::Uuid::from_u128(i as u128)))
            .collect();
        rt.block_on(async {
            for id in &ids {
                store.record(id, 1).await.expect("record");
            }
        });
        g.bench_with_input(BenchmarkId::new("get_hit", keys), &ids, |b, ids| {
            let mut i = 0usize;
            b.to_async(&rt).iter(|| {
                i = (i + 7919) % ids.len();
                let (store, id) = (&store, &ids[i]);
                async move { black_box(store.get(id).await.expect("get")) }
            })
        });
        g.bench_with_input(BenchmarkId::new("get_miss", keys), &keys, |b, _| {
            b.to_async(&rt)
                .iter(|| async { black_box(store.get("urn:bench absent").await.expect("get")) })
        });
    }
    g.bench_function("record", |b| {
        let store = MemoryDedupStore::new(Duration::from_secs(3600)).max_keys(100_000);
        let mut i = 0u128;
        b.to_async(&rt).iter(|| {
            i += 1;
            let key = format!("urn:bench {}", uuid::Uuid::from_u128(i));
            let store = &store;
            async move { store.record(&key, 1).await.expect("record") }
        })
    });
    g.finish();
}

/// `Bus::publish` over in-memory brokers: NATS publish, spool append (redb, group commit),
/// ack; a forwarder then publishes to the Kafka stand-in and completes the spool entry.
fn spool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (nats, kafka) = (MemoryBroker::new(), MemoryBroker::new());
    let bus = rt
        .block_on(
            Bus::builder()
                .memory(&nats, &kafka)
                .spool_dir(dir.path())
                .build(),
        )
        .expect("bus");
    let payload = Bytes::from(vec![b'x'; 64]);
    let mut g = c.benchmark_group("spool");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.bench_function("publish_ack_one_at_a_time", |b| {
        b.to_async(&rt).iter(|| {
            let (bus, ev) = (&bus, Event::new(payload.clone()));
            async move { bus.publish("bench.spool", ev).await.expect("publish") }
        })
    });
    g.bench_function("publish_256_then_forwarded", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (bus, payload) = (&bus, payload.clone());
            async move {
                let t0 = std::time::Instant::now();
                for _ in 0..iters {
                    let batch =
                        (0..256).map(|_| bus.publish("bench.spool", Event::new(payload.clone())));
                    for r in futures_util::future::join_all(batch).await {
                        r.expect("publish");
                    }
                }
                assert!(bus.wait_forwarded(Duration::from_secs(60)).await);
                t0.elapsed() / 256
            }
        })
    });
    g.finish();
    rt.block_on(bus.close()).expect("close");
}

criterion_group!(benches, dedup, spool);
criterion_main!(benches);
