//! Quick tests of the fleet consumer on librdkafka mock clusters and the
//! in-memory registry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::CommitMode;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use super::*;
use crate::kafka::MockFleet;
use crate::registry::memory::MemoryKv;
use crate::registry::{
    Epoch, EpochState, Expect, Registry, TopicRoute, WatcherOptions, WeightedCluster,
    SCHEMA_VERSION,
};

const TOPIC: &str = "orders";

fn epoch(n: u64, write: &[&str], state: EpochState, fence: &[(&str, Vec<i64>)]) -> Epoch {
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
        fence: fence
            .iter()
            .map(|(c, o)| (c.to_string(), o.clone()))
            .collect(),
        created_at: 0,
        ack_deadline: None,
    }
}

struct Env {
    fleet: Option<MockFleet>,
    kv: Arc<MemoryKv>,
    registry: Registry,
}

impl Env {
    async fn start(partitions: u32, epochs: Vec<Epoch>) -> Env {
        let fleet = tokio::task::spawn_blocking(|| MockFleet::start(2))
            .await
            .unwrap()
            .unwrap();
        fleet.create_topic(TOPIC, partitions).unwrap();
        let kv = Arc::new(MemoryKv::new());
        let registry = Registry::new(kv.clone(), "test");
        for (i, id) in ["a", "b"].iter().enumerate() {
            registry
                .create_cluster(&fleet.cluster(i).cluster_spec(id))
                .await
                .unwrap();
        }
        let route = TopicRoute {
            version: SCHEMA_VERSION,
            topic: TOPIC.into(),
            partitions,
            epochs,
        };
        registry.put_route(&route, Expect::Absent).await.unwrap();
        Env {
            fleet: Some(fleet),
            kv,
            registry,
        }
    }

    /// Seals epoch 1 (cluster a) with the boundaries `fence_a` on a and
    /// `fence_b` on b and opens epoch 2 (cluster b), as the controller's seal
    /// would.
    async fn seal_a_open_b(&self, partitions: u32, fence_a: Vec<i64>, fence_b: Vec<i64>) {
        let route = TopicRoute {
            version: SCHEMA_VERSION,
            topic: TOPIC.into(),
            partitions,
            epochs: vec![
                epoch(
                    1,
                    &["a"],
                    EpochState::Sealed,
                    &[("a", fence_a), ("b", fence_b)],
                ),
                epoch(2, &["b"], EpochState::Open, &[]),
            ],
        };
        let (_, rev) = self.registry.route(TOPIC).await.unwrap().unwrap();
        self.registry
            .put_route(&route, Expect::ModRevision(rev))
            .await
            .unwrap();
    }

    /// Replaces the route's epochs with `epochs` (e.g. a pending epoch
    /// proposed, or aborted), as the controller or an operator would.
    async fn put_epochs(&self, partitions: u32, epochs: Vec<Epoch>) {
        let route = TopicRoute {
            version: SCHEMA_VERSION,
            topic: TOPIC.into(),
            partitions,
            epochs,
        };
        let (_, rev) = self.registry.route(TOPIC).await.unwrap().unwrap();
        self.registry
            .put_route(&route, Expect::ModRevision(rev))
            .await
            .unwrap();
    }

    /// Produces one record `payload` to `partition` of cluster `i`, with
    /// the epoch header `epoch` (none: a producer outside the route, e.g. a
    /// plain Kafka producer); returns its offset.
    async fn produce_one(
        &self,
        i: usize,
        partition: i32,
        payload: &str,
        epoch: Option<u64>,
    ) -> i64 {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap(i))
            .create()
            .unwrap();
        let e = epoch.map(|e| e.to_string());
        let mut record = FutureRecord::to(TOPIC)
            .key(payload)
            .payload(payload)
            .partition(partition);
        if let Some(e) = &e {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: EPOCH_HEADER,
                value: Some(e.as_str()),
            }));
        }
        let d = p
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        d.offset
    }

    fn bootstrap(&self, i: usize) -> String {
        self.fleet
            .as_ref()
            .unwrap()
            .cluster(i)
            .bootstrap()
            .to_string()
    }

    /// Produces `n` records `<cluster>-<i>` with epoch header `epoch` to
    /// partition `i % partitions`; returns the end offset per partition.
    async fn produce(&self, i: usize, n: usize, partitions: u32, epoch: u64) -> Vec<i64> {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap(i))
            .create()
            .unwrap();
        let mut ends = vec![0i64; partitions as usize];
        for k in 0..n {
            let part = (k % partitions as usize) as i32;
            let payload = format!("{i}-{k}");
            let e = epoch.to_string();
            let d = p
                .send(
                    FutureRecord::to(TOPIC)
                        .key(&payload)
                        .payload(&payload)
                        .partition(part)
                        .headers(OwnedHeaders::new().insert(Header {
                            key: EPOCH_HEADER,
                            value: Some(e.as_str()),
                        })),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            ends[d.partition as usize] = ends[d.partition as usize].max(d.offset + 1);
        }
        ends
    }

    fn config(&self, group: &str) -> FleetConsumerConfig {
        FleetConsumerConfig::new(self.registry.clone())
            .set("group.id", group)
            .set("session.timeout.ms", "6000")
            .poll_interval(Duration::from_millis(100))
            .watcher_options(WatcherOptions::default())
    }

    async fn shutdown(mut self) {
        let f = self.fleet.take().unwrap();
        tokio::task::spawn_blocking(move || drop(f)).await.unwrap();
    }
}

