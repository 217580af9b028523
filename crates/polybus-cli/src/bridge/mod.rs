//! `polybus bridge`: a daemon that moves events between backends, route by route, on the
//! polybus runtime (at-least-once: an event is acknowledged at its source only after the sink
//! acknowledged it; retry with backoff; dead letters), with /healthz, /readyz and /metrics.
//! A route with `delivery = "spool"` acknowledges at the source once the event is durably in
//! the route's spool (the composed bus's), which forwards it to Kafka.

mod config;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Args;
use polybus::dlq::DeadLetterTopic;
use polybus::{BoxPublisher, Event, Publisher as _};
use polybus_runtime::http::HealthServer;
use polybus_runtime::{App, HandlerError, Message, RetryPolicy};
use tokio::sync::watch;

use crate::common::{Failure, Target};
use config::{Config, DeadLetters, Delivery, RouteConfig, Template};

pub(crate) const EXAMPLES: &str = "\
Examples:
  polybus bridge --config bridge.toml
  polybus bridge --config bridge.toml --check

A config with one route (see docs/CLI.md for every field):
  [http]
  listen = \"127.0.0.1:9464\"          # /healthz /readyz /metrics
  [[route]]
  name = \"sensors\"
  from = \"mqtt://127.0.0.1:1883?client_id=bridge-1&session_expiry=3600\"
  topic = \"sensors/+/temp\"
  to = \"kafka://127.0.0.1:9092\"
  to_topic = \"sensors-{2}\"            # {topic} {1}..{99} {type} {key} {source} {id} {header.NAME}
  key = \"{2}\"                         # default: keep the event's key
  types = [\"com.example.*\"]           # filter by CloudEvents type (optional)
  headers = { region = \"eu\" }         # filter by headers (optional)
  attempts = 5                        # then a dead letter on <topic>.dlq (dead_letter = ...)
  # delivery = \"spool\"                # ack at the source once in a local spool (Kafka sinks)
  # spool_dir = \"/var/lib/polybus/sensors\"

SIGTERM or Ctrl-C drains: in-flight events finish (drain_timeout, default 10 s), the rest
stays unacknowledged at the source for the next run.";

/// Counter, label `route`: events published to the sink (and then acked at the source); on a
/// spool route, events committed to the spool (and then acked at the source).
const FORWARDED: &str = "polybus_bridge_forwarded_total";
/// Counter, label `route`: events the route's filter skipped (acked, not forwarded).
const FILTERED: &str = "polybus_bridge_filtered_total";
/// Counter, label `route`: sink publishes that failed (each retried or dead-lettered).
const FAILED: &str = "polybus_bridge_publish_failures_total";
/// Histogram, seconds, label `route`: how long a sink publish took until acknowledged.
const PUBLISH_SECONDS: &str = "polybus_bridge_publish_duration_seconds";
/// Gauge, label `route`: 1 while the route runs (subscribed), 0 otherwise.
const UP: &str = "polybus_bridge_route_up";

/// The bridge's `# HELP` lines (the runtime and the adapters describe their own).
fn describe_metrics() {
    metrics::describe_counter!(
        FORWARDED,
        "Events published to the sink (spool routes: committed to the spool) and then acked at \
         the source (label route)"
    );
    metrics::describe_counter!(
        FILTERED,
        "Events the route's filter skipped: acked, not forwarded (label route)"
    );
    metrics::describe_counter!(
        FAILED,
        "Sink publishes that failed, each retried or dead-lettered (label route)"
    );
    metrics::describe_histogram!(
        PUBLISH_SECONDS,
        metrics::Unit::Seconds,
        "How long a sink publish took until acknowledged (label route)"
    );
    metrics::describe_gauge!(
        UP,
        "1 while the route runs (subscribed), 0 otherwise (label route)"
    );
    describe_spool_metrics();
}

/// `# HELP` for what the spools of `delivery = "spool"` routes report (polybus-compose does
/// not describe its metrics itself); shown only once a spool reported them.
fn describe_spool_metrics() {
    use metrics::Unit::Seconds;
    use polybus::compose::metrics as m;
    let counters = [
        (m::PUBLISHED, "Events committed to a route's spool"),
        (m::PUBLISH_ERRORS, "Spool commits that failed (label kind)"),
        (m::FORWARDED, "Events the spools forwarded to Kafka"),
        (
            m::RETRIES,
            "Failed forwards from a spool that will be retried",
        ),
        (
            m::DEAD_LETTERS,
            "Events a spool wrote to a dead-letter topic",
        ),
        (m::REDRIVEN, "Events moved back from a dead-letter topic"),
        (
            m::FORWARD_DEDUP,
            "Spooled events not forwarded because Kafka already had them (same source and id)",
        ),
        (
            m::CONSUME_DEDUP,
            "Deliveries dropped by consumer-side dedup",
        ),
        (
            m::SPOOL_FULL_WAITS,
            "Spool commits that waited for room in a full spool",
        ),
        (m::SPOOL_REJECTED, "Spool commits rejected by a full spool"),
        (m::SWITCH_CHANGES, "Switch changes applied to a spool"),
        (
            m::FORWARDER_RESTARTS,
            "Spool forwarders restarted after a panic (label bucket)",
        ),
    ];
    for (name, help) in counters {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_gauge!(m::SPOOL_DEPTH, "Events in the spools");
    let histograms = [
        (m::ACK_LATENCY, "Time to commit an event to a spool"),
        (
            m::NATS_LATENCY,
            "Time of the NATS publish of a spool (unused by the bridge)",
        ),
        (
            m::FORWARD_LATENCY,
            "Time from entering a spool to the Kafka acknowledgement",
        ),
    ];
    for (name, help) in histograms {
        metrics::describe_histogram!(name, Seconds, help);
    }
}

#[derive(Debug, Args)]
pub(crate) struct BridgeArgs {
    /// The config file (TOML).
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Check the config and exit (0 valid, 2 not), connecting nothing.
    #[arg(long)]
    check: bool,
}

/// Where a route's events go.
enum Sink {
    /// Straight to the sink's publisher (at-least-once).
    Direct(BoxPublisher),
    /// Into the route's spool, which forwards to the sink (Kafka) in the background.
    Spool(polybus::compose::Bus),
}

impl Sink {
    async fn publish(&self, topic: &str, event: Event) -> polybus::Result<()> {
        match self {
            Sink::Direct(p) => p.publish(topic, event).await.map(drop),
            Sink::Spool(bus) => bus.publish(topic, event).await.map(drop),
        }
    }

    /// Flushes and closes; a spool first forwards what it holds for up to the drain timeout
    /// and keeps the rest for the next start.
    async fn close(&self) -> polybus::Result<()> {
        match self {
            Sink::Direct(p) => p.close().await,
            Sink::Spool(bus) => {
                let left = bus.spool_depth();
                let r = bus.close().await;
                let now = bus.spool_depth();
                eprintln!(
                    "polybus bridge: spool had {left} event(s) to forward at the stop, {now} \
                     kept for the next start"
                );
                r
            }
        }
    }
}

/// What a running route needs per event.
struct Forwarder {
    name: String,
    sink: Sink,
    to_topic: Template,
    key: Option<Template>,
    separator: char,
    types: Vec<String>,
    headers: Vec<(String, String)>,
    forwarded: AtomicU64,
}

impl Forwarder {
    fn accepts(&self, event: &Event) -> bool {
        let kind = event.kind();
        let type_ok = self.types.is_empty()
            || self.types.iter().any(|t| match t.strip_suffix('*') {
                Some(prefix) => kind.starts_with(prefix),
                None => kind == t,
            });
        type_ok
            && self
                .headers
                .iter()
                .all(|(n, v)| event.headers().get(n) == Some(v.as_str()))
    }

    async fn forward(&self, msg: Message) -> Result<(), HandlerError> {
        let label = [("route", self.name.clone())];
        if !self.accepts(msg.event()) {
            metrics::counter!(FILTERED, &label).increment(1);
            return Ok(());
        }
        let topic = msg.topic().to_owned();
        let mut event = msg.into_event();
        let to = self
            .to_topic
            .render(&topic, self.separator, &event)
            .map_err(|e| HandlerError::permanent(format!("to_topic: {e}")).with_kind("template"))?;
        if let Some(k) = &self.key {
            let key = k
                .render(&topic, self.separator, &event)
                .map_err(|e| HandlerError::permanent(format!("key: {e}")).with_kind("template"))?;
            event.set_key(Some(bytes::Bytes::from(key)));
        }
        let started = Instant::now();
        match self.sink.publish(&to, event).await {
            Ok(_) => {
                metrics::histogram!(PUBLISH_SECONDS, &label)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(FORWARDED, &label).increment(1);
                self.forwarded.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                metrics::counter!(FAILED, &label).increment(1);
                Err(HandlerError::from(e))
            }
        }
    }
}

fn read_config(path: &std::path::Path) -> Result<Config, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
    config::parse(path, &text)
}

pub(crate) async fn run(args: BridgeArgs) -> Result<(), Failure> {
    let config = read_config(&args.config)?;
    if args.check {
        println!(
            "{}: ok, {} route{}",
            args.config.display(),
            config.routes.len(),
            if config.routes.len() == 1 { "" } else { "s" }
        );
        for r in &config.routes {
            println!("  {}", describe(r)?);
        }
        return Ok(());
    }
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // Only fails when a recorder is already set, which nothing else here does.
    let _ = metrics::set_global_recorder(recorder);
    describe_metrics();

    let (stop_tx, stop_rx) = watch::channel(false);
    // Connect every route first: a broker that cannot be reached fails the start.
    let mut starting = Vec::new();
    for route in &config.routes {
        starting.push(start_route(route, &config).await?);
    }
    let http = match config.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Failure::usage(format!("[http] listen {addr}: cannot bind: {e}")))?;
            let local = listener
                .local_addr()
                .map_err(|e| Failure::failed(e.to_string()))?;
            eprintln!("polybus bridge: http on http://{local} (/healthz /readyz /metrics)");
            let mut healths = starting.iter().map(|s| s.app.health());
            let first = healths
                .next()
                .ok_or_else(|| Failure::usage("the config has no [[route]]"))?;
            let server = healths
                .fold(HealthServer::new(first), HealthServer::with)
                .metrics(move || handle.render());
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(server.serve(listener, async move {
                let _ = stop.wait_for(|s| *s).await;
            })))
        }
        None => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for s in starting {
        let StartedRoute {
            app,
            consumer,
            publisher,
            forwarder,
            route,
        } = s;
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tasks.spawn(async move {
            let label = [("route", route.name.clone())];
            metrics::gauge!(UP, &label).set(1.0);
            let result = app.run_until(consumer, publisher, shutdown).await;
            metrics::gauge!(UP, &label).set(0.0);
            // The app closed the source side; the sink is ours to flush.
            let closed = forwarder.sink.close().await;
            (route, forwarder, result, closed)
        });
    }
    eprintln!("polybus bridge: running {} route(s)", tasks.len());
    let signal = tokio::spawn(async move {
        polybus_runtime::shutdown_signal().await;
        eprintln!("polybus bridge: stopping, draining in-flight events");
        let _ = stop_tx.send(true);
    });
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (route, forwarder, result, closed) =
            joined.map_err(|e| Failure::failed(format!("a route task failed: {e}")))?;
        let n = forwarder.forwarded.load(Ordering::Relaxed);
        eprintln!(
            "polybus bridge: route {} stopped, {n} forwarded",
            route.name
        );
        let source = Target::new(&route.from, None)?;
        let sink = Target::new(&route.to, None)?;
        if let Err(e) = result {
            failure.get_or_insert(source.fail(&e, &format!("running route {}", route.name)));
        }
        if let Err(e) = closed {
            failure.get_or_insert(sink.fail(&e, &format!("flushing route {}", route.name)));
        }
        // One route failing for good stops the others: a half-running bridge hides it.
        if failure.is_some() {
            signal.abort();
        }
    }
    signal.abort();
    if let Some(h) = http {
        h.abort();
    }
    match failure {
        Some(f) => Err(f),
        None => {
            eprintln!("polybus bridge: stopped");
            Ok(())
        }
    }
}

