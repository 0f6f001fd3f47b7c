//! `FleetProducer` against real etcd and real Kafka clusters.
//!
//! - Several producers under continuous load on thousands of keys while the
//!   route switches A → A+B → B (pending → every producer acks → boundary
//!   read with `ClusterAdmin::end_offsets` → `route::seal` in one CAS), with
//!   plain rdkafka consumers reading every cluster afterwards: no acknowledged
//!   record lost, none duplicated, per-key order preserved across epochs, every
//!   record's epoch header names an epoch whose write set holds the cluster it
//!   landed on, and every record lies on the right side of its epoch's fence.
//! - A killed cluster: sends fail within `message.timeout.ms` (no hang, no
//!   silent drop).
//! - etcd down at start, unknown topic: clear errors.

#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/switch.rs"]
mod switch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet::{connect_registry, open_route, permanent_cluster, register_clusters};
use flotilla_client::kafka::ClusterAdmin;
use flotilla_client::producer::{epoch_of, FleetProducerError, OutageMode};
use flotilla_client::registry::{EpochState, Registry, WeightedCluster};
use flotilla_client::{FleetProducer, FleetProducerConfig, FleetSendError};
use flotilla_testkit::{create_topic, EtcdServer, KafkaFleet};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use switch::{drive_switch, write_set, Producers};

const FLEET: &str = "prodtest";
const PARTITIONS: u32 = 4;
const PRODUCERS: usize = 3;
const KEYS_PER_PRODUCER: usize = 1000;

fn producer_config(id: &str, message_timeout_ms: u64) -> FleetProducerConfig {
    let mut c = FleetProducerConfig::new();
    c.client_id(id)
        .set("linger.ms", "5")
        .set("message.timeout.ms", message_timeout_ms.to_string())
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500")
        .lease_ttl(Duration::from_secs(3));
    c
}

/// One switch by hand, as the controller does it; returns how long the
/// producers were held (pending → sealed).
async fn switch(
    reg: &Registry,
    topic: &str,
    write: Vec<WeightedCluster>,
    admins: &HashMap<String, ClusterAdmin>,
) -> Duration {
    let p = Producers::Exactly(PRODUCERS);
    let poll = Duration::from_millis(10);
    drive_switch(reg, topic, PARTITIONS, write, admins, p, poll)
        .await
        .sealed
}

#[derive(Debug, Clone)]
struct Sent {
    key: String,
    seq: u64,
    cluster: String,
    epoch: u64,
}

#[derive(Debug, Clone)]
struct Read {
    cluster: String,
    partition: i32,
    offset: i64,
    key: String,
    seq: u64,
    epoch: Option<u64>,
}

