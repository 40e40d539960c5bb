//! `detector demo`: the whole pipeline on librdkafka's in-process mock cluster — load the
//! sample data with the generator, run the detector until every record is enriched, write the
//! enriched records to a JSON-lines file and compare flagged anomalies with the labels.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use generator::records::RecordReader;
use generator::{Labels, LoadOptions};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::config::{Config, Range};
use crate::service::{self, Progress};

/// What the demo runs on.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub data: PathBuf,
    pub labels: Option<PathBuf>,
    pub out: PathBuf,
    pub partitions: i32,
    pub workers: usize,
    /// Keep the broker up afterwards for other clients (the notebook).
    pub serve: bool,
}

/// Figures of a finished demo run.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoSummary {
    pub devices: usize,
    pub records: u64,
    pub enriched: u64,
    pub anomalies: u64,
    pub dead_letters: u64,
    pub seconds: f64,
}

/// A config for the mock cluster: short session timeout (the mock otherwise delays joins),
/// per-parameter value ranges for the EPA parameters the sample holds, one week of probation.
pub fn demo_config(bootstrap: &str, checkpoints: &Path, workers: usize) -> Config {
    let mut c = Config::default();
    c.kafka.insert("bootstrap.servers".into(), bootstrap.into());
    c.kafka_consumer
        .insert("session.timeout.ms".into(), "6000".into());
    c.checkpoint.dir = checkpoints.to_path_buf();
    c.checkpoint.interval_secs = 2.0;
    c.metrics.addr = String::new();
    c.workers = workers;
    c.htm.probation = 168;
    for (code, min, max) in [
        ("44201", 0.0, 0.1),
        ("42101", 0.0, 2.0),
        ("88101", 0.0, 40.0),
    ] {
        c.htm.ranges.insert(code.into(), Range { min, max });
    }
    c
}

/// Creates the input, output and dead-letter topics of `config` on the mock cluster (it has
/// no admin API).
pub fn create_topics(
    mock: &MockCluster<'static, DefaultProducerContext>,
    config: &Config,
    partitions: i32,
) -> Result<()> {
    for topic in [
        &config.topics.input,
        &config.topics.output,
        &config.topics.dead_letter,
    ] {
        mock.create_topic(topic, partitions, 1)
            .with_context(|| format!("creating topic {topic}"))?;
    }
    Ok(())
}

