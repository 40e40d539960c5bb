//! NuPIC's anomaly likelihood: how unusual the recent raw anomaly scores are, given the
//! distribution of past ones.
//!
//! The raw anomaly score of an HTM is noisy: a stream that is never perfectly predictable
//! produces high raw scores all the time. The likelihood models the 10-record moving
//! average of raw scores as a normal distribution fitted on a sliding history, and reports
//! `L = 1 − Q`, where `Q` is the upper-tail probability of the current average. This
//! module reproduces NuPIC's `AnomalyLikelihood` class step by step — including its
//! quirks (the `1.4142` constant, the running-sum moving average, the flat-metric
//! override, the red-zone filter) — so that scores fed to NAB match NuPIC's numbers.

use std::collections::VecDeque;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Invalid [`LikelihoodParams`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LikelihoodParamError {
    /// A parameter that must be at least 1 is 0.
    #[error("anomaly likelihood: {0} must be >= 1")]
    Zero(&'static str),
    /// NuPIC refuses a history window shorter than the estimation sample.
    #[error(
        "anomaly likelihood: estimation_samples ({estimation_samples}) exceeds \
         historic_window_size ({historic_window_size})"
    )]
    WindowTooSmall {
        /// The offending `estimation_samples`.
        estimation_samples: u32,
        /// The offending `historic_window_size`.
        historic_window_size: u32,
    },
}

/// Parameters of [`AnomalyLikelihood`], with NuPIC's names and defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LikelihoodParams {
    /// Records during which the model is still learning; their raw scores are left out of
    /// the fitted distribution. NuPIC default 288.
    pub learning_period: u32,
    /// Records (after the learning period) used for the first fit. The likelihood is a
    /// flat 0.5 for the first `learning_period + estimation_samples` records. Default 100.
    pub estimation_samples: u32,
    /// Length of the sliding history the distribution is fitted on. Default 8640
    /// (a month of 5-minute records).
    pub historic_window_size: u32,
    /// The distribution is re-fitted whenever the record index is a multiple of this.
    /// Default 100.
    pub reestimation_period: u32,
    /// Length of the moving average of raw scores. Default 10.
    pub averaging_window: u32,
}

impl Default for LikelihoodParams {
    fn default() -> Self {
        LikelihoodParams {
            learning_period: 288,
            estimation_samples: 100,
            historic_window_size: 8640,
            reestimation_period: 100,
            averaging_window: 10,
        }
    }
}

impl LikelihoodParams {
    /// The settings NAB's numenta detector uses for a file of `rows` records: probation
    /// `P = min(floor(0.15·rows), 750)`, `learning_period = floor(P/2)`,
    /// `estimation_samples = P − floor(P/2)`, the other parameters at their defaults.
    pub fn for_nab(rows: usize) -> Self {
        let probation = (rows.saturating_mul(15) / 100).min(750) as u32;
        let learning_period = probation / 2;
        LikelihoodParams {
            learning_period,
            estimation_samples: probation - learning_period,
            ..LikelihoodParams::default()
        }
    }

    /// Checks the parameters, naming the first bad one.
    pub fn validate(&self) -> Result<(), LikelihoodParamError> {
        if self.historic_window_size == 0 {
            return Err(LikelihoodParamError::Zero("historic_window_size"));
        }
        if self.reestimation_period == 0 {
            return Err(LikelihoodParamError::Zero("reestimation_period"));
        }
        if self.averaging_window == 0 {
            return Err(LikelihoodParamError::Zero("averaging_window"));
        }
        if self.historic_window_size < self.estimation_samples {
            return Err(LikelihoodParamError::WindowTooSmall {
                estimation_samples: self.estimation_samples,
                historic_window_size: self.historic_window_size,
            });
        }
        Ok(())
    }

    /// Records answered with a flat 0.5 before the first fit.
    pub fn probationary_period(&self) -> u64 {
        u64::from(self.learning_period) + u64::from(self.estimation_samples)
    }
}

/// A fitted normal distribution of moving-average raw scores.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Mean (floored at 0.03 for fitted distributions).
    pub mean: f64,
    /// Population variance (floored at 0.0003 for fitted distributions).
    pub variance: f64,
    /// `sqrt(variance)`.
    pub stdev: f64,
}

impl Distribution {
    /// NuPIC's "null" distribution: so broad that every score in `[0, 1]` has a tail
    /// probability of about 0.5. Used when there is too little data or the metric is flat.
    pub const NULL: Distribution = Distribution {
        mean: 0.5,
        variance: 1e6,
        stdev: 1e3,
    };

    /// Probability of a sample at least as far from the mean as `x`, on the side of `x`
    /// (NuPIC's `tailProbability`). NuPIC divides by the literal `1.4142` rather than √2;
    /// kept for fidelity.
    pub fn tail_probability(&self, x: f64) -> f64 {
        // Reflecting values below the mean makes the test symmetric, as in NuPIC.
        let x = if x < self.mean {
            2.0 * self.mean - x
        } else {
            x
        };
        let z = (x - self.mean) / self.stdev;
        0.5 * libm::erfc(z / NUPIC_SQRT_2)
    }
}

