//! The [`FleetProducer`] adapter: performs the [`Router`]'s decisions with
//! rdkafka and the registry.
//!
//! # Moving parts
//!
//! - `Core::state` (one mutex): the [`Router`], one rdkafka
//!   `ThreadedProducer` per open cluster, and the hold queues (per topic,
//!   FIFO). A record is *routed* under the lock (the router counts it in
//!   flight for its epoch at that moment) and handed to librdkafka *after*
//!   the lock is released, so the lock is held for a hash lookup, not for
//!   librdkafka's enqueue. That keeps the switch protocol: a record routed
//!   with epoch N is counted until it settles, so the router cannot
//!   acknowledge N+1 while it is still on its way into librdkafka. Held
//!   records are released (routed *and* handed over) under the lock, in
//!   order, before any newer record of the topic can be routed.
//! - Every routed record carries a [`Pending`] as its delivery opaque: the
//!   record's settlement slot and the cell its caller waits on, in one
//!   allocation. The producer context's delivery callback (librdkafka's
//!   polling thread) answers the caller and settles the record exactly once
//!   per `Send` decision — also for records the caller stopped waiting for.
//!   Records that never reach librdkafka are settled at once.
//! - Settlement is lock-free on the common path: each (topic, epoch) has a
//!   [`Slot`] whose atomic counter collects settled records that the router
//!   has not been told about yet. The router only needs them promptly while
//!   the topic is held for a switch or the epoch is no longer the routing
//!   one; the slot is then *eager* and every settlement is reported under the
//!   lock at once (so the ack goes out the moment the last old-epoch record
//!   settles). Otherwise they are reported in bulk before every snapshot is
//!   applied and on the driver's tick. The router's in-flight counts are
//!   therefore never below the truth (never an early ack or close), and
//!   exact whenever a decision depends on them.
//! - A record without headers of its own carries a recycled epoch-only
//!   header list, taken under the lock from `State::header_cache` and
//!   returned by the delivery callback (`headers.rs`): librdkafka's
//!   per-record header list was the whole throughput gap to raw rdkafka.
//! - A driver task applies every new registry snapshot: first it opens (and
//!   verifies the Kafka cluster id of) every active cluster the routes
//!   reference, then it calls [`Router::on_snapshot`] and performs the
//!   actions. `Release` (route the held records again, in order) and `Close`
//!   (drop the cluster's producer after a flush, off the lock) are performed
//!   synchronously wherever the router emits them; `Flush` makes librdkafka
//!   send what it queued at once (ignoring `linger.ms`) on a helper thread;
//!   `Ack` (write the client record) is sent to the driver.
//! - A lease task renews the client record's lease (and registers again
//!   with the acknowledged epochs when it lapsed).

// The error halves carry the record back, like rdkafka's own API.
#![allow(clippy::result_large_err)]

use std::cell::UnsafeCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Headers, Message, OwnedHeaders, OwnedMessage, ToBytes};
use rdkafka::producer::{FutureRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::{IntoOpaque, Timeout};
use rdkafka::ClientContext;
// futures' oneshot (for held records), like rdkafka's FutureProducer:
// tokio's takes part in tokio's cooperative budget, which made awaiting many
// deliveries measurably slower (a forced yield every 128 records).
use futures::channel::oneshot;
use futures::task::AtomicWaker;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{FleetProducerConfig, OutageMode};
use super::headers::{self, HeaderList, HeaderPool, Returns, SenderCache};
use super::{
    Delivery, FleetDeliveryResult, FleetProducerError, FleetSendError, OwnedRecord, WaitReason,
};
use crate::kafka::error::{from_code, from_rdkafka};
use crate::kafka::producer_id::prime_producer_id;
use crate::kafka::{check_cluster, client_config, KafkaError, KafkaProperties, SecurityProfiles};
use crate::registry::etcd::EtcdKv;
use crate::registry::{
    ClientKind, ClientLease, ClientRecord, ClusterSpec, ClusterState, FleetSnapshot, FleetWatcher,
    Registry, RegistryError, SCHEMA_VERSION,
};
use crate::route::router::{Action, Decision, Router};

type Tx = oneshot::Sender<FleetDeliveryResult>;
type Rx = oneshot::Receiver<FleetDeliveryResult>;
type Kafka = ThreadedProducer<Ctx>;

/// How often the driver re-checks registry health, retries unverified
/// clusters and resumes held records whose release was deferred.
const TICK: Duration = Duration::from_millis(50);
/// How often an unverified (unreachable when opened) cluster is checked again.
const VERIFY_RETRY: Duration = Duration::from_secs(2);
/// How long a closing cluster's producer may take to flush.
const CLOSE_FLUSH: Duration = Duration::from_secs(30);
/// How long a switch's `Flush` keeps librdkafka ignoring `linger.ms`: long
/// enough for its broker threads to wake up and send what is queued, short
/// enough that other topics of the producer lose batching only briefly.
const HURRY_MS: i32 = 50;

// ---- records --------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum HRef<'a> {
    None,
    Rd(&'a OwnedHeaders),
    Vec(&'a [(String, Option<Vec<u8>>)]),
}

/// A borrowed view of a record, whatever its origin (`FutureRecord` or `OwnedRecord`).
#[derive(Clone, Copy)]
struct RecordRef<'a> {
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    partition: Option<i32>,
    timestamp: Option<i64>,
    headers: HRef<'a>,
}

impl<'a> RecordRef<'a> {
    fn of_future<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
        r: &'a FutureRecord<'_, K, P>,
    ) -> RecordRef<'a> {
        RecordRef {
            topic: r.topic,
            key: r.key.map(|k| k.to_bytes()),
            payload: r.payload.map(|p| p.to_bytes()),
            partition: r.partition,
            timestamp: r.timestamp,
            headers: r.headers.as_ref().map_or(HRef::None, HRef::Rd),
        }
    }

    fn of_owned(r: &'a OwnedRecord) -> RecordRef<'a> {
        RecordRef {
            topic: &r.topic,
            key: r.key.as_deref(),
            payload: r.payload.as_deref(),
            partition: r.partition,
            timestamp: r.timestamp,
            headers: if r.headers.is_empty() {
                HRef::None
            } else {
                HRef::Vec(&r.headers)
            },
        }
    }

    fn to_owned_record(self) -> OwnedRecord {
        OwnedRecord {
            topic: self.topic.to_string(),
            key: self.key.map(<[u8]>::to_vec),
            payload: self.payload.map(<[u8]>::to_vec),
            headers: match self.headers {
                HRef::None => Vec::new(),
                HRef::Rd(h) => super::headers_to_vec(h),
                HRef::Vec(v) => v.to_vec(),
            },
            partition: self.partition,
            timestamp: self.timestamp,
        }
    }

    fn size(&self) -> usize {
        self.key.map_or(0, <[u8]>::len) + self.payload.map_or(0, <[u8]>::len)
    }

    /// The user's headers plus the epoch header (decimal ASCII), in a
    /// fresh list. Records without headers of their own get a recycled
    /// epoch-only list instead ([`SenderCache::take`]).
    fn headers_with_epoch(&self, epoch: u64) -> HeaderList {
        let mut list = match self.headers {
            HRef::None => HeaderList::with_capacity(1),
            HRef::Rd(h) => {
                let mut l = HeaderList::with_capacity(h.count() + 1);
                for h in h.iter() {
                    l.add(h.key, h.value);
                }
                l
            }
            HRef::Vec(v) => {
                let mut l = HeaderList::with_capacity(v.len() + 1);
                for (k, v) in v {
                    l.add(k, v.as_deref());
                }
                l
            }
        };
        list.add_epoch(epoch);
        list
    }
}

// ---- rdkafka context ------------------------------------------------------------------

/// The settlement account of one (topic, epoch): records of it that settled
/// (delivered, failed, or never handed over) but were not yet reported to the
/// router. See the module docs.
struct Slot {
    topic: Arc<str>,
    epoch: u64,
    /// Settled, not yet reported to [`Router::on_settled`].
    unreported: AtomicU64,
    /// Report every settlement at once, under the lock (the topic is held
    /// for a switch, or the epoch is no longer the routing one).
    eager: AtomicBool,
}

