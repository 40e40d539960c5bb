//! The Kafka loader against librdkafka's in-process mock cluster (no external broker), through the
//! library API and through the `generator load` binary.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use generator::load::count_data_lines;
use generator::{
    load, partition_for_key, InputRecord, LoadError, LoadOptions, Rate, RecordReader, RowError,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TOPIC: &str = "telemetry";

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/sample-epa.csv")
}

fn mock(partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(TOPIC, partitions, 1)
        .expect("create topic on the mock");
    cluster
}

fn options(cluster: &MockCluster<'static, DefaultProducerContext>) -> LoadOptions {
    LoadOptions {
        progress: false,
        ..LoadOptions::new(cluster.bootstrap_servers(), TOPIC)
    }
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("generator-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A consumed message.
struct Got {
    key: String,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
}

/// Reads `expected` messages from every partition of the topic, from the beginning, with a plain
/// assigned consumer (no group protocol needed).
fn consume(servers: &str, partitions: i32, expected: usize) -> Vec<Got> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", "load-test")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)
            .expect("assign");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::with_capacity(expected);
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.expect("consume");
            out.push(Got {
                key: String::from_utf8(msg.key().expect("key").to_vec()).expect("utf8 key"),
                partition: msg.partition(),
                offset: msg.offset(),
                payload: msg.payload().expect("payload").to_vec(),
            });
        }
    }
    // Anything beyond the expected count would be a duplicate: give it a moment to show up.
    let extra_deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < extra_deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
            let msg = msg.expect("consume");
            panic!(
                "unexpected extra message at partition {} offset {}",
                msg.partition(),
                msg.offset()
            );
        }
    }
    out
}

fn ten() -> NonZeroU32 {
    NonZeroU32::new(10).expect("non-zero")
}

#[test]
fn sample_epa_round_trips_keyed_partitioned_and_in_device_order() {
    let cluster = mock(10);
    let opts = options(&cluster);
    let originals: Vec<InputRecord> = RecordReader::from_path(sample(), None)
        .expect("open sample")
        .map(|r| r.expect("sample rows are all good"))
        .collect();
    assert_eq!(originals.len(), 4002);

    let reader = RecordReader::from_path(sample(), None).expect("open sample");
    let total = count_data_lines(sample()).expect("count");
    assert_eq!(total, 4002);
    let summary = load(&opts, reader, Some(total)).expect("load");
    assert_eq!(summary.sent, 4002);
    assert_eq!(summary.bad_rows, 0);
    assert!(summary.bad_row_samples.is_empty());
    assert_eq!(summary.devices, 6);
    assert_eq!(summary.partitions, 10);
    assert!(!summary.created_topic);
    assert!(summary.records_per_sec > 0.0);
    let mut want_parts: BTreeMap<i32, u64> = BTreeMap::new();
    for r in &originals {
        *want_parts
            .entry(partition_for_key(r.key().as_bytes(), ten()) as i32)
            .or_default() += 1;
    }
    assert_eq!(summary.per_partition, want_parts);
    let text = summary.to_string();
    assert!(
        text.contains("4002 records from 6 devices to topic telemetry (10 partitions)"),
        "{text}"
    );

    let got = consume(&cluster.bootstrap_servers(), 10, originals.len());
    assert_eq!(got.len(), originals.len());
    // Per device: consumed in offset order, the records are exactly the file's rows, in file order.
    let mut want_by_device: BTreeMap<&str, Vec<&InputRecord>> = BTreeMap::new();
    for r in &originals {
        want_by_device.entry(r.key()).or_default().push(r);
    }
    let mut got_by_device: BTreeMap<String, Vec<&Got>> = BTreeMap::new();
    for g in &got {
        assert_eq!(
            g.partition,
            partition_for_key(g.key.as_bytes(), ten()) as i32,
            "key {} on the Java partitioner's partition",
            g.key
        );
        got_by_device.entry(g.key.clone()).or_default().push(g);
    }
    assert_eq!(got_by_device.len(), want_by_device.len());
    for (device, msgs) in &mut got_by_device {
        msgs.sort_by_key(|g| g.offset);
        let want = &want_by_device[device.as_str()];
        assert_eq!(msgs.len(), want.len(), "{device}");
        let mut last_ts = i64::MIN;
        for (g, w) in msgs.iter().zip(want) {
            let rec = InputRecord::from_json(&g.payload).expect("wire JSON");
            assert_eq!(&rec, *w, "{device}: the JSON carries the original fields");
            assert_eq!(rec.device_id, g.key);
            assert!(
                rec.timestamp > last_ts,
                "{device}: offsets increase with time"
            );
            last_ts = rec.timestamp;
        }
    }
    // The wire form is the 24 original EPA columns, named as in the CSV header.
    let header = std::fs::read_to_string(sample()).expect("read");
    let header: Vec<&str> = header.lines().next().expect("header").split(',').collect();
    let json: serde_json::Value = serde_json::from_slice(&got[0].payload).expect("json");
    let obj = json.as_object().expect("object");
    assert_eq!(obj.len(), 24);
    for col in header {
        assert!(obj.contains_key(col), "missing {col}");
    }
}

