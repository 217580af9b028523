//! The runtime on the in-memory backend, through `TestApp` (virtual time where delays matter).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use polybus_core::dlq::{
    DeadLetterTopic, X_ATTEMPTS, X_EXCEPTION_KIND, X_EXCEPTION_MESSAGE, X_ORIGINAL_OFFSET,
    X_ORIGINAL_TOPIC,
};
use polybus_core::{
    Consumer, ErrorKind, Event, Headers, MemoryBroker, Publisher as _, PublisherExt as _,
};
use polybus_runtime::layers::{ConcurrencyLimitLayer, TimeoutLayer};
use polybus_runtime::{
    App, Attempt, HandlerError, Json, Key, Outbound, Outcome, RedriveOptions, RetryMode,
    RetryPolicy, Route, Settlement, State, TEST_GROUP, TestApp, Topic, redrive,
};
use tokio::time::Instant;

fn keyed(key: &str, data: &str) -> Event {
    Event::builder()
        .key(key.to_owned())
        .data(data.to_owned())
        .content_type("application/json")
        .build()
        .unwrap()
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_secs(1))
        .max_attempts(attempts)
        .jitter(0.0)
}

#[tokio::test(start_paused = true)]
async fn routes_by_topic_and_cloudevents_type() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    async fn created(State(seen): State<Arc<Mutex<Vec<String>>>>) {
        seen.lock().unwrap().push("created".into());
    }
    async fn other(State(seen): State<Arc<Mutex<Vec<String>>>>, Topic(t): Topic) {
        seen.lock().unwrap().push(format!("other:{t}"));
    }
    async fn paid(State(seen): State<Arc<Mutex<Vec<String>>>>) {
        seen.lock().unwrap().push("paid".into());
    }
    let app = App::with_state(seen.clone())
        .add_route(Route::new("orders", created).kind("order.created"))
        .route("orders", other)
        .add_route(Route::new("payments", paid).kind("payment.done"))
        .retry(fast_retry(3));
    let mut t = TestApp::start(app).await.unwrap();
    let a = Event::builder().kind("order.created").build().unwrap();
    let b = Event::builder().kind("order.cancelled").build().unwrap();
    let c = Event::builder().kind("payment.done").build().unwrap();
    let d = Event::builder().kind("payment.refused").build().unwrap();
    let ids: Vec<String> = [&a, &b, &c, &d].iter().map(|e| e.id().to_owned()).collect();
    t.publish("orders", a).await.unwrap();
    t.publish("orders", b).await.unwrap();
    t.publish("payments", c).await.unwrap();
    t.publish("payments", d).await.unwrap();
    for id in &ids[..3] {
        assert_eq!(
            t.settled(id).await.unwrap().settlement(),
            &Settlement::Acked
        );
    }
    // No route takes payment.refused: a permanent failure, dead-lettered at once.
    let r = t.settled(&ids[3]).await.unwrap();
    assert_eq!(
        r.settlement(),
        &Settlement::DeadLettered {
            topic: "payments.dlq".into(),
            kind: "unrouted".into()
        }
    );
    assert_eq!(r.attempt(), 1);
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, ["created", "other:orders", "paid"]);
    t.stop().await.unwrap();
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Order {
    id: u32,
}