impl Slot {
    fn new(topic: &str, epoch: u64) -> Slot {
        Slot {
            topic: topic.into(),
            epoch,
            unreported: AtomicU64::new(0),
            eager: AtomicBool::new(false),
        }
    }

    /// One record settled, lock-free. True when the caller must report it
    /// now ([`Core::absorb`]).
    ///
    /// SeqCst pairs with [`Core::make_eager`] (store `eager`, then swap
    /// `unreported`): either that swap sees this increment, or this load
    /// sees `eager` and the caller absorbs it. No settlement is lost.
    fn settle(&self) -> bool {
        self.unreported.fetch_add(1, Ordering::SeqCst);
        self.eager.load(Ordering::SeqCst)
    }
}

// ---- per-record delivery ----------------------------------------------------------------

/// A delivery as the [`Cell`] keeps it: the error half boxed, so the cell
/// (and with it the whole [`Pending`]) stays small.
type Outcome = Result<Delivery, Box<(FleetSendError, OwnedMessage)>>;

/// One record handed to librdkafka: what its delivery callback needs and
/// where its caller waits, in *one* allocation that librdkafka carries as the
/// delivery opaque (through [`DeliverySender`]) and the caller's
/// [`DeliveryFuture`] shares. A `oneshot` channel plus a boxed opaque took
/// two allocations per record (as rdkafka's `FutureProducer` does), and a
/// bigger one: with glibc's allocator, each allocation made on the sending
/// thread and freed on librdkafka's polling thread was a visible part of the
/// per-record cost.
struct Pending {
    /// The settlement account of the record's (topic, epoch).
    slot: Arc<Slot>,
    /// Key + payload bytes (for the bytes metric).
    bytes: usize,
    /// The record's header list is an epoch-only one: the delivery
    /// callback returns it to the [`HeaderPool`] (see `headers.rs`).
    recycle: bool,
    sink: Sink,
}

/// Where a [`Pending`] record's delivery goes.
enum Sink {
    /// The caller waits on this cell (the common case).
    Cell(Cell),
    /// A record that was held: its caller has been waiting on a oneshot
    /// since it was held (rare: switches and outages only).
    Forward(Mutex<Option<Tx>>),
}

const EMPTY: u8 = 0;
const DONE: u8 = 1;
/// The sender was dropped without a delivery (librdkafka dropped the record).
const CLOSED: u8 = 2;

/// A single-use delivery slot: written once by the [`DeliverySender`], read
/// once by the one waiting [`DeliveryFuture`].
struct Cell {
    state: AtomicU8,
    /// Written only by the sender, before `state` becomes `DONE` (Release);
    /// read only by the waiter, after it saw `DONE` (Acquire).
    value: UnsafeCell<Option<Outcome>>,
    waker: AtomicWaker,
}

// SAFETY: `value` is written by the sender only before it publishes `DONE`
// and taken by the single waiter only after it observed `DONE`; the two never
// access it at the same time (see `Cell::put` and `Cell::take`).
unsafe impl Sync for Cell {}

impl Cell {
    fn new() -> Cell {
        Cell {
            state: AtomicU8::new(EMPTY),
            value: UnsafeCell::new(None),
            waker: AtomicWaker::new(),
        }
    }

    /// Stores the delivery and wakes the waiter. Only the (single, consumed)
    /// [`DeliverySender`] calls it, at most once.
    fn put(&self, out: Outcome) {
        // SAFETY: only the sender writes, once, before publishing DONE; the
        // waiter does not read before it sees DONE.
        unsafe { *self.value.get() = Some(out) };
        self.state.store(DONE, Ordering::Release);
        self.waker.wake();
    }

    /// The sender is gone without a delivery.
    fn close(&self) {
        self.state.store(CLOSED, Ordering::Release);
        self.waker.wake();
    }

    /// The delivery if it is there: `Some(None)` when the sender is gone
    /// without one (or it was taken already). Only the single waiter calls it.
    fn take(&self) -> Option<Option<Outcome>> {
        match self.state.load(Ordering::Acquire) {
            EMPTY => None,
            // SAFETY: DONE was published after the last write; only this
            // (single) waiter reads, and the sender never writes again.
            DONE => Some(unsafe { (*self.value.get()).take() }),
            _ => Some(None),
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Option<Outcome>> {
        if let Some(out) = self.take() {
            return Poll::Ready(out);
        }
        // Register, then look again: a `put` in between either is seen now
        // or wakes the registered waker.
        self.waker.register(cx.waker());
        match self.take() {
            Some(out) => Poll::Ready(out),
            None => Poll::Pending,
        }
    }
}

impl Pending {
    fn new(slot: Arc<Slot>, bytes: usize, recycle: bool, sink: Sink) -> Arc<Pending> {
        Arc::new(Pending {
            slot,
            bytes,
            recycle,
            sink,
        })
    }

    /// A forwarding pending's oneshot sender (taken back after a failed hand-over).
    fn take_forward(&self) -> Option<Tx> {
        match &self.sink {
            Sink::Forward(tx) => tx.lock().unwrap_or_else(|p| p.into_inner()).take(),
            Sink::Cell(_) => None,
        }
    }
}

/// The sending half of a [`Pending`]: the record's delivery opaque in
/// librdkafka. Answers the waiter exactly once — with the delivery, or, if
/// dropped without one, by closing the cell (the waiter sees `Closed`, as a
/// dropped oneshot sender did).
struct DeliverySender(ManuallyDrop<Arc<Pending>>);

impl DeliverySender {
    fn new(p: Arc<Pending>) -> DeliverySender {
        DeliverySender(ManuallyDrop::new(p))
    }

    /// The pending record, without answering its waiter (a hand-over that failed).
    fn into_inner(self) -> Arc<Pending> {
        let mut me = ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again.
        unsafe { ManuallyDrop::take(&mut me.0) }
    }

    /// Answers the waiter; returns the pending record (for its settlement).
    fn send(self, out: FleetDeliveryResult) -> Arc<Pending> {
        let p = self.into_inner();
        match &p.sink {
            Sink::Cell(c) => c.put(out.map_err(Box::new)),
            Sink::Forward(tx) => {
                if let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = tx.send(out);
                }
            }
        }
        p
    }
}

impl Drop for DeliverySender {
    fn drop(&mut self) {
        // Only the sender stores to `state`, so EMPTY here means not sent.
        // (A forwarding sink's oneshot sender closes itself when dropped.)
        if let Sink::Cell(c) = &self.0.sink {
            if c.state.load(Ordering::Relaxed) == EMPTY {
                c.close();
            }
        }
        // SAFETY: dropped once, here.
        unsafe { ManuallyDrop::drop(&mut self.0) };
    }
}

impl IntoOpaque for DeliverySender {
    fn into_ptr(self) -> *mut c_void {
        Arc::into_raw(self.into_inner()) as *mut c_void
    }

