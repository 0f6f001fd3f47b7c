//! The per-cluster committer: offset commits off the application's path.
//!
//! librdkafka's synchronous commit blocks until the group coordinator
//! answers, and with a cluster down that is the whole outage (or
//! `socket.timeout.ms`, then `WaitingForCoordinator`, then again). A member
//! calling it from its receive loop would read no other cluster meanwhile.
//! So every commit of a [`FleetConsumer`](super::FleetConsumer) goes through
//! one thread per cluster that owns the blocking call:
//!
//! - a request records the offset to commit per partition (a later request of
//!   a higher offset supersedes a pending one, so the backlog stays one offset
//!   per partition however long the outage);
//! - the thread commits what is pending, feeds the fence gate with what the
//!   cluster confirmed, and retries transient failures (coordinator or
//!   cluster away) until the cluster answers: an offset a fence needs is
//!   never dropped while this member owns its partition;
//! - a synchronous caller waits for the confirmation at most the configured
//!   commit timeout, and not at all while the cluster is already known to be
//!   unreachable (an attempt older than the timeout, or a transient failure
//!   being retried): it gets [`CommitWait::Pending`] and carries on.
//!
//! When a rebalance revokes partitions, the revoke callback has the thread
//! commit what is queued for them (and a requested commit of the stored
//! offsets) and waits for it, at most the commit timeout, before the revoke
//! completes ([`Committer::flush`]): the partitions' next owner starts after
//! them. What is still unconfirmed then is forgotten: committing an old
//! owner's offset late could move the group's position backwards. Closing
//! the consumer (or a cluster leaving the read set) drains the queue the same
//! way ([`Committer::drain`]) before the thread stops.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use super::context::FleetContext;
use super::fleet::Shared;
use crate::kafka::{classify, ErrorClass};
use crate::registry::ClusterId;

/// (topic, partition).
type Tp = (String, i32);

/// How long the thread waits before retrying a commit that failed transiently.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// The same while [`Committer::flush`] waits (a revoke or a close is held up).
const URGENT_RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// Why a synchronous commit returned without a confirmation.
#[derive(Debug)]
pub(crate) enum CommitWait {
    /// Not confirmed in time; still queued and retried in the background.
    Pending(Duration),
    /// The cluster refused the commit for good (e.g. the member lost its
    /// membership): the offset is dropped and the record may come again.
    Failed(RdKafkaError),
}

#[derive(Default)]
struct Inner {
    /// Offsets to commit, not yet handed to librdkafka.
    pending: BTreeMap<Tp, i64>,
    /// The offsets of the attempt running now.
    in_flight: BTreeMap<Tp, i64>,
    /// Partitions of the running attempt forgotten meanwhile
    /// ([`Committer::forget`]): if the attempt fails, they are not retried.
    forgotten: BTreeSet<Tp>,
    /// Highest offset the cluster confirmed per partition (this member's commits).
    confirmed: BTreeMap<Tp, i64>,
    /// Offsets whose commit failed for good, with the error.
    failed: BTreeMap<Tp, (i64, RdKafkaError)>,
    /// Requests to commit the stored offsets (`commit_consumer_state`): the
    /// number asked for, taken by the thread, and answered.
    state_asked: u64,
    state_taken: u64,
    state_done: u64,
    /// The error of the last state commit that failed for good.
    state_error: Option<(u64, RdKafkaError)>,
    /// When the running attempt started.
    in_flight_since: Option<Instant>,
    /// Since when commits have been failing transiently (retried) or a
    /// caller gave up waiting; cleared by an attempt that succeeds.
    failing_since: Option<Instant>,
    /// Callers waiting in [`Committer::flush`]: a failed attempt is retried
    /// at once, not after the backoff.
    urgent: usize,
    stop: bool,
}

/// One cluster's committer thread and its queue.
pub(crate) struct Committer {
    cluster: ClusterId,
    inner: Mutex<Inner>,
    cond: Condvar,
}

