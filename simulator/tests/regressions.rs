//! The repro seeds of the bugs the simulator found (docs/simulator.md,
//! "Findings"), kept as regression tests against the fixed real code. Each
//! also runs the pre-fix rules (`Bugs`, or `write_fence: false`) to show the
//! seed still exposes them.

use flotilla_sim::{run_seed, AnomalyKind, Config, Fault, Faults, RunResult};

/// The realistic schedule (the one the CLI's `replay` uses) with one fault
/// kind, and the consumer model the findings were measured with (an
/// exactly-once sink, no pre-join: `--sink-consumer`), so each seed replays
/// the exact history its test describes.
fn realistic(fault: Fault) -> Config {
    Config {
        faults: Faults::none().with(fault),
        ..Config::default()
    }
    .sink_consumer()
}

fn lost(r: &RunResult) -> usize {
    r.anomalies
        .list
        .iter()
        .filter(|a| a.kind == AnomalyKind::StragglerLost)
        .count()
}

/// Finding 2 / bug 1: `flotilla-sim replay --seed 1 --faults cluster-loss`.
/// `c18` is lost during the switch to `e39`; the controller seals at the ack
/// deadline without the producers, whose retries land above the fence. The
/// consumers used to stop reading `c18` at the fence and the controller
/// retired it at the fence: 247 acknowledged records lost. Now `c18` is read
/// until it is retired, and retired only once drained to its end offsets.
#[test]
fn bug1_seed_1_cluster_loss_stragglers_are_delivered() {
    let cfg = realistic(Fault::ClusterLoss);
    let r = run_seed(1, &cfg);
    assert!(r.anomalies.is_empty(), "{:?}", &r.anomalies.list[..1]);
    assert!(
        r.stats.stragglers > 0,
        "the seed no longer makes stragglers"
    );
    let mut old = cfg.clone();
    old.bugs.stragglers_lost = true;
    assert_eq!(lost(&run_seed(1, &old)), 247);
}

/// Finding 3 / bug 2: `flotilla-sim replay --seed 0 --faults clock-jump`. The
/// controller's clock runs up to 5 s ahead of the proposer's (ack timeout
/// 3 s); every switch used to seal at once with all producers late, making
/// stragglers (17 lost with the old retirement rule). The ack wait is now
/// measured on the controller's own monotonic clock: no straggler at all.
#[test]
fn bug2_seed_0_clock_jump_waits_for_acks() {
    let cfg = realistic(Fault::ClockJump);
    let r = run_seed(0, &cfg);
    assert!(r.anomalies.is_empty(), "{:?}", &r.anomalies.list[..1]);
    assert_eq!(r.stats.stragglers, 0, "a switch sealed without the acks");
    let mut old = cfg.clone();
    old.bugs.ack_deadline_wall_clock = true;
    assert!(run_seed(0, &old).stats.stragglers > 0);
}

/// Finding 2/3 / bug 2: `flotilla-sim replay --seed 7 --faults registry-outage`.
/// `e9` is proposed at 44027, the registry is down from 44050 to 47454; the
/// controller used to seal 1 ms after recovery, before the producers' acks
/// were retried. The wait now restarts when the controller regains the
/// registry.
#[test]
fn bug2_seed_7_registry_outage_restarts_the_ack_wait() {
    let cfg = realistic(Fault::RegistryOutage);
    let r = run_seed(7, &cfg);
    assert!(r.anomalies.is_empty(), "{:?}", &r.anomalies.list[..1]);
    assert_eq!(r.stats.stragglers, 0, "a switch sealed without the acks");
    let mut old = cfg.clone();
    old.bugs.ack_deadline_wall_clock = true;
    assert!(run_seed(7, &old).stats.stragglers > 0);
}

/// Finding 2, the live-producer half of what its first fix left open:
/// `flotilla-sim replay --seed 3 --faults cluster-loss`. `c17` is lost with
/// records queued for it; `e34` is sealed when it returns with all four
/// producers late; `c17` is drained, read to its end and retired 11 ms later —
/// and the producers' retries land 2 ms after that (25 acknowledged records
/// lost). The controller now keeps a cluster of an epoch it sealed without
/// some producers until they acknowledged the opened (or a later) epoch, left,
/// or their delivery timeout passed.
#[test]
fn bug1_seed_3_cluster_loss_late_retries_are_not_retired_away() {
    let cfg = realistic(Fault::ClusterLoss);
    let r = run_seed(3, &cfg);
    assert!(r.anomalies.is_empty(), "{:?}", &r.anomalies.list[..1]);
    let mut old = cfg.clone();
    old.bugs.retire_ignores_late_producers = true;
    old.write_fence = false;
    assert_eq!(lost(&run_seed(3, &old)), 25);
    // The write fence alone also saves them: the late retries fail
    // (unacknowledged) instead of landing after the drained check.
    let mut fence_only = cfg.clone();
    fence_only.bugs.retire_ignores_late_producers = true;
    assert_eq!(lost(&run_seed(3, &fence_only)), 0);
}

/// Finding 2, its last gap — a zombie: `flotilla-sim replay --seed 1 --faults zombie --no-write-fence`.
/// `prod0`'s lease expires at 42413 without it noticing (for 4086 ms); still
/// routing with epoch `e10`'s view it writes to `c4` after `c4` was drained
/// (45563) and retired (45585, the group had read it to its end): its records
/// land from 45615 on, are acknowledged, and are torn down with `c4` — 76
/// acknowledged records lost. The controller now fences a draining cluster's
/// writes at the Kafka level before the drained check (on by default, as the
/// real controller), so such records fail at the producer instead.
#[test]
fn bug1_seed_1_zombie_writes_after_the_drained_check_are_fenced() {
    let cfg = realistic(Fault::Zombie);
    assert!(cfg.write_fence, "the fence is the default");
    let r = run_seed(1, &cfg);
    assert!(r.anomalies.is_empty(), "{:?}", &r.anomalies.list[..1]);
    assert!(
        r.stats.stragglers > 0,
        "the seed no longer makes stragglers"
    );
    let mut old = cfg.clone();
    old.write_fence = false;
    assert_eq!(lost(&run_seed(1, &old)), 76);
}
