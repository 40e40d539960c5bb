//! NuPIC's random distributed scalar encoder (RDSE).
//!
//! A value maps to a bucket `round((value − offset)/resolution) + 500`, clipped to
//! `[0, 999]`. Each bucket is a set of `w` bits out of `n`, drawn at random but constrained so
//! that buckets `d < w` apart share exactly `w − d` bits and buckets further apart share at
//! most 2. Buckets are created lazily, walking outwards from the middle one, and kept in the
//! state: the mapping of a bucket never changes once made, and a checkpoint carries it.

use super::{write_sdr, EncoderError, Scratch};
use crate::random::Random;
use crate::sdr::Sdr;
use serde::{Deserialize, Serialize};
use std::ops::RangeInclusive;

/// Number of buckets the encoder can ever create (NuPIC's `maxBuckets`).
pub const MAX_BUCKETS: usize = 1000;
/// Largest overlap allowed between buckets at least `w` apart (NuPIC's `_maxOverlap`).
pub const MAX_OVERLAP: usize = 2;
/// The first bucket, which `offset` maps to.
const MIDDLE: usize = MAX_BUCKETS / 2;
/// Draws of a replacement bit before the overlap rule is relaxed. NuPIC retries forever; with
/// the enforced `n > 6·w` a few draws normally suffice, so the cap only stops a pathological
/// parameter set from hanging the detector.
const MAX_TRIES_PER_BUCKET: u32 = 100_000;

/// Parameters of [`RandomDistributedScalarEncoder`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RdseParams {
    /// Width of a bucket in input units. NuPIC has no default; 1.0 here. NAB derives it
    /// from the expected range, see [`super::nab_value_params`].
    pub resolution: f64,
    /// Active bits per encoding (odd).
    pub w: u32,
    /// Total bits; must exceed `6·w`.
    pub n: u32,
    /// Seed of the generator drawing the bucket representations.
    pub seed: u64,
    /// Value mapped to the middle bucket; `None` = the first value encoded.
    pub offset: Option<f64>,
}

impl Default for RdseParams {
    fn default() -> Self {
        RdseParams {
            resolution: 1.0,
            w: 21,
            n: 400,
            seed: 42,
            offset: None,
        }
    }
}

impl RdseParams {
    /// Checks the parameters with NuPIC's rules.
    pub fn validate(&self) -> Result<(), EncoderError> {
        if !(self.resolution.is_finite() && self.resolution > 0.0) {
            return Err(EncoderError::param(
                "resolution",
                self.resolution,
                "must be a positive finite number",
            ));
        }
        if self.w == 0 || self.w.is_multiple_of(2) {
            return Err(EncoderError::param(
                "w",
                self.w,
                "must be an odd positive integer",
            ));
        }
        if u64::from(self.n) <= 6 * u64::from(self.w) {
            return Err(EncoderError::param(
                "n",
                self.n,
                "must be strictly greater than 6*w (more than 11*w recommended)",
            ));
        }
        if u64::from(self.n) > MAX_N {
            return Err(EncoderError::param(
                "n",
                self.n,
                "must be at most 65536 (bits are kept as u16)",
            ));
        }
        if let Some(o) = self.offset {
            if !o.is_finite() {
                return Err(EncoderError::param("offset", o, "must be finite"));
            }
        }
        Ok(())
    }
}

/// Most output bits: representations keep their bits as `u16`. (Serialised, a `u16` and a
/// `u32` of the same value are the same bytes.)
const MAX_N: u64 = 1 << 16;

/// NuPIC's `RandomDistributedScalarEncoder`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandomDistributedScalarEncoder {
    params: RdseParams,
    offset: Option<f64>,
    min_index: usize,
    max_index: usize,
    /// Representations of buckets `min_index..=max_index`, `w` bits each, in *positional*
    /// order: bucket `i` differs from its inner neighbour exactly at position `i % w`, which
    /// the overlap check relies on.
    reps: Vec<u16>,
    rng: Random,
    num_tries: u64,
    #[serde(skip)]
    scratch: Scratch<Vec<u32>>,
}

impl RandomDistributedScalarEncoder {
    /// Heap bytes held (capacity-based), for memory reporting.
    pub fn heap_bytes(&self) -> usize {
        2 * self.reps.capacity() + 4 * self.scratch.0.capacity()
    }

