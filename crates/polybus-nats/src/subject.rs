//! NATS subject rules.

use std::sync::{Arc, Mutex};

use async_nats::Subject;
use polybus_core::{Error, ErrorKind, Result, topic};

/// The longest subject accepted, in bytes: half of the server's default `max_control_line`
/// (4 KiB), so that a subject and a reply inbox always fit on one protocol line.
pub const MAX_SUBJECT_LEN: usize = 2048;

/// Checks a subject you publish to: not empty, at most [`MAX_SUBJECT_LEN`] bytes, no
/// whitespace or control characters, no empty token (so no leading, trailing or doubled dot),
/// and no wildcard token (`*` or `>`). `backend` tags the error.
///
/// Characters that are wildcards elsewhere (`+`, `#`) and `*` or `>` inside a longer token
/// (`a*b`) are ordinary characters in NATS and are accepted.
///
/// # Errors
/// [`ErrorKind::InvalidTopic`] naming what is wrong.
///
/// ```
/// use polybus_core::ErrorKind;
/// use polybus_nats::validate_publish_subject;
///
/// assert!(validate_publish_subject("orders.created", "nats").is_ok());
/// for bad in ["", "a b", ".a", "a.", "a..b", "a.*", "a.>"] {
///     let err = validate_publish_subject(bad, "nats").unwrap_err();
///     assert_eq!(err.kind(), ErrorKind::InvalidTopic, "{bad:?}");
/// }
/// ```
pub fn validate_publish_subject(subject: &str, backend: &'static str) -> Result<()> {
    validate(subject, backend, false)
}

/// Checks a subject you subscribe to: the rules of [`validate_publish_subject`], except that
/// the wildcard tokens `*` (one token) and `>` (the rest, last token only) are allowed.
///
/// # Errors
/// [`ErrorKind::InvalidTopic`] naming what is wrong.
///
/// ```
/// use polybus_nats::validate_subscribe_subject;
///
/// assert!(validate_subscribe_subject("orders.*.eu", "nats").is_ok());
/// assert!(validate_subscribe_subject("orders.>", "nats").is_ok());
/// assert!(validate_subscribe_subject("orders.>.eu", "nats").is_err());
/// ```
pub fn validate_subscribe_subject(subject: &str, backend: &'static str) -> Result<()> {
    validate(subject, backend, true)
}

fn validate(subject: &str, backend: &'static str, wildcards: bool) -> Result<()> {
    if fast_ok(subject.as_bytes(), wildcards) {
        return Ok(());
    }
    topic::validate_common(subject, backend, MAX_SUBJECT_LEN)?;
    let invalid = |msg: String| Error::new(ErrorKind::InvalidTopic, backend).with_message(msg);
    let count = subject.split('.').count();
    for (i, token) in subject.split('.').enumerate() {
        if token.is_empty() {
            return Err(invalid(format!(
                "subject {subject:?} has an empty token (a leading, trailing or doubled dot)"
            )));
        }
        if token == "*" || token == ">" {
            if !wildcards {
                return Err(invalid(format!(
                    "subject {subject:?} contains the wildcard {token:?}; publish to a concrete subject"
                )));
            }
            if token == ">" && i + 1 != count {
                return Err(invalid(format!(
                    "subject {subject:?}: the wildcard \">\" must be the last token"
                )));
            }
        }
    }
    Ok(())
}

