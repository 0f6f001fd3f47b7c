//! `FleetConsumer` with the KIP-848 consumer group protocol
//! (`group.protocol=consumer`) on real etcd and two real Kafka 4 clusters.
//!
//! A group of two members reads a topic while the real `FleetProducer` keeps
//! sending and the route switches A → A+B → B by hand (the controller's part
//! of the handoff, `common/switch.rs`); the second member joins mid-way, so
//! partitions move between members by the new protocol's incremental
//! revoke / assign. One member commits asynchronously (what is still queued
//! when a partition is revoked is committed before the revoke completes),
//! the other synchronously; both take about a millisecond per record, so
//! revokes come while a record of the partition is being processed. Every
//! record must be delivered, in order per key (a
//! key's epoch-N records before its epoch-N+1 ones), exactly once (commit
//! after processing, no crash), and a member must only ever get records of
//! partitions assigned to it, never of one another member holds. Then the
//! control plane's retirement check (the group's committed offsets, read with
//! [`ClusterAdmin::committed_offsets`]) must see the group at the end of both
//! clusters, without disturbing it. A second test: the classic protocol's
//! properties are refused by name with `group.protocol=consumer`.

#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/switch.rs"]
mod switch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::{connect_registry, open_route, register_clusters, send_seq};
use flotilla_client::consumer::{
    FleetConsumeError, FleetConsumer, FleetConsumerConfig, RebalanceKind, RebalancePhase,
};
use flotilla_client::kafka::ClusterAdmin;
use flotilla_client::registry::Registry;
use flotilla_client::{FleetProducer, FleetProducerConfig};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::{KafkaFleet, KafkaOptions};
use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::CommitMode;
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use switch::{drive_switch, write_set, Producers};

const TOPIC: &str = "kip848";
const PARTITIONS: u32 = 6;
const KEYS: usize = 36;
const GROUP: &str = "kip848";
const IDS: [&str; 2] = ["a", "b"];
/// Every wait for a condition gives up after this.
const DEADLINE: Duration = Duration::from_secs(60);

/// One delivered record as the application saw it.
#[derive(Debug, Clone)]
struct Got {
    key: String,
    seq: usize,
    cluster: String,
    partition: i32,
    epoch: Option<u64>,
    member: &'static str,
}

/// Who holds which partition, as the members' rebalance callbacks say.
#[derive(Default)]
struct Owners {
    /// `(cluster, partition)` → member.
    held: BTreeMap<(String, i32), &'static str>,
    /// Every rebalance event: member, cluster, phase, kind.
    events: Vec<(&'static str, String, RebalancePhase, RebalanceKind)>,
    /// Anything a member got that was not its own.
    violations: Vec<String>,
    /// The record each member is processing (delivered, not committed yet).
    in_hand: BTreeMap<&'static str, (String, i32)>,
    /// Revokes that came while the member processed a record of a revoked
    /// partition (its commit must go with the partition).
    revoked_in_hand: usize,
}

impl Owners {
    fn held_by(&self, member: &str, cluster: &str) -> usize {
        self.held
            .iter()
            .filter(|((c, _), m)| c == cluster && **m == member)
            .count()
    }

