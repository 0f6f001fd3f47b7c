//! Replay throughput of `flotilla backfill` with 1, 2 and 3 temporary
//! clusters (100 B and 1 KB values), against a raw rdkafka copy loop from the
//! same source to one cluster. Real etcd + real Kafka (single-node KRaft
//! clusters on this machine), so the point is the shape and the overhead
//! ratio, not absolute numbers.
//!
//! ```sh
//! cargo bench -p flotilla-control --bench backfill
//! FLOTILLA_BENCH_RECORDS=600000 FLOTILLA_BENCH_REPEAT=5 cargo bench -p flotilla-control --bench backfill
//! ```
//!
//! Prints a markdown table and writes an SVG plot (throughput against cluster
//! count) to `target/backfill-throughput.svg` (or `$FLOTILLA_BENCH_SVG`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::kafka::{KafkaProperties, SecurityProfiles};
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::Registry;
use flotilla_control::backfill::{Backfill, BackfillOptions, Bound, ProgressMode, StartRequest};
use flotilla_control::{ControlPlane, RdKafkaFleet};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::kafka::KafkaFleet;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer,
};
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 4;

async fn fill(bootstrap: &str, topic: &str, n: u64, size: usize) {
    flotilla_testkit::kafka::create_topic(bootstrap, topic, PARTITIONS)
        .await
        .unwrap();
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "20")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "500000")
            .create()
            .unwrap();
        let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        for i in 0..n {
            let key = format!("k{}", i % 1000);
            let mut rec = BaseRecord::to(&topic).key(&key).payload(&payload);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(120)).unwrap();
    })
    .await
    .unwrap();
}

