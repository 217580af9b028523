//! Integration tests against a real nats-server with JetStream (`cargo xtask test`, or
//! `cargo test -p polybus-jetstream -- --include-ignored` with a server on
//! `POLYBUS_NATS_URL`).

mod cluster;
mod conformance;
mod errors;
mod features;
mod kv;
mod resilience;
mod security;

/// The shared server's URL.
pub(crate) fn nats_url() -> String {
    std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Prefix of the streams the tests create on the shared server.
pub(crate) const TEST_PREFIX: &str = "POLYBUS_TEST_";

/// Test streams live 15 minutes; older ones (left by earlier runs) are deleted.
pub(crate) const TEST_STREAM_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Deletes test streams older than [`TEST_STREAM_AGE`] that earlier runs left behind.
pub(crate) async fn delete_stale_test_streams(js: &polybus_jetstream::JetStream) {
    use futures_util::StreamExt;
    let ctx = js.context();
    let now = async_nats::datetime::now();
    let mut streams = ctx.streams();
    let mut stale = Vec::new();
    while let Some(Ok(info)) = streams.next().await {
        let old = async_nats::datetime::add_std_duration(info.created, TEST_STREAM_AGE)
            .is_ok_and(|t| t < now);
        if info.config.name.starts_with(TEST_PREFIX) && old {
            stale.push(info.config.name);
        }
    }
    for name in stale {
        let _ = ctx.delete_stream(&name).await;
    }
}
