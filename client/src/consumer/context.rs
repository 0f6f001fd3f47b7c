//! [`FleetContext`]: the rdkafka `ConsumerContext` of every per-cluster consumer.
//!
//! It forwards rebalances to the user's callback (with the cluster they
//! happened on); before a revoke completes it commits what the application
//! committed for the revoked partitions and is still queued (and a requested
//! commit of the stored offsets), and stores the offsets of delivered
//! records (which `enable.auto.commit` commits as the partitions go); it
//! drops records parked or ready for partitions this member loses, feeds the
//! fence gate with the offsets librdkafka commits by itself (automatic
//! commits; the committer feeds it with the others), and turns librdkafka's
//! errors and statistics into logs and metrics.
//!
//! Before that commit, a revoke waits (at most
//! [`revoke_wait`](super::FleetConsumerConfig::revoke_wait)) while the
//! application processes a record of a revoked partition — the last one
//! `recv` returned, until it calls `recv` again or commits past it — so what
//! it commits for that record goes with the partition too (the pump polls
//! concurrently with the application; Java's consumer gets this for free,
//! its revoke running inside `poll`). Not on the revoke of a close or of a
//! retired consumer, nor on a current-thread runtime (the wait would block
//! the thread the application's `recv` needs); on a multi-thread runtime it
//! runs in `block_in_place`, so the application's task, even one on the
//! pump's worker, moves to another thread.
//!
//! On an assignment it starts the partitions the group has no committed
//! offset for at [`Offset::Beginning`] rather than leaving them to
//! librdkafka's `auto.offset.reset` (see
//! [`FleetContext::start_from_beginning`]): librdkafka waits a hard-coded
//! 100 ms before that reset's offset lookup, paid on every new cluster a
//! switch adds to the read set and by every new group.
//!
//! The rebalance callbacks run on the thread polling the consumer: its pump
//! (a tokio task, inside `poll_next`), or the thread closing it (the revoke
//! of the close). The commit before a revoke is made by the committer
//! thread (whose synchronous commit does not need this poll); the callback
//! waits for it at most the commit timeout, holding no lock the committer
//! takes (the fleet consumer's state lock is never held while polling).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::{KafkaError as RdKafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::committer::Committer;
use super::config::{RebalanceEvent, RebalanceKind, RebalancePhase};
use super::fleet::{blocking, PendingStores, Shared};
use crate::registry::ClusterId;

/// The context of one per-cluster consumer of a [`FleetConsumer`](super::FleetConsumer).
pub struct FleetContext {
    cluster: ClusterId,
    shared: Weak<Shared>,
    /// The consumer left the read set (or the fleet consumer closes): its
    /// last callbacks (the revoke while it closes, which may come late: it
    /// closes once the application dropped its last record) must not touch
    /// the state of a newer consumer of the same cluster.
    retired: AtomicBool,
    /// This consumer's own offsets of delivered records not yet stored and
    /// its committer: they are this consumer's (not the fleet consumer's
    /// state), so its revokes reach them even once it is retired.
    stores: Arc<PendingStores>,
    committer: OnceLock<Arc<Committer>>,
    /// How long a revoke waits for the commits of the revoked partitions.
    commit_timeout: Duration,
}

