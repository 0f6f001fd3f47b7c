//! The backfill's state in the registry: [`BackfillRecord`] at
//! `/flotilla/<fleet>/backfills/<name>`, written with compare-and-swap.
//!
//! The watcher ignores this key kind ([`FleetKey::parse`] returns `None` for
//! it), so clients never choke on it.
//!
//! [`FleetKey::parse`]: flotilla_client::registry::store::FleetKey::parse

use std::collections::BTreeMap;
use std::fmt;

use flotilla_client::registry::{
    decode, encode, Expect, Registry, RegistryError, Revision, UnixMillis, WeightedCluster,
    SCHEMA_VERSION,
};
use serde::{Deserialize, Serialize};

use super::BackfillError;

/// Where a backfill is. Phases only move forward; `resume` re-enters the
/// current one (every phase is idempotent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Bringing up, registering and checking the temporary clusters; creating the target topic.
    Provisioning,
    /// Opening an epoch of the target topic over the temporary clusters.
    Routing,
    /// Copying the source range into the target topic.
    Replaying,
    /// Waiting for the named consumer groups to reach lag 0 on every temporary cluster.
    Waiting,
    /// Switching the target topic back, draining, retiring and deprovisioning.
    TearingDown,
    /// Finished: every record copied once, temporary clusters retired.
    Done,
    /// `abort` was asked: retiring and deprovisioning what the backfill created.
    Aborting,
    /// Aborted: what the backfill created is retired (or left to retire, see `notes`).
    Aborted,
}

impl Phase {
    /// Whether nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted)
    }

    /// Parses a phase name (as printed by [`fmt::Display`]).
    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "provisioning" => Phase::Provisioning,
            "routing" => Phase::Routing,
            "replaying" => Phase::Replaying,
            "waiting" => Phase::Waiting,
            "tearing_down" => Phase::TearingDown,
            "done" => Phase::Done,
            "aborting" => Phase::Aborting,
            "aborted" => Phase::Aborted,
            _ => return None,
        })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Provisioning => "provisioning",
            Phase::Routing => "routing",
            Phase::Replaying => "replaying",
            Phase::Waiting => "waiting",
            Phase::TearingDown => "tearing_down",
            Phase::Done => "done",
            Phase::Aborting => "aborting",
            Phase::Aborted => "aborted",
        })
    }
}

/// Where the records come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Registry id of the source cluster, when it is registered (its security
    /// profile is then used); `None` when given by bootstrap address.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Bootstrap servers of the source cluster.
    pub bootstrap: String,
    /// Kafka cluster id the source answered with at start (checked on resume).
    #[serde(default)]
    pub kafka_cluster_id: String,
    /// Source topic.
    pub topic: String,
}

/// One end of the range as the operator gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Bound {
    /// The log start (`--from`) or the end at start time (`--to`).
    Edge,
    /// An offset, the same for every partition (clamped to what exists).
    Offset(i64),
    /// A timestamp (ms since the Unix epoch): the first offset at or after it.
    Time(i64),
}

impl Bound {
    /// Parses `earliest`/`latest`/`end`, an offset (`1234`, `offset:1234`) or a
    /// time (`time:<unix ms>`, `<unix ms>ms`, or RFC 3339 `2026-11-25T10:00:00Z`).
    pub fn parse(s: &str) -> Result<Bound, String> {
        let s = s.trim();
        if matches!(s, "earliest" | "latest" | "start" | "end") {
            return Ok(Bound::Edge);
        }
        let bad = || {
            format!(
                "`{s}` is not a range bound: use an offset (1234 or offset:1234), a time \
                 (time:<unix ms>, <unix ms>ms or 2026-11-25T10:00:00Z), earliest or latest"
            )
        };
        if let Some(o) = s.strip_prefix("offset:") {
            return o.parse().map(Bound::Offset).map_err(|_| bad());
        }
        if let Some(t) = s.strip_prefix("time:") {
            return t.parse().map(Bound::Time).map_err(|_| bad());
        }
        if let Some(t) = s.strip_suffix("ms") {
            return t.parse().map(Bound::Time).map_err(|_| bad());
        }
        if let Ok(o) = s.parse::<i64>() {
            return Ok(Bound::Offset(o));
        }
        parse_rfc3339(s).map(Bound::Time).ok_or_else(bad)
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Edge => f.write_str("edge"),
            Bound::Offset(o) => write!(f, "offset {o}"),
            Bound::Time(t) => write!(f, "time {t}ms"),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z` to Unix milliseconds (UTC only).
fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':');
    let (hh, mm, ss): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

/// The copy range of one source partition, resolved at start: `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRange {
    /// Source partition.
    pub partition: i32,
    /// First offset to copy.
    pub from: i64,
    /// One past the last offset to copy.
    pub to: i64,
}

impl PartitionRange {
    /// Records in the range.
    pub fn len(&self) -> u64 {
        (self.to - self.from).max(0) as u64
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.to <= self.from
    }
}

/// A temporary cluster of the backfill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TempCluster {
    /// Registry id (`<backfill>-tmpN` when provisioned by command).
    pub id: String,
    /// Bootstrap servers; `None` until the provision command printed them.
    #[serde(default)]
    pub bootstrap: Option<String>,
    /// Whether the backfill's provision command created it (and so must deprovision it).
    #[serde(default)]
    pub provisioned: bool,
    /// Whether the deprovision command has run for it.
    #[serde(default)]
    pub deprovisioned: bool,
}

/// A checkpoint of the replay: every record of every source partition below
/// `positions` is acknowledged by the target clusters, and every record copied
/// after it lands at or above `target_ends` (read after the flush, before any
/// later send). See `docs/backfill.md`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Per source partition, the next offset to copy.
    pub positions: BTreeMap<i32, i64>,
    /// Per temporary cluster, the end offset of every target partition at the checkpoint.
    pub target_ends: BTreeMap<String, Vec<i64>>,
    /// Records acknowledged in total (for progress).
    #[serde(default)]
    pub records: u64,
    /// Key + payload bytes acknowledged in total (for progress).
    #[serde(default)]
    pub bytes: u64,
    /// When the checkpoint was written.
    #[serde(default)]
    pub at: UnixMillis,
}

