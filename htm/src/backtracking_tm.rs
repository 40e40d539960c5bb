//! NuPIC's backtracking temporal memory: the "TP" (`BacktrackingTM` in Python, `Cells4` in
//! C++), the sequence memory behind NuPIC's best NAB scores.
//!
//! # What NuPIC does, and what this module reproduces
//!
//! NAB's `numenta` detector ran an OPF `HTMPredictionModel` with `inferenceType:
//! TemporalAnomaly` and `temporalImp: "cpp"`, i.e. `BacktrackingTMCPP`, a thin Python shell
//! around the C++ `Cells4`. Where the Python `BacktrackingTM` and `Cells4` differ, this module
//! follows `Cells4`:
//!
//! * **Segments live in per-cell slots.** A released segment leaves an empty slot that the
//!   cell's next new segment reuses (last freed first). Iteration order is slot order, which
//!   decides ties, and the `max_segments_per_cell` test counts *slots*, empty ones included.
//!   When every non-start cell of a column has its quota of slots, the non-empty segment with
//!   the lowest duty cycle in the column is released to make room (`getCellForNewSegment`).
//! * **Best-matching cell** (both `getBestMatchingCellT1` with `min_threshold` in learning
//!   phase 1 and `getBestMatchingCellT` with `activation_threshold` in learning phase 2) counts
//!   active synapses whatever their permanence; the winner is the segment with the most active
//!   synapses, ties going to the highest cell index and then to the lowest slot.
//! * **Synapse freeing** (`freeNSynapses`): when an update would exceed
//!   `max_synapses_per_segment`, the inactive synapses with the lowest permanence go first
//!   (ties: lowest presynaptic cell), then active ones.
//! * **Duty cycles** use `Segment::dutyCycle`'s tiers and `f32` arithmetic, are refreshed on
//!   every segment at each tier boundary, and are cached whenever they are read (inference
//!   reads them too), exactly like `Cells4`.
//! * **Confidences**: inference phase 2 gives every segment with at least
//!   `activation_threshold` active synapses — connected or not — its duty cycle as confidence
//!   for its cell and column, then normalises by the total; a cell is *predicted* only when a
//!   segment reaches the threshold with connected synapses.
//! * **Thresholds**: inference phase 1 is "in sequence" when at least half the active columns
//!   had a predicted cell; phase 2 when at least half the average input density of columns is
//!   predicted; learning phase 1 when fewer than `⌊active/2⌋` columns were unpredicted.
//! * **Backtracking** (inference): on losing the sequence, replay the buffered inputs from the
//!   start cells of the oldest one onward and keep the first start point that stays in
//!   sequence up to the current input; failing that, keep the bursting state. Buffered inputs
//!   that failed as start points, and the chosen one, leave the buffer. Learning backtracks the
//!   same way (read-only trials, then a learning replay of the chosen path) whenever it starts
//!   over: after `pam_length` unpredicted steps, at `max_seq_length`, or after a reset.
//!
//! # The anomaly score and [`BacktrackingTm::predicted_columns`]
//!
//! In anomaly mode NuPIC's `TMRegion` takes, *before* each compute,
//! `prevPredictedColumns = tm.topDownCompute().nonzero()`; for this TM `topDownCompute()`
//! returns the column confidences of the previous step. The score is then
//! `computeRawAnomalyScore(active, prevPredictedColumns)` = the fraction of active columns
//! outside that set (0 when nothing is active). So the "predicted columns" of NAB's score are
//! the columns with non-zero confidence — those holding a segment with at least
//! `activation_threshold` active synapses *counting unconnected ones* — a superset of the
//! columns of [`BacktrackingTm::predictive_cells`]. [`BacktrackingTm::compute`] returns that
//! score, and a reset empties the set (the first input after a reset scores 1).
//!
//! # Deliberate differences
//!
//! * NuPIC's random stream (its own `Random`) cannot be reproduced; draws come from the
//!   crate's seeded [`Random`], in the same places and order.
//! * With `max_inf_backtrack = 0`, NuPIC's backtrack returns before recomputing predictions, so
//!   an unpredicted input leaves the previous step's predictions in place (a bug). Here the
//!   predictions are recomputed from the bursting state, which makes 0 a clean "no inference
//!   backtracking" switch. NAB uses 10, where both behave the same.
//! * The `t-1` confidences and active state are not kept: only NuPIC's statistics read them.
//! * Pooling (`doPooling`) is not implemented; NAB does not use it, and without it queued
//!   segment updates are applied or dropped at the next learning step.
//! * A queued update whose segment has been released is dropped (`Cells4` could apply it to a
//!   new segment that reused the slot).
//! * NuPIC's statistics (`collectStats`, `burnIn`) are not computed.
//!
//! # Bounded growth: `max_segments`
//!
//! NuPIC bounds segments per cell and synapses per segment, but not the TM as a whole: on
//! noisy data every unpredicted column grows a segment, and a NAB file can end with 100,000
//! segments and 2 million synapses. [`BacktrackingTmParams::max_segments`] caps the total:
//! creating a segment at the cap first frees the least recently active one (the lowest
//! `last_active_iteration`, i.e. the longest since it was created or reinforced; ties go to the
//! lowest id). With the cap at 0 the TM is NuPIC's, bit for bit.
//!
//! # Cost
//!
//! Almost all the time goes into forward passes (`computeForwardPropagation`): every active
//! cell adds one to each segment it has a synapse on. The TP activates *every* predicted cell
//! of an active column, bursts whole columns, and replays up to `max_inf_backtrack` past inputs
//! when it loses the sequence, so a step walks thousands to tens of thousands of synapses, and
//! the more segments the TM has, the more. To keep that walk cheap:
//!
//! * each cell lists the segments it projects to (`Cells4`'s `OutSynapses`) in two lists,
//!   connected synapses and the others, so a pass adds a fixed increment per list; all lists
//!   share one arena laid out by cell, so a column's lists are adjacent;
//! * entries are segment ids as narrow as the segment budget allows (16 bits for NAB's),
//!   and a removed entry is replaced by the list's last one, so lists stay dense and a
//!   synapse needs no record of where its entry is (lists are short: finding it is cheap);
//! * a segment's two counts share one word (16 bits with NAB's segment size), so a synapse
//!   costs one read-modify-write and an 8192-segment table fits in L1; the table is cleared
//!   before a pass (cheaper than testing a pass number per synapse), and the segments
//!   reaching the threshold are collected during the walk;
//! * a segment's synapses are one vector sorted by presynaptic cell, so learning compares
//!   short sorted lists instead of looking cells up;
//! * a queued segment update keeps only its random choices (see `PendingUpdate`): most are
//!   never applied, and an applied one is rebuilt from the state in the same walk that adapts
//!   the segment.
//!
//! Everything else (ranking, duty cycles, updates) works on the few hundred segments a pass
//! qualifies.

/// Runs `$body` with `$x` bound to the payload of whichever variant `$value` (an `$enum` with
/// `Narrow` and `Wide` variants holding the same generic structure at two word widths) is.
macro_rules! by_width {
    ($enum:ident, $value:expr, $x:ident => $body:expr) => {
        match $value {
            $enum::Narrow($x) => $body,
            $enum::Wide($x) => $body,
        }
    };
}

mod arena;
mod cell_state;
mod heads;
mod params;
mod permanence;
mod recency;
mod slots;
mod store;
#[cfg(test)]
mod tests;

pub use params::{BacktrackingTmParams, Eviction, OutputType, ParamError};
pub use permanence::{Code, FIXED_SCALE};
pub use store::{SegmentId, Synapse};

use std::cell::Cell;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::random::Random;
use arena::{CodeWord, SynapseArena, SynsMut};
use cell_state::{is_set, size_bits, Bits, CellList, CellState};
use permanence::{Codec, LearningSteps, DROPPED};
use recency::Recency;
use slots::CellSlots;
use store::{Entry, Lists, OutIndex, SINK};

/// Learning-iteration boundaries at which the duty-cycle moving average changes its rate.
const DUTY_CYCLE_TIERS: [u32; 9] = [0, 100, 320, 1000, 3200, 10000, 32000, 100000, 320000];
/// `DUTY_CYCLE_ALPHAS[n]` is used once the iteration exceeds `DUTY_CYCLE_TIERS[n]`.
const DUTY_CYCLE_ALPHAS: [f32; 9] = [
    0.0, 0.0032, 0.0010, 0.00032, 0.00010, 0.000032, 0.000010, 0.0000032, 0.0000010,
];

/// Per-segment bookkeeping of `Cells4::Segment`, indexed by [`SegmentId`], in five words.
/// (`Cells4`'s `totalActivations` only feeds its statistics, so it is not kept.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MetaWire", into = "MetaWire")]
struct SegmentMeta {
    /// The owner cell in the low [`CELL_BITS`] bits, then [`SegmentMeta::ALIVE`],
    /// [`SegmentMeta::SEQUENCE`] and the low bits of the slot.
    cell_flags: u32,
    /// The high bits of the slot above [`SegmentMeta::ACTIVATION_BITS`], and below them
    /// `positiveActivations`, saturating: it is read as a number only while the learning
    /// iteration is at most 100 (the first duty-cycle tier), which keeps it far below the
    /// bound, and after that only compared with 1.
    slot_activations: u32,
    last_active_iteration: u32,
    last_pos_duty_cycle: f32,
    last_pos_duty_cycle_iteration: u32,
}

/// The serialised form of [`SegmentMeta`]: one field each.
#[derive(Serialize, Deserialize)]
struct MetaWire {
    /// The owner cell, then [`MetaWire::ALIVE`] and [`MetaWire::SEQUENCE`].
    cell_flags: u32,
    slot: u32,
    positive_activations: u32,
    last_active_iteration: u32,
    last_pos_duty_cycle: f32,
    last_pos_duty_cycle_iteration: u32,
}

impl MetaWire {
    const ALIVE: u32 = 1 << 24;
    const SEQUENCE: u32 = 1 << 25;
}

impl TryFrom<MetaWire> for SegmentMeta {
    type Error = String;

    fn try_from(w: MetaWire) -> Result<Self, String> {
        let cell = w.cell_flags & (MetaWire::ALIVE - 1);
        if u64::from(cell) > MAX_CELLS || w.slot > SegmentMeta::MAX_SLOT {
            return Err(format!("segment of cell {cell} in slot {}", w.slot));
        }
        let mut m = SegmentMeta::new(cell, w.slot, w.cell_flags & MetaWire::SEQUENCE != 0, 0);
        if w.cell_flags & MetaWire::ALIVE == 0 {
            m.cell_flags &= !SegmentMeta::ALIVE;
        }
        m.set_positive_activations(w.positive_activations);
        m.last_active_iteration = w.last_active_iteration;
        m.last_pos_duty_cycle = w.last_pos_duty_cycle;
        m.last_pos_duty_cycle_iteration = w.last_pos_duty_cycle_iteration;
        Ok(m)
    }
}

impl From<SegmentMeta> for MetaWire {
    fn from(m: SegmentMeta) -> Self {
        let flags = if m.alive() { MetaWire::ALIVE } else { 0 }
            | if m.sequence() { MetaWire::SEQUENCE } else { 0 };
        MetaWire {
            cell_flags: m.cell() | flags,
            slot: m.slot(),
            positive_activations: m.positive_activations(),
            last_active_iteration: m.last_active_iteration,
            last_pos_duty_cycle: m.last_pos_duty_cycle,
            last_pos_duty_cycle_iteration: m.last_pos_duty_cycle_iteration,
        }
    }
}

impl SegmentMeta {
    const ALIVE: u32 = 1 << CELL_BITS;
    const SEQUENCE: u32 = 1 << (CELL_BITS + 1);
    /// Where the slot's low bits start in `cell_flags`.
    const SLOT_SHIFT: u32 = CELL_BITS + 2;
    const ACTIVATION_BITS: u32 = 16;
    /// Slots take the rest of both words: 26 bits, far more than a cell can have.
    const MAX_SLOT: u32 = (1 << (2 * u32::BITS - Self::SLOT_SHIFT - Self::ACTIVATION_BITS)) - 1;

