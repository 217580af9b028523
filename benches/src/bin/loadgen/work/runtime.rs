//! polybus-runtime on JetStream: the `App` against a hand-written consume loop on the same
//! polybus consumer, and ordered concurrency with a handler that waits 1 ms.
//!
//! Every run stores its N events first (not measured; keyed, JSON `{"id":SEQ,"name":KEY}`),
//! then consumes them through a durable pull consumer, acking each, measured from the first
//! handled event to the last (like the consume steps). The stream goes afterwards.
//!
//! * `runtime.c1` ([`Kind::RuntimeLoop`](crate::spec::Kind)): polybus = `App` at concurrency
//!   1 whose handler decodes the JSON (`Data` extractor); raw = the loop a service writes by
//!   hand on the same consumer (`subscribe`, decode, `ack`). Target >= 0.97 x. The step's
//!   window is the App's `buffer` (deliveries held beyond the running one): 1 (the default at
//!   concurrency 1) in `runtime.c1`, 256 in `runtime.c1.b256`.
//! * `runtime.c8` ([`Kind::RuntimeConcurrent`](crate::spec::Kind)): a handler that decodes
//!   the `Json` payload, checks per-key order and waits 1 ms; polybus = the `App` at
//!   concurrency 8, raw = the same `App` at concurrency 1. Target >= 6 x. The events are
//!   stored one after another (so the stream holds each key's events in `id` order) over 64
//!   keys; a handler that sees a key's `id` go backwards fails the run.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use async_nats::jetstream;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use polybus_core::{Consumer as _, Delivery, Event, Publisher as _};
use polybus_jetstream::JsOptions;
use polybus_runtime::{App, Data, Json, Key, State};

use super::jetstream::fresh_stream;
use super::{Consumed, Env, consume_n, decode_order};
use crate::child::{ChildArgs, Outcome};
use crate::meter::Meter;
use crate::spec::{Kind, Side};

/// The durable consumer (the app's group) of every run.
const DURABLE: &str = "bench-runtime";
/// Keys of the stored events (`id % KEYS`).
const KEYS: u64 = 64;
/// What the concurrent workload's handler waits.
const HANDLER_WAIT: Duration = Duration::from_millis(1);

fn names(tag: &str) -> (String, String) {
    (format!("BENCH_RT_{tag}"), format!("bench.rt.{tag}"))
}

/// Creates the run's stream and stores `n` events in it; `in_order`: one publish after
/// another (each key's events stored in `id` order), else 256 at once.
async fn prefill(env: &Env, tag: &str, n: u64, in_order: bool) -> Result<jetstream::Context> {
    let (stream, subject) = names(tag);
    let admin = fresh_stream(env, &stream, &subject).await?;
    let js = JsOptions::new(env.nats_url.as_str()).connect().await?;
    let p = js.producer();
    let event = |id: u64| {
        Event::builder()
            .key(format!("k{:02}", id % KEYS))
            .data(format!(r#"{{"id":{id},"name":"k{:02}"}}"#, id % KEYS))
            .content_type("application/json")
            .build()
    };
    if in_order {
        for id in 0..n {
            p.publish(&subject, event(id)?).await?;
        }
    } else {
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0;
        while next < n || !in_flight.is_empty() {
            while next < n && in_flight.len() < 256 {
                let (p, subject, ev) = (&p, subject.as_str(), event(next)?);
                in_flight.push(async move { p.publish(subject, ev).await });
                next += 1;
            }
            if let Some(r) = in_flight.next().await {
                r?;
            }
        }
    }
    p.close().await?;
    Ok(admin)
}

/// What the handlers of one run share: progress, timing, per-key order.
struct Shared {
    n: u64,
    meter: Meter,
    count: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    done: tokio::sync::Notify,
    /// The last `id` handled per key.
    seen: Mutex<HashMap<String, u64>>,
    /// The first order violation, if any.
    broken: Mutex<Option<String>>,
}

impl Shared {
    fn new(n: u64, meter: &Meter) -> Arc<Shared> {
        Arc::new(Shared {
            n,
            meter: meter.clone(),
            count: AtomicU64::new(0),
            first: Mutex::new(None),
            last: Mutex::new(None),
            done: tokio::sync::Notify::new(),
            seen: Mutex::new(HashMap::new()),
            broken: Mutex::new(None),
        })
    }

    fn started(&self) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(Instant::now);
    }

    fn handled(&self) {
        self.meter.add(1);
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.n {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            self.done.notify_one();
        }
    }

    /// Records that `key`'s event `id` is being handled; an `id` not above the key's last one
    /// is an order violation.
    fn check_order(&self, key: &str, id: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&prev) = seen.get(key)
            && id <= prev
        {
            let mut broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
            broken
                .get_or_insert_with(|| format!("key {key}: event {id} handled after event {prev}"));
        }
        seen.insert(key.to_owned(), id);
    }

    fn outcome(&self, notes: Vec<String>) -> Result<Outcome> {
        if let Some(broken) = self.broken.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bail!("per-key order broken: {broken}");
        }
        let first = *self.first.lock().unwrap_or_else(|e| e.into_inner());
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(first), Some(last)) = (first, last) else {
            bail!(
                "handled {} of {} events",
                self.count.load(Ordering::SeqCst),
                self.n
            );
        };
        let c = Consumed {
            first: Some(first),
            count: self.count.load(Ordering::SeqCst),
        };
        let mut out = c.outcome();
        out.elapsed = last.duration_since(first);
        out.notes = notes;
        Ok(out)
    }
}

