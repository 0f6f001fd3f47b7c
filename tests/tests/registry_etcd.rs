//! The registry behaviour suite (`flotilla_client::registry::conformance`)
//! against a real throwaway etcd, plus etcd-only failure modes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::registry::conformance;
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{FleetWatcher, KvStore, Registry, RegistryError, WatcherOptions};
use flotilla_testkit::etcd::EtcdServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_etcd() {
    let etcd = EtcdServer::start().expect("start etcd");
    let kv: Arc<dyn KvStore> = Arc::new(
        EtcdKv::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .expect("connect"),
    );
    conformance::run_all(kv, "etcd").await;
}

fn quick() -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_millis(500),
        op_timeout: Duration::from_millis(1000),
        ..EtcdOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_at_start_is_unavailable_naming_the_endpoint() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let endpoint = etcd.endpoint();
    etcd.kill();

    let started = Instant::now();
    let err = EtcdKv::connect(&[endpoint.as_str()], quick())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&endpoint),
        "names {endpoint}: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails within the connect timeout"
    );

    // A lazily connected store: the watcher's start gives up after its timeout.
    let kv = EtcdKv::connect_lazy(&[endpoint.as_str()], quick())
        .await
        .expect("lazy connect");
    let opts = WatcherOptions {
        start_timeout: Duration::from_millis(1500),
        ..Default::default()
    };
    let started = Instant::now();
    let err = FleetWatcher::start(Registry::new(Arc::new(kv), "f"), opts)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&endpoint),
        "names {endpoint}: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "gives up after the start timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_keeps_working_across_an_etcd_restart() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let kv = EtcdKv::connect(&[etcd.endpoint()], quick())
        .await
        .expect("connect");
    let r1 = kv
        .put_if(
            "/r/k",
            b"1".to_vec(),
            flotilla_client::registry::Expect::Absent,
            None,
        )
        .await
        .unwrap();
    etcd.kill();
    let err = kv.get("/r/k").await.unwrap_err();
    assert!(err.is_transient(), "etcd down is transient: {err:?}");
    tokio::task::block_in_place(|| etcd.restart()).expect("restart etcd");
    let got = conformance::eventually("etcd to answer again", || {
        let kv = kv.clone();
        async move { kv.get("/r/k").await.ok() }
    })
    .await;
    assert_eq!(got.expect("data survives the restart").mod_revision, r1);
}
