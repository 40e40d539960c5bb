//! The TM's synapse word, and the presynaptic out index that forward passes walk. A
//! segment's synapses (in [`super::arena`]) are sorted by presynaptic cell.
//!
//! Sorting by presynaptic cell turns every "is this cell on the segment / in the update"
//! question of learning into a merge of two short sorted lists, and keeps a segment's
//! synapses in a few consecutive cache lines.

use serde::{Deserialize, Serialize};

use super::arena::SynapseArena;
use super::heads::{CellHeads, HeadsBuilder};
use super::permanence::{Code, DROPPED};

/// Index of a segment; stable while the segment lives, reused after it is freed.
pub type SegmentId = u32;

/// Bits of a synapse word holding the presynaptic cell (the rest hold the permanence).
const PRESYN_BITS: u32 = 20;
const PRESYN_MASK: u32 = (1 << PRESYN_BITS) - 1;

/// One synapse of a segment in one aligned word: the presynaptic cell in the low 20 bits
/// (cells are fewer than 2^20) and its permanence's code (see [`super::permanence`]) above.
/// Serialises as the two fields.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SynapseFields", into = "SynapseFields")]
pub struct Synapse(u32);

#[derive(Serialize, Deserialize)]
struct SynapseFields {
    presyn: u32,
    permanence: Code,
}

impl From<SynapseFields> for Synapse {
    fn from(f: SynapseFields) -> Self {
        Synapse::new(f.presyn, f.permanence)
    }
}

impl From<Synapse> for SynapseFields {
    fn from(s: Synapse) -> Self {
        SynapseFields {
            presyn: s.presyn(),
            permanence: s.code(),
        }
    }
}

impl Synapse {
    pub fn new(presyn: u32, code: Code) -> Self {
        debug_assert!(u64::from(presyn) <= super::MAX_CELLS);
        debug_assert!(code <= DROPPED);
        Synapse(presyn | u32::from(code) << PRESYN_BITS)
    }

    /// The packed word (presynaptic cell and code), as checkpoints store it.
    pub(super) fn to_word(self) -> u32 {
        self.0
    }

    pub(super) fn from_word(word: u32) -> Self {
        Synapse(word)
    }

    /// Presynaptic cell.
    #[inline]
    pub fn presyn(&self) -> u32 {
        self.0 & PRESYN_MASK
    }

    /// The permanence's code; codes order as the permanences they stand for.
    #[inline]
    pub fn code(&self) -> Code {
        (self.0 >> PRESYN_BITS) as Code
    }
}

impl std::fmt::Debug for Synapse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synapse")
            .field("presyn", &self.presyn())
            .field("code", &self.code())
            .finish()
    }
}

/// Segment id 0 is never allocated. Ids break eviction ties, so numbering starts at 1 as it
/// did when id 0 stood for removed out-list entries.
pub(super) const SINK: SegmentId = 0;

/// Presynaptic cell → the segments it has a synapse on, in two lists: connected synapses and
/// the others (`Cells4`'s `OutSynapses`, split by permanence), so a forward pass is a
/// sequential read and one counter update per synapse, with the increment fixed per list.
/// Entry order is irrelevant (passes only count), so entries are removed by moving the last
/// one into their place and found by scanning the (short) list: a synapse needs no record
/// of where its entry is. Derived from the segments: not serialised.
///
/// Entries are `u16` when the segment budget keeps every id below 2^16 (NAB's 8192), which
/// halves the index and the bytes a pass reads; `u32` otherwise.
#[derive(Clone, Debug)]
pub(super) enum OutIndex {
    Narrow(Lists<u16>),
    Wide(Lists<u32>),
}

/// Derived data: equal whenever the segments it indexes are.
impl PartialEq for OutIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Default for OutIndex {
    fn default() -> Self {
        OutIndex::Wide(Lists::new(0))
    }
}

impl OutIndex {
    /// An empty index for `num_cells` cells and segment ids up to `max_segments` (0: no
    /// bound).
    pub(super) fn new(num_cells: usize, max_segments: u32) -> Self {
        if (1..=u32::from(u16::MAX)).contains(&max_segments) {
            OutIndex::Narrow(Lists::new(num_cells))
        } else {
            OutIndex::Wide(Lists::new(num_cells))
        }
    }

