//! The registry schema: what lives under `/flotilla/<fleet>/` in etcd.
//!
//! Every value is JSON with a `version` field ([`SCHEMA_VERSION`]). Fields added
//! later are optional (`#[serde(default)]`), so an older client reads a newer
//! value of the same major version and ignores what it does not know; a value
//! whose `version` is higher than this client understands is refused by
//! [`decode`] with an error that names the key, instead of being half-read.
//!
//! Everything here is pure data plus validation: no I/O, no clock reads. The
//! caller passes "now" in where time matters.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Schema version written into every value, and the highest one this client reads.
pub const SCHEMA_VERSION: u32 = 1;

/// A cluster's registry id (the `<id>` in `clusters/<id>`), chosen by the operator.
pub type ClusterId = String;

/// Milliseconds since the Unix epoch; always passed in by the caller, never read here.
pub type UnixMillis = u64;

/// Errors found in registry values, or in a change the schema forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The bytes at `key` are not a valid value of the expected type.
    #[error("malformed registry value at {key}: {reason}")]
    Malformed {
        /// The etcd key (or a description of where the value came from).
        key: String,
        /// What the decoder said.
        reason: String,
    },
    /// The value at `key` was written by a newer flotilla than this one.
    #[error(
        "registry value at {key} has schema version {found}, newer than the {supported} this client \
         supports: upgrade flotilla"
    )]
    UnsupportedVersion {
        /// The etcd key.
        key: String,
        /// The version in the value.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// A change to an immutable field of a cluster.
    #[error("cluster {cluster}: field `{field}` is immutable (only `state` may change)")]
    ImmutableField {
        /// The cluster id.
        cluster: ClusterId,
        /// The field the change touched.
        field: &'static str,
    },
    /// A state change that is not one step forward in the lifecycle.
    #[error("cluster {cluster}: cannot go from {from} to {to} (states only move forward: provisioning → active → draining → retired)")]
    BackwardState {
        /// The cluster id.
        cluster: ClusterId,
        /// Its current state.
        from: ClusterState,
        /// The state asked for.
        to: ClusterState,
    },
    /// Anything else the schema does not allow, with a sentence saying what.
    #[error("{0}")]
    Invalid(String),
}

/// Decodes a registry value, checking its schema `version` first.
///
/// `key` only serves the error message.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ModelError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: Option<u32>,
    }
    let malformed = |e: serde_json::Error| ModelError::Malformed {
        key: key.to_string(),
        reason: e.to_string(),
    };
    let probe: VersionOnly = serde_json::from_slice(bytes).map_err(malformed)?;
    match probe.version {
        None => {
            return Err(ModelError::Malformed {
                key: key.to_string(),
                reason: "missing `version` field".into(),
            })
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(ModelError::UnsupportedVersion {
                key: key.to_string(),
                found: v,
                supported: SCHEMA_VERSION,
            })
        }
        Some(_) => {}
    }
    serde_json::from_slice(bytes).map_err(malformed)
}

/// Encodes a registry value as JSON. Model types always serialize.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry model types always serialize")
}

fn schema_version() -> u32 {
    SCHEMA_VERSION
}

/// Lifecycle of a cluster. Only ever moves forward, one or more steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterState {
    /// Registered, not yet taking traffic.
    Provisioning,
    /// May appear in an open epoch's write set.
    Active,
    /// No new epoch may write to it; existing readers finish.
    Draining,
    /// Gone for good: never written or read again.
    Retired,
}

impl ClusterState {
    /// Whether `self → to` is a forward move (skipping states is allowed; staying is not a move).
    pub fn can_move_to(self, to: ClusterState) -> bool {
        to > self
    }
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterState::Provisioning => "provisioning",
            ClusterState::Active => "active",
            ClusterState::Draining => "draining",
            ClusterState::Retired => "retired",
        })
    }
}

impl std::str::FromStr for ClusterState {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "provisioning" => ClusterState::Provisioning,
            "active" => ClusterState::Active,
            "draining" => ClusterState::Draining,
            "retired" => ClusterState::Retired,
            other => {
                return Err(ModelError::Invalid(format!(
                    "unknown cluster state `{other}` (expected provisioning, active, draining or retired)"
                )))
            }
        })
    }
}

