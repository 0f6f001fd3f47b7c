//! [`FleetConsumerConfig`]: what a [`FleetConsumer`](super::FleetConsumer) is built from.
//!
//! It reads like rdkafka's `ClientConfig` — `set("group.id", "billing")` and
//! any other consumer property — plus the fleet registry and the local
//! security profiles. Every rdkafka property is applied to each per-cluster
//! consumer, except the few the fleet consumer owns (see
//! [`FleetConsumerConfig::set`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;

use super::FleetConsumeError;
use crate::kafka::config::validate_properties;
use crate::kafka::{KafkaProperties, SecurityProfiles};
use crate::registry::{ClusterId, Registry, WatcherOptions};

/// Properties the per-cluster admin clients must not get (consumer-only).
pub(crate) const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "enable.partition.eof",
    "isolation.level",
    "fetch.wait.max.ms",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "check.crcs",
    "fetch.queue.backoff.ms",
    "statistics.interval.ms",
];

/// Properties of the classic group protocol that librdkafka refuses (when
/// it creates the consumer) with `group.protocol=consumer` (KIP-848), and
/// what to do instead. The fleet consumer sets none of them itself.
pub(crate) const CLASSIC_ONLY: &[(&str, &str)] = &[
    (
        "session.timeout.ms",
        "the broker sets it for the group (`group.consumer.session.timeout.ms`, 45 s by default)",
    ),
    (
        "heartbeat.interval.ms",
        "the broker sets it for the group (`group.consumer.heartbeat.interval.ms`, 5 s by default)",
    ),
    (
        "partition.assignment.strategy",
        "the broker assigns the partitions: choose its assignor with `group.remote.assignor` (`uniform` or `range`)",
    ),
    ("group.protocol.type", "it belongs to the classic protocol"),
];

/// Which side of a rebalance a [`RebalanceEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebalancePhase {
    /// Before the assignment changes (rdkafka's `pre_rebalance`).
    Before,
    /// After the assignment changed (rdkafka's `post_rebalance`).
    After,
}

/// What a rebalance of one per-cluster consumer does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceKind {
    /// These `(topic, partition)`s are assigned to this member.
    Assign(Vec<(String, i32)>),
    /// These `(topic, partition)`s are taken away from this member.
    Revoke(Vec<(String, i32)>),
    /// The rebalance failed (rdkafka's `Rebalance::Error`).
    Error(String),
}

/// A rebalance of the consumer group on one cluster, forwarded to the
/// [`FleetConsumerConfig::on_rebalance`] callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebalanceEvent {
    /// The registry id of the cluster whose group membership changed.
    pub cluster: ClusterId,
    /// Before or after the change.
    pub phase: RebalancePhase,
    /// What changed.
    pub kind: RebalanceKind,
}

/// A user rebalance callback. Runs on the thread that polls the consumer
/// (inside [`FleetConsumer::recv`](super::FleetConsumer::recv)); keep it short.
pub type RebalanceCallback = Arc<dyn Fn(&RebalanceEvent) + Send + Sync>;

/// Settings of a [`FleetConsumer`](super::FleetConsumer).
///
/// ```no_run
/// # use flotilla_client::consumer::FleetConsumerConfig;
/// # fn f(registry: flotilla_client::registry::Registry) {
/// let config = FleetConsumerConfig::new(registry)
///     .set("group.id", "billing")
///     .set("session.timeout.ms", "10000");
/// # }
/// ```
#[derive(Clone)]
pub struct FleetConsumerConfig {
    pub(crate) properties: KafkaProperties,
    pub(crate) registry: Registry,
    pub(crate) profiles: SecurityProfiles,
    pub(crate) watcher: WatcherOptions,
    pub(crate) client_id: Option<String>,
    pub(crate) lease_ttl: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) commit_timeout: Duration,
    pub(crate) revoke_wait: Duration,
    pub(crate) on_rebalance: Option<RebalanceCallback>,
}

