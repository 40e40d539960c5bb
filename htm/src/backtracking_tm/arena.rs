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

use super::permanence::{Code, DROPPED};
use super::store::{Entry, Synapse};
use crate::reserve_gradually;

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

/// A word of the permanence-code plane: `u8` when the codes fit one, else `u16`. The narrow
/// plane holds [`DROPPED`] as `u8::MAX`.
pub(super) trait CodeWord: Copy + Default + Eq + std::fmt::Debug {
    /// Whether `code` has a word of this width.
    fn holds(code: Code) -> bool;
    fn new(code: Code) -> Self;
    fn get(self) -> Code;
}

impl CodeWord for u8 {
    #[inline]
    fn holds(code: Code) -> bool {
        code < u8::MAX.into() || code == DROPPED
    }

    #[inline]
    fn new(code: Code) -> Self {
        debug_assert!(Self::holds(code));
        code as u8 // DROPPED's low byte is u8::MAX
    }

    #[inline]
    fn get(self) -> Code {
        Code::from(self) | (Code::from(self == u8::MAX) * (DROPPED & !0xff))
    }
}

impl CodeWord for u16 {
    #[inline]
    fn holds(_: Code) -> bool {
        true
    }

    #[inline]
    fn new(code: Code) -> Self {
        code
    }

    #[inline]
    fn get(self) -> Code {
        self
    }
}

/// The synapses in two planes: presynaptic cells and permanence codes.
#[derive(Clone, Debug, Default)]
pub(super) struct Planes<P, C> {
    presyn: Vec<P>,
    codes: Vec<C>,
}

impl<P: Entry, C: CodeWord> Planes<P, C> {
    fn len(&self) -> usize {
        self.presyn.len()
    }

    /// Whether every synapse of `words` fits these planes.
    fn fits(words: impl Iterator<Item = Synapse>) -> bool {
        words
            .into_iter()
            .all(|s| s.presyn() as usize <= P::MAX && C::holds(s.code()))
    }

    fn reserve_exact(&mut self, extra: usize) {
        self.presyn.reserve_exact(extra);
        self.codes.reserve_exact(extra);
    }

    fn extend(&mut self, words: impl Iterator<Item = Synapse>) {
        for s in words {
            self.presyn.push(P::new(s.presyn() as usize));
            self.codes.push(C::new(s.code()));
        }
    }

    /// Grows to `len` synapses (zero ones), the capacity a sixteenth at a time.
    fn grow_to(&mut self, len: usize) {
        let extra = len.saturating_sub(self.len());
        reserve_gradually(&mut self.presyn, extra, 0);
        reserve_gradually(&mut self.codes, extra, 0);
        self.presyn.resize(len, P::default());
        self.codes.resize(len, C::default());
    }

    fn write(&mut self, at: usize, synapses: &[Synapse]) {
        let presyn = &mut self.presyn[at..at + synapses.len()];
        let codes = &mut self.codes[at..at + synapses.len()];
        for ((p, c), s) in presyn.iter_mut().zip(codes.iter_mut()).zip(synapses) {
            *p = P::new(s.presyn() as usize);
            *c = C::new(s.code());
        }
    }

    /// Overwrites the synapses from `at` on with `synapses`.
    fn write_iter(&mut self, at: usize, synapses: impl Iterator<Item = Synapse>) {
        let slots = self.presyn[at..].iter_mut().zip(&mut self.codes[at..]);
        for ((p, c), s) in slots.zip(synapses) {
            *p = P::new(s.presyn() as usize);
            *c = C::new(s.code());
        }
    }

    /// Appends `other`'s `len` synapses from `from`, padded with zero ones to `cap`.
    fn append_from(&mut self, other: &Self, from: usize, len: usize, cap: usize) {
        let at = self.len();
        self.presyn
            .extend_from_slice(&other.presyn[from..from + len]);
        self.codes.extend_from_slice(&other.codes[from..from + len]);
        self.presyn.resize(at + cap, P::default());
        self.codes.resize(at + cap, C::default());
    }