    /// Validates `params` and draws the middle bucket's representation.
    pub fn new(params: RdseParams) -> Result<Self, EncoderError> {
        params.validate()?;
        let mut rng = Random::new(params.seed);
        let population: Vec<u32> = (0..params.n).collect();
        let reps = rng
            .sample(&population, params.w as usize)
            .into_iter()
            .map(narrow)
            .collect();
        Ok(RandomDistributedScalarEncoder {
            offset: params.offset,
            params,
            min_index: MIDDLE,
            max_index: MIDDLE,
            reps,
            rng,
            num_tries: 0,
            scratch: Scratch::default(),
        })
    }

    /// The parameters it was built with.
    pub fn params(&self) -> &RdseParams {
        &self.params
    }

    /// Number of output bits (`n`).
    pub fn size(&self) -> usize {
        self.params.n as usize
    }

    /// Number of buckets the encoder can ever produce.
    pub fn max_buckets(&self) -> usize {
        MAX_BUCKETS
    }

    /// The offset in use, once known.
    pub fn offset(&self) -> Option<f64> {
        self.offset
    }

    /// Indices of the buckets created so far.
    pub fn created_buckets(&self) -> RangeInclusive<usize> {
        self.min_index..=self.max_index
    }

    /// Rejected draws so far (diagnostic, as NuPIC's `numTries`).
    pub fn num_tries(&self) -> u64 {
        self.num_tries
    }

    /// Bucket of `value`; `None` for NaN or ±∞ (missing data). The first finite value seen
    /// fixes the offset when none was given.
    pub fn bucket_index(&mut self, value: f64) -> Option<usize> {
        if !value.is_finite() {
            return None;
        }
        let offset = *self.offset.get_or_insert(value);
        let steps = ((value - offset) / self.params.resolution).round();
        // The clamp also absorbs an overflow to ±∞ for extreme values.
        let idx = (MIDDLE as f64 + steps).clamp(0.0, (MAX_BUCKETS - 1) as f64);
        Some(idx as usize)
    }

    /// The (sorted) active bits of bucket `index`, creating it and any buckets between it and
    /// the existing ones. Indices past the last bucket are clipped.
    pub fn bucket_bits(&mut self, index: usize) -> Vec<u32> {
        let index = self.ensure_bucket(index);
        let mut bits: Vec<u32> = self.rep(index).iter().map(|&b| u32::from(b)).collect();
        bits.sort_unstable();
        bits
    }

    /// Encodes `value` into `out` (resized to `n` bits if needed); NaN/±∞ gives an empty SDR.
    pub fn encode(&mut self, value: f64, out: &mut Sdr) {
        let mut bits = std::mem::take(&mut self.scratch.0);
        bits.clear();
        self.encode_into(value, 0, &mut bits);
        write_sdr(out, self.size(), &bits);
        self.scratch.0 = bits;
    }

    /// Appends the sorted active bits of `value`, shifted by `offset`, to `buf`.
    pub(crate) fn encode_into(&mut self, value: f64, offset: u32, buf: &mut Vec<u32>) {
        let Some(bucket) = self.bucket_index(value) else {
            return;
        };
        let bucket = self.ensure_bucket(bucket);
        let start = buf.len();
        buf.extend(self.rep(bucket).iter().map(|&b| u32::from(b) + offset));
        buf[start..].sort_unstable();
    }

    fn w(&self) -> usize {
        self.params.w as usize
    }

    /// Positional representation of an existing bucket.
    fn rep(&self, index: usize) -> &[u16] {
        let w = self.w();
        let at = (index - self.min_index) * w;
        &self.reps[at..at + w]
    }

    /// Creates buckets up to `index` (clipped) and returns the clipped index.
    fn ensure_bucket(&mut self, index: usize) -> usize {
        let index = index.min(MAX_BUCKETS - 1);
        while index < self.min_index {
            let new = self.new_representation(self.min_index, self.min_index - 1);
            self.reps.splice(0..0, new);
            self.min_index -= 1;
        }
        while index > self.max_index {
            let new = self.new_representation(self.max_index, self.max_index + 1);
            self.reps.extend_from_slice(&new);
            self.max_index += 1;
        }
        index
    }

