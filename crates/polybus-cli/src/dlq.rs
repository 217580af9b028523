//! `polybus dlq list|show|redrive`: dead letters in the format of `polybus::dlq` (what the
//! runtime, the bridge and the composed bus write).

use std::io::IsTerminal as _;
use std::pin::pin;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use polybus::dlq;
use polybus::{Consumer as _, Event};
use polybus_runtime::RedriveOptions;

use crate::common::{Failure, Target};

const LIST_EXAMPLES: &str = "\
Examples:
  polybus dlq list kafka://127.0.0.1:9092 orders.dlq
  polybus dlq list jetstream://127.0.0.1:4222 orders.dlq --error-kind template --json";
const SHOW_EXAMPLES: &str = "\
Examples:
  polybus dlq show jetstream://127.0.0.1:4222 orders.dlq 0192f7c4-3f0e-7c1a-9e4b-0a1b2c3d4e5f";
const REDRIVE_EXAMPLES: &str = "\
Examples:
  polybus dlq redrive jetstream://127.0.0.1:4222 orders.dlq --dry-run
  polybus dlq redrive kafka://127.0.0.1:9092 orders.dlq --original-topic orders
  polybus dlq redrive jetstream://127.0.0.1:4222 orders.dlq --to orders.retry --max 100

Redrive reads with a durable consumer group (--group, default polybus-redrive), so a second
run starts where the first stopped. A dead letter the filter refuses is published again to
the dead-letter topic (it stays a dead letter, at the end).";

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters (browsing on a private consumer: nothing is moved).
    #[command(after_help = LIST_EXAMPLES)]
    List(ListArgs),
    /// Show one dead letter in full, by id.
    #[command(after_help = SHOW_EXAMPLES)]
    Show(ShowArgs),
    /// Move dead letters back to their original topic (headers stripped).
    #[command(after_help = REDRIVE_EXAMPLES)]
    Redrive(RedriveArgs),
}

/// Which dead letters a command takes.
#[derive(Debug, Args)]
pub(crate) struct Filter {
    /// Only dead letters from this original topic (x-original-topic).
    #[arg(long, value_name = "TOPIC")]
    original_topic: Option<String>,
    /// Only dead letters whose last error was of this kind (x-exception-kind).
    #[arg(long, value_name = "KIND")]
    error_kind: Option<String>,
    /// Only events of this CloudEvents type.
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
}

impl Filter {
    fn accepts(&self, e: &Event) -> bool {
        let h = e.headers();
        self.original_topic
            .as_deref()
            .is_none_or(|t| h.get(dlq::X_ORIGINAL_TOPIC) == Some(t))
            && self
                .error_kind
                .as_deref()
                .is_none_or(|k| h.get(dlq::X_EXCEPTION_KIND) == Some(k))
            && self.kind.as_deref().is_none_or(|k| e.kind() == k)
    }
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Broker URL (a backend that keeps messages: kafka, jetstream).
    url: String,
    /// The dead-letter topic (by default the original topic plus .dlq).
    topic: String,
    #[command(flatten)]
    filter: Filter,
    /// One JSON object per dead letter instead of a table.
    #[arg(long)]
    json: bool,
    /// Stop after SECS seconds without a dead letter.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    idle: f64,
    /// Stop after N dead letters.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// Broker URL (kafka, jetstream).
    url: String,
    /// The dead-letter topic.
    topic: String,
    /// The event id.
    id: String,
    /// Give up after SECS seconds without a dead letter.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    idle: f64,
    /// Structured-mode CloudEvent JSON instead of a readable block.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RedriveArgs {
    /// Broker URL (kafka, jetstream).
    url: String,
    /// The dead-letter topic.
    topic: String,
    #[command(flatten)]
    filter: Filter,
    /// Publish to this topic instead of each dead letter's x-original-topic.
    #[arg(long, value_name = "TOPIC")]
    to: Option<String>,
    /// Move at most N.
    #[arg(long, value_name = "N")]
    max: Option<usize>,
    /// The consumer group that keeps the position in the dead-letter topic.
    #[arg(long, default_value = "polybus-redrive", value_name = "G")]
    group: String,
    /// Stop after SECS seconds without a dead letter.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    idle: f64,
    /// Print what would be moved (browsing, as `list`), move nothing.
    #[arg(long)]
    dry_run: bool,
}

