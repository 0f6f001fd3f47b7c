//! [`MockFleet`]: in-process librdkafka mock clusters for the zero-setup demo
//! and quick unit tests. Never a substitute for real Kafka in integration tests.
//!
//! librdkafka's `MockCluster` is `!Send`, so each one lives on a dedicated
//! thread that owns it; callers only get its bootstrap list, its Kafka cluster
//! id and a handle that sends commands to that thread. Shutting a cluster down
//! (explicitly or by dropping its handle) joins the thread.
//!
//! The mock brokers speak the Kafka protocol for produce, fetch, metadata,
//! offsets and consumer groups, but not the CreateTopics / DeleteTopics admin
//! APIs: create topics with [`MockKafka::create_topic`] instead of
//! [`ClusterAdmin::ensure_topic`](crate::kafka::ClusterAdmin::ensure_topic).
//! Each mock cluster reports a Kafka cluster id of the form `mockCluster<hex>`.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;

use crate::kafka::error::KafkaError;
use crate::registry::{ClusterRole, ClusterSpec, ClusterState, SCHEMA_VERSION};

/// How long [`MockFleet::start`] waits for a mock cluster to report its id.
const START_TIMEOUT: Duration = Duration::from_secs(10);

type Reply = mpsc::Sender<Result<(), String>>;

enum Command {
    CreateTopic {
        topic: String,
        partitions: i32,
        reply: Reply,
    },
    BrokerDown {
        broker: i32,
        reply: Reply,
    },
    BrokerUp {
        broker: i32,
        reply: Reply,
    },
    TopicError {
        topic: String,
        error: RDKafkaRespErr,
        reply: Reply,
    },
    RequestErrors {
        api: RDKafkaApiKey,
        errors: Vec<RDKafkaRespErr>,
        reply: Reply,
    },
    BrokerRtt {
        broker: i32,
        rtt: Duration,
        reply: Reply,
    },
    Shutdown,
}

/// One mock Kafka cluster running on its own thread.
pub struct MockKafka {
    name: String,
    bootstrap: String,
    kafka_cluster_id: String,
    brokers: i32,
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("name", &self.name)
            .field("bootstrap", &self.bootstrap)
            .field("kafka_cluster_id", &self.kafka_cluster_id)
            .field("brokers", &self.brokers)
            .finish()
    }
}

