//! NuPIC's SDR classifier, one step ahead: a softmax regression from an SDR (the spatial
//! pooler's active columns) to the value encoder's bucket of the *next* record, plus a running
//! average of the values seen in each bucket to turn a predicted bucket back into a value.
//!
//! The caller supplies the one-step delay: at record `t` it calls
//! `learn(pattern_{t-1}, bucket_t, value_t)`, and `infer(pattern_t)` predicts record `t+1`.
//! (NuPIC's `compute` infers *before* it learns within a record; either order works here.)

use crate::encoders::Scratch;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

/// NAB's classifier learning rate (`clParams.alpha` of its NuPIC model parameters); NuPIC's
/// `SDRClassifier` class default is 0.001.
pub const NAB_ALPHA: f64 = 0.035_828_933_612_158;

/// Buckets handled per pass when summing weight rows on the stack (no heap scratch needed).
const CHUNK: usize = 64;

/// Invalid classifier parameters.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid classifier parameter `{param}` = {value}: {reason}")]
pub struct ClassifierParamError {
    /// Parameter name.
    pub param: &'static str,
    /// The offending value.
    pub value: f64,
    /// What it must satisfy.
    pub reason: &'static str,
}

/// Parameters of [`SdrClassifier`] (NuPIC names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClassifierParams {
    /// Learning rate of the softmax regression. Default: NAB's [`NAB_ALPHA`].
    pub alpha: f64,
    /// Weight of a new value in each bucket's moving average of actual values (NuPIC 0.3).
    pub act_value_alpha: f64,
}

impl Default for ClassifierParams {
    fn default() -> Self {
        ClassifierParams {
            alpha: NAB_ALPHA,
            act_value_alpha: 0.3,
        }
    }
}

impl ClassifierParams {
    /// Checks both rates.
    pub fn validate(&self) -> Result<(), ClassifierParamError> {
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ClassifierParamError {
                param: "alpha",
                value: self.alpha,
                reason: "must be a positive finite number",
            });
        }
        if !(self.act_value_alpha > 0.0 && self.act_value_alpha <= 1.0) {
            return Err(ClassifierParamError {
                param: "act_value_alpha",
                value: self.act_value_alpha,
                reason: "must be in (0, 1]",
            });
        }
        Ok(())
    }
}

/// One-step-ahead SDR classifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SdrClassifier {
    params: ClassifierParams,
    /// `[input_size, num_buckets]`, row-major so an active input bit's weights are one
    /// contiguous row. Grows by whole columns (zeros) when a higher bucket appears.
    weights: Array2<f32>,
    /// Moving average of the values learnt for each bucket; `None` until the bucket is seen.
    actual_values: Vec<Option<f64>>,
    /// Per-bucket probabilities, then errors, during `learn`.
    #[serde(skip)]
    probs: Scratch<Vec<f64>>,
    /// Per-bucket weight deltas during `learn`.
    #[serde(skip)]
    deltas: Scratch<Vec<f32>>,
}

impl SdrClassifier {
    /// A classifier for input SDRs of `input_size` bits, knowing no bucket yet.
    pub fn new(input_size: usize, params: ClassifierParams) -> Result<Self, ClassifierParamError> {
        params.validate()?;
        Ok(SdrClassifier {
            params,
            weights: Array2::zeros((input_size, 0)),
            actual_values: Vec::new(),
            probs: Scratch::default(),
            deltas: Scratch::default(),
        })
    }

    /// The parameters it was built with.
    pub fn params(&self) -> &ClassifierParams {
        &self.params
    }

    /// Number of input bits.
    pub fn input_size(&self) -> usize {
        self.weights.nrows()
    }

    /// Number of buckets known (highest bucket learnt + 1).
    pub fn num_buckets(&self) -> usize {
        self.weights.ncols()
    }

    /// Averaged actual value of `bucket`, if it has been learnt.
    pub fn actual_value(&self, bucket: usize) -> Option<f64> {
        self.actual_values.get(bucket).copied().flatten()
    }

    /// The weight matrix `[input_size, num_buckets]`.
    pub fn weights(&self) -> &Array2<f32> {
        &self.weights
    }

