//! The controller's side of the handoff, as pure functions (DESIGN
//! "Handoff protocol", steps 1, 3 and 5).
//!
//! - [`propose`] validates an operator's new write set and appends it as a
//!   pending epoch (or as open epoch 1 for a topic without a route);
//! - [`plan`] says what a pending switch needs next, from the live producers'
//!   acknowledgements and the time: wait, read the boundary, or abort;
//! - [`seal`] turns the boundary the adapter read into one new route value
//!   (fence on `N`, `N` sealed, `N+1` open) that the adapter writes with a
//!   single compare-and-swap; [`abort`] gives up on the pending epoch;
//! - [`may_retire`] says whether a cluster can move to `retired`.
//!
//! The controller adapter owns the clock, the registry CAS and the Kafka
//! admin calls; it calls these level-triggered on every snapshot, so a new
//! leader simply continues where its predecessor stopped.

use std::collections::{BTreeMap, BTreeSet};

use crate::registry::{
    ClientKind, ClientRecord, ClusterId, ClusterSpec, ClusterState, Epoch, EpochState,
    FleetSnapshot, ModelError, PartitionOffsets, TopicRoute, UnixMillis, WeightedCluster,
    SCHEMA_VERSION,
};

/// What to do when a pending epoch's ack deadline passes with acks missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnAckDeadline {
    /// Read the boundary and seal anyway: producers whose lease expired are
    /// already absent from the snapshot; one that is alive but silent may
    /// write stragglers (detected, delivered late, never lost). The default.
    #[default]
    Proceed,
    /// Abort the pending epoch; producers resume on the open one.
    Abort,
}

/// The next step of a topic's switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchStep {
    /// No switch pending.
    Idle,
    /// Some live producers have not acknowledged the pending epoch yet.
    WaitForAcks {
        /// The pending epoch.
        epoch: u64,
        /// Ids of the live producers that have not acknowledged it, sorted.
        missing: Vec<String>,
        /// When the controller stops waiting (`None`: it waits for ever).
        deadline: Option<UnixMillis>,
    },
    /// Read the end offset of every partition on these clusters, then [`seal`].
    ReadBoundary {
        /// The pending epoch to open.
        epoch: u64,
        /// Every cluster of the open epoch `N` and of the pending epoch `N+1`, sorted.
        clusters: Vec<ClusterId>,
        /// Producers that never acknowledged (the deadline passed): expect
        /// stragglers from them if they are still writing.
        late: Vec<String>,
    },
    /// The deadline passed and the policy says abort: call [`abort`].
    Abort {
        /// The pending epoch.
        epoch: u64,
        /// Why, naming the producers that did not acknowledge.
        reason: String,
    },
}

/// What a pending switch of `route` needs next.
///
/// `producers` are the live producers (`FleetSnapshot::producers()`; other
/// client kinds are ignored); a
/// producer has acknowledged when its `acked[topic]` is at least the pending
/// epoch. At or after the pending epoch's `ack_deadline`, missing acks lead
/// to `ReadBoundary` or `Abort` according to `on_deadline`.
pub fn plan<'a>(
    route: &TopicRoute,
    producers: impl IntoIterator<Item = &'a ClientRecord>,
    now: UnixMillis,
    on_deadline: OnAckDeadline,
) -> SwitchStep {
    let Some(pending) = route.pending_epoch() else {
        return SwitchStep::Idle;
    };
    let mut missing: Vec<String> = producers
        .into_iter()
        .filter(|p| p.kind == ClientKind::Producer)
        .filter(|p| p.acked.get(&route.topic).is_none_or(|&a| a < pending.n))
        .map(|p| p.id.clone())
        .collect();
    missing.sort();
    missing.dedup();
    let read = |late: Vec<String>| {
        let mut clusters: BTreeSet<ClusterId> = pending.clusters().cloned().collect();
        if let Some(open) = route.open_epoch() {
            clusters.extend(open.clusters().cloned());
        }
        SwitchStep::ReadBoundary {
            epoch: pending.n,
            clusters: clusters.into_iter().collect(),
            late,
        }
    };
    if missing.is_empty() {
        return read(Vec::new());
    }
    match pending.ack_deadline {
        Some(d) if now >= d => match on_deadline {
            OnAckDeadline::Proceed => read(missing),
            OnAckDeadline::Abort => SwitchStep::Abort {
                epoch: pending.n,
                reason: format!(
                    "topic {}: ack deadline of epoch {} passed with no acknowledgement from producer(s) {}",
                    route.topic,
                    pending.n,
                    missing.join(", ")
                ),
            },
        },
        deadline => SwitchStep::WaitForAcks { epoch: pending.n, missing, deadline },
    }
}

