//! Per-record cost of `Router::route` with 1, 3 and 8 clusters, keyed and keyless,
//! equal weights (no logarithm) and unequal weights (one `neg_ln` per cluster).
//!
//! Run: `cargo bench -p flotilla-client --bench route`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flotilla_client::registry::{
    ClusterRole, ClusterSpec, ClusterState, Epoch, EpochState, FleetSnapshot, TopicRoute,
    WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::route::{Decision, Router};

fn snapshot(clusters: usize, weighted: bool) -> FleetSnapshot {
    let ids: Vec<String> = (0..clusters).map(|i| format!("cluster-{i}")).collect();
    let specs = ids
        .iter()
        .map(|id| {
            let spec = ClusterSpec {
                version: SCHEMA_VERSION,
                id: id.clone(),
                bootstrap: format!("{id}:9092"),
                kafka_cluster_id: id.clone(),
                state: ClusterState::Active,
                role: ClusterRole::Permanent,
                weight: 100,
                labels: BTreeMap::new(),
                security_profile: None,
                created_at: 0,
            };
            (id.clone(), spec)
        })
        .collect();
    let route = TopicRoute {
        version: SCHEMA_VERSION,
        topic: "events".into(),
        partitions: 64,
        epochs: vec![Epoch {
            n: 1,
            write: ids
                .iter()
                .enumerate()
                .map(|(i, c)| WeightedCluster {
                    cluster: c.clone(),
                    // Unequal weights take the logarithm path.
                    weight: if weighted { 100 + 50 * i as u32 } else { 100 },
                })
                .collect(),
            state: EpochState::Open,
            fence: BTreeMap::new(),
            created_at: 0,
            ack_deadline: None,
        }],
    };
    FleetSnapshot {
        revision: 1,
        clusters: specs,
        routes: [("events".to_string(), route)].into_iter().collect(),
        clients: BTreeMap::new(),
        groups: BTreeMap::new(),
    }
}

fn bench_route(c: &mut Criterion) {
    // 1024 realistic keys (UUID-sized), cycled.
    let keys: Vec<Vec<u8>> = (0..1024u32)
        .map(|i| format!("user-{i:08x}-5f2c-4b1e-9a7d-{:012x}", u64::from(i) * 7919).into_bytes())
        .collect();
    let mut group = c.benchmark_group("router_route");
    group.throughput(Throughput::Elements(1));
    let cases = [
        (1usize, false),
        (3, false),
        (3, true),
        (8, false),
        (8, true),
    ];
    for (clusters, weighted) in cases {
        let snap = snapshot(clusters, weighted);
        for keyed in [true, false] {
            let name = format!(
                "{clusters}_clusters_{}{}",
                if weighted { "weighted_" } else { "" },
                if keyed { "keyed" } else { "keyless" }
            );
            group.bench_function(&name, |b| {
                let mut router = Router::new();
                router.on_snapshot(&snap);
                let mut i = 0usize;
                b.iter(|| {
                    let key = keyed.then(|| keys[i & 1023].as_slice());
                    i += 1;
                    let d = router.route(black_box("events"), black_box(key));
                    debug_assert!(matches!(d, Decision::Send { .. }));
                    black_box(d)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
