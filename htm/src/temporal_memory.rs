//! Temporal memory: NuPIC / htm.core `TemporalMemory` semantics (the "numentaTM" of NAB).
//!
//! Cells are `column * cells_per_column + i`. Distal segments and synapses live in a
//! [`SegmentStore`] (presynaptic space = the same cells), whose presynaptic index makes
//! "which segments does the current activity drive" a pass over one small entry per synapse
//! of the active cells only. The last-used iteration of each segment lives in a vector
//! indexed by segment id.

use serde::{Deserialize, Serialize};

use crate::random::Random;
use crate::segment_store::{Activity, SegmentId, SegmentStore};
pub use crate::spatial_pooler::ParamError;

/// Permanence tolerance of NuPIC's C++ temporal memory: synapses below it are destroyed and
/// it is subtracted from the connected threshold.
const EPSILON: f32 = 0.000_01;

/// Temporal memory parameters; defaults are NAB's "numentaTM" settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TemporalMemoryParams {
    /// Number of columns (the spatial pooler's output width).
    pub column_count: u32,
    /// Cells per column.
    pub cells_per_column: u32,
    /// Active connected synapses for a segment to become active (predictive).
    pub activation_threshold: u32,
    /// Active potential synapses for a segment to count as matching (learnable).
    pub min_threshold: u32,
    /// Synapses grown per learning segment and step, at most.
    pub max_new_synapse_count: u32,
    /// Permanence of newly grown synapses.
    pub initial_permanence: f32,
    /// Permanence at which a synapse counts as connected.
    pub connected_permanence: f32,
    /// Reinforcement of synapses from previously active cells.
    pub permanence_increment: f32,
    /// Decay of synapses from previously inactive cells on learning segments.
    pub permanence_decrement: f32,
    /// Punishment of active synapses on segments that predicted a column that stayed off.
    pub predicted_segment_decrement: f32,
    /// Segment cap per cell; the least recently used segment is evicted beyond it.
    pub max_segments_per_cell: u32,
    /// Synapse cap per segment; the weakest synapses are evicted beyond it.
    pub max_synapses_per_segment: u32,
    /// Cap on the total number of segments; 0 = unlimited (NuPIC). Beyond it the least
    /// recently used segment (ties: the oldest) is evicted to make room for a new one.
    /// Segments active or matching in the current step are spared (they may still learn in
    /// it), so a cap below what one input matches is exceeded until a later creation.
    pub max_segments: u32,
    /// Seed of the memory's random generator.
    pub seed: u64,
}

impl Default for TemporalMemoryParams {
    fn default() -> Self {
        TemporalMemoryParams {
            column_count: 2048,
            cells_per_column: 32,
            activation_threshold: 20,
            min_threshold: 13,
            max_new_synapse_count: 31,
            initial_permanence: 0.24,
            connected_permanence: 0.5,
            permanence_increment: 0.04,
            permanence_decrement: 0.008,
            predicted_segment_decrement: 0.001,
            max_segments_per_cell: 128,
            max_synapses_per_segment: 128,
            max_segments: 0,
            seed: 42,
        }
    }
}

impl TemporalMemoryParams {
    /// Checks every parameter, naming the first invalid one.
    pub fn validate(&self) -> Result<(), ParamError> {
        let positive = [
            ("column_count", self.column_count),
            ("cells_per_column", self.cells_per_column),
            ("activation_threshold", self.activation_threshold),
            ("min_threshold", self.min_threshold),
            ("max_new_synapse_count", self.max_new_synapse_count),
            ("max_segments_per_cell", self.max_segments_per_cell),
            ("max_synapses_per_segment", self.max_synapses_per_segment),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ParamError::new(name, "must be > 0"));
            }
        }
        if self
            .column_count
            .checked_mul(self.cells_per_column)
            .is_none()
        {
            return Err(ParamError::new(
                "cells_per_column",
                "column_count * cells_per_column overflows u32",
            ));
        }
        let unit = [
            ("initial_permanence", self.initial_permanence),
            ("connected_permanence", self.connected_permanence),
            ("permanence_increment", self.permanence_increment),
            ("permanence_decrement", self.permanence_decrement),
            (
                "predicted_segment_decrement",
                self.predicted_segment_decrement,
            ),
        ];
        for (name, v) in unit {
            if !(0.0..=1.0).contains(&v) {
                return Err(ParamError::new(name, format!("must be in [0, 1], got {v}")));
            }
        }
        if self.connected_permanence == 0.0 {
            return Err(ParamError::new("connected_permanence", "must be > 0"));
        }
        Ok(())
    }
}

/// Derived counts and scratch buffers: never serialised, rebuilt by
/// [`TemporalMemory::rebuild_after_restore`].
#[derive(Clone, Debug, Default)]
struct Scratch {
    valid: bool,
    /// Active connected / potential synapse counts per segment for the current activity.
    activity: Activity,
    /// Bitset of the previous step's active cells, set only during `activate_cells`.
    prev_active: Vec<u64>,
    prev_active_list: Vec<u32>,
    prev_winners: Vec<u32>,
    candidates: Vec<u32>,
    /// (position in segment, permanence) of eviction candidates.
    weakest: Vec<(u32, f32)>,
    /// Positions of synapses to remove from a segment, ascending.
    doomed: Vec<u32>,
    /// Sort keys of segment lists.
    keys: Vec<u128>,
    lru: Lru,
}

