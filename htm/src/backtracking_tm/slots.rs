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
/// [`FREE`] and [`NONE`] in a narrow word.
const NARROW_FREE: u16 = 1 << 15;
const NARROW_NONE: u16 = NARROW_FREE - 1;

/// The arena's words: `u16` while every value (segment id, slot, count) stays below
/// [`NARROW_NONE`], as the parameters can promise (NAB's: 8192 segments, 128 per cell),
/// else `u32`. Values are read and written as `u32`, tags included.
#[derive(Clone, Debug)]
enum Words {
    Narrow(Vec<u16>),
    Wide(Vec<u32>),
}

impl Words {
    fn narrow(v: u32) -> u16 {
        let tag = if v & FREE != 0 { NARROW_FREE } else { 0 };
        let low = v & !FREE;
        debug_assert!(
            low < u32::from(NARROW_NONE) || low == NONE,
            "{v} is not narrow"
        );
        tag | if low == NONE { NARROW_NONE } else { low as u16 }
    }

    fn wide(w: u16) -> u32 {
        let tag = if w & NARROW_FREE != 0 { FREE } else { 0 };
        let low = w & !NARROW_FREE;
        tag | if low == NARROW_NONE {
            NONE
        } else {
            u32::from(low)
        }
    }

    fn with(narrow: bool, words: &[u32]) -> Self {
        if narrow {
            Words::Narrow(words.iter().map(|&v| Self::narrow(v)).collect())
        } else {
            Words::Wide(words.to_vec())
        }
    }

    fn is_narrow(&self) -> bool {
        matches!(self, Words::Narrow(_))
    }

    /// Every word, widened.
    fn to_wide(&self) -> Vec<u32> {
        match self {
            Words::Narrow(w) => w.iter().map(|&w| Self::wide(w)).collect(),
            Words::Wide(w) => w.clone(),
        }
    }

    #[inline]
    fn get(&self, i: usize) -> u32 {
        match self {
            Words::Narrow(w) => Self::wide(w[i]),
            Words::Wide(w) => w[i],
        }
    }

    #[inline]
    fn set(&mut self, i: usize, v: u32) {
        match self {
            Words::Narrow(w) => w[i] = Self::narrow(v),
            Words::Wide(w) => w[i] = v,
        }
    }

    fn len(&self) -> usize {
        match self {
            Words::Narrow(w) => w.len(),
            Words::Wide(w) => w.len(),
        }
    }

    /// A copy of `len` words from `from` at the end, then `extra` zero words, the capacity
    /// growing a sixteenth at a time.
    fn append_copy(&mut self, from: usize, len: usize, extra: usize) {
        match self {
            Words::Narrow(w) => append_copy(w, from, len, extra),
            Words::Wide(w) => append_copy(w, from, len, extra),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Words::Narrow(w) => w.capacity() * 2,
            Words::Wide(w) => w.capacity() * 4,
        }
    }
}

fn append_copy<T: Copy + Default>(w: &mut Vec<T>, from: usize, len: usize, extra: usize) {
    reserve_gradually(w, len + extra);
    w.extend_from_within(from..from + len);
    w.resize(w.len() + extra, T::default());
}

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
    arena: Words,
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
        let mut arena = Vec::with_capacity(HEADER + HEADER * w.cells.len() + total);
        arena.extend_from_slice(&[0, 0, NONE]);
        let mut slots = w.slots.iter();
        let mut max = 0;
        for ((&cell, &n), &top) in w.cells.iter().zip(&w.lens).zip(&w.tops) {
            let link_ok = |l: u32| l == NONE || l < n;
            if n == 0 || !link_ok(top) {
                return Err(format!("cell {cell}: bad slot list"));
            }
            s.heads.set(cell, arena.len() as u32);
            arena.extend_from_slice(&[n, n, top]);
            for &slot in slots.by_ref().take(n as usize) {
                if slot & FREE != 0 && !link_ok(slot & !FREE) {
                    return Err(format!("cell {cell}: bad free slot link"));
                }
                max = max.max(slot & !FREE);
                arena.push(slot);
            }
            max = max.max(n);
        }
        // The parameters (not known here) may want the other width: see `rebuild`.
        s.arena = Words::with(max < u32::from(NARROW_NONE), &arena);
        Ok(s)
    }
}

/// Content equality: the same slots and the same free stacks, wherever the blocks are.
impl PartialEq for CellSlots {
    fn eq(&self, other: &Self) -> bool {
        let cells = self.heads.len().max(other.heads.len()) as u32;
        (0..cells).all(|c| {
            let ((top_a, a), (top_b, b)) = (self.block(c), other.block(c));
            top_a == top_b && a.eq(b)
        })
    }
}

impl CellSlots {
    pub(super) fn new(num_cells: usize) -> Self {
        CellSlots {
            heads: CellHeads::new(num_cells),
            arena: Words::Wide(vec![0, 0, NONE]),
            abandoned: 0,
        }
    }

    /// Sizes the per-cell table after deserialisation, and takes narrow words if `narrow`
    /// (no segment id, slot or slot count will reach [`NARROW_NONE`]) and the slots so far
    /// fit them, else wide ones.
    pub(super) fn rebuild(&mut self, num_cells: usize, narrow: bool) {
        self.heads.resize(num_cells);
        if narrow != self.arena.is_narrow() {
            let words = self.arena.to_wide();
            let fits = words.iter().all(|&v| {
                let low = v & !FREE;
                low < u32::from(NARROW_NONE) || low == NONE
            });
            self.arena = Words::with(narrow && fits, &words);
        }
    }

