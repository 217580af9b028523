//! Bad input gives typed errors: invalid topics, oversized records, unreachable brokers,
//! refused credentials, injected broker errors.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use polybus_core::mq::MessageConsumer;
use polybus_core::{Consumer, ErrorKind, Event};
use polybus_kafka::rdkafka::mocking::MockCluster;
use polybus_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use polybus_kafka::{KafkaAdmin, KafkaConfig, KafkaConsumer, KafkaProducer, SaslMechanism};
use polybus_testkit::brokers::{BrokerProcess, TansuStorage};

use crate::common::{brokers, test_config, topic};

const BAD_TOPICS: [&str; 6] = ["", ".", "..", "has space", "a/b", "wild*"];

#[tokio::test]
async fn invalid_topics_are_refused_everywhere() -> anyhow::Result<()> {
    // No broker is contacted: the name is checked first.
    let cfg = KafkaConfig::new("127.0.0.1:1", "g");
    let p = KafkaProducer::new_with_config(&cfg)?;
    let c = KafkaConsumer::new(&cfg)?;
    let long = "a".repeat(250);
    for bad in BAD_TOPICS.iter().copied().chain([long.as_str()]) {
        let e = p.publish(bad, Event::new("x")).await.expect_err(bad);
        ensure!(e.kind() == ErrorKind::InvalidTopic, "publish {bad:?}: {e}");
        let first = c.subscribe(bad).next().await.context("stream ended")?;
        ensure!(
            matches!(&first, Err(e) if e.kind() == ErrorKind::InvalidTopic),
            "subscribe {bad:?}: {first:?}"
        );
        let e = KafkaConsumer::new_with_config(&cfg, &[bad]).expect_err(bad);
        ensure!(
            e.kind() == ErrorKind::InvalidTopic,
            "new_with_config {bad:?}: {e}"
        );
        let mut seed = KafkaConsumer::new(&cfg)?;
        let e = MessageConsumer::subscribe(&mut seed, bad)
            .await
            .expect_err(bad);
        ensure!(
            e.kind() == ErrorKind::InvalidTopic,
            "MessageConsumer::subscribe {bad:?}: {e}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn oversized_records_are_refused_before_sending() -> anyhow::Result<()> {
    let cfg = KafkaConfig::new("127.0.0.1:1", "g").with_message_max_bytes(10_000);
    let p = KafkaProducer::new_with_config(&cfg)?;
    let big = Event::new(vec![0u8; 10_001]);
    let e = p.publish("fine", big).await.expect_err("too big");
    ensure!(e.kind() == ErrorKind::PayloadTooLarge, "{e}");
    // Headers and key count too.
    let almost = Event::builder()
        .key("k".repeat(100))
        .header("x-pad", "v".repeat(100))
        .data(vec![0u8; 9_900])
        .build()?;
    let e = p
        .publish("fine", almost)
        .await
        .expect_err("too big with headers");
    ensure!(e.kind() == ErrorKind::PayloadTooLarge, "{e}");
    Ok(())
}

#[tokio::test]
async fn unreachable_bootstrap_is_connect_within_the_timeout() -> anyhow::Result<()> {
    let port = polybus_testkit::brokers::free_port()?;
    let cfg = KafkaConfig::new(format!("127.0.0.1:{port}"), "g")
        .with_connect_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let p = KafkaProducer::new_with_config(&cfg)?;
    let e = p
        .publish("t", Event::new("x"))
        .await
        .expect_err("no broker");
    ensure!(e.kind() == ErrorKind::Connect, "publish: {e}");
    ensure!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let c = KafkaConsumer::new(&cfg)?;
    let first = c.subscribe("t").next().await.context("stream ended")?;
    ensure!(
        matches!(&first, Err(e) if e.kind() == ErrorKind::Connect),
        "subscribe: {first:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );

    let mut seed = KafkaConsumer::new_with_config(&cfg, &["t"])?;
    let e = seed.next().await.expect_err("no broker");
    ensure!(e.kind() == ErrorKind::Connect, "next: {e}");

    let admin = KafkaAdmin::new(&cfg)?;
    let e = admin.ensure_topic("t").await.expect_err("no broker");
    ensure!(e.kind() == ErrorKind::Connect, "admin: {e}");
    Ok(())
}

#[tokio::test]
async fn a_consumer_outside_a_runtime_is_an_error_not_a_panic() {
    let cfg = KafkaConfig::new("127.0.0.1:1", "g");
    let r = std::thread::spawn(move || KafkaConsumer::new_with_config(&cfg, &["t"]).map(drop))
        .join()
        .expect("no panic");
    assert_eq!(r.expect_err("no runtime").kind(), ErrorKind::Other);
}

#[tokio::test]
async fn a_bad_passthrough_property_is_refused() {
    let cfg = KafkaConfig::new("127.0.0.1:1", "g").set("no.such.property", "1");
    let e = KafkaProducer::new_with_config(&cfg).expect_err("unknown property");
    assert_eq!(e.kind(), ErrorKind::Other);
    assert!(e.to_string().contains("no.such.property"), "{e}");
}

/// Broker-side refusals injected with MockCluster come back typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_broker_errors_are_typed() -> anyhow::Result<()> {
    let mock = MockCluster::new(1)?;
    let t = topic("mock-err");
    mock.create_topic(&t, 1, 1)?;
    let cfg = KafkaConfig::new(mock.bootstrap_servers(), "g")
        .with_create_topics(false)
        .set("message.timeout.ms", "5000");
    let p = KafkaProducer::new_with_config(&cfg)?;
    p.publish(&t, Event::new("warm-up")).await?;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let e = p
        .publish(&t, Event::new("refused"))
        .await
        .expect_err("refused");
    ensure!(e.kind() == ErrorKind::Unauthorized, "{e}");
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    // librdkafka remembers the topic's authorization failure until its next metadata
    // refresh; a fresh producer shows the broker accepts the topic again.
    KafkaProducer::new_with_config(&cfg)?
        .publish(&t, Event::new("after"))
        .await?;
    Ok(())
}

/// tansu supports SCRAM: a broker with `--authentication` refuses a wrong password with
/// `Unauthorized` and accepts the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn wrong_sasl_credentials_are_unauthorized() -> anyhow::Result<()> {
    let mut broker = BrokerProcess::tansu(TansuStorage::Sqlite).await?;
    let tansu = polybus_testkit::brokers::cache_dir().join("tansu/bin/tansu");
    let out = tokio::process::Command::new(tansu)
        .args(["user", "create", "--broker"])
        .arg(format!("tcp://127.0.0.1:{}", broker.port()))
        .args(["--mechanism", "scram512", "alice", "s3cret"])
        .output()
        .await?;
    ensure!(out.status.success(), "tansu user create: {out:?}");
    broker.kill().await;
    broker.args_mut().push("--authentication".into());
    broker.start().await?;

    let base = |pw: &str| {
        test_config(&broker.url(), "g")
            .with_sasl(SaslMechanism::ScramSha512, "alice", pw)
            .with_connect_timeout(Duration::from_secs(5))
    };
    let wrong = KafkaProducer::new_with_config(&base("wrong"))?;
    let e = wrong
        .publish("secured", Event::new("x"))
        .await
        .expect_err("wrong password");
    if e.kind() != ErrorKind::Unauthorized {
        let log = std::fs::read_to_string(broker.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        anyhow::bail!("wrong password: {e}; broker log (newest first): {tail:#?}");
    }
    ensure!(
        !format!("{:?}", base("wrong")).contains("wrong\""),
        "password in Debug"
    );

    let right = KafkaProducer::new_with_config(&base("s3cret"))?;
    right
        .publish("secured", Event::new("x"))
        .await
        .context("right password")?;
    Ok(())
}

/// Against the shared broker: a record over the limit is refused, the next one goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn publisher_keeps_working_after_refusals() -> anyhow::Result<()> {
    let cfg = test_config(&brokers(), "g");
    let p = KafkaProducer::new_with_config(&cfg)?;
    let t = topic("errors");
    ensure!(
        p.publish(&t, Event::new(vec![0u8; 1_000_001]))
            .await
            .is_err()
    );
    ensure!(p.publish("bad topic", Event::new("x")).await.is_err());
    let r = p.publish(&t, Event::new("fine")).await?;
    ensure!(r.partition().is_some() && r.sequence().is_some(), "{r:?}");
    Ok(())
}
