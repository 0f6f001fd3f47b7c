//! Test doubles and helpers shared by the control plane's integration tests
//! on real etcd (and, where they need it, real Kafka).

// Each test file uses only part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flotilla_client::kafka::{KafkaError, KafkaProperties, SecurityProfiles};
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{
    ClusterRole, ClusterSpec, Expect, Guard, KvEntry, KvStore, LeaseId, Registry, RegistryError,
    Revision, WatchStream,
};
use flotilla_control::controller::now_millis;
use flotilla_control::kafka::WriteFenceStatus;
use flotilla_control::{AddCluster, ControlPlane, FleetKafka, RdKafkaFleet};
use flotilla_testkit::etcd::EtcdServer;
use tokio::sync::watch;

/// A fake Kafka whose end offsets are all `ends`; with `block`, every
/// end-offset read blocks until `release` turns true (dead clusters).
pub struct SlowKafka {
    ends: i64,
    block: bool,
    release: watch::Receiver<bool>,
    /// End-offset reads begun.
    pub started: AtomicUsize,
    /// End-offset reads that returned.
    pub completed: AtomicUsize,
    /// Blocked reads dropped before they returned (the pass was abandoned).
    pub cancelled: Arc<AtomicUsize>,
}

impl SlowKafka {
    /// The fake, and the sender that releases blocked reads.
    pub fn new(ends: i64, block: bool) -> (Arc<SlowKafka>, watch::Sender<bool>) {
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

/// An etcd store with two test hooks: it counts full reads of the fleet
/// (`list`: every reconcile pass starts with one, so the count tells a test
/// the controller has read the registry since a given moment), and its lease
/// operations (grant, renew, revoke) can be cut, as if this controller lost
/// its connection to etcd while its pass is busy elsewhere.
pub struct TestKv {
    inner: Arc<dyn KvStore>,
    /// Full reads (`list`) so far.
    pub lists: AtomicUsize,
    /// While true, lease operations fail with `Unavailable`.
    pub leases_down: AtomicBool,
}

impl TestKv {
    /// Wraps `inner`, counting from 0 with leases up.
    pub fn new(inner: Arc<dyn KvStore>) -> Arc<TestKv> {
        Arc::new(TestKv {
            inner,
            lists: AtomicUsize::new(0),
            leases_down: AtomicBool::new(false),
        })
    }

    fn check_leases(&self) -> Result<(), RegistryError> {
        if self.leases_down.load(Ordering::SeqCst) {
            return Err(RegistryError::Unavailable {
                endpoints: self.inner.endpoints(),
                message: "lease operations cut by the test".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl KvStore for TestKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, RegistryError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision), RegistryError> {
        let r = self.inner.list(prefix).await;
        self.lists.fetch_add(1, Ordering::SeqCst);
        r
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
        self.check_leases()?;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, RegistryError> {
        self.check_leases()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError> {
        self.check_leases()?;
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

/// A client of `etcd`.
pub async fn etcd_kv(etcd: &EtcdServer) -> Arc<dyn KvStore> {
    Arc::new(
        EtcdKv::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .unwrap(),
    )
}

/// A control plane on `etcd` under fleet name `fleet`, talking to real Kafka
/// clusters; `fence`: whether draining fences a cluster's writes (ACLs).
pub async fn rdkafka_control_plane(etcd: &EtcdServer, fleet: &str, fence: bool) -> ControlPlane {
    let kafka = RdKafkaFleet::new(
        KafkaProperties::new(),
        SecurityProfiles::empty(),
        Duration::from_secs(10),
    );
    let kafka = if fence {
        kafka
    } else {
        kafka.without_write_fence()
    };
    ControlPlane::new(Registry::new(etcd_kv(etcd).await, fleet), Arc::new(kafka))
}

/// Registers and activates permanent cluster `id` at `bootstrap`.
pub async fn add_active_cluster(cp: &ControlPlane, id: &str, bootstrap: String) {
    let req = AddCluster {
        id: id.to_string(),
        bootstrap,
        weight: 100,
        role: ClusterRole::Permanent,
        labels: Default::default(),
        security_profile: None,
        activate: true,
    };
    cp.add_cluster(req, now_millis()).await.unwrap();
}

/// Registers and activates permanent clusters `ids` (bootstrap `<id>:9092`;
/// for control planes whose Kafka is a test double).
pub async fn add_active_clusters(cp: &ControlPlane, ids: &[&str]) {
    for id in ids {
        add_active_cluster(cp, id, format!("{id}:9092")).await;
    }
}

/// Polls `cond` every 5 ms until it holds, failing with `what` once `within`
/// has passed; returns how long it took.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if cond().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out after {within:?} waiting for {what}");
}
