//! Binary per-cell states: kept both as a list of on cells and as a dense lookup table
//! ([`CellState`]), or as the ascending list alone ([`CellList`]).

use serde::{Deserialize, Serialize};

/// NuPIC's `CStateIndexed`, for the states looked up cell by cell: the list of on cells and a
/// dense table for O(1) membership, so clearing and copying cost the number of on cells rather
/// than the number of cells. The table is a bitset (8 KiB for 65,536 cells) so that lookups
/// stay in L1; it is not kept here but passed in (see [`Bits`]): the TM keeps its tables with
/// its thread's scratch, all clear between computes, and marks them from the lists when it
/// starts computing.
///
/// Only the list is serialised.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct CellState {
    on: Vec<u32>,
}

/// A dense table of cells, as bits.
pub(crate) type Bits = Vec<u64>;

/// Sizes `bits` for `num_cells` cells (all clear if it was).
pub(crate) fn size_bits(bits: &mut Bits, num_cells: usize) {
    bits.resize(num_cells.div_ceil(64), 0);
}

#[inline]
pub(crate) fn is_set(bits: &[u64], cell: u32) -> bool {
    bits[(cell >> 6) as usize] >> (cell & 63) & 1 != 0
}

impl CellState {
    /// Sets this state's bits in `bits` (clear, or marked from this state).
    pub(crate) fn mark(&self, bits: &mut [u64]) {
        for &c in &self.on {
            bits[(c >> 6) as usize] |= 1 << (c & 63);
        }
    }

    /// Clears this state's bits in `bits`, which leaves them all clear.
    pub(crate) fn unmark(&self, bits: &mut [u64]) {
        for &c in &self.on {
            bits[(c >> 6) as usize] = 0;
        }
    }

    #[inline]
    pub(crate) fn set(&mut self, bits: &mut [u64], cell: u32) {
        let w = &mut bits[(cell >> 6) as usize];
        let bit = 1u64 << (cell & 63);
        if *w & bit == 0 {
            *w |= bit;
            self.on.push(cell);
        }
    }

    pub(crate) fn reset(&mut self, bits: &mut [u64]) {
        self.unmark(bits);
        self.on.clear();
    }

    /// Makes this state (with `bits`) equal to `other`.
    pub(crate) fn copy_from(&mut self, bits: &mut [u64], other: &CellState) {
        self.reset(bits);
        self.on.extend_from_slice(&other.on);
        self.mark(bits);
    }

    /// On cells, in the order they were set (ascending everywhere this module sets them).
    pub(crate) fn cells(&self) -> &[u32] {
        &self.on
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.on.capacity() * 4
    }
}

/// A binary per-cell state kept only as its on cells, ascending: for the states that are
/// listed, copied, and asked about whole columns in ascending column order, which a cursor
/// over the list answers (a dense table costs 8 KiB per state for 65,536 cells, and keeping
/// it costs a clear and a set per cell on every copy).
///
/// Serialises as [`CellState`] does (the list); a list that is not strictly ascending is
/// refused.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "CellStateWire")]
pub(crate) struct CellList {
    on: Vec<u32>,
}

/// The serialised form of both states.
#[derive(Deserialize)]
struct CellStateWire {
    on: Vec<u32>,
}

impl TryFrom<CellStateWire> for CellList {
    type Error = String;

    fn try_from(w: CellStateWire) -> Result<Self, String> {
        if !w.on.windows(2).all(|p| p[0] < p[1]) {
            return Err("a cell list is not strictly ascending".into());
        }
        Ok(CellList { on: w.on })
    }
}

impl CellList {
    /// Sets `cell`, which must not be below any cell set since the last reset (setting the
    /// last one again changes nothing).
    #[inline]
    pub(crate) fn set(&mut self, cell: u32) {
        match self.on.last() {
            Some(&last) if last >= cell => debug_assert_eq!(last, cell, "cells out of order"),
            _ => self.on.push(cell),
        }
    }

    /// Sets every cell of `start..end` (above any cell set since the last reset).
    #[inline]
    pub(crate) fn set_range(&mut self, start: u32, end: u32) {
        debug_assert!(self.on.last().is_none_or(|&last| last < start));
        self.on.extend(start..end);
    }

    /// Sets `cells` (strictly ascending, above any cell set since the last reset).
    #[inline]
    pub(crate) fn extend(&mut self, cells: &[u32]) {
        debug_assert!(cells.windows(2).all(|p| p[0] < p[1]));
        debug_assert!(match (self.on.last(), cells.first()) {
            (Some(last), Some(first)) => last < first,
            _ => true,
        });
        self.on.extend_from_slice(cells);
    }

    pub(crate) fn reset(&mut self) {
        self.on.clear();
    }

