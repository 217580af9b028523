//! A core NATS subscriber resumes receiving after nats-server is killed and restarted: the
//! client reconnects and subscribes again, and the stream goes on.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use polybus_core::{Consumer, Event, Publisher};
use polybus_nats::{NatsConsumer, NatsProducer};
use polybus_testkit::brokers::BrokerProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn subscriber_resumes_after_broker_restart() -> anyhow::Result<()> {
    let mut server = BrokerProcess::nats("").await?;
    let url = server.url();
    let consumer = NatsConsumer::connect(&url).await?.queue_group("resume");
    let producer = NatsProducer::connect(&url).await?;
    let mut stream = std::pin::pin!(consumer.subscribe("resilience.core"));
    // The first poll subscribes (with a round trip through the server).
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );

    producer
        .publish("resilience.core", Event::new("before"))
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await?
        .expect("open")?;
    assert_eq!(d.payload(), b"before");

    server.kill().await;
    let down = Instant::now();
    // Publishing while the server is down is buffered by the client, not an error.
    producer
        .publish("resilience.core", Event::new("during"))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start().await?;

    // Probe until a message gets through: at-most-once, so what was published before the
    // subscription is restored may be gone; what is published after it must arrive.
    let mut probes = 0;
    let mut received = Vec::new();
    let resumed = loop {
        assert!(
            down.elapsed() < Duration::from_secs(30),
            "the subscriber did not resume within 30 s"
        );
        probes += 1;
        producer
            .publish("resilience.core", Event::new(format!("after-{probes}")))
            .await?;
        match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            Ok(Some(Ok(d))) => {
                received.push(String::from_utf8_lossy(d.payload()).into_owned());
                if d.payload().starts_with(b"after-") {
                    break down.elapsed();
                }
            }
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => {}
        }
    };
    // And it keeps going.
    for i in 0..100 {
        producer
            .publish("resilience.core", Event::new(format!("steady-{i}")))
            .await?;
    }
    let mut steady = 0;
    while steady < 100 {
        let d = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await?
            .expect("open")?;
        if d.payload().starts_with(b"steady-") {
            steady += 1;
        }
    }
    println!(
        "core nats restart: subscriber resumed {resumed:?} after the kill, {probes} probes \
         published before one arrived, received {received:?}; consumer connection: {} \
         connects, {} disconnects, {} slow-consumer drops; then 100/100 steady messages",
        consumer.connection().connects(),
        consumer.connection().disconnects(),
        consumer.slow_consumer_drops(),
    );
    assert!(consumer.connection().disconnects() >= 1);
    assert!(consumer.connection().connects() >= 2);
    producer.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn slow_consumer_drops_are_counted_not_silent() -> anyhow::Result<()> {
    let server = BrokerProcess::nats("").await?;
    let consumer = polybus_nats::NatsOptions::new(server.url())
        .subscription_capacity(16)
        .consumer()
        .await?;
    let producer = NatsProducer::connect(&server.url()).await?;
    let mut stream = std::pin::pin!(consumer.subscribe("slow"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );
    for i in 0..1000 {
        producer.publish("slow", Event::new(format!("{i}"))).await?;
    }
    producer.flush().await?;
    // Nobody reads meanwhile: the 16-message buffer overflows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = 0;
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        d?;
        got += 1;
    }
    let dropped = consumer.slow_consumer_drops();
    println!("slow consumer: received {got} of 1000, {dropped} drops counted");
    assert!(got < 1000);
    assert!(dropped > 0, "drops must be counted");
    // The client reports drops through a bounded event queue: the count is a lower bound.
    assert!(got as u64 + dropped <= 1000);
    Ok(())
}