impl fmt::Debug for FleetConsumerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConsumerConfig")
            .field("properties", &self.properties)
            .field("registry", &self.registry)
            .field("profiles", &self.profiles)
            .field("client_id", &self.client_id)
            .field("lease_ttl", &self.lease_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("commit_timeout", &self.commit_timeout)
            .field("revoke_wait", &self.revoke_wait)
            .field("on_rebalance", &self.on_rebalance.is_some())
            .finish()
    }
}

impl FleetConsumerConfig {
    /// A configuration reading the fleet in `registry`, with no rdkafka
    /// properties yet (`group.id` must still be set), no security profiles,
    /// a 5 s client lease, 10 s connect timeout, a 250 ms gate poll, a
    /// 5 s commit timeout and a 5 s revoke wait.
    pub fn new(registry: Registry) -> Self {
        FleetConsumerConfig {
            properties: KafkaProperties::new(),
            registry,
            profiles: SecurityProfiles::empty(),
            watcher: WatcherOptions::default(),
            client_id: None,
            lease_ttl: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            commit_timeout: Duration::from_secs(5),
            revoke_wait: Duration::from_secs(5),
            on_rebalance: None,
        }
    }

    /// Sets an rdkafka consumer property, applied to every per-cluster consumer.
    ///
    /// Owned by the fleet consumer and overridden: `bootstrap.servers` (from
    /// the registry), `auto.offset.reset` (always `earliest`: a cluster that
    /// enters the read set is read from its beginning), and
    /// `enable.auto.offset.store` (offsets are stored when a record is
    /// *delivered*, not when rdkafka hands it to the gate; `false` here
    /// means "only [`store_offset`](super::FleetConsumer::store_offset)
    /// stores"). `enable.auto.commit` defaults to `false`.
    ///
    /// `group.protocol=consumer` (KIP-848) is passed on like any property;
    /// with it, [`FleetConsumer::new`](super::FleetConsumer::new) refuses the
    /// classic protocol's `session.timeout.ms`, `heartbeat.interval.ms`,
    /// `partition.assignment.strategy` and `group.protocol.type`
    /// ([`FleetConsumeError::UnsupportedProperty`]), as librdkafka would.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.set(key, value);
        self
    }

    /// Takes every property of an rdkafka [`ClientConfig`] (as [`FleetConsumerConfig::set`]).
    pub fn with_client_config(mut self, config: &ClientConfig) -> Self {
        for (k, v) in config.config_map() {
            self.properties.set(k, v);
        }
        self
    }

    /// Takes every property of `props` (as [`FleetConsumerConfig::set`]).
    pub fn with_properties(mut self, props: &KafkaProperties) -> Self {
        self.properties.merge(props);
        self
    }

    /// The value of an rdkafka property, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.properties.get(key)
    }

    /// The rdkafka properties as set.
    pub fn properties(&self) -> &KafkaProperties {
        &self.properties
    }

    /// The consumer group (`group.id`), if set.
    pub fn group_id(&self) -> Option<&str> {
        self.properties.get("group.id")
    }

    /// Local security profiles that the clusters' specs name.
    pub fn security_profiles(mut self, profiles: SecurityProfiles) -> Self {
        self.profiles = profiles;
        self
    }

    /// Settings of the registry watcher the consumer starts.
    pub fn watcher_options(mut self, opts: WatcherOptions) -> Self {
        self.watcher = opts;
        self
    }

    /// The id this consumer registers under (`clients/consumer/<id>`);
    /// default `<group>-<pid>-<unique suffix>`.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// TTL of the registry lease the consumer's client record lives under.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long connecting to a cluster (and each offset query) may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often the group's committed offsets on sealed clusters are polled
    /// (fences other members pass) and the read set is reconciled.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// How long a synchronous commit (`commit_message(.., CommitMode::Sync)`,
    /// `commit(CommitMode::Sync)`) waits for the cluster's confirmation
    /// before it returns
    /// [`FleetConsumeError::CommitPending`](super::FleetConsumeError::CommitPending)
    /// and leaves the commit to the cluster's committer, which retries it
    /// until the cluster answers. While a cluster is known to be unreachable
    /// (an earlier commit is still unconfirmed past this timeout, or is being
    /// retried), synchronous commits on it return at once.
    pub fn commit_timeout(mut self, timeout: Duration) -> Self {
        self.commit_timeout = timeout;
        self
    }

    /// How long a rebalance that revokes a partition waits for the
    /// application to be done with the record of that partition it is
    /// processing (5 s by default; `Duration::ZERO`: not at all).
    ///
    /// The per-cluster consumers are polled in the background, so a revoke
    /// runs while the application processes the last record
    /// [`recv`](super::FleetConsumer::recv) returned. If that record is of a
    /// revoked partition, the revoke waits until the application calls
    /// `recv` again (it is done with the record, and what it committed for
    /// it is queued) or has committed past it (`commit_message`, or
    /// `commit()` of the stored offsets), and then commits what is queued as
    /// usual (at most the commit timeout): with commit after processing, a
    /// sequential loop (`recv`, process, commit, `recv`) does not have that
    /// record delivered again to the partition's next owner — the behaviour
    /// of Java's consumer, whose revoke runs inside `poll`.
    ///
    /// The trade-off: an application that takes long over a record, or
    /// stops calling `recv` while holding one, delays the group's rebalance
    /// on that cluster (every member waits for this one) by up to this bound;
    /// after it, the revoke completes and the record may be delivered again.
    /// Only the last record `recv` returned is waited for: with several tasks
    /// calling `recv` concurrently, any call to `recv` ends the wait, so
    /// commit processed records in your
    /// [`on_rebalance`](FleetConsumerConfig::on_rebalance) callback (the
    /// `Before` phase of a revoke) instead. There is no wait with
    /// `enable.auto.commit=true` and automatic offset stores (the revoke
    /// commits every delivered record anyway), on a current-thread tokio
    /// runtime (the wait would block the thread the application needs to
    /// call `recv`), nor when the consumer closes or its cluster leaves the
    /// read set.
    pub fn revoke_wait(mut self, wait: Duration) -> Self {
        self.revoke_wait = wait;
        self
    }

    /// A callback that sees every rebalance of every per-cluster consumer.
    pub fn on_rebalance(mut self, f: impl Fn(&RebalanceEvent) + Send + Sync + 'static) -> Self {
        self.on_rebalance = Some(Arc::new(f));
        self
    }

    /// Whether the consumers use the KIP-848 consumer group protocol
    /// (`group.protocol=consumer`; librdkafka's default is `classic`).
    pub(crate) fn consumer_protocol(&self) -> bool {
        self.properties
            .get("group.protocol")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("consumer"))
    }

    /// Refuses, before anything connects, a property the chosen group
    /// protocol does not take: librdkafka would refuse it only when the
    /// consumer of each cluster is created, in the background (logged and
    /// retried; nothing would ever be read).
    pub(crate) fn check_group_protocol(&self) -> Result<(), FleetConsumeError> {
        if !self.consumer_protocol() {
            return Ok(());
        }
        match CLASSIC_ONLY
            .iter()
            .find(|(k, _)| self.properties.get(k).is_some())
        {
            Some((property, hint)) => Err(FleetConsumeError::UnsupportedProperty {
                property: (*property).to_string(),
                protocol: "consumer".to_string(),
                hint: (*hint).to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses, before anything connects, a property librdkafka refuses (an
    /// unknown name, an invalid value: [`FleetConsumeError::InvalidProperty`]),
    /// as rdkafka's `ClientConfig::create` would; librdkafka would refuse it
    /// only when the consumer of each cluster is created, in the background.
    ///
    /// Checked: the properties as set (so a value the fleet overrides, e.g.
    /// `auto.offset.reset=bogus`, is refused as rdkafka would, while
    /// `auto.offset.reset=latest` passes), then as each per-cluster consumer
    /// gets them ([`consumer_base`](Self::consumer_base), with the fleet's own
    /// settings; the admin clients get a subset of the properties as set),
    /// then the defined security profiles ([`SecurityProfiles::validate`]).
    /// `bootstrap.servers` comes from the registry and is not checked.
    pub(crate) fn check_properties(&self) -> Result<(), FleetConsumeError> {
        validate_properties(&self.properties)?;
        validate_properties(&self.consumer_base())?;
        self.profiles.validate()?;
        Ok(())
    }

    /// What [`FleetConsumer::new`](super::FleetConsumer::new) checks before
    /// anything connects: `group.id` is set, the group protocol takes every
    /// property ([`check_group_protocol`](Self::check_group_protocol), whose
    /// hint is better than librdkafka's), and librdkafka takes every property
    /// ([`check_properties`](Self::check_properties)). Returns the group.
    pub(crate) fn check(&self) -> Result<String, FleetConsumeError> {
        let group = self
            .group_id()
            .filter(|g| !g.is_empty())
            .ok_or_else(|| FleetConsumeError::Config("`group.id` is required".into()))?
            .to_string();
        self.check_group_protocol()?;
        self.check_properties()?;
        Ok(group)
    }

    /// Whether delivered records store their offset (the user's
    /// `enable.auto.offset.store`, default true).
    pub(crate) fn auto_store(&self) -> bool {
        self.properties
            .get("enable.auto.offset.store")
            .is_none_or(librdkafka_true)
    }

    /// Whether rdkafka commits stored offsets by itself (`enable.auto.commit`,
    /// default false here).
    pub(crate) fn auto_commit(&self) -> bool {
        self.properties
            .get("enable.auto.commit")
            .is_some_and(librdkafka_true)
    }

    /// The base properties of each per-cluster consumer.
    pub(crate) fn consumer_base(&self) -> KafkaProperties {
        let mut p = self.properties.clone();
        p.remove("bootstrap.servers");
        p.remove("metadata.broker.list");
        p.set("auto.offset.reset", "earliest");
        p.set("enable.auto.offset.store", "false");
        if p.get("enable.auto.commit").is_none() {
            p.set("enable.auto.commit", "false");
        }
        if p.get("fetch.queue.backoff.ms").is_none() {
            // librdkafka postpones the next fetch this long (default 1 s)
            // once its queue reached `queued.min.messages` or
            // `queued.max.messages.kbytes`. The fleet consumer's pump
            // drains that queue in bursts into its own bounded queue, so
            // the thresholds are hit whenever the application is briefly
            // slower than the fetcher; with the default the consumer then
            // idles for most of each second (measured: 0.2 M rec/s instead
            // of 1.1-1.4 M, docs/benchmarks.md). The thresholds still
            // bound memory; only the re-check is sooner.
            p.set("fetch.queue.backoff.ms", "10");
        }
        if p.get("statistics.interval.ms").is_none() {
            // Lag per partition comes from librdkafka's statistics.
            p.set("statistics.interval.ms", "5000");
        }
        p
    }

    /// The base properties of each per-cluster admin client.
    pub(crate) fn admin_base(&self) -> KafkaProperties {
        let mut p = self.properties.clone();
        p.remove("bootstrap.servers");
        p.remove("metadata.broker.list");
        for k in CONSUMER_ONLY {
            p.remove(k);
        }
        p
    }
}

/// Whether librdkafka reads a boolean property's `value` as true: `true`
/// and `t` in any case, or `1` (`rd_kafka_anyconf_set_prop0`). Anything
/// else that is not refused (`validate_properties`) is false.
fn librdkafka_true(value: &str) -> bool {
    let v = value.trim();
    v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("t") || v == "1"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::memory::MemoryKv;

    fn reg() -> Registry {
        Registry::new(
            Arc::new(MemoryKv::with_clock(Arc::new(
                crate::registry::memory::ManualClock::new(),
            ))),
            "f",
        )
    }

    #[test]
    fn owned_properties_are_overridden() {
        let c = FleetConsumerConfig::new(reg())
            .set("group.id", "g")
            .set("auto.offset.reset", "latest")
            .set("bootstrap.servers", "x:1")
            .set("session.timeout.ms", "6000");
        let b = c.consumer_base();
        assert_eq!(b.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(b.get("enable.auto.commit"), Some("false"));
        assert_eq!(b.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(b.get("bootstrap.servers"), None);
        assert_eq!(b.get("session.timeout.ms"), Some("6000"));
        assert_eq!(b.get("fetch.queue.backoff.ms"), Some("10"));
        assert!(c.auto_store());
        let a = c.admin_base();
        assert_eq!(a.get("group.id"), None);
        assert_eq!(a.get("session.timeout.ms"), None);
        let c = c
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true");
        assert!(!c.auto_store());
        assert_eq!(c.consumer_base().get("enable.auto.commit"), Some("true"));
    }

    #[test]
    fn booleans_are_read_as_librdkafka_reads_them() {
        for v in ["true", "TRUE", "t", "T", "1"] {
            let c = FleetConsumerConfig::new(reg())
                .set("enable.auto.commit", v)
                .set("enable.auto.offset.store", v);
            assert!(c.auto_commit(), "enable.auto.commit={v}");
            assert!(c.auto_store(), "enable.auto.offset.store={v}");
        }
        for v in ["false", "FALSE", "f", "F", "0"] {
            let c = FleetConsumerConfig::new(reg())
                .set("enable.auto.commit", v)
                .set("enable.auto.offset.store", v);
            assert!(!c.auto_commit(), "enable.auto.commit={v}");
            assert!(!c.auto_store(), "enable.auto.offset.store={v}");
        }
        let defaults = FleetConsumerConfig::new(reg());
        assert!(!defaults.auto_commit());
        assert!(defaults.auto_store());
    }

    #[test]
    fn the_consumer_protocol_refuses_classic_only_properties_by_name() {
        let c = FleetConsumerConfig::new(reg())
            .set("group.id", "g")
            .set("group.protocol", "consumer");
        assert!(c.consumer_protocol());
        c.check_group_protocol().unwrap();
        // What the fleet consumer sets itself takes none of them.
        let b = c.consumer_base();
        for (k, _) in CLASSIC_ONLY {
            assert_eq!(b.get(k), None, "{k}");
        }
        assert_eq!(b.get("group.protocol"), Some("consumer"));
        // The admin clients (committed offsets, the coordinator probe) and
        // their offset-reading consumers stay classic: they never join.
        assert_eq!(c.admin_base().get("group.protocol"), None);
        for (k, _) in CLASSIC_ONLY {
            let e = c.clone().set(*k, "1").check_group_protocol().unwrap_err();
            match &e {
                FleetConsumeError::UnsupportedProperty {
                    property, protocol, ..
                } => {
                    assert_eq!(property, k);
                    assert_eq!(protocol, "consumer");
                }
                other => panic!("{k}: {other:?}"),
            }
            assert!(e.to_string().contains(k), "{e}");
            assert!(c.clone().set(*k, "1").admin_base().get(k).is_none(), "{k}");
        }
        // The classic protocol (the default) takes them.
        let classic = FleetConsumerConfig::new(reg())
            .set("group.id", "g")
            .set("session.timeout.ms", "6000")
            .set("partition.assignment.strategy", "cooperative-sticky");
        assert!(!classic.consumer_protocol());
        classic.check_group_protocol().unwrap();
        classic
            .set("group.protocol", "classic")
            .check_group_protocol()
            .unwrap();
        assert!(FleetConsumerConfig::new(reg())
            .set("group.protocol", "CONSUMER")
            .set("heartbeat.interval.ms", "1000")
            .check_group_protocol()
            .is_err());
    }

    fn invalid(e: &FleetConsumeError) -> (&str, &str, &str, Option<&str>) {
        match e {
            FleetConsumeError::InvalidProperty(p) => {
                (&p.property, &p.value, &p.reason, p.profile.as_deref())
            }
            other => panic!("not InvalidProperty: {other:?}"),
        }
    }

    #[test]
    fn librdkafka_refuses_an_unknown_property_or_an_invalid_value_by_name() {
        let ok = FleetConsumerConfig::new(reg()).set("group.id", "g");
        let e = ok
            .clone()
            .set("enable.auto.comit", "false")
            .check()
            .unwrap_err();
        let (property, value, reason, profile) = invalid(&e);
        assert_eq!(
            (property, value, profile),
            ("enable.auto.comit", "false", None)
        );
        assert!(
            reason.contains("No such configuration property"),
            "{reason}"
        );
        assert!(e.to_string().contains("`enable.auto.comit`"), "{e}");
        // Invalid values, also of a property the fleet overrides
        // (`auto.offset.reset`, always `earliest`): rdkafka refuses it.
        for (k, v) in [
            ("auto.offset.reset", "bogus"),
            ("fetch.wait.max.ms", "abc"),
            ("enable.auto.offset.store", "maybe"),
            ("group.protocol", "kip848"),
        ] {
            let e = ok.clone().set(k, v).check().unwrap_err();
            let (property, value, reason, _) = invalid(&e);
            assert_eq!((property, value), (k, v), "{e}");
            assert!(reason.contains(k), "{e}");
        }
        // A security profile's property, named with the profile.
        let mut profiles = SecurityProfiles::empty();
        profiles.insert(
            "prod",
            KafkaProperties::new().with("sasl.mechansim", "PLAIN"),
        );
        let e = ok.clone().security_profiles(profiles).check().unwrap_err();
        assert_eq!(invalid(&e).0, "sasl.mechansim");
        assert_eq!(invalid(&e).3, Some("prod"));
    }

    #[test]
    fn what_the_fleet_sets_or_removes_itself_is_not_refused() {
        let c = FleetConsumerConfig::new(reg())
            .set("group.id", "g")
            .set("bootstrap.servers", "replaced by the registry\0")
            .set("metadata.broker.list", "replaced by the registry\0")
            .set("auto.offset.reset", "latest")
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("session.timeout.ms", "6000")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("statistics.interval.ms", "1000")
            .set("client.id", "billing");
        assert_eq!(c.check().unwrap(), "g");
        let mut profiles = SecurityProfiles::empty();
        profiles.insert(
            "prod",
            KafkaProperties::new()
                .with("security.protocol", "SASL_PLAINTEXT")
                .with("sasl.mechanism", "PLAIN"),
        );
        c.security_profiles(profiles).check().unwrap();
        // KIP-848 with what it takes; `group.protocol` is removed from the
        // admin clients.
        FleetConsumerConfig::new(reg())
            .set("group.id", "g")
            .set("group.protocol", "consumer")
            .set("group.remote.assignor", "uniform")
            .check()
            .unwrap();
        // The classic-only check runs first: its hint is better.
        let e = FleetConsumerConfig::new(reg())
            .set("group.id", "g")
            .set("group.protocol", "consumer")
            .set("session.timeout.ms", "abc")
            .check()
            .unwrap_err();
        assert!(
            matches!(e, FleetConsumeError::UnsupportedProperty { .. }),
            "{e}"
        );
    }

    /// A registry that fails every operation, and a watcher that gives up
    /// on it soon: reaching it is a `Registry` error.
    fn down() -> (Registry, WatcherOptions) {
        let kv = Arc::new(MemoryKv::new());
        kv.set_unavailable(true);
        let opts = WatcherOptions {
            start_timeout: Duration::from_millis(200),
            ..WatcherOptions::default()
        };
        (Registry::new(kv, "f"), opts)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_refuses_a_bad_property_before_anything_connects() {
        use crate::consumer::FleetConsumer;
        let (registry, opts) = down();
        let bad = FleetConsumerConfig::new(registry)
            .watcher_options(opts)
            .set("group.id", "g")
            .set("auto.offset.reset", "bogus");
        let e = FleetConsumer::new(bad.clone()).await.unwrap_err();
        assert_eq!(invalid(&e).0, "auto.offset.reset", "{e}");
        // As does `with_watcher`: nothing is registered.
        let registry = Registry::new(Arc::new(MemoryKv::new()), "f");
        let watcher = Arc::new(
            crate::registry::FleetWatcher::start(registry.clone(), WatcherOptions::default())
                .await
                .unwrap(),
        );
        let bad = FleetConsumerConfig::new(registry.clone())
            .set("group.id", "g")
            .set("linger.ms", "abc")
            .client_id("c1");
        let e = FleetConsumer::with_watcher(bad, watcher).await.unwrap_err();
        assert_eq!(invalid(&e).0, "linger.ms", "{e}");
        let registered = registry
            .client(crate::registry::ClientKind::Consumer, "c1")
            .await
            .unwrap();
        assert!(registered.is_none());
    }
}
