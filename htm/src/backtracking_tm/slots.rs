//! Each cell's segment slots, in one arena of small blocks.

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
/// Serialises flat (see [`Wire`]): a restore fills the arena without an allocation per cell.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "Wire")]
pub(super) struct CellSlots {
    /// Per cell, where its block starts in `arena`; 0 (a shared empty block) for none.
    heads: CellHeads,
    arena: Vec<u32>,
    /// Arena words in blocks that cells have moved out of.
    abandoned: usize,
}

/// The serialised form: the cells that have slots (ascending) with each one's slot count
/// and most recently freed slot ([`NONE`] for none), then all their slots in cell order, a
/// free slot as [`FREE`] with the slot freed before it.
#[derive(Serialize, Deserialize)]
struct Wire {
    cells: Vec<u32>,
    lens: Vec<u32>,
    tops: Vec<u32>,
    slots: Vec<u32>,
}

impl TryFrom<Wire> for CellSlots {
    type Error = String;

    fn try_from(w: Wire) -> Result<Self, String> {
        let total: usize = w.lens.iter().map(|&n| n as usize).sum();
        if w.lens.len() != w.cells.len() || w.tops.len() != w.cells.len() || total != w.slots.len()
        {
            return Err("cell slot lists do not add up".into());
        }
        if !w.cells.windows(2).all(|c| c[0] < c[1]) {
            return Err("cells with slots are not ascending".into());
        }
        let num_cells = w.cells.last().map_or(0, |&c| c as usize + 1);
        let mut s = CellSlots::new(num_cells);
        s.arena.reserve_exact(HEADER * w.cells.len() + total);
        let mut slots = w.slots.iter();
        for ((&cell, &n), &top) in w.cells.iter().zip(&w.lens).zip(&w.tops) {
            let link_ok = |l: u32| l == NONE || l < n;
            if n == 0 || !link_ok(top) {
                return Err(format!("cell {cell}: bad slot list"));
            }
            s.heads.set(cell, s.arena.len() as u32);
            s.arena.extend_from_slice(&[n, n, top]);
            for &slot in slots.by_ref().take(n as usize) {
                if slot & FREE != 0 && !link_ok(slot & !FREE) {
                    return Err(format!("cell {cell}: bad free slot link"));
                }
                s.arena.push(slot);
            }
        }
        Ok(s)
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
    #[cfg(test)]
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
        let cells: Vec<u32> = self.cells().collect();
        let mut wire = Wire {
            lens: Vec::with_capacity(cells.len()),
            tops: Vec::with_capacity(cells.len()),
            slots: Vec::new(),
            cells,
        };
        for &cell in &wire.cells {
            let (top, slots) = self.block(cell);
            wire.lens.push(slots.len() as u32);
            wire.tops.push(top);
            wire.slots.extend_from_slice(slots);
        }
        wire.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(w: &Wire) -> Result<CellSlots, String> {
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(w, cfg).unwrap();
        bincode::serde::decode_from_slice::<CellSlots, _>(&bytes, cfg)
            .map(|(s, _)| s)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn malformed_slot_lists_are_refused() {
        let good = Wire {
            cells: vec![3, 9],
            lens: vec![2, 1],
            tops: vec![1, NONE],
            slots: vec![7, FREE | NONE, 8],
        };
        let s = decode(&good).unwrap();
        assert_eq!(s.slots(3), [7, NO_SEGMENT]);
        assert_eq!(s.free_slots(3), [1]);
        for (bad, why) in [
            (
                Wire {
                    tops: vec![2, NONE],
                    ..good_copy(&good)
                },
                "bad slot list",
            ),
            (
                Wire {
                    slots: vec![7, FREE | 5, 8],
                    ..good_copy(&good)
                },
                "bad free slot link",
            ),
            (
                Wire {
                    cells: vec![9, 3],
                    ..good_copy(&good)
                },
                "not ascending",
            ),
            (
                Wire {
                    lens: vec![2, 2],
                    ..good_copy(&good)
                },
                "do not add up",
            ),
        ] {
            let err = decode(&bad).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    fn good_copy(w: &Wire) -> Wire {
        Wire {
            cells: w.cells.clone(),
            lens: w.lens.clone(),
            tops: w.tops.clone(),
            slots: w.slots.clone(),
        }
    }
}
