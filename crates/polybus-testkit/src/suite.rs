//! The conformance scenarios (CONFORMANCE.md, B.8). Each is an `async fn` over a [`Fixture`],
//! gated by its [`Capabilities`]: a scenario whose capability is off checks the backend's
//! declared answer instead (an `Unsupported` nack, a dropped delivery that stays away past the
//! redelivery timer, a missed backlog, a group that keeps nothing), so every scenario asserts
//! something on every backend, and a wrongly declared field fails some scenario in either
//! direction (see [`mutation`](crate::mutation)).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::StreamExt as _;
use futures_util::future::join_all;
use polybus_core::{
    Backlog, BoxConsumer, BoxPublisher, Capabilities, Consumer, ErrorKind, Event, Ordering,
    Publisher, PublisherExt, Unsettled,
};

use crate::mutation::declared;
use crate::support::{Sub, id_set, numbered, publish_n, subscribe, with_member};
use crate::{Fixture, PrivateBroker};

/// Every scenario's name, in the order the macro generates them.
pub const SCENARIOS: &[&str] = &[
    "publish_subscribe",
    "headers_roundtrip",
    "topic_isolation",
    "many_publishers_many_subscribers",
    "many_topics",
    "ack_consumes",
    "nack_redelivers",
    "nack_after_delay_honoured",
    "term_is_not_redelivered",
    "out_of_order_ack_is_safe",
    "unsettled_delivery_returns",
    "no_loss_across_subscriber_restart",
    "continue_after_errors",
    "consumer_group_fanout",
    "consumer_group_balance",
    "per_key_order",
    "concurrent_close",
    "flush_on_close_loses_nothing",
    "use_after_close_errors",
    "late_subscriber_backlog",
    "oversized_payload_rejected",
    "invalid_topic_rejected",
    "publish_json_sets_content_type",
    "boxed_backends_work",
    "spawned_tasks_work",
    "capabilities_match_the_backend",
    "persistent_across_broker_restart",
    "duplicate_publish_stored_once",
    "request_reply_as_declared",
];

/// A fresh group name where the backend has consumer groups, else none.
fn group_if_any(f: &impl Fixture, caps: &Capabilities) -> Option<String> {
    caps.consumer_groups.then(|| f.group())
}

/// The declared answer of a backend without nack redelivery (or without a delayed nack):
/// `nack(delay)` fails with `Unsupported` and hands the delivery back, which can still be
/// acked.
async fn nack_is_unsupported<F: Fixture>(
    f: &F,
    caps: &Capabilities,
    delay: Duration,
) -> Result<()> {
    let topic = f.topic();
    let c = f.consumer(group_if_any(f, caps).as_deref()).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    p.publish(&topic, Event::new("nack me")).await?;
    let d = sub.next("an event to nack").await?;
    let err = d
        .nack(delay)
        .await
        .err()
        .with_context(|| format!("nack({delay:?}) succeeded although declared unsupported"))?;
    ensure!(
        err.error().kind() == ErrorKind::Unsupported,
        "nack error kind: {:?}",
        err.error()
    );
    err.into_delivery().ack().await?;
    Ok(())
}

/// The declared answer of a backend without consumer groups: joining one fails with
/// `Unsupported`, when the consumer is made or when it subscribes.
async fn groups_are_unsupported<F: Fixture>(f: &F) -> Result<()> {
    let c = match f.consumer(Some(&f.group())).await {
        Err(e) if e.kind() == ErrorKind::Unsupported => return Ok(()),
        Err(e) => bail!("joining a group failed with {e}, not Unsupported"),
        Ok(c) => c,
    };
    let topic = f.topic();
    let mut stream = Box::pin(c.subscribe(&topic));
    let first = tokio::time::timeout(
        f.receive_timeout(),
        futures_util::StreamExt::next(&mut stream),
    )
    .await
    .context("a group subscription neither failed nor ended")?;
    match first {
        Some(Err(e)) if e.kind() == ErrorKind::Unsupported => Ok(()),
        other => bail!("declared without consumer groups, yet a group subscription gave {other:?}"),
    }
}

/// The declared answer of a group that is not durable: a member joins and leaves, 5 events
/// are published while the group has no member, and the next member gets none of them.
async fn group_keeps_nothing_without_members<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let group = f.group();
    with_member(f, Some(&group), &topic, async |sub| {
        sub.expect_quiet("a fresh topic is empty").await
    })
    .await?;
    let p = f.publisher().await?;
    publish_n(&p, &topic, 5, |i| numbered("memberless", i)).await?;
    p.flush().await?;
    with_member(f, Some(&group), &topic, async |sub| {
        sub.expect_quiet("declared not durable, yet the group kept events while it had no member")
            .await
    })
    .await
}

