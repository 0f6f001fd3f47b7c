//! CPU time and load average for the benchmarks: the client's CPU time per
//! record is less disturbed by other load on a shared machine than its
//! records per second (the broker is another process and is not counted).

#![allow(dead_code)]

use std::time::Duration;

/// User + system CPU time of this process so far (all threads; not the
/// broker, which is another process).
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` has them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// User + system CPU time of another process so far (from `/proc/<pid>/stat`,
/// clock-tick resolution): the broker's share of a benchmark.
pub fn process_cpu_time(pid: i32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may hold spaces: count from after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// The machine's (idle, total) CPU time so far in clock ticks, summed over
/// its cores (`/proc/stat`): how much of the cores nobody used.
pub fn machine_idle_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, v.iter().take(8).sum())
}

/// One thread's scheduling counters so far ([`thread_sched`]).
#[derive(Clone, Copy, Default)]
pub struct ThreadSched {
    /// Time on a CPU, ns.
    pub run: u64,
    /// Time runnable but waiting on a run queue, ns.
    pub wait: u64,
    /// Time slices run.
    pub slices: u64,
    /// Times the thread gave up its CPU itself (blocked: a futex, a
    /// condition variable, I/O).
    pub voluntary: u64,
    /// Times it was preempted.
    pub involuntary: u64,
    /// Times it moved to another CPU.
    pub migrations: u64,
}

/// Per thread of this process (by name and id): its scheduling counters
/// (`/proc/self/task/*/schedstat` and `/proc/self/task/*/sched`).
pub fn thread_sched() -> std::collections::BTreeMap<String, ThreadSched> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return m;
    };
    for e in dir.flatten() {
        let d = e.path();
        let comm = std::fs::read_to_string(d.join("comm")).unwrap_or_default();
        let ss = std::fs::read_to_string(d.join("schedstat")).unwrap_or_default();
        let v: Vec<u64> = ss
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // `sched` lines read "name   :   value".
        let sched = std::fs::read_to_string(d.join("sched")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            sched
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        if let [run, wait, slices] = v[..] {
            let key = format!("{}/{}", comm.trim(), e.file_name().to_string_lossy());
            m.insert(
                key,
                ThreadSched {
                    run,
                    wait,
                    slices,
                    voluntary: field("nr_voluntary_switches"),
                    involuntary: field("nr_involuntary_switches"),
                    migrations: field("se.nr_migrations"),
                },
            );
        }
    }
    m
}

/// The threads busy over `wall` since `before` ([`thread_sched`]), as
/// "name/tid: run R% runq Q% slices N vol V invol I migr M": R is the share
/// of `wall` the thread ran, Q the share it was runnable but waited for a
/// CPU; V, I and M the voluntary and involuntary context switches and the
/// CPU migrations in that time.
pub fn thread_sched_report(
    before: &std::collections::BTreeMap<String, ThreadSched>,
    wall: Duration,
) -> String {
    let wall = wall.as_nanos().max(1) as f64;
    let mut out = Vec::new();
    for (k, now) in thread_sched() {
        let b = before.get(&k).copied().unwrap_or_default();
        let run = now.run.saturating_sub(b.run) as f64 * 100.0 / wall;
        let wait = now.wait.saturating_sub(b.wait) as f64 * 100.0 / wall;
        if run > 3.0 || wait > 3.0 {
            out.push(format!(
                "{k}: run {run:.0}% runq {wait:.0}% slices {} vol {} invol {} migr {}",
                now.slices.saturating_sub(b.slices),
                now.voluntary.saturating_sub(b.voluntary),
                now.involuntary.saturating_sub(b.involuntary),
                now.migrations.saturating_sub(b.migrations),
            ));
        }
    }
    out.join("; ")
}
