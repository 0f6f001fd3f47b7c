//! [`Backfill`]: the level-triggered driver of `flotilla backfill`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::kafka::{
    bootstrap_config, client_config, ClusterAdmin, KafkaError, KafkaProperties,
};
use flotilla_client::producer::{default_client_id, FleetProducer, FleetProducerConfig};
use flotilla_client::registry::{
    ClusterRole, ClusterSpec, ClusterState, Expect, LeaseId, RegistryError, WeightedCluster,
    SCHEMA_VERSION,
};
use flotilla_client::route::switch;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::progress::{LagDisplay, Reporter};
use super::provision;
use super::record::{
    check_name, BackfillRecord, BackfillStore, Bound, Checkpoint, PartitionRange, Phase,
    PreviousRoute, Source, TempCluster,
};
use super::replay::{self, Shared, WorkerJob};
use super::{BackfillError, BackfillOptions, HookPoint};
use crate::controller::{now_millis, Controller};
use crate::error::ControlError;
use crate::ops::{AddCluster, AddOutcome, ControlPlane, SetRoute};

/// Weight of every temporary cluster in the backfill's epoch (equal weights).
const TEMP_WEIGHT: u32 = 100;
/// TTL of the lease behind a backfill's driver lock.
const LOCK_TTL: Duration = Duration::from_secs(5);
/// How long the provision / deprovision command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// What `flotilla backfill start` asks for.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// Backfill name (unique in the fleet).
    pub name: String,
    /// `<cluster id or bootstrap>:<topic>`.
    pub source: String,
    /// Start of the range (inclusive).
    pub from: Bound,
    /// End of the range (exclusive).
    pub to: Bound,
    /// Topic the records are copied into.
    pub target_topic: String,
    /// Temporary clusters given by the operator: `(id, bootstrap)`.
    pub clusters: Vec<(String, String)>,
    /// Command bringing up one cluster (prints its bootstrap address), instead of `clusters`.
    pub provision_cmd: Option<String>,
    /// How many clusters `provision_cmd` brings up.
    pub count: usize,
    /// Command taking a cluster down (its bootstrap as last argument).
    pub deprovision_cmd: Option<String>,
    /// Consumer groups to wait for.
    pub groups: Vec<String>,
    /// Expiry of the temporary clusters, from now.
    pub expires_in: Duration,
}

/// The backfill driver over one fleet. Every method is safe to call again
/// after a crash: it reads the record and continues from its phase.
#[derive(Clone)]
pub struct Backfill {
    cp: ControlPlane,
    store: BackfillStore,
    opts: BackfillOptions,
}

/// The driver lock: a key under a lease, kept alive while the driver runs.
struct Lock {
    cp: ControlPlane,
    lease: LeaseId,
    keeper: tokio::task::JoinHandle<()>,
    /// Turns true when the lease could not be renewed: another driver may take over.
    lost: tokio::sync::watch::Receiver<bool>,
}

impl Lock {
    async fn release(self) {
        self.keeper.abort();
        let _ = self.cp.registry().kv().revoke(self.lease).await;
    }
}

impl Drop for Lock {
    /// A driver future dropped mid-way stops renewing its lock: the lease
    /// lapses after its TTL and another driver can take over.
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

fn lock_key(cp: &ControlPlane, name: &str) -> String {
    format!("{}backfill-locks/{name}", cp.registry().prefix())
}

impl Backfill {
    /// A driver acting through `cp` with `opts`.
    pub fn new(cp: ControlPlane, opts: BackfillOptions) -> Self {
        let store = BackfillStore::new(cp.registry().clone());
        Backfill { cp, store, opts }
    }

