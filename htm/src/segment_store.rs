//! Compact segment/synapse store of the temporal memory.
//!
//! Each segment keeps its synapses in one contiguous array of (presynaptic cell, permanence)
//! records in creation order, so learning walks stream through memory instead of chasing
//! synapse ids. A presynaptic index maps every cell to one 4-byte entry per synapse from it —
//! the owning segment and whether the synapse is connected — so counting the active
//! synapses of every segment reads only those entries, sequentially, and never the synapses.
//! The index and the per-cell segment lists are derived: they are not serialised but rebuilt
//! on load. Lists are allocated only for keys in use, so memory follows what was learned,
//! not the number of cells.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Index of a segment in a [`SegmentStore`]; stable for the segment's lifetime (freed ids
/// are reused).
pub type SegmentId = u32;

/// One synapse of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Syn {
    /// Presynaptic cell.
    pub presyn: u32,
    pub permanence: f32,
}

/// Marks a free segment slot.
const DEAD: u32 = u32::MAX;
const NONE: u32 = u32::MAX;
/// Keys per group of [`SparseLists`].
const GROUP: usize = 32;
/// Synapses per segment are capped so that activity counts fit in 16 bits.
pub const MAX_SYNAPSES_PER_SEGMENT: usize = u16::MAX as usize;

/// Ordered lists of `u32` keyed by `0..n`, holding memory only for the keys in use: a
/// handle table per group of 32 keys, allocated when one of them gets a list.
#[derive(Clone, Debug, Default)]
struct SparseLists {
    group_of: Vec<u32>,
    groups: Vec<[u32; GROUP]>,
    lists: Vec<Vec<u32>>,
    free: Vec<u32>,
}

impl SparseLists {
    fn new(n: usize) -> Self {
        SparseLists {
            group_of: vec![NONE; n.div_ceil(GROUP)],
            ..Default::default()
        }
    }

    fn handle(&self, key: u32) -> u32 {
        match self.group_of[key as usize / GROUP] {
            NONE => NONE,
            g => self.groups[g as usize][key as usize % GROUP],
        }
    }

    #[inline]
    fn get(&self, key: u32) -> &[u32] {
        match self.handle(key) {
            NONE => &[],
            h => &self.lists[h as usize],
        }
    }

    fn get_mut(&mut self, key: u32) -> &mut Vec<u32> {
        let gi = key as usize / GROUP;
        if self.group_of[gi] == NONE {
            self.group_of[gi] = self.groups.len() as u32;
            self.groups.push([NONE; GROUP]);
        }
        let slot = &mut self.groups[self.group_of[gi] as usize][key as usize % GROUP];
        if *slot == NONE {
            *slot = match self.free.pop() {
                Some(h) => h,
                None => {
                    self.lists.push(Vec::new());
                    (self.lists.len() - 1) as u32
                }
            };
        }
        &mut self.lists[*slot as usize]
    }

    /// Gives back the allocation of `key`'s list once it is empty.
    fn release_if_empty(&mut self, key: u32) {
        let g = self.group_of[key as usize / GROUP];
        let slot = &mut self.groups[g as usize][key as usize % GROUP];
        if self.lists[*slot as usize].is_empty() {
            self.lists[*slot as usize] = Vec::new();
            self.free.push(*slot);
            *slot = NONE;
        }
    }

    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        4 * (self.group_of.capacity() + self.free.capacity())
            + self.groups.capacity() * size_of::<[u32; GROUP]>()
            + self.lists.capacity() * size_of::<Vec<u32>>()
            + self.lists.iter().map(|l| 4 * l.capacity()).sum::<usize>()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Segment {
    /// Owner cell, or [`DEAD`] for a free slot.
    cell: u32,
    /// Creation order over the whole store (ids are reused, ordinals are not).
    ordinal: u64,
    syns: Vec<Syn>,
}

/// Per-segment counts of active synapses, filled by [`SegmentStore::compute_activity`].
/// Keep one and pass it back each time: only the segments reached last time are reset.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    /// Active potential synapses in the low 16 bits, active connected ones in the high 16.
    counts: Vec<u32>,
    touched: Vec<SegmentId>,
}

