//! Connection options (credentials, TLS, timeouts, CloudEvents mode) and the connected client.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event as NatsEvent};
use polybus_core::cloudevents::{Mode, WireFormat};
use polybus_core::telemetry::TracePolicy;
use polybus_core::{Error, ErrorKind, Result};
use tokio::sync::watch;

use crate::error;
use crate::permissions::{self, Op, Violations};
use crate::{NatsConsumer, NatsProducer};

/// How to connect to NATS and how to write events: by-value builder ending in
/// [`producer`](Self::producer), [`consumer`](Self::consumer) or [`connect`](Self::connect).
///
/// Secrets (password, token, nkey seed, userinfo in the URL) never appear in `Debug` output.
///
/// ```no_run
/// use std::time::Duration;
/// use polybus_core::cloudevents::Mode;
/// use polybus_nats::NatsOptions;
///
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let _producer = NatsOptions::new("nats://127.0.0.1:4222")
///     .user_password("app", "s3cret")
///     .name("billing")
///     .source("urn:billing")
///     .mode(Mode::Structured)
///     .request_timeout(Duration::from_secs(2))
///     .producer()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsOptions {
    pub(crate) url: String,
    auth: Auth,
    tls_roots: Vec<PathBuf>,
    tls_client: Option<(PathBuf, PathBuf)>,
    require_tls: bool,
    name: Option<String>,
    pub(crate) source: Option<Cow<'static, str>>,
    pub(crate) mode: Mode,
    pub(crate) wire_format: WireFormat,
    pub(crate) trace_policy: TracePolicy,
    pub(crate) request_timeout: Option<Duration>,
    connect_timeout: Duration,
    pub(crate) close_timeout: Duration,
    subscription_capacity: usize,
    max_reconnects: Option<usize>,
    pub(crate) queue_group: Option<String>,
    pub(crate) check_publish_permissions: bool,
}

#[derive(Clone)]
enum Auth {
    None,
    UserPassword(String, String),
    Token(String),
    NKey(String),
    CredsFile(PathBuf),
}

