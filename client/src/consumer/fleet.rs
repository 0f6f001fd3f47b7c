//! The [`FleetConsumer`] adapter: per-cluster rdkafka consumers around the
//! sans-IO fence gate. See the [module docs](super).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::{join_all, select_all};
use futures::{FutureExt, Stream};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::config::{FleetConsumerConfig, RebalanceCallback};
use super::context::FleetContext;
use super::epoch_of;
use crate::kafka::{classify, client_config, ClusterAdmin, ErrorClass, KafkaError};
use crate::registry::{
    ClientKind, ClientLease, ClientRecord, ClusterId, ClusterState, FleetSnapshot, FleetWatcher,
    GroupRecord, Registry, RegistryError, TopicRoute, SCHEMA_VERSION,
};
use crate::route::gate::{read_set, FenceGate, GateAction, RecordClass};

/// The rdkafka consumer of one cluster.
type ClusterConsumer = StreamConsumer<FleetContext>;

/// (cluster, topic, partition).
type Slot = (ClusterId, String, i32);

/// Errors of a [`FleetConsumer`].
#[derive(Debug, thiserror::Error)]
pub enum FleetConsumeError {
    /// The configuration is unusable (e.g. no `group.id`).
    #[error("fleet consumer configuration: {0}")]
    Config(String),
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
    /// The consumer is not (or no longer) reading `cluster`: it left the read
    /// set, or never connected.
    #[error("not reading cluster {cluster}")]
    NotReading {
        /// Registry id of the cluster.
        cluster: ClusterId,
    },
}

/// A record from one cluster of the fleet. Derefs to rdkafka's
/// [`OwnedMessage`], so `msg.payload()`, `msg.key()`, `msg.offset()`, ...
/// (the [`Message`] trait) work as with `StreamConsumer`.
#[derive(Debug, Clone)]
pub struct FleetMessage {
    message: OwnedMessage,
    cluster: ClusterId,
    epoch: Option<u64>,
    straggler: bool,
}

impl FleetMessage {
    /// Registry id of the cluster the record was read from.
    pub fn cluster(&self) -> &str {
        &self.cluster
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

    /// The rdkafka message.
    pub fn message(&self) -> &OwnedMessage {
        &self.message
    }

    /// The rdkafka message, owned.
    pub fn into_inner(self) -> OwnedMessage {
        self.message
    }
}

impl Deref for FleetMessage {
    type Target = OwnedMessage;
    fn deref(&self) -> &OwnedMessage {
        &self.message
    }
}

struct Reader {
    consumer: Arc<ClusterConsumer>,
    admin: ClusterAdmin,
    topics: BTreeSet<String>,
}

struct Parked {
    msgs: VecDeque<OwnedMessage>,
    since: Instant,
}

#[derive(Default)]
struct State {
    topics: Vec<String>,
    gates: BTreeMap<String, FenceGate>,
    routes: BTreeMap<String, TopicRoute>,
    read_sets: BTreeMap<String, BTreeSet<ClusterId>>,
    readers: BTreeMap<ClusterId, Reader>,
    parked: BTreeMap<Slot, Parked>,
    user_paused: BTreeSet<Slot>,
    ready: VecDeque<FleetMessage>,
    errors: VecDeque<FleetConsumeError>,
    cluster_errors: BTreeMap<ClusterId, String>,
    retry_at: BTreeMap<ClusterId, Instant>,
    /// This member's partitions per cluster, from the rebalance callbacks
    /// (rdkafka's `assignment()` keeps partition references that can make
    /// closing the consumer hang).
    assigned: BTreeMap<ClusterId, BTreeSet<(String, i32)>>,
}

/// State shared by the consumer handle, its driver task and the rdkafka contexts.
pub(crate) struct Shared {
    group: String,
    client_id: String,
    config: FleetConsumerConfig,
    state: Mutex<State>,
    /// Wakes `recv` (records became ready, readers changed).
    notify: Notify,
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

