//! The history checker's rules, as pure functions over [`RecInfo`].
//!
//! Both the simulated [`World`](crate::world::World) and live mode
//! ([`crate::live`]) feed their histories through these, so a live run is
//! judged by exactly the rules a simulated one is. Each function returns what
//! it found; the caller stamps the time and keeps the list (the world also
//! writes a trace line).

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
