//! MQTT 5: publish-to-receive at QoS 0 and QoS 1, both ends on the side under test (a
//! publisher connection and a subscriber connection).
//!
//! The same client options on both sides, the adapter's: TCP_NODELAY, manual acks (polybus
//! acks a QoS 1 message when `Delivery::ack` is called; the raw subscriber calls
//! `AsyncClient::ack` after reading the message), receive maximum and outgoing in-flight
//! 1024, 1 MiB packets. The raw publisher queues into rumqttc, which keeps at most 1024
//! unacknowledged; polybus keeps 1024 publishes awaiting their PUBACK (`window`). The publisher
//! also stays at most `window` messages ahead of the subscriber. Each payload carries its send
//! time in its first 8 bytes, so the subscriber records publish-to-receive latency.

use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use polybus_core::{Consumer as _, Event, Publisher};
use polybus_mqtt::{MqttConfig, QoS};
use rumqttc::v5::mqttbytes::QoS as RawQoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::{AsyncClient, Event as RawEvent, EventLoop, Incoming, MqttOptions};
use std::sync::Mutex;

use super::{Env, RawCloudEvent, wait_until, windowed};
use crate::child::{ChildArgs, Outcome};
use crate::hist::Latency;
use crate::meter::Meter;
use crate::spec::Side;

/// Publish-to-receive at `qos` (0 or 1).
pub(crate) async fn pub_sub(env: &Env, a: &ChildArgs, meter: &Meter, qos: u8) -> Result<Outcome> {
    let topic = format!("bench/mqtt/{}", a.tag);
    let (n, size) = (a.messages, a.size.max(8));
    let window = a.window.max(1) as u64;
    let received = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Latency::new()));
    let ready = Arc::new(tokio::sync::Notify::new());
    let t0 = Arc::new(std::sync::OnceLock::<Instant>::new());
    let last_ns = Arc::new(AtomicU64::new(0));

    // What the subscriber does with each payload: warm-ups (shorter than `size`) only say the
    // subscription is live; measured ones carry their send time.
    let on_payload = {
        let (received, latency, ready, t0, last_ns, meter) = (
            received.clone(),
            latency.clone(),
            ready.clone(),
            t0.clone(),
            last_ns.clone(),
            meter.clone(),
        );
        move |payload: &[u8]| -> bool {
            if payload.len() < size {
                ready.notify_one();
                return false;
            }
            let Some(start) = t0.get() else { return false };
            let now = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&payload[..8]);
            let sent = u64::from_le_bytes(sent);
            if let Ok(mut l) = latency.lock() {
                l.record(Duration::from_nanos(now.saturating_sub(sent)));
            }
            last_ns.store(now, Ordering::Relaxed);
            meter.add(1);
            received.fetch_add(1, Ordering::Relaxed) + 1 >= n
        }
    };

    let id = |role: &str| format!("bench-{}-{role}", a.tag);
    let subscriber = match a.side {
        Side::Polybus => {
            let client = MqttConfig::new(env.mqtt_host.as_str(), env.mqtt_port, id("sub"))
                .default_qos(QoS::from_level(qos)?)
                .connect()
                .await?;
            let sub = client.subscriber(None);
            let topic = topic.clone();
            tokio::spawn(async move {
                let mut deliveries = pin!(sub.subscribe(&topic));
                while let Some(d) = deliveries.next().await {
                    let d = d?;
                    black_box(d.event().id());
                    let done = on_payload(d.payload());
                    d.ack().await?;
                    if done {
                        break;
                    }
                }
                client.close().await?;
                anyhow::Ok(())
            })
        }
        _ => {
            // The event loop must keep running while the application acks (an ack is a request
            // to that same loop), so messages go to an application task, as in the adapter.
            let (client, mut el) = raw_client(env, &id("sub"));
            client.subscribe(topic.clone(), raw_qos(qos)).await?;
            let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
            let events = tokio::spawn(async move {
                while let Ok(event) = el.poll().await {
                    if let RawEvent::Incoming(Incoming::Publish(p)) = event
                        && tx.send(p).await.is_err()
                    {
                        break;
                    }
                }
                // Drain until the DISCONNECT is out.
                let _ = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
            });
            tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    black_box(p.properties.as_ref().map(|pr| pr.user_properties.len()));
                    let done = on_payload(&p.payload);
                    if p.qos != RawQoS::AtMostOnce {
                        client.ack(&p).await?;
                    }
                    if done {
                        break;
                    }
                }
                client.disconnect().await?;
                drop(rx);
                let _ = tokio::time::timeout(Duration::from_secs(2), events).await;
                anyhow::Ok(())
            })
        }
    };

    let lag_ok = {
        let received = received.clone();
        move |i: u64| i.saturating_sub(received.load(Ordering::Relaxed)) < window
    };
    let stamp = {
        let t0 = t0.clone();
        move || {
            let mut b = BytesMut::zeroed(size);
            let ns = t0
                .get()
                .map_or(0, |t| u64::try_from(t.elapsed().as_nanos()).unwrap_or(0));
            b[..8].copy_from_slice(&ns.to_le_bytes());
            b.freeze()
        }
    };
    match a.side {
        Side::Polybus => {
            let client = MqttConfig::new(env.mqtt_host.as_str(), env.mqtt_port, id("pub"))
                .default_qos(QoS::from_level(qos)?)
                .connect()
                .await?;
            let p = client.producer();
            // The trait method: MqttProducer's inherent `publish` is the seed's (topic, payload, qos).
            warm_up(&ready, || {
                Publisher::publish(&p, &topic, Event::new(Bytes::new()))
            })
            .await?;
            let _ = t0.set(Instant::now());
            let mut acks = Latency::new();
            windowed(n, a.window, meter_none(), &mut acks, |i| {
                let (p, topic, lag_ok, stamp) = (&p, topic.as_str(), lag_ok.clone(), &stamp);
                async move {
                    if !lag_ok(i) {
                        wait_until(Duration::from_secs(30), move || lag_ok(i)).await;
                    }
                    Publisher::publish(p, topic, Event::new(stamp())).await?;
                    Ok(())
                }
            })
            .await?;
            finish(subscriber, &received, n).await?;
            p.close().await?;
        }
        _ => {
            let (client, mut el) = raw_client(env, &id("pub"));
            let driver = tokio::spawn(async move {
                loop {
                    if el.poll().await.is_err() {
                        break;
                    }
                }
            });
            let ce = RawCloudEvent::new();
            let props = || PublishProperties {
                user_properties: vec![
                    ("specversion".into(), "1.0".into()),
                    ("id".into(), RawCloudEvent::id()),
                    ("source".into(), ce.source.into()),
                    ("type".into(), ce.kind.into()),
                    ("time".into(), RawCloudEvent::time()),
                    // No `traceparent`: polybus writes one only when there is a trace to
                    // continue (`TracePolicy::Continue`, its default), and here there is none.
                ],
                ..Default::default()
            };
            warm_up(&ready, || {
                client.publish_with_properties(
                    topic.clone(),
                    raw_qos(qos),
                    false,
                    Bytes::new(),
                    props(),
                )
            })
            .await?;
            let _ = t0.set(Instant::now());
            for i in 0..n {
                if !lag_ok(i) {
                    let lag_ok = lag_ok.clone();
                    wait_until(Duration::from_secs(30), move || lag_ok(i)).await;
                }
                client
                    .publish_with_properties(topic.clone(), raw_qos(qos), false, stamp(), props())
                    .await?;
            }
            finish(subscriber, &received, n).await?;
            client.disconnect().await?;
            let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
        }
    }
    let count = received.load(Ordering::Relaxed).min(n);
    let mut notes = Vec::new();
    if count < n {
        notes.push(format!("{} of {n} messages not received", n - count));
    }
    let latency = Arc::try_unwrap(latency)
        .map_err(|_| anyhow!("the subscriber still holds the histogram"))?
        .into_inner()
        .map_err(|_| anyhow!("the histogram lock is poisoned"))?;
    Ok(Outcome {
        count,
        elapsed: Duration::from_nanos(last_ns.load(Ordering::Relaxed)),
        latency: Some(latency),
        notes,
    })
}