    /// Lists a synapse of `seg` from `presyn`.
    pub(super) fn add(&mut self, presyn: u32, seg: SegmentId, connected: bool) {
        by_width!(OutIndex, self, l => l.add(presyn, seg, connected))
    }

    /// Unlists the synapse of `seg` from `presyn` (in the list of `connected`).
    pub(super) fn remove(&mut self, presyn: u32, seg: SegmentId, connected: bool) {
        by_width!(OutIndex, self, l => l.remove(presyn, seg, connected))
    }

    /// Moves the synapse of `seg` from `presyn` to the list of its new `connected` state.
    pub(super) fn set_connected(&mut self, presyn: u32, seg: SegmentId, connected: bool) {
        by_width!(OutIndex, self, l => l.set_connected(presyn, seg, connected))
    }

    /// Lays the lists out again when abandoned blocks make up a sixteenth of the arena (on
    /// NAB data, once every hundred steps or so: copying the arena costs far less than a
    /// step).
    pub(super) fn compact_if_sparse(&mut self) {
        by_width!(OutIndex, self, l => {
            if l.abandoned > 4096 && l.abandoned * 16 > l.arena.len() {
                l.compact();
            }
        })
    }

    /// Lists every synapse of `synapses` (by segment id).
    pub(super) fn rebuild(&mut self, synapses: &SynapseArena, connected: Code) {
        by_width!(OutIndex, self, l => l.rebuild(synapses, connected))
    }

    /// `cell`'s connected list and its other list.
    #[cfg(test)]
    pub(super) fn lists(&self, cell: u32) -> [Vec<SegmentId>; 2] {
        by_width!(OutIndex, self, l => l.lists(cell).map(|x| x.iter().map(|e| e.id()).collect()))
    }

    pub(super) fn heap_bytes(&self) -> usize {
        by_width!(OutIndex, self, l => l.heap_bytes())
    }
}

/// An out-list word: a segment id, or a block header field.
pub(super) trait Entry: Copy + Default + Eq + std::fmt::Debug {
    const MAX: usize;
    fn new(v: usize) -> Self;
    fn get(self) -> usize;
    #[inline]
    fn id(self) -> SegmentId {
        self.get() as SegmentId
    }
}

macro_rules! entry {
    ($t:ty) => {
        impl Entry for $t {
            const MAX: usize = <$t>::MAX as usize;
            #[inline]
            fn new(v: usize) -> Self {
                debug_assert!(v <= <Self as Entry>::MAX);
                v as $t
            }
            #[inline]
            fn get(self) -> usize {
                self as usize
            }
        }
    };
}
entry!(u16);
entry!(u32);

/// Words of a block header: connected count, total count, capacity.
const HEADER: usize = 3;

/// The lists of [`OutIndex`] in one arena of blocks, one block per cell: a header, then the
/// connected entries, then the others, then spare room. A list that outgrows its block moves
/// to the end of the arena; compaction (once moved-out blocks pile up) lays the blocks out
/// again in cell order, so the cells of a column — which fire together — are side by side.
/// Keeping the counts in the block rather than beside the cell leaves the heads a word per
/// cell with a block (and 8 bytes per 32 cells), and puts them in the cache line a pass reads
/// next anyway.
#[derive(Clone, Debug)]
pub(super) struct Lists<E> {
    /// Per cell, where its block starts; 0 (a shared empty block) for cells with none.
    heads: CellHeads,
    arena: Vec<E>,
    /// Arena words in blocks that lists have moved out of.
    abandoned: usize,
}

impl<E: Entry> Lists<E> {
    fn new(num_cells: usize) -> Self {
        Lists {
            heads: CellHeads::new(num_cells),
            arena: vec![E::default(); HEADER],
            abandoned: 0,
        }
    }

    /// Connected count, total count and capacity of the block at `h`.
    #[inline]
    fn header(&self, h: usize) -> (usize, usize, usize) {
        (
            self.arena[h].get(),
            self.arena[h + 1].get(),
            self.arena[h + 2].get(),
        )
    }