/// A segment's place in the global least-recently-used order: (last used, creation ordinal,
/// id). Valid while the segment is alive and was last used then.
type LruEntry = (u64, u64, SegmentId);

/// The global least-recently-used order of segments, for `max_segments`. Uses only ever
/// move a segment to the current iteration, so appending them keeps the queue sorted; stale
/// entries (segments used again or destroyed since) are skipped when met and dropped in
/// bulk when they pile up. Derived: rebuilt from `last_used` on restore.
#[derive(Clone, Debug, Default)]
struct Lru {
    queue: std::collections::VecDeque<LruEntry>,
    /// Uses of the current step, appended (sorted by ordinal) when the step ends.
    pending: Vec<LruEntry>,
    spared: Vec<LruEntry>,
}

/// Scratch compares equal: it is a function of the persistent state.
impl PartialEq for Scratch {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The temporal memory. See the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemporalMemory {
    params: TemporalMemoryParams,
    connections: SegmentStore,
    rng: Random,
    /// Learning iterations (segments record it when they are used).
    iteration: u64,
    /// Per segment id: iteration at which it was last active while learning (or created).
    last_used: Vec<u64>,
    active_cells: Vec<u32>,
    winner_cells: Vec<u32>,
    // The rest follows from the state above (`rebuild_after_restore` recomputes it), so
    // checkpoints leave it out.
    /// Sorted by (cell, creation order).
    #[serde(skip)]
    active_segments: Vec<SegmentId>,
    /// Sorted by (cell, creation order).
    #[serde(skip)]
    matching_segments: Vec<SegmentId>,
    #[serde(skip)]
    predictive_cells: Vec<u32>,
    #[serde(skip)]
    predicted_columns: Vec<u32>,
    #[serde(skip)]
    scratch: Scratch,
}

#[inline(always)]
fn bit(words: &[u64], i: u32) -> bool {
    (words[(i >> 6) as usize] >> (i & 63)) & 1 != 0
}

impl TemporalMemory {
    /// An empty temporal memory (no segments yet).
    pub fn new(params: TemporalMemoryParams) -> Result<Self, ParamError> {
        params.validate()?;
        let cells = (params.column_count * params.cells_per_column) as usize;
        let mut tm = TemporalMemory {
            connections: SegmentStore::new(cells, cells, params.connected_permanence - EPSILON),
            rng: Random::new(params.seed),
            iteration: 0,
            last_used: Vec::new(),
            active_cells: Vec::new(),
            winner_cells: Vec::new(),
            active_segments: Vec::new(),
            matching_segments: Vec::new(),
            predictive_cells: Vec::new(),
            predicted_columns: Vec::new(),
            scratch: Scratch::default(),
            params,
        };
        tm.rebuild_after_restore();
        Ok(tm)
    }

    /// Rebuilds the per-segment activity counts, segment lists and predictions from the
    /// persistent state (the store rebuilds its own index when it is deserialised). Call
    /// after deserialising; idempotent ([`TemporalMemory::compute`] also calls it if it was
    /// forgotten).
    pub fn rebuild_after_restore(&mut self) {
        let cells = self.num_cells();
        self.scratch = Scratch {
            valid: true,
            prev_active: vec![0; cells.div_ceil(64)],
            ..Scratch::default()
        };
        if self.params.max_segments > 0 {
            let conns = &self.connections;
            let mut live: Vec<LruEntry> = (0..conns.segment_capacity() as SegmentId)
                .filter(|&seg| conns.is_alive(seg))
                .map(|seg| (self.last_used[seg as usize], conns.ordinal(seg), seg))
                .collect();
            live.sort_unstable();
            self.scratch.lru.queue = live.into();
        }
        // The counts the next step's learning reads are those of the current activity;
        // recomputing them also re-derives the segment lists and predictions.
        self.compute_segment_activity();
    }

    /// The parameters the memory was built with.
    pub fn params(&self) -> &TemporalMemoryParams {
        &self.params
    }

    /// Total number of cells.
    pub fn num_cells(&self) -> usize {
        self.connections.num_cells()
    }

    /// Learning iterations performed so far.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The distal synapse store.
    pub fn connections(&self) -> &SegmentStore {
        &self.connections
    }

    /// Cells active after the last step, sorted.
    pub fn active_cells(&self) -> &[u32] {
        &self.active_cells
    }

    /// Winner (learning) cells of the last step, sorted.
    pub fn winner_cells(&self) -> &[u32] {
        &self.winner_cells
    }

    /// Cells predicted for the next step (owners of active segments), sorted.
    pub fn predictive_cells(&self) -> &[u32] {
        &self.predictive_cells
    }

    /// Columns with a predictive cell, i.e. the columns predicted for the next step, sorted.
    pub fn predicted_columns(&self) -> &[u32] {
        &self.predicted_columns
    }

    /// Segments active for the current activity (they make their cells predictive), sorted
    /// by cell then creation order.
    pub fn active_segments(&self) -> &[SegmentId] {
        &self.active_segments
    }

    /// Segments matching the current activity (enough potential synapses to learn), sorted
    /// by cell then creation order.
    pub fn matching_segments(&self) -> &[SegmentId] {
        &self.matching_segments
    }

