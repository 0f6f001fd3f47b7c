//! The behaviour suite every [`KvStore`] backend must pass, written once and
//! run against [`super::memory::MemoryKv`] (`client/tests/registry_memory.rs`)
//! and a real etcd (`tests/tests/registry_etcd.rs`).
//!
//! Every case takes the store and a namespace (a unique string; all keys it
//! writes start with `/conformance/<ns>/` or belong to fleet `<ns>`), so cases
//! can share one etcd. Cases panic with a message on failure. Waits on
//! asynchronous outcomes (lease expiry, watch delivery) poll a condition
//! until a deadline; no sleep stands in for a condition.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::kv::{Expect, KvStore, RegistryError, Revision, WatchEvent, WatchStream};
use super::model::{
    ClientKind, ClientRecord, ClusterRole, ClusterSpec, ClusterState, Epoch, EpochState,
    GroupRecord, ModelError, TopicRoute, WeightedCluster, SCHEMA_VERSION,
};
use super::store::Registry;
use super::watcher::{FleetWatcher, WatcherOptions};

/// Deadline for anything asynchronous (etcd's minimum lease TTL is ~2 s).
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A provisioning, permanent cluster `id`.
pub fn sample_cluster(id: &str) -> ClusterSpec {
    ClusterSpec {
        version: SCHEMA_VERSION,
        id: id.into(),
        bootstrap: format!("{id}.kafka:9092"),
        kafka_cluster_id: format!("kid-{id}"),
        state: ClusterState::Provisioning,
        role: ClusterRole::Permanent,
        weight: 100,
        labels: Default::default(),
        security_profile: None,
        created_at: 1,
    }
}

/// A route of `topic` with one open epoch writing to `clusters`.
pub fn sample_route(topic: &str, clusters: &[&str]) -> TopicRoute {
    TopicRoute {
        version: SCHEMA_VERSION,
        topic: topic.into(),
        partitions: 3,
        epochs: vec![Epoch {
            n: 1,
            write: clusters
                .iter()
                .map(|c| WeightedCluster {
                    cluster: c.to_string(),
                    weight: 100,
                })
                .collect(),
            state: EpochState::Open,
            fence: Default::default(),
            created_at: 1,
            ack_deadline: None,
        }],
    }
}

/// A producer record `id`.
pub fn sample_client(id: &str) -> ClientRecord {
    ClientRecord {
        version: SCHEMA_VERSION,
        kind: ClientKind::Producer,
        id: id.into(),
        acked: Default::default(),
        group: None,
        started_at: 1,
    }
}

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `n` events from `stream` (failing after [`DEADLINE`]).
pub async fn next_events(stream: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    let fut = async {
        while out.len() < n {
            match stream.next().await {
                Some(Ok(batch)) => {
                    assert!(!batch.events.is_empty(), "empty watch batch");
                    assert!(
                        batch
                            .events
                            .iter()
                            .all(|e| e.mod_revision() <= batch.revision),
                        "batch revision {} below its events",
                        batch.revision
                    );
                    out.extend(batch.events)
                }
                Some(Err(e)) => panic!("watch failed: {e}"),
                None => panic!("watch ended after {} of {n} events", out.len()),
            }
        }
    };
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {n} watch events"));
    out
}

fn ns_key(ns: &str, k: &str) -> String {
    format!("/conformance/{ns}/{k}")
}

/// Runs every backend-agnostic case, each in its own namespace derived from `ns`.
pub async fn run_all(kv: Arc<dyn KvStore>, ns: &str) {
    case_revisions(kv.clone(), &format!("{ns}-rev")).await;
    case_conditional_writes(kv.clone(), &format!("{ns}-cas")).await;
    case_cas_race(kv.clone(), &format!("{ns}-race")).await;
    case_guarded_writes(kv.clone(), &format!("{ns}-guard")).await;
    case_lease_expiry(kv.clone(), &format!("{ns}-lease")).await;
    case_watch_from_revision(kv.clone(), &format!("{ns}-watch")).await;
    case_registry_clusters(kv.clone(), &format!("{ns}-clusters")).await;
    case_registry_routes(kv.clone(), &format!("{ns}-routes")).await;
    case_registry_snapshot(kv.clone(), &format!("{ns}-snap")).await;
    case_client_lease(kv.clone(), &format!("{ns}-client")).await;
    case_watcher_follows_changes(kv.clone(), &format!("{ns}-watcher")).await;
    case_watcher_random_ops(kv.clone(), &format!("{ns}-random"), 7, 150, || {}).await;
    // Compaction is global on etcd: keep it last.
    case_compaction(kv.clone(), &format!("{ns}-compact")).await;
}

