//! [`FleetProducerConfig`]: what a [`FleetProducer`](super::FleetProducer) needs.

use std::time::Duration;

use super::FleetProducerError;
use crate::kafka::config::validate_properties;
use crate::kafka::{KafkaProperties, SecurityProfiles};
use crate::registry::{Registry, WatcherOptions};

/// Default lease TTL of the producer's client record.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Default capacity of the hold buffer, in records.
pub const DEFAULT_HOLD_CAPACITY: usize = 10_000;
/// Default time allowed to read a cluster's Kafka cluster id when opening it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the producer does while it cannot reach the registry (watch down or
/// lease not renewable). See `docs/producer.md` for the trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutageMode {
    /// Keep routing with the last snapshot (availability). If a switch
    /// completes meanwhile without this producer, its records land above the
    /// boundary as *stragglers*: detected by consumers and delivered late,
    /// never lost. The default.
    #[default]
    KeepProducing,
    /// Hold every new send (bounded by the hold buffer and the send timeout)
    /// until the registry is reachable again: no stragglers, but no writes
    /// while the registry is down.
    Hold,
}

/// Configuration of a [`FleetProducer`](super::FleetProducer), in the spirit
/// of rdkafka's `ClientConfig`: [`set`](Self::set) rdkafka properties applied
/// to every per-cluster producer, plus the fleet-level settings.
///
/// `enable.idempotence` is `true` unless set otherwise (per-partition order
/// survives retries).
#[derive(Debug, Clone)]
pub struct FleetProducerConfig {
    /// The fleet registry. Required by [`FleetProducer::new`](super::FleetProducer::new);
    /// [`FleetProducer::connect`](super::FleetProducer::connect) fills it in.
    pub registry: Option<Registry>,
    /// rdkafka properties for every per-cluster producer (`bootstrap.servers`
    /// comes from the registry and is ignored here).
    pub kafka: KafkaProperties,
    /// Locally resolved security profiles (secrets never live in the registry).
    pub profiles: SecurityProfiles,
    /// This producer's registry id (`clients/producer/<id>`); unique per live
    /// producer. Default: `<host>-<pid>-<random>`.
    pub client_id: String,
    /// TTL of the lease the client record lives under (default 5 s).
    pub lease_ttl: Duration,
    /// How many records may wait in the hold buffer (all topics together)
    /// during a switch; beyond it `send` waits (backpressure) and
    /// `send_result` fails with [`FleetSendError::HoldBufferFull`](super::FleetSendError::HoldBufferFull).
    pub hold_capacity: usize,
    /// Behaviour while the registry is unreachable.
    pub registry_outage: OutageMode,
    /// Time allowed to verify a cluster's Kafka cluster id when opening it.
    pub connect_timeout: Duration,
    /// Settings of the registry watcher.
    pub watcher: WatcherOptions,
}

impl Default for FleetProducerConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl FleetProducerConfig {
    /// Defaults: no registry yet, `enable.idempotence=true`, no security
    /// profiles, a generated client id, 5 s lease, 10 000 held records,
    /// [`OutageMode::KeepProducing`].
    pub fn new() -> Self {
        FleetProducerConfig {
            registry: None,
            kafka: KafkaProperties::new().with("enable.idempotence", "true"),
            profiles: SecurityProfiles::empty(),
            client_id: default_client_id(),
            lease_ttl: DEFAULT_LEASE_TTL,
            hold_capacity: DEFAULT_HOLD_CAPACITY,
            registry_outage: OutageMode::KeepProducing,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            watcher: WatcherOptions::default(),
        }
    }

    /// Sets an rdkafka property for every per-cluster producer (like `ClientConfig::set`).
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.kafka.set(key, value);
        self
    }

    /// The rdkafka property `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.kafka.get(key)
    }

    /// Sets the registry.
    pub fn registry(&mut self, registry: Registry) -> &mut Self {
        self.registry = Some(registry);
        self
    }

    /// Sets the client id.
    pub fn client_id(&mut self, id: impl Into<String>) -> &mut Self {
        self.client_id = id.into();
        self
    }

    /// Sets the lease TTL.
    pub fn lease_ttl(&mut self, ttl: Duration) -> &mut Self {
        self.lease_ttl = ttl;
        self
    }

    /// Sets the hold buffer capacity (records; at least 1).
    pub fn hold_capacity(&mut self, records: usize) -> &mut Self {
        self.hold_capacity = records.max(1);
        self
    }

    /// Sets the registry outage behaviour.
    pub fn registry_outage(&mut self, mode: OutageMode) -> &mut Self {
        self.registry_outage = mode;
        self
    }

    /// Sets the security profiles.
    pub fn profiles(&mut self, profiles: SecurityProfiles) -> &mut Self {
        self.profiles = profiles;
        self
    }

    /// Sets the cluster-id verification timeout.
    pub fn connect_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the watcher options.
    pub fn watcher(&mut self, opts: WatcherOptions) -> &mut Self {
        self.watcher = opts;
        self
    }

    /// Refuses, before anything connects, a property librdkafka refuses (an
    /// unknown name, an invalid value: [`FleetProducerError::InvalidProperty`]),
    /// as rdkafka's `ClientConfig::create` would. Checked: the rdkafka
    /// properties (each per-cluster producer, and the client that verifies
    /// the cluster's id, is built from them; `bootstrap.servers` comes from
    /// the registry and is not checked), then the defined security profiles
    /// ([`SecurityProfiles::validate`]).
    pub(crate) fn check_properties(&self) -> Result<(), FleetProducerError> {
        validate_properties(&self.kafka)?;
        self.profiles.validate()?;
        Ok(())
    }
}