impl MockKafka {
    /// Starts one mock cluster with `brokers` brokers (blocking, a few ms).
    /// `name` labels its thread and errors.
    pub fn start(name: &str, brokers: i32) -> Result<MockKafka, KafkaError> {
        let err = |detail: String| KafkaError::Other {
            cluster: name.to_string(),
            detail,
        };
        if brokers < 1 {
            return Err(err(format!(
                "a mock cluster needs at least one broker, not {brokers}"
            )));
        }
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let thread = std::thread::Builder::new()
            .name(format!("mock-kafka-{name}"))
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start a mock cluster: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                drop(ready_tx);
                let reply = |reply: Reply, r: rdkafka::error::KafkaResult<()>| {
                    let _ = reply.send(r.map_err(|e| e.to_string()));
                };
                // Runs until Shutdown or until the handle is dropped.
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Command::CreateTopic {
                            topic,
                            partitions,
                            reply: r,
                        } => reply(r, cluster.create_topic(&topic, partitions, 1)),
                        Command::BrokerDown { broker, reply: r } => {
                            reply(r, cluster.broker_down(broker))
                        }
                        Command::BrokerUp { broker, reply: r } => {
                            reply(r, cluster.broker_up(broker))
                        }
                        Command::TopicError {
                            topic,
                            error,
                            reply: r,
                        } => reply(r, cluster.topic_error(&topic, error)),
                        Command::RequestErrors {
                            api,
                            errors,
                            reply: r,
                        } => {
                            cluster.request_errors(api, &errors);
                            reply(r, Ok(()))
                        }
                        Command::BrokerRtt {
                            broker,
                            rtt,
                            reply: r,
                        } => reply(r, cluster.broker_round_trip_time(broker, rtt)),
                        Command::Shutdown => break,
                    }
                }
                drop(cluster);
            })
            .map_err(|e| err(format!("cannot spawn the mock cluster thread: {e}")))?;
        let mut handle = MockKafka {
            name: name.to_string(),
            bootstrap: String::new(),
            kafka_cluster_id: String::new(),
            brokers,
            tx,
            thread: Some(thread),
        };
        handle.bootstrap = match ready_rx.recv() {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(err(e)),
            Err(_) => return Err(err("the mock cluster thread died while starting".into())),
        };
        handle.kafka_cluster_id = read_id(name, &handle.bootstrap)?;
        Ok(handle)
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `bootstrap.servers` list of the mock brokers (loopback ports).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The Kafka cluster id the mock brokers report (`mockCluster<hex>`).
    pub fn kafka_cluster_id(&self) -> &str {
        &self.kafka_cluster_id
    }

    /// Number of brokers; their ids are `1..=brokers`.
    pub fn brokers(&self) -> i32 {
        self.brokers
    }

    /// A registry spec for this cluster (active, permanent, weight 100, no
    /// security profile) under registry id `id`, e.g. for the demo.
    pub fn cluster_spec(&self, id: &str) -> ClusterSpec {
        ClusterSpec {
            version: SCHEMA_VERSION,
            id: id.to_string(),
            bootstrap: self.bootstrap.clone(),
            kafka_cluster_id: self.kafka_cluster_id.clone(),
            state: ClusterState::Active,
            role: ClusterRole::Permanent,
            weight: 100,
            labels: BTreeMap::from([("kind".to_string(), "mock".to_string())]),
            security_profile: None,
            created_at: 0,
        }
    }

    fn call(&self, make: impl FnOnce(Reply) -> Command, what: &str) -> Result<(), KafkaError> {
        let (reply, rx) = mpsc::channel();
        let err = |detail: String| KafkaError::Other {
            cluster: self.name.clone(),
            detail: format!("{what}: {detail}"),
        };
        self.tx
            .send(make(reply))
            .map_err(|_| err("the mock cluster is shut down".into()))?;
        rx.recv()
            .map_err(|_| err("the mock cluster thread died".into()))?
            .map_err(err)
    }

    /// Creates `topic` with `partitions` partitions (the mock brokers do not
    /// implement the CreateTopics admin API). Blocking, returns quickly.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), KafkaError> {
        let partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
        let topic = topic.to_string();
        self.call(
            |reply| Command::CreateTopic {
                topic,
                partitions,
                reply,
            },
            "create topic",
        )
    }

    /// Takes broker `broker` (1-based) down: its connections are closed and new
    /// ones refused, as if the broker crashed.
    pub fn broker_down(&self, broker: i32) -> Result<(), KafkaError> {
        self.call(|reply| Command::BrokerDown { broker, reply }, "broker down")
    }

    /// Brings broker `broker` back up.
    pub fn broker_up(&self, broker: i32) -> Result<(), KafkaError> {
        self.call(|reply| Command::BrokerUp { broker, reply }, "broker up")
    }

    /// Makes metadata requests for `topic` answer with `error` (e.g.
    /// `RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED`); `RD_KAFKA_RESP_ERR_NO_ERROR` clears it.
    pub fn topic_error(&self, topic: &str, error: RDKafkaRespErr) -> Result<(), KafkaError> {
        let topic = topic.to_string();
        self.call(
            |reply| Command::TopicError {
                topic,
                error,
                reply,
            },
            "topic error",
        )
    }

    /// Makes the next requests of kind `api` fail with `errors`, one per request,
    /// in order (then they succeed again).
    pub fn push_request_errors(
        &self,
        api: RDKafkaApiKey,
        errors: Vec<RDKafkaRespErr>,
    ) -> Result<(), KafkaError> {
        self.call(
            |reply| Command::RequestErrors { api, errors, reply },
            "request errors",
        )
    }

    /// Delays every response of broker `broker` (1-based; -1: every broker)
    /// by `rtt`, as a slow network or broker would; zero clears it.
    pub fn broker_rtt(&self, broker: i32, rtt: Duration) -> Result<(), KafkaError> {
        self.call(
            |reply| Command::BrokerRtt { broker, rtt, reply },
            "broker rtt",
        )
    }

    /// Stops the mock cluster and joins its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_id(name: &str, bootstrap: &str) -> Result<String, KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| KafkaError::Other {
            cluster: name.to_string(),
            detail: format!("cannot create a client for the mock cluster: {e}"),
        })?;
    crate::kafka::identity::blocking_cluster_id(name, bootstrap, &consumer, START_TIMEOUT)
}

/// N independent librdkafka mock clusters, named `mock-0`, `mock-1`, ...
#[derive(Debug)]
pub struct MockFleet {
    clusters: Vec<MockKafka>,
}

impl MockFleet {
    /// Starts `n` mock clusters of one broker each. Blocking (a few ms per
    /// cluster): call it before entering the runtime or from `spawn_blocking`.
    pub fn start(n: usize) -> Result<MockFleet, KafkaError> {
        Self::start_with_brokers(n, 1)
    }

