//! Log-linear latency histograms with bounded memory.
//!
//! A load run records millions of latencies; keeping them all (to sort for percentiles) would
//! make the client's memory grow with the run and distort the very measurements it takes on a
//! shared 2-core machine. Instead every value (microseconds) goes into one of [`NBUCKETS`]
//! fixed buckets: values below 128 get a bucket each, and every power-of-two range above is cut
//! into 64 equal sub-buckets, so a reported percentile is at most ~1.6 % above the true value.
//! Buckets are plain counts, so histograms from several worker processes merge by addition
//! ([`Hist::merge`]); that is what lets `--processes` combine children's results exactly.
//!
//! [`AtomicHist`] is the lock-free recording side shared by thousands of socket tasks;
//! [`Hist`] is the plain snapshot that is serialised (sparsely) and merged.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Values below this get one bucket each.
const LINEAR: u64 = 128;
/// log2 of the sub-buckets per power of two above `LINEAR`.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Largest power of two covered; larger values are clamped into the last bucket (~19 hours in µs).
const MAX_POW: u32 = 36;
/// Number of buckets.
pub const NBUCKETS: usize = LINEAR as usize + (MAX_POW as usize + 1 - 7) * SUB as usize;

/// Bucket index of a value.
pub fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let k = 63 - v.leading_zeros(); // 2^k <= v < 2^(k+1), k >= 7
    if k > MAX_POW {
        return NBUCKETS - 1;
    }
    let sub = (v >> (k - SUB_BITS)) & (SUB - 1);
    LINEAR as usize + (k as usize - 7) * SUB as usize + sub as usize
}

/// Smallest and largest value that fall into bucket `i`.
pub fn bucket_range(i: usize) -> (u64, u64) {
    if i < LINEAR as usize {
        return (i as u64, i as u64);
    }
    let j = i - LINEAR as usize;
    let k = (j / SUB as usize) as u32 + 7;
    let sub = (j % SUB as usize) as u64;
    let width = 1u64 << (k - SUB_BITS);
    let low = (SUB + sub) << (k - SUB_BITS);
    (low, low + width - 1)
}

/// Value at quantile `q` (0..=1) of bucket counts: the upper edge of the bucket holding the
/// rank-`ceil(q*total)` value, so percentiles err on the pessimistic side.
pub fn quantile_of_counts(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_range(i).1);
        }
    }
    None
}

/// A plain (non-atomic) histogram: a snapshot, mergeable and serialisable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "HistWire", from = "HistWire")]
pub struct Hist {
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: u64,
    pub min: u64,
    pub max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; NBUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl Hist {
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += *b;
        }
        self.count += o.count;
        self.sum = self.sum.saturating_add(o.sum);
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// Quantile in the recorded unit, never above the exact maximum.
    pub fn quantile(&self, q: f64) -> u64 {
        quantile_of_counts(&self.counts, q)
            .map(|v| v.min(self.max))
            .unwrap_or(0)
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }
}

/// Sparse wire form: only non-empty buckets, as `[index, count]` pairs.
#[derive(Serialize, Deserialize)]
struct HistWire {
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
    buckets: Vec<(u32, u64)>,
}

impl From<Hist> for HistWire {
    fn from(h: Hist) -> Self {
        let buckets = h
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (i as u32, c))
            .collect();
        HistWire {
            count: h.count,
            sum: h.sum,
            min: if h.count == 0 { 0 } else { h.min },
            max: h.max,
            buckets,
        }
    }
}

impl From<HistWire> for Hist {
    fn from(w: HistWire) -> Self {
        let mut h = Hist::default();
        for (i, c) in w.buckets {
            if let Some(slot) = h.counts.get_mut(i as usize) {
                *slot += c;
            }
        }
        h.count = w.count;
        h.sum = w.sum;
        h.min = if w.count == 0 { u64::MAX } else { w.min };
        h.max = w.max;
        h
    }
}

/// Lock-free recording histogram shared by many tasks.
pub struct AtomicHist {
    counts: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl Default for AtomicHist {
    fn default() -> Self {
        AtomicHist {
            counts: (0..NBUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }
}

impl AtomicHist {
    pub fn record(&self, v: u64) {
        self.counts[bucket_of(v)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
        self.min.fetch_min(v, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    pub fn snapshot(&self) -> Hist {
        Hist {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum: self.sum.load(Relaxed),
            min: self.min.load(Relaxed),
            max: self.max.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_values() {
        let mut prev_high = None;
        for i in 0..NBUCKETS {
            let (lo, hi) = bucket_range(i);
            assert!(lo <= hi);
            if let Some(p) = prev_high {
                assert_eq!(lo, p + 1, "gap before bucket {i}");
            }
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            prev_high = Some(hi);
        }
        assert_eq!(bucket_of(u64::MAX), NBUCKETS - 1);
    }

    #[test]
    fn relative_error_is_bounded() {
        for v in [128u64, 129, 1000, 12_345, 999_999, 5_000_000_000] {
            let (lo, hi) = bucket_range(bucket_of(v));
            assert!(lo <= v && v <= hi);
            assert!((hi - lo) as f64 / lo as f64 <= 1.0 / 64.0 + 1e-9, "v={v}");
        }
    }

    #[test]
    fn percentiles_of_uniform_values() {
        let mut h = Hist::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let close = |got: u64, want: u64| {
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(err <= 0.02, "got {got} want {want}");
        };
        close(h.quantile(0.5), 5_000);
        close(h.quantile(0.9), 9_000);
        close(h.quantile(0.99), 9_900);
        close(h.quantile(0.999), 9_990);
        assert_eq!(h.quantile(1.0), 10_000);
        assert_eq!(h.min, 1);
        assert!((h.mean() - 5000.5).abs() < 1e-9);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Hist::default();
        for v in [3u64, 3, 7, 100] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 3);
        assert_eq!(h.quantile(0.75), 7);
        assert_eq!(h.quantile(0.99), 100);
        assert_eq!(Hist::default().quantile(0.5), 0);
    }

    #[test]
    fn merge_equals_recording_everything_once() {
        let (mut a, mut b, mut all) = (Hist::default(), Hist::default(), Hist::default());
        for v in 0..5000u64 {
            let x = v * v % 77_777;
            if v % 3 == 0 {
                a.record(x)
            } else {
                b.record(x)
            }
            all.record(x);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }

    #[test]
    fn atomic_snapshot_and_sparse_json_roundtrip() {
        let ah = AtomicHist::default();
        for v in [5u64, 500, 50_000, 5_000_000] {
            ah.record(v);
        }
        let h = ah.snapshot();
        assert_eq!(h.count, 4);
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.len() < 200, "sparse form expected: {json}");
        let back: Hist = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        let empty: Hist =
            serde_json::from_str(&serde_json::to_string(&Hist::default()).unwrap()).unwrap();
        assert_eq!(empty, Hist::default());
    }
}
