//! The copy workers (one per source partition) and the resume dedupe scan.
//!
//! A worker sends a batch of records through the [`FleetProducer`] and waits
//! for every acknowledgement before it moves its position; it holds the
//! shared *gate* (a read lock) while a batch is in flight. The checkpointer
//! takes the gate's write lock, so while it reads positions and target end
//! offsets nothing is in flight: every record below the positions is
//! acknowledged, and every record sent later lands above the end offsets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;

use flotilla_client::producer::{FleetProducer, FleetSendError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use super::progress::PartCounter;
use super::record::PartitionRange;
use super::{parse_src_header, src_header_value, BackfillError, Hook, HookPoint, SRC_HEADER};

/// State shared by the workers and the checkpointer.
pub(crate) struct Shared {
    /// Held (read) by a worker while it has unacknowledged records.
    pub gate: tokio::sync::RwLock<()>,
    /// Per worker, the next source offset to copy (everything below is acknowledged).
    pub positions: Vec<AtomicI64>,
    /// Per worker, progress counters.
    pub parts: Vec<Arc<PartCounter>>,
    /// Records handed to the producer in this run. A checkpoint is only
    /// valid when it equals `acked` (nothing in flight).
    pub sent: AtomicU64,
    /// Records acknowledged in this run, and their bytes.
    pub acked: AtomicU64,
    /// Key + payload bytes acknowledged in this run.
    pub acked_bytes: AtomicU64,
}

impl Shared {
    pub(crate) fn new(ranges: &[PartitionRange], start: &BTreeMap<i32, i64>) -> Shared {
        let mut positions = Vec::new();
        let mut parts = Vec::new();
        for r in ranges {
            let pos = start
                .get(&r.partition)
                .copied()
                .unwrap_or(r.from)
                .clamp(r.from, r.to);
            positions.push(AtomicI64::new(pos));
            parts.push(Arc::new(PartCounter {
                partition: r.partition,
                total: r.len(),
                done: AtomicU64::new((pos - r.from) as u64),
                bytes: AtomicU64::new(0),
            }));
        }
        Shared {
            gate: tokio::sync::RwLock::new(()),
            positions,
            parts,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_bytes: AtomicU64::new(0),
        }
    }

    /// Positions by source partition (call with the gate's write lock held).
    pub(crate) fn positions(&self, ranges: &[PartitionRange]) -> BTreeMap<i32, i64> {
        ranges
            .iter()
            .zip(&self.positions)
            .map(|(r, p)| (r.partition, p.load(Ordering::SeqCst)))
            .collect()
    }
}

/// What one worker copies.
pub(crate) struct WorkerJob {
    pub name: String,
    pub index: usize,
    pub range: PartitionRange,
    pub skip: HashSet<i64>,
    pub source: ClientConfig,
    pub source_topic: String,
    pub target_topic: String,
    pub batch: usize,
    pub idle_timeout: Duration,
    pub hook: Option<Hook>,
}

fn replay_err(name: &str, detail: String) -> BackfillError {
    BackfillError::Replay {
        name: name.to_string(),
        detail,
    }
}

/// Waits for the next record of the assigned partition. `Ok(None)`: the
/// consumer's position reached `to` without a record (control records or
/// compaction at the end of the range).
async fn next_record<'c>(
    consumer: &'c StreamConsumer,
    job: &WorkerJob,
    wait: Duration,
) -> Result<Option<BorrowedMessage<'c>>, BackfillError> {
    // Fast path: a record already fetched (no timer, no clock read).
    if let Some(r) = consumer.recv().now_or_never() {
        return match r {
            Ok(m) => Ok(Some(m)),
            Err(e) => Err(replay_err(
                &job.name,
                format!(
                    "reading source {}/{}: {e}",
                    job.source_topic, job.range.partition
                ),
            )),
        };
    }
    let started = Instant::now();
    loop {
        let step = wait.min(Duration::from_secs(1));
        match tokio::time::timeout(step, consumer.recv()).await {
            Ok(Ok(m)) => return Ok(Some(m)),
            Ok(Err(e)) => {
                return Err(replay_err(
                    &job.name,
                    format!(
                        "reading source {}/{}: {e}",
                        job.source_topic, job.range.partition
                    ),
                ))
            }
            Err(_) => {
                if wait < Duration::from_secs(1) {
                    return Ok(None);
                }
                let pos = consumer
                    .position()
                    .ok()
                    .and_then(|tpl| {
                        tpl.find_partition(&job.source_topic, job.range.partition)
                            .map(|e| e.offset())
                    })
                    .and_then(|o| o.to_raw());
                if pos.is_some_and(|p| p >= job.range.to) {
                    return Ok(None);
                }
                if started.elapsed() >= wait {
                    return Err(replay_err(
                        &job.name,
                        format!(
                            "no record from source {}/{} for {:?} (position {:?}, range ends at {})",
                            job.source_topic, job.range.partition, wait, pos, job.range.to
                        ),
                    ));
                }
            }
        }
    }
}