/// The baseline: one consumer per source partition, one `FutureProducer` to
/// one cluster, the same batch / acknowledgement pattern as the copy workers.
async fn raw_copy(
    source: &str,
    topic: &str,
    target_bootstrap: &str,
    target: &str,
    n: u64,
) -> Duration {
    flotilla_testkit::kafka::create_topic(target_bootstrap, target, PARTITIONS)
        .await
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", target_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PARTITIONS {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", source)
            .set("group.id", "raw-copy")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let producer = producer.clone();
        let target = target.to_string();
        tasks.push(tokio::spawn(async move {
            let mut pos = low;
            while pos < high {
                let mut pending = Vec::with_capacity(5000);
                while pending.len() < 5000 && pos < high {
                    let m = consumer.recv().await.unwrap();
                    pos = m.offset() + 1;
                    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target);
                    if let Some(k) = m.key() {
                        rec = rec.key(k);
                    }
                    if let Some(v) = m.payload() {
                        rec = rec.payload(v);
                    }
                    loop {
                        match producer.send_result(rec) {
                            Ok(f) => break pending.push(f),
                            Err((_, back)) => {
                                rec = back;
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                    }
                }
                for f in pending {
                    f.await.unwrap().unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let d = started.elapsed();
    let _ = n;
    d
}

struct Row {
    size: usize,
    what: String,
    clusters: usize,
    secs: f64,
    n: u64,
}

impl Row {
    fn rps(&self) -> f64 {
        self.n as f64 / self.secs
    }
    fn mbps(&self) -> f64 {
        // Payload + ~4 bytes of key per record.
        self.n as f64 * (self.size as f64 + 4.0) / self.secs / 1e6
    }
}

fn svg(rows: &[Row]) -> String {
    let (w, h, left, bottom) = (640.0, 400.0, 70.0, 50.0);
    let max = rows.iter().map(Row::rps).fold(1.0, f64::max) * 1.1;
    let x = |c: usize| left + (c as f64 - 0.5) * (w - left - 20.0) / 3.0;
    let y = |v: f64| h - bottom - v / max * (h - bottom - 30.0);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{}' y='18' text-anchor='middle' font-size='14'>flotilla backfill replay throughput</text>\
         <line x1='{left}' y1='{}' x2='{}' y2='{}' stroke='black'/>\
         <line x1='{left}' y1='30' x2='{left}' y2='{}' stroke='black'/>\
         <text x='{}' y='{}' text-anchor='middle'>temporary clusters</text>\
         <text x='15' y='{}' transform='rotate(-90 15 {})' text-anchor='middle'>records/s</text>",
        w / 2.0,
        h - bottom,
        w - 10.0,
        h - bottom,
        h - bottom,
        w / 2.0,
        h - 10.0,
        h / 2.0,
        h / 2.0
    );
    for c in 1..=3 {
        s += &format!(
            "<text x='{}' y='{}' text-anchor='middle'>{c}</text>",
            x(c),
            h - bottom + 16.0
        );
    }
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        s += &format!(
            "<text x='{}' y='{}' text-anchor='end'>{:.0}</text>",
            left - 5.0,
            y(v) + 4.0,
            v
        );
    }
    for (size, color) in [(100usize, "#1f77b4"), (1000, "#d62728")] {
        let pts: Vec<String> = rows
            .iter()
            .filter(|r| r.size == size && r.what == "backfill")
            .map(|r| format!("{:.1},{:.1}", x(r.clusters), y(r.rps())))
            .collect();
        s += &format!(
            "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>",
            pts.join(" ")
        );
        if let Some(raw) = rows.iter().find(|r| r.size == size && r.what == "raw") {
            s += &format!(
                "<line x1='{left}' x2='{}' y1='{:.1}' y2='{:.1}' stroke='{color}' stroke-dasharray='5,4'/>",
                w - 10.0,
                y(raw.rps()),
                y(raw.rps())
            );
        }
        let ly = if size == 100 {
            h - bottom - 26.0
        } else {
            h - bottom - 10.0
        };
        s += &format!(
            "<text x='{}' y='{ly}' fill='{color}'>{size} B values (dashed: raw rdkafka copy, 1 cluster)</text>",
            left + 10.0
        );
    }
    s + "</svg>\n"
}

fn main() {
    let n: u64 = std::env::var("FLOTILLA_BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    // Best of `repeat` runs per configuration: the machine is shared and noisy.
    let repeat: usize = std::env::var("FLOTILLA_BENCH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let kafka = KafkaFleet::start(4).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let source = kafka.cluster(0).bootstrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        // Warm-up (JIT of the brokers, connections): one raw copy, not measured.
        fill(&source, "warm-up", n / 4, 100).await;
        raw_copy(
            &source,
            "warm-up",
            &kafka.cluster(1).bootstrap(),
            "warm-up-copy",
            n / 4,
        )
        .await;
        for size in [100usize, 1000] {
            let topic = format!("src-{size}");
            fill(&source, &topic, n, size).await;
            let mut best = f64::MAX;
            for r in 0..repeat {
                let d = raw_copy(
                    &source,
                    &topic,
                    &kafka.cluster(1).bootstrap(),
                    &format!("raw-{size}-{r}"),
                    n,
                )
                .await;
                eprintln!("raw copy {size} B: {:?}", d);
                best = best.min(d.as_secs_f64());
            }
            rows.push(Row {
                size,
                what: "raw".into(),
                clusters: 1,
                secs: best,
                n,
            });
            for k in 1..=3usize {
                let mut best = f64::MAX;
                for r in 0..repeat {
                    let kv = EtcdKv::connect(&[etcd.endpoint()], EtcdOptions::default())
                        .await
                        .unwrap();
                    let fleet = format!("bench-{size}-{k}-{r}");
                    let cp = ControlPlane::new(
                        Registry::new(Arc::new(kv), fleet),
                        Arc::new(RdKafkaFleet::new(
                            KafkaProperties::new(),
                            SecurityProfiles::empty(),
                            Duration::from_secs(10),
                        )),
                    );
                    let bf = Backfill::new(
                        cp,
                        BackfillOptions {
                            progress: ProgressMode::Quiet,
                            ..BackfillOptions::default()
                        },
                    );
                    let req = StartRequest {
                        name: format!("bench-{size}-{k}-{r}"),
                        source: format!("{source}:{topic}"),
                        from: Bound::Edge,
                        to: Bound::Edge,
                        target_topic: format!("t-{size}-{k}-{r}"),
                        clusters: (1..=k)
                            .map(|i| (format!("tmp{i}"), kafka.cluster(i).bootstrap()))
                            .collect(),
                        provision_cmd: None,
                        count: 0,
                        deprovision_cmd: None,
                        groups: vec![],
                        expires_in: Duration::from_secs(3600),
                    };
                    let rec = bf.start(&req).await.expect("backfill");
                    let t = |p: &str| rec.phase_times[p];
                    let secs = (t("waiting") - t("replaying")) as f64 / 1000.0;
                    eprintln!("backfill {size} B through {k} cluster(s): replay {secs:.2}s");
                    best = best.min(secs);
                }
                rows.push(Row {
                    size,
                    what: "backfill".into(),
                    clusters: k,
                    secs: best,
                    n,
                });
            }
        }
    });
    println!("\n{n} records, {PARTITIONS} source partitions, replay phase only, best of {repeat} (registry + Kafka on this machine)\n");
    println!("| value | copy | clusters | seconds | records/s | MB/s | vs raw |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let raw = rows
            .iter()
            .find(|x| x.size == r.size && x.what == "raw")
            .map_or(1.0, Row::rps);
        println!(
            "| {} B | {} | {} | {:.2} | {:.0} | {:.1} | {:.2} |",
            r.size,
            r.what,
            r.clusters,
            r.secs,
            r.rps(),
            r.mbps(),
            r.rps() / raw
        );
    }
    let path = std::env::var("FLOTILLA_BENCH_SVG").unwrap_or_else(|_| {
        format!(
            "{}/../target/backfill-throughput.svg",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    std::fs::write(&path, svg(&rows)).unwrap();
    println!("\nplot: {path}");
}
