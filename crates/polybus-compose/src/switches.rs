//! Live switches: dual-write on/off, degrade to one channel, pause forwarding.
//!
//! The bus reads a [`Switches`] value from a [`SwitchHandle`] (a `tokio::sync::watch`
//! channel). A [`SwitchSource`] feeds the handle: the NATS KV watcher in production, or your
//! own code calling [`SwitchHandle::set`] (tests, an admin endpoint). Every change is applied
//! at once (the next publish and every forwarder see it) and logged with `tracing::info`.

use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use polybus_core::{Error, ErrorKind, Result};
use tokio::sync::watch;

use crate::BACKEND;

/// Which broker carries events when dual-write is off.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Channel {
    /// NATS/JetStream only (the default single channel).
    #[default]
    Nats,
    /// Kafka only.
    Kafka,
}

/// The live switches of a [`Bus`](crate::Bus).
///
/// | switches | publish acknowledges after | forwarding to Kafka |
/// |---|---|---|
/// | dual-write (default) | JetStream receipt + spool commit | on |
/// | NATS only (`dual_write` off, channel `nats`) | JetStream receipt + spool commit | **held**: spooled events wait, and are forwarded once dual-write (or Kafka only) is back |
/// | Kafka only (`dual_write` off, channel `kafka`) | spool commit (no NATS publish, so no notification) | on |
/// | `pause_forwarding` on | as above | held, whatever the mode |
///
/// NATS only therefore never loses the Kafka copy: the spool keeps it (bounded by its
/// capacity and full policy) until Kafka forwarding resumes.
///
/// ```
/// use polybus_compose::{Channel, Switches};
/// let s = Switches::default();
/// assert!(s.dual_write() && s.forwarding_active() && s.writes_nats());
/// let nats_only = s.with_dual_write(false).with_single_channel(Channel::Nats);
/// assert!(nats_only.writes_nats() && !nats_only.forwarding_active());
/// let kafka_only = nats_only.with_single_channel(Channel::Kafka);
/// assert!(!kafka_only.writes_nats() && kafka_only.forwarding_active());
/// assert!(!Switches::default().with_pause_forwarding(true).forwarding_active());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    dual_write: bool,
    single_channel: Channel,
    pause_forwarding: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            dual_write: true,
            single_channel: Channel::Nats,
            pause_forwarding: false,
        }
    }
}

impl Switches {
    /// Sets dual-write.
    pub fn with_dual_write(mut self, on: bool) -> Self {
        self.dual_write = on;
        self
    }
    /// Sets the channel used when dual-write is off.
    pub fn with_single_channel(mut self, channel: Channel) -> Self {
        self.single_channel = channel;
        self
    }
    /// Sets pause-forwarding.
    pub fn with_pause_forwarding(mut self, on: bool) -> Self {
        self.pause_forwarding = on;
        self
    }
    /// Dual-write (NATS and Kafka) is on.
    pub fn dual_write(&self) -> bool {
        self.dual_write
    }
    /// The channel used when dual-write is off.
    pub fn single_channel(&self) -> Channel {
        self.single_channel
    }
    /// Forwarding to Kafka is paused.
    pub fn pause_forwarding(&self) -> bool {
        self.pause_forwarding
    }
    /// Publishes go to NATS.
    pub fn writes_nats(&self) -> bool {
        self.dual_write || self.single_channel == Channel::Nats
    }
    /// The forwarders write spooled events to Kafka.
    pub fn forwarding_active(&self) -> bool {
        !self.pause_forwarding && (self.dual_write || self.single_channel == Channel::Kafka)
    }
    /// A short name of the mode: `dual-write`, `nats-only` or `kafka-only`.
    pub fn mode(&self) -> &'static str {
        match (self.dual_write, self.single_channel) {
            (true, _) => "dual-write",
            (false, Channel::Nats) => "nats-only",
            (false, Channel::Kafka) => "kafka-only",
        }
    }

    /// Applies one key of the NATS KV bucket (or any key/value source) to these switches.
    /// Returns whether the key is known. Keys and accepted values:
    ///
    /// * `dual_write`: `on`/`off` (also `true`/`false`, `1`/`0`, `yes`/`no`)
    /// * `single_channel`: `nats`/`kafka`
    /// * `pause_forwarding`: `on`/`off` (as above)
    ///
    /// A deleted key (`value` = `None`) goes back to its default.
    ///
    /// # Errors
    /// [`ErrorKind::Codec`] for a value that cannot be understood; the switches are unchanged.
    ///
    /// ```
    /// use polybus_compose::Switches;
    /// let mut s = Switches::default();
    /// assert!(s.apply("dual_write", Some("off"))?);
    /// assert!(s.apply("single_channel", Some("kafka"))?);
    /// assert_eq!(s.mode(), "kafka-only");
    /// assert!(!s.apply("unrelated", Some("x"))?);
    /// assert!(s.apply("dual_write", Some("maybe")).is_err());
    /// s.apply("dual_write", None)?;
    /// assert!(s.dual_write());
    /// # Ok::<(), polybus_core::Error>(())
    /// ```
    pub fn apply(&mut self, key: &str, value: Option<&str>) -> Result<bool> {
        let d = Switches::default();
        match key {
            "dual_write" => self.dual_write = value.map_or(Ok(d.dual_write), parse_bool)?,
            "pause_forwarding" => {
                self.pause_forwarding = value.map_or(Ok(d.pause_forwarding), parse_bool)?;
            }
            "single_channel" => {
                self.single_channel = match value.map(|v| v.trim().to_ascii_lowercase()) {
                    None => d.single_channel,
                    Some(v) if v == "nats" || v == "jetstream" => Channel::Nats,
                    Some(v) if v == "kafka" => Channel::Kafka,
                    Some(v) => return Err(bad_value(key, &v)),
                };
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl fmt::Display for Switches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            self.mode(),
            if self.pause_forwarding {
                ", forwarding paused"
            } else {
                ""
            }
        )
    }
}

