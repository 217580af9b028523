//! Compile-time proof that the public futures and streams are `Send` and spawnable, in the
//! style of tokio's `tests/async_send_sync.rs`. If a change makes one of them `!Send`, this file
//! stops compiling.

use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::{
    BoxConsumer, BoxPublisher, Consumer, Delivery, Event, MemoryBroker, MemoryConsumer,
    MemoryPublisher, Publisher, PublisherExt,
};

fn require_send<T: Send>(_: &T) {}
fn require_sync<T: Sync>(_: &T) {}
fn require_static<T: 'static>(_: &T) {}

#[allow(dead_code, clippy::diverging_sub_expression)]
fn futures_and_streams_are_send(
    p: MemoryPublisher,
    c: MemoryConsumer,
    bp: BoxPublisher,
    bc: BoxConsumer,
    d: Delivery,
) {
    require_send(&p.publish("t", Event::new(b"x")));
    require_send(&p.flush());
    require_send(&p.close());
    require_send(&p.send("t", b"x"));
    require_send(&p.publish_json("t", &1));
    require_send(&c.subscribe("t"));
    require_send(&bp.publish("t", Event::new(b"x")));
    require_send(&bc.subscribe("t"));
    require_sync(&d);
    require_static(&d);
    require_send(&d.ack());
}

/// A generic consume loop over any `Consumer` can be spawned.
async fn drain_one<C: Consumer + 'static>(consumer: C, topic: String) -> Option<String> {
    let mut stream = std::pin::pin!(consumer.subscribe(&topic));
    let d = stream.next().await?.ok()?;
    let id = d.event().id().to_owned();
    d.ack().await.ok()?;
    Some(id)
}

/// A generic publisher can be moved into a task.
async fn publish_one<P: Publisher + 'static>(publisher: P, topic: String) -> String {
    let ev = Event::new(b"spawned");
    let id = ev.id().to_owned();
    publisher.publish(&topic, ev).await.expect("publish");
    id
}

#[tokio::test]
async fn generic_loops_spawn_on_the_multi_thread_runtime() {
    let broker = MemoryBroker::new();
    let consumer = broker.consumer_group("g");
    // Register the group before publishing (the memory backend does not keep a backlog).
    let _keep_group = std::pin::pin!(consumer.subscribe("spawn"));
    let consumer_task = tokio::spawn(drain_one(consumer.clone(), "spawn".to_owned()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let id = tokio::spawn(publish_one(broker.publisher().boxed(), "spawn".to_owned()))
        .await
        .expect("publisher task");
    let got = tokio::time::timeout(Duration::from_secs(5), consumer_task)
        .await
        .expect("in time")
        .expect("consumer task");
    assert_eq!(got.as_deref(), Some(id.as_str()));
}
