//! librdkafka header lists for the epoch header, recycled instead of
//! allocated and freed per record, and the `rd_kafka_produceva` call that
//! hands a record (with such a list) to librdkafka.
//!
//! # Why
//!
//! Every record carries the epoch header (the handoff protocol needs it).
//! librdkafka keeps a record's headers in a list of its own
//! (`rd_kafka_headers_t`): three small allocations on the sending thread
//! (the list, its element array, the header), freed on the producer's
//! polling thread after the delivery report. With glibc's allocator those
//! cross-thread frees were the whole gap between `FleetProducer` and a raw
//! `FutureProducer` without headers (issue #4; +1.1–2.2 µs of client CPU per
//! record on the 2-core test machine, about a third of the total).
//!
//! A record's epoch-only list never changes (its value is the epoch), so the
//! delivery callback *detaches* it from the delivered message
//! (`rd_kafka_message_detach_headers`: librdkafka then destroys the message
//! without it) and returns it here; the next record of the same epoch takes
//! it again. In a steady state no header list is allocated or freed.
//!
//! # Moving parts
//!
//! - [`HeaderList`]: an owned `rd_kafka_headers_t`, destroyed on drop.
//! - [`Returns`] (one per cluster producer, used by its polling thread only)
//!   collects detached lists into a batch of one epoch and gives full
//!   batches to the [`HeaderPool`] — one pool lock per [`BATCH`] records.
//! - [`HeaderPool`] (one per `FleetProducer`): the parked batches, bounded
//!   ([`POOL_MAX`] lists), only of epochs records are routed with
//!   ([`HeaderPool::set_live`]); emptied when nobody took from it for a while
//!   ([`HeaderPool::tick`]), so a burst's lists do not stay forever.
//! - [`SenderCache`] (inside the producer's state, used under its lock where
//!   the record is routed anyway): a few lists per epoch, refilled a batch at
//!   a time from the pool, or a fresh list when the pool has none.
//!
//! Records with user headers keep a fresh list each (theirs differ per
//! record); only the epoch-only lists are recycled.

use std::ffi::{c_char, c_void, CString};
use std::ptr::{self, NonNull};
use std::sync::Mutex;

use rdkafka::bindings as rd;
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::util::IntoOpaque;

use super::EPOCH_HEADER;

/// Lists per batch moved between a polling thread and the senders.
pub(super) const BATCH: usize = 256;
/// At most this many lists are parked in a producer's pool (~180 bytes
/// each with glibc: ~12 MB); more are destroyed. Enough for the records in
/// flight of a busy producer (10 000 outstanding at 600 000 records/s is a
/// sixth of it); a burst beyond it falls back to a fresh list per record.
pub(super) const POOL_MAX: usize = 65_536;
/// Driver ticks without a single take after which the pool is emptied.
const IDLE_TICKS: u32 = 20;

// ---- one list -------------------------------------------------------------------------

/// An owned librdkafka header list. Destroyed on drop unless handed to
/// librdkafka ([`produce`]).
pub(super) struct HeaderList(NonNull<rd::rd_kafka_headers_t>);

// SAFETY: the list is plain heap memory owned exclusively by this value
// (librdkafka has no reference to it: it is either new, or was detached
// from a message librdkafka is done with); nothing in it is tied to a thread.
unsafe impl Send for HeaderList {}

impl HeaderList {
    /// An empty list with room for `capacity` headers.
    pub(super) fn with_capacity(capacity: usize) -> HeaderList {
        // SAFETY: no preconditions; it never returns NULL (librdkafka's
        // rd_malloc aborts when out of memory), checked anyway.
        let p = unsafe { rd::rd_kafka_headers_new(capacity) };
        HeaderList(NonNull::new(p).expect("rd_kafka_headers_new returned NULL"))
    }

    /// A list holding only the epoch header.
    pub(super) fn epoch(epoch: u64) -> HeaderList {
        let mut l = HeaderList::with_capacity(1);
        l.add_epoch(epoch);
        l
    }

    /// Appends a header (librdkafka copies name and value).
    pub(super) fn add(&mut self, key: &str, value: Option<&[u8]>) {
        let (v, n) = value.map_or((ptr::null(), 0), |v| (v.as_ptr() as *const c_void, v.len()));
        // SAFETY: the list is ours; name and value are valid for their
        // lengths during the call (librdkafka copies them, it does not need
        // NUL terminators when given the sizes). It only fails for a
        // read-only list (a consumed message's), never one of ours.
        unsafe {
            rd::rd_kafka_header_add(
                self.0.as_ptr(),
                key.as_ptr() as *const c_char,
                key.len() as isize,
                v,
                n as isize,
            )
        };
    }

