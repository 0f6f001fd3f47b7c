//! `FleetConsumer` against the real `FleetProducer`, on real etcd and two real
//! Kafka clusters, with switches A → A+B → B made *while* the producer keeps
//! sending. The switch itself follows the handoff protocol by hand (the
//! controller's part): write epoch N+1 pending, wait until every live producer
//! has acknowledged it, read the end offsets as the fence, seal N and open N+1.
//! A group of two consumers must deliver every record once, in order per key.

#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/switch.rs"]
mod switch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::{connect_registry, open_route, register_clusters, send_seq};
use flotilla_client::consumer::{FleetConsumeError, FleetConsumer, FleetConsumerConfig};
use flotilla_client::kafka::ClusterAdmin;
use flotilla_client::registry::Registry;
use flotilla_client::{FleetProducer, FleetProducerConfig};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::KafkaFleet;
use rdkafka::consumer::CommitMode;
use rdkafka::message::Message;
use switch::{drive_switch, write_set, Producers};

const TOPIC: &str = "live";
const PARTITIONS: u32 = 3;
const KEYS: usize = 30;
const TOTAL: usize = 1500;
const IDS: [&str; 2] = ["a", "b"];

/// The controller's switch, by hand (DESIGN "Handoff protocol" 1-3).
async fn switch(registry: &Registry, admins: &HashMap<String, ClusterAdmin>, next: &[&str]) {
    let (p, poll) = (Producers::AtLeastOne, Duration::from_millis(20));
    drive_switch(
        registry,
        TOPIC,
        PARTITIONS,
        write_set(next),
        admins,
        p,
        poll,
    )
    .await;
}

#[derive(Debug, Clone)]
struct Got {
    key: String,
    seq: usize,
    cluster: String,
    epoch: Option<u64>,
}

fn spawn_member(
    registry: &Registry,
    name: &'static str,
    log: Arc<Mutex<Vec<Got>>>,
) -> tokio::task::JoinHandle<()> {
    let config = FleetConsumerConfig::new(registry.clone())
        .set("group.id", "live")
        .set("session.timeout.ms", "10000")
        .poll_interval(Duration::from_millis(100));
    tokio::spawn(async move {
        let c = FleetConsumer::new(config).await.expect("consumer");
        c.subscribe(&[TOPIC]).unwrap();
        loop {
            let m = match c.recv().await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("{name}: {e}");
                    continue;
                }
            };
            let payload = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
            let (key, seq) = payload.split_once(':').unwrap();
            log.lock().unwrap().push(Got {
                key: key.into(),
                seq: seq.parse().unwrap(),
                cluster: m.cluster().into(),
                epoch: m.epoch(),
            });
            match c.commit_message(&m, CommitMode::Sync) {
                Ok(()) | Err(FleetConsumeError::NotReading { .. }) => {}
                Err(e) => panic!("{name}: commit {payload}: {e}"),
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_switches_with_the_fleet_producer_keep_key_order() {
    let etcd = EtcdServer::start().expect("etcd");
    let fleet = tokio::task::block_in_place(|| KafkaFleet::start(2)).expect("kafka");
    let registry = connect_registry(&etcd.endpoint(), "live").await;
    let admins = register_clusters(
        &registry,
        &fleet,
        &IDS,
        TOPIC,
        PARTITIONS,
        Duration::from_secs(20),
        false,
    )
    .await;
    open_route(&registry, TOPIC, PARTITIONS, &["a"]).await;

    let log = Arc::new(Mutex::new(Vec::new()));
    let m1 = spawn_member(&registry, "m1", log.clone());
    let m2 = spawn_member(&registry, "m2", log.clone());

    let mut pc = FleetProducerConfig::new();
    pc.registry(registry.clone()).set("linger.ms", "1");
    let producer = Arc::new(FleetProducer::new(pc).await.expect("producer"));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (producer, sent) = (producer.clone(), sent.clone());
        tokio::spawn(async move {
            for i in 0..TOTAL {
                send_seq(&producer, TOPIC, KEYS, i).await;
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let wait_sent = |n: usize| {
        let sent = sent.clone();
        async move {
            while sent.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_sent(TOTAL / 3).await;
    switch(&registry, &admins, &["a", "b"]).await;
    wait_sent(2 * TOTAL / 3).await;
    switch(&registry, &admins, &["b"]).await;
    writer.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let distinct: BTreeSet<(String, usize)> = log
            .lock()
            .unwrap()
            .iter()
            .map(|g| (g.key.clone(), g.seq))
            .collect();
        if distinct.len() == TOTAL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {TOTAL} records delivered",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = log.lock().unwrap().clone();
    let mut last: BTreeMap<&str, usize> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut dups = 0;
    let mut bad = Vec::new();
    for g in &log {
        if !seen.insert((&g.key, g.seq)) {
            dups += 1;
            continue;
        }
        let expect = last.get(g.key.as_str()).map_or(0, |s| s + 1);
        if g.seq != expect {
            bad.push(format!(
                "{}:{} (epoch {:?} from {}) expected seq {expect}",
                g.key, g.seq, g.epoch, g.cluster
            ));
        }
        last.insert(&g.key, g.seq);
    }
    let mut per_epoch: BTreeMap<(Option<u64>, String), usize> = BTreeMap::new();
    for g in &log {
        *per_epoch.entry((g.epoch, g.cluster.clone())).or_default() += 1;
    }
    eprintln!(
        "{} deliveries, {dups} duplicates; per (epoch, cluster): {per_epoch:?}",
        log.len()
    );
    assert!(
        bad.is_empty(),
        "per-key order broken: {:?}",
        &bad[..bad.len().min(10)]
    );
    assert_eq!(dups, 0);
    assert!(per_epoch.keys().any(|(e, _)| *e == Some(3)), "epoch 3 used");
    m1.abort();
    m2.abort();
    drop(producer);
    drop(fleet);
    drop(etcd);
}
