//! The simulated world: a virtual clock and event queue, Kafka clusters, a
//! registry with leases and delayed watches, and the actors around the real
//! routing core (producers with a [`Router`], consumers with a [`FenceGate`],
//! a controller and an operator). Single-threaded, no wall clock; every random
//! choice comes from one [`SmallRng`] seeded with the run's seed.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use flotilla_client::registry::{
    ClientKind, ClientRecord, ClusterRole, ClusterSpec, ClusterState, Epoch, EpochState,
    FleetSnapshot, GroupRecord, TopicRoute, WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::route::gate::{gated_by_route, prejoin_set, read_set, FenceGate, RecordClass};
use flotilla_client::route::router::{Action, Decision, Router, Settlement};
use flotilla_client::route::switch::{self, LateSeals, SwitchStep};
use flotilla_control::backfill::{parse_src_header, src_header_value};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::checker;
use crate::config::{Config, Fault, LeasePolicy};
use crate::history::{Anomalies, AnomalyKind, RecInfo};

/// The one simulated topic.
pub const TOPIC: &str = "events";
/// The target topic of the backfill ([`Config::backfills`]).
pub const BF_TOPIC: &str = "backfill";
/// The backfill's copy worker checkpoints after this many source positions.
const CHECKPOINT_EVERY: usize = 48;
/// The `producer` of a copy made by the backfill's copy worker.
const COPY_WORKER: u16 = u16::MAX;
/// The one simulated consumer group.
pub const GROUP: &str = "readers";
/// Records per produce request.
const BATCH: usize = 16;
/// A producer gives up on a record after this long (Kafka `delivery.timeout.ms`).
const DELIVERY_TIMEOUT_MS: u64 = 8_000;
/// The controller's `with_late_grace`: the producers' delivery timeout.
const LATE_GRACE_MS: u64 = DELIVERY_TIMEOUT_MS;

/// Counters and measurements of one run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Events processed.
    pub events: u64,
    /// Records created by producers.
    pub records: u64,
    /// Records acknowledged by Kafka.
    pub acked: u64,
    /// Deliveries to the group.
    pub consumed: u64,
    /// Allowed stragglers written.
    pub stragglers: u64,
    /// Appends removed by idempotence.
    pub deduped: u64,
    /// Records the producers gave up on (or that could not be routed).
    pub failed: u64,
    /// Sealed switches: (epoch opened, pause in ms from proposal to seal).
    pub switches: Vec<(u64, u64)>,
    /// How long producers held a topic (each hold, ms): the pause seen by
    /// the application.
    pub holds: Vec<u64>,
    /// Aborted proposals.
    pub aborted: u64,
    /// Clusters created.
    pub clusters: u64,
    /// Clusters retired.
    pub retired: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<Fault, u64>,
    /// The group's lag over time: (virtual ms, records on clusters that are
    /// not torn down that the group has not committed yet), one sample every
    /// [`LAG_SAMPLE_MS`] (taken by the controller's tick, so sampling adds no
    /// event and leaves the trace unchanged).
    pub lag: Vec<(u64, u64)>,
    /// Backfill ([`Config::backfills`]): records copied to the target topic
    /// (copies appended, a copy made twice counts twice).
    pub backfill_copied: u64,
    /// Backfill: temporary clusters retired.
    pub backfill_retired: u64,
    /// Backfill: it went through every phase (copied, consumed, temporary
    /// clusters retired).
    pub backfill_done: bool,
    /// Backfill: copy-worker crashes.
    pub backfill_crashes: u64,
    /// Pre-join ([`Config::prejoin`]): clusters of a pending epoch a consumer
    /// joined early.
    pub prejoins: u64,
    /// Pre-join: records read from a pre-joined cluster and held (each
    /// counted once per reader).
    pub parked: u64,
    /// Pre-join: held records dropped with their reader (pending epoch
    /// aborted).
    pub parked_dropped: u64,
    /// Pre-joined clusters whose epoch was sealed while the reader was there.
    pub prejoins_gated: u64,
    /// Auto-commit ([`Config::auto_commit_ms`]): periodic commits (per member
    /// and commit round).
    pub periodic_commits: u64,
    /// Auto-commit: immediate commits after the last record below a fence
    /// end ([`Config::fence_commit`]).
    pub fence_commits: u64,
    /// Auto-commit: immediate commits (per member and cluster) when a route
    /// change showed fence ends the group had not committed up to on a
    /// cluster the member reads ([`Config::seal_commit`]).
    pub seal_commits: u64,
    /// Auto-commit: deliveries not committed when their consumer crashed
    /// (delivered again by its next incarnation: at-least-once).
    pub redelivered: u64,
    /// Fence wait, in ms: for each time a member's partition had a record it
    /// could not deliver yet (fence limit, epoch ahead of its route, held on
    /// a pre-joined cluster, join to the cluster not done), the time until
    /// it delivered from that partition again (`flotilla_consumer_fence_wait_seconds`).
    pub fence_waits: Vec<u64>,
}

/// Interval of the [`Stats::lag`] samples, in virtual ms.
pub const LAG_SAMPLE_MS: u64 = 500;

/// The outcome of one seeded run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The seed.
    pub seed: u64,
    /// Virtual time simulated, in ms.
    pub sim_ms: u64,
    /// What the checker found.
    pub anomalies: Anomalies,
    /// FNV-1a hash of the full event trace (equal for equal seed and code).
    pub trace_hash: u64,
    /// Trace lines, when [`Config::keep_trace`] was set.
    pub trace: Vec<String>,
    /// Counters.
    pub stats: Stats,
}

#[derive(Debug)]
enum Ev {
    Produce {
        p: usize,
        sess: u32,
    },
    Arrive {
        p: usize,
        sess: u32,
        c: u16,
        bid: u64,
        rids: Arc<[u64]>,
    },
    Reply {
        p: usize,
        sess: u32,
        c: u16,
        bid: u64,
        ok: bool,
    },
    Deliver {
        l: usize,
        sess: u32,
        snap: Arc<FleetSnapshot>,
    },
    Keepalive {
        l: usize,
        sess: u32,
    },
    LeaseCheck {
        id: String,
    },
    RegWrite {
        l: usize,
        sess: u32,
    },
    LinkHeal {
        l: usize,
    },
    Poll {
        ci: usize,
        sess: u32,
    },
    ControllerTick,
    OperatorTick,
    OperatorAbort {
        n: u64,
    },
    Teardown {
        c: u16,
    },
    FaultStart,
    FaultEnd {
        what: FaultEnd,
    },
    Restart {
        l: usize,
    },
    Heal,
    StopProducing,
    BackfillStart,
    BackfillTick,
    CopyStep {
        sess: u32,
    },
    CopyRestart,
    End,
}

#[derive(Debug)]
enum FaultEnd {
    ClusterBack(u16),
    RegistryBack,
}

struct Sched {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, sequence).
        o.at.cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

struct SimCluster {
    name: String,
    up: bool,
    torn_down: bool,
    logs: Vec<Vec<u64>>,
    committed: Vec<i64>,
    has_commit: Vec<bool>,
    /// Writes refused at the Kafka level (the write fence before retirement,
    /// as the real controller sets it).
    readonly: bool,
}

/// A client's connection to the registry, and its lease as the client sees it.
struct Link {
    kind: ClientKind,
    idx: usize,
    session: u32,
    alive: bool,
    cut_until: u64,
    zombie_until: u64,
    last_deliver: u64,
    delay: u64,
    rev: i64,
    write_pending: bool,
    write_retry: bool,
    /// Reconnected to the registry; no fresh snapshot yet.
    resync: bool,
    lease_ok_at: u64,
    started_at: u64,
}

impl Link {
    fn id(&self) -> String {
        match self.kind {
            ClientKind::Producer => format!("prod{}.{}", self.idx, self.session),
            ClientKind::Consumer => format!("cons{}.{}", self.idx, self.session),
        }
    }
}

struct Inflight {
    bid: u64,
    rids: Arc<[u64]>,
    first_sent: u64,
}

#[derive(Default)]
struct Conn {
    queue: VecDeque<u64>,
    inflight: Option<Inflight>,
}

struct Producer {
    router: Router,
    conns: BTreeMap<u16, Conn>,
    held: VecDeque<u64>,
    settlement: Settlement,
    /// Per epoch: sends so far.
    sends: BTreeMap<u64, u64>,
    /// Per epoch: send numbers not settled yet.
    unsettled: BTreeMap<u64, BTreeSet<u64>>,
    /// Outstanding `Flush` answers (per-flush mode): (epoch, sends at the `Flush`).
    flush_waiters: Vec<(u64, u64)>,
    keys: Vec<u32>,
    /// Since when the router holds the topic (a switch under way).
    held_since: Option<u64>,
}

struct Consumer {
    gate: FenceGate,
    route: Option<TopicRoute>,
    /// Clusters the consumer's snapshot says are retired.
    retired: BTreeSet<String>,
    /// Committed offsets last fed to the gate.
    fed: BTreeMap<(u16, u32), i64>,
    /// Clusters named by a sealed epoch (write set or fence) of the route.
    sealed: BTreeSet<String>,
    /// The read set, while nothing that can change it happened.
    rs_cache: Option<BTreeSet<String>>,
    seen: BTreeSet<u16>,
    /// The backfill's target route (only with [`Config::backfills`]).
    bf_route: Option<TopicRoute>,
    /// Clusters pre-joined for the route's pending epoch ([`Config::prejoin`]),
    /// computed with the read set.
    prejoined: BTreeSet<String>,
    /// Per pre-joined (cluster, partition): up to where records were read
    /// and held (nothing is committed there before the seal).
    parked: BTreeMap<(u16, u32), i64>,
    /// Per cluster read or pre-joined: when the member's join there is done
    /// ([`Config::join_ms`]).
    joined: BTreeMap<u16, u64>,
    /// Auto-commit: the member's position per (cluster, partition).
    pos: BTreeMap<(u16, u32), i64>,
    /// Auto-commit: deliveries not committed yet, per (cluster, partition),
    /// oldest first.
    uncommitted: BTreeMap<(u16, u32), VecDeque<Uncommitted>>,
    /// Auto-commit: the next periodic commit.
    next_commit: u64,
    /// Since when a partition has had a record the member could not deliver.
    waiting: BTreeMap<(u16, u32), u64>,
}

/// A delivery not committed yet (auto-commit), to undo if the consumer
/// crashes before it commits.
struct Uncommitted {
    off: i64,
    rid: u64,
    /// Delivery order of the member.
    dseq: u64,
    /// The key's last consumed sequence number before this delivery.
    prev_last: Option<u64>,
}

/// How a consumer reads one cluster in [`World::on_poll`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// Through the fence gate (`allowed_until`, `classify`).
    Gated,
    /// A pre-joined cluster the route does not gate: read and hold.
    Hold,
    /// [`Bugs::prejoin_delivers`](crate::config::Bugs): deliver at once, no gate.
    Ungated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BfPhase {
    Copying,
    Waiting,
    TearingDown,
    Done,
}

/// The backfill run by the operator when [`Config::backfills`] is on: the
/// registry side (temporary clusters, target route) and its copy worker.
struct Backfill {
    /// Source cluster; the range is `[0, ends[p])` of every partition.
    src: u16,
    /// Source positions (partition, offset) in copy order.
    order: Vec<(u32, u64)>,
    temps: Vec<u16>,
    phase: BfPhase,
    /// Source records per copy step (the range takes about 40 steps).
    batch: usize,
    // The copy worker.
    router: Router,
    alive: bool,
    session: u32,
    pos: usize,
    checkpoint: usize,
    /// Source positions the dedupe scan found on the target (skipped).
    skip: BTreeSet<(u32, u64)>,
    /// The `flotilla-src` header of every copy, by record id.
    headers: BTreeMap<u64, Vec<u8>>,
}

