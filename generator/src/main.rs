//! `generator` command line: `synth` writes labelled synthetic EPA data, `inspect` summarises a file.

use std::fs::File;
use std::io::BufWriter;
use std::num::NonZeroU32;
use std::path::PathBuf;

use anyhow::Context;
use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use generator::inspect::inspect;
use generator::synth::{generate, parse_interval, write_labels, SynthConfig};
use generator::{Format, RecordReader};

/// Device telemetry tool: synthesise data, inspect input files.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write realistic multi-device EPA-format telemetry with labelled anomalies.
    Synth {
        /// Number of devices.
        #[arg(long, default_value_t = 6)]
        devices: u32,
        /// Span in days.
        #[arg(long, default_value_t = 28)]
        days: u32,
        /// Sampling interval, e.g. 1h, 30m, 900s.
        #[arg(long, default_value = "1h", value_parser = parse_interval_arg)]
        interval: u32,
        /// Random seed (same seed, same bytes).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// First day (UTC), YYYY-MM-DD.
        #[arg(long, default_value = "2014-01-01")]
        start: NaiveDate,
        /// Output CSV file.
        #[arg(long)]
        out: PathBuf,
        /// Output labels JSON file.
        #[arg(long)]
        labels: PathBuf,
    },
    /// Parse a file and print format, row counts, bad rows, devices and their partitions.
    Inspect {
        /// Input CSV file.
        file: PathBuf,
        /// Force the format instead of detecting it from the header.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Partition count for the key → partition assignment.
        #[arg(long, default_value = "10")]
        partitions: NonZeroU32,
    },
}

fn parse_interval_arg(s: &str) -> Result<u32, String> {
    parse_interval(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Synth {
            devices,
            days,
            interval,
            seed,
            start,
            out,
            labels,
        } => {
            let cfg = SynthConfig {
                devices,
                days,
                interval_secs: interval,
                seed,
                start,
            };
            cfg.validate()?;
            let file = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
            let summary = generate(&cfg, BufWriter::new(file))?;
            let file =
                File::create(&labels).with_context(|| format!("creating {}", labels.display()))?;
            write_labels(&summary.labels, BufWriter::new(file))?;
            let windows: usize = summary.labels.values().map(Vec::len).sum();
            println!(
                "wrote {} rows for {} devices ({} samples missing) to {}; {} anomaly windows to {}",
                summary.rows,
                summary.devices.len(),
                summary.missing,
                out.display(),
                windows,
                labels.display()
            );
        }
        Command::Inspect {
            file,
            format,
            partitions,
        } => {
            let reader = RecordReader::from_path(&file, format)?;
            print!("{}", inspect(reader, partitions));
        }
    }
    Ok(())
}
