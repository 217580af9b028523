//! Tracing: a span per publish and per delivery with the OpenTelemetry messaging attributes,
//! and W3C trace context (`traceparent`, `tracestate`) carried in the message headers.
//!
//! Every adapter does the same thing through [`Telemetry`]:
//!
//! * **publish**: [`Telemetry::publish`] opens an `info` span named `publish` (target
//!   `polybus`) with `otel.kind = "producer"`, `messaging.system`,
//!   `messaging.destination.name`, `messaging.operation.type = "send"`,
//!   `messaging.message.id`, `messaging.message.body.size`, and, once the broker answered,
//!   `messaging.destination.partition.id` + `messaging.kafka.offset` (Kafka) or
//!   `messaging.jetstream.sequence` (JetStream). It sets the event's `traceparent` header
//!   (see below) and records the trace id in the span field `trace_id`.
//! * **delivery**: [`Telemetry::delivered`] opens an `info` span named `process` with
//!   `otel.kind = "consumer"`, `messaging.operation.type = "process"` and the same attributes,
//!   reads the message's `traceparent`, records its trace id as `trace_id` and makes the span a
//!   child of the publisher's span (with the `opentelemetry` feature). The span travels with
//!   the [`Delivery`]: [`Delivery::span`] instruments the processing.
//!
//! # Which trace context a publish carries
//!
//! 1. The event already has a valid `traceparent` (it was received from another broker and is
//!    forwarded, or the caller set one): the trace goes on. Without OpenTelemetry the header is
//!    kept as it is; with it, the publish span becomes a child of that context and the header
//!    names the publish span.
//! 2. Otherwise, with the `opentelemetry` feature and an OpenTelemetry layer installed, the
//!    publish span's own context (a child of the caller's active span) is injected.
//! 3. Otherwise it depends on the [`TracePolicy`] of the adapter: with
//!    [`TracePolicy::Continue`] (the NATS, JetStream, Kafka and MQTT publishers' default)
//!    nothing is written: there is no trace to continue, and a random trace per message would
//!    only cost bytes and time. With [`TracePolicy::StartRoot`] (what [`Telemetry::new`] and
//!    [`inject`] do, for compatibility) polybus starts a trace itself: a random trace id and
//!    span id, sampled, so the header is carried end to end even where nobody configured
//!    OpenTelemetry.
//!
//! With the `opentelemetry` feature and an OpenTelemetry layer, step 2 follows the
//! OpenTelemetry SDK: the publish span's context is what the configured sampler made of it
//! (a child of the caller's span, or a new trace when the caller has none), written with its
//! sampled flag as the W3C propagator writes it (a valid context is propagated, sampled or not).
//!
//! A different policy can be plugged in with [`set_trace_hook`].
//!
//! # Cost
//!
//! Spans are created with `tracing::info_span!`, which costs an atomic load when the level is
//! disabled. The only allocation on the publish path is the 55-byte `traceparent` value when
//! polybus has to write one (the header name is static).

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tracing::Span;
use tracing::field::Empty;

use crate::metrics::Instruments;
use crate::{Delivery, Error, Event, Headers, Receipt, Result};

/// The W3C trace context header carrying the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C trace context header carrying vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";
/// The `tracing` target of polybus' spans.
pub const TARGET: &str = "polybus";

/// A W3C trace context (`traceparent`): trace id, parent span id and trace flags.
///
/// Parsing is strict ([W3C Trace Context], level 2): lowercase hex only, no all-zero ids,
/// version `ff` refused, version `00` exactly 55 characters; a later version may append
/// fields after a `-`. Nothing here panics on any input.
///
/// ```
/// use polybus_core::telemetry::TraceContext;
///
/// let tc: TraceContext = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
/// assert_eq!(tc.trace_id_hex().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(tc.is_sampled());
/// assert_eq!(tc.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
/// # Ok::<(), polybus_core::Error>(())
/// ```
///
/// [W3C Trace Context]: https://www.w3.org/TR/trace-context-2/
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace id (16 bytes, not all zero).
    pub trace_id: [u8; 16],
    /// The id of the parent span (8 bytes, not all zero).
    pub span_id: [u8; 8],
    /// The trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

impl TraceContext {
    /// The `sampled` trace flag.
    pub const SAMPLED: u8 = 0x01;
    /// The length of a version-00 `traceparent` value.
    pub const LEN: usize = 55;

