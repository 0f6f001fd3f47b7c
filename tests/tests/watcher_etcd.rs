//! `FleetWatcher` against a real etcd that dies and comes back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_client::registry::conformance::{self, eventually, sample_cluster, DEADLINE};
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{ClusterState, FleetWatcher, KvStore, Registry, WatcherOptions};
use flotilla_testkit::etcd::EtcdServer;

fn opts() -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_millis(500),
        op_timeout: Duration::from_secs(2),
        keep_alive_interval: Duration::from_millis(500),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_etcd_kill_and_restart() {
    let etcd = Arc::new(Mutex::new(EtcdServer::start().expect("start etcd")));
    let endpoint = etcd.lock().unwrap().endpoint();
    let kv: Arc<dyn KvStore> =
        Arc::new(EtcdKv::connect(&[endpoint], opts()).await.expect("connect"));
    let (e1, e2) = (etcd.clone(), etcd.clone());
    conformance::case_watcher_survives_outage(
        kv,
        "outage",
        || async move { e1.lock().unwrap().kill() },
        || async move {
            tokio::task::block_in_place(|| e2.lock().unwrap().restart()).expect("restart etcd")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reloads_when_history_was_compacted_during_an_outage() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let kv: Arc<dyn KvStore> = Arc::new(
        EtcdKv::connect(&[etcd.endpoint()], opts())
            .await
            .expect("connect"),
    );
    let reg = Registry::new(kv.clone(), "f");
    reg.create_cluster(&sample_cluster("a")).await.unwrap();
    // A long first backoff: the writes and the compaction below land before the watcher re-watches.
    let wopts = WatcherOptions {
        retry_backoff: Duration::from_secs(4),
        max_backoff: Duration::from_secs(4),
        ..Default::default()
    };
    let w = FleetWatcher::start(reg.clone(), wopts).await.unwrap();
    eventually("the watch to be up", || async {
        (!w.is_stale()).then_some(())
    })
    .await;

    etcd.kill();
    eventually("the watcher to notice", || async {
        w.is_stale().then_some(())
    })
    .await;
    tokio::task::block_in_place(|| etcd.restart()).expect("restart etcd");
    eventually("etcd to answer", || {
        let kv = kv.clone();
        async move { kv.current_revision().await.ok() }
    })
    .await;
    reg.create_cluster(&sample_cluster("b")).await.unwrap();
    reg.set_cluster_state("a", ClusterState::Active)
        .await
        .unwrap();
    let rev = kv.current_revision().await.unwrap();
    kv.compact(rev).await.unwrap();

    let snap = w
        .wait_for(DEADLINE, |s| {
            s.cluster("b").is_some() && s.cluster("a").unwrap().state == ClusterState::Active
        })
        .await
        .unwrap();
    assert_eq!(
        w.reloads(),
        1,
        "the watcher hit the compaction and reloaded"
    );
    assert_eq!(*snap, reg.snapshot().await.unwrap());
    reg.create_cluster(&sample_cluster("c")).await.unwrap();
    w.wait_for(DEADLINE, |s| s.cluster("c").is_some())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_loses_no_event_across_random_etcd_restarts() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let kv: Arc<dyn KvStore> = Arc::new(
        EtcdKv::connect(&[etcd.endpoint()], opts())
            .await
            .expect("connect"),
    );
    let probe = kv.clone();
    let restarts = Arc::new(Mutex::new(0));
    let count = restarts.clone();
    conformance::case_watcher_random_ops(kv, "rnd", 11, 60, move || {
        tokio::task::block_in_place(|| {
            etcd.restart().expect("restart etcd");
            // Wait until the store answers again before the next operation.
            tokio::runtime::Handle::current().block_on(eventually("etcd to answer", || {
                let kv = probe.clone();
                async move { kv.current_revision().await.ok() }
            }));
        });
        *count.lock().unwrap() += 1;
    })
    .await;
    assert!(
        *restarts.lock().unwrap() > 0,
        "the seed restarts etcd at least once"
    );
}
