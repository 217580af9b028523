//! Hostile input against a real mosquitto.