    /// Writes `next` into the free block at `at`: its first two cells, 16 bits each (what
    /// both layouts hold, so a layout change carries the free lists over).
    fn link(&mut self, at: usize, next: u32) {
        self.presyn[at] = P::new(next as usize & 0xffff);
        self.presyn[at + 1] = P::new((next >> 16) as usize);
    }

    /// What [`Self::link`] wrote at `at`.
    fn linked(&self, at: usize) -> u32 {
        (self.presyn[at].get() | self.presyn[at + 1].get() << 16) as u32
    }

    fn synapses(&self, r: std::ops::Range<usize>) -> impl Iterator<Item = Synapse> + '_ {
        let (p, c) = (&self.presyn[r.clone()], &self.codes[r]);
        p.iter()
            .zip(c)
            .map(|(p, c)| Synapse::new(p.get() as u32, c.get()))
    }

    fn heap_bytes(&self) -> usize {
        self.presyn.capacity() * std::mem::size_of::<P>()
            + self.codes.capacity() * std::mem::size_of::<C>()
    }
}

/// The planes' words: 16-bit cells and 8-bit codes when the parameters allow (NAB's: 65,536
/// cells, 23 codes), 3 bytes a synapse instead of 4; else 32-bit cells and 16-bit codes.
#[derive(Clone, Debug)]
enum Layout {
    Narrow(Planes<u16, u8>),
    Wide(Planes<u32, u16>),
}

/// One segment's synapses, read-only.
#[derive(Clone, Copy)]
pub(super) enum Syns<'a> {
    Narrow(&'a [u16], &'a [u8]),
    Wide(&'a [u32], &'a [u16]),
}

/// One segment's synapses with writable codes: what a learning walk gets.
pub(super) enum SynsMut<'a> {
    Narrow(&'a [u16], &'a mut [u8]),
    Wide(&'a [u32], &'a mut [u16]),
}

impl<'a> Syns<'a> {
    #[inline]
    pub(super) fn len(&self) -> usize {
        match self {
            Syns::Narrow(p, _) => p.len(),
            Syns::Wide(p, _) => p.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub(super) fn presyn(&self, k: usize) -> u32 {
        match self {
            Syns::Narrow(p, _) => u32::from(p[k]),
            Syns::Wide(p, _) => p[k],
        }
    }

    #[inline]
    pub(super) fn code(&self, k: usize) -> Code {
        match self {
            Syns::Narrow(_, c) => c[k].get(),
            Syns::Wide(_, c) => c[k],
        }
    }

    #[inline]
    pub(super) fn get(&self, k: usize) -> Synapse {
        Synapse::new(self.presyn(k), self.code(k))
    }

    pub(super) fn iter(self) -> impl Iterator<Item = Synapse> + 'a {
        (0..self.len()).map(move |k| self.get(k))
    }

    /// Asks the CPU to start loading the synapses (a hint).
    pub(super) fn prefetch(&self) {
        match self {
            Syns::Narrow(p, c) => {
                super::prefetch_slice(p);
                super::prefetch_slice(c);
            }
            Syns::Wide(p, c) => {
                super::prefetch_slice(p);
                super::prefetch_slice(c);
            }
        }
    }
}

/// Per segment id, where its block starts and how many synapses it holds: in one word
/// (`start / 4` above 8 bits of length; blocks start at multiples of 4) when the parameters
/// keep segments below 255 synapses and the arena well below 2^26 (NAB's: 32 synapses, 8192
/// segments), else in two.
#[derive(Clone, Debug)]
enum Spans {
    Narrow(Vec<u32>),
    Wide(Vec<(u32, u32)>),
}

impl Spans {
    /// Whether spans of up to `max_segments` live segments of at most `max_len` synapses
    /// pack: their blocks take at most 2^24 synapses, and free blocks at most a sixteenth
    /// more (see [`SynapseArena::set`]), well within the 2^26 a packed start reaches.
    fn pack(max_segments: u32, max_len: u64) -> bool {
        max_segments > 0
            && max_len < 255
            && u64::from(max_segments) * class(max_len as usize).1 as u64 <= 1 << 24
    }

