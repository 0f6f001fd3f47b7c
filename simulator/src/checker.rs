//! The history checker's rules, as pure functions over [`RecInfo`].
//!
//! Both the simulated [`World`](crate::world::World) and live mode
//! ([`crate::live`]) feed their histories through these, so a live run is
//! judged by exactly the rules a simulated one is. Each function returns what
//! it found; the caller stamps the time and keeps the list (the world also
//! writes a trace line).

use flotilla_client::registry::{EpochState, TopicRoute};

use crate::history::{AnomalyKind, RecInfo};

/// Where a record was delivered from: (cluster index, partition, offset).
pub type DeliveredAt = (u16, u32, i64);

/// Applies the delivery rules to record `rid` delivered from `at`: counts the
/// delivery in `rec.consumed`, and checks that the offset holds that record,
/// that it was not delivered before, and that its sequence number is above
/// the last one consumed of its key (`key_last`, updated; stragglers are
/// exempt, they are late by definition).
pub fn on_delivery(
    rid: u64,
    rec: &mut RecInfo,
    key_last: &mut Option<u64>,
    at: DeliveredAt,
) -> Vec<(AnomalyKind, String)> {
    let mut found = Vec::new();
    let (c, p, off) = at;
    rec.consumed += 1;
    let (key, seq, consumed) = (rec.key, rec.seq, rec.consumed);
    let written = (rec.cluster, rec.partition, rec.offset);
    if written != (c, p, Some(off as u64)) {
        found.push((
            AnomalyKind::OffsetMismatch,
            format!("c{c}/{p}@{off} delivered r{rid}, written at {written:?}"),
        ));
    }
    if consumed > 1 {
        found.push((
            AnomalyKind::DuplicateDelivery,
            format!("r{rid} (key{key}#{seq}) delivered {consumed} times, last from c{c}/{p}@{off}"),
        ));
        return found;
    }
    if rec.straggler {
        return found;
    }
    let last = *key_last;
    if last.is_some_and(|l| l >= seq) {
        found.push((
            AnomalyKind::OrderViolation,
            format!(
                "key{key}: #{seq} (r{rid}, c{c}/{p}@{off}) consumed after #{}",
                last.unwrap_or(0)
            ),
        ));
    }
    *key_last = Some(last.map_or(seq, |l| l.max(seq)));
    found
}

/// Whether retiring the cluster that holds `rec` loses it for the group: it
/// was never consumed and is not an allowed straggler.
pub fn needed_at_retirement(rec: &RecInfo) -> bool {
    rec.consumed == 0 && !rec.straggler
}

/// At the end of a run: the anomaly for `rec` if it was acknowledged and
/// never consumed. `cluster_gone` says its cluster was torn down (or retired,
/// so no consumer reads it any more): then the record is lost for good,
/// otherwise it is merely not consumed yet.
pub fn unconsumed(rec: &RecInfo, cluster_gone: bool) -> Option<AnomalyKind> {
    if !rec.acked || rec.consumed > 0 {
        return None;
    }
    Some(if rec.straggler {
        AnomalyKind::StragglerLost
    } else if cluster_gone {
        AnomalyKind::AckedLost
    } else {
        AnomalyKind::NotConsumed
    })
}

/// The delivery rule of pre-join: a consumer whose route is `view` may
/// deliver a record of epoch `epoch` from `cluster` only if the view names
/// `cluster` in an open or sealed epoch (so its fence gate knows where the
/// cluster stands), and shows `epoch` open or sealed (or older than every
/// epoch it still lists: pruned history). A record read from a cluster that
/// only a pending epoch names (pre-joined), or of an epoch still pending in
/// the view, is delivered before the seal: `delivered-before-seal`.
///
/// Written from the route alone, independently of `gate::gated_by_route` and
/// `FenceGate::classify`, which the consumer adapter uses.
pub fn before_seal(
    view: Option<&TopicRoute>,
    cluster: &str,
    epoch: u64,
) -> Option<(AnomalyKind, String)> {
    let kind = AnomalyKind::DeliveredBeforeSeal;
    let Some(view) = view else {
        return Some((kind, format!("e{epoch} from {cluster} with no route known")));
    };
    let live = |s: EpochState| matches!(s, EpochState::Open | EpochState::Sealed);
    let named = view
        .epochs
        .iter()
        .any(|e| live(e.state) && e.write.iter().any(|w| w.cluster == cluster));
    if !named {
        return Some((
            kind,
            format!("e{epoch} from {cluster}, in no open or sealed epoch of the route seen"),
        ));
    }
    let oldest = view.epochs.iter().map(|e| e.n).min().unwrap_or(0);
    let ok = epoch < oldest || view.epochs.iter().any(|e| e.n == epoch && live(e.state));
    if !ok {
        let state = view.epoch(epoch).map(|e| e.state);
        return Some((
            kind,
            format!("e{epoch} from {cluster}, {state:?} in the route seen"),
        ));
    }
    None
}