    /// Representation for `new_index`: the neighbour's, with position `new_index % w` replaced
    /// by a random bit that the neighbour lacks and that keeps every overlap rule.
    fn new_representation(&mut self, neighbour: usize, new_index: usize) -> Vec<u16> {
        let w = self.w();
        let n = self.params.n;
        let mut rep = self.rep(neighbour).to_vec();
        let pos = new_index % w;
        let removed = u32::from(rep[pos]);
        let mut in_neighbour = vec![false; n as usize];
        for &b in &rep {
            in_neighbour[b as usize] = true;
        }
        let mut tries = 0;
        loop {
            let bit = self.rng.below(n);
            if !in_neighbour[bit as usize] {
                let in_candidate = |b: u32| (in_neighbour[b as usize] && b != removed) || b == bit;
                if tries >= MAX_TRIES_PER_BUCKET || self.overlaps_ok(&in_candidate, new_index) {
                    rep[pos] = narrow(bit);
                    return rep;
                }
            }
            tries += 1;
            self.num_tries += 1;
        }
    }

    /// Whether a candidate for `new_index` (given by its membership test) overlaps every
    /// existing bucket as required: exactly `w − d` bits at distance `d < w`, at most
    /// [`MAX_OVERLAP`] further away.
    ///
    /// Walks the buckets from `min_index` up with a running overlap: consecutive buckets differ
    /// in one known position, so each step costs O(1) instead of O(w).
    fn overlaps_ok(&self, in_candidate: &impl Fn(u32) -> bool, new_index: usize) -> bool {
        let w = self.w();
        let ok = |i: usize, overlap: usize| {
            let d = i.abs_diff(new_index);
            if d < w {
                overlap == w - d
            } else {
                overlap <= MAX_OVERLAP
            }
        };
        let mut overlap = self
            .rep(self.min_index)
            .iter()
            .filter(|&&b| in_candidate(u32::from(b)))
            .count();
        if !ok(self.min_index, overlap) {
            return false;
        }
        for i in self.min_index + 1..=self.max_index {
            // Below the middle, bucket i−1 was made from bucket i at position (i−1) % w;
            // above it, bucket i was made from bucket i−1 at position i % w.
            let pos = if i <= MIDDLE { (i - 1) % w } else { i % w };
            overlap -= usize::from(in_candidate(u32::from(self.rep(i - 1)[pos])));
            overlap += usize::from(in_candidate(u32::from(self.rep(i)[pos])));
            if !ok(i, overlap) {
                return false;
            }
        }
        true
    }
}

