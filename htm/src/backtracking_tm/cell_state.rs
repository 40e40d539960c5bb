//! A binary per-cell state kept both as a list of on cells and as a dense lookup table.

use serde::{Deserialize, Serialize};

/// NuPIC's `CStateIndexed`: a dense table for O(1) membership plus the list of on cells, so
/// clearing and copying cost the number of on cells rather than the number of cells. The
/// table is a bitset (8 KiB for 65,536 cells) so that lookups stay in L1.
///
/// Only the list is serialised; the table is rebuilt by [`CellState::rebuild`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct CellState {
    on: Vec<u32>,
    #[serde(skip)]
    dense: Vec<u64>,
}

fn words(num_cells: usize) -> usize {
    num_cells.div_ceil(64)
}

/// The table is derived from the list, so equality is the list's.
impl PartialEq for CellState {
    fn eq(&self, other: &Self) -> bool {
        self.on == other.on
    }
}

impl CellState {
    pub(crate) fn new(num_cells: usize) -> Self {
        CellState {
            on: Vec::new(),
            dense: vec![0; words(num_cells)],
        }
    }

    /// Restores the dense table after deserialisation.
    pub(crate) fn rebuild(&mut self, num_cells: usize) {
        self.dense = vec![0; words(num_cells)];
        for &c in &self.on {
            self.dense[(c >> 6) as usize] |= 1 << (c & 63);
        }
    }

    #[inline]
    pub(crate) fn is_set(&self, cell: u32) -> bool {
        self.dense[(cell >> 6) as usize] >> (cell & 63) & 1 != 0
    }

    #[inline]
    pub(crate) fn set(&mut self, cell: u32) {
        let w = &mut self.dense[(cell >> 6) as usize];
        let bit = 1u64 << (cell & 63);
        if *w & bit == 0 {
            *w |= bit;
            self.on.push(cell);
        }
    }

    /// The states of cells `start..start + len` (`len <= 64`) as the low bits of a word.
    #[inline]
    pub(crate) fn bits(&self, start: u32, len: u32) -> u64 {
        debug_assert!((1..=64).contains(&len));
        let (w, b) = ((start >> 6) as usize, start & 63);
        let mut v = self.dense[w] >> b;
        if b + len > 64 {
            v |= self.dense[w + 1] << (64 - b);
        }
        if len == 64 {
            v
        } else {
            v & ((1u64 << len) - 1)
        }
    }

    /// Sets cell `start + i` for every bit `i` of `mask`, ascending.
    #[inline]
    pub(crate) fn set_bits(&mut self, start: u32, mut mask: u64) {
        while mask != 0 {
            self.set(start + mask.trailing_zeros());
            mask &= mask - 1;
        }
    }

    pub(crate) fn reset(&mut self) {
        for &c in &self.on {
            self.dense[(c >> 6) as usize] = 0;
        }
        self.on.clear();
    }

    /// Makes this state equal to `cells` (which must be free of duplicates).
    pub(crate) fn assign(&mut self, cells: &[u32]) {
        self.reset();
        for &c in cells {
            self.dense[(c >> 6) as usize] |= 1 << (c & 63);
        }
        self.on.extend_from_slice(cells);
    }

    pub(crate) fn copy_from(&mut self, other: &CellState) {
        self.assign(&other.on);
    }

    /// On cells, in the order they were set (ascending everywhere this module sets them).
    pub(crate) fn cells(&self) -> &[u32] {
        &self.on
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.on.len()
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.on.capacity() * 4 + self.dense.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reset_copy_and_rebuild() {
        let mut a = CellState::new(10);
        a.set(3);
        a.set(7);
        a.set(3);
        assert_eq!(a.cells(), &[3, 7]);
        assert!(a.is_set(7) && !a.is_set(4));
        let mut b = CellState::new(10);
        b.set(1);
        b.copy_from(&a);
        assert!(!b.is_set(1) && b.is_set(3));
        assert_eq!(b, a);
        a.reset();
        assert_eq!(a.len(), 0);
        assert!(!a.is_set(3));
        let bytes = bincode::serde::encode_to_vec(&b, bincode::config::standard()).unwrap();
        let (mut c, _): (CellState, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        c.rebuild(10);
        assert!(c.is_set(7) && !c.is_set(2));
        assert_eq!(c, b);
    }

    #[test]
    fn bit_ranges_match_single_cells() {
        let mut a = CellState::new(300);
        for c in [0, 5, 63, 64, 100, 127, 128, 200, 255, 299] {
            a.set(c);
        }
        for start in [0u32, 1, 30, 60, 63, 64, 99, 120, 236] {
            for len in [1u32, 7, 32, 33, 64] {
                if start + len > 300 {
                    continue;
                }
                let expected = (0..len)
                    .filter(|&i| a.is_set(start + i))
                    .fold(0u64, |m, i| m | 1 << i);
                assert_eq!(a.bits(start, len), expected, "start {start} len {len}");
            }
        }
        let mut b = CellState::new(300);
        b.set_bits(60, 0b1011 | 1 << 40);
        assert_eq!(b.cells(), &[60, 61, 63, 100]);
    }
}