impl NatsOptions {
    /// Options for the server(s) at `url` (`nats://host:port`; several comma-separated URLs
    /// form a server pool). Defaults: no credentials, no TLS requirement, binary CloudEvents
    /// mode, request timeout 10 s, connect timeout 5 s, close timeout 10 s, 65 536 buffered
    /// messages per subscription, unlimited reconnects.
    pub fn new(url: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            auth: Auth::None,
            tls_roots: Vec::new(),
            tls_client: None,
            require_tls: false,
            name: None,
            source: None,
            mode: Mode::Binary,
            wire_format: WireFormat::CloudEvents,
            trace_policy: TracePolicy::Continue,
            request_timeout: Some(Duration::from_secs(10)),
            connect_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(10),
            subscription_capacity: 64 * 1024,
            max_reconnects: None,
            queue_group: None,
            check_publish_permissions: false,
        }
    }

    /// Authenticates with a user name and password.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").user_password("u", "p").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Authenticates with a token.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").token("t0ken").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticates with an nkey seed (`SU...`).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").nkey("SUAM...").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.auth = Auth::NKey(seed.into());
        self
    }

    /// Authenticates with a `.creds` file (JWT and nkey seed), read when connecting.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").credentials_file("app.creds").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredsFile(path.into());
        self
    }

    /// Trusts the CA certificate(s) in the PEM file at `path` (may be called several times).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("tls://127.0.0.1:4222").tls_root_certificates("ca.pem").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_root_certificates(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_roots.push(path.into());
        self
    }

    /// Presents the client certificate and key (PEM files) for mutual TLS.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("tls://127.0.0.1:4222")
    ///     .tls_client_certificate("client.pem", "client-key.pem")
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client = Some((cert.into(), key.into()));
        self
    }

    /// Refuses to connect without TLS.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("tls://127.0.0.1:4222").require_tls(true).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn require_tls(mut self, required: bool) -> Self {
        self.require_tls = required;
        self
    }

    /// Names the connection (shown by the server's monitoring).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").name("billing").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The CloudEvents `source` given to published events that have none.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _p = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").source("urn:billing").producer().await?;
    /// # Ok(()) }
    /// ```
    pub fn source(mut self, source: impl Into<Cow<'static, str>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The CloudEvents content mode to write (binary by default). Receiving detects the mode
    /// of each message.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_core::cloudevents::Mode;
    /// let _p = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").mode(Mode::Structured).producer().await?;
    /// # Ok(()) }
    /// ```
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// What publishers write around the payload: the CloudEvents binding (default) or the
    /// lean format (the payload, the event's headers, key and content type, nothing else; see
    /// [`WireFormat`] and docs/WIRE-FORMAT.md). Consumers read either.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_core::cloudevents::WireFormat;
    /// let _p = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222")
    ///     .wire_format(WireFormat::Lean)
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn wire_format(mut self, format: WireFormat) -> Self {
        self.wire_format = format;
        self
    }

    /// What a publish writes when the event carries no trace context and no tracing system
    /// gives one (default [`TracePolicy::Continue`]: nothing; [`TracePolicy::StartRoot`]: a
    /// new random trace per message). See `polybus_core::telemetry`.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// use polybus_core::telemetry::TracePolicy;
    /// let _p = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222")
    ///     .trace_policy(TracePolicy::StartRoot)
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn trace_policy(mut self, policy: TracePolicy) -> Self {
        self.trace_policy = policy;
        self
    }

    /// How long a request waits for its reply (`None`: forever). Default 10 s.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _p = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222")
    ///     .request_timeout(std::time::Duration::from_millis(500))
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn request_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.request_timeout = timeout.into();
        self
    }

    /// How long the first connection may take. Default 5 s.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222")
    ///     .connect_timeout(std::time::Duration::from_secs(1))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long `flush` and `close` wait for buffered messages to reach the socket (and, for
    /// `close`, for the connection to drain) before failing with `Timeout`. Default 10 s.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _p = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222")
    ///     .close_timeout(std::time::Duration::from_secs(30))
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Messages buffered per subscription before the client drops new ones as a slow consumer
    /// (counted and logged, see [`NatsConnection::slow_consumer_drops`]). Default 65 536; at
    /// least 1 and at most [`tokio::sync::Semaphore::MAX_PERMITS`] (the client's channel bound).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").subscription_capacity(1024).consumer().await?;
    /// # Ok(()) }
    /// ```
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// Gives up after this many failed reconnect attempts in a row (`None`: never). Default
    /// `None`.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").max_reconnects(10).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn max_reconnects(mut self, attempts: impl Into<Option<usize>>) -> Self {
        self.max_reconnects = attempts.into();
        self
    }

    /// The queue group consumers made from these options join (see
    /// [`NatsConsumer::queue_group`]).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _c = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222").queue_group("workers").consumer().await?;
    /// # Ok(()) }
    /// ```
    pub fn queue_group(mut self, group: impl Into<String>) -> Self {
        self.queue_group = Some(group.into());
        self
    }

    /// Confirms every publish with a round trip through the server, so that a publish the
    /// server refuses for lack of permission fails with
    /// [`ErrorKind::Unauthorized`] on that very call. Costs one round trip per publish; off by
    /// default.
    ///
    /// Core NATS does not answer a publish: a refused one is dropped by the server, which
    /// sends an asynchronous `-ERR 'Permissions Violation for Publish to "subject"'`. Without
    /// this option polybus reports that error on the next publish to the same subject and on
    /// the next `flush`. Subscriptions are always confirmed this way.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let _p = polybus_nats::NatsOptions::new("nats://127.0.0.1:4222")
    ///     .user_password("app", "s3cret")
    ///     .check_publish_permissions(true)
    ///     .producer()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn check_publish_permissions(mut self, on: bool) -> Self {
        self.check_publish_permissions = on;
        self
    }

    /// The default event source set with [`source`](Self::source).
    pub fn default_source(&self) -> Option<&Cow<'static, str>> {
        self.source.as_ref()
    }

    /// The CloudEvents content mode set with [`mode`](Self::mode).
    pub fn content_mode(&self) -> Mode {
        self.mode
    }

    /// The wire format set with [`wire_format`](Self::wire_format).
    pub fn wire_format_value(&self) -> WireFormat {
        self.wire_format
    }

    /// The trace policy set with [`trace_policy`](Self::trace_policy).
    pub fn trace_policy_value(&self) -> TracePolicy {
        self.trace_policy
    }

    /// The close timeout set with [`close_timeout`](Self::close_timeout).
    pub fn close_timeout_value(&self) -> Duration {
        self.close_timeout
    }

    /// Connects and returns a producer.
    ///
    /// # Errors
    /// See [`connect`](Self::connect).
    pub async fn producer(self) -> Result<NatsProducer> {
        let conn = self.connect().await?;
        Ok(NatsProducer::from_parts(conn, &self, true))
    }

    /// Connects and returns a consumer.
    ///
    /// # Errors
    /// See [`connect`](Self::connect).
    pub async fn consumer(self) -> Result<NatsConsumer> {
        let conn = self.connect().await?;
        Ok(NatsConsumer::from_parts(conn, &self))
    }

    /// Connects.
    ///
    /// # Errors
    /// [`ErrorKind::Connect`] when the server cannot be reached, [`ErrorKind::Timeout`] when
    /// connecting takes longer than the connect timeout, [`ErrorKind::Unauthorized`] when the
    /// credentials are refused or the credentials file cannot be read, [`ErrorKind::Other`]
    /// for a malformed URL.
    pub async fn connect(&self) -> Result<NatsConnection> {
        self.connect_for(error::BACKEND).await
    }

    /// [`connect`](Self::connect) with errors tagged `backend` (for crates built on this one,
    /// such as polybus-jetstream).
    #[doc(hidden)]
    pub async fn connect_for(&self, backend: &'static str) -> Result<NatsConnection> {
        let stats = Arc::new(Stats::new());
        // Credentials in the URL are taken out of it and given to the client as options: the
        // client logs server addresses (at debug level), and the URL must not carry them there.
        let (urls, url_auth) = split_url_credentials(&self.url);
        let mut opts = match &self.auth {
            Auth::None => match url_auth {
                Some(UrlAuth::UserPassword(u, p)) => ConnectOptions::new().user_and_password(u, p),
                Some(UrlAuth::Token(t)) => ConnectOptions::new().token(t),
                None => ConnectOptions::new(),
            },
            Auth::UserPassword(u, p) => {
                ConnectOptions::new().user_and_password(u.clone(), p.clone())
            }
            Auth::Token(t) => ConnectOptions::new().token(t.clone()),
            Auth::NKey(seed) => ConnectOptions::new().nkey(seed.clone()),
            Auth::CredsFile(path) => ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Unauthorized, backend)
                        .with_message(format!("reading credentials file {}", path.display()))
                        .with_source(e)
                })?,
        };
        for root in &self.tls_roots {
            opts = opts.add_root_certificates(root.clone());
        }
        if let Some((cert, key)) = &self.tls_client {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(name) = &self.name {
            opts = opts.name(name);
        }
        let events = stats.clone();
        opts = opts
            .require_tls(self.require_tls)
            .request_timeout(self.request_timeout)
            .connection_timeout(self.connect_timeout)
            .subscription_capacity(self.subscription_capacity)
            .max_reconnects(self.max_reconnects)
            // polybus checks every subject it publishes to (stricter, and once per subject
            // through the producers' subject cache); the client's own check would scan the
            // subject again on every publish.
            .skip_subject_validation(true)
            .event_callback(move |event| {
                let stats = events.clone();
                async move { stats.record(event) }
            });
        let shown = redact_url(&self.url);
        // async-nats reads one `&str` as one URL: several are given as a list.
        let client = opts
            .connect(urls.split(',').collect::<Vec<&str>>())
            .await
            .map_err(|e| error::connect(e, backend, &shown))?;
        let auth_required = client.server_info().auth_required;
        Ok(NatsConnection {
            client,
            stats,
            auth_required,
        })
    }
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::None => "none",
            Auth::UserPassword(..) => "user/password (redacted)",
            Auth::Token(_) => "token (redacted)",
            Auth::NKey(_) => "nkey (redacted)",
            Auth::CredsFile(_) => "credentials file",
        };
        f.debug_struct("NatsOptions")
            .field("url", &redact_url(&self.url))
            .field("auth", &auth)
            .field("tls_roots", &self.tls_roots)
            .field("tls_client", &self.tls_client.as_ref().map(|(c, _)| c))
            .field("require_tls", &self.require_tls)
            .field("name", &self.name)
            .field("source", &self.source)
            .field("mode", &self.mode)
            .field("wire_format", &self.wire_format)
            .field("trace_policy", &self.trace_policy)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("max_reconnects", &self.max_reconnects)
            .field("queue_group", &self.queue_group)
            .field("check_publish_permissions", &self.check_publish_permissions)
            .finish()
    }
}