    unsafe fn from_ptr(ptr: *mut c_void) -> Self {
        // SAFETY (caller): `ptr` came from `into_ptr` and is converted back once.
        DeliverySender::new(unsafe { Arc::from_raw(ptr as *const Pending) })
    }
}

struct Ctx {
    core: Weak<Core>,
    cluster: Arc<str>,
    /// Where delivered records' epoch-only header lists go back to.
    pool: Arc<HeaderPool>,
    returns: Returns,
    /// Per-cluster metric handles, resolved once (not per record).
    records: metrics::Counter,
    bytes: metrics::Counter,
    errors: metrics::Counter,
}

impl ClientContext for Ctx {
    fn error(&self, error: RdKafkaError, reason: &str) {
        tracing::warn!(cluster = %self.cluster, %error, reason, "kafka client error");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = DeliverySender;

    fn delivery(&self, result: &DeliveryResult<'_>, op: DeliverySender) {
        let cluster = self.cluster.clone();
        let out = match result {
            Ok(m) => {
                self.records.increment(1);
                self.bytes.increment(op.0.bytes as u64);
                Ok(Delivery {
                    cluster,
                    partition: m.partition(),
                    offset: m.offset(),
                    epoch: op.0.slot.epoch,
                })
            }
            Err((e, m)) => {
                self.errors.increment(1);
                let error = from_rdkafka(&cluster, "delivery", e);
                if error.is_authorization() {
                    tracing::error!(cluster = %cluster, %error, "authorization failure: record not delivered (never rerouted)");
                }
                Err((FleetSendError::Kafka { cluster, error }, m.detach()))
            }
        };
        if op.0.recycle {
            // After `m.detach()` above (a failed record's copy keeps its headers).
            let m = match result {
                Ok(m) | Err((_, m)) => m,
            };
            if let Some(list) = headers::detach_headers(m) {
                self.returns.put(&self.pool, op.0.slot.epoch, list);
            }
        }
        let p = op.send(out);
        if p.slot.settle() {
            if let Some(core) = self.core.upgrade() {
                core.absorb(&p.slot);
            }
        }
    }
}

// ---- shared state ---------------------------------------------------------------------

enum Conn {
    Ready(Arc<Kafka>),
    /// Permanent problem (cluster id mismatch, configuration): not retried.
    Refused(KafkaError),
    /// Could not be verified yet (unreachable): retried every few seconds.
    Unverified(KafkaError),
    /// The router asked for it; the driver opens it next (no attempt yet).
    Opening,
}

struct Held {
    id: u64,
    rec: OwnedRecord,
    tx: Tx,
}

#[derive(Default)]
struct State {
    router: Router,
    clusters: HashMap<String, Conn>,
    /// Held records per topic, in the order they were held.
    held: HashMap<String, VecDeque<Held>>,
    held_total: usize,
    next_id: u64,
    /// When each currently held topic started holding (for the hold histogram).
    held_since: HashMap<String, Instant>,
    /// The epoch each topic was last released with.
    released: HashMap<String, u64>,
    /// The settlement slot of the epoch each topic last routed a record with.
    slots: HashMap<String, Arc<Slot>>,
    /// Slots of older epochs that records in librdkafka still point to
    /// (always eager).
    old_slots: Vec<Arc<Slot>>,
    /// Epoch-only header lists at hand for the records routed here.
    header_cache: SenderCache,
}

enum Cmd {
    Verify,
}

/// Which epochs' clusters [`Core::open_clusters`] opens.
#[derive(Clone, Copy)]
enum Which {
    Open,
    Pending,
}

enum Why {
    Hold,
    QueueFull(Arc<str>),
    Failed(FleetSendError),
}

/// A routed record's destination, taken from under the lock.
struct Routed {
    producer: Arc<Kafka>,
    slot: Arc<Slot>,
    cluster: Arc<str>,
    partition: u32,
    /// A recycled (or fresh) epoch-only header list, for a record without
    /// headers of its own.
    headers: Option<HeaderList>,
}

enum Attempt {
    /// Handed to librdkafka; wait on the pending record's cell.
    Sent(Arc<Pending>),
    /// Held (id in the hold queue); its delivery comes through the receiver.
    Held(u64, Rx),
    /// The hold buffer is full.
    Full,
    /// librdkafka's queue of the cluster is full.
    QueueFull(Arc<str>),
    Failed(FleetSendError),
}

struct Core {
    state: Mutex<State>,
    /// Recycled epoch-only header lists (see `headers.rs`).
    headers: Arc<HeaderPool>,
    kafka: KafkaProperties,
    profiles: SecurityProfiles,
    connect_timeout: Duration,
    hold_capacity: usize,
    outage: OutageMode,
    /// The registry is unreachable (watch down or lease lapsed).
    registry_down: AtomicBool,
    /// Hold buffer space was freed.
    space: Notify,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Write the acknowledged epochs to the client record (the acker task:
    /// not the driver, which may be busy opening a cluster meanwhile).
    acks: mpsc::UnboundedSender<()>,
    shut: AtomicBool,
    me: Weak<Core>,
}

impl Drop for Core {
    fn drop(&mut self) {
        // Dropping a ThreadedProducer joins its polling thread (which may be
        // the thread dropping us): do it on a thread of its own.
        let st = std::mem::take(self.state.get_mut().unwrap_or_else(|p| p.into_inner()));
        if st.held_total > 0 {
            metrics::gauge!("flotilla_producer_held_records").decrement(st.held_total as f64);
        }
        if !st.clusters.is_empty() {
            let _ = std::thread::Builder::new()
                .name("flotilla-producer-drop".into())
                .spawn(move || drop(st));
        }
    }
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outage_hold(&self) -> bool {
        self.outage == OutageMode::Hold && self.registry_down.load(Ordering::Relaxed)
    }

    /// Reports the settlements collected in an eager `slot` (delivery
    /// callback or a failed hand-over, off the lock).
    fn absorb(&self, slot: &Slot) {
        let mut st = self.lock();
        let mut acts = Vec::new();
        let n = slot.unreported.swap(0, Ordering::SeqCst);
        Self::report(&mut st.router, slot, n, &mut acts);
        self.perform(&mut st, acts);
    }

    /// One record of `slot` settled without reaching the delivery callback,
    /// off the lock.
    fn settle(&self, slot: &Slot) {
        if slot.settle() {
            self.absorb(slot);
        }
    }

    /// Tells the router that `n` records of `slot` settled (one call, not
    /// one per record: the tick reports up to a tick's worth of deliveries).
    fn report(router: &mut Router, slot: &Slot, n: u64, acts: &mut Vec<Action>) {
        acts.extend(router.on_settled_many(&slot.topic, slot.epoch, n));
    }

    /// Makes `slot` eager and reports what it collected so far.
    fn make_eager(router: &mut Router, slot: &Slot, acts: &mut Vec<Action>) {
        // SeqCst: see `Slot::settle`.
        slot.eager.store(true, Ordering::SeqCst);
        let n = slot.unreported.swap(0, Ordering::SeqCst);
        Self::report(router, slot, n, acts);
    }

    /// Reports every slot's collected settlements (before a snapshot is
    /// applied, so the router acknowledges a pending epoch at once when
    /// nothing is really in flight; and on the driver's tick, so idle
    /// clusters can close).
    fn absorb_all(st: &mut State, acts: &mut Vec<Action>) {
        let State {
            router,
            slots,
            old_slots,
            ..
        } = st;
        for s in slots.values().chain(old_slots.iter()) {
            let n = s.unreported.swap(0, Ordering::SeqCst);
            Self::report(router, s, n, acts);
        }
    }

    /// Makes the slots eager whose settlements the router now needs at once
    /// (held topic, or not the routing epoch any more) and lazy again once
    /// it does not; forgets old slots no record points to. Returns the
    /// actions the reports produced.
    fn sync_slots(st: &mut State) -> Vec<Action> {
        let mut acts = Vec::new();
        let State {
            router,
            slots,
            old_slots,
            ..
        } = st;
        for (topic, s) in slots.iter() {
            let want = router.needs_prompt_settlements(topic, s.epoch);
            let is = s.eager.load(Ordering::Relaxed);
            if want && !is {
                Self::make_eager(router, s, &mut acts);
            } else if !want && is {
                // Safe at any time: the router says it does not need
                // prompt reports (see `Router::needs_prompt_settlements`).
                s.eager.store(false, Ordering::SeqCst);
            }
        }
        old_slots.retain(|s| Arc::strong_count(s) > 1 || s.unreported.load(Ordering::SeqCst) > 0);
        acts
    }

    /// The slot for records of `topic` routed with `epoch`; the previous
    /// epoch's slot becomes eager and old, and header lists of epochs no
    /// topic routes with any more are destroyed from now on.
    fn slot_for(
        st: &mut State,
        pool: &HeaderPool,
        topic: &str,
        epoch: u64,
        acts: &mut Vec<Action>,
    ) -> Arc<Slot> {
        if let Some(s) = st.slots.get(topic) {
            if s.epoch == epoch {
                return s.clone();
            }
        }
        let s = Arc::new(Slot::new(topic, epoch));
        if let Some(old) = st.slots.insert(topic.to_string(), s.clone()) {
            Self::make_eager(&mut st.router, &old, acts);
            st.old_slots.push(old);
        }
        let live: Vec<u64> = st.slots.values().map(|s| s.epoch).collect();
        st.header_cache.retain_live(&live);
        pool.set_live(live);
        s
    }

