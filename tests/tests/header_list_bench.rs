//! Benchmark (issue #4, the experiment behind `FleetProducer`'s recycled
//! epoch header lists): what does librdkafka's per-record header list cost,
//! and does recycling the lists (detached in the delivery callback, reused
//! by the sender) win it back? A raw `ThreadedProducer` (null delivery
//! opaque) on one real single-node Kafka cluster, 1M x 100 B per round,
//! three modes rotating: (a) no header, (b) a fresh list per record (what
//! `OwnedHeaders::new_with_capacity(1).insert(..)` does), (c) recycled
//! lists. Reports client CPU per record (`getrusage`) and records/s.
//! Ignored; run alone, in release mode. `SCRATCH_POOL_MAX` bounds the pool
//! (default 2M), `SCRATCH_ROUNDS` sets the rounds (default 5). Figures:
//! `docs/benchmarks.md` (FleetProducer throughput, "What was tried first").
//!
//! ```text
//! FLOTILLA_KAFKA_JVM_OPTS='-Xms32m -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData -Djava.awt.headless=true' \
//!   flock /tmp/flotilla-bench.lock \
//!   cargo test --release -p flotilla-testkit --test header_list_bench -- --ignored --nocapture
//! ```

#[path = "common/cpu.rs"]
mod cpu;

use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpu::cpu_time;
use flotilla_testkit::{create_topic_blocking, KafkaFleet};
use rdkafka::bindings as rd;
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

const RECORDS: usize = 1_000_000;
const KEYS: usize = 10_000;
const BATCH: usize = 512;
/// Bound of lists parked in the pool (the rest are destroyed);
/// `SCRATCH_POOL_MAX` overrides.
fn pool_max() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("SCRATCH_POOL_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 21)
    })
}
const PROPS: [(&str, &str); 4] = [
    ("linger.ms", "5"),
    ("enable.idempotence", "true"),
    ("queue.buffering.max.messages", "2000000"),
    ("message.timeout.ms", "60000"),
];

struct HList(*mut rd::rd_kafka_headers_t);
// SAFETY: a detached header list is owned by whoever holds the HList.
unsafe impl Send for HList {}

struct Ctx {
    delivered: AtomicUsize,
    failed: AtomicUsize,
    recycle: AtomicBool,
    /// The polling thread's batch being filled.
    local: Mutex<Vec<HList>>,
    /// Full batches for the sender.
    ready: Mutex<Vec<Vec<HList>>>,
    parked: AtomicUsize,
}

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();

    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        let m = match r {
            Ok(m) => m,
            Err((_, m)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                m
            }
        };
        if self.recycle.load(Ordering::Relaxed) {
            let mut h = ptr::null_mut();
            // SAFETY: the DR message is destroyed by librdkafka after this
            // callback; detaching nulls its header pointer so it is not freed.
            let e = unsafe { rd::rd_kafka_message_detach_headers(m.ptr(), &mut h) };
            if e == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let mut local = self.local.lock().unwrap();
                local.push(HList(h));
                if local.len() >= BATCH {
                    let full = std::mem::replace(&mut *local, Vec::with_capacity(BATCH));
                    drop(local);
                    if self.parked.load(Ordering::Relaxed) < pool_max() {
                        self.parked.fetch_add(full.len(), Ordering::Relaxed);
                        self.ready.lock().unwrap().push(full);
                    } else {
                        for h in full {
                            // SAFETY: detached above, owned here, destroyed once.
                            unsafe { rd::rd_kafka_headers_destroy(h.0) };
                        }
                    }
                }
            }
        }
        self.delivered.fetch_add(1, Ordering::Release);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    NoHeader,
    Fresh,
    Recycled,
}

fn new_list() -> *mut rd::rd_kafka_headers_t {
    // SAFETY: a new list, and a NUL-terminated name and a 1-byte value that
    // librdkafka copies.
    unsafe {
        let h = rd::rd_kafka_headers_new(1);
        let name = b"flotilla-epoch\0";
        rd::rd_kafka_header_add(
            h,
            name.as_ptr() as *const _,
            -1,
            b"1".as_ptr() as *const c_void,
            1,
        );
        h
    }
}

fn round(
    p: &ThreadedProducer<Ctx>,
    ctx: &Ctx,
    mode: Mode,
    topic: &str,
    keys: &[String],
    value: &[u8],
    cache: &mut Vec<HList>,
) -> (Duration, Duration) {
    ctx.recycle.store(mode == Mode::Recycled, Ordering::Relaxed);
    let base = ctx.delivered.load(Ordering::Acquire);
    let topic_c = CString::new(topic).unwrap();
    let rk = p.client().native_ptr();
    let cpu = cpu_time();
    let started = Instant::now();
    for i in 0..RECORDS {
        // Same as rdkafka's BaseProducer::send: one CString per record.
        let topic_c = CString::new(topic_c.as_bytes()).unwrap();
        let key = keys[i % KEYS].as_bytes();
        let hdrs = match mode {
            Mode::NoHeader => ptr::null_mut(),
            // What OwnedHeaders::new_with_capacity(1).insert(..) does.
            Mode::Fresh => new_list(),
            Mode::Recycled => match cache.pop() {
                Some(h) => h.0,
                None => {
                    let batch = ctx.ready.lock().unwrap().pop();
                    match batch {
                        Some(b) => {
                            ctx.parked.fetch_sub(b.len(), Ordering::Relaxed);
                            *cache = b;
                            cache.pop().map_or_else(new_list, |h| h.0)
                        }
                        None => new_list(),
                    }
                }
            },
        };
        let mut vus = [
            vu_topic(topic_c.as_ptr()),
            vu_i32(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_PARTITION, -1),
            vu_int(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_MSGFLAGS,
                rd::RD_KAFKA_MSG_F_COPY,
            ),
            vu_mem(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE, value),
            vu_mem(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_KEY, key),
            vu_headers(hdrs),
        ];
        let n = if hdrs.is_null() { 5 } else { 6 };
        // SAFETY: `rk` lives as long as `p`; every pointer in `vus` is valid
        // for the call (key and payload copied: RD_KAFKA_MSG_F_COPY); the
        // list passes to librdkafka on success (asserted).
        let err = unsafe { rd::rd_kafka_produceva(rk, vus.as_mut_ptr(), n) };
        assert!(err.is_null(), "produce failed");
    }
    while ctx.delivered.load(Ordering::Acquire) - base < RECORDS {
        std::thread::sleep(Duration::from_millis(1));
    }
    (started.elapsed(), cpu_time() - cpu)
}

