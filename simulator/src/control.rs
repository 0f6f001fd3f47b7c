//! The controller's decisions, as pure functions over a [`TopicRoute`].
//!
//! The real controller's switch planner (`flotilla_client::route::switch`) was
//! still being written when the simulator was built; these functions follow
//! DESIGN "Handoff protocol" steps 3 and 5 to the letter and are the single
//! seam to replace with `switch::plan_switch` / `seal` / `abort` /
//! `may_retire` once that module lands. Everything else the simulator drives
//! (the producer [`Router`](flotilla_client::route::router::Router) and the
//! consumer [`FenceGate`](flotilla_client::route::gate::FenceGate)) is the real core.

use std::collections::BTreeMap;

use flotilla_client::registry::{ClientKind, EpochState, FleetSnapshot, PartitionOffsets, TopicRoute};

/// What the controller should do about a topic's pending epoch right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchStep {
    /// Nothing pending, or still waiting for acknowledgements.
    Wait,
    /// Every live producer acknowledged: read the boundary of these clusters and seal.
    Seal {
        /// Clusters of the open and the pending epoch, whose end offsets form the fence.
        clusters: Vec<String>,
    },
    /// The acknowledgement deadline passed with a live producer missing: abort.
    Abort,
}

/// Step 3: decides about the pending epoch of `topic` in `snap` at controller time `now`.
/// Producers whose lease expired are not in the snapshot and so count as gone.
pub fn plan_switch(snap: &FleetSnapshot, topic: &str, now: u64) -> SwitchStep {
    let Some(route) = snap.route(topic) else {
        return SwitchStep::Wait;
    };
    let Some(p) = route.pending_epoch() else {
        return SwitchStep::Wait;
    };
    let all_acked = snap
        .clients
        .iter()
        .filter(|((k, _), _)| *k == ClientKind::Producer)
        .all(|(_, r)| r.acked.get(topic).is_some_and(|&a| a >= p.n));
    if all_acked {
        let mut clusters: Vec<String> = route
            .open_epoch()
            .into_iter()
            .flat_map(|e| e.clusters().cloned())
            .chain(p.clusters().cloned())
            .collect();
        clusters.sort();
        clusters.dedup();
        return SwitchStep::Seal { clusters };
    }
    if p.ack_deadline.is_some_and(|d| now >= d) {
        return SwitchStep::Abort;
    }
    SwitchStep::Wait
}

/// Seals the open epoch with `fence` and opens the pending one, in one change.
/// Returns the numbers (sealed, opened), or `None` when nothing is pending.
pub fn seal(route: &mut TopicRoute, fence: BTreeMap<String, PartitionOffsets>) -> Option<(u64, u64)> {
    let p = route.pending_epoch()?.n;
    let mut sealed = 0;
    for e in route.epochs.iter_mut() {
        if e.state == EpochState::Open {
            e.state = EpochState::Sealed;
            e.fence = fence.clone();
            sealed = e.n;
        } else if e.n == p {
            e.state = EpochState::Open;
        }
    }
    Some((sealed, p))
}

/// Aborts the pending epoch; returns its number.
pub fn abort(route: &mut TopicRoute) -> Option<u64> {
    let e = route.epochs.iter_mut().find(|e| e.state == EpochState::Pending)?;
    e.state = EpochState::Aborted;
    Some(e.n)
}

/// Step 5: whether `cluster` may retire: no open or pending epoch writes to it,
/// and the group has committed, on every partition, up to its boundary in
/// every sealed epoch whose fence names it (`committed(cluster, partition)`).
pub fn may_retire(route: &TopicRoute, cluster: &str, committed: impl Fn(u32) -> i64) -> bool {
    let in_use = route.epochs.iter().any(|e| {
        matches!(e.state, EpochState::Open | EpochState::Pending) && e.writes_to(cluster)
    });
    if in_use {
        return false;
    }
    route.sealed_epochs().all(|e| {
        e.fence.get(cluster).is_none_or(|f| {
            f.iter()
                .enumerate()
                .all(|(p, &o)| committed(p as u32) >= o)
        })
    })
}
