//! [`Registry`]: typed registry operations over a [`KvStore`].
//!
//! Keys (all under `/flotilla/<fleet>/`): `clusters/<id>`, `topics/<topic>`,
//! `clients/<kind>/<id>` (under a lease) and `groups/<group>`. Every write is
//! conditional on the key's `mod_revision` (see [`Expect`]), so two operators
//! racing the same change never silently overwrite each other: one wins, the
//! other gets [`RegistryError::Conflict`].

use std::sync::Arc;
use std::time::Duration;

use super::kv::{Expect, KvStore, LeaseId, RegistryError, Revision};
use super::model::{
    decode, encode, ClientKind, ClientRecord, ClusterSpec, ClusterState, GroupRecord, ModelError,
    TopicRoute,
};
use super::snapshot::FleetSnapshot;

/// How many times [`Registry::update_route`] re-reads and retries after a conflict.
pub const UPDATE_RETRIES: usize = 8;

/// What a key under the fleet prefix designates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FleetKey {
    /// `clusters/<id>`.
    Cluster(String),
    /// `topics/<topic>`.
    Topic(String),
    /// `clients/<kind>/<id>`.
    Client(ClientKind, String),
    /// `groups/<group>`.
    Group(String),
}

impl FleetKey {
    /// Parses a key relative to the fleet prefix (e.g. `clusters/a`). Keys this
    /// version does not know (e.g. `groups/<g>/progress/...`) give `None`.
    pub fn parse(rel: &str) -> Option<FleetKey> {
        let (kind, rest) = rel.split_once('/')?;
        if rest.is_empty() {
            return None;
        }
        match kind {
            "clusters" if !rest.contains('/') => Some(FleetKey::Cluster(rest.into())),
            "topics" if !rest.contains('/') => Some(FleetKey::Topic(rest.into())),
            "groups" if !rest.contains('/') => Some(FleetKey::Group(rest.into())),
            "clients" => {
                let (k, id) = rest.split_once('/')?;
                let k = match k {
                    "producer" => ClientKind::Producer,
                    "consumer" => ClientKind::Consumer,
                    _ => return None,
                };
                (!id.is_empty() && !id.contains('/')).then(|| FleetKey::Client(k, id.into()))
            }
            _ => None,
        }
    }

    /// The key relative to the fleet prefix.
    pub fn relative(&self) -> String {
        match self {
            FleetKey::Cluster(id) => format!("clusters/{id}"),
            FleetKey::Topic(t) => format!("topics/{t}"),
            FleetKey::Client(k, id) => format!("clients/{k}/{id}"),
            FleetKey::Group(g) => format!("groups/{g}"),
        }
    }
}

fn mismatch(full_key: &str, field: &str, found: &str) -> ModelError {
    ModelError::Malformed {
        key: full_key.to_string(),
        reason: format!("{field} `{found}` does not match the key"),
    }
}

/// Decodes `value` (stored at `full_key`, designated by `key`) into `snap`,
/// replacing what was there. Checks that the value's id matches the key.
/// On error `snap` is unchanged.
pub fn apply_put(
    snap: &mut FleetSnapshot,
    key: &FleetKey,
    full_key: &str,
    value: &[u8],
) -> Result<(), ModelError> {
    match key {
        FleetKey::Cluster(id) => {
            let spec: ClusterSpec = decode(full_key, value)?;
            if &spec.id != id {
                return Err(mismatch(full_key, "cluster id", &spec.id));
            }
            snap.clusters.insert(id.clone(), spec);
        }
        FleetKey::Topic(t) => {
            let route: TopicRoute = decode(full_key, value)?;
            if &route.topic != t {
                return Err(mismatch(full_key, "topic", &route.topic));
            }
            snap.routes.insert(t.clone(), route);
        }
        FleetKey::Client(kind, id) => {
            let rec: ClientRecord = decode(full_key, value)?;
            if &rec.id != id || rec.kind != *kind {
                return Err(mismatch(
                    full_key,
                    "client",
                    &format!("{}/{}", rec.kind, rec.id),
                ));
            }
            snap.clients.insert((*kind, id.clone()), rec);
        }
        FleetKey::Group(g) => {
            let rec: GroupRecord = decode(full_key, value)?;
            if &rec.group != g {
                return Err(mismatch(full_key, "group", &rec.group));
            }
            snap.groups.insert(g.clone(), rec);
        }
    }
    Ok(())
}

