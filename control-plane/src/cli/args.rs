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