    fn new(cell: u32, slot: u32, sequence: bool, iteration: u32) -> Self {
        debug_assert!(u64::from(cell) <= MAX_CELLS);
        assert!(slot <= Self::MAX_SLOT, "segment slot {slot} of cell {cell}");
        let low_slot_bits = u32::BITS - Self::SLOT_SHIFT;
        SegmentMeta {
            cell_flags: cell
                | Self::ALIVE
                | if sequence { Self::SEQUENCE } else { 0 }
                | slot << Self::SLOT_SHIFT,
            slot_activations: slot >> low_slot_bits << Self::ACTIVATION_BITS | 1,
            last_active_iteration: iteration,
            last_pos_duty_cycle: (1.0f64 / iteration.max(1) as f64) as f32,
            last_pos_duty_cycle_iteration: iteration,
        }
    }

    #[inline]
    fn cell(&self) -> u32 {
        self.cell_flags & (Self::ALIVE - 1)
    }

    #[inline]
    fn alive(&self) -> bool {
        self.cell_flags & Self::ALIVE != 0
    }

    #[inline]
    fn sequence(&self) -> bool {
        self.cell_flags & Self::SEQUENCE != 0
    }

    /// The segment's slot on its cell.
    #[inline]
    fn slot(&self) -> u32 {
        let low_slot_bits = u32::BITS - Self::SLOT_SHIFT;
        self.cell_flags >> Self::SLOT_SHIFT
            | self.slot_activations >> Self::ACTIVATION_BITS << low_slot_bits
    }

    fn release(&mut self) {
        self.cell_flags &= !Self::ALIVE;
    }

    #[inline]
    fn positive_activations(&self) -> u32 {
        self.slot_activations & ((1 << Self::ACTIVATION_BITS) - 1)
    }

    fn set_positive_activations(&mut self, n: u32) {
        let max = (1 << Self::ACTIVATION_BITS) - 1;
        self.slot_activations = self.slot_activations & !max | n.min(max);
    }

    /// `Segment::dutyCycle`: how often this segment predicted correctly, as a tiered moving
    /// average. Unless `read_only`, the result is cached, which changes later rounding, so it
    /// is called exactly where `Cells4` calls it.
    fn duty_cycle(
        &mut self,
        iteration: u32,
        active: bool,
        read_only: bool,
        pow: &mut PowCache,
    ) -> f32 {
        debug_assert!(iteration > 0, "duty cycles need a learning iteration");
        if iteration <= DUTY_CYCLE_TIERS[1] {
            let dc = self.positive_activations() as f32 / iteration.max(1) as f32;
            if !read_only {
                self.last_pos_duty_cycle_iteration = iteration;
                self.last_pos_duty_cycle = dc;
            }
            return dc;
        }
        let age = iteration - self.last_pos_duty_cycle_iteration;
        if age == 0 && !active {
            return self.last_pos_duty_cycle;
        }
        let tier = (1..DUTY_CYCLE_TIERS.len())
            .rev()
            .find(|&t| iteration > DUTY_CYCLE_TIERS[t])
            .unwrap_or(0);
        let alpha = DUTY_CYCLE_ALPHAS[tier];
        // Cells4 raises in double precision and rounds before multiplying in single.
        let mut dc = pow.decay(tier, age) * self.last_pos_duty_cycle;
        if active {
            dc += alpha;
        }
        if !read_only {
            self.last_pos_duty_cycle = dc;
            self.last_pos_duty_cycle_iteration = iteration;
        }
        dc
    }
}

/// Memoised `(1 - alpha[tier])^age`, raised in double precision and rounded to single as
/// `Cells4` uses it: the same values `pow` gives, without paying for `pow` on every
/// confidence read. Only the current tier is kept (iterations only go up, so an old tier
/// never comes back).
#[derive(Clone, Debug, Default)]
struct PowCache {
    tier: usize,
    table: Vec<f32>,
}

impl PowCache {
    const MAX_AGE: usize = 4096;

    fn decay(&mut self, tier: usize, age: u32) -> f32 {
        let base = 1.0f64 - DUTY_CYCLE_ALPHAS[tier] as f64;
        if age as usize >= Self::MAX_AGE {
            return base.powf(age as f64) as f32;
        }
        if tier != self.tier || self.table.is_empty() {
            self.tier = tier;
            self.table.clear();
            self.table.resize(Self::MAX_AGE, f32::NAN);
        }
        let v = &mut self.table[age as usize];
        if v.is_nan() {
            *v = base.powf(age as f64) as f32;
        }
        *v
    }
}

/// A queued reinforcement of an existing segment (`Cells4::SegmentUpdate`).
///
/// NuPIC lists the update's presynaptic cells when it queues it, but most queued updates
/// are dropped unapplied. Until it is applied, neither the segment nor the learning state it
/// was built from changes (that state is the previous one by then), so only the random choices
/// of new cells are made when queueing — in the same order, from the same generator — and
/// `update_pool[start..start + len]` holds them; the cells are listed when the update applies
/// (`explicit` false). Global decay, which changes segments in between, first turns pending
/// updates into their cell lists (`explicit` true: the pool range holds the sorted cells).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct PendingUpdate {
    cell: u32,
    segment: SegmentId,
    timestamp: u32,
    start: u32,
    len: u32,
    explicit: bool,
}

/// Where [`BacktrackingTm::build_update`] gets its random choices of new cells.
#[derive(Clone, Copy)]
enum Choices<'a> {
    /// Draw them now.
    Draw,
    /// Use these, drawn when the update was queued ([`BacktrackingTm::draw_choices`]).
    Replay(&'a [u32]),
}

/// How often each backtracking path ran (diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BacktrackStats {
    /// Inference steps that lost the sequence and tried to backtrack.
    pub inference_backtracks: u64,
    /// ... of which found a start point (past or current input) that stays in sequence.
    pub inference_lock_ons: u64,
    /// Learning start-overs that tried to backtrack.
    pub learning_backtracks: u64,
    /// ... of which found an earlier start point.
    pub learning_lock_ons: u64,
    /// Segments freed to stay within `max_segments`.
    pub evictions: u64,
}

/// Per-segment counts of one forward pass: active synapses whatever their permanence
/// (`potential`) and active connected ones, packed in one word per segment so that a synapse
/// costs one read-modify-write. The segments reaching the pass's threshold are collected as
/// the counts rise.
///
/// The words are as narrow as the largest possible segment allows: with NAB's 32 synapses
/// per segment, `u16` (two 8-bit halves) keeps the table of an 8192-segment TM at 16 KiB,
/// well within L1.
#[derive(Clone, Debug, Default)]
struct Activity {
    width: Width,
    counts16: Vec<u16>,
    counts32: Vec<u32>,
    counts64: Vec<u64>,
    clearing: Clearing,
    /// Segments whose potential count reached the threshold, in no particular order.
    qualified: Vec<SegmentId>,
    /// Per active cell of a pass, where its out lists are: looked up once, as the pass
    /// needs them three times (sizing, prefetch, counting).
    blocks: Vec<u32>,
}

/// The counters a pass may have left non-zero: those listed in `touched` when `tracked`,
/// else the first `dirty` ones.
#[derive(Clone, Debug, Default)]
struct Clearing {
    touched: Vec<SegmentId>,
    tracked: bool,
    dirty: usize,
}

impl Clearing {
    /// Zeroes the counters of `counts` a pass left non-zero.
    fn clear<C: Counter>(&mut self, counts: &mut [C]) {
        if self.tracked {
            for &seg in &self.touched {
                counts[seg as usize] = C::default();
            }
        } else {
            counts[..self.dirty].fill(C::default());
        }
        self.touched.clear();
        self.dirty = 0;
    }
}

/// Which counter word [`Activity`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Width {
    #[default]
    W16,
    W32,
    W64,
}

/// A packed counter word: `connected << HALF | potential`. A count never exceeds its
/// segment's synapses, which the width is chosen to hold.
trait Counter: Copy + Default + Eq {
    const ONE: Self;
    const ONE_CONNECTED: Self;
    fn plus(self, other: Self) -> Self;
    fn potential(self) -> u32;
    fn connected(self) -> u32;
    /// `potential() >= threshold`, compared in the word's own width (so that vector code
    /// compares whole words).
    fn potential_at_least(self, threshold: u32) -> bool;
    /// [`scan`] with the widest vectors the CPU has.
    fn scan_best(counts: &[Self], threshold: u32, out: &mut Vec<SegmentId>) {
        scan_best(counts, threshold, out);
    }
}

macro_rules! counter {
    ($t:ty, $half:expr $(, $scan:item)?) => {
        impl Counter for $t {
            $($scan)?
            const ONE: Self = 1;
            const ONE_CONNECTED: Self = 1 | 1 << $half;
            #[inline]
            fn plus(self, other: Self) -> Self {
                self.wrapping_add(other)
            }
            #[inline]
            fn potential(self) -> u32 {
                (self & ((1 << $half) - 1)) as u32
            }
            #[inline]
            fn connected(self) -> u32 {
                (self >> $half) as u32
            }
            #[inline]
            fn potential_at_least(self, threshold: u32) -> bool {
                // A threshold beyond the half cannot be reached; clamp it to the first such.
                let t = u64::from(threshold).min(1 << $half) as $t;
                self & ((1 << $half) - 1) >= t
            }
        }
    };
}
counter!(
    u16,
    8,
    fn scan_best(counts: &[Self], threshold: u32, out: &mut Vec<SegmentId>) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was detected at run time.
                return unsafe { scan_u16_avx2(counts, threshold, out) };
            }
        }
        scan(counts, threshold, out);
    }
);
counter!(u32, 16);
counter!(u64, 32);

/// How many cells ahead a forward pass asks for the out lists it will read.
const PREFETCH_AHEAD: usize = 6;

/// Largest cell count the TM accepts (cell ids and counts stay well within `u32`).
pub(crate) const MAX_CELLS: u64 = (1 << 20) - 1;
/// Bits a cell id takes.
const CELL_BITS: u32 = u64::BITS - MAX_CELLS.leading_zeros();

impl Activity {
    /// Sizes the counters for segments of at most `max_synapses` synapses.
    fn set_width(&mut self, max_synapses: u64) {
        self.width = if max_synapses < 1 << 8 {
            Width::W16
        } else if max_synapses < 1 << 16 {
            Width::W32
        } else {
            Width::W64
        };
    }

    /// Zeroes the counters the last pass left non-zero, so that the buffers can serve
    /// another TM (whose passes may use another width) as they are.
    fn clear(&mut self) {
        match self.width {
            Width::W16 => self.clearing.clear(&mut self.counts16),
            Width::W32 => self.clearing.clear(&mut self.counts32),
            Width::W64 => self.clearing.clear(&mut self.counts64),
        }
    }

    /// NuPIC's `computeForwardPropagation`, counting connected synapses in the same pass and
    /// collecting the segments with at least `threshold` (> 0) active synapses.
    fn propagate(
        &mut self,
        index: &OutIndex,
        segment_capacity: usize,
        active_cells: &[u32],
        threshold: u32,
    ) {
        debug_assert!(threshold > 0);
        self.qualified.clear();
        match index {
            OutIndex::Narrow(lists) => {
                self.walk_width(lists, segment_capacity, active_cells, threshold)
            }
            OutIndex::Wide(lists) => {
                self.walk_width(lists, segment_capacity, active_cells, threshold)
            }
        }
    }

    fn walk_width<E: Entry>(
        &mut self,
        lists: &Lists<E>,
        segment_capacity: usize,
        active_cells: &[u32],
        threshold: u32,
    ) {
        let blocks = &mut self.blocks;
        blocks.clear();
        blocks.extend(active_cells.iter().map(|&cell| lists.block(cell)));
        let (clearing, qualified) = (&mut self.clearing, &mut self.qualified);
        let pass = (lists, segment_capacity, &blocks[..], threshold);
        match self.width {
            Width::W16 => Self::walk(&mut self.counts16, clearing, qualified, pass),
            Width::W32 => Self::walk(&mut self.counts32, clearing, qualified, pass),
            Width::W64 => Self::walk(&mut self.counts64, clearing, qualified, pass),
        }
    }

