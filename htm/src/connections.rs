//! The synapse/segment store shared by the spatial pooler and both temporal memories.
//!
//! Segments and synapses live in flat slabs addressed by `u32` ids that stay stable for
//! their lifetime (freed ids are reused), so algorithms can keep per-segment metadata in
//! their own parallel vectors. An optional presynaptic index (presynaptic bit → synapses)
//! turns "which segments does this activity drive" into counter increments, as htm.core does.

use serde::{Deserialize, Serialize};

/// Index of a segment in [`Connections`].
pub type SegmentId = u32;
/// Index of a synapse in [`Connections`].
pub type SynapseId = u32;

/// One synapse: its presynaptic bit (input bit or cell), owning segment and permanence.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Synapse {
    pub presyn: u32,
    pub segment: SegmentId,
    pub permanence: f32,
}

/// One dendrite segment: its owner cell (or column) and its synapses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub cell: u32,
    pub synapses: Vec<SynapseId>,
    pub alive: bool,
}

/// Segment/synapse store. `num_presyn` is the size of the presynaptic space.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Connections {
    num_cells: u32,
    num_presyn: u32,
    cell_segments: Vec<Vec<SegmentId>>,
    segments: Vec<Segment>,
    free_segments: Vec<SegmentId>,
    synapses: Vec<Synapse>,
    free_synapses: Vec<SynapseId>,
    indexed: bool,
    /// presynaptic bit → synapses from it. Derived data: not serialised, rebuilt on load.
    #[serde(skip)]
    presyn_index: Vec<Vec<SynapseId>>,
}

/// Equality of content; the derived presynaptic index is left out because its order
/// depends on deletion history, not on what is stored.
impl PartialEq for Connections {
    fn eq(&self, other: &Self) -> bool {
        self.num_cells == other.num_cells
            && self.num_presyn == other.num_presyn
            && self.cell_segments == other.cell_segments
            && self.segments == other.segments
            && self.free_segments == other.free_segments
            && self.synapses == other.synapses
            && self.free_synapses == other.free_synapses
            && self.indexed == other.indexed
    }
}

impl Connections {
    /// An empty store for `num_cells` owner cells and a presynaptic space of `num_presyn`.
    /// With `indexed`, [`Connections::compute_activity`] is available.
    pub fn new(num_cells: usize, num_presyn: usize, indexed: bool) -> Self {
        Connections {
            num_cells: num_cells as u32,
            num_presyn: num_presyn as u32,
            cell_segments: vec![Vec::new(); num_cells],
            segments: Vec::new(),
            free_segments: Vec::new(),
            synapses: Vec::new(),
            free_synapses: Vec::new(),
            indexed,
            presyn_index: if indexed {
                vec![Vec::new(); num_presyn]
            } else {
                Vec::new()
            },
        }
    }

    /// Rebuilds derived data after deserialisation. Idempotent.
    pub fn rebuild_index(&mut self) {
        if !self.indexed {
            return;
        }
        self.presyn_index = vec![Vec::new(); self.num_presyn as usize];
        for seg in self.segments.iter().filter(|s| s.alive) {
            for &syn in &seg.synapses {
                self.presyn_index[self.synapses[syn as usize].presyn as usize].push(syn);
            }
        }
    }

    pub fn num_cells(&self) -> usize {
        self.num_cells as usize
    }

    pub fn num_presyn(&self) -> usize {
        self.num_presyn as usize
    }

    /// Upper bound (exclusive) of segment ids: size per-segment scratch vectors with it.
    pub fn segment_capacity(&self) -> usize {
        self.segments.len()
    }

    /// Live segments.
    pub fn num_segments(&self) -> usize {
        self.segments.len() - self.free_segments.len()
    }

    /// Live synapses.
    pub fn num_synapses(&self) -> usize {
        self.synapses.len() - self.free_synapses.len()
    }

    /// Segments owned by `cell`, in creation order.
    pub fn segments_for_cell(&self, cell: u32) -> &[SegmentId] {
        &self.cell_segments[cell as usize]
    }

    pub fn segment(&self, seg: SegmentId) -> &Segment {
        &self.segments[seg as usize]
    }

    pub fn synapse(&self, syn: SynapseId) -> &Synapse {
        &self.synapses[syn as usize]
    }

