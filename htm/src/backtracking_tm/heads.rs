//! Per-cell words (where a cell's block starts in an arena) for the TM's block arenas.

/// Cells per group: one presence bit each in a group's mask.
const GROUP_BITS: u32 = 5;
const GROUP: usize = 1 << GROUP_BITS;

/// A `u32` per cell, 0 by default, holding memory only for the cells whose word is not 0.
/// Only cells the input reaches ever have blocks (~4,000 of NAB's 65,536), and a dense
/// table, even one allocated a column at a time, would be mostly zeros.
///
/// Per group of 32 consecutive cells, one `u64`: a mask of the cells with a word (low half)
/// and where the group's words start in `words` (high half); a cell's word comes after
/// those of the cells below it in the mask. An absent cell reads `words[0]`, always 0, so a
/// read is two loads, a bit count and no branch.
#[derive(Clone, Debug)]
pub(super) struct CellHeads {
    num_cells: usize,
    /// Per group: presence mask | first word's index << 32. The index is 1 plus the words
    /// of all lower groups, empty groups included, so it stays right when a word is
    /// added or removed in a group below.
    groups: Vec<u64>,
    /// 0, then the non-zero words, in cell order.
    words: Vec<u32>,
}

impl CellHeads {
    pub(super) fn new(num_cells: usize) -> Self {
        CellHeads {
            num_cells,
            groups: vec![1 << 32; num_cells.div_ceil(GROUP)],
            words: vec![0],
        }
    }

    pub(super) fn len(&self) -> usize {
        self.num_cells
    }

    /// Where `cell`'s word is in `words` if it has one, and whether it has.
    #[inline(always)]
    fn locate(&self, cell: u32) -> (usize, bool) {
        let g = self.groups[(cell >> GROUP_BITS) as usize];
        let bit = cell & (GROUP as u32 - 1);
        let mask = g as u32;
        let below = (mask & ((1 << bit) - 1)).count_ones();
        ((g >> 32) as usize + below as usize, mask >> bit & 1 != 0)
    }

    #[inline]
    pub(super) fn get(&self, cell: u32) -> u32 {
        let (at, present) = self.locate(cell);
        // An absent cell reads the leading 0 (a conditional move, not a branch).
        self.words[if present { at } else { 0 }]
    }

    /// Sets `cell`'s word. Giving a cell its first word, or taking its word away (`value`
    /// 0), shifts the words above it and the groups above its own: blocks are given out and
    /// dropped rarely (a cell's first block; compaction drops a block only if empty).
    pub(super) fn set(&mut self, cell: u32, value: u32) {
        let (at, present) = self.locate(cell);
        let group = (cell >> GROUP_BITS) as usize;
        let bit = 1u64 << (cell & (GROUP as u32 - 1));
        match (present, value != 0) {
            (true, true) => self.words[at] = value,
            (false, false) => {}
            (false, true) => {
                crate::reserve_gradually(&mut self.words, 1, 0);
                self.words.insert(at, value);
                self.groups[group] |= bit;
                self.groups[group + 1..]
                    .iter_mut()
                    .for_each(|g| *g += 1 << 32);
            }
            (true, false) => {
                self.words.remove(at);
                self.groups[group] &= !bit;
                self.groups[group + 1..]
                    .iter_mut()
                    .for_each(|g| *g -= 1 << 32);
            }
        }
    }

    /// Cells with a non-zero word, ascending, with their words.
    pub(super) fn nonzero(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let groups = self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, &g)| g as u32 != 0);
        groups.flat_map(move |(i, &g)| {
            let mut mask = g as u32;
            let words = &self.words[(g >> 32) as usize..][..mask.count_ones() as usize];
            words.iter().map(move |&word| {
                let bit = mask.trailing_zeros();
                mask &= mask - 1;
                ((i as u32) << GROUP_BITS | bit, word)
            })
        })
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.groups.capacity() * 8 + self.words.capacity() * 4
    }
}

/// Builds a [`CellHeads`] from words given in ascending cell order, in one pass and with
/// the exact memory, where setting them one by one would shift the words each time.
pub(super) struct HeadsBuilder {
    heads: CellHeads,
    /// Groups below this one have their start index set.
    next_group: usize,
}

impl HeadsBuilder {
    /// A builder for `num_cells` cells, `nonzero` of which (at most) will get a word.
    pub(super) fn new(num_cells: usize, nonzero: usize) -> Self {
        let mut words = Vec::with_capacity(1 + nonzero);
        words.push(0);
        HeadsBuilder {
            heads: CellHeads {
                num_cells,
                groups: vec![0; num_cells.div_ceil(GROUP)],
                words,
            },
            next_group: 0,
        }
    }

