//! [`ClusterAdmin`]: administration and offset queries against one cluster.
//!
//! Wraps an rdkafka `AdminClient` (topic creation and deletion) and a metadata
//! consumer (metadata, watermarks, cluster id) for one cluster. Blocking
//! librdkafka calls run on tokio's blocking pool with timeouts, so async
//! callers never stall a runtime thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::kafka::config::{bootstrap_config, client_config, KafkaProperties, SecurityProfiles};
use crate::kafka::error::{from_code, from_rdkafka, KafkaError};
use crate::kafka::identity::{
    blocking_cluster_id, drain_errors, metadata_consumer, no_answer, verify_cluster_id, GRACE,
};
use crate::registry::ClusterSpec;

/// How often readiness is polled while waiting for a topic to appear or vanish.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Pause between attempts when a blocking query fails transiently.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// The group and topic [`ClusterAdmin::ensure_group_coordinator`] asks
/// about (neither needs to exist).
const COORDINATOR_PROBE: &str = "flotilla-coordinator-probe";
/// Between two asks while the offsets topic is being created: it takes a few
/// hundred milliseconds, and asking is cheap.
const COORDINATOR_BACKOFF: Duration = Duration::from_millis(50);

/// What [`ClusterAdmin::ensure_topic`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStatus {
    /// The topic was missing and has been created (and is visible with leaders).
    Created,
    /// The topic already existed with the expected partition count.
    Existed,
}

/// The topic config that fences writes: `max.message.bytes` = 0.
///
/// Every produce request carries at least one record batch (61 bytes of
/// header alone), and the broker rejects a batch larger than the topic's
/// `max.message.bytes` with `MESSAGE_TOO_LARGE` *before* appending it, whatever
/// the producer's `acks`; fetches and offset commits are not affected. Verified
/// on Apache Kafka 4.4.0. (`min.insync.replicas` above the replication factor
/// does **not** fence: Kafka caps the effective value at the replica count,
/// `Partition.effectiveMinIsr`, so `acks=all` writes keep succeeding.)
pub const WRITE_FENCE_CONFIG: (&str, &str) = ("max.message.bytes", "0");

/// What [`ClusterAdmin::fence_writes`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFenceStatus {
    /// The fence was already in place before this call.
    AlreadyFenced,
    /// The fence has been set by this call (and is visible in the topic's config).
    Fenced,
    /// The topic does not exist on the cluster: nothing can be written to it.
    NoSuchTopic,
}

/// Administration of one Kafka cluster. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct ClusterAdmin {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: String,
    bootstrap: String,
    cluster_id: String,
    config: ClientConfig,
    timeout: Duration,
    admin: Option<AdminClient<DefaultClientContext>>,
    meta: Option<BaseConsumer>,
    /// One offset-reading consumer per group (`group.id` set, never subscribed).
    groups: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

impl Inner {
    fn admin(&self) -> &AdminClient<DefaultClientContext> {
        self.admin
            .as_ref()
            .expect("admin client present until drop")
    }

    fn meta(&self) -> &BaseConsumer {
        self.meta
            .as_ref()
            .expect("metadata consumer present until drop")
    }

