//! The producer side of the handoff: a sans-IO state machine that routes
//! records and drives the epoch switch (DESIGN "Handoff protocol", steps 2–4).
//!
//! # Events in, decisions out
//!
//! | event (adapter → router)                 | result                                   |
//! | ---------------------------------------- | ---------------------------------------- |
//! | [`Router::route`]`(topic, key)`          | [`Decision`]: `Send`, `Hold` or `NoRoute` |
//! | [`Router::on_snapshot`]`(&snapshot)`     | `Vec<`[`Action`]`>`                       |
//! | [`Router::on_settled`]`(topic, epoch)`   | `Vec<Action>` (usually empty)            |
//! | [`Router::on_settled_many`]`(.., n)`     | the same, for `n` records at once        |
//! | [`Router::on_flushed`]`(topic, epoch)`   | `Vec<Action>`                            |
//!
//! # In-flight accounting (the router counts)
//!
//! Every `Send` decision counts one record in flight for `(topic, epoch)`.
//! How the adapter reports them settled is fixed when the router is built
//! ([`Settlement`]):
//!
//! - [`Settlement::PerRecord`] ([`Router::new`]): exactly one
//!   [`Router::on_settled`] per `Send` — delivered, failed, or never handed to
//!   Kafka — typically from the delivery callback. The router acknowledges as
//!   soon as the count reaches zero; `Flush` is a hint to hurry (e.g. poll or
//!   flush the producer), and answering it with `on_flushed` is optional.
//! - [`Settlement::PerFlush`]: no per-record reports; the adapter answers
//!   every `Flush` with [`Router::on_flushed`] once everything that was in
//!   flight *when the `Flush` was emitted* has settled. Records routed after
//!   the `Flush` (possible when a switch is aborted meanwhile) stay counted
//!   until a later flush.
//!
//! Mixing both for one router would count records twice, hence the fixed
//! mode. Counts saturate at zero. Because the router knows
//! what is in flight, a producer with nothing in flight for a topic — the
//! common case for topics it does not write — acknowledges a pending epoch
//! at once, without a flush round trip.
//!
//! # Protocol, per topic
//!
//! - Pending epoch `P` appears ⇒ the topic is held (`route` returns `Hold`;
//!   the adapter buffers with backpressure). If records of epochs `< P` are
//!   in flight: `Flush { epoch }` for each such epoch, then `Ack { P }` once
//!   they are settled; otherwise `Ack { P }` at once (this covers a producer
//!   that starts while `P` is pending).
//! - `P` becomes open (its predecessor sealed) ⇒ the router routes with `P`
//!   and emits `Release { P }` — once nothing of an older epoch is in flight
//!   (if the controller sealed without our ack, it first flushes, so the
//!   older records do not land further above the boundary).
//! - `P` aborted ⇒ `Release { N }` and routing resumes on the open epoch `N`.
//! - No `Send` for an epoch that is not open in the latest snapshot, and no
//!   `Send` for an epoch older than one this router has acknowledged, unless
//!   that acknowledged epoch was aborted.
//! - `Open(cluster)` before anything that sends to it (the pending epoch's
//!   active clusters are opened early, so the producer is warm when the
//!   switch completes); `Close(cluster)` once no writable open epoch and no
//!   pending epoch of any topic in the snapshot writes to it and nothing sent
//!   to it is in flight. Only active clusters are opened. The set covers
//!   every topic of the snapshot (a fleet has few clusters); an adapter may
//!   as well create producers lazily on the first `Send` and take `Open` as a
//!   prewarm hint.
//!
//! Held records are the adapter's: on `Release` it routes them again, in the
//! order they were held and before any new record of that topic, so per-key
//! order holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use super::murmur2::{murmur2_u32, partition_for_hash};
use super::rendezvous::{key_hash_from_murmur2, key_hash_from_sequence, RendezvousTable};
use crate::registry::{ClusterId, ClusterState, FleetSnapshot, TopicRoute, WeightedCluster};

/// What to do with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Produce it to `partition` of the topic on `cluster`, with an epoch header of `epoch`.
    Send {
        /// Registry id of the cluster (cheap to clone).
        cluster: Arc<str>,
        /// Partition: murmur2 of the key, or round-robin for keyless records.
        partition: u32,
        /// The epoch routed with; goes into the record's epoch header.
        epoch: u64,
    },
    /// A switch is under way for the topic: buffer the record and route it
    /// again after [`Action::Release`] for the topic.
    Hold,
    /// The record cannot be routed; fail it with this reason (never a silent default).
    NoRoute(NoRoute),
}

/// Why a record could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// The registry has no route for the topic.
    #[error("topic {topic} has no route in the registry")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// The route has no open epoch.
    #[error("topic {topic} has no open epoch")]
    NoOpenEpoch {
        /// The topic.
        topic: String,
    },
    /// The open epoch writes to a cluster that is missing or not active.
    #[error("topic {topic}: open epoch {epoch} writes to cluster {cluster}, which is {status}")]
    ClusterUnavailable {
        /// The topic.
        topic: String,
        /// The open epoch.
        epoch: u64,
        /// The cluster.
        cluster: ClusterId,
        /// Its status.
        status: ClusterStatus,
    },
    /// The route breaks the schema's rules (e.g. two open epochs).
    #[error("topic {topic}: the registry route is invalid: {reason}")]
    InvalidRoute {
        /// The topic.
        topic: String,
        /// What [`TopicRoute::validate`] said.
        reason: String,
    },
    /// The open epoch's write set is malformed (empty, weight 0, duplicate).
    #[error("topic {topic}: open epoch {epoch} has an invalid write set: {reason}")]
    InvalidWriteSet {
        /// The topic.
        topic: String,
        /// The open epoch.
        epoch: u64,
        /// What is wrong.
        reason: String,
    },
}

/// The registry status of a cluster an open epoch writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterStatus {
    /// Not registered in the snapshot.
    Missing,
    /// Registered, in a state that takes no writes.
    State(ClusterState),
}

impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterStatus::Missing => f.write_str("not registered"),
            ClusterStatus::State(s) => write!(f, "{s}"),
        }
    }
}