/// NuPIC's truncated √2 in `tailProbability`; deliberately not the exact constant.
#[allow(clippy::approx_constant)]
const NUPIC_SQRT_2: f64 = 1.4142;
/// Below this (unfiltered) tail probability a record is in NuPIC's "red zone"
/// (`1 − 0.99999`, computed in f64 as NuPIC does).
const RED_ZONE: f64 = 1.0 - 0.99999;
/// What a second consecutive red-zone tail probability is raised to (`1 − 0.999`).
const YELLOW_ZONE: f64 = 1.0 - 0.999;
/// Metric values whose variance over the fitted history is below this count as flat.
const FLAT_METRIC_VARIANCE: f64 = 1.5e-5;
/// Lower bounds NuPIC applies to a fitted distribution so that a near-perfectly
/// predictable stream does not turn the slightest blip into a red alert.
const MIN_MEAN: f64 = 0.03;
const MIN_VARIANCE: f64 = 0.0003;

/// Online anomaly likelihood of one metric (NuPIC's `AnomalyLikelihood`).
///
/// Feed every record's metric value and raw anomaly score to
/// [`anomaly_probability`](Self::anomaly_probability); NAB reports
/// [`log_likelihood`] of the result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnomalyLikelihood {
    params: LikelihoodParams,
    /// Records seen so far.
    iteration: u64,
    /// Sliding history of `(metric value, raw score)`, oldest first, at most
    /// `historic_window_size` long. The current record joins only after it is scored.
    history: History,
    /// The fitted distribution; `None` until the probation period is over.
    distribution: Option<Distribution>,
    /// Last `averaging_window` raw scores and their running sum. The sum is maintained by
    /// subtracting the dropped score and adding the new one (not recomputed), exactly as
    /// NuPIC does, so its rounding drift is reproduced too.
    ma_window: VecDeque<f64>,
    ma_total: f64,
    /// Last `averaging_window` *unfiltered* tail probabilities (the filter looks back at
    /// the previous one).
    recent_tail: VecDeque<f64>,
}

impl AnomalyLikelihood {
    /// A fresh estimator.
    ///
    /// # Panics
    /// If `params` is invalid (see [`LikelihoodParams::validate`]).
    pub fn new(params: LikelihoodParams) -> Self {
        if let Err(e) = params.validate() {
            panic!("{e}");
        }
        let window = params.averaging_window as usize;
        AnomalyLikelihood {
            iteration: 0,
            // Grown as records arrive (see `anomaly_probability`): a young network of a
            // detector holding thousands should not carry a full window it does not use.
            history: History::default(),
            distribution: None,
            ma_window: VecDeque::with_capacity(window),
            ma_total: 0.0,
            recent_tail: VecDeque::with_capacity(window + 1),
            params,
        }
    }

    /// Heap bytes held (capacity-based), for memory reporting.
    pub fn heap_bytes(&self) -> usize {
        self.history.heap_bytes() + 8 * (self.ma_window.capacity() + self.recent_tail.capacity())
    }

    /// The parameters.
    pub fn params(&self) -> &LikelihoodParams {
        &self.params
    }

    /// Number of records seen.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The distribution currently in use, once probation is over.
    pub fn distribution(&self) -> Option<&Distribution> {
        self.distribution.as_ref()
    }

    /// Scores one record and returns its anomaly likelihood `L` in `[0, 1]`: 0.5 during
    /// probation, then `1 − Q` where `Q` is the (filtered) tail probability of the current
    /// moving average of raw scores. Values near 1 mean "this much unpredictability is
    /// rare". `value` is the metric itself; it only serves to detect a flat metric.
    pub fn anomaly_probability(&mut self, value: f64, raw_score: f64) -> f64 {
        let likelihood = if self.iteration < self.params.probationary_period() {
            0.5
        } else {
            if self.distribution.is_none()
                || self
                    .iteration
                    .is_multiple_of(u64::from(self.params.reestimation_period))
            {
                self.reestimate();
            }
            1.0 - self.update(raw_score)
        };
        let full = self.params.historic_window_size as usize;
        if self.history.len() == full {
            self.history.pop_front();
        } else if self.history.len() == self.history.capacity() {
            // Doubling, but never past the window (plain doubling would end at 16,384
            // entries for NuPIC's 8,640).
            let want = (2 * self.history.len()).max(64).min(full);
            self.history.reserve_exact(want - self.history.len());
        }
        self.history.push_back(value, raw_score);
        self.iteration += 1;
        likelihood
    }

    /// Pushes `raw_score` into the moving average and returns the filtered tail
    /// probability of the new average (NuPIC's `updateAnomalyLikelihoods` for one record).
    fn update(&mut self, raw_score: f64) -> f64 {
        let window = self.params.averaging_window as usize;
        let average =
            moving_average_push(&mut self.ma_window, &mut self.ma_total, raw_score, window);
        let distribution = self.distribution.unwrap_or(Distribution::NULL);
        let tail = distribution.tail_probability(average);
        // Two red-zone records in a row: the second is reported as merely "yellow", so an
        // alert fires on the sharp rise rather than on every record of a plateau. The
        // comparison uses the previous *unfiltered* value.
        let filtered = match self.recent_tail.back() {
            Some(&previous) if tail <= RED_ZONE && previous <= RED_ZONE => YELLOW_ZONE,
            _ => tail,
        };
        if self.recent_tail.len() == window {
            self.recent_tail.pop_front();
        }
        self.recent_tail.push_back(tail);
        filtered
    }