    pub(crate) fn rebalance_callback(&self) -> Option<RebalanceCallback> {
        self.config.on_rebalance.clone()
    }

    pub(crate) fn cluster_error(&self, cluster: &str, error: String) {
        self.lock()
            .cluster_errors
            .insert(cluster.to_string(), error);
    }

    /// A rebalance assigned (`assigned`) or revoked these partitions of
    /// `cluster`: what was parked for them is re-read by whoever owns them now.
    pub(crate) fn on_assignment(
        &self,
        cluster: &str,
        partitions: &[(String, i32)],
        assigned: bool,
    ) {
        let mut st = self.lock();
        let set = st.assigned.entry(cluster.to_string()).or_default();
        for tp in partitions {
            if assigned {
                set.insert(tp.clone());
            } else {
                set.remove(tp);
            }
        }
        for (t, p) in partitions {
            let slot = (cluster.to_string(), t.clone(), *p);
            st.parked.remove(&slot);
            st.user_paused.remove(&slot);
            // Released by a fence but not yet handed out: the partition's next
            // owner reads them from the committed offset.
            st.ready
                .retain(|m| !(m.cluster == cluster && m.topic() == t && m.partition() == *p));
        }
    }

    /// The group committed `offset` on `cluster/topic/partition` (this member,
    /// or another one seen by polling).
    pub(crate) fn on_committed(&self, cluster: &str, topic: &str, partition: u32, offset: i64) {
        let mut st = self.lock();
        let Some(gate) = st.gates.get_mut(topic) else {
            return;
        };
        let actions = gate.on_committed(cluster, partition, offset);
        let before = st.ready.len();
        self.apply(&mut st, topic, actions);
        if st.ready.len() > before {
            self.notify.notify_one();
        }
    }

    fn apply(&self, st: &mut State, topic: &str, actions: Vec<GateAction>) {
        for GateAction::Unblock { cluster, partition } in actions {
            if let Ok(p) = i32::try_from(partition) {
                self.drain(st, &(cluster, topic.to_string(), p));
            }
        }
    }

