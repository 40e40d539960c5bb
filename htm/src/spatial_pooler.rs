//! Spatial pooler: NuPIC `SpatialPooler` semantics with a 1-D topology.
//!
//! Columns are materialised lazily. A column's potential pool and initial permanences are a
//! pure function of (seed, column): the constructor draws the columns one after the other
//! from one seeded stream, as NuPIC does, and keeps the stream's state at the start of each
//! column (16 bytes a column, derived, shared by the poolers with the same parameters), so any
//! column can be regenerated alone. A column that learning never touched is regenerated on
//! demand instead of stored. A column that learning modified (winners, bumped weak columns)
//! is first kept as the log of its learning steps (an index into the inputs of logged steps,
//! each held once for all the columns that won on it), replayed on its regenerated lanes when
//! it learns again; with NAB-like inputs most of the few hundred columns that ever win do so
//! a handful of times only. A column that keeps
//! learning has its permanences stored: one dense row of `u16` fixed-point permanences over
//! the input, a sentinel outside the pool, so a learning step is straight-line integer vector
//! code over contiguous memory.
//!
//! Overlaps come from bitsets of connected synapses (AND + popcount), stored word-major so
//! that each input word meets one contiguous plane of columns: the shared initial bits of
//! every column, and the current bits of the modified ones, which replace theirs. The stored
//! rows' bits are rebuilt on restore, so checkpoints carry only what learning changed.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use crate::random::Random;
use crate::sdr::Sdr;

/// An invalid parameter value, naming the parameter (snake_case, as in the params struct).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid parameter `{name}`: {reason}")]
pub struct ParamError {
    /// The offending parameter.
    pub name: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

impl ParamError {
    pub(crate) fn new(name: &'static str, reason: impl Into<String>) -> Self {
        ParamError {
            name,
            reason: reason.into(),
        }
    }
}

/// Learning iterations between inhibition-radius / minimum-duty-cycle updates (NuPIC's
/// `updatePeriod`).
const UPDATE_PERIOD: u64 = 50;
/// Fraction of a potential pool that starts connected (NuPIC's `initConnectedPct`).
const INIT_CONNECTED_PCT: f64 = 0.5;
/// Permanence units per 1.0: the pooler stores a permanence as a `u16` count of 1/50000, half
/// the memory of `f32`. NuPIC's parameters are whole units (`syn_perm_active_inc` 0.003 = 150,
/// `syn_perm_inactive_dec` 0.0005 = 25, `syn_perm_connected` 0.2 = 10000, the trim threshold
/// 75, the weak-column raise 1000), so learning is exact integer arithmetic and NuPIC's
/// epsilon in `permanence >= syn_perm_connected` is not needed.
pub const PERMANENCE_SCALE: u16 = 50_000;
/// The maximum permanence, 1.0.
const PERMANENCE_MAX: u16 = PERMANENCE_SCALE;

/// `v` (a fraction in `[0, 1]`) in permanence units, rounded to nearest.
fn to_units(v: f64) -> u16 {
    (v * f64::from(PERMANENCE_SCALE)).round() as u16
}

/// Permanence units as the fraction they stand for (the nearest `f32`, so `units >= c` iff
/// the fraction is `>= c as f32 / 50000`).
fn to_fraction(units: u16) -> f32 {
    f32::from(units) / f32::from(PERMANENCE_SCALE)
}

/// Spatial pooler parameters. Defaults are NuPIC's values as used by NAB's best detector;
/// `input_size` has no meaningful default and must be set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpatialPoolerParams {
    /// Number of input bits (the encoder's output width).
    pub input_size: u32,
    /// Number of columns.
    pub column_count: u32,
    /// Radius (in inputs) of a column's potential pool around its centre; `None` = the
    /// whole input.
    pub potential_radius: Option<u32>,
    /// Fraction of the inputs within the radius that join the potential pool.
    pub potential_pct: f64,
    /// Pick winners over all columns (true) or per neighbourhood of the inhibition radius.
    pub global_inhibition: bool,
    /// Target fraction of active columns per inhibition area; `<= 0` means use
    /// `num_active_columns_per_inh_area` instead.
    pub local_area_density: f64,
    /// Active columns per inhibition area (used when `local_area_density <= 0`).
    pub num_active_columns_per_inh_area: u32,
    /// Minimum overlap for a column to be eligible to win.
    pub stimulus_threshold: u32,
    /// Permanence decrement for synapses on inactive inputs of winning columns.
    pub syn_perm_inactive_dec: f64,
    /// Permanence increment for synapses on active inputs of winning columns.
    pub syn_perm_active_inc: f64,
    /// Permanence at which a synapse counts as connected.
    pub syn_perm_connected: f64,
    /// Weak-column threshold as a fraction of the (neighbourhood) maximum overlap duty cycle.
    pub min_pct_overlap_duty_cycle: f64,
    /// Period of the duty-cycle moving averages.
    pub duty_cycle_period: u32,
    /// Boosting strength (0 disables boosting).
    pub boost_strength: f64,
    /// Seed of the pooler's random generator.
    pub seed: u64,
    /// Whether topology wraps around the input and column edges.
    pub wrap_around: bool,
}

impl Default for SpatialPoolerParams {
    fn default() -> Self {
        SpatialPoolerParams {
            input_size: 0,
            column_count: 2048,
            potential_radius: None,
            potential_pct: 0.8,
            global_inhibition: true,
            local_area_density: -1.0,
            num_active_columns_per_inh_area: 40,
            stimulus_threshold: 0,
            syn_perm_inactive_dec: 0.0005,
            syn_perm_active_inc: 0.003,
            syn_perm_connected: 0.2,
            min_pct_overlap_duty_cycle: 0.001,
            duty_cycle_period: 1000,
            boost_strength: 0.0,
            seed: 1956,
            wrap_around: true,
        }
    }
}

fn check_unit(name: &'static str, v: f64, allow_zero: bool) -> Result<(), ParamError> {
    let ok = v.is_finite() && v <= 1.0 && (v > 0.0 || (allow_zero && v == 0.0));
    if ok {
        Ok(())
    } else {
        let range = if allow_zero { "[0, 1]" } else { "(0, 1]" };
        Err(ParamError::new(
            name,
            format!("must be in {range}, got {v}"),
        ))
    }
}

/// [`check_unit`] for a permanence amount, which must also not vanish in permanence units.
fn check_permanence(name: &'static str, v: f64, allow_zero: bool) -> Result<(), ParamError> {
    check_unit(name, v, allow_zero)?;
    if v > 0.0 && to_units(v) == 0 {
        return Err(ParamError::new(
            name,
            format!("{v} rounds to 0 permanence units of 1/{PERMANENCE_SCALE}"),
        ));
    }
    Ok(())
}

impl SpatialPoolerParams {
    /// Checks every parameter, naming the first invalid one.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.input_size == 0 {
            return Err(ParamError::new("input_size", "must be > 0 (no default)"));
        }
        if self.column_count == 0 {
            return Err(ParamError::new("column_count", "must be > 0"));
        }
        check_unit("potential_pct", self.potential_pct, false)?;
        if self.local_area_density > 0.0 {
            check_unit("local_area_density", self.local_area_density, false)?;
        } else if self.local_area_density.is_nan() {
            return Err(ParamError::new("local_area_density", "must not be NaN"));
        } else if self.num_active_columns_per_inh_area == 0 {
            return Err(ParamError::new(
                "num_active_columns_per_inh_area",
                "must be > 0 when local_area_density <= 0",
            ));
        } else if self.global_inhibition && self.num_active_columns_per_inh_area > self.column_count
        {
            return Err(ParamError::new(
                "num_active_columns_per_inh_area",
                format!(
                    "{} exceeds column_count {}",
                    self.num_active_columns_per_inh_area, self.column_count
                ),
            ));
        }
        check_permanence("syn_perm_inactive_dec", self.syn_perm_inactive_dec, true)?;
        check_permanence("syn_perm_active_inc", self.syn_perm_active_inc, true)?;
        check_permanence("syn_perm_connected", self.syn_perm_connected, false)?;
        let k = Consts::new(self);
        if k.trim >= k.connected {
            return Err(ParamError::new(
                "syn_perm_active_inc",
                format!(
                    "trim threshold syn_perm_active_inc/2 = {} must be below syn_perm_connected {}",
                    self.syn_perm_active_inc / 2.0,
                    self.syn_perm_connected
                ),
            ));
        }
        if k.below_stimulus_inc == 0 {
            // Weak columns would never be raised, nor pools to the stimulus threshold.
            return Err(ParamError::new(
                "syn_perm_connected",
                format!(
                    "the weak-column raise syn_perm_connected/10 = {} rounds to 0 permanence \
                     units of 1/{PERMANENCE_SCALE}",
                    self.syn_perm_connected / 10.0
                ),
            ));
        }
        check_unit(
            "min_pct_overlap_duty_cycle",
            self.min_pct_overlap_duty_cycle,
            true,
        )?;
        if self.duty_cycle_period == 0 {
            return Err(ParamError::new("duty_cycle_period", "must be > 0"));
        }
        if !(self.boost_strength.is_finite() && self.boost_strength >= 0.0) {
            return Err(ParamError::new(
                "boost_strength",
                format!("must be finite and >= 0, got {}", self.boost_strength),
            ));
        }
        Ok(())
    }
}

/// Learning constants in permanence units, each converted once from its parameter.
#[derive(Clone, Debug, Default)]
struct Consts {
    active_inc: u16,
    inactive_dec: u16,
    /// NuPIC's `synPermBelowStimulusInc`, `syn_perm_connected / 10`.
    below_stimulus_inc: u16,
    /// NuPIC's `synPermTrimThreshold`, `syn_perm_active_inc / 2`.
    trim: u16,
    /// A synapse is connected when its permanence is at least this.
    connected: u16,
    stimulus_threshold: u32,
}

impl Consts {
    fn new(p: &SpatialPoolerParams) -> Self {
        Consts {
            active_inc: to_units(p.syn_perm_active_inc),
            inactive_dec: to_units(p.syn_perm_inactive_dec),
            below_stimulus_inc: to_units(p.syn_perm_connected / 10.0),
            trim: to_units(p.syn_perm_active_inc / 2.0),
            connected: to_units(p.syn_perm_connected),
            stimulus_threshold: p.stimulus_threshold,
        }
    }
}

/// Marks a column's lanes for inputs outside its potential pool: above every permanence, so
/// it is told apart with one comparison. Learning leaves it unchanged and it never connects.
const NOT_IN_POOL: u16 = u16::MAX;
const NO_SLOT: u32 = u32::MAX;

/// Most learning steps a column is kept as a log of (its lanes regenerated and the steps
/// replayed whenever it learns again) before its lanes are stored. A logged step costs a
/// 4-byte index, and its input (64 bytes for NAB's 454 inputs) is shared by the winners of
/// its step, against 928 bytes of lanes; most columns that ever win do so a few times only.
/// Replaying grows with the square of this, on columns that win rarely.
const YOUNG_STEPS: usize = 24;
// Checkpoints count a log's steps in a byte.
const _: () = assert!(YOUNG_STEPS <= u8::MAX as usize);
/// Marks a slot's representation as a log (low bits: index into `ColumnStore::young`).
const YOUNG: u32 = 1 << 31;
/// A logged weak-column raise (a step without an input).
const RAISE: u32 = u32::MAX;

/// A column kept as the log of its learning steps.
#[derive(Clone, Copy, Debug, Default)]
struct Young {
    slot: u32,
    /// Start of its steps in [`ColumnStore::log`].
    start: u32,
    len: u16,
}

/// Where a column's permanences are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repr {
    /// As generated: learning never touched it.
    Lazy,
    /// Logged: `young[y]`, at `slot`.
    Young { slot: usize, y: usize },
    /// Lanes stored: block `d` of `perms`, at `slot`.
    Dense { slot: usize, d: usize },
}

/// The columns learning modified, each in a slot (in the order they were first modified):
/// either a log of its first few learning steps, replayed on its regenerated initial lanes
/// when needed, or `stride` stored lanes (see [`lane_stride`]). Lane `i` is the permanence
/// of the synapse from input `i`, or [`NOT_IN_POOL`].
///
/// The connected bits of every stored column are kept word-major over slots (word `w` of slot
/// `s` at `w * row_cap + s`), beside the shared initial bits of the lazy columns. For stored
/// lanes they are derived (rebuilt on restore); for logs they are state (regenerating them on
/// restore would cost a column's generation each).
#[derive(Clone, Debug, Default)]
struct ColumnStore {
    num_columns: u32,
    /// Lanes per stored column: [`lane_stride`] of the input, or whole words in a store just
    /// read from a checkpoint (see [`ColumnStore::set_stride`]).
    stride: u32,
    /// Slot → column.
    columns: Vec<u32>,
    /// Column → slot, [`NO_SLOT`] while the column is lazy. Derived from `columns`.
    slot_of: Vec<u32>,
    /// Slot → index of its lanes in `perms`, or [`YOUNG`] | index in `young`.
    repr: Vec<u32>,
    perms: Vec<u16>,
    young: Vec<Young>,
    /// The logs' steps, each log contiguous: an index into `inputs`, or [`RAISE`].
    log: Vec<u32>,
    /// Entries of `log` no log uses (left by a log moved to the end, or stored as lanes).
    free_entries: usize,
    /// Inputs of logged steps, [`ColumnStore::words`] each.
    inputs: Vec<u64>,
    /// Per input, how many logged steps refer to it; 0 for a free one.
    input_refs: Vec<u32>,
    /// Free inputs, the next to be taken last.
    free_inputs: Vec<u32>,
    /// The input of the current learning step, once a winner has logged it: the other
    /// winners share it. Not state: cleared by [`ColumnStore::begin_step`].
    current_input: Option<u32>,
    rows: Vec<u64>,
    row_cap: usize,
}

/// Content equality: slots and their lanes or logs (the logs' connected rows follow from them).
/// Lanes compare in their checkpoint form, padded to whole words: a store just restored equals
/// its origin whatever its stride.
impl PartialEq for ColumnStore {
    fn eq(&self, other: &Self) -> bool {
        let wire = |s: &ColumnStore| {
            let w = s.to_wire();
            (w.young_steps, w.young_inputs, w.inputs, w.tags, w.values)
        };
        self.num_columns == other.num_columns
            && self.words() == other.words()
            && self.columns == other.columns
            && wire(self) == wire(other)
    }
}

/// Lanes stored per column for `input_size` inputs: the input rounded up to 16 lanes, a whole
/// AVX2 vector (and whole checkpoint tag bytes, 4 lanes each). Rounding up to whole 64-lane
/// words, as the connected rows are, would store up to 48 more lanes per column (464 against
/// 512 with NAB's 454 inputs) that never leave [`NOT_IN_POOL`].
fn lane_stride(input_size: usize) -> usize {
    input_size.div_ceil(16) * 16
}

impl ColumnStore {
    fn new(num_columns: usize, stride: usize) -> Self {
        ColumnStore {
            num_columns: num_columns as u32,
            stride: stride as u32,
            slot_of: vec![NO_SLOT; num_columns],
            ..ColumnStore::default()
        }
    }

    /// `u64` words of an input bitset or a connected row: one per 64 lanes, the last maybe
    /// partly used.
    fn words(&self) -> usize {
        (self.stride as usize).div_ceil(64)
    }

    /// Lays the stored lanes out again with `stride` lanes per column (at least those of the
    /// input: the lanes cut off are outside every pool).
    fn set_stride(&mut self, stride: usize) {
        let old = self.stride as usize;
        if stride == old {
            return;
        }
        let mut perms = Vec::with_capacity(self.perms.len() / old * stride);
        for lanes in self.perms.chunks_exact(old) {
            let kept = stride.min(old);
            perms.extend_from_slice(&lanes[..kept]);
            perms.resize(perms.len() + stride - kept, NOT_IN_POOL);
        }
        self.perms = perms;
        self.stride = stride as u32;
    }

