//! Crash safety: the process running the bus is killed with SIGKILL mid-run; a bus restarted
//! on the same spool forwards every event the dead one acknowledged.
//!
//! The test re-executes its own binary, running itself: with `POLYBUS_COMPOSE_CRASH_CHILD`
//! naming a spool directory it is the child, which publishes forever and prints `ACK <id>`
//! after each acknowledged publish. There is no separate child test that would pass without
//! doing anything.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use polybus_compose::Bus;
use polybus_core::MemoryBroker;

use crate::support::{Env, Flaky, keyed};

pub(crate) const CHILD_ENV: &str = "POLYBUS_COMPOSE_CRASH_CHILD";

/// The child half of `sigkill_mid_run_loses_no_acknowledged_event`: publishes until killed.
async fn crash_child(dir: String) -> Result<()> {
    // In-process brokers die with the process, so the child's Kafka is "down": every
    // acknowledged event must survive in the spool alone.
    let (nats, kafka) = (MemoryBroker::new(), MemoryBroker::new());
    let down = Flaky::new(kafka.publisher());
    down.set_down(true);
    let bus = Bus::builder()
        .memory(&nats, &kafka)
        .kafka_publisher(down)
        .spool_dir(dir)
        .build()
        .await?;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let r = bus
                    .publish("crash.test", keyed(&format!("c{t}"), i, 8))
                    .await?;
                println!("ACK {}", r.id());
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs the child until it acknowledged at least `min_acks`, kills it with SIGKILL, and
/// returns every id it acknowledged.
pub(crate) fn run_child_and_kill(
    test_name: &str,
    envs: &[(&str, String)],
    min_acks: usize,
) -> Result<HashSet<String>> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        test_name,
        "--exact",
        "--nocapture",
        "--include-ignored",
        "--test-threads=1",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("spawning the child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = HashSet::new();
    let started = std::time::Instant::now();
    while acked.len() < min_acks {
        match lines.next() {
            Some(line) => {
                if let Some(id) = line?.strip_prefix("ACK ") {
                    acked.insert(id.to_owned());
                }
            }
            None => bail!("the child ended after {} acks", acked.len()),
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            bail!(
                "the child acknowledged only {} events in 120 s",
                acked.len()
            );
        }
    }
    // SIGKILL: no destructor, no close, no final commit.
    child.kill()?;
    // Lines the child wrote before it died are still in the pipe.
    for line in lines {
        if let Some(id) = line?.strip_prefix("ACK ") {
            acked.insert(id.to_owned());
        }
    }
    child.wait()?;
    Ok(acked)
}

#[tokio::test]
async fn sigkill_mid_run_loses_no_acknowledged_event() -> Result<()> {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return crash_child(dir).await;
    }
    let env = Env::new();
    let dir = env.dir.path().display().to_string();
    let acked = tokio::task::spawn_blocking(move || {
        run_child_and_kill(
            "crash::sigkill_mid_run_loses_no_acknowledged_event",
            &[(CHILD_ENV, dir)],
            500,
        )
    })
    .await??;

    env.track("crash.test", "check");
    let bus = env.bus().await;
    let depth = bus.spool_depth();
    assert!(
        depth >= acked.len() as u64,
        "the spool holds {depth} events, {} were acknowledged",
        acked.len()
    );
    assert!(bus.wait_forwarded(Duration::from_secs(30)).await);
    let got = env
        .drain_kafka("crash.test", "check", depth as usize)
        .await?;
    let ids: HashSet<String> = got.iter().map(|e| e.id().to_owned()).collect();
    let lost: Vec<_> = acked.difference(&ids).take(5).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    println!(
        "crash figures: acknowledged {}, spooled at restart {depth}, in Kafka {}",
        acked.len(),
        got.len()
    );
    bus.close().await?;
    Ok(())
}