    /// Routes `rec` (under the lock): where to hand it over. On anything but
    /// `Ok` the record's in-flight count has been settled.
    fn route_locked(
        &self,
        st: &mut State,
        rec: &RecordRef<'_>,
        acts: &mut Vec<Action>,
    ) -> Result<Routed, Why> {
        let (cluster, partition, epoch) = match st.router.route(rec.topic, rec.key) {
            Decision::Hold => return Err(Why::Hold),
            Decision::NoRoute(e) => return Err(Why::Failed(e.into())),
            Decision::Send {
                cluster,
                partition,
                epoch,
            } => (cluster, partition, epoch),
        };
        let producer = match st.clusters.get(&*cluster) {
            Some(Conn::Ready(p)) => p.clone(),
            other => {
                let error = match other {
                    Some(Conn::Refused(e)) | Some(Conn::Unverified(e)) => e.clone(),
                    Some(Conn::Ready(_)) | Some(Conn::Opening) | None => KafkaError::Other {
                        cluster: cluster.to_string(),
                        detail: "no producer open for the cluster yet".into(),
                    },
                };
                acts.extend(st.router.on_settled(rec.topic, epoch));
                metrics::counter!("flotilla_producer_delivery_errors_total", "cluster" => cluster.clone())
                    .increment(1);
                return Err(Why::Failed(FleetSendError::ClusterUnavailable {
                    cluster,
                    error,
                }));
            }
        };
        let slot = Self::slot_for(st, &self.headers, rec.topic, epoch, acts);
        // Under the lock we hold anyway: no lock of its own per record.
        let headers =
            matches!(rec.headers, HRef::None).then(|| st.header_cache.take(&self.headers, epoch));
        Ok(Routed {
            producer,
            slot,
            cluster,
            partition,
            headers,
        })
    }

    /// Hands a routed record to librdkafka (with or without the lock) with
    /// `sink` as its delivery. The pending record comes back: on success to
    /// wait on (a `Sink::Cell`), on failure with its sink to take back, and
    /// the caller must settle the record.
    fn hand_over(
        r: Routed,
        rec: &RecordRef<'_>,
        sink: Sink,
    ) -> Result<Arc<Pending>, (Arc<Pending>, Why)> {
        let Routed {
            producer,
            slot,
            cluster,
            partition,
            headers,
        } = r;
        let epoch = slot.epoch;
        let recycle = headers.is_some();
        let list = headers.unwrap_or_else(|| rec.headers_with_epoch(epoch));
        let pending = Pending::new(slot, rec.size(), recycle, sink);
        let opaque = DeliverySender::new(pending.clone());
        let record = headers::Produce {
            topic: rec.topic,
            partition: rec.partition.unwrap_or(partition as i32),
            key: rec.key,
            payload: rec.payload,
            timestamp: rec.timestamp,
        };
        // `producer` (kept until the end of this function) keeps the handle alive.
        match headers::produce(producer.client().native_ptr(), &record, list, opaque) {
            Ok(()) => Ok(pending),
            Err((e, list, opaque)) => {
                // Not answered: the caller still has the record (and, for a
                // forwarding sink, takes its oneshot sender back). The list
                // is destroyed (a failed hand-over is rare).
                drop(list);
                drop(opaque.into_inner());
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
                    Err((pending, Why::QueueFull(cluster)))
                } else {
                    let error = from_rdkafka(&cluster, "enqueue", &e);
                    metrics::counter!("flotilla_producer_delivery_errors_total", "cluster" => cluster.clone())
                        .increment(1);
                    Err((
                        pending,
                        Why::Failed(FleetSendError::Kafka { cluster, error }),
                    ))
                }
            }
        }
    }

    /// Routes and hands over `rec` under the lock (releasing held records).
    /// On anything but success the record's in-flight count has been
    /// settled and `tx` comes back.
    fn try_send(
        &self,
        st: &mut State,
        rec: &RecordRef<'_>,
        tx: Tx,
        acts: &mut Vec<Action>,
    ) -> Result<(), (Tx, Why)> {
        let r = match self.route_locked(st, rec, acts) {
            Ok(r) => r,
            Err(why) => return Err((tx, why)),
        };
        match Self::hand_over(r, rec, Sink::Forward(Mutex::new(Some(tx)))) {
            Ok(_) => Ok(()),
            Err((p, why)) => {
                acts.extend(st.router.on_settled(&p.slot.topic, p.slot.epoch));
                let tx = p
                    .take_forward()
                    .expect("a failed hand-over keeps its sender");
                Err((tx, why))
            }
        }
    }

    /// One attempt to send (or hold) a record; see [`Attempt`].
    fn attempt(&self, rec: &RecordRef<'_>) -> Attempt {
        if self.shut.load(Ordering::Relaxed) {
            return Attempt::Failed(FleetSendError::Closed);
        }
        let mut st = self.lock();
        let mut acts = Vec::new();
        // (No hash of the topic in the common case: nothing held at all.)
        let queued = !st.held.is_empty() && st.held.get(rec.topic).is_some_and(|q| !q.is_empty());
        let res = if queued || self.outage_hold() {
            Err(Why::Hold)
        } else {
            self.route_locked(&mut st, rec, &mut acts)
        };
        let routed = match res {
            Ok(r) => Ok(r),
            Err(why) => Err(self.hold_or_fail(&mut st, rec, why)),
        };
        if !acts.is_empty() {
            self.perform(&mut st, acts);
        }
        drop(st);
        match routed {
            Err(out) => out,
            // Off the lock: routed (and counted in flight) already.
            Ok(r) => match Self::hand_over(r, rec, Sink::Cell(Cell::new())) {
                Ok(p) => Attempt::Sent(p),
                Err((p, why)) => {
                    self.settle(&p.slot);
                    match why {
                        Why::QueueFull(c) => Attempt::QueueFull(c),
                        Why::Failed(e) => Attempt::Failed(e),
                        Why::Hold => unreachable!("hand_over never holds"),
                    }
                }
            },
        }
    }

    /// A record that was not routed: held (if there is room) or failed.
    fn hold_or_fail(&self, st: &mut State, rec: &RecordRef<'_>, why: Why) -> Attempt {
        match why {
            Why::Hold => {
                if st.held_total < self.hold_capacity {
                    let (tx, rx) = oneshot::channel();
                    let id = st.next_id;
                    st.next_id += 1;
                    st.held_total += 1;
                    st.held
                        .entry(rec.topic.to_string())
                        .or_default()
                        .push_back(Held {
                            id,
                            rec: rec.to_owned_record(),
                            tx,
                        });
                    if !st.held_since.contains_key(rec.topic) {
                        st.held_since.insert(rec.topic.to_string(), Instant::now());
                    }
                    metrics::gauge!("flotilla_producer_held_records").increment(1.0);
                    Attempt::Held(id, rx)
                } else {
                    Attempt::Full
                }
            }
            Why::QueueFull(c) => Attempt::QueueFull(c),
            Why::Failed(e) => Attempt::Failed(e),
        }
    }

    /// Takes a held record back (its sender timed out). None: already sent.
    fn unhold(&self, topic: &str, id: u64) -> Option<OwnedRecord> {
        let mut st = self.lock();
        let q = st.held.get_mut(topic)?;
        let i = q.iter().position(|h| h.id == id)?;
        let h = q.remove(i)?;
        if q.is_empty() {
            st.held.remove(topic);
        }
        st.held_total -= 1;
        metrics::gauge!("flotilla_producer_held_records").decrement(1.0);
        drop(st);
        self.space.notify_waiters();
        Some(h.rec)
    }

