//! `flotilla backfill` on a real etcd and real Kafka clusters: one source
//! cluster, two temporary clusters, a `FleetConsumer` group reading the
//! target topic. Every record delivered exactly once and in per-key order,
//! across crashes of the command during replay and during the wait; bad
//! inputs refused with clear errors and nothing left that `abort` cannot undo.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_client::consumer::{FleetConsumer, FleetConsumerConfig};
use flotilla_client::registry::{ClusterRole, ClusterState, Registry};
use flotilla_control::backfill::{
    Backfill, BackfillError, BackfillOptions, Bound, Hook, HookPoint, Phase, ProgressMode,
    StartRequest,
};
use flotilla_control::controller::now_millis;
use flotilla_control::{ControlPlane, SetRoute};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::kafka::KafkaFleet;

mod support;
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use support::{add_active_cluster, rdkafka_control_plane};

const KEYS: u64 = 1_000;
const PARTITIONS: i32 = 4;

/// Timestamp of the first source record: an hour ago (history, but within
/// the source topic's retention).
fn base_ts() -> i64 {
    now_millis() as i64 - 3_600_000
}

fn records() -> u64 {
    std::env::var("FLOTILLA_BACKFILL_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

async fn control_plane(etcd: &EtcdServer, fleet: &str) -> ControlPlane {
    rdkafka_control_plane(etcd, fleet, true).await
}

fn options(hook: Option<Hook>) -> BackfillOptions {
    BackfillOptions {
        checkpoint_every: Duration::from_millis(500),
        batch: 2_000,
        wait_timeout: Some(Duration::from_secs(300)),
        teardown_timeout: Duration::from_secs(120),
        ack_timeout: Duration::from_secs(20),
        delivery_timeout: Duration::from_secs(10),
        progress: ProgressMode::Lines,
        hook,
        ..BackfillOptions::default()
    }
}

/// Writes `n` records (`KEYS` keys, payload `key:seq` padded to ~100 bytes,
/// a header per record) to `topic` at `bootstrap`.
async fn fill_source(bootstrap: &str, topic: &str, n: u64) {
    flotilla_testkit::kafka::create_topic(bootstrap, topic, PARTITIONS)
        .await
        .unwrap();
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    let base = base_ts();
    tokio::task::spawn_blocking(move || {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "200000")
            .create()
            .unwrap();
        let mut seq: HashMap<u64, u64> = HashMap::new();
        for i in 0..n {
            let k = i % KEYS;
            let s = seq.entry(k).or_default();
            let key = format!("k{k}");
            let payload = format!("{key}:{s:<90}");
            *s += 1;
            let hdrs = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "origin",
                value: Some("test"),
            });
            let mut rec = BaseRecord::to(&topic)
                .key(&key)
                .payload(&payload)
                .headers(hdrs)
                .timestamp(base + i as i64);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(60)).unwrap();
    })
    .await
    .unwrap();
}

/// What a consumer got: per key, the sequence numbers in delivery order.
#[derive(Default)]
struct Got {
    per_key: BTreeMap<String, Vec<u64>>,
    total: u64,
    src_headers: u64,
    origin_headers: u64,
    timestamps_ok: u64,
}

