//! Device-telemetry generator: reads the supported CSV formats into one record type, computes the
//! Kafka partition a Java producer would pick for each key, loads records into a keyed Kafka topic,
//! and synthesises realistic labelled data.

mod csvline;
pub mod inspect;
pub mod load;
pub mod partitioner;
pub mod records;
pub mod synth;

pub use load::{load, LoadError, LoadOptions, LoadSummary, Rate};
pub use partitioner::{murmur2, partition_for_key, to_positive};
pub use records::{EpaFields, Format, InputRecord, JsonError, OpenError, RecordReader, RowError};
pub use synth::{AnomalyKind, Label, Labels, SynthConfig, SynthError, SynthSummary};