impl Activity {
    /// Active synapses of `seg` (any permanence).
    #[inline]
    pub fn potential(&self, seg: SegmentId) -> u32 {
        self.counts.get(seg as usize).map_or(0, |c| c & 0xFFFF)
    }

    /// Active connected synapses of `seg`.
    #[inline]
    pub fn connected(&self, seg: SegmentId) -> u32 {
        self.counts.get(seg as usize).map_or(0, |c| c >> 16)
    }

    /// Segments with at least one active synapse, in no particular order.
    pub fn touched(&self) -> &[SegmentId] {
        &self.touched
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        4 * (self.counts.capacity() + self.touched.capacity())
    }
}

/// The store. See the module docs.
#[derive(Clone, Debug)]
pub struct SegmentStore {
    num_cells: u32,
    num_presyn: u32,
    /// Permanence at and above which a synapse counts as connected.
    connected: f32,
    segments: Vec<Segment>,
    free_segments: Vec<SegmentId>,
    next_ordinal: u64,
    num_synapses: usize,
    /// Derived: per cell, its segments in creation order.
    cell_segments: SparseLists,
    /// Derived: per presynaptic cell, `segment << 1 | connected` for each synapse from it.
    index: SparseLists,
}

/// Content equality; derived lists are left out (the index order depends on history).
impl PartialEq for SegmentStore {
    fn eq(&self, other: &Self) -> bool {
        self.num_cells == other.num_cells
            && self.num_presyn == other.num_presyn
            && self.connected.to_bits() == other.connected.to_bits()
            && self.segments == other.segments
            && self.free_segments == other.free_segments
            && self.next_ordinal == other.next_ordinal
    }
}

#[inline]
fn entry(seg: SegmentId, connected: bool) -> u32 {
    seg << 1 | u32::from(connected)
}

impl SegmentStore {
    /// An empty store for `num_cells` owner cells and presynaptic cells `0..num_presyn`;
    /// synapses with permanence `>= connected_threshold` count as connected.
    pub fn new(num_cells: usize, num_presyn: usize, connected_threshold: f32) -> Self {
        assert!(
            num_cells < DEAD as usize && num_presyn <= u32::MAX as usize,
            "cell counts must fit in u32"
        );
        SegmentStore {
            num_cells: num_cells as u32,
            num_presyn: num_presyn as u32,
            connected: connected_threshold,
            segments: Vec::new(),
            free_segments: Vec::new(),
            next_ordinal: 0,
            num_synapses: 0,
            cell_segments: SparseLists::new(num_cells),
            index: SparseLists::new(num_presyn),
        }
    }

    /// Number of owner cells.
    pub fn num_cells(&self) -> usize {
        self.num_cells as usize
    }

    /// Size of the presynaptic space.
    pub fn num_presyn(&self) -> usize {
        self.num_presyn as usize
    }

    /// The connected threshold the store was built with.
    pub fn connected_threshold(&self) -> f32 {
        self.connected
    }

    /// Upper bound (exclusive) of segment ids: size per-segment vectors with it.
    pub fn segment_capacity(&self) -> usize {
        self.segments.len()
    }

    /// Live segments.
    pub fn num_segments(&self) -> usize {
        self.segments.len() - self.free_segments.len()
    }

    /// Live synapses.
    pub fn num_synapses(&self) -> usize {
        self.num_synapses
    }

    /// Segments owned by `cell`, in creation order.
    pub fn segments_for_cell(&self, cell: u32) -> &[SegmentId] {
        self.cell_segments.get(cell)
    }

    /// Owner cell of a live segment.
    #[inline]
    pub fn cell(&self, seg: SegmentId) -> u32 {
        self.segments[seg as usize].cell
    }