    #[inline(always)]
    fn get(&self, seg: usize) -> (usize, usize) {
        match self {
            Spans::Narrow(v) => {
                let w = v[seg];
                ((w >> 8) as usize * 4, (w & 0xff) as usize)
            }
            Spans::Wide(v) => {
                let (start, len) = v[seg];
                (start as usize, len as usize)
            }
        }
    }

    fn set(&mut self, seg: usize, start: usize, len: usize) {
        match self {
            Spans::Narrow(v) => {
                assert!(
                    start.is_multiple_of(4) && start < 1 << 26 && len < 255,
                    "a packed span of {len} synapses at {start}"
                );
                v[seg] = ((start / 4) as u32) << 8 | len as u32;
            }
            Spans::Wide(v) => v[seg] = (start as u32, len as u32),
        }
    }

    fn push_empty(&mut self) {
        by_width!(Spans, self, v => v.push(Default::default()))
    }

    fn len(&self) -> usize {
        by_width!(Spans, self, v => v.len())
    }

    /// The same spans, packed if `packed`.
    fn with(&self, packed: bool) -> Self {
        let mut out = if packed {
            Spans::Narrow(Vec::with_capacity(self.len()))
        } else {
            Spans::Wide(Vec::with_capacity(self.len()))
        };
        for seg in 0..self.len() {
            out.push_empty();
            let (start, len) = self.get(seg);
            out.set(seg, start, len);
        }
        out
    }

    /// Room for ids up to `budget` (see [`super::reserve_for_ids`]).
    fn reserve_for_ids(&mut self, budget: usize) {
        by_width!(Spans, self, v => super::reserve_for_ids(v, budget))
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Spans::Narrow(v) => v.capacity() * 4,
            Spans::Wide(v) => v.capacity() * 8,
        }
    }
}

/// The end of a free list.
const NO_BLOCK: u32 = u32::MAX;

/// Per segment id, its synapses (sorted by presynaptic cell); ids are dense and start at 0.
#[derive(Clone, Debug)]
pub(super) struct SynapseArena {
    spans: Spans,
    layout: Layout,
    /// Per size class, the start of the last block freed, or [`NO_BLOCK`]. A free block
    /// holds the start of the one freed before it (see [`Planes::link`]): the lists cost no
    /// memory beside the blocks.
    free: Vec<u32>,
    /// Synapse slots in free blocks.
    free_words: usize,
}

impl Default for SynapseArena {
    fn default() -> Self {
        SynapseArena::new(false)
    }
}

/// Content equality: the same synapses per segment, wherever the blocks are.
impl PartialEq for SynapseArena {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && (0..self.len()).all(|s| self.get(s).iter().eq(other.get(s).iter()))
    }
}

impl SynapseArena {
    /// An empty arena; `narrow` if every cell fits 16 bits and every code 8 (but the last).
    pub(super) fn new(narrow: bool) -> Self {
        SynapseArena {
            spans: Spans::Wide(Vec::new()),
            layout: if narrow {
                Layout::Narrow(Planes::default())
            } else {
                Layout::Wide(Planes::default())
            },
            free: Vec::new(),
            free_words: 0,
        }
    }

    /// Number of segment ids.
    pub(super) fn len(&self) -> usize {
        self.spans.len()
    }

