//! Hostile input against a real nats-server.
