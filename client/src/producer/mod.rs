//! [`FleetProducer`]: a drop-in for rdkafka's `FutureProducer` that routes
//! every record by the fleet registry.
//!
//! The routing decisions are the sans-IO [`Router`](crate::route::router::Router)'s;
//! this module only performs them: one rdkafka producer per cluster (opened
//! when a route needs it, after checking its Kafka cluster id), a hold buffer
//! during switches, acknowledgements in the client's lease-bound registry
//! record, and an epoch header on every record ([`EPOCH_HEADER`]).
//!
//! See `docs/producer.md` for porting from `FutureProducer`, configuration and
//! failure modes.

mod config;
mod fleet;
mod headers;
mod service;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::Timestamp;

use crate::kafka::{InvalidProperty, KafkaError};
use crate::registry::RegistryError;
use crate::route::router::NoRoute;

pub use config::{
    default_client_id, FleetProducerConfig, OutageMode, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HOLD_CAPACITY, DEFAULT_LEASE_TTL,
};
pub use fleet::{DeliveryFuture, FleetProducer};

/// Name of the header carrying a record's route epoch. Its value is the epoch
/// number in decimal ASCII (epoch 7 → the bytes `b"7"`); parse it with
/// [`parse_epoch_header`]. It is appended to the user's own headers.
pub const EPOCH_HEADER: &str = "flotilla-epoch";

/// Parses an [`EPOCH_HEADER`] value (decimal ASCII).
pub fn parse_epoch_header(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The epoch header of a received message's headers, if present and well formed.
pub fn epoch_of<H: Headers>(headers: &H) -> Option<u64> {
    headers
        .iter()
        .find(|h| h.key == EPOCH_HEADER)
        .and_then(|h| h.value)
        .and_then(parse_epoch_header)
}

/// Where a record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Registry id of the cluster.
    pub cluster: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Route epoch the record was sent with (also in its [`EPOCH_HEADER`]).
    pub epoch: u64,
}

/// An owned record (topic, key, payload, headers): the request type of the
/// `tower::Service` impl and what held records are kept as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OwnedRecord {
    /// Topic.
    pub topic: String,
    /// Key (routes the record: same key → same cluster and partition within an epoch).
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order (the epoch header is appended on send).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Explicit partition (overrides the murmur2 partition; rarely wanted).
    pub partition: Option<i32>,
    /// Timestamp in ms since the epoch (None: librdkafka's now).
    pub timestamp: Option<i64>,
}

impl OwnedRecord {
    /// A record for `topic` with no key, payload or headers.
    pub fn to(topic: impl Into<String>) -> Self {
        OwnedRecord {
            topic: topic.into(),
            ..Default::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = Some(payload.into());
        self
    }

    /// Appends a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((key.into(), Some(value.into())));
        self
    }

    /// Sets the timestamp (ms since the Unix epoch).
    pub fn timestamp(mut self, ms: i64) -> Self {
        self.timestamp = Some(ms);
        self
    }

    /// Key + payload size in bytes (what `flotilla_producer_bytes_total` counts).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len)
    }

    /// Converts into an rdkafka `OwnedMessage` (partition -1, offset -1 when unknown).
    pub fn into_message(self) -> OwnedMessage {
        let headers = if self.headers.is_empty() {
            None
        } else {
            Some(headers_from_vec(&self.headers))
        };
        OwnedMessage::new(
            self.payload,
            self.key,
            self.topic,
            self.timestamp
                .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
            self.partition.unwrap_or(-1),
            -1,
            headers,
        )
    }
}

