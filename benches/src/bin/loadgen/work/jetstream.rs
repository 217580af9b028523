//! JetStream: publish-with-ack into a fresh file-storage stream, then pull-consume-with-ack
//! of the same stream (the consume step deletes it).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::Subject;
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull, stream::StorageType};
use futures_util::StreamExt as _;
use polybus_core::cloudevents::WireFormat;
use polybus_core::{Event, Publisher as _};
use polybus_jetstream::JsOptions;

use super::{Env, RawCloudEvent, consume_deliveries, consume_n, payload, windowed};
use crate::child::{ChildArgs, Outcome};
use crate::hist::Latency;
use crate::meter::Meter;
use crate::spec::Side;

/// The durable consumer (polybus: the group) both sides consume with.
const DURABLE: &str = "bench";
/// polybus' default `ConsumerSettings`: max_ack_pending 1000, fetch batch 100, expiry 1 s.
const MAX_ACK_PENDING: i64 = 1000;
const BATCH: usize = 100;
const EXPIRY: Duration = Duration::from_secs(1);

fn names(tag: &str) -> (String, String) {
    (format!("BENCH_{tag}"), format!("bench.js.{tag}"))
}

async fn raw_context(env: &Env) -> Result<jetstream::Context> {
    let client = async_nats::connect(env.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to {}", env.nats_url))?;
    Ok(jetstream::new(client))
}

/// Connects a raw JetStream context and makes `stream` (file storage, polybus' default) over
/// `subject` afresh: a stream of that name left by an earlier run is deleted first. The
/// workloads that store events make their stream with it and delete it with the context.
pub(crate) async fn fresh_stream(
    env: &Env,
    stream: &str,
    subject: &str,
) -> Result<jetstream::Context> {
    let admin = raw_context(env).await?;
    let _ = admin.delete_stream(stream).await;
    admin
        .create_stream(jetstream::stream::Config {
            name: stream.to_owned(),
            subjects: vec![subject.to_owned()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating stream {stream}: {e}"))?;
    Ok(admin)
}

/// Publishes N messages with `window` publishes awaiting their ack at once, into a fresh
/// stream (file storage, polybus' default) that the harness creates for both sides alike.
pub(crate) async fn publish(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let (stream, subject) = names(&a.tag);
    let admin = fresh_stream(env, &stream, &subject).await?;

    let data = payload(a.size);
    let mut latency = Latency::new();
    let t0;
    match a.side {
        Side::Polybus | Side::Lean => {
            let opts = JsOptions::new(env.nats_url.as_str());
            // Lean: the payload only, no `Nats-Msg-Id` (its default), like the peer.
            let opts = if a.side == Side::Lean {
                opts.wire_format(WireFormat::Lean)
            } else {
                opts
            };
            let js = opts.connect().await?;
            let p = js.producer();
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                let ev = Event::new(data.clone());
                let p = &p;
                let subject = subject.as_str();
                async move {
                    p.publish(subject, ev).await?;
                    Ok(())
                }
            })
            .await?;
            p.close().await?;
        }
        Side::Raw => {
            let ctx = raw_context(env).await?;
            let subj = Subject::from(subject.as_str());
            let template = super::nats::raw_template();
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                let id = RawCloudEvent::id();
                let mut h = template.clone();
                h.insert("ce-id", id.as_str());
                h.insert("ce-time", RawCloudEvent::time());
                h.insert("Nats-Msg-Id", id);
                let (ctx, subj, data) = (&ctx, subj.clone(), data.clone());
                async move {
                    ctx.publish_with_headers(subj, h, data)
                        .await
                        .map_err(|e| anyhow!("publish: {e}"))?
                        .await
                        .map_err(|e| anyhow!("publish ack: {e}"))?;
                    Ok(())
                }
            })
            .await?;
        }
        Side::Bare => {
            let ctx = raw_context(env).await?;
            let subj = Subject::from(subject.as_str());
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                let (ctx, subj, data) = (&ctx, subj.clone(), data.clone());
                async move {
                    ctx.publish(subj, data)
                        .await
                        .map_err(|e| anyhow!("publish: {e}"))?
                        .await
                        .map_err(|e| anyhow!("publish ack: {e}"))?;
                    Ok(())
                }
            })
            .await?;
        }
        Side::Template => bail!("the template side has no JetStream publish"),
        Side::RustStream => {
            let broker = super::nats::rs_connect(env).await?;
            let p = broker.publisher(ruststream_nats::JetStreamPublish::default());
            t0 = Instant::now();
            windowed(a.messages, a.window, meter, &mut latency, |_| {
                let (p, subject, data) = (&p, subject.as_str(), &data);
                async move {
                    let msg = ruststream::OutgoingMessage::with_payload(
                        subject,
                        ruststream::BytesMut::from(&data[..]),
                    );
                    p.publish_ack(msg, None).await?;
                    Ok(())
                }
            })
            .await?;
            // No consume step for this side: the stream goes now.
            let _ = admin.delete_stream(&stream).await;
        }
    }
    Ok(Outcome::timed(latency, t0.elapsed()))
}

