//! A JetStream object-store bucket: named blobs split into chunks by the server.

use std::fmt;

use async_nats::jetstream::Context;
use async_nats::jetstream::context::ObjectStoreErrorKind;
use async_nats::jetstream::object_store::{self, GetErrorKind, ObjectStore};
use bytes::Bytes;
use polybus_core::{ErrorKind, Result};
use tokio::io::AsyncReadExt as _;

use crate::error;

/// An object-store bucket. Cheap to clone.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> polybus_core::Result<()> {
/// let js = polybus_jetstream::JsOptions::new("nats://127.0.0.1:4222").connect().await?;
/// let configs = js.object_store("configs").await?;
/// configs.put("routing.json", br#"{"orders":"kafka"}"#.to_vec()).await?;
/// let bytes = configs.get("routing.json").await?;
/// assert_eq!(&bytes[..], br#"{"orders":"kafka"}"#);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ObjectBucket {
    store: ObjectStore,
    name: String,
}

impl fmt::Debug for ObjectBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBucket")
            .field("name", &self.name)
            .finish()
    }
}

impl ObjectBucket {
    pub(crate) async fn open(ctx: &Context, bucket: &str) -> Result<Self> {
        let name = bucket.to_owned();
        match ctx.get_object_store(bucket).await {
            Ok(store) => return Ok(ObjectBucket { store, name }),
            Err(e) if e.kind() == ObjectStoreErrorKind::InvalidBucketName => {
                return Err(error::invalid_name("bucket", bucket));
            }
            Err(_) => {}
        }
        let config = object_store::Config {
            bucket: name.clone(),
            ..Default::default()
        };
        match ctx.create_object_store(config).await {
            Ok(store) => Ok(ObjectBucket { store, name }),
            Err(create) => {
                if let Ok(store) = ctx.get_object_store(bucket).await {
                    return Ok(ObjectBucket { store, name });
                }
                Err(error::err(
                    ErrorKind::Rejected,
                    format!("opening object store {bucket:?}"),
                    create,
                ))
            }
        }
    }

    /// The bucket name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The async-nats store, for anything polybus does not wrap (streaming puts and gets).
    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    /// Stores `data` under `name`, replacing an earlier object of that name.
    ///
    /// # Errors
    /// `InvalidTopic` for an illegal name, `Connect` when the chunks could not be stored.
    pub async fn put(&self, name: &str, data: impl Into<Bytes>) -> Result<()> {
        let data: Bytes = data.into();
        let mut reader: &[u8] = &data;
        self.store
            .put(name, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| error::err(ErrorKind::Connect, format!("storing object {name:?}"), e))
    }

    /// The bytes of the object `name`.
    ///
    /// # Errors
    /// `NotFound` when there is no such object; `Connect`/`Timeout` from the server.
    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let mut object = self.store.get(name).await.map_err(|e| {
            let kind = match e.kind() {
                GetErrorKind::NotFound => ErrorKind::NotFound,
                GetErrorKind::InvalidName => ErrorKind::InvalidTopic,
                GetErrorKind::TimedOut => ErrorKind::Timeout,
                _ => ErrorKind::Connect,
            };
            error::err(kind, format!("reading object {name:?}"), e)
        })?;
        // The size is what the server says; reserve at most 8 MiB up front and let the
        // buffer grow with what really arrives, so a bogus size cannot abort the process.
        let mut out = Vec::with_capacity(object.info().size.min(8 << 20));
        object
            .read_to_end(&mut out)
            .await
            .map_err(|e| error::err(ErrorKind::Connect, format!("reading object {name:?}"), e))?;
        Ok(Bytes::from(out))
    }

    /// Deletes the object `name`.
    ///
    /// # Errors
    /// `NotFound` when there is no such object; `Connect` from the server.
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.store.delete(name).await.map_err(|e| {
            let kind = if e.to_string().contains("not found") {
                ErrorKind::NotFound
            } else {
                ErrorKind::Connect
            };
            error::err(kind, format!("deleting object {name:?}"), e)
        })
    }
}
