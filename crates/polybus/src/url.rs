//! Choosing a backend at run time from a URL.

use polybus_core::{
    BoxConsumer, BoxPublisher, Error, ErrorKind, MemoryBroker, PublisherExt, Result,
};

/// Connects to the backend named by `url` and returns an erased publisher and consumer.
///
/// | URL | backend | feature |
/// |---|---|---|
/// | `memory://` | a new [`MemoryBroker`] | always |
/// | `nats://host:4222?group=workers` | core NATS; `group` is the queue group | `nats` |
/// | `jetstream://host:4222?group=g1` | JetStream; a stream per topic is created on first use; `group` is the durable consumer | `jetstream` |
/// | `mqtt://host:1883?client_id=c1&group=g1` | MQTT 5; `group` makes shared subscriptions (`$share/g1/...`); a random client id by default | `mqtt` |
/// | `kafka://host:9092?group=g1&offset=earliest` | Kafka; `group` is the consumer group (default `polybus`) | `kafka` |
///
/// Credentials go before the host, percent-encoded where needed: `user:password@host:port`.
/// NATS and JetStream pass them to the server (user and password, or a token alone), MQTT
/// sends them in CONNECT, Kafka uses SASL (`sasl=plain`, `scram-sha-256` or `scram-sha-512`,
/// the default). Errors never repeat the password: they show the URL as
/// `user:***@host:port`.
///
/// ```
/// use polybus::{Consumer, PublisherExt};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> polybus::Result<()> {
/// let (publisher, consumer) = polybus::connect("memory://?group=billing").await?;
/// assert!(consumer.capabilities().consumer_groups);
/// publisher.send("orders", b"{}").await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`ErrorKind::Unsupported`] for an unknown scheme or one whose feature is off, otherwise
/// what the backend's connect returns.
pub async fn connect(url: &str) -> Result<(BoxPublisher, BoxConsumer)> {
    let parsed = Url::parse(url)?;
    match parsed.scheme {
        "memory" => {
            let broker = MemoryBroker::new();
            let consumer = match parsed.param("group") {
                Some(g) => broker.consumer_group(g),
                None => broker.consumer(),
            };
            Ok((broker.publisher().boxed(), BoxConsumer::new(consumer)))
        }
        #[cfg(feature = "nats")]
        "nats" => {
            let server = format!("nats://{}", parsed.authority);
            let publisher = polybus_nats::NatsProducer::connect(&server).await?;
            let mut consumer = polybus_nats::NatsConsumer::connect(&server).await?;
            if let Some(g) = parsed.param("group") {
                consumer = consumer.queue_group(g);
            }
            Ok((publisher.boxed(), BoxConsumer::new(consumer)))
        }
        #[cfg(feature = "jetstream")]
        "jetstream" => {
            let mut opts =
                polybus_jetstream::JsOptions::new(format!("nats://{}", parsed.authority))
                    .stream_policy(polybus_jetstream::StreamPolicy::PerTopic {
                        prefix: parsed
                            .param("stream_prefix")
                            .unwrap_or("polybus_")
                            .to_owned(),
                    });
            if let Some(g) = parsed.param("group") {
                opts = opts.group(g);
            }
            let publisher = opts.clone().producer().await?;
            let consumer = opts.consumer().await?;
            Ok((publisher.boxed(), BoxConsumer::new(consumer)))
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            let mut cfg = polybus_kafka::KafkaConfig::new(
                parsed.host,
                parsed.param("group").unwrap_or("polybus"),
            )
            .with_auto_offset_reset(parsed.param("offset").unwrap_or("earliest"));
            if let Some((user, password)) = parsed.credentials()? {
                use polybus_kafka::SaslMechanism as M;
                let mechanism = match parsed.param("sasl").unwrap_or("scram-sha-512") {
                    "plain" => M::Plain,
                    "scram-sha-256" => M::ScramSha256,
                    "scram-sha-512" => M::ScramSha512,
                    other => {
                        return Err(Error::new(ErrorKind::Connect, "polybus").with_message(
                            format!(
                                "unknown sasl={other:?} in {} (plain, scram-sha-256 or \
                                 scram-sha-512)",
                                parsed.redacted()
                            ),
                        ));
                    }
                };
                cfg = cfg.with_sasl(mechanism, user, password.unwrap_or_default());
            }
            let publisher = polybus_kafka::KafkaProducer::new_with_config(&cfg)?;
            let consumer = polybus_kafka::KafkaConsumer::new(&cfg)?;
            Ok((publisher.boxed(), BoxConsumer::new(consumer)))
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => {
            let (host, port) = match parsed.host.rsplit_once(':') {
                Some((h, p)) => (
                    h,
                    p.parse().map_err(|_| {
                        Error::new(ErrorKind::Connect, "polybus")
                            .with_message(format!("bad port in {}", parsed.redacted()))
                    })?,
                ),
                None => (parsed.host, 1883),
            };
            let client_id = parsed
                .param("client_id")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("polybus-{}", polybus_core::new_id()));
            let mut cfg = polybus_mqtt::MqttConfig::new(host, port, client_id);
            if let Some((user, password)) = parsed.credentials()? {
                cfg = cfg.credentials(user, password.unwrap_or_default());
            }
            let client = cfg.connect().await?;
            let consumer = client.subscriber(parsed.param("group"));
            Ok((client.producer().boxed(), BoxConsumer::new(consumer)))
        }
        other => Err(Error::unsupported(
            "polybus",
            format!("no backend for scheme {other:?} (is its feature enabled?)"),
        )),
    }
}

