//! A Kafka cluster that dies mid-test: producers get delivery errors within
//! their `message.timeout.ms` instead of hanging, and after `restart()` the
//! same cluster (same address, id and data) serves produce and consume again.

mod common;

use common::{enqueue, producer, read_all};
use flotilla_testkit::{create_topic, KafkaFleet};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 2;
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Slack on top of `message.timeout.ms` for librdkafka's timeout scan (1 s
/// granularity) and a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(5);

async fn produce_ok(p: &rdkafka::producer::FutureProducer, topic: &str, prefix: &str, n: usize) {
    let deliveries: Vec<_> = (0..n)
        .map(|i| enqueue(p, topic, &format!("k{i}"), &format!("{prefix}-{i}")))
        .collect();
    for (i, d) in deliveries.into_iter().enumerate() {
        if let Err((e, _)) = d.await.expect("delivery future dropped") {
            panic!("{prefix}-{i} not delivered: {e}");
        }
    }
}

fn payloads(prefixes: &[(&str, usize)]) -> BTreeSet<String> {
    prefixes
        .iter()
        .flat_map(|(p, n)| (0..*n).map(move |i| format!("{p}-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_cluster_fails_deliveries_in_time_and_serves_again_after_restart() {
    const TOPIC: &str = "failover";
    let mut fleet = KafkaFleet::start(1).expect("start Kafka");
    let bootstrap = fleet.cluster(0).bootstrap();
    let id = fleet.cluster(0).kafka_cluster_id().to_string();
    create_topic(&bootstrap, TOPIC, PARTITIONS)
        .await
        .expect("create topic");

    let p = producer(&bootstrap, MESSAGE_TIMEOUT.as_millis() as u64);
    produce_ok(&p, TOPIC, "before", 20).await;

    // SIGKILL mid-test: every record sent now must fail, and in time.
    fleet.cluster_mut(0).kill();
    assert!(!fleet.cluster_mut(0).is_running());
    let sent = Instant::now();
    let deliveries: Vec<_> = (0..5)
        .map(|i| enqueue(&p, TOPIC, &format!("k{i}"), &format!("lost-{i}")))
        .collect();
    let outcome = tokio::time::timeout(MESSAGE_TIMEOUT + MARGIN, async {
        let mut errors = Vec::new();
        for d in deliveries {
            match d.await.expect("delivery future dropped") {
                Ok(delivery) => panic!("delivered to a dead cluster: {delivery:?}"),
                Err((e, _)) => errors.push(e.to_string()),
            }
        }
        errors
    })
    .await;
    let waited = sent.elapsed();
    let errors = outcome.unwrap_or_else(|_| {
        panic!("producer hung: no delivery result within {MESSAGE_TIMEOUT:?} + {MARGIN:?}")
    });
    assert_eq!(errors.len(), 5);
    eprintln!("delivery errors after {waited:?}: {}", errors[0]);

    // Same cluster back: same address, same id, old data; the same producer works again.
    let restarting = Instant::now();
    fleet.cluster_mut(0).restart().expect("restart Kafka");
    eprintln!("restart after SIGKILL took {:?}", restarting.elapsed());
    assert_eq!(fleet.cluster(0).bootstrap(), bootstrap);
    assert_eq!(fleet.cluster(0).kafka_cluster_id(), id);
    let producing = Instant::now();
    produce_ok(&p, TOPIC, "after", 20).await;
    eprintln!("first produce after restart took {:?}", producing.elapsed());

    let read: BTreeSet<String> = read_all(&bootstrap, TOPIC, PARTITIONS, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(read, payloads(&[("before", 20), ("after", 20)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_and_restart_keep_data_and_identity() {
    const TOPIC: &str = "stopped";
    let mut fleet = KafkaFleet::start(1).expect("start Kafka");
    let bootstrap = fleet.cluster(0).bootstrap();
    create_topic(&bootstrap, TOPIC, PARTITIONS)
        .await
        .expect("create topic");
    let p = producer(&bootstrap, 10_000);
    produce_ok(&p, TOPIC, "first", 50).await;
    drop(p);

    let stopping = Instant::now();
    fleet.cluster_mut(0).stop();
    eprintln!("graceful stop took {:?}", stopping.elapsed());
    assert!(!fleet.cluster_mut(0).is_running());
    fleet.cluster_mut(0).restart().expect("restart Kafka");

    let p = producer(&bootstrap, 10_000);
    produce_ok(&p, TOPIC, "second", 50).await;
    let read: BTreeSet<String> = read_all(&bootstrap, TOPIC, PARTITIONS, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(read, payloads(&[("first", 50), ("second", 50)]));
}
