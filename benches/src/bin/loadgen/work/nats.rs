//! Core NATS: publish, publish-to-receive, request-reply.

use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt as _;
use polybus_core::{Consumer as _, ErrorKind, Event, Publisher as _};
use polybus_nats::{NatsConsumer, NatsProducer};

use polybus_core::cloudevents::WireFormat;

use super::{Env, RawCloudEvent, decode_order, json_payload, payload, wait_until};
use crate::child::{ChildArgs, Outcome};
use crate::hist::Latency;
use crate::meter::Meter;
use crate::spec::Side;

/// The constant CloudEvents NATS binding headers a raw producer sets up once.
pub(crate) fn raw_template() -> HeaderMap {
    let ce = RawCloudEvent::new();
    let mut h = HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-source", ce.source);
    h.insert("ce-type", ce.kind);
    h
}

/// Every CloudEvents NATS binding header polybus writes, set up once (id and time too): the
/// cheapest raw program clones it per message and writes a fresh id and time into the clone,
/// which then has room for them (no growth of the map).
pub(crate) fn full_template() -> HeaderMap {
    let mut h = raw_template();
    h.insert("ce-id", RawCloudEvent::id());
    h.insert("ce-time", RawCloudEvent::time());
    h
}

/// The headers of one raw message: the template, a fresh id and the time. No `traceparent`:
/// polybus writes one only when there is a trace to continue, and none of these runs has one.
fn raw_headers(template: &HeaderMap) -> HeaderMap {
    let mut h = template.clone();
    h.insert("ce-id", RawCloudEvent::id());
    h.insert("ce-time", RawCloudEvent::time());
    h
}

