//! Finding 4 of docs/simulator.md (fixed), kept as a regression test against the real `Router`.

use std::collections::BTreeMap;

use flotilla_client::registry::{
    ClusterRole, ClusterSpec, ClusterState, Epoch, EpochState, FleetSnapshot, TopicRoute,
    WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::route::router::{Action, Decision, Router};

fn spec(id: &str) -> ClusterSpec {
    ClusterSpec {
        version: SCHEMA_VERSION,
        id: id.into(),
        bootstrap: format!("{id}:9092"),
        kafka_cluster_id: format!("kid-{id}"),
        state: ClusterState::Active,
        role: ClusterRole::Permanent,
        weight: 100,
        labels: BTreeMap::new(),
        security_profile: None,
        created_at: 0,
    }
}

fn epoch(n: u64, c: &str, state: EpochState) -> Epoch {
    Epoch {
        n,
        write: vec![WeightedCluster {
            cluster: c.into(),
            weight: 1,
        }],
        state,
        fence: BTreeMap::new(),
        created_at: 0,
        ack_deadline: None,
    }
}

fn snap(rev: i64, epochs: Vec<Epoch>) -> FleetSnapshot {
    FleetSnapshot {
        revision: rev,
        clusters: [("a".to_string(), spec("a")), ("b".to_string(), spec("b"))].into(),
        routes: [(
            "t".to_string(),
            TopicRoute {
                version: SCHEMA_VERSION,
                topic: "t".into(),
                partitions: 1,
                epochs,
            },
        )]
        .into(),
        ..FleetSnapshot::default()
    }
}

/// In per-record mode, answering a `Flush` while a record is still in flight
/// used to re-arm the same `Flush`, so an adapter answering it synchronously
/// spun for ever. Fixed: `on_flushed` is a no-op until the record settles, and
/// the settlement then acknowledges the pending epoch.
#[test]
fn per_record_on_flushed_with_records_in_flight_is_a_no_op_until_settled() {
    let mut r = Router::new();
    r.on_snapshot(&snap(1, vec![epoch(1, "a", EpochState::Open)]));
    assert!(matches!(r.route("t", Some(b"k")), Decision::Send { .. }));
    let acts = r.on_snapshot(&snap(
        2,
        vec![
            epoch(1, "a", EpochState::Open),
            epoch(2, "b", EpochState::Pending),
        ],
    ));
    let flush = Action::Flush {
        topic: "t".into(),
        epoch: 1,
    };
    assert!(acts.contains(&flush));
    for _ in 0..3 {
        let again = r.on_flushed("t", 1);
        assert!(
            !again.contains(&flush),
            "on_flushed re-armed the flush: {again:?}"
        );
        assert!(
            !again.iter().any(|a| matches!(a, Action::Ack { .. })),
            "acked with a record in flight: {again:?}"
        );
    }
    let settled = r.on_settled("t", 1);
    assert!(
        settled
            .iter()
            .any(|a| matches!(a, Action::Ack { epoch: 2, .. })),
        "the last settlement must acknowledge epoch 2: {settled:?}"
    );
}
