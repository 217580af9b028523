//! Security against own mosquitto brokers: TLS (rustls with *ring*) and mutual TLS with a
//! generated PKI (`polybus_testkit::tls`), and topic permissions from an `acl_file`: a publish
//! or subscription outside the grant is `Unauthorized` on that call, where the protocol lets
//! the broker say so.

use std::time::{Duration, Instant};

use polybus_core::{Consumer, ErrorKind, Publisher};
use polybus_mqtt::{MqttClient, MqttConfig, Protocol, QoS, TlsOptions};
use polybus_testkit::brokers::{self, BrokerProcess, Readiness, retry};
use polybus_testkit::tls::TestPki;

use crate::support;

/// Refusals must come back this fast: no retry loop.
const FAIL_FAST: Duration = Duration::from_secs(5);

/// A mosquitto whose TLS listener presents `cert` and `key` of the test PKI, and with
/// `require_certificate` also wants a client certificate of its CA.
async fn tls_broker(
    pki: &TestPki,
    cert: &str,
    key: &str,
    require_certificate: bool,
) -> anyhow::Result<BrokerProcess> {
    let mut conf = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        pki.ca().display(),
        pki.path(cert).display(),
        pki.path(key).display()
    );
    if require_certificate {
        conf.push_str("require_certificate true\n");
    }
    BrokerProcess::mosquitto_with(&conf, Readiness::TcpAccept).await
}

fn config(port: u16, protocol: Protocol) -> MqttConfig {
    MqttConfig::new("127.0.0.1", port, support::client_id("sec"))
        .protocol(protocol)
        .connect_timeout(Duration::from_secs(3))
}

/// Over MQTT 5 and then 3.1.1: connects to `port` with `tls` (retrying while the broker
/// starts) and makes a QoS 1 round trip.
async fn round_trips_over_tls(port: u16, tls: &TlsOptions) -> anyhow::Result<()> {
    for protocol in [Protocol::V5, Protocol::V311] {
        let client = retry(FAIL_FAST, || {
            config(port, protocol).tls(tls.clone()).connect()
        })
        .await?;
        round_trip(&client).await?;
        client.close().await?;
    }
    Ok(())
}

/// A QoS 1 round trip on one client.
async fn round_trip(client: &MqttClient) -> anyhow::Result<()> {
    let topic = support::topic();
    let mut c = client.consumer();
    c.subscribe(&topic, 1).await?;
    client.producer().publish(&topic, b"over tls", 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"over tls");
    d.ack().await?;
    Ok(())
}

/// Connects with `cfg` and expects a failure of `kind` within [`FAIL_FAST`].
async fn refused(cfg: MqttConfig, kind: ErrorKind, what: &str) -> polybus_core::Error {
    brokers::refused(cfg.connect(), kind, what, FAIL_FAST).await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_tls_server_verification() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let broker = tls_broker(&pki, "server.pem", "server-key.pem", false).await?;
    let ca = pki.read("ca.pem")?;
    round_trips_over_tls(broker.port(), &TlsOptions::new().ca_pem(&ca)).await?;
    // The certificate names localhost too.
    let client = MqttConfig::new("localhost", broker.port(), support::client_id("sec"))
        .tls(TlsOptions::new().ca_pem(&ca))
        .connect()
        .await?;
    client.close().await?;

    // A CA we do not trust: refused, naming TLS and the certificate.
    let e = refused(
        config(broker.port(), Protocol::V5)
            .tls(TlsOptions::new().ca_pem(pki.read("other-ca.pem")?)),
        ErrorKind::Connect,
        "unrelated CA",
    )
    .await;
    let text = e.to_string();
    assert!(
        text.contains("TLS") && text.contains("certificate"),
        "{text}"
    );

    // A certificate of our CA for another host name: refused (server name verification).
    let wrong_host = tls_broker(&pki, "wrong-host.pem", "wrong-host-key.pem", false).await?;
    let e = refused(
        config(wrong_host.port(), Protocol::V5).tls(TlsOptions::new().ca_pem(&ca)),
        ErrorKind::Connect,
        "certificate for another host",
    )
    .await;
    assert!(
        e.to_string().contains("TLS") && e.to_string().contains("certificate"),
        "{e}"
    );

    // Plaintext MQTT against the TLS listener does not get through.
    let e = config(broker.port(), Protocol::V5)
        .connect()
        .await
        .expect_err("plaintext to a TLS port");
    assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_mutual_tls() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let broker = tls_broker(&pki, "server.pem", "server-key.pem", true).await?;
    let ca = pki.read("ca.pem")?;
    let tls = TlsOptions::new()
        .ca_pem(&ca)
        .client_auth_pem(pki.read("client.pem")?, pki.read("client-key.pem")?);
    round_trips_over_tls(broker.port(), &tls).await?;
    for (what, tls) in [
        ("no client certificate", TlsOptions::new().ca_pem(&ca)),
        (
            "client certificate of another CA",
            TlsOptions::new().ca_pem(&ca).client_auth_pem(
                pki.read("other-client.pem")?,
                pki.read("other-client-key.pem")?,
            ),
        ),
    ] {
        let e = refused(
            config(broker.port(), Protocol::V5).tls(tls),
            ErrorKind::Unauthorized,
            what,
        )
        .await;
        assert!(e.to_string().contains("client certificate"), "{what}: {e}");
    }
    Ok(())
}

