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

/// Per thread of this process (by name and id): time on a CPU, time waiting
/// on a run queue (runnable, not running) and time slices so far, in ns
/// (`/proc/self/task/*/schedstat`).
pub fn thread_sched() -> std::collections::BTreeMap<String, (u64, u64, u64)> {
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
        if let [run, wait, slices] = v[..] {
            let key = format!("{}/{}", comm.trim(), e.file_name().to_string_lossy());
            m.insert(key, (run, wait, slices));
        }
    }
    m
}

/// The threads busy over `wall` since `before` ([`thread_sched`]), as
/// "name/tid: run R% runq Q% slices N": R is the share of `wall` the thread
/// ran, Q the share it was runnable but waited for a CPU.
pub fn thread_sched_report(
    before: &std::collections::BTreeMap<String, (u64, u64, u64)>,
    wall: Duration,
) -> String {
    let wall = wall.as_nanos().max(1) as f64;
    let mut out = Vec::new();
    for (k, (run, wait, n)) in thread_sched() {
        let (r0, w0, n0) = before.get(&k).copied().unwrap_or((0, 0, 0));
        let run = run.saturating_sub(r0) as f64 * 100.0 / wall;
        let wait = wait.saturating_sub(w0) as f64 * 100.0 / wall;
        if run > 3.0 || wait > 3.0 {
            out.push(format!(
                "{k}: run {run:.0}% runq {wait:.0}% slices {}",
                n.saturating_sub(n0)
            ));
        }
    }
    out.join("; ")
}