fn invalid(msg: String) -> ModelError {
    ModelError::Invalid(msg)
}

/// Seals the open epoch `N` with `boundary` as its fence and opens the pending
/// epoch `pending_n`, in one new route value.
///
/// `boundary` must have, for every cluster of epochs `N` and `pending_n` and
/// nothing else, one end offset per partition, none below the same cluster's
/// boundary in an earlier fence (end offsets never go back; a lower one means
/// the wrong cluster or a recreated topic was read).
pub fn seal(
    route: &TopicRoute,
    pending_n: u64,
    boundary: BTreeMap<ClusterId, PartitionOffsets>,
) -> Result<TopicRoute, ModelError> {
    let topic = &route.topic;
    let pending = pending_of(route, pending_n)?;
    let mut next = route.clone();
    if let Some(open) = route.open_epoch() {
        let need: BTreeSet<&ClusterId> = open.clusters().chain(pending.clusters()).collect();
        for c in &need {
            let Some(offs) = boundary.get(*c) else {
                return Err(invalid(format!(
                    "topic {topic}: boundary for sealing epoch {} lacks cluster {c}",
                    open.n
                )));
            };
            if offs.len() != route.partitions as usize {
                return Err(invalid(format!(
                    "topic {topic}: boundary on cluster {c} has {} offsets for {} partitions",
                    offs.len(),
                    route.partitions
                )));
            }
            if let Some(p) = offs.iter().position(|&o| o < 0) {
                return Err(invalid(format!(
                    "topic {topic}: boundary on cluster {c} partition {p} is negative"
                )));
            }
            for earlier in route.sealed_epochs() {
                if let Some(prev) = earlier.fence.get(*c) {
                    if let Some(p) =
                        (0..offs.len()).find(|&p| prev.get(p).is_some_and(|&q| offs[p] < q))
                    {
                        return Err(invalid(format!(
                            "topic {topic}: boundary on cluster {c} partition {p} is {}, below {} in the fence \
                             of epoch {}: end offsets never go back",
                            offs[p], prev[p], earlier.n
                        )));
                    }
                }
            }
        }
        if let Some(extra) = boundary.keys().find(|c| !need.contains(c)) {
            return Err(invalid(format!(
                "topic {topic}: boundary names cluster {extra}, which is in neither epoch {} nor {pending_n}",
                open.n
            )));
        }
        let open_n = open.n;
        for e in next.epochs.iter_mut() {
            if e.n == open_n {
                e.state = EpochState::Sealed;
                e.fence = boundary.clone();
            }
        }
    }
    for e in next.epochs.iter_mut() {
        if e.n == pending_n {
            e.state = EpochState::Open;
        }
    }
    next.validate()?;
    Ok(next)
}

fn pending_of(route: &TopicRoute, pending_n: u64) -> Result<&Epoch, ModelError> {
    match route.epoch(pending_n) {
        Some(e) if e.state == EpochState::Pending => Ok(e),
        Some(e) => Err(invalid(format!(
            "topic {}: epoch {pending_n} is {}, not pending",
            route.topic, e.state
        ))),
        None => Err(invalid(format!(
            "topic {}: there is no epoch {pending_n}",
            route.topic
        ))),
    }
}

/// Marks the pending epoch `pending_n` aborted; producers resume on the open epoch.
pub fn abort(route: &TopicRoute, pending_n: u64) -> Result<TopicRoute, ModelError> {
    pending_of(route, pending_n)?;
    let mut next = route.clone();
    for e in next.epochs.iter_mut() {
        if e.n == pending_n {
            e.state = EpochState::Aborted;
        }
    }
    next.validate()?;
    Ok(next)
}

