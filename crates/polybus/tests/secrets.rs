//! Secrets never reach `Debug` output, error messages or logs: every configuration type that
//! takes credentials (NatsOptions, JsOptions, KafkaConfig, MqttConfig) is formatted with each
//! kind of secret and checked, and failing connects with credentials are logged at TRACE level
//! (every crate, async-nats and rumqttc included) and checked.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_jetstream::JsOptions;
use polybus_kafka::{KafkaConfig, SaslMechanism};
use polybus_mqtt::{MqttConfig, TlsOptions};
use polybus_nats::NatsOptions;

const SECRETS: [&str; 8] = [
    "pw-url-secret",
    "pw-user-secret",
    "tok-secret",
    "SUANKEYSEEDSECRET",
    "pw-sasl-secret",
    "pw-key-secret",
    "pw-oauth-secret",
    "pw-extra-secret",
];

fn assert_redacted(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what}: {s} leaked in {text}");
    }
}

#[test]
fn nats_options_hide_every_credential() {
    let url = "nats://alice:pw-url-secret@127.0.0.1:4222,nats://bob:pw-url-secret@127.0.0.2:4222";
    for opts in [
        NatsOptions::new(url),
        NatsOptions::new(url).user_password("alice", "pw-user-secret"),
        NatsOptions::new(url).token("tok-secret"),
        NatsOptions::new(url).nkey("SUANKEYSEEDSECRET"),
        NatsOptions::new(url).credentials_file("/etc/nats/app.creds"),
    ] {
        let shown = format!("{opts:?} {opts:#?}");
        assert_redacted("NatsOptions", &shown);
        assert!(
            shown.contains("127.0.0.2:4222"),
            "the address stays visible: {shown}"
        );
    }
}

#[test]
fn jetstream_options_hide_every_credential() {
    let url = "nats://alice:pw-url-secret@127.0.0.1:4222";
    for opts in [
        JsOptions::new(url).user_password("alice", "pw-user-secret"),
        JsOptions::new(url).token("tok-secret"),
        JsOptions::new(url).nats(|n| n.nkey("SUANKEYSEEDSECRET")),
    ] {
        assert_redacted("JsOptions", &format!("{opts:?} {opts:#?}"));
    }
}

#[test]
fn kafka_config_hides_every_credential() {
    let cfg = KafkaConfig::new("127.0.0.1:9092", "g")
        .with_sasl(SaslMechanism::ScramSha512, "alice", "pw-sasl-secret")
        .with_tls_client_cert("client.pem", "client.key", Some("pw-key-secret".into()))
        .set("sasl.oauthbearer.config", "clientSecret=pw-oauth-secret")
        .set("ssl.keystore.password", "pw-extra-secret")
        .set("sasl.oauthbearer.client.secret", "pw-extra-secret")
        .set(
            "ssl.key.pem",
            "-----BEGIN PRIVATE KEY-----pw-extra-secret-----END PRIVATE KEY-----",
        );
    let shown = format!("{cfg:?} {cfg:#?}");
    assert_redacted("KafkaConfig", &shown);
    assert!(
        shown.contains("alice"),
        "the user name stays visible: {shown}"
    );
}

#[test]
fn mqtt_config_hides_every_credential() {
    let cfg = MqttConfig::new("127.0.0.1", 1883, "client-1")
        .credentials("alice", "pw-user-secret")
        .tls(TlsOptions::new().ca_pem("CA").client_auth_pem(
            "CERT",
            "-----BEGIN PRIVATE KEY-----pw-key-secret-----END PRIVATE KEY-----",
        ));
    let shown = format!("{cfg:?} {cfg:#?}");
    assert_redacted("MqttConfig", &shown);
    assert!(
        shown.contains("alice"),
        "the user name stays visible: {shown}"
    );
}

/// A `MakeWriter` collecting everything logged.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn failed_connects_with_credentials_log_no_secret() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Nothing listens on port 1: the connect fails, is retried and logged.
    let url = "nats://alice:pw-url-secret@127.0.0.1:1";
    let mut errors = String::new();
    for opts in [
        NatsOptions::new(url),
        NatsOptions::new("nats://127.0.0.1:1").user_password("alice", "pw-user-secret"),
        NatsOptions::new("nats://127.0.0.1:1").token("tok-secret"),
    ] {
        let e = opts
            .connect_timeout(Duration::from_millis(300))
            .connect()
            .await
            .expect_err("nothing listens on port 1");
        errors.push_str(&format!("{e} {e:?}\n"));
    }
    let e = JsOptions::new(url)
        .nats(|n| n.connect_timeout(Duration::from_millis(300)))
        .connect()
        .await
        .expect_err("nothing listens on port 1");
    errors.push_str(&format!("{e} {e:?}\n"));
    let mqtt = MqttConfig::new("127.0.0.1", 1, "secrets-test")
        .credentials("alice", "pw-user-secret")
        .connect_timeout(Duration::from_millis(300));
    if let Err(e) = mqtt.connect().await {
        errors.push_str(&format!("{e} {e:?}\n"));
    }
    assert_redacted("connect errors", &errors);
    let logged =
        String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert_redacted("logs", &logged);
}
