//! Each cell's segment slots, in one arena of per-column blocks.

use serde::{Deserialize, Serialize, Serializer};

use super::store::SegmentId;
use crate::reserve_gradually;

/// Marks an empty slot in [`CellSlots::slots`] (and in the serialised slot lists).
#[cfg(test)]
pub(super) const NO_SEGMENT: SegmentId = SegmentId::MAX;

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
    reserve_gradually(w, len + extra, 0);
    w.extend_from_within(from..from + len);
    w.resize(w.len() + extra, T::default());
}

/// Words of a column block's header: words its runs use, words it has room for.
const HEADER: usize = 2;
/// Words of a run's header: the cell's index in its column plus its slot count times the
/// column's size, then its most recently freed slot (or [`NONE`]).
const RUN: usize = 2;

/// `Cells4`'s per-cell segment slots: per cell, its segments in slot order with free slots
/// in between, and its freed slots, most recently freed first to be taken by the cell's next
/// new segment. Most columns never get a segment, and the cells of those that do hold a few
/// slots each, so a column costs one word until one of its cells gets a slot; then it has a
/// block in a shared arena holding a run per cell with slots (the cell's index, slot count
/// and free-stack top, then its slots), ascending cells. A cell's slots are found by walking
/// its column's runs: only learning looks them up, a few times a step. A block that fills up
/// moves to the end of the arena; abandoned blocks are reclaimed by laying the blocks out
/// again.
///
/// Serialises flat (see [`Wire`]), whatever the column size.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "Wire")]
pub(super) struct CellSlots {
    cells_per_column: u32,
    /// Per column, where its block starts in `arena`; 0 (a shared empty block) for none.
    heads: Vec<u32>,
    arena: Words,
    /// Arena words in blocks that columns have moved out of.
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
        // Each cell's slots as a slice of the flat list: no Vec per cell.
        let mut lists = Vec::with_capacity(w.cells.len());
        let mut rest = &w.slots[..];
        for ((&cell, &n), &top) in w.cells.iter().zip(&w.lens).zip(&w.tops) {
            let link_ok = |l: u32| l == NONE || l < n;
            if n == 0 || !link_ok(top) {
                return Err(format!("cell {cell}: bad slot list"));
            }
            let (list, tail) = rest.split_at(n as usize);
            if list.iter().any(|&s| s & FREE != 0 && !link_ok(s & !FREE)) {
                return Err(format!("cell {cell}: bad free slot link"));
            }
            lists.push((cell, top, list));
            rest = tail;
        }
        // The parameters (not known here) fix the column size and may want the other width:
        // see `rebuild`.
        let num_cells = w.cells.last().map_or(0, |&c| c as usize + 1);
        let lists = lists
            .into_iter()
            .map(|(cell, top, list)| (cell, top, list.iter().copied()));
        Ok(CellSlots::from_lists(num_cells, 1, None, lists))
    }
}

/// Content equality: the same slots and the same free stacks, wherever the blocks are.
impl PartialEq for CellSlots {
    fn eq(&self, other: &Self) -> bool {
        self.cells().eq(other.cells())
            && self.cells().all(|c| {
                let ((top_a, a), (top_b, b)) = (self.block(c), other.block(c));
                top_a == top_b && a.eq(b)
            })
    }
}

/// The first word of a run: cell index `idx` in a column of `cpc` cells, `n` slots.
fn run_word(cpc: u32, idx: u32, n: usize) -> u32 {
    let word = u64::from(idx) + u64::from(cpc) * n as u64;
    assert!(word < u64::from(NONE), "{n} slots on a cell");
    word as u32
}

/// Where a cell's run is in its column's block, or where it would go.
enum Run {
    At(usize),
    Missing(usize),
}

impl CellSlots {
    pub(super) fn new(num_cells: usize, cells_per_column: u32) -> Self {
        CellSlots::from_lists(
            num_cells,
            cells_per_column,
            Some(false),
            std::iter::empty::<(_, _, std::iter::Empty<u32>)>(),
        )
    }