/// A `FleetConsumer` member of `group` reading `topic`, auto-committing.
fn spawn_consumer(
    registry: Registry,
    group: &str,
    topic: &str,
    got: Arc<Mutex<Got>>,
) -> tokio::task::JoinHandle<()> {
    let config = FleetConsumerConfig::new(registry)
        .set("group.id", group)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .poll_interval(Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(5));
    let topic = topic.to_string();
    let started_ts = base_ts() - 3_600_000;
    tokio::spawn(async move {
        let c = FleetConsumer::new(config).await.expect("start consumer");
        c.subscribe(&[&topic]).unwrap();
        loop {
            let msg = match c.recv().await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("consumer: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let payload = std::str::from_utf8(msg.payload().unwrap()).unwrap();
            let (key, seq) = payload.split_once(':').unwrap();
            let seq: u64 = seq.trim().parse().unwrap();
            let mut g = got.lock().unwrap();
            g.per_key.entry(key.to_string()).or_default().push(seq);
            if key.starts_with("live") {
                // Live traffic: only order and completeness are checked.
                continue;
            }
            g.total += 1;
            if let Some(h) = msg.headers() {
                use rdkafka::message::Headers;
                for h in h.iter() {
                    match h.key {
                        "flotilla-src" => g.src_headers += 1,
                        "origin" => g.origin_headers += 1,
                        _ => {}
                    }
                }
            }
            if msg
                .timestamp()
                .to_millis()
                .is_some_and(|t| t >= started_ts && t < started_ts + 7_200_000)
            {
                g.timestamps_ok += 1;
            }
        }
    })
}

/// A live `FleetProducer` writing `live<k>:<seq>` (50 keys) one record at a
/// time until `stop`; returns how many records of each key were acknowledged.
fn spawn_live_producer(
    registry: Registry,
    topic: &str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    use flotilla_client::producer::{FleetProducer, FleetProducerConfig, OwnedRecord};
    let topic = topic.to_string();
    tokio::spawn(async move {
        let mut cfg = FleetProducerConfig::new();
        cfg.registry(registry).set("linger.ms", "1");
        let p = FleetProducer::new(cfg).await.expect("live producer");
        let mut acked = vec![0u64; 50];
        let mut i = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let k = i % 50;
            let rec = OwnedRecord::to(&topic)
                .key(format!("live{k}"))
                .payload(format!("live{k}:{}", acked[k]));
            match p.send_owned(rec, Duration::from_secs(30)).await {
                Ok(_) => {
                    acked[k] += 1;
                    i += 1;
                }
                Err((e, _)) => eprintln!("live producer: {e}"),
            }
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        p.close(Duration::from_secs(10)).await.unwrap();
        acked
    })
}

/// Every acknowledged live record delivered exactly once, in per-key order.
async fn check_live(got: &Arc<Mutex<Got>>, sent: &[u64], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let missing: u64 = {
            let g = got.lock().unwrap();
            (0..sent.len())
                .map(|k| {
                    let have = g.per_key.get(&format!("live{k}")).map_or(0, Vec::len) as u64;
                    sent[k].saturating_sub(have)
                })
                .sum()
        };
        if missing == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let g = got.lock().unwrap();
    for (k, &n) in sent.iter().enumerate() {
        let seqs = g
            .per_key
            .get(&format!("live{k}"))
            .cloned()
            .unwrap_or_default();
        let want: Vec<u64> = (0..n).collect();
        assert_eq!(
            seqs, want,
            "live key {k}: exactly once, in order, across both switches"
        );
    }
}

/// Every record exactly once, per-key order kept, keys/headers/timestamps preserved.
fn check_exactly_once(got: &Got, n: u64) {
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..n {
        *expected.entry(format!("k{}", i % KEYS)).or_default() += 1;
    }
    assert_eq!(got.total, n, "records delivered (duplicates or losses)");
    for (k, count) in &expected {
        let seqs = got.per_key.get(k).map(Vec::as_slice).unwrap_or(&[]);
        let want: Vec<u64> = (0..*count).collect();
        assert_eq!(seqs, want.as_slice(), "key {k}: exactly once, in order");
    }
    assert_eq!(got.src_headers, n, "every record carries flotilla-src");
    assert_eq!(got.origin_headers, n, "user headers preserved");
    assert_eq!(got.timestamps_ok, n, "timestamps preserved");
}

/// Reads the whole target topic on every temporary cluster: every source
/// record exactly once (by its `flotilla-src` coordinates), per-key order kept
/// inside each partition. This is the backfill's own guarantee, independent
/// of the consumer group's delivery semantics.
async fn check_target(bootstraps: &[String], topic: &str, n: u64) -> u64 {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let mut seen: HashMap<(i32, i64), u32> = HashMap::new();
    let mut live = 0;
    for b in bootstraps {
        let c: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", b)
            .set("group.id", "check-target")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let meta = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let parts = meta.topics()[0].partitions().len() as i32;
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut ends = HashMap::new();
        for p in 0..parts {
            let (_, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            if high > 0 {
                tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                    .unwrap();
                ends.insert(p, high);
            }
        }
        if ends.is_empty() {
            continue;
        }
        c.assign(&tpl).unwrap();
        let mut last: HashMap<String, u64> = HashMap::new();
        while !ends.is_empty() {
            let m = tokio::time::timeout(Duration::from_secs(20), c.recv())
                .await
                .expect("target topic readable")
                .unwrap();
            let payload = std::str::from_utf8(m.payload().unwrap()).unwrap();
            let (key, seq) = payload.split_once(':').unwrap();
            let seq: u64 = seq.trim().parse().unwrap();
            if let Some(prev) = last.insert(key.to_string(), seq) {
                assert!(
                    seq > prev,
                    "{b}/{topic}: key {key} out of order ({prev} then {seq})"
                );
            }
            if ends
                .get(&m.partition())
                .is_some_and(|&e| m.offset() + 1 >= e)
            {
                ends.remove(&m.partition());
            }
            if key.starts_with("live") {
                live += 1;
                continue;
            }
            let src = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "flotilla-src")
                        .and_then(|h| h.value)
                })
                .and_then(flotilla_control::backfill::parse_src_header)
                .expect("flotilla-src header");
            *seen.entry(src).or_default() += 1;
        }
    }
    let dups = seen.values().filter(|&&c| c > 1).count();
    assert_eq!(dups, 0, "{topic}: source records copied twice");
    assert_eq!(seen.len() as u64, n, "{topic}: source records copied");
    live
}

