//! [`MemoryKv`]: an in-memory [`KvStore`] with etcd's semantics, for unit
//! tests and the simulator.
//!
//! Time: lease TTLs are measured by a [`Clock`]. The default ([`TokioClock`])
//! follows `tokio::time` (so paused test time works) and a background reaper
//! task expires leases on its own. With a [`ManualClock`] nothing happens by
//! itself: advance the clock and call [`MemoryKv::expire_leases`] (every
//! operation also expires due leases first).
//!
//! Faults: [`MemoryKv::set_unavailable`] makes every operation fail with
//! [`RegistryError::Unavailable`] and cuts every open watch, as an etcd outage
//! would; [`MemoryKv::disconnect_watchers`] cuts the watches only.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::kv::{
    Expect, Guard, KvEntry, KvStore, LeaseId, RegistryError, Revision, WatchBatch, WatchEvent,
    WatchStream,
};

/// A monotonic clock for lease expiry.
pub trait Clock: Send + Sync + 'static {
    /// Time elapsed since an arbitrary fixed origin.
    fn now(&self) -> Duration;
}

/// The default clock: `tokio::time::Instant` (honours paused test time).
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        tokio::time::Instant::now().duration_since(self.origin)
    }
}

/// A clock that only moves when told to (the simulator drives it).
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<Mutex<Duration>>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap() += by;
    }

    /// Sets the clock to `to` (never moves it backwards).
    pub fn set(&self, to: Duration) {
        let mut now = self.now.lock().unwrap();
        if to > *now {
            *now = to;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.now.lock().unwrap()
    }
}

/// Default number of events kept for watches from the past.
pub const DEFAULT_HISTORY: usize = 10_000;

#[derive(Debug, Clone)]
struct Stored {
    value: Vec<u8>,
    mod_revision: Revision,
    create_revision: Revision,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Duration,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchBatch, RegistryError>>,
}

struct State {
    revision: Revision,
    /// Oldest revision still watchable (history holds every event from here on).
    compact_revision: Revision,
    data: BTreeMap<String, Stored>,
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
    unavailable: bool,
}

impl State {
    fn check_available(&self) -> Result<(), RegistryError> {
        if self.unavailable {
            Err(RegistryError::Unavailable {
                endpoints: vec![MemoryKv::ENDPOINT.to_string()],
                message: "fault injected: registry is down".into(),
            })
        } else {
            Ok(())
        }
    }

    /// Records the changes of one new revision (all `events` carry it): history, watchers.
    fn emit(&mut self, events: Vec<WatchEvent>) {
        let Some(rev) = events.first().map(WatchEvent::mod_revision) else {
            return;
        };
        self.history.extend(events.iter().cloned());
        // Evict whole revisions only, so a watch from `compact_revision` misses nothing.
        while self.history.len() > self.history_limit {
            let Some(gone) = self.history.pop_front() else {
                break;
            };
            while self
                .history
                .front()
                .is_some_and(|e| e.mod_revision() == gone.mod_revision())
            {
                self.history.pop_front();
            }
            self.compact_revision = self.compact_revision.max(gone.mod_revision() + 1);
        }
        self.watchers.retain(|w| {
            let mine: Vec<WatchEvent> = events
                .iter()
                .filter(|e| e.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            w.tx.send(Ok(WatchBatch {
                events: mine,
                revision: rev,
            }))
            .is_ok()
        });
    }

    /// Deletes `keys` (those present) in one new revision, as one etcd request does.
    fn delete_keys(&mut self, keys: &[String]) -> Option<Revision> {
        let present: Vec<&String> = keys.iter().filter(|k| self.data.contains_key(*k)).collect();
        if present.is_empty() {
            return None;
        }
        self.revision += 1;
        let rev = self.revision;
        let mut events = Vec::with_capacity(present.len());
        for key in present {
            let old = self.data.remove(key).expect("present");
            if let Some(l) = old.lease.and_then(|l| self.leases.get_mut(&l)) {
                l.keys.remove(key);
            }
            events.push(WatchEvent::Delete {
                key: key.clone(),
                mod_revision: rev,
            });
        }
        self.emit(events);
        Some(rev)
    }

    /// Drops a lease and deletes its keys in one revision (like etcd's revoke/expiry).
    fn drop_lease(&mut self, id: LeaseId) {
        if let Some(lease) = self.leases.remove(&id) {
            let keys: Vec<String> = lease
                .keys
                .into_iter()
                .filter(|k| self.data.get(k).is_some_and(|s| s.lease == Some(id)))
                .collect();
            self.delete_keys(&keys);
        }
    }

    fn expire(&mut self, now: Duration) -> usize {
        let due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.drop_lease(*id);
        }
        due.len()
    }

