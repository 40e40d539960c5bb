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
    /// Where this synapse's entry sits in its presynaptic cell's out list, so flag updates
    /// and removals need no search. Derived: rebuilt after deserialisation.
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

/// Segment id 0 is never allocated. Removed out-list entries are overwritten with it (a
/// tombstone), so that no entry ever moves and every synapse knows its entry's position;
/// passes count tombstones into segment 0's counter, which nothing reads.
pub(super) const SINK: SegmentId = 0;

/// Presynaptic cell → one entry per synapse it makes, `segment | connected flag`:
/// `Cells4`'s `OutSynapses` plus the flag, so a forward pass is a sequential read and one
/// counter update per synapse. Entry order is irrelevant (passes only count). Derived from
/// the segments: not serialised, rebuilt after restore and whenever tombstones pile up.
#[derive(Clone, Debug, Default)]
pub(super) struct OutIndex {
    pub(super) by_cell: Vec<Vec<u32>>,
    /// Entries in all lists, tombstones included.
    entries: usize,
    tombstones: usize,
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
            entries: 0,
            tombstones: 0,
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
        self.entries += 1;
        (list.len() - 1) as u32
    }

    /// Sets the connected flag of `syn`'s entry (a synapse of `seg`).
    #[inline]
    pub(super) fn set_connected(&mut self, syn: &Synapse, seg: SegmentId, connected: bool) {
        let e = &mut self.by_cell[syn.presyn as usize][syn.out_pos as usize];
        debug_assert_eq!(*e & !CONNECTED_FLAG, seg);
        *e = Self::entry(seg, connected);
    }

    /// Unlists `syn` (a synapse of `seg`).
    #[inline]
    pub(super) fn remove(&mut self, syn: &Synapse, seg: SegmentId) {
        let e = &mut self.by_cell[syn.presyn as usize][syn.out_pos as usize];
        debug_assert_eq!(*e & !CONNECTED_FLAG, seg);
        *e = SINK;
        self.tombstones += 1;
    }

    /// Whether tombstones make up enough of the lists (a quarter) to pay for a rebuild.
    pub(super) fn needs_rebuild(&self) -> bool {
        self.tombstones > 1024 && self.tombstones * 4 > self.entries
    }

    /// Relists every synapse of `synapses` (by segment id), recording positions.
    pub(super) fn rebuild(&mut self, synapses: &mut [Vec<Synapse>], connected_perm: f32) {
        for list in &mut self.by_cell {
            list.clear();
        }
        self.entries = 0;
        self.tombstones = 0;
        for (seg, syns) in synapses.iter_mut().enumerate() {
            for syn in syns {
                syn.out_pos = self.add(
                    syn.presyn,
                    seg as SegmentId,
                    syn.permanence >= connected_perm,
                );
            }
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.by_cell.capacity() * std::mem::size_of::<Vec<u32>>()
            + self.by_cell.iter().map(|v| v.capacity() * 4).sum::<usize>()
    }
}