/// An output bit (below `n`, at most [`MAX_N`]) as kept in a representation.
fn narrow(bit: u32) -> u16 {
    u16::try_from(bit).expect("output bits below n <= 65536")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdr::sorted_intersection_len;

    fn enc(resolution: f64, seed: u64) -> RandomDistributedScalarEncoder {
        RandomDistributedScalarEncoder::new(RdseParams {
            resolution,
            seed,
            offset: Some(0.0),
            ..RdseParams::default()
        })
        .unwrap()
    }

    #[test]
    fn every_encoding_has_w_bits_and_missing_is_empty() {
        let mut e = enc(1.0, 42);
        let mut out = Sdr::default();
        for v in [-600.0, -3.2, 0.0, 0.4, 7.0, 123.0, 1e9] {
            e.encode(v, &mut out);
            assert_eq!(out.size(), 400);
            assert_eq!(out.len(), 21, "value {v}");
        }
        e.encode(f64::NAN, &mut out);
        assert!(out.is_empty());
        assert_eq!(e.bucket_index(f64::NAN), None);
        assert_eq!(e.bucket_index(f64::INFINITY), None);
    }

    #[test]
    fn bucket_index_follows_nupic_formula_and_first_value_sets_offset() {
        let mut e = RandomDistributedScalarEncoder::new(RdseParams {
            resolution: 0.5,
            ..RdseParams::default()
        })
        .unwrap();
        assert_eq!(e.bucket_index(f64::NAN), None);
        assert_eq!(e.offset(), None, "NaN must not fix the offset");
        assert_eq!(e.bucket_index(10.0), Some(500));
        assert_eq!(e.offset(), Some(10.0));
        assert_eq!(e.bucket_index(10.24), Some(500));
        // Round half away from zero, like Python 2's round().
        assert_eq!(e.bucket_index(10.25), Some(501));
        assert_eq!(e.bucket_index(9.75), Some(499));
        assert_eq!(e.bucket_index(13.0), Some(506));
        assert_eq!(e.bucket_index(-1e6), Some(0));
        assert_eq!(e.bucket_index(1e300), Some(999));
        assert_eq!(e.bucket_index(f64::MAX), Some(999));
    }

    #[test]
    fn overlap_is_exact_nearby_and_small_far_away() {
        let mut e = enc(1.0, 7);
        let buckets: Vec<Vec<u32>> = (0..MAX_BUCKETS).map(|i| e.bucket_bits(i)).collect();
        for (i, a) in buckets.iter().enumerate() {
            assert_eq!(a.len(), 21);
            for (j, b) in buckets.iter().enumerate().skip(i + 1) {
                let o = sorted_intersection_len(a, b);
                let d = j - i;
                if d < 21 {
                    assert_eq!(o, 21 - d, "buckets {i} and {j}");
                } else {
                    assert!(o <= MAX_OVERLAP, "buckets {i} and {j} overlap {o}");
                }
            }
        }
    }

    #[test]
    fn no_two_buckets_share_a_representation() {
        let mut e = enc(1.0, 3);
        let mut seen: Vec<Vec<u32>> = (250..750).map(|i| e.bucket_bits(i)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 500);
    }

    #[test]
    fn same_seed_same_encodings_other_seed_differs() {
        let (mut a, mut b, mut c) = (enc(0.1, 42), enc(0.1, 42), enc(0.1, 43));
        let (mut sa, mut sb, mut sc) = (Sdr::default(), Sdr::default(), Sdr::default());
        let mut differs = false;
        for i in 0..300 {
            let v = ((i * 37) % 101) as f64 * 0.37 - 15.0;
            a.encode(v, &mut sa);
            b.encode(v, &mut sb);
            c.encode(v, &mut sc);
            assert_eq!(sa, sb);
            differs |= sa != sc;
        }
        assert!(differs);
    }

    #[test]
    fn creating_far_buckets_keeps_earlier_mappings() {
        let mut e = enc(1.0, 11);
        let near: Vec<Vec<u32>> = (495..=505).map(|i| e.bucket_bits(i)).collect();
        // Far in both directions, then values in between.
        let far_hi = e.bucket_bits(900);
        let far_lo = e.bucket_bits(20);
        assert_eq!(e.created_buckets(), 20..=900);
        for (k, i) in (495..=505).enumerate() {
            assert_eq!(e.bucket_bits(i), near[k]);
        }
        e.bucket_bits(700);
        e.bucket_bits(100);
        assert_eq!(e.bucket_bits(900), far_hi);
        assert_eq!(e.bucket_bits(20), far_lo);

        // Creating a far bucket first equals walking there step by step.
        let mut stepwise = enc(1.0, 11);
        for i in 500..=900 {
            stepwise.bucket_bits(i);
        }
        assert_eq!(stepwise.bucket_bits(900), {
            let mut direct = enc(1.0, 11);
            direct.bucket_bits(900)
        });
    }

    #[test]
    fn serde_round_trip_continues_identically() {
        let mut e = enc(0.5, 42);
        let mut out = Sdr::default();
        for i in 0..40 {
            e.encode(i as f64 * 0.9 - 5.0, &mut out);
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&e, cfg).unwrap();
        let (mut r, _): (RandomDistributedScalarEncoder, _) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(r, e);
        let mut out2 = Sdr::default();
        for i in 0..200 {
            let v = (i as f64 * 1.7).sin() * 150.0;
            e.encode(v, &mut out);
            r.encode(v, &mut out2);
            assert_eq!(out, out2);
        }
        assert_eq!(r, e);
    }

    #[test]
    fn invalid_params_are_rejected_with_their_name() {
        let bad = |p: RdseParams| {
            RandomDistributedScalarEncoder::new(p)
                .unwrap_err()
                .to_string()
        };
        let d = RdseParams::default();
        assert!(bad(RdseParams { w: 20, ..d.clone() }).contains("`w`"));
        assert!(bad(RdseParams {
            n: 126,
            ..d.clone()
        })
        .contains("`n`"));
        assert!(bad(RdseParams {
            n: 65_537,
            ..d.clone()
        })
        .contains("`n`"));
        assert!(RandomDistributedScalarEncoder::new(RdseParams {
            n: 65_536,
            seed: 3,
            ..d.clone()
        })
        .is_ok());
        assert!(bad(RdseParams {
            resolution: -1.0,
            ..d.clone()
        })
        .contains("`resolution`"));
        assert!(bad(RdseParams {
            offset: Some(f64::NAN),
            ..d
        })
        .contains("`offset`"));
    }
}