impl std::fmt::Debug for FleetContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetContext")
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl FleetContext {
    pub(crate) fn new(
        cluster: ClusterId,
        shared: Weak<Shared>,
        stores: Arc<PendingStores>,
        commit_timeout: Duration,
    ) -> Self {
        FleetContext {
            cluster,
            shared,
            retired: AtomicBool::new(false),
            stores,
            committer: OnceLock::new(),
            commit_timeout,
        }
    }

    /// The offsets of delivered records not yet stored.
    pub(crate) fn stores(&self) -> &Arc<PendingStores> {
        &self.stores
    }

    /// Sets the consumer's committer (started once the consumer exists).
    pub(crate) fn set_committer(&self, committer: Arc<Committer>) {
        let _ = self.committer.set(committer);
    }

    /// Before `partitions` are revoked: commits what is queued for them (and
    /// a requested commit of the stored offsets), waiting at most the commit
    /// timeout, so their next owner starts after what this member committed.
    /// Not when the assignment was lost (the member is out of the group: the
    /// cluster would refuse, and the partitions may have moved on).
    fn commit_before_revoke(&self, base: &BaseConsumer<Self>, partitions: &[(String, i32)]) {
        let Some(committer) = self.committer.get() else {
            return;
        };
        if !committer.has_work(Some(partitions)) {
            return;
        }
        if base.assignment_lost() {
            tracing::debug!(cluster = %self.cluster, "assignment lost: queued commits of the revoked partitions are dropped");
            return;
        }
        // On a multi-thread runtime's worker (the pump), the other tasks move
        // to another thread meanwhile.
        let r = blocking(|| committer.flush(Some(partitions), self.commit_timeout));
        if let Err(w) = r {
            tracing::warn!(cluster = %self.cluster, outcome = ?w, "commits of revoked partitions not confirmed before the revoke; their records may be delivered again");
        }
    }

    /// Before `partitions` are revoked (and their queued commits made):
    /// if the application holds the record `recv` last returned and it is
    /// of one of them, waits until the application is done with it — it
    /// calls `recv` again or committed past it — at most the revoke wait.
    /// What it committed for that record is then queued, and
    /// [`FleetContext::commit_before_revoke`] commits it.
    fn wait_for_record_in_hand(
        &self,
        shared: &Shared,
        base: &BaseConsumer<Self>,
        partitions: &[(String, i32)],
    ) {
        let bound = shared.revoke_wait();
        // With automatic commits of automatic stores, the revoke commits
        // every delivered record, the one in hand too: nothing to wait for.
        if bound.is_zero() || (shared.auto_store && shared.auto_commit) {
            return;
        }
        let Some(hand) = shared.handout.in_hand(self.stores.id()) else {
            return;
        };
        let topic = hand.slot.and_then(|s| self.stores.topic_of(s));
        let revoked: Vec<(String, i32)> = partitions
            .iter()
            .filter(|(t, p)| *p == hand.partition && topic.as_ref().is_none_or(|x| x == t))
            .cloned()
            .collect();
        if revoked.is_empty() {
            return;
        }
        // On a current-thread runtime this thread is the one the
        // application's task needs to call `recv`: waiting would only delay
        // the revoke by the whole bound.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !multi_thread || base.assignment_lost() {
            return;
        }
        let committer = self.committer.get();
        let asked = committer.map(|c| c.state_asked());
        let next = hand.offset + 1;
        let done = || {
            self.retired.load(Ordering::Acquire)
                || committer.is_some_and(|c| {
                    revoked.iter().all(|tp| c.covers(tp, next))
                        // A commit of the stored offsets asked since: with
                        // automatic stores they include the record.
                        || (shared.auto_store && Some(c.state_asked()) > asked)
                })
        };
        tracing::debug!(cluster = %self.cluster, partition = hand.partition, offset = hand.offset, "revoke waits for the application to be done with a record of a revoked partition");
        // The pump's worker: its other tasks (the application's among them)
        // move to another thread meanwhile.
        let released = blocking(|| shared.handout.wait_released(hand.key, bound, done));
        if !released {
            tracing::warn!(cluster = %self.cluster, partition = hand.partition, offset = hand.offset, wait = ?bound, "the application still processes a record of a revoked partition after the revoke wait; the revoke completes, and the record may be delivered again");
        }
    }

    /// For an assignment of `tpl`: the list to assign instead, with
    /// [`Offset::Beginning`] for the partitions the group has no committed
    /// offset for; `None` to assign `tpl` as it is.
    ///
    /// librdkafka starts an assigned partition (offset INVALID) by fetching
    /// the group's committed offset; when there is none it applies
    /// `auto.offset.reset`, but only after a hard-coded 100 ms timer
    /// (`rd_kafka_offset_reset` → `rd_kafka_toppar_offset_request(.., 100)`
    /// for `__NO_OFFSET`), on every partition of every cluster a group
    /// starts reading. A partition assigned at `Beginning` starts at once
    /// (no committed-offset lookup, no timer), which is what the reset
    /// would do: `auto.offset.reset` is always `earliest` here
    /// ([`FleetConsumerConfig::set`](super::FleetConsumerConfig::set) owns
    /// it). So the committed offsets are read here first, and only the
    /// partitions that have none (and no error) start at `Beginning`; the
    /// others stay INVALID, librdkafka fetching their committed offset
    /// itself (with its leader epoch, and the committed offset its lag
    /// statistics use).
    ///
    /// Not when the committer still has commits of these partitions queued
    /// or in flight (the lookup could miss this member's own commit — a
    /// revoke's flush gave up on, say — where librdkafka's lookup waits for
    /// the commits it sends; its own commits of the partitions it
    /// unassigned, under `enable.auto.commit`, are answered before it
    /// rejoins), nor while the consumer closes (its group may
    /// be leaving: the lookup would wait for a coordinator). On any error
    /// or timeout, the assignment is left as it is: nothing is lost either
    /// way — `Beginning` is at or before any committed offset, at worst
    /// records are delivered again — only the 100 ms are not saved.
    ///
    /// Costs one round trip to the coordinator per assignment, a blocking
    /// one on the polling thread (the pump's worker: in `block_in_place`),
    /// bounded by the commit timeout and 2 s. A group that resumes from
    /// committed offsets pays it on top of librdkafka's own lookup.
    fn start_from_beginning(
        &self,
        base: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Option<TopicPartitionList> {
        if self.retired.load(Ordering::Acquire) || tpl.count() == 0 {
            return None;
        }
        // Offsets set by anyone but the group (none today) are kept.
        if tpl.elements().iter().all(|e| e.offset() != Offset::Invalid) {
            return None;
        }
        let partitions = pairs(tpl);
        if self
            .committer
            .get()
            .is_some_and(|c| c.has_work(Some(&partitions)))
        {
            tracing::debug!(cluster = %self.cluster, "commits of newly assigned partitions pending: librdkafka reads their committed offsets");
            return None;
        }
        let timeout = self.commit_timeout.min(LOOKUP_TIMEOUT);
        let committed = match blocking(|| base.committed_offsets(tpl.clone(), timeout)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(cluster = %self.cluster, error = %e, "cannot read the committed offsets of newly assigned partitions: librdkafka reads them");
                return None;
            }
        };
        let mut start = tpl.clone();
        let mut fresh = 0;
        for e in committed.elements() {
            if e.error().is_err() || e.offset() != Offset::Invalid {
                continue;
            }
            let assigned = tpl
                .find_partition(e.topic(), e.partition())
                .map(|a| a.offset());
            if assigned == Some(Offset::Invalid)
                && start
                    .set_partition_offset(e.topic(), e.partition(), Offset::Beginning)
                    .is_ok()
            {
                fresh += 1;
            }
        }
        tracing::debug!(cluster = %self.cluster, fresh, assigned = tpl.count(), "partitions without a committed offset start at the beginning");
        (fresh > 0).then_some(start)
    }

    /// Marks the consumer as closing: its callbacks no longer feed the fleet
    /// consumer's state (the user's rebalance callback still sees them), and
    /// a revoke waiting for the application's record stops waiting.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        if let Some(shared) = self.shared.upgrade() {
            shared.handout.wake();
        }
    }

    /// The fleet consumer's state, unless this consumer is retired.
    fn live_shared(&self) -> Option<std::sync::Arc<Shared>> {
        if self.retired.load(Ordering::Acquire) {
            return None;
        }
        self.shared.upgrade()
    }

    /// The registry id of the cluster this consumer reads.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    fn forward(&self, phase: RebalancePhase, rebalance: &Rebalance<'_>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let kind = match rebalance {
            Rebalance::Assign(tpl) => RebalanceKind::Assign(pairs(tpl)),
            Rebalance::Revoke(tpl) => RebalanceKind::Revoke(pairs(tpl)),
            Rebalance::Error(e) => RebalanceKind::Error(e.to_string()),
        };
        if phase == RebalancePhase::After && !self.retired.load(Ordering::Acquire) {
            match &kind {
                RebalanceKind::Assign(ps) => shared.on_assignment(&self.cluster, ps, true),
                RebalanceKind::Revoke(ps) => shared.on_assignment(&self.cluster, ps, false),
                RebalanceKind::Error(e) => {
                    tracing::warn!(cluster = %self.cluster, error = %e, "consumer group rebalance failed")
                }
            }
        }
        tracing::debug!(cluster = %self.cluster, ?phase, ?kind, "rebalance");
        if let Some(cb) = shared.rebalance_callback() {
            cb(&RebalanceEvent {
                cluster: self.cluster.clone(),
                phase,
                kind,
            });
        }
    }
}

