//! Parameters of the backtracking temporal memory and their validation.

use super::permanence::{fixed_units, Codec, FIXED_SCALE};
use serde::{Deserialize, Serialize};

/// A parameter that cannot work, named the way NuPIC names it (in snake_case).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("invalid backtracking TM parameter `{name}`: {reason}")]
    Invalid { name: &'static str, reason: String },
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ParamError {
    ParamError::Invalid {
        name,
        reason: reason.into(),
    }
}

/// What [`super::BacktrackingTm::output_cells`] returns, as NuPIC's `outputType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OutputType {
    /// Union of the inference active and predicted cells.
    #[default]
    Normal,
    /// Inference active cells only.
    ActiveState,
    /// Inference active cells, keeping only the most confident cell of each active column.
    ActiveState1CellPerCol,
}

/// Which segment goes when [`BacktrackingTmParams::max_segments`] is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Eviction {
    /// The least recently active segment: created or reinforced longest ago (ties: lowest
    /// id).
    #[default]
    LeastRecentlyActive,
    /// The least recently active of the segments never reinforced since their creation (most
    /// of those grown on noise), and only when there is none, the least recently active of
    /// all.
    UnreinforcedFirst,
}

/// Parameters of NuPIC's backtracking TM (`BacktrackingTM` / `Cells4`), with NuPIC's names.
///
/// `Default` gives the settings of NAB's `numenta` detector (NuPIC's
/// `getScalarMetricWithTimeOfDayAnomalyParams` template): 2048 columns × 32 cells,
/// `initialPerm` 0.21, `minThreshold` 10, `activationThreshold` 13, `newSynapseCount` 20,
/// `pamLength` 3, fixed-size mode with 128 segments per cell and 32 synapses per segment, seed
/// 1960. NAB never overrides `connectedPerm`, so it keeps the TP default 0.5; the backtracking
/// buffer lengths and `maxSeqLength` keep the TP defaults too. One setting is not NuPIC's:
/// [`BacktrackingTmParams::max_segments`] caps the TM at 8192 segments (0 restores NuPIC's
/// unbounded growth).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BacktrackingTmParams {
    /// Number of mini-columns (the SP's column count).
    pub column_count: u32,
    /// Cells per column; cell 0 of each column is the "start cell" and never gets segments.
    pub cells_per_column: u32,
    /// Permanence of newly created synapses.
    pub initial_perm: f32,
    /// A synapse is connected when its permanence is `>= connected_perm`.
    pub connected_perm: f32,
    /// Least number of active synapses (connected or not) for a segment to count as a match
    /// when choosing which cell learns.
    pub min_threshold: u32,
    /// Number of synapses an update tries to have active (new ones are grown up to it).
    pub new_synapse_count: u32,
    /// Permanence increment of active synapses on a reinforced segment.
    pub permanence_inc: f32,
    /// Permanence decrement of inactive synapses on a reinforced segment.
    pub permanence_dec: f32,
    /// Permanence ceiling (at most 1).
    pub permanence_max: f32,
    /// Permanence removed from stale segments every `max_age` learning steps (0 = off).
    pub global_decay: f32,
    /// Active connected synapses needed to predict (and, counting all synapses, to add
    /// confidence).
    pub activation_threshold: u32,
    /// Learning steps a queued segment update stays valid. Without pooling (NAB) updates are
    /// applied or dropped at the next learning step, so any value `>= 1` behaves the same.
    pub segment_update_valid_duration: u32,
    /// Prediction-score burn-in of NuPIC's statistics; kept for parameter compatibility, the
    /// algorithm does not use it.
    pub burn_in: u32,
    /// Unpredicted learning steps tolerated before learning starts over ("pay attention mode").
    pub pam_length: u32,
    /// Past inputs kept for inference backtracking (0 disables it; see the module docs).
    pub max_inf_backtrack: u32,
    /// Past inputs kept for learning backtracking (0 disables it).
    pub max_lrn_backtrack: u32,
    /// Interval and age threshold of global decay (0 = off; must be 0 in fixed-size mode).
    pub max_age: u32,
    /// Longest sequence learned before starting over (0 = unbounded).
    pub max_seq_length: u32,
    /// Segment cap per cell; -1 = unbounded (NuPIC's non-fixed-size mode).
    pub max_segments_per_cell: i32,
    /// Synapse cap per segment; -1 = unbounded. Must be -1 exactly when
    /// `max_segments_per_cell` is.
    pub max_synapses_per_segment: i32,
    /// Budget of live segments in the whole TM; 0 = unlimited, as in NuPIC. Creating a
    /// segment at the budget first frees the least recently active one (created or reinforced
    /// longest ago; ties: lowest id). It bounds memory and the cost of a step, which grows
    /// with the segment count (NAB's noisiest files reach 100,000 segments unbounded).
    /// Default 8192: on NAB (standard profile) 0 scores 70.69, 8192 70.37, 6144 67.93.
    pub max_segments: u32,
    /// Which segment `max_segments` frees.
    pub max_segments_eviction: Eviction,
    /// Seed of the TM's private random generator.
    pub seed: u64,
    /// What [`super::BacktrackingTm::output_cells`] reports.
    pub output_type: OutputType,
}

