//! `flotilla-sim`: run many seeds of the deterministic simulator, or replay one.

use std::io::Write as _;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use flotilla_sim::config::OnAckDeadline;
use flotilla_sim::report::Summary;
use flotilla_sim::{run_seed, Bugs, Config, Faults, LeasePolicy, RunResult};

/// Deterministic chaos simulator of a flotilla fleet, driving the real routing core.
#[derive(Parser)]
#[command(name = "flotilla-sim", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run many seeds and print a summary; on a failure, the seed and a readable trace.
    Run {
        /// How many seeds to run.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 0)]
        first_seed: u64,
        /// Worker threads (each runs whole seeds; results do not depend on it).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Write a Markdown report (switch pause histogram, failing seeds) here,
        /// and its plots next to it (`<stem>-pause.svg`, `<stem>-lag.svg`).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        #[command(flatten)]
        shape: Shape,
    },
    /// Live mode: the same workload and checker against real etcd and real
    /// Kafka clusters started by the test harness, killing and restarting
    /// clusters and etcd on a schedule from the seed (real time: not deterministic).
    Live(LiveArgs),
    /// Rerun one seed and print its full trace.
    Replay {
        /// The seed.
        #[arg(long)]
        seed: u64,
        /// Print every trace line, not only the important ones and the tail.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        shape: Shape,
    },
}

/// Options of `flotilla-sim live`.
#[derive(Args, Clone)]
struct LiveArgs {
    /// Kafka clusters to start (single-node KRaft each).
    #[arg(long, default_value_t = 3)]
    clusters: usize,
    /// FleetProducers.
    #[arg(long, default_value_t = 2)]
    producers: usize,
    /// FleetConsumers in the group.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Minutes of traffic, switches and faults (default 2).
    #[arg(long, conflicts_with = "seconds")]
    minutes: Option<f64>,
    /// Seconds of traffic, switches and faults.
    #[arg(long)]
    seconds: Option<u64>,
    /// Route switches (A → A+B → B → …; at most 2 × (clusters − 1)).
    #[arg(long)]
    switches: Option<usize>,
    /// Comma-separated faults: kill-cluster, kill-etcd, or `all` / `none`;
    /// each strikes once per started minute.
    #[arg(long, default_value = "kill-cluster,kill-etcd")]
    faults: String,
    /// Seed of the schedule.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keys per producer (each sends a record every --pace-ms after its previous ack).
    #[arg(long, default_value_t = 25)]
    keys: u32,
    /// Pause of each key between an acknowledgement and its next record.
    #[arg(long, default_value_t = 500)]
    pace_ms: u64,
    /// After healing, wait at most this long for the group to catch up.
    #[arg(long, default_value_t = 90)]
    catch_up_secs: u64,
    /// Extra rdkafka property for every producer, KEY=VALUE (repeatable).
    #[arg(long = "producer-prop", value_name = "KEY=VALUE")]
    producer_props: Vec<String>,
    /// Write a Markdown report (summary and the run's log) here.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

impl LiveArgs {
    fn config(&self) -> anyhow::Result<flotilla_sim::live::LiveConfig> {
        use std::time::Duration;
        let active = match (self.seconds, self.minutes) {
            (Some(s), _) => Duration::from_secs(s),
            (None, Some(m)) if m.is_nan() || m <= 0.0 => bail!("--minutes must be positive"),
            (None, Some(m)) => Duration::from_secs_f64(m * 60.0),
            (None, None) => Duration::from_secs(120),
        };
        if active.is_zero() {
            bail!("the active phase must be longer than zero");
        }
        let max = flotilla_sim::live::schedule::max_switches(self.clusters);
        let mut producer_props = Vec::new();
        for kv in &self.producer_props {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--producer-prop wants KEY=VALUE, got `{kv}`");
            };
            producer_props.push((k.to_string(), v.to_string()));
        }
        Ok(flotilla_sim::live::LiveConfig {
            clusters: self.clusters,
            producers: self.producers,
            consumers: self.consumers,
            keys_per_producer: self.keys,
            pace: Duration::from_millis(self.pace_ms),
            active,
            switches: self.switches.unwrap_or(max),
            faults: flotilla_sim::live::parse_faults(&self.faults).map_err(anyhow::Error::msg)?,
            seed: self.seed,
            catch_up: Duration::from_secs(self.catch_up_secs),
            producer_props,
            verbose: true,
            ..Default::default()
        })
    }
}

fn live(args: &LiveArgs) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let r = rt.block_on(flotilla_sim::live::run(&cfg))?;
    print!("{}", r.summary());
    if let Some(path) = &args.report {
        std::fs::write(path, r.markdown())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    drop(rt);
    if !r.ok() {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Args, Clone)]
