//! The epoch header of a consumed record, read from librdkafka's unparsed
//! header bytes without allocating.
//!
//! The fence gate needs the epoch of every record it admits.
//! `rd_kafka_message_headers` (behind rdkafka's `Message::headers`) parses a
//! record's header block into a freshly allocated list, and for a record
//! without headers it still allocates and zeroes a parse buffer first. That
//! parse was the largest cost flotilla added per record: without it a bare
//! read loop went from 0.65–0.67 to 0.75–0.79 of a raw `StreamConsumer`'s
//! throughput with jemalloc, from 0.91–0.98 to 1.03–1.13 with glibc's malloc
//! (docs/benchmarks.md, session 9).
//!
//! librdkafka keeps the block as fetched (`rkm_u.consumer.binhdrs`), only
//! reachable through its internal structs: `binhdrs.c`, compiled by the build
//! script against the sources rdkafka-sys built librdkafka from, hands it
//! out, and [`scan_epoch`] reads it. Without those sources (a system
//! librdkafka) the build leaves `cfg(flotilla_binhdrs)` unset and
//! [`message_epoch`] uses librdkafka's parse.

// Without the shim only the tests read header blocks.
#![cfg_attr(not(flotilla_binhdrs), allow(dead_code))]

use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};

use crate::producer::{epoch_of, parse_epoch_header, EPOCH_HEADER};

/// librdkafka's limit: a block announcing more headers is malformed.
const MAX_HEADERS: i64 = 100_000;

/// A record whose epoch header the fence gate reads.
pub(crate) trait RecordEpoch: Message {
    /// The record's epoch header, if present and well formed: what
    /// [`epoch_of`] gives for its headers.
    fn record_epoch(&self) -> Option<u64>;
}

impl RecordEpoch for BorrowedMessage<'_> {
    fn record_epoch(&self) -> Option<u64> {
        message_epoch(self)
    }
}

impl RecordEpoch for OwnedMessage {
    fn record_epoch(&self) -> Option<u64> {
        self.headers().and_then(epoch_of)
    }
}

/// The epoch header of a record fresh from librdkafka: scanned from its
/// header bytes where the build could reach them, else parsed by librdkafka.
pub(crate) fn message_epoch(m: &BorrowedMessage<'_>) -> Option<u64> {
    #[cfg(flotilla_binhdrs)]
    if let Some(block) = header_block(m) {
        return scan_epoch(block);
    }
    m.headers().and_then(epoch_of)
}

#[cfg(flotilla_binhdrs)]
extern "C" {
    fn flotilla_consumed_header_bytes(
        message: *const rdkafka_sys::types::RDKafkaMessage,
        data: *mut *const std::ffi::c_void,
        len: *mut usize,
    ) -> std::ffi::c_int;
}

/// The record's header block as fetched, if librdkafka's answer for its
/// headers is that block (see `binhdrs.c`).
#[cfg(flotilla_binhdrs)]
fn header_block<'m>(m: &'m BorrowedMessage<'_>) -> Option<&'m [u8]> {
    let mut data = std::ptr::null();
    let mut len = 0usize;
    // SAFETY: `m.ptr()` is a live message of librdkafka's (the borrow of `m`
    // keeps it alive); the shim only reads its struct.
    let found = unsafe { flotilla_consumed_header_bytes(m.ptr(), &mut data, &mut len) };
    if found == 0 {
        return None;
    }
    if len == 0 || data.is_null() {
        return Some(&[]);
    }
    // SAFETY: librdkafka's `binhdrs` points at `len` bytes of the fetch
    // buffer the message holds a reference to: valid while the message is,
    // which the returned borrow of `m` guarantees, and never written again.
    Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) })
}

/// The epoch header in a Kafka v2 header block (a zigzag varint count, then
/// per header a varint key length, the key, a varint value length — `-1` for
/// no value — and the value): the first header whose key, up to a NUL, is
/// [`EPOCH_HEADER`], decoded with [`parse_epoch_header`]. `None` if there is
/// none, or if the block is malformed anywhere (librdkafka's parse then
/// fails, and [`epoch_of`] sees no headers).
pub(crate) fn scan_epoch(mut block: &[u8]) -> Option<u64> {
    let count = read_varint(&mut block)?;
    if count <= 0 || count > MAX_HEADERS {
        return None;
    }
    // The first epoch header's decoded value, once one was seen.
    let mut first: Option<Option<u64>> = None;
    for _ in 0..count {
        let key_len = usize::try_from(read_varint(&mut block)?).ok()?;
        let key = take(&mut block, key_len)?;
        let value = match read_varint(&mut block)? {
            -1 => None,
            n => Some(take(&mut block, usize::try_from(n).ok()?)?),
        };
        // librdkafka copies the key into a C string: rdkafka's key ends at
        // its first NUL.
        let key = key.split(|&b| b == 0).next().unwrap_or(key);
        if first.is_none() && key == EPOCH_HEADER.as_bytes() {
            first = Some(value.and_then(parse_epoch_header));
        }
    }
    first.flatten()
}

