//! TLS and mutual TLS against an own nats-server with certificates made by `openssl`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_nats::NatsOptions;
use polybus_testkit::brokers::BrokerProcess;

/// Makes `ca.pem`, `server.pem`/`server-key.pem` (for 127.0.0.1) and
/// `client.pem`/`client-key.pem`, all signed by the CA, in `dir`.
fn make_certs(dir: &Path) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=polybus-test-ca",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    ])?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=polybus-{name}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            &format!("{name}.pem"),
        ])?;
    }
    Ok(())
}

async fn round_trip(opts: NatsOptions) -> anyhow::Result<()> {
    let consumer = opts.clone().consumer().await?;
    let producer = opts.producer().await?;
    let mut s = std::pin::pin!(consumer.subscribe("tls.check"));
    let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
    producer.publish("tls.check", Event::new("secret")).await?;
    let d = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .expect("open")?;
    assert_eq!(d.payload(), b"secret");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn tls_with_own_ca_and_mutual_tls() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    make_certs(certs.path())?;
    let p = |f: &str| certs.path().join(f);

    // Server TLS: trusting the CA works; not trusting it is a connection error.
    let server = BrokerProcess::nats(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        p("server.pem").display(),
        p("server-key.pem").display()
    ))
    .await?;
    let opts = NatsOptions::new(server.url())
        .tls_root_certificates(p("ca.pem"))
        .require_tls(true);
    round_trip(opts).await?;
    let e = NatsOptions::new(server.url())
        .require_tls(true)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Connect,
        "untrusted server certificate: {e}"
    );

    // Mutual TLS: the server verifies client certificates.
    let mtls = BrokerProcess::nats(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
        p("server.pem").display(),
        p("server-key.pem").display(),
        p("ca.pem").display()
    ))
    .await?;
    let with_cert = NatsOptions::new(mtls.url())
        .tls_root_certificates(p("ca.pem"))
        .tls_client_certificate(p("client.pem"), p("client-key.pem"))
        .require_tls(true);
    round_trip(with_cert).await?;
    let without = NatsOptions::new(mtls.url())
        .tls_root_certificates(p("ca.pem"))
        .require_tls(true)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(without.kind(), ErrorKind::Connect | ErrorKind::Unauthorized),
        "no client certificate: {without}"
    );
    Ok(())
}
