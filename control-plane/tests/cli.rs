//! `flotilla` end to end on a real etcd and real Kafka clusters: every command,
//! every refused input, and the registry left exactly as it was after a refusal.

use std::process::{Command, Output};
use std::sync::Arc;

use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{ClusterState, EpochState, Expect, KvStore, Registry};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::kafka::KafkaFleet;

/// A command line split into arguments (none of them contains a space).
fn args(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

struct Env {
    etcd: EtcdServer,
    fleet: String,
}

impl Env {
    fn flotilla(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "--endpoints",
                &self.etcd.endpoint(),
                "--fleet",
                &self.fleet,
                "--timeout",
                "5s",
            ])
            .args(args)
            .env("FLOTILLA_LOG", "warn")
            .output()
            .expect("run flotilla")
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.flotilla(args);
        assert!(
            out.status.success(),
            "`flotilla {}` failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail without writing to the registry; returns its stderr.
    async fn refused(&self, args: &[&str]) -> String {
        let kv = self.kv().await;
        let before = kv.current_revision().await.unwrap();
        let out = self.flotilla(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "`flotilla {}` should have failed; stdout: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains("error:"),
            "no error message for `{}`: {stderr}",
            args.join(" ")
        );
        let after = kv.current_revision().await.unwrap();
        assert_eq!(
            before,
            after,
            "`flotilla {}` was refused but wrote to the registry",
            args.join(" ")
        );
        stderr
    }

    async fn kv(&self) -> Arc<dyn KvStore> {
        Arc::new(
            EtcdKv::connect(&[self.etcd.endpoint()], EtcdOptions::default())
                .await
                .unwrap(),
        )
    }

    async fn registry(&self) -> Registry {
        Registry::new(self.kv().await, self.fleet.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_and_every_bad_input() {
    let kafka = KafkaFleet::start(2).expect("start kafka");
    let env = Env {
        etcd: EtcdServer::start().expect("start etcd"),
        fleet: "cli".into(),
    };
    let (a, b) = (kafka.cluster(0).bootstrap(), kafka.cluster(1).bootstrap());

    // cluster add reads and records the Kafka cluster id.
    let out = env.ok(&["cluster", "add", "a", "--bootstrap", &a, "--activate"]);
    assert!(out.contains(kafka.cluster(0).kafka_cluster_id()), "{out}");
    env.ok(&["cluster", "add", "b", "--bootstrap", &b]);
    // Re-adding the same cluster is a no-op.
    assert!(env
        .ok(&["cluster", "add", "b", "--bootstrap", &b])
        .contains("already registered"));
    let reg = env.registry().await;
    assert_eq!(
        reg.cluster("a").await.unwrap().unwrap().0.kafka_cluster_id,
        kafka.cluster(0).kafka_cluster_id()
    );
    assert_eq!(
        reg.cluster("b").await.unwrap().unwrap().0.state,
        ClusterState::Provisioning
    );

    // Bad inputs, each refused with the registry unchanged: (arguments, what
    // the error must name).
    let add_b_again = format!("cluster add b --bootstrap {a}");
    let bad = [
        (args(&add_b_again), "already registered"),
        (
            vec!["cluster", "add", "c", "--bootstrap", "not a host"],
            "not a host",
        ),
        (
            args("route set orders --cluster nope=1 --partitions 3"),
            "nope",
        ),
        (
            args("route set orders --cluster a=x --partitions 3"),
            "bad weight",
        ),
        (
            args("route set orders --cluster a=0 --partitions 3"),
            "at least 1",
        ),
        // A route to a cluster that is not active.
        (
            args("route set orders --cluster b=1 --partitions 3"),
            "provisioning",
        ),
        (args("route set orders --cluster a=1"), "--partitions"),
        (args("cluster activate ghost"), "unknown cluster `ghost`"),
    ];
    for (argv, names) in &bad {
        let e = env.refused(argv).await;
        assert!(e.contains(names), "{argv:?}: {e}");
    }

    // route set creates epoch 1 open and the topic on the cluster.
    let out = env.ok(&args("route set orders --cluster a=1 --partitions 3"));
    assert!(out.contains("route created"), "{out}");
    env.ok(&["cluster", "activate", "b"]);
    // No producer is registered, so the switch seals at once with --wait.
    let out = env.ok(&args("route set orders --cluster a=1 --cluster b=1 --wait"));
    assert!(out.contains("switch completed"), "{out}");
    let (route, _) = reg.route("orders").await.unwrap().unwrap();
    assert_eq!(route.epochs.len(), 2);
    assert_eq!(route.epochs[0].state, EpochState::Sealed);
    assert_eq!(route.epochs[1].state, EpochState::Open);
    assert_eq!(
        route.epochs[0].fence.keys().cloned().collect::<Vec<_>>(),
        vec!["a".to_string(), "b".to_string()]
    );
    // The same write set again: nothing to do.
    assert!(env
        .ok(&args("route set orders --cluster a=1 --cluster b=1"))
        .contains("unchanged"));
    let e = env
        .refused(&args("route set orders --cluster a=1 --partitions 5"))
        .await;
    assert!(e.contains("3 partitions"), "{e}");

    // show / list / status, as tables and as JSON.
    assert!(env.ok(&["route", "show", "orders"]).contains("sealed"));
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["--output", "json", "status"])).unwrap();
    assert_eq!(json["routes"][0]["topic"], "orders");
    assert_eq!(json["clusters"].as_array().unwrap().len(), 2);
    assert!(env.ok(&["cluster", "list"]).contains("active"));

    // Drain is refused while an open epoch writes to the cluster; move off first.
    let e = env.refused(&["cluster", "drain", "a"]).await;
    assert!(e.contains("orders"), "{e}");
    // Without --wait (and no controller running) the switch stays pending; abort it.
    assert!(env
        .ok(&args("route set orders --cluster b=1"))
        .contains("pending"));
    assert!(env.ok(&["route", "abort", "orders"]).contains("aborted"));
    let (route, _) = reg.route("orders").await.unwrap().unwrap();
    assert_eq!(route.epochs.last().unwrap().state, EpochState::Aborted);
    assert_eq!(
        route.open_epoch().unwrap().n,
        2,
        "producers resume on the open epoch"
    );
    let e = env.refused(&["route", "abort", "orders"]).await;
    assert!(e.contains("no pending switch"), "{e}");
    env.ok(&args("route set orders --cluster b=1 --wait"));
    // Draining with --wait reconciles once: that pass fences a's writes.
    let out = env.ok(&["cluster", "drain", "a", "--wait"]);
    assert!(out.contains("writes fenced: a: orders"), "{out}");
    let e = env
        .refused(&args("route set orders --cluster a=1 --cluster b=1"))
        .await;
    assert!(e.contains("draining"), "a route to a draining cluster: {e}");
    let e = env.refused(&["cluster", "activate", "a"]).await;
    assert!(e.contains("forward"), "{e}");
    // No group is registered, so nothing needs a's sealed epochs: it may retire.
    env.ok(&["cluster", "retire", "a"]);
    assert_eq!(
        reg.cluster("a").await.unwrap().unwrap().0.state,
        ClusterState::Retired
    );
    let e = env.refused(&args("route set orders --cluster a=1")).await;
    assert!(e.contains("retired"), "a route to a retired cluster: {e}");
    // b is in the open epoch: retire refused.
    let e = env.refused(&["cluster", "retire", "b"]).await;
    assert!(e.contains("open epoch"), "{e}");

    // A malformed value in etcd is named, not skipped.
    let kv = env.kv().await;
    kv.put_if(
        "/flotilla/cli/clusters/broken",
        b"{not json".to_vec(),
        Expect::Absent,
        None,
    )
    .await
    .unwrap();
    let e = env.refused(&["cluster", "list"]).await;
    assert!(e.contains("/flotilla/cli/clusters/broken"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_is_a_clear_error() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let endpoint = etcd.endpoint();
    etcd.kill();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["--endpoints", &endpoint, "--timeout", "1s", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&endpoint),
        "the error should name the endpoint: {stderr}"
    );
}