#[test]
fn bad_rows_are_counted_with_lines_and_good_rows_are_sent() {
    let cluster = mock(4);
    let opts = options(&cluster);
    let path = temp_file(
        "bad.csv",
        "timestamp,device_id,value\n\
         2015-01-01 00:00:00,pump-1,1.5\n\
         not-a-time,pump-1,2\n\
         2015-01-01 01:00:00,pump-2,3\n\
         2015-01-01 02:00:00,pump-2,\n\
         2015-01-01 02:00:00,pump-1,4\n\
         2015-01-01 03:00:00,,5\n",
    );
    let reader = RecordReader::from_path(&path, None).expect("open");
    let summary = load(&opts, reader, None).expect("load");
    assert_eq!(summary.sent, 3);
    assert_eq!(summary.bad_rows, 3);
    assert_eq!(summary.devices, 2);
    assert_eq!(summary.partitions, 4, "the topic's real partition count");
    let lines: Vec<u64> = summary.bad_row_samples.iter().map(|r| r.line).collect();
    assert_eq!(lines, [3, 5, 7]);
    assert!(summary.bad_row_samples[0].reason.contains("timestamp"));
    assert!(summary.bad_row_samples[1].reason.contains("value"));
    assert!(summary.bad_row_samples[2].reason.contains("device_id"));
    assert!(summary.to_string().contains("bad rows:   3"));
    assert!(summary.to_string().contains("line 3: "));

    let four = NonZeroU32::new(4).expect("non-zero");
    let got = consume(&cluster.bootstrap_servers(), 4, 3);
    assert_eq!(got.len(), 3);
    for g in &got {
        assert_eq!(
            g.partition,
            partition_for_key(g.key.as_bytes(), four) as i32
        );
        let rec = InputRecord::from_json(&g.payload).expect("json");
        assert_eq!(rec.device_id, g.key);
    }
}

