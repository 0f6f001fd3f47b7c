//! The live history: every send, acknowledgement, delivery and retirement of
//! a live run, in the order the driver saw them, and its check through the
//! simulator's own rules ([`crate::checker`]).
//!
//! Live records are [`RecInfo`]s like simulated ones (record id = index;
//! key and per-key sequence number travel in the payload). What a real run
//! cannot know is converted, not re-judged:
//!
//! - A delivery may be seen before the producer's acknowledgement returns
//!   (the consumer is fast, the delivery report slow), so deliveries are
//!   checked after the run, with every acknowledgement in; the retirement
//!   rule only counts records acknowledged before the retirement was seen.
//! - The group commits after processing (at least once). A record delivered
//!   again after a delivery whose commit did not succeed (cluster killed,
//!   rebalance) is an *allowed redelivery*: counted, not fed to the rules.
//!   One delivered again after a successful commit is a duplicate; one
//!   delivered from a second place landed twice (`duplicate-append`), and
//!   two acknowledgements naming one offset are an `offset-mismatch`.
//! - Where an unacknowledged record landed is unknown: its first delivery
//!   says so (the offset rule only holds for acknowledged records).
//! - A retired cluster is never read again, so it counts as torn down for
//!   the end-of-run rule (acknowledged and never consumed there = lost).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

use flotilla_client::registry::TopicRoute;

use crate::checker;
use crate::history::{Anomalies, AnomalyKind, RecInfo};

/// One delivery to the group, as the member saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Key index, from the payload.
    pub key: u32,
    /// Sequence number within the key, from the payload.
    pub seq: u64,
    /// Cluster index it came from.
    pub cluster: u16,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
    /// Its epoch header, if any.
    pub epoch: Option<u64>,
    /// The consumer classified it as a straggler.
    pub straggler: bool,
    /// The member that processed it.
    pub member: u16,
}

/// One event of the live history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Record `rid` was acknowledged (its place is in the [`RecInfo`]).
    Ack {
        /// Record id.
        rid: u64,
    },
    /// A delivery; `settled` once its commit succeeded.
    Deliver {
        /// What was delivered.
        d: Delivered,
        /// Its commit succeeded.
        settled: bool,
    },
    /// The driver saw cluster `cluster` retired in the registry.
    Retired {
        /// Cluster index.
        cluster: u16,
    },
}

#[derive(Debug, Default)]
struct Inner {
    recs: Vec<RecInfo>,
    by_key_seq: BTreeMap<(u32, u64), u64>,
    events: Vec<(u64, Event)>,
    /// Records delivered at least once.
    seen: BTreeSet<u64>,
    /// Deliveries whose record was not created (yet) at delivery time, checked at the end.
    acked: u64,
    acked_seen: u64,
    deliveries: u64,
}

/// The live history, shared by every task of the run.
#[derive(Debug)]
pub struct Recorder {
    t0: Instant,
    inner: Mutex<Inner>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

/// What the end of a run looked like, for the end-of-run rules.
#[derive(Debug, Clone, Default)]
pub struct EndState {
    /// The topic's route at the end (`None`: unreadable).
    pub route: Option<TopicRoute>,
    /// Clusters retired by then.
    pub retired: BTreeSet<u16>,
    /// Producers that still had records held or sends outstanding: (producer, detail).
    pub stuck_producers: Vec<(u16, String)>,
}

/// The verdict on a live history.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// What the rules found.
    pub anomalies: Anomalies,
    /// Records created (sends started).
    pub records: u64,
    /// Records acknowledged.
    pub acked: u64,
    /// Records whose send failed.
    pub failed: u64,
    /// Deliveries fed to the rules.
    pub consumed: u64,
    /// Distinct acknowledged records delivered.
    pub acked_consumed: u64,
    /// Allowed redeliveries (after a commit that did not succeed).
    pub redelivered: u64,
    /// Records delivered as stragglers.
    pub stragglers: u64,
    /// Events in the history.
    pub events: u64,
}

