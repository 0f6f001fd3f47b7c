//! The controller: a level-triggered reconcile loop with leader election.
//!
//! Operators write *intents* (a pending epoch, a draining cluster, an expiry);
//! [`Controller::reconcile_once`] looks at the whole fleet and takes each
//! intent one step further. Because it only looks at state, never at what it
//! did before, a controller that restarts — or a new leader replacing a dead
//! one — finishes whatever was half done. The decisions themselves (when a
//! switch may seal, what the new route looks like, whether a cluster may
//! retire) are the pure functions of [`flotilla_client::route::switch`]; this
//! module only reads the inputs they need and writes their results.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_client::registry::{
    ClusterState, Expect, FleetSnapshot, FleetWatcher, Guard, KvStore, LeaseId, RegistryError,
    Revision, UnixMillis, WatcherOptions,
};
use flotilla_client::route::switch::{self, LateSeals, OnAckDeadline, SwitchStep};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::ControlError;
use crate::ops::{ControlPlane, FenceOutcome};

/// Milliseconds since the Unix epoch, read from the system clock (adapters only).
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What one reconcile pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Switches completed: (topic, new open epoch).
    pub sealed: Vec<(String, u64)>,
    /// Switches abandoned: (topic, aborted epoch, reason).
    pub aborted: Vec<(String, u64, String)>,
    /// Switches still waiting for producers: (topic, pending epoch, missing client ids).
    pub waiting: Vec<(String, u64, Vec<String>)>,
    /// Temporary clusters moved to draining because they expired.
    pub drained: Vec<String>,
    /// Draining clusters whose writes were fenced in this pass: (cluster,
    /// topics). Their drained check follows on a later pass.
    pub fenced: Vec<(String, Vec<String>)>,
    /// Clusters retired.
    pub retired: Vec<String>,
    /// Clusters that would retire but something still needs them: (cluster, why).
    pub blocked: Vec<(String, String)>,
    /// Errors met on the way (the pass carries on with the other items).
    pub errors: Vec<String>,
}

