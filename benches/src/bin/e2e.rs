//! End-to-end benchmark on librdkafka's in-process mock cluster: a keyed producer, the detector
//! service, and a consumer of the enriched topic measuring produce → enriched latency.
//!
//! Without `--rate`, a throughput phase (everything sent at once; `records_per_s`) is followed
//! by a latency phase on the same devices offered at half that throughput (`p50_ms`,
//! `p99_ms`): the latency of a run with a backlog would only measure the backlog.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::synthetic::mock_setup;
use clap::Parser;
use detector::config::Config;
use detector::service::{self, Progress};
use generator::partition_for_key;
use generator::records::InputRecord;
use htm::network::Network;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

// The detector's allocator (see detector/src/main.rs).
#[global_allocator]
static ALLOCATOR: detector::allocator::Allocator = detector::allocator::Allocator;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// Produce → detect → enriched, on an embedded broker.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Devices (each gets its own network).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Records in all.
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Records per second offered by the producer. 0: a throughput run (as fast as it can),
    /// then `--latency-records` more at half the throughput reached, for the latency figures.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Records of the latency phase after a throughput run (default: 30 % of `--records`,
    /// which at half the throughput lasts several checkpoint intervals: their cost must show).
    #[arg(long)]
    latency_records: Option<usize>,
    /// Input topic partitions.
    #[arg(long, default_value_t = 10)]
    partitions: i32,
    /// Detector compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Seconds between the detector's checkpoints.
    #[arg(long, default_value_t = 5.0)]
    checkpoint_interval: f64,
    /// Also write every record's latency (ms), in arrival order, to this file.
    #[arg(long)]
    latencies: Option<std::path::PathBuf>,
}

const WARM_UP: &str = "warm-up";

type SendTimes = Arc<Mutex<HashMap<(i32, i64), Instant>>>;

struct Timing {
    sent: SendTimes,
}

impl ClientContext for Timing {}

impl ProducerContext for Timing {
    type DeliveryOpaque = Box<Instant>;
    fn delivery(&self, result: &DeliveryResult<'_>, sent_at: Box<Instant>) {
        if let Ok(m) = result {
            self.sent
                .lock()
                .unwrap()
                .insert((m.partition(), m.offset()), *sent_at);
        }
    }
}

/// See where it is set.
const MOCK_FETCH_WAIT_MS: &str = "10";