    /// Calls `attempt` with the time left until this admin's timeout,
    /// again after `backoff` while it fails with a transient error and
    /// another attempt fits before the deadline.
    fn retry_transient<T>(
        &self,
        backoff: Duration,
        mut attempt: impl FnMut(Duration) -> Result<T, KafkaError>,
    ) -> Result<T, KafkaError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match attempt(left) {
                Err(e) if !e.is_permanent() && Instant::now() + backoff < deadline => {
                    std::thread::sleep(backoff);
                }
                other => return other,
            }
        }
    }

    /// One attempt at [`ClusterAdmin::end_offsets`]: every partition's
    /// "latest" offset in one call, any partition's error failing the lot.
    fn blocking_end_offsets(
        &self,
        what: &str,
        topic: &str,
        partitions: u32,
        timeout: Duration,
    ) -> Result<Vec<i64>, KafkaError> {
        let mut query = TopicPartitionList::with_capacity(partitions as usize);
        for p in 0..partitions {
            query
                .add_partition_offset(topic, p as i32, Offset::End)
                .map_err(|e| self.err(what, &e))?;
        }
        let answer = self
            .meta()
            .offsets_for_times(query, timeout)
            .map_err(|e| self.err(what, &e))?;
        let mut out = vec![None; partitions as usize];
        for e in answer.elements_for_topic(topic) {
            let p = e.partition();
            e.error()
                .map_err(|err| self.err(&format!("end offset of {topic}/{p}"), &err))?;
            if let (Offset::Offset(end), Some(slot)) = (e.offset(), out.get_mut(p as usize)) {
                *slot = Some(end);
            }
        }
        out.iter()
            .enumerate()
            .map(|(p, end)| {
                end.ok_or_else(|| KafkaError::Transient {
                    cluster: self.cluster.clone(),
                    detail: format!("end offset of {topic}/{p}: not in the broker's answer"),
                })
            })
            .collect()
    }

    /// Awaits the answer to an admin request, giving up (transient error)
    /// when the brokers have not answered within the timeout the request
    /// itself carries, plus a grace.
    async fn answer<T>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = Result<T, RdKafkaError>>,
    ) -> Result<T, KafkaError> {
        match tokio::time::timeout(self.timeout + GRACE, request).await {
            Ok(r) => r.map_err(|e| self.err(what, &e)),
            Err(_) => Err(KafkaError::Transient {
                cluster: self.cluster.clone(),
                detail: format!("{what}: no answer within {:?}", self.timeout),
            }),
        }
    }

    fn err(&self, what: &str, e: &RdKafkaError) -> KafkaError {
        use RDKafkaErrorCode as C;
        let code = crate::kafka::error::error_code(e);
        if matches!(
            code,
            Some(C::AllBrokersDown | C::BrokerTransportFailure | C::Resolve)
        ) {
            return no_answer(
                &self.cluster,
                &self.bootstrap,
                self.timeout,
                self.meta(),
                what,
            );
        }
        from_rdkafka(&self.cluster, what, e)
    }

    /// Partition count and whether every partition has a leader; `None` when
    /// the topic does not exist.
    fn blocking_topic(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<(u32, bool)>, KafkaError> {
        let what = format!("metadata of topic {topic}");
        let md = self
            .meta()
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| self.err(&what, &e))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        if let Some(raw) = t.error() {
            let code = RDKafkaErrorCode::from(raw);
            return match code {
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                    Ok(None)
                }
                RDKafkaErrorCode::LeaderNotAvailable if !t.partitions().is_empty() => {
                    Ok(Some((t.partitions().len() as u32, false)))
                }
                RDKafkaErrorCode::LeaderNotAvailable => Ok(None),
                other => Err(from_code(&self.cluster, other, &what)),
            };
        }
        if t.partitions().is_empty() {
            return Ok(None);
        }
        let ready = t
            .partitions()
            .iter()
            .all(|p| p.error().is_none() && p.leader() >= 0);
        Ok(Some((t.partitions().len() as u32, ready)))
    }
}

