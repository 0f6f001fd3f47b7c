//! [`FleetWatcher`]: a live [`FleetSnapshot`] kept current by one watch of the
//! fleet prefix.
//!
//! - Start: a full snapshot (retried until [`WatcherOptions::start_timeout`];
//!   an unreachable registry is then [`RegistryError::Unavailable`] naming the
//!   endpoints; a malformed value is an error naming its key).
//! - Then one watch of `/flotilla/<fleet>/` from `snapshot.revision + 1`,
//!   applied event by event; the snapshot's `revision` is the last applied one.
//! - Dropped connection: re-watch from `revision + 1` (with backoff), so no
//!   event is missed or replayed. Meanwhile the last snapshot keeps being
//!   served, [`FleetWatcher::is_stale`] is true and the gauge
//!   `flotilla_registry_snapshot_age_seconds` grows.
//! - History compacted past `revision + 1`: reload a full snapshot, carry on.
//! - A malformed value on the watch (or in a reload) is logged, counted in
//!   `flotilla_registry_errors_total`, and ignored: the snapshot keeps the
//!   previous value of that key (a bad write by one operator must not take
//!   every client down). Keys this version does not know are ignored.
//!
//! Metrics (label `fleet`): gauge `flotilla_registry_snapshot_age_seconds`
//! (0 while the watch is up), counters `flotilla_registry_watch_events_total`,
//! `flotilla_registry_errors_total`, `flotilla_registry_reloads_total`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::kv::{RegistryError, WatchBatch, WatchEvent};
use super::snapshot::FleetSnapshot;
use super::store::{apply_delete, apply_put, copy_key, Registry};

/// Registers the help text of the watcher's metrics with the installed
/// `metrics` recorder (optional; call once after installing an exporter).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "flotilla_registry_snapshot_age_seconds",
        metrics::Unit::Seconds,
        "How long the fleet snapshot has not been known current (0 while the registry watch is up)"
    );
    metrics::describe_counter!(
        "flotilla_registry_watch_events_total",
        "Registry watch events applied to the fleet snapshot"
    );
    metrics::describe_counter!(
        "flotilla_registry_errors_total",
        "Registry errors seen by the watcher (lost connections, malformed values, failed reloads)"
    );
    metrics::describe_counter!(
        "flotilla_registry_reloads_total",
        "Full fleet snapshot reloads after the registry history was compacted"
    );
}

/// Settings of a [`FleetWatcher`].
#[derive(Debug, Clone)]
pub struct WatcherOptions {
    /// How long [`FleetWatcher::start`] keeps trying to read the first snapshot.
    pub start_timeout: Duration,
    /// First delay before re-watching after a dropped connection (doubles up to `max_backoff`).
    pub retry_backoff: Duration,
    /// Longest delay between re-watch attempts.
    pub max_backoff: Duration,
    /// How often the snapshot-age gauge is refreshed.
    pub metrics_interval: Duration,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions {
            start_timeout: Duration::from_secs(5),
            retry_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            metrics_interval: Duration::from_secs(1),
        }
    }
}

struct Shared {
    fleet: String,
    current: ArcSwap<FleetSnapshot>,
    tx: watch::Sender<Arc<FleetSnapshot>>,
    connected: AtomicBool,
    /// When the watch went down (None while it is up).
    down_since: Mutex<Option<Instant>>,
    events: AtomicU64,
    errors: AtomicU64,
    reloads: AtomicU64,
    last_error: Mutex<Option<RegistryError>>,
}

impl Shared {
    fn publish(&self, snap: Arc<FleetSnapshot>) {
        self.current.store(snap.clone());
        self.tx.send_replace(snap);
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
        let mut down = self.down_since.lock().unwrap();
        if up {
            *down = None;
        } else if down.is_none() {
            *down = Some(Instant::now());
        }
        drop(down);
        self.update_age_gauge();
    }

    fn age(&self) -> Duration {
        self.down_since
            .lock()
            .unwrap()
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    fn update_age_gauge(&self) {
        metrics::gauge!("flotilla_registry_snapshot_age_seconds", "fleet" => self.fleet.clone())
            .set(self.age().as_secs_f64());
    }

    fn error(&self, e: RegistryError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("flotilla_registry_errors_total", "fleet" => self.fleet.clone())
            .increment(1);
        *self.last_error.lock().unwrap() = Some(e);
    }
}

/// A live, shared view of the fleet registry. Dropping it stops the watch.
pub struct FleetWatcher {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for FleetWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetWatcher")
            .field("fleet", &self.shared.fleet)
            .field("revision", &self.shared.current.load().revision)
            .field("stale", &self.is_stale())
            .finish()
    }
}

