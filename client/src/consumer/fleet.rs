//! The [`FleetConsumer`] adapter: per-cluster rdkafka consumers around the
//! sans-IO fence gate. See the [module docs](super).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use futures::{FutureExt, Stream, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{
    BorrowedHeaders, BorrowedMessage, Message, OwnedHeaders, OwnedMessage, Timestamp,
};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::committer::{CommitWait, Committer};
use super::config::{FleetConsumerConfig, RebalanceCallback};
use super::context::FleetContext;
use super::record_epoch::RecordEpoch;
use crate::kafka::{
    classify, client_config, ClusterAdmin, ErrorClass, InvalidProperty, KafkaError,
};
use crate::registry::{
    ClientKind, ClientLease, ClientRecord, ClusterId, ClusterState, FleetSnapshot, FleetWatcher,
    GroupRecord, Registry, RegistryError, TopicRoute, SCHEMA_VERSION,
};
use crate::route::gate::{
    gated_by_route, prejoin_set, read_set, FenceGate, GateAction, RecordClass,
};

/// The rdkafka consumer of one cluster.
type ClusterConsumer = StreamConsumer<FleetContext>;

/// (cluster, topic, partition).
type Slot = (ClusterId, String, i32);

/// A reader's consumer, committer and tag, cloned out of the state lock.
type ReaderHandles = (Arc<ClusterConsumer>, Arc<Committer>, Arc<ClusterTag>);