    /// Starts `n` mock clusters of `brokers` brokers each.
    pub fn start_with_brokers(n: usize, brokers: i32) -> Result<MockFleet, KafkaError> {
        let clusters = (0..n)
            .map(|i| MockKafka::start(&format!("mock-{i}"), brokers))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MockFleet { clusters })
    }

    /// The `i`-th cluster. Panics when `i >= len()`.
    pub fn cluster(&self, i: usize) -> &MockKafka {
        &self.clusters[i]
    }

    /// All clusters, in start order.
    pub fn clusters(&self) -> &[MockKafka] {
        &self.clusters
    }

    /// Number of clusters.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether the fleet has no cluster.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Creates `topic` with `partitions` partitions on every cluster.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), KafkaError> {
        self.clusters
            .iter()
            .try_for_each(|c| c.create_topic(topic, partitions))
    }

    /// Registry specs for every cluster, with registry ids `mock-0`, `mock-1`, ...
    pub fn cluster_specs(&self) -> Vec<ClusterSpec> {
        self.clusters
            .iter()
            .map(|c| c.cluster_spec(c.name()))
            .collect()
    }

    /// Stops every cluster and joins their threads.
    pub fn shutdown(self) {
        drop(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{ClusterAdmin, KafkaProperties, SecurityProfiles};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    #[test]
    fn mock_clusters_are_distinct_and_shut_down() {
        let fleet = MockFleet::start(2).unwrap();
        assert_eq!(fleet.len(), 2);
        let (a, b) = (fleet.cluster(0), fleet.cluster(1));
        assert_ne!(a.bootstrap(), b.bootstrap());
        assert_ne!(a.kafka_cluster_id(), b.kafka_cluster_id());
        assert!(
            a.kafka_cluster_id().starts_with("mockCluster"),
            "{}",
            a.kafka_cluster_id()
        );
        crate::kafka::validate_bootstrap(a.bootstrap()).unwrap();
        fleet.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn produce_then_metadata_and_offsets() {
        let fleet = tokio::task::spawn_blocking(|| MockFleet::start(2))
            .await
            .unwrap()
            .unwrap();
        let specs = fleet.cluster_specs();
        fleet.create_topic("orders", 3).unwrap();
        let base = KafkaProperties::new();
        let t = Duration::from_secs(10);
        let admin = ClusterAdmin::connect(&specs[0], &base, &SecurityProfiles::empty(), t)
            .await
            .unwrap();
        assert_eq!(admin.cluster_id(), fleet.cluster(0).kafka_cluster_id());
        assert_eq!(admin.topic_partitions("orders").await.unwrap(), Some(3));
        assert_eq!(admin.topic_partitions("absent").await.unwrap(), None);
        // Metadata queries never auto-create.
        assert_eq!(admin.topic_partitions("absent").await.unwrap(), None);
        assert_eq!(
            admin.ensure_topic("orders", 3).await.unwrap(),
            crate::kafka::TopicStatus::Existed
        );
        assert!(matches!(
            admin.ensure_topic("orders", 4).await,
            Err(KafkaError::PartitionMismatch {
                expected: 4,
                found: 3,
                ..
            })
        ));

        let cfg = admin.client_config().clone();
        tokio::task::spawn_blocking(move || {
            let p: BaseProducer = cfg.create().unwrap();
            for i in 0..10 {
                let part = if i < 7 { 1 } else { 2 };
                p.send(
                    BaseRecord::to("orders")
                        .key("k")
                        .payload("v")
                        .partition(part),
                )
                .map_err(|(e, _)| e)
                .unwrap();
            }
            p.flush(Duration::from_secs(10)).unwrap();
        })
        .await
        .unwrap();
        assert_eq!(admin.end_offsets("orders", 3).await.unwrap(), vec![0, 7, 3]);
        // A topic the cluster does not have: an error naming it, not a hang.
        let e = admin.end_offsets("no-such-topic", 2).await.unwrap_err();
        assert!(e.to_string().contains("no-such-topic"), "{e}");
        assert_eq!(
            admin.committed_offsets("g", "orders", 3).await.unwrap(),
            vec![None, None, None]
        );

        // The other cluster's spec must not pass for this one.
        let mut wrong = specs[1].clone();
        wrong.bootstrap = specs[0].bootstrap.clone();
        let e = ClusterAdmin::connect(&wrong, &base, &SecurityProfiles::empty(), t)
            .await
            .unwrap_err();
        assert!(matches!(e, KafkaError::ClusterIdMismatch { .. }), "{e}");

        // Authorization failures are classified as permanent.
        let c0 = fleet.cluster(0);
        c0.topic_error(
            "secret",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
        let e = admin.topic_partitions("secret").await.unwrap_err();
        assert!(
            matches!(e, KafkaError::Authorization { .. }) && e.is_permanent(),
            "{e}"
        );
        c0.push_request_errors(
            RDKafkaApiKey::OffsetFetch,
            vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
        )
        .unwrap();
        let e = admin.committed_offsets("g", "orders", 3).await.unwrap_err();
        assert!(matches!(e, KafkaError::Authorization { .. }), "{e}");
        // Transient coordinator errors are retried within the timeout.
        c0.push_request_errors(
            RDKafkaApiKey::OffsetFetch,
            vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 3],
        )
        .unwrap();
        assert_eq!(
            admin.committed_offsets("g", "orders", 3).await.unwrap(),
            vec![None, None, None]
        );

        // A cluster whose broker is down is unreachable, not a hang.
        let c1 = fleet.cluster(1);
        c1.broker_down(1).unwrap();
        let short = Duration::from_secs(2);
        let started = std::time::Instant::now();
        let e = ClusterAdmin::connect(&specs[1], &base, &SecurityProfiles::empty(), short)
            .await
            .unwrap_err();
        assert!(matches!(e, KafkaError::Unreachable { .. }), "{e}");
        assert!(started.elapsed() < short + Duration::from_secs(3));
        c1.broker_up(1).unwrap();

        drop(admin);
        tokio::task::spawn_blocking(move || fleet.shutdown())
            .await
            .unwrap();
    }
}
