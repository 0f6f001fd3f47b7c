//! Command-line arguments of the `flotilla` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// flotilla: a fleet of immutable Kafka clusters that looks like one elastic Kafka.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
pub struct Cli {
    /// Registry (etcd) endpoints, comma separated.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// Fleet name: every key lives under `/flotilla/<fleet>/`.
    #[arg(long, global = true, env = "FLOTILLA_FLEET", default_value = "default")]
    pub fleet: String,

    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// How long to wait for the registry and for Kafka before giving up.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// One JSON document on stdout.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum Command {
    /// Run the zero-setup demo: embedded mock Kafka clusters and an in-memory registry.
    Demo(DemoArgs),
    /// Register and move clusters through their lifecycle.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Set and inspect topic routes.
    #[command(subcommand)]
    Route(RouteCommand),
    /// The fleet at a glance: clusters, routes, live clients.
    Status,
    /// Run the long-lived reconcile loop (leader-elected through the registry).
    Controller(ControllerArgs),
    /// Replay history through temporary clusters, then drain and retire them.
    #[command(subcommand)]
    Backfill(BackfillCommand),
}

/// Arguments of `flotilla demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Records the demo producers send.
    #[arg(long, default_value_t = 20_000)]
    pub records: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 500)]
    pub keys: u64,
}

/// `flotilla cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Register a cluster: connects, reads its Kafka cluster id, verifies it answers.
    Add(ClusterAddArgs),
    /// Move a cluster to `active` (it may then be written by new epochs).
    Activate(ClusterStateArgs),
    /// Move a cluster to `draining` (no new epoch may write to it).
    Drain(ClusterStateArgs),
    /// Move a cluster to `retired`; refused while any route or group still needs it.
    Retire(ClusterStateArgs),
    /// List the registered clusters.
    List,
    /// Show one cluster.
    Show {
        /// Cluster id.
        id: String,
    },
}

/// Arguments of `flotilla cluster add`.
#[derive(Debug, Args)]
pub struct ClusterAddArgs {
    /// Registry id of the new cluster (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// Kafka bootstrap servers (`host:port[,host:port...]`).
    #[arg(long)]
    pub bootstrap: String,
    /// Default weight of the cluster in routes.
    #[arg(long, default_value_t = 100)]
    pub weight: u32,
    /// Register as temporary with this purpose (e.g. a backfill name).
    #[arg(long)]
    pub temporary: Option<String>,
    /// Expiry of a temporary cluster, from now (e.g. `6h`, `30m`).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub expires_in: Duration,
    /// Labels, `key=value`, repeatable.
    #[arg(long = "label", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Name of a locally resolved security profile (never secrets in the registry).
    #[arg(long)]
    pub security_profile: Option<String>,
    /// Activate right away instead of leaving it `provisioning`.
    #[arg(long)]
    pub activate: bool,
}

/// Arguments of the lifecycle commands.
#[derive(Debug, Args)]
pub struct ClusterStateArgs {
    /// Cluster id.
    pub id: String,
    /// Reconcile once in-process after the change (no controller daemon needed).
    #[arg(long)]
    pub wait: bool,
}

/// `flotilla route ...`
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Propose a new epoch for a topic: the clusters it writes to, with weights.
    Set(RouteSetArgs),
    /// Show a topic's route and its epochs.
    Show {
        /// Topic name.
        topic: String,
    },
    /// Abandon a pending switch: producers resume on the open epoch.
    Abort {
        /// Topic name.
        topic: String,
    },
}

