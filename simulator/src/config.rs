//! What a simulated run looks like: sizes, timings, faults and deliberately broken variants.

use std::fmt;
use std::str::FromStr;

pub use flotilla_client::route::switch::OnAckDeadline;

/// One kind of fault the simulator can inject. Each is toggled independently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// A Kafka cluster becomes unreachable for a while, then returns (nothing is lost).
    ClusterLoss,
    /// One client cannot reach the registry: its watch goes stale, its writes
    /// and lease renewals fail (a long one turns a producer into a zombie).
    Partition,
    /// The whole registry is unavailable for a while (no writes, no watch events).
    RegistryOutage,
    /// The registry expires a live producer's lease while the producer does not
    /// notice and keeps writing on a stale view: its late records become stragglers.
    Zombie,
    /// A client process crashes and restarts later with a fresh state.
    Crash,
    /// A produce request is applied but its reply is lost; the producer retries
    /// and idempotence removes the duplicate.
    Ambiguous,
    /// The operator flaps routes: goes back to the previous write set, or
    /// cancels a proposal shortly after making it.
    Flap,
    /// The controller's clock jumps forward or backward.
    ClockJump,
}

impl Fault {
    /// Every fault, in a fixed order.
    pub const ALL: [Fault; 8] = [
        Fault::ClusterLoss,
        Fault::Partition,
        Fault::RegistryOutage,
        Fault::Zombie,
        Fault::Crash,
        Fault::Ambiguous,
        Fault::Flap,
        Fault::ClockJump,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::ClusterLoss => "cluster-loss",
            Fault::Partition => "partition",
            Fault::RegistryOutage => "registry-outage",
            Fault::Zombie => "zombie",
            Fault::Crash => "crash",
            Fault::Ambiguous => "ambiguous",
            Fault::Flap => "flap",
            Fault::ClockJump => "clock-jump",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fault::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault `{s}` (known: {})", names.join(", "))
            })
    }
}

/// A set of enabled faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Faults(u16);

impl Faults {
    /// No fault at all.
    pub fn none() -> Self {
        Faults(0)
    }

    /// Every fault.
    pub fn all() -> Self {
        Fault::ALL.iter().fold(Faults(0), |s, f| s.with(*f))
    }

    /// This set plus `f`.
    pub fn with(self, f: Fault) -> Self {
        Faults(self.0 | f.bit())
    }

    /// Whether `f` is enabled.
    pub fn has(self, f: Fault) -> bool {
        self.0 & f.bit() != 0
    }

    /// The enabled faults, in [`Fault::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Fault> {
        Fault::ALL.into_iter().filter(move |f| self.has(*f))
    }

    /// Parses a comma-separated list (`all` and `none` are accepted too).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut s = Faults::none();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "all" => s = Faults::all(),
                "none" => {}
                other => s = s.with(other.parse()?),
            }
        }
        Ok(s)
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.iter().map(|x| x.name()).collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// Deliberately broken variants of the *adapters* around the real core, used
/// to prove that the checker notices when the protocol is not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Bugs {
    /// The producer adapter answers `Flush` at once, without waiting for its
    /// records in flight: the router acknowledges too early. (Every producer
    /// then uses [`Settlement::PerFlush`](flotilla_client::route::router::Settlement),
    /// the mode where `on_flushed` is what releases the ack.)
    pub skip_flush_before_ack: bool,
    /// A consumer that starts reading a cluster it never committed on starts at
    /// the high watermark (`auto.offset.reset=latest`) instead of the beginning.
    pub consumer_from_latest: bool,
    /// The controller retires a drained cluster without waiting for the group
    /// to consume it up to its fences.
    pub retire_before_fence: bool,
    /// Consumers ignore the fence gate's limit (`allowed_until`) and read
    /// every cluster of the read set as fast as they can.
    pub consumer_ignores_gate: bool,
    /// Turn off the consumer adapter's workaround for finding 1 (a gate that
    /// never learns the committed offsets of a retired cluster waits forever).
    pub no_retired_workaround: bool,
    /// The rules before the fix of bug 1 (finding 2): consumers drop a sealed
    /// epoch's cluster from the read set once the group passed its fence, and
    /// the controller retires a drained cluster once the group passed its
    /// fences (not its end offsets). Stragglers are lost.
    pub stragglers_lost: bool,
    /// The controller before the fix of bug 2 (finding 3): the ack deadline
    /// (proposer's clock) is compared with the controller's own wall clock,
    /// not with how long the controller itself has waited.
    pub ack_deadline_wall_clock: bool,
    /// The controller retires a drained cluster even while a producer it
    /// sealed an epoch of that cluster without (late) may still have records
    /// in flight for it (before `Controller::with_late_grace`).
    pub retire_ignores_late_producers: bool,
    /// With [`Config::backfills`]: the copy worker resumes from its checkpoint
    /// without the dedupe scan by source coordinates, so records copied after
    /// the checkpoint are copied twice.
    pub backfill_no_dedupe: bool,
    /// With [`Config::backfills`]: the operator moves the target topic off the
    /// temporary clusters and drains them as soon as the copy ends, without
    /// waiting for the group to consume them.
    pub backfill_skip_wait: bool,
    /// With [`Config::prejoin`]: a consumer hands the records it reads from a
    /// pre-joined cluster (a pending epoch's, not gated by its route) to the
    /// application at once, without holding them until the seal nor asking
    /// the fence gate: `delivered-before-seal`.
    pub prejoin_delivers: bool,
}