    /// Creation ordinal of a live segment (increasing over the store's life).
    #[inline]
    pub fn ordinal(&self, seg: SegmentId) -> u64 {
        self.segments[seg as usize].ordinal
    }

    /// Whether `seg` is a live segment.
    pub fn is_alive(&self, seg: SegmentId) -> bool {
        self.segments
            .get(seg as usize)
            .is_some_and(|s| s.cell != DEAD)
    }

    /// Synapses of `seg`, in creation order.
    #[inline]
    pub fn synapses(&self, seg: SegmentId) -> &[Syn] {
        &self.segments[seg as usize].syns
    }

    /// Creates an empty segment on `cell`, reusing a freed id if there is one.
    pub fn create_segment(&mut self, cell: u32) -> SegmentId {
        assert!(cell < self.num_cells, "cell {cell} out of range");
        let data = Segment {
            cell,
            ordinal: self.next_ordinal,
            syns: Vec::new(),
        };
        self.next_ordinal += 1;
        let seg = match self.free_segments.pop() {
            Some(id) => {
                self.segments[id as usize] = data;
                id
            }
            None => {
                assert!(self.segments.len() < (1 << 31), "too many segments");
                self.segments.push(data);
                (self.segments.len() - 1) as SegmentId
            }
        };
        self.cell_segments.get_mut(cell).push(seg);
        seg
    }

    /// Destroys a live segment and its synapses.
    pub fn destroy_segment(&mut self, seg: SegmentId) {
        let data = std::mem::take(&mut self.segments[seg as usize]);
        assert!(data.cell != DEAD, "segment {seg} is not alive");
        for s in &data.syns {
            unindex(
                &mut self.index,
                s.presyn,
                entry(seg, s.permanence >= self.connected),
            );
        }
        self.num_synapses -= data.syns.len();
        let list = self.cell_segments.get_mut(data.cell);
        let pos = list
            .iter()
            .position(|&s| s == seg)
            .expect("segment listed on its cell");
        list.remove(pos); // keeps creation order
        self.cell_segments.release_if_empty(data.cell);
        self.segments[seg as usize].cell = DEAD;
        self.free_segments.push(seg);
    }

    /// Appends a synapse from `presyn` to `seg`, permanence clamped to `[0, 1]`.
    pub fn add_synapse(&mut self, seg: SegmentId, presyn: u32, permanence: f32) {
        assert!(
            presyn < self.num_presyn,
            "presynaptic cell {presyn} out of range"
        );
        let permanence = permanence.clamp(0.0, 1.0);
        let data = &mut self.segments[seg as usize];
        debug_assert!(data.cell != DEAD);
        assert!(
            data.syns.len() < MAX_SYNAPSES_PER_SEGMENT,
            "segment synapse limit reached"
        );
        data.syns.push(Syn { presyn, permanence });
        self.index
            .get_mut(presyn)
            .push(entry(seg, permanence >= self.connected));
        self.num_synapses += 1;
    }

    /// Rewrites every permanence of `seg` in synapse order: `update(presyn, old)` returns
    /// the new value, stored clamped to `[0, 1]`.
    #[inline]
    pub fn update_permanences<F: FnMut(u32, f32) -> f32>(&mut self, seg: SegmentId, mut update: F) {
        let thr = self.connected;
        for s in &mut self.segments[seg as usize].syns {
            let old = s.permanence;
            let new = update(s.presyn, old).clamp(0.0, 1.0);
            s.permanence = new;
            if (old >= thr) != (new >= thr) {
                // Rare: learning steps are small next to the distance to the threshold.
                let list = self.index.get_mut(s.presyn);
                let from = entry(seg, old >= thr);
                let e = list
                    .iter_mut()
                    .find(|e| **e == from)
                    .expect("synapse in presynaptic index");
                *e = entry(seg, new >= thr);
            }
        }
    }

