//! Readiness probes that speak each broker's protocol (no sleeps, no client libraries):
//! - NATS: read the server's `INFO {...}` line and require `"jetstream":true`;
//! - MQTT: send a v3.1.1 CONNECT and expect a CONNACK accepting it;
//! - Kafka: send ApiVersions v0 and expect a response carrying our correlation id.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::config::{Broker, HOST};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The correlation id of our ApiVersions request ("POLY").
pub(crate) const KAFKA_CORRELATION_ID: i32 = 0x504f_4c59;
/// The client id of our ApiVersions request.
pub(crate) const KAFKA_CLIENT_ID: &str = "xtask";

/// What answered on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Nothing listens there.
    Closed,
    /// The right kind of broker, ready; the text says what it reported.
    Ready(String),
    /// Something listens but did not answer as the right broker (or not yet).
    Unexpected(String),
}

/// Probes `127.0.0.1:port` once for `broker`.
pub(crate) fn probe(broker: Broker, port: u16) -> Probe {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Probe::Closed,
        Err(e) => return Probe::Unexpected(format!("connect failed: {e}")),
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let result = match broker {
        Broker::Nats => probe_nats(&mut stream),
        Broker::Mqtt => probe_mqtt(&mut stream),
        Broker::Kafka => probe_kafka(&mut stream),
    };
    match result {
        Ok(p) => p,
        Err(e) => Probe::Unexpected(e.to_string()),
    }
}

