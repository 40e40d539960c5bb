//! Every segment's synapses in one arena.
//!
//! A grown TM holds thousands of segments of 20–32 synapses. As one small allocation each,
//! they share allocator pages with every other network of the process, so dropping a
//! network (an eviction) frees few whole pages. Here a TM's synapses live in one vector:
//! a segment owns a block of a size class (its length rounded up to 4, or to a power of
//! two past 64) and a freed block waits in its class's free list for the next segment of
//! that class. Segments change class as they learn, so free blocks of classes out of demand
//! pile up: when they make up a sixteenth of the arena, the blocks are laid out again.

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use super::store::{reserve_gradually, Synapse};

/// Size class of a block of `len` synapses, and the class's capacity.
fn class(len: usize) -> (usize, usize) {
    let c = if len <= 64 {
        len.div_ceil(4)
    } else {
        16 + (len.next_power_of_two().trailing_zeros() as usize - 6)
    };
    (c, class_cap(c))
}

/// Capacity of size class `class`.
fn class_cap(class: usize) -> usize {
    if class <= 16 {
        class * 4
    } else {
        1 << (class - 16 + 6)
    }
}

/// Per segment id, its synapses (sorted by presynaptic cell); ids are dense and start at 0.
#[derive(Clone, Debug, Default)]
pub(super) struct SynapseArena {
    /// Per segment id: where its block starts and how many synapses it holds.
    spans: Vec<(u32, u32)>,
    synapses: Vec<Synapse>,
    /// Per size class, starts of free blocks.
    free: Vec<Vec<u32>>,
    /// Synapse slots in free blocks.
    free_words: usize,
}

/// Content equality: the same synapses per segment, wherever the blocks are.
impl PartialEq for SynapseArena {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && (0..self.len()).all(|s| self[s] == other[s])
    }
}

impl std::ops::Index<usize> for SynapseArena {
    type Output = [Synapse];

    #[inline]
    fn index(&self, seg: usize) -> &[Synapse] {
        let (start, len) = self.spans[seg];
        &self.synapses[start as usize..(start + len) as usize]
    }
}

impl std::ops::IndexMut<usize> for SynapseArena {
    #[inline]
    fn index_mut(&mut self, seg: usize) -> &mut [Synapse] {
        let (start, len) = self.spans[seg];
        &mut self.synapses[start as usize..(start + len) as usize]
    }
}

impl SynapseArena {
    /// Number of segment ids.
    pub(super) fn len(&self) -> usize {
        self.spans.len()
    }

    /// Adds a segment id with no synapses.
    pub(super) fn push_empty(&mut self) {
        self.spans.push((0, 0));
    }

    /// Room for segment ids up to `budget` (see [`super::reserve_for_ids`]).
    pub(super) fn spans_mut(&mut self) -> &mut Vec<(u32, u32)> {
        &mut self.spans
    }

    /// Replaces `seg`'s synapses, keeping its block when the size class stays.
    pub(super) fn set(&mut self, seg: usize, synapses: &[Synapse]) {
        let (start, len) = self.spans[seg];
        let (old_class, _) = class(len as usize);
        let (new_class, cap) = class(synapses.len());
        let start = if old_class == new_class {
            start as usize
        } else {
            if len > 0 {
                self.release_block(old_class, start);
            }
            if synapses.is_empty() {
                self.spans[seg] = (0, 0);
                return;
            }
            self.take_block(new_class, cap)
        };
        self.synapses[start..start + synapses.len()].copy_from_slice(synapses);
        self.spans[seg] = (start as u32, synapses.len() as u32);
        if self.free_words > 2048 && self.free_words * 16 > self.synapses.len() {
            self.compact();
        }
    }

    /// Lays the blocks out again in segment order, without free ones, in a vector of exactly
    /// their size (so the memory goes back).
    fn compact(&mut self) {
        let live: usize = self.spans.iter().map(|&(_, n)| class(n as usize).1).sum();
        let mut synapses = Vec::with_capacity(live);
        for span in &mut self.spans {
            let (start, len) = (span.0 as usize, span.1 as usize);
            if len == 0 {
                continue;
            }
            let at = synapses.len();
            synapses.extend_from_slice(&self.synapses[start..start + len]);
            synapses.resize(at + class(len).1, Synapse::new(0, 0));
            span.0 = at as u32;
        }
        self.synapses = synapses;
        self.free.iter_mut().for_each(Vec::clear);
        self.free_words = 0;
    }

    /// Frees `seg`'s block.
    pub(super) fn clear(&mut self, seg: usize) {
        self.set(seg, &[]);
    }

    fn release_block(&mut self, class: usize, start: u32) {
        if self.free.len() <= class {
            self.free.resize_with(class + 1, Vec::new);
        }
        self.free[class].push(start);
        self.free_words += class_cap(class);
    }

    fn take_block(&mut self, class: usize, cap: usize) -> usize {
        if let Some(start) = self.free.get_mut(class).and_then(Vec::pop) {
            self.free_words -= cap;
            return start as usize;
        }
        let start = self.synapses.len();
        assert!(start + cap <= u32::MAX as usize, "synapse arena within u32");
        reserve_gradually(&mut self.synapses, cap);
        self.synapses.resize(start + cap, Synapse::new(0, 0));
        start
    }

