//! What every subcommand shares: errors with exit codes, URLs with credentials, connecting.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use polybus::{BoxConsumer, BoxPublisher, ErrorKind, PublisherExt as _};

/// TLS settings from `--tls-ca`, `--tls-cert`, `--tls-key` (or their environment
/// variables), for every connection the command makes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tls {
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

static TLS: OnceLock<Tls> = OnceLock::new();

impl Tls {
    /// Sets the process-wide settings (once, from `main`).
    pub(crate) fn install(self) -> Result<(), Failure> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(Failure::usage(
                "--tls-cert and --tls-key go together (a client certificate and its key)",
            ));
        }
        for p in [&self.ca, &self.cert, &self.key].into_iter().flatten() {
            if !p.is_file() {
                return Err(Failure::usage(format!(
                    "TLS file {} does not exist",
                    p.display()
                )));
            }
        }
        let _ = TLS.set(self);
        Ok(())
    }

    fn get() -> Option<&'static Tls> {
        TLS.get().filter(|t| t.ca.is_some() || t.cert.is_some())
    }

    fn read(path: &Path) -> polybus::Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| {
            polybus::Error::new(ErrorKind::Connect, "polybus")
                .with_message(format!("cannot read {}: {e}", path.display()))
        })
    }
}

/// An error ready for the user: the exit code and what to print.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    /// Exit code 2: the command line or a config file is wrong.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
    /// Exit code 1: an operation failed.
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

/// A URL with credentials from the environment filled in, and how to show it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) shown: String,
    secret: Option<String>,
}