/// Publish 100 events with payload, key, kind and a header after subscribing: every one
/// arrives with its attributes intact (watermill TestPublishSubscribe).
pub async fn publish_subscribe<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let consumer = f.consumer(None).await?;
    let mut sub = subscribe(f, &consumer, &topic).await;
    let publisher = f.publisher().await?;
    let caps = declared(f)?;
    let sent: Vec<Event> = (0..100)
        .map(|i| {
            let mut b = Event::builder()
                .kind("polybus.test.created")
                .source("urn:polybus:testkit")
                .key(format!("key-{}", i % 7))
                .data(format!("payload-{i}"));
            if caps.headers {
                b = b.header("seq", i.to_string());
            }
            b.build().expect("valid event")
        })
        .collect();
    for ev in &sent {
        publisher.publish(&topic, ev.clone()).await?;
    }
    let got = sub
        .collect_ids(&sent.iter().map(|e| e.id().to_owned()).collect())
        .await?;
    let by_id: HashMap<&str, &Event> = got.iter().map(|e| (e.id(), e)).collect();
    for ev in &sent {
        let r = by_id[ev.id()];
        ensure!(r.data() == ev.data(), "payload of {} changed", ev.id());
        if caps.headers {
            ensure!(r.kind() == ev.kind(), "kind changed: {:?}", r.kind());
            ensure!(
                r.source() == ev.source(),
                "source changed: {:?}",
                r.source()
            );
            ensure!(r.key() == ev.key(), "key changed: {:?}", r.key());
            ensure!(
                r.headers().get("seq") == ev.headers().get("seq"),
                "header changed: {:?}",
                r.headers()
            );
        }
    }
    publisher.close().await?;
    Ok(())
}

/// Headers survive the trip: case-insensitive lookup, several values, content type, and the
/// trace header (RustStream headers_propagate). A backend that declares no headers must refuse
/// the event with a typed error or lose some of them: otherwise it carries headers and says it
/// does not.
pub async fn headers_roundtrip<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let topic = f.topic();
    let consumer = f.consumer(None).await?;
    let mut sub = subscribe(f, &consumer, &topic).await;
    let publisher = f.publisher().await?;
    let ev = Event::builder()
        .content_type("text/plain; charset=utf-8")
        .header("tenant", "eu-1")
        .header("X-Request-Id", "r-42")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .data("hello")
        .build()?;
    if let Err(e) = publisher.publish(&topic, ev.clone()).await {
        // Refusing what it cannot carry, with a typed error, is a declared answer too.
        ensure!(
            !caps.headers && matches!(e.kind(), ErrorKind::InvalidHeader | ErrorKind::Unsupported),
            "publishing the event with headers failed: {e}"
        );
        return Ok(());
    }
    let d = sub.next("the event with headers").await?;
    let r = d.event();
    ensure!(r.data() == ev.data(), "payload changed");
    let lost: Vec<&str> = [
        ("id", r.id() == ev.id()),
        (
            "content type",
            r.content_type() == Some("text/plain; charset=utf-8"),
        ),
        ("tenant", r.headers().get("TENANT") == Some("eu-1")),
        (
            "x-request-id",
            r.headers().get("x-request-id") == Some("r-42"),
        ),
        (
            "traceparent",
            r.headers().get("traceparent") == ev.headers().get("traceparent"),
        ),
    ]
    .into_iter()
    .filter_map(|(what, intact)| (!intact).then_some(what))
    .collect();
    if caps.headers {
        ensure!(lost.is_empty(), "lost or changed: {lost:?} in {r:?}");
    } else {
        ensure!(
            !lost.is_empty(),
            "declares no headers, yet every header arrived intact: {r:?}"
        );
    }
    d.ack().await?;
    Ok(())
}

/// Two topics, one event each: each subscription sees only its own (watermill TestTopic).
pub async fn topic_isolation<F: Fixture>(f: &F) -> Result<()> {
    let (t1, t2) = (f.topic(), f.topic());
    let (c1, c2) = (f.consumer(None).await?, f.consumer(None).await?);
    let mut s1 = subscribe(f, &c1, &t1).await;
    let mut s2 = subscribe(f, &c2, &t2).await;
    let p = f.publisher().await?;
    let e1 = Event::new("one");
    let e2 = Event::new("two");
    p.publish(&t1, e1.clone()).await?;
    p.publish(&t2, e2.clone()).await?;
    let d1 = s1.next("the event on topic 1").await?;
    ensure!(d1.event().id() == e1.id(), "topic 1 got {:?}", d1.event());
    d1.ack().await?;
    let d2 = s2.next("the event on topic 2").await?;
    ensure!(d2.event().id() == e2.id(), "topic 2 got {:?}", d2.event());
    d2.ack().await?;
    s1.expect_quiet("topic 1 must not see topic 2's event")
        .await?;
    s2.expect_quiet("topic 2 must not see topic 1's event")
        .await?;
    Ok(())
}

/// 5 publishers × 40 events, published concurrently, to 3 independent subscribers: each
/// subscriber receives all 200 (watermill TestConcurrentSubscribe, TestPublisherClose).
pub async fn many_publishers_many_subscribers<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let mut consumers = Vec::new();
    for _ in 0..3 {
        consumers.push(f.consumer(None).await?);
    }
    let mut subs = Vec::new();
    for c in &consumers {
        subs.push(subscribe(f, c, &topic).await);
    }
    let mut publishers = Vec::new();
    for _ in 0..5 {
        publishers.push(f.publisher().await?);
    }
    let results = join_all(publishers.iter().enumerate().map(|(p, publisher)| {
        publish_n(publisher, &topic, 40, move |i| {
            numbered(&format!("p{p}"), i)
        })
    }))
    .await;
    let mut ids = HashSet::new();
    for r in results {
        ids.extend(r?);
    }
    ensure!(ids.len() == 200, "ids not unique");
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = sub
            .collect_ids(&ids)
            .await
            .with_context(|| format!("subscriber {i}"))?;
        ensure!(got.len() == 200, "subscriber {i} got {}", got.len());
    }
    for p in &publishers {
        p.close().await?;
    }
    Ok(())
}