/// Removes what `key` designates from `snap`.
pub fn apply_delete(snap: &mut FleetSnapshot, key: &FleetKey) {
    match key {
        FleetKey::Cluster(id) => {
            snap.clusters.remove(id);
        }
        FleetKey::Topic(t) => {
            snap.routes.remove(t);
        }
        FleetKey::Client(kind, id) => {
            snap.clients.remove(&(*kind, id.clone()));
        }
        FleetKey::Group(g) => {
            snap.groups.remove(g);
        }
    }
}

/// Copies what `key` designates from `from` into `to` (removing it from `to`
/// when `from` has none).
pub fn copy_key(from: &FleetSnapshot, to: &mut FleetSnapshot, key: &FleetKey) {
    apply_delete(to, key);
    match key {
        FleetKey::Cluster(id) => {
            if let Some(v) = from.clusters.get(id) {
                to.clusters.insert(id.clone(), v.clone());
            }
        }
        FleetKey::Topic(t) => {
            if let Some(v) = from.routes.get(t) {
                to.routes.insert(t.clone(), v.clone());
            }
        }
        FleetKey::Client(kind, id) => {
            if let Some(v) = from.clients.get(&(*kind, id.clone())) {
                to.clients.insert((*kind, id.clone()), v.clone());
            }
        }
        FleetKey::Group(g) => {
            if let Some(v) = from.groups.get(g) {
                to.groups.insert(g.clone(), v.clone());
            }
        }
    }
}

/// Typed access to one fleet's registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    kv: Arc<dyn KvStore>,
    fleet: String,
    prefix: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("fleet", &self.fleet)
            .field("endpoints", &self.kv.endpoints())
            .finish()
    }
}

impl Registry {
    /// The registry of `fleet` stored in `kv`.
    pub fn new(kv: Arc<dyn KvStore>, fleet: impl Into<String>) -> Registry {
        let fleet = fleet.into();
        let prefix = format!("/flotilla/{fleet}/");
        Registry { kv, fleet, prefix }
    }

    /// The same fleet, but every write also requires `guard` to hold, in the
    /// same transaction (see [`super::guarded::GuardedKv`]); a write whose
    /// guard fails is [`RegistryError::GuardFailed`] and changes nothing.
    pub fn guarded(&self, guard: super::kv::Guard) -> Registry {
        Registry {
            kv: Arc::new(super::guarded::GuardedKv::new(self.kv.clone(), guard)),
            fleet: self.fleet.clone(),
            prefix: self.prefix.clone(),
        }
    }

    /// The fleet name.
    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    /// The underlying store.
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    /// `/flotilla/<fleet>/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full key of `key`.
    pub fn key(&self, key: &FleetKey) -> String {
        format!("{}{}", self.prefix, key.relative())
    }

    /// Parses a full key of this fleet.
    pub fn parse_key(&self, full: &str) -> Option<FleetKey> {
        FleetKey::parse(full.strip_prefix(&self.prefix)?)
    }

    /// Reads the whole fleet at one revision. A malformed value is an error
    /// naming its key (nothing is skipped); keys this version does not know are ignored.
    pub async fn snapshot(&self) -> Result<FleetSnapshot, RegistryError> {
        let (entries, revision) = self.kv.list(&self.prefix).await?;
        let mut snap = FleetSnapshot {
            revision,
            ..FleetSnapshot::default()
        };
        for e in entries {
            if let Some(k) = self.parse_key(&e.key) {
                apply_put(&mut snap, &k, &e.key, &e.value)?;
            }
        }
        Ok(snap)
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        key: &FleetKey,
    ) -> Result<Option<(T, Revision)>, RegistryError> {
        let full = self.key(key);
        match self.kv.get(&full).await? {
            None => Ok(None),
            Some(e) => Ok(Some((decode(&full, &e.value)?, e.mod_revision))),
        }
    }

    /// The cluster `id` and its `mod_revision`.
    pub async fn cluster(
        &self,
        id: &str,
    ) -> Result<Option<(ClusterSpec, Revision)>, RegistryError> {
        self.read(&FleetKey::Cluster(id.into())).await
    }