/// Revisions: global counter, `mod_revision` / `create_revision`, sorted prefix lists.
pub async fn case_revisions(kv: Arc<dyn KvStore>, ns: &str) {
    let (a, b) = (ns_key(ns, "a"), ns_key(ns, "b"));
    let r0 = kv.current_revision().await.unwrap();
    let r1 = kv
        .put_if(&b, b"1".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    assert!(r1 > r0, "a write must advance the revision ({r0} -> {r1})");
    let r2 = kv
        .put_if(&a, b"2".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(r2, r1 + 1, "one write, one revision");
    let r3 = kv
        .put_if(&b, b"3".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let e = kv.get(&b).await.unwrap().expect("b exists");
    assert_eq!(
        (e.mod_revision, e.create_revision, e.value.as_slice()),
        (r3, r1, &b"3"[..])
    );
    assert_eq!(e.lease, None);
    let (entries, rev) = kv.list(&ns_key(ns, "")).await.unwrap();
    assert!(rev >= r3);
    let keys: Vec<_> = entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![a.as_str(), b.as_str()],
        "list is sorted by key and limited to the prefix"
    );
    assert!(kv.get(&ns_key(ns, "missing")).await.unwrap().is_none());
    let r4 = kv.delete_if(&a, Expect::Any).await.unwrap();
    assert_eq!(r4, r3 + 1);
    assert!(kv.get(&a).await.unwrap().is_none());
    assert_eq!(kv.current_revision().await.unwrap(), r4);
    // Deleting what is absent changes nothing.
    assert_eq!(kv.delete_if(&a, Expect::Any).await.unwrap(), r4);
    let r5 = kv
        .put_if(&a, b"again".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    assert_eq!(
        kv.get(&a).await.unwrap().unwrap().create_revision,
        r5,
        "re-created key: new create_revision"
    );
}

/// Conditional writes: `Absent`, `ModRevision`, conflicts report the current revision.
pub async fn case_conditional_writes(kv: Arc<dyn KvStore>, ns: &str) {
    let k = ns_key(ns, "k");
    let r1 = kv
        .put_if(&k, b"1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    match kv.put_if(&k, b"x".to_vec(), Expect::Absent, None).await {
        Err(RegistryError::Conflict {
            key,
            expected: Expect::Absent,
            actual,
        }) => {
            assert_eq!((key.as_str(), actual), (k.as_str(), Some(r1)));
        }
        other => panic!("create over an existing key must conflict, got {other:?}"),
    }
    let r2 = kv
        .put_if(&k, b"2".to_vec(), Expect::ModRevision(r1), None)
        .await
        .unwrap();
    let err = kv
        .put_if(&k, b"x".to_vec(), Expect::ModRevision(r1), None)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RegistryError::Conflict {
            key: k.clone(),
            expected: Expect::ModRevision(r1),
            actual: Some(r2)
        }
    );
    assert!(
        err.to_string().contains(&k),
        "conflict names the key: {err}"
    );
    assert_eq!(
        kv.get(&k).await.unwrap().unwrap().value,
        b"2",
        "a failed write changes nothing"
    );
    let err = kv.delete_if(&k, Expect::ModRevision(r1)).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Conflict { actual: Some(r), .. } if r == r2),
        "{err:?}"
    );
    kv.delete_if(&k, Expect::ModRevision(r2)).await.unwrap();
    let err = kv
        .put_if(&k, b"x".to_vec(), Expect::ModRevision(r2), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Conflict { actual: None, .. }),
        "{err:?}"
    );
    // Deleting an absent key expecting it absent is a no-op.
    kv.delete_if(&k, Expect::Absent).await.unwrap();
}