/// 10 topics × 20 events, each topic published and consumed concurrently: every topic gets
/// exactly its own events, and an event of another topic fails the scenario (watermill
/// TestConcurrentSubscribeMultipleTopics).
pub async fn many_topics<F: Fixture>(f: &F) -> Result<()> {
    let topics: Vec<String> = (0..10).map(|_| f.topic()).collect();
    let publisher = f.publisher().await?;
    let runs = topics.iter().map(|topic| {
        let publisher = &publisher;
        async move {
            let consumer = f.consumer(None).await?;
            let mut sub = subscribe(f, &consumer, topic).await;
            let ids = publish_n(publisher, topic, 20, |i| numbered(topic, i)).await?;
            let got = sub
                .collect_exact(&id_set(&ids))
                .await
                .with_context(|| format!("on {topic}"))?;
            for ev in &got {
                ensure!(
                    ev.data().starts_with(topic.as_bytes()),
                    "an event of another topic on {topic}: {ev:?}"
                );
            }
            sub.expect_quiet("nothing else on this topic").await?;
            anyhow::Ok(())
        }
    });
    for r in join_all(runs).await {
        r?;
    }
    Ok(())
}

/// An acked event is not delivered again, neither now (past the broker's redelivery timer)
/// nor to the next member of a durable group.
pub async fn ack_consumes<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let topic = f.topic();
    let group = group_if_any(f, &caps);
    let p = f.publisher().await?;
    with_member(f, group.as_deref(), &topic, async |sub| {
        let ev = Event::new("ack me");
        p.publish(&topic, ev.clone()).await?;
        let d = sub.next("the event").await?;
        ensure!(d.event().id() == ev.id());
        d.ack().await?;
        sub.expect_quiet("an acked event must not come back").await
    })
    .await?;
    if caps.durable_groups {
        with_member(f, group.as_deref(), &topic, async |sub| {
            sub.expect_quiet("an acked event must not reach the next group member")
                .await
        })
        .await?;
    }
    Ok(())
}

/// Nack the first two deliveries: every event still arrives (watermill TestResendOnError).
/// Where nack is unsupported, it must say so and hand the delivery back.
pub async fn nack_redelivers<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    if !caps.redelivery_on_nack {
        return nack_is_unsupported(f, &caps, Duration::ZERO).await;
    }
    let topic = f.topic();
    let c = f.consumer(group_if_any(f, &caps).as_deref()).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    let ids = publish_n(&p, &topic, 10, |i| numbered("nack", i)).await?;
    let mut nacked = 0;
    let mut seen = HashSet::new();
    let mut redelivered = HashSet::new();
    while seen.len() < ids.len() {
        let d = sub.next("all events after nacks").await?;
        let id = d.event().id().to_owned();
        if nacked < 2 && !seen.contains(&id) && !redelivered.contains(&id) {
            nacked += 1;
            redelivered.insert(id);
            d.nack(Duration::ZERO).await?;
            continue;
        }
        if redelivered.contains(&id) {
            ensure!(
                d.delivery_count() >= 2,
                "redelivery count of {id} is {}",
                d.delivery_count()
            );
        }
        seen.insert(id);
        d.ack().await?;
    }
    ensure!(seen == id_set(&ids), "the set of received ids differs");
    Ok(())
}

/// `nack(1.5 s)` redelivers no sooner than the delay and within 10 s after it (RustStream
/// nack_after). Where a delayed nack is not supported, it must fail with `Unsupported`.
pub async fn nack_after_delay_honoured<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let delay = Duration::from_millis(1500);
    if !caps.nack_delay {
        return nack_is_unsupported(f, &caps, delay).await;
    }
    let topic = f.topic();
    let c = f.consumer(group_if_any(f, &caps).as_deref()).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    let ev = Event::new("later");
    p.publish(&topic, ev.clone()).await?;
    let d = sub.next("the event").await?;
    let nacked_at = Instant::now();
    d.nack(delay).await?;
    let again = sub
        .next_within(delay + Duration::from_secs(10))
        .await?
        .context("no redelivery within delay + 10 s")?;
    let waited = nacked_at.elapsed();
    ensure!(again.event().id() == ev.id(), "a different event came back");
    ensure!(
        waited >= delay - Duration::from_millis(100),
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    again.ack().await?;
    Ok(())
}

/// A terminated event is not delivered again (past the broker's redelivery timer). Where
/// `term` is unsupported, nack must be too.
pub async fn term_is_not_redelivered<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let topic = f.topic();
    let c = f.consumer(group_if_any(f, &caps).as_deref()).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    p.publish(&topic, Event::new("poison")).await?;
    let d = sub.next("the poison event").await?;
    match d.term().await {
        Ok(()) => {
            sub.expect_quiet("a terminated event must not come back")
                .await
        }
        Err(e) if e.error().kind() == ErrorKind::Unsupported => {
            ensure!(
                !caps.redelivery_on_nack,
                "term unsupported although nack is: {e}"
            );
            e.into_delivery().ack().await?;
            sub.expect_quiet("an acked event must not come back").await
        }
        Err(e) => Err(e.into()),
    }
}