    /// Synapse ids of `seg`, in creation order.
    pub fn synapses_for_segment(&self, seg: SegmentId) -> &[SynapseId] {
        &self.segments[seg as usize].synapses
    }

    /// Creates an empty segment on `cell`, reusing a freed id if there is one.
    pub fn create_segment(&mut self, cell: u32) -> SegmentId {
        debug_assert!(cell < self.num_cells);
        let seg = match self.free_segments.pop() {
            Some(id) => {
                self.segments[id as usize] = Segment {
                    cell,
                    synapses: Vec::new(),
                    alive: true,
                };
                id
            }
            None => {
                self.segments.push(Segment {
                    cell,
                    synapses: Vec::new(),
                    alive: true,
                });
                (self.segments.len() - 1) as SegmentId
            }
        };
        self.cell_segments[cell as usize].push(seg);
        seg
    }

    /// Destroys `seg` and all its synapses.
    pub fn destroy_segment(&mut self, seg: SegmentId) {
        let synapses = std::mem::take(&mut self.segments[seg as usize].synapses);
        for syn in synapses {
            self.unlink_synapse(syn);
        }
        let cell = self.segments[seg as usize].cell;
        let list = &mut self.cell_segments[cell as usize];
        let pos = list
            .iter()
            .position(|&s| s == seg)
            .expect("segment listed on its cell");
        list.remove(pos); // keeps creation order, which algorithms iterate in
        self.segments[seg as usize].alive = false;
        self.free_segments.push(seg);
    }

    /// Adds a synapse from `presyn` to `seg`.
    pub fn create_synapse(&mut self, seg: SegmentId, presyn: u32, permanence: f32) -> SynapseId {
        debug_assert!(presyn < self.num_presyn);
        let data = Synapse {
            presyn,
            segment: seg,
            permanence: permanence.clamp(0.0, 1.0),
        };
        let syn = match self.free_synapses.pop() {
            Some(id) => {
                self.synapses[id as usize] = data;
                id
            }
            None => {
                self.synapses.push(data);
                (self.synapses.len() - 1) as SynapseId
            }
        };
        self.segments[seg as usize].synapses.push(syn);
        if self.indexed {
            self.presyn_index[presyn as usize].push(syn);
        }
        syn
    }

    /// Removes one synapse from its segment.
    pub fn destroy_synapse(&mut self, syn: SynapseId) {
        let seg = self.synapses[syn as usize].segment;
        let list = &mut self.segments[seg as usize].synapses;
        let pos = list
            .iter()
            .position(|&s| s == syn)
            .expect("synapse listed on its segment");
        list.remove(pos);
        self.unlink_synapse(syn);
    }

    fn unlink_synapse(&mut self, syn: SynapseId) {
        if self.indexed {
            let presyn = self.synapses[syn as usize].presyn as usize;
            let list = &mut self.presyn_index[presyn];
            let pos = list
                .iter()
                .position(|&s| s == syn)
                .expect("synapse in presyn index");
            list.swap_remove(pos); // order is irrelevant: the index is only counted
        }
        self.free_synapses.push(syn);
    }

    /// Sets a synapse's permanence, clamped to `[0, 1]`.
    pub fn set_permanence(&mut self, syn: SynapseId, permanence: f32) {
        self.synapses[syn as usize].permanence = permanence.clamp(0.0, 1.0);
    }

    /// For every segment, counts synapses from `active_presyn` with permanence
    /// `>= connected_threshold` (`connected`) and with any permanence (`potential`).
    /// Both vectors are resized to [`Connections::segment_capacity`] and zeroed first.
    pub fn compute_activity(
        &self,
        active_presyn: &[u32],
        connected_threshold: f32,
        connected: &mut Vec<u32>,
        potential: &mut Vec<u32>,
    ) {
        assert!(self.indexed, "compute_activity needs an indexed store");
        connected.clear();
        connected.resize(self.segments.len(), 0);
        potential.clear();
        potential.resize(self.segments.len(), 0);
        for &p in active_presyn {
            for &syn in &self.presyn_index[p as usize] {
                let s = &self.synapses[syn as usize];
                potential[s.segment as usize] += 1;
                if s.permanence >= connected_threshold {
                    connected[s.segment as usize] += 1;
                }
            }
        }
    }

