//! Idempotent producer ids: getting one without librdkafka's 500 ms wait, and
//! readying a fresh cluster to hand them out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext};

use crate::kafka::error::KafkaError;

/// Makes a new idempotent producer ask for its producer id now.
///
/// librdkafka asks for it when a metadata response arrives, but only from a
/// broker whose connection is already up; a new producer's first response
/// comes before that, so it falls back to a 500 ms timer, and every record
/// routed to the new cluster meanwhile waits (measured: the first delivery of
/// a fresh producer took 505 ms, 30 of 30 times, against 7 ms after this).
/// Two brokers-only metadata requests in a row find the connection up by the
/// second. It matters because clusters are opened on route switches: a
/// switch soon after a cluster was opened had to wait for those records.
/// Blocking (a round trip or two); best effort.
pub(crate) fn prime_producer_id<C: ClientContext>(client: &Client<C>, timeout: Duration) {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    for _ in 0..2 {
        let mut meta: *const rdkafka::bindings::rd_kafka_metadata_t = std::ptr::null();
        // SAFETY: the client handle is alive (borrowed); with `all_topics = 0`
        // and no topic handle librdkafka asks for brokers only; on success it
        // hands us `meta`, which we destroy at once.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_metadata(
                client.native_ptr(),
                0,
                std::ptr::null_mut(),
                &mut meta,
                ms,
            )
        };
        if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return;
        }
        // SAFETY: `meta` came from a successful `rd_kafka_metadata` above.
        unsafe { rdkafka::bindings::rd_kafka_metadata_destroy(meta) };
    }
}

/// Waits (blocking, at most `timeout`) until an idempotent producer made from
/// `config` has been given a producer id by `cluster`.
///
/// A fresh Kafka cluster fetches its first block of producer ids from its
/// controller on the first request, which took about half a second on
/// Kafka 4.4 here: the first records a `FleetProducer` routes to a new
/// cluster would wait for it, right after a switch.
pub(crate) fn await_producer_id(
    cluster: &str,
    config: &ClientConfig,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let mut config = config.clone();
    config
        .set("enable.idempotence", "true")
        .set("statistics.interval.ms", "20");
    let producer: BaseProducer<IdProbe> =
        config
            .create_with_context(IdProbe::default())
            .map_err(|e| KafkaError::Config {
                cluster: cluster.to_string(),
                detail: format!("cannot create an idempotent producer: {e}"),
            })?;
    prime_producer_id(producer.client(), timeout);
    let deadline = Instant::now() + timeout;
    while !producer.context().assigned.load(Ordering::Acquire) {
        if Instant::now() >= deadline {
            return Err(KafkaError::Transient {
                cluster: cluster.to_string(),
                detail: format!("no idempotent producer id within {timeout:?}"),
            });
        }
        // Serves the statistics callback.
        producer.poll(Duration::from_millis(20));
    }
    Ok(())
}

/// Learns from librdkafka's statistics when the producer id is assigned.
#[derive(Default)]
struct IdProbe {
    assigned: AtomicBool,
}

impl ClientContext for IdProbe {
    fn stats(&self, statistics: Statistics) {
        if statistics
            .eos
            .is_some_and(|e| e.idemp_state == "Assigned" && e.producer_id >= 0)
        {
            self.assigned.store(true, Ordering::Release);
        }
    }
}

impl ProducerContext for IdProbe {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}