    /// Performs router actions in order (Release and Close here, Ack via the driver).
    fn perform(&self, st: &mut State, acts: Vec<Action>) {
        let mut work: VecDeque<Action> = acts.into();
        let mut hurry = false;
        loop {
            while let Some(a) = work.pop_front() {
                match a {
                    Action::Open(c) => {
                        if let std::collections::hash_map::Entry::Vacant(e) = st.clusters.entry(c) {
                            // Normally opened by the driver around the snapshot
                            // that asked for it; if not, open it now.
                            e.insert(Conn::Opening);
                            let _ = self.cmds.send(Cmd::Verify);
                        }
                    }
                    Action::Flush { topic, epoch } => {
                        // The counts are exact while the topic is held (its
                        // slots are eager); the ack follows the last delivery
                        // by itself. Only make librdkafka send at once.
                        tracing::debug!(topic, epoch, "switch: waiting for in-flight records");
                        hurry = true;
                    }
                    Action::Ack { topic, epoch } => {
                        tracing::debug!(topic, epoch, "switch: acknowledging pending epoch");
                        let _ = self.acks.send(());
                    }
                    Action::Release { topic, epoch } => {
                        if let Some(since) = st.held_since.remove(&topic) {
                            metrics::histogram!("flotilla_producer_hold_seconds")
                                .record(since.elapsed().as_secs_f64());
                        }
                        let prev = st.released.insert(topic.clone(), epoch);
                        if prev.is_some_and(|p| p != epoch) {
                            metrics::counter!("flotilla_producer_epoch_switches_total")
                                .increment(1);
                            tracing::info!(topic, epoch, "switch: routing with the new epoch");
                        }
                        let mut more = Vec::new();
                        self.drain(st, &topic, &mut more);
                        work.extend(more);
                    }
                    Action::Close(c) => {
                        if let Some(Conn::Ready(p)) = st.clusters.remove(&c) {
                            tracing::info!(cluster = %c, "closing the producer of a cluster no route needs");
                            let _ = std::thread::Builder::new()
                                .name("flotilla-producer-close".into())
                                .spawn(move || {
                                    let _ = p.flush(CLOSE_FLUSH);
                                    drop(p);
                                });
                        }
                    }
                }
            }
            // What the router just decided may change which slots must
            // report at once; their reports may decide more.
            work.extend(Self::sync_slots(st));
            if work.is_empty() {
                break;
            }
        }
        if hurry {
            self.hurry(st);
        }
    }