/// Copies `[start, to)` of one source partition. Returns when the range is done.
pub(crate) async fn run_worker(
    shared: Arc<Shared>,
    job: WorkerJob,
    producer: FleetProducer,
) -> Result<(), BackfillError> {
    let idx = job.index;
    let mut pos = shared.positions[idx].load(Ordering::SeqCst);
    if pos >= job.range.to {
        return Ok(());
    }
    let mut cfg = job.source.clone();
    cfg.set("group.id", format!("flotilla-backfill-{}", job.name))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "error");
    let consumer: StreamConsumer = cfg
        .create()
        .map_err(|e| replay_err(&job.name, format!("source consumer: {e}")))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&job.source_topic, job.range.partition, Offset::Offset(pos))
        .and_then(|_| consumer.assign(&tpl))
        .map_err(|e| replay_err(&job.name, format!("assigning the source partition: {e}")))?;
    let counter = shared.parts[idx].clone();
    while pos < job.range.to {
        let Some(first) = next_record(&consumer, &job, job.idle_timeout).await? else {
            // Nothing left below `to`: the range is done.
            counter.done.store(job.range.len(), Ordering::Relaxed);
            shared.positions[idx].store(job.range.to, Ordering::SeqCst);
            return Ok(());
        };
        let guard = shared.gate.read().await;
        let mut pending = Vec::with_capacity(job.batch);
        let (mut last, mut bytes, mut seen) = (pos, 0u64, 0u64);
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            let off = msg.offset();
            if off >= job.range.to {
                last = job.range.to;
                break;
            }
            if off < pos {
                // Replayed by the broker after a reconnect: already handled.
                next = next_record(&consumer, &job, Duration::from_millis(20)).await?;
                continue;
            }
            last = off + 1;
            seen += 1;
            if !job.skip.contains(&off) {
                bytes += (msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len))
                    as u64;
                pending.push(send(&producer, &job, &msg).await?);
                shared.sent.fetch_add(1, Ordering::SeqCst);
            }
            if pending.len() >= job.batch || last >= job.range.to {
                break;
            }
            next = next_record(&consumer, &job, Duration::from_millis(20)).await?;
        }
        let sent = shared.sent.load(Ordering::SeqCst);
        if let Some(h) = &job.hook {
            if h(&HookPoint::Copied(sent)) {
                return Err(BackfillError::InjectedCrash(format!("Copied({sent})")));
            }
        }
        let n = pending.len() as u64;
        for d in pending {
            d.await.map_err(|(e, _)| {
                replay_err(&job.name, format!("a copied record was not delivered: {e}"))
            })?;
        }
        pos = last;
        shared.positions[idx].store(pos, Ordering::SeqCst);
        let acked = shared.acked.fetch_add(n, Ordering::SeqCst) + n;
        shared.acked_bytes.fetch_add(bytes, Ordering::Relaxed);
        counter.done.fetch_add(seen, Ordering::Relaxed);
        counter.bytes.fetch_add(bytes, Ordering::Relaxed);
        drop(guard);
        if let Some(h) = &job.hook {
            if h(&HookPoint::Acked(acked)) {
                return Err(BackfillError::InjectedCrash(format!("Acked({acked})")));
            }
        }
    }
    Ok(())
}

