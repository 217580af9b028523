//! Security against own nats-servers: TLS and mutual TLS with a generated PKI
//! (`polybus_testkit::tls`), user/password, token and nkey authentication, and per-subject
//! publish/subscribe permissions surfacing as `Unauthorized` on the call they belong to.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use polybus_core::mq::MessageConsumer;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_nats::NatsOptions;
use polybus_testkit::brokers::{self, BrokerProcess};
use polybus_testkit::tls::TestPki;

/// Wrong credentials and refused certificates must fail this fast: no retry loop.
const FAIL_FAST: Duration = Duration::from_secs(5);

/// A subscription on `opts`, then a publish on `opts`, received.
async fn round_trip(opts: NatsOptions) -> anyhow::Result<()> {
    let consumer = opts.clone().consumer().await?;
    let producer = opts.producer().await?;
    let subject = format!("sec.rt.{}", uuid::Uuid::new_v4().simple());
    let mut s = std::pin::pin!(consumer.subscribe(&subject));
    let _ = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
    producer.publish(&subject, Event::new("secret")).await?;
    let d = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .expect("open")?;
    assert_eq!(d.payload(), b"secret");
    producer.close().await?;
    consumer.close().await?;
    Ok(())
}

/// Connects with `opts` and expects a failure of `kind` within [`FAIL_FAST`].
async fn refused(opts: NatsOptions, kind: ErrorKind, what: &str) -> polybus_core::Error {
    brokers::refused(opts.connect(), kind, what, FAIL_FAST).await
}

