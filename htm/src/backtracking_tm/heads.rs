//! Per-cell words (where a cell's block starts in an arena) for the TM's block arenas.

/// Cells per group: a column's cells under NAB's settings.
const GROUP_BITS: u32 = 5;
const GROUP: usize = 1 << GROUP_BITS;

/// A group's cells with a word: which ones, and where their words start.
#[derive(Clone, Copy, Debug, Default)]
struct Group {
    /// Index in `words` of the first of them (meaningless when there are none).
    base: u32,
    /// Bit `i`: cell `i` of the group has a word.
    present: u32,
}

/// A `u32` per cell, 0 by default, holding only the non-zero ones: per group of 32
/// consecutive cells, a bitmap of the cells with a word and where the group's words start,
/// so a cell's word is found by counting the group's cells before it. Only the columns the
/// input reaches ever have blocks (a few hundred of NAB's 2048), and few of their cells (a
/// fifth), so this holds a tenth of a flat table. `words[0]` is 0 and stands for every cell
/// without a word, so a read is three loads and no branch.
///
/// A group that gains or loses a cell moves its words to the end of `words`; the place
/// they leave is reclaimed by laying the groups out again once such places make up a
/// quarter.
#[derive(Clone, Debug)]
pub(super) struct CellHeads {
    num_cells: usize,
    groups: Vec<Group>,
    words: Vec<u32>,
    /// Words in places that groups have moved out of.
    abandoned: usize,
}

impl CellHeads {
    pub(super) fn new(num_cells: usize) -> Self {
        CellHeads {
            num_cells,
            groups: vec![Group::default(); num_cells.div_ceil(GROUP)],
            words: vec![0],
            abandoned: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.num_cells
    }

    /// Where `cell`'s word is in `words`: its rank among the group's cells with one, after
    /// the group's base; 0 when it has none.
    #[inline(always)]
    fn index(&self, cell: u32) -> usize {
        let g = self.groups[(cell >> GROUP_BITS) as usize];
        let bit = cell & (GROUP as u32 - 1);
        let rank = (g.present & ((1 << bit) - 1)).count_ones();
        let present = g.present >> bit & 1;
        ((g.base + rank) * present) as usize
    }

    #[inline(always)]
    pub(super) fn get(&self, cell: u32) -> u32 {
        self.words[self.index(cell)]
    }

    pub(super) fn set(&mut self, cell: u32, value: u32) {
        let i = self.index(cell);
        if i != 0 && value != 0 {
            self.words[i] = value;
            return;
        }
        if i == 0 && value == 0 {
            return;
        }
        let gi = (cell >> GROUP_BITS) as usize;
        let Group { base, present } = self.groups[gi];
        let bit = 1 << (cell & (GROUP as u32 - 1));
        let (base, n) = (base as usize, present.count_ones() as usize);
        let rank = (present & (bit - 1)).count_ones() as usize;
        let present = present ^ bit;
        let start = self.words.len();
        if value != 0 && rank == n && (n == 0 || base + n == start) {
            // The group's last word, and its words end `words` (as when cells are set in
            // ascending order): appended in place.
            super::store::reserve_gradually(&mut self.words, 1);
            self.words.push(value);
            let base = if n == 0 { start } else { base };
            self.groups[gi] = Group {
                base: u32::try_from(base).expect("cell words within u32"),
                present,
            };
            return;
        }
        // The cell gains or loses its word: the group's words move to the end.
        super::store::reserve_gradually(&mut self.words, n + 1);
        self.words.extend_from_within(base..base + rank);
        if value != 0 {
            self.words.push(value);
            self.words.extend_from_within(base + rank..base + n);
        } else {
            self.words.extend_from_within(base + rank + 1..base + n);
        }
        self.groups[gi] = Group {
            base: u32::try_from(start).expect("cell words within u32"),
            present,
        };
        self.abandoned += n;
        if self.abandoned > 256 && self.abandoned * 4 > self.words.len() {
            self.compact();
        }
    }

    /// Lays the groups' words out again in group order, without abandoned places.
    fn compact(&mut self) {
        let live: usize = self
            .groups
            .iter()
            .map(|g| g.present.count_ones() as usize)
            .sum();
        let mut words = Vec::with_capacity(1 + live + live / 16);
        words.push(0);
        for g in &mut self.groups {
            let n = g.present.count_ones() as usize;
            let base = g.base as usize;
            g.base = words.len() as u32;
            words.extend_from_slice(&self.words[base..base + n]);
        }
        self.words = words;
        self.abandoned = 0;
    }

    /// Cells with a non-zero word, ascending.
    pub(super) fn nonzero(&self) -> impl Iterator<Item = u32> + '_ {
        self.groups.iter().enumerate().flat_map(|(i, g)| {
            let mut bits = g.present;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let j = bits.trailing_zeros();
                    bits &= bits - 1;
                    (i as u32) << GROUP_BITS | j
                })
            })
        })
    }

    /// Grows (or shrinks) to `num_cells` cells.
    pub(super) fn resize(&mut self, num_cells: usize) {
        self.num_cells = num_cells;
        self.groups
            .resize(num_cells.div_ceil(GROUP), Group::default());
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.groups.capacity() * std::mem::size_of::<Group>() + self.words.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_read_back_and_only_cells_with_one_hold_memory() {
        let mut h = CellHeads::new(65536);
        assert_eq!(h.get(12345), 0);
        h.set(12345, 7);
        h.set(12346, 9);
        h.set(40000, 0); // a zero write allocates nothing
        h.set(65535, 3);
        h.set(12344, 5);
        assert_eq!((h.get(12345), h.get(12346), h.get(12344)), (7, 9, 5));
        assert_eq!(h.get(65535), 3);
        assert_eq!(h.get(12347), 0);
        assert_eq!(
            h.nonzero().collect::<Vec<_>>(),
            [12344, 12345, 12346, 65535]
        );
        h.set(12345, 0);
        assert_eq!(h.nonzero().collect::<Vec<_>>(), [12344, 12346, 65535]);
        assert_eq!((h.get(12345), h.get(12346), h.get(12344)), (0, 9, 5));
    }

    /// Random writes read back as a flat table does, through moves and compactions.
    #[test]
    fn matches_a_flat_table() {
        let mut rng = crate::random::Random::new(11);
        let cells = 3000;
        let mut h = CellHeads::new(cells);
        let mut flat = vec![0u32; cells];
        for step in 0..20_000 {
            let cell = rng.below(cells as u32);
            let value = if rng.below(3) == 0 {
                0
            } else {
                1 + rng.below(1000)
            };
            h.set(cell, value);
            flat[cell as usize] = value;
            if step % 1000 == 0 {
                assert!((0..cells as u32).all(|c| h.get(c) == flat[c as usize]));
                let nonzero: Vec<u32> = (0..cells as u32)
                    .filter(|&c| flat[c as usize] != 0)
                    .collect();
                assert_eq!(h.nonzero().collect::<Vec<_>>(), nonzero);
            }
        }
        assert!(h.words.len() <= 1 + cells + cells / 3);
        // Set in ascending order (a rebuild), words are appended in place.
        let mut h = CellHeads::new(cells);
        for c in (0..cells as u32).step_by(3) {
            h.set(c, c + 1);
        }
        assert_eq!((h.words.len(), h.abandoned), (1 + cells / 3, 0));
        assert!((0..cells as u32).all(|c| h.get(c) == if c % 3 == 0 { c + 1 } else { 0 }));
    }
}