    /// Appends the epoch header (decimal ASCII).
    pub(super) fn add_epoch(&mut self, epoch: u64) {
        let mut buf = [0u8; 20];
        self.add(EPOCH_HEADER, Some(decimal(epoch, &mut buf)));
    }

    /// Gives up ownership (to librdkafka).
    fn into_raw(self) -> *mut rd::rd_kafka_headers_t {
        let p = self.0.as_ptr();
        std::mem::forget(self);
        p
    }

    /// The headers as (name, value) pairs (for tests).
    #[cfg(test)]
    pub(super) fn to_vec(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        for i in 0.. {
            let mut name: *const c_char = ptr::null();
            let mut value: *const c_void = ptr::null();
            let mut size = 0usize;
            // SAFETY: the list is ours and alive; librdkafka returns pointers
            // into it (valid while it is) or NOENT past the end.
            let e = unsafe {
                rd::rd_kafka_header_get_all(self.0.as_ptr(), i, &mut name, &mut value, &mut size)
            };
            if e != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                break;
            }
            // SAFETY: NUL-terminated name and a value of `size` bytes (or
            // NULL), both inside the live list.
            let (k, v) = unsafe {
                (
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned(),
                    (!value.is_null())
                        .then(|| std::slice::from_raw_parts(value as *const u8, size).to_vec()),
                )
            };
            out.push((k, v));
        }
        out
    }
}

impl Drop for HeaderList {
    fn drop(&mut self) {
        // SAFETY: we own the list (see `Send`); destroyed once, here.
        unsafe { rd::rd_kafka_headers_destroy(self.0.as_ptr()) };
    }
}

/// `n` in decimal ASCII, in `buf`.
pub(super) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Detaches the header list of a message in a delivery report.
///
/// Only for messages in a delivery callback: librdkafka destroys the
/// message right after the callback, and detaching sets its header pointer
/// to NULL, so the destroy skips the list (librdkafka 2.12,
/// `rd_kafka_message_detach_headers` and `rd_kafka_msg_destroy` in
/// `rdkafka_msg.c`). A report is final — delivered, or failed after
/// librdkafka's retries — so nothing reads the message's headers after it
/// (interceptors ran before it; rdkafka's `detach()` of a failed message
/// copies them before this is called).
pub(super) fn detach_headers(m: &BorrowedMessage<'_>) -> Option<HeaderList> {
    let mut h = ptr::null_mut();
    // SAFETY: `m` is a live message of a delivery report (see above); on
    // success librdkafka no longer references the list and it is ours.
    let e = unsafe { rd::rd_kafka_message_detach_headers(m.ptr(), &mut h) };
    if e != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return None;
    }
    NonNull::new(h).map(HeaderList)
}

// ---- producing --------------------------------------------------------------------------

/// A record as [`produce`] hands it over.
pub(super) struct Produce<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub timestamp: Option<i64>,
}