    /// Rewrites the permanence of every synapse on `seg`, in the segment's synapse order:
    /// `update(presyn, old)` returns the new permanence, stored clamped to `[0, 1]`.
    ///
    /// One call per segment lets learning rules run as a tight loop instead of a
    /// lookup-and-store per synapse.
    pub fn update_permanences<F: FnMut(u32, f32) -> f32>(&mut self, seg: SegmentId, mut update: F) {
        let synapses = &mut self.synapses;
        let ids = &self.segments[seg as usize].synapses;
        for &syn in ids.iter().take(PREFETCH_AHEAD) {
            prefetch(&synapses[syn as usize]);
        }
        for (i, &syn) in ids.iter().enumerate() {
            if let Some(&ahead) = ids.get(i + PREFETCH_AHEAD) {
                prefetch(&synapses[ahead as usize]);
            }
            let s = &mut synapses[syn as usize];
            s.permanence = update(s.presyn, s.permanence).clamp(0.0, 1.0);
        }
    }

    /// Same counts as [`Connections::compute_activity`], but work is proportional to the
    /// synapses of `active_presyn` instead of to the number of segments.
    ///
    /// The three buffers must be passed back unchanged on every call: entries listed in
    /// `touched` by the previous call are zeroed first, then `touched` is refilled with
    /// the segments reached this time (in discovery order, each once). On return
    /// `connected`/`potential` hold the counts for every segment id below
    /// [`Connections::segment_capacity`] (zero for segments not in `touched`).
    pub fn compute_activity_sparse(
        &self,
        active_presyn: &[u32],
        connected_threshold: f32,
        connected: &mut Vec<u32>,
        potential: &mut Vec<u32>,
        touched: &mut Vec<SegmentId>,
    ) {
        self.compute_activity_sparse_with(
            active_presyn,
            connected_threshold,
            connected,
            potential,
            touched,
            |_, _| {},
        );
    }

    /// [`Connections::compute_activity_sparse`] that also reports every synapse it counts
    /// as `visit(segment, synapse)`, in traversal order (which depends on the index's
    /// history: treat it as unordered).
    pub fn compute_activity_sparse_with<V: FnMut(SegmentId, SynapseId)>(
        &self,
        active_presyn: &[u32],
        connected_threshold: f32,
        connected: &mut Vec<u32>,
        potential: &mut Vec<u32>,
        touched: &mut Vec<SegmentId>,
        mut visit: V,
    ) {
        assert!(
            self.indexed,
            "compute_activity_sparse needs an indexed store"
        );
        for &seg in touched.iter() {
            if let Some(c) = connected.get_mut(seg as usize) {
                *c = 0;
            }
            if let Some(p) = potential.get_mut(seg as usize) {
                *p = 0;
            }
        }
        touched.clear();
        connected.resize(self.segments.len(), 0);
        potential.resize(self.segments.len(), 0);
        // Each step is three dependent loads into large arrays (list header, list, synapse),
        // which mostly miss the cache: prefetching them ahead of use lets the misses overlap.
        for (i, &p) in active_presyn.iter().enumerate() {
            if let Some(&later) = active_presyn.get(i + 2) {
                prefetch(&self.presyn_index[later as usize]);
            }
            if let Some(&next) = active_presyn.get(i + 1) {
                if let Some(first) = self.presyn_index[next as usize].first() {
                    prefetch(first);
                }
            }
            let list = &self.presyn_index[p as usize];
            for &syn in list.iter().take(PREFETCH_AHEAD) {
                prefetch(&self.synapses[syn as usize]);
            }
            for (j, &syn) in list.iter().enumerate() {
                if let Some(&ahead) = list.get(j + PREFETCH_AHEAD) {
                    prefetch(&self.synapses[ahead as usize]);
                }
                let s = &self.synapses[syn as usize];
                let seg = s.segment as usize;
                if potential[seg] == 0 {
                    touched.push(s.segment);
                }
                potential[seg] += 1;
                connected[seg] += u32::from(s.permanence >= connected_threshold);
                visit(s.segment, syn);
            }
        }
    }

    /// Heap bytes held by the store (capacity-based), for memory reporting.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let vecs = |v: &Vec<Vec<u32>>| {
            v.capacity() * size_of::<Vec<u32>>() + v.iter().map(|x| x.capacity() * 4).sum::<usize>()
        };
        vecs(&self.cell_segments)
            + vecs(&self.presyn_index)
            + self.segments.capacity() * size_of::<Segment>()
            + self
                .segments
                .iter()
                .map(|s| s.synapses.capacity() * 4)
                .sum::<usize>()
            + self.synapses.capacity() * size_of::<Synapse>()
            + (self.free_segments.capacity() + self.free_synapses.capacity()) * 4
    }
}

