//! The per-device model: encoders → spatial pooler → temporal memory → raw anomaly →
//! anomaly likelihood, plus a classifier predicting the next value.

use serde::{Deserialize, Serialize};

use crate::anomaly::{SpatialAnomaly, SpatialAnomalyParams};
use crate::backtracking_tm::{BacktrackingTm, BacktrackingTmParams};
use crate::checkpoint::{self, CheckpointError};
use crate::classifier::{ClassifierParams, SdrClassifier};
use crate::encoders::{nab_value_params, EncoderParams, RecordEncoder, ValueEncoderParams};
use crate::likelihood::{log_likelihood, AnomalyLikelihood, LikelihoodParams};
use crate::spatial_pooler::{SpatialPooler, SpatialPoolerParams};
use crate::temporal_memory::{TemporalMemory, TemporalMemoryParams};
use crate::Sdr;

/// Which temporal memory a network uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TmParams {
    /// NuPIC's backtracking TM ("TP"), which gave NuPIC its best NAB score.
    Backtracking(BacktrackingTmParams),
    /// The newer TM kept by htm.core.
    Current(TemporalMemoryParams),
}

/// Everything that defines a network. NuPIC parameter names, snake_case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkParams {
    pub encoder: EncoderParams,
    pub sp: SpatialPoolerParams,
    pub tm: TmParams,
    pub likelihood: LikelihoodParams,
    /// `None` disables next-value prediction (saves its memory and time).
    pub classifier: Option<ClassifierParams>,
    /// Tolerance of NAB's spatial-anomaly override (fraction of the running span);
    /// `None` disables the override.
    pub spatial_tolerance: Option<f64>,
}

/// Segment budget of the `nab` preset's backtracking TM (0 would be NuPIC's unbounded growth).
pub const NAB_MAX_SEGMENTS: u32 = 8192;

/// Preset names accepted by [`NetworkParams::preset`].
pub const PRESETS: &[&str] = &["nab", "nab-tm"];

impl NetworkParams {
    /// NuPIC's best NAB settings (backtracking TM) for values expected in `[min, max]`, with the
    /// likelihood's probation sized for a stream of `rows` records the way NAB sizes it.
    pub fn nab(min: f64, max: f64, rows: usize) -> Self {
        NetworkParams {
            encoder: EncoderParams {
                value: ValueEncoderParams::Rdse(nab_value_params(min, max)),
                date: Default::default(),
            },
            sp: SpatialPoolerParams::default(),
            // NuPIC's TM grows without bound on noisy streams; a budget of 8192 segments keeps
            // NAB within 0.3 points of unbounded (70.37 vs 70.69) at a third of the CPU time
            // and bounded memory (4096 drops it to 66.9).
            tm: TmParams::Backtracking(BacktrackingTmParams {
                max_segments: NAB_MAX_SEGMENTS,
                ..BacktrackingTmParams::default()
            }),
            likelihood: LikelihoodParams::for_nab(rows),
            classifier: Some(ClassifierParams::default()),
            spatial_tolerance: Some(0.05),
        }
    }

    /// A named preset: `nab` (backtracking TM) or `nab-tm` (the newer TM with NAB's
    /// "numentaTM" settings).
    pub fn preset(name: &str, min: f64, max: f64, rows: usize) -> Result<Self, NetworkError> {
        let mut p = Self::nab(min, max, rows);
        match name {
            "nab" => {}
            "nab-tm" => p.tm = TmParams::Current(TemporalMemoryParams::default()),
            other => {
                return Err(NetworkError::Params(format!(
                    "unknown preset {other:?}; known presets: {}",
                    PRESETS.join(", ")
                )))
            }
        }
        Ok(p)
    }
}

/// Errors building or restoring a network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network parameters: {0}")]
    Params(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("record refused: {0}")]
    Input(String),
}

/// What the network says about one record.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inference {
    /// Fraction of active columns that were not predicted.
    pub raw_anomaly: f64,
    /// Anomaly likelihood L (0.5 during probation).
    pub likelihood: f64,
    /// NuPIC's log form of L, scaled to [0, 1].
    pub log_likelihood: f64,
    /// The value fell outside the running range widened by the tolerance.
    pub spatial_anomaly: bool,
    /// The score to threshold (what NAB is given): 1.0 on a spatial anomaly, else `log_likelihood`.
    pub anomaly_score: f64,
    /// The value predicted for this record at the previous record.
    pub prediction: Option<f64>,
    /// The value predicted for the next record.
    pub prediction_next: Option<f64>,
    /// |previous prediction − previous value|, the original system's definition: the error of the
    /// prediction made for the previous record, known once that record arrived.
    pub error: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Tm {
    Backtracking(Box<BacktrackingTm>),
    Current(Box<TemporalMemory>),
}

