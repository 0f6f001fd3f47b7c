//! Summaries over many seeded runs: text for the terminal, Markdown for a report file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::config::Config;
use crate::history::AnomalyKind;
use crate::world::RunResult;

/// Aggregate of many runs.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Virtual time simulated over all seeds, in ms.
    pub sim_ms: u64,
    /// Anomalies by kind, over all seeds.
    pub anomalies: BTreeMap<AnomalyKind, u64>,
    /// Seeds with at least one anomaly, with their kinds.
    pub failing: Vec<(u64, Vec<AnomalyKind>)>,
    /// Pause of every sealed switch (proposal to seal), in ms.
    pub pauses: Vec<u64>,
    /// Every producer hold (ms): the pause the application sees.
    pub holds: Vec<u64>,
    /// Slowest switch: (pause ms, seed, epoch).
    pub slowest: Option<(u64, u64, u64)>,
    /// Aborted proposals.
    pub aborted: u64,
    /// Records created, acknowledged, delivered.
    pub records: (u64, u64, u64),
    /// Allowed stragglers and idempotent dedups.
    pub stragglers: u64,
    /// Duplicate appends removed by idempotence.
    pub deduped: u64,
    /// Events processed.
    pub events: u64,
    /// Faults injected by kind.
    pub faults: BTreeMap<String, u64>,
}

impl Summary {
    /// Adds one run.
    pub fn add(&mut self, r: &RunResult) {
        self.seeds += 1;
        self.sim_ms += r.sim_ms;
        let kinds = r.anomalies.by_kind();
        for (k, n) in &kinds {
            *self.anomalies.entry(*k).or_insert(0) += n;
        }
        if !kinds.is_empty() {
            self.failing.push((r.seed, kinds.keys().copied().collect()));
        }
        for &(epoch, pause) in &r.stats.switches {
            self.pauses.push(pause);
            if self.slowest.is_none_or(|(p, _, _)| pause > p) {
                self.slowest = Some((pause, r.seed, epoch));
            }
        }
        self.holds.extend_from_slice(&r.stats.holds);
        self.aborted += r.stats.aborted;
        self.records.0 += r.stats.records;
        self.records.1 += r.stats.acked;
        self.records.2 += r.stats.consumed;
        self.stragglers += r.stats.stragglers;
        self.deduped += r.stats.deduped;
        self.events += r.stats.events;
        for (f, n) in &r.stats.faults {
            *self.faults.entry(f.to_string()).or_insert(0) += n;
        }
    }

    /// Multi-line text summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "seeds run:        {}", self.seeds);
        let _ = writeln!(
            s,
            "simulated hours:  {:.2}",
            self.sim_ms as f64 / 3_600_000.0
        );
        let _ = writeln!(s, "events:           {}", self.events);
        let _ = writeln!(
            s,
            "records:          {} created, {} acknowledged, {} delivered",
            self.records.0, self.records.1, self.records.2
        );
        let _ = writeln!(
            s,
            "switches:         {} sealed, {} aborted; stragglers {}, idempotent dedups {}",
            self.pauses.len(),
            self.aborted,
            self.stragglers,
            self.deduped
        );
        if let (Some(p50), Some(p99), Some(max)) = (
            percentile(&self.holds, 50),
            percentile(&self.holds, 99),
            percentile(&self.holds, 100),
        ) {
            let _ = writeln!(
                s,
                "producer holds:   {} (p50 {p50} ms, p99 {p99} ms, max {max} ms)",
                self.holds.len()
            );
        }
        if let Some((p, seed, e)) = self.slowest {
            let _ = writeln!(s, "slowest switch:   {p} ms (seed {seed}, epoch {e})");
        }
        if !self.faults.is_empty() {
            let f: Vec<String> = self
                .faults
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "faults injected:  {}", f.join(" "));
        }
        if self.anomalies.is_empty() {
            let _ = writeln!(s, "anomalies:        none");
        } else {
            let _ = writeln!(s, "anomalies:");
            for (k, n) in &self.anomalies {
                let _ = writeln!(s, "  {k:<26} {n}");
            }
            let seeds: Vec<String> = self
                .failing
                .iter()
                .take(20)
                .map(|(s, _)| s.to_string())
                .collect();
            let _ = writeln!(
                s,
                "failing seeds ({}): {}",
                self.failing.len(),
                seeds.join(" ")
            );
        }
        s
    }

    /// The switch pause distribution as a text histogram (power-of-two buckets).
    pub fn histogram(&self) -> String {
        histogram(&self.pauses)
    }

    /// Percentile of the switch pauses (`q` in 0..=100).
    pub fn pause_percentile(&self, q: u64) -> Option<u64> {
        percentile(&self.pauses, q)
    }

    /// A Markdown report.
    pub fn markdown(&self, cfg: &Config, wall_secs: f64) -> String {
        markdown(self, cfg, wall_secs)
    }
}