    /// Parses a `traceparent` value; `None` for anything not valid.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() < Self::LEN {
            return None;
        }
        let version = hex_byte(b[0], b[1])?;
        if version == 0xff || (version == 0 && b.len() != Self::LEN) {
            return None;
        }
        if b.len() > Self::LEN && b[Self::LEN] != b'-' {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(b[3 + 2 * i], b[4 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(b[36 + 2 * i], b[37 + 2 * i])?;
        }
        let flags = hex_byte(b[53], b[54])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The context in `headers` (`traceparent`), if there is a valid one.
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        headers.get(TRACEPARENT).and_then(Self::parse)
    }

    /// A new trace: random trace id and span id, sampled.
    pub fn new_root() -> Self {
        let (trace_id, span_id) = random_ids();
        TraceContext {
            trace_id,
            span_id,
            flags: Self::SAMPLED,
        }
    }

    /// The same trace with a new random span id (same flags).
    pub fn child(&self) -> Self {
        let (_, span_id) = random_ids();
        TraceContext { span_id, ..*self }
    }

    /// Whether the `sampled` flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// The trace id as 32 lowercase hex digits (formats without allocating).
    pub fn trace_id_hex(&self) -> impl fmt::Display + fmt::Debug + Copy + '_ {
        Hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> impl fmt::Display + fmt::Debug + Copy + '_ {
        Hex(&self.span_id)
    }

    /// The `traceparent` value (version 00).
    pub fn to_header_value(&self) -> String {
        let mut buf = [0u8; Self::LEN];
        self.write(&mut buf);
        // Only ASCII hex digits and dashes were written, so this never falls back.
        std::str::from_utf8(&buf)
            .map(str::to_owned)
            .unwrap_or_default()
    }

    fn write(&self, buf: &mut [u8; Self::LEN]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut i = 0;
        let mut put = |byte: u8| {
            buf[i] = HEX[usize::from(byte >> 4)];
            buf[i + 1] = HEX[usize::from(byte & 0x0f)];
            i += 2;
        };
        put(0);
        for b in self.trace_id {
            put(b);
        }
        for b in self.span_id {
            put(b);
        }
        put(self.flags);
        // Insert the dashes: shift the digits into place from the back.
        let digits = *buf;
        buf[..2].copy_from_slice(&digits[..2]);
        buf[2] = b'-';
        buf[3..35].copy_from_slice(&digits[2..34]);
        buf[35] = b'-';
        buf[36..52].copy_from_slice(&digits[34..50]);
        buf[52] = b'-';
        buf[53..55].copy_from_slice(&digits[50..52]);
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; Self::LEN];
        self.write(&mut buf);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

impl FromStr for TraceContext {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s).ok_or_else(|| {
            Error::new(crate::ErrorKind::InvalidHeader, "core")
                .with_message("not a valid W3C traceparent")
        })
    }
}

#[derive(Clone, Copy)]
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(v(hi)? << 4 | v(lo)?)
}

fn random_ids() -> ([u8; 16], [u8; 8]) {
    use rand::Rng as _;
    let mut rng = rand::rng();
    loop {
        let trace: u128 = rng.random();
        let span: u64 = rng.random();
        if trace != 0 && span != 0 {
            return (trace.to_be_bytes(), span.to_be_bytes());
        }
    }
}

/// How polybus links its spans to a tracing system. The default (no hook set) uses
/// OpenTelemetry when the `opentelemetry` feature is on and an OpenTelemetry layer is
/// installed, and polybus' own trace ids otherwise.
pub trait TraceHook: Send + Sync + 'static {
    /// The context to write into a message published under `span`. `existing` is the event's
    /// own valid `traceparent` and `tracestate`, if it has one. Returns the `traceparent` and
    /// `tracestate` to carry, or `None` to let polybus decide (keep `existing`, else a new
    /// root).
    fn publish_context(
        &self,
        span: &Span,
        existing: Option<(TraceContext, Option<&str>)>,
    ) -> Option<(TraceContext, Option<String>)>;

    /// Makes the delivery `span` a child of the publisher's context `parent`.
    fn set_remote_parent(&self, span: &Span, parent: TraceContext, tracestate: Option<&str>);
}

static HOOK: OnceLock<Box<dyn TraceHook>> = OnceLock::new();

