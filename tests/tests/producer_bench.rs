//! Producer benchmarks on real etcd and real Kafka. Ignored by default; run in
//! release mode, one at a time (they share the 2 cores):
//!
//! - `fleet_producer_vs_future_producer_throughput`: throughput of
//!   `FleetProducer` vs a raw rdkafka `FutureProducer` on the same real
//!   single-node Kafka cluster (1M records of 100 bytes per round, 10 000
//!   keys), and of a raw `FutureProducer` sending one header like the epoch
//!   header; all created and warmed up once, rounds rotating the order and
//!   the topics; ratios of the sums and median of the per-round ratios; plus the client's CPU time per record (getrusage of
//!   this process, which does not include the broker), the figure least
//!   disturbed by other load on the machine.
//! - `switch_pause_under_load`: several producers under continuous load while
//!   a topic's route switches N times between two clusters (A → A+B → B →
//!   A+B → A ...), each switch driven as the controller does it; the hold of
//!   every producer in every switch (the `flotilla_producer_hold_seconds`
//!   histogram, captured by a recording `metrics` recorder) as p50/p99/max.
//!
//! ```text
//! FLOTILLA_KAFKA_JVM_OPTS='-Xms32m -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData -Djava.awt.headless=true' \
//!   flock /tmp/flotilla-bench.lock \
//!   cargo test --release -p flotilla-testkit --test producer_bench -- --ignored --nocapture --test-threads=1
//! ```
//!
//! `FLOTILLA_BENCH_TRACE=1` (with `RUST_LOG`, e.g.
//! `flotilla_client::producer=debug`) logs the producers' switch steps with
//! timestamps and the wall-clock time of every proposal.
//! `FLOTILLA_BENCH_WINDOW` bounds the deliveries a throughput round keeps
//! outstanding (default: all, everything sent before anything is awaited).
//! `FLOTILLA_BENCH_RECORDS`, `FLOTILLA_BENCH_ROUNDS`,
//! `FLOTILLA_BENCH_SWITCHES` and `FLOTILLA_BENCH_WARMUP_SWITCHES` override
//! the sizes. `FLOTILLA_BENCH_RATE` paces the switch-pause load to about
//! that many records/s in total
//! (default: as fast as the producers are acknowledged). Figures:
//! `docs/benchmarks.md`.

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/switch.rs"]
mod switch;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpu::{cpu_time, loadavg};
use fleet::open_route;
use flotilla_client::kafka::{ClusterAdmin, KafkaProperties, SecurityProfiles};
use flotilla_client::producer::EPOCH_HEADER;
use flotilla_client::registry::etcd::EtcdKv;
use flotilla_client::registry::{ClusterRole, ClusterSpec, ClusterState, Registry, SCHEMA_VERSION};
use flotilla_client::{FleetProducer, FleetProducerConfig};
use flotilla_testkit::{create_topic, EtcdServer, KafkaFleet};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use switch::{drive_switch, write_set, Producers};

/// Records per round (`FLOTILLA_BENCH_RECORDS` overrides).
const RECORDS: usize = 1_000_000;
/// Alternating measured rounds (`FLOTILLA_BENCH_ROUNDS` overrides).
const ROUNDS: usize = 5;
const KEYS: usize = 10_000;
const PARTITIONS: u32 = 4;
const PROPS: [(&str, &str); 4] = [
    ("linger.ms", "5"),
    ("enable.idempotence", "true"),
    ("queue.buffering.max.messages", "2000000"),
    ("message.timeout.ms", "60000"),
];

/// Deliveries a round keeps outstanding before it awaits the oldest
/// (`FLOTILLA_BENCH_WINDOW`; default: all of them, send everything first).
fn window() -> usize {
    env_or("FLOTILLA_BENCH_WINDOW", usize::MAX - 1)
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|k| format!("key-{k:06}")).collect()
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One measured run: wall time and client CPU time.
#[derive(Clone, Copy)]
struct Run {
    wall: Duration,
    cpu: Duration,
}