pub(crate) async fn run(cmd: DlqCommand) -> Result<(), Failure> {
    match cmd {
        DlqCommand::List(a) => list(a).await,
        DlqCommand::Show(a) => show(a).await,
        DlqCommand::Redrive(a) => redrive(a).await,
    }
}

fn idle(secs: f64) -> Result<Duration, Failure> {
    if secs.is_finite() && secs > 0.0 {
        Ok(Duration::from_secs_f64(secs.min(86_400.0)))
    } else {
        Err(Failure::usage(format!(
            "--idle {secs}: a positive number of seconds"
        )))
    }
}

/// A consumer that reads the dead-letter topic from its start without moving anyone's
/// position: a fresh Kafka group, an ephemeral JetStream consumer.
fn browse_target(url: &str) -> Result<Target, Failure> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    match scheme {
        "kafka" => {
            let sep = if url.contains('?') { '&' } else { '?' };
            let own = format!("polybus-dlq-{}", polybus::new_id());
            Target::new(&format!("{url}{sep}offset=earliest"), Some(&own))
        }
        "jetstream" | "memory" => Target::new(url, None),
        other => Err(Failure::usage(format!(
            "{other} keeps no messages: dead letters can be listed on kafka or jetstream \
             (on {other}, tail the dead-letter topic while they are written)"
        ))),
    }
}

/// Reads the dead-letter topic from its start on a private consumer (see [`browse_target`]);
/// calls `each` until it returns false, until `idle` passes without a dead letter, or until
/// one comes again (a redelivery: everything was seen). Each is acknowledged on the private
/// consumer only, so the backend does not hand it out again; the topic keeps it (Kafka, and
/// JetStream's limits retention, which per-topic streams use).
async fn browse(
    target: &Target,
    topic: &str,
    idle: Duration,
    mut each: impl FnMut(&polybus::Delivery) -> bool,
) -> Result<(), Failure> {
    let (_p, consumer) = target.connect("connecting").await?;
    let mut stream = pin!(consumer.subscribe(topic));
    let mut seen = std::collections::HashSet::new();
    loop {
        match tokio::time::timeout(idle, stream.next()).await {
            Err(_) | Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(target.fail(&e, &format!("reading {topic}"))),
            Ok(Some(Ok(d))) => {
                let key = (d.event().id().to_owned(), d.partition(), d.sequence());
                if !seen.insert(key) || !each(&d) {
                    return Ok(());
                }
                let _ = d.ack().await;
            }
        }
    }
}

fn summary(e: &Event) -> serde_json::Value {
    let h = e.headers();
    serde_json::json!({
        "id": e.id(),
        "type": e.kind(),
        "time": polybus::time::format_rfc3339(e.time()),
        "original_topic": h.get(dlq::X_ORIGINAL_TOPIC),
        "attempts": h.get(dlq::X_ATTEMPTS).and_then(|a| a.parse::<u64>().ok()),
        "error_kind": h.get(dlq::X_EXCEPTION_KIND),
        "error": h.get(dlq::X_EXCEPTION_MESSAGE),
        "key": e.key().map(|k| String::from_utf8_lossy(k).into_owned()),
    })
}