/// Acking a later event does not consume an earlier unsettled one (RustStream settlement:
/// out-of-order settlement is safe). A member gets two events, acks the second, drops the
/// first and leaves; the next member of the group gets what the declaration says:
/// * with [`Unsettled::Redelivered`], the first again, and the acked second never;
/// * with [`Unsettled::RedeliveredFromPosition`], the first again, and the second too (the
///   group resumes from the first's position);
/// * with [`Unsettled::Lost`], nothing.
pub async fn out_of_order_ack_is_safe<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    if !caps.consumer_groups {
        return groups_are_unsupported(f).await;
    }
    let topic = f.topic();
    let group = f.group();
    let p = f.publisher().await?;
    let ids = with_member(f, Some(&group), &topic, async |sub| {
        // One key: a per-key backend keeps the two in order on one partition, where "the
        // group's position" is one offset.
        let ids = publish_n(&p, &topic, 2, |i| {
            Event::builder()
                .key("ooo")
                .data(format!("ooo-{i}"))
                .build()
                .expect("valid")
        })
        .await?;
        let a = sub.next("event 1").await?;
        let b = sub.next("event 2").await?;
        ensure!(
            a.event().id() == ids[0] && b.event().id() == ids[1],
            "order on a single subscriber"
        );
        b.ack().await?;
        drop(a); // unsettled
        Ok(ids)
    })
    .await?;
    with_member(f, Some(&group), &topic, async |sub| match caps.unsettled {
        Unsettled::Lost => {
            sub.expect_quiet("a dropped delivery is lost (declared Unsettled::Lost)")
                .await
        }
        Unsettled::Redelivered => {
            let d = sub.next("the unsettled first event again").await?;
            ensure!(
                d.event().id() == ids[0],
                "expected the first event back, got {:?}",
                d.event()
            );
            d.ack().await?;
            sub.expect_quiet("the acked second event must not come back")
                .await
        }
        _ => {
            let got = sub
                .collect_exact(&id_set(&ids))
                .await
                .context("the group resumes from the unsettled first event, so both come back")?;
            ensure!(got[0].id() == ids[0], "the first event came back second");
            sub.expect_quiet("each comes back once").await
        }
    })
    .await
}

/// A delivery dropped without settlement comes back where the backend declares it does
/// (RustStream: an unsettled delivery comes back), and stays away, past the redelivery timer,
/// where it declares [`Unsettled::Lost`].
pub async fn unsettled_delivery_returns<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let topic = f.topic();
    let p = f.publisher().await?;
    let c = f.consumer(group_if_any(f, &caps).as_deref()).await?;
    let ev = Event::new("dropped");
    let mut sub = subscribe(f, &c, &topic).await;
    p.publish(&topic, ev.clone()).await?;
    let d = sub.next("the event").await?;
    ensure!(d.event().id() == ev.id());
    drop(d);
    if !caps.unsettled.comes_back() {
        return sub
            .expect_quiet("a dropped delivery is lost (declared Unsettled::Lost)")
            .await;
    }
    let again = sub.next("the dropped event again").await?;
    ensure!(again.event().id() == ev.id(), "another event came back");
    ensure!(
        again.delivery_count() >= 2,
        "delivery count {}",
        again.delivery_count()
    );
    again.ack().await?;
    Ok(())
}

/// Publish 60; a group member reads and acks 20 and goes away; a new member reads the rest:
/// nothing is lost across the restart (watermill TestContinueAfterSubscribeClose). A group
/// declared not durable keeps nothing while it has no member: what is published then does not
/// reach the next member.
pub async fn no_loss_across_subscriber_restart<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    if !caps.consumer_groups {
        return groups_are_unsupported(f).await;
    }
    if !caps.durable_groups {
        return group_keeps_nothing_without_members(f).await;
    }
    let topic = f.topic();
    let group = f.group();
    let p = f.publisher().await?;
    let (ids, seen) = with_member(f, Some(&group), &topic, async |sub| {
        let ids = publish_n(&p, &topic, 60, |i| numbered("restart", i)).await?;
        let mut seen = HashSet::new();
        while seen.len() < 20 {
            let d = sub.next("the first 20").await?;
            seen.insert(d.event().id().to_owned());
            d.ack().await?;
        }
        Ok((ids, seen))
    })
    .await?;
    let rest: HashSet<String> = ids.iter().filter(|i| !seen.contains(*i)).cloned().collect();
    with_member(f, Some(&group), &topic, async |sub| {
        sub.collect_ids(&rest)
            .await
            .context("the rest after the restart")
    })
    .await?;
    Ok(())
}

/// Three members in turn nack what they get and go away; a last member still receives all 20
/// (watermill TestContinueAfterErrors). Without nack redelivery or durable groups, the
/// declared answer of the missing one is checked instead.
pub async fn continue_after_errors<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    if !caps.redelivery_on_nack {
        return nack_is_unsupported(f, &caps, Duration::ZERO).await;
    }
    if !caps.consumer_groups {
        return groups_are_unsupported(f).await;
    }
    if !caps.durable_groups {
        return group_keeps_nothing_without_members(f).await;
    }
    let topic = f.topic();
    let group = f.group();
    let p = f.publisher().await?;
    let ids = with_member(f, Some(&group), &topic, async |sub| {
        let ids = publish_n(&p, &topic, 20, |i| numbered("errors", i)).await?;
        sub.nack_next(5, "an event to nack").await?;
        Ok(ids)
    })
    .await?;
    for _ in 0..2 {
        with_member(f, Some(&group), &topic, async |sub| {
            sub.nack_next(5, "an event to nack").await
        })
        .await?;
    }
    with_member(f, Some(&group), &topic, async |sub| {
        sub.collect_ids(&id_set(&ids)).await
    })
    .await?;
    Ok(())
}