    /// Removes the synapses of `seg` for which `doomed` is true (in synapse order, the rest
    /// keeping their order) and returns how many went.
    pub fn remove_synapses<F: FnMut(usize, &Syn) -> bool>(
        &mut self,
        seg: SegmentId,
        mut doomed: F,
    ) -> usize {
        let thr = self.connected;
        let index = &mut self.index;
        let syns = &mut self.segments[seg as usize].syns;
        let before = syns.len();
        let mut i = 0;
        syns.retain(|s| {
            let gone = doomed(i, s);
            i += 1;
            if gone {
                unindex(index, s.presyn, entry(seg, s.permanence >= thr));
            }
            !gone
        });
        let removed = before - syns.len();
        self.num_synapses -= removed;
        removed
    }

    /// For every segment reached from `active_presyn` (cells, each listed once), counts its
    /// active synapses and active connected synapses into `out`.
    pub fn compute_activity(&self, active_presyn: &[u32], out: &mut Activity) {
        let counts = &mut out.counts;
        for &seg in &out.touched {
            counts[seg as usize] = 0;
        }
        counts.resize(self.segments.len(), 0);
        let touched = &mut out.touched;
        touched.clear();
        touched.resize(self.segments.len() + 1, 0);
        let mut n = 0;
        for &p in active_presyn {
            for &e in self.index.get(p) {
                let seg = (e >> 1) as usize;
                let c = counts[seg];
                // Branch-free: record the segment, keep it only on its first count.
                touched[n] = seg as u32;
                n += usize::from(c == 0);
                counts[seg] = c + 1 + ((e & 1) << 16);
            }
        }
        touched.truncate(n);
    }

    /// Rebuilds the derived lists from the segments. Idempotent.
    pub fn rebuild_index(&mut self) {
        let mut cell_segments = SparseLists::new(self.num_cells as usize);
        let mut index = SparseLists::new(self.num_presyn as usize);
        let mut live: Vec<(u32, u64, SegmentId)> = Vec::with_capacity(self.num_segments());
        let mut num_synapses = 0;
        for (id, seg) in self.segments.iter().enumerate() {
            if seg.cell == DEAD {
                continue;
            }
            live.push((seg.cell, seg.ordinal, id as SegmentId));
            for s in &seg.syns {
                index
                    .get_mut(s.presyn)
                    .push(entry(id as SegmentId, s.permanence >= self.connected));
            }
            num_synapses += seg.syns.len();
        }
        live.sort_unstable();
        for (cell, _, id) in live {
            cell_segments.get_mut(cell).push(id);
        }
        self.cell_segments = cell_segments;
        self.index = index;
        self.num_synapses = num_synapses;
    }

    /// Heap bytes held (capacity-based), derived lists included.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.segments.capacity() * size_of::<Segment>()
            + self
                .segments
                .iter()
                .map(|s| s.syns.capacity() * size_of::<Syn>())
                .sum::<usize>()
            + 4 * self.free_segments.capacity()
            + self.cell_segments.heap_bytes()
            + self.index.heap_bytes()
    }
}

fn unindex(index: &mut SparseLists, presyn: u32, e: u32) {
    let list = index.get_mut(presyn);
    let pos = list
        .iter()
        .position(|&x| x == e)
        .expect("synapse in presynaptic index");
    list.swap_remove(pos); // order is irrelevant: the index is only counted
    index.release_if_empty(presyn);
}

/// Checkpoint form: the segments in id order (free slots as cell 0, real cells shifted by
/// one) with their synapses; everything derived is left out.
#[derive(Serialize, Deserialize)]
struct Wire<S> {
    num_cells: u32,
    num_presyn: u32,
    connected: f32,
    next_ordinal: u64,
    free_segments: Vec<SegmentId>,
    segments: Vec<S>,
}

#[derive(Serialize)]
struct SegmentRef<'a> {
    cell_plus_one: u32,
    ordinal: u64,
    syns: &'a [Syn],
}

#[derive(Deserialize)]
struct SegmentOwned {
    cell_plus_one: u32,
    ordinal: u64,
    syns: Vec<Syn>,
}

