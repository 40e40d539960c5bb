//! The TM's own synapse storage: each segment's synapses in one small vector sorted by
//! presynaptic cell, and the presynaptic out index that forward passes walk.
//!
//! Sorting by presynaptic cell turns every "is this cell on the segment / in the update"
//! question of learning into a merge of two short sorted lists, and keeps a segment's
//! synapses in a few consecutive cache lines.

use serde::{Deserialize, Serialize};

/// Index of a segment; stable while the segment lives, reused after it is freed.
pub type SegmentId = u32;

/// One synapse of a segment.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Synapse {
    /// Presynaptic cell.
    pub presyn: u32,
    pub permanence: f32,
    /// Where this synapse's entry sits in its presynaptic cell's out list (the connected or
    /// the other one, as its permanence says), so moves and removals need no search.
    /// Derived: rebuilt after deserialisation.
    #[serde(skip)]
    pub(super) out_pos: u32,
}

/// Content equality; the out-list position depends on history, not on what is stored.
impl PartialEq for Synapse {
    fn eq(&self, other: &Self) -> bool {
        self.presyn == other.presyn && self.permanence == other.permanence
    }
}

/// Marks a synapse to be dropped by [`compact`].
pub(super) const DROPPED: f32 = -1.0;

/// Drops the synapses marked [`DROPPED`], keeping the order.
pub(super) fn compact(syns: &mut Vec<Synapse>) {
    syns.retain(|s| s.permanence != DROPPED);
}

/// Segment id 0 is never allocated. Removed out-list entries are overwritten with it (a
/// tombstone), so that no entry ever moves and every synapse knows its entry's position;
/// passes count tombstones into segment 0's counter, which nothing reads.
pub(super) const SINK: SegmentId = 0;

/// Presynaptic cell → the segments it has a synapse on, in two lists: connected synapses and
/// the others (`Cells4`'s `OutSynapses`, split by permanence), so a forward pass is a
/// sequential read and one counter update per synapse, with the increment fixed per list.
/// Entry order is irrelevant (passes only count).
///
/// All lists live in one arena, each in a span with some spare room; a list that outgrows
/// its span moves to the end of the arena. Rebuilds (after restore, and whenever
/// tombstones or abandoned spans pile up) lay the lists out again in cell order, so the
/// cells of a column — which fire together — have their lists side by side. Derived from
/// the segments: not serialised.
#[derive(Clone, Debug, Default)]
pub(super) struct OutIndex {
    /// Per cell: its connected list, then its other list.
    spans: Vec<[Span; 2]>,
    arena: Vec<SegmentId>,
    /// Entries in all lists, tombstones included.
    entries: usize,
    tombstones: usize,
    /// Arena slots in abandoned spans.
    abandoned: usize,
}

/// A list: `arena[start..start + len]`, room up to `start + cap`.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    start: u32,
    len: u32,
    cap: u32,
}

/// Derived data: equal whenever the segments it indexes are.
impl PartialEq for OutIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Which of a cell's two lists holds a synapse.
#[inline]
fn side(connected: bool) -> usize {
    if connected {
        0
    } else {
        1
    }
}

impl OutIndex {
    pub(super) fn new(num_cells: usize) -> Self {
        OutIndex {
            spans: vec![[Span::default(); 2]; num_cells],
            arena: Vec::new(),
            entries: 0,
            tombstones: 0,
            abandoned: 0,
        }
    }

    /// `cell`'s connected list and its other list, tombstones included.
    #[inline]
    pub(super) fn lists(&self, cell: u32) -> [&[SegmentId]; 2] {
        let [c, u] = self.spans[cell as usize];
        [
            &self.arena[c.start as usize..(c.start + c.len) as usize],
            &self.arena[u.start as usize..(u.start + u.len) as usize],
        ]
    }

    #[inline]
    fn slot(&mut self, presyn: u32, connected: bool, pos: u32) -> &mut SegmentId {
        let sp = self.spans[presyn as usize][side(connected)];
        debug_assert!(pos < sp.len);
        &mut self.arena[(sp.start + pos) as usize]
    }

    /// Lists a synapse of `seg` from `presyn`; returns its position in its list.
    pub(super) fn add(&mut self, presyn: u32, seg: SegmentId, connected: bool) -> u32 {
        let sp = &mut self.spans[presyn as usize][side(connected)];
        if sp.len == sp.cap {
            let cap = (sp.cap * 2).max(4);
            let start = self.arena.len();
            let old = sp.start as usize..(sp.start + sp.len) as usize;
            self.arena.extend_from_within(old);
            self.arena.resize(start + cap as usize, SINK);
            self.abandoned += sp.cap as usize;
            sp.start = u32::try_from(start).expect("out index arena within u32");
            sp.cap = cap;
        }
        self.arena[(sp.start + sp.len) as usize] = seg;
        sp.len += 1;
        self.entries += 1;
        sp.len - 1
    }

    /// Moves `syn` (a synapse of `seg`) to the list of its new connected state.
    pub(super) fn set_connected(&mut self, syn: &mut Synapse, seg: SegmentId, connected: bool) {
        self.remove(syn, seg, !connected);
        syn.out_pos = self.add(syn.presyn, seg, connected);
    }

    /// Unlists `syn` (a synapse of `seg`, in the list of `connected`).
    #[inline]
    pub(super) fn remove(&mut self, syn: &Synapse, seg: SegmentId, connected: bool) {
        let e = self.slot(syn.presyn, connected, syn.out_pos);
        debug_assert_eq!(*e, seg);
        *e = SINK;
        self.tombstones += 1;
    }

    /// Whether tombstones (a quarter of the entries) or abandoned spans (a third of the
    /// arena) make a rebuild worth its cost.
    pub(super) fn needs_rebuild(&self) -> bool {
        (self.tombstones > 1024 && self.tombstones * 4 > self.entries)
            || (self.abandoned > 4096 && self.abandoned * 3 > self.arena.len())
    }

    /// Relists every synapse of `synapses` (by segment id), recording positions.
    pub(super) fn rebuild(&mut self, synapses: &mut [Vec<Synapse>], connected_perm: f32) {
        for sp in &mut self.spans {
            *sp = [Span::default(); 2];
        }
        for syns in synapses.iter() {
            for syn in syns {
                self.spans[syn.presyn as usize][side(syn.permanence >= connected_perm)].len += 1;
            }
        }
        // Room for a quarter more before a list has to move.
        let mut start = 0u32;
        for sp in self.spans.iter_mut().flatten() {
            let cap = if sp.len == 0 {
                0
            } else {
                sp.len + sp.len / 4 + 2
            };
            *sp = Span { start, len: 0, cap };
            start += cap;
        }
        self.arena.clear();
        if self.arena.capacity() > 2 * start as usize {
            // Give back what growth since the last rebuild left unused.
            self.arena.shrink_to(start as usize);
        }
        self.arena.resize(start as usize, SINK);
        self.entries = 0;
        self.tombstones = 0;
        self.abandoned = 0;
        for (seg, syns) in synapses.iter_mut().enumerate() {
            for syn in syns {
                syn.out_pos = self.add(
                    syn.presyn,
                    seg as SegmentId,
                    syn.permanence >= connected_perm,
                );
            }
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.spans.capacity() * std::mem::size_of::<[Span; 2]>() + self.arena.capacity() * 4
    }
}