impl Tm {
    fn compute(&mut self, active_columns: &[u32], learn: bool) -> f64 {
        match self {
            Tm::Backtracking(tm) => tm.compute(active_columns, learn) as f64,
            Tm::Current(tm) => tm.compute(active_columns, learn) as f64,
        }
    }
}

/// One device's model. `compute` is called once per record, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    params: NetworkParams,
    encoder: RecordEncoder,
    sp: SpatialPooler,
    tm: Tm,
    likelihood: AnomalyLikelihood,
    classifier: Option<SdrClassifier>,
    spatial: SpatialAnomaly,
    records: u64,
    /// Active columns of the previous record: the classifier learns previous pattern → this value.
    prev_columns: Vec<u32>,
    /// Prediction made at the previous record for the current one.
    next_prediction: Option<f64>,
    /// Prediction that was made for the previous record, and that record's value: the error
    /// reported now compares them (the original system's definition).
    last_prediction: Option<f64>,
    last_value: Option<f64>,
    #[serde(skip)]
    scratch: Scratch,
}

#[derive(Clone, Debug, Default)]
struct Scratch {
    input: Sdr,
    columns: Sdr,
}

impl PartialEq for Scratch {
    fn eq(&self, _: &Self) -> bool {
        true // scratch space carries no state between records
    }
}

impl Network {
    /// Builds a fresh network. The SP input width and TM column count follow the encoder and
    /// SP, so callers only set what they mean to change.
    pub fn new(mut params: NetworkParams) -> Result<Self, NetworkError> {
        let encoder =
            RecordEncoder::new(&params.encoder).map_err(|e| NetworkError::Params(e.to_string()))?;
        params.sp.input_size = encoder.size() as u32;
        let sp = SpatialPooler::new(params.sp.clone())
            .map_err(|e| NetworkError::Params(e.to_string()))?;
        let columns = params.sp.column_count;
        let tm = match &mut params.tm {
            TmParams::Backtracking(p) => {
                p.column_count = columns;
                Tm::Backtracking(Box::new(
                    BacktrackingTm::new(p.clone())
                        .map_err(|e| NetworkError::Params(e.to_string()))?,
                ))
            }
            TmParams::Current(p) => {
                p.column_count = columns;
                Tm::Current(Box::new(
                    TemporalMemory::new(p.clone())
                        .map_err(|e| NetworkError::Params(e.to_string()))?,
                ))
            }
        };
        params
            .likelihood
            .validate()
            .map_err(|e| NetworkError::Params(e.to_string()))?;
        let likelihood = AnomalyLikelihood::new(params.likelihood.clone());
        let classifier = params
            .classifier
            .clone()
            .map(|p| SdrClassifier::new(columns as usize, p))
            .transpose()
            .map_err(|e| NetworkError::Params(e.to_string()))?;
        let spatial_params = SpatialAnomalyParams {
            tolerance: params.spatial_tolerance.unwrap_or(0.05),
        };
        spatial_params
            .validate()
            .map_err(|e| NetworkError::Params(e.to_string()))?;
        let spatial = SpatialAnomaly::new(spatial_params);
        Ok(Network {
            params,
            encoder,
            sp,
            tm,
            likelihood,
            classifier,
            spatial,
            records: 0,
            prev_columns: Vec::new(),
            next_prediction: None,
            last_prediction: None,
            last_value: None,
            scratch: Scratch::default(),
        })
    }

    /// The parameters this network was built with (after derived sizes were filled in).
    pub fn params(&self) -> &NetworkParams {
        &self.params
    }

    /// Records processed so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Whether the anomaly likelihood has left its probation (it reports 0.5 until then).
    pub fn likelihood_ready(&self) -> bool {
        self.records
            > self.params.likelihood.learning_period as u64
                + self.params.likelihood.estimation_samples as u64
    }

