//! A JetStream key-value bucket: values with revisions, optimistic updates and watches (the
//! live switches of the composed bus live here).

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use async_nats::jetstream::Context;
use async_nats::jetstream::context::{CreateKeyValueErrorKind, KeyValueErrorKind};
use async_nats::jetstream::kv::{
    self, CreateErrorKind, EntryErrorKind, Operation, PutErrorKind, UpdateErrorKind, Watch,
    WatchErrorKind,
};
use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt as _;
use polybus_core::{Error, ErrorKind, IntoPayload, Result};

use crate::error::{self, BACKEND};

/// One value of a key, with its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value (empty for a delete or purge).
    pub value: Bytes,
    /// The revision (the bucket's sequence of this write).
    pub revision: u64,
    /// What the write was.
    pub operation: KvOperation,
}

/// What a write to a key was.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOperation {
    /// A value was put.
    Put,
    /// The key was deleted.
    Delete,
    /// The key and its history were purged.
    Purge,
}

impl From<kv::Entry> for KvEntry {
    fn from(e: kv::Entry) -> Self {
        KvEntry {
            key: e.key,
            value: e.value,
            revision: e.revision,
            operation: match e.operation {
                Operation::Put => KvOperation::Put,
                Operation::Delete => KvOperation::Delete,
                Operation::Purge => KvOperation::Purge,
            },
        }
    }
}

/// A key-value bucket. Cheap to clone.
///
/// ```no_run
/// use futures_util::StreamExt;
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").connect().await?;
/// let switches = js.kv("switches").await?;
/// let rev = switches.put("dual-write", "on").await?;
/// switches.update("dual-write", "off", rev).await?; // fails with Rejected if someone wrote meanwhile
/// let mut changes = std::pin::pin!(switches.watch("dual-write").await?);
/// while let Some(change) = changes.next().await {
///     let change = change?;
///     println!("{} = {:?} (rev {})", change.key, change.value, change.revision);
/// #   break;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KvBucket {
    store: kv::Store,
    name: String,
}

impl fmt::Debug for KvBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvBucket")
            .field("name", &self.name)
            .finish()
    }
}

impl KvBucket {
    pub(crate) async fn open(ctx: &Context, config: kv::Config) -> Result<Self> {
        let name = config.bucket.clone();
        match ctx.get_key_value(name.clone()).await {
            Ok(store) => return Ok(KvBucket { store, name }),
            Err(e) if e.kind() == KeyValueErrorKind::InvalidStoreName => {
                return Err(error::invalid_name("bucket", &name));
            }
            Err(_) => {}
        }
        match ctx.create_key_value(config).await {
            Ok(store) => Ok(KvBucket { store, name }),
            Err(create) => {
                // Another client may have created it meanwhile.
                if let Ok(store) = ctx.get_key_value(name.clone()).await {
                    return Ok(KvBucket { store, name });
                }
                let kind = match create.kind() {
                    CreateKeyValueErrorKind::InvalidStoreName => ErrorKind::InvalidTopic,
                    CreateKeyValueErrorKind::TimedOut => ErrorKind::Timeout,
                    CreateKeyValueErrorKind::JetStream => ErrorKind::Connect,
                    _ => ErrorKind::Rejected,
                };
                Err(error::err(
                    kind,
                    format!("opening KV bucket {name:?}"),
                    create,
                ))
            }
        }
    }

    /// The bucket name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The async-nats store, for anything polybus does not wrap.
    pub fn store(&self) -> &kv::Store {
        &self.store
    }

    /// The bucket's latest revision, asked of the server: the revision of the last write to any
    /// key, deletes and purges included (0 for a bucket never written). A watch that has not
    /// delivered this revision a while after it was read has stalled; the composed bus's
    /// `KvSwitchSource` checks exactly that.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
    /// let js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").connect().await?;
    /// let bucket = js.kv("switches").await?;
    /// let rev = bucket.put("dual_write", "on").await?;
    /// assert!(bucket.last_revision().await? >= rev);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Timeout` when nobody answers in time (the bucket's stream has no leader, e.g. during
    /// an election after a node loss), `Connect` when no server serves JetStream,
    /// `Rejected` when the server refuses (the bucket was deleted).
    pub async fn last_revision(&self) -> Result<u64> {
        use async_nats::jetstream::context::RequestErrorKind;
        let info = self.store.stream.get_info().await.map_err(|e| {
            let kind = match e.kind() {
                RequestErrorKind::TimedOut => ErrorKind::Timeout,
                RequestErrorKind::NoResponders => ErrorKind::Connect,
                _ => ErrorKind::Rejected,
            };
            error::err(kind, format!("reading KV bucket {:?}", self.name), e)
        })?;
        Ok(info.state.last_sequence)
    }