/// Two groups each receive all 30 events (watermill TestConsumerGroups). Without consumer
/// groups, joining one must fail with `Unsupported`.
pub async fn consumer_group_fanout<F: Fixture>(f: &F) -> Result<()> {
    if !declared(f)?.consumer_groups {
        return groups_are_unsupported(f).await;
    }
    let topic = f.topic();
    let (g1, g2) = (f.group(), f.group());
    let (c1, c2) = (f.consumer(Some(&g1)).await?, f.consumer(Some(&g2)).await?);
    let mut s1 = subscribe(f, &c1, &topic).await;
    let mut s2 = subscribe(f, &c2, &topic).await;
    let p = f.publisher().await?;
    let ids = id_set(&publish_n(&p, &topic, 30, |i| numbered("fanout", i)).await?);
    s1.collect_exact(&ids).await.context("group 1")?;
    s2.collect_exact(&ids).await.context("group 2")?;
    Ok(())
}

/// Two members of one group share 40 keyed events: together they get all, each gets some,
/// and no event is processed by both (Dapr certification, Kafka: a third consumer in the same
/// group shares the load). Every receipt is recorded; one that the broker marks as a
/// redelivery (delivery count above 1) is excepted from the overlap check and counted.
pub async fn consumer_group_balance<F: Fixture>(f: &F) -> Result<()> {
    if !declared(f)?.consumer_groups {
        return groups_are_unsupported(f).await;
    }
    let topic = f.topic();
    let group = f.group();
    let (c1, c2) = (
        f.consumer(Some(&group)).await?,
        f.consumer(Some(&group)).await?,
    );
    let mut s1 = subscribe(f, &c1, &topic).await;
    let mut s2 = subscribe(f, &c2, &topic).await;
    // Settle again now that both members joined (a rebalance may follow the second join).
    tokio::time::sleep(f.subscribe_settle()).await;
    let p = f.publisher().await?;
    let ids = publish_n(&p, &topic, 40, |i| {
        Event::builder()
            .key(format!("k{i}"))
            .data(format!("balance-{i}"))
            .build()
            .expect("valid")
    })
    .await?;
    let want = id_set(&ids);
    // What each member received first-hand, and the broker-marked redeliveries.
    let mut got: [HashMap<String, u32>; 2] = Default::default();
    let mut redeliveries = 0;
    let deadline = Instant::now() + s1.timeout();
    while got[0]
        .keys()
        .chain(got[1].keys())
        .collect::<HashSet<_>>()
        .len()
        < want.len()
    {
        ensure!(
            Instant::now() < deadline,
            "received {} + {} of {}",
            got[0].len(),
            got[1].len(),
            want.len()
        );
        for (i, sub) in [&mut s1, &mut s2].into_iter().enumerate() {
            if let Some(d) = sub.next_within(Duration::from_millis(50)).await? {
                let id = d.event().id().to_owned();
                ensure!(want.contains(&id), "a foreign event: {:?}", d.event());
                if d.delivery_count() > 1 {
                    redeliveries += 1;
                } else {
                    *got[i].entry(id).or_default() += 1;
                }
                d.ack().await?;
            }
        }
    }
    let both: Vec<&String> = got[0]
        .keys()
        .filter(|id| got[1].contains_key(*id))
        .collect();
    ensure!(
        both.is_empty(),
        "{} events were processed by both members ({redeliveries} marked redeliveries excepted)",
        both.len()
    );
    ensure!(
        !got[0].is_empty() && !got[1].is_empty(),
        "one member got nothing: {} / {}",
        got[0].len(),
        got[1].len()
    );
    let twice = got
        .iter()
        .flat_map(|m| m.values())
        .filter(|n| **n > 1)
        .count();
    ensure!(
        twice == 0,
        "{twice} events reached one member twice unmarked"
    );
    eprintln!(
        "{}: balance {} / {}, {redeliveries} marked redeliveries",
        f.name(),
        got[0].len(),
        got[1].len()
    );
    Ok(())
}

/// 16 keys, 10 events each, interleaved: each key's events arrive in publish order to a single
/// subscriber (watermill TestPublishSubscribeInOrder, Dapr ordered watcher). Where the
/// backend declares [`Ordering::PerTopic`], the whole sequence arrives in publish order.
pub async fn per_key_order<F: Fixture>(f: &F) -> Result<()> {
    let ordering = declared(f)?.ordering;
    let topic = f.topic();
    let c = f.consumer(None).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    let ids = publish_n(&p, &topic, 160, |i| {
        Event::builder()
            .key(format!("key-{}", i % 16))
            .data(format!("{}", i / 16))
            .build()
            .expect("valid")
    })
    .await?;
    let got = sub.collect_exact(&id_set(&ids)).await?;
    if ordering == Ordering::None {
        return order_is_not_kept(f, &p, &topic, &mut sub, ordering).await;
    }
    let mut last: HashMap<Vec<u8>, i64> = HashMap::new();
    for ev in &got {
        let key = ev.key().context("key lost")?.to_vec();
        let n: i64 = std::str::from_utf8(ev.data())?.parse()?;
        let prev = last.insert(key.clone(), n).unwrap_or(-1);
        ensure!(
            n == prev + 1,
            "key {} got {n} after {prev}",
            String::from_utf8_lossy(&key)
        );
    }
    if ordering == Ordering::PerTopic {
        let arrived: Vec<&str> = got.iter().map(Event::id).collect();
        let first_inversion = arrived.iter().zip(&ids).position(|(a, b)| *a != b.as_str());
        ensure!(
            first_inversion.is_none(),
            "declared per-topic order, but arrival differs from publish order at {first_inversion:?}"
        );
        return Ok(());
    }
    order_is_not_kept(f, &p, &topic, &mut sub, ordering).await
}