/// A text histogram of `values` (ms) in power-of-two buckets.
pub fn histogram(values: &[u64]) -> String {
    let mut buckets: BTreeMap<u32, u64> = BTreeMap::new();
    for &p in values {
        let b = 64 - p.max(1).leading_zeros();
        *buckets.entry(b).or_insert(0) += 1;
    }
    let max = buckets.values().copied().max().unwrap_or(1);
    let mut s = String::new();
    for (b, n) in &buckets {
        let lo = if *b == 1 { 0 } else { 1u64 << (b - 1) };
        let hi = (1u64 << b) - 1;
        let bar = "#".repeat(((n * 50).div_ceil(max)) as usize);
        let _ = writeln!(s, "{lo:>7}-{hi:<7} ms | {n:>7} {bar}");
    }
    s
}

/// The `q`-th percentile (0..=100) of `values`.
pub fn percentile(values: &[u64], q: u64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let i = ((v.len() - 1) as u64 * q / 100) as usize;
    Some(v[i])
}

fn distribution(s: &mut String, title: &str, values: &[u64]) {
    let _ = writeln!(s, "## {title}\n");
    if let (Some(p50), Some(p99), Some(max)) = (
        percentile(values, 50),
        percentile(values, 99),
        percentile(values, 100),
    ) {
        let _ = writeln!(
            s,
            "{} samples: p50 {p50} ms, p99 {p99} ms, max {max} ms\n",
            values.len()
        );
    }
    let _ = writeln!(s, "```text\n{}```\n", histogram(values));
}

fn markdown(sum: &Summary, cfg: &Config, wall_secs: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# flotilla-sim report\n");
    let _ = writeln!(
        s,
        "- seeds: {}\n- faults: {}\n- schedule: {} producers, {} consumers, {} partitions, {} s active + {} s drain per seed\n- wall time: {:.1} s ({:.0} seeds/hour)\n",
        sum.seeds,
        cfg.faults,
        cfg.producers,
        cfg.consumers,
        cfg.partitions,
        cfg.active_ms / 1000,
        cfg.drain_ms / 1000,
        wall_secs,
        sum.seeds as f64 * 3600.0 / wall_secs.max(1e-9)
    );
    let _ = writeln!(s, "## Summary\n\n```text\n{}```\n", sum.text());
    distribution(&mut s, "Switch pause (proposal → seal)", &sum.pauses);
    distribution(
        &mut s,
        "Producer hold (topic held → released, per producer)",
        &sum.holds,
    );
    let _ = writeln!(s, "## Anomalies\n");
    if sum.failing.is_empty() {
        let _ = writeln!(s, "None.");
    } else {
        let _ = writeln!(s, "| seed | kinds |\n| --- | --- |");
        for (seed, kinds) in sum.failing.iter().take(100) {
            let k: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            let _ = writeln!(s, "| {seed} | {} |", k.join(", "));
        }
        let _ = writeln!(
            s,
            "\nReplay one with `flotilla-sim replay --seed <seed>` and the same flags."
        );
    }
    s
}