    /// Registers a new cluster; [`RegistryError::AlreadyExists`] if the id is taken.
    pub async fn create_cluster(&self, spec: &ClusterSpec) -> Result<Revision, RegistryError> {
        check_id("cluster id", &spec.id)?;
        let key = self.key(&FleetKey::Cluster(spec.id.clone()));
        match self
            .kv
            .put_if(&key, encode(spec), Expect::Absent, None)
            .await
        {
            Err(RegistryError::Conflict { .. }) => Err(RegistryError::AlreadyExists {
                what: format!("cluster {}", spec.id),
            }),
            r => r,
        }
    }

    /// Moves cluster `id` to `state`: read, [`ClusterSpec::check_update`], CAS
    /// write. Already in `state`: nothing written. A backward move is
    /// [`ModelError::BackwardState`]; a concurrent change is [`RegistryError::Conflict`].
    pub async fn set_cluster_state(
        &self,
        id: &str,
        state: ClusterState,
    ) -> Result<(ClusterSpec, Revision), RegistryError> {
        let (cur, rev) = self
            .cluster(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                what: format!("cluster {id}"),
            })?;
        if cur.state == state {
            return Ok((cur, rev));
        }
        let next = ClusterSpec {
            state,
            ..cur.clone()
        };
        cur.check_update(&next)?;
        let key = self.key(&FleetKey::Cluster(id.into()));
        let rev = self
            .kv
            .put_if(&key, encode(&next), Expect::ModRevision(rev), None)
            .await?;
        Ok((next, rev))
    }

    /// Replaces cluster `id` with `next` if [`ClusterSpec::check_update`] allows it
    /// and the cluster is still at `expect_revision`.
    pub async fn update_cluster(
        &self,
        next: &ClusterSpec,
        expect_revision: Revision,
    ) -> Result<Revision, RegistryError> {
        let (cur, rev) = self
            .cluster(&next.id)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                what: format!("cluster {}", next.id),
            })?;
        // A stale writer hears "conflict" (re-read) before any verdict on its change.
        if rev != expect_revision {
            return Err(RegistryError::Conflict {
                key: self.key(&FleetKey::Cluster(next.id.clone())),
                expected: Expect::ModRevision(expect_revision),
                actual: Some(rev),
            });
        }
        cur.check_update(next)?;
        let key = self.key(&FleetKey::Cluster(next.id.clone()));
        self.kv
            .put_if(&key, encode(next), Expect::ModRevision(rev), None)
            .await
    }

    /// The route of `topic` and its `mod_revision`.
    pub async fn route(
        &self,
        topic: &str,
    ) -> Result<Option<(TopicRoute, Revision)>, RegistryError> {
        self.read(&FleetKey::Topic(topic.into())).await
    }

    /// Writes `route` if it is valid ([`TopicRoute::validate`]) and the stored
    /// one matches `expect` (`Absent` to create, `ModRevision` to update).
    pub async fn put_route(
        &self,
        route: &TopicRoute,
        expect: Expect,
    ) -> Result<Revision, RegistryError> {
        check_id("topic", &route.topic)?;
        route.validate()?;
        let key = self.key(&FleetKey::Topic(route.topic.clone()));
        self.kv.put_if(&key, encode(route), expect, None).await
    }

    /// Read-modify-CAS loop on the route of `topic`: `f` gets the current route
    /// (None: none yet) and returns the new one, or `None` to leave it as is.
    /// On a conflict it re-reads and calls `f` again, up to [`UPDATE_RETRIES`]
    /// times. Returns the route and revision as they are after the call.
    pub async fn update_route<F>(
        &self,
        topic: &str,
        mut f: F,
    ) -> Result<Option<(TopicRoute, Revision)>, RegistryError>
    where
        F: FnMut(Option<&TopicRoute>) -> Result<Option<TopicRoute>, RegistryError>,
    {
        let mut last = None;
        for _ in 0..=UPDATE_RETRIES {
            let cur = self.route(topic).await?;
            let Some(next) = f(cur.as_ref().map(|(r, _)| r))? else {
                return Ok(cur);
            };
            if next.topic != topic {
                return Err(ModelError::Invalid(format!(
                    "update of route {topic} returned a route for topic {}",
                    next.topic
                ))
                .into());
            }
            let expect = cur
                .as_ref()
                .map_or(Expect::Absent, |(_, r)| Expect::ModRevision(*r));
            match self.put_route(&next, expect).await {
                Ok(rev) => return Ok(Some((next, rev))),
                Err(e @ RegistryError::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Deletes the route of `topic` if it matches `expect`.
    pub async fn delete_route(
        &self,
        topic: &str,
        expect: Expect,
    ) -> Result<Revision, RegistryError> {
        self.kv
            .delete_if(&self.key(&FleetKey::Topic(topic.into())), expect)
            .await
    }

    /// Registers a live client: its record is put at `clients/<kind>/<id>` under
    /// a fresh lease of `ttl`, which the returned [`ClientLease`] keeps alive.
    /// [`RegistryError::AlreadyExists`] if a live client has that id.
    pub async fn register_client(
        &self,
        record: ClientRecord,
        ttl: Duration,
    ) -> Result<ClientLease, RegistryError> {
        check_id("client id", &record.id)?;
        let key = self.key(&FleetKey::Client(record.kind, record.id.clone()));
        let lease = self.kv.grant_lease(ttl).await?;
        match self
            .kv
            .put_if(&key, encode(&record), Expect::Absent, Some(lease))
            .await
        {
            Ok(revision) => Ok(ClientLease {
                registry: self.clone(),
                key,
                lease,
                ttl,
                record,
                revision,
            }),
            Err(e) => {
                let _ = self.kv.revoke(lease).await;
                Err(match e {
                    RegistryError::Conflict { .. } => RegistryError::AlreadyExists {
                        what: format!("live {} {}", record.kind, record.id),
                    },
                    e => e,
                })
            }
        }
    }

    /// The live client `kind`/`id`.
    pub async fn client(
        &self,
        kind: ClientKind,
        id: &str,
    ) -> Result<Option<(ClientRecord, Revision)>, RegistryError> {
        self.read(&FleetKey::Client(kind, id.into())).await
    }

    /// Registers (or updates) a consumer group. Unchanged: nothing written.
    pub async fn register_group(&self, record: &GroupRecord) -> Result<Revision, RegistryError> {
        check_id("group", &record.group)?;
        let key = self.key(&FleetKey::Group(record.group.clone()));
        let cur: Option<(GroupRecord, Revision)> =
            self.read(&FleetKey::Group(record.group.clone())).await?;
        let expect = match &cur {
            Some((g, rev)) if g == record => return Ok(*rev),
            Some((_, rev)) => Expect::ModRevision(*rev),
            None => Expect::Absent,
        };
        self.kv.put_if(&key, encode(record), expect, None).await
    }

    /// The consumer group `group`.
    pub async fn group(
        &self,
        group: &str,
    ) -> Result<Option<(GroupRecord, Revision)>, RegistryError> {
        self.read(&FleetKey::Group(group.into())).await
    }

    /// Deletes the consumer group `group` if it matches `expect`.
    pub async fn delete_group(
        &self,
        group: &str,
        expect: Expect,
    ) -> Result<Revision, RegistryError> {
        self.kv
            .delete_if(&self.key(&FleetKey::Group(group.into())), expect)
            .await
    }
}

fn check_id(what: &str, id: &str) -> Result<(), ModelError> {
    if id.is_empty() || id.contains('/') {
        return Err(ModelError::Invalid(format!(
            "{what} `{id}` must be non-empty and contain no `/`"
        )));
    }
    Ok(())
}

/// A registered client's record and lease. Call [`ClientLease::keep_alive`]
/// more often than the TTL; when the lease lapses the record disappears.
#[derive(Debug)]
pub struct ClientLease {
    registry: Registry,
    key: String,
    lease: LeaseId,
    ttl: Duration,
    record: ClientRecord,
    revision: Revision,
}

impl ClientLease {
    /// The lease id.
    pub fn lease_id(&self) -> LeaseId {
        self.lease
    }

    /// The record's full key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The TTL asked for.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The record as last written.
    pub fn record(&self) -> &ClientRecord {
        &self.record
    }

    /// Renews the lease once; [`RegistryError::LeaseExpired`] if it already lapsed
    /// (register again).
    pub async fn keep_alive(&self) -> Result<Duration, RegistryError> {
        self.registry.kv.keep_alive(self.lease).await
    }

    /// Spawns a task renewing the lease every `every` (pick about a third of the
    /// TTL). Transient errors are retried at the next tick; the task ends with
    /// the error that stopped it ([`RegistryError::LeaseExpired`]: register again).
    /// Abort the handle to stop renewing.
    pub fn spawn_keep_alive(&self, every: Duration) -> tokio::task::JoinHandle<RegistryError> {
        let kv = self.registry.kv.clone();
        let lease = self.lease;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match kv.keep_alive(lease).await {
                    Ok(_) => {}
                    Err(e) if e.is_transient() => {
                        tracing::warn!(lease, error = %e, "client lease keep-alive failed; retrying");
                    }
                    Err(e) => return e,
                }
            }
        })
    }

    /// Rewrites the record (e.g. newly acknowledged epochs), under the same lease.
    /// Kind and id cannot change.
    pub async fn update(&mut self, record: ClientRecord) -> Result<Revision, RegistryError> {
        if record.kind != self.record.kind || record.id != self.record.id {
            return Err(ModelError::Invalid(format!(
                "client record update changes its identity ({}/{} to {}/{})",
                self.record.kind, self.record.id, record.kind, record.id
            ))
            .into());
        }
        let rev = match self
            .registry
            .kv
            .put_if(
                &self.key,
                encode(&record),
                Expect::ModRevision(self.revision),
                Some(self.lease),
            )
            .await
        {
            // The record is gone: its lease lapsed.
            Err(RegistryError::Conflict { actual: None, .. }) => {
                return Err(RegistryError::LeaseExpired { lease: self.lease })
            }
            r => r?,
        };
        self.record = record;
        self.revision = rev;
        Ok(rev)
    }

    /// Revokes the lease, deleting the record now.
    pub async fn revoke(self) -> Result<(), RegistryError> {
        self.registry.kv.revoke(self.lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::conformance::{sample_cluster, sample_route};

    #[test]
    fn keys_parse_and_print_back() {
        let cases = [
            ("clusters/a", FleetKey::Cluster("a".into())),
            ("topics/orders", FleetKey::Topic("orders".into())),
            (
                "clients/producer/p-1",
                FleetKey::Client(ClientKind::Producer, "p-1".into()),
            ),
            (
                "clients/consumer/c",
                FleetKey::Client(ClientKind::Consumer, "c".into()),
            ),
            ("groups/g", FleetKey::Group("g".into())),
        ];
        for (rel, key) in cases {
            assert_eq!(FleetKey::parse(rel), Some(key.clone()), "{rel}");
            assert_eq!(key.relative(), rel);
        }
        for unknown in [
            "clusters/",
            "clusters",
            "groups/g/progress/x",
            "clients/robot/x",
            "clients/producer/",
            "other/x",
        ] {
            assert_eq!(FleetKey::parse(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn registry_keys_live_under_the_fleet_prefix() {
        let reg = Registry::new(
            Arc::new(crate::registry::memory::MemoryKv::default()),
            "prod",
        );
        let k = reg.key(&FleetKey::Topic("t".into()));
        assert_eq!(k, "/flotilla/prod/topics/t");
        assert_eq!(reg.parse_key(&k), Some(FleetKey::Topic("t".into())));
        assert_eq!(reg.parse_key("/flotilla/other/topics/t"), None);
    }

    #[test]
    fn apply_put_checks_the_id_against_the_key_and_leaves_the_snapshot_alone_on_error() {
        let mut snap = FleetSnapshot::default();
        let key = FleetKey::Cluster("a".into());
        apply_put(&mut snap, &key, "/k", &encode(&sample_cluster("a"))).unwrap();
        let before = snap.clone();
        let err = apply_put(&mut snap, &key, "/k", &encode(&sample_cluster("b"))).unwrap_err();
        assert!(matches!(err, ModelError::Malformed { .. }));
        assert!(apply_put(&mut snap, &key, "/k", b"nope").is_err());
        assert_eq!(snap, before);
        let topic = FleetKey::Topic("t".into());
        apply_put(&mut snap, &topic, "/t", &encode(&sample_route("t", &["a"]))).unwrap();
        let mut other = FleetSnapshot::default();
        copy_key(&snap, &mut other, &topic);
        assert_eq!(other.routes, snap.routes);
        apply_delete(&mut snap, &topic);
        assert!(snap.routes.is_empty());
        copy_key(&snap, &mut other, &topic);
        assert!(
            other.routes.is_empty(),
            "copying an absent value removes it"
        );
    }
}
