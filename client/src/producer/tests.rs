//! Quick tests on librdkafka mock clusters and the in-memory registry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::*;
use crate::kafka::{ClusterAdmin, KafkaProperties, MockFleet, SecurityProfiles};
use crate::registry::memory::MemoryKv;
use crate::registry::{
    ClientKind, Epoch, EpochState, Expect, Registry, TopicRoute, WeightedCluster, SCHEMA_VERSION,
};

const PARTITIONS: u32 = 3;

fn epoch(n: u64, write: &[&str], state: EpochState) -> Epoch {
    Epoch {
        n,
        write: write
            .iter()
            .map(|c| WeightedCluster {
                cluster: c.to_string(),
                weight: 100,
            })
            .collect(),
        state,
        fence: BTreeMap::new(),
        created_at: 0,
        ack_deadline: None,
    }
}

struct Setup {
    mocks: MockFleet,
    registry: Registry,
}

async fn setup(topic: &str) -> Setup {
    let mocks = tokio::task::spawn_blocking(|| MockFleet::start(2).expect("mock fleet"))
        .await
        .unwrap();
    mocks.create_topic(topic, PARTITIONS).unwrap();
    let registry = Registry::new(Arc::new(MemoryKv::new()), "test");
    for spec in mocks.cluster_specs() {
        registry.create_cluster(&spec).await.unwrap();
    }
    let route = TopicRoute {
        version: SCHEMA_VERSION,
        topic: topic.into(),
        partitions: PARTITIONS,
        epochs: vec![epoch(1, &["mock-0"], EpochState::Open)],
    };
    registry.put_route(&route, Expect::Absent).await.unwrap();
    Setup { mocks, registry }
}

fn config(registry: &Registry) -> FleetProducerConfig {
    let mut c = FleetProducerConfig::new();
    c.registry(registry.clone())
        .set("linger.ms", "1")
        .set("message.timeout.ms", "5000")
        .lease_ttl(Duration::from_secs(2));
    c
}