    /// Makes every open producer send what it has queued now instead of
    /// after `linger.ms`, so a switch's old-epoch records (and with them the
    /// ack) are not delayed by batching. `rd_kafka_flush` ignores
    /// `linger.ms` while it runs; rdkafka's own `flush` calls it with a zero
    /// timeout, too briefly for the broker threads to notice, hence the
    /// direct call with [`HURRY_MS`]. It blocks, so it runs on a thread of
    /// its own; its result does not matter (the delivery callbacks count).
    fn hurry(&self, st: &State) {
        let producers: Vec<Arc<Kafka>> = st
            .clusters
            .values()
            .filter_map(|c| match c {
                Conn::Ready(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        if producers.is_empty() {
            return;
        }
        let _ = std::thread::Builder::new()
            .name("flotilla-producer-hurry".into())
            .spawn(move || {
                let flushes: Vec<_> = producers
                    .into_iter()
                    .map(|p| {
                        std::thread::spawn(move || {
                            // SAFETY: `p` keeps the librdkafka handle alive for
                            // the call; rd_kafka_flush is thread-safe.
                            unsafe {
                                rdkafka::bindings::rd_kafka_flush(p.client().native_ptr(), HURRY_MS)
                            };
                        })
                    })
                    .collect();
                for f in flushes {
                    let _ = f.join();
                }
            });
    }

    /// Routes the held records of `topic` again, in order, until one is held again.
    fn drain(&self, st: &mut State, topic: &str, acts: &mut Vec<Action>) {
        if self.outage_hold() {
            return;
        }
        let mut freed = 0usize;
        while let Some(h) = st.held.get_mut(topic).and_then(VecDeque::pop_front) {
            let rec = RecordRef::of_owned(&h.rec);
            match self.try_send(st, &rec, h.tx, acts) {
                Ok(()) => {
                    st.held_total -= 1;
                    freed += 1;
                }
                Err((tx, Why::Hold | Why::QueueFull(_))) => {
                    // Still held (a newer switch), or librdkafka's queue is
                    // full: keep it first; the driver's tick retries.
                    let q = st.held.entry(topic.to_string()).or_default();
                    q.push_front(Held {
                        id: h.id,
                        rec: h.rec,
                        tx,
                    });
                    if !st.held_since.contains_key(topic) {
                        st.held_since.insert(topic.to_string(), Instant::now());
                    }
                    break;
                }
                Err((tx, Why::Failed(e))) => {
                    st.held_total -= 1;
                    freed += 1;
                    let _ = tx.send(Err((e, h.rec.into_message())));
                }
            }
        }
        if st.held.get(topic).is_some_and(VecDeque::is_empty) {
            st.held.remove(topic);
        }
        if !st.held.contains_key(topic) && !st.router.held_topics().any(|t| t == topic) {
            // Held by an outage or a full queue, not by a switch: not a switch pause.
            st.held_since.remove(topic);
        }
        if freed > 0 {
            metrics::gauge!("flotilla_producer_held_records").decrement(freed as f64);
            self.space.notify_waiters();
        }
    }

    /// Retries held records whose release was deferred (queue full, outage over).
    /// Also reports the settlements the slots collected (see [`Self::absorb_all`]).
    fn drain_all(&self) {
        self.headers.tick();
        let mut st = self.lock();
        let mut acts = Vec::new();
        Self::absorb_all(&mut st, &mut acts);
        let topics: Vec<String> = st.held.keys().cloned().collect();
        for t in topics {
            self.drain(&mut st, &t, &mut acts);
        }
        self.perform(&mut st, acts);
    }

    /// Opens every active cluster the snapshot's open and pending epochs
    /// write to that has no producer yet (or could not be verified before).
    /// `retry`: also check clusters again that could not be verified before
    /// (the driver's periodic retry; a snapshot alone does not wait again).
    async fn open_clusters(&self, snap: &FleetSnapshot, retry: bool, which: Which) {
        let wanted: Vec<ClusterSpec> = {
            let st = self.lock();
            let mut ids: Vec<&String> = snap
                .routes
                .values()
                .flat_map(|r| match which {
                    Which::Open => r.open_epoch(),
                    Which::Pending => r.pending_epoch(),
                })
                .flat_map(|e| e.clusters())
                .collect();
            ids.sort();
            ids.dedup();
            ids.into_iter()
                .filter(|c| match st.clusters.get(*c) {
                    None | Some(Conn::Opening) => true,
                    Some(Conn::Unverified(_)) => retry,
                    Some(Conn::Ready(_)) | Some(Conn::Refused(_)) => false,
                })
                .filter_map(|c| snap.cluster(c))
                .filter(|s| s.state == ClusterState::Active)
                .cloned()
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let opened = join_all(wanted.into_iter().map(|spec| async move {
            let r = self.open_one(&spec).await;
            (spec, r)
        }))
        .await;
        let mut st = self.lock();
        for (spec, r) in opened {
            if matches!(st.clusters.get(&spec.id), Some(Conn::Ready(_))) {
                continue;
            }
            let conn = match r {
                Ok(p) => {
                    tracing::info!(cluster = %spec.id, bootstrap = %spec.bootstrap, "opened producer (Kafka cluster id verified)");
                    Conn::Ready(p)
                }
                Err(e) if e.is_permanent() => {
                    tracing::error!(cluster = %spec.id, error = %e, "REFUSING cluster: records routed to it fail");
                    Conn::Refused(e)
                }
                Err(e) => {
                    tracing::warn!(cluster = %spec.id, error = %e, "cannot open cluster yet; records routed to it fail until it answers");
                    Conn::Unverified(e)
                }
            };
            st.clusters.insert(spec.id.clone(), conn);
        }
    }

    async fn open_one(&self, spec: &ClusterSpec) -> Result<Arc<Kafka>, KafkaError> {
        check_cluster(spec, &self.kafka, &self.profiles, self.connect_timeout).await?;
        let cfg = client_config(spec, &self.kafka, &self.profiles)?;
        let cluster: Arc<str> = spec.id.as_str().into();
        let ctx = Ctx {
            core: self.me.clone(),
            pool: self.headers.clone(),
            returns: Returns::default(),
            records: metrics::counter!("flotilla_producer_records_total", "cluster" => cluster.clone()),
            bytes: metrics::counter!("flotilla_producer_bytes_total", "cluster" => cluster.clone()),
            errors: metrics::counter!("flotilla_producer_delivery_errors_total", "cluster" => cluster.clone()),
            cluster,
        };
        let producer = cfg
            .create_with_context::<_, Kafka>(ctx)
            .map(Arc::new)
            .map_err(|e| from_rdkafka(&spec.id, "create producer", &e))?;
        let p = producer.clone();
        let timeout = self.connect_timeout;
        // In the background: it takes a round trip or two (~50 ms here), and
        // the opening must not lengthen a switch's hold. Best effort: at worst
        // the first records wait for librdkafka's own timer.
        drop(tokio::task::spawn_blocking(move || {
            prime_producer_id(p.client(), timeout)
        }));
        Ok(producer)
    }

    /// Opens what the snapshot's open epochs need, hands the snapshot to the
    /// router, then opens what only its pending epochs need.
    ///
    /// The pending epochs' clusters are opened *after* the router has seen
    /// the snapshot: verifying a cluster takes a round trip or more, and
    /// before the router sees a pending epoch it neither holds nor flushes
    /// nor acknowledges, which delayed every other producer's switch. Records
    /// go to those clusters only once the epoch is open, in a later snapshot
    /// that this (sequential) driver applies after the opening is done.
    async fn apply_snapshot(&self, snap: &FleetSnapshot, retry: bool) {
        self.open_clusters(snap, retry, Which::Open).await;
        {
            let mut st = self.lock();
            // Remember the epoch each topic routes with, to count switches on Release.
            for t in snap.routes.keys() {
                if let Some(e) = st.router.routing_epoch(t) {
                    st.released.entry(t.clone()).or_insert(e);
                }
            }
            let mut acts = Vec::new();
            Self::absorb_all(&mut st, &mut acts);
            acts.extend(st.router.on_snapshot(snap));
            let held: Vec<String> = st.router.held_topics().map(str::to_string).collect();
            for t in held {
                st.held_since.entry(t).or_insert_with(Instant::now);
            }
            self.perform(&mut st, acts);
        }
        self.open_clusters(snap, retry, Which::Pending).await;
    }

    fn ready_producers(&self) -> Vec<Arc<Kafka>> {
        self.lock()
            .clusters
            .values()
            .filter_map(|c| match c {
                Conn::Ready(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }
}

// ---- lease and driver -----------------------------------------------------------------

type LeaseSlot = Arc<tokio::sync::Mutex<Option<ClientLease>>>;

struct Health {
    lease_ok: AtomicBool,
}

async fn sync_acks(core: &Core, lease: &LeaseSlot) {
    let acked = core.lock().router.acked();
    let mut slot = lease.lock().await;
    let Some(l) = slot.as_mut() else { return };
    if l.record().acked == acked {
        return;
    }
    let mut rec = l.record().clone();
    rec.acked = acked;
    if let Err(e) = l.update(rec).await {
        tracing::warn!(error = %e, "cannot write acknowledged epochs to the registry; retrying");
        let _ = core.acks.send(());
        drop(slot);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the acknowledged epochs whenever the router acknowledges one.
async fn acker(core: Arc<Core>, lease: LeaseSlot, mut rx: mpsc::UnboundedReceiver<()>) {
    while rx.recv().await.is_some() {
        // One write covers every request made so far.
        while rx.try_recv().is_ok() {}
        sync_acks(&core, &lease).await;
    }
}

async fn driver(
    core: Arc<Core>,
    watcher: Arc<FleetWatcher>,
    health: Arc<Health>,
    mut snaps: tokio::sync::watch::Receiver<Arc<FleetSnapshot>>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_verify = Instant::now();
    loop {
        tokio::select! {
            biased;
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Verify) => core.apply_snapshot(&watcher.snapshot(), true).await,
                None => return,
            },
            r = snaps.changed() => {
                if r.is_err() {
                    return;
                }
                let snap = snaps.borrow_and_update().clone();
                core.apply_snapshot(&snap, false).await;
            }
            _ = tick.tick() => {
                let down = watcher.is_stale() || !health.lease_ok.load(Ordering::Relaxed);
                let was = core.registry_down.swap(down, Ordering::Relaxed);
                if was != down {
                    if down {
                        tracing::warn!(mode = ?core.outage, "registry unreachable");
                    } else {
                        tracing::info!("registry reachable again");
                    }
                }
                if last_verify.elapsed() >= VERIFY_RETRY {
                    last_verify = Instant::now();
                    let retry = core
                        .lock()
                        .clusters
                        .values()
                        .any(|c| matches!(c, Conn::Unverified(_) | Conn::Opening));
                    if retry {
                        core.apply_snapshot(&watcher.snapshot(), true).await;
                    }
                }
                core.drain_all();
            }
        }
    }
}

async fn lease_keeper(
    core: Arc<Core>,
    registry: Registry,
    lease: LeaseSlot,
    health: Arc<Health>,
    template: ClientRecord,
    ttl: Duration,
) {
    let every = (ttl / 3).max(Duration::from_millis(50));
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let r = match lease.lock().await.as_ref() {
            Some(l) => l.keep_alive().await.map(|_| ()),
            None => Err(RegistryError::Other("not registered".into())),
        };
        match r {
            Ok(()) => {
                last_ok = Instant::now();
                health.lease_ok.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                let expired =
                    matches!(e, RegistryError::LeaseExpired { .. }) || last_ok.elapsed() > ttl;
                if !expired {
                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                    continue;
                }
                health.lease_ok.store(false, Ordering::Relaxed);
                let mut rec = template.clone();
                rec.acked = core.lock().router.acked();
                match registry.register_client(rec, ttl).await {
                    Ok(l) => {
                        tracing::info!(id = %template.id, "registered again after the lease lapsed");
                        *lease.lock().await = Some(l);
                        last_ok = Instant::now();
                        health.lease_ok.store(true, Ordering::Relaxed);
                        let _ = core.acks.send(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register with the registry; retrying")
                    }
                }
            }
        }
    }
}

// ---- the public handle ----------------------------------------------------------------

struct Inner {
    core: Arc<Core>,
    watcher: Arc<FleetWatcher>,
    lease: LeaseSlot,
    tasks: Vec<JoinHandle<()>>,
    client_id: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.core.shut.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
        let lease = self.lease.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Some(l) = lease.lock().await.take() {
                    let _ = l.revoke().await;
                }
            });
        }
    }
}

/// A drop-in for rdkafka's `FutureProducer` that routes every record by the
/// fleet registry. Cheap to clone (one shared producer); `Send + Sync`; no
/// polling needed (librdkafka's polling threads and two tokio tasks do it).
///
/// Must be created inside a tokio runtime.
#[derive(Clone)]
pub struct FleetProducer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FleetProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetProducer")
            .field("client_id", &self.inner.client_id)
            .finish()
    }
}

impl FleetProducer {
    /// Connects to the etcd registry at `endpoints` for `fleet` and starts a
    /// producer with `config` (whose `registry` is replaced). etcd down is a
    /// [`FleetProducerError::Registry`] naming the endpoints.
    pub async fn connect<S: AsRef<str>>(
        endpoints: &[S],
        fleet: &str,
        mut config: FleetProducerConfig,
    ) -> Result<FleetProducer, FleetProducerError> {
        // Before connecting to etcd.
        config.check_properties()?;
        let kv = EtcdKv::connect(endpoints, Default::default()).await?;
        config.registry = Some(Registry::new(Arc::new(kv), fleet));
        Self::new(config).await
    }