/// Polls until `broker` is ready on `port`, `exited` reports the process died, or `timeout`.
pub(crate) fn wait_ready(
    broker: Broker,
    port: u16,
    timeout: Duration,
    log: &Path,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe(broker, port) {
            Probe::Ready(what) => return Ok(what),
            other => other,
        };
        if let Some(status) = exited() {
            bail!(
                "{broker} exited ({status}) before answering on {HOST}:{port}; its log {}:\n{}",
                log.display(),
                log_tail(log, 20)
            );
        }
        if Instant::now() >= deadline {
            let last = match last {
                Probe::Closed => "nothing listening".to_owned(),
                Probe::Unexpected(what) => what,
                Probe::Ready(_) => unreachable!(),
            };
            bail!(
                "{broker} did not become ready on {HOST}:{port} within {}s (last probe: {last}); \
                 see its log {}:\n{}",
                timeout.as_secs(),
                log.display(),
                log_tail(log, 20)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The last `n` lines of a log file, indented, for error messages.
pub(crate) fn log_tail(log: &Path, n: usize) -> String {
    match std::fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(n)..];
            if tail.is_empty() {
                "    (empty)".to_owned()
            } else {
                tail.iter()
                    .map(|l| format!("    {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
        Err(e) => format!("    (cannot read: {e})"),
    }
}

fn probe_nats(stream: &mut TcpStream) -> Result<Probe> {
    // The server speaks first: `INFO {json}\r\n`.
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.ends_with(b"\r\n") {
        let n = stream
            .read(&mut buf)
            .map_err(|e| io_error("reading INFO", e))?;
        if n == 0 {
            bail!("connection closed before an INFO line");
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > 64 * 1024 {
            bail!("no INFO line in the first 64 KiB");
        }
    }
    Ok(nats_info(&String::from_utf8_lossy(&line)))
}

/// Judges the server's first line.
pub(crate) fn nats_info(line: &str) -> Probe {
    let line = line.trim_end();
    let Some(json) = line.strip_prefix("INFO ") else {
        return Probe::Unexpected(format!("not NATS: first line {:?}", truncate(line)));
    };
    let compact: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    let version = json_str(&compact, "version").unwrap_or("unknown version");
    if compact.contains("\"jetstream\":true") {
        Probe::Ready(format!("nats-server {version}, JetStream on"))
    } else {
        Probe::Unexpected(format!("NATS server {version} without JetStream"))
    }
}

fn json_str<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = json[start..].find('"')?;
    Some(&json[start..start + len])
}

/// MQTT 3.1.1 CONNECT: clean session, keep-alive 10 s, empty client id (the broker assigns one).
pub(crate) fn mqtt_connect_packet() -> [u8; 14] {
    [
        0x10, 12, // CONNECT, remaining length
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name
        0x04, // protocol level 4 = 3.1.1
        0x02, // connect flags: clean session
        0x00, 0x0a, // keep alive 10 s
        0x00, 0x00, // client id: empty string
    ]
}

/// MQTT DISCONNECT, sent after a successful probe so the broker logs a clean disconnect.
const MQTT_DISCONNECT: [u8; 2] = [0xe0, 0x00];

fn probe_mqtt(stream: &mut TcpStream) -> Result<Probe> {
    stream
        .write_all(&mqtt_connect_packet())
        .map_err(|e| io_error("sending CONNECT", e))?;
    let mut connack = [0u8; 4];
    read_exact(stream, &mut connack, "reading CONNACK")?;
    let probe = mqtt_connack(&connack);
    if matches!(probe, Probe::Ready(_)) {
        let _ = stream.write_all(&MQTT_DISCONNECT);
    }
    Ok(probe)
}

/// Judges the first 4 bytes the broker sent back.
pub(crate) fn mqtt_connack(bytes: &[u8; 4]) -> Probe {
    match *bytes {
        [0x20, 0x02, _, 0x00] => Probe::Ready("MQTT CONNACK accepted".to_owned()),
        [0x20, 0x02, _, code] => Probe::Unexpected(format!(
            "MQTT broker refused an anonymous connection (CONNACK return code {code})"
        )),
        other => Probe::Unexpected(format!(
            "not MQTT: answered \"{}...\" to CONNECT",
            other.escape_ascii()
        )),
    }
}

/// Kafka ApiVersions request, version 0, with request header v1:
/// `size:i32 api_key:i16=18 api_version:i16=0 correlation_id:i32 client_id:string`, empty body.
pub(crate) fn kafka_api_versions_request(correlation_id: i32, client_id: &str) -> Vec<u8> {
    let client_id_len = i16::try_from(client_id.len()).expect("short client id");
    let mut body = Vec::with_capacity(10 + client_id.len());
    body.extend_from_slice(&18i16.to_be_bytes()); // api_key: ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // api_version
    body.extend_from_slice(&correlation_id.to_be_bytes());
    body.extend_from_slice(&client_id_len.to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let size = i32::try_from(body.len()).expect("small request");
    let mut request = size.to_be_bytes().to_vec();
    request.extend_from_slice(&body);
    request
}

fn probe_kafka(stream: &mut TcpStream) -> Result<Probe> {
    let request = kafka_api_versions_request(KAFKA_CORRELATION_ID, KAFKA_CLIENT_ID);
    stream
        .write_all(&request)
        .map_err(|e| io_error("sending ApiVersions", e))?;
    let mut size = [0u8; 4];
    read_exact(stream, &mut size, "reading the ApiVersions response size")?;
    let size = i32::from_be_bytes(size);
    if !(4..=1024 * 1024).contains(&size) {
        return Ok(Probe::Unexpected(format!(
            "not Kafka: answered \"{}...\" to ApiVersions",
            size.to_be_bytes().escape_ascii()
        )));
    }
    let mut response = vec![0u8; size as usize];
    read_exact(stream, &mut response, "reading the ApiVersions response")?;
    Ok(kafka_api_versions_response(KAFKA_CORRELATION_ID, &response))
}

/// Judges an ApiVersions v0 response (without its size prefix):
/// `correlation_id:i32 error_code:i16 [api_key:i16 min:i16 max:i16]`.
pub(crate) fn kafka_api_versions_response(correlation_id: i32, response: &[u8]) -> Probe {
    let int = |at: usize, len: usize| response.get(at..at + len);
    let Some(got) = int(0, 4).map(|b| i32::from_be_bytes(b.try_into().unwrap())) else {
        return Probe::Unexpected("not Kafka: response shorter than a correlation id".into());
    };
    if got != correlation_id {
        return Probe::Unexpected(format!(
            "not Kafka: correlation id {got:#x}, expected {correlation_id:#x}"
        ));
    }
    let error = int(4, 2).map(|b| i16::from_be_bytes(b.try_into().unwrap()));
    let count = int(6, 4).map(|b| i32::from_be_bytes(b.try_into().unwrap()));
    match (error, count) {
        (Some(0), Some(n)) => Probe::Ready(format!("Kafka ApiVersions ok, {n} APIs")),
        (Some(0), None) => Probe::Ready("Kafka ApiVersions ok".to_owned()),
        (Some(code), _) => Probe::Unexpected(format!("Kafka ApiVersions error code {code}")),
        (None, _) => Probe::Unexpected("Kafka ApiVersions response truncated".to_owned()),
    }
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<()> {
    stream.read_exact(buf).map_err(|e| io_error(what, e))
}

fn io_error(what: &str, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            anyhow::anyhow!("no answer within {}s while {what}", IO_TIMEOUT.as_secs())
        }
        ErrorKind::UnexpectedEof => anyhow::anyhow!("connection closed while {what}"),
        _ => anyhow::anyhow!("{what}: {e}"),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_connect_bytes() {
        assert_eq!(
            mqtt_connect_packet(),
            [
                0x10, 0x0c, 0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x04, 0x02, 0x00, 0x0a, 0x00, 0x00
            ]
        );
        // The remaining length covers everything after the 2-byte fixed header.
        assert_eq!(
            usize::from(mqtt_connect_packet()[1]),
            mqtt_connect_packet().len() - 2
        );
    }

    #[test]
    fn mqtt_connack_bytes() {
        assert!(matches!(
            mqtt_connack(&[0x20, 0x02, 0x00, 0x00]),
            Probe::Ready(_)
        ));
        assert!(matches!(
            mqtt_connack(&[0x20, 0x02, 0x01, 0x00]),
            Probe::Ready(_)
        ));
        assert!(
            matches!(mqtt_connack(&[0x20, 0x02, 0x00, 0x05]), Probe::Unexpected(m) if m.contains("code 5"))
        );
        assert!(matches!(mqtt_connack(b"INFO"), Probe::Unexpected(m) if m.starts_with("not MQTT")));
    }

    #[test]
    fn kafka_api_versions_bytes() {
        assert_eq!(
            kafka_api_versions_request(0x504f_4c59, "xtask"),
            [
                0x00, 0x00, 0x00, 0x0f, // size: 15 bytes follow
                0x00, 0x12, // api_key 18
                0x00, 0x00, // api_version 0
                0x50, 0x4f, 0x4c, 0x59, // correlation id
                0x00, 0x05, b'x', b't', b'a', b's', b'k', // client id
            ]
        );
        assert_eq!(
            kafka_api_versions_request(7, ""),
            [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 7, 0, 0]
        );
    }

    #[test]
    fn kafka_api_versions_responses() {
        let ok = [
            0x50, 0x4f, 0x4c, 0x59, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 9, 0, 18, 0, 0, 0, 3,
        ];
        assert_eq!(
            kafka_api_versions_response(KAFKA_CORRELATION_ID, &ok),
            Probe::Ready("Kafka ApiVersions ok, 2 APIs".into())
        );
        assert!(matches!(
            kafka_api_versions_response(KAFKA_CORRELATION_ID, &[0, 0, 0, 1, 0, 0]),
            Probe::Unexpected(m) if m.contains("correlation id")
        ));
        assert!(matches!(
            kafka_api_versions_response(KAFKA_CORRELATION_ID, &[0x50, 0x4f, 0x4c, 0x59, 0, 35]),
            Probe::Unexpected(m) if m.contains("error code 35")
        ));
        assert!(matches!(
            kafka_api_versions_response(KAFKA_CORRELATION_ID, &[1]),
            Probe::Unexpected(_)
        ));
    }

    #[test]
    fn nats_info_lines() {
        assert_eq!(
            nats_info(
                "INFO {\"server_id\":\"X\",\"version\":\"2.15.1\",\"jetstream\":true,\"max_payload\":1048576}\r\n"
            ),
            Probe::Ready("nats-server 2.15.1, JetStream on".into())
        );
        assert!(
            matches!(nats_info("INFO {\"version\":\"2.9.0\"}\r\n"), Probe::Unexpected(m) if m.contains("without JetStream"))
        );
        assert!(
            matches!(nats_info("HTTP/1.1 400 Bad Request"), Probe::Unexpected(m) if m.starts_with("not NATS"))
        );
    }

    #[test]
    fn closed_port() {
        // Bind then drop a listener to find a port where nothing listens.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(probe(Broker::Kafka, port), Probe::Closed);
    }

    #[test]
    fn wrong_protocol() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
            thread::sleep(Duration::from_millis(100));
        });
        assert!(matches!(probe(Broker::Nats, port), Probe::Unexpected(m) if m.contains("SSH-2.0")));
        server.join().unwrap();
    }
}
