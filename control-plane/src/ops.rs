//! Control-plane operations: the library behind every `flotilla` command.
//!
//! Each operation validates everything it can *before* its single
//! compare-and-swap write, so a refused command leaves the registry exactly as
//! it was, and a concurrent operator's change makes it fail with a conflict
//! instead of being overwritten. Re-running a command that already took effect
//! is a no-op (idempotent).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::registry::{
    ClientRecord, ClusterRole, ClusterSpec, ClusterState, Expect, FleetSnapshot, Registry,
    RegistryError, TopicRoute, UnixMillis, WeightedCluster, SCHEMA_VERSION,
};
use flotilla_client::route::switch;
use serde::Serialize;

use crate::error::ControlError;
use crate::kafka::{FleetKafka, WriteFenceStatus};

/// How long the one-shot [`ControlPlane::retire`] waits after it set a write
/// fence before reading the end offsets for the drained check: long enough
/// for every broker of the cluster to apply the new topic config and for a
/// produce request validated just before the change to be appended (both
/// take milliseconds). The controller instead leaves the drained check to its
/// next pass.
pub const FENCE_SETTLE: Duration = Duration::from_secs(1);

/// What [`ControlPlane::fence_writes`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum FenceOutcome {
    /// Every topic of the cluster was already fenced (or the cluster holds none).
    InPlace,
    /// The fence was set just now on these topics.
    SetNow {
        /// Topics fenced by this call.
        topics: Vec<String>,
    },
}

/// A request to register a cluster.
#[derive(Debug, Clone)]
pub struct AddCluster {
    /// Registry id.
    pub id: String,
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// Default weight in routes.
    pub weight: u32,
    /// Permanent or temporary.
    pub role: ClusterRole,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Local security profile name.
    pub security_profile: Option<String>,
    /// Register as `active` instead of `provisioning`.
    pub activate: bool,
}

/// What [`ControlPlane::add_cluster`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum AddOutcome {
    /// The cluster was registered.
    Created {
        /// The stored spec.
        spec: ClusterSpec,
    },
    /// The same cluster (same bootstrap and Kafka cluster id) was already registered.
    AlreadyRegistered {
        /// The stored spec.
        spec: ClusterSpec,
    },
}

/// A request to set a topic's route (propose a new epoch).
#[derive(Debug, Clone)]
pub struct SetRoute {
    /// Topic.
    pub topic: String,
    /// Write set; `None` weight means the cluster's default weight.
    pub clusters: Vec<(String, Option<u32>)>,
    /// Partition count: required for a new topic, checked otherwise.
    pub partitions: Option<u32>,
    /// How long producers get to acknowledge the new epoch.
    pub ack_timeout_ms: u64,
}

/// What [`ControlPlane::set_route`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum RouteOutcome {
    /// A first epoch was created open: the topic had no route.
    Created {
        /// The stored route.
        route: TopicRoute,
    },
    /// A new epoch is pending; the controller completes the switch.
    Proposed {
        /// The stored route.
        route: TopicRoute,
    },
    /// The open (or pending) epoch already has exactly this write set.
    Unchanged {
        /// The stored route.
        route: TopicRoute,
    },
}

impl RouteOutcome {
    /// The route as stored after the operation.
    pub fn route(&self) -> &TopicRoute {
        match self {
            RouteOutcome::Created { route }
            | RouteOutcome::Proposed { route }
            | RouteOutcome::Unchanged { route } => route,
        }
    }
}

/// The fleet at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Registry revision of the view.
    pub revision: i64,
    /// Every cluster.
    pub clusters: Vec<ClusterSpec>,
    /// Every route.
    pub routes: Vec<TopicRoute>,
    /// Live clients with their acknowledged epochs.
    pub clients: Vec<ClientRecord>,
    /// Registered consumer groups.
    pub groups: Vec<String>,
}

/// Control-plane operations over one fleet's registry and its Kafka clusters.
#[derive(Clone)]
pub struct ControlPlane {
    registry: Registry,
    kafka: Arc<dyn FleetKafka>,
}