/// A broker with an `acl_file`: `limited` may read and write `allowed/#` and only read
/// `readonly/#`; `admin` may do everything.
async fn acl_file_broker() -> anyhow::Result<BrokerProcess> {
    let dir = tempfile::tempdir()?;
    let passwd = dir.path().join("passwd");
    for (i, user) in ["limited", "admin"].iter().enumerate() {
        let mut cmd = std::process::Command::new("/usr/bin/mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd.arg("-b").arg(&passwd).args([user, "pw"]).status()?;
        anyhow::ensure!(status.success(), "mosquitto_passwd failed");
    }
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user limited\ntopic readwrite allowed/#\ntopic read readonly/#\n\nuser admin\ntopic readwrite #\n",
    )?;
    let broker = BrokerProcess::mosquitto_with(
        &format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n",
            passwd.display(),
            acl.display()
        ),
        Readiness::TcpAccept,
    )
    .await?;
    // mosquitto read the files at start.
    drop(dir);
    Ok(broker)
}

/// A broker with the dynamic security plugin (the mosquitto way to refuse subscriptions):
/// `limited` may publish and subscribe under `allowed/#` only, `admin` everywhere. The
/// plugin file is made by `mosquitto_ctrl dynsec init`, then given the two clients.
async fn dynsec_broker() -> anyhow::Result<(BrokerProcess, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dynsec.json");
    let out = std::process::Command::new("/usr/bin/mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(&file)
        .args(["limited", "pw"])
        .output()?;
    anyhow::ensure!(out.status.success(), "mosquitto_ctrl dynsec init: {out:?}");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    let mut admin = json["clients"][0].clone();
    json["clients"][0]["roles"] = serde_json::json!([{ "rolename": "limited" }]);
    admin["username"] = "admin".into();
    admin["roles"] = serde_json::json!([{ "rolename": "all" }]);
    json["clients"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("no clients in the dynsec file"))?
        .push(admin);
    let acl = |acltype: &str, topic: &str| serde_json::json!({ "acltype": acltype, "topic": topic, "allow": true });
    json["roles"] = serde_json::json!([
        { "rolename": "limited", "acls": [
            acl("publishClientSend", "allowed/#"),
            acl("subscribePattern", "allowed/#"),
            acl("publishClientReceive", "#"),
        ] },
        { "rolename": "all", "acls": [
            acl("publishClientSend", "#"),
            acl("subscribePattern", "#"),
            acl("publishClientReceive", "#"),
        ] },
    ]);
    std::fs::write(&file, serde_json::to_vec_pretty(&json)?)?;
    let broker = BrokerProcess::mosquitto_with(
        &format!(
            "allow_anonymous false\nplugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so\n\
             plugin_opt_config_file {}\n",
            file.display()
        ),
        Readiness::TcpAccept,
    )
    .await?;
    Ok((broker, dir))
}

async fn login(port: u16, protocol: Protocol, user: &str) -> anyhow::Result<MqttClient> {
    Ok(retry(FAIL_FAST, || {
        config(port, protocol).credentials(user, "pw").connect()
    })
    .await?)
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_acl_file_mqtt5_publish_outside_the_grant_is_unauthorized() -> anyhow::Result<()> {
    let broker = acl_file_broker().await?;
    let limited = login(broker.port(), Protocol::V5, "limited").await?;
    let p = limited.producer();
    let mut c = limited.consumer();

    // PUBACK 0x87 for QoS 1, PUBREC 0x87 for QoS 2: Unauthorized on the call.
    for qos in [1, 2] {
        let started = Instant::now();
        let e = p
            .publish("denied/x", b"no", qos)
            .await
            .expect_err("denied publish");
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "QoS {qos}: {e}");
        assert!(started.elapsed() < FAIL_FAST);
        println!("v5 QoS {qos} publish outside the grant: {e}");
    }
    let e = Publisher::publish(&p, "readonly/x", polybus_core::Event::new("no"))
        .await
        .expect_err("read-only topic");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    // mosquitto 2.0's acl_file does not refuse SUBSCRIBE (SUBACK grants it); it filters at
    // delivery: nothing published on a topic the user may not read reaches it.
    c.subscribe("denied/#", 1).await?;
    c.subscribe("allowed/#", 1).await?;
    c.subscribe("readonly/#", 1).await?;
    let admin = login(broker.port(), Protocol::V5, "admin").await?;
    admin.producer().publish("denied/y", b"hidden", 1).await?;
    admin.producer().publish("readonly/b", b"ro", 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"ro", "denied/y must not be delivered");
    d.ack().await?;

    // Inside the grant everything still works on the same connection.
    p.publish("allowed/a", b"yes", 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"yes");
    d.ack().await?;
    limited.close().await?;
    admin.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_dynsec_mqtt5_subscribe_and_publish_outside_the_grant_are_unauthorized()
-> anyhow::Result<()> {
    let (broker, _dir) = dynsec_broker().await?;
    let limited = login(broker.port(), Protocol::V5, "limited").await?;
    let mut c = limited.consumer();

    // SUBACK 0x87 (Not authorized).
    let started = Instant::now();
    let e = c.subscribe("denied/x", 1).await.expect_err("denied");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(started.elapsed() < FAIL_FAST);
    println!("v5 subscribe outside the grant: {e}");
    // The generic consumer: the stream's first item, then the end.
    let sub = limited.subscriber(None);
    let mut s = std::pin::pin!(sub.subscribe("denied/y"));
    let e = futures_util::StreamExt::next(&mut s)
        .await
        .expect("an item")
        .expect_err("denied");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    // PUBACK 0x87.
    let e = limited
        .producer()
        .publish("denied/x", b"no", 1)
        .await
        .expect_err("denied publish");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    c.subscribe("allowed/#", 1).await?;
    limited.producer().publish("allowed/a", b"yes", 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"yes");
    d.ack().await?;
    limited.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_dynsec_mqtt311_subscribe_is_unauthorized_publish_is_dropped() -> anyhow::Result<()>
{
    let (broker, _dir) = dynsec_broker().await?;
    let limited = login(broker.port(), Protocol::V311, "limited").await?;
    let mut c = limited.consumer();
    // SUBACK 0x80 (failure).
    let e = c.subscribe("denied/x", 1).await.expect_err("denied");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    println!("3.1.1 subscribe outside the grant: {e}");

    // The documented limitation: MQTT 3.1.1 has no way to refuse a publish. mosquitto
    // acknowledges a denied QoS 1 publish and drops it; polybus cannot tell.
    let admin = login(broker.port(), Protocol::V311, "admin").await?;
    let mut watcher = admin.consumer();
    watcher.subscribe("denied/#", 1).await?;
    limited
        .producer()
        .publish("denied/x", b"dropped", 1)
        .await?;
    let nothing = tokio::time::timeout(Duration::from_millis(500), watcher.next()).await;
    assert!(nothing.is_err(), "the denied publish must not arrive");
    // Inside the grant it works.
    c.subscribe_with("allowed/#", QoS::AtLeastOnce).await?;
    limited.producer().publish("allowed/z", b"yes", 1).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await??;
    assert_eq!(d.payload(), b"yes");
    d.ack().await?;
    limited.close().await?;
    admin.close().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_wrong_password_is_unauthorized_at_once() -> anyhow::Result<()> {
    let broker = acl_file_broker().await?;
    for protocol in [Protocol::V5, Protocol::V311] {
        for (what, cfg) in [
            (
                "wrong password",
                config(broker.port(), protocol).credentials("limited", "nope"),
            ),
            (
                "unknown user",
                config(broker.port(), protocol).credentials("eve", "pw"),
            ),
            ("anonymous", config(broker.port(), protocol)),
        ] {
            let e = refused(cfg, ErrorKind::Unauthorized, what).await;
            assert!(!e.to_string().contains("nope"), "{e}");
            assert!(!e.is_retryable());
        }
    }
    Ok(())
}
