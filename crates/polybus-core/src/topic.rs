//! Topic-name checks shared by the backends. Each adapter adds its broker's own rules.

use crate::{Error, ErrorKind, Result};

/// Characters that are wildcards on at least one broker (NATS `*` `>`, MQTT `+` `#`).
pub const WILDCARDS: [char; 4] = ['*', '>', '+', '#'];

/// Checks a concrete topic name (one you can publish to): not empty, at most `max_len` bytes,
/// no whitespace, no control characters, no wildcard.
///
/// # Errors
/// [`ErrorKind::InvalidTopic`] tagged with `backend`, naming what is wrong.
///
/// ```
/// use polybus_core::{topic, ErrorKind};
/// assert!(topic::validate_name("orders.created", "memory", 255).is_ok());
/// let err = topic::validate_name("orders.*", "memory", 255).unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::InvalidTopic);
/// ```
pub fn validate_name(topic: &str, backend: &'static str, max_len: usize) -> Result<()> {
    validate_common(topic, backend, max_len)?;
    if let Some(c) = topic.chars().find(|c| WILDCARDS.contains(c)) {
        return Err(invalid(
            backend,
            format!("topic {topic:?} contains the wildcard {c:?}"),
        ));
    }
    Ok(())
}

/// The checks every topic or subscription filter must pass: not empty, at most `max_len`
/// bytes, no whitespace and no control characters.
///
/// # Errors
/// [`ErrorKind::InvalidTopic`] tagged with `backend`.
pub fn validate_common(topic: &str, backend: &'static str, max_len: usize) -> Result<()> {
    if topic.is_empty() {
        return Err(invalid(backend, "topic is empty".to_owned()));
    }
    if topic.len() > max_len {
        return Err(invalid(
            backend,
            format!("topic is {} bytes, the limit is {max_len}", topic.len()),
        ));
    }
    if let Some(c) = topic.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(backend, format!("topic {topic:?} contains {c:?}")));
    }
    Ok(())
}

fn invalid(backend: &'static str, msg: String) -> Error {
    Error::new(ErrorKind::InvalidTopic, backend).with_message(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_each_bad_shape_with_invalid_topic() {
        for t in [
            "",
            "a b",
            "tab\there",
            "nl\n",
            "nul\0",
            "a.*",
            "a.>",
            "a/+",
            "a/#",
        ] {
            let e = validate_name(t, "x", 255).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{t:?}");
        }
        assert_eq!(
            validate_name(&"a".repeat(256), "x", 255)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidTopic
        );
        assert!(validate_name("ünïcode.ok-1_2", "x", 255).is_ok());
        assert!(validate_common("a.*", "x", 255).is_ok());
    }
}