impl Recorder {
    /// An empty history; times are measured from now.
    pub fn new() -> Self {
        Recorder {
            t0: Instant::now(),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// A producer starts sending record `seq` of `key`: its record id.
    pub fn created(&self, key: u32, seq: u64, producer: u16) -> u64 {
        let mut g = self.lock();
        let rid = g.recs.len() as u64;
        g.recs.push(RecInfo {
            key,
            seq,
            producer,
            ..RecInfo::default()
        });
        g.by_key_seq.insert((key, seq), rid);
        rid
    }

    /// Kafka acknowledged `rid` at `cluster`/`partition`@`offset`, sent with `epoch`.
    pub fn acked(&self, rid: u64, cluster: u16, partition: u32, offset: i64, epoch: u64) {
        let at = self.now_ms();
        let mut g = self.lock();
        let r = &mut g.recs[rid as usize];
        r.acked = true;
        r.cluster = cluster;
        r.partition = partition;
        r.offset = u64::try_from(offset).ok();
        r.epoch = epoch;
        r.sent_at = at;
        g.acked += 1;
        if g.seen.contains(&rid) {
            g.acked_seen += 1;
        }
        g.events.push((at, Event::Ack { rid }));
    }

    /// The send of `rid` failed (never acknowledged; it may still have landed).
    pub fn failed(&self, rid: u64) {
        self.lock().recs[rid as usize].failed = true;
    }

    /// A member processed `d`; returns the event's index for [`Recorder::settled`].
    pub fn delivered(&self, d: Delivered) -> usize {
        let at = self.now_ms();
        let mut g = self.lock();
        g.deliveries += 1;
        if let Some(&rid) = g.by_key_seq.get(&(d.key, d.seq)) {
            if g.seen.insert(rid) && g.recs[rid as usize].acked {
                g.acked_seen += 1;
            }
        }
        g.events.push((at, Event::Deliver { d, settled: false }));
        g.events.len() - 1
    }

    /// The commit of the delivery at `index` succeeded.
    pub fn settled(&self, index: usize) {
        if let Some((_, Event::Deliver { settled, .. })) = self.lock().events.get_mut(index) {
            *settled = true;
        }
    }

    /// The driver saw `cluster` retired.
    pub fn retired(&self, cluster: u16) {
        let at = self.now_ms();
        self.lock().events.push((at, Event::Retired { cluster }));
    }

    /// (records acknowledged, of those delivered at least once, deliveries).
    pub fn progress(&self) -> (u64, u64, u64) {
        let g = self.lock();
        (g.acked, g.acked_seen, g.deliveries)
    }

    /// Acknowledged records per cluster index.
    pub fn acked_per_cluster(&self) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for r in self.lock().recs.iter().filter(|r| r.acked) {
            *out.entry(r.cluster).or_insert(0) += 1;
        }
        out
    }

    /// A copy of the events so far, with their times (ms since the recorder started).
    pub fn events(&self) -> Vec<(u64, Event)> {
        self.lock().events.clone()
    }

    /// Removes the `n`-th delivery event (0-based), e.g. to show that the
    /// check notices a lost delivery. Returns whether there was one.
    pub fn drop_delivery(&self, n: usize) -> bool {
        let mut g = self.lock();
        let idx = g
            .events
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| matches!(e, Event::Deliver { .. }))
            .nth(n)
            .map(|(i, _)| i);
        match idx {
            Some(i) => {
                g.events.remove(i);
                true
            }
            None => false,
        }
    }