    /// Makes this state equal to `cells` (strictly ascending).
    pub(crate) fn assign(&mut self, cells: &[u32]) {
        debug_assert!(cells.windows(2).all(|p| p[0] < p[1]));
        self.on.clear();
        self.on.extend_from_slice(cells);
    }

    pub(crate) fn copy_from(&mut self, other: &CellList) {
        self.assign(&other.on);
    }

    /// On cells, ascending.
    pub(crate) fn cells(&self) -> &[u32] {
        &self.on
    }

    /// A cursor answering for ranges of cells asked in ascending order.
    pub(crate) fn cursor(&self) -> Cursor<'_> {
        Cursor { rest: &self.on }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.on.capacity() * 4
    }
}

/// Reads a [`CellList`] range by range, each starting at or past the end of the one before.
pub(crate) struct Cursor<'a> {
    rest: &'a [u32],
}

impl<'a> Cursor<'a> {
    /// The on cells of `start..end`.
    #[inline]
    pub(crate) fn range(&mut self, start: u32, end: u32) -> &'a [u32] {
        let skip = self.rest.iter().take_while(|&&c| c < start).count();
        let rest = &self.rest[skip..];
        let n = rest.iter().take_while(|&&c| c < end).count();
        let (range, rest) = rest.split_at(n);
        self.rest = rest;
        range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reset_copy_and_mark() {
        let (mut bits_a, mut bits_b) = (Bits::new(), Bits::new());
        size_bits(&mut bits_a, 10);
        size_bits(&mut bits_b, 10);
        let mut a = CellState::default();
        a.set(&mut bits_a, 3);
        a.set(&mut bits_a, 7);
        a.set(&mut bits_a, 3);
        assert_eq!(a.cells(), &[3, 7]);
        assert!(is_set(&bits_a, 7) && !is_set(&bits_a, 4));
        let mut b = CellState::default();
        b.set(&mut bits_b, 1);
        b.copy_from(&mut bits_b, &a);
        assert!(!is_set(&bits_b, 1) && is_set(&bits_b, 3));
        assert_eq!(b, a);
        a.reset(&mut bits_a);
        assert!(a.cells().is_empty() && bits_a.iter().all(|&w| w == 0));
        let bytes = bincode::serde::encode_to_vec(&b, bincode::config::standard()).unwrap();
        let (c, _): (CellState, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        let mut bits_c = Bits::new();
        size_bits(&mut bits_c, 10);
        c.mark(&mut bits_c);
        assert!(is_set(&bits_c, 7) && !is_set(&bits_c, 2));
        assert_eq!(c, b);
        c.unmark(&mut bits_c);
        assert!(bits_c.iter().all(|&w| w == 0));
    }

    /// A list and a cursor over it answer as a dense state set with the same cells would,
    /// whatever the cells and the ranges asked.
    #[test]
    fn lists_and_cursors_agree_with_dense_states() {
        let mut rng = crate::random::Random::new(11);
        for _ in 0..200 {
            let n = 1 + rng.below(400);
            let mut dense = CellState::default();
            let mut bits = Bits::new();
            size_bits(&mut bits, n as usize);
            let mut list = CellList::default();
            for c in 0..n {
                if rng.below(4) == 0 {
                    dense.set(&mut bits, c);
                    list.set(c);
                    if rng.below(2) == 0 {
                        list.set(c);
                    }
                }
            }
            assert_eq!(list.cells(), dense.cells());
            let len = 1 + rng.below(n);
            let mut cursor = list.cursor();
            let mut start = rng.below(len);
            while start + len <= n {
                let expected: Vec<u32> =
                    (start..start + len).filter(|&c| is_set(&bits, c)).collect();
                assert_eq!(cursor.range(start, start + len), expected);
                start += len + rng.below(3 * len);
            }
            let mut rebuilt = CellList::default();
            let mut cursor = list.cursor();
            for start in (0..n).step_by(len as usize) {
                let end = (start + len).min(n);
                match cursor.range(start, end) {
                    [] => {}
                    on if on.len() == (end - start) as usize => rebuilt.set_range(start, end),
                    on => rebuilt.extend(on),
                }
            }
            assert_eq!(rebuilt, list);
            let mut copy = CellList::default();
            copy.set(n + 5);
            copy.copy_from(&list);
            assert_eq!(copy, list);
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(&list, cfg).unwrap();
            assert_eq!(bytes, bincode::serde::encode_to_vec(&dense, cfg).unwrap());
            let (back, _): (CellList, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            assert_eq!(back, list);
        }
        let cfg = bincode::config::standard();
        let unsorted = bincode::serde::encode_to_vec(vec![3u32, 2], cfg).unwrap();
        let err = bincode::serde::decode_from_slice::<CellList, _>(&unsorted, cfg).unwrap_err();
        assert!(err.to_string().contains("not strictly ascending"), "{err}");
    }
}
