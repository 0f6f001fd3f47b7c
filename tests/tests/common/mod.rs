//! Helpers shared by the Kafka proof tests: produce keyed, sequenced records
//! and read a topic back to its high watermarks.

#![allow(dead_code)]

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A record read back: partition, offset, key, payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: String,
}

/// An idempotent producer (per-partition order survives retries).
pub fn producer(bootstrap: &str, message_timeout_ms: u64) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", message_timeout_ms.to_string())
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500")
        .create()
        .expect("create producer")
}

/// Enqueues one record in call order (retrying while the local queue is full)
/// and returns its delivery future.
pub fn enqueue(producer: &FutureProducer, topic: &str, key: &str, payload: &str) -> DeliveryFuture {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => panic!("enqueue to {topic}: {e}"),
        }
    }
}

/// Reads every partition of `topic` from the beginning up to the high
/// watermark it had when called. Panics after `deadline`.
pub async fn read_all(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    deadline: Duration,
) -> Vec<Read> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("create consumer");
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("fetch watermarks");
        if high > 0 {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("add partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut done: HashMap<i32, bool> = ends.keys().map(|&p| (p, false)).collect();
    let started = Instant::now();
    while done.values().any(|d| !d) {
        let left = deadline.saturating_sub(started.elapsed());
        let msg =
            match tokio::time::timeout(left, consumer.recv()).await {
                Ok(Ok(msg)) => msg,
                Ok(Err(e)) => panic!("consume {topic} from {bootstrap}: {e}"),
                Err(_) => panic!(
                "read_all {topic} from {bootstrap}: timed out after {deadline:?} with {} records; \
                 partitions not done: {:?}",
                out.len(),
                done.iter().filter(|(_, d)| !**d).map(|(p, _)| p).collect::<Vec<_>>()
            ),
            };
        let read = Read {
            partition: msg.partition(),
            offset: msg.offset(),
            key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
            payload: String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned(),
        };
        if read.offset + 1 >= ends[&read.partition] {
            done.insert(read.partition, true);
        }
        out.push(read);
    }
    out
}