/// The longest [`FleetContext::start_from_beginning`] waits for the
/// committed offsets (less if the commit timeout is shorter): past it,
/// librdkafka's own lookup and its 100 ms are the faster way.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

fn pairs(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for FleetContext {
    fn error(&self, error: RdKafkaError, reason: &str) {
        tracing::warn!(cluster = %self.cluster, %error, reason, "kafka client error");
        metrics::counter!("flotilla_consumer_errors_total", "cluster" => self.cluster.clone())
            .increment(1);
        if let Some(shared) = self.live_shared() {
            shared.cluster_error(&self.cluster, format!("{error}: {reason}"));
        }
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(
                    "flotilla_consumer_lag",
                    "cluster" => self.cluster.clone(),
                    "topic" => topic.clone(),
                    "partition" => p.to_string()
                )
                .set(part.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for FleetContext {
    /// rdkafka's default rebalance (`pre_rebalance`, the (incremental)
    /// assign or unassign, `post_rebalance`), except that an assignment
    /// starts the partitions without a committed offset at the beginning
    /// (`FleetContext::start_from_beginning`), and that a failed assign
    /// or unassign is logged.
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let tpl = &*tpl;
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            _ => Rebalance::Error(RdKafkaError::Rebalance(RDKafkaErrorCode::from(err))),
        };
        self.pre_rebalance(base, &rebalance);
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let r = match &rebalance {
            Rebalance::Assign(tpl) => {
                let start = self.start_from_beginning(base, tpl);
                let tpl = start.as_ref().unwrap_or(tpl);
                if cooperative {
                    base.incremental_assign(tpl)
                } else {
                    base.assign(tpl)
                }
            }
            // A revoke, or a rebalance error: as rdkafka's default, the
            // partitions (all of them, eager) are unassigned.
            _ if cooperative => base.incremental_unassign(tpl),
            _ => base.unassign(),
        };
        if let Err(e) = r {
            tracing::warn!(cluster = %self.cluster, error = %e, ?rebalance, "cannot apply a rebalance's assignment");
        }
        self.post_rebalance(base, &rebalance);
    }

    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Rebalance::Revoke(tpl), Some(shared)) = (rebalance, self.live_shared()) {
            // No more records of the revoked partitions for the application
            // (while the revoke waits for its commits, it would process and
            // commit more, the last ones too late).
            shared.on_revoking(&self.cluster, &pairs(tpl));
        }
        // The user's callback: what it commits or stores for the revoked
        // partitions goes with them.
        self.forward(RebalancePhase::Before, rebalance);
        if let (Rebalance::Revoke(tpl), Some(shared)) = (rebalance, self.live_shared()) {
            // The application's record of a revoked partition: its commit
            // goes with the partition too. After the user's callback, which
            // may have committed it already.
            self.wait_for_record_in_hand(&shared, base, &pairs(tpl));
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            // What the application committed (queued on the committer) is
            // committed before the revoke completes. Then the offsets of
            // delivered records, handed to librdkafka in batches, are stored:
            // with auto-commit librdkafka commits what is stored as the
            // partitions go (on a rebalance and on close), so their next
            // owner does not read them again. Without it nothing commits
            // them (commit after processing). Stored after the commit, so a
            // pending `commit()` of the stored offsets does not also take
            // the records delivered since the last batch (not processed yet).
            self.commit_before_revoke(base, &pairs(tpl));
            if let Some(tpl) = self.stores.take() {
                if let Err(e) = base.store_offsets(&tpl) {
                    tracing::debug!(cluster = %self.cluster, error = %e, "cannot store offsets before a revoke");
                }
            }
        }
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // librdkafka keeps an application pause across a revoke and a
            // later re-assignment; a partition the gate paused before it was
            // revoked must not stay paused now that nothing is parked for it.
            if let Err(e) = base.resume(tpl) {
                tracing::warn!(cluster = %self.cluster, error = %e, "cannot resume newly assigned partitions");
            }
        }
        self.forward(RebalancePhase::After, rebalance);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if let Err(e) = result {
            tracing::debug!(cluster = %self.cluster, error = %e, "offset commit failed");
            return;
        }
        for e in offsets.elements() {
            if let (Offset::Offset(o), true) = (e.offset(), e.error().is_ok()) {
                if let Ok(p) = u32::try_from(e.partition()) {
                    shared.on_committed(&self.cluster, e.topic(), p, o);
                }
            }
        }
    }
}