/// Credentials found in a server URL: `nats://user:password@host` or `nats://token@host`.
enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

/// Removes the userinfo from each URL and returns the first one's credentials,
/// percent-decoded (`nats://u:p%40ss@h` is the password `p@ss`).
fn split_url_credentials(urls: &str) -> (String, Option<UrlAuth>) {
    let mut auth = None;
    let clean = urls
        .split(',')
        .map(|url| {
            let url = url.trim();
            let start = url.find("://").map_or(0, |i| i + 3);
            let authority_end = url[start..]
                .find(['/', '?', '#'])
                .map_or(url.len(), |i| start + i);
            let Some(at) = url[start..authority_end].rfind('@').map(|i| start + i) else {
                return url.to_owned();
            };
            if auth.is_none() {
                let userinfo = &url[start..at];
                auth = Some(match userinfo.split_once(':') {
                    Some((u, p)) => {
                        UrlAuth::UserPassword(percent_decode_lossy(u), percent_decode_lossy(p))
                    }
                    None => UrlAuth::Token(percent_decode_lossy(userinfo)),
                });
            }
            format!("{}{}", &url[..start], &url[at + 1..])
        })
        .collect::<Vec<_>>()
        .join(",");
    (clean, auth)
}

/// URL percent-decoding; an invalid escape is kept as it is.
fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits make a value below 256.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the userinfo of each URL (`nats://user:pass@host`) with `***`.
fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            (None, Some(at)) => format!("***{}", &url[at..]),
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A connected NATS client with polybus' connection-event handling: slow-consumer drops,
/// disconnects and server errors are logged with `tracing` and counted, never silent.
/// Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct NatsConnection {
    pub(crate) client: Client,
    stats: Arc<Stats>,
    /// From the server's `INFO` at connect: without authentication there are no permissions,
    /// so nothing can be refused and publishes need not watch for refusals.
    auth_required: bool,
}