/// Why a cluster exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ClusterRole {
    /// Part of the long-lived fleet.
    Permanent,
    /// Brought up for a job (a backfill) and retired after it.
    Temporary {
        /// What it is for, e.g. the backfill name.
        purpose: String,
        /// After this instant the controller drains and retires it.
        expires_at: UnixMillis,
    },
}

/// One immutable Kafka cluster, stored at `clusters/<id>`.
///
/// After creation only [`ClusterSpec::state`] may change, and only forward;
/// [`ClusterSpec::check_update`] enforces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Schema version, [`SCHEMA_VERSION`] when written by this client.
    #[serde(default = "schema_version")]
    pub version: u32,
    /// Registry id of the cluster.
    pub id: ClusterId,
    /// Kafka `bootstrap.servers` list.
    pub bootstrap: String,
    /// The Kafka cluster id the brokers reported when the cluster was registered.
    /// Clients refuse a bootstrap address that answers with another id.
    pub kafka_cluster_id: String,
    /// Lifecycle state.
    pub state: ClusterState,
    /// Permanent or temporary.
    pub role: ClusterRole,
    /// Default weight when the cluster is added to a route.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form labels (region, rack, purpose).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Name of a locally resolved security profile; secrets never live in the registry.
    #[serde(default)]
    pub security_profile: Option<String>,
    /// When the cluster was registered.
    pub created_at: UnixMillis,
}

fn default_weight() -> u32 {
    100
}

impl ClusterSpec {
    /// Checks that `next` is a legal successor of `self`: same everything but a forward state.
    pub fn check_update(&self, next: &ClusterSpec) -> Result<(), ModelError> {
        let immutable = |field: &'static str| ModelError::ImmutableField {
            cluster: self.id.clone(),
            field,
        };
        if self.id != next.id {
            return Err(immutable("id"));
        }
        if self.bootstrap != next.bootstrap {
            return Err(immutable("bootstrap"));
        }
        if self.kafka_cluster_id != next.kafka_cluster_id {
            return Err(immutable("kafka_cluster_id"));
        }
        if self.role != next.role {
            return Err(immutable("role"));
        }
        if self.weight != next.weight {
            return Err(immutable("weight"));
        }
        if self.labels != next.labels {
            return Err(immutable("labels"));
        }
        if self.security_profile != next.security_profile {
            return Err(immutable("security_profile"));
        }
        if self.created_at != next.created_at {
            return Err(immutable("created_at"));
        }
        if self.state != next.state && !self.state.can_move_to(next.state) {
            return Err(ModelError::BackwardState {
                cluster: self.id.clone(),
                from: self.state,
                to: next.state,
            });
        }
        Ok(())
    }

    /// Whether a temporary cluster is past its expiry at `now`.
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        matches!(self.role, ClusterRole::Temporary { expires_at, .. } if now >= expires_at)
    }
}

/// One cluster of an epoch's write set with its weight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WeightedCluster {
    /// Registry id of the cluster.
    pub cluster: ClusterId,
    /// Relative share of the keys (> 0).
    pub weight: u32,
}

/// Where an epoch is in the handoff protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochState {
    /// Proposed; producers hold new sends and acknowledge it.
    Pending,
    /// The one epoch producers write to.
    Open,
    /// Closed for writes; its `fence` records where it ends on every cluster.
    Sealed,
    /// A pending epoch the controller gave up on; producers resume on the open one.
    Aborted,
}

impl fmt::Display for EpochState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EpochState::Pending => "pending",
            EpochState::Open => "open",
            EpochState::Sealed => "sealed",
            EpochState::Aborted => "aborted",
        })
    }
}

/// End offset (exclusive: the high watermark) of every partition, index = partition.
pub type PartitionOffsets = Vec<i64>;

/// One route epoch of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// Epoch number, strictly increasing within a topic, starting at 1.
    pub n: u64,
    /// Clusters written in this epoch, with weights.
    pub write: Vec<WeightedCluster>,
    /// Handoff state.
    pub state: EpochState,
    /// For a sealed epoch: on each cluster of this epoch *and* of the next one,
    /// the end offset of every partition at the moment of the switch (the boundary).
    #[serde(default)]
    pub fence: BTreeMap<ClusterId, PartitionOffsets>,
    /// When the epoch was proposed.
    #[serde(default)]
    pub created_at: UnixMillis,
    /// For a pending epoch: when the controller stops waiting for acknowledgements.
    #[serde(default)]
    pub ack_deadline: Option<UnixMillis>,
}

