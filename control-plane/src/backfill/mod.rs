//! `flotilla backfill`: replay a range of history through temporary clusters,
//! wait for the consumers, then drain and retire the temporary clusters.
//!
//! The backfill's whole state is a [`BackfillRecord`] in the registry
//! (`/flotilla/<fleet>/backfills/<name>`, CAS writes), so `status`, `resume`
//! and `abort` work from any machine. The [`Backfill`] driver is
//! level-triggered: it reads the record and runs the current [`Phase`]; every
//! phase is idempotent, so `resume` after a crash anywhere re-enters it safely.
//!
//! Phases: `provisioning → routing → replaying → waiting → tearing_down → done`
//! (or `aborting → aborted`). Exactly-once across crashes comes from
//! checkpoints written only after the producer acknowledged every record below
//! them, plus a dedupe scan of the target topic by source coordinates
//! ([`SRC_HEADER`]) on resume; see `docs/backfill.md`.

pub mod command;
mod driver;
mod progress;
mod provision;
pub mod record;
mod replay;

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::kafka::{KafkaError, KafkaProperties, SecurityProfiles};
use flotilla_client::registry::RegistryError;

pub use driver::{Backfill, StartRequest};
pub use progress::ProgressMode;
pub use record::{
    BackfillRecord, BackfillStore, Bound, Checkpoint, PartitionRange, Phase, PreviousRoute, Source,
    TempCluster,
};

use crate::error::ControlError;

/// Header added to every copied record: its source coordinates,
/// `<partition>:<offset>` in decimal ASCII.
pub const SRC_HEADER: &str = "flotilla-src";

/// Formats a [`SRC_HEADER`] value.
pub fn src_header_value(partition: i32, offset: i64) -> String {
    format!("{partition}:{offset}")
}

/// Parses a [`SRC_HEADER`] value into (partition, offset).
pub fn parse_src_header(value: &[u8]) -> Option<(i32, i64)> {
    let s = std::str::from_utf8(value).ok()?;
    let (p, o) = s.split_once(':')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// Why a backfill command failed. The record in the registry says where the
/// backfill stopped; `resume` continues from there, `abort` undoes it.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// Bad input, refused before anything was registered.
    #[error("{0}")]
    BadInput(String),
    /// No backfill of that name.
    #[error("no backfill named `{0}` (see `flotilla backfill status`)")]
    NotFound(String),
    /// A backfill of that name already exists.
    #[error("a backfill named `{0}` already exists (names are never reused; see `flotilla backfill status {0}`)")]
    AlreadyExists(String),
    /// Another process changed the record while this one worked.
    #[error("backfill `{0}` was changed by another process; run `flotilla backfill status {0}` and retry")]
    Concurrent(String),
    /// Another process is driving the backfill now.
    #[error("backfill `{name}` is being driven by {holder}; wait for it, or stop it first")]
    Busy {
        /// The backfill.
        name: String,
        /// Who holds its lock.
        holder: String,
    },
    /// The driver could not renew its lock lease (registry unreachable): it
    /// stopped copying so that a driver resuming elsewhere cannot race it.
    #[error("backfill `{0}`: lost the driver lock (registry unreachable?); stopped — run `flotilla backfill resume {0}`")]
    LockLost(String),
    /// The backfill is finished or aborted: nothing to resume.
    #[error("backfill `{name}` is {phase}; there is nothing to resume")]
    Finished {
        /// The backfill.
        name: String,
        /// Its final phase.
        phase: Phase,
    },
    /// The provision or deprovision command failed.
    #[error("{what} `{command}` failed: {detail}")]
    Command {
        /// `provision command` or `deprovision command`.
        what: &'static str,
        /// The command line.
        command: String,
        /// Exit status and output tail.
        detail: String,
    },
    /// Copying failed (source unreadable, target cluster down, ...). `resume` continues.
    #[error("replay of backfill `{name}` stopped: {detail} (fix it, then `flotilla backfill resume {name}`)")]
    Replay {
        /// The backfill.
        name: String,
        /// What went wrong.
        detail: String,
    },
    /// Something did not happen in time (a route switch, the consumers, retirement).
    #[error("backfill `{name}`: {detail} (run `flotilla backfill resume {name}` to keep waiting)")]
    Timeout {
        /// The backfill.
        name: String,
        /// What was waited for.
        detail: String,
    },
    /// A test hook stopped the driver (simulated crash).
    #[error("backfill stopped by a test hook at {0}")]
    InjectedCrash(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A Kafka cluster failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A control-plane operation failed or was refused.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Where the driver is, passed to a [`Hook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookPoint {
    /// The record was just written in this phase, before the phase's work.
    Phase(Phase),
    /// This many records were handed to the producer in this run (some not
    /// acknowledged yet).
    Copied(u64),
    /// This many records were acknowledged in this run (possibly not
    /// checkpointed yet).
    Acked(u64),
    /// One wait-phase poll found this total lag.
    Lag(u64),
}

/// A test hook: called at every [`HookPoint`]; returning `true` stops the
/// driver at once with [`BackfillError::InjectedCrash`] (nothing checkpointed;
/// records already handed to the producer are delivered before it returns, as
/// a killed process's writes end with it). The CLI's hidden crash flags exit
/// the process instead.
pub type Hook = Arc<dyn Fn(&HookPoint) -> bool + Send + Sync>;

/// How the driver runs (nothing here is stored in the registry).
#[derive(Clone)]
pub struct BackfillOptions {
    /// rdkafka properties for every client (source consumers, producer, scans).
    pub kafka: KafkaProperties,
    /// Locally resolved security profiles.
    pub profiles: SecurityProfiles,
    /// Timeout of single Kafka and registry operations.
    pub timeout: Duration,
    /// How often replay positions are checkpointed.
    pub checkpoint_every: Duration,
    /// Records a copy worker sends before it waits for their acknowledgements.
    pub batch: usize,
    /// How long the wait phase waits for the groups (None: as long as it takes).
    pub wait_timeout: Option<Duration>,
    /// How long tear-down waits for the switch back and for retirement.
    pub teardown_timeout: Duration,
    /// How long producers get to acknowledge a route switch.
    pub ack_timeout: Duration,
    /// `message.timeout.ms` of the backfill's producer: a temporary cluster
    /// down for longer fails the replay (resume after it returns).
    pub delivery_timeout: Duration,
    /// Progress display.
    pub progress: ProgressMode,
    /// Test hook.
    pub hook: Option<Hook>,
}

impl std::fmt::Debug for BackfillOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackfillOptions")
            .field("timeout", &self.timeout)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("batch", &self.batch)
            .field("wait_timeout", &self.wait_timeout)
            .field("progress", &self.progress)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            kafka: KafkaProperties::new(),
            profiles: SecurityProfiles::empty(),
            timeout: Duration::from_secs(10),
            checkpoint_every: Duration::from_secs(2),
            batch: 5_000,
            wait_timeout: None,
            teardown_timeout: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(30),
            progress: ProgressMode::Auto,
            hook: None,
        }
    }
}

impl BackfillOptions {
    pub(crate) fn fire(&self, point: HookPoint) -> Result<(), BackfillError> {
        match &self.hook {
            Some(h) if h(&point) => Err(BackfillError::InjectedCrash(format!("{point:?}"))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn src_header_round_trips() {
        let v = src_header_value(3, 1234);
        assert_eq!(parse_src_header(v.as_bytes()), Some((3, 1234)));
        assert_eq!(parse_src_header(b"x"), None);
        assert_eq!(parse_src_header(b"1:"), None);
    }
}
