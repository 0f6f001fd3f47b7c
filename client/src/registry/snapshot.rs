//! A consistent view of the whole fleet at one registry revision.

use std::collections::BTreeMap;

use super::model::{ClientKind, ClientRecord, ClusterId, ClusterSpec, GroupRecord, TopicRoute};

/// Everything under `/flotilla/<fleet>/` at one etcd revision, decoded.
///
/// Cheap to share behind an `Arc`; the watcher swaps in a new one on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSnapshot {
    /// The registry revision this snapshot reflects.
    pub revision: i64,
    /// Clusters by id.
    pub clusters: BTreeMap<ClusterId, ClusterSpec>,
    /// Topic routes by topic.
    pub routes: BTreeMap<String, TopicRoute>,
    /// Live clients by (kind, id).
    pub clients: BTreeMap<(ClientKind, String), ClientRecord>,
    /// Registered consumer groups by group id.
    pub groups: BTreeMap<String, GroupRecord>,
}

impl FleetSnapshot {
    /// The route of `topic`, if it has one.
    pub fn route(&self, topic: &str) -> Option<&TopicRoute> {
        self.routes.get(topic)
    }

    /// The cluster `id`, if registered.
    pub fn cluster(&self, id: &str) -> Option<&ClusterSpec> {
        self.clusters.get(id)
    }

    /// Live producers.
    pub fn producers(&self) -> impl Iterator<Item = &ClientRecord> {
        self.clients
            .iter()
            .filter(|((k, _), _)| *k == ClientKind::Producer)
            .map(|(_, r)| r)
    }
}