    /// Re-fits the distribution on the history (NuPIC's `estimateAnomalyLikelihoods`,
    /// called with the skip count of `_calcSkipRecords`). O(history). Its buffers live only
    /// for the call (a refit comes every `reestimation_period` records): kept, they would
    /// double the memory of the estimator.
    fn reestimate(&mut self) {
        let window = self.params.averaging_window as usize;
        let skip = skip_records(
            self.iteration,
            self.params.historic_window_size,
            self.params.learning_period,
        );

        // Moving averages over the whole history, from an empty window, as NuPIC does;
        // the window and its running sum become the live moving-average state.
        let mut averages = Vec::with_capacity(self.history.len());
        let mut values = Vec::with_capacity(self.history.len());
        self.history.values.extend_into(&mut values);
        self.history.scores.extend_into(&mut averages);
        self.ma_window.clear();
        self.ma_total = 0.0;
        // The scores become their moving averages in place.
        for a in &mut averages {
            *a = moving_average_push(&mut self.ma_window, &mut self.ma_total, *a, window);
        }

        let distribution = if averages.len() <= skip {
            Distribution::NULL
        } else {
            let (mean, variance) = numpy_mean_var(&averages[skip..]);
            let mean = mean.max(MIN_MEAN);
            let variance = variance.max(MIN_VARIANCE);
            // NuPIC's flat-metric override: a constant metric gives unstable SDRs through
            // the time encoder alone, so its raw scores are not trusted.
            let (_, metric_variance) = numpy_mean_var(&values[skip..]);
            if metric_variance < FLAT_METRIC_VARIANCE {
                Distribution::NULL
            } else {
                Distribution {
                    mean,
                    variance,
                    stdev: variance.sqrt(),
                }
            }
        };
        self.distribution = Some(distribution);

        // The filter's look-back restarts from the tail probabilities of the last
        // averages under the *new* distribution.
        self.recent_tail.clear();
        let start = averages.len().saturating_sub(window);
        for &average in &averages[start..] {
            self.recent_tail
                .push_back(distribution.tail_probability(average));
        }
    }
}

/// One column of the history: as a byte per value indexing the distinct values seen, while
/// there are at most [`Column::MAX_DISTINCT`] of them (an HTM's raw scores are fractions of
/// its active columns, a few dozen values), an eighth of the memory of `f64`; then as `u16`
/// while every value it holds is a whole number that fits (counts, as many metrics are); then
/// in `f32` while every value is one exactly, half the memory of `f64`, in which it is kept
/// from the first value that is not. Values read back bit for bit whatever the form.
#[derive(Clone, Debug)]
enum Column {
    /// Per value, its index in the distinct values (which are never dropped: they are few).
    Coded(VecDeque<u8>, Vec<f64>),
    /// Whole numbers in `0..=65535`.
    Int(VecDeque<u16>),
    Narrow(VecDeque<f32>),
    Wide(VecDeque<f64>),
}

impl Default for Column {
    fn default() -> Self {
        Column::Coded(VecDeque::new(), Vec::new())
    }
}

impl Column {
    const MAX_DISTINCT: usize = 1 << u8::BITS;

    fn push_back(&mut self, x: f64) {
        match self {
            Column::Coded(codes, distinct) => {
                let code = match distinct.iter().position(|d| d.to_bits() == x.to_bits()) {
                    Some(i) => Some(i),
                    None if distinct.len() < Self::MAX_DISTINCT => {
                        distinct.push(x);
                        Some(distinct.len() - 1)
                    }
                    None => None,
                };
                if let Some(code) = code {
                    return codes.push_back(code as u8);
                }
            }
            Column::Int(v) if is_u16(x) => return v.push_back(x as u16),
            Column::Narrow(v) if is_f32(x) => return v.push_back(x as f32),
            Column::Wide(v) => return v.push_back(x),
            _ => {}
        }
        // `x` does not fit this form: the narrowest plain one that holds it and the rest.
        let mut values = Vec::with_capacity(self.capacity().max(self.len() + 1));
        self.extend_into(&mut values);
        values.push(x);
        let mut plain = if values.iter().all(|&v| is_u16(v)) {
            Column::Int(values.iter().map(|&v| v as u16).collect())
        } else if values.iter().all(|&v| is_f32(v)) {
            Column::Narrow(values.iter().map(|&v| v as f32).collect())
        } else {
            Column::Wide(values.into_iter().collect())
        };
        plain.reserve_exact(self.capacity().saturating_sub(plain.len()));
        *self = plain;
    }

    fn len(&self) -> usize {
        match self {
            Column::Coded(v, _) => v.len(),
            Column::Int(v) => v.len(),
            Column::Narrow(v) => v.len(),
            Column::Wide(v) => v.len(),
        }
    }

    fn pop_front(&mut self) {
        match self {
            Column::Coded(v, _) => drop(v.pop_front()),
            Column::Int(v) => drop(v.pop_front()),
            Column::Narrow(v) => drop(v.pop_front()),
            Column::Wide(v) => drop(v.pop_front()),
        }
    }

    fn reserve_exact(&mut self, extra: usize) {
        match self {
            Column::Coded(v, _) => v.reserve_exact(extra),
            Column::Int(v) => v.reserve_exact(extra),
            Column::Narrow(v) => v.reserve_exact(extra),
            Column::Wide(v) => v.reserve_exact(extra),
        }
    }

