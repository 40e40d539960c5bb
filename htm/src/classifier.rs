//! NuPIC's SDR classifier, one step ahead: a softmax regression from an SDR (the spatial
//! pooler's active columns) to the value encoder's bucket of the *next* record, plus a running
//! average of the values seen in each bucket to turn a predicted bucket back into a value.
//!
//! The caller supplies the one-step delay: at record `t` it calls
//! `learn(pattern_{t-1}, bucket_t, value_t)`, and `infer(pattern_t)` predicts record `t+1`.
//! (NuPIC's `compute` infers *before* it learns within a record; either order works here.)
//!
//! Storage follows use. NuPIC's weight matrix is dense, `[input bits × buckets]`, but:
//! * an input bit that was never part of a learnt pattern has an all-zero row, so rows are
//!   allocated on first use (the spatial pooler activates only a few hundred of its 2048
//!   columns on a typical stream);
//! * buckets that were never a target and were created together (when a higher bucket first
//!   appeared, every bucket below it came into existence at zero) keep bit-identical weights
//!   forever: equal weights give equal activations, equal probabilities and so equal updates.
//!   They share one weight *slot* until one of them becomes a target and is split off.
//!
//! The arithmetic is unchanged — per bucket, in bucket order, in `f64` — so results are
//! bit-identical to the dense form (a test runs both side by side).

use crate::encoders::Scratch;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// Marks an input bit without a weight row (all its weights are zero).
const NO_ROW: u32 = u32::MAX;

/// Input bits or row numbers, all below the input size: `u16` each when the input size
/// allows it (NAB's 2048 columns), `u32` otherwise. [`NO_ROW`] is kept as the width's
/// largest value, which no input bit or row reaches.
#[derive(Clone, Debug, PartialEq)]
enum Indices {
    Narrow(Vec<u16>),
    Wide(Vec<u32>),
}

impl Indices {
    /// `len` copies of `value`, for values below `input_size` (or [`NO_ROW`]).
    fn filled(input_size: usize, len: usize, value: u32) -> Self {
        if input_size < usize::from(u16::MAX) {
            Indices::Narrow(vec![Self::narrow(value); len])
        } else {
            Indices::Wide(vec![value; len])
        }
    }

    #[inline]
    fn narrow(value: u32) -> u16 {
        if value == NO_ROW {
            u16::MAX
        } else {
            u16::try_from(value).expect("index below a narrow input size")
        }
    }

    #[inline]
    fn get(&self, i: usize) -> u32 {
        match self {
            Indices::Narrow(v) => match v[i] {
                u16::MAX => NO_ROW,
                x => u32::from(x),
            },
            Indices::Wide(v) => v[i],
        }
    }

    fn set(&mut self, i: usize, value: u32) {
        match self {
            Indices::Narrow(v) => v[i] = Self::narrow(value),
            Indices::Wide(v) => v[i] = value,
        }
    }

    /// Appends `value`, growing by a sixteenth (16 entries at least) when full.
    fn push(&mut self, value: u32) {
        match self {
            Indices::Narrow(v) => {
                crate::reserve_gradually(v, 1, 16);
                v.push(Self::narrow(value));
            }
            Indices::Wide(v) => {
                crate::reserve_gradually(v, 1, 16);
                v.push(value);
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Indices::Narrow(v) => v.len(),
            Indices::Wide(v) => v.len(),
        }
    }

    fn to_vec(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Indices::Narrow(v) => 2 * v.capacity(),
            Indices::Wide(v) => 4 * v.capacity(),
        }
    }
}

/// One-step-ahead SDR classifier.
#[derive(Clone, Debug)]
pub struct SdrClassifier {
    params: ClassifierParams,
    input_size: u32,
    /// Per bucket: its weight slot.
    slot_of: Vec<u32>,
    /// Per slot: how many buckets share it.
    members: Vec<u32>,
    /// Per input bit: its weight row, or [`NO_ROW`].
    row_of: Indices,
    /// Per row: its input bit (rows in allocation order).
    row_bits: Indices,
    /// Rows of `stride` weights, the first `members.len()` of which are in use.
    stride: usize,
    weights: Vec<f32>,
    /// Per slot: the moving average of the values learnt for its bucket; `None` until the
    /// bucket is seen, and for a slot shared by buckets never learnt. (A learnt bucket has a
    /// slot of its own, so per slot is per bucket, without an entry for every bucket.)
    actual_values: Vec<Option<f64>>,
    /// Per-slot activations, then probabilities, then errors, during `learn`.
    acts: Scratch<Vec<f64>>,
    /// Per-slot weight deltas during `learn`.
    deltas: Scratch<Vec<f32>>,
}

