//! A rough side-by-side of raw rumqttc and polybus-mqtt QoS 1 publishing (printed, not
//! asserted; `cargo xtask bench` is the real measurement).

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};

use crate::support;

const N: usize = 100_000;

/// CPU time of this process (user + system), from /proc: steadier than wall time on a busy
/// machine.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

async fn raw_rumqttc(topic: &str) -> anyhow::Result<Duration> {
    let (host, port) = support::broker();
    let mut o = MqttOptions::new(support::client_id("raw"), host, port);
    o.set_max_packet_size(Some(1 << 20));
    let (client, mut el) = AsyncClient::new(o, 1024);
    let started = Instant::now();
    let t = topic.to_owned();
    let pubs = tokio::spawn(async move {
        for _ in 0..N {
            client
                .publish(t.clone(), QoS::AtLeastOnce, false, vec![7u8; 128])
                .await?;
        }
        anyhow::Ok(client)
    });
    let mut acked = 0;
    while acked < N {
        if let Event::Incoming(Incoming::PubAck(_)) = el.poll().await? {
            acked += 1;
        }
    }
    let elapsed = started.elapsed();
    let client = pubs.await??;
    client.disconnect().await?;
    Ok(elapsed)
}

async fn polybus(topic: &str) -> anyhow::Result<Duration> {
    let client = support::connect("perf").await?;
    let p = client.producer();
    let payload = bytes::Bytes::from(vec![7u8; 128]);
    let started = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..N)
        .map(|_| {
            let (p, payload) = (p.clone(), payload.clone());
            async move { p.publish(topic, payload, 1).await }
        })
        .buffer_unordered(4096)
        .collect()
        .await;
    let elapsed = started.elapsed();
    assert!(results.iter().all(Result::is_ok));
    client.close().await?;
    Ok(elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn qos1_publish_throughput_side_by_side() -> anyhow::Result<()> {
    let topic = support::topic();
    for round in 0..3 {
        let cpu = cpu_time();
        let raw = raw_rumqttc(&topic).await?;
        let raw_cpu = cpu_time() - cpu;
        let cpu = cpu_time();
        let ours = polybus(&topic).await?;
        let our_cpu = cpu_time() - cpu;
        println!(
            "round {round}: {N} QoS 1 publishes of 128 B: raw rumqttc {:.0}/s ({:.1} µs CPU each), \
             polybus-mqtt {:.0}/s ({:.1} µs CPU each, CloudEvents properties included); wall ratio {:.2}",
            N as f64 / raw.as_secs_f64(),
            raw_cpu.as_secs_f64() * 1e6 / N as f64,
            N as f64 / ours.as_secs_f64(),
            our_cpu.as_secs_f64() * 1e6 / N as f64,
            raw.as_secs_f64() / ours.as_secs_f64()
        );
    }
    Ok(())
}