/// Validates a new write set for `topic` and returns the route with it
/// appended: as a pending epoch (with `ack_deadline = now + ack_timeout_ms`),
/// or as open epoch 1 when the topic has no route yet (or no open epoch).
///
/// Refused, with an error naming the problem: an empty write set, weight 0,
/// a cluster listed twice, a cluster that is not registered or not active, a
/// partition count different from the route's, a switch already pending, or
/// a write set identical to the open epoch's.
pub fn propose(
    route: Option<&TopicRoute>,
    topic: &str,
    partitions: u32,
    write: Vec<WeightedCluster>,
    clusters: &BTreeMap<ClusterId, ClusterSpec>,
    now: UnixMillis,
    ack_timeout_ms: u64,
) -> Result<TopicRoute, ModelError> {
    if topic.is_empty() {
        return Err(invalid("topic name is empty".into()));
    }
    if partitions == 0 {
        return Err(invalid(format!(
            "topic {topic}: partition count must be at least 1"
        )));
    }
    if write.is_empty() {
        return Err(invalid(format!(
            "topic {topic}: the write set names no cluster"
        )));
    }
    let mut seen = BTreeSet::new();
    for w in &write {
        if w.weight == 0 {
            return Err(invalid(format!(
                "topic {topic}: cluster {} has weight 0",
                w.cluster
            )));
        }
        if !seen.insert(&w.cluster) {
            return Err(invalid(format!(
                "topic {topic}: cluster {} is listed twice",
                w.cluster
            )));
        }
        match clusters.get(&w.cluster) {
            None => {
                return Err(invalid(format!(
                    "topic {topic}: cluster {} is not registered",
                    w.cluster
                )))
            }
            Some(spec) if spec.state != ClusterState::Active => {
                return Err(invalid(format!(
                    "topic {topic}: cluster {} is {}; only active clusters can be written",
                    w.cluster, spec.state
                )))
            }
            Some(_) => {}
        }
    }
    let mut next = match route {
        Some(r) => {
            if r.topic != topic {
                return Err(invalid(format!(
                    "route of topic {} passed for topic {topic}",
                    r.topic
                )));
            }
            if r.partitions != partitions {
                return Err(invalid(format!(
                    "topic {topic} has {} partitions on every cluster; a route cannot change it to {partitions}",
                    r.partitions
                )));
            }
            if let Some(p) = r.pending_epoch() {
                return Err(invalid(format!(
                    "topic {topic}: epoch {} is already pending; wait until it is sealed or aborted",
                    p.n
                )));
            }
            if let Some(open) = r.open_epoch() {
                if open.writes_exactly(&write) {
                    return Err(invalid(format!(
                        "topic {topic}: the write set is the same as open epoch {}'s; nothing to switch",
                        open.n
                    )));
                }
            }
            r.clone()
        }
        None => TopicRoute {
            version: SCHEMA_VERSION,
            topic: topic.to_string(),
            partitions,
            epochs: Vec::new(),
        },
    };
    let direct = next.open_epoch().is_none();
    next.epochs.push(Epoch {
        n: next.last_epoch_n() + 1,
        write,
        state: if direct {
            EpochState::Open
        } else {
            EpochState::Pending
        },
        fence: BTreeMap::new(),
        created_at: now,
        ack_deadline: (!direct).then(|| now.saturating_add(ack_timeout_ms)),
    });
    next.validate()?;
    Ok(next)
}

/// Switches sealed without some producers' acknowledgements (the ack deadline
/// passed with them missing). Until each such producer has acknowledged the
/// epoch the seal opened or a later one (so everything older it sent has
/// settled), or has left the registry, or `grace_ms` has passed (its delivery
/// timeout: its records have landed or failed by then), it may still have
/// records in flight for the sealed epoch's clusters — so those clusters must
/// not retire yet, or the records would be lost.
///
/// The controller records the seals it makes ([`LateSeals::record`]) and asks
/// [`LateSeals::blocking`] before retiring a cluster; times are milliseconds on
/// the caller's monotonic clock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LateSeals {
    /// (topic, sealed epoch) → (opened epoch, producers, sealed at).
    seals: BTreeMap<(String, u64), (u64, Vec<String>, UnixMillis)>,
}

