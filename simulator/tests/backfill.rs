//! The operator's backfill (`Config::backfills`, `flotilla-sim run --backfill`):
//! temporary clusters, a copy worker replaying a range of the topic into a
//! target topic through the real `Router` with dedupe by source coordinates,
//! the group reading it, then drain and retirement by the real rules. Every
//! fault applies, including cluster loss of a temporary cluster and crashes of
//! the copy worker (resume from its checkpoint).

use flotilla_sim::{run_seed, AnomalyKind, Config, Faults};

const SEEDS: u64 = 50;

fn backfill() -> Config {
    Config {
        faults: Faults::all(),
        backfills: true,
        ..Config::tiny()
    }
}

#[test]
fn backfill_with_every_fault_is_exact_and_retires_its_clusters() {
    let cfg = backfill();
    let mut crashes = 0;
    for seed in 0..SEEDS {
        let r = run_seed(seed, &cfg);
        assert!(
            r.anomalies.is_empty(),
            "seed {seed}: {:?}",
            &r.anomalies.list[..r.anomalies.list.len().min(3)]
        );
        assert!(r.stats.backfill_copied > 0, "seed {seed}: nothing copied");
        assert!(r.stats.backfill_done, "seed {seed}: backfill not done");
        assert!(
            r.stats.backfill_retired > 0,
            "seed {seed}: no temporary cluster retired"
        );
        crashes += r.stats.backfill_crashes;
    }
    assert!(crashes > 0, "no seed crashed the copy worker");
}

#[test]
fn backfill_is_deterministic() {
    let cfg = backfill();
    let a = run_seed(7, &cfg);
    let b = run_seed(7, &cfg);
    assert_eq!(a.trace_hash, b.trace_hash);
    let off = run_seed(
        7,
        &Config {
            backfills: false,
            ..cfg
        },
    );
    assert_ne!(a.trace_hash, off.trace_hash);
    assert_eq!(off.stats.backfill_copied, 0);
}

fn caught(cfg: &Config, kind: AnomalyKind) -> u64 {
    (0..SEEDS)
        .filter(|&s| {
            run_seed(s, cfg)
                .anomalies
                .list
                .iter()
                .any(|a| a.kind == kind)
        })
        .count() as u64
}

/// A copy worker that resumes from its checkpoint without the dedupe scan
/// copies the records after the checkpoint twice.
#[test]
fn resume_without_dedupe_is_caught() {
    let mut cfg = backfill();
    cfg.bugs.backfill_no_dedupe = true;
    assert!(caught(&cfg, AnomalyKind::DuplicateDelivery) > 0);
}

/// Draining the temporary clusters as soon as the copy ends, before the
/// group consumed them: with the target route deleted, the retirement rules
/// no longer look at them, so they are retired with records unread.
#[test]
fn teardown_before_the_group_consumed_is_caught() {
    let mut cfg = backfill();
    cfg.bugs.backfill_skip_wait = true;
    assert!(caught(&cfg, AnomalyKind::RetiredWhileNeeded) > 0);
}