    /// Processes one record: `timestamp` in seconds since 1970-01-01 read as local wall-clock
    /// time, `value` the measurement. Learning is always on (online detector).
    ///
    /// A value that is not finite, or a record the encoders cannot represent, is refused
    /// without touching the network's state.
    pub fn compute(&mut self, timestamp: i64, value: f64) -> Result<Inference, NetworkError> {
        if !value.is_finite() {
            return Err(NetworkError::Input(format!(
                "value {value} is not a finite number"
            )));
        }
        let Scratch { input, columns } = &mut self.scratch;
        self.encoder
            .encode(timestamp, value, input)
            .map_err(|e| NetworkError::Input(e.to_string()))?;
        if columns.size() != self.sp.num_columns() {
            *columns = Sdr::new(self.sp.num_columns());
        }
        self.sp.compute(input, true, columns);
        let raw = self.tm.compute(columns.sparse(), true);

        let spatial_anomaly = match self.params.spatial_tolerance {
            Some(_) => self.spatial.check_and_update(value),
            None => false,
        };
        let likelihood = self.likelihood.anomaly_probability(value, raw);
        let log_l = log_likelihood(likelihood);

        let prediction = self.next_prediction;
        let error = match (self.last_prediction, self.last_value) {
            (Some(p), Some(v)) => Some((p - v).abs()),
            _ => None,
        };
        let mut prediction_next = None;
        if let Some(classifier) = &mut self.classifier {
            // NuPIC's order: infer from this record's pattern with what was learned so far, then
            // learn that the previous pattern led to this value.
            prediction_next = classifier.infer(columns.sparse()).map(|(_, v)| v);
            if let Some(bucket) = self.encoder.bucket_index(value) {
                if !self.prev_columns.is_empty() {
                    classifier.learn(&self.prev_columns, bucket, value);
                }
            }
        }
        self.prev_columns.clear();
        self.prev_columns.extend_from_slice(columns.sparse());
        self.last_prediction = prediction;
        self.last_value = Some(value);
        self.next_prediction = prediction_next;
        self.records += 1;

        Ok(Inference {
            raw_anomaly: raw,
            likelihood,
            log_likelihood: log_l,
            spatial_anomaly,
            anomaly_score: if spatial_anomaly { 1.0 } else { log_l },
            prediction,
            prediction_next,
            error,
        })
    }

    /// Serialises the whole network (all learned state and random generators) into a
    /// versioned, checksummed checkpoint.
    pub fn to_bytes(&self) -> Vec<u8> {
        checkpoint::encode(self)
    }