impl Serialize for SegmentStore {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            num_cells: self.num_cells,
            num_presyn: self.num_presyn,
            connected: self.connected,
            next_ordinal: self.next_ordinal,
            free_segments: self.free_segments.clone(),
            segments: self
                .segments
                .iter()
                .map(|seg| SegmentRef {
                    cell_plus_one: seg.cell.wrapping_add(1),
                    ordinal: seg.ordinal,
                    syns: &seg.syns,
                })
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SegmentStore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let w: Wire<SegmentOwned> = Wire::deserialize(d)?;
        let mut store = SegmentStore::new(w.num_cells as usize, w.num_presyn as usize, w.connected);
        store.next_ordinal = w.next_ordinal;
        store.segments.reserve_exact(w.segments.len());
        for seg in w.segments {
            let cell = seg.cell_plus_one.wrapping_sub(1);
            let ok = (cell == DEAD && seg.syns.is_empty())
                || (cell < w.num_cells
                    && seg.ordinal < w.next_ordinal
                    && seg.syns.len() <= MAX_SYNAPSES_PER_SEGMENT
                    && seg
                        .syns
                        .iter()
                        .all(|s| s.presyn < w.num_presyn && (0.0..=1.0).contains(&s.permanence)));
            if !ok {
                return Err(D::Error::custom("segment store: invalid segment"));
            }
            store.segments.push(Segment {
                cell,
                ordinal: if cell == DEAD { 0 } else { seg.ordinal },
                syns: seg.syns,
            });
        }
        let dead = store.segments.iter().filter(|s| s.cell == DEAD).count();
        let mut seen = vec![false; store.segments.len()];
        for &f in &w.free_segments {
            match store.segments.get(f as usize) {
                Some(s) if s.cell == DEAD && !std::mem::replace(&mut seen[f as usize], true) => {}
                _ => return Err(D::Error::custom("segment store: invalid free list")),
            }
        }
        if w.free_segments.len() != dead {
            return Err(D::Error::custom("segment store: free list incomplete"));
        }
        store.free_segments = w.free_segments;
        store.rebuild_index();
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Random;

    /// Counts by walking every segment: what `compute_activity` must agree with.
    fn direct_counts(s: &SegmentStore, active: &[u32]) -> Vec<(SegmentId, u32, u32)> {
        let mut out = Vec::new();
        for seg in 0..s.segment_capacity() as SegmentId {
            if !s.is_alive(seg) {
                continue;
            }
            let act: Vec<&Syn> = s
                .synapses(seg)
                .iter()
                .filter(|x| active.contains(&x.presyn))
                .collect();
            let conn = act
                .iter()
                .filter(|x| x.permanence >= s.connected_threshold())
                .count();
            if !act.is_empty() {
                out.push((seg, act.len() as u32, conn as u32));
            }
        }
        out
    }

