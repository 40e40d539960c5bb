//! Shared code of the NAB runner, scorer and benchmarks.

pub mod counting;
pub mod nab;
pub mod scoring;
pub mod synthetic;
