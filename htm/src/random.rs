//! The seeded random generator every HTM component keeps in its own state.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

/// A small, fast, serialisable PRNG. Each component owns one, seeded from its params, so a
/// network's random draws depend only on its seed and its input history — never on threads,
/// wall clock or process — and survive a checkpoint round trip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Random(Pcg64Mcg);

impl Random {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Random(Pcg64Mcg::seed_from_u64(seed))
    }

    /// Uniform `u32`.
    pub fn next_u32(&mut self) -> u32 {
        self.0.random()
    }

    /// Uniform `f64` in `[0, 1)`.
    pub fn real(&mut self) -> f64 {
        self.0.random()
    }

    /// Uniform integer in `[0, n)`. `n` must be positive.
    pub fn below(&mut self, n: u32) -> u32 {
        self.0.random_range(0..n)
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u32 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// Picks `n` distinct elements of `population` (all of them if it is smaller), in
    /// sampling order.
    pub fn sample<T: Copy>(&mut self, population: &[T], n: usize) -> Vec<T> {
        let mut pool: Vec<T> = population.to_vec();
        self.sample_in_place(&mut pool, n);
        pool
    }

    /// [`Random::sample`] of `pool` in place: the same draws, leaving the sample in `pool`.
    pub fn sample_in_place<T>(&mut self, pool: &mut Vec<T>, n: usize) {
        let n = n.min(pool.len());
        // Partial Fisher–Yates: only the first n slots need to be drawn.
        for i in 0..n {
            let j = i + self.below((pool.len() - i) as u32) as usize;
            pool.swap(i, j);
        }
        pool.truncate(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_clone_continues_identically() {
        let mut a = Random::new(7);
        let mut b = Random::new(7);
        for _ in 0..10 {
            assert_eq!(a.next_u32(), b.next_u32());
        }
        let mut c = a.clone();
        assert_eq!(a.real().to_bits(), c.real().to_bits());
        assert_ne!(Random::new(8).next_u32(), Random::new(7).next_u32());
    }

    #[test]
    fn sample_draws_distinct_members() {
        let mut r = Random::new(1);
        let pop: Vec<u32> = (0..50).collect();
        let mut s = r.sample(&pop, 20);
        assert_eq!(s.len(), 20);
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 20);
        assert_eq!(r.sample(&pop[..3], 10).len(), 3);
    }
}
