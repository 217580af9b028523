//! The `polybus` command: publish and tail CloudEvents on NATS, JetStream, Kafka and MQTT
//! with one tool and one URL syntax (the one [`polybus::connect`] takes).
//!
//! * `polybus pub URL TOPIC [DATA|@file|-]`: publishes events (`--lines` for one per line).
//! * `polybus tail URL TOPIC` (alias `sub`): prints each event as a readable block, or one
//!   structured-mode CloudEvent JSON per line with `--json`; reads messages other programs
//!   wrote too (no CloudEvents headers).
//!
//! Exit codes: see [`EXIT_CODES`]. Not built yet (issue #17): `bridge`, `dlq`, `bench`,
//! `completions`, `--rate` and a progress bar for `pub`, `--from` for `tail` (Kafka takes
//! `?offset=earliest|latest` in the URL).

use std::io::{IsTerminal, Write};
use std::pin::pin;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use polybus::{Consumer, ErrorKind, Event, Publisher};
use tokio::io::AsyncBufReadExt;

/// The exit codes, as `--help` shows them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success (tail: --count events printed, or stopped with Ctrl-C)
  1  the broker failed an operation (publish rejected, payload too large, ...)
  2  usage: bad arguments, unknown URL scheme, invalid topic or header
  3  the broker could not be reached (connection refused, DNS, timeout)
  4  the broker refused the credentials or a permission
  5  tail --timeout expired before --count events arrived

Credentials go in the URL (scheme://user:password@host:port) or in POLYBUS_USER and
POLYBUS_PASSWORD; they are never printed (errors show user:***@host).";

const PUB_EXAMPLES: &str = "\
Examples:
  polybus pub nats://127.0.0.1:4222 orders '{\"id\":1}' --type com.example.order.created
  polybus pub kafka://127.0.0.1:9092 orders @order.json --key customer-7
  tail -f app.log | polybus pub mqtt://127.0.0.1:1883 logs/app --lines
  polybus pub jetstream://127.0.0.1:4222 load 'x' --count 1000 --header env=dev";

const TAIL_EXAMPLES: &str = "\
Examples:
  polybus tail nats://127.0.0.1:4222 'orders.>'
  polybus tail kafka://127.0.0.1:9092 orders --group debug --count 10 --json | jq .data
  polybus tail mqtt://user:secret@broker:1883 'sensors/+/temp' --no-ack
  polybus tail jetstream://127.0.0.1:4222 orders --count 1 --timeout 30";

/// The CloudEvents type of the events `tail --ready` publishes to find out it is subscribed.
const PROBE_TYPE: &str = "dev.polybus.cli.probe";

#[derive(Debug, Parser)]
#[command(
    name = "polybus",
    version,
    about = "Publish and tail CloudEvents on NATS, JetStream, Kafka and MQTT",
    long_about = "Publish and tail CloudEvents on NATS, JetStream, Kafka and MQTT.\n\n\
                  URLs: memory://, nats://host:4222, jetstream://host:4222, \
                  kafka://host:9092, mqtt://host:1883, with ?group=..., \
                  ?offset=earliest|latest (Kafka), ?client_id=... (MQTT), as polybus::connect \
                  takes them.",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish events: DATA as given, @file, or stdin (`-` or nothing).
    #[command(after_help = PUB_EXAMPLES)]
    Pub(PubArgs),
    /// Follow a topic (wildcards allowed) and print each event.
    #[command(visible_alias = "sub", after_help = TAIL_EXAMPLES)]
    Tail(TailArgs),
}

