//! Throughput of `FleetProducer` vs a raw rdkafka `FutureProducer` on the same
//! real single-node Kafka cluster (100-byte values, 10 000 keys). Ignored by
//! default; run in release mode:
//!
//! ```text
//! cargo test --release -p flotilla-testkit --test producer_bench -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::registry::etcd::EtcdKv;
use flotilla_client::registry::{
    ClusterRole, ClusterSpec, ClusterState, Epoch, EpochState, Expect, Registry, TopicRoute,
    WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::{FleetProducer, FleetProducerConfig};
use flotilla_testkit::{create_topic, EtcdServer, KafkaFleet};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const RECORDS: usize = 300_000;
const KEYS: usize = 10_000;
const PARTITIONS: u32 = 4;
const PROPS: [(&str, &str); 4] = [
    ("linger.ms", "5"),
    ("enable.idempotence", "true"),
    ("queue.buffering.max.messages", "1000000"),
    ("message.timeout.ms", "60000"),
];

fn keys() -> Vec<String> {
    (0..KEYS).map(|k| format!("key-{k:06}")).collect()
}

async fn raw(bootstrap: &str, topic: &str, keys: &[String], value: &[u8]) -> Duration {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    for (k, v) in PROPS {
        cfg.set(k, v);
    }
    let p: FutureProducer = cfg.create().unwrap();
    let started = Instant::now();
    let mut futs = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let rec = FutureRecord::to(topic).key(&keys[i % KEYS]).payload(value);
        futs.push(p.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    for f in futs {
        f.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    started.elapsed()
}

async fn fleet(p: &FleetProducer, topic: &str, keys: &[String], value: &[u8]) -> Duration {
    let started = Instant::now();
    let mut futs = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let rec = FutureRecord::to(topic).key(&keys[i % KEYS]).payload(value);
        futs.push(p.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    for f in futs {
        f.await.map_err(|(e, _)| e).unwrap();
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn fleet_producer_vs_future_producer_throughput() {
    let etcd = EtcdServer::start().expect("start etcd");
    let kafka = tokio::task::spawn_blocking(|| KafkaFleet::start(1).expect("start Kafka"))
        .await
        .unwrap();
    let bootstrap = kafka.cluster(0).bootstrap();
    let kv = EtcdKv::connect(&[etcd.endpoint()], Default::default())
        .await
        .unwrap();
    let reg = Registry::new(Arc::new(kv), "bench");
    reg.create_cluster(&ClusterSpec {
        version: SCHEMA_VERSION,
        id: "A".into(),
        bootstrap: bootstrap.clone(),
        kafka_cluster_id: kafka.cluster(0).kafka_cluster_id().into(),
        state: ClusterState::Active,
        role: ClusterRole::Permanent,
        weight: 100,
        labels: BTreeMap::new(),
        security_profile: None,
        created_at: 0,
    })
    .await
    .unwrap();
    let topics: Vec<String> = (0..4).map(|i| format!("bench-{i}")).collect();
    for t in &topics {
        create_topic(&bootstrap, t, PARTITIONS as i32)
            .await
            .unwrap();
        reg.put_route(
            &TopicRoute {
                version: SCHEMA_VERSION,
                topic: t.clone(),
                partitions: PARTITIONS,
                epochs: vec![Epoch {
                    n: 1,
                    write: vec![WeightedCluster {
                        cluster: "A".into(),
                        weight: 100,
                    }],
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
    let mut cfg = FleetProducerConfig::new();
    for (k, v) in PROPS {
        cfg.set(k, v);
    }
    let fp = FleetProducer::connect(&[etcd.endpoint().as_str()], "bench", cfg)
        .await
        .unwrap();
    let keys = keys();
    let value = vec![b'x'; 100];
    // Warm up both, then alternate.
    raw(&bootstrap, &topics[0], &keys[..], &value).await;
    fleet(&fp, &topics[1], &keys[..], &value).await;
    let rate = |d: Duration| RECORDS as f64 / d.as_secs_f64();
    let mut out = Vec::new();
    for round in 0..2 {
        let r = raw(&bootstrap, &topics[2 + round % 2], &keys[..], &value).await;
        let f = fleet(&fp, &topics[3 - round % 2], &keys[..], &value).await;
        out.push((rate(r), rate(f)));
        eprintln!(
            "round {round}: FutureProducer {:.0} rec/s ({r:?}), FleetProducer {:.0} rec/s ({f:?}) for {RECORDS} x 100 B",
            rate(r),
            rate(f)
        );
    }
    fp.close(Duration::from_secs(10)).await.unwrap();
}