/// Reads the message at `offset` of `partition` from a mock cluster.
fn read_one(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> rdkafka::message::OwnedMessage {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .unwrap();
    c.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            return m.unwrap().detach();
        }
    }
    panic!("nothing read from {topic}/{partition}@{offset}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_lands_on_the_routed_cluster_with_the_epoch_header() {
    let s = setup("orders").await;
    let p = FleetProducer::new(config(&s.registry)).await.unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "mine",
        value: Some("x"),
    });
    let d = p
        .send(
            FutureRecord::to("orders")
                .key("k1")
                .payload("v1")
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(&*d.cluster, "mock-0");
    assert_eq!(d.epoch, 1);
    assert_eq!(
        d.partition as u32,
        crate::route::partition_for_key(b"k1", PARTITIONS)
    );
    let bootstrap = s.mocks.cluster(0).bootstrap().to_string();
    let m =
        tokio::task::spawn_blocking(move || read_one(&bootstrap, "orders", d.partition, d.offset))
            .await
            .unwrap();
    assert_eq!(m.payload(), Some(&b"v1"[..]));
    let h = m.headers().expect("headers");
    assert_eq!(h.get(0).key, "mine");
    assert_eq!(epoch_of(h), Some(1));
    assert_eq!(h.get(1).value, Some(&b"1"[..]));

    // The client record is registered under a lease.
    let rec = s
        .registry
        .client(ClientKind::Producer, p.client_id())
        .await
        .unwrap();
    assert!(rec.is_some());
    p.close(Duration::from_secs(5)).await.unwrap();
    let rec = s
        .registry
        .client(ClientKind::Producer, p.client_id())
        .await
        .unwrap();
    assert!(rec.is_none(), "close revokes the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_a_clear_no_route_error() {
    let s = setup("known").await;
    let p = FleetProducer::new(config(&s.registry)).await.unwrap();
    let (e, msg) = p
        .send(
            FutureRecord::to("nope").key("k").payload("v"),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, FleetSendError::NoRoute(_)), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(!e.is_retriable());
    assert_eq!(msg.topic(), "nope");
    assert_eq!(msg.payload(), Some(&b"v"[..]));
    match p.send_result(FutureRecord::to("nope").key("k").payload("v")) {
        Err((FleetSendError::NoRoute(_), r)) => assert_eq!(r.topic, "nope"),
        Err((e, _)) => panic!("{e}"),
        Ok(_) => panic!("routed an unknown topic"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_at_start_is_a_clear_error() {
    let kv = Arc::new(MemoryKv::new());
    kv.set_unavailable(true);
    let registry = Registry::new(kv, "test");
    let mut c = config(&registry);
    c.watcher.start_timeout = Duration::from_millis(300);
    let e = FleetProducer::new(c).await.unwrap_err();
    assert!(matches!(e, FleetProducerError::Registry(_)), "{e}");
    assert!(e.to_string().contains("registry"), "{e}");
    let e = FleetProducer::new(FleetProducerConfig::new())
        .await
        .unwrap_err();
    assert!(matches!(e, FleetProducerError::Config(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_id_mismatch_refuses_the_cluster() {
    let s = setup("t").await;
    // Register a third cluster whose recorded id is wrong, and route to it.
    let mut bad = s.mocks.cluster(1).cluster_spec("liar");
    bad.kafka_cluster_id = "someone-else".into();
    s.registry.create_cluster(&bad).await.unwrap();
    s.registry
        .update_route("t", |r| {
            let mut r = r.unwrap().clone();
            r.epochs = vec![epoch(1, &["liar"], EpochState::Open)];
            Ok(Some(r))
        })
        .await
        .unwrap();
    let p = FleetProducer::new(config(&s.registry)).await.unwrap();
    let (e, _) = p
        .send(
            FutureRecord::to("t").key("k").payload("v"),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    match &e {
        FleetSendError::ClusterUnavailable { cluster, error } => {
            assert_eq!(&**cluster, "liar");
            assert!(
                matches!(error, KafkaError::ClusterIdMismatch { .. }),
                "{error}"
            );
        }
        e => panic!("{e}"),
    }
    assert!(!e.is_retriable());
    assert!(e.to_string().contains("MISMATCH"), "{e}");
}

async fn wait_acked(registry: &Registry, id: &str, topic: &str, epoch: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rec = registry.client(ClientKind::Producer, id).await.unwrap();
        if rec.as_ref().and_then(|(r, _)| r.acked.get(topic)) == Some(&epoch) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "producer {id} never acked {topic}/{epoch}: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_by_hand_moves_sends_to_the_new_epoch() {
    let s = setup("sw").await;
    let p = FleetProducer::new(config(&s.registry)).await.unwrap();
    for i in 0..20 {
        let d = p
            .send(
                FutureRecord::to("sw")
                    .key(&format!("k{i}"))
                    .payload("before"),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!((&*d.cluster, d.epoch), ("mock-0", 1));
    }
    // 1. Pending epoch 2 writes to mock-1.
    let snap = p.snapshot();
    s.registry
        .update_route("sw", |r| {
            let r = r.unwrap();
            let next = crate::route::propose(
                Some(r),
                "sw",
                PARTITIONS,
                vec![WeightedCluster {
                    cluster: "mock-1".into(),
                    weight: 100,
                }],
                &snap.clusters,
                0,
                60_000,
            )?;
            Ok(Some(next))
        })
        .await
        .unwrap();
    // 2. The producer holds and acknowledges it.
    wait_acked(&s.registry, p.client_id(), "sw", 2).await;
    assert_eq!(p.acked().get("sw"), Some(&2));
    // A send now is held; with a short timeout it gives the record back.
    let (e, m) = p
        .send(
            FutureRecord::to("sw").key("held").payload("x"),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FleetSendError::Timeout {
                reason: WaitReason::Held,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(m.payload(), Some(&b"x"[..]));
    assert_eq!(p.held_records(), 0);
    // These wait for the switch, in order.
    let waiting: Vec<_> = (0..10)
        .map(|i| {
            p.send_result(
                FutureRecord::to("sw")
                    .key(&format!("k{i}"))
                    .payload("during"),
            )
            .map_err(|(e, _)| e)
            .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(p.held_records(), 10);
    // 3. Read the boundary and seal.
    let mut boundary = BTreeMap::new();
    for (i, id) in ["mock-0", "mock-1"].iter().enumerate() {
        let admin = ClusterAdmin::connect(
            &s.mocks.cluster(i).cluster_spec(id),
            &KafkaProperties::new(),
            &SecurityProfiles::empty(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        boundary.insert(
            id.to_string(),
            admin.end_offsets("sw", PARTITIONS).await.unwrap(),
        );
    }
    assert_eq!(boundary["mock-0"].iter().sum::<i64>(), 20);
    s.registry
        .update_route("sw", |r| {
            Ok(Some(crate::route::seal(r.unwrap(), 2, boundary.clone())?))
        })
        .await
        .unwrap();
    // 4. Held records go out with epoch 2, then new ones too.
    let mut last_offset = BTreeMap::new();
    for f in waiting {
        let d = f.await.map_err(|(e, _)| e).unwrap();
        assert_eq!((&*d.cluster, d.epoch), ("mock-1", 2));
        // In order per partition.
        let prev = last_offset.insert(d.partition, d.offset);
        assert!(prev.is_none_or(|p| p < d.offset));
    }
    let d = p
        .send(
            FutureRecord::to("sw").key("after").payload("after"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!((&*d.cluster, d.epoch), ("mock-1", 2));
    assert_eq!(p.routing_epoch("sw"), Some(2));
    p.flush(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_buffer_is_bounded() {
    let s = setup("hb").await;
    let mut c = config(&s.registry);
    c.hold_capacity(2);
    let p = FleetProducer::new(c).await.unwrap();
    let snap = p.snapshot();
    s.registry
        .update_route("hb", |r| {
            Ok(Some(crate::route::propose(
                r,
                "hb",
                PARTITIONS,
                vec![WeightedCluster {
                    cluster: "mock-1".into(),
                    weight: 1,
                }],
                &snap.clusters,
                0,
                60_000,
            )?))
        })
        .await
        .unwrap();
    wait_acked(&s.registry, p.client_id(), "hb", 2).await;
    let _a = p
        .send_result(FutureRecord::<str, str>::to("hb").payload("1"))
        .map_err(|(e, _)| e)
        .unwrap();
    let _b = p
        .send_result(FutureRecord::<str, str>::to("hb").payload("2"))
        .map_err(|(e, _)| e)
        .unwrap();
    match p.send_result(FutureRecord::<str, str>::to("hb").payload("3")) {
        Err((FleetSendError::HoldBufferFull { capacity: 2 }, _)) => {}
        Err((e, _)) => panic!("{e}"),
        Ok(_) => panic!("hold buffer overflowed"),
    }
    let (e, _) = p
        .send(
            FutureRecord::<str, str>::to("hb").payload("4"),
            Timeout::After(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FleetSendError::Timeout {
                reason: WaitReason::HoldBufferFull,
                ..
            }
        ),
        "{e}"
    );
}

async fn outage_setup(mode: OutageMode) -> (Setup, Arc<MemoryKv>, FleetProducer) {
    let mocks = tokio::task::spawn_blocking(|| MockFleet::start(1).expect("mock fleet"))
        .await
        .unwrap();
    mocks.create_topic("o", PARTITIONS).unwrap();
    let kv = Arc::new(MemoryKv::new());
    let registry = Registry::new(kv.clone(), "test");
    for spec in mocks.cluster_specs() {
        registry.create_cluster(&spec).await.unwrap();
    }
    let route = TopicRoute {
        version: SCHEMA_VERSION,
        topic: "o".into(),
        partitions: PARTITIONS,
        epochs: vec![epoch(1, &["mock-0"], EpochState::Open)],
    };
    registry.put_route(&route, Expect::Absent).await.unwrap();
    let mut c = config(&registry);
    c.registry_outage(mode);
    let p = FleetProducer::new(c).await.unwrap();
    (Setup { mocks, registry }, kv, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_keep_producing_sends_on_the_last_snapshot() {
    let (_s, kv, p) = outage_setup(OutageMode::KeepProducing).await;
    kv.set_unavailable(true);
    kv.disconnect_watchers();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = p
        .send(
            FutureRecord::to("o").key("k").payload("v"),
            Duration::from_secs(1),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!((&*d.cluster, d.epoch), ("mock-0", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_hold_mode_holds_until_the_registry_is_back() {
    let (_s, kv, p) = outage_setup(OutageMode::Hold).await;
    kv.set_unavailable(true);
    kv.disconnect_watchers();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (e, _) = p
        .send(
            FutureRecord::to("o").key("k").payload("v"),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FleetSendError::Timeout {
                reason: WaitReason::Held,
                ..
            }
        ),
        "{e}"
    );
    let waiting = p
        .send_result(FutureRecord::to("o").key("k").payload("later"))
        .map_err(|(e, _)| e)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(p.held_records(), 1);
    kv.set_unavailable(false);
    let d = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("held record released once the registry is back")
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(&*d.cluster, "mock-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_lease_registers_again_with_the_acked_epochs() {
    let s = setup("l").await;
    let p = FleetProducer::new(config(&s.registry)).await.unwrap();
    let snap = p.snapshot();
    s.registry
        .update_route("l", |r| {
            Ok(Some(crate::route::propose(
                r,
                "l",
                PARTITIONS,
                vec![WeightedCluster {
                    cluster: "mock-1".into(),
                    weight: 1,
                }],
                &snap.clusters,
                0,
                60_000,
            )?))
        })
        .await
        .unwrap();
    wait_acked(&s.registry, p.client_id(), "l", 2).await;
    // The lease lapses (as if the producer stalled past its TTL).
    s.registry
        .kv()
        .revoke(
            s.registry
                .kv()
                .get(&format!(
                    "/flotilla/test/clients/producer/{}",
                    p.client_id()
                ))
                .await
                .unwrap()
                .unwrap()
                .lease
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(s
        .registry
        .client(ClientKind::Producer, p.client_id())
        .await
        .unwrap()
        .is_none());
    // The lease keeper registers again, with acked = {l: 2}.
    wait_acked(&s.registry, p.client_id(), "l", 2).await;
}

/// Proposes `write` for `topic`, waits for every live producer's ack, reads
/// the boundary and seals: the controller's steps, by hand.
async fn switch_to(s: &Setup, topic: &str, write: &[&str]) {
    let route = propose_and_wait(s, topic, write).await;
    seal_now(s, topic, &route).await;
}

/// Proposes `write` as the pending epoch and waits for every live producer's ack.
async fn propose_and_wait(s: &Setup, topic: &str, write: &[&str]) -> TopicRoute {
    let route = propose(s, topic, write).await;
    let pending = route.pending_epoch().unwrap().n;
    // Usually milliseconds; generous because a starved 2-core machine (Kafka
    // JVMs and builds next to the test) once took over 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let snap = s.registry.snapshot().await.unwrap();
        if snap
            .producers()
            .all(|p| p.acked.get(topic) == Some(&pending))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ack of {pending}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    route
}

/// Proposes `write` as the pending epoch of `topic`.
async fn propose(s: &Setup, topic: &str, write: &[&str]) -> TopicRoute {
    let snap = s.registry.snapshot().await.unwrap();
    let (route, _) = s
        .registry
        .update_route(topic, |r| {
            Ok(Some(crate::route::propose(
                r,
                topic,
                PARTITIONS,
                write
                    .iter()
                    .map(|c| WeightedCluster {
                        cluster: c.to_string(),
                        weight: 100,
                    })
                    .collect(),
                &snap.clusters,
                0,
                60_000,
            )?))
        })
        .await
        .unwrap()
        .unwrap();
    route
}

/// Reads the boundary and seals the pending epoch of `route`.
async fn seal_now(s: &Setup, topic: &str, route: &TopicRoute) {
    let pending = route.pending_epoch().unwrap().n;
    let mut boundary = BTreeMap::new();
    let open = route.open_epoch().unwrap();
    for c in open
        .clusters()
        .chain(route.pending_epoch().unwrap().clusters())
    {
        let i: usize = c.trim_start_matches("mock-").parse().unwrap();
        let admin = ClusterAdmin::connect(
            &s.mocks.cluster(i).cluster_spec(c),
            &KafkaProperties::new(),
            &SecurityProfiles::empty(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        boundary.insert(
            c.clone(),
            admin.end_offsets(topic, PARTITIONS).await.unwrap(),
        );
    }
    s.registry
        .update_route(topic, |r| {
            Ok(Some(crate::route::seal(
                r.unwrap(),
                pending,
                boundary.clone(),
            )?))
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_switches_under_load_keep_per_key_order_and_fences() {
    let s = setup("load").await;
    let producers = [
        FleetProducer::new(config(&s.registry)).await.unwrap(),
        FleetProducer::new(config(&s.registry)).await.unwrap(),
    ];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loads = Vec::new();
    for (pi, p) in producers.iter().enumerate() {
        let (p, stop) = (p.clone(), stop.clone());
        loads.push(tokio::spawn(async move {
            let mut out: Vec<(String, u64, Delivery)> = Vec::new();
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let futs: Vec<_> = (0..200)
                    .map(|k| {
                        let key = format!("p{pi}-{k}");
                        let f = p
                            .send_result(FutureRecord::to("load").key(&key).payload("v"))
                            .map_err(|(e, _)| e)
                            .unwrap();
                        (key, f)
                    })
                    .collect();
                for (key, f) in futs {
                    out.push((key, seq, f.await.map_err(|(e, _)| e).unwrap()));
                }
                seq += 1;
            }
            out
        }));
    }
    for write in [
        &["mock-0", "mock-1"][..],
        &["mock-1"],
        &["mock-0"],
        &["mock-1", "mock-0"],
    ] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        switch_to(&s, "load", write).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for l in loads {
        all.extend(l.await.unwrap());
    }
    let route = s.registry.route("load").await.unwrap().unwrap().0;
    assert_eq!(route.last_epoch_n(), 5);
    let mut by_key: BTreeMap<&str, Vec<(u64, &Delivery)>> = BTreeMap::new();
    let mut epochs = std::collections::BTreeSet::new();
    for (k, seq, d) in &all {
        by_key.entry(k).or_default().push((*seq, d));
        epochs.insert(d.epoch);
        let e = route.epoch(d.epoch).unwrap();
        assert!(e.writes_to(&d.cluster), "{d:?}");
        if let Some(f) = e.fence.get(&*d.cluster) {
            assert!(
                d.offset < f[d.partition as usize],
                "{d:?} above fence {f:?}"
            );
        }
        if let Some(prev) = route.epoch(d.epoch - 1) {
            if let Some(f) = prev.fence.get(&*d.cluster) {
                assert!(
                    d.offset >= f[d.partition as usize],
                    "{d:?} below fence {f:?}"
                );
            }
        }
    }
    assert_eq!(epochs.len(), 5, "every epoch was written: {epochs:?}");
    for (k, mut ds) in by_key {
        ds.sort_by_key(|(seq, _)| *seq);
        for w in ds.windows(2) {
            let ((_, a), (_, b)) = (w[0], w[1]);
            assert!(
                a.epoch < b.epoch
                    || (a.epoch == b.epoch && a.cluster == b.cluster && a.offset < b.offset),
                "key {k}: {a:?} then {b:?}"
            );
        }
    }
}

#[test]
fn permanent_errors_are_not_retriable() {
    let auth = FleetSendError::Kafka {
        cluster: "a".into(),
        error: KafkaError::Authorization {
            cluster: "a".into(),
            detail: "TopicAuthorizationFailed".into(),
        },
    };
    assert!(auth.is_authorization());
    assert!(!auth.is_retriable());
    let down = FleetSendError::Kafka {
        cluster: "a".into(),
        error: KafkaError::Transient {
            cluster: "a".into(),
            detail: "MessageTimedOut".into(),
        },
    };
    assert!(down.is_retriable());
    assert!(!down.is_authorization());
    assert_eq!(parse_epoch_header(b"42"), Some(42));
    assert_eq!(parse_epoch_header(b"x"), None);
}

#[test]
fn fleet_producer_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<FleetProducer>();
    // Delivery futures move between tasks and threads like rdkafka's.
    fn future<T: Send + Sync + Unpin + 'static>() {}
    future::<DeliveryFuture>();
    fn service<S: tower::Service<OwnedRecord, Response = Delivery, Error = FleetSendError>>() {}
    service::<FleetProducer>();
}

/// A global `metrics` recorder that sums every counter and histogram sample
/// by `name{labels}` (tests run in parallel: compare with `>=`).
mod recorder {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
        Recorder, SharedString, Unit,
    };

    type Sums = Arc<Mutex<HashMap<String, f64>>>;

    struct Cell(Sums, String);

    impl CounterFn for Cell {
        fn increment(&self, v: u64) {
            *self.0.lock().unwrap().entry(self.1.clone()).or_default() += v as f64;
        }
        fn absolute(&self, v: u64) {
            self.0.lock().unwrap().insert(self.1.clone(), v as f64);
        }
    }
    impl GaugeFn for Cell {
        fn increment(&self, v: f64) {
            *self.0.lock().unwrap().entry(self.1.clone()).or_default() += v;
        }
        fn decrement(&self, v: f64) {
            *self.0.lock().unwrap().entry(self.1.clone()).or_default() -= v;
        }
        fn set(&self, v: f64) {
            self.0.lock().unwrap().insert(self.1.clone(), v);
        }
    }
    impl HistogramFn for Cell {
        fn record(&self, _v: f64) {
            // Count samples.
            *self.0.lock().unwrap().entry(self.1.clone()).or_default() += 1.0;
        }
    }

    struct Rec(Sums);

    fn name(key: &Key) -> String {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }

    impl Recorder for Rec {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(Arc::new(Cell(self.0.clone(), name(key))))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(Arc::new(Cell(self.0.clone(), name(key))))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(Arc::new(Cell(self.0.clone(), name(key))))
        }
    }

    /// The sums, once this recorder is the global one (None if another is).
    pub fn sums() -> Option<Sums> {
        static SUMS: OnceLock<Option<Sums>> = OnceLock::new();
        SUMS.get_or_init(|| {
            let sums: Sums = Default::default();
            metrics::set_global_recorder(Rec(sums.clone()))
                .ok()
                .map(|_| sums)
        })
        .clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_records_bytes_errors_and_switches() {
    let Some(sums) = recorder::sums() else {
        eprintln!("another global metrics recorder is installed; skipping");
        return;
    };
    let get = |k: &str| sums.lock().unwrap().get(k).copied().unwrap_or(0.0);
    let s = setup("m").await;
    let p = FleetProducer::new(config(&s.registry)).await.unwrap();
    for _ in 0..5 {
        p.send(
            FutureRecord::to("m").key("key").payload("12345"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    }
    assert!(get("flotilla_producer_records_total{cluster=mock-0}") >= 5.0);
    assert!(get("flotilla_producer_bytes_total{cluster=mock-0}") >= 40.0);
    let switches = get("flotilla_producer_epoch_switches_total{}");
    let holds = get("flotilla_producer_hold_seconds{}");
    let route = propose_and_wait(&s, "m", &["mock-1"]).await;
    let held = p
        .send_result(FutureRecord::to("m").key("key").payload("held"))
        .map_err(|(e, _)| e)
        .unwrap();
    assert!(get("flotilla_producer_held_records{}") >= 1.0);
    seal_now(&s, "m", &route).await;
    held.await.map_err(|(e, _)| e).unwrap();
    p.send(
        FutureRecord::to("m").key("key").payload("after"),
        Duration::from_secs(5),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    assert!(get("flotilla_producer_epoch_switches_total{}") >= switches + 1.0);
    assert!(get("flotilla_producer_hold_seconds{}") >= holds + 1.0);
    assert!(get("flotilla_producer_records_total{cluster=mock-1}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_starting_during_a_switch_holds_and_acks_at_once() {
    let s = setup("late").await;
    // A first producer takes part in the switch...
    let first = FleetProducer::new(config(&s.registry)).await.unwrap();
    let route = propose_and_wait(&s, "late", &["mock-1"]).await;
    // ...then a second one starts while epoch 2 is pending.
    let late = FleetProducer::new(config(&s.registry)).await.unwrap();
    assert_eq!(late.acked().get("late"), Some(&2));
    wait_acked(&s.registry, late.client_id(), "late", 2).await;
    let held = late
        .send_result(FutureRecord::to("late").key("k").payload("v"))
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(late.held_records(), 1);
    seal_now(&s, "late", &route).await;
    let d = held.await.map_err(|(e, _)| e).unwrap();
    assert_eq!((&*d.cluster, d.epoch), ("mock-1", 2));
    drop(first);
}

/// The ack of a pending epoch waits for every record routed with the old
/// epoch, also those still on their way when the switch began (here the
/// broker is down), and follows their delivery. Records delivered before the
/// switch (settled, but not yet reported to the router on the lock-free
/// path) must not delay it, and records in flight must not be forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_waits_for_records_in_flight_then_follows_their_delivery() {
    let s = setup("inflight").await;
    let mut c = config(&s.registry);
    c.set("message.timeout.ms", "30000")
        .set("reconnect.backoff.ms", "10")
        .set("reconnect.backoff.max.ms", "100");
    let p = FleetProducer::new(c).await.unwrap();
    for i in 0..50 {
        let d = p
            .send(
                FutureRecord::to("inflight")
                    .key(&format!("k{i}"))
                    .payload("before"),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(d.epoch, 1);
    }
    s.mocks.cluster(0).broker_down(1).unwrap();
    let stuck: Vec<_> = (0..20)
        .map(|i| {
            p.send_result(
                FutureRecord::to("inflight")
                    .key(&format!("k{i}"))
                    .payload("stuck"),
            )
            .map_err(|(e, _)| e)
            .unwrap()
        })
        .collect();
    propose(&s, "inflight", &["mock-1"]).await;
    // The producer must not acknowledge the pending epoch while 20 records
    // of epoch 1 are in flight. (A bounded observation window for a property
    // that must hold throughout, not a wait for something to happen.)
    let window = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < window {
        assert_ne!(
            p.acked().get("inflight"),
            Some(&2),
            "acked with records in flight"
        );
        let rec = s
            .registry
            .client(ClientKind::Producer, p.client_id())
            .await
            .unwrap();
        assert_ne!(
            rec.as_ref().and_then(|(r, _)| r.acked.get("inflight")),
            Some(&2),
            "ack written with records in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It did see the pending epoch: a new send is held.
    let held = p
        .send_result(FutureRecord::to("inflight").key("k0").payload("held"))
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(p.held_records(), 1);
    s.mocks.cluster(0).broker_up(1).unwrap();
    for f in stuck {
        let d = f.await.map_err(|(e, _)| e).unwrap();
        assert_eq!((&*d.cluster, d.epoch), ("mock-0", 1));
    }
    wait_acked(&s.registry, p.client_id(), "inflight", 2).await;
    drop(held);
}

/// Every record read back from `topic` on mock cluster `i` (all partitions,
/// from the start), at least `n` of them.
fn read_all(s: &Setup, i: usize, topic: &str, n: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", s.mocks.cluster(i).bootstrap())
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {n} records of {topic} on mock-{i}",
            out.len()
        );
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            out.push(m.unwrap().detach());
        }
    }
    // Nothing more than expected.
    while let Some(m) = c.poll(Duration::from_millis(300)) {
        out.push(m.unwrap().detach());
    }
    out
}

/// Epoch-only header lists are recycled (detached from delivered records,
/// reused for the next records of the same epoch). A record must still
/// carry exactly its own epoch: across switches, with two topics on
/// different epochs at once, after failed and retried deliveries, and next
/// to records with headers of their own and records librdkafka refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_epoch_headers_carry_each_records_own_epoch() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use std::collections::HashMap;

    let s = setup("rc").await;
    // A second topic that stays on epoch 1 while "rc" switches.
    // A third one whose deliveries fail.
    for topic in ["rc-other", "rc-fail"] {
        s.mocks.create_topic(topic, PARTITIONS).unwrap();
        s.registry
            .put_route(
                &TopicRoute {
                    version: SCHEMA_VERSION,
                    topic: topic.into(),
                    partitions: PARTITIONS,
                    epochs: vec![epoch(1, &["mock-0"], EpochState::Open)],
                },
                Expect::Absent,
            )
            .await
            .unwrap();
    }
    let p = FleetProducer::new(config(&s.registry)).await.unwrap();
    let batch = super::headers::BATCH;
    // (topic, key, with headers of its own) -> delivery
    let mut sent: Vec<(String, String, bool, Delivery)> = Vec::new();
    let burst = |round: usize| {
        let p = p.clone();
        async move {
            let mut futs = Vec::new();
            for i in 0..3 * batch {
                let topic = if i % 3 == 0 { "rc-other" } else { "rc" };
                let key = format!("r{round}-{i}");
                let own = i % 50 == 0;
                let mut rec = FutureRecord::to(topic).key(&key).payload("v");
                if own {
                    rec = rec.headers(OwnedHeaders::new().insert(Header {
                        key: "mine",
                        value: Some("x"),
                    }));
                }
                let f = p.send_result(rec).map_err(|(e, _)| e).unwrap();
                futs.push((topic.to_string(), key, own, f));
            }
            let mut out = Vec::new();
            for (t, k, own, f) in futs {
                out.push((t, k, own, f.await.map_err(|(e, _)| e).unwrap()));
            }
            out
        }
    };
    sent.extend(burst(0).await);
    sent.extend(burst(1).await);
    let (recycled, _, _) = p.header_lists();
    assert!(recycled > 0, "lists of delivered records were reused");

    // A refused record (no such partition) and a failed delivery return
    // their lists without harm; a retried delivery keeps its headers.
    let (e, _) = p
        .send(
            FutureRecord::to("rc").key("x").payload("v").partition(99),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, FleetSendError::Kafka { .. }), "{e}");
    s.mocks
        .cluster(0)
        .push_request_errors(
            RDKafkaApiKey::Produce,
            vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2],
        )
        .unwrap();
    sent.extend(burst(2).await);
    s.mocks
        .cluster(0)
        .push_request_errors(
            RDKafkaApiKey::Produce,
            vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        )
        .unwrap();
    // (A topic of its own: after the failure librdkafka refuses the
    // topic's records at once until its metadata is refreshed.)
    let mut futs = Vec::new();
    for i in 0..20 {
        let key = format!("f{i}");
        match p.send_result(FutureRecord::to("rc-fail").key(&key).payload("v")) {
            Ok(f) => futs.push((key, f)),
            Err((e, _)) => assert!(matches!(e, FleetSendError::Kafka { .. }), "{e}"),
        }
    }
    let mut failed = 0;
    for (key, f) in futs {
        match f.await {
            // Another partition's request.
            Ok(d) => sent.push(("rc-fail".into(), key, false, d)),
            Err((e, m)) => {
                assert!(matches!(e, FleetSendError::Kafka { .. }), "{e}");
                // The failed record comes back with its epoch header.
                assert_eq!(m.headers().and_then(epoch_of), Some(1));
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "a delivery failed");

    // Epoch 2 of "rc" on mock-1 while "rc-other" stays on epoch 1.
    switch_to(&s, "rc", &["mock-1"]).await;
    sent.extend(burst(3).await);
    sent.extend(burst(4).await);
    // Epoch 3 back on mock-0, next to epoch 1 lists of "rc-other".
    switch_to(&s, "rc", &["mock-0"]).await;
    sent.extend(burst(5).await);
    sent.extend(burst(6).await);
    let (recycled_after, fresh, parked) = p.header_lists();
    assert!(recycled_after > recycled, "reused after the switches too");
    assert!(fresh > 0);
    assert!(parked <= super::headers::POOL_MAX);

    // (cluster, topic, partition, offset) -> what was sent there
    let by_place: HashMap<(String, String, i32, i64), _> = sent
        .iter()
        .map(|r| {
            let d = &r.3;
            (
                (d.cluster.to_string(), r.0.clone(), d.partition, d.offset),
                r,
            )
        })
        .collect();
    assert_eq!(by_place.len(), sent.len(), "one place per record");
    let mut checked = 0;
    for (i, cluster) in ["mock-0", "mock-1"].iter().enumerate() {
        for topic in ["rc", "rc-other", "rc-fail"] {
            let n = sent
                .iter()
                .filter(|r| r.0 == topic && &*r.3.cluster == *cluster)
                .count();
            if n == 0 {
                continue;
            }
            let got = read_all(&s, i, topic, n);
            assert_eq!(got.len(), n, "{topic} on {cluster}: nothing extra");
            for m in got {
                let place = (
                    cluster.to_string(),
                    topic.to_string(),
                    m.partition(),
                    m.offset(),
                );
                let (_, key, own, d) = by_place.get(&place).expect("a record we sent");
                assert_eq!(m.key(), Some(key.as_bytes()));
                let h = m.headers().expect("headers");
                let epochs: Vec<_> = h.iter().filter(|h| h.key == EPOCH_HEADER).collect();
                assert_eq!(epochs.len(), 1, "{place:?}: one epoch header");
                assert_eq!(
                    epochs[0].value.and_then(parse_epoch_header),
                    Some(d.epoch),
                    "{place:?}: its own epoch"
                );
                assert_eq!(h.count(), if *own { 2 } else { 1 }, "{place:?}");
                if *own {
                    assert_eq!(h.get(0).key, "mine");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, sent.len());
    let epochs: std::collections::BTreeSet<_> = sent
        .iter()
        .filter(|r| r.0 != "rc-fail")
        .map(|r| (r.0.clone(), r.3.epoch))
        .collect();
    assert_eq!(
        epochs.into_iter().collect::<Vec<_>>(),
        vec![
            ("rc".to_string(), 1),
            ("rc".to_string(), 2),
            ("rc".to_string(), 3),
            ("rc-other".to_string(), 1)
        ]
    );
    p.close(Duration::from_secs(5)).await.unwrap();
}
