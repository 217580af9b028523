//! NATS subject → Kafka topic mapping.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use polybus_core::{Error, ErrorKind, Result, topic};

use crate::BACKEND;

/// The longest Kafka topic name.
pub const KAFKA_TOPIC_MAX_LEN: usize = 249;
/// Subjects mapped at most this many are remembered; others are mapped again on each publish.
const CACHE_LIMIT: usize = 4096;

type MapFn = dyn Fn(&str) -> Result<String> + Send + Sync;

/// How a NATS subject becomes a Kafka topic name.
///
/// The rules, in order:
/// 1. an explicit [`route`](Self::route) for the subject wins;
/// 2. otherwise a custom function ([`with_fn`](Self::with_fn)) if one is set;
/// 3. otherwise the default rule: the [`prefix`](Self::prefix), then the subject with every
///    `.` token separator replaced by the [`separator`](Self::separator) (default `.`, which
///    Kafka accepts, so `orders.created` stays `orders.created`) and every character Kafka does
///    not allow in a topic name (anything but ASCII letters, digits, `.`, `_` and `-`) replaced
///    by `_`.
///
/// The result must be a legal Kafka topic name (1 to 249 characters of `[A-Za-z0-9._-]`, not
/// `.` or `..`); a subject that does not map to one is rejected with
/// [`ErrorKind::InvalidTopic`] rather than truncated, so two subjects never silently share a
/// topic by truncation. Note that the `_` replacement is not injective (`a$b` and `a%b` both
/// map to `a_b`): give such subjects explicit routes. Kafka itself warns that topics differing
/// only in `.` versus `_` collide in its metric names; pick a separator and stick to it.
///
/// ```
/// use polybus_compose::TopicMap;
/// let map = TopicMap::new();
/// assert_eq!(map.kafka_topic("orders.created")?, "orders.created");
/// assert_eq!(map.kafka_topic("orders.créé")?, "orders.cr__");
///
/// let map = TopicMap::new().separator('-').prefix("edge-").route("audit.log", "audit");
/// assert_eq!(map.kafka_topic("orders.created")?, "edge-orders-created");
/// assert_eq!(map.kafka_topic("audit.log")?, "audit");
/// assert!(map.kafka_topic("orders.*").is_err()); // a wildcard is not a destination
/// # Ok::<(), polybus_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct TopicMap {
    routes: HashMap<String, String>,
    separator: Option<char>,
    prefix: String,
    custom: Option<Arc<MapFn>>,
    cache: Arc<RwLock<HashMap<String, Arc<str>>>>,
}

impl TopicMap {
    /// The default mapping (see the type docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `subject` to `topic` exactly (checked when used).
    pub fn route(mut self, subject: impl Into<String>, topic: impl Into<String>) -> Self {
        self.routes.insert(subject.into(), topic.into());
        self.cache = Arc::default();
        self
    }

    /// Replaces the `.` token separator with `separator` (`.`, `_` or `-`; anything else
    /// is replaced by `_` like any other illegal character).
    pub fn separator(mut self, separator: char) -> Self {
        self.separator = Some(separator);
        self.cache = Arc::default();
        self
    }

    /// Puts `prefix` in front of every topic the default rule makes.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self.cache = Arc::default();
        self
    }

    /// Uses `f` instead of the default rule for subjects without a route. Its result is
    /// still checked.
    pub fn with_fn(mut self, f: impl Fn(&str) -> Result<String> + Send + Sync + 'static) -> Self {
        self.custom = Some(Arc::new(f));
        self.cache = Arc::default();
        self
    }

    /// The Kafka topic for `subject`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidTopic`] when the subject is not a concrete NATS subject or does not
    /// map to a legal Kafka topic name.
    pub fn kafka_topic(&self, subject: &str) -> Result<String> {
        self.kafka_topic_shared(subject).map(|t| t.to_string())
    }

    pub(crate) fn kafka_topic_shared(&self, subject: &str) -> Result<Arc<str>> {
        if let Some(hit) = read(&self.cache).get(subject) {
            return Ok(hit.clone());
        }
        let topic: Arc<str> = self.map_uncached(subject)?.into();
        let mut cache = write(&self.cache);
        if cache.len() < CACHE_LIMIT {
            cache.insert(subject.to_owned(), topic.clone());
        }
        Ok(topic)
    }

    fn map_uncached(&self, subject: &str) -> Result<String> {
        topic::validate_name(subject, BACKEND, usize::MAX)?;
        let topic = if let Some(t) = self.routes.get(subject) {
            t.clone()
        } else if let Some(f) = &self.custom {
            f(subject)?
        } else {
            let sep = self.separator.unwrap_or('.');
            let mut out = String::with_capacity(self.prefix.len() + subject.len());
            out.push_str(&self.prefix);
            for c in subject.chars() {
                let c = if c == '.' { sep } else { c };
                out.push(if is_kafka_char(c) { c } else { '_' });
            }
            out
        };
        validate_kafka_topic(&topic)?;
        Ok(topic)
    }
}

impl fmt::Debug for TopicMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicMap")
            .field("routes", &self.routes)
            .field("separator", &self.separator.unwrap_or('.'))
            .field("prefix", &self.prefix)
            .field("custom", &self.custom.is_some())
            .finish()
    }
}

fn is_kafka_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks a Kafka topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// [`ErrorKind::InvalidTopic`] naming what is wrong.
pub fn validate_kafka_topic(topic: &str) -> Result<()> {
    let bad = |msg: String| Err(Error::new(ErrorKind::InvalidTopic, BACKEND).with_message(msg));
    if topic.is_empty() {
        return bad("Kafka topic is empty".into());
    }
    if topic.len() > KAFKA_TOPIC_MAX_LEN {
        return bad(format!(
            "Kafka topic {topic:?} is {} characters, the limit is {KAFKA_TOPIC_MAX_LEN}",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return bad(format!("{topic:?} is not a legal Kafka topic"));
    }
    if let Some(c) = topic.chars().find(|c| !is_kafka_char(*c)) {
        return bad(format!("Kafka topic {topic:?} contains {c:?}"));
    }
    Ok(())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_keeps_legal_subjects_and_replaces_the_rest() {
        let m = TopicMap::new();
        assert_eq!(m.kafka_topic("a.b_c-D9").unwrap(), "a.b_c-D9");
        assert_eq!(m.kafka_topic("a:b/c").unwrap(), "a_b_c");
        for bad in ["", "a.*", "a.>", "a b", "."] {
            let e = m.kafka_topic(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{bad:?}");
        }
        let long = "x".repeat(250);
        assert_eq!(
            m.kafka_topic(&long).unwrap_err().kind(),
            ErrorKind::InvalidTopic
        );
    }

    #[test]
    fn routes_and_functions_are_checked_too() {
        let m = TopicMap::new()
            .route("bad", "not legal")
            .with_fn(|s| Ok(format!("fn-{s}")));
        assert_eq!(m.kafka_topic("x.y").unwrap(), "fn-x.y");
        assert!(m.kafka_topic("bad").is_err());
        // Cached answers are the same as fresh ones.
        assert_eq!(m.kafka_topic("x.y").unwrap(), "fn-x.y");
    }
}
