//! Each cell's segment slots, stored only for the cells that have any.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::store::SegmentId;

/// Marks an empty slot in a cell's slot list.
pub(super) const NO_SEGMENT: SegmentId = SegmentId::MAX;

/// `Cells4`'s per-cell segment slots: per cell, its segments in slot order with
/// [`NO_SEGMENT`] in freed slots, and its freed slots, most recently freed last (the next new
/// segment of the cell takes that one). Most cells never get a segment, so the lists live in
/// ordered maps keyed by cell, next to a dense slot count per cell for quota checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct CellSlots {
    slots: BTreeMap<u32, Vec<SegmentId>>,
    free: BTreeMap<u32, Vec<u32>>,
    /// Slots per cell, empty ones included (what `max_segments_per_cell` counts). Derived
    /// from `slots`: rebuilt after deserialisation.
    #[serde(skip)]
    counts: Vec<u32>,
}

/// The counts are derived from the lists.
impl PartialEq for CellSlots {
    fn eq(&self, other: &Self) -> bool {
        self.slots == other.slots && self.free == other.free
    }
}

impl CellSlots {
    pub(super) fn new(num_cells: usize) -> Self {
        CellSlots {
            slots: BTreeMap::new(),
            free: BTreeMap::new(),
            counts: vec![0; num_cells],
        }
    }

    /// Restores the counts after deserialisation.
    pub(super) fn rebuild(&mut self, num_cells: usize) {
        self.counts = vec![0; num_cells];
        for (&cell, slots) in &self.slots {
            self.counts[cell as usize] = slots.len() as u32;
        }
    }

    /// Slots of `cell`, empty ones included.
    #[inline]
    pub(super) fn len(&self, cell: u32) -> usize {
        self.counts[cell as usize] as usize
    }

    /// `cell`'s slots in order ([`NO_SEGMENT`] = free).
    pub(super) fn slots(&self, cell: u32) -> &[SegmentId] {
        self.slots.get(&cell).map_or(&[], |v| v.as_slice())
    }

    /// `cell`'s free slots, most recently freed last.
    #[cfg(test)]
    pub(super) fn free_slots(&self, cell: u32) -> &[u32] {
        self.free.get(&cell).map_or(&[], |v| v.as_slice())
    }

    /// Every cell with slots, ascending, with its slots.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &[SegmentId])> {
        self.slots.iter().map(|(&c, v)| (c, v.as_slice()))
    }

    /// Puts `seg` in `cell`'s most recently freed slot, else in a new one; returns the slot.
    pub(super) fn assign(&mut self, cell: u32, seg: SegmentId) -> u32 {
        let slots = self.slots.entry(cell).or_default();
        let reused = match self.free.get_mut(&cell) {
            Some(free) => {
                let slot = free.pop().expect("free lists are never left empty");
                if free.is_empty() {
                    self.free.remove(&cell);
                }
                Some(slot)
            }
            None => None,
        };
        match reused {
            Some(slot) => {
                slots[slot as usize] = seg;
                slot
            }
            None => {
                slots.push(seg);
                self.counts[cell as usize] += 1;
                (slots.len() - 1) as u32
            }
        }
    }

    /// Empties `cell`'s `slot`, which becomes its most recently freed.
    pub(super) fn release(&mut self, cell: u32, slot: u32) {
        let slots = self.slots.get_mut(&cell).expect("cell with slots");
        slots[slot as usize] = NO_SEGMENT;
        self.free.entry(cell).or_default().push(slot);
    }

    pub(super) fn heap_bytes(&self) -> usize {
        // A B-tree entry costs roughly its key, its value and a share of node overhead.
        const ENTRY: usize = 4 + std::mem::size_of::<Vec<u32>>() + 16;
        (self.slots.len() + self.free.len()) * ENTRY
            + self.slots.values().map(|v| v.capacity() * 4).sum::<usize>()
            + self.free.values().map(|v| v.capacity() * 4).sum::<usize>()
            + self.counts.capacity() * 4
    }
}