#[derive(Debug, Args)]
struct PubArgs {
    /// Broker URL, e.g. nats://127.0.0.1:4222 or kafka://user:pass@host:9092.
    url: String,
    /// Topic (subject) to publish to.
    topic: String,
    /// The data: a literal, @file for a file's contents, `-` or nothing for stdin.
    data: Option<String>,
    /// One event per line of the input (stdin or @file); empty lines are skipped.
    #[arg(long)]
    lines: bool,
    /// The event key (Kafka partition key, ordering key elsewhere).
    #[arg(long)]
    key: Option<String>,
    /// The CloudEvents type.
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
    /// The CloudEvents source.
    #[arg(long)]
    source: Option<String>,
    /// A header `name=value`; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// The content type; by default application/json when the data parses as JSON,
    /// text/plain when it is UTF-8 text, none otherwise.
    #[arg(long)]
    content_type: Option<String>,
    /// Publish each event N times (each copy with its own id).
    #[arg(long, default_value_t = 1, value_name = "N")]
    count: u64,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct TailArgs {
    /// Broker URL, e.g. nats://127.0.0.1:4222 or kafka://user:pass@host:9092.
    url: String,
    /// Topic (subject, filter) to follow; the backend's wildcards are allowed.
    topic: String,
    /// One structured-mode CloudEvent JSON per line instead of readable blocks.
    #[arg(long)]
    json: bool,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Consumer group (Kafka group, JetStream durable, NATS queue group, MQTT shared
    /// subscription); the same as ?group= in the URL. Without one, a Kafka tail joins a
    /// fresh group of its own and reads from ?offset= (earliest by default).
    #[arg(long, value_name = "G")]
    group: Option<String>,
    /// Do not settle what is printed, where the backend redelivers unsettled messages
    /// (JetStream, Kafka); the default acks each event after printing it.
    #[arg(long)]
    no_ack: bool,
    /// Give up after SECS seconds (exit code 5) if --count events have not arrived.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Publish probe events (type dev.polybus.cli.probe, not printed) until one comes back,
    /// then print `polybus: ready` on stderr: for scripts that publish right after starting
    /// tail on backends without backlog (core NATS, MQTT). Needs a topic without wildcards.
    #[arg(long)]
    ready: bool,
}

/// An error ready for the user: the exit code and what to print.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

/// A URL with credentials from the environment filled in, and how to show it.
#[derive(Debug)]
struct Target {
    url: String,
    shown: String,
    secret: Option<String>,
}

impl Target {
    fn new(url: &str, group: Option<&str>) -> Result<Self, Failure> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Failure::usage(
                "not a URL: expected scheme://[user:password@]host[:port][?k=v] \
                 (schemes: memory, nats, jetstream, kafka, mqtt)",
            ));
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let mut authority = authority.to_owned();
        if !authority.contains('@')
            && let Ok(user) = std::env::var("POLYBUS_USER")
        {
            let password = std::env::var("POLYBUS_PASSWORD").unwrap_or_default();
            let creds = if password.is_empty() {
                percent_encode(&user)
            } else {
                format!("{}:{}", percent_encode(&user), percent_encode(&password))
            };
            authority = format!("{creds}@{authority}");
        }
        let query = match (group, query) {
            (Some(g), Some(q)) => Some(format!("group={}&{q}", percent_encode(g))),
            (Some(g), None) => Some(format!("group={}", percent_encode(g))),
            (None, q) => q.map(str::to_owned),
        };
        let (shown_auth, secret) = match authority.rsplit_once('@') {
            Some((info, host)) => match info.split_once(':') {
                Some((u, p)) => (format!("{u}:***@{host}"), Some(p.to_owned())),
                None => (authority.clone(), None),
            },
            None => (authority.clone(), None),
        };
        let with_query = |a: &str| match &query {
            Some(q) => format!("{scheme}://{a}?{q}"),
            None => format!("{scheme}://{a}"),
        };
        Ok(Target {
            url: with_query(&authority),
            shown: with_query(&shown_auth),
            secret: secret.filter(|s| !s.is_empty()),
        })
    }

