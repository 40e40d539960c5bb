//! The TM's own synapse storage: each segment's synapses in one small vector sorted by
//! presynaptic cell, and the presynaptic out index that forward passes walk.
//!
//! Sorting by presynaptic cell turns every "is this cell on the segment / in the update"
//! question of learning into a merge of two short sorted lists, and keeps a segment's
//! synapses in a few consecutive cache lines.

use serde::{Deserialize, Serialize};

/// Index of a segment; stable while the segment lives, reused after it is freed.
pub type SegmentId = u32;

/// One synapse of a segment.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Synapse {
    /// Presynaptic cell.
    pub presyn: u32,
    pub permanence: f32,
    /// Where this synapse's entry last sat in its presynaptic cell's out list: a hint that
    /// spares the search unless a removal moved the entry since. Derived: rebuilt after
    /// deserialisation.
    #[serde(skip)]
    pub(super) out_pos: u32,
}

/// Content equality; the out-list position depends on history, not on what is stored.
impl PartialEq for Synapse {
    fn eq(&self, other: &Self) -> bool {
        self.presyn == other.presyn && self.permanence == other.permanence
    }
}

/// Marks a synapse to be dropped by [`compact`].
pub(super) const DROPPED: f32 = -1.0;

/// Drops the synapses marked [`DROPPED`], keeping the order.
pub(super) fn compact(syns: &mut Vec<Synapse>) {
    syns.retain(|s| s.permanence != DROPPED);
}

/// Top bit of an out-list entry: the synapse is connected.
pub(super) const CONNECTED_FLAG: u32 = 1 << 31;

/// Presynaptic cell → one entry per synapse it makes, `segment | connected flag`:
/// `Cells4`'s `OutSynapses` plus the flag, so a forward pass is a sequential read and one
/// counter update per synapse. Entry order is irrelevant (passes only count). Derived from
/// the segments: not serialised, rebuilt after restore.
#[derive(Clone, Debug, Default)]
pub(super) struct OutIndex {
    pub(super) by_cell: Vec<Vec<u32>>,
}

/// Derived data: equal whenever the segments it indexes are.
impl PartialEq for OutIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl OutIndex {
    pub(super) fn new(num_cells: usize) -> Self {
        OutIndex {
            by_cell: vec![Vec::new(); num_cells],
        }
    }

    #[inline]
    pub(super) fn entry(seg: SegmentId, connected: bool) -> u32 {
        debug_assert!(seg < CONNECTED_FLAG);
        seg | if connected { CONNECTED_FLAG } else { 0 }
    }

    /// Lists a synapse of `seg` from `presyn`; returns its position.
    #[inline]
    pub(super) fn add(&mut self, presyn: u32, seg: SegmentId, connected: bool) -> u32 {
        let list = &mut self.by_cell[presyn as usize];
        list.push(Self::entry(seg, connected));
        (list.len() - 1) as u32
    }

    /// Position of the entry of `seg`'s synapse from `presyn`, starting from the synapse's
    /// hint. A segment has at most one synapse per presynaptic cell, so a matching entry at
    /// the hint is the one; otherwise the list is searched (removals move entries, and fixing
    /// the moved synapse's hint eagerly would cost a visit to its segment).
    #[inline]
    fn locate(&self, presyn: u32, seg: SegmentId, hint: u32) -> u32 {
        let list = &self.by_cell[presyn as usize];
        match list.get(hint as usize) {
            Some(&e) if e & !CONNECTED_FLAG == seg => hint,
            _ => list
                .iter()
                .rposition(|&e| e & !CONNECTED_FLAG == seg)
                .expect("synapse listed in the out index") as u32,
        }
    }

    /// Sets the connected flag of `syn` (on `seg`), refreshing its hint.
    #[inline]
    pub(super) fn set_connected(&mut self, syn: &mut Synapse, seg: SegmentId, connected: bool) {
        let pos = self.locate(syn.presyn, seg, syn.out_pos);
        syn.out_pos = pos;
        self.by_cell[syn.presyn as usize][pos as usize] = Self::entry(seg, connected);
    }

    /// Unlists `seg`'s synapse from `presyn` (with position hint `hint`).
    #[inline]
    pub(super) fn remove(&mut self, presyn: u32, seg: SegmentId, hint: u32) {
        let pos = self.locate(presyn, seg, hint);
        self.by_cell[presyn as usize].swap_remove(pos as usize);
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.by_cell.capacity() * std::mem::size_of::<Vec<u32>>()
            + self.by_cell.iter().map(|v| v.capacity() * 4).sum::<usize>()
    }
}