#[tokio::test(start_paused = true)]
async fn extractors_and_publish_outcome() {
    type Seen = Arc<Mutex<Vec<(u32, Option<Bytes>, Option<String>, u32)>>>;
    async fn handle(
        Json(order): Json<Order>,
        Key(key): Key,
        headers: Headers,
        Attempt(attempt): Attempt,
        State(seen): State<Seen>,
        event: Event,
    ) -> Vec<Outbound> {
        seen.lock().unwrap().push((
            order.id,
            key,
            headers.get("tenant").map(str::to_owned),
            attempt,
        ));
        let reply = Event::builder()
            .key(event.key_bytes().cloned().unwrap_or_default())
            .data(format!("{{\"invoice_for\":{}}}", order.id))
            .build()
            .unwrap();
        vec![
            Outbound::new("invoices", reply.clone()),
            Outbound::new("audit", reply),
        ]
    }
    let seen: Seen = Arc::default();
    let mut t = TestApp::start(App::with_state(seen.clone()).route("orders", handle))
        .await
        .unwrap();
    let ev = Event::builder()
        .key("c-1")
        .header("tenant", "eu")
        .data(br#"{"id":42}"#.as_slice())
        .content_type("application/json")
        .build()
        .unwrap();
    let id = ev.id().to_owned();
    t.publish("orders", ev).await.unwrap();
    assert_eq!(
        t.settled(&id).await.unwrap().settlement(),
        &Settlement::Acked
    );
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [(
            42,
            Some(Bytes::from_static(b"c-1")),
            Some("eu".to_owned()),
            1
        )]
    );
    let invoices = t.published("invoices");
    assert_eq!(invoices.len(), 1);
    assert_eq!(invoices[0].data().as_ref(), br#"{"invoice_for":42}"#);
    assert_eq!(invoices[0].key(), Some(&b"c-1"[..]));
    assert_eq!(t.published("audit").len(), 1);
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_then_dead_letter_with_the_shared_headers() {
    let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    async fn failing(State(calls): State<Arc<Mutex<Vec<Instant>>>>) -> Result<(), HandlerError> {
        calls.lock().unwrap().push(Instant::now());
        Err(HandlerError::transient("database down"))
    }
    let app = App::with_state(calls.clone())
        .route("orders", failing)
        .retry(fast_retry(4));
    let mut t = TestApp::start(app).await.unwrap();
    let ev = Event::builder()
        .key("k1")
        .header("tenant", "eu")
        .data(b"payload".as_slice())
        .build()
        .unwrap();
    let id = ev.id().to_owned();
    t.publish("orders", ev).await.unwrap();
    let last = t.settled(&id).await.unwrap();
    assert_eq!(last.attempt(), 4);
    // 4 attempts, 3 retries after 1 s, 2 s and 4 s (jitter off), by nack(delay) on memory.
    let reports = t.reports_for(&id);
    let retries: Vec<_> = reports
        .iter()
        .filter_map(|r| match r.settlement() {
            Settlement::Retrying { after, in_process } => Some((r.attempt(), *after, *in_process)),
            _ => None,
        })
        .collect();
    assert_eq!(
        retries,
        [
            (1, Duration::from_secs(1), false),
            (2, Duration::from_secs(2), false),
            (3, Duration::from_secs(4), false)
        ]
    );
    let calls = calls.lock().unwrap().clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(4)
        ]
    );
    let dead = t.dead_letters("orders");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (d.id(), d.key(), d.data().as_ref()),
        (id.as_str(), Some(&b"k1"[..]), &b"payload"[..])
    );
    let h = d.headers();
    assert_eq!(h.get("tenant"), Some("eu"));
    assert_eq!(h.get(X_ORIGINAL_TOPIC), Some("orders"));
    assert_eq!(h.get(X_ATTEMPTS), Some("4"));
    assert_eq!(h.get(X_EXCEPTION_KIND), Some("error"));
    assert_eq!(h.get(X_EXCEPTION_MESSAGE), Some("database down"));
    assert!(h.get(X_ORIGINAL_OFFSET).is_some(), "memory has offsets");
    // The delivery was settled: nothing is left for the group.
    assert_eq!(t.broker().pending("orders", TEST_GROUP), 0);
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn explicit_retry_after_and_permanent_errors() {
    async fn handle(Attempt(n): Attempt, Topic(t): Topic) -> Result<Outcome, HandlerError> {
        match (t.as_str(), n) {
            ("later", 1) => Ok(Outcome::Retry(Some(Duration::from_secs(30)))),
            ("later", _) => Ok(Outcome::Ack),
            _ => Err(polybus_core::Error::new(ErrorKind::Codec, "app").into()),
        }
    }
    async fn json_only(Json(_): Json<Order>) {}
    let app = App::new()
        .route("later", handle)
        .route("poison", handle)
        .route("bad-json", json_only)
        .retry(fast_retry(5));
    let mut t = TestApp::start(app).await.unwrap();
    let (a, b, c) = (Event::new(b"x"), Event::new(b"y"), Event::new(b"{not json"));
    let (ia, ib, ic) = (a.id().to_owned(), b.id().to_owned(), c.id().to_owned());
    let start = Instant::now();
    t.publish("later", a).await.unwrap();
    t.publish("poison", b).await.unwrap();
    t.publish("bad-json", c).await.unwrap();
    let r = t.settled(&ia).await.unwrap();
    assert_eq!((r.attempt(), r.settlement()), (2, &Settlement::Acked));
    assert!(start.elapsed() >= Duration::from_secs(30));
    for (id, kind) in [(&ib, "codec error"), (&ic, "codec error")] {
        let r = t.settled(id).await.unwrap();
        assert_eq!(r.attempt(), 1, "permanent: no retry");
        assert!(matches!(r.settlement(), Settlement::DeadLettered { kind: k, .. } if k == kind));
    }
    let dead = t.dead_letters("bad-json");
    assert_eq!(dead[0].data().as_ref(), b"{not json");
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_a_failure_and_the_app_survives() {
    async fn handle(Attempt(n): Attempt, Key(k): Key) {
        if k.as_deref() == Some(b"boom") && n == 1 {
            panic!("handler bug");
        }
    }
    let mut t = TestApp::start(App::new().route("t", handle).retry(fast_retry(3)))
        .await
        .unwrap();
    let (a, b) = (keyed("boom", "{}"), keyed("fine", "{}"));
    let (ia, ib) = (a.id().to_owned(), b.id().to_owned());
    t.publish("t", a).await.unwrap();
    t.publish("t", b).await.unwrap();
    assert_eq!(
        t.settled(&ib).await.unwrap().settlement(),
        &Settlement::Acked
    );
    let r = t.settled(&ia).await.unwrap();
    assert_eq!((r.attempt(), r.settlement()), (2, &Settlement::Acked));
    // Always panicking: dead-lettered with kind panic.
    async fn always() {
        panic!("always");
    }
    t.stop().await.unwrap();
    let mut t = TestApp::start(App::new().route("t", always).retry(fast_retry(2)))
        .await
        .unwrap();
    let c = Event::new(b"x");
    let ic = c.id().to_owned();
    t.publish("t", c).await.unwrap();
    assert!(
        matches!(t.settled(&ic).await.unwrap().settlement(), Settlement::DeadLettered { kind, .. } if kind == "panic")
    );
    let dead = t.dead_letters("t");
    assert_eq!(
        dead[0].headers().get(X_EXCEPTION_MESSAGE),
        Some("handler panicked: always")
    );
    t.stop().await.unwrap();
}

/// Records each event's data in `order`, failing (transiently) the first two attempts of the
/// event whose data is `first`.
async fn fail_first_twice(
    State(order): State<Arc<Mutex<Vec<String>>>>,
    Attempt(n): Attempt,
    ev: Event,
) -> Result<(), HandlerError> {
    let name = String::from_utf8_lossy(ev.data()).into_owned();
    if name == "first" && n < 3 {
        return Err(HandlerError::transient("not yet"));
    }
    order.lock().unwrap().push(name);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn in_process_retry_keeps_per_key_order() {
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = App::with_state(order.clone())
        .route("t", fail_first_twice)
        .retry(fast_retry(5))
        .retry_mode(RetryMode::InProcess)
        .concurrency(4);
    let mut t = TestApp::start(app).await.unwrap();
    let first = keyed("k", "first");
    let id = first.id().to_owned();
    t.publish("t", first).await.unwrap();
    let second = keyed("k", "second");
    let id2 = second.id().to_owned();
    t.publish("t", second).await.unwrap();
    t.settled(&id2).await.unwrap();
    let r = t.settled(&id).await.unwrap();
    assert_eq!(r.attempt(), 3);
    assert!(t.reports_for(&id).iter().any(|r| matches!(
        r.settlement(),
        Settlement::Retrying {
            in_process: true,
            ..
        }
    )));
    assert_eq!(order.lock().unwrap().as_slice(), ["first", "second"]);
    t.stop().await.unwrap();
}

/// At concurrency 1 the app handles a delivery on its own task while nothing else is in
/// flight; an in-process retry then waits in a lane of its key: later events of that key
/// queue behind it, other keys go on meanwhile.
#[tokio::test(start_paused = true)]
async fn in_process_retry_at_concurrency_1_lets_other_keys_go_on() {
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = App::with_state(order.clone())
        .route("t", fail_first_twice)
        .retry(fast_retry(5))
        .retry_mode(RetryMode::InProcess);
    let mut t = TestApp::start(app).await.unwrap();
    let started = Instant::now();
    let mut ids = Vec::new();
    for (key, data) in [("k1", "first"), ("k2", "other"), ("k1", "second")] {
        let ev = keyed(key, data);
        ids.push(ev.id().to_owned());
        t.publish("t", ev).await.unwrap();
    }
    let other = t.settled(&ids[1]).await.unwrap();
    assert_eq!(other.settlement(), &Settlement::Acked);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the other key did not wait for the retry"
    );
    let second = t.settled(&ids[2]).await.unwrap();
    assert_eq!(second.settlement(), &Settlement::Acked);
    assert_eq!(t.settled(&ids[0]).await.unwrap().attempt(), 3);
    assert_eq!(
        order.lock().unwrap().as_slice(),
        ["other", "first", "second"]
    );
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn per_key_order_under_concurrency_with_random_latency() {
    #[derive(Clone, Default)]
    struct Seen {
        by_key: Arc<Mutex<HashMap<Vec<u8>, Vec<u32>>>>,
        running: Arc<AtomicUsize>,
        max_running: Arc<AtomicUsize>,
    }
    async fn handle(State(s): State<Seen>, Key(k): Key, Json(n): Json<u32>) {
        let now = s.running.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_running.fetch_max(now, Ordering::SeqCst);
        let jitter = rand::random::<u64>() % 20;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        s.by_key
            .lock()
            .unwrap()
            .entry(k.unwrap_or_default().to_vec())
            .or_default()
            .push(n);
        s.running.fetch_sub(1, Ordering::SeqCst);
    }
    let seen = Seen::default();
    let app = App::with_state(seen.clone())
        .route("t", handle)
        .concurrency(8);
    let mut t = TestApp::start(app).await.unwrap();
    let (keys, per_key) = (16u32, 25u32);
    for n in 0..per_key {
        for k in 0..keys {
            t.publish("t", keyed(&format!("k{k}"), &n.to_string()))
                .await
                .unwrap();
        }
    }
    let total = (keys * per_key) as usize;
    t.wait_until(|rs| {
        rs.iter()
            .filter(|r| r.settlement() == &Settlement::Acked)
            .count()
            == total
    })
    .await
    .unwrap();
    let by_key = seen.by_key.lock().unwrap().clone();
    assert_eq!(by_key.len(), keys as usize);
    for (k, ns) in by_key.iter() {
        assert_eq!(
            ns,
            &(0..per_key).collect::<Vec<_>>(),
            "key {:?}",
            String::from_utf8_lossy(k)
        );
    }
    let max = seen.max_running.load(Ordering::SeqCst);
    assert!(max > 1 && max <= 8, "max running {max}");
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_holds_at_most_concurrency_plus_buffer() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicU32::new(0));
    async fn slow(State((gate, started)): State<(Arc<tokio::sync::Semaphore>, Arc<AtomicU32>)>) {
        started.fetch_add(1, Ordering::SeqCst);
        let _ = gate.acquire().await.map(|p| p.forget());
    }
    let app = App::with_state((gate.clone(), started.clone()))
        .route("t", slow)
        .concurrency(2)
        .buffer(3);
    let mut t = TestApp::start(app).await.unwrap();
    for i in 0..20 {
        t.publish("t", keyed(&format!("k{i}"), "{}")).await.unwrap();
    }
    // Virtual time: this sleep returns once every task is idle (nothing else can move).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(started.load(Ordering::SeqCst), 2, "2 handlers at once");
    assert_eq!(
        t.broker().pending("t", TEST_GROUP),
        20 - 5,
        "2 running + 3 buffered pulled"
    );
    let health = t.health().clone();
    assert_eq!((health.in_flight(), health.held()), (2, 5));
    assert!(health.is_ready() && health.is_live());
    gate.add_permits(20);
    t.wait_until(|rs| {
        rs.iter()
            .filter(|r| r.settlement() == &Settlement::Acked)
            .count()
            == 20
    })
    .await
    .unwrap();
    t.stop().await.unwrap();
    assert_eq!(health.status(), polybus_runtime::Status::Stopped);
    assert_eq!((health.in_flight(), health.held()), (0, 0));
    assert!(!health.is_live());
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_in_flight_handlers_finish() {
    let done = Arc::new(AtomicBool::new(false));
    async fn slow(State(done): State<Arc<AtomicBool>>) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        done.store(true, Ordering::SeqCst);
    }
    let mut t = TestApp::start(
        App::with_state(done.clone())
            .route("t", slow)
            .drain_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let ev = Event::new(b"x");
    let id = ev.id().to_owned();
    t.publish("t", ev).await.unwrap();
    // Virtual time: returns once the handler is asleep in its 3 s.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!done.load(Ordering::SeqCst));
    let broker = t.broker().clone();
    assert!(t.reports_for(&id).is_empty());
    t.stop().await.unwrap();
    assert!(
        done.load(Ordering::SeqCst),
        "the handler finished before run returned"
    );
    assert_eq!(
        t.settled(&id).await.unwrap().settlement(),
        &Settlement::Acked
    );
    assert_eq!(broker.pending("t", TEST_GROUP), 0);
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_hands_unfinished_deliveries_back_for_redelivery() {
    async fn stuck(Attempt(n): Attempt) {
        if n == 1 {
            std::future::pending::<()>().await;
        }
    }
    let broker = MemoryBroker::new();
    let mut t = TestApp::start_on(
        App::new()
            .route("t", stuck)
            .drain_timeout(Duration::from_secs(2)),
        broker.clone(),
    )
    .await
    .unwrap();
    let ev = Event::new(b"x");
    let id = ev.id().to_owned();
    t.publish("t", ev).await.unwrap();
    // Virtual time: returns once the handler is stuck on the event.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(broker.pending("t", TEST_GROUP), 0, "taken by the app");
    let started = Instant::now();
    assert!(t.reports_for(&id).is_empty(), "not settled while stuck");
    t.stop().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(t.reports_for(&id)[0].settlement(), &Settlement::Released);
    // nack(0) put it back for the group: a new app on the same broker handles it.
    assert_eq!(broker.pending("t", TEST_GROUP), 1);
    let mut t = TestApp::start_on(App::new().route("t", stuck), broker.clone())
        .await
        .unwrap();
    let r = t.settled(&id).await.unwrap();
    assert_eq!((r.attempt(), r.settlement()), (2, &Settlement::Acked));
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn redrive_moves_filtered_dead_letters_back() {
    let healed = Arc::new(AtomicBool::new(false));
    async fn handle(State(healed): State<Arc<AtomicBool>>) -> Result<(), HandlerError> {
        if healed.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(HandlerError::permanent("schema unknown"))
        }
    }
    let broker = MemoryBroker::new();
    let dlq_reader = broker.consumer_group("redrive");
    // The group exists before the dead letters are written (memory keeps no backlog).
    drop(dlq_reader.subscribe("orders.dlq"));
    let mut t = TestApp::start_on(
        App::with_state(healed.clone()).route("orders", handle),
        broker.clone(),
    )
    .await
    .unwrap();
    let a = Event::builder()
        .kind("order.created")
        .key("a")
        .build()
        .unwrap();
    let b = Event::builder()
        .kind("order.legacy")
        .key("b")
        .build()
        .unwrap();
    let (ia, ib) = (a.id().to_owned(), b.id().to_owned());
    t.publish("orders", a).await.unwrap();
    t.publish("orders", b).await.unwrap();
    t.settled(&ia).await.unwrap();
    t.settled(&ib).await.unwrap();
    assert_eq!(t.dead_letters("orders").len(), 2);
    healed.store(true, Ordering::SeqCst);
    let report = redrive(
        &dlq_reader,
        "orders.dlq",
        &broker.publisher(),
        |ev| ev.kind() == "order.created",
        RedriveOptions::default().idle(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    assert_eq!((report.moved, report.kept), (1, 1));
    // The redriven event comes back without the dead-letter headers, same id, and is handled.
    let r = t
        .wait_until(|rs| {
            rs.iter()
                .any(|r| r.id() == ia && r.settlement() == &Settlement::Acked)
        })
        .await
        .unwrap();
    assert!(
        !r.iter()
            .any(|r| r.id() == ib && r.settlement() == &Settlement::Acked)
    );
    // The kept one is still a dead letter: a second redrive (no filter) moves it.
    let report = redrive(
        &dlq_reader,
        "orders.dlq",
        &broker.publisher(),
        |_| true,
        RedriveOptions::default().idle(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    assert_eq!((report.moved, report.kept), (1, 0));
    t.wait_until(|rs| {
        rs.iter()
            .any(|r| r.id() == ib && r.settlement() == &Settlement::Acked)
    })
    .await
    .unwrap();
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn dead_letters_can_go_to_another_backend_or_nowhere() {
    async fn fail() -> Result<(), HandlerError> {
        Err(HandlerError::permanent("no"))
    }
    let other = MemoryBroker::new();
    let reader = other.consumer_group("ops");
    let mut dead = std::pin::pin!(reader.subscribe("graveyard"));
    let app = App::new().route("t", fail).dead_letter_publisher(
        DeadLetterTopic::Fixed("graveyard".into()),
        other.publisher().boxed(),
    );
    let mut t = TestApp::start(app).await.unwrap();
    let ev = Event::new(b"x");
    let id = ev.id().to_owned();
    t.publish("t", ev).await.unwrap();
    let r = t.settled(&id).await.unwrap();
    assert_eq!(
        r.settlement(),
        &Settlement::DeadLettered {
            topic: "graveyard".into(),
            kind: "error".into()
        }
    );
    use futures_util::StreamExt as _;
    let d = dead.next().await.unwrap().unwrap();
    assert_eq!(d.event().id(), id);
    assert_eq!(d.event().headers().get(X_ORIGINAL_TOPIC), Some("t"));
    d.ack().await.unwrap();
    t.stop().await.unwrap();

    let mut t = TestApp::start(App::new().route("t", fail).without_dead_letters())
        .await
        .unwrap();
    let ev = Event::new(b"x");
    let id = ev.id().to_owned();
    t.publish("t", ev).await.unwrap();
    assert!(matches!(
        t.settled(&id).await.unwrap().settlement(),
        Settlement::Terminated { .. }
    ));
    assert!(t.dead_letters("t").is_empty());
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn layers_timeout_and_concurrency_limit() {
    let running = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    async fn handle(
        State((running, max)): State<(Arc<AtomicUsize>, Arc<AtomicUsize>)>,
        Attempt(n): Attempt,
        Key(k): Key,
    ) {
        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        // The "slow" key takes 10 s on its first attempt: the 1 s timeout fails it.
        let slow = k.as_deref() == Some(b"slow") && n == 1;
        tokio::time::sleep(Duration::from_millis(if slow { 10_000 } else { 50 })).await;
        running.fetch_sub(1, Ordering::SeqCst);
    }
    let app = App::with_state((running.clone(), max.clone()))
        .route("t", handle)
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .layer(ConcurrencyLimitLayer::new(2))
        .concurrency(8)
        .retry(fast_retry(3));
    let mut t = TestApp::start(app).await.unwrap();
    let slow = keyed("slow", "{}");
    let id = slow.id().to_owned();
    t.publish("t", slow).await.unwrap();
    for i in 0..10 {
        t.publish("t", keyed(&format!("k{i}"), "{}")).await.unwrap();
    }
    let r = t.settled(&id).await.unwrap();
    assert_eq!((r.attempt(), r.settlement()), (2, &Settlement::Acked));
    assert!(
        t.reports_for(&id)
            .iter()
            .any(|r| matches!(r.settlement(), Settlement::Retrying { .. }))
    );
    t.wait_until(|rs| {
        rs.iter()
            .filter(|r| r.settlement() == &Settlement::Acked)
            .count()
            == 11
    })
    .await
    .unwrap();
    assert!(
        max.load(Ordering::SeqCst) <= 3,
        "limit 2, plus a timed-out call still sleeping: {}",
        max.load(Ordering::SeqCst)
    );
    t.stop().await.unwrap();
}

#[tokio::test]
async fn an_invalid_topic_fails_the_run() {
    async fn h() {}
    let err = TestApp::start(App::new().route("bad topic\0", h))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic);
}

#[tokio::test(start_paused = true)]
async fn publish_json_round_trip_through_a_handler() {
    async fn handle(Json(o): Json<Order>) -> Outbound {
        Outbound::new("out", Event::new(format!("{}", o.id * 2)))
    }
    let mut t = TestApp::start(App::new().route("in", handle))
        .await
        .unwrap();
    t.broker()
        .publisher()
        .publish_json("in", &serde_json::json!({"id": 21}))
        .await
        .unwrap();
    t.wait_until(|rs| rs.iter().any(|r| r.settlement() == &Settlement::Acked))
        .await
        .unwrap();
    assert_eq!(t.published("out")[0].data().as_ref(), b"42");
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn batch_route_takes_up_to_max_or_what_came_within_max_wait_and_settles_each() {
    type Seen = Arc<Mutex<Vec<Vec<(String, u32)>>>>;
    async fn store(batch: Vec<polybus_runtime::Message>, State(seen): State<Seen>) -> Vec<Outcome> {
        let items: Vec<(String, u32)> = batch
            .iter()
            .map(|m| {
                (
                    String::from_utf8_lossy(m.event().data()).into_owned(),
                    m.attempt(),
                )
            })
            .collect();
        seen.lock().unwrap().push(items.clone());
        items
            .iter()
            .map(|(data, attempt)| match (data.as_str(), attempt) {
                ("7", _) => Outcome::Terminate(HandlerError::permanent("poison")),
                ("3", 1) => Outcome::Retry(None),
                _ => Outcome::Ack,
            })
            .collect()
    }
    let seen: Seen = Arc::default();
    let app = App::with_state(seen.clone())
        .batch_route(
            "metrics",
            polybus_runtime::Batch::new(10, Duration::from_millis(100)),
            store,
        )
        .retry(fast_retry(3));
    let mut t = TestApp::start(app).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..25 {
        let ev = Event::new(i.to_string());
        ids.push(ev.id().to_owned());
        t.publish("metrics", ev).await.unwrap();
    }
    let start = Instant::now();
    for id in &ids {
        t.settled(id).await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let sizes: Vec<usize> = seen.iter().map(Vec::len).collect();
    // Two full batches, the rest after max_wait, then the retried event alone.
    assert_eq!(sizes, [10, 10, 5, 1]);
    let first_pass: Vec<String> = seen[..3].iter().flatten().map(|(d, _)| d.clone()).collect();
    assert_eq!(
        first_pass,
        (0..25).map(|i| i.to_string()).collect::<Vec<_>>(),
        "in order"
    );
    assert_eq!(seen[3], [("3".to_owned(), 2)]);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "the retry waited its backoff"
    );
    let r = t.settled(&ids[7]).await.unwrap();
    assert!(matches!(r.settlement(), Settlement::DeadLettered { .. }));
    assert_eq!(t.dead_letters("metrics").len(), 1);
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_or_panicking_batch_fails_every_event() {
    async fn down(
        batch: Vec<polybus_runtime::Message>,
        _: State<()>,
    ) -> Result<Vec<Outcome>, HandlerError> {
        if batch.iter().any(|m| m.event().data().as_ref() == b"panic") {
            panic!("batch handler bug");
        }
        Err(HandlerError::permanent("warehouse unreachable"))
    }
    let app = App::new()
        .batch_route(
            "a",
            polybus_runtime::Batch::new(3, Duration::from_millis(10)),
            down,
        )
        .batch_route(
            "b",
            polybus_runtime::Batch::new(3, Duration::from_millis(10)),
            down,
        )
        .retry(fast_retry(2));
    let mut t = TestApp::start(app).await.unwrap();
    let mut ids = Vec::new();
    for topic in ["a", "a", "b"] {
        let ev = Event::new(if topic == "b" { "panic" } else { "x" });
        ids.push(ev.id().to_owned());
        t.publish(topic, ev).await.unwrap();
    }
    for id in &ids[..2] {
        let r = t.settled(id).await.unwrap();
        assert_eq!(r.attempt(), 1, "permanent");
        assert!(matches!(r.settlement(), Settlement::DeadLettered { .. }));
    }
    let r = t.settled(&ids[2]).await.unwrap();
    assert_eq!(
        r.attempt(),
        2,
        "a panic is transient: retried, then dead-lettered"
    );
    assert!(matches!(r.settlement(), Settlement::DeadLettered { kind, .. } if kind == "panic"));
    assert_eq!(
        t.dead_letters("a")[0].headers().get(X_EXCEPTION_MESSAGE),
        Some("warehouse unreachable")
    );
    t.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_compose_dedup_consumer_makes_the_app_handle_each_event_once() {
    use polybus_compose::{Dedup, DedupKey, MemoryDedupStore};
    let calls = Arc::new(AtomicU32::new(0));
    async fn count(State(calls): State<Arc<AtomicU32>>) {
        calls.fetch_add(1, Ordering::SeqCst);
    }
    let broker = MemoryBroker::new();
    let store = Arc::new(MemoryDedupStore::new(Duration::from_secs(3600)));
    let consumer = Dedup::new(
        broker.consumer_group("billing"),
        store,
        DedupKey::Id,
        "billing",
    );
    let rec = crate::support::Recorder::default();
    let app = App::with_state(calls.clone())
        .route("orders", count)
        .on_report(rec.observer());
    let mut status = app.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until(consumer, broker.publisher(), async move {
        let _ = stopped.await;
    }));
    status
        .wait_for(|s| *s == polybus_runtime::Status::Running)
        .await
        .unwrap();
    let ev = Event::builder().id("order-1").build().unwrap();
    let publisher = broker.publisher();
    publisher.publish("orders", ev.clone()).await.unwrap();
    rec.wait_until(Duration::from_secs(10), "the first copy acked", |rs| {
        rs.iter().any(|(_, r)| r.settlement() == &Settlement::Acked)
    })
    .await;
    publisher.publish("orders", ev).await.unwrap();
    let other = Event::new(b"other");
    let other_id = other.id().to_owned();
    publisher.publish("orders", other).await.unwrap();
    rec.wait_until(Duration::from_secs(10), "the other event acked", |rs| {
        rs.iter()
            .any(|(_, r)| r.id() == other_id && r.settlement() == &Settlement::Acked)
    })
    .await;
    // The second copy of order-1 never reached the handler.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_reply_goes_to_the_requests_reply_topic_and_a_request_without_one_is_dead_lettered() {
    async fn answer(ev: Event) -> polybus_runtime::Reply {
        let ask = String::from_utf8_lossy(ev.data()).into_owned();
        polybus_runtime::Reply(Event::new(format!("answer to {ask}")))
    }
    let mut t = TestApp::start(App::new().route("asks", answer))
        .await
        .unwrap();
    let ask = Event::builder()
        .data("q1")
        .header(polybus_runtime::REPLY_TO, "asks.reply.a")
        .build()
        .unwrap();
    let asked = ask.id().to_owned();
    t.publish("asks", ask).await.unwrap();
    assert_eq!(
        t.settled(&asked).await.unwrap().settlement(),
        &Settlement::Acked
    );
    let replies = t.published("asks.reply.a");
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].data().as_ref(), b"answer to q1");
    assert_eq!(
        replies[0].headers().get(polybus_runtime::CORRELATION_ID),
        Some(asked.as_str())
    );

    // Published, not requested: nobody could get the answer.
    let plain = Event::new("q2");
    let plain_id = plain.id().to_owned();
    t.publish("asks", plain).await.unwrap();
    let plain = plain_id;
    let last = t.settled(&plain).await.unwrap();
    assert!(
        matches!(last.settlement(), Settlement::DeadLettered { kind, .. } if kind == "unsupported"),
        "{last:?}"
    );
    assert_eq!(last.attempt(), 1, "a missing reply topic is not retried");
    let dead = t.dead_letters("asks");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data().as_ref(), b"q2");
    t.stop().await.unwrap();
}
