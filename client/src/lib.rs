//! flotilla-client: discover a fleet of immutable Kafka clusters through the
//! registry and route records among them.
//!
//! - [`registry`]: the schema kept in etcd, storage backends and the watcher.
//! - [`route`]: the sans-IO routing and handoff core (no I/O, no clocks).

#![warn(missing_docs)]

pub mod consumer;
pub mod kafka;
pub mod producer;
pub mod registry;
pub mod route;

pub use consumer::{FleetConsumer, FleetConsumerConfig, FleetMessage};
pub use producer::{
    Delivery, FleetProducer, FleetProducerConfig, FleetProducerError, FleetSendError, OutageMode,
    OwnedRecord, EPOCH_HEADER,
};