fn main() -> Result<()> {
    detector::allocator::return_freed_memory_soon();
    let args = Args::parse();
    let mut rng = htm::random::Random::new(11);
    // A throughput run is followed by a paced latency phase on the same devices.
    let latency_records = if args.rate > 0.0 {
        0
    } else {
        args.latency_records.unwrap_or(args.records * 3 / 10).max(1)
    };
    let records: Vec<InputRecord> = (0..args.records + latency_records)
        .map(|i| benches::synthetic::record(i, args.devices, &mut rng))
        .collect();
    let setup = mock_setup(args.partitions, args.workers)?;
    let (bootstrap, mut config) = (setup.bootstrap.clone(), setup.config.clone());
    config.htm.probation = 200;
    config.batch.max_wait_ms = 50;
    config.checkpoint.interval_secs = args.checkpoint_interval;
    // The mock broker holds a fetch for its whole max wait even when data arrives (a real
    // broker answers at fetch.min.bytes = 1): without this, latency measures the mock.
    config
        .kafka_consumer
        .insert("fetch.wait.max.ms".into(), MOCK_FETCH_WAIT_MS.into());
    let config = Arc::new(config);

    // Start the detector first so latency is not dominated by the group join.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let detector = {
        let (c, s, p) = (config.clone(), stop.clone(), progress.clone());
        std::thread::spawn(move || service::run(c, s, p))
    };
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "e2e-reader")
        .set("fetch.wait.max.ms", MOCK_FETCH_WAIT_MS)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..args.partitions {
        tpl.add_partition_offset(&config.topics.output, p, Offset::Beginning)?;
    }
    reader.assign(&tpl)?;
    warm_up(&bootstrap, &config.topics.input, args.partitions, &reader)?;

    let sent: SendTimes = Arc::new(Mutex::new(HashMap::with_capacity(args.records)));
    let producer: ThreadedProducer<Timing> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(Timing { sent: sent.clone() })?;
    let partitions =
        NonZeroU32::new(args.partitions as u32).context("partitions must be positive")?;
    let topic = config.topics.input.clone();
    let (total, rate) = (args.records, args.rate);
    let records = Arc::new(records);
    let to_send = records.clone();
    let (phase2_tx, phase2_rx) = std::sync::mpsc::channel::<f64>();
    let started = Instant::now();
    let feeder = std::thread::spawn(move || -> Result<()> {
        let mut buf = Vec::new();
        let (mut rate, mut phase_start, mut phase_first) = (rate, started, 0);
        for (i, rec) in to_send.iter().enumerate() {
            if i == total {
                // The latency phase starts once the throughput phase is read back.
                rate = phase2_rx.recv()?;
                (phase_start, phase_first) = (Instant::now(), i);
            }
            if rate > 0.0 {
                let due = phase_start + Duration::from_secs_f64((i - phase_first) as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            buf.clear();
            rec.write_json(&mut buf);
            let partition = partition_for_key(rec.device_id.as_bytes(), partitions) as i32;
            let mut record = BaseRecord::with_opaque_to(&topic, Box::new(Instant::now()))
                .key(rec.device_id.as_bytes())
                .payload(&buf[..])
                .partition(partition);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(60))?;
        Ok(())
    });

    let all = total + latency_records;
    let mut latencies_ms = Vec::with_capacity(all);
    let mut seconds = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut pending: Vec<((i32, i64), Instant)> = Vec::new();
    let mut last_report = Instant::now();
    while latencies_ms.len() < all {
        if seconds.is_nan() && latencies_ms.len() >= total {
            seconds = started.elapsed().as_secs_f64();
            if latency_records > 0 {
                let rate = total as f64 / seconds / 2.0;
                eprintln!("throughput phase done; latency phase: {latency_records} records at {rate:.0}/s");
                phase2_tx.send(rate)?;
            }
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "t={:.1}s sent={} consumed={} enriched={} read={} pending={}",
                started.elapsed().as_secs_f64(),
                sent.lock().unwrap().len(),
                progress.consumed.load(Ordering::SeqCst),
                progress.enriched.load(Ordering::SeqCst),
                latencies_ms.len(),
                pending.len()
            );
        }
        if Instant::now() > deadline || detector.is_finished() {
            bail!("only {} of {all} records enriched", latencies_ms.len());
        }
        if let Some(m) = reader.poll(Duration::from_millis(100)) {
            let m = m?;
            let now = Instant::now();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if v["deviceId"] == WARM_UP {
                continue;
            }
            let key = (
                v["partition"].as_i64().unwrap_or(-1) as i32,
                v["offset"].as_i64().unwrap_or(-1),
            );
            pending.push((key, now));
        }
        // Delivery reports can arrive after the enriched record: match what is known.
        if !pending.is_empty() {
            let sent = sent.lock().unwrap();
            pending.retain(|(key, at)| match sent.get(key) {
                Some(t0) => {
                    latencies_ms.push(at.duration_since(*t0).as_secs_f64() * 1e3);
                    false
                }
                None => true,
            });
        }
    }
    if seconds.is_nan() {
        seconds = started.elapsed().as_secs_f64();
    }
    feeder.join().expect("producer thread")?;
    stop.store(true, Ordering::SeqCst);
    detector.join().expect("detector thread")?;
    if let Some(path) = &args.latencies {
        let text: String = latencies_ms.iter().map(|l| format!("{l:.1}\n")).collect();
        std::fs::write(path, text)?;
    }
    // Latency of the paced records: the latency phase, or the whole paced run.
    let mut latencies_ms = latencies_ms.split_off(if latency_records > 0 { total } else { 0 });
    latencies_ms.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies_ms[((latencies_ms.len() - 1) as f64 * q).round() as usize];
    let workers = if args.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.workers
    };
    let single = htm_single_thread(&config, &records[..total])?;
    let throughput = total as f64 / seconds;
    println!(
        "single-thread HTM on the same records: {single:.0} records/s; the pipeline reached \
         {:.0} % of that × {workers} workers",
        100.0 * throughput / (single * workers as f64)
    );
    println!(
        "e2e: records={total} seconds={seconds:.3} records_per_s={:.0} p50_ms={:.1} p99_ms={:.1}",
        total as f64 / seconds,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}

/// The group join on the mock takes a few seconds: one warm-up record, enriched before the
/// clock starts, makes latency measure the pipeline rather than the join.
fn warm_up(bootstrap: &str, topic: &str, partitions: i32, reader: &BaseConsumer) -> Result<()> {
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let rec = InputRecord {
        device_id: WARM_UP.into(),
        timestamp: 1_388_534_400,
        value: 1.0,
        fields: None,
    };
    let payload = rec.to_json();
    for p in 0..partitions {
        producer
            .send(
                BaseRecord::to(topic)
                    .key(WARM_UP)
                    .payload(&payload)
                    .partition(p),
            )
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(10))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < partitions {
        if Instant::now() > deadline {
            bail!("only {seen} of {partitions} warm-up records came back within 60 s");
        }
        if let Some(m) = reader.poll(Duration::from_millis(100)) {
            let v: serde_json::Value = serde_json::from_slice(m?.payload().unwrap_or_default())?;
            if v["deviceId"] == WARM_UP {
                seen += 1;
            }
        }
    }
    Ok(())
}

/// Single-thread HTM over the same records, one network per device built as the detector
/// builds them (creation included): the yardstick for the pipeline's throughput.
fn htm_single_thread(config: &Config, records: &[InputRecord]) -> Result<f64> {
    let mut networks: HashMap<&str, Network> = HashMap::new();
    let start = Instant::now();
    for r in records {
        let network = match networks.entry(&r.device_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Network::new(
                config.network_params(Some(&r.device_id), None)?,
            )?),
        };
        std::hint::black_box(network.compute(r.timestamp, r.value)?);
    }
    Ok(records.len() as f64 / start.elapsed().as_secs_f64())
}
