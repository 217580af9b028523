//! Integration tests against a real mosquitto (see `cargo xtask test`).

mod close;
mod conformance;
mod errors;
mod hostile;
mod interop;
mod perf;
mod resilience;
mod security;
mod support;