impl Inner {
    /// The cached offset-reading consumer of `group`, created on first use.
    fn group_consumer(&self, group: &str, what: &str) -> Result<Arc<BaseConsumer>, KafkaError> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = groups.get(group) {
            // Serve queued events (errors, stats) so they do not pile up.
            drain_errors(c);
            return Ok(c.clone());
        }
        let mut cfg = self.config.clone();
        cfg.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false");
        let consumer: BaseConsumer = cfg.create().map_err(|e| KafkaError::Config {
            cluster: self.cluster.clone(),
            detail: format!("{what}: cannot create a kafka consumer: {e}"),
        })?;
        let consumer = Arc::new(consumer);
        groups.insert(group.to_string(), consumer.clone());
        Ok(consumer)
    }

    fn blocking_committed(
        &self,
        consumer: &BaseConsumer,
        what: &str,
        topic: &str,
        partitions: u32,
        timeout: Duration,
    ) -> Result<Vec<Option<i64>>, KafkaError> {
        let mut tpl = TopicPartitionList::with_capacity(partitions as usize);
        for p in 0..partitions {
            tpl.add_partition(topic, p as i32);
        }
        let tpl = consumer
            .committed_offsets(tpl, timeout)
            .map_err(|e| self.err(what, &e))?;
        let mut out = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let elem = tpl
                .find_partition(topic, p as i32)
                .ok_or_else(|| KafkaError::Other {
                    cluster: self.cluster.clone(),
                    detail: format!("{what}: partition {p} missing from the answer"),
                })?;
            if let Err(e) = elem.error() {
                return Err(self.err(&format!("{what} (partition {p})"), &e));
            }
            out.push(match elem.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            });
        }
        Ok(out)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping an AdminClient joins its polling thread (up to ~100 ms); keep
        // that off the async runtime's threads.
        let admin = self.admin.take();
        let meta = self.meta.take();
        let groups = std::mem::take(self.groups.get_mut().unwrap_or_else(|e| e.into_inner()));
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(move || drop((admin, meta, groups)));
            }
            Err(_) => drop((admin, meta, groups)),
        }
    }
}

impl std::fmt::Debug for ClusterAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAdmin")
            .field("cluster", &self.inner.cluster)
            .field("bootstrap", &self.inner.bootstrap)
            .field("cluster_id", &self.inner.cluster_id)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

impl ClusterAdmin {
    /// Connects to the registered cluster `spec` and checks its identity: the
    /// brokers must report the spec's `kafka_cluster_id`
    /// ([`KafkaError::ClusterIdMismatch`] otherwise). `timeout` bounds the
    /// connection and every later operation.
    pub async fn connect(
        spec: &ClusterSpec,
        base: &KafkaProperties,
        profiles: &SecurityProfiles,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let config = client_config(spec, base, profiles)?;
        let admin = Self::connect_with_config(&spec.id, config, timeout).await?;
        verify_cluster_id(spec, admin.cluster_id())?;
        Ok(admin)
    }

    /// Connects to a cluster known only by its bootstrap list (e.g. to read its
    /// id before registering it). Errors name the cluster by its bootstrap list.
    pub async fn connect_bootstrap(
        bootstrap: &str,
        base: &KafkaProperties,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let config = bootstrap_config(bootstrap, base, None)?;
        Self::connect_with_config(bootstrap, config, timeout).await
    }

