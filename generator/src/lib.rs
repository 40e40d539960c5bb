//! Device-telemetry generator: reads the supported CSV formats into one record type, computes the
//! Kafka partition a Java producer would pick for each key, and synthesises realistic labelled data.

mod csvline;
pub mod inspect;
pub mod partitioner;
pub mod records;
pub mod synth;

pub use partitioner::{murmur2, partition_for_key, to_positive};
pub use records::{EpaFields, Format, InputRecord, JsonError, OpenError, RecordReader, RowError};
pub use synth::{AnomalyKind, Label, Labels, SynthConfig, SynthError, SynthSummary};
