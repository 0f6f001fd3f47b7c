//! flotilla-client: discover a fleet of immutable Kafka clusters through the
//! registry and route records among them.
//!
//! - [`registry`]: the schema kept in etcd, storage backends and the watcher.
//! - [`route`]: the sans-IO routing and handoff core (no I/O, no clocks).

#![warn(missing_docs)]

pub mod kafka;
pub mod registry;
pub mod route;
