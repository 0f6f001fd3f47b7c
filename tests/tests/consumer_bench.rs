//! `FleetConsumer` benchmarks on real etcd and real single-node Kafka clusters
//! (issue 5): consume throughput against a raw rdkafka `StreamConsumer`,
//! end-to-end produce→consume latency through flotilla against raw rdkafka,
//! and how long a new cluster's partitions wait behind the fence after a route
//! switch made under load. Ignored by default; run in release mode:
//!
//! ```text
//! cargo test --release -p flotilla-testkit --test consumer_bench -- --ignored --nocapture
//! ```
//!
//! The three benchmarks take a lock so they never run at the same time.
//! `FLOTILLA_BENCH_RT=current` runs them on a current-thread tokio runtime
//! (default: multi-thread, 2 workers). The throughput benchmark also reports
//! the (first) broker's CPU time per record and how much of the machine's
//! cores stayed idle, per round; with `FLOTILLA_BENCH_SCHED` set, also each
//! busy thread's share of the read running and waiting for a CPU.

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/switch.rs"]
mod switch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::open_route;
use flotilla_client::consumer::{FleetConsumeError, FleetConsumer, FleetConsumerConfig};
use flotilla_client::kafka::{ClusterAdmin, KafkaProperties, SecurityProfiles};
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{
    ClusterRole, ClusterSpec, ClusterState, KvStore, Registry, SCHEMA_VERSION,
};
use flotilla_client::{FleetProducer, FleetProducerConfig};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::{create_topic, KafkaFleet};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use switch::{drive_switch, write_set, Producers};

/// Throughput benchmark: a topic of 1 M records of 100 B (≈ 110 MB on the
/// wire), read with librdkafka's prefetch bounded to `PREFETCH_KB` per
/// consumer (both), so that a run measures fetching from the broker, not only
/// draining what librdkafka already holds in memory.
const RECORDS: usize = 1_000_000;
const KEYS: usize = 10_000;
const PARTITIONS: u32 = 4;
const VALUE: usize = 100;
const ROUNDS: usize = 10;
const PREFETCH_KB: &str = "16384";
/// Latency benchmark: records per second, seconds of measured traffic per
/// phase, and seconds of unmeasured warm-up per path before.
const LAT_RATE: u64 = 2_000;
const LAT_SECS: u64 = 10;
const LAT_WARMUP_SECS: u64 = 5;
/// Fence benchmark: records per second, number of switches, time between them.
const FENCE_RATE: u64 = 1_000;
const SWITCHES: usize = 8;
const SWITCH_EVERY: Duration = Duration::from_secs(3);
const PRODUCER_PROPS: [(&str, &str); 3] = [
    ("linger.ms", "5"),
    ("enable.idempotence", "true"),
    ("message.timeout.ms", "60000"),
];

/// The benchmarks share two cores: never run two at once.
static SERIAL: Mutex<()> = Mutex::new(());

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = if std::env::var("FLOTILLA_BENCH_RT").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    };
    b.enable_all().build().unwrap().block_on(f);
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|k| format!("key-{k:06}")).collect()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary_ms(samples: &mut [f64]) -> String {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        samples.len(),
        pct(samples, 50.0) * 1e3,
        pct(samples, 99.0) * 1e3,
        samples.last().copied().unwrap_or(f64::NAN) * 1e3
    )
}