/// Hands a record to librdkafka with `rd_kafka_produceva`, as rdkafka's
/// `BaseProducer::send` does with `rd_kafka_producev` (key and payload
/// copied, `opaque` as the delivery opaque, so rdkafka's polling gives it to
/// the context's `delivery`), but with a header list of ours: rdkafka's
/// `OwnedHeaders` cannot be made from a recycled list.
///
/// On success librdkafka owns `headers` and `opaque`. On failure both come
/// back: librdkafka leaves an application's header list with the
/// application when `produceva` fails (`rdkafka_msg.c`: the list is only
/// attached to the message once it is created, and detached again before
/// the message is destroyed when partitioning fails).
pub(super) fn produce<O: IntoOpaque>(
    rk: *mut rd::rd_kafka_t,
    rec: &Produce<'_>,
    headers: HeaderList,
    opaque: O,
) -> Result<(), (RdKafkaError, HeaderList, O)> {
    // The topic as a C string: on the stack when it fits (Kafka allows 249
    // bytes), saving the allocation rdkafka's `send` makes per record.
    let mut buf = [0u8; 256];
    let heap;
    let topic: *const c_char = if rec.topic.len() < buf.len() && !rec.topic.contains('\0') {
        buf[..rec.topic.len()].copy_from_slice(rec.topic.as_bytes());
        buf.as_ptr() as *const c_char
    } else {
        match CString::new(rec.topic) {
            Ok(c) => {
                heap = c;
                heap.as_ptr()
            }
            Err(e) => return Err((RdKafkaError::from(e), headers, opaque)),
        }
    };
    let (payload, payload_len) = mem(rec.payload);
    let (key, key_len) = mem(rec.key);
    let hdrs = headers.into_raw();
    let op = opaque.into_ptr();
    use rd::rd_kafka_vtype_t as V;
    let vus = [
        vu(
            V::RD_KAFKA_VTYPE_TOPIC,
            rd::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic },
        ),
        vu(
            V::RD_KAFKA_VTYPE_PARTITION,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                i32_: rec.partition,
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_MSGFLAGS,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                i: rd::RD_KAFKA_MSG_F_COPY,
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_VALUE,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: payload,
                    size: payload_len,
                },
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_KEY,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: key,
                    size: key_len,
                },
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_OPAQUE,
            rd::rd_kafka_vu_s__bindgen_ty_1 { ptr: op },
        ),
        vu(
            V::RD_KAFKA_VTYPE_TIMESTAMP,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                i64_: rec.timestamp.unwrap_or(0),
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_HEADERS,
            rd::rd_kafka_vu_s__bindgen_ty_1 { headers: hdrs },
        ),
    ];
    // SAFETY: `rk` is a live producer handle (the caller holds its
    // producer); every pointer in `vus` is valid for the call (topic in
    // `buf`/`heap`, key and payload borrowed, copied by librdkafka because
    // of RD_KAFKA_MSG_F_COPY); `hdrs` and `op` are owned values whose
    // ownership passes to librdkafka only on success (see above).
    let err = unsafe { rd::rd_kafka_produceva(rk, vus.as_ptr(), vus.len()) };
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: `err` is a valid error object, destroyed once, after reading
    // its code; `hdrs` and `op` are still ours (see above) and converted
    // back once.
    let code = unsafe { rd::rd_kafka_error_code(err) };
    unsafe { rd::rd_kafka_error_destroy(err) };
    let headers = HeaderList(NonNull::new(hdrs).expect("the list pointer is not NULL"));
    let opaque = unsafe { O::from_ptr(op) };
    Err((
        RdKafkaError::MessageProduction(code.into()),
        headers,
        opaque,
    ))
}

fn mem(b: Option<&[u8]>) -> (*mut c_void, usize) {
    b.map_or((ptr::null_mut(), 0), |b| {
        (b.as_ptr() as *mut c_void, b.len())
    })
}

fn vu(vtype: rd::rd_kafka_vtype_t, u: rd::rd_kafka_vu_s__bindgen_ty_1) -> rd::rd_kafka_vu_t {
    rd::rd_kafka_vu_t { vtype, u }
}

// ---- recycling --------------------------------------------------------------------------

/// Lists of one epoch, moved between threads as a unit.
struct Batch {
    epoch: u64,
    lists: Vec<HeaderList>,
}

impl Batch {
    /// Gives the lists collected so far to `pool`, leaving this batch empty
    /// (same epoch, room for the next [`BATCH`]).
    fn give_to(&mut self, pool: &HeaderPool) {
        let lists = std::mem::replace(&mut self.lists, Vec::with_capacity(BATCH));
        pool.give(Batch {
            epoch: self.epoch,
            lists,
        });
    }
}

#[derive(Default)]
struct PoolInner {
    batches: Vec<Batch>,
    /// Lists in `batches`.
    parked: usize,
    /// Lists in `stale` (they count towards [`POOL_MAX`] too).
    stale_lists: usize,
    /// Epochs records are routed with; lists of other epochs are destroyed.
    live: Vec<u64>,
    /// Batches of epochs no longer live, destroyed on the next tick (off
    /// the producer's lock, which [`HeaderPool::set_live`] is called under).
    stale: Vec<Batch>,
    /// Batches taken since the last [`HeaderPool::tick`].
    taken: u64,
    idle_ticks: u32,
}

/// The lists the polling threads returned, for the senders. See the module docs.
#[derive(Default)]
pub(super) struct HeaderPool {
    inner: Mutex<PoolInner>,
}