    /// Heap bytes held (capacity-based), including scratch buffers.
    pub fn heap_bytes(&self) -> usize {
        let s = &self.scratch;
        self.connections.heap_bytes()
            + s.activity.heap_bytes()
            + 8 * (self.last_used.capacity() + s.prev_active.capacity())
            + 4 * (self.active_cells.capacity()
                + self.winner_cells.capacity()
                + self.active_segments.capacity()
                + self.matching_segments.capacity()
                + self.predictive_cells.capacity()
                + self.predicted_columns.capacity()
                + s.prev_active_list.capacity()
                + s.prev_winners.capacity()
                + s.candidates.capacity()
                + s.doomed.capacity()
                + 2 * s.weakest.capacity()
                + 4 * s.keys.capacity()
                + 6 * (s.lru.queue.capacity() + s.lru.pending.capacity() + s.lru.spared.capacity()))
    }

    /// Forgets the current sequence context (active, winner and predictive state); learned
    /// synapses are kept. The next step's anomaly is 1 for any non-empty input.
    pub fn reset(&mut self) {
        self.active_cells.clear();
        self.winner_cells.clear();
        self.active_segments.clear();
        self.matching_segments.clear();
        self.predictive_cells.clear();
        self.predicted_columns.clear();
    }

    /// One time step: `active_columns` (sorted, unique) become active, learning if `learn`.
    ///
    /// Returns the raw anomaly score: the fraction of active columns that were not predicted
    /// by the previous step (0 when no column is active).
    ///
    /// # Panics
    /// If `active_columns` is not sorted and unique, or a column is out of range.
    pub fn compute(&mut self, active_columns: &[u32], learn: bool) -> f32 {
        assert!(
            active_columns.windows(2).all(|w| w[0] < w[1]),
            "active columns must be sorted and unique"
        );
        if let Some(&last) = active_columns.last() {
            assert!(
                last < self.params.column_count,
                "column {last} out of range for {} columns",
                self.params.column_count
            );
        }
        if !self.scratch.valid {
            self.rebuild_after_restore();
        }
        let score = raw_anomaly(active_columns, &self.predicted_columns);
        self.activate_cells(active_columns, learn);
        self.activate_dendrites(learn);
        score
    }

    fn column_of_segment(&self, seg: SegmentId) -> u32 {
        self.connections.cell(seg) / self.params.cells_per_column
    }

    /// NuPIC `activateCells`: walks active columns, active segments and matching segments
    /// together, column by column.
    fn activate_cells(&mut self, active_columns: &[u32], learn: bool) {
        {
            let s = &mut self.scratch;
            std::mem::swap(&mut s.prev_active_list, &mut self.active_cells);
            self.active_cells.clear();
            for &c in &s.prev_active_list {
                s.prev_active[(c >> 6) as usize] |= 1 << (c & 63);
            }
            std::mem::swap(&mut s.prev_winners, &mut self.winner_cells);
            self.winner_cells.clear();
        }
        let active_segments = std::mem::take(&mut self.active_segments);
        let matching_segments = std::mem::take(&mut self.matching_segments);
        let sentinel = self.params.column_count;
        let (mut ai, mut si, mut mi) = (0, 0, 0);
        loop {
            let mut column = sentinel;
            if let Some(&c) = active_columns.get(ai) {
                column = column.min(c);
            }
            if let Some(&seg) = active_segments.get(si) {
                column = column.min(self.column_of_segment(seg));
            }
            if let Some(&seg) = matching_segments.get(mi) {
                column = column.min(self.column_of_segment(seg));
            }
            if column == sentinel {
                break;
            }
            let mut a_end = ai;
            while active_columns.get(a_end) == Some(&column) {
                a_end += 1;
            }
            let mut s_end = si;
            while s_end < active_segments.len()
                && self.column_of_segment(active_segments[s_end]) == column
            {
                s_end += 1;
            }
            let mut m_end = mi;
            while m_end < matching_segments.len()
                && self.column_of_segment(matching_segments[m_end]) == column
            {
                m_end += 1;
            }
            if a_end > ai {
                if s_end > si {
                    self.activate_predicted_column(&active_segments[si..s_end], learn);
                } else {
                    self.burst_column(column, &matching_segments[mi..m_end], learn);
                }
            } else if learn {
                self.punish_predicted_column(&matching_segments[mi..m_end]);
            }
            (ai, si, mi) = (a_end, s_end, m_end);
        }
        // Hand the allocations back; activate_dendrites refills them.
        self.active_segments = active_segments;
        self.matching_segments = matching_segments;
        let s = &mut self.scratch;
        for &c in &s.prev_active_list {
            s.prev_active[(c >> 6) as usize] = 0;
        }
    }

    /// A predicted column: the cells of its active segments become active and winners;
    /// learning reinforces those segments and grows them towards the previous winners.
    fn activate_predicted_column(&mut self, segments: &[SegmentId], learn: bool) {
        let mut last_cell = u32::MAX;
        for &seg in segments {
            let cell = self.connections.cell(seg);
            if cell != last_cell {
                self.active_cells.push(cell);
                self.winner_cells.push(cell);
                last_cell = cell;
            }
            if learn {
                let n_potential = self.scratch.activity.potential(seg);
                let (inc, dec) = (
                    self.params.permanence_increment,
                    self.params.permanence_decrement,
                );
                self.adapt_segment(seg, inc, dec);
                let n_grow = i64::from(self.params.max_new_synapse_count) - i64::from(n_potential);
                if n_grow > 0 {
                    self.grow_synapses(seg, n_grow as usize);
                }
            }
        }
    }