/// Reads a zigzag-encoded varint (at most 10 bytes), as Kafka's record
/// fields are.
fn read_varint(b: &mut &[u8]) -> Option<i64> {
    let mut raw: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        raw |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *b = &b[i + 1..];
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

/// Takes the next `n` bytes.
fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put_varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let byte = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// The Kafka v2 encoding of a header list.
    fn encode(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, headers.len() as i64);
        for (k, v) in headers {
            put_varint(&mut out, k.len() as i64);
            out.extend_from_slice(k);
            match v {
                None => put_varint(&mut out, -1),
                Some(v) => {
                    put_varint(&mut out, v.len() as i64);
                    out.extend_from_slice(v);
                }
            }
        }
        out
    }

    /// What `epoch_of` finds in the list librdkafka would parse.
    fn model(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> Option<u64> {
        headers
            .iter()
            .find(|(k, _)| k.split(|&b| b == 0).next().unwrap_or(k) == EPOCH_HEADER.as_bytes())
            .and_then(|(_, v)| v.as_deref())
            .and_then(parse_epoch_header)
    }

    fn header() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
        let key = prop_oneof![
            Just(EPOCH_HEADER.as_bytes().to_vec()),
            Just(b"flotilla-epoch\0x".to_vec()),
            Just(b"flotilla-epoc".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        let value = prop_oneof![
            Just(None),
            any::<u64>().prop_map(|n| Some(n.to_string().into_bytes())),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        ];
        (key, value)
    }

    proptest! {
        #[test]
        fn the_scan_finds_what_the_parsed_list_holds(
            headers in proptest::collection::vec(header(), 0..8),
        ) {
            let block = if headers.is_empty() { Vec::new() } else { encode(&headers) };
            prop_assert_eq!(scan_epoch(&block), model(&headers));
        }

        #[test]
        fn a_cut_block_has_no_epoch(
            headers in proptest::collection::vec(header(), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let block = encode(&headers);
            let cut = cut.index(block.len());
            prop_assert_eq!(scan_epoch(&block[..cut]), None);
        }
    }

    #[test]
    fn edge_cases() {
        // No headers: an empty block, or a count of zero.
        assert_eq!(scan_epoch(&[]), None);
        assert_eq!(scan_epoch(&[0]), None);
        // A negative or huge count is malformed.
        assert_eq!(scan_epoch(&[1]), None);
        let mut huge = Vec::new();
        put_varint(&mut huge, MAX_HEADERS + 1);
        assert_eq!(scan_epoch(&huge), None);
        // An epoch header followed by a malformed one: librdkafka's parse
        // fails as a whole, so no epoch.
        let mut block = encode(&[(EPOCH_HEADER.as_bytes().to_vec(), Some(b"7".to_vec()))]);
        block[0] = 4; // count 2
        block.push(7); // a key length of -4
        assert_eq!(scan_epoch(&block), None);
        // The first epoch header counts, even without a value.
        let e = |v: Option<&[u8]>| (EPOCH_HEADER.as_bytes().to_vec(), v.map(<[u8]>::to_vec));
        assert_eq!(
            scan_epoch(&encode(&[e(Some(b"3")), e(Some(b"9"))])),
            Some(3)
        );
        assert_eq!(scan_epoch(&encode(&[e(None), e(Some(b"9"))])), None);
        // An over-long varint.
        assert_eq!(scan_epoch(&[0xff; 11]), None);
    }

    /// Through librdkafka: records with these header lists, produced to and
    /// fetched from a mock cluster, give the same epoch by the scan (where
    /// the build has it) as by librdkafka's parse.
    #[test]
    fn records_from_librdkafka_give_the_parsed_epoch() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        use rdkafka::{ClientConfig, Offset, TopicPartitionList};
        use std::time::{Duration, Instant};

        let kafka = crate::kafka::MockKafka::start("epoch-scan", 1).expect("mock cluster");
        kafka.create_topic("t", 1).expect("topic");
        /// A record's headers: keys and values.
        type List<'a> = Vec<(&'a str, Option<&'a [u8]>)>;
        let lists: Vec<List<'_>> = vec![
            vec![],
            vec![(EPOCH_HEADER, Some(b"12"))],
            vec![("a", None), ("b", Some(b"")), (EPOCH_HEADER, Some(b"7"))],
            vec![(EPOCH_HEADER, Some(b"5")), (EPOCH_HEADER, Some(b"6"))],
            vec![(EPOCH_HEADER, None)],
            vec![(EPOCH_HEADER, Some(b"not a number")), ("z", Some(b"1"))],
            vec![("x", Some(&[0xff, 0x00, 0x7f]))],
        ];
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap())
            .create()
            .expect("producer");
        for list in &lists {
            let mut headers = OwnedHeaders::new();
            for (key, value) in list {
                headers = headers.insert(Header { key, value: *value });
            }
            let record = BaseRecord::<(), [u8]>::to("t")
                .payload(b"v")
                .headers(headers);
            producer.send(record).map_err(|(e, _)| e).expect("send");
        }
        producer.flush(Duration::from_secs(10)).expect("flush");

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap())
            .set("group.id", "epoch-scan")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning)
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = 0;
        while seen < lists.len() {
            assert!(Instant::now() < deadline, "only {seen} records read");
            let Some(r) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = r.expect("record");
            let expected = lists[seen]
                .iter()
                .find(|(k, _)| *k == EPOCH_HEADER)
                .and_then(|(_, v)| *v)
                .and_then(parse_epoch_header);
            // Scanned first: librdkafka's parse caches its list in the
            // message, after which the shim declines and the parse answers.
            #[cfg(flotilla_binhdrs)]
            assert!(header_block(&m).is_some(), "record {seen}: no header block");
            assert_eq!(message_epoch(&m), expected, "record {seen} (scan)");
            assert_eq!(
                m.headers().and_then(epoch_of),
                expected,
                "record {seen} (parse)"
            );
            assert_eq!(
                message_epoch(&m),
                expected,
                "record {seen} (after the parse)"
            );
            seen += 1;
        }
        drop(consumer);
        kafka.shutdown();
    }
}
