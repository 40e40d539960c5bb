//! `generator` command line: `synth` writes labelled synthetic EPA data, `inspect` summarises a file,
//! `load` sends a file to a keyed Kafka topic.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use generator::inspect::inspect;
use generator::load::{count_data_lines, load, LoadOptions, Rate};
use generator::synth::{generate, parse_interval, write_labels, SynthConfig};
use generator::{Format, RecordReader};
use tracing_subscriber::EnvFilter;

/// Device telemetry tool: synthesise data, inspect input files, load them into Kafka.
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
    /// Send a file to a Kafka topic: key = device id, value = JSON, partition = the Java client's
    /// choice for the key; bad rows are reported, never sent.
    Load {
        /// Input CSV file.
        file: PathBuf,
        /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT...].
        #[arg(long, env = "GENERATOR_BOOTSTRAP_SERVERS")]
        bootstrap_servers: String,
        /// Destination topic.
        #[arg(long, env = "GENERATOR_TOPIC", default_value = "telemetry")]
        topic: String,
        /// Partitions when creating the topic (an existing topic keeps its own).
        #[arg(long, env = "GENERATOR_PARTITIONS", default_value_t = 10)]
        partitions: i32,
        /// Replication factor when creating the topic.
        #[arg(long, env = "GENERATOR_REPLICATION_FACTOR", default_value_t = 1)]
        replication_factor: i32,
        /// Send at most this many records per second.
        #[arg(long, env = "GENERATOR_RATE", conflicts_with = "speedup")]
        rate: Option<f64>,
        /// Replay the data's timestamps this many times faster than real time.
        #[arg(long, env = "GENERATOR_SPEEDUP")]
        speedup: Option<f64>,
        /// Force the input format instead of detecting it from the header.
        #[arg(long, value_enum, env = "GENERATOR_FORMAT")]
        format: Option<Format>,
        /// Extra librdkafka property (SASL, SSL, batching...), repeatable: -X security.protocol=SSL
        #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
        kafka: Vec<(String, String)>,
        /// Fail if the topic does not exist instead of creating it.
        #[arg(long)]
        no_create_topic: bool,
        /// Seconds to wait for the cluster (and for topic creation).
        #[arg(long, env = "GENERATOR_CONNECT_TIMEOUT", default_value_t = 10.0)]
        connect_timeout: f64,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

fn parse_interval_arg(s: &str) -> Result<u32, String> {
    parse_interval(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // librdkafka's own log lines are noise next to the loader's messages; RUST_LOG can bring them back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=off,rdkafka=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The cause chain on one line (no backtrace), skipping causes a message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
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
        Command::Load {
            file,
            bootstrap_servers,
            topic,
            partitions,
            replication_factor,
            rate,
            speedup,
            format,
            kafka,
            no_create_topic,
            connect_timeout,
            no_progress,
        } => {
            if !(connect_timeout.is_finite() && connect_timeout > 0.0) {
                anyhow::bail!("--connect-timeout must be a positive number of seconds");
            }
            let opts = LoadOptions {
                bootstrap_servers,
                topic,
                partitions,
                replication_factor,
                rate: match (rate, speedup) {
                    (Some(r), _) => Some(Rate::RecordsPerSec(r)),
                    (None, Some(s)) => Some(Rate::Speedup(s)),
                    (None, None) => None,
                },
                kafka: kafka.into_iter().collect::<BTreeMap<_, _>>(),
                create_topic: !no_create_topic,
                progress: !no_progress,
                connect_timeout: Duration::from_secs_f64(connect_timeout),
            };
            opts.validate()?;
            let reader = RecordReader::from_path(&file, format)?;
            // Only worth a pass over the file when a bar will actually be drawn.
            let total = if opts.progress && std::io::stderr().is_terminal() {
                Some(
                    count_data_lines(&file)
                        .with_context(|| format!("reading {}", file.display()))?,
                )
            } else {
                None
            };
            let summary = load(&opts, reader, total)
                .with_context(|| format!("loading {} into {}", file.display(), opts.topic))?;
            print!("{summary}");
        }
    }
    Ok(())
}