impl HeaderPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks a batch if its epoch is live and there is room; otherwise
    /// destroys it (outside the lock).
    fn give(&self, batch: Batch) {
        let mut inner = self.lock();
        let room = POOL_MAX - inner.parked - inner.stale_lists;
        if inner.live.contains(&batch.epoch) && batch.lists.len() <= room {
            inner.parked += batch.lists.len();
            inner.batches.push(batch);
            return;
        }
        drop(inner);
        drop(batch);
    }

    /// A batch of lists for `epoch`, if one is parked.
    fn take(&self, epoch: u64) -> Option<Vec<HeaderList>> {
        let mut inner = self.lock();
        let i = inner.batches.iter().rposition(|b| b.epoch == epoch)?;
        let b = inner.batches.swap_remove(i);
        inner.parked -= b.lists.len();
        inner.taken += 1;
        Some(b.lists)
    }

    /// The epochs records are now routed with: parked lists of any other
    /// epoch are destroyed on the next [`tick`](Self::tick), returned ones
    /// at once.
    pub(super) fn set_live(&self, mut live: Vec<u64>) {
        live.sort_unstable();
        live.dedup();
        let mut inner = self.lock();
        if inner.live == live {
            return;
        }
        let (keep, stale): (Vec<Batch>, Vec<Batch>) = std::mem::take(&mut inner.batches)
            .into_iter()
            .partition(|b| live.contains(&b.epoch));
        inner.parked = keep.iter().map(|b| b.lists.len()).sum();
        inner.stale_lists += stale.iter().map(|b| b.lists.len()).sum::<usize>();
        inner.batches = keep;
        inner.stale.extend(stale);
        inner.live = live;
    }

    /// Called on every driver tick (not under the producer's lock): destroys
    /// the stale lists, and after [`IDLE_TICKS`] ticks in which no sender
    /// took a batch, the parked ones too (the load is gone; they would only
    /// hold memory).
    pub(super) fn tick(&self) {
        let mut inner = self.lock();
        let stale = std::mem::take(&mut inner.stale);
        inner.stale_lists = 0;
        if !stale.is_empty() {
            drop(inner);
            drop(stale);
            inner = self.lock();
        }
        if inner.taken > 0 || inner.batches.is_empty() {
            inner.taken = 0;
            inner.idle_ticks = 0;
            return;
        }
        inner.idle_ticks += 1;
        if inner.idle_ticks < IDLE_TICKS {
            return;
        }
        inner.idle_ticks = 0;
        inner.parked = 0;
        let all = std::mem::take(&mut inner.batches);
        drop(inner);
        drop(all);
    }

    /// Lists parked now.
    #[cfg(test)]
    pub(super) fn parked(&self) -> usize {
        self.lock().parked
    }
}

/// One polling thread's batch in the making. See the module docs.
pub(super) struct Returns {
    /// Only the producer's polling thread (its delivery callback) uses it,
    /// so the lock is never contended; it is there because the callback
    /// gets a shared reference.
    batch: Mutex<Batch>,
}

impl Default for Returns {
    fn default() -> Returns {
        Returns {
            batch: Mutex::new(Batch {
                epoch: 0,
                lists: Vec::new(),
            }),
        }
    }
}

impl Returns {
    /// Returns a record's epoch-only list (of `epoch`) towards `pool`.
    pub(super) fn put(&self, pool: &HeaderPool, epoch: u64, list: HeaderList) {
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        if b.epoch != epoch && !b.lists.is_empty() {
            b.give_to(pool);
        }
        b.epoch = epoch;
        if b.lists.capacity() == 0 {
            b.lists.reserve_exact(BATCH);
        }
        b.lists.push(list);
        if b.lists.len() >= BATCH {
            b.give_to(pool);
        }
    }
}

/// The senders' lists at hand, per epoch (used under the producer's lock).
#[derive(Default)]
pub(super) struct SenderCache {
    by_epoch: Vec<(u64, Vec<HeaderList>)>,
    /// Lists taken from the pool (recycled) and made fresh, for tests.
    #[cfg(test)]
    pub(super) counts: (u64, u64),
}

impl SenderCache {
    /// An epoch-only list for a record of `epoch`: recycled if there is
    /// one, fresh otherwise.
    pub(super) fn take(&mut self, pool: &HeaderPool, epoch: u64) -> HeaderList {
        let i = match self.by_epoch.iter().position(|(e, _)| *e == epoch) {
            Some(i) => i,
            None => {
                self.by_epoch.push((epoch, Vec::new()));
                self.by_epoch.len() - 1
            }
        };
        let lists = &mut self.by_epoch[i].1;
        if lists.is_empty() {
            if let Some(b) = pool.take(epoch) {
                *lists = b;
            }
        }
        match lists.pop() {
            Some(l) => {
                #[cfg(test)]
                {
                    self.counts.0 += 1;
                }
                l
            }
            None => {
                #[cfg(test)]
                {
                    self.counts.1 += 1;
                }
                HeaderList::epoch(epoch)
            }
        }
    }