    /// Teaches that `pattern` (sorted or not, unique input bit indices) is followed by
    /// `bucket`, whose value was `actual`.
    ///
    /// # Panics
    /// If a pattern bit is `>= input_size`.
    pub fn learn(&mut self, pattern: &[u32], bucket: usize, actual: f64) {
        self.check_pattern(pattern);
        if bucket >= self.num_buckets() {
            self.grow(bucket + 1);
        }
        let a = self.params.act_value_alpha;
        let slot = &mut self.actual_values[bucket];
        *slot = Some(match *slot {
            Some(old) => (1.0 - a) * old + a * actual,
            None => actual,
        });

        let nb = self.num_buckets();
        let mut probs = std::mem::take(&mut self.probs.0);
        self.probabilities(pattern, &mut probs);
        let deltas = &mut self.deltas.0;
        deltas.clear();
        let alpha = self.params.alpha;
        deltas.extend(probs.iter().enumerate().map(|(b, &p)| {
            let target = if b == bucket { 1.0 } else { 0.0 };
            (alpha * (target - p)) as f32
        }));
        self.probs.0 = probs;
        let w = self.weights.as_slice_mut().expect("weights are row-major");
        for &bit in pattern {
            let row = &mut w[bit as usize * nb..(bit as usize + 1) * nb];
            for (x, &d) in row.iter_mut().zip(deltas.iter()) {
                *x += d;
            }
        }
    }

    /// The most probable next bucket among those learnt so far, with its averaged value.
    /// `None` before any learning. Ties go to the lowest bucket. Allocation-free.
    ///
    /// Buckets never learnt (below the highest one) are skipped: they have no value to report.
    pub fn infer(&self, pattern: &[u32]) -> Option<(usize, f64)> {
        self.check_pattern(pattern);
        let nb = self.num_buckets();
        let w = self.weights.as_slice().expect("weights are row-major");
        let mut best: Option<(usize, f64, f64)> = None;
        // The softmax is monotonic, so the arg-max of the summed activations is the answer.
        for lo in (0..nb).step_by(CHUNK) {
            let hi = (lo + CHUNK).min(nb);
            let mut act = [0f64; CHUNK];
            for &bit in pattern {
                let row = &w[bit as usize * nb + lo..bit as usize * nb + hi];
                for (a, &x) in act.iter_mut().zip(row) {
                    *a += f64::from(x);
                }
            }
            for (k, &a) in act[..hi - lo].iter().enumerate() {
                if let Some(v) = self.actual_values[lo + k] {
                    if best.is_none_or(|(_, top, _)| a > top) {
                        best = Some((lo + k, a, v));
                    }
                }
            }
        }
        best.map(|(b, _, v)| (b, v))
    }

    /// Fills `out` with the probability of each bucket `0..num_buckets()` following `pattern`
    /// (softmax of the summed weights); empty before any learning.
    pub fn infer_probabilities(&self, pattern: &[u32], out: &mut Vec<f64>) {
        self.check_pattern(pattern);
        self.probabilities(pattern, out);
    }

    fn check_pattern(&self, pattern: &[u32]) {
        let n = self.input_size();
        assert!(
            pattern.iter().all(|&b| (b as usize) < n),
            "classifier pattern bit out of range for input size {n}"
        );
    }

    fn probabilities(&self, pattern: &[u32], out: &mut Vec<f64>) {
        let nb = self.num_buckets();
        out.clear();
        out.resize(nb, 0.0);
        if nb == 0 {
            return;
        }
        let w = self.weights.as_slice().expect("weights are row-major");
        for &bit in pattern {
            let row = &w[bit as usize * nb..(bit as usize + 1) * nb];
            for (a, &x) in out.iter_mut().zip(row) {
                *a += f64::from(x);
            }
        }
        // Subtracting the maximum keeps exp() from overflowing; the result is unchanged.
        let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for a in out.iter_mut() {
            *a = (*a - max).exp();
            sum += *a;
        }
        for a in out.iter_mut() {
            *a /= sum;
        }
    }

