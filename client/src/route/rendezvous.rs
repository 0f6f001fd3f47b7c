//! Weighted rendezvous (highest-random-weight) hashing: key → cluster inside an epoch.
//!
//! For a key with hash `k` and a cluster `c` of weight `w`, the score is
//! `-w / ln(u(k, c))`, where `u` is a uniform in (0, 1) drawn from a 64-bit
//! mix of `k` and a per-cluster seed. The key goes to the cluster with the
//! highest score. This "logarithmic method" gives each cluster exactly its
//! weight's share of keys in expectation, and because a cluster's score does
//! not depend on the other clusters:
//!
//! - adding a cluster moves only the keys that now score highest on it
//!   (about `w_new / Σw` of them), and only *to* it;
//! - removing a cluster moves only its own keys;
//! - the order of the write set does not matter (ties, which need two equal
//!   `f64` scores, are broken by seed, then id).
//!
//! Everything is deterministic across processes and platforms: the key hash is
//! Kafka's murmur2 (already computed for the partition, so each key is hashed
//! once per record), cluster seeds come from a fixed FNV-1a + SplitMix64 hash
//! of the cluster id, no `RandomState` is involved, and the logarithm is
//! [`neg_ln`], built from IEEE-754 basic operations only (no platform libm),
//! so a key picks the same cluster on every platform, bit for bit.
//!
//! [`RendezvousTable`] precomputes seeds and reciprocal weights when a write set
//! is installed, so [`RendezvousTable::pick`] costs one 64-bit mix and one
//! [`neg_ln`] per cluster; when all weights are equal (the common case) it
//! compares the uniforms directly and needs no logarithm at all, and a
//! single-cluster write set costs nothing.

use std::sync::Arc;

use crate::registry::{ClusterId, ModelError, WeightedCluster};

/// SplitMix64's finalizer (Stafford's "mix13"): a fast bijective 64-bit mixer
/// with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The 64-bit rendezvous key hash of a keyed record, from its Kafka [`murmur2`](super::murmur2::murmur2_u32).
#[inline]
pub fn key_hash_from_murmur2(murmur2: u32) -> u64 {
    mix64(u64::from(murmur2).wrapping_add(GOLDEN))
}

/// The rendezvous key hash of the `n`-th keyless record of a topic: keyless
/// records are spread over the write set by their sequence number.
#[inline]
pub fn key_hash_from_sequence(n: u64) -> u64 {
    // Distinct domain from the keyed hashes (which only use 2^32 inputs of the mixer).
    mix64(n.wrapping_mul(GOLDEN) ^ 0x6b65_796c_6573_7321)
}

