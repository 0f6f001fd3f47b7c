//! `FleetConsumer` on real etcd and three real Kafka clusters: route switches
//! A → A+B → B → B+C → C done by hand (producers with epoch headers, fences from the
//! real end offsets), a consumer group of two members (one joining after a
//! switch), a group started after every switch, etcd down for a while, a
//! cluster killed and restarted under the consumers, and another one down while
//! the rest of its epoch keeps flowing. Every record is delivered, per-key order
//! holds across every switch, and duplicates are counted.

#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/switch.rs"]
mod switch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::{connect_registry, open_route, permanent_cluster};
use flotilla_client::consumer::{
    FleetConsumeError, FleetConsumer, FleetConsumerConfig, EPOCH_HEADER,
};
use flotilla_client::kafka::{ClusterAdmin, KafkaProperties, SecurityProfiles};
use flotilla_client::registry::{Epoch, EpochState, Expect, Registry, TopicRoute};
use flotilla_client::route::murmur2::partition_for_key;
use flotilla_client::route::rendezvous::RendezvousTable;
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::{create_topic, KafkaFleet};
use rdkafka::consumer::CommitMode;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use switch::write_set;
use tokio::task::JoinHandle;

const TOPIC: &str = "fenced";
const PARTITIONS: u32 = 4;
const KEYS: usize = 40;
const IDS: [&str; 3] = ["a", "b", "c"];

/// One delivered record as the application saw it.
#[derive(Debug, Clone)]
struct Got {
    key: String,
    seq: u64,
    cluster: String,
    epoch: Option<u64>,
    member: String,
}

struct World {
    registry: Registry,
    /// The route as last written (production keeps working while etcd is down).
    route: Option<(TopicRoute, i64)>,
    admins: Vec<ClusterAdmin>,
    producers: Vec<FutureProducer>,
    next_seq: BTreeMap<String, u64>,
    produced: usize,
}

fn idx(id: &str) -> usize {
    IDS.iter().position(|c| *c == id).unwrap()
}

impl World {
    async fn route(&mut self) -> (TopicRoute, i64) {
        if self.route.is_none() {
            self.route = Some(self.registry.route(TOPIC).await.unwrap().unwrap());
        }
        self.route.clone().unwrap()
    }

    /// Produces `n` records (keys round robin, sequence numbers per key) the
    /// way `FleetProducer` would in the open epoch: rendezvous cluster,
    /// murmur2 partition, epoch header. Waits for every acknowledgement.
    async fn produce(&mut self, n: usize) {
        self.produce_to(n, None).await
    }

    /// [`World::produce`], only for keys the open epoch routes to `only`.
    async fn produce_to(&mut self, n: usize, only: Option<&str>) {
        let (route, _) = self.route().await;
        let open = route.open_epoch().unwrap().clone();
        let table = RendezvousTable::new(&open.write).unwrap();
        let mut pending = Vec::new();
        let mut made = 0;
        while made < n {
            let key = format!("k{}", self.produced % KEYS);
            self.produced += 1;
            if only.is_some_and(|c| &**table.cluster_for_key(key.as_bytes()) != c) {
                continue;
            }
            made += 1;
            let seq = self.next_seq.entry(key.clone()).or_insert(0);
            let payload = format!("{key}:{seq}");
            *seq += 1;
            let cluster = table.cluster_for_key(key.as_bytes()).to_string();
            let partition = partition_for_key(key.as_bytes(), PARTITIONS) as i32;
            let epoch = open.n.to_string();
            let record = FutureRecord::to(TOPIC)
                .key(&key)
                .payload(&payload)
                .partition(partition)
                .headers(OwnedHeaders::new().insert(Header {
                    key: EPOCH_HEADER,
                    value: Some(epoch.as_str()),
                }));
            let fut = self.producers[idx(&cluster)]
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("enqueue");
            pending.push((payload, fut));
        }
        for (payload, fut) in pending {
            fut.await
                .expect("delivery future")
                .map_err(|(e, _)| e)
                .unwrap_or_else(|e| panic!("{payload} not delivered: {e}"));
        }
    }

