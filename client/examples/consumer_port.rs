//! Porting a `StreamConsumer` loop to `FleetConsumer`, on two embedded mock
//! Kafka clusters and the in-memory registry (no setup needed):
//!
//! ```text
//! cargo run -p flotilla-client --example consumer_port
//! ```
//!
//! The topic `orders` was written in epoch 1 on `mock-0`, then switched to
//! epoch 2 on `mock-1` (epoch 1 sealed with its fence). The consumer reads
//! both clusters; `mock-1`'s records wait until the group has committed
//! `mock-0` up to the fence, so each key's records come out in order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::kafka::{ClusterAdmin, KafkaProperties, MockFleet, SecurityProfiles};
use flotilla_client::registry::memory::MemoryKv;
use flotilla_client::registry::{
    Epoch, EpochState, Expect, Registry, TopicRoute, WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::{FleetConsumer, FleetConsumerConfig, EPOCH_HEADER};
use rdkafka::consumer::CommitMode;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const TOPIC: &str = "orders";
const PARTITIONS: u32 = 2;

fn epoch(n: u64, cluster: &str, state: EpochState) -> Epoch {
    Epoch {
        n,
        write: vec![WeightedCluster {
            cluster: cluster.into(),
            weight: 100,
        }],
        state,
        fence: BTreeMap::new(),
        created_at: 0,
        ack_deadline: None,
    }
}

/// Writes `count` records for keys `k0..k3` with sequence numbers, tagged with `epoch`.
async fn produce(bootstrap: &str, epoch: u64, first_seq: usize, count: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    for i in first_seq..first_seq + count {
        let key = format!("k{}", i % 4);
        let payload = format!("{key} #{}", i / 4);
        let e = epoch.to_string();
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .key(&key)
                    .payload(&payload)
                    .partition(flotilla_client::route::murmur2::partition_for_key(
                        key.as_bytes(),
                        PARTITIONS,
                    ) as i32)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: EPOCH_HEADER,
                        value: Some(e.as_str()),
                    })),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Two embedded clusters and an in-memory registry.
    let fleet = tokio::task::spawn_blocking(|| MockFleet::start(2)).await??;
    fleet.create_topic(TOPIC, PARTITIONS)?;
    let registry = Registry::new(Arc::new(MemoryKv::new()), "demo");
    let specs = fleet.cluster_specs();
    for s in &specs {
        registry.create_cluster(s).await?;
    }

    // Epoch 1 on mock-0 ...
    produce(fleet.cluster(0).bootstrap(), 1, 0, 8).await;
    // ... sealed with the end offsets as its fence; epoch 2 open on mock-1.
    let mut fence = BTreeMap::new();
    for s in &specs {
        let admin = ClusterAdmin::connect(
            s,
            &KafkaProperties::new(),
            &SecurityProfiles::empty(),
            Duration::from_secs(5),
        )
        .await?;
        fence.insert(s.id.clone(), admin.end_offsets(TOPIC, PARTITIONS).await?);
    }
    let mut sealed = epoch(1, "mock-0", EpochState::Sealed);
    sealed.fence = fence;
    let route = TopicRoute {
        version: SCHEMA_VERSION,
        topic: TOPIC.into(),
        partitions: PARTITIONS,
        epochs: vec![sealed, epoch(2, "mock-1", EpochState::Open)],
    };
    registry.put_route(&route, Expect::Absent).await?;
    produce(fleet.cluster(1).bootstrap(), 2, 8, 8).await;

    // The port: same loop as with StreamConsumer.
    let consumer = FleetConsumer::new(
        FleetConsumerConfig::new(registry.clone())
            .set("group.id", "billing")
            .set("session.timeout.ms", "6000"),
    )
    .await?;
    consumer.subscribe(&[TOPIC])?;
    for _ in 0..16 {
        let msg = consumer.recv().await?;
        println!(
            "{:<7} epoch {} p{} @{:<2} {}",
            msg.cluster(),
            msg.epoch().map_or("-".into(), |e| e.to_string()),
            msg.partition(),
            msg.offset(),
            String::from_utf8_lossy(msg.payload().unwrap_or_default()),
        );
        consumer.commit_message(&msg, CommitMode::Sync)?;
    }
    println!("read set now: {:?}", consumer.read_set(TOPIC));
    consumer.close().await;
    tokio::task::spawn_blocking(move || drop(fleet)).await?;
    Ok(())
}
