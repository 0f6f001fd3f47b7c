//! `flotilla-fleet`: a local etcd + N Kafka clusters that outlive the command.
//!
//! * `flotilla-fleet up N [--etcd]` starts them detached, writes
//!   `.cache/fleet/state.json` and prints the registry endpoint and bootstraps.
//! * `flotilla-fleet status` shows what `state.json` describes and whether it runs.
//! * `flotilla-fleet down` kills them (by process group) and removes their folders.
//!
//! `scripts/fleet-up` / `scripts/fleet-down` wrap this binary.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use flotilla_testkit::process::{group_alive, signal_group};
use flotilla_testkit::{DetachedEtcd, DetachedKafkaCluster, EtcdServer, KafkaFleet};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Local etcd + Kafka fleet for flotilla (detached processes)")]
struct Cli {
    /// Folder for the servers' folders and state.json.
    #[arg(long, env = "FLOTILLA_FLEET_DIR")]
    base: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start N single-node Kafka clusters (and etcd with --etcd), detached.
    Up {
        /// Number of Kafka clusters.
        n: usize,
        /// Also start an etcd for the registry.
        #[arg(long)]
        etcd: bool,
    },
    /// Kill every process of the fleet and remove its folders.
    Down,
    /// Print the fleet described by state.json and whether its processes run.
    Status,
    /// Start ONE more single-node Kafka cluster, detached, outside the fleet;
    /// print its bootstrap address (alone, on stdout). Used by `scripts/provision-kafka`.
    StartOne,
    /// Kill the cluster `start-one` started at this bootstrap address and remove
    /// its folder. Used by `scripts/deprovision-kafka`.
    StopOne {
        /// The bootstrap address `start-one` printed.
        bootstrap: String,
    },
}

/// `.cache/fleet/state.json`.
#[derive(Serialize, Deserialize)]
struct State {
    /// Seconds the start-up took (etcd and Kafka in parallel).
    startup_secs: f64,
    /// The registry, when started with `--etcd`.
    etcd: Option<DetachedEtcd>,
    /// The Kafka clusters.
    clusters: Vec<DetachedKafkaCluster>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let base = cli
        .base
        .unwrap_or_else(|| flotilla_testkit::repo_root().join(".cache/fleet"));
    let state_path = base.join("state.json");
    match cli.command {
        Cmd::Up { n, etcd } => up(&base, &state_path, n, etcd),
        Cmd::Down => down(&base, &state_path),
        Cmd::Status => status(&state_path),
        Cmd::StartOne => start_one(&base.join("single")),
        Cmd::StopOne { bootstrap } => stop_one(&base.join("single"), &bootstrap),
    }
}

/// `single/<port>.json` for the cluster `start-one` started at `bootstrap`.
fn single_state(dir: &Path, bootstrap: &str) -> Result<PathBuf> {
    let port = bootstrap
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("`{bootstrap}` is not host:port"))?;
    Ok(dir.join(format!("{port}.json")))
}

fn start_one(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    flotilla_testkit::process::set_outlive_process(true);
    let cluster = KafkaFleet::start_in(1, dir)
        .context("start a Kafka cluster")?
        .into_detached()
        .remove(0);
    let path = single_state(dir, &cluster.bootstrap)?;
    std::fs::write(&path, serde_json::to_string_pretty(&cluster)?)
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!(
        "started Kafka cluster {} (kafka cluster id {}, pid {}, state {})",
        cluster.bootstrap,
        cluster.kafka_cluster_id,
        cluster.pid,
        path.display()
    );
    println!("{}", cluster.bootstrap);
    Ok(())
}