/// Reads every partition of `topic` on a cluster from the beginning to its
/// current high watermark with a plain rdkafka consumer.
fn read_cluster(cluster: &str, bootstrap: &str, topic: &str) -> Vec<Read> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("check-{cluster}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS as i32 {
        let (_, high) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high > 0 {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done: HashSet<i32> = HashSet::new();
    while done.len() < ends.len() {
        assert!(Instant::now() < deadline, "reading {cluster} timed out");
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let payload = std::str::from_utf8(m.payload().unwrap()).unwrap();
        let (pk, seq) = payload.rsplit_once(':').unwrap();
        assert_eq!(pk, key);
        out.push(Read {
            cluster: cluster.into(),
            partition: m.partition(),
            offset: m.offset(),
            key,
            seq: seq.parse().unwrap(),
            epoch: m.headers().and_then(epoch_of),
        });
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_a_to_ab_to_b_under_load_loses_nothing_and_keeps_order() {
    const TOPIC: &str = "orders";
    let etcd = EtcdServer::start().expect("start etcd");
    let kafka = tokio::task::spawn_blocking(|| KafkaFleet::start(2).expect("start Kafka"))
        .await
        .unwrap();
    let ids = ["A", "B"];
    let reg = connect_registry(&etcd.endpoint(), FLEET).await;
    let admins = register_clusters(
        &reg,
        &kafka,
        &ids,
        TOPIC,
        PARTITIONS,
        Duration::from_secs(15),
        false,
    )
    .await;
    open_route(&reg, TOPIC, PARTITIONS, &["A"]).await;

    let endpoint = etcd.endpoint();
    let mut producers = Vec::new();
    for i in 0..PRODUCERS {
        let p = FleetProducer::connect(
            &[endpoint.as_str()],
            FLEET,
            producer_config(&format!("load-{i}"), 30_000),
        )
        .await
        .expect("start producer");
        producers.push(p);
    }
    // Unknown topic: a clear error, nothing sent anywhere.
    let (e, _) = producers[0]
        .send(
            FutureRecord::to("no-such-topic").key("k").payload("v"),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, FleetSendError::NoRoute(_)), "{e}");
    assert!(e.to_string().contains("no-such-topic"), "{e}");

    // Continuous load: each producer owns its keys and sends them round after
    // round, seq numbers per key, awaiting each round before the next.
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for (pi, p) in producers.iter().enumerate() {
        let p = p.clone();
        let stop = stop.clone();
        loads.push(tokio::spawn(async move {
            let keys: Vec<String> = (0..KEYS_PER_PRODUCER)
                .map(|k| format!("p{pi}-k{k}"))
                .collect();
            let mut acked = Vec::new();
            let mut failed = 0usize;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut futs = Vec::with_capacity(keys.len());
                for k in &keys {
                    let payload = format!("{k}:{seq}");
                    let f = p
                        .send_result(FutureRecord::to(TOPIC).key(k).payload(&payload))
                        .map_err(|(e, _)| e)
                        .expect("enqueue");
                    futs.push((k.clone(), f));
                }
                for (k, f) in futs {
                    match f.await {
                        Ok(d) => acked.push(Sent {
                            key: k,
                            seq,
                            cluster: d.cluster.to_string(),
                            epoch: d.epoch,
                        }),
                        Err((e, _)) => {
                            failed += 1;
                            eprintln!("delivery failed: {e}");
                        }
                    }
                }
                seq += 1;
            }
            (acked, failed)
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let pause1 = switch(&reg, TOPIC, write_set(&["A", "B"]), &admins).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pause2 = switch(&reg, TOPIC, write_set(&["B"]), &admins).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for l in loads {
        let (acked, failed) = l.await.unwrap();
        assert_eq!(failed, 0, "deliveries failed without any fault");
        sent.extend(acked);
    }
    for p in &producers {
        p.flush(Duration::from_secs(10)).await.unwrap();
    }
    eprintln!(
        "{} records acknowledged; switch pauses (pending → sealed): {pause1:?}, {pause2:?}",
        sent.len()
    );
    for p in &producers {
        assert_eq!(p.routing_epoch(TOPIC), Some(3));
    }

    // Every epoch was used, on the clusters of its write set.
    let route = reg.route(TOPIC).await.unwrap().unwrap().0;
    let mut per_epoch: BTreeMap<(u64, String), usize> = BTreeMap::new();
    for s in &sent {
        *per_epoch.entry((s.epoch, s.cluster.clone())).or_default() += 1;
        assert!(route.epoch(s.epoch).unwrap().writes_to(&s.cluster));
    }
    eprintln!("acknowledged per (epoch, cluster): {per_epoch:?}");
    for key in [(1, "A"), (2, "A"), (2, "B"), (3, "B")] {
        assert!(
            per_epoch.contains_key(&(key.0, key.1.to_string())),
            "no record for {key:?}"
        );
    }

    // Read everything back with plain consumers.
    let mut reads = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let b = kafka.cluster(i).bootstrap();
        let id = id.to_string();
        reads.extend(
            tokio::task::spawn_blocking(move || read_cluster(&id, &b, TOPIC))
                .await
                .unwrap(),
        );
    }
    // None lost, none duplicated.
    let mut count: HashMap<(String, u64), usize> = HashMap::new();
    for r in &reads {
        *count.entry((r.key.clone(), r.seq)).or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicated records: {dups:?}");
    let lost: Vec<_> = sent
        .iter()
        .filter(|s| !count.contains_key(&(s.key.clone(), s.seq)))
        .take(5)
        .collect();
    assert!(lost.is_empty(), "acknowledged records lost: {lost:?}");
    assert_eq!(reads.len(), sent.len(), "records read vs acknowledged");

    // Epoch headers and fences.
    for r in &reads {
        let n = r.epoch.expect("every record has an epoch header");
        let e = route.epoch(n).expect("known epoch");
        assert!(
            e.writes_to(&r.cluster),
            "{r:?}: epoch {n} does not write to {}",
            r.cluster
        );
        // Below the fence of its own epoch, at or above the previous one's.
        if e.state == EpochState::Sealed {
            let fence = &e.fence[&r.cluster];
            assert!(
                r.offset < fence[r.partition as usize],
                "{r:?} above the fence of epoch {n}: {fence:?}"
            );
        }
        if let Some(prev) = route.epoch(n - 1) {
            if let Some(f) = prev.fence.get(&r.cluster) {
                assert!(
                    r.offset >= f[r.partition as usize],
                    "{r:?} below the fence of epoch {}: {f:?}",
                    n - 1
                );
            }
        }
    }

    // Per-key order in the order a fence-respecting consumer delivers:
    // by epoch, then by offset (one partition per key within an epoch).
    let mut by_key: HashMap<&str, Vec<&Read>> = HashMap::new();
    for r in &reads {
        by_key.entry(&r.key).or_default().push(r);
    }
    assert_eq!(by_key.len(), PRODUCERS * KEYS_PER_PRODUCER);
    for (k, mut rs) in by_key {
        rs.sort_by_key(|r| (r.epoch, r.offset));
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.seq, i as u64, "key {k}: order broken at {r:?}");
        }
        // One (cluster, partition) per key and epoch.
        let mut homes: HashMap<u64, (String, i32)> = HashMap::new();
        for r in &rs {
            let h = homes
                .entry(r.epoch.unwrap())
                .or_insert((r.cluster.clone(), r.partition));
            assert_eq!(*h, (r.cluster.clone(), r.partition), "key {k} split");
        }
    }
    for p in &producers {
        p.close(Duration::from_secs(5)).await.unwrap();
    }
    let snap = reg.snapshot().await.unwrap();
    assert_eq!(snap.producers().count(), 0, "closed producers deregister");
    drop(kafka);
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_cluster_fails_sends_within_the_message_timeout() {
    const TOPIC: &str = "kill";
    const TIMEOUT_MS: u64 = 3000;
    let etcd = EtcdServer::start().expect("start etcd");
    let mut kafka = tokio::task::spawn_blocking(|| KafkaFleet::start(1).expect("start Kafka"))
        .await
        .unwrap();
    let reg = connect_registry(&etcd.endpoint(), FLEET).await;
    let c = kafka.cluster(0);
    create_topic(&c.bootstrap(), TOPIC, 2).await.unwrap();
    reg.create_cluster(&permanent_cluster("A", c))
        .await
        .unwrap();
    open_route(&reg, TOPIC, 2, &["A"]).await;
    let p = FleetProducer::connect(
        &[etcd.endpoint().as_str()],
        FLEET,
        producer_config("killer", TIMEOUT_MS),
    )
    .await
    .unwrap();
    p.send(
        FutureRecord::to(TOPIC).key("k").payload("ok"),
        Duration::from_secs(5),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();

    kafka.cluster_mut(0).kill();
    let started = Instant::now();
    let sends: Vec<_> = (0..5)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                p.send(
                    FutureRecord::to(TOPIC)
                        .key(&format!("k{i}"))
                        .payload("lost"),
                    Duration::from_secs(1),
                )
                .await
            })
        })
        .collect();
    let limit = Duration::from_millis(TIMEOUT_MS) + Duration::from_secs(5);
    for s in sends {
        let r = tokio::time::timeout(limit, s)
            .await
            .expect("send hung past message.timeout.ms")
            .unwrap();
        match r {
            Ok(d) => panic!("delivered to a dead cluster: {d:?}"),
            Err((FleetSendError::Kafka { cluster, error }, msg)) => {
                assert_eq!(&*cluster, "A");
                assert!(!error.is_permanent(), "{error}");
                assert_eq!(msg.payload(), Some(&b"lost"[..]));
            }
            Err((e, _)) => panic!("unexpected error: {e}"),
        }
    }
    eprintln!("all sends failed after {:?}", started.elapsed());
    assert!(started.elapsed() < limit);
    // Back up: sends succeed again.
    let kafka = tokio::task::spawn_blocking(move || {
        kafka.cluster_mut(0).restart().expect("restart");
        kafka
    })
    .await
    .unwrap();
    let d = p
        .send(
            FutureRecord::to(TOPIC).key("k").payload("again"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("send after restart");
    assert_eq!(&*d.cluster, "A");
    drop(kafka);
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_at_start_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let e = FleetProducer::connect(&[endpoint.as_str()], FLEET, FleetProducerConfig::new())
        .await
        .unwrap_err();
    assert!(matches!(e, FleetProducerError::Registry(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&endpoint), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(30));
    eprintln!("etcd down: {msg}");
}

/// etcd killed mid-run: a `KeepProducing` producer keeps writing on its last
/// snapshot, a `Hold` producer holds (its sends time out with the record
/// given back) and resumes once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keep_producing_vs_hold() {
    const TOPIC: &str = "outage";
    let mut etcd = EtcdServer::start().expect("start etcd");
    let kafka = tokio::task::spawn_blocking(|| KafkaFleet::start(1).expect("start Kafka"))
        .await
        .unwrap();
    let reg = connect_registry(&etcd.endpoint(), FLEET).await;
    let c = kafka.cluster(0);
    create_topic(&c.bootstrap(), TOPIC, 2).await.unwrap();
    reg.create_cluster(&permanent_cluster("A", c))
        .await
        .unwrap();
    open_route(&reg, TOPIC, 2, &["A"]).await;
    let endpoint = etcd.endpoint();
    let keep = FleetProducer::connect(&[endpoint.as_str()], FLEET, producer_config("keep", 10_000))
        .await
        .unwrap();
    let mut cfg = producer_config("hold", 10_000);
    cfg.registry_outage(OutageMode::Hold);
    let hold = FleetProducer::connect(&[endpoint.as_str()], FLEET, cfg)
        .await
        .unwrap();
    for p in [&keep, &hold] {
        p.send(
            FutureRecord::to(TOPIC).key("k").payload("before"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    }

    etcd.kill();
    // Wait until the hold-mode producer notices (watch broken).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = hold
            .send(
                FutureRecord::to(TOPIC).key("k").payload("during"),
                Duration::from_millis(300),
            )
            .await;
        match r {
            Ok(_) => {
                assert!(Instant::now() < deadline, "hold mode never held");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err((FleetSendError::Timeout { .. }, msg)) => {
                assert_eq!(msg.payload(), Some(&b"during"[..]));
                break;
            }
            Err((e, _)) => panic!("unexpected: {e}"),
        }
    }
    // Keep-producing still writes on its last snapshot.
    let d = keep
        .send(
            FutureRecord::to(TOPIC).key("k").payload("during"),
            Duration::from_secs(1),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("KeepProducing writes during the outage");
    assert_eq!((&*d.cluster, d.epoch), ("A", 1));
    // A held record goes out once etcd is back.
    let waiting = hold
        .send_result(FutureRecord::to(TOPIC).key("k").payload("after"))
        .map_err(|(e, _)| e)
        .unwrap();
    let mut etcd = tokio::task::spawn_blocking(move || {
        etcd.restart().expect("restart etcd");
        etcd
    })
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("held record released after etcd came back")
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(&*d.cluster, "A");
    // Both are registered again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = reg
            .snapshot()
            .await
            .map(|s| s.producers().count())
            .unwrap_or(0);
        if n == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} producers registered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    etcd.kill();
}
