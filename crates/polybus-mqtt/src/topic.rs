//! MQTT topic names and filters.
//!
//! MQTT's own rules: UTF-8 (a `&str` already is), not empty, at most 65 535 bytes, no NUL,
//! no wildcard (`+`, `#`) in a topic name, wildcards only as whole levels in a filter (`#` only
//! last). polybus adds one rule shared by every backend: no whitespace and no control
//! characters, so a topic name means the same thing on every broker.

use polybus_core::{Error, ErrorKind, Result};

use crate::BACKEND;

/// The longest topic name or filter MQTT can encode.
pub(crate) const MAX_TOPIC_LEN: usize = 65_535;

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidTopic, BACKEND).with_message(msg)
}

fn common(topic: &str) -> Result<()> {
    polybus_core::topic::validate_common(topic, BACKEND, MAX_TOPIC_LEN)
}

/// Checks a topic name to publish to.
pub(crate) fn validate_name(topic: &str) -> Result<()> {
    common(topic)?;
    if let Some(c) = topic.chars().find(|c| matches!(c, '+' | '#')) {
        return Err(invalid(format!(
            "topic {topic:?} contains the wildcard {c:?}: wildcards are for subscriptions"
        )));
    }
    Ok(())
}

/// Checks a subscription filter, including `$share/<group>/<filter>`.
pub(crate) fn validate_filter(filter: &str) -> Result<()> {
    common(filter)?;
    let plain = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (group, f) = rest
                .split_once('/')
                .ok_or_else(|| invalid(format!("shared subscription {filter:?} has no filter")))?;
            validate_group(group)?;
            if f.is_empty() {
                return Err(invalid(format!(
                    "shared subscription {filter:?} has no filter"
                )));
            }
            f
        }
        None => filter,
    };
    let levels: Vec<&str> = plain.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(invalid(format!(
                "filter {filter:?}: `#` must be a whole level and the last one"
            )));
        }
        if level.contains('+') && *level != "+" {
            return Err(invalid(format!(
                "filter {filter:?}: `+` must be a whole level"
            )));
        }
    }
    Ok(())
}

/// Checks a shared-subscription group name.
pub(crate) fn validate_group(group: &str) -> Result<()> {
    if group.is_empty() {
        return Err(invalid("consumer group name is empty".into()));
    }
    if let Some(c) = group
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!("consumer group {group:?} contains {c:?}")));
    }
    Ok(())
}

/// The filter a shared subscription matches topics with (`$share/g/a/+` -> `a/+`).
pub(crate) fn match_filter(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

/// Whether `topic` matches `filter` (MQTT rules: `+` one level, `#` the rest, topics starting
/// with `$` only match filters that name the `$` level).
pub(crate) fn matches(topic: &str, filter: &str) -> bool {
    // A filter without wildcards matches only itself (the common case, checked per message).
    if topic == filter {
        return true;
    }
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "a/b", "/a", "a/", "ünï/cøde", "a.*", "a.>", "$SYS/x"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "a/+", "a/#", "has space", "nul\0", "tab\t"] {
            assert_eq!(
                validate_name(bad).unwrap_err().kind(),
                ErrorKind::InvalidTopic,
                "{bad:?}"
            );
        }
        assert!(validate_name(&"a".repeat(MAX_TOPIC_LEN)).is_ok());
        assert!(validate_name(&"a".repeat(MAX_TOPIC_LEN + 1)).is_err());
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "a/+/c",
            "a/#",
            "+/+",
            "$share/g/a/#",
            "$share/g/+",
        ] {
            validate_filter(ok).unwrap();
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+/b",
            "$share/g",
            "$share//a",
            "$share/g/",
            "x y",
        ] {
            assert!(validate_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(!matches("a/b", "a/+/c"));
        assert!(!matches("$SYS/x", "#"));
        assert!(matches("$SYS/x", "$SYS/#"));
        assert_eq!(match_filter("$share/g/a/+"), "a/+");
        assert_eq!(match_filter("a/+"), "a/+");
    }
}
