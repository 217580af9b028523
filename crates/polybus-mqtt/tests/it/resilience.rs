//! Resilience against our own mosquitto processes: persistent sessions across a consumer
//! restart, a broker killed and restarted mid-run, the last will, resubscription.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use polybus_core::{Consumer, Delivery, Result as PbResult};
use polybus_mqtt::{LastWill, MqttClient, MqttConfig, MqttConsumer, QoS};
use polybus_testkit::brokers::BrokerProcess;

use crate::support;

fn cfg(port: u16, client_id: &str) -> MqttConfig {
    MqttConfig::new("127.0.0.1", port, client_id)
        .connect_timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(800))
}

fn persistent(port: u16, client_id: &str) -> MqttConfig {
    cfg(port, client_id)
        .clean_start(false)
        .session_expiry(Duration::from_secs(3600))
}

/// Receives into `seen` until it holds `want` distinct payloads or `within` passed; acks
/// everything. Returns how many deliveries arrived (duplicates included).
async fn collect_into(
    c: &mut MqttConsumer,
    seen: &mut HashSet<Vec<u8>>,
    want: usize,
    within: Duration,
) -> anyhow::Result<usize> {
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + within;
    while seen.len() < want {
        let Ok(d) = tokio::time::timeout_at(deadline, c.next()).await else {
            break;
        };
        let d: Delivery = d?;
        total += 1;
        seen.insert(d.payload().to_vec());
        d.ack().await?;
    }
    Ok(total)
}

async fn collect(
    c: &mut MqttConsumer,
    want: usize,
    within: Duration,
) -> anyhow::Result<(HashSet<Vec<u8>>, usize)> {
    let mut seen = HashSet::new();
    let total = collect_into(c, &mut seen, want, within).await?;
    Ok((seen, total))
}