    /// Where `cell`'s block starts: what [`Self::lists_at`] and [`Self::prefetch_at`] take.
    #[inline(always)]
    pub(super) fn block(&self, cell: u32) -> u32 {
        self.heads.get(cell)
    }

    /// `cell`'s connected list and its other list.
    #[cfg(test)]
    pub(super) fn lists(&self, cell: u32) -> [&[E]; 2] {
        self.lists_at(self.block(cell))
    }

    /// The connected list and the other list of the block at `h`.
    ///
    /// Always inlined: a forward pass asks for them once per active cell, and as a call
    /// (the compiler kept it out of line) it took about a tenth of the pass's time.
    #[inline(always)]
    pub(super) fn lists_at(&self, h: u32) -> [&[E]; 2] {
        let h = h as usize;
        let (nc, n) = (self.arena[h].get(), self.arena[h + 1].get());
        let e = h + HEADER;
        let (connected, other) = self.arena[e..e + n].split_at(nc);
        [connected, other]
    }

    /// Asks the CPU to start loading the first two cache lines of the block at `h` (a
    /// hint: no effect on results). A pass's cells are scattered over the arena: started a
    /// few cells ahead, those loads overlap the counting.
    #[inline(always)]
    pub(super) fn prefetch_at(&self, h: u32) {
        let h = h as usize;
        let lines = 128 / std::mem::size_of::<E>();
        super::prefetch_slice(&self.arena[h..(h + lines).min(self.arena.len())]);
    }

    /// Moves `cell`'s block (at `h`) to the end of the arena with room for `cap` entries.
    fn relocate(&mut self, cell: u32, h: usize, cap: usize) -> usize {
        let (_, n, old_cap) = self.header(h);
        let start = self.arena.len();
        crate::reserve_gradually(&mut self.arena, HEADER + cap, 0);
        self.arena.extend_from_within(h..h + HEADER + n);
        self.arena.resize(start + HEADER + cap, E::default());
        self.arena[start + 2] = E::new(cap);
        if old_cap > 0 {
            self.abandoned += HEADER + old_cap;
        }
        self.heads.set(
            cell,
            u32::try_from(start).expect("out index arena within u32"),
        );
        start
    }

    fn add(&mut self, cell: u32, seg: SegmentId, connected: bool) {
        let mut h = self.heads.get(cell) as usize;
        let (nc, n, cap) = self.header(h);
        if n == cap {
            // A cell has at most one synapse per segment, so `n` stays below `E::MAX`.
            h = self.relocate(cell, h, (n + n / 4 + 2).min(E::MAX));
        }
        let e = h + HEADER;
        let seg = E::new(seg as usize);
        if connected {
            // The first other entry makes room at the end of the connected ones.
            self.arena[e + n] = self.arena[e + nc];
            self.arena[e + nc] = seg;
            self.arena[h] = E::new(nc + 1);
        } else {
            self.arena[e + n] = seg;
        }
        self.arena[h + 1] = E::new(n + 1);
    }

    /// Where `seg`'s entry is in `cell`'s block (at `h`), in the list of `connected`.
    #[inline]
    fn find(&self, h: usize, seg: SegmentId, connected: bool) -> usize {
        let (nc, n, _) = self.header(h);
        let e = h + HEADER;
        let range = if connected { e..e + nc } else { e + nc..e + n };
        let seg = E::new(seg as usize);
        // Lists of the busiest cells run to hundreds of entries: compare a block at a time
        // (the compiler turns the block into vector compares) and stop at the first hit.
        let list = &self.arena[range.clone()];
        let mut blocks = list.chunks_exact(16);
        let mut base = range.start;
        for block in &mut blocks {
            let hits = block
                .iter()
                .enumerate()
                .fold(0u32, |m, (j, &x)| m | u32::from(x == seg) << j);
            if hits != 0 {
                return base + hits.trailing_zeros() as usize;
            }
            base += 16;
        }
        let k = blocks.remainder().iter().position(|&x| x == seg);
        base + k.expect("a synapse is listed")
    }

