//! The write fence before retirement, on real etcd and real Kafka 4.4
//! (docs/handoff.md, "The write fence"; finding 2 of docs/simulator.md).
//!
//! A zombie producer — a raw idempotent rdkafka producer the registry does
//! not know (its lease expired long ago, or it never registered) — keeps
//! writing bursts to a draining cluster while the controller retires it. With
//! the fence, every record the zombie got an acknowledgement for was consumed
//! by the registered group before the cluster was retired, and every send
//! made after the fence failed at the producer. Without the fence (the
//! control: the same scenario on a `FleetKafka` that does not fence) the
//! zombie's acknowledged records land after the drained check and are lost
//! with the cluster — so the test can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_client::kafka::{ClusterAdmin, KafkaProperties, SecurityProfiles};
use flotilla_client::registry::{GroupRecord, SCHEMA_VERSION};
use flotilla_control::controller::now_millis;
use flotilla_control::{Controller, SetRoute};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::kafka::KafkaFleet;

mod support;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use support::{add_active_cluster, rdkafka_control_plane};

const TOPIC: &str = "orders";
const GROUP: &str = "readers";
const PARTITIONS: u32 = 2;

/// One send of the zombie: when it was handed to librdkafka and what came back.
#[derive(Debug, Clone)]
struct Send {
    enqueued: Instant,
    result: Result<(i32, i64), RDKafkaErrorCode>,
}

/// What one run of the scenario saw.
#[derive(Debug)]
struct Outcome {
    sends: Vec<Send>,
    /// Records (partition, offset) the group had consumed when the controller
    /// reported the retirement.
    consumed_at_retirement: BTreeSet<(i32, i64)>,
    /// When the controller reported the fence set (with the fence only).
    fenced_at: Option<Instant>,
}

/// The zombie: bursts of 10 sends to cluster `bootstrap`, one burst every
/// ~150 ms, until `stop`; every result is kept.
fn spawn_zombie(
    bootstrap: String,
    stop: Arc<AtomicBool>,
    sends: Arc<Mutex<Vec<Send>>>,
) -> tokio::task::JoinHandle<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true") // implies acks=all
        .set("message.timeout.ms", "5000")
        .set("linger.ms", "0")
        .create()
        .expect("zombie producer");
    tokio::spawn(async move {
        let mut seq = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let mut burst = Vec::new();
            for _ in 0..10 {
                seq += 1;
                let key = format!("k{}", seq % 7);
                let payload = format!("zombie-{seq}");
                let enqueued = Instant::now();
                let fut = producer.send_result(FutureRecord::to(TOPIC).key(&key).payload(&payload));
                burst.push((enqueued, fut.expect("queue never full here")));
            }
            for (enqueued, fut) in burst {
                let result = match fut.await {
                    Ok(Ok(d)) => Ok((d.partition, d.offset)),
                    Ok(Err((RdKafkaError::MessageProduction(code), _))) => Err(code),
                    Ok(Err((e, _))) => panic!("unexpected zombie error: {e}"),
                    Err(_) => panic!("zombie delivery future cancelled"),
                };
                sends.lock().unwrap().push(Send { enqueued, result });
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    })
}

/// The registered group's only member, on cluster `bootstrap`: records every
/// record it reads *before* committing past it (so "committed" implies
/// "consumed"), until `stop`.
fn spawn_reader(
    bootstrap: String,
    stop: Arc<AtomicBool>,
    consumed: Arc<Mutex<BTreeSet<(i32, i64)>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", GROUP)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("reader");
        consumer.subscribe(&[TOPIC]).expect("subscribe");
        while !stop.load(Ordering::SeqCst) {
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    consumed.lock().unwrap().insert((m.partition(), m.offset()));
                    consumer
                        .commit_message(&m, CommitMode::Sync)
                        .expect("commit");
                }
                Some(Err(e)) => panic!("reader: {e}"),
                None => {}
            }
        }
    })
}

