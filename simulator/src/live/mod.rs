//! Live mode: the simulator's workload and checker against a *real* fleet.
//!
//! [`run`] starts etcd and N single-node KRaft Kafka clusters with the test
//! harness (`flotilla-testkit`), then runs for real what the simulated world
//! models: `FleetProducer`s sending keyed records with per-key sequence
//! numbers, a group of `FleetConsumer`s committing after processing, the
//! real controller in-process under leader election through etcd, an
//! operator switching routes A → A+B → B → B+C … through the control-plane
//! library and draining the clusters it leaves, and a nemesis that SIGKILLs
//! and restarts Kafka clusters and etcd (Jepsen-style, bounded in time).
//! After the active phase everything is healed, the producers stop and the
//! run waits (with a deadline) for the group to catch up and the switches to
//! complete. The history is checked with the simulator's own rules
//! ([`crate::checker`], via [`record::Recorder::check`]) and summarised with
//! the simulator's [`Summary`].
//!
//! The *schedule* comes from the seed ([`schedule::plan`]); the run itself
//! is real time against real processes, so it is **not** deterministic: the
//! same seed gives the same plan, not the same history.

pub mod record;
pub mod schedule;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_client::consumer::{FleetConsumeError, FleetConsumer, FleetConsumerConfig};
use flotilla_client::kafka::{KafkaProperties, SecurityProfiles};
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{ClusterRole, ClusterState, Registry, RegistryError};
use flotilla_client::{FleetProducer, FleetProducerConfig};
use flotilla_control::controller::{now_millis, run_elected, ElectionOptions, Leadership};
use flotilla_control::{
    AddCluster, ControlError, ControlPlane, Controller, RdKafkaFleet, SetRoute,
};
use flotilla_testkit::{create_topic, EtcdServer, HarnessError, KafkaFleet};
use rdkafka::consumer::CommitMode;
use rdkafka::message::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::report::Summary;
use crate::world::{RunResult, Stats, GROUP, TOPIC};
pub use record::{Checked, Delivered, EndState, Event, Recorder};
pub use schedule::{parse_faults, plan, LiveFault, Plan, PlannedFault};

/// The registry fleet name of live runs.
pub const FLEET: &str = "live";
/// The producers' `message.timeout.ms`: long enough that records for a
/// killed cluster wait for its restart instead of failing; also the
/// controller's late grace.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Producers' time to acknowledge a proposed epoch.
const ACK_TIMEOUT_MS: u64 = 10_000;

/// Shape of a live run.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Kafka clusters started (each a single-node KRaft cluster).
    pub clusters: usize,
    /// `FleetProducer`s.
    pub producers: usize,
    /// `FleetConsumer`s in the group.
    pub consumers: usize,
    /// Keys per producer (one writer per key).
    pub keys_per_producer: u32,
    /// Each key sends its next record this long after the previous one was
    /// acknowledged.
    pub pace: Duration,
    /// Partitions of the topic on every cluster.
    pub partitions: u32,
    /// Traffic, switches and faults last this long.
    pub active: Duration,
    /// Route switches planned (at most [`schedule::max_switches`]).
    pub switches: usize,
    /// Fault kinds; each strikes once per started minute of `active`.
    pub faults: Vec<LiveFault>,
    /// Seed of the schedule.
    pub seed: u64,
    /// After healing, how long to wait for the group to catch up and the
    /// switches to complete before checking anyway.
    pub catch_up: Duration,
    /// Extra rdkafka properties for every producer (e.g. `reconnect.backoff.max.ms`).
    pub producer_props: Vec<(String, String)>,
    /// Print progress lines on stderr as they happen.
    pub verbose: bool,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            clusters: 3,
            producers: 2,
            consumers: 2,
            keys_per_producer: 25,
            pace: Duration::from_millis(500),
            partitions: 4,
            active: Duration::from_secs(120),
            switches: 4,
            faults: LiveFault::ALL.to_vec(),
            seed: 0,
            catch_up: Duration::from_secs(90),
            producer_props: Vec::new(),
            verbose: true,
        }
    }
}

