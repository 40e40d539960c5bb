//! Detector service entry point (the Kafka pipeline is built in its own issue).

use clap::Parser;

/// Online HTM anomaly detector for device telemetry.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    Ok(())
}