impl Committer {
    /// Starts the committer thread of `cluster`'s consumer. It holds the
    /// consumer until [`Committer::stop`] and its last attempt returned.
    pub(crate) fn start(
        cluster: ClusterId,
        consumer: Arc<StreamConsumer<FleetContext>>,
        shared: Weak<Shared>,
    ) -> Arc<Committer> {
        let me = Arc::new(Committer {
            cluster: cluster.clone(),
            inner: Mutex::new(Inner::default()),
            cond: Condvar::new(),
        });
        let this = me.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("flotilla-commit-{cluster}"))
            .spawn(move || this.run(&consumer, &shared));
        if let Err(e) = spawned {
            // Without a thread nothing would ever be committed: fail every
            // request at once rather than hang callers.
            tracing::error!(%cluster, error = %e, "cannot spawn the committer thread");
            me.lock().stop = true;
        }
        me
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the thread after its running attempt (what is still pending is
    /// dropped: [`Committer::drain`] first).
    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.cond.notify_all();
    }

    /// Forgets pending commits of partitions this member lost, including
    /// those of the attempt running now, should it fail: retried later, a
    /// commit of a partition another member now owns could move the group's
    /// offset back below what that member committed (the coordinator checks
    /// the member's generation, not who owns the partition).
    pub(crate) fn forget(&self, partitions: &[(String, i32)]) {
        let mut inner = self.lock();
        for tp in partitions {
            inner.pending.remove(tp);
            if inner.in_flight.contains_key(tp) {
                inner.forgotten.insert(tp.clone());
            }
        }
    }

    /// Offsets waiting to be committed (not yet confirmed), per partition.
    pub(crate) fn pending(&self) -> BTreeMap<Tp, i64> {
        self.lock().pending.clone()
    }

    /// Whether a commit of `partitions` (all if `None`) is queued or being
    /// sent, or a commit of the stored offsets was asked and is not done.
    fn busy(inner: &Inner, partitions: Option<&[Tp]>, state: u64) -> bool {
        if inner.state_done < state {
            return true;
        }
        match partitions {
            None => !inner.pending.is_empty() || !inner.in_flight.is_empty(),
            Some(ps) => ps
                .iter()
                .any(|tp| inner.pending.contains_key(tp) || inner.in_flight.contains_key(tp)),
        }
    }

    /// Whether this member has committed `tp` up to `next` or past it:
    /// queued, being sent, or confirmed.
    pub(crate) fn covers(&self, tp: &Tp, next: i64) -> bool {
        let inner = self.lock();
        [&inner.pending, &inner.in_flight, &inner.confirmed]
            .iter()
            .any(|m| m.get(tp).is_some_and(|o| *o >= next))
    }

    /// How many commits of the stored offsets were asked so far.
    pub(crate) fn state_asked(&self) -> u64 {
        self.lock().state_asked
    }

    /// Whether [`Committer::flush`] of `partitions` would wait (there is
    /// something to commit for them); false once stopped.
    pub(crate) fn has_work(&self, partitions: Option<&[Tp]>) -> bool {
        let inner = self.lock();
        !inner.stop && Self::busy(&inner, partitions, inner.state_asked)
    }

