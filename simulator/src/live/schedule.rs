//! The live run's schedule: when the operator switches routes and when the
//! nemesis kills what, derived from the seed alone.
//!
//! The *plan* is deterministic (same seed, same flags → same plan, tested);
//! the run is not: it happens in real time against real processes, so when a
//! switch actually completes, which records land where and how long a
//! restart takes differ from run to run.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A fault the live nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LiveFault {
    /// SIGKILL one Kafka cluster of the current write set (data kept), restart it later.
    KillCluster,
    /// SIGKILL etcd (data kept), restart it later.
    KillEtcd,
}

impl LiveFault {
    /// Every live fault, in a fixed order.
    pub const ALL: [LiveFault; 2] = [LiveFault::KillCluster, LiveFault::KillEtcd];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LiveFault::KillCluster => "kill-cluster",
            LiveFault::KillEtcd => "kill-etcd",
        }
    }

    /// The simulator fault it corresponds to, for the shared summary.
    pub fn sim_fault(self) -> crate::Fault {
        match self {
            LiveFault::KillCluster => crate::Fault::ClusterLoss,
            LiveFault::KillEtcd => crate::Fault::RegistryOutage,
        }
    }
}

impl fmt::Display for LiveFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LiveFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LiveFault::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = LiveFault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown live fault `{s}` (known: {})", names.join(", "))
            })
    }
}

/// Parses `kill-cluster,kill-etcd`, `all` or `none`.
pub fn parse_faults(s: &str) -> Result<Vec<LiveFault>, String> {
    match s.trim() {
        "" | "none" => Ok(Vec::new()),
        "all" => Ok(LiveFault::ALL.to_vec()),
        list => {
            let mut out: Vec<LiveFault> = list
                .split(',')
                .map(|f| f.trim().parse())
                .collect::<Result<_, _>>()?;
            out.sort();
            out.dedup();
            Ok(out)
        }
    }
}

/// One planned fault: `what` starts at `at` (from the start of traffic) and
/// is healed (restarted) `down` later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFault {
    /// What to kill.
    pub what: LiveFault,
    /// When, from the start of traffic.
    pub at: Duration,
    /// How long it stays down.
    pub down: Duration,
    /// For [`LiveFault::KillCluster`]: a random draw, reduced modulo the
    /// write set at the time of the kill (the plan cannot know which
    /// clusters are written then).
    pub pick: u32,
}

/// The whole plan of a live run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// When the operator proposes switch 1, 2, …, from the start of traffic.
    pub switches: Vec<Duration>,
    /// The faults, in start order.
    pub faults: Vec<PlannedFault>,
}

/// The write set (cluster indices) of the `i`-th epoch (0-based):
/// A, A+B, B, B+C, C, … — every other switch adds the next cluster, the one
/// between removes the previous one (which is then drained and retired).
pub fn write_set(i: usize) -> Vec<u16> {
    let k = (i / 2) as u16;
    if i % 2 == 0 {
        vec![k]
    } else {
        vec![k, k + 1]
    }
}

/// The most switches `clusters` clusters allow (clusters are immutable and
/// never come back once drained): A → A+B → B → … → last.
pub fn max_switches(clusters: usize) -> usize {
    2 * clusters.saturating_sub(1)
}

/// Plans `switches` switches and, for every fault kind in `faults`, one
/// fault per started minute of `active` time, all inside `active`.
///
/// Switches are spread evenly with ±25 % jitter; faults start at random
/// times and last 3–8 s (a cluster) or 2–5 s (etcd), and each ends at least
/// 2 s before the active phase does. Only the seed decides.
pub fn plan(seed: u64, active: Duration, switches: usize, faults: &[LiveFault]) -> Plan {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x6c69_7665);
    let ms = active.as_millis() as u64;
    let gap = ms / (switches as u64 + 1);
    let mut at = Vec::with_capacity(switches);
    for i in 0..switches as u64 {
        let jitter = rng.random_range(0..=gap / 2) as i64 - (gap / 4) as i64;
        let t = ((i + 1) * gap) as i64 + jitter;
        at.push(Duration::from_millis(t.max(1) as u64));
    }
    let per_kind = ms.div_ceil(60_000).max(1);
    let mut planned = Vec::new();
    for &what in faults {
        let (lo, hi) = match what {
            LiveFault::KillCluster => (3_000, 8_000),
            LiveFault::KillEtcd => (2_000, 5_000),
        };
        for _ in 0..per_kind {
            let down = rng.random_range(lo..=hi).min(ms / 3).max(500);
            let latest = ms.saturating_sub(down + 2_000).max(1);
            let start = rng.random_range(ms / 10..=latest.max(ms / 10));
            planned.push(PlannedFault {
                what,
                at: Duration::from_millis(start),
                down: Duration::from_millis(down),
                pick: rng.random(),
            });
        }
    }
    planned.sort_by_key(|f| (f.at, f.what));
    Plan {
        switches: at,
        faults: planned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_depends_only_on_the_seed_and_stays_inside_the_active_phase() {
        let active = Duration::from_secs(45);
        let all = LiveFault::ALL;
        let a = plan(7, active, 2, &all);
        assert_eq!(a, plan(7, active, 2, &all));
        assert_ne!(a, plan(8, active, 2, &all));
        assert_eq!(a.switches.len(), 2);
        assert!(a.switches.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a.faults.len(), 2, "one of each kind per started minute");
        for f in &a.faults {
            assert!(f.at + f.down + Duration::from_secs(2) <= active, "{f:?}");
        }
        assert_eq!(plan(1, Duration::from_secs(130), 0, &all).faults.len(), 6);
    }

    #[test]
    fn write_sets_walk_the_clusters_and_faults_parse() {
        let sets: Vec<Vec<u16>> = (0..5).map(write_set).collect();
        assert_eq!(sets, [vec![0], vec![0, 1], vec![1], vec![1, 2], vec![2]]);
        assert_eq!(max_switches(3), 4);
        assert_eq!(
            parse_faults("kill-etcd,kill-cluster").unwrap(),
            LiveFault::ALL.to_vec()
        );
        assert!(parse_faults("none").unwrap().is_empty());
        assert!(parse_faults("kill-zk").is_err());
    }
}
