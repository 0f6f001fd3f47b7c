//! Replay and wait progress: indicatif bars on a terminal, log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Always bars (on stderr).
    Bars,
    /// Always log lines (every few seconds).
    Lines,
    /// Nothing.
    Quiet,
}

impl ProgressMode {
    fn bars(self) -> Option<bool> {
        match self {
            ProgressMode::Auto => Some(std::io::stderr().is_terminal()),
            ProgressMode::Bars => Some(true),
            ProgressMode::Lines => Some(false),
            ProgressMode::Quiet => None,
        }
    }
}

/// Counters of one source partition, bumped by its copy worker.
#[derive(Debug)]
pub(crate) struct PartCounter {
    pub partition: i32,
    pub total: u64,
    pub done: AtomicU64,
    pub bytes: AtomicU64,
}

/// A running progress display; [`Reporter::finish`] stops it.
pub(crate) struct Reporter {
    stop: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

impl Reporter {
    /// Shows replay progress of `parts` (per partition and in total).
    pub(crate) fn replay(mode: ProgressMode, name: &str, parts: Vec<Arc<PartCounter>>) -> Reporter {
        let stop = Arc::new(tokio::sync::Notify::new());
        // Where this run starts (resumed partitions are not at zero): rates count from here.
        let first: Vec<u64> = parts
            .iter()
            .map(|p| p.done.load(Ordering::Relaxed))
            .collect();
        let task = mode.bars().map(|bars| {
            let stop = stop.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                if bars {
                    replay_bars(&name, &parts, &first, &stop).await
                } else {
                    replay_lines(&name, &parts, &stop).await
                }
            })
        });
        Reporter { stop, task }
    }

    /// Stops the display (drawing a last state).
    pub(crate) async fn finish(mut self) {
        self.stop.notify_one();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn replay_bars(
    name: &str,
    parts: &[Arc<PartCounter>],
    first: &[u64],
    stop: &tokio::sync::Notify,
) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {human_pos:>9}/{human_len:<9} eta {eta:>4}  {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let total_len: u64 = parts.iter().map(|p| p.total).sum();
    let total = multi.add(ProgressBar::new(total_len).with_style(style.clone()));
    total.set_prefix(format!("{name} total"));
    let bars: Vec<ProgressBar> = parts
        .iter()
        .map(|p| {
            let b = multi.add(ProgressBar::new(p.total).with_style(style.clone()));
            b.set_prefix(format!("partition {}", p.partition));
            b
        })
        .collect();
    let started = Instant::now();
    let msg = |done: u64, bytes: u64| {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{}, {:.0} records/s, {:.1} MB/s",
            human_bytes(bytes),
            done as f64 / secs,
            bytes as f64 / secs / 1e6
        )
    };
    let update = || {
        let (mut n, mut new, mut by) = (0, 0, 0);
        for ((p, b), f) in parts.iter().zip(&bars).zip(first.iter()) {
            let d = p.done.load(Ordering::Relaxed);
            let bytes = p.bytes.load(Ordering::Relaxed);
            b.set_position(d);
            b.set_message(msg(d.saturating_sub(*f), bytes));
            n += d;
            new += d.saturating_sub(*f);
            by += bytes;
        }
        total.set_position(n);
        total.set_message(msg(new, by));
    };
    loop {
        update();
        tokio::select! {
            _ = stop.notified() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    update();
    for b in &bars {
        b.finish();
    }
    total.finish();
}

async fn replay_lines(name: &str, parts: &[Arc<PartCounter>], stop: &tokio::sync::Notify) {
    let started = Instant::now();
    let total: u64 = parts.iter().map(|p| p.total).sum();
    let start_done: u64 = parts.iter().map(|p| p.done.load(Ordering::Relaxed)).sum();
    let line = |last: bool| {
        let done: u64 = parts.iter().map(|p| p.done.load(Ordering::Relaxed)).sum();
        let bytes: u64 = parts.iter().map(|p| p.bytes.load(Ordering::Relaxed)).sum();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = (done - start_done) as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", (total.saturating_sub(done)) as f64 / rate)
        } else {
            "?".into()
        };
        let per_part: Vec<String> = parts
            .iter()
            .map(|p| {
                format!(
                    "p{}={}/{}",
                    p.partition,
                    p.done.load(Ordering::Relaxed),
                    p.total
                )
            })
            .collect();
        tracing::info!(
            "backfill {name}: {}{done}/{total} records ({:.0}%), {}, {rate:.0} records/s, {:.1} MB/s, eta {eta} [{}]",
            if last { "replayed " } else { "" },
            if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
            human_bytes(bytes),
            bytes as f64 / secs / 1e6,
            per_part.join(" ")
        );
    };
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => line(false),
        }
    }
    line(true);
}

/// Shows the wait phase's lag (a spinner on a terminal, log lines otherwise).
pub(crate) struct LagDisplay {
    bar: Option<ProgressBar>,
    lines: bool,
    last: Option<Instant>,
    name: String,
}

impl LagDisplay {
    pub(crate) fn new(mode: ProgressMode, name: &str, total: u64) -> LagDisplay {
        let (bar, lines) = match mode.bars() {
            Some(true) => {
                let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>14} [{bar:30}] {human_pos:>9}/{human_len:<9} consumed  {msg}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_prefix(format!("{name} wait"));
                (Some(b), false)
            }
            Some(false) => (None, true),
            None => (None, false),
        };
        LagDisplay {
            bar,
            lines,
            last: None,
            name: name.to_string(),
        }
    }

    pub(crate) fn update(&mut self, total: u64, lag: u64, detail: &str) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(total.saturating_sub(lag));
            b.set_message(detail.to_string());
        }
        if self.lines
            && self
                .last
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last = Some(Instant::now());
            tracing::info!(
                "backfill {}: waiting for consumers, lag {lag} of {total} records ({detail})",
                self.name
            );
        }
    }

    pub(crate) fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bars_and_lines_run_and_finish() {
        for mode in [ProgressMode::Bars, ProgressMode::Lines, ProgressMode::Quiet] {
            let parts: Vec<Arc<PartCounter>> = (0..3)
                .map(|p| {
                    Arc::new(PartCounter {
                        partition: p,
                        total: 100,
                        done: AtomicU64::new(0),
                        bytes: AtomicU64::new(0),
                    })
                })
                .collect();
            let r = Reporter::replay(mode, "t", parts.clone());
            for p in &parts {
                p.done.store(100, Ordering::Relaxed);
                p.bytes.store(12_345, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            r.finish().await;
            let mut lag = LagDisplay::new(mode, "t", 300);
            lag.update(300, 10, "g@tmp1: 10");
            lag.update(300, 0, "");
            lag.finish();
        }
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
    }
}