impl ControlPlane {
    /// Operations on `registry`, reaching clusters through `kafka`.
    pub fn new(registry: Registry, kafka: Arc<dyn FleetKafka>) -> Self {
        ControlPlane { registry, kafka }
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Kafka seam.
    pub fn kafka(&self) -> &Arc<dyn FleetKafka> {
        &self.kafka
    }

    /// Registers a cluster after reading its Kafka cluster id from the brokers
    /// (which also proves they answer). Re-adding the identical cluster is a no-op;
    /// an id already used by another cluster is refused.
    pub async fn add_cluster(
        &self,
        req: AddCluster,
        now: UnixMillis,
    ) -> Result<AddOutcome, ControlError> {
        if req.weight == 0 {
            return Err(ControlError::BadInput(format!(
                "cluster {}: weight must be at least 1",
                req.id
            )));
        }
        if let ClusterRole::Temporary { expires_at, .. } = req.role {
            if expires_at <= now {
                return Err(ControlError::BadInput(format!(
                    "cluster {}: expiry is in the past",
                    req.id
                )));
            }
        }
        // Fail on a taken id before dialling Kafka, so the common mistake is quick.
        if let Some((existing, _)) = self.registry.cluster(&req.id).await? {
            return self.same_cluster_or_refuse(existing, &req).await;
        }
        let kafka_cluster_id = self.kafka.read_cluster_id(&req.bootstrap).await?;
        let spec = ClusterSpec {
            version: SCHEMA_VERSION,
            id: req.id.clone(),
            bootstrap: req.bootstrap.clone(),
            kafka_cluster_id,
            state: if req.activate {
                ClusterState::Active
            } else {
                ClusterState::Provisioning
            },
            role: req.role.clone(),
            weight: req.weight,
            labels: req.labels.clone(),
            security_profile: req.security_profile.clone(),
            created_at: now,
        };
        if spec.state == ClusterState::Active {
            // Clients first use a cluster right after a route switch to it
            // (consumers with their partitions gated): ready it now.
            self.kafka.prepare_cluster(&spec).await?;
        }
        match self.registry.create_cluster(&spec).await {
            Ok(_) => Ok(AddOutcome::Created { spec }),
            Err(RegistryError::AlreadyExists { .. }) => {
                // Lost a race with another operator: fine if they registered the same cluster.
                let (existing, _) = self
                    .registry
                    .cluster(&req.id)
                    .await?
                    .ok_or_else(|| ControlError::UnknownCluster(req.id.clone()))?;
                self.same_cluster_or_refuse(existing, &req).await
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn same_cluster_or_refuse(
        &self,
        existing: ClusterSpec,
        req: &AddCluster,
    ) -> Result<AddOutcome, ControlError> {
        if existing.bootstrap == req.bootstrap
            && existing.role == req.role
            && existing.weight == req.weight
        {
            Ok(AddOutcome::AlreadyRegistered { spec: existing })
        } else {
            Err(ControlError::Refused(format!(
                "cluster id `{}` is already registered (bootstrap {}, state {}); cluster ids are never reused — pick another id",
                existing.id, existing.bootstrap, existing.state
            )))
        }
    }

    /// All clusters, by id.
    pub async fn clusters(&self) -> Result<Vec<ClusterSpec>, ControlError> {
        Ok(self
            .registry
            .snapshot()
            .await?
            .clusters
            .into_values()
            .collect())
    }

    /// One cluster.
    pub async fn cluster(&self, id: &str) -> Result<ClusterSpec, ControlError> {
        Ok(self
            .registry
            .cluster(id)
            .await?
            .ok_or_else(|| ControlError::UnknownCluster(id.into()))?
            .0)
    }

    /// `provisioning → active`, once the cluster is ready for traffic
    /// ([`FleetKafka::prepare_cluster`]). Idempotent.
    pub async fn activate(&self, id: &str) -> Result<ClusterSpec, ControlError> {
        let spec = self.cluster(id).await?;
        if spec.state == ClusterState::Provisioning {
            self.kafka.prepare_cluster(&spec).await?;
        }
        self.move_state_from(&spec, ClusterState::Active).await
    }

    /// `→ draining`: refused while an open or pending epoch writes to the cluster
    /// (move those topics off it with `route set` first). Idempotent.
    pub async fn drain(&self, id: &str) -> Result<ClusterSpec, ControlError> {
        let snap = self.registry.snapshot().await?;
        let spec = snap
            .cluster(id)
            .ok_or_else(|| ControlError::UnknownCluster(id.into()))?;
        if spec.state == ClusterState::Draining {
            return Ok(spec.clone());
        }
        let writing: Vec<&str> = snap
            .routes
            .values()
            .filter(|r| {
                r.open_epoch().is_some_and(|e| e.writes_to(id))
                    || r.pending_epoch().is_some_and(|e| e.writes_to(id))
            })
            .map(|r| r.topic.as_str())
            .collect();
        if !writing.is_empty() {
            return Err(ControlError::Refused(format!(
                "cluster {id} is still written by the open or pending epoch of {}: move them off it with `flotilla route set` first",
                writing.join(", ")
            )));
        }
        self.move_state(id, ClusterState::Draining).await
    }

    /// `→ retired`: refused while any route still writes to the cluster or any
    /// registered group of a topic it held has not consumed it up to its
    /// current end offsets (stragglers above the fence included).
    /// Idempotent.
    ///
    /// Writes to the cluster's topics are fenced first ([`ControlPlane::fence_writes`];
    /// a cluster that holds topics must be `draining`), then — after
    /// [`FENCE_SETTLE`] when the fence is new — the end offsets are read for
    /// the drained check: a record written later cannot be acknowledged, so
    /// nothing acknowledged is lost with the cluster.
    pub async fn retire(&self, id: &str) -> Result<ClusterSpec, ControlError> {
        let snap = self.registry.snapshot().await?;
        let spec = snap
            .cluster(id)
            .ok_or_else(|| ControlError::UnknownCluster(id.into()))?
            .clone();
        if spec.state == ClusterState::Retired {
            return Ok(spec);
        }
        if let FenceOutcome::SetNow { .. } = self.fence_writes(&snap, &spec).await? {
            tokio::time::sleep(FENCE_SETTLE).await;
        }
        self.check_retirable(&snap, &spec).await?;
        self.move_state_from(&spec, ClusterState::Retired).await
    }

    /// Fences writes to every topic `spec` held (every route with an epoch
    /// that wrote to it) at the Kafka level, so that no record can be
    /// acknowledged on the cluster any more: the step before the drained
    /// check of retirement. Level-triggered and idempotent: the fence lives
    /// in the topics' configs on the cluster, so a new leader (or a one-shot
    /// command) finds it in place; there is nothing to record in the registry.
    ///
    /// Refused while an open or pending epoch still writes to the cluster
    /// (fencing it would fail live producers), and for a cluster that holds
    /// topics but is not `draining` (a route could be proposed to an active
    /// cluster meanwhile): drain it first.
    pub async fn fence_writes(
        &self,
        snap: &FleetSnapshot,
        spec: &ClusterSpec,
    ) -> Result<FenceOutcome, ControlError> {
        // The structural refusals of retirement, before Kafka is touched.
        switch::may_retire(&spec.id, snap.routes.values(), |_, _, _| true)
            .map_err(ControlError::Refused)?;
        let topics: Vec<&TopicRoute> = snap
            .routes
            .values()
            .filter(|r| r.epochs.iter().any(|e| e.writes_to(&spec.id)))
            .collect();
        if topics.is_empty() {
            return Ok(FenceOutcome::InPlace);
        }
        if spec.state != ClusterState::Draining {
            return Err(ControlError::Refused(format!(
                "cluster {} is {}: drain it first (`flotilla cluster drain {}`); its writes are fenced before it retires",
                spec.id, spec.state, spec.id
            )));
        }
        let mut set_now = Vec::new();
        for route in topics {
            match self.kafka.fence_writes(spec, &route.topic).await? {
                WriteFenceStatus::Fenced => set_now.push(route.topic.clone()),
                WriteFenceStatus::AlreadyFenced | WriteFenceStatus::NoSuchTopic => {}
            }
        }
        if set_now.is_empty() {
            Ok(FenceOutcome::InPlace)
        } else {
            tracing::info!(cluster = %spec.id, topics = ?set_now, "writes fenced before retirement");
            Ok(FenceOutcome::SetNow { topics: set_now })
        }
    }

    /// Why `spec` may not retire yet, if anything stops it. Call it after
    /// [`ControlPlane::fence_writes`] found the fence in place: without the
    /// fence, a record written after the check could be acknowledged and then
    /// lost with the cluster.
    pub async fn check_retirable(
        &self,
        snap: &FleetSnapshot,
        spec: &ClusterSpec,
    ) -> Result<(), ControlError> {
        let drained = self.group_progress(snap, spec).await?;
        // Every registered group of the topic must have drained the cluster (to
        // its end offsets, not only its fences); a group we have no answer for
        // counts as not done.
        switch::may_retire(&spec.id, snap.routes.values(), |topic, epoch, _cluster| {
            snap.groups
                .values()
                .filter(|g| g.topics.iter().any(|t| t == topic))
                .all(|g| {
                    drained
                        .get(&(g.group.clone(), topic.to_string(), epoch))
                        .copied()
                        .unwrap_or(false)
                })
        })
        .map_err(ControlError::Refused)
    }

    /// For every sealed epoch that wrote to `spec`, whether each registered group
    /// reading that topic has drained the cluster: committed every partition up
    /// to the cluster's **current end offset** (lag 0), not only up to the
    /// epoch's fence. Records can land above the fence after the seal
    /// (stragglers: producers the controller stopped waiting for at the ack
    /// deadline, or that lost their lease); they must be consumed before the
    /// cluster may go. The cluster is `draining` when the controller asks, so
    /// live producers no longer write to it, and its writes are fenced
    /// ([`ControlPlane::fence_writes`]), so the end offsets read here are final:
    /// a writer the registry no longer reaches (a zombie, late retries) can
    /// no longer land anything after the check (docs/handoff.md, "The write fence").
    async fn group_progress(
        &self,
        snap: &FleetSnapshot,
        spec: &ClusterSpec,
    ) -> Result<BTreeMap<(String, String, u64), bool>, ControlError> {
        let mut out = BTreeMap::new();
        for route in snap.routes.values() {
            let epochs: Vec<u64> = route
                .sealed_epochs()
                .filter(|e| e.writes_to(&spec.id))
                .map(|e| e.n)
                .collect();
            if epochs.is_empty() {
                continue;
            }
            // The end offsets are read before the committed offsets, so a
            // record that lands in between is simply left for the next pass.
            let ends = self
                .kafka
                .end_offsets(spec, &route.topic, route.partitions)
                .await?;
            for group in snap
                .groups
                .values()
                .filter(|g| g.topics.contains(&route.topic))
            {
                let committed = self
                    .kafka
                    .committed_offsets(spec, &group.group, &route.topic, route.partitions)
                    .await?;
                let drained = ends.len() == route.partitions as usize
                    && ends
                        .iter()
                        .zip(committed.iter().chain(std::iter::repeat(&None)))
                        .all(|(end, c)| *end == 0 || c.is_some_and(|c| c >= *end));
                for n in &epochs {
                    out.insert((group.group.clone(), route.topic.clone(), *n), drained);
                }
            }
        }
        Ok(out)
    }

    async fn move_state(&self, id: &str, to: ClusterState) -> Result<ClusterSpec, ControlError> {
        let spec = self.cluster(id).await?;
        self.move_state_from(&spec, to).await
    }

    async fn move_state_from(
        &self,
        spec: &ClusterSpec,
        to: ClusterState,
    ) -> Result<ClusterSpec, ControlError> {
        if spec.state == to {
            return Ok(spec.clone());
        }
        if !spec.state.can_move_to(to) {
            return Err(ControlError::Refused(format!(
                "cluster {} is {}; it cannot become {} (states only move forward: provisioning → active → draining → retired)",
                spec.id, spec.state, to
            )));
        }
        Ok(self.registry.set_cluster_state(&spec.id, to).await?.0)
    }

    /// The route of `topic`.
    pub async fn route(&self, topic: &str) -> Result<TopicRoute, ControlError> {
        Ok(self
            .registry
            .route(topic)
            .await?
            .ok_or_else(|| ControlError::UnknownTopic(topic.into()))?
            .0)
    }

    /// Proposes a new epoch for `req.topic` writing to `req.clusters`.
    ///
    /// Checks every cluster (registered, active, weight ≥ 1), the partition
    /// count, and creates the topic with that count on every cluster of the
    /// write set where it is missing — all before the one compare-and-swap
    /// write of the route. A topic without a route gets an open epoch 1 at once;
    /// otherwise the new epoch is pending until the controller seals the old one.
    pub async fn set_route(
        &self,
        req: SetRoute,
        now: UnixMillis,
    ) -> Result<RouteOutcome, ControlError> {
        let snap = self.registry.snapshot().await?;
        let mut write = Vec::with_capacity(req.clusters.len());
        for (id, weight) in &req.clusters {
            let spec = snap
                .cluster(id)
                .ok_or_else(|| ControlError::UnknownCluster(id.clone()))?;
            let weight = weight.unwrap_or(spec.weight);
            if weight == 0 {
                return Err(ControlError::BadInput(format!(
                    "cluster {id}: weight must be at least 1"
                )));
            }
            write.push(WeightedCluster {
                cluster: id.clone(),
                weight,
            });
        }
        // The route is read with its revision: the final write is a CAS on it.
        let (current, current_rev) = match self.registry.route(&req.topic).await? {
            Some((r, rev)) => (Some(r), Some(rev)),
            None => (None, None),
        };
        let partitions = match (&current, req.partitions) {
            (Some(r), Some(p)) if r.partitions != p => {
                return Err(ControlError::BadInput(format!(
                    "topic {} has {} partitions on every cluster; a route cannot change it (asked for {p})",
                    req.topic, r.partitions
                )))
            }
            (Some(r), _) => r.partitions,
            (None, Some(p)) if p > 0 => p,
            (None, _) => {
                return Err(ControlError::BadInput(format!(
                    "topic {} has no route yet: give its partition count with --partitions",
                    req.topic
                )))
            }
        };
        if let Some(cur) = &current {
            let same = |e: &flotilla_client::registry::Epoch| e.writes_exactly(&write);
            // Re-running the same command is a no-op, not an error.
            if cur.pending_epoch().or(cur.open_epoch()).is_some_and(same)
                && cur.pending_epoch().is_none_or(same)
            {
                return Ok(RouteOutcome::Unchanged { route: cur.clone() });
            }
        }
        let next = switch::propose(
            current.as_ref(),
            &req.topic,
            partitions,
            write.clone(),
            &snap.clusters,
            now,
            req.ack_timeout_ms,
        )?;
        for w in &write {
            let spec = &snap.clusters[&w.cluster];
            self.kafka
                .ensure_topic(spec, &req.topic, partitions)
                .await?;
        }
        let expect = current_rev.map_or(Expect::Absent, Expect::ModRevision);
        self.registry.put_route(&next, expect).await?;
        Ok(if current.is_none() {
            RouteOutcome::Created { route: next }
        } else {
            RouteOutcome::Proposed { route: next }
        })
    }

    /// Aborts the pending epoch of `topic` (producers resume on the open one).
    /// Refused when no switch is pending; a concurrent change is a conflict.
    pub async fn abort_switch(&self, topic: &str) -> Result<TopicRoute, ControlError> {
        let (route, rev) = self
            .registry
            .route(topic)
            .await?
            .ok_or_else(|| ControlError::UnknownTopic(topic.into()))?;
        let pending = route.pending_epoch().ok_or_else(|| {
            ControlError::Refused(format!("topic {topic} has no pending switch to abort"))
        })?;
        let next = switch::abort(&route, pending.n)?;
        self.registry
            .put_route(&next, Expect::ModRevision(rev))
            .await?;
        Ok(next)
    }

    /// The fleet at a glance.
    pub async fn status(&self) -> Result<Status, ControlError> {
        let snap = self.registry.snapshot().await?;
        Ok(Status {
            revision: snap.revision,
            clusters: snap.clusters.values().cloned().collect(),
            routes: snap.routes.values().cloned().collect(),
            clients: snap.clients.values().cloned().collect(),
            groups: snap.groups.keys().cloned().collect(),
        })
    }
}
