//! The fast seed subset: correct runs show no anomaly, broken variants are
//! caught, and a seed replays to the same trace.

use flotilla_sim::config::OnAckDeadline;
use flotilla_sim::{run_seed, AnomalyKind, Config, Fault, Faults, LeasePolicy};

/// Every fault except the zombie, with the settings under which the protocol
/// promises no loss (see docs/simulator.md, finding 2, for the others).
fn safe() -> Config {
    let mut faults = Faults::none();
    for f in Fault::ALL {
        if f != Fault::Zombie {
            faults = faults.with(f);
        }
    }
    Config {
        faults,
        lease_policy: LeasePolicy::Hold,
        on_ack_deadline: OnAckDeadline::Abort,
        ..Config::tiny()
    }
}

/// The first seed below `limit` whose run reports one of `kinds`.
fn first_catch(cfg: &Config, limit: u64, kinds: &[AnomalyKind]) -> Option<(u64, AnomalyKind)> {
    (0..limit).find_map(|seed| {
        let r = run_seed(seed, cfg);
        r.anomalies
            .list
            .iter()
            .find(|a| kinds.contains(&a.kind))
            .map(|a| (seed, a.kind))
    })
}

#[test]
fn same_seed_same_trace_and_different_seeds_differ() {
    let cfg = Config {
        faults: Faults::all(),
        ..Config::tiny()
    };
    let a = run_seed(42, &cfg);
    let b = run_seed(42, &cfg);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.stats.events, b.stats.events);
    assert_eq!(a.stats.records, b.stats.records);
    assert_eq!(a.anomalies.list, b.anomalies.list);
    let c = run_seed(43, &cfg);
    assert_ne!(a.trace_hash, c.trace_hash);
    // Keeping the readable trace does not change the run.
    let kept = run_seed(
        42,
        &Config {
            keep_trace: true,
            ..cfg
        },
    );
    assert_eq!(kept.trace_hash, a.trace_hash);
    assert!(!kept.trace.is_empty());
}

#[test]
fn fast_subset_has_no_anomaly() {
    let cfg = safe();
    let mut switches = 0;
    let mut failing = Vec::new();
    for seed in 0..200 {
        let r = run_seed(seed, &cfg);
        switches += r.stats.switches.len();
        assert!(r.stats.consumed > 0, "seed {seed} consumed nothing");
        if !r.anomalies.is_empty() {
            failing.push((seed, r.anomalies.list[0].clone()));
        }
    }
    assert!(failing.is_empty(), "anomalies: {failing:?}");
    assert!(switches > 500, "only {switches} switches in 200 seeds");
}

#[test]
fn no_fault_runs_are_clean_with_the_default_policies() {
    let cfg = Config::tiny();
    for seed in 0..30 {
        let r = run_seed(seed, &cfg);
        assert!(
            r.anomalies.is_empty(),
            "seed {seed}: {:?}",
            r.anomalies.list
        );
        assert_eq!(r.stats.stragglers, 0);
    }
}

#[test]
fn ambiguous_timeouts_are_deduplicated() {
    let cfg = Config {
        faults: Faults::none().with(Fault::Ambiguous),
        ..Config::tiny()
    };
    let r = run_seed(3, &cfg);
    assert!(r.stats.deduped > 0);
    assert!(r.anomalies.is_empty(), "{:?}", r.anomalies.list);
}

#[test]
fn checker_catches_ack_without_flush() {
    let mut cfg = Config::tiny();
    cfg.bugs.skip_flush_before_ack = true;
    let hit = first_catch(&cfg, 200, &[AnomalyKind::WriteOutsideOpenEpoch]);
    assert!(hit.is_some(), "skipping the flush went unnoticed");
}

#[test]
fn checker_catches_consumer_starting_from_latest() {
    let mut cfg = Config::tiny();
    cfg.bugs.consumer_from_latest = true;
    let hit = first_catch(
        &cfg,
        200,
        &[AnomalyKind::AckedLost, AnomalyKind::NotConsumed],
    );
    assert!(
        hit.is_some(),
        "records skipped by a consumer went unnoticed"
    );
}