    /// Clears the previous pass's counts and counts this one's into `counts`.
    ///
    /// Clearing the used part of the table costs less than finding the non-zero counters
    /// when the pass walks a fair share of the table's size; for a pass much smaller than the
    /// table (a large unbounded TM), the counters a pass raises from zero are listed instead.
    fn walk<C: Counter, E: Entry>(
        counts: &mut Vec<C>,
        clearing: &mut Clearing,
        qualified: &mut Vec<SegmentId>,
        (index, segment_capacity, blocks, threshold): (&Lists<E>, usize, &[u32], u32),
    ) {
        clearing.clear(counts);
        // A power-of-two table lets the index be masked instead of bounds-checked; segment
        // ids stay below `segment_capacity`, so only that prefix is ever written.
        let len = segment_capacity.next_power_of_two();
        if counts.len() < len {
            counts.resize(len, C::default());
        }
        let mask = counts.len() - 1;
        let counts = counts.as_mut_slice();
        // Entries of the pass, counted only as far as the choice needs.
        let limit = segment_capacity / 16;
        let mut entries = 0;
        for &h in blocks {
            if entries >= limit {
                break;
            }
            entries += index.lists_at(h).iter().map(|l| l.len()).sum::<usize>();
        }
        clearing.tracked = entries < limit;
        clearing.dirty = segment_capacity;
        if clearing.tracked {
            let touched = &mut clearing.touched;
            let mut count = |list: &[E], increment: C| {
                for &seg in list {
                    let c = &mut counts[seg.get() & mask];
                    if *c == C::default() {
                        touched.push(seg.id());
                    }
                    *c = c.plus(increment);
                    if c.potential() == threshold {
                        qualified.push(seg.id());
                    }
                }
            };
            for (i, &h) in blocks.iter().enumerate() {
                if let Some(&ahead) = blocks.get(i + PREFETCH_AHEAD) {
                    index.prefetch_at(ahead);
                }
                let [connected, other] = index.lists_at(h);
                count(connected, C::ONE_CONNECTED);
                count(other, C::ONE);
            }
        } else {
            // The walk only counts (a test per synapse would cost it a third more work);
            // a vector scan of the table then finds the qualified segments.
            for (i, &h) in blocks.iter().enumerate() {
                if let Some(&ahead) = blocks.get(i + PREFETCH_AHEAD) {
                    index.prefetch_at(ahead);
                }
                let [connected, other] = index.lists_at(h);
                for &seg in connected {
                    let c = &mut counts[seg.get() & mask];
                    *c = c.plus(C::ONE_CONNECTED);
                }
                for &seg in other {
                    let c = &mut counts[seg.get() & mask];
                    *c = c.plus(C::ONE);
                }
            }
            C::scan_best(&counts[..segment_capacity], threshold, qualified);
        }
    }

    #[inline]
    fn potential(&self, seg: SegmentId) -> u32 {
        match self.width {
            Width::W16 => self.counts16[seg as usize].potential(),
            Width::W32 => self.counts32[seg as usize].potential(),
            Width::W64 => self.counts64[seg as usize].potential(),
        }
    }

    #[inline]
    fn connected(&self, seg: SegmentId) -> u32 {
        match self.width {
            Width::W16 => self.counts16[seg as usize].connected(),
            Width::W32 => self.counts32[seg as usize].connected(),
            Width::W64 => self.counts64[seg as usize].connected(),
        }
    }

    fn heap_bytes(&self) -> usize {
        self.counts16.capacity() * 2
            + self.counts32.capacity() * 4
            + self.counts64.capacity() * 8
            + (self.clearing.touched.capacity() + self.qualified.capacity()) * 4
            + self.blocks.capacity() * 4
    }
}

/// Appends to `out` the index of every counter in `counts` whose potential count is at least
/// `threshold`, ascending.
#[inline(always)]
fn scan<C: Counter>(counts: &[C], threshold: u32, out: &mut Vec<SegmentId>) {
    let mut chunks = counts.chunks_exact(64);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut bits = 0u64;
        for (j, c) in chunk.iter().enumerate() {
            bits |= u64::from(c.potential_at_least(threshold)) << j;
        }
        push_bits(bits, base, out);
        base += 64;
    }
    scan_rest(chunks.remainder(), base, threshold, out);
}

/// Appends `base + i` for every set bit `i` of `bits`, ascending.
#[inline(always)]
fn push_bits(mut bits: u64, base: usize, out: &mut Vec<SegmentId>) {
    while bits != 0 {
        out.push((base + bits.trailing_zeros() as usize) as SegmentId);
        bits &= bits - 1;
    }
}

/// [`scan`] of the last counters, `base` onwards, one by one.
#[inline(always)]
fn scan_rest<C: Counter>(rest: &[C], base: usize, threshold: u32, out: &mut Vec<SegmentId>) {
    for (j, c) in rest.iter().enumerate() {
        if c.potential_at_least(threshold) {
            out.push((base + j) as SegmentId);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scan_avx2<C: Counter>(counts: &[C], threshold: u32, out: &mut Vec<SegmentId>) {
    scan(counts, threshold, out);
}

/// [`scan`] of 8-bit potential counts in hand-written AVX2: 64 counters are compared in four
/// vectors, and only a block with a qualified one (a few in a hundred) is turned into bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scan_u16_avx2(counts: &[u16], threshold: u32, out: &mut Vec<SegmentId>) {
    use std::arch::x86_64::*;
    // As `potential_at_least`: a threshold past the 8-bit half is never reached. Counts are
    // at most 255, so the signed comparison with `threshold - 1` is exact.
    let below = threshold.clamp(1, 256) as i16 - 1;
    let (half, below) = (_mm256_set1_epi16(0xff), _mm256_set1_epi16(below));
    let mut chunks = counts.chunks_exact(64);
    let mut base = 0;
    for chunk in &mut chunks {
        let p = chunk.as_ptr().cast::<__m256i>();
        // SAFETY: a chunk is 64 `u16`, the four unaligned 32-byte loads.
        let [a, b, c, d] = std::array::from_fn(|k| unsafe {
            let v = _mm256_loadu_si256(p.add(k));
            _mm256_cmpgt_epi16(_mm256_and_si256(v, half), below)
        });
        let any = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
        if _mm256_testz_si256(any, any) == 0 {
            // Packing interleaves the 128-bit halves; the permutation puts counters back in
            // order before their byte masks become bits.
            let ab = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(a, b));
            let cd = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(c, d));
            let bits = u64::from(_mm256_movemask_epi8(ab) as u32)
                | u64::from(_mm256_movemask_epi8(cd) as u32) << 32;
            push_bits(bits, base, out);
        }
        base += 64;
    }
    scan_rest(chunks.remainder(), base, threshold, out);
}

/// [`scan`] with the widest vectors the CPU has.
fn scan_best<C: Counter>(counts: &[C], threshold: u32, out: &mut Vec<SegmentId>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected at run time.
            return unsafe { scan_avx2(counts, threshold, out) };
        }
    }
    scan(counts, threshold, out);
}

/// A segment that passed an activity threshold. `key` orders NuPIC's scans: the high half is
/// the owner cell, the low half the slot.
#[derive(Clone, Copy, Debug)]
struct Ranked {
    key: u64,
    seg: SegmentId,
}

impl Ranked {
    /// The owner cell.
    #[inline]
    fn cell(&self) -> u32 {
        (self.key >> 32) as u32
    }
}

/// Segments of a forward pass that reach a threshold, in NuPIC's scan order.
#[derive(Clone, Debug, Default)]
struct Ranking {
    ranked: Vec<Ranked>,
    /// Sort keys packed with their segment ids.
    packed: Vec<u64>,
}

impl Ranking {
    /// Orders the segments the last pass qualified (at least its threshold of active synapses) in
    /// scan order: owner cell, then slot. The keys are unique, so the order does not depend on
    /// the pass's; a few hundred at most, so a plain sort is cheap.
    fn rank(&mut self, activity: &Activity, segments: &[SegmentMeta]) {
        self.ranked.clear();
        // Cell, slot and segment id usually fit one word together (cells take 20 bits, ids
        // NAB's 14, slots a few): sorting plain words is quicker than sorting pairs by key.
        let id_bits = u32::BITS - (segments.len() as u32).leading_zeros();
        let slots = activity
            .qualified
            .iter()
            .fold(0, |m, &seg| m | segments[seg as usize].slot());
        let slot_bits = u32::BITS - slots.leading_zeros();
        if CELL_BITS + slot_bits + id_bits <= 64 {
            let packed = &mut self.packed;
            packed.clear();
            packed.extend(activity.qualified.iter().map(|&seg| {
                let meta = &segments[seg as usize];
                (u64::from(meta.cell()) << slot_bits | u64::from(meta.slot())) << id_bits
                    | u64::from(seg)
            }));
            packed.sort_unstable();
            self.ranked.extend(packed.iter().map(|&w| {
                let slot = (w >> id_bits) & ((1 << slot_bits) - 1);
                Ranked {
                    key: (w >> (id_bits + slot_bits)) << 32 | slot,
                    seg: (w & ((1 << id_bits) - 1)) as SegmentId,
                }
            }));
            return;
        }
        for &seg in &activity.qualified {
            let meta = &segments[seg as usize];
            self.ranked.push(Ranked {
                key: (meta.cell() as u64) << 32 | meta.slot() as u64,
                seg,
            });
        }
        self.ranked.sort_unstable_by_key(|r| r.key);
    }
}

/// Per column, the segment NuPIC's best-match search picks among those the last pass
/// qualified, as `(column, cell, segment)`, ascending columns. The search scans cells
/// downwards and slots upwards and keeps the first with the most active synapses: the most
/// active, then the highest cell, then the lowest slot. Kept per column as the segments
/// come, so only the columns are sorted; `by_column` (per column, 1 + its place in `out`,
/// or 0) is all 0 between calls.
fn best_per_column(
    activity: &Activity,
    segments: &[SegmentMeta],
    cpc: u32,
    by_column: &mut Vec<u32>,
    out: &mut Vec<(u32, u32, SegmentId)>,
) {
    out.clear();
    // NAB's 32 cells per column make the column a shift, far cheaper than a division.
    let shift = cpc.is_power_of_two().then(|| cpc.trailing_zeros());
    for &seg in &activity.qualified {
        let meta = &segments[seg as usize];
        let cell = meta.cell();
        let col = match shift {
            Some(shift) => cell >> shift,
            None => cell / cpc,
        };
        if by_column.len() <= col as usize {
            by_column.resize(col as usize + 1, 0);
        }
        let at = &mut by_column[col as usize];
        if *at == 0 {
            out.push((col, cell, seg));
            *at = out.len() as u32;
            continue;
        }
        let best = &mut out[*at as usize - 1];
        let (potential, best_potential) = (activity.potential(seg), activity.potential(best.2));
        let better = potential > best_potential
            || potential == best_potential
                && (cell > best.1
                    || cell == best.1 && meta.slot() < segments[best.2 as usize].slot());
        if better {
            *best = (col, cell, seg);
        }
    }
    for b in out.iter() {
        by_column[b.0 as usize] = 0;
    }
    out.sort_unstable_by_key(|b| b.0);
}

