//! Errors of the Kafka adapter, and the classification of rdkafka errors into
//! *permanent* (surface to the operator, never retry or reroute) and
//! *transient* (retry, and the routing core may treat the cluster as unhealthy).

use std::time::Duration;

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};

/// Everything that can go wrong while talking to one Kafka cluster.
///
/// `cluster` fields hold the registry id of the cluster when it is known, and
/// the bootstrap list otherwise (e.g. while registering a new cluster).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaError {
    /// A `bootstrap.servers` string that is not `host:port[,host:port...]`.
    #[error("invalid bootstrap list `{bootstrap}`: {reason} (expected host:port[,host:port...])")]
    InvalidBootstrap {
        /// The bootstrap string as given.
        bootstrap: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A cluster names a security profile that is not defined locally.
    #[error(
        "unknown security profile `{profile}` for cluster {cluster}: define it in the file named by \
         FLOTILLA_SECURITY_PROFILES or with FLOTILLA_PROFILE_{env_name}_<PROPERTY> variables \
         (known profiles: {known})",
        env_name = crate::kafka::config::profile_env_name(profile),
        known = if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )]
    UnknownProfile {
        /// The cluster whose spec names the profile.
        cluster: String,
        /// The profile name.
        profile: String,
        /// Profiles that are defined, sorted.
        known: Vec<String>,
    },
    /// Local configuration is wrong: an unreadable profile file, a property
    /// rdkafka rejects, and the like.
    #[error("kafka configuration error for {cluster}: {detail}")]
    Config {
        /// Cluster id, bootstrap list, or the profile file path.
        cluster: String,
        /// What is wrong.
        detail: String,
    },
    /// The brokers behind a registered bootstrap address belong to another Kafka
    /// cluster than the one registered: brokers reused for another cluster, stale
    /// DNS, a wrong load balancer. Writing there would lose or mix records.
    #[error(
        "CLUSTER ID MISMATCH for cluster {cluster}: bootstrap {bootstrap} answers with Kafka cluster \
         id `{found}` but the registry says `{expected}`. The address now points at different \
         brokers (reused brokers, stale DNS or load balancer?); refusing to use it"
    )]
    ClusterIdMismatch {
        /// Registry id of the cluster.
        cluster: String,
        /// The bootstrap list that was dialled.
        bootstrap: String,
        /// Kafka cluster id recorded in the registry.
        expected: String,
        /// Kafka cluster id the brokers reported.
        found: String,
    },
    /// No broker of the bootstrap list answered within the timeout.
    #[error("kafka cluster {cluster} unreachable at {bootstrap} within {timeout:?}: {detail}")]
    Unreachable {
        /// Cluster id, or the bootstrap list when connecting by address.
        cluster: String,
        /// The bootstrap list that was dialled.
        bootstrap: String,
        /// How long we waited.
        timeout: Duration,
        /// The last error librdkafka reported, if any.
        detail: String,
    },
    /// A topic exists with another partition count than the route requires.
    #[error(
        "topic {topic} on cluster {cluster} has {found} partitions, expected {expected} \
         (a topic must have the same partition count on every cluster)"
    )]
    PartitionMismatch {
        /// Cluster id.
        cluster: String,
        /// Topic name.
        topic: String,
        /// Partition count the route requires.
        expected: u32,
        /// Partition count found on the cluster.
        found: u32,
    },
    /// Authentication or authorization failed (SASL, SSL, ACLs). Permanent: fix
    /// credentials or ACLs; never a reason to reroute traffic.
    #[error("kafka authorization failed on cluster {cluster}: {detail}")]
    Authorization {
        /// Cluster id.
        cluster: String,
        /// The rdkafka error.
        detail: String,
    },
    /// A failure that may go away by itself (timeouts, leader changes, broker restarts).
    #[error("transient kafka error on cluster {cluster}: {detail}")]
    Transient {
        /// Cluster id.
        cluster: String,
        /// The rdkafka error.
        detail: String,
    },
    /// Any other error, treated as permanent so it surfaces instead of looping.
    #[error("kafka error on cluster {cluster}: {detail}")]
    Other {
        /// Cluster id.
        cluster: String,
        /// The rdkafka error.
        detail: String,
    },
}

impl KafkaError {
    /// Whether retrying cannot help: configuration, identity, authorization and
    /// schema errors. A permanent error must never make a client reroute traffic
    /// to another cluster; it is surfaced to the caller / operator instead.
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            KafkaError::Unreachable { .. } | KafkaError::Transient { .. }
        )
    }

    /// Whether the error is an authentication or authorization failure.
    pub fn is_authorization(&self) -> bool {
        matches!(self, KafkaError::Authorization { .. })
    }

    /// The cluster (id or bootstrap list) the error is about, when it names one.
    pub fn cluster(&self) -> Option<&str> {
        match self {
            KafkaError::InvalidBootstrap { .. } => None,
            KafkaError::UnknownProfile { cluster, .. }
            | KafkaError::Config { cluster, .. }
            | KafkaError::ClusterIdMismatch { cluster, .. }
            | KafkaError::Unreachable { cluster, .. }
            | KafkaError::PartitionMismatch { cluster, .. }
            | KafkaError::Authorization { cluster, .. }
            | KafkaError::Transient { cluster, .. }
            | KafkaError::Other { cluster, .. } => Some(cluster),
        }
    }
}

