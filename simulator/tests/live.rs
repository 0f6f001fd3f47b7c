//! `flotilla-sim live`, short: real etcd + 3 real Kafka clusters from the
//! harness, 2 producers, a group of 2 consumers, the elected controller, two
//! route switches (c0 → c0+c1 → c1, then c0 drained and retired), one Kafka
//! cluster SIGKILLed and restarted, etcd SIGKILLed and restarted. The
//! simulator's checker must find nothing *and* must have seen the run: acks
//! recorded and every one of them delivered. Then the same recorded history
//! with one delivery removed must be flagged, so the check can fail.
//! About 55 s on the 2-core machine (8 s start-up, 40 s active, catch-up).

use std::time::Duration;

use flotilla_sim::live::{self, LiveConfig, LiveFault};
use flotilla_sim::AnomalyKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_live_session_with_kills_has_no_anomaly_and_a_dropped_delivery_is_caught() {
    let cfg = LiveConfig {
        clusters: 3,
        producers: 2,
        consumers: 2,
        active: Duration::from_secs(40),
        switches: 2,
        faults: LiveFault::ALL.to_vec(),
        seed: 1,
        catch_up: Duration::from_secs(90),
        ..LiveConfig::default()
    };
    let r = live::run(&cfg).await.expect("live run");
    let summary = r.summary();
    eprintln!("{summary}");
    let c = &r.checked;
    assert!(r.ok(), "anomalies in the live run:\n{summary}");
    assert!(r.caught_up, "the group did not catch up:\n{summary}");
    // The nemesis did what the plan said: one kill of each kind, healed.
    let kinds: Vec<LiveFault> = r.faults.iter().map(|f| f.what).collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == LiveFault::KillCluster)
            .count(),
        1,
        "{summary}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == LiveFault::KillEtcd).count(),
        1,
        "{summary}"
    );
    // Both switches completed, through the real controller.
    let epochs: Vec<u64> = r.switches.iter().map(|s| s.epoch).collect();
    assert_eq!(epochs, [2, 3], "{summary}");
    // The checker saw the run: records acknowledged on both write sets' clusters,
    // and after healing every acknowledged record delivered.
    assert!(c.acked > 500, "too few acknowledged records:\n{summary}");
    let per_cluster = r.recorder.acked_per_cluster();
    assert!(
        per_cluster.contains_key(&0) && per_cluster.contains_key(&1),
        "acks per cluster {per_cluster:?}"
    );
    assert_eq!(c.acked_consumed, c.acked, "{summary}");
    assert!(c.consumed >= c.acked, "{summary}");

    // The same history with one delivery taken out (of a record delivered
    // only once): the checker must say so.
    let deliveries: Vec<(u32, u64)> = r
        .recorder
        .events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            live::Event::Deliver { d, .. } => Some((d.key, d.seq)),
            _ => None,
        })
        .collect();
    let once = |k: &(u32, u64)| deliveries.iter().filter(|d| *d == k).count() == 1;
    let n = (deliveries.len() / 2..deliveries.len())
        .chain(0..deliveries.len() / 2)
        .find(|&i| once(&deliveries[i]))
        .expect("a record delivered once");
    assert!(r.recorder.drop_delivery(n));
    let end = live::EndState {
        route: None,
        retired: r.retired.iter().copied().collect(),
        stuck_producers: Vec::new(),
    };
    let again = r.recorder.check(&end);
    let lost: Vec<_> = again
        .anomalies
        .list
        .iter()
        .filter(|a| matches!(a.kind, AnomalyKind::NotConsumed | AnomalyKind::AckedLost))
        .collect();
    assert_eq!(
        lost.len(),
        1,
        "one dropped delivery, one anomaly: {:?}",
        again.anomalies.list
    );
    assert_eq!(again.acked_consumed, c.acked - 1);
}