struct Shape {
    /// Comma-separated faults: cluster-loss, partition, registry-outage, zombie,
    /// crash, ambiguous, flap, clock-jump, or `all`.
    #[arg(long, default_value = "none")]
    faults: String,
    /// Virtual minutes of traffic and faults per seed (default 3).
    #[arg(long)]
    minutes: Option<f64>,
    /// Use the short test schedule instead of the realistic one.
    #[arg(long)]
    short: bool,
    /// Use the tiny schedule of the debug test suite.
    #[arg(long, conflicts_with = "short")]
    tiny: bool,
    /// Producers hold (instead of writing on) while their lease is lost.
    #[arg(long)]
    hold_without_lease: bool,
    /// The controller aborts (instead of sealing anyway) when the ack deadline
    /// passes with acknowledgements missing.
    #[arg(long)]
    abort_on_deadline: bool,
    /// Broken variant: answer Flush without waiting (ack too early).
    #[arg(long)]
    bug_skip_flush: bool,
    /// Broken variant: consumers start a new cluster at the high watermark.
    #[arg(long)]
    bug_consumer_latest: bool,
    /// Broken variant: the controller retires before the group passed the fence.
    #[arg(long)]
    bug_retire_early: bool,
    /// Broken variant: consumers ignore the fence gate's limit.
    #[arg(long)]
    bug_ignore_gate: bool,
    /// Turn off the consumer's retired-cluster workaround (finding 1).
    #[arg(long)]
    no_retired_workaround: bool,
    /// Broken variant: the rules before the fix of finding 2 (read sealed
    /// clusters and retire them only up to the fences: stragglers are lost).
    #[arg(long)]
    bug_stragglers_lost: bool,
    /// Broken variant: the controller before the fix of finding 3 (ack
    /// deadline checked against its own wall clock).
    #[arg(long)]
    bug_ack_wall_clock: bool,
    /// Broken variant: retire a drained cluster while late producers of its
    /// last switch may still have records in flight for it.
    #[arg(long)]
    bug_retire_ignores_late: bool,
    /// Broken variant: no Kafka-level write fence before retirement (the
    /// control plane before it; zombie writes after the drained check are lost).
    #[arg(long, alias = "bug-no-write-fence")]
    no_write_fence: bool,
    /// The operator also runs a backfill (temporary clusters, a copy worker
    /// replaying a range into a target topic, drain and retirement).
    #[arg(long)]
    backfill: bool,
    /// Broken variant (with --backfill): the copy worker resumes from its
    /// checkpoint without the dedupe scan (records copied twice).
    #[arg(long)]
    bug_backfill_no_dedupe: bool,
    /// Broken variant (with --backfill): the temporary clusters are drained
    /// as soon as the copy ends, before the group consumed them.
    #[arg(long)]
    bug_backfill_skip_wait: bool,
    /// Consumers do not pre-join the clusters of a pending epoch.
    #[arg(long)]
    no_prejoin: bool,
    /// How long a consumer takes to join the group on a cluster (ms).
    #[arg(long, default_value_t = 150)]
    join_ms: u64,
    /// Auto-commit interval of the consumers (ms).
    #[arg(long, default_value_t = 1_000)]
    auto_commit_ms: u64,
    /// Consumers auto-commit only periodically, not at once after the last
    /// record below a fence end.
    #[arg(long)]
    no_fence_commit: bool,
    /// Consumers do not commit at once when a route change shows fence ends
    /// the group has not committed up to on a cluster they read (they wait
    /// for a delivery that completes a fence, or the periodic commit).
    #[arg(long)]
    no_seal_commit: bool,
    /// The consumer model before pre-join and auto-commit: an exactly-once
    /// sink (process + commit per record), no join delay, no pre-join (the
    /// findings' repro seeds were measured with it).
    #[arg(long)]
    sink_consumer: bool,
    /// Broken variant: records read from a pre-joined cluster are delivered
    /// at once, not held until the seal.
    #[arg(long)]
    bug_prejoin_delivers: bool,
}

