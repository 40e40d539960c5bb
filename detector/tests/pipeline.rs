//! End-to-end tests on librdkafka's in-process mock cluster: generator → input topic →
//! detector service → enriched and dead-letter topics.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use detector::config::Config;
use detector::demo::{create_topics, demo_config};
use detector::service::{self, Progress};
use generator::records::InputRecord;
use generator::{partition_for_key, LoadOptions};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

const PARTITIONS: i32 = 4;

/// A consumed message: (partition, key, value, headers).
type Consumed = (i32, String, Vec<u8>, BTreeMap<String, String>);

struct Cluster {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    config: Config,
    _dir: tempfile::TempDir,
}

fn cluster() -> Cluster {
    let mock = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = demo_config(&mock.bootstrap_servers(), dir.path(), 2);
    config.htm.probation = 40;
    config.htm.min = 0.0;
    config.htm.max = 100.0;
    config.checkpoint.interval_secs = 0.5;
    create_topics(&mock, &config, PARTITIONS).unwrap();
    Cluster {
        mock,
        config,
        _dir: dir,
    }
}

/// `n` hourly records for each of `devices` devices, with a daily pattern.
fn records(devices: usize, n: usize) -> Vec<InputRecord> {
    let mut out = Vec::new();
    for i in 0..n {
        for d in 0..devices {
            let phase = (i % 24) as f64 / 24.0 * std::f64::consts::TAU;
            out.push(InputRecord {
                device_id: format!("pump-{d}"),
                timestamp: 1_388_534_400 + 3600 * i as i64,
                value: 50.0 + 20.0 * phase.sin() + (d * (i % 5)) as f64,
                fields: None,
            });
        }
    }
    out
}

fn load(c: &Cluster, recs: &[InputRecord]) {
    let mut opts = LoadOptions::new(c.mock.bootstrap_servers(), c.config.topics.input.clone());
    opts.create_topic = false;
    opts.progress = false;
    let summary = generator::load(&opts, recs.iter().cloned().map(Ok), None).unwrap();
    assert_eq!(summary.sent as usize, recs.len());
}

struct Running {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    handle: JoinHandle<anyhow::Result<()>>,
}

fn start(config: &Config) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let handle = {
        let (config, stop, progress) = (Arc::new(config.clone()), stop.clone(), progress.clone());
        std::thread::spawn(move || service::run(config, stop, progress))
    };
    Running {
        stop,
        progress,
        handle,
    }
}

impl Running {
    /// Waits until `n` records were enriched or dead-lettered, then stops gracefully.
    fn finish_after(self, n: u64) -> Arc<Progress> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.progress.enriched.load(Ordering::SeqCst)
            + self.progress.dead_letters.load(Ordering::SeqCst)
            < n
        {
            assert!(
                !self.handle.is_finished(),
                "service stopped early: {:?}",
                self.handle.join().unwrap()
            );
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} records"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap().unwrap();
        self.progress
    }
}

/// Everything on a topic: (partition, key, value, headers).
fn read_all(c: &Cluster, topic: &str) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", c.mock.bootstrap_servers())
        .set("group.id", "test-reader")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut eof = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while eof < PARTITIONS && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    m.partition(),
                    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    m.payload().unwrap_or_default().to_vec(),
                    headers,
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => eof += 1,
            Some(Err(e)) => panic!("{e}"),
            None => {}
        }
    }
    assert_eq!(eof, PARTITIONS, "did not reach the end of {topic}");
    out
}

/// device → [(offset, timestamp, anomaly, likelihood, prediction_next)] in output order.
fn scores(out: &[Consumed]) -> HashMap<String, Vec<(i64, String, String)>> {
    let mut by_device: HashMap<String, Vec<(i64, String, String)>> = HashMap::new();
    for (_, key, payload, _) in out {
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(
            v["deviceId"].as_str().unwrap(),
            key,
            "output key is the device id"
        );
        let fingerprint = format!(
            "{} {} {} {}",
            v["anomaly"], v["anomalyLikelihood"], v["predictionNext"], v["error"]
        );
        by_device.entry(key.clone()).or_default().push((
            v["offset"].as_i64().unwrap(),
            v["timestamp"].as_str().unwrap().to_string(),
            fingerprint,
        ));
    }
    by_device
}