/// Installs `hook` for the whole process, once. Call it before any publisher is used.
///
/// # Errors
/// The hook given back when one was already installed.
pub fn set_trace_hook(hook: Box<dyn TraceHook>) -> Result<(), Box<dyn TraceHook>> {
    HOOK.set(hook)
}

fn hook() -> Option<&'static dyn TraceHook> {
    if let Some(h) = HOOK.get() {
        return Some(h.as_ref());
    }
    #[cfg(feature = "opentelemetry")]
    {
        Some(&otel::OtelHook)
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        None
    }
}

/// The span of one publish (`info`, target `polybus`, name `publish`), with the OpenTelemetry
/// messaging attributes. Partition, offset, sequence, `trace_id` and the error are recorded
/// later, by [`PublishScope`].
pub fn publish_span(system: &'static str, topic: &str, event: &Event) -> Span {
    tracing::info_span!(
        target: TARGET,
        "publish",
        otel.name = %SpanName("send", topic),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = system,
        messaging.destination.name = topic,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.message.id = event.id(),
        messaging.message.body.size = event.data().len(),
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        messaging.jetstream.sequence = Empty,
        error.type = Empty,
        trace_id = Empty,
    )
}

/// The span of one delivery (`info`, target `polybus`, name `process`), with the
/// OpenTelemetry messaging attributes, the position in the broker and the `trace_id` of the
/// message; a child of the publisher's span where the trace hook supports it.
pub fn deliver_span(system: &'static str, delivery: &Delivery) -> Span {
    let event = delivery.event();
    let span = tracing::info_span!(
        target: TARGET,
        "process",
        otel.name = %SpanName("process", delivery.topic()),
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = delivery.topic(),
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.message.id = event.id(),
        messaging.message.body.size = event.data().len(),
        messaging.message.delivery_count = delivery.delivery_count(),
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        messaging.jetstream.sequence = Empty,
        trace_id = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    record_position(&span, system, delivery.partition(), delivery.sequence());
    if let Some(parent) = TraceContext::from_headers(event.headers()) {
        span.record("trace_id", tracing::field::display(parent.trace_id_hex()));
        if let Some(h) = hook() {
            h.set_remote_parent(&span, parent, event.headers().get(TRACESTATE));
        }
    }
    span
}

fn record_position(span: &Span, system: &str, partition: Option<i32>, sequence: Option<u64>) {
    if let Some(p) = partition {
        span.record("messaging.destination.partition.id", p);
    }
    if let Some(s) = sequence {
        if system == "kafka" {
            span.record("messaging.kafka.offset", s);
        } else if system == "jetstream" {
            span.record("messaging.jetstream.sequence", s);
        }
    }
}

struct SpanName<'a>(&'static str, &'a str);

impl fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// Sets the trace context headers of `event` for a publish under `span` (see the module docs
/// for the policy) and records the trace id in the span. Returns the context carried.
pub fn inject(span: &Span, event: &mut Event) -> TraceContext {
    let tc = continued(span, event).unwrap_or_else(|| {
        let tc = TraceContext::new_root();
        // A tracestate without a valid traceparent belongs to no trace.
        event.headers_mut().remove(TRACESTATE);
        event
            .headers_mut()
            .insert_static(TRACEPARENT, tc.to_header_value());
        tc
    });
    record_trace_id(span, tc);
    tc
}

/// The trace a publish continues: the tracing system's choice for `span` (written onto the
/// event), else the valid context the event carries; `None` when there is neither.
fn continued(span: &Span, event: &mut Event) -> Option<TraceContext> {
    let existing = TraceContext::from_headers(event.headers());
    let chosen = hook().and_then(|h| {
        h.publish_context(
            span,
            existing.map(|tc| (tc, event.headers().get(TRACESTATE))),
        )
    });
    match chosen {
        Some((tc, state)) => {
            write_context(event, existing, tc, state);
            Some(tc)
        }
        None => existing,
    }
}

fn record_trace_id(span: &Span, tc: TraceContext) {
    if !span.is_disabled() {
        span.record("trace_id", tracing::field::display(tc.trace_id_hex()));
    }
}

/// What a publish writes when the event carries no trace context and no tracing system
/// gives one (see the module docs).
///
/// ```
/// use polybus_core::telemetry::{Telemetry, TracePolicy};
///
/// let t = Telemetry::new("nats").with_trace_policy(TracePolicy::Continue);
/// assert_eq!(t.trace_policy(), TracePolicy::Continue);
/// let mut ev = polybus_core::Event::new(b"x");
/// let scope = t.publish("orders", &mut ev);
/// assert!(ev.headers().get("traceparent").is_none(), "no trace to continue");
/// # drop(scope);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TracePolicy {
    /// Start a new sampled trace (random ids) for a message that has none.
    #[default]
    StartRoot,
    /// Write trace context only when there is a trace to continue: one carried by the event,
    /// or the publish span's context from the tracing system (OpenTelemetry).
    Continue,
}