/// `<host>-<pid>-<suffix>`, where the suffix comes from the clock and a process counter.
pub fn default_client_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "host".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "{host}-{}-{:x}",
        std::process::id(),
        (nanos << 8) ^ seq.wrapping_mul(0x9e37_79b9)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::producer::FleetProducer;
    use crate::registry::memory::MemoryKv;

    fn invalid(e: &FleetProducerError) -> (&str, &str, &str, Option<&str>) {
        match e {
            FleetProducerError::InvalidProperty(p) => {
                (&p.property, &p.value, &p.reason, p.profile.as_deref())
            }
            other => panic!("not InvalidProperty: {other:?}"),
        }
    }

    #[test]
    fn librdkafka_refuses_an_unknown_property_or_an_invalid_value_by_name() {
        let mut c = FleetProducerConfig::new();
        c.set("lingerms", "5");
        let e = c.check_properties().unwrap_err();
        let (property, value, reason, profile) = invalid(&e);
        assert_eq!((property, value, profile), ("lingerms", "5", None));
        assert!(
            reason.contains("No such configuration property"),
            "{reason}"
        );
        assert!(e.to_string().contains("`lingerms`"), "{e}");
        // librdkafka names an alias by its canonical name.
        for (k, v, canonical) in [
            ("linger.ms", "abc", "queue.buffering.max.ms"),
            ("acks", "most", "request.required.acks"),
            ("compression.type", "zip", "compression.codec"),
            ("enable.idempotence", "yes please", "enable.idempotence"),
        ] {
            let mut c = FleetProducerConfig::new();
            c.set(k, v);
            let e = c.check_properties().unwrap_err();
            let (property, value, reason, _) = invalid(&e);
            assert_eq!((property, value), (k, v), "{e}");
            assert!(reason.contains(canonical), "{e}");
        }
        let mut profiles = SecurityProfiles::empty();
        profiles.insert(
            "prod",
            KafkaProperties::new().with("security.protocol", "sasl_plain"),
        );
        let mut c = FleetProducerConfig::new();
        c.profiles(profiles);
        let e = c.check_properties().unwrap_err();
        assert_eq!(invalid(&e).0, "security.protocol");
        assert_eq!(invalid(&e).3, Some("prod"));
    }

    #[test]
    fn a_valid_set_and_what_the_fleet_sets_itself_pass() {
        // The defaults (`enable.idempotence=true`).
        FleetProducerConfig::new().check_properties().unwrap();
        let mut c = FleetProducerConfig::new();
        c.set("bootstrap.servers", "replaced by the registry\0")
            .set("metadata.broker.list", "replaced by the registry\0")
            .set("linger.ms", "5")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("compression.type", "lz4")
            .set("reconnect.backoff.ms", "3000")
            .set("client.id", "app");
        let mut profiles = SecurityProfiles::empty();
        profiles.insert(
            "prod",
            KafkaProperties::new()
                .with("security.protocol", "SASL_PLAINTEXT")
                .with("sasl.mechanism", "PLAIN")
                .with("sasl.username", "u")
                .with("sasl.password", "p"),
        );
        c.profiles(profiles);
        c.check_properties().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_and_connect_refuse_a_bad_property_before_anything_connects() {
        // A registry that fails every operation: reaching it would be a
        // `Registry` error (after the watcher's start timeout).
        let kv = Arc::new(MemoryKv::new());
        kv.set_unavailable(true);
        let mut c = FleetProducerConfig::new();
        c.registry(Registry::new(kv, "test"))
            .set("linger.ms", "abc");
        c.watcher.start_timeout = Duration::from_millis(200);
        let e = FleetProducer::new(c.clone()).await.unwrap_err();
        assert_eq!(invalid(&e).0, "linger.ms", "{e}");
        // No etcd there: `connect` refuses the property before dialling it.
        let e = FleetProducer::connect(&["http://127.0.0.1:1"], "test", c)
            .await
            .unwrap_err();
        assert_eq!(invalid(&e).0, "linger.ms", "{e}");
    }
}