/// Buffers reused across steps; they carry no state from one call to the next. A TM holds
/// them only while it computes (see [`SCRATCH`]).
#[derive(Clone, Debug, Default)]
struct Scratch {
    activity: Activity,
    pow: PowCache,
    ranking: Ranking,
    /// Best match per column: `(column, cell, segment)`, ascending columns.
    best: Vec<(u32, u32, SegmentId)>,
    best_by_column: Vec<u32>,
    cells: Vec<u32>,
    pruned: Vec<u32>,
    update: Vec<u32>,
    /// Per synapse of the segment being adapted: is its presynaptic cell in the update.
    in_update: Vec<bool>,
    /// Cells of the update being applied that are not on the segment yet.
    new_cells: Vec<u32>,
    /// `(index, old code)` of the synapses a reinforcement dropped or (dis)connected.
    changed: Vec<(u32, Code)>,
    /// `(key, presynaptic cell, index)` of the synapses that may be freed.
    free_candidates: Vec<(f32, u32, u32)>,
    /// A segment's synapses being rewritten.
    seg_synapses: Vec<Synapse>,
    backup_active: Vec<u32>,
    backup_predicted: Vec<u32>,
    /// The dense tables of [`BacktrackingTm::lrn_active`] and
    /// [`BacktrackingTm::lrn_active_prev`], marked while a TM computes, all clear otherwise.
    lrn_bits: [Bits; 2],
    /// One bit per column, all clear between uses.
    active_columns: Vec<u64>,
    phase2: Phase2Result,
    spare_patterns: Vec<Vec<u32>>,
}