impl NatsConnection {
    /// Wraps a client connected elsewhere. Its events are not observed (the counters stay 0):
    /// connect through [`NatsOptions`] to have them.
    pub fn from_client(client: Client) -> Self {
        let auth_required = client.server_info().auth_required;
        NatsConnection {
            client,
            stats: Arc::new(Stats::unobserved()),
            auth_required,
        }
    }

    /// The async-nats client, for anything polybus does not wrap.
    ///
    /// A connection made by [`NatsOptions`] skips the client's own check of publish
    /// subjects (`ConnectOptions::skip_subject_validation`): polybus' producers check each
    /// subject themselves. Check a subject you publish through this client yourself with
    /// [`validate_publish_subject`](crate::validate_publish_subject) where it comes from
    /// outside.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Messages the client dropped because a subscription's buffer was full (slow consumer),
    /// as reported by the client; each report is also logged with `tracing::warn!`.
    ///
    /// A lower bound: async-nats queues its connection events in a channel of 128, so a burst
    /// of drops faster than they are reported is counted in part. Any value above zero means
    /// messages were lost.
    pub fn slow_consumer_drops(&self) -> u64 {
        self.stats.slow_consumers.load(Ordering::Relaxed)
    }

    /// How many times the connection was lost.
    pub fn disconnects(&self) -> u64 {
        self.stats.disconnects.load(Ordering::Relaxed)
    }

