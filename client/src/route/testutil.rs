//! Builders shared by the route tests.

use std::collections::BTreeMap;

use crate::registry::{
    ClientKind, ClientRecord, ClusterRole, ClusterSpec, ClusterState, Epoch, EpochState,
    FleetSnapshot, TopicRoute, WeightedCluster, SCHEMA_VERSION,
};

pub fn spec(id: &str, state: ClusterState) -> ClusterSpec {
    ClusterSpec {
        version: SCHEMA_VERSION,
        id: id.into(),
        bootstrap: format!("{id}:9092"),
        kafka_cluster_id: format!("kid-{id}"),
        state,
        role: ClusterRole::Permanent,
        weight: 100,
        labels: BTreeMap::new(),
        security_profile: None,
        created_at: 0,
    }
}

pub fn ws(items: &[&str]) -> Vec<WeightedCluster> {
    items
        .iter()
        .map(|c| WeightedCluster {
            cluster: (*c).to_string(),
            weight: 1,
        })
        .collect()
}

pub fn epoch(n: u64, write: &[&str], state: EpochState) -> Epoch {
    Epoch {
        n,
        write: ws(write),
        state,
        fence: BTreeMap::new(),
        created_at: 0,
        ack_deadline: None,
    }
}

pub fn route(topic: &str, partitions: u32, epochs: Vec<Epoch>) -> TopicRoute {
    TopicRoute {
        version: SCHEMA_VERSION,
        topic: topic.into(),
        partitions,
        epochs,
    }
}

pub fn snapshot(active: &[&str], routes: Vec<TopicRoute>) -> FleetSnapshot {
    FleetSnapshot {
        revision: 1,
        clusters: active
            .iter()
            .map(|c| ((*c).to_string(), spec(c, ClusterState::Active)))
            .collect(),
        routes: routes.into_iter().map(|r| (r.topic.clone(), r)).collect(),
        clients: BTreeMap::new(),
        groups: BTreeMap::new(),
    }
}

pub fn producer(id: &str, acked: &[(&str, u64)]) -> ClientRecord {
    ClientRecord {
        version: SCHEMA_VERSION,
        kind: ClientKind::Producer,
        id: id.into(),
        acked: acked.iter().map(|(t, n)| ((*t).to_string(), *n)).collect(),
        group: None,
        started_at: 0,
    }
}
