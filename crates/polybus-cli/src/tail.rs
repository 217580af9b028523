//! `polybus tail` (alias `sub`): follows a topic and prints each event.

use std::io::{IsTerminal as _, Write as _};
use std::pin::pin;
use std::time::Duration;

use base64::Engine as _;
use clap::Args;
use futures_util::StreamExt as _;
use polybus::{Consumer as _, Event, Publisher as _};

use crate::common::{Failure, Target, has_wildcards, percent_encode};

pub(crate) const EXAMPLES: &str = "\
Examples:
  polybus tail nats://127.0.0.1:4222 'orders.>'
  polybus tail kafka://127.0.0.1:9092 orders --group debug --count 10 --json | jq .data
  polybus tail kafka://127.0.0.1:9092 orders --from latest
  polybus tail jetstream://127.0.0.1:4222 orders --from 2026-12-04T09:00:00Z --count 5
  polybus tail kafka://127.0.0.1:9092 orders --from 10m --json
  polybus tail mqtt://user:secret@broker:1883 'sensors/+/temp' --no-ack
  polybus tail jetstream://127.0.0.1:4222 orders --count 1 --timeout 30";

/// The CloudEvents type of the events `tail --ready` publishes to find out it is subscribed.
const PROBE_TYPE: &str = "dev.polybus.cli.probe";

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Broker URL, e.g. nats://127.0.0.1:4222 or kafka://user:pass@host:9092.
    pub(crate) url: String,
    /// Topic (subject, filter) to follow; the backend's wildcards are allowed.
    pub(crate) topic: String,
    /// One structured-mode CloudEvent JSON per line instead of readable blocks.
    #[arg(long)]
    pub(crate) json: bool,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,
    /// Consumer group (Kafka group, JetStream durable, NATS queue group, MQTT shared
    /// subscription); the same as ?group= in the URL. Without one, a Kafka tail joins a
    /// fresh group of its own and reads from --from (earliest by default).
    #[arg(long, value_name = "G")]
    pub(crate) group: Option<String>,
    /// Where to start: earliest, latest, an RFC 3339 time or a span back from now (10m, 2h,
    /// 1d). Kafka: all (for partitions the group has no committed offset for; a time starts
    /// at the first record at or after it); JetStream: all (for a new consumer); core NATS and
    /// MQTT keep no history: latest only. Anything else exits 2.
    #[arg(long, value_name = "WHERE")]
    pub(crate) from: Option<String>,
    /// Do not settle what is printed, where the backend redelivers unsettled messages
    /// (JetStream, Kafka); the default acks each event after printing it.
    #[arg(long)]
    pub(crate) no_ack: bool,
    /// Give up after SECS seconds (exit code 5) if --count events have not arrived.
    #[arg(long, value_name = "SECS")]
    pub(crate) timeout: Option<f64>,
    /// Publish probe events (type dev.polybus.cli.probe, not printed) until one comes back,
    /// then print `polybus: ready` on stderr: for scripts that publish right after starting
    /// tail on backends without backlog (core NATS, MQTT). Needs a topic without wildcards.
    #[arg(long)]
    pub(crate) ready: bool,
}

/// A `--from` time: RFC 3339, or a span back from now (`90s`, `10m`, `2h`, `1d`).
pub(crate) fn parse_time(from: &str) -> Option<std::time::SystemTime> {
    if let Some(t) = polybus::time::parse_rfc3339(from) {
        return Some(t);
    }
    let unit = from.chars().last()?;
    let secs_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    let n: u64 = from[..from.len() - 1].parse().ok()?;
    let back = Duration::from_secs(n.checked_mul(secs_per)?);
    std::time::SystemTime::now().checked_sub(back)
}

