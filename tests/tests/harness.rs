//! The harness itself: cleanup on panic, useful start-up errors, and the
//! detached fleet of `flotilla-fleet up/down`.

use flotilla_testkit::process::group_alive;
use flotilla_testkit::{EtcdServer, HarnessError, KafkaFleet, KafkaOptions};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn drop_during_panic_kills_processes_and_removes_folders() {
    let seen: Arc<Mutex<Vec<(i32, PathBuf)>>> = Arc::default();
    let record = Arc::clone(&seen);
    let result = std::thread::spawn(move || {
        let etcd = EtcdServer::start().expect("start etcd");
        let fleet = KafkaFleet::start(1).expect("start Kafka");
        let mut r = record.lock().unwrap();
        r.push((etcd.pid().unwrap(), etcd.dir().to_path_buf()));
        r.push((
            fleet.cluster(0).pid().unwrap(),
            fleet.cluster(0).dir().to_path_buf(),
        ));
        drop(r);
        panic!("a test fails while its servers run");
    })
    .join();
    assert!(result.is_err(), "the thread should have panicked");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for (pid, dir) in seen.iter() {
        assert!(!group_alive(*pid), "process group {pid} survived the panic");
        assert!(!dir.exists(), "{} survived the panic", dir.display());
    }
}

#[test]
fn a_broker_that_dies_at_start_up_is_reported_with_its_log_tail() {
    let base = tempfile::tempdir().expect("temp dir");
    let options = KafkaOptions {
        base_dir: Some(base.path().to_path_buf()),
        extra_properties: vec![(
            "authorizer.class.name".into(),
            "org.example.NoSuchAuthorizer".into(),
        )],
    };
    let err = KafkaFleet::start_with(1, &options).expect_err("broker must not start");
    let msg = err.to_string();
    assert!(matches!(err, HarnessError::Exited { .. }), "{msg}");
    assert!(msg.contains("NoSuchAuthorizer"), "log tail missing: {msg}");
    let left: Vec<_> = std::fs::read_dir(base.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "folders left behind: {left:?}");
}

#[test]
fn fleet_binary_detaches_and_tears_down() {
    let base = tempfile::tempdir().expect("temp dir");
    let fleet = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla-fleet"))
            .arg("--base")
            .arg(base.path())
            .args(args)
            .output()
            .expect("run flotilla-fleet");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "flotilla-fleet {args:?} failed:\n{text}"
        );
        text
    };
    let up = fleet(&["up", "1", "--etcd"]);
    assert!(up.contains("registry  http://127.0.0.1:"), "{up}");
    assert!(up.contains("cluster 0  127.0.0.1:"), "{up}");

    // The command has exited; its servers must still run.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base.path().join("state.json")).expect("state.json"),
    )
    .expect("state.json is JSON");
    let pids: Vec<i32> = [&state["etcd"]["pid"], &state["clusters"][0]["pid"]]
        .iter()
        .map(|v| v.as_i64().expect("pid") as i32)
        .collect();
    for pid in &pids {
        assert!(
            group_alive(*pid),
            "process group {pid} died with the command"
        );
    }
    let status = fleet(&["status"]);
    assert_eq!(status.matches("running").count(), 2, "{status}");

    let down = fleet(&["down"]);
    assert!(down.contains("fleet down"), "{down}");
    // Killed orphans are reaped by init asynchronously: wait (bounded) for that.
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in &pids {
        while group_alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!group_alive(*pid), "process group {pid} survived `down`");
    }
    let left: Vec<_> = std::fs::read_dir(base.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind by `down`: {left:?}");
}

/// Child half of `servers_die_with_a_sigkilled_test_process`: only active when
/// that test re-runs this binary with `FLOTILLA_HOLD_ETCD` set.
#[test]
fn hold_etcd_for_parent_test() {
    let Ok(pid_file) = std::env::var("FLOTILLA_HOLD_ETCD") else {
        return;
    };
    // Started from this short-lived test thread on purpose: the harness must
    // still tie the server's life to the process, not to this thread.
    let etcd = EtcdServer::start().expect("start etcd");
    let info = format!("{} {}", etcd.pid().unwrap(), etcd.dir().display());
    std::fs::write(format!("{pid_file}.tmp"), info).unwrap();
    std::fs::rename(format!("{pid_file}.tmp"), &pid_file).unwrap();
    std::mem::forget(etcd);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn servers_die_with_a_sigkilled_test_process() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let pid_file = scratch.path().join("etcd.pid");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "hold_etcd_for_parent_test", "--nocapture"])
        .env("FLOTILLA_HOLD_ETCD", &pid_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("re-run this test binary");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pid_file.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child test exited early: {status}");
        }
        assert!(Instant::now() < deadline, "child never started etcd");
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = std::fs::read_to_string(&pid_file).unwrap();
    let (pid, dir) = info.split_once(' ').unwrap();
    let pid: i32 = pid.parse().unwrap();
    assert!(group_alive(pid));

    // No Drop runs in the child: only the kernel's parent-death signal can stop etcd.
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while group_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !group_alive(pid),
        "etcd (pgid {pid}) outlived its SIGKILLed test process"
    );
    // Its folder is reaped by the next harness start in the same base folder.
    let again = EtcdServer::start().expect("start etcd");
    assert!(
        !std::path::Path::new(dir).exists(),
        "stale {dir} not reaped"
    );
    drop(again);
}
