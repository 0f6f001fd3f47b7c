//! The storage seam under the registry: a small versioned key-value store
//! modelled on etcd v3, implemented by [`super::etcd::EtcdKv`] and
//! [`super::memory::MemoryKv`].
//!
//! Semantics (both backends, checked by [`super::conformance`]):
//!
//! - One global revision counter. Every successful write (put or delete)
//!   increments it by one; the entry written carries it as `mod_revision`, and
//!   `create_revision` is the revision at which the key was (last) created.
//! - Writes are conditional ([`Expect`]): `Absent` (the key must not exist),
//!   `ModRevision(r)` (the key must exist with exactly that `mod_revision`) or
//!   `Any`. A failed condition is [`RegistryError::Conflict`] and changes nothing.
//! - Leases have a TTL; a key put under a lease disappears (a delete event) when
//!   the lease expires or is revoked.
//! - `watch(prefix, from)` delivers, in revision order, every change with
//!   `mod_revision >= from` to keys under `prefix`, then every later change.
//!   When `from` is older than the retained history it fails with
//!   [`RegistryError::Compacted`] (either from `watch` itself or as the first
//!   item of the stream). The stream ending (`None`) or yielding another error
//!   means the connection dropped: re-watch from the last seen revision + 1.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use super::model::ModelError;

/// An etcd lease id.
pub type LeaseId = i64;

/// A registry (etcd) revision.
pub type Revision = i64;

/// One stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The full key.
    pub key: String,
    /// The raw value (JSON for registry values).
    pub value: Vec<u8>,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Revision at which the key was created.
    pub create_revision: Revision,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// The condition of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expect {
    /// The key must not exist (etcd: `create_revision == 0`).
    Absent,
    /// The key must exist with exactly this `mod_revision`.
    ModRevision(Revision),
    /// No condition.
    Any,
}

impl Expect {
    /// Whether a key whose current `mod_revision` is `current` (None: absent) satisfies `self`.
    pub fn matches(self, current: Option<Revision>) -> bool {
        match self {
            Expect::Absent => current.is_none(),
            Expect::ModRevision(r) => current == Some(r),
            Expect::Any => true,
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Absent => f.write_str("absent"),
            Expect::ModRevision(r) => write!(f, "mod_revision {r}"),
            Expect::Any => f.write_str("any"),
        }
    }
}

/// An extra condition on another key that a guarded write checks in the same
/// transaction as its own ([`KvStore::put_if_guarded`]): the write happens
/// only if `key` also matches `expect`. The controller guards its writes with
/// its leader key (`Expect::ModRevision` of the revision that created it), so
/// a controller that lost its leadership cannot write any more.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Guard {
    /// The guarding key (full key).
    pub key: String,
    /// What the guarding key must match.
    pub expect: Expect,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or overwritten.
    Put {
        /// The full key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// Revision of the write.
        mod_revision: Revision,
    },
    /// The key was deleted (explicitly or by its lease expiring).
    Delete {
        /// The full key.
        key: String,
        /// Revision of the deletion.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn mod_revision(&self) -> Revision {
        match self {
            WatchEvent::Put { mod_revision, .. } | WatchEvent::Delete { mod_revision, .. } => {
                *mod_revision
            }
        }
    }
}

/// A group of watch events, in revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// The events, oldest first (never empty).
    pub events: Vec<WatchEvent>,
    /// Every change up to this revision under the watched prefix has now been
    /// delivered (it is the last event's revision): resume from `revision + 1`.
    pub revision: Revision,
}

/// The stream of a watch; see the module doc for how it ends.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, RegistryError>>;