    /// Partitions `member` gave up (revokes, after they completed).
    fn revoked_from(&self, member: &str) -> usize {
        self.events
            .iter()
            .filter(|(m, _, ph, _)| *m == member && *ph == RebalancePhase::After)
            .map(|(_, _, _, k)| match k {
                RebalanceKind::Revoke(ps) => ps.len(),
                _ => 0,
            })
            .sum()
    }
}

fn member_config(
    registry: &Registry,
    name: &'static str,
    owners: &Arc<Mutex<Owners>>,
) -> FleetConsumerConfig {
    let owners = owners.clone();
    FleetConsumerConfig::new(registry.clone())
        .set("group.id", GROUP)
        .set("group.protocol", "consumer")
        .poll_interval(Duration::from_millis(100))
        .connect_timeout(Duration::from_secs(10))
        .on_rebalance(move |ev| {
            let mut o = owners.lock().unwrap();
            o.events
                .push((name, ev.cluster.clone(), ev.phase, ev.kind.clone()));
            match (&ev.phase, &ev.kind) {
                // Before the assignment is applied: no record of these
                // partitions can have been read yet.
                (RebalancePhase::Before, RebalanceKind::Assign(ps)) => {
                    for (_, p) in ps {
                        let tp = (ev.cluster.clone(), *p);
                        if let Some(other) = o.held.get(&tp).copied() {
                            if other != name {
                                o.violations.push(format!(
                                    "{name} assigned {}/{p} while {other} holds it",
                                    ev.cluster
                                ));
                            }
                        }
                        o.held.insert(tp, name);
                    }
                }
                (RebalancePhase::Before, RebalanceKind::Revoke(ps))
                    if o.in_hand.get(name).is_some_and(|(c, p)| {
                        *c == ev.cluster && ps.iter().any(|(_, q)| q == p)
                    }) =>
                {
                    o.revoked_in_hand += 1;
                }
                // Once the revoke completed (what was delivered of them is
                // committed by then).
                (RebalancePhase::After, RebalanceKind::Revoke(ps)) => {
                    for (_, p) in ps {
                        let tp = (ev.cluster.clone(), *p);
                        match o.held.get(&tp).copied() {
                            Some(m) if m == name => {
                                o.held.remove(&tp);
                            }
                            other => o.violations.push(format!(
                                "{name} revoked {}/{p} held by {other:?}",
                                ev.cluster
                            )),
                        }
                    }
                }
                (_, RebalanceKind::Error(e)) => o
                    .violations
                    .push(format!("{name}: rebalance error on {}: {e}", ev.cluster)),
                _ => {}
            }
        })
}

/// A group member: receive, check the partition is its own, record,
/// process (`slow` milliseconds), commit (`mode`), until `stop`.
fn spawn_member(
    registry: &Registry,
    name: &'static str,
    mode: CommitMode,
    slow: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Got>>>,
    owners: Arc<Mutex<Owners>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let config = member_config(registry, name, &owners);
    tokio::spawn(async move {
        let c = FleetConsumer::new(config).await.expect("start consumer");
        c.subscribe(&[TOPIC]).unwrap();
        while !stop.load(Ordering::Acquire) {
            let m = match tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
                Err(_) => continue,
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    eprintln!("{name}: recv error: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let payload = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
            let (key, seq) = payload.split_once(':').unwrap();
            {
                let mut o = owners.lock().unwrap();
                let tp = (m.cluster().to_string(), m.partition());
                let holder = o.held.get(&tp).copied();
                if holder != Some(name) {
                    o.violations.push(format!(
                        "{name} got {payload} from {}/{} held by {holder:?}",
                        tp.0, tp.1
                    ));
                }
                o.in_hand.insert(name, tp);
            }
            log.lock().unwrap().push(Got {
                key: key.to_string(),
                seq: seq.parse().unwrap(),
                cluster: m.cluster().to_string(),
                partition: m.partition(),
                epoch: m.epoch(),
                member: name,
            });
            // Processing: a revoke of the partition now waits for its commit.
            let work = slow.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(work)).await;
            let started = Instant::now();
            loop {
                match c.commit_message(&m, mode) {
                    Ok(()) | Err(FleetConsumeError::NotReading { .. }) => break,
                    Err(e) if started.elapsed() > Duration::from_secs(5) => {
                        panic!("{name}: commit {payload} from {}: {e}", m.cluster())
                    }
                    Err(e) => {
                        eprintln!("{name}: commit {payload} from {}: {e}", m.cluster());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            owners.lock().unwrap().in_hand.remove(name);
        }
        c.close().await;
    })
}

/// Waits until `cond` holds, at most [`DEADLINE`].
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn distinct(log: &[Got]) -> usize {
    log.iter()
        .map(|g| (g.key.as_str(), g.seq))
        .collect::<BTreeSet<_>>()
        .len()
}

/// Per-key order (sequence numbers in order, epochs never going back) and
/// completeness against `sent` (records per key); returns the duplicates.
fn check_order(log: &[Got], sent: &BTreeMap<String, usize>) -> usize {
    let mut last: BTreeMap<&str, (usize, Option<u64>)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut dups = 0;
    let mut bad = Vec::new();
    for g in log {
        if !seen.insert((g.key.as_str(), g.seq)) {
            dups += 1;
            continue;
        }
        let (expect, prev_epoch) = last
            .get(g.key.as_str())
            .map_or((0, None), |(s, e)| (s + 1, *e));
        if g.seq != expect {
            bad.push(format!(
                "{}:{} (epoch {:?} from {}/{} via {}) expected seq {expect}",
                g.key, g.seq, g.epoch, g.cluster, g.partition, g.member
            ));
        }
        if g.epoch < prev_epoch {
            bad.push(format!(
                "{}:{} of epoch {:?} after epoch {prev_epoch:?}",
                g.key, g.seq, g.epoch
            ));
        }
        last.insert(&g.key, (g.seq, g.epoch));
    }
    assert!(
        bad.is_empty(),
        "per-key order broken ({} cases): {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    for (k, n) in sent {
        assert_eq!(
            last.get(k.as_str()).map(|(s, _)| s + 1),
            Some(*n),
            "key {k} incomplete"
        );
    }
    dups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kip848_group_reads_every_record_once_in_key_order_across_switches() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    let etcd = EtcdServer::start().expect("etcd");
    let options = KafkaOptions::default();
    let fleet = tokio::task::block_in_place(|| KafkaFleet::start_with(2, &options)).expect("kafka");
    let registry = connect_registry(&etcd.endpoint(), "kip848").await;
    // `true`: what `flotilla cluster activate` does, the offsets topic exists
    // before the first group uses the cluster.
    let admins = register_clusters(
        &registry,
        &fleet,
        &IDS,
        TOPIC,
        PARTITIONS,
        Duration::from_secs(20),
        true,
    )
    .await;
    open_route(&registry, TOPIC, PARTITIONS, &["a"]).await;
    eprintln!("setup: {:?}", started.elapsed());

    let log = Arc::new(Mutex::new(Vec::<Got>::new()));
    let owners = Arc::new(Mutex::new(Owners::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let (m1_work, m2_work) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(1)));
    let m1 = spawn_member(
        &registry,
        "m1",
        CommitMode::Async,
        m1_work.clone(),
        log.clone(),
        owners.clone(),
        stop.clone(),
    );
    wait_for("m1 to hold every partition of a", || {
        owners.lock().unwrap().held_by("m1", "a") == PARTITIONS as usize
    })
    .await;
    eprintln!("m1 assigned: {:?}", started.elapsed());

    // The writer: keys round robin, a sequence number per key, until told.
    let mut pc = FleetProducerConfig::new();
    pc.registry(registry.clone()).set("linger.ms", "1");
    let producer = Arc::new(FleetProducer::new(pc).await.expect("producer"));
    let sent = Arc::new(AtomicUsize::new(0));
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (producer, sent, writing) = (producer.clone(), sent.clone(), writing.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while writing.load(Ordering::Acquire) {
                send_seq(&producer, TOPIC, KEYS, i).await;
                i += 1;
                sent.store(i, Ordering::Release);
            }
            i
        })
    };
    let sent_at_least = |n: usize| {
        let sent = sent.clone();
        move || sent.load(Ordering::Acquire) >= n
    };
    let batch = 400;
    wait_for("the first records", sent_at_least(batch)).await;
    let s = switch(&registry, &admins, &["a", "b"]).await;
    eprintln!("switch to a+b (epoch {}): {:?}", s, started.elapsed());

    // A second member joins while records flow: partitions of a and b move
    // to it (m1 revokes them, incrementally). Meanwhile m1 takes 10 ms per
    // record, so it falls behind and its revokes come while it processes
    // one (of a revoked partition, or not).
    let n = sent.load(Ordering::Acquire);
    wait_for("records on a+b", sent_at_least(n + batch)).await;
    m1_work.store(10, Ordering::Relaxed);
    let m2 = spawn_member(
        &registry,
        "m2",
        CommitMode::Sync,
        m2_work,
        log.clone(),
        owners.clone(),
        stop.clone(),
    );
    wait_for("m2 to hold partitions of a and b", || {
        let o = owners.lock().unwrap();
        o.held_by("m2", "a") > 0 && o.held_by("m2", "b") > 0
    })
    .await;
    eprintln!("m2 assigned: {:?}", started.elapsed());
    m1_work.store(1, Ordering::Relaxed);

    let n = sent.load(Ordering::Acquire);
    wait_for("records with two members", sent_at_least(n + batch)).await;
    let s = switch(&registry, &admins, &["b"]).await;
    eprintln!("switch to b (epoch {}): {:?}", s, started.elapsed());
    let n = sent.load(Ordering::Acquire);
    wait_for("records on b", sent_at_least(n + batch)).await;
    writing.store(false, Ordering::Release);
    let total = writer.await.unwrap();
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..total {
        *expected.entry(format!("k{}", i % KEYS)).or_default() += 1;
    }
    wait_for("every record delivered", || {
        distinct(&log.lock().unwrap()) == total
    })
    .await;
    eprintln!("{total} records delivered: {:?}", started.elapsed());

    // The retirement check reads the group's committed offsets with an
    // offset-reading consumer that never joins: it must see a
    // consumer-protocol group at the end of every partition of both clusters.
    let events_before = owners.lock().unwrap().events.len();
    for id in IDS {
        let ends = admins[id].end_offsets(TOPIC, PARTITIONS).await.unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let committed = admins[id]
                .committed_offsets(GROUP, TOPIC, PARTITIONS)
                .await
                .unwrap();
            let drained = ends
                .iter()
                .zip(&committed)
                .all(|(end, c)| *end == 0 || c.is_some_and(|c| c >= *end));
            if drained {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "group never committed to the end of {id}: ends {ends:?}, committed {committed:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admins[id].ensure_group_coordinator().await.unwrap();
    }
    // The broker runs it as a consumer-protocol group (KIP-848), with both
    // members: not a classic one.
    for (i, id) in IDS.iter().enumerate() {
        let bootstrap = fleet.cluster(i).bootstrap();
        let (kind, state, members) =
            tokio::task::block_in_place(|| describe_group(&bootstrap, GROUP));
        eprintln!("{id}: group {GROUP}: type {kind}, state {state}, {members} members");
        assert_eq!(kind, "Consumer", "group type on {id}");
        assert_eq!(members, 2, "members on {id}");
    }
    // ... and the group is undisturbed: more records flow to it, no rebalance.
    let extra = 100;
    for i in total..total + extra {
        let key = send_seq(&producer, TOPIC, KEYS, i).await;
        *expected.entry(key).or_default() += 1;
    }
    let total = total + extra;
    wait_for("the records after the offset reads", || {
        distinct(&log.lock().unwrap()) == total
    })
    .await;
    // The offset reads, and the records after them, caused no rebalance.
    let after: Vec<_> = owners.lock().unwrap().events[events_before..].to_vec();
    stop.store(true, Ordering::Release);
    m1.await.unwrap();
    m2.await.unwrap();
    eprintln!("done: {:?}", started.elapsed());

    let log = log.lock().unwrap().clone();
    let owners = owners.lock().unwrap();
    let dups = check_order(&log, &expected);
    let mut per: BTreeMap<(&str, Option<u64>, &str), usize> = BTreeMap::new();
    for g in &log {
        *per.entry((g.member, g.epoch, g.cluster.as_str()))
            .or_default() += 1;
    }
    eprintln!(
        "{total} produced, {} deliveries, {dups} duplicates; per (member, epoch, cluster): {per:?}; \
         m1 revoked {} partitions ({} revokes with a record of theirs in hand); rebalance events: {}",
        log.len(),
        owners.revoked_from("m1"),
        owners.revoked_in_hand,
        owners.events.len()
    );
    for e in &owners.events {
        eprintln!("  {e:?}");
    }
    assert!(
        owners.violations.is_empty(),
        "{} violations: {:?}",
        owners.violations.len(),
        &owners.violations[..owners.violations.len().min(10)]
    );
    assert_eq!(dups, 0, "commit after processing, no crash: delivered once");
    assert!(
        owners.revoked_from("m1") > 0,
        "partitions moved from m1 to m2"
    );
    assert!(log.iter().any(|g| g.member == "m2"), "m2 delivered records");
    assert!(log.iter().any(|g| g.epoch == Some(3)), "epoch 3 used");
    assert!(
        after.is_empty(),
        "rebalances after the offset reads: {after:?}"
    );
    drop(owners);
    drop(producer);
    drop(fleet);
    drop(etcd);
}

/// The controller's switch, by hand; returns the new epoch.
async fn switch(registry: &Registry, admins: &HashMap<String, ClusterAdmin>, next: &[&str]) -> u64 {
    drive_switch(
        registry,
        TOPIC,
        PARTITIONS,
        write_set(next),
        admins,
        Producers::AtLeastOne,
        Duration::from_millis(20),
    )
    .await
    .epoch
}

/// `group` as the broker describes it with the KIP-848-aware admin API
/// (DescribeConsumerGroups; the classic DescribeGroups reports a
/// consumer-protocol group as dead): its type ("Consumer" or "Classic"),
/// state and member count. rdkafka has no binding for it: librdkafka's C API.
fn describe_group(bootstrap: &str, group: &str) -> (String, String, usize) {
    use std::ffi::{CStr, CString};
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let rk = admin.inner().native_ptr();
    let name = CString::new(group).unwrap();
    let mut names = [name.as_ptr()];
    // SAFETY: every pointer comes from librdkafka or outlives the call; the
    // event (which owns the descriptions) is destroyed after they are read.
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
        );
        rd::rd_kafka_DescribeConsumerGroups(rk, names.as_mut_ptr(), 1, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, 10_000);
        assert!(!event.is_null(), "no answer to DescribeConsumerGroups");
        let err = rd::rd_kafka_event_error(event);
        assert_eq!(
            err,
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
            "DescribeConsumerGroups"
        );
        let result = rd::rd_kafka_event_DescribeConsumerGroups_result(event);
        let mut n = 0;
        let groups = rd::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut n);
        assert_eq!(n, 1, "one group described");
        let desc = *groups;
        assert!(
            rd::rd_kafka_ConsumerGroupDescription_error(desc).is_null(),
            "describe {group}"
        );
        let kind = CStr::from_ptr(rd::rd_kafka_consumer_group_type_name(
            rd::rd_kafka_ConsumerGroupDescription_type(desc),
        ))
        .to_string_lossy()
        .into_owned();
        let state = CStr::from_ptr(rd::rd_kafka_consumer_group_state_name(
            rd::rd_kafka_ConsumerGroupDescription_state(desc),
        ))
        .to_string_lossy()
        .into_owned();
        let members = rd::rd_kafka_ConsumerGroupDescription_member_count(desc);
        rd::rd_kafka_event_destroy(event);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_queue_destroy(queue);
        (kind, state, members)
    }
}

