//! The eviction order of the `max_segments` budget.

use super::params::Eviction;
use super::store::{Entry, SegmentId, SINK};
use super::SegmentMeta;

/// Live segments in eviction order: the least recently active (lowest
/// `last_active_iteration`) first, the lowest id on ties; with
/// [`Eviction::UnreinforcedFirst`], segments never reinforced since their creation all go
/// before the others.
///
/// Two doubly linked lists (one per eviction class) threaded through per-segment-id links; a
/// segment moves to the tail of its class's list when created or reinforced. Its
/// `last_active_iteration` is then the current learning iteration, which never decreases, so
/// each list is ordered by `last_active_iteration`; among the oldest (the segments touched at
/// one iteration and not since, a few) the lowest id is looked for when evicting. Two links
/// per segment, against a heap of 8-byte keys with stale entries. Derived from the segment
/// metadata: not serialised.
#[derive(Clone, Debug)]
pub(super) enum Recency {
    Narrow(Chains<u16>),
    Wide(Chains<u32>),
}

impl Default for Recency {
    fn default() -> Self {
        Recency::Wide(Chains::default())
    }
}

impl Recency {
    /// The order of the live segments of `segments` under a budget of `max_segments` (ids
    /// up to it): 16-bit links when they fit.
    pub(super) fn new(segments: &[SegmentMeta], max_segments: u32, policy: Eviction) -> Self {
        let mut r = if max_segments <= u32::from(u16::MAX) {
            Recency::Narrow(Chains::default())
        } else {
            Recency::Wide(Chains::default())
        };
        by_width!(Recency, &mut r, c => c.rebuild(segments, max_segments as usize, policy));
        r
    }

    /// Puts `seg` (live, not listed) at the tail of its class's list.
    pub(super) fn push(
        &mut self,
        seg: SegmentId,
        m: &SegmentMeta,
        budget: usize,
        policy: Eviction,
    ) {
        by_width!(Recency, self, c => c.push(seg, class(m, policy), budget))
    }

    /// Takes a listed `seg` out of its list.
    pub(super) fn unlink(&mut self, seg: SegmentId) {
        by_width!(Recency, self, c => c.unlink(seg))
    }

    /// Moves a listed `seg` to the tail of its (possibly new) class's list.
    pub(super) fn touch(
        &mut self,
        seg: SegmentId,
        m: &SegmentMeta,
        budget: usize,
        policy: Eviction,
    ) {
        self.unlink(seg);
        self.push(seg, m, budget, policy);
    }

    /// The segment to evict, if any is listed.
    pub(super) fn oldest(&self, segments: &[SegmentMeta]) -> Option<SegmentId> {
        by_width!(Recency, self, c => c.oldest(segments))
    }

    pub(super) fn heap_bytes(&self) -> usize {
        by_width!(Recency, self, c => c.links.capacity() * std::mem::size_of_val(&c.ends[0]))
    }
}

/// The list of `m`: 0 evicts first.
#[inline]
fn class(m: &SegmentMeta, policy: Eviction) -> usize {
    match policy {
        Eviction::UnreinforcedFirst if m.positive_activations() <= 1 => 0,
        _ => 1,
    }
}

/// The lists; [`SINK`] (never a live segment) ends them.
#[derive(Clone, Debug, Default)]
pub(super) struct Chains<E> {
    /// Per segment id: the previous and the next segment of its list.
    links: Vec<[E; 2]>,
    /// Per class: the first (oldest) and the last segment of its list.
    ends: [[E; 2]; 2],
}

impl<E: Entry> Chains<E> {
    const END: usize = SINK as usize;

    fn rebuild(&mut self, segments: &[SegmentMeta], budget: usize, policy: Eviction) {
        let mut keys: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        for (id, m) in segments.iter().enumerate().filter(|(_, m)| m.alive()) {
            keys[class(m, policy)].push(u64::from(m.last_active_iteration) << 32 | id as u64);
        }
        self.links = Vec::with_capacity(segments.len());
        self.ends = Default::default();
        for (c, keys) in keys.iter_mut().enumerate() {
            keys.sort_unstable();
            for &k in keys.iter() {
                self.push(k as u32, c, budget);
            }
        }
    }

