//! Generator entry point (loading and synthesis are built in their own issue).

use clap::Parser;

/// Loads device telemetry into Kafka.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    Ok(())
}
