//! The registry behaviour suite against the in-memory backend, plus the
//! memory-only fault hooks (outage, dropped watches, manual clock, bounded history).

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::registry::conformance::{self, eventually, sample_cluster, DEADLINE};
use flotilla_client::registry::memory::{ManualClock, MemoryKv};
use flotilla_client::registry::{
    ClusterState, Expect, FleetWatcher, KvStore, Registry, RegistryError, WatcherOptions,
};

fn kv() -> (MemoryKv, Arc<dyn KvStore>) {
    let mem = MemoryKv::new();
    let dynkv: Arc<dyn KvStore> = Arc::new(mem.clone());
    (mem, dynkv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let (_, kv) = kv();
    conformance::run_all(kv, "mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_an_outage() {
    let (mem, kv) = kv();
    let (m1, m2) = (mem.clone(), mem.clone());
    conformance::case_watcher_survives_outage(
        kv,
        "outage",
        || async move { m1.set_unavailable(true) },
        || async move { m2.set_unavailable(false) },
    )
    .await;
}

#[tokio::test]
async fn unreachable_registry_at_start_is_a_clear_error() {
    let (mem, kv) = kv();
    mem.set_unavailable(true);
    let opts = WatcherOptions {
        start_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let started = tokio::time::Instant::now();
    let err = FleetWatcher::start(Registry::new(kv, "f"), opts)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(MemoryKv::ENDPOINT),
        "names the endpoint: {err}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "retries until the timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reloads_after_compaction() {
    let (mem, kv) = kv();
    let reg = Registry::new(kv.clone(), "f");
    reg.create_cluster(&sample_cluster("a")).await.unwrap();
    // A long backoff so the writes and the compaction below happen while the watch is down.
    let opts = WatcherOptions {
        retry_backoff: Duration::from_millis(400),
        ..Default::default()
    };
    let w = FleetWatcher::start(reg.clone(), opts).await.unwrap();
    eventually("the watch to be up", || async {
        (!w.is_stale()).then_some(())
    })
    .await;

    mem.disconnect_watchers();
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
    assert_eq!(w.reloads(), 1, "the watcher reloaded once");
    assert_eq!(*snap, reg.snapshot().await.unwrap());
    // And it keeps following changes afterwards.
    reg.create_cluster(&sample_cluster("c")).await.unwrap();
    w.wait_for(DEADLINE, |s| s.cluster("c").is_some())
        .await
        .unwrap();
}

#[tokio::test]
async fn bounded_history_compacts_old_revisions() {
    let (mem, kv) = kv();
    mem.set_history_limit(3);
    let first = kv
        .put_if("/h/k", b"0".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    for i in 1..10u8 {
        kv.put_if("/h/k", vec![i], Expect::Any, None).await.unwrap();
    }
    conformance::expect_compacted(kv.watch("/h/", first).await, first).await;
    let now = kv.current_revision().await.unwrap();
    let mut w = kv.watch("/h/", now - 2).await.unwrap();
    assert_eq!(conformance::next_events(&mut w, 3).await.len(), 3);
}

#[tokio::test]
async fn manual_clock_drives_lease_expiry() {
    let clock = ManualClock::new();
    let mem = MemoryKv::with_clock(Arc::new(clock.clone()));
    let lease = mem.grant_lease(Duration::from_secs(5)).await.unwrap();
    mem.put_if("/c/k", b"v".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(4));
    assert_eq!(mem.expire_leases(), 0);
    mem.keep_alive(lease).await.unwrap();
    clock.advance(Duration::from_secs(4));
    assert_eq!(mem.expire_leases(), 0, "keep-alive restarted the TTL");
    assert!(mem.get("/c/k").await.unwrap().is_some());
    clock.advance(Duration::from_secs(2));
    assert_eq!(mem.expire_leases(), 1);
    assert!(mem.get("/c/k").await.unwrap().is_none());
    assert_eq!(mem.lease_count(), 0);
    assert_eq!(
        mem.keep_alive(lease).await.unwrap_err(),
        RegistryError::LeaseExpired { lease }
    );
}

#[tokio::test]
async fn unavailable_store_refuses_everything_and_names_itself() {
    let (mem, kv) = kv();
    mem.set_unavailable(true);
    let err = kv.get("/x").await.unwrap_err();
    assert!(err.is_transient());
    assert!(err.to_string().contains(MemoryKv::ENDPOINT), "{err}");
    assert!(kv.put_if("/x", vec![], Expect::Any, None).await.is_err());
    mem.set_unavailable(false);
    kv.put_if("/x", vec![], Expect::Any, None).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn spawned_keep_alive_holds_the_client_record_until_aborted() {
    let (_, kv) = kv();
    let reg = Registry::new(kv, "f");
    let lease = reg
        .register_client(conformance::sample_client("p"), Duration::from_secs(1))
        .await
        .unwrap();
    let renew = lease.spawn_keep_alive(Duration::from_millis(300));
    // Paused tokio time: this sleep runs the reaper and the renewals for 5 virtual seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        reg.snapshot().await.unwrap().producers().count(),
        1,
        "renewed, still there"
    );
    renew.abort();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        reg.snapshot().await.unwrap().producers().count(),
        0,
        "lapsed once renewals stopped"
    );
    assert!(matches!(
        lease.keep_alive().await,
        Err(RegistryError::LeaseExpired { .. })
    ));
}

#[tokio::test]
async fn watcher_start_refuses_a_malformed_registry_naming_the_key() {
    let (_, kv) = kv();
    kv.put_if(
        "/flotilla/f/topics/t",
        b"{\"version\":1}".to_vec(),
        Expect::Absent,
        None,
    )
    .await
    .unwrap();
    let err = FleetWatcher::start(Registry::new(kv, "f"), WatcherOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Model(_)), "{err:?}");
    assert!(err.to_string().contains("/flotilla/f/topics/t"), "{err}");
}

#[tokio::test]
async fn a_lease_drops_all_its_keys_in_one_revision_like_etcd() {
    let (_, kv) = kv();
    let lease = kv.grant_lease(Duration::from_secs(30)).await.unwrap();
    kv.put_if("/l/a", vec![1], Expect::Absent, Some(lease))
        .await
        .unwrap();
    let r = kv
        .put_if("/l/b", vec![2], Expect::Absent, Some(lease))
        .await
        .unwrap();
    let mut w = kv.watch("/l/", r + 1).await.unwrap();
    kv.revoke(lease).await.unwrap();
    assert_eq!(
        kv.current_revision().await.unwrap(),
        r + 1,
        "one revision for the revoke"
    );
    let evs = conformance::next_events(&mut w, 2).await;
    assert!(evs.iter().all(|e| e.mod_revision() == r + 1), "{evs:?}");
    // Replayed from history: still one batch for that revision.
    let mut replay = kv.watch("/l/", r + 1).await.unwrap();
    use futures::StreamExt;
    let batch = replay.next().await.unwrap().unwrap();
    assert_eq!(batch.events.len(), 2);
    assert_eq!(batch.revision, r + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_misses_and_replays_nothing_across_dropped_watches() {
    for seed in 0..5 {
        let (mem, kv) = kv();
        let cut = mem.clone();
        conformance::case_watcher_random_ops(kv, "rnd", seed, 300, move || {
            cut.disconnect_watchers()
        })
        .await;
    }
}
