//! A handler's `Reply` answers a native core NATS request: the requester (`NatsProducer::request`)
//! gets the reply on its inbox, with the request's id as the correlation id.

use std::time::Duration;

use polybus_core::Event;
use polybus_runtime::{App, CORRELATION_ID, Reply};

use crate::conformance::{Backend, NatsBackend};

async fn price(ev: Event) -> Reply {
    Reply(Event::new(format!(
        "price of {}: 42",
        String::from_utf8_lossy(ev.data())
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn reply_answers_a_core_nats_request() -> anyhow::Result<()> {
    let b = NatsBackend;
    let topic = b.topic();
    let app = App::new().route(topic.clone(), price);
    let health = app.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = b.consumer("prices").await?;
    let publisher = b.publisher().await?;
    let running = tokio::spawn(app.run_until(consumer, publisher, async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !health.is_ready() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the app never got ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let requester = b.publisher().await?;
    for item in ["tea", "coffee"] {
        let request = Event::new(item);
        let id = request.id().to_owned();
        let reply = requester
            .request_with_timeout(&topic, request, Some(Duration::from_secs(10)))
            .await?;
        assert_eq!(&reply.data()[..], format!("price of {item}: 42").as_bytes());
        assert_eq!(reply.headers().get(CORRELATION_ID), Some(id.as_str()));
    }
    let _ = stop.send(());
    running.await??;
    Ok(())
}
