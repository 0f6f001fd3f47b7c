//! `FleetProducer` as a `tower::Service`, with timeout, concurrency-limit and
//! retry layers, on two embedded mock Kafka clusters and the in-memory
//! registry (no setup needed):
//!
//! ```text
//! cargo run -p flotilla-client --example producer_tower
//! ```

use std::collections::BTreeMap;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::kafka::MockFleet;
use flotilla_client::registry::memory::MemoryKv;
use flotilla_client::registry::{
    Epoch, EpochState, Expect, Registry, TopicRoute, WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::{Delivery, FleetProducer, FleetProducerConfig, FleetSendError, OwnedRecord};
use futures::TryStreamExt;
use tower::retry::Policy;
use tower::{BoxError, ServiceBuilder, ServiceExt};

const TOPIC: &str = "clicks";

/// Retries transient failures (Kafka timeouts, full buffers, tower timeouts)
/// a few times; never permanent ones (authorization, no route, cluster id
/// mismatch): retrying cannot fix them and flotilla never reroutes them.
#[derive(Clone)]
struct RetryTransient {
    left: usize,
}

impl Policy<OwnedRecord, Delivery, BoxError> for RetryTransient {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut OwnedRecord,
        result: &mut Result<Delivery, BoxError>,
    ) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        let transient = match e.downcast_ref::<FleetSendError>() {
            Some(e) => e.is_retriable(),
            None => e.is::<tower::timeout::error::Elapsed>(),
        };
        if transient && self.left > 0 {
            self.left -= 1;
            Some(ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &OwnedRecord) -> Option<OwnedRecord> {
        Some(req.clone())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mocks = tokio::task::spawn_blocking(|| MockFleet::start(2)).await??;
    mocks.create_topic(TOPIC, 4)?;
    let registry = Registry::new(Arc::new(MemoryKv::new()), "demo");
    for spec in mocks.cluster_specs() {
        registry.create_cluster(&spec).await?;
    }
    registry
        .put_route(
            &TopicRoute {
                version: SCHEMA_VERSION,
                topic: TOPIC.into(),
                partitions: 4,
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
            },
            Expect::Absent,
        )
        .await?;
    let mut config = FleetProducerConfig::new();
    config
        .registry(registry)
        .set("linger.ms", "2")
        .set("message.timeout.ms", "5000");
    let producer = FleetProducer::new(config).await?;

    // retry(timeout(concurrency_limit(producer)))
    let service = ServiceBuilder::new()
        .retry(RetryTransient { left: 3 })
        .timeout(Duration::from_secs(10))
        .concurrency_limit(256)
        .service(producer.clone());

    let records = (0..2_000).map(|i| {
        OwnedRecord::to(TOPIC)
            .key(format!("user-{}", i % 100))
            .payload(format!("click {i}"))
            .header("source", "producer_tower")
    });
    let deliveries: Vec<Delivery> = service
        .call_all(futures::stream::iter(records))
        .try_collect()
        .await?;
    let mut per_cluster: BTreeMap<String, usize> = BTreeMap::new();
    for d in &deliveries {
        *per_cluster.entry(d.cluster.to_string()).or_default() += 1;
    }
    println!(
        "{} records delivered through tower layers: {per_cluster:?}",
        deliveries.len()
    );
    producer.close(Duration::from_secs(5)).await?;
    Ok(())
}