impl ReconcileReport {
    /// Whether no switch is left pending.
    pub fn switches_done(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// Reconciles route switches and the cluster lifecycle.
///
/// Clones share the ack-wait clocks (see [`Controller::reconcile_once`]).
#[derive(Clone)]
pub struct Controller {
    cp: ControlPlane,
    policy: OnAckDeadline,
    /// When this controller first saw each pending epoch, (topic, epoch) →
    /// instant on the monotonic clock. The ack wait is measured from here.
    first_seen: Arc<Mutex<HashMap<(String, u64), tokio::time::Instant>>>,
    /// Switches this controller sealed without some producers' acks (the pure
    /// rule is [`LateSeals`]); times in ms since `origin` on the monotonic clock.
    late: Arc<Mutex<LateSeals>>,
    origin: tokio::time::Instant,
    late_grace: Duration,
}

/// Default of [`Controller::with_late_grace`]: librdkafka's default
/// `message.timeout.ms` (300 s), after which a late producer's records have
/// either landed or failed.
pub const DEFAULT_LATE_GRACE: Duration = Duration::from_secs(300);

impl Controller {
    /// A controller acting through `cp`; at an ack deadline it proceeds (see [`OnAckDeadline`]).
    pub fn new(cp: ControlPlane) -> Self {
        Controller {
            cp,
            policy: OnAckDeadline::default(),
            first_seen: Arc::default(),
            late: Arc::default(),
            origin: tokio::time::Instant::now(),
            late_grace: DEFAULT_LATE_GRACE,
        }
    }

    /// What to do when producers miss a switch's ack deadline.
    pub fn with_policy(mut self, policy: OnAckDeadline) -> Self {
        self.policy = policy;
        self
    }

    /// How long, at most, a cluster of an epoch sealed without some
    /// producers' acks stays un-retirable while those producers are alive and
    /// have not acknowledged a later epoch: their records queued for it (e.g.
    /// while it was down) may still land — acknowledged — above the fence.
    /// Set it to the producers' `message.timeout.ms` (default
    /// [`DEFAULT_LATE_GRACE`]). Only this controller's own late seals are
    /// remembered: a new leader does not know its predecessor's.
    pub fn with_late_grace(mut self, grace: Duration) -> Self {
        self.late_grace = grace;
        self
    }

    /// The same controller (sharing its ack-wait clocks and late seals) whose
    /// every registry write also requires `guard` to hold, in the same etcd
    /// transaction ([`flotilla_client::registry::Registry::guarded`]).
    /// [`run_elected`] guards each term with its leader key, so a controller
    /// that lost its leadership has its writes refused
    /// ([`RegistryError::GuardFailed`], reported in the pass's `errors`).
    /// Kafka-side actions (the write fence) are not guarded; they are
    /// idempotent and only ever taken on clusters already draining.
    pub fn guarded(&self, guard: Guard) -> Controller {
        let mut c = self.clone();
        c.cp = ControlPlane::new(self.cp.registry().guarded(guard), self.cp.kafka().clone());
        c
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// One pass over the whole fleet at `now`. Errors on single items are
    /// collected in the report; only a failure to read the registry fails the pass.
    ///
    /// `now` is the wall clock, used for cluster expiry. The ack deadline of a
    /// pending epoch is *not* checked against it: the deadline was written
    /// with the proposer's clock, and a controller whose clock is ahead (or
    /// that was cut from the registry for longer than the ack timeout) would
    /// find every deadline already passed and seal at once, without any
    /// acknowledgement. Instead the wait is measured on this controller's
    /// monotonic clock from the pass that first saw the pending epoch (see
    /// `Controller::ack_clock`); a pass that cannot read the registry forgets
    /// those times, so the wait restarts after a registry outage, and a new
    /// leader (or a one-shot `flotilla reconcile`) starts its own wait. Both
    /// only ever wait longer than the proposer asked, never shorter.
    pub async fn reconcile_once(&self, now: UnixMillis) -> Result<ReconcileReport, ControlError> {
        let snap = match self.cp.registry().snapshot().await {
            Ok(snap) => snap,
            Err(e) => {
                self.forget_ack_waits();
                return Err(e.into());
            }
        };
        let mut report = ReconcileReport::default();
        self.reconcile_switches(&snap, &mut report).await;
        // Retirement reads the routes: look at them as they are after the switches.
        let snap = match self.cp.registry().snapshot().await {
            Ok(snap) => snap,
            Err(e) => {
                self.forget_ack_waits();
                return Err(e.into());
            }
        };
        self.reconcile_clusters(&snap, now, &mut report).await;
        metrics::counter!("flotilla_controller_reconciles_total").increment(1);
        Ok(report)
    }

    /// Forgets when pending epochs were first seen: the next pass that reads
    /// the registry starts every ack wait afresh.
    fn forget_ack_waits(&self) {
        self.first_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The `now` to give [`switch::plan`] for every pending epoch of `snap`:
    /// the epoch's `created_at` plus how long *this controller* has seen it
    /// pending, on the monotonic clock. `plan` compares it with
    /// `ack_deadline = created_at + ack timeout` (both the proposer's clock),
    /// so the deadline passes exactly when this controller has waited the
    /// full ack timeout itself, whatever the skew between the two clocks.
    /// Epochs no longer pending are forgotten.
    fn ack_clock(&self, snap: &FleetSnapshot) -> HashMap<(String, u64), UnixMillis> {
        let now = tokio::time::Instant::now();
        let mut seen = self.first_seen.lock().unwrap_or_else(|p| p.into_inner());
        let pending: HashMap<(String, u64), UnixMillis> = snap
            .routes
            .values()
            .filter_map(|r| {
                r.pending_epoch()
                    .map(|e| ((r.topic.clone(), e.n), e.created_at))
            })
            .collect();
        seen.retain(|k, _| pending.contains_key(k));
        pending
            .into_iter()
            .map(|(k, created_at)| {
                let first = *seen.entry(k.clone()).or_insert(now);
                let waited = now.saturating_duration_since(first).as_millis() as u64;
                (k, created_at.saturating_add(waited))
            })
            .collect()
    }

    async fn reconcile_switches(&self, snap: &FleetSnapshot, report: &mut ReconcileReport) {
        let clock = self.ack_clock(snap);
        for route in snap.routes.values() {
            let Some(pending) = route.pending_epoch() else {
                continue;
            };
            let n = pending.n;
            let now = clock
                .get(&(route.topic.clone(), n))
                .copied()
                .unwrap_or(pending.created_at);
            match switch::plan(route, snap.producers(), now, self.policy) {
                SwitchStep::Idle => {}
                SwitchStep::WaitForAcks { missing, .. } => {
                    report.waiting.push((route.topic.clone(), n, missing));
                }
                SwitchStep::ReadBoundary { clusters, late, .. } => {
                    if !late.is_empty() {
                        tracing::warn!(topic = %route.topic, epoch = n, producers = ?late, "ack deadline passed; sealing without them (expect stragglers)");
                    }
                    match self.seal(snap, &route.topic, n, &clusters).await {
                        Ok(()) => {
                            if !late.is_empty() {
                                self.late.lock().unwrap_or_else(|p| p.into_inner()).record(
                                    &route.topic,
                                    n - 1,
                                    n,
                                    late.clone(),
                                    self.monotonic_ms(),
                                );
                            }
                            metrics::counter!("flotilla_route_switches_total", "topic" => route.topic.clone())
                            .increment(1);
                            report.sealed.push((route.topic.clone(), n));
                        }
                        Err(e) => {
                            report.waiting.push((route.topic.clone(), n, vec![]));
                            report.errors.push(format!(
                                "sealing {} epoch {}: {e}",
                                route.topic,
                                n - 1
                            ));
                        }
                    }
                }
                SwitchStep::Abort { reason, .. } => {
                    let topic = route.topic.clone();
                    let r = self
                        .cp
                        .registry()
                        .update_route(&topic, |cur| match cur {
                            Some(cur) if cur.pending_epoch().is_some_and(|p| p.n == n) => {
                                Ok(Some(switch::abort(cur, n)?))
                            }
                            _ => Ok(None),
                        })
                        .await;
                    match r {
                        Ok(_) => report.aborted.push((topic, n, reason)),
                        Err(e) => report
                            .errors
                            .push(format!("aborting {topic} epoch {n}: {e}")),
                    }
                }
            }
        }
    }

    /// Reads the boundary on every cluster of both epochs, then records it and
    /// flips the epochs in one compare-and-swap of the route.
    async fn seal(
        &self,
        snap: &FleetSnapshot,
        topic: &str,
        n: u64,
        clusters: &[String],
    ) -> Result<(), ControlError> {
        let route = snap
            .route(topic)
            .ok_or_else(|| ControlError::UnknownTopic(topic.into()))?;
        let specs = clusters
            .iter()
            .map(|id| {
                snap.cluster(id)
                    .ok_or_else(|| ControlError::UnknownCluster(id.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Every cluster at once: producers are held until the seal, so the
        // boundary read is part of the pause (one round trip per partition
        // per cluster; read one cluster after the other it added up).
        let ends = futures::future::join_all(
            specs
                .iter()
                .map(|spec| self.cp.kafka().end_offsets(spec, topic, route.partitions)),
        )
        .await;
        let mut boundary = std::collections::BTreeMap::new();
        for (id, ends) in clusters.iter().zip(ends) {
            boundary.insert(id.clone(), ends?);
        }
        self.cp
            .registry()
            .update_route(topic, |cur| match cur {
                // Someone (another leader, an operator) moved on: leave it to the next pass.
                Some(cur) if cur.pending_epoch().is_some_and(|p| p.n == n) => {
                    Ok(Some(switch::seal(cur, n, boundary.clone())?))
                }
                _ => Ok(None),
            })
            .await?;
        Ok(())
    }

    async fn reconcile_clusters(
        &self,
        snap: &FleetSnapshot,
        now: UnixMillis,
        report: &mut ReconcileReport,
    ) {
        for spec in snap.clusters.values() {
            let expired = spec.is_expired(now);
            if spec.state == ClusterState::Draining {
                if let Some(why) = self.late_writers(snap, &spec.id) {
                    report.blocked.push((spec.id.clone(), why));
                    continue;
                }
            }
            match spec.state {
                ClusterState::Provisioning | ClusterState::Active if expired => {
                    match self.cp.drain(&spec.id).await {
                        Ok(_) => report.drained.push(spec.id.clone()),
                        Err(e) => report
                            .blocked
                            .push((spec.id.clone(), format!("expired but not drained: {e}"))),
                    }
                }
                ClusterState::Draining => {
                    if !self.fence_writes(snap, spec, report).await {
                        continue;
                    }
                    match self.cp.check_retirable(snap, spec).await {
                        Ok(()) => match self
                            .cp
                            .registry()
                            .set_cluster_state(&spec.id, ClusterState::Retired)
                            .await
                        {
                            Ok(_) => report.retired.push(spec.id.clone()),
                            Err(e) => report.errors.push(format!("retiring {}: {e}", spec.id)),
                        },
                        Err(ControlError::Refused(why)) => {
                            report.blocked.push((spec.id.clone(), why))
                        }
                        Err(e) => report.errors.push(format!("checking {}: {e}", spec.id)),
                    }
                }
                _ => {}
            }
        }
    }

    /// The write fence before the drained check of a draining cluster
    /// (docs/handoff.md, "The write fence"): sets it on every topic the
    /// cluster held, or finds it in place. Only a fence found already in place
    /// lets the drained check run in this pass (`true`): one set just now
    /// gets until the next pass to reach every broker and to let produce
    /// requests validated before it finish, so the end offsets the check
    /// reads are final. Level-triggered: the fence lives in the topics'
    /// configs, so a new leader finds what its predecessor set.
    async fn fence_writes(
        &self,
        snap: &FleetSnapshot,
        spec: &flotilla_client::registry::ClusterSpec,
        report: &mut ReconcileReport,
    ) -> bool {
        match self.cp.fence_writes(snap, spec).await {
            Ok(FenceOutcome::InPlace) => true,
            Ok(FenceOutcome::SetNow { topics }) => {
                report.blocked.push((
                    spec.id.clone(),
                    format!(
                        "writes to {} fenced just now; the drained check follows on the next pass",
                        topics.join(", ")
                    ),
                ));
                report.fenced.push((spec.id.clone(), topics));
                false
            }
            Err(ControlError::Refused(why)) => {
                report.blocked.push((spec.id.clone(), why));
                false
            }
            Err(e) => {
                report
                    .errors
                    .push(format!("fencing writes to {}: {e}", spec.id));
                false
            }
        }
    }

    /// Why `cluster` must not retire yet because of a switch this controller
    /// sealed without some producers' acks (see [`Controller::with_late_grace`]).
    fn late_writers(&self, snap: &FleetSnapshot, cluster: &str) -> Option<String> {
        let now = self.monotonic_ms();
        let grace = self.late_grace.as_millis() as u64;
        self.late
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .blocking(snap, cluster, now, grace)
    }

    /// Milliseconds since this controller started, on the monotonic clock
    /// (immune to wall-clock jumps).
    fn monotonic_ms(&self) -> UnixMillis {
        self.origin.elapsed().as_millis() as u64
    }

    /// Reconciles until no switch is pending or `deadline` passes (the CLI's `--wait`).
    pub async fn reconcile_until_settled(
        &self,
        deadline: Duration,
        every: Duration,
    ) -> Result<ReconcileReport, ControlError> {
        let start = tokio::time::Instant::now();
        let mut total = ReconcileReport::default();
        loop {
            let r = self.reconcile_once(now_millis()).await?;
            let done = r.switches_done();
            total.sealed.extend(r.sealed);
            total.aborted.extend(r.aborted);
            total.drained.extend(r.drained);
            total.fenced.extend(r.fenced);
            total.retired.extend(r.retired);
            total.errors.extend(r.errors);
            total.blocked = r.blocked;
            total.waiting = r.waiting;
            if done || start.elapsed() >= deadline {
                return Ok(total);
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Options of [`run_elected`].
#[derive(Debug, Clone)]
pub struct ElectionOptions {
    /// This instance's name, stored in the leader key.
    pub id: String,
    /// Leader lease TTL: a dead leader is replaced after about this long.
    pub lease_ttl: Duration,
    /// Reconcile at least this often while leading (the backstop: a change
    /// in the registry triggers a pass at once, see [`run_elected`]).
    pub interval: Duration,
}

/// Leadership changes, for callers that want to observe them (tests, the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Not leading (waiting for the current leader's lease to end).
    Follower,
    /// Leading.
    Leader,
}

/// The leader key of the fleet.
fn leader_key(cp: &ControlPlane) -> String {
    format!("{}controller/leader", cp.registry().prefix())
}

/// Runs the controller under leader election until `shutdown` turns true.
///
/// Candidates race to create the leader key under their own lease; the winner
/// reconciles when the registry changes and at least every `interval`: it
/// watches the fleet prefix ([`FleetWatcher`]) and runs a pass
/// [`CHANGE_DEBOUNCE`] after any change of the fleet's clusters, routes,
/// client records (a producer's acknowledgement) or groups, so a switch seals
/// moments after its last acknowledgement; a burst of changes costs one pass,
/// changes during a pass trigger one more right after it, and passes never
/// overlap. The interval is the backstop (ack deadlines, expiry, Kafka-side
/// conditions such as a group's progress), counted from the end of the last
/// pass; without a watch (registry unreachable) the leader reconciles on the
/// interval alone and tries to watch again before each pass.
///
/// While it leads, a separate task (`keep_leading`) renews the lease every
/// `ttl/3`, independently of the reconcile pass, so a pass that waits on a
/// dead Kafka cluster longer than the TTL does not let the lease lapse. That task declares the leadership
/// lost when the lease is gone (expired, revoked), when the leader key no
/// longer is the one this term created, or when no renewal succeeded in time
/// to be sure the lease still runs (`ttl/4` before it could expire at
/// etcd); the pass under way is then dropped at once (it stops at its next
/// await) and the controller goes back to campaigning. Every registry write
/// of the term goes through a registry guarded by the leader key
/// ([`Controller::guarded`]), so even a stale leader that still acted would
/// have its writes refused. When a leader dies its lease expires and a
/// follower takes over within about one TTL. Registry outages are waited out.
pub async fn run_elected(
    controller: Controller,
    opts: ElectionOptions,
    leadership: watch::Sender<Leadership>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControlError> {
    let kv = controller.control_plane().registry().kv().clone();
    let key = leader_key(controller.control_plane());
    let renew_every = opts.lease_ttl / 3;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let term = match campaign(&*kv, &key, &opts).await {
            Ok(Some(term)) => term,
            Ok(None) | Err(_) => {
                // Someone else leads, or the registry is unreachable: try again shortly.
                tokio::select! {
                    _ = tokio::time::sleep(renew_every) => continue,
                    _ = shutdown.changed() => continue,
                }
            }
        };
        tracing::info!(id = %opts.id, "leading the fleet controller");
        metrics::gauge!("flotilla_controller_is_leader").set(1.0);
        let _ = leadership.send(Leadership::Leader);
        let (lost_tx, mut lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_leading(
            kv.clone(),
            key.clone(),
            term,
            opts.lease_ttl,
            lost_tx,
        ));
        let acting = controller.guarded(Guard {
            key: key.clone(),
            expect: Expect::ModRevision(term.revision),
        });
        let mut tick = tokio::time::interval(opts.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The registry watch that triggers a pass on a change (started before
        // the first pass, so no change after that pass's read is missed).
        let mut changes: Option<FleetChanges> = None;
        // `wait_for` also ends (Err) if the keeper is gone: lost either way.
        let stepped_down = 'term: loop {
            tokio::select! {
                biased;
                _ = lost.wait_for(|l| *l) => break 'term true,
                _ = shutdown.changed() => break 'term false,
                _ = tick.tick() => {}
                _ = FleetChanges::next(&mut changes) => {}
            }
            // The pass is dropped as soon as the leadership is lost.
            tokio::select! {
                biased;
                _ = lost.wait_for(|l| *l) => {
                    tracing::warn!("leadership lost during a reconcile pass; pass abandoned");
                    break 'term true;
                }
                _ = shutdown.changed() => break 'term false,
                r = async {
                    FleetChanges::ensure(&mut changes, controller.control_plane()).await;
                    if let Some(c) = &mut changes {
                        // Changes from here on trigger the next pass.
                        c.mark_seen();
                    }
                    acting.reconcile_once(now_millis()).await
                } => match r {
                    Ok(r) => {
                        for e in &r.errors { tracing::warn!("{e}"); }
                        for (t, n) in &r.sealed { tracing::info!(topic = %t, epoch = n, "switch completed"); }
                        for c in &r.retired { tracing::info!(cluster = %c, "cluster retired"); }
                    }
                    Err(e) => tracing::warn!(error = %e, "reconcile failed"),
                },
            }
            // The interval is a backstop: counted from the end of the last pass.
            tick.reset();
        };
        drop(changes);
        keeper.abort();
        metrics::gauge!("flotilla_controller_is_leader").set(0.0);
        let _ = leadership.send(Leadership::Follower);
        // Clean shutdown: hand over at once instead of after the TTL. After a
        // lost leadership: drop what may be left of the lease (best effort).
        let _ = kv.revoke(term.lease).await;
        if !stepped_down {
            return Ok(());
        }
        tracing::warn!(id = %opts.id, "stepped down as fleet controller leader");
    }
}

/// How long the leader waits after a registry change before its pass, so
/// that a burst of changes (every producer acknowledging a switch within a
/// few milliseconds) costs one pass.
pub const CHANGE_DEBOUNCE: Duration = Duration::from_millis(5);

/// How long the leader tries to read the first snapshot of its registry
/// watch before a pass; when it cannot, the pass runs anyway (on the
/// interval alone) and the next pass tries again.
const WATCH_START_TIMEOUT: Duration = Duration::from_secs(1);

/// The leader's trigger for a reconcile pass on a registry change: a
/// [`FleetWatcher`] of the fleet prefix and the part of its snapshot the last
/// pass started from. Only a change of the fleet's contents (clusters,
/// routes, client records, groups) counts: the leader key and keys this
/// version does not know do not.
struct FleetChanges {
    watcher: FleetWatcher,
    rx: watch::Receiver<Arc<FleetSnapshot>>,
    seen: Arc<FleetSnapshot>,
}

impl FleetChanges {
    /// Starts the watch if it is not running; on failure (the registry is
    /// unreachable) leaves `slot` empty and logs.
    async fn ensure(slot: &mut Option<FleetChanges>, cp: &ControlPlane) {
        if slot.is_some() {
            return;
        }
        let opts = WatcherOptions {
            start_timeout: WATCH_START_TIMEOUT,
            ..WatcherOptions::default()
        };
        match FleetWatcher::start(cp.registry().clone(), opts).await {
            Ok(watcher) => {
                let rx = watcher.subscribe();
                let seen = watcher.snapshot();
                *slot = Some(FleetChanges { watcher, rx, seen });
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot watch the registry; reconciling on the interval only until it can"
            ),
        }
    }

    /// Remembers the current snapshot as the one the next pass starts from.
    fn mark_seen(&mut self) {
        self.seen = self.watcher.snapshot();
        self.rx.borrow_and_update();
    }

    /// Waits until the fleet differs from what the last pass started from,
    /// then [`CHANGE_DEBOUNCE`]; never returns while there is no watch.
    /// Cancel-safe: it only reads the watch.
    async fn next(slot: &mut Option<FleetChanges>) {
        let Some(c) = slot else {
            return std::future::pending().await;
        };
        loop {
            let cur = c.rx.borrow_and_update().clone();
            if !same_fleet(&cur, &c.seen) {
                break;
            }
            if c.rx.changed().await.is_err() {
                // The watcher is gone (cannot happen while `c` holds it).
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(CHANGE_DEBOUNCE).await;
    }
}

/// Whether two snapshots hold the same fleet (their revisions aside).
fn same_fleet(a: &FleetSnapshot, b: &FleetSnapshot) -> bool {
    std::ptr::eq(a, b)
        || (a.clusters == b.clusters
            && a.routes == b.routes
            && a.clients == b.clients
            && a.groups == b.groups)
}

/// One term of leadership: the lease holding the leader key and the revision
/// that created the key (the guard of the term's writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Term {
    lease: LeaseId,
    revision: Revision,
    /// When the lease was asked for: it cannot expire before `granted + ttl`.
    granted: tokio::time::Instant,
}

/// Keeps the lease of `term` alive, on its own schedule (every `ttl/3`),
/// until the term ends; sets `lost` when the leadership is lost:
///
/// - the lease is gone (expired or revoked) or the leader key is no longer
///   the one this term created (deleted, or another leader's);
/// - no renewal succeeded in time: the lease is known alive only until the
///   moment the last successful renewal was *sent* plus its TTL (etcd counts
///   from when it received it, later); the leader steps down `ttl/4` before
///   that, so it has stopped before any other candidate can win the key.
///
/// Transient failures (etcd slow or unreachable) are retried until then.
async fn keep_leading(
    kv: Arc<dyn KvStore>,
    key: String,
    term: Term,
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    const RETRY: Duration = Duration::from_millis(100);
    let renew_every = ttl / 3;
    let margin = ttl / 4;
    let mut valid_until = term.granted + ttl;
    let mut next = term.granted + renew_every;
    loop {
        let step_down_at = valid_until - margin;
        if next >= step_down_at {
            next = step_down_at;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = lost.closed() => return, // the term ended
        }
        let sent = tokio::time::Instant::now();
        if sent >= step_down_at {
            tracing::warn!(
                lease = term.lease,
                "could not renew the controller lease in time; stepping down"
            );
            break;
        }
        match tokio::time::timeout_at(step_down_at, renew(&*kv, &key, &term)).await {
            Ok(Ok(granted)) => {
                valid_until = sent + granted;
                next = sent + renew_every;
            }
            Ok(Err(e)) if e.is_transient() => {
                tracing::warn!(error = %e, "renewing the controller lease failed; retrying");
                next = tokio::time::Instant::now() + RETRY.min(renew_every);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lost the controller lease; stepping down");
                break;
            }
            Err(_) => {
                tracing::warn!(
                    lease = term.lease,
                    "controller lease renewal did not answer in time; stepping down"
                );
                break;
            }
        }
    }
    let _ = lost.send(true);
}

/// Renews the lease of `term` once and checks the leader key is still this
/// term's; returns the TTL granted by the renewal.
async fn renew(kv: &dyn KvStore, key: &str, term: &Term) -> Result<Duration, RegistryError> {
    let granted = kv.keep_alive(term.lease).await?;
    let held = kv.get(key).await?.map(|e| e.mod_revision);
    let expect = Expect::ModRevision(term.revision);
    if !expect.matches(held) {
        return Err(RegistryError::GuardFailed {
            key: key.to_string(),
            expected: expect,
            actual: held,
        });
    }
    Ok(granted)
}

/// Tries once to become leader: `Some(term)` when this instance now leads.
async fn campaign(
    kv: &dyn KvStore,
    key: &str,
    opts: &ElectionOptions,
) -> Result<Option<Term>, RegistryError> {
    let granted = tokio::time::Instant::now();
    let lease = kv.grant_lease(opts.lease_ttl).await?;
    match kv
        .put_if(
            key,
            opts.id.clone().into_bytes(),
            Expect::Absent,
            Some(lease),
        )
        .await
    {
        Ok(revision) => Ok(Some(Term {
            lease,
            revision,
            granted,
        })),
        Err(RegistryError::Conflict { .. }) => {
            let _ = kv.revoke(lease).await;
            Ok(None)
        }
        Err(e) => {
            let _ = kv.revoke(lease).await;
            Err(e)
        }
    }
}

/// The id of the current leader, if any.
pub async fn current_leader(cp: &ControlPlane) -> Result<Option<String>, ControlError> {
    Ok(cp
        .registry()
        .kv()
        .get(&leader_key(cp))
        .await?
        .map(|e| String::from_utf8_lossy(&e.value).into_owned()))
}

#[cfg(test)]
mod tests_support {
    pub(super) use super::*;
    pub(super) use crate::kafka::{FleetKafka, WriteFenceStatus};
    pub(super) use crate::ops::{AddCluster, SetRoute};
    use async_trait::async_trait;
    use flotilla_client::kafka::KafkaError;
    pub(super) use flotilla_client::registry::memory::MemoryKv;
    pub(super) use flotilla_client::registry::{
        ClientKind, ClientRecord, ClusterRole, ClusterSpec, GroupRecord, Registry, SCHEMA_VERSION,
    };

    /// Clusters whose end offsets and committed offsets the test sets.
    #[derive(Default)]
    pub(super) struct FakeKafka {
        pub(super) ends: Mutex<HashMap<String, Vec<i64>>>,
        pub(super) committed: Mutex<HashMap<String, Vec<Option<i64>>>>,
        /// (cluster, topic) pairs whose writes are fenced.
        pub(super) fenced: Mutex<std::collections::BTreeSet<(String, String)>>,
        /// "fence <cluster>" and "ends <cluster>", in call order.
        pub(super) calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl FleetKafka for FakeKafka {
        async fn read_cluster_id(&self, bootstrap: &str) -> Result<String, KafkaError> {
            Ok(format!("kid-{bootstrap}"))
        }
        async fn ensure_topic(&self, _: &ClusterSpec, _: &str, _: u32) -> Result<(), KafkaError> {
            Ok(())
        }
        async fn end_offsets(
            &self,
            spec: &ClusterSpec,
            _: &str,
            partitions: u32,
        ) -> Result<Vec<i64>, KafkaError> {
            self.calls.lock().unwrap().push(format!("ends {}", spec.id));
            let ends = self.ends.lock().unwrap();
            Ok(ends
                .get(&spec.id)
                .cloned()
                .unwrap_or_else(|| vec![0; partitions as usize]))
        }
        async fn committed_offsets(
            &self,
            spec: &ClusterSpec,
            _: &str,
            _: &str,
            partitions: u32,
        ) -> Result<Vec<Option<i64>>, KafkaError> {
            let c = self.committed.lock().unwrap();
            Ok(c.get(&spec.id)
                .cloned()
                .unwrap_or_else(|| vec![None; partitions as usize]))
        }
        async fn fence_writes(
            &self,
            spec: &ClusterSpec,
            topic: &str,
        ) -> Result<WriteFenceStatus, KafkaError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("fence {}", spec.id));
            let new = self
                .fenced
                .lock()
                .unwrap()
                .insert((spec.id.clone(), topic.to_string()));
            Ok(if new {
                WriteFenceStatus::Fenced
            } else {
                WriteFenceStatus::AlreadyFenced
            })
        }
    }

    pub(super) async fn fleet(kv: &MemoryKv) -> (ControlPlane, Arc<FakeKafka>) {
        let kafka = Arc::new(FakeKafka::default());
        let cp = ControlPlane::new(Registry::new(Arc::new(kv.clone()), "t"), kafka.clone());
        for id in ["a", "b"] {
            let req = AddCluster {
                id: id.into(),
                bootstrap: format!("{id}:9092"),
                weight: 1,
                role: ClusterRole::Permanent,
                labels: Default::default(),
                security_profile: None,
                activate: true,
            };
            cp.add_cluster(req, now_millis()).await.unwrap();
        }
        (cp, kafka)
    }

    pub(super) fn set(clusters: &[&str], ack_timeout_ms: u64) -> SetRoute {
        SetRoute {
            topic: "t".into(),
            clusters: clusters.iter().map(|c| (c.to_string(), None)).collect(),
            partitions: Some(2),
            ack_timeout_ms,
        }
    }

    /// Registers consumer group `group` as reading `topic`.
    pub(super) async fn register_group(cp: &ControlPlane, group: &str, topic: &str) {
        cp.registry()
            .register_group(&GroupRecord {
                version: SCHEMA_VERSION,
                group: group.into(),
                topics: vec![topic.into()],
                created_at: now_millis(),
            })
            .await
            .unwrap();
    }

    pub(super) fn silent_producer() -> ClientRecord {
        ClientRecord {
            version: SCHEMA_VERSION,
            kind: ClientKind::Producer,
            id: "silent".into(),
            acked: Default::default(),
            group: None,
            started_at: now_millis(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;

    /// Bug 2 of docs/simulator.md: the ack deadline is written with the
    /// proposer's clock; a controller whose clock is ahead, or that could not
    /// read the registry for longer than the ack timeout, must still wait the
    /// full timeout itself before sealing without acknowledgements.
    #[tokio::test(start_paused = true)]
    async fn ack_wait_is_measured_on_the_controllers_clock_and_restarts_after_an_outage() {
        let kv = MemoryKv::new();
        let (cp, _) = fleet(&kv).await;
        cp.set_route(set(&["a"], 3_000), now_millis())
            .await
            .unwrap();
        let _silent = cp
            .registry()
            .register_client(silent_producer(), Duration::from_secs(3_600))
            .await
            .unwrap();
        // The proposer's clock is 10 minutes behind the controller's: by the
        // controller's clock the deadline passed long ago.
        cp.set_route(set(&["a", "b"], 3_000), now_millis() - 600_000)
            .await
            .unwrap();
        let ctl = Controller::new(cp.clone());
        let step = Duration::from_millis(1_000);
        for _ in 0..2 {
            let r = ctl.reconcile_once(now_millis()).await.unwrap();
            assert!(r.sealed.is_empty(), "sealed without waiting: {r:?}");
            assert_eq!(r.waiting, vec![("t".into(), 2, vec!["silent".into()])]);
            tokio::time::advance(step).await;
        }
        // The registry is down for longer than the ack timeout: the wait restarts.
        kv.set_unavailable(true);
        for _ in 0..4 {
            assert!(ctl.reconcile_once(now_millis()).await.is_err());
            tokio::time::advance(step).await;
        }
        kv.set_unavailable(false);
        for _ in 0..3 {
            let r = ctl.reconcile_once(now_millis()).await.unwrap();
            assert!(r.sealed.is_empty(), "sealed right after the outage: {r:?}");
            tokio::time::advance(step).await;
        }
        // 3 s after the registry came back: the deadline has passed for this controller.
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.sealed, vec![("t".into(), 2)], "{r:?}");
        // A clone shares the waits; a fresh controller (new leader) starts its own.
        cp.set_route(set(&["b"], 3_000), now_millis())
            .await
            .unwrap();
        ctl.clone().reconcile_once(now_millis()).await.unwrap();
        tokio::time::advance(Duration::from_millis(3_000)).await;
        let fresh = Controller::new(cp.clone());
        assert!(fresh
            .reconcile_once(now_millis())
            .await
            .unwrap()
            .sealed
            .is_empty());
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.sealed, vec![("t".into(), 3)], "{r:?}");
    }

    /// Bug 1 of docs/simulator.md: a drained cluster retires only once every
    /// registered group has consumed it to its end offsets, stragglers above
    /// the fence included — not as soon as the group passed the fence.
    #[tokio::test]
    async fn retirement_waits_for_stragglers_above_the_fence() {
        let kv = MemoryKv::new();
        let (cp, kafka) = fleet(&kv).await;
        register_group(&cp, "g", "t").await;
        cp.set_route(set(&["a"], 3_000), now_millis())
            .await
            .unwrap();
        kafka.ends.lock().unwrap().insert("a".into(), vec![10, 7]);
        cp.set_route(set(&["b"], 3_000), now_millis())
            .await
            .unwrap();
        let ctl = Controller::new(cp.clone());
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.sealed, vec![("t".into(), 2)], "{r:?}");
        let route = cp.route("t").await.unwrap();
        assert_eq!(route.epochs[0].fence["a"], vec![10, 7]);
        cp.drain("a").await.unwrap();
        // The first pass after the drain fences a's writes; the drained check
        // waits for the next pass.
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.fenced, vec![("a".into(), vec!["t".into()])], "{r:?}");
        assert!(r.retired.is_empty(), "{r:?}");
        // A straggler landed on a above its fence (before the write fence);
        // the group is at the fence.
        kafka.ends.lock().unwrap().insert("a".into(), vec![12, 7]);
        kafka
            .committed
            .lock()
            .unwrap()
            .insert("a".into(), vec![Some(10), Some(7)]);
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert!(
            r.retired.is_empty(),
            "retired with a straggler unread: {r:?}"
        );
        assert!(r.blocked[0].1.contains("up to its end offsets"), "{r:?}");
        assert!(cp.retire("a").await.is_err());
        // The group read the stragglers: now it may go.
        kafka
            .committed
            .lock()
            .unwrap()
            .insert("a".into(), vec![Some(12), Some(7)]);
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.retired, vec!["a".to_string()], "{r:?}");
    }
}

#[cfg(test)]
mod late_tests {
    use super::tests_support::*;

    /// Finding 2's remaining gap for live producers (docs/simulator.md): a
    /// switch sealed at the ack deadline without a producer leaves that
    /// producer's queued records for the old cluster in flight; the cluster
    /// must not retire (even drained to its end offsets) until the producer
    /// acknowledged a later epoch, left, or the grace passed.
    #[tokio::test(start_paused = true)]
    async fn a_late_producer_holds_retirement_until_it_acks_a_later_epoch() {
        let kv = MemoryKv::new();
        let (cp, kafka) = fleet(&kv).await;
        register_group(&cp, "g", "t").await;
        cp.set_route(set(&["a"], 1_000), now_millis())
            .await
            .unwrap();
        let mut late = cp
            .registry()
            .register_client(silent_producer(), Duration::from_secs(3_600))
            .await
            .unwrap();
        cp.set_route(set(&["b"], 1_000), now_millis())
            .await
            .unwrap();
        let ctl = Controller::new(cp.clone()).with_late_grace(Duration::from_secs(60));
        ctl.reconcile_once(now_millis()).await.unwrap();
        tokio::time::advance(Duration::from_millis(1_500)).await;
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.sealed, vec![("t".into(), 2)], "{r:?}");
        cp.drain("a").await.unwrap();
        // Nothing to read on a: drained, but the late producer may still write.
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert!(r.retired.is_empty(), "{r:?}");
        assert!(r.blocked[0].1.contains("silent"), "{r:?}");
        // Its late records land above the fence; the next switch makes it
        // settle them and acknowledge epoch 3.
        kafka.ends.lock().unwrap().insert("a".into(), vec![0, 3]);
        let mut rec = late.record().clone();
        rec.acked.insert("t".into(), 3);
        late.update(rec).await.unwrap();
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert!(r.retired.is_empty(), "stragglers not read yet: {r:?}");
        // No late writer holds a any more: its writes are fenced now, the
        // drained check comes next.
        assert_eq!(r.fenced, vec![("a".into(), vec!["t".into()])], "{r:?}");
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert!(r.retired.is_empty(), "stragglers not read yet: {r:?}");
        assert!(r.blocked[0].1.contains("end offsets"), "{r:?}");
        kafka
            .committed
            .lock()
            .unwrap()
            .insert("a".into(), vec![None, Some(3)]);
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.retired, vec!["a".to_string()], "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_producer_holds_retirement_at_most_the_grace() {
        let kv = MemoryKv::new();
        let (cp, _) = fleet(&kv).await;
        cp.set_route(set(&["a"], 1_000), now_millis())
            .await
            .unwrap();
        let _late = cp
            .registry()
            .register_client(silent_producer(), Duration::from_secs(3_600))
            .await
            .unwrap();
        cp.set_route(set(&["b"], 1_000), now_millis())
            .await
            .unwrap();
        let ctl = Controller::new(cp.clone()).with_late_grace(Duration::from_secs(60));
        ctl.reconcile_once(now_millis()).await.unwrap();
        tokio::time::advance(Duration::from_millis(1_500)).await;
        ctl.reconcile_once(now_millis()).await.unwrap();
        cp.drain("a").await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(ctl
            .reconcile_once(now_millis())
            .await
            .unwrap()
            .retired
            .is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.fenced.len(), 1, "the grace passed: a is fenced: {r:?}");
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.retired, vec!["a".to_string()], "{r:?}");
    }
}

#[cfg(test)]
mod fence_tests {
    use super::tests_support::*;

    /// Finding 2's last gap (docs/simulator.md): the drained check must read
    /// end offsets that no later write can move. The controller fences the
    /// draining cluster's topics first and does the check only on a later
    /// pass that finds the fence in place; a fresh controller (a new leader)
    /// finds the fence its predecessor set and never checks without it.
    #[tokio::test]
    async fn writes_are_fenced_before_the_drained_check_and_the_fence_is_level_triggered() {
        let kv = MemoryKv::new();
        let (cp, kafka) = fleet(&kv).await;
        cp.set_route(set(&["a"], 1_000), now_millis())
            .await
            .unwrap();
        cp.set_route(set(&["b"], 1_000), now_millis())
            .await
            .unwrap();
        let ctl = Controller::new(cp.clone());
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.sealed, vec![("t".into(), 2)], "{r:?}");
        // Not draining: never fenced (b is live, a could still be routed to).
        assert!(kafka.fenced.lock().unwrap().is_empty());
        // An active cluster that held topics cannot be retired (nor fenced) directly.
        let e = cp.retire("a").await.unwrap_err();
        assert!(e.to_string().contains("drain it first"), "{e}");
        cp.drain("a").await.unwrap();
        kafka.calls.lock().unwrap().clear();
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.fenced, vec![("a".into(), vec!["t".into()])], "{r:?}");
        assert!(
            r.retired.is_empty(),
            "checked in the pass that set the fence: {r:?}"
        );
        let calls = kafka.calls.lock().unwrap().clone();
        assert!(
            !calls.iter().any(|c| c == "ends a"),
            "end offsets of a read before the fence settled: {calls:?}"
        );
        // A new leader: the fence is found in place, the check runs, a retires.
        let fresh = Controller::new(cp.clone());
        let r = fresh.reconcile_once(now_millis()).await.unwrap();
        assert!(r.fenced.is_empty(), "{r:?}");
        assert_eq!(r.retired, vec!["a".to_string()], "{r:?}");
        let calls = kafka.calls.lock().unwrap().clone();
        let fence = calls.iter().position(|c| c == "fence a").unwrap();
        assert!(
            calls.iter().skip(fence).any(|c| c == "ends a"),
            "no drained check after the fence: {calls:?}"
        );
        assert!(
            kafka.fenced.lock().unwrap().iter().all(|(c, _)| c == "a"),
            "only the retiring cluster is fenced"
        );
    }

    /// The one-shot `flotilla cluster retire` fences too, and refuses before
    /// touching Kafka while an open epoch writes to the cluster.
    #[tokio::test(start_paused = true)]
    async fn one_shot_retire_fences_first() {
        let kv = MemoryKv::new();
        let (cp, kafka) = fleet(&kv).await;
        cp.set_route(set(&["a"], 1_000), now_millis())
            .await
            .unwrap();
        let e = cp.retire("a").await.unwrap_err();
        assert!(e.to_string().contains("open epoch"), "{e}");
        assert!(kafka.fenced.lock().unwrap().is_empty());
        cp.set_route(set(&["b"], 1_000), now_millis())
            .await
            .unwrap();
        Controller::new(cp.clone())
            .reconcile_once(now_millis())
            .await
            .unwrap();
        cp.drain("a").await.unwrap();
        kafka.calls.lock().unwrap().clear();
        let spec = cp.retire("a").await.unwrap();
        assert_eq!(spec.state, ClusterState::Retired);
        let calls = kafka.calls.lock().unwrap().clone();
        assert_eq!(
            calls.first().map(String::as_str),
            Some("fence a"),
            "{calls:?}"
        );
    }
}

#[cfg(test)]
mod leadership_tests {
    use super::tests_support::*;

    /// A controller acting for a term that is over (the leader key was
    /// re-created by another leader) has every registry write refused; the
    /// current term's guard lets the same pass through.
    #[tokio::test]
    async fn a_stale_leaders_writes_are_refused_by_the_leader_key_guard() {
        let kv = MemoryKv::new();
        let (cp, _) = fleet(&kv).await;
        cp.set_route(set(&["a"], 0), now_millis()).await.unwrap();
        cp.set_route(set(&["b"], 0), now_millis()).await.unwrap();
        let key = leader_key(&cp);
        let old = kv
            .put_if(&key, b"one".to_vec(), Expect::Absent, None)
            .await
            .unwrap();
        kv.delete_if(&key, Expect::ModRevision(old)).await.unwrap();
        let new = kv
            .put_if(&key, b"two".to_vec(), Expect::Absent, None)
            .await
            .unwrap();
        let ctl = Controller::new(cp.clone());
        let stale = ctl.guarded(Guard {
            key: key.clone(),
            expect: Expect::ModRevision(old),
        });
        let r = stale.reconcile_once(now_millis()).await.unwrap();
        assert!(r.sealed.is_empty(), "{r:?}");
        assert!(r.errors[0].contains("no longer holds"), "{r:?}");
        assert_eq!(kv.current_revision().await.unwrap(), new, "nothing written");
        let current = ctl.guarded(Guard {
            key,
            expect: Expect::ModRevision(new),
        });
        let r = current.reconcile_once(now_millis()).await.unwrap();
        assert_eq!(r.sealed, vec![("t".into(), 2)], "{r:?}");
    }
}
