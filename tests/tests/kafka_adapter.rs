//! The rdkafka adapter (`flotilla_client::kafka`) against real Apache Kafka
//! clusters started by the harness: cluster identity, unreachable brokers,
//! topic management, end offsets and committed offsets.
//!
//! One fleet of two clusters serves the whole scenario (JVM start-up is the
//! expensive part), so the steps run in order inside one test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_client::kafka::{
    read_cluster_id, ClusterAdmin, KafkaError, KafkaProperties, SecurityProfiles, TopicStatus,
};
use flotilla_client::registry::{ClusterRole, ClusterSpec, ClusterState, SCHEMA_VERSION};
use flotilla_testkit::kafka::KafkaFleet;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const T: Duration = Duration::from_secs(15);

fn spec(id: &str, bootstrap: &str, kafka_cluster_id: &str) -> ClusterSpec {
    ClusterSpec {
        version: SCHEMA_VERSION,
        id: id.into(),
        bootstrap: bootstrap.into(),
        kafka_cluster_id: kafka_cluster_id.into(),
        state: ClusterState::Active,
        role: ClusterRole::Permanent,
        weight: 100,
        labels: BTreeMap::new(),
        security_profile: None,
        created_at: 0,
    }
}

async fn connect(spec: &ClusterSpec, timeout: Duration) -> Result<ClusterAdmin, KafkaError> {
    ClusterAdmin::connect(
        spec,
        &KafkaProperties::new(),
        &SecurityProfiles::empty(),
        timeout,
    )
    .await
}

/// Produces `counts[p]` records to partition `p` and waits for every ack.
fn produce(config: &ClientConfig, topic: &str, counts: &[usize]) {
    let producer: BaseProducer = config.create().expect("producer");
    for (p, &n) in counts.iter().enumerate() {
        for i in 0..n {
            let key = format!("k{p}-{i}");
            producer
                .send(
                    BaseRecord::to(topic)
                        .key(&key)
                        .payload("v")
                        .partition(p as i32),
                )
                .map_err(|(e, _)| e)
                .expect("enqueue");
        }
    }
    producer.flush(T).expect("flush");
}

