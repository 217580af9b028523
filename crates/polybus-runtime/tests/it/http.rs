//! The health server (feature `http`): liveness and readiness follow the app's life, and
//! `/metrics` serves the runtime's metrics through a Prometheus recorder.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use polybus_core::Event;
use polybus_runtime::http::HealthServer;
use polybus_runtime::{App, Settlement, TestApp};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another test of this binary may have installed one already: then ours renders
            // nothing, and the test says so.
            metrics::set_global_recorder(recorder).expect("the first recorder of this process");
            handle
        })
        .clone()
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

#[tokio::test]
async fn healthz_readyz_and_metrics_follow_the_app() {
    let handle = recorder();
    async fn handle_event() {}
    let app = App::new().route("orders", handle_event);
    let health = app.health();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        HealthServer::new(health.clone())
            .metrics(move || handle.render())
            .serve(listener, async move {
                let _ = server_stopped.await;
            }),
    );

    // Not started: alive, not ready.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 503);

    let mut t = TestApp::start(app).await.unwrap();
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
    let ev = Event::new(b"x");
    let id = ev.id().to_owned();
    t.publish("orders", ev).await.unwrap();
    assert_eq!(
        t.settled(&id).await.unwrap().settlement(),
        &Settlement::Acked
    );

    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let acked = body
        .lines()
        .find(|l| l.starts_with("polybus_runtime_settled_total{outcome=\"acked\"}"))
        .unwrap_or_else(|| panic!("no acked counter in:\n{body}"));
    let n: f64 = acked.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0);
    assert!(
        body.contains("polybus_runtime_handler_duration_seconds"),
        "{body}"
    );
    // Every sample line is `name{labels} value` (the text format's shape).
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
    prometheus_parse(&body);

    assert_eq!(get(addr, "/nope").await.0, 404);
    t.stop().await.unwrap();
    assert_eq!(get(addr, "/healthz").await.0, 503);
    assert_eq!(get(addr, "/readyz").await.0, 503);
    let _ = stop_server.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Parses `body` with a real Prometheus text-format parser: `prometheus_client`'s
/// `text_string_to_metric_families` in the venv Python `POLYBUS_PYTHON` names (`cargo xtask
/// test` exports it and installs the package, so there a missing parser fails the test).
/// Without `POLYBUS_PYTHON` (a plain `cargo test`) it says so and checks nothing more.
fn prometheus_parse(body: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    let Some(python) = std::env::var_os("POLYBUS_PYTHON") else {
        eprintln!("POLYBUS_PYTHON not set: /metrics not checked with prometheus_client's parser");
        return;
    };
    const SCRIPT: &str = "import sys
from prometheus_client.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.stdin.read()):
    print(f.name, f.type, len(f.samples))
";
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {python:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "prometheus_client could not parse /metrics (is prometheus-client installed in the \
         venv? `cargo xtask test` installs it): {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Vec<(&str, &str)> = stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            Some((w.next()?, w.next()?))
        })
        .collect();
    assert!(
        families.contains(&("polybus_runtime_settled", "counter")),
        "families parsed: {families:?}"
    );
    assert!(
        families
            .iter()
            .any(|(name, _)| *name == "polybus_runtime_handler_duration_seconds"),
        "families parsed: {families:?}"
    );
}

/// One server for several apps (`HealthServer::with`): ready only when every app is, and the
/// bodies list each app's status in order.
#[tokio::test]
async fn one_server_answers_for_several_apps() {
    async fn handle_event() {}
    let running = App::new().route("orders", handle_event);
    let idle = App::new().route("payments", handle_event);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HealthServer::new(running.health()).with(idle.health());
    tokio::spawn(server.serve(listener, std::future::pending()));

    let _t = TestApp::start(running).await.unwrap();
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body, "not ready: Running Starting\n");
    assert_eq!(
        get(addr, "/healthz").await,
        (200, "ok Running Starting\n".to_owned())
    );

    let _u = TestApp::start(idle).await.unwrap();
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
}