thread_local! {
    /// The scratch buffers of the TMs computing on this thread, lent to each for the length
    /// of a call: a process holds many networks but computes on few threads, and an idle TM
    /// then holds no buffers (a quarter of a grown TM's heap otherwise).
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// What inference phase 2 leaves besides the active state.
#[derive(Clone, Debug, Default)]
struct Phase2Result {
    predicted: Vec<u32>,
    cell_confidence: Vec<(u32, f32)>,
    col_confidence: Vec<(u32, f32)>,
}

/// Scratch space is not state: two TMs are equal whatever their buffers hold.
impl PartialEq for Scratch {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Scratch {
    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let spare = self.spare_patterns.capacity() * size_of::<Vec<u32>>()
            + self
                .spare_patterns
                .iter()
                .map(|x| x.capacity() * 4)
                .sum::<usize>();
        self.activity.heap_bytes()
            + self.ranking.ranked.capacity() * size_of::<Ranked>()
            + self.ranking.packed.capacity() * 8
            + self.best.capacity() * 12
            + self.best_by_column.capacity() * 4
            + (self.cells.capacity()
                + self.pruned.capacity()
                + self.update.capacity()
                + self.backup_active.capacity()
                + self.backup_predicted.capacity()
                + self.phase2.predicted.capacity())
                * 4
            + (self.phase2.cell_confidence.capacity() + self.phase2.col_confidence.capacity()) * 8
            + (self.active_columns.capacity()
                + self.lrn_bits.iter().map(Vec::capacity).sum::<usize>())
                * 8
            + self.in_update.capacity()
            + self.new_cells.capacity() * 4
            + self.free_candidates.capacity() * 12
            + self.changed.capacity() * 8
            + self.seg_synapses.capacity() * size_of::<Synapse>()
            + spare
            + self.pow.table.capacity() * 4
    }
}

/// Data derived from the serialised state, rebuilt after a restore.
#[derive(Clone, Debug, Default)]
struct Derived {
    /// False after deserialisation until derived data is rebuilt.
    ready: bool,
    /// Eviction order under `max_segments` (kept only when that budget is set).
    recency: Recency,
}

/// Derived data: equal whenever the state it is derived from is.
impl PartialEq for Derived {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// NuPIC's backtracking temporal memory (see the module docs).
///
/// Cells are numbered `column * cells_per_column + index`; cell 0 of each column is its start
/// cell. All state, the random generator included, serialises with serde; call
/// [`BacktrackingTm::rebuild_after_restore`] after deserialising (or let the next
/// [`BacktrackingTm::compute`] do it) and the run continues bit for bit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BacktrackingTm {
    params: BacktrackingTmParams,
    /// Per segment id, its synapses sorted by presynaptic cell (empty when the id is free).
    synapses: SynapseArena,
    /// Free segment ids, most recently freed last.
    free_segments: Vec<SegmentId>,
    num_synapses: usize,
    #[serde(skip)]
    out_index: OutIndex,
    /// Permanence codes of the parameters.
    #[serde(skip)]
    codec: Codec,
    segments: Vec<SegmentMeta>,
    cell_slots: CellSlots,
    rng: Random,
    iteration: u32,
    lrn_iteration: u32,
    avg_input_density: f32,
    reset_called: bool,

    inf_active: CellList,
    inf_predicted: CellList,
    inf_predicted_prev: CellList,
    /// Non-zero cell confidences, ascending cells.
    cell_confidence: Vec<(u32, f32)>,
    /// Non-zero-candidate column confidences, ascending columns.
    col_confidence: Vec<(u32, f32)>,
    predicted_columns: Vec<u32>,
    prev_inf_patterns: VecDeque<Vec<u32>>,

    lrn_active: CellState,
    lrn_active_prev: CellState,
    lrn_predicted: CellList,
    lrn_predicted_prev: CellList,
    prev_lrn_patterns: VecDeque<Vec<u32>>,
    pam_counter: u32,
    learned_seq_length: u32,
    avg_learned_seq_length: f32,
    updates: Vec<PendingUpdate>,
    update_pool: Vec<u32>,

    stats: BacktrackStats,
    #[serde(skip)]
    derived: Derived,
    /// Empty except during a call that borrowed the thread's buffers ([`SCRATCH`]).
    #[serde(skip)]
    scratch: Scratch,
}

impl BacktrackingTm {
    /// A TM with no segments, or the first invalid parameter.
    pub fn new(params: BacktrackingTmParams) -> Result<Self, ParamError> {
        params.validate()?;
        let n = params.num_cells();
        let mut tm = BacktrackingTm {
            // Id 0 is never a live segment (see `SINK`).
            synapses: {
                let mut arena = SynapseArena::default();
                arena.push_empty();
                arena
            },
            free_segments: Vec::new(),
            num_synapses: 0,
            out_index: OutIndex::new(n, params.max_segments),
            codec: Codec::new(&params),
            segments: vec![SegmentMeta::default()],
            cell_slots: CellSlots::new(n, params.cells_per_column),
            rng: Random::new(params.seed),
            iteration: 0,
            lrn_iteration: 0,
            avg_input_density: 0.0,
            reset_called: false,
            inf_active: CellList::default(),
            inf_predicted: CellList::default(),
            inf_predicted_prev: CellList::default(),
            cell_confidence: Vec::new(),
            col_confidence: Vec::new(),
            predicted_columns: Vec::new(),
            prev_inf_patterns: VecDeque::new(),
            lrn_active: CellState::default(),
            lrn_active_prev: CellState::default(),
            lrn_predicted: CellList::default(),
            lrn_predicted_prev: CellList::default(),
            prev_lrn_patterns: VecDeque::new(),
            pam_counter: params.pam_length,
            learned_seq_length: 0,
            avg_learned_seq_length: 0.0,
            updates: Vec::new(),
            update_pool: Vec::new(),
            stats: BacktrackStats::default(),
            derived: Derived::default(),
            scratch: Scratch::default(),
            params,
        };
        tm.rebuild_after_restore();
        Ok(tm)
    }

    /// One time step: infers (always) and learns (if `learn`) on the sorted, distinct
    /// `active_columns`, and returns the raw anomaly score of this input against the columns
    /// predicted at the previous step (see the module docs).
    ///
    /// # Panics
    /// If `active_columns` is unsorted, has duplicates or a column out of range.
    pub fn compute(&mut self, active_columns: &[u32], learn: bool) -> f32 {
        self.ensure_ready();
        self.with_scratch(|tm| tm.compute_step(active_columns, learn))
    }

    fn compute_step(&mut self, active_columns: &[u32], learn: bool) -> f32 {
        assert!(
            active_columns.windows(2).all(|w| w[0] < w[1]),
            "active columns must be sorted and distinct"
        );
        if let Some(&last) = active_columns.last() {
            assert!(
                last < self.params.column_count,
                "active column {last} out of range for {} columns",
                self.params.column_count
            );
        }
        let anomaly = raw_anomaly(active_columns, &self.predicted_columns);

        if learn {
            self.lrn_iteration += 1;
        }
        self.iteration += 1;
        if learn && DUTY_CYCLE_TIERS.contains(&self.lrn_iteration) {
            self.refresh_duty_cycles();
        }
        let n = active_columns.len() as f32;
        if self.avg_input_density == 0.0 {
            self.avg_input_density = n;
        } else {
            const COOL_DOWN: f32 = 0.99;
            self.avg_input_density = COOL_DOWN * self.avg_input_density + (1.0 - COOL_DOWN) * n;
        }

        self.update_inference_state(active_columns);
        if learn {
            self.update_learning_state(active_columns);
            self.apply_global_decay();
            self.out_index.compact_if_sparse();
        }
        self.reset_called = false;

        self.predicted_columns.clear();
        self.predicted_columns.extend(
            self.col_confidence
                .iter()
                .filter(|&&(_, conf)| conf != 0.0)
                .map(|&(col, _)| col),
        );
        anomaly
    }

    /// Starts a new sequence, as NuPIC's `reset()`: clears all cell states, confidences,
    /// queued updates and input history; the next input activates start cells.
    pub fn reset(&mut self) {
        self.ensure_ready();
        self.with_scratch(Self::reset_state);
    }

    /// Runs `f` with this thread's scratch buffers in [`Self::scratch`], and gives them back
    /// with no trace of this TM: the next TM to borrow them finds the counters clear.
    fn with_scratch<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let mut scratch = crate::scratch::take(&SCRATCH);
        scratch.activity.set_width(self.params.max_segment_size());
        let n = self.params.num_cells();
        for (bits, state) in scratch.lrn_bits.iter_mut().zip(self.lrn_states()) {
            size_bits(bits, n);
            state.mark(bits);
        }
        self.scratch = scratch;
        let result = f(self);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.activity.clear();
        for (bits, state) in scratch.lrn_bits.iter_mut().zip(self.lrn_states()) {
            state.unmark(bits);
        }
        crate::scratch::give_back(&SCRATCH, scratch);
        result
    }

    /// Bytes of this thread's scratch buffers ([`SCRATCH`]), shared by every TM computing on
    /// it and so not in any TM's [`Self::heap_bytes`].
    pub fn thread_scratch_bytes() -> usize {
        crate::scratch::thread_bytes(&SCRATCH, Scratch::heap_bytes)
    }

    /// The learning states whose tables are lent with the scratch, in [`Scratch::lrn_bits`]
    /// order.
    fn lrn_states(&self) -> [&CellState; 2] {
        [&self.lrn_active, &self.lrn_active_prev]
    }

    fn reset_state(&mut self) {
        self.inf_active.reset();
        self.inf_predicted.reset();
        self.inf_predicted_prev.reset();
        let [active, prev] = &mut self.scratch.lrn_bits;
        self.lrn_active.reset(active);
        self.lrn_active_prev.reset(prev);
        self.lrn_predicted.reset();
        self.lrn_predicted_prev.reset();
        self.cell_confidence.clear();
        self.col_confidence.clear();
        self.predicted_columns.clear();
        self.updates.clear();
        self.update_pool.clear();
        self.reset_called = true;
        let spare = &mut self.scratch.spare_patterns;
        spare.extend(self.prev_inf_patterns.drain(..));
        spare.extend(self.prev_lrn_patterns.drain(..));
    }

    /// Columns predicted for the next input (non-zero column confidence), ascending: the set
    /// the next anomaly score is measured against.
    pub fn predicted_columns(&self) -> &[u32] {
        &self.predicted_columns
    }

    /// Inference active cells, ascending.
    pub fn active_cells(&self) -> &[u32] {
        self.inf_active.cells()
    }

    /// Inference predicted cells (a segment active on connected synapses), ascending.
    pub fn predictive_cells(&self) -> &[u32] {
        self.inf_predicted.cells()
    }

    /// Learning active cells (at most one per column), ascending.
    pub fn learn_active_cells(&self) -> &[u32] {
        self.lrn_active.cells()
    }

    /// Normalised column confidences of the last step as `(column, confidence)`, ascending
    /// columns; columns not listed have confidence 0.
    pub fn column_confidences(&self) -> &[(u32, f32)] {
        &self.col_confidence
    }

    /// The TM's output cells according to `output_type`, ascending.
    pub fn output_cells(&self) -> Vec<u32> {
        match self.params.output_type {
            OutputType::ActiveState => self.inf_active.cells().to_vec(),
            OutputType::Normal => {
                let mut out: Vec<u32> = self
                    .inf_active
                    .cells()
                    .iter()
                    .chain(self.inf_predicted.cells())
                    .copied()
                    .collect();
                out.sort_unstable();
                out.dedup();
                out
            }
            OutputType::ActiveState1CellPerCol => {
                // The most confident cell of each active column (first on ties, as argmax).
                let cpc = self.params.cells_per_column;
                let mut out = Vec::new();
                let cells = self.inf_active.cells();
                let mut i = 0;
                while i < cells.len() {
                    let col = cells[i] / cpc;
                    while i < cells.len() && cells[i] / cpc == col {
                        i += 1;
                    }
                    let (mut best, mut best_conf) = (col * cpc, 0.0f32);
                    let lo = self.cell_confidence.partition_point(|e| e.0 < col * cpc);
                    for &(cell, conf) in &self.cell_confidence[lo..] {
                        if cell >= (col + 1) * cpc {
                            break;
                        }
                        if conf > best_conf {
                            best = cell;
                            best_conf = conf;
                        }
                    }
                    out.push(best);
                }
                out
            }
        }
    }

    pub fn params(&self) -> &BacktrackingTmParams {
        &self.params
    }

    /// Live segments.
    pub fn num_segments(&self) -> usize {
        self.synapses.len() - 1 - self.free_segments.len()
    }

    /// Live synapses.
    pub fn num_synapses(&self) -> usize {
        self.num_synapses
    }

    /// The live segments of `cell`, in slot order.
    pub fn segments_on_cell(&self, cell: u32) -> impl Iterator<Item = SegmentId> + '_ {
        self.cell_slots.segments(cell)
    }

    /// The synapses of a live segment, ascending presynaptic cells.
    pub fn segment_synapses(&self, seg: SegmentId) -> Vec<Synapse> {
        self.synapses.get(seg as usize).iter().collect()
    }

    /// The permanence of `syn`, one of this TM's synapses.
    pub fn permanence(&self, syn: &Synapse) -> f32 {
        self.codec.value(syn.code())
    }

    /// Segment slots of `cell`, empty ones included (what the segment cap counts).
    pub fn segment_slots_on_cell(&self, cell: u32) -> usize {
        self.cell_slots.len(cell)
    }

    /// Learning iterations so far.
    pub fn learning_iterations(&self) -> u32 {
        self.lrn_iteration
    }

    /// Moving average of learned sequence lengths (a NuPIC diagnostic).
    pub fn avg_learned_seq_length(&self) -> f32 {
        self.avg_learned_seq_length
    }

    pub fn backtrack_stats(&self) -> BacktrackStats {
        self.stats
    }

    /// Rebuilds derived data (presynaptic index, dense state tables) after deserialisation.
    /// Idempotent; [`BacktrackingTm::compute`] and [`BacktrackingTm::reset`] call it when needed.
    pub fn rebuild_after_restore(&mut self) {
        let n = self.params.num_cells();
        self.out_index = OutIndex::new(n, self.params.max_segments);
        self.codec = Codec::new(&self.params);
        let narrow = n <= 1 << 16 && self.codec.num_codes() <= usize::from(u8::MAX);
        let p = &self.params;
        self.synapses
            .set_layout(narrow, p.max_segments, p.max_segment_size());
        self.out_index.rebuild(&self.synapses, self.codec.connected);
        let p = &self.params;
        let cpc = p.cells_per_column;
        let narrow = CellSlots::narrow_fits(p.max_segments, p.max_segments_per_cell, cpc);
        self.cell_slots.rebuild(n, cpc, narrow);
        self.derived = Derived {
            ready: true,
            recency: if self.params.max_segments > 0 {
                let policy = self.params.max_segments_eviction;
                Recency::new(&self.segments, self.params.max_segments, policy)
            } else {
                Recency::default()
            },
        };
    }

    /// Heap bytes held (capacity-based), for memory reporting.
    pub fn heap_bytes(&self) -> usize {
        self.heap_breakdown().iter().map(|(_, b)| b).sum()
    }

    /// [`Self::heap_bytes`] by part, to see where memory goes.
    pub fn heap_breakdown(&self) -> [(&'static str, usize); 6] {
        use std::mem::size_of;
        let patterns = |q: &VecDeque<Vec<u32>>| {
            q.capacity() * size_of::<Vec<u32>>() + q.iter().map(|x| x.capacity() * 4).sum::<usize>()
        };
        let synapses = self.synapses.heap_bytes();
        let segments = self.free_segments.capacity() * 4
            + self.segments.capacity() * size_of::<SegmentMeta>()
            + self.cell_slots.heap_bytes();
        let cells = [
            &self.inf_active,
            &self.inf_predicted,
            &self.inf_predicted_prev,
            &self.lrn_predicted,
            &self.lrn_predicted_prev,
        ]
        .iter()
        .map(|c| c.heap_bytes())
        .sum::<usize>()
            + self.lrn_active.heap_bytes()
            + self.lrn_active_prev.heap_bytes()
            + (self.cell_confidence.capacity() + self.col_confidence.capacity()) * 8
            + self.predicted_columns.capacity() * 4
            + patterns(&self.prev_inf_patterns)
            + patterns(&self.prev_lrn_patterns);
        let updates =
            self.updates.capacity() * size_of::<PendingUpdate>() + self.update_pool.capacity() * 4;
        // Buffers lent for a call, if any, and the eviction order.
        let scratch = self.scratch.heap_bytes() + self.derived.recency.heap_bytes();
        [
            ("synapses", synapses),
            ("out_index", self.out_index.heap_bytes()),
            ("segments", segments),
            ("cell_state", cells),
            ("updates", updates),
            ("scratch", scratch),
        ]
    }

    fn ensure_ready(&mut self) {
        if !self.derived.ready {
            self.rebuild_after_restore();
        }
    }

    // ------------------------------------------------------------------------------------
    // Inference

    fn update_inference_state(&mut self, cols: &[u32]) {
        self.inf_predicted_prev.copy_from(&self.inf_predicted);
        let max = self.params.max_inf_backtrack as usize;
        if max > 0 {
            if self.prev_inf_patterns.len() > max {
                let old = self
                    .prev_inf_patterns
                    .pop_front()
                    .expect("non-empty buffer");
                self.scratch.spare_patterns.push(old);
            }
            let pattern = copy_pattern(&mut self.scratch.spare_patterns, cols);
            self.prev_inf_patterns.push_back(pattern);
        }
        let in_sequence = infer_phase1(
            cols,
            self.reset_called,
            self.params.cells_per_column,
            &self.inf_predicted_prev,
            &mut self.inf_active,
        );
        if !in_sequence {
            self.infer_backtrack(false);
        } else if !self.infer_phase2() {
            self.infer_backtrack(true);
        }
    }

    /// Predicted cells and confidences from the inference active state; returns whether
    /// enough columns are predicted to consider the sequence going on.
    fn infer_phase2(&mut self) -> bool {
        let thr = self.params.activation_threshold;
        let cpc = self.params.cells_per_column;
        let s = &mut self.scratch;
        s.activity.propagate(
            &self.out_index,
            self.synapses.len(),
            self.inf_active.cells(),
            thr,
        );
        s.ranking.rank(&s.activity, &self.segments);

        self.inf_predicted.reset();
        self.cell_confidence.clear();
        self.col_confidence.clear();
        let it = self.lrn_iteration;
        let (ranked, pow) = (&s.ranking.ranked, &mut s.pow);
        let (mut sum, mut predicted_cols) = (0.0f32, 0u32);
        let mut i = 0;
        // Summation order is Cells4's (column, cell, slot), so rounding matches.
        while i < ranked.len() {
            let col = ranked[i].cell() / cpc;
            // The column's cells end here: a compare per segment instead of a division.
            let col_end = (col + 1) * cpc;
            let (mut col_sum, mut col_predicted) = (0.0f32, false);
            while i < ranked.len() && ranked[i].cell() < col_end {
                let cell = ranked[i].cell();
                let mut cell_sum = 0.0f32;
                while i < ranked.len() && ranked[i].cell() == cell {
                    let r = ranked[i];
                    let dc = self.segments[r.seg as usize].duty_cycle(it, false, false, pow);
                    cell_sum += dc;
                    col_sum += dc;
                    if s.activity.connected(r.seg) >= thr {
                        self.inf_predicted.set(cell);
                        col_predicted = true;
                    }
                    i += 1;
                }
                self.cell_confidence.push((cell, cell_sum));
            }
            self.col_confidence.push((col, col_sum));
            sum += col_sum;
            predicted_cols += col_predicted as u32;
        }
        if sum > 0.0 {
            for e in &mut self.cell_confidence {
                e.1 /= sum;
            }
            for e in &mut self.col_confidence {
                e.1 /= sum;
            }
        }
        predicted_cols as f64 >= 0.5 * self.avg_input_density as f64
    }

    /// `inferBacktrack`: find the oldest buffered input whose start cells, replayed forward,
    /// stay in sequence up to the current input; otherwise keep the bursting state.
    fn infer_backtrack(&mut self, phase2_done: bool) {
        self.stats.inference_backtracks += 1;
        let mut patterns = std::mem::take(&mut self.prev_inf_patterns);
        let n = patterns.len();
        if n == 0 {
            // Deliberate difference (module docs): predict from the bursting state.
            if !phase2_done {
                self.infer_phase2();
            }
            self.prev_inf_patterns = patterns;
            return;
        }
        let cpc = self.params.cells_per_column;
        let mut backup_active = std::mem::take(&mut self.scratch.backup_active);
        backup_active.clear();
        backup_active.extend_from_slice(self.inf_active.cells());
        let mut backup_predicted = std::mem::take(&mut self.scratch.backup_predicted);
        backup_predicted.clear();
        backup_predicted.extend_from_slice(self.inf_predicted_prev.cells());
        // Phase 2 of the current state, if done, is what a failed backtrack falls back to:
        // kept aside rather than computed again (no segment changes during inference, and
        // duty cycles read twice at one iteration read the same).
        let mut phase2 = std::mem::take(&mut self.scratch.phase2);
        phase2.predicted.clear();
        if phase2_done {
            phase2
                .predicted
                .extend_from_slice(self.inf_predicted.cells());
            std::mem::swap(&mut phase2.cell_confidence, &mut self.cell_confidence);
            std::mem::swap(&mut phase2.col_confidence, &mut self.col_confidence);
        }

        // The state after the successful replay is the candidate itself: Cells4 stops at the
        // first start point that works, so nothing needs saving aside.
        let mut candidate = None;
        for start in 0..n {
            let mut in_sequence = false;
            for (offset, pattern) in patterns.iter().enumerate().skip(start) {
                self.inf_predicted_prev.copy_from(&self.inf_predicted);
                in_sequence = infer_phase1(
                    pattern,
                    offset == start,
                    cpc,
                    &self.inf_predicted_prev,
                    &mut self.inf_active,
                );
                if !in_sequence {
                    break;
                }
                in_sequence = self.infer_phase2();
                if !in_sequence {
                    break;
                }
            }
            if in_sequence {
                candidate = Some(start);
                break;
            }
        }
        match candidate {
            None => {
                self.inf_active.assign(&backup_active);
                if phase2_done {
                    self.inf_predicted.assign(&phase2.predicted);
                    std::mem::swap(&mut phase2.cell_confidence, &mut self.cell_confidence);
                    std::mem::swap(&mut phase2.col_confidence, &mut self.col_confidence);
                } else {
                    self.infer_phase2();
                }
            }
            Some(_) => self.stats.inference_lock_ons += 1,
        }
        self.scratch.phase2 = phase2;
        // Every start point tried before the chosen one failed; they and the chosen one go.
        for _ in 0..candidate.map_or(n, |s| s + 1) {
            let p = patterns.pop_front().expect("pattern to drop");
            self.scratch.spare_patterns.push(p);
        }
        self.prev_inf_patterns = patterns;
        self.inf_predicted_prev.assign(&backup_predicted);
        self.scratch.backup_active = backup_active;
        self.scratch.backup_predicted = backup_predicted;
    }

    // ------------------------------------------------------------------------------------
    // Learning

    fn update_learning_state(&mut self, cols: &[u32]) {
        let cpc = self.params.cells_per_column;
        self.lrn_active_prev
            .copy_from(&mut self.scratch.lrn_bits[1], &self.lrn_active);
        self.lrn_predicted_prev.copy_from(&self.lrn_predicted);
        let max = self.params.max_lrn_backtrack as usize;
        if max > 0 {
            if self.prev_lrn_patterns.len() > max {
                let old = self
                    .prev_lrn_patterns
                    .pop_front()
                    .expect("non-empty buffer");
                self.scratch.spare_patterns.push(old);
            }
            let pattern = copy_pattern(&mut self.scratch.spare_patterns, cols);
            self.prev_lrn_patterns.push_back(pattern);
        }

        self.process_segment_updates(cols);

        if self.pam_counter > 0 {
            self.pam_counter -= 1;
        }
        self.learned_seq_length += 1;

        if !self.reset_called && self.learn_phase1(cols, false) {
            self.pam_counter = self.params.pam_length;
        }

        let max_seq = self.params.max_seq_length;
        if self.reset_called
            || self.pam_counter == 0
            || (max_seq != 0 && self.learned_seq_length >= max_seq)
        {
            let seq_length = if self.pam_counter == 0 {
                self.learned_seq_length
                    .saturating_sub(self.params.pam_length)
            } else {
                self.learned_seq_length
            };
            let alpha: f32 = if self.lrn_iteration < 100 { 0.5 } else { 0.1 };
            self.avg_learned_seq_length =
                (1.0 - alpha) * self.avg_learned_seq_length + alpha * seq_length as f32;

            let mut backsteps = 0;
            if !self.reset_called {
                backsteps = self.learn_backtrack();
            }
            if self.reset_called || backsteps == 0 {
                self.lrn_active.reset(&mut self.scratch.lrn_bits[0]);
                for &c in cols {
                    self.lrn_active.set(&mut self.scratch.lrn_bits[0], c * cpc);
                }
                let spare = &mut self.scratch.spare_patterns;
                spare.extend(self.prev_lrn_patterns.drain(..));
            }
            self.pam_counter = self.params.pam_length;
            self.learned_seq_length = backsteps;
            self.updates.clear();
            self.update_pool.clear();
        }

        self.learn_phase2(false);
    }

    /// Chooses the learning cell of each active column from the learning predictions of the
    /// previous step; unless `read_only`, unpredicted columns learn on their best matching
    /// segment or grow a new one. Returns whether the input counts as in sequence.
    fn learn_phase1(&mut self, cols: &[u32], read_only: bool) -> bool {
        let cpc = self.params.cells_per_column;
        self.lrn_active.reset(&mut self.scratch.lrn_bits[0]);
        let mut unpredicted = 0usize;
        let mut matches_ready = false;
        let lrn_predicted_prev = std::mem::take(&mut self.lrn_predicted_prev);
        let mut predicted_prev = lrn_predicted_prev.cursor();
        for &col in cols {
            let base = col * cpc;
            // At most one cell per column is learn-predicted; Cells4 keeps the last.
            if let Some(&cell) = predicted_prev.range(base, base + cpc).last() {
                self.lrn_active.set(&mut self.scratch.lrn_bits[0], cell);
                continue;
            }
            unpredicted += 1;
            if read_only {
                continue;
            }
            if !matches_ready {
                // Learning here only touches this column's segments, so one pass over the
                // previous learning state serves every column.
                let s = &mut self.scratch;
                s.activity.propagate(
                    &self.out_index,
                    self.synapses.len(),
                    self.lrn_active_prev.cells(),
                    self.params.min_threshold,
                );
                let (by_column, best) = (&mut s.best_by_column, &mut s.best);
                best_per_column(&s.activity, &self.segments, cpc, by_column, best);
                matches_ready = true;
            }
            let best = self
                .scratch
                .best
                .binary_search_by_key(&col, |b| b.0)
                .ok()
                .map(|k| self.scratch.best[k]);
            match best {
                // A best match freed meanwhile (by the `max_segments` budget) is no match.
                Some((_, cell, seg))
                    if self.segments[seg as usize].alive()
                        && self.segments[seg as usize].cell() == cell
                        && self.segments[seg as usize].sequence() =>
                {
                    self.lrn_active.set(&mut self.scratch.lrn_bits[0], cell);
                    // The match has synapses from the state, so the update is not empty.
                    self.reinforce(cell, seg, true, Choices::Draw);
                }
                _ => {
                    let cell = self.cell_for_new_segment(col);
                    self.lrn_active.set(&mut self.scratch.lrn_bits[0], cell);
                    let update = self.build_update(None, true, Choices::Draw);
                    if !update.is_empty() {
                        self.adapt_segment(cell, None, &update, true);
                    }
                    self.scratch.update = update;
                }
            }
        }
        self.lrn_predicted_prev = lrn_predicted_prev;
        unpredicted < cols.len() / 2
    }

    /// Predicts at most one cell per column from the learning active state and, unless
    /// `read_only`, queues the predicting segments for reinforcement at the next step.
    fn learn_phase2(&mut self, read_only: bool) {
        let cpc = self.params.cells_per_column;
        let s = &mut self.scratch;
        s.activity.propagate(
            &self.out_index,
            self.synapses.len(),
            self.lrn_active.cells(),
            self.params.activation_threshold,
        );
        let (by_column, best) = (&mut s.best_by_column, &mut s.best);
        best_per_column(&s.activity, &self.segments, cpc, by_column, best);

        self.lrn_predicted.reset();
        let best = std::mem::take(&mut self.scratch.best);
        let mut pool = std::mem::take(&mut self.update_pool);
        for &(_, cell, seg) in &best {
            self.lrn_predicted.set(cell);
            if read_only {
                continue;
            }
            // The update is queued with its random choices only (see `PendingUpdate`). The
            // pass just counted the segment's synapses from the state, which fixes how many
            // choices there are; it is at least the threshold, so the update is never empty.
            let active = self.scratch.activity.potential(seg) as usize;
            debug_assert!(active > 0);
            let start = pool.len();
            self.draw_choices(self.lrn_active.cells().len(), active, &mut pool);
            self.updates.push(PendingUpdate {
                cell,
                segment: seg,
                timestamp: self.lrn_iteration,
                start: start as u32,
                len: (pool.len() - start) as u32,
                explicit: false,
            });
        }
        self.update_pool = pool;
        self.scratch.best = best;
    }

    /// Applies queued updates of cells whose column is active now; without pooling every
    /// other update is dropped.
    fn process_segment_updates(&mut self, cols: &[u32]) {
        if self.updates.is_empty() {
            self.update_pool.clear();
            return;
        }
        let mut updates = std::mem::take(&mut self.updates);
        let mut pool = std::mem::take(&mut self.update_pool);
        let cpc = self.params.cells_per_column;
        let valid = self.params.segment_update_valid_duration;
        let it = self.lrn_iteration;
        // The active columns as bits, so that each update is one lookup.
        let active = &mut self.scratch.active_columns;
        active.resize((self.params.column_count as usize).div_ceil(64), 0);
        for &c in cols {
            active[(c >> 6) as usize] |= 1 << (c & 63);
        }
        updates.retain(|u| {
            let col = u.cell / cpc;
            it.saturating_sub(u.timestamp) <= valid
                && active[(col >> 6) as usize] >> (col & 63) & 1 != 0
        });
        for &c in cols {
            active[(c >> 6) as usize] = 0;
        }
        // Segments are scattered over the heap: ask for all of them before walking any.
        for u in &updates {
            self.synapses.get(u.segment as usize).prefetch();
        }
        for u in &updates {
            let range = u.start as usize..(u.start + u.len) as usize;
            if u.explicit {
                self.adapt_segment(u.cell, Some(u.segment), &pool[range], false);
                continue;
            }
            // The state the update was queued from is the previous one now.
            self.reinforce(u.cell, u.segment, true, Choices::Replay(&pool[range]));
        }
        updates.clear();
        pool.clear();
        self.updates = updates;
        self.update_pool = pool;
    }

    /// `learnBacktrack`: on starting over, look for the oldest buffered input (the current one
    /// excluded) from whose start cells learning stays in sequence up to now; replay that path
    /// with learning. Returns how many steps back it starts (0 = none found).
    fn learn_backtrack(&mut self) -> u32 {
        let num_prev = self.prev_lrn_patterns.len().saturating_sub(1);
        if num_prev == 0 {
            return 0;
        }
        self.stats.learning_backtracks += 1;
        let mut patterns = std::mem::take(&mut self.prev_lrn_patterns);
        let found = (0..num_prev).find(|&start| self.learn_backtrack_from(&patterns, start, true));
        let Some(start) = found else {
            self.scratch.spare_patterns.extend(patterns.drain(..));
            self.prev_lrn_patterns = patterns;
            return 0;
        };
        self.stats.learning_lock_ons += 1;
        self.learn_backtrack_from(&patterns, start, false);
        for _ in 0..=start {
            let p = patterns.pop_front().expect("pattern to drop");
            self.scratch.spare_patterns.push(p);
        }
        self.prev_lrn_patterns = patterns;
        (num_prev - start) as u32
    }

    /// Replays the learning state from the start cells of `patterns[start]` to the current
    /// input; returns whether it stayed in sequence all the way.
    fn learn_backtrack_from(
        &mut self,
        patterns: &VecDeque<Vec<u32>>,
        start: usize,
        read_only: bool,
    ) -> bool {
        let cpc = self.params.cells_per_column;
        let current = patterns.len() - 1;
        if !read_only {
            self.updates.clear();
            self.update_pool.clear();
        }
        let mut in_sequence = true;
        for (offset, pattern) in patterns.iter().enumerate().skip(start) {
            self.lrn_active_prev
                .copy_from(&mut self.scratch.lrn_bits[1], &self.lrn_active);
            self.lrn_predicted_prev.copy_from(&self.lrn_predicted);
            if !read_only {
                self.process_segment_updates(pattern);
            }
            if offset == start {
                self.lrn_active.reset(&mut self.scratch.lrn_bits[0]);
                for &c in pattern {
                    self.lrn_active.set(&mut self.scratch.lrn_bits[0], c * cpc);
                }
                in_sequence = true;
            } else {
                in_sequence = self.learn_phase1(pattern, read_only);
            }
            if !in_sequence || offset == current {
                break;
            }
            self.learn_phase2(read_only);
        }
        in_sequence
    }

    /// `getCellForNewSegment`: a random non-start cell of `col` with a free segment quota,
    /// else the owner of the column's least useful segment, which is released.
    fn cell_for_new_segment(&mut self, col: u32) -> u32 {
        let cpc = self.params.cells_per_column;
        let base = col * cpc;
        let (lo, hi) = if cpc == 1 { (0, 0) } else { (1, cpc - 1) };
        let max_segments = self.params.max_segments_per_cell;
        if max_segments < 0 {
            return base + lo + if cpc > 1 { self.rng.below(cpc - 1) } else { 0 };
        }
        let candidates = &mut self.scratch.cells;
        candidates.clear();
        {
            // One walk of the column's slot counts, merged with its cells.
            let mut lens = self.cell_slots.column_lens(col).peekable();
            for cell in base + lo..=base + hi {
                let mut len = 0;
                while let Some((c, n)) = lens.next_if(|&(c, _)| c <= cell) {
                    if c == cell {
                        len = n;
                    }
                }
                if len < max_segments as usize {
                    candidates.push(cell);
                }
            }
        }
        if !candidates.is_empty() {
            return candidates[self.rng.below(candidates.len() as u32) as usize];
        }
        let it = self.lrn_iteration;
        let mut victim = None;
        let mut victim_dc = 1.0f32;
        let mut first_live = None;
        for cell in base + lo..=base + hi {
            for seg in self.cell_slots.segments(cell) {
                first_live.get_or_insert(seg);
                let dc =
                    self.segments[seg as usize].duty_cycle(it, false, false, &mut self.scratch.pow);
                if dc < victim_dc {
                    victim = Some(seg);
                    victim_dc = dc;
                }
            }
        }
        match victim.or(first_live) {
            Some(seg) => {
                let cell = self.segments[seg as usize].cell();
                self.release_segment(seg);
                cell
            }
            // Every slot is free: any cell can take the new segment.
            None => base + lo,
        }
    }

    /// The random draws of `chooseCellsToLearnFrom` for an update to a segment with `active`
    /// synapses from a learning state of `state_len` cells, appended to `out`: the same draws,
    /// in the same order, as [`BacktrackingTm::build_update`] makes.
    fn draw_choices(&mut self, state_len: usize, active: usize, out: &mut Vec<u32>) {
        let wanted = (self.params.new_synapse_count as usize).saturating_sub(active);
        let pool = state_len - active;
        if wanted == 0 || pool <= wanted {
            return;
        }
        if wanted == 1 {
            out.push(self.rng.below(pool as u32));
        } else {
            for i in 0..wanted {
                out.push(i as u32 + self.rng.below((pool - i) as u32));
            }
        }
    }

    /// The presynaptic cells of an update to `seg` (or a new segment): its synapses from
    /// cells active in the previous (`from_prev`) or current learning state, plus randomly
    /// chosen new ones from that state up to `new_synapse_count`. Sorted.
    fn build_update(
        &mut self,
        seg: Option<SegmentId>,
        from_prev: bool,
        choices: Choices,
    ) -> Vec<u32> {
        let mut out = std::mem::take(&mut self.scratch.update);
        let bits = &self.scratch.lrn_bits[usize::from(from_prev)];
        out.clear();
        if let Some(seg) = seg {
            // Ascending, as the synapses are.
            let syns = self.synapses.get(seg as usize);
            out.extend(
                (0..syns.len())
                    .map(|k| syns.presyn(k))
                    .filter(|&p| is_set(bits, p)),
            );
        }
        let mut active = std::mem::take(&mut self.scratch.new_cells);
        active.clear();
        active.extend_from_slice(&out);
        let before = out.len();
        self.choose_new_cells(from_prev, &active, choices, &mut out);
        if out.len() > before {
            out.sort_unstable();
        }
        self.scratch.new_cells = active;
        out
    }

    /// `chooseCellsToLearnFrom`: appends to `out` new cells for an update that has the
    /// (sorted) `active` cells of the learning state on its segment — up to
    /// `new_synapse_count` in all, picked at random among the state's other cells.
    fn choose_new_cells(
        &mut self,
        from_prev: bool,
        active: &[u32],
        choices: Choices,
        out: &mut Vec<u32>,
    ) {
        let state = if from_prev {
            &self.lrn_active_prev
        } else {
            &self.lrn_active
        };
        let wanted = (self.params.new_synapse_count as usize).saturating_sub(active.len());
        if wanted > 0 {
            // The state's cells not on the segment (those on it are the active ones), ascending.
            let learn_cells = state.cells();
            debug_assert!(learn_cells.windows(2).all(|w| w[0] < w[1]));
            // `active` is a subset of the state (cells of the state on the segment), so
            // each of its cells comes up exactly once, in order: the merge needs no search
            // and no branch, and writes by index with its count in a register.
            let pruned = &mut self.scratch.pruned;
            pruned.clear();
            pruned.resize(learn_cells.len(), 0);
            let (mut n, mut k) = (0, 0);
            for &c in learn_cells {
                let on_segment = active.get(k) == Some(&c);
                pruned[n] = c;
                n += usize::from(!on_segment);
                k += usize::from(on_segment);
            }
            debug_assert_eq!(k, active.len(), "active cells outside the state");
            pruned.truncate(n);
            let rng = &mut self.rng;
            let mut draw = |i: usize, n: usize| -> usize {
                match choices {
                    Choices::Draw => i + rng.below((n - i) as u32) as usize,
                    Choices::Replay(draws) => draws[i] as usize,
                }
            };
            if let Choices::Replay(draws) = choices {
                debug_assert_eq!(
                    draws.len(),
                    match pruned.len() {
                        n if n <= wanted => 0,
                        _ if wanted == 1 => 1,
                        _ => wanted,
                    },
                    "replayed choices do not fit the update"
                );
            }
            if pruned.len() <= wanted {
                out.extend_from_slice(pruned);
            } else if wanted == 1 {
                out.push(pruned[draw(0, pruned.len())]);
            } else {
                for i in 0..wanted {
                    let j = draw(i, pruned.len());
                    pruned.swap(i, j);
                }
                out.extend_from_slice(&pruned[..wanted]);
            }
        }
    }

    /// `adaptSegment`: reinforce `seg` with the sorted presynaptic cells of an update (active
    /// synapses up, the others down, new ones grown at `initial_perm`), or create a new
    /// segment on `cell` from them.
    fn adapt_segment(&mut self, cell: u32, seg: Option<SegmentId>, update: &[u32], sequence: bool) {
        let Some(seg) = seg else {
            self.create_segment(cell, update, sequence);
            return;
        };
        if !self.start_reinforcement(cell, seg) {
            return;
        }
        let s = seg as usize;
        let mut in_update = std::mem::take(&mut self.scratch.in_update);
        let mut new_cells = std::mem::take(&mut self.scratch.new_cells);
        in_update.clear();
        new_cells.clear();
        // Walk the segment and the update together (both ascending): active synapses up,
        // the others down (those reaching zero go), update cells not on the segment are new.
        // Dropped synapses stay in place until the segment is rewritten: walk them all, and
        // count the survivors apart.
        let len = self.synapses.get(s).len();
        let mut alive = len;
        let mut j = 0;
        for k in 0..len {
            let syn = self.synapses.get(s).get(k);
            while j < update.len() && update[j] < syn.presyn() {
                new_cells.push(update[j]);
                j += 1;
            }
            let active = j < update.len() && update[j] == syn.presyn();
            in_update.push(active);
            let perm = if active {
                j += 1;
                self.codec.up(syn.code())
            } else {
                self.codec.down(syn.code())
            };
            if perm == 0 {
                self.drop_synapse(seg, k);
                alive -= 1;
            } else {
                self.set_code(seg, k, perm);
            }
        }
        new_cells.extend_from_slice(&update[j..]);
        self.finish_adaptation(seg, alive, in_update, new_cells);
    }

    /// `adaptSegment` with the update NuPIC would build from the learning state (the previous
    /// one with `from_prev`): synapses from active cells up, the others down, and new ones
    /// from cells of the state chosen as [`BacktrackingTm::build_update`] chooses them — in
    /// one walk over the segment. The update must not be empty: callers pass segments with
    /// synapses from the state.
    fn reinforce(&mut self, cell: u32, seg: SegmentId, from_prev: bool, choices: Choices) {
        if !self.start_reinforcement(cell, seg) {
            return;
        }
        let mut in_update = std::mem::take(&mut self.scratch.in_update);
        let mut active = std::mem::take(&mut self.scratch.new_cells);
        let mut changed = std::mem::take(&mut self.scratch.changed);
        let state = &self.scratch.lrn_bits[usize::from(from_prev)];
        let cp = self.codec.connected;
        let walk = (&mut in_update, &mut active, &mut changed);
        let steps = self.codec.learning_steps();
        match self.synapses.get_mut(seg as usize) {
            SynsMut::Narrow(presyn, codes) => {
                adapt_walk_steps((presyn, codes), state, cp, steps, walk);
            }
            SynsMut::Wide(presyn, codes) => {
                adapt_walk_steps((presyn, codes), state, cp, steps, walk);
            }
        }
        // The out index follows the few synapses that were dropped or crossed the connected
        // threshold (each from a different cell, so the order of these changes is free).
        let out = &mut self.out_index;
        let syns = self.synapses.get(seg as usize);
        let mut dropped = 0;
        for &(k, was) in &changed {
            let syn = syns.get(k as usize);
            if syn.code() == DROPPED {
                out.remove(syn.presyn(), seg, was >= cp);
                dropped += 1;
            } else {
                out.set_connected(syn.presyn(), seg, syn.code() >= cp);
            }
        }
        self.scratch.changed = changed;
        let alive = syns.len() - dropped;
        self.num_synapses -= dropped;
        debug_assert!(
            !active.is_empty(),
            "an update from the state is never empty"
        );
        // The update's new cells: chosen among the state's cells not on the segment.
        let mut new_cells = std::mem::take(&mut self.scratch.update);
        new_cells.clear();
        self.choose_new_cells(from_prev, &active, choices, &mut new_cells);
        new_cells.sort_unstable();
        self.scratch.update = active;
        self.finish_adaptation(seg, alive, in_update, new_cells);
    }

    /// Bookkeeping of a reinforcement; false if `seg` is no longer `cell`'s segment.
    fn start_reinforcement(&mut self, cell: u32, seg: SegmentId) -> bool {
        let meta = &mut self.segments[seg as usize];
        if !meta.alive() || meta.cell() != cell {
            return false; // released since the update was queued
        }
        let it = self.lrn_iteration;
        meta.last_active_iteration = it;
        meta.set_positive_activations(meta.positive_activations() + 1);
        meta.duty_cycle(it, true, false, &mut self.scratch.pow);
        if self.params.max_segments > 0 {
            let budget = self.params.max_segments as usize;
            let policy = self.params.max_segments_eviction;
            let m = &self.segments[seg as usize];
            self.derived.recency.touch(seg, m, budget, policy);
        }
        true
    }

    /// The end of `adaptSegment`, once permanences have moved: `alive` synapses remain,
    /// `in_update` flags the original synapses of the update and `new_cells` (sorted) are to
    /// be grown. Frees synapses over the cap, grows the new ones, releases an empty segment.
    fn finish_adaptation(
        &mut self,
        seg: SegmentId,
        mut alive: usize,
        in_update: Vec<bool>,
        new_cells: Vec<u32>,
    ) {
        let s = seg as usize;
        let max = self.codec.max_value;
        let n_new = new_cells.len();
        let max_synapses = self.params.max_synapses_per_segment;
        if max_synapses > 0 && n_new + alive > max_synapses as usize {
            let to_free = n_new + alive - max_synapses as usize;
            let mut candidates = std::mem::take(&mut self.scratch.free_candidates);
            candidates.clear();
            let syns = self.synapses.get(s);
            for (k, syn) in syns.iter().enumerate() {
                if syn.code() != DROPPED && !in_update[k] {
                    let perm = self.codec.value(syn.code());
                    candidates.push((perm, syn.presyn(), k as u32));
                }
            }
            if candidates.len() < to_free {
                // Active synapses only after every inactive one (offset as Cells4 does).
                for (k, syn) in syns.iter().enumerate() {
                    if in_update[k] {
                        let perm = self.codec.value(syn.code()) + max;
                        candidates.push((perm, syn.presyn(), k as u32));
                    }
                }
            }
            // Cells4 stable-sorts a presynaptic-ordered list: ties go to the lower cell.
            candidates.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(_, _, k) in &candidates[..to_free] {
                self.drop_synapse(seg, k as usize);
            }
            alive -= to_free;
            self.scratch.free_candidates = candidates;
        }
        // Nothing dropped and nothing new (the usual reinforcement): the synapses are final.
        if n_new > 0 || alive < self.synapses.get(s).len() {
            self.update_synapses(seg, &new_cells);
        }
        alive += n_new;
        self.scratch.in_update = in_update;
        self.scratch.new_cells = new_cells;
        if alive == 0 {
            self.release_segment(seg);
        }
    }

    /// A new segment on `cell` (in its most recently freed slot, else a new one) with
    /// synapses from the sorted `presyn` at `initial_perm`. At the `max_segments` budget,
    /// the least recently active segment goes first.
    fn create_segment(&mut self, cell: u32, presyn: &[u32], sequence: bool) -> SegmentId {
        let it = self.lrn_iteration;
        let budget = self.params.max_segments as usize;
        if budget > 0 && self.num_segments() >= budget {
            let victim = self
                .derived
                .recency
                .oldest(&self.segments)
                .expect("a live segment at the budget");
            self.release_segment(victim);
            self.stats.evictions += 1;
        }
        let seg = match self.free_segments.pop() {
            Some(id) => id,
            None => {
                self.synapses.reserve_for_ids(budget);
                reserve_for_ids(&mut self.segments, budget);
                self.synapses.push_empty();
                (self.synapses.len() - 1) as SegmentId
            }
        };
        debug_assert_ne!(seg, SINK);
        let slot = self.cell_slots.assign(cell, seg);
        if self.segments.len() <= seg as usize {
            self.segments
                .resize(seg as usize + 1, SegmentMeta::default());
        }
        self.segments[seg as usize] = SegmentMeta::new(cell, slot, sequence, it);
        debug_assert!(self.synapses.get(seg as usize).is_empty());
        self.update_synapses(seg, presyn);
        if budget > 0 {
            let policy = self.params.max_segments_eviction;
            let m = &self.segments[seg as usize];
            self.derived.recency.push(seg, m, budget, policy);
        }
        seg
    }

    // Every synapse change goes through the next four, which keep the out index and its
    // connected flags in step with the segments.

    /// Removes `seg`'s synapses marked [`DROPPED`] and adds synapses at `initial_perm` from
    /// the sorted `cells`, none of them on `seg` yet, keeping the synapses sorted.
    fn update_synapses(&mut self, seg: SegmentId, cells: &[u32]) {
        let mut syns = std::mem::take(&mut self.scratch.seg_synapses);
        syns.clear();
        self.synapses.extend_live(seg as usize, &mut syns);
        self.merge_synapses(seg, &mut syns, cells);
        self.synapses.set(seg as usize, &syns);
        self.scratch.seg_synapses = syns;
    }

    fn merge_synapses(&mut self, seg: SegmentId, syns: &mut Vec<Synapse>, cells: &[u32]) {
        if cells.is_empty() {
            return;
        }
        debug_assert!(cells.windows(2).all(|w| w[0] < w[1]));
        let perm = self.codec.initial;
        let connected = perm >= self.codec.connected;
        let out = &mut self.out_index;
        // Merge from the back, in place.
        let (mut a, mut b) = (syns.len(), cells.len());
        syns.resize(a + b, Synapse::new(0, 0));
        while b > 0 {
            let w = a + b - 1;
            if a > 0 && syns[a - 1].presyn() > cells[b - 1] {
                syns[w] = syns[a - 1];
                a -= 1;
            } else {
                let presyn = cells[b - 1];
                debug_assert!(a == 0 || syns[a - 1].presyn() != presyn);
                syns[w] = Synapse::new(presyn, perm);
                out.add(presyn, seg, connected);
                b -= 1;
            }
        }
        self.num_synapses += cells.len();
    }

    /// Unlists synapse `k` of `seg` and marks it [`DROPPED`]; [`Self::update_synapses`] removes it
    /// from the segment.
    fn drop_synapse(&mut self, seg: SegmentId, k: usize) {
        let syn = self.synapses.get(seg as usize).get(k);
        let connected = syn.code() >= self.codec.connected;
        self.out_index.remove(syn.presyn(), seg, connected);
        self.synapses.set_code(seg as usize, k, DROPPED);
        self.num_synapses -= 1;
    }

    fn set_code(&mut self, seg: SegmentId, k: usize, code: Code) {
        let cp = self.codec.connected;
        let syn = self.synapses.get(seg as usize).get(k);
        let was = syn.code() >= cp;
        self.synapses.set_code(seg as usize, k, code);
        let is = code >= cp;
        if was != is {
            self.out_index.set_connected(syn.presyn(), seg, is);
        }
    }

    /// Frees a segment's slot and drops updates queued for it.
    fn release_segment(&mut self, seg: SegmentId) {
        let s = seg as usize;
        let cp = self.codec.connected;
        for syn in self.synapses.get(s).iter() {
            self.out_index.remove(syn.presyn(), seg, syn.code() >= cp);
        }
        self.num_synapses -= self.synapses.get(s).len();
        self.synapses.clear(s);
        self.free_segments.push(seg);
        if self.params.max_segments > 0 {
            self.derived.recency.unlink(seg);
        }
        let meta = &mut self.segments[s];
        meta.release();
        self.cell_slots.release(meta.cell(), meta.slot());
        self.updates.retain(|u| u.segment != seg);
    }

    /// At each duty-cycle tier boundary every segment's cached duty cycle is brought up to
    /// date, so the moving average switches rate consistently.
    fn refresh_duty_cycles(&mut self) {
        let it = self.lrn_iteration;
        for cell in self.cell_slots.cells() {
            for seg in self.cell_slots.segments(cell) {
                self.segments[seg as usize].duty_cycle(it, false, false, &mut self.scratch.pow);
            }
        }
    }

    /// Lists the cells of every pending update still held as random choices, before
    /// something changes the segments they were queued for.
    fn make_updates_explicit(&mut self) {
        if self.updates.iter().all(|u| u.explicit) {
            return;
        }
        let mut updates = std::mem::take(&mut self.updates);
        let pool = std::mem::take(&mut self.update_pool);
        let mut explicit_pool = Vec::with_capacity(pool.len());
        for u in &mut updates {
            let range = u.start as usize..(u.start + u.len) as usize;
            let start = explicit_pool.len();
            if u.explicit {
                explicit_pool.extend_from_slice(&pool[range]);
            } else {
                // Still the learning state the update was queued from.
                let update =
                    self.build_update(Some(u.segment), false, Choices::Replay(&pool[range]));
                explicit_pool.extend_from_slice(&update);
                self.scratch.update = update;
            }
            u.start = start as u32;
            u.len = (explicit_pool.len() - start) as u32;
            u.explicit = true;
        }
        self.updates = updates;
        self.update_pool = explicit_pool;
    }

    /// Age-based global decay (`applyGlobalDecay`); off with NAB's settings.
    fn apply_global_decay(&mut self) {
        let max_age = self.params.max_age;
        if self.params.global_decay == 0.0
            || max_age == 0
            || !self.lrn_iteration.is_multiple_of(max_age)
        {
            return;
        }
        self.make_updates_explicit();
        let it = self.lrn_iteration;
        // In cell and slot order; releasing a segment changes only its own slot.
        let stale: Vec<SegmentId> = self
            .cell_slots
            .cells()
            .flat_map(|cell| self.cell_slots.segments(cell))
            .filter(|&seg| it - self.segments[seg as usize].last_active_iteration > max_age)
            .collect();
        for seg in stale {
            for k in 0..self.synapses.get(seg as usize).len() {
                let perm = self.codec.decay(self.synapses.get(seg as usize).code(k));
                if perm == 0 {
                    self.drop_synapse(seg, k);
                } else {
                    self.set_code(seg, k, perm);
                }
            }
            self.update_synapses(seg, &[]);
            if self.synapses.get(seg as usize).is_empty() {
                self.release_segment(seg);
            }
        }
    }
}

