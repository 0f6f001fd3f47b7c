//! Controller leadership on a real etcd while a reconcile pass is slow.
//!
//! Finding of the live chaos run: the leader renewed its lease in the same
//! loop as the reconcile pass, so a pass waiting on a dead Kafka cluster
//! (offset reads time out after up to 10 s) outlived a 2 s lease; another
//! candidate took over while the old leader was still acting. These tests
//! make the pass block in a fake Kafka's offset read and check that
//!
//! - the lease stays alive meanwhile (no other candidate leads);
//! - when the lease really is lost (renewals fail, or it is revoked) the
//!   leader drops the pass and steps down — before another candidate can win
//!   the key when the lease runs out by itself;
//! - a stale leader's registry writes are refused (the leader-key guard).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::registry::{EpochState, Expect, Guard, KvEntry, KvStore, Registry};
use flotilla_control::controller::{
    now_millis, run_elected, Controller, ElectionOptions, Leadership,
};
use flotilla_control::{ControlPlane, SetRoute};
use flotilla_testkit::etcd::EtcdServer;
use support::{add_active_clusters, etcd_kv, wait_until, SlowKafka, TestKv};
use tokio::sync::watch;

const TTL: Duration = Duration::from_secs(2);
const LEADER_KEY: &str = "/flotilla/lead/controller/leader";

fn set(clusters: &[&str]) -> SetRoute {
    SetRoute {
        topic: "t".into(),
        clusters: clusters.iter().map(|c| (c.to_string(), Some(1))).collect(),
        partitions: Some(3),
        ack_timeout_ms: 0,
    }
}

/// Clusters a and b, route t on a, and a pending switch to b (no producer
/// to wait for: the next pass reads the boundary).
async fn fleet_with_pending_switch(cp: &ControlPlane) {
    add_active_clusters(cp, &["a", "b"]).await;
    cp.set_route(set(&["a"]), now_millis()).await.unwrap();
    cp.set_route(set(&["b"]), now_millis()).await.unwrap();
}

/// A candidate running [`run_elected`]; `lead` follows its leadership.
struct Candidate {
    lead: watch::Receiver<Leadership>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn candidate(cp: ControlPlane, id: &str) -> Candidate {
    let (lead_tx, lead) = watch::channel(Leadership::Follower);
    let (stop, stop_rx) = watch::channel(false);
    let opts = ElectionOptions {
        id: id.into(),
        lease_ttl: TTL,
        interval: Duration::from_millis(100),
    };
    let task = tokio::spawn(async move {
        run_elected(Controller::new(cp), opts, lead_tx, stop_rx)
            .await
            .unwrap();
    });
    Candidate { lead, stop, task }
}

impl Candidate {
    fn leads(&self) -> bool {
        *self.lead.borrow() == Leadership::Leader
    }