/// A meter nobody reads: the subscriber counts progress, not the publisher.
fn meter_none() -> &'static Meter {
    static NONE: std::sync::OnceLock<Meter> = std::sync::OnceLock::new();
    NONE.get_or_init(Meter::detached)
}

fn raw_qos(qos: u8) -> RawQoS {
    match qos {
        0 => RawQoS::AtMostOnce,
        1 => RawQoS::AtLeastOnce,
        _ => RawQoS::ExactlyOnce,
    }
}

/// A rumqttc v5 client with the adapter's options.
fn raw_client(env: &Env, id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, env.mqtt_host.as_str(), env.mqtt_port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_manual_acks(true)
        .set_max_packet_size(Some(1024 * 1024))
        .set_receive_maximum(Some(1024))
        .set_outgoing_inflight_upper_limit(1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    AsyncClient::new(o, 256)
}

/// Publishes warm-up messages until the subscriber has one.
async fn warm_up<F, Fut, T, E>(ready: &tokio::sync::Notify, mut publish: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        publish().await.context("warm-up publish")?;
        if tokio::time::timeout(Duration::from_millis(20), ready.notified())
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the subscriber did not receive a warm-up message within 10 s");
        }
    }
}

/// Waits for the subscriber; gives up once nothing arrives for 5 s.
async fn finish(
    subscriber: tokio::task::JoinHandle<Result<()>>,
    received: &AtomicU64,
    n: u64,
) -> Result<()> {
    let mut last = (0, Instant::now());
    while !subscriber.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c = received.load(Ordering::Relaxed);
        if c != last.0 {
            last = (c, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            subscriber.abort();
            return Ok(());
        }
    }
    match subscriber.await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(anyhow!("subscriber task: {e}")),
    }
    .map(|_| debug_assert!(received.load(Ordering::Relaxed) <= n))
}