/// Arguments of `flotilla route set`.
#[derive(Debug, Args)]
pub struct RouteSetArgs {
    /// Topic name.
    pub topic: String,
    /// A cluster of the write set, `id=weight` (or `id` for its default weight); repeatable.
    #[arg(long = "cluster", required = true)]
    pub clusters: Vec<String>,
    /// Partition count; required for a new topic, checked against an existing route.
    #[arg(long)]
    pub partitions: Option<u32>,
    /// How long producers get to acknowledge the new epoch.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ack_timeout: Duration,
    /// Drive the switch to completion in-process (no controller daemon needed).
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `flotilla controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Reconcile at least this often, even without registry changes.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub interval: Duration,
    /// Leader lease TTL: a dead leader is replaced within about this long.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub lease_ttl: Duration,
    /// Identity of this controller instance (defaults to host and pid).
    #[arg(long)]
    pub id: Option<String>,
    /// Write a file here once this instance leads (used by tests and scripts).
    #[arg(long)]
    pub leader_file: Option<PathBuf>,
}

/// `flotilla backfill ...`
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum BackfillCommand {
    /// Register a backfill and run it: provision, route, replay, wait, tear down.
    Start(BackfillStartArgs),
    /// Show one backfill (or all of them).
    Status {
        /// Backfill name (all backfills when omitted).
        name: Option<String>,
    },
    /// Continue a backfill from its current phase (after a crash, a timeout, a cluster outage).
    Resume(BackfillNameArgs),
    /// Undo a backfill: switch the target topic back, drain, retire and deprovision its clusters.
    Abort(BackfillNameArgs),
}

/// Arguments of `flotilla backfill start`.
#[derive(Debug, Args)]
pub struct BackfillStartArgs {
    /// Backfill name (unique in the fleet; the purpose of its temporary clusters).
    #[arg(long)]
    pub name: String,
    /// Source: `<cluster id or bootstrap host:port>:<topic>`.
    #[arg(long)]
    pub source: String,
    /// Start of the range: an offset, `time:<unix ms>`, an RFC 3339 time, or `earliest`.
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// End of the range (exclusive): an offset, `time:<unix ms>`, an RFC 3339 time, or `latest`.
    #[arg(long, default_value = "latest")]
    pub to: String,
    /// Topic the records are copied into (read by the consumer groups).
    #[arg(long)]
    pub target_topic: String,
    /// Temporary clusters, `id=bootstrap`, comma separated or repeated.
    #[arg(long, value_delimiter = ',', value_parser = parse_key_value)]
    pub clusters: Vec<(String, String)>,
    /// Command that brings up one cluster and prints its bootstrap address (e.g. `scripts/provision-kafka`).
    #[arg(long)]
    pub provision_cmd: Option<String>,
    /// How many clusters `--provision-cmd` brings up.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Command run with a cluster's bootstrap address as last argument to take it down.
    #[arg(long)]
    pub deprovision_cmd: Option<String>,
    /// Consumer group that must read everything before tear-down; repeatable.
    #[arg(long = "group", value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Expiry of the temporary clusters, from now.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub expires_in: Duration,
    /// How the backfill runs.
    #[command(flatten)]
    pub run: BackfillRunArgs,
}

/// Arguments of `flotilla backfill resume|abort`.
#[derive(Debug, Args)]
pub struct BackfillNameArgs {
    /// Backfill name.
    pub name: String,
    /// How the backfill runs.
    #[command(flatten)]
    pub run: BackfillRunArgs,
}

/// Progress display of `flotilla backfill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    /// Bars on a terminal, log lines otherwise.
    Auto,
    /// Progress bars.
    Bars,
    /// Log lines.
    Lines,
    /// Nothing.
    Quiet,
}

/// How a backfill runs (not stored in the registry).
#[derive(Debug, Args)]
pub struct BackfillRunArgs {
    /// How often replay positions are checkpointed to the registry.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub checkpoint_every: Duration,
    /// Records a copy worker sends before waiting for their acknowledgements.
    #[arg(long, default_value_t = 5_000)]
    pub batch: usize,
    /// Give up waiting for the consumer groups after this long (resume continues).
    #[arg(long, value_parser = parse_duration)]
    pub wait_timeout: Option<Duration>,
    /// How long tear-down waits for the switch back and for retirement.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub teardown_timeout: Duration,
    /// How long producers get to acknowledge a route switch.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ack_timeout: Duration,
    /// A temporary cluster unreachable for this long fails the replay (resume continues).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub delivery_timeout: Duration,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
    /// Testing: exit abruptly once this many records were handed to the producer.
    #[arg(long, hide = true)]
    pub crash_after_records: Option<u64>,
    /// Testing: exit abruptly on entering this phase.
    #[arg(long, hide = true)]
    pub crash_at_phase: Option<String>,
}

/// Parses `500ms`, `10s`, `5m`, `6h`, `2d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 500ms, 10s, 5m, 6h, 2d)"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{s}` (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

/// Parses `key=value`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("6h").unwrap(), Duration::from_secs(6 * 3600));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "flotilla",
            "route",
            "set",
            "orders",
            "--cluster",
            "a=2",
            "--cluster",
            "b",
            "--partitions",
            "6",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Route(RouteCommand::Set(_))));
    }
}