    /// How many times the connection was (re)established, the first connection included.
    pub fn connects(&self) -> u64 {
        self.stats.connects.load(Ordering::Relaxed)
    }

    /// Errors the server reported asynchronously (for example a permissions violation on
    /// publish); each is logged with `tracing::warn!`.
    pub fn server_errors(&self) -> u64 {
        self.stats.server_errors.load(Ordering::Relaxed)
    }

    /// The largest message (payload and headers) the server accepts, from its `INFO`.
    pub fn max_payload(&self) -> usize {
        // The client keeps the INFO value in an atomic (updated on every connect); reading
        // `server_info()` instead clones the whole INFO, which cost ~1,300 instructions per
        // publish.
        match self.client.max_payload() {
            0 => self.client.server_info().max_payload,
            n => n,
        }
    }

    /// Waits until the server has processed everything this connection sent before (a round
    /// trip through the server: a request to a subject nobody serves, answered by the server
    /// itself with "no responders").
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] after the request timeout, [`ErrorKind::Closed`] once closed.
    pub async fn round_trip(&self) -> Result<()> {
        self.round_trip_for(error::BACKEND).await
    }

    #[doc(hidden)]
    pub async fn round_trip_for(&self, backend: &'static str) -> Result<()> {
        use async_nats::client::RequestErrorKind;
        let since = self.stats.violations.mark();
        let subject = self.client.new_inbox();
        // A user without permission on the inbox subjects would never get the answer: the
        // server's violation ends the wait instead of the request timeout.
        let inbox = subject
            .rsplit_once('.')
            .map_or_else(|| subject.clone(), |(prefix, _)| format!("{prefix}."));
        let refused = std::pin::pin!(self.stats.violations.wait(
            since,
            |_, s| s == subject || s.starts_with(&inbox),
            backend,
        ));
        let answer = std::pin::pin!(self.client.request(subject.clone(), bytes::Bytes::new()));
        match futures_util::future::select(answer, refused).await {
            futures_util::future::Either::Left((answer, _)) => match answer {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
                Err(e) => Err(error::request(e, backend)),
            },
            futures_util::future::Either::Right((e, _)) => {
                Err(
                    Error::new(ErrorKind::Unauthorized, backend).with_message(format!(
                        "polybus confirms subscriptions and flushes with a request to an unused \
                     inbox subject, and the server refused it: grant this user publish and \
                     subscribe permission on \"_INBOX.>\" ({})",
                        e.message().unwrap_or_default()
                    )),
                )
            }
        }
    }

    /// Permission violations the server reported on this connection so far (each is also
    /// logged with `tracing::warn!` and reported to the call it belongs to, see
    /// [`NatsOptions::check_publish_permissions`]).
    pub fn permission_violations(&self) -> u64 {
        self.stats.violations.mark()
    }

    /// A mark to pass to [`publish_refused`](Self::publish_refused).
    #[doc(hidden)]
    pub fn violation_mark(&self) -> u64 {
        self.stats.violations.mark()
    }

    /// Resolves with an `Unauthorized` error once the server reports (after `since`) that a
    /// publish to `subject` was refused; never resolves otherwise. For racing an
    /// acknowledgement that will not come (JetStream).
    #[doc(hidden)]
    pub async fn publish_refused(&self, subject: &str, since: u64, backend: &'static str) -> Error {
        self.stats
            .violations
            .wait(since, |op, s| op == Op::Publish && s == subject, backend)
            .await
    }

    /// [`publish_refused`](Self::publish_refused) for any subject that starts with `prefix`
    /// (for example `$JS.API.`).
    #[doc(hidden)]
    pub async fn publish_refused_under(
        &self,
        prefix: &str,
        since: u64,
        backend: &'static str,
    ) -> Error {
        self.stats
            .violations
            .wait(
                since,
                |op, s| op == Op::Publish && s.starts_with(prefix),
                backend,
            )
            .await
    }

    /// Fails with `Unauthorized` if the server refused an earlier publish to `subject` and
    /// that was not reported yet.
    pub(crate) fn earlier_publish_refused(
        &self,
        subject: &str,
        backend: &'static str,
    ) -> Result<()> {
        match self
            .stats
            .violations
            .take_for(Op::Publish, subject, 0, backend)
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A round trip through the server, then fails with `Unauthorized` for any publish the
    /// server refused and that was not reported yet (waiting briefly for a late one).
    pub(crate) async fn confirm_publishes(&self, backend: &'static str) -> Result<()> {
        self.round_trip_for(backend).await?;
        if let Some(e) = self.stats.violations.take_publishes(backend) {
            return Err(e);
        }
        let late = self
            .stats
            .violations
            .wait(0, |op, _| op == Op::Publish, backend);
        match tokio::time::timeout(permissions::GRACE, late).await {
            Ok(e) => Err(e),
            Err(_) => Ok(()),
        }
    }

    /// A round trip through the server, then fails with `Unauthorized` if the server refused
    /// `op` on `subject` since `since`. Waits for a late violation only when the server
    /// requires authentication (without it there are no permissions).
    pub(crate) async fn confirm(
        &self,
        op: Op,
        subject: &str,
        since: u64,
        backend: &'static str,
    ) -> Result<()> {
        self.round_trip_for(backend).await?;
        let grace = if self.client.server_info().auth_required {
            permissions::GRACE
        } else {
            std::time::Duration::ZERO
        };
        match self
            .stats
            .violations
            .check(op, subject, since, grace, backend)
            .await
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether the server required authentication when this connection was made (from its
    /// `INFO`). Without it the server has no permissions, so it refuses no publish.
    #[doc(hidden)]
    pub fn auth_required(&self) -> bool {
        self.auth_required
    }

    /// Flushes, then drains the connection (subscriptions get what is in flight, then end) and
    /// waits until it is closed, at most `timeout`. Closing a closed connection is `Ok`.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when buffered messages could not be written in time (for
    /// example while the server is unreachable).
    pub async fn close(&self, timeout: Duration) -> Result<()> {
        self.close_for(timeout, error::BACKEND).await
    }

    #[doc(hidden)]
    pub async fn close_for(&self, timeout: Duration, backend: &'static str) -> Result<()> {
        if *self.stats.closed.borrow() {
            return Ok(());
        }
        self.flush_for(timeout, backend).await?;
        let mut closed = self.stats.closed.subscribe();
        if self.client.drain().await.is_err() || !self.stats.observed {
            // The command channel is gone (already closed), or the events of this client are
            // not observed (`from_client`) so the end of the drain cannot be awaited.
            return Ok(());
        }
        match tokio::time::timeout(timeout, closed.wait_for(|c| *c)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::new(ErrorKind::Timeout, backend)
                .with_message(format!("the connection did not drain within {timeout:?}"))),
        }
    }

    /// Waits until every message published so far is written to the server socket, at most
    /// `timeout`.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] (the messages stay buffered and go out after a reconnect),
    /// [`ErrorKind::Closed`] once closed.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.flush_for(timeout, error::BACKEND).await
    }

    #[doc(hidden)]
    pub async fn flush_for(&self, timeout: Duration, backend: &'static str) -> Result<()> {
        match tokio::time::timeout(timeout, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(error::flush(e, backend)),
            Err(_) => Err(Error::new(ErrorKind::Timeout, backend)
                .with_message(format!("buffered messages not written within {timeout:?}"))),
        }
    }

    /// Whether the connection was closed (by `close` or by giving up reconnecting).
    pub fn is_closed(&self) -> bool {
        *self.stats.closed.borrow()
    }
}

