//! Summaries over many seeded runs: text for the terminal, Markdown for a
//! report file, and two SVG plots next to it (the switch pause distribution
//! and the group's lag over time in the worst seed), drawn by hand — a few
//! rectangles, a polyline and text, no plotting dependency.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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
    /// The lag series of the seed with the highest peak group lag: (seed,
    /// samples of (virtual ms, records not yet committed)).
    pub worst_lag: Option<(u64, Vec<(u64, u64)>)>,
    /// Backfills (`--backfill`): (seeds where it ran, done, records copied,
    /// temporary clusters retired, copy-worker crashes).
    pub backfills: (u64, u64, u64, u64, u64),
    /// Every fence wait (ms): a member's partition with a record it could
    /// not deliver yet, until it delivered from it again.
    pub fence_waits: Vec<u64>,
    /// Pre-join: (clusters pre-joined, of them gated by a seal, records held,
    /// held records dropped on an abort).
    pub prejoin: (u64, u64, u64, u64),
    /// Auto-commit: (periodic commits, commits at fence ends, deliveries
    /// undone by a crash before their commit, commits at route changes that
    /// showed fences not committed up to).
    pub commits: (u64, u64, u64, u64),
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
        if r.stats.backfill_copied > 0 {
            let b = &mut self.backfills;
            b.0 += 1;
            b.1 += u64::from(r.stats.backfill_done);
            b.2 += r.stats.backfill_copied;
            b.3 += r.stats.backfill_retired;
            b.4 += r.stats.backfill_crashes;
        }
        self.fence_waits.extend_from_slice(&r.stats.fence_waits);
        let st = &r.stats;
        let pj = &mut self.prejoin;
        pj.0 += st.prejoins;
        pj.1 += st.prejoins_gated;
        pj.2 += st.parked;
        pj.3 += st.parked_dropped;
        let c = &mut self.commits;
        c.0 += st.periodic_commits;
        c.1 += st.fence_commits;
        c.2 += st.redelivered;
        c.3 += st.seal_commits;
        for (f, n) in &r.stats.faults {
            *self.faults.entry(f.to_string()).or_insert(0) += n;
        }
        let peak = |l: &[(u64, u64)]| l.iter().map(|&(_, v)| v).max().unwrap_or(0);
        if !r.stats.lag.is_empty()
            && self
                .worst_lag
                .as_ref()
                .is_none_or(|(_, l)| peak(&r.stats.lag) > peak(l))
        {
            self.worst_lag = Some((r.seed, r.stats.lag.clone()));
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
        if let Some(line) = self.fence_wait_line() {
            let _ = writeln!(s, "fence waits:      {line}");
        }
        let (joined, gated, parked, dropped) = self.prejoin;
        if joined > 0 {
            let _ = writeln!(
                s,
                "pre-joins:        {joined} clusters ({gated} sealed, the rest aborted or retired); \
                 {parked} records held until the seal, {dropped} dropped on an abort"
            );
        }
        let (periodic, at_fence, undone, at_seal) = self.commits;
        if periodic + at_fence + at_seal > 0 {
            let _ = writeln!(
                s,
                "auto-commits:     {periodic} periodic, {at_fence} at fence ends, \
                 {at_seal} at new fences; \
                 {undone} deliveries not committed before a crash (delivered again)"
            );
        }
        if !self.faults.is_empty() {
            let f: Vec<String> = self
                .faults
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "faults injected:  {}", f.join(" "));
        }
        let (ran, done, copied, retired, crashes) = self.backfills;
        if ran > 0 {
            let _ = writeln!(
                s,
                "backfills:        {done}/{ran} done, {copied} records copied, \
                 {retired} temporary clusters retired, {crashes} copy-worker crashes"
            );
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

    /// The fence waits as `N (mean …, p50 …, p99 …, max …)`, if any.
    pub fn fence_wait_line(&self) -> Option<String> {
        let w = &self.fence_waits;
        let (p50, p99, max) = (percentile(w, 50)?, percentile(w, 99)?, percentile(w, 100)?);
        let mean = w.iter().sum::<u64>() as f64 / w.len() as f64;
        Some(format!(
            "{} (mean {mean:.1} ms, p50 {p50} ms, p99 {p99} ms, max {max} ms)",
            w.len()
        ))
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
        markdown(self, cfg, wall_secs, None)
    }

    /// The switch pause distribution as an SVG histogram (power-of-two
    /// buckets, as [`histogram`]; proposal → seal and producer holds side by
    /// side).
    pub fn pause_svg(&self) -> String {
        pause_svg(&self.pauses, &self.holds)
    }

    /// The group's lag over time in the worst seed as an SVG line plot
    /// (`None` without any sample).
    /// `heal_ms` (the end of the active phase, when every fault heals) is
    /// marked with a dashed line.
    pub fn lag_svg(&self, heal_ms: u64) -> Option<String> {
        self.worst_lag
            .as_ref()
            .map(|(seed, lag)| lag_svg(*seed, lag, heal_ms))
    }

    /// Writes the Markdown report to `path` and the plots next to it:
    /// `<stem>-pause.svg` and `<stem>-lag.svg` (`sim-report.md` →
    /// `sim-report-pause.svg`), linked from the Markdown. Returns the SVG paths.
    pub fn write_report(
        &self,
        path: &Path,
        cfg: &Config,
        wall_secs: f64,
    ) -> std::io::Result<Vec<PathBuf>> {
        let (pause, lag) = plot_paths(path);
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        std::fs::write(&pause, self.pause_svg())?;
        let mut written = vec![pause.clone()];
        let lag_name = match self.lag_svg(cfg.active_ms) {
            Some(svg) => {
                std::fs::write(&lag, svg)?;
                written.push(lag.clone());
                Some(name(&lag))
            }
            None => None,
        };
        let plots = Plots {
            pause: name(&pause),
            lag: lag_name,
        };
        std::fs::write(path, markdown(self, cfg, wall_secs, Some(&plots)))?;
        Ok(written)
    }
}

