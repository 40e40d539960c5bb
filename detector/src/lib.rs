//! The detector service: one HTM network per device, pinned to the device's partition.
//!
//! `engine` is the compute core (no Kafka); `service` is the consume → compute → produce loop
//! with checkpoints and commits; `store` keeps checkpoints; `config` reads the TOML file.

pub mod allocator;
pub mod chaos;
pub mod config;
pub mod demo;
pub mod engine;
pub mod eos;
pub mod kafka_store;
pub mod service;
pub mod store;