    /// `seg`'s synapses.
    #[inline]
    pub(super) fn get(&self, seg: usize) -> Syns<'_> {
        let (start, len) = self.spans.get(seg);
        let r = start..start + len;
        match &self.layout {
            Layout::Narrow(p) => Syns::Narrow(&p.presyn[r.clone()], &p.codes[r]),
            Layout::Wide(p) => Syns::Wide(&p.presyn[r.clone()], &p.codes[r]),
        }
    }

    /// `seg`'s synapses, codes writable.
    #[inline]
    pub(super) fn get_mut(&mut self, seg: usize) -> SynsMut<'_> {
        let (start, len) = self.spans.get(seg);
        let r = start..start + len;
        match &mut self.layout {
            Layout::Narrow(p) => SynsMut::Narrow(&p.presyn[r.clone()], &mut p.codes[r]),
            Layout::Wide(p) => SynsMut::Wide(&p.presyn[r.clone()], &mut p.codes[r]),
        }
    }

    /// Sets the code of synapse `k` of `seg`.
    #[inline]
    pub(super) fn set_code(&mut self, seg: usize, k: usize, code: Code) {
        let (start, len) = self.spans.get(seg);
        debug_assert!(k < len);
        let at = start + k;
        by_width!(Layout, &mut self.layout, p => p.codes[at] = CodeWord::new(code))
    }

    /// Takes the narrow layout if `narrow` and every synapse fits it, else the wide one, and
    /// packs the spans if up to `max_segments` segments of up to `max_len` synapses let them.
    pub(super) fn set_layout(&mut self, narrow: bool, max_segments: u32, max_len: u64) {
        let packed = Spans::pack(max_segments, max_len);
        if packed != matches!(self.spans, Spans::Narrow(_)) {
            self.spans = self.spans.with(packed);
        }
        let layout = match (&self.layout, narrow) {
            (Layout::Wide(p), true) if Planes::<u16, u8>::fits(p.synapses(0..p.len())) => {
                let mut n = Planes::default();
                n.reserve_exact(p.len());
                n.extend(p.synapses(0..p.len()));
                Layout::Narrow(n)
            }
            (Layout::Narrow(p), false) => {
                let mut w = Planes::default();
                w.reserve_exact(p.len());
                w.extend(p.synapses(0..p.len()));
                Layout::Wide(w)
            }
            _ => return,
        };
        self.layout = layout;
    }

    /// Adds a segment id with no synapses.
    pub(super) fn push_empty(&mut self) {
        self.spans.push_empty();
    }

    /// Room for segment ids up to `budget` (see [`super::reserve_for_ids`]).
    pub(super) fn reserve_for_ids(&mut self, budget: usize) {
        self.spans.reserve_for_ids(budget);
    }

    /// Replaces `seg`'s synapses, keeping its block when the size class stays.
    pub(super) fn set(&mut self, seg: usize, synapses: &[Synapse]) {
        let (start, len) = self.spans.get(seg);
        let (old_class, _) = class(len);
        let (new_class, cap) = class(synapses.len());
        let start = if old_class == new_class {
            start
        } else {
            if len > 0 {
                self.release_block(old_class, start as u32);
            }
            if synapses.is_empty() {
                self.spans.set(seg, 0, 0);
                return;
            }
            self.take_block(new_class, cap)
        };
        by_width!(Layout, &mut self.layout, p => p.write(start, synapses));
        self.spans.set(seg, start, synapses.len());
        let used = by_width!(Layout, &self.layout, p => p.len());
        if self.free_words > 2048 && self.free_words * 16 > used {
            self.compact();
        }
    }

    /// Lays the blocks out again in segment order, without free ones, in vectors of exactly
    /// their size (so the memory goes back).
    fn compact(&mut self) {
        let segs = 0..self.spans.len();
        let live: usize = segs.clone().map(|s| class(self.spans.get(s).1).1).sum();
        by_width!(Layout, &mut self.layout, p => {
            let mut packed = Planes::default();
            packed.reserve_exact(live);
            for seg in segs {
                let (start, len) = self.spans.get(seg);
                if len == 0 {
                    continue;
                }
                let at = packed.len();
                packed.append_from(p, start, len, class(len).1);
                self.spans.set(seg, at, len);
            }
            *p = packed;
        });
        self.free.fill(NO_BLOCK);
        self.free_words = 0;
    }

    /// Appends `seg`'s synapses but those marked [`DROPPED`] to `out`.
    pub(super) fn extend_live(&self, seg: usize, out: &mut Vec<Synapse>) {
        let (start, len) = self.spans.get(seg);
        let r = start..start + len;
        by_width!(Layout, &self.layout, p => out.extend(
            p.synapses(r).filter(|s| s.code() != DROPPED)
        ));
    }

    /// Frees `seg`'s block.
    pub(super) fn clear(&mut self, seg: usize) {
        self.set(seg, &[]);
    }

    fn release_block(&mut self, class: usize, start: u32) {
        if self.free.len() <= class {
            self.free.resize(class + 1, NO_BLOCK);
        }
        let next = self.free[class];
        by_width!(Layout, &mut self.layout, p => p.link(start as usize, next));
        self.free[class] = start;
        self.free_words += class_cap(class);
    }

    fn take_block(&mut self, class: usize, cap: usize) -> usize {
        let start = self.free.get(class).copied().unwrap_or(NO_BLOCK);
        if start != NO_BLOCK {
            let start = start as usize;
            self.free[class] = by_width!(Layout, &self.layout, p => p.linked(start));
            self.free_words -= cap;
            return start;
        }
        let start = by_width!(Layout, &self.layout, p => p.len());
        assert!(start + cap <= u32::MAX as usize, "synapse arena within u32");
        by_width!(Layout, &mut self.layout, p => p.grow_to(start + cap));
        start
    }

    /// Calls `f(segment, presynaptic cell, code)` for every synapse, in segment order. Whole
    /// arena passes (checkpoints, the out index rebuilt on restore) go through this: the
    /// layout is matched once, not per synapse.
    pub(super) fn for_each(&self, mut f: impl FnMut(usize, u32, Code)) {
        by_width!(Layout, &self.layout, p => {
            for seg in 0..self.len() {
                let (start, len) = self.spans.get(seg);
                let r = start..start + len;
                for (&q, &c) in p.presyn[r.clone()].iter().zip(&p.codes[r]) {
                    f(seg, Entry::get(q) as u32, CodeWord::get(c));
                }
            }
        })
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.spans.heap_bytes()
            + by_width!(Layout, &self.layout, p => p.heap_bytes())
            + self.free.capacity() * 4
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
        let lens: Vec<u32> = (0..self.len())
            .map(|s| self.spans.get(s).1 as u32)
            .collect();
        let total: usize = lens.iter().map(|&n| n as usize).sum();
        // Sized once and written in place: extending byte by byte was most of a save.
        let mut words = vec![0; 4 * total];
        let mut out = words.chunks_exact_mut(4);
        self.for_each(|_, presyn, code| {
            let word = Synapse::new(presyn, code).to_word();
            out.next()
                .expect("4 bytes per synapse")
                .copy_from_slice(&word.to_le_bytes());
        });
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
        let synapses = || {
            wire.words
                .chunks_exact(4)
                .map(|w| Synapse::from_word(u32::from_le_bytes(w.try_into().expect("4 bytes"))))
        };
        // The parameters (not known here) may want the other layout: see `set_layout`.
        let mut arena = SynapseArena::new(Planes::<u16, u8>::fits(synapses()));
        let capacity: usize = wire.lens.iter().map(|&n| class(n as usize).1).sum();
        let mut spans = Vec::with_capacity(wire.lens.len());
        // The planes are sized once and each block written in place: no per-synapse push.
        by_width!(Layout, &mut arena.layout, p => {
            p.reserve_exact(capacity);
            p.grow_to(capacity);
            let (mut start, mut words) = (0, synapses());
            for &n in &wire.lens {
                if n == 0 {
                    spans.push((0, 0));
                    continue;
                }
                p.write_iter(start, words.by_ref().take(n as usize));
                spans.push((start as u32, n));
                start += class(n as usize).1;
            }
        });
        arena.spans = Spans::Wide(spans);
        Ok(arena)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syns(cells: std::ops::Range<u32>) -> Vec<Synapse> {
        cells.map(|c| Synapse::new(c, 5)).collect()
    }

    fn read(a: &SynapseArena, seg: usize) -> Vec<Synapse> {
        a.get(seg).iter().collect()
    }

    fn used_len(a: &SynapseArena) -> usize {
        by_width!(Layout, &a.layout, p => p.len())
    }

    fn capacity(a: &SynapseArena) -> usize {
        by_width!(Layout, &a.layout, p => p.presyn.capacity())
    }

    #[test]
    fn blocks_are_reused_by_their_class() {
        for narrow in [false, true] {
            blocks_are_reused_by_their_class_in(SynapseArena::new(narrow));
        }
    }

    fn blocks_are_reused_by_their_class_in(mut a: SynapseArena) {
        for _ in 0..3 {
            a.push_empty();
        }
        a.set(1, &syns(0..20));
        a.set(2, &syns(100..103));
        assert_eq!(read(&a, 1), syns(0..20));
        assert_eq!(read(&a, 2), syns(100..103));
        assert!(a.get(0).is_empty());
        let used = used_len(&a);
        // Same class (17..=20): in place.
        a.set(1, &syns(0..18));
        assert_eq!(used_len(&a), used);
        assert_eq!(read(&a, 1), syns(0..18));
        // Class change: a new block; the old one is reused by the next segment of its class.
        a.set(1, &syns(0..30));
        let grown = used_len(&a);
        assert_eq!(grown, used + 32);
        a.push_empty();
        a.set(3, &syns(7..26));
        assert_eq!(used_len(&a), grown, "the freed 20-block is reused");
        assert_eq!(read(&a, 3), syns(7..26));
        assert_eq!(read(&a, 1), syns(0..30));
        a.clear(2);
        assert!(a.get(2).is_empty());
        assert_eq!(class(65), (17, 128));
        assert_eq!(class(64), (16, 64));
        for len in [1, 4, 5, 63, 64, 65, 128, 129, 5000] {
            let (c, cap) = class(len);
            assert_eq!(class_cap(c), cap);
            assert!(cap >= len);
        }
    }

    /// Synapses keep their values through either layout, a change of layout and a round
    /// trip; a cell or code beyond the narrow words keeps the wide layout.
    #[test]
    fn layouts_hold_the_same_synapses() {
        let cfg = bincode::config::standard();
        let small = vec![
            Synapse::new(7, 3),
            Synapse::new(65_535, 254),
            Synapse::new(9, DROPPED),
        ];
        for (content, fits) in [
            (small.clone(), true),
            (vec![Synapse::new(65_536, 3)], false),
            (vec![Synapse::new(3, 255)], false),
        ] {
            let mut a = SynapseArena::new(false);
            a.push_empty();
            a.set(0, &content);
            a.set_layout(true, 0, 0);
            assert_eq!(matches!(a.layout, Layout::Narrow(_)), fits);
            assert_eq!(read(&a, 0), content);
            let bytes = bincode::serde::encode_to_vec(&a, cfg).unwrap();
            let (mut back, _): (SynapseArena, _) =
                bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            assert_eq!(matches!(back.layout, Layout::Narrow(_)), fits);
            assert_eq!(back, a);
            back.set_layout(false, 0, 0);
            assert!(matches!(back.layout, Layout::Wide(_)));
            assert_eq!(read(&back, 0), content);
        }
        let mut a = SynapseArena::new(true);
        a.push_empty();
        a.set(0, &small);
        a.set_code(0, 1, DROPPED);
        assert_eq!(a.get(0).code(1), DROPPED);
        a.set_code(0, 1, 254);
        assert_eq!(read(&a, 0), small);
    }

    /// Whatever the spans' form, segments hold what a plain vector per segment does through
    /// growth, shrinking, clearing, compaction, changes of form and a round trip.
    #[test]
    fn packed_and_wide_spans_hold_the_same_synapses() {
        assert!(Spans::pack(8192, 32) && !Spans::pack(0, 32) && !Spans::pack(8192, 255));
        assert!(!Spans::pack(1 << 20, 32));
        let mut rng = crate::random::Random::new(7);
        let mut a = SynapseArena::new(true);
        a.set_layout(true, 300, 40);
        assert!(matches!(a.spans, Spans::Narrow(_)));
        let mut model: Vec<Vec<Synapse>> = Vec::new();
        for step in 0..6000 {
            if model.len() < 300 && rng.below(8) == 0 {
                a.push_empty();
                model.push(Vec::new());
                continue;
            }
            if model.is_empty() {
                continue;
            }
            let seg = rng.below(model.len() as u32) as usize;
            let len = if rng.below(10) == 0 { 0 } else { rng.below(41) };
            let first = rng.below(1000);
            let syns: Vec<Synapse> = (0..len)
                .map(|i| Synapse::new(first + 3 * i, rng.below(20) as Code))
                .collect();
            a.set(seg, &syns);
            model[seg] = syns;
            if step % 1500 == 0 {
                let packed = matches!(a.spans, Spans::Narrow(_));
                a.set_layout(true, if packed { 0 } else { 300 }, 40);
            }
            if step % 97 == 0 {
                for (s, syns) in model.iter().enumerate() {
                    assert_eq!(read(&a, s), *syns, "step {step} segment {s}");
                }
            }
        }
        a.compact();
        assert_eq!(a.free_words, 0);
        for (s, syns) in model.iter().enumerate() {
            assert_eq!(read(&a, s), *syns);
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&a, cfg).unwrap();
        let (mut back, _): (SynapseArena, _) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        back.set_layout(true, 300, 40);
        assert!(matches!(back.spans, Spans::Narrow(_)));
        assert_eq!(back, a);
        for (s, syns) in model.iter().enumerate() {
            assert_eq!(read(&back, s), *syns);
        }
    }

    /// Freed blocks come back last freed first, their links surviving a change of layout
    /// both ways, and the lists take no memory beyond a head per class.
    #[test]
    fn free_lists_live_in_the_free_blocks() {
        let start = |a: &SynapseArena, seg: usize| a.spans.get(seg).0;
        let mut a = SynapseArena::new(false);
        for s in 0..8 {
            a.push_empty();
            a.set(s, &syns(100 * s as u32..100 * s as u32 + 10));
        }
        let starts: Vec<usize> = (0..8).map(|s| start(&a, s)).collect();
        for s in [5, 1, 6] {
            a.clear(s);
        }
        assert_eq!(a.free_words, 3 * 12);
        let heap = a.heap_bytes();
        a.clear(3);
        assert_eq!(a.heap_bytes(), heap, "freeing allocates nothing");
        a.set_layout(true, 0, 0);
        assert!(matches!(a.layout, Layout::Narrow(_)));
        for (s, expect) in [(1, 3), (3, 6)] {
            a.set(s, &syns(0..9));
            assert_eq!(start(&a, s), starts[expect]);
        }
        a.set_layout(false, 0, 0);
        for (s, expect) in [(5, 1), (6, 5)] {
            a.set(s, &syns(0..11));
            assert_eq!(start(&a, s), starts[expect]);
        }
        assert_eq!(a.free_words, 0);
        a.push_empty();
        a.set(8, &syns(0..12));
        assert_eq!(
            start(&a, 8),
            starts[7] + 12,
            "no free block left: a new one"
        );
        for s in 0..8 {
            assert_eq!(a.get(s).len(), [10, 9, 10, 9, 10, 11, 11, 10][s]);
        }
    }

    #[test]
    fn free_blocks_are_reclaimed_by_compaction() {
        let mut a = SynapseArena::new(true);
        for s in 0..400 {
            a.push_empty();
            a.set(s, &syns(0..20));
        }
        // Every segment grows past its class: the 20-blocks are left free.
        for s in 0..400 {
            a.set(s, &syns(0..24));
        }
        assert!(a.free_words <= 2048, "compacted along the way");
        assert!(capacity(&a) < 400 * 24 * 2);
        for s in 0..400 {
            assert_eq!(read(&a, s), syns(0..24));
        }
    }

    #[test]
    fn serialises_compactly_and_round_trips() {
        let mut a = SynapseArena::new(true);
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
            assert_eq!(read(&back, s), *syns);
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