impl Target {
    pub(crate) fn new(url: &str, group: Option<&str>) -> Result<Self, Failure> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Failure::usage(
                "not a URL: expected scheme://[user:password@]host[:port][?k=v] \
                 (schemes: memory, nats, jetstream, kafka, mqtt)",
            ));
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let mut authority = authority.to_owned();
        if !authority.contains('@')
            && let Ok(user) = std::env::var("POLYBUS_USER")
        {
            let password = std::env::var("POLYBUS_PASSWORD").unwrap_or_default();
            let creds = if password.is_empty() {
                percent_encode(&user)
            } else {
                format!("{}:{}", percent_encode(&user), percent_encode(&password))
            };
            authority = format!("{creds}@{authority}");
        }
        let query = match (group, query) {
            (Some(g), Some(q)) => Some(format!("group={}&{q}", percent_encode(g))),
            (Some(g), None) => Some(format!("group={}", percent_encode(g))),
            (None, q) => q.map(str::to_owned),
        };
        let (shown_auth, secret) = match authority.rsplit_once('@') {
            Some((info, host)) => match info.split_once(':') {
                Some((u, p)) => (format!("{u}:***@{host}"), Some(p.to_owned())),
                None => (authority.clone(), None),
            },
            None => (authority.clone(), None),
        };
        let with_query = |a: &str| match &query {
            Some(q) => format!("{scheme}://{a}?{q}"),
            None => format!("{scheme}://{a}"),
        };
        Ok(Target {
            url: with_query(&authority),
            shown: with_query(&shown_auth),
            secret: secret.filter(|s| !s.is_empty()),
        })
    }

    /// The scheme (`nats`, `kafka`, ...).
    pub(crate) fn scheme(&self) -> &str {
        self.url.split_once("://").map_or("", |(s, _)| s)
    }

    /// A query parameter of the URL.
    pub(crate) fn param(&self, key: &str) -> Option<&str> {
        let (_, query) = self.url.split_once('?')?;
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// `text` with the password replaced by `***`.
    pub(crate) fn redact(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) => text.replace(secret.as_str(), "***"),
            None => text.to_owned(),
        }
    }

    /// Turns a polybus error into a message that says what to do next.
    pub(crate) fn fail(&self, err: &polybus::Error, doing: &str) -> Failure {
        let text = self.redact(&err.to_string());
        let url = &self.shown;
        let backend = err.backend();
        let (code, message) = match err.kind() {
            ErrorKind::Connect => (
                3,
                format!(
                    "cannot reach the broker at {url} while {doing}: {text}\n\
                     hint: is the broker running and listening on that host and port? \
                     Is the scheme right (nats, jetstream, kafka, mqtt)?"
                ),
            ),
            ErrorKind::Timeout => (
                3,
                format!(
                    "no answer from the broker at {url} while {doing}: {text}\n\
                     hint: check that the host and port are the broker's and that it is healthy"
                ),
            ),
            ErrorKind::Unauthorized => (
                4,
                format!(
                    "{backend} refused the credentials or a permission for {url} while {doing}: \
                     {text}\nhint: check user:password in the URL (or POLYBUS_USER and \
                     POLYBUS_PASSWORD) and the broker's permissions for the topic"
                ),
            ),
            ErrorKind::Unsupported | ErrorKind::InvalidTopic | ErrorKind::InvalidHeader => {
                (2, format!("{text} (while {doing} on {url})"))
            }
            _ => (1, format!("{text} (while {doing} on {url})")),
        };
        Failure { code, message }
    }

    /// Connects: [`polybus::connect`], plus what the command line adds to its URLs:
    /// `session_expiry=SECS` on MQTT (a persistent session: clean start off, the broker keeps
    /// the subscription and unacknowledged messages that long; give a fixed `client_id`),
    /// `ack_wait=SECS` and `deliver=new|all|<RFC 3339 time>` on JetStream.
    pub(crate) async fn connect(
        &self,
        doing: &str,
    ) -> Result<(BoxPublisher, BoxConsumer), Failure> {
        let fail = |e: polybus::Error| self.fail(&e, doing);
        let tls = Tls::get();
        match self.scheme() {
            "kafka" if tls.is_some() || self.param("start_time").is_some() => {
                self.connect_kafka(tls).map_err(fail)
            }
            "nats" if tls.is_some() => self.connect_nats().await.map_err(fail),
            "mqtt" if self.param("session_expiry").is_some() || tls.is_some() => {
                self.connect_mqtt().await.map_err(fail)
            }
            "jetstream"
                if tls.is_some()
                    || self.param("ack_wait").is_some()
                    || self.param("deliver").is_some() =>
            {
                self.connect_jetstream().await.map_err(fail)
            }
            _ => polybus::connect(&self.url).await.map_err(fail),
        }
    }

    fn parts(&self) -> (&str, Option<&str>) {
        let rest = self.url.split_once("://").map_or("", |(_, r)| r);
        let authority = rest.split_once('?').map_or(rest, |(a, _)| a);
        let authority = authority.trim_end_matches('/');
        match authority.rsplit_once('@') {
            Some((info, host)) => (host, Some(info)),
            None => (authority, None),
        }
    }

    fn bad(&self, what: &str) -> polybus::Error {
        polybus::Error::new(ErrorKind::Unsupported, "polybus")
            .with_message(format!("{what} in {}", self.shown))
    }

    /// The Kafka configuration of a `kafka://` URL as [`polybus::connect`] reads it (`group`,
    /// default `polybus`; `offset`; credentials as SASL with `sasl=plain|scram-sha-256|
    /// scram-sha-512`, default SCRAM-SHA-512), plus what the command adds: the TLS flags
    /// (`security.protocol` SSL or SASL_SSL, `ssl.ca.location`, `ssl.certificate.location`,
    /// `ssl.key.location`) and `start_time=<RFC 3339>` (`tail --from <time>`).
    pub(crate) fn kafka_config(
        &self,
        tls: Option<&Tls>,
    ) -> polybus::Result<polybus::kafka::KafkaConfig> {
        use polybus::kafka::{KafkaConfig, SaslMechanism};
        let (host, info) = self.parts();
        let group = self.param("group").map_or("polybus".into(), percent_decode);
        let mut cfg = KafkaConfig::new(host, group)
            .with_auto_offset_reset(self.param("offset").unwrap_or("earliest"));
        if let Some(info) = info {
            let (u, p) = info.split_once(':').unwrap_or((info, ""));
            let mechanism = match self.param("sasl").unwrap_or("scram-sha-512") {
                "plain" => SaslMechanism::Plain,
                "scram-sha-256" => SaslMechanism::ScramSha256,
                "scram-sha-512" => SaslMechanism::ScramSha512,
                _ => return Err(self.bad("sasl is not plain, scram-sha-256 or scram-sha-512")),
            };
            cfg = cfg.with_sasl(mechanism, percent_decode(u), percent_decode(p));
        }
        if let Some(tls) = tls {
            cfg = cfg.with_tls(true);
            if let Some(ca) = &tls.ca {
                cfg = cfg.with_tls_ca(ca.to_string_lossy());
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                cfg = cfg.with_tls_client_cert(cert.to_string_lossy(), key.to_string_lossy(), None);
            }
        }
        if let Some(t) = self.param("start_time") {
            let t = polybus::time::parse_rfc3339(&percent_decode(t))
                .ok_or_else(|| self.bad("start_time is not an RFC 3339 time"))?;
            cfg = cfg.with_start_time(Some(t));
        }
        Ok(cfg)
    }

    fn connect_kafka(&self, tls: Option<&Tls>) -> polybus::Result<(BoxPublisher, BoxConsumer)> {
        let cfg = self.kafka_config(tls)?;
        let publisher = polybus::kafka::KafkaProducer::new_with_config(&cfg)?;
        let consumer = polybus::kafka::KafkaConsumer::new(&cfg)?;
        Ok((publisher.boxed(), BoxConsumer::new(consumer)))
    }

    async fn connect_mqtt(&self) -> polybus::Result<(BoxPublisher, BoxConsumer)> {
        use polybus::mqtt_client::MqttConfig;
        let (host, info) = self.parts();
        let (host, port) = match host.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| self.bad("bad port"))?),
            None => (host, 1883),
        };
        let expiry = match self.param("session_expiry") {
            Some(s) => Some(
                s.parse::<u64>()
                    .map_err(|_| self.bad("session_expiry is not a number of seconds"))?,
            ),
            None => None,
        };
        let client_id = match (self.param("client_id"), expiry) {
            (Some(id), _) => percent_decode(id),
            (None, Some(_)) => {
                return Err(self.bad("session_expiry needs a fixed client_id (the session's name)"));
            }
            (None, None) => format!("polybus-{}", polybus::new_id()),
        };
        let mut cfg = MqttConfig::new(host, port, client_id);
        if let Some(expiry) = expiry {
            cfg = cfg
                .clean_start(false)
                .session_expiry(Duration::from_secs(expiry));
        }
        if let Some(tls) = Tls::get() {
            let mut opts = polybus::mqtt::TlsOptions::new();
            if let Some(ca) = &tls.ca {
                opts = opts.ca_pem(Tls::read(ca)?);
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                opts = opts.client_auth_pem(Tls::read(cert)?, Tls::read(key)?);
            }
            cfg = cfg.tls(opts);
        }
        if let Some(info) = info {
            let (u, p) = info.split_once(':').unwrap_or((info, ""));
            cfg = cfg.credentials(percent_decode(u), percent_decode(p));
        }
        let client = cfg.connect().await?;
        let consumer = client.subscriber(self.param("group"));
        Ok((client.producer().boxed(), BoxConsumer::new(consumer)))
    }

    async fn connect_nats(&self) -> polybus::Result<(BoxPublisher, BoxConsumer)> {
        let rest = self.url.split_once("://").map_or("", |(_, r)| r);
        let authority = rest.split_once('?').map_or(rest, |(a, _)| a);
        let opts = nats_options(authority);
        let publisher = opts.clone().producer().await?;
        let mut consumer = opts.consumer().await?;
        if let Some(g) = self.param("group") {
            consumer = consumer.queue_group(percent_decode(g));
        }
        Ok((publisher.boxed(), BoxConsumer::new(consumer)))
    }

    async fn connect_jetstream(&self) -> polybus::Result<(BoxPublisher, BoxConsumer)> {
        use polybus::jetstream::{ConsumerSettings, DeliverPolicy, JsOptions, StreamPolicy};
        let rest = self.url.split_once("://").map_or("", |(_, r)| r);
        let authority = rest.split_once('?').map_or(rest, |(a, _)| a);
        let mut settings = ConsumerSettings::default();
        if let Some(secs) = self.param("ack_wait") {
            let secs: f64 = secs
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0)
                .ok_or_else(|| self.bad("ack_wait is not a positive number of seconds"))?;
            settings = settings.ack_wait(Duration::from_secs_f64(secs.min(1e9)));
        }
        if let Some(from) = self.param("deliver") {
            let policy = match from {
                "all" | "earliest" => DeliverPolicy::All,
                "new" | "latest" => DeliverPolicy::New,
                t => {
                    let t = polybus::time::parse_rfc3339(&percent_decode(t))
                        .ok_or_else(|| self.bad("deliver is not all, new or an RFC 3339 time"))?;
                    DeliverPolicy::ByStartTime {
                        start_time: time::OffsetDateTime::from(t),
                    }
                }
            };
            settings = settings.deliver_policy(policy);
        }
        let mut opts = JsOptions::from_nats(nats_options(authority))
            .stream_policy(StreamPolicy::PerTopic {
                prefix: self.param("stream_prefix").unwrap_or("polybus_").to_owned(),
            })
            .consumer_settings(settings);
        if let Some(g) = self.param("group") {
            opts = opts.group(percent_decode(g));
        }
        let publisher = opts.clone().producer().await?;
        let consumer = opts.consumer().await?;
        Ok((publisher.boxed(), BoxConsumer::new(consumer)))
    }
}

