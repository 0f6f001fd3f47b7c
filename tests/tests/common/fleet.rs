//! The set-up the fleet integration tests share: a registry on the test's
//! etcd, the Kafka clusters of a `KafkaFleet` registered in it (topic created,
//! `ClusterAdmin` connected), and a topic's first route (one open epoch).
//!
//! Uses `switch::write_set`: a test including this module includes
//! `common/switch.rs` as `mod switch` too.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::kafka::{ClusterAdmin, KafkaProperties, SecurityProfiles};
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{
    ClusterRole, ClusterSpec, ClusterState, Epoch, EpochState, Expect, Registry, TopicRoute,
    SCHEMA_VERSION,
};
use flotilla_client::FleetProducer;
use flotilla_testkit::{create_topic, KafkaCluster, KafkaFleet};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

use crate::switch::write_set;

/// A registry for fleet `name` on the etcd at `endpoint` (default options).
pub async fn connect_registry(endpoint: &str, name: &str) -> Registry {
    let kv = EtcdKv::connect(&[endpoint], EtcdOptions::default())
        .await
        .expect("connect etcd");
    Registry::new(Arc::new(kv), name)
}

/// The spec of `cluster` registered as `id`: active, permanent, weight 100,
/// no labels, no security profile.
pub fn permanent_cluster(id: &str, cluster: &KafkaCluster) -> ClusterSpec {
    ClusterSpec {
        version: SCHEMA_VERSION,
        id: id.into(),
        bootstrap: cluster.bootstrap(),
        kafka_cluster_id: cluster.kafka_cluster_id().to_string(),
        state: ClusterState::Active,
        role: ClusterRole::Permanent,
        weight: 100,
        labels: BTreeMap::new(),
        security_profile: None,
        created_at: 0,
    }
}

/// For each `ids[i]`, in order, with the fleet's cluster `i`: creates `topic`
/// with `partitions` partitions, registers the cluster
/// ([`permanent_cluster`]), connects a [`ClusterAdmin`] to it (giving up after
/// `timeout`) and, if `ready_coordinator`, makes sure its group coordinator
/// (the offsets topic) is ready, as `flotilla cluster activate` does. Returns
/// the admins by cluster id.
pub async fn register_clusters(
    registry: &Registry,
    fleet: &KafkaFleet,
    ids: &[&str],
    topic: &str,
    partitions: u32,
    timeout: Duration,
    ready_coordinator: bool,
) -> HashMap<String, ClusterAdmin> {
    let mut admins = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let cluster = fleet.cluster(i);
        create_topic(&cluster.bootstrap(), topic, partitions as i32)
            .await
            .unwrap();
        let spec = permanent_cluster(id, cluster);
        registry.create_cluster(&spec).await.unwrap();
        let admin = ClusterAdmin::connect(
            &spec,
            &KafkaProperties::new(),
            &SecurityProfiles::empty(),
            timeout,
        )
        .await
        .unwrap();
        if ready_coordinator {
            admin.ensure_group_coordinator().await.unwrap();
        }
        admins.insert(id.to_string(), admin);
    }
    admins
}

/// Writes `topic`'s first route (it must not exist yet): epoch 1, open,
/// writing to `write` ([`write_set`]), no fence.
pub async fn open_route(registry: &Registry, topic: &str, partitions: u32, write: &[&str]) {
    registry
        .put_route(
            &TopicRoute {
                version: SCHEMA_VERSION,
                topic: topic.into(),
                partitions,
                epochs: vec![Epoch {
                    n: 1,
                    write: write_set(write),
                    state: EpochState::Open,
                    fence: BTreeMap::new(),
                    created_at: 0,
                    ack_deadline: None,
                }],
            },
            Expect::Absent,
        )
        .await
        .unwrap();
}

/// Sends record `i` of a keyed sequence to `topic` and waits for its
/// acknowledgement: key `k<i % keys>`, payload `<key>:<i / keys>` (its
/// per-key sequence number); returns the key. Panics if the send fails.
pub async fn send_seq(producer: &FleetProducer, topic: &str, keys: usize, i: usize) -> String {
    let key = format!("k{}", i % keys);
    let payload = format!("{key}:{}", i / keys);
    producer
        .send(
            FutureRecord::to(topic).key(&key).payload(&payload),
            Timeout::Never,
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap_or_else(|e| panic!("send {payload}: {e}"));
    key
}