/// How an rdkafka error code should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Authentication / authorization failure: permanent.
    Authorization,
    /// Broker or network hiccup, timeout, leadership change: retry.
    Transient,
    /// Anything else: permanent unless the caller knows better.
    Other,
}

/// Classifies an rdkafka / Kafka protocol error code.
pub fn classify_code(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::DelegationTokenAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::SSL
        | C::UnacceptableCredential
        | C::SecurityDisabled => ErrorClass::Authorization,
        C::BrokerTransportFailure
        | C::Resolve
        | C::MessageTimedOut
        | C::AllBrokersDown
        | C::OperationTimedOut
        | C::QueueFull
        | C::ISRInsufficient
        | C::WaitingForCoordinator
        | C::InProgress
        | C::PreviousInProgress
        | C::TimedOutQueue
        | C::WaitCache
        | C::Retry
        | C::UnknownBroker
        | C::DestroyBroker
        | C::BrokerDestroy
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::RequestTimedOut
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NetworkException
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::NotController
        | C::RebalanceInProgress
        | C::KafkaStorageError
        | C::FetchSessionIdNotFound
        | C::InvalidFetchSessionEpoch
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OffsetNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::EligibleLeadersNotAvailable
        | C::UnstableOffsetCommit
        | C::ThrottlingQuotaExceeded
        | C::ReassignmentInProgress
        | C::RebootstrapRequired => ErrorClass::Transient,
        _ => ErrorClass::Other,
    }
}

/// The error code carried by an rdkafka error, including admin-operation errors
/// (which `rdkafka_error_code()` does not expose).
pub fn error_code(err: &RdKafkaError) -> Option<RDKafkaErrorCode> {
    match err {
        RdKafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    }
}

/// Classifies an rdkafka error.
pub fn classify(err: &RdKafkaError) -> ErrorClass {
    match err {
        RdKafkaError::Canceled => ErrorClass::Transient,
        other => error_code(other).map_or(ErrorClass::Other, classify_code),
    }
}

/// Converts an rdkafka error about `cluster` into a [`KafkaError`], keeping
/// its class: authorization, transient, configuration or other. `context`
/// (what was being done, e.g. `"create topic t"`) prefixes the detail.
pub fn from_rdkafka(cluster: &str, context: &str, err: &RdKafkaError) -> KafkaError {
    let cluster = cluster.to_string();
    let detail = format!("{context}: {err}");
    if let RdKafkaError::ClientConfig(..) | RdKafkaError::ClientCreation(_) = err {
        return KafkaError::Config { cluster, detail };
    }
    from_class(cluster, classify(err), detail)
}

/// Converts an error code about `cluster` (e.g. a per-partition or per-topic
/// result) into a [`KafkaError`] with `context` prefixed to the detail.
pub fn from_code(cluster: &str, code: RDKafkaErrorCode, context: &str) -> KafkaError {
    from_class(
        cluster.to_string(),
        classify_code(code),
        format!("{context}: {code}"),
    )
}

fn from_class(cluster: String, class: ErrorClass, detail: String) -> KafkaError {
    match class {
        ErrorClass::Authorization => KafkaError::Authorization { cluster, detail },
        ErrorClass::Transient => KafkaError::Transient { cluster, detail },
        ErrorClass::Other => KafkaError::Other { cluster, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_codes_are_permanent() {
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::GroupAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::Authentication,
        ] {
            assert_eq!(classify_code(code), ErrorClass::Authorization, "{code:?}");
            let e = from_code("a", code, "produce");
            assert!(e.is_permanent() && e.is_authorization(), "{e}");
        }
        let e = from_rdkafka(
            "a",
            "op",
            &RdKafkaError::AdminOp(RDKafkaErrorCode::TopicAuthorizationFailed),
        );
        assert!(matches!(e, KafkaError::Authorization { .. }));
    }

    #[test]
    fn network_codes_are_transient() {
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::OperationTimedOut,
        ] {
            let e = from_rdkafka("a", "op", &RdKafkaError::MetadataFetch(code));
            assert!(matches!(e, KafkaError::Transient { .. }), "{e}");
            assert!(!e.is_permanent());
        }
        assert!(!from_rdkafka("a", "op", &RdKafkaError::Canceled).is_permanent());
    }

    #[test]
    fn mismatch_message_is_loud_and_complete() {
        let e = KafkaError::ClusterIdMismatch {
            cluster: "east-1".into(),
            bootstrap: "k1:9092".into(),
            expected: "AAA".into(),
            found: "BBB".into(),
        };
        let s = e.to_string();
        for part in ["CLUSTER ID MISMATCH", "east-1", "k1:9092", "AAA", "BBB"] {
            assert!(s.contains(part), "{s}");
        }
        assert!(e.is_permanent());
    }
}