/// Room in a per-segment-id table for a new id: doubling, but never past the last id the
/// segment `budget` allows (none when 0), so a TM at its budget holds no unused capacity.
fn reserve_for_ids<T>(table: &mut Vec<T>, budget: usize) {
    if budget > 0 && table.len() == table.capacity() {
        let cap = (table.len() * 2).max(16).min(budget + 1);
        table.reserve_exact(cap.saturating_sub(table.len()));
    }
}

/// Asks the CPU to start loading `items` into cache (a hint: no effect on results).
#[inline]
pub(crate) fn prefetch_slice<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(items);
        let base = items.as_ptr().cast::<i8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch never faults; the
            // address stays within the slice.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    base.add(offset),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

/// The permanence walk of [`BacktrackingTm::reinforce`] over a segment's synapses: each one
/// whose presynaptic cell is on in `state` goes up by `step(code, true)`, the others down by
/// `step(code, false)`, and one reaching 0 is marked [`DROPPED`]. Fills `in_update` (per
/// synapse: was it on), `active` (the on cells, ascending) and `changed` (`(index, old code)`
/// of each synapse dropped or moved across the `connected` code). Nothing here calls out of
/// the loop, so its counters stay in registers; the out index is updated afterwards.
#[inline(always)]
fn adapt_walk<P: Entry, C: CodeWord>(
    (presyn, codes): (&[P], &mut [C]),
    state: &[u64],
    connected: Code,
    step: impl Fn(Code, bool) -> Code,
    (in_update, active, changed): Walk,
) {
    // Written by index with the counts in locals: pushes would keep each vector's length in
    // memory, a load and a store on every synapse's critical path.
    in_update.clear();
    in_update.resize(presyn.len(), false);
    active.clear();
    active.resize(presyn.len(), 0);
    changed.clear();
    let mut on_count = 0;
    let synapses = presyn.iter().zip(codes.iter_mut());
    for (k, ((presyn, c), flag)) in synapses.zip(in_update.iter_mut()).enumerate() {
        let (presyn, code) = (presyn.get() as u32, c.get());
        let on = is_set(state, presyn);
        *flag = on;
        // Written either way, kept only when on: no branch on the (data-dependent) state.
        active[on_count] = presyn;
        on_count += usize::from(on);
        let perm = step(code, on);
        *c = C::new(if perm == 0 { DROPPED } else { perm });
        if perm == 0 || (code >= connected) != (perm >= connected) {
            changed.push((k as u32, code));
        }
    }
    active.truncate(on_count);
}