/// Commits `offsets[p]` (when `Some`) for group `group` with an assign-only consumer.
fn commit(config: &ClientConfig, group: &str, topic: &str, offsets: &[Option<i64>]) {
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets.iter().enumerate() {
        if let Some(o) = o {
            tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o))
                .unwrap();
        }
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_against_real_kafka() {
    let mut fleet = tokio::task::spawn_blocking(|| KafkaFleet::start(2))
        .await
        .unwrap()
        .expect("start two Kafka clusters");
    let (b0, b1) = (fleet.cluster(0).bootstrap(), fleet.cluster(1).bootstrap());
    let (id0, id1) = (
        fleet.cluster(0).kafka_cluster_id().to_string(),
        fleet.cluster(1).kafka_cluster_id().to_string(),
    );
    assert_ne!(id0, id1);

    // --- identity: the id read from the brokers is the harness's id ---
    let base = KafkaProperties::new();
    assert_eq!(read_cluster_id(&b0, &base, None, T).await.unwrap(), id0);
    assert_eq!(read_cluster_id(&b1, &base, None, T).await.unwrap(), id1);
    let spec0 = spec("c0", &b0, &id0);
    let spec1 = spec("c1", &b1, &id1);
    let admin = connect(&spec0, T).await.expect("connect c0");
    assert_eq!(admin.cluster_id(), id0);
    assert_eq!(admin.fetch_cluster_id().await.unwrap(), id0);
    admin.verify_identity(&id0).await.unwrap();
    assert!(matches!(
        admin.verify_identity(&id1).await,
        Err(KafkaError::ClusterIdMismatch { .. })
    ));
    let by_address = ClusterAdmin::connect_bootstrap(&b1, &base, T)
        .await
        .unwrap();
    assert_eq!(by_address.cluster_id(), id1);
    drop(by_address);

    // --- mismatch: c1's registered id, but the address answers as c0 (reused brokers) ---
    let stale = spec("c1", &b0, &id1);
    let err = connect(&stale, T).await.unwrap_err();
    match &err {
        KafkaError::ClusterIdMismatch {
            cluster,
            bootstrap,
            expected,
            found,
        } => {
            assert_eq!((cluster.as_str(), bootstrap.as_str()), ("c1", b0.as_str()));
            assert_eq!((expected, found), (&id1, &id0));
        }
        other => panic!("expected ClusterIdMismatch, got {other}"),
    }
    assert!(err.is_permanent());
    let check =
        flotilla_client::kafka::check_cluster(&stale, &base, &SecurityProfiles::empty(), T).await;
    assert!(matches!(check, Err(KafkaError::ClusterIdMismatch { .. })));

    // --- topics: create, verify, mismatch; metadata never auto-creates ---
    assert_eq!(admin.topic_partitions("absent").await.unwrap(), None);
    assert_eq!(admin.topic_partitions("absent").await.unwrap(), None);
    assert_eq!(
        admin.ensure_topic("orders", 3).await.unwrap(),
        TopicStatus::Created
    );
    assert_eq!(admin.topic_partitions("orders").await.unwrap(), Some(3));
    assert_eq!(
        admin.ensure_topic("orders", 3).await.unwrap(),
        TopicStatus::Existed
    );
    match admin.ensure_topic("orders", 4).await {
        Err(KafkaError::PartitionMismatch {
            cluster,
            topic,
            expected,
            found,
        }) => {
            assert_eq!(
                (cluster.as_str(), topic.as_str(), expected, found),
                ("c0", "orders", 4, 3)
            );
        }
        other => panic!("expected PartitionMismatch, got {other:?}"),
    }
    assert_eq!(
        admin.topic_partitions("orders").await.unwrap(),
        Some(3),
        "never altered"
    );

    // --- end offsets: high watermarks in partition order ---
    assert_eq!(admin.end_offsets("orders", 3).await.unwrap(), vec![0, 0, 0]);
    let cfg = admin.client_config().clone();
    tokio::task::spawn_blocking(move || produce(&cfg, "orders", &[5, 0, 12]))
        .await
        .unwrap();
    assert_eq!(
        admin.end_offsets("orders", 3).await.unwrap(),
        vec![5, 0, 12]
    );

    // --- group coordinator: a fresh cluster answers group requests only once
    // its offsets topic exists (asked first, it says "not coordinator" and
    // librdkafka retries a second later); activation waits for it ---
    admin.ensure_group_coordinator().await.unwrap();
    let cfg = admin.client_config().clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = cfg
            .clone()
            .set("group.id", "first-try")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("orders", 0);
        // One attempt (librdkafka does not retry "not coordinator" here).
        consumer
            .committed_offsets(tpl, T)
            .expect("the coordinator answers the first group request");
    })
    .await
    .unwrap();
    admin.ensure_group_coordinator().await.unwrap();
    // --- producer ids: a fresh cluster hands one out (activation waits) ---
    admin.ensure_producer_ids().await.unwrap();
    admin.ensure_producer_ids().await.unwrap();

    // --- committed offsets of a group ---
    assert_eq!(
        admin
            .committed_offsets("readers", "orders", 3)
            .await
            .unwrap(),
        vec![None, None, None]
    );
    let cfg = admin.client_config().clone();
    tokio::task::spawn_blocking(move || {
        commit(&cfg, "readers", "orders", &[Some(4), None, Some(12)])
    })
    .await
    .unwrap();
    assert_eq!(
        admin
            .committed_offsets("readers", "orders", 3)
            .await
            .unwrap(),
        vec![Some(4), None, Some(12)]
    );
    // Another cluster has no commits for the same group.
    let admin1 = connect(&spec1, T).await.expect("connect c1");
    admin1.ensure_topic("orders", 3).await.unwrap();
    assert_eq!(
        admin1
            .committed_offsets("readers", "orders", 3)
            .await
            .unwrap(),
        vec![None, None, None]
    );

    // --- reading a live group's offsets does not join it or disturb its member ---
    let cfg = admin.client_config().clone();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let member = std::thread::spawn(move || {
        let consumer: BaseConsumer = cfg
            .clone()
            .set("group.id", "live")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .create()
            .unwrap();
        consumer.subscribe(&["orders"]).unwrap();
        let mut seen = 0;
        let mut signalled = false;
        let mut assignments = Vec::new();
        while stop_rx.try_recv().is_err() {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                seen += 1;
            }
            let a = consumer.assignment().unwrap().count();
            if assignments.last() != Some(&a) {
                assignments.push(a);
            }
            if !signalled && seen == 17 {
                consumer.commit_consumer_state(CommitMode::Sync).unwrap();
                ready_tx.send(()).unwrap();
                signalled = true;
            }
        }
        assignments
    });
    tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("live member consumed everything");
    assert_eq!(
        admin.committed_offsets("live", "orders", 3).await.unwrap(),
        vec![Some(5), None, Some(12)]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(()).unwrap();
    let assignments = tokio::task::spawn_blocking(move || member.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        assignments
            .into_iter()
            .filter(|&a| a > 0)
            .collect::<Vec<_>>(),
        vec![3],
        "the member kept its 3 partitions throughout (no rebalance)"
    );

    // --- delete ---
    assert!(admin.delete_topic("orders").await.unwrap());
    assert_eq!(admin.topic_partitions("orders").await.unwrap(), None);
    assert!(!admin.delete_topic("orders").await.unwrap());

    // --- a dead cluster is Unreachable within the timeout, never a hang ---
    drop(admin1);
    fleet.cluster_mut(1).kill();
    let short = Duration::from_secs(3);
    let started = Instant::now();
    let err = connect(&spec1, short).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, KafkaError::Unreachable { .. }), "{err}");
    assert!(!err.is_permanent());
    assert!(took < short + Duration::from_secs(3), "took {took:?}");

    // ...and after a restart the same cluster (same id) answers again.
    let _fleet = tokio::task::spawn_blocking(move || {
        fleet.cluster_mut(1).restart().expect("restart c1");
        fleet
    })
    .await
    .unwrap();
    let again = connect(&spec1, Duration::from_secs(30))
        .await
        .expect("c1 back");
    assert_eq!(again.cluster_id(), id1);
}

#[tokio::test]
async fn unreachable_bootstrap_times_out_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = spec("nowhere", &format!("127.0.0.1:{port}"), "x");
    let timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = connect(&s, timeout).await.unwrap_err();
    assert!(
        matches!(&err, KafkaError::Unreachable { cluster, timeout: t, .. } if cluster == "nowhere" && *t >= timeout),
        "{err}"
    );
    assert!(
        started.elapsed() < timeout + Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn malformed_bootstrap_is_refused_up_front() {
    for bad in [
        "localhost",
        "localhost:99999",
        "a:1,,b:2",
        "k1:9092;k2:9092",
    ] {
        let started = Instant::now();
        let err = connect(&spec("c", bad, "x"), T).await.unwrap_err();
        assert!(
            matches!(err, KafkaError::InvalidBootstrap { .. }),
            "{bad}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
