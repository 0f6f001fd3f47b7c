//! Errors of control-plane operations.

use flotilla_client::kafka::KafkaError;
use flotilla_client::registry::{ModelError, RegistryError};

/// Why a control-plane operation was refused or failed. When an operation
/// returns an error, the registry is exactly as it was before it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The registry (etcd) failed or refused the write (conflict, unavailable, malformed value).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A Kafka cluster failed (unreachable, wrong cluster id, partition mismatch).
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The change breaks a schema rule.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// No cluster has that id.
    #[error("unknown cluster `{0}` (see `flotilla cluster list`)")]
    UnknownCluster(String),
    /// No route exists for the topic.
    #[error("topic `{0}` has no route (create one with `flotilla route set {0} --cluster ID=WEIGHT --partitions N`)")]
    UnknownTopic(String),
    /// The operation is not allowed in the current state of the fleet.
    #[error("{0}")]
    Refused(String),
    /// Bad input that is not about the registry.
    #[error("{0}")]
    BadInput(String),
}

impl ControlError {
    /// Whether the error is a lost compare-and-swap race with another operator.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ControlError::Registry(RegistryError::Conflict { .. }))
    }
}