#[test]
fn checker_catches_retire_before_fence() {
    let mut cfg = Config {
        faults: Faults::none().with(Fault::Crash),
        ..Config::tiny()
    };
    cfg.bugs.retire_before_fence = true;
    let hit = first_catch(&cfg, 200, &[AnomalyKind::RetiredWhileNeeded]);
    assert!(hit.is_some(), "an early retirement went unnoticed");
}

#[test]
fn checker_catches_a_consumer_that_ignores_the_gate() {
    // Consumers that keep up reorder nothing; lag (crashes, lost clusters) exposes it.
    let mut cfg = Config {
        faults: Faults::none().with(Fault::Crash).with(Fault::ClusterLoss),
        ..Config::tiny()
    };
    cfg.bugs.consumer_ignores_gate = true;
    let hit = first_catch(&cfg, 200, &[AnomalyKind::OrderViolation]);
    assert!(hit.is_some(), "reading past the fences went unnoticed");
}

/// Finding 2 (docs/simulator.md), before its fix: with the availability
/// policy, a zombie producer's stragglers are detected and counted, but once
/// the group passed the fence of their cluster nothing read them again and the
/// cluster was retired with them. The checker must report exactly that.
#[test]
fn zombie_stragglers_are_detected_and_their_loss_reported_with_the_old_rules() {
    let mut cfg = Config {
        faults: Faults::none().with(Fault::Zombie),
        ..Config::tiny()
    };
    cfg.bugs.stragglers_lost = true;
    let mut stragglers = 0;
    let mut lost = 0;
    for seed in 0..20 {
        let r = run_seed(seed, &cfg);
        stragglers += r.stats.stragglers;
        for a in &r.anomalies.list {
            assert_eq!(a.kind, AnomalyKind::StragglerLost, "seed {seed}: {a:?}");
            lost += 1;
        }
    }
    assert!(stragglers > 0, "zombies wrote no straggler");
    assert!(lost > 0, "expected the known straggler loss to show up");
}

/// Finding 1: without the adapter workaround, a consumer that restarts after
/// a cluster was retired waits for that cluster's commits for ever.
#[test]
fn retired_cluster_stalls_a_restarted_consumer_without_the_workaround() {
    let mut cfg = Config {
        faults: Faults::none().with(Fault::Crash),
        ..Config::tiny()
    };
    cfg.bugs.no_retired_workaround = true;
    let hit = first_catch(&cfg, 50, &[AnomalyKind::NotConsumed]);
    assert!(hit.is_some(), "expected the stall to show up");
}

/// The fix of finding 2 with the Kafka-level write fence before retirement
/// (the default, as the real controller) removes every straggler loss, with
/// the default (availability) policies and every fault, zombies included.
#[test]
fn write_fence_delivers_every_straggler() {
    let cfg = Config {
        faults: Faults::all(),
        ..Config::tiny()
    };
    assert!(cfg.write_fence, "the write fence is on by default");
    let mut stragglers = 0;
    for seed in 0..40 {
        let r = run_seed(seed, &cfg);
        stragglers += r.stats.stragglers;
        assert!(
            r.anomalies.is_empty(),
            "seed {seed}: {:?}",
            &r.anomalies.list[..1]
        );
    }
    assert!(stragglers > 0);
}

/// Without the write fence (`--no-write-fence`: the control plane before it)
/// zombies still lose acknowledged records written after the drained check:
/// the checker reports exactly that, and nothing else.
#[test]
fn without_the_write_fence_zombie_writes_after_the_drained_check_are_lost() {
    let cfg = Config {
        faults: Faults::none().with(Fault::Zombie),
        write_fence: false,
        ..Config::tiny()
    };
    let mut lost = 0;
    for seed in 0..20 {
        for a in &run_seed(seed, &cfg).anomalies.list {
            assert_eq!(a.kind, AnomalyKind::StragglerLost, "seed {seed}: {a:?}");
            lost += 1;
        }
    }
    assert!(
        lost > 0,
        "expected zombie writes after the drained check to be lost"
    );
}
