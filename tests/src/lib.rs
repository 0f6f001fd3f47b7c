//! `flotilla-testkit`: real servers for flotilla's integration tests.
//!
//! * [`EtcdServer`] — a throwaway single-member etcd on free loopback ports with
//!   its own data directory.
//! * [`KafkaFleet`] / [`KafkaCluster`] — N independent single-node Apache Kafka
//!   (KRaft, broker + controller in one JVM) clusters started in parallel.
//! * [`create_topic`] / [`create_topic_blocking`] — create a topic through the
//!   rdkafka `AdminClient` and wait until its partitions have leaders.
//!
//! Every server runs in its own process group and its own folder; dropping the
//! handle (also while a test panics) kills the processes and removes the
//! folders. Servers also get a parent-death signal, so they die with the test
//! process even when no `Drop` runs. `into_detached()` (after
//! [`process::set_outlive_process`]) leaks them on purpose, as `flotilla-fleet up` does.
//! See `docs/harness.md` for ports, files and environment variables.

#![warn(missing_docs)]

pub mod etcd;
pub mod kafka;
pub mod process;

pub use etcd::{DetachedEtcd, EtcdServer};
pub use kafka::{
    create_topic, create_topic_blocking, DetachedKafkaCluster, KafkaCluster, KafkaFleet,
    KafkaOptions,
};

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, waiting for or driving a test server.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A required program is not installed; `hint` says how to install it.
    #[error("`{program}` not found on PATH: {hint}")]
    MissingProgram {
        /// The program that was looked for (e.g. `etcd`, `java`).
        program: String,
        /// How to fix it (e.g. `apt-get install -y etcd-server`).
        hint: String,
    },
    /// An I/O operation of the harness itself failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No free loopback port could be found.
    #[error("no free loopback port found after {attempts} attempts")]
    NoFreePort {
        /// How many candidate ports were tried.
        attempts: usize,
    },
    /// A server process exited before it became ready.
    #[error(
        "{what} exited before it became ready ({status})\n--- last lines of {log} ---\n{tail}"
    )]
    Exited {
        /// Which server (e.g. `etcd`, `kafka cluster 2`).
        what: String,
        /// The exit status.
        status: String,
        /// The log file whose tail follows.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// A server did not become ready before the deadline.
    #[error(
        "{what} not ready after {waited:?}: {last_error}\n--- last lines of {log} ---\n{tail}"
    )]
    NotReady {
        /// Which server.
        what: String,
        /// How long the harness waited.
        waited: Duration,
        /// The last readiness-probe failure.
        last_error: String,
        /// The log file whose tail follows.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// A helper command (e.g. `kafka.tools.StorageTool format`, `scripts/fetch-kafka`) failed.
    #[error("`{command}` failed ({status})\n{output}")]
    CommandFailed {
        /// The command line, for the reader.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// The Kafka broker jars are not available.
    #[error("Kafka jars not available: {0}")]
    KafkaJars(String),
    /// A Kafka client operation (admin, metadata) failed.
    #[error("kafka: {0}")]
    Kafka(String),
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The repository root (parent of this crate's manifest directory).
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("FLOTILLA_REPO_ROOT") {
        return PathBuf::from(root);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The folder under which servers get their own sub-folders by default:
/// `$FLOTILLA_HARNESS_DIR`, else `$TMPDIR/flotilla-harness`.
pub fn default_base_dir() -> PathBuf {
    match std::env::var_os("FLOTILLA_HARNESS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join("flotilla-harness"),
    }
}

/// The folder under which [`EtcdServer::start`] creates its server folders:
/// `$FLOTILLA_HARNESS_DIR` when set, else `/dev/shm/flotilla-harness` when
/// `/dev/shm` is a writable tmpfs (etcd fsyncs every write; on tmpfs that costs
/// nothing, and the data still survives a SIGKILL + restart), else
/// [`default_base_dir`].
pub fn default_etcd_base_dir() -> PathBuf {
    if std::env::var_os("FLOTILLA_HARNESS_DIR").is_some() {
        return default_base_dir();
    }
    let shm = std::path::Path::new("/dev/shm");
    let dir = shm.join("flotilla-harness");
    if shm.is_dir() && std::fs::create_dir_all(&dir).is_ok() {
        dir
    } else {
        default_base_dir()
    }
}