/// a → b, drain a, and let the controller retire a while the zombie writes to a.
async fn scenario(fence: bool) -> Outcome {
    let kafka = KafkaFleet::start(2).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let cp = rdkafka_control_plane(&etcd, "fence", fence).await;
    for (i, id) in ["a", "b"].iter().enumerate() {
        add_active_cluster(&cp, id, kafka.cluster(i).bootstrap()).await;
    }
    cp.registry()
        .register_group(&GroupRecord {
            version: SCHEMA_VERSION,
            group: GROUP.into(),
            topics: vec![TOPIC.into()],
            created_at: now_millis(),
        })
        .await
        .unwrap();
    let route = |c: &str| SetRoute {
        topic: TOPIC.into(),
        clusters: vec![(c.to_string(), None)],
        partitions: Some(PARTITIONS),
        ack_timeout_ms: 1_000,
    };
    cp.set_route(route("a"), now_millis()).await.unwrap();
    let a = kafka.cluster(0).bootstrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sends = Arc::new(Mutex::new(Vec::new()));
    let consumed = Arc::new(Mutex::new(BTreeSet::new()));
    let zombie = spawn_zombie(a.clone(), stop.clone(), sends.clone());
    let reader = spawn_reader(a.clone(), stop.clone(), consumed.clone());
    // Let the zombie get acknowledgements and the group read some of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumed.lock().unwrap().len() < 20 {
        assert!(Instant::now() < deadline, "the group never read the zombie");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Move the topic off a (no registered producer: sealed at once), drain a.
    cp.set_route(route("b"), now_millis()).await.unwrap();
    let ctl = Controller::new(cp.clone());
    let r = ctl.reconcile_once(now_millis()).await.unwrap();
    assert_eq!(r.sealed, vec![(TOPIC.to_string(), 2)], "{r:?}");
    cp.drain("a").await.unwrap();
    // The controller retires a; the zombie keeps writing all along.
    let mut fenced_at = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let consumed_at_retirement = loop {
        assert!(Instant::now() < deadline, "a never retired");
        let r = ctl.reconcile_once(now_millis()).await.unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
        if !r.fenced.is_empty() {
            assert_eq!(r.fenced, vec![("a".into(), vec![TOPIC.into()])], "{r:?}");
            fenced_at.get_or_insert_with(Instant::now);
        }
        if r.retired == ["a".to_string()] {
            break consumed.lock().unwrap().clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The zombie goes on for a while after the retirement.
    let retired_at = Instant::now();
    let deadline = retired_at + Duration::from_secs(60);
    while sends
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.enqueued > retired_at)
        .count()
        < 30
    {
        assert!(
            Instant::now() < deadline,
            "the zombie stopped sending after the retirement"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    zombie.await.unwrap();
    tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    let sends = sends.lock().unwrap().clone();
    let acked = sends.iter().filter(|s| s.result.is_ok()).count();
    eprintln!(
        "fence {fence}: {} sends, {acked} acknowledged, {} failed; the group had read {} records at the retirement",
        sends.len(),
        sends.len() - acked,
        consumed_at_retirement.len()
    );
    if fence {
        // The fence is in the topic's config on a, for every later reader to see.
        let spec = cp.cluster("a").await.unwrap();
        let admin = ClusterAdmin::connect(
            &spec,
            &KafkaProperties::new(),
            &SecurityProfiles::empty(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(admin.is_write_fenced(TOPIC).await.unwrap(), Some(true));
    }
    Outcome {
        sends,
        consumed_at_retirement,
        fenced_at,
    }
}

/// Acknowledged records the group had not consumed when the cluster retired:
/// with the cluster torn down they would be lost.
fn lost(o: &Outcome) -> Vec<(i32, i64)> {
    o.sends
        .iter()
        .filter_map(|s| s.result.ok())
        .filter(|r| !o.consumed_at_retirement.contains(r))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_cannot_get_a_record_acknowledged_after_the_fence() {
    let o = scenario(true).await;
    let fenced_at = o.fenced_at.expect("the controller reported no fence");
    let acked = o.sends.iter().filter(|s| s.result.is_ok()).count();
    let after_fence: Vec<&Send> = o.sends.iter().filter(|s| s.enqueued > fenced_at).collect();
    // The scenario waits until the group has read 20 of the zombie's records
    // before it moves the topic: those were acknowledged before the fence
    // (how many more depends on how fast the controller fences).
    assert!(acked >= 20, "the zombie got only {acked} acks");
    assert!(
        !after_fence.is_empty(),
        "the zombie sent nothing after the fence"
    );
    // Every acknowledged record was read by the group before a retired.
    let lost = lost(&o);
    assert!(
        lost.is_empty(),
        "acked but not consumed before retirement: {lost:?}"
    );
    // Every send after the fence failed at the producer, as the broker refused it.
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for s in &after_fence {
        match s.result {
            Ok(r) => panic!("a send after the fence was acknowledged at {r:?}"),
            Err(code) => *errors.entry(format!("{code:?}")).or_default() += 1,
        }
    }
    assert_eq!(
        errors.keys().collect::<Vec<_>>(),
        ["MessageSizeTooLarge"],
        "{errors:?}"
    );
}

/// The control: the same scenario without the fence loses acknowledged
/// records (the zombie's writes after the drained check), so the test above
/// can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_fence_a_zombie_loses_acknowledged_records() {
    let o = scenario(false).await;
    assert!(o.fenced_at.is_none());
    assert!(
        !lost(&o).is_empty(),
        "no acknowledged record landed after the retirement: {} sends",
        o.sends.len()
    );
}