    /// An unpredicted column: all its cells become active; the cell of the best matching
    /// segment (or the least used cell) is the winner and learns.
    fn burst_column(&mut self, column: u32, matching: &[SegmentId], learn: bool) {
        let cpc = self.params.cells_per_column;
        let start = column * cpc;
        self.active_cells.extend(start..start + cpc);
        // First segment with the most active potential synapses (std::max_element).
        let mut best: Option<(SegmentId, u32)> = None;
        for &seg in matching {
            let n = self.scratch.activity.potential(seg);
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((seg, n));
            }
        }
        let winner = match best {
            Some((seg, _)) => self.connections.cell(seg),
            None => self.least_used_cell(column),
        };
        self.winner_cells.push(winner);
        if !learn {
            return;
        }
        match best {
            Some((seg, n_potential)) => {
                let (inc, dec) = (
                    self.params.permanence_increment,
                    self.params.permanence_decrement,
                );
                self.adapt_segment(seg, inc, dec);
                let n_grow = i64::from(self.params.max_new_synapse_count) - i64::from(n_potential);
                if n_grow > 0 {
                    self.grow_synapses(seg, n_grow as usize);
                }
            }
            None => {
                // A segment with fewer synapses than this could never match: skip it.
                let n_grow = (self.params.max_new_synapse_count as usize)
                    .min(self.scratch.prev_winners.len());
                if n_grow > 0 {
                    let seg = self.create_segment(winner);
                    self.grow_synapses(seg, n_grow);
                }
            }
        }
    }

    /// Segments that predicted a column which did not become active lose permanence on
    /// their active synapses.
    fn punish_predicted_column(&mut self, matching: &[SegmentId]) {
        let dec = self.params.predicted_segment_decrement;
        if dec <= 0.0 {
            return;
        }
        for &seg in matching {
            self.adapt_segment(seg, -dec, 0.0);
        }
    }

    /// Among the column's cells with the fewest segments, one chosen at random.
    fn least_used_cell(&mut self, column: u32) -> u32 {
        let cpc = self.params.cells_per_column;
        let cells = column * cpc..(column + 1) * cpc;
        let count = |c: u32| self.connections.segments_for_cell(c).len();
        let min = cells.clone().map(count).min().unwrap_or(0);
        let n_tied = cells.clone().filter(|&c| count(c) == min).count();
        let pick = self.rng.below(n_tied as u32) as usize;
        cells
            .filter(|&c| count(c) == min)
            .nth(pick)
            .expect("tie index within tied cells")
    }

    /// Synapses from previously active cells `+inc`, others `-dec`, clamped to `[0, 1]`;
    /// synapses left at ~0 are destroyed, and the segment too if none remain.
    fn adapt_segment(&mut self, seg: SegmentId, inc: f32, dec: f32) {
        let prev_active: &[u64] = &self.scratch.prev_active;
        // Branch-free: whether a presynaptic cell was active is unpredictable.
        let deltas = [-dec, inc];
        let mut any_dead = false;
        self.connections.update_permanences(seg, |presyn, p| {
            let np = p + deltas[usize::from(bit(prev_active, presyn))];
            any_dead |= np < EPSILON;
            np
        });
        if !any_dead {
            return;
        }
        self.connections
            .remove_synapses(seg, |_, s| s.permanence < EPSILON);
        if self.connections.synapses(seg).is_empty() {
            self.connections.destroy_segment(seg);
        }
    }

    /// New segment on `cell`, evicting the least recently used ones beyond the cap.
    fn create_segment(&mut self, cell: u32) -> SegmentId {
        while self.connections.segments_for_cell(cell).len()
            >= self.params.max_segments_per_cell as usize
        {
            let candidates = self.connections.segments_for_cell(cell);
            let mut lru = candidates[0];
            for &seg in &candidates[1..] {
                if self.last_used[seg as usize] < self.last_used[lru as usize] {
                    lru = seg;
                }
            }
            self.connections.destroy_segment(lru);
        }
        let cap = self.params.max_segments as usize;
        if cap > 0 && self.connections.num_segments() >= cap {
            self.evict_least_recently_used();
        }
        let seg = self.connections.create_segment(cell);
        let i = seg as usize;
        if i >= self.last_used.len() {
            self.last_used.resize(i + 1, 0);
        }
        self.last_used[i] = self.iteration;
        if cap > 0 {
            let entry = (self.iteration, self.connections.ordinal(seg), seg);
            self.scratch.lru.pending.push(entry);
        }
        seg
    }

    /// Destroys the least recently used segment (ties: the oldest) among those this step
    /// does not learn on: active and matching segments may still be adapted later in it.
    fn evict_least_recently_used(&mut self) {
        let conns = &self.connections;
        let last_used = &self.last_used;
        let activity = &self.scratch.activity;
        let (min_potential, min_connected) =
            (self.params.min_threshold, self.params.activation_threshold);
        let in_use = |seg: SegmentId| {
            activity.potential(seg) >= min_potential || activity.connected(seg) >= min_connected
        };
        let valid = |&(used, ordinal, seg): &LruEntry| {
            conns.is_alive(seg) && conns.ordinal(seg) == ordinal && last_used[seg as usize] == used
        };
        let lru = &mut self.scratch.lru;
        let mut victim = None;
        while let Some(entry) = lru.queue.pop_front() {
            if valid(&entry) {
                if in_use(entry.2) {
                    lru.spared.push(entry);
                } else {
                    victim = Some(entry.2);
                    break;
                }
            }
        }
        for entry in lru.spared.drain(..).rev() {
            lru.queue.push_front(entry);
        }
        if victim.is_none() {
            // Everything older is spared: look among this step's uses (creations).
            lru.pending.sort_unstable();
            victim = lru
                .pending
                .iter()
                .find(|e| valid(e) && !in_use(e.2))
                .map(|e| e.2);
        }
        #[cfg(test)]
        {
            // The queue must pick what a scan of every segment picks.
            let brute = (0..conns.segment_capacity() as SegmentId)
                .filter(|&seg| conns.is_alive(seg) && !in_use(seg))
                .min_by_key(|&seg| (last_used[seg as usize], conns.ordinal(seg)));
            assert_eq!(victim, brute, "LRU queue disagrees with a full scan");
        }
        if let Some(seg) = victim {
            self.connections.destroy_segment(seg);
        }
    }