    fn capacity(&self) -> usize {
        match self {
            Column::Coded(v, _) => v.capacity(),
            Column::Int(v) => v.capacity(),
            Column::Narrow(v) => v.capacity(),
            Column::Wide(v) => v.capacity(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Column::Coded(v, distinct) => v.capacity() + 8 * distinct.capacity(),
            Column::Int(v) => 2 * v.capacity(),
            Column::Narrow(v) => 4 * v.capacity(),
            Column::Wide(v) => 8 * v.capacity(),
        }
    }

    /// Appends the values, oldest first, to `out`.
    fn extend_into(&self, out: &mut Vec<f64>) {
        match self {
            Column::Coded(v, distinct) => out.extend(v.iter().map(|&c| distinct[usize::from(c)])),
            Column::Int(v) => out.extend(v.iter().map(|&x| f64::from(x))),
            Column::Narrow(v) => out.extend(v.iter().map(|&x| f64::from(x))),
            Column::Wide(v) => out.extend(v.iter().copied()),
        }
    }

    fn get(&self, i: usize) -> Option<f64> {
        match self {
            Column::Coded(v, distinct) => v.get(i).map(|&c| distinct[usize::from(c)]),
            Column::Int(v) => v.get(i).map(|&x| f64::from(x)),
            Column::Narrow(v) => v.get(i).map(|&x| f64::from(x)),
            Column::Wide(v) => v.get(i).copied(),
        }
    }
}

/// Whether `x` is a whole number that `u16` holds (bit for bit: not -0.0).
fn is_u16(x: f64) -> bool {
    f64::from(x as u16).to_bits() == x.to_bits()
}

/// Whether `x` is an `f32` exactly.
fn is_f32(x: f64) -> bool {
    f64::from(x as f32).to_bits() == x.to_bits()
}

/// The likelihood's sliding history of `(metric value, raw score)`, as two [`Column`]s. Its
/// checkpoint form is the sequence of pairs, whatever the columns' widths.
#[derive(Clone, Debug, Default)]
struct History {
    values: Column,
    scores: Column,
    len: usize,
}

impl History {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.values.capacity().min(self.scores.capacity())
    }

    fn reserve_exact(&mut self, extra: usize) {
        self.values.reserve_exact(extra);
        self.scores.reserve_exact(extra);
    }

    fn push_back(&mut self, value: f64, score: f64) {
        self.values.push_back(value);
        self.scores.push_back(score);
        self.len += 1;
    }

    fn pop_front(&mut self) {
        if self.len > 0 {
            self.values.pop_front();
            self.scores.pop_front();
            self.len -= 1;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.values.heap_bytes() + self.scores.heap_bytes()
    }

    /// The pairs, oldest first.
    fn iter(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        (0..self.len).map(|i| {
            let get = |c: &Column| c.get(i).expect("columns as long as the history");
            (get(&self.values), get(&self.scores))
        })
    }
}

/// Bit-for-bit content equality, whatever the columns' widths.
impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .iter()
                .zip(other.iter())
                .all(|(a, b)| a.0.to_bits() == b.0.to_bits() && a.1.to_bits() == b.1.to_bits())
    }
}

impl Serialize for History {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for History {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pairs: Vec<(f64, f64)> = Vec::deserialize(d)?;
        let mut h = History::default();
        h.reserve_exact(pairs.len());
        for (value, score) in pairs {
            h.push_back(value, score);
        }
        Ok(h)
    }
}

/// How many of the oldest history records to leave out of a fit (NuPIC's
/// `_calcSkipRecords`): the learning period, minus the records of it that have already
/// slid out of the history window, and never more than what was ingested.
fn skip_records(ingested: u64, window: u32, learning_period: u32) -> usize {
    let shifted_out = ingested.saturating_sub(u64::from(window));
    ingested.min(u64::from(learning_period).saturating_sub(shifted_out)) as usize
}

/// NuPIC's `MovingAverage.compute`: drop the oldest value when the window is full
/// (subtracting it from the running sum), append the new one, return `sum / len`.
fn moving_average_push(
    window: &mut VecDeque<f64>,
    total: &mut f64,
    value: f64,
    size: usize,
) -> f64 {
    if window.len() == size {
        if let Some(oldest) = window.pop_front() {
            *total -= oldest;
        }
    }
    window.push_back(value);
    *total += value;
    *total / window.len() as f64
}

/// Converts a likelihood to NAB's log scale: `ln(1.0000000001 − L) / ln(1e−10)`, so 0.5
/// maps to ≈0.03, 0.99999 to ≈0.5 and 1 to 1. Spreads the interesting 0.999… region
/// over `[0, 1]` for thresholding.
pub fn log_likelihood(l: f64) -> f64 {
    (1.0000000001 - l).ln() / -23.02585084720009
}

/// numpy's buffer size: its reductions visit the input in chunks of this many elements.
const NUMPY_CHUNK: usize = 8192;

/// `numpy.mean` and `numpy.var` (population) of `xs`, summed the way numpy sums: pairwise
/// within each buffer-sized chunk, chunks added in order. Matching numpy's summation order
/// keeps the fitted distribution equal to NuPIC's to the last bit, not merely close.
fn numpy_mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = numpy_sum(xs, |x| x) / n;
    let variance = numpy_sum(xs, |x| {
        let d = x - mean;
        d * d
    }) / n;
    (mean, variance)
}

fn numpy_sum(xs: &[f64], f: impl Fn(f64) -> f64 + Copy) -> f64 {
    let mut total = 0.0;
    for chunk in xs.chunks(NUMPY_CHUNK) {
        total += pairwise_sum(chunk, f);
    }
    total
}