/// Errors of a [`FleetConsumer`].
#[derive(Debug, thiserror::Error)]
pub enum FleetConsumeError {
    /// The configuration is unusable (e.g. no `group.id`).
    #[error("fleet consumer configuration: {0}")]
    Config(String),
    /// A property the chosen consumer group protocol refuses: with
    /// `group.protocol=consumer` (KIP-848), the classic protocol's
    /// `session.timeout.ms`, `heartbeat.interval.ms`,
    /// `partition.assignment.strategy` and `group.protocol.type`.
    #[error("fleet consumer configuration: `{property}` is not supported with `group.protocol={protocol}`: {hint}")]
    UnsupportedProperty {
        /// The refused property.
        property: String,
        /// The group protocol chosen (`group.protocol`).
        protocol: String,
        /// What to do instead.
        hint: String,
    },
    /// A property librdkafka refuses (an unknown name, an invalid value),
    /// refused by [`FleetConsumer::new`] before anything connects, as
    /// rdkafka's `ClientConfig::create` would (librdkafka would refuse every
    /// per-cluster consumer in the background).
    #[error("fleet consumer configuration: {0}")]
    InvalidProperty(#[from] InvalidProperty),
    /// The registry could not be read or written.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// Connecting to a cluster failed; a [`KafkaError::ClusterIdMismatch`]
    /// means the bootstrap address answers with another Kafka cluster, and the
    /// cluster is refused (the consumer retries it, and reports it again).
    #[error("cluster: {0}")]
    Cluster(#[from] KafkaError),
    /// rdkafka reported an error on the consumer of `cluster`. The other
    /// clusters keep flowing: call `recv` again.
    #[error("kafka cluster {cluster}: {source}")]
    Kafka {
        /// Registry id of the cluster.
        cluster: ClusterId,
        /// The rdkafka error.
        #[source]
        source: RdKafkaError,
    },
    /// A commit on `cluster` was not confirmed within the commit timeout
    /// ([`FleetConsumerConfig::commit_timeout`]), or the cluster is already
    /// known to be unreachable (returned at once then). The offset stays
    /// queued and the consumer keeps committing it in the background until
    /// the cluster answers (a later commit of a higher offset supersedes it),
    /// so fences it completes are passed then. Carry on reading: the other
    /// clusters keep flowing. If a rebalance revokes the partition
    /// meanwhile, the commit is made before the revoke completes if the
    /// cluster answers within the commit timeout; if it does not (or this
    /// member's group session on the cluster expired), the commit is dropped
    /// and the record may be delivered again (at least once).
    #[error("commit on cluster {cluster} not confirmed after {waited:?}; queued and retried until the cluster answers")]
    CommitPending {
        /// Registry id of the cluster.
        cluster: ClusterId,
        /// How long the call waited.
        waited: Duration,
    },
    /// The consumer is not (or no longer) reading `cluster`: it left the read
    /// set, or never connected.
    #[error("not reading cluster {cluster}")]
    NotReading {
        /// Registry id of the cluster.
        cluster: ClusterId,
    },
}

/// A record from one cluster of the fleet, read from librdkafka without
/// copying: it implements rdkafka's [`Message`] trait, so `msg.payload()`,
/// `msg.key()`, `msg.offset()`, `msg.headers()`, `msg.topic()`, ... work as
/// with `StreamConsumer`'s `BorrowedMessage`.
///
/// A `FleetMessage` can be kept and sent to other threads (`Send + Sync +
/// 'static`): it keeps the rdkafka consumer of its cluster alive, so holding
/// one past its cluster's removal from the read set (or past
/// [`FleetConsumer::close`]) is fine, but that consumer is closed (leaves its
/// group) only once the last record of it is dropped. Like rdkafka's
/// `BorrowedMessage`, it also keeps the librdkafka fetch buffer it lies in:
/// for records kept long, keep [`FleetMessage::detach`]'s `OwnedMessage`
/// (a copy holding neither). `clone()` copies the data out of librdkafka,
/// but the clone still holds the consumer.
pub struct FleetMessage {
    // Field order matters: fields drop in declaration order, so `record`
    // (librdkafka's message) goes before `cluster`, whose tag holds the
    // consumer the message came from (see `ClusterTag::client`).
    record: Record,
    cluster: Arc<ClusterTag>,
    epoch: Option<u64>,
    straggler: bool,
    /// Decided by the gate at admission (under the state lock, which `recv`
    /// then need not take): the record is the last one below the fence of a
    /// sealed epoch that wrote to its cluster, so delivering it under
    /// auto-commit commits at once. Valid while [`Shared::routes_gen`] is
    /// still `routes_gen` (the routes have not changed since); otherwise
    /// `recv` decides again under the lock.
    at_fence: bool,
    routes_gen: u64,
    /// The record's topic in its cluster's [`PendingStores`] (found once
    /// per batch, so `recv` stores its offset without comparing topic
    /// names); [`NO_SLOT`] if not found yet.
    store_slot: u32,
}

/// [`FleetMessage::store_slot`] not known.
const NO_SLOT: u32 = u32::MAX;

/// The rdkafka message a [`FleetMessage`] wraps.
enum Record {
    /// As read, in librdkafka's memory (the fast path). Only ever stored in
    /// a [`FleetMessage`] whose `cluster` is the tag of the consumer that
    /// read it (see the `// SAFETY:` comment in [`pump`]).
    Borrowed(BorrowedMessage<'static>),
    /// Copied out: records parked behind a fence, and clones. Boxed: records
    /// are moved a few times on the fast path, and an `OwnedMessage` is large.
    Owned(Box<OwnedMessage>),
}

impl FleetMessage {
    /// Registry id of the cluster the record was read from.
    pub fn cluster(&self) -> &str {
        &self.cluster.id
    }

    /// The route epoch the record was produced with (its `flotilla-epoch`
    /// header), `None` for a record without one (a plain Kafka producer).
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Whether the record is a straggler: of a sealed epoch but above its fence
    /// (written by a producer that kept writing after the switch).
    pub fn is_straggler(&self) -> bool {
        self.straggler
    }

    /// A copy of the record that owns its data (topic, key, payload,
    /// headers), like `BorrowedMessage::detach`: it does not hold
    /// librdkafka's memory nor the cluster's consumer.
    pub fn detach(&self) -> OwnedMessage {
        match &self.record {
            Record::Borrowed(m) => m.detach(),
            Record::Owned(m) => (**m).clone(),
        }
    }
}

#[cfg(test)]
impl FleetConsumer {
    /// Records waiting in the ready queue for `recv`.
    pub(crate) fn ready_len(&self) -> usize {
        self.shared.taken().len() + self.shared.ready().q.len()
    }

    /// Revokes waiting for the application to be done with a record.
    pub(crate) fn revokes_waiting(&self) -> usize {
        self.shared.handout.waiting.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
impl FleetMessage {
    /// The consumer this record keeps alive, and whether the record is in
    /// librdkafka's memory (not copied).
    pub(crate) fn client_for_test(&self) -> (std::sync::Weak<ClusterConsumer>, bool) {
        (
            Arc::downgrade(self.cluster.consumer()),
            matches!(self.record, Record::Borrowed(_)),
        )
    }
}

impl Clone for FleetMessage {
    /// A detached copy ([`FleetMessage::detach`]) with the same cluster,
    /// epoch and straggler flag.
    fn clone(&self) -> FleetMessage {
        FleetMessage {
            record: Record::Owned(Box::new(self.detach())),
            cluster: self.cluster.clone(),
            epoch: self.epoch,
            straggler: self.straggler,
            at_fence: self.at_fence,
            routes_gen: self.routes_gen,
            store_slot: self.store_slot,
        }
    }
}

impl std::fmt::Debug for FleetMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetMessage")
            .field("cluster", &self.cluster.id)
            .field("topic", &self.topic())
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .field("epoch", &self.epoch)
            .field("straggler", &self.straggler)
            .field("key_len", &self.key().map(<[u8]>::len))
            .field("payload_len", &self.payload().map(<[u8]>::len))
            .finish()
    }
}

impl Message for FleetMessage {
    type Headers = BorrowedHeaders;

    fn key(&self) -> Option<&[u8]> {
        match &self.record {
            Record::Borrowed(m) => m.key(),
            Record::Owned(m) => m.key(),
        }
    }

    fn payload(&self) -> Option<&[u8]> {
        match &self.record {
            Record::Borrowed(m) => m.payload(),
            Record::Owned(m) => m.payload(),
        }
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        // SAFETY: the trait's contract, passed on to the caller.
        unsafe {
            match &mut self.record {
                Record::Borrowed(m) => m.payload_mut(),
                Record::Owned(m) => m.payload_mut(),
            }
        }
    }

    fn topic(&self) -> &str {
        match &self.record {
            Record::Borrowed(m) => m.topic(),
            Record::Owned(m) => m.topic(),
        }
    }

    fn partition(&self) -> i32 {
        match &self.record {
            Record::Borrowed(m) => m.partition(),
            Record::Owned(m) => m.partition(),
        }
    }

    fn offset(&self) -> i64 {
        match &self.record {
            Record::Borrowed(m) => m.offset(),
            Record::Owned(m) => m.offset(),
        }
    }

    fn timestamp(&self) -> Timestamp {
        match &self.record {
            Record::Borrowed(m) => m.timestamp(),
            Record::Owned(m) => m.timestamp(),
        }
    }

    fn headers(&self) -> Option<&BorrowedHeaders> {
        match &self.record {
            Record::Borrowed(m) => m.headers(),
            Record::Owned(m) => m.headers().map(OwnedHeaders::as_borrowed),
        }
    }
}

/// What every record of one cluster shares: its id, the consumer that read
/// it, and handles obtained once instead of per record (the records
/// counter, the offsets delivered but not yet stored).
pub(crate) struct ClusterTag {
    id: ClusterId,
    /// The cluster's consumer (its `rd_kafka_t`), kept alive as long as a
    /// record read from it (a [`FleetMessage`], which holds this tag) may
    /// exist. `None` only once taken by the tag's last owner: in
    /// [`ClusterTag::drop`], or by [`close_readers`] after
    /// [`Arc::into_inner`] proved no record holds the tag.
    client: Option<Arc<ClusterConsumer>>,
    records: metrics::Counter,
    errors: metrics::Counter,
    /// Offsets of delivered records not yet handed to librdkafka; shared
    /// with the consumer's context, which stores them before a revoke (also
    /// the one of its close).
    stores: Arc<PendingStores>,
    /// Bumped by [`FleetConsumer::seek`]: a batch read before a seek of a
    /// partition must not deliver that partition's records.
    seeks: AtomicU64,
    /// Bumped by every rebalance: a batch read across one delivers only
    /// records of partitions still assigned to this member.
    rebalances: AtomicU64,
}

impl ClusterTag {
    fn new(
        id: ClusterId,
        client: Arc<ClusterConsumer>,
        stores: Arc<PendingStores>,
    ) -> Arc<ClusterTag> {
        Arc::new(ClusterTag {
            records: metrics::counter!("flotilla_consumer_records_total", "cluster" => id.clone()),
            errors: metrics::counter!("flotilla_consumer_errors_total", "cluster" => id.clone()),
            id,
            client: Some(client),
            stores,
            seeks: AtomicU64::new(0),
            rebalances: AtomicU64::new(0),
        })
    }
}

/// The offsets delivered on one cluster's consumer and not yet in
/// librdkafka's offset store: the next offset per topic and partition (-1:
/// nothing new), set when a record is delivered and handed to librdkafka in
/// one call per batch ([`Shared::flush_stores`]) rather than one per record.
/// Topics are only ever appended, so a topic's index (its slot, found by
/// the pump once per batch and carried by the record) stays valid and
/// `recv` stores without comparing names.
pub(crate) struct PendingStores {
    to_store: Mutex<Vec<(String, Vec<i64>)>>,
    dirty: AtomicBool,
    /// Identifies this consumer in [`Handout`] keys (unique in the process,
    /// modulo 2^24 consumers).
    id: u64,
}

impl Default for PendingStores {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        PendingStores {
            to_store: Mutex::default(),
            dirty: AtomicBool::new(false),
            id: NEXT.fetch_add(1, Ordering::Relaxed) % 0xff_ffff + 1,
        }
    }
}

impl PendingStores {
    /// This consumer's id in [`Handout`] keys.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The topic of `slot` (from [`PendingStores::slot`]).
    pub(crate) fn topic_of(&self, slot: u32) -> Option<String> {
        self.lock().get(slot as usize).map(|(t, _)| t.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(String, Vec<i64>)>> {
        self.to_store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of `topic` (added if new). A few topics per cluster: a
    /// linear scan beats hashing the name.
    fn slot(&self, topic: &str) -> u32 {
        let mut m = self.lock();
        let i = match m.iter().position(|(t, _)| t == topic) {
            Some(i) => i,
            None => {
                m.push((topic.to_string(), Vec::new()));
                m.len() - 1
            }
        };
        u32::try_from(i).unwrap_or(NO_SLOT)
    }

    /// Records `next` as the offset to store for `partition` of the topic in
    /// `slot` (from [`PendingStores::slot`]).
    fn store_later(&self, slot: u32, partition: i32, next: i64) {
        let Ok(p) = usize::try_from(partition) else {
            return;
        };
        let mut m = self.lock();
        let Some((_, v)) = m.get_mut(slot as usize) else {
            return;
        };
        if v.len() <= p {
            v.resize(p + 1, -1);
        }
        v[p] = next;
        self.dirty.store(true, Ordering::Release);
    }

    /// The offsets to store since the last call, if any.
    pub(crate) fn take(&self) -> Option<TopicPartitionList> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut m = self.lock();
        let mut tpl = TopicPartitionList::new();
        for (t, v) in m.iter_mut() {
            for (p, o) in v.iter_mut().enumerate() {
                if *o >= 0 {
                    let _ = tpl.add_partition_offset(t, p as i32, Offset::Offset(*o));
                    *o = -1;
                }
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }
}

impl ClusterTag {
    /// The cluster's consumer.
    fn consumer(&self) -> &Arc<ClusterConsumer> {
        self.client
            .as_ref()
            .expect("a tag's consumer is taken only by its last owner")
    }
}

impl Drop for ClusterTag {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            release_consumer(c);
        }
    }
}

/// Drops a handle of a cluster's consumer. The last one closes the consumer
/// (it leaves the group, which blocks), on a thread of its own: the last
/// handle may be a record the application drops on an async worker.
fn release_consumer(c: Arc<ClusterConsumer>) {
    let Some(c) = Arc::into_inner(c) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("flotilla-consumer-close".into())
        .spawn(move || drop(c));
    if let Err(e) = spawned {
        // The closure (and the consumer) was dropped, closing it here.
        tracing::warn!(error = %e, "cannot spawn a thread to close a consumer");
    }
}

impl std::fmt::Debug for ClusterTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

struct Reader {
    consumer: Arc<ClusterConsumer>,
    admin: ClusterAdmin,
    topics: BTreeSet<String>,
    tag: Arc<ClusterTag>,
    committer: Arc<Committer>,
    pump: JoinHandle<()>,
}

/// Records of one partition held back by a fence. They may wait long (until
/// the group commits an older epoch's fence), so they are copied out of
/// librdkafka (`BorrowedMessage::detach`) rather than pinning its fetch
/// buffers; there are few (the partition is paused at the first).
struct Parked {
    msgs: VecDeque<OwnedMessage>,
    since: Instant,
}

/// Records just read from one cluster's consumer, in librdkafka's memory
/// (not copied), before the gate sees them. The batch holds the cluster's
/// tag itself, and its fields drop in declaration order (`msgs` before
/// `tag`): so the consumer the messages came from outlives them, whatever
/// happens to the pump (see the `// SAFETY:` comment in [`pump`]).
struct Batch {
    msgs: Vec<BorrowedMessage<'static>>,
    tag: Arc<ClusterTag>,
}

/// What delivering records of one topic of one cluster needs, found once
/// per batch (under the state lock) rather than once per record.
struct TopicInfo {
    topic: String,
    /// The topic's slot in the cluster's [`PendingStores`].
    store_slot: u32,
    /// [`Shared::routes_gen`] when `fences` was read.
    routes_gen: u64,
    /// The gate's [`FenceGate::fence_ends`] of the cluster: (partition,
    /// offset after the last record below the fence) of every sealed epoch
    /// that wrote to it; empty unless [`Shared::commits_at_fences`].
    fences: Vec<(u32, i64)>,
    /// The cluster is pre-joined for this topic (the route names it in no
    /// open or sealed epoch, see [`gated_by_route`]): every record is held
    /// back, whatever the gate says, until a route makes it a gated cluster.
    held: bool,
}

impl TopicInfo {
    /// Called under the state lock (`st`), which orders it with route changes.
    fn new(shared: &Shared, st: &State, tag: &ClusterTag, topic: &str) -> TopicInfo {
        let fences = match st.gates.get(topic) {
            Some(gate) if shared.commits_at_fences() => gate.fence_ends(&tag.id).to_vec(),
            _ => Vec::new(),
        };
        TopicInfo {
            topic: topic.to_string(),
            store_slot: tag.stores.slot(topic),
            routes_gen: shared.routes_gen.load(Ordering::Acquire),
            fences,
            held: !st
                .routes
                .get(topic)
                .is_some_and(|r| gated_by_route(r, &tag.id)),
        }
    }

    /// A record of this topic the gate admitted, ready for `recv`.
    fn message(
        &self,
        record: Record,
        cluster: Arc<ClusterTag>,
        partition: i32,
        epoch: Option<u64>,
        straggler: bool,
    ) -> FleetMessage {
        let next = record_offset(&record) + 1;
        FleetMessage {
            record,
            cluster,
            epoch,
            straggler,
            at_fence: !self.fences.is_empty()
                && u32::try_from(partition).is_ok_and(|p| self.fences.contains(&(p, next))),
            routes_gen: self.routes_gen,
            store_slot: self.store_slot,
        }
    }
}

fn record_offset(record: &Record) -> i64 {
    match record {
        Record::Borrowed(m) => m.offset(),
        Record::Owned(m) => m.offset(),
    }
}

#[derive(Default)]
struct State {
    topics: Vec<String>,
    gates: BTreeMap<String, FenceGate>,
    routes: BTreeMap<String, TopicRoute>,
    read_sets: BTreeMap<String, BTreeSet<ClusterId>>,
    /// Per topic, the clusters of its pending epoch pre-joined ([`prejoin_set`]):
    /// read (records held back) but not in the read set.
    prejoined: BTreeMap<String, BTreeSet<ClusterId>>,
    readers: BTreeMap<ClusterId, Reader>,
    parked: BTreeMap<Slot, Parked>,
    user_paused: BTreeSet<Slot>,
    /// Partitions sought by the application: the [`ClusterTag::seeks`] count
    /// at the seek, and where to.
    sought: BTreeMap<Slot, (u64, Offset)>,
    cluster_errors: BTreeMap<ClusterId, String>,
    retry_at: BTreeMap<ClusterId, Instant>,
    /// This member's partitions per cluster, from the rebalance callbacks
    /// (rdkafka's `assignment()` keeps partition references that can make
    /// closing the consumer hang).
    assigned: BTreeMap<ClusterId, BTreeSet<(String, i32)>>,
}

/// What `recv` last handed out, so that a revoke of its partition can wait
/// until the application is done with it
/// ([`FleetConsumerConfig::revoke_wait`]). Per record `recv` pays three
/// relaxed (plain) atomic stores and one load; the lock and the condvar are
/// used only while a revoke waits.
pub(crate) struct Handout {
    /// [`Handout::key`] of the last record `recv` returned; 0 from the next
    /// call to `recv` on (the application is done with it).
    key: AtomicU64,
    /// That record's offset (written before `key`, read after it).
    offset: AtomicI64,
    /// Revokes waiting for `key` to change: `recv` wakes them.
    waiting: AtomicUsize,
    lock: Mutex<()>,
    cond: Condvar,
}

/// A record in the application's hands: its consumer
/// ([`PendingStores::id`]), its topic's slot in that consumer's pending
/// stores (if known), partition and offset.
pub(crate) struct InHand {
    pub(crate) key: u64,
    pub(crate) slot: Option<u32>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// How often a waiting revoke looks again without being woken: `recv`'s
/// relaxed stores are not ordered against the revoke's check of
/// [`Handout::waiting`], so a wake-up can be missed, and commits do not wake.
const HANDOUT_RECHECK: Duration = Duration::from_millis(10);

impl Handout {
    fn new() -> Handout {
        Handout {
            key: AtomicU64::new(0),
            offset: AtomicI64::new(-1),
            waiting: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cond: Condvar::new(),
        }
    }

    /// Never 0: the id is.
    fn key(consumer: u64, slot: u32, partition: i32) -> u64 {
        (consumer << 40) | (u64::from(slot.min(0xff)) << 32) | u64::from(partition as u32)
    }

    /// `recv` was called: the application is done with the last record.
    #[inline]
    fn entered(&self) {
        self.key.store(0, Ordering::Relaxed);
        if self.waiting.load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    /// `recv` returns `msg`.
    #[inline]
    fn handed(&self, msg: &FleetMessage) {
        self.offset.store(msg.offset(), Ordering::Relaxed);
        // Release: a revoke that sees this key sees this offset (or a later one).
        self.key.store(
            Handout::key(msg.cluster.stores.id, msg.store_slot, msg.partition()),
            Ordering::Release,
        );
    }

    /// Wakes the revokes waiting.
    pub(crate) fn wake(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cond.notify_all();
    }

    /// The record the application holds, if it is one of consumer
    /// `consumer`'s (and `recv` was not called since it was handed out).
    pub(crate) fn in_hand(&self, consumer: u64) -> Option<InHand> {
        let key = self.key.load(Ordering::Acquire);
        if key == 0 || key >> 40 != consumer {
            return None;
        }
        let slot = ((key >> 32) & 0xff) as u32;
        Some(InHand {
            key,
            slot: (slot != 0xff).then_some(slot),
            partition: key as u32 as i32,
            offset: self.offset.load(Ordering::Relaxed),
        })
    }

    /// Waits until the record `key` is no longer in the application's hands
    /// (`recv` was called) or `done` says so, at most `bound`. Whether it
    /// was released in time.
    pub(crate) fn wait_released(
        &self,
        key: u64,
        bound: Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let deadline = Instant::now() + bound;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let released = loop {
            if self.key.load(Ordering::SeqCst) != key || done() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            g = self
                .cond
                .wait_timeout(g, (deadline - now).min(HANDOUT_RECHECK))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(g);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        released
    }
}

/// Records the gate let through, waiting for `recv`, and errors for it.
#[derive(Default)]
struct Ready {
    q: VecDeque<FleetMessage>,
    errors: VecDeque<FleetConsumeError>,
    /// A pump waits for room (`q` reached [`READY_CAP`]).
    space_wanted: bool,
}

/// Records a pump reads from librdkafka's queue per batch (one lock of the
/// state and of the ready queue per batch).
const BATCH: usize = 512;
/// Pumps stop reading while this many records wait for `recv`: the rest
/// stays in librdkafka, bounded by its `queued.max.messages.kbytes`.
const READY_CAP: usize = 4 * BATCH;
/// Records `recv` moves from the ready queue (shared with the pumps) to its
/// own buffer at a time: one lock of the ready queue per `TAKE` records.
const TAKE: usize = 128;

/// State shared by the consumer handle, its tasks and the rdkafka contexts.
pub(crate) struct Shared {
    group: String,
    client_id: String,
    config: FleetConsumerConfig,
    /// `enable.auto.offset.store` and `enable.auto.commit`, read once.
    pub(crate) auto_store: bool,
    pub(crate) auto_commit: bool,
    /// The record `recv` last handed out (for revokes).
    pub(crate) handout: Handout,
    state: Mutex<State>,
    /// Bumped (under the `state` lock) whenever `State::routes` changes:
    /// a record's [`FleetMessage::at_fence`] holds while this has not moved.
    routes_gen: AtomicU64,
    /// Records `recv` took from the ready queue, in order, not handed out
    /// yet (see [`TAKE`]). Like the ready queue, not yet delivered: every
    /// removal of unread records (revoke, seek, pause, cluster gone) applies
    /// to both ([`Shared::retain_unread`]). Lock order: `state`, `taken`,
    /// `ready`.
    taken: Mutex<VecDeque<FleetMessage>>,
    ready: Mutex<Ready>,
    /// Wakes `recv` (records or errors became ready).
    notify: Notify,
    /// Wakes pumps waiting for room in the ready queue.
    space: Notify,
    /// Wakes the driver (subscription changed).
    wake: Notify,
    group_registered: AtomicBool,
    stragglers: AtomicU64,
    lease: tokio::sync::Mutex<Option<ClientLease>>,
}

/// `msg`'s partition with the offset after it (what a commit of `msg` stores).
fn next_offset_tpl(msg: &FleetMessage) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    let _ = tpl.add_partition_offset(
        msg.topic(),
        msg.partition(),
        Offset::Offset(msg.offset() + 1),
    );
    tpl
}

fn tpl_of(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ready(&self) -> MutexGuard<'_, Ready> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn taken(&self) -> MutexGuard<'_, VecDeque<FleetMessage>> {
        self.taken.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps, of the records read and not handed out yet (`recv`'s buffer,
    /// then the ready queue: oldest first), those `keep` says to, and wakes
    /// a pump waiting for room.
    fn retain_unread(&self, mut keep: impl FnMut(&FleetMessage) -> bool) {
        let mut t = self.taken();
        t.retain(&mut keep);
        let mut r = self.ready();
        r.q.retain(keep);
        if r.space_wanted && r.q.len() <= READY_CAP / 2 {
            r.space_wanted = false;
            self.space.notify_waiters();
        }
    }

    /// Drops every record read and not handed out.
    fn clear_unread(&self) {
        let taken = std::mem::take(&mut *self.taken());
        let ready = std::mem::take(&mut self.ready().q);
        drop((taken, ready));
    }

    /// [`FleetConsumerConfig::revoke_wait`].
    pub(crate) fn revoke_wait(&self) -> Duration {
        self.config.revoke_wait
    }

    pub(crate) fn rebalance_callback(&self) -> Option<RebalanceCallback> {
        self.config.on_rebalance.clone()
    }

    pub(crate) fn cluster_error(&self, cluster: &str, error: String) {
        self.lock()
            .cluster_errors
            .insert(cluster.to_string(), error);
    }

    /// Wakes every `recv` waiting (each re-checks the ready queue).
    fn wake_recv(&self) {
        self.notify.notify_waiters();
    }

    /// Pushes an error for `recv` to return.
    fn push_error(&self, e: FleetConsumeError) {
        self.ready().errors.push_back(e);
        self.wake_recv();
    }

    /// Pops the next ready record (or error) for `recv` and books it as
    /// handed out: from `recv`'s own buffer, refilled with up to [`TAKE`]
    /// records from the ready queue when empty (the pumps' lock is taken
    /// once per refill, not per record).
    ///
    /// The record becomes the one in the application's hands and, with
    /// automatic stores, its offset is stored, both before `taken` is
    /// released: a revoke drops the unread records of its partitions under
    /// that lock and only then looks at the record in hand and takes the
    /// stores, so a record is either dropped by the revoke or seen by it —
    /// never delivered with neither its in-hand wait nor its store (which
    /// would deliver it again to the partition's next owner).
    fn pop_ready(&self) -> Option<Result<FleetMessage, FleetConsumeError>> {
        let mut t = self.taken();
        if let Some(m) = t.pop_front() {
            self.book(&m);
            return Some(Ok(m));
        }
        let mut r = self.ready();
        if r.q.is_empty() {
            return r.errors.pop_front().map(Err);
        }
        let n = r.q.len().min(TAKE);
        t.extend(r.q.drain(..n));
        if r.space_wanted && r.q.len() <= READY_CAP / 2 {
            r.space_wanted = false;
            self.space.notify_waiters();
        }
        drop(r);
        let m = t.pop_front()?;
        self.book(&m);
        Some(Ok(m))
    }

    /// The bookkeeping of a record handed out that must happen under the
    /// `taken` lock (see [`Shared::pop_ready`]).
    #[inline]
    fn book(&self, msg: &FleetMessage) {
        msg.cluster.records.increment(1);
        self.handout.handed(msg);
        if self.auto_store {
            let stores = &msg.cluster.stores;
            let slot = match msg.store_slot {
                NO_SLOT => stores.slot(msg.topic()),
                s => s,
            };
            stores.store_later(slot, msg.partition(), msg.offset() + 1);
        }
    }

    /// Waits until the ready queue has room for another batch.
    async fn wait_for_space(&self) {
        loop {
            let room = self.space.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut r = self.ready();
                if r.q.len() < READY_CAP {
                    return;
                }
                r.space_wanted = true;
            }
            room.await;
        }
    }

    /// Hands the offsets delivered since the last call to librdkafka's offset
    /// store (one call per batch instead of one per record).
    fn flush_stores(&self, tag: &ClusterTag, consumer: &ClusterConsumer) {
        if let Some(tpl) = tag.stores.take() {
            if let Err(e) = consumer.store_offsets(&tpl) {
                tracing::debug!(cluster = %tag.id, error = %e, "cannot store offsets (partitions revoked?)");
            }
        }
    }

    /// A rebalance assigned (`assigned`) or revoked these partitions of
    /// `cluster`: what was parked or ready for them is re-read by whoever
    /// owns them now, and their commits still unconfirmed after the revoke
    /// callback's flush (the cluster did not answer within the commit
    /// timeout) are dropped.
    pub(crate) fn on_assignment(
        &self,
        cluster: &str,
        partitions: &[(String, i32)],
        assigned: bool,
    ) {
        let mut st = self.lock();
        if let Some(r) = st.readers.get(cluster) {
            r.tag.rebalances.fetch_add(1, Ordering::AcqRel);
        }
        let set = st.assigned.entry(cluster.to_string()).or_default();
        for tp in partitions {
            if assigned {
                set.insert(tp.clone());
            } else {
                set.remove(tp);
            }
        }
        if !assigned {
            if let Some(r) = st.readers.get(cluster) {
                r.committer.forget(partitions);
            }
        }
        for (t, p) in partitions {
            st.user_paused.remove(&(cluster.to_string(), t.clone(), *p));
        }
        self.drop_unread(&mut st, cluster, partitions);
    }

    /// A revoke of these partitions of `cluster` begins: what is parked or
    /// ready for them is dropped now, so the application is handed none of
    /// them while the revoke commits what it committed (their next owner
    /// reads them from the group's committed offset).
    pub(crate) fn on_revoking(&self, cluster: &str, partitions: &[(String, i32)]) {
        let mut st = self.lock();
        self.drop_unread(&mut st, cluster, partitions);
    }

    /// Drops what is parked or ready (released by a fence, or read, but not
    /// yet handed out) for these partitions of `cluster`.
    fn drop_unread(&self, st: &mut State, cluster: &str, partitions: &[(String, i32)]) {
        for (t, p) in partitions {
            st.parked.remove(&(cluster.to_string(), t.clone(), *p));
        }
        let revoked: BTreeSet<(&str, i32)> =
            partitions.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        self.retain_unread(|m| {
            !(m.cluster() == cluster && revoked.contains(&(m.topic(), m.partition())))
        });
    }

    /// The group committed `offset` on `cluster/topic/partition` (this member,
    /// or another one seen by polling).
    pub(crate) fn on_committed(&self, cluster: &str, topic: &str, partition: u32, offset: i64) {
        let mut st = self.lock();
        let Some(gate) = st.gates.get_mut(topic) else {
            return;
        };
        let actions = gate.on_committed(cluster, partition, offset);
        if self.apply(&mut st, topic, actions) {
            drop(st);
            self.wake_recv();
        }
    }

    /// Applies the gate's decisions; true if records became ready.
    fn apply(&self, st: &mut State, topic: &str, actions: Vec<GateAction>) -> bool {
        let mut released = false;
        for GateAction::Unblock { cluster, partition } in actions {
            if let Ok(p) = i32::try_from(partition) {
                released |= self.drain(st, &(cluster, topic.to_string(), p));
            }
        }
        released
    }

    /// Whether `recv` commits at once when it delivers the last record below
    /// a fence (auto-commit of auto-stored offsets).
    fn commits_at_fences(&self) -> bool {
        self.auto_store && self.auto_commit
    }

    /// Moves what the gate now allows from the parked records of `slot` to
    /// the ready queue; resumes the partition once nothing is parked. True if
    /// records became ready.
    fn drain(&self, st: &mut State, slot: &Slot) -> bool {
        let (cluster, topic, p) = slot;
        let Some(tag) = st.readers.get(cluster).map(|r| r.tag.clone()) else {
            st.parked.remove(slot);
            return false;
        };
        let Some(mut parked) = st.parked.remove(slot) else {
            return false;
        };
        let info = TopicInfo::new(self, st, &tag, topic);
        let mut out = Vec::new();
        // A pre-joined cluster's records wait for a route that gates it.
        while let Some(m) = parked.msgs.front().filter(|_| !info.held) {
            let Some(gate) = st.gates.get_mut(topic) else {
                break;
            };
            match self.admit(gate, cluster, topic, m) {
                Some((epoch, straggler)) => {
                    let m = parked.msgs.pop_front().expect("front exists");
                    let record = Record::Owned(Box::new(m));
                    out.push(info.message(record, tag.clone(), *p, epoch, straggler));
                }
                None => break,
            }
        }
        let released = !out.is_empty();
        if released {
            self.ready().q.extend(out);
        }
        if parked.msgs.is_empty() {
            metrics::histogram!(
                "flotilla_consumer_fence_wait_seconds",
                "cluster" => cluster.clone(),
                "topic" => topic.clone()
            )
            .record(parked.since.elapsed().as_secs_f64());
            tracing::debug!(%cluster, %topic, partition = p, waited = ?parked.since.elapsed(), "fence passed; resuming");
            if !st.user_paused.contains(slot) {
                if let Some(r) = st.readers.get(cluster) {
                    if let Err(e) = r.consumer.resume(&tpl_of(topic, *p)) {
                        tracing::warn!(%cluster, %topic, partition = p, error = %e, "cannot resume partition");
                    }
                }
            }
        } else {
            st.parked.insert(slot.clone(), parked);
        }
        released
    }

    /// Whether `gate` (of `topic`) lets `m` (of `cluster`) be delivered now:
    /// `Some((epoch, straggler))` if so. Counts and logs stragglers.
    fn admit(
        &self,
        gate: &mut FenceGate,
        cluster: &str,
        topic: &str,
        m: &impl RecordEpoch,
    ) -> Option<(Option<u64>, bool)> {
        let p = u32::try_from(m.partition()).ok()?;
        if gate
            .allowed_until(cluster, p)
            .is_some_and(|l| m.offset() >= l)
        {
            return None;
        }
        let epoch = m.record_epoch();
        match gate.classify(cluster, p, m.offset(), epoch) {
            RecordClass::Ahead => None,
            RecordClass::InOrder => Some((epoch, false)),
            RecordClass::Straggler => {
                self.stragglers.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(
                    "flotilla_consumer_stragglers_total",
                    "cluster" => cluster.to_string(),
                    "topic" => topic.to_string()
                )
                .increment(1);
                tracing::warn!(
                    cluster,
                    topic,
                    partition = m.partition(),
                    offset = m.offset(),
                    epoch,
                    "straggler: record of a sealed epoch above its fence (a producer kept writing after the switch); delivering it late"
                );
                Some((epoch, true))
            }
        }
    }

    /// A batch of records fresh from its tag's consumer, read after the
    /// tag's seek and rebalance counts were `seeks` and `rebalances`: each is
    /// made ready, or parked (its partition paused) while the gate holds it
    /// back. Returns the partitions to seek again (a seek landed while the
    /// batch was read: its records of those partitions may be from before
    /// the seek, so they are dropped and read again from the sought offset).
    fn admit_batch(
        &self,
        batch: &mut Batch,
        (seeks, rebalances): (u64, u64),
    ) -> Vec<(String, i32, Offset)> {
        let Batch { msgs, tag } = batch;
        let cluster = tag.id.as_str();
        let mut guard = self.lock();
        let st = &mut *guard;
        if tag.rebalances.load(Ordering::Acquire) != rebalances {
            // A rebalance ran while the batch was read (its callbacks run
            // inside the poll): records of partitions revoked meanwhile are
            // re-read by their next owner, not delivered here.
            let empty = BTreeSet::new();
            let assigned = st.assigned.get(cluster).unwrap_or(&empty);
            msgs.retain(|m| assigned.contains(&(m.topic().to_string(), m.partition())));
        }
        // Per topic of the batch (usually one), found once.
        let mut topics: Vec<TopicInfo> = Vec::new();
        let mut reseek = Vec::new();
        let mut out = Vec::with_capacity(msgs.len());
        let mut paused = Vec::new();
        for m in msgs.drain(..) {
            let partition = m.partition();
            let ti = match topics.iter().position(|t| t.topic == m.topic()) {
                Some(i) => i,
                None => {
                    topics.push(TopicInfo::new(self, st, tag, m.topic()));
                    topics.len() - 1
                }
            };
            let info = &topics[ti];
            let topic = info.topic.as_str();
            if !st.sought.is_empty() || !st.parked.is_empty() {
                let slot: Slot = (cluster.to_string(), topic.to_string(), partition);
                if let Some((n, to)) = st.sought.get(&slot).copied() {
                    if n > seeks {
                        if !reseek.iter().any(|(t, p, _)| t == &slot.1 && *p == slot.2) {
                            reseek.push((slot.1.clone(), slot.2, to));
                        }
                        continue;
                    }
                }
                if let Some(parked) = st.parked.get_mut(&slot) {
                    if parked.msgs.back().is_some_and(|b| m.offset() <= b.offset()) {
                        // The partition was rewound (re-fetch after a resume,
                        // offset reset): what is parked will be read again.
                        parked.msgs.clear();
                    }
                    parked.msgs.push_back(m.detach());
                    continue;
                }
            }
            let admitted = match st.gates.get_mut(topic) {
                Some(gate) if !info.held => self.admit(gate, cluster, topic, &m),
                _ => None,
            };
            match admitted {
                Some((epoch, straggler)) => {
                    // The tag is cloned here, in a tight loop, not as each
                    // record is read: its count's cache line, which `recv`'s
                    // thread touches as it drops records, moves to this
                    // thread once per batch rather than once per record.
                    let record = Record::Borrowed(m);
                    out.push(info.message(record, tag.clone(), partition, epoch, straggler));
                }
                None => {
                    tracing::debug!(
                        cluster,
                        topic,
                        partition,
                        offset = m.offset(),
                        pre_joined = info.held,
                        "record held back by a fence (or until the seal: pre-joined cluster); pausing the partition"
                    );
                    paused.push(tpl_of(topic, partition));
                    st.parked.insert(
                        (cluster.to_string(), topic.to_string(), partition),
                        Parked {
                            msgs: VecDeque::from([m.detach()]),
                            since: Instant::now(),
                        },
                    );
                }
            }
        }
        // Seeks this batch started after are done with.
        st.sought.retain(|s, (n, _)| s.0 != cluster || *n > seeks);
        if !paused.is_empty() {
            if let Some(r) = st.readers.get(cluster) {
                for tpl in &paused {
                    if let Err(e) = r.consumer.pause(tpl) {
                        tracing::warn!(cluster, error = %e, "cannot pause partition");
                    }
                }
            }
        }
        if !out.is_empty() {
            self.ready().q.extend(out);
            drop(guard);
            self.wake_recv();
        }
        reseek
    }

    /// An error from `tag`'s consumer: transient ones (cluster down or
    /// flapping: librdkafka reconnects and resumes where it was) are logged
    /// and counted; others are returned from `recv`.
    fn pump_error(&self, tag: &ClusterTag, source: RdKafkaError) {
        tag.errors.increment(1);
        self.cluster_error(&tag.id, source.to_string());
        if classify(&source) == ErrorClass::Transient {
            tracing::debug!(cluster = %tag.id, error = %source, "transient consumer error");
        } else {
            self.push_error(FleetConsumeError::Kafka {
                cluster: tag.id.clone(),
                source,
            });
        }
    }

    /// A record handed to the application ([`Shared::pop_ready`] booked
    /// it): under auto-commit, the last record below a fence commits at
    /// once. The gate decided at admission whether the record is that one,
    /// so the state lock is taken only if it is, or if the routes changed
    /// since.
    fn delivered(&self, msg: FleetMessage) -> FleetMessage {
        if self.commits_at_fences() {
            let cluster = msg.cluster();
            let at_fence = if msg.routes_gen == self.routes_gen.load(Ordering::Acquire) {
                msg.at_fence
            } else {
                // A route changed since the gate admitted the record (e.g. a
                // switch sealed its epoch meanwhile).
                let p = u32::try_from(msg.partition()).unwrap_or(u32::MAX);
                self.lock()
                    .gates
                    .get(msg.topic())
                    .is_some_and(|g| g.completes_fence(cluster, p, msg.offset()))
            };
            let consumer = if at_fence {
                self.lock().readers.get(cluster).map(|r| r.consumer.clone())
            } else {
                None
            };
            if let Some(c) = consumer {
                // This member reached a fence: commit now rather than at
                // the next auto-commit tick, so the next epoch's records
                // wait less.
                self.flush_stores(&msg.cluster, &c);
                if let Err(e) = c.commit_consumer_state(CommitMode::Async) {
                    tracing::debug!(%cluster, error = %e, "cannot commit at a fence");
                }
            }
        }
        msg
    }

    // ---- driver ---------------------------------------------------------------

    async fn tick(self: &Arc<Self>, snap: &FleetSnapshot) {
        let topics = self.lock().topics.clone();
        if topics.is_empty() {
            return;
        }
        if !self.group_registered.load(Ordering::SeqCst) {
            self.register_group(&topics).await;
        }
        // 0. Offsets delivered since a pump last ran go to librdkafka's store
        // (auto-commit commits what is stored).
        let stores: Vec<(Arc<ClusterTag>, Arc<ClusterConsumer>)> = self
            .lock()
            .readers
            .values()
            .map(|r| (r.tag.clone(), r.consumer.clone()))
            .collect();
        for (tag, consumer) in stores {
            self.flush_stores(&tag, &consumer);
        }
        // 1. Routes into the gates.
        {
            let mut st = self.lock();
            let mut released = false;
            // Clusters to commit at once: a route change gave them fences the
            // group has not committed up to (see below).
            let mut commit_now: BTreeMap<ClusterId, Arc<ClusterConsumer>> = BTreeMap::new();
            for t in &topics {
                let Some(route) = snap.route(t) else {
                    continue;
                };
                let changed = st.routes.get(t) != Some(route);
                let gate = st.gates.entry(t.clone()).or_default();
                let mut actions = if changed {
                    gate.on_route(route)
                } else {
                    Vec::new()
                };
                // A retired (or deregistered) cluster of a sealed epoch cannot
                // be read any more: the gate counts it as consumed instead of
                // blocking the next epochs forever.
                for e in route.sealed_epochs() {
                    for c in e.clusters() {
                        let gone = snap
                            .cluster(c)
                            .is_none_or(|spec| spec.state == ClusterState::Retired);
                        if gone {
                            actions.extend(gate.on_retired(c, route.partitions));
                        }
                    }
                }
                if changed {
                    st.routes.insert(t.clone(), route.clone());
                    self.routes_gen.fetch_add(1, Ordering::AcqRel);
                }
                released |= self.apply(&mut st, t, actions);
                if changed && self.commits_at_fences() {
                    // Under auto-commit `delivered` commits at once when it
                    // hands out the last record below a fence; a member that
                    // kept up handed those out before the seal brought the
                    // fence, so it commits now (`FenceGate::fence_uncommitted`;
                    // found with flotilla-sim's consumer model).
                    let gate = st.gates.get(t);
                    for (c, r) in &st.readers {
                        if r.topics.contains(t) && gate.is_some_and(|g| g.fence_uncommitted(c)) {
                            commit_now.insert(c.clone(), r.consumer.clone());
                        }
                    }
                }
                if changed {
                    // Records parked as `Ahead` wait for a route, not for a limit.
                    let slots: Vec<Slot> =
                        st.parked.keys().filter(|s| &s.1 == t).cloned().collect();
                    for s in slots {
                        released |= self.drain(&mut st, &s);
                    }
                }
            }
            drop(st);
            if released {
                self.wake_recv();
            }
            for (c, consumer) in commit_now {
                // The stores were flushed in step 0.
                match consumer.commit_consumer_state(CommitMode::Async) {
                    Ok(()) => {
                        tracing::debug!(cluster = %c, "new fences: committing the delivered offsets now")
                    }
                    Err(e) => {
                        tracing::debug!(cluster = %c, error = %e, "new fences: nothing to commit now")
                    }
                }
            }
        }
        // 2. The group's committed offsets on clusters of sealed epochs not yet consumed.
        let polls: Vec<(ClusterId, String, u32, ClusterAdmin)> = {
            let st = self.lock();
            let mut out = Vec::new();
            for t in &topics {
                let (Some(route), Some(gate)) = (st.routes.get(t), st.gates.get(t)) else {
                    continue;
                };
                let mut need = BTreeSet::new();
                for e in route.sealed_epochs() {
                    for c in e.clusters() {
                        if !gate.epoch_consumed(e.n, c) {
                            need.insert(c.clone());
                        }
                    }
                }
                for c in need {
                    if let Some(r) = st.readers.get(&c) {
                        out.push((c, t.clone(), route.partitions, r.admin.clone()));
                    }
                }
            }
            out
        };
        let results = join_all(polls.into_iter().map(|(c, t, n, admin)| {
            let group = self.group.clone();
            async move {
                let r = admin.committed_offsets(&group, &t, n).await;
                (c, t, r)
            }
        }))
        .await;
        for (c, t, r) in results {
            match r {
                Ok(offs) => {
                    for (p, o) in offs.into_iter().enumerate() {
                        if let Some(o) = o {
                            self.on_committed(&c, &t, p as u32, o);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(cluster = %c, topic = %t, error = %e, "cannot read the group's committed offsets");
                    self.cluster_error(&c, e.to_string());
                }
            }
        }
        // 3. Read sets, and the clusters to pre-join: the clusters to have
        // readers for.
        //
        // Pre-join: the clusters of a pending epoch get a reader (and so join
        // the group there: JoinGroup, SyncGroup, offset fetch, ~0.15-0.2 s)
        // while the epoch is pending — producers hold during that phase
        // anyway — instead of once the seal opens it. They are not in the
        // read set (`read_set`, the metric): they are not read yet, only
        // joined. Why that leaves the gate's decisions exactly as before:
        //
        // - The gate ignores pending epochs, so it knows a pre-joined cluster
        //   X as a cluster of no epoch: no limit, and `classify` says `Ahead`
        //   only for a record of the pending epoch (above its highest known
        //   epoch). Such a record (a producer saw the seal before us) would
        //   be parked anyway, but a record without an epoch header, or of an
        //   older epoch (a producer outside the route, a zombie of an epoch
        //   pruned from the route), would be `InOrder` and delivered at once.
        //   The argument that it lies below X's boundary at the seal does not
        //   hold: the boundary is read when every producer acknowledged the
        //   pending epoch, and the seal reaches us later still; a record
        //   landing on X in between is above X's boundary, and the gate
        //   holds it after the seal until the group committed the open
        //   epoch's clusters up to their fences (per-key order). Before the
        //   seal nobody can tell the two apart (the boundary is not known).
        // - So the consumer does not ask the gate about a pre-joined cluster
        //   at all: every record read from X is parked and its partition
        //   paused (`TopicInfo::held`, from `gated_by_route` on the route the
        //   gate was given under the same lock). When the route changes
        //   (step 1: the seal, which makes X an open cluster, is given to the
        //   gate first, then every parked slot of the topic is drained), the
        //   parked records go through the gate in offset order, with the
        //   sealed route and X's boundary: what it would have seen from a
        //   consumer joining X at the seal, reading from the group's
        //   committed offset (nothing read from X was delivered, stored or
        //   committed before: the group's offsets on X did not move).
        // - Aborted (or replaced) pending epoch: X leaves `desired`,
        //   `reconcile` closes its consumer (it leaves the group) and drops
        //   what was parked; nothing of X was delivered.
        //
        // The cost: a group member, and a rebalance, on a cluster the
        // switch may still abort.
        let desired: BTreeMap<ClusterId, BTreeSet<String>> = {
            let mut st = self.lock();
            let mut desired: BTreeMap<ClusterId, BTreeSet<String>> = BTreeMap::new();
            let mut sets = BTreeMap::new();
            let mut prejoined = BTreeMap::new();
            let retired = |c: &str| {
                snap.cluster(c)
                    .is_none_or(|spec| spec.state == ClusterState::Retired)
            };
            for t in &topics {
                let Some(route) = st.routes.get(t).filter(|_| st.gates.contains_key(t)) else {
                    continue;
                };
                // Sealed epochs' clusters stay until retired, not only until the
                // group passed their fences: stragglers land above the fence.
                let rs = read_set(route, retired);
                metrics::gauge!("flotilla_consumer_read_set_size", "topic" => t.clone())
                    .set(rs.len() as f64);
                let pj = prejoin_set(route, &rs, retired);
                metrics::gauge!("flotilla_consumer_prejoined_clusters", "topic" => t.clone())
                    .set(pj.len() as f64);
                for c in rs.iter().chain(&pj) {
                    desired.entry(c.clone()).or_default().insert(t.clone());
                }
                sets.insert(t.clone(), rs);
                if !pj.is_empty() {
                    prejoined.insert(t.clone(), pj);
                }
            }
            for (t, rs) in &sets {
                if st.read_sets.get(t) != Some(rs) {
                    tracing::info!(topic = %t, read_set = ?rs, "read set changed");
                }
            }
            for (t, pj) in &prejoined {
                if st.prejoined.get(t) != Some(pj) {
                    let epoch = st
                        .routes
                        .get(t)
                        .and_then(|r| r.pending_epoch())
                        .map(|e| e.n);
                    tracing::info!(topic = %t, clusters = ?pj, epoch, "pre-joining the pending epoch's clusters (their records wait for the seal)");
                }
            }
            st.read_sets = sets;
            st.prejoined = prejoined;
            desired
        };
        self.reconcile(snap, desired).await;
    }

    async fn register_group(&self, topics: &[String]) {
        let registry = &self.config.registry;
        let mut all: BTreeSet<String> = topics.iter().cloned().collect();
        let created_at = match registry.group(&self.group).await {
            Ok(Some((g, _))) => {
                all.extend(g.topics);
                g.created_at
            }
            Ok(None) => now_ms(),
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "cannot read the group record; will retry");
                return;
            }
        };
        let rec = GroupRecord {
            version: SCHEMA_VERSION,
            group: self.group.clone(),
            topics: all.into_iter().collect(),
            created_at,
        };
        match registry.register_group(&rec).await {
            Ok(_) => self.group_registered.store(true, Ordering::SeqCst),
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "cannot register the consumer group; will retry")
            }
        }
    }

    /// Opens consumers for the clusters of `desired` (the read sets and the
    /// pre-joined clusters, with their topics), resubscribes those whose
    /// topics changed, closes those that left.
    async fn reconcile(
        self: &Arc<Self>,
        snap: &FleetSnapshot,
        desired: BTreeMap<ClusterId, BTreeSet<String>>,
    ) {
        let mut closing = Vec::new();
        let mut resubscribe = Vec::new();
        let mut open = Vec::new();
        {
            let mut st = self.lock();
            let gone: Vec<ClusterId> = st
                .readers
                .keys()
                .filter(|c| !desired.contains_key(*c))
                .cloned()
                .collect();
            for c in gone {
                tracing::info!(cluster = %c, "cluster left the read set (retired or deregistered) or was pre-joined for a pending epoch since aborted; closing its consumer");
                if let Some(r) = st.readers.remove(&c) {
                    closing.push(r);
                }
                st.parked.retain(|s, _| s.0 != c);
                st.user_paused.retain(|s| s.0 != c);
                st.sought.retain(|s, _| s.0 != c);
                st.assigned.remove(&c);
                self.retain_unread(|m| m.cluster() != c);
            }
            let now = Instant::now();
            for (c, topics) in &desired {
                match st.readers.get_mut(c) {
                    Some(r) if &r.topics != topics => {
                        r.topics = topics.clone();
                        resubscribe.push((c.clone(), r.consumer.clone(), topics.clone()));
                    }
                    Some(_) => {}
                    None => {
                        if st.retry_at.get(c).is_none_or(|t| *t <= now) {
                            open.push((c.clone(), topics.clone()));
                        }
                    }
                }
            }
        }
        if !closing.is_empty() {
            drop(close_readers(closing, self.config.commit_timeout));
        }
        for (c, consumer, topics) in resubscribe {
            let ts: Vec<&str> = topics.iter().map(String::as_str).collect();
            if let Err(e) = consumer.subscribe(&ts) {
                tracing::warn!(cluster = %c, error = %e, "cannot resubscribe");
            }
        }
        let opened = join_all(open.into_iter().map(|(c, topics)| {
            let spec = snap.cluster(&c).cloned();
            let this = self.clone();
            async move {
                let r = match spec {
                    Some(spec) => this.connect(&spec, &topics).await,
                    None => Err(FleetConsumeError::Config(format!(
                        "cluster {c} is in the route but not registered"
                    ))),
                };
                (c, topics, r)
            }
        }))
        .await;
        let mut st = self.lock();
        let mut refused = Vec::new();
        for (c, topics, r) in opened {
            match r {
                Ok((consumer, admin)) => {
                    if st.read_sets.values().any(|rs| rs.contains(&c)) {
                        tracing::info!(cluster = %c, ?topics, "reading cluster");
                    } else {
                        tracing::info!(cluster = %c, ?topics, "pre-joined cluster of a pending epoch: joining its group before the seal");
                    }
                    st.retry_at.remove(&c);
                    st.cluster_errors.remove(&c);
                    let consumer = Arc::new(consumer);
                    let stores = consumer.context().stores().clone();
                    let tag = ClusterTag::new(c.clone(), consumer.clone(), stores);
                    let committer =
                        Committer::start(c.clone(), consumer.clone(), Arc::downgrade(self));
                    consumer.context().set_committer(committer.clone());
                    let pump = tokio::spawn(pump(self.clone(), tag.clone()));
                    st.readers.insert(
                        c,
                        Reader {
                            consumer,
                            admin,
                            topics,
                            tag,
                            committer,
                            pump,
                        },
                    );
                }
                Err(e) => {
                    let backoff = self.config.poll_interval.max(Duration::from_secs(2));
                    st.retry_at.insert(c.clone(), Instant::now() + backoff);
                    st.cluster_errors.insert(c.clone(), e.to_string());
                    if matches!(
                        e,
                        FleetConsumeError::Cluster(KafkaError::ClusterIdMismatch { .. })
                    ) {
                        tracing::error!(cluster = %c, error = %e, "REFUSING cluster: Kafka cluster id mismatch");
                        refused.push(e);
                    } else {
                        tracing::warn!(cluster = %c, error = %e, "cannot read cluster yet; retrying");
                    }
                }
            }
        }
        drop(st);
        for e in refused {
            self.push_error(e);
        }
    }

    async fn connect(
        self: &Arc<Self>,
        spec: &crate::registry::ClusterSpec,
        topics: &BTreeSet<String>,
    ) -> Result<(ClusterConsumer, ClusterAdmin), FleetConsumeError> {
        let cfg = &self.config;
        // Checks the Kafka cluster id against the registry.
        let admin =
            ClusterAdmin::connect(spec, &cfg.admin_base(), &cfg.profiles, cfg.connect_timeout)
                .await?;
        let mut base = cfg.consumer_base();
        if base.get("client.id").is_none() {
            base.set("client.id", self.client_id.clone());
        }
        let cc = client_config(spec, &base, &cfg.profiles)?;
        let ctx = FleetContext::new(
            spec.id.clone(),
            Arc::downgrade(self),
            Arc::new(PendingStores::default()),
            cfg.commit_timeout,
        );
        let consumer: ClusterConsumer = cc.create_with_context(ctx).map_err(|e| {
            FleetConsumeError::Cluster(KafkaError::Config {
                cluster: spec.id.clone(),
                detail: format!("cannot create the consumer: {e}"),
            })
        })?;
        let ts: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&ts)
            .map_err(|source| FleetConsumeError::Kafka {
                cluster: spec.id.clone(),
                source,
            })?;
        Ok((consumer, admin))
    }
}

/// Runs a blocking wait; on a multi-thread tokio runtime in
/// `block_in_place`, so the worker's other tasks (the pumps among them) move
/// to another thread meanwhile.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// How long [`FleetConsumer::close`] waits for the per-cluster consumers to leave their groups.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Closes consumers (leaving their groups blocks) on a plain thread, so
/// neither the async runtime nor its shutdown waits for them. First what the
/// application committed and is still queued is committed (at most
/// `drain_timeout` in all, the commit timeout); the delivered offsets are
/// stored by the revoke of the close itself (so `enable.auto.commit` commits
/// them as the consumer leaves). The receiver
/// completes when they are closed — or, for a cluster whose records the
/// application still holds, when only those records keep its consumer: the
/// last one dropped closes it then ([`ClusterTag`] drop, on a thread of its
/// own).
fn close_readers(
    readers: Vec<Reader>,
    drain_timeout: Duration,
) -> tokio::sync::oneshot::Receiver<()> {
    for r in &readers {
        // From now on (even if it closes much later) its callbacks leave
        // alone the state of a newer consumer of the same cluster.
        r.consumer.context().retire();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("flotilla-consumer-close".into())
        .spawn(move || {
            for r in &readers {
                r.pump.abort();
            }
            let drain_deadline = Instant::now() + drain_timeout;
            for r in &readers {
                let left = drain_deadline.saturating_duration_since(Instant::now());
                if let Err(w) = r.committer.drain(left) {
                    tracing::warn!(cluster = %r.tag.id, outcome = ?w, pending = ?r.committer.pending(), "commits not confirmed before the consumer closes; their records may be delivered again");
                }
                r.committer.stop();
            }
            // The aborted pumps release their handles as soon as the runtime
            // drops them; closing must happen here, not on a runtime thread
            // (it blocks while leaving the group). A committer still blocked
            // on a dead cluster releases its handle when that call returns,
            // and closes the consumer then.
            let deadline = Instant::now() + Duration::from_secs(5);
            for r in readers {
                let Reader {
                    consumer,
                    tag,
                    pump,
                    ..
                } = r;
                // Ours and the tag's: the pump and the committer are done.
                while !(pump.is_finished() && Arc::strong_count(&consumer) <= 2)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                drop(consumer);
                if let Some(mut tag) = Arc::into_inner(tag) {
                    // No record of the cluster is held: close it here (unless
                    // the committer still holds it: then it closes it).
                    if let Some(c) = tag.client.take() {
                        drop(tag);
                        drop(c);
                    }
                }
                // Otherwise records of the cluster are held by the
                // application (or were in the ready queue of a consumer being
                // dropped): the last one closes the consumer.
            }
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot spawn a thread to close consumers");
    }
    rx
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn default_client_id(group: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let group: String = group
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    format!(
        "{group}-{}-{:x}{:x}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A drop-in for rdkafka's `StreamConsumer` over a fleet of clusters. See the
/// [module docs](super).
///
/// Create it inside a tokio runtime. Dropping it stops its tasks and closes
/// its per-cluster consumers; [`FleetConsumer::close`] also deletes its
/// registry record at once.
pub struct FleetConsumer {
    shared: Arc<Shared>,
    watcher: Arc<FleetWatcher>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for FleetConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("FleetConsumer")
            .field("group", &self.shared.group)
            .field("client_id", &self.shared.client_id)
            .field("read_sets", &st.read_sets)
            .field("prejoined", &st.prejoined)
            .finish()
    }
}

impl Drop for FleetConsumer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let readers = std::mem::take(&mut self.shared.lock().readers);
        // Records not handed out hold their clusters' consumers open.
        self.shared.clear_unread();
        if !readers.is_empty() {
            // Closing an rdkafka consumer blocks (it leaves the group).
            drop(close_readers(
                readers.into_values().collect(),
                self.shared.config.commit_timeout,
            ));
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            h.spawn(async move {
                if let Some(lease) = shared.lease.lock().await.take() {
                    let _ = lease.revoke().await;
                }
            });
        }
    }
}

impl FleetConsumer {
    /// Starts a consumer: checks the configuration (`group.id` is required;
    /// a property librdkafka refuses is
    /// [`FleetConsumeError::InvalidProperty`], before anything connects),
    /// starts a registry watcher, and registers the consumer as a lease-bound
    /// client (`clients/consumer/<id>`). Nothing is read before
    /// [`FleetConsumer::subscribe`].
    pub async fn new(config: FleetConsumerConfig) -> Result<FleetConsumer, FleetConsumeError> {
        // Before the watcher connects to the registry.
        config.check()?;
        let watcher = FleetWatcher::start(config.registry.clone(), config.watcher.clone()).await?;
        Self::with_watcher(config, Arc::new(watcher)).await
    }

    /// As [`FleetConsumer::new`], sharing an already running watcher of the
    /// same fleet (e.g. with a `FleetProducer`).
    pub async fn with_watcher(
        config: FleetConsumerConfig,
        watcher: Arc<FleetWatcher>,
    ) -> Result<FleetConsumer, FleetConsumeError> {
        let group = config.check()?;
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| default_client_id(&group));
        let record = ClientRecord {
            version: SCHEMA_VERSION,
            kind: ClientKind::Consumer,
            id: client_id.clone(),
            acked: BTreeMap::new(),
            group: Some(group.clone()),
            started_at: now_ms(),
        };
        let lease = config
            .registry
            .register_client(record.clone(), config.lease_ttl)
            .await?;
        let shared = Arc::new(Shared {
            group,
            client_id,
            auto_store: config.auto_store(),
            auto_commit: config.auto_commit(),
            config,
            state: Mutex::new(State::default()),
            // Records made before any route carry 0: never current.
            routes_gen: AtomicU64::new(1),
            taken: Mutex::new(VecDeque::new()),
            ready: Mutex::new(Ready::default()),
            notify: Notify::new(),
            space: Notify::new(),
            wake: Notify::new(),
            group_registered: AtomicBool::new(false),
            stragglers: AtomicU64::new(0),
            lease: tokio::sync::Mutex::new(Some(lease)),
            handout: Handout::new(),
        });
        let driver = tokio::spawn(drive(shared.clone(), watcher.clone()));
        let keepalive = tokio::spawn(keep_alive(shared.clone(), record));
        Ok(FleetConsumer {
            shared,
            watcher,
            tasks: vec![driver, keepalive],
        })
    }

    /// Subscribes to `topics` (replacing the previous subscription), like
    /// rdkafka's `subscribe`. The consumer group is registered in the registry
    /// and the clusters of each topic's read set are connected in the
    /// background; [`FleetConsumer::recv`] waits for them.
    pub fn subscribe(&self, topics: &[&str]) -> Result<(), FleetConsumeError> {
        if topics.iter().any(|t| t.is_empty()) {
            return Err(FleetConsumeError::Config("empty topic name".into()));
        }
        {
            let mut st = self.shared.lock();
            st.topics = topics.iter().map(|t| t.to_string()).collect();
            st.topics.sort();
            st.topics.dedup();
            let keep: BTreeSet<String> = st.topics.iter().cloned().collect();
            st.gates.retain(|t, _| keep.contains(t));
            st.routes.retain(|t, _| keep.contains(t));
            self.shared.routes_gen.fetch_add(1, Ordering::AcqRel);
            for t in &keep {
                st.gates.entry(t.clone()).or_default();
            }
        }
        self.shared.group_registered.store(false, Ordering::SeqCst);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The subscribed topics.
    pub fn subscription(&self) -> Vec<String> {
        self.shared.lock().topics.clone()
    }

    /// Receives the next record from any cluster of the read set, in order per
    /// partition and — across route switches — per key. Cancellation safe.
    ///
    /// An `Err` concerns one cluster (or a refused one); the others keep
    /// flowing: call `recv` again.
    ///
    /// Calling `recv` also tells a revoke of the previous record's partition
    /// that the application is done with that record (what it committed for
    /// it is queued): the revoke waits for that, at most
    /// [`FleetConsumerConfig::revoke_wait`], before it commits what is
    /// queued and completes.
    pub async fn recv(&self) -> Result<FleetMessage, FleetConsumeError> {
        // The application is done with the record it had: a revoke of its
        // partition waiting for that may complete.
        self.shared.handout.entered();
        loop {
            if let Some(r) = self.shared.pop_ready() {
                return r.map(|m| self.shared.delivered(m));
            }
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.shared.pop_ready() {
                return r.map(|m| self.shared.delivered(m));
            }
            notified.await;
        }
    }

    /// The records as a stream (`recv` in a loop), like `StreamConsumer::stream`.
    pub fn stream(&self) -> impl Stream<Item = Result<FleetMessage, FleetConsumeError>> + '_ {
        futures::stream::unfold(self, |c| async move { Some((c.recv().await, c)) })
    }

    fn reader_of(&self, cluster: &str) -> Result<ReaderHandles, FleetConsumeError> {
        self.shared
            .lock()
            .readers
            .get(cluster)
            .map(|r| (r.consumer.clone(), r.committer.clone(), r.tag.clone()))
            .ok_or_else(|| FleetConsumeError::NotReading {
                cluster: cluster.to_string(),
            })
    }

    fn consumer_of(&self, cluster: &str) -> Result<Arc<ClusterConsumer>, FleetConsumeError> {
        self.reader_of(cluster).map(|(c, _, _)| c)
    }

    /// Maps a commit that did not complete to the consumer's error.
    fn commit_err(&self, cluster: &str, w: CommitWait) -> FleetConsumeError {
        match w {
            CommitWait::Pending(waited) => FleetConsumeError::CommitPending {
                cluster: cluster.to_string(),
                waited,
            },
            CommitWait::Failed(source) => self.kafka_err(cluster, source),
        }
    }

    /// Commits `msg` (its offset + 1) to the cluster it came from, like
    /// rdkafka's `commit_message`, through that cluster's committer thread.
    ///
    /// `CommitMode::Sync` waits for the cluster's confirmation at most the
    /// commit timeout ([`FleetConsumerConfig::commit_timeout`], 5 s by
    /// default), and not at all if the cluster is already known to be
    /// unreachable: then it returns [`FleetConsumeError::CommitPending`], the
    /// commit stays queued and is retried until the cluster answers. A
    /// confirmed commit feeds the fence gate before this returns, so records
    /// waiting for this fence flow without a poll delay. `CommitMode::Async`
    /// only queues the commit (never blocks); the fence gate learns of it
    /// when the cluster confirms it.
    ///
    /// A queued commit is not lost to a rebalance nor to
    /// [`FleetConsumer::close`]: a revoke of the partition, and the close,
    /// commit it first (waiting at most the commit timeout).
    ///
    /// The wait blocks the calling thread, like rdkafka's; on a multi-thread
    /// tokio runtime it is done in `block_in_place`, so the worker's other
    /// tasks move on meanwhile.
    pub fn commit_message(
        &self,
        msg: &FleetMessage,
        mode: CommitMode,
    ) -> Result<(), FleetConsumeError> {
        let next = msg.offset() + 1;
        let committer = match self.reader_of(msg.cluster()) {
            Ok((_, c, _)) => c,
            // The cluster left the read set because the group committed past
            // its fences: a record from before that needs no commit.
            Err(e) => {
                let done = u32::try_from(msg.partition())
                    .ok()
                    .and_then(|p| self.gate_committed(msg.cluster(), msg.topic(), p));
                return if done.is_some_and(|c| c >= next) {
                    Ok(())
                } else {
                    Err(e)
                };
            }
        };
        let offsets = [((msg.topic().to_string(), msg.partition()), next)];
        let r = match mode {
            CommitMode::Async => committer.commit(&offsets, None),
            CommitMode::Sync => {
                let timeout = self.shared.config.commit_timeout;
                blocking(|| committer.commit(&offsets, Some(timeout)))
            }
        };
        r.map_err(|w| self.commit_err(msg.cluster(), w))
    }

    /// Stores `msg`'s offset (+1) for the next commit ([`FleetConsumer::commit`]
    /// or auto-commit), like rdkafka's `store_offset_from_message`. Only
    /// needed with `enable.auto.offset.store=false`: otherwise every
    /// delivered record is stored.
    pub fn store_offset(&self, msg: &FleetMessage) -> Result<(), FleetConsumeError> {
        self.consumer_of(msg.cluster())?
            .store_offsets(&next_offset_tpl(msg))
            .map_err(|source| self.kafka_err(msg.cluster(), source))
    }

    /// Commits the stored offsets on every cluster, like rdkafka's
    /// `commit_consumer_state`, through each cluster's committer. A cluster
    /// with nothing to commit is not an error. `CommitMode::Sync` waits at
    /// most the commit timeout in all (a cluster that does not confirm in
    /// time gives [`FleetConsumeError::CommitPending`]; its commit is retried
    /// in the background); the first error is returned, after every
    /// cluster's commit was queued.
    pub fn commit(&self, mode: CommitMode) -> Result<(), FleetConsumeError> {
        let readers: Vec<(Arc<ClusterTag>, Arc<ClusterConsumer>, Arc<Committer>)> = self
            .shared
            .lock()
            .readers
            .values()
            .map(|r| (r.tag.clone(), r.consumer.clone(), r.committer.clone()))
            .collect();
        for (tag, consumer, _) in &readers {
            self.shared.flush_stores(tag, consumer);
        }
        let sync = matches!(mode, CommitMode::Sync);
        let deadline = Instant::now() + self.shared.config.commit_timeout;
        let mut first = None;
        let tickets: Vec<_> = readers
            .iter()
            .map(|(tag, _, committer)| (tag, committer, committer.ask_state()))
            .collect();
        if !sync {
            return Ok(());
        }
        for (tag, committer, ticket) in tickets {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(w) = blocking(|| committer.wait_state(ticket, left)) {
                first.get_or_insert(self.commit_err(&tag.id, w));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Offsets queued for commit and not yet confirmed, per cluster and
    /// (topic, partition): non-empty while a cluster does not answer.
    pub fn pending_commits(&self) -> BTreeMap<ClusterId, BTreeMap<(String, i32), i64>> {
        self.shared
            .lock()
            .readers
            .iter()
            .map(|(c, r)| (c.clone(), r.committer.pending()))
            .filter(|(_, p)| !p.is_empty())
            .collect()
    }

    fn kafka_err(&self, cluster: &str, source: RdKafkaError) -> FleetConsumeError {
        FleetConsumeError::Kafka {
            cluster: cluster.to_string(),
            source,
        }
    }

    /// The partitions assigned to this member, per cluster read (as the
    /// rebalance callbacks reported them).
    pub fn assignment(&self) -> Result<BTreeMap<ClusterId, TopicPartitionList>, FleetConsumeError> {
        let st = self.shared.lock();
        Ok(st
            .readers
            .keys()
            .map(|c| {
                let mut tpl = TopicPartitionList::new();
                for (t, p) in st.assigned.get(c).into_iter().flatten() {
                    tpl.add_partition(t, *p);
                }
                (c.clone(), tpl)
            })
            .collect())
    }

    /// Pauses `partitions` on `cluster` (rdkafka `pause`). The fence gate's
    /// own pauses are separate: [`FleetConsumer::resume`] never releases a
    /// partition the gate holds. Records of these partitions already read
    /// and waiting for `recv` are put back (the partition is sought to the
    /// first of them), so nothing of a paused partition is delivered after
    /// this returns — except a batch being read at this very moment.
    pub fn pause(
        &self,
        cluster: &str,
        partitions: &TopicPartitionList,
    ) -> Result<(), FleetConsumeError> {
        let (consumer, _, tag) = self.reader_of(cluster)?;
        let mut rewind: Vec<(String, i32, i64)> = Vec::new();
        {
            let mut st = self.shared.lock();
            let mut slots = BTreeSet::new();
            for e in partitions.elements() {
                st.user_paused
                    .insert((cluster.to_string(), e.topic().to_string(), e.partition()));
                slots.insert((e.topic().to_string(), e.partition()));
            }
            // Oldest first: the first record met per partition is where to
            // rewind to.
            self.shared.retain_unread(|m| {
                let key = (m.topic().to_string(), m.partition());
                if m.cluster() != cluster || !slots.contains(&key) {
                    return true;
                }
                if !rewind.iter().any(|(t, p, _)| *t == key.0 && *p == key.1) {
                    rewind.push((key.0, key.1, m.offset()));
                }
                false
            });
            for (t, p, o) in &rewind {
                let n = tag.seeks.fetch_add(1, Ordering::AcqRel) + 1;
                st.sought.insert(
                    (cluster.to_string(), t.clone(), *p),
                    (n, Offset::Offset(*o)),
                );
            }
        }
        consumer
            .pause(partitions)
            .map_err(|s| self.kafka_err(cluster, s))?;
        for (t, p, o) in rewind {
            consumer
                .seek(&t, p, Offset::Offset(o), Duration::ZERO)
                .map_err(|s| self.kafka_err(cluster, s))?;
        }
        Ok(())
    }

    /// Resumes `partitions` on `cluster` that [`FleetConsumer::pause`] paused,
    /// except those a fence still holds (they resume when it passes).
    pub fn resume(
        &self,
        cluster: &str,
        partitions: &TopicPartitionList,
    ) -> Result<(), FleetConsumeError> {
        let consumer = self.consumer_of(cluster)?;
        let mut tpl = TopicPartitionList::new();
        {
            let mut st = self.shared.lock();
            for e in partitions.elements() {
                let slot = (cluster.to_string(), e.topic().to_string(), e.partition());
                st.user_paused.remove(&slot);
                if !st.parked.contains_key(&slot) {
                    tpl.add_partition(e.topic(), e.partition());
                }
            }
        }
        consumer
            .resume(&tpl)
            .map_err(|s| self.kafka_err(cluster, s))
    }

    /// Moves `cluster/topic/partition` to `offset` (rdkafka `seek`; the
    /// partition must be assigned to this member). Records parked or already
    /// read for it are dropped (a batch read while the seek happens is read
    /// again from `offset`); fences still apply.
    pub fn seek(
        &self,
        cluster: &str,
        topic: &str,
        partition: i32,
        offset: Offset,
        timeout: Duration,
    ) -> Result<(), FleetConsumeError> {
        let (consumer, _, tag) = self.reader_of(cluster)?;
        let slot = (cluster.to_string(), topic.to_string(), partition);
        let was_parked = {
            let mut st = self.shared.lock();
            let n = tag.seeks.fetch_add(1, Ordering::AcqRel) + 1;
            st.sought.insert(slot.clone(), (n, offset));
            self.shared.retain_unread(|m| {
                !(m.cluster() == cluster && m.topic() == topic && m.partition() == partition)
            });
            st.parked.remove(&slot).is_some()
        };
        consumer
            .seek(topic, partition, offset, timeout)
            .map_err(|s| self.kafka_err(cluster, s))?;
        if was_parked && !self.shared.lock().user_paused.contains(&slot) {
            consumer
                .resume(&tpl_of(topic, partition))
                .map_err(|s| self.kafka_err(cluster, s))?;
        }
        Ok(())
    }

    /// The clusters read for `topic` now (empty before its route is known).
    /// Clusters of a pending epoch the consumer pre-joined are not in it
    /// (see [`FleetConsumer::clusters`]).
    pub fn read_set(&self, topic: &str) -> BTreeSet<ClusterId> {
        self.shared
            .lock()
            .read_sets
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    /// The clusters this consumer has a connected consumer for: those of the
    /// read sets, and those of pending epochs it pre-joined (whose records
    /// wait for the seal).
    pub fn clusters(&self) -> Vec<ClusterId> {
        self.shared.lock().readers.keys().cloned().collect()
    }

    /// The last error seen per cluster (connection, offset queries, librdkafka).
    pub fn cluster_errors(&self) -> BTreeMap<ClusterId, String> {
        self.shared.lock().cluster_errors.clone()
    }

    /// Stragglers delivered so far.
    pub fn stragglers(&self) -> u64 {
        self.shared.stragglers.load(Ordering::Relaxed)
    }

    /// Records held back by fences right now (parked, not yet deliverable).
    pub fn held_back(&self) -> usize {
        self.shared
            .lock()
            .parked
            .values()
            .map(|p| p.msgs.len())
            .sum()
    }

    /// The group's committed offset of `cluster/topic/partition` as the fence
    /// gate knows it.
    pub fn gate_committed(&self, cluster: &str, topic: &str, partition: u32) -> Option<i64> {
        self.shared
            .lock()
            .gates
            .get(topic)
            .and_then(|g| g.committed(cluster, partition))
    }

    /// The consumer group id.
    pub fn group_id(&self) -> &str {
        &self.shared.group
    }

    /// The id this consumer is registered under.
    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// The registry watcher this consumer reads the fleet from.
    pub fn watcher(&self) -> &Arc<FleetWatcher> {
        &self.watcher
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.shared.config.registry
    }

    /// Stops the consumer: commits what is queued for commit (at most the
    /// commit timeout), closes every per-cluster consumer (leaving the
    /// groups; with `enable.auto.commit` they commit the offsets of every
    /// record delivered) and deletes its registry record. Records delivered
    /// but not committed under commit after processing are not committed.
    pub async fn close(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let readers = std::mem::take(&mut self.shared.lock().readers);
        // Records not handed out hold their clusters' consumers open.
        self.shared.clear_unread();
        let done = close_readers(
            readers.into_values().collect(),
            self.shared.config.commit_timeout,
        );
        if tokio::time::timeout(CLOSE_TIMEOUT, done).await.is_err() {
            tracing::warn!("per-cluster consumers did not close within {CLOSE_TIMEOUT:?}; leaving them to finish in the background");
        }
        if let Some(lease) = self.shared.lease.lock().await.take() {
            if let Err(e) = lease.revoke().await {
                tracing::debug!(error = %e, "cannot revoke the consumer's lease");
            }
        }
    }
}

/// Reads one cluster's consumer (`tag`'s): pulls what librdkafka has in
/// batches and hands the records, not copied, to the gate and the ready queue
/// that `recv` pops from. It polls the consumer on its own (rebalances and
/// commit callbacks are served while the application processes a record) and
/// stops reading while the ready queue is full, leaving the rest in
/// librdkafka.
async fn pump(shared: Arc<Shared>, tag: Arc<ClusterTag>) {
    let consumer = tag.consumer();
    let mut stream = consumer.stream();
    let mut batch = Batch {
        msgs: Vec::with_capacity(BATCH),
        tag: tag.clone(),
    };
    loop {
        shared.wait_for_space().await;
        let seen = (
            tag.seeks.load(Ordering::Acquire),
            tag.rebalances.load(Ordering::Acquire),
        );
        let mut next = stream.next().await;
        loop {
            match next {
                Some(Ok(m)) => {
                    // SAFETY: the lifetime of a `BorrowedMessage` only ties it
                    // to a borrow of its consumer; its memory is its own
                    // (rdkafka 0.39: an `Arc` of the librdkafka event holding
                    // the message; dropping the last destroys the event, the
                    // message itself is not freed apart). What that drop needs
                    // is the consumer's `rd_kafka_t` still alive — librdkafka
                    // wants every message destroyed before the handle is
                    // closed or destroyed. It is: the message goes only into
                    // `batch` and from there into a `FleetMessage` (or is
                    // dropped), both holding `tag` (`Batch::tag`,
                    // `FleetMessage::cluster`) and dropping the message before
                    // it (fields drop in declaration order), and the tag's
                    // `client` is an `Arc` of the consumer `stream` reads.
                    // The tag gives that `Arc` up
                    // only when it is dropped (after every `FleetMessage`
                    // holding it; fields drop in declaration order, `record`
                    // before `cluster`) or once `Arc::into_inner` proved no
                    // record holds it (`close_readers`). So the consumer is
                    // closed and destroyed after its last message. Messages
                    // stay valid after later polls, seeks and rebalances (they
                    // are refcounted in librdkafka), and `BorrowedMessage` is
                    // `Send + Sync` (librdkafka is thread-safe).
                    let m = unsafe {
                        std::mem::transmute::<BorrowedMessage<'_>, BorrowedMessage<'static>>(m)
                    };
                    batch.msgs.push(m);
                }
                Some(Err(e)) => shared.pump_error(&tag, e),
                None => return,
            }
            if batch.msgs.len() >= BATCH {
                break;
            }
            match stream.next().now_or_never() {
                Some(r) => next = r,
                None => break,
            }
        }
        if !batch.msgs.is_empty() {
            for (t, p, to) in shared.admit_batch(&mut batch, seen) {
                if let Err(e) = consumer.seek(&t, p, to, Duration::ZERO) {
                    tracing::warn!(cluster = %tag.id, topic = %t, partition = p, error = %e, "cannot seek again after a seek during a read");
                }
            }
        }
        shared.flush_stores(&tag, consumer);
        // librdkafka's stream is always ready while records are buffered:
        // let the other tasks of this worker run between batches.
        tokio::task::yield_now().await;
    }
}

async fn drive(shared: Arc<Shared>, watcher: Arc<FleetWatcher>) {
    let mut rx = watcher.subscribe();
    loop {
        let snap = watcher.snapshot();
        shared.tick(&snap).await;
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    tokio::time::sleep(shared.config.poll_interval).await;
                }
            }
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

async fn keep_alive(shared: Arc<Shared>, mut record: ClientRecord) {
    let every = (shared.config.lease_ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        // Publish, per topic, the open epoch this consumer reads with.
        record.acked = shared
            .lock()
            .routes
            .iter()
            .filter_map(|(t, r)| r.open_epoch().map(|e| (t.clone(), e.n)))
            .collect();
        let mut guard = shared.lease.lock().await;
        let lapsed = match guard.as_mut() {
            Some(lease) => match lease.keep_alive().await {
                Ok(_) if lease.record().acked != record.acked => {
                    match lease.update(record.clone()).await {
                        Err(RegistryError::LeaseExpired { .. }) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot update the consumer's record");
                            false
                        }
                        Ok(_) => false,
                    }
                }
                Ok(_) => false,
                Err(RegistryError::LeaseExpired { .. }) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot renew the consumer's lease; keeping on");
                    false
                }
            },
            None => return,
        };
        if lapsed {
            match shared
                .config
                .registry
                .register_client(record.clone(), shared.config.lease_ttl)
                .await
            {
                Ok(l) => *guard = Some(l),
                Err(e) => tracing::warn!(error = %e, "cannot re-register the consumer"),
            }
        }
    }
}