async fn wait_total(got: &Arc<Mutex<Got>>, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while got.lock().unwrap().total < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer: duplicates would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Registry clean after a backfill: temp clusters retired, no pending epoch,
/// no live producer left behind.
async fn check_clean(cp: &ControlPlane, name: &str, temp: &[&str]) {
    let snap = cp.registry().snapshot().await.unwrap();
    for id in temp {
        let spec = snap.cluster(id).expect("temp cluster registered");
        assert_eq!(spec.state, ClusterState::Retired, "{id} retired");
        assert!(matches!(&spec.role, ClusterRole::Temporary { purpose, .. } if purpose == name));
    }
    for r in snap.routes.values() {
        assert!(
            r.pending_epoch().is_none(),
            "no switch left pending on {}",
            r.topic
        );
        if let Some(e) = r.open_epoch() {
            for id in temp {
                assert!(!e.writes_to(id), "{} still writes to {id}", r.topic);
            }
        }
    }
    assert_eq!(
        snap.producers()
            .filter(|p| p.id.starts_with("backfill-"))
            .count(),
        0,
        "no backfill producer left registered"
    );
}

fn start_request(
    name: &str,
    source: &str,
    target: &str,
    temp: &[(&str, String)],
    group: &str,
) -> StartRequest {
    StartRequest {
        name: name.into(),
        source: source.into(),
        from: Bound::Edge,
        to: Bound::Edge,
        target_topic: target.into(),
        clusters: temp
            .iter()
            .map(|(i, b)| (i.to_string(), b.clone()))
            .collect(),
        provision_cmd: None,
        count: 0,
        deprovision_cmd: None,
        groups: vec![group.into()],
        expires_in: Duration::from_secs(3600),
    }
}

/// In-process: source registered as a permanent cluster, target topic already
/// routed to it (the backfill switches it to the temporary clusters and back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_through_two_temporary_clusters_then_crash_and_resume() {
    let kafka = KafkaFleet::start(3).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let n = records();

    // ---- 1. the whole workflow, in process, with a previous route to restore.
    let cp = control_plane(&etcd, "main").await;
    add_active_cluster(&cp, "src", kafka.cluster(0).bootstrap()).await;
    fill_source(&kafka.cluster(0).bootstrap(), "history", n).await;
    cp.set_route(
        SetRoute {
            topic: "reprocess".into(),
            clusters: vec![("src".into(), Some(100))],
            partitions: Some(PARTITIONS as u32),
            ack_timeout_ms: 10_000,
        },
        now_millis(),
    )
    .await
    .unwrap();
    let got = Arc::new(Mutex::new(Got::default()));
    let consumer = spawn_consumer(cp.registry().clone(), "g-main", "reprocess", got.clone());
    // Live traffic on the target topic all along: it follows the route to the
    // temporary clusters and back, in per-key order.
    let stop_live = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let live = spawn_live_producer(cp.registry().clone(), "reprocess", stop_live.clone());
    let temp = [
        ("tmp1", kafka.cluster(1).bootstrap()),
        ("tmp2", kafka.cluster(2).bootstrap()),
    ];
    let bf = Backfill::new(cp.clone(), options(None));
    let started = Instant::now();
    let rec = bf
        .start(&start_request(
            "b1",
            "src:history",
            "reprocess",
            &temp,
            "g-main",
        ))
        .await
        .unwrap();
    eprintln!("backfill of {n} records took {:?}", started.elapsed());
    assert_eq!(rec.phase, Phase::Done);
    assert_eq!(rec.copied_records(), n);
    wait_total(&got, n, Duration::from_secs(60)).await;
    check_exactly_once(&got.lock().unwrap(), n);
    check_clean(&cp, "b1", &["tmp1", "tmp2"]).await;
    let temp_bootstraps = [kafka.cluster(1).bootstrap(), kafka.cluster(2).bootstrap()];
    let live_on_temp = check_target(&temp_bootstraps, "reprocess", n).await;
    assert!(
        live_on_temp > 0,
        "live traffic went through the temporary clusters"
    );
    let route = cp.route("reprocess").await.unwrap();
    let open = route.open_epoch().unwrap();
    assert_eq!(
        open.clusters().collect::<Vec<_>>(),
        vec!["src"],
        "route restored"
    );
    stop_live.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = live.await.unwrap();
    eprintln!("live traffic during the backfill: {sent:?}");
    check_live(&got, &sent, Duration::from_secs(60)).await;
    // Same name again: refused.
    let again = bf
        .start(&start_request(
            "b1",
            "src:history",
            "reprocess2",
            &[("tmp9", kafka.cluster(1).bootstrap())],
            "g",
        ))
        .await
        .unwrap_err();
    assert!(matches!(again, BackfillError::AlreadyExists(_)), "{again}");
    consumer.abort();

    // ---- 2. in-process crash during replay (hook), then resume.
    let cp = control_plane(&etcd, "crash").await;
    let got = Arc::new(Mutex::new(Got::default()));
    let consumer = spawn_consumer(
        cp.registry().clone(),
        "g-crash",
        "reprocess-crash",
        got.clone(),
    );
    let crash_at = n / 3;
    let hook: Hook =
        Arc::new(move |p: &HookPoint| matches!(p, HookPoint::Acked(k) if *k >= crash_at));
    let source = format!("{}:history", kafka.cluster(0).bootstrap());
    let req = start_request("b2", &source, "reprocess-crash", &temp, "g-crash");
    // No checkpoint after the first one: everything acknowledged before the
    // crash must be found by the dedupe scan.
    let mut opts = options(Some(hook));
    opts.checkpoint_every = Duration::from_secs(3600);
    let e = Backfill::new(cp.clone(), opts)
        .start(&req)
        .await
        .unwrap_err();
    assert!(matches!(e, BackfillError::InjectedCrash(_)), "{e}");
    let bf = Backfill::new(cp.clone(), options(None));
    let st = bf.status("b2").await.unwrap();
    assert_eq!(st.phase, Phase::Replaying);
    // Crash again when entering the wait.
    let hook: Hook = Arc::new(|p: &HookPoint| matches!(p, HookPoint::Phase(Phase::Waiting)));
    let e = Backfill::new(cp.clone(), options(Some(hook)))
        .resume("b2")
        .await
        .unwrap_err();
    assert!(matches!(e, BackfillError::InjectedCrash(_)), "{e}");
    assert_eq!(bf.status("b2").await.unwrap().phase, Phase::Waiting);
    let rec = bf.resume("b2").await.unwrap();
    assert_eq!(rec.phase, Phase::Done);
    eprintln!(
        "b2: {} duplicates skipped on resume",
        rec.skipped_duplicates
    );
    assert!(
        rec.skipped_duplicates >= crash_at,
        "acknowledged but not checkpointed records are found by the dedupe scan"
    );
    wait_total(&got, n, Duration::from_secs(60)).await;
    check_exactly_once(&got.lock().unwrap(), n);
    check_clean(&cp, "b2", &["tmp1", "tmp2"]).await;
    check_target(&temp_bootstraps, "reprocess-crash", n).await;
    assert!(
        cp.registry()
            .route("reprocess-crash")
            .await
            .unwrap()
            .is_none(),
        "the backfill's own route is gone"
    );
    let e = bf.resume("b2").await.unwrap_err();
    assert!(matches!(e, BackfillError::Finished { .. }), "{e}");
    consumer.abort();

    // ---- 3. the `flotilla` binary killed during replay and during the wait.
    let env = Cli {
        endpoint: etcd.endpoint(),
        fleet: "kill".into(),
    };
    let cp = control_plane(&etcd, "kill").await;
    let got = Arc::new(Mutex::new(Got::default()));
    let consumer = spawn_consumer(
        cp.registry().clone(),
        "g-kill",
        "reprocess-kill",
        got.clone(),
    );
    let clusters = format!(
        "tmp1={},tmp2={}",
        kafka.cluster(1).bootstrap(),
        kafka.cluster(2).bootstrap()
    );
    let crash_after = (n / 2).to_string();
    let out = env.run(&[
        "backfill",
        "start",
        "--name",
        "b3",
        "--source",
        &source,
        "--target-topic",
        "reprocess-kill",
        "--clusters",
        &clusters,
        "--group",
        "g-kill",
        "--checkpoint-every",
        "300ms",
        "--batch",
        "2000",
        "--progress",
        "lines",
        "--crash-after-records",
        &crash_after,
    ]);
    assert_eq!(
        out.status.code(),
        Some(86),
        "killed mid-replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = Backfill::new(cp.clone(), options(None))
        .status("b3")
        .await
        .unwrap();
    assert_eq!(st.phase, Phase::Replaying);
    let out = env.run(&[
        "backfill",
        "resume",
        "b3",
        "--progress",
        "lines",
        "--crash-at-phase",
        "waiting",
    ]);
    assert_eq!(
        out.status.code(),
        Some(86),
        "killed in the wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.run(&["backfill", "status", "b3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("phase waiting"), "{text}");
    let out = env.run(&["backfill", "resume", "b3", "--progress", "lines"]);
    assert!(
        out.status.success(),
        "resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_total(&got, n, Duration::from_secs(60)).await;
    check_exactly_once(&got.lock().unwrap(), n);
    check_clean(&cp, "b3", &["tmp1", "tmp2"]).await;
    check_target(&temp_bootstraps, "reprocess-kill", n).await;
    let out = env.run(&["--output", "json", "backfill", "status", "b3"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "done");
    eprintln!(
        "b3: {} duplicates skipped on resume",
        v["skipped_duplicates"]
    );
    consumer.abort();
}

struct Cli {
    endpoint: String,
    fleet: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "--endpoints",
                &self.endpoint,
                "--fleet",
                &self.fleet,
                "--timeout",
                "10s",
            ])
            .args(args)
            .env("FLOTILLA_LOG", "info")
            .output()
            .expect("run flotilla")
    }
}

