//! Integration tests of polybus-compose: the engine over in-memory brokers (plain
//! `cargo test`), crash safety with a killed child process, and the real-broker acceptance
//! runs (ignored unless brokers are up: `cargo xtask test`).

mod brokers;
mod cluster;
mod crash;
mod engine;
mod nats_outage;
mod observability;
mod soak;
mod support;