    fn remove(&mut self, cell: u32, seg: SegmentId, connected: bool) {
        let h = self.heads.get(cell) as usize;
        let i = self.find(h, seg, connected);
        let (nc, n, _) = self.header(h);
        let e = h + HEADER;
        if connected {
            // The last connected entry fills the hole, the last other entry its place.
            self.arena[i] = self.arena[e + nc - 1];
            self.arena[e + nc - 1] = self.arena[e + n - 1];
            self.arena[h] = E::new(nc - 1);
        } else {
            self.arena[i] = self.arena[e + n - 1];
        }
        self.arena[h + 1] = E::new(n - 1);
    }

    fn set_connected(&mut self, cell: u32, seg: SegmentId, connected: bool) {
        let h = self.heads.get(cell) as usize;
        let i = self.find(h, seg, !connected);
        let nc = self.arena[h].get();
        let e = h + HEADER;
        // Swap the entry to the boundary of the two lists and move the boundary past it.
        if connected {
            self.arena.swap(i, e + nc);
            self.arena[h] = E::new(nc + 1);
        } else {
            self.arena.swap(i, e + nc - 1);
            self.arena[h] = E::new(nc - 1);
        }
    }

    /// Room for a sixteenth more before a list has to move.
    fn spare_cap(n: usize) -> usize {
        (n + n / 16 + 1).min(E::MAX)
    }

    /// Lays every non-empty list out again in cell order, dropping empty blocks.
    fn compact(&mut self) {
        let old = std::mem::take(&mut self.arena);
        // The cells whose lists are not empty, with their blocks.
        let cells: Vec<(u32, usize)> = self
            .heads
            .nonzero()
            .map(|(c, h)| (c, h as usize))
            .filter(|&(_, h)| old[h + 1].get() > 0)
            .collect();
        let live: usize = cells
            .iter()
            .map(|&(_, h)| HEADER + Self::spare_cap(old[h + 1].get()))
            .sum();
        let mut arena = Vec::with_capacity(HEADER + live);
        arena.resize(HEADER, E::default());
        let mut heads = HeadsBuilder::new(self.heads.len(), cells.len());
        for (cell, h) in cells {
            let (nc, n) = (old[h].get(), old[h + 1].get());
            let start = arena.len();
            heads.push(cell, start as u32);
            let cap = Self::spare_cap(n);
            arena.extend_from_slice(&[E::new(nc), E::new(n), E::new(cap)]);
            arena.extend_from_slice(&old[h + HEADER..h + HEADER + n]);
            arena.resize(start + HEADER + cap, E::default());
        }
        self.heads = heads.finish();
        self.arena = arena;
        self.abandoned = 0;
    }

    fn rebuild(&mut self, synapses: &SynapseArena, connected: Code) {
        // Per cell: connected and total counts, then where the next entries of each go.
        let mut at = vec![[0u32; 2]; self.heads.len()];
        synapses.for_each(|_, presyn, code| {
            let c = &mut at[presyn as usize];
            c[0] += u32::from(code >= connected);
            c[1] += 1;
        });
        let (mut live, mut cells) = (0, 0);
        for c in at.iter().filter(|c| c[1] > 0) {
            live += HEADER + Self::spare_cap(c[1] as usize);
            cells += 1;
        }
        let mut heads = HeadsBuilder::new(self.heads.len(), cells);
        let mut arena = Vec::with_capacity(HEADER + live);
        arena.resize(HEADER, E::default());
        for (cell, c) in at.iter_mut().enumerate() {
            let (nc, n) = (c[0] as usize, c[1] as usize);
            if n == 0 {
                continue;
            }
            let start = arena.len();
            let head = u32::try_from(start).expect("out index arena within u32");
            heads.push(cell as u32, head);
            let cap = Self::spare_cap(n);
            arena.extend_from_slice(&[E::new(nc), E::new(n), E::new(cap)]);
            arena.resize(start + HEADER + cap, E::default());
            let e = (start + HEADER) as u32;
            *c = [e, e + nc as u32];
        }
        synapses.for_each(|seg, presyn, code| {
            let list = &mut at[presyn as usize][usize::from(code < connected)];
            arena[*list as usize] = E::new(seg);
            *list += 1;
        });
        self.heads = heads.finish();
        self.arena = arena;
        self.abandoned = 0;
    }

    fn heap_bytes(&self) -> usize {
        self.heads.heap_bytes() + self.arena.capacity() * std::mem::size_of::<E>()
    }
}
