//! What the checker knows about every record, and the anomalies it reports.

use std::collections::BTreeMap;
use std::fmt;

/// The kinds of anomaly the history checker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnomalyKind {
    /// An acknowledged record is gone for good (its cluster was torn down
    /// before the group consumed it, or the group skipped it).
    AckedLost,
    /// A straggler (late record of a sealed epoch from a producer without a
    /// lease) was written but never consumed.
    StragglerLost,
    /// A record was delivered to the group more than once.
    DuplicateDelivery,
    /// A record was appended to the logs more than once (idempotence failed).
    DuplicateAppend,
    /// A consumer delivered an offset that holds another record than the one written there.
    OffsetMismatch,
    /// A key's records were consumed out of sequence order.
    OrderViolation,
    /// A record landed outside the open epoch and is not an allowed straggler
    /// (written with a pending/aborted epoch, to a cluster outside the write set,
    /// or by a producer that had acknowledged the next epoch).
    WriteOutsideOpenEpoch,
    /// A cluster was retired while the group still had acknowledged records to read on it.
    RetiredWhileNeeded,
    /// After healing, a route switch was still pending at the end of the run.
    SwitchStuck,
    /// After healing, an acknowledged record on a live cluster was still not consumed.
    NotConsumed,
    /// After healing, a live producer still had records held or in flight.
    ProducerStuck,
    /// A consumer delivered a record from a cluster its route does not gate
    /// yet (named only by a pending epoch: a pre-joined cluster), or a record
    /// of an epoch its route does not show sealed or open: delivered before
    /// the seal, past the fence gate.
    DeliveredBeforeSeal,
    /// A backfill did not finish: a source record of its range never reached
    /// the target topic, or its temporary clusters were not retired.
    BackfillIncomplete,
}

impl AnomalyKind {
    /// Short stable name.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::AckedLost => "acked-lost",
            AnomalyKind::StragglerLost => "straggler-lost",
            AnomalyKind::DuplicateDelivery => "duplicate-delivery",
            AnomalyKind::DuplicateAppend => "duplicate-append",
            AnomalyKind::OffsetMismatch => "offset-mismatch",
            AnomalyKind::OrderViolation => "order-violation",
            AnomalyKind::WriteOutsideOpenEpoch => "write-outside-open-epoch",
            AnomalyKind::RetiredWhileNeeded => "retired-while-needed",
            AnomalyKind::SwitchStuck => "switch-stuck",
            AnomalyKind::NotConsumed => "not-consumed",
            AnomalyKind::ProducerStuck => "producer-stuck",
            AnomalyKind::DeliveredBeforeSeal => "delivered-before-seal",
            AnomalyKind::BackfillIncomplete => "backfill-incomplete",
        }
    }
}

impl fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One anomaly found in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// What kind.
    pub kind: AnomalyKind,
    /// Virtual time (ms) when it was detected.
    pub at: u64,
    /// A readable sentence.
    pub detail: String,
}

/// Everything known about one produced record.
#[derive(Debug, Clone, Default)]
pub struct RecInfo {
    /// Key index (global).
    pub key: u32,
    /// Sequence number of the record within its key (strictly increasing).
    pub seq: u64,
    /// Producer index.
    pub producer: u16,
    /// Producer session (incarnation) that created it.
    pub session: u32,
    /// Epoch it was routed with (0 before routing).
    pub epoch: u64,
    /// Its number among its producer's sends of its epoch (for flush marks).
    pub send_no: u64,
    /// When it was handed to a cluster connection (virtual ms).
    pub sent_at: u64,
    /// Cluster index it was sent to.
    pub cluster: u16,
    /// Partition.
    pub partition: u32,
    /// Where it landed, if it did: offset.
    pub offset: Option<u64>,
    /// Times an append of it was attempted after it had already landed (deduped).
    pub dedup: u32,
    /// Kafka acknowledged it to the producer.
    pub acked: bool,
    /// The producer gave up on it (never acknowledged).
    pub failed: bool,
    /// It landed above a boundary of its sealed epoch, written by a producer
    /// the controller did not wait for: an allowed straggler.
    pub straggler: bool,
    /// How many times the group delivered it.
    pub consumed: u32,
}

/// Collected anomalies of a run.
#[derive(Debug, Clone, Default)]
pub struct Anomalies {
    /// In detection order.
    pub list: Vec<Anomaly>,
}

impl Anomalies {
    /// Records one anomaly.
    pub fn push(&mut self, kind: AnomalyKind, at: u64, detail: String) {
        self.list.push(Anomaly { kind, at, detail });
    }

    /// Count per kind.
    pub fn by_kind(&self) -> BTreeMap<AnomalyKind, u64> {
        let mut m = BTreeMap::new();
        for a in &self.list {
            *m.entry(a.kind).or_insert(0) += 1;
        }
        m
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