fn tls_conf(
    cert: &std::path::Path,
    key: &std::path::Path,
    verify_ca: Option<&std::path::Path>,
) -> String {
    let mut conf = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n",
        cert.display(),
        key.display()
    );
    if let Some(ca) = verify_ca {
        conf.push_str(&format!(
            "  ca_file: \"{}\"\n  verify: true\n",
            ca.display()
        ));
    }
    conf.push_str("}\n");
    conf
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_tls_server_verification() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let server =
        BrokerProcess::nats(&tls_conf(&pki.server_cert(), &pki.server_key(), None)).await?;
    let url = server.url();
    let opts = || {
        NatsOptions::new(&url)
            .require_tls(true)
            .connect_timeout(Duration::from_secs(3))
    };

    // Trusting the test CA: a round trip works, on both names in the certificate.
    round_trip(opts().tls_root_certificates(pki.ca())).await?;
    round_trip(
        NatsOptions::new(format!("tls://localhost:{}", server.port()))
            .tls_root_certificates(pki.ca()),
    )
    .await?;

    // An unrelated CA, or only the system CAs: the certificate is refused, and the error says so.
    for (what, o) in [
        ("unrelated CA", opts().tls_root_certificates(pki.other_ca())),
        ("system CAs only", opts()),
    ] {
        let e = refused(o, ErrorKind::Connect, what).await;
        let text = e.to_string();
        assert!(
            text.contains("TLS") && text.contains("certificate") && text.contains("trusted CA"),
            "{what}: {text}"
        );
    }

    // A certificate of our CA for another host name: refused (server name verification).
    let wrong_host = BrokerProcess::nats(&tls_conf(
        &pki.wrong_host_cert(),
        &pki.wrong_host_key(),
        None,
    ))
    .await?;
    let e = refused(
        NatsOptions::new(wrong_host.url())
            .require_tls(true)
            .tls_root_certificates(pki.ca()),
        ErrorKind::Connect,
        "certificate for another host",
    )
    .await;
    assert!(e.to_string().contains("host name"), "{e}");

    // A plaintext-only client (require_tls) against a plaintext server is refused too.
    let plain = BrokerProcess::nats("").await?;
    refused(
        NatsOptions::new(plain.url())
            .require_tls(true)
            .tls_root_certificates(pki.ca()),
        ErrorKind::Connect,
        "require_tls against a plaintext server",
    )
    .await;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_mutual_tls() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let server = BrokerProcess::nats(&tls_conf(
        &pki.server_cert(),
        &pki.server_key(),
        Some(&pki.ca()),
    ))
    .await?;
    let opts = || {
        NatsOptions::new(server.url())
            .require_tls(true)
            .tls_root_certificates(pki.ca())
            .connect_timeout(Duration::from_secs(3))
    };
    round_trip(opts().tls_client_certificate(pki.client_cert(), pki.client_key())).await?;

    // No client certificate, or one from another CA: the server refuses us.
    for (what, o) in [
        ("no client certificate", opts()),
        (
            "client certificate of another CA",
            opts().tls_client_certificate(pki.other_client_cert(), pki.other_client_key()),
        ),
    ] {
        let e = refused(o, ErrorKind::Unauthorized, what).await;
        assert!(e.to_string().contains("client certificate"), "{what}: {e}");
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_nkey_authentication() -> anyhow::Result<()> {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let server = BrokerProcess::nats(&format!(
        "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
        user.public_key()
    ))
    .await?;
    let seed = user.seed()?;
    round_trip(NatsOptions::new(server.url()).nkey(&seed)).await?;

    let e = refused(
        NatsOptions::new(server.url()).nkey(stranger.seed()?),
        ErrorKind::Unauthorized,
        "unknown nkey",
    )
    .await;
    assert!(!e.to_string().contains(&seed), "seed in the error");
    refused(
        NatsOptions::new(server.url()),
        ErrorKind::Unauthorized,
        "no credentials",
    )
    .await;
    // A malformed seed is refused before anything is sent.
    let e = NatsOptions::new(server.url())
        .nkey("SUNOTASEED")
        .connect()
        .await
        .expect_err("malformed seed");
    assert!(
        matches!(e.kind(), ErrorKind::Unauthorized | ErrorKind::Connect),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_wrong_credentials_fail_fast() -> anyhow::Result<()> {
    let server = BrokerProcess::nats(
        "authorization { users = [ { user: \"app\", password: \"s3cret\" } ] }\n",
    )
    .await?;
    let token = BrokerProcess::nats("authorization { token: \"t0ken\" }\n").await?;
    for (what, o) in [
        (
            "wrong password",
            NatsOptions::new(server.url()).user_password("app", "nope"),
        ),
        (
            "unknown user",
            NatsOptions::new(server.url()).user_password("eve", "s3cret"),
        ),
        (
            "token instead of user",
            NatsOptions::new(server.url()).token("t0ken"),
        ),
        ("wrong token", NatsOptions::new(token.url()).token("nope")),
        ("no token", NatsOptions::new(token.url())),
    ] {
        // Unlimited reconnects must not turn a refusal into a retry loop.
        let e = refused(o.max_reconnects(None), ErrorKind::Unauthorized, what).await;
        assert!(!e.to_string().contains("s3cret") && !e.to_string().contains("t0ken"));
        assert!(!e.is_retryable(), "{what}");
    }
    Ok(())
}

/// `limited` may publish and subscribe under `allowed.>` (and the inbox subjects polybus
/// uses for round trips); `noinbox` only under `allowed.>`.
const PERMISSIONS: &str = r#"
authorization {
  users = [
    { user: "limited", password: "pw", permissions: {
        publish: { allow: ["allowed.>", "_INBOX.>"] }
        subscribe: { allow: ["allowed.>", "_INBOX.>"] }
    } }
    { user: "noinbox", password: "pw", permissions: {
        publish: { allow: ["allowed.>"] }
        subscribe: { allow: ["allowed.>"] }
    } }
  ]
}
"#;

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_subscribe_outside_the_grant_is_unauthorized() -> anyhow::Result<()> {
    let server = BrokerProcess::nats(PERMISSIONS).await?;
    let opts = NatsOptions::new(server.url()).user_password("limited", "pw");
    let consumer = opts.clone().consumer().await?;

    // The generic consumer: the stream's first item is the refusal, then it ends.
    let started = Instant::now();
    let mut s = std::pin::pin!(consumer.subscribe("denied.x"));
    let first = tokio::time::timeout(FAIL_FAST, s.next())
        .await?
        .expect("an item");
    let e = first.expect_err("denied subscription");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("denied.x"), "{e}");
    assert!(s.next().await.is_none(), "the stream ends after the error");
    println!("denied subscribe ({:?}): {e}", started.elapsed());

    // The seed's consumer: `subscribe` fails.
    let mut seed = opts.clone().consumer().await?;
    let e = MessageConsumer::subscribe(&mut seed, "denied.>")
        .await
        .expect_err("denied");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    // A queue subscription too.
    let grouped = opts.clone().queue_group("workers").consumer().await?;
    let mut s = std::pin::pin!(grouped.subscribe("denied.q"));
    let e = s.next().await.expect("an item").expect_err("denied");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    // Inside the grant everything works on the same connections.
    MessageConsumer::subscribe(&mut seed, "allowed.seed").await?;
    let producer = opts.producer().await?;
    producer.publish("allowed.seed", Event::new("in")).await?;
    let d = tokio::time::timeout(FAIL_FAST, seed.next()).await??;
    assert_eq!(d.payload(), b"in");

    // A user without permission on the inbox subjects: the round trip that confirms a
    // subscription is refused, and says what to grant, instead of waiting for a timeout.
    let noinbox = NatsOptions::new(server.url())
        .user_password("noinbox", "pw")
        .consumer()
        .await?;
    let started = Instant::now();
    let mut s = std::pin::pin!(noinbox.subscribe("allowed.y"));
    let e = s.next().await.expect("an item").expect_err("no inbox");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("_INBOX.>"), "{e}");
    assert!(started.elapsed() < FAIL_FAST, "{:?}", started.elapsed());
    println!("no inbox permission: {e}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_publish_outside_the_grant_is_unauthorized() -> anyhow::Result<()> {
    let server = BrokerProcess::nats(PERMISSIONS).await?;
    let opts = NatsOptions::new(server.url()).user_password("limited", "pw");
    let mut consumer = opts.clone().consumer().await?;
    MessageConsumer::subscribe(&mut consumer, "allowed.>").await?;

    // Checked publishes: the refusal comes back on the call itself.
    let checked = opts
        .clone()
        .check_publish_permissions(true)
        .producer()
        .await?;
    let started = Instant::now();
    let e = checked
        .publish("denied.x", Event::new("no"))
        .await
        .expect_err("denied publish");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("denied.x"), "{e}");
    assert!(started.elapsed() < FAIL_FAST);
    println!("checked publish: {e}");
    checked.publish("allowed.a", Event::new("yes")).await?;
    let d = tokio::time::timeout(FAIL_FAST, consumer.next()).await??;
    assert_eq!(d.payload(), b"yes");

    // Unchecked publishes: the publish itself returns before the server could answer; the
    // refusal comes back from the next flush...
    let plain = opts.producer().await?;
    plain.publish("denied.y", Event::new("no")).await?;
    let e = plain.flush().await.expect_err("flush reports the refusal");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("denied.y"), "{e}");
    println!("flush after a denied publish: {e}");
    plain.flush().await?; // reported once
    // ... or from the next publish to the same subject.
    plain.publish("denied.z", Event::new("no")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = plain
        .publish("denied.z", Event::new("again"))
        .await
        .expect_err("next publish reports it");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    // Publishes inside the grant are unaffected, nothing was lost there.
    plain.publish("allowed.b", Event::new("still")).await?;
    plain.flush().await?;
    let d = tokio::time::timeout(FAIL_FAST, consumer.next()).await??;
    assert_eq!(d.payload(), b"still");
    assert!(plain.connection().permission_violations() >= 2);
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_debug_output_hides_credentials() -> anyhow::Result<()> {
    let pki = TestPki::generate()?;
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    for opts in [
        NatsOptions::new("nats://alice:pw-in-url@127.0.0.1:1").user_password("u", "pw-option"),
        NatsOptions::new("nats://127.0.0.1:1").token("tok-secret"),
        NatsOptions::new("nats://127.0.0.1:1")
            .nkey(&seed)
            .tls_client_certificate(pki.client_cert(), pki.client_key()),
    ] {
        let shown = format!("{opts:?}");
        for secret in [
            "pw-in-url",
            "pw-option",
            "tok-secret",
            seed.as_str(),
            "client-key.pem",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
    Ok(())
}