impl Shape {
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = if self.tiny {
            Config::tiny()
        } else if self.short {
            Config::short()
        } else {
            Config::default()
        };
        cfg.faults = Faults::parse(&self.faults).map_err(anyhow::Error::msg)?;
        if let Some(m) = self.minutes {
            if m.is_nan() || m <= 0.0 {
                bail!("--minutes must be positive");
            }
            cfg.active_ms = (m * 60_000.0) as u64;
        }
        if self.hold_without_lease {
            cfg.lease_policy = LeasePolicy::Hold;
        }
        cfg.write_fence = !self.no_write_fence;
        if self.abort_on_deadline {
            cfg.on_ack_deadline = OnAckDeadline::Abort;
        }
        cfg.bugs = Bugs {
            skip_flush_before_ack: self.bug_skip_flush,
            consumer_from_latest: self.bug_consumer_latest,
            retire_before_fence: self.bug_retire_early,
            no_retired_workaround: self.no_retired_workaround,
            consumer_ignores_gate: self.bug_ignore_gate,
            stragglers_lost: self.bug_stragglers_lost,
            ack_deadline_wall_clock: self.bug_ack_wall_clock,
            retire_ignores_late_producers: self.bug_retire_ignores_late,
            backfill_no_dedupe: self.bug_backfill_no_dedupe,
            backfill_skip_wait: self.bug_backfill_skip_wait,
            prejoin_delivers: self.bug_prejoin_delivers,
        };
        cfg.backfills = self.backfill;
        cfg.prejoin = !self.no_prejoin;
        cfg.join_ms = self.join_ms;
        cfg.auto_commit_ms = Some(self.auto_commit_ms.max(1));
        cfg.fence_commit = !self.no_fence_commit;
        cfg.seal_commit = !self.no_seal_commit;
        if self.sink_consumer {
            cfg = cfg.sink_consumer();
        }
        Ok(cfg)
    }
}

fn run_many(cfg: &Config, first: u64, seeds: u64, threads: usize) -> Vec<RunResult> {
    let threads = threads.max(1);
    let next = std::sync::atomic::AtomicU64::new(first);
    let mut out: Vec<RunResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seed >= first + seeds {
                            break;
                        }
                        let mut r = run_seed(seed, cfg);
                        r.trace.clear();
                        mine.push(r);
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    out.sort_by_key(|r| r.seed);
    out
}

/// The important lines of a trace (faults, switches, anomalies) plus the last
/// `tail` lines before the first anomaly.
fn minimal_trace(r: &RunResult, tail: usize) -> Vec<String> {
    let first_bad = r
        .trace
        .iter()
        .position(|l| l.contains("! ANOMALY"))
        .unwrap_or(r.trace.len());
    let start = first_bad.saturating_sub(tail);
    let mut anomalies = 0;
    r.trace
        .iter()
        .enumerate()
        .filter(|(i, l)| {
            if l.contains(" ! ") {
                anomalies += 1;
                return anomalies <= 10;
            }
            (*i >= start && *i <= first_bad) || l.contains(" # ")
        })
        .map(|(_, l)| l.clone())
        .collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            seeds,
            first_seed,
            threads,
            report,
            shape,
        } => {
            let cfg = shape.config()?;
            let t0 = Instant::now();
            let results = run_many(&cfg, first_seed, seeds, threads);
            let wall = t0.elapsed().as_secs_f64();
            let mut sum = Summary::default();
            for r in &results {
                sum.add(r);
            }
            print!("{}", sum.text());
            println!(
                "wall time:        {wall:.1} s ({:.0} seeds/hour)",
                seeds as f64 * 3600.0 / wall.max(1e-9)
            );
            if let Some(path) = report {
                let plots = sum
                    .write_report(&path, &cfg, wall)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("report written to {}", path.display());
                for p in plots {
                    println!("plot written to {}", p.display());
                }
            }
            if let Some((seed, _)) = sum.failing.first() {
                let mut c = cfg.clone();
                c.keep_trace = true;
                let r = run_seed(*seed, &c);
                println!("\nfirst failing seed {seed}; minimal trace:");
                for l in minimal_trace(&r, 40).iter().take(400) {
                    println!("{l}");
                }
                for (k, n) in r.anomalies.by_kind() {
                    println!("seed {seed}: {n} x {k}");
                }
                println!(
                    "\nreplay: flotilla-sim replay --seed {seed} with the same flags ({})",
                    std::env::args().skip(2).collect::<Vec<_>>().join(" ")
                );
                std::process::exit(1);
            }
        }
        Cmd::Live(args) => live(&args)?,
        Cmd::Replay { seed, full, shape } => {
            let mut cfg = shape.config()?;
            cfg.keep_trace = true;
            let r = run_seed(seed, &cfg);
            let lines = if full {
                r.trace.clone()
            } else {
                minimal_trace(&r, 60)
            };
            let mut out = std::io::stdout().lock();
            for l in &lines {
                writeln!(out, "{l}")?;
            }
            writeln!(
                out,
                "trace hash {:016x}, {} events",
                r.trace_hash, r.stats.events
            )?;
            if r.anomalies.is_empty() {
                writeln!(out, "no anomaly")?;
            } else {
                for (k, n) in r.anomalies.by_kind() {
                    writeln!(out, "{k}: {n}")?;
                }
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
