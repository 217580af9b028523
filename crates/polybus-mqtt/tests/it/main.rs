//! Integration tests against a real mosquitto (see `cargo xtask test`).

mod conformance;
mod errors;
mod interop;
mod perf;
mod resilience;
mod support;
mod tls;