/// Why a live run could not run (anomalies are not errors: see [`LiveResult`]).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The configuration cannot work.
    #[error("bad live configuration: {0}")]
    Config(String),
    /// The harness could not start or restart a server.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// Setting up the fleet in the registry failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The registry could not be reached at start-up.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A producer could not start.
    #[error("producer: {0}")]
    Producer(String),
    /// A consumer could not start.
    #[error("consumer: {0}")]
    Consumer(String),
    /// A blocking harness call panicked or was cancelled.
    #[error("harness task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A route switch as the operator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchDone {
    /// The epoch it opened.
    pub epoch: u64,
    /// Its write set (cluster indices).
    pub write: Vec<u16>,
    /// From proposal to the epoch seen open.
    pub took: Duration,
    /// Producers whose ack was missing when the epoch was first seen open
    /// (the controller sealed without them after the ack timeout).
    pub late: Vec<String>,
}

/// A fault as the nemesis injected it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultDone {
    /// What.
    pub what: LiveFault,
    /// Which cluster (for [`LiveFault::KillCluster`]).
    pub cluster: Option<u16>,
    /// Killed at, from the start of traffic.
    pub at: Duration,
    /// From the kill until the restart returned (ready again).
    pub down: Duration,
}

/// The outcome of a live run.
#[derive(Debug, Clone)]
pub struct LiveResult {
    /// The schedule's seed.
    pub seed: u64,
    /// The plan the seed gave.
    pub plan: Plan,
    /// Time to start etcd and the clusters.
    pub startup: Duration,
    /// Whole run, start-up included.
    pub wall: Duration,
    /// The check of the history.
    pub checked: Checked,
    /// Switches completed.
    pub switches: Vec<SwitchDone>,
    /// Faults injected.
    pub faults: Vec<FaultDone>,
    /// Clusters retired by the controller (indices).
    pub retired: Vec<u16>,
    /// Whether the group caught up and the switches completed before the deadline.
    pub caught_up: bool,
    /// Timestamped progress lines.
    pub log: Vec<String>,
    /// The recorded history (e.g. to re-check it altered).
    pub recorder: Arc<Recorder>,
}

impl LiveResult {
    /// Whether the checker found nothing.
    pub fn ok(&self) -> bool {
        self.checked.anomalies.is_empty()
    }

    /// The run as a simulator [`RunResult`] (for [`Summary`]): the "virtual"
    /// time is the wall time.
    pub fn run_result(&self) -> RunResult {
        let mut faults = std::collections::BTreeMap::new();
        for f in &self.faults {
            *faults.entry(f.what.sim_fault()).or_insert(0) += 1;
        }
        let c = &self.checked;
        RunResult {
            seed: self.seed,
            sim_ms: self.wall.as_millis() as u64,
            anomalies: c.anomalies.clone(),
            trace_hash: 0,
            trace: self.log.clone(),
            stats: Stats {
                events: c.events,
                records: c.records,
                acked: c.acked,
                consumed: c.consumed,
                stragglers: c.stragglers,
                deduped: 0,
                failed: c.failed,
                switches: self
                    .switches
                    .iter()
                    .map(|s| (s.epoch, s.took.as_millis() as u64))
                    .collect(),
                holds: Vec::new(),
                aborted: 0,
                clusters: 0,
                retired: self.retired.len() as u64,
                faults,
                // Fields the simulated world measures and a live run does not.
                ..Stats::default()
            },
        }
    }