    fn repr(&self, column: u32) -> Repr {
        match self.slot_of[column as usize] {
            NO_SLOT => Repr::Lazy,
            s => {
                let (slot, r) = (s as usize, self.repr[s as usize]);
                if r & YOUNG != 0 {
                    Repr::Young {
                        slot,
                        y: (r & !YOUNG) as usize,
                    }
                } else {
                    Repr::Dense {
                        slot,
                        d: r as usize,
                    }
                }
            }
        }
    }

    fn lanes(&self, d: usize) -> &[u16] {
        let s = self.stride as usize;
        &self.perms[d * s..(d + 1) * s]
    }

    fn lanes_mut(&mut self, d: usize) -> &mut [u16] {
        let s = self.stride as usize;
        &mut self.perms[d * s..(d + 1) * s]
    }

    /// Young `y`'s logged steps: indices into `inputs`, or [`RAISE`].
    fn steps_of(&self, y: usize) -> &[u32] {
        let g = self.young[y];
        let start = g.start as usize;
        &self.log[start..start + usize::from(g.len)]
    }

    /// Logged input `i`'s words.
    fn input(&self, i: u32) -> &[u64] {
        let words = self.words();
        &self.inputs[i as usize * words..(i as usize + 1) * words]
    }

    /// Starts a learning step: its input is not logged yet.
    fn begin_step(&mut self) {
        self.current_input = None;
    }

    /// The index of `bits`, the current step's input, among the logged inputs, counting one
    /// more step referring to it.
    fn intern_input(&mut self, bits: &[u64]) -> u32 {
        if let Some(i) = self.current_input {
            self.input_refs[i as usize] += 1;
            return i;
        }
        let words = self.words();
        let i = match self.free_inputs.pop() {
            Some(i) => {
                self.inputs[i as usize * words..(i as usize + 1) * words].copy_from_slice(bits);
                i
            }
            None => {
                crate::reserve_gradually(&mut self.inputs, words, 8 * words);
                crate::reserve_gradually(&mut self.input_refs, 1, 8);
                self.inputs.extend_from_slice(bits);
                self.input_refs.push(0);
                (self.input_refs.len() - 1) as u32
            }
        };
        self.input_refs[i as usize] = 1;
        self.current_input = Some(i);
        i
    }

    /// One step referring to input `i` fewer; an input no step refers to is freed.
    fn release_input(&mut self, i: u32) {
        let refs = &mut self.input_refs[i as usize];
        *refs -= 1;
        if *refs == 0 {
            self.free_inputs.push(i);
            if self.current_input == Some(i) {
                self.current_input = None;
            }
        }
    }

    /// A new slot for `column` (lazy until now), its connected row zero.
    fn add_slot(&mut self, column: u32, repr: u32) -> usize {
        let slot = self.columns.len();
        if slot == self.row_cap {
            // Re-lay the planes with room for more slots.
            let words = self.words();
            let cap = self.row_cap + (self.row_cap / 16).max(8);
            let mut rows = vec![0u64; words * cap];
            for w in 0..words {
                rows[w * cap..w * cap + slot]
                    .copy_from_slice(&self.rows[w * self.row_cap..w * self.row_cap + slot]);
            }
            self.rows = rows;
            self.row_cap = cap;
        }
        self.columns.push(column);
        self.repr.push(repr);
        self.slot_of[column as usize] = slot as u32;
        slot
    }

    fn row(&self, slot: usize, row: &mut [u64]) {
        gather_row(&self.rows, self.row_cap, slot, row);
    }

    fn set_row(&mut self, slot: usize, row: &[u64]) {
        scatter_row(&mut self.rows, self.row_cap, slot, row);
    }

    /// Stores `lanes` as block `d` of `perms`, which must be the next block.
    fn push_lanes(&mut self, lanes: &[u16]) -> usize {
        let stride = self.stride as usize;
        crate::reserve_gradually(&mut self.perms, stride, 8 * stride);
        self.perms.extend_from_slice(lanes);
        self.perms.len() / stride - 1
    }

    /// Logs a step for `column`: a new log if it is lazy, else appended to log `y`. `bits` is
    /// the current step's input, `None` a weak-column raise.
    fn log_step(&mut self, column: u32, y: Option<usize>, bits: Option<&[u64]>) {
        let y = match y {
            Some(y) => y,
            None => {
                let y = self.young.len();
                let slot = self.add_slot(column, YOUNG | y as u32);
                let start = self.log.len() as u32;
                self.young.push(Young {
                    slot: slot as u32,
                    start,
                    len: 0,
                });
                y
            }
        };
        let entry = bits.map_or(RAISE, |bits| self.intern_input(bits));
        let g = self.young[y];
        let (start, used) = (g.start as usize, usize::from(g.len));
        crate::reserve_gradually(&mut self.log, used + 1, 64);
        if start + used != self.log.len() {
            // Not at the end: move the log there, leaving its old entries free.
            self.log.extend_from_within(start..start + used);
            self.free_entries += used;
            self.young[y].start = (self.log.len() - used) as u32;
        }
        self.log.push(entry);
        self.young[y].len += 1;
        self.compact_log();
    }

    /// Turns log `y` into stored `lanes` (same slot).
    fn promote(&mut self, y: usize, lanes: &[u16]) {
        let g = self.young.swap_remove(y);
        let start = g.start as usize;
        for k in start..start + usize::from(g.len) {
            if self.log[k] != RAISE {
                self.release_input(self.log[k]);
            }
        }
        self.free_entries += usize::from(g.len);
        if let Some(moved) = self.young.get(y) {
            self.repr[moved.slot as usize] = YOUNG | y as u32;
        }
        let d = self.push_lanes(lanes);
        self.repr[g.slot as usize] = d as u32;
        self.compact_log();
        self.compact_inputs();
    }

    /// Closes up the free entries of `log` once they are an eighth of it.
    fn compact_log(&mut self) {
        if self.free_entries * 8 <= self.log.len() {
            return;
        }
        let used = self.log.len() - self.free_entries;
        let mut log = Vec::with_capacity(used + used / 16);
        for g in &mut self.young {
            let start = g.start as usize;
            g.start = log.len() as u32;
            log.extend_from_slice(&self.log[start..start + usize::from(g.len)]);
        }
        self.log = log;
        self.free_entries = 0;
    }

    /// Renumbers the inputs in use without the free ones once these are a quarter of them
    /// (the inputs in use were all logged at once, by the winners of a few steps, and are
    /// freed as unevenly).
    fn compact_inputs(&mut self) {
        let n = self.input_refs.len();
        if self.free_inputs.len() * 4 <= n || n < 64 {
            return;
        }
        let words = self.words();
        let mut new_index = vec![RAISE; n];
        let live = n - self.free_inputs.len();
        let mut inputs = Vec::with_capacity((live + live / 16) * words);
        let mut refs = Vec::with_capacity(live + live / 16);
        for (i, &r) in self.input_refs.iter().enumerate() {
            if r > 0 {
                new_index[i] = refs.len() as u32;
                refs.push(r);
                inputs.extend_from_slice(&self.inputs[i * words..(i + 1) * words]);
            }
        }
        for g in &self.young {
            let start = g.start as usize;
            for e in &mut self.log[start..start + usize::from(g.len)] {
                if *e != RAISE {
                    *e = new_index[*e as usize];
                }
            }
        }
        self.current_input = self.current_input.map(|i| new_index[i as usize]);
        self.inputs = inputs;
        self.input_refs = refs;
        self.free_inputs = Vec::new();
    }

    fn to_wire(&self) -> StoreWireRef<'_> {
        let words = self.words();
        let mut young_steps = Vec::with_capacity(self.columns.len());
        let mut young_inputs = Vec::new();
        let mut inputs = Vec::new();
        let mut young_rows = Vec::new();
        let mut dense = Vec::new();
        let mut row = vec![0u64; words];
        // Inputs numbered from 1 in order of first use (0 is a raise), whatever their places.
        let mut number = vec![0u32; self.input_refs.len()];
        let mut numbered = 0;
        for slot in 0..self.columns.len() {
            let r = self.repr[slot];
            if r & YOUNG == 0 {
                young_steps.push(0u8);
                dense.push(r as usize);
                continue;
            }
            let y = (r & !YOUNG) as usize;
            young_steps.push(self.young[y].len as u8);
            for &e in self.steps_of(y) {
                if e == RAISE {
                    young_inputs.push(0);
                    continue;
                }
                let k = &mut number[e as usize];
                if *k == 0 {
                    numbered += 1;
                    *k = numbered;
                    for &w in self.input(e) {
                        inputs.extend_from_slice(&w.to_le_bytes());
                    }
                }
                young_inputs.push(*k);
            }
            self.row(slot, &mut row);
            for &w in &row {
                young_rows.extend_from_slice(&w.to_le_bytes());
            }
        }
        // Branch-free: each lane's value is written at the cursor, which only advances past
        // values (a restore-and-evict cycle serialises and parses every stored column).
        // Checkpoints hold whole words of lanes per column, so that they read as before the
        // stride was cut to the input: the lanes past it are tagged outside the pool.
        let (stride, wire_stride) = (self.stride as usize, 64 * words);
        let n = dense.len() * stride;
        let mut tags = vec![TAG_NOT_IN_POOL * 0b0101_0101; dense.len() * wire_stride / 4];
        let mut values = vec![0u8; 2 * n];
        let mut w = 0;
        // A stride is whole tag bytes (see `lane_stride`).
        let column_tags = tags.chunks_exact_mut(wire_stride / 4);
        let tags_quads = column_tags
            .zip(&dense)
            .flat_map(|(tags, &d)| tags.iter_mut().zip(self.lanes(d).chunks_exact(4)));
        for (t, quad) in tags_quads {
            let mut byte = 0;
            for (j, &p) in quad.iter().enumerate() {
                let tag = match p {
                    0 => TAG_ZERO,
                    PERMANENCE_MAX => TAG_MAX,
                    NOT_IN_POOL => TAG_NOT_IN_POOL,
                    _ => TAG_VALUE,
                };
                values[w..w + 2].copy_from_slice(&p.to_le_bytes());
                w += 2 * usize::from(tag == TAG_VALUE);
                byte |= tag << (2 * j);
            }
            *t = byte;
        }
        values.truncate(w);
        StoreWireRef {
            num_columns: self.num_columns,
            stride: wire_stride as u32,
            columns: &self.columns,
            young_steps,
            young_inputs,
            inputs,
            young_rows,
            tags,
            values,
        }
    }

    fn from_wire(w: StoreWire) -> Result<Self, String> {
        if w.stride == 0 || !w.stride.is_multiple_of(64) {
            return Err(format!("column stride {} is not whole words", w.stride));
        }
        let mut store = ColumnStore::new(w.num_columns as usize, w.stride as usize);
        let words = store.words();
        if w.young_steps.len() != w.columns.len() {
            return Err("step counts do not match the stored columns".into());
        }
        let (mut logged, mut n_young, mut n_dense) = (0usize, 0usize, 0usize);
        for &n in &w.young_steps {
            if usize::from(n) > YOUNG_STEPS {
                return Err(format!("{n} logged steps, at most {YOUNG_STEPS} are kept"));
            }
            logged += usize::from(n);
            n_young += usize::from(n > 0);
            n_dense += usize::from(n == 0);
        }
        if w.young_inputs.len() != logged
            || !w.inputs.len().is_multiple_of(8 * words)
            || w.young_rows.len() != 8 * n_young * words
        {
            return Err("logged steps do not match their counts".into());
        }
        let to_words = |bytes: &[u8]| -> Vec<u64> {
            bytes
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        };
        let rows = to_words(&w.young_rows);
        store.inputs = to_words(&w.inputs);
        let n_inputs = w.inputs.len() / (8 * words);
        store.input_refs = vec![0; n_inputs];
        store.log.reserve_exact(logged);
        for &k in &w.young_inputs {
            let entry = match k {
                0 => RAISE,
                k if k as usize <= n_inputs => {
                    store.input_refs[k as usize - 1] += 1;
                    k - 1
                }
                _ => return Err(format!("logged step of input {k}, of {n_inputs}")),
            };
            store.log.push(entry);
        }
        if store.input_refs.contains(&0) {
            return Err("a logged input no step refers to".into());
        }
        for (&col, &n) in w.columns.iter().zip(&w.young_steps) {
            if store.slot_of.get(col as usize) != Some(&NO_SLOT) {
                return Err(format!("column {col} out of range or listed twice"));
            }
            if n == 0 {
                // Its lanes come below; the index is fixed up there.
                store.add_slot(col, 0);
                continue;
            }
            let y = store.young.len();
            let slot = store.add_slot(col, YOUNG | y as u32);
            let start = store.young.last().map_or(0, |g| g.start + u32::from(g.len));
            store.young.push(Young {
                slot: slot as u32,
                start,
                len: u16::from(n),
            });
            store.set_row(slot, &rows[y * words..(y + 1) * words]);
        }
        let lanes = n_dense * w.stride as usize;
        if w.tags.len() != lanes.div_ceil(4) {
            return Err("permanence tags do not match the stored columns".into());
        }
        if !w.values.len().is_multiple_of(2) {
            return Err("odd number of permanence bytes".into());
        }
        // Branch-free, as `to_wire`: every lane reads the value at the cursor (0 past the end)
        // and the cursor advances past values only; errors are noted and reported after.
        let bytes = &w.values;
        let (mut r, mut short, mut above) = (0usize, false, None);
        store.perms.resize(lanes, 0);
        for (quad, &byte) in store.perms.chunks_mut(4).zip(&w.tags) {
            for (j, p) in quad.iter_mut().enumerate() {
                let tag = (byte >> (2 * j)) & 3;
                let v = match bytes.get(r..r + 2) {
                    Some(&[lo, hi]) => u16::from_le_bytes([lo, hi]),
                    _ => 0,
                };
                let is_value = tag == TAG_VALUE;
                short |= is_value && r + 2 > bytes.len();
                if is_value && v > PERMANENCE_MAX && above.is_none() {
                    above = Some(v);
                }
                r += 2 * usize::from(is_value);
                *p = match tag {
                    TAG_ZERO => 0,
                    TAG_MAX => PERMANENCE_MAX,
                    TAG_NOT_IN_POOL => NOT_IN_POOL,
                    _ => v,
                };
            }
        }
        if short {
            return Err("fewer permanences than tags".into());
        }
        if let Some(p) = above {
            return Err(format!("permanence {p} above the maximum"));
        }
        if r != bytes.len() {
            return Err("more permanences than tags".into());
        }
        let mut d = 0;
        for (slot, &n) in w.young_steps.iter().enumerate() {
            if n == 0 {
                store.repr[slot] = d;
                d += 1;
            }
        }
        Ok(store)
    }
}

// Checkpoint form of stored lanes: 2 bits per lane say 0, the maximum, not in the pool, or
// "next explicit value". Long-trained columns are mostly 0 and the maximum, so a stored
// column costs far less than its 2 bytes per lane.
const TAG_ZERO: u8 = 0;
const TAG_MAX: u8 = 1;
const TAG_VALUE: u8 = 2;
const TAG_NOT_IN_POOL: u8 = 3;

// The explicit values are `u16` little-endian byte pairs: as integers, bincode's varint
// encoding would spend 3 bytes on every value of 251 units or more (and the logs' words, as
// integers, up to 10 bytes each).
#[derive(Serialize)]
struct StoreWireRef<'a> {
    num_columns: u32,
    stride: u32,
    columns: &'a [u32],
    /// Per slot: its logged steps, 0 where its lanes are stored.
    young_steps: Vec<u8>,
    /// The logs' steps in slot order: 0 for a raise, else which of `inputs` (from 1).
    young_inputs: Vec<u32>,
    /// The logged inputs, each once, in order of first use: little-endian words.
    inputs: Vec<u8>,
    /// The logs' connected rows: little-endian words.
    young_rows: Vec<u8>,
    /// Stored lanes of the other slots, in slot order.
    tags: Vec<u8>,
    values: Vec<u8>,
}