fn vu(vtype: rd::rd_kafka_vtype_t) -> rd::rd_kafka_vu_t {
    rd::rd_kafka_vu_t {
        vtype,
        u: rd::rd_kafka_vu_s__bindgen_ty_1 { _pad: [0; 64] },
    }
}
fn vu_topic(p: *const std::ffi::c_char) -> rd::rd_kafka_vu_t {
    let mut v = vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC);
    v.u.cstr = p;
    v
}
fn vu_i32(t: rd::rd_kafka_vtype_t, x: i32) -> rd::rd_kafka_vu_t {
    let mut v = vu(t);
    v.u.i32_ = x;
    v
}
fn vu_int(t: rd::rd_kafka_vtype_t, x: i32) -> rd::rd_kafka_vu_t {
    let mut v = vu(t);
    v.u.i = x;
    v
}
fn vu_mem(t: rd::rd_kafka_vtype_t, b: &[u8]) -> rd::rd_kafka_vu_t {
    let mut v = vu(t);
    v.u.mem = rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
        ptr: b.as_ptr() as *mut c_void,
        size: b.len(),
    };
    v
}
fn vu_headers(h: *mut rd::rd_kafka_headers_t) -> rd::rd_kafka_vu_t {
    let mut v = vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADERS);
    v.u.headers = h;
    v
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
#[ignore = "scratch benchmark"]
fn header_list_recycling() {
    let kafka = KafkaFleet::start(1).expect("start Kafka");
    let bootstrap = kafka.cluster(0).bootstrap();
    let topics: Vec<String> = (0..6).map(|i| format!("scratch-{i}")).collect();
    for t in &topics {
        create_topic_blocking(&bootstrap, t, 4).unwrap();
    }
    let ctx0 = Ctx {
        delivered: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        recycle: AtomicBool::new(false),
        local: Mutex::new(Vec::with_capacity(BATCH)),
        ready: Mutex::new(Vec::new()),
        parked: AtomicUsize::new(0),
    };
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &bootstrap);
    for (k, v) in PROPS {
        cfg.set(k, v);
    }
    let p: ThreadedProducer<Ctx> = cfg.create_with_context(ctx0).unwrap();
    let ctx: Arc<Ctx> = p.client().context().clone();
    let keys: Vec<String> = (0..KEYS).map(|k| format!("key-{k:06}")).collect();
    let value = vec![b'x'; 100];
    let modes = [Mode::NoHeader, Mode::Fresh, Mode::Recycled];
    let mut cache = Vec::new();
    for (i, m) in modes.iter().enumerate() {
        round(&p, &ctx, *m, &topics[i], &keys, &value, &mut cache);
    }
    let rounds: usize = std::env::var("SCRATCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut cpu = [Duration::ZERO; 3];
    let mut rate = [0.0f64; 3];
    for r in 0..rounds {
        let mut line = String::new();
        for pos in 0..3 {
            let who = (pos + r) % 3;
            let (wall, c) = round(
                &p,
                &ctx,
                modes[who],
                &topics[3 + pos],
                &keys,
                &value,
                &mut cache,
            );
            cpu[who] += c;
            let rps = RECORDS as f64 / wall.as_secs_f64();
            rate[who] += rps;
            line += &format!(
                "{:?} {:.0} rec/s {:.2} us/rec; ",
                modes[who],
                rps,
                c.as_secs_f64() * 1e6 / RECORDS as f64
            );
        }
        eprintln!("round {r}: {line}load {}", loadavg());
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / (RECORDS * rounds) as f64;
    eprintln!(
        "summary {rounds} rounds, pool max {}: CPU us/rec none {:.2} fresh {:.2} recycled {:.2}; rec/s none {:.0} fresh {:.0} recycled {:.0}; rate ratios fresh/none {:.3} recycled/none {:.3}; failed {}; pool parked {}; load {}",
        pool_max(),
        us(cpu[0]),
        us(cpu[1]),
        us(cpu[2]),
        rate[0] / rounds as f64,
        rate[1] / rounds as f64,
        rate[2] / rounds as f64,
        rate[1] / rate[0],
        rate[2] / rate[0],
        ctx.failed.load(Ordering::Relaxed),
        ctx.parked.load(Ordering::Relaxed),
        loadavg()
    );
}
