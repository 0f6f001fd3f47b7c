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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flotilla_client::kafka::KafkaError;
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{
    ClientKind, ClientLease, ClientRecord, ClusterRole, ClusterSpec, EpochState, Expect, Guard,
    KvEntry, KvStore, LeaseId, Registry, RegistryError, Revision, WatchStream, SCHEMA_VERSION,
};
use flotilla_control::controller::{
    now_millis, run_elected, Controller, ElectionOptions, Leadership,
};
use flotilla_control::kafka::WriteFenceStatus;
use flotilla_control::{AddCluster, ControlPlane, FleetKafka, SetRoute};
use flotilla_testkit::etcd::EtcdServer;
use tokio::sync::watch;

/// Far longer than the test: a pass that comes from the interval fails it.
const INTERVAL: Duration = Duration::from_secs(60);
/// How soon after the last acknowledgement the switch must be sealed.
const REACT_WITHIN: Duration = Duration::from_secs(2);

/// Clusters that answer at once; every end offset is 0.
struct InstantKafka;

#[async_trait]
impl FleetKafka for InstantKafka {
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
        Ok(vec![0; partitions as usize])
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

/// An etcd store that counts full reads of the fleet (`list`): every
/// reconcile pass starts with one, so the count tells the test that the
/// controller has read the registry since a given moment.
struct CountingKv {
    inner: Arc<dyn KvStore>,
    lists: AtomicUsize,
}

#[async_trait]
impl KvStore for CountingKv {
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
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, RegistryError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError> {
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

/// Polls `cond` every 5 ms until it holds or `within` passes; returns how
/// long it took.
async fn within<F, Fut>(within: Duration, what: &str, mut cond: F) -> Duration
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_seals_right_after_the_last_ack_whatever_the_interval() {
    let etcd = EtcdServer::start().expect("etcd");
    let kv = Arc::new(CountingKv {
        inner: Arc::new(
            EtcdKv::connect(&[etcd.endpoint()], EtcdOptions::default())
                .await
                .unwrap(),
        ),
        lists: AtomicUsize::new(0),
    });
    let cp = ControlPlane::new(Registry::new(kv.clone(), "react"), Arc::new(InstantKafka));
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
    within(Duration::from_secs(5), "the first pass", || async {
        kv.lists.load(Ordering::SeqCst) >= reads + 2
    })
    .await;

    // One producer acknowledges: the controller looks (a pass reads the
    // registry) but must not seal while the other is missing.
    let before = kv.lists.load(Ordering::SeqCst);
    ack(&mut p1, 2).await;
    within(REACT_WITHIN, "a pass after the first ack", || async {
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
    let took = within(REACT_WITHIN, "the switch to be sealed", || async {
        epoch_state(&cp, 2).await == Some(EpochState::Open)
    })
    .await;
    assert_eq!(epoch_state(&cp, 1).await, Some(EpochState::Sealed));
    eprintln!("sealed {took:?} after the last acknowledgement (interval {INTERVAL:?})");

    // The seal is a change too (one more pass may follow it), but passes
    // must not keep triggering each other: the controller comes to rest.
    let mut last = (kv.lists.load(Ordering::SeqCst), Instant::now());
    within(
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
