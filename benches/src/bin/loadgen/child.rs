//! One run of one step by one side, in its own process (`loadgen child '<json args>'`).
//!
//! Prints `progress N` lines while it runs and one `result {json}` line at the end; logs go
//! to stderr (the parent sends them to a file).

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::hist::{Latency, Summary};
use crate::meter::{self, Meter, Sampler};
use crate::spec::{Kind, Side};
use crate::work;

/// What the parent tells a child.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChildArgs {
    pub(crate) step: String,
    pub(crate) kind: Kind,
    pub(crate) side: Side,
    pub(crate) messages: u64,
    pub(crate) size: usize,
    pub(crate) window: usize,
    /// Unique per (group, side, round, run): names streams, topics and groups.
    pub(crate) tag: String,
}

/// What a workload returns.
pub(crate) struct Outcome {
    /// Messages counted (received, acknowledged, answered).
    pub(crate) count: u64,
    /// The measured time.
    pub(crate) elapsed: Duration,
    pub(crate) latency: Option<Latency>,
    pub(crate) notes: Vec<String>,
}

impl Outcome {
    /// The outcome of a step that recorded each message's latency: one message counted per
    /// latency, over `elapsed`.
    pub(crate) fn timed(latency: Latency, elapsed: Duration) -> Outcome {
        Outcome {
            count: latency.len(),
            elapsed,
            latency: Some(latency),
            notes: Vec::new(),
        }
    }
}

/// What a child reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RunResult {
    pub(crate) count: u64,
    pub(crate) expected: u64,
    pub(crate) elapsed_s: f64,
    /// Messages per second.
    pub(crate) throughput: f64,
    pub(crate) latency: Option<Summary>,
    /// Peak resident set size of the whole child (VmHWM), KiB.
    pub(crate) peak_rss_kib: u64,
    /// (messages done, RSS KiB) at 10 %, 20 %, ... 100 %.
    pub(crate) rss_samples: Vec<(u64, u64)>,
    /// Least-squares RSS growth over the samples from 50 % on, MiB per million messages.
    pub(crate) rss_slope_mib_per_million: f64,
    pub(crate) notes: Vec<String>,
}

pub(crate) fn main(args: &[String]) -> Result<()> {
    let [json] = args else {
        bail!("usage: loadgen child '<json args>' (started by loadgen itself)");
    };
    let args: ChildArgs = serde_json::from_str(json).context("parsing the child arguments")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    let sampler = Sampler::start(args.messages);
    let meter = sampler.meter();
    let outcome = rt.block_on(run(&args, meter));
    let samples = sampler.finish();
    let outcome = outcome?;
    // Let background tasks (drains, deletes) finish before the runtime goes.
    rt.shutdown_timeout(Duration::from_secs(5));

    let secs = outcome.elapsed.as_secs_f64();
    let result = RunResult {
        count: outcome.count,
        expected: args.messages,
        elapsed_s: secs,
        throughput: if secs > 0.0 {
            outcome.count as f64 / secs
        } else {
            0.0
        },
        latency: outcome.latency.as_ref().and_then(Latency::summary),
        peak_rss_kib: meter::rss_kib("VmHWM").unwrap_or(0),
        rss_slope_mib_per_million: meter::slope_mib_per_million(&samples),
        rss_samples: samples,
        notes: outcome.notes,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "result {}", serde_json::to_string(&result)?)?;
    out.flush()?;
    Ok(())
}

async fn run(args: &ChildArgs, meter: Meter) -> Result<Outcome> {
    let env = work::Env::from_env();
    eprintln!(
        "loadgen child: {} side={} messages={} size={} window={} tag={} ({env:?})",
        args.step,
        args.side.name(),
        args.messages,
        args.size,
        args.window,
        args.tag
    );
    match args.kind {
        Kind::NatsPublish => work::nats::publish(&env, args, &meter).await,
        Kind::NatsSubscribe => work::nats::subscribe(&env, args, &meter).await,
        Kind::NatsHandler => work::nats::handler(&env, args, &meter).await,
        Kind::NatsRequestReply => work::nats::request_reply(&env, args, &meter).await,
        Kind::JsPublish => work::jetstream::publish(&env, args, &meter).await,
        Kind::JsConsume => work::jetstream::consume(&env, args, &meter).await,
        Kind::KafkaProduce => work::kafka::produce(&env, args, &meter).await,
        Kind::KafkaConsume => work::kafka::consume(&env, args, &meter).await,
        Kind::MqttQos0 => work::mqtt::pub_sub(&env, args, &meter, 0).await,
        Kind::MqttQos1 => work::mqtt::pub_sub(&env, args, &meter, 1).await,
        Kind::ComposePublish => work::compose::publish(&env, args, &meter).await,
        Kind::JsBatch => work::batch::jetstream(&env, args, &meter).await,
        Kind::KafkaBatch => work::batch::kafka(&env, args, &meter).await,
        Kind::RuntimeLoop | Kind::RuntimeConcurrent => {
            work::runtime::consume(&env, args, &meter).await
        }
    }
}