/// Something the adapter must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Create (or keep) a Kafka producer for this cluster. Always before any
    /// `Send` or `Release` that needs it.
    Open(ClusterId),
    /// Flush everything in flight for `epoch` of `topic`, then call
    /// [`Router::on_flushed`] (or report each record with [`Router::on_settled`]).
    Flush {
        /// The topic.
        topic: String,
        /// The epoch whose records must settle.
        epoch: u64,
    },
    /// Write `acked[topic] = epoch` into this client's registry record.
    Ack {
        /// The topic.
        topic: String,
        /// The pending epoch acknowledged.
        epoch: u64,
    },
    /// Resume the held records of `topic`: route them again (they now get `epoch`).
    Release {
        /// The topic.
        topic: String,
        /// The epoch now routed with.
        epoch: u64,
    },
    /// No route needs this cluster any more and nothing is in flight to it:
    /// flush and drop its producer.
    Close(ClusterId),
}

#[derive(Debug, Clone)]
struct EpochView {
    n: u64,
    write: Vec<WeightedCluster>,
}

/// The registry's view of one topic, as of the latest snapshot.
#[derive(Debug, Clone, Default)]
struct View {
    exists: bool,
    partitions: u32,
    open: Option<EpochView>,
    /// The pending epoch's number.
    pending: Option<u64>,
    /// Its clusters that are registered and active (opened early).
    pending_clusters: Vec<ClusterId>,
    /// Why the open epoch cannot be written, if it cannot.
    problem: Option<NoRoute>,
}

#[derive(Debug, Clone)]
struct Active {
    n: u64,
    table: RendezvousTable,
    clusters: Vec<ClusterId>,
    inflight: u64,
    flush_requested: bool,
    /// Records sent since the outstanding `Flush` was emitted: its answer
    /// does not cover them.
    sent_since_flush: u64,
}

#[derive(Debug, Clone)]
struct Older {
    clusters: Vec<ClusterId>,
    inflight: u64,
    flush_requested: bool,
    sent_since_flush: u64,
}

#[derive(Debug, Clone, Default)]
struct TopicState {
    view: View,
    active: Option<Active>,
    older: BTreeMap<u64, Older>,
    held: bool,
    acked: u64,
    keyless_seq: u64,
}

impl TopicState {
    fn older_inflight(&self) -> bool {
        self.older.values().any(|o| o.inflight > 0)
    }

