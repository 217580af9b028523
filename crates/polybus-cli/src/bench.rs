//! `polybus bench URL`: publishes N events through a broker while one subscriber reads them,
//! and reports the publish and consume rates and the end-to-end latency (p50, p99, max).

use std::pin::pin;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use polybus::{Consumer as _, Event, Publisher as _};

use crate::common::{Failure, Target};
use crate::publish::{Pacer, progress};

pub(crate) const EXAMPLES: &str = "\
Examples:
  polybus bench nats://127.0.0.1:4222
  polybus bench kafka://127.0.0.1:9092 --count 20000 --size 512 --json
  polybus bench mqtt://127.0.0.1:1883 --rate 2000 --count 10000

Each event is published once the previous one is acknowledged (a window of 1, like a
simple producer); latency is from just before publish to delivery, on one machine's clock.";

/// The header that carries the publish time (nanoseconds since the epoch).
const SENT_AT: &str = "x-bench-sent-ns";
/// The CloudEvents type of warm-up events (not counted).
const WARMUP: &str = "dev.polybus.cli.bench.warmup";

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Broker URL.
    url: String,
    /// The topic (default: a new one, polybus-bench-<id>).
    #[arg(long)]
    topic: Option<String>,
    /// How many events.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    count: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128, value_name = "BYTES")]
    size: usize,
    /// At most R events per second (default: as fast as the broker acknowledges).
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Give up after SECS seconds (exit code 5) if not every event came back.
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    timeout: f64,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub(crate) async fn run(a: BenchArgs) -> Result<(), Failure> {
    if a.count == 0 || a.size > 16 * 1024 * 1024 {
        return Err(Failure::usage("--count at least 1, --size at most 16 MiB"));
    }
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        return Err(Failure::usage("--timeout: a positive number of seconds"));
    }
    let topic = a.topic.clone().unwrap_or_else(|| {
        let id = polybus::new_id();
        format!("polybus-bench-{}", &id[id.len().saturating_sub(12)..])
    });
    // Kafka needs a group: a fresh one; elsewhere a plain subscription (no durable left).
    let own = format!("polybus-bench-{}", polybus::new_id());
    let group = a.url.starts_with("kafka://").then_some(own.as_str());
    let target = Target::new(&a.url, group)?;
    let (publisher, consumer) = target.connect("connecting").await?;
    let payload = vec![b'x'; a.size];
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(a.timeout.min(1e6));
    let fail = |e: polybus::Error, doing: &str| target.fail(&e, doing);
    let timed_out = |got: u64| Failure {
        code: 5,
        message: format!(
            "bench: {got} of {} events came back within --timeout {}s on {}",
            a.count, a.timeout, target.shown
        ),
    };

    let mut stream = pin!(consumer.subscribe(&topic));
    // Warm up until the subscription sees an event: core NATS and MQTT have no backlog.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let e = Event::builder().kind(WARMUP).build().map_err(|e| Failure::failed(e.to_string()))?;
                publisher.publish(&topic, e).await.map_err(|e| fail(e, "warming up"))?;
            }
            d = stream.next() => match d {
                Some(Ok(d)) => { let _ = d.ack().await; break; }
                Some(Err(e)) => return Err(fail(e, "subscribing")),
                None => return Err(Failure::failed("the subscription ended")),
            },
            () = tokio::time::sleep_until(deadline) => return Err(timed_out(0)),
        }
    }

    let bar = progress(a.count, a.json, &format!("bench {}", target.scheme()));
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| Failure::failed(e.to_string()))?;
    let mut pacer = Pacer::new(a.rate)?;
    let started = Instant::now();
    let mut published = 0u64;
    let mut publish_done = None;
    let mut received = 0u64;
    let mut first_error = None;
    while received < a.count {
        tokio::select! {
            biased;
            d = stream.next() => match d {
                Some(Ok(d)) => {
                    let arrived = now_ns();
                    let e = d.event();
                    if e.kind() != WARMUP
                        && let Some(sent) = e.headers().get(SENT_AT).and_then(|s| s.parse::<u64>().ok())
                    {
                        let _ = latency.record(arrived.saturating_sub(sent).max(1));
                        received += 1;
                        bar.inc(1);
                    }
                    let _ = d.ack().await;
                }
                Some(Err(e)) => { first_error.get_or_insert(e); }
                None => break,
            },
            () = pacer.ready(), if published < a.count => {
                pacer.advance();
                let e = Event::builder()
                    .data(payload.clone())
                    .header(SENT_AT, now_ns().to_string())
                    .build()
                    .map_err(|e| Failure::failed(e.to_string()))?;
                publisher.publish(&topic, e).await.map_err(|e| fail(e, &format!("publishing to {topic}")))?;
                published += 1;
                if published == a.count {
                    publish_done = Some(started.elapsed());
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                bar.abandon();
                return Err(timed_out(received));
            }
        }
    }
    bar.finish_and_clear();
    let total = started.elapsed();
    let _ = publisher.close().await;
    if received < a.count {
        return Err(match first_error {
            Some(e) => fail(e, "consuming"),
            None => Failure::failed("the subscription ended early"),
        });
    }
    let publish_secs = publish_done.unwrap_or(total).as_secs_f64();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e6;
    let result = serde_json::json!({
        "url": target.shown,
        "topic": topic,
        "count": a.count,
        "size": a.size,
        "publish_per_sec": (a.count as f64 / publish_secs).round(),
        "consume_per_sec": (a.count as f64 / total.as_secs_f64()).round(),
        "latency_ms": {
            "p50": ms(0.5),
            "p99": ms(0.99),
            "max": latency.max() as f64 / 1e6,
        },
        "seconds": total.as_secs_f64(),
    });
    if a.json {
        println!("{result}");
    } else {
        println!(
            "{} events of {} bytes on {} ({topic})\n  publish  {:>10.0} events/s\n  consume  {:>10.0} events/s\n  latency  p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            a.count,
            a.size,
            target.shown,
            a.count as f64 / publish_secs,
            a.count as f64 / total.as_secs_f64(),
            ms(0.5),
            ms(0.99),
            latency.max() as f64 / 1e6,
        );
    }
    Ok(())
}