    async fn shut_down(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("controller shut down")
            .unwrap();
    }
}

/// Watches two candidates' own view of their leadership; records any moment
/// both believed they led.
fn split_brain_monitor(
    one: watch::Receiver<Leadership>,
    two: watch::Receiver<Leadership>,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(AtomicBool::new(false));
    let flag = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            if *one.borrow() == Leadership::Leader && *two.borrow() == Leadership::Leader {
                flag.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (seen, task)
}

async fn leader_entry(kv: &dyn KvStore) -> Option<KvEntry> {
    kv.get(LEADER_KEY).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pass_keeps_the_lease_and_a_lost_lease_stops_the_pass_before_another_leads() {
    let etcd = EtcdServer::start().expect("etcd");
    let kv = etcd_kv(&etcd).await;
    let flaky = TestKv::new(etcd_kv(&etcd).await);
    let (slow, release) = SlowKafka::new(7, true);
    let (fast, _) = SlowKafka::new(9, false);
    let cp1 = ControlPlane::new(Registry::new(flaky.clone(), "lead"), slow.clone());
    let cp2 = ControlPlane::new(Registry::new(kv.clone(), "lead"), fast.clone());
    fleet_with_pending_switch(&cp2).await;

    let one = candidate(cp1, "one");
    wait_until(Duration::from_secs(10), "one to lead", || async {
        one.leads()
    })
    .await;
    wait_until(Duration::from_secs(10), "one's pass to block", || async {
        slow.started.load(Ordering::SeqCst) >= 1
    })
    .await;
    let term = leader_entry(&*kv).await.expect("leader key");
    assert_eq!(term.value, b"one");
    let two = candidate(cp2.clone(), "two");
    let (split, monitor) = split_brain_monitor(one.lead.clone(), two.lead.clone());

    // The pass stays blocked for three lease TTLs: the lease must not lapse.
    let until = Instant::now() + 3 * TTL;
    while Instant::now() < until {
        let now = leader_entry(&*kv).await;
        assert_eq!(
            now.as_ref(),
            Some(&term),
            "the leader key changed while the leader's pass was slow"
        );
        assert!(one.leads() && !two.leads(), "leadership moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(slow.completed.load(Ordering::SeqCst), 0, "still blocked");

    // One is cut from etcd's leases: it must stop before its lease runs out
    // (and with it the pass), and two takes over only after that.
    let cut = Instant::now();
    flaky.leases_down.store(true, Ordering::SeqCst);
    wait_until(
        TTL,
        "one to step down before its lease can expire",
        || async { !one.leads() },
    )
    .await;
    wait_until(
        Duration::from_secs(1),
        "one's pass to be dropped",
        || async { slow.cancelled.load(Ordering::SeqCst) >= 1 },
    )
    .await;
    wait_until(Duration::from_secs(10), "two to lead", || async {
        two.leads()
    })
    .await;
    assert!(
        cut.elapsed() >= TTL - Duration::from_millis(700),
        "two led {:?} after one's last renewal: before one's lease could have expired",
        cut.elapsed()
    );
    wait_until(
        Duration::from_secs(10),
        "two to seal the switch",
        || async {
            let r = cp2.route("t").await.unwrap();
            r.epochs
                .iter()
                .any(|e| e.n == 2 && e.state == EpochState::Open)
        },
    )
    .await;
    let route = cp2.route("t").await.unwrap();
    assert_eq!(
        route.epochs[0].fence["a"],
        vec![9, 9, 9],
        "sealed with two's boundary"
    );
    let _ = release.send(true);
    assert_eq!(
        slow.completed.load(Ordering::SeqCst),
        0,
        "one's abandoned pass went on reading"
    );
    assert!(
        !split.load(Ordering::SeqCst),
        "both controllers led at the same time"
    );
    monitor.abort();

    // One's term is over: writes guarded by it are refused, even with a
    // switch pending for it to seal.
    two.shut_down().await;
    cp2.set_route(set(&["a"]), now_millis()).await.unwrap();
    let rev = kv.current_revision().await.unwrap();
    let stale = Controller::new(cp2.clone()).guarded(Guard {
        key: LEADER_KEY.into(),
        expect: Expect::ModRevision(term.mod_revision),
    });
    let r = stale.reconcile_once(now_millis()).await.unwrap();
    assert!(r.sealed.is_empty(), "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("no longer holds")),
        "{r:?}"
    );
    assert_eq!(
        kv.current_revision().await.unwrap(),
        rev,
        "a stale write landed"
    );
    flaky.leases_down.store(false, Ordering::SeqCst);
    one.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_stops_the_pass_under_way() {
    let etcd = EtcdServer::start().expect("etcd");
    let kv = etcd_kv(&etcd).await;
    let (slow, release) = SlowKafka::new(7, true);
    let cp = ControlPlane::new(Registry::new(kv.clone(), "lead"), slow.clone());
    fleet_with_pending_switch(&cp).await;
    let one = candidate(cp.clone(), "one");
    wait_until(Duration::from_secs(10), "one's pass to block", || async {
        one.leads() && slow.started.load(Ordering::SeqCst) >= 1
    })
    .await;
    let term = leader_entry(&*kv).await.expect("leader key");
    // An operator (or etcd) ends the lease: the leader must notice from its
    // keep-alive, while the pass is still blocked, and drop the pass.
    kv.revoke(term.lease.expect("leader key under a lease"))
        .await
        .unwrap();
    wait_until(TTL, "one to drop its pass", || async {
        slow.cancelled.load(Ordering::SeqCst) >= 1
    })
    .await;
    let _ = release.send(true);
    // It campaigns again and, leading a new term, completes the switch itself.
    wait_until(
        Duration::from_secs(10),
        "the switch to complete",
        || async {
            let r = cp.route("t").await.unwrap();
            r.epochs
                .iter()
                .any(|e| e.n == 2 && e.state == EpochState::Open)
        },
    )
    .await;
    let now = leader_entry(&*kv).await.expect("leader key");
    assert_ne!(now.mod_revision, term.mod_revision, "a new term");
    one.shut_down().await;
    assert!(
        leader_entry(&*kv).await.is_none(),
        "a clean shutdown hands over"
    );
}