/// Runs the demo and prints its report; the last line is the summary line.
pub fn run(opts: &DemoOptions) -> Result<DemoSummary> {
    let mock =
        MockCluster::new(1).context("starting the embedded Kafka (librdkafka mock cluster)")?;
    let bootstrap = mock.bootstrap_servers();
    let out_dir = opts.out.parent().unwrap_or(Path::new(".")).to_path_buf();
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let checkpoints = out_dir.join("demo-checkpoints");
    let _ = fs::remove_dir_all(&checkpoints); // a demo starts from scratch
    let config = Arc::new(demo_config(&bootstrap, &checkpoints, opts.workers));
    create_topics(&mock, &config, opts.partitions)?;
    eprintln!("embedded Kafka at {bootstrap}");

    // Load the data with the generator.
    let reader = RecordReader::from_path(&opts.data, None)
        .with_context(|| format!("opening {}", opts.data.display()))?;
    let mut load = LoadOptions::new(bootstrap.clone(), config.topics.input.clone());
    load.create_topic = false;
    load.progress = false;
    let loaded = generator::load(&load, reader, None).context("loading the data")?;
    eprintln!("{loaded}");

    // Run the detector until every loaded record has an outcome.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let service = {
        let (config, stop, progress) = (config.clone(), stop.clone(), progress.clone());
        std::thread::spawn(move || service::run(config, stop, progress))
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done =
            progress.enriched.load(Ordering::SeqCst) + progress.dead_letters.load(Ordering::SeqCst);
        if done >= loaded.sent {
            break;
        }
        if service.is_finished() || Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            let result = service.join().expect("detector thread");
            result?;
            bail!("detector stopped after {done} of {} records", loaded.sent);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Throughput counts from the first consumed record: the group join before it is the mock
    // broker's fixed delay, not detector work.
    let first = Duration::from_millis(progress.first_record_ms.load(Ordering::SeqCst));
    let seconds = started
        .elapsed()
        .saturating_sub(first)
        .as_secs_f64()
        .max(1e-3);
    stop.store(true, Ordering::SeqCst);
    service.join().expect("detector thread")?;

    // Read the enriched topic back into a JSON-lines file.
    let enriched = progress.enriched.load(Ordering::SeqCst);
    let records = read_topic(&bootstrap, &config.topics.output, opts.partitions, enriched)?;
    let mut w = BufWriter::new(
        File::create(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?,
    );
    for r in &records {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    let devices = records
        .iter()
        .filter_map(|r| r["deviceId"].as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let summary = DemoSummary {
        devices,
        records: loaded.sent,
        enriched,
        anomalies: progress.anomalies.load(Ordering::SeqCst),
        dead_letters: progress.dead_letters.load(Ordering::SeqCst),
        seconds,
    };
    println!("enriched records written to {}", opts.out.display());
    if let Some(labels) = &opts.labels {
        print!("{}", label_report(&records, &read_labels(labels)?));
    }
    if opts.serve {
        println!(
            "broker kept up for other clients: bootstrap.servers={bootstrap} (Ctrl-C to stop)"
        );
        println!(
            "topics: {} (input), {} (enriched), {} (dead letters)",
            config.topics.input, config.topics.output, config.topics.dead_letter
        );
    }
    println!(
        "demo: devices={} records={} enriched={} anomalies={} records_per_s={:.0}",
        summary.devices,
        summary.records,
        summary.enriched,
        summary.anomalies,
        summary.enriched as f64 / seconds
    );
    if opts.serve {
        std::io::stdout().flush()?;
        wait_for_ctrl_c();
    }
    drop(mock);
    Ok(summary)
}

fn read_labels(path: &Path) -> Result<Labels> {
    let text =
        fs::read_to_string(path).with_context(|| format!("reading labels {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing labels {}", path.display()))
}

/// Reads `expected` records from all partitions of `topic`, from the beginning.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: u64,
) -> Result<Vec<Value>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "demo-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::with_capacity(expected as usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (out.len() as u64) < expected {
        if Instant::now() > deadline {
            bail!("read {} of {expected} records from {topic}", out.len());
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            let payload = m.payload().unwrap_or_default();
            out.push(serde_json::from_slice(payload).context("enriched record is not JSON")?);
        }
    }
    // Device then time order reads best in a file a person opens.
    out.sort_by(|a: &Value, b: &Value| {
        (a["deviceId"].as_str(), a["timestamp"].as_str())
            .cmp(&(b["deviceId"].as_str(), b["timestamp"].as_str()))
    });
    Ok(out)
}

/// A table of labelled windows with the first flag inside each, plus flags outside windows.
pub fn label_report(records: &[Value], labels: &Labels) -> String {
    let mut flags: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in records {
        if r["isAnomaly"].as_bool() == Some(true) {
            if let (Some(d), Some(t)) = (r["deviceId"].as_str(), r["timestamp"].as_str()) {
                flags.entry(d).or_default().push(t);
            }
        }
    }
    let mut s = String::new();
    s.push_str(&format!(
        "{:<22} {:<15} {:<21} {:<21} {}\n",
        "device", "anomaly", "window start", "window end", "first flag"
    ));
    let (mut windows, mut detected, mut inside) = (0, 0, 0usize);
    for (device, ls) in labels {
        let f = flags.get(device.as_str()).cloned().unwrap_or_default();
        for l in ls {
            windows += 1;
            // RFC 3339 UTC strings of one format compare in time order.
            let hits: Vec<&&str> = f
                .iter()
                .filter(|t| **t >= l.start.as_str() && **t <= l.end.as_str())
                .collect();
            inside += hits.len();
            let first = hits.first().map_or("—".to_string(), |t| t.to_string());
            if !hits.is_empty() {
                detected += 1;
            }
            let kind = serde_json::to_value(l.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            s.push_str(&format!(
                "{device:<22} {kind:<15} {:<21} {:<21} {first}\n",
                l.start, l.end
            ));
        }
    }
    let total: usize = flags.values().map(Vec::len).sum();
    s.push_str(&format!(
        "windows detected: {detected}/{windows}; flagged records: {total} ({inside} inside windows, {} outside)\n",
        total - inside
    ));
    s
}

fn wait_for_ctrl_c() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
}