    /// Seals the open epoch with the real end offsets of every partition on
    /// every cluster of it and of the next one (the boundary), and opens
    /// `next` — the controller's step 3, by hand.
    async fn switch(&mut self, next: &[&str]) {
        let (mut route, rev) = self.route().await;
        let open_i = route
            .epochs
            .iter()
            .position(|e| e.state == EpochState::Open)
            .unwrap();
        let mut fence = BTreeMap::new();
        let clusters: BTreeSet<String> = route.epochs[open_i]
            .clusters()
            .cloned()
            .chain(next.iter().map(|c| c.to_string()))
            .collect();
        for c in clusters {
            let ends = self.admins[idx(&c)]
                .end_offsets(TOPIC, PARTITIONS)
                .await
                .unwrap();
            fence.insert(c, ends);
        }
        let n = route.last_epoch_n() + 1;
        route.epochs[open_i].state = EpochState::Sealed;
        route.epochs[open_i].fence = fence;
        route.epochs.push(Epoch {
            n,
            write: write_set(next),
            state: EpochState::Open,
            fence: BTreeMap::new(),
            created_at: 0,
            ack_deadline: None,
        });
        let rev = self
            .registry
            .put_route(&route, Expect::ModRevision(rev))
            .await
            .unwrap();
        self.route = Some((route, rev));
    }
}

fn member_config(registry: &Registry, group: &str) -> FleetConsumerConfig {
    FleetConsumerConfig::new(registry.clone())
        .set("group.id", group)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .poll_interval(Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(5))
}

