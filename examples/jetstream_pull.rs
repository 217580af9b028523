//! The seed 7.5 pull loop: a durable pull consumer `c1`, `fetch` 100 messages with a 1 s
//! expiry, process and ack each, until the stream is drained. polybus creates (or binds) the
//! stream and the consumer; `JsConsumer` runs this same loop inside its subscriptions.
//! Needs nats-server with JetStream (`POLYBUS_NATS_URL`, default nats://127.0.0.1:4222).

use std::time::Duration;

use futures_util::StreamExt;
use polybus::jetstream::{ConsumerSettings, JsOptions, StreamSettings};
use polybus::{Event, Publisher};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let (stream, subject) = ("EXAMPLES_PULL", "examples.pull.orders");

    let js = JsOptions::new(&url).connect().await?;
    js.ensure_stream(
        stream,
        &[subject],
        &StreamSettings::default().max_age(Duration::from_secs(3600)),
    )
    .await?;
    let producer = js.producer();
    for i in 0..250 {
        producer
            .publish(subject, Event::new(format!(r#"{{"order":{i}}}"#)))
            .await?;
    }

    // consume_js(stream, subject) from the seed:
    let consumer = js
        .ensure_consumer(stream, "c1", None, &ConsumerSettings::default())
        .await?;
    let mut processed = 0;
    loop {
        let mut messages = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_millis(1000))
            .messages()
            .await?;
        let mut in_batch = 0;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!(e))?;
            // process the business event ...
            in_batch += 1;
            msg.ack().await.map_err(|e| anyhow::anyhow!(e))?; // confirm consumption
        }
        processed += in_batch;
        println!("batch of {in_batch}");
        if in_batch == 0 {
            break; // drained: the seed loops forever, the example stops here
        }
    }
    println!("processed {processed} messages");
    Ok(())
}
