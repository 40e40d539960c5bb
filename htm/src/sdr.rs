//! Sparse distributed representations.

use serde::{Deserialize, Serialize};

/// A binary vector of `size` bits kept as the sorted, de-duplicated list of its active bits.
///
/// HTM vectors are 1–4 % dense, so the sparse form is both smaller and faster for every
/// operation the algorithms need (overlap, iteration, concatenation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sdr {
    size: u32,
    active: Vec<u32>,
}

impl Sdr {
    /// Heap bytes held (capacity-based), for memory reporting.
    pub fn heap_bytes(&self) -> usize {
        4 * self.active.capacity()
    }

    /// An all-zero SDR of `size` bits.
    pub fn new(size: usize) -> Self {
        Sdr {
            size: u32::try_from(size).expect("SDR size fits in u32"),
            active: Vec::new(),
        }
    }

    /// Builds an SDR from active indices in any order; duplicates are merged.
    ///
    /// # Panics
    /// If an index is `>= size`: that is a programming error in the caller.
    pub fn from_sparse(size: usize, mut active: Vec<u32>) -> Self {
        let mut sdr = Sdr::new(size);
        active.sort_unstable();
        active.dedup();
        if let Some(&last) = active.last() {
            assert!(
                last < sdr.size,
                "SDR bit {last} out of range for size {size}"
            );
        }
        sdr.active = active;
        sdr
    }

    /// Builds an SDR from a dense 0/1 slice.
    pub fn from_dense(dense: &[bool]) -> Self {
        let active = dense
            .iter()
            .enumerate()
            .filter(|(_, &on)| on)
            .map(|(i, _)| i as u32)
            .collect();
        Sdr {
            size: dense.len() as u32,
            active,
        }
    }

    /// Replaces the active bits, reusing the allocation. `active` must be sorted and unique.
    pub fn set_sorted(&mut self, active: &[u32]) {
        debug_assert!(
            active.windows(2).all(|w| w[0] < w[1]),
            "bits must be sorted"
        );
        debug_assert!(active.last().is_none_or(|&b| b < self.size));
        self.active.clear();
        self.active.extend_from_slice(active);
    }

    /// Clears all bits.
    pub fn clear(&mut self) {
        self.active.clear();
    }

    /// Number of bits in the vector.
    pub fn size(&self) -> usize {
        self.size as usize
    }

    /// Sorted indices of the active bits.
    pub fn sparse(&self) -> &[u32] {
        &self.active
    }

    /// Number of active bits.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// True when no bit is active.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Whether bit `i` is active.
    pub fn contains(&self, i: u32) -> bool {
        self.active.binary_search(&i).is_ok()
    }

    /// Number of bits active in both vectors.
    pub fn overlap(&self, other: &Sdr) -> usize {
        sorted_intersection_len(&self.active, &other.active)
    }

    /// Dense 0/1 form.
    pub fn to_dense(&self) -> Vec<bool> {
        let mut dense = vec![false; self.size()];
        for &i in &self.active {
            dense[i as usize] = true;
        }
        dense
    }

    /// Concatenates SDRs end to end (the way NuPIC's MultiEncoder lays out its fields).
    pub fn concat(parts: &[&Sdr]) -> Sdr {
        let mut out = Sdr::new(parts.iter().map(|p| p.size()).sum());
        let mut offset = 0u32;
        for p in parts {
            out.active.extend(p.active.iter().map(|&b| b + offset));
            offset += p.size;
        }
        out
    }
}

/// Length of the intersection of two sorted, de-duplicated slices.
pub fn sorted_intersection_len(a: &[u32], b: &[u32]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_input_is_sorted_and_deduplicated() {
        let s = Sdr::from_sparse(10, vec![7, 2, 7, 0]);
        assert_eq!(s.sparse(), &[0, 2, 7]);
        assert_eq!(s.len(), 3);
        assert!(s.contains(7) && !s.contains(3));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn out_of_range_bit_panics() {
        Sdr::from_sparse(4, vec![4]);
    }

    #[test]
    fn overlap_and_dense_round_trip() {
        let a = Sdr::from_sparse(8, vec![1, 3, 5]);
        let b = Sdr::from_dense(&[false, true, false, false, true, true, false, false]);
        assert_eq!(a.overlap(&b), 2);
        assert_eq!(Sdr::from_dense(&a.to_dense()), a);
    }

    #[test]
    fn concat_offsets_later_parts() {
        let a = Sdr::from_sparse(3, vec![0, 2]);
        let b = Sdr::from_sparse(4, vec![1]);
        let c = Sdr::concat(&[&a, &b]);
        assert_eq!(c.size(), 7);
        assert_eq!(c.sparse(), &[0, 2, 4]);
    }
}