async fn raw_connect(env: &Env) -> Result<async_nats::Client> {
    async_nats::connect(env.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to {}", env.nats_url))
}

/// The publisher of one side: polybus (either wire format), the raw client (with the same
/// CloudEvents headers as polybus, or the payload only) or RustStream.
pub(crate) enum SidePublisher {
    Polybus(NatsProducer),
    Raw {
        client: async_nats::Client,
        template: Option<HeaderMap>,
    },
    Template {
        client: async_nats::Client,
        template: HeaderMap,
    },
    RustStream {
        broker: ruststream_nats::ConnectedNatsBroker,
        publisher: ruststream_nats::NatsPublisher,
    },
}

impl SidePublisher {
    pub(crate) async fn connect(env: &Env, side: Side) -> Result<Self> {
        Ok(match side {
            Side::Polybus => SidePublisher::Polybus(NatsProducer::connect(&env.nats_url).await?),
            Side::Lean => SidePublisher::Polybus(
                NatsProducer::builder(env.nats_url.as_str())
                    .wire_format(WireFormat::Lean)
                    .producer()
                    .await?,
            ),
            Side::Raw | Side::Bare => SidePublisher::Raw {
                client: raw_connect(env).await?,
                template: (side == Side::Raw).then(raw_template),
            },
            Side::Template => SidePublisher::Template {
                client: raw_connect(env).await?,
                template: full_template(),
            },
            Side::RustStream => {
                let broker = rs_connect(env).await?;
                let publisher = broker.publisher(ruststream_nats::NatsPublish);
                SidePublisher::RustStream { broker, publisher }
            }
        })
    }

    /// Publishes `data` as a new message on `subject` (`subj`: the same, prepared once).
    pub(crate) async fn publish(&self, subject: &str, subj: &Subject, data: &Bytes) -> Result<()> {
        match self {
            SidePublisher::Polybus(p) => {
                p.publish(subject, Event::new(data.clone())).await?;
            }
            SidePublisher::Raw {
                client,
                template: Some(t),
            } => {
                client
                    .publish_with_headers(subj.clone(), raw_headers(t), data.clone())
                    .await?;
            }
            SidePublisher::Raw {
                client,
                template: None,
            } => client.publish(subj.clone(), data.clone()).await?,
            SidePublisher::Template { client, template } => {
                let mut h = template.clone();
                h.insert("ce-id", RawCloudEvent::id());
                h.insert("ce-time", RawCloudEvent::time());
                client
                    .publish_with_headers(subj.clone(), h, data.clone())
                    .await?;
            }
            SidePublisher::RustStream { publisher, .. } => {
                // RustStream's publishers take the payload as the `BytesMut` its codecs write
                // into (a typed message is serialized into one): one copy of the 64 bytes.
                let msg = ruststream::OutgoingMessage::with_payload(
                    subject,
                    ruststream::BytesMut::from(&data[..]),
                );
                ruststream::Publisher::publish(publisher, msg, None).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        match self {
            SidePublisher::Polybus(p) => p.flush().await?,
            SidePublisher::Raw { client, .. } | SidePublisher::Template { client, .. } => {
                client.flush().await?;
            }
            SidePublisher::RustStream { broker, .. } => broker
                .client()
                .flush()
                .await
                .map_err(|e| anyhow!("flush: {e}"))?,
        }
        Ok(())
    }

    pub(crate) async fn close(self) -> Result<()> {
        match self {
            SidePublisher::Polybus(p) => p.close().await?,
            SidePublisher::Raw { client, .. } | SidePublisher::Template { client, .. } => {
                client.drain().await?;
            }
            SidePublisher::RustStream { broker, .. } => {
                broker
                    .client()
                    .drain()
                    .await
                    .map_err(|e| anyhow!("drain: {e}"))?;
            }
        }
        Ok(())
    }
}

/// Connects RustStream's NATS broker outside an app (its documented one-off use).
pub(crate) async fn rs_connect(env: &Env) -> Result<ruststream_nats::ConnectedNatsBroker> {
    use ruststream::Broker as _;
    ruststream_nats::NatsBroker::new(env.nats_url.as_str())
        .connect()
        .await
        .with_context(|| format!("RustStream connecting to {}", env.nats_url))
}

/// Publishes N messages (no subscriber), then flushes; the time includes the flush.
pub(crate) async fn publish(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let subject = format!("bench.nats.pub.{}", a.tag);
    let subj = Subject::from(subject.as_str());
    let data = payload(a.size);
    let n = a.messages;
    let p = SidePublisher::connect(env, a.side).await?;
    let t0 = Instant::now();
    for _ in 0..n {
        p.publish(&subject, &subj, &data).await?;
        meter.add(1);
    }
    p.flush().await?;
    let elapsed = t0.elapsed();
    p.close().await?;
    Ok(Outcome {
        count: n,
        elapsed,
        latency: None,
        notes: Vec::new(),
    })
}

/// Publish -> handler: the side's publisher sends N JSON documents, staying at most `window`
/// messages ahead of the side's subscriber, whose handler decodes each one. Measured from the
/// first publish to the N-th handled message.
pub(crate) async fn handler(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let subject = format!("bench.nats.handler.{}", a.tag);
    let subj = Subject::from(subject.as_str());
    let (n, size) = (a.messages, a.size);
    let state = Arc::new(Received {
        count: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
    });
    let ready = Arc::new(tokio::sync::Notify::new());
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let on_message = {
        let (state, meter, ready, start) =
            (state.clone(), meter.clone(), ready.clone(), start.clone());
        move |len: usize| -> bool {
            if len < size {
                ready.notify_one();
                return false;
            }
            let c = state.count.fetch_add(1, Ordering::Relaxed) + 1;
            meter.add(1);
            if let Some(t0) = start.get() {
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                state.last_ns.store(ns, Ordering::Relaxed);
            }
            c >= n
        }
    };
    let subscriber = match a.side {
        Side::Polybus | Side::Lean => {
            let consumer = NatsConsumer::connect(&env.nats_url).await?;
            let subject = subject.clone();
            tokio::spawn(async move {
                let mut stream = pin!(consumer.subscribe(&subject));
                while let Some(d) = stream.next().await {
                    let d = d?;
                    let len = d.payload().len();
                    decode_order(d.payload())?;
                    d.ack().await?;
                    if on_message(len) {
                        break;
                    }
                }
                consumer.close().await?;
                anyhow::Ok(())
            })
        }
        Side::Raw | Side::Bare | Side::Template => {
            let c = raw_connect(env).await?;
            let mut sub = c.subscribe(subject.clone()).await?;
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let len = msg.payload.len();
                    decode_order(&msg.payload)?;
                    if on_message(len) {
                        break;
                    }
                }
                c.drain().await?;
                anyhow::Ok(())
            })
        }
        Side::RustStream => {
            use ruststream::{IncomingMessage as _, Subscriber as _};
            let broker = rs_connect(env).await?;
            let mut sub = broker
                .subscribe_with(ruststream_nats::CoreSubject::new(subject.clone()))
                .await?;
            tokio::spawn(async move {
                let mut stream = pin!(sub.stream());
                while let Some(msg) = stream.next().await {
                    let msg = msg?;
                    let len = msg.payload().len();
                    decode_order(msg.payload())?;
                    if on_message(len) {
                        break;
                    }
                }
                drop(broker);
                anyhow::Ok(())
            })
        }
    };

    let p = SidePublisher::connect(env, a.side).await?;
    let data = json_payload(size);
    let warm_up = json_payload(20);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        p.publish(&subject, &subj, &warm_up).await?;
        p.flush().await?;
        if tokio::time::timeout(Duration::from_millis(10), ready.notified())
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the subscriber did not receive a warm-up message within 10 s");
        }
    }
    let window = a.window.max(1) as u64;
    let t0 = Instant::now();
    let _ = start.set(t0);
    for sent in 0..n {
        if sent - state.count.load(Ordering::Relaxed).min(sent) >= window {
            let state = state.clone();
            wait_until(Duration::from_secs(30), move || {
                sent - state.count.load(Ordering::Relaxed).min(sent) < window / 2
            })
            .await;
        }
        p.publish(&subject, &subj, &data).await?;
    }
    p.flush().await?;
    let notes = wait_for_subscriber(subscriber, &state, n).await?;
    p.close().await?;
    Ok(Outcome {
        count: state.count.load(Ordering::Relaxed).min(n),
        elapsed: Duration::from_nanos(state.last_ns.load(Ordering::Relaxed)),
        latency: None,
        notes,
    })
}