#[derive(serde::Deserialize)]
struct Seq {
    id: u64,
    name: String,
}

/// `runtime.c1`'s handler: the work of the hand-written loop (decode the JSON), nothing more.
async fn decode(Data(data): Data, State(s): State<Arc<Shared>>) -> Result<()> {
    s.started();
    decode_order(&data)?;
    s.handled();
    Ok(())
}

/// `runtime.c8`'s handler: decode, check the key's order, wait 1 ms.
async fn ordered_wait(
    Json(seq): Json<Seq>,
    Key(key): Key,
    State(s): State<Arc<Shared>>,
) -> Result<()> {
    s.started();
    let key = String::from_utf8_lossy(key.as_deref().unwrap_or_default()).into_owned();
    anyhow::ensure!(key == seq.name, "event {} has key {key:?}", seq.id);
    s.check_order(&key, seq.id);
    tokio::time::sleep(HANDLER_WAIT).await;
    s.handled();
    Ok(())
}

/// Runs `app` on the run's JetStream consumer until the `n` events are handled.
async fn run_app(env: &Env, app: App<Arc<Shared>>, s: &Arc<Shared>) -> Result<()> {
    let js = JsOptions::new(env.nats_url.as_str()).connect().await?;
    let consumer = js.consumer(Some(DURABLE));
    let publisher = js.producer();
    let stall = Duration::from_secs(60);
    let done = s.clone();
    let app = app.run_until(
        consumer,
        publisher,
        async move { done.done.notified().await },
    );
    tokio::time::timeout(stall + Duration::from_secs(s.n / 100), app)
        .await
        .map_err(|_| {
            anyhow!(
                "the app handled {} of {} events in time",
                s.count.load(Ordering::SeqCst),
                s.n
            )
        })??;
    Ok(())
}

/// Both runtime workloads (see the module docs).
pub(crate) async fn consume(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let (stream, subject) = names(&a.tag);
    let n = a.messages;
    let concurrent = a.kind == Kind::RuntimeConcurrent;
    let admin = prefill(env, &a.tag, n, concurrent).await?;
    let s = Shared::new(n, meter);
    let outcome = match (a.kind, a.side) {
        (Kind::RuntimeLoop, Side::Raw) => {
            let js = JsOptions::new(env.nats_url.as_str()).connect().await?;
            let consumer = js.consumer(Some(DURABLE));
            // The hand-written loop: subscribe, decode, ack.
            let mut deliveries = pin!(consumer.subscribe(&subject));
            let consumed = consume_n(
                n,
                Duration::from_secs(30),
                meter,
                "delivery",
                async || Some(deliveries.next().await?.map_err(anyhow::Error::from)),
                async |d: Delivery| {
                    decode_order(d.payload())?;
                    d.ack().await?;
                    Ok(())
                },
            )
            .await?;
            Ok(consumed.outcome())
        }
        (Kind::RuntimeLoop, _) => {
            // The step's window is the App's buffer: deliveries held beyond the one running.
            let app = App::with_state(s.clone())
                .route(subject.as_str(), decode)
                .buffer(a.window);
            run_app(env, app, &s).await?;
            s.outcome(vec![format!("App, concurrency 1, buffer {}", a.window)])
        }
        (_, side) => {
            let c = if side == Side::Raw { 1 } else { 8 };
            let app = App::with_state(s.clone())
                .route(subject.as_str(), ordered_wait)
                .concurrency(c);
            run_app(env, app, &s).await?;
            s.outcome(vec![format!(
                "App, concurrency {c}, handler waits {HANDLER_WAIT:?}, {KEYS} keys, per-key order checked"
            )])
        }
    };
    let _ = admin.delete_stream(&stream).await;
    outcome
}
