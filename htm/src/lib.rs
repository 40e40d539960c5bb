//! Hierarchical Temporal Memory for streaming anomaly detection.
//!
//! Pure computation: no I/O, no clocks, no threads. Every random choice comes from a seeded
//! [`random::Random`] stored inside the component that makes it, so a network's outputs are a
//! function of its parameters and its input history alone, and survive a checkpoint round trip
//! bit for bit.
//!
//! Parameter names follow NuPIC (in snake_case: `potential_pct`, `syn_perm_connected`,
//! `activation_threshold` …) so HTM users recognise them.

pub mod anomaly;
pub mod backtracking_tm;
pub mod checkpoint;
pub mod classifier;
pub mod connections;
pub mod encoders;
pub mod likelihood;
pub mod network;
pub mod random;
mod scratch;
pub mod sdr;
pub mod segment_store;
pub mod spatial_pooler;
pub mod temporal_memory;

/// Makes room in `v` for `extra` more items (`min_extra` at least), growing by a sixteenth
/// rather than doubling: networks live long, so spare capacity is memory held for good, and
/// their stores grow ever more slowly as they age.
pub(crate) fn reserve_gradually<T>(v: &mut Vec<T>, extra: usize, min_extra: usize) {
    if v.capacity() - v.len() < extra {
        v.reserve_exact(extra.max(v.len() / 16).max(min_extra));
    }
}

pub use sdr::Sdr;