/// [`inject`] under `policy`: returns the context carried, `None` when the message carries
/// none ([`TracePolicy::Continue`] with no trace to continue). An invalid `traceparent` on the
/// event, and a `tracestate` without a valid `traceparent`, are removed in that case.
///
/// ```
/// use polybus_core::telemetry::{TracePolicy, inject_with};
///
/// let mut ev = polybus_core::Event::new(b"x");
/// assert!(inject_with(&tracing::Span::none(), &mut ev, TracePolicy::Continue).is_none());
/// assert!(ev.headers().is_empty());
/// let tc = inject_with(&tracing::Span::none(), &mut ev, TracePolicy::StartRoot).unwrap();
/// assert_eq!(ev.headers().get("traceparent"), Some(tc.to_string().as_str()));
/// ```
pub fn inject_with(span: &Span, event: &mut Event, policy: TracePolicy) -> Option<TraceContext> {
    if policy == TracePolicy::StartRoot {
        return Some(inject(span, event));
    }
    // The common case of a hot path: no headers at all, no tracing system.
    if event.headers().is_empty() && hook().is_none() {
        return None;
    }
    let Some(tc) = continued(span, event) else {
        if !event.headers().is_empty() {
            event.headers_mut().remove(TRACEPARENT);
            event.headers_mut().remove(TRACESTATE);
        }
        return None;
    };
    record_trace_id(span, tc);
    Some(tc)
}

fn write_context(
    event: &mut Event,
    existing: Option<TraceContext>,
    tc: TraceContext,
    state: Option<String>,
) {
    if existing != Some(tc) {
        event
            .headers_mut()
            .insert_static(TRACEPARENT, tc.to_header_value());
    }
    if let Some(state) = state.filter(|s| crate::headers::validate(TRACESTATE, s).is_ok())
        && event.headers().get(TRACESTATE) != Some(state.as_str())
    {
        event.headers_mut().insert_static(TRACESTATE, state);
    }
}

/// The telemetry of one adapter instance: spans, trace propagation and metrics for one
/// messaging system. Cheap to clone (the metric handles are shared).
///
/// Create it when the producer or consumer is built, after the `metrics` recorder is
/// installed (metric handles bind to the recorder present when they are registered).
#[derive(Clone, Debug)]
pub struct Telemetry {
    system: &'static str,
    instruments: Arc<Instruments>,
    policy: TracePolicy,
}

impl Telemetry {
    /// Telemetry for `system` (the backend name: `nats`, `jetstream`, `kafka`, `mqtt`, ...).
    pub fn new(system: &'static str) -> Self {
        Telemetry {
            system,
            instruments: Arc::new(Instruments::new(system)),
            policy: TracePolicy::StartRoot,
        }
    }

    /// The same telemetry with another [`TracePolicy`] (default [`TracePolicy::StartRoot`]).
    #[must_use]
    pub fn with_trace_policy(mut self, policy: TracePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The trace policy of the publishes.
    pub fn trace_policy(&self) -> TracePolicy {
        self.policy
    }

    /// The messaging system.
    pub fn system(&self) -> &'static str {
        self.system
    }

    /// The metric handles.
    pub fn instruments(&self) -> &Instruments {
        &self.instruments
    }

