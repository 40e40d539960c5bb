//! Per-cell words (where a cell's block starts in an arena) for the TM's block arenas.

/// Cells per group: a column's cells under NAB's settings.
const GROUP_BITS: u32 = 5;
const GROUP: usize = 1 << GROUP_BITS;

/// A `u32` per cell, 0 by default, stored by groups of 32 consecutive cells: a group gets
/// its words when one of its cells first gets a non-zero one. Only the columns the input
/// reaches ever have blocks (a few hundred of NAB's 2048), so this holds ~1/4 of a flat
/// table. Group 0 is all zeros and shared by every group without words, so a read is two
/// loads and no branch.
#[derive(Clone, Debug)]
pub(super) struct CellHeads {
    num_cells: usize,
    /// Per group, its first word in `words` divided by [`GROUP`] (0: the zero group).
    groups: Vec<u32>,
    words: Vec<u32>,
}

impl CellHeads {
    pub(super) fn new(num_cells: usize) -> Self {
        CellHeads {
            num_cells,
            groups: vec![0; num_cells.div_ceil(GROUP)],
            words: vec![0; GROUP],
        }
    }

    pub(super) fn len(&self) -> usize {
        self.num_cells
    }

    #[inline]
    pub(super) fn get(&self, cell: u32) -> u32 {
        let g = self.groups[(cell >> GROUP_BITS) as usize] as usize;
        self.words[g * GROUP + (cell as usize & (GROUP - 1))]
    }

    #[inline]
    pub(super) fn set(&mut self, cell: u32, value: u32) {
        let slot = &mut self.groups[(cell >> GROUP_BITS) as usize];
        if *slot == 0 {
            if value == 0 {
                return;
            }
            *slot = u32::try_from(self.words.len() / GROUP).expect("cell groups within u32");
            super::store::reserve_gradually(&mut self.words, GROUP);
            self.words.resize(self.words.len() + GROUP, 0);
        }
        self.words[*slot as usize * GROUP + (cell as usize & (GROUP - 1))] = value;
    }

    /// Cells with a non-zero word, ascending.
    pub(super) fn nonzero(&self) -> impl Iterator<Item = u32> + '_ {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, &g)| g != 0)
            .flat_map(move |(i, &g)| {
                let words = &self.words[g as usize * GROUP..(g as usize + 1) * GROUP];
                (0..GROUP as u32)
                    .filter(move |&j| words[j as usize] != 0)
                    .map(move |j| (i as u32) << GROUP_BITS | j)
            })
    }

    pub(super) fn heap_bytes(&self) -> usize {
        (self.groups.capacity() + self.words.capacity()) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_read_back_and_only_touched_groups_hold_memory() {
        let mut h = CellHeads::new(65536);
        assert_eq!(h.get(12345), 0);
        h.set(12345, 7);
        h.set(12346, 9);
        h.set(40000, 0); // a zero write allocates nothing
        h.set(65535, 3);
        assert_eq!((h.get(12345), h.get(12346), h.get(12344)), (7, 9, 0));
        assert_eq!(h.get(65535), 3);
        assert_eq!(h.nonzero().collect::<Vec<_>>(), [12345, 12346, 65535]);
        assert_eq!(h.words.len(), 3 * GROUP, "the zero group and two more");
        h.set(12345, 0);
        assert_eq!(h.nonzero().collect::<Vec<_>>(), [12346, 65535]);
    }
}
