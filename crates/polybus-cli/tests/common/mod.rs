//! Helpers shared by the end-to-end tests: the built binary, the brokers' addresses from the
//! `POLYBUS_*` variables `cargo xtask test` sets, fresh names.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command};
use std::sync::mpsc;

/// The built `polybus`, without credentials from the environment.
pub(crate) fn polybus() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_polybus"));
    cmd.env_remove("POLYBUS_USER")
        .env_remove("POLYBUS_PASSWORD");
    cmd
}

pub(crate) fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// `host:port` of the shared nats-server.
pub(crate) fn nats_host() -> String {
    let url = env_or("POLYBUS_NATS_URL", "nats://127.0.0.1:4222");
    url.split_once("://")
        .map_or(url.clone(), |(_, h)| h.to_owned())
}

/// `host:port` of the shared mosquitto.
pub(crate) fn mqtt_host() -> String {
    format!(
        "{}:{}",
        env_or("POLYBUS_MQTT_HOST", "127.0.0.1"),
        env_or("POLYBUS_MQTT_PORT", "1883")
    )
}

/// `host:port` of the first Kafka broker (tansu).
pub(crate) fn kafka_host() -> String {
    env_or("POLYBUS_KAFKA_BROKERS", "127.0.0.1:9092")
        .split(',')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The venv Python with the interop clients (nats-py, kafka-python, prometheus_client).
pub(crate) fn python() -> String {
    env_or("POLYBUS_PYTHON", "/root/.cache/polybus/venv/bin/python")
}

/// A name no other test (or earlier run) has used.
pub(crate) fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

/// The lines `child` writes to its piped stderr, as they come (read on a thread of their own).
pub(crate) fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