    /// Forgets (destroys) the lists of epochs not in `live`.
    pub(super) fn retain_live(&mut self, live: &[u64]) {
        self.by_epoch.retain(|(e, _)| live.contains(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch_of(l: &HeaderList) -> Vec<(String, Option<Vec<u8>>)> {
        l.to_vec()
    }

    #[test]
    fn an_epoch_list_holds_exactly_the_epoch_header() {
        for (n, s) in [
            (0u64, "0"),
            (7, "7"),
            (1234, "1234"),
            (u64::MAX, "18446744073709551615"),
        ] {
            assert_eq!(
                epoch_of(&HeaderList::epoch(n)),
                vec![(EPOCH_HEADER.to_string(), Some(s.as_bytes().to_vec()))]
            );
        }
        let mut l = HeaderList::with_capacity(3);
        l.add("a", None);
        l.add("b", Some(b""));
        l.add_epoch(3);
        assert_eq!(
            l.to_vec(),
            vec![
                ("a".to_string(), None),
                ("b".to_string(), Some(vec![])),
                (EPOCH_HEADER.to_string(), Some(b"3".to_vec())),
            ]
        );
    }

    fn fill(r: &Returns, pool: &HeaderPool, epoch: u64, n: usize) {
        for _ in 0..n {
            r.put(pool, epoch, HeaderList::epoch(epoch));
        }
    }

    #[test]
    fn lists_come_back_in_batches_of_their_epoch_only() {
        let pool = HeaderPool::default();
        pool.set_live(vec![1, 2]);
        let r = Returns::default();
        fill(&r, &pool, 1, BATCH - 1);
        assert_eq!(pool.parked(), 0, "no batch before it is full");
        fill(&r, &pool, 1, 1);
        assert_eq!(pool.parked(), BATCH);
        // An epoch change hands over the partial batch.
        fill(&r, &pool, 2, 1);
        fill(&r, &pool, 1, 1);
        assert_eq!(pool.parked(), BATCH + 1);
        let mut cache = SenderCache::default();
        for _ in 0..BATCH + 5 {
            let l = cache.take(&pool, 2);
            assert_eq!(l.to_vec()[0].1.as_deref(), Some(&b"2"[..]));
        }
        for _ in 0..BATCH + 5 {
            let l = cache.take(&pool, 1);
            assert_eq!(l.to_vec()[0].1.as_deref(), Some(&b"1"[..]));
        }
        assert_eq!(
            cache.counts,
            (1 + BATCH as u64, 2 * BATCH as u64 + 10 - 1 - BATCH as u64)
        );
    }

    #[test]
    fn stale_epochs_are_destroyed_and_the_pool_is_bounded() {
        let pool = HeaderPool::default();
        pool.set_live(vec![1]);
        let r = Returns::default();
        fill(&r, &pool, 1, BATCH);
        fill(&r, &pool, 2, BATCH);
        assert_eq!(pool.parked(), BATCH, "epoch 2 is not live");
        pool.set_live(vec![2]);
        assert_eq!(pool.parked(), 0, "epoch 1 is stale now");
        assert_eq!(pool.lock().stale.len(), 1);
        pool.tick();
        assert!(pool.lock().stale.is_empty(), "destroyed on the tick");
        let mut cache = SenderCache::default();
        let _ = cache.take(&pool, 1);
        cache.retain_live(&[2]);
        assert!(cache.by_epoch.is_empty());
        fill(&r, &pool, 2, POOL_MAX + 3 * BATCH);
        assert_eq!(pool.parked(), POOL_MAX);
    }

    #[test]
    fn an_idle_pool_is_emptied() {
        let pool = HeaderPool::default();
        pool.set_live(vec![1]);
        let r = Returns::default();
        fill(&r, &pool, 1, 2 * BATCH);
        let mut cache = SenderCache::default();
        let _ = cache.take(&pool, 1);
        for _ in 0..IDLE_TICKS {
            pool.tick();
        }
        assert_eq!(
            pool.parked(),
            BATCH,
            "a take in the first tick: not idle yet"
        );
        pool.tick();
        assert_eq!(pool.parked(), 0);
    }
}