impl SdrClassifier {
    /// A classifier for input SDRs of `input_size` bits, knowing no bucket yet.
    pub fn new(input_size: usize, params: ClassifierParams) -> Result<Self, ClassifierParamError> {
        params.validate()?;
        Ok(SdrClassifier {
            params,
            input_size: u32::try_from(input_size).expect("input size fits in u32"),
            slot_of: Vec::new(),
            members: Vec::new(),
            row_of: Indices::filled(input_size, input_size, NO_ROW),
            row_bits: Indices::filled(input_size, 0, 0),
            stride: 0,
            weights: Vec::new(),
            actual_values: Vec::new(),
            acts: Scratch::default(),
            deltas: Scratch::default(),
        })
    }

    /// The parameters it was built with.
    pub fn params(&self) -> &ClassifierParams {
        &self.params
    }

    /// Number of input bits.
    pub fn input_size(&self) -> usize {
        self.input_size as usize
    }

    /// Number of buckets known (highest bucket learnt + 1).
    pub fn num_buckets(&self) -> usize {
        self.slot_of.len()
    }

    /// Averaged actual value of `bucket`, if it has been learnt.
    pub fn actual_value(&self, bucket: usize) -> Option<f64> {
        let slot = *self.slot_of.get(bucket)?;
        self.actual_values[slot as usize]
    }

    /// The weight from input `bit` to `bucket` (zero for unknown buckets).
    pub fn weight(&self, bit: usize, bucket: usize) -> f32 {
        let row = (bit < self.input_size()).then(|| self.row_of.get(bit));
        match (row, self.slot_of.get(bucket)) {
            (Some(row), Some(&slot)) if row != NO_ROW => {
                self.weights[row as usize * self.stride + slot as usize]
            }
            _ => 0.0,
        }
    }

    /// Input bits holding a weight row (those seen in a learnt pattern).
    pub fn num_rows(&self) -> usize {
        self.row_bits.len()
    }

    /// Heap bytes held (capacity-based).
    pub fn heap_bytes(&self) -> usize {
        self.heap_breakdown().iter().map(|&(_, b)| b).sum()
    }

    /// [`SdrClassifier::heap_bytes`] part by part, for memory reporting.
    pub fn heap_breakdown(&self) -> Vec<(&'static str, usize)> {
        vec![
            ("weights", 4 * self.weights.capacity()),
            (
                "index",
                4 * (self.slot_of.capacity() + self.members.capacity())
                    + self.row_of.heap_bytes()
                    + self.row_bits.heap_bytes(),
            ),
            ("actual_values", 16 * self.actual_values.capacity()),
            (
                "scratch",
                8 * self.acts.0.capacity() + 4 * self.deltas.0.capacity(),
            ),
        ]
    }