    /// Grows up to `n_desired` synapses from previous winner cells not yet on `seg`, picked
    /// at random, first evicting the weakest synapses if the segment would overflow.
    fn grow_synapses(&mut self, seg: SegmentId, n_desired: usize) {
        let s = &mut self.scratch;
        s.candidates.clear();
        s.candidates.extend_from_slice(&s.prev_winners);
        for syn in self.connections.synapses(seg) {
            // Previous winners are previously active cells: the bit test skips most lookups.
            if bit(&s.prev_active, syn.presyn) {
                if let Ok(i) = s.candidates.binary_search(&syn.presyn) {
                    s.candidates.remove(i);
                }
            }
        }
        let n_actual = n_desired.min(s.candidates.len());
        let max = self.params.max_synapses_per_segment as usize;
        let existing = self.connections.synapses(seg).len();
        if existing + n_actual > max {
            self.destroy_min_permanence_synapses(seg, existing + n_actual - max);
        }
        let s = &mut self.scratch;
        let room = max.saturating_sub(self.connections.synapses(seg).len());
        for _ in 0..n_actual.min(room) {
            let i = self.rng.below(s.candidates.len() as u32) as usize;
            let presyn = s.candidates.remove(i);
            self.connections
                .add_synapse(seg, presyn, self.params.initial_permanence);
        }
    }

    /// Destroys the `n` weakest synapses of `seg` not from a previous winner cell, one at a
    /// time; ties (within EPSILON) go to the earlier synapse in segment order.
    fn destroy_min_permanence_synapses(&mut self, seg: SegmentId, n: usize) {
        let s = &mut self.scratch;
        // Permanences are read once: destroying synapses does not change the others.
        s.weakest.clear();
        for (i, syn) in self.connections.synapses(seg).iter().enumerate() {
            if s.prev_winners.binary_search(&syn.presyn).is_err() {
                s.weakest.push((i as u32, syn.permanence));
            }
        }
        s.doomed.clear();
        for _ in 0..n {
            if s.weakest.is_empty() {
                break;
            }
            let mut min_perm = f32::MAX;
            let mut min_i = 0;
            for (i, &(_, p)) in s.weakest.iter().enumerate() {
                if p < min_perm - EPSILON {
                    min_perm = p;
                    min_i = i;
                }
            }
            s.doomed.push(s.weakest.remove(min_i).0);
        }
        s.doomed.sort_unstable();
        let doomed = &s.doomed;
        self.connections
            .remove_synapses(seg, |i, _| doomed.binary_search(&(i as u32)).is_ok());
    }

    /// NuPIC `activateDendrites`: segment activity for the new active cells, giving the
    /// active (predictive) and matching segments, and the predictions for the next step.
    fn activate_dendrites(&mut self, learn: bool) {
        self.compute_segment_activity();
        if learn {
            for &seg in &self.active_segments {
                self.last_used[seg as usize] = self.iteration;
            }
            if self.params.max_segments > 0 {
                self.record_uses();
            }
            self.iteration += 1;
        }
    }

    /// Appends this step's uses (creations and active segments) to the LRU queue.
    fn record_uses(&mut self) {
        let conns = &self.connections;
        let lru = &mut self.scratch.lru;
        let now = self.iteration;
        lru.pending.extend(
            self.active_segments
                .iter()
                .map(|&seg| (now, conns.ordinal(seg), seg)),
        );
        lru.pending.sort_unstable();
        lru.queue.extend(lru.pending.drain(..));
        if lru.queue.len() > 2 * conns.num_segments() + 1024 {
            let last_used = &self.last_used;
            lru.queue.retain(|&(used, ordinal, seg)| {
                conns.is_alive(seg)
                    && conns.ordinal(seg) == ordinal
                    && last_used[seg as usize] == used
            });
        }
    }

    /// The side-effect-free part of `activate_dendrites`: counts, segment lists and
    /// predictions.
    fn compute_segment_activity(&mut self) {
        let s = &mut self.scratch;
        self.connections
            .compute_activity(&self.active_cells, &mut s.activity);
        self.active_segments.clear();
        self.matching_segments.clear();
        for &seg in s.activity.touched() {
            if s.activity.connected(seg) >= self.params.activation_threshold {
                self.active_segments.push(seg);
            }
            if s.activity.potential(seg) >= self.params.min_threshold {
                self.matching_segments.push(seg);
            }
        }
        let conns = &self.connections;
        sort_by_cell_and_age(&mut self.active_segments, conns, &mut s.keys);
        sort_by_cell_and_age(&mut self.matching_segments, conns, &mut s.keys);
        self.predictive_cells.clear();
        self.predicted_columns.clear();
        let cpc = self.params.cells_per_column;
        for &seg in &self.active_segments {
            let cell = conns.cell(seg);
            if self.predictive_cells.last() != Some(&cell) {
                self.predictive_cells.push(cell);
                if self.predicted_columns.last() != Some(&(cell / cpc)) {
                    self.predicted_columns.push(cell / cpc);
                }
            }
        }
    }
}