/// Just enough URL parsing for `scheme://[user[:password]@]host?k=v&k2=v2`.
struct Url<'a> {
    scheme: &'a str,
    /// `user[:password]@host`, as given (the NATS client reads credentials from it).
    authority: &'a str,
    /// `user[:password]`, still percent-encoded.
    userinfo: Option<&'a str>,
    /// `host[:port]`.
    host: &'a str,
    query: Vec<(&'a str, &'a str)>,
}

impl<'a> Url<'a> {
    fn parse(url: &'a str) -> Result<Self> {
        // The input is not echoed: it may hold a password.
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::new(ErrorKind::Connect, "polybus")
                .with_message("not a URL: expected scheme://[user:password@]host[:port][?k=v]")
        })?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let query = query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .collect();
        Ok(Url {
            scheme,
            authority,
            userinfo,
            host,
            query,
        })
    }

    fn param(&self, key: &str) -> Option<&'a str> {
        self.query.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The user and password, percent-decoded.
    fn credentials(&self) -> Result<Option<(String, Option<String>)>> {
        let Some(info) = self.userinfo else {
            return Ok(None);
        };
        let (user, password) = match info.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (info, None),
        };
        let bad = || {
            Error::new(ErrorKind::Connect, "polybus").with_message(format!(
                "bad percent-encoding in the credentials of {}",
                self.redacted()
            ))
        };
        let user = percent_decode(user).ok_or_else(bad)?;
        let password = password
            .map(|p| percent_decode(p).ok_or_else(bad))
            .transpose()?;
        Ok(Some((user, password)))
    }

    /// The URL for messages: `scheme://user:***@host?query`, never the password.
    fn redacted(&self) -> String {
        let user = match self.userinfo {
            Some(info) => match info.split_once(':') {
                Some((u, _)) => format!("{u}:***@"),
                None => format!("{info}@"),
            },
            None => String::new(),
        };
        format!("{}://{user}{}", self.scheme, self.host)
    }
}

impl std::fmt::Debug for Url<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `%XX` sequences to bytes; `None` for a bad sequence or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Not part of the API: no
/// semver promise, hidden from the docs.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use polybus_core::Result;

    /// What [`connect`](super::connect) reads from a URL.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ParsedUrl {
        /// The scheme (`nats`, `kafka`, ...).
        pub scheme: String,
        /// `user[:password]@host`, as given.
        pub authority: String,
        /// `host[:port]`.
        pub host: String,
        /// The query parameters in order.
        pub query: Vec<(String, String)>,
        /// The user and password, percent-decoded, or the error for bad percent-encoding.
        pub credentials: std::result::Result<Option<(String, Option<String>)>, String>,
        /// The URL as error messages show it (never the password).
        pub redacted: String,
        /// The parsed URL's `Debug` output.
        pub debug: String,
    }

    /// Parses `url` as [`connect`](super::connect) does, without connecting.
    ///
    /// # Errors
    /// [`ErrorKind::Connect`](polybus_core::ErrorKind::Connect) for what is not a URL.
    pub fn parse_url(url: &str) -> Result<ParsedUrl> {
        let u = super::Url::parse(url)?;
        Ok(ParsedUrl {
            scheme: u.scheme.to_owned(),
            authority: u.authority.to_owned(),
            host: u.host.to_owned(),
            query: u
                .query
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            credentials: u.credentials().map_err(|e| e.to_string()),
            redacted: u.redacted(),
            debug: format!("{u:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scheme_authority_and_query() {
        let u = Url::parse("kafka://127.0.0.1:9092/?group=g1&offset=latest&flag").unwrap();
        assert_eq!((u.scheme, u.authority), ("kafka", "127.0.0.1:9092"));
        assert_eq!(u.param("group"), Some("g1"));
        assert_eq!(u.param("offset"), Some("latest"));
        assert_eq!(u.param("flag"), Some(""));
        assert_eq!(u.param("missing"), None);
        assert_eq!(Url::parse("nope").unwrap_err().kind(), ErrorKind::Connect);
    }

    #[test]
    fn credentials_are_split_from_the_host_and_never_shown() {
        let u = Url::parse("mqtt://svc%40eu:p%3Ass@broker:8883?client_id=c").unwrap();
        assert_eq!(u.host, "broker:8883");
        assert_eq!(
            u.credentials().unwrap(),
            Some(("svc@eu".to_owned(), Some("p:ss".to_owned())))
        );
        assert_eq!(u.redacted(), "mqtt://svc%40eu:***@broker:8883");
        assert!(!format!("{u:?}").contains("p%3Ass"));
        let token = Url::parse("nats://s3cr3t@host:4222").unwrap();
        assert_eq!(
            token.credentials().unwrap(),
            Some(("s3cr3t".to_owned(), None))
        );
        assert_eq!(
            Url::parse("kafka://h:1").unwrap().credentials().unwrap(),
            None
        );
        let bad = Url::parse("kafka://u:%zz@h:1").unwrap();
        assert!(!bad.credentials().unwrap_err().to_string().contains("%zz"));
        let not_a_url = Url::parse("user:hunter2@host").unwrap_err();
        assert!(!not_a_url.to_string().contains("hunter2"));
    }

    #[cfg(feature = "mqtt")]
    #[tokio::test]
    async fn connect_errors_do_not_echo_the_password() {
        let err = connect("mqtt://user:hunter2@127.0.0.1:notaport")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connect);
        let text = format!("{err} {err:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("user:***@127.0.0.1:notaport"), "{text}");
    }

    #[cfg(feature = "kafka")]
    #[tokio::test]
    async fn an_unknown_sasl_mechanism_is_named_without_the_password() {
        let err = connect("kafka://user:hunter2@127.0.0.1:9?sasl=rot13")
            .await
            .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(
            text.contains("rot13") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unknown_schemes_are_unsupported() {
        let err = connect("carrier-pigeon://coop").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }
}