    /// Widens the weights to `num_buckets` columns (new ones zero), keeping row-major layout.
    fn grow(&mut self, num_buckets: usize) {
        let (rows, old) = self.weights.dim();
        let mut grown = Array2::<f32>::zeros((rows, num_buckets));
        if old > 0 {
            grown
                .slice_mut(ndarray::s![.., ..old])
                .assign(&self.weights);
        }
        self.weights = grown;
        self.actual_values.resize(num_buckets, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u32) -> Vec<u32> {
        // 40 distinct bits of 2048, different for each seed.
        let mut v: Vec<u32> = (0..40).map(|i| (seed * 97 + i * 51) % 2048).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn nothing_learnt_infers_nothing() {
        let c = SdrClassifier::new(2048, ClassifierParams::default()).unwrap();
        assert_eq!(c.infer(&pattern(1)), None);
        let mut p = vec![0.5];
        c.infer_probabilities(&pattern(1), &mut p);
        assert!(p.is_empty());
    }

    #[test]
    fn learns_a_repeating_sequence() {
        let mut c = SdrClassifier::new(2048, ClassifierParams::default()).unwrap();
        // A → B → C → A …, buckets and values chosen far apart; values jitter inside a bucket.
        let pats = [pattern(1), pattern(2), pattern(3)];
        let buckets = [40usize, 7, 120];
        let values = [10.0, -3.0, 55.0];
        for t in 1..600 {
            let prev = &pats[(t - 1) % 3];
            let jitter = if t % 2 == 0 { 0.1 } else { -0.1 };
            c.learn(prev, buckets[t % 3], values[t % 3] + jitter);
        }
        assert_eq!(c.num_buckets(), 121);
        for k in 0..3 {
            let (b, v) = c.infer(&pats[k]).unwrap();
            assert_eq!(b, buckets[(k + 1) % 3]);
            assert!((v - values[(k + 1) % 3]).abs() < 0.11, "value {v}");
            let mut p = Vec::new();
            c.infer_probabilities(&pats[k], &mut p);
            assert_eq!(p.len(), 121);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!(p[b] > 0.9, "p = {}", p[b]);
            let argmax = (0..p.len()).max_by(|&i, &j| p[i].total_cmp(&p[j])).unwrap();
            assert_eq!(argmax, b);
        }
        assert_eq!(c.actual_value(8), None);
    }

    #[test]
    fn probabilities_sum_to_one_and_reflect_frequencies() {
        let mut c = SdrClassifier::new(64, ClassifierParams::default()).unwrap();
        let p = [1u32, 5, 9, 33];
        // Same pattern followed by bucket 2 three times as often as bucket 0.
        for t in 0..2000 {
            c.learn(&p, if t % 4 == 0 { 0 } else { 2 }, t as f64);
        }
        let mut probs = Vec::new();
        c.infer_probabilities(&p, &mut probs);
        assert_eq!(probs.len(), 3);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((probs[2] - 0.75).abs() < 0.1 && (probs[0] - 0.25).abs() < 0.1);
        assert!(probs[1] < 0.01, "never-seen bucket keeps shrinking");
        assert_eq!(c.infer(&p).unwrap().0, 2);
        // Unrelated pattern: untouched weights → uniform.
        c.infer_probabilities(&[60], &mut probs);
        assert!(probs.iter().all(|&x| (x - 1.0 / 3.0).abs() < 1e-12));
    }

    #[test]
    fn actual_values_are_a_moving_average() {
        let mut c = SdrClassifier::new(8, ClassifierParams::default()).unwrap();
        c.learn(&[0], 3, 10.0);
        assert_eq!(c.actual_value(3), Some(10.0));
        c.learn(&[0], 3, 20.0);
        assert!((c.actual_value(3).unwrap() - 13.0).abs() < 1e-12);
        assert_eq!(c.infer(&[0]), Some((3, c.actual_value(3).unwrap())));
    }

    #[test]
    fn serde_round_trip_continues_identically() {
        let mut c = SdrClassifier::new(2048, ClassifierParams::default()).unwrap();
        for t in 1..50u32 {
            c.learn(&pattern(t % 7), (t % 5 * 3) as usize, f64::from(t));
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&c, cfg).unwrap();
        let (mut r, _): (SdrClassifier, _) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(r, c);
        let (mut p1, mut p2) = (Vec::new(), Vec::new());
        for t in 50..300u32 {
            let (prev, bucket) = (pattern(t % 11), (t % 13 * 2) as usize);
            c.learn(&prev, bucket, f64::from(t));
            r.learn(&prev, bucket, f64::from(t));
            let cur = pattern(t % 11 + 1);
            assert_eq!(c.infer(&cur), r.infer(&cur));
            c.infer_probabilities(&cur, &mut p1);
            r.infer_probabilities(&cur, &mut p2);
            assert!(p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        assert_eq!(r, c);
    }

    #[test]
    fn invalid_params_are_named() {
        let bad = |p| SdrClassifier::new(10, p).unwrap_err().to_string();
        assert!(bad(ClassifierParams {
            alpha: 0.0,
            ..ClassifierParams::default()
        })
        .contains("`alpha`"));
        assert!(bad(ClassifierParams {
            act_value_alpha: 1.5,
            ..ClassifierParams::default()
        })
        .contains("`act_value_alpha`"));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn out_of_range_pattern_bit_panics() {
        let mut c = SdrClassifier::new(10, ClassifierParams::default()).unwrap();
        c.learn(&[10], 0, 1.0);
    }
}