/// Dapr's MQTT certification case: a consumer with a persistent session goes away while
/// 1,000 QoS 1 messages are published, comes back with the same client id and gets every one.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn persistent_session_receives_everything_it_missed() -> anyhow::Result<()> {
    let broker = BrokerProcess::mosquitto("max_queued_messages 2000\n").await?;
    let port = broker.port();
    let topic = support::topic();
    let id = support::client_id("persistent");

    let consumer = persistent(port, &id).connect().await?;
    let mut c = consumer.consumer();
    c.subscribe(&topic, 1).await?;
    drop(c);
    consumer.close().await?;

    let producer = cfg(port, &support::client_id("producer")).connect().await?;
    let p = producer.producer();
    let started = Instant::now();
    const N: usize = 1000;
    let published = futures_util::stream::iter(0..N)
        .map(|i| {
            let p = p.clone();
            let topic = topic.clone();
            async move { p.publish(&topic, format!("m-{i}"), 1).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let acked = published.iter().filter(|r| r.is_ok()).count();
    let publish_time = started.elapsed();

    let started = Instant::now();
    let consumer = persistent(port, &id).connect().await?;
    let mut c = consumer.consumer();
    c.subscribe(&topic, 1).await?;
    let (seen, total) = collect(&mut c, N, Duration::from_secs(60)).await?;
    println!(
        "persistent session: published {N}, acked by broker {acked} in {publish_time:?}; \
         received after restart {} distinct ({total} deliveries, {} duplicates) in {:?}",
        seen.len(),
        total - seen.len(),
        started.elapsed()
    );
    assert_eq!(acked, N);
    assert_eq!(seen.len(), N, "every missed message arrives");
    consumer.close().await?;
    producer.close().await?;
    Ok(())
}

async fn kill_and_restart_during_run(graceful: bool, qos: u8) -> anyhow::Result<()> {
    let mut broker = BrokerProcess::mosquitto(
        "max_queued_messages 100000\nautosave_on_changes true\nautosave_interval 1\n",
    )
    .await?;
    let port = broker.port();
    let topic = support::topic();

    let consumer = persistent(port, &support::client_id("victim-c"))
        .connect()
        .await?;
    let mut c = consumer.consumer();
    c.subscribe(&topic, 1).await?;
    let producer = cfg(port, &support::client_id("victim-p")).connect().await?;
    let p = producer.producer();

    const N: usize = 3000;
    let acked = Arc::new(AtomicUsize::new(0));
    let pub_task = {
        let (p, topic, acked) = (p.clone(), topic.clone(), acked.clone());
        tokio::spawn(async move {
            let results: Vec<PbResult<_>> = futures_util::stream::iter(0..N)
                .map(|i| {
                    let (p, topic, acked) = (p.clone(), topic.clone(), acked.clone());
                    async move {
                        let r = p.publish(&topic, format!("m-{i}"), qos).await;
                        if r.is_ok() {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        r.map(|_| i)
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            results
        })
    };

    // Receive a third, then take the broker down for a second and bring it back.
    let (mut seen, mut total) = collect(&mut c, N / 3, Duration::from_secs(30)).await?;
    let acked_at_kill = acked.load(Ordering::Relaxed);
    if graceful {
        let pid = broker.pid().expect("running");
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.kill().await; // reaps the exited process
    } else {
        broker.kill().await;
    }
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.start().await?;
    let restarted_after = down_at.elapsed();

    total += collect_into(&mut c, &mut seen, N, Duration::from_secs(90)).await?;
    let results = pub_task.await?;
    let acked_ids: HashSet<Vec<u8>> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|i| format!("m-{i}").into_bytes())
        .collect();
    let lost = acked_ids.difference(&seen).count();
    let mut missing: Vec<String> = acked_ids
        .difference(&seen)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    missing.sort();
    println!(
        "QoS {qos}, broker {} at {acked_at_kill} acked publishes, down for {restarted_after:?}: \
         published {N}, acked {}, received {} distinct, {} duplicates, \
         lost (acked but never received) {lost} {missing:?}",
        if graceful {
            "stopped (SIGTERM)"
        } else {
            "killed (SIGKILL)"
        },
        acked_ids.len(),
        seen.len(),
        total - seen.len(),
    );
    assert_eq!(
        acked_ids.len(),
        N,
        "every publish is acknowledged eventually"
    );
    assert_eq!(lost, 0, "no acknowledged message is lost");
    consumer.close().await?;
    producer.close().await?;
    Ok(())
}

/// mosquitto is SIGKILLed (persistence on, saved after every change) and restarted while a
/// QoS 1 run is going on: every message the broker acknowledged reaches the persistent
/// consumer.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn broker_killed_mid_run_loses_no_acknowledged_message() -> anyhow::Result<()> {
    kill_and_restart_during_run(false, 1).await
}

/// The same with a clean broker shutdown (SIGTERM saves the database).
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn broker_stopped_mid_run_loses_no_acknowledged_message() -> anyhow::Result<()> {
    kill_and_restart_during_run(true, 1).await
}

/// QoS 2 end to end (both sessions persistent) across a broker restart: nothing acknowledged
/// is lost, and the consumer's QoS 2 state (PUBREC sent, PUBREL pending) survives the
/// reconnect. A few duplicates are expected: a retransmitted PUBREL the broker answers with
/// "packet identifier not found" is sent again (see the crate docs), and when the original
/// PUBCOMP was merely lost that is a second copy with the same event id. The broker is stopped with SIGTERM: under SIGKILL mosquitto can lose a QoS 2
/// message it already completed (PUBCOMP is written before its database is saved, and QoS 2
/// messages wait longer in its memory), which no client can prevent; seen once in about 15
/// SIGKILL runs.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn qos2_across_a_broker_restart_loses_nothing() -> anyhow::Result<()> {
    kill_and_restart_during_run(true, 2).await
}

/// The last will is published when a client dies without DISCONNECT, and not when it closes.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn last_will_is_delivered_when_a_client_dies() -> anyhow::Result<()> {
    let broker = BrokerProcess::mosquitto("").await?;
    let port = broker.port();
    let will_topic = support::topic();
    let watcher = cfg(port, &support::client_id("watcher")).connect().await?;
    let mut w = watcher.consumer();
    w.subscribe(&will_topic, 1).await?;

    // A clean close: no will.
    let polite = cfg(port, &support::client_id("polite"))
        .last_will(LastWill::new(will_topic.clone(), "polite gone").qos(QoS::AtLeastOnce))
        .connect()
        .await?;
    polite.close().await?;
    let quiet = tokio::time::timeout(Duration::from_millis(700), w.next()).await;
    assert!(
        quiet.is_err(),
        "a clean DISCONNECT must not publish the will: {quiet:?}"
    );

    // A crash: the will arrives.
    let doomed: MqttClient = cfg(port, &support::client_id("doomed"))
        .last_will(LastWill::new(will_topic.clone(), "doomed gone").qos(QoS::AtLeastOnce))
        .connect()
        .await?;
    let killed_at = Instant::now();
    doomed.abort();
    let d = tokio::time::timeout(Duration::from_secs(10), w.next()).await??;
    assert_eq!(d.payload(), b"doomed gone");
    assert_eq!(d.topic(), will_topic);
    println!(
        "last will delivered {:?} after the connection dropped",
        killed_at.elapsed()
    );
    d.ack().await?;
    watcher.close().await?;
    Ok(())
}

/// A clean-session consumer subscribes again after the broker restarted without its session.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn subscriptions_are_renewed_after_a_new_session() -> anyhow::Result<()> {
    let mut broker = BrokerProcess::mosquitto("").await?;
    let port = broker.port();
    let topic = support::topic();
    let client = cfg(port, &support::client_id("renew")).connect().await?;
    let sub = client.subscriber(None);
    let mut stream = std::pin::pin!(sub.subscribe(&topic));
    let p = client.producer();
    // Wait for the SUBACK by round-tripping a message.
    p.publish(&topic, b"before", 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .expect("open")?;
    assert_eq!(d.payload(), b"before");
    d.ack().await?;

    broker.kill().await;
    // Publishes while the broker is down wait for the reconnect, then go out.
    let pending = {
        let (p, topic) = (p.clone(), topic.clone());
        tokio::spawn(async move { p.publish(&topic, b"during", 1).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!client.is_connected());
    broker.start().await?;
    pending.await??;
    // One connection: the SUBSCRIBE is renewed before the waiting publish is sent again, so
    // the message published during the outage comes back to us.
    let d = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await?
        .expect("open")?;
    assert_eq!(d.payload(), b"during");
    d.ack().await?;
    client.close().await?;
    Ok(())
}

/// A clean-session delivery dropped without ack is acknowledged (it could never come back), so
/// it does not hold one of the broker's in-flight slots: with a Receive Maximum of 4, 20
/// dropped deliveries in a row still all arrive.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn dropped_deliveries_do_not_stall_a_clean_session() -> anyhow::Result<()> {
    let client = support::config("drop").receive_maximum(4).connect().await?;
    let topic = support::topic();
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    let p = client.producer();
    for i in 0..20 {
        p.publish(&topic, format!("d-{i}"), 1).await?;
    }
    for i in 0..20 {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .map_err(|_| anyhow::anyhow!("stalled after {i} dropped deliveries"))??;
        drop(d);
    }
    client.close().await?;
    Ok(())
}

/// With a persistent session, deliveries dropped without ack come back after a reconnect,
/// marked as redeliveries; acked ones do not.
#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn unacked_deliveries_come_back_after_reconnect_with_a_persistent_session()
-> anyhow::Result<()> {
    let broker = BrokerProcess::mosquitto("").await?;
    let port = broker.port();
    let topic = support::topic();
    let id = support::client_id("redeliver");
    let client = persistent(port, &id).connect().await?;
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    let p = client.producer();
    for i in 0..6 {
        p.publish(&topic, format!("r-{i}"), 1).await?;
    }
    let mut dropped = HashSet::new();
    for i in 0..6 {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
        if i % 2 == 0 {
            d.ack().await?;
        } else {
            dropped.insert(d.payload().to_vec());
            drop(d);
        }
    }
    // Let the PUBACKs go out, then drop the connection the hard way and come back.
    p.flush().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.abort();
    drop(c);
    let client = persistent(port, &id).connect().await?;
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    let mut again = HashSet::new();
    while again.len() < dropped.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
        assert!(d.is_redelivered(), "a redelivery is marked: {d:?}");
        again.insert(d.payload().to_vec());
        d.ack().await?;
    }
    assert_eq!(again, dropped, "exactly the unacked ones come back");
    let extra = tokio::time::timeout(Duration::from_millis(500), c.next()).await;
    assert!(
        extra.is_err(),
        "acked deliveries must not come back: {extra:?}"
    );
    client.close().await?;
    Ok(())
}

/// A slow subscriber (0.5 ms per message, defaults otherwise) of mixed traffic: another
/// connection publishes 20,000 QoS 0 and 2,000 QoS 1 messages, interleaved, to a mosquitto
/// without queue limits. The subscription's buffer (4,096) fills many times over; the
/// connection must stop reading instead of dropping, so every QoS 1 message arrives (QoS 0
/// ones arrive too unless the broker drops them). Returns (QoS 0, QoS 1) distinct received.
async fn slow_consumer_of_mixed_qos(persistent_session: bool) -> anyhow::Result<(usize, usize)> {
    const Q0: usize = 20_000;
    const Q1: usize = 2_000;
    let broker = BrokerProcess::mosquitto("max_queued_messages 0\n").await?;
    let port = broker.port();
    let root = format!("slow/{}", uuid::Uuid::new_v4().simple());
    let id = support::client_id("slow");
    let sub_cfg = if persistent_session {
        persistent(port, &id)
    } else {
        cfg(port, &id)
    };
    let subscriber = sub_cfg.connect().await?;
    let mut c = subscriber.consumer();
    c.subscribe(&format!("{root}/#"), 1).await?;

    let producer = cfg(port, &support::client_id("flood")).connect().await?;
    let p = producer.producer();
    let publishing = {
        let root = root.clone();
        tokio::spawn(async move {
            let results = futures_util::stream::iter(0..Q0 + Q1)
                .map(|i| {
                    let (p, root) = (p.clone(), root.clone());
                    // Every eleventh message is QoS 1.
                    async move {
                        if i % 11 == 10 {
                            p.publish(&format!("{root}/q1"), format!("q1-{}", i / 11), 1)
                                .await
                        } else {
                            p.publish(&format!("{root}/q0"), format!("q0-{i}"), 0).await
                        }
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await;
            results.into_iter().filter(|r| r.is_err()).count()
        })
    };

    let (mut q0, mut q1) = (HashSet::new(), HashSet::new());
    let tally = |q0: &mut HashSet<Vec<u8>>, q1: &mut HashSet<Vec<u8>>, d: &Delivery| {
        let payload = d.payload().to_vec();
        if payload.starts_with(b"q1-") {
            q1.insert(payload);
        } else {
            q0.insert(payload);
        }
    };
    let mut last = Instant::now();
    while q1.len() < Q1 && last.elapsed() < Duration::from_secs(20) {
        let Ok(d) = tokio::time::timeout(Duration::from_millis(500), c.next()).await else {
            continue;
        };
        let d = d?;
        last = Instant::now();
        // The handler's work: 0.5 ms of a blocked thread.
        std::thread::sleep(Duration::from_micros(500));
        tally(&mut q0, &mut q1, &d);
        d.ack().await?;
    }
    // What is left of the QoS 0 flood.
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_secs(1), c.next()).await {
        tally(&mut q0, &mut q1, &d);
        d.ack().await?;
    }
    let failed = publishing.await?;
    println!(
        "FIGURES mqtt slow consumer ({} session): sent QoS 0 {Q0}, QoS 1 {Q1} (publish errors \
         {failed}); received QoS 0 {}, QoS 1 {}; lost QoS 0 {}, QoS 1 {}",
        if persistent_session {
            "persistent"
        } else {
            "clean"
        },
        q0.len(),
        q1.len(),
        Q0 - q0.len(),
        Q1 - q1.len(),
    );
    anyhow::ensure!(failed == 0, "{failed} publishes failed");
    anyhow::ensure!(
        q1.len() == Q1,
        "a slow consumer lost {} of {Q1} QoS 1 messages",
        Q1 - q1.len()
    );
    drop(c);
    subscriber.close().await?;
    producer.close().await?;
    Ok((q0.len(), q1.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn slow_consumer_on_a_clean_session_gets_every_qos1_message() -> anyhow::Result<()> {
    slow_consumer_of_mixed_qos(false).await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn slow_consumer_on_a_persistent_session_gets_every_qos1_message() -> anyhow::Result<()> {
    slow_consumer_of_mixed_qos(true).await.map(drop)
}
