//! flotilla-control: the control plane of a flotilla fleet.
//!
//! - [`ops`]: registry writes with compare-and-swap — cluster lifecycle, routes, status.
//! - [`controller`]: the level-triggered reconcile loop (switches, retirement,
//!   expiry) under leader election.
//! - [`kafka`]: the few Kafka operations the control plane needs, behind a trait.
//! - [`backfill`]: `flotilla backfill` — temporary clusters, replay, wait, tear-down.
//! - [`cli`]: the `flotilla` binary's arguments and output.
//! - [`demo`]: the zero-setup demo on embedded mock clusters.

#![warn(missing_docs)]

pub mod backfill;
pub mod cli;
pub mod controller;
pub mod demo;
pub mod error;
pub mod kafka;
pub mod ops;

pub use controller::{Controller, ReconcileReport};
pub use error::ControlError;
pub use kafka::{FleetKafka, RdKafkaFleet};
pub use ops::{AddCluster, AddOutcome, ControlPlane, RouteOutcome, SetRoute, Status};