    /// Slots laid out for columns of `cells_per_column` cells from `(cell, top, slots)`
    /// lists (ascending cells), in narrow words if `narrow` (or, for `None`, if they fit).
    fn from_lists<S: ExactSizeIterator<Item = u32>>(
        num_cells: usize,
        cells_per_column: u32,
        narrow: Option<bool>,
        lists: impl Iterator<Item = (u32, u32, S)>,
    ) -> Self {
        let cpc = cells_per_column.max(1);
        let columns = num_cells.div_ceil(cpc as usize);
        let mut heads = vec![0u32; columns];
        let mut arena: Vec<u32> = vec![0; HEADER];
        let mut lists = lists.peekable();
        while let Some(&(first, _, _)) = lists.peek() {
            let col = first / cpc;
            let h = arena.len();
            heads[col as usize] = u32::try_from(h).expect("slot arena within u32");
            arena.extend_from_slice(&[0, 0]);
            while let Some((cell, top, slots)) = lists.next_if(|l| l.0 / cpc == col) {
                arena.extend_from_slice(&[run_word(cpc, cell % cpc, slots.len()), top]);
                arena.extend(slots);
            }
            let used = (arena.len() - h - HEADER) as u32;
            arena[h] = used;
            arena[h + 1] = used;
        }
        let fits = arena.iter().all(|&v| {
            let low = v & !FREE;
            low < u32::from(NARROW_NONE) || low == NONE
        });
        CellSlots {
            cells_per_column: cpc,
            heads,
            arena: Words::with(narrow.unwrap_or(true) && fits, &arena),
            abandoned: 0,
        }
    }

