//! Each cell's segment slots, in one arena of small blocks.

use std::collections::BTreeMap;

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};

use super::heads::CellHeads;
use super::store::{reserve_gradually, SegmentId};

/// Marks an empty slot in [`CellSlots::slots`] (and in the serialised slot lists).
#[cfg(test)]
pub(super) const NO_SEGMENT: SegmentId = SegmentId::MAX;

/// Words of a block header: slot count, capacity, most recently freed slot (or [`NONE`]).
const HEADER: usize = 3;
/// Tags a free slot; its low bits name the slot freed before it (or [`NONE`]), so the free
/// slots form a stack threaded through the slots themselves.
const FREE: u32 = 1 << 31;
const NONE: u32 = FREE - 1;

/// `Cells4`'s per-cell segment slots: per cell, its segments in slot order with free slots
/// in between, and its freed slots, most recently freed first to be taken by the cell's next
/// new segment. Most cells never get a segment, so a cell costs one word until it does; then
/// it has a block in a shared arena (a header, then its slots), which moves to the end of
/// the arena when it fills up. Abandoned blocks are reclaimed by laying the blocks out again.
///
/// Serialises as it did when it was two ordered maps, cell → slots ([`SegmentId::MAX`] for a
/// free one) and cell → free slots (most recently freed last).
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "SlotMaps")]
pub(super) struct CellSlots {
    /// Per cell, where its block starts in `arena`; 0 (a shared empty block) for none.
    heads: CellHeads,
    arena: Vec<u32>,
    /// Arena words in blocks that cells have moved out of.
    abandoned: usize,
}

/// The serialised form.
#[derive(Deserialize)]
struct SlotMaps {
    slots: BTreeMap<u32, Vec<SegmentId>>,
    free: BTreeMap<u32, Vec<u32>>,
}

impl From<SlotMaps> for CellSlots {
    fn from(maps: SlotMaps) -> Self {
        let cells = maps.slots.keys().last().map_or(0, |&c| c as usize + 1);
        let mut s = CellSlots::new(cells);
        for (cell, slots) in maps.slots {
            let h = s.arena.len();
            s.heads.set(cell, h as u32);
            let n = slots.len() as u32;
            s.arena.extend_from_slice(&[n, n, NONE]);
            s.arena.extend_from_slice(&slots);
        }
        for (cell, free) in maps.free {
            for slot in free {
                s.release(cell, slot);
            }
        }
        s
    }
}

/// Content equality: the same slots and the same free stacks, wherever the blocks are.
impl PartialEq for CellSlots {
    fn eq(&self, other: &Self) -> bool {
        let cells = self.heads.len().max(other.heads.len()) as u32;
        (0..cells).all(|c| self.block(c) == other.block(c))
    }
}

impl CellSlots {
    pub(super) fn new(num_cells: usize) -> Self {
        CellSlots {
            heads: CellHeads::new(num_cells),
            arena: vec![0, 0, NONE],
            abandoned: 0,
        }
    }

    /// Sizes the per-cell table after deserialisation.
    pub(super) fn rebuild(&mut self, num_cells: usize) {
        self.heads.resize(num_cells);
    }

    /// `cell`'s most recently freed slot and its slots (free ones tagged).
    #[inline]
    fn block(&self, cell: u32) -> (u32, &[u32]) {
        let h = if (cell as usize) < self.heads.len() {
            self.heads.get(cell) as usize
        } else {
            0
        };
        let n = self.arena[h] as usize;
        (self.arena[h + 2], &self.arena[h + HEADER..h + HEADER + n])
    }

    /// Slots of `cell`, empty ones included.
    #[inline]
    pub(super) fn len(&self, cell: u32) -> usize {
        self.arena[self.heads.get(cell) as usize] as usize
    }

