//! `polybus pub`: publishes events from an argument, a file or stdin.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use polybus::{Event, Publisher as _};
use tokio::io::AsyncBufReadExt as _;

use crate::common::{Failure, Target};

pub(crate) const EXAMPLES: &str = "\
Examples:
  polybus pub nats://127.0.0.1:4222 orders '{\"id\":1}' --type com.example.order.created
  polybus pub kafka://127.0.0.1:9092 orders @order.json --key customer-7
  tail -f app.log | polybus pub mqtt://127.0.0.1:1883 logs/app --lines
  polybus pub jetstream://127.0.0.1:4222 load 'x' --count 10000 --rate 2000 --header env=dev";

#[derive(Debug, Args)]
pub(crate) struct PubArgs {
    /// Broker URL, e.g. nats://127.0.0.1:4222 or kafka://user:pass@host:9092.
    pub(crate) url: String,
    /// Topic (subject) to publish to.
    pub(crate) topic: String,
    /// The data: a literal, @file for a file's contents, `-` or nothing for stdin.
    pub(crate) data: Option<String>,
    /// One event per line of the input (stdin or @file); empty lines are skipped.
    #[arg(long)]
    pub(crate) lines: bool,
    /// The event key (Kafka partition key, ordering key elsewhere).
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// The CloudEvents type.
    #[arg(long = "type", value_name = "TYPE")]
    pub(crate) kind: Option<String>,
    /// The CloudEvents source.
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// A header `name=value`; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub(crate) headers: Vec<String>,
    /// The content type; by default application/json when the data parses as JSON,
    /// text/plain when it is UTF-8 text, none otherwise.
    #[arg(long)]
    pub(crate) content_type: Option<String>,
    /// Publish each event N times (each copy with its own id).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub(crate) count: u64,
    /// At most R events per second (default: as fast as the broker acknowledges).
    #[arg(long, value_name = "R")]
    pub(crate) rate: Option<f64>,
    /// Print nothing on success (and no progress bar).
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

/// The pieces of every event `pub` sends, from the flags.
#[derive(Debug)]
struct Template {
    key: Option<String>,
    kind: Option<String>,
    source: Option<String>,
    headers: Vec<(String, String)>,
    content_type: Option<String>,
}

impl Template {
    fn event(&self, data: &[u8]) -> Result<Event, Failure> {
        let mut b = Event::builder().data(data.to_vec());
        if let Some(k) = &self.key {
            b = b.key(k.clone().into_bytes());
        }
        if let Some(t) = &self.kind {
            b = b.kind(t.clone());
        }
        if let Some(s) = &self.source {
            b = b.source(s.clone());
        }
        let ct = match &self.content_type {
            Some(ct) => Some(ct.clone()),
            None if serde_json::from_slice::<serde_json::Value>(data).is_ok() => {
                Some("application/json".to_owned())
            }
            None if std::str::from_utf8(data).is_ok() && !data.is_empty() => {
                Some("text/plain".to_owned())
            }
            None => None,
        };
        if let Some(ct) = ct {
            b = b.content_type(ct);
        }
        for (n, v) in &self.headers {
            b = b.header(n.clone(), v.clone());
        }
        b.build()
            .map_err(|e| Failure::usage(format!("cannot make the event: {e}")))
    }
}

/// Paces publishes to a rate: the n-th goes out no earlier than start + n / rate.
#[derive(Debug)]
pub(crate) struct Pacer {
    start: Instant,
    interval: Option<Duration>,
    n: u32,
}

impl Pacer {
    pub(crate) fn new(rate: Option<f64>) -> Result<Self, Failure> {
        let interval = match rate {
            None => None,
            Some(r) if r.is_finite() && r > 0.0 => Some(Duration::from_secs_f64(1.0 / r)),
            Some(r) => {
                return Err(Failure::usage(format!(
                    "--rate {r}: give a positive number"
                )));
            }
        };
        Ok(Pacer {
            start: Instant::now(),
            interval,
            n: 0,
        })
    }