struct SealInfo {
    acked_ids: BTreeSet<String>,
}

/// One simulated world. Build with [`World::new`], run with [`World::run`].
pub struct World {
    cfg: Config,
    seed: u64,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Sched>,
    rng: SmallRng,
    // Kafka
    clusters: Vec<SimCluster>,
    // Registry
    truth: FleetSnapshot,
    published: Arc<FleetSnapshot>,
    reg_up: bool,
    leases: BTreeMap<String, u64>,
    // Clients
    links: Vec<Link>,
    producers: Vec<Producer>,
    consumers: Vec<Consumer>,
    key_bytes: Vec<Vec<u8>>,
    key_seq: Vec<u64>,
    key_last: Vec<Option<u64>>,
    producing: bool,
    next_bid: u64,
    // Control
    skew: i64,
    /// When the controller first saw each pending epoch (true virtual time,
    /// i.e. its monotonic clock): the ack wait is measured from here.
    ack_seen: BTreeMap<u64, u64>,
    /// Epochs sealed without some producers' acks, kept with the real
    /// controller's rule (times in true virtual ms: its monotonic clock).
    late_seals: LateSeals,
    proposed_at: BTreeMap<u64, u64>,
    prev_write: Option<Vec<String>>,
    seals: BTreeMap<u64, SealInfo>,
    active_end: u64,
    healed: bool,
    next_lag_sample: u64,
    bf: Option<Backfill>,
    bf_key_last: Vec<Option<u64>>,
    // History
    recs: Vec<RecInfo>,
    anomalies: Anomalies,
    stats: Stats,
    trace_hash: u64,
    trace: Vec<String>,
    buf: String,
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cluster_name(i: u16) -> String {
    format!("c{i}")
}

fn cluster_index(name: &str) -> u16 {
    name[1..].parse().expect("simulated cluster names are c<n>")
}

macro_rules! tr {
    ($w:expr, $($arg:tt)*) => {{
        let mut b = std::mem::take(&mut $w.buf);
        b.clear();
        let _ = write!(b, "{:>9} ", $w.now);
        let _ = write!(b, $($arg)*);
        $w.trace_line(b);
    }};
}

impl World {
    /// Builds the initial world of `seed`: one active cluster, an open epoch
    /// on it, the group registered, clients about to start.
    pub fn new(seed: u64, cfg: Config) -> World {
        let mut rng = SmallRng::seed_from_u64(seed);
        let total_keys = cfg.producers as u32 * cfg.keys_per_producer;
        let key_bytes = (0..total_keys)
            .map(|k| format!("key-{k}").into_bytes())
            .collect();
        let mut links = Vec::new();
        let mut producers = Vec::new();
        for i in 0..cfg.producers {
            links.push(Link {
                kind: ClientKind::Producer,
                idx: i,
                session: 0,
                alive: false,
                cut_until: 0,
                zombie_until: 0,
                last_deliver: 0,
                delay: rng.random_range(1..40),
                rev: 0,
                write_pending: false,
                write_retry: false,
                resync: false,
                lease_ok_at: 0,
                started_at: 0,
            });
            producers.push(Producer {
                router: Router::new(),
                conns: BTreeMap::new(),
                held: VecDeque::new(),
                settlement: if cfg.bugs.skip_flush_before_ack || rng.random_bool(0.5) {
                    Settlement::PerFlush
                } else {
                    Settlement::PerRecord
                },
                sends: BTreeMap::new(),
                unsettled: BTreeMap::new(),
                flush_waiters: Vec::new(),
                held_since: None,
                keys: (0..cfg.keys_per_producer)
                    .map(|k| i as u32 * cfg.keys_per_producer + k)
                    .collect(),
            });
        }
        let mut consumers = Vec::new();
        for i in 0..cfg.consumers {
            links.push(Link {
                kind: ClientKind::Consumer,
                idx: i,
                session: 0,
                alive: false,
                cut_until: 0,
                zombie_until: 0,
                last_deliver: 0,
                delay: rng.random_range(1..40),
                rev: 0,
                write_pending: false,
                write_retry: false,
                resync: false,
                lease_ok_at: 0,
                started_at: 0,
            });
            consumers.push(Consumer {
                gate: FenceGate::new(),
                route: None,
                retired: BTreeSet::new(),
                fed: BTreeMap::new(),
                sealed: BTreeSet::new(),
                rs_cache: None,
                seen: BTreeSet::new(),
                bf_route: None,
                prejoined: BTreeSet::new(),
                parked: BTreeMap::new(),
                joined: BTreeMap::new(),
                pos: BTreeMap::new(),
                uncommitted: BTreeMap::new(),
                next_commit: 0,
                waiting: BTreeMap::new(),
            });
        }
        let active_end = cfg.active_ms;
        let mut w = World {
            seed,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            rng,
            clusters: Vec::new(),
            truth: FleetSnapshot::default(),
            published: Arc::new(FleetSnapshot::default()),
            reg_up: true,
            leases: BTreeMap::new(),
            links,
            producers,
            consumers,
            key_bytes,
            key_seq: vec![0; total_keys as usize],
            key_last: vec![None; total_keys as usize],
            producing: true,
            next_bid: 0,
            skew: 0,
            ack_seen: BTreeMap::new(),
            late_seals: LateSeals::default(),
            proposed_at: BTreeMap::new(),
            prev_write: None,
            seals: BTreeMap::new(),
            active_end,
            healed: false,
            next_lag_sample: 0,
            bf: None,
            bf_key_last: vec![None; total_keys as usize],
            recs: Vec::new(),
            anomalies: Anomalies::default(),
            stats: Stats::default(),
            trace_hash: 0xcbf2_9ce4_8422_2325,
            trace: Vec::new(),
            buf: String::new(),
            cfg,
        };
        let c0 = w.add_cluster();
        w.truth.routes.insert(
            TOPIC.to_string(),
            TopicRoute {
                version: SCHEMA_VERSION,
                topic: TOPIC.to_string(),
                partitions: w.cfg.partitions,
                epochs: vec![Epoch {
                    n: 1,
                    write: vec![WeightedCluster {
                        cluster: cluster_name(c0),
                        weight: 100,
                    }],
                    state: EpochState::Open,
                    fence: BTreeMap::new(),
                    created_at: 0,
                    ack_deadline: None,
                }],
            },
        );
        w.truth.groups.insert(
            GROUP.to_string(),
            GroupRecord {
                version: SCHEMA_VERSION,
                group: GROUP.to_string(),
                topics: vec![TOPIC.to_string()],
                created_at: 0,
            },
        );
        w.commit();
        for l in 0..w.links.len() {
            let at = w.rng.random_range(0..200);
            w.at(at, Ev::Restart { l });
        }
        let first = w
            .rng
            .random_range(w.cfg.switch_gap_ms.0..w.cfg.switch_gap_ms.1);
        w.at(first, Ev::OperatorTick);
        w.at(100, Ev::ControllerTick);
        if w.cfg.faults.iter().any(|f| f != Fault::Ambiguous) {
            let gap = w.cfg.fault_gap_ms;
            let t = w.rng.random_range(gap / 2..gap * 3 / 2);
            w.at(t, Ev::FaultStart);
        }
        w.at(active_end, Ev::Heal);
        w.at(active_end + 2_000, Ev::StopProducing);
        w.at(active_end + w.cfg.drain_ms, Ev::End);
        if w.cfg.backfills {
            // Last, so a run without backfills draws the same numbers.
            let t = w.rng.random_range(active_end / 4..active_end / 2 + 1);
            w.at(t, Ev::BackfillStart);
        }
        w
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Sched {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, delay: u64, ev: Ev) {
        self.at(self.now + delay, ev);
    }

    fn trace_line(&mut self, line: String) {
        self.trace_hash = fnv(self.trace_hash, line.as_bytes());
        self.trace_hash = fnv(self.trace_hash, b"\n");
        if self.cfg.keep_trace {
            self.trace.push(line.clone());
        }
        self.buf = line;
    }

    fn anomaly(&mut self, kind: AnomalyKind, detail: String) {
        tr!(self, "! ANOMALY {kind}: {detail}");
        self.anomalies.push(kind, self.now, detail);
    }

    fn add_cluster(&mut self) -> u16 {
        let i = self.clusters.len() as u16;
        let name = cluster_name(i);
        let parts = self.cfg.partitions as usize;
        self.clusters.push(SimCluster {
            name: name.clone(),
            up: true,
            torn_down: false,
            logs: vec![Vec::new(); parts],
            committed: vec![0; parts],
            has_commit: vec![false; parts],
            readonly: false,
        });
        self.truth.clusters.insert(
            name.clone(),
            ClusterSpec {
                version: SCHEMA_VERSION,
                id: name.clone(),
                bootstrap: format!("{name}.sim:9092"),
                kafka_cluster_id: format!("kid-{name}"),
                state: ClusterState::Active,
                role: ClusterRole::Permanent,
                weight: 100,
                labels: BTreeMap::new(),
                security_profile: None,
                created_at: self.now,
            },
        );
        self.stats.clusters += 1;
        i
    }

    /// Runs the world to the end and checks the history.
    pub fn run(mut self) -> RunResult {
        while let Some(s) = self.queue.pop() {
            self.now = s.at;
            self.stats.events += 1;
            if matches!(s.ev, Ev::End) {
                self.final_check();
                break;
            }
            self.handle(s.ev);
        }
        RunResult {
            seed: self.seed,
            sim_ms: self.now,
            anomalies: self.anomalies,
            trace_hash: self.trace_hash,
            trace: self.trace,
            stats: self.stats,
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Produce { p, sess } => self.on_produce(p, sess),
            Ev::Arrive {
                p,
                sess,
                c,
                bid,
                rids,
            } => self.on_arrive(p, sess, c, bid, rids),
            Ev::Reply {
                p,
                sess,
                c,
                bid,
                ok,
            } => self.on_reply(p, sess, c, bid, ok),
            Ev::Deliver { l, sess, snap } => self.on_deliver(l, sess, snap),
            Ev::Keepalive { l, sess } => self.on_keepalive(l, sess),
            Ev::LeaseCheck { id } => self.on_lease_check(id),
            Ev::RegWrite { l, sess } => {
                if self.links[l].session == sess {
                    self.links[l].write_retry = false;
                    self.reg_write(l);
                }
            }
            Ev::LinkHeal { l } => self.on_link_heal(l),
            Ev::Poll { ci, sess } => self.on_poll(ci, sess),
            Ev::ControllerTick => self.on_controller_tick(),
            Ev::OperatorTick => self.on_operator_tick(),
            Ev::OperatorAbort { n } => self.on_operator_abort(n),
            Ev::Teardown { c } => {
                self.clusters[c as usize].torn_down = true;
                tr!(self, "# teardown {}", self.clusters[c as usize].name);
            }
            Ev::FaultStart => self.on_fault_start(),
            Ev::FaultEnd { what } => self.on_fault_end(what),
            Ev::Restart { l } => self.on_restart(l),
            Ev::Heal => self.on_heal(),
            Ev::StopProducing => {
                self.producing = false;
                tr!(self, "# producers stop creating records");
            }
            Ev::BackfillStart => self.on_backfill_start(),
            Ev::BackfillTick => self.on_backfill_tick(),
            Ev::CopyStep { sess } => self.on_copy_step(sess),
            Ev::CopyRestart => self.on_copy_restart(),
            Ev::End => {}
        }
    }

    // ---------------------------------------------------------------- registry

    fn link_ok(&self, l: usize) -> bool {
        let k = &self.links[l];
        self.reg_up && k.alive && self.now >= k.cut_until && self.now >= k.zombie_until
    }

    /// Commits a change of `truth`: new revision, watch events to every client.
    fn commit(&mut self) {
        self.truth.revision += 1;
        self.published = Arc::new(self.truth.clone());
        tr!(self, "reg rev {}", self.truth.revision);
        for l in 0..self.links.len() {
            if self.link_ok(l) {
                self.send_snapshot(l);
            }
        }
        let d = self.rng.random_range(1..10);
        self.after(d, Ev::ControllerTick);
    }

    fn send_snapshot(&mut self, l: usize) {
        let jitter = self.rng.random_range(0..5);
        let k = &mut self.links[l];
        let at = (self.now + k.delay + jitter).max(k.last_deliver);
        k.last_deliver = at;
        let sess = k.session;
        let snap = self.published.clone();
        self.at(at, Ev::Deliver { l, sess, snap });
    }

    fn reg_write(&mut self, l: usize) {
        if !self.links[l].alive || !self.links[l].write_pending {
            return;
        }
        if !self.link_ok(l) {
            if !self.links[l].write_retry {
                self.links[l].write_retry = true;
                let sess = self.links[l].session;
                self.after(100, Ev::RegWrite { l, sess });
            }
            return;
        }
        let k = &self.links[l];
        let id = k.id();
        let acked = match k.kind {
            ClientKind::Producer => self.producers[k.idx].router.acked(),
            ClientKind::Consumer => BTreeMap::new(),
        };
        let rec = ClientRecord {
            version: SCHEMA_VERSION,
            kind: k.kind,
            id: id.clone(),
            acked,
            group: (k.kind == ClientKind::Consumer).then(|| GROUP.to_string()),
            started_at: k.started_at,
        };
        let kind = k.kind;
        self.links[l].write_pending = false;
        self.links[l].lease_ok_at = self.now;
        let ttl = self.cfg.lease_ttl_ms;
        self.leases.insert(id.clone(), self.now + ttl);
        self.after(ttl + 1, Ev::LeaseCheck { id: id.clone() });
        let key = (kind, id.clone());
        if self.truth.clients.get(&key) != Some(&rec) {
            tr!(self, "reg put client {id} acked={:?}", rec.acked);
            self.truth.clients.insert(key, rec);
            self.commit();
        }
    }

    fn on_keepalive(&mut self, l: usize, sess: u32) {
        let k = &self.links[l];
        if !k.alive || k.session != sess {
            return;
        }
        let zombie = self.now < k.zombie_until;
        let ttl = self.cfg.lease_ttl_ms;
        self.after(ttl / 3, Ev::Keepalive { l, sess });
        if zombie {
            // The zombie believes its lease is fine.
            self.links[l].lease_ok_at = self.now;
            return;
        }
        if !self.link_ok(l) {
            return;
        }
        let id = self.links[l].id();
        match self.leases.get_mut(&id) {
            Some(exp) => {
                *exp = self.now + ttl;
                self.links[l].lease_ok_at = self.now;
                self.after(ttl + 1, Ev::LeaseCheck { id });
                if self.links[l].kind == ClientKind::Producer {
                    self.drain_held(self.links[l].idx);
                }
            }
            None => {
                tr!(self, "{id} finds its lease gone: registers again");
                self.links[l].write_pending = true;
                self.reg_write(l);
                if self.links[l].kind == ClientKind::Producer {
                    self.drain_held(self.links[l].idx);
                }
            }
        }
    }

    fn on_lease_check(&mut self, id: String) {
        if !self.reg_up {
            return;
        }
        let Some(&exp) = self.leases.get(&id) else {
            return;
        };
        if exp > self.now {
            return;
        }
        self.leases.remove(&id);
        self.expire_client(&id);
    }

    fn expire_client(&mut self, id: &str) {
        let kind = if id.starts_with("prod") {
            ClientKind::Producer
        } else {
            ClientKind::Consumer
        };
        if self.truth.clients.remove(&(kind, id.to_string())).is_some() {
            tr!(self, "# lease of {id} expired");
            self.commit();
        }
    }

    fn on_link_heal(&mut self, l: usize) {
        if !self.links[l].alive || !self.link_ok(l) {
            return;
        }
        tr!(self, "{} reconnects to the registry", self.links[l].id());
        self.links[l].write_pending = true;
        self.links[l].resync = true;
        self.send_snapshot(l);
        self.reg_write(l);
    }

    fn on_deliver(&mut self, l: usize, sess: u32, snap: Arc<FleetSnapshot>) {
        let k = &self.links[l];
        if !k.alive || k.session != sess || !self.link_ok(l) {
            return;
        }
        if snap.revision <= k.rev {
            // Nothing new, but the view is confirmed fresh.
            let (resync, kind, idx) = (k.resync, k.kind, k.idx);
            if resync {
                self.links[l].resync = false;
                if kind == ClientKind::Producer {
                    self.drain_held(idx);
                }
            }
            return;
        }
        self.links[l].rev = snap.revision;
        self.links[l].resync = false;
        let idx = self.links[l].idx;
        match self.links[l].kind {
            ClientKind::Producer => {
                let acts = self.producers[idx].router.on_snapshot(&snap);
                tr!(
                    self,
                    "prod{idx} snapshot rev {} -> {:?}",
                    snap.revision,
                    acts
                );
                self.apply_actions(idx, acts);
                self.drain_held(idx);
            }
            ClientKind::Consumer => {
                let parts = self.cfg.partitions;
                let c = &mut self.consumers[idx];
                // Most registry changes (acks, leases) leave the route alone.
                let mut route_changed = false;
                if let Some(r) = snap.route(TOPIC).filter(|r| c.route.as_ref() != Some(*r)) {
                    c.gate.on_route(r);
                    c.sealed = r
                        .sealed_epochs()
                        .flat_map(|e| e.clusters().chain(e.fence.keys()).cloned())
                        .collect();
                    c.route = Some(r.clone());
                    c.rs_cache = None;
                    route_changed = true;
                }
                // The adapter contract of `FenceGate::on_retired` (finding 1):
                // a retired cluster's committed offsets can no longer be
                // fetched, so the gate is told it is consumed.
                let report_retired = !self.cfg.bugs.no_retired_workaround;
                for s in snap.clusters.values() {
                    if s.state == ClusterState::Retired && c.retired.insert(s.id.clone()) {
                        if report_retired {
                            c.gate.on_retired(&s.id, parts);
                        }
                        c.rs_cache = None;
                    }
                }
                if self.bf.is_some() {
                    c.bf_route = snap.route(BF_TOPIC).cloned();
                }
                tr!(self, "cons{idx} snapshot rev {}", snap.revision);
                if route_changed && self.cfg.seal_commit && self.cfg.auto_commit_ms.is_some() {
                    self.commit_at_new_fences(idx);
                }
            }
        }
    }

    // ---------------------------------------------------------------- producers

    fn on_produce(&mut self, p: usize, sess: u32) {
        let l = p;
        if !self.links[l].alive || self.links[l].session != sess || !self.producing {
            return;
        }
        let pr = &self.producers[p];
        let key = pr.keys[self.rng.random_range(0..pr.keys.len())];
        let seq = self.key_seq[key as usize];
        self.key_seq[key as usize] += 1;
        let rid = self.recs.len() as u64;
        self.recs.push(RecInfo {
            key,
            seq,
            producer: p as u16,
            session: sess,
            ..RecInfo::default()
        });
        self.stats.records += 1;
        self.producers[p].held.push_back(rid);
        self.drain_held(p);
        let gap = self.rng.random_range(1..2 * self.cfg.produce_gap_ms);
        self.after(gap, Ev::Produce { p, sess });
    }

    /// Whether the client may still count on its lease: with a safety margin
    /// of a third of the TTL, so records in flight land before it can expire.
    fn lease_valid(&self, l: usize) -> bool {
        self.now.saturating_sub(self.links[l].lease_ok_at) <= self.cfg.lease_ttl_ms * 2 / 3
    }

    /// Routes the buffered records of producer `p`, oldest first, until one is held.
    fn drain_held(&mut self, p: usize) {
        if !self.links[p].alive || self.links[p].rev == 0 {
            return;
        }
        if self.cfg.lease_policy == LeasePolicy::Hold
            && (!self.lease_valid(p) || self.links[p].resync)
        {
            return;
        }
        while let Some(&rid) = self.producers[p].held.front() {
            let key = self.recs[rid as usize].key as usize;
            let d = self.producers[p]
                .router
                .route(TOPIC, Some(&self.key_bytes[key]));
            match d {
                Decision::Send {
                    cluster,
                    partition,
                    epoch,
                } => {
                    self.producers[p].held.pop_front();
                    let c = cluster_index(&cluster);
                    let r = &mut self.recs[rid as usize];
                    r.epoch = epoch;
                    r.sent_at = self.now;
                    r.cluster = c;
                    r.partition = partition;
                    let pr = &mut self.producers[p];
                    let no = pr.sends.entry(epoch).or_insert(0);
                    let send_no = *no;
                    *no += 1;
                    pr.unsettled.entry(epoch).or_default().insert(send_no);
                    self.recs[rid as usize].send_no = send_no;
                    let conn = pr.conns.entry(c).or_default();
                    conn.queue.push_back(rid);
                    let idle = conn.inflight.is_none();
                    tr!(
                        self,
                        "prod{p} send r{rid} key{key} -> {cluster}/{partition} e{epoch}"
                    );
                    if idle {
                        let sess = self.links[p].session;
                        self.pump(p, sess, c);
                    }
                }
                Decision::Hold => break,
                Decision::NoRoute(e) => {
                    self.producers[p].held.pop_front();
                    self.recs[rid as usize].failed = true;
                    self.stats.failed += 1;
                    tr!(self, "prod{p} r{rid} no route: {e}");
                }
            }
        }
    }

    fn pump(&mut self, p: usize, sess: u32, c: u16) {
        if !self.links[p].alive || self.links[p].session != sess {
            return;
        }
        let Some(conn) = self.producers[p].conns.get_mut(&c) else {
            return;
        };
        if conn.inflight.is_some() || conn.queue.is_empty() {
            return;
        }
        let n = conn.queue.len().min(BATCH);
        let rids: Arc<[u64]> = conn.queue.drain(..n).collect::<Vec<_>>().into();
        let bid = self.next_bid;
        self.next_bid += 1;
        // Kafka's delivery timeout runs from when each record was handed over.
        let first_sent = rids
            .iter()
            .map(|&r| self.recs[r as usize].sent_at)
            .min()
            .unwrap_or(self.now);
        conn.inflight = Some(Inflight {
            bid,
            rids: rids.clone(),
            first_sent,
        });
        let lat = self.rng.random_range(2..20);
        self.after(
            lat,
            Ev::Arrive {
                p,
                sess,
                c,
                bid,
                rids,
            },
        );
    }

    fn on_arrive(&mut self, p: usize, sess: u32, c: u16, bid: u64, rids: Arc<[u64]>) {
        let cl = &self.clusters[c as usize];
        if !cl.up || cl.torn_down || cl.readonly {
            let d = self.rng.random_range(50..150);
            self.after(
                d,
                Ev::Reply {
                    p,
                    sess,
                    c,
                    bid,
                    ok: false,
                },
            );
            return;
        }
        for &rid in rids.iter() {
            self.append(c, rid);
        }
        let lost =
            self.cfg.faults.has(Fault::Ambiguous) && !self.healed && self.rng.random_bool(0.03);
        if lost {
            tr!(self, "batch b{bid} of prod{p} applied on c{c}, reply lost");
            let d = self.rng.random_range(100..300);
            self.after(
                d,
                Ev::Reply {
                    p,
                    sess,
                    c,
                    bid,
                    ok: false,
                },
            );
        } else {
            let d = self.rng.random_range(2..20);
            self.after(
                d,
                Ev::Reply {
                    p,
                    sess,
                    c,
                    bid,
                    ok: true,
                },
            );
        }
    }

    fn on_reply(&mut self, p: usize, sess: u32, c: u16, bid: u64, ok: bool) {
        if !self.links[p].alive || self.links[p].session != sess {
            return;
        }
        let Some(conn) = self.producers[p].conns.get_mut(&c) else {
            return;
        };
        if conn.inflight.as_ref().is_none_or(|i| i.bid != bid) {
            return;
        }
        if ok {
            let inf = conn.inflight.take().expect("checked");
            for &rid in inf.rids.iter() {
                self.recs[rid as usize].acked = true;
                self.stats.acked += 1;
            }
            tr!(self, "prod{p} b{bid} acked ({} records)", inf.rids.len());
            for &rid in inf.rids.iter() {
                self.settle(p, rid);
            }
            self.pump(p, sess, c);
        } else if self.now - conn.inflight.as_ref().expect("checked").first_sent
            > DELIVERY_TIMEOUT_MS
        {
            let inf = conn.inflight.take().expect("checked");
            // Every queued record past its delivery timeout fails with it.
            let mut failed: Vec<u64> = inf.rids.to_vec();
            while let Some(&rid) = conn.queue.front() {
                if self.recs[rid as usize].sent_at + DELIVERY_TIMEOUT_MS > self.now {
                    break;
                }
                failed.push(rid);
                conn.queue.pop_front();
            }
            tr!(
                self,
                "prod{p} b{bid} failed after the delivery timeout ({} records)",
                failed.len()
            );
            for rid in failed {
                self.recs[rid as usize].failed = true;
                self.stats.failed += 1;
                self.settle(p, rid);
            }
            self.pump(p, sess, c);
        } else {
            let rids = conn.inflight.as_ref().expect("checked").rids.clone();
            tr!(self, "prod{p} b{bid} retried");
            let d = self.rng.random_range(20..60);
            self.after(
                d,
                Ev::Arrive {
                    p,
                    sess,
                    c,
                    bid,
                    rids,
                },
            );
        }
    }

    fn settle(&mut self, p: usize, rid: u64) {
        let (epoch, no) = {
            let r = &self.recs[rid as usize];
            (r.epoch, r.send_no)
        };
        let pr = &mut self.producers[p];
        let low = pr.unsettled.get_mut(&epoch).and_then(|set| {
            set.remove(&no);
            set.first().copied()
        });
        if pr.settlement == Settlement::PerRecord {
            let acts = pr.router.on_settled(TOPIC, epoch);
            self.apply_actions(p, acts);
            return;
        }
        // Per-flush mode: answer each Flush once everything routed before it settled.
        let done: Vec<(u64, u64)> = pr
            .flush_waiters
            .iter()
            .copied()
            .filter(|&(e, mark)| e == epoch && low.is_none_or(|l| l >= mark))
            .collect();
        if done.is_empty() {
            return;
        }
        pr.flush_waiters
            .retain(|&(e, mark)| !(e == epoch && low.is_none_or(|l| l >= mark)));
        let acts = pr.router.on_flushed(TOPIC, epoch);
        tr!(self, "prod{p} flushed e{epoch} -> {acts:?}");
        self.apply_actions(p, acts);
    }

    fn apply_actions(&mut self, p: usize, acts: Vec<Action>) {
        let mut work: VecDeque<Action> = acts.into();
        let mut release = false;
        let mut steps = 0u32;
        while let Some(a) = work.pop_front() {
            steps += 1;
            assert!(steps < 10_000, "prod{p}: router action loop at {a:?}");
            match a {
                Action::Open(c) => {
                    self.producers[p]
                        .conns
                        .entry(cluster_index(&c))
                        .or_default();
                }
                Action::Close(c) => {
                    let ci = cluster_index(&c);
                    let pr = &mut self.producers[p];
                    if pr
                        .conns
                        .get(&ci)
                        .is_some_and(|k| k.queue.is_empty() && k.inflight.is_none())
                    {
                        pr.conns.remove(&ci);
                    }
                }
                Action::Flush { topic, epoch } => {
                    let pr = &mut self.producers[p];
                    if pr.settlement == Settlement::PerRecord {
                        // A hint only: the per-record reports release the ack.
                        continue;
                    }
                    let mark = pr.sends.get(&epoch).copied().unwrap_or(0);
                    let low = pr.unsettled.get(&epoch).and_then(|s| s.first().copied());
                    if self.cfg.bugs.skip_flush_before_ack || low.is_none_or(|l| l >= mark) {
                        let more = pr.router.on_flushed(&topic, epoch);
                        work.extend(more);
                    } else {
                        pr.flush_waiters.push((epoch, mark));
                    }
                }
                Action::Ack { epoch, .. } => {
                    tr!(self, "prod{p} acks e{epoch}");
                    self.links[p].write_pending = true;
                    self.reg_write(p);
                }
                Action::Release { .. } => release = true,
            }
        }
        if release {
            self.drain_held(p);
        }
        let held = self.producers[p].router.held_topic_count() > 0;
        let pr = &mut self.producers[p];
        match (held, pr.held_since) {
            (true, None) => pr.held_since = Some(self.now),
            (false, Some(t)) => {
                pr.held_since = None;
                self.stats.holds.push(self.now - t);
            }
            _ => {}
        }
    }

    /// Appends `rid` to its partition on cluster `c` (idempotently) and checks
    /// the write against the registry's truth.
    fn append(&mut self, c: u16, rid: u64) {
        let r = &mut self.recs[rid as usize];
        if r.offset.is_some() {
            r.dedup += 1;
            self.stats.deduped += 1;
            return;
        }
        let part = r.partition as usize;
        let (epoch, producer, session) = (r.epoch, r.producer, r.session);
        let cl = &mut self.clusters[c as usize];
        let off = cl.logs[part].len() as u64;
        cl.logs[part].push(rid);
        self.recs[rid as usize].offset = Some(off);
        let cname = &self.clusters[c as usize].name;
        let writer = format!("prod{producer}.{session}");
        let route = &self.truth.routes[TOPIC];
        let verdict = match route.epoch(epoch) {
            None => Err(format!("unknown epoch {epoch}")),
            Some(e) if !e.writes_to(cname) => {
                Err(format!("epoch {epoch} does not write to {cname}"))
            }
            Some(e) => match e.state {
                EpochState::Open => Ok(false),
                EpochState::Pending | EpochState::Aborted => {
                    Err(format!("epoch {epoch} is {}", e.state))
                }
                EpochState::Sealed => {
                    if self
                        .seals
                        .get(&epoch)
                        .is_some_and(|s| s.acked_ids.contains(&writer))
                    {
                        Err(format!(
                            "epoch {epoch} is sealed and {writer} had acknowledged its successor"
                        ))
                    } else {
                        Ok(true)
                    }
                }
            },
        };
        let cname = cname.clone();
        match verdict {
            Ok(straggler) => {
                if straggler {
                    self.recs[rid as usize].straggler = true;
                    self.stats.stragglers += 1;
                    tr!(
                        self,
                        "straggler r{rid} of {writer} on {cname}/{part}@{off} e{epoch}"
                    );
                }
            }
            Err(why) => self.anomaly(
                AnomalyKind::WriteOutsideOpenEpoch,
                format!("r{rid} by {writer} landed on {cname}/{part}@{off}: {why}"),
            ),
        }
    }

    // ---------------------------------------------------------------- consumers

    fn on_poll(&mut self, ci: usize, sess: u32) {
        let l = self.cfg.producers + ci;
        if !self.links[l].alive || self.links[l].session != sess {
            return;
        }
        let gap = self.rng.random_range(10..40);
        self.after(gap, Ev::Poll { ci, sess });
        let Some(route) = self.consumers[ci].route.take() else {
            return;
        };
        let parts = self.cfg.partitions;
        // Feed the group's committed offsets (an admin fetch) to the gate,
        // only where they moved since the last feed.
        // The read set only changes with the route or with commits on
        // clusters of sealed epochs; reuse it otherwise.
        let rs = match self.consumers[ci].rs_cache.take() {
            Some(rs) => rs,
            None => {
                let con = &self.consumers[ci];
                // The real rule: a sealed epoch's cluster is read until it is
                // retired (stragglers land above its fence).
                let mut rs = read_set(&route, |c| con.retired.contains(c));
                if self.cfg.bugs.stragglers_lost {
                    // The rule before the fix: only until the group passed the fence.
                    for e in route.sealed_epochs() {
                        for c in e.clusters() {
                            if con.gate.epoch_consumed(e.n, c)
                                && !route.open_epoch().is_some_and(|o| o.writes_to(c))
                                && !route
                                    .sealed_epochs()
                                    .any(|l| l.writes_to(c) && !con.gate.epoch_consumed(l.n, c))
                            {
                                rs.remove(c);
                            }
                        }
                    }
                }
                if self.cfg.prejoin || self.cfg.join_ms > 0 {
                    self.membership(ci, &route, &rs);
                }
                rs
            }
        };
        // Only commits on clusters of sealed epochs can open a gate.
        let mut fed_any = false;
        for c in &rs {
            let cx = cluster_index(c);
            let cl = &self.clusters[cx as usize];
            if cl.torn_down || !self.consumers[ci].sealed.contains(c) {
                continue;
            }
            for p in 0..parts {
                let off = cl.committed[p as usize];
                let con = &mut self.consumers[ci];
                let fed = con.fed.entry((cx, p)).or_insert(-1);
                if *fed != off {
                    *fed = off;
                    fed_any = true;
                    con.gate.on_committed(c, p, off);
                }
            }
        }
        for c in &rs {
            self.read_cluster(ci, c, ReadMode::Gated, &route);
        }
        if !self.consumers[ci].prejoined.is_empty() {
            let pj = self.consumers[ci].prejoined.clone();
            for c in &pj {
                // As `FleetConsumer`: a pre-joined cluster's records wait
                // until the route gates the cluster (its epoch sealed).
                let mode = if self.cfg.bugs.prejoin_delivers {
                    ReadMode::Ungated
                } else if gated_by_route(&route, c) {
                    ReadMode::Gated
                } else {
                    ReadMode::Hold
                };
                self.read_cluster(ci, c, mode, &route);
            }
        }
        if let Some(every) = self.cfg.auto_commit_ms {
            if self.now >= self.consumers[ci].next_commit {
                self.consumers[ci].next_commit = self.now + every;
                self.periodic_commit(ci);
            }
        }
        self.consumers[ci].route = Some(route);
        if !fed_any {
            self.consumers[ci].rs_cache = Some(rs);
        }
        if let Some(br) = self.consumers[ci].bf_route.take() {
            self.poll_backfill(ci, &br);
            self.consumers[ci].bf_route = Some(br);
        }
    }

    /// Recomputes the clusters consumer `ci` is a group member on: the read
    /// set `rs` and, with [`Config::prejoin`], the pending epoch's clusters
    /// (`prejoin_set`). A pre-joined cluster that the route now gates keeps
    /// its member and goes through the gate from where it held; one that
    /// left the pre-join set otherwise (the pending epoch aborted, or the
    /// cluster retired) is closed and what it held is dropped. A cluster
    /// joined anew is read [`Config::join_ms`] later.
    fn membership(&mut self, ci: usize, route: &TopicRoute, rs: &BTreeSet<String>) {
        let con = &self.consumers[ci];
        let pj = if self.cfg.prejoin {
            prejoin_set(route, rs, |c| con.retired.contains(c))
        } else {
            BTreeSet::new()
        };
        let old = std::mem::take(&mut self.consumers[ci].prejoined);
        for c in old.difference(&pj) {
            let cx = cluster_index(c);
            let con = &mut self.consumers[ci];
            let cl = &self.clusters[cx as usize];
            let mut held = 0;
            con.parked.retain(|(x, p), to| {
                if *x == cx {
                    held += (*to - cl.committed[*p as usize]).max(0);
                }
                *x != cx
            });
            if rs.contains(c) {
                self.stats.prejoins_gated += 1;
                tr!(
                    self,
                    "cons{ci} {c} gated by its route: {held} held records go through the fence gate"
                );
            } else {
                con.joined.remove(&cx);
                con.waiting.retain(|(x, _), _| *x != cx);
                self.stats.parked_dropped += held as u64;
                tr!(
                    self,
                    "cons{ci} leaves {c} (no longer pre-joined): {held} held records dropped"
                );
            }
        }
        for c in pj.difference(&old) {
            self.stats.prejoins += 1;
            tr!(self, "cons{ci} pre-joins {c} (pending epoch)");
        }
        let now = self.now;
        let join_ms = self.cfg.join_ms;
        let con = &mut self.consumers[ci];
        let member: BTreeSet<u16> = rs.iter().chain(&pj).map(|c| cluster_index(c)).collect();
        con.joined.retain(|cx, _| member.contains(cx));
        for cx in member {
            con.joined.entry(cx).or_insert(now + join_ms);
        }
        con.prejoined = pj;
    }

    /// Consumer `ci` reads its partitions of cluster `c` (of its route
    /// `route`) as `mode` says, and delivers what it may.
    fn read_cluster(&mut self, ci: usize, c: &str, mode: ReadMode, route: &TopicRoute) {
        let parts = self.cfg.partitions;
        let members = self.cfg.consumers as u32;
        let cx = cluster_index(c);
        let cl = &self.clusters[cx as usize];
        if cl.torn_down || !cl.up {
            return;
        }
        if self.cfg.bugs.consumer_from_latest && self.consumers[ci].seen.insert(cx) {
            let cl = &mut self.clusters[cx as usize];
            for p in 0..parts as usize {
                if !cl.has_commit[p] {
                    cl.has_commit[p] = true;
                    cl.committed[p] = cl.logs[p].len() as i64;
                }
            }
        }
        let ready = self.cfg.join_ms == 0
            || self.consumers[ci]
                .joined
                .get(&cx)
                .is_some_and(|t| self.now >= *t);
        let auto = self.cfg.auto_commit_ms.is_some();
        for p in (0..parts).filter(|p| p % members == ci as u32) {
            let cl = &self.clusters[cx as usize];
            let committed = cl.committed[p as usize];
            let hw = cl.logs[p as usize].len() as i64;
            let mut pos = if auto {
                let con = &self.consumers[ci];
                con.pos
                    .get(&(cx, p))
                    .map_or(committed, |&q| q.max(committed))
            } else {
                committed
            };
            if !ready || mode == ReadMode::Hold {
                if pos < hw {
                    let con = &mut self.consumers[ci];
                    con.waiting.entry((cx, p)).or_insert(self.now);
                    if ready {
                        // Read and held until the route gates the cluster.
                        let to = con.parked.entry((cx, p)).or_insert(pos);
                        if hw > *to {
                            self.stats.parked += (hw - *to) as u64;
                            *to = hw;
                        }
                    }
                }
                continue;
            }
            let limit = if self.cfg.bugs.consumer_ignores_gate || mode == ReadMode::Ungated {
                i64::MAX
            } else {
                self.consumers[ci]
                    .gate
                    .allowed_until(c, p)
                    .unwrap_or(i64::MAX)
            };
            let end = hw.min(limit).min(pos + 64);
            let mut held_back = pos < hw && pos >= limit;
            let start = pos;
            while pos < end {
                let rid = self.clusters[cx as usize].logs[p as usize][pos as usize];
                let epoch = self.recs[rid as usize].epoch;
                let class = if mode == ReadMode::Ungated {
                    RecordClass::InOrder
                } else {
                    self.consumers[ci].gate.classify(c, p, pos, Some(epoch))
                };
                if class == RecordClass::Ahead {
                    held_back = true;
                    break;
                }
                let prev_last = self.deliver(ci, cx, p, pos, rid, class, route);
                pos += 1;
                if auto {
                    let con = &mut self.consumers[ci];
                    con.pos.insert((cx, p), pos);
                    con.uncommitted
                        .entry((cx, p))
                        .or_default()
                        .push_back(Uncommitted {
                            off: pos - 1,
                            rid,
                            dseq: self.stats.consumed,
                            prev_last,
                        });
                    if self.cfg.fence_commit
                        && mode == ReadMode::Gated
                        && con.gate.completes_fence(c, p, pos - 1)
                    {
                        // The last record below a fence end: commit now, so
                        // the next epoch's records wait no longer for it.
                        self.stats.fence_commits += 1;
                        tr!(self, "cons{ci} commits c{cx}/{p}@{pos} at a fence end");
                        self.commit_partition(ci, cx, p, pos);
                    }
                } else {
                    // Processing and commit are one step (an exactly-once sink).
                    let cl = &mut self.clusters[cx as usize];
                    cl.committed[p as usize] = pos;
                    cl.has_commit[p as usize] = true;
                }
            }
            let con = &mut self.consumers[ci];
            if pos > start {
                if let Some(t) = con.waiting.remove(&(cx, p)) {
                    self.stats.fence_waits.push(self.now - t);
                }
            }
            if held_back {
                con.waiting.entry((cx, p)).or_insert(self.now);
            }
        }
    }

    /// Auto-commit: consumer `ci` commits `cx/p` up to `to` (the group's
    /// offset; a commit only moves forward) and forgets the deliveries below.
    fn commit_partition(&mut self, ci: usize, cx: u16, p: u32, to: i64) {
        let cl = &mut self.clusters[cx as usize];
        if to > cl.committed[p as usize] {
            cl.committed[p as usize] = to;
        }
        cl.has_commit[p as usize] = true;
        if let Some(q) = self.consumers[ci].uncommitted.get_mut(&(cx, p)) {
            while q.front().is_some_and(|u| u.off < to) {
                q.pop_front();
            }
        }
    }

    /// Auto-commit with [`Config::seal_commit`], as `FleetConsumer::tick`:
    /// consumer `ci`'s route just changed. On every cluster it reads (its
    /// read set and pre-joined clusters) where its gate shows a fence end
    /// the group has not committed up to (`FenceGate::fence_uncommitted`),
    /// it commits its delivered positions at once, like any other commit:
    /// only on a cluster that answers, only where the position moved. A member that
    /// keeps up has delivered the old epoch's records before the seal
    /// brings their fence, so no delivery completes it
    /// ([`Config::fence_commit`]) and the next epoch's records would wait
    /// for the periodic commit.
    fn commit_at_new_fences(&mut self, ci: usize) {
        let con = &self.consumers[ci];
        let Some(route) = con.route.as_ref() else {
            return;
        };
        let reads: BTreeSet<u16> = read_set(route, |c| con.retired.contains(c))
            .iter()
            .chain(&con.prejoined)
            .map(|c| cluster_index(c))
            .collect();
        let due: Vec<u16> = reads
            .into_iter()
            .filter(|&cx| con.gate.fence_uncommitted(&self.clusters[cx as usize].name))
            .collect();
        for cx in due {
            let moved = self.moved_positions(ci, |x| x == cx);
            if moved.is_empty() {
                continue;
            }
            self.stats.seal_commits += 1;
            tr!(
                self,
                "cons{ci} commits c{cx} ({} partitions) at once: its route shows fences not committed up to",
                moved.len()
            );
            for ((_, p), to) in moved {
                self.commit_partition(ci, cx, p, to);
            }
        }
    }

    /// Auto-commit: consumer `ci`'s positions above the group's committed
    /// offset, on the clusters `of` selects that answer (up, not torn down).
    fn moved_positions(&self, ci: usize, of: impl Fn(u16) -> bool) -> Vec<((u16, u32), i64)> {
        self.consumers[ci]
            .pos
            .iter()
            .filter(|((cx, p), pos)| {
                let cl = &self.clusters[*cx as usize];
                of(*cx) && cl.up && !cl.torn_down && **pos > cl.committed[*p as usize]
            })
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// Auto-commit: consumer `ci` commits its position on every partition
    /// that moved, on clusters that answer.
    fn periodic_commit(&mut self, ci: usize) {
        let moved = self.moved_positions(ci, |_| true);
        if moved.is_empty() {
            return;
        }
        self.stats.periodic_commits += 1;
        tr!(self, "cons{ci} auto-commits {} partitions", moved.len());
        for ((cx, p), to) in moved {
            self.commit_partition(ci, cx, p, to);
        }
    }

    /// Reads the backfill's target topic: its route's read set (one open
    /// epoch on the temporary clusters), committed as it goes.
    fn poll_backfill(&mut self, ci: usize, route: &TopicRoute) {
        let parts = self.cfg.partitions;
        let members = self.cfg.consumers as u32;
        let con = &self.consumers[ci];
        let rs = read_set(route, |c| con.retired.contains(c));
        for c in &rs {
            let cx = cluster_index(c);
            let cl = &self.clusters[cx as usize];
            if cl.torn_down || !cl.up {
                continue;
            }
            for p in (0..parts).filter(|p| p % members == ci as u32) {
                let cl = &self.clusters[cx as usize];
                let mut pos = cl.committed[p as usize];
                let end = (cl.logs[p as usize].len() as i64).min(pos + 64);
                while pos < end {
                    let rid = self.clusters[cx as usize].logs[p as usize][pos as usize];
                    self.deliver_copy(ci, cx, p, pos, rid);
                    pos += 1;
                    let cl = &mut self.clusters[cx as usize];
                    cl.committed[p as usize] = pos;
                    cl.has_commit[p as usize] = true;
                }
            }
        }
    }

    fn deliver_copy(&mut self, ci: usize, c: u16, p: u32, off: i64, rid: u64) {
        self.stats.consumed += 1;
        let r = &self.recs[rid as usize];
        let (key, seq) = (r.key, r.seq);
        tr!(
            self,
            "cons{ci} got copy r{rid} key{key}#{seq} from c{c}/{p}@{off} ({BF_TOPIC})"
        );
        let found = checker::on_delivery(
            rid,
            &mut self.recs[rid as usize],
            &mut self.bf_key_last[key as usize],
            (c, p, off),
        );
        for (kind, detail) in found {
            self.anomaly(kind, detail);
        }
    }

    /// Delivers record `rid` of `c/p@off` to the application of consumer
    /// `ci`, whose route is `view`, and checks it. Returns the key's last
    /// consumed sequence number before it (to undo an uncommitted delivery).
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        ci: usize,
        c: u16,
        p: u32,
        off: i64,
        rid: u64,
        class: RecordClass,
        view: &TopicRoute,
    ) -> Option<u64> {
        self.stats.consumed += 1;
        let r = &self.recs[rid as usize];
        let (key, seq, epoch) = (r.key, r.seq, r.epoch);
        tr!(
            self,
            "cons{ci} got r{rid} key{key}#{seq} from c{c}/{p}@{off} {class:?}"
        );
        let prev_last = self.key_last[key as usize];
        let mut found = checker::on_delivery(
            rid,
            &mut self.recs[rid as usize],
            &mut self.key_last[key as usize],
            (c, p, off),
        );
        if let Some((kind, detail)) =
            checker::before_seal(Some(view), &self.clusters[c as usize].name, epoch)
        {
            found.push((kind, format!("cons{ci} got r{rid}: {detail}")));
        }
        for (kind, detail) in found {
            self.anomaly(kind, detail);
        }
        prev_last
    }

    // ---------------------------------------------------------------- lifecycle

    fn on_restart(&mut self, l: usize) {
        let k = &mut self.links[l];
        if k.alive {
            return;
        }
        if k.started_at > 0 || k.rev > 0 {
            k.session += 1;
        }
        k.alive = true;
        k.rev = 0;
        k.cut_until = 0;
        k.zombie_until = 0;
        k.write_pending = true;
        k.write_retry = false;
        k.started_at = self.now.max(1);
        k.lease_ok_at = self.now;
        let (idx, sess, kind) = (k.idx, k.session, k.kind);
        let id = k.id();
        tr!(self, "# {id} starts");
        match kind {
            ClientKind::Producer => {
                let pr = &mut self.producers[idx];
                pr.router = Router::with_settlement(pr.settlement);
                pr.held_since = None;
                pr.sends.clear();
                pr.conns.clear();
                pr.held.clear();
                pr.unsettled.clear();
                pr.flush_waiters.clear();
                let gap = self.rng.random_range(1..2 * self.cfg.produce_gap_ms);
                self.after(gap, Ev::Produce { p: idx, sess });
            }
            ClientKind::Consumer => {
                let c = &mut self.consumers[idx];
                c.gate = FenceGate::new();
                c.route = None;
                c.retired.clear();
                c.fed.clear();
                c.sealed.clear();
                c.rs_cache = None;
                c.seen.clear();
                c.bf_route = None;
                c.prejoined.clear();
                c.parked.clear();
                c.joined.clear();
                c.pos.clear();
                c.uncommitted.clear();
                c.waiting.clear();
                c.next_commit = self.now + self.cfg.auto_commit_ms.unwrap_or(0);
                self.after(5, Ev::Poll { ci: idx, sess });
            }
        }
        self.reg_write(l);
        if self.link_ok(l) {
            self.send_snapshot(l);
        }
        let ttl = self.cfg.lease_ttl_ms;
        self.after(ttl / 3, Ev::Keepalive { l, sess });
    }

    /// Auto-commit: consumer `ci` died; what it delivered and did not commit
    /// will be delivered again by its next incarnation (at-least-once), so
    /// the checker forgets those deliveries. A key's uncommitted deliveries
    /// are the last of its deliveries (a later epoch's record is delivered
    /// only once the group committed the older one's fence; one partition
    /// commits as a prefix), so its last consumed sequence number goes back
    /// to what it was before the first of them.
    fn undo_uncommitted(&mut self, ci: usize) {
        let mut undo: Vec<Uncommitted> = std::mem::take(&mut self.consumers[ci].uncommitted)
            .into_values()
            .flatten()
            .collect();
        if undo.is_empty() {
            return;
        }
        undo.sort_by_key(|u| u.dseq);
        let mut keys = BTreeSet::new();
        for u in &undo {
            let r = &mut self.recs[u.rid as usize];
            r.consumed = r.consumed.saturating_sub(1);
            if !r.straggler && keys.insert(r.key) {
                self.key_last[r.key as usize] = u.prev_last;
            }
        }
        self.stats.redelivered += undo.len() as u64;
        tr!(
            self,
            "# cons{ci}: {} deliveries not committed (delivered again after the restart)",
            undo.len()
        );
    }

    fn crash(&mut self, l: usize) {
        let k = &mut self.links[l];
        k.alive = false;
        let (idx, kind) = (k.idx, k.kind);
        let id = k.id();
        tr!(self, "# CRASH {id}");
        if kind == ClientKind::Consumer {
            self.undo_uncommitted(idx);
        }
        if kind == ClientKind::Producer {
            let pr = &mut self.producers[idx];
            let mut lost: Vec<u64> = pr.held.drain(..).collect();
            for conn in pr.conns.values_mut() {
                lost.extend(conn.queue.drain(..));
            }
            for rid in lost {
                self.recs[rid as usize].failed = true;
                self.stats.failed += 1;
            }
        }
        let down = self.rng.random_range(200..3_000);
        self.after(down, Ev::Restart { l });
    }

    // ---------------------------------------------------------------- controller

    fn on_controller_tick(&mut self) {
        if self.now >= self.next_lag_sample {
            self.sample_lag();
        }
        if !self.reg_up {
            // As `Controller::reconcile_once`: a pass that cannot read the
            // registry forgets the ack waits, so they restart after the outage.
            self.ack_seen.clear();
            return;
        }
        let route = &self.truth.routes[TOPIC];
        let now_c = if self.cfg.bugs.ack_deadline_wall_clock {
            // Before the fix: the controller's (skewed) wall clock against a
            // deadline written with the proposer's clock.
            (self.now as i64 + self.skew).max(0) as u64
        } else {
            // As `Controller::ack_clock`: the pending epoch's `created_at` plus
            // how long this controller has seen it pending, on its monotonic
            // clock, so `plan`'s deadline passes after a full ack timeout of
            // its own whatever the skew.
            let now = self.now;
            match route.pending_epoch() {
                Some(p) => {
                    self.ack_seen.retain(|n, _| *n == p.n);
                    let first = *self.ack_seen.entry(p.n).or_insert(now);
                    p.created_at + (now - first)
                }
                None => {
                    self.ack_seen.clear();
                    now
                }
            }
        };
        let step = switch::plan(
            route,
            self.truth.producers(),
            now_c,
            self.cfg.on_ack_deadline,
        );
        match step {
            SwitchStep::Idle | SwitchStep::WaitForAcks { .. } => {}
            SwitchStep::ReadBoundary {
                epoch: pn,
                clusters,
                late,
            } => {
                let readable = clusters.iter().all(|c| {
                    let cl = &self.clusters[cluster_index(c) as usize];
                    cl.up && !cl.torn_down
                });
                if !readable {
                    // An unreadable cluster cannot be fenced: wait, and abort
                    // once twice the ack timeout has passed.
                    let deadline = route.epoch(pn).and_then(|e| e.ack_deadline);
                    if deadline.is_some_and(|d| now_c >= d + self.cfg.ack_deadline_ms) {
                        self.abort_pending(pn, "a cluster of the boundary is unreachable");
                    }
                } else {
                    let fence: BTreeMap<String, Vec<i64>> = clusters
                        .iter()
                        .map(|c| {
                            let cl = &self.clusters[cluster_index(c) as usize];
                            (c.clone(), cl.logs.iter().map(|l| l.len() as i64).collect())
                        })
                        .collect();
                    let acked_ids: BTreeSet<String> = self
                        .truth
                        .producers()
                        .filter(|r| r.acked.get(TOPIC).is_some_and(|&a| a >= pn))
                        .map(|r| r.id.clone())
                        .collect();
                    let sealed = route.open_epoch().map_or(0, |e| e.n);
                    match switch::seal(route, pn, fence.clone()) {
                        Ok(next) => {
                            self.truth.routes.insert(TOPIC.to_string(), next);
                            self.seals.insert(sealed, SealInfo { acked_ids });
                            if !late.is_empty() {
                                self.late_seals
                                    .record(TOPIC, sealed, pn, late.clone(), self.now);
                            }
                            let pause = self.now - self.proposed_at.get(&pn).copied().unwrap_or(0);
                            self.stats.switches.push((pn, pause));
                            tr!(
                                self,
                                "# SEAL e{sealed} fence {fence:?}; e{pn} open after {pause} ms (late: {late:?})"
                            );
                            self.commit();
                        }
                        Err(e) => self.anomaly(
                            AnomalyKind::SwitchStuck,
                            format!("seal of e{pn} refused: {e}"),
                        ),
                    }
                }
            }
            SwitchStep::Abort { epoch, reason } => self.abort_pending(epoch, &reason),
        }
        // Retire drained clusters the group no longer needs.
        let draining: Vec<String> = self
            .truth
            .clusters
            .values()
            .filter(|s| s.state == ClusterState::Draining)
            .map(|s| s.id.clone())
            .collect();
        let mut changed = false;
        for name in draining {
            let cx = cluster_index(&name) as usize;
            let route = &self.truth.routes[TOPIC];
            let ok = if self.cfg.bugs.retire_before_fence {
                !route.epochs.iter().any(|e| {
                    matches!(e.state, EpochState::Open | EpochState::Pending) && e.writes_to(&name)
                })
            } else if self.cfg.bugs.stragglers_lost {
                // Before the fix: the group passed the fences.
                let clusters = &self.clusters;
                let consumed = |_topic: &str, epoch: u64, cluster: &str| {
                    let cl = &clusters[cluster_index(cluster) as usize];
                    route
                        .epoch(epoch)
                        .and_then(|e| e.fence.get(cluster))
                        .is_none_or(|f| f.iter().enumerate().all(|(p, &o)| cl.committed[p] >= o))
                };
                switch::may_retire(&name, self.truth.routes.values(), consumed).is_ok()
            } else if !self.cfg.bugs.retire_ignores_late_producers && self.late_writers(&name) {
                false
            } else {
                // As the real controller (`Controller::fence_writes`): no live
                // epoch writes to the cluster any more, so its writes are
                // fenced at the Kafka level first, and the drained check runs
                // only on a later pass that finds the fence in place — then no
                // record (a zombie's, a late retry) can land after the check.
                // An unreachable cluster cannot be fenced (nor checked).
                let structural =
                    switch::may_retire(&name, self.truth.routes.values(), |_, _, _| true).is_ok();
                let fenced = if self.cfg.write_fence && structural {
                    let cl = &mut self.clusters[cx];
                    if !cl.readonly && cl.up {
                        cl.readonly = true;
                        tr!(self, "# WRITE-FENCE {name}");
                        false
                    } else {
                        cl.readonly
                    }
                } else {
                    !self.cfg.write_fence
                };
                // As `ControlPlane::check_retirable`: the group has committed
                // every partition up to the cluster's current end offsets (the
                // end offsets of an unreachable cluster cannot be read).
                let cl = &self.clusters[cx];
                let drained = fenced
                    && cl.up
                    && cl
                        .logs
                        .iter()
                        .zip(&cl.committed)
                        .all(|(log, &c)| log.is_empty() || c >= log.len() as i64);
                switch::may_retire(&name, self.truth.routes.values(), |_, _, _| drained).is_ok()
            };
            if ok {
                self.retire(cx);
                changed = true;
            }
        }
        // Prune history from the front: sealed or aborted epochs whose every
        // cluster is retired and torn down can never matter again (the
        // schema allows it; it keeps the route, and every gate, small).
        let clusters = &self.clusters;
        let gone = |c: &String| clusters[cluster_index(c) as usize].torn_down;
        let route = &self.truth.routes[TOPIC];
        let prunable = route
            .epochs
            .iter()
            .take_while(|e| {
                matches!(e.state, EpochState::Sealed | EpochState::Aborted)
                    && e.clusters().all(gone)
                    && e.fence.keys().all(gone)
            })
            .count();
        if prunable > 0 {
            let route = self.truth.routes.get_mut(TOPIC).expect("route");
            route.epochs.drain(..prunable);
            tr!(self, "controller prunes {prunable} old epochs");
            changed = true;
        }
        if changed {
            self.commit();
        }
        self.after(200, Ev::ControllerTick);
    }

    /// Records one [`Stats::lag`] sample: what the group still has to read on
    /// every cluster that still holds data.
    fn sample_lag(&mut self) {
        let lag: u64 = self
            .clusters
            .iter()
            .filter(|c| !c.torn_down)
            .map(|c| {
                c.logs
                    .iter()
                    .zip(&c.committed)
                    .map(|(log, &done)| (log.len() as i64 - done.max(0)).max(0) as u64)
                    .sum::<u64>()
            })
            .sum();
        self.stats.lag.push((self.now, lag));
        self.next_lag_sample = self.now - self.now % LAG_SAMPLE_MS + LAG_SAMPLE_MS;
    }

    /// The real controller's late-seal rule ([`LateSeals::blocking`]): whether a
    /// producer the controller sealed an epoch writing `cluster` without may
    /// still have records in flight for it.
    fn late_writers(&mut self, cluster: &str) -> bool {
        self.late_seals
            .blocking(&self.truth, cluster, self.now, LATE_GRACE_MS)
            .is_some()
    }

    fn abort_pending(&mut self, n: u64, why: &str) {
        let route = &self.truth.routes[TOPIC];
        if let Ok(next) = switch::abort(route, n) {
            self.truth.routes.insert(TOPIC.to_string(), next);
            self.stats.aborted += 1;
            tr!(self, "# ABORT e{n}: {why}");
            self.commit();
        }
    }

    fn retire(&mut self, cx: usize) {
        let name = self.clusters[cx].name.clone();
        if let Some(s) = self.truth.clusters.get_mut(&name) {
            s.state = ClusterState::Retired;
        }
        self.stats.retired += 1;
        tr!(self, "# RETIRE {name}");
        let mut missing = Vec::new();
        for (p, log) in self.clusters[cx].logs.iter().enumerate() {
            for (o, &rid) in log.iter().enumerate() {
                if checker::needed_at_retirement(&self.recs[rid as usize]) {
                    missing.push((p, o, rid));
                }
            }
        }
        if let Some(&(p, o, rid)) = missing.first() {
            self.anomaly(
                AnomalyKind::RetiredWhileNeeded,
                format!(
                    "{name} retired with {} unconsumed records, first r{rid} at {p}@{o}",
                    missing.len()
                ),
            );
        }
        let d = self.rng.random_range(200..1_000);
        self.after(d, Ev::Teardown { c: cx as u16 });
    }

    // ---------------------------------------------------------------- operator

    fn on_operator_tick(&mut self) {
        if self.now >= self.active_end {
            return;
        }
        let (lo, hi) = self.cfg.switch_gap_ms;
        if !self.reg_up {
            self.after(200, Ev::OperatorTick);
            return;
        }
        let route = &self.truth.routes[TOPIC];
        if route.pending_epoch().is_some() {
            self.after(200, Ev::OperatorTick);
            return;
        }
        let open: Vec<String> = route
            .open_epoch()
            .map(|e| e.clusters().cloned().collect())
            .unwrap_or_default();
        let flap = self.cfg.faults.has(Fault::Flap);
        let active = |w: &World, set: &[String]| {
            set.iter().all(|c| {
                w.truth
                    .clusters
                    .get(c)
                    .is_some_and(|s| s.state == ClusterState::Active)
            })
        };
        let next: Vec<String> = match self.prev_write.clone() {
            Some(prev)
                if flap && prev != open && active(self, &prev) && self.rng.random_bool(0.3) =>
            {
                prev
            }
            _ if open.len() >= 2 => vec![open.last().expect("non-empty").clone()],
            _ => {
                let c = self.add_cluster();
                let mut n = open.clone();
                n.push(cluster_name(c));
                n
            }
        };
        // Drain what neither the open nor the next write set uses.
        let drain: Vec<String> = self
            .truth
            .clusters
            .values()
            .filter(|s| {
                s.state == ClusterState::Active
                    && s.role == ClusterRole::Permanent
                    && !open.contains(&s.id)
                    && !next.contains(&s.id)
            })
            .map(|s| s.id.clone())
            .collect();
        for c in &drain {
            if let Some(s) = self.truth.clusters.get_mut(c) {
                s.state = ClusterState::Draining;
            }
            tr!(self, "# DRAIN {c}");
        }
        let write: Vec<WeightedCluster> = next
            .iter()
            .map(|c| WeightedCluster {
                cluster: c.clone(),
                weight: 100,
            })
            .collect();
        let proposed = switch::propose(
            self.truth.routes.get(TOPIC),
            TOPIC,
            self.cfg.partitions,
            write,
            &self.truth.clusters,
            self.now,
            self.cfg.ack_deadline_ms,
        );
        let route = match proposed {
            Ok(r) => r,
            Err(e) => {
                tr!(self, "# operator's proposal refused: {e}");
                let gap = self.rng.random_range(lo..hi);
                self.after(gap, Ev::OperatorTick);
                return;
            }
        };
        let n = route.last_epoch_n();
        self.truth.routes.insert(TOPIC.to_string(), route);
        self.proposed_at.insert(n, self.now);
        self.prev_write = Some(open);
        tr!(self, "# PROPOSE e{n} -> {next:?}");
        self.commit();
        if flap && self.rng.random_bool(0.15) {
            let d = self.rng.random_range(0..300);
            self.after(d, Ev::OperatorAbort { n });
        }
        let gap = self.rng.random_range(lo..hi);
        self.after(gap, Ev::OperatorTick);
    }

    fn on_operator_abort(&mut self, n: u64) {
        if !self.reg_up {
            return;
        }
        if self.truth.routes[TOPIC]
            .pending_epoch()
            .is_some_and(|e| e.n == n)
        {
            self.abort_pending(n, "operator cancelled the switch");
        }
    }

    // ---------------------------------------------------------------- faults

    fn on_fault_start(&mut self) {
        if self.now >= self.active_end {
            return;
        }
        let gap = self.cfg.fault_gap_ms;
        let next = self.rng.random_range(gap / 2..gap * 3 / 2);
        self.after(next, Ev::FaultStart);
        let kinds: Vec<Fault> = self
            .cfg
            .faults
            .iter()
            .filter(|f| !matches!(f, Fault::Ambiguous | Fault::Flap))
            .collect();
        if kinds.is_empty() {
            return;
        }
        let f = kinds[self.rng.random_range(0..kinds.len())];
        *self.stats.faults.entry(f).or_insert(0) += 1;
        match f {
            Fault::ClusterLoss => {
                let live: Vec<u16> = (0..self.clusters.len() as u16)
                    .filter(|&c| {
                        let cl = &self.clusters[c as usize];
                        cl.up && !cl.torn_down
                    })
                    .collect();
                if live.is_empty() {
                    return;
                }
                let c = live[self.rng.random_range(0..live.len())];
                self.clusters[c as usize].up = false;
                let d = self.rng.random_range(500..5_000);
                tr!(self, "# FAULT cluster c{c} lost for {d} ms");
                self.after(
                    d,
                    Ev::FaultEnd {
                        what: FaultEnd::ClusterBack(c),
                    },
                );
            }
            Fault::Partition => {
                let l = self.rng.random_range(0..self.links.len());
                let d = self.rng.random_range(300..6_000);
                let k = &mut self.links[l];
                k.cut_until = k.cut_until.max(self.now + d);
                let until = k.cut_until;
                tr!(
                    self,
                    "# FAULT {} cut from the registry for {d} ms",
                    self.links[l].id()
                );
                self.at(until, Ev::LinkHeal { l });
            }
            Fault::RegistryOutage => {
                if !self.reg_up {
                    return;
                }
                self.reg_up = false;
                let d = self.rng.random_range(300..4_000);
                tr!(self, "# FAULT registry down for {d} ms");
                self.after(
                    d,
                    Ev::FaultEnd {
                        what: FaultEnd::RegistryBack,
                    },
                );
            }
            Fault::Zombie => {
                if !self.reg_up {
                    return;
                }
                let p = self.rng.random_range(0..self.cfg.producers);
                if !self.links[p].alive || self.now < self.links[p].zombie_until {
                    return;
                }
                let d = self.rng.random_range(500..5_000);
                self.links[p].zombie_until = self.now + d;
                let id = self.links[p].id();
                tr!(
                    self,
                    "# FAULT {id} loses its lease without noticing for {d} ms"
                );
                self.leases.remove(&id);
                self.expire_client(&id);
                self.after(d, Ev::LinkHeal { l: p });
            }
            Fault::Crash => {
                if self
                    .bf
                    .as_ref()
                    .is_some_and(|b| b.alive && b.phase == BfPhase::Copying)
                    && self.rng.random_bool(0.5)
                {
                    self.crash_copy_worker();
                    return;
                }
                let l = self.rng.random_range(0..self.links.len());
                if self.links[l].alive {
                    self.crash(l);
                }
            }
            Fault::ClockJump => {
                let j = self.rng.random_range(-4_000i64..4_000);
                self.skew = (self.skew + j).clamp(-5_000, 5_000);
                tr!(
                    self,
                    "# FAULT controller clock jumps {j} ms (skew {})",
                    self.skew
                );
            }
            Fault::Ambiguous | Fault::Flap => {}
        }
    }

    fn on_fault_end(&mut self, what: FaultEnd) {
        match what {
            FaultEnd::ClusterBack(c) => {
                self.clusters[c as usize].up = true;
                tr!(self, "# cluster c{c} back");
            }
            FaultEnd::RegistryBack => self.registry_back(),
        }
    }

    fn registry_back(&mut self) {
        if self.reg_up {
            return;
        }
        self.reg_up = true;
        tr!(self, "# registry back");
        // A new etcd leader extends every lease.
        let ttl = self.cfg.lease_ttl_ms;
        let ids: Vec<String> = self.leases.keys().cloned().collect();
        for id in ids {
            let e = self.leases.get_mut(&id).expect("listed");
            *e = (*e).max(self.now + ttl);
            self.after(ttl + 1, Ev::LeaseCheck { id });
        }
        for l in 0..self.links.len() {
            self.on_link_heal(l);
        }
        self.after(1, Ev::ControllerTick);
    }

    fn on_heal(&mut self) {
        self.healed = true;
        tr!(self, "# HEAL: every fault ends");
        for c in 0..self.clusters.len() {
            self.clusters[c].up = true;
        }
        self.skew = 0;
        self.registry_back();
        for l in 0..self.links.len() {
            let k = &mut self.links[l];
            if k.cut_until > self.now || k.zombie_until > self.now {
                k.cut_until = 0;
                k.zombie_until = 0;
                self.on_link_heal(l);
            }
        }
    }

    // ---------------------------------------------------------------- backfill

    /// The operator starts the backfill (as `flotilla backfill run`): the
    /// source range is what the fullest permanent cluster holds now; one or
    /// two temporary clusters are registered and the target topic routed to
    /// them; the copy worker starts at the range start.
    fn on_backfill_start(&mut self) {
        if !self.reg_up {
            self.after(200, Ev::BackfillStart);
            return;
        }
        let src = (0..self.clusters.len() as u16)
            .filter(|&c| {
                let cl = &self.clusters[c as usize];
                cl.up && !cl.torn_down
            })
            .max_by_key(|&c| {
                let n: usize = self.clusters[c as usize].logs.iter().map(Vec::len).sum();
                (n, std::cmp::Reverse(c))
            });
        let Some(src) =
            src.filter(|&c| self.clusters[c as usize].logs.iter().any(|l| !l.is_empty()))
        else {
            self.after(500, Ev::BackfillStart);
            return;
        };
        let ends: Vec<u64> = self.clusters[src as usize]
            .logs
            .iter()
            .map(|l| l.len() as u64)
            .collect();
        let longest = ends.iter().copied().max().unwrap_or(0);
        let mut order = Vec::new();
        for o in 0..longest {
            for (p, &e) in ends.iter().enumerate() {
                if o < e {
                    order.push((p as u32, o));
                }
            }
        }
        let n = self.rng.random_range(1..3usize);
        let mut temps = Vec::new();
        for _ in 0..n {
            let c = self.add_cluster();
            let spec = self
                .truth
                .clusters
                .get_mut(&cluster_name(c))
                .expect("just added");
            spec.role = ClusterRole::Temporary {
                purpose: "bf1".to_string(),
                expires_at: u64::MAX / 2,
            };
            temps.push(c);
        }
        let write = temps
            .iter()
            .map(|&c| WeightedCluster {
                cluster: cluster_name(c),
                weight: 100,
            })
            .collect();
        self.truth.routes.insert(
            BF_TOPIC.to_string(),
            TopicRoute {
                version: SCHEMA_VERSION,
                topic: BF_TOPIC.to_string(),
                partitions: self.cfg.partitions,
                epochs: vec![Epoch {
                    n: 1,
                    write,
                    state: EpochState::Open,
                    fence: BTreeMap::new(),
                    created_at: self.now,
                    ack_deadline: None,
                }],
            },
        );
        tr!(
            self,
            "# BACKFILL from c{src} ends {ends:?} ({} records) to {BF_TOPIC} on {temps:?}",
            order.len()
        );
        self.commit();
        let mut router = Router::new();
        router.on_snapshot(&self.published);
        let batch = (order.len() / 40).max(4);
        self.bf = Some(Backfill {
            src,
            batch,
            order,
            temps,
            phase: BfPhase::Copying,
            router,
            alive: true,
            session: 0,
            pos: 0,
            checkpoint: 0,
            skip: BTreeSet::new(),
            headers: BTreeMap::new(),
        });
        self.after(5, Ev::CopyStep { sess: 0 });
        self.after(200, Ev::BackfillTick);
    }

    /// One step of the copy worker: up to a batch of source records routed by
    /// the real `Router` and appended to the target topic with their
    /// `flotilla-src` header; a checkpoint every [`CHECKPOINT_EVERY`].
    fn on_copy_step(&mut self, sess: u32) {
        let Some(bf) = self.bf.as_mut() else { return };
        if !bf.alive || bf.session != sess || bf.phase != BfPhase::Copying {
            return;
        }
        let src = bf.src as usize;
        if !self.clusters[src].up {
            self.after(100, Ev::CopyStep { sess });
            return;
        }
        let mut retry = None;
        let batch = self.bf.as_ref().expect("checked").batch;
        for _ in 0..batch {
            let bf = self.bf.as_mut().expect("checked");
            let Some(&(p, o)) = bf.order.get(bf.pos) else {
                bf.phase = BfPhase::Waiting;
                let n = bf.order.len();
                tr!(self, "# BACKFILL copied the {n} records of its range");
                return;
            };
            if bf.skip.contains(&(p, o)) {
                bf.pos += 1;
                continue;
            }
            let srid = self.clusters[src].logs[p as usize][o as usize];
            let (key, seq) = {
                let r = &self.recs[srid as usize];
                (r.key, r.seq)
            };
            let bf = self.bf.as_mut().expect("checked");
            match bf
                .router
                .route(BF_TOPIC, Some(&self.key_bytes[key as usize]))
            {
                Decision::Send {
                    cluster,
                    partition,
                    epoch,
                } => {
                    let cx = cluster_index(&cluster);
                    let cl = &self.clusters[cx as usize];
                    if !cl.up || cl.torn_down || cl.readonly {
                        let _ = bf.router.on_settled(BF_TOPIC, epoch);
                        retry = Some(100);
                        break;
                    }
                    let rid = self.recs.len() as u64;
                    let off = self.clusters[cx as usize].logs[partition as usize].len() as u64;
                    self.clusters[cx as usize].logs[partition as usize].push(rid);
                    self.recs.push(RecInfo {
                        key,
                        seq,
                        producer: COPY_WORKER,
                        session: sess,
                        epoch,
                        sent_at: self.now,
                        cluster: cx,
                        partition,
                        offset: Some(off),
                        acked: true,
                        ..RecInfo::default()
                    });
                    bf.headers
                        .insert(rid, src_header_value(p as i32, o as i64).into_bytes());
                    let _ = bf.router.on_settled(BF_TOPIC, epoch);
                    bf.pos += 1;
                    self.stats.backfill_copied += 1;
                    tr!(
                        self,
                        "copy c{src}/{p}@{o} (r{srid}) -> r{rid} {cluster}/{partition}@{off}"
                    );
                    let bf = self.bf.as_mut().expect("checked");
                    if bf.pos - bf.checkpoint >= CHECKPOINT_EVERY {
                        bf.checkpoint = bf.pos;
                        let at = bf.pos;
                        tr!(self, "copy worker checkpoint at {at}");
                    }
                }
                Decision::Hold => {
                    retry = Some(50);
                    break;
                }
                Decision::NoRoute(e) => {
                    tr!(self, "copy worker: no route: {e}");
                    retry = Some(200);
                    break;
                }
            }
        }
        let d = retry.unwrap_or_else(|| self.rng.random_range(40..120));
        self.after(d, Ev::CopyStep { sess });
    }

    fn crash_copy_worker(&mut self) {
        let bf = self.bf.as_mut().expect("running");
        bf.alive = false;
        let (pos, cp) = (bf.pos, bf.checkpoint);
        self.stats.backfill_crashes += 1;
        tr!(self, "# CRASH copy worker at {pos} (checkpoint {cp})");
        let d = self.rng.random_range(200..2_000);
        self.after(d, Ev::CopyRestart);
    }

    /// The copy worker restarts (`flotilla backfill resume`): from its last
    /// checkpoint, skipping the source positions whose `flotilla-src` header
    /// it finds on the target topic (the dedupe scan).
    fn on_copy_restart(&mut self) {
        let dedupe = !self.cfg.bugs.backfill_no_dedupe;
        let published = self.published.clone();
        let clusters = &self.clusters;
        let bf = self.bf.as_mut().expect("running");
        bf.session += 1;
        bf.alive = true;
        bf.pos = bf.checkpoint;
        bf.router = Router::new();
        let _ = bf.router.on_snapshot(&published);
        bf.skip.clear();
        if dedupe {
            for &t in &bf.temps {
                for log in &clusters[t as usize].logs {
                    for rid in log {
                        if let Some((p, o)) = bf.headers.get(rid).and_then(|h| parse_src_header(h))
                        {
                            bf.skip.insert((p as u32, o as u64));
                        }
                    }
                }
            }
        }
        let (sess, cp, n) = (bf.session, bf.checkpoint, bf.skip.len());
        tr!(
            self,
            "# copy worker resumes at checkpoint {cp}, dedupe scan found {n} copies"
        );
        self.after(5, Ev::CopyStep { sess });
    }

    /// The operator's side of the backfill after the copy: wait until the
    /// group consumed the temporary clusters, then delete the target route
    /// (it created it) and drain them; the controller's retirement rules do
    /// the rest.
    fn on_backfill_tick(&mut self) {
        let Some(bf) = self.bf.as_ref() else { return };
        let phase = bf.phase;
        let temps = bf.temps.clone();
        match phase {
            BfPhase::Copying => {}
            BfPhase::Waiting if self.reg_up => {
                let consumed = self.cfg.bugs.backfill_skip_wait
                    || temps.iter().all(|&t| {
                        let cl = &self.clusters[t as usize];
                        cl.up
                            && cl
                                .logs
                                .iter()
                                .zip(&cl.committed)
                                .all(|(log, &c)| c >= log.len() as i64)
                    });
                if consumed {
                    self.truth.routes.remove(BF_TOPIC);
                    for &t in &temps {
                        if let Some(s) = self.truth.clusters.get_mut(&cluster_name(t)) {
                            s.state = ClusterState::Draining;
                        }
                    }
                    tr!(
                        self,
                        "# BACKFILL consumed: route {BF_TOPIC} deleted, DRAIN {temps:?}"
                    );
                    self.bf.as_mut().expect("running").phase = BfPhase::TearingDown;
                    self.commit();
                }
            }
            BfPhase::Waiting => {}
            BfPhase::TearingDown => {
                let retired = temps.iter().all(|&t| {
                    self.truth
                        .clusters
                        .get(&cluster_name(t))
                        .is_some_and(|s| s.state == ClusterState::Retired)
                });
                if retired {
                    self.bf.as_mut().expect("running").phase = BfPhase::Done;
                    self.stats.backfill_done = true;
                    tr!(self, "# BACKFILL done: temporary clusters retired");
                    return;
                }
            }
            BfPhase::Done => return,
        }
        self.after(200, Ev::BackfillTick);
    }

    /// The backfill's part of the final check: every source position of the
    /// range delivered exactly once on the target topic, the backfill done
    /// (temporary clusters retired).
    fn final_check_backfill(&mut self) {
        let Some(bf) = self.bf.take() else {
            if self.cfg.backfills {
                self.anomaly(
                    AnomalyKind::BackfillIncomplete,
                    "the backfill never started".to_string(),
                );
            }
            return;
        };
        let mut delivered: BTreeMap<(u32, u64), u32> = BTreeMap::new();
        for (rid, h) in &bf.headers {
            let (p, o) = parse_src_header(h).expect("the worker wrote it");
            *delivered.entry((p as u32, o as u64)).or_insert(0) +=
                self.recs[*rid as usize].consumed;
        }
        let mut missing = Vec::new();
        let mut twice = Vec::new();
        for &(p, o) in &bf.order {
            match delivered.get(&(p, o)).copied().unwrap_or(0) {
                0 => missing.push((p, o)),
                1 => {}
                n => twice.push((p, o, n)),
            }
        }
        let src = bf.src;
        if let Some(&(p, o)) = missing.first() {
            self.anomaly(
                AnomalyKind::BackfillIncomplete,
                format!(
                    "{} source records of c{src} never delivered on {BF_TOPIC}, first {p}:{o}",
                    missing.len()
                ),
            );
        }
        for (p, o, n) in twice {
            self.anomaly(
                AnomalyKind::DuplicateDelivery,
                format!("source c{src}/{p}@{o} delivered {n} times on {BF_TOPIC}"),
            );
        }
        if bf.phase != BfPhase::Done {
            let phase = bf.phase;
            self.anomaly(
                AnomalyKind::BackfillIncomplete,
                format!("backfill still {phase:?} at the end (temporary clusters not retired)"),
            );
        }
        self.stats.backfill_retired = bf
            .temps
            .iter()
            .filter(|&&t| {
                self.truth
                    .clusters
                    .get(&cluster_name(t))
                    .is_some_and(|s| s.state == ClusterState::Retired)
            })
            .count() as u64;
        self.bf = Some(bf);
    }

    // ---------------------------------------------------------------- checker

    fn final_check(&mut self) {
        tr!(self, "# END: checking the history");
        for rid in 0..self.recs.len() {
            let r = &self.recs[rid];
            let cl = &self.clusters[r.cluster as usize];
            let Some(kind) = checker::unconsumed(r, cl.torn_down) else {
                continue;
            };
            let at = format!("{}/{}@{}", cl.name, r.partition, r.offset.unwrap_or(0));
            let what = format!("r{rid} key{}#{} e{} at {at}", r.key, r.seq, r.epoch);
            self.anomaly(kind, format!("acknowledged {what} never consumed"));
        }
        // Each record id is at exactly one (cluster, partition, offset).
        let mut seen = vec![false; self.recs.len()];
        let mut twice = Vec::new();
        for cl in &self.clusters {
            for (p, log) in cl.logs.iter().enumerate() {
                for (o, &rid) in log.iter().enumerate() {
                    if std::mem::replace(&mut seen[rid as usize], true) {
                        twice.push(format!("r{rid} again at {}/{p}@{o}", cl.name));
                    }
                }
            }
        }
        for t in twice {
            self.anomaly(AnomalyKind::DuplicateAppend, t);
        }
        if let Some(p) = self.truth.routes[TOPIC].pending_epoch() {
            let n = p.n;
            self.anomaly(
                AnomalyKind::SwitchStuck,
                format!("epoch {n} still pending at the end"),
            );
        }
        for p in 0..self.producers.len() {
            if !self.links[p].alive {
                continue;
            }
            let pr = &self.producers[p];
            let queued: usize = pr
                .conns
                .values()
                .map(|c| c.queue.len() + c.inflight.as_ref().map_or(0, |i| i.rids.len()))
                .sum();
            if !pr.held.is_empty() || queued > 0 {
                let held = pr.held.len();
                self.anomaly(
                    AnomalyKind::ProducerStuck,
                    format!("prod{p}: {held} records held, {queued} in flight at the end"),
                );
            }
        }
        if self.cfg.backfills {
            self.final_check_backfill();
        }
    }
}
