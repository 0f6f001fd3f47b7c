//! [`GuardedKv`]: a [`KvStore`] whose every write also checks a [`Guard`].
//!
//! The controller builds its registry over one for each term of leadership
//! (the guard: its leader key still at the revision that created it), so a
//! controller that lost its lease — or was replaced — while a pass was under
//! way has every registry write refused with [`RegistryError::GuardFailed`]
//! instead of acting next to the new leader. Reads, leases and watches pass
//! through unchanged.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::kv::{Expect, Guard, KvEntry, KvStore, LeaseId, RegistryError, Revision, WatchStream};

/// Wraps a [`KvStore`]: `put_if` / `delete_if` become their guarded forms
/// ([`KvStore::put_if_guarded`], [`KvStore::delete_if_guarded`]) with `guard`.
#[derive(Clone)]
pub struct GuardedKv {
    inner: Arc<dyn KvStore>,
    guard: Guard,
}

impl std::fmt::Debug for GuardedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedKv")
            .field("guard", &self.guard)
            .field("endpoints", &self.inner.endpoints())
            .finish()
    }
}

impl GuardedKv {
    /// Every write through the result also requires `guard` to hold.
    pub fn new(inner: Arc<dyn KvStore>, guard: Guard) -> GuardedKv {
        GuardedKv { inner, guard }
    }

    /// The guard.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Refuses a guard other than this store's own: two guards would need a
    /// three-key txn, and nobody nests them.
    fn same_guard(&self, guard: &Guard) -> Result<(), RegistryError> {
        if *guard != self.guard {
            return Err(RegistryError::Other(format!(
                "nested guards ({} inside {}) are not supported",
                guard.key, self.guard.key
            )));
        }
        Ok(())
    }

    /// The unguarded store underneath.
    pub fn inner(&self) -> &Arc<dyn KvStore> {
        &self.inner
    }
}

#[async_trait]
impl KvStore for GuardedKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, RegistryError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision), RegistryError> {
        self.inner.list(prefix).await
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision, RegistryError> {
        self.inner
            .put_if_guarded(key, value, expect, lease, &self.guard)
            .await
    }

    async fn delete_if(&self, key: &str, expect: Expect) -> Result<Revision, RegistryError> {
        self.inner.delete_if_guarded(key, expect, &self.guard).await
    }

    async fn put_if_guarded(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        self.same_guard(guard)?;
        self.put_if(key, value, expect, lease).await
    }

    async fn delete_if_guarded(
        &self,
        key: &str,
        expect: Expect,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        self.same_guard(guard)?;
        self.delete_if(key, expect).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, RegistryError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError> {
        self.inner.revoke(lease).await
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<WatchStream, RegistryError> {
        self.inner.watch(prefix, from_revision).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), RegistryError> {
        self.inner.compact(revision).await
    }

    async fn current_revision(&self) -> Result<Revision, RegistryError> {
        self.inner.current_revision().await
    }

    fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints()
    }
}