/// What a producer does when it cannot renew its registry lease (DESIGN step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum LeasePolicy {
    /// Keep writing (availability; the default): late records become stragglers.
    #[default]
    KeepWriting,
    /// Hold new sends until the lease is back (fewer stragglers).
    Hold,
}

/// Shape and timing of one simulated run. All times are virtual milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Partitions of the simulated topic (the same on every cluster).
    pub partitions: u32,
    /// Producer processes.
    pub producers: usize,
    /// Members of the consumer group.
    pub consumers: usize,
    /// Keys each producer owns (a key is written by one producer only, with
    /// increasing sequence numbers).
    pub keys_per_producer: u32,
    /// Length of the phase with traffic, route changes and faults.
    pub active_ms: u64,
    /// After the active phase all faults heal; the run continues this long so
    /// switches complete and consumers catch up (the liveness bound).
    pub drain_ms: u64,
    /// Mean gap between two records of one producer.
    pub produce_gap_ms: u64,
    /// Range of the gap between two operator route changes.
    pub switch_gap_ms: (u64, u64),
    /// Client lease TTL in the registry.
    pub lease_ttl_ms: u64,
    /// How long the controller waits for acknowledgements of a pending epoch.
    pub ack_deadline_ms: u64,
    /// Mean gap between two injected faults (of any enabled kind).
    pub fault_gap_ms: u64,
    /// Enabled faults.
    pub faults: Faults,
    /// Deliberately broken adapter variants (all off for a correct run).
    pub bugs: Bugs,
    /// Producer behaviour without a lease.
    pub lease_policy: LeasePolicy,
    /// What the controller does when the ack deadline passes with acks missing.
    pub on_ack_deadline: OnAckDeadline,
    /// The controller fences writes to a drained cluster at the Kafka level
    /// before the drained check of retirement (as the real controller does:
    /// `max.message.bytes=0` on its topics), so a zombie producer cut from the
    /// registry, or late retries, cannot land records after the check: they
    /// fail instead. On by default; `false` (`--no-write-fence`) is the
    /// control plane before the fence, which loses them (finding 2).
    pub write_fence: bool,
    /// The operator also runs one backfill (docs/simulator.md, "Backfills"):
    /// temporary clusters, a copy worker replaying a range of the topic into a
    /// target topic through the real `Router`, consumers reading it, then
    /// drain and retirement. Off by default: a run without it draws no extra
    /// random number and writes no extra trace line.
    pub backfills: bool,
    /// Consumers pre-join the clusters of a pending epoch (`gate::prejoin_set`),
    /// as `FleetConsumer` does: they join the group there while the switch is
    /// pending, and hold everything they read from such a cluster until their
    /// route gates it (`gate::gated_by_route`: the epoch sealed); an abort
    /// drops the pre-joined reader and what it held. On by default.
    pub prejoin: bool,
    /// How long a consumer takes to join the group on a cluster it starts
    /// reading (JoinGroup, SyncGroup, offset fetch: ~0.15–0.2 s for the real
    /// one); it reads nothing there before. Pre-join pays it while the epoch
    /// is pending. 0 = no join delay.
    pub join_ms: u64,
    /// Consumers auto-commit (`enable.auto.commit`): every this many ms they
    /// commit what they delivered (at-least-once: a crash delivers the
    /// uncommitted records again). `None`: an exactly-once sink, each record
    /// processed and committed in one step.
    pub auto_commit_ms: Option<u64>,
    /// With [`Config::auto_commit_ms`]: a consumer that delivers the last
    /// record below a fence end (`FenceGate::completes_fence`) commits that
    /// partition at once instead of at the next periodic commit, as
    /// `FleetConsumer` does.
    pub fence_commit: bool,
    /// With [`Config::auto_commit_ms`]: when a consumer's route changes and
    /// its gate shows fence ends (`FenceGate::fence_ends`) on a cluster it
    /// reads that the group has not committed up to (`FenceGate::committed`
    /// unknown or below), it commits its delivered positions on that cluster
    /// at once, as `FleetConsumer` does since the fix of the "seal after the
    /// last delivery" gap: a member that keeps up delivered the old epoch
    /// before the seal brought its fence, so no delivery completes it.
    pub seal_commit: bool,
    /// Keep the readable trace lines (the hash of the trace is always computed).
    pub keep_trace: bool,
}