#[derive(Deserialize)]
struct StoreWire {
    num_columns: u32,
    stride: u32,
    columns: Vec<u32>,
    young_steps: Vec<u8>,
    young_inputs: Vec<u32>,
    inputs: Vec<u8>,
    young_rows: Vec<u8>,
    tags: Vec<u8>,
    values: Vec<u8>,
}

impl Serialize for ColumnStore {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_wire().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ColumnStore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ColumnStore::from_wire(StoreWire::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Serde form of per-column `f32` vectors as runs of bit-identical values: duty cycles of
/// columns that were never active (or always overlapped) are equal, and boost factors stay
/// 1.0 without boosting, so runs are long.
pub(crate) mod rle_f32 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Longest vector accepted when decoding (guards against absurd run lengths).
    const MAX_LEN: u64 = 1 << 28;

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<(u32, f32)> = Vec::new();
        for &x in v {
            match runs.last_mut() {
                Some((n, y)) if y.to_bits() == x.to_bits() => *n += 1,
                _ => runs.push((1, x)),
            }
        }
        runs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let runs: Vec<(u32, f32)> = Vec::deserialize(d)?;
        let len: u64 = runs.iter().map(|&(n, _)| u64::from(n)).sum();
        if len > MAX_LEN {
            return Err(serde::de::Error::custom("run-length vector too long"));
        }
        let mut v = Vec::with_capacity(len as usize);
        for (n, x) in runs {
            v.extend(std::iter::repeat_n(x, n as usize));
        }
        Ok(v)
    }
}

/// What the constructor generates for every column, the same for every pooler with the same
/// parameters: the random stream at the start of each column and the connected bits of its
/// initial permanences. Generating it takes ~15 ms for 2048 columns, so poolers with equal
/// parameters share one: a fleet of devices builds and restores thousands of networks.
#[derive(Debug, Default)]
struct InitialLayout {
    streams: Vec<Random>,
    /// Connected bits, word-major: word `w` of column `c` at `w * column_count + c`.
    connected: Vec<u64>,
}

impl InitialLayout {
    fn heap_bytes(&self) -> usize {
        self.streams.capacity() * std::mem::size_of::<Random>() + self.connected.capacity() * 8
    }
}

/// Layouts by parameters (their bincode bytes), most recently built last. A process sees a
/// handful of distinct parameter sets, so a short capped list does.
static LAYOUTS: Mutex<Vec<(Vec<u8>, Arc<InitialLayout>)>> = Mutex::new(Vec::new());
const LAYOUTS_KEPT: usize = 16;

fn initial_layout(
    params: &SpatialPoolerParams,
    potential_radius: u32,
    k: &Consts,
    words: usize,
) -> Arc<InitialLayout> {
    let key = bincode::serde::encode_to_vec(params, bincode::config::standard())
        .expect("parameters serialise");
    let cached = |list: &[(Vec<u8>, Arc<InitialLayout>)]| {
        list.iter().find(|(k, _)| *k == key).map(|(_, l)| l.clone())
    };
    if let Some(hit) = cached(&LAYOUTS.lock().unwrap_or_else(|e| e.into_inner())) {
        return hit;
    }
    let n_col = params.column_count as usize;
    let mut connected = vec![0u64; n_col * words];
    let mut scratch = vec![NOT_IN_POOL; words * 64];
    let mut streams = Vec::with_capacity(n_col);
    let mut rng = Random::new(params.seed);
    let mut row = vec![0u64; words];
    let mut pool = Vec::new();
    for col in 0..n_col {
        streams.push(rng.clone());
        generate_column(
            params,
            potential_radius,
            k,
            col as u32,
            &mut rng,
            &mut scratch,
            &mut pool,
        );
        connected_bits(&scratch, k.connected, &mut row);
        scatter_row(&mut connected, n_col, col, &row);
    }
    let layout = Arc::new(InitialLayout { streams, connected });
    let mut list = LAYOUTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(raced) = cached(&list) {
        return raced;
    }
    if list.len() >= LAYOUTS_KEPT {
        list.remove(0);
    }
    list.push((key, layout.clone()));
    layout
}

/// The scratch buffers of [`Cache`], lent by the thread for the length of a compute: a
/// process holds many poolers but computes on few threads, and an idle pooler then holds none
/// of them (a tenth of a grown NAB pooler's heap otherwise).
#[derive(Clone, Debug, Default)]
struct Scratch {
    /// One column's row of connected bits, gathered or to be scattered.
    row: Vec<u64>,
    /// One column's lanes, regenerated and replayed from its log.
    lanes: Vec<u16>,
    /// A generated column's potential pool.
    pool: Vec<u32>,
    input_bits: Vec<u64>,
    /// Indices of the non-zero words of `input_bits`, ascending.
    nonzero_words: Vec<usize>,
    /// Per input lane, the permanence change of a winning column's synapse from it.
    delta: Delta,
    /// Per input lane, the raise of a weak column's synapses.
    bump: Delta,
    /// Per input lane, the change of a logged step being replayed.
    replay: Delta,
    /// Overlaps of the stored columns, by slot.
    slot_overlaps: Vec<u32>,
    /// Boosted overlaps, and the active flags of local inhibition: sized on first use, so a
    /// pooler without boosting and with global inhibition (NAB's) uses neither.
    boosted: Vec<f32>,
    active_flags: Vec<bool>,
    /// Sort keys of boosted global inhibition (empty until used).
    keys: Vec<u64>,
    histogram: Vec<u32>,
    /// The winners' new active duty cycles, during their update.
    winner_duty: Vec<f32>,
}

thread_local! {
    /// The scratch buffers of the poolers computing on this thread (see [`Scratch`]).
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

impl Scratch {
    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        size_of::<u64>() * (self.row.capacity() + self.input_bits.capacity() + self.keys.capacity())
            + 2 * self.lanes.capacity()
            + size_of::<usize>() * self.nonzero_words.capacity()
            + self.delta.heap_bytes()
            + self.bump.heap_bytes()
            + self.replay.heap_bytes()
            + 4 * (self.pool.capacity()
                + self.slot_overlaps.capacity()
                + self.boosted.capacity()
                + self.histogram.capacity()
                + self.winner_duty.capacity())
            + self.active_flags.capacity()
    }
}

/// Derived data, and scratch buffers while a compute has them (see [`Scratch`]): rebuilt from
/// the persistent state, never serialised.
#[derive(Clone, Debug, Default)]
struct Cache {
    /// Lent by the thread during a compute, empty otherwise.
    scratch: Scratch,
    consts: Consts,
    /// `u64` words per column row and per input bitset.
    words: usize,
    overlaps: Vec<u32>,
    winners: Vec<u32>,
    /// The constructor's random stream at the start of each column, and more.
    layout: Arc<InitialLayout>,
    vectors: Vectors,
    overlap_kernel: OverlapKernel,
}

/// Caches compare equal: they are a function of the persistent state.
impl PartialEq for Cache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The spatial pooler. See the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpatialPooler {
    params: SpatialPoolerParams,
    potential_radius: u32,
    inhibition_radius: u32,
    /// Learning iterations so far (NuPIC's iteration counter; see [`SpatialPooler::compute`]).
    iteration: u64,
    #[serde(with = "rle_f32")]
    overlap_duty_cycles: Vec<f32>,
    #[serde(with = "rle_f32")]
    active_duty_cycles: Vec<f32>,
    /// Per column; a single value shared by all columns under global inhibition.
    #[serde(with = "rle_f32")]
    min_overlap_duty_cycles: Vec<f32>,
    /// Per column; empty without boosting (`boost_strength` 0), where every factor is 1.
    #[serde(with = "rle_f32")]
    boost_factors: Vec<f32>,
    /// Permanences of the columns learning has modified; the others are regenerated.
    columns: ColumnStore,
    #[serde(skip)]
    cache: Cache,
}

/// Indices of a 1-D neighbourhood of `radius` around `center` in a space of `dim`, in
/// NuPIC's order (left to right, wrapped values taken modulo `dim`).
fn neighborhood(center: u32, radius: u32, dim: u32, wrap: bool) -> impl Iterator<Item = u32> {
    let (c, r, d) = (i64::from(center), i64::from(radius), i64::from(dim));
    let (lo, hi) = if wrap {
        (c - r, (c + r).min(c - r + d - 1))
    } else {
        ((c - r).max(0), (c + r).min(d - 1))
    };
    // `lo > -d` and `hi < 2d`: one correction instead of a division (columns are
    // regenerated often enough for it to show).
    (lo..=hi).map(move |v| {
        let v = if v < 0 {
            v + d
        } else if v >= d {
            v - d
        } else {
            v
        };
        v as u32
    })
}

fn neighborhood_len(center: u32, radius: u32, dim: u32, wrap: bool) -> usize {
    let (c, r, d) = (i64::from(center), i64::from(radius), i64::from(dim));
    let n = if wrap {
        (2 * r + 1).min(d)
    } else {
        (c + r).min(d - 1) - (c - r).max(0) + 1
    };
    n as usize
}

/// NuPIC `_mapColumn` (1-D): the input index at the centre of `column`'s receptive field.
fn map_column(p: &SpatialPoolerParams, column: u32) -> u32 {
    let n_in = f64::from(p.input_size);
    let n_col = f64::from(p.column_count);
    let ratio = f64::from(column) / n_col;
    let center = (n_in * ratio + 0.5 * n_in / n_col) as u32;
    center.min(p.input_size - 1)
}

/// Potential pool size for `candidates` inputs in range (NuPIC rounds half up).
fn pool_size(candidates: usize, potential_pct: f64) -> usize {
    (candidates as f64 * potential_pct + 0.5) as usize
}

/// Writes `column`'s initial lanes: [`NOT_IN_POOL`] outside its potential pool, NuPIC's
/// initial permanence inside (`_initPermanence`, from the same draws, but rounded down to
/// whole units instead of to 5 decimals; trimmed, then raised to the stimulus threshold).
/// `rng` must be the constructor's stream positioned at the start of `column`; it is left at
/// the start of the next one.
fn generate_column(
    p: &SpatialPoolerParams,
    potential_radius: u32,
    k: &Consts,
    column: u32,
    rng: &mut Random,
    lanes: &mut [u16],
    pool: &mut Vec<u32>,
) {
    // The candidates, then the sample drawn from them in place: no allocation per column.
    pool.clear();
    pool.extend(neighborhood(
        map_column(p, column),
        potential_radius,
        p.input_size,
        p.wrap_around,
    ));
    rng.sample_in_place(pool, pool_size(pool.len(), p.potential_pct));
    // The permanences are drawn in ascending input order, as NuPIC does: pool members are
    // marked in their lanes and the lanes read in order, cheaper than sorting the pool (a
    // column is generated again each time a logged column learns).
    lanes.fill(NOT_IN_POOL);
    for &input in pool.iter() {
        lanes[input as usize] = 0;
    }
    let connected = f64::from(k.connected);
    let above = f64::from(PERMANENCE_MAX - k.connected);
    for lane in lanes.iter_mut().filter(|p| **p != NOT_IN_POOL) {
        // The draws are NuPIC's; truncation to whole units stands in for its 5 decimals.
        // Either way one more value is drawn: both are computed and one kept, as the choice
        // is a coin flip no branch predictor guesses.
        let (choice, r) = (rng.real(), rng.real());
        let (on, off) = (k.connected + (above * r) as u16, (connected * r) as u16);
        let v = if choice <= INIT_CONNECTED_PCT {
            on
        } else {
            off
        };
        *lane = if v < k.trim { 0 } else { v };
    }
    if k.stimulus_threshold > 0 {
        adapt_raising(lanes, k, |_| 0);
    }
}

/// Whether a lane's synapse is connected: one unsigned comparison, which the wrap-around
/// makes false both below `connected` and for [`NOT_IN_POOL`] (above the maximum).
#[inline(always)]
fn is_connected(p: u16, connected: u16) -> bool {
    p.wrapping_sub(connected) <= PERMANENCE_MAX - connected
}

/// Connected-synapse bits of a column's lanes, one word per 64 lanes (the last word for the
/// lanes left, if fewer).
fn connected_bits(lanes: &[u16], connected: u16, row: &mut [u64]) {
    let bits = |chunk: &[u16]| {
        let mut bits = 0u64;
        for (j, &p) in chunk.iter().enumerate() {
            bits |= u64::from(is_connected(p, connected)) << j;
        }
        bits
    };
    let chunks = lanes.chunks_exact(64);
    let (whole, tail) = (chunks.len(), chunks.remainder());
    for (w, chunk) in row.iter_mut().zip(chunks) {
        *w = bits(chunk);
    }
    if !tail.is_empty() {
        row[whole] = bits(tail);
    }
}

/// NuPIC's `_updatePermanencesForColumn` with `raisePerm`: applies `delta(lane)` clipped to
/// `[0, max]`, lifts the whole pool by `syn_perm_connected / 10` until the stimulus threshold
/// of synapses connect, then trims. Only used with a non-zero stimulus threshold.
fn adapt_raising<D: Fn(usize) -> i32>(lanes: &mut [u16], k: &Consts, delta: D) {
    let max = i32::from(PERMANENCE_MAX);
    let mut n_connected = 0u32;
    for (i, p) in lanes.iter_mut().enumerate() {
        if *p != NOT_IN_POOL {
            *p = (i32::from(*p) + delta(i)).clamp(0, max) as u16;
            n_connected += u32::from(*p >= k.connected);
        }
    }
    // Validation guarantees every pool is large enough and the raise non-zero, so this
    // terminates. Clipping at the maximum on the way (NuPIC clips after) changes no count:
    // the maximum is connected.
    while n_connected < k.stimulus_threshold {
        n_connected = 0;
        for p in lanes.iter_mut().filter(|p| **p != NOT_IN_POOL) {
            *p = p.saturating_add(k.below_stimulus_inc).min(PERMANENCE_MAX);
            n_connected += u32::from(*p >= k.connected);
        }
    }
    for p in lanes.iter_mut().filter(|p| **p < k.trim) {
        *p = 0;
    }
}

/// A permanence change per lane: `inc` added, then `dec` subtracted (one of them is 0).
#[derive(Clone, Debug, Default)]
struct Delta {
    inc: Vec<u16>,
    dec: Vec<u16>,
}

impl Delta {
    fn new(lanes: usize, inc: u16, dec: u16) -> Self {
        Delta {
            inc: vec![inc; lanes],
            dec: vec![dec; lanes],
        }
    }

    fn resize(&mut self, lanes: usize) {
        self.inc.resize(lanes, 0);
        self.dec.resize(lanes, 0);
    }

    fn heap_bytes(&self) -> usize {
        2 * (self.inc.capacity() + self.dec.capacity())
    }
}

/// NuPIC's `_updatePermanencesForColumn` without raising: applies `inc` and `dec` clipped to
/// `[0, max]` (saturating, which is exact since only one of them is non-zero per lane), trims
/// values below `trim` to 0, and rewrites the column's connected bits, a row word per 64
/// lanes (the last for the lanes left). [`NOT_IN_POOL`] lanes stay as they are and never
/// connect.
#[inline(always)]
fn adapt_lanes(
    lanes: &mut [u16],
    (inc, dec): (&[u16], &[u16]),
    trim: u16,
    connected: u16,
    row: &mut [u64],
) {
    let lane = |p: u16, inc: u16, dec: u16| {
        let np = p.saturating_add(inc).min(PERMANENCE_MAX);
        let np = np.saturating_sub(dec);
        let np = if np < trim { 0 } else { np };
        if p == NOT_IN_POOL {
            p
        } else {
            np
        }
    };
    let mut chunks = lanes.chunks_exact_mut(64);
    let whole = chunks.len();
    for (((w, chunk), inc), dec) in row
        .iter_mut()
        .zip(chunks.by_ref())
        .zip(inc.chunks_exact(64))
        .zip(dec.chunks_exact(64))
    {
        let mut bits = 0u64;
        for j in 0..64 {
            chunk[j] = lane(chunk[j], inc[j], dec[j]);
            bits |= u64::from(is_connected(chunk[j], connected)) << j;
        }
        *w = bits;
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut bits = 0u64;
        let (inc, dec) = (&inc[64 * whole..], &dec[64 * whole..]);
        for (j, p) in tail.iter_mut().enumerate() {
            *p = lane(*p, inc[j], dec[j]);
            bits |= u64::from(is_connected(*p, connected)) << j;
        }
        row[whole] = bits;
    }
}

