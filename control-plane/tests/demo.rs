//! The README's first command must keep working: run the demo (embedded mock
//! clusters, in-memory registry) and check its closing summary.

use std::process::Command;

fn summary_value(out: &str, label: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in the demo output:\n{out}"));
    let value = line[label.len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default();
    value
        .parse()
        .unwrap_or_else(|_| panic!("bad `{label}` line: {line}"))
}

#[test]
fn demo_runs_and_loses_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["demo", "--records", "4000", "--keys", "100"])
        .output()
        .expect("run flotilla demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let produced = summary_value(&stdout, "records produced and acknowledged:");
    // 4,000 live records plus the 5,000 history records the demo backfills.
    assert_eq!(produced, 9000);
    assert_eq!(summary_value(&stdout, "records consumed:"), produced);
    assert_eq!(summary_value(&stdout, "lost:"), 0);
    assert_eq!(summary_value(&stdout, "out of order (per key):"), 0);
    assert!(
        stdout.contains("backfill replay-history: Done; temporary cluster t1 is retired"),
        "the backfill completes and retires its temporary cluster:\n{stdout}"
    );
    assert!(
        stdout.contains("cluster a retired"),
        "the demo retires clusters:\n{stdout}"
    );
}
