//! One route switch driven by hand, as the controller's seal does it (DESIGN
//! "Handoff protocol", steps 1–3): epoch N+1 proposed `pending`, every live
//! producer acknowledges it, the end offsets of every cluster of N and N+1
//! are read (concurrently) as N's fence, then N is sealed and N+1 opened in one
//! compare-and-swap. The registry is polled, not watched: the figures are the
//! protocol's pause, not the controller daemon's reaction time.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use flotilla_client::kafka::ClusterAdmin;
use flotilla_client::registry::{Registry, WeightedCluster};
use flotilla_client::route::{propose, seal};

/// How many live producers the switch expects to acknowledge.
#[derive(Debug, Clone, Copy)]
pub enum Producers {
    /// Exactly this many (a different count fails the test).
    Exactly(usize),
    /// Any number, but at least one.
    AtLeastOne,
}

/// What one switch took, each from the moment the pending epoch was written.
#[derive(Debug, Clone, Copy)]
pub struct Switched {
    /// The new (now open) epoch.
    pub epoch: u64,
    /// Until every live producer had acknowledged it.
    pub acked: Duration,
    /// Until the boundary was read on every cluster of both epochs.
    pub boundary: Duration,
    /// Until the seal was written: the producers' pause.
    pub sealed: Duration,
    /// When the seal was written.
    pub sealed_at: Instant,
}

/// A write set of `ids`, every cluster with the same weight.
pub fn write_set(ids: &[&str]) -> Vec<WeightedCluster> {
    ids.iter()
        .map(|c| WeightedCluster {
            cluster: c.to_string(),
            weight: 100,
        })
        .collect()
}

/// Switches `topic` to write to `write`, polling the registry every `poll`
/// for the acknowledgements (30 s deadline).
pub async fn drive_switch(
    reg: &Registry,
    topic: &str,
    partitions: u32,
    write: Vec<WeightedCluster>,
    admins: &HashMap<String, ClusterAdmin>,
    producers: Producers,
    poll: Duration,
) -> Switched {
    let snap = reg.snapshot().await.unwrap();
    let (route, _) = reg
        .update_route(topic, |r| {
            Ok(Some(propose(
                r,
                topic,
                partitions,
                write.clone(),
                &snap.clusters,
                0,
                60_000,
            )?))
        })
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let pending = route.pending_epoch().expect("pending").n;
    let open = route.open_epoch().expect("open").clone();
    let deadline = started + Duration::from_secs(30);
    loop {
        let snap = reg.snapshot().await.unwrap();
        let live: Vec<_> = snap.producers().collect();
        match producers {
            Producers::Exactly(n) => assert_eq!(live.len(), n, "live producers: {live:?}"),
            Producers::AtLeastOne => assert!(!live.is_empty(), "no live producer"),
        }
        if live
            .iter()
            .all(|p| p.acked.get(topic).is_some_and(|&e| e >= pending))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "producers never acked {pending}: {live:?}"
        );
        tokio::time::sleep(poll).await;
    }
    let acked = started.elapsed();
    let clusters: HashSet<&String> = open
        .clusters()
        .chain(route.pending_epoch().unwrap().clusters())
        .collect();
    let reads = futures::future::join_all(clusters.iter().map(|c| async move {
        let offs = admins[*c].end_offsets(topic, partitions).await.unwrap();
        ((*c).clone(), offs)
    }))
    .await;
    let boundary: BTreeMap<String, Vec<i64>> = reads.into_iter().collect();
    let boundary_at = started.elapsed();
    reg.update_route(topic, |r| {
        Ok(Some(seal(r.unwrap(), pending, boundary.clone())?))
    })
    .await
    .unwrap();
    Switched {
        epoch: pending,
        acked,
        boundary: boundary_at,
        sealed: started.elapsed(),
        sealed_at: Instant::now(),
    }
}