impl Default for Config {
    /// The realistic schedule used by the CLI and the speed measurement:
    /// 4 producers, 3 consumers, 8 partitions, 3 virtual minutes with a route
    /// change every 2–6 s (dozens of switches, a new cluster every other one).
    fn default() -> Self {
        Config {
            partitions: 8,
            producers: 4,
            consumers: 3,
            keys_per_producer: 32,
            active_ms: 180_000,
            drain_ms: 30_000,
            produce_gap_ms: 10,
            switch_gap_ms: (2_000, 6_000),
            lease_ttl_ms: 2_000,
            ack_deadline_ms: 3_000,
            fault_gap_ms: 4_000,
            faults: Faults::none(),
            bugs: Bugs::default(),
            lease_policy: LeasePolicy::KeepWriting,
            on_ack_deadline: OnAckDeadline::Proceed,
            write_fence: true,
            backfills: false,
            prejoin: true,
            join_ms: 150,
            auto_commit_ms: Some(1_000),
            fence_commit: true,
            seal_commit: true,
            keep_trace: false,
        }
    }
}

impl Config {
    /// This config with the consumer model before pre-join and auto-commit:
    /// an exactly-once sink that commits every record as it processes it, no
    /// join delay, no pre-join. Runs are then byte-identical (same trace
    /// hashes) to the simulator before those were modelled; the repro seeds
    /// of the findings were measured with it.
    pub fn sink_consumer(mut self) -> Self {
        self.prejoin = false;
        self.join_ms = 0;
        self.auto_commit_ms = None;
        self.fence_commit = false;
        self.seal_commit = false;
        self
    }

    /// A tiny schedule for the debug-build test suite: 12 virtual seconds.
    pub fn tiny() -> Self {
        Config {
            partitions: 4,
            producers: 3,
            consumers: 2,
            keys_per_producer: 6,
            active_ms: 12_000,
            drain_ms: 15_000,
            produce_gap_ms: 40,
            switch_gap_ms: (500, 1_500),
            fault_gap_ms: 800,
            ..Config::default()
        }
    }

    /// A short schedule for the test suite: 20 virtual seconds, fewer clients.
    pub fn short() -> Self {
        Config {
            partitions: 4,
            producers: 3,
            consumers: 2,
            keys_per_producer: 8,
            active_ms: 20_000,
            drain_ms: 20_000,
            produce_gap_ms: 25,
            switch_gap_ms: (800, 2_500),
            fault_gap_ms: 1_500,
            ..Config::default()
        }
    }
}