    fn push(&mut self, seg: SegmentId, class: usize, budget: usize) {
        let s = seg as usize;
        if self.links.len() <= s {
            super::reserve_for_ids(&mut self.links, budget);
            self.links.resize(s + 1, [E::new(Self::END); 2]);
        }
        let tail = self.ends[class][1];
        self.links[s] = [tail, E::new(Self::END)];
        if tail.get() == Self::END {
            self.ends[class][0] = E::new(s);
        } else {
            self.links[tail.get()][1] = E::new(s);
        }
        self.ends[class][1] = E::new(s);
    }

    fn unlink(&mut self, seg: SegmentId) {
        let s = seg as usize;
        let [prev, next] = self.links[s];
        // A list's first and last segments are known by its ends; a segment is in one list.
        if prev.get() == Self::END {
            let c = self.class_of_end(s, 0);
            self.ends[c][0] = next;
        } else {
            self.links[prev.get()][1] = next;
        }
        if next.get() == Self::END {
            let c = self.class_of_end(s, 1);
            self.ends[c][1] = prev;
        } else {
            self.links[next.get()][0] = prev;
        }
    }

    /// The class whose list has `s` at its `end` (0 first, 1 last).
    fn class_of_end(&self, s: usize, end: usize) -> usize {
        let c = usize::from(self.ends[0][end].get() != s);
        debug_assert_eq!(self.ends[c][end].get(), s, "segment {s} is not listed");
        c
    }

    fn oldest(&self, segments: &[SegmentMeta]) -> Option<SegmentId> {
        let first = self
            .ends
            .iter()
            .map(|e| e[0].get())
            .find(|&s| s != Self::END)?;
        let it = segments[first].last_active_iteration;
        let (mut best, mut s) = (first, self.links[first][1].get());
        while s != Self::END && segments[s].last_active_iteration == it {
            best = best.min(s);
            s = self.links[s][1].get();
        }
        Some(best as SegmentId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(iteration: u32, reinforced: bool) -> SegmentMeta {
        let mut m = SegmentMeta::new(3, 0, true, iteration);
        m.set_positive_activations(1 + u32::from(reinforced));
        m
    }

    /// The lists give the order a sort of the live segments by (class, iteration, id) gives,
    /// through pushes, touches, unlinks and a rebuild, in both link widths.
    #[test]
    fn eviction_order_is_class_then_iteration_then_id() {
        for (max_segments, policy) in [
            (60, Eviction::UnreinforcedFirst),
            (60, Eviction::LeastRecentlyActive),
            (70_000, Eviction::UnreinforcedFirst),
        ] {
            let mut segments = vec![SegmentMeta::default()];
            let mut r = Recency::new(&segments, max_segments, policy);
            let mut rng = crate::random::Random::new(7);
            let budget = max_segments as usize;
            for it in 1..400u32 {
                // Several steps share an iteration, so ties by id come up.
                let now = it / 3;
                let seg = 1 + rng.below(50) as usize;
                if segments.len() <= seg {
                    segments.resize(seg + 1, SegmentMeta::default());
                }
                match (segments[seg].alive(), rng.below(3)) {
                    (false, _) => {
                        segments[seg] = meta(now, false);
                        r.push(seg as u32, &segments[seg], budget, policy);
                    }
                    (true, 0) => {
                        r.unlink(seg as u32);
                        segments[seg].release();
                    }
                    (true, _) => {
                        segments[seg] = meta(now, true);
                        r.touch(seg as u32, &segments[seg], budget, policy);
                    }
                }
                let expected = segments
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.alive())
                    .min_by_key(|(id, m)| (class(m, policy), m.last_active_iteration, *id))
                    .map(|(id, _)| id as SegmentId);
                assert_eq!(r.oldest(&segments), expected, "step {it}");
                if it % 97 == 0 {
                    r = Recency::new(&segments, max_segments, policy);
                    assert_eq!(r.oldest(&segments), expected, "rebuilt at {it}");
                }
            }
        }
    }
}
