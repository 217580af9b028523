//! Kafka security against tansu.
//!
//! * tansu 0.6.0 does not serve TLS (see [`security_tansu_0_6_does_not_serve_tls`]), so the
//!   TLS and mutual-TLS tests put a TLS-terminating proxy (rustls, certificates from
//!   `polybus_testkit::tls`) in front of a plaintext tansu that advertises the proxy: librdkafka
//!   speaks real TLS with server verification (CA and host name) and client certificates.
//! * SASL: SCRAM-SHA-256/512 are checked by tansu; PLAIN is not offered by tansu 0.6.0.
//! * Topic permissions: tansu accepts CreateAcls and enforces nothing, so refused topics are
//!   tested with MockCluster-injected errors (errors.rs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use polybus_core::{ErrorKind, Event};
use polybus_kafka::{KafkaConfig, KafkaProducer, SaslMechanism};
use polybus_testkit::brokers::{BrokerProcess, Readiness, TansuStorage};
use polybus_testkit::tls::TestPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::common::{test_config, topic};

/// Refusals must come back within this bound (the connect timeout is 2 s): no retry loop.
const FAIL_FAST: Duration = Duration::from_secs(6);

/// Terminates TLS on a port of its own and forwards the plaintext to `upstream`.
struct TlsProxy {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl TlsProxy {
    fn start(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        upstream: u16,
    ) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let config = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)? {
                    roots.add(c?)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        }
        .with_single_cert(certs, key)?;
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (config, flag) = (config.clone(), flag.clone());
                        std::thread::spawn(move || pipe(client, config, upstream, &flag));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(TlsProxy { port, stop })
    }
}

