//! The zero-setup demo: embedded librdkafka mock clusters, an in-memory
//! registry and an in-process controller, with a `FleetProducer` and a
//! `FleetConsumer` group running through route switches and a retirement.
//!
//! Everything here is the real client and control-plane code; only the Kafka
//! clusters (librdkafka's in-process mock, which speaks the Kafka protocol)
//! and the registry storage (`MemoryKv` instead of etcd) are embedded.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use flotilla_client::kafka::{KafkaProperties, MockFleet, SecurityProfiles};
use flotilla_client::registry::memory::MemoryKv;
use flotilla_client::registry::{ClusterRole, ClusterState, Registry};
use flotilla_client::{FleetConsumer, FleetConsumerConfig, FleetProducer, FleetProducerConfig};
use rdkafka::consumer::CommitMode;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use tokio::sync::Mutex;

use crate::backfill::{Backfill, BackfillOptions, Bound, ProgressMode, StartRequest};
use crate::cli::args::DemoArgs;
use crate::cli::output;
use crate::controller::{now_millis, Controller};
use crate::ops::{AddCluster, ControlPlane, SetRoute};

const TOPIC: &str = "orders";
const PARTITIONS: u32 = 4;
const GROUP: &str = "billing";
const HISTORY_TOPIC: &str = "orders-history";
const HISTORY: u64 = 5_000;

/// What the consumer saw, for the closing check.
#[derive(Default)]
struct Seen {
    /// Last sequence number per key.
    last: BTreeMap<String, u64>,
    /// (key, seq) pairs consumed.
    all: std::collections::HashSet<(String, u64)>,
    duplicates: u64,
    out_of_order: u64,
    per_cluster: BTreeMap<String, u64>,
    stragglers: u64,
}

fn step(text: &str) {
    println!("\n── {text}");
}

