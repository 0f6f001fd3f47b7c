//! The controller daemon reacts to registry changes, not only to its interval
//! (real etcd; a fake Kafka whose end offsets are all zero).
//!
//! A switch is sealed by the first pass that sees every live producer's
//! acknowledgement. With a reconcile loop driven by its `--interval` alone
//! (2 s by default) that pass came up to one interval after the last ack —
//! the dominant part of the switch pause in production. Here the interval
//! is 60 s: the switch must still seal within a short deadline of the last
//! ack, because the leader watches the registry and runs a pass on the
//! change.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flotilla_client::registry::{
    ClientKind, ClientLease, ClientRecord, EpochState, Registry, SCHEMA_VERSION,
};
use flotilla_control::controller::{
    now_millis, run_elected, Controller, ElectionOptions, Leadership,
};
use flotilla_control::{ControlPlane, SetRoute};
use flotilla_testkit::etcd::EtcdServer;
use support::{add_active_clusters, etcd_kv, wait_until, SlowKafka, TestKv};
use tokio::sync::watch;

/// Far longer than the test: a pass that comes from the interval fails it.
const INTERVAL: Duration = Duration::from_secs(60);
/// How soon after the last acknowledgement the switch must be sealed.
const REACT_WITHIN: Duration = Duration::from_secs(2);

fn set(clusters: &[&str]) -> SetRoute {
    SetRoute {
        topic: "t".into(),
        clusters: clusters.iter().map(|c| (c.to_string(), Some(1))).collect(),
        partitions: Some(3),
        // Far beyond the test: only acknowledgements can let the switch seal.
        ack_timeout_ms: 600_000,
    }
}

async fn register_producer(cp: &ControlPlane, id: &str) -> ClientLease {
    let record = ClientRecord {
        version: SCHEMA_VERSION,
        kind: ClientKind::Producer,
        id: id.into(),
        acked: Default::default(),
        group: None,
        started_at: now_millis(),
    };
    cp.registry()
        .register_client(record, Duration::from_secs(120))
        .await
        .unwrap()
}

async fn ack(producer: &mut ClientLease, epoch: u64) {
    let mut record = producer.record().clone();
    record.acked.insert("t".into(), epoch);
    producer.update(record).await.unwrap();
}

async fn epoch_state(cp: &ControlPlane, n: u64) -> Option<EpochState> {
    let route = cp.route("t").await.unwrap();
    route.epochs.iter().find(|e| e.n == n).map(|e| e.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_seals_right_after_the_last_ack_whatever_the_interval() {
    let etcd = EtcdServer::start().expect("etcd");
    let kv = TestKv::new(etcd_kv(&etcd).await);
    // Clusters that answer at once; every end offset is 0.
    let (kafka, _) = SlowKafka::new(0, false);
    let cp = ControlPlane::new(Registry::new(kv.clone(), "react"), kafka);
    add_active_clusters(&cp, &["a", "b"]).await;
    cp.set_route(set(&["a"]), now_millis()).await.unwrap();
    let mut p1 = register_producer(&cp, "p1").await;
    let mut p2 = register_producer(&cp, "p2").await;
    cp.set_route(set(&["a", "b"]), now_millis()).await.unwrap();
    assert_eq!(epoch_state(&cp, 2).await, Some(EpochState::Pending));

    // The leader's first pass (at once when it starts leading) finds the
    // switch waiting for both producers.
    let reads = kv.lists.load(Ordering::SeqCst);
    let (lead_tx, mut lead) = watch::channel(Leadership::Follower);
    let (stop, stop_rx) = watch::channel(false);
    let opts = ElectionOptions {
        id: "reactive".into(),
        lease_ttl: Duration::from_secs(3),
        interval: INTERVAL,
    };
    let task = tokio::spawn(run_elected(
        Controller::new(cp.clone()),
        opts,
        lead_tx,
        stop_rx,
    ));
    tokio::time::timeout(
        Duration::from_secs(10),
        lead.wait_for(|l| *l == Leadership::Leader),
    )
    .await
    .expect("leads")
    .unwrap();
    // Two full reads at least: a pass (and, with a watch, the watch's own
    // first snapshot) has read the registry before any ack exists.
    wait_until(Duration::from_secs(5), "the first pass", || async {
        kv.lists.load(Ordering::SeqCst) >= reads + 2
    })
    .await;

    // One producer acknowledges: the controller looks (a pass reads the
    // registry) but must not seal while the other is missing.
    let before = kv.lists.load(Ordering::SeqCst);
    ack(&mut p1, 2).await;
    wait_until(REACT_WITHIN, "a pass after the first ack", || async {
        kv.lists.load(Ordering::SeqCst) >= before + 2
    })
    .await;
    assert_eq!(
        epoch_state(&cp, 2).await,
        Some(EpochState::Pending),
        "sealed without p2's acknowledgement"
    );

    // The last producer acknowledges: sealed within moments, not an interval.
    ack(&mut p2, 2).await;
    let took = wait_until(REACT_WITHIN, "the switch to be sealed", || async {
        epoch_state(&cp, 2).await == Some(EpochState::Open)
    })
    .await;
    assert_eq!(epoch_state(&cp, 1).await, Some(EpochState::Sealed));
    eprintln!("sealed {took:?} after the last acknowledgement (interval {INTERVAL:?})");

    // The seal is a change too (one more pass may follow it), but passes
    // must not keep triggering each other: the controller comes to rest.
    let mut last = (kv.lists.load(Ordering::SeqCst), Instant::now());
    wait_until(
        Duration::from_secs(5),
        "the controller to come to rest",
        || {
            let now = kv.lists.load(Ordering::SeqCst);
            if now != last.0 {
                last = (now, Instant::now());
            }
            let quiet = last.1.elapsed() >= Duration::from_millis(500);
            async move { quiet }
        },
    )
    .await;

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("controller shut down")
        .unwrap()
        .unwrap();
}
