//! `detector-chaos`: the helper commands of `scripts/chaos.sh` — load data with garbage mixed
//! in, wait for a group to commit a whole topic, and verify a run against a golden run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use detector::chaos;
use generator::RecordReader;

#[derive(Parser)]
#[command(about)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    bootstrap_servers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create topics (existing ones are kept).
    Topics {
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        topics: Vec<String>,
    },
    /// Load a telemetry CSV keyed by device, with a garbage message after every N-th record.
    Load {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        #[arg(long, default_value_t = 100)]
        garbage_every: usize,
        /// Load only the first N records of the file.
        #[arg(long)]
        records: Option<usize>,
    },
    /// Wait until a group has committed the end of every partition of a topic.
    Wait {
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Compare a run's output (read_committed) with the golden run's, per input record; the
    /// last line is the chaos summary. Fails unless nothing was lost, duplicated or changed
    /// and the dead letters are as many as the garbage.
    Verify {
        #[arg(long)]
        input: String,
        #[arg(long)]
        golden_output: String,
        #[arg(long)]
        output: String,
        #[arg(long)]
        dead_letter: String,
        #[arg(long)]
        expected_dead_letters: u64,
        #[arg(long, default_value_t = 0)]
        kills: u64,
        #[arg(long, default_value_t = 0)]
        broker_restarts: u64,
        #[arg(long, default_value_t = 0)]
        rebalances: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    let boot = cli.bootstrap_servers.as_str();
    match cli.command {
        Command::Topics { partitions, topics } => {
            let t: Vec<&str> = topics.iter().map(String::as_str).collect();
            chaos::create_topics(boot, &t, partitions)?;
        }
        Command::Load {
            data,
            topic,
            partitions,
            garbage_every,
            records,
        } => {
            chaos::create_topics(boot, &[&topic], partitions)?;
            let reader = RecordReader::from_path(&data, None)
                .with_context(|| format!("opening {}", data.display()))?;
            let recs = reader
                .filter_map(Result::ok)
                .take(records.unwrap_or(usize::MAX));
            let loaded = chaos::load_with_garbage(boot, &topic, partitions, recs, garbage_every)?;
            println!("loaded: valid={} garbage={}", loaded.valid, loaded.garbage);
        }
        Command::Wait {
            group,
            topic,
            timeout_secs,
        } => {
            let c = chaos::wait_committed(boot, &group, &topic, Duration::from_secs(timeout_secs))?;
            println!("committed: {c:?}");
        }
        Command::Verify {
            input,
            golden_output,
            output,
            dead_letter,
            expected_dead_letters,
            kills,
            broker_restarts,
            rebalances,
        } => {
            let ends = chaos::end_offsets(boot, &input)?;
            let golden = chaos::enriched_by_source(&chaos::read_committed(boot, &golden_output)?)?;
            let out = chaos::enriched_by_source(&chaos::read_committed(boot, &output)?)?;
            let dead = chaos::dead_by_source(&chaos::read_committed(boot, &dead_letter)?)?;
            let c = chaos::compare(&ends, &golden, &out, &dead);
            if c.unaccounted > 0 {
                println!(
                    "input records with no outcome or two kinds of outcome: {}",
                    c.unaccounted
                );
                // Where they are, and whether their outcomes exist outside committed
                // transactions (an open or aborted transaction, rather than never produced).
                let missing = chaos::unaccounted(&ends, &out, &dead);
                let loose_out =
                    chaos::enriched_by_source(&chaos::read_uncommitted(boot, &output)?)?;
                let loose_dead =
                    chaos::dead_by_source(&chaos::read_uncommitted(boot, &dead_letter)?)?;
                let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
                for &(p, o) in &missing {
                    by_partition.entry(p).or_default().push(o);
                }
                for (p, offsets) in by_partition {
                    let uncommitted = offsets
                        .iter()
                        .filter(|&&o| {
                            loose_out.contains_key(&(p, o)) || loose_dead.contains_key(&(p, o))
                        })
                        .count();
                    println!(
                        "  input partition {p}: {} unaccounted, offsets {}..={} (first {:?}); {uncommitted} of them have an outcome outside committed transactions",
                        offsets.len(),
                        offsets[0],
                        offsets[offsets.len() - 1],
                        &offsets[..offsets.len().min(8)]
                    );
                }
            }
            println!(
                "chaos: {c} kills={kills} broker_restarts={broker_restarts} rebalances={rebalances}"
            );
            return Ok(c.ok(expected_dead_letters));
        }
    }
    Ok(true)
}
