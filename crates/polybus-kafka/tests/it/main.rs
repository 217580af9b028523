//! Integration tests of polybus-kafka. Tests that need a broker are `#[ignore]`d under plain
//! `cargo test`; run them with `cargo xtask test` or `cargo test -p polybus-kafka --
//! --include-ignored` with tansu on 127.0.0.1:9092 (`POLYBUS_KAFKA_BROKERS` overrides).

mod batch;
mod common;
mod conformance;
mod errors;
mod flow;
mod hostile;
mod interop;
mod resilience;
mod security;
mod start_time;
mod tansu;
mod transactions;