impl Epoch {
    /// Whether `cluster` is in this epoch's write set.
    pub fn writes_to(&self, cluster: &str) -> bool {
        self.write.iter().any(|w| w.cluster == cluster)
    }

    /// Whether the write set is exactly `write`, as a set (order does not matter).
    pub fn writes_exactly(&self, write: &[WeightedCluster]) -> bool {
        let (mut a, mut b) = (self.write.clone(), write.to_vec());
        a.sort();
        b.sort();
        a == b
    }

    /// The clusters of the write set, in write-set order.
    pub fn clusters(&self) -> impl Iterator<Item = &ClusterId> {
        self.write.iter().map(|w| &w.cluster)
    }
}

/// A topic's routing history, stored at `topics/<topic>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRoute {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub version: u32,
    /// Topic name (the same on every cluster).
    pub topic: String,
    /// Partition count, the same on every cluster.
    pub partitions: u32,
    /// Epochs, oldest first. Retired history may be pruned from the front.
    pub epochs: Vec<Epoch>,
}

impl TopicRoute {
    /// The epoch open for writes, if any.
    pub fn open_epoch(&self) -> Option<&Epoch> {
        self.epochs
            .iter()
            .rev()
            .find(|e| e.state == EpochState::Open)
    }

    /// The pending epoch, if a switch is under way.
    pub fn pending_epoch(&self) -> Option<&Epoch> {
        self.epochs
            .iter()
            .rev()
            .find(|e| e.state == EpochState::Pending)
    }

    /// The epoch numbered `n`.
    pub fn epoch(&self, n: u64) -> Option<&Epoch> {
        self.epochs.iter().find(|e| e.n == n)
    }

    /// The highest epoch number used so far (0 when there is none).
    pub fn last_epoch_n(&self) -> u64 {
        self.epochs.iter().map(|e| e.n).max().unwrap_or(0)
    }

    /// Sealed epochs, oldest first.
    pub fn sealed_epochs(&self) -> impl Iterator<Item = &Epoch> {
        self.epochs.iter().filter(|e| e.state == EpochState::Sealed)
    }

    /// Whether `cluster` appears in a pending, open or sealed epoch.
    pub fn uses_cluster(&self, cluster: &str) -> bool {
        self.epochs
            .iter()
            .any(|e| e.state != EpochState::Aborted && e.writes_to(cluster))
    }

    /// Checks the structural rules: epoch numbers strictly increase, at most one
    /// open and one pending epoch, pending is the newest, weights are positive,
    /// no cluster twice in a write set, fences have one offset per partition.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::Invalid(format!("route {}: {msg}", self.topic)));
        if self.partitions == 0 {
            return bad("partition count must be at least 1".into());
        }
        let mut last = 0;
        let (mut open, mut pending) = (0, 0);
        for (i, e) in self.epochs.iter().enumerate() {
            if e.n <= last {
                return bad(format!(
                    "epoch numbers must increase (found {} after {last})",
                    e.n
                ));
            }
            last = e.n;
            match e.state {
                EpochState::Open => open += 1,
                EpochState::Pending => {
                    pending += 1;
                    if i + 1 != self.epochs.len() {
                        return bad(format!("pending epoch {} is not the newest", e.n));
                    }
                }
                EpochState::Sealed | EpochState::Aborted => {}
            }
            if e.write.is_empty() {
                return bad(format!("epoch {} writes to no cluster", e.n));
            }
            let mut seen = std::collections::BTreeSet::new();
            for w in &e.write {
                if w.weight == 0 {
                    return bad(format!("epoch {}: cluster {} has weight 0", e.n, w.cluster));
                }
                if !seen.insert(&w.cluster) {
                    return bad(format!("epoch {}: cluster {} listed twice", e.n, w.cluster));
                }
            }
            for (c, offs) in &e.fence {
                if offs.len() != self.partitions as usize {
                    return bad(format!(
                        "epoch {}: fence on {c} has {} offsets for {} partitions",
                        e.n,
                        offs.len(),
                        self.partitions
                    ));
                }
            }
        }
        if open > 1 {
            return bad(format!("{open} epochs are open; at most one may be"));
        }
        if pending > 1 {
            return bad(format!("{pending} epochs are pending; at most one may be"));
        }
        Ok(())
    }
}