    /// Gives `cell` the word `value`; `cell` must be above every cell given before.
    pub(super) fn push(&mut self, cell: u32, value: u32) {
        debug_assert!(value != 0, "a zero word is the default");
        let group = (cell >> GROUP_BITS) as usize;
        self.start_groups_to(group + 1);
        let g = &mut self.heads.groups[group];
        let bit = 1u64 << (cell & (GROUP as u32 - 1));
        debug_assert!(
            *g as u32 >> (cell & (GROUP as u32 - 1)) == 0,
            "cells ascend"
        );
        *g |= bit;
        self.heads.words.push(value);
    }

    /// Sets the start index of the groups below `end` not yet started: the words so far.
    fn start_groups_to(&mut self, end: usize) {
        let start = (self.heads.words.len() as u64) << 32;
        for g in &mut self.heads.groups[self.next_group.min(end)..end] {
            *g = start;
        }
        self.next_group = self.next_group.max(end);
    }

    pub(super) fn finish(mut self) -> CellHeads {
        self.start_groups_to(self.heads.groups.len());
        self.heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Random;

    #[test]
    fn words_read_back_and_only_cells_with_words_hold_memory() {
        let mut h = CellHeads::new(65536);
        assert_eq!(h.get(12345), 0);
        h.set(12345, 7);
        h.set(12346, 9);
        h.set(40000, 0); // a zero write allocates nothing
        h.set(65535, 3);
        h.set(31, 4); // the last cell of a group
        h.set(0, 5); // below all others: every word shifts
        assert_eq!((h.get(12345), h.get(12346), h.get(12344)), (7, 9, 0));
        assert_eq!((h.get(65535), h.get(31), h.get(0), h.get(30)), (3, 4, 5, 0));
        let cells = |h: &CellHeads| h.nonzero().map(|(c, _)| c).collect::<Vec<_>>();
        assert_eq!(cells(&h), [0, 31, 12345, 12346, 65535]);
        assert_eq!(
            h.nonzero().map(|(_, w)| w).collect::<Vec<_>>(),
            [5, 4, 7, 9, 3]
        );
        assert_eq!(h.words.len(), 1 + 5, "the zero word and one per cell");
        h.set(12345, 0);
        h.set(12346, 11);
        assert_eq!(cells(&h), [0, 31, 12346, 65535]);
        assert_eq!((h.get(12345), h.get(12346), h.get(65535)), (0, 11, 3));
        assert_eq!(h.words.len(), 1 + 4, "a word taken away is given back");
    }

    /// Random sets against a dense table; then the builder, fed the same words in cell
    /// order, gives the same structure.
    #[test]
    fn matches_a_dense_table_and_building_equals_setting() {
        let n = 3000;
        let mut rng = Random::new(7);
        let mut heads = CellHeads::new(n);
        let mut dense = vec![0u32; n];
        for step in 0..20_000 {
            // Clustered cells (as a column's fire together), a third of the writes zeros.
            let cell = (rng.below(40) * 64 + rng.below(40)) % n as u32;
            let value = if rng.below(3) == 0 {
                0
            } else {
                1 + rng.below(1000)
            };
            heads.set(cell, value);
            dense[cell as usize] = value;
            if step % 997 == 0 {
                assert!((0..n as u32).all(|c| heads.get(c) == dense[c as usize]));
            }
        }
        let nonzero: Vec<u32> = (0..n as u32).filter(|&c| dense[c as usize] != 0).collect();
        assert!(nonzero.len() > 100);
        let words: Vec<(u32, u32)> = nonzero.iter().map(|&c| (c, dense[c as usize])).collect();
        assert_eq!(heads.nonzero().collect::<Vec<_>>(), words);
        assert_eq!(heads.words.len(), 1 + nonzero.len());

        let mut b = HeadsBuilder::new(n, nonzero.len());
        for &c in &nonzero {
            b.push(c, dense[c as usize]);
        }
        let built = b.finish();
        assert_eq!((&built.groups, &built.words), (&heads.groups, &heads.words));
        assert_eq!(built.words.capacity(), built.words.len(), "built exact");
        // Whatever it was built from, it keeps taking sets.
        let mut built = built;
        built.set(0, 1);
        built.set(n as u32 - 1, 0);
        assert_eq!((built.get(0), built.get(n as u32 - 1)), (1, 0));
    }

    #[test]
    fn an_empty_build_reads_zeros() {
        let h = HeadsBuilder::new(100, 0).finish();
        assert!((0..100).all(|c| h.get(c) == 0));
        assert_eq!(h.nonzero().count(), 0);
        assert_eq!(h.groups, CellHeads::new(100).groups);
    }
}