    /// Every cell's `(cell, top, slots)`, ascending cells: one walk of each column's runs,
    /// not a search per cell.
    fn lists(
        &self,
    ) -> impl Iterator<Item = (u32, u32, impl ExactSizeIterator<Item = u32> + '_)> + '_ {
        let cpc = self.cells_per_column;
        self.heads
            .iter()
            .enumerate()
            .filter(|&(_, &h)| h != 0)
            .flat_map(move |(col, &h)| {
                let h = h as usize;
                let (mut pos, end) = (h + HEADER, h + HEADER + self.arena.get(h) as usize);
                std::iter::from_fn(move || {
                    (pos < end).then(|| {
                        let (idx, n) = self.run_head(pos);
                        let run = (
                            col as u32 * cpc + idx,
                            self.arena.get(pos + 1),
                            (pos + RUN..pos + RUN + n).map(|i| self.arena.get(i)),
                        );
                        pos += RUN + n;
                        run
                    })
                })
            })
    }

    /// Lays the slots out for `num_cells` cells in columns of `cells_per_column` after
    /// deserialisation, in narrow words if `narrow` (no segment id, slot count or column
    /// block will reach [`NARROW_NONE`]) and the slots so far fit them, else wide ones.
    pub(super) fn rebuild(&mut self, num_cells: usize, cells_per_column: u32, narrow: bool) {
        let columns = num_cells.div_ceil(cells_per_column.max(1) as usize);
        if cells_per_column != self.cells_per_column
            || narrow != self.arena.is_narrow()
            || columns != self.heads.len()
        {
            *self = CellSlots::from_lists(num_cells, cells_per_column, Some(narrow), self.lists());
        }
    }

    /// Whether segment ids below `max_segments`, `max_segments_per_cell` slots per cell (0
    /// and -1: no bound) and the column blocks of `cells_per_column` such cells fit narrow
    /// words.
    pub(super) fn narrow_fits(
        max_segments: u32,
        max_segments_per_cell: i32,
        cells_per_column: u32,
    ) -> bool {
        let bound = i64::from(NARROW_NONE);
        let block = i64::from(cells_per_column) * (RUN as i64 + i64::from(max_segments_per_cell));
        (1..bound).contains(&i64::from(max_segments))
            && (1..bound).contains(&i64::from(max_segments_per_cell))
            && i64::from(cells_per_column) * (i64::from(max_segments_per_cell) + 1) < bound
            && Self::grown(block as usize) < bound as usize
    }

    /// Room for a block of `words` words when it is laid out: a column gains slots a few at a
    /// time, and every move abandons the whole block.
    fn grown(words: usize) -> usize {
        words + words / 8 + 4
    }

    /// The cell index and slot count of the run at `pos`.
    #[inline]
    fn run_head(&self, pos: usize) -> (u32, usize) {
        let w = self.arena.get(pos);
        (
            w % self.cells_per_column,
            (w / self.cells_per_column) as usize,
        )
    }

    /// Where `cell`'s column block starts (0 for the empty one).
    #[inline]
    fn head(&self, cell: u32) -> usize {
        let col = (cell / self.cells_per_column) as usize;
        self.heads.get(col).map_or(0, |&h| h as usize)
    }

    /// Where `cell`'s run is in the block at `h`.
    fn find(&self, h: usize, cell: u32) -> Run {
        let idx = cell % self.cells_per_column;
        let mut pos = h + HEADER;
        let end = pos + self.arena.get(h) as usize;
        while pos < end {
            let (i, n) = self.run_head(pos);
            if i == idx {
                return Run::At(pos);
            }
            if i > idx {
                return Run::Missing(pos);
            }
            pos += RUN + n;
        }
        Run::Missing(end)
    }

    /// `cell`'s most recently freed slot and its slots (free ones tagged).
    fn block(&self, cell: u32) -> (u32, impl Iterator<Item = u32> + '_) {
        let (top, range) = match self.find(self.head(cell), cell) {
            Run::At(pos) => {
                let n = self.run_head(pos).1;
                (self.arena.get(pos + 1), pos + RUN..pos + RUN + n)
            }
            Run::Missing(_) => (NONE, 0..0),
        };
        (top, range.map(|i| self.arena.get(i)))
    }

    /// Slots of `cell`, empty ones included.
    pub(super) fn len(&self, cell: u32) -> usize {
        match self.find(self.head(cell), cell) {
            Run::At(pos) => self.run_head(pos).1,
            Run::Missing(_) => 0,
        }
    }

    /// `(cell, slot count)` of the cells of column `col` that have slots, ascending: one walk
    /// of the column's runs instead of one per cell.
    pub(super) fn column_lens(&self, col: u32) -> impl Iterator<Item = (u32, usize)> + '_ {
        let h = self.heads.get(col as usize).map_or(0, |&h| h as usize);
        let end = h + HEADER + self.arena.get(h) as usize;
        let mut pos = h + HEADER;
        std::iter::from_fn(move || {
            (pos < end).then(|| {
                let (idx, n) = self.run_head(pos);
                pos += RUN + n;
                (col * self.cells_per_column + idx, n)
            })
        })
    }

