//! The controller and concurrent operators on a real etcd and real Kafka.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use flotilla_client::registry::{ClientKind, ClientRecord, EpochState, SCHEMA_VERSION};
use flotilla_control::controller::now_millis;
use flotilla_control::{ControlError, ControlPlane, RouteOutcome, SetRoute};
use flotilla_testkit::etcd::EtcdServer;
use flotilla_testkit::kafka::KafkaFleet;

mod support;
use support::{add_active_cluster, rdkafka_control_plane, wait_until};

async fn control_plane(etcd: &EtcdServer, fleet: &str) -> ControlPlane {
    rdkafka_control_plane(etcd, fleet, true).await
}

fn set(topic: &str, clusters: &[&str], ack_timeout_ms: u64) -> SetRoute {
    SetRoute {
        topic: topic.into(),
        clusters: clusters.iter().map(|c| (c.to_string(), Some(1))).collect(),
        partitions: Some(3),
        ack_timeout_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_racing_the_same_route_change_exactly_one_wins() {
    let kafka = KafkaFleet::start(3).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let (op1, op2) = (
        control_plane(&etcd, "race").await,
        control_plane(&etcd, "race").await,
    );
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        add_active_cluster(&op1, id, kafka.cluster(i).bootstrap()).await;
    }
    op1.set_route(set("t", &["a"], 60_000), now_millis())
        .await
        .unwrap();
    for _ in 0..3 {
        let before = op1.route("t").await.unwrap();
        let (r1, r2) = tokio::join!(
            op1.set_route(set("t", &["a", "b"], 60_000), now_millis()),
            op2.set_route(set("t", &["a", "c"], 60_000), now_millis()),
        );
        let wins = [&r1, &r2]
            .iter()
            .filter(|r| matches!(r, Ok(RouteOutcome::Proposed { .. })))
            .count();
        assert_eq!(wins, 1, "exactly one operator must win: {r1:?} / {r2:?}");
        let loser = match (r1, r2) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            other => panic!("exactly one operator must win: {other:?}"),
        };
        // The loser either lost the compare-and-swap or saw the winner's pending epoch.
        assert!(
            loser.is_conflict()
                || matches!(&loser, ControlError::Model(e) if e.to_string().contains("already pending")),
            "unexpected loser error: {loser}"
        );
        let after = op1.route("t").await.unwrap();
        assert_eq!(
            after.epochs.len(),
            before.epochs.len() + 1,
            "one new epoch, not two"
        );
        // Undo: abort the pending epoch so the next round races again.
        let n = after.pending_epoch().unwrap().n;
        op1.registry()
            .update_route("t", |cur| {
                Ok(Some(flotilla_client::route::switch::abort(
                    cur.unwrap(),
                    n,
                )?))
            })
            .await
            .unwrap();
    }
}