    fn next_deadline(&self) -> Option<Duration> {
        self.leases.values().map(|l| l.deadline).min()
    }
}

/// In-memory [`KvStore`]; cheap to clone (clones share the store).
#[derive(Clone)]
pub struct MemoryKv {
    state: Arc<Mutex<State>>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for MemoryKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.lock().unwrap();
        f.debug_struct("MemoryKv")
            .field("revision", &s.revision)
            .field("keys", &s.data.len())
            .field("leases", &s.leases.len())
            .finish()
    }
}

impl Default for MemoryKv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryKv {
    /// The pseudo endpoint named in [`RegistryError::Unavailable`].
    pub const ENDPOINT: &'static str = "memory://registry";

    /// A store on [`TokioClock`]. Inside a tokio runtime it also spawns a
    /// reaper task that expires leases on time (it stops when the store is dropped).
    pub fn new() -> Self {
        let kv = Self::with_clock(Arc::new(TokioClock::new()));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&kv.state);
            let clock = kv.clock.clone();
            handle.spawn(reaper(weak, clock));
        }
        kv
    }

    /// A store on `clock`, without a reaper: leases expire when an operation or
    /// [`MemoryKv::expire_leases`] runs after their deadline.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MemoryKv {
            state: Arc::new(Mutex::new(State {
                revision: 1,
                compact_revision: 0,
                data: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: DEFAULT_HISTORY,
                leases: HashMap::new(),
                next_lease: 0x1000,
                watchers: Vec::new(),
                unavailable: false,
            })),
            clock,
        }
    }

    /// Keeps at most `events` events for watches from the past; older
    /// revisions become [`RegistryError::Compacted`].
    pub fn set_history_limit(&self, events: usize) {
        let mut s = self.state.lock().unwrap();
        s.history_limit = events.max(1);
    }

    /// Fault hook: while `true`, every operation fails with
    /// [`RegistryError::Unavailable`]; turning it on also cuts every open watch.
    pub fn set_unavailable(&self, unavailable: bool) {
        let mut s = self.state.lock().unwrap();
        s.unavailable = unavailable;
        if unavailable {
            s.watchers.clear();
        }
    }

    /// Fault hook: ends every open watch stream (a dropped connection).
    pub fn disconnect_watchers(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// Expires every lease whose deadline has passed on the clock; returns how many.
    pub fn expire_leases(&self) -> usize {
        let now = self.clock.now();
        self.state.lock().unwrap().expire(now)
    }

    /// Number of live leases.
    pub fn lease_count(&self) -> usize {
        self.state.lock().unwrap().leases.len()
    }

    /// Locks the state after expiring due leases and checking availability.
    fn live(&self) -> Result<std::sync::MutexGuard<'_, State>, RegistryError> {
        let now = self.clock.now();
        let mut s = self.state.lock().unwrap();
        s.check_available()?;
        s.expire(now);
        Ok(s)
    }
}

