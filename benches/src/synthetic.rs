//! Synthetic device streams and the embedded broker for the Kafka benches.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use detector::config::Config;
use detector::demo::{create_topics, demo_config};
use generator::records::InputRecord;
use htm::random::Random;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// An embedded broker with the detector's topics, and a detector config for it whose
/// checkpoints live in a temporary directory and whose value range fits [`record`].
pub struct MockSetup {
    pub mock: MockCluster<'static, DefaultProducerContext>,
    pub bootstrap: String,
    pub config: Config,
    /// Holds the checkpoint directory for as long as the bench runs.
    pub checkpoints: tempfile::TempDir,
}

/// Starts the broker and creates the input, output and dead-letter topics. The mock keeps only
/// the newest ~5 MiB (or 100,000 message sets) of each partition and drops older ones
/// (librdkafka's `rdkafka_mock.c`): a bench must not send more than that ahead of the detector.
pub fn mock_setup(partitions: i32, workers: usize) -> Result<MockSetup> {
    let mock = MockCluster::new(1)?;
    let bootstrap = mock.bootstrap_servers();
    let checkpoints = tempfile::tempdir()?;
    let config = bench_config(&bootstrap, checkpoints.path(), workers);
    create_topics(&mock, &config, partitions)?;
    Ok(MockSetup {
        mock,
        bootstrap,
        config,
        checkpoints,
    })
}

/// The detector config of the benches for a broker at `bootstrap`.
pub fn bench_config(bootstrap: &str, checkpoints: &Path, workers: usize) -> Config {
    let mut config = demo_config(bootstrap, checkpoints, workers);
    config.htm.min = 0.0;
    config.htm.max = 100.0;
    config
}

/// The embedded broker in a child process: this executable run with [`SERVE_BROKER`]. The
/// broker keeps every record it is sent in memory; apart, it leaves the bench process's
/// resident set to the detector alone.
pub struct BrokerProcess {
    child: Child,
    pub bootstrap: String,
}

/// The argument that makes a bench binary serve a broker ([`serve_broker`]).
pub const SERVE_BROKER: &str = "--serve-broker";

impl BrokerProcess {
    /// Starts the child and waits for its bootstrap address.
    pub fn spawn(partitions: i32) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut child = Command::new(exe)
            .args([SERVE_BROKER, "--partitions", &partitions.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the broker process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("broker stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let bootstrap = line.trim().to_string();
        if bootstrap.is_empty() {
            let status = child.wait()?;
            bail!("the broker process ended ({status}) without an address");
        }
        Ok(BrokerProcess { child, bootstrap })
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        // Closing its stdin ends the child.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The child's side of [`BrokerProcess`]: creates the topics, prints the bootstrap address,
/// serves until stdin closes (the parent ended, however it ended).
pub fn serve_broker(partitions: i32) -> Result<()> {
    let setup = mock_setup(partitions, 1)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", setup.bootstrap)?;
    out.flush()?;
    std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())?;
    Ok(())
}

/// Record `i` of an interleaved stream over `devices` devices (device `i % devices`, hourly
/// steps): a daily cycle, a per-device offset and noise, like device telemetry.
pub fn record(i: usize, devices: usize, rng: &mut Random) -> InputRecord {
    let (d, step) = (i % devices, i / devices);
    let phase = (step % 24) as f64 / 24.0 * std::f64::consts::TAU;
    InputRecord {
        device_id: format!("device-{d:05}"),
        timestamp: 1_388_534_400 + 3600 * step as i64,
        value: 50.0 + 25.0 * phase.sin() + 5.0 * rng.real() + (d % 10) as f64,
        fields: None,
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    detector::allocator::peak_resident_bytes().map(|b| b as f64 / 1048576.0)
}

/// Resident set size of this process now, MiB (Linux `VmRSS`), if known.
pub fn rss_mb() -> Option<f64> {
    detector::allocator::resident_bytes().map(|b| b as f64 / 1048576.0)
}

/// MiB held by C `malloc` (librdkafka and its mock broker: the Rust heap is mimalloc's), if
/// known: in-use plus free-but-kept arena bytes and mapped blocks.
pub fn libc_heap_mb() -> Option<f64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: glibc ≥ 2.33 provides `mallinfo2`; it only reads allocator statistics.
        let m = unsafe { libc::mallinfo2() };
        Some((m.arena + m.hblkhd) as f64 / 1048576.0)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}
