//! Test-only mutations of a fixture's declaration, to prove that every [`Capabilities`] field
//! is checked: with `POLYBUS_CAPS_MUTATION=<mutation>` in the environment, the scenarios read
//! the declaration with that one field changed, and some scenario must then fail
//! (`cargo xtask mutations` runs them all and prints the table).
//! [`capabilities_match_the_backend`](crate::suite::capabilities_match_the_backend) keeps
//! comparing the unmutated declaration with the library's.

use anyhow::{Result, bail};
use polybus_core::{Backlog, Capabilities, Ordering, Unsettled};

use crate::Fixture;

/// The environment variable that selects a mutation.
pub const ENV: &str = "POLYBUS_CAPS_MUTATION";

/// Every mutation: a bool field flips; an enum field takes the named value (no mutation
/// where it already has it); `max_payload` becomes `None` if set, else 1 KiB.
pub const MUTATIONS: &[&str] = &[
    "persistent",
    "redelivery_on_nack",
    "nack_delay",
    "unsettled=Lost",
    "unsettled=Redelivered",
    "unsettled=RedeliveredFromPosition",
    "consumer_groups",
    "durable_groups",
    "ordering=None",
    "ordering=PerKey",
    "ordering=PerTopic",
    "backlog",
    "exactly_once_publish",
    "headers",
    "request_reply",
    "max_payload",
];

/// The declaration the scenarios check: the fixture's, with the mutation from [`ENV`]
/// applied if one is set.
///
/// A mutation that leaves this backend's declaration as it is fails every scenario with a
/// message saying so ([`SAME_VALUE`]), so the table can tell "nothing to flip" from "nothing
/// caught it".
///
/// # Errors
/// An unknown mutation name, or one that changes nothing here.
pub fn declared<F: Fixture>(f: &F) -> Result<Capabilities> {
    let caps = f.capabilities();
    match std::env::var(ENV) {
        Ok(m) if !m.is_empty() => {
            let mutated = apply(caps, &m)?;
            if mutated == caps {
                bail!("{ENV}={m} {SAME_VALUE} {}", f.name());
            }
            Ok(mutated)
        }
        _ => Ok(caps),
    }
}

/// What [`declared`] says when a mutation does not change a backend's declaration.
pub const SAME_VALUE: &str = "is already the declaration of";

/// `caps` with `mutation` applied.
///
/// # Errors
/// An unknown mutation name.
pub fn apply(mut caps: Capabilities, mutation: &str) -> Result<Capabilities> {
    match mutation {
        "persistent" => caps.persistent = !caps.persistent,
        "redelivery_on_nack" => caps.redelivery_on_nack = !caps.redelivery_on_nack,
        "nack_delay" => caps.nack_delay = !caps.nack_delay,
        "unsettled=Lost" => caps.unsettled = Unsettled::Lost,
        "unsettled=Redelivered" => caps.unsettled = Unsettled::Redelivered,
        "unsettled=RedeliveredFromPosition" => {
            caps.unsettled = Unsettled::RedeliveredFromPosition;
        }
        "consumer_groups" => caps.consumer_groups = !caps.consumer_groups,
        "durable_groups" => caps.durable_groups = !caps.durable_groups,
        "ordering=None" => caps.ordering = Ordering::None,
        "ordering=PerKey" => caps.ordering = Ordering::PerKey,
        "ordering=PerTopic" => caps.ordering = Ordering::PerTopic,
        "backlog" => {
            caps.backlog = match caps.backlog {
                Backlog::Delivered => Backlog::Missed,
                _ => Backlog::Delivered,
            }
        }
        "exactly_once_publish" => caps.exactly_once_publish = !caps.exactly_once_publish,
        "headers" => caps.headers = !caps.headers,
        "request_reply" => caps.request_reply = !caps.request_reply,
        "max_payload" => {
            caps.max_payload = match caps.max_payload {
                Some(_) => None,
                None => Some(1024),
            }
        }
        other => bail!("unknown mutation {other:?}; known: {MUTATIONS:?}"),
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_change_the_declaration_and_assignments_settle() {
        let base = Capabilities::NONE;
        for m in MUTATIONS {
            let mutated = apply(base, m).unwrap();
            if m.contains('=') {
                assert_eq!(apply(mutated, m).unwrap(), mutated, "{m}");
            } else {
                assert_ne!(mutated, base, "{m} changed nothing");
                assert_eq!(apply(mutated, m).unwrap(), base, "{m} twice");
            }
        }
        assert!(apply(base, "nonsense").is_err());
    }
}