/// The declared ordering is the strongest the backend keeps: a backend declaring less shows
/// the reordering it warns about. 400 events on 16 keys are published one after another; a
/// backend that replays its backlog gets them through a fresh subscription afterwards (Kafka:
/// a fetch returns partition after partition), any other through the live one. With
/// [`Ordering::PerKey`] they must not all arrive in publish order, with [`Ordering::None`]
/// some key's events must arrive out of order.
async fn order_is_not_kept<F: Fixture>(
    f: &F,
    p: &F::Publisher,
    topic: &str,
    live: &mut Sub<'_, F::Consumer>,
    ordering: Ordering,
) -> Result<()> {
    let replayed = declared(f)?.backlog == Backlog::Delivered;
    let topic = if replayed {
        f.topic()
    } else {
        topic.to_owned()
    };
    let ids = publish_n(p, &topic, 400, |i| {
        Event::builder()
            .key(format!("key-{}", i % 16))
            .data(format!("{}", i / 16))
            .build()
            .expect("valid")
    })
    .await?;
    let got = if replayed {
        let c = f.consumer(None).await?;
        let mut fresh = subscribe(f, &c, &topic).await;
        fresh.collect_exact(&id_set(&ids)).await?
    } else {
        live.collect_exact(&id_set(&ids)).await?
    };
    let position: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let arrival: Vec<usize> = got.iter().map(|e| position[e.id()]).collect();
    let across = arrival.windows(2).filter(|w| w[1] < w[0]).count();
    let mut last: HashMap<usize, usize> = HashMap::new();
    let mut within = 0;
    for &i in &arrival {
        if last.insert(i % 16, i).is_some_and(|prev| prev > i) {
            within += 1;
        }
    }
    eprintln!(
        "{}: {across} inversions across keys, {within} within a key, among 400 events",
        f.name()
    );
    match ordering {
        Ordering::PerKey => ensure!(
            across > 0,
            "declared per-key order only, but 400 events on 16 keys arrived in publish order"
        ),
        _ => ensure!(
            within > 0,
            "declared no order, but every key's events arrived in publish order"
        ),
    }
    Ok(())
}

/// Ten tasks create, subscribe and close concurrently; afterwards 20 events reach a fresh
/// subscriber (watermill TestConcurrentClose).
pub async fn concurrent_close<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let churn = (0..10).map(|_| async {
        let p = f.publisher().await?;
        let c = f.consumer(None).await?;
        let sub = subscribe(f, &c, &topic).await;
        drop(sub);
        p.close().await?;
        anyhow::Ok(())
    });
    for r in join_all(churn).await {
        r?;
    }
    let c = f.consumer(None).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    let ids = publish_n(&p, &topic, 20, |i| numbered("after-close", i)).await?;
    sub.collect_ids(&id_set(&ids)).await?;
    Ok(())
}

/// 300 publishes in flight at once, then `close`: every one arrives (watermill
/// TestPublisherClose; RustStream shutdown_flushes).
pub async fn flush_on_close_loses_nothing<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let c = f.consumer(None).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    let events: Vec<Event> = (0..300).map(|i| numbered("flush", i)).collect();
    let ids: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let sends = events.into_iter().map(|ev| p.publish(&topic, ev));
    for r in join_all(sends).await {
        r?;
    }
    p.close().await?;
    sub.collect_ids(&ids).await?;
    Ok(())
}