    /// Starts a producer: checks the rdkafka properties with librdkafka (one
    /// it refuses is [`FleetProducerError::InvalidProperty`], before anything
    /// connects), reads the fleet snapshot (an unreachable registry
    /// is an error after `config.watcher.start_timeout`), registers the client
    /// record under a lease, opens the clusters the routes need and
    /// acknowledges any pending epoch.
    pub async fn new(config: FleetProducerConfig) -> Result<FleetProducer, FleetProducerError> {
        let registry = config.registry.clone().ok_or_else(|| {
            FleetProducerError::Config(
                "no registry set (FleetProducerConfig::registry, or use FleetProducer::connect)"
                    .into(),
            )
        })?;
        if config.hold_capacity == 0 {
            return Err(FleetProducerError::Config(
                "hold_capacity must be at least 1".into(),
            ));
        }
        config.check_properties()?;
        let watcher =
            Arc::new(FleetWatcher::start(registry.clone(), config.watcher.clone()).await?);
        let template = ClientRecord {
            version: SCHEMA_VERSION,
            kind: ClientKind::Producer,
            id: config.client_id.clone(),
            acked: Default::default(),
            group: None,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let lease = registry
            .register_client(template.clone(), config.lease_ttl)
            .await?;
        let lease: LeaseSlot = Arc::new(tokio::sync::Mutex::new(Some(lease)));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let core = Arc::new_cyclic(|me| Core {
            state: Mutex::new(State::default()),
            headers: Arc::new(HeaderPool::default()),
            kafka: config.kafka.clone(),
            profiles: config.profiles.clone(),
            connect_timeout: config.connect_timeout,
            hold_capacity: config.hold_capacity,
            outage: config.registry_outage,
            registry_down: AtomicBool::new(false),
            space: Notify::new(),
            cmds: cmd_tx,
            acks: ack_tx,
            shut: AtomicBool::new(false),
            me: me.clone(),
        });
        let health = Arc::new(Health {
            lease_ok: AtomicBool::new(true),
        });
        // Subscribe first so no snapshot published after this one is missed.
        let snaps = watcher.subscribe();
        core.apply_snapshot(&watcher.snapshot(), false).await;
        sync_acks(&core, &lease).await;
        let tasks = vec![
            tokio::spawn(acker(core.clone(), lease.clone(), ack_rx)),
            tokio::spawn(driver(
                core.clone(),
                watcher.clone(),
                health.clone(),
                snaps,
                cmd_rx,
            )),
            tokio::spawn(lease_keeper(
                core.clone(),
                registry,
                lease.clone(),
                health,
                template,
                config.lease_ttl,
            )),
        ];
        Ok(FleetProducer {
            inner: Arc::new(Inner {
                core,
                watcher,
                lease,
                tasks,
                client_id: config.client_id,
            }),
        })
    }

    /// This producer's registry id (`clients/producer/<id>`).
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The registry snapshot the producer currently sees.
    pub fn snapshot(&self) -> Arc<FleetSnapshot> {
        self.inner.watcher.snapshot()
    }

    /// The epoch `topic` is currently routed with, if any.
    pub fn routing_epoch(&self, topic: &str) -> Option<u64> {
        self.inner.core.lock().router.routing_epoch(topic)
    }

    /// Epoch-only header lists taken so far (recycled, fresh) and lists
    /// parked in the pool now (tests of the recycling).
    #[cfg(test)]
    pub(super) fn header_lists(&self) -> (u64, u64, usize) {
        let core = &self.inner.core;
        let (recycled, fresh) = core.lock().header_cache.counts;
        (recycled, fresh, core.headers.parked())
    }

    /// Records currently waiting in the hold buffer.
    pub fn held_records(&self) -> usize {
        self.inner.core.lock().held_total
    }

    /// The epochs this producer has acknowledged, per topic.
    pub fn acked(&self) -> std::collections::BTreeMap<String, u64> {
        self.inner.core.lock().router.acked()
    }

    /// Sends a record, like `FutureProducer::send`: `queue_timeout` bounds how
    /// long the record may wait *before* it is handed to Kafka (held during a
    /// route switch, hold buffer full, librdkafka queue full, registry outage
    /// in [`OutageMode::Hold`]); `Timeout::Never` waits as long as it takes.
    /// Once handed over, delivery is bounded by `message.timeout.ms`.
    ///
    /// The record gets an [`EPOCH_HEADER`](super::EPOCH_HEADER) after its own headers.
    pub async fn send<K, P, T>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: T,
    ) -> FleetDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
        T: Into<Timeout>,
    {
        let rec = RecordRef::of_future(&record);
        self.send_ref(rec, queue_timeout.into()).await
    }

    /// [`send`](Self::send) for an [`OwnedRecord`]; the future is `'static`.
    pub async fn send_owned(
        &self,
        record: OwnedRecord,
        queue_timeout: impl Into<Timeout>,
    ) -> FleetDeliveryResult {
        let timeout = queue_timeout.into();
        self.send_ref(RecordRef::of_owned(&record), timeout).await
    }

    async fn send_ref(&self, rec: RecordRef<'_>, timeout: Timeout) -> FleetDeliveryResult {
        let core = &self.inner.core;
        let started = Instant::now();
        let deadline = match timeout {
            Timeout::After(d) => Some(started + d),
            Timeout::Never => None,
        };
        loop {
            let notified = core.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let reason = match core.attempt(&rec) {
                Attempt::Sent(p) => {
                    let out = std::future::poll_fn(|cx| cell_of(&p).poll(cx)).await;
                    return match out {
                        Some(out) => out.map_err(|e| *e),
                        None => Err((FleetSendError::Closed, rec.to_owned_record().into_message())),
                    };
                }
                Attempt::Held(id, rx) => {
                    return self.await_held(rx, rec, id, deadline, started).await
                }
                Attempt::Failed(e) => return Err((e, rec.to_owned_record().into_message())),
                Attempt::Full => WaitReason::HoldBufferFull,
                Attempt::QueueFull(_) => WaitReason::QueueFull,
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err((
                    FleetSendError::Timeout {
                        waited: now - started,
                        reason,
                    },
                    rec.to_owned_record().into_message(),
                ));
            }
            let mut wait = Duration::from_millis(if reason == WaitReason::QueueFull {
                5
            } else {
                50
            });
            if let Some(d) = deadline {
                wait = wait.min(d - now);
            }
            if reason == WaitReason::HoldBufferFull {
                let _ = tokio::time::timeout(wait, notified).await;
            } else {
                tokio::time::sleep(wait).await;
            }
        }
    }

    async fn await_held(
        &self,
        mut rx: Rx,
        rec: RecordRef<'_>,
        id: u64,
        deadline: Option<Instant>,
        started: Instant,
    ) -> FleetDeliveryResult {
        if let Some(d) = deadline {
            tokio::select! {
                r = &mut rx => return flatten(r, rec),
                _ = tokio::time::sleep_until(d) => {}
            }
            if let Some(owned) = self.inner.core.unhold(rec.topic, id) {
                return Err((
                    FleetSendError::Timeout {
                        waited: started.elapsed(),
                        reason: WaitReason::Held,
                    },
                    owned.into_message(),
                ));
            }
        }
        await_delivery(rx, rec).await
    }

    /// Sends without waiting, like `FutureProducer::send_result`: routes (or
    /// holds) the record now and returns a future of its delivery. A full hold
    /// buffer or librdkafka queue, or a record with no route, gives the record
    /// back with the error. A held record waits for the switch without a
    /// timeout (until it completes or is aborted).
    #[allow(clippy::result_large_err)]
    pub fn send_result<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (FleetSendError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let err = match self.inner.core.attempt(&RecordRef::of_future(&record)) {
            Attempt::Sent(p) => {
                return Ok(DeliveryFuture {
                    waiting: Waiting::Cell(p),
                })
            }
            Attempt::Held(_, rx) => {
                return Ok(DeliveryFuture {
                    waiting: Waiting::Held(rx, record.topic.into()),
                })
            }
            Attempt::Failed(e) => e,
            Attempt::Full => FleetSendError::HoldBufferFull {
                capacity: self.inner.core.hold_capacity,
            },
            Attempt::QueueFull(cluster) => FleetSendError::Kafka {
                error: from_code(&cluster, RDKafkaErrorCode::QueueFull, "enqueue"),
                cluster,
            },
        };
        Err((err, record))
    }

