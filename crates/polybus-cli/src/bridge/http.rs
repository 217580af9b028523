//! /healthz, /readyz and /metrics over every route of the bridge.
//!
//! `polybus_runtime::http::HealthServer` serves one app's health; a bridge runs an app per
//! route, so this answers for all of them (live: every route is; ready: every route is),
//! with the same small, bounded HTTP/1.1 (one GET, one answer, connection closed).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use polybus_runtime::Health;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Server {
    healths: Arc<Vec<Health>>,
    metrics: Render,
}

impl Server {
    pub(crate) fn new(
        healths: Vec<Health>,
        metrics: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        Server {
            healths: Arc::new(healths),
            metrics: Arc::new(metrics),
        }
    }

    pub(crate) async fn serve(
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
            let stream = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
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
                return respond(&mut stream, 431, "request too large\n", false).await;
            }
        }
        let head = String::from_utf8_lossy(&buf);
        let mut parts = head.lines().next().unwrap_or("").split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        if method != "GET" {
            return respond(&mut stream, 405, "GET only\n", false).await;
        }
        let states: Vec<String> = self
            .healths
            .iter()
            .map(|h| format!("{:?}", h.status()))
            .collect();
        let states = states.join(" ");
        match path {
            "/healthz" if self.healths.iter().all(Health::is_live) => {
                respond(&mut stream, 200, &format!("ok {states}\n"), false).await
            }
            "/healthz" => respond(&mut stream, 503, &format!("{states}\n"), false).await,
            "/readyz" if self.healths.iter().all(Health::is_ready) => {
                respond(&mut stream, 200, "ready\n", false).await
            }
            "/readyz" => respond(&mut stream, 503, &format!("not ready: {states}\n"), false).await,
            "/metrics" => respond(&mut stream, 200, &(self.metrics)(), true).await,
            _ => respond(&mut stream, 404, "not found\n", false).await,
        }
    }
}

async fn respond(stream: &mut TcpStream, code: u16, body: &str, metrics: bool) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let content_type = if metrics {
        "text/plain; version=0.0.4"
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