    /// `cell`'s segments in slot order.
    pub(super) fn segments(&self, cell: u32) -> impl Iterator<Item = SegmentId> + '_ {
        self.block(cell).1.filter(|&s| s & FREE == 0)
    }

    /// Every cell that has slots, ascending.
    pub(super) fn cells(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.heads.len() as u32)
            .filter(|&col| self.heads[col as usize] != 0)
            .flat_map(|col| self.column_lens(col).map(|(cell, _)| cell))
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
        let h = self.head(cell);
        match self.find(h, cell) {
            Run::At(pos) => {
                let top = self.arena.get(pos + 1);
                if top != NONE {
                    let w = pos + RUN + top as usize;
                    self.arena.set(pos + 1, self.arena.get(w) & !FREE);
                    self.arena.set(w, seg);
                    return top;
                }
                let (idx, n) = self.run_head(pos);
                let moved = self.insert(cell, pos + RUN + n - h, &[seg]);
                // The run is where it was in the block, which may have moved.
                let word = run_word(self.cells_per_column, idx, n + 1);
                self.arena.set(moved + (pos - h), word);
                n as u32
            }
            Run::Missing(pos) => {
                let word = run_word(self.cells_per_column, cell % self.cells_per_column, 1);
                self.insert(cell, pos - h, &[word, NONE, seg]);
                0
            }
        }
    }

    /// Empties `cell`'s `slot`, which becomes its most recently freed.
    pub(super) fn release(&mut self, cell: u32, slot: u32) {
        let Run::At(pos) = self.find(self.head(cell), cell) else {
            unreachable!("cell {cell} has no slots");
        };
        debug_assert!((slot as usize) < self.run_head(pos).1);
        self.arena
            .set(pos + RUN + slot as usize, FREE | self.arena.get(pos + 1));
        self.arena.set(pos + 1, slot);
    }
}

impl CellSlots {
    /// Inserts `words` at `offset` in `cell`'s column block (making one if it has none);
    /// returns where the block starts.
    fn insert(&mut self, cell: u32, offset: usize, words: &[u32]) -> usize {
        let col = (cell / self.cells_per_column) as usize;
        let mut h = self.heads[col] as usize;
        let (used, cap) = (self.arena.get(h) as usize, self.arena.get(h + 1) as usize);
        let need = used + words.len();
        if need > cap {
            h = self.relocate(col, Self::grown(need));
        }
        // Shift the tail of the block right, then write the words in the gap.
        let at = h + offset;
        for i in (at..h + HEADER + used).rev() {
            self.arena.set(i + words.len(), self.arena.get(i));
        }
        for (i, &w) in words.iter().enumerate() {
            self.arena.set(at + i, w);
        }
        self.arena.set(h, need as u32);
        h
    }

    /// Moves column `col`'s block to the end of the arena with room for `cap` words; returns
    /// where it starts. Lays all blocks out again first when abandoned ones make up an eighth
    /// (on NAB data, every few hundred steps).
    fn relocate(&mut self, col: usize, cap: usize) -> usize {
        if self.abandoned > 1024 && self.abandoned * 8 > self.arena.len() {
            self.compact();
        }
        let h = self.heads[col] as usize;
        let (used, old_cap) = (self.arena.get(h) as usize, self.arena.get(h + 1) as usize);
        let start = self.arena.len();
        self.arena.append_copy(h, HEADER + used, cap - used);
        self.arena.set(start + 1, cap as u32);
        if h != 0 {
            self.abandoned += HEADER + old_cap;
        }
        self.heads[col] = u32::try_from(start).expect("slot arena within u32");
        start
    }

    /// Lays every block out again, in column order, with room to grow by an eighth: a block
    /// without room moves at its next new slot.
    fn compact(&mut self) {
        let old = self.arena.to_wide();
        let live: usize = self
            .heads
            .iter()
            .filter(|&&h| h != 0)
            .map(|&h| HEADER + Self::grown(old[h as usize] as usize))
            .sum();
        let mut arena = Vec::with_capacity(HEADER + live);
        arena.extend_from_slice(&old[..HEADER]);
        for head in self.heads.iter_mut().filter(|h| **h != 0) {
            let h = *head as usize;
            let used = old[h] as usize;
            let cap = Self::grown(used);
            *head = arena.len() as u32;
            arena.extend_from_slice(&[used as u32, cap as u32]);
            arena.extend_from_slice(&old[h + HEADER..h + HEADER + used]);
            arena.resize(arena.len() + cap - used, 0);
        }
        self.arena = Words::with(self.arena.is_narrow(), &arena);
        self.abandoned = 0;
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.heads.capacity() * 4 + self.arena.heap_bytes()
    }
}