/// Guarded writes ([`KvStore::put_if_guarded`], [`Registry::guarded`]): a
/// write happens only while its guard key matches, atomically with its own
/// condition; a failed guard is [`RegistryError::GuardFailed`], checked before
/// the key's own condition, and changes nothing (a guarded read-modify-CAS
/// loop does not retry it). The guard of a leader: its key under a lease,
/// gone when the lease is revoked.
pub async fn case_guarded_writes(kv: Arc<dyn KvStore>, ns: &str) {
    let (g, k) = (ns_key(ns, "leader"), ns_key(ns, "k"));
    let lease = kv.grant_lease(Duration::from_secs(30)).await.unwrap();
    let held = kv
        .put_if(&g, b"me".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    let guard = super::kv::Guard {
        key: g.clone(),
        expect: Expect::ModRevision(held),
    };
    let r1 = kv
        .put_if_guarded(&k, b"1".to_vec(), Expect::Absent, None, &guard)
        .await
        .unwrap();
    // The key's own condition fails, the guard holds: an ordinary conflict.
    let err = kv
        .put_if_guarded(&k, b"x".to_vec(), Expect::Absent, None, &guard)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::Conflict { key, actual: Some(r), .. } if *key == k && *r == r1),
        "{err:?}"
    );
    // Through a guarded registry too.
    let reg = Registry::new(kv.clone(), ns).guarded(guard.clone());
    reg.put_route(&sample_route("t", &["a"]), Expect::Absent)
        .await
        .unwrap();
    // The leadership ends: every guarded write is refused, nothing changes.
    kv.revoke(lease).await.unwrap();
    let before = kv.current_revision().await.unwrap();
    let err = kv
        .put_if_guarded(&k, b"2".to_vec(), Expect::ModRevision(r1), None, &guard)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RegistryError::GuardFailed {
            key: g.clone(),
            expected: Expect::ModRevision(held),
            actual: None
        }
    );
    let err = kv
        .delete_if_guarded(&k, Expect::ModRevision(r1), &guard)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::GuardFailed { .. }), "{err:?}");
    // Another leader took over: the guard still fails (the key is back, but newer).
    let other = kv
        .put_if(&g, b"other".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    let err = reg
        .update_route("t", |cur| {
            let mut r = cur.expect("route exists").clone();
            r.partitions += 1;
            Ok(Some(r))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::GuardFailed { actual: Some(a), .. } if *a == other),
        "{err:?}"
    );
    assert_eq!(
        kv.current_revision().await.unwrap(),
        other,
        "refused guarded writes changed the store (only the new leader key was written since {before})"
    );
    assert_eq!(kv.get(&k).await.unwrap().unwrap().value, b"1");
    // The new leader's guard holds.
    let guard = super::kv::Guard {
        key: g.clone(),
        expect: Expect::ModRevision(other),
    };
    kv.delete_if_guarded(&k, Expect::ModRevision(r1), &guard)
        .await
        .unwrap();
    assert!(kv.get(&k).await.unwrap().is_none());
}

/// Racing writers with the same condition: exactly one wins.
pub async fn case_cas_race(kv: Arc<dyn KvStore>, ns: &str) {
    const N: usize = 8;
    let k = ns_key(ns, "race");
    let attempts = (0..N).map(|i| {
        let (kv, k) = (kv.clone(), k.clone());
        tokio::spawn(async move { kv.put_if(&k, vec![i as u8], Expect::Absent, None).await })
    });
    let results: Vec<_> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one create must win: {results:?}");
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(_) | Err(RegistryError::Conflict { .. }))));
    let rev = kv.get(&k).await.unwrap().unwrap().mod_revision;
    let attempts = (0..N).map(|i| {
        let (kv, k) = (kv.clone(), k.clone());
        tokio::spawn(async move {
            kv.put_if(&k, vec![100 + i as u8], Expect::ModRevision(rev), None)
                .await
        })
    });
    let results: Vec<_> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one update must win: {results:?}");
    let stored = kv.get(&k).await.unwrap().unwrap();
    assert_eq!(
        stored.value,
        vec![100 + winners[0] as u8],
        "the winner's value is the one stored"
    );
}