    /// Checks the history with the simulator's rules (see the module docs for
    /// what is converted how).
    pub fn check(&self, end: &EndState) -> Checked {
        let g = self.lock();
        let mut recs = g.recs.clone();
        let mut out = Checked {
            records: recs.len() as u64,
            acked: g.acked,
            failed: recs.iter().filter(|r| r.failed).count() as u64,
            events: g.events.len() as u64,
            ..Checked::default()
        };
        let mut ack_index: Vec<Option<usize>> = vec![None; recs.len()];
        for (i, (_, e)) in g.events.iter().enumerate() {
            if let Event::Ack { rid } = e {
                ack_index[*rid as usize] = Some(i);
            }
        }
        // Each (cluster, partition, offset) holds one record: no two
        // acknowledgements name the same place.
        let mut places: BTreeMap<(u16, u32, u64), u64> = BTreeMap::new();
        let mut shared_places = Vec::new();
        for (rid, r) in recs.iter().enumerate() {
            if let (true, Some(o)) = (r.acked, r.offset) {
                if let Some(other) = places.insert((r.cluster, r.partition, o), rid as u64) {
                    shared_places.push(format!(
                        "r{other} and r{rid} both acknowledged at c{}/{}@{o}",
                        r.cluster, r.partition
                    ));
                }
            }
        }
        for detail in shared_places {
            out.anomalies.push(AnomalyKind::OffsetMismatch, 0, detail);
        }
        // Where each record was first delivered from.
        let mut first_at: BTreeMap<u64, (u16, u32, i64)> = BTreeMap::new();
        let mut key_last: BTreeMap<u32, Option<u64>> = BTreeMap::new();
        // Whether the last delivery of each record was committed.
        let mut last_settled: BTreeMap<u64, bool> = BTreeMap::new();
        let mut stragglers = BTreeSet::new();
        let a = &mut out.anomalies;
        for (i, (at, e)) in g.events.iter().enumerate() {
            match e {
                Event::Ack { .. } => {}
                Event::Deliver { d, settled } => {
                    let Some(&rid) = g.by_key_seq.get(&(d.key, d.seq)) else {
                        a.push(
                            AnomalyKind::OffsetMismatch,
                            *at,
                            format!(
                                "c{}/{}@{} delivered key{}#{}, which no producer sent",
                                d.cluster, d.partition, d.offset, d.key, d.seq
                            ),
                        );
                        continue;
                    };
                    let rec = &mut recs[rid as usize];
                    let here = (d.cluster, d.partition, d.offset);
                    let first = *first_at.entry(rid).or_insert(here);
                    let prev_settled = last_settled.insert(rid, *settled);
                    if first != here {
                        // The same record at two places: it landed twice
                        // (idempotence failed), not a redelivery.
                        a.push(
                            AnomalyKind::DuplicateAppend,
                            *at,
                            format!(
                                "r{rid} key{}#{} delivered from c{}/{}@{} and from c{}/{}@{}",
                                d.key, d.seq, first.0, first.1, first.2, here.0, here.1, here.2
                            ),
                        );
                    } else if prev_settled == Some(false) {
                        // Same place again after an unconfirmed commit: at least once.
                        out.redelivered += 1;
                        continue;
                    }
                    if !rec.acked && rec.offset.is_none() {
                        rec.cluster = d.cluster;
                        rec.partition = d.partition;
                        rec.offset = u64::try_from(d.offset).ok();
                    }
                    if d.straggler {
                        rec.straggler = true;
                        stragglers.insert(rid);
                    } else if let (Some(route), Some(n)) = (&end.route, d.epoch) {
                        let cluster = format!("c{}", d.cluster);
                        if !route.epoch(n).is_some_and(|e| e.writes_to(&cluster)) {
                            a.push(
                                AnomalyKind::WriteOutsideOpenEpoch,
                                *at,
                                format!(
                                    "r{rid} key{}#{} at {cluster}/{}@{} carries epoch {n}, which does not write to {cluster}",
                                    d.key, d.seq, d.partition, d.offset
                                ),
                            );
                        }
                    }
                    out.consumed += 1;
                    let last = key_last.entry(rec.key).or_insert(None);
                    for (kind, detail) in
                        checker::on_delivery(rid, rec, last, (d.cluster, d.partition, d.offset))
                    {
                        a.push(kind, *at, detail);
                    }
                }
                Event::Retired { cluster } => {
                    let missing: Vec<u64> = (0..recs.len())
                        .filter(|&rid| {
                            let r = &recs[rid];
                            r.cluster == *cluster
                                && ack_index[rid].is_some_and(|ai| ai < i)
                                && checker::needed_at_retirement(r)
                        })
                        .map(|rid| rid as u64)
                        .collect();
                    if let Some(first) = missing.first() {
                        let r = &recs[*first as usize];
                        a.push(
                            AnomalyKind::RetiredWhileNeeded,
                            *at,
                            format!(
                                "c{cluster} retired with {} acknowledged records not consumed, first r{first} key{}#{} at {}@{}",
                                missing.len(),
                                r.key,
                                r.seq,
                                r.partition,
                                r.offset.unwrap_or(0)
                            ),
                        );
                    }
                }
            }
        }
        let end_at = g.events.last().map_or(0, |(t, _)| *t);
        for (rid, r) in recs.iter().enumerate() {
            if let Some(kind) = checker::unconsumed(r, end.retired.contains(&r.cluster)) {
                a.push(
                    kind,
                    end_at,
                    format!(
                        "acknowledged r{rid} key{}#{} e{} at c{}/{}@{} never consumed",
                        r.key,
                        r.seq,
                        r.epoch,
                        r.cluster,
                        r.partition,
                        r.offset.unwrap_or(0)
                    ),
                );
            }
            if r.acked && r.consumed > 0 {
                out.acked_consumed += 1;
            }
        }
        if let Some(p) = end.route.as_ref().and_then(|r| r.pending_epoch()) {
            a.push(
                AnomalyKind::SwitchStuck,
                end_at,
                format!("epoch {} still pending at the end", p.n),
            );
        }
        for (p, why) in &end.stuck_producers {
            a.push(
                AnomalyKind::ProducerStuck,
                end_at,
                format!("prod{p}: {why}"),
            );
        }
        out.stragglers = stragglers.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(r: &Recorder, key: u32, seq: u64, offset: i64) -> usize {
        r.delivered(Delivered {
            key,
            seq,
            cluster: 0,
            partition: 1,
            offset,
            epoch: None,
            straggler: false,
            member: 0,
        })
    }

    /// Three acknowledged records of one key, each delivered once and committed.
    fn clean() -> Recorder {
        let r = Recorder::new();
        for seq in 0..3 {
            let rid = r.created(5, seq, 0);
            // The second delivery is seen before its acknowledgement.
            if seq == 1 {
                let i = deliver(&r, 5, seq, seq as i64);
                r.settled(i);
                r.acked(rid, 0, 1, seq as i64, 1);
            } else {
                r.acked(rid, 0, 1, seq as i64, 1);
                let i = deliver(&r, 5, seq, seq as i64);
                r.settled(i);
            }
        }
        r
    }

    fn kinds(c: &Checked) -> Vec<AnomalyKind> {
        c.anomalies.list.iter().map(|a| a.kind).collect()
    }

    #[test]
    fn a_clean_history_passes_and_counts_everything() {
        let r = clean();
        assert_eq!(r.progress(), (3, 3, 3));
        let c = r.check(&EndState::default());
        assert!(c.anomalies.is_empty(), "{:?}", c.anomalies);
        assert_eq!(
            (c.records, c.acked, c.consumed, c.acked_consumed),
            (3, 3, 3, 3)
        );
    }

    #[test]
    fn a_dropped_delivery_is_reported_not_consumed_or_lost_if_retired() {
        let r = clean();
        assert!(r.drop_delivery(1));
        let c = r.check(&EndState::default());
        assert_eq!(kinds(&c), [AnomalyKind::NotConsumed]);
        let gone = EndState {
            retired: [0].into(),
            ..EndState::default()
        };
        assert_eq!(kinds(&r.check(&gone)), [AnomalyKind::AckedLost]);
        r.retired(0);
        let k = kinds(&r.check(&gone));
        assert!(k.contains(&AnomalyKind::RetiredWhileNeeded), "{k:?}");
    }

    #[test]
    fn duplicates_order_and_offsets_are_flagged_but_redelivery_after_a_failed_commit_is_not() {
        // Redelivered after an unsettled delivery: allowed.
        let r = clean();
        let rid = r.created(5, 3, 0);
        r.acked(rid, 0, 1, 3, 1);
        deliver(&r, 5, 3, 3);
        let i = deliver(&r, 5, 3, 3);
        r.settled(i);
        let c = r.check(&EndState::default());
        assert!(c.anomalies.is_empty(), "{:?}", c.anomalies);
        assert_eq!(c.redelivered, 1);
        // Delivered again after a committed delivery: duplicate.
        deliver(&r, 5, 1, 1);
        assert_eq!(
            kinds(&r.check(&EndState::default())),
            [AnomalyKind::DuplicateDelivery]
        );
        // The same record from a second place (landed twice), even after an
        // unconfirmed commit: a duplicate append, not a redelivery.
        let r2 = clean();
        let rid = r2.created(5, 3, 0);
        r2.acked(rid, 0, 1, 3, 1);
        deliver(&r2, 5, 3, 3);
        r2.settled(deliver(&r2, 5, 3, 4));
        let k = kinds(&r2.check(&EndState::default()));
        assert_eq!(k[0], AnomalyKind::DuplicateAppend, "{k:?}");
        // Two acknowledgements at one offset.
        let r3 = clean();
        let rid = r3.created(6, 0, 0);
        r3.acked(rid, 0, 1, 2, 1);
        r3.settled(deliver(&r3, 6, 0, 2));
        let k = kinds(&r3.check(&EndState::default()));
        assert!(k.contains(&AnomalyKind::OffsetMismatch), "{k:?}");
        // Out of order and at the wrong offset.
        let r = Recorder::new();
        for seq in 0..2 {
            let rid = r.created(9, seq, 0);
            r.acked(rid, 0, 1, seq as i64, 1);
        }
        r.settled(deliver(&r, 9, 1, 1));
        r.settled(deliver(&r, 9, 0, 7));
        assert_eq!(
            kinds(&r.check(&EndState::default())),
            [AnomalyKind::OffsetMismatch, AnomalyKind::OrderViolation]
        );
    }
}
