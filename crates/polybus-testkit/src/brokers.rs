//! Broker processes for tests (filled in next).