/// Waits for the subscriber task; gives up once nothing arrives for 5 s (messages were lost).
async fn wait_for_subscriber(
    subscriber: tokio::task::JoinHandle<Result<()>>,
    state: &Received,
    n: u64,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let mut last = (0, Instant::now());
    while !subscriber.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c = state.count.load(Ordering::Relaxed);
        if c != last.0 {
            last = (c, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            subscriber.abort();
            notes.push(format!(
                "{} of {n} messages lost (slow consumer)",
                n - c.min(n)
            ));
            break;
        }
    }
    if subscriber.is_finished() {
        match subscriber.await {
            Ok(r) => r?,
            Err(e) if e.is_cancelled() => {}
            Err(e) => return Err(anyhow!("subscriber task: {e}")),
        }
    }
    Ok(notes)
}

/// Shared state of a publish-to-receive run.
struct Received {
    count: AtomicU64,
    /// Nanoseconds from the start of the measured publishing to the last measured receive.
    last_ns: AtomicU64,
}

/// Publish-to-receive: a raw publisher (the same for both sides) sends N messages with the
/// CloudEvents headers, staying at most `window` messages ahead of the subscriber under test.
/// Measured from the first publish to the N-th receive.
pub(crate) async fn subscribe(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let subject = format!("bench.nats.sub.{}", a.tag);
    let (n, size) = (a.messages, a.size);
    let state = Arc::new(Received {
        count: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
    });
    let ready = Arc::new(tokio::sync::Notify::new());
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());

    // The subscriber under test. A message shorter than `size` is a warm-up message: it only
    // tells the publisher that the subscription is live.
    let on_message = {
        let (state, meter, ready, start) =
            (state.clone(), meter.clone(), ready.clone(), start.clone());
        move |len: usize| -> bool {
            if len < size {
                ready.notify_one();
                return false;
            }
            let c = state.count.fetch_add(1, Ordering::Relaxed) + 1;
            meter.add(1);
            if let Some(t0) = start.get() {
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                state.last_ns.store(ns, Ordering::Relaxed);
            }
            c >= n
        }
    };
    let subscriber = match a.side {
        Side::Polybus => {
            let consumer = NatsConsumer::connect(&env.nats_url).await?;
            let subject = subject.clone();
            tokio::spawn(async move {
                let mut stream = pin!(consumer.subscribe(&subject));
                while let Some(d) = stream.next().await {
                    let d = d?;
                    let len = d.payload().len();
                    black_box(d.event().id());
                    d.ack().await?;
                    if on_message(len) {
                        break;
                    }
                }
                consumer.close().await?;
                anyhow::Ok(())
            })
        }
        _ => {
            let c = raw_connect(env).await?;
            let mut sub = c.subscribe(subject.clone()).await?;
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let len = msg.payload.len();
                    black_box(msg.headers.as_ref().and_then(|h| h.get("ce-id")));
                    if on_message(len) {
                        break;
                    }
                }
                c.drain().await?;
                anyhow::Ok(())
            })
        }
    };

    // The publisher: warm up until the subscriber hears us, then the measured messages.
    let c = raw_connect(env).await?;
    let subj = Subject::from(subject.as_str());
    let template = raw_template();
    let data = payload(size);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.publish_with_headers(subj.clone(), raw_headers(&template), Bytes::new())
            .await?;
        c.flush().await?;
        if tokio::time::timeout(Duration::from_millis(10), ready.notified())
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the subscriber did not receive a warm-up message within 10 s");
        }
    }
    let window = a.window.max(1) as u64;
    let t0 = Instant::now();
    let _ = start.set(t0);
    for sent in 0..n {
        if sent - state.count.load(Ordering::Relaxed).min(sent) >= window {
            // Wait until the subscriber has caught up by half a window.
            let state = state.clone();
            wait_until(Duration::from_secs(30), move || {
                sent - state.count.load(Ordering::Relaxed).min(sent) < window / 2
            })
            .await;
        }
        c.publish_with_headers(subj.clone(), raw_headers(&template), data.clone())
            .await?;
    }
    c.flush().await?;

    let notes = wait_for_subscriber(subscriber, &state, n).await?;
    c.drain().await?;
    Ok(Outcome {
        count: state.count.load(Ordering::Relaxed).min(n),
        elapsed: Duration::from_nanos(state.last_ns.load(Ordering::Relaxed)),
        latency: None,
        notes,
    })
}