impl Drop for FleetWatcher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl FleetWatcher {
    /// Reads the first snapshot (see the module doc) and starts watching.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        registry: Registry,
        opts: WatcherOptions,
    ) -> Result<FleetWatcher, RegistryError> {
        let first = initial_snapshot(&registry, &opts).await?;
        let first = Arc::new(first);
        let (tx, _rx) = watch::channel(first.clone());
        let shared = Arc::new(Shared {
            fleet: registry.fleet().to_string(),
            current: ArcSwap::new(first.clone()),
            tx,
            // Stale until the watch is established (a few ms after start).
            connected: AtomicBool::new(false),
            down_since: Mutex::new(None),
            events: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        shared.update_age_gauge();
        let main = tokio::spawn(run(registry, shared.clone(), opts.clone(), first));
        let gauge = {
            let shared = shared.clone();
            let every = opts.metrics_interval.max(Duration::from_millis(10));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    shared.update_age_gauge();
                }
            })
        };
        Ok(FleetWatcher {
            shared,
            tasks: vec![main, gauge],
        })
    }

    /// The current snapshot (cheap: an `Arc` load).
    pub fn snapshot(&self) -> Arc<FleetSnapshot> {
        self.shared.current.load_full()
    }

    /// A receiver that sees every new snapshot (`changed().await`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<FleetSnapshot>> {
        self.shared.tx.subscribe()
    }

    /// Waits for the next snapshot published after this call and returns it.
    /// (A change published between an earlier [`FleetWatcher::snapshot`] and this
    /// call is not waited for: hold a [`FleetWatcher::subscribe`] receiver to see every change.)
    pub async fn changed(&self) -> Arc<FleetSnapshot> {
        let mut rx = self.subscribe();
        rx.borrow_and_update();
        // The sender lives in `self`, so `changed` cannot fail while we borrow it.
        let _ = rx.changed().await;
        let snap = rx.borrow().clone();
        snap
    }

    /// Waits until the snapshot satisfies `pred`, at most `timeout`; returns it,
    /// or [`RegistryError::Timeout`].
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&FleetSnapshot) -> bool,
    ) -> Result<Arc<FleetSnapshot>, RegistryError> {
        let mut rx = self.subscribe();
        let fut = async {
            loop {
                let snap = rx.borrow_and_update().clone();
                if pred(&snap) {
                    return snap;
                }
                if rx.changed().await.is_err() {
                    // Sender gone (cannot happen while `self` lives); fall back to polling.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| RegistryError::Timeout {
                op: "waiting for the fleet snapshot to reach a condition".into(),
                after: timeout,
            })
    }

    /// Whether the watch is currently down (or, just after start, not yet up),
    /// so the snapshot may be missing changes.
    pub fn is_stale(&self) -> bool {
        !self.shared.connected.load(Ordering::SeqCst)
    }

    /// How long the snapshot has not been known current (zero while the watch is up).
    pub fn snapshot_age(&self) -> Duration {
        self.shared.age()
    }

    /// Watch events applied so far.
    pub fn events_applied(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }

    /// Errors seen so far (connection losses, malformed values, failed reloads).
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    /// Full reloads done after a compaction.
    pub fn reloads(&self) -> u64 {
        self.shared.reloads.load(Ordering::Relaxed)
    }

    /// The most recent error, if any.
    pub fn last_error(&self) -> Option<RegistryError> {
        self.shared.last_error.lock().unwrap().clone()
    }
}

