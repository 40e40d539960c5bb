//! Scale bench: many devices through one detector instance under a memory budget, on the
//! librdkafka mock cluster (served by a child process). Networks beyond the budget are
//! checkpointed, dropped and restored on their next record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use benches::counting::{live_bytes, peak_live_bytes, Counting};
use benches::synthetic::{
    bench_config, libc_heap_mb, peak_rss_mb, record, rss_mb, serve_broker, BrokerProcess,
};
use clap::Parser;
use detector::service::{self, Progress};
use generator::LoadOptions;

// The detector's allocator (see detector/src/main.rs), counting live bytes.
#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Thousands of device networks in one detector under a memory budget.
#[derive(Parser)]
#[command(about)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    #[arg(long, default_value_t = 200)]
    records_per_device: usize,
    /// Memory budget for networks, MiB (the detector's `memory.max_mb`).
    #[arg(long, default_value_t = 2000)]
    budget_mb: u64,
    #[arg(long, default_value_t = 10)]
    partitions: i32,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// The detector's `batch.max_records` (0 = its default).
    #[arg(long, default_value_t = 0)]
    batch_records: usize,
    /// The consumer's `max.partition.fetch.bytes` (0 = librdkafka's default).
    #[arg(long, default_value_t = 0)]
    fetch_bytes: usize,
    /// More consumer properties, `key=value` (repeatable), e.g. `debug=fetch`.
    #[arg(long)]
    consumer: Vec<String>,
    /// Serve the broker for a parent run (see `BrokerProcess`).
    #[arg(long, hide = true)]
    serve_broker: bool,
}

fn main() -> Result<()> {
    detector::allocator::return_freed_memory_soon();
    // The detector's warnings (RUST_LOG overrides), e.g. rebalances under load.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if args.serve_broker {
        return serve_broker(args.partitions);
    }
    // The broker holds every input and output record: in its own process, the resident set
    // measured here is the detector's.
    let broker = BrokerProcess::spawn(args.partitions)?;
    let bootstrap = broker.bootstrap.clone();
    let checkpoints = tempfile::tempdir()?;
    let mut config = bench_config(&bootstrap, checkpoints.path(), args.workers);
    config.htm.probation = 100;
    config.checkpoint.interval_secs = 10.0;
    config.memory.max_mb = args.budget_mb;
    if args.batch_records > 0 {
        config.batch.max_records = args.batch_records;
    }
    if args.fetch_bytes > 0 {
        config.kafka_consumer.insert(
            "max.partition.fetch.bytes".into(),
            args.fetch_bytes.to_string(),
        );
    }
    for kv in &args.consumer {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--consumer {kv:?}: expected key=value");
        };
        config.kafka_consumer.insert(k.into(), v.into());
    }
    let total = args.devices * args.records_per_device;
    let mut load = LoadOptions::new(bootstrap.clone(), config.topics.input.clone());
    load.create_topic = false;
    load.progress = false;
    let devices = args.devices;

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let detector = {
        let (c, s, p) = (Arc::new(config), stop.clone(), progress.clone());
        std::thread::spawn(move || service::run(c, s, p))
    };
    // The mock broker keeps only the newest 5 MiB of each partition, so the records are sent
    // while the detector reads, never more than 4 MiB per partition ahead of it: a backlog as
    // deep as the broker can hold.
    // Value plus key and per-record framing in the broker's log.
    let record_bytes = record(0, devices, &mut htm::random::Random::new(0))
        .to_json()
        .len()
        + 48;
    let ahead = (args.partitions as usize * (4 << 20) / record_bytes) as u64;
    let mut loader = Some({
        let progress = progress.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut rng = htm::random::Random::new(3);
            let paced = (0..total).map(move |i| {
                while i as u64 > progress.consumed.load(Ordering::SeqCst) + ahead {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(record(i, devices, &mut rng))
            });
            generator::load(&load, paced, Some(total as u64))?;
            Ok(())
        })
    });
    eprintln!(
        "sending {total} records for {devices} devices, at most {ahead} ahead of the detector"
    );
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut max_resident = 0u64;
    let mut max_networks = 0u64;
    // The largest resident set seen at a 50 ms sample, with what the process held then.
    let mut largest = (0.0f64, String::new());
    loop {
        let done = progress.enriched.load(Ordering::SeqCst);
        if let Some(rss) = rss_mb().filter(|&r| r > largest.0) {
            largest = (
                rss,
                format!(
                    "Rust heap {:.0}, networks {:.0}, C malloc {:.0} MiB, {} records consumed",
                    live_bytes() as f64 / 1048576.0,
                    progress.resident_bytes.load(Ordering::SeqCst) as f64 / 1048576.0,
                    libc_heap_mb().unwrap_or(f64::NAN),
                    progress.consumed.load(Ordering::SeqCst),
                ),
            );
        }
        max_resident = max_resident.max(progress.resident_bytes.load(Ordering::SeqCst));
        max_networks = max_networks.max(progress.devices.load(Ordering::SeqCst));
        if done >= total as u64 {
            break;
        }
        if detector.is_finished() {
            stop.store(true, Ordering::SeqCst);
            detector.join().expect("detector thread")?;
            bail!("detector stopped after {done} of {total} records");
        }
        if loader.as_ref().is_some_and(|l| l.is_finished()) {
            // A failed load would leave the detector waiting for ever.
            let sent = loader.take().expect("loader").join();
            sent.expect("loader thread")?;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "t={:.0}s enriched={done} resident={} networks ({:.0} MiB) restores={} evictions={} \
                 rss={:.0} MiB (Rust heap {:.0}, C malloc {:.0})",
                started.elapsed().as_secs_f64(),
                progress.devices.load(Ordering::SeqCst),
                progress.resident_bytes.load(Ordering::SeqCst) as f64 / 1048576.0,
                progress.restored.load(Ordering::SeqCst),
                progress.evicted.load(Ordering::SeqCst),
                rss_mb().unwrap_or(f64::NAN),
                live_bytes() as f64 / 1048576.0,
                libc_heap_mb().unwrap_or(f64::NAN),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Throughput counts from the first consumed record (the mock's group join comes before).
    let first = Duration::from_millis(progress.first_record_ms.load(Ordering::SeqCst));
    let seconds = started.elapsed().saturating_sub(first).as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    detector.join().expect("detector thread")?;
    if let Some(l) = loader {
        l.join().expect("loader thread")?;
    }
    let bytes_per_network = max_resident / max_networks.max(1);
    eprintln!(
        "largest resident set sampled: {:.0} MiB ({})",
        largest.0, largest.1
    );
    eprintln!(
        "networks' own estimate at most {:.0} MiB; heap allocated at most {:.0} MiB; \
         longest batch {:.1} s",
        max_resident as f64 / 1048576.0,
        peak_live_bytes() as f64 / 1048576.0,
        progress.max_batch_ms.load(Ordering::SeqCst) as f64 / 1000.0
    );
    println!(
        "scale: devices={devices} records={total} seconds={seconds:.3} records_per_s={:.0} peak_rss_mb={:.0} bytes_per_network={bytes_per_network} restores={}",
        total as f64 / seconds,
        peak_rss_mb().unwrap_or(f64::NAN),
        progress.restored.load(Ordering::SeqCst)
    );
    Ok(())
}
