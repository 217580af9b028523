//! Permission violations the server reports asynchronously (`-ERR 'Permissions Violation for
//! Publish to "x"'`), kept so the call they belong to can fail with `Unauthorized`.
//!
//! Core NATS answers nothing to a publish or subscribe; when the user lacks the permission the
//! server drops the message (or ignores the subscription) and sends an `-ERR` line, which
//! async-nats hands to the connection's event callback. polybus records each violation here
//! and reports it:
//!
//! * on `subscribe`: the subscription is confirmed with a round trip through the server (the
//!   `-ERR` comes before the answer), then the violations are checked;
//! * on `publish` with [`NatsOptions::check_publish_permissions`](crate::NatsOptions): the same
//!   round trip after each publish;
//! * otherwise on the next `publish` to the same subject and on the next `flush` (which makes
//!   a round trip when the server requires authentication);
//! * JetStream publishes race their acknowledgement against a violation on their subject.
//!
//! The event callback runs in its own task, so after the round trip a violation may still be
//! on its way to this record: the check waits up to [`GRACE`] for it, and only on connections
//! to servers that require authentication (without authentication there are no permissions).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use polybus_core::{Error, ErrorKind};
use tokio::sync::watch;

/// How long a check waits, after the round trip, for a violation still in the event queue.
pub(crate) const GRACE: Duration = Duration::from_millis(25);

/// How many violations are kept (the oldest are dropped first).
const KEEP: usize = 256;

/// What the server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Publish,
    Subscribe,
}

#[derive(Debug, Clone)]
pub(crate) struct Violation {
    seq: u64,
    op: Op,
    subject: String,
    message: String,
    reported: bool,
}

/// The record of one connection.
#[derive(Debug)]
pub(crate) struct Violations {
    list: Mutex<VecDeque<Violation>>,
    /// The sequence number of the last violation recorded (0: none yet).
    seq: watch::Sender<u64>,
    /// Publish violations not reported to a caller yet (read without the lock on every
    /// publish).
    unreported_publishes: AtomicUsize,
}

impl Default for Violations {
    fn default() -> Self {
        Violations {
            list: Mutex::new(VecDeque::new()),
            seq: watch::Sender::new(0),
            unreported_publishes: AtomicUsize::new(0),
        }
    }
}

/// Parses a server error text: `Permissions Violation for Publish to "x"`,
/// `... for Subscription to "x"` (optionally `using queue "q"`), `... for Publish with Reply
/// of "x"`.
pub(crate) fn parse(text: &str) -> Option<(Op, String)> {
    let rest = text
        .trim()
        .trim_matches('\'')
        .strip_prefix("Permissions Violation for ")?;
    let op = if rest.starts_with("Publish") {
        Op::Publish
    } else if rest.starts_with("Subscription") {
        Op::Subscribe
    } else {
        return None;
    };
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some((op, rest[start..start + len].to_owned()))
}

impl Violations {
    /// The current mark: violations recorded later have a greater sequence number.
    pub(crate) fn mark(&self) -> u64 {
        *self.seq.borrow()
    }

    /// Records the server error `text` if it is a permission violation; returns whether it was.
    pub(crate) fn record(&self, text: &str) -> bool {
        let Some((op, subject)) = parse(text) else {
            return false;
        };
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.mark() + 1;
        if list.len() == KEEP
            && let Some(old) = list.pop_front()
            && old.op == Op::Publish
            && !old.reported
        {
            self.unreported_publishes.fetch_sub(1, Ordering::Relaxed);
        }
        if op == Op::Publish {
            self.unreported_publishes.fetch_add(1, Ordering::Relaxed);
        }
        list.push_back(Violation {
            seq,
            op,
            subject,
            message: text.trim().trim_matches('\'').to_owned(),
            reported: false,
        });
        drop(list);
        self.seq.send_replace(seq);
        true
    }

