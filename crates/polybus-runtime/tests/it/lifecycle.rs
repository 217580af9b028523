//! Stopping an app mid-load in a child process: SIGTERM (graceful drain) and SIGKILL (crash),
//! on JetStream and Kafka. A second app in the same group then finishes the load. Nothing
//! published may be lost (every event gets its `done` event), and after SIGTERM the child
//! must exit cleanly within its drain timeout.
//!
//! The child is this test binary run again with `lifecycle::child --exact --ignored`, and the
//! backend, topic and group in the environment; without them `child` does nothing.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt as _;
use polybus_core::{Consumer, Event, Publisher};
use polybus_runtime::{App, Outbound, Topic};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::conformance::{Backend, JsBackend, KafkaBackend};

const CHILD_BACKEND: &str = "POLYBUS_RT_CHILD_BACKEND";
const CHILD_TOPIC: &str = "POLYBUS_RT_CHILD_TOPIC";
const CHILD_GROUP: &str = "POLYBUS_RT_CHILD_GROUP";
const WARMUP: &str = "polybus.runtime.warmup";
const LOAD: usize = 300;

/// The child: runs the app until SIGTERM (`App::run`). Not a test on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the lifecycle tests; does nothing on its own"]
async fn child() {
    let (Ok(backend), Ok(topic), Ok(group)) = (
        std::env::var(CHILD_BACKEND),
        std::env::var(CHILD_TOPIC),
        std::env::var(CHILD_GROUP),
    ) else {
        return;
    };
    match backend.as_str() {
        "jetstream" => run_child(&JsBackend, &topic, &group).await,
        "kafka" => run_child(&KafkaBackend, &topic, &group).await,
        other => panic!("unknown backend {other}"),
    }
}

/// A unit of work: 20 ms, then a `done` event naming the event handled.
async fn work(ev: Event, Topic(topic): Topic) -> Outbound {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let done = Event::builder().data(ev.id().to_owned()).build().unwrap();
    Outbound::new(format!("{topic}.done"), done)
}

async fn run_child<B: Backend>(b: &B, topic: &str, group: &str) {
    let app = App::new()
        .route(topic.to_owned(), work)
        .concurrency(4)
        .drain_timeout(Duration::from_secs(10));
    let consumer = b.consumer(group).await.expect("consumer");
    let publisher = b.publisher().await.expect("publisher");
    app.run(consumer, publisher).await.expect("run");
    println!("CHILD-STOPPED-CLEANLY");
}

fn spawn_child(backend: &str, topic: &str, group: &str) -> Child {
    let exe = std::env::current_exe().expect("test binary");
    Command::new(exe)
        .args(["lifecycle::child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_BACKEND, backend)
        .env(CHILD_TOPIC, topic)
        .env(CHILD_GROUP, group)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn child")
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running child");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    Term,
    Kill,
}

async fn stop_mid_load<B: Backend>(b: &B, backend: &str, how: Stop) {
    let topic = b.topic();
    let group = format!("g{}", uuid::Uuid::new_v4().simple());
    let done_consumer = b
        .consumer(&format!("d{}", uuid::Uuid::new_v4().simple()))
        .await
        .expect("consumer");
    let done_topic = format!("{topic}.done");
    let mut done = std::pin::pin!(done_consumer.subscribe(&done_topic));
    let publisher = b.publisher().await.expect("publisher");
    let mut seen: HashMap<String, usize> = HashMap::new();

    let mut first = spawn_child(backend, &topic, &group);
    // Warm up until the child handles something (its subscription is live).
    let deadline = Instant::now() + b.timeout();
    'warm: loop {
        let ev = Event::builder().kind(WARMUP).build().unwrap();
        publisher.publish(&topic, ev).await.expect("publish");
        let until = Instant::now() + Duration::from_millis(500);
        if let Ok(Some(d)) = tokio::time::timeout_at(until, done.next()).await {
            let d = d.expect("done delivery");
            *seen
                .entry(String::from_utf8_lossy(d.payload()).into_owned())
                .or_default() += 1;
            d.ack().await.expect("ack");
            break 'warm;
        }
        assert!(
            Instant::now() < deadline,
            "{backend}: the child never handled a warm-up"
        );
    }
    let mut ids = HashSet::new();
    for chunk in 0..LOAD / 50 {
        let batch: Vec<Event> = (0..50)
            .map(|i| {
                Event::builder()
                    .key(format!("k{}", (chunk * 50 + i) % 16))
                    .build()
                    .unwrap()
            })
            .collect();
        ids.extend(batch.iter().map(|e| e.id().to_owned()));
        publisher
            .publish_batch(&topic, batch)
            .await
            .expect("publish");
    }
    // Mid-load: some of the load done, most not.
    let loaded =
        |seen: &HashMap<String, usize>| ids.iter().filter(|i| seen.contains_key(*i)).count();
    while loaded(&seen) < 40 {
        let d = tokio::time::timeout(b.timeout(), done.next())
            .await
            .expect("progress")
            .expect("open")
            .expect("done delivery");
        *seen
            .entry(String::from_utf8_lossy(d.payload()).into_owned())
            .or_default() += 1;
        d.ack().await.expect("ack");
    }
    let at_stop = loaded(&seen);
    match how {
        Stop::Term => {
            sigterm(&first);
            let out = tokio::time::timeout(Duration::from_secs(30), async {
                let mut stdout = first.stdout.take().expect("stdout");
                let mut text = String::new();
                tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text)
                    .await
                    .expect("read stdout");
                (first.wait().await.expect("wait"), text)
            })
            .await
            .expect("the child stops within its drain timeout");
            assert!(out.0.success(), "{backend}: child exit {:?}", out.0);
            assert!(
                out.1.contains("CHILD-STOPPED-CLEANLY"),
                "{backend}: {}",
                out.1
            );
        }
        Stop::Kill => {
            first.kill().await.expect("SIGKILL");
        }
    }

    // A second member of the group finishes the load.
    let mut second = spawn_child(backend, &topic, &group);
    let deadline = Instant::now() + Duration::from_secs(120);
    while loaded(&seen) < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = match tokio::time::timeout(left, done.next()).await {
            Ok(d) => d.expect("open").expect("done delivery"),
            Err(_) => panic!(
                "{backend} {how:?}: lost events: {} of {} never done",
                ids.len() - loaded(&seen),
                ids.len()
            ),
        };
        *seen
            .entry(String::from_utf8_lossy(d.payload()).into_owned())
            .or_default() += 1;
        d.ack().await.expect("ack");
    }
    sigterm(&second);
    let status = tokio::time::timeout(Duration::from_secs(30), second.wait())
        .await
        .expect("second child stops")
        .expect("wait");
    assert!(status.success());
    let duplicates: usize = ids.iter().map(|i| seen[i] - 1).sum();
    eprintln!(
        "{backend} {how:?}: {} events, {at_stop} done before the stop, 0 lost, {duplicates} handled twice",
        ids.len()
    );
    publisher.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn jetstream_sigterm_mid_load_loses_nothing() {
    stop_mid_load(&JsBackend, "jetstream", Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn jetstream_sigkill_mid_load_loses_nothing() {
    stop_mid_load(&JsBackend, "jetstream", Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn kafka_sigterm_mid_load_loses_nothing() {
    stop_mid_load(&KafkaBackend, "kafka", Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn kafka_sigkill_mid_load_loses_nothing() {
    stop_mid_load(&KafkaBackend, "kafka", Stop::Kill).await;
}