/// Consumes the N messages the publish step stored, through a durable pull consumer
/// (explicit ack, max 1000 unacknowledged, batches of 100), acking each. Measured from the
/// first message to the last; deletes the stream afterwards.
pub(crate) async fn consume(env: &Env, a: &ChildArgs, meter: &Meter) -> Result<Outcome> {
    let (stream, subject) = names(&a.tag);
    let n = a.messages;
    let admin = raw_context(env).await?;
    let info = admin
        .get_stream(&stream)
        .await
        .map_err(|e| anyhow!("stream {stream} (the publish step makes it): {e}"))?
        .get_info()
        .await
        .map_err(|e| anyhow!("stream info: {e}"))?;
    if info.state.messages < n {
        bail!(
            "stream {stream} holds {} messages, expected {n}",
            info.state.messages
        );
    }

    let stall = Duration::from_secs(30);
    let consumed = match a.side {
        Side::Polybus | Side::Lean | Side::RustStream => {
            let js = JsOptions::new(env.nats_url.as_str()).connect().await?;
            let consumer = js.consumer(Some(DURABLE));
            consume_deliveries(&consumer, &subject, n, stall, meter).await?
        }
        Side::Template => bail!("the template side has no JetStream consume"),
        Side::Raw | Side::Bare => {
            let ctx = raw_context(env).await?;
            let consumer: jetstream::consumer::PullConsumer = ctx
                .get_stream(&stream)
                .await
                .map_err(|e| anyhow!("{e}"))?
                .get_or_create_consumer(
                    DURABLE,
                    pull::Config {
                        durable_name: Some(DURABLE.to_owned()),
                        name: Some(DURABLE.to_owned()),
                        ack_policy: AckPolicy::Explicit,
                        max_ack_pending: MAX_ACK_PENDING,
                        filter_subject: subject.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| anyhow!("creating the consumer: {e}"))?;
            // The same batch size and expiry as polybus' pull requests (100 messages, 1 s). With
            // the client's default 30 s expiry, a pull request the server turns down (max
            // unacknowledged reached while acks are still on their way) stalls for 30 s.
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(BATCH)
                .expires(EXPIRY)
                .heartbeat(EXPIRY / 2)
                .messages()
                .await
                .map_err(|e| anyhow!("{e}"))?;
            consume_n(
                n,
                stall,
                meter,
                "message",
                async || Some(messages.next().await?.map_err(|e| anyhow!("{e}"))),
                async |msg| {
                    black_box(msg.headers.as_ref().and_then(|h| h.get("ce-id")));
                    msg.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
                    Ok(())
                },
            )
            .await?
        }
    };
    let outcome = consumed.outcome();
    let _ = admin.delete_stream(&stream).await;
    Ok(outcome)
}