fn describe(r: &RouteConfig) -> Result<String, Failure> {
    let from = Target::new(&r.from, None)?;
    let to = Target::new(&r.to, None)?;
    let delivery = match &r.delivery {
        Delivery::AtLeastOnce => String::new(),
        Delivery::Spool { dir, .. } => format!(" (spool in {})", dir.display()),
    };
    Ok(format!(
        "{}: {} {} -> {} {}{delivery}",
        r.name, from.shown, r.topic, to.shown, r.to_topic.text
    ))
}

/// The route's spool: a composed bus in Kafka-only mode (no NATS side) whose Kafka publisher
/// is the route's sink, retrying and dead-lettering as the route says; on start it first
/// forwards what an earlier run left.
async fn open_spool(
    route: &RouteConfig,
    config: &Config,
    dir: &std::path::Path,
    capacity: u64,
    sink: BoxPublisher,
) -> Result<polybus::compose::Bus, Failure> {
    use polybus::compose::{Bus, Channel, RetryPolicy, SpoolConfig, Switches, TopicMap};
    use polybus::{MemoryBroker, PublisherExt as _};
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure::usage(format!(
            "route {}: cannot create spool_dir {}: {e}",
            route.name,
            dir.display()
        ))
    })?;
    let naming = match &route.dead_letters {
        DeadLetters::Source(t) | DeadLetters::Sink(t) if !t.is_empty() => {
            DeadLetterTopic::Fixed(t.clone())
        }
        _ => DeadLetterTopic::default(),
    };
    // Never written to: the switches keep the bus off NATS.
    let no_nats = MemoryBroker::new().publisher().boxed();
    let bus = Bus::builder()
        .spool(SpoolConfig::new(dir).capacity(capacity))
        .initial_switches(
            Switches::default()
                .with_dual_write(false)
                .with_single_channel(Channel::Kafka),
        )
        // The rendered to_topic is the Kafka topic, checked, never rewritten.
        .topic_map(TopicMap::new().with_fn(|t| Ok(t.to_owned())))
        .retry(
            RetryPolicy::default()
                .max_attempts(route.attempts)
                .initial_backoff(route.backoff)
                .max_backoff(route.max_backoff),
        )
        .dead_letter_topic(naming)
        .drain_timeout(config.drain_timeout)
        .build_with(no_nats, sink)
        .await
        .map_err(|e| {
            let text = e.to_string();
            Failure {
                code: if e.kind() == polybus::ErrorKind::Rejected {
                    2
                } else {
                    1
                },
                message: format!(
                    "route {}: cannot open the spool in {}: {text}{}",
                    route.name,
                    dir.display(),
                    if e.kind() == polybus::ErrorKind::Rejected {
                        " (is another bridge running with this spool_dir?)"
                    } else {
                        ""
                    }
                ),
            }
        })?;
    let left = bus.spool_depth();
    if left > 0 {
        eprintln!(
            "polybus bridge: route {}: {left} event(s) in the spool from an earlier run, \
             forwarding them first",
            route.name
        );
    }
    Ok(bus)
}