    /// Takes the first unreported violation after `since` that `matches`, marking it reported.
    fn take(&self, since: u64, matches: impl Fn(&Violation) -> bool) -> Option<Violation> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let v = list
            .iter_mut()
            .find(|v| v.seq > since && !v.reported && matches(v))?;
        v.reported = true;
        if v.op == Op::Publish {
            self.unreported_publishes.fetch_sub(1, Ordering::Relaxed);
        }
        Some(v.clone())
    }

    /// An unreported violation of `op` on exactly `subject` recorded after `since`, as an
    /// `Unauthorized` error (and now reported).
    pub(crate) fn take_for(
        &self,
        op: Op,
        subject: &str,
        since: u64,
        backend: &'static str,
    ) -> Option<Error> {
        if op == Op::Publish && self.unreported_publishes.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.take(since, |v| v.op == op && v.subject == subject)
            .map(|v| v.error(backend))
    }

    /// Every unreported publish violation, as one `Unauthorized` error naming them.
    pub(crate) fn take_publishes(&self, backend: &'static str) -> Option<Error> {
        if self.unreported_publishes.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut subjects = Vec::new();
        while let Some(v) = self.take(0, |v| v.op == Op::Publish) {
            subjects.push(v.subject);
        }
        match subjects.len() {
            0 => None,
            1 => Some(unauthorized(
                backend,
                format!(
                    "the server refused an earlier publish to {:?}: permissions violation (this user may not publish there); the message was dropped",
                    subjects[0]
                ),
            )),
            n => Some(unauthorized(
                backend,
                format!(
                    "the server refused {n} earlier publishes (to {}): permissions violation; the messages were dropped",
                    subjects
                        .iter()
                        .take(5)
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Waits until a violation after `since` that `matches` is recorded, and returns it (now
    /// reported). Never resolves if none comes.
    pub(crate) async fn wait(
        &self,
        since: u64,
        matches: impl Fn(Op, &str) -> bool,
        backend: &'static str,
    ) -> Error {
        let mut rx = self.seq.subscribe();
        loop {
            if let Some(v) = self.take(since, |v| matches(v.op, &v.subject)) {
                return v.error(backend);
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// [`take_for`](Self::take_for), waiting up to `grace` for the violation to arrive.
    pub(crate) async fn check(
        &self,
        op: Op,
        subject: &str,
        since: u64,
        grace: Duration,
        backend: &'static str,
    ) -> Option<Error> {
        if let Some(e) = self.take_for(op, subject, since, backend) {
            return Some(e);
        }
        if grace.is_zero() {
            return None;
        }
        tokio::time::timeout(
            grace,
            self.wait(since, |o, s| o == op && s == subject, backend),
        )
        .await
        .ok()
    }
}

impl Violation {
    fn error(&self, backend: &'static str) -> Error {
        let what = match self.op {
            Op::Publish => format!(
                "the server refused the publish to {:?}: permissions violation (this user may not publish there); the message was dropped",
                self.subject
            ),
            Op::Subscribe => format!(
                "the server refused the subscription to {:?}: permissions violation (this user may not subscribe there)",
                self.subject
            ),
        };
        unauthorized(backend, format!("{what} [{}]", self.message))
    }
}

fn unauthorized(backend: &'static str, msg: String) -> Error {
    Error::new(ErrorKind::Unauthorized, backend).with_message(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_server_texts() {
        assert_eq!(
            parse("Permissions Violation for Publish to \"a.b\""),
            Some((Op::Publish, "a.b".into()))
        );
        assert_eq!(
            parse("'Permissions Violation for Subscription to \"x.>\" using queue \"q\"'"),
            Some((Op::Subscribe, "x.>".into()))
        );
        assert_eq!(
            parse("Permissions Violation for Publish with Reply of \"_INBOX.1\""),
            Some((Op::Publish, "_INBOX.1".into()))
        );
        assert_eq!(parse("Authorization Violation"), None);
        assert_eq!(parse("Permissions Violation for Publish to"), None);
        assert_eq!(
            parse("Permissions Violation for Publish to \"unterminated"),
            None
        );
    }

    #[tokio::test]
    async fn violations_are_reported_once_to_the_matching_call() {
        let v = Violations::default();
        let since = v.mark();
        assert!(!v.record("Slow Consumer"));
        assert!(v.record("Permissions Violation for Publish to \"a\""));
        assert!(v.record("Permissions Violation for Subscription to \"s\""));
        assert!(v.take_for(Op::Publish, "b", since, "nats").is_none());
        let e = v.take_for(Op::Publish, "a", since, "nats").unwrap();
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        assert!(e.to_string().contains("\"a\""), "{e}");
        assert!(
            v.take_for(Op::Publish, "a", since, "nats").is_none(),
            "once"
        );
        assert!(v.take_publishes("nats").is_none());
        let later = v.mark();
        assert!(
            v.take_for(Op::Subscribe, "s", later, "nats").is_none(),
            "older"
        );
        assert!(
            v.check(Op::Subscribe, "s", since, Duration::ZERO, "nats")
                .await
                .is_some()
        );
        v.record("Permissions Violation for Publish to \"p1\"");
        v.record("Permissions Violation for Publish to \"p2\"");
        let e = v.take_publishes("nats").unwrap();
        assert!(e.to_string().contains("2 earlier publishes"), "{e}");
        assert!(v.take_publishes("nats").is_none());
    }

    #[tokio::test]
    async fn check_waits_for_a_late_violation() {
        let v = std::sync::Arc::new(Violations::default());
        let since = v.mark();
        let late = v.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            late.record("Permissions Violation for Subscription to \"s\"");
        });
        let e = v
            .check(Op::Subscribe, "s", since, Duration::from_secs(5), "nats")
            .await;
        assert!(e.is_some());
        let none = v
            .check(Op::Subscribe, "t", since, Duration::from_millis(10), "nats")
            .await;
        assert!(none.is_none());
    }

    #[test]
    fn the_record_is_bounded() {
        let v = Violations::default();
        for i in 0..KEEP + 10 {
            v.record(&format!("Permissions Violation for Publish to \"s{i}\""));
        }
        assert_eq!(v.list.lock().unwrap().len(), KEEP);
        assert_eq!(v.unreported_publishes.load(Ordering::Relaxed), KEEP);
    }
}
