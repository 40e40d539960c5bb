//! Raw anomaly score and the "spatial anomaly" override used by NAB's numenta detector.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// NuPIC's raw anomaly score: the fraction of active columns that were not predicted,
/// `1 − |active ∩ predicted| / |active|`, or `0.0` when no column is active.
///
/// Both slices must be sorted ascending without duplicates (as [`crate::Sdr::sparse`] is);
/// the intersection is then a single linear merge with no allocation.
pub fn raw_anomaly(active_columns: &[u32], predicted_columns: &[u32]) -> f32 {
    debug_assert!(active_columns.windows(2).all(|w| w[0] < w[1]));
    debug_assert!(predicted_columns.windows(2).all(|w| w[0] < w[1]));
    if active_columns.is_empty() {
        return 0.0;
    }
    let (mut i, mut j, mut both) = (0usize, 0usize, 0usize);
    while i < active_columns.len() && j < predicted_columns.len() {
        match active_columns[i].cmp(&predicted_columns[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    // Computed in f64 then rounded once, so e.g. 1 − 39/40 is the nearest f32 to 0.025.
    (1.0 - both as f64 / active_columns.len() as f64) as f32
}

/// Invalid [`SpatialAnomalyParams`].
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpatialAnomalyError {
    /// `tolerance` must be finite and non-negative.
    #[error("spatial anomaly: tolerance must be finite and >= 0, got {0}")]
    Tolerance(f64),
}

/// Parameters of [`SpatialAnomaly`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpatialAnomalyParams {
    /// Fraction of the running range `max − min` by which a value may fall outside
    /// `[min, max]` before it is flagged. NAB's numenta detector uses 0.05.
    pub tolerance: f64,
}

impl Default for SpatialAnomalyParams {
    fn default() -> Self {
        SpatialAnomalyParams { tolerance: 0.05 }
    }
}

impl SpatialAnomalyParams {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), SpatialAnomalyError> {
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(SpatialAnomalyError::Tolerance(self.tolerance));
        }
        Ok(())
    }
}

/// Flags metric values outside the range seen so far (widened by a tolerance).
///
/// This is the override that NAB's numenta detector applies on top of the likelihood: a
/// value far outside everything seen before is reported with score 1.0 whatever the
/// temporal model says, because a brand-new level is anomalous even when the encoder
/// maps it to familiar buckets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpatialAnomaly {
    params: SpatialAnomalyParams,
    min: Option<f64>,
    max: Option<f64>,
}

impl Default for SpatialAnomaly {
    fn default() -> Self {
        SpatialAnomaly::new(SpatialAnomalyParams::default())
    }
}