async fn recv_for(c: &FleetConsumer, d: Duration) -> Option<FleetMessage> {
    match tokio::time::timeout(d, c.recv()).await {
        Ok(r) => Some(r.unwrap()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_both_clusters_of_an_open_epoch_with_cluster_tags() {
    let env = Env::start(2, vec![epoch(1, &["a", "b"], EpochState::Open, &[])]).await;
    env.produce(0, 10, 2, 1).await;
    env.produce(1, 7, 2, 1).await;
    let seen_rebalance = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = seen_rebalance.clone();
    let c = FleetConsumer::new(env.config("g1").on_rebalance(move |e| {
        if matches!(e.kind, RebalanceKind::Assign(_)) && e.phase == RebalancePhase::After {
            s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }))
    .await
    .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let mut got: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.values().map(BTreeSet::len).sum::<usize>() < 17 {
        assert!(Instant::now() < deadline, "timed out; got {got:?}");
        let Some(m) = recv_for(&c, Duration::from_secs(1)).await else {
            continue;
        };
        let payload = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
        let expect = if m.cluster() == "a" { "0-" } else { "1-" };
        assert!(
            payload.starts_with(expect),
            "{payload} from {}",
            m.cluster()
        );
        assert_eq!(m.epoch(), Some(1));
        assert!(!m.is_straggler());
        c.commit_message(&m, CommitMode::Sync).unwrap();
        assert!(got
            .entry(m.cluster().to_string())
            .or_default()
            .insert(payload));
    }
    assert_eq!(got["a"].len(), 10);
    assert_eq!(got["b"].len(), 7);
    assert_eq!(
        c.read_set(TOPIC),
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );
    let assignment = c.assignment().unwrap();
    assert_eq!(assignment.len(), 2);
    assert_eq!(assignment["a"].count() + assignment["b"].count(), 4);
    assert!(seen_rebalance.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    // Registered as a lease-bound client, and the group with its topic.
    let snap = env.registry.snapshot().await.unwrap();
    assert!(snap.groups["g1"].topics.contains(&TOPIC.to_string()));
    assert!(snap
        .clients
        .values()
        .any(|r| r.group.as_deref() == Some("g1")));
    // It publishes the epoch it reads with.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = env.registry.snapshot().await.unwrap();
        let rec = snap
            .clients
            .values()
            .find(|r| r.id == c.client_id())
            .unwrap();
        if rec.acked.get(TOPIC) == Some(&1) {
            break;
        }
        assert!(Instant::now() < deadline, "acked never published: {rec:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_epoch_gates_the_next_cluster_until_committed_to_the_fence() {
    // Epoch 1 on a (sealed, fence written by hand below), epoch 2 open on b.
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    let fence_a = env.produce(0, 8, parts, 1).await;
    let fence_b = vec![0i64; parts as usize];
    env.seal_a_open_b(parts, fence_a.clone(), fence_b).await;
    env.produce(1, 6, parts, 2).await;

    let c = FleetConsumer::new(env.config("g2")).await.unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    // Consume without committing: only a's records may come, b's wait.
    let mut held: Vec<FleetMessage> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.len() < 8 {
        assert!(
            Instant::now() < deadline,
            "timed out with {} records",
            held.len()
        );
        if let Some(m) = recv_for(&c, Duration::from_secs(1)).await {
            assert_eq!(m.cluster(), "a", "b delivered before a reached its fence");
            held.push(m);
        }
    }
    // Nothing more while a is uncommitted (b is gated above its boundary 0).
    let extra = recv_for(&c, Duration::from_secs(3)).await;
    assert!(extra.is_none(), "b delivered early: {extra:?}");
    assert!(c.held_back() > 0, "b's records should be parked");
    assert_eq!(c.read_set(TOPIC).len(), 2);
    // Commit a's partition 0 only: b/0 flows, b/1 still waits.
    for m in held.iter().filter(|m| m.partition() == 0) {
        c.commit_message(m, CommitMode::Sync).unwrap();
    }
    let mut from_b = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while from_b.len() < 3 {
        assert!(Instant::now() < deadline, "b/0 not released: {from_b:?}");
        if let Some(m) = recv_for(&c, Duration::from_secs(1)).await {
            assert_eq!((m.cluster(), m.partition()), ("b", 0), "only b/0 may flow");
            assert_eq!(m.epoch(), Some(2));
            from_b.push(m);
        }
    }
    assert!(recv_for(&c, Duration::from_secs(2)).await.is_none());
    for m in held.iter().filter(|m| m.partition() == 1) {
        c.commit_message(m, CommitMode::Sync).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while from_b.len() < 6 {
        assert!(Instant::now() < deadline, "b/1 not released");
        if let Some(m) = recv_for(&c, Duration::from_secs(1)).await {
            assert_eq!((m.cluster(), m.partition()), ("b", 1));
            from_b.push(m);
        }
    }
    for m in &from_b {
        c.commit_message(m, CommitMode::Sync).unwrap();
    }
    // a is consumed past its fence, but stays in the read set until it is
    // retired: a producer the controller did not wait for still writes epoch 1
    // to a, above its fence. Those stragglers are delivered, not lost.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.read_set(TOPIC).len(), 2, "a left before it was retired");
    env.produce(0, 4, parts, 1).await;
    let stragglers = recv_n(&c, 4, Duration::from_secs(30)).await;
    assert!(
        stragglers
            .iter()
            .all(|m| m.cluster() == "a" && m.epoch() == Some(1) && m.is_straggler()),
        "{stragglers:?}"
    );
    env.registry
        .set_cluster_state("a", crate::registry::ClusterState::Retired)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.read_set(TOPIC).len() != 1 {
        assert!(
            Instant::now() < deadline,
            "a never left the read set once retired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.read_set(TOPIC), BTreeSet::from(["b".to_string()]));
    c.close().await;
    env.shutdown().await;
}

/// Receives `n` records within `d`; panics otherwise.
async fn recv_n(c: &FleetConsumer, n: usize, d: Duration) -> Vec<FleetMessage> {
    let deadline = Instant::now() + d;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records within {d:?}",
            out.len()
        );
        if let Some(m) = recv_for(c, Duration::from_millis(500)).await {
            c.commit_message(&m, CommitMode::Sync).unwrap();
            out.push(m);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_down_and_the_registry_down_do_not_stop_the_others() {
    let env = Env::start(2, vec![epoch(1, &["a", "b"], EpochState::Open, &[])]).await;
    env.produce(0, 4, 2, 1).await;
    env.produce(1, 4, 2, 1).await;
    let c = FleetConsumer::new(env.config("g3")).await.unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    recv_n(&c, 8, Duration::from_secs(30)).await;

    // b's only broker dies and the registry becomes unreachable.
    let fleet = env.fleet.as_ref().unwrap();
    fleet.cluster(1).broker_down(1).unwrap();
    env.kv.set_unavailable(true);
    env.produce(0, 6, 2, 1).await;
    let got = recv_n(&c, 6, Duration::from_secs(30)).await;
    assert!(got.iter().all(|m| m.cluster() == "a"));
    assert_eq!(c.read_set(TOPIC).len(), 2, "last snapshot kept");

    // b comes back: nothing skipped.
    fleet.cluster(1).broker_up(1).unwrap();
    env.kv.set_unavailable(false);
    env.produce(1, 3, 2, 1).await;
    let got = recv_n(&c, 3, Duration::from_secs(60)).await;
    assert!(got.iter().all(|m| m.cluster() == "b"));
    c.close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stragglers_above_a_fence_are_delivered_and_counted() {
    // Epoch 1 on a sealed at its current end; a zombie producer then writes
    // two more epoch-1 records to a.
    let parts = 1;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    let fence_a = env.produce(0, 3, parts, 1).await;
    env.seal_a_open_b(parts, fence_a, vec![0]).await;
    env.produce(0, 2, parts, 1).await;
    env.produce(1, 2, parts, 2).await;
    let c = FleetConsumer::new(env.config("g4")).await.unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let got = recv_n(&c, 7, Duration::from_secs(30)).await;
    let stragglers: Vec<_> = got.iter().filter(|m| m.is_straggler()).collect();
    assert_eq!(stragglers.len(), 2, "{got:?}");
    assert!(stragglers
        .iter()
        .all(|m| m.cluster() == "a" && m.epoch() == Some(1) && m.offset() >= 3));
    assert_eq!(c.stragglers(), 2);
    // b's records still came only after a's fence was committed.
    let first_b = got.iter().position(|m| m.cluster() == "b").unwrap();
    assert!(got[..first_b].iter().filter(|m| m.cluster() == "a").count() >= 3);
    c.close().await;
    env.shutdown().await;
}

/// A consumer of `group` that auto-commits every minute, longer than a test
/// waits: only the consumer's own immediate commits land in time.
async fn minute_auto_commit_consumer(env: &Env, group: &str) -> FleetConsumer {
    FleetConsumer::new(
        env.config(group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "60000"),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_commit_a_member_reaching_a_fence_commits_it_at_once() {
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    let fence_a = env.produce(0, 6, parts, 1).await;
    env.seal_a_open_b(parts, fence_a, vec![0, 0]).await;
    env.produce(1, 4, parts, 2).await;
    // Only the commit at the fence lets b through in time.
    let c = minute_auto_commit_consumer(&env, "g5").await;
    c.subscribe(&[TOPIC]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < 10 {
        assert!(
            Instant::now() < deadline,
            "only {} of 10 without manual commits",
            got.len()
        );
        if let Some(m) = recv_for(&c, Duration::from_millis(500)).await {
            got.push((m.cluster().to_string(), m.partition()));
        }
    }
    assert_eq!(got.iter().filter(|(c, _)| c == "b").count(), 4);
    c.close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_commit_a_member_past_a_fence_when_it_is_sealed_commits_at_once() {
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    let fence_a = env.produce(0, 6, parts, 1).await;
    let c = minute_auto_commit_consumer(&env, "g-past-fence").await;
    c.subscribe(&[TOPIC]).unwrap();
    // Every record of a delivered while epoch 1 is still open: no delivery
    // can complete a fence, there is none yet.
    drop(recv_n_uncommitted(&c, 6, Duration::from_secs(30)).await);
    env.seal_a_open_b(parts, fence_a.clone(), vec![0, 0]).await;
    env.produce(1, 4, parts, 2).await;
    // b's records wait for a committed up to its fence: only a commit made
    // when the seal arrives lets them through within the minute.
    let got = recv_n_uncommitted(&c, 4, Duration::from_secs(30)).await;
    assert!(got.iter().all(|m| m.cluster() == "b"));
    for (p, end) in fence_a.iter().enumerate() {
        assert_eq!(
            c.gate_committed("a", TOPIC, p as u32),
            Some(*end),
            "a/{p} not committed up to its fence"
        );
    }
    c.close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_cluster_counts_as_consumed_up_to_its_fence() {
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    let fence_a = env.produce(0, 4, parts, 1).await;
    env.seal_a_open_b(parts, fence_a, vec![0, 0]).await;
    env.registry
        .set_cluster_state("a", crate::registry::ClusterState::Retired)
        .await
        .unwrap();
    env.produce(1, 4, parts, 2).await;
    // A group that never read a: a is gone, b must not wait for it.
    let c = FleetConsumer::new(env.config("g6")).await.unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let got = recv_n(&c, 4, Duration::from_secs(30)).await;
    assert!(got.iter().all(|m| m.cluster() == "b"));
    assert_eq!(c.read_set(TOPIC), BTreeSet::from(["b".to_string()]));
    c.close().await;
    env.shutdown().await;
}

/// Waits (at most 20 s) until nothing holds the consumer `weak` points to
/// any more: it was closed and destroyed.
async fn wait_released<T>(weak: &std::sync::Weak<T>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while weak.strong_count() > 0 {
        assert!(Instant::now() < deadline, "{what}: consumer never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_past_their_clusters_removal_and_the_close_stay_readable() {
    let parts = 1;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    let fence_a = env.produce(0, 3, parts, 1).await;
    let c = FleetConsumer::new(env.config("g-held")).await.unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    // Records of a, read without copying (not committed, not dropped).
    let held_a = recv_n(&c, 3, Duration::from_secs(30)).await;
    assert!(held_a.iter().all(|m| m.cluster() == "a"));
    let (client_a, borrowed) = held_a[0].client_for_test();
    assert!(borrowed, "not read without copying");
    // A clone is a copy, and holds the consumer too; `detach` does not.
    let clone = held_a[1].clone();
    assert!(!clone.client_for_test().1);
    assert_eq!(clone.payload(), Some(&b"0-1"[..]));
    assert_eq!(clone.offset(), 1);
    let copy = held_a[1].detach();

    // a is sealed and retired: it leaves the read set and its consumer is
    // closed by the fleet consumer while the application still holds its
    // records.
    env.seal_a_open_b(parts, fence_a, vec![0]).await;
    env.registry
        .set_cluster_state("a", crate::registry::ClusterState::Retired)
        .await
        .unwrap();
    env.produce(1, 2, parts, 2).await;
    let from_b = recv_n(&c, 2, Duration::from_secs(30)).await;
    assert!(from_b.iter().all(|m| m.cluster() == "b"), "{from_b:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.clusters().contains(&"a".to_string()) {
        assert!(Instant::now() < deadline, "a was never closed once retired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.read_set(TOPIC), BTreeSet::from(["b".to_string()]));
    // The records of a are still whole, and keep a's consumer alive.
    for (k, m) in held_a.iter().enumerate() {
        assert_eq!(m.payload(), Some(format!("0-{k}").as_bytes()));
        assert_eq!(m.key(), Some(format!("0-{k}").as_bytes()));
        assert_eq!((m.topic(), m.partition(), m.offset()), (TOPIC, 0, k as i64));
        assert_eq!(m.epoch(), Some(1));
        assert_eq!(m.headers().and_then(epoch_of), Some(1));
        let owned = m.detach();
        assert_eq!(owned.payload(), m.payload());
        assert_eq!(owned.headers().and_then(epoch_of), Some(1));
    }
    assert!(
        client_a.strong_count() > 0,
        "a's consumer was destroyed while its records are held"
    );
    // The last record dropped releases (closes and destroys) a's consumer;
    // a detached copy does not hold it.
    drop(held_a);
    assert!(client_a.strong_count() > 0, "the clone holds a's consumer");
    assert_eq!(clone.epoch(), Some(1));
    drop(clone);
    wait_released(&client_a, "a").await;
    assert_eq!(copy.payload(), Some(&b"0-1"[..]));

    // The same across `close`: b's records outlive the fleet consumer.
    let (client_b, borrowed) = from_b[0].client_for_test();
    assert!(borrowed, "not read without copying");
    c.close().await;
    assert_eq!(from_b[0].payload(), Some(&b"1-0"[..]));
    assert_eq!(from_b[1].payload(), Some(&b"1-1"[..]));
    assert!(client_b.strong_count() > 0);
    drop(from_b);
    wait_released(&client_b, "b").await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_a_dead_cluster_is_pending_not_blocking_and_lands_when_it_is_back() {
    let env = Env::start(2, vec![epoch(1, &["a", "b"], EpochState::Open, &[])]).await;
    env.produce(0, 4, 2, 1).await;
    env.produce(1, 4, 2, 1).await;
    let c = FleetConsumer::new(
        env.config("g-pending")
            // Longer than the outage: the member keeps its partitions of b,
            // so the queued commit is not dropped by a revoke.
            .set("session.timeout.ms", "30000")
            .commit_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    // Every record, committing all but the last one of b.
    let mut held = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while n < 8 {
        assert!(Instant::now() < deadline, "only {n} of 8 records");
        let Some(m) = recv_for(&c, Duration::from_millis(500)).await else {
            continue;
        };
        n += 1;
        if m.cluster() == "b" {
            if let Some(prev) = held.replace(m) {
                c.commit_message(&prev, CommitMode::Sync).unwrap();
            }
        } else {
            c.commit_message(&m, CommitMode::Sync).unwrap();
        }
    }
    let held = held.expect("a record of b");
    let next = held.offset() + 1;
    let p = held.partition() as u32;

    // b's only broker dies: committing its record returns within the commit
    // timeout, typed and naming b; the next attempt returns at once.
    let fleet = env.fleet.as_ref().unwrap();
    fleet.cluster(1).broker_down(1).unwrap();
    let started = Instant::now();
    match c.commit_message(&held, CommitMode::Sync) {
        Err(FleetConsumeError::CommitPending { cluster, .. }) => assert_eq!(cluster, "b"),
        other => panic!("expected CommitPending on b, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a commit on a dead cluster took {:?}",
        started.elapsed()
    );
    let again = Instant::now();
    let second = c.commit_message(&held, CommitMode::Sync);
    assert!(
        matches!(second, Err(FleetConsumeError::CommitPending { .. })),
        "second commit on b while it is down: {second:?}"
    );
    assert!(
        again.elapsed() < Duration::from_millis(500),
        "a second commit on a cluster known to be down took {:?}",
        again.elapsed()
    );
    assert!(c.pending_commits().contains_key("b"));

    // a keeps flowing meanwhile, its commits confirmed.
    env.produce(0, 4, 2, 1).await;
    let got = recv_n(&c, 4, Duration::from_secs(30)).await;
    assert!(got.iter().all(|m| m.cluster() == "a"));

    // b comes back: the queued commit lands without another call.
    fleet.cluster(1).broker_up(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.gate_committed("b", TOPIC, p).is_none_or(|o| o < next)
        || !c.pending_commits().is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the queued commit of b/{p} at {next} never landed: gate {:?}, pending {:?}",
            c.gate_committed("b", TOPIC, p),
            c.pending_commits()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.close().await;
    env.shutdown().await;
}

/// The offsets group `group` has committed on cluster `i`, read by an
/// independent client (not a member).
async fn group_committed(env: &Env, i: usize, group: &str, parts: u32) -> Vec<Option<i64>> {
    let admin = crate::kafka::ClusterAdmin::connect_bootstrap(
        &env.bootstrap(i),
        &crate::kafka::KafkaProperties::new(),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admin.committed_offsets(group, TOPIC, parts).await {
            Ok(o) => return o,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot read {group}'s offsets: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Receives `n` records within `d` without committing them.
async fn recv_n_uncommitted(c: &FleetConsumer, n: usize, d: Duration) -> Vec<FleetMessage> {
    let deadline = Instant::now() + d;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records within {d:?}",
            out.len()
        );
        if let Some(m) = recv_for(c, Duration::from_millis(500)).await {
            out.push(m);
        }
    }
    out
}

/// Waits (at most `d`) until nothing is queued for commit: what was queued
/// has been taken by the committer (sent, or being sent).
fn wait_taken(c: &FleetConsumer, d: Duration) -> Result<(), String> {
    let deadline = Instant::now() + d;
    while !c.pending_commits().is_empty() {
        if Instant::now() >= deadline {
            return Err(format!("still queued: {:?}", c.pending_commits()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_queued_when_a_rebalance_revokes_its_partition_lands_before_the_revoke_completes()
{
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, OnceLock, Weak};
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 6, parts, 1).await;
    let group = "g-revoke";
    // librdkafka's mock group coordinator refuses commits while the group
    // prepares a rebalance (Kafka accepts them from the current generation):
    // with the cooperative protocol a member's partitions are revoked after
    // the group is stable again, which the mock lets it commit in.
    let config = |g: &str| {
        env.config(g)
            .set("session.timeout.ms", "10000")
            .set("partition.assignment.strategy", "cooperative-sticky")
    };
    // The first member commits its last record of each partition when a
    // revoke begins (the usual Kafka pattern), asynchronously: those of the
    // revoked partitions are queued behind the first commit, which the slow
    // broker keeps in flight.
    let me: Arc<OnceLock<Weak<FleetConsumer>>> = Arc::new(OnceLock::new());
    let held: Arc<Mutex<Vec<FleetMessage>>> = Arc::new(Mutex::new(Vec::new()));
    let problems: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let queued: Arc<Mutex<Vec<i32>>> = Arc::new(Mutex::new(Vec::new()));
    let revoked = Arc::new(AtomicBool::new(false));
    let cb = {
        let (me, held, problems, queued, revoked) = (
            me.clone(),
            held.clone(),
            problems.clone(),
            queued.clone(),
            revoked.clone(),
        );
        move |e: &RebalanceEvent| {
            let RebalanceKind::Revoke(ps) = &e.kind else {
                return;
            };
            if e.phase == RebalancePhase::After {
                if !queued.lock().unwrap().is_empty() {
                    revoked.store(true, Ordering::SeqCst);
                }
                return;
            }
            let mut msgs = std::mem::take(&mut *held.lock().unwrap());
            let Some(c) = me.get().and_then(Weak::upgrade) else {
                return;
            };
            if msgs.len() != 2 || ps.is_empty() {
                return;
            }
            // Revoked partitions last: they are the ones queued.
            let is_revoked = |m: &FleetMessage| ps.iter().any(|(_, p)| *p == m.partition());
            msgs.sort_by_key(is_revoked);
            let mut r = c
                .commit_message(&msgs[0], CommitMode::Async)
                .map_err(|e| e.to_string());
            r = r.and_then(|()| wait_taken(&c, Duration::from_secs(10)));
            let mut later = Vec::new();
            for m in &msgs[1..] {
                r = r.and_then(|()| {
                    c.commit_message(m, CommitMode::Async)
                        .map_err(|e| e.to_string())
                });
                later.push(m.partition());
            }
            let waiting = c.pending_commits().get("a").cloned().unwrap_or_default();
            let revoked_later: Vec<i32> = later
                .into_iter()
                .filter(|p| ps.iter().any(|(_, q)| q == p))
                .collect();
            match r {
                Ok(())
                    if !revoked_later.is_empty()
                        && revoked_later
                            .iter()
                            .all(|p| waiting.contains_key(&(TOPIC.to_string(), *p))) =>
                {
                    *queued.lock().unwrap() = revoked_later
                }
                Ok(()) => problems.lock().unwrap().push(format!(
                    "no commit of a revoked partition queued: revoked {ps:?}, queued {waiting:?}"
                )),
                Err(e) => problems.lock().unwrap().push(e),
            }
        }
    };
    let c1 = Arc::new(
        FleetConsumer::new(
            config(group)
                .commit_timeout(Duration::from_secs(20))
                .on_rebalance(cb),
        )
        .await
        .unwrap(),
    );
    me.set(Arc::downgrade(&c1)).unwrap();
    c1.subscribe(&[TOPIC]).unwrap();
    let got = recv_n_uncommitted(&c1, 6, Duration::from_secs(30)).await;
    for p in 0..parts as i32 {
        let last = got
            .iter()
            .filter(|m| m.partition() == p)
            .max_by_key(|m| m.offset())
            .unwrap();
        assert_eq!(last.offset(), 2);
        held.lock().unwrap().push(last.clone());
    }
    drop(got);
    // Every response of a's broker takes 1.5 s from now on.
    env.fleet
        .as_ref()
        .unwrap()
        .cluster(0)
        .broker_rtt(1, Duration::from_millis(1500))
        .unwrap();
    // A second member joins: the first one's partitions are revoked.
    let c2 = FleetConsumer::new(config(group)).await.unwrap();
    c2.subscribe(&[TOPIC]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !revoked.load(Ordering::SeqCst) {
        let p = problems.lock().unwrap().clone();
        assert!(p.is_empty(), "{p:?}");
        assert!(Instant::now() < deadline, "no revoke after the commits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The revoke has completed: the commits of the revoked partitions are
    // the group's.
    let committed = group_committed(&env, 0, group, parts).await;
    let queued = queued.lock().unwrap().clone();
    for p in &queued {
        assert_eq!(
            committed[*p as usize],
            Some(3),
            "the commit queued for partition {p} when it was revoked was dropped: {committed:?}"
        );
    }
    env.fleet
        .as_ref()
        .unwrap()
        .cluster(0)
        .broker_rtt(1, Duration::ZERO)
        .unwrap();
    c2.close().await;
    Arc::into_inner(c1).unwrap().close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_commits_every_delivered_record_under_auto_commit() {
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 10, parts, 1).await;
    let group = "g-close-auto";
    // No auto-commit tick and no driver tick (neither timed nor from a
    // registry change: the lease is not renewed) before the close: only the
    // pumps hand delivered offsets to librdkafka meanwhile, and the close
    // commits.
    let c = FleetConsumer::new(
        env.config(group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "600000")
            .poll_interval(Duration::from_secs(600))
            .lease_ttl(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    // Every record read (and the pump done with its batches) before the
    // application takes the first: their offsets are handed to librdkafka
    // by nobody but the close.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.ready_len() < 10 {
        assert!(
            Instant::now() < deadline,
            "only {} records read",
            c.ready_len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(recv_n_uncommitted(&c, 10, Duration::from_secs(30)).await);
    c.close().await;
    assert_eq!(
        group_committed(&env, 0, group, parts).await,
        vec![Some(5), Some(5)],
        "delivered records not committed by the close"
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_commits_what_the_application_committed_and_nothing_else() {
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 6, parts, 1).await;
    let group = "g-close-manual";
    let c = FleetConsumer::new(
        env.config(group)
            .set("session.timeout.ms", "30000")
            .commit_timeout(Duration::from_secs(20)),
    )
    .await
    .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let mut got = recv_n_uncommitted(&c, 6, Duration::from_secs(30)).await;
    got.sort_by_key(|m| (m.partition(), m.offset()));
    // Partition 0: processed and committed.
    c.commit_message(&got[2], CommitMode::Sync).unwrap();
    // Partition 1: the first two committed asynchronously, the second one
    // queued behind the first (kept in flight by a slow broker); the third
    // delivered but not processed (not committed).
    env.fleet
        .as_ref()
        .unwrap()
        .cluster(0)
        .broker_rtt(1, Duration::from_millis(1500))
        .unwrap();
    c.commit_message(&got[3], CommitMode::Async).unwrap();
    wait_taken(&c, Duration::from_secs(10)).unwrap();
    c.commit_message(&got[4], CommitMode::Async).unwrap();
    assert!(!c.pending_commits().is_empty());
    drop(got);
    c.close().await;
    env.fleet
        .as_ref()
        .unwrap()
        .cluster(0)
        .broker_rtt(1, Duration::ZERO)
        .unwrap();
    assert_eq!(
        group_committed(&env, 0, group, parts).await,
        vec![Some(3), Some(2)],
        "the close lost a commit, or committed a record the application did not"
    );
    env.shutdown().await;
}

/// A member (`c1`) holding, unprocessed and uncommitted, the last record
/// `recv` returned — offset 2 of partition `target` (the records before it
/// committed) — while a second member (`c2`) joins and `target` moves to
/// it.
struct HeldRecord {
    c1: Arc<FleetConsumer>,
    c2: FleetConsumer,
    held: FleetMessage,
    /// `c1`'s revoke of `target` completed.
    revoked: Arc<std::sync::atomic::AtomicBool>,
    /// The group's committed offset of `target` on a as `c1` knew it (the
    /// commits the cluster confirmed to it) when that revoke completed.
    committed_at_revoke: Arc<std::sync::OnceLock<Option<i64>>>,
}

/// Sets up [`HeldRecord`] with group `group` (6 records on a, 3 per
/// partition, produced already) and waits until `c1`'s revoke of `target`
/// waits for the application; fails if the revoke completes instead. `Err`
/// with the partitions revoked if the group moved another partition
/// (which one moves is the assignor's choice): the caller tries again with
/// another group.
async fn hold_while_revoked(
    env: &Env,
    group: &str,
    target: i32,
    revoke_wait: Duration,
) -> Result<HeldRecord, Vec<i32>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, OnceLock, Weak};
    // Cooperative: the mock coordinator accepts commits during the revoke
    // (see the test above), unless the group went back to joining meanwhile
    // (see `a_record_being_processed_when_its_partition_is_revoked_is_not_delivered_again`).
    let config = |g: &str| {
        env.config(g)
            .set("session.timeout.ms", "10000")
            .set("partition.assignment.strategy", "cooperative-sticky")
    };
    let revoking: Arc<Mutex<Option<Vec<i32>>>> = Arc::new(Mutex::new(None));
    let revoked = Arc::new(AtomicBool::new(false));
    let me: Arc<OnceLock<Weak<FleetConsumer>>> = Arc::new(OnceLock::new());
    let committed_at_revoke: Arc<OnceLock<Option<i64>>> = Arc::new(OnceLock::new());
    let cb = {
        let (revoking, revoked, me, committed) = (
            revoking.clone(),
            revoked.clone(),
            me.clone(),
            committed_at_revoke.clone(),
        );
        move |e: &RebalanceEvent| {
            let RebalanceKind::Revoke(ps) = &e.kind else {
                return;
            };
            if ps.is_empty() {
                return;
            }
            match e.phase {
                RebalancePhase::Before => {
                    *revoking.lock().unwrap() = Some(ps.iter().map(|(_, p)| *p).collect())
                }
                RebalancePhase::After => {
                    // Read here, as the revoke completes: a commit confirmed
                    // later no longer counts as made before it.
                    if ps.iter().any(|(_, p)| *p == target) && committed.get().is_none() {
                        if let Some(c) = me.get().and_then(Weak::upgrade) {
                            let _ = committed.set(c.gate_committed("a", TOPIC, target as u32));
                        }
                    }
                    revoked.store(true, Ordering::SeqCst)
                }
            }
        }
    };
    let c1 = Arc::new(
        FleetConsumer::new(
            config(group)
                .revoke_wait(revoke_wait)
                .commit_timeout(IN_HAND_COMMIT_TIMEOUT)
                .on_rebalance(cb),
        )
        .await
        .unwrap(),
    );
    me.set(Arc::downgrade(&c1)).unwrap();
    c1.subscribe(&[TOPIC]).unwrap();
    // A sequential application: every record processed and committed, until
    // the one it is processing when the rebalance comes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        assert!(
            Instant::now() < deadline,
            "no record {target}/2 within 30 s"
        );
        let Some(m) = recv_for(&c1, Duration::from_millis(500)).await else {
            continue;
        };
        if (m.partition(), m.offset()) == (target, 2) {
            break m;
        }
        c1.commit_message(&m, CommitMode::Sync).unwrap();
    };
    let c2 = FleetConsumer::new(config(group)).await.unwrap();
    c2.subscribe(&[TOPIC]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no revoke from the first member");
        let ps = revoking.lock().unwrap().clone();
        if let Some(ps) = ps {
            if !ps.contains(&target) {
                drop(held);
                c2.close().await;
                Arc::into_inner(c1).unwrap().close().await;
                return Err(ps);
            }
            if c1.revokes_waiting() > 0 {
                return Ok(HeldRecord {
                    c1,
                    c2,
                    held,
                    revoked,
                    committed_at_revoke,
                });
            }
            assert!(
                !revoked.load(Ordering::SeqCst),
                "the revoke of partition {target} completed while the application processed its record {target}/2"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The commit timeout of [`HeldRecord`]'s first member (the default, set
/// so that the test can tell when a revoke's flush gave up on it).
const IN_HAND_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// [`hold_while_revoked`] with fresh groups `<prefix>-<n>` until the
/// partition held is the one the group moves.
async fn hold_a_revoked_partition(env: &Env, prefix: &str, wait: Duration) -> (HeldRecord, i32) {
    let mut target = 1;
    for n in 0..8 {
        match hold_while_revoked(env, &format!("{prefix}-{n}"), target, wait).await {
            Ok(h) => return (h, target),
            Err(ps) => target = ps[0],
        }
    }
    panic!("the held partition was never the one revoked");
}

/// Waits (at most 60 s) until `c` has read record `partition/offset` of
/// cluster a; returns the offsets of `partition` it read.
async fn read_until(c: &FleetConsumer, partition: i32, offset: i64) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen.contains(&offset) {
        assert!(
            Instant::now() < deadline,
            "record {partition}/{offset} not read within 60 s (read {seen:?})"
        );
        if let Some(m) = recv_for(c, Duration::from_millis(500)).await {
            if m.partition() == partition {
                seen.push(m.offset());
            }
            c.commit_message(&m, CommitMode::Async).unwrap();
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_being_processed_when_its_partition_is_revoked_is_not_delivered_again() {
    use std::sync::atomic::Ordering;
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 6, parts, 1).await;
    // A bound far above the test's own steps: the application, not the
    // bound, ends the wait.
    let (h, target) = hold_a_revoked_partition(&env, "g-in-hand", Duration::from_secs(60)).await;
    // The revoke waits: the application finishes the record, commits it and
    // asks for the next one.
    // During the rebalance the cluster may refuse commits for a moment
    // (an earlier one still unconfirmed): then the commit stays queued and
    // the revoke commits it, which is what this test is about.
    let pending = match h.c1.commit_message(&h.held, CommitMode::Sync) {
        Ok(()) => false,
        Err(FleetConsumeError::CommitPending { .. }) => true,
        Err(e) => panic!("commit of the record in hand: {e}"),
    };
    drop(h.held);
    // The revoke's commit starts after this (once `recv` is called).
    let released = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !h.revoked.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the revoke did not complete after recv"
        );
        if let Some(m) = recv_for(&h.c1, Duration::from_millis(100)).await {
            assert_ne!(m.partition(), target, "a record of the revoked partition");
            h.c1.commit_message(&m, CommitMode::Async).unwrap();
        }
    }
    let revoke_took = released.elapsed();
    let committed = h.committed_at_revoke.get().copied().flatten();
    // The partition's next owner starts after the record: a newer record of
    // it is the first it reads.
    env.produce(0, parts as usize, parts, 1).await;
    let seen = read_until(&h.c2, target, 3).await;
    if committed.is_some_and(|c| c >= 3) || !pending {
        assert_eq!(
            seen,
            vec![3],
            "the record processed and committed during the revoke was delivered again"
        );
    } else {
        // The documented gap (at least once): the cluster refused the
        // commit, and the revoke completed without it after the commit
        // timeout. The mock coordinator does this when the group goes back
        // to joining during the revoke — a new member whose SyncGroup
        // arrives after the leader's gets INVALID_REQUEST and rejoins (Kafka
        // answers it) — and refuses commits until every member rejoined
        // (Kafka accepts those of the current generation), which this
        // member does only once its revoke completed. Under load that
        // ordering is frequent. Anything else is a lost commit.
        assert!(
            revoke_took >= IN_HAND_COMMIT_TIMEOUT,
            "the revoke completed after {revoke_took:?} without the commit of the record in hand (committed {committed:?})"
        );
        assert!(
            seen == vec![3] || seen == vec![2, 3],
            "read {seen:?} of partition {target}"
        );
        eprintln!(
            "the cluster did not confirm the commit of the record in hand before the revoke completed (committed {committed:?}; read {seen:?}): at least once"
        );
    }
    h.c2.close().await;
    Arc::into_inner(h.c1).unwrap().close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_waits_for_a_record_in_hand_at_most_the_revoke_wait() {
    use std::sync::atomic::Ordering;
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 6, parts, 1).await;
    let (h, target) =
        hold_a_revoked_partition(&env, "g-in-hand-bound", Duration::from_secs(2)).await;
    // The application never comes back: the revoke completes after the
    // bound all the same, and the record goes to the partition's next owner
    // (at least once).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !h.revoked.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the revoke still waits for the application after 30 s (bound 2 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.c1.revokes_waiting(), 0);
    let seen = read_until(&h.c2, target, 2).await;
    assert_eq!(seen, vec![2]);
    drop(h.held);
    h.c2.close().await;
    Arc::into_inner(h.c1).unwrap().close().await;
    env.shutdown().await;
}

/// Waits (at most `d`) until `cond` holds; panics naming `what` otherwise.
async fn wait_until(what: &str, d: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + d;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `c` is a member of the group on `cluster` with `n` partitions.
fn assigned_on(c: &FleetConsumer, cluster: &str, n: usize) -> bool {
    c.assignment()
        .unwrap()
        .get(cluster)
        .is_some_and(|tpl| tpl.count() == n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_epochs_cluster_is_pre_joined_and_its_records_wait_for_the_seal() {
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    let fence_a = env.produce(0, 4, parts, 1).await;
    let c = FleetConsumer::new(env.config("g-prejoin")).await.unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    // a's records, of which only partition 1's are committed: a/0 stays
    // below its fence, so after the seal b/0 must wait for it.
    let from_a = recv_n_uncommitted(&c, 4, Duration::from_secs(30)).await;
    assert!(from_a.iter().all(|m| m.cluster() == "a"));
    for m in from_a.iter().filter(|m| m.partition() == 1) {
        c.commit_message(m, CommitMode::Sync).unwrap();
    }
    assert_eq!(c.clusters(), vec!["a".to_string()]);

    // Epoch 2 on b proposed: while it is pending, the consumer joins the
    // group on b (a member there, both partitions assigned), but does not
    // read b: the read set is still a alone.
    env.put_epochs(
        parts,
        vec![
            epoch(1, &["a"], EpochState::Open, &[]),
            epoch(2, &["b"], EpochState::Pending, &[]),
        ],
    )
    .await;
    wait_until(
        "b pre-joined before the seal",
        Duration::from_secs(30),
        || assigned_on(&c, "b", parts as usize),
    )
    .await;
    assert_eq!(c.read_set(TOPIC), BTreeSet::from(["a".to_string()]));

    // Before the seal, two records land on b above its boundary-to-be (the
    // boundary below is read before them): one without an epoch header
    // (which the gate alone would let through: it knows no limit for a
    // cluster of a pending epoch) and one of epoch 2 (a producer that saw
    // the seal before this consumer: `Ahead` for the gate). Both are parked.
    assert_eq!(env.produce_one(1, 0, "plain", None).await, 0);
    assert_eq!(env.produce_one(1, 1, "early", Some(2)).await, 0);
    wait_until("b's records parked", Duration::from_secs(30), || {
        c.held_back() == 2
    })
    .await;

    // The seal: the gate decides as for a cluster joined now. b/1 flows (a/1
    // is committed up to its fence), b/0 waits for a/0.
    env.seal_a_open_b(parts, fence_a, vec![0, 0]).await;
    let m = recv_n_uncommitted(&c, 1, Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(
        (m.cluster(), m.partition(), m.offset(), m.epoch()),
        ("b", 1, 0, Some(2))
    );
    assert_eq!(m.payload(), Some(&b"early"[..]));
    assert_eq!(c.held_back(), 1, "b/0 must still wait for a/0's fence");
    // (The read set follows in the same pass, after the gate took the route.)
    wait_until("b in the read set", Duration::from_secs(10), || {
        c.read_set(TOPIC) == BTreeSet::from(["a".to_string(), "b".to_string()])
    })
    .await;
    // a/0 committed to its fence: b/0's record comes.
    for m in from_a.iter().filter(|m| m.partition() == 0) {
        c.commit_message(m, CommitMode::Sync).unwrap();
    }
    let m = recv_n_uncommitted(&c, 1, Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(
        (m.cluster(), m.partition(), m.offset(), m.epoch()),
        ("b", 0, 0, None)
    );
    assert_eq!(c.held_back(), 0);
    c.close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_pending_epoch_closes_the_pre_joined_clusters_consumer() {
    let parts = 1;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 2, parts, 1).await;
    let c = FleetConsumer::new(env.config("g-prejoin-abort"))
        .await
        .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    recv_n(&c, 2, Duration::from_secs(30)).await;
    let pending = vec![
        epoch(1, &["a"], EpochState::Open, &[]),
        epoch(2, &["b"], EpochState::Pending, &[]),
    ];
    env.put_epochs(parts, pending).await;
    wait_until("b pre-joined", Duration::from_secs(30), || {
        assigned_on(&c, "b", parts as usize)
    })
    .await;
    env.produce_one(1, 0, "early", Some(2)).await;
    wait_until("b's record parked", Duration::from_secs(30), || {
        c.held_back() == 1
    })
    .await;

    // The switch is aborted: b leaves, its consumer is closed and what was
    // parked from it dropped, never delivered.
    env.put_epochs(
        parts,
        vec![
            epoch(1, &["a"], EpochState::Open, &[]),
            epoch(2, &["b"], EpochState::Aborted, &[]),
        ],
    )
    .await;
    wait_until("b's consumer closed", Duration::from_secs(30), || {
        c.clusters() == vec!["a".to_string()]
    })
    .await;
    assert_eq!(c.held_back(), 0);
    assert!(!c.assignment().unwrap().contains_key("b"));
    assert_eq!(c.read_set(TOPIC), BTreeSet::from(["a".to_string()]));
    // a keeps flowing; nothing of b comes.
    env.produce(0, 2, parts, 1).await;
    let got = recv_n(&c, 2, Duration::from_secs(30)).await;
    assert!(got.iter().all(|m| m.cluster() == "a"), "{got:?}");
    c.close().await;
    env.shutdown().await;
}

/// The start offsets librdkafka holds for the assignment of the consumer
/// `m` came from, per partition: as the rebalance callback assigned them
/// (`Beginning`: started without a committed-offset lookup; `Stored`:
/// librdkafka reads the group's committed offset).
fn start_offsets(m: &FleetMessage) -> BTreeMap<i32, rdkafka::Offset> {
    use rdkafka::consumer::Consumer;
    let consumer = m.client_for_test().0.upgrade().expect("consumer alive");
    let tpl = consumer.assignment().unwrap();
    tpl.elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

/// A group with committed offsets on partitions 0 and 1 of a (2 and 3, of
/// 3 records each) and none on partition 2 is joined again by a new member
/// (`strategy`: eager or cooperative assignment): partitions 0 and 1 resume
/// at their committed offsets, nothing committed is delivered again, and
/// partition 2 is read from its beginning; only partition 2 is assigned at
/// `Beginning` (librdkafka looks up the committed offsets of the others).
async fn rejoin_resumes_committed_and_starts_the_rest_at_the_beginning(strategy: &str) {
    let parts = 3;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 9, parts, 1).await;
    let group = format!("g-resume-{strategy}");
    let config = || {
        env.config(&group)
            .set("partition.assignment.strategy", strategy)
    };
    let c1 = FleetConsumer::new(config()).await.unwrap();
    c1.subscribe(&[TOPIC]).unwrap();
    let got = recv_n_uncommitted(&c1, 9, Duration::from_secs(30)).await;
    // A fresh group: every partition started at the beginning.
    assert_eq!(
        start_offsets(&got[0]),
        (0..parts as i32)
            .map(|p| (p, rdkafka::Offset::Beginning))
            .collect(),
    );
    for (p, o) in [(0, 1), (1, 2)] {
        let m = got
            .iter()
            .find(|m| (m.partition(), m.offset()) == (p, o))
            .unwrap();
        c1.commit_message(m, CommitMode::Sync).unwrap();
    }
    drop(got);
    c1.close().await;
    assert_eq!(
        group_committed(&env, 0, &group, parts).await,
        vec![Some(2), Some(3), None]
    );
    // One more record per partition (offset 3): read past it, a partition
    // delivered again what it had before.
    env.produce(0, 3, parts, 1).await;

    let c2 = FleetConsumer::new(config()).await.unwrap();
    c2.subscribe(&[TOPIC]).unwrap();
    let mut seen: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    let mut starts = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..parts as i32).any(|p| !seen.get(&p).is_some_and(|o| o.contains(&3))) {
        assert!(Instant::now() < deadline, "timed out; got {seen:?}");
        let Some(m) = recv_for(&c2, Duration::from_millis(500)).await else {
            continue;
        };
        starts.get_or_insert_with(|| start_offsets(&m));
        seen.entry(m.partition()).or_default().push(m.offset());
    }
    assert_eq!(
        seen,
        BTreeMap::from([(0, vec![2, 3]), (1, vec![3]), (2, vec![0, 1, 2, 3])]),
        "committed records delivered again, or uncommitted ones lost"
    );
    let starts = starts.unwrap();
    assert_eq!(starts.len(), parts as usize, "{starts:?}");
    assert_eq!(starts[&2], rdkafka::Offset::Beginning, "{starts:?}");
    assert!(
        starts[&0] != rdkafka::Offset::Beginning && starts[&1] != rdkafka::Offset::Beginning,
        "partitions with a committed offset must start from it: {starts:?}"
    );
    c2.close().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eager_rejoin_resumes_committed_partitions_and_starts_the_others_at_the_beginning() {
    rejoin_resumes_committed_and_starts_the_rest_at_the_beginning("range").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperative_rejoin_resumes_committed_partitions_and_starts_the_others_at_the_beginning()
{
    rejoin_resumes_committed_and_starts_the_rest_at_the_beginning("cooperative-sticky").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_committed_offsets_are_not_read_in_time_librdkafka_starts_the_partitions() {
    let parts = 2;
    let env = Env::start(parts, vec![epoch(1, &["a"], EpochState::Open, &[])]).await;
    env.produce(0, 6, parts, 1).await;
    // Every response of a's broker takes 300 ms: the lookup of the
    // assignment's committed offsets gives up after the commit timeout
    // (100 ms) and the partitions are assigned as librdkafka would.
    let mock = &env.fleet.as_ref().unwrap().clusters()[0];
    mock.broker_rtt(1, Duration::from_millis(300)).unwrap();
    let c = FleetConsumer::new(
        env.config("g-lookup-timeout")
            .commit_timeout(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let got = recv_n_uncommitted(&c, 6, Duration::from_secs(60)).await;
    let starts = start_offsets(&got[0]);
    assert_eq!(starts.len(), parts as usize, "{starts:?}");
    assert!(
        starts.values().all(|o| *o != rdkafka::Offset::Beginning),
        "{starts:?}"
    );
    // Nothing lost: every record read from the beginning (the reset).
    let mut offsets: Vec<(i32, i64)> = got.iter().map(|m| (m.partition(), m.offset())).collect();
    offsets.sort();
    assert_eq!(
        offsets,
        vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    );
    mock.broker_rtt(1, Duration::ZERO).unwrap();
    drop(got);
    c.close().await;
    env.shutdown().await;
}