async fn initial_snapshot(
    registry: &Registry,
    opts: &WatcherOptions,
) -> Result<FleetSnapshot, RegistryError> {
    let deadline = Instant::now() + opts.start_timeout;
    let unavailable = |message: String| RegistryError::Unavailable {
        endpoints: registry.kv().endpoints(),
        message,
    };
    let mut backoff = opts.retry_backoff.max(Duration::from_millis(1));
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let res = tokio::time::timeout(remaining, registry.snapshot()).await;
        let err = match res {
            Ok(Ok(snap)) => return Ok(snap),
            Ok(Err(e)) if e.is_transient() => e,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(unavailable(format!(
                    "no snapshot of fleet {} within {:?}",
                    registry.fleet(),
                    opts.start_timeout
                )))
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(match err {
                RegistryError::Unavailable { endpoints, message } => RegistryError::Unavailable {
                    endpoints,
                    message: format!("gave up after {:?}: {message}", opts.start_timeout),
                },
                other => unavailable(format!("gave up after {:?}: {other}", opts.start_timeout)),
            });
        }
        tokio::time::sleep(backoff.min(remaining)).await;
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

/// Applies one batch to a copy of `snap`; malformed values keep the old value.
fn apply_batch(
    registry: &Registry,
    shared: &Shared,
    snap: &FleetSnapshot,
    batch: &WatchBatch,
) -> FleetSnapshot {
    let mut next = snap.clone();
    for ev in &batch.events {
        let Some(key) = registry.parse_key(ev.key()) else {
            tracing::debug!(
                key = ev.key(),
                "ignoring registry key this version does not know"
            );
            continue;
        };
        match ev {
            WatchEvent::Put {
                key: full,
                value,
                mod_revision,
            } => {
                if let Err(e) = apply_put(&mut next, &key, full, value) {
                    tracing::error!(
                        key = %full,
                        revision = mod_revision,
                        error = %e,
                        "malformed registry value on the watch; keeping the previous value"
                    );
                    shared.error(e.into());
                }
            }
            WatchEvent::Delete { .. } => apply_delete(&mut next, &key),
        }
    }
    next.revision = next.revision.max(batch.revision);
    shared
        .events
        .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
    metrics::counter!("flotilla_registry_watch_events_total", "fleet" => shared.fleet.clone())
        .increment(batch.events.len() as u64);
    next
}

/// Full reload after a compaction; lenient like the watch path.
async fn reload(
    registry: &Registry,
    shared: &Shared,
    old: &FleetSnapshot,
) -> Result<FleetSnapshot, RegistryError> {
    let (entries, revision) = registry.kv().list(registry.prefix()).await?;
    let mut next = FleetSnapshot {
        revision,
        ..FleetSnapshot::default()
    };
    for e in entries {
        let Some(key) = registry.parse_key(&e.key) else {
            continue;
        };
        if let Err(err) = apply_put(&mut next, &key, &e.key, &e.value) {
            tracing::error!(key = %e.key, error = %err, "malformed registry value on reload; keeping the previous value");
            shared.error(err.into());
            copy_key(old, &mut next, &key);
        }
    }
    Ok(next)
}

async fn run(
    registry: Registry,
    shared: Arc<Shared>,
    opts: WatcherOptions,
    mut snap: Arc<FleetSnapshot>,
) {
    let base = opts.retry_backoff.max(Duration::from_millis(1));
    let mut backoff = base;
    loop {
        let from = snap.revision + 1;
        match registry.kv().watch(registry.prefix(), from).await {
            Ok(mut stream) => {
                shared.set_connected(true);
                backoff = base;
                tracing::debug!(fleet = registry.fleet(), from, "registry watch established");
                let mut compacted = false;
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(batch) => {
                            snap = Arc::new(apply_batch(&registry, &shared, &snap, &batch));
                            shared.publish(snap.clone());
                        }
                        Err(RegistryError::Compacted { .. }) => {
                            compacted = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(fleet = registry.fleet(), error = %e, "registry watch failed; re-watching");
                            shared.error(e);
                            break;
                        }
                    }
                }
                if !compacted {
                    shared.set_connected(false);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(opts.max_backoff);
                    continue;
                }
            }
            Err(RegistryError::Compacted { .. }) => {}
            Err(e) => {
                tracing::warn!(fleet = registry.fleet(), error = %e, "cannot watch the registry; serving the last snapshot");
                shared.error(e);
                shared.set_connected(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_backoff);
                continue;
            }
        }
        // Compacted: the history we need is gone; reload everything.
        tracing::info!(
            fleet = registry.fleet(),
            from = snap.revision + 1,
            "registry history compacted; reloading the fleet snapshot"
        );
        match reload(&registry, &shared, &snap).await {
            Ok(next) => {
                shared.reloads.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("flotilla_registry_reloads_total", "fleet" => shared.fleet.clone()).increment(1);
                snap = Arc::new(next);
                shared.publish(snap.clone());
            }
            Err(e) => {
                tracing::warn!(fleet = registry.fleet(), error = %e, "reload failed; retrying");
                shared.error(e);
                shared.set_connected(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
}