    fn indexed_counts(
        s: &SegmentStore,
        active: &[u32],
        a: &mut Activity,
    ) -> Vec<(SegmentId, u32, u32)> {
        s.compute_activity(active, a);
        let mut out: Vec<_> = a
            .touched()
            .iter()
            .map(|&seg| (seg, a.potential(seg), a.connected(seg)))
            .collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn activity_counts_match_a_direct_walk_through_random_edits() {
        let mut s = SegmentStore::new(50, 200, 0.5);
        let mut rng = Random::new(3);
        let mut a = Activity::default();
        for step in 0..400 {
            match rng.below(6) {
                0 | 1 => {
                    let seg = s.create_segment(rng.below(50));
                    for _ in 0..rng.below(20) {
                        s.add_synapse(seg, rng.below(200), rng.real() as f32);
                    }
                }
                2 if s.num_segments() > 0 => {
                    let live: Vec<SegmentId> = (0..s.segment_capacity() as u32)
                        .filter(|&g| s.is_alive(g))
                        .collect();
                    s.destroy_segment(live[rng.below(live.len() as u32) as usize]);
                }
                3 | 4 if s.num_segments() > 0 => {
                    let live: Vec<SegmentId> = (0..s.segment_capacity() as u32)
                        .filter(|&g| s.is_alive(g))
                        .collect();
                    let seg = live[rng.below(live.len() as u32) as usize];
                    let d = (rng.real() as f32 - 0.5) * 0.3;
                    s.update_permanences(seg, |_, p| p + d);
                    s.remove_synapses(seg, |_, x| x.permanence < 0.05);
                }
                _ => {}
            }
            let active: Vec<u32> = {
                let mut v: Vec<u32> = (0..30).map(|_| rng.below(200)).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            assert_eq!(
                indexed_counts(&s, &active, &mut a),
                direct_counts(&s, &active),
                "step {step}"
            );
            let total: usize = (0..s.segment_capacity() as u32)
                .filter(|&g| s.is_alive(g))
                .map(|g| s.synapses(g).len())
                .sum();
            assert_eq!(s.num_synapses(), total);
        }
        assert!(s.num_synapses() > 100);
    }

    #[test]
    fn cell_lists_keep_creation_order_and_ids_are_reused() {
        let mut s = SegmentStore::new(4, 4, 0.5);
        let a = s.create_segment(2);
        let b = s.create_segment(2);
        let c = s.create_segment(2);
        s.destroy_segment(b);
        assert_eq!(s.segments_for_cell(2), &[a, c]);
        let d = s.create_segment(2);
        assert_eq!(d, b, "freed id reused");
        assert_eq!(s.segments_for_cell(2), &[a, c, d]);
        assert!(s.ordinal(d) > s.ordinal(c));
        assert!(s.segments_for_cell(3).is_empty());
    }

    #[test]
    fn permanences_are_clamped_and_removal_keeps_order() {
        let mut s = SegmentStore::new(1, 10, 0.5);
        let seg = s.create_segment(0);
        for (p, v) in [(3, 0.4), (1, 0.9), (7, 0.2), (5, 0.6)] {
            s.add_synapse(seg, p, v);
        }
        s.update_permanences(seg, |_, p| p + 0.2);
        let perms: Vec<f32> = s.synapses(seg).iter().map(|x| x.permanence).collect();
        assert_eq!(perms, vec![0.6, 1.0, 0.4, 0.8]);
        assert_eq!(s.remove_synapses(seg, |i, _| i == 2), 1);
        let presyn: Vec<u32> = s.synapses(seg).iter().map(|x| x.presyn).collect();
        assert_eq!(presyn, vec![3, 1, 5]);
        let mut a = Activity::default();
        s.compute_activity(&[3, 7], &mut a);
        assert_eq!((a.potential(seg), a.connected(seg)), (1, 1));
    }

    #[test]
    fn serde_round_trip_restores_content_and_derived_lists() {
        let mut s = SegmentStore::new(8, 16, 0.5);
        let mut rng = Random::new(9);
        for i in 0..20 {
            let seg = s.create_segment(rng.below(8));
            for _ in 0..5 {
                s.add_synapse(seg, rng.below(16), rng.real() as f32);
            }
            if i % 3 == 0 {
                s.destroy_segment(seg);
            }
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&s, cfg).unwrap();
        let (back, _): (SegmentStore, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, s);
        for cell in 0..8 {
            assert_eq!(back.segments_for_cell(cell), s.segments_for_cell(cell));
        }
        let (mut a, mut b) = (Activity::default(), Activity::default());
        let active: Vec<u32> = (0..16).step_by(2).collect();
        assert_eq!(
            indexed_counts(&back, &active, &mut a),
            indexed_counts(&s, &active, &mut b)
        );
        // Same next id on both sides.
        let (mut s2, mut back2) = (s.clone(), back.clone());
        assert_eq!(s2.create_segment(1), back2.create_segment(1));
    }
}