/// The common case in one pass over the bytes (this runs on every publish): printable ASCII,
/// no empty token, no wildcard token (with `wildcards`, `*` anywhere and `>` last). `false`
/// leaves the decision, and the explanation, to the full check.
fn fast_ok(b: &[u8], wildcards: bool) -> bool {
    if b.is_empty() || b.len() > MAX_SUBJECT_LEN {
        return false;
    }
    let token_ok = |t: &[u8], last: bool| match t {
        [] => false,
        [b'*'] => wildcards,
        [b'>'] => wildcards && last,
        _ => true,
    };
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        if !(0x21..=0x7e).contains(&c) {
            return false;
        }
        if c == b'.' {
            if !token_ok(&b[start..i], false) {
                return false;
            }
            start = i + 1;
        }
    }
    token_ok(&b[start..], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_rules() {
        for ok in [
            "a",
            "orders.created",
            "a.b-c_d.E1",
            "a/#",
            "a+b",
            "a*b.c>",
            "ünï.code",
        ] {
            assert!(validate_publish_subject(ok, "nats").is_ok(), "{ok:?}");
        }
        for bad in [
            "", " ", "a b", "a\tb", "a\r\nb", "nul\0", ".a", "a.", "a..b", ".", "*", ">", "a.*",
            "a.*.b", "a.>",
        ] {
            let e = validate_publish_subject(bad, "nats").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}");
            assert_eq!(e.backend(), "nats");
        }
        let long = "a".repeat(MAX_SUBJECT_LEN + 1);
        assert!(validate_publish_subject(&long, "nats").is_err());
        assert!(validate_publish_subject(&long[..MAX_SUBJECT_LEN], "nats").is_ok());
    }

    #[test]
    fn fast_path_agrees_with_the_full_check() {
        let cases = [
            "a",
            "a.b",
            "a..b",
            ".a",
            "a.",
            "*",
            ">",
            "a.*",
            "a.>",
            "a.>.b",
            "*.b",
            "a*b",
            "a b",
            "a\tb",
            "ü.x",
            "a.>.>",
            "#",
            "+.x",
            "a.b.c.d.e",
        ];
        for s in cases {
            for wildcards in [false, true] {
                if fast_ok(s.as_bytes(), wildcards) {
                    assert!(
                        validate(s, "nats", wildcards).is_ok(),
                        "{s:?} wildcards={wildcards}"
                    );
                }
            }
        }
        assert!(fast_ok(b"orders.created", false));
        assert!(fast_ok(b"orders.*.eu.>", true));
    }

    #[test]
    fn subscribe_rules() {
        for ok in ["a", "*", ">", "a.*", "a.*.b", "a.>", "*.*.>"] {
            assert!(
                validate_subscribe_subject(ok, "jetstream").is_ok(),
                "{ok:?}"
            );
        }
        for bad in ["", "a b", ".a", "a.", "a..b", ">.a", "a.>.b"] {
            let e = validate_subscribe_subject(bad, "jetstream").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}");
            assert_eq!(e.backend(), "jetstream");
        }
    }
}

/// The last subject a publisher used, validated, as the client's [`Subject`] and as the
/// `Arc<str>` its receipts share. Publishing to the same subject again then costs neither
/// validation nor allocation. Shared by the tasks publishing through one producer; it never
/// blocks (while another task holds it, the subject is made afresh).
///
/// ```
/// use polybus_nats::SubjectCache;
///
/// let cache = SubjectCache::default();
/// let (name, subject) = cache.get("orders.created", "nats")?;
/// assert_eq!((&*name, subject.as_str()), ("orders.created", "orders.created"));
/// assert!(cache.get("orders.*", "nats").is_err());
/// # Ok::<(), polybus_core::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct SubjectCache {
    last: Mutex<Option<(Arc<str>, Subject)>>,
}

impl SubjectCache {
    /// `name` checked by [`validate_publish_subject`], as a shared string and a [`Subject`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidTopic`], tagged with `backend`, as [`validate_publish_subject`].
    pub fn get(&self, name: &str, backend: &'static str) -> Result<(Arc<str>, Subject)> {
        if let Ok(last) = self.last.try_lock()
            && let Some((shared, subject)) = last.as_ref()
            && **shared == *name
        {
            return Ok((shared.clone(), subject.clone()));
        }
        validate_publish_subject(name, backend)?;
        let made = (Arc::<str>::from(name), Subject::from(name));
        if let Ok(mut last) = self.last.try_lock() {
            *last = Some(made.clone());
        }
        Ok(made)
    }
}
