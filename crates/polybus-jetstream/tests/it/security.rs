//! JetStream under per-subject permissions: a publish the user may not make is
//! `Unauthorized` on that call (not a wait for the acknowledgement timeout).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use polybus_core::{Consumer, ErrorKind, Event, Publisher};
use polybus_jetstream::{JsOptions, StreamPolicy};
use polybus_testkit::brokers::BrokerProcess;

/// `js` may use the JetStream API and the inbox subjects, and publish only under `js.ok.>`;
/// `noapi` may publish under `js.>` but not call the JetStream API.
const PERMISSIONS: &str = r#"
authorization {
  users = [
    { user: "js", password: "pw", permissions: {
        publish: { allow: ["js.ok.>", "$JS.API.>", "$JS.ACK.>", "_INBOX.>"] }
        subscribe: { allow: ["_INBOX.>"] }
    } }
    { user: "noapi", password: "pw", permissions: {
        publish: { allow: ["js.>", "_INBOX.>"] }
        subscribe: { allow: ["_INBOX.>"] }
    } }
  ]
}
"#;

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn security_jetstream_publish_outside_the_grant_is_unauthorized() -> anyhow::Result<()> {
    let server = BrokerProcess::nats(PERMISSIONS).await?;
    let js = JsOptions::new(server.url())
        .user_password("js", "pw")
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "SEC_".into(),
        })
        .publish_timeout(Duration::from_secs(20))
        .connect()
        .await?;
    let p = js.producer();
    // Inside the grant: stored and consumed.
    let r = p.publish("js.ok.a", Event::new("in")).await?;
    assert_eq!(r.sequence(), Some(1));
    let consumer = js.consumer(Some("sec-reader"));
    let mut s = std::pin::pin!(consumer.subscribe("js.ok.a"));
    let d = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await?
        .expect("open")?;
    assert_eq!(d.payload(), b"in");
    d.ack().await?;

    // Outside: the server drops the message and says so; the publish fails at once with
    // Unauthorized instead of waiting 20 s for an acknowledgement.
    let started = Instant::now();
    let e = p
        .publish("js.denied.b", Event::new("out"))
        .await
        .expect_err("denied");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert_eq!(e.backend(), "jetstream");
    assert!(e.to_string().contains("js.denied.b"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    println!("denied JetStream publish ({:?}): {e}", started.elapsed());
    // The producer goes on.
    let r = p.publish("js.ok.a", Event::new("after")).await?;
    assert_eq!(r.sequence(), Some(2));

    // A user who may not call the JetStream API: creating the stream is refused.
    let started = Instant::now();
    let noapi = JsOptions::new(server.url())
        .user_password("noapi", "pw")
        .stream_policy(StreamPolicy::PerTopic {
            prefix: "SEC2_".into(),
        })
        .publish_timeout(Duration::from_secs(3))
        .producer()
        .await?;
    let e = noapi
        .publish("js.x", Event::new("x"))
        .await
        .expect_err("no API access");
    println!("no JetStream API permission ({:?}): {e}", started.elapsed());
    assert!(
        e.kind() == ErrorKind::Unauthorized && started.elapsed() < Duration::from_secs(3),
        "{e}"
    );
    Ok(())
}