    /// Starts a publish of `event` to `topic`: opens its span, sets the trace context headers
    /// and starts the latency timer. Run the broker call through [`PublishScope::run`].
    pub fn publish(&self, topic: &str, event: &mut Event) -> PublishScope<'_> {
        let span = publish_span(self.system, topic, event);
        inject_with(&span, event, self.policy);
        PublishScope {
            span,
            // Read only when the latency histogram goes to a recorder.
            start: self.instruments.is_recording().then(Instant::now),
            telemetry: self,
        }
    }

    /// Adds the delivery span and metrics to `delivery` (counts it as consumed, and as
    /// redelivered when its delivery count is above 1; in flight until settled or dropped).
    #[inline]
    pub fn delivered(&self, delivery: Delivery) -> Delivery {
        let span = deliver_span(self.system, &delivery);
        let m = &self.instruments;
        if !m.is_recording() {
            // No recorder: the metrics would go nowhere; the span is all there is to attach.
            return delivery.with_span(span);
        }
        m.consumed.increment(1);
        if delivery.is_redelivered() {
            m.redelivered.increment(1);
        }
        delivery.with_telemetry(span, self.instruments.clone())
    }

    /// Counts a received message that could not be decoded.
    pub fn decode_failed(&self, error: &Error) {
        self.instruments.decode_errors.increment(1);
        tracing::debug!(target: TARGET, system = self.system, %error, "message not decodable");
    }
}

/// One publish in progress: its span and its start time. See [`Telemetry::publish`].
#[derive(Debug)]
#[must_use = "run the publish through the scope so it is timed and counted"]
pub struct PublishScope<'a> {
    span: Span,
    start: Option<Instant>,
    telemetry: &'a Telemetry,
}

impl PublishScope<'_> {
    /// The publish span.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Runs the broker call inside the span, then records the outcome: the receipt's position
    /// in the span, the published counter and latency histogram, or the error kind.
    ///
    /// A combinator rather than an `async fn`: an `async fn` would keep the broker call's
    /// future twice in its state (the argument, and the instrumented copy), which doubled the
    /// size of every adapter's publish future (JetStream 1.6 -> 3.6 KiB), copied whenever a
    /// publish future is moved.
    pub fn run<F>(self, fut: F) -> impl Future<Output = Result<Receipt>>
    where
        F: Future<Output = Result<Receipt>>,
    {
        use futures_util::FutureExt as _;
        use tracing::Instrument as _;
        let span = self.span.clone();
        fut.instrument(span).map(move |result| {
            self.finish(&result);
            result
        })
    }

    /// Records the outcome of a publish done without [`run`](Self::run).
    pub fn finish(self, result: &Result<Receipt>) {
        let m = self.telemetry.instruments();
        match result {
            Ok(receipt) => {
                m.published.increment(1);
                if let Some(start) = self.start {
                    m.publish_duration.record(start.elapsed().as_secs_f64());
                }
                if !self.span.is_disabled() {
                    record_position(
                        &self.span,
                        self.telemetry.system,
                        receipt.partition(),
                        receipt.sequence(),
                    );
                }
            }
            Err(e) => {
                m.publish_error(e.kind());
                if !self.span.is_disabled() {
                    self.span.record("otel.status_code", "ERROR");
                    self.span
                        .record("error.type", crate::metrics::kind_code(e.kind()));
                }
            }
        }
    }
}

