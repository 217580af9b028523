//! Event headers: an ordered, case-insensitive multimap of UTF-8 names and values.

use std::borrow::Cow;
use std::fmt;

use crate::{Error, ErrorKind, Result};

/// The longest header name accepted, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 256;

/// Event headers: an ordered multimap whose names compare ASCII-case-insensitively and keep
/// the case they were inserted with.
///
/// Names must be HTTP tokens (RFC 9110 `tchar`: letters, digits and ``!#$%&'*+-.^_`|~``),
/// at most [`MAX_HEADER_NAME_LEN`] bytes. Values are UTF-8 without control characters other
/// than horizontal tab. Every broker binding can carry such headers unchanged.
///
/// ```
/// use polybus_core::Headers;
///
/// let mut h = Headers::new();
/// h.insert("Trace-Id", "abc")?;
/// h.append("tag", "a")?;
/// h.append("TAG", "b")?;
/// assert_eq!(h.get("trace-id"), Some("abc"));
/// assert_eq!(h.get_all("tag").collect::<Vec<_>>(), ["a", "b"]);
/// assert!(h.insert("bad name", "x").is_err());
/// # Ok::<(), polybus_core::Error>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    // Names are `Cow` so polybus' own headers (`traceparent`) cost no allocation for the name.
    entries: Vec<(Cow<'static, str>, String)>,
}

impl Headers {
    /// An empty header map (no allocation).
    pub const fn new() -> Self {
        Headers {
            entries: Vec::new(),
        }
    }

    /// Number of entries (a name with two values counts twice).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in insertion order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether `name` has at least one value.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets `name` to `value`, replacing every earlier value of `name`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidHeader`] if the name or value is not legal; the map is unchanged.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Result<()> {
        let (name, value) = (name.into(), value.into());
        validate(&name, &value)?;
        self.remove(&name);
        self.entries.push((Cow::Owned(name), value));
        Ok(())
    }

    /// Sets the static `name` (already known to be legal) to `value`, replacing earlier values:
    /// no allocation for the name.
    pub(crate) fn insert_static(&mut self, name: &'static str, value: String) {
        debug_assert!(validate(name, &value).is_ok(), "{name}: {value:?}");
        self.remove(name);
        self.entries.push((Cow::Borrowed(name), value));
    }

    /// Adds a value for `name`, keeping earlier ones.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidHeader`] if the name or value is not legal; the map is unchanged.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) -> Result<()> {
        let (name, value) = (name.into(), value.into());
        validate(&name, &value)?;
        self.entries.push((Cow::Owned(name), value));
        Ok(())
    }

    /// Adds an entry without validating it. For adapters that decode headers which the broker
    /// already accepted and that must be passed on unchanged.
    pub fn append_unchecked(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.entries.push((Cow::Owned(name.into()), value.into()));
    }

    /// Removes every value of `name`; returns how many were removed.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        before - self.entries.len()
    }

    /// The entries, names and values as held.
    pub(crate) fn into_entries(self) -> Vec<(Cow<'static, str>, String)> {
        self.entries
    }

    /// Iterates over `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.entries.iter().map(|(n, v)| (n.as_ref(), v.as_str()))
    }
}

/// Checks a header name and value against the rules described on [`Headers`].
///
/// # Errors
/// [`ErrorKind::InvalidHeader`] naming what is wrong.
pub fn validate(name: &str, value: &str) -> Result<()> {
    let bad = |msg: String| Err(Error::new(ErrorKind::InvalidHeader, "core").with_message(msg));
    if name.is_empty() {
        return bad("header name is empty".into());
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return bad(format!(
            "header name is {} bytes, more than {MAX_HEADER_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !is_tchar(*c)) {
        return bad(format!("header name {name:?} contains {c:?}"));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && *c != '\t') {
        return bad(format!(
            "value of header {name:?} contains control character {c:?}"
        ));
    }
    Ok(())
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a str);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a str)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_and_keep_their_case() {
        let mut h = Headers::new();
        h.insert("Content-Encoding", "gzip").unwrap();
        assert_eq!(h.get("content-encoding"), Some("gzip"));
        assert_eq!(h.iter().next(), Some(("Content-Encoding", "gzip")));
        h.insert("CONTENT-ENCODING", "br").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("Content-Encoding"), Some("br"));
    }

    #[test]
    fn order_is_insertion_order() {
        let mut h = Headers::new();
        for (n, v) in [("b", "1"), ("a", "2"), ("c", "3"), ("a", "4")] {
            h.append(n, v).unwrap();
        }
        let got: Vec<_> = h.iter().collect();
        assert_eq!(got, [("b", "1"), ("a", "2"), ("c", "3"), ("a", "4")]);
        assert_eq!(h.remove("A"), 2);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn invalid_names_and_values_are_typed_errors_and_change_nothing() {
        let mut h = Headers::new();
        h.insert("ok", "1").unwrap();
        for (name, value) in [
            ("", "v"),
            ("has space", "v"),
            ("colon:", "v"),
            ("naïve", "v"),
            ("nl", "a\nb"),
            ("nul", "a\0b"),
        ] {
            let err = h.insert(name, value).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidHeader, "{name:?}={value:?}");
        }
        let long = "x".repeat(MAX_HEADER_NAME_LEN + 1);
        assert_eq!(
            h.append(long, "v").unwrap_err().kind(),
            ErrorKind::InvalidHeader
        );
        assert_eq!(h.iter().collect::<Vec<_>>(), [("ok", "1")]);
        assert!(h.insert("tab-ok", "a\tb").is_ok());
    }
}