/// After `close`, publishing fails promptly with `Closed`; closing twice is fine (RustStream:
/// after shutdown every aliased publisher must error).
pub async fn use_after_close_errors<F: Fixture>(f: &F) -> Result<()> {
    let p = f.publisher().await?;
    p.close().await?;
    p.close().await.context("closing twice must not fail")?;
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        p.publish(&f.topic(), Event::new("x")),
    )
    .await
    .context("publish after close hung")?;
    match r {
        Err(e) if e.kind() == ErrorKind::Closed => {}
        other => bail!("publish after close returned {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Events published before a subscriber (without a group position) exists are delivered or
/// missed, exactly as the backend declares (RustStream publish_before_subscribe; watermill
/// TestNewSubscriberReceivesOldMessages).
pub async fn late_subscriber_backlog<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let p = f.publisher().await?;
    // Make the topic exist on brokers that create it on first use.
    let warm = f.consumer(None).await?;
    drop(subscribe(f, &warm, &topic).await);
    let old = id_set(&publish_n(&p, &topic, 5, |i| numbered("old", i)).await?);
    // "Old" means the broker has them before the subscription exists. A core NATS publish
    // resolves on hand-off to the client; until a flush (PING/PONG) the events may still sit
    // in the publisher's connection and reach the server after the new SUB, which then gets
    // them (seen once in a fresh-clone run).
    p.flush().await?;
    let c = f.consumer(None).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    match declared(f)?.backlog {
        Backlog::Delivered => {
            sub.collect_ids(&old).await.context("the backlog")?;
        }
        _ => {
            let new = Event::new("new");
            p.publish(&topic, new.clone()).await?;
            let d = sub.next("the new event").await?;
            ensure!(
                !old.contains(d.event().id()),
                "a missed-backlog backend delivered an old event"
            );
            ensure!(d.event().id() == new.id());
            d.ack().await?;
        }
    }
    Ok(())
}

/// A payload over the declared limit fails with `PayloadTooLarge` and the publisher keeps
/// working. A backend that declares no limit delivers a 4 MiB payload.
pub async fn oversized_payload_rejected<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let c = f.consumer(None).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    let Some(max) = declared(f)?.max_payload else {
        let big = Event::new(vec![b'x'; 4 << 20]);
        p.publish(&topic, big.clone())
            .await
            .context("declares no payload limit, yet refused 4 MiB")?;
        let d = sub.next("the 4 MiB event").await?;
        ensure!(d.event().id() == big.id() && d.payload().len() == 4 << 20);
        d.ack().await?;
        return Ok(());
    };
    let err = p
        .publish(&topic, Event::new(vec![b'x'; max + 1]))
        .await
        .err()
        .context("an oversized payload was accepted")?;
    ensure!(err.kind() == ErrorKind::PayloadTooLarge, "got {err}");
    let ok = Event::new("fits");
    p.publish(&topic, ok.clone())
        .await
        .context("the publisher broke after a rejection")?;
    let d = sub.next("the event after the rejection").await?;
    ensure!(d.event().id() == ok.id());
    d.ack().await?;
    Ok(())
}

/// Empty, blank and wildcard topics fail with `InvalidTopic`, on publish and on subscribe.
pub async fn invalid_topic_rejected<F: Fixture>(f: &F) -> Result<()> {
    let p = f.publisher().await?;
    for bad in ["", "has space", "nul\0byte"] {
        let err = p
            .publish(bad, Event::new("x"))
            .await
            .err()
            .with_context(|| format!("{bad:?} accepted"))?;
        ensure!(err.kind() == ErrorKind::InvalidTopic, "{bad:?}: {err}");
    }
    for wildcard in ["a.*", "a/#", "a/+", "a.>"] {
        let r = p.publish(wildcard, Event::new("x")).await;
        if let Err(e) = r {
            ensure!(e.kind() == ErrorKind::InvalidTopic, "{wildcard:?}: {e}");
        } else {
            // Some brokers treat these as plain characters; they must not be wildcards then.
            eprintln!("{}: {wildcard:?} is a legal topic name here", f.name());
        }
    }
    let c = f.consumer(None).await?;
    let mut stream = Box::pin(c.subscribe(""));
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::StreamExt::next(&mut stream),
    )
    .await
    .context("subscribing to an empty topic hung")?;
    match first {
        Some(Err(e)) if e.kind() == ErrorKind::InvalidTopic => Ok(()),
        other => bail!("subscribe(\"\") yielded {other:?}"),
    }
}

/// `publish_json` sets `application/json` and the bytes of the value.
pub async fn publish_json_sets_content_type<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let c = f.consumer(None).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    p.publish_json(&topic, &HashMap::from([("order", 42)]))
        .await?;
    let d = sub.next("the JSON event").await?;
    ensure!(
        d.payload() == br#"{"order":42}"#,
        "payload {:?}",
        String::from_utf8_lossy(d.payload())
    );
    if declared(f)?.headers {
        ensure!(
            d.event().content_type() == Some("application/json"),
            "{:?}",
            d.event().content_type()
        );
    }
    d.ack().await?;
    Ok(())
}

/// The erased `BoxPublisher`/`BoxConsumer` behave like the concrete types.
pub async fn boxed_backends_work<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let concrete = f.consumer(None).await?;
    let declared_by_concrete = concrete.capabilities();
    let c = BoxConsumer::new(concrete);
    ensure!(
        c.capabilities() == declared_by_concrete,
        "BoxConsumer declares {:?}, the consumer {declared_by_concrete:?}",
        c.capabilities()
    );
    let p: BoxPublisher = f.publisher().await?.boxed();
    let mut stream = Box::pin(c.subscribe(&topic));
    let settle = f.subscribe_settle();
    let mut first = None;
    if let Ok(item) = tokio::time::timeout(settle, futures_util::StreamExt::next(&mut stream)).await
    {
        first = item;
    }
    let ev = Event::new("boxed");
    p.clone().publish(&topic, ev.clone()).await?;
    let d = match first {
        Some(d) => d?,
        None => tokio::time::timeout(
            f.receive_timeout(),
            futures_util::StreamExt::next(&mut stream),
        )
        .await
        .context("no delivery through BoxConsumer")?
        .context("stream ended")??,
    };
    ensure!(d.event().id() == ev.id());
    d.ack().await?;
    p.close().await?;
    Ok(())
}