impl LateSeals {
    /// Records that epoch `sealed` of `topic` was sealed at `at`, opening
    /// `opened`, without the acks of `producers` (no-op when there are none).
    pub fn record(
        &mut self,
        topic: &str,
        sealed: u64,
        opened: u64,
        producers: Vec<String>,
        at: UnixMillis,
    ) {
        if !producers.is_empty() {
            self.seals
                .insert((topic.to_string(), sealed), (opened, producers, at));
        }
    }

    /// Whether no late seal is remembered.
    pub fn is_empty(&self) -> bool {
        self.seals.is_empty()
    }

    /// Why `cluster` must not retire yet because of a late seal, if any;
    /// forgets the seals that no longer matter (every late producer acked a
    /// later epoch or left, the grace passed, or the route is gone).
    pub fn blocking(
        &mut self,
        snapshot: &FleetSnapshot,
        cluster: &str,
        now: UnixMillis,
        grace_ms: u64,
    ) -> Option<String> {
        let mut why = None;
        self.seals.retain(|(topic, n), (opened, ids, at)| {
            let Some(route) = snapshot.route(topic) else {
                return false;
            };
            ids.retain(|id| {
                snapshot
                    .producers()
                    .any(|r| &r.id == id && r.acked.get(topic).is_none_or(|a| a < opened))
            });
            if ids.is_empty() || now >= at.saturating_add(grace_ms) {
                return false;
            }
            let holds = route
                .epoch(*n)
                .is_some_and(|e| e.state == EpochState::Sealed && e.writes_to(cluster));
            if holds && why.is_none() {
                why = Some(format!(
                    "topic {topic}: epoch {n} was sealed without the acks of producer(s) {}, which may still \
                     have records in flight for cluster {cluster}; waiting until they acknowledge a later \
                     epoch or leave (at most {grace_ms} ms after the seal)",
                    ids.join(", "),
                ));
            }
            true
        });
        why
    }
}