/// OpenTelemetry integration (feature `opentelemetry`): the default trace hook reads and sets
/// span contexts through `tracing-opentelemetry`, and [`HeaderInjector`](otel::HeaderInjector) /
/// [`HeaderExtractor`](otel::HeaderExtractor) let any OpenTelemetry propagator work on [`Headers`].
///
/// With an `OpenTelemetryLayer` in the subscriber, a publish injects the context of its own
/// span (a child of the caller's span), and a delivery span gets the publisher's span as its
/// remote parent, so one trace runs across brokers. Without such a layer, polybus falls back
/// to its own trace ids (see the module docs).
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub mod otel {
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::{TRACEPARENT, TRACESTATE, TraceContext, TraceHook};
    use crate::Headers;

    /// The default hook when the `opentelemetry` feature is on.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct OtelHook;

    impl TraceHook for OtelHook {
        fn publish_context(
            &self,
            span: &Span,
            existing: Option<(TraceContext, Option<&str>)>,
        ) -> Option<(TraceContext, Option<String>)> {
            if span.is_disabled() {
                return None;
            }
            if let Some((parent, state)) = existing {
                // Without an OpenTelemetry layer this fails, and polybus keeps `existing`.
                let _ = span.set_parent(remote_context(parent, state));
            }
            let cx = span.context();
            let otel_span = cx.span();
            let sc = otel_span.span_context();
            if !sc.is_valid() {
                return None;
            }
            let state = sc.trace_state().header();
            Some((from_span_context(sc), (!state.is_empty()).then_some(state)))
        }

        fn set_remote_parent(&self, span: &Span, parent: TraceContext, tracestate: Option<&str>) {
            let _ = span.set_parent(remote_context(parent, tracestate));
        }
    }

    /// The OpenTelemetry context of a remote span `parent`.
    pub fn remote_context(
        parent: TraceContext,
        tracestate: Option<&str>,
    ) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(to_span_context(parent, tracestate))
    }

    /// `tc` as an OpenTelemetry remote span context.
    pub fn to_span_context(tc: TraceContext, tracestate: Option<&str>) -> SpanContext {
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from_bytes(tc.trace_id),
            SpanId::from_bytes(tc.span_id),
            TraceFlags::new(tc.flags),
            true,
            state,
        )
    }

    /// An OpenTelemetry span context as a [`TraceContext`].
    pub fn from_span_context(sc: &SpanContext) -> TraceContext {
        TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        }
    }

    /// Writes an OpenTelemetry propagator's fields into event [`Headers`]. Values that are not
    /// legal header values are skipped.
    #[derive(Debug)]
    pub struct HeaderInjector<'a>(pub &'a mut Headers);

    impl Injector for HeaderInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            match key {
                TRACEPARENT => self.0.insert_static(TRACEPARENT, value),
                TRACESTATE => self.0.insert_static(TRACESTATE, value),
                _ => {
                    let _ = self.0.insert(key, value);
                }
            }
        }
    }

    /// Reads an OpenTelemetry propagator's fields from event [`Headers`].
    #[derive(Debug)]
    pub struct HeaderExtractor<'a>(pub &'a Headers);

    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(n, _)| n).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let tc = TraceContext::parse(SAMPLE).unwrap();
        assert_eq!(tc.trace_id[0], 0x4b);
        assert_eq!(tc.span_id[7], 0xb7);
        assert_eq!(tc.flags, 1);
        assert_eq!(tc.to_string(), SAMPLE);
        assert_eq!(tc.to_header_value(), SAMPLE);
        assert_eq!(tc.span_id_hex().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn strict_parsing_refuses_what_the_spec_refuses() {
        for bad in [
            "",
            "00",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", // 00 with more
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0€",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
        // A later version may append fields.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(TraceContext::parse(v1).is_some());
    }

    #[test]
    fn roots_are_random_and_children_keep_the_trace() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id, b.trace_id);
        assert!(a.is_sampled());
        let c = a.child();
        assert_eq!(c.trace_id, a.trace_id);
        assert_ne!(c.span_id, a.span_id);
        assert_eq!(TraceContext::parse(&c.to_string()), Some(c));
    }

    #[test]
    fn inject_keeps_an_existing_context_and_creates_one_otherwise() {
        let span = Span::none();
        let mut ev = Event::new(b"x");
        let tc = inject(&span, &mut ev);
        assert_eq!(ev.headers().get(TRACEPARENT), Some(tc.to_string().as_str()));

        let mut ev = Event::builder()
            .header(TRACEPARENT, SAMPLE)
            .header(TRACESTATE, "k=v")
            .build()
            .unwrap();
        let tc = inject(&span, &mut ev);
        assert_eq!(tc.to_string(), SAMPLE);
        assert_eq!(ev.headers().get(TRACESTATE), Some("k=v"));
        assert_eq!(ev.headers().len(), 2);

        let mut ev = Event::builder()
            .header(TRACEPARENT, "garbage")
            .header(TRACESTATE, "k=v")
            .build()
            .unwrap();
        let tc = inject(&span, &mut ev);
        assert_eq!(ev.headers().get(TRACEPARENT), Some(tc.to_string().as_str()));
        assert_eq!(ev.headers().get(TRACESTATE), None);
        assert_eq!(ev.headers().len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn parse_never_panics(s in "\\PC{0,70}") {
            let _ = TraceContext::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            s in "[0-9a-fA-F-]{50,60}",
        ) {
            if let Some(tc) = TraceContext::parse(&s) {
                prop_assert_eq!(TraceContext::parse(&tc.to_string()), Some(tc));
            }
        }

        #[test]
        fn format_then_parse_round_trips(
            trace in any::<u128>().prop_filter("non-zero", |t| *t != 0),
            span in any::<u64>().prop_filter("non-zero", |s| *s != 0),
            flags in any::<u8>(),
        ) {
            let tc = TraceContext { trace_id: trace.to_be_bytes(), span_id: span.to_be_bytes(), flags };
            prop_assert_eq!(TraceContext::parse(&tc.to_string()), Some(tc));
        }
    }
}