/// Kind of a registered client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// A `FleetProducer`.
    Producer,
    /// A `FleetConsumer`.
    Consumer,
}

impl fmt::Display for ClientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientKind::Producer => "producer",
            ClientKind::Consumer => "consumer",
        })
    }
}

/// A live client, stored at `clients/<kind>/<id>` under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub version: u32,
    /// Producer or consumer.
    pub kind: ClientKind,
    /// Unique client id (host, pid and a random suffix by default).
    pub id: String,
    /// Per topic, the highest epoch this client has acknowledged.
    #[serde(default)]
    pub acked: BTreeMap<String, u64>,
    /// Consumer group, for consumers.
    #[serde(default)]
    pub group: Option<String>,
    /// When the client started.
    #[serde(default)]
    pub started_at: UnixMillis,
}

/// A consumer group that must finish sealed epochs before their clusters retire,
/// stored at `groups/<group>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub version: u32,
    /// Kafka consumer group id (the same on every cluster).
    pub group: String,
    /// Topics the group reads.
    pub topics: Vec<String>,
    /// When the group was first registered.
    #[serde(default)]
    pub created_at: UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ClusterSpec {
        ClusterSpec {
            version: SCHEMA_VERSION,
            id: "a".into(),
            bootstrap: "127.0.0.1:9092".into(),
            kafka_cluster_id: "abc".into(),
            state: ClusterState::Provisioning,
            role: ClusterRole::Permanent,
            weight: 100,
            labels: BTreeMap::new(),
            security_profile: None,
            created_at: 1,
        }
    }

    #[test]
    fn newer_schema_is_refused_with_the_key() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v["version"] = 9.into();
        let err = decode::<ClusterSpec>("/flotilla/f/clusters/a", &serde_json::to_vec(&v).unwrap())
            .unwrap_err();
        assert!(matches!(
            err,
            ModelError::UnsupportedVersion { found: 9, .. }
        ));
        assert!(err.to_string().contains("/flotilla/f/clusters/a"));
    }

    #[test]
    fn unknown_fields_of_the_same_version_are_ignored() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v["added_later"] = "x".into();
        let back: ClusterSpec = decode("k", &serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(back, spec());
    }

    #[test]
    fn malformed_value_names_the_key() {
        let err = decode::<ClusterSpec>("/k", b"{\"version\":1,\"id\":3}").unwrap_err();
        assert!(matches!(err, ModelError::Malformed { .. }));
        assert!(err.to_string().contains("/k"));
        assert!(decode::<ClusterSpec>("/k", b"not json").is_err());
    }

    #[test]
    fn only_state_changes_and_only_forward() {
        let a = spec();
        let mut b = a.clone();
        b.state = ClusterState::Active;
        a.check_update(&b).unwrap();
        let mut c = b.clone();
        c.state = ClusterState::Provisioning;
        assert!(matches!(
            b.check_update(&c),
            Err(ModelError::BackwardState { .. })
        ));
        let mut d = a.clone();
        d.bootstrap = "elsewhere:9092".into();
        assert_eq!(
            a.check_update(&d),
            Err(ModelError::ImmutableField {
                cluster: "a".into(),
                field: "bootstrap"
            })
        );
    }

    #[test]
    fn route_validation_rejects_two_open_epochs() {
        let e = |n, state| Epoch {
            n,
            write: vec![WeightedCluster {
                cluster: "a".into(),
                weight: 1,
            }],
            state,
            fence: BTreeMap::new(),
            created_at: 0,
            ack_deadline: None,
        };
        let mut r = TopicRoute {
            version: 1,
            topic: "t".into(),
            partitions: 3,
            epochs: vec![e(1, EpochState::Sealed), e(2, EpochState::Open)],
        };
        r.validate().unwrap();
        r.epochs.push(e(3, EpochState::Open));
        assert!(r.validate().is_err());
        r.epochs[2].state = EpochState::Pending;
        r.validate().unwrap();
        assert_eq!(r.pending_epoch().unwrap().n, 3);
        assert_eq!(r.open_epoch().unwrap().n, 2);
    }
}