/// Request-reply: one request at a time, N measured round trips after 200 unmeasured ones.
/// The responder runs in the same process on its own connection.
pub(crate) async fn request_reply(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    const WARM_UP: u64 = 200;
    let subject = format!("bench.nats.rr.{}", a.tag);
    let data = payload(a.size);
    let n = a.messages;
    let mut latency = Latency::new();

    let responder = match a.side {
        Side::Polybus => {
            let cons = NatsConsumer::connect(&env.nats_url).await?;
            let (subject, data) = (subject.clone(), data.clone());
            tokio::spawn(async move {
                let mut requests = pin!(cons.serve(&subject));
                while let Some(req) = requests.next().await {
                    req?.respond(Event::new(data.clone())).await?;
                }
                anyhow::Ok(())
            })
        }
        _ => {
            let c = raw_connect(env).await?;
            let mut sub = c.subscribe(subject.clone()).await?;
            let template = raw_template();
            let data = data.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    black_box(msg.headers.as_ref().and_then(|h| h.get("ce-id")));
                    if let Some(reply) = msg.reply {
                        c.publish_with_headers(reply, raw_headers(&template), data.clone())
                            .await?;
                    }
                }
                anyhow::Ok(())
            })
        }
    };

    let t0;
    match a.side {
        Side::Polybus => {
            let p = NatsProducer::connect(&env.nats_url).await?;
            // Until the responder's subscription is live, requests find no responders.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match p.request(&subject, Event::new(data.clone())).await {
                    Ok(_) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            for _ in 0..WARM_UP {
                p.request(&subject, Event::new(data.clone())).await?;
            }
            t0 = Instant::now();
            for _ in 0..n {
                let started = Instant::now();
                let reply = p.request(&subject, Event::new(data.clone())).await?;
                latency.record(started.elapsed());
                black_box(reply.data().len());
                meter.add(1);
            }
        }
        _ => {
            let c = raw_connect(env).await?;
            let subj = Subject::from(subject.as_str());
            let template = raw_template();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c
                    .request_with_headers(subj.clone(), raw_headers(&template), data.clone())
                    .await
                {
                    Ok(_) => break,
                    Err(e)
                        if e.kind() == async_nats::RequestErrorKind::NoResponders
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            for _ in 0..WARM_UP {
                c.request_with_headers(subj.clone(), raw_headers(&template), data.clone())
                    .await?;
            }
            t0 = Instant::now();
            for _ in 0..n {
                let started = Instant::now();
                let reply = c
                    .request_with_headers(subj.clone(), raw_headers(&template), data.clone())
                    .await?;
                latency.record(started.elapsed());
                black_box(reply.payload.len());
                meter.add(1);
            }
        }
    }
    let elapsed = t0.elapsed();
    responder.abort();
    Ok(Outcome::timed(latency, elapsed))
}