/// A 100-byte payload: nanoseconds since `base` when sent, a sequence number
/// (`u64::MAX` for warm-up records), padding.
fn payload(base: Instant, seq: u64) -> Vec<u8> {
    let mut v = vec![b'x'; VALUE];
    v[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v
}

fn decode(p: &[u8]) -> (u64, u64) {
    (
        u64::from_le_bytes(p[..8].try_into().unwrap()),
        u64::from_le_bytes(p[8..16].try_into().unwrap()),
    )
}

struct Bench {
    registry: Registry,
    admins: HashMap<String, ClusterAdmin>,
    bootstraps: Vec<String>,
    // Dropped last: the clusters and etcd stop with the bench.
    _fleet: KafkaFleet,
    _etcd: EtcdServer,
}

/// etcd + `n` Kafka clusters registered as "a", "b", ...
async fn setup(n: usize) -> Bench {
    let etcd = EtcdServer::start().expect("etcd");
    let fleet = tokio::task::spawn_blocking(move || KafkaFleet::start(n).expect("kafka"))
        .await
        .unwrap();
    let kv: Arc<dyn KvStore> = Arc::new(
        EtcdKv::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .unwrap(),
    );
    let registry = Registry::new(kv, "bench");
    let mut admins = HashMap::new();
    let mut bootstraps = Vec::new();
    for i in 0..n {
        let id = ((b'a' + i as u8) as char).to_string();
        let spec = ClusterSpec {
            version: SCHEMA_VERSION,
            id: id.clone(),
            bootstrap: fleet.cluster(i).bootstrap(),
            kafka_cluster_id: fleet.cluster(i).kafka_cluster_id().to_string(),
            state: ClusterState::Active,
            role: ClusterRole::Permanent,
            weight: 100,
            labels: BTreeMap::new(),
            security_profile: None,
            created_at: 0,
        };
        let admin = ClusterAdmin::connect(
            &spec,
            &KafkaProperties::new(),
            &SecurityProfiles::empty(),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        // What `flotilla cluster activate` does before a cluster takes
        // traffic (a fresh cluster creates its offsets topic and fetches its
        // first producer ids).
        admin.ensure_group_coordinator().await.unwrap();
        admin.ensure_producer_ids().await.unwrap();
        registry.create_cluster(&spec).await.unwrap();
        admins.insert(id, admin);
        bootstraps.push(fleet.cluster(i).bootstrap());
    }
    Bench {
        registry,
        admins,
        bootstraps,
        _fleet: {
            if let Some(pid) = fleet.cluster(0).pid() {
                let _ = BROKER_PID.set(pid);
            }
            fleet
        },
        _etcd: etcd,
    }
}

impl Bench {
    /// Creates `topic` on every cluster, routed to `write` (epoch 1, open).
    async fn topic(&self, topic: &str, write: &[&str]) {
        for b in &self.bootstraps {
            create_topic(b, topic, PARTITIONS as i32).await.unwrap();
        }
        open_route(&self.registry, topic, PARTITIONS, write).await;
    }

    async fn fleet_producer(&self) -> FleetProducer {
        let mut pc = FleetProducerConfig::new();
        pc.registry(self.registry.clone());
        for (k, v) in PRODUCER_PROPS {
            pc.set(k, v);
        }
        FleetProducer::new(pc).await.expect("fleet producer")
    }

    async fn fleet_consumer(&self, group: &str) -> FleetConsumer {
        self.fleet_consumer_with(group, &[]).await
    }

    async fn fleet_consumer_with(&self, group: &str, props: &[(&str, &str)]) -> FleetConsumer {
        let mut cfg = FleetConsumerConfig::new(self.registry.clone()).set("group.id", group);
        for (k, v) in props {
            cfg = cfg.set(*k, *v);
        }
        FleetConsumer::new(cfg).await.expect("fleet consumer")
    }

    /// The controller's switch, by hand (DESIGN "Handoff protocol" 1-3):
    /// epoch N+1 pending, every live producer acks it, the end offsets of
    /// every cluster of N and N+1 become the fence, N is sealed and N+1
    /// opened. Returns N+1 and the instant the seal was written.
    async fn switch(&self, topic: &str, next: &[&str]) -> (u64, Instant) {
        let p = Producers::AtLeastOne;
        let poll = Duration::from_millis(5);
        let write = write_set(next);
        let s = drive_switch(
            &self.registry,
            topic,
            PARTITIONS,
            write,
            &self.admins,
            p,
            poll,
        )
        .await;
        (s.epoch, s.sealed_at)
    }
}

fn raw_producer(bootstrap: &str) -> FutureProducer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("queue.buffering.max.messages", "1000000");
    for (k, v) in PRODUCER_PROPS {
        cfg.set(k, v);
    }
    cfg.create().unwrap()
}

fn raw_consumer(bootstrap: &str, group: &str) -> StreamConsumer {
    raw_consumer_with(bootstrap, group, &[])
}

fn raw_consumer_with(bootstrap: &str, group: &str, props: &[(&str, &str)]) -> StreamConsumer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    for (k, v) in props {
        cfg.set(*k, *v);
    }
    cfg.create().unwrap()
}