/// Bad inputs: clear errors, nothing registered; a failed provision can be aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_and_failures_can_be_aborted() {
    let kafka = KafkaFleet::start(1).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let cp = control_plane(&etcd, "bad").await;
    let b0 = kafka.cluster(0).bootstrap();
    fill_source(&b0, "hist", 100).await;
    let bf = Backfill::new(cp.clone(), options(None));
    let kv = cp.registry().kv().clone();
    let temp = [("t1", b0.clone())];
    let refused = |e: BackfillError, want: &str| {
        let s = e.to_string();
        assert!(s.contains(want), "expected `{want}` in: {s}");
    };
    let before = kv.current_revision().await.unwrap();
    let mut req = start_request("x", &format!("{b0}:missing"), "out", &temp, "g");
    refused(
        bf.start(&req).await.unwrap_err(),
        "source topic `missing` does not exist",
    );
    req.source = format!("{b0}:hist");
    req.from = Bound::Offset(50);
    req.to = Bound::Offset(10);
    refused(bf.start(&req).await.unwrap_err(), "reversed");
    req.from = Bound::Offset(20);
    req.to = Bound::Offset(20);
    refused(bf.start(&req).await.unwrap_err(), "range is empty");
    req.from = Bound::Time(4_000_000_000_000);
    req.to = Bound::Edge;
    refused(bf.start(&req).await.unwrap_err(), "range is empty");
    req.from = Bound::Edge;
    req.source = "nosuchcluster:hist".into();
    refused(
        bf.start(&req).await.unwrap_err(),
        "neither a registered cluster",
    );
    req.source = format!("{b0}:hist");
    req.clusters.clear();
    refused(bf.start(&req).await.unwrap_err(), "no temporary clusters");
    assert_eq!(
        kv.current_revision().await.unwrap(),
        before,
        "refused starts write nothing"
    );
    assert!(bf.list().await.unwrap().is_empty());

    // A failing provision command: the backfill is registered (so it can be
    // aborted), nothing else is.
    req.name = "prov".into();
    req.provision_cmd = Some("echo 'no capacity left' >&2; exit 7".into());
    req.count = 2;
    let e = bf.start(&req).await.unwrap_err();
    refused(e, "no capacity left");
    let st = bf.status("prov").await.unwrap();
    assert_eq!(st.phase, Phase::Provisioning);
    assert!(st
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("provision command"));
    assert!(cp.registry().snapshot().await.unwrap().clusters.is_empty());
    let rec = bf.abort("prov").await.unwrap();
    assert_eq!(rec.phase, Phase::Aborted);
    let e = bf.resume("prov").await.unwrap_err();
    assert!(matches!(e, BackfillError::Finished { .. }), "{e}");

    // A provision command that works once, then a deprovision command: abort
    // during replay retires the cluster and deprovisions it.
    let marker = tempfile::tempdir().unwrap();
    let mark = marker.path().join("deprovisioned");
    req.name = "ab".into();
    req.provision_cmd = Some(format!("echo {b0}"));
    req.count = 1;
    req.target_topic = "out-ab".into();
    req.deprovision_cmd = Some(format!("echo >> {}", mark.display()));
    let hook: Hook = Arc::new(|p: &HookPoint| matches!(p, HookPoint::Phase(Phase::Replaying)));
    let e = Backfill::new(cp.clone(), options(Some(hook)))
        .start(&req)
        .await
        .unwrap_err();
    assert!(matches!(e, BackfillError::InjectedCrash(_)), "{e}");
    let rec = bf.abort("ab").await.unwrap();
    assert_eq!(rec.phase, Phase::Aborted);
    let spec = cp.cluster("ab-tmp1").await.unwrap();
    assert_eq!(spec.state, ClusterState::Retired);
    assert!(mark.exists(), "deprovision command ran");
    assert!(cp.registry().route("out-ab").await.unwrap().is_none());

    // One driver at a time: a second `resume` while one waits for a group
    // that never reads is refused; once the first is gone, `abort` works.
    req.name = "busy".into();
    req.provision_cmd = None;
    req.deprovision_cmd = None;
    req.clusters = vec![("busy1".into(), b0.clone())];
    req.target_topic = "out-busy".into();
    req.groups = vec!["nobody-reads".into()];
    let first = tokio::spawn({
        let bf = bf.clone();
        let req = req.clone();
        async move { bf.start(&req).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while bf.status("busy").await.map(|r| r.phase).ok() != Some(Phase::Waiting) {
        assert!(Instant::now() < deadline, "never reached the wait");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = bf.resume("busy").await.unwrap_err();
    assert!(matches!(e, BackfillError::Busy { .. }), "{e}");
    first.abort();
    let _ = first.await;
    let rec = bf.abort("busy").await.unwrap();
    assert_eq!(rec.phase, Phase::Aborted);
    assert_eq!(
        cp.cluster("busy1").await.unwrap().state,
        ClusterState::Retired
    );

    // The binary: clear errors, non-zero exit.
    let cli = Cli {
        endpoint: etcd.endpoint(),
        fleet: "bad".into(),
    };
    let out = cli.run(&[
        "backfill",
        "start",
        "--name",
        "cli",
        "--source",
        &format!("{b0}:missing"),
        "--target-topic",
        "o",
        "--clusters",
        &format!("c1={b0}"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: source topic `missing` does not exist"),
        "{err}"
    );
    let out = cli.run(&["backfill", "status", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backfill named `nosuch`"));
    let out = cli.run(&[
        "backfill",
        "start",
        "--name",
        "cli",
        "--source",
        "x:y",
        "--target-topic",
        "o",
        "--from",
        "soon",
        "--clusters",
        "c=h:1",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a range bound"));
}

/// A temporary cluster killed mid-replay stops the replay with an error;
/// `resume` after it is back finishes with every record exactly once. Then the
/// shipped provision / deprovision scripts drive a whole backfill through the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn temporary_cluster_dying_mid_replay_and_provision_scripts() {
    let mut kafka = KafkaFleet::start(2).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let n = records() / 4;
    let b0 = kafka.cluster(0).bootstrap();
    fill_source(&b0, "history", n).await;
    let source = format!("{b0}:history");

    // ---- a temporary cluster dies during the replay.
    let cp = control_plane(&etcd, "dies").await;
    let got = Arc::new(Mutex::new(Got::default()));
    let consumer = spawn_consumer(cp.registry().clone(), "g-dies", "out-dies", got.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let kill_at = n / 4;
    let hook: Hook = Arc::new(move |p: &HookPoint| {
        if matches!(p, HookPoint::Acked(k) if *k >= kill_at) {
            let _ = tx.send(());
        }
        false
    });
    let mut opts = options(Some(hook));
    opts.delivery_timeout = Duration::from_secs(5);
    opts.timeout = Duration::from_secs(5);
    let bf = Backfill::new(cp.clone(), opts);
    let req = start_request(
        "d1",
        &source,
        "out-dies",
        &[("tmp1", kafka.cluster(1).bootstrap())],
        "g-dies",
    );
    let run = tokio::spawn({
        let bf = bf.clone();
        async move { bf.start(&req).await }
    });
    rx.recv().await.unwrap();
    kafka.cluster_mut(1).kill();
    let e = run.await.unwrap().unwrap_err();
    eprintln!("replay with a dead temporary cluster: {e}");
    let st = bf.status("d1").await.unwrap();
    assert_eq!(st.phase, Phase::Replaying, "stopped in replay: {e}");
    assert!(st.last_error.is_some());
    kafka.cluster_mut(1).restart().expect("restart tmp1");
    let rec = Backfill::new(cp.clone(), options(None))
        .resume("d1")
        .await
        .unwrap();
    assert_eq!(rec.phase, Phase::Done);
    check_target(&[kafka.cluster(1).bootstrap()], "out-dies", n).await;
    check_clean(&cp, "d1", &["tmp1"]).await;
    // The consumer group lost its uncommitted position with the cluster:
    // it may see some records twice (at least once), never miss one.
    wait_total(&got, n, Duration::from_secs(90)).await;
    {
        let g = got.lock().unwrap();
        for i in 0..KEYS {
            let k = format!("k{i}");
            let seqs = g.per_key.get(&k).cloned().unwrap_or_default();
            let distinct: std::collections::BTreeSet<u64> = seqs.into_iter().collect();
            let want = n / KEYS + u64::from(i < n % KEYS);
            assert_eq!(
                distinct.len() as u64,
                want,
                "key {k}: every record delivered"
            );
        }
    }
    consumer.abort();

    // ---- provision and deprovision scripts, through the binary.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let fleet_bin = root.join("target/debug/flotilla-fleet");
    if !fleet_bin.exists() {
        eprintln!("skipping the provision-script part: build it with `cargo build -p flotilla-testkit --bin flotilla-fleet`");
        return;
    }
    let cp = control_plane(&etcd, "prov").await;
    let got = Arc::new(Mutex::new(Got::default()));
    let consumer = spawn_consumer(cp.registry().clone(), "g-prov", "out-prov", got.clone());
    let env = Cli {
        endpoint: etcd.endpoint(),
        fleet: "prov".into(),
    };
    let prov = root.join("scripts/provision-kafka");
    let deprov = root.join("scripts/deprovision-kafka");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "--endpoints",
            &env.endpoint,
            "--fleet",
            &env.fleet,
            "--timeout",
            "10s",
        ])
        .args([
            "backfill",
            "start",
            "--name",
            "p1",
            "--source",
            &source,
            "--target-topic",
            "out-prov",
        ])
        .args(["--provision-cmd", prov.to_str().unwrap(), "--count", "2"])
        .args([
            "--deprovision-cmd",
            deprov.to_str().unwrap(),
            "--group",
            "g-prov",
            "--progress",
            "lines",
        ])
        .env("FLOTILLA_FLEET_BIN", &fleet_bin)
        .env("FLOTILLA_LOG", "info")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backfill with provision scripts: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_total(&got, n, Duration::from_secs(60)).await;
    check_exactly_once(&got.lock().unwrap(), n);
    check_clean(&cp, "p1", &["p1-tmp1", "p1-tmp2"]).await;
    let rec = Backfill::new(cp.clone(), options(None))
        .status("p1")
        .await
        .unwrap();
    assert!(rec
        .clusters
        .iter()
        .all(|c| c.provisioned && c.deprovisioned));
    for c in &rec.clusters {
        let port = c.bootstrap.as_deref().unwrap().rsplit_once(':').unwrap().1;
        let state = root.join(format!(".cache/fleet/single/{port}.json"));
        assert!(!state.exists(), "{} deprovisioned", c.id);
    }
    consumer.abort();
}