/// Hands one record to the producer (retrying while its buffers are full).
async fn send<M: Message>(
    producer: &FleetProducer,
    job: &WorkerJob,
    msg: &M,
) -> Result<flotilla_client::producer::DeliveryFuture, BackfillError> {
    let mut headers = OwnedHeaders::new_with_capacity(msg.headers().map_or(0, |h| h.count()) + 1);
    if let Some(h) = msg.headers() {
        for i in 0..h.count() {
            let hd = h.get(i);
            headers = headers.insert(Header {
                key: hd.key,
                value: hd.value,
            });
        }
    }
    let src = src_header_value(job.range.partition, msg.offset());
    headers = headers.insert(Header {
        key: SRC_HEADER,
        value: Some(src.as_bytes()),
    });
    let mut rec: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(&job.target_topic).headers(headers);
    if let Some(k) = msg.key() {
        rec = rec.key(k);
    }
    if let Some(p) = msg.payload() {
        rec = rec.payload(p);
    }
    if let Some(ts) = msg.timestamp().to_millis() {
        rec = rec.timestamp(ts);
    }
    let mut started = None;
    loop {
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((e, back))
                if e.is_retriable()
                    && started.get_or_insert_with(Instant::now).elapsed()
                        < Duration::from_secs(60) =>
            {
                rec = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((FleetSendError::NoRoute(e), _)) => {
                return Err(replay_err(
                    &job.name,
                    format!(
                        "the target topic {} has no usable route: {e}",
                        job.target_topic
                    ),
                ))
            }
            Err((e, _)) => return Err(replay_err(&job.name, format!("sending: {e}"))),
        }
    }
}

/// Reads `[from[q], to[q])` of every target partition on one temporary
/// cluster and collects the source coordinates found in [`SRC_HEADER`]s at or
/// above `positions` (what a crashed run copied after its last checkpoint).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dedupe_scan(
    cluster: &str,
    config: ClientConfig,
    topic: &str,
    from: &[i64],
    to: &[i64],
    positions: &BTreeMap<i32, i64>,
    timeout: Duration,
    out: &mut HashMap<i32, HashSet<i64>>,
) -> Result<u64, BackfillError> {
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    for (q, (&f, &t)) in from.iter().zip(to).enumerate() {
        if t > f {
            tpl.add_partition_offset(topic, q as i32, Offset::Offset(f))
                .map_err(|e| BackfillError::BadInput(e.to_string()))?;
            remaining.insert(q as i32, t);
        }
    }
    if remaining.is_empty() {
        return Ok(0);
    }
    let fail = |d: String| BackfillError::Replay {
        name: cluster.to_string(),
        detail: format!("dedupe scan of {topic} on cluster {cluster}: {d}"),
    };
    let mut cfg = config;
    cfg.set("group.id", "flotilla-backfill-dedupe")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = cfg.create().map_err(|e| fail(e.to_string()))?;
    consumer.assign(&tpl).map_err(|e| fail(e.to_string()))?;
    let mut found = 0;
    let mut last_progress = Instant::now();
    while !remaining.is_empty() {
        match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            Ok(Ok(m)) => {
                last_progress = Instant::now();
                let q = m.partition();
                if let Some(&end) = remaining.get(&q) {
                    if m.offset() < end {
                        if let Some(h) = m.headers() {
                            for hd in h.iter().filter(|h| h.key == SRC_HEADER) {
                                if let Some((p, o)) = hd.value.and_then(parse_src_header) {
                                    if positions.get(&p).is_some_and(|&pos| o >= pos) {
                                        out.entry(p).or_default().insert(o);
                                        found += 1;
                                    }
                                }
                            }
                        }
                    }
                    if m.offset() + 1 >= end {
                        remaining.remove(&q);
                    }
                }
            }
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => {
                // Transaction markers or compaction can leave the last offsets without a record.
                if let Ok(pos) = consumer.position() {
                    remaining.retain(|q, end| {
                        pos.find_partition(topic, *q)
                            .and_then(|e| e.offset().to_raw())
                            .is_none_or(|o| o < *end)
                    });
                }
                if last_progress.elapsed() > timeout.max(Duration::from_secs(10)) {
                    return Err(fail(format!(
                        "no progress for {:?}; partitions left: {:?}",
                        timeout, remaining
                    )));
                }
            }
        }
    }
    Ok(found)
}