    /// Restores a network written by [`Network::to_bytes`]. Corrupt, truncated or
    /// incompatible bytes give an error that says which.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NetworkError> {
        let mut net: Network = checkpoint::decode(bytes)?;
        net.rebuild_after_restore();
        Ok(net)
    }

    fn rebuild_after_restore(&mut self) {
        self.sp.rebuild_after_restore();
        match &mut self.tm {
            Tm::Backtracking(tm) => tm.rebuild_after_restore(),
            Tm::Current(tm) => tm.rebuild_after_restore(),
        }
    }

    /// Approximate heap bytes held by the network's learned state.
    pub fn heap_bytes(&self) -> usize {
        self.heap_breakdown().iter().map(|&(_, b)| b).sum()
    }

    /// [`Network::heap_bytes`] part by part (the spatial pooler and temporal memory have
    /// breakdowns of their own), for memory reporting.
    pub fn heap_breakdown(&self) -> Vec<(&'static str, usize)> {
        let tm = match &self.tm {
            Tm::Backtracking(tm) => tm.heap_bytes(),
            Tm::Current(tm) => tm.heap_bytes(),
        };
        vec![
            ("encoder", self.encoder.heap_bytes()),
            ("sp", self.sp.heap_bytes()),
            ("tm", tm),
            ("likelihood", self.likelihood.heap_bytes()),
            (
                "classifier",
                self.classifier.as_ref().map_or(0, |c| c.heap_bytes()),
            ),
            (
                "scratch",
                4 * self.prev_columns.capacity()
                    + self.scratch.input.heap_bytes()
                    + self.scratch.columns.heap_bytes(),
            ),
        ]
    }

    /// The next-value classifier, if the network has one, for inspection.
    pub fn classifier(&self) -> Option<&SdrClassifier> {
        self.classifier.as_ref()
    }

    /// The spatial pooler, for inspection.
    pub fn spatial_pooler(&self) -> &SpatialPooler {
        &self.sp
    }

    /// Segments and synapses in the temporal memory, for reporting.
    pub fn tm_size(&self) -> (usize, usize) {
        match &self.tm {
            Tm::Backtracking(tm) => (tm.num_segments(), tm.num_synapses()),
            Tm::Current(tm) => (
                tm.connections().num_segments(),
                tm.connections().num_synapses(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stream with daily structure and noise, like device telemetry.
    fn stream(seed: u64, len: usize) -> Vec<(i64, f64)> {
        let mut rng = crate::random::Random::new(seed);
        (0..len)
            .map(|i| {
                let t = 1_388_534_400 + 3600 * i as i64;
                let daily = ((i % 24) as f64 / 24.0 * std::f64::consts::TAU).sin();
                (t, 20.0 + 10.0 * daily + 2.0 * rng.real())
            })
            .collect()
    }

    fn small_params(tm: &str) -> NetworkParams {
        let mut p = NetworkParams::preset(tm, 0.0, 40.0, 400).unwrap();
        p.likelihood.learning_period = 20;
        p.likelihood.estimation_samples = 20;
        p
    }

    fn bits(i: &Inference) -> [u64; 5] {
        [
            i.raw_anomaly.to_bits(),
            i.likelihood.to_bits(),
            i.anomaly_score.to_bits(),
            i.prediction_next.map_or(u64::MAX, f64::to_bits),
            i.error.map_or(u64::MAX, f64::to_bits),
        ]
    }

    fn restore_matches_uninterrupted(preset: &str, seed: u64, len: usize, k: usize) {
        let data = stream(seed, len);
        let mut a = Network::new(small_params(preset)).unwrap();
        let full: Vec<_> = data
            .iter()
            .map(|&(t, v)| bits(&a.compute(t, v).unwrap()))
            .collect();

        let mut b = Network::new(small_params(preset)).unwrap();
        for &(t, v) in &data[..k] {
            b.compute(t, v).unwrap();
        }
        let mut c = Network::from_bytes(&b.to_bytes()).unwrap();
        assert_eq!(c, b, "restored network differs from the one saved");
        drop(b);
        for (i, &(t, v)) in data.iter().enumerate().skip(k) {
            assert_eq!(
                bits(&c.compute(t, v).unwrap()),
                full[i],
                "record {i} after restore at {k}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
        #[test]
        fn checkpoint_restore_is_bit_identical_backtracking(seed in 0u64..1000, k in 1usize..150) {
            restore_matches_uninterrupted("nab", seed, 160, k);
        }

        #[test]
        fn checkpoint_restore_is_bit_identical_current_tm(seed in 0u64..1000, k in 1usize..150) {
            restore_matches_uninterrupted("nab-tm", seed, 160, k);
        }
    }

    #[test]
    fn corrupt_checkpoint_is_rejected() {
        let mut net = Network::new(small_params("nab")).unwrap();
        for (t, v) in stream(1, 30) {
            net.compute(t, v).unwrap();
        }
        let mut bytes = net.to_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        let err = Network::from_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert!(Network::from_bytes(&bytes[..100]).is_err());
    }

    #[test]
    fn prediction_is_previous_prediction_next_and_error_lags_one_record() {
        let mut net = Network::new(small_params("nab")).unwrap();
        let data = stream(3, 200);
        let mut history: Vec<Inference> = Vec::new();
        for &(t, v) in &data {
            let inf = net.compute(t, v).unwrap();
            if let Some(prev) = history.last() {
                assert_eq!(inf.prediction, prev.prediction_next);
            }
            if history.len() >= 2 {
                let prev = history.last().unwrap();
                let expected = prev
                    .prediction
                    .map(|p| (p - data[history.len() - 1].1).abs());
                assert_eq!(inf.error, expected);
            }
            history.push(inf);
        }
        assert!(
            history
                .iter()
                .filter(|i| i.prediction_next.is_some())
                .count()
                > 190
        );
    }

    #[test]
    fn learns_a_periodic_stream_and_flags_a_break() {
        let mut net = Network::new(small_params("nab")).unwrap();
        // A clean daily pattern: after learning, raw anomaly is low and predictions track it.
        let pattern =
            |i: usize| 10.0 + 10.0 * ((i % 24) as f64 / 24.0 * std::f64::consts::TAU).sin();
        let mut late_raw = Vec::new();
        let mut late_err = Vec::new();
        for i in 0..24 * 30 {
            let inf = net
                .compute(1_388_534_400 + 3600 * i as i64, pattern(i))
                .unwrap();
            if i >= 24 * 25 {
                late_raw.push(inf.raw_anomaly);
                late_err.push(inf.error.unwrap());
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(
            mean(&late_raw) < 0.1,
            "raw anomaly on a learned pattern: {}",
            mean(&late_raw)
        );
        assert!(
            mean(&late_err) < 1.5,
            "prediction error on a learned pattern: {}",
            mean(&late_err)
        );
        // A value far outside the range seen so far is a spatial anomaly scored 1.0.
        let inf = net.compute(1_388_534_400 + 3600 * 720, 35.0).unwrap();
        assert!(inf.spatial_anomaly);
        assert_eq!(inf.anomaly_score, 1.0);
    }

    #[test]
    fn unknown_preset_is_a_clear_error() {
        let err = NetworkParams::preset("nope", 0.0, 1.0, 100).unwrap_err();
        assert!(err.to_string().contains("nab-tm"), "{err}");
    }
}
