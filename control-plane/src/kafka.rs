//! The control plane's view of Kafka: the few cluster operations it needs,
//! behind a small trait so the controller logic does not care whether the
//! clusters are real (rdkafka) or simulated.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
pub use flotilla_client::kafka::admin::{WriteFenceStatus, WRITE_FENCE_CONFIG};
use flotilla_client::kafka::{ClusterAdmin, KafkaError, KafkaProperties, SecurityProfiles};
use flotilla_client::registry::ClusterSpec;

/// Cluster operations the control plane performs.
#[async_trait]
pub trait FleetKafka: Send + Sync {
    /// Reads the Kafka cluster id at `bootstrap` (before a cluster is registered).
    async fn read_cluster_id(&self, bootstrap: &str) -> Result<String, KafkaError>;
    /// Creates `topic` with `partitions` on the cluster, or checks the count when present.
    async fn ensure_topic(
        &self,
        spec: &ClusterSpec,
        topic: &str,
        partitions: u32,
    ) -> Result<(), KafkaError>;
    /// End offsets (high watermarks) of every partition: the handoff boundary.
    async fn end_offsets(
        &self,
        spec: &ClusterSpec,
        topic: &str,
        partitions: u32,
    ) -> Result<Vec<i64>, KafkaError>;
    /// The offsets `group` has committed on the cluster, per partition.
    async fn committed_offsets(
        &self,
        spec: &ClusterSpec,
        group: &str,
        topic: &str,
        partitions: u32,
    ) -> Result<Vec<Option<i64>>, KafkaError>;
    /// Readies the cluster for traffic before it may be routed to: waits until
    /// its group coordinator answers (on a fresh Kafka cluster, the first
    /// group request creates `__consumer_offsets`; see
    /// [`ClusterAdmin::ensure_group_coordinator`]), and — best effort, a
    /// warning if not — until it hands out idempotent producer ids
    /// ([`ClusterAdmin::ensure_producer_ids`]). Either would otherwise be paid
    /// by the first consumers and producers to use the cluster, right after a
    /// route switch. The default does nothing (a simulated fleet has nothing
    /// to prepare).
    async fn prepare_cluster(&self, spec: &ClusterSpec) -> Result<(), KafkaError> {
        let _ = spec;
        Ok(())
    }
    /// Fences writes to `topic` on the cluster before it retires: once this
    /// returns, no produce request can be acknowledged any more (late records
    /// fail at their producer instead of landing after the drained check),
    /// while reads and offset commits keep working. Idempotent; says whether
    /// the fence was already in place. See docs/handoff.md, "The write fence".
    ///
    /// The default refuses: a [`FleetKafka`] that cannot fence must not let a
    /// cluster retire, or records acknowledged after the check would be lost.
    async fn fence_writes(
        &self,
        spec: &ClusterSpec,
        topic: &str,
    ) -> Result<WriteFenceStatus, KafkaError> {
        Err(KafkaError::Other {
            cluster: spec.id.clone(),
            detail: format!(
                "cannot fence writes to topic {topic}: not supported by this FleetKafka"
            ),
        })
    }
}

/// [`FleetKafka`] over real clusters through rdkafka: one cached
/// [`ClusterAdmin`] per registered cluster, whose id is checked on connect.
pub struct RdKafkaFleet {
    base: KafkaProperties,
    profiles: SecurityProfiles,
    timeout: Duration,
    admins: Mutex<HashMap<String, ClusterAdmin>>,
    fence: bool,
}

impl RdKafkaFleet {
    /// Clients with `base` properties, local security `profiles` and `timeout` per operation.
    pub fn new(base: KafkaProperties, profiles: SecurityProfiles, timeout: Duration) -> Self {
        RdKafkaFleet {
            base,
            profiles,
            timeout,
            admins: Mutex::new(HashMap::new()),
            fence: true,
        }
    }

    /// Does not fence writes before retirement: [`FleetKafka::fence_writes`]
    /// reports [`WriteFenceStatus::AlreadyFenced`] without touching the
    /// cluster. Only for clusters that cannot alter topic configs (librdkafka's
    /// mock clusters in the demo); a record acknowledged after the drained
    /// check is then lost with the cluster.
    pub fn without_write_fence(mut self) -> Self {
        self.fence = false;
        self
    }

    async fn admin(&self, spec: &ClusterSpec) -> Result<ClusterAdmin, KafkaError> {
        if let Some(a) = self.admins.lock().expect("admin cache").get(&spec.id) {
            return Ok(a.clone());
        }
        // Connecting verifies the cluster id against the registry: a bootstrap
        // address that now answers for another cluster is refused here.
        let admin = ClusterAdmin::connect(spec, &self.base, &self.profiles, self.timeout).await?;
        self.admins
            .lock()
            .expect("admin cache")
            .insert(spec.id.clone(), admin.clone());
        Ok(admin)
    }

    fn forget(&self, spec: &ClusterSpec) {
        self.admins.lock().expect("admin cache").remove(&spec.id);
    }

    async fn with_admin<T, F, Fut>(&self, spec: &ClusterSpec, f: F) -> Result<T, KafkaError>
    where
        F: FnOnce(ClusterAdmin) -> Fut,
        Fut: std::future::Future<Output = Result<T, KafkaError>>,
    {
        let admin = self.admin(spec).await?;
        let r = f(admin).await;
        if r.is_err() {
            // A failed cluster may come back at another address; reconnect (and re-verify) next time.
            self.forget(spec);
        }
        r
    }
}

#[async_trait]
impl FleetKafka for RdKafkaFleet {
    async fn read_cluster_id(&self, bootstrap: &str) -> Result<String, KafkaError> {
        flotilla_client::kafka::read_cluster_id(bootstrap, &self.base, None, self.timeout).await
    }

    async fn ensure_topic(
        &self,
        spec: &ClusterSpec,
        topic: &str,
        partitions: u32,
    ) -> Result<(), KafkaError> {
        self.with_admin(spec, |a| async move {
            a.ensure_topic(topic, partitions).await.map(|_| ())
        })
        .await
    }

    async fn end_offsets(
        &self,
        spec: &ClusterSpec,
        topic: &str,
        partitions: u32,
    ) -> Result<Vec<i64>, KafkaError> {
        self.with_admin(
            spec,
            |a| async move { a.end_offsets(topic, partitions).await },
        )
        .await
    }

    async fn committed_offsets(
        &self,
        spec: &ClusterSpec,
        group: &str,
        topic: &str,
        partitions: u32,
    ) -> Result<Vec<Option<i64>>, KafkaError> {
        self.with_admin(spec, |a| async move {
            a.committed_offsets(group, topic, partitions).await
        })
        .await
    }

    async fn prepare_cluster(&self, spec: &ClusterSpec) -> Result<(), KafkaError> {
        self.with_admin(spec, |a| async move {
            a.ensure_group_coordinator().await?;
            // A cluster can serve producers without idempotence (a client
            // setting), so this one does not refuse the activation.
            if let Err(e) = a.ensure_producer_ids().await {
                tracing::warn!(cluster = %spec.id, error = %e, "cluster gives no idempotent producer id yet; the first idempotent producers will wait for one");
            }
            Ok(())
        })
        .await
    }

    async fn fence_writes(
        &self,
        spec: &ClusterSpec,
        topic: &str,
    ) -> Result<WriteFenceStatus, KafkaError> {
        if !self.fence {
            return Ok(WriteFenceStatus::AlreadyFenced);
        }
        self.with_admin(spec, |a| async move { a.fence_writes(topic).await })
            .await
    }
}
