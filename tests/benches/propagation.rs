//! Registry propagation: the time from a route write to the change being
//! visible in N independent watchers (each its own etcd connection), on a real
//! throwaway etcd. Prints p50/p99 per N.
//!
//! `cargo bench -p flotilla-testkit --bench propagation [-- N1 N2 ...]`
//! (default N = 1 100 1000; 20 writes per N).

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{
    Epoch, EpochState, Expect, FleetWatcher, Registry, TopicRoute, WatcherOptions, WeightedCluster,
    SCHEMA_VERSION,
};
use flotilla_testkit::etcd::EtcdServer;

const WRITES: u64 = 20;

fn route(n: u64) -> TopicRoute {
    TopicRoute {
        version: SCHEMA_VERSION,
        topic: "bench".into(),
        partitions: 1,
        epochs: vec![Epoch {
            n,
            write: vec![WeightedCluster {
                cluster: "a".into(),
                weight: 1,
            }],
            state: EpochState::Open,
            fence: Default::default(),
            created_at: 0,
            ack_deadline: None,
        }],
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() {
        vec![1, 100, 1000]
    } else {
        ns
    };
    let etcd = EtcdServer::start().expect("start etcd");
    let endpoint = etcd.endpoint();
    let writer = Registry::new(
        Arc::new(
            EtcdKv::connect(&[endpoint.as_str()], EtcdOptions::default())
                .await
                .unwrap(),
        ),
        "bench",
    );
    println!("| watchers | writes | p50 | p99 | max |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let mut next_n = 1;
    for n in ns {
        let mut watchers = Vec::with_capacity(n);
        for _ in 0..n {
            let kv = EtcdKv::connect(&[endpoint.as_str()], EtcdOptions::default())
                .await
                .unwrap();
            let w = FleetWatcher::start(
                Registry::new(Arc::new(kv), "bench"),
                WatcherOptions::default(),
            )
            .await
            .unwrap();
            watchers.push(w);
        }
        let mut samples = Vec::with_capacity(n * WRITES as usize);
        for _ in 0..WRITES {
            let epoch = next_n;
            next_n += 1;
            let seen = move |s: &flotilla_client::registry::FleetSnapshot| {
                s.route("bench").is_some_and(|r| r.epochs[0].n == epoch)
            };
            let mut waits = Vec::with_capacity(n);
            for w in &watchers {
                let mut rx = w.subscribe();
                waits.push(tokio::spawn(async move {
                    loop {
                        if seen(&rx.borrow_and_update()) {
                            return Instant::now();
                        }
                        rx.changed().await.expect("watcher alive");
                    }
                }));
            }
            let start = Instant::now();
            let cur = writer.route("bench").await.unwrap();
            let expect = cur.map_or(Expect::Absent, |(_, rev)| Expect::ModRevision(rev));
            writer.put_route(&route(epoch), expect).await.unwrap();
            for w in waits {
                samples.push(w.await.unwrap().saturating_duration_since(start));
            }
        }
        samples.sort();
        println!(
            "| {n} | {WRITES} | {:.1} ms | {:.1} ms | {:.1} ms |",
            percentile(&samples, 0.5).as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3,
            samples.last().unwrap().as_secs_f64() * 1e3
        );
    }
}