/// NATS connection options for `user:password@host:port`, with the TLS flags applied.
fn nats_options(authority: &str) -> polybus::nats_client::NatsOptions {
    let mut opts = polybus::nats_client::NatsOptions::new(format!("nats://{authority}"));
    if let Some(tls) = Tls::get() {
        opts = opts.require_tls(true);
        if let Some(ca) = &tls.ca {
            opts = opts.tls_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            opts = opts.tls_client_certificate(cert.clone(), key.clone());
        }
    }
    opts
}

/// Percent-encodes everything but unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX`; a malformed escape is kept as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a topic has the wildcards of any backend.
pub(crate) fn has_wildcards(topic: &str) -> bool {
    topic.contains(['*', '>', '+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_hide_the_password_and_take_the_group() {
        let t = Target::new("kafka://svc:hunter2@h:9092?offset=latest", Some("g 1")).unwrap();
        assert_eq!(
            t.url,
            "kafka://svc:hunter2@h:9092?group=g%201&offset=latest"
        );
        assert_eq!(t.shown, "kafka://svc:***@h:9092?group=g%201&offset=latest");
        assert_eq!(t.param("offset"), Some("latest"));
        assert_eq!(t.scheme(), "kafka");
        let err = polybus::Error::new(ErrorKind::Unauthorized, "kafka")
            .with_message("SASL failed for hunter2");
        let f = t.fail(&err, "connecting");
        assert_eq!(f.code, 4);
        assert!(!f.message.contains("hunter2"), "{}", f.message);
        assert!(f.message.contains("kafka refused"), "{}", f.message);
        assert_eq!(Target::new("nope", None).unwrap_err().code, 2);
    }

    #[test]
    fn kafka_tls_flags_and_credentials_map_to_librdkafka_properties() {
        let tls = Tls {
            ca: Some("/etc/ca.pem".into()),
            cert: Some("/etc/client.pem".into()),
            key: Some("/etc/client.key".into()),
        };
        let plain = Target::new("kafka://h:9093", None).unwrap();
        let c = plain
            .kafka_config(Some(&tls))
            .unwrap()
            .common_client_config();
        assert_eq!(c.get("bootstrap.servers"), Some("h:9093"));
        assert_eq!(c.get("security.protocol"), Some("SSL"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(c.get("ssl.certificate.location"), Some("/etc/client.pem"));
        assert_eq!(c.get("ssl.key.location"), Some("/etc/client.key"));
        assert_eq!(c.get("sasl.mechanism"), None);

        // Only a CA: server verification, no client certificate.
        let ca_only = Tls {
            ca: tls.ca.clone(),
            ..Tls::default()
        };
        let c = plain
            .kafka_config(Some(&ca_only))
            .unwrap()
            .common_client_config();
        assert_eq!(c.get("security.protocol"), Some("SSL"));
        assert_eq!(c.get("ssl.certificate.location"), None);

        // Credentials and TLS: SASL over TLS, the mechanism from ?sasl=.
        let sasl = Target::new("kafka://svc%40eu:p%3Ass@h:9093?sasl=plain&group=g", None).unwrap();
        let cfg = sasl.kafka_config(Some(&tls)).unwrap();
        assert_eq!(cfg.group_id(), "g");
        let c = cfg.common_client_config();
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(c.get("sasl.username"), Some("svc@eu"));
        assert_eq!(c.get("sasl.password"), Some("p:ss"));
        assert!(!format!("{cfg:?}").contains("p:ss"));

        // Credentials without TLS: SASL_PLAINTEXT, SCRAM-SHA-512 by default; no flags, no TLS.
        let c = Target::new("kafka://u:p@h:9092", None)
            .unwrap()
            .kafka_config(None)
            .unwrap()
            .common_client_config();
        assert_eq!(c.get("security.protocol"), Some("SASL_PLAINTEXT"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        let c = plain.kafka_config(None).unwrap().common_client_config();
        assert_eq!(c.get("security.protocol"), None);

        let bad = Target::new("kafka://u:p@h:9092?sasl=rot13", None).unwrap();
        assert!(bad.kafka_config(None).is_err());
    }

    #[test]
    fn kafka_start_time_comes_from_the_url() {
        let t = Target::new("kafka://h:9092?start_time=2026-12-04T09%3A00%3A00Z", None).unwrap();
        let cfg = t.kafka_config(None).unwrap();
        assert_eq!(
            cfg.start_time(),
            polybus::time::parse_rfc3339("2026-12-04T09:00:00Z")
        );
        let bad = Target::new("kafka://h:9092?start_time=yesterday", None).unwrap();
        assert!(bad.kafka_config(None).is_err());
    }

    #[test]
    fn percent_decoding_undoes_encoding_and_keeps_bad_escapes() {
        for s in ["a b", "p@ss:w/rd%", "é"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("100%zz%4"), "100%zz%4");
    }
}
