//! Kafka's key → partition function.
//!
//! [`murmur2`] is bit-for-bit Java's `org.apache.kafka.common.utils.Utils.murmur2`
//! (MurmurHash2, 32 bit, seed `0x9747b28c`), which is also librdkafka's
//! `murmur2` partitioner, and [`partition_for_key`] is the Java client's
//! `toPositive(murmur2(key)) % partitions`. A record keyed from a Java (or
//! librdkafka `murmur2_random`) producer therefore lands on the same partition
//! as one routed by flotilla, and since a topic has the same partition count on
//! every cluster, a key has the same partition on every cluster.

/// The seed Kafka uses (`Utils.murmur2`).
pub const MURMUR2_SEED: u32 = 0x9747_b28c;

const M: u32 = 0x5bd1_e995;
const R: u32 = 24;

/// Java's `Utils.murmur2(data)`, returned as the same signed 32-bit value Java returns.
#[inline]
pub fn murmur2(data: &[u8]) -> i32 {
    murmur2_u32(data) as i32
}

/// [`murmur2`] as an unsigned bit pattern (librdkafka's `rd_murmur2`).
#[inline]
pub fn murmur2_u32(data: &[u8]) -> u32 {
    // Java computes `seed ^ length` on a signed int; the low 32 bits are the same.
    let mut h = MURMUR2_SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Java's `Utils.toPositive`: clears the sign bit (not `abs`, which overflows on `MIN`).
#[inline]
pub fn to_positive(hash: i32) -> u32 {
    (hash as u32) & 0x7fff_ffff
}

/// The partition Kafka's default partitioner picks for a keyed record:
/// `(murmur2(key) & 0x7fffffff) % partitions`.
///
/// # Panics
/// If `partitions` is 0 (a route always has at least one partition).
#[inline]
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    partition_for_hash(murmur2_u32(key), partitions)
}

/// [`partition_for_key`] for a key whose [`murmur2_u32`] is already known,
/// so the router hashes each key only once.
#[inline]
pub fn partition_for_hash(murmur2: u32, partitions: u32) -> u32 {
    (murmur2 & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `org.apache.kafka.common.utils.UtilsTest.testMurmur2` (Apache Kafka).
    #[test]
    fn kafka_utils_test_vectors() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2(key),
                *want,
                "murmur2({:?})",
                String::from_utf8_lossy(key)
            );
        }
    }

    /// librdkafka `src/rdmurmur2.c` `unittest_murmur2` (validated there against Java).
    #[test]
    fn librdkafka_vectors() {
        let short: &[u8] = b"1234";
        let long: &[u8] = b"PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: &[(&[u8], u32)] = &[
            (b"kafka", 0xd067_cf64),
            (b"giberish123456789", 0x8f55_2b0c),
            (short, 0x9fc9_7b14),
            (&short[1..], 0xe7c0_09ca),
            (&short[2..], 0x8739_30da),
            (&short[3..], 0x5a4b_5ca1),
            (long, 0x7842_4f1c),
            (&long[1..], 0x4a62_b377),
            (&long[2..], 0xe0e4_e09e),
            (&long[3..], 0x62b8_b43f),
            (b"", 0x106e_08d9),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2_u32(key),
                *want,
                "murmur2({:?})",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn partition_matches_java_to_positive_mod() {
        // Java: Utils.toPositive(-973932308) % 7 == (0xc5f2f4ec & 0x7fffffff) % 7
        let h = murmur2(b"21");
        assert_eq!(partition_for_key(b"21", 7), ((h & 0x7fff_ffff) as u32) % 7);
        assert_eq!(to_positive(i32::MIN), 0);
        assert_eq!(to_positive(-1), 0x7fff_ffff);
        assert_eq!(partition_for_key(b"anything", 1), 0);
    }

    proptest! {
        #[test]
        fn partition_is_in_range_and_stable(key in proptest::collection::vec(any::<u8>(), 0..64), parts in 1u32..1000) {
            let p = partition_for_key(&key, parts);
            prop_assert!(p < parts);
            prop_assert_eq!(p, partition_for_key(&key, parts));
            prop_assert_eq!(p, partition_for_hash(murmur2_u32(&key), parts));
        }
    }
}