fn stop_one(dir: &Path, bootstrap: &str) -> Result<()> {
    let path = single_state(dir, bootstrap)?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("no cluster started by start-one at {bootstrap}; nothing to stop");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let c: DetachedKafkaCluster =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    if runs_in(c.pid, &c.dir) {
        signal_group(c.pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs_in(c.pid, &c.dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if c.dir.starts_with(dir) && c.dir.exists() {
        std::fs::remove_dir_all(&c.dir).with_context(|| format!("remove {}", c.dir.display()))?;
    }
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    eprintln!("stopped Kafka cluster {bootstrap}");
    Ok(())
}

fn read_state(path: &Path) -> Result<Option<State>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Whether `pid` still runs the server that lives in `dir` (guards against pid reuse).
fn runs_in(pid: i32, dir: &Path) -> bool {
    if !group_alive(pid) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => String::from_utf8_lossy(&raw).contains(&*dir.to_string_lossy()),
        // No /proc: trust the pid.
        Err(_) => true,
    }
}

fn up(base: &Path, state_path: &Path, n: usize, with_etcd: bool) -> Result<()> {
    if let Some(state) = read_state(state_path)? {
        let alive = state.etcd.iter().any(|e| runs_in(e.pid, &e.dir))
            || state.clusters.iter().any(|c| runs_in(c.pid, &c.dir));
        if alive {
            bail!(
                "a fleet is already up ({}); run scripts/fleet-down first",
                state_path.display()
            );
        }
        // Left-overs of a fleet that died: clean up before starting anew.
        down(base, state_path)?;
    }
    std::fs::create_dir_all(base).with_context(|| format!("create {}", base.display()))?;
    // The servers must survive this command's exit.
    flotilla_testkit::process::set_outlive_process(true);
    let started = Instant::now();
    let (etcd, kafka) = std::thread::scope(|s| {
        let etcd = s.spawn(|| with_etcd.then(|| EtcdServer::start_in(base)));
        let kafka = KafkaFleet::start_in(n, base);
        (etcd.join().expect("etcd start-up thread"), kafka)
    });
    // On any error the already started servers are dropped, i.e. killed and removed.
    let etcd = etcd.transpose().context("start etcd")?;
    let kafka = kafka.context("start Kafka clusters")?;
    let state = State {
        startup_secs: started.elapsed().as_secs_f64(),
        etcd: etcd.map(EtcdServer::into_detached),
        clusters: kafka.into_detached(),
    };
    std::fs::write(state_path, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("write {}", state_path.display()))?;
    print_state(&state, state_path);
    Ok(())
}

fn print_state(state: &State, state_path: &Path) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet up in {:.1} s (state: {})",
        state.startup_secs,
        state_path.display()
    );
    if let Some(etcd) = &state.etcd {
        let _ = writeln!(out, "registry  {}  (etcd pid {})", etcd.endpoint, etcd.pid);
    }
    for c in &state.clusters {
        let _ = writeln!(
            out,
            "cluster {}  {}  (kafka cluster id {}, pid {})",
            c.index, c.bootstrap, c.kafka_cluster_id, c.pid
        );
    }
    if let Some(etcd) = &state.etcd {
        let _ = writeln!(out, "export FLOTILLA_ENDPOINTS={}", etcd.endpoint);
    }
    let bootstraps: Vec<&str> = state
        .clusters
        .iter()
        .map(|c| c.bootstrap.as_str())
        .collect();
    let _ = writeln!(
        out,
        "export FLOTILLA_KAFKA_BOOTSTRAPS={}",
        bootstraps.join(",")
    );
    // The fleet is up and state.json written: a closed stdout (`| head`) is no error.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
}

fn down(base: &Path, state_path: &Path) -> Result<()> {
    let Some(state) = read_state(state_path)? else {
        println!("no fleet ({} not found)", state_path.display());
        return Ok(());
    };
    let mut servers: Vec<(String, i32, PathBuf)> = Vec::new();
    if let Some(e) = &state.etcd {
        servers.push((format!("etcd {}", e.endpoint), e.pid, e.dir.clone()));
    }
    for c in &state.clusters {
        servers.push((
            format!("cluster {} {}", c.index, c.bootstrap),
            c.pid,
            c.dir.clone(),
        ));
    }
    for (name, pid, dir) in &servers {
        if runs_in(*pid, dir) {
            signal_group(*pid, libc::SIGKILL);
            println!("killed {name} (process group {pid})");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (name, pid, dir) in &servers {
        while runs_in(*pid, dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if runs_in(*pid, dir) {
            eprintln!("warning: {name} (pid {pid}) still running");
        }
        // Only ever remove folders inside the fleet folder.
        if dir.starts_with(base) && dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        }
    }
    std::fs::remove_file(state_path).with_context(|| format!("remove {}", state_path.display()))?;
    println!("fleet down");
    Ok(())
}

fn status(state_path: &Path) -> Result<()> {
    let Some(state) = read_state(state_path)? else {
        println!("no fleet ({} not found)", state_path.display());
        return Ok(());
    };
    let word = |up: bool| if up { "running" } else { "DOWN" };
    if let Some(e) = &state.etcd {
        println!("registry  {}  {}", e.endpoint, word(runs_in(e.pid, &e.dir)));
    }
    for c in &state.clusters {
        println!(
            "cluster {}  {}  {}  (kafka cluster id {})",
            c.index,
            c.bootstrap,
            word(runs_in(c.pid, &c.dir)),
            c.kafka_cluster_id
        );
    }
    Ok(())
}