/// The constants of [`adapt_lanes_avx2`], in every 16-bit lane.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2Consts {
    max: std::arch::x86_64::__m256i,
    not_in_pool: std::arch::x86_64::__m256i,
    trim: std::arch::x86_64::__m256i,
    connected: std::arch::x86_64::__m256i,
}

/// One vector of [`adapt_lanes_avx2`]: updates the 16 lanes at `p` in place and returns the
/// mask of those connected.
///
/// # Safety
/// `p`, `inc` and `dec` must each point at 16 `u16` (`p`'s writable).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn adapt_vector(
    p: *mut u16,
    inc: *const u16,
    dec: *const u16,
    k: Avx2Consts,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let p = p.cast::<__m256i>();
    // SAFETY: the caller's: 32 bytes at each pointer, accessed unaligned.
    unsafe {
        let p0 = _mm256_loadu_si256(p);
        let outside = _mm256_cmpeq_epi16(p0, k.not_in_pool);
        let np = _mm256_adds_epu16(p0, _mm256_loadu_si256(inc.cast()));
        let np = _mm256_min_epu16(np, k.max);
        let np = _mm256_subs_epu16(np, _mm256_loadu_si256(dec.cast()));
        let kept = _mm256_cmpeq_epi16(_mm256_max_epu16(np, k.trim), np);
        // NOT_IN_POOL is all ones: OR-ing its mask back restores those lanes.
        let np = _mm256_or_si256(_mm256_and_si256(np, kept), outside);
        _mm256_storeu_si256(p, np);
        let at_least = _mm256_cmpeq_epi16(_mm256_max_epu16(np, k.connected), np);
        _mm256_andnot_si256(outside, at_least)
    }
}

/// [`adapt_lanes`] in AVX2 by hand: sixteen lanes per vector, with the portable version's
/// steps as unsigned saturating arithmetic. AVX2 compares only signed 16-bit lanes, so
/// `a >= b` is tested as `max(a, b) == a`. The lane bits come out of `movemask` after
/// packing two vectors' masks to bytes (compilers assemble them bit by bit). The lanes must
/// be whole vectors (see [`lane_stride`]); a last row word for fewer than 64 takes 1 to 3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn adapt_lanes_avx2(
    lanes: &mut [u16],
    (inc, dec): (&[u16], &[u16]),
    trim: u16,
    connected: u16,
    row: &mut [u64],
) {
    use std::arch::x86_64::*;
    assert!(lanes.len().is_multiple_of(16) && inc.len() >= lanes.len() && dec.len() >= lanes.len());
    // Bit patterns: `_mm256_set1_epi16` takes an `i16`.
    let k = Avx2Consts {
        max: _mm256_set1_epi16(PERMANENCE_MAX as i16),
        not_in_pool: _mm256_set1_epi16(NOT_IN_POOL as i16),
        trim: _mm256_set1_epi16(trim as i16),
        connected: _mm256_set1_epi16(connected as i16),
    };
    // Signed saturation keeps the masks' 0 / -1 lanes as bytes; the pack interleaves two
    // vectors' 128-bit halves, which the permutation puts back in lane order.
    let bits = |on: [__m256i; 4]| {
        const IN_ORDER: i32 = 0b11_01_10_00;
        let lo = _mm256_permute4x64_epi64::<IN_ORDER>(_mm256_packs_epi16(on[0], on[1]));
        let hi = _mm256_permute4x64_epi64::<IN_ORDER>(_mm256_packs_epi16(on[2], on[3]));
        u64::from(_mm256_movemask_epi8(lo) as u32)
            | (u64::from(_mm256_movemask_epi8(hi) as u32) << 32)
    };
    let mut chunks = lanes.chunks_exact_mut(64);
    let whole = chunks.len();
    for (((w, chunk), inc), dec) in row
        .iter_mut()
        .zip(chunks.by_ref())
        .zip(inc.chunks_exact(64))
        .zip(dec.chunks_exact(64))
    {
        let mut on = [_mm256_setzero_si256(); 4];
        for (v, on) in on.iter_mut().enumerate() {
            // SAFETY: `chunk`, `inc` and `dec` hold 64 `u16`: four vectors.
            *on = unsafe {
                adapt_vector(
                    chunk.as_mut_ptr().add(16 * v),
                    inc.as_ptr().add(16 * v),
                    dec.as_ptr().add(16 * v),
                    k,
                )
            };
        }
        *w = bits(on);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let (inc, dec) = (&inc[64 * whole..], &dec[64 * whole..]);
        // Lanes past the tail count as not connected.
        let mut on = [_mm256_setzero_si256(); 4];
        for (v, on) in on.iter_mut().enumerate().take(tail.len() / 16) {
            // SAFETY: the tail is whole vectors (asserted above), `inc` and `dec` as long.
            *on = unsafe {
                adapt_vector(
                    tail.as_mut_ptr().add(16 * v),
                    inc.as_ptr().add(16 * v),
                    dec.as_ptr().add(16 * v),
                    k,
                )
            };
        }
        row[whole] = bits(on);
    }
}

/// The widest vector instructions the CPU offers for [`adapt_lanes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Vectors {
    #[default]
    Portable,
    Avx2,
}

impl Vectors {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Vectors::Avx2;
            }
        }
        Vectors::Portable
    }
}

/// [`adapt_lanes`] with the widest vectors the CPU has.
#[inline(always)]
fn adapt_lanes_best(
    vectors: Vectors,
    lanes: &mut [u16],
    delta: &Delta,
    trim: u16,
    connected: u16,
    row: &mut [u64],
) {
    let delta = (&delta.inc[..], &delta.dec[..]);
    #[cfg(target_arch = "x86_64")]
    match vectors {
        // SAFETY: `vectors` comes from runtime CPU feature detection.
        Vectors::Avx2 => return unsafe { adapt_lanes_avx2(lanes, delta, trim, connected, row) },
        Vectors::Portable => {}
    }
    let _ = vectors;
    adapt_lanes(lanes, delta, trim, connected, row);
}

/// One learning step on a column's `lanes`: a winner's `delta`, or with `raise` the weak-column
/// raise, then its connected bits into `row`.
fn apply_step(
    vectors: Vectors,
    lanes: &mut [u16],
    delta: &Delta,
    raise: bool,
    k: &Consts,
    row: &mut [u64],
) {
    if raise || k.stimulus_threshold == 0 {
        adapt_lanes_best(vectors, lanes, delta, k.trim, k.connected, row);
    } else {
        adapt_raising(lanes, k, |i| {
            i32::from(delta.inc[i]) - i32::from(delta.dec[i])
        });
        connected_bits(lanes, k.connected, row);
    }
}

/// A winner's change on input `bits`: `+active_inc` on active inputs, `-inactive_dec` on the
/// others.
fn fill_delta(delta: &mut Delta, bits: &[u64], k: &Consts) {
    let lanes = delta
        .inc
        .chunks_exact_mut(64)
        .zip(delta.dec.chunks_exact_mut(64));
    for ((inc, dec), &word) in lanes.zip(bits) {
        for j in 0..64 {
            let on = (word >> j) & 1 == 1;
            inc[j] = if on { k.active_inc } else { 0 };
            dec[j] = if on { 0 } else { k.inactive_dec };
        }
    }
    // The lanes past the last whole 64, from the next word.
    let whole = delta.inc.len() / 64;
    let tail = delta.inc[whole * 64..]
        .iter_mut()
        .zip(&mut delta.dec[whole * 64..]);
    for (j, (inc, dec)) in tail.enumerate() {
        let on = (bits[whole] >> j) & 1 == 1;
        *inc = if on { k.active_inc } else { 0 };
        *dec = if on { 0 } else { k.inactive_dec };
    }
}

/// Replays log `y` of `store` on `lanes` (its column's generated lanes), with `replay` as
/// scratch; `row` ends as the connected bits.
#[allow(clippy::too_many_arguments)]
fn replay_log(
    store: &ColumnStore,
    y: usize,
    lanes: &mut [u16],
    replay: &mut Delta,
    bump: &Delta,
    k: &Consts,
    vectors: Vectors,
    row: &mut [u64],
) {
    for &e in store.steps_of(y) {
        if e == RAISE {
            apply_step(vectors, lanes, bump, true, k, row);
        } else {
            fill_delta(replay, store.input(e), k);
            apply_step(vectors, lanes, replay, false, k, row);
        }
    }
}

/// The fastest overlap kernel the CPU runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum OverlapKernel {
    #[default]
    Portable,
    Popcnt,
    Avx2,
    /// AVX-512 with its vector popcount (`vpopcntq`): eight words counted per instruction
    /// instead of popcount emulated with nibble lookups.
    Avx512,
}

impl OverlapKernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512vpopcntdq") && has!("avx2") && has!("popcnt") {
                return OverlapKernel::Avx512;
            }
            if has!("avx2") && has!("popcnt") {
                return OverlapKernel::Avx2;
            }
            if has!("popcnt") {
                return OverlapKernel::Popcnt;
            }
        }
        OverlapKernel::Portable
    }

    /// [`overlaps_kernel`] with this kernel's instructions.
    fn run(self, connected: &[u64], input: &[u64], nonzero: &[usize], out: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        match self {
            // SAFETY (all three): `self` comes from runtime CPU feature detection.
            OverlapKernel::Avx512 => {
                return unsafe { overlaps_kernel_avx512(connected, input, nonzero, out) }
            }
            OverlapKernel::Avx2 => {
                return unsafe { overlaps_kernel_avx2(connected, input, nonzero, out) }
            }
            OverlapKernel::Popcnt => {
                return unsafe { overlaps_kernel_popcnt(connected, input, nonzero, out) }
            }
            OverlapKernel::Portable => {}
        }
        overlaps_kernel(connected, input, nonzero, out);
    }
}