/// Errors of the registry and its storage backends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry (etcd) cannot be reached.
    #[error("registry unavailable: cannot reach etcd at {}: {message}", .endpoints.join(", "))]
    Unavailable {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// What went wrong.
        message: String,
    },
    /// An operation did not complete in time.
    #[error("registry operation `{op}` timed out after {after:?}")]
    Timeout {
        /// The operation.
        op: String,
        /// The timeout.
        after: Duration,
    },
    /// A conditional write lost: the key is not in the expected state
    /// (another writer got there first). Nothing was written.
    #[error("conflict on {key}: expected {expected}, but its mod_revision is {}", .actual.map_or_else(|| "absent".to_string(), |r| r.to_string()))]
    Conflict {
        /// The key.
        key: String,
        /// The condition of the write.
        expected: Expect,
        /// The key's current `mod_revision` (None: absent), when known.
        actual: Option<Revision>,
    },
    /// Something that must exist does not.
    #[error("{what} not found")]
    NotFound {
        /// What (e.g. `cluster a`).
        what: String,
    },
    /// A create found the key already there.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What (e.g. `cluster a`).
        what: String,
    },
    /// A value is malformed, or a change breaks the schema rules.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The lease expired or was revoked (its keys are gone).
    #[error("lease {lease:x} expired or was revoked")]
    LeaseExpired {
        /// The lease id.
        lease: LeaseId,
    },
    /// The requested revision is older than the retained history.
    #[error("revision {requested} has been compacted (history starts at {compact_revision}); reload a snapshot")]
    Compacted {
        /// The oldest revision still available.
        compact_revision: Revision,
        /// The revision asked for.
        requested: Revision,
    },
    /// The [`Guard`] of a guarded write did not hold (for the controller:
    /// its leadership ended). Nothing was written.
    #[error("guard {key} no longer holds: expected {expected}, but its mod_revision is {}", .actual.map_or_else(|| "absent".to_string(), |r| r.to_string()))]
    GuardFailed {
        /// The guarding key.
        key: String,
        /// The guard's condition.
        expected: Expect,
        /// The guarding key's current `mod_revision` (None: absent), when known.
        actual: Option<Revision>,
    },
    /// Anything else, with the backend's message.
    #[error("registry error: {0}")]
    Other(String),
}

impl RegistryError {
    /// Whether retrying later may succeed (unreachable or slow registry).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unavailable { .. } | RegistryError::Timeout { .. }
        )
    }
}

/// A versioned key-value store with etcd semantics (see the module doc).
///
/// Object safe: the registry holds an `Arc<dyn KvStore>`.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// The entry at `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, RegistryError>;

    /// Every entry whose key starts with `prefix`, sorted by key, and the store
    /// revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision), RegistryError>;

    /// Writes `value` at `key` if `expect` holds, optionally attached to `lease`.
    /// Returns the new revision (the entry's `mod_revision`).
    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision, RegistryError>;

    /// Deletes `key` if `expect` holds. Deleting an absent key with
    /// [`Expect::Any`] or [`Expect::Absent`] succeeds and changes nothing.
    /// Returns the store revision after the call.
    async fn delete_if(&self, key: &str, expect: Expect) -> Result<Revision, RegistryError>;

    /// [`KvStore::put_if`] that also requires `guard` to hold, atomically (one
    /// etcd txn). [`RegistryError::GuardFailed`] (nothing written) when the
    /// guard fails; [`RegistryError::Conflict`] when only `expect` fails.
    /// Backends without transactions over two keys keep the default, which
    /// refuses every guarded write.
    async fn put_if_guarded(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        let _ = (key, value, expect, lease);
        Err(RegistryError::Other(format!(
            "this registry backend does not support guarded writes (guard {})",
            guard.key
        )))
    }

    /// [`KvStore::delete_if`] that also requires `guard` to hold, atomically;
    /// errors as for [`KvStore::put_if_guarded`].
    async fn delete_if_guarded(
        &self,
        key: &str,
        expect: Expect,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        let _ = (key, expect);
        Err(RegistryError::Other(format!(
            "this registry backend does not support guarded writes (guard {})",
            guard.key
        )))
    }

    /// Grants a lease of (at least) `ttl`; backends may round it up (etcd: whole
    /// seconds, and its minimum TTL).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError>;

    /// Renews `lease` once; returns its TTL. [`RegistryError::LeaseExpired`] when it is gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, RegistryError>;

    /// Revokes `lease`, deleting its keys. Revoking a lease that is already gone succeeds.
    async fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError>;

    /// Watches keys under `prefix` from `from_revision` (inclusive; `<= 0`: from now).
    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<WatchStream, RegistryError>;

    /// Discards the history before `revision` (for tests and maintenance).
    async fn compact(&self, revision: Revision) -> Result<(), RegistryError>;

    /// The store's current revision.
    async fn current_revision(&self) -> Result<Revision, RegistryError>;

    /// Where the store lives (etcd endpoints), for error messages.
    fn endpoints(&self) -> Vec<String>;
}
