//! Partition focus: batches from one partition at a time while networks thrash.
//!
//! When a partition's devices outnumber what the memory bounds hold and records interleave
//! across devices (every device reports each hour), a batch spanning all partitions holds about
//! one record per device, so every record costs a restore and an eviction. Reading one
//! partition at a time (the others paused) fills a batch with several records of each of that
//! partition's devices, so each restore serves all of them.
//!
//! Focus starts after a batch in which most records needed a restore. It ends when it does not
//! help (a focused batch still restores for most records: the partition alone has too many
//! devices, or records are sparse as under live load) or is not needed any more (a whole round
//! of partitions without a restore: the working set fits). The decisions are here, free of
//! Kafka; the service pauses and resumes partitions accordingly (see `service.rs`).

use std::collections::BTreeSet;

/// Batches smaller than this say too little about restores to start focusing.
const MIN_RECORDS_TO_DECIDE: usize = 100;

/// Which partition batches read from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Focus {
    enabled: bool,
    round: Option<Round>,
}

#[derive(Clone, Debug, PartialEq)]
struct Round {
    /// The partition batches read from.
    current: i32,
    /// Partitions visited and restores made since the round began.
    visited: usize,
    restores: u64,
}

/// Most records of the batch needed a network restored.
fn thrashing(records: usize, restores: u64) -> bool {
    restores.saturating_mul(2) >= records as u64
}

impl Focus {
    /// `enabled` false keeps every partition read at once.
    pub fn new(enabled: bool) -> Self {
        Focus {
            enabled,
            round: None,
        }
    }

    /// The partition batches are confined to, if any.
    pub fn current(&self) -> Option<i32> {
        self.round.as_ref().map(|r| r.current)
    }

    /// The partitions of `assigned` (ascending) to pause for the next batch.
    pub fn paused(&self, assigned: &[i32]) -> BTreeSet<i32> {
        match self.current() {
            Some(current) => assigned.iter().copied().filter(|&p| p != current).collect(),
            None => BTreeSet::new(),
        }
    }

    /// Learns from a processed batch of `records` that restored `restores` networks, with
    /// `assigned` the partitions owned now (ascending).
    pub fn after_batch(&mut self, assigned: &[i32], records: usize, restores: u64) {
        if !self.enabled || assigned.len() < 2 {
            self.round = None;
            return;
        }
        let Some(round) = &mut self.round else {
            if records >= MIN_RECORDS_TO_DECIDE && thrashing(records, restores) {
                self.round = Some(Round {
                    current: assigned[0],
                    visited: 0,
                    restores: 0,
                });
            }
            return;
        };
        if records >= MIN_RECORDS_TO_DECIDE && thrashing(records, restores) {
            self.round = None;
            return;
        }
        // An empty batch means the partition has caught up: move on.
        round.visited += 1;
        round.restores += restores;
        round.current = assigned
            .iter()
            .copied()
            .find(|&p| p > round.current)
            .unwrap_or(assigned[0]);
        if round.visited >= assigned.len() {
            if round.restores == 0 {
                self.round = None;
            } else {
                round.visited = 0;
                round.restores = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASSIGNED: [i32; 3] = [0, 2, 5];

    #[test]
    fn thrashing_batches_start_a_round_robin_over_the_assignment() {
        let mut f = Focus::new(true);
        f.after_batch(&ASSIGNED, 5000, 100);
        assert_eq!(f.current(), None, "few restores: no focus");
        f.after_batch(&ASSIGNED, 5000, 4000);
        assert_eq!(f.current(), Some(0));
        assert_eq!(f.paused(&ASSIGNED), BTreeSet::from([2, 5]));
        let mut seen = Vec::new();
        for _ in 0..4 {
            f.after_batch(&ASSIGNED, 20000, 1000);
            seen.push(f.current().unwrap());
        }
        assert_eq!(seen, [2, 5, 0, 2]);
    }

    #[test]
    fn focus_ends_when_it_does_not_help_or_is_not_needed() {
        let mut f = Focus::new(true);
        f.after_batch(&ASSIGNED, 5000, 5000);
        f.after_batch(&ASSIGNED, 5000, 3000);
        assert_eq!(
            f.current(),
            None,
            "a focused batch that still thrashes ends focus"
        );

        f.after_batch(&ASSIGNED, 5000, 5000);
        // A round with restores keeps focus; a whole round without ends it.
        for restores in [10, 0, 0] {
            f.after_batch(&ASSIGNED, 20000, restores);
        }
        assert!(f.current().is_some());
        for _ in 0..2 {
            f.after_batch(&ASSIGNED, 20000, 0);
            assert!(f.current().is_some());
        }
        f.after_batch(&ASSIGNED, 0, 0);
        assert_eq!(f.current(), None);
    }

    #[test]
    fn no_focus_when_disabled_small_or_alone() {
        let mut off = Focus::new(false);
        off.after_batch(&ASSIGNED, 5000, 5000);
        assert_eq!(off.current(), None);
        let mut small = Focus::new(true);
        small.after_batch(&ASSIGNED, 50, 50);
        assert_eq!(small.current(), None);
        let mut alone = Focus::new(true);
        alone.after_batch(&[3], 5000, 5000);
        assert_eq!(alone.current(), None);
        assert!(alone.paused(&[3]).is_empty());
    }

    #[test]
    fn a_revoked_focus_moves_to_the_next_owned_partition() {
        let mut f = Focus::new(true);
        f.after_batch(&[0, 1, 2, 3], 5000, 5000);
        f.after_batch(&[0, 1, 2, 3], 20000, 1000);
        assert_eq!(f.current(), Some(1));
        // Partitions 1 and 2 went to another instance.
        f.after_batch(&[0, 3], 20000, 1000);
        assert_eq!(f.current(), Some(3));
        assert_eq!(f.paused(&[0, 3]), BTreeSet::from([0]));
    }
}