    /// The current value of `key`, `None` if it has none (never written, deleted or purged).
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal key, `Timeout`/`Connect` from the server.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.entry(key).await?.map(|e| e.value))
    }

    /// The current entry of `key` (value and revision), `None` if it has no value.
    ///
    /// # Errors
    /// As for [`get`](Self::get).
    pub async fn entry(&self, key: &str) -> Result<Option<KvEntry>> {
        let entry = self.store.entry(key).await.map_err(|e| {
            let kind = match e.kind() {
                EntryErrorKind::InvalidKey => ErrorKind::InvalidTopic,
                EntryErrorKind::TimedOut => ErrorKind::Timeout,
                EntryErrorKind::Other => ErrorKind::Connect,
            };
            error::err(kind, format!("reading key {key:?}"), e)
        })?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(KvEntry::from))
    }

    /// Writes `value` to `key`; returns the new revision.
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal key, `Connect`/`Timeout` from the server.
    pub async fn put(&self, key: &str, value: impl IntoPayload) -> Result<u64> {
        self.store
            .put(key, value.into_payload())
            .await
            .map_err(|e| {
                let kind = match e.kind() {
                    PutErrorKind::InvalidKey => ErrorKind::InvalidTopic,
                    PutErrorKind::Publish | PutErrorKind::Ack => ErrorKind::Connect,
                };
                error::err(kind, format!("writing key {key:?}"), e)
            })
    }

    /// Writes `value` to `key` only if the key has no value; returns the revision.
    ///
    /// # Errors
    /// `Rejected` when the key already has a value; otherwise as for [`put`](Self::put).
    pub async fn create(&self, key: &str, value: impl IntoPayload) -> Result<u64> {
        self.store
            .create(key, value.into_payload())
            .await
            .map_err(|e| {
                let kind = match e.kind() {
                    CreateErrorKind::AlreadyExists => ErrorKind::Rejected,
                    CreateErrorKind::InvalidKey => ErrorKind::InvalidTopic,
                    CreateErrorKind::Publish | CreateErrorKind::Ack => ErrorKind::Connect,
                    CreateErrorKind::Other => ErrorKind::Rejected,
                };
                error::err(kind, format!("creating key {key:?}"), e)
            })
    }

    /// Writes `value` to `key` only if its current revision is `revision` (optimistic
    /// concurrency); returns the new revision.
    ///
    /// # Errors
    /// `Rejected` when the key was written since (another revision); otherwise as for
    /// [`put`](Self::put).
    pub async fn update(&self, key: &str, value: impl IntoPayload, revision: u64) -> Result<u64> {
        self.store
            .update(key, value.into_payload(), revision)
            .await
            .map_err(|e| {
                let kind = match e.kind() {
                    UpdateErrorKind::WrongLastRevision => ErrorKind::Rejected,
                    UpdateErrorKind::InvalidKey => ErrorKind::InvalidTopic,
                    UpdateErrorKind::TimedOut => ErrorKind::Timeout,
                    UpdateErrorKind::Other => ErrorKind::Rejected,
                };
                error::err(
                    kind,
                    format!("updating key {key:?} at revision {revision}"),
                    e,
                )
            })
    }

    /// Deletes `key` (its history stays, a watch sees a `Delete`).
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal key, `Connect` from the server.
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.store
            .delete(key)
            .await
            .map_err(|e| error::err(ErrorKind::Connect, format!("deleting key {key:?}"), e))
    }

    /// Watches `key` (wildcards `*` and `>` allowed): first its current value, if any, then
    /// every later write, as a stream.
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal key, `Connect`/`Timeout` from the server.
    pub async fn watch(&self, key: &str) -> Result<KvWatch> {
        self.store
            .watch_with_history(key)
            .await
            .map(|inner| KvWatch { inner })
            .map_err(|e| watch_error(e, key))
    }

    /// Watches every key of the bucket (current values first, then changes).
    ///
    /// # Errors
    /// As for [`watch`](Self::watch).
    pub async fn watch_all(&self) -> Result<KvWatch> {
        self.watch(">").await
    }
}

fn watch_error(e: kv::WatchError, key: &str) -> Error {
    let kind = match e.kind() {
        WatchErrorKind::InvalidKey => ErrorKind::InvalidTopic,
        WatchErrorKind::TimedOut => ErrorKind::Timeout,
        WatchErrorKind::ConsumerCreate | WatchErrorKind::Other => ErrorKind::Connect,
    };
    error::err(kind, format!("watching {key:?}"), e)
}

/// The changes of watched keys, as a stream of [`KvEntry`].
pub struct KvWatch {
    inner: Watch,
}

impl fmt::Debug for KvWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KvWatch")
    }
}

impl Stream for KvWatch {
    type Item = Result<KvEntry>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx).map(|item| {
            item.map(|r| {
                r.map(KvEntry::from)
                    .map_err(|e| Error::new(ErrorKind::Connect, BACKEND).with_source(e))
            })
        })
    }
}