/// A group member: receive, record, commit synchronously (retrying a few
/// seconds while the cluster is down), forever.
fn spawn_member(
    registry: &Registry,
    group: &str,
    name: &str,
    log: Arc<Mutex<Vec<Got>>>,
) -> JoinHandle<()> {
    let config = member_config(registry, group);
    let name = name.to_string();
    tokio::spawn(async move {
        let c = FleetConsumer::new(config).await.expect("start consumer");
        c.subscribe(&[TOPIC]).unwrap();
        loop {
            let m = match c.recv().await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("{name}: recv error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let payload = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
            let (key, seq) = payload.split_once(':').unwrap();
            log.lock().unwrap().push(Got {
                key: key.to_string(),
                seq: seq.parse().unwrap(),
                cluster: m.cluster().to_string(),
                epoch: m.epoch(),
                member: name.clone(),
            });
            let started = Instant::now();
            while let Err(e) = c.commit_message(&m, CommitMode::Sync) {
                if let FleetConsumeError::NotReading { .. } = e {
                    // The cluster left the read set: the group is past it.
                    break;
                }
                if let FleetConsumeError::CommitPending { .. } = e {
                    // The cluster does not answer: its committer keeps
                    // committing this offset in the background; read on.
                    break;
                }
                if started.elapsed() > Duration::from_secs(5) {
                    // E.g. the member lost its group membership while the
                    // cluster was down: keep polling (which rejoins); the
                    // record comes again (at least once), counted as a duplicate.
                    eprintln!(
                        "{name}: giving up committing {payload} from {}: {e}",
                        m.cluster()
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    })
}

/// Waits until `log` holds every sequence number of every key in `expected`.
async fn wait_all(what: &str, log: &Arc<Mutex<Vec<Got>>>, expected: &BTreeMap<String, u64>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let missing: usize = {
            let log = log.lock().unwrap();
            let mut seen: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
            for g in log.iter() {
                seen.entry(&g.key).or_default().insert(g.seq);
            }
            expected
                .iter()
                .map(|(k, n)| *n as usize - seen.get(k.as_str()).map_or(0, |s| s.len()))
                .sum()
        };
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {missing} records never delivered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks per-key order and counts duplicates; returns the duplicate count.
fn check(what: &str, log: &[Got], expected: &BTreeMap<String, u64>) -> usize {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seen: BTreeSet<(&str, u64)> = BTreeSet::new();
    let mut dups = 0;
    let mut problems = Vec::new();
    for g in log {
        if !seen.insert((&g.key, g.seq)) {
            dups += 1;
            continue;
        }
        if let Some(&prev) = last.get(g.key.as_str()) {
            if g.seq != prev + 1 {
                problems.push(format!(
                    "{}:{} (epoch {:?} from {} via {}) after seq {prev}",
                    g.key, g.seq, g.epoch, g.cluster, g.member
                ));
            }
        } else if g.seq != 0 {
            problems.push(format!("{}:{} first for its key", g.key, g.seq));
        }
        last.insert(&g.key, g.seq);
    }
    for (k, n) in expected {
        assert_eq!(
            last.get(k.as_str()).map(|s| s + 1),
            Some(*n),
            "{what}: key {k} incomplete"
        );
    }
    assert!(
        problems.is_empty(),
        "{what}: per-key order broken ({} cases), first: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    dups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_reads_every_record_in_key_order_across_switches_and_a_cluster_restart() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let mut fleet = tokio::task::block_in_place(|| KafkaFleet::start(3)).expect("start kafka");
    for i in 0..3 {
        create_topic(&fleet.cluster(i).bootstrap(), TOPIC, PARTITIONS as i32)
            .await
            .expect("create topic");
    }
    let registry = connect_registry(&etcd.endpoint(), "consumer-fence").await;
    let mut admins = Vec::new();
    let mut producers = Vec::new();
    for (i, id) in IDS.iter().enumerate() {
        let s = permanent_cluster(id, fleet.cluster(i));
        registry.create_cluster(&s).await.unwrap();
        admins.push(
            ClusterAdmin::connect(
                &s,
                &KafkaProperties::new(),
                &SecurityProfiles::empty(),
                Duration::from_secs(20),
            )
            .await
            .unwrap(),
        );
        producers.push(
            ClientConfig::new()
                .set("bootstrap.servers", fleet.cluster(i).bootstrap())
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .set("message.timeout.ms", "60000")
                .create::<FutureProducer>()
                .unwrap(),
        );
    }
    open_route(&registry, TOPIC, PARTITIONS, &["a"]).await;
    let mut w = World {
        registry: registry.clone(),
        route: None,
        admins,
        producers,
        next_seq: BTreeMap::new(),
        produced: 0,
    };

    let log = Arc::new(Mutex::new(Vec::new()));
    let m1 = spawn_member(&registry, "g", "m1", log.clone());

    // Epoch 1 on a.
    w.produce(400).await;
    // Epoch 2 on a + b, while m1 is still reading epoch 1.
    w.switch(&["a", "b"]).await;
    w.produce(400).await;
    // Epoch 3 on b only.
    w.switch(&["b"]).await;
    w.produce(400).await;
    // A second member joins after the switches.
    let m2 = spawn_member(&registry, "g", "m2", log.clone());
    w.produce(200).await;
    wait_all("group g before the restart", &log, &w.next_seq).await;

    // The registry goes away: the consumers keep reading on their last snapshot.
    etcd.kill();
    w.produce(200).await;
    wait_all("group g with etcd down", &log, &w.next_seq).await;
    tokio::task::block_in_place(|| etcd.restart()).expect("restart etcd");

    let before_kill = log.lock().unwrap().len();
    // b dies under the consumers and comes back with everything.
    w.produce(200).await;
    fleet.cluster_mut(1).kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| fleet.cluster_mut(1).restart()).expect("restart b");
    w.produce(200).await;
    // Epoch 4 on b + c; then c dies: b keeps flowing; c comes back whole.
    w.switch(&["b", "c"]).await;
    w.produce(200).await;
    wait_all("group g on b + c", &log, &w.next_seq).await;
    fleet.cluster_mut(2).kill();
    w.produce_to(100, Some("b")).await;
    wait_all("group g on b while c is down", &log, &w.next_seq).await;
    tokio::task::block_in_place(|| fleet.cluster_mut(2).restart()).expect("restart c");
    w.produce(200).await;
    // Epoch 5 on c alone.
    w.switch(&["c"]).await;
    w.produce(400).await;
    wait_all("group g", &log, &w.next_seq).await;

    // A group that starts after every switch still reads the sealed epochs first.
    let late_log = Arc::new(Mutex::new(Vec::new()));
    let late = spawn_member(&registry, "late", "late", late_log.clone());
    wait_all("group late", &late_log, &w.next_seq).await;

    let total: u64 = w.next_seq.values().sum();
    let log = log.lock().unwrap().clone();
    let late_log = late_log.lock().unwrap().clone();
    let dups = check("group g", &log, &w.next_seq);
    // Before the kill, nothing crashed: exactly once. Afterwards a commit
    // that failed while b was down can be redelivered after the restart's
    // rebalance (at least once): counted, and order still holds.
    let mut seen = BTreeSet::new();
    let dups_before_kill = log[..before_kill]
        .iter()
        .filter(|g| !seen.insert((g.key.clone(), g.seq)))
        .count();
    let late_dups = check("group late", &late_log, &w.next_seq);
    let per_cluster = |l: &[Got]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for g in l {
            *m.entry(g.cluster.clone()).or_default() += 1;
        }
        m
    };
    let per_member = |l: &[Got]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for g in l {
            *m.entry(g.member.clone()).or_default() += 1;
        }
        m
    };
    eprintln!(
        "produced {total}; group g: {} deliveries, {dups} duplicates ({dups_before_kill} before the kill), per cluster {:?}, per member {:?}; \
         late: {} deliveries, {late_dups} duplicates, per cluster {:?}",
        log.len(),
        per_cluster(&log),
        per_member(&log),
        late_log.len(),
        per_cluster(&late_log)
    );
    assert_eq!(
        late_dups, 0,
        "a single member without crashes delivers once"
    );
    assert_eq!(
        dups_before_kill, 0,
        "commit-after-process without a crash delivers once"
    );
    for h in [m1, m2, late] {
        h.abort();
    }
    drop(fleet);
    drop(etcd);
}