    /// Moves what the gate now allows from the parked records of `slot` to
    /// the ready queue; resumes the partition once nothing is parked.
    fn drain(&self, st: &mut State, slot: &Slot) {
        let (cluster, topic, p) = slot;
        let Some(mut parked) = st.parked.remove(slot) else {
            return;
        };
        while let Some(m) = parked.msgs.front() {
            match self.admit(st, cluster, m) {
                Some((epoch, straggler)) => {
                    let m = parked.msgs.pop_front().expect("front exists");
                    st.ready.push_back(FleetMessage {
                        message: m,
                        cluster: cluster.clone(),
                        epoch,
                        straggler,
                    });
                }
                None => break,
            }
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
    }

    /// Whether the gate lets `m` (of `cluster`) be delivered now: `Some((epoch,
    /// straggler))` if so. Counts and logs stragglers.
    fn admit(
        &self,
        st: &mut State,
        cluster: &str,
        m: &OwnedMessage,
    ) -> Option<(Option<u64>, bool)> {
        let gate = st.gates.get_mut(m.topic())?;
        let p = u32::try_from(m.partition()).ok()?;
        if gate
            .allowed_until(cluster, p)
            .is_some_and(|l| m.offset() >= l)
        {
            return None;
        }
        let epoch = m.headers().and_then(epoch_of);
        match gate.classify(cluster, p, m.offset(), epoch) {
            RecordClass::Ahead => None,
            RecordClass::InOrder => Some((epoch, false)),
            RecordClass::Straggler => {
                self.stragglers.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(
                    "flotilla_consumer_stragglers_total",
                    "cluster" => cluster.to_string(),
                    "topic" => m.topic().to_string()
                )
                .increment(1);
                tracing::warn!(
                    cluster,
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    epoch,
                    "straggler: record of a sealed epoch above its fence (a producer kept writing after the switch); delivering it late"
                );
                Some((epoch, true))
            }
        }
    }

    /// A record fresh from `cluster`'s consumer: deliver it (returned), or
    /// park it and pause its partition.
    fn process(&self, cluster: &str, m: OwnedMessage) -> Option<FleetMessage> {
        let mut st = self.lock();
        let slot: Slot = (cluster.to_string(), m.topic().to_string(), m.partition());
        if let Some(parked) = st.parked.get_mut(&slot) {
            if parked.msgs.back().is_some_and(|b| m.offset() <= b.offset()) {
                // The partition was rewound (re-fetch after a resume, offset
                // reset): what is parked will be read again.
                parked.msgs.clear();
            }
            parked.msgs.push_back(m);
            return None;
        }
        match self.admit(&mut st, cluster, &m) {
            Some((epoch, straggler)) => {
                let msg = FleetMessage {
                    message: m,
                    cluster: cluster.to_string(),
                    epoch,
                    straggler,
                };
                if st.ready.is_empty() {
                    Some(msg)
                } else {
                    // Keep partition order behind records a fence just released.
                    st.ready.push_back(msg);
                    st.ready.pop_front()
                }
            }
            None => {
                tracing::debug!(
                    cluster,
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    "record held back by a fence; pausing the partition"
                );
                if let Some(r) = st.readers.get(cluster) {
                    if let Err(e) = r.consumer.pause(&tpl_of(m.topic(), m.partition())) {
                        tracing::warn!(cluster, error = %e, "cannot pause partition");
                    }
                }
                st.parked.insert(
                    slot,
                    Parked {
                        msgs: VecDeque::from([m]),
                        since: Instant::now(),
                    },
                );
                None
            }
        }
    }

    /// Bookkeeping of a record handed to the application.
    fn delivered(&self, msg: FleetMessage) -> FleetMessage {
        metrics::counter!("flotilla_consumer_records_total", "cluster" => msg.cluster.clone())
            .increment(1);
        if self.config.auto_store() {
            let (consumer, at_fence) = {
                let st = self.lock();
                let next = msg.offset() + 1;
                let p = msg.partition() as usize;
                let at_fence = st.routes.get(msg.topic()).is_some_and(|r| {
                    r.sealed_epochs().any(|e| {
                        e.writes_to(&msg.cluster)
                            && e.fence.get(&msg.cluster).and_then(|f| f.get(p)) == Some(&next)
                    })
                });
                let consumer = st.readers.get(&msg.cluster).map(|r| r.consumer.clone());
                (consumer, at_fence)
            };
            if let Some(c) = consumer {
                if let Err(e) = c.store_offsets(&next_offset_tpl(&msg)) {
                    tracing::debug!(cluster = %msg.cluster, error = %e, "cannot store offset (partition revoked?)");
                } else if at_fence && self.config.auto_commit() {
                    // This member reached a fence: commit now rather than at the
                    // next auto-commit tick, so the next epoch's records wait less.
                    if let Err(e) = c.commit_consumer_state(CommitMode::Async) {
                        tracing::debug!(cluster = %msg.cluster, error = %e, "cannot commit at a fence");
                    }
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
        // 1. Routes into the gates.
        {
            let mut st = self.lock();
            let before = st.ready.len();
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
                // be read any more: whatever it held is gone for this group, so
                // it counts as consumed up to its fence instead of blocking the
                // next epochs forever.
                for e in route.sealed_epochs() {
                    for c in e.clusters() {
                        let gone = snap
                            .cluster(c)
                            .is_none_or(|spec| spec.state == ClusterState::Retired);
                        let Some(fence) = e.fence.get(c).filter(|_| gone) else {
                            continue;
                        };
                        for (p, o) in fence.iter().enumerate() {
                            actions.extend(gate.on_committed(c, p as u32, *o));
                        }
                    }
                }
                if changed {
                    st.routes.insert(t.clone(), route.clone());
                }
                self.apply(&mut st, t, actions);
                if changed {
                    // Records parked as `Ahead` wait for a route, not for a limit.
                    let slots: Vec<Slot> =
                        st.parked.keys().filter(|s| &s.1 == t).cloned().collect();
                    for s in slots {
                        self.drain(&mut st, &s);
                    }
                }
            }
            if st.ready.len() > before {
                self.notify.notify_one();
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
        // 3. Read sets.
        let desired: BTreeMap<ClusterId, BTreeSet<String>> = {
            let mut st = self.lock();
            let mut desired: BTreeMap<ClusterId, BTreeSet<String>> = BTreeMap::new();
            let mut sets = BTreeMap::new();
            for t in &topics {
                let Some(route) = st.routes.get(t).filter(|_| st.gates.contains_key(t)) else {
                    continue;
                };
                // Sealed epochs' clusters stay until retired, not only until the
                // group passed their fences: stragglers land above the fence.
                let rs = read_set(route, |c| {
                    snap.cluster(c)
                        .is_none_or(|spec| spec.state == ClusterState::Retired)
                });
                metrics::gauge!("flotilla_consumer_read_set_size", "topic" => t.clone())
                    .set(rs.len() as f64);
                for c in &rs {
                    desired.entry(c.clone()).or_default().insert(t.clone());
                }
                sets.insert(t.clone(), rs);
            }
            for (t, rs) in &sets {
                if st.read_sets.get(t) != Some(rs) {
                    tracing::info!(topic = %t, read_set = ?rs, "read set changed");
                }
            }
            st.read_sets = sets;
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

    /// Opens consumers for clusters that entered the read set, resubscribes
    /// those whose topics changed, closes those that left.
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
                tracing::info!(cluster = %c, "cluster left the read set (retired or deregistered); closing its consumer");
                if let Some(r) = st.readers.remove(&c) {
                    closing.push(r);
                }
                st.parked.retain(|s, _| s.0 != c);
                st.user_paused.retain(|s| s.0 != c);
                st.assigned.remove(&c);
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
            drop(close_readers(closing));
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
        let mut changed = false;
        for (c, topics, r) in opened {
            match r {
                Ok((consumer, admin)) => {
                    tracing::info!(cluster = %c, ?topics, "reading cluster");
                    st.retry_at.remove(&c);
                    st.cluster_errors.remove(&c);
                    st.readers.insert(
                        c,
                        Reader {
                            consumer: Arc::new(consumer),
                            admin,
                            topics,
                        },
                    );
                    changed = true;
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
                        st.errors.push_back(e);
                        changed = true;
                    } else {
                        tracing::warn!(cluster = %c, error = %e, "cannot read cluster yet; retrying");
                    }
                }
            }
        }
        drop(st);
        if changed {
            self.notify.notify_one();
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
        let ctx = FleetContext::new(spec.id.clone(), Arc::downgrade(self));
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

/// How long [`FleetConsumer::close`] waits for the per-cluster consumers to leave their groups.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Closes consumers (leaving their groups blocks) on a plain thread, so
/// neither the async runtime nor its shutdown waits for them. The receiver
/// completes when they are closed.
fn close_readers(readers: Vec<Reader>) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("flotilla-consumer-close".into())
        .spawn(move || {
            drop(readers);
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
        f.debug_struct("FleetConsumer")
            .field("group", &self.shared.group)
            .field("client_id", &self.shared.client_id)
            .field("read_sets", &self.shared.lock().read_sets)
            .finish()
    }
}

impl Drop for FleetConsumer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let readers = std::mem::take(&mut self.shared.lock().readers);
        if !readers.is_empty() {
            // Closing an rdkafka consumer blocks (it leaves the group).
            drop(close_readers(readers.into_values().collect()));
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
    /// Starts a consumer: checks the configuration (`group.id` is required),
    /// starts a registry watcher, and registers the consumer as a lease-bound
    /// client (`clients/consumer/<id>`). Nothing is read before
    /// [`FleetConsumer::subscribe`].
    pub async fn new(config: FleetConsumerConfig) -> Result<FleetConsumer, FleetConsumeError> {
        let watcher = FleetWatcher::start(config.registry.clone(), config.watcher.clone()).await?;
        Self::with_watcher(config, Arc::new(watcher)).await
    }

    /// As [`FleetConsumer::new`], sharing an already running watcher of the
    /// same fleet (e.g. with a `FleetProducer`).
    pub async fn with_watcher(
        config: FleetConsumerConfig,
        watcher: Arc<FleetWatcher>,
    ) -> Result<FleetConsumer, FleetConsumeError> {
        let group = config
            .group_id()
            .filter(|g| !g.is_empty())
            .ok_or_else(|| FleetConsumeError::Config("`group.id` is required".into()))?
            .to_string();
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
            config,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            wake: Notify::new(),
            group_registered: AtomicBool::new(false),
            stragglers: AtomicU64::new(0),
            lease: tokio::sync::Mutex::new(Some(lease)),
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
    pub async fn recv(&self) -> Result<FleetMessage, FleetConsumeError> {
        let mut rotate = 0usize;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut consumers: Vec<(ClusterId, Arc<ClusterConsumer>)> = {
                let mut st = self.shared.lock();
                if let Some(m) = st.ready.pop_front() {
                    drop(st);
                    return Ok(self.shared.delivered(m));
                }
                if let Some(e) = st.errors.pop_front() {
                    return Err(e);
                }
                st.readers
                    .iter()
                    .map(|(c, r)| (c.clone(), r.consumer.clone()))
                    .collect()
            };
            if consumers.is_empty() {
                notified.await;
                continue;
            }
            rotate = rotate.wrapping_add(1);
            let n = consumers.len();
            consumers.rotate_left(rotate % n);
            let futs = consumers.iter().map(|(c, k)| {
                async move { (c.clone(), k.recv().await.map(|m| m.detach())) }.boxed()
            });
            tokio::select! {
                _ = &mut notified => continue,
                ((cluster, res), _, _) = select_all(futs) => match res {
                    Ok(m) => {
                        if let Some(msg) = self.shared.process(&cluster, m) {
                            return Ok(self.shared.delivered(msg));
                        }
                    }
                    Err(source) => {
                        metrics::counter!("flotilla_consumer_errors_total", "cluster" => cluster.clone()).increment(1);
                        self.shared.cluster_error(&cluster, source.to_string());
                        if classify(&source) == ErrorClass::Transient {
                            // A cluster down or flapping: librdkafka reconnects and
                            // resumes where it was; the other clusters keep flowing.
                            tracing::debug!(%cluster, error = %source, "transient consumer error");
                            continue;
                        }
                        return Err(FleetConsumeError::Kafka { cluster, source });
                    }
                },
            }
        }
    }

    /// The records as a stream (`recv` in a loop), like `StreamConsumer::stream`.
    pub fn stream(&self) -> impl Stream<Item = Result<FleetMessage, FleetConsumeError>> + '_ {
        futures::stream::unfold(self, |c| async move { Some((c.recv().await, c)) })
    }

    fn consumer_of(&self, cluster: &str) -> Result<Arc<ClusterConsumer>, FleetConsumeError> {
        self.shared
            .lock()
            .readers
            .get(cluster)
            .map(|r| r.consumer.clone())
            .ok_or_else(|| FleetConsumeError::NotReading {
                cluster: cluster.to_string(),
            })
    }

    /// Commits `msg` (its offset + 1) to the cluster it came from, like
    /// rdkafka's `commit_message`. A synchronous commit feeds the fence gate
    /// at once, so records waiting for this fence flow without a poll delay.
    pub fn commit_message(
        &self,
        msg: &FleetMessage,
        mode: CommitMode,
    ) -> Result<(), FleetConsumeError> {
        let next = msg.offset() + 1;
        let consumer = match self.consumer_of(&msg.cluster) {
            Ok(c) => c,
            // The cluster left the read set because the group committed past
            // its fences: a record from before that needs no commit.
            Err(e) => {
                let done = u32::try_from(msg.partition())
                    .ok()
                    .and_then(|p| self.gate_committed(&msg.cluster, msg.topic(), p));
                return if done.is_some_and(|c| c >= next) {
                    Ok(())
                } else {
                    Err(e)
                };
            }
        };
        let tpl = next_offset_tpl(msg);
        consumer
            .commit(&tpl, mode)
            .map_err(|source| self.kafka_err(&msg.cluster, source))?;
        if matches!(mode, CommitMode::Sync) {
            if let Ok(p) = u32::try_from(msg.partition()) {
                self.shared.on_committed(&msg.cluster, msg.topic(), p, next);
            }
        }
        Ok(())
    }

    /// Stores `msg`'s offset (+1) for the next commit ([`FleetConsumer::commit`]
    /// or auto-commit), like rdkafka's `store_offset_from_message`. Only
    /// needed with `enable.auto.offset.store=false`: otherwise every
    /// delivered record is stored.
    pub fn store_offset(&self, msg: &FleetMessage) -> Result<(), FleetConsumeError> {
        self.consumer_of(&msg.cluster)?
            .store_offsets(&next_offset_tpl(msg))
            .map_err(|source| self.kafka_err(&msg.cluster, source))
    }

    /// Commits the stored offsets on every cluster, like rdkafka's
    /// `commit_consumer_state`. A cluster with nothing to commit is not an error.
    pub fn commit(&self, mode: CommitMode) -> Result<(), FleetConsumeError> {
        let consumers: Vec<(ClusterId, Arc<ClusterConsumer>)> = self
            .shared
            .lock()
            .readers
            .iter()
            .map(|(c, r)| (c.clone(), r.consumer.clone()))
            .collect();
        let mut first = None;
        for (c, k) in consumers {
            match k.commit_consumer_state(mode) {
                Ok(()) => {}
                Err(RdKafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(source) => {
                    first.get_or_insert(self.kafka_err(&c, source));
                }
            }
        }
        first.map_or(Ok(()), Err)
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
    /// partition the gate holds.
    pub fn pause(
        &self,
        cluster: &str,
        partitions: &TopicPartitionList,
    ) -> Result<(), FleetConsumeError> {
        let consumer = self.consumer_of(cluster)?;
        {
            let mut st = self.shared.lock();
            for e in partitions.elements() {
                st.user_paused
                    .insert((cluster.to_string(), e.topic().to_string(), e.partition()));
            }
        }
        consumer
            .pause(partitions)
            .map_err(|s| self.kafka_err(cluster, s))
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
    /// partition must be assigned to this member). Records parked for it are
    /// dropped (they are read again); fences still apply.
    pub fn seek(
        &self,
        cluster: &str,
        topic: &str,
        partition: i32,
        offset: Offset,
        timeout: Duration,
    ) -> Result<(), FleetConsumeError> {
        let consumer = self.consumer_of(cluster)?;
        let slot = (cluster.to_string(), topic.to_string(), partition);
        let was_parked = self.shared.lock().parked.remove(&slot).is_some();
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
    pub fn read_set(&self, topic: &str) -> BTreeSet<ClusterId> {
        self.shared
            .lock()
            .read_sets
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    /// The clusters this consumer has a connected consumer for.
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

    /// Stops the consumer: closes every per-cluster consumer (leaving the
    /// groups) and deletes its registry record.
    pub async fn close(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let readers = std::mem::take(&mut self.shared.lock().readers);
        let done = close_readers(readers.into_values().collect());
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