    fn num_slots(&self) -> usize {
        self.members.len()
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
        self.make_own_slot(bucket);
        let a = self.params.act_value_alpha;
        let value = &mut self.actual_values[self.slot_of[bucket] as usize];
        *value = Some(match *value {
            Some(old) => (1.0 - a) * old + a * actual,
            None => actual,
        });

        let mut probs = std::mem::take(&mut self.acts.0);
        self.slot_probabilities(pattern, &mut probs);
        let target = self.slot_of[bucket] as usize;
        let alpha = self.params.alpha;
        let deltas = &mut self.deltas.0;
        deltas.clear();
        deltas.extend(probs.iter().enumerate().map(|(s, &p)| {
            let t = if s == target { 1.0 } else { 0.0 };
            (alpha * (t - p)) as f32
        }));
        self.acts.0 = probs;
        let n = self.num_slots();
        for &bit in pattern {
            let row = self.row(bit);
            let w = &mut self.weights[row * self.stride..row * self.stride + n];
            for (x, &d) in w.iter_mut().zip(&self.deltas.0) {
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
        let n = self.num_slots();
        let mut best: Option<(usize, f64, f64)> = None;
        // Learnt buckets have a slot of their own, so activations are summed per slot; the
        // softmax is monotonic, so the arg-max of the activations is the answer.
        for lo in (0..n).step_by(CHUNK) {
            let hi = (lo + CHUNK).min(n);
            let mut act = [0f64; CHUNK];
            for &bit in pattern {
                let row = self.row_of.get(bit as usize);
                if row == NO_ROW {
                    continue;
                }
                let start = row as usize * self.stride;
                for (a, &x) in act.iter_mut().zip(&self.weights[start + lo..start + hi]) {
                    *a += f64::from(x);
                }
            }
            for (b, &slot) in self.slot_of.iter().enumerate() {
                let s = slot as usize;
                if (lo..hi).contains(&s) {
                    if let Some(v) = self.actual_values[s] {
                        let a = act[s - lo];
                        if best.is_none_or(|(bb, top, _)| a > top || (a == top && b < bb)) {
                            best = Some((b, a, v));
                        }
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
        let mut slots = Vec::new();
        self.slot_probabilities(pattern, &mut slots);
        out.clear();
        out.extend(self.slot_of.iter().map(|&s| slots[s as usize]));
    }

    fn check_pattern(&self, pattern: &[u32]) {
        let n = self.input_size;
        assert!(
            pattern.iter().all(|&b| b < n),
            "classifier pattern bit out of range for input size {n}"
        );
    }

    /// Per-slot probabilities: the softmax over buckets of the summed weights, evaluated once
    /// per slot. The normalising sum still runs over every bucket in bucket order, as the
    /// dense form does, so the result is bit-identical to it.
    fn slot_probabilities(&self, pattern: &[u32], out: &mut Vec<f64>) {
        let n = self.num_slots();
        out.clear();
        out.resize(n, 0.0);
        if n == 0 {
            return;
        }
        for &bit in pattern {
            // A row never allocated is all zeros, and adding +0.0 changes no sum.
            let row = self.row_of.get(bit as usize);
            if row == NO_ROW {
                continue;
            }
            let start = row as usize * self.stride;
            for (a, &x) in out.iter_mut().zip(&self.weights[start..start + n]) {
                *a += f64::from(x);
            }
        }
        // Subtracting the maximum keeps exp() from overflowing; the result is unchanged.
        let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for a in out.iter_mut() {
            *a = (*a - max).exp();
        }
        let mut sum = 0.0;
        for &s in &self.slot_of {
            sum += out[s as usize];
        }
        for a in out.iter_mut() {
            *a /= sum;
        }
    }

    /// The weight row of `bit`, allocated (zeros) on first use.
    fn row(&mut self, bit: u32) -> usize {
        let r = self.row_of.get(bit as usize);
        if r != NO_ROW {
            return r as usize;
        }
        let r = self.row_bits.len();
        self.row_bits.push(bit);
        self.row_of.set(bit as usize, r as u32);
        let need = (r + 1) * self.stride;
        if need > self.weights.capacity() {
            // Grow by a 32nd, not by doubling: memory should follow use, and rows are allocated
            // ever more rarely as a classifier ages (a few hundred in all on a NAB stream).
            self.weights
                .reserve_exact(need - self.weights.len() + self.weights.len() / 32);
        }
        self.weights.resize(need, 0.0);
        r
    }

    /// Adds a weight slot initialised, in every row, from `from` (or zero) and returns it.
    fn add_slot(&mut self, from: Option<usize>) -> usize {
        let slot = self.num_slots();
        if slot == self.stride {
            // Re-lay the rows with room for more slots.
            let stride = (self.stride + self.stride / 16).max(slot + 4);
            let rows = self.row_bits.len();
            let mut weights = Vec::with_capacity(rows * stride);
            for r in 0..rows {
                weights.extend_from_slice(&self.weights[r * self.stride..r * self.stride + slot]);
                weights.resize((r + 1) * stride, 0.0);
            }
            self.weights = weights;
            self.stride = stride;
        }
        for r in 0..self.row_bits.len() {
            let base = r * self.stride;
            self.weights[base + slot] = from.map_or(0.0, |f| self.weights[base + f]);
        }
        self.members.push(0);
        self.actual_values.push(None);
        slot
    }

    /// Widens the classifier to `num_buckets` buckets: the new ones below the last share one
    /// zero slot, the last (about to be learnt) gets its own.
    fn grow(&mut self, num_buckets: usize) {
        let old = self.num_buckets();
        // Buckets appear in a few jumps: exactly as many entries as buckets.
        self.slot_of.reserve_exact(num_buckets - old);
        if num_buckets - 1 > old {
            let shared = self.add_slot(None) as u32;
            self.slot_of.resize(num_buckets - 1, shared);
            self.members[shared as usize] = (num_buckets - 1 - old) as u32;
        }
        let own = self.add_slot(None) as u32;
        self.slot_of.push(own);
        self.members[own as usize] = 1;
    }

    /// Gives `bucket` a slot of its own (it is about to be learnt, so its weights part from
    /// those of the buckets it shared a slot with).
    fn make_own_slot(&mut self, bucket: usize) {
        let shared = self.slot_of[bucket] as usize;
        if self.members[shared] > 1 {
            let own = self.add_slot(Some(shared));
            self.members[shared] -= 1;
            self.members[own] = 1;
            self.slot_of[bucket] = own as u32;
        }
    }

    /// Weights packed row by row, without the unused tail of each row.
    fn packed_weights(&self) -> Vec<f32> {
        let n = self.num_slots();
        let mut out = Vec::with_capacity(self.row_bits.len() * n);
        for r in 0..self.row_bits.len() {
            out.extend_from_slice(&self.weights[r * self.stride..r * self.stride + n]);
        }
        out
    }
}

/// Content equality (weights bit for bit, whatever the row layout).
impl PartialEq for SdrClassifier {
    fn eq(&self, other: &Self) -> bool {
        self.params == other.params
            && self.input_size == other.input_size
            && self.slot_of == other.slot_of
            && self.row_bits == other.row_bits
            && (0..self.num_buckets()).all(|b| self.actual_value(b) == other.actual_value(b))
            && self.members.len() == other.members.len()
            && self
                .packed_weights()
                .iter()
                .zip(other.packed_weights().iter())
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// Checkpoint form: slots per bucket, then the allocated rows packed.
#[derive(Serialize, Deserialize)]
struct Wire {
    params: ClassifierParams,
    input_size: u32,
    slot_of: Vec<u32>,
    actual_values: Vec<Option<f64>>,
    row_bits: Vec<u32>,
    weights: Vec<f32>,
}

impl Serialize for SdrClassifier {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            params: self.params.clone(),
            input_size: self.input_size,
            slot_of: self.slot_of.clone(),
            actual_values: (0..self.num_buckets())
                .map(|b| self.actual_value(b))
                .collect(),
            row_bits: self.row_bits.to_vec(),
            weights: self.packed_weights(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SdrClassifier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let w = Wire::deserialize(d)?;
        let mut c =
            SdrClassifier::new(w.input_size as usize, w.params).map_err(D::Error::custom)?;
        let n = w.slot_of.iter().map(|&s| s as usize + 1).max().unwrap_or(0);
        let mut members = vec![0u32; n];
        for &s in &w.slot_of {
            members[s as usize] += 1;
        }
        let rows = w.row_bits.len();
        if members.contains(&0)
            || w.actual_values.len() != w.slot_of.len()
            || w.weights.len() != rows * n
        {
            return Err(D::Error::custom("classifier: inconsistent weight layout"));
        }
        for (r, &bit) in w.row_bits.iter().enumerate() {
            if bit >= c.input_size || c.row_of.get(bit as usize) != NO_ROW {
                return Err(D::Error::custom("classifier: bad row bit"));
            }
            c.row_of.set(bit as usize, r as u32);
        }
        // Per slot: only a bucket alone in its slot can have been learnt.
        let mut actual_values = vec![None; n];
        for (&s, &v) in w.slot_of.iter().zip(&w.actual_values) {
            match (members[s as usize], v) {
                (1, v) => actual_values[s as usize] = v,
                (_, None) => {}
                (_, Some(_)) => return Err(D::Error::custom("classifier: learnt bucket shares")),
            }
        }
        c.slot_of = w.slot_of;
        c.members = members;
        c.row_bits = match Indices::filled(c.input_size(), 0, 0) {
            Indices::Narrow(_) => {
                Indices::Narrow(w.row_bits.iter().map(|&b| Indices::narrow(b)).collect())
            }
            Indices::Wide(_) => Indices::Wide(w.row_bits),
        };
        c.stride = n;
        c.weights = w.weights;
        c.actual_values = actual_values;
        Ok(c)
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

    /// The dense implementation this one replaced, kept as the oracle for bit-identity.
    mod dense {
        use super::super::{ClassifierParamError, ClassifierParams, CHUNK};
        use crate::encoders::Scratch;
        use ndarray::Array2;

        /// One-step-ahead SDR classifier.
        #[derive(Clone, Debug)]
        pub struct Dense {
            params: ClassifierParams,
            /// `[input_size, num_buckets]`, row-major so an active input bit's weights are one
            /// contiguous row. Grows by whole columns (zeros) when a higher bucket appears.
            weights: Array2<f32>,
            /// Moving average of the values learnt for each bucket; `None` until the bucket is seen.
            actual_values: Vec<Option<f64>>,
            /// Per-bucket probabilities, then errors, during `learn`.
            probs: Scratch<Vec<f64>>,
            /// Per-bucket weight deltas during `learn`.
            deltas: Scratch<Vec<f32>>,
        }

        #[allow(dead_code)]
        impl Dense {
            /// A classifier for input SDRs of `input_size` bits, knowing no bucket yet.
            pub fn new(
                input_size: usize,
                params: ClassifierParams,
            ) -> Result<Self, ClassifierParamError> {
                params.validate()?;
                Ok(Dense {
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
    }

    #[test]
    fn results_are_bit_identical_to_the_dense_form() {
        let mut rng = crate::random::Random::new(12);
        let mut sparse = SdrClassifier::new(256, ClassifierParams::default()).unwrap();
        let mut dense = dense::Dense::new(256, ClassifierParams::default()).unwrap();
        // Patterns over a few bits only (most rows stay unallocated); buckets wander up and
        // down so slots are shared, split and added in every order.
        let all: Vec<u32> = (0..120).collect();
        let mut bucket = 60usize;
        let (mut p1, mut p2) = (Vec::new(), Vec::new());
        for t in 0..1500 {
            let pattern = rng.sample(&all, 12);
            bucket = match rng.below(10) {
                0 => bucket + 1 + rng.below(12) as usize,
                1 => bucket.saturating_sub(1 + rng.below(12) as usize),
                _ => bucket,
            }
            .min(300);
            let value = bucket as f64 + rng.real();
            sparse.learn(&pattern, bucket, value);
            dense.learn(&pattern, bucket, value);
            let probe = rng.sample(&all, 12);
            assert_eq!(sparse.infer(&probe), dense.infer(&probe), "step {t}");
            if t % 50 == 0 {
                sparse.infer_probabilities(&probe, &mut p1);
                dense.infer_probabilities(&probe, &mut p2);
                assert_eq!(p1.len(), p2.len());
                assert!(p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
        assert_eq!(sparse.num_buckets(), dense.num_buckets());
        for bit in 0..256 {
            for b in 0..dense.num_buckets() {
                let want = dense.weights()[[bit, b]];
                assert_eq!(
                    sparse.weight(bit, b).to_bits(),
                    want.to_bits(),
                    "bit {bit} bucket {b}"
                );
            }
        }
        assert_eq!(sparse.num_rows(), 120);
    }

    #[test]
    fn memory_follows_the_bits_and_buckets_learnt() {
        let mut c = SdrClassifier::new(2048, ClassifierParams::default()).unwrap();
        let (a, b) = (pattern(1), pattern(2));
        for t in 0..200 {
            c.learn(
                if t % 2 == 0 { &a } else { &b },
                if t % 2 == 0 { 500 } else { 510 },
                1.0,
            );
        }
        assert_eq!(c.num_buckets(), 511);
        // Only the bits of the two patterns have rows; the 509 buckets never learnt share
        // two slots (those created with bucket 500 and those created with 510).
        assert_eq!(c.num_rows(), 80);
        assert_eq!(c.num_slots(), 4);
        assert_eq!(c.weight(7, 3).to_bits(), c.weight(7, 499).to_bits());
        let dense_bytes = 2048 * 511 * 4;
        assert!(
            c.heap_bytes() < 40_000,
            "{} bytes (dense: {dense_bytes})",
            c.heap_bytes()
        );
        let ckpt = bincode::serde::encode_to_vec(&c, bincode::config::standard()).unwrap();
        assert!(ckpt.len() < 4_000, "checkpoint {} bytes", ckpt.len());
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

    #[test]
    fn input_sizes_beyond_u16_keep_u32_indices() {
        let mut c = SdrClassifier::new(70_000, ClassifierParams::default()).unwrap();
        assert!(matches!(c.row_of, Indices::Wide(_)));
        c.learn(&[5, 69_999], 3, 1.5);
        c.learn(&[65_535, 69_999], 1, 0.5);
        assert_eq!(c.num_rows(), 3);
        assert_ne!(c.weight(65_535, 1), 0.0);
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&c, cfg).unwrap();
        let (back, _): (SdrClassifier, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert!(back == c);
        let small = SdrClassifier::new(2048, ClassifierParams::default()).unwrap();
        assert!(matches!(small.row_of, Indices::Narrow(_)));
    }
}