    /// The record store.
    pub fn store(&self) -> &BackfillStore {
        &self.store
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// The record of backfill `name`.
    pub async fn status(&self, name: &str) -> Result<BackfillRecord, BackfillError> {
        Ok(self.store.load(name).await?.0)
    }

    /// Every backfill of the fleet.
    pub async fn list(&self) -> Result<Vec<BackfillRecord>, BackfillError> {
        self.store.list().await
    }

    /// Validates `req` and registers the backfill (phase `provisioning`)
    /// without running it. Everything that can be checked is checked before
    /// the one write: a refused start leaves the registry unchanged.
    pub async fn prepare(&self, req: &StartRequest) -> Result<BackfillRecord, BackfillError> {
        let now = now_millis();
        check_name(&req.name)?;
        if self.store.get(&req.name).await?.is_some() {
            return Err(BackfillError::AlreadyExists(req.name.clone()));
        }
        let bad = |s: String| Err(BackfillError::BadInput(s));
        if req.target_topic.is_empty() {
            return bad("--target-topic is empty".into());
        }
        let clusters: Vec<TempCluster> = match (&req.provision_cmd, req.clusters.is_empty()) {
            (Some(_), false) => {
                return bad("give either --clusters or --provision-cmd, not both".into())
            }
            (None, true) => {
                return bad(
                    "no temporary clusters: give --clusters tmp1=<bootstrap>,... or --provision-cmd <cmd> --count N"
                        .into(),
                )
            }
            (Some(_), true) => {
                if req.count == 0 {
                    return bad("--count must be at least 1".into());
                }
                (1..=req.count)
                    .map(|i| TempCluster {
                        id: format!("{}-tmp{i}", req.name),
                        bootstrap: None,
                        provisioned: true,
                        deprovisioned: false,
                    })
                    .collect()
            }
            (None, false) => req
                .clusters
                .iter()
                .map(|(id, b)| TempCluster {
                    id: id.clone(),
                    bootstrap: Some(b.clone()),
                    provisioned: false,
                    deprovisioned: false,
                })
                .collect(),
        };
        let snap = self.cp.registry().snapshot().await?;
        let mut ids = BTreeSet::new();
        for c in &clusters {
            if !ids.insert(&c.id) {
                return bad(format!("temporary cluster id `{}` is given twice", c.id));
            }
            if let Some(spec) = snap.cluster(&c.id) {
                return bad(format!(
                    "cluster id `{}` is already registered ({}, {}); cluster ids are never reused — pick another id",
                    c.id, spec.bootstrap, spec.state
                ));
            }
            if let Some(b) = &c.bootstrap {
                flotilla_client::kafka::validate_bootstrap(b)?;
            }
        }
        for g in &req.groups {
            if g.is_empty() {
                return bad("--group is empty".into());
            }
        }
        let (source, source_cfg) = self.resolve_source(&req.source).await?;
        if source.cluster.is_some() && source.topic == req.target_topic {
            return bad(format!(
                "the target topic `{}` is the source topic: copy into another topic",
                req.target_topic
            ));
        }
        let admin = ClusterAdmin::connect_with_config(
            &source.bootstrap,
            source_cfg.clone(),
            self.opts.timeout,
        )
        .await?;
        let partitions = admin
            .topic_partitions(&source.topic)
            .await?
            .ok_or_else(|| {
                BackfillError::BadInput(format!(
                    "source topic `{}` does not exist on {}",
                    source.topic,
                    source.cluster.as_deref().unwrap_or(&source.bootstrap)
                ))
            })?;
        let ranges = resolve_ranges(
            source_cfg,
            &source.topic,
            partitions,
            req.from,
            req.to,
            self.opts.timeout,
        )
        .await?;
        let (previous_route, target_partitions) = match snap.route(&req.target_topic) {
            None => (None, partitions),
            Some(r) => {
                if let Some(p) = r.pending_epoch() {
                    return bad(format!(
                        "a route switch of `{}` is under way (epoch {} pending); let it finish first",
                        r.topic, p.n
                    ));
                }
                (
                    Some(PreviousRoute {
                        write: r.open_epoch().map(|e| e.write.clone()).unwrap_or_default(),
                    }),
                    r.partitions,
                )
            }
        };
        let rec = BackfillRecord {
            version: SCHEMA_VERSION,
            name: req.name.clone(),
            source,
            from: req.from,
            to: req.to,
            ranges,
            target_topic: req.target_topic.clone(),
            target_partitions,
            clusters,
            provision_cmd: req.provision_cmd.clone(),
            deprovision_cmd: req.deprovision_cmd.clone(),
            expires_at: now + req.expires_in.as_millis() as u64,
            groups: req.groups.clone(),
            previous_route,
            phase: Phase::Provisioning,
            checkpoint: None,
            epoch: None,
            skipped_duplicates: 0,
            last_error: None,
            notes: vec![],
            created_at: now,
            updated_at: now,
            phase_times: BTreeMap::from([(Phase::Provisioning.to_string(), now)]),
        };
        self.store.create(&rec).await?;
        Ok(rec)
    }

    /// Registers the backfill ([`Backfill::prepare`]) and runs it to the end.
    pub async fn start(&self, req: &StartRequest) -> Result<BackfillRecord, BackfillError> {
        self.prepare(req).await?;
        self.resume(&req.name).await
    }

    /// Runs backfill `name` from its current phase to `done` (or `aborted`,
    /// when an abort was under way).
    pub async fn resume(&self, name: &str) -> Result<BackfillRecord, BackfillError> {
        let (rec, _) = self.store.load(name).await?;
        if rec.phase.is_final() {
            return Err(BackfillError::Finished {
                name: name.into(),
                phase: rec.phase,
            });
        }
        let lock = self.lock(name).await?;
        let r = self.drive(name, lock.lost.clone()).await;
        if let Err(e) = &r {
            if !matches!(e, BackfillError::InjectedCrash(_)) {
                self.note_error(name, e).await;
            }
        }
        lock.release().await;
        r
    }

    /// Aborts backfill `name`: moves the target topic off the temporary
    /// clusters (back to its previous route, or deletes the route it created),
    /// drains and retires them, runs the deprovision command, marks it aborted.
    pub async fn abort(&self, name: &str) -> Result<BackfillRecord, BackfillError> {
        let (mut rec, mut rev) = self.store.load(name).await?;
        match rec.phase {
            Phase::Aborted => return Ok(rec),
            Phase::Done => {
                return Err(BackfillError::Finished {
                    name: name.into(),
                    phase: rec.phase,
                })
            }
            _ => {}
        }
        let lock = self.lock(name).await?;
        let r = async {
            (rec, rev) = self.store.load(name).await?;
            if rec.phase != Phase::Aborting {
                rec.notes
                    .push(format!("abort asked in phase {}", rec.phase));
                rec.enter(Phase::Aborting, now_millis());
                rev = self.save(&mut rec, rev).await?;
            }
            self.drive(name, lock.lost.clone()).await
        }
        .await;
        if let Err(e) = &r {
            self.note_error(name, e).await;
        }
        lock.release().await;
        r
    }

    async fn note_error(&self, name: &str, e: &BackfillError) {
        if let Ok(Some((mut rec, rev))) = self.store.get(name).await {
            rec.last_error = Some(e.to_string());
            let _ = self.save(&mut rec, rev).await;
        }
    }

    async fn lock(&self, name: &str) -> Result<Lock, BackfillError> {
        let kv = self.cp.registry().kv().clone();
        let key = lock_key(&self.cp, name);
        let holder = format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
            std::process::id()
        );
        // A crashed driver's lock lapses with its lease: wait that long.
        let deadline = tokio::time::Instant::now() + LOCK_TTL * 2 + Duration::from_secs(1);
        loop {
            let lease = kv.grant_lease(LOCK_TTL).await?;
            match kv
                .put_if(
                    &key,
                    holder.clone().into_bytes(),
                    Expect::Absent,
                    Some(lease),
                )
                .await
            {
                Ok(_) => {
                    let kv2 = kv.clone();
                    let (lost_tx, lost) = tokio::sync::watch::channel(false);
                    let keeper = tokio::spawn(async move {
                        let mut last_ok = tokio::time::Instant::now();
                        loop {
                            tokio::time::sleep(LOCK_TTL / 3).await;
                            match kv2.keep_alive(lease).await {
                                Ok(_) => last_ok = tokio::time::Instant::now(),
                                // Unreachable registry: the lease may still be
                                // alive; give up once it surely is not.
                                Err(e) if e.is_transient() && last_ok.elapsed() < LOCK_TTL => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "lost the backfill lock; stopping");
                                    let _ = lost_tx.send(true);
                                    return;
                                }
                            }
                        }
                    });
                    return Ok(Lock {
                        cp: self.cp.clone(),
                        lease,
                        keeper,
                        lost,
                    });
                }
                Err(RegistryError::Conflict { .. }) => {
                    let _ = kv.revoke(lease).await;
                    if tokio::time::Instant::now() >= deadline {
                        let holder = kv
                            .get(&key)
                            .await?
                            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
                            .unwrap_or_else(|| "another process".into());
                        return Err(BackfillError::Busy {
                            name: name.into(),
                            holder,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    let _ = kv.revoke(lease).await;
                    return Err(e.into());
                }
            }
        }
    }

    async fn save(&self, rec: &mut BackfillRecord, rev: i64) -> Result<i64, BackfillError> {
        rec.updated_at = now_millis();
        self.store.put(rec, rev).await
    }

    /// The level-triggered loop: run the phase the record is in until final.
    async fn drive(
        &self,
        name: &str,
        lost: tokio::sync::watch::Receiver<bool>,
    ) -> Result<BackfillRecord, BackfillError> {
        loop {
            let (mut rec, mut rev) = self.store.load(name).await?;
            if rec.last_error.is_some() {
                rec.last_error = None;
                rev = self.save(&mut rec, rev).await?;
            }
            if rec.phase.is_final() {
                return Ok(rec);
            }
            self.opts.fire(HookPoint::Phase(rec.phase))?;
            tracing::info!(backfill = %name, phase = %rec.phase, "backfill phase");
            match rec.phase {
                Phase::Provisioning => self.provision(&mut rec, rev).await?,
                Phase::Routing => self.route(&mut rec, rev).await?,
                Phase::Replaying => self.replay(&mut rec, rev, lost.clone()).await?,
                Phase::Waiting => self.wait(&mut rec, rev).await?,
                Phase::TearingDown => self.teardown(&mut rec, rev, Phase::Done).await?,
                Phase::Aborting => self.teardown(&mut rec, rev, Phase::Aborted).await?,
                Phase::Done | Phase::Aborted => unreachable!("final phases return above"),
            };
        }
    }

    async fn resolve_source(&self, s: &str) -> Result<(Source, ClientConfig), BackfillError> {
        let Some((left, topic)) = s
            .rsplit_once(':')
            .filter(|(l, t)| !l.is_empty() && !t.is_empty())
        else {
            return Err(BackfillError::BadInput(format!(
                "--source `{s}`: expected <cluster id or bootstrap>:<topic>"
            )));
        };
        if let Some((spec, _)) = self.cp.registry().cluster(left).await? {
            let cfg = client_config(&spec, &self.opts.kafka, &self.opts.profiles)?;
            return Ok((
                Source {
                    cluster: Some(spec.id.clone()),
                    bootstrap: spec.bootstrap.clone(),
                    kafka_cluster_id: spec.kafka_cluster_id.clone(),
                    topic: topic.into(),
                },
                cfg,
            ));
        }
        if !left.contains(':') {
            return Err(BackfillError::BadInput(format!(
                "--source `{s}`: `{left}` is neither a registered cluster nor a host:port bootstrap address"
            )));
        }
        let cfg = bootstrap_config(left, &self.opts.kafka, None)?;
        let admin = ClusterAdmin::connect_with_config(left, cfg.clone(), self.opts.timeout).await?;
        Ok((
            Source {
                cluster: None,
                bootstrap: left.into(),
                kafka_cluster_id: admin.cluster_id().to_string(),
                topic: topic.into(),
            },
            cfg,
        ))
    }

    /// The rdkafka configuration for the source, checking it is still the same cluster.
    async fn source_config(&self, src: &Source) -> Result<ClientConfig, BackfillError> {
        let cfg = match &src.cluster {
            Some(id) => {
                let (spec, _) = self
                    .cp
                    .registry()
                    .cluster(id)
                    .await?
                    .ok_or_else(|| ControlError::UnknownCluster(id.clone()))?;
                client_config(&spec, &self.opts.kafka, &self.opts.profiles)?
            }
            None => bootstrap_config(&src.bootstrap, &self.opts.kafka, None)?,
        };
        let admin =
            ClusterAdmin::connect_with_config(&src.bootstrap, cfg.clone(), self.opts.timeout)
                .await?;
        if !src.kafka_cluster_id.is_empty() && admin.cluster_id() != src.kafka_cluster_id {
            return Err(KafkaError::ClusterIdMismatch {
                cluster: src.bootstrap.clone(),
                bootstrap: src.bootstrap.clone(),
                expected: src.kafka_cluster_id.clone(),
                found: admin.cluster_id().to_string(),
            }
            .into());
        }
        Ok(cfg)
    }

    async fn temp_specs(&self, rec: &BackfillRecord) -> Result<Vec<ClusterSpec>, BackfillError> {
        let mut out = Vec::new();
        for c in &rec.clusters {
            let (spec, _) = self
                .cp
                .registry()
                .cluster(&c.id)
                .await?
                .ok_or_else(|| ControlError::UnknownCluster(c.id.clone()))?;
            out.push(spec);
        }
        Ok(out)
    }

    async fn provision(&self, rec: &mut BackfillRecord, mut rev: i64) -> Result<(), BackfillError> {
        for i in 0..rec.clusters.len() {
            if rec.clusters[i].bootstrap.is_some() {
                continue;
            }
            let cmd = rec.provision_cmd.clone().ok_or_else(|| {
                BackfillError::BadInput(format!(
                    "cluster {} has no bootstrap address and the backfill has no provision command",
                    rec.clusters[i].id
                ))
            })?;
            let id = rec.clusters[i].id.clone();
            let bootstrap = provision::provision(&cmd, &rec.name, &id, COMMAND_TIMEOUT).await?;
            tracing::info!(backfill = %rec.name, cluster = %id, %bootstrap, "provisioned a temporary cluster");
            rec.clusters[i].bootstrap = Some(bootstrap);
            // Recorded before anything else, so `abort` can always deprovision it.
            rev = self.save(rec, rev).await?;
        }
        let now = now_millis();
        for c in &rec.clusters {
            let bootstrap = c.bootstrap.clone().expect("provisioned above");
            let req = AddCluster {
                id: c.id.clone(),
                bootstrap,
                weight: TEMP_WEIGHT,
                role: ClusterRole::Temporary {
                    purpose: rec.name.clone(),
                    expires_at: rec.expires_at,
                },
                labels: BTreeMap::from([("backfill".to_string(), rec.name.clone())]),
                security_profile: None,
                activate: true,
            };
            let spec = match self.cp.add_cluster(req, now).await? {
                AddOutcome::Created { spec } | AddOutcome::AlreadyRegistered { spec } => spec,
            };
            let spec = match spec.state {
                ClusterState::Active => spec,
                ClusterState::Provisioning => self.cp.activate(&spec.id).await?,
                s => {
                    return Err(ControlError::Refused(format!(
                        "temporary cluster {} is {s}; the backfill cannot use it (abort it: `flotilla backfill abort {}`)",
                        spec.id, rec.name
                    ))
                    .into())
                }
            };
            // Copied records keep their (old) timestamps: time-based retention
            // would delete them before the consumers read them, so the target
            // topic keeps everything on the temporary clusters.
            let admin = ClusterAdmin::connect(
                &spec,
                &self.opts.kafka,
                &self.opts.profiles,
                self.opts.timeout,
            )
            .await?;
            admin
                .ensure_topic_with(
                    &rec.target_topic,
                    rec.target_partitions,
                    None,
                    &KafkaProperties::new().with("retention.ms", "-1"),
                )
                .await?;
        }
        rec.enter(Phase::Routing, now_millis());
        self.save(rec, rev).await?;
        Ok(())
    }

    fn temp_write(&self, rec: &BackfillRecord) -> Vec<WeightedCluster> {
        rec.clusters
            .iter()
            .map(|c| WeightedCluster {
                cluster: c.id.clone(),
                weight: TEMP_WEIGHT,
            })
            .collect()
    }

    async fn settle(&self, topic: &str) -> Result<(), BackfillError> {
        let report = Controller::new(self.cp.clone())
            .reconcile_until_settled(
                self.opts.ack_timeout + self.opts.timeout,
                Duration::from_millis(200),
            )
            .await?;
        for e in &report.errors {
            tracing::warn!("{e}");
        }
        let _ = topic;
        Ok(())
    }

    async fn route(&self, rec: &mut BackfillRecord, rev: i64) -> Result<(), BackfillError> {
        let write = self.temp_write(rec);
        let already = self
            .cp
            .registry()
            .route(&rec.target_topic)
            .await?
            .and_then(|(r, _)| r.open_epoch().cloned())
            .filter(|e| e.writes_exactly(&write));
        if already.is_none() {
            let req = SetRoute {
                topic: rec.target_topic.clone(),
                clusters: write
                    .iter()
                    .map(|w| (w.cluster.clone(), Some(w.weight)))
                    .collect(),
                partitions: Some(rec.target_partitions),
                ack_timeout_ms: self.opts.ack_timeout.as_millis() as u64,
            };
            self.cp.set_route(req, now_millis()).await?;
            self.settle(&rec.target_topic).await?;
        }
        let (route, _) = self
            .cp
            .registry()
            .route(&rec.target_topic)
            .await?
            .ok_or_else(|| ControlError::UnknownTopic(rec.target_topic.clone()))?;
        let open = route
            .open_epoch()
            .filter(|e| e.writes_exactly(&write))
            .ok_or_else(|| BackfillError::Timeout {
                name: rec.name.clone(),
                detail: format!(
                    "the switch of {} to the temporary clusters did not complete (producers did not acknowledge?)",
                    rec.target_topic
                ),
            })?;
        rec.epoch = Some(open.n);
        if rec.checkpoint.is_none() {
            let mut ends = BTreeMap::new();
            for spec in self.temp_specs(rec).await? {
                let e = self
                    .cp
                    .kafka()
                    .end_offsets(&spec, &rec.target_topic, rec.target_partitions)
                    .await?;
                ends.insert(spec.id.clone(), e);
            }
            rec.checkpoint = Some(Checkpoint {
                positions: rec.ranges.iter().map(|r| (r.partition, r.from)).collect(),
                target_ends: ends,
                records: 0,
                bytes: 0,
                at: now_millis(),
            });
        }
        rec.enter(Phase::Replaying, now_millis());
        self.save(rec, rev).await?;
        Ok(())
    }

    async fn replay(
        &self,
        rec: &mut BackfillRecord,
        mut rev: i64,
        lost: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), BackfillError> {
        let cp0 = rec.checkpoint.clone().unwrap_or_default();
        let specs = self.temp_specs(rec).await?;
        let bf_name = rec.name.clone();
        let replay_err = |detail: String| BackfillError::Replay {
            name: bf_name.clone(),
            detail,
        };
        // Dedupe: what a crashed run copied after its last checkpoint.
        let mut skip: HashMap<i32, HashSet<i64>> = HashMap::new();
        let unfinished = rec
            .ranges
            .iter()
            .any(|r| cp0.positions.get(&r.partition).copied().unwrap_or(r.from) < r.to);
        if unfinished {
            for spec in &specs {
                let to = self
                    .cp
                    .kafka()
                    .end_offsets(spec, &rec.target_topic, rec.target_partitions)
                    .await?;
                let from = cp0
                    .target_ends
                    .get(&spec.id)
                    .cloned()
                    .unwrap_or_else(|| vec![0; rec.target_partitions as usize]);
                let cfg = client_config(spec, &self.opts.kafka, &self.opts.profiles)?;
                let found = replay::dedupe_scan(
                    &spec.id,
                    cfg,
                    &rec.target_topic,
                    &from,
                    &to,
                    &cp0.positions,
                    self.opts.timeout,
                    &mut skip,
                )
                .await?;
                rec.skipped_duplicates += found;
                if found > 0 {
                    tracing::info!(backfill = %rec.name, cluster = %spec.id, records = found, "resume: records already copied after the last checkpoint are skipped");
                }
            }
        }
        let source = self.source_config(&rec.source).await?;
        let mut pcfg = FleetProducerConfig::new();
        pcfg.registry(self.cp.registry().clone())
            .profiles(self.opts.profiles.clone())
            .client_id(format!("backfill-{}-{}", rec.name, default_client_id()))
            .connect_timeout(self.opts.timeout);
        pcfg.kafka.merge(&self.opts.kafka);
        pcfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                self.opts.delivery_timeout.as_millis().to_string(),
            );
        if pcfg.get("linger.ms").is_none() {
            pcfg.set("linger.ms", "10");
        }
        if pcfg.get("compression.type").is_none() {
            pcfg.set("compression.type", "lz4");
        }
        pcfg.hold_capacity(self.opts.batch.max(1) * rec.ranges.len().max(1));
        let producer = FleetProducer::new(pcfg)
            .await
            .map_err(|e| replay_err(format!("starting the producer: {e}")))?;
        let shared = Arc::new(Shared::new(&rec.ranges, &cp0.positions));
        let reporter = Reporter::replay(self.opts.progress, &rec.name, shared.parts.clone());
        let mut workers = tokio::task::JoinSet::new();
        for (index, range) in rec.ranges.iter().enumerate() {
            let job = WorkerJob {
                name: rec.name.clone(),
                index,
                range: *range,
                skip: skip.remove(&range.partition).unwrap_or_default(),
                source: source.clone(),
                source_topic: rec.source.topic.clone(),
                target_topic: rec.target_topic.clone(),
                batch: self.opts.batch.max(1),
                idle_timeout: self.opts.timeout.max(Duration::from_secs(30)),
                hook: self.opts.hook.clone(),
            };
            workers.spawn(replay::run_worker(shared.clone(), job, producer.clone()));
        }
        let lost_fut = lock_lost(lost);
        tokio::pin!(lost_fut);
        let mut tick = tokio::time::interval(self.opts.checkpoint_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let outcome: Result<(), BackfillError> = loop {
            tokio::select! {
                r = workers.join_next() => match r {
                    None => break Ok(()),
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => break Err(replay_err(format!("copy worker failed: {e}"))),
                },
                _ = &mut lost_fut => {
                    break Err(BackfillError::LockLost(rec.name.clone()));
                }
                _ = tick.tick() => {
                    if let Err(e) = self.checkpoint(rec, &mut rev, &shared, &specs, &cp0, None).await {
                        break Err(e);
                    }
                }
            }
        };
        workers.abort_all();
        // No worker may hand the producer a record after this point.
        while workers.join_next().await.is_some() {}
        reporter.finish().await;
        match outcome {
            Err(e @ BackfillError::InjectedCrash(_)) => {
                // A simulated crash: nothing checkpointed. Its writes end
                // here, as a killed process's end with its connections: a
                // producer left running would keep writing after the
                // resume's dedupe scan (the in-process crash releases its
                // lock at once), which a real crash cannot do.
                let _ = producer.close(self.opts.timeout).await;
                Err(e)
            }
            Err(e @ BackfillError::LockLost(_)) => {
                // Another driver may own the backfill already: stop writing
                // at once (dropping purges what is queued), no flush.
                drop(producer);
                Err(e)
            }
            Err(e) => {
                // No checkpoint here: the aborted workers left records in
                // flight, so end offsets read now could cover records above
                // the positions. The last checkpoint stays valid; resume
                // dedupes from it.
                let _ = producer.close(self.opts.timeout).await;
                Err(e)
            }
            Ok(()) => {
                producer
                    .close(self.opts.timeout)
                    .await
                    .map_err(|e| replay_err(format!("closing the producer: {e}")))?;
                self.checkpoint(rec, &mut rev, &shared, &specs, &cp0, Some(Phase::Waiting))
                    .await?;
                tracing::info!(backfill = %rec.name, records = rec.total_records(), "replay complete");
                Ok(())
            }
        }
    }

    /// Writes a checkpoint: with the gate closed, reads positions and the
    /// target end offsets, then CASes them into the record (moving to `next` if given).
    async fn checkpoint(
        &self,
        rec: &mut BackfillRecord,
        rev: &mut i64,
        shared: &Shared,
        specs: &[ClusterSpec],
        base: &Checkpoint,
        next: Option<Phase>,
    ) -> Result<(), BackfillError> {
        let gate = shared.gate.write().await;
        let (sent, acked) = (
            shared.sent.load(std::sync::atomic::Ordering::SeqCst),
            shared.acked.load(std::sync::atomic::Ordering::SeqCst),
        );
        if sent != acked {
            // A worker failed with records in flight: end offsets read now
            // could cover records above the positions. Keep the last checkpoint.
            tracing::debug!(sent, acked, "checkpoint skipped: records in flight");
            return Ok(());
        }
        let positions = shared.positions(&rec.ranges);
        let mut ends = BTreeMap::new();
        for spec in specs {
            let e = self
                .cp
                .kafka()
                .end_offsets(spec, &rec.target_topic, rec.target_partitions)
                .await?;
            ends.insert(spec.id.clone(), e);
        }
        drop(gate);
        rec.checkpoint = Some(Checkpoint {
            positions,
            target_ends: ends,
            records: base.records + shared.acked.load(std::sync::atomic::Ordering::Relaxed),
            bytes: base.bytes
                + shared
                    .acked_bytes
                    .load(std::sync::atomic::Ordering::Relaxed),
            at: now_millis(),
        });
        if let Some(p) = next {
            rec.enter(p, now_millis());
        }
        *rev = self.save(rec, *rev).await?;
        Ok(())
    }

    async fn wait(&self, rec: &mut BackfillRecord, rev: i64) -> Result<(), BackfillError> {
        let specs = self.temp_specs(rec).await?;
        let started = tokio::time::Instant::now();
        let mut display: Option<LagDisplay> = None;
        loop {
            let (mut total, mut lag) = (0u64, 0u64);
            let mut behind = Vec::new();
            for spec in &specs {
                // The end offsets recorded when the replay finished cover every
                // copied record; live traffic written to the topic meanwhile is
                // fenced by the switch back (retirement waits for it), so the
                // wait does not chase a moving end.
                let ends = match rec
                    .checkpoint
                    .as_ref()
                    .and_then(|c| c.target_ends.get(&spec.id))
                {
                    Some(e) => e.clone(),
                    None => {
                        self.cp
                            .kafka()
                            .end_offsets(spec, &rec.target_topic, rec.target_partitions)
                            .await?
                    }
                };
                for g in &rec.groups {
                    let committed = self
                        .cp
                        .kafka()
                        .committed_offsets(spec, g, &rec.target_topic, rec.target_partitions)
                        .await?;
                    let mut l = 0;
                    for (end, c) in ends.iter().zip(committed) {
                        total += *end as u64;
                        l += (*end - c.unwrap_or(0).min(*end)).max(0) as u64;
                    }
                    if l > 0 {
                        behind.push(format!("{g}@{}: {l}", spec.id));
                    }
                    lag += l;
                }
            }
            self.opts.fire(HookPoint::Lag(lag))?;
            display
                .get_or_insert_with(|| LagDisplay::new(self.opts.progress, &rec.name, total))
                .update(total, lag, &behind.join(", "));
            if lag == 0 {
                break;
            }
            if self
                .opts
                .wait_timeout
                .is_some_and(|t| started.elapsed() >= t)
            {
                return Err(BackfillError::Timeout {
                    name: rec.name.clone(),
                    detail: format!("consumers still behind: {}", behind.join(", ")),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Some(d) = display {
            d.finish();
        }
        rec.enter(Phase::TearingDown, now_millis());
        self.save(rec, rev).await?;
        Ok(())
    }

    /// Moves the target topic off the temporary clusters: aborts a pending
    /// epoch onto them, switches back to the previous write set, or deletes
    /// the route the backfill created.
    async fn restore_route(&self, rec: &BackfillRecord) -> Result<(), BackfillError> {
        let temp: BTreeSet<String> = rec.cluster_ids().into_iter().collect();
        let touches = |e: &flotilla_client::registry::Epoch| e.clusters().any(|c| temp.contains(c));
        let Some((route, _)) = self.cp.registry().route(&rec.target_topic).await? else {
            return Ok(());
        };
        if let Some(p) = route.pending_epoch().filter(|p| touches(p)) {
            let n = p.n;
            self.cp
                .registry()
                .update_route(&rec.target_topic, |cur| match cur {
                    Some(cur) if cur.pending_epoch().is_some_and(|p| p.n == n) => {
                        Ok(Some(switch::abort(cur, n)?))
                    }
                    _ => Ok(None),
                })
                .await?;
        }
        let Some((route, route_rev)) = self.cp.registry().route(&rec.target_topic).await? else {
            return Ok(());
        };
        if route.pending_epoch().is_some() {
            // Our switch back, proposed by an earlier run: finish it.
            self.settle(&rec.target_topic).await?;
        } else if route.open_epoch().is_some_and(touches) {
            match rec.previous_route.as_ref().filter(|p| !p.write.is_empty()) {
                Some(prev) => {
                    let req = SetRoute {
                        topic: rec.target_topic.clone(),
                        clusters: prev
                            .write
                            .iter()
                            .map(|w| (w.cluster.clone(), Some(w.weight)))
                            .collect(),
                        partitions: Some(route.partitions),
                        ack_timeout_ms: self.opts.ack_timeout.as_millis() as u64,
                    };
                    self.cp.set_route(req, now_millis()).await?;
                    self.settle(&rec.target_topic).await?;
                }
                None => {
                    // The topic had no route before: the backfill's route goes away.
                    self.cp
                        .registry()
                        .delete_route(&rec.target_topic, Expect::ModRevision(route_rev))
                        .await?;
                    tracing::info!(backfill = %rec.name, topic = %rec.target_topic, "deleted the route the backfill created");
                }
            }
        }
        let (route, _) = match self.cp.registry().route(&rec.target_topic).await? {
            None => return Ok(()),
            Some(r) => r,
        };
        if route.pending_epoch().is_some() || route.open_epoch().is_some_and(touches) {
            return Err(BackfillError::Timeout {
                name: rec.name.clone(),
                detail: format!(
                    "the switch of {} off the temporary clusters did not complete",
                    rec.target_topic
                ),
            });
        }
        Ok(())
    }

    async fn teardown(
        &self,
        rec: &mut BackfillRecord,
        mut rev: i64,
        last: Phase,
    ) -> Result<(), BackfillError> {
        self.restore_route(rec).await?;
        let deadline = tokio::time::Instant::now() + self.opts.teardown_timeout;
        for c in rec.clusters.clone() {
            loop {
                let Some((spec, _)) = self.cp.registry().cluster(&c.id).await? else {
                    break;
                };
                let blocked = match spec.state {
                    ClusterState::Retired => break,
                    ClusterState::Provisioning | ClusterState::Active => {
                        match self.cp.drain(&c.id).await {
                            Ok(_) => continue,
                            Err(ControlError::Refused(why)) => why,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    ClusterState::Draining => match self.cp.retire(&c.id).await {
                        Ok(_) => {
                            tracing::info!(backfill = %rec.name, cluster = %c.id, "retired a temporary cluster");
                            break;
                        }
                        Err(ControlError::Refused(why)) => why,
                        Err(e) => return Err(e.into()),
                    },
                };
                if tokio::time::Instant::now() >= deadline {
                    return Err(BackfillError::Timeout {
                        name: rec.name.clone(),
                        detail: format!("cluster {} cannot retire yet: {blocked}", c.id),
                    });
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if let Some(cmd) = rec.deprovision_cmd.clone() {
            for i in 0..rec.clusters.len() {
                let c = rec.clusters[i].clone();
                let Some(b) = c.bootstrap.as_deref().filter(|_| !c.deprovisioned) else {
                    continue;
                };
                provision::deprovision(&cmd, &rec.name, &c.id, b, COMMAND_TIMEOUT).await?;
                rec.clusters[i].deprovisioned = true;
                rev = self.save(rec, rev).await?;
            }
        }
        rec.enter(last, now_millis());
        self.save(rec, rev).await?;
        Ok(())
    }
}

/// Completes once the driver lock is lost (never, if its keeper just ended).
async fn lock_lost(mut lost: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *lost.borrow_and_update() {
            return;
        }
        if lost.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves `[from, to)` on every partition of `topic` (watermarks and
/// offsets-for-times). A reversed or empty range is [`BackfillError::BadInput`].
async fn resolve_ranges(
    cfg: ClientConfig,
    topic: &str,
    partitions: u32,
    from: Bound,
    to: Bound,
    timeout: Duration,
) -> Result<Vec<PartitionRange>, BackfillError> {
    match (from, to) {
        (Bound::Offset(a), Bound::Offset(b)) | (Bound::Time(a), Bound::Time(b)) if a > b => {
            return Err(BackfillError::BadInput(format!(
                "the range is reversed: --from {from} is after --to {to}"
            )))
        }
        _ => {}
    }
    let topic = topic.to_string();
    let r = tokio::task::spawn_blocking(move || -> Result<Vec<PartitionRange>, BackfillError> {
        let mut cfg = cfg;
        cfg.set("group.id", "flotilla-backfill-resolve")
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer = cfg
            .create()
            .map_err(|e| BackfillError::BadInput(format!("source consumer: {e}")))?;
        let kerr = |what: &str, e: rdkafka::error::KafkaError| {
            BackfillError::from(flotilla_client::kafka::error::from_rdkafka(
                &topic, what, &e,
            ))
        };
        let mut out = Vec::new();
        for p in 0..partitions as i32 {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, timeout)
                .map_err(|e| kerr("watermarks", e))?;
            let at = |b: Bound, edge: i64| -> Result<i64, BackfillError> {
                Ok(match b {
                    Bound::Edge => edge,
                    Bound::Offset(o) => o.clamp(low, high),
                    Bound::Time(t) => {
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition_offset(&topic, p, Offset::Offset(t))
                            .map_err(|e| kerr("offsets for times", e))?;
                        let found = consumer
                            .offsets_for_times(tpl, timeout)
                            .map_err(|e| kerr("offsets for times", e))?;
                        let o = found
                            .find_partition(&topic, p)
                            .map(|e| e.offset())
                            .unwrap_or(Offset::End);
                        match o {
                            Offset::Offset(o) => o.clamp(low, high),
                            _ => high,
                        }
                    }
                })
            };
            let f = at(from, low)?;
            let t = at(to, high)?;
            if f > t {
                return Err(BackfillError::BadInput(format!(
                    "the range is reversed on partition {p}: --from {from} resolves to offset {f}, --to {to} to {t}"
                )));
            }
            out.push(PartitionRange {
                partition: p,
                from: f,
                to: t,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| BackfillError::BadInput(format!("resolving the range: {e}")))??;
    if r.iter().all(PartitionRange::is_empty) {
        return Err(BackfillError::BadInput(format!(
            "the range is empty: --from {from} --to {to} selects no record of the source topic"
        )));
    }
    Ok(r)
}
