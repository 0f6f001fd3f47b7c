//! The fleet registry: schema, storage backends (etcd and in-memory) and the watcher.

pub mod model;
pub mod snapshot;

pub use model::*;
pub use snapshot::FleetSnapshot;
