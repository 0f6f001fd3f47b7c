//! Porting a `FutureProducer` to `FleetProducer`, on two embedded mock Kafka
//! clusters and the in-memory registry (no setup needed):
//!
//! ```text
//! cargo run -p flotilla-client --example producer_port
//! ```
//!
//! The same loop runs twice: first with rdkafka's `FutureProducer` pinned to
//! one cluster, then with `FleetProducer`, which routes every record by the
//! registry (`orders` is written to `mock-0` and `mock-1`, epoch 1) and tags
//! it with its epoch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::kafka::MockFleet;
use flotilla_client::registry::memory::MemoryKv;
use flotilla_client::registry::{
    Epoch, EpochState, Expect, Registry, TopicRoute, WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::{FleetProducer, FleetProducerConfig};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const TOPIC: &str = "orders";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Two embedded Kafka clusters and a registry that routes `orders` over both.
    let mocks = tokio::task::spawn_blocking(|| MockFleet::start(2)).await??;
    mocks.create_topic(TOPIC, 3)?;
    let registry = Registry::new(Arc::new(MemoryKv::new()), "demo");
    for spec in mocks.cluster_specs() {
        registry.create_cluster(&spec).await?;
    }
    let route = TopicRoute {
        version: SCHEMA_VERSION,
        topic: TOPIC.into(),
        partitions: 3,
        epochs: vec![Epoch {
            n: 1,
            write: ["mock-0", "mock-1"]
                .iter()
                .map(|c| WeightedCluster {
                    cluster: c.to_string(),
                    weight: 100,
                })
                .collect(),
            state: EpochState::Open,
            fence: BTreeMap::new(),
            created_at: 0,
            ack_deadline: None,
        }],
    };
    registry.put_route(&route, Expect::Absent).await?;

    // ---- before: one cluster, chosen by configuration -------------------------------
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", mocks.cluster(0).bootstrap())
        .set("message.timeout.ms", "5000")
        .create()?;
    for i in 0..3 {
        let key = format!("customer-{i}");
        let delivery = producer
            .send(
                FutureRecord::to(TOPIC).key(&key).payload("hello"),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)?;
        println!(
            "FutureProducer: {key} -> partition {} @ {}",
            delivery.partition, delivery.offset
        );
    }

    // ---- after: the fleet, chosen by the registry ------------------------------------
    let mut config = FleetProducerConfig::new();
    config
        .registry(registry.clone()) // or FleetProducer::connect(&["http://etcd:2379"], "fleet", config)
        .set("message.timeout.ms", "5000");
    let producer = FleetProducer::new(config).await?;
    for i in 0..3 {
        let key = format!("customer-{i}");
        let d = producer
            .send(
                FutureRecord::to(TOPIC).key(&key).payload("hello"),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)?;
        println!(
            "FleetProducer:  {key} -> cluster {} partition {} @ {} (epoch {})",
            d.cluster, d.partition, d.offset, d.epoch
        );
    }
    producer.close(Duration::from_secs(5)).await?;
    Ok(())
}