/// Connected-synapse overlap of every column with the input bitset, from the word-major
/// `connected` planes of `out.len()` columns. `nonzero` lists the input words with an active
/// bit: encoders leave some words empty, and those planes need not be read. Columns go in
/// blocks whose counts stay in registers while every plane is ANDed in.
#[inline(always)]
fn overlaps_kernel(connected: &[u64], input: &[u64], nonzero: &[usize], out: &mut [u32]) {
    const BLOCK: usize = 64;
    let n = out.len();
    let mut base = 0;
    while base < n {
        let len = BLOCK.min(n - base);
        let mut acc = [0u32; BLOCK];
        if len == BLOCK {
            // A whole block as fixed-size arrays: the loop unrolls, and where the vectors
            // have room (AVX-512: 64 counts in eight registers) the counts stay in registers
            // across planes instead of going through memory. The AVX2 kernel's nibble-lookup
            // popcount needs too many registers for that and still spills them.
            for &w in nonzero {
                let bits = input[w];
                let start = w * n + base;
                let plane: &[u64; BLOCK] = connected[start..start + BLOCK]
                    .try_into()
                    .expect("a whole block");
                for (a, &c) in acc.iter_mut().zip(plane) {
                    *a += (c & bits).count_ones();
                }
            }
            out[base..base + BLOCK].copy_from_slice(&acc);
            base += BLOCK;
            continue;
        }
        for &w in nonzero {
            let bits = input[w];
            let plane = &connected[w * n + base..w * n + base + len];
            for (a, &c) in acc.iter_mut().zip(plane) {
                *a += (c & bits).count_ones();
            }
        }
        out[base..base + len].copy_from_slice(&acc[..len]);
        base += len;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn overlaps_kernel_popcnt(connected: &[u64], input: &[u64], nonzero: &[usize], out: &mut [u32]) {
    overlaps_kernel(connected, input, nonzero, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn overlaps_kernel_avx2(connected: &[u64], input: &[u64], nonzero: &[usize], out: &mut [u32]) {
    overlaps_kernel(connected, input, nonzero, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq,avx2,popcnt")]
fn overlaps_kernel_avx512(connected: &[u64], input: &[u64], nonzero: &[usize], out: &mut [u32]) {
    overlaps_kernel(connected, input, nonzero, out);
}

/// Copies column `col`'s row out of the word-major planes of `n` columns.
fn gather_row(connected: &[u64], n: usize, col: usize, row: &mut [u64]) {
    for (w, r) in row.iter_mut().enumerate() {
        *r = connected[w * n + col];
    }
}

/// Writes column `col`'s row into the word-major planes of `n` columns.
fn scatter_row(connected: &mut [u64], n: usize, col: usize, row: &[u64]) {
    for (w, &r) in row.iter().enumerate() {
        connected[w * n + col] = r;
    }
}

impl SpatialPooler {
    /// Builds a pooler: potential pools and initial permanences as NuPIC's constructor, each
    /// column from its own random stream derived from `seed`.
    pub fn new(params: SpatialPoolerParams) -> Result<Self, ParamError> {
        params.validate()?;
        let n_in = params.input_size;
        let n_col = params.column_count as usize;
        let potential_radius = params.potential_radius.unwrap_or(n_in).min(n_in);
        for col in 0..params.column_count {
            let candidates = neighborhood_len(
                map_column(&params, col),
                potential_radius,
                n_in,
                params.wrap_around,
            );
            let n_potential = pool_size(candidates, params.potential_pct);
            if n_potential < params.stimulus_threshold as usize {
                return Err(ParamError::new(
                    "stimulus_threshold",
                    format!(
                        "{} exceeds the {n_potential} inputs in column {col}'s potential pool",
                        params.stimulus_threshold
                    ),
                ));
            }
        }
        let stride = lane_stride(n_in as usize);
        let mut sp = SpatialPooler {
            columns: ColumnStore::new(n_col, stride),
            potential_radius,
            inhibition_radius: 0,
            iteration: 0,
            overlap_duty_cycles: vec![0.0; n_col],
            active_duty_cycles: vec![0.0; n_col],
            min_overlap_duty_cycles: vec![0.0; if params.global_inhibition { 1 } else { n_col }],
            boost_factors: if params.boost_strength == 0.0 {
                Vec::new()
            } else {
                vec![1.0; n_col]
            },
            cache: Cache::default(),
            params,
        };
        sp.rebuild_after_restore();
        sp.update_inhibition_radius();
        Ok(sp)
    }

    /// Rebuilds the derived connected-synapse bitset (from the stored columns, regenerating
    /// the lazy ones) and the scratch buffers. Call after deserialising; idempotent
    /// ([`SpatialPooler::compute`] also calls it if it was forgotten).
    ///
    /// # Panics
    /// If the stored columns do not fit the parameters (a checkpoint of another layout).
    pub fn rebuild_after_restore(&mut self) {
        let n_col = self.num_columns();
        let words = self.input_size().div_ceil(64);
        let stride = lane_stride(self.input_size());
        // A checkpoint holds whole words of lanes per column.
        if self.columns.stride as usize == words * 64 {
            self.columns.set_stride(stride);
        }
        let p = &self.params;
        assert!(
            self.columns.stride as usize == stride
                && self.columns.num_columns as usize == n_col
                && self.overlap_duty_cycles.len() == n_col
                && self.active_duty_cycles.len() == n_col
                && self.min_overlap_duty_cycles.len()
                    == if p.global_inhibition { 1 } else { n_col }
                && self.boost_factors.len() == if p.boost_strength == 0.0 { 0 } else { n_col },
            "spatial pooler state does not match its parameters"
        );
        let consts = Consts::new(&self.params);
        let layout = initial_layout(&self.params, self.potential_radius, &consts, words);
        // Stored lanes have learnt since they were generated: their connected rows are derived
        // here (the logs' are state).
        let mut row = vec![0u64; words];
        for slot in 0..self.columns.columns.len() {
            let r = self.columns.repr[slot];
            if r & YOUNG == 0 {
                connected_bits(self.columns.lanes(r as usize), consts.connected, &mut row);
                self.columns.set_row(slot, &row);
            }
        }
        self.cache = Cache {
            words,
            overlaps: vec![0; n_col],
            layout,
            vectors: Vectors::detect(),
            overlap_kernel: OverlapKernel::detect(),
            consts,
            ..Cache::default()
        };
    }

    /// Number of columns.
    pub fn num_columns(&self) -> usize {
        self.params.column_count as usize
    }

    /// Number of input bits.
    pub fn input_size(&self) -> usize {
        self.params.input_size as usize
    }

    /// The parameters the pooler was built with.
    pub fn params(&self) -> &SpatialPoolerParams {
        &self.params
    }

    /// Current inhibition radius (in columns).
    pub fn inhibition_radius(&self) -> u32 {
        self.inhibition_radius
    }

    /// Learning iterations performed so far.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// Raw (unboosted) overlaps of the last [`SpatialPooler::compute`].
    pub fn overlaps(&self) -> &[u32] {
        &self.cache.overlaps
    }

    /// Per-column boost factors (all 1 without boosting).
    pub fn boost_factors(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.boost_factors.is_empty() {
            std::borrow::Cow::Owned(vec![1.0; self.num_columns()])
        } else {
            std::borrow::Cow::Borrowed(&self.boost_factors)
        }
    }

    /// Per-column active duty cycles.
    pub fn active_duty_cycles(&self) -> &[f32] {
        &self.active_duty_cycles
    }

    /// Per-column overlap duty cycles.
    pub fn overlap_duty_cycles(&self) -> &[f32] {
        &self.overlap_duty_cycles
    }

    /// Number of connected synapses of `column`.
    pub fn connected_count(&self, column: u32) -> u32 {
        let mut row = vec![0u64; self.cache.words];
        self.connected_row(column, &mut row);
        row.iter().map(|w| w.count_ones()).sum()
    }

    /// `column`'s connected bits: stored, or the shared initial ones of a lazy column.
    fn connected_row(&self, column: u32, row: &mut [u64]) {
        match self.columns.repr(column) {
            Repr::Lazy => gather_row(
                &self.cache.layout.connected,
                self.num_columns(),
                column as usize,
                row,
            ),
            Repr::Young { slot, .. } | Repr::Dense { slot, .. } => self.columns.row(slot, row),
        }
    }

    /// Number of stored columns kept as logs of their learning steps.
    pub fn num_logged(&self) -> usize {
        self.columns.young.len()
    }

    /// Whether learning has modified `column` (its permanences are stored, or kept as a log
    /// of its steps).
    pub fn is_materialised(&self, column: u32) -> bool {
        self.columns.repr(column) != Repr::Lazy
    }

    /// Number of columns modified by learning (stored or logged).
    pub fn num_materialised(&self) -> usize {
        self.columns.columns.len()
    }

    /// `column`'s lanes: stored, or regenerated (and its logged steps replayed).
    fn column_lanes(&self, column: u32) -> std::borrow::Cow<'_, [u16]> {
        let y = match self.columns.repr(column) {
            Repr::Dense { d, .. } => return std::borrow::Cow::Borrowed(self.columns.lanes(d)),
            Repr::Young { y, .. } => Some(y),
            Repr::Lazy => None,
        };
        let mut lanes = vec![NOT_IN_POOL; self.columns.stride as usize];
        let k = Consts::new(&self.params);
        let mut rng = match self.cache.layout.streams.get(column as usize) {
            Some(stream) => stream.clone(),
            None => {
                // Not rebuilt yet (just deserialised): replay the earlier columns.
                let mut rng = Random::new(self.params.seed);
                for col in 0..column {
                    generate_column(
                        &self.params,
                        self.potential_radius,
                        &k,
                        col,
                        &mut rng,
                        &mut lanes,
                        &mut Vec::new(),
                    );
                }
                rng
            }
        };
        generate_column(
            &self.params,
            self.potential_radius,
            &k,
            column,
            &mut rng,
            &mut lanes,
            &mut Vec::new(),
        );
        if let Some(y) = y {
            let stride = lanes.len();
            replay_log(
                &self.columns,
                y,
                &mut lanes,
                &mut Delta::new(stride, 0, 0),
                &Delta::new(stride, k.below_stimulus_inc, 0),
                &k,
                Vectors::detect(),
                &mut vec![0; stride.div_ceil(64)],
            );
        }
        std::borrow::Cow::Owned(lanes)
    }

    /// The potential pool of `column`: input indices, ascending.
    pub fn potential_pool(&self, column: u32) -> Vec<u32> {
        let lanes = self.column_lanes(column);
        (0..self.params.input_size)
            .filter(|&i| lanes[i as usize] != NOT_IN_POOL)
            .collect()
    }

    /// Permanences of `column`'s synapses, in [`SpatialPooler::potential_pool`] order: whole
    /// multiples of `1 / PERMANENCE_SCALE`, each the nearest `f32`.
    pub fn permanences(&self, column: u32) -> Vec<f32> {
        let lanes = self.column_lanes(column);
        lanes[..self.input_size()]
            .iter()
            .filter(|&&p| p != NOT_IN_POOL)
            .map(|&p| to_fraction(p))
            .collect()
    }

    /// Heap bytes held (capacity-based), including the derived caches.
    pub fn heap_bytes(&self) -> usize {
        self.heap_breakdown().iter().map(|&(_, b)| b).sum()
    }

    /// [`SpatialPooler::heap_bytes`] part by part, for memory reporting.
    pub fn heap_breakdown(&self) -> Vec<(&'static str, usize)> {
        use std::mem::size_of;
        let c = &self.cache;
        let f32s = |v: &Vec<f32>| 4 * v.capacity();
        vec![
            ("stored_perms", 2 * self.columns.perms.capacity()),
            (
                "logged_steps",
                4 * (self.columns.log.capacity()
                    + self.columns.input_refs.capacity()
                    + self.columns.free_inputs.capacity())
                    + size_of::<u64>() * self.columns.inputs.capacity()
                    + size_of::<Young>() * self.columns.young.capacity(),
            ),
            (
                "store_index",
                4 * (self.columns.columns.capacity()
                    + self.columns.slot_of.capacity()
                    + self.columns.repr.capacity()),
            ),
            (
                "duty_boost",
                f32s(&self.overlap_duty_cycles)
                    + f32s(&self.active_duty_cycles)
                    + f32s(&self.min_overlap_duty_cycles)
                    + f32s(&self.boost_factors),
            ),
            ("connected", size_of::<u64>() * self.columns.rows.capacity()),
            (
                "scratch",
                4 * (c.overlaps.capacity() + c.winners.capacity()),
            ),
            // Buffers lent for a call, if any.
            ("lent", c.scratch.heap_bytes()),
            // The shared `layout` belongs to no single pooler.
        ]
    }

    /// NuPIC's inhibition density: `local_area_density`, or the configured number of winners
    /// per inhibition area.
    fn density(&self) -> f64 {
        if self.params.local_area_density > 0.0 {
            return self.params.local_area_density;
        }
        let area = (2 * u64::from(self.inhibition_radius) + 1).min(self.num_columns() as u64);
        (f64::from(self.params.num_active_columns_per_inh_area) / area as f64).min(0.5)
    }
    /// Runs one input through the pooler, writing the active columns (sorted) to `active`.
    ///
    /// With `learn`, permanences, duty cycles, boost factors and the inhibition radius are
    /// updated as NuPIC does. Without it nothing in the pooler changes (unlike NuPIC, whose
    /// iteration counter also counts inference steps; here only learning steps count, so
    /// that inference is side-effect free).
    ///
    /// # Panics
    /// If `input.size()` differs from the configured `input_size`.
    pub fn compute(&mut self, input: &Sdr, learn: bool, active: &mut Sdr) {
        assert_eq!(
            input.size(),
            self.input_size(),
            "spatial pooler input size mismatch"
        );
        if self.cache.words == 0 {
            self.rebuild_after_restore();
        }
        self.cache.scratch = crate::scratch::take(&SCRATCH);
        self.size_scratch();
        self.compute_step(input, learn, active);
        crate::scratch::give_back(&SCRATCH, std::mem::take(&mut self.cache.scratch));
    }

    /// Bytes of the initial layouts shared by every pooler of the same parameters (streams and
    /// connected bits of the columns learning has not modified), per process and so not in any
    /// pooler's [`Self::heap_bytes`].
    pub fn shared_layout_bytes() -> usize {
        let list = LAYOUTS.lock().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .map(|(key, layout)| key.capacity() + layout.heap_bytes())
            .sum()
    }

    /// Bytes of this thread's pooler scratch buffers ([`SCRATCH`]), shared by every pooler
    /// computing on it and so not in any pooler's [`Self::heap_bytes`].
    pub fn thread_scratch_bytes() -> usize {
        crate::scratch::thread_bytes(&SCRATCH, Scratch::heap_bytes)
    }

    /// Sizes the lent buffers for this pooler (they may come from another).
    fn size_scratch(&mut self) {
        let (words, stride) = (self.cache.words, self.columns.stride as usize);
        let raise = self.cache.consts.below_stimulus_inc;
        let c = &mut self.cache;
        c.scratch.row.resize(words, 0);
        c.scratch.input_bits.resize(words, 0);
        c.scratch.lanes.resize(stride, NOT_IN_POOL);
        c.scratch.delta.resize(stride);
        c.scratch.replay.resize(stride);
        c.scratch.bump.inc.clear();
        c.scratch.bump.inc.resize(stride, raise);
        c.scratch.bump.dec.clear();
        c.scratch.bump.dec.resize(stride, 0);
        c.scratch
            .histogram
            .resize(4 * (self.params.input_size as usize + 1), 0);
    }

    fn compute_step(&mut self, input: &Sdr, learn: bool, active: &mut Sdr) {
        if learn {
            self.iteration += 1;
        }
        self.calculate_overlaps(input);
        let boosted = learn && self.params.boost_strength != 0.0;
        if boosted {
            let c = &mut self.cache;
            c.scratch.boosted.resize(c.overlaps.len(), 0.0);
            for ((b, &o), &f) in c
                .scratch
                .boosted
                .iter_mut()
                .zip(&c.overlaps)
                .zip(&self.boost_factors)
            {
                *b = f * o as f32;
            }
        }
        self.inhibit_columns(boosted);
        if learn {
            self.adapt_synapses();
            self.update_duty_cycles();
            self.bump_up_weak_columns();
            self.update_boost_factors();
            if self.iteration.is_multiple_of(UPDATE_PERIOD) {
                self.update_inhibition_radius();
                self.update_min_duty_cycles();
            }
        }
        if active.size() != self.num_columns() {
            *active = Sdr::new(self.num_columns());
        }
        active.set_sorted(&self.cache.winners);
    }

    fn calculate_overlaps(&mut self, input: &Sdr) {
        let c = &mut self.cache;
        c.scratch.input_bits.fill(0);
        c.scratch.nonzero_words.clear();
        for &i in input.sparse() {
            let w = (i >> 6) as usize;
            if c.scratch.nonzero_words.last() != Some(&w) {
                c.scratch.nonzero_words.push(w); // sparse bits are sorted: words come in order
            }
            c.scratch.input_bits[w] |= 1 << (i & 63);
        }
        let (bits, nz) = (&c.scratch.input_bits, &c.scratch.nonzero_words);
        // Every column as generated, then the stored ones as they are now. The planes of the
        // lazy columns are shared by every pooler with these parameters.
        c.overlap_kernel
            .run(&c.layout.connected, bits, nz, &mut c.overlaps);
        let store = &self.columns;
        if !store.columns.is_empty() {
            c.scratch.slot_overlaps.resize(store.row_cap, 0);
            c.overlap_kernel
                .run(&store.rows, bits, nz, &mut c.scratch.slot_overlaps);
            for (&col, &o) in store.columns.iter().zip(&c.scratch.slot_overlaps) {
                c.overlaps[col as usize] = o;
            }
        }
    }

    /// Fills `cache.winners` (sorted) from the raw or boosted overlaps.
    fn inhibit_columns(&mut self, boosted: bool) {
        let density = self.density();
        if self.params.global_inhibition || self.inhibition_radius > self.params.column_count {
            let k = (density * self.num_columns() as f64) as usize;
            if boosted {
                self.inhibit_global_boosted(k);
            } else {
                self.inhibit_global_counting(k);
            }
        } else {
            if !boosted {
                let c = &mut self.cache;
                c.scratch.boosted.resize(c.overlaps.len(), 0.0);
                for (b, &o) in c.scratch.boosted.iter_mut().zip(&c.overlaps) {
                    *b = o as f32;
                }
            }
            self.inhibit_local(density);
        }
    }

    /// Global top-`k` of integer overlaps by counting: NuPIC's stable ascending argsort,
    /// last `k` taken, means that among equal overlaps the higher column index wins.
    fn inhibit_global_counting(&mut self, k: usize) {
        let c = &mut self.cache;
        c.winners.clear();
        if k == 0 {
            return;
        }
        // Four interleaved histograms: overlaps cluster on few values, and a single one
        // would chain every increment of a popular bin through store-to-load forwarding.
        let bins = c.scratch.histogram.len() / 4;
        c.scratch.histogram.fill(0);
        let (h0, rest) = c.scratch.histogram.split_at_mut(bins);
        let (h1, rest) = rest.split_at_mut(bins);
        let (h2, h3) = rest.split_at_mut(bins);
        let mut chunks = c.overlaps.chunks_exact(4);
        for q in &mut chunks {
            h0[q[0] as usize] += 1;
            h1[q[1] as usize] += 1;
            h2[q[2] as usize] += 1;
            h3[q[3] as usize] += 1;
        }
        for &o in chunks.remainder() {
            h0[o as usize] += 1;
        }
        // Smallest overlap `t` such that at least k columns have overlap >= t.
        let mut above = 0usize;
        let mut t = bins - 1;
        let mut at_t;
        loop {
            at_t = (h0[t] + h1[t] + h2[t] + h3[t]) as usize;
            if above + at_t >= k || t == 0 {
                break;
            }
            above += at_t;
            t -= 1;
        }
        let t = t as u32;
        // Ties at `t` beyond the k: the lowest indices lose (the highest win).
        let mut drop_at_t = at_t.saturating_sub(k - above);
        for (col, &o) in c.overlaps.iter().enumerate() {
            if o >= t {
                c.winners.push(col as u32);
            }
        }
        let stimulus = self.params.stimulus_threshold;
        let overlaps = &c.overlaps;
        c.winners.retain(|&col| {
            let o = overlaps[col as usize];
            if o == t && drop_at_t > 0 {
                drop_at_t -= 1;
                return false;
            }
            o >= stimulus
        });
    }

    /// Global top-`k` of boosted overlaps, same tie-break as the counting version.
    fn inhibit_global_boosted(&mut self, k: usize) {
        let c = &mut self.cache;
        c.winners.clear();
        if k == 0 {
            return;
        }
        c.scratch.keys.clear();
        // Non-negative floats order like their bit patterns; the index breaks ties upward.
        c.scratch.keys.extend(
            c.scratch
                .boosted
                .iter()
                .enumerate()
                .map(|(i, b)| (u64::from(b.to_bits()) << 32) | i as u64),
        );
        if k < c.scratch.keys.len() {
            c.scratch
                .keys
                .select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        }
        let threshold = self.params.stimulus_threshold as f32;
        for &key in &c.scratch.keys[..k.min(c.scratch.keys.len())] {
            let col = key as u32;
            if c.scratch.boosted[col as usize] >= threshold {
                c.winners.push(col);
            }
        }
        c.winners.sort_unstable();
    }

    /// NuPIC `_inhibitColumnsLocal` over `cache.scratch.boosted`: a column wins when fewer than the
    /// neighbourhood's quota beat it, ties lost to neighbours already chosen.
    fn inhibit_local(&mut self, density: f64) {
        let n_col = self.params.column_count;
        let (radius, wrap) = (self.inhibition_radius, self.params.wrap_around);
        let threshold = self.params.stimulus_threshold as f32;
        let c = &mut self.cache;
        c.scratch.active_flags.clear();
        c.scratch.active_flags.resize(n_col as usize, false);
        c.winners.clear();
        for col in 0..n_col {
            let overlap = c.scratch.boosted[col as usize];
            if overlap < threshold {
                continue;
            }
            let len = neighborhood_len(col, radius, n_col, wrap);
            let num_active = (0.5 + density * len as f64) as usize;
            let mut beaten = 0usize;
            for n in neighborhood(col, radius, n_col, wrap) {
                let o = c.scratch.boosted[n as usize];
                beaten += usize::from(
                    o > overlap || (o == overlap && c.scratch.active_flags[n as usize]),
                );
            }
            if beaten < num_active {
                c.scratch.active_flags[col as usize] = true;
                c.winners.push(col);
            }
        }
    }

    /// NuPIC `_adaptSynapses`: winners' synapses on active inputs +inc, others -dec.
    fn adapt_synapses(&mut self) {
        let c = &mut self.cache;
        fill_delta(&mut c.scratch.delta, &c.scratch.input_bits, &c.consts);
        self.columns.begin_step();
        let winners = std::mem::take(&mut c.winners);
        for &col in &winners {
            self.learn_column(col, false);
        }
        self.cache.winners = winners;
    }

    /// One learning step of `column`: the current input's, or with `raise` a weak-column
    /// raise. A lazy column starts a log of its steps; a logged one is regenerated, replayed
    /// and logs the step too, or has its lanes stored once its log is full.
    fn learn_column(&mut self, column: u32, raise: bool) {
        let c = &mut self.cache;
        let k = &c.consts;
        let delta = if raise {
            &c.scratch.bump
        } else {
            &c.scratch.delta
        };
        let y = match self.columns.repr(column) {
            Repr::Dense { slot, d } => {
                let lanes = self.columns.lanes_mut(d);
                apply_step(c.vectors, lanes, delta, raise, k, &mut c.scratch.row);
                self.columns.set_row(slot, &c.scratch.row);
                return;
            }
            Repr::Young { y, .. } => Some(y),
            Repr::Lazy => None,
        };
        let mut stream = c.layout.streams[column as usize].clone();
        let (params, radius) = (&self.params, self.potential_radius);
        let (lanes, pool) = (&mut c.scratch.lanes, &mut c.scratch.pool);
        generate_column(params, radius, k, column, &mut stream, lanes, pool);
        if let Some(y) = y {
            let (lanes, replay, row) = (
                &mut c.scratch.lanes,
                &mut c.scratch.replay,
                &mut c.scratch.row,
            );
            replay_log(
                &self.columns,
                y,
                lanes,
                replay,
                &c.scratch.bump,
                k,
                c.vectors,
                row,
            );
        }
        apply_step(
            c.vectors,
            &mut c.scratch.lanes,
            delta,
            raise,
            k,
            &mut c.scratch.row,
        );
        match y {
            Some(y) if usize::from(self.columns.young[y].len) == YOUNG_STEPS => {
                self.columns.promote(y, &c.scratch.lanes)
            }
            _ => self
                .columns
                .log_step(column, y, (!raise).then_some(&c.scratch.input_bits[..])),
        }
        let slot = self.columns.slot_of[column as usize] as usize;
        self.columns.set_row(slot, &c.scratch.row);
    }

    fn update_duty_cycles(&mut self) {
        let period = u64::from(self.params.duty_cycle_period).min(self.iteration) as f32;
        let keep = period - 1.0;
        let c = &mut self.cache;
        for (d, &o) in self.overlap_duty_cycles.iter_mut().zip(&c.overlaps) {
            *d = (*d * keep + f32::from(u8::from(o > 0))) / period;
        }
        // Every column as inactive (vector code), the winners' values computed first from
        // their old ones and put back after: no per-column flags to keep.
        let duty = &mut self.active_duty_cycles;
        c.scratch.winner_duty.clear();
        c.scratch.winner_duty.extend(
            c.winners
                .iter()
                .map(|&w| (duty[w as usize] * keep + 1.0) / period),
        );
        for d in duty.iter_mut() {
            *d = (*d * keep + 0.0) / period;
        }
        for (&w, &d) in c.winners.iter().zip(&c.scratch.winner_duty) {
            duty[w as usize] = d;
        }
    }

    /// NuPIC `_bumpUpWeakColumns`: columns whose overlap duty cycle fell below the minimum
    /// get every potential synapse raised by `syn_perm_connected / 10` (a logged step, or a
    /// stored change past the log's length).
    fn bump_up_weak_columns(&mut self) {
        let n = self.params.column_count as usize;
        // Weak columns are rare: test blocks of columns branch-free (vector code) and look
        // closer only at blocks holding one.
        const BLOCK: usize = 32;
        let mins = &self.min_overlap_duty_cycles;
        let min_at = |i: usize| if mins.len() == 1 { mins[0] } else { mins[i] };
        let mut weak = Vec::new();
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            let odc = &self.overlap_duty_cycles[start..end];
            let any_weak = odc
                .iter()
                .enumerate()
                .fold(false, |w, (j, &d)| w | (d < min_at(start + j)));
            if any_weak {
                weak.extend(
                    (start..end)
                        .filter(|&i| self.overlap_duty_cycles[i] < min_at(i))
                        .map(|i| i as u32),
                );
            }
        }
        for col in weak {
            self.learn_column(col, true);
        }
    }

    fn update_boost_factors(&mut self) {
        if self.params.boost_strength == 0.0 {
            // exp(0) == 1 exactly: the factors never move from their initial 1.0.
            return;
        }
        let strength = self.params.boost_strength as f32;
        if self.params.global_inhibition {
            let target = self.density() as f32;
            for (b, &d) in self.boost_factors.iter_mut().zip(&self.active_duty_cycles) {
                *b = ((target - d) * strength).exp();
            }
        } else {
            let n_col = self.params.column_count;
            let (radius, wrap) = (self.inhibition_radius, self.params.wrap_around);
            for col in 0..n_col {
                let mut sum = 0.0f64;
                let mut n = 0usize;
                for nb in neighborhood(col, radius, n_col, wrap) {
                    sum += f64::from(self.active_duty_cycles[nb as usize]);
                    n += 1;
                }
                let target = (sum / n as f64) as f32;
                let d = self.active_duty_cycles[col as usize];
                self.boost_factors[col as usize] = ((target - d) * strength).exp();
            }
        }
    }

    /// NuPIC `_updateInhibitionRadius` (1-D).
    fn update_inhibition_radius(&mut self) {
        if self.params.global_inhibition {
            self.inhibition_radius = self.params.column_count;
            return;
        }
        let n = self.num_columns();
        let mut span_sum = 0u64;
        // Also called outside a compute, without the lent buffers.
        let mut row = std::mem::take(&mut self.cache.scratch.row);
        row.resize(self.cache.words, 0);
        for col in 0..n {
            self.connected_row(col as u32, &mut row);
            let first = row.iter().position(|&w| w != 0);
            let last = row.iter().rposition(|&w| w != 0);
            if let (Some(f), Some(l)) = (first, last) {
                let lo = f * 64 + row[f].trailing_zeros() as usize;
                let hi = l * 64 + 63 - row[l].leading_zeros() as usize;
                span_sum += (hi - lo + 1) as u64;
            }
        }
        self.cache.scratch.row = row;
        let avg_span = span_sum as f64 / self.num_columns() as f64;
        let columns_per_input =
            f64::from(self.params.column_count) / f64::from(self.params.input_size);
        let diameter = avg_span * columns_per_input;
        let radius = ((diameter - 1.0) / 2.0).max(1.0);
        self.inhibition_radius = (radius + 0.5) as u32;
    }

    /// NuPIC `_updateMinDutyCycles`: a fraction of the global or neighbourhood maximum
    /// overlap duty cycle.
    fn update_min_duty_cycles(&mut self) {
        let pct = self.params.min_pct_overlap_duty_cycle;
        if self.params.global_inhibition || self.inhibition_radius > self.params.input_size {
            let max = self
                .overlap_duty_cycles
                .iter()
                .copied()
                .fold(0.0f32, f32::max);
            self.min_overlap_duty_cycles
                .fill((f64::from(max) * pct) as f32);
        } else {
            let n_col = self.params.column_count;
            let (radius, wrap) = (self.inhibition_radius, self.params.wrap_around);
            for col in 0..n_col {
                let max = neighborhood(col, radius, n_col, wrap)
                    .map(|n| self.overlap_duty_cycles[n as usize])
                    .fold(0.0f32, f32::max);
                self.min_overlap_duty_cycles[col as usize] = (f64::from(max) * pct) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(input_size: u32, column_count: u32, active: u32) -> SpatialPoolerParams {
        SpatialPoolerParams {
            input_size,
            column_count,
            num_active_columns_per_inh_area: active,
            ..SpatialPoolerParams::default()
        }
    }

    /// A contiguous run of `w` bits starting at `start` (like a scalar encoder's output).
    fn block(size: usize, start: u32, w: u32) -> Sdr {
        Sdr::from_sparse(size, (start..start + w).collect())
    }

    fn random_sdr(rng: &mut Random, size: usize, n: usize) -> Sdr {
        let all: Vec<u32> = (0..size as u32).collect();
        Sdr::from_sparse(size, rng.sample(&all, n))
    }

    fn run(sp: &mut SpatialPooler, input: &Sdr, learn: bool) -> Sdr {
        let mut out = Sdr::new(sp.num_columns());
        sp.compute(input, learn, &mut out);
        out
    }

    /// `column`'s permanences in units, in potential-pool order.
    fn units(sp: &SpatialPooler, column: u32) -> Vec<u16> {
        let lanes = sp.column_lanes(column);
        let units: Vec<u16> = lanes
            .iter()
            .copied()
            .filter(|&p| p != NOT_IN_POOL)
            .collect();
        // The public fractions are the same values.
        let fractions: Vec<f32> = units.iter().map(|&p| f32::from(p) / 50_000.0).collect();
        assert_eq!(sp.permanences(column), fractions);
        units
    }

    #[test]
    fn nupic_parameters_are_whole_permanence_units() {
        let k = Consts::new(&params(10, 10, 2));
        assert_eq!(
            (
                k.active_inc,
                k.inactive_dec,
                k.connected,
                k.trim,
                k.below_stimulus_inc
            ),
            (150, 25, 10_000, 75, 1_000)
        );
        // Exact units read back as the nearest f32 of the fraction.
        assert_eq!(to_fraction(k.connected), 0.2f32);
        assert_eq!(to_fraction(PERMANENCE_MAX), 1.0);
        assert_eq!(to_fraction(0), 0.0);
    }

    #[test]
    fn the_shared_initial_layout_is_counted_outside_the_pooler() {
        // Other tests build layouts concurrently, so only a lower bound holds here.
        let _sp = SpatialPooler::new(params(200, 96, 8)).unwrap();
        // 96 streams and 96 columns × 4 words of connected bits.
        let least = 96 * (std::mem::size_of::<Random>() + 4 * 8);
        let shared = SpatialPooler::shared_layout_bytes();
        assert!(shared >= least, "{shared} < {least}");
    }

    #[test]
    fn initial_pools_and_permanences_follow_nupic() {
        let sp = SpatialPooler::new(params(200, 64, 8)).unwrap();
        let (mut connected, mut total) = (0usize, 0usize);
        for col in 0..64 {
            let pool = sp.potential_pool(col);
            let perms = units(&sp, col);
            // Whole input in range: round(200 * 0.8) potential inputs, each input once.
            assert_eq!((pool.len(), perms.len()), (160, 160));
            assert!(pool.windows(2).all(|w| w[0] < w[1]) && pool[159] < 200);
            for &p in &perms {
                assert!(p == 0 || (75..=50_000).contains(&p), "permanence {p}");
                connected += usize::from(p >= 10_000);
                total += 1;
            }
            assert_eq!(
                sp.connected_count(col),
                perms.iter().filter(|&&p| p >= 10_000).count() as u32
            );
            // Through the public fractions too.
            assert_eq!(
                sp.connected_count(col),
                sp.permanences(col).iter().filter(|&&p| p >= 0.2).count() as u32
            );
        }
        let frac = connected as f64 / total as f64;
        assert!((0.45..0.55).contains(&frac), "connected fraction {frac}");
    }

    #[test]
    fn potential_radius_limits_pools_to_a_window_around_the_column_centre() {
        let p = SpatialPoolerParams {
            potential_radius: Some(5),
            potential_pct: 1.0,
            wrap_around: false,
            ..params(100, 50, 5)
        };
        let sp = SpatialPooler::new(p).unwrap();
        for col in 0..50u32 {
            // 100 inputs over 50 columns: centres near 2 * col + 1 (NuPIC's float mapping
            // truncates, so some land one lower).
            let centre = map_column(sp.params(), col);
            assert!(centre == 2 * col + 1 || centre == 2 * col, "column {col}");
            let presyn = sp.potential_pool(col);
            let lo = centre.saturating_sub(5);
            let hi = (centre + 5).min(99);
            assert_eq!(presyn, (lo..=hi).collect::<Vec<_>>(), "column {col}");
        }
    }

    #[test]
    fn global_inhibition_activates_exactly_the_configured_number() {
        let mut sp = SpatialPooler::new(params(454, 2048, 40)).unwrap();
        let mut rng = Random::new(3);
        for step in 0..120 {
            let input = random_sdr(&mut rng, 454, 5 + (step % 60));
            let out = run(&mut sp, &input, step % 3 != 0);
            assert_eq!(out.len(), 40, "step {step}");
            assert_eq!(out.size(), 2048);
        }
    }

    #[test]
    fn ties_go_to_the_highest_column_indices() {
        // An empty input gives every column overlap 0: NuPIC's stable argsort then keeps
        // the last k columns.
        let mut sp = SpatialPooler::new(params(100, 300, 10)).unwrap();
        let out = run(&mut sp, &Sdr::new(100), true);
        assert_eq!(out.sparse(), (290..300).collect::<Vec<u32>>().as_slice());
        // With a stimulus threshold, zero overlaps cannot win at all.
        let mut p = params(100, 300, 10);
        p.stimulus_threshold = 1;
        let mut sp = SpatialPooler::new(p).unwrap();
        assert!(run(&mut sp, &Sdr::new(100), true).is_empty());
        assert_eq!(run(&mut sp, &block(100, 10, 20), false).len(), 10);
    }

    #[test]
    fn overlaps_equal_a_direct_count_of_connected_synapses() {
        let mut sp = SpatialPooler::new(params(454, 300, 10)).unwrap();
        let mut rng = Random::new(17);
        let inputs = [
            Sdr::new(454),                    // no active word
            block(454, 3, 20),                // one word
            block(454, 50, 40),               // two words
            block(454, 100, 200),             // several words
            random_sdr(&mut rng, 454, 60),    // scattered
            Sdr::from_sparse(454, vec![453]), // last, partial word
        ];
        for (i, x) in inputs.iter().enumerate() {
            for _ in 0..3 {
                // Learning first, so the check also covers the bitset's upkeep.
                run(&mut sp, x, true);
                run(&mut sp, x, false);
                // The portable kernel agrees with the one the CPU selected.
                let c = &sp.cache;
                let mut portable = vec![0; 300];
                let mut bits = vec![0u64; c.words];
                for &i in x.sparse() {
                    bits[i as usize / 64] |= 1 << (i % 64);
                }
                let nz: Vec<usize> = (0..c.words).filter(|&w| bits[w] != 0).collect();
                let (bits, nz) = (&bits, &nz);
                overlaps_kernel(&c.layout.connected, bits, nz, &mut portable);
                let mut slots = vec![0; sp.columns.row_cap];
                overlaps_kernel(&sp.columns.rows, bits, nz, &mut slots);
                for (&col, &o) in sp.columns.columns.iter().zip(&slots) {
                    portable[col as usize] = o;
                }
                assert_eq!(portable, c.overlaps, "input {i}");
                let thr = to_fraction(sp.cache.consts.connected);
                for col in 0..300u32 {
                    let direct = sp
                        .potential_pool(col)
                        .into_iter()
                        .zip(sp.permanences(col))
                        .filter(|&(i, p)| p >= thr && x.contains(i))
                        .count() as u32;
                    assert_eq!(
                        sp.overlaps()[col as usize],
                        direct,
                        "input {i} column {col}"
                    );
                }
            }
        }
    }

    #[test]
    fn winners_are_the_columns_with_the_largest_overlaps() {
        let mut sp = SpatialPooler::new(params(300, 500, 20)).unwrap();
        let mut rng = Random::new(9);
        for _ in 0..20 {
            let input = random_sdr(&mut rng, 300, 30);
            let out = run(&mut sp, &input, false);
            let ov = sp.overlaps().to_vec();
            let min_win = out.sparse().iter().map(|&c| ov[c as usize]).min().unwrap();
            let max_lose = (0..500u32)
                .filter(|c| !out.contains(*c))
                .map(|c| ov[c as usize])
                .max()
                .unwrap();
            assert!(min_win >= max_lose, "{min_win} < {max_lose}");
            // Among columns tied at the cut, the highest indices won.
            let lowest_tied_winner = out
                .sparse()
                .iter()
                .find(|&&c| ov[c as usize] == min_win)
                .unwrap();
            assert!((0..500u32)
                .filter(|c| !out.contains(*c) && ov[*c as usize] == min_win)
                .all(|c| c < *lowest_tied_winner));
        }
    }

    #[test]
    fn local_inhibition_activates_about_the_target_density() {
        let p = SpatialPoolerParams {
            global_inhibition: false,
            potential_radius: Some(8),
            num_active_columns_per_inh_area: 3,
            ..params(256, 256, 3)
        };
        let mut sp = SpatialPooler::new(p).unwrap();
        let r = sp.inhibition_radius();
        assert!((1..256).contains(&r), "radius {r}");
        let density = sp.density();
        let mut rng = Random::new(5);
        let mut total = 0usize;
        let steps = 60;
        for step in 0..steps {
            let input = random_sdr(&mut rng, 256, 40);
            total += run(&mut sp, &input, step % 2 == 0).len();
        }
        let mean = total as f64 / steps as f64;
        let expected = density * 256.0;
        assert!(
            mean > 0.75 * expected && mean < 1.35 * expected,
            "mean active {mean}, expected ~{expected}"
        );
    }

    #[test]
    fn similar_inputs_overlap_and_disjoint_inputs_do_not() {
        let mut sp = SpatialPooler::new(params(454, 2048, 40)).unwrap();
        let a = run(&mut sp, &block(454, 100, 40), false);
        let a_shift = run(&mut sp, &block(454, 102, 40), false);
        let far = run(&mut sp, &block(454, 300, 40), false);
        assert!(
            a.overlap(&a_shift) >= 20,
            "similar: {}",
            a.overlap(&a_shift)
        );
        assert!(a.overlap(&far) <= 6, "disjoint: {}", a.overlap(&far));
    }

    #[test]
    fn trained_inputs_map_to_stable_distinct_outputs() {
        let mut sp = SpatialPooler::new(params(454, 2048, 40)).unwrap();
        let inputs: Vec<Sdr> = (0..5).map(|i| block(454, 20 + 80 * i, 40)).collect();
        for _ in 0..30 {
            for x in &inputs {
                run(&mut sp, x, true);
            }
        }
        let first: Vec<Sdr> = inputs.iter().map(|x| run(&mut sp, x, true)).collect();
        let second: Vec<Sdr> = inputs.iter().map(|x| run(&mut sp, x, true)).collect();
        assert_eq!(first, second);
        for i in 0..5 {
            for j in i + 1..5 {
                assert!(first[i].overlap(&first[j]) <= 6);
            }
        }
    }

    #[test]
    fn learning_moves_permanences_towards_the_input() {
        let mut sp = SpatialPooler::new(params(200, 300, 10)).unwrap();
        let x = block(200, 50, 30);
        let out = run(&mut sp, &x, false);
        let before = sp.clone();
        let out_learn = run(&mut sp, &x, true);
        assert_eq!(out, out_learn);
        for col in 0..300u32 {
            let pool = before.potential_pool(col);
            assert_eq!(pool, sp.potential_pool(col));
            let (perms0, perms1) = (units(&before, col), units(&sp, col));
            for ((&presyn, p0), p1) in pool.iter().zip(perms0).zip(perms1) {
                // In units: +0.003 = 150 up to 1.0 = 50000, -0.0005 = 25, trimmed below 75.
                if !out.contains(col) {
                    assert_eq!(p0, p1);
                } else if x.contains(presyn) {
                    assert_eq!(p1, (p0 + 150).min(50_000));
                } else {
                    let want = p0.saturating_sub(25);
                    assert_eq!(p1, if want < 75 { 0 } else { want });
                }
            }
        }
    }

    #[test]
    fn boosting_favours_columns_that_have_been_inactive() {
        let p = SpatialPoolerParams {
            boost_strength: 2.0,
            ..params(100, 200, 10)
        };
        let mut sp = SpatialPooler::new(p).unwrap();
        let x = block(100, 10, 20);
        let first = run(&mut sp, &x, true);
        for _ in 0..20 {
            run(&mut sp, &x, true);
        }
        let b = sp.boost_factors();
        let winner = first.sparse()[0] as usize;
        let idle = (0..200)
            .find(|&c| sp.active_duty_cycles()[c] == 0.0)
            .unwrap();
        assert!(
            b[idle] > 1.0 && b[winner] < b[idle],
            "{} {}",
            b[idle],
            b[winner]
        );
    }

    #[test]
    fn weak_columns_are_bumped_up() {
        // Inputs only ever touch the first half: columns whose connected synapses miss them
        // keep a zero overlap duty cycle and must be bumped after the first update round.
        let p = SpatialPoolerParams {
            potential_radius: Some(4),
            wrap_around: false,
            ..params(100, 100, 4)
        };
        let mut sp = SpatialPooler::new(p).unwrap();
        let before = sp.clone();
        for i in 0..UPDATE_PERIOD as u32 + 1 {
            run(&mut sp, &block(100, i % 40, 8), true);
        }
        let col = 95u32; // centred on input 95, never overlapped
        assert_eq!(sp.overlap_duty_cycles()[col as usize], 0.0);
        assert!(sp.is_materialised(col), "a bumped column is stored");
        let sum = |sp: &SpatialPooler| sp.permanences(col).iter().sum::<f32>();
        let (c0, c1) = (sum(&before), sum(&sp));
        assert!(c1 > c0 + 0.01, "weak column not bumped: {c0} -> {c1}");
    }

    #[test]
    fn logged_and_stored_columns_follow_the_per_synapse_rule() {
        // Inputs confined to part of the field, so that some columns never overlap and are
        // raised as weak once the minimum duty cycles are first set (iteration 50); some
        // columns win often enough to have their lanes stored, most a few times only.
        let p = SpatialPoolerParams {
            min_pct_overlap_duty_cycle: 0.2,
            potential_radius: Some(40),
            wrap_around: false,
            ..params(454, 600, 20)
        };
        let mut sp = SpatialPooler::new(p).unwrap();
        let k = sp.cache.consts.clone();
        let mut pools: Vec<Vec<u32>> = (0..600).map(|c| sp.potential_pool(c)).collect();
        let mut perms: Vec<Vec<u16>> = (0..600).map(|c| units(&sp, c)).collect();
        let mut rng = Random::new(9);
        let field: Vec<u32> = (0..300).collect();
        let (mut wins, mut raises) = (0, 0);
        for step in 0..130 {
            let x = if step % 3 == 0 {
                block(454, 10, 30) // a recurring input: its winners' lanes get stored
            } else {
                Sdr::from_sparse(454, rng.sample(&field, 40))
            };
            let min_before = sp.min_overlap_duty_cycles.clone();
            let out = run(&mut sp, &x, true);
            for &col in out.sparse() {
                wins += 1;
                for (&i, p) in pools[col as usize].iter().zip(&mut perms[col as usize]) {
                    *p = if x.contains(i) {
                        (*p + k.active_inc).min(PERMANENCE_MAX)
                    } else {
                        p.saturating_sub(k.inactive_dec)
                    };
                    *p = if *p < k.trim { 0 } else { *p };
                }
            }
            for col in 0..600 {
                let min = min_before[if min_before.len() == 1 { 0 } else { col }];
                if sp.overlap_duty_cycles()[col] < min {
                    raises += 1;
                    for p in &mut perms[col] {
                        *p = (*p + k.below_stimulus_inc).min(PERMANENCE_MAX);
                        *p = if *p < k.trim { 0 } else { *p };
                    }
                }
            }
            if step % 13 == 0 || step == 129 {
                for col in 0..600u32 {
                    assert_eq!(
                        units(&sp, col),
                        perms[col as usize],
                        "step {step} col {col}"
                    );
                    assert_eq!(
                        sp.connected_count(col),
                        perms[col as usize]
                            .iter()
                            .filter(|&&p| p >= k.connected)
                            .count() as u32
                    );
                }
            }
        }
        pools.clear();
        let dense = sp.num_materialised() - sp.num_logged();
        assert!(wins > 0 && raises > 0, "{wins} wins, {raises} raises");
        assert!(
            dense > 0 && sp.num_logged() > dense,
            "{dense} stored, {} logged",
            sp.num_logged()
        );
        assert!(
            (0..sp.columns.young.len()).any(|y| sp.columns.steps_of(y).contains(&RAISE)),
            "no logged raise"
        );
    }

    /// Poolers of other sizes computing in turn on one thread, on the thread's buffers,
    /// compute what each computes alone.
    #[test]
    fn poolers_sharing_a_thread_compute_as_alone() {
        let make = || {
            [
                SpatialPooler::new(params(454, 600, 20)).unwrap(),
                SpatialPooler::new(SpatialPoolerParams {
                    global_inhibition: false,
                    boost_strength: 1.0,
                    ..params(100, 128, 6)
                })
                .unwrap(),
            ]
        };
        let (mut shared, mut alone) = (make(), make());
        let mut rng = Random::new(4);
        for step in 0..120 {
            let x = [random_sdr(&mut rng, 454, 40), random_sdr(&mut rng, 100, 12)];
            let learn = step % 4 != 3;
            let together: Vec<Sdr> = (0..2).map(|i| run(&mut shared[i], &x[i], learn)).collect();
            for i in 0..2 {
                let out =
                    std::thread::scope(|s| s.spawn(|| run(&mut alone[i], &x[i], learn)).join())
                        .unwrap();
                assert_eq!(together[i].sparse(), out.sparse(), "step {step} pooler {i}");
            }
        }
        assert!(shared == alone);
    }

    #[test]
    fn inference_leaves_the_pooler_unchanged() {
        let mut sp = SpatialPooler::new(params(454, 2048, 40)).unwrap();
        let mut rng = Random::new(11);
        for _ in 0..30 {
            run(&mut sp, &random_sdr(&mut rng, 454, 50), true);
        }
        let frozen = sp.clone();
        for _ in 0..30 {
            run(&mut sp, &random_sdr(&mut rng, 454, 50), false);
        }
        assert_eq!(sp, frozen);
    }

    #[test]
    fn serde_round_trip_continues_bit_identically() {
        let p = SpatialPoolerParams {
            boost_strength: 1.0,
            ..params(454, 1024, 20)
        };
        let mut sp = SpatialPooler::new(p).unwrap();
        let mut rng = Random::new(21);
        for step in 0..90 {
            // A recurring input too, so that some columns have their lanes stored.
            let x = if step % 3 == 0 {
                block(454, 200, 40)
            } else {
                random_sdr(&mut rng, 454, 40)
            };
            run(&mut sp, &x, true);
        }
        assert!(sp.num_logged() > 0 && sp.num_logged() < sp.num_materialised());
        assert_eq!(sp.columns.stride, 464, "454 inputs rounded up to 16 lanes");
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&sp, cfg).unwrap();
        // Checkpoints hold whole words of lanes, as when the store kept that many.
        let mut wide = sp.columns.clone();
        wide.set_stride(512);
        let encode = |s: &ColumnStore| bincode::serde::encode_to_vec(s, cfg).unwrap();
        assert_eq!(encode(&wide), encode(&sp.columns));
        let (mut back, _): (SpatialPooler, _) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back.columns.stride, 512);
        assert_eq!(back, sp, "equal before the lanes are cut to the input");
        back.rebuild_after_restore();
        assert_eq!(back, sp);
        assert_eq!(back.columns.stride, 464);
        assert_eq!(back.columns.perms, sp.columns.perms);
        for step in 0..80 {
            let x = random_sdr(&mut rng, 454, 40);
            let learn = step % 5 != 4;
            assert_eq!(run(&mut sp, &x, learn), run(&mut back, &x, learn));
            assert_eq!(sp.overlaps(), back.overlaps());
        }
        assert_eq!(
            bincode::serde::encode_to_vec(&sp, cfg).unwrap(),
            bincode::serde::encode_to_vec(&back, cfg).unwrap()
        );
    }

    #[test]
    fn local_inhibition_round_trip_continues_bit_identically() {
        let p = SpatialPoolerParams {
            global_inhibition: false,
            potential_radius: Some(10),
            boost_strength: 0.5,
            ..params(128, 128, 4)
        };
        let mut sp = SpatialPooler::new(p).unwrap();
        let mut rng = Random::new(2);
        for _ in 0..55 {
            run(&mut sp, &random_sdr(&mut rng, 128, 20), true);
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&sp, cfg).unwrap();
        let (mut back, _): (SpatialPooler, _) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        // compute() rebuilds the cache itself if the caller forgot.
        for _ in 0..60 {
            let x = random_sdr(&mut rng, 128, 20);
            assert_eq!(run(&mut sp, &x, true), run(&mut back, &x, true));
        }
        assert_eq!(sp, back);
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        let cases: Vec<(&str, SpatialPoolerParams)> = vec![
            ("input_size", SpatialPoolerParams::default()),
            (
                "column_count",
                SpatialPoolerParams {
                    column_count: 0,
                    ..params(10, 10, 2)
                },
            ),
            (
                "potential_pct",
                SpatialPoolerParams {
                    potential_pct: 1.5,
                    ..params(10, 10, 2)
                },
            ),
            ("num_active_columns_per_inh_area", params(10, 10, 0)),
            ("num_active_columns_per_inh_area", params(10, 10, 11)),
            (
                "syn_perm_connected",
                SpatialPoolerParams {
                    syn_perm_connected: -0.1,
                    ..params(10, 10, 2)
                },
            ),
            (
                "syn_perm_active_inc",
                SpatialPoolerParams {
                    syn_perm_active_inc: 0.5,
                    ..params(10, 10, 2)
                },
            ),
            (
                "duty_cycle_period",
                SpatialPoolerParams {
                    duty_cycle_period: 0,
                    ..params(10, 10, 2)
                },
            ),
            (
                "boost_strength",
                SpatialPoolerParams {
                    boost_strength: f64::NAN,
                    ..params(10, 10, 2)
                },
            ),
            (
                "stimulus_threshold",
                SpatialPoolerParams {
                    stimulus_threshold: 9,
                    ..params(10, 10, 2)
                },
            ),
            // Non-zero amounts below the permanence resolution.
            (
                "syn_perm_active_inc",
                SpatialPoolerParams {
                    syn_perm_active_inc: 0.000_009, // 0.45 units
                    ..params(10, 10, 2)
                },
            ),
            (
                "syn_perm_inactive_dec",
                SpatialPoolerParams {
                    syn_perm_inactive_dec: 0.000_001,
                    ..params(10, 10, 2)
                },
            ),
            (
                "syn_perm_connected",
                SpatialPoolerParams {
                    syn_perm_connected: 0.000_001,
                    ..params(10, 10, 2)
                },
            ),
            (
                // 5 units connect, but the weak-column raise of a tenth rounds to 0.
                "syn_perm_connected",
                SpatialPoolerParams {
                    syn_perm_connected: 0.000_1 - 0.000_001,
                    syn_perm_active_inc: 0.0,
                    ..params(10, 10, 2)
                },
            ),
        ];
        let resolution_cases = cases.len() - 4;
        for (i, (name, p)) in cases.into_iter().enumerate() {
            let err = SpatialPooler::new(p).unwrap_err();
            assert_eq!(err.name, name);
            let msg = err.to_string();
            assert!(msg.contains(name), "{msg}");
            assert_eq!(msg.contains("rounds to 0"), i >= resolution_cases, "{msg}");
        }
        assert!(SpatialPooler::new(params(10, 10, 2)).is_ok());
        // Learning can be switched off with zero amounts.
        assert!(SpatialPooler::new(SpatialPoolerParams {
            syn_perm_active_inc: 0.0,
            syn_perm_inactive_dec: 0.0,
            ..params(10, 10, 2)
        })
        .is_ok());
        // One unit is enough, and the smallest weak-column raise is one unit.
        assert!(SpatialPooler::new(SpatialPoolerParams {
            syn_perm_active_inc: 0.000_02,
            syn_perm_inactive_dec: 0.000_01, // 0.5 units rounds up
            syn_perm_connected: 0.000_1,
            ..params(10, 10, 2)
        })
        .is_ok());
    }

    /// What a column's log holds in the model: its steps' inputs (`None`: a raise), or
    /// `Stored` once its lanes would be.
    #[derive(Clone, Debug, PartialEq)]
    enum ModelColumn {
        Logged(Vec<Option<Vec<u64>>>),
        Stored,
    }

    /// The store's logs, expanded as the model keeps them, with the input reference counts
    /// checked against the logs.
    fn expand_logs(store: &ColumnStore) -> Vec<Option<ModelColumn>> {
        let mut out = vec![None; store.num_columns as usize];
        let mut refs = vec![0u32; store.input_refs.len()];
        for (slot, &col) in store.columns.iter().enumerate() {
            let r = store.repr[slot];
            out[col as usize] = Some(if r & YOUNG == 0 {
                ModelColumn::Stored
            } else {
                let steps = store.steps_of((r & !YOUNG) as usize);
                for &e in steps.iter().filter(|&&e| e != RAISE) {
                    refs[e as usize] += 1;
                }
                ModelColumn::Logged(
                    steps
                        .iter()
                        .map(|&e| (e != RAISE).then(|| store.input(e).to_vec()))
                        .collect(),
                )
            });
        }
        assert_eq!(refs, store.input_refs, "reference counts");
        let mut free: Vec<u32> = (0..refs.len() as u32)
            .filter(|&i| refs[i as usize] == 0)
            .collect();
        let mut listed = store.free_inputs.clone();
        listed.sort_unstable();
        free.sort_unstable();
        assert_eq!(listed, free, "free inputs");
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 64, ..proptest::prelude::ProptestConfig::default()
        })]
        /// Logs hold each step's input or raise in order whatever the sharing, promotion and
        /// compaction, and survive a checkpoint round trip.
        #[test]
        fn logs_hold_their_steps_through_sharing_and_compaction(
            steps in proptest::collection::vec(
                (
                    proptest::collection::vec(0u32..12, 0..8),
                    proptest::collection::vec(0u32..12, 0..2),
                    proptest::prelude::any::<u64>(),
                ),
                1..160,
            )
        ) {
            let (columns, stride) = (12usize, 128usize);
            let mut store = ColumnStore::new(columns, stride);
            let mut model: Vec<Option<ModelColumn>> = vec![None; columns];
            let lanes = vec![7u16; stride];
            for (winners, weak, seed) in steps {
                let input = [seed, seed.rotate_left(17) ^ 5];
                store.begin_step();
                let mut winners = winners;
                winners.sort_unstable();
                winners.dedup();
                let weak = weak.into_iter().map(|c| (c, None));
                for (col, bits) in winners.into_iter().map(|c| (c, Some(&input[..]))).chain(weak) {
                    let m = &mut model[col as usize];
                    match (store.repr(col), m.as_mut()) {
                        (Repr::Young { y, .. }, Some(ModelColumn::Logged(log)))
                            if log.len() == YOUNG_STEPS =>
                        {
                            store.promote(y, &lanes);
                            *m = Some(ModelColumn::Stored);
                        }
                        (Repr::Dense { .. }, _) => {}
                        (repr, _) => {
                            let y = match repr {
                                Repr::Young { y, .. } => Some(y),
                                _ => None,
                            };
                            store.log_step(col, y, bits);
                            let log = match m.get_or_insert(ModelColumn::Logged(Vec::new())) {
                                ModelColumn::Logged(log) => log,
                                ModelColumn::Stored => unreachable!(),
                            };
                            log.push(bits.map(<[u64]>::to_vec));
                        }
                    }
                }
                proptest::prop_assert_eq!(&expand_logs(&store), &model);
            }
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(&store, cfg).unwrap();
            let (back, _): (ColumnStore, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            proptest::prop_assert_eq!(&expand_logs(&back), &model);
            proptest::prop_assert!(back == store);
            // Each input once in the checkpoint, however many steps share it.
            let distinct: std::collections::HashSet<u32> =
                back.log.iter().copied().filter(|&e| e != RAISE).collect();
            proptest::prop_assert_eq!(back.input_refs.len(), distinct.len());
        }
    }

    #[test]
    fn logged_inputs_out_of_range_or_unused_are_rejected() {
        let wire = |young_inputs: Vec<u32>, inputs: usize| StoreWire {
            num_columns: 2,
            stride: 64,
            columns: vec![1],
            young_steps: vec![young_inputs.len() as u8],
            young_inputs,
            inputs: vec![0; 8 * inputs],
            young_rows: vec![0; 8],
            tags: vec![],
            values: vec![],
        };
        let store = ColumnStore::from_wire(wire(vec![1, 0, 2, 1], 2)).unwrap();
        assert_eq!(store.steps_of(0), [0, RAISE, 1, 0]);
        assert_eq!(store.input_refs, [2, 1]);
        let err = ColumnStore::from_wire(wire(vec![1, 3], 2)).unwrap_err();
        assert!(err.contains("of input 3"), "{err}");
        let err = ColumnStore::from_wire(wire(vec![1, 0], 2)).unwrap_err();
        assert!(err.contains("no step refers to"), "{err}");
    }

    #[test]
    fn corrupt_stored_permanences_are_rejected() {
        let wire = |tags: Vec<u8>, values: Vec<u8>| StoreWire {
            num_columns: 2,
            stride: 64,
            columns: vec![1],
            young_steps: vec![0],
            young_inputs: vec![],
            inputs: vec![],
            young_rows: vec![],
            tags,
            values,
        };
        // Lanes 0..4 tagged "value", the rest zero.
        let tags = || {
            let mut t = vec![0u8; 16];
            t[0] = 0b1010_1010;
            t
        };
        let max = PERMANENCE_MAX.to_le_bytes();
        let ok = [max, max, [7, 0], [0, 0]].concat();
        let store = ColumnStore::from_wire(wire(tags(), ok)).unwrap();
        assert_eq!(
            store.lanes(0)[..5],
            [PERMANENCE_MAX, PERMANENCE_MAX, 7, 0, 0]
        );
        let above = [max, (PERMANENCE_MAX + 1).to_le_bytes(), [7, 0], [0, 0]].concat();
        let err = ColumnStore::from_wire(wire(tags(), above)).unwrap_err();
        assert!(err.contains("above the maximum"), "{err}");
        let sentinel = [max, NOT_IN_POOL.to_le_bytes(), [7, 0], [0, 0]].concat();
        assert!(ColumnStore::from_wire(wire(tags(), sentinel)).is_err());
        assert!(ColumnStore::from_wire(wire(tags(), vec![0; 7])).is_err());
        assert!(ColumnStore::from_wire(wire(tags(), vec![0; 6])).is_err());
        assert!(ColumnStore::from_wire(wire(tags(), vec![0; 10])).is_err());
    }

    #[test]
    fn stimulus_threshold_raises_initial_permanences() {
        let p = SpatialPoolerParams {
            stimulus_threshold: 30,
            potential_pct: 0.5,
            ..params(64, 32, 4)
        };
        let sp = SpatialPooler::new(p).unwrap();
        for col in 0..32 {
            assert!(sp.connected_count(col) >= 30, "column {col}");
        }
    }

    #[test]
    fn columns_are_stored_only_once_learning_modifies_them() {
        let mut sp = SpatialPooler::new(params(454, 2048, 40)).unwrap();
        assert_eq!(sp.num_materialised(), 0);
        let mut rng = Random::new(4);
        // Inference alone never stores a column.
        for _ in 0..5 {
            run(&mut sp, &random_sdr(&mut rng, 454, 40), false);
        }
        assert_eq!(sp.num_materialised(), 0);
        // Fewer steps than the duty-cycle update period: no weak-column bumps yet, so the
        // stored columns are exactly the winners.
        let mut winners = std::collections::BTreeSet::new();
        for _ in 0..UPDATE_PERIOD - 1 {
            let out = run(&mut sp, &random_sdr(&mut rng, 454, 40), true);
            winners.extend(out.sparse().iter().copied());
        }
        let stored: std::collections::BTreeSet<u32> =
            (0..2048).filter(|&c| sp.is_materialised(c)).collect();
        assert_eq!(stored, winners);
        assert_eq!(sp.num_materialised(), winners.len());
    }

    #[test]
    fn lazy_columns_are_a_pure_function_of_seed_and_column() {
        let mut trained = SpatialPooler::new(params(454, 512, 20)).unwrap();
        let mut rng = Random::new(6);
        for _ in 0..10 {
            run(&mut trained, &random_sdr(&mut rng, 454, 40), true);
        }
        let fresh = SpatialPooler::new(params(454, 512, 20)).unwrap();
        let mut lazy = 0;
        for col in 0..512u32 {
            if !trained.is_materialised(col) {
                lazy += 1;
                assert_eq!(trained.potential_pool(col), fresh.potential_pool(col));
                let bits = |sp: &SpatialPooler| -> Vec<u32> {
                    sp.permanences(col).iter().map(|p| p.to_bits()).collect()
                };
                assert_eq!(bits(&trained), bits(&fresh), "column {col}");
                assert_eq!(trained.connected_count(col), fresh.connected_count(col));
            }
        }
        assert!((312..512).contains(&lazy), "{lazy} lazy columns");
        // Columns differ, and the seed changes them all.
        assert_ne!(fresh.potential_pool(0), fresh.potential_pool(1));
        let other = SpatialPooler::new(SpatialPoolerParams {
            seed: 7,
            ..params(454, 512, 20)
        })
        .unwrap();
        let same = (0..512u32)
            .filter(|&c| other.potential_pool(c) == fresh.potential_pool(c))
            .count();
        assert_eq!(same, 0);
    }

    #[test]
    fn checkpoints_carry_only_the_stored_columns() {
        let cfg = bincode::config::standard();
        let mut sp = SpatialPooler::new(params(454, 2048, 40)).unwrap();
        let fresh = bincode::serde::encode_to_vec(&sp, cfg).unwrap().len();
        assert!(fresh < 1024, "fresh pooler serialises to {fresh} bytes");
        let x = block(454, 100, 40);
        for _ in 0..20 {
            run(&mut sp, &x, true);
        }
        let stored = sp.num_materialised();
        assert!((40..=60).contains(&stored), "{stored} stored columns");
        let trained = bincode::serde::encode_to_vec(&sp, cfg).unwrap().len();
        // Per stored column: 2 bits per lane (512 lanes) plus at most 2 bytes per synapse.
        let bound = fresh + 64 + stored * (128 + 2 * 364);
        assert!(trained <= bound, "{trained} > {bound}");
        let (back, _): (SpatialPooler, _) = bincode::serde::decode_from_slice(
            &bincode::serde::encode_to_vec(&sp, cfg).unwrap(),
            cfg,
        )
        .unwrap();
        assert_eq!(back, sp);
    }

    #[test]
    fn vector_learning_kernel_matches_the_per_synapse_rule() {
        let k = Consts::new(&params(454, 16, 2));
        let mut rng = Random::new(13);
        const MAX: u16 = PERMANENCE_MAX;
        let edges = [
            0,
            1,
            k.inactive_dec - 1,
            k.inactive_dec,
            k.trim - 1,
            k.trim,
            k.trim + k.inactive_dec - 1,
            k.trim + k.inactive_dec,
            k.connected - 1,
            k.connected,
            k.connected + k.inactive_dec,
            MAX - k.active_inc,
            MAX - 1,
            MAX,
        ];
        let draw = |rng: &mut Random| -> u16 {
            match rng.below(4) {
                0 => NOT_IN_POOL,
                1 => edges[rng.below(edges.len() as u32) as usize],
                _ => rng.below(u32::from(MAX) + 1) as u16,
            }
        };
        // (inc, dec) per lane: NuPIC's changes, none, and extremes that saturate.
        let changes = [
            (k.active_inc, 0),
            (0, k.inactive_dec),
            (k.below_stimulus_inc, 0),
            (0, 0),
            (MAX, 0),
            (0, MAX),
            (u16::MAX, 0),
            (0, u16::MAX),
        ];
        // (trim, connected): NuPIC's, no trimming, and thresholds at the edges.
        let thresholds = [(k.trim, k.connected), (0, 1), (k.trim, MAX), (MAX - 1, MAX)];
        // Every kernel this CPU can run, in turn.
        let best = Vectors::detect();
        let kernels = [Vectors::Portable, Vectors::Avx2];
        let runs = kernels.into_iter().filter(|&v| v <= best).cycle().take(100);
        for (round, vectors) in runs.enumerate() {
            let (trim, connected) = thresholds[round % thresholds.len()];
            // Whole words, NAB's 454 inputs' stride, a tail alone, and tails of other sizes.
            let n = [512, 464, 16, 64 + 32, 128 + 48][round % 5];
            let lanes: Vec<u16> = (0..n).map(|_| draw(&mut rng)).collect();
            let mut delta = Delta::new(n, 0, 0);
            for i in 0..n {
                let (inc, dec) = changes[rng.below(changes.len() as u32) as usize];
                (delta.inc[i], delta.dec[i]) = (inc, dec);
            }
            let words = n.div_ceil(64);
            let mut fast = lanes.clone();
            let mut row = vec![0u64; words];
            adapt_lanes_best(vectors, &mut fast, &delta, trim, connected, &mut row);
            let mut portable = lanes.clone();
            let mut row2 = vec![0u64; words];
            adapt_lanes_best(
                Vectors::Portable,
                &mut portable,
                &delta,
                trim,
                connected,
                &mut row2,
            );
            for i in 0..n {
                let want = if lanes[i] == NOT_IN_POOL {
                    NOT_IN_POOL
                } else {
                    let change = i32::from(delta.inc[i]) - i32::from(delta.dec[i]);
                    let np = (i32::from(lanes[i]) + change).clamp(0, i32::from(MAX)) as u16;
                    if np < trim {
                        0
                    } else {
                        np
                    }
                };
                let ctx = format!(
                    "{vectors:?} lane {i} of {n}: {} {:?}",
                    lanes[i],
                    (trim, connected)
                );
                assert_eq!(fast[i], want, "{ctx}");
                assert_eq!(portable[i], want, "{ctx}");
                let bit = (row[i / 64] >> (i % 64)) & 1 == 1;
                assert_eq!(bit, want != NOT_IN_POOL && want >= connected, "{ctx}");
            }
            assert_eq!(row, row2);
            // Bits past the lanes stay clear, and the plain rule gives the same row.
            if n % 64 != 0 {
                assert_eq!(row[words - 1] >> (n % 64), 0);
            }
            let mut plain = vec![u64::MAX; words];
            connected_bits(&fast, connected, &mut plain);
            assert_eq!(plain, row);
        }
    }
}