async fn reaper(state: Weak<Mutex<State>>, clock: Arc<dyn Clock>) {
    const IDLE: Duration = Duration::from_millis(100);
    loop {
        let wait = {
            let Some(state) = state.upgrade() else { return };
            let mut s = state.lock().unwrap();
            let now = clock.now();
            s.expire(now);
            s.next_deadline()
                .map_or(IDLE, |d| d.saturating_sub(now).min(IDLE))
        };
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

fn entry(key: &str, s: &Stored) -> KvEntry {
    KvEntry {
        key: key.to_string(),
        value: s.value.clone(),
        mod_revision: s.mod_revision,
        create_revision: s.create_revision,
        lease: s.lease,
    }
}

/// The guard check of a guarded write, under the same lock as the write.
fn check_guard(s: &State, guard: &Guard) -> Result<(), RegistryError> {
    let actual = s.data.get(&guard.key).map(|v| v.mod_revision);
    if guard.expect.matches(actual) {
        Ok(())
    } else {
        Err(RegistryError::GuardFailed {
            key: guard.key.clone(),
            expected: guard.expect,
            actual,
        })
    }
}

/// `Conflict` unless `expect` holds for `key`'s current `mod_revision`.
fn check_expect(s: &State, key: &str, expect: Expect) -> Result<(), RegistryError> {
    let current = s.data.get(key).map(|v| v.mod_revision);
    if !expect.matches(current) {
        return Err(RegistryError::Conflict {
            key: key.to_string(),
            expected: expect,
            actual: current,
        });
    }
    Ok(())
}

fn put_locked(
    s: &mut State,
    key: &str,
    value: Vec<u8>,
    expect: Expect,
    lease: Option<LeaseId>,
) -> Result<Revision, RegistryError> {
    check_expect(s, key, expect)?;
    if let Some(l) = lease {
        if !s.leases.contains_key(&l) {
            return Err(RegistryError::LeaseExpired { lease: l });
        }
    }
    s.revision += 1;
    let rev = s.revision;
    let old = s.data.get(key).cloned();
    if let Some(old_lease) = old.as_ref().and_then(|o| o.lease) {
        if lease != Some(old_lease) {
            if let Some(l) = s.leases.get_mut(&old_lease) {
                l.keys.remove(key);
            }
        }
    }
    if let Some(l) = lease {
        s.leases
            .get_mut(&l)
            .expect("checked above")
            .keys
            .insert(key.to_string());
    }
    let create_revision = old.map_or(rev, |o| o.create_revision);
    s.data.insert(
        key.to_string(),
        Stored {
            value: value.clone(),
            mod_revision: rev,
            create_revision,
            lease,
        },
    );
    s.emit(vec![WatchEvent::Put {
        key: key.to_string(),
        value,
        mod_revision: rev,
    }]);
    Ok(rev)
}

fn delete_locked(s: &mut State, key: &str, expect: Expect) -> Result<Revision, RegistryError> {
    // `Absent`: deleting what is already absent is a no-op, not a conflict.
    check_expect(s, key, expect)?;
    Ok(s.delete_keys(&[key.to_string()]).unwrap_or(s.revision))
}

#[async_trait]
impl KvStore for MemoryKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, RegistryError> {
        let s = self.live()?;
        Ok(s.data.get(key).map(|v| entry(key, v)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision), RegistryError> {
        let s = self.live()?;
        let entries = s
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| entry(k, v))
            .collect();
        Ok((entries, s.revision))
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision, RegistryError> {
        let mut s = self.live()?;
        put_locked(&mut s, key, value, expect, lease)
    }

    async fn put_if_guarded(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        let mut s = self.live()?;
        check_guard(&s, guard)?;
        put_locked(&mut s, key, value, expect, lease)
    }

    async fn delete_if(&self, key: &str, expect: Expect) -> Result<Revision, RegistryError> {
        let mut s = self.live()?;
        delete_locked(&mut s, key, expect)
    }

    async fn delete_if_guarded(
        &self,
        key: &str,
        expect: Expect,
        guard: &Guard,
    ) -> Result<Revision, RegistryError> {
        let mut s = self.live()?;
        check_guard(&s, guard)?;
        delete_locked(&mut s, key, expect)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let now = self.clock.now();
        let mut s = self.live()?;
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(
            id,
            Lease {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, RegistryError> {
        let now = self.clock.now();
        let mut s = self.live()?;
        match s.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = now + l.ttl;
                Ok(l.ttl)
            }
            None => Err(RegistryError::LeaseExpired { lease }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let mut s = self.live()?;
        s.drop_lease(lease);
        Ok(())
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<WatchStream, RegistryError> {
        let mut s = self.live()?;
        let from = if from_revision <= 0 {
            s.revision + 1
        } else {
            from_revision
        };
        if from < s.compact_revision {
            return Err(RegistryError::Compacted {
                compact_revision: s.compact_revision,
                requested: from,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // Replay the retained history, one batch per revision.
        let mut batch: Option<WatchBatch> = None;
        for ev in s
            .history
            .iter()
            .filter(|e| e.mod_revision() >= from && e.key().starts_with(prefix))
        {
            match &mut batch {
                Some(b) if b.revision == ev.mod_revision() => b.events.push(ev.clone()),
                _ => {
                    if let Some(done) = batch.take() {
                        let _ = tx.send(Ok(done));
                    }
                    batch = Some(WatchBatch {
                        events: vec![ev.clone()],
                        revision: ev.mod_revision(),
                    });
                }
            }
        }
        if let Some(done) = batch {
            let _ = tx.send(Ok(done));
        }
        s.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(tokio_stream_from(rx))
    }

    async fn compact(&self, revision: Revision) -> Result<(), RegistryError> {
        let mut s = self.live()?;
        if revision > s.revision {
            return Err(RegistryError::Other(format!(
                "cannot compact at {revision}: it is a future revision (current {})",
                s.revision
            )));
        }
        if revision <= s.compact_revision {
            return Err(RegistryError::Compacted {
                compact_revision: s.compact_revision,
                requested: revision,
            });
        }
        s.compact_revision = revision;
        while s
            .history
            .front()
            .is_some_and(|e| e.mod_revision() < revision)
        {
            s.history.pop_front();
        }
        Ok(())
    }

    async fn current_revision(&self) -> Result<Revision, RegistryError> {
        Ok(self.live()?.revision)
    }

    fn endpoints(&self) -> Vec<String> {
        vec![Self::ENDPOINT.to_string()]
    }
}

fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<Result<WatchBatch, RegistryError>>,
) -> WatchStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