/// Where [`Summary::write_report`] puts the plots of the report at `path`:
/// (`<stem>-pause.svg`, `<stem>-lag.svg`) in the same folder.
pub fn plot_paths(path: &Path) -> (PathBuf, PathBuf) {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let dir = path.parent().unwrap_or(Path::new(""));
    (
        dir.join(format!("{stem}-pause.svg")),
        dir.join(format!("{stem}-lag.svg")),
    )
}

/// File names of the plots, for the Markdown links.
struct Plots {
    pause: String,
    lag: Option<String>,
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

fn markdown(sum: &Summary, cfg: &Config, wall_secs: f64, plots: Option<&Plots>) -> String {
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
    if let Some(p) = plots {
        let _ = writeln!(s, "## Plots\n");
        let _ = writeln!(
            s,
            "![switch pause and producer hold distribution]({})\n",
            p.pause
        );
        if let (Some(lag), Some((seed, _))) = (&p.lag, &sum.worst_lag) {
            let _ = writeln!(
                s,
                "![group lag over time, seed {seed} (highest peak lag)]({lag})\n"
            );
        }
    }
    distribution(&mut s, "Switch pause (proposal → seal)", &sum.pauses);
    distribution(
        &mut s,
        "Producer hold (topic held → released, per producer)",
        &sum.holds,
    );
    if !sum.fence_waits.is_empty() {
        distribution(
            &mut s,
            "Fence wait (a member's next record held back → delivered, per partition)",
            &sum.fence_waits,
        );
    }
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

// ------------------------------------------------------------------ SVG

/// Plot area: width, height and margins (left, right, top, bottom) in px.
const W: f64 = 720.0;
const H: f64 = 360.0;
const ML: f64 = 70.0;
const MR: f64 = 20.0;
const MT: f64 = 64.0;
const MB: f64 = 60.0;

fn svg_open(s: &mut String, title: &str) {
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"##,
        W / 2.0,
        xml(title)
    );
}

fn axes(s: &mut String, x_label: &str, y_label: &str) {
    let _ = writeln!(
        s,
        r##"<path d="M{ML},{MT} V{} H{}" fill="none" stroke="#333333"/>"##,
        H - MB,
        W - MR
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
        ML + (W - ML - MR) / 2.0,
        H - 12.0,
        xml(x_label)
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"##,
        MT + (H - MT - MB) / 2.0,
        MT + (H - MT - MB) / 2.0,
        xml(y_label)
    );
}

/// A round tick step (1, 2 or 5 × 10^k) giving about four steps up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 4.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Y ticks at round values up to `max`, with horizontal grid lines; returns
/// the axis top (the largest tick, ≥ `max`), which maps to the plot's top.
fn y_ticks(s: &mut String, max: f64, fmt: impl Fn(f64) -> String) -> f64 {
    let step = nice_step(max);
    let n = (max / step).ceil().max(1.0) as u32;
    let top = step * n as f64;
    for i in 0..=n {
        let v = step * i as f64;
        let y = H - MB - (H - MT - MB) * v / top;
        let _ = writeln!(
            s,
            r##"<line x1="{ML}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - MR,
            ML - 6.0,
            y + 4.0,
            fmt(v)
        );
    }
    top
}

fn xml(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Power-of-two bucket of a value in ms (as [`histogram`]): bucket `b` holds
/// `2^(b-1) ..= 2^b - 1` (bucket 1 also holds 0).
fn bucket(v: u64) -> u32 {
    64 - v.max(1).leading_zeros()
}

fn bucket_label(b: u32) -> String {
    let lo = if b == 1 { 0 } else { 1u64 << (b - 1) };
    lo.to_string()
}

/// Histogram of switch pauses and producer holds (ms) in power-of-two
/// buckets, two bars per bucket, as a share of each series (the two have very
/// different counts). Every bar carries its bucket and count as `data-*`
/// attributes, and a `<title>` tooltip.
fn pause_svg(pauses: &[u64], holds: &[u64]) -> String {
    let series: [(&str, &str, &[u64]); 2] = [
        ("switch pause (proposal → seal)", "#3b6fb6", pauses),
        ("producer hold", "#e08a2c", holds),
    ];
    let counts: Vec<BTreeMap<u32, u64>> = series
        .iter()
        .map(|(_, _, v)| {
            let mut m = BTreeMap::new();
            for &x in v.iter() {
                *m.entry(bucket(x)).or_insert(0u64) += 1;
            }
            m
        })
        .collect();
    let lo = counts
        .iter()
        .flat_map(|m| m.keys().next().copied())
        .min()
        .unwrap_or(1);
    let hi = counts
        .iter()
        .flat_map(|m| m.keys().next_back().copied())
        .max()
        .unwrap_or(1);
    let share = |i: usize, b: u32| {
        let n = counts[i].get(&b).copied().unwrap_or(0);
        (n, n as f64 / series[i].2.len().max(1) as f64)
    };
    let max_share = (lo..=hi)
        .flat_map(|b| [share(0, b).1, share(1, b).1])
        .fold(0.0f64, f64::max)
        .max(0.01);
    let mut s = String::new();
    svg_open(
        &mut s,
        &format!(
            "Switch pause distribution ({} switches, {} producer holds)",
            pauses.len(),
            holds.len()
        ),
    );
    let max_share = y_ticks(&mut s, max_share * 100.0, |v| format!("{v:.0}%")) / 100.0;
    let slots = (hi - lo + 1) as f64;
    let slot = (W - ML - MR) / slots;
    let bar = slot * 0.38;
    for b in lo..=hi {
        let x0 = ML + slot * (b - lo) as f64;
        for (i, (name, color, _)) in series.iter().enumerate() {
            let (n, sh) = share(i, b);
            let h = (H - MT - MB) * sh / max_share;
            let x = x0 + slot * 0.1 + bar * i as f64;
            let _ = writeln!(
                s,
                r##"<rect class="bar" data-series="{}" data-bucket-ms="{}" data-count="{n}" x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{color}"><title>{}: {n} in {} ms</title></rect>"##,
                if i == 0 { "pause" } else { "hold" },
                bucket_label(b),
                H - MB - h,
                xml(name),
                bucket_label(b)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            x0 + slot / 2.0,
            H - MB + 16.0,
            bucket_label(b)
        );
    }
    axes(
        &mut s,
        "ms (power-of-two buckets: lower bound)",
        "share of the series",
    );
    // The legend sits between the title and the plot.
    for (i, (name, color, v)) in series.iter().enumerate() {
        let y = 40.0 + 16.0 * i as f64;
        let stats = match (percentile(v, 50), percentile(v, 99), percentile(v, 100)) {
            (Some(a), Some(b), Some(c)) => format!(" — p50 {a} ms, p99 {b} ms, max {c} ms"),
            _ => " — no samples".into(),
        };
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{}{}</text>"##,
            ML,
            y - 10.0,
            ML + 18.0,
            y,
            xml(name),
            xml(&stats)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The group lag of one seed over virtual time, as a polyline whose points
/// are the samples (x: seconds, y: records); a dashed line where every fault
/// heals (`heal_ms`).
fn lag_svg(seed: u64, lag: &[(u64, u64)], heal_ms: u64) -> String {
    let t_max = lag.last().map_or(1, |&(t, _)| t).max(1) as f64;
    let v_max = lag.iter().map(|&(_, v)| v).max().unwrap_or(0).max(1) as f64;
    let peak = lag
        .iter()
        .max_by_key(|&&(_, v)| v)
        .copied()
        .unwrap_or((0, 0));
    let mut s = String::new();
    svg_open(
        &mut s,
        &format!(
            "Group lag over time, seed {seed} (peak {} records at {:.1} s)",
            peak.1,
            peak.0 as f64 / 1_000.0
        ),
    );
    let v_top = y_ticks(&mut s, v_max, |v| format!("{v:.0}"));
    let x = |t: f64| ML + (W - ML - MR) * t / t_max;
    let step = nice_step(t_max / 1_000.0 * 4.0 / 6.0) * 1_000.0;
    let mut t = 0.0;
    while t <= t_max {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"##,
            x(t),
            H - MB + 16.0,
            t / 1_000.0
        );
        t += step;
    }
    if (heal_ms as f64) < t_max {
        let hx = x(heal_ms as f64);
        let _ = writeln!(
            s,
            r##"<line class="heal" x1="{hx:.1}" y1="{MT}" x2="{hx:.1}" y2="{}" stroke="#999999" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#666666">faults heal</text>"##,
            H - MB,
            hx + 4.0,
            MT + 12.0
        );
    }
    let points: Vec<String> = lag
        .iter()
        .map(|&(t, v)| {
            format!(
                "{:.1},{:.1}",
                x(t as f64),
                H - MB - (H - MT - MB) * v as f64 / v_top
            )
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline class="lag" data-samples="{}" fill="none" stroke="#3b6fb6" stroke-width="1.5" points="{}"/>"##,
        lag.len(),
        points.join(" ")
    );
    axes(
        &mut s,
        "virtual time (s)",
        "records not yet committed by the group",
    );
    s.push_str("</svg>\n");
    s
}