/// The previous route of the target topic, captured at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousRoute {
    /// The write set of its open epoch (empty: the topic had a route but no open epoch).
    pub write: Vec<WeightedCluster>,
}

/// One backfill, stored at `backfills/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillRecord {
    /// Schema version.
    pub version: u32,
    /// Name (unique in the fleet; also the `purpose` of its temporary clusters).
    pub name: String,
    /// Where the records come from.
    pub source: Source,
    /// `--from` as given.
    pub from: Bound,
    /// `--to` as given.
    pub to: Bound,
    /// Per source partition, the resolved range.
    pub ranges: Vec<PartitionRange>,
    /// Target topic (routed over the temporary clusters while the backfill runs).
    pub target_topic: String,
    /// Partition count of the target topic.
    pub target_partitions: u32,
    /// Temporary clusters, in order.
    pub clusters: Vec<TempCluster>,
    /// Shell command bringing one cluster up (prints its bootstrap), if any.
    #[serde(default)]
    pub provision_cmd: Option<String>,
    /// Shell command taking a cluster down (its bootstrap is the last argument), if any.
    #[serde(default)]
    pub deprovision_cmd: Option<String>,
    /// Expiry of the temporary clusters.
    pub expires_at: UnixMillis,
    /// Consumer groups that must read everything before tear-down.
    pub groups: Vec<String>,
    /// The target topic's route before the backfill (`None`: it had none).
    #[serde(default)]
    pub previous_route: Option<PreviousRoute>,
    /// Current phase.
    pub phase: Phase,
    /// Replay progress, once replay started.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// The epoch of the target topic the backfill opened over the temporary clusters.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// Records a resumed replay found already copied after the last checkpoint
    /// (by their source coordinates) and did not copy again, over all resumes.
    #[serde(default)]
    pub skipped_duplicates: u64,
    /// The last error that stopped the driver (cleared on success).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Free-form notes for the operator (e.g. what an abort left behind).
    #[serde(default)]
    pub notes: Vec<String>,
    /// When the backfill was started.
    pub created_at: UnixMillis,
    /// When the record was last written.
    pub updated_at: UnixMillis,
    /// When each phase was entered.
    #[serde(default)]
    pub phase_times: BTreeMap<String, UnixMillis>,
}

impl BackfillRecord {
    /// Records in the whole range.
    pub fn total_records(&self) -> u64 {
        self.ranges.iter().map(PartitionRange::len).sum()
    }

    /// Records copied as of the last checkpoint.
    pub fn copied_records(&self) -> u64 {
        let Some(cp) = &self.checkpoint else { return 0 };
        self.ranges
            .iter()
            .map(|r| {
                let pos = cp.positions.get(&r.partition).copied().unwrap_or(r.from);
                (pos.clamp(r.from, r.to) - r.from) as u64
            })
            .sum()
    }

    /// The ids of the temporary clusters.
    pub fn cluster_ids(&self) -> Vec<String> {
        self.clusters.iter().map(|c| c.id.clone()).collect()
    }

