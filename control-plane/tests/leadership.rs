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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flotilla_client::kafka::KafkaError;
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{
    ClusterRole, ClusterSpec, EpochState, Expect, Guard, KvEntry, KvStore, LeaseId, Registry,
    RegistryError, Revision, WatchStream,
};
use flotilla_control::controller::{
    now_millis, run_elected, Controller, ElectionOptions, Leadership,
};
use flotilla_control::kafka::WriteFenceStatus;
use flotilla_control::{AddCluster, ControlPlane, FleetKafka, SetRoute};
use flotilla_testkit::etcd::EtcdServer;
use tokio::sync::watch;

const TTL: Duration = Duration::from_secs(2);
const LEADER_KEY: &str = "/flotilla/lead/controller/leader";

/// A fake Kafka whose end offsets are all `ends`; with `block`, every
/// end-offset read blocks until `release` turns true (dead clusters).
struct SlowKafka {
    ends: i64,
    block: bool,
    release: watch::Receiver<bool>,
    started: AtomicUsize,
    completed: AtomicUsize,
    /// Blocked reads dropped before they returned (the pass was abandoned).
    cancelled: Arc<AtomicUsize>,
}

impl SlowKafka {
    fn new(ends: i64, block: bool) -> (Arc<SlowKafka>, watch::Sender<bool>) {
        let (tx, release) = watch::channel(false);
        let k = SlowKafka {
            ends,
            block,
            release,
            started: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            cancelled: Arc::default(),
        };
        (Arc::new(k), tx)
    }
}

/// Counts a drop before `disarm`.
struct OnCancel(Arc<AtomicUsize>, bool);

impl Drop for OnCancel {
    fn drop(&mut self) {
        if self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl FleetKafka for SlowKafka {
    async fn read_cluster_id(&self, bootstrap: &str) -> Result<String, KafkaError> {
        Ok(format!("kid-{bootstrap}"))
    }
    async fn ensure_topic(&self, _: &ClusterSpec, _: &str, _: u32) -> Result<(), KafkaError> {
        Ok(())
    }
    async fn end_offsets(
        &self,
        _: &ClusterSpec,
        _: &str,
        partitions: u32,
    ) -> Result<Vec<i64>, KafkaError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if self.block {
            let mut armed = OnCancel(self.cancelled.clone(), true);
            let mut release = self.release.clone();
            let _ = release.wait_for(|r| *r).await;
            armed.1 = false;
        }
        self.completed.fetch_add(1, Ordering::SeqCst);
        Ok(vec![self.ends; partitions as usize])
    }
    async fn committed_offsets(
        &self,
        _: &ClusterSpec,
        _: &str,
        _: &str,
        partitions: u32,
    ) -> Result<Vec<Option<i64>>, KafkaError> {
        Ok(vec![None; partitions as usize])
    }
    async fn fence_writes(&self, _: &ClusterSpec, _: &str) -> Result<WriteFenceStatus, KafkaError> {
        Ok(WriteFenceStatus::Fenced)
    }
}

/// An etcd store whose lease operations (grant, renew) can be cut, as if this
/// controller lost its connection to etcd while its pass is busy elsewhere.
struct FlakyLeases {
    inner: Arc<dyn KvStore>,
    down: AtomicBool,
}

impl FlakyLeases {
    fn check(&self) -> Result<(), RegistryError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RegistryError::Unavailable {
                endpoints: self.inner.endpoints(),
                message: "lease operations cut by the test".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl KvStore for FlakyLeases {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, RegistryError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision), RegistryError> {
        self.inner.list(prefix).await
    }
    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision, RegistryError> {
        self.inner.put_if(key, value, expect, lease).await
    }
    async fn delete_if(&self, key: &str, expect: Expect) -> Result<Revision, RegistryError> {
        self.inner.delete_if(key, expect).await
    }
    async fn put_if_guarded(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        self.inner
            .put_if_guarded(key, value, expect, lease, guard)
            .await
    }
    async fn delete_if_guarded(
        &self,
        key: &str,
        expect: Expect,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        self.inner.delete_if_guarded(key, expect, guard).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        self.check()?;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, RegistryError> {
        self.check()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError> {
        self.check()?;
        self.inner.revoke(lease).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, RegistryError> {
        self.inner.watch(prefix, from).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), RegistryError> {
        self.inner.compact(revision).await
    }
    async fn current_revision(&self) -> Result<Revision, RegistryError> {
        self.inner.current_revision().await
    }
    fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints()
    }
}

async fn etcd_kv(etcd: &EtcdServer) -> Arc<dyn KvStore> {
    Arc::new(
        EtcdKv::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .unwrap(),
    )
}

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
    for id in ["a", "b"] {
        let req = AddCluster {
            id: id.into(),
            bootstrap: format!("{id}:9092"),
            weight: 1,
            role: ClusterRole::Permanent,
            labels: Default::default(),
            security_profile: None,
            activate: true,
        };
        cp.add_cluster(req, now_millis()).await.unwrap();
    }
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

/// Polls `cond` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {within:?} waiting for {what}");
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
    let flaky = Arc::new(FlakyLeases {
        inner: etcd_kv(&etcd).await,
        down: AtomicBool::new(false),
    });
    let (slow, release) = SlowKafka::new(7, true);
    let (fast, _) = SlowKafka::new(9, false);
    let cp1 = ControlPlane::new(Registry::new(flaky.clone(), "lead"), slow.clone());
    let cp2 = ControlPlane::new(Registry::new(kv.clone(), "lead"), fast.clone());
    fleet_with_pending_switch(&cp2).await;

    let one = candidate(cp1, "one");
    eventually(Duration::from_secs(10), "one to lead", || async {
        one.leads()
    })
    .await;
    eventually(Duration::from_secs(10), "one's pass to block", || async {
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
    flaky.down.store(true, Ordering::SeqCst);
    eventually(
        TTL,
        "one to step down before its lease can expire",
        || async { !one.leads() },
    )
    .await;
    eventually(
        Duration::from_secs(1),
        "one's pass to be dropped",
        || async { slow.cancelled.load(Ordering::SeqCst) >= 1 },
    )
    .await;
    eventually(Duration::from_secs(10), "two to lead", || async {
        two.leads()
    })
    .await;
    assert!(
        cut.elapsed() >= TTL - Duration::from_millis(700),
        "two led {:?} after one's last renewal: before one's lease could have expired",
        cut.elapsed()
    );
    eventually(
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
    flaky.down.store(false, Ordering::SeqCst);
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
    eventually(Duration::from_secs(10), "one's pass to block", || async {
        one.leads() && slow.started.load(Ordering::SeqCst) >= 1
    })
    .await;
    let term = leader_entry(&*kv).await.expect("leader key");
    // An operator (or etcd) ends the lease: the leader must notice from its
    // keep-alive, while the pass is still blocked, and drop the pass.
    kv.revoke(term.lease.expect("leader key under a lease"))
        .await
        .unwrap();
    eventually(TTL, "one to drop its pass", || async {
        slow.cancelled.load(Ordering::SeqCst) >= 1
    })
    .await;
    let _ = release.send(true);
    // It campaigns again and, leading a new term, completes the switch itself.
    eventually(
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