/// How many synapses ahead scattered synapse walks prefetch.
const PREFETCH_AHEAD: usize = 8;

/// Asks the CPU to start loading the cache line holding `value`; a pure performance hint.
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and has no architectural effect; the pointer comes
    // from a live reference anyway.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_counts_connected_and_potential() {
        let mut c = Connections::new(4, 10, true);
        let s0 = c.create_segment(1);
        c.create_synapse(s0, 2, 0.6);
        c.create_synapse(s0, 3, 0.1);
        let s1 = c.create_segment(3);
        c.create_synapse(s1, 3, 0.5);
        let (mut con, mut pot) = (Vec::new(), Vec::new());
        c.compute_activity(&[2, 3, 9], 0.5, &mut con, &mut pot);
        assert_eq!(con, vec![1, 1]);
        assert_eq!(pot, vec![2, 1]);
    }

    #[test]
    fn destroyed_ids_are_reused_and_unindexed() {
        let mut c = Connections::new(2, 4, true);
        let s0 = c.create_segment(0);
        let syn = c.create_synapse(s0, 1, 0.9);
        c.create_synapse(s0, 2, 0.9);
        c.destroy_synapse(syn);
        assert_eq!(c.num_synapses(), 1);
        c.destroy_segment(s0);
        assert_eq!((c.num_segments(), c.num_synapses()), (0, 0));
        assert!(c.segments_for_cell(0).is_empty());
        let s1 = c.create_segment(1);
        assert_eq!(s1, s0);
        let (mut con, mut pot) = (Vec::new(), Vec::new());
        c.compute_activity(&[1, 2], 0.5, &mut con, &mut pot);
        assert_eq!(pot, vec![0]);
    }

    #[test]
    fn sparse_activity_matches_dense_and_resets_between_calls() {
        let mut c = Connections::new(3, 6, true);
        let s0 = c.create_segment(0);
        c.create_synapse(s0, 1, 0.6);
        c.create_synapse(s0, 2, 0.2);
        let s1 = c.create_segment(2);
        c.create_synapse(s1, 2, 0.7);
        c.create_synapse(s1, 5, 0.7);
        let (mut con, mut pot, mut touched) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dcon, mut dpot) = (Vec::new(), Vec::new());
        for active in [&[1u32, 2][..], &[5], &[0, 3], &[1, 2, 5]] {
            c.compute_activity_sparse(active, 0.5, &mut con, &mut pot, &mut touched);
            c.compute_activity(active, 0.5, &mut dcon, &mut dpot);
            assert_eq!((&con, &pot), (&dcon, &dpot), "active {active:?}");
            let mut expect: Vec<u32> = (0..2).filter(|&s| dpot[s as usize] > 0).collect();
            touched.sort_unstable();
            expect.sort_unstable();
            assert_eq!(touched, expect);
        }
    }

    #[test]
    fn update_permanences_visits_segment_synapses_in_order_and_clamps() {
        let mut c = Connections::new(1, 4, false);
        let s = c.create_segment(0);
        let a = c.create_synapse(s, 3, 0.5);
        let b = c.create_synapse(s, 1, 0.95);
        let mut seen = Vec::new();
        c.update_permanences(s, |presyn, p| {
            seen.push(presyn);
            p + 0.1
        });
        assert_eq!(seen, vec![3, 1]);
        assert!((c.synapse(a).permanence - 0.6).abs() < 1e-6);
        assert_eq!(c.synapse(b).permanence, 1.0);
    }

    #[test]
    fn index_is_rebuilt_after_serde_round_trip() {
        let mut c = Connections::new(2, 4, true);
        let s = c.create_segment(0);
        c.create_synapse(s, 3, 0.7);
        let bytes = bincode::serde::encode_to_vec(&c, bincode::config::standard()).unwrap();
        let (mut back, _): (Connections, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        back.rebuild_index();
        assert_eq!(back, c);
        let (mut con, mut pot) = (Vec::new(), Vec::new());
        back.compute_activity(&[3], 0.5, &mut con, &mut pot);
        assert_eq!(con, vec![1]);
    }
}
