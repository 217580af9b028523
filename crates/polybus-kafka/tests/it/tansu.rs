//! What tansu 0.6.0 does that a Kafka client does not expect, pinned so that a tansu release
//! that changes it fails here (docs/BROKER-NOTES.md). Plain librdkafka clients, no polybus
//! consumer: the finding is the broker's.

use std::time::{Duration, Instant};

use anyhow::ensure;
use polybus_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use polybus_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use polybus_kafka::rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use polybus_kafka::{KafkaAdmin, KafkaConfig};
use polybus_testkit::brokers::{BrokerProcess, TansuStorage};

use crate::common::topic;

/// Records in one batch (the producer's linger gathers them).
const BATCH: i64 = 40;
/// Where the reader starts: inside the batch.
const FROM: i64 = 10;

/// Writes one batch of [`BATCH`] records to a new one-partition topic, then reads from offset
/// [`FROM`] for 5 s; returns the offsets read.
async fn read_from_inside_a_batch(storage: TansuStorage) -> anyhow::Result<Vec<i64>> {
    let broker = BrokerProcess::tansu(storage).await?;
    let brokers = format!("127.0.0.1:{}", broker.port());
    let t = topic("tansu-batch");
    KafkaAdmin::new(&KafkaConfig::new(&brokers, "admin"))?
        .create_topic(&t, 1, 1)
        .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "200")
        .create()?;
    let payloads: Vec<String> = (0..BATCH).map(|i| format!("r{i}")).collect();
    let sends: Vec<_> = payloads
        .iter()
        .map(|p| {
            producer
                .send_result(FutureRecord::<(), _>::to(&t).payload(p))
                .map_err(|(e, _)| e)
        })
        .collect::<Result<_, _>>()?;
    let mut written = Vec::new();
    for s in sends {
        let d = s.await?.map_err(|(e, _)| e)?;
        written.push((d.partition, d.offset));
    }
    ensure!(
        written == (0..BATCH).map(|o| (0, o)).collect::<Vec<_>>(),
        "written at {written:?}"
    );

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "tansu-batch-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&t, 0, Offset::Offset(FROM))?;
    consumer.assign(&tpl)?;
    let read = tokio::task::spawn_blocking(move || {
        let mut read = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && read.len() < (BATCH - FROM) as usize {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                read.push(m.offset());
            }
        }
        read
    })
    .await?;
    Ok(read)
}

/// tansu 0.6.0's memory storage answers a fetch that starts inside a record batch with the
/// batches after it, so the rest of that batch is never delivered; its SQLite storage returns
/// the batch and the client skips the records before the fetch offset, as Kafka does. A group
/// member that resumes from a committed offset inside a batch (any load published faster than
/// one record per produce request) loses the rest of the batch on memory storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn memory_storage_skips_the_rest_of_a_batch_fetched_from_inside_it() -> anyhow::Result<()> {
    let sqlite = read_from_inside_a_batch(TansuStorage::Sqlite).await?;
    ensure!(
        sqlite == (FROM..BATCH).collect::<Vec<_>>(),
        "SQLite storage: read {sqlite:?}"
    );
    let memory = read_from_inside_a_batch(TansuStorage::Memory).await?;
    eprintln!(
        "from offset {FROM} of one {BATCH}-record batch: SQLite storage read {}, memory storage {}",
        sqlite.len(),
        memory.len()
    );
    ensure!(
        memory.is_empty(),
        "tansu's memory storage now reads {memory:?} from inside a batch: if that is all of \
         {FROM}..{BATCH}, the bug is fixed; update docs/BROKER-NOTES.md and let the runtime's \
         Kafka lifecycle tests use the shared broker again"
    );
    Ok(())
}

/// tansu 0.6.0 answers ListOffsets by timestamp (librdkafka's `offsets_for_times`) for a time
/// after every record of a partition with offset 0, where Kafka answers -1 (the end); for a
/// time between records it answers the first record at or after it, as Kafka does. The
/// polybus consumer's start time (`KafkaConfig::with_start_time`) skips records before the
/// time because of it (test `a_start_time_after_every_record_reads_only_newer_ones`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs brokers: cargo xtask test"]
async fn offsets_for_a_time_after_every_record_are_zero() -> anyhow::Result<()> {
    let brokers = crate::common::brokers();
    let t = topic("tansu-times");
    KafkaAdmin::new(&KafkaConfig::new(&brokers, "admin"))?
        .create_topic(&t, 1, 1)
        .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    let send = async |payload: &str| -> anyhow::Result<i64> {
        let d = producer
            .send(
                FutureRecord::<(), _>::to(&t).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        Ok(d.offset)
    };
    send("a").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = now_ms();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = send("b").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = now_ms();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "tansu-times")
        .create()?;
    let lookup = move |ms: i64| -> anyhow::Result<Offset> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Offset(ms))?;
        let got = consumer.offsets_for_times(tpl, Duration::from_secs(10))?;
        let e = got.elements();
        let e = e.first().ok_or_else(|| anyhow::anyhow!("no partition"))?;
        e.error()?;
        Ok(e.offset())
    };
    let (at_between, at_after) = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>((lookup(between)?, lookup(after)?))
    })
    .await??;
    ensure!(
        at_between == Offset::Offset(b),
        "between: {at_between:?}, b is at {b}"
    );
    ensure!(
        at_after == Offset::Offset(0),
        "tansu now answers {at_after:?} for a time after every record: if that is the end \
         (Offset::End), the quirk is gone; update docs/BROKER-NOTES.md and the comment of \
         StartAt::seeking in polybus-kafka's consumer"
    );
    Ok(())
}
