//! Three real single-node Kafka clusters: 10,000 keyed records produced to each
//! come back exactly once and, per key, in the order they were sent.

mod common;

use common::{enqueue, producer, read_all, Read};
use flotilla_testkit::{create_topic, KafkaFleet};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

const RECORDS: usize = 10_000;
const KEYS: usize = 100;
const PARTITIONS: i32 = 4;
const TOPIC: &str = "roundtrip";

/// Key `k{i % KEYS}`; payload `<key>:<sequence number within that key>`.
fn record(i: usize) -> (String, String) {
    let key = format!("k{}", i % KEYS);
    let payload = format!("{key}:{}", i / KEYS);
    (key, payload)
}

async fn produce_all(bootstrap: String) -> BTreeMap<i32, usize> {
    let producer = producer(&bootstrap, 30_000);
    let deliveries: Vec<_> = (0..RECORDS)
        .map(|i| {
            let (key, payload) = record(i);
            enqueue(&producer, TOPIC, &key, &payload)
        })
        .collect();
    let mut per_partition = BTreeMap::new();
    for (i, delivery) in deliveries.into_iter().enumerate() {
        match delivery.await.expect("delivery future dropped") {
            Ok(d) => *per_partition.entry(d.partition).or_insert(0) += 1,
            Err((e, _)) => panic!("{bootstrap}: record {i} not delivered: {e}"),
        }
    }
    per_partition
}

/// Checks `reads` against what [`record`] produced; returns a description of
/// every problem (empty = exactly once, in order per key and partition).
fn check(reads: &[Read]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: HashSet<(String, usize)> = HashSet::new();
    let mut duplicates = Vec::new();
    let mut out_of_order = Vec::new();
    let mut last_seq: HashMap<String, usize> = HashMap::new();
    let mut key_partition: HashMap<String, i32> = HashMap::new();
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let mut split_keys = HashSet::new();
    for r in reads {
        if let Some(prev) = last_offset.insert(r.partition, r.offset) {
            assert!(r.offset > prev, "consumer returned offsets out of order");
        }
        let (key, seq) = r.payload.rsplit_once(':').expect("payload key:seq");
        assert_eq!(
            key, r.key,
            "payload/key mismatch at {}/{}",
            r.partition, r.offset
        );
        let seq: usize = seq.parse().expect("sequence number");
        if *key_partition.entry(r.key.clone()).or_insert(r.partition) != r.partition {
            split_keys.insert(r.key.clone());
        }
        if !seen.insert((r.key.clone(), seq)) {
            duplicates.push(r.payload.clone());
            continue;
        }
        if let Some(&prev) = last_seq.get(&r.key) {
            if seq != prev + 1 {
                out_of_order.push(format!(
                    "{} after seq {prev} (p{}@{})",
                    r.payload, r.partition, r.offset
                ));
            }
        } else if seq != 0 {
            out_of_order.push(format!("{} first for its key", r.payload));
        }
        last_seq.insert(r.key.clone(), seq);
    }
    let missing: Vec<String> = (0..RECORDS)
        .map(record)
        .filter(|(key, payload)| {
            let seq = payload.rsplit_once(':').unwrap().1.parse().unwrap();
            !seen.contains(&(key.clone(), seq))
        })
        .map(|(_, payload)| payload)
        .collect();
    let first = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if !missing.is_empty() {
        problems.push(format!(
            "{} missing (e.g. {})",
            missing.len(),
            first(&missing)
        ));
    }
    if !duplicates.is_empty() {
        problems.push(format!(
            "{} duplicates (e.g. {})",
            duplicates.len(),
            first(&duplicates)
        ));
    }
    if !out_of_order.is_empty() {
        problems.push(format!(
            "{} out of order within their key (e.g. {})",
            out_of_order.len(),
            first(&out_of_order)
        ));
    }
    if !split_keys.is_empty() {
        problems.push(format!(
            "{} keys spread over several partitions",
            split_keys.len()
        ));
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_exactly_once_and_in_order_on_three_clusters() {
    let fleet = KafkaFleet::start(3).expect("start 3 Kafka clusters");
    for c in fleet.clusters() {
        create_topic(&c.bootstrap(), TOPIC, PARTITIONS)
            .await
            .expect("create topic");
    }

    // Produce to the three clusters concurrently.
    let producers: Vec<_> = fleet
        .bootstraps()
        .into_iter()
        .map(|b| tokio::spawn(produce_all(b)))
        .collect();
    for (i, p) in producers.into_iter().enumerate() {
        let per_partition = p.await.expect("producer task");
        assert_eq!(per_partition.values().sum::<usize>(), RECORDS);
        assert_eq!(
            per_partition.len(),
            PARTITIONS as usize,
            "cluster {i}: {KEYS} keys should cover all {PARTITIONS} partitions: {per_partition:?}"
        );
    }

    let mut failures = Vec::new();
    for c in fleet.clusters() {
        let reads = read_all(&c.bootstrap(), TOPIC, PARTITIONS, Duration::from_secs(60)).await;
        let problems = check(&reads);
        if !problems.is_empty() {
            failures.push(format!(
                "cluster {} ({}): {} records read; {}",
                c.index(),
                c.bootstrap(),
                reads.len(),
                problems.join("; ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