fn row(e: &Event) -> String {
    let h = e.headers();
    let mut error = h.get(dlq::X_EXCEPTION_MESSAGE).unwrap_or("").to_owned();
    if error.chars().count() > 60 {
        error = error.chars().take(59).collect::<String>() + "…";
    }
    format!(
        "{:<36}  {:<24}  {:>8}  {:<12}  {}",
        e.id(),
        h.get(dlq::X_ORIGINAL_TOPIC).unwrap_or("-"),
        h.get(dlq::X_ATTEMPTS).unwrap_or("-"),
        h.get(dlq::X_EXCEPTION_KIND).unwrap_or("-"),
        error
    )
}

async fn list(a: ListArgs) -> Result<(), Failure> {
    let idle = idle(a.idle)?;
    let target = browse_target(&a.url)?;
    let mut n = 0u64;
    if !a.json {
        println!(
            "{:<36}  {:<24}  {:>8}  {:<12}  ERROR",
            "ID", "ORIGINAL TOPIC", "ATTEMPTS", "KIND"
        );
    }
    browse(&target, &a.topic, idle, |d| {
        if a.filter.accepts(d.event()) {
            n += 1;
            if a.json {
                println!("{}", summary(d.event()));
            } else {
                println!("{}", row(d.event()));
            }
        }
        a.count.is_none_or(|c| n < c)
    })
    .await?;
    eprintln!(
        "polybus: {n} dead letter{} on {}",
        if n == 1 { "" } else { "s" },
        a.topic
    );
    Ok(())
}

async fn show(a: ShowArgs) -> Result<(), Failure> {
    let idle = idle(a.idle)?;
    let target = browse_target(&a.url)?;
    let mut found = None;
    browse(&target, &a.topic, idle, |d| {
        if d.event().id() == a.id {
            found = Some(if a.json {
                crate::tail::json_line(d)
            } else {
                crate::tail::block(d, std::io::stdout().is_terminal())
            });
            false
        } else {
            true
        }
    })
    .await?;
    match found {
        Some(text) => {
            print!("{text}");
            Ok(())
        }
        None => Err(Failure::failed(format!(
            "no dead letter with id {} on {} (read until {}s passed without one)",
            a.id, a.topic, a.idle
        ))),
    }
}

async fn redrive(a: RedriveArgs) -> Result<(), Failure> {
    let idle = idle(a.idle)?;
    if a.dry_run {
        let target = browse_target(&a.url)?;
        let mut n = 0usize;
        browse(&target, &a.topic, idle, |d| {
            let e = d.event();
            let to =
                a.to.clone()
                    .or_else(|| e.headers().get(dlq::X_ORIGINAL_TOPIC).map(str::to_owned));
            if let Some(to) = to.filter(|_| a.filter.accepts(e)) {
                n += 1;
                println!("would move {} -> {to}", e.id());
            }
            a.max.is_none_or(|m| n < m)
        })
        .await?;
        eprintln!(
            "polybus: dry run, {n} dead letter(s) would be moved from {}",
            a.topic
        );
        return Ok(());
    }
    let target = Target::new(&a.url, Some(&a.group))?;
    if matches!(target.scheme(), "nats" | "mqtt") {
        return Err(Failure::usage(format!(
            "{} keeps no messages: redrive reads dead letters from kafka or jetstream",
            target.scheme()
        )));
    }
    let (publisher, consumer) = target.connect("connecting").await?;
    let mut options = RedriveOptions::default()
        .idle(idle)
        .max(a.max.unwrap_or(usize::MAX));
    if let Some(to) = &a.to {
        options = options.to(to.clone());
    }
    let filter = &a.filter;
    let report = polybus_runtime::redrive(
        &consumer,
        &a.topic,
        &publisher,
        |e| filter.accepts(e),
        options,
    )
    .await
    .map_err(|e| target.fail(&e, &format!("redriving {}", a.topic)))?;
    polybus::Publisher::close(&publisher)
        .await
        .map_err(|e| target.fail(&e, "flushing"))?;
    println!(
        "moved {}, kept {} (left as dead letters), renamed {} (published under a new id: the \
         target had seen theirs)",
        report.moved, report.kept, report.renamed
    );
    Ok(())
}