/// Shuttles bytes between the TLS client and the plaintext upstream (non-blocking sockets,
/// polled; a test proxy, not a fast one).
fn pipe(
    mut client: TcpStream,
    config: Arc<rustls::ServerConfig>,
    upstream: u16,
    stop: &AtomicBool,
) {
    let Ok(mut tls) = rustls::ServerConnection::new(config) else {
        return;
    };
    if client.set_nonblocking(true).is_err() {
        return;
    }
    let mut up: Option<TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let mut progress = false;
        match tls.read_tls(&mut client) {
            Ok(0) => return,
            Ok(_) => {
                progress = true;
                if tls.process_new_packets().is_err() {
                    // Send the alert (unknown CA, certificate required, ...), then close.
                    let _ = tls.write_tls(&mut client);
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        if !tls.is_handshaking() && up.is_none() {
            let Ok(u) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let _ = u.set_nodelay(true);
            if u.set_nonblocking(true).is_err() {
                return;
            }
            up = Some(u);
        }
        if let Some(u) = up.as_mut() {
            loop {
                match tls.reader().read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        progress = true;
                        if write_all(u, &buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            match u.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    progress = true;
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        while tls.wants_write() {
            match tls.write_tls(&mut client) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn write_all(s: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A plaintext tansu that advertises a TLS proxy in front of it, and the proxy.
async fn tansu_behind_tls(
    pki: &TestPki,
    cert: &str,
    key: &str,
    verify_clients: bool,
) -> anyhow::Result<(BrokerProcess, TlsProxy)> {
    let mut broker = BrokerProcess::tansu(TansuStorage::Memory).await?;
    let proxy = TlsProxy::start(
        &pki.path(cert),
        &pki.path(key),
        verify_clients.then(|| pki.ca()).as_deref(),
        broker.port(),
    )?;
    let args = broker.args_mut();
    let at = args
        .iter()
        .position(|a| a == "--advertised-listener-url")
        .context("tansu args")?;
    args[at + 1] = format!("tcp://127.0.0.1:{}", proxy.port);
    broker.restart().await?;
    Ok((broker, proxy))
}

fn tls_config(port: u16) -> KafkaConfig {
    test_config(&format!("127.0.0.1:{port}"), "sec")
        .with_connect_timeout(Duration::from_secs(2))
        .set("message.timeout.ms", "5000")
}

async fn publish_refused(cfg: &KafkaConfig, kind: ErrorKind, what: &str) -> anyhow::Result<String> {
    publish_refused_within(cfg, kind, what, FAIL_FAST).await
}

async fn publish_refused_within(
    cfg: &KafkaConfig,
    kind: ErrorKind,
    what: &str,
    bound: Duration,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let p = KafkaProducer::new_with_config(cfg)?;
    let e = p
        .publish(&topic("sec"), Event::new("x"))
        .await
        .expect_err(what);
    ensure!(e.kind() == kind, "{what}: expected {kind:?}, got {e}");
    ensure!(
        started.elapsed() < bound,
        "{what}: took {:?}",
        started.elapsed()
    );
    println!("{what} ({:?}): {e}", started.elapsed());
    Ok(e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_tls_server_verification() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let (_broker, proxy) = tansu_behind_tls(&pki, "server.pem", "server-key.pem", false).await?;
    let ca = pki.ca().display().to_string();

    // Trusting the CA: records go through TLS.
    let p = KafkaProducer::new_with_config(&tls_config(proxy.port).with_tls_ca(&ca))?;
    let t = topic("sec-tls");
    let r = p.publish(&t, Event::new("over tls")).await?;
    ensure!(r.partition().is_some(), "{r:?}");

    // An unrelated CA: Connect, naming TLS and the certificate.
    let text = publish_refused(
        &tls_config(proxy.port).with_tls_ca(pki.other_ca().display().to_string()),
        ErrorKind::Connect,
        "unrelated CA",
    )
    .await?;
    ensure!(
        text.contains("TLS") && text.contains("certificate"),
        "{text}"
    );

    // Plaintext against the TLS port: Connect.
    publish_refused(
        &tls_config(proxy.port),
        ErrorKind::Connect,
        "plaintext to TLS",
    )
    .await?;

    // A certificate of our CA for another host name: refused (librdkafka verifies the
    // broker's name, `ssl.endpoint.identification.algorithm=https`).
    let (_b2, wrong) =
        tansu_behind_tls(&pki, "wrong-host.pem", "wrong-host-key.pem", false).await?;
    let text = publish_refused(
        &tls_config(wrong.port).with_tls_ca(&ca),
        ErrorKind::Connect,
        "certificate for another host",
    )
    .await?;
    ensure!(text.contains("TLS"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_mutual_tls() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let (_broker, proxy) = tansu_behind_tls(&pki, "server.pem", "server-key.pem", true).await?;
    let ca = pki.ca().display().to_string();
    let cfg = tls_config(proxy.port)
        .with_tls_ca(&ca)
        .with_tls_client_cert(
            pki.client_cert().display().to_string(),
            pki.client_key().display().to_string(),
            None,
        );
    let p = KafkaProducer::new_with_config(&cfg)?;
    p.publish(&topic("sec-mtls"), Event::new("mtls")).await?;

    for (what, cfg) in [
        (
            "no client certificate",
            tls_config(proxy.port).with_tls_ca(&ca),
        ),
        (
            "client certificate of another CA",
            tls_config(proxy.port)
                .with_tls_ca(&ca)
                .with_tls_client_cert(
                    pki.other_client_cert().display().to_string(),
                    pki.other_client_key().display().to_string(),
                    None,
                ),
        ),
    ] {
        let text = publish_refused(&cfg, ErrorKind::Unauthorized, what).await?;
        ensure!(text.contains("TLS"), "{what}: {text}");
    }
    Ok(())
}

/// What tansu 0.6.0 does with its TLS flags, pinned so a fixed tansu shows up: `--cert` and
/// `--key` together are refused by its command line (both are in one exclusive clap group),
/// and with `--cert` alone the broker starts but serves plaintext (the TLS acceptor it builds
/// is never used), so librdkafka's TLS handshake fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_tansu_0_6_does_not_serve_tls() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let (cert, key) = (
        pki.server_cert().display().to_string(),
        pki.server_key().display().to_string(),
    );
    let both = BrokerProcess::tansu_with(
        TansuStorage::Memory,
        &["--cert", &cert, "--key", &key],
        Readiness::TcpAccept,
    )
    .await
    .expect_err("tansu 0.6.0 refuses --cert with --key");
    let text = format!("{both:#}");
    ensure!(text.contains("cannot be used with"), "{text}");

    let cert_only = BrokerProcess::tansu_with(
        TansuStorage::Memory,
        &["--cert", &cert],
        Readiness::Protocol,
    )
    .await
    .context("tansu --cert alone answers plaintext ApiVersions")?;
    // The handshake hangs (tansu waits for a Kafka frame): the connect timeout, then a
    // 3 s diagnostic probe that learns nothing.
    publish_refused_within(
        &tls_config(cert_only.port()).with_tls_ca(pki.ca().display().to_string()),
        ErrorKind::Connect,
        "TLS client against tansu --cert",
        Duration::from_secs(12),
    )
    .await?;
    let p = KafkaProducer::new_with_config(&tls_config(cert_only.port()))?;
    p.publish(&topic("sec-plain"), Event::new("plaintext"))
        .await?;
    Ok(())
}

async fn tansu_with_users(users: &[(&str, &str, &str)]) -> anyhow::Result<BrokerProcess> {
    let mut broker = BrokerProcess::tansu(TansuStorage::Sqlite).await?;
    let tansu = polybus_testkit::brokers::cache_dir().join("tansu/bin/tansu");
    for (mechanism, user, password) in users {
        let out = tokio::process::Command::new(&tansu)
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", broker.port()))
            .args(["--mechanism", mechanism, user, password])
            .output()
            .await?;
        ensure!(out.status.success(), "tansu user create: {out:?}");
    }
    broker.kill().await;
    broker.args_mut().push("--authentication".into());
    broker.start().await?;
    Ok(broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_sasl_scram_and_plain() -> anyhow::Result<()> {
    let broker = tansu_with_users(&[
        ("scram256", "bob", "b0b-pw"),
        ("scram512", "alice", "s3cret"),
    ])
    .await?;
    let cfg = |mechanism, user: &str, pw: &str| {
        test_config(&broker.url(), "sec")
            .with_sasl(mechanism, user, pw)
            .with_connect_timeout(Duration::from_secs(2))
    };
    // The right credentials, both SCRAM variants.
    for (m, u, pw) in [
        (SaslMechanism::ScramSha512, "alice", "s3cret"),
        (SaslMechanism::ScramSha256, "bob", "b0b-pw"),
    ] {
        KafkaProducer::new_with_config(&cfg(m, u, pw))?
            .publish(&topic("sec-sasl"), Event::new("in"))
            .await
            .with_context(|| format!("{m:?} {u}"))?;
    }
    // Wrong ones: Unauthorized, promptly, without the password in the error.
    for (what, c) in [
        (
            "SCRAM-512 wrong password",
            cfg(SaslMechanism::ScramSha512, "alice", "wrong-pw"),
        ),
        (
            "SCRAM-512 unknown user",
            cfg(SaslMechanism::ScramSha512, "eve", "s3cret"),
        ),
        (
            "SCRAM-256 wrong password",
            cfg(SaslMechanism::ScramSha256, "bob", "wrong-pw"),
        ),
        (
            "SCRAM-256 for a SCRAM-512 user",
            cfg(SaslMechanism::ScramSha256, "alice", "s3cret"),
        ),
    ] {
        let text = publish_refused(&c, ErrorKind::Unauthorized, what).await?;
        ensure!(!text.contains("wrong-pw"), "{text}");
    }
    // No credentials at all against --authentication: refused too (Connect or Unauthorized:
    // tansu closes the connection).
    let p = KafkaProducer::new_with_config(
        &test_config(&broker.url(), "sec").with_connect_timeout(Duration::from_secs(2)),
    )?;
    let e = p
        .publish(&topic("sec-anon"), Event::new("x"))
        .await
        .expect_err("anonymous");
    println!("no credentials: {e}");
    ensure!(
        matches!(e.kind(), ErrorKind::Connect | ErrorKind::Unauthorized),
        "{e}"
    );

    // PLAIN: tansu 0.6.0 does not offer it (the SASL handshake answers that the mechanism is
    // not supported), so PLAIN cannot be used with tansu; polybus reports Unauthorized.
    let text = publish_refused(
        &cfg(SaslMechanism::Plain, "alice", "s3cret"),
        ErrorKind::Unauthorized,
        "PLAIN against tansu",
    )
    .await?;
    ensure!(text.contains("PLAIN"), "{text}");
    Ok(())
}