    /// Commits now what is queued or being sent for `partitions` (every
    /// partition if `None`), and the stored offsets if their commit was
    /// asked, and waits until the cluster answered (confirmed, or refused
    /// for good), at most `timeout` — also while the cluster is known to be
    /// unreachable (retrying at once rather than after the backoff). For a
    /// revoke (the partitions' next owner must start after what this member
    /// committed) and before the thread stops. `Pending` if time ran out
    /// (what is left is then up to the caller: forgotten on a revoke,
    /// dropped by `stop`).
    pub(crate) fn flush(
        &self,
        partitions: Option<&[Tp]>,
        timeout: Duration,
    ) -> Result<(), CommitWait> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut inner = self.lock();
        let state = inner.state_asked;
        inner.urgent += 1;
        self.cond.notify_all();
        let r = loop {
            if !Self::busy(&inner, partitions, state) {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline || inner.stop {
                break Err(CommitWait::Pending(now - started));
            }
            inner = self
                .cond
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        inner.urgent -= 1;
        r
    }

    /// [`Committer::flush`] of everything: what the application committed
    /// (or asked to commit) is committed before the consumer leaves its group.
    pub(crate) fn drain(&self, timeout: Duration) -> Result<(), CommitWait> {
        self.flush(None, timeout)
    }

    /// Whether the cluster is known to be unreachable for commits right now.
    fn stalled(inner: &Inner, timeout: Duration) -> bool {
        inner.failing_since.is_some()
            || inner.in_flight_since.is_some_and(|t| t.elapsed() > timeout)
    }

    /// Queues `offsets` ((topic, partition) → offset to commit). With `wait`,
    /// blocks until the cluster confirmed them, it refused them, or `wait`
    /// passed.
    pub(crate) fn commit(
        &self,
        offsets: &[(Tp, i64)],
        wait: Option<Duration>,
    ) -> Result<(), CommitWait> {
        let mut inner = self.lock();
        if inner.stop {
            return Err(CommitWait::Failed(RdKafkaError::ConsumerCommit(
                RDKafkaErrorCode::State,
            )));
        }
        for (tp, o) in offsets {
            inner.failed.remove(tp);
            let e = inner.pending.entry(tp.clone()).or_insert(*o);
            *e = (*e).max(*o);
        }
        self.cond.notify_all();
        let Some(timeout) = wait else {
            return Ok(());
        };
        self.wait_for(inner, timeout, |inner| {
            if offsets
                .iter()
                .all(|(tp, o)| inner.confirmed.get(tp).is_some_and(|c| c >= o))
            {
                return Some(Ok(()));
            }
            offsets
                .iter()
                .find_map(|(tp, o)| inner.failed.get(tp).filter(|(f, _)| f >= o))
                .map(|(_, e)| Err(CommitWait::Failed(e.clone())))
        })
    }

    /// Asks the thread to commit the consumer's stored offsets
    /// (`commit_consumer_state`); returns the ticket to wait for.
    pub(crate) fn ask_state(&self) -> u64 {
        let mut inner = self.lock();
        inner.state_asked += 1;
        self.cond.notify_all();
        inner.state_asked
    }

    /// Waits until the stored-offsets commit `ticket` is done, at most
    /// `timeout` (and not at all while the cluster is unreachable).
    pub(crate) fn wait_state(&self, ticket: u64, timeout: Duration) -> Result<(), CommitWait> {
        self.wait_for(self.lock(), timeout, |inner| {
            (inner.state_done >= ticket).then(|| match &inner.state_error {
                Some((n, e)) if *n >= ticket => Err(CommitWait::Failed(e.clone())),
                _ => Ok(()),
            })
        })
    }

    /// Waits until `outcome` gives an answer, at most `timeout` (and not at
    /// all while the cluster is unreachable): then `Pending`.
    fn wait_for(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        timeout: Duration,
        mut outcome: impl FnMut(&Inner) -> Option<Result<(), CommitWait>>,
    ) -> Result<(), CommitWait> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            if let Some(answer) = outcome(&inner) {
                return answer;
            }
            let now = Instant::now();
            if now >= deadline || Self::stalled(&inner, timeout) || inner.stop {
                // Until an attempt succeeds, the cluster counts as
                // unreachable: the next callers do not wait again (the
                // running attempt may have started a little after this
                // caller's clock, so its own age is not enough).
                inner.failing_since.get_or_insert(now);
                return Err(CommitWait::Pending(now - started));
            }
            inner = self
                .cond
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn run(&self, consumer: &StreamConsumer<FleetContext>, shared: &Weak<Shared>) {
        loop {
            let (batch, state) = {
                let mut inner = self.lock();
                while !inner.stop
                    && inner.pending.is_empty()
                    && inner.state_taken == inner.state_asked
                {
                    inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
                }
                if inner.stop {
                    return;
                }
                inner.in_flight_since = Some(Instant::now());
                let state = (inner.state_taken < inner.state_asked).then_some(inner.state_asked);
                inner.state_taken = inner.state_asked;
                let batch = std::mem::take(&mut inner.pending);
                inner.in_flight.clone_from(&batch);
                (batch, state)
            };
            let mut retry = false;
            let mut ok: Vec<(Tp, i64)> = Vec::new();
            let mut bad: Vec<(Tp, i64, RdKafkaError)> = Vec::new();
            if !batch.is_empty() {
                let mut tpl = TopicPartitionList::new();
                for ((t, p), o) in &batch {
                    let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
                }
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => {
                        for e in tpl.elements() {
                            let tp = (e.topic().to_string(), e.partition());
                            let Some(o) = batch.get(&tp).copied() else {
                                continue;
                            };
                            match e.error() {
                                Ok(()) => ok.push((tp, o)),
                                Err(err) => bad.push((tp, o, err)),
                            }
                        }
                    }
                    Err(err) => {
                        bad.extend(batch.iter().map(|(tp, o)| (tp.clone(), *o, err.clone())))
                    }
                }
            }
            // Feed the gate before waking the callers: when a synchronous
            // commit returns, records waiting for that fence are released.
            if let Some(shared) = shared.upgrade() {
                for ((t, p), o) in &ok {
                    if let Ok(p) = u32::try_from(*p) {
                        shared.on_committed(&self.cluster, t, p, *o);
                    }
                }
            }
            let state_result = state.map(|n| {
                let r = match consumer.commit_consumer_state(CommitMode::Sync) {
                    Err(RdKafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
                    r => r,
                };
                (n, r)
            });
            let mut inner = self.lock();
            inner.in_flight_since = None;
            inner.in_flight.clear();
            let forgotten = std::mem::take(&mut inner.forgotten);
            for (tp, o) in ok {
                let c = inner.confirmed.entry(tp).or_insert(o);
                *c = (*c).max(o);
            }
            for (tp, o, err) in bad {
                if forgotten.contains(&tp) {
                    tracing::debug!(cluster = %self.cluster, topic = %tp.0, partition = tp.1, offset = o, error = %err, "commit of a partition revoked meanwhile failed; not retried");
                } else if classify(&err) == ErrorClass::Transient {
                    // The cluster or its coordinator is away: keep the offset
                    // (unless a later request superseded it) and try again.
                    let e = inner.pending.entry(tp).or_insert(o);
                    *e = (*e).max(o);
                    retry = true;
                    tracing::debug!(cluster = %self.cluster, error = %err, "commit failed transiently; retrying");
                } else {
                    tracing::warn!(cluster = %self.cluster, topic = %tp.0, partition = tp.1, offset = o, error = %err, "commit refused; the record may be delivered again");
                    inner.failed.insert(tp, (o, err));
                }
            }
            match state_result {
                Some((_, Err(err))) if classify(&err) == ErrorClass::Transient => {
                    // Asked again: the next attempt commits the stored offsets.
                    inner.state_taken -= 1;
                    retry = true;
                }
                Some((n, r)) => {
                    inner.state_done = n;
                    if let Err(e) = r {
                        inner.state_error = Some((n, e));
                    }
                }
                None => {}
            }
            if retry {
                inner.failing_since.get_or_insert_with(Instant::now);
            } else {
                inner.failing_since = None;
            }
            self.cond.notify_all();
            if retry && !inner.stop {
                // Sooner while a revoke or a close waits for the commit.
                let backoff = if inner.urgent > 0 {
                    URGENT_RETRY_BACKOFF
                } else {
                    RETRY_BACKOFF
                };
                drop(
                    self.cond
                        .wait_timeout(inner, backoff)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
        }
    }
}
