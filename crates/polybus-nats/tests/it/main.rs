//! Integration tests against a real nats-server (`cargo xtask test`, or
//! `cargo test -p polybus-nats -- --include-ignored` with a server on `POLYBUS_NATS_URL`).

mod binding_props;
mod conformance;
mod errors;
mod hostile;
mod interop;
mod resilience;
mod security;

/// The shared server's URL.
pub(crate) fn nats_url() -> String {
    std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}