    /// Moves to `phase` at `now`.
    pub fn enter(&mut self, phase: Phase, now: UnixMillis) {
        self.phase = phase;
        self.phase_times.insert(phase.to_string(), now);
    }
}

/// The registry key of backfill `name`.
pub fn backfill_key(registry: &Registry, name: &str) -> String {
    format!("{}backfills/{name}", registry.prefix())
}

/// Checks a backfill name (it becomes part of registry keys and cluster ids).
pub fn check_name(name: &str) -> Result<(), BackfillError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(BackfillError::BadInput(format!(
            "backfill name `{name}`: use 1-100 letters, digits, `-`, `_` or `.`"
        )))
    }
}

/// Reads and writes [`BackfillRecord`]s with compare-and-swap.
#[derive(Debug, Clone)]
pub struct BackfillStore {
    registry: Registry,
}

impl BackfillStore {
    /// The backfills of the fleet in `registry`.
    pub fn new(registry: Registry) -> Self {
        BackfillStore { registry }
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Backfill `name` and its `mod_revision`.
    pub async fn get(
        &self,
        name: &str,
    ) -> Result<Option<(BackfillRecord, Revision)>, BackfillError> {
        let key = backfill_key(&self.registry, name);
        match self.registry.kv().get(&key).await? {
            None => Ok(None),
            Some(e) => Ok(Some((
                decode(&key, &e.value).map_err(RegistryError::from)?,
                e.mod_revision,
            ))),
        }
    }

    /// Backfill `name`, or [`BackfillError::NotFound`].
    pub async fn load(&self, name: &str) -> Result<(BackfillRecord, Revision), BackfillError> {
        self.get(name)
            .await?
            .ok_or_else(|| BackfillError::NotFound(name.to_string()))
    }

    /// Every backfill of the fleet.
    pub async fn list(&self) -> Result<Vec<BackfillRecord>, BackfillError> {
        let prefix = format!("{}backfills/", self.registry.prefix());
        let (entries, _) = self.registry.kv().list(&prefix).await?;
        let mut out = Vec::new();
        for e in entries {
            out.push(decode(&e.key, &e.value).map_err(RegistryError::from)?);
        }
        Ok(out)
    }

    /// Creates the record; a backfill of the same name is [`BackfillError::AlreadyExists`].
    pub async fn create(&self, rec: &BackfillRecord) -> Result<Revision, BackfillError> {
        let key = backfill_key(&self.registry, &rec.name);
        match self
            .registry
            .kv()
            .put_if(&key, encode(rec), Expect::Absent, None)
            .await
        {
            Err(RegistryError::Conflict { .. }) => {
                Err(BackfillError::AlreadyExists(rec.name.clone()))
            }
            r => Ok(r?),
        }
    }

    /// Writes `rec` if the stored one is still at `rev`; returns the new revision.
    pub async fn put(
        &self,
        rec: &BackfillRecord,
        rev: Revision,
    ) -> Result<Revision, BackfillError> {
        debug_assert_eq!(rec.version, SCHEMA_VERSION);
        let key = backfill_key(&self.registry, &rec.name);
        match self
            .registry
            .kv()
            .put_if(&key, encode(rec), Expect::ModRevision(rev), None)
            .await
        {
            Err(RegistryError::Conflict { .. }) => Err(BackfillError::Concurrent(rec.name.clone())),
            r => Ok(r?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse() {
        assert_eq!(Bound::parse("earliest").unwrap(), Bound::Edge);
        assert_eq!(Bound::parse("12").unwrap(), Bound::Offset(12));
        assert_eq!(Bound::parse("offset:7").unwrap(), Bound::Offset(7));
        assert_eq!(Bound::parse("time:1000").unwrap(), Bound::Time(1000));
        assert_eq!(Bound::parse("1000ms").unwrap(), Bound::Time(1000));
        assert_eq!(
            Bound::parse("1970-01-02T00:00:01Z").unwrap(),
            Bound::Time(86_401_000)
        );
        assert_eq!(
            Bound::parse("2026-11-25T17:36:17.5Z").unwrap(),
            Bound::Time(1_795_628_177_500)
        );
        assert!(Bound::parse("yesterday").is_err());
    }

    #[test]
    fn phases_print_and_parse() {
        for p in [
            Phase::Provisioning,
            Phase::Routing,
            Phase::Replaying,
            Phase::Waiting,
            Phase::TearingDown,
            Phase::Done,
            Phase::Aborting,
            Phase::Aborted,
        ] {
            assert_eq!(Phase::parse(&p.to_string()), Some(p));
        }
    }

    #[test]
    fn names() {
        assert!(check_name("b-1.x_y").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
    }
}
