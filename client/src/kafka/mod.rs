//! The thin rdkafka adapter every part of flotilla uses to talk to one Kafka
//! cluster (rdkafka 0.39 / librdkafka 2.12).
//!
//! - [`config`]: shared client properties, local security profiles and the
//!   per-cluster rdkafka configuration ([`client_config`]).
//! - [`identity`]: bootstrap syntax, reading and verifying the Kafka cluster id.
//! - [`admin`]: [`ClusterAdmin`] — topics, end offsets, committed offsets.
//! - [`error`]: [`KafkaError`] and the classification of rdkafka errors into
//!   permanent (never reroute) and transient.
//! - `producer_id`: idempotent producer ids without librdkafka's 500 ms wait.
//! - [`mock`]: [`MockFleet`] of in-process librdkafka mock clusters for the demo.

pub mod admin;
pub mod config;
pub mod error;
pub mod identity;
pub mod mock;
pub(crate) mod producer_id;

pub use admin::{ClusterAdmin, TopicStatus};
pub use config::{
    bootstrap_config, client_config, validate_bootstrap, validate_properties, InvalidProperty,
    KafkaProperties, SecurityProfiles,
};
pub use error::{classify, classify_code, ErrorClass, KafkaError};
pub use identity::{check_cluster, fetch_cluster_id, read_cluster_id, verify_cluster_id};
pub use mock::{MockFleet, MockKafka};