    /// Every segment's synapses by id.
    pub(super) fn iter(&self) -> impl Iterator<Item = &[Synapse]> + '_ {
        (0..self.len()).map(move |s| &self[s])
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.spans.capacity() * 8
            + self.synapses.capacity() * std::mem::size_of::<Synapse>()
            + self.free.capacity() * std::mem::size_of::<Vec<u32>>()
            + self.free.iter().map(|f| f.capacity() * 4).sum::<usize>()
    }
}

/// The serialised form: each segment's synapse count, then every synapse word in segment
/// order as little-endian bytes. Restoring is a copy, not a parse per synapse: a network
/// under a memory budget is restored again and again.
#[derive(Serialize, Deserialize)]
struct Wire {
    lens: Vec<u32>,
    #[serde(with = "serde_bytes")]
    words: Vec<u8>,
}

impl Serialize for SynapseArena {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let lens: Vec<u32> = self.spans.iter().map(|&(_, n)| n).collect();
        let total: usize = lens.iter().map(|&n| n as usize).sum();
        let mut words = Vec::with_capacity(4 * total);
        for syns in self.iter() {
            words.extend(syns.iter().flat_map(|s| s.to_word().to_le_bytes()));
        }
        Wire { lens, words }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SynapseArena {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let total: usize = wire.lens.iter().map(|&n| n as usize).sum();
        if wire.words.len() != 4 * total {
            return Err(serde::de::Error::custom(format!(
                "{} synapse bytes for {total} synapses",
                wire.words.len()
            )));
        }
        let mut arena = SynapseArena::default();
        let capacity: usize = wire.lens.iter().map(|&n| class(n as usize).1).sum();
        arena.synapses.reserve_exact(capacity);
        arena.spans.reserve_exact(wire.lens.len());
        let mut words = wire
            .words
            .chunks_exact(4)
            .map(|w| Synapse::from_word(u32::from_le_bytes(w.try_into().expect("4 bytes"))));
        for &n in &wire.lens {
            let start = arena.synapses.len();
            if n == 0 {
                arena.spans.push((0, 0));
                continue;
            }
            arena.synapses.extend(words.by_ref().take(n as usize));
            arena
                .synapses
                .resize(start + class(n as usize).1, Synapse::new(0, 0));
            arena.spans.push((start as u32, n));
        }
        Ok(arena)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syns(cells: std::ops::Range<u32>) -> Vec<Synapse> {
        cells.map(|c| Synapse::new(c, 5)).collect()
    }

    #[test]
    fn blocks_are_reused_by_their_class() {
        let mut a = SynapseArena::default();
        for _ in 0..3 {
            a.push_empty();
        }
        a.set(1, &syns(0..20));
        a.set(2, &syns(100..103));
        assert_eq!(&a[1], &syns(0..20)[..]);
        assert_eq!(&a[2], &syns(100..103)[..]);
        assert!(a[0].is_empty());
        let used = a.synapses.len();
        // Same class (17..=20): in place.
        a.set(1, &syns(0..18));
        assert_eq!(a.synapses.len(), used);
        assert_eq!(&a[1], &syns(0..18)[..]);
        // Class change: a new block; the old one is reused by the next segment of its class.
        a.set(1, &syns(0..30));
        let grown = a.synapses.len();
        assert_eq!(grown, used + 32);
        a.push_empty();
        a.set(3, &syns(7..26));
        assert_eq!(a.synapses.len(), grown, "the freed 20-block is reused");
        assert_eq!(&a[3], &syns(7..26)[..]);
        assert_eq!(&a[1], &syns(0..30)[..]);
        a.clear(2);
        assert!(a[2].is_empty());
        assert_eq!(class(65), (17, 128));
        assert_eq!(class(64), (16, 64));
        for len in [1, 4, 5, 63, 64, 65, 128, 129, 5000] {
            let (c, cap) = class(len);
            assert_eq!(class_cap(c), cap);
            assert!(cap >= len);
        }
    }

    #[test]
    fn free_blocks_are_reclaimed_by_compaction() {
        let mut a = SynapseArena::default();
        for s in 0..400 {
            a.push_empty();
            a.set(s, &syns(0..20));
        }
        // Every segment grows past its class: the 20-blocks are left free.
        for s in 0..400 {
            a.set(s, &syns(0..24));
        }
        assert!(a.free_words <= 2048, "compacted along the way");
        assert!(a.synapses.capacity() < 400 * 24 * 2);
        for s in 0..400 {
            assert_eq!(&a[s], &syns(0..24)[..]);
        }
    }

    #[test]
    fn serialises_compactly_and_round_trips() {
        let mut a = SynapseArena::default();
        let nested = [vec![], syns(3..9), vec![], syns(1..2)];
        for (s, syns) in nested.iter().enumerate() {
            a.push_empty();
            a.set(s, syns);
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&a, cfg).unwrap();
        // Counts (a byte each here), then 4 bytes per synapse behind a length.
        assert_eq!(bytes.len(), 1 + 4 + 1 + 7 * 4);
        let (back, _): (SynapseArena, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, a);
        for (s, syns) in nested.iter().enumerate() {
            assert_eq!(&back[s], &syns[..]);
        }
        // A count that does not match the words is an error, not a misread.
        let wrong = Wire {
            lens: vec![0, 6, 0, 2],
            words: vec![0; 7 * 4],
        };
        let bytes = bincode::serde::encode_to_vec(&wrong, cfg).unwrap();
        let err = bincode::serde::decode_from_slice::<SynapseArena, _>(&bytes, cfg).unwrap_err();
        assert!(
            err.to_string().contains("28 synapse bytes for 8 synapses"),
            "{err}"
        );
    }
}