fn parse_bool(v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" | "enabled" => Ok(true),
        "off" | "false" | "0" | "no" | "disabled" => Ok(false),
        other => Err(bad_value("switch", other)),
    }
}

fn bad_value(key: &str, value: &str) -> Error {
    Error::new(ErrorKind::Codec, BACKEND).with_message(format!(
        "switch {key}: cannot understand the value {value:?}"
    ))
}

/// The shared, watched switch value. Cheap to clone; clones share the value.
///
/// ```
/// use polybus_compose::{SwitchHandle, Switches};
/// let handle = SwitchHandle::new(Switches::default());
/// let mut seen = handle.subscribe();
/// handle.update(|s| *s = s.with_pause_forwarding(true));
/// assert!(seen.has_changed().unwrap());
/// assert!(seen.borrow_and_update().pause_forwarding());
/// ```
#[derive(Clone)]
pub struct SwitchHandle {
    tx: Arc<watch::Sender<Switches>>,
}

impl Default for SwitchHandle {
    fn default() -> Self {
        SwitchHandle::new(Switches::default())
    }
}

impl SwitchHandle {
    /// A handle holding `initial`.
    pub fn new(initial: Switches) -> Self {
        SwitchHandle {
            tx: Arc::new(watch::Sender::new(initial)),
        }
    }
    /// The current switches.
    pub fn get(&self) -> Switches {
        *self.tx.borrow()
    }
    /// Replaces the switches; watchers see the change at once (if it is one).
    pub fn set(&self, switches: Switches) {
        self.tx.send_if_modified(|cur| {
            let changed = *cur != switches;
            *cur = switches;
            changed
        });
    }
    /// Changes the switches in place.
    pub fn update(&self, f: impl FnOnce(&mut Switches)) {
        self.tx.send_if_modified(|cur| {
            let before = *cur;
            f(cur);
            *cur != before
        });
    }
    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<Switches> {
        self.tx.subscribe()
    }
}

impl fmt::Debug for SwitchHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SwitchHandle").field(&self.get()).finish()
    }
}

/// Feeds a [`SwitchHandle`] from somewhere (a NATS KV bucket, a config service). The bus
/// spawns [`run`](Self::run) when it starts and aborts it when it closes.
pub trait SwitchSource: Send + 'static {
    /// Watches the source and calls [`SwitchHandle::set`]/[`update`](SwitchHandle::update) on
    /// each change, until the future is dropped.
    fn run(self: Box<Self>, handle: SwitchHandle) -> BoxFuture<'static, ()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_forwarding() {
        let d = Switches::default();
        assert_eq!(d.to_string(), "dual-write");
        let n = d.with_dual_write(false);
        assert_eq!(n.mode(), "nats-only");
        assert!(!n.forwarding_active());
        let p = d.with_pause_forwarding(true);
        assert_eq!(p.to_string(), "dual-write, forwarding paused");
        let k = n
            .with_single_channel(Channel::Kafka)
            .with_pause_forwarding(true);
        assert!(!k.forwarding_active() && !k.writes_nats());
    }

    #[test]
    fn kv_values_parse_leniently_and_reject_garbage() {
        let mut s = Switches::default();
        for (v, want) in [
            ("OFF", false),
            (" true ", true),
            ("0", false),
            ("yes", true),
        ] {
            s.apply("pause_forwarding", Some(v)).unwrap();
            assert_eq!(s.pause_forwarding(), want, "{v}");
            s.apply("dual_write", Some(v)).unwrap();
            assert_eq!(s.dual_write(), want, "{v}");
        }
        let before = s;
        assert!(s.apply("single_channel", Some("mqtt")).is_err());
        assert_eq!(s, before);
        s.apply("single_channel", Some("Kafka")).unwrap();
        assert_eq!(s.single_channel(), Channel::Kafka);
        s.apply("single_channel", None).unwrap();
        assert_eq!(s.single_channel(), Channel::Nats);
    }

    #[tokio::test]
    async fn handle_notifies_only_real_changes() {
        let h = SwitchHandle::default();
        let mut rx = h.subscribe();
        h.set(Switches::default());
        assert!(!rx.has_changed().unwrap());
        h.update(|s| *s = s.with_dual_write(false));
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(!rx.borrow_and_update().dual_write());
    }
}
