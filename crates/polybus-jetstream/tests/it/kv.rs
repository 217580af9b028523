//! KV and object store against the shared server.

use std::time::Duration;

use futures_util::StreamExt;
use polybus_core::ErrorKind;
use polybus_jetstream::{JsOptions, KvOperation};

fn bucket() -> String {
    format!("polybus_test_{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn kv_get_put_create_update_delete() -> anyhow::Result<()> {
    let js = JsOptions::new(crate::nats_url()).connect().await?;
    let name = bucket();
    let kv = js.kv(&name).await?;
    assert_eq!(kv.get("switch").await?, None);

    let r1 = kv.create("switch", "on").await?;
    let err = kv.create("switch", "again").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");

    let entry = kv.entry("switch").await?.expect("value");
    assert_eq!((&entry.value[..], entry.revision), (&b"on"[..], r1));

    let r2 = kv.update("switch", "off", r1).await?;
    assert!(r2 > r1);
    let stale = kv.update("switch", "stale", r1).await.unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Rejected, "{stale}");
    assert_eq!(kv.get("switch").await?.as_deref(), Some(&b"off"[..]));

    let r3 = kv.put("switch", "on").await?;
    assert!(r3 > r2);
    kv.delete("switch").await?;
    assert_eq!(kv.get("switch").await?, None);

    // Binding again finds the same bucket.
    let again = js.kv(&name).await?;
    again.put("other", "1").await?;
    assert_eq!(kv.get("other").await?.as_deref(), Some(&b"1"[..]));

    let bad = kv.put("bad key", "x").await.unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidTopic, "{bad}");
    let bad = js.kv("bad.bucket").await.unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidTopic, "{bad}");

    js.context().delete_key_value(&name).await?;
    Ok(())
}

async fn next_change(
    watch: &mut std::pin::Pin<&mut polybus_jetstream::KvWatch>,
) -> polybus_core::Result<polybus_jetstream::KvEntry> {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("watch update in time")
        .expect("watch open")
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn kv_watch_sees_current_value_then_changes() -> anyhow::Result<()> {
    let js = JsOptions::new(crate::nats_url()).connect().await?;
    let name = bucket();
    let kv = js.kv(&name).await?;
    kv.put("dual-write", "on").await?;
    let mut watch = std::pin::pin!(kv.watch("dual-write").await?);
    let first = next_change(&mut watch).await?;
    assert_eq!(
        (&first.value[..], first.operation),
        (&b"on"[..], KvOperation::Put)
    );
    kv.put("dual-write", "off").await?;
    let second = next_change(&mut watch).await?;
    assert_eq!(&second.value[..], b"off");
    assert!(second.revision > first.revision);
    kv.delete("dual-write").await?;
    let third = next_change(&mut watch).await?;
    assert_eq!(third.operation, KvOperation::Delete);

    let mut all = std::pin::pin!(kv.watch_all().await?);
    kv.put("pause", "1").await?;
    let e = tokio::time::timeout(Duration::from_secs(5), all.next())
        .await?
        .expect("open")?;
    assert!(e.key == "dual-write" || e.key == "pause", "{e:?}");
    js.context().delete_key_value(&name).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn object_store_put_get_delete() -> anyhow::Result<()> {
    let js = JsOptions::new(crate::nats_url()).connect().await?;
    let name = bucket();
    let store = js.object_store(&name).await?;
    // Larger than one chunk (128 KiB) to exercise chunking.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    store.put("big.bin", big.clone()).await?;
    store.put("small.txt", &b"hello"[..]).await?;
    assert_eq!(&store.get("big.bin").await?[..], &big[..]);
    assert_eq!(&store.get("small.txt").await?[..], b"hello");
    store.put("small.txt", &b"replaced"[..]).await?;
    assert_eq!(&store.get("small.txt").await?[..], b"replaced");
    store.delete("small.txt").await?;
    let missing = store.get("small.txt").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    let missing = store.get("never").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    js.context().delete_object_store(&name).await?;
    Ok(())
}