impl SpatialAnomaly {
    /// A detector that has seen no value yet.
    ///
    /// # Panics
    /// If `params` is invalid (see [`SpatialAnomalyParams::validate`]).
    pub fn new(params: SpatialAnomalyParams) -> Self {
        if let Err(e) = params.validate() {
            panic!("{e}");
        }
        SpatialAnomaly {
            params,
            min: None,
            max: None,
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SpatialAnomalyParams {
        &self.params
    }

    /// Running minimum and maximum, once a value has been seen.
    pub fn range(&self) -> Option<(f64, f64)> {
        Some((self.min?, self.max?))
    }

    /// Returns whether `value` lies outside `[min − tol·span, max + tol·span]` of the values
    /// seen so far (`span = max − min`), then folds `value` into the running min/max.
    ///
    /// Nothing is flagged while `min == max` (no value yet, or all values equal): there is
    /// no span to scale the tolerance by, and NAB's detector skips the check then too.
    pub fn check_and_update(&mut self, value: f64) -> bool {
        let anomalous = match (self.min, self.max) {
            (Some(lo), Some(hi)) if lo != hi => {
                let tolerance = (hi - lo) * self.params.tolerance;
                value > hi + tolerance || value < lo - tolerance
            }
            _ => false,
        };
        // NaN never replaces a bound (comparisons are false), as in the Python original.
        if self.max.is_none_or(|hi| value > hi) {
            self.max = Some(value);
        }
        if self.min.is_none_or(|lo| value < lo) {
            self.min = Some(value);
        }
        anomalous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_anomaly_fraction_of_unpredicted_active_columns() {
        assert_eq!(raw_anomaly(&[], &[1, 2, 3]), 0.0);
        assert_eq!(raw_anomaly(&[], &[]), 0.0);
        assert_eq!(raw_anomaly(&[1, 2, 3, 4], &[]), 1.0);
        assert_eq!(raw_anomaly(&[1, 2, 3, 4], &[1, 2, 3, 4]), 0.0);
        assert_eq!(raw_anomaly(&[1, 2, 3, 4], &[0, 2, 4, 9]), 0.5);
        assert_eq!(raw_anomaly(&[1, 2, 3, 4], &[5, 6, 7]), 1.0);
        // Predicted-but-inactive columns do not count.
        assert_eq!(raw_anomaly(&[10], &[1, 2, 3, 10, 11, 12]), 0.0);
        assert_eq!(raw_anomaly(&[0, 5, 9], &[5]), (1.0 - 1.0 / 3.0) as f32);
    }

    #[test]
    fn raw_anomaly_matches_naive_count_on_many_cases() {
        let mut rng = crate::random::Random::new(7);
        for _ in 0..200 {
            let mut a: Vec<u32> = (0..rng.below(60)).map(|_| rng.below(100)).collect();
            let mut p: Vec<u32> = (0..rng.below(60)).map(|_| rng.below(100)).collect();
            a.sort_unstable();
            a.dedup();
            p.sort_unstable();
            p.dedup();
            let both = a.iter().filter(|c| p.contains(c)).count();
            let expect = if a.is_empty() {
                0.0
            } else {
                (1.0 - both as f64 / a.len() as f64) as f32
            };
            assert_eq!(raw_anomaly(&a, &p), expect);
        }
    }

    #[test]
    fn spatial_anomaly_flags_values_beyond_tolerance_of_running_range() {
        let mut s = SpatialAnomaly::default();
        // No range yet, then a zero-width range: never flagged.
        assert!(!s.check_and_update(10.0));
        assert!(!s.check_and_update(1000.0));
        // Range now [10, 1000], span 990, tolerance 49.5 → accepted band [-39.5, 1049.5].
        assert!(!s.check_and_update(1049.0));
        assert_eq!(s.range(), Some((10.0, 1049.0)));
        // Band is now [10 − 51.95, 1049 + 51.95] = [-41.95, 1100.95].
        assert!(!s.check_and_update(1100.9));
        assert!(s.check_and_update(1200.0));
        // The check used the range *before* the update; the update still happened.
        assert_eq!(s.range(), Some((10.0, 1200.0)));
        assert!(!s.check_and_update(1250.0)); // band max now 1200 + 59.5
        assert!(s.check_and_update(-100.0));
        assert!(!s.check_and_update(500.0));
    }

    #[test]
    fn spatial_anomaly_equal_values_never_flag_and_bounds_are_exclusive() {
        let mut s = SpatialAnomaly::default();
        for _ in 0..5 {
            assert!(!s.check_and_update(3.0));
        }
        let mut s = SpatialAnomaly::new(SpatialAnomalyParams { tolerance: 0.5 });
        s.check_and_update(0.0);
        s.check_and_update(2.0);
        // Band [-1, 3]: the edges themselves are not anomalous.
        assert!(!s.clone().check_and_update(3.0));
        assert!(!s.clone().check_and_update(-1.0));
        assert!(s.clone().check_and_update(3.000001));
        assert!(s.clone().check_and_update(-1.000001));
    }

    #[test]
    fn spatial_anomaly_params_validate_and_serde_round_trip() {
        assert!(SpatialAnomalyParams { tolerance: -0.1 }.validate().is_err());
        assert!(SpatialAnomalyParams {
            tolerance: f64::NAN
        }
        .validate()
        .is_err());
        let msg = SpatialAnomalyParams { tolerance: -1.0 }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("tolerance"), "{msg}");
        let mut s = SpatialAnomaly::default();
        s.check_and_update(1.0);
        s.check_and_update(2.0);
        let bytes = bincode::serde::encode_to_vec(&s, bincode::config::standard()).unwrap();
        let (mut back, _): (SpatialAnomaly, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.check_and_update(5.0), s.check_and_update(5.0));
        assert_eq!(back, s);
    }
}