/// The outputs of [`adapt_walk`]: `in_update`, `active` and `changed`.
type Walk<'a> = (
    &'a mut Vec<bool>,
    &'a mut Vec<u32>,
    &'a mut Vec<(u32, Code)>,
);

/// [`adapt_walk`] with one instance per kind of learning step, so the loop runs that kind's
/// step without a match per synapse.
fn adapt_walk_steps<P: Entry, C: CodeWord>(
    synapses: (&[P], &mut [C]),
    state: &[u64],
    connected: Code,
    steps: LearningSteps,
    walk: Walk,
) {
    match steps {
        steps @ LearningSteps::Table { .. } => {
            adapt_walk(synapses, state, connected, |c, on| steps.step(c, on), walk);
        }
        steps @ LearningSteps::Fixed { .. } => {
            adapt_walk(synapses, state, connected, |c, on| steps.step(c, on), walk);
        }
    }
}

/// Fraction of `active` columns absent from `predicted` (both sorted); 0 for no input.
fn raw_anomaly(active: &[u32], predicted: &[u32]) -> f32 {
    if active.is_empty() {
        return 0.0;
    }
    let hits = crate::sdr::sorted_intersection_len(active, predicted);
    (active.len() - hits) as f32 / active.len() as f32
}

/// A copy of `cols` in a recycled buffer.
fn copy_pattern(spare: &mut Vec<Vec<u32>>, cols: &[u32]) -> Vec<u32> {
    let mut p = spare.pop().unwrap_or_default();
    p.clear();
    p.extend_from_slice(cols);
    p
}

/// `inferPhase1`: activate the predicted cells of each active column, or burst the column
/// (or only its start cell with `use_start_cells`). Returns whether at least half the columns
/// were predicted (always true on start cells).
fn infer_phase1(
    cols: &[u32],
    use_start_cells: bool,
    cpc: u32,
    predicted_prev: &CellList,
    active: &mut CellList,
) -> bool {
    active.reset();
    if use_start_cells {
        for &c in cols {
            active.set(c * cpc);
        }
        return true;
    }
    let mut predicted_cols = 0usize;
    let mut predicted_prev = predicted_prev.cursor();
    for &c in cols {
        let base = c * cpc;
        let predicted = predicted_prev.range(base, base + cpc);
        if predicted.is_empty() {
            active.set_range(base, base + cpc);
        } else {
            active.extend(predicted);
            predicted_cols += 1;
        }
    }
    predicted_cols as f64 >= 0.5 * cols.len() as f64
}