    /// Whether segment ids below `max_segments` and `max_segments_per_cell` slots per cell
    /// (0 and -1: no bound) fit narrow words.
    pub(super) fn narrow_fits(max_segments: u32, max_segments_per_cell: i32) -> bool {
        let bound = i64::from(NARROW_NONE);
        (1..bound).contains(&i64::from(max_segments))
            && (1..bound).contains(&i64::from(max_segments_per_cell))
    }

    /// `cell`'s most recently freed slot and its slots (free ones tagged).
    #[inline]
    fn block(&self, cell: u32) -> (u32, impl Iterator<Item = u32> + '_) {
        let h = if (cell as usize) < self.heads.len() {
            self.heads.get(cell) as usize
        } else {
            0
        };
        let n = self.arena.get(h) as usize;
        let slots = (h + HEADER..h + HEADER + n).map(|i| self.arena.get(i));
        (self.arena.get(h + 2), slots)
    }

    /// Slots of `cell`, empty ones included.
    #[inline]
    pub(super) fn len(&self, cell: u32) -> usize {
        self.arena.get(self.heads.get(cell) as usize) as usize
    }

    /// `cell`'s segments in slot order.
    pub(super) fn segments(&self, cell: u32) -> impl Iterator<Item = SegmentId> + '_ {
        self.block(cell).1.filter(|&s| s & FREE == 0)
    }

    /// Every cell that has slots, ascending.
    pub(super) fn cells(&self) -> impl Iterator<Item = u32> + '_ {
        self.heads.nonzero()
    }

    /// `cell`'s slots in order ([`NO_SEGMENT`] = free).
    #[cfg(test)]
    pub(super) fn slots(&self, cell: u32) -> Vec<SegmentId> {
        let decode = |s: u32| if s & FREE == 0 { s } else { NO_SEGMENT };
        self.block(cell).1.map(decode).collect()
    }

    /// `cell`'s free slots, most recently freed last.
    #[cfg(test)]
    pub(super) fn free_slots(&self, cell: u32) -> Vec<u32> {
        let (mut top, slots) = self.block(cell);
        let slots: Vec<u32> = slots.collect();
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
        let top = self.arena.get(h + 2);
        if top != NONE {
            let w = h + HEADER + top as usize;
            self.arena.set(h + 2, self.arena.get(w) & !FREE);
            self.arena.set(w, seg);
            return top;
        }
        let (n, cap) = (self.arena.get(h), self.arena.get(h + 1));
        if n == cap {
            h = self.relocate(cell, cap + cap / 2 + 1);
        }
        self.arena.set(h + HEADER + n as usize, seg);
        self.arena.set(h, n + 1);
        n
    }

    /// Empties `cell`'s `slot`, which becomes its most recently freed.
    pub(super) fn release(&mut self, cell: u32, slot: u32) {
        let h = self.heads.get(cell) as usize;
        debug_assert!(slot < self.arena.get(h));
        self.arena
            .set(h + HEADER + slot as usize, FREE | self.arena.get(h + 2));
        self.arena.set(h + 2, slot);
    }

    /// Moves `cell`'s block to the end of the arena with room for `cap` slots; returns where
    /// it starts. Lays all blocks out again first when abandoned ones make up a third.
    fn relocate(&mut self, cell: u32, cap: u32) -> usize {
        if self.abandoned > 1024 && self.abandoned * 3 > self.arena.len() {
            self.compact();
        }
        let h = self.heads.get(cell) as usize;
        let (n, old_cap) = (self.arena.get(h) as usize, self.arena.get(h + 1) as usize);
        let start = self.arena.len();
        self.arena.append_copy(h, HEADER + n, cap as usize - n);
        self.arena.set(start + 1, cap);
        if old_cap > 0 {
            self.abandoned += HEADER + old_cap;
        }
        self.heads
            .set(cell, u32::try_from(start).expect("slot arena within u32"));
        start
    }

    /// Packs every block, in cell order, to its slot count.
    fn compact(&mut self) {
        let old = self.arena.to_wide();
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
        self.arena = Words::with(self.arena.is_narrow(), &arena);
        self.abandoned = 0;
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.heads.heap_bytes() + self.arena.heap_bytes()
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
            let before = wire.slots.len();
            wire.slots.extend(slots);
            wire.lens.push((wire.slots.len() - before) as u32);
            wire.tops.push(top);
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

    /// Narrow and wide words hold the same slots and free stacks through assignments,
    /// releases, relocations, compactions and changes of width.
    #[test]
    fn narrow_and_wide_words_agree() {
        let mut wide = CellSlots::new(300);
        wide.rebuild(300, false);
        let mut narrow = wide.clone();
        narrow.rebuild(300, true);
        assert!(narrow.arena.is_narrow() && !wide.arena.is_narrow());
        let mut rng = crate::random::Random::new(3);
        let mut live: Vec<(u32, u32)> = Vec::new();
        for seg in 0..5000u32 {
            if !live.is_empty() && rng.below(2) == 0 {
                let (cell, slot) = live.swap_remove(rng.below(live.len() as u32) as usize);
                wide.release(cell, slot);
                narrow.release(cell, slot);
            } else {
                let cell = rng.below(300);
                let slot = wide.assign(cell, seg);
                assert_eq!(narrow.assign(cell, seg), slot);
                live.push((cell, slot));
            }
        }
        assert_eq!(narrow, wide);
        for c in 0..300 {
            assert_eq!(narrow.free_slots(c), wide.free_slots(c));
        }
        narrow.rebuild(300, false);
        assert!(!narrow.arena.is_narrow());
        assert_eq!(narrow, wide);
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
