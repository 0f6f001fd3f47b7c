//! flotilla-sim: a deterministic, seeded chaos simulator of a flotilla fleet.
//!
//! It drives the *real* sans-IO routing core — the producer
//! [`Router`](flotilla_client::route::router::Router) and the consumer
//! [`FenceGate`](flotilla_client::route::gate::FenceGate) — against simulated
//! Kafka clusters, a simulated registry (revisions, leases, delayed watches),
//! a controller and an operator, under injected faults, on a virtual clock.
//! A history checker then looks for lost, duplicated or reordered records and
//! for protocol violations. Same seed and same code give the same trace.
//!
//! - [`config`]: run shape, faults, broken variants.
//! - [`world`]: the simulated world and its actors.
//! - [`history`]: records and anomalies.
//! - [`checker`]: the history checker's rules, shared with live mode.
//! - [`report`]: summaries over many seeds.
//! - [`live`]: live mode, the same workload and checker against a real fleet.

#![warn(missing_docs)]

pub mod checker;
pub mod config;
pub mod history;
pub mod live;
pub mod report;
pub mod world;

pub use config::{Bugs, Config, Fault, Faults, LeasePolicy};
pub use history::{Anomaly, AnomalyKind};
pub use world::{RunResult, World};

/// Runs one seed with `cfg` and returns its checked outcome.
pub fn run_seed(seed: u64, cfg: &Config) -> RunResult {
    World::new(seed, cfg.clone()).run()
}