    /// When the next publish may go out (`None`: now, no rate).
    pub(crate) fn due(&self) -> Option<tokio::time::Instant> {
        let i = self.interval?;
        Some(tokio::time::Instant::from_std(
            self.start + i.saturating_mul(self.n),
        ))
    }

    /// Resolves when the next publish may go out, at once without a rate (no timer).
    pub(crate) async fn ready(&self) {
        if let Some(due) = self.due() {
            tokio::time::sleep_until(due).await;
        }
    }

    /// Counts a publish.
    pub(crate) fn advance(&mut self) {
        self.n = self.n.saturating_add(1);
    }

    /// Waits until the next publish may go out and counts it.
    pub(crate) async fn wait(&mut self) {
        self.ready().await;
        self.advance();
    }
}

/// A progress bar on stdout when it is a terminal and there is more than a handful to send.
pub(crate) fn progress(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet || total < 2 || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

pub(crate) async fn run(args: PubArgs) -> Result<(), Failure> {
    let target = Target::new(&args.url, None)?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((n, v)) = h.split_once('=') else {
            return Err(Failure::usage(format!(
                "--header {h:?}: expected NAME=VALUE"
            )));
        };
        headers.push((n.to_owned(), v.to_owned()));
    }
    let template = Template {
        key: args.key,
        kind: args.kind,
        source: args.source,
        headers,
        content_type: args.content_type,
    };
    let mut pacer = Pacer::new(args.rate)?;
    // Read a file before connecting: a typo in its name is a usage error, not a broker one.
    let file = match args.data.as_deref() {
        Some(d) if d.starts_with('@') => Some(
            std::fs::read(&d[1..])
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", &d[1..])))?,
        ),
        _ => None,
    };
    if args.lines && file.is_none() && !matches!(args.data.as_deref(), None | Some("-")) {
        return Err(Failure::usage(
            "--lines reads stdin or @file, not a literal DATA argument",
        ));
    }
    let (publisher, _consumer) = target.connect("connecting").await?;
    // Known up front for a literal or a whole file; lines from stdin are counted as they come.
    let total = match (&file, args.lines) {
        (Some(bytes), true) => {
            args.count
                * bytes
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count() as u64
        }
        (_, true) => 0,
        _ => args.count,
    };
    let bar = progress(total, args.quiet, &format!("pub {}", args.topic));
    let mut sent = 0u64;
    let mut send = async |data: &[u8]| -> Result<(), Failure> {
        for _ in 0..args.count {
            let event = template.event(data)?;
            pacer.wait().await;
            publisher
                .publish(&args.topic, event)
                .await
                .map_err(|e| target.fail(&e, &format!("publishing to {}", args.topic)))?;
            sent += 1;
            bar.inc(1);
        }
        Ok(())
    };
    match (args.data.as_deref(), file) {
        (_, Some(bytes)) if args.lines => {
            for line in bytes.split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.is_empty() {
                    send(line).await?;
                }
            }
        }
        (_, Some(bytes)) => send(&bytes).await?,
        (_, None) if args.lines => {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines
                .next_line()
                .await
                .map_err(|e| Failure::usage(format!("cannot read stdin: {e}")))?
            {
                let line = line.strip_suffix('\r').unwrap_or(&line);
                if !line.is_empty() {
                    send(line.as_bytes()).await?;
                }
            }
        }
        (None | Some("-"), None) => {
            let mut buf = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut buf)
                .await
                .map_err(|e| Failure::usage(format!("cannot read stdin: {e}")))?;
            send(&buf).await?;
        }
        (Some(literal), None) => send(literal.as_bytes()).await?,
    }
    bar.finish();
    // Every publish above was acknowledged; flush covers any a backend still holds.
    publisher
        .flush()
        .await
        .map_err(|e| target.fail(&e, "flushing"))?;
    publisher
        .close()
        .await
        .map_err(|e| target.fail(&e, "closing"))?;
    if !args.quiet {
        let s = if sent == 1 { "" } else { "s" };
        eprintln!("polybus: published {sent} event{s} to {}", args.topic);
    }
    Ok(())
}