    /// `cell`'s segments in slot order.
    pub(super) fn segments(&self, cell: u32) -> impl Iterator<Item = SegmentId> + '_ {
        self.block(cell)
            .1
            .iter()
            .copied()
            .filter(|&s| s & FREE == 0)
    }

    /// Every cell that has slots, ascending.
    pub(super) fn cells(&self) -> impl Iterator<Item = u32> + '_ {
        self.heads.nonzero()
    }

    /// `cell`'s slots in order ([`NO_SEGMENT`] = free).
    #[cfg(test)]
    pub(super) fn slots(&self, cell: u32) -> Vec<SegmentId> {
        let decode = |s: u32| if s & FREE == 0 { s } else { NO_SEGMENT };
        self.block(cell).1.iter().map(|&s| decode(s)).collect()
    }

    /// `cell`'s free slots, most recently freed last.
    pub(super) fn free_slots(&self, cell: u32) -> Vec<u32> {
        let (mut top, slots) = self.block(cell);
        let mut free = Vec::new();
        while top != NONE {
            free.push(top);
            top = slots[top as usize] & !FREE;
        }
        free.reverse();
        free
    }

    /// Puts `seg` in `cell`'s most recently freed slot, else in a new one; returns the slot.
    pub(super) fn assign(&mut self, cell: u32, seg: SegmentId) -> u32 {
        debug_assert!(seg & FREE == 0);
        let mut h = self.heads.get(cell) as usize;
        let top = self.arena[h + 2];
        if top != NONE {
            let w = h + HEADER + top as usize;
            self.arena[h + 2] = self.arena[w] & !FREE;
            self.arena[w] = seg;
            return top;
        }
        let (n, cap) = (self.arena[h], self.arena[h + 1]);
        if n == cap {
            h = self.relocate(cell, cap + cap / 2 + 1);
        }
        self.arena[h + HEADER + n as usize] = seg;
        self.arena[h] = n + 1;
        n
    }

    /// Empties `cell`'s `slot`, which becomes its most recently freed.
    pub(super) fn release(&mut self, cell: u32, slot: u32) {
        let h = self.heads.get(cell) as usize;
        debug_assert!(slot < self.arena[h]);
        self.arena[h + HEADER + slot as usize] = FREE | self.arena[h + 2];
        self.arena[h + 2] = slot;
    }

    /// Moves `cell`'s block to the end of the arena with room for `cap` slots; returns where
    /// it starts. Lays all blocks out again first when abandoned ones make up a third.
    fn relocate(&mut self, cell: u32, cap: u32) -> usize {
        if self.abandoned > 1024 && self.abandoned * 3 > self.arena.len() {
            self.compact();
        }
        let h = self.heads.get(cell) as usize;
        let (n, old_cap) = (self.arena[h] as usize, self.arena[h + 1] as usize);
        let start = self.arena.len();
        reserve_gradually(&mut self.arena, HEADER + cap as usize);
        self.arena.extend_from_within(h..h + HEADER + n);
        self.arena.resize(start + HEADER + cap as usize, 0);
        self.arena[start + 1] = cap;
        if old_cap > 0 {
            self.abandoned += HEADER + old_cap;
        }
        self.heads
            .set(cell, u32::try_from(start).expect("slot arena within u32"));
        start
    }

    /// Packs every block, in cell order, to its slot count.
    fn compact(&mut self) {
        let old = std::mem::take(&mut self.arena);
        let cells: Vec<u32> = self.heads.nonzero().collect();
        let live: usize = cells
            .iter()
            .map(|&c| HEADER + old[self.heads.get(c) as usize] as usize)
            .sum();
        let mut arena = Vec::with_capacity(HEADER + live);
        arena.extend_from_slice(&old[..HEADER]);
        for cell in cells {
            let h = self.heads.get(cell) as usize;
            let n = old[h];
            self.heads.set(cell, arena.len() as u32);
            arena.extend_from_slice(&[n, n, old[h + 2]]);
            arena.extend_from_slice(&old[h + HEADER..h + HEADER + n as usize]);
        }
        self.arena = arena;
        self.abandoned = 0;
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.heads.heap_bytes() + self.arena.capacity() * 4
    }
}

impl Serialize for CellSlots {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut st = serializer.serialize_struct("CellSlots", 2)?;
        st.serialize_field("slots", &Maps(self, false))?;
        st.serialize_field("free", &Maps(self, true))?;
        st.end()
    }
}

/// The slot lists (`.1` false) or the free lists (true) as an ordered map by cell.
struct Maps<'a>(&'a CellSlots, bool);

impl Serialize for Maps<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Maps(slots, free) = *self;
        let listed = |&c: &u32| !free || slots.block(c).0 != NONE;
        let mut map = serializer.serialize_map(Some(slots.cells().filter(listed).count()))?;
        for cell in slots.cells().filter(listed) {
            if free {
                map.serialize_entry(&cell, &slots.free_slots(cell))?;
            } else {
                map.serialize_entry(&cell, &Decoded(slots.block(cell).1))?;
            }
        }
        map.end()
    }
}

/// Slots with free ones as [`SegmentId::MAX`].
struct Decoded<'a>(&'a [u32]);

impl Serialize for Decoded<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let decode = |s: u32| if s & FREE == 0 { s } else { SegmentId::MAX };
        serializer.collect_seq(self.0.iter().map(|&s| decode(s)))
    }
}
