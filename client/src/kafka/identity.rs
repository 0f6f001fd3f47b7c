//! Which Kafka cluster answers at a bootstrap address.
//!
//! Every registered cluster records the Kafka cluster id its brokers reported
//! at registration ([`ClusterSpec::kafka_cluster_id`]). Before flotilla writes
//! to or reads from a cluster it reads the id again and refuses an address that
//! now answers with another id ([`KafkaError::ClusterIdMismatch`]): brokers
//! reused for another cluster or a stale DNS entry would otherwise silently
//! mix or lose records.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

use crate::kafka::config::{bootstrap_config, client_config, KafkaProperties, SecurityProfiles};
use crate::kafka::error::{classify, error_code, ErrorClass, KafkaError};
use crate::registry::ClusterSpec;

pub use crate::kafka::config::validate_bootstrap;

/// Extra time the async wrappers allow a blocking rdkafka call beyond its own
/// timeout before giving up on it.
pub(crate) const GRACE: Duration = Duration::from_secs(2);

/// Checks the Kafka cluster id `found` at the spec's bootstrap address against
/// the id recorded in the registry.
pub fn verify_cluster_id(spec: &ClusterSpec, found: &str) -> Result<(), KafkaError> {
    if spec.kafka_cluster_id == found {
        Ok(())
    } else {
        Err(KafkaError::ClusterIdMismatch {
            cluster: spec.id.clone(),
            bootstrap: spec.bootstrap.clone(),
            expected: spec.kafka_cluster_id.clone(),
            found: found.to_string(),
        })
    }
}

/// A consumer used only for metadata, watermarks and the cluster id: no group,
/// never subscribes, never auto-creates topics.
pub(crate) fn metadata_consumer(config: &ClientConfig) -> Result<BaseConsumer, RdKafkaError> {
    let mut c = config.clone();
    c.remove("group.id");
    c.set("enable.auto.commit", "false");
    c.set("allow.auto.create.topics", "false");
    c.create()
}

/// Errors librdkafka queued on the consumer's main queue (connection refused,
/// DNS failures, SASL failures...), oldest first.
pub(crate) fn drain_errors(consumer: &BaseConsumer) -> Vec<RdKafkaError> {
    let mut errors = Vec::new();
    for _ in 0..1000 {
        match consumer.poll(Duration::ZERO) {
            Some(Err(e)) => errors.push(e),
            Some(Ok(_)) => {}
            None => break,
        }
    }
    errors
}

/// Turns a failure to get an answer from `bootstrap` into an error: an
/// authentication failure among the queued errors wins (permanent), else
/// [`KafkaError::Unreachable`] with the last error seen.
pub(crate) fn no_answer(
    cluster: &str,
    bootstrap: &str,
    timeout: Duration,
    consumer: &BaseConsumer,
    what: &str,
) -> KafkaError {
    let errors = drain_errors(consumer);
    if let Some(auth) = errors
        .iter()
        .find(|e| classify(e) == ErrorClass::Authorization)
    {
        return KafkaError::Authorization {
            cluster: cluster.to_string(),
            detail: format!("{what}: {auth}"),
        };
    }
    let detail = match errors.last() {
        Some(e) => format!("{what}: {}", describe(e)),
        None => format!("{what}: no broker answered"),
    };
    KafkaError::Unreachable {
        cluster: cluster.to_string(),
        bootstrap: bootstrap.to_string(),
        timeout,
        detail,
    }
}

fn describe(e: &RdKafkaError) -> String {
    match error_code(e) {
        Some(RDKafkaErrorCode::Resolve) => format!("cannot resolve a broker host ({e})"),
        Some(RDKafkaErrorCode::AllBrokersDown) => format!("all brokers down ({e})"),
        Some(RDKafkaErrorCode::BrokerTransportFailure) => format!("connection failed ({e})"),
        _ => e.to_string(),
    }
}

/// Reads the cluster id with an already created metadata consumer (blocking).
pub(crate) fn blocking_cluster_id(
    cluster: &str,
    bootstrap: &str,
    consumer: &BaseConsumer,
    timeout: Duration,
) -> Result<String, KafkaError> {
    let started = Instant::now();
    match consumer.client().fetch_cluster_id(timeout) {
        Some(id) if !id.is_empty() => Ok(id),
        _ => Err(no_answer(
            cluster,
            bootstrap,
            started.elapsed().max(timeout),
            consumer,
            "reading the Kafka cluster id",
        )),
    }
}