/// `url` with `--from` turned into the backend's parameter, or a usage error where the
/// backend cannot start there.
pub(crate) fn with_from(url: &str, from: Option<&str>) -> Result<String, Failure> {
    let Some(from) = from else {
        return Ok(url.to_owned());
    };
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    let time = match from {
        "earliest" | "latest" => None,
        _ => Some(parse_time(from).ok_or_else(|| {
            Failure::usage(format!(
                "--from {from:?}: give earliest, latest, an RFC 3339 time \
                 (2026-12-04T09:00:00Z) or a span back from now (90s, 10m, 2h, 1d)"
            ))
        })?),
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    match (scheme, time) {
        ("kafka", None) => Ok(format!("{url}{sep}offset={from}")),
        ("kafka", Some(t)) => Ok(format!(
            "{url}{sep}start_time={}",
            percent_encode(&polybus::time::format_rfc3339(t))
        )),
        ("jetstream", None) => Ok(format!("{url}{sep}deliver={from}")),
        ("jetstream", Some(t)) => Ok(format!(
            "{url}{sep}deliver={}",
            percent_encode(&polybus::time::format_rfc3339(t))
        )),
        (_, None) if from == "latest" => Ok(url.to_owned()),
        (s, _) => Err(Failure::usage(format!(
            "--from {from}: {s} keeps no history, a subscription sees what is published after \
             it (latest); kafka and jetstream can start earlier"
        ))),
    }
}

pub(crate) async fn run(args: TailArgs) -> Result<(), Failure> {
    // Kafka without a group would join the shared default group `polybus` and move its
    // offsets: a tail gets a group of its own instead (from ?offset=, earliest by default).
    let own_group;
    let mut group = args.group.as_deref();
    if group.is_none() && args.url.starts_with("kafka://") && !args.url.contains("group=") {
        own_group = format!("polybus-tail-{}", polybus::new_id());
        group = Some(&own_group);
    }
    let url = with_from(&args.url, args.from.as_deref())?;
    let target = Target::new(&url, group)?;
    if args.ready && has_wildcards(&args.topic) {
        return Err(Failure::usage(
            "--ready publishes probes to the topic: give a topic without wildcards",
        ));
    }
    let (publisher, consumer) = target.connect("connecting").await?;
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
                    .map_err(|e| Failure::failed(format!("cannot write: {e}")))?;
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
                    .map_err(|e| Failure::failed(e.to_string()))?;
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
pub(crate) fn json_line(delivery: &polybus::Delivery) -> String {
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
pub(crate) fn block(delivery: &polybus::Delivery, terminal: bool) -> String {
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
    fn from_becomes_the_backends_parameter() {
        assert_eq!(
            with_from("kafka://h:9092", Some("latest")).unwrap(),
            "kafka://h:9092?offset=latest"
        );
        assert_eq!(
            with_from("kafka://h:9092?group=g", Some("2026-12-04T09:00:00Z")).unwrap(),
            "kafka://h:9092?group=g&start_time=2026-12-04T09%3A00%3A00.000000Z"
        );
        assert_eq!(
            with_from("jetstream://h", Some("2026-12-04T09:00:00Z")).unwrap(),
            "jetstream://h?deliver=2026-12-04T09%3A00%3A00.000000Z"
        );
        assert_eq!(with_from("mqtt://h", Some("latest")).unwrap(), "mqtt://h");
        assert_eq!(with_from("mqtt://h", Some("10m")).unwrap_err().code, 2);
        assert_eq!(with_from("kafka://h", Some("soon")).unwrap_err().code, 2);
    }

    #[test]
    fn relative_times_count_back_from_now() {
        let now = std::time::SystemTime::now();
        for (text, secs) in [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86_400)] {
            let t = parse_time(text).unwrap();
            let back = now.duration_since(t).unwrap_or_default().as_secs();
            assert!(
                (secs - 1..secs + 5).contains(&back),
                "{text}: {back} s back"
            );
        }
        for bad in ["", "m", "10", "10w", "-5m", "1.5h", "99999999999999999999d"] {
            assert!(parse_time(bad).is_none(), "{bad}");
        }
    }
}