/// The per-cluster seed: FNV-1a 64 over the id bytes, then [`mix64`].
pub fn cluster_seed(cluster: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cluster.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// A uniform in the open interval (0, 1) from 64 random bits (53 of them used).
#[inline]
fn unit(x: u64) -> f64 {
    ((x >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// `-ln(u)` for `u` in (0, 1), from IEEE-754 basic operations only (no libm),
/// so it is bit-identical on every platform. Relative error below 1e-15.
#[inline]
pub fn neg_ln(u: f64) -> f64 {
    const LN2: f64 = std::f64::consts::LN_2;
    const SQRT2: f64 = std::f64::consts::SQRT_2;
    let bits = u.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // Mantissa in [1, 2), then folded into (√2/2, √2] so the series converges fast.
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    // Branch-free (the fold is a coin flip per cluster, so a branch mispredicts).
    let fold = u64::from(m > SQRT2);
    m *= f64::from_bits(0x3ff0_0000_0000_0000 - (fold << 52)); // × 1.0 or × 0.5
    e += fold as i64;
    // ln m = 2 atanh(s) = 2 (s + s³/3 + s⁵/5 + …), s = (m - 1) / (m + 1), |s| < 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    // 1/3 + z/5 + z²/7 + … + z⁸/19 by Estrin's scheme: short dependency
    // chains, same operations in the same order on every platform.
    let (z2, z4) = (z * z, z * z * (z * z));
    let a0 = 1.0 / 3.0 + z * (1.0 / 5.0);
    let a1 = 1.0 / 7.0 + z * (1.0 / 9.0);
    let a2 = 1.0 / 11.0 + z * (1.0 / 13.0);
    let a3 = 1.0 / 15.0 + z * (1.0 / 17.0);
    let q = (a0 + z2 * a1) + z4 * ((a2 + z2 * a3) + z4 * (1.0 / 19.0));
    let p = z * q;
    let ln_m = 2.0 * (s + s * p);
    -((e as f64) * LN2 + ln_m)
}

/// `-ln(u(key, cluster))`, an Exp(1) variable; the score is `weight / this`.
#[inline]
fn exp1(key_hash: u64, seed: u64) -> f64 {
    neg_ln(unit(mix64(key_hash ^ seed)))
}

/// The rendezvous score of `cluster` (given by its [`cluster_seed`]) for a key:
/// `-weight / ln(u)`. Highest wins.
pub fn score(key_hash: u64, seed: u64, weight: u32) -> f64 {
    f64::from(weight) / exp1(key_hash, seed)
}

#[derive(Debug, Clone)]
struct Slot {
    id: Arc<str>,
    weight: u32,
    seed: u64,
    inv_weight: f64,
}

/// A write set prepared for fast lookups: seeds and `1/weight` precomputed.
#[derive(Debug, Clone)]
pub struct RendezvousTable {
    slots: Vec<Slot>,
    /// All weights equal: the highest `u` wins, no logarithm needed.
    uniform: bool,
}

impl RendezvousTable {
    /// Prepares `write`. Errors when it is empty, a weight is 0 or a cluster repeats.
    pub fn new(write: &[WeightedCluster]) -> Result<Self, ModelError> {
        if write.is_empty() {
            return Err(ModelError::Invalid("write set is empty".into()));
        }
        let mut slots: Vec<Slot> = Vec::with_capacity(write.len());
        for w in write {
            if w.weight == 0 {
                return Err(ModelError::Invalid(format!(
                    "cluster {} has weight 0",
                    w.cluster
                )));
            }
            if slots.iter().any(|s| *s.id == *w.cluster) {
                return Err(ModelError::Invalid(format!(
                    "cluster {} listed twice",
                    w.cluster
                )));
            }
            slots.push(Slot {
                id: Arc::from(w.cluster.as_str()),
                weight: w.weight,
                seed: cluster_seed(&w.cluster),
                inv_weight: 1.0 / f64::from(w.weight),
            });
        }
        // Canonical order, so the pick (including tie-breaks) ignores write-set order.
        slots.sort_by(|a, b| a.seed.cmp(&b.seed).then_with(|| a.id.cmp(&b.id)));
        let uniform = slots.iter().all(|s| s.weight == slots[0].weight);
        Ok(RendezvousTable { slots, uniform })
    }

    /// Number of clusters.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Always false: a table has at least one cluster.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Index of the cluster that wins `key_hash` (see [`key_hash_from_murmur2`]).
    #[inline]
    pub fn pick(&self, key_hash: u64) -> usize {
        if self.slots.len() == 1 {
            return 0;
        }
        if self.uniform {
            // Equal weights: -w/ln(u) is increasing in u, and u in the 53 bits
            // `unit` keeps, so compare those directly (same winner, same ties).
            if self.slots.len() <= 256 {
                // Branch-free: the 53-bit uniform above a byte that prefers the
                // lower index on a tie, maxed (winners are unpredictable, so
                // branches would mispredict).
                let mut best = 0u64;
                for (i, s) in self.slots.iter().enumerate() {
                    let u = mix64(key_hash ^ s.seed) >> 11;
                    best = best.max((u << 8) | (255 - i as u64));
                }
                return 255 - (best & 0xff) as usize;
            }
            let mut best = 0;
            let mut best_u = 0;
            for (i, s) in self.slots.iter().enumerate() {
                let u = (mix64(key_hash ^ s.seed) >> 11) + 1;
                if u > best_u {
                    best_u = u;
                    best = i;
                }
            }
            return best;
        }
        // Highest -w/ln(u) == lowest t = (-ln u) / w, t > 0. Positive floats
        // order like their bit patterns, so take the minimum of (bits, index)
        // packed in a u128: branch-free, and the lower index wins an exact tie.
        let mut best = u128::MAX;
        for (i, s) in self.slots.iter().enumerate() {
            let t = exp1(key_hash, s.seed) * s.inv_weight;
            best = best.min((u128::from(t.to_bits()) << 64) | i as u128);
        }
        best as u64 as usize
    }

    /// The id of the cluster at `index` (from [`RendezvousTable::pick`]), cheap to clone.
    #[inline]
    pub fn cluster(&self, index: usize) -> &Arc<str> {
        &self.slots[index].id
    }

    /// The cluster a keyed record goes to.
    pub fn cluster_for_key(&self, key: &[u8]) -> &Arc<str> {
        let h = key_hash_from_murmur2(super::murmur2::murmur2_u32(key));
        self.cluster(self.pick(h))
    }

    /// The clusters and weights, in the table's canonical order.
    pub fn clusters(&self) -> impl Iterator<Item = (&Arc<str>, u32)> {
        self.slots.iter().map(|s| (&s.id, s.weight))
    }
}

/// One-off convenience: the cluster `key` goes to in `write` (slow path: builds a table).
pub fn cluster_for_key(key: &[u8], write: &[WeightedCluster]) -> Result<ClusterId, ModelError> {
    Ok(RendezvousTable::new(write)?
        .cluster_for_key(key)
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ws(items: &[(&str, u32)]) -> Vec<WeightedCluster> {
        items
            .iter()
            .map(|(c, w)| WeightedCluster {
                cluster: (*c).to_string(),
                weight: *w,
            })
            .collect()
    }

    fn counts(t: &RendezvousTable, keys: u64) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for k in 0..keys {
            let key = format!("key-{k}");
            *m.entry(t.cluster_for_key(key.as_bytes()).to_string())
                .or_default() += 1;
        }
        m
    }

    #[test]
    fn rejects_bad_write_sets() {
        assert!(RendezvousTable::new(&[]).is_err());
        let e = RendezvousTable::new(&ws(&[("a", 1), ("b", 0)])).unwrap_err();
        assert!(e.to_string().contains('b'), "{e}");
        let e = RendezvousTable::new(&ws(&[("a", 1), ("a", 2)])).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn single_cluster_takes_everything() {
        let t = RendezvousTable::new(&ws(&[("only", 5)])).unwrap();
        assert_eq!(counts(&t, 100)["only"], 100);
    }

    /// Fixed outputs: a change here means keys would move between releases or platforms.
    #[test]
    fn golden_values_are_stable() {
        assert_eq!(cluster_seed(""), mix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        let t = RendezvousTable::new(&ws(&[("a", 1), ("b", 1), ("c", 1)])).unwrap();
        let picks: String = (0..24)
            .map(|k| {
                t.cluster_for_key(format!("user-{k}").as_bytes())
                    .to_string()
            })
            .collect();
        assert_eq!(picks, GOLDEN_PICKS, "rendezvous picks changed");
    }
    const GOLDEN_PICKS: &str = "cbaaaaacccbcbabaaccabbab";

    #[test]
    fn golden_values_weighted() {
        let t = RendezvousTable::new(&[
            WeightedCluster {
                cluster: "a".into(),
                weight: 1,
            },
            WeightedCluster {
                cluster: "b".into(),
                weight: 2,
            },
            WeightedCluster {
                cluster: "c".into(),
                weight: 3,
            },
        ])
        .unwrap();
        let picks: String = (0..24)
            .map(|k| {
                t.cluster_for_key(format!("user-{k}").as_bytes())
                    .to_string()
            })
            .collect();
        assert_eq!(
            picks, "cbaccaccccbcbabbaccacbcb",
            "weighted rendezvous picks changed"
        );
    }

    #[test]
    fn neg_ln_matches_libm() {
        let mut x = 1u64;
        for _ in 0..100_000 {
            x = mix64(x.wrapping_add(GOLDEN));
            let u = unit(x);
            let (a, b) = (neg_ln(u), -u.ln());
            assert!(
                (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1e-300),
                "u={u}: {a} vs {b}"
            );
        }
        for u in [
            f64::MIN_POSITIVE,
            1e-300,
            2f64.powi(-54),
            0.25,
            0.5,
            std::f64::consts::FRAC_1_SQRT_2,
            0.75,
            1.0 - 1e-16,
        ] {
            let (a, b) = (neg_ln(u), -u.ln());
            assert!(
                (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1e-300),
                "u={u}: {a} vs {b}"
            );
        }
    }

    /// The equal-weight shortcut picks what the logarithmic formula picks.
    #[test]
    fn uniform_shortcut_agrees_with_scores() {
        let write: Vec<WeightedCluster> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|c| WeightedCluster {
                cluster: (*c).into(),
                weight: 7,
            })
            .collect();
        let t = RendezvousTable::new(&write).unwrap();
        for k in 0..20_000u64 {
            let h = key_hash_from_sequence(k);
            let best = write
                .iter()
                .max_by(|x, y| {
                    score(h, cluster_seed(&x.cluster), x.weight).total_cmp(&score(
                        h,
                        cluster_seed(&y.cluster),
                        y.weight,
                    ))
                })
                .unwrap();
            assert_eq!(&**t.cluster(t.pick(h)), best.cluster.as_str());
        }
    }

    #[test]
    fn distribution_follows_weights() {
        let t = RendezvousTable::new(&ws(&[("a", 1), ("b", 2), ("c", 5)])).unwrap();
        let n = 80_000;
        let c = counts(&t, n);
        for (name, w) in [("a", 1.0), ("b", 2.0), ("c", 5.0)] {
            let got = c[name] as f64 / n as f64;
            assert!((got - w / 8.0).abs() < 0.01, "{name}: {got} vs {}", w / 8.0);
        }
    }

    #[test]
    fn keyless_sequence_spreads_by_weight() {
        let t = RendezvousTable::new(&ws(&[("a", 1), ("b", 3)])).unwrap();
        let n = 40_000;
        let a = (0..n)
            .filter(|&i| &**t.cluster(t.pick(key_hash_from_sequence(i))) == "a")
            .count();
        let got = a as f64 / n as f64;
        assert!((got - 0.25).abs() < 0.01, "{got}");
    }

    fn write_set() -> impl Strategy<Value = Vec<WeightedCluster>> {
        proptest::collection::btree_map("[a-z]{1,6}", 1u32..100, 1..6).prop_map(|m| {
            m.into_iter()
                .map(|(cluster, weight)| WeightedCluster { cluster, weight })
                .collect()
        })
    }

    const KEYS: u64 = 20_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn share_is_within_a_few_percent_of_weight(write in write_set()) {
            let t = RendezvousTable::new(&write).unwrap();
            let c = counts(&t, KEYS);
            let total: u32 = write.iter().map(|w| w.weight).sum();
            for w in &write {
                let want = f64::from(w.weight) / f64::from(total);
                let got = *c.get(&w.cluster).unwrap_or(&0) as f64 / KEYS as f64;
                prop_assert!((got - want).abs() < 0.025, "{}: got {got}, want {want}", w.cluster);
            }
        }

        #[test]
        fn adding_moves_only_its_share_and_only_to_it(
            write in write_set(), new_weight in 1u32..100, seed in any::<u64>()
        ) {
            let new = format!("new-{seed}");
            let before = RendezvousTable::new(&write).unwrap();
            let mut grown = write.clone();
            grown.push(WeightedCluster { cluster: new.clone(), weight: new_weight });
            let after = RendezvousTable::new(&grown).unwrap();
            let mut moved = 0u64;
            for k in 0..KEYS {
                let key = format!("k{seed}-{k}");
                let (a, b) = (before.cluster_for_key(key.as_bytes()), after.cluster_for_key(key.as_bytes()));
                if a != b {
                    prop_assert_eq!(&**b, new.as_str(), "a key moved between old clusters");
                    moved += 1;
                }
            }
            let total: u32 = grown.iter().map(|w| w.weight).sum();
            let want = f64::from(new_weight) / f64::from(total);
            let got = moved as f64 / KEYS as f64;
            prop_assert!((got - want).abs() < 0.025, "moved {got}, want {want}");
        }

        #[test]
        fn removing_moves_only_its_keys(write in write_set(), idx in any::<prop::sample::Index>()) {
            prop_assume!(write.len() >= 2);
            let gone = idx.get(&write).cluster.clone();
            let before = RendezvousTable::new(&write).unwrap();
            let shrunk: Vec<_> = write.iter().filter(|w| w.cluster != gone).cloned().collect();
            let after = RendezvousTable::new(&shrunk).unwrap();
            for k in 0..5_000 {
                let key = format!("r{k}");
                let (a, b) = (before.cluster_for_key(key.as_bytes()), after.cluster_for_key(key.as_bytes()));
                if **a != *gone {
                    prop_assert_eq!(a, b, "a key not on the removed cluster moved");
                } else {
                    prop_assert_ne!(&**b, gone.as_str());
                }
            }
        }

        #[test]
        fn deterministic_and_order_independent(write in write_set(), keys in proptest::collection::vec(any::<Vec<u8>>(), 1..50)) {
            let t1 = RendezvousTable::new(&write).unwrap();
            let mut rev = write.clone();
            rev.reverse();
            let t2 = RendezvousTable::new(&rev).unwrap();
            for key in &keys {
                prop_assert_eq!(t1.cluster_for_key(key), t2.cluster_for_key(key));
                prop_assert_eq!(t1.cluster_for_key(key).to_string(), cluster_for_key(key, &write).unwrap());
            }
        }
    }
}