struct StartedRoute {
    app: App<()>,
    consumer: polybus::BoxConsumer,
    publisher: BoxPublisher,
    forwarder: Arc<Forwarder>,
    route: RouteConfig,
}

async fn start_route(route: &RouteConfig, config: &Config) -> Result<StartedRoute, Failure> {
    let source = Target::new(&route.from, route.group.as_deref())?;
    let sink = Target::new(&route.to, None)?;
    let doing = format!("connecting route {}", route.name);
    let (source_pub, consumer) = source.connect(&doing).await?;
    let (sink_pub, _sink_consumer) = sink.connect(&doing).await?;
    let route_sink = match &route.delivery {
        Delivery::AtLeastOnce => Sink::Direct(sink_pub.clone()),
        Delivery::Spool { dir, capacity } => {
            Sink::Spool(open_spool(route, config, dir, *capacity, sink_pub.clone()).await?)
        }
    };
    let forwarder = Arc::new(Forwarder {
        name: route.name.clone(),
        sink: route_sink,
        to_topic: route.to_topic.clone(),
        key: route.key.clone(),
        separator: config::separator(&route.from),
        types: route.types.clone(),
        headers: route.headers.clone(),
        forwarded: AtomicU64::new(0),
    });
    let f = forwarder.clone();
    let handler = move |msg: Message| {
        let f = f.clone();
        async move { f.forward(msg).await }
    };
    let mut app = App::new()
        .route(route.topic.clone(), handler)
        .concurrency(route.concurrency)
        .retry(
            RetryPolicy::exponential(route.backoff)
                .max_attempts(route.attempts)
                .max_delay(route.max_backoff),
        )
        .drain_timeout(config.drain_timeout);
    let naming = |t: &str| {
        if t.is_empty() {
            DeadLetterTopic::default()
        } else {
            DeadLetterTopic::Fixed(t.to_owned())
        }
    };
    app = match &route.dead_letters {
        DeadLetters::Off => app.without_dead_letters(),
        DeadLetters::Source(t) => app.dead_letter_topic(naming(t)),
        DeadLetters::Sink(t) => app.dead_letter_publisher(naming(t), sink_pub),
    };
    eprintln!("polybus bridge: route {}", describe(route)?);
    Ok(StartedRoute {
        app,
        consumer,
        publisher: source_pub,
        forwarder,
        route: route.clone(),
    })
}