    /// Drives the topic toward its registry view; appends actions.
    fn reconcile(&mut self, topic: &str, out: &mut Vec<Action>) {
        self.older.retain(|_, o| o.inflight > 0);
        let active_n = self.active.as_ref().map(|a| a.n);
        // A pending epoch newer than what we route with: hold, flush, ack.
        if let Some(p) = self.view.pending {
            if active_n.is_none_or(|a| p > a) {
                self.held = true;
                if self.acked < p {
                    let mut settled = true;
                    if let Some(a) = self.active.as_mut() {
                        if a.inflight > 0 {
                            settled = false;
                            if !a.flush_requested {
                                a.flush_requested = true;
                                a.sent_since_flush = 0;
                                out.push(Action::Flush {
                                    topic: topic.to_string(),
                                    epoch: a.n,
                                });
                            }
                        }
                    }
                    for (&n, o) in self.older.iter_mut() {
                        if o.inflight > 0 && n < p {
                            settled = false;
                            if !o.flush_requested {
                                o.flush_requested = true;
                                o.sent_since_flush = 0;
                                out.push(Action::Flush {
                                    topic: topic.to_string(),
                                    epoch: n,
                                });
                            }
                        }
                    }
                    if settled {
                        self.acked = p;
                        out.push(Action::Ack {
                            topic: topic.to_string(),
                            epoch: p,
                        });
                    }
                }
                return;
            }
        }
        // No switch pending: route with the open epoch.
        let open_n = self.view.open.as_ref().map(|o| o.n);
        if open_n != active_n {
            if let Some(a) = self.active.take() {
                if a.inflight > 0 {
                    self.older.insert(
                        a.n,
                        Older {
                            clusters: a.clusters,
                            inflight: a.inflight,
                            flush_requested: a.flush_requested,
                            sent_since_flush: a.sent_since_flush,
                        },
                    );
                }
            }
            if let Some(open) = &self.view.open {
                match RendezvousTable::new(&open.write) {
                    Ok(table) => {
                        // An older record of the new epoch number can only come
                        // from a registry reset; keep its count with the new epoch.
                        let prev = self.older.remove(&open.n);
                        self.active = Some(Active {
                            n: open.n,
                            table,
                            clusters: open.write.iter().map(|w| w.cluster.clone()).collect(),
                            inflight: prev.as_ref().map_or(0, |o| o.inflight),
                            flush_requested: prev.as_ref().is_some_and(|o| o.flush_requested),
                            sent_since_flush: prev.as_ref().map_or(0, |o| o.sent_since_flush),
                        });
                    }
                    Err(e) => {
                        self.view.problem = Some(NoRoute::InvalidWriteSet {
                            topic: topic.to_string(),
                            epoch: open.n,
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
        if self.older_inflight() {
            // The epoch changed under records still in flight (the controller
            // sealed without waiting for us, or snapshots were coalesced):
            // hold until they settle.
            self.held = true;
            for (&n, o) in self.older.iter_mut() {
                if o.inflight > 0 && !o.flush_requested {
                    o.flush_requested = true;
                    o.sent_since_flush = 0;
                    out.push(Action::Flush {
                        topic: topic.to_string(),
                        epoch: n,
                    });
                }
            }
            return;
        }
        if self.held {
            self.held = false;
            let epoch = self.active.as_ref().map_or(0, |a| a.n);
            out.push(Action::Release {
                topic: topic.to_string(),
                epoch,
            });
        }
    }

    fn clusters_needed<'a>(&'a self, into: &mut BTreeSet<&'a str>) {
        // The open epoch's clusters, when it can be written: routed with now,
        // or again after a hold ends.
        if let (Some(open), None) = (&self.view.open, &self.view.problem) {
            into.extend(open.write.iter().map(|w| w.cluster.as_str()));
        }
        // Whatever still has records in flight.
        if let Some(a) = self.active.as_ref().filter(|a| a.inflight > 0) {
            into.extend(a.clusters.iter().map(String::as_str));
        }
        // The pending epoch's active clusters, warmed up before the switch.
        into.extend(self.view.pending_clusters.iter().map(String::as_str));
        for o in self.older.values().filter(|o| o.inflight > 0) {
            into.extend(o.clusters.iter().map(String::as_str));
        }
    }
}

/// How the adapter reports records settled (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Settlement {
    /// One [`Router::on_settled`] per `Send`; `Flush` is a hint.
    #[default]
    PerRecord,
    /// Only [`Router::on_flushed`], in answer to every `Flush`.
    PerFlush,
}

/// The producer's routing and handoff state machine. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Router {
    topics: BTreeMap<String, TopicState>,
    open_clusters: BTreeSet<ClusterId>,
    settlement: Settlement,
}

fn view_of(route: &TopicRoute, snapshot: &FleetSnapshot) -> View {
    let ev = |e: &crate::registry::Epoch| EpochView {
        n: e.n,
        write: e.write.clone(),
    };
    let open = route.open_epoch();
    let problem = match open {
        None => Some(NoRoute::NoOpenEpoch {
            topic: route.topic.clone(),
        }),
        Some(e) => e.write.iter().find_map(|w| {
            let status = match snapshot.cluster(&w.cluster) {
                None => ClusterStatus::Missing,
                Some(spec) if spec.state == ClusterState::Active => return None,
                Some(spec) => ClusterStatus::State(spec.state),
            };
            Some(NoRoute::ClusterUnavailable {
                topic: route.topic.clone(),
                epoch: e.n,
                cluster: w.cluster.clone(),
                status,
            })
        }),
    };
    let problem = match route.validate() {
        Err(e) => Some(NoRoute::InvalidRoute {
            topic: route.topic.clone(),
            reason: e.to_string(),
        }),
        Ok(()) => problem,
    };
    let problem = problem.or_else(|| {
        (route.partitions == 0).then(|| NoRoute::InvalidWriteSet {
            topic: route.topic.clone(),
            epoch: open.map_or(0, |e| e.n),
            reason: "the route has 0 partitions".into(),
        })
    });
    View {
        exists: true,
        partitions: route.partitions,
        open: open.map(ev),
        pending: route.pending_epoch().map(|e| e.n),
        pending_clusters: route
            .pending_epoch()
            .map(|e| {
                e.clusters()
                    .filter(|c| {
                        snapshot
                            .cluster(c)
                            .is_some_and(|s| s.state == ClusterState::Active)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default(),
        problem,
    }
}

impl Router {
    /// A router that knows no topic yet (everything is `NoRoute` until the first snapshot).
    pub fn new() -> Self {
        Self::default()
    }

    /// A router whose adapter reports settlement as `settlement` says.
    pub fn with_settlement(settlement: Settlement) -> Self {
        Router {
            settlement,
            ..Self::default()
        }
    }

    /// How this router expects records to be reported settled.
    pub fn settlement(&self) -> Settlement {
        self.settlement
    }

    /// Routes one record of `topic`. `key: None` is a keyless record: spread
    /// over the write set by weight and round-robin over partitions, using a
    /// per-topic counter. Counts a `Send` as in flight (see [`Router::on_settled`]).
    #[inline]
    pub fn route(&mut self, topic: &str, key: Option<&[u8]>) -> Decision {
        let Some(t) = self.topics.get_mut(topic) else {
            return Decision::NoRoute(NoRoute::UnknownTopic {
                topic: topic.to_string(),
            });
        };
        if t.held {
            return Decision::Hold;
        }
        if let Some(p) = &t.view.problem {
            return Decision::NoRoute(p.clone());
        }
        if !t.view.exists {
            return Decision::NoRoute(NoRoute::UnknownTopic {
                topic: topic.to_string(),
            });
        }
        let Some(a) = t.active.as_mut() else {
            return Decision::NoRoute(NoRoute::NoOpenEpoch {
                topic: topic.to_string(),
            });
        };
        let (hash, partition) = match key {
            Some(k) => {
                let m = murmur2_u32(k);
                (
                    key_hash_from_murmur2(m),
                    partition_for_hash(m, t.view.partitions),
                )
            }
            None => {
                let s = t.keyless_seq;
                t.keyless_seq = s.wrapping_add(1);
                (
                    key_hash_from_sequence(s),
                    (s % u64::from(t.view.partitions)) as u32,
                )
            }
        };
        let cluster = a.table.cluster(a.table.pick(hash)).clone();
        a.inflight += 1;
        if a.flush_requested {
            a.sent_since_flush += 1;
        }
        Decision::Send {
            cluster,
            partition,
            epoch: a.n,
        }
    }

    /// Takes in a new registry snapshot; returns what to do, `Open`s first and `Close`s last.
    pub fn on_snapshot(&mut self, snapshot: &FleetSnapshot) -> Vec<Action> {
        let mut out = Vec::new();
        for (topic, route) in &snapshot.routes {
            let t = self.topics.entry(topic.clone()).or_default();
            t.view = view_of(route, snapshot);
        }
        for (topic, t) in self.topics.iter_mut() {
            if !snapshot.routes.contains_key(topic) {
                t.view = View::default();
            }
        }
        for (topic, t) in self.topics.iter_mut() {
            t.reconcile(topic, &mut out);
        }
        self.topics.retain(|_, t| {
            t.view.exists
                || t.held
                || t.active.as_ref().is_some_and(|a| a.inflight > 0)
                || !t.older.is_empty()
        });
        self.finish(out)
    }

    /// One record sent with `epoch` has settled (delivered, failed, or never
    /// produced). Returns actions when that completes a flush.
    /// Ignored under [`Settlement::PerFlush`].
    pub fn on_settled(&mut self, topic: &str, epoch: u64) -> Vec<Action> {
        self.on_settled_many(topic, epoch, 1)
    }

    /// `n` records sent with `epoch` have settled: the same as `n` calls of
    /// [`Router::on_settled`], in one (an adapter that collects settlements
    /// reports them in bulk without a call per record).
    pub fn on_settled_many(&mut self, topic: &str, epoch: u64, n: u64) -> Vec<Action> {
        if self.settlement == Settlement::PerFlush || n == 0 {
            return Vec::new();
        }
        let Some(t) = self.topics.get_mut(topic) else {
            return Vec::new();
        };
        let mut drained = false;
        match t.active.as_mut() {
            Some(a) if a.n == epoch => {
                a.inflight = a.inflight.saturating_sub(n);
                drained = a.inflight == 0 && (t.held || a.flush_requested);
                if a.inflight == 0 {
                    // Exact counts: an outstanding flush has nothing left to cover.
                    a.flush_requested = false;
                }
            }
            _ => {
                if let Some(o) = t.older.get_mut(&epoch) {
                    o.inflight = o.inflight.saturating_sub(n);
                    drained = o.inflight == 0;
                }
            }
        }
        if !drained {
            return Vec::new();
        }
        self.settle_topic(topic)
    }

    /// The answer to [`Action::Flush`] for `(topic, epoch)`: every record of
    /// that epoch routed *before the `Flush` was emitted* has settled.
    ///
    /// Under [`Settlement::PerFlush`] the records routed since the `Flush`
    /// stay counted; under [`Settlement::PerRecord`] the counts come from
    /// [`Router::on_settled`] alone: this only marks the hint answered once
    /// nothing of that epoch is in flight, and is a no-op (never a re-armed
    /// `Flush`) while records still are.
    /// Without an outstanding `Flush` for that epoch it does nothing.
    pub fn on_flushed(&mut self, topic: &str, epoch: u64) -> Vec<Action> {
        let per_flush = self.settlement == Settlement::PerFlush;
        let Some(t) = self.topics.get_mut(topic) else {
            return Vec::new();
        };
        let (inflight, requested, since) = match t.active.as_mut() {
            Some(a) if a.n == epoch => {
                (&mut a.inflight, &mut a.flush_requested, a.sent_since_flush)
            }
            _ => match t.older.get_mut(&epoch) {
                Some(o) => (&mut o.inflight, &mut o.flush_requested, o.sent_since_flush),
                None => return Vec::new(),
            },
        };
        if !*requested {
            return Vec::new();
        }
        if !per_flush && *inflight > 0 {
            // The per-record reports still owe settlements: clearing the
            // request here would make `reconcile` emit the same `Flush` again,
            // and an adapter answering it synchronously would spin (simulator
            // finding 4). `on_settled` clears it when the count reaches zero.
            return Vec::new();
        }
        *requested = false;
        if per_flush {
            *inflight = (*inflight).min(since);
        }
        self.settle_topic(topic)
    }

    fn settle_topic(&mut self, topic: &str) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(t) = self.topics.get_mut(topic) {
            t.reconcile(topic, &mut out);
            if !t.view.exists
                && !t.held
                && t.older.is_empty()
                && t.active.as_ref().is_none_or(|a| a.inflight == 0)
            {
                self.topics.remove(topic);
            }
        }
        self.finish(out)
    }

    /// Puts `Open`s in front of and `Close`s after the per-topic actions.
    fn finish(&mut self, topic_actions: Vec<Action>) -> Vec<Action> {
        let mut needed = BTreeSet::new();
        for t in self.topics.values() {
            t.clusters_needed(&mut needed);
        }
        let mut out = Vec::with_capacity(topic_actions.len());
        for c in &needed {
            if !self.open_clusters.contains(*c) {
                out.push(Action::Open(c.to_string()));
            }
        }
        out.extend(topic_actions);
        let closing: Vec<ClusterId> = self
            .open_clusters
            .iter()
            .filter(|c| !needed.contains(c.as_str()))
            .cloned()
            .collect();
        self.open_clusters = needed.into_iter().map(str::to_string).collect();
        out.extend(closing.into_iter().map(Action::Close));
        out
    }

    /// Topics currently held (a switch is under way), in name order.
    pub fn held_topics(&self) -> impl Iterator<Item = &str> {
        self.topics
            .iter()
            .filter(|(_, t)| t.held)
            .map(|(n, _)| n.as_str())
    }

    /// How many topics are held right now (for a gauge).
    pub fn held_topic_count(&self) -> usize {
        self.topics.values().filter(|t| t.held).count()
    }

    /// Whether the router must hear of each settlement of `(topic, epoch)`
    /// ([`Router::on_settled`]) as it happens. True while `topic` is held (a
    /// pending epoch waits for these records before its `Ack`) and for any
    /// epoch but the one routed with (an older epoch's last settlement lets
    /// the router release the topic and `Close` clusters). Otherwise nothing
    /// waits on those counts, so an adapter may report them in batches (e.g.
    /// before its next snapshot), as long as it reports each one.
    pub fn needs_prompt_settlements(&self, topic: &str, epoch: u64) -> bool {
        let held = self.topics.get(topic).is_some_and(|t| t.held);
        held || self.routing_epoch(topic) != Some(epoch)
    }

    /// The epoch `topic` is routed with (the open epoch last installed), if any.
    pub fn routing_epoch(&self, topic: &str) -> Option<u64> {
        self.topics.get(topic)?.active.as_ref().map(|a| a.n)
    }

    /// The highest epoch this router has acknowledged per topic: what the
    /// adapter writes into the client record's `acked` map (e.g. when it
    /// registers again after losing its lease).
    pub fn acked(&self) -> BTreeMap<String, u64> {
        self.topics
            .iter()
            .filter(|(_, t)| t.acked > 0)
            .map(|(n, t)| (n.clone(), t.acked))
            .collect()
    }

    /// Records counted in flight for `(topic, epoch)`.
    pub fn in_flight(&self, topic: &str, epoch: u64) -> u64 {
        let Some(t) = self.topics.get(topic) else {
            return 0;
        };
        match &t.active {
            Some(a) if a.n == epoch => a.inflight,
            _ => t.older.get(&epoch).map_or(0, |o| o.inflight),
        }
    }

    /// Clusters the router currently wants a producer for.
    pub fn open_clusters(&self) -> impl Iterator<Item = &ClusterId> {
        self.open_clusters.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClusterState, Epoch, EpochState, FleetSnapshot};
    use crate::route::murmur2::partition_for_key;
    use crate::route::testutil::*;
    use proptest::prelude::*;
    use EpochState::*;

    #[test]
    fn settlements_are_needed_promptly_while_held_and_for_old_epochs() {
        let mut r = Router::new();
        let open1 = route("t", 4, vec![epoch(1, &["a"], Open)]);
        r.on_snapshot(&snapshot(&["a", "b"], vec![open1]));
        assert!(send_epoch(&r.route("t", Some(b"k"))).is_some());
        assert!(
            !r.needs_prompt_settlements("t", 1),
            "routing epoch, not held"
        );
        assert!(r.needs_prompt_settlements("t", 7), "not the routing epoch");
        let pending = route(
            "t",
            4,
            vec![epoch(1, &["a"], Open), epoch(2, &["b"], Pending)],
        );
        r.on_snapshot(&snapshot(&["a", "b"], vec![pending]));
        assert!(r.needs_prompt_settlements("t", 1), "held for the switch");
        let open2 = route(
            "t",
            4,
            vec![epoch(1, &["a"], Sealed), epoch(2, &["b"], Open)],
        );
        r.on_snapshot(&snapshot(&["a", "b"], vec![open2]));
        assert!(r.needs_prompt_settlements("t", 1), "old epoch");
        assert_eq!(r.routing_epoch("t"), Some(2));
        r.on_settled("t", 1);
        assert!(
            !r.needs_prompt_settlements("t", 2),
            "released, routing epoch"
        );
        assert!(r.needs_prompt_settlements("unknown", 1));
    }

    fn send_epoch(d: &Decision) -> Option<u64> {
        match d {
            Decision::Send { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    fn flush(t: &str, e: u64) -> Action {
        Action::Flush {
            topic: t.into(),
            epoch: e,
        }
    }
    fn ack(t: &str, e: u64) -> Action {
        Action::Ack {
            topic: t.into(),
            epoch: e,
        }
    }
    fn release(t: &str, e: u64) -> Action {
        Action::Release {
            topic: t.into(),
            epoch: e,
        }
    }

    #[test]
    fn unknown_topic_is_no_route_naming_it() {
        let mut r = Router::new();
        match r.route("nope", Some(b"k")) {
            Decision::NoRoute(e) => assert!(e.to_string().contains("nope"), "{e}"),
            d => panic!("{d:?}"),
        }
        r.on_snapshot(&snapshot(
            &["a"],
            vec![route("t", 4, vec![epoch(1, &["a"], Open)])],
        ));
        assert!(matches!(
            r.route("nope", None),
            Decision::NoRoute(NoRoute::UnknownTopic { .. })
        ));
    }

    #[test]
    fn routes_with_the_open_epoch_and_opens_its_clusters() {
        let mut r = Router::new();
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 6, vec![epoch(1, &["a", "b"], Open)])],
        ));
        assert_eq!(
            acts,
            vec![Action::Open("a".into()), Action::Open("b".into())]
        );
        let table = RendezvousTable::new(&ws(&["a", "b"])).unwrap();
        for i in 0..50 {
            let key = format!("key{i}");
            match r.route("t", Some(key.as_bytes())) {
                Decision::Send {
                    cluster,
                    partition,
                    epoch,
                } => {
                    assert_eq!(epoch, 1);
                    assert_eq!(partition, partition_for_key(key.as_bytes(), 6));
                    assert_eq!(&cluster, table.cluster_for_key(key.as_bytes()));
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(r.in_flight("t", 1), 50);
        assert_eq!(r.routing_epoch("t"), Some(1));
        assert!(r.held_topics().next().is_none());
    }

    #[test]
    fn keyless_records_round_robin_partitions_and_spread_clusters() {
        let mut r = Router::new();
        r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 3, vec![epoch(1, &["a", "b"], Open)])],
        ));
        let mut per_cluster = BTreeMap::new();
        for i in 0..3000u32 {
            match r.route("t", None) {
                Decision::Send {
                    cluster, partition, ..
                } => {
                    assert_eq!(partition, i % 3);
                    *per_cluster.entry(cluster.to_string()).or_insert(0u32) += 1;
                }
                d => panic!("{d:?}"),
            }
        }
        for (c, n) in &per_cluster {
            assert!((1350..=1650).contains(n), "{c}: {n}");
        }
    }

    #[test]
    fn unavailable_cluster_is_no_route_naming_it() {
        let mut r = Router::new();
        let mut snap = snapshot(
            &["a"],
            vec![route("t", 1, vec![epoch(1, &["a", "gone"], Open)])],
        );
        r.on_snapshot(&snap);
        match r.route("t", Some(b"k")) {
            Decision::NoRoute(e) => {
                let s = e.to_string();
                assert!(s.contains("gone") && s.contains("not registered"), "{s}");
            }
            d => panic!("{d:?}"),
        }
        snap.clusters
            .insert("gone".into(), spec("gone", ClusterState::Draining));
        r.on_snapshot(&snap);
        match r.route("t", None) {
            Decision::NoRoute(NoRoute::ClusterUnavailable {
                cluster,
                status,
                epoch,
                ..
            }) => {
                assert_eq!(
                    (cluster.as_str(), status, epoch),
                    ("gone", ClusterStatus::State(ClusterState::Draining), 1)
                );
            }
            d => panic!("{d:?}"),
        }
        snap.clusters
            .insert("gone".into(), spec("gone", ClusterState::Active));
        r.on_snapshot(&snap);
        assert_eq!(send_epoch(&r.route("t", None)), Some(1));
    }

    #[test]
    fn full_switch_hold_flush_ack_release() {
        let mut r = Router::with_settlement(Settlement::PerFlush);
        let e1 = epoch(1, &["a"], Open);
        r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 2, vec![e1.clone()])],
        ));
        assert_eq!(send_epoch(&r.route("t", Some(b"x"))), Some(1));
        assert_eq!(send_epoch(&r.route("t", Some(b"y"))), Some(1));
        // Epoch 2 pending: hold, warm up b, flush epoch 1; no ack yet.
        let pending = snapshot(
            &["a", "b"],
            vec![route("t", 2, vec![e1.clone(), epoch(2, &["b"], Pending)])],
        );
        let acts = r.on_snapshot(&pending);
        assert_eq!(acts, vec![Action::Open("b".into()), flush("t", 1)]);
        assert_eq!(r.route("t", Some(b"x")), Decision::Hold);
        assert_eq!(r.held_topics().collect::<Vec<_>>(), vec!["t"]);
        assert_eq!(r.held_topic_count(), 1);
        // The same snapshot again does not repeat the flush.
        assert!(r.on_snapshot(&pending).is_empty());
        // One record settles: still one in flight, nothing to do.
        assert!(r.on_settled("t", 1).is_empty());
        assert_eq!(r.on_flushed("t", 1), vec![ack("t", 2)]);
        assert_eq!(r.acked().get("t"), Some(&2));
        assert_eq!(r.route("t", None), Decision::Hold);
        // Sealed 1, open 2: release on 2 and close a.
        let mut sealed = e1.clone();
        sealed.state = Sealed;
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 2, vec![sealed, epoch(2, &["b"], Open)])],
        ));
        assert_eq!(acts, vec![release("t", 2), Action::Close("a".into())]);
        match r.route("t", Some(b"x")) {
            Decision::Send { cluster, epoch, .. } => assert_eq!((&*cluster, epoch), ("b", 2)),
            d => panic!("{d:?}"),
        }
        assert!(r.held_topics().next().is_none());
    }

    #[test]
    fn settled_records_alone_complete_the_flush() {
        let mut r = Router::new();
        r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 1, vec![epoch(1, &["a"], Open)])],
        ));
        r.route("t", None);
        r.route("t", None);
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![epoch(1, &["a"], Open), epoch(2, &["a", "b"], Pending)],
            )],
        ));
        assert!(acts.contains(&flush("t", 1)));
        assert!(r.on_settled("t", 1).is_empty());
        assert_eq!(r.on_settled("t", 1), vec![ack("t", 2)]);
        // Late duplicates are harmless.
        assert!(r.on_settled("t", 1).is_empty());
        assert_eq!(r.in_flight("t", 1), 0);
    }

    #[test]
    fn settlements_reported_in_bulk_count_like_single_ones() {
        let mut r = Router::new();
        r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 1, vec![epoch(1, &["a"], Open)])],
        ));
        for _ in 0..5 {
            r.route("t", None);
        }
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![epoch(1, &["a"], Open), epoch(2, &["a", "b"], Pending)],
            )],
        ));
        assert!(acts.contains(&flush("t", 1)));
        assert!(r.on_settled_many("t", 1, 0).is_empty());
        assert_eq!(r.in_flight("t", 1), 5);
        assert!(r.on_settled_many("t", 1, 4).is_empty());
        assert_eq!(r.in_flight("t", 1), 1);
        assert_eq!(r.on_settled_many("t", 1, 1), vec![ack("t", 2)]);
        assert_eq!(r.in_flight("t", 1), 0);
    }

    #[test]
    fn a_flush_answer_covers_only_records_sent_before_the_flush() {
        let mut r = Router::with_settlement(Settlement::PerFlush);
        let open = |extra: Option<Epoch>| {
            let mut es = vec![epoch(1, &["a"], Open)];
            es.extend(extra);
            snapshot(&["a", "b"], vec![route("t", 1, es)])
        };
        r.on_snapshot(&open(None));
        r.route("t", None);
        r.route("t", None);
        let acts = r.on_snapshot(&open(Some(epoch(2, &["b"], Pending))));
        assert!(acts.contains(&flush("t", 1)));
        // Aborted while the adapter is still flushing: released, one more record sent.
        let acts = r.on_snapshot(&open(Some(epoch(2, &["b"], Aborted))));
        assert!(acts.contains(&release("t", 1)));
        assert_eq!(send_epoch(&r.route("t", None)), Some(1));
        // A new switch: the old flush is still outstanding, so no second one yet.
        let mut es = vec![
            epoch(1, &["a"], Open),
            epoch(2, &["b"], Aborted),
            epoch(3, &["b"], Pending),
        ];
        let acts = r.on_snapshot(&snapshot(&["a", "b"], vec![route("t", 1, es.clone())]));
        assert_eq!(acts, vec![Action::Open("b".into())]);
        // The old answer does not cover the record sent after it was asked for.
        assert_eq!(r.on_flushed("t", 1), vec![flush("t", 1)]);
        assert_eq!(r.in_flight("t", 1), 1);
        assert_eq!(r.on_flushed("t", 1), vec![ack("t", 3)]);
        // An unsolicited answer changes nothing.
        es[2].state = Open;
        es[0].state = Sealed;
        assert!(r.on_flushed("t", 1).is_empty());
    }

    #[test]
    fn starting_while_pending_holds_and_acks_at_once() {
        let mut r = Router::new();
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![epoch(1, &["a"], Open), epoch(2, &["b"], Pending)],
            )],
        ));
        // Both the open epoch's cluster (used again on abort) and the pending one's.
        assert_eq!(
            acts,
            vec![
                Action::Open("a".into()),
                Action::Open("b".into()),
                ack("t", 2)
            ]
        );
        assert_eq!(r.route("t", None), Decision::Hold);
    }

    #[test]
    fn abort_releases_on_the_old_epoch() {
        let mut r = Router::with_settlement(Settlement::PerFlush);
        r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 1, vec![epoch(1, &["a"], Open)])],
        ));
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![epoch(1, &["a"], Open), epoch(2, &["b"], Pending)],
            )],
        ));
        assert_eq!(acts, vec![Action::Open("b".into()), ack("t", 2)]);
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![epoch(1, &["a"], Open), epoch(2, &["b"], Aborted)],
            )],
        ));
        assert_eq!(acts, vec![release("t", 1), Action::Close("b".into())]);
        assert_eq!(send_epoch(&r.route("t", None)), Some(1));
        // A later proposal needs a new ack.
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![
                    epoch(1, &["a"], Open),
                    epoch(2, &["b"], Aborted),
                    epoch(3, &["b"], Pending),
                ],
            )],
        ));
        assert_eq!(acts, vec![Action::Open("b".into()), flush("t", 1)]);
        assert_eq!(r.on_flushed("t", 1), vec![ack("t", 3)]);
    }

    #[test]
    fn sealed_without_our_ack_waits_for_the_flush_before_release() {
        let mut r = Router::new();
        r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route("t", 1, vec![epoch(1, &["a"], Open)])],
        ));
        r.route("t", None);
        // The pending state was coalesced away: we see 2 open directly.
        let acts = r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![epoch(1, &["a"], Sealed), epoch(2, &["b"], Open)],
            )],
        ));
        assert_eq!(acts, vec![Action::Open("b".into()), flush("t", 1)]);
        assert_eq!(r.route("t", None), Decision::Hold);
        assert_eq!(r.routing_epoch("t"), Some(2));
        // a stays open until its records settle.
        assert!(r.open_clusters().any(|c| c == "a"));
        assert_eq!(
            r.on_settled("t", 1),
            vec![release("t", 2), Action::Close("a".into())]
        );
        assert_eq!(send_epoch(&r.route("t", None)), Some(2));
    }

    #[test]
    fn invalid_route_is_no_route_with_the_reason() {
        let mut r = Router::new();
        r.on_snapshot(&snapshot(
            &["a", "b"],
            vec![route(
                "t",
                1,
                vec![epoch(1, &["a"], Open), epoch(2, &["b"], Open)],
            )],
        ));
        match r.route("t", None) {
            Decision::NoRoute(e @ NoRoute::InvalidRoute { .. }) => {
                assert!(e.to_string().contains("2 epochs are open"), "{e}")
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn removed_topic_becomes_unknown() {
        let mut r = Router::new();
        r.on_snapshot(&snapshot(
            &["a"],
            vec![route("t", 1, vec![epoch(1, &["a"], Open)])],
        ));
        let acts = r.on_snapshot(&snapshot(&["a"], vec![]));
        assert_eq!(acts, vec![Action::Close("a".into())]);
        assert!(matches!(
            r.route("t", None),
            Decision::NoRoute(NoRoute::UnknownTopic { .. })
        ));
    }

    // ---- model-based property test -------------------------------------------------

    const CLUSTERS: [&str; 4] = ["a", "b", "c", "d"];
    const TOPICS: [&str; 2] = ["t0", "t1"];

    #[derive(Debug, Clone)]
    enum Op {
        Propose {
            topic: usize,
            mask: u8,
        },
        Seal {
            topic: usize,
        },
        Abort {
            topic: usize,
        },
        Deliver,
        Route {
            topic: usize,
            key: Option<u8>,
        },
        Settle {
            pick: prop::sample::Index,
        },
        FlushAnswer {
            pick: prop::sample::Index,
        },
        /// Toggle a cluster between active and draining in the registry.
        Toggle {
            cluster: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..2usize, 1u8..16).prop_map(|(topic, mask)| Op::Propose { topic, mask }),
            1 => (0..2usize).prop_map(|topic| Op::Seal { topic }),
            1 => (0..2usize).prop_map(|topic| Op::Abort { topic }),
            2 => Just(Op::Deliver),
            5 => (0..2usize, proptest::option::of(any::<u8>())).prop_map(|(topic, key)| Op::Route { topic, key }),
            2 => any::<prop::sample::Index>().prop_map(|pick| Op::Settle { pick }),
            1 => any::<prop::sample::Index>().prop_map(|pick| Op::FlushAnswer { pick }),
            1 => (0..4usize).prop_map(|cluster| Op::Toggle { cluster }),
        ]
    }

    /// The adapter and the registry around a router, checking every output.
    struct Harness {
        router: Router,
        registry: BTreeMap<String, TopicRoute>,
        delivered: FleetSnapshot,
        /// (topic, epoch, cluster, id) of every Send not yet settled.
        inflight: Vec<(String, u64, String, usize)>,
        open: BTreeSet<String>,
        acked: BTreeMap<String, u64>,
        /// Outstanding flushes with the ids of the records they cover.
        flush_requests: Vec<(String, u64, Vec<usize>)>,
        sends: usize,
        draining: BTreeSet<String>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with(Settlement::PerRecord)
        }

        fn with(settlement: Settlement) -> Self {
            let registry = TOPICS
                .iter()
                .map(|t| (t.to_string(), route(t, 3, vec![epoch(1, &["a"], Open)])))
                .collect();
            let mut h = Harness {
                router: Router::with_settlement(settlement),
                registry,
                delivered: FleetSnapshot::default(),
                inflight: Vec::new(),
                open: BTreeSet::new(),
                acked: BTreeMap::new(),
                flush_requests: Vec::new(),
                sends: 0,
                draining: BTreeSet::new(),
            };
            h.deliver();
            h
        }

        fn registry_snapshot(&self) -> FleetSnapshot {
            let mut snap = snapshot(&CLUSTERS, self.registry.values().cloned().collect());
            for c in &self.draining {
                snap.clusters
                    .insert(c.clone(), spec(c, ClusterState::Draining));
            }
            snap
        }

        fn deliver(&mut self) {
            self.delivered = self.registry_snapshot();
            let snap = self.delivered.clone();
            let acts = self.router.on_snapshot(&snap);
            self.apply(acts);
        }

        fn view(&self, topic: &str) -> &TopicRoute {
            &self.delivered.routes[topic]
        }

        fn apply(&mut self, acts: Vec<Action>) {
            for a in acts {
                match a {
                    Action::Open(c) => {
                        assert!(
                            self.delivered
                                .cluster(&c)
                                .is_some_and(|s| s.state == ClusterState::Active),
                            "Open({c}) of a cluster that is not active"
                        );
                        assert!(self.open.insert(c.clone()), "Open({c}) twice");
                    }
                    Action::Close(c) => {
                        assert!(self.open.remove(&c), "Close({c}) of a cluster not open");
                        assert!(
                            !self.inflight.iter().any(|(_, _, ic, _)| *ic == c),
                            "Close({c}) with records in flight to it"
                        );
                    }
                    Action::Flush { topic, epoch } => {
                        let covered = self
                            .inflight
                            .iter()
                            .filter(|(t, e, _, _)| *t == topic && *e == epoch)
                            .map(|r| r.3)
                            .collect();
                        self.flush_requests.push((topic, epoch, covered));
                    }
                    Action::Ack { topic, epoch } => {
                        let v = self.view(&topic);
                        assert_eq!(
                            v.pending_epoch().map(|e| e.n),
                            Some(epoch),
                            "Ack {epoch} of {topic} that is not pending"
                        );
                        assert!(
                            !self
                                .inflight
                                .iter()
                                .any(|(t, e, _, _)| *t == topic && *e < epoch),
                            "Ack {topic}/{epoch} while older records are in flight"
                        );
                        assert!(
                            self.acked.get(&topic).is_none_or(|&a| a < epoch),
                            "ack went backwards"
                        );
                        self.acked.insert(topic, epoch);
                    }
                    Action::Release { topic, epoch } => {
                        assert!(
                            self.router.held_topics().all(|t| t != topic),
                            "released but held"
                        );
                        assert_eq!(self.router.routing_epoch(&topic), Some(epoch));
                        let v = self.view(&topic);
                        assert!(v.pending_epoch().is_none(), "release while pending");
                        assert_eq!(v.open_epoch().map(|e| e.n), Some(epoch));
                    }
                }
            }
        }

        fn route(&mut self, topic: &str, key: Option<u8>) -> Decision {
            let kb = key.map(|k| [k]);
            let d = self.router.route(topic, kb.as_ref().map(|k| &k[..]));
            let v = self.view(topic).clone();
            match &d {
                Decision::Send {
                    cluster,
                    partition,
                    epoch,
                } => {
                    let e = v.epoch(*epoch).expect("send with an unknown epoch");
                    assert_eq!(e.state, Open, "send with epoch {epoch} that is {}", e.state);
                    assert!(
                        v.pending_epoch().is_none(),
                        "send while a switch is pending"
                    );
                    if let Some(&a) = self.acked.get(topic) {
                        if *epoch < a {
                            assert_eq!(
                                v.epoch(a).map(|e| e.state),
                                Some(Aborted),
                                "send of epoch {epoch} after ack of {a}"
                            );
                        }
                    }
                    assert!(
                        e.writes_to(cluster),
                        "send to {cluster} outside the write set"
                    );
                    assert!(
                        self.open.contains(&**cluster),
                        "send to {cluster} that is not open"
                    );
                    assert!(*partition < v.partitions);
                    self.inflight.push((
                        topic.to_string(),
                        *epoch,
                        cluster.to_string(),
                        self.sends,
                    ));
                    self.sends += 1;
                }
                Decision::Hold => {
                    assert!(self.router.held_topics().any(|t| t == topic));
                }
                Decision::NoRoute(e) => {
                    let open = v.open_epoch().expect("an open epoch");
                    let blocked: Vec<&String> = open
                        .clusters()
                        .filter(|c| {
                            self.delivered
                                .cluster(c)
                                .is_none_or(|s| s.state != ClusterState::Active)
                        })
                        .collect();
                    assert!(!blocked.is_empty(), "unexpected NoRoute: {e}");
                    assert!(
                        blocked.iter().any(|c| e.to_string().contains(c.as_str())),
                        "{e} names no blocked cluster"
                    );
                }
            }
            if v.pending_epoch().is_some() {
                assert_eq!(d, Decision::Hold, "not held while pending");
            }
            d
        }

        /// A record settles; only a per-record adapter tells the router.
        fn settle_one(&mut self, i: usize) {
            let (t, e, _, _) = self.inflight.remove(i);
            if self.router.settlement() == Settlement::PerRecord {
                let acts = self.router.on_settled(&t, e);
                self.apply(acts);
            }
        }

        /// The adapter answers the `i`-th outstanding flush.
        fn answer_flush(&mut self, i: usize) {
            let (t, e, covered) = self.flush_requests.remove(i);
            // The flush settles what was in flight when it was asked for.
            while let Some(j) = self.inflight.iter().position(|r| covered.contains(&r.3)) {
                self.settle_one(j);
            }
            let acts = self.router.on_flushed(&t, e);
            self.apply(acts);
        }

        fn settle_all(&mut self) {
            while !self.inflight.is_empty() {
                self.settle_one(0);
            }
            while !self.flush_requests.is_empty() {
                self.answer_flush(0);
            }
        }

        fn step(&mut self, op: Op) {
            match op {
                Op::Propose { topic, mask } => {
                    let r = self.registry.get_mut(TOPICS[topic]).unwrap();
                    if r.pending_epoch().is_none() {
                        let write: Vec<&str> = CLUSTERS
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| mask & (1 << i) != 0)
                            .map(|(_, c)| *c)
                            .collect();
                        let n = r.last_epoch_n() + 1;
                        r.epochs.push(epoch(n, &write, Pending));
                    }
                }
                Op::Seal { topic } => {
                    let r = self.registry.get_mut(TOPICS[topic]).unwrap();
                    if r.pending_epoch().is_some() {
                        for e in r.epochs.iter_mut() {
                            match e.state {
                                Open => e.state = Sealed,
                                Pending => e.state = Open,
                                _ => {}
                            }
                        }
                    }
                }
                Op::Abort { topic } => {
                    let r = self.registry.get_mut(TOPICS[topic]).unwrap();
                    for e in r.epochs.iter_mut().filter(|e| e.state == Pending) {
                        e.state = Aborted;
                    }
                }
                Op::Deliver => self.deliver(),
                Op::Toggle { cluster } => {
                    let c = CLUSTERS[cluster].to_string();
                    if !self.draining.remove(&c) {
                        self.draining.insert(c);
                    }
                }
                Op::Route { topic, key } => {
                    self.route(TOPICS[topic], key);
                }
                Op::Settle { pick } => {
                    if !self.inflight.is_empty() {
                        let i = pick.index(self.inflight.len());
                        self.settle_one(i);
                    }
                }
                Op::FlushAnswer { pick } => {
                    if !self.flush_requests.is_empty() {
                        self.answer_flush(pick.index(self.flush_requests.len()));
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn handoff_invariants_hold_for_any_event_order(
            ops in proptest::collection::vec(op(), 1..80),
            seal in any::<bool>(),
            per_flush in any::<bool>(),
        ) {
            let mut h = Harness::with(if per_flush { Settlement::PerFlush } else { Settlement::PerRecord });
            for op in ops {
                h.step(op);
            }
            // Liveness 1: once everything settles, every pending epoch is acknowledged.
            h.deliver();
            h.settle_all();
            for t in TOPICS {
                if let Some(p) = h.registry[t].pending_epoch() {
                    prop_assert_eq!(h.acked.get(t), Some(&p.n), "pending {} of {} never acked", p.n, t);
                }
            }
            // Liveness 2: once switches resolve (and every cluster is active
            // again), holds end and sends use the open epoch.
            h.draining.clear();
            for (i, _) in TOPICS.iter().enumerate() {
                h.step(if seal { Op::Seal { topic: i } } else { Op::Abort { topic: i } });
            }
            h.deliver();
            h.settle_all();
            prop_assert_eq!(h.router.held_topic_count(), 0);
            for t in TOPICS {
                let open = h.registry[t].open_epoch().unwrap().n;
                let d = h.route(t, Some(7));
                prop_assert_eq!(send_epoch(&d), Some(open));
                if !per_flush {
                    prop_assert_eq!(h.router.in_flight(t, open), 1);
                }
            }
            // Open clusters are exactly what the routes need.
            h.settle_all();
            let need: BTreeSet<String> = h
                .registry
                .values()
                .flat_map(|r| r.open_epoch().unwrap().write.iter().map(|w| w.cluster.clone()))
                .collect();
            prop_assert_eq!(&h.open, &need);
            prop_assert_eq!(h.router.open_clusters().cloned().collect::<BTreeSet<_>>(), need);
        }
    }

    /// The harness itself must catch a router that sends while a switch is pending.
    #[test]
    #[should_panic(expected = "send while a switch is pending")]
    fn harness_catches_a_send_while_pending() {
        let mut h = Harness::new();
        h.step(Op::Propose { topic: 0, mask: 2 });
        // Deliver the pending epoch to the checker but not to the router.
        h.delivered = h.registry_snapshot();
        h.route("t0", Some(1));
    }
}