fn spawn_controller(etcd: &EtcdServer, id: &str, leader_file: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "--fleet",
            "failover",
            "controller",
        ])
        .args([
            "--id",
            id,
            "--lease-ttl",
            "2s",
            "--interval",
            "200ms",
            "--leader-file",
        ])
        .arg(leader_file)
        .env("FLOTILLA_LOG", "warn")
        .spawn()
        .expect("spawn controller")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_mid_switch_is_replaced_and_the_switch_completes() {
    let kafka = KafkaFleet::start(2).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let cp = control_plane(&etcd, "failover").await;
    add_active_cluster(&cp, "a", kafka.cluster(0).bootstrap()).await;
    add_active_cluster(&cp, "b", kafka.cluster(1).bootstrap()).await;
    cp.set_route(set("t", &["a"], 60_000), now_millis())
        .await
        .unwrap();

    // A live producer that has not acknowledged yet holds the switch open.
    let record = ClientRecord {
        version: SCHEMA_VERSION,
        kind: ClientKind::Producer,
        id: "p1".into(),
        acked: Default::default(),
        group: None,
        started_at: now_millis(),
    };
    let mut lease = cp
        .registry()
        .register_client(record.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    cp.set_route(set("t", &["a", "b"], 60_000), now_millis())
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let files = [dir.path().join("c1"), dir.path().join("c2")];
    let mut procs = [
        spawn_controller(&etcd, "c1", &files[0]),
        spawn_controller(&etcd, "c2", &files[1]),
    ];
    wait_until(Duration::from_secs(15), "a leader", || async {
        files.iter().any(|f| f.exists())
    })
    .await;
    let leader = files.iter().position(|f| f.exists()).unwrap();
    assert!(!files[1 - leader].exists(), "two leaders at once");

    // The leader reconciles but must keep waiting for p1.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        cp.route("t").await.unwrap().pending_epoch().map(|e| e.n),
        Some(2)
    );

    // Kill the leader mid-switch, then let the producer acknowledge.
    procs[leader].kill().unwrap();
    procs[leader].wait().unwrap();
    let mut acked = record.clone();
    acked.acked.insert("t".into(), 2);
    lease.update(acked).await.unwrap();

    let started = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "the other controller to lead",
        || async { files[1 - leader].exists() },
    )
    .await;
    wait_until(
        Duration::from_secs(15),
        "the switch to complete",
        || async { cp.route("t").await.unwrap().open_epoch().map(|e| e.n) == Some(2) },
    )
    .await;
    let took = started.elapsed();
    let route = cp.route("t").await.unwrap();
    assert_eq!(route.epochs[0].state, EpochState::Sealed);
    assert_eq!(route.epochs[0].fence.len(), 2, "fence recorded on a and b");
    eprintln!("failover + switch completion took {took:?}");
    for p in procs.iter_mut() {
        let _ = p.kill();
        let _ = p.wait();
    }
}

fn producer_record(id: &str) -> ClientRecord {
    ClientRecord {
        version: SCHEMA_VERSION,
        kind: ClientKind::Producer,
        id: id.into(),
        acked: Default::default(),
        group: None,
        started_at: now_millis(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_that_die_or_stay_silent_do_not_block_a_switch_past_its_deadline() {
    let kafka = KafkaFleet::start(2).expect("kafka");
    let etcd = EtcdServer::start().expect("etcd");
    let cp = control_plane(&etcd, "deadline").await;
    add_active_cluster(&cp, "a", kafka.cluster(0).bootstrap()).await;
    add_active_cluster(&cp, "b", kafka.cluster(1).bootstrap()).await;
    cp.set_route(set("t", &["a"], 60_000), now_millis())
        .await
        .unwrap();
    let controller = flotilla_control::Controller::new(cp.clone());

    // A producer that dies mid-switch: its lease (2 s) is never renewed.
    let dead = cp
        .registry()
        .register_client(producer_record("dies"), Duration::from_secs(2))
        .await
        .unwrap();
    cp.set_route(set("t", &["a", "b"], 60_000), now_millis())
        .await
        .unwrap();
    let r = controller.reconcile_once(now_millis()).await.unwrap();
    assert_eq!(
        r.waiting.len(),
        1,
        "the live, silent producer holds the switch: {r:?}"
    );
    assert_eq!(r.waiting[0].2, vec!["dies".to_string()]);
    drop(dead);
    // Once etcd expires its lease it is gone from the registry and the switch seals,
    // long before the 60 s ack deadline.
    let started = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "the dead producer's switch to seal",
        || async {
            controller.reconcile_once(now_millis()).await.unwrap();
            cp.route("t").await.unwrap().open_epoch().map(|e| e.n) == Some(2)
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(15));

    // A producer that is alive but never acknowledges: the switch proceeds at the
    // ack deadline (default policy), naming it as late.
    let _silent = cp
        .registry()
        .register_client(producer_record("silent"), Duration::from_secs(30))
        .await
        .unwrap();
    cp.set_route(set("t", &["b"], 1_500), now_millis())
        .await
        .unwrap();
    let r = controller.reconcile_once(now_millis()).await.unwrap();
    assert_eq!(r.waiting.len(), 1, "before the deadline it waits: {r:?}");
    wait_until(
        Duration::from_secs(15),
        "the switch to seal at its deadline",
        || async {
            controller.reconcile_once(now_millis()).await.unwrap();
            cp.route("t").await.unwrap().open_epoch().map(|e| e.n) == Some(3)
        },
    )
    .await;
    let route = cp.route("t").await.unwrap();
    assert_eq!(route.epochs[1].state, EpochState::Sealed);
}
