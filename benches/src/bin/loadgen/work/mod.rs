//! The workloads, one module per broker. Each has a polybus side (public API only:
//! `Publisher::publish`, `Consumer::subscribe`, `Delivery::ack`) and a raw side (the client
//! underneath, used as its documentation shows) doing the same work: same payload, same
//! CloudEvents headers on the wire, same window of publishes in flight, same acks.

pub(crate) mod batch;
pub(crate) mod compose;
pub(crate) mod jetstream;
pub(crate) mod kafka;
pub(crate) mod mqtt;
pub(crate) mod nats;
pub(crate) mod runtime;

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use polybus_core::{Consumer, Delivery};

use crate::child::Outcome;
use crate::hist::Latency;
use crate::meter::Meter;

/// Broker addresses, from the `POLYBUS_*` variables `cargo xtask` exports.
#[derive(Clone, Debug)]
pub(crate) struct Env {
    pub(crate) nats_url: String,
    pub(crate) kafka_brokers: String,
    pub(crate) mqtt_host: String,
    pub(crate) mqtt_port: u16,
}

impl Env {
    pub(crate) fn from_env() -> Env {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Env {
            nats_url: var("POLYBUS_NATS_URL", "nats://127.0.0.1:4222"),
            kafka_brokers: var("POLYBUS_KAFKA_BROKERS", "127.0.0.1:9092"),
            mqtt_host: var("POLYBUS_MQTT_HOST", "127.0.0.1"),
            mqtt_port: var("POLYBUS_MQTT_PORT", "1883").parse().unwrap_or(1883),
        }
    }
}

/// The payload every message of a run shares (cloning it is a reference count).
pub(crate) fn payload(size: usize) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// A JSON document of exactly `size` bytes (at least 20) that [`decode_order`] reads: the
/// payload of the publish -> handler workload.
pub(crate) fn json_payload(size: usize) -> Bytes {
    let head = "{\"id\":1234567,\"name\":\"";
    let pad = size.saturating_sub(head.len() + 2);
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(head.as_bytes());
    v.extend((0..pad).map(|i| b'a' + (i % 26) as u8));
    v.extend_from_slice(b"\"}");
    Bytes::from(v)
}

/// What the handler of the publish -> handler workload decodes (borrowing the name, as a
/// handler that only reads it would).
#[derive(serde::Deserialize)]
struct Order<'a> {
    id: u64,
    #[serde(borrow)]
    name: &'a str,
}

/// The handler's work, the same on every side: decode the JSON payload.
pub(crate) fn decode_order(payload: &[u8]) -> Result<()> {
    let order: Order<'_> = serde_json::from_slice(payload)?;
    black_box((order.id, order.name.len()));
    Ok(())
}

/// The CloudEvents attributes a raw producer writes by hand for the same wire message as
/// polybus: specversion, source and type (constant, set up once), and per message a fresh id
/// (a UUIDv7), the current time (RFC 3339, formatted with polybus-core's helper, which is as
/// fast as hand-written digits get) and a `traceparent`.
pub(crate) struct RawCloudEvent {
    pub(crate) source: &'static str,
    pub(crate) kind: &'static str,
}

impl RawCloudEvent {
    pub(crate) fn new() -> Self {
        RawCloudEvent {
            source: polybus_core::DEFAULT_SOURCE,
            kind: polybus_core::DEFAULT_KIND,
        }
    }

    /// A fresh UUIDv7, as a raw producer would make its ids.
    pub(crate) fn id() -> String {
        uuid::Uuid::now_v7().hyphenated().to_string()
    }

    /// The current time.
    pub(crate) fn time() -> String {
        polybus_core::time::format_rfc3339(std::time::SystemTime::now())
    }
}

/// Runs `n` operations with at most `window` in flight, recording each one's latency (start
/// to completion) and bumping the meter as they complete. Both sides use it.
pub(crate) async fn windowed<F, Fut>(
    n: u64,
    window: usize,
    meter: &Meter,
    latency: &mut Latency,
    mut op: F,
) -> Result<()>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0u64;
    let window = window.max(1);
    while next < n || !in_flight.is_empty() {
        while next < n && in_flight.len() < window {
            let started = Instant::now();
            let fut = op(next);
            if next == 0 {
                eprintln!(
                    "loadgen: one operation future is {} bytes",
                    std::mem::size_of_val(&fut)
                );
            }
            in_flight.push(async move { fut.await.map(|()| started.elapsed()) });
            next += 1;
        }
        if let Some(done) = in_flight.next().await {
            latency.record(done?);
            meter.add(1);
        }
    }
    Ok(())
}

/// How a consume step went: when its first message arrived and how many arrived.
#[derive(Default)]
pub(crate) struct Consumed {
    first: Option<Instant>,
    count: u64,
}

impl Consumed {
    /// The outcome, timed from the first message to now: the first one is not counted.
    pub(crate) fn outcome(&self) -> Outcome {
        Outcome {
            count: self.count.saturating_sub(1),
            elapsed: self.first.map(|t| t.elapsed()).unwrap_or_default(),
            latency: None,
            notes: Vec::new(),
        }
    }
}

/// Receives `n` messages with `recv` (`None`: the subscription ended), each within `stall` or
/// an error naming `what` it waited for, and settles each with `settle`, bumping the meter.
/// Both sides of the consume steps use it.
pub(crate) async fn consume_n<T>(
    n: u64,
    stall: Duration,
    meter: &Meter,
    what: &str,
    mut recv: impl AsyncFnMut() -> Option<Result<T>>,
    mut settle: impl AsyncFnMut(T) -> Result<()>,
) -> Result<Consumed> {
    let mut c = Consumed::default();
    while c.count < n {
        let m = tokio::time::timeout(stall, recv())
            .await
            .map_err(|_| anyhow!("no {what} for {stall:?} after {}", c.count))?
            .ok_or_else(|| anyhow!("the subscription ended after {}", c.count))??;
        c.first.get_or_insert_with(Instant::now);
        settle(m).await?;
        c.count += 1;
        meter.add(1);
    }
    Ok(c)
}

/// The polybus side of a consume step: subscribes `consumer` to `topic` and acks `n`
/// deliveries (reading each one's id).
pub(crate) async fn consume_deliveries<C: Consumer>(
    consumer: &C,
    topic: &str,
    n: u64,
    stall: Duration,
    meter: &Meter,
) -> Result<Consumed> {
    let mut deliveries = pin!(consumer.subscribe(topic));
    consume_n(
        n,
        stall,
        meter,
        "delivery",
        async || Some(deliveries.next().await?.map_err(anyhow::Error::from)),
        async |d: Delivery| {
            black_box(d.event().id());
            d.ack().await?;
            Ok(())
        },
    )
    .await
}

/// Polls `check` every millisecond until it is true or `timeout` passes.
pub(crate) async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}