/// Consumer properties of the throughput benchmark, for both consumers: a
/// bounded prefetch, and librdkafka's fetch back-off after the queue
/// thresholds were reached at the `FleetConsumer`'s default (10 ms; the
/// librdkafka default of 1 s makes the raw consumer idle for up to a second
/// whenever its queue filled, which made its figures bimodal).
const TPUT_PROPS: [(&str, &str); 2] = [
    ("queued.max.messages.kbytes", PREFETCH_KB),
    ("fetch.queue.backoff.ms", "10"),
];

/// [`TPUT_PROPS`] plus `FLOTILLA_BENCH_CONSUMER_PROPS` (`key=value,...`),
/// given to both contenders alike (to compare fetch settings).
fn tput_props() -> Vec<(String, String)> {
    let mut props: Vec<(String, String)> = TPUT_PROPS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(extra) = std::env::var("FLOTILLA_BENCH_CONSUMER_PROPS") {
        for kv in extra.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .expect("FLOTILLA_BENCH_CONSUMER_PROPS: key=value,...");
            props.push((k.to_string(), v.to_string()));
        }
    }
    props
}

fn as_refs(props: &[(String, String)]) -> Vec<(&str, &str)> {
    props
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Stands for an application's processing of a record: `WORK_PASSES`
/// FNV-1a passes over the payload (a couple of microseconds per record).
fn work(payload: &[u8], passes: u32) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..passes {
        for b in payload {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    std::hint::black_box(h)
}

/// Passes of [`work`] per record in the "with processing" rounds.
const WORK_PASSES: u32 = 16;
/// Rounds with processing (after the plain ones).
const WORK_ROUNDS: usize = 4;

/// One timed read of the whole topic.
#[derive(Clone, Copy)]
struct Timing {
    /// From creating the consumer to its first record.
    startup: Duration,
    /// From the first record to the last.
    wall: Duration,
    /// CPU time of this process (all threads) from the first record to the
    /// last: the client's cost, less disturbed by other load than `wall`.
    cpu: Duration,
    /// CPU time of the (first) broker's process over the same span.
    broker_cpu: Duration,
    /// Share of the machine's cores nobody used over the same span.
    idle: f64,
}

/// The broker whose CPU time the throughput benchmark reports.
static BROKER_PID: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// Counters read at a read's first record, turned into a [`Timing`] at its last.
struct Probe {
    /// Per-thread scheduling counters, with `FLOTILLA_BENCH_SCHED` set.
    sched: Option<BTreeMap<String, cpu::ThreadSched>>,
    at: Instant,
    cpu: Duration,
    broker_cpu: Duration,
    idle: (u64, u64),
}

impl Probe {
    fn start() -> Probe {
        Probe {
            sched: std::env::var_os("FLOTILLA_BENCH_SCHED").map(|_| cpu::thread_sched()),
            at: Instant::now(),
            cpu: cpu::cpu_time(),
            broker_cpu: BROKER_PID
                .get()
                .map_or(Duration::ZERO, |&p| cpu::process_cpu_time(p)),
            idle: cpu::machine_idle_ticks(),
        }
    }

    fn finish(self, started: Instant) -> Timing {
        if let Some(before) = &self.sched {
            eprintln!(
                "threads: {}",
                cpu::thread_sched_report(before, self.at.elapsed())
            );
        }
        let (idle, total) = cpu::machine_idle_ticks();
        let broker = BROKER_PID
            .get()
            .map_or(Duration::ZERO, |&p| cpu::process_cpu_time(p));
        Timing {
            startup: self.at - started,
            wall: self.at.elapsed(),
            cpu: cpu::cpu_time() - self.cpu,
            broker_cpu: broker.saturating_sub(self.broker_cpu),
            idle: (idle - self.idle.0) as f64 / (total - self.idle.1).max(1) as f64,
        }
    }
}

impl Timing {
    fn rate(&self) -> f64 {
        RECORDS as f64 / self.wall.as_secs_f64()
    }

    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / RECORDS as f64
    }

    fn broker_us(&self) -> f64 {
        self.broker_cpu.as_secs_f64() * 1e6 / RECORDS as f64
    }
}

async fn consume_raw(bootstrap: &str, topic: &str, group: &str, passes: u32) -> Timing {
    let started = Instant::now();
    let props = tput_props();
    let c = raw_consumer_with(bootstrap, group, &as_refs(&props));
    c.subscribe(&[topic]).unwrap();
    let mut first = None;
    let mut bytes = 0usize;
    for _ in 0..RECORDS {
        let m = c.recv().await.unwrap();
        first.get_or_insert_with(Probe::start);
        bytes += m.payload().map_or(0, |p| p.len());
        if passes > 0 {
            work(m.payload().unwrap_or_default(), passes);
        }
    }
    let timing = first.unwrap().finish(started);
    assert_eq!(bytes, RECORDS * VALUE);
    timing
}

async fn consume_fleet(b: &Bench, topic: &str, group: &str, passes: u32) -> Timing {
    let started = Instant::now();
    let props = tput_props();
    let c = b.fleet_consumer_with(group, &as_refs(&props)).await;
    c.subscribe(&[topic]).unwrap();
    let mut first = None;
    let mut bytes = 0usize;
    let mut n = 0;
    while n < RECORDS {
        match c.recv().await {
            Ok(m) => {
                first.get_or_insert_with(Probe::start);
                bytes += m.payload().map_or(0, |p| p.len());
                if passes > 0 {
                    work(m.payload().unwrap_or_default(), passes);
                }
                n += 1;
            }
            Err(e) => eprintln!("fleet consumer: {e}"),
        }
    }
    let timing = first.unwrap().finish(started);
    assert_eq!(bytes, RECORDS * VALUE);
    c.close().await;
    timing
}

/// Runs `rounds` rounds of one raw and one fleet read (alternating which goes
/// first) with `passes` of work per record, prints each round and a summary
/// (ratio of the sums of the read times, median of the per-round ratios,
/// CPU per record of each).
async fn compare(b: &Bench, topic: &str, label: &str, rounds: usize, passes: u32) {
    let mut raw = Vec::new();
    let mut fleet = Vec::new();
    for round in 0..rounds {
        let (rg, fg) = (
            format!("{label}raw-{round}"),
            format!("{label}fleet-{round}"),
        );
        let (r, f) = if round % 2 == 0 {
            let r = consume_raw(&b.bootstraps[0], topic, &rg, passes).await;
            let f = consume_fleet(b, topic, &fg, passes).await;
            (r, f)
        } else {
            let f = consume_fleet(b, topic, &fg, passes).await;
            let r = consume_raw(&b.bootstraps[0], topic, &rg, passes).await;
            (r, f)
        };
        eprintln!(
            "{label}round {round}: StreamConsumer {:.0} rec/s {:.2} us CPU/rec, broker {:.2} us/rec, \
             {:.0}% idle ({:?} to the first record), \
             FleetConsumer {:.0} rec/s {:.2} us CPU/rec, broker {:.2} us/rec, {:.0}% idle \
             ({:?} to the first record), ratio {:.2}",
            r.rate(),
            r.cpu_us(),
            r.broker_us(),
            r.idle * 100.0,
            r.startup,
            f.rate(),
            f.cpu_us(),
            f.broker_us(),
            f.idle * 100.0,
            f.startup,
            f.rate() / r.rate(),
        );
        raw.push(r);
        fleet.push(f);
    }
    let sum = |v: &[Timing], g: fn(&Timing) -> Duration| v.iter().map(g).sum::<Duration>();
    let (wall_raw, wall_fleet) = (sum(&raw, |t| t.wall), sum(&fleet, |t| t.wall));
    let (cpu_raw, cpu_fleet) = (sum(&raw, |t| t.cpu), sum(&fleet, |t| t.cpu));
    let n = (RECORDS * rounds) as f64;
    let mut ratios: Vec<f64> = raw
        .iter()
        .zip(&fleet)
        .map(|(r, f)| f.rate() / r.rate())
        .collect();
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = if rounds % 2 == 1 {
        ratios[rounds / 2]
    } else {
        (ratios[rounds / 2 - 1] + ratios[rounds / 2]) / 2.0
    };
    eprintln!(
        "{label}{rounds} rounds ({RECORDS} x {VALUE} B, {PARTITIONS} partitions, \
         properties {:?}, {passes} work passes/rec): \
         ratio of sums {:.3} (StreamConsumer {:.0} rec/s, FleetConsumer {:.0} rec/s); \
         per-round ratios {ratios:.2?} (median {median:.3}); \
         client CPU per record: StreamConsumer {:.3} us, FleetConsumer {:.3} us (ratio {:.3}); \
         broker CPU per record: {:.3} us, {:.3} us; machine idle: {:.1}%, {:.1}%; \
         load {}",
        tput_props(),
        wall_raw.as_secs_f64() / wall_fleet.as_secs_f64(),
        n / wall_raw.as_secs_f64(),
        n / wall_fleet.as_secs_f64(),
        cpu_raw.as_secs_f64() * 1e6 / n,
        cpu_fleet.as_secs_f64() * 1e6 / n,
        cpu_fleet.as_secs_f64() / cpu_raw.as_secs_f64(),
        sum(&raw, |t| t.broker_cpu).as_secs_f64() * 1e6 / n,
        sum(&fleet, |t| t.broker_cpu).as_secs_f64() * 1e6 / n,
        raw.iter().map(|t| t.idle).sum::<f64>() * 100.0 / rounds as f64,
        fleet.iter().map(|t| t.idle).sum::<f64>() * 100.0 / rounds as f64,
        cpu::loadavg(),
    );
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn fleet_consumer_vs_stream_consumer_throughput() {
    run(async {
        eprintln!("load average before: {}", cpu::loadavg());
        let b = setup(1).await;
        let topic = "tput";
        b.topic(topic, &["a"]).await;
        // Pre-fill with the raw producer.
        let p = raw_producer(&b.bootstraps[0]);
        let keys = keys();
        let value = vec![b'x'; VALUE];
        for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(100_000) {
            let mut futs = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let rec = FutureRecord::to(topic).key(&keys[i % KEYS]).payload(&value);
                futs.push(p.send_result(rec).map_err(|(e, _)| e).unwrap());
            }
            for f in futs {
                f.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
        drop(p);
        // Warm-up (not measured): the first group on a fresh broker creates
        // `__consumer_offsets`, and the JIT compiles the fetch path.
        consume_raw(&b.bootstraps[0], topic, "warm-raw", 0).await;
        consume_fleet(&b, topic, "warm-fleet", 0).await;
        compare(&b, topic, "", ROUNDS, 0).await;
        // With processing: the application does a little work per record.
        compare(&b, topic, "with processing: ", WORK_ROUNDS, WORK_PASSES).await;
    });
}

/// Sends `LAT_RATE` records/s: warm-up records until `ready`, then
/// `LAT_RATE * LAT_SECS` measured ones. `send` enqueues one record (payload,
/// sequence number) and returns its delivery future.
async fn paced<S, F>(ready: &AtomicBool, base: Instant, secs: u64, mut send: S) -> Vec<F>
where
    S: FnMut(Vec<u8>, u64) -> F,
{
    let total = LAT_RATE * secs;
    let per_tick = LAT_RATE / 1000;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut futs = Vec::with_capacity(total as usize + 10_000);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "consumer never started");
        tick.tick().await;
        futs.push(send(payload(base, u64::MAX), 0));
    }
    let mut seq = 0;
    while seq < total {
        tick.tick().await;
        for _ in 0..per_tick {
            futs.push(send(payload(base, seq), seq));
            seq += 1;
        }
    }
    futs
}

/// Reads until every measured record arrived; returns latencies in seconds.
async fn collect_latency<M, R>(
    ready: &AtomicBool,
    base: Instant,
    secs: u64,
    mut recv: R,
) -> Vec<f64>
where
    R: FnMut() -> M,
    M: std::future::Future<Output = Option<Vec<u8>>>,
{
    let total = LAT_RATE * secs;
    let mut seen = vec![false; total as usize];
    let mut lat = Vec::with_capacity(total as usize);
    while (lat.len() as u64) < total {
        let Some(p) = recv().await else { continue };
        let now = base.elapsed().as_nanos() as u64;
        ready.store(true, Ordering::SeqCst);
        let (sent, seq) = decode(&p);
        if seq == u64::MAX || seen[seq as usize] {
            continue;
        }
        seen[seq as usize] = true;
        lat.push(now.saturating_sub(sent) as f64 / 1e9);
    }
    lat
}

/// One latency phase through raw rdkafka (`FutureProducer` →
/// `StreamConsumer`) on a fresh topic: `secs` seconds of measured traffic.
async fn latency_raw(b: &Arc<Bench>, keys: &Arc<Vec<String>>, topic: &str, secs: u64) -> Vec<f64> {
    b.topic(topic, &["a"]).await;
    let base = Instant::now();
    let ready = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (b, ready, topic) = (b.clone(), ready.clone(), topic.to_string());
        tokio::spawn(async move {
            let c = raw_consumer(&b.bootstraps[0], &topic);
            c.subscribe(&[&topic]).unwrap();
            let c = &c;
            collect_latency(&ready, base, secs, move || async move {
                c.recv()
                    .await
                    .ok()
                    .and_then(|m| m.payload().map(<[u8]>::to_vec))
            })
            .await
        })
    };
    let p = raw_producer(&b.bootstraps[0]);
    let futs = paced(&ready, base, secs, |v, seq| {
        let k = &keys[seq as usize % KEYS];
        p.send_result(FutureRecord::to(topic).key(k).payload(&v))
            .map_err(|(e, _)| e)
            .unwrap()
    })
    .await;
    for f in futs {
        f.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    consumer.await.unwrap()
}

/// One latency phase through flotilla (`FleetProducer` → `FleetConsumer`)
/// on a fresh topic: `secs` seconds of measured traffic.
async fn latency_fleet(
    b: &Arc<Bench>,
    keys: &Arc<Vec<String>>,
    topic: &str,
    secs: u64,
) -> Vec<f64> {
    b.topic(topic, &["a"]).await;
    let base = Instant::now();
    let ready = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (b, ready, topic) = (b.clone(), ready.clone(), topic.to_string());
        tokio::spawn(async move {
            let c = b.fleet_consumer(&topic).await;
            c.subscribe(&[&topic]).unwrap();
            let cr = &c;
            let lat = collect_latency(&ready, base, secs, move || async move {
                cr.recv()
                    .await
                    .ok()
                    .and_then(|m| m.payload().map(<[u8]>::to_vec))
            })
            .await;
            c.close().await;
            lat
        })
    };
    let fp = b.fleet_producer().await;
    let futs = paced(&ready, base, secs, |v, seq| {
        let k = &keys[seq as usize % KEYS];
        fp.send_result(FutureRecord::to(topic).key(k).payload(&v))
            .map_err(|(e, _)| e)
            .unwrap()
    })
    .await;
    for f in futs {
        f.await.map_err(|(e, _)| e).unwrap();
    }
    let lat = consumer.await.unwrap();
    fp.close(Duration::from_secs(10)).await.unwrap();
    lat
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn end_to_end_latency_fleet_vs_raw() {
    run(async {
        let b = Arc::new(setup(1).await);
        let keys = Arc::new(keys());
        // Warm-up, not measured: the broker's JIT, `__consumer_offsets`.
        latency_raw(&b, &keys, "lat-warm-raw", LAT_WARMUP_SECS).await;
        latency_fleet(&b, &keys, "lat-warm-fleet", LAT_WARMUP_SECS).await;
        // Measured in the order raw, fleet, fleet, raw (ABBA), so that a
        // drift of the machine's load over the run hits both alike.
        let (mut raw, mut fleet) = (Vec::new(), Vec::new());
        for (i, is_raw) in [true, false, false, true].into_iter().enumerate() {
            let mut lat = if is_raw {
                latency_raw(&b, &keys, &format!("lat-raw-{i}"), LAT_SECS).await
            } else {
                latency_fleet(&b, &keys, &format!("lat-fleet-{i}"), LAT_SECS).await
            };
            let what = if is_raw {
                "FutureProducer -> StreamConsumer"
            } else {
                "FleetProducer -> FleetConsumer  "
            };
            let all = if is_raw { &mut raw } else { &mut fleet };
            all.extend_from_slice(&lat);
            eprintln!("phase {i}: {what}: {}", summary_ms(&mut lat));
        }
        eprintln!(
            "end-to-end latency at {LAT_RATE} rec/s, 2 x {LAT_SECS} s per path ({VALUE} B, linger.ms=5):\n  \
             FutureProducer -> StreamConsumer: {}\n  FleetProducer -> FleetConsumer:   {}",
            summary_ms(&mut raw),
            summary_ms(&mut fleet)
        );
    });
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn fence_wait_after_switch_under_load() {
    run(async {
        let b = setup(2).await;
        let topic = "fence";
        b.topic(topic, &["a"]).await;
        let base = Instant::now();

        // First delivery of each (epoch, partition): (delivered at, sent at),
        // both in nanoseconds since `base`.
        type Firsts = HashMap<(u64, i32), (u64, u64)>;
        let firsts: Arc<Mutex<Firsts>> = Arc::default();
        let delivered = Arc::new(AtomicU64::new(0));
        let consumer = {
            let c = b.fleet_consumer("fence").await;
            let (firsts, delivered) = (firsts.clone(), delivered.clone());
            tokio::spawn(async move {
                c.subscribe(&[topic]).unwrap();
                let mut seen = BTreeSet::new();
                loop {
                    let m = match c.recv().await {
                        Ok(m) => m,
                        Err(e) => {
                            eprintln!("fleet consumer: {e}");
                            continue;
                        }
                    };
                    let now = base.elapsed().as_nanos() as u64;
                    let (sent, seq) = decode(m.payload().unwrap());
                    if let Some(e) = m.epoch() {
                        firsts
                            .lock()
                            .unwrap()
                            .entry((e, m.partition()))
                            .or_insert((now, sent));
                    }
                    if seen.insert(seq) {
                        delivered.fetch_add(1, Ordering::SeqCst);
                    }
                    // Commit after processing, the ported pattern.
                    match c.commit_message(&m, CommitMode::Async) {
                        Ok(()) | Err(FleetConsumeError::NotReading { .. }) => {}
                        Err(e) => eprintln!("commit: {e}"),
                    }
                }
            })
        };

        let fp = Arc::new(b.fleet_producer().await);
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (fp, stop) = (fp.clone(), stop.clone());
            tokio::spawn(async move {
                let keys = keys();
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let mut futs = Vec::new();
                let mut seq = 0u64;
                let mut refused = 0;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    for _ in 0..FENCE_RATE / 1000 {
                        let v = payload(base, seq);
                        let k = &keys[seq as usize % KEYS];
                        match fp.send_result(FutureRecord::to(topic).key(k).payload(&v)) {
                            Ok(f) => futs.push(f),
                            Err((e, _)) => {
                                refused += 1;
                                if refused < 5 {
                                    eprintln!("send refused: {e}");
                                }
                            }
                        }
                        seq += 1;
                    }
                }
                let mut acked = 0u64;
                for f in futs {
                    if f.await.is_ok() {
                        acked += 1;
                    }
                }
                (seq, acked, refused)
            })
        };

        // Let the consumer join and the traffic settle, then switch a -> b ->
        // a -> ... while it flows.
        let deadline = Instant::now() + Duration::from_secs(60);
        while delivered.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "consumer never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(SWITCH_EVERY).await;
        let mut seals = Vec::new();
        for i in 0..SWITCHES {
            let next = if i % 2 == 0 { "b" } else { "a" };
            let proposed = Instant::now();
            let (n, sealed) = b.switch(topic, &[next]).await;
            seals.push((n, next, sealed, sealed - proposed));
            tokio::time::sleep(SWITCH_EVERY).await;
        }
        stop.store(true, Ordering::SeqCst);
        let (sent, acked, refused) = producer.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while delivered.load(Ordering::SeqCst) < acked {
            if Instant::now() > deadline {
                eprintln!(
                    "only {} of {acked} acknowledged records delivered",
                    delivered.load(Ordering::SeqCst)
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        consumer.abort();
        fp.close(Duration::from_secs(10)).await.unwrap();

        let firsts = firsts.lock().unwrap().clone();
        let (mut wait, mut hold, mut per_switch, mut switch_time) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut early = 0;
        for &(n, next, sealed, took) in &seals {
            let sealed_ns = (sealed - base).as_nanos() as i128;
            let mut worst = 0f64;
            for p in 0..PARTITIONS as i32 {
                let Some(&(at, sent_at)) = firsts.get(&(n, p)) else {
                    eprintln!("epoch {n} partition {p}: nothing delivered");
                    continue;
                };
                let w = (at as i128 - sealed_ns) as f64 / 1e9;
                if w < 0.0 {
                    early += 1;
                }
                wait.push(w.max(0.0));
                hold.push(at.saturating_sub(sent_at) as f64 / 1e9);
                worst = worst.max(w);
            }
            eprintln!(
                "switch to epoch {n} ({next}): propose->seal {took:?}, slowest partition \
                 delivered its first epoch-{n} record {:.1} ms after the seal",
                worst * 1e3
            );
            per_switch.push(worst);
            switch_time.push(took.as_secs_f64());
        }
        eprintln!(
            "fence wait over {SWITCHES} switches at {FENCE_RATE} rec/s ({sent} sent, {acked} acked, \
             {refused} refused, {} delivered, {early} delivered before the seal was written):\n  \
             seal -> first new-epoch record, per partition: {}\n  \
             seal -> first new-epoch record, slowest partition per switch: {}\n  \
             first new-epoch record sent -> delivered, per partition: {}\n  \
             propose -> seal (the switch itself): {}",
            delivered.load(Ordering::SeqCst),
            summary_ms(&mut wait),
            summary_ms(&mut per_switch),
            summary_ms(&mut hold),
            summary_ms(&mut switch_time),
        );
    });
}
