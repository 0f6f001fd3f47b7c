//! [`FleetConsumer`]: a drop-in for rdkafka's `StreamConsumer` that reads every
//! cluster a topic lives on, and keeps per-key order across route switches.
//!
//! One rdkafka `StreamConsumer` per cluster of the **read set**, all in the
//! same consumer group (`group.id`): Kafka's own group membership balances
//! partitions among the members on each cluster, and offsets are committed to
//! the cluster a record came from.
//!
//! - **Read set** (per topic, [`read_set`](crate::route::gate::read_set)):
//!   every cluster of the open epoch, plus every cluster of a sealed epoch
//!   that is not retired. A cluster leaves (its consumer is closed) only once
//!   the registry says it is `retired` (or it is deregistered) — not when the
//!   group passed its fence, since stragglers can land above the fence until
//!   the controller retires it after the group drained it to its end; a
//!   cluster that enters is read from its beginning (`auto.offset.reset` is
//!   always `earliest`). Offsets live in Kafka, so a cluster removed and added
//!   back resumes where the group left it.
//! - **Fences** (DESIGN "Handoff protocol" step 5): every decision is the
//!   sans-IO [`FenceGate`](crate::route::gate::FenceGate)'s. The consumer only
//!   feeds it routes and the group's committed offsets (its own commits at
//!   once, every member's by polling the sealed clusters with
//!   [`ClusterAdmin::committed_offsets`](crate::kafka::ClusterAdmin::committed_offsets)),
//!   parks a record the gate holds back, pauses its partition, and resumes it
//!   when the gate says `Unblock`. A record of a sealed epoch found above a
//!   fence (a zombie producer) is delivered, counted and logged, never dropped.
//! - **Reading**: one pump task per cluster moves batches of records from
//!   librdkafka through the gate into one bounded ready queue that `recv`
//!   pops from (see `fleet.rs`), without copying them: a [`FleetMessage`]
//!   holds librdkafka's message and keeps its cluster's consumer alive
//!   (records parked behind a fence are copied out).
//! - **Commits** go through one committer thread per cluster (`committer.rs`):
//!   a synchronous commit waits at most the commit timeout and returns
//!   [`FleetConsumeError::CommitPending`] if the cluster does not answer; the
//!   commit stays queued and is retried until it does. A revoke commits what
//!   is queued for its partitions before it completes — after waiting (at
//!   most [`FleetConsumerConfig::revoke_wait`]) for the application to be
//!   done with the record of a revoked partition it is processing — and
//!   closing commits what is queued before the consumers leave their groups
//!   (each at most the commit timeout).
//! - **Failures**: a read cluster down does not stop the others (nor does a
//!   commit on it); a registry outage keeps the last snapshot.
//!
//! Metrics: counter `flotilla_consumer_records_total{cluster}`, gauge
//! `flotilla_consumer_lag{cluster,topic,partition}` (from librdkafka
//! statistics), histogram `flotilla_consumer_fence_wait_seconds{cluster,topic}`,
//! counter `flotilla_consumer_stragglers_total{cluster,topic}`, gauge
//! `flotilla_consumer_read_set_size{topic}`, gauge
//! `flotilla_consumer_prejoined_clusters{topic}`, counter
//! `flotilla_consumer_errors_total{cluster}`.
//!
//! See `docs/consumer.md` for porting from `StreamConsumer`.

mod committer;
mod config;
mod context;
mod fleet;
#[cfg(test)]
mod mock_tests;
mod record_epoch;

pub use config::{
    FleetConsumerConfig, RebalanceCallback, RebalanceEvent, RebalanceKind, RebalancePhase,
};
pub use context::FleetContext;
pub use fleet::{FleetConsumeError, FleetConsumer, FleetMessage};

/// The record header carrying the route epoch, its decoding, and the
/// lookup in a message's headers: the producer's own definitions (decimal
/// ASCII), so both sides share one encoding.
pub use crate::producer::{epoch_of, parse_epoch_header, EPOCH_HEADER};

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};

    #[test]
    fn fleet_message_can_be_kept_and_sent_and_is_small() {
        fn keepable<T: Send + Sync + 'static>() {}
        keepable::<FleetMessage>();
        // Records are moved a few times between librdkafka and `recv`: a
        // large one (an `OwnedMessage` inline) cost more than the copy it saves.
        let size = std::mem::size_of::<FleetMessage>();
        assert!(size <= 64, "FleetMessage is {size} bytes");
    }

    #[test]
    fn epoch_header_is_decimal_ascii() {
        assert_eq!(parse_epoch_header(b"7"), Some(7));
        assert_eq!(parse_epoch_header(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_epoch_header(b"x"), None);
        assert_eq!(parse_epoch_header(b""), None);
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "other",
                value: Some("9"),
            })
            .insert(Header {
                key: EPOCH_HEADER,
                value: Some("4"),
            });
        assert_eq!(epoch_of(&h), Some(4));
        assert_eq!(epoch_of(&OwnedHeaders::new()), None);
    }
}