impl Serialize for CellSlots {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut wire = Wire {
            cells: Vec::new(),
            lens: Vec::new(),
            tops: Vec::new(),
            slots: Vec::new(),
        };
        for (cell, top, slots) in self.lists() {
            wire.cells.push(cell);
            wire.lens.push(slots.len() as u32);
            wire.tops.push(top);
            wire.slots.extend(slots);
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

    /// A cell's slots in the model: segments (`None`: free) and the free stack.
    #[derive(Clone, Default, Debug)]
    struct ModelCell {
        slots: Vec<Option<u32>>,
        free: Vec<u32>,
    }

    fn check(s: &CellSlots, model: &[ModelCell]) {
        let with_slots: Vec<u32> = (0..model.len() as u32)
            .filter(|&c| !model[c as usize].slots.is_empty())
            .collect();
        assert_eq!(s.cells().collect::<Vec<_>>(), with_slots);
        for (c, m) in model.iter().enumerate() {
            let c = c as u32;
            let slots: Vec<u32> = m.slots.iter().map(|x| x.unwrap_or(NO_SEGMENT)).collect();
            assert_eq!(s.slots(c), slots, "cell {c}");
            assert_eq!(s.len(c), m.slots.len());
            assert_eq!(s.free_slots(c), m.free, "cell {c}");
            let live: Vec<u32> = m.slots.iter().flatten().copied().collect();
            assert_eq!(s.segments(c).collect::<Vec<_>>(), live);
        }
    }

    /// Narrow and wide words, and any column size, hold what the model does through
    /// assignments, releases, relocations, compactions, changes of layout and round trips.
    #[test]
    fn slots_follow_the_model_in_every_layout() {
        let cells = 320u32;
        let mut rng = crate::random::Random::new(3);
        let mut wide = CellSlots::new(cells as usize, 32);
        let mut narrow = wide.clone();
        narrow.rebuild(cells as usize, 32, true);
        assert!(narrow.arena.is_narrow() && !wide.arena.is_narrow());
        let mut model = vec![ModelCell::default(); cells as usize];
        let mut live: Vec<(u32, u32)> = Vec::new();
        for seg in 0..6000u32 {
            if !live.is_empty() && rng.below(2) == 0 {
                let (cell, slot) = live.swap_remove(rng.below(live.len() as u32) as usize);
                wide.release(cell, slot);
                narrow.release(cell, slot);
                let m = &mut model[cell as usize];
                m.slots[slot as usize] = None;
                m.free.push(slot);
            } else {
                // Clustered in a few columns, as learning cells are.
                let cell = rng.below(cells / 4) * 4 % cells + rng.below(4);
                let slot = wide.assign(cell, seg);
                assert_eq!(narrow.assign(cell, seg), slot);
                let m = &mut model[cell as usize];
                let expected = m.free.pop().unwrap_or(m.slots.len() as u32);
                assert_eq!(slot, expected);
                if slot as usize == m.slots.len() {
                    m.slots.push(Some(seg));
                } else {
                    m.slots[slot as usize] = Some(seg);
                }
                live.push((cell, slot));
            }
            if seg % 500 == 0 {
                check(&wide, &model);
                check(&narrow, &model);
            }
        }
        assert!(wide.abandoned > 0 || wide.arena.len() > 1000);
        assert_eq!(narrow, wide);
        check(&narrow, &model);
        narrow.rebuild(cells as usize, 32, false);
        assert!(!narrow.arena.is_narrow());
        assert_eq!(narrow, wide);
        for cpc in [1, 7, 64] {
            let mut other = wide.clone();
            other.rebuild(cells as usize, cpc, true);
            check(&other, &model);
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(&other, cfg).unwrap();
            assert_eq!(bytes, bincode::serde::encode_to_vec(&wide, cfg).unwrap());
            let (mut back, _): (CellSlots, _) =
                bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            back.rebuild(cells as usize, 32, true);
            check(&back, &model);
            assert_eq!(back, wide);
        }
        wide.compact();
        check(&wide, &model);
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