    /// Turns a polybus error into a message that says what to do next.
    fn fail(&self, err: &polybus::Error, doing: &str) -> Failure {
        let mut text = err.to_string();
        if let Some(secret) = &self.secret {
            text = text.replace(secret.as_str(), "***");
        }
        let url = &self.shown;
        let backend = err.backend();
        let (code, message) = match err.kind() {
            ErrorKind::Connect => (
                3,
                format!(
                    "cannot reach the broker at {url} while {doing}: {text}\n\
                     hint: is the broker running and listening on that host and port? \
                     Is the scheme right (nats, jetstream, kafka, mqtt)?"
                ),
            ),
            ErrorKind::Timeout => (
                3,
                format!(
                    "no answer from the broker at {url} while {doing}: {text}\n\
                     hint: check that the host and port are the broker's and that it is healthy"
                ),
            ),
            ErrorKind::Unauthorized => (
                4,
                format!(
                    "{backend} refused the credentials or a permission for {url} while {doing}: \
                     {text}\nhint: check user:password in the URL (or POLYBUS_USER and \
                     POLYBUS_PASSWORD) and the broker's permissions for the topic"
                ),
            ),
            ErrorKind::Unsupported | ErrorKind::InvalidTopic | ErrorKind::InvalidHeader => {
                (2, format!("{text} (while {doing} on {url})"))
            }
            _ => (1, format!("{text} (while {doing} on {url})")),
        };
        Failure { code, message }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("polybus: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Pub(args) => publish(args).await,
            Command::Tail(args) => tail(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("polybus: {}", f.message);
            ExitCode::from(f.code)
        }
    }
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

async fn publish(args: PubArgs) -> Result<(), Failure> {
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
    // Read a file before connecting: a typo in its name is a usage error, not a broker one.
    let file = match args.data.as_deref() {
        Some(d) if d.starts_with('@') => Some(
            std::fs::read(&d[1..])
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", &d[1..])))?,
        ),
        _ => None,
    };
    let (publisher, _consumer) = polybus::connect(&target.url)
        .await
        .map_err(|e| target.fail(&e, "connecting"))?;
    let mut sent = 0u64;
    let mut send = async |data: &[u8]| -> Result<(), Failure> {
        for _ in 0..args.count {
            let event = template.event(data)?;
            publisher
                .publish(&args.topic, event)
                .await
                .map_err(|e| target.fail(&e, &format!("publishing to {}", args.topic)))?;
            sent += 1;
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
        (None | Some("-"), None) if args.lines => {
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
        (Some(_), None) if args.lines => {
            return Err(Failure::usage(
                "--lines reads stdin or @file, not a literal DATA argument",
            ));
        }
        (Some(literal), None) => send(literal.as_bytes()).await?,
    }
    publisher
        .close()
        .await
        .map_err(|e| target.fail(&e, "flushing"))?;
    if !args.quiet {
        let s = if sent == 1 { "" } else { "s" };
        eprintln!("polybus: published {sent} event{s} to {}", args.topic);
    }
    Ok(())
}

async fn tail(args: TailArgs) -> Result<(), Failure> {
    // Kafka without a group would join the shared default group `polybus` and move its
    // offsets: a tail gets a group of its own instead (from ?offset=, earliest by default).
    let own_group;
    let mut group = args.group.as_deref();
    if group.is_none() && args.url.starts_with("kafka://") && !args.url.contains("group=") {
        own_group = format!("polybus-tail-{}", polybus::new_id());
        group = Some(&own_group);
    }
    let target = Target::new(&args.url, group)?;
    if args.ready && args.topic.contains(['*', '>', '+', '#']) {
        return Err(Failure::usage(
            "--ready publishes probes to the topic: give a topic without wildcards",
        ));
    }
    let (publisher, consumer) = polybus::connect(&target.url)
        .await
        .map_err(|e| target.fail(&e, "connecting"))?;
    let mut stream = pin!(consumer.subscribe(&args.topic));
    let mut ready = !args.ready;
    let mut probe_tick = tokio::time::interval(Duration::from_millis(500));
    let deadline = async {
        match args.timeout {
            Some(secs) => tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))).await,
            None => std::future::pending().await,
        }
    };
    let mut deadline = pin!(deadline);
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    let terminal = std::io::stdout().is_terminal();
    let doing = format!("following {}", args.topic);
    while args.count.is_none_or(|n| printed < n) {
        tokio::select! {
            item = stream.next() => {
                let Some(item) = item else { break };
                let delivery = item.map_err(|e| target.fail(&e, &doing))?;
                if args.ready && delivery.event().kind() == PROBE_TYPE {
                    if !ready {
                        ready = true;
                        eprintln!("polybus: ready");
                    }
                    if !args.no_ack {
                        let _ = delivery.ack().await;
                    }
                    continue;
                }
                let text = if args.json {
                    json_line(&delivery)
                } else {
                    block(&delivery, terminal)
                };
                stdout
                    .write_all(text.as_bytes())
                    .and_then(|()| stdout.flush())
                    .map_err(|e| Failure { code: 1, message: format!("cannot write: {e}") })?;
                printed += 1;
                if !args.no_ack
                    && let Err(e) = delivery.ack().await
                {
                    let f = target.fail(e.error(), "acking");
                    eprintln!("polybus: warning: {}", f.message);
                }
            }
            _ = probe_tick.tick(), if !ready => {
                let probe = Event::builder().kind(PROBE_TYPE).build()
                    .map_err(|e| Failure { code: 1, message: e.to_string() })?;
                publisher
                    .publish(&args.topic, probe)
                    .await
                    .map_err(|e| target.fail(&e, "publishing a --ready probe"))?;
            }
            () = &mut deadline => {
                return Err(Failure {
                    code: 5,
                    message: format!(
                        "--timeout: {printed} of {} events after {}s on {} at {}",
                        args.count.map_or("unlimited".to_owned(), |n| n.to_string()),
                        args.timeout.unwrap_or_default(),
                        args.topic,
                        target.shown,
                    ),
                });
            }
            _ = &mut ctrl_c => break,
        }
    }
    Ok(())
}

/// One structured-mode CloudEvent as a JSON line. Broker headers that are not CloudEvents
/// extension names (lowercase letters and digits) have no place in it and are left out.
fn json_line(delivery: &polybus::Delivery) -> String {
    let sniffed;
    let mut event = delivery.event();
    if event.content_type().is_none() && !event.data().is_empty() {
        // A message without a content type (another program wrote it): JSON goes in as
        // `data`, UTF-8 text as a string, the rest as `data_base64`.
        let ct = if serde_json::from_slice::<serde_json::Value>(event.data()).is_ok() {
            Some("application/json")
        } else if std::str::from_utf8(event.data()).is_ok() {
            Some("text/plain")
        } else {
            None
        };
        if let Some(ct) = ct {
            let mut e = event.clone();
            e.set_content_type(Some(ct.into()));
            sniffed = e;
            event = &sniffed;
        }
    }
    let bytes = match polybus::cloudevents::to_structured(event, delivery.backend()) {
        Ok((bytes, _)) => bytes,
        Err(_) => {
            // Declared JSON that does not parse: carry the bytes as they are.
            let mut plain = event.clone();
            plain.set_content_type(None);
            polybus::cloudevents::to_structured(&plain, delivery.backend())
                .map(|(b, _)| b)
                .unwrap_or_default()
        }
    };
    let mut line = String::from_utf8_lossy(&bytes).into_owned();
    line.push('\n');
    line
}

/// A readable block for one event.
fn block(delivery: &polybus::Delivery, terminal: bool) -> String {
    let event = delivery.event();
    let (bold, reset) = if terminal {
        ("\x1b[1m", "\x1b[0m")
    } else {
        ("", "")
    };
    let mut out = format!(
        "{bold}{}{reset}  {}",
        delivery.topic(),
        polybus::time::format_rfc3339(event.time())
    );
    if let Some(p) = delivery.partition() {
        out.push_str(&format!("  partition {p}"));
    }
    if let Some(s) = delivery.sequence() {
        out.push_str(&format!("  seq {s}"));
    }
    if delivery.is_redelivered() {
        out.push_str(&format!("  redelivery {}", delivery.delivery_count()));
    }
    out.push('\n');
    out.push_str(&format!("  type    {}\n", event.kind()));
    out.push_str(&format!("  source  {}\n", event.source()));
    out.push_str(&format!("  id      {}\n", event.id()));
    if let Some(k) = event.key() {
        out.push_str(&format!("  key     {}\n", String::from_utf8_lossy(k)));
    }
    for (n, v) in event.headers().iter() {
        out.push_str(&format!("  header  {n}: {v}\n"));
    }
    let data = event.data();
    let ct = event.content_type();
    out.push_str(&format!(
        "  data    {} bytes{}\n",
        data.len(),
        ct.map(|c| format!(", {c}")).unwrap_or_default()
    ));
    if !data.is_empty() {
        let body = match serde_json::from_slice::<serde_json::Value>(data) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => match std::str::from_utf8(data) {
                Ok(text) => text.to_owned(),
                Err(_) => format!(
                    "(binary, base64) {}",
                    base64::engine::general_purpose::STANDARD.encode(data)
                ),
            },
        };
        for line in body.lines() {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_hide_the_password_and_take_the_group() {
        let t = Target::new("kafka://svc:hunter2@h:9092?offset=latest", Some("g 1")).unwrap();
        assert_eq!(
            t.url,
            "kafka://svc:hunter2@h:9092?group=g%201&offset=latest"
        );
        assert_eq!(t.shown, "kafka://svc:***@h:9092?group=g%201&offset=latest");
        let err = polybus::Error::new(ErrorKind::Unauthorized, "kafka")
            .with_message("SASL failed for hunter2");
        let f = t.fail(&err, "connecting");
        assert_eq!(f.code, 4);
        assert!(!f.message.contains("hunter2"), "{}", f.message);
        assert!(f.message.contains("kafka refused"), "{}", f.message);
        assert_eq!(Target::new("nope", None).unwrap_err().code, 2);
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "polybus", "pub", "nats://h", "t", "x", "-H", "a=b", "--header", "c=d",
        ])
        .unwrap();
        let Command::Pub(p) = cli.command else {
            panic!()
        };
        assert_eq!(p.headers, ["a=b", "c=d"]);
        assert!(matches!(
            Cli::try_parse_from(["polybus", "sub", "nats://h", "t"])
                .unwrap()
                .command,
            Command::Tail(_)
        ));
    }
}