/// Leases: keys vanish when the lease lapses or is revoked; a lapsed lease is `LeaseExpired`.
pub async fn case_lease_expiry(kv: Arc<dyn KvStore>, ns: &str) {
    let k = ns_key(ns, "leased");
    let lease = kv.grant_lease(Duration::from_secs(1)).await.unwrap();
    let rev = kv
        .put_if(&k, b"v".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    assert_eq!(kv.get(&k).await.unwrap().unwrap().lease, Some(lease));
    let ttl = kv.keep_alive(lease).await.unwrap();
    assert!(
        ttl >= Duration::from_secs(1),
        "keep-alive reports the TTL, got {ttl:?}"
    );
    let mut watch = kv.watch(&ns_key(ns, ""), rev + 1).await.unwrap();
    // Stop renewing: the key must go by itself.
    eventually("the leased key to disappear", || {
        let (kv, k) = (kv.clone(), k.clone());
        async move { kv.get(&k).await.unwrap().is_none().then_some(()) }
    })
    .await;
    let ev = next_events(&mut watch, 1).await;
    assert!(
        matches!(&ev[0], WatchEvent::Delete { key, .. } if *key == k),
        "expiry is a delete event: {ev:?}"
    );
    assert_eq!(
        kv.keep_alive(lease).await.unwrap_err(),
        RegistryError::LeaseExpired { lease }
    );
    let err = kv
        .put_if(&k, b"v".to_vec(), Expect::Any, Some(lease))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::LeaseExpired { .. }),
        "put under a lapsed lease: {err:?}"
    );
    kv.revoke(lease)
        .await
        .expect("revoking a lapsed lease succeeds");

    let lease = kv.grant_lease(Duration::from_secs(30)).await.unwrap();
    kv.put_if(&k, b"v".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    let k2 = ns_key(ns, "leased2");
    let r = kv
        .put_if(&k2, b"v".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    let mut watch = kv.watch(&ns_key(ns, ""), r + 1).await.unwrap();
    kv.revoke(lease).await.unwrap();
    assert!(
        kv.get(&k).await.unwrap().is_none() && kv.get(&k2).await.unwrap().is_none(),
        "revoke deletes the lease's keys at once"
    );
    let evs = next_events(&mut watch, 2).await;
    assert!(
        evs.iter().all(
            |e| matches!(e, WatchEvent::Delete { mod_revision, .. } if *mod_revision == r + 1)
        ),
        "a lease's keys go in one revision: {evs:?}"
    );
}

/// A watch from a past revision sees exactly the later events under its prefix, in order.
pub async fn case_watch_from_revision(kv: Arc<dyn KvStore>, ns: &str) {
    let p = ns_key(ns, "w/");
    let r1 = kv
        .put_if(&format!("{p}a"), b"1".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let r2 = kv
        .put_if(&format!("{p}b"), b"2".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    kv.put_if(&ns_key(ns, "outside"), b"x".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let r3 = kv
        .put_if(&format!("{p}a"), b"3".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    assert!(r1 < r2 && r2 < r3);
    let mut w = kv.watch(&p, r2).await.unwrap();
    let r4 = kv.delete_if(&format!("{p}b"), Expect::Any).await.unwrap();
    let r5 = kv
        .put_if(&format!("{p}c"), b"5".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let evs = next_events(&mut w, 4).await;
    assert_eq!(
        evs,
        vec![
            WatchEvent::Put {
                key: format!("{p}b"),
                value: b"2".to_vec(),
                mod_revision: r2
            },
            WatchEvent::Put {
                key: format!("{p}a"),
                value: b"3".to_vec(),
                mod_revision: r3
            },
            WatchEvent::Delete {
                key: format!("{p}b"),
                mod_revision: r4
            },
            WatchEvent::Put {
                key: format!("{p}c"),
                value: b"5".to_vec(),
                mod_revision: r5
            },
        ]
    );
    // Nothing else is pending (the outside key never shows up).
    let r6 = kv
        .put_if(&format!("{p}d"), b"6".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let evs = next_events(&mut w, 1).await;
    assert_eq!(evs[0].mod_revision(), r6);
    // A second watch from "now" sees only what follows.
    let mut now = kv.watch(&p, 0).await.unwrap();
    let r7 = kv
        .put_if(&format!("{p}e"), b"7".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(next_events(&mut now, 1).await[0].mod_revision(), r7);
}

/// Watching from before a compaction fails with `Compacted`; from after it works.
pub async fn case_compaction(kv: Arc<dyn KvStore>, ns: &str) {
    let p = ns_key(ns, "");
    let k = ns_key(ns, "k");
    let first = kv
        .put_if(&k, b"0".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let mut last = first;
    for i in 1..5u8 {
        last = kv.put_if(&k, vec![i], Expect::Any, None).await.unwrap();
    }
    kv.compact(last).await.unwrap();
    expect_compacted(kv.watch(&p, first).await, first).await;
    let mut w = kv.watch(&p, last + 1).await.unwrap();
    let r = kv
        .put_if(&k, b"after".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(next_events(&mut w, 1).await[0].mod_revision(), r);
    // Compacting again at or below the compaction point is refused.
    assert!(kv.compact(first).await.is_err());
    // The data itself is intact.
    assert_eq!(kv.get(&k).await.unwrap().unwrap().value, b"after");
}

/// Asserts that a watch opened from `from` reports `Compacted` (at open or as its first item).
pub async fn expect_compacted(opened: Result<WatchStream, RegistryError>, from: Revision) {
    let err = match opened {
        Err(e) => e,
        Ok(mut s) => match tokio::time::timeout(DEADLINE, s.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("watch from compacted revision {from} must fail, got {other:?}"),
        },
    };
    match err {
        RegistryError::Compacted {
            compact_revision, ..
        } => {
            assert!(
                compact_revision > from,
                "compact revision {compact_revision} must be past {from}"
            )
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
}

/// Clusters through the typed registry: duplicates refused, immutable, forward-only.
pub async fn case_registry_clusters(kv: Arc<dyn KvStore>, ns: &str) {
    let reg = Registry::new(kv, ns);
    let a = sample_cluster("a");
    reg.create_cluster(&a).await.unwrap();
    let err = reg.create_cluster(&sample_cluster("a")).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::AlreadyExists { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("cluster a"), "{err}");
    let bad = ClusterSpec {
        id: "x/y".into(),
        ..sample_cluster("x")
    };
    assert!(matches!(
        reg.create_cluster(&bad).await,
        Err(RegistryError::Model(_))
    ));

    let (active, r1) = reg
        .set_cluster_state("a", ClusterState::Active)
        .await
        .unwrap();
    assert_eq!(active.state, ClusterState::Active);
    let (_, r_same) = reg
        .set_cluster_state("a", ClusterState::Active)
        .await
        .unwrap();
    assert_eq!(r_same, r1, "setting the current state writes nothing");
    let err = reg
        .set_cluster_state("a", ClusterState::Provisioning)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Model(ModelError::BackwardState { .. })),
        "{err:?}"
    );
    let moved = ClusterSpec {
        bootstrap: "elsewhere:9092".into(),
        ..active.clone()
    };
    let err = reg.update_cluster(&moved, r1).await.unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Model(ModelError::ImmutableField {
                field: "bootstrap",
                ..
            })
        ),
        "{err:?}"
    );
    let err = reg
        .update_cluster(
            &ClusterSpec {
                state: ClusterState::Draining,
                ..active.clone()
            },
            r1 - 1,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Conflict { .. }),
        "stale update: {err:?}"
    );
    // Two operators race from the same read: one drains, one retires. One wins.
    let (cur, rev) = reg.cluster("a").await.unwrap().unwrap();
    let (x, y) = (reg.clone(), reg.clone());
    let (drain, retire) = (
        ClusterSpec {
            state: ClusterState::Draining,
            ..cur.clone()
        },
        ClusterSpec {
            state: ClusterState::Retired,
            ..cur.clone()
        },
    );
    let (rx, ry) = tokio::join!(
        tokio::spawn(async move { x.update_cluster(&drain, rev).await }),
        tokio::spawn(async move { y.update_cluster(&retire, rev).await }),
    );
    let (rx, ry) = (rx.unwrap(), ry.unwrap());
    assert!(
        rx.is_ok() != ry.is_ok(),
        "exactly one racing operator wins: {rx:?} / {ry:?}"
    );
    assert!(matches!(
        if rx.is_ok() { &ry } else { &rx },
        Err(RegistryError::Conflict { .. })
    ));
    reg.set_cluster_state("a", ClusterState::Retired)
        .await
        .unwrap();
    let (stored, _) = reg.cluster("a").await.unwrap().unwrap();
    assert_eq!(
        stored,
        ClusterSpec {
            state: ClusterState::Retired,
            ..a
        }
    );
    let err = reg
        .set_cluster_state("nope", ClusterState::Active)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
}

/// Routes: validated writes, racing operators (one wins), the read-modify-CAS loop.
pub async fn case_registry_routes(kv: Arc<dyn KvStore>, ns: &str) {
    let reg = Registry::new(kv, ns);
    let mut invalid = sample_route("t", &["a"]);
    invalid.partitions = 0;
    assert!(matches!(
        reg.put_route(&invalid, Expect::Absent).await,
        Err(RegistryError::Model(_))
    ));
    assert!(
        reg.route("t").await.unwrap().is_none(),
        "an invalid route is not written"
    );

    let r1 = reg
        .put_route(&sample_route("t", &["a"]), Expect::Absent)
        .await
        .unwrap();
    let err = reg
        .put_route(&sample_route("t", &["b"]), Expect::Absent)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Conflict { .. }), "{err:?}");

    // Two operators read the same revision and race: exactly one wins.
    let (x, y) = (reg.clone(), reg.clone());
    let (rx, ry) = tokio::join!(
        tokio::spawn(async move {
            x.put_route(&sample_route("t", &["a", "x"]), Expect::ModRevision(r1))
                .await
        }),
        tokio::spawn(async move {
            y.put_route(&sample_route("t", &["a", "y"]), Expect::ModRevision(r1))
                .await
        }),
    );
    let (rx, ry) = (rx.unwrap(), ry.unwrap());
    assert!(
        rx.is_ok() != ry.is_ok(),
        "exactly one racing operator wins: {rx:?} / {ry:?}"
    );
    let loser = if rx.is_ok() { ry } else { rx };
    assert!(
        matches!(loser, Err(RegistryError::Conflict { .. })),
        "{loser:?}"
    );

    // Concurrent read-modify-CAS loops all land (each appends one sealed epoch).
    const N: usize = 4;
    let tasks = (0..N).map(|_| {
        let reg = reg.clone();
        tokio::spawn(async move {
            reg.update_route("t", |cur| {
                let mut r = cur.expect("route exists").clone();
                let n = r.last_epoch_n() + 1;
                let mut e = r.epochs[0].clone();
                e.n = n;
                e.state = EpochState::Sealed;
                r.epochs.insert(r.epochs.len() - 1, e);
                // Keep numbers increasing: the open epoch moves to the end.
                let last = r.epochs.len() - 1;
                r.epochs[last].n = n + 1;
                r.epochs.sort_by_key(|e| e.n);
                Ok(Some(r))
            })
            .await
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap().expect("update_route retries through conflicts");
    }
    let (route, _) = reg.route("t").await.unwrap().unwrap();
    assert_eq!(
        route.epochs.len(),
        1 + N,
        "every concurrent update landed: {route:?}"
    );
    route.validate().unwrap();
    // `None` from the closure leaves the route as is.
    let before = reg.route("t").await.unwrap();
    let after = reg.update_route("t", |_| Ok(None)).await.unwrap();
    assert_eq!(before, after);
    // Creating through update_route.
    let (created, _) = reg
        .update_route("u", |cur| {
            assert!(cur.is_none());
            Ok(Some(sample_route("u", &["a"])))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(created.topic, "u");
    let rev = reg.route("u").await.unwrap().unwrap().1;
    reg.delete_route("u", Expect::ModRevision(rev))
        .await
        .unwrap();
    assert!(reg.route("u").await.unwrap().is_none());
}

/// Snapshots decode everything at one revision; a malformed value is an error naming its key.
pub async fn case_registry_snapshot(kv: Arc<dyn KvStore>, ns: &str) {
    let reg = Registry::new(kv.clone(), ns);
    reg.create_cluster(&sample_cluster("a")).await.unwrap();
    reg.create_cluster(&sample_cluster("b")).await.unwrap();
    reg.put_route(&sample_route("t", &["a", "b"]), Expect::Absent)
        .await
        .unwrap();
    let group = GroupRecord {
        version: SCHEMA_VERSION,
        group: "g".into(),
        topics: vec!["t".into()],
        created_at: 1,
    };
    let g1 = reg.register_group(&group).await.unwrap();
    assert_eq!(
        reg.register_group(&group).await.unwrap(),
        g1,
        "re-registering the same group writes nothing"
    );
    let lease = reg
        .register_client(sample_client("p1"), Duration::from_secs(30))
        .await
        .unwrap();
    // A key this version does not know is ignored.
    kv.put_if(
        &format!("{}groups/g/progress/x", reg.prefix()),
        b"{}".to_vec(),
        Expect::Any,
        None,
    )
    .await
    .unwrap();

    let snap = reg.snapshot().await.unwrap();
    assert_eq!(snap.revision, kv.current_revision().await.unwrap());
    assert_eq!(snap.clusters.keys().collect::<Vec<_>>(), vec!["a", "b"]);
    assert_eq!(snap.route("t").unwrap().partitions, 3);
    assert_eq!(snap.groups["g"], group);
    assert_eq!(
        snap.producers().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        vec!["p1"]
    );

    let bad_key = format!("{}clusters/bad", reg.prefix());
    kv.put_if(
        &bad_key,
        b"{\"version\":1,\"id\":7}".to_vec(),
        Expect::Absent,
        None,
    )
    .await
    .unwrap();
    let err = reg.snapshot().await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Model(ModelError::Malformed { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&bad_key),
        "the error names the key: {err}"
    );
    // A value whose id disagrees with its key is malformed too.
    let wrong = super::model::encode(&sample_cluster("zzz"));
    kv.put_if(&bad_key, wrong, Expect::Any, None).await.unwrap();
    assert!(reg.snapshot().await.is_err());
    kv.delete_if(&bad_key, Expect::Any).await.unwrap();
    reg.snapshot().await.unwrap();
    lease.revoke().await.unwrap();
    assert!(reg.snapshot().await.unwrap().clients.is_empty());
}

/// Client records live under a lease: update, keep-alive, lapse.
pub async fn case_client_lease(kv: Arc<dyn KvStore>, ns: &str) {
    let reg = Registry::new(kv, ns);
    let mut lease = reg
        .register_client(sample_client("p1"), Duration::from_secs(1))
        .await
        .unwrap();
    let err = reg
        .register_client(sample_client("p1"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::AlreadyExists { .. }),
        "{err:?}"
    );
    let mut rec = lease.record().clone();
    rec.acked.insert("t".into(), 2);
    lease.update(rec.clone()).await.unwrap();
    assert_eq!(
        reg.client(ClientKind::Producer, "p1")
            .await
            .unwrap()
            .unwrap()
            .0,
        rec
    );
    let mut other = rec.clone();
    other.id = "p2".into();
    assert!(matches!(
        lease.update(other).await,
        Err(RegistryError::Model(_))
    ));
    lease.keep_alive().await.unwrap();
    // Stop renewing: the record must go by itself.
    eventually("the client record to lapse", || {
        let reg = reg.clone();
        async move {
            reg.client(ClientKind::Producer, "p1")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert!(matches!(
        lease.keep_alive().await,
        Err(RegistryError::LeaseExpired { .. })
    ));
    let err = lease.update(rec).await.unwrap_err();
    assert!(matches!(err, RegistryError::LeaseExpired { .. }), "{err:?}");
    // The id is free again.
    let again = reg
        .register_client(sample_client("p1"), Duration::from_secs(30))
        .await
        .unwrap();
    again.revoke().await.unwrap();
    assert!(reg
        .client(ClientKind::Producer, "p1")
        .await
        .unwrap()
        .is_none());
}

/// The watcher follows puts and deletes, and survives a malformed value.
pub async fn case_watcher_follows_changes(kv: Arc<dyn KvStore>, ns: &str) {
    let reg = Registry::new(kv.clone(), ns);
    reg.create_cluster(&sample_cluster("a")).await.unwrap();
    let w = FleetWatcher::start(reg.clone(), WatcherOptions::default())
        .await
        .unwrap();
    assert!(w.snapshot().cluster("a").is_some());
    let rx = w.subscribe();

    reg.create_cluster(&sample_cluster("b")).await.unwrap();
    let rev = reg
        .put_route(&sample_route("t", &["a", "b"]), Expect::Absent)
        .await
        .unwrap();
    let snap = w
        .wait_for(DEADLINE, |s| s.route("t").is_some())
        .await
        .unwrap();
    assert!(snap.cluster("b").is_some());
    assert_eq!(
        snap.revision, rev,
        "the snapshot revision is the last applied event's"
    );
    assert!(rx.has_changed().unwrap(), "subscribers are notified");
    assert!(!w.is_stale());

    // A malformed write: logged, counted, previous value kept, nothing else disturbed.
    let key_b = format!("{}clusters/b", reg.prefix());
    let errors = w.errors();
    kv.put_if(&key_b, b"garbage".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    reg.set_cluster_state("a", ClusterState::Active)
        .await
        .unwrap();
    let snap = w
        .wait_for(DEADLINE, |s| {
            s.cluster("a")
                .is_some_and(|c| c.state == ClusterState::Active)
        })
        .await
        .unwrap();
    assert_eq!(
        snap.cluster("b"),
        Some(&sample_cluster("b")),
        "previous value kept"
    );
    assert!(w.errors() > errors, "the malformed value is counted");
    assert!(matches!(w.last_error(), Some(RegistryError::Model(_))));

    // Deletes and lease expiry.
    let lease = reg
        .register_client(sample_client("p1"), Duration::from_secs(1))
        .await
        .unwrap();
    w.wait_for(DEADLINE, |s| s.producers().count() == 1)
        .await
        .unwrap();
    drop(lease);
    w.wait_for(DEADLINE, |s| s.producers().count() == 0)
        .await
        .expect("lapsed client leaves the snapshot");
    kv.delete_if(&key_b, Expect::Any).await.unwrap();
    let snap = w
        .wait_for(DEADLINE, |s| s.cluster("b").is_none())
        .await
        .unwrap();
    // The incremental view equals a fresh read.
    assert_eq!(*snap, reg.snapshot().await.unwrap());
    assert!(w.events_applied() >= 6);
}

/// Drives a watcher through a registry outage: `down` makes the registry
/// unreachable, `up` brings it back (same data). While down the watcher serves
/// the last snapshot and reports staleness; after, it sees writes made after
/// the restart and matches a fresh snapshot (no event lost or replayed).
pub async fn case_watcher_survives_outage<D, DF, U, UF>(
    kv: Arc<dyn KvStore>,
    ns: &str,
    down: D,
    up: U,
) where
    D: FnOnce() -> DF,
    DF: Future<Output = ()>,
    U: FnOnce() -> UF,
    UF: Future<Output = ()>,
{
    let reg = Registry::new(kv.clone(), ns);
    reg.create_cluster(&sample_cluster("a")).await.unwrap();
    let opts = WatcherOptions {
        retry_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    };
    let w = FleetWatcher::start(reg.clone(), opts).await.unwrap();
    reg.create_cluster(&sample_cluster("b")).await.unwrap();
    w.wait_for(DEADLINE, |s| s.cluster("b").is_some())
        .await
        .unwrap();
    eventually("the watch to be up", || async {
        (!w.is_stale()).then_some(())
    })
    .await;

    down().await;
    eventually("the watcher to notice the outage", || async {
        w.is_stale().then_some(())
    })
    .await;
    let served = w.snapshot();
    assert!(
        served.cluster("b").is_some(),
        "the last snapshot is still served"
    );
    eventually("the snapshot age to grow", || async {
        (w.snapshot_age() > Duration::ZERO).then_some(())
    })
    .await;
    up().await;

    reg.create_cluster(&sample_cluster("c")).await.unwrap();
    reg.set_cluster_state("a", ClusterState::Active)
        .await
        .unwrap();
    let snap = w
        .wait_for(DEADLINE, |s| {
            s.cluster("c").is_some() && s.cluster("a").unwrap().state == ClusterState::Active
        })
        .await
        .unwrap();
    assert_eq!(*snap, reg.snapshot().await.unwrap(), "no event lost");
    assert_eq!(
        w.events_applied(),
        3,
        "each of the 3 writes applied exactly once (none replayed)"
    );
    eventually("the watch to be up again", || async {
        (!w.is_stale()).then_some(())
    })
    .await;
    assert_eq!(w.snapshot_age(), Duration::ZERO);
}

/// A tiny deterministic generator for the randomized cases (no dependency).
#[derive(Debug, Clone)]
pub struct Lcg(u64);

impl Lcg {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Randomized: `ops` registry operations (seeded) while a watcher follows;
/// `disrupt` is called at random points (e.g. to cut the watch). At the end the
/// watcher's incremental snapshot equals a fresh one, and it applied exactly one
/// event per write: nothing missed, nothing replayed.
pub async fn case_watcher_random_ops(
    kv: Arc<dyn KvStore>,
    ns: &str,
    seed: u64,
    ops: usize,
    mut disrupt: impl FnMut(),
) {
    let reg = Registry::new(kv.clone(), ns);
    let opts = WatcherOptions {
        retry_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        ..Default::default()
    };
    let w = FleetWatcher::start(reg.clone(), opts).await.unwrap();
    let start = w.snapshot().revision;
    let mut rng = Lcg::new(seed);
    let mut leases: std::collections::BTreeMap<u64, super::store::ClientLease> = Default::default();
    let states = [
        ClusterState::Provisioning,
        ClusterState::Active,
        ClusterState::Draining,
        ClusterState::Retired,
    ];
    for _ in 0..ops {
        if rng.below(10) == 0 {
            disrupt();
        }
        match rng.below(6) {
            0 => {
                let id = format!("c{}", rng.below(6));
                match reg.create_cluster(&sample_cluster(&id)).await {
                    Ok(_) | Err(RegistryError::AlreadyExists { .. }) => {}
                    Err(e) => panic!("create {id}: {e}"),
                }
            }
            1 => {
                let id = format!("c{}", rng.below(6));
                let to = states[rng.below(4) as usize];
                match reg.set_cluster_state(&id, to).await {
                    Ok(_)
                    | Err(RegistryError::NotFound { .. })
                    | Err(RegistryError::Model(ModelError::BackwardState { .. })) => {}
                    Err(e) => panic!("set {id} {to}: {e}"),
                }
            }
            2 => {
                let topic = format!("t{}", rng.below(3));
                let weight = 1 + rng.below(100) as u32;
                reg.update_route(&topic, |cur| {
                    let mut r = cur
                        .cloned()
                        .unwrap_or_else(|| sample_route(&topic, &["c0", "c1"]));
                    r.epochs[0].write[0].weight = weight;
                    Ok(Some(r))
                })
                .await
                .unwrap();
            }
            3 => {
                let topic = format!("t{}", rng.below(3));
                reg.delete_route(&topic, Expect::Any).await.unwrap();
            }
            4 => {
                let k = rng.below(4);
                match leases.remove(&k) {
                    Some(l) => l.revoke().await.unwrap(),
                    None => {
                        let l = reg
                            .register_client(
                                sample_client(&format!("p{k}")),
                                Duration::from_secs(120),
                            )
                            .await
                            .unwrap();
                        leases.insert(k, l);
                    }
                }
            }
            _ => {
                let g = format!("g{}", rng.below(2));
                let topics = (0..rng.below(3)).map(|i| format!("t{i}")).collect();
                let rec = GroupRecord {
                    version: SCHEMA_VERSION,
                    group: g,
                    topics,
                    created_at: 1,
                };
                reg.register_group(&rec).await.unwrap();
            }
        }
    }
    let end = kv.current_revision().await.unwrap();
    let snap = w
        .wait_for(DEADLINE, |s| s.revision >= end)
        .await
        .unwrap_or_else(|e| panic!("watcher stuck at {} < {end}: {e}", w.snapshot().revision));
    let fresh = reg.snapshot().await.unwrap();
    assert_eq!(
        *snap, fresh,
        "incremental snapshot equals a fresh read (seed {seed})"
    );
    assert_eq!(
        w.events_applied() as i64,
        end - start,
        "one event per write, none missed or replayed (seed {seed})"
    );
    for (_, l) in leases {
        l.revoke().await.unwrap();
    }
}
