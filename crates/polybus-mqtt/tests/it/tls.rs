//! TLS (rustls with ring) against a mosquitto of our own with certificates made by openssl:
//! server authentication, mutual TLS, and the refusals.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use polybus_core::ErrorKind;
use polybus_mqtt::{MqttConfig, Protocol, TlsOptions};
use polybus_testkit::brokers::free_port;

use crate::support::{self, OwnMosquitto};

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all P-256.
fn make_pki(dir: &Path, ca: &str) -> anyhow::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_key = format!("{ca}.key");
    let ca_crt = format!("{ca}.crt");
    let mut args = vec!["req", "-x509", "-days", "1", "-subj", "/CN=polybus test CA"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    openssl(dir, &args)?;
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let (key, csr, crt, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN=polybus-{name}");
        let mut args = vec!["req", "-subj", &subj, "-keyout", &key, "-out", &csr];
        args.extend(ec);
        openssl(dir, &args)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-extfile",
                &extf,
            ],
        )?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn tls_and_mutual_tls_against_mosquitto() -> anyhow::Result<()> {
    let (tls_port, mtls_port) = (free_port()?, free_port()?);
    let broker = OwnMosquitto::start(
        |dir| {
            make_pki(dir, "ca")?;
            make_pki(&{
                let other = dir.join("other");
                std::fs::create_dir_all(&other)?;
                other
            }, "ca")?;
            let d = dir.display();
            Ok(format!(
                "allow_anonymous true\n\
                 listener {tls_port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n\
                 listener {mtls_port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n\
                 require_certificate true\n"
            ))
        },
        mtls_port,
    )
    .await?;
    let dir = broker.dir.path();
    let read = |f: &str| std::fs::read(dir.join(f));
    let (ca, client_crt, client_key) = (read("ca.crt")?, read("client.crt")?, read("client.key")?);
    let other_ca = read("other/ca.crt")?;
    let cfg = |port: u16, protocol: Protocol| {
        MqttConfig::new("127.0.0.1", port, support::client_id("tls"))
            .protocol(protocol)
            .connect_timeout(Duration::from_secs(5))
    };

    // Server authentication, both protocol versions: a round trip works.
    for protocol in [Protocol::V5, Protocol::V311] {
        let client = cfg(tls_port, protocol)
            .tls(TlsOptions::new().ca_pem(&ca))
            .connect()
            .await?;
        let topic = support::topic();
        let mut c = client.consumer();
        c.subscribe(&topic, 1).await?;
        client.producer().publish(&topic, b"over tls", 1).await?;
        let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
        assert_eq!(d.payload(), b"over tls");
        d.ack().await?;
        client.close().await?;
    }

    // A server certificate from a CA we do not trust is refused.
    let e = cfg(tls_port, Protocol::V5)
        .tls(TlsOptions::new().ca_pem(&other_ca))
        .connect()
        .await
        .expect_err("untrusted server");
    assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    println!("untrusted server: {e}");

    // Mutual TLS: with the client certificate it works, without it the broker refuses.
    let client = cfg(mtls_port, Protocol::V5)
        .tls(
            TlsOptions::new()
                .ca_pem(&ca)
                .client_auth_pem(client_crt, client_key),
        )
        .connect()
        .await?;
    client
        .producer()
        .publish(&support::topic(), b"mtls", 1)
        .await?;
    client.close().await?;
    let e = cfg(mtls_port, Protocol::V5)
        .tls(TlsOptions::new().ca_pem(&ca))
        .connect()
        .await
        .expect_err("no client certificate");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    println!("no client certificate: {e}");
    Ok(())
}