/// numpy's pairwise summation: plain loop below 8 elements, eight interleaved
/// accumulators up to 128, otherwise split at a multiple of 8 near the middle.
fn pairwise_sum(a: &[f64], f: impl Fn(f64) -> f64 + Copy) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += f(x);
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        for (acc, &x) in r.iter_mut().zip(&a[..8]) {
            *acc = f(x);
        }
        let whole = n - n % 8;
        let mut i = 8;
        while i < whole {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += f(a[i + j]);
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[whole..] {
            res += f(x);
        }
        res
    } else {
        let mut half = n / 2;
        half -= half % 8;
        pairwise_sum(&a[..half], f) + pairwise_sum(&a[half..], f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Random;

    fn small_params() -> LikelihoodParams {
        LikelihoodParams {
            learning_period: 2,
            estimation_samples: 3,
            historic_window_size: 8640,
            reestimation_period: 100,
            averaging_window: 10,
        }
    }

    #[test]
    fn defaults_and_nab_settings() {
        let p = LikelihoodParams::default();
        assert_eq!(
            (
                p.learning_period,
                p.estimation_samples,
                p.historic_window_size,
                p.reestimation_period,
                p.averaging_window
            ),
            (288, 100, 8640, 100, 10)
        );
        // 4032 rows: P = floor(604.8) = 604 → 302 + 302.
        let p = LikelihoodParams::for_nab(4032);
        assert_eq!((p.learning_period, p.estimation_samples), (302, 302));
        // 1625 rows: P = 243 → 121 + 122.
        let p = LikelihoodParams::for_nab(1625);
        assert_eq!((p.learning_period, p.estimation_samples), (121, 122));
        // Long files are capped at P = 750.
        let p = LikelihoodParams::for_nab(22696);
        assert_eq!((p.learning_period, p.estimation_samples), (375, 375));
        assert_eq!(p.probationary_period(), 750);
        assert_eq!(p.historic_window_size, 8640);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn validate_names_the_bad_parameter() {
        let bad = LikelihoodParams {
            reestimation_period: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("reestimation_period"));
        let bad = LikelihoodParams {
            averaging_window: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("averaging_window"));
        let bad = LikelihoodParams {
            historic_window_size: 50,
            ..Default::default()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("estimation_samples") && msg.contains("historic_window_size"));
    }

    #[test]
    fn log_likelihood_reference_points() {
        assert!((log_likelihood(0.5) - 0.030_102_999_665_883_4).abs() < 1e-15);
        assert!((log_likelihood(0.99999) - 0.499_999_567_504_534).abs() < 1e-12);
        assert!((log_likelihood(1.0) - 1.0).abs() < 1e-15);
        assert!(log_likelihood(0.0).abs() < 1e-10);
        // Monotone increasing.
        assert!(log_likelihood(0.9) < log_likelihood(0.99));
    }

    #[test]
    fn tail_probability_is_symmetric_and_uses_nupic_constant() {
        let d = Distribution {
            mean: 0.25,
            variance: 0.0625,
            stdev: 0.25,
        };
        assert_eq!(d.tail_probability(0.25), 0.5);
        // 0.125 below the mean is reflected to 0.125 above it (all exact in binary).
        assert_eq!(d.tail_probability(0.125), d.tail_probability(0.375));
        // z = 1: 0.5·erfc(1/1.4142) (not 1/√2); Python: 0.5*math.erfc(1/1.4142).
        let q = d.tail_probability(0.5);
        assert!((q - 0.158_652_933_409_955_1).abs() < 1e-15, "{q}");
        assert!(q < 0.5 * libm::erfc(std::f64::consts::FRAC_1_SQRT_2));
        // erfc precision in the far tail: 0.5·erfc(10/1.4142) ≈ 7.61e-24 (Python).
        let far = Distribution {
            mean: 0.0,
            variance: 1.0,
            stdev: 1.0,
        }
        .tail_probability(10.0);
        assert!(
            (far / 7.612_477_335_197_422e-24 - 1.0).abs() < 1e-9,
            "{far}"
        );
    }

    #[test]
    fn numpy_style_sums() {
        // Below 8 elements and at the block boundaries the result is the exact sum here.
        let xs: Vec<f64> = (1..=300).map(f64::from).collect();
        for n in [0, 1, 7, 8, 9, 127, 128, 129, 300] {
            let exact = (n * (n + 1) / 2) as f64;
            assert_eq!(numpy_sum(&xs[..n], |x| x), exact, "n = {n}");
        }
        let (m, v) = numpy_mean_var(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((m, v), (2.5, 1.25));
        // Pairwise order: with 16 × 0.1 the 8 accumulators each hold 0.1 + 0.1.
        let tenths = [0.1f64; 16];
        let by_pairs = {
            let r = 0.1f64 + 0.1;
            ((r + r) + (r + r)) + ((r + r) + (r + r))
        };
        assert_eq!(numpy_sum(&tenths, |x| x), by_pairs);
    }

    #[test]
    fn probation_returns_half_and_still_records_history() {
        let mut l = AnomalyLikelihood::new(small_params());
        for i in 0..5 {
            assert_eq!(l.anomaly_probability(i as f64, 0.9), 0.5);
        }
        assert_eq!(l.iteration(), 5);
        assert_eq!(l.history.len(), 5);
        assert!(l.distribution().is_none());
        // History averages are all 0.9 (variance floored to 0.0003); an average of
        // (4.5 + 0.1)/6 ≈ 0.767 lies ~7.7 σ below the mean.
        assert!(l.anomaly_probability(5.0, 0.1) > 0.99);
        assert!(l.distribution().is_some());
    }

    /// A tiny case worked by hand. learning_period 2, estimation_samples 3 → records 0..4
    /// give 0.5. Raw scores 0, 0, 0.6, 0.2, 0.7 (values 1..5).
    ///
    /// Record 5 (iteration 5 ≥ 5, no distribution yet) re-estimates first:
    /// skip = min(5, max(0, 2 − max(0, 5 − 8640))) = 2.
    /// Moving averages over the history: 0/1, 0/2, 0.6/3 = 0.2, 0.8/4 = 0.2, 1.5/5 = 0.3.
    /// Fit on averages[2..] = [0.2, 0.2, 0.3]: mean = 0.7/3 = 7/30 ≈ 0.233333 (≥ 0.03),
    /// variance = ((1/30)² + (1/30)² + (2/30)²)/3 = 6/2700 = 1/450 ≈ 0.00222222 (≥ 0.0003),
    /// stdev = 1/√450 ≈ 0.0471405. Metric values[2..] = 3, 4, 5: variance 2/3 ≥ 1.5e−5,
    /// so the fitted distribution stands.
    ///
    /// Record 5, raw 1.0: window now holds 6 scores, total 1.5 + 1 = 2.5, average 2.5/6 =
    /// 5/12. z = (5/12 − 7/30)/stdev = (11/60)·√450 = 3.8890873; Q5 = 0.5·erfc(z/1.4142)
    /// = 0.5·erfc(2.7500264) = 5.0303e−5 (Python math.erfc). The previous unfiltered Q is
    /// the tail of the last average 0.3: z = (1/15)·√450 = √2, Q = 0.5·erfc(√2/1.4142) =
    /// 0.078648; not red, so L5 = 1 − Q5 = 0.99994970.
    /// Record 6, raw 1.0: average 3.5/7 = 0.5, z = (8/30)·√450 = 5.6568542,
    /// Q6 = 0.5·erfc(4.0000384) = 7.7062e−9 ≤ 1e−5 but Q5 > 1e−5: unfiltered, L6 = 1 − Q6.
    /// Record 7, raw 1.0: average 4.5/8 = 0.5625, z = (79/240)·√450 = 6.9827, Q7 = 1.45e−12:
    /// red after red → reported as 1e−3, L7 = 0.999.
    #[test]
    fn hand_checked_small_case() {
        let mut l = AnomalyLikelihood::new(small_params());
        let scores = [0.0, 0.0, 0.6, 0.2, 0.7];
        for (i, &s) in scores.iter().enumerate() {
            assert_eq!(l.anomaly_probability((i + 1) as f64, s), 0.5);
        }
        let l5 = l.anomaly_probability(6.0, 1.0);
        let d = *l.distribution().unwrap();
        assert!((d.mean - 7.0 / 30.0).abs() < 1e-12, "{d:?}");
        assert!((d.variance - 1.0 / 450.0).abs() < 1e-12, "{d:?}");
        assert!((d.stdev - (1.0f64 / 450.0).sqrt()).abs() < 1e-12, "{d:?}");
        // Python: 1 - 0.5*math.erfc((5/12 - 7/30)/math.sqrt(1/450)/1.4142)
        assert!((l5 - 0.999_949_696_769_289_1).abs() < 1e-12, "{l5}");
        let l6 = l.anomaly_probability(7.0, 1.0);
        // Python: 1 - 0.5*math.erfc((0.5 - 7/30)/math.sqrt(1/450)/1.4142)
        assert!((l6 - 0.999_999_992_293_806_2).abs() < 1e-12, "{l6}");
        let l7 = l.anomaly_probability(8.0, 1.0);
        assert_eq!(l7, 1.0 - YELLOW_ZONE);
        assert!((l7 - 0.999).abs() < 1e-15);
        // The stored look-back holds the unfiltered value, so the next red record is
        // filtered again.
        assert!(*l.recent_tail.back().unwrap() < 1e-11);
        assert_eq!(l.anomaly_probability(9.0, 1.0), 1.0 - YELLOW_ZONE);
    }

    #[test]
    fn skip_record_counts() {
        // (ingested, window, learning period) → skip.
        assert_eq!(skip_records(5, 10, 10), 5); // fewer ingested than learning period
        assert_eq!(skip_records(10, 15, 10), 10);
        assert_eq!(skip_records(10, 10, 0), 0);
        assert_eq!(skip_records(10, 10, 10), 10);
        assert_eq!(skip_records(14, 10, 10), 6); // 4 learning records slid out
        assert_eq!(skip_records(20, 10, 10), 0);
        assert_eq!(skip_records(25, 10, 10), 0);
        assert_eq!(skip_records(4, 3, 2), 1);
    }

    #[test]
    fn skip_records_shrink_once_history_slides() {
        // learning_period 4, window 6: at iteration 27, 21 records have been shifted out,
        // skip = min(27, max(0, 4 − 21)) = 0, so all 6 history averages are fitted.
        let params = LikelihoodParams {
            learning_period: 4,
            estimation_samples: 2,
            historic_window_size: 6,
            reestimation_period: 3,
            averaging_window: 2,
        };
        let mut l = AnomalyLikelihood::new(params.clone());
        let mut rng = Random::new(3);
        for i in 0..27 {
            l.anomaly_probability(f64::from(i), rng.real());
            assert!(l.history.len() <= 6);
        }
        let scores: Vec<f64> = l.history.iter().map(|h| h.1).collect();
        assert!(
            matches!(l.history.scores, Column::Coded(..)),
            "a few random scores are coded, exactly"
        );
        l.anomaly_probability(27.0, 0.5);
        // Window-2 moving averages of the 6 stored scores (the first one alone).
        let mut averages = vec![scores[0]];
        averages.extend(scores.windows(2).map(|w| (w[0] + w[1]) / 2.0));
        let mean = averages.iter().sum::<f64>() / 6.0;
        let var = averages.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 6.0;
        let d = *l.distribution().unwrap();
        assert!((d.mean - mean.max(0.03)).abs() < 1e-12, "{d:?} vs {mean}");
        assert!(
            (d.variance - var.max(0.0003)).abs() < 1e-12,
            "{d:?} vs {var}"
        );

        // Before any record is shifted out the skip is the whole learning period:
        // at iteration 6 (window 6, nothing shifted) skip = 4 → fit on averages[4..6].
        let mut l = AnomalyLikelihood::new(params);
        let raw = [0.9, 0.9, 0.9, 0.9, 0.1, 0.5];
        for (i, &r) in raw.iter().enumerate() {
            l.anomaly_probability(i as f64, r);
        }
        l.anomaly_probability(6.0, 0.0);
        // Averages[4] = (0.9 + 0.1)/2 = 0.5, averages[5] = (0.1 + 0.5)/2 = 0.3:
        // mean 0.4, variance 0.01.
        let d = *l.distribution().unwrap();
        assert!(
            (d.mean - 0.4).abs() < 1e-12 && (d.variance - 0.01).abs() < 1e-12,
            "{d:?}"
        );
    }

    #[test]
    fn reestimation_uses_history_of_previous_records_only() {
        // After probation, re-estimation happens at multiples of reestimation_period and
        // sees exactly the records before the current one.
        let params = LikelihoodParams {
            learning_period: 0,
            estimation_samples: 10,
            historic_window_size: 100,
            reestimation_period: 20,
            averaging_window: 1,
        };
        let mut l = AnomalyLikelihood::new(params);
        for i in 0..20u32 {
            // Alternating 0/1 raw scores; values vary.
            l.anomaly_probability(f64::from(i), f64::from(i % 2));
        }
        // First fit at iteration 10 on 10 records: averages (window 1) = 0,1,…: mean 0.5,
        // variance 0.25. Iteration 20 re-fits on 20 records: same numbers.
        let d = *l.distribution().unwrap();
        assert_eq!((d.mean, d.variance, d.stdev), (0.5, 0.25, 0.5));
        l.anomaly_probability(20.0, 1.0);
        let d = *l.distribution().unwrap();
        assert_eq!((d.mean, d.variance), (0.5, 0.25));
    }

    fn run_low_then_jump(l: &mut AnomalyLikelihood, rng: &mut Random) -> Vec<f64> {
        for i in 0..2000 {
            let value = (f64::from(i) * 0.1).sin() * 10.0;
            let l_i = l.anomaly_probability(value, rng.real() * 0.1);
            if i >= 388 {
                assert!(l_i < 0.999, "false alarm at {i}: {l_i}");
            }
        }
        (0..5)
            .map(|i| l.anomaly_probability(100.0 + f64::from(i), 1.0))
            .collect()
    }

    #[test]
    fn sustained_jump_after_stable_low_scores_is_likely_anomalous() {
        let mut l = AnomalyLikelihood::new(LikelihoodParams::default());
        let mut rng = Random::new(11);
        let after = run_low_then_jump(&mut l, &mut rng);
        let d = *l.distribution().unwrap();
        assert!(d.mean < 0.06 && d.mean > 0.04, "{d:?}");
        // One record of 1.0 lifts the 10-average by ~0.1 ≈ 5 stdev (floored 0.0173).
        assert!(after[0] > 0.999, "{after:?}");
        assert!(after[..3].iter().all(|&x| x >= 0.999), "{after:?}");
        assert!(log_likelihood(after[0]) > 0.3);
    }

    #[test]
    fn flat_metric_gives_null_distribution() {
        let mut l = AnomalyLikelihood::new(LikelihoodParams::default());
        let mut rng = Random::new(5);
        for i in 0..1500 {
            let raw = if i % 50 == 0 { 1.0 } else { rng.real() * 0.2 };
            let li = l.anomaly_probability(42.0, raw);
            // Under mean 0.5, stdev 1000 every average is within 0.0005 σ: L ≈ 0.5.
            assert!((li - 0.5).abs() < 1e-3, "{i}: {li}");
        }
        assert_eq!(*l.distribution().unwrap(), Distribution::NULL);
    }

    #[test]
    fn too_little_history_gives_null_distribution() {
        // estimation_samples 0: first fit at iteration = learning_period = skip, so
        // len(history) <= skip → null distribution.
        let params = LikelihoodParams {
            learning_period: 5,
            estimation_samples: 0,
            ..Default::default()
        };
        let mut l = AnomalyLikelihood::new(params);
        for i in 0..5 {
            assert_eq!(l.anomaly_probability(f64::from(i), 0.3), 0.5);
        }
        let li = l.anomaly_probability(9.0, 1.0);
        assert_eq!(*l.distribution().unwrap(), Distribution::NULL);
        assert!((li - 0.5).abs() < 1e-3);
    }

    /// A column holds what a plain `f64` queue does through every change of form.
    #[test]
    fn columns_read_back_as_plain_queues_through_every_form() {
        let mut rng = Random::new(5);
        // (distinct values, scale, when the values stop being f32, the final form)
        let cases = [
            (40, 1.0 / 32.0, None, "coded"),
            (300, 1.0, None, "int"),
            (300, 1000.0, None, "narrow"),
            (300, 1.0 / 32.0, None, "narrow"),
            (300, 1.0, Some(900), "wide"),
        ];
        for (distinct, scale, wide_after, expected) in cases {
            let mut c = Column::default();
            let mut model = VecDeque::new();
            for i in 0..2000 {
                let k = f64::from(rng.below(distinct));
                let v = match wide_after {
                    Some(n) if i >= n => k + 0.1,
                    _ => k * scale,
                };
                c.push_back(v);
                model.push_back(v);
                if i % 3 == 0 {
                    c.pop_front();
                    model.pop_front();
                }
                let mut out = Vec::new();
                c.extend_into(&mut out);
                assert!(out
                    .iter()
                    .zip(&model)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                assert_eq!(out.len(), model.len());
                assert_eq!(c.get(out.len() / 2), model.get(out.len() / 2).copied());
            }
            let form = match c {
                Column::Coded(..) => "coded",
                Column::Int(_) => "int",
                Column::Narrow(_) => "narrow",
                Column::Wide(_) => "wide",
            };
            assert_eq!(form, expected, "{distinct} values × {scale}");
        }
        // -0.0 is no u16.
        let mut c = Column::Int(VecDeque::new());
        c.push_back(-0.0);
        assert!(matches!(c, Column::Narrow(_)) && c.get(0).unwrap().is_sign_negative());
    }

    #[test]
    fn history_is_narrow_while_exact_and_reads_back_bit_for_bit() {
        let mut h = History::default();
        let pairs = [
            (3.0, 0.25),
            (-7.5, 0.125),
            (2f64.powi(100), 1.0),
            (0.1, 0.5),
            (2.0, 0.1),
        ];
        // More distinct values than a byte indexes: plain numbers from then on.
        for i in 0..=Column::MAX_DISTINCT {
            h.push_back(i as f64 + 0.5, i as f64 / 1024.0);
        }
        for _ in 0..=Column::MAX_DISTINCT {
            h.pop_front();
        }
        assert!(matches!(h.values, Column::Narrow(_)) && matches!(h.scores, Column::Narrow(_)));
        for (i, &(v, s)) in pairs.iter().enumerate() {
            h.push_back(v, s);
            // 0.1 is no f32: the values widen at the fourth pair, the scores at the fifth.
            assert_eq!(matches!(h.values, Column::Wide(_)), i >= 3, "values at {i}");
            assert_eq!(matches!(h.scores, Column::Wide(_)), i >= 4, "scores at {i}");
            let back: Vec<(f64, f64)> = h.iter().collect();
            assert_eq!(back, pairs[..=i]);
        }
        h.pop_front();
        assert_eq!(h.len(), 4);
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&h, cfg).unwrap();
        // The checkpoint form is the pairs, whatever the widths.
        assert_eq!(
            bytes,
            bincode::serde::encode_to_vec(&pairs[1..], cfg).unwrap()
        );
        let (back, _): (History, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, h);
        // Counts take 2 bytes, raw scores as an HTM gives them (fractions of its active
        // columns) a byte: 3 of the 16 bytes of a pair of f64.
        let mut n = History::default();
        n.reserve_exact(8640);
        for i in 0..8640 {
            n.push_back(f64::from(i), f64::from((i % 41) as f32 / 40.0));
        }
        assert!(matches!(n.scores, Column::Coded(..)) && matches!(n.values, Column::Int(_)));
        assert!(n.heap_bytes() <= 3 * 8640 + 2048, "{}", n.heap_bytes());
    }

    #[test]
    fn red_zone_filter_caps_second_consecutive_tiny_tail() {
        let mut l = AnomalyLikelihood::new(LikelihoodParams::default());
        l.distribution = Some(Distribution {
            mean: 0.03,
            variance: 0.0003,
            stdev: 0.0003f64.sqrt(),
        });
        l.iteration = 1001; // not a re-estimation step
        l.history.push_back(1.0, 0.0);
        l.recent_tail.push_back(0.3); // previous record not red
                                      // Window of ten 1.0 → average 1.0, z ≈ 56: Q ≈ 0.
        for _ in 0..10 {
            l.ma_window.push_back(1.0);
        }
        l.ma_total = 10.0;
        let first = l.anomaly_probability(1.0, 1.0);
        assert_eq!(first, 1.0, "first red record passes unfiltered");
        let second = l.anomaly_probability(2.0, 1.0);
        assert_eq!(second, 1.0 - YELLOW_ZONE);
        // Back out of the red zone: no filtering.
        let mut calm = l.clone();
        for _ in 0..10 {
            calm.anomaly_probability(3.0, 0.03);
        }
        let back = calm.anomaly_probability(3.0, 0.03);
        assert!(back < 0.6, "{back}");
    }

    #[test]
    fn serde_round_trip_continues_bit_identically() {
        let mut a = AnomalyLikelihood::new(LikelihoodParams {
            learning_period: 50,
            estimation_samples: 50,
            historic_window_size: 300,
            reestimation_period: 37,
            averaging_window: 10,
        });
        let mut rng = Random::new(9);
        for i in 0..450 {
            a.anomaly_probability(f64::from(i % 17), rng.real() * 0.3);
        }
        let bytes = bincode::serde::encode_to_vec(&a, bincode::config::standard()).unwrap();
        let (mut b, _): (AnomalyLikelihood, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(a, b);
        for i in 0..400 {
            let value = f64::from(i % 23);
            let raw = if i % 90 == 5 { 1.0 } else { rng.real() * 0.3 };
            let x = a.anomaly_probability(value, raw);
            let y = b.anomaly_probability(value, raw);
            assert_eq!(x.to_bits(), y.to_bits(), "record {i}");
        }
        assert_eq!(a, b);
    }
}
