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
            let cfg = polybus_kafka::KafkaConfig::new(
                parsed.authority,
                parsed.param("group").unwrap_or("polybus"),
            )
            .with_auto_offset_reset(parsed.param("offset").unwrap_or("earliest"));
            let publisher = polybus_kafka::KafkaProducer::new_with_config(&cfg)?;
            let consumer = polybus_kafka::KafkaConsumer::new(&cfg)?;
            Ok((publisher.boxed(), BoxConsumer::new(consumer)))
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => {
            let (host, port) = match parsed.authority.rsplit_once(':') {
                Some((h, p)) => (
                    h,
                    p.parse().map_err(|_| {
                        Error::new(ErrorKind::Connect, "polybus")
                            .with_message(format!("bad port in {url:?}"))
                    })?,
                ),
                None => (parsed.authority, 1883),
            };
            let client_id = parsed
                .param("client_id")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("polybus-{}", polybus_core::new_id()));
            let client = polybus_mqtt::MqttConfig::new(host, port, client_id)
                .connect()
                .await?;
            let consumer = client.subscriber(parsed.param("group"));
            Ok((client.producer().boxed(), BoxConsumer::new(consumer)))
        }
        other => Err(Error::unsupported(
            "polybus",
            format!("no backend for scheme {other:?} (is its feature enabled?)"),
        )),
    }
}

/// Just enough URL parsing for `scheme://authority?k=v&k2=v2`.
#[derive(Debug)]
struct Url<'a> {
    scheme: &'a str,
    authority: &'a str,
    query: Vec<(&'a str, &'a str)>,
}

impl<'a> Url<'a> {
    fn parse(url: &'a str) -> Result<Self> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::new(ErrorKind::Connect, "polybus")
                .with_message(format!("{url:?} is not a URL (scheme://...)"))
        })?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let query = query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .collect();
        Ok(Url {
            scheme,
            authority: authority.trim_end_matches('/'),
            query,
        })
    }

    fn param(&self, key: &str) -> Option<&'a str> {
        self.query.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
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

    #[tokio::test]
    async fn unknown_schemes_are_unsupported() {
        let err = connect("carrier-pigeon://coop").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }
}