/// Raw `FutureProducer`; `header`: give every record a header like
/// flotilla's epoch header (same name, a one-digit value), to separate what
/// the header costs in librdkafka from what flotilla's own code costs.
async fn raw(
    p: &FutureProducer,
    header: bool,
    records: usize,
    topic: &str,
    keys: &[String],
    value: &[u8],
) -> Run {
    let cpu = cpu_time();
    let started = Instant::now();
    let window = window();
    let mut futs = VecDeque::with_capacity(records.min(window + 1));
    for i in 0..records {
        let mut rec = FutureRecord::to(topic).key(&keys[i % KEYS]).payload(value);
        if header {
            rec = rec.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                key: EPOCH_HEADER,
                value: Some("1"),
            }));
        }
        futs.push_back(p.send_result(rec).map_err(|(e, _)| e).unwrap());
        if futs.len() > window {
            let f = futs.pop_front().expect("window is not empty");
            f.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
    for f in futs {
        f.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    Run {
        wall: started.elapsed(),
        cpu: cpu_time() - cpu,
    }
}

async fn fleet(
    p: &FleetProducer,
    records: usize,
    topic: &str,
    keys: &[String],
    value: &[u8],
) -> Run {
    let cpu = cpu_time();
    let started = Instant::now();
    let window = window();
    let mut futs = VecDeque::with_capacity(records.min(window + 1));
    for i in 0..records {
        let rec = FutureRecord::to(topic).key(&keys[i % KEYS]).payload(value);
        futs.push_back(p.send_result(rec).map_err(|(e, _)| e).unwrap());
        if futs.len() > window {
            let f = futs.pop_front().expect("window is not empty");
            f.await.map_err(|(e, _)| e).unwrap();
        }
    }
    for f in futs {
        f.await.map_err(|(e, _)| e).unwrap();
    }
    Run {
        wall: started.elapsed(),
        cpu: cpu_time() - cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn fleet_producer_vs_future_producer_throughput() {
    let etcd = EtcdServer::start().expect("start etcd");
    let kafka = tokio::task::spawn_blocking(|| KafkaFleet::start(1).expect("start Kafka"))
        .await
        .unwrap();
    let bootstrap = kafka.cluster(0).bootstrap();
    let kv = EtcdKv::connect(&[etcd.endpoint()], Default::default())
        .await
        .unwrap();
    let reg = Registry::new(Arc::new(kv), "bench");
    reg.create_cluster(&ClusterSpec {
        version: SCHEMA_VERSION,
        id: "A".into(),
        bootstrap: bootstrap.clone(),
        kafka_cluster_id: kafka.cluster(0).kafka_cluster_id().into(),
        state: ClusterState::Active,
        role: ClusterRole::Permanent,
        weight: 100,
        labels: BTreeMap::new(),
        security_profile: None,
        created_at: 0,
    })
    .await
    .unwrap();
    let topics: Vec<String> = (0..6).map(|i| format!("bench-{i}")).collect();
    for t in &topics {
        create_topic(&bootstrap, t, PARTITIONS as i32)
            .await
            .unwrap();
        open_route(&reg, t, PARTITIONS, &["A"]).await;
    }
    let mut cfg = FleetProducerConfig::new();
    for (k, v) in PROPS {
        cfg.set(k, v);
    }
    let fp = FleetProducer::connect(&[etcd.endpoint().as_str()], "bench", cfg)
        .await
        .unwrap();
    // Both producers are created once and warmed up (connections, metadata,
    // the JIT of the broker) before anything is measured.
    let mut raw_cfg = ClientConfig::new();
    raw_cfg.set("bootstrap.servers", &bootstrap);
    for (k, v) in PROPS {
        raw_cfg.set(k, v);
    }
    let rp: FutureProducer = raw_cfg.create().unwrap();
    let records = env_or("FLOTILLA_BENCH_RECORDS", RECORDS);
    let rounds = env_or("FLOTILLA_BENCH_ROUNDS", ROUNDS);
    let keys = keys();
    let value = vec![b'x'; 100];
    eprintln!("load average before warm-up: {}", loadavg());
    const NAMES: [&str; 3] = ["FutureProducer", "FutureProducer+header", "FleetProducer"];
    let run = |who: usize, topic: usize| {
        let (rp, fp, keys, value, topic) = (&rp, &fp, &keys, &value, &topics[topic]);
        async move {
            match who {
                0 => raw(rp, false, records, topic, keys, value).await,
                1 => raw(rp, true, records, topic, keys, value).await,
                _ => fleet(fp, records, topic, keys, value).await,
            }
        }
    };
    for who in 0..3 {
        run(who, who).await;
    }
    let rate = |r: Run| records as f64 / r.wall.as_secs_f64();
    let us = |r: Run| r.cpu.as_secs_f64() * 1e6 / records as f64;
    let mut sums = [0.0f64; 3];
    let mut cpu = [Duration::ZERO; 3];
    let mut ratios = Vec::new();
    for round in 0..rounds {
        // Rotate the order (who goes first) and the topics every round.
        let mut got = [None; 3];
        for pos in 0..3 {
            let who = (pos + round) % 3;
            got[who] = Some(run(who, 3 + pos).await);
        }
        let got = got.map(Option::unwrap);
        for who in 0..3 {
            sums[who] += rate(got[who]);
            cpu[who] += got[who].cpu;
        }
        ratios.push(rate(got[2]) / rate(got[0]));
        eprintln!(
            "round {round}: {}; FleetProducer / FutureProducer {:.3}; load {}",
            (0..3)
                .map(|w| format!(
                    "{} {:.0} rec/s ({:.2} s, {:.2} us CPU/rec)",
                    NAMES[w],
                    rate(got[w]),
                    got[w].wall.as_secs_f64(),
                    us(got[w])
                ))
                .collect::<Vec<_>>()
                .join(", "),
            rate(got[2]) / rate(got[0]),
            loadavg()
        );
    }
    let per_rec = |d: Duration| d.as_secs_f64() * 1e6 / (records * rounds) as f64;
    eprintln!(
        "{rounds} rounds x {records} x 100 B: sum {} {:.0}, {} {:.0}, {} {:.0} rec/s; FleetProducer / FutureProducer: ratio of sums {:.3}, median round ratio {:.3}; FleetProducer / FutureProducer+header {:.3}; client CPU per record {} {:.2} us, {} {:.2} us, {} {:.2} us; load {}",
        NAMES[0],
        sums[0],
        NAMES[1],
        sums[1],
        NAMES[2],
        sums[2],
        sums[2] / sums[0],
        median(ratios),
        sums[2] / sums[1],
        NAMES[0],
        per_rec(cpu[0]),
        NAMES[1],
        per_rec(cpu[1]),
        NAMES[2],
        per_rec(cpu[2]),
        loadavg()
    );
    fp.close(Duration::from_secs(10)).await.unwrap();
}

// ---- switch pause under load ------------------------------------------------------------

const PAUSE_FLEET: &str = "pausebench";
const PAUSE_PRODUCERS: usize = 3;
const PAUSE_KEYS_PER_PRODUCER: usize = 1000;
/// Switches (`FLOTILLA_BENCH_SWITCHES` overrides). Each gives one hold per
/// producer, and the holds of one switch move together (they wait for the
/// same broker): with 200 switches the p99 of the 600 holds is the sixth
/// largest, an estimate of the tail rather than the single slowest switch
/// (with 40 it was the second largest of 120, i.e. about the slowest of 40).
const SWITCHES: usize = 200;
/// Unmeasured switches first (`FLOTILLA_BENCH_WARMUP_SWITCHES` overrides):
/// one round of the plan, so each kind of transition has run once. The
/// first switches of a fresh fleet are the slowest (the brokers' JIT has
/// not compiled the list-offsets path, the producers' new-cluster paths are
/// cold): in five 200-switch runs, switches 2 and 3 were among the six
/// slowest in four.
const WARMUP_SWITCHES: usize = 4;

/// A global `metrics` recorder keeping every sample of
/// `flotilla_producer_hold_seconds` (everything else is a no-op).
mod holds {
    use std::sync::{Arc, Mutex, OnceLock};

    use metrics::{
        Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString,
        Unit,
    };

    pub type Samples = Arc<Mutex<Vec<f64>>>;

    struct Cell(Samples);

    impl HistogramFn for Cell {
        fn record(&self, v: f64) {
            self.0.lock().unwrap().push(v);
        }
    }

    struct Rec(Samples);

    impl Recorder for Rec {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            if key.name() == "flotilla_producer_hold_seconds" {
                Histogram::from_arc(Arc::new(Cell(self.0.clone())))
            } else {
                Histogram::noop()
            }
        }
    }

    /// The samples, once this recorder is the global one.
    pub fn samples() -> Samples {
        static S: OnceLock<Samples> = OnceLock::new();
        S.get_or_init(|| {
            let s: Samples = Default::default();
            metrics::set_global_recorder(Rec(s.clone())).expect("install the recorder");
            s
        })
        .clone()
    }
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(what: &str, v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!(
        "{what}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        s.len(),
        pct(&s, 50.0) * 1e3,
        pct(&s, 99.0) * 1e3,
        s[s.len() - 1] * 1e3
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn switch_pause_under_load() {
    if std::env::var_os("FLOTILLA_BENCH_TRACE").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    const TOPIC: &str = "pause";
    let samples = holds::samples();
    let switches = std::env::var("FLOTILLA_BENCH_SWITCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SWITCHES);
    let warmup = env_or("FLOTILLA_BENCH_WARMUP_SWITCHES", WARMUP_SWITCHES);
    let etcd = EtcdServer::start().expect("start etcd");
    let kafka = tokio::task::spawn_blocking(|| KafkaFleet::start(2).expect("start Kafka"))
        .await
        .unwrap();
    let kv = EtcdKv::connect(&[etcd.endpoint()], Default::default())
        .await
        .unwrap();
    let reg = Registry::new(Arc::new(kv), PAUSE_FLEET);
    let mut admins = HashMap::new();
    for (i, id) in ["A", "B"].iter().enumerate() {
        let c = kafka.cluster(i);
        create_topic(&c.bootstrap(), TOPIC, PARTITIONS as i32)
            .await
            .unwrap();
        let s = ClusterSpec {
            version: SCHEMA_VERSION,
            id: id.to_string(),
            bootstrap: c.bootstrap(),
            kafka_cluster_id: c.kafka_cluster_id().into(),
            state: ClusterState::Active,
            role: ClusterRole::Permanent,
            weight: 100,
            labels: BTreeMap::new(),
            security_profile: None,
            created_at: 0,
        };
        reg.create_cluster(&s).await.unwrap();
        let admin = ClusterAdmin::connect(
            &s,
            &KafkaProperties::new(),
            &SecurityProfiles::empty(),
            Duration::from_secs(15),
        )
        .await
        .unwrap();
        // What `flotilla cluster activate` does before a cluster takes
        // traffic (a fresh cluster fetches its first producer ids).
        admin.ensure_group_coordinator().await.unwrap();
        admin.ensure_producer_ids().await.unwrap();
        // Warm the admin (connection, metadata) as a running controller's is.
        admin.end_offsets(TOPIC, PARTITIONS).await.unwrap();
        admins.insert(id.to_string(), admin);
    }
    open_route(&reg, TOPIC, PARTITIONS, &["A"]).await;
    let endpoint = etcd.endpoint();
    let mut producers = Vec::new();
    for i in 0..PAUSE_PRODUCERS {
        let mut c = FleetProducerConfig::new();
        c.client_id(format!("pause-{i}"))
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .lease_ttl(Duration::from_secs(3));
        producers.push(
            FleetProducer::connect(&[endpoint.as_str()], PAUSE_FLEET, c)
                .await
                .expect("start producer"),
        );
    }
    // Continuous load: each producer sends its keys round after round
    // (100-byte values), awaiting each round before the next; with
    // `FLOTILLA_BENCH_RATE`, a round starts no earlier than its share of
    // that rate allows.
    let rate = env_or("FLOTILLA_BENCH_RATE", 0);
    let round_every = (rate > 0).then(|| {
        Duration::from_secs_f64((PAUSE_PRODUCERS * PAUSE_KEYS_PER_PRODUCER) as f64 / rate as f64)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(0u64));
    let mut loads = Vec::new();
    for (pi, p) in producers.iter().enumerate() {
        let (p, stop, sent) = (p.clone(), stop.clone(), sent.clone());
        loads.push(tokio::spawn(async move {
            let keys: Vec<String> = (0..PAUSE_KEYS_PER_PRODUCER)
                .map(|k| format!("p{pi}-k{k}"))
                .collect();
            let value = vec![b'x'; 100];
            let mut pace = round_every.map(|every| {
                let mut t = tokio::time::interval(every);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = pace.as_mut() {
                    t.tick().await;
                }
                let futs: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        p.send_result(FutureRecord::to(TOPIC).key(k).payload(&value))
                            .map_err(|(e, _)| e)
                            .expect("enqueue")
                    })
                    .collect();
                for f in futs {
                    f.await.map_err(|(e, _)| e).expect("delivered");
                }
                *sent.lock().unwrap() += keys.len() as u64;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plan = [
        write_set(&["A", "B"]),
        write_set(&["B"]),
        write_set(&["A", "B"]),
        write_set(&["A"]),
    ];
    let mut started = Instant::now();
    let mut sent_before = *sent.lock().unwrap();
    let (mut acked, mut sealed, mut held) = (Vec::new(), Vec::new(), Vec::new());
    let (mut reading, mut casing) = (Vec::new(), Vec::new());
    eprintln!("load average at the first switch: {}", loadavg());
    for i in 0..warmup + switches {
        if i == warmup {
            started = Instant::now();
            sent_before = *sent.lock().unwrap();
        }
        let before = samples.lock().unwrap().len();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        if std::env::var_os("FLOTILLA_BENCH_TRACE").is_some() {
            eprintln!("switch {} proposed at unix {wall:.3}", i + 1);
        }
        let d = drive_switch(
            &reg,
            TOPIC,
            PARTITIONS,
            plan[i % plan.len()].clone(),
            &admins,
            Producers::Exactly(PAUSE_PRODUCERS),
            Duration::from_millis(2),
        )
        .await;
        // Every producer routes with the new epoch (and has recorded its hold).
        let deadline = Instant::now() + Duration::from_secs(10);
        while producers
            .iter()
            .any(|p| p.routing_epoch(TOPIC) != Some(d.epoch))
        {
            assert!(Instant::now() < deadline, "producers never released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mine: Vec<f64> = samples.lock().unwrap()[before..].to_vec();
        eprintln!(
            "{}switch {} -> epoch {}: acked after {:.1} ms, boundary read after {:.1} ms, sealed after {:.1} ms, holds {:?} ms",
            if i < warmup { "(warm-up) " } else { "" },
            i + 1,
            d.epoch,
            d.acked.as_secs_f64() * 1e3,
            d.boundary.as_secs_f64() * 1e3,
            d.sealed.as_secs_f64() * 1e3,
            mine.iter()
                .map(|h| (h * 1e4).round() / 10.0)
                .collect::<Vec<_>>()
        );
        if i >= warmup {
            acked.push(d.acked.as_secs_f64());
            reading.push((d.boundary - d.acked).as_secs_f64());
            casing.push((d.sealed - d.boundary).as_secs_f64());
            sealed.push(d.sealed.as_secs_f64());
            held.extend(mine);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed();
    let acked_rate = (*sent.lock().unwrap() - sent_before) as f64 / elapsed.as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    assert!(
        held.len() >= switches * PAUSE_PRODUCERS,
        "{} hold samples for {switches} switches x {PAUSE_PRODUCERS} producers",
        held.len()
    );
    eprintln!(
        "{switches} switches (after {warmup} unmeasured), {PAUSE_PRODUCERS} producers x {PAUSE_KEYS_PER_PRODUCER} keys, load {acked_rate:.0} rec/s acknowledged during the switches ({})",
        if rate > 0 { format!("paced to {rate} rec/s") } else { "unpaced".to_string() }
    );
    eprintln!(
        "{}",
        summary("producer hold (flotilla_producer_hold_seconds)", &held)
    );
    eprintln!("{}", summary("driver: proposal -> all acked", &acked));
    eprintln!(
        "{}",
        summary("driver: all acked -> boundary read", &reading)
    );
    eprintln!(
        "{}",
        summary("driver: boundary read -> sealed (CAS)", &casing)
    );
    eprintln!("{}", summary("driver: proposal -> sealed", &sealed));
    eprintln!("load average at the end: {}", loadavg());
    for p in &producers {
        p.close(Duration::from_secs(5)).await.unwrap();
    }
}
