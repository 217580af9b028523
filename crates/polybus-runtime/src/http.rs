//! A small HTTP server for health checks and scrapes (feature `http`): `/healthz` (liveness),
//! `/readyz` (readiness: subscribed to every route's topic) and `/metrics` (the text a
//! renderer you give returns, for example a Prometheus exporter's).
//!
//! It speaks just enough HTTP/1.1 for probes and scrapers (a `GET`, one response, the
//! connection closed); requests are bounded in size, time and number at once.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::Health;

type Render = Arc<dyn Fn() -> String + Send + Sync>;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

/// Serves an app's [`Health`] over HTTP.
///
/// ```no_run
/// use polybus_runtime::App;
/// use polybus_runtime::http::HealthServer;
/// # async fn handle() {}
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let app = App::new().route("orders", handle);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
/// let server = HealthServer::new(app.health())
///     .metrics(|| "# no metrics yet\n".to_owned());
/// tokio::spawn(server.serve(listener, std::future::pending()));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HealthServer {
    /// One per app; live and ready when every one is.
    healths: Arc<[Health]>,
    metrics: Option<Render>,
}

impl std::fmt::Debug for HealthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthServer")
            .field("healths", &self.healths)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

impl HealthServer {
    /// Serves `health`; `/metrics` answers 404 until [`metrics`](Self::metrics) is set.
    pub fn new(health: Health) -> Self {
        HealthServer {
            healths: Arc::new([health]),
            metrics: None,
        }
    }

    /// Answers for another app too (a process that runs several, like `polybus bridge` with
    /// an app per route): `/healthz` and `/readyz` say yes when every app is live or ready,
    /// and their bodies list each app's status in the order added.
    ///
    /// ```
    /// use polybus_runtime::App;
    /// use polybus_runtime::http::HealthServer;
    /// # async fn handle() {}
    /// # #[tokio::main] async fn main() -> std::io::Result<()> {
    /// let orders = App::new().route("orders", handle);
    /// let payments = App::new().route("payments", handle);
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let server = HealthServer::new(orders.health()).with(payments.health());
    /// tokio::spawn(server.serve(listener, std::future::pending()));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with(self, health: Health) -> Self {
        let mut healths = self.healths.to_vec();
        healths.push(health);
        HealthServer {
            healths: healths.into(),
            ..self
        }
    }

    /// `/metrics` answers with what `render` returns, as the Prometheus text format
    /// (`metrics_exporter_prometheus::PrometheusHandle::render` fits).
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Answers requests on `listener` until `shutdown` resolves.
    ///
    /// # Errors
    /// Accepting failed for a reason other than a connection reset.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => return Ok(()),
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
            };
            let (stream, _) = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => continue,
                    Err(e) => return Err(e),
                },
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, this.answer(stream)).await;
            });
        }
    }

    async fn answer(&self, mut stream: TcpStream) -> io::Result<()> {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_REQUEST {
                return respond(&mut stream, 431, "text/plain", "request too large\n").await;
            }
        }
        let head = String::from_utf8_lossy(&buf);
        let mut parts = head.lines().next().unwrap_or("").split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        if method != "GET" && method != "HEAD" {
            return respond(&mut stream, 405, "text/plain", "GET only\n").await;
        }
        let status = self
            .healths
            .iter()
            .map(|h| format!("{:?}", h.status()))
            .collect::<Vec<_>>()
            .join(" ");
        match path {
            "/healthz" if self.healths.iter().all(Health::is_live) => {
                respond(&mut stream, 200, "text/plain", &format!("ok {status}\n")).await
            }
            "/healthz" => respond(&mut stream, 503, "text/plain", &format!("{status}\n")).await,
            "/readyz" if self.healths.iter().all(Health::is_ready) => {
                respond(&mut stream, 200, "text/plain", "ready\n").await
            }
            "/readyz" => {
                respond(
                    &mut stream,
                    503,
                    "text/plain",
                    &format!("not ready: {status}\n"),
                )
                .await
            }
            "/metrics" => match &self.metrics {
                Some(render) => {
                    let body = render();
                    respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
                }
                None => respond(&mut stream, 404, "text/plain", "no metrics renderer\n").await,
            },
            _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