    /// Connects with a ready rdkafka configuration (`bootstrap.servers` set);
    /// `cluster` names the cluster in errors. Reads the cluster id, so an
    /// unreachable cluster fails here with [`KafkaError::Unreachable`].
    pub async fn connect_with_config(
        cluster: &str,
        config: ClientConfig,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let bootstrap = config
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_string();
        crate::kafka::config::validate_bootstrap(&bootstrap)?;
        let cluster_s = cluster.to_string();
        let bootstrap_s = bootstrap.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<Inner, KafkaError> {
            let cfg_err = |e: RdKafkaError| KafkaError::Config {
                cluster: cluster_s.clone(),
                detail: format!("cannot create a kafka client: {e}"),
            };
            let meta = metadata_consumer(&config).map_err(cfg_err)?;
            let cluster_id = blocking_cluster_id(&cluster_s, &bootstrap_s, &meta, timeout)?;
            let admin: AdminClient<DefaultClientContext> = config.create().map_err(cfg_err)?;
            Ok(Inner {
                cluster: cluster_s,
                bootstrap: bootstrap_s,
                cluster_id,
                config,
                timeout,
                admin: Some(admin),
                meta: Some(meta),
                groups: Mutex::new(HashMap::new()),
            })
        });
        match tokio::time::timeout(timeout + GRACE, task).await {
            Ok(Ok(inner)) => Ok(ClusterAdmin {
                inner: Arc::new(inner?),
            }),
            Ok(Err(join)) => Err(KafkaError::Other {
                cluster: cluster.to_string(),
                detail: format!("connect: task failed: {join}"),
            }),
            Err(_) => Err(KafkaError::Unreachable {
                cluster: cluster.to_string(),
                bootstrap,
                timeout,
                detail: "connect: librdkafka did not return in time".into(),
            }),
        }
    }

    /// The cluster's name in errors: its registry id, or its bootstrap list.
    pub fn cluster(&self) -> &str {
        &self.inner.cluster
    }

    /// The bootstrap list this admin dialled.
    pub fn bootstrap(&self) -> &str {
        &self.inner.bootstrap
    }

    /// The Kafka cluster id the brokers reported when this admin connected.
    pub fn cluster_id(&self) -> &str {
        &self.inner.cluster_id
    }

    /// The timeout bounding each operation.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The rdkafka configuration used for this cluster (bootstrap, security,
    /// client id), e.g. to create producers and consumers for it.
    pub fn client_config(&self) -> &ClientConfig {
        &self.inner.config
    }

    async fn blocking<T, F>(&self, what: String, f: F) -> Result<T, KafkaError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, KafkaError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let limit = self.inner.timeout + GRACE;
        match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || f(&inner))).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(KafkaError::Other {
                cluster: self.inner.cluster.clone(),
                detail: format!("{what}: task failed: {join}"),
            }),
            Err(_) => Err(KafkaError::Transient {
                cluster: self.inner.cluster.clone(),
                detail: format!("{what}: no result within {limit:?}"),
            }),
        }
    }

    /// Reads the cluster id from the brokers again through a fresh connection
    /// (not the id cached at connect time), e.g. to re-check identity after the
    /// cluster was unreachable for a while.
    pub async fn fetch_cluster_id(&self) -> Result<String, KafkaError> {
        crate::kafka::identity::fetch_cluster_id(
            &self.inner.cluster,
            &self.inner.config,
            self.inner.timeout,
        )
        .await
    }

    /// [`ClusterAdmin::fetch_cluster_id`] checked against the id recorded in the
    /// registry: [`KafkaError::ClusterIdMismatch`] when the address now answers
    /// as another cluster.
    pub async fn verify_identity(&self, expected_kafka_cluster_id: &str) -> Result<(), KafkaError> {
        let found = self.fetch_cluster_id().await?;
        if found == expected_kafka_cluster_id {
            Ok(())
        } else {
            Err(KafkaError::ClusterIdMismatch {
                cluster: self.inner.cluster.clone(),
                bootstrap: self.inner.bootstrap.clone(),
                expected: expected_kafka_cluster_id.to_string(),
                found,
            })
        }
    }

    /// The partition count of `topic`, or `None` when it does not exist. Never
    /// creates the topic (auto-creation is disabled for this client).
    pub async fn topic_partitions(&self, topic: &str) -> Result<Option<u32>, KafkaError> {
        let topic = topic.to_string();
        self.blocking(format!("metadata of topic {topic}"), move |inner| {
            Ok(inner.blocking_topic(&topic, inner.timeout)?.map(|(n, _)| n))
        })
        .await
    }

    /// Makes sure `topic` exists with `partitions` partitions: creates it when
    /// missing (broker-default replication factor) and waits until every
    /// partition has a leader. An existing topic with another partition count
    /// is [`KafkaError::PartitionMismatch`]; it is never altered.
    pub async fn ensure_topic(
        &self,
        topic: &str,
        partitions: u32,
    ) -> Result<TopicStatus, KafkaError> {
        self.ensure_topic_with(topic, partitions, None, &KafkaProperties::new())
            .await
    }

    /// [`ClusterAdmin::ensure_topic`] with an explicit replication factor
    /// (`None`: broker default) and topic configs used when creating it.
    pub async fn ensure_topic_with(
        &self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
        topic_config: &KafkaProperties,
    ) -> Result<TopicStatus, KafkaError> {
        if partitions == 0 || partitions > i32::MAX as u32 {
            return Err(KafkaError::Config {
                cluster: self.inner.cluster.clone(),
                detail: format!("topic {topic}: invalid partition count {partitions}"),
            });
        }
        let mismatch = |found: u32| KafkaError::PartitionMismatch {
            cluster: self.inner.cluster.clone(),
            topic: topic.to_string(),
            expected: partitions,
            found,
        };
        let deadline = Instant::now() + self.inner.timeout;
        let status = match self.topic_partitions(topic).await? {
            Some(n) if n == partitions => TopicStatus::Existed,
            Some(n) => return Err(mismatch(n)),
            None => {
                let what = format!("create topic {topic}");
                let mut new = NewTopic::new(
                    topic,
                    partitions as i32,
                    TopicReplication::Fixed(replication.unwrap_or(-1)),
                );
                for (k, v) in topic_config.iter() {
                    new = new.set(k, v);
                }
                let opts = AdminOptions::new()
                    .request_timeout(Some(self.inner.timeout))
                    .operation_timeout(Some(self.inner.timeout));
                let fut = self.inner.admin().create_topics([&new], &opts);
                let res = self.inner.answer(&what, fut).await?;
                match res.into_iter().next() {
                    Some(Ok(_)) => TopicStatus::Created,
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
                        // Somebody else created it meanwhile: check what they made.
                        match self.wait_topic(topic, deadline).await? {
                            n if n == partitions => TopicStatus::Existed,
                            n => return Err(mismatch(n)),
                        }
                    }
                    Some(Err((_, code))) => {
                        return Err(from_code(&self.inner.cluster, code, &what))
                    }
                    None => {
                        return Err(KafkaError::Other {
                            cluster: self.inner.cluster.clone(),
                            detail: format!("{what}: empty result"),
                        })
                    }
                }
            }
        };
        let n = self.wait_topic(topic, deadline).await?;
        if n != partitions {
            return Err(mismatch(n));
        }
        Ok(status)
    }

    /// Waits until `topic` is visible with a leader for every partition;
    /// returns its partition count.
    async fn wait_topic(&self, topic: &str, deadline: Instant) -> Result<u32, KafkaError> {
        loop {
            let t = topic.to_string();
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(500));
            let found = self
                .blocking(format!("metadata of topic {topic}"), move |inner| {
                    inner.blocking_topic(&t, left)
                })
                .await?;
            if let Some((n, true)) = found {
                return Ok(n);
            }
            if Instant::now() >= deadline {
                return Err(KafkaError::Transient {
                    cluster: self.inner.cluster.clone(),
                    detail: format!(
                        "topic {topic} not visible with leaders within {:?} (found {found:?})",
                        self.inner.timeout
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The end offset (high watermark, exclusive) of partitions `0..partitions`
    /// of `topic`, in partition order: the handoff boundary on this cluster.
    ///
    /// One `ListOffsets` request per partition leader for all partitions at
    /// once (librdkafka's `offsets_for_times` with the special timestamp
    /// "latest"), not a watermark query per partition: the boundary read is
    /// part of every switch's pause, and a per-partition query costs a round
    /// trip per partition (64 partitions, 64 round trips).
    pub async fn end_offsets(&self, topic: &str, partitions: u32) -> Result<Vec<i64>, KafkaError> {
        let topic = topic.to_string();
        self.blocking(format!("end offsets of {topic}"), move |inner| {
            let what = format!("end offsets of {topic}");
            // Leadership moves and broker restarts are retried until the deadline.
            inner.retry_transient(RETRY_BACKOFF, |left| {
                inner.blocking_end_offsets(&what, &topic, partitions, left)
            })
        })
        .await
    }

    /// The offsets consumer group `group` has committed on this cluster for
    /// partitions `0..partitions` of `topic`, in partition order (`None`: no
    /// commit). Uses a consumer with that `group.id` (created on first use and
    /// kept for later calls) that never subscribes nor commits, so it never
    /// joins the group or disturbs its members.
    pub async fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: u32,
    ) -> Result<Vec<Option<i64>>, KafkaError> {
        let (group, topic) = (group.to_string(), topic.to_string());
        self.blocking(
            format!("committed offsets of group {group} on {topic}"),
            move |inner| {
                let what = format!("committed offsets of group {group} on {topic}");
                let consumer = inner.group_consumer(&group, &what)?;
                // A fresh cluster creates __consumer_offsets on the first group
                // request and answers "not coordinator" meanwhile: retry
                // transient errors until the deadline.
                inner.retry_transient(RETRY_BACKOFF, |left| {
                    inner.blocking_committed(&consumer, &what, &topic, partitions, left)
                })
            },
        )
        .await
    }

    /// Waits until the cluster hands out idempotent producer ids: on a fresh
    /// cluster the first request makes the brokers fetch a block of ids from
    /// their controller (about half a second on Kafka 4.4 here), which the
    /// first records a `FleetProducer` routes to the cluster — right after a
    /// switch to it — would otherwise wait for. `flotilla cluster activate`
    /// calls this, best effort. Creates (and drops) one idempotent producer;
    /// writes nothing.
    pub async fn ensure_producer_ids(&self) -> Result<(), KafkaError> {
        self.blocking("producer ids".to_string(), move |inner| {
            crate::kafka::producer_id::await_producer_id(
                &inner.cluster,
                &inner.config,
                inner.timeout,
            )
        })
        .await
    }

    /// Waits until the cluster's group coordinator answers, which on a fresh
    /// cluster makes the brokers create Kafka's offsets topic
    /// (`__consumer_offsets`).
    ///
    /// Kafka creates that topic on the first group request it receives and
    /// answers "coordinator not available" meanwhile; librdkafka then asks
    /// again only a second later. Without this, the first consumer group to
    /// use a new cluster — a `FleetConsumer` reading it right after a route
    /// switch — waits one to three seconds before its first record, with
    /// every partition of the cluster gated behind it. `flotilla cluster
    /// activate` calls this, so the wait happens before any route can use
    /// the cluster. Only asks for an offset (of a group and topic that need
    /// not exist): no group is joined or created.
    pub async fn ensure_group_coordinator(&self) -> Result<(), KafkaError> {
        self.blocking("group coordinator".to_string(), move |inner| {
            let what = format!("group coordinator (group {COORDINATOR_PROBE})");
            let consumer = inner.group_consumer(COORDINATOR_PROBE, &what)?;
            inner.retry_transient(COORDINATOR_BACKOFF, |left| {
                // Any answer comes from the coordinator: per-partition errors
                // (there is no such topic) do not matter.
                let mut probe = TopicPartitionList::with_capacity(1);
                probe.add_partition(COORDINATOR_PROBE, 0);
                consumer
                    .committed_offsets(probe, left)
                    .map(drop)
                    .map_err(|e| inner.err(&what, &e))
            })
        })
        .await
    }

    /// The topic configs of `topic` as the brokers report them (`None`: the
    /// topic does not exist).
    async fn topic_configs(
        &self,
        topic: &str,
    ) -> Result<Option<rdkafka::admin::ConfigResource>, KafkaError> {
        let what = format!("describe configs of topic {topic}");
        let opts = AdminOptions::new().request_timeout(Some(self.inner.timeout));
        let spec = ResourceSpecifier::Topic(topic);
        let fut = self.inner.admin().describe_configs([&spec], &opts);
        let res = self.inner.answer(&what, fut).await?;
        match res.into_iter().next() {
            Some(Ok(r)) => Ok(Some(r)),
            Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) => Ok(None),
            Some(Err(code)) => Err(from_code(&self.inner.cluster, code, &what)),
            None => Err(KafkaError::Other {
                cluster: self.inner.cluster.clone(),
                detail: format!("{what}: empty result"),
            }),
        }
    }

    /// Whether writes to `topic` are fenced ([`WRITE_FENCE_CONFIG`] is set on
    /// it); `None` when the topic does not exist.
    pub async fn is_write_fenced(&self, topic: &str) -> Result<Option<bool>, KafkaError> {
        Ok(self.topic_configs(topic).await?.map(|r| is_fenced(&r)))
    }

    /// Fences writes to `topic`: sets [`WRITE_FENCE_CONFIG`] on it, so every
    /// later produce request fails (`MESSAGE_TOO_LARGE`, never acknowledged)
    /// while reads and offset commits keep working. Idempotent; returns once
    /// the brokers report the new value. There is no way back: the fence is
    /// meant for a cluster that is about to be retired.
    ///
    /// rdkafka 0.39 only offers the legacy (non-incremental) AlterConfigs,
    /// which replaces the topic's whole dynamic config; the other dynamic
    /// topic configs (retention, cleanup policy, …) are therefore read first
    /// and written back unchanged. A config change by someone else between
    /// the read and the write would be undone.
    pub async fn fence_writes(&self, topic: &str) -> Result<WriteFenceStatus, KafkaError> {
        let what = format!("fence writes to topic {topic}");
        let Some(current) = self.topic_configs(topic).await? else {
            return Ok(WriteFenceStatus::NoSuchTopic);
        };
        if is_fenced(&current) {
            return Ok(WriteFenceStatus::AlreadyFenced);
        }
        let mut keep = Vec::new();
        for e in &current.entries {
            if e.source != ConfigSource::DynamicTopic || e.name == WRITE_FENCE_CONFIG.0 {
                continue;
            }
            // A dynamic value the brokers do not show cannot be written back:
            // refuse rather than reset it.
            let Some(v) = &e.value else {
                return Err(KafkaError::Other {
                    cluster: self.inner.cluster.clone(),
                    detail: format!(
                        "{what}: dynamic topic config {} is hidden (sensitive); it would be reset",
                        e.name
                    ),
                });
            };
            keep.push((e.name.clone(), v.clone()));
        }
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic))
            .set(WRITE_FENCE_CONFIG.0, WRITE_FENCE_CONFIG.1);
        for (k, v) in &keep {
            alter = alter.set(k, v);
        }
        let opts = AdminOptions::new().request_timeout(Some(self.inner.timeout));
        let fut = self.inner.admin().alter_configs([&alter], &opts);
        let res = self.inner.answer(&what, fut).await?;
        match res.into_iter().next() {
            Some(Ok(_)) => {}
            Some(Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))) => {
                return Ok(WriteFenceStatus::NoSuchTopic)
            }
            Some(Err((_, code))) => return Err(from_code(&self.inner.cluster, code, &what)),
            None => {
                return Err(KafkaError::Other {
                    cluster: self.inner.cluster.clone(),
                    detail: format!("{what}: empty result"),
                })
            }
        }
        // The controller quorum has committed the change; wait until the
        // brokers serve it, so the caller's next step sees the fence.
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            match self.is_write_fenced(topic).await? {
                Some(true) => return Ok(WriteFenceStatus::Fenced),
                None => return Ok(WriteFenceStatus::NoSuchTopic),
                Some(false) if Instant::now() >= deadline => {
                    return Err(KafkaError::Transient {
                        cluster: self.inner.cluster.clone(),
                        detail: format!(
                            "{what}: set, but not reported by the brokers within {:?}",
                            self.inner.timeout
                        ),
                    })
                }
                Some(false) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Deletes `topic` (for tests and cleanup) and waits until it is gone.
    /// Returns `false` when it did not exist.
    pub async fn delete_topic(&self, topic: &str) -> Result<bool, KafkaError> {
        let what = format!("delete topic {topic}");
        let opts = AdminOptions::new()
            .request_timeout(Some(self.inner.timeout))
            .operation_timeout(Some(self.inner.timeout));
        let fut = self.inner.admin().delete_topics(&[topic], &opts);
        let res = self.inner.answer(&what, fut).await?;
        match res.into_iter().next() {
            Some(Ok(_)) => {}
            Some(Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))) => return Ok(false),
            Some(Err((_, code))) => return Err(from_code(&self.inner.cluster, code, &what)),
            None => {}
        }
        let deadline = Instant::now() + self.inner.timeout;
        while self.topic_partitions(topic).await?.is_some() {
            if Instant::now() >= deadline {
                return Err(KafkaError::Transient {
                    cluster: self.inner.cluster.clone(),
                    detail: format!("{what}: still visible after {:?}", self.inner.timeout),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(true)
    }
}

/// Whether the described topic config carries the write fence.
fn is_fenced(r: &rdkafka::admin::ConfigResource) -> bool {
    r.get(WRITE_FENCE_CONFIG.0)
        .is_some_and(|e| e.value.as_deref() == Some(WRITE_FENCE_CONFIG.1))
}