impl Default for BacktrackingTmParams {
    fn default() -> Self {
        BacktrackingTmParams {
            column_count: 2048,
            cells_per_column: 32,
            initial_perm: 0.21,
            connected_perm: 0.50,
            min_threshold: 10,
            new_synapse_count: 20,
            permanence_inc: 0.1,
            permanence_dec: 0.1,
            permanence_max: 1.0,
            global_decay: 0.0,
            activation_threshold: 13,
            segment_update_valid_duration: 5,
            burn_in: 2,
            pam_length: 3,
            max_inf_backtrack: 10,
            max_lrn_backtrack: 5,
            max_age: 0,
            max_seq_length: 32,
            max_segments_per_cell: 128,
            max_synapses_per_segment: 32,
            max_segments: 8192,
            max_segments_eviction: Eviction::LeastRecentlyActive,
            seed: 1960,
            output_type: OutputType::Normal,
        }
    }
}

impl BacktrackingTmParams {
    /// Checks every constraint NuPIC asserts, plus the ones this implementation relies on.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.column_count == 0 {
            return Err(invalid("column_count", "must be at least 1"));
        }
        if self.cells_per_column == 0 {
            return Err(invalid("cells_per_column", "must be at least 1"));
        }
        if (self.column_count as u64) * (self.cells_per_column as u64) > super::MAX_CELLS {
            return Err(invalid(
                "cells_per_column",
                format!(
                    "column_count × cells_per_column = {} cells is too many",
                    self.column_count as u64 * self.cells_per_column as u64
                ),
            ));
        }
        let unit = |name: &'static str, v: f32| -> Result<(), ParamError> {
            if v.is_finite() && (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(invalid(name, format!("must be within [0, 1], got {v}")))
            }
        };
        unit("initial_perm", self.initial_perm)?;
        unit("connected_perm", self.connected_perm)?;
        unit("permanence_inc", self.permanence_inc)?;
        unit("permanence_dec", self.permanence_dec)?;
        unit("permanence_max", self.permanence_max)?;
        unit("global_decay", self.global_decay)?;
        if self.permanence_max <= 0.0 {
            return Err(invalid("permanence_max", "must be positive"));
        }
        if self.initial_perm > self.permanence_max {
            return Err(invalid(
                "initial_perm",
                format!(
                    "{} exceeds permanence_max {}",
                    self.initial_perm, self.permanence_max
                ),
            ));
        }
        if self.connected_perm <= 0.0 {
            return Err(invalid("connected_perm", "must be positive"));
        }
        if self.activation_threshold == 0 {
            return Err(invalid("activation_threshold", "must be at least 1"));
        }
        if self.min_threshold == 0 {
            return Err(invalid("min_threshold", "must be at least 1"));
        }
        if self.new_synapse_count == 0 {
            return Err(invalid("new_synapse_count", "must be at least 1"));
        }
        if self.pam_length == 0 {
            return Err(invalid(
                "pam_length",
                "must be at least 1 (NuPIC asserts pamLength > 0)",
            ));
        }
        if self.segment_update_valid_duration == 0 {
            return Err(invalid(
                "segment_update_valid_duration",
                "must be at least 1, or queued updates expire before they can apply",
            ));
        }
        if self.global_decay > 0.0 && self.max_age == 0 {
            return Err(invalid(
                "max_age",
                "must be positive when global_decay is on",
            ));
        }
        let fixed_size = self.max_segments_per_cell != -1 || self.max_synapses_per_segment != -1;
        if fixed_size {
            if self.max_segments_per_cell <= 0 {
                return Err(invalid(
                    "max_segments_per_cell",
                    format!(
                        "must be positive (or -1 together with max_synapses_per_segment), got {}",
                        self.max_segments_per_cell
                    ),
                ));
            }
            if self.max_synapses_per_segment <= 0 {
                return Err(invalid(
                    "max_synapses_per_segment",
                    format!(
                        "must be positive (or -1 together with max_segments_per_cell), got {}",
                        self.max_synapses_per_segment
                    ),
                ));
            }
            if self.global_decay != 0.0 {
                return Err(invalid(
                    "global_decay",
                    "must be 0 in fixed-size mode (max_segments_per_cell > 0)",
                ));
            }
            if self.max_age != 0 {
                return Err(invalid(
                    "max_age",
                    "must be 0 in fixed-size mode (max_segments_per_cell > 0)",
                ));
            }
            if (self.max_synapses_per_segment as u32) < self.new_synapse_count {
                return Err(invalid(
                    "max_synapses_per_segment",
                    format!(
                        "{} is below new_synapse_count {}",
                        self.max_synapses_per_segment, self.new_synapse_count
                    ),
                ));
            }
        }
        let codec = Codec::new(self);
        if !codec.is_exact_float32() {
            // Fixed point: a step below its resolution would vanish.
            for (name, v) in [
                ("initial_perm", self.initial_perm),
                ("connected_perm", self.connected_perm),
                ("permanence_inc", self.permanence_inc),
                ("permanence_dec", self.permanence_dec),
                ("global_decay", self.global_decay),
            ] {
                if v > 0.0 && fixed_units(v) == 0 {
                    return Err(invalid(
                        name,
                        format!("{v} is below the permanence resolution 1/{FIXED_SCALE}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Total number of cells.
    pub fn num_cells(&self) -> usize {
        self.column_count as usize * self.cells_per_column as usize
    }

    /// Most synapses a segment can hold: the cap in fixed-size mode (updates free synapses
    /// before growing past it), else one per cell.
    pub(crate) fn max_segment_size(&self) -> u64 {
        let cells = self.num_cells() as u64;
        if self.max_synapses_per_segment > 0 {
            cells.min(self.max_synapses_per_segment as u64)
        } else {
            cells
        }
    }
}