/// Reads the Kafka cluster id of the brokers configured in `config`
/// (`bootstrap.servers` must be set) within `timeout`.
///
/// `cluster` names the cluster in errors. The blocking librdkafka call runs
/// on tokio's blocking pool. No answer within the timeout is
/// [`KafkaError::Unreachable`] (or [`KafkaError::Authorization`] when the
/// brokers refused our credentials).
pub async fn fetch_cluster_id(
    cluster: &str,
    config: &ClientConfig,
    timeout: Duration,
) -> Result<String, KafkaError> {
    let bootstrap = config
        .get("bootstrap.servers")
        .unwrap_or_default()
        .to_string();
    validate_bootstrap(&bootstrap)?;
    let (cluster_s, bootstrap_s, config) = (cluster.to_string(), bootstrap.clone(), config.clone());
    let task = tokio::task::spawn_blocking(move || {
        let consumer = metadata_consumer(&config).map_err(|e| KafkaError::Config {
            cluster: cluster_s.clone(),
            detail: format!("cannot create a kafka client: {e}"),
        })?;
        blocking_cluster_id(&cluster_s, &bootstrap_s, &consumer, timeout)
    });
    match tokio::time::timeout(timeout + GRACE, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(KafkaError::Other {
            cluster: cluster.to_string(),
            detail: format!("reading the Kafka cluster id: task failed: {join}"),
        }),
        Err(_) => Err(KafkaError::Unreachable {
            cluster: cluster.to_string(),
            bootstrap,
            timeout,
            detail: "reading the Kafka cluster id: librdkafka did not return in time".into(),
        }),
    }
}

/// Reads the Kafka cluster id at a bootstrap address (e.g. to register a new
/// cluster), with the `base` properties and optional security properties.
pub async fn read_cluster_id(
    bootstrap: &str,
    base: &KafkaProperties,
    security: Option<&KafkaProperties>,
    timeout: Duration,
) -> Result<String, KafkaError> {
    let config = bootstrap_config(bootstrap, base, security)?;
    fetch_cluster_id(bootstrap, &config, timeout).await
}

/// Reads the cluster id at the spec's bootstrap address and checks it against
/// the registry ([`verify_cluster_id`]). Returns the id on success.
pub async fn check_cluster(
    spec: &ClusterSpec,
    base: &KafkaProperties,
    profiles: &SecurityProfiles,
    timeout: Duration,
) -> Result<String, KafkaError> {
    let config = client_config(spec, base, profiles)?;
    let found = fetch_cluster_id(&spec.id, &config, timeout).await?;
    verify_cluster_id(spec, &found)?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClusterRole, ClusterState, SCHEMA_VERSION};
    use std::collections::BTreeMap;

    fn spec(bootstrap: &str, id: &str) -> ClusterSpec {
        ClusterSpec {
            version: SCHEMA_VERSION,
            id: "c1".into(),
            bootstrap: bootstrap.into(),
            kafka_cluster_id: id.into(),
            state: ClusterState::Active,
            role: ClusterRole::Permanent,
            weight: 1,
            labels: BTreeMap::new(),
            security_profile: None,
            created_at: 0,
        }
    }

    #[test]
    fn verify_detects_mismatch() {
        let s = spec("k:1", "AAA");
        verify_cluster_id(&s, "AAA").unwrap();
        let e = verify_cluster_id(&s, "BBB").unwrap_err();
        assert_eq!(
            e,
            KafkaError::ClusterIdMismatch {
                cluster: "c1".into(),
                bootstrap: "k:1".into(),
                expected: "AAA".into(),
                found: "BBB".into()
            }
        );
    }

    #[tokio::test]
    async fn bad_syntax_fails_before_dialling() {
        let e = read_cluster_id(
            "nonsense",
            &KafkaProperties::new(),
            None,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, KafkaError::InvalidBootstrap { .. }), "{e}");
    }

    #[tokio::test]
    async fn unresolvable_host_is_unreachable_within_the_timeout() {
        let started = Instant::now();
        let timeout = Duration::from_millis(1500);
        let e = read_cluster_id(
            "no-such-host.invalid:9092",
            &KafkaProperties::new(),
            None,
            timeout,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, KafkaError::Unreachable { bootstrap, .. } if bootstrap == "no-such-host.invalid:9092"),
            "{e}"
        );
        assert!(
            started.elapsed() < timeout + GRACE + Duration::from_millis(500),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn closed_port_is_unreachable_within_the_timeout() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Instant::now();
        let timeout = Duration::from_millis(1500);
        let e = read_cluster_id(
            &format!("127.0.0.1:{port}"),
            &KafkaProperties::new(),
            None,
            timeout,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, KafkaError::Unreachable { .. }), "{e}");
        assert!(!e.is_permanent());
        assert!(
            started.elapsed() < timeout + GRACE,
            "took {:?}",
            started.elapsed()
        );
    }
}
