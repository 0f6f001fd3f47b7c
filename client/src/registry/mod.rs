//! The fleet registry: schema, storage backends (etcd and in-memory) and the watcher.
//!
//! - [`model`] / [`snapshot`]: the values under `/flotilla/<fleet>/` and a decoded view of them.
//! - [`kv`]: the storage seam ([`KvStore`]) with etcd semantics; backends
//!   [`etcd::EtcdKv`] and [`memory::MemoryKv`].
//! - [`store`]: [`Registry`], typed operations (CAS writes, leases) over a [`KvStore`].
//! - [`watcher`]: [`FleetWatcher`], a live, incrementally updated [`FleetSnapshot`].
//! - [`conformance`]: the behaviour suite both backends must pass.

pub mod conformance;
pub mod etcd;
pub mod guarded;
pub mod kv;
pub mod memory;
pub mod model;
pub mod snapshot;
pub mod store;
pub mod watcher;

pub use guarded::GuardedKv;
pub use kv::Guard;
pub use kv::{
    Expect, KvEntry, KvStore, LeaseId, RegistryError, Revision, WatchBatch, WatchEvent, WatchStream,
};
pub use model::*;
pub use snapshot::FleetSnapshot;
pub use store::{ClientLease, Registry};
pub use watcher::{FleetWatcher, WatcherOptions};