/// Whether `cluster` may move to `retired`: it is in no open or pending epoch
/// of any route, and for every sealed epoch that wrote to it,
/// `group_drained(topic, epoch, cluster)` says every registered group of the
/// topic has consumed the cluster **to its current end offsets** (lag 0), not
/// merely past the epoch's fence: records of a sealed epoch can land above the
/// fence after the seal (stragglers from producers the controller did not wait
/// for), and retiring the cluster would lose them. The adapter reads the end
/// offsets and the committed offsets; the cluster is `draining` by then, so no
/// live producer writes to it any more. `Err` says what still holds it.
pub fn may_retire<'a>(
    cluster: &str,
    routes: impl IntoIterator<Item = &'a TopicRoute>,
    group_drained: impl Fn(&str, u64, &str) -> bool,
) -> Result<(), String> {
    for r in routes {
        for e in &r.epochs {
            if !e.writes_to(cluster) {
                continue;
            }
            match e.state {
                EpochState::Open | EpochState::Pending => {
                    return Err(format!("cluster {cluster} is in {} epoch {} of topic {}", e.state, e.n, r.topic))
                }
                EpochState::Sealed if !group_drained(&r.topic, e.n, cluster) => {
                    return Err(format!(
                        "topic {}: a registered group has not consumed cluster {cluster} (sealed epoch {}) \
                         up to its end offsets",
                        r.topic, e.n
                    ))
                }
                EpochState::Sealed | EpochState::Aborted => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::EpochState::*;
    use crate::route::testutil::*;
    use proptest::prelude::*;

    fn fleet(active: &[&str], other: &[(&str, ClusterState)]) -> BTreeMap<ClusterId, ClusterSpec> {
        let mut m: BTreeMap<ClusterId, ClusterSpec> = active
            .iter()
            .map(|c| ((*c).to_string(), spec(c, ClusterState::Active)))
            .collect();
        for (c, s) in other {
            m.insert((*c).to_string(), spec(c, *s));
        }
        m
    }

    fn err_of(r: Result<TopicRoute, ModelError>) -> String {
        r.expect_err("should be refused").to_string()
    }

    fn b(items: &[(&str, &[i64])]) -> BTreeMap<ClusterId, PartitionOffsets> {
        items
            .iter()
            .map(|(c, o)| ((*c).to_string(), o.to_vec()))
            .collect()
    }

    #[test]
    fn propose_opens_epoch_one_then_appends_pending() {
        let f = fleet(&["a", "b"], &[]);
        let r1 = propose(None, "t", 2, ws(&["a"]), &f, 100, 5_000).unwrap();
        assert_eq!(r1.epochs.len(), 1);
        assert_eq!(
            (
                r1.epochs[0].n,
                r1.epochs[0].state,
                r1.epochs[0].ack_deadline
            ),
            (1, Open, None)
        );
        let r2 = propose(Some(&r1), "t", 2, ws(&["a", "b"]), &f, 200, 5_000).unwrap();
        let p = r2.pending_epoch().unwrap();
        assert_eq!((p.n, p.created_at, p.ack_deadline), (2, 200, Some(5_200)));
        assert_eq!(r2.open_epoch().unwrap().n, 1);
    }

    #[test]
    fn propose_refuses_with_a_reason_naming_the_problem() {
        let f = fleet(
            &["a", "b"],
            &[
                ("d", ClusterState::Draining),
                ("p", ClusterState::Provisioning),
            ],
        );
        let r1 = propose(None, "t", 2, ws(&["a"]), &f, 0, 10).unwrap();
        let e = err_of(propose(Some(&r1), "t", 2, ws(&["zz"]), &f, 0, 10));
        assert!(e.contains("zz") && e.contains("not registered"), "{e}");
        let e = err_of(propose(Some(&r1), "t", 2, ws(&["a", "d"]), &f, 0, 10));
        assert!(e.contains("cluster d is draining"), "{e}");
        let e = err_of(propose(Some(&r1), "t", 2, ws(&["p"]), &f, 0, 10));
        assert!(e.contains("cluster p is provisioning"), "{e}");
        let mut zero = ws(&["b"]);
        zero[0].weight = 0;
        let e = err_of(propose(Some(&r1), "t", 2, zero, &f, 0, 10));
        assert!(e.contains("cluster b has weight 0"), "{e}");
        let e = err_of(propose(Some(&r1), "t", 2, ws(&["b", "b"]), &f, 0, 10));
        assert!(e.contains("b is listed twice"), "{e}");
        let e = err_of(propose(Some(&r1), "t", 3, ws(&["b"]), &f, 0, 10));
        assert!(e.contains("2 partitions") && e.contains('3'), "{e}");
        let e = err_of(propose(Some(&r1), "t", 2, vec![], &f, 0, 10));
        assert!(e.contains("no cluster"), "{e}");
        let e = err_of(propose(Some(&r1), "t", 2, ws(&["a"]), &f, 0, 10));
        assert!(e.contains("same as open epoch 1"), "{e}");
        let e = err_of(propose(Some(&r1), "other", 2, ws(&["b"]), &f, 0, 10));
        assert!(e.contains("other"), "{e}");
        let r2 = propose(Some(&r1), "t", 2, ws(&["b"]), &f, 0, 10).unwrap();
        let e = err_of(propose(Some(&r2), "t", 2, ws(&["a", "b"]), &f, 0, 10));
        assert!(e.contains("epoch 2 is already pending"), "{e}");
    }

    #[test]
    fn plan_waits_then_reads_the_boundary_or_aborts() {
        let f = fleet(&["a", "b"], &[]);
        let r1 = propose(None, "t", 1, ws(&["a"]), &f, 0, 0).unwrap();
        assert_eq!(
            plan(&r1, &[producer("p1", &[])], 0, OnAckDeadline::Proceed),
            SwitchStep::Idle
        );
        let r2 = propose(Some(&r1), "t", 1, ws(&["b"]), &f, 1_000, 500).unwrap();
        let ps = [
            producer("p2", &[("t", 1)]),
            producer("p1", &[]),
            producer("p3", &[("t", 2)]),
        ];
        assert_eq!(
            plan(&r2, &ps, 1_499, OnAckDeadline::Proceed),
            SwitchStep::WaitForAcks {
                epoch: 2,
                missing: vec!["p1".into(), "p2".into()],
                deadline: Some(1_500)
            }
        );
        assert_eq!(
            plan(&r2, &ps, 1_500, OnAckDeadline::Proceed),
            SwitchStep::ReadBoundary {
                epoch: 2,
                clusters: vec!["a".into(), "b".into()],
                late: vec!["p1".into(), "p2".into()]
            }
        );
        match plan(&r2, &ps, 1_500, OnAckDeadline::Abort) {
            SwitchStep::Abort { epoch: 2, reason } => {
                assert!(reason.contains("p1, p2"), "{reason}")
            }
            s => panic!("{s:?}"),
        }
        // Consumers never ack and are not waited for.
        let mut consumer = producer("c1", &[]);
        consumer.kind = crate::registry::ClientKind::Consumer;
        assert!(matches!(
            plan(&r2, &[consumer], 0, OnAckDeadline::Abort),
            SwitchStep::ReadBoundary { .. }
        ));
        // Everyone acked (a producer whose lease expired is simply absent).
        let ps = [producer("p3", &[("t", 2)])];
        assert_eq!(
            plan(&r2, &ps, 0, OnAckDeadline::Abort),
            SwitchStep::ReadBoundary {
                epoch: 2,
                clusters: vec!["a".into(), "b".into()],
                late: vec![]
            }
        );
        // No deadline: wait for ever.
        let mut r3 = r2.clone();
        r3.epochs[1].ack_deadline = None;
        assert!(matches!(
            plan(&r3, &[producer("p1", &[])], u64::MAX, OnAckDeadline::Abort),
            SwitchStep::WaitForAcks { deadline: None, .. }
        ));
    }

    #[test]
    fn seal_records_the_fence_and_flips_states_in_one_value() {
        let f = fleet(&["a", "b", "c"], &[]);
        let r1 = propose(None, "t", 2, ws(&["a"]), &f, 0, 0).unwrap();
        let r2 = propose(Some(&r1), "t", 2, ws(&["a", "b"]), &f, 0, 10).unwrap();
        let s = seal(&r2, 2, b(&[("a", &[5, 6]), ("b", &[0, 1])])).unwrap();
        assert_eq!(s.epochs[0].state, Sealed);
        assert_eq!(s.epochs[0].fence, b(&[("a", &[5, 6]), ("b", &[0, 1])]));
        assert_eq!(s.open_epoch().unwrap().n, 2);
        assert!(s.pending_epoch().is_none());

        let e = err_of(seal(&r2, 2, b(&[("a", &[5, 6])])));
        assert!(e.contains("lacks cluster b"), "{e}");
        let e = err_of(seal(&r2, 2, b(&[("a", &[5]), ("b", &[0, 1])])));
        assert!(e.contains("cluster a has 1 offsets for 2"), "{e}");
        let e = err_of(seal(
            &r2,
            2,
            b(&[("a", &[5, 6]), ("b", &[0, 1]), ("c", &[0, 0])]),
        ));
        assert!(e.contains("cluster c"), "{e}");
        let e = err_of(seal(&r2, 2, b(&[("a", &[5, -1]), ("b", &[0, 1])])));
        assert!(e.contains("negative"), "{e}");
        let e = err_of(seal(&r2, 3, b(&[])));
        assert!(e.contains("no epoch 3"), "{e}");
        let e = err_of(seal(&s, 2, b(&[])));
        assert!(e.contains("epoch 2 is open, not pending"), "{e}");

        // The next fence may not go below the previous one on the same cluster.
        let r3 = propose(Some(&s), "t", 2, ws(&["b"]), &f, 0, 10).unwrap();
        let e = err_of(seal(&r3, 3, b(&[("a", &[4, 9]), ("b", &[3, 3])])));
        assert!(e.contains("cluster a partition 0 is 4, below 5"), "{e}");
        let s3 = seal(&r3, 3, b(&[("a", &[5, 9]), ("b", &[3, 3])])).unwrap();
        assert_eq!(
            s3.sealed_epochs().map(|e| e.n).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn abort_marks_only_the_pending_epoch() {
        let f = fleet(&["a", "b"], &[]);
        let r1 = propose(None, "t", 1, ws(&["a"]), &f, 0, 0).unwrap();
        let r2 = propose(Some(&r1), "t", 1, ws(&["b"]), &f, 0, 10).unwrap();
        let a = abort(&r2, 2).unwrap();
        assert_eq!(a.epochs[1].state, Aborted);
        assert_eq!(a.open_epoch().unwrap().n, 1);
        assert!(abort(&a, 2).is_err());
        assert!(abort(&r1, 1)
            .unwrap_err()
            .to_string()
            .contains("open, not pending"));
        // After an abort a new proposal gets a fresh number.
        let r3 = propose(Some(&a), "t", 1, ws(&["b"]), &f, 0, 10).unwrap();
        assert_eq!(r3.pending_epoch().unwrap().n, 3);
    }

    #[test]
    fn may_retire_needs_no_live_epoch_and_consumed_sealed_ones() {
        let f = fleet(&["a", "b"], &[]);
        let r1 = propose(None, "t", 1, ws(&["a"]), &f, 0, 0).unwrap();
        let e = may_retire("a", [&r1], |_, _, _| true).unwrap_err();
        assert!(e.contains("open epoch 1 of topic t"), "{e}");
        let r2 = propose(Some(&r1), "t", 1, ws(&["b"]), &f, 0, 10).unwrap();
        assert!(may_retire("b", [&r2], |_, _, _| true)
            .unwrap_err()
            .contains("pending epoch 2"));
        let s = seal(&r2, 2, b(&[("a", &[5]), ("b", &[0])])).unwrap();
        let e = may_retire("a", [&s], |_, _, _| false).unwrap_err();
        assert!(
            e.contains("cluster a (sealed epoch 1) up to its end offsets"),
            "{e}"
        );
        may_retire("a", [&s], |t, n, c| (t, n, c) == ("t", 1, "a")).unwrap();
        may_retire("zz", [&s], |_, _, _| false).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Propose(u8, u8),
        Produce(u8, u8),
        Seal,
        Abort,
        Ack(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, 1u8..4).prop_map(|(m, w)| Op::Propose(m, w)),
            (0u8..4, 0u8..3).prop_map(|(c, p)| Op::Produce(c, p)),
            Just(Op::Seal),
            Just(Op::Abort),
            (0u8..3).prop_map(Op::Ack),
        ]
    }

    const CL: [&str; 4] = ["a", "b", "c", "d"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any sequence of proposals, seals (with boundaries from logs that only
        /// grow) and aborts keeps the route valid; refused steps change nothing;
        /// fences are monotone; plan never reads the boundary before every live
        /// producer acked or the deadline passed.
        #[test]
        fn switch_lifecycle_keeps_routes_valid(
            ops in proptest::collection::vec(op(), 1..60), now in 0u64..100, timeout in 0u64..2,
        ) {
            let f = fleet(&CL[..3], &[("d", ClusterState::Draining)]);
            let mut route = propose(None, "t", 3, ws(&["a"]), &f, 0, timeout).unwrap();
            let mut ends: BTreeMap<String, Vec<i64>> = CL.iter().map(|c| (c.to_string(), vec![0; 3])).collect();
            let mut producers = vec![producer("p0", &[]), producer("p1", &[]), producer("p2", &[])];
            for op in ops {
                match op {
                    Op::Propose(m, w) => {
                        let write: Vec<WeightedCluster> = CL.iter().enumerate()
                            .filter(|(i, _)| m & (1 << i) != 0)
                            .map(|(_, c)| WeightedCluster { cluster: c.to_string(), weight: u32::from(w) })
                            .collect();
                        match propose(Some(&route), "t", 3, write.clone(), &f, now, timeout) {
                            Ok(next) => {
                                prop_assert!(route.pending_epoch().is_none());
                                prop_assert!(!write.iter().any(|w| w.cluster == "d"));
                                prop_assert_eq!(next.pending_epoch().unwrap().n, route.last_epoch_n() + 1);
                                route = next;
                            }
                            Err(_) => {
                                let mut same = route.open_epoch().unwrap().write.clone();
                                same.sort();
                                let same = same == write;
                                let refusable = write.is_empty()
                                    || write.iter().any(|w| w.cluster == "d")
                                    || route.pending_epoch().is_some()
                                    || same;
                                prop_assert!(refusable, "refused a valid proposal");
                            }
                        }
                    }
                    Op::Produce(c, p) => ends.get_mut(CL[c as usize]).unwrap()[p as usize] += 1,
                    Op::Ack(i) => {
                        if let Some(p) = route.pending_epoch() {
                            producers[i as usize].acked.insert("t".into(), p.n);
                        }
                    }
                    Op::Seal | Op::Abort => {
                        let step = plan(&route, &producers, now, OnAckDeadline::Proceed);
                        let Some(pending) = route.pending_epoch().cloned() else {
                            prop_assert_eq!(step, SwitchStep::Idle);
                            continue;
                        };
                        let all_acked = producers.iter().all(|p| p.acked.get("t") == Some(&pending.n));
                        let overdue = now >= pending.ack_deadline.unwrap();
                        match step {
                            SwitchStep::ReadBoundary { epoch, clusters, late } => {
                                prop_assert!(all_acked || overdue);
                                prop_assert_eq!(late.is_empty(), all_acked);
                                prop_assert_eq!(epoch, pending.n);
                                if matches!(op, Op::Seal) {
                                    let boundary = clusters.iter().map(|c| (c.clone(), ends[c].clone())).collect();
                                    let open_n = route.open_epoch().unwrap().n;
                                    route = seal(&route, epoch, boundary).unwrap();
                                    let sealed = route.epoch(open_n).unwrap();
                                    prop_assert_eq!(sealed.state, Sealed);
                                    prop_assert_eq!(sealed.fence.keys().cloned().collect::<Vec<_>>(), clusters);
                                    prop_assert_eq!(route.open_epoch().unwrap().n, epoch);
                                } else {
                                    route = abort(&route, epoch).unwrap();
                                }
                            }
                            SwitchStep::WaitForAcks { missing, .. } => {
                                prop_assert!(!all_acked && !overdue);
                                prop_assert!(!missing.is_empty());
                            }
                            s => prop_assert!(false, "unexpected {:?}", s),
                        }
                    }
                }
                route.validate().unwrap();
                prop_assert!(route.open_epoch().is_some());
                // Fences never go back on a cluster.
                let mut last: BTreeMap<&String, &Vec<i64>> = BTreeMap::new();
                for e in route.sealed_epochs() {
                    for (c, offs) in &e.fence {
                        if let Some(prev) = last.get(c) {
                            prop_assert!(prev.iter().zip(offs).all(|(a, b)| a <= b));
                        }
                        last.insert(c, offs);
                    }
                }
            }
        }
    }

    #[test]
    fn late_seals_hold_a_cluster_until_the_late_producer_acks_leaves_or_the_grace_passes() {
        let r = route(
            "t",
            1,
            vec![epoch(1, &["a"], Sealed), epoch(2, &["b"], Open)],
        );
        let with = |acked: &[(&str, u64)]| {
            let mut s = snapshot(&["a", "b"], vec![r.clone()]);
            let p = producer("p1", acked);
            s.clients.insert((p.kind, p.id.clone()), p);
            s
        };
        let mut late = LateSeals::default();
        late.record("t", 1, 2, vec!["p1".into()], 1_000);
        // Still registered and behind: a may not retire; b (not in epoch 1) may.
        let why = late
            .blocking(&with(&[("t", 1)]), "a", 2_000, 10_000)
            .expect("held");
        assert!(why.contains("p1") && why.contains("cluster a"), "{why}");
        assert!(late
            .blocking(&with(&[("t", 1)]), "b", 2_000, 10_000)
            .is_none());
        // The grace passed: forgotten.
        let mut l2 = late.clone();
        assert!(l2
            .blocking(&with(&[("t", 1)]), "a", 11_000, 10_000)
            .is_none());
        assert!(l2.is_empty());
        // It acknowledged the opened epoch: forgotten.
        let mut l3 = late.clone();
        assert!(l3
            .blocking(&with(&[("t", 2)]), "a", 2_000, 10_000)
            .is_none());
        assert!(l3.is_empty());
        // It left the registry: forgotten.
        assert!(late
            .blocking(&snapshot(&["a", "b"], vec![r.clone()]), "a", 2_000, 10_000)
            .is_none());
        assert!(late.is_empty());
    }
}
