//! Shared helpers: broker address from the environment, fresh names.

use std::time::Duration;

use polybus_mqtt::{MqttClient, MqttConfig};

/// The shared broker: `POLYBUS_MQTT_HOST` / `POLYBUS_MQTT_PORT` (default 127.0.0.1:1883).
pub(crate) use polybus_testkit::brokers::mqtt_addr as broker;

/// A fresh, MQTT-legal topic.
pub(crate) fn topic() -> String {
    format!("polybus/test/{}", uuid::Uuid::new_v4().simple())
}

/// A fresh client id.
pub(crate) fn client_id(what: &str) -> String {
    format!("polybus-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A config for the shared broker with a fresh client id.
pub(crate) fn config(what: &str) -> MqttConfig {
    let (host, port) = broker();
    MqttConfig::new(host, port, client_id(what)).connect_timeout(Duration::from_secs(5))
}

/// Connects to the shared broker.
#[allow(dead_code)]
pub(crate) async fn connect(what: &str) -> polybus_core::Result<MqttClient> {
    config(what).connect().await
}

/// A mosquitto process of our own with a config we write whole, killed on drop.
///
/// Not a `polybus_testkit::brokers::BrokerProcess`: its readiness probe speaks plain MQTT
/// anonymously, so it cannot tell when a TLS-only or password-only broker is ready.
pub(crate) struct OwnMosquitto {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl OwnMosquitto {
    /// Writes `conf` (after `user root`) into a fresh directory prepared by `prepare`, starts
    /// mosquitto and waits until `port` accepts TCP connections.
    pub(crate) async fn start(
        prepare: impl FnOnce(&std::path::Path) -> anyhow::Result<String>,
        port: u16,
    ) -> anyhow::Result<OwnMosquitto> {
        let dir = tempfile::tempdir()?;
        let conf_text = prepare(dir.path())?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("user root\nlog_dest stderr\n{conf_text}\n"))?;
        let log = std::fs::File::create(dir.path().join("broker.log"))?;
        let child = tokio::process::Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen on {port}: {}",
                std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(OwnMosquitto {
            _child: child,
            _dir: dir,
        })
    }
}

/// A mosquitto that refuses anonymous clients and knows one user, for the credential tests.
pub(crate) async fn auth_broker(user: &str, password: &str) -> anyhow::Result<(OwnMosquitto, u16)> {
    let port = polybus_testkit::brokers::free_port()?;
    let (user, password) = (user.to_owned(), password.to_owned());
    let broker = OwnMosquitto::start(
        move |dir| {
            let passwd = dir.join("passwd");
            let status = std::process::Command::new("/usr/bin/mosquitto_passwd")
                .args(["-c", "-b"])
                .arg(&passwd)
                .args([&user, &password])
                .status()?;
            anyhow::ensure!(status.success(), "mosquitto_passwd failed");
            Ok(format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
                passwd.display()
            ))
        },
        port,
    )
    .await?;
    Ok((broker, port))
}