/// Sorts segments by (owner cell, creation order). The keys are packed once into integers
/// (cell, ordinal, id) so comparisons do not go back to the store.
fn sort_by_cell_and_age(segs: &mut [SegmentId], conns: &SegmentStore, keys: &mut Vec<u128>) {
    keys.clear();
    keys.extend(segs.iter().map(|&seg| {
        (u128::from(conns.cell(seg)) << 96)
            | (u128::from(conns.ordinal(seg)) << 32)
            | u128::from(seg)
    }));
    keys.sort_unstable();
    for (seg, &k) in segs.iter_mut().zip(keys.iter()) {
        *seg = k as u32;
    }
}

/// Fraction of `active` (sorted) columns missing from `predicted` (sorted); 0 if none active.
fn raw_anomaly(active: &[u32], predicted: &[u32]) -> f32 {
    if active.is_empty() {
        return 0.0;
    }
    let hit = crate::sdr::sorted_intersection_len(active, predicted);
    1.0 - hit as f32 / active.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` distinct SDRs of `w` columns each, pairwise disjoint, drawn from `[0, columns)`.
    fn disjoint_patterns(seed: u64, columns: u32, n: usize, w: usize) -> Vec<Vec<u32>> {
        let mut rng = Random::new(seed);
        let all: Vec<u32> = (0..columns).collect();
        let picked = rng.sample(&all, n * w);
        picked
            .chunks(w)
            .map(|c| {
                let mut v = c.to_vec();
                v.sort_unstable();
                v
            })
            .collect()
    }

    fn small_params() -> TemporalMemoryParams {
        TemporalMemoryParams {
            column_count: 512,
            cells_per_column: 8,
            ..TemporalMemoryParams::default()
        }
    }

    fn overlap(a: &[u32], b: &[u32]) -> usize {
        crate::sdr::sorted_intersection_len(a, b)
    }

    #[test]
    fn repeating_sequence_is_learned_and_a_novel_input_is_fully_anomalous() {
        let mut tm = TemporalMemory::new(TemporalMemoryParams::default()).unwrap();
        let pats = disjoint_patterns(1, 2048, 7, 40);
        let (seq, novel) = (&pats[..6], &pats[6]);
        // Sequences are separated by resets, as NuPIC trains them: without one, the cycle's
        // start keeps changing context and the memory keeps learning ever longer versions
        // of the loop (a burst every other pass), which is NuPIC behaviour too.
        let mut pass = Vec::new();
        for rep in 0..15 {
            tm.reset();
            pass.clear();
            for p in seq {
                pass.push(tm.compute(p, true));
            }
            if rep == 0 {
                // Nothing is predicted yet: every column bursts.
                assert!(pass.iter().all(|&a| a == 1.0), "{pass:?}");
                assert_eq!(tm.active_cells().len(), 40 * 32);
            }
        }
        // After a reset the first element cannot be predicted; every later one is.
        assert_eq!(pass[0], 1.0);
        let mean = pass[1..].iter().sum::<f32>() / 5.0;
        assert!(mean < 0.05, "anomaly after training {pass:?}");
        tm.reset();
        for (i, p) in seq.iter().enumerate() {
            tm.compute(p, true);
            if let Some(next) = seq.get(i + 1) {
                assert_eq!(tm.predicted_columns(), next.as_slice());
                assert_eq!(tm.predictive_cells().len(), 40);
                assert_eq!(tm.active_cells().len(), if i == 0 { 40 * 32 } else { 40 });
            }
        }
        // A transition never seen: nothing of it was predicted.
        tm.reset();
        tm.compute(&seq[0], true);
        assert_eq!(tm.compute(novel, true), 1.0);
        assert_eq!(tm.active_cells().len(), 40 * 32, "novel input bursts");
    }

    #[test]
    fn shared_subsequence_is_disambiguated_by_context() {
        // A B C D and X B C Y: after C the memory must predict D or Y depending on whether
        // the sequence started with A or X (high-order memory).
        // Early on, while B still bursts in both sequences, C and then Y learn on cells shared
        // by both contexts; a visible predicted-segment decrement lets those early segments
        // fade within a few dozen epochs (NAB's 0.001 needs hundreds).
        let params = TemporalMemoryParams {
            predicted_segment_decrement: 0.01,
            ..small_params()
        };
        let mut tm = TemporalMemory::new(params).unwrap();
        let p = disjoint_patterns(7, 512, 6, 20);
        let (a, b, c, d, x, y) = (&p[0], &p[1], &p[2], &p[3], &p[4], &p[5]);
        let seq1 = [a, b, c, d];
        let seq2 = [x, b, c, y];
        for _ in 0..40 {
            for seq in [&seq1, &seq2] {
                tm.reset();
                for s in seq.iter() {
                    tm.compute(s, true);
                }
            }
        }
        for (seq, want, other) in [(&seq1, d, y), (&seq2, y, d)] {
            tm.reset();
            for s in &seq[..3] {
                tm.compute(s, false);
            }
            let pred = tm.predicted_columns();
            assert_eq!(
                overlap(pred, want),
                want.len(),
                "expected continuation predicted"
            );
            assert_eq!(
                overlap(pred, other),
                0,
                "other context's continuation predicted"
            );
            assert_eq!(tm.compute(want, false), 0.0);
        }
    }

    #[test]
    fn segment_and_synapse_caps_are_never_exceeded() {
        let params = TemporalMemoryParams {
            column_count: 64,
            cells_per_column: 2,
            activation_threshold: 3,
            min_threshold: 2,
            max_new_synapse_count: 6,
            max_segments_per_cell: 2,
            max_synapses_per_segment: 8,
            ..TemporalMemoryParams::default()
        };
        let mut tm = TemporalMemory::new(params).unwrap();
        let mut rng = Random::new(3);
        let all: Vec<u32> = (0..64).collect();
        let mut seen_full_cell = false;
        let mut seen_full_segment = false;
        for step in 0..600 {
            let mut cols = rng.sample(&all, 6);
            cols.sort_unstable();
            tm.compute(&cols, true);
            let c = tm.connections();
            for cell in 0..128 {
                let segs = c.segments_for_cell(cell);
                assert!(
                    segs.len() <= 2,
                    "step {step}: cell {cell} has {}",
                    segs.len()
                );
                seen_full_cell |= segs.len() == 2;
                for &seg in segs {
                    let n = c.synapses(seg).len();
                    assert!(
                        (1..=8).contains(&n),
                        "step {step}: segment with {n} synapses"
                    );
                    seen_full_segment |= n == 8;
                }
            }
        }
        assert!(seen_full_cell && seen_full_segment, "caps never reached");
    }

    #[test]
    fn inference_does_not_change_connections() {
        let mut tm = TemporalMemory::new(small_params()).unwrap();
        let pats = disjoint_patterns(5, 512, 8, 20);
        for _ in 0..10 {
            for p in &pats[..5] {
                tm.compute(p, true);
            }
        }
        let conns = tm.connections().clone();
        let (iteration, last_used) = (tm.iteration, tm.last_used.clone());
        // Predicted, bursting-with-match and novel inputs alike.
        for p in pats.iter().chain(pats.iter().rev()) {
            tm.compute(p, false);
        }
        assert_eq!(tm.connections(), &conns);
        assert_eq!((tm.iteration, &tm.last_used), (iteration, &last_used));
    }

    #[test]
    fn wrong_predictions_are_punished_and_dead_synapses_removed() {
        let params = TemporalMemoryParams {
            predicted_segment_decrement: 0.3,
            ..small_params()
        };
        let mut tm = TemporalMemory::new(params).unwrap();
        let p = disjoint_patterns(9, 512, 3, 20);
        learn_pair(&mut tm, &p[0], &p[1], 12);
        tm.reset();
        tm.compute(&p[0], true);
        assert_eq!(tm.predicted_columns(), p[1].as_slice());
        let predicting: Vec<SegmentId> = tm.active_segments().to_vec();
        let perm_before: f32 = predicting
            .iter()
            .flat_map(|&s| tm.connections().synapses(s).to_vec())
            .map(|syn| syn.permanence)
            .sum();
        // p[2] arrives instead of the predicted p[1]: the predicting segments are punished.
        tm.compute(&p[2], true);
        let c = tm.connections();
        let perm_after: f32 = predicting
            .iter()
            .filter(|&&s| c.is_alive(s))
            .flat_map(|&s| c.synapses(s).to_vec())
            .map(|syn| syn.permanence)
            .sum();
        assert!(
            perm_after < perm_before - 1.0,
            "{perm_before} -> {perm_after}"
        );
        // Repeated punishment drives synapses to 0: they and their segments disappear.
        learn_pair(&mut tm, &p[0], &p[2], 4);
        tm.reset();
        tm.compute(&p[0], false);
        assert!(tm.predicted_columns().is_empty(), "p[1] still predicted");
        let c = tm.connections();
        for &col in &p[1] {
            for cell in col * 8..col * 8 + 8 {
                assert!(
                    c.segments_for_cell(cell).is_empty(),
                    "segment left on {cell}"
                );
            }
        }
        for cell in 0..c.num_cells() as u32 {
            for &seg in c.segments_for_cell(cell) {
                assert!(!c.synapses(seg).is_empty());
                for syn in c.synapses(seg) {
                    assert!(syn.permanence >= EPSILON);
                }
            }
        }
    }

    #[test]
    fn anomaly_score_edge_cases() {
        let mut tm = TemporalMemory::new(small_params()).unwrap();
        assert_eq!(tm.compute(&[], true), 0.0);
        assert_eq!(tm.compute(&[1, 2, 3], true), 1.0);
        let p = disjoint_patterns(4, 512, 2, 20);
        learn_pair(&mut tm, &p[0], &p[1], 15);
        tm.reset();
        tm.compute(&p[0], true);
        // Half of the input predicted.
        let mut half: Vec<u32> = p[1][..10].iter().chain(&p[0][..10]).copied().collect();
        half.sort_unstable();
        assert_eq!(tm.compute(&half, false), 0.5);
        tm.reset();
        assert!(tm.predicted_columns().is_empty());
        assert_eq!(tm.compute(&p[1], false), 1.0);
    }

    /// Learns the transition `a` → `b`, `times` times, each after a reset.
    fn learn_pair(tm: &mut TemporalMemory, a: &[u32], b: &[u32], times: usize) {
        for _ in 0..times {
            tm.reset();
            tm.compute(a, true);
            tm.compute(b, true);
        }
    }

    /// Serialises and restores (rebuilding derived state); returns the bytes and the copy.
    fn round_trip(tm: &TemporalMemory) -> (Vec<u8>, TemporalMemory) {
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(tm, cfg).unwrap();
        let (mut back, _): (TemporalMemory, _) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        back.rebuild_after_restore();
        (bytes, back)
    }

    fn step_all(tms: &mut [&mut TemporalMemory], cols: &[u32], learn: bool) {
        let results: Vec<(f32, Vec<u32>, Vec<u32>)> = tms
            .iter_mut()
            .map(|tm| {
                let a = tm.compute(cols, learn);
                (
                    a,
                    tm.active_cells().to_vec(),
                    tm.predictive_cells().to_vec(),
                )
            })
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn serde_round_trip_continues_bit_identically() {
        let params = TemporalMemoryParams {
            max_segments_per_cell: 3,
            max_synapses_per_segment: 24,
            ..small_params()
        };
        let mut tm = TemporalMemory::new(params).unwrap();
        let pats = disjoint_patterns(8, 512, 20, 20);
        let mut rng = Random::new(8);
        let mut next = move || pats[rng.below(20) as usize].clone();
        for _ in 0..300 {
            tm.compute(&next(), true);
        }
        let (bytes, mut back) = round_trip(&tm);
        assert_eq!(back, tm);
        let cfg = bincode::config::standard();
        let (mut lazy, _): (TemporalMemory, _) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        for step in 0..300 {
            step_all(&mut [&mut tm, &mut back, &mut lazy], &next(), step % 7 != 6);
        }
        assert_eq!(tm, back);
        assert_eq!(
            bincode::serde::encode_to_vec(&tm, cfg).unwrap(),
            bincode::serde::encode_to_vec(&back, cfg).unwrap()
        );
    }

    #[test]
    fn global_segment_cap_holds_and_forgets_the_least_recently_used() {
        let params = TemporalMemoryParams {
            max_segments: 60,
            ..small_params()
        };
        let mut tm = TemporalMemory::new(params).unwrap();
        let pats = disjoint_patterns(21, 512, 24, 20);
        // An old sequence, learned first …
        learn_pair(&mut tm, &pats[0], &pats[1], 10);
        tm.reset();
        tm.compute(&pats[0], false);
        assert_eq!(tm.predicted_columns(), pats[1].as_slice());
        // … then many other transitions, enough to need more segments than the cap.
        let mut rng = Random::new(2);
        let mut peak = 0;
        for _ in 0..600 {
            let i = 2 + rng.below(22) as usize;
            tm.compute(&pats[i], true);
            peak = peak.max(tm.connections().num_segments());
        }
        assert_eq!(peak, 60, "cap reached and never exceeded");
        // The old transition was evicted; a recent one survives.
        tm.reset();
        tm.compute(&pats[0], false);
        assert!(
            tm.predicted_columns().is_empty(),
            "old sequence still predicted"
        );
        let recent = tm.active_cells().to_vec();
        assert!(!recent.is_empty());
    }

    #[test]
    fn capped_memory_round_trip_continues_bit_identically() {
        let params = TemporalMemoryParams {
            max_segments: 40,
            ..small_params()
        };
        let mut tm = TemporalMemory::new(params).unwrap();
        let pats = disjoint_patterns(3, 512, 16, 20);
        let mut rng = Random::new(4);
        let mut next = move || pats[rng.below(16) as usize].clone();
        for _ in 0..200 {
            tm.compute(&next(), true);
        }
        let (_, mut back) = round_trip(&tm);
        assert_eq!(back, tm);
        for step in 0..300 {
            step_all(&mut [&mut tm, &mut back], &next(), step % 9 != 8);
            assert!(tm.connections().num_segments() <= 40);
        }
        assert_eq!(tm, back);
    }

    #[test]
    fn same_seed_same_history_same_state() {
        let pats = disjoint_patterns(2, 512, 10, 20);
        let run = |seed| {
            let mut tm = TemporalMemory::new(TemporalMemoryParams {
                seed,
                ..small_params()
            })
            .unwrap();
            for i in 0..200 {
                tm.compute(&pats[(i * 7) % 10], true);
            }
            tm
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1).connections(), run(2).connections());
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        let d = TemporalMemoryParams::default;
        let cases = [
            (
                "column_count",
                TemporalMemoryParams {
                    column_count: 0,
                    ..d()
                },
            ),
            (
                "cells_per_column",
                TemporalMemoryParams {
                    cells_per_column: 0,
                    ..d()
                },
            ),
            (
                "cells_per_column",
                TemporalMemoryParams {
                    column_count: 1 << 20,
                    cells_per_column: 1 << 13,
                    ..d()
                },
            ),
            (
                "activation_threshold",
                TemporalMemoryParams {
                    activation_threshold: 0,
                    ..d()
                },
            ),
            (
                "min_threshold",
                TemporalMemoryParams {
                    min_threshold: 0,
                    ..d()
                },
            ),
            (
                "max_segments_per_cell",
                TemporalMemoryParams {
                    max_segments_per_cell: 0,
                    ..d()
                },
            ),
            (
                "connected_permanence",
                TemporalMemoryParams {
                    connected_permanence: 1.5,
                    ..d()
                },
            ),
            (
                "permanence_decrement",
                TemporalMemoryParams {
                    permanence_decrement: -0.1,
                    ..d()
                },
            ),
            (
                "initial_permanence",
                TemporalMemoryParams {
                    initial_permanence: f32::NAN,
                    ..d()
                },
            ),
        ];
        for (name, p) in cases {
            let err = TemporalMemory::new(p).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}
