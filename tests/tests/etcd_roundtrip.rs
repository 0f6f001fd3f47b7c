//! etcd as the registry uses it, against a real throwaway etcd: KV, watch with
//! revision resume, leases with keep-alive, and compare-and-swap transactions.

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use flotilla_testkit::EtcdServer;
use std::time::{Duration, Instant};
use tokio::time::timeout;

async fn connect(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect to etcd")
}

async fn value_of(client: &mut Client, key: &str) -> Option<String> {
    let resp = client.get(key, None).await.expect("get");
    resp.kvs()
        .first()
        .map(|kv| kv.value_str().expect("utf-8 value").to_string())
}

#[test]
fn start_works_without_a_runtime() {
    let etcd = EtcdServer::start().expect("start etcd");
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let dir = etcd.dir().to_path_buf();
    assert!(dir.join("data").is_dir());
    drop(etcd);
    assert!(!dir.exists(), "drop must remove {}", dir.display());
}

#[tokio::test]
async fn watch_from_past_revision_replays_history_in_order() {
    let etcd = EtcdServer::start().expect("start etcd");
    let mut client = connect(&etcd).await;

    let first = client.put("/w/a", "1", None).await.expect("put");
    let first_rev = first.header().expect("header").revision();
    client.put("/w/b", "2", None).await.expect("put");
    client.put("/w/a", "3", None).await.expect("put");
    client.delete("/w/b", None).await.expect("delete");
    let later = client.put("/w/c", "4", None).await.expect("put");
    let last_rev = later.header().expect("header").revision();
    assert_eq!(last_rev, first_rev + 4, "one revision per write");

    // Resume from the first write's revision: all five events, in order.
    let mut stream = client
        .watch(
            "/w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(first_rev),
            ),
        )
        .await
        .expect("watch");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 5 {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| panic!("watch: only {} of 5 events in 10 s: {seen:?}", seen.len()))
            .expect("watch stream error")
            .expect("watch stream ended");
        for ev in msg.events() {
            let kv = ev.kv().expect("event kv");
            let kind = match ev.event_type() {
                EventType::Put => "put",
                EventType::Delete => "delete",
            };
            seen.push((
                kind,
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.mod_revision(),
            ));
        }
    }
    let expected = vec![
        ("put", "/w/a".to_string(), "1".to_string(), first_rev),
        ("put", "/w/b".to_string(), "2".to_string(), first_rev + 1),
        ("put", "/w/a".to_string(), "3".to_string(), first_rev + 2),
        ("delete", "/w/b".to_string(), String::new(), first_rev + 3),
        ("put", "/w/c".to_string(), "4".to_string(), first_rev + 4),
    ];
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn lease_lives_while_kept_alive_and_expires_after() {
    const TTL: i64 = 2;
    let etcd = EtcdServer::start().expect("start etcd");
    let mut client = connect(&etcd).await;

    let lease = client.lease_grant(TTL, None).await.expect("grant").id();
    let put = client
        .put("/l/me", "alive", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put with lease");
    let put_rev = put.header().expect("header").revision();

    // Keep the lease alive every 500 ms from a separate task.
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.expect("keep-alive");
    let keep_alive = tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                break;
            }
            if responses.message().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    // Being alive at 2.5 x TTL *is* the property under test, so this wait is the check.
    tokio::time::sleep(Duration::from_millis(2500 * TTL as u64)).await;
    assert_eq!(
        value_of(&mut client, "/l/me").await.as_deref(),
        Some("alive"),
        "key vanished although its lease was kept alive"
    );

    // Stop the keep-alive; the key must disappear on its own (lease expiry).
    keep_alive.abort();
    let _ = keep_alive.await;
    let stopped = Instant::now();
    let mut stream = client
        .watch(
            "/l/me",
            Some(WatchOptions::new().with_start_revision(put_rev + 1)),
        )
        .await
        .expect("watch");
    let limit = Duration::from_secs(TTL as u64 + 8);
    let deleted = timeout(limit, async {
        loop {
            let msg = stream
                .message()
                .await
                .expect("watch error")
                .expect("watch ended");
            if msg
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                return;
            }
        }
    })
    .await;
    assert!(
        deleted.is_ok(),
        "key still present {limit:?} after keep-alive stopped (TTL {TTL} s)"
    );
    assert!(
        stopped.elapsed() >= Duration::from_millis(500),
        "key deleted too early ({:?}) after keep-alive stopped",
        stopped.elapsed()
    );
    assert_eq!(value_of(&mut client, "/l/me").await, None);
}

#[tokio::test]
async fn txn_compare_and_swap_on_mod_revision() {
    let etcd = EtcdServer::start().expect("start etcd");
    let mut client = connect(&etcd).await;

    let v1 = client.put("/cas/k", "v1", None).await.expect("put");
    let stale_rev = v1.header().expect("header").revision();
    let v2 = client.put("/cas/k", "v2", None).await.expect("put");
    let current_rev = v2.header().expect("header").revision();

    let cas = |rev: i64, value: &str| {
        Txn::new()
            .when([Compare::mod_revision("/cas/k", CompareOp::Equal, rev)])
            .and_then([TxnOp::put("/cas/k", value, None)])
            .or_else([TxnOp::get("/cas/k", None)])
    };

    // A writer that read revision `stale_rev` loses and changes nothing.
    let stale = client
        .txn(cas(stale_rev, "from-stale-writer"))
        .await
        .expect("txn");
    assert!(
        !stale.succeeded(),
        "CAS with a stale mod_revision succeeded"
    );
    assert_eq!(value_of(&mut client, "/cas/k").await.as_deref(), Some("v2"));

    // A writer with the current revision wins.
    let fresh = client.txn(cas(current_rev, "v3")).await.expect("txn");
    assert!(
        fresh.succeeded(),
        "CAS with the current mod_revision failed"
    );
    assert_eq!(value_of(&mut client, "/cas/k").await.as_deref(), Some("v3"));
}

#[tokio::test]
async fn kill_and_restart_keep_data_and_endpoint() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let endpoint = etcd.endpoint();
    {
        let mut client = connect(&etcd).await;
        client.put("/r/k", "before", None).await.expect("put");
    }
    etcd.kill();
    assert!(!etcd.is_running());
    etcd.restart().expect("restart etcd");
    assert_eq!(etcd.endpoint(), endpoint, "restart must keep the port");
    let mut client = connect(&etcd).await;
    assert_eq!(
        value_of(&mut client, "/r/k").await.as_deref(),
        Some("before")
    );
}
