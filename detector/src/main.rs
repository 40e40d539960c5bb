//! `detector` command line: `run` the service, or `demo` the whole pipeline on an embedded broker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use detector::config::{Config, Processing};
use detector::service::{self, Progress};
use tracing::{error, info, warn};

// Networks are large and short-lived under memory bounds (evicted, restored): see
// `detector::allocator`.
#[global_allocator]
static ALLOCATOR: detector::allocator::Allocator = detector::allocator::Allocator;

/// Online HTM anomaly detector for device telemetry on Kafka.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the detector service as a member of its consumer group.
    Run(Box<RunArgs>),
    /// Runs the whole pipeline on an embedded broker: loads the sample data with the generator,
    /// detects, writes the enriched records to a JSON-lines file and reports against the labels.
    Demo(DemoArgs),
    /// Prints the default configuration file, documented.
    DefaultConfig,
}

#[derive(Args)]
struct DemoArgs {
    /// Telemetry file (EPA, generic or NAB CSV).
    #[arg(long, default_value = "data/sample-epa.csv")]
    data: PathBuf,
    /// Labelled anomaly windows of the data (JSON); `none` to skip the report.
    #[arg(long, default_value = "data/sample-labels.json")]
    labels: String,
    /// Where the enriched records are written (JSON lines).
    #[arg(long, default_value = "out/enriched.jsonl")]
    out: PathBuf,
    /// Partitions of the demo topics.
    #[arg(long, default_value_t = 10)]
    partitions: i32,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Keep the embedded broker running afterwards and print its address (for the notebook).
    #[arg(long)]
    serve: bool,
}

/// Each flag overrides the config file; each also reads an environment variable.
#[derive(Args)]
struct RunArgs {
    /// TOML configuration file (all settings have defaults).
    #[arg(long, env = "DETECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (`kafka."bootstrap.servers"`).
    #[arg(long, env = "DETECTOR_BOOTSTRAP_SERVERS")]
    bootstrap_servers: Option<String>,
    /// Consumer group id.
    #[arg(long, env = "DETECTOR_GROUP_ID")]
    group_id: Option<String>,
    #[arg(long, env = "DETECTOR_INPUT_TOPIC")]
    input_topic: Option<String>,
    #[arg(long, env = "DETECTOR_OUTPUT_TOPIC")]
    output_topic: Option<String>,
    #[arg(long, env = "DETECTOR_DEAD_LETTER_TOPIC")]
    dead_letter_topic: Option<String>,
    #[arg(long, env = "DETECTOR_CHECKPOINT_DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Prometheus listen address (empty disables).
    #[arg(long, env = "DETECTOR_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Compute threads (0 = one per core).
    #[arg(long, env = "DETECTOR_WORKERS")]
    workers: Option<usize>,
    /// This instance's stable id (`instance_id`; required for exactly-once processing).
    #[arg(long, env = "DETECTOR_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Delivery guarantee (`processing`): exactly_once or at_least_once.
    #[arg(long, env = "DETECTOR_PROCESSING", value_parser = parse_processing)]
    processing: Option<Processing>,
    /// Join as a static group member (`static_membership`, default true).
    #[arg(long, env = "DETECTOR_STATIC_MEMBERSHIP")]
    static_membership: Option<bool>,
    /// Extra librdkafka property, `-X key=value` (repeatable), e.g. `-X security.protocol=SASL_SSL`.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    kafka: Vec<String>,
}

impl RunArgs {
    fn config(&self) -> Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.bootstrap_servers {
            c.kafka.insert("bootstrap.servers".into(), v.clone());
        }
        for kv in &self.kafka {
            let (k, v) = kv
                .split_once('=')
                // Not quoted back: a malformed argument may hold a secret.
                .context("-X: expected key=value")?;
            c.kafka.insert(k.trim().into(), v.trim().into());
        }
        macro_rules! set {
            ($field:expr, $v:expr) => {
                if let Some(v) = $v {
                    $field = v.clone();
                }
            };
        }
        set!(c.group_id, &self.group_id);
        set!(c.topics.input, &self.input_topic);
        set!(c.topics.output, &self.output_topic);
        set!(c.topics.dead_letter, &self.dead_letter_topic);
        set!(c.checkpoint.dir, &self.checkpoint_dir);
        set!(c.metrics.addr, &self.metrics_addr);
        set!(c.workers, &self.workers);
        set!(c.instance_id, &self.instance_id);
        set!(c.processing, &self.processing);
        set!(c.static_membership, &self.static_membership);
        c.validate()
            .context("configuration after command-line overrides")?;
        Ok(c)
    }
}

fn parse_processing(s: &str) -> std::result::Result<Processing, String> {
    match s {
        "exactly_once" => Ok(Processing::ExactlyOnce),
        "at_least_once" => Ok(Processing::AtLeastOnce),
        _ => Err(format!("expected exactly_once or at_least_once, got {s:?}")),
    }
}

fn main() -> Result<()> {
    detector::allocator::return_freed_memory_soon();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args.config()?),
        Command::Demo(a) => {
            detector::demo::run(&detector::demo::DemoOptions {
                data: a.data,
                labels: (a.labels != "none").then(|| PathBuf::from(a.labels)),
                out: a.out,
                partitions: a.partitions,
                workers: a.workers,
                serve: a.serve,
            })?;
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{}", toml::to_string_pretty(&Config::default())?);
            Ok(())
        }
    }
}

fn run(config: Config) -> Result<()> {
    tracing::debug!("configuration:\n{}", config.redacted_toml());
    let config = Arc::new(config);
    if !config.metrics.addr.is_empty() {
        let addr: std::net::SocketAddr = config
            .metrics
            .addr
            .parse()
            .with_context(|| format!("metrics.addr {:?}", config.metrics.addr))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
        info!(%addr, "metrics on http://{addr}/metrics");
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || wait_for_signal(stop));
    }
    let progress = Arc::new(Progress::default());
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::SeqCst) {
        match service::check_broker(&config, Duration::from_secs(10)) {
            Ok(()) => break,
            Err(e) => {
                warn!("{e:#}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    service::run(config, stop, progress).inspect_err(|e| error!("detector stopped: {e:#}"))
}

/// Sets `stop` on SIGINT or SIGTERM; the service then checkpoints, commits and exits.
fn wait_for_signal(stop: Arc<AtomicBool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    });
    info!("signal received: finishing the batch, checkpointing and committing");
    stop.store(true, Ordering::SeqCst);
}