/// Runs the demo, printing what happens. Fails if a record is lost or out of order.
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("flotilla demo: 3 embedded Kafka clusters (librdkafka mock), an in-memory registry,");
    println!("an in-process controller, one FleetProducer and one FleetConsumer group.");

    let fleet = tokio::task::spawn_blocking(|| MockFleet::start(3))
        .await?
        .context("starting the embedded mock clusters")?;
    // The mock clusters do not serve CreateTopics: create the topic the way a
    // provisioning step would; `route set` then only checks its partition count.
    fleet.create_topic(TOPIC, PARTITIONS)?;
    fleet.create_topic(HISTORY_TOPIC, PARTITIONS)?;
    let registry = Registry::new(Arc::new(MemoryKv::new()), "demo");
    // Nor AlterConfigs: the write fence before retirement cannot be set on
    // them (real clusters always get it; docs/handoff.md, "The write fence").
    let kafka = crate::RdKafkaFleet::new(
        KafkaProperties::new(),
        SecurityProfiles::empty(),
        Duration::from_secs(10),
    )
    .without_write_fence();
    let cp = ControlPlane::new(registry.clone(), Arc::new(kafka));

    step("register clusters a and b (permanent); route `orders` to a");
    for (i, id) in ["a", "b"].iter().enumerate() {
        cp.add_cluster(
            add(id, fleet.cluster(i).bootstrap(), ClusterRole::Permanent),
            now_millis(),
        )
        .await?;
    }
    cp.set_route(route_to(&["a"], Some(PARTITIONS)), now_millis())
        .await?;
    print!("{}", output::clusters_table(&cp.clusters().await?));

    // The controller reconciles in the background, as `flotilla controller` would.
    let stop = Arc::new(AtomicBool::new(false));
    let controller = {
        let (ctl, stop) = (Controller::new(cp.clone()), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = ctl.reconcile_once(now_millis()).await {
                    for (t, n) in &r.sealed {
                        println!("   controller: switch of {t} completed, epoch {n} open");
                    }
                    for c in &r.retired {
                        println!("   controller: cluster {c} retired");
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let mut pcfg = FleetProducerConfig::new();
    pcfg.registry(registry.clone())
        .client_id("demo-producer")
        .set("linger.ms", "5");
    let producer = FleetProducer::new(pcfg)
        .await
        .context("starting the FleetProducer")?;
    let consumer = FleetConsumer::new(
        FleetConsumerConfig::new(registry.clone())
            .set("group.id", GROUP)
            .client_id("demo-consumer"),
    )
    .await
    .context("starting the FleetConsumer")?;
    consumer.subscribe(&[TOPIC])?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop_consumer, mut consumer_stopped) = tokio::sync::oneshot::channel::<()>();
    let consuming = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = consumer.recv() => m,
                    _ = &mut consumer_stopped => break,
                };
                let msg = match next {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("   consumer error: {e}");
                        continue;
                    }
                };
                let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
                let seq: u64 = std::str::from_utf8(msg.payload().unwrap_or_default())
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(u64::MAX);
                {
                    let mut s = seen.lock().await;
                    if !s.all.insert((key.clone(), seq)) {
                        s.duplicates += 1;
                    }
                    match s.last.get(&key) {
                        Some(&last) if seq <= last => s.out_of_order += u64::from(seq < last),
                        _ => {
                            s.last.insert(key, seq);
                        }
                    }
                    *s.per_cluster.entry(msg.cluster().to_string()).or_default() += 1;
                    s.stragglers += u64::from(msg.is_straggler());
                }
                // Commit after processing: the fence gate reads these commits.
                if let Err(e) = consumer.commit_message(&msg, CommitMode::Async) {
                    eprintln!("   commit error: {e}");
                }
            }
            consumer.close().await;
        })
    };

    // Produce in four stages with a route change between each; sends never stop
    // being accepted — during a switch they are held, then released in order.
    let per_stage = (args.records / 4).max(1);
    let mut next_seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut acked: Vec<(String, u64)> = Vec::new();

    step(&format!("produce {per_stage} records on epoch 1 (a)"));
    acked.extend(produce_stage(&producer, per_stage, args.keys, &mut next_seq).await?);

    step("add b to the route: a=1,b=1 (the producer holds, flushes, acks; the controller seals epoch 1)");
    let switching = switch_to(&cp, &["a", "b"]);
    acked.extend(produce_stage(&producer, per_stage, args.keys, &mut next_seq).await?);
    switching.await??;

    step(&format!(
        "backfill: replay {HISTORY} history records of `{HISTORY_TOPIC}` (cluster a) into `{TOPIC}` \
         through a temporary cluster t1, while live traffic goes on"
    ));
    let history = write_history(fleet.cluster(0).bootstrap(), HISTORY).await?;
    let backfill = Backfill::new(
        cp.clone(),
        BackfillOptions {
            progress: ProgressMode::Quiet,
            ..BackfillOptions::default()
        },
    );
    let request = StartRequest {
        name: "replay-history".into(),
        source: format!("a:{HISTORY_TOPIC}"),
        from: Bound::Edge,
        to: Bound::Edge,
        target_topic: TOPIC.into(),
        clusters: vec![("t1".into(), fleet.cluster(2).bootstrap().to_string())],
        provision_cmd: None,
        count: 0,
        deprovision_cmd: None,
        groups: vec![GROUP.into()],
        expires_in: Duration::from_secs(3600),
    };
    let replaying = tokio::spawn(async move { backfill.start(&request).await });
    acked.extend(produce_stage(&producer, per_stage, args.keys, &mut next_seq).await?);
    let record = replaying.await?.context("backfill")?;
    println!(
        "   backfill {}: {:?}; temporary cluster t1 is {}",
        record.name,
        record.phase,
        cp.cluster("t1").await?.state
    );
    acked.extend(history);

    step("move everything to b; drain a (it retires once the group has read past its fences)");
    let switching = switch_to(&cp, &["b"]);
    acked.extend(
        produce_stage(
            &producer,
            args.records - 3 * per_stage,
            args.keys,
            &mut next_seq,
        )
        .await?,
    );
    switching.await??;
    cp.drain("a").await?;
    producer.flush(Duration::from_secs(30)).await?;

    step("wait for the consumer group to read everything and the controller to retire a");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let consumed = seen.lock().await.all.len();
        let a = cp.cluster("a").await?.state;
        if consumed >= acked.len() && a == ClusterState::Retired {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "gave up waiting: consumed {consumed} of {} records, a is {a}",
                acked.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = controller.await;
    // Close the clients before the clusters go away, so nothing logs a lost broker.
    let _ = stop_consumer.send(());
    let _ = consuming.await;
    producer.close(Duration::from_secs(5)).await?;
    drop(producer);

    step("the fleet now");
    print!("{}", output::clusters_table(&cp.clusters().await?));
    println!();
    print!("{}", output::route_text(&cp.route(TOPIC).await?));

    let s = seen.lock().await;
    let lost = acked.iter().filter(|r| !s.all.contains(*r)).count();
    step("summary");
    println!(
        "records produced and acknowledged: {} (live {}, backfilled {HISTORY})",
        acked.len(),
        acked.len() as u64 - HISTORY
    );
    println!("records consumed:                  {}", s.all.len());
    println!(
        "consumed per cluster:              {}",
        s.per_cluster
            .iter()
            .map(|(c, n)| format!("{c}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("lost:                              {lost}");
    println!("duplicates:                        {}", s.duplicates);
    println!("out of order (per key):            {}", s.out_of_order);
    println!("stragglers:                        {}", s.stragglers);
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    drop(s);
    drop(cp);
    tokio::task::spawn_blocking(move || fleet.shutdown()).await?;
    let s = seen.lock().await;
    if lost > 0 || s.out_of_order > 0 {
        bail!("{lost} records lost, {} out of order", s.out_of_order);
    }
    Ok(())
}

fn add(id: &str, bootstrap: &str, role: ClusterRole) -> AddCluster {
    AddCluster {
        id: id.into(),
        bootstrap: bootstrap.into(),
        weight: 100,
        role,
        labels: BTreeMap::new(),
        security_profile: None,
        activate: true,
    }
}

fn route_to(clusters: &[&str], partitions: Option<u32>) -> SetRoute {
    SetRoute {
        topic: TOPIC.into(),
        clusters: clusters.iter().map(|c| (c.to_string(), Some(1))).collect(),
        partitions,
        ack_timeout_ms: 10_000,
    }
}

/// Sends `n` records round-robin over `keys` keys, payload = per-key sequence
/// number, keeping up to 1,000 in flight; returns the acknowledged (key, seq).
async fn produce_stage(
    producer: &FleetProducer,
    n: u64,
    keys: u64,
    next_seq: &mut BTreeMap<String, u64>,
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut in_flight = VecDeque::new();
    let mut acked = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = format!("key-{}", i % keys.max(1));
        let seq = next_seq.entry(key.clone()).or_default();
        *seq += 1;
        let payload = seq.to_string();
        loop {
            match producer.send_result(FutureRecord::to(TOPIC).key(&key).payload(&payload)) {
                Ok(f) => {
                    in_flight.push_back((key.clone(), *seq, f));
                    break;
                }
                // Hold buffer or librdkafka queue full: wait for a delivery (backpressure).
                Err((e, _)) if e.is_retriable() && !in_flight.is_empty() => {
                    let (k, s, f) = in_flight.pop_front().expect("non-empty");
                    f.await.map_err(|(e, _)| e)?;
                    acked.push((k, s));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        // Pace the traffic (about 10,000 records/s) so route switches happen
        // while it flows, as they would in production.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if in_flight.len() >= 1_000 {
            let (k, s, f) = in_flight.pop_front().expect("non-empty");
            f.await.map_err(|(e, _)| e)?;
            acked.push((k, s));
        }
    }
    for (k, s, f) in in_flight {
        f.await.map_err(|(e, _)| e)?;
        acked.push((k, s));
    }
    println!("   {} records acknowledged", acked.len());
    Ok(acked)
}

/// Proposes a new write set for the topic in the background (while the caller
/// keeps producing); the returned task ends when the controller has completed
/// the switch.
fn switch_to(cp: &ControlPlane, clusters: &[&str]) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let cp = cp.clone();
    let req = route_to(clusters, None);
    tokio::spawn(async move {
        let outcome = cp.set_route(req, now_millis()).await?;
        let route = outcome.route();
        let n = route
            .pending_epoch()
            .or(route.open_epoch())
            .map_or(0, |e| e.n);
        wait_open(&cp, n).await
    })
}

/// Writes `n` history records (keys `old-<k>`, payload = per-key sequence
/// number) to the history topic with a plain rdkafka producer, as an old
/// system would have; returns them for the loss check.
async fn write_history(bootstrap: &str, n: u64) -> anyhow::Result<Vec<(String, u64)>> {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()?;
    let mut seqs: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = format!("old-{}", i % 200);
        let seq = seqs.entry(key.clone()).or_default();
        *seq += 1;
        let payload = seq.to_string();
        let f = producer
            .send_result(FutureRecord::to(HISTORY_TOPIC).key(&key).payload(&payload))
            .map_err(|(e, _)| e)?;
        pending.push(((key, *seq), f));
    }
    let mut out = Vec::with_capacity(n as usize);
    for (rec, f) in pending {
        f.await?.map_err(|(e, _)| e)?;
        out.push(rec);
    }
    Ok(out)
}

async fn wait_open(cp: &ControlPlane, epoch: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = cp.route(TOPIC).await?;
        if r.open_epoch().is_some_and(|e| e.n >= epoch) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "switch to epoch {epoch} did not complete:\n{}",
                output::route_text(&r)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
