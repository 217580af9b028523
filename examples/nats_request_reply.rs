//! Request-reply on core NATS: a responder in a queue group answers; a request nobody serves
//! fails with `NotFound` (no responders); a silent responder makes the request time out.
//! Needs nats-server (`POLYBUS_NATS_URL`, default nats://127.0.0.1:4222).

use std::time::Duration;

use futures_util::StreamExt;
use polybus::nats::{NatsConsumer, NatsOptions};
use polybus::{ErrorKind, Event};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());

    let service = NatsConsumer::connect(&url).await?.queue_group("clock");
    let mut requests = Box::pin(service.serve("examples.clock.now"));
    // Poll once so the subscription is registered.
    let _ = tokio::time::timeout(Duration::from_millis(200), requests.next()).await;
    let responder = tokio::spawn(async move {
        // Answer three requests, then stop.
        for _ in 0..3 {
            let request = requests.next().await.expect("subscription open")?;
            let reply = Event::builder()
                .kind("clock.reply")
                .data(format!(
                    "it is noon, {}",
                    String::from_utf8_lossy(request.event().data())
                ))
                .build()?;
            request.respond(reply).await?;
        }
        anyhow::Ok(())
    });

    let client = NatsOptions::new(&url)
        .request_timeout(Duration::from_secs(2))
        .producer()
        .await?;
    for who in ["alice", "bob", "carol"] {
        let reply = client
            .request("examples.clock.now", Event::new(who.to_owned()))
            .await?;
        println!("{who}: {}", String::from_utf8_lossy(reply.data()));
    }
    responder.await??;

    match client
        .request("examples.nobody.home", Event::new("?"))
        .await
    {
        Err(e) if e.kind() == ErrorKind::NotFound => println!("no responders: {e}"),
        other => anyhow::bail!("expected NotFound, got {other:?}"),
    }

    let silent = NatsConsumer::connect(&url).await?;
    let mut ignored = Box::pin(silent.serve("examples.clock.silent"));
    let _ = tokio::time::timeout(Duration::from_millis(200), ignored.next()).await;
    match client
        .request_with_timeout(
            "examples.clock.silent",
            Event::new("?"),
            Some(Duration::from_millis(300)),
        )
        .await
    {
        Err(e) if e.kind() == ErrorKind::Timeout => println!("silent responder: {e}"),
        other => anyhow::bail!("expected Timeout, got {other:?}"),
    }
    Ok(())
}