/// With `group.protocol=consumer`, librdkafka refuses the classic protocol's
/// properties when it creates a consumer; the fleet consumer refuses them
/// up front, by name, instead of failing on each cluster in the background.
#[tokio::test]
async fn kip848_classic_only_properties_are_refused_by_name() {
    use flotilla_client::registry::memory::MemoryKv;
    let registry = Registry::new(Arc::new(MemoryKv::new()), "kip848-config");
    for (property, value) in [
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("group.protocol.type", "consumer"),
    ] {
        let config = FleetConsumerConfig::new(registry.clone())
            .set("group.id", GROUP)
            .set("group.protocol", "consumer")
            .set(property, value);
        match FleetConsumer::new(config).await {
            Err(FleetConsumeError::UnsupportedProperty {
                property: p,
                protocol,
                hint,
            }) => {
                assert_eq!(p, property);
                assert_eq!(protocol, "consumer");
                assert!(!hint.is_empty());
            }
            Err(e) => panic!("{property}: unexpected error {e}"),
            Ok(_) => panic!("{property} accepted with group.protocol=consumer"),
        }
        // The classic protocol takes it.
        let classic = FleetConsumerConfig::new(registry.clone())
            .set("group.id", GROUP)
            .set(property, value);
        FleetConsumer::new(classic).await.unwrap().close().await;
    }
}