#[test]
fn nothing_to_send_is_an_error() {
    let cluster = mock(2);
    let opts = options(&cluster);
    let only_bad = vec![
        Err(RowError {
            line: 2,
            reason: "value: missing value".into(),
        }),
        Err(RowError {
            line: 3,
            reason: "value: missing value".into(),
        }),
    ];
    let err = load(&opts, only_bad.into_iter(), Some(2)).expect_err("only bad rows");
    assert!(
        matches!(err, LoadError::NothingSent { bad_rows: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("line 2"), "{err}");
    let err = load(&opts, std::iter::empty(), None).expect_err("empty input");
    assert!(
        matches!(err, LoadError::NothingSent { bad_rows: 0, .. }),
        "{err}"
    );
}

#[test]
fn unreachable_broker_fails_quickly_naming_the_address() {
    let opts = LoadOptions {
        progress: false,
        connect_timeout: Duration::from_secs(2),
        ..LoadOptions::new("127.0.0.1:1", TOPIC)
    };
    let rec = InputRecord {
        device_id: "d".into(),
        timestamp: 0,
        value: 1.0,
        fields: None,
    };
    let start = Instant::now();
    let err = load(&opts, std::iter::once(Ok(rec)), None).expect_err("no broker");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(matches!(err, LoadError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[test]
fn missing_topic_is_an_error_when_creation_is_disabled() {
    let cluster = MockCluster::new(1).expect("mock");
    let opts = LoadOptions {
        create_topic: false,
        ..options(&cluster)
    };
    let rec = InputRecord {
        device_id: "d".into(),
        timestamp: 0,
        value: 1.0,
        fields: None,
    };
    let err = load(&opts, std::iter::once(Ok(rec)), None).expect_err("no topic");
    assert!(matches!(err, LoadError::TopicMissing { .. }), "{err}");
    assert!(err.to_string().contains(TOPIC), "{err}");
}

#[test]
fn missing_topic_with_creation_never_hangs() {
    // The mock cluster has no CreateTopics: the loader must give up within its connect timeout
    // with an error naming the topic (a cluster that can create topics would be loaded instead).
    let cluster = MockCluster::new(1).expect("mock");
    let opts = LoadOptions {
        connect_timeout: Duration::from_secs(2),
        ..options(&cluster)
    };
    let start = Instant::now();
    let result = load(&opts, generic(3, 60).into_iter(), None);
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    match result {
        Ok(summary) => {
            assert!(summary.created_topic);
            assert_eq!(summary.sent, 3);
        }
        Err(err) => {
            assert!(matches!(err, LoadError::CreateTopic { .. }), "{err}");
            assert!(
                err.to_string().contains("cannot create topic telemetry"),
                "{err}"
            );
        }
    }
}

fn generic(n: usize, step_secs: i64) -> Vec<Result<InputRecord, RowError>> {
    (0..n)
        .map(|i| {
            Ok(InputRecord {
                device_id: format!("dev-{}", i % 7),
                timestamp: 1_420_070_400 + i as i64 * step_secs,
                value: i as f64,
                fields: None,
            })
        })
        .collect()
}

#[test]
fn records_per_second_rate_is_honoured() {
    let cluster = mock(10);
    let opts = LoadOptions {
        rate: Some(Rate::RecordsPerSec(400.0)),
        ..options(&cluster)
    };
    let start = Instant::now();
    let summary = load(&opts, generic(200, 60).into_iter(), Some(200)).expect("load");
    let took = start.elapsed();
    assert_eq!(summary.sent, 200);
    assert!(took >= Duration::from_millis(450), "took {took:?}");
}

#[test]
fn speedup_replays_data_time_faster() {
    let cluster = mock(10);
    // 5 records an hour apart at 36 000x: the last is due 4 h / 36 000 = 0.4 s after the first.
    let opts = LoadOptions {
        rate: Some(Rate::Speedup(36_000.0)),
        ..options(&cluster)
    };
    let start = Instant::now();
    let summary = load(&opts, generic(5, 3600).into_iter(), None).expect("load");
    let took = start.elapsed();
    assert_eq!(summary.sent, 5);
    assert!(took >= Duration::from_millis(380), "took {took:?}");
}

#[test]
fn a_full_producer_queue_applies_back_pressure_without_dropping() {
    let cluster = mock(10);
    let mut opts = options(&cluster);
    // A 50-message local queue fills at once, so nearly every send meets QueueFull first.
    opts.kafka
        .insert("queue.buffering.max.messages".into(), "50".into());
    let summary = load(&opts, generic(3000, 60).into_iter(), Some(3000)).expect("load");
    assert_eq!(summary.sent, 3000);
    assert_eq!(summary.devices, 7);
    assert_eq!(summary.per_partition.values().sum::<u64>(), 3000);
    let got = consume(&cluster.bootstrap_servers(), 10, 3000);
    assert_eq!(got.len(), 3000);
    // Each device's values arrive in send order (value = index in the input).
    let mut by_device: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for g in &got {
        let rec = InputRecord::from_json(&g.payload).expect("json");
        by_device
            .entry(g.key.clone())
            .or_default()
            .push((g.offset, rec.value));
    }
    for (device, mut seq) in by_device {
        seq.sort_by_key(|s| s.0);
        assert!(
            seq.windows(2).all(|w| w[0].1 < w[1].1),
            "{device} out of order"
        );
    }
}

#[test]
fn retried_produce_errors_deliver_exactly_once() {
    let cluster = mock(10);
    // Transient broker errors: the idempotent producer retries without duplicating anything.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let summary = load(&options(&cluster), generic(500, 60).into_iter(), None).expect("load");
    assert_eq!(summary.sent, 500);
    let got = consume(&cluster.bootstrap_servers(), 10, 500);
    assert_eq!(got.len(), 500, "no loss, and `consume` fails on duplicates");
}

#[test]
fn undeliverable_records_make_the_load_fail() {
    let cluster = mock(10);
    // A permanent rejection of every produce request.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 200],
    );
    let err = load(&options(&cluster), generic(20, 60).into_iter(), None).expect_err("rejected");
    match &err {
        LoadError::Delivery {
            failed, attempted, ..
        } => {
            assert_eq!(*attempted, 20);
            assert!(*failed > 0 && *failed <= 20, "{err}");
        }
        other => panic!("expected a delivery error, got {other}"),
    }
    assert!(
        err.to_string().contains("not delivered to telemetry"),
        "{err}"
    );
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_generator"))
}

#[test]
fn cli_loads_the_sample_and_reports() {
    let cluster = mock(10);
    let servers = cluster.bootstrap_servers();
    let out = bin()
        .arg("load")
        .arg(sample())
        .args(["--bootstrap-servers", &servers, "--topic", TOPIC])
        .args(["--format", "epa", "-X", "linger.ms=2", "--no-progress"])
        .env_remove("GENERATOR_BOOTSTRAP_SERVERS")
        .output()
        .expect("run generator load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout
            .contains("sent:       4002 records from 6 devices to topic telemetry (10 partitions)"),
        "{stdout}"
    );
    assert!(stdout.contains("bad rows:   0"), "{stdout}");
    let got = consume(&servers, 10, 4002);
    assert_eq!(got.len(), 4002);

    // Bootstrap servers from the environment; a file of only bad rows exits non-zero.
    let path = temp_file("allbad.csv", "timestamp,device_id,value\nx,d,1\n");
    let out = bin()
        .arg("load")
        .arg(&path)
        .args(["--topic", TOPIC, "--no-progress"])
        .env("GENERATOR_BOOTSTRAP_SERVERS", &servers)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert!(stderr.contains("bad row skipped: line 2: "), "{stderr}");
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colour codes when not a terminal: {stderr}"
    );

    // An unknown librdkafka property is refused with its name.
    let out = bin()
        .arg("load")
        .arg(sample())
        .args(["--bootstrap-servers", &servers, "--topic", TOPIC])
        .args(["-X", "no.such.property=1", "--no-progress"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no.such.property"), "{stderr}");
}

#[test]
fn cli_unreachable_broker_exits_non_zero_naming_the_address() {
    let start = Instant::now();
    let out = bin()
        .arg("load")
        .arg(sample())
        .args([
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--connect-timeout",
            "2",
        ])
        .arg("--no-progress")
        .output()
        .expect("run");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach Kafka at 127.0.0.1:1"),
        "{stderr}"
    );
}