#[derive(Debug)]
struct Stats {
    slow_consumers: AtomicU64,
    disconnects: AtomicU64,
    connects: AtomicU64,
    server_errors: AtomicU64,
    closed: watch::Sender<bool>,
    observed: bool,
    violations: Violations,
}

impl Stats {
    fn new() -> Self {
        Stats {
            slow_consumers: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            closed: watch::Sender::new(false),
            observed: true,
            violations: Violations::default(),
        }
    }

    fn unobserved() -> Self {
        Stats {
            observed: false,
            ..Stats::new()
        }
    }

    fn record(&self, event: NatsEvent) {
        match event {
            NatsEvent::Connected => {
                let n = self.connects.fetch_add(1, Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(reconnects = n, "nats: reconnected; subscriptions restored");
                }
            }
            NatsEvent::Disconnected => {
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("nats: disconnected; reconnecting, publishes are buffered");
            }
            NatsEvent::SlowConsumer(sid) => {
                let total = self.slow_consumers.fetch_add(1, Ordering::Relaxed) + 1;
                polybus_core::metrics::record_slow_consumer_drops("nats", 1);
                tracing::warn!(
                    sid,
                    total,
                    "nats: slow consumer, a message was dropped because the subscription buffer is full"
                );
            }
            NatsEvent::ServerError(e) => {
                self.server_errors.fetch_add(1, Ordering::Relaxed);
                if let async_nats::ServerError::Other(text) = &e {
                    self.violations.record(text);
                }
                tracing::warn!(error = %e, "nats: server error");
            }
            NatsEvent::ClientError(e) => tracing::warn!(error = %e, "nats: client error"),
            NatsEvent::LameDuckMode => {
                tracing::warn!("nats: server entered lame duck mode, it will shut down soon")
            }
            NatsEvent::Draining => tracing::debug!("nats: draining"),
            NatsEvent::Closed => {
                tracing::debug!("nats: connection closed");
                self.closed.send_replace(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let o = NatsOptions::new("nats://alice:pw1@127.0.0.1:4222,nats://bob:pw2@h2:4222")
            .user_password("u", "hunter2")
            .token("tok-secret");
        let s = format!("{o:?}");
        for secret in ["pw1", "pw2", "hunter2", "tok-secret", "alice", "bob"] {
            assert!(!s.contains(secret), "{secret} leaked in {s}");
        }
        assert!(s.contains("127.0.0.1:4222"), "{s}");
        let o = NatsOptions::new("n").nkey("SUASEED");
        assert!(!format!("{o:?}").contains("SUASEED"));
    }

    #[test]
    fn url_credentials_are_taken_out_of_the_url() {
        let (clean, auth) = split_url_credentials("nats://u:p%40ss@h:1/x,nats://tok@h2:2");
        assert_eq!(clean, "nats://h:1/x,nats://h2:2");
        assert!(matches!(auth, Some(UrlAuth::UserPassword(u, p)) if u == "u" && p == "p@ss"));
        let (clean, auth) = split_url_credentials("tls://s3cr3t@h:1");
        assert_eq!(clean, "tls://h:1");
        assert!(matches!(auth, Some(UrlAuth::Token(t)) if t == "s3cr3t"));
        let (clean, auth) = split_url_credentials("nats://127.0.0.1:4222, h2:4222");
        assert_eq!(clean, "nats://127.0.0.1:4222,h2:4222");
        assert!(auth.is_none());
        assert_eq!(percent_decode_lossy("a%zz%4"), "a%zz%4");
    }

    #[test]
    fn redacts_only_userinfo() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("nats://u:p@h:1"), "nats://***@h:1");
        assert_eq!(redact_url("u:p@h:1"), "***@h:1");
    }
}