pub(crate) fn headers_from_vec(h: &[(String, Option<Vec<u8>>)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(h.len() + 1);
    for (k, v) in h {
        out = out.insert(Header {
            key: k,
            value: v.as_ref(),
        });
    }
    out
}

pub(crate) fn headers_to_vec<H: Headers>(h: &H) -> Vec<(String, Option<Vec<u8>>)> {
    h.iter()
        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
        .collect()
}

/// Why a record was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetSendError {
    /// The registry gives no usable route for the topic (unknown topic, no
    /// open epoch, the open epoch writes to an inactive cluster...). Never
    /// sent to a default cluster.
    #[error("no route: {0}")]
    NoRoute(#[from] NoRoute),
    /// Kafka did not take or did not deliver the record (after
    /// `message.timeout.ms` for an unreachable cluster). Authorization errors
    /// are permanent: never retried or rerouted by flotilla.
    #[error("cluster {cluster}: {error}")]
    Kafka {
        /// Registry id of the cluster.
        cluster: Arc<str>,
        /// The classified error.
        error: KafkaError,
    },
    /// The route writes to a cluster this producer refused or could not open:
    /// its Kafka cluster id does not match the registry (loud error), its
    /// configuration is wrong, or it was unreachable when opened.
    #[error("cluster {cluster} is not usable by this producer: {error}")]
    ClusterUnavailable {
        /// Registry id of the cluster.
        cluster: Arc<str>,
        /// Why.
        error: KafkaError,
    },
    /// The send timeout passed while the record waited (held during a switch,
    /// hold buffer full, librdkafka queue full, or registry outage in
    /// [`OutageMode::Hold`]). The record was never handed to Kafka.
    #[error("send timed out after {waited:?} while {reason}; the record was not sent")]
    Timeout {
        /// How long the send waited.
        waited: std::time::Duration,
        /// What it waited for.
        reason: WaitReason,
    },
    /// `send_result` found the hold buffer full (`send` would wait instead).
    #[error("hold buffer full ({capacity} records held during a route switch)")]
    HoldBufferFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// The producer was shut down before the record was sent.
    #[error("the fleet producer is shut down")]
    Closed,
}

/// What a timed-out send was waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// Held for a route switch (or a registry outage in `Hold` mode).
    Held,
    /// The hold buffer was full.
    HoldBufferFull,
    /// librdkafka's local queue was full.
    QueueFull,
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WaitReason::Held => "held for a route switch or registry outage",
            WaitReason::HoldBufferFull => "the hold buffer was full",
            WaitReason::QueueFull => "the librdkafka queue was full",
        })
    }
}

impl FleetSendError {
    /// Whether sending the same record again may succeed (a transient Kafka
    /// error or a timeout). Permanent errors (authorization, configuration,
    /// cluster id mismatch, no route) return false: retrying cannot help.
    pub fn is_retriable(&self) -> bool {
        match self {
            FleetSendError::Kafka { error, .. } => !error.is_permanent(),
            FleetSendError::ClusterUnavailable { error, .. } => !error.is_permanent(),
            FleetSendError::Timeout { .. } | FleetSendError::HoldBufferFull { .. } => true,
            FleetSendError::NoRoute(_) | FleetSendError::Closed => false,
        }
    }

    /// Whether this is an authentication / authorization failure.
    pub fn is_authorization(&self) -> bool {
        matches!(
            self,
            FleetSendError::Kafka { error, .. } | FleetSendError::ClusterUnavailable { error, .. }
                if error.is_authorization()
        )
    }
}

/// Why a [`FleetProducer`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetProducerError {
    /// The configuration lacks something (e.g. no registry).
    #[error("fleet producer configuration: {0}")]
    Config(String),
    /// A property librdkafka refuses (an unknown name, an invalid value),
    /// refused by [`FleetProducer::new`] / [`FleetProducer::connect`] before
    /// anything connects, as rdkafka's `ClientConfig::create` would
    /// (librdkafka would refuse each cluster's producer when a route first
    /// needs it, and every record routed there would fail).
    #[error("fleet producer configuration: {0}")]
    InvalidProperty(#[from] InvalidProperty),
    /// The registry could not be read or written (e.g. etcd down at start).
    #[error("fleet producer cannot use the registry: {0}")]
    Registry(#[from] RegistryError),
}

/// The result of a send: the delivery, or the error with the record as an
/// `OwnedMessage` (like `FutureProducer`'s `OwnedDeliveryResult`).
pub type FleetDeliveryResult = Result<Delivery, (FleetSendError, OwnedMessage)>;