/// Publishing and consuming from spawned tasks works (the futures and streams are `Send`).
pub async fn spawned_tasks_work<F: Fixture>(f: &F) -> Result<()> {
    let topic = f.topic();
    let consumer = f.consumer(None).await?;
    let settle = f.subscribe_settle();
    let timeout = f.receive_timeout();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let t = topic.clone();
    let consumer_task = tokio::spawn(async move {
        let mut stream = Box::pin(consumer.subscribe(&t)).peekable();
        let _ = tokio::time::timeout(settle, std::pin::Pin::new(&mut stream).peek()).await;
        let _ = ready_tx.send(());
        let d = tokio::time::timeout(timeout, futures_util::StreamExt::next(&mut stream)).await;
        match d {
            Ok(Some(Ok(d))) => {
                let id = d.event().id().to_owned();
                d.ack().await?;
                anyhow::Ok(id)
            }
            other => bail!("spawned consumer got {other:?}"),
        }
    });
    ready_rx.await.context("consumer task died")?;
    let p = f.publisher().await?;
    let ev = Event::new("spawned");
    let id = ev.id().to_owned();
    let t = topic.clone();
    tokio::spawn(async move { p.publish(&t, ev).await }).await??;
    let got = consumer_task.await??;
    ensure!(got == id);
    Ok(())
}

/// The fixture declares exactly what the library's consumers declare, so the scenarios above
/// check the library's own `Capabilities`, not a test-only copy.
pub async fn capabilities_match_the_backend<F: Fixture>(f: &F) -> Result<()> {
    let declared = f.capabilities();
    let plain = f.consumer(None).await?.capabilities();
    ensure!(
        plain == declared,
        "consumer(None) declares {plain:?}, the fixture {declared:?}"
    );
    if declared.consumer_groups {
        let grouped = f.consumer(Some(&f.group())).await?.capabilities();
        ensure!(
            grouped == declared,
            "a group consumer declares {grouped:?}, the fixture {declared:?}"
        );
    }
    Ok(())
}

/// The same event (same id) published twice: a backend declaring `exactly_once_publish`
/// delivers it once; any other delivers both copies.
pub async fn duplicate_publish_stored_once<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let topic = f.topic();
    let c = f.consumer(None).await?;
    let mut sub = subscribe(f, &c, &topic).await;
    let p = f.publisher().await?;
    // One key for all three, so that a per-key backend keeps them in publish order (Kafka
    // spreads keyless records over partitions) and "after" really comes after the copies.
    let keyed = |data: &str| Event::builder().key("dup").data(data.to_owned()).build();
    let ev = keyed("twice")?;
    p.publish(&topic, ev.clone()).await?;
    p.publish(&topic, ev.clone()).await?;
    let after = keyed("after")?;
    p.publish(&topic, after.clone()).await?;
    let mut copies = 0;
    loop {
        let d = sub.next("the copies and the event after them").await?;
        let id = d.event().id().to_owned();
        d.ack().await?;
        if id == after.id() {
            break;
        }
        ensure!(id == ev.id(), "a foreign event: {id}");
        copies += 1;
    }
    let want = if caps.exactly_once_publish { 1 } else { 2 };
    ensure!(
        copies == want,
        "{copies} copies of an event published twice; the declaration means {want}"
    );
    sub.expect_quiet("no further copies").await
}

/// On a broker of its own: a group member receives 5 events, leaves them unsettled and goes
/// away; the broker is killed (SIGKILL, no clean shutdown) and started again. A backend
/// declared `persistent` delivers all 5 to the next member; one declared not persistent
/// delivers none of them.
pub async fn persistent_across_broker_restart<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let PrivateBroker {
        fixture: pf,
        mut broker,
    } = f.private_broker().await.context("a broker of our own")?;
    let topic = pf.topic();
    let group = group_if_any(&pf, &caps);
    ensure!(
        !caps.persistent || caps.durable_groups || caps.backlog == Backlog::Delivered,
        "declared persistent, but neither durable groups nor a replayed backlog could show it"
    );
    let p = pf.publisher().await?;
    let ids = with_member(&pf, group.as_deref(), &topic, async |sub| {
        let ids = publish_n(&p, &topic, 5, |i| numbered("persist", i)).await?;
        let mut held = Vec::new();
        for _ in 0..ids.len() {
            held.push(sub.next("the events before the restart").await?);
        }
        drop(held); // unsettled
        Ok(id_set(&ids))
    })
    .await?;
    p.close().await?;
    broker.restart().await.context("restarting the broker")?;
    with_member(&pf, group.as_deref(), &topic, async |sub| {
        if caps.persistent {
            sub.collect_exact(&ids)
                .await
                .context("unsettled events after a broker restart (declared persistent)")
                .map(drop)
        } else {
            sub.expect_quiet("declared not persistent, yet events outlived the broker")
                .await
        }
    })
    .await
}

/// Request-reply works where it is declared (the reply carries the request's data) and fails
/// with `Unsupported` where it is not.
pub async fn request_reply_as_declared<F: Fixture>(f: &F) -> Result<()> {
    let caps = declared(f)?;
    let topic = f.topic();
    let request = Event::new("ping");
    let reply = tokio::time::timeout(f.receive_timeout(), f.request_echo(&topic, request))
        .await
        .context("request-reply hung")?;
    match (caps.request_reply, reply) {
        (true, Ok(r)) => {
            ensure!(r.data().as_ref() == b"ping", "reply data {:?}", r.data());
            Ok(())
        }
        (false, Err(e)) if e.kind() == ErrorKind::Unsupported => Ok(()),
        (declared, got) => bail!("request_reply declared {declared}, the request gave {got:?}"),
    }
}
