//! Integration tests of polybus-runtime: the in-process ones (`app`, on the memory backend
//! through `TestApp`) run under plain `cargo test`; the runtime conformance suite
//! (`conformance`) runs on memory there too, and on NATS, JetStream and Kafka with
//! `cargo xtask test` (those are `#[ignore]`d otherwise), as does `lifecycle` (SIGTERM and
//! SIGKILL of a child process running an app mid-load on JetStream and Kafka).

mod app;
mod conformance;
#[cfg(feature = "http")]
mod http;
mod lifecycle;
mod reply;
mod support;