    /// Waits until the hold buffer is empty and every record handed to Kafka
    /// is delivered or failed, at most `timeout`.
    pub async fn flush<T: Into<Timeout>>(&self, timeout: T) -> Result<(), FleetSendError> {
        let started = Instant::now();
        let deadline = match timeout.into() {
            Timeout::After(d) => Some(started + d),
            Timeout::Never => None,
        };
        while self.held_records() > 0 {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(FleetSendError::Timeout {
                    waited: started.elapsed(),
                    reason: WaitReason::Held,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let producers = self.inner.core.ready_producers();
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let r = tokio::task::spawn_blocking(move || {
            for p in &producers {
                let t = remaining.map_or(Timeout::Never, Timeout::After);
                p.flush(t)?;
            }
            Ok::<(), RdKafkaError>(())
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(FleetSendError::Timeout {
                waited: started.elapsed(),
                reason: WaitReason::QueueFull,
            }),
        }
    }

    /// Flushes (at most `timeout`), stops the background tasks and revokes the
    /// lease (the client record disappears from the registry at once). Other
    /// clones of this handle fail their sends with [`FleetSendError::Closed`].
    pub async fn close(&self, timeout: Duration) -> Result<(), FleetSendError> {
        let r = self.flush(timeout).await;
        self.inner.core.shut.store(true, Ordering::Relaxed);
        for t in &self.inner.tasks {
            t.abort();
        }
        if let Some(l) = self.inner.lease.lock().await.take() {
            let _ = l.revoke().await;
        }
        r
    }
}

async fn await_delivery(rx: Rx, rec: RecordRef<'_>) -> FleetDeliveryResult {
    flatten(rx.await, rec)
}

fn flatten(
    r: Result<FleetDeliveryResult, oneshot::Canceled>,
    rec: RecordRef<'_>,
) -> FleetDeliveryResult {
    match r {
        Ok(r) => r,
        Err(_) => Err((FleetSendError::Closed, rec.to_owned_record().into_message())),
    }
}

/// The cell a record handed over directly is waited on with.
fn cell_of(p: &Pending) -> &Cell {
    match &p.sink {
        Sink::Cell(c) => c,
        Sink::Forward(_) => unreachable!("records handed over by a caller wait on a cell"),
    }
}

/// The delivery of a record handed over with [`FleetProducer::send_result`].
pub struct DeliveryFuture {
    waiting: Waiting,
}

enum Waiting {
    /// Handed to librdkafka at once (the topic is the slot's).
    Cell(Arc<Pending>),
    /// Held for a switch: the delivery comes through a oneshot.
    Held(Rx, Arc<str>),
}

impl std::fmt::Debug for DeliveryFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (topic, held) = match &self.waiting {
            Waiting::Cell(p) => (&p.slot.topic, false),
            Waiting::Held(_, t) => (t, true),
        };
        f.debug_struct("DeliveryFuture")
            .field("topic", topic)
            .field("held", &held)
            .finish()
    }
}

impl std::future::Future for DeliveryFuture {
    type Output = FleetDeliveryResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let topic = match &mut self.waiting {
            Waiting::Cell(p) => match cell_of(p).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(out)) => return Poll::Ready(out.map_err(|e| *e)),
                Poll::Ready(None) => &p.slot.topic,
            },
            Waiting::Held(rx, topic) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(r)) => return Poll::Ready(r),
                Poll::Ready(Err(_)) => topic,
            },
        };
        Poll::Ready(Err((
            FleetSendError::Closed,
            OwnedMessage::new(
                None,
                None,
                topic.to_string(),
                rdkafka::Timestamp::NotAvailable,
                -1,
                -1,
                None,
            ),
        )))
    }
}

#[cfg(test)]
mod delivery_cell_tests {
    use super::*;

    fn pending() -> Arc<Pending> {
        Pending::new(
            Arc::new(Slot::new("t", 3)),
            5,
            false,
            Sink::Cell(Cell::new()),
        )
    }

    fn delivered(offset: i64) -> FleetDeliveryResult {
        Ok(Delivery {
            cluster: "A".into(),
            partition: 1,
            offset,
            epoch: 3,
        })
    }

    #[test]
    fn a_sender_dropped_without_a_delivery_closes_the_cell() {
        let p = pending();
        assert!(cell_of(&p).take().is_none(), "nothing yet");
        drop(DeliverySender::new(p.clone()));
        assert!(matches!(cell_of(&p).take(), Some(None)), "closed");
        // The future reports Closed with the slot's topic.
        let f = DeliveryFuture {
            waiting: Waiting::Cell(p),
        };
        let (e, m) = futures::executor::block_on(f).unwrap_err();
        assert_eq!(e, FleetSendError::Closed);
        assert_eq!(m.topic(), "t");
    }

    #[test]
    fn the_opaque_round_trip_and_a_failed_hand_over_do_not_answer() {
        let p = pending();
        // Through librdkafka and back (as a delivery callback gets it).
        let ptr = DeliverySender::new(p.clone()).into_ptr();
        // SAFETY: from `into_ptr`, converted back once.
        let s = unsafe { DeliverySender::from_ptr(ptr) };
        assert!(cell_of(&p).take().is_none());
        // A failed hand-over takes the pending record back unanswered.
        drop(s.into_inner());
        assert!(cell_of(&p).take().is_none());
        assert_eq!(Arc::strong_count(&p), 1, "no reference leaked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_from_another_thread_wakes_the_waiter() {
        for i in 0..200 {
            let p = pending();
            let s = DeliverySender::new(p.clone());
            let f = DeliveryFuture {
                waiting: Waiting::Cell(p),
            };
            let waiter = tokio::spawn(f);
            let sender = std::thread::spawn(move || drop(s.send(delivered(i))));
            let got = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .unwrap();
            sender.join().unwrap();
            assert_eq!(got.unwrap().offset, i);
        }
    }

    #[test]
    fn a_forwarding_sink_answers_its_oneshot() {
        let (tx, rx) = oneshot::channel();
        let p = Pending::new(
            Arc::new(Slot::new("t", 3)),
            0,
            false,
            Sink::Forward(Mutex::new(Some(tx))),
        );
        drop(DeliverySender::new(p).send(delivered(7)));
        let got = futures::executor::block_on(rx).unwrap().unwrap();
        assert_eq!(got.offset, 7);
    }
}

#[cfg(test)]
mod header_tests {
    use super::*;
    use rdkafka::message::Header;

    /// A fresh list (records with headers of their own, held records
    /// re-sent as `OwnedRecord`s) keeps the user's headers, in order, and
    /// appends the epoch header.
    #[test]
    fn headers_with_epoch_keeps_the_users_headers_first() {
        let owned = OwnedRecord {
            topic: "t".into(),
            key: None,
            payload: None,
            headers: vec![("a".into(), Some(b"1".to_vec())), ("b".into(), None)],
            partition: None,
            timestamp: None,
        };
        let rd = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some("1"),
            })
            .insert(Header::<&[u8]> {
                key: "b",
                value: None,
            });
        let future = FutureRecord::<(), ()>::to("t").headers(rd);
        let want = vec![
            ("a".to_string(), Some(b"1".to_vec())),
            ("b".to_string(), None),
            (super::super::EPOCH_HEADER.to_string(), Some(b"42".to_vec())),
        ];
        assert_eq!(
            RecordRef::of_owned(&owned).headers_with_epoch(42).to_vec(),
            want
        );
        assert_eq!(
            RecordRef::of_future(&future)
                .headers_with_epoch(42)
                .to_vec(),
            want
        );
        let bare = FutureRecord::<(), ()>::to("t");
        assert_eq!(
            RecordRef::of_future(&bare).headers_with_epoch(7).to_vec(),
            vec![(super::super::EPOCH_HEADER.to_string(), Some(b"7".to_vec()))]
        );
    }
}