    /// The simulator's summary of this run, plus the live-only lines.
    pub fn summary(&self) -> String {
        let mut sum = Summary::default();
        sum.add(&self.run_result());
        let mut s = String::from(
            "mode:             live (real etcd + Kafka, real time: not deterministic)\n",
        );
        s.push_str(&sum.text());
        let c = &self.checked;
        let _ = writeln!(
            s,
            "live:             {} of {} acknowledged records delivered; {} redelivered after an unconfirmed commit; {} failed sends",
            c.acked_consumed, c.acked, c.redelivered, c.failed
        );
        let _ = writeln!(
            s,
            "switches:         {} of {} planned completed ({} sealed without every producer's ack); clusters retired: {}",
            self.switches.len(),
            self.plan.switches.len(),
            self.switches.iter().filter(|s| !s.late.is_empty()).count(),
            if self.retired.is_empty() {
                "none".to_string()
            } else {
                self.retired
                    .iter()
                    .map(|c| format!("c{c}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        );
        for f in &self.faults {
            let _ = writeln!(
                s,
                "fault:            {}{} at {:.1} s, down {:.1} s",
                f.what,
                f.cluster.map(|c| format!(" c{c}")).unwrap_or_default(),
                f.at.as_secs_f64(),
                f.down.as_secs_f64()
            );
        }
        let _ = writeln!(
            s,
            "wall time:        {:.1} s (start-up {:.1} s){}",
            self.wall.as_secs_f64(),
            self.startup.as_secs_f64(),
            if self.caught_up {
                ""
            } else {
                "; did NOT catch up before the deadline"
            }
        );
        for a in self.checked.anomalies.list.iter().take(20) {
            let _ = writeln!(s, "  ! {} at {} ms: {}", a.kind, a.at, a.detail);
        }
        s
    }

    /// A Markdown report: the summary and the progress log.
    pub fn markdown(&self) -> String {
        format!(
            "# flotilla-sim live report\n\n- seed: {}\n- plan: switches at {:?}, faults {:?}\n\n## Summary\n\n```text\n{}```\n\n## Log\n\n```text\n{}\n```\n",
            self.seed,
            self.plan.switches,
            self.plan.faults,
            self.summary(),
            self.log.join("\n")
        )
    }
}

/// Timestamped progress lines, echoed to stderr when verbose.
#[derive(Clone)]
struct Log {
    t0: Instant,
    lines: Arc<Mutex<Vec<String>>>,
    verbose: bool,
}

impl Log {
    fn say(&self, msg: impl AsRef<str>) {
        let line = format!(
            "[{:>6.1} s] {}",
            self.t0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
        if self.verbose {
            eprintln!("{line}");
        }
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }

    fn take(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn cluster_name(i: u16) -> String {
    format!("c{i}")
}

fn cluster_index(name: &str) -> u16 {
    name.strip_prefix('c')
        .and_then(|n| n.parse().ok())
        .unwrap_or(u16::MAX)
}

/// Runs one live session; see the module docs. Needs a multi-threaded tokio
/// runtime (consumers commit synchronously, the harness blocks).
pub async fn run(cfg: &LiveConfig) -> Result<LiveResult, LiveError> {
    if cfg.clusters < 2 && cfg.switches > 0 {
        return Err(LiveError::Config(
            "switches need at least 2 clusters".into(),
        ));
    }
    if cfg.switches > schedule::max_switches(cfg.clusters) {
        return Err(LiveError::Config(format!(
            "{} clusters allow at most {} switches (A → A+B → B → …; a drained cluster never comes back)",
            cfg.clusters,
            schedule::max_switches(cfg.clusters)
        )));
    }
    if cfg.producers == 0 || cfg.consumers == 0 || cfg.keys_per_producer == 0 {
        return Err(LiveError::Config(
            "need producers, keys and consumers".into(),
        ));
    }
    let t0 = Instant::now();
    let log = Log {
        t0,
        lines: Arc::default(),
        verbose: cfg.verbose,
    };
    let plan = schedule::plan(cfg.seed, cfg.active, cfg.switches, &cfg.faults);
    log.say(format!(
        "seed {}: switches at {:?}; faults {:?}",
        cfg.seed,
        plan.switches,
        plan.faults
            .iter()
            .map(|f| format!("{} at {:?} for {:?}", f.what, f.at, f.down))
            .collect::<Vec<_>>()
    ));

    // ------------------------------------------------------------ servers
    let n = cfg.clusters;
    let etcd = tokio::task::spawn_blocking(EtcdServer::start).await??;
    let fleet = tokio::task::spawn_blocking(move || KafkaFleet::start(n)).await??;
    let endpoint = etcd.endpoint();
    let bootstraps = fleet.bootstraps();
    let etcd = Arc::new(Mutex::new(etcd));
    let fleet = Arc::new(Mutex::new(fleet));
    let startup = t0.elapsed();
    log.say(format!("etcd {endpoint} and {n} Kafka clusters up"));
    let outcome = drive(cfg, &plan, &log, &endpoint, &bootstraps, &etcd, &fleet).await;
    // Stop the servers off the runtime threads (drop kills and waits).
    tokio::task::spawn_blocking(move || {
        drop(fleet);
        drop(etcd);
    })
    .await?;
    let (checked, switches, faults, retired, caught_up, recorder) = outcome?;
    let wall = t0.elapsed();
    Ok(LiveResult {
        seed: cfg.seed,
        plan,
        startup,
        wall,
        checked,
        switches,
        faults,
        retired,
        caught_up,
        log: log.take(),
        recorder,
    })
}

type Outcome = (
    Checked,
    Vec<SwitchDone>,
    Vec<FaultDone>,
    Vec<u16>,
    bool,
    Arc<Recorder>,
);

/// Everything between the servers' start and their stop.
async fn drive(
    cfg: &LiveConfig,
    plan: &Plan,
    log: &Log,
    endpoint: &str,
    bootstraps: &[String],
    etcd: &Arc<Mutex<EtcdServer>>,
    fleet: &Arc<Mutex<KafkaFleet>>,
) -> Result<Outcome, LiveError> {
    for b in bootstraps {
        create_topic(b, TOPIC, cfg.partitions as i32).await?;
    }
    let kv = EtcdKv::connect(&[endpoint.to_string()], EtcdOptions::default()).await?;
    let kafka = RdKafkaFleet::new(
        KafkaProperties::new(),
        SecurityProfiles::empty(),
        Duration::from_secs(10),
    );
    let cp = ControlPlane::new(Registry::new(Arc::new(kv), FLEET), Arc::new(kafka));
    let registry = cp.registry().clone();
    for (i, b) in bootstraps.iter().enumerate() {
        let req = AddCluster {
            id: cluster_name(i as u16),
            bootstrap: b.clone(),
            weight: 100,
            role: ClusterRole::Permanent,
            labels: Default::default(),
            security_profile: None,
            activate: true,
        };
        cp.add_cluster(req, now_millis()).await?;
    }
    cp.set_route(route_req(cfg, &schedule::write_set(0)), now_millis())
        .await?;

    // ------------------------------------------------------------ controller
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (lead_tx, mut lead_rx) = watch::channel(Leadership::Follower);
    let controller = Controller::new(cp.clone()).with_late_grace(MESSAGE_TIMEOUT);
    let opts = ElectionOptions {
        id: "flotilla-sim-live".into(),
        lease_ttl: Duration::from_secs(2),
        interval: Duration::from_millis(100),
    };
    let controller_task = tokio::spawn(run_elected(controller, opts, lead_tx, shutdown_rx));
    {
        let log = log.clone();
        tokio::spawn(async move {
            while lead_rx.changed().await.is_ok() {
                let now = *lead_rx.borrow();
                log.say(format!("controller: {now:?}"));
            }
        });
    }

    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));

    // ------------------------------------------------------------ consumers
    let mut members = Vec::new();
    for m in 0..cfg.consumers {
        let config = FleetConsumerConfig::new(registry.clone())
            .set("group.id", GROUP)
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .client_id(format!("live-consumer-{m}"))
            .poll_interval(Duration::from_millis(100))
            .connect_timeout(Duration::from_secs(5));
        let c = FleetConsumer::new(config)
            .await
            .map_err(|e| LiveError::Consumer(e.to_string()))?;
        c.subscribe(&[TOPIC])
            .map_err(|e| LiveError::Consumer(e.to_string()))?;
        members.push(spawn_member(c, m as u16, rec.clone(), log.clone()));
    }

    // ------------------------------------------------------------ producers
    let mut producers = Vec::new();
    let mut key_tasks: Vec<(u16, JoinHandle<()>)> = Vec::new();
    for p in 0..cfg.producers {
        let mut pc = FleetProducerConfig::new();
        pc.registry(registry.clone())
            .client_id(format!("live-producer-{p}"))
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            );
        for (k, v) in &cfg.producer_props {
            pc.set(k.clone(), v.clone());
        }
        let producer = Arc::new(
            FleetProducer::new(pc)
                .await
                .map_err(|e| LiveError::Producer(e.to_string()))?,
        );
        let k0 = p as u32 * cfg.keys_per_producer;
        for k in k0..k0 + cfg.keys_per_producer {
            let spread = cfg.pace * (k - k0) / cfg.keys_per_producer;
            key_tasks.push((
                p as u16,
                tokio::spawn(key_loop(
                    producer.clone(),
                    p as u16,
                    k,
                    spread,
                    cfg.pace,
                    rec.clone(),
                    stop.clone(),
                )),
            ));
        }
        producers.push(producer);
    }
    let traffic_start = Instant::now();
    let active_end = traffic_start + cfg.active;
    log.say(format!(
        "traffic: {} producers x {} keys every {:?}, {} consumers",
        cfg.producers, cfg.keys_per_producer, cfg.pace, cfg.consumers
    ));

    // ------------------------------------------------------------ operator
    let switches = Arc::new(Mutex::new(Vec::new()));
    let operator = tokio::spawn(operator(
        cp.clone(),
        cfg.clone(),
        plan.switches.clone(),
        traffic_start,
        active_end,
        switches.clone(),
        log.clone(),
    ));

    // ------------------------------------------------------------ retirements
    let retired = Arc::new(Mutex::new(BTreeSet::new()));
    let watcher = {
        let (registry, rec, retired, log) =
            (registry.clone(), rec.clone(), retired.clone(), log.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(snap) = registry.snapshot().await {
                    for (id, spec) in &snap.clusters {
                        if spec.state == ClusterState::Retired
                            && retired.lock().unwrap().insert(cluster_index(id))
                        {
                            rec.retired(cluster_index(id));
                            log.say(format!("{id} retired by the controller"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // ------------------------------------------------------------ nemesis
    let faults_done = Arc::new(Mutex::new(Vec::new()));
    let mut nemeses = Vec::new();
    for kind in &cfg.faults {
        let mine: Vec<PlannedFault> = plan
            .faults
            .iter()
            .filter(|f| f.what == *kind)
            .cloned()
            .collect();
        nemeses.push(tokio::spawn(nemesis(
            mine,
            cp.clone(),
            etcd.clone(),
            fleet.clone(),
            traffic_start,
            faults_done.clone(),
            log.clone(),
        )));
    }

    // ------------------------------------------------------------ heal, catch up
    tokio::time::sleep_until(active_end.into()).await;
    for t in nemeses {
        // Each nemesis restarts what it killed before it returns.
        t.await??;
    }
    log.say("active phase over, every server up: stopping the producers");
    stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + cfg.catch_up;
    let mut caught_up = false;
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        let producers_done = key_tasks.iter().all(|(_, t)| t.is_finished());
        let (acked, seen, _) = rec.progress();
        let pending = match cp.route(TOPIC).await {
            Ok(r) => r.pending_epoch().is_some(),
            Err(_) => true,
        };
        if producers_done && operator.is_finished() && !pending && acked == seen {
            caught_up = true;
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            log.say(format!(
                "catching up: {seen} of {acked} acknowledged delivered, producers done {producers_done}, switch pending {pending}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (acked, seen, deliveries) = rec.progress();
    log.say(format!(
        "{}: {seen} of {acked} acknowledged records delivered ({deliveries} deliveries)",
        if caught_up {
            "caught up"
        } else {
            "deadline passed"
        }
    ));

    // ------------------------------------------------------------ end state
    let mut end = EndState::default();
    for _ in 0..20 {
        if let Ok(r) = cp.route(TOPIC).await {
            end.route = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Ok(snap) = registry.snapshot().await {
        end.retired = snap
            .clusters
            .iter()
            .filter(|(_, s)| s.state == ClusterState::Retired)
            .map(|(id, _)| cluster_index(id))
            .collect();
    }
    let mut stuck: std::collections::BTreeMap<u16, usize> = Default::default();
    for (p, t) in &key_tasks {
        if !t.is_finished() {
            *stuck.entry(*p).or_default() += 1;
        }
    }
    for (p, producer) in producers.iter().enumerate() {
        let keys = stuck.get(&(p as u16)).copied().unwrap_or(0);
        let held = producer.held_records();
        if keys > 0 || held > 0 {
            end.stuck_producers.push((
                p as u16,
                format!("{held} records held, {keys} keys still waiting for a send at the end"),
            ));
        }
    }

    // ------------------------------------------------------------ shut down
    operator.abort();
    watcher.abort();
    for (_, t) in &key_tasks {
        t.abort();
    }
    for p in &producers {
        let _ =
            tokio::time::timeout(Duration::from_secs(15), p.close(Duration::from_secs(10))).await;
    }
    stop.store(true, Ordering::SeqCst);
    for m in members {
        m.stop.notify_one();
        if tokio::time::timeout(Duration::from_secs(30), m.task)
            .await
            .is_err()
        {
            log.say(format!("consumer {} did not close within 30 s", m.id));
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), controller_task).await;

    let checked = rec.check(&end);
    let switches = switches.lock().unwrap().clone();
    let faults = faults_done.lock().unwrap().clone();
    let retired: Vec<u16> = end.retired.iter().copied().collect();
    log.say(format!(
        "checked {} events: {} anomalies",
        checked.events,
        checked.anomalies.list.len()
    ));
    Ok((checked, switches, faults, retired, caught_up, rec))
}

fn route_req(cfg: &LiveConfig, write: &[u16]) -> SetRoute {
    SetRoute {
        topic: TOPIC.into(),
        clusters: write.iter().map(|c| (cluster_name(*c), None)).collect(),
        partitions: Some(cfg.partitions),
        ack_timeout_ms: ACK_TIMEOUT_MS,
    }
}

/// One key's writer: record `seq`, wait for its acknowledgement, pause, next.
/// A failed send is recorded as failed and the key moves on (as the
/// simulated producer gives up on a record), so sequence numbers only grow.
async fn key_loop(
    producer: Arc<FleetProducer>,
    p: u16,
    key: u32,
    spread: Duration,
    pace: Duration,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    tokio::time::sleep(spread).await;
    let key_bytes = format!("key-{key}");
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let rid = rec.created(key, seq, p);
        let payload = format!("k{key}:{seq}");
        let sent = producer
            .send(
                FutureRecord::to(TOPIC).key(&key_bytes).payload(&payload),
                Timeout::Never,
            )
            .await;
        match sent {
            Ok(d) => {
                rec.acked(
                    rid,
                    cluster_index(&d.cluster),
                    d.partition as u32,
                    d.offset,
                    d.epoch,
                );
                tokio::time::sleep(pace).await;
            }
            Err(_) => {
                rec.failed(rid);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        seq += 1;
    }
}

struct Member {
    id: u16,
    stop: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

/// A group member: receive → record → commit synchronously (a commit left
/// pending, or failing for 5 s, leaves the delivery unsettled).
fn spawn_member(c: FleetConsumer, id: u16, rec: Arc<Recorder>, log: Log) -> Member {
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut errors = 0u64;
        loop {
            let m = tokio::select! {
                _ = stopped.notified() => break,
                m = c.recv() => m,
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    errors += 1;
                    if errors.is_power_of_two() {
                        log.say(format!("consumer {id}: recv error #{errors}: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let parsed = m
                .payload()
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(parse_payload);
            let Some((key, seq)) = parsed else {
                log.say(format!(
                    "consumer {id}: unreadable record at {}/{}@{}",
                    m.cluster(),
                    m.partition(),
                    m.offset()
                ));
                continue;
            };
            let idx = rec.delivered(Delivered {
                key,
                seq,
                cluster: cluster_index(m.cluster()),
                partition: m.partition() as u32,
                offset: m.offset(),
                epoch: m.epoch(),
                straggler: m.is_straggler(),
                member: id,
            });
            let started = Instant::now();
            loop {
                match c.commit_message(&m, CommitMode::Sync) {
                    Ok(()) => {
                        rec.settled(idx);
                        break;
                    }
                    // Left the read set: unsettled (the group is past it, or
                    // the record comes again).
                    Err(FleetConsumeError::NotReading { .. }) => break,
                    // Queued and retried by the consumer until the cluster
                    // answers: carry on reading the others; unsettled, as
                    // the record may come again if the member loses the
                    // partition meanwhile.
                    Err(FleetConsumeError::CommitPending { .. }) => break,
                    // Not confirmed within 5 s (cluster down, membership
                    // lost): unsettled, it may be delivered again.
                    Err(_) if started.elapsed() > Duration::from_secs(5) => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        c.close().await;
    });
    Member { id, stop, task }
}

/// `k<key>:<seq>` → (key, seq).
fn parse_payload(s: &str) -> Option<(u32, u64)> {
    let (k, seq) = s.strip_prefix('k')?.split_once(':')?;
    Some((k.parse().ok()?, seq.parse().ok()?))
}

/// Proposes each planned switch at its time (or as soon as the previous one
/// completed), waits until the controller opened it, and drains the cluster
/// the switch left for good. Proposes nothing new after the active phase.
async fn operator(
    cp: ControlPlane,
    cfg: LiveConfig,
    at: Vec<Duration>,
    start: Instant,
    active_end: Instant,
    done: Arc<Mutex<Vec<SwitchDone>>>,
    log: Log,
) {
    for (i, when) in at.iter().enumerate() {
        tokio::time::sleep_until((start + *when).into()).await;
        if Instant::now() >= active_end {
            log.say(format!(
                "operator: switch {} not proposed (active phase over)",
                i + 1
            ));
            return;
        }
        let write = schedule::write_set(i + 1);
        let names: Vec<String> = write.iter().map(|c| cluster_name(*c)).collect();
        let asked = Instant::now();
        let mut errors = 0u32;
        let epoch = loop {
            match cp.set_route(route_req(&cfg, &write), now_millis()).await {
                Ok(out) => match out.route().pending_epoch() {
                    Some(e) => break e.n,
                    None => break out.route().open_epoch().map_or(0, |e| e.n),
                },
                Err(e) => {
                    errors += 1;
                    if errors == 1 || errors % 20 == 0 {
                        log.say(format!(
                            "operator: propose {} failed (#{errors}): {e}",
                            names.join("+")
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        log.say(format!(
            "operator: switch {} proposed: epoch {epoch} = {}{}",
            i + 1,
            names.join("+"),
            if asked.elapsed() > Duration::from_secs(1) {
                format!(
                    " ({:.1} s after the first attempt)",
                    asked.elapsed().as_secs_f64()
                )
            } else {
                String::new()
            }
        ));
        // The switch's cost is measured from the accepted proposal, as the
        // simulator's pause (proposal → seal).
        let proposed = Instant::now();
        // One snapshot holds the route and the producers' acks at one
        // revision: a producer whose ack is still below the epoch at the
        // first revision that shows it open was sealed out (late). Acks
        // written just after the seal can hide a late producer, so this is
        // a lower bound.
        let mut late = Vec::new();
        loop {
            if let Ok(snap) = cp.registry().snapshot().await {
                if let Some(r) = snap.routes.get(TOPIC) {
                    if r.open_epoch().is_some_and(|e| e.n >= epoch) {
                        late = snap
                            .producers()
                            .filter(|c| c.acked.get(TOPIC).copied().unwrap_or(0) < epoch)
                            .map(|c| c.id.clone())
                            .collect();
                        break;
                    }
                    if r.pending_epoch().is_none() && r.open_epoch().is_some_and(|e| e.n < epoch) {
                        log.say(format!("operator: epoch {epoch} was aborted"));
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = proposed.elapsed();
        log.say(format!(
            "operator: epoch {epoch} open after {:.2} s{}",
            took.as_secs_f64(),
            if late.is_empty() {
                String::new()
            } else {
                format!(", sealed without the ack of {}", late.join(", "))
            }
        ));
        done.lock().unwrap().push(SwitchDone {
            epoch,
            write: write.clone(),
            took,
            late,
        });
        // A → A+B adds; A+B → B leaves A for good: drain it (the controller
        // retires it once the group has read everything on it).
        let before = schedule::write_set(i);
        for c in before.iter().filter(|c| !write.contains(c)) {
            let name = cluster_name(*c);
            let mut tries = 0;
            loop {
                match cp.drain(&name).await {
                    Ok(_) => {
                        log.say(format!("operator: {name} draining"));
                        break;
                    }
                    Err(e) => {
                        tries += 1;
                        if tries == 1 {
                            log.say(format!("operator: drain {name} failed: {e}; retrying"));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
    }
}

/// Injects one kind of fault, one at a time, at the planned times; each
/// killed server is restarted before the next fault (and before returning).
async fn nemesis(
    faults: Vec<PlannedFault>,
    cp: ControlPlane,
    etcd: Arc<Mutex<EtcdServer>>,
    fleet: Arc<Mutex<KafkaFleet>>,
    start: Instant,
    done: Arc<Mutex<Vec<FaultDone>>>,
    log: Log,
) -> Result<(), LiveError> {
    let mut last_write: Vec<u16> = vec![0];
    for f in faults {
        tokio::time::sleep_until((start + f.at).into()).await;
        let at = start.elapsed();
        let cluster = match f.what {
            LiveFault::KillCluster => {
                if let Ok(Some(open)) = cp.route(TOPIC).await.map(|r| r.open_epoch().cloned()) {
                    last_write = open
                        .write
                        .iter()
                        .map(|w| cluster_index(&w.cluster))
                        .collect();
                }
                let c = last_write[f.pick as usize % last_write.len()];
                let fl = fleet.clone();
                tokio::task::spawn_blocking(move || {
                    fl.lock().unwrap().cluster_mut(c as usize).kill()
                })
                .await?;
                log.say(format!("nemesis: killed c{c} for {:?}", f.down));
                Some(c)
            }
            LiveFault::KillEtcd => {
                let e = etcd.clone();
                tokio::task::spawn_blocking(move || e.lock().unwrap().kill()).await?;
                log.say(format!("nemesis: killed etcd for {:?}", f.down));
                None
            }
        };
        let killed = Instant::now();
        tokio::time::sleep(f.down).await;
        let mut tries = 0;
        loop {
            let restarted = match cluster {
                Some(c) => {
                    let fl = fleet.clone();
                    tokio::task::spawn_blocking(move || {
                        fl.lock().unwrap().cluster_mut(c as usize).restart()
                    })
                    .await?
                }
                None => {
                    let e = etcd.clone();
                    tokio::task::spawn_blocking(move || e.lock().unwrap().restart()).await?
                }
            };
            match restarted {
                Ok(()) => break,
                Err(e) if tries < 3 => {
                    tries += 1;
                    log.say(format!("nemesis: restart failed ({e}); again"));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let down = killed.elapsed();
        log.say(format!(
            "nemesis: {} back after {:.1} s",
            cluster.map_or("etcd".to_string(), |c| format!("c{c}")),
            down.as_secs_f64()
        ));
        done.lock().unwrap().push(FaultDone {
            what: f.what,
            cluster,
            at,
            down,
        });
    }
    Ok(())
}