#[test]
fn every_record_enriched_once_in_device_order_on_the_device_partition() {
    let c = cluster();
    let recs = records(6, 120);
    load(&c, &recs);
    let progress = start(&c.config).finish_after(recs.len() as u64);
    assert_eq!(
        progress.devices.load(Ordering::SeqCst),
        6,
        "one network per device"
    );

    let out = read_all(&c, &c.config.topics.output);
    assert_eq!(
        out.len(),
        recs.len(),
        "each input record enriched exactly once"
    );
    let by_device = scores(&out);
    assert_eq!(by_device.len(), 6);
    for (device, rows) in &by_device {
        assert_eq!(rows.len(), 120);
        assert!(
            rows.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
            "{device}: order kept"
        );
    }
    for (_, key, payload, _) in &out {
        let v: Value = serde_json::from_slice(payload).unwrap();
        let expected = partition_for_key(
            key.as_bytes(),
            std::num::NonZeroU32::new(PARTITIONS as u32).unwrap(),
        );
        assert_eq!(
            v["partition"].as_i64().unwrap(),
            expected as i64,
            "{key} read from its murmur2 partition"
        );
    }
}

#[test]
fn restart_mid_stream_restores_checkpoints_and_scores_match_an_uninterrupted_run() {
    let recs = records(4, 150);
    let (first, second) = recs.split_at(recs.len() / 2);

    let reference = {
        let c = cluster();
        load(&c, &recs);
        start(&c.config).finish_after(recs.len() as u64);
        scores(&read_all(&c, &c.config.topics.output))
    };

    let c = cluster();
    load(&c, first);
    start(&c.config).finish_after(first.len() as u64);
    load(&c, second);
    let progress = start(&c.config).finish_after(second.len() as u64);
    assert_eq!(
        progress.restored.load(Ordering::SeqCst),
        4,
        "every network came back from its checkpoint"
    );
    let out = read_all(&c, &c.config.topics.output);
    assert_eq!(
        out.len(),
        recs.len(),
        "nothing lost or repeated across the restart"
    );
    assert_eq!(
        scores(&out),
        reference,
        "bit-identical scores after the restart"
    );
}

#[test]
fn bad_records_go_to_the_dead_letter_topic_with_a_reason() {
    let c = cluster();
    let recs = records(2, 30);
    load(&c, &recs);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", c.mock.bootstrap_servers())
        .create()
        .unwrap();
    let bad: [(&str, &str); 3] = [
        (
            "pump-0",
            "{\"deviceId\": \"pump-0\", \"timestamp\": \"2014-01-03T00:00:00Z\"}",
        ),
        ("pump-1", "this is not json"),
        (
            "pump-0",
            "{\"deviceId\": \"pump-9\", \"timestamp\": \"2014-01-03T00:00:00Z\", \"value\": 1.0}",
        ),
    ];
    for (key, payload) in bad {
        producer
            .send(
                BaseRecord::to(&c.config.topics.input)
                    .key(key)
                    .payload(payload)
                    .partition(0),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let progress = start(&c.config).finish_after((recs.len() + 3) as u64);
    assert_eq!(progress.dead_letters.load(Ordering::SeqCst), 3);

    let dead = read_all(&c, &c.config.topics.dead_letter);
    assert_eq!(dead.len(), 3);
    let mut reasons: Vec<&str> = dead.iter().map(|d| d.3["reason"].as_str()).collect();
    reasons.sort();
    assert!(
        reasons.iter().any(|r| r.contains("missing field `value`")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("malformed JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("differs from the record's device id")),
        "{reasons:?}"
    );
    for d in &dead {
        assert_eq!(d.3["source.topic"], c.config.topics.input);
        assert!(d.3.contains_key("source.offset"));
    }
    assert_eq!(
        read_all(&c, &c.config.topics.output).len(),
        recs.len(),
        "good records unaffected"
    );
}
