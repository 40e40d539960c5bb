//! Exactly-once tests on a real Kafka-protocol broker (noida-db, a separate process). They run
//! when `NOIDA_DB_BIN` names the broker binary (scripts/test.sh sets it) and are skipped with a
//! note otherwise.
//!
//! Every test compares the committed output (read with `isolation.level=read_committed`) with
//! a reference computed offline by one `Engine` fed the whole input topic in order: per input
//! (partition, offset) exactly one enriched record with identical bytes, or exactly one dead
//! letter.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use detector::chaos::{self, BySource, Read};
use detector::config::{Config, Processing, StoreKind};
use detector::engine::{Engine, InMessage, Outcome};
use detector::kafka_store::KafkaSnapshots;
use detector::service::{self, Progress};
use detector::store::{BlobRef, Manifest, SnapshotStore};
use generator::records::InputRecord;

const PARTITIONS: i32 = 4;

/// A noida-db broker process on a free loopback port; SIGTERM on drop.
struct Broker {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    fn start() -> Option<Broker> {
        // RUST_LOG=info shows the services' logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let Some(bin) = std::env::var_os("NOIDA_DB_BIN") else {
            eprintln!("note: NOIDA_DB_BIN is not set; skipping this broker test");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = Broker {
            bin: bin.into(),
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        b.spawn();
        Some(b)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("broker.log")).unwrap();
        let child = Command::new(&self.bin)
            .args(["start", "--only", "kafka", "--kafka-port"])
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting noida-db");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            c.wait().unwrap();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A small, fast network configuration on the broker, exactly once, topics named after `name`.
fn config(b: &Broker, name: &str, instance: &str, ckpt: &Path) -> Config {
    let mut c = Config::parse(
        "[htm]\nprobation = 40\n\
         [htm.params.sp]\ncolumn_count = 512\nnum_active_columns_per_inh_area = 20\n\
         [htm.params.tm.backtracking]\ncells_per_column = 8\n",
    )
    .unwrap();
    c.kafka.insert("bootstrap.servers".into(), b.bootstrap());
    c.processing = Processing::ExactlyOnce;
    c.instance_id = instance.into();
    c.group_id = format!("{name}-group");
    c.topics.input = format!("{name}-in");
    c.topics.output = format!("{name}-out");
    c.topics.dead_letter = format!("{name}-dead");
    c.checkpoint.dir = ckpt.to_path_buf();
    c.checkpoint.interval_secs = 0.5;
    c.batch.max_records = 100;
    c.batch.max_wait_ms = 50;
    c.metrics.addr = String::new();
    c.workers = 1;
    c
}

fn create_topics(c: &Config) {
    chaos::create_topics(
        &c.kafka["bootstrap.servers"],
        &[&c.topics.input, &c.topics.output, &c.topics.dead_letter],
        PARTITIONS,
    )
    .unwrap();
}

/// `n` hourly records for each of `devices` devices with a daily pattern, from hour `from`.
fn records(devices: usize, from: usize, n: usize) -> Vec<InputRecord> {
    let mut out = Vec::new();
    for i in from..from + n {
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

/// Loads records with a garbage message after every `garbage_every`-th; returns the garbage
/// count.
fn load(c: &Config, recs: Vec<InputRecord>, garbage_every: usize) -> u64 {
    chaos::load_with_garbage(
        &c.kafka["bootstrap.servers"],
        &c.topics.input,
        PARTITIONS,
        recs,
        garbage_every,
    )
    .unwrap()
    .garbage
}

/// The reference: one engine fed the whole input topic in order, never interrupted.
fn reference(c: &Config) -> BySource {
    let boot = &c.kafka["bootstrap.servers"];
    let input = chaos::read_committed(boot, &c.topics.input).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rc = c.clone();
    rc.checkpoint.dir = dir.path().to_path_buf();
    let mut engine = Engine::new(Arc::new(rc)).unwrap();
    let batch: Vec<InMessage> = input
        .into_iter()
        .map(|r: Read| InMessage {
            partition: r.partition,
            offset: r.offset,
            key: r.key,
            payload: r.payload,
        })
        .collect();
    let mut out = BySource::new();
    for o in engine.process(&batch).unwrap() {
        if let Outcome::Enriched {
            partition,
            offset,
            payload,
            ..
        } = o
        {
            out.insert((partition, offset), vec![payload]);
        }
    }
    out
}

/// Waits for the group to commit the whole input, then compares the committed output with
/// the reference; panics with the comparison unless it is perfect.
fn assert_exactly_once(c: &Config, garbage: u64) -> chaos::Comparison {
    let boot = &c.kafka["bootstrap.servers"];
    chaos::wait_committed(boot, &c.group_id, &c.topics.input, Duration::from_secs(180)).unwrap();
    let ends = chaos::end_offsets(boot, &c.topics.input).unwrap();
    let golden = reference(c);
    let out =
        chaos::enriched_by_source(&chaos::read_committed(boot, &c.topics.output).unwrap()).unwrap();
    let dead = chaos::dead_by_source(&chaos::read_committed(boot, &c.topics.dead_letter).unwrap())
        .unwrap();
    let cmp = chaos::compare(&ends, &golden, &out, &dead);
    assert!(cmp.ok(garbage), "{cmp} unaccounted={}", cmp.unaccounted);
    assert_eq!(cmp.enriched as usize, golden.len());
    cmp
}

/// The service in a thread of this process.
struct InProcess {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    handle: JoinHandle<anyhow::Result<()>>,
}

fn start(c: &Config) -> InProcess {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let handle = {
        let (c, stop, progress) = (Arc::new(c.clone()), stop.clone(), progress.clone());
        std::thread::spawn(move || service::run(c, stop, progress))
    };
    InProcess {
        stop,
        progress,
        handle,
    }
}

impl InProcess {
    fn stop(self) -> Arc<Progress> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap().unwrap();
        self.progress
    }

    fn wait_until(&self, what: &str, f: impl Fn(&Progress) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !f(&self.progress) {
            assert!(!self.handle.is_finished(), "service stopped early ({what})");
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn transactional_path_enriches_each_record_exactly_once() {
    let Some(b) = Broker::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&b, "tx", "i1", dir.path());
    c.checkpoint.store = StoreKind::Kafka;
    create_topics(&c);
    let garbage = load(&c, records(5, 0, 80), 37);
    assert_eq!(garbage, 10);
    let running = start(&c);
    running.wait_until("every record", |p| {
        p.enriched.load(Ordering::SeqCst) + p.dead_letters.load(Ordering::SeqCst) >= 410
    });
    let progress = running.stop();
    assert!(progress.transactions.load(Ordering::SeqCst) > 1);
    assert!(
        progress.snapshots.load(Ordering::SeqCst) > 0,
        "snapshots reached the Kafka store"
    );
    assert_eq!(progress.dead_letters.load(Ordering::SeqCst), garbage);
    let cmp = assert_exactly_once(&c, garbage);
    assert_eq!(cmp.records, 410);
}

/// The detector binary as a child process, so it can be killed with SIGKILL.
fn spawn_detector(c: &Config, dir: &Path, log: &str) -> Child {
    let path = dir.join(format!("{}.toml", c.instance_id));
    std::fs::write(&path, toml::to_string(c).unwrap()).unwrap();
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join(log))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_detector"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn committed_output(c: &Config) -> i64 {
    chaos::end_offsets(&c.kafka["bootstrap.servers"], &c.topics.output)
        .unwrap()
        .values()
        .sum()
}

#[test]
fn kill_9_at_any_moment_loses_nothing_and_repeats_nothing() {
    let Some(b) = Broker::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&b, "kill", "i1", &dir.path().join("ckpt"));
    c.checkpoint.interval_secs = 0.3;
    create_topics(&c);
    let garbage = load(&c, records(4, 0, 300), 50);
    let mut kills = 0;
    // Kill at growing delays: before the first commit, mid-stream, during snapshots.
    for delay_ms in [400u64, 900, 1300, 1700, 2100] {
        let mut child = spawn_detector(&c, dir.path(), "detector.log");
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        committed_output(&c) > 0,
        "some output was committed before the last kill"
    );
    let mut child = spawn_detector(&c, dir.path(), "detector.log");
    let cmp = assert_exactly_once(&c, garbage);
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success(), "clean exit on SIGTERM");
    assert_eq!(kills, 5);
    assert_eq!(cmp.records, 1200 + garbage);
    let log = std::fs::read_to_string(dir.path().join("detector.log")).unwrap();
    assert!(
        log.contains("restored snapshot"),
        "some restart restored a snapshot:\n{log}"
    );
}

#[test]
fn corrupt_checkpoints_are_detected_and_recovered_from() {
    let Some(b) = Broker::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = config(&b, "corrupt", "i1", dir.path());
    create_topics(&c);
    let mut garbage = 0;
    let mut total = 0;
    let snapshots = |p: i32| {
        detector::store::DirSnapshots::open(dir.path(), &c.topics.input)
            .unwrap()
            .partition_dir(p)
    };
    // Three stretches, each processed by a fresh instance that stops gracefully (so every
    // partition has several snapshot generations).
    for stretch in 0..3 {
        let recs = records(3, stretch * 60, 60);
        total += recs.len() as u64;
        garbage += load(&c, recs, 0);
        let running = start(&c);
        running.wait_until("the stretch", |p| p.enriched.load(Ordering::SeqCst) >= 180);
        let progress = running.stop();
        match stretch {
            0 => {}
            1 => assert_eq!(
                progress.corrupt_checkpoints.load(Ordering::SeqCst),
                1,
                "the damaged newest blob was detected"
            ),
            _ => assert!(
                progress.corrupt_checkpoints.load(Ordering::SeqCst) >= 2,
                "every damaged snapshot was detected"
            ),
        }
        // Damage what the next instance would restore.
        for p in 0..PARTITIONS {
            let d = snapshots(p);
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut names: Vec<String> = rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            if stretch == 0 {
                // Flip a byte in one network of the newest generation.
                let newest = names
                    .iter()
                    .filter(|n| n.starts_with("manifest-"))
                    .max()
                    .unwrap()
                    .clone();
                let g: u64 = newest["manifest-".len()..newest.len() - 5].parse().unwrap();
                if let Some(blob) = names.iter().find(|n| n.ends_with(&format!("@{g}.net"))) {
                    let path = d.join(blob);
                    let mut bytes = std::fs::read(&path).unwrap();
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0x5a;
                    std::fs::write(&path, bytes).unwrap();
                    break; // one partition is enough to show the fallback
                }
            } else {
                // Every snapshot of every partition: truncate all files.
                for n in &names {
                    let path = d.join(n);
                    let bytes = std::fs::read(&path).unwrap();
                    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
                }
            }
        }
    }
    let cmp = assert_exactly_once(&c, garbage);
    assert_eq!(cmp.records, total);
}

#[test]
fn kafka_store_round_trip_with_chunks_generations_and_tombstones() {
    let Some(b) = Broker::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&b, "kstore", "store", dir.path());
    c.checkpoint.store = StoreKind::Kafka;
    c.checkpoint.chunk_bytes = 4096;
    create_topics(&c);
    let producer =
        Arc::new(detector::eos::transactional_producer(&c, &c.transactional_id(2)).unwrap());
    let mut store = KafkaSnapshots::open(&c).unwrap();
    store.set_writer(2, producer.clone());
    assert!(store.open(2).unwrap().is_empty());

    let blob = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    let reference = |g: u64, b: &[u8]| BlobRef {
        generation: g,
        offset: g as i64 * 10,
        len: b.len() as u64,
        crc32: crc32fast::hash(b),
    };
    // Generation 1: two devices, one spanning many chunks; 2: only "a/b#1" changed;
    // 3: "big" changed. After 3, generation 1's manifest and "a/b#1"@1 are garbage.
    let big1 = blob(1, 4096 * 7 + 13);
    let small1 = blob(2, 100);
    let small2 = blob(3, 4096);
    let big3 = blob(4, 4096 * 3);
    let m1 = Manifest {
        topic: c.topics.input.clone(),
        partition: 2,
        generation: 1,
        snapshot_offset: 10,
        devices: BTreeMap::from([
            ("big".to_string(), reference(1, &big1)),
            ("a/b#1".to_string(), reference(1, &small1)),
        ]),
    };
    store
        .write(
            &m1,
            &[
                ("big".into(), big1.clone()),
                ("a/b#1".into(), small1.clone()),
            ],
            None,
        )
        .unwrap();
    let mut m2 = m1.clone();
    m2.generation = 2;
    m2.snapshot_offset = 20;
    m2.devices.insert("a/b#1".into(), reference(2, &small2));
    store
        .write(&m2, &[("a/b#1".into(), small2.clone())], Some(&m1))
        .unwrap();
    let mut m3 = m2.clone();
    m3.generation = 3;
    m3.snapshot_offset = 30;
    m3.devices.insert("big".into(), reference(3, &big3));
    store
        .write(&m3, &[("big".into(), big3.clone())], Some(&m2))
        .unwrap();

    // A fresh store (another instance) reads it back.
    let mut other = KafkaSnapshots::open(&c).unwrap();
    other.set_writer(2, producer);
    let found = other.open(2).unwrap();
    let gens: Vec<u64> = found.iter().map(|f| f.generation).collect();
    assert_eq!(gens, [3, 2], "only the last two generations are live");
    assert_eq!(found[0].manifest.as_ref().unwrap(), &m3);
    assert_eq!(found[1].manifest.as_ref().unwrap(), &m2);
    assert_eq!(other.blob(2, "big", 3).unwrap().unwrap(), big3);
    assert_eq!(
        other.blob(2, "big", 1).unwrap().unwrap(),
        big1,
        "m2 needs it"
    );
    assert_eq!(other.blob(2, "a/b#1", 2).unwrap().unwrap(), small2);
    assert_eq!(other.blob(2, "a/b#1", 1).unwrap(), None, "tombstoned");
    assert!(other.open(1).unwrap().is_empty(), "partitions do not mix");

    // Whole networks, restored through the generic restore path, decode.
    let mut engine = Engine::new(Arc::new(c.clone())).unwrap();
    let msgs: Vec<InMessage> = records(1, 0, 50)
        .into_iter()
        .enumerate()
        .map(|(i, r)| InMessage {
            partition: 2,
            offset: i as i64,
            key: Some(r.device_id.clone().into_bytes()),
            payload: Some(r.to_json().into_bytes()),
        })
        .collect();
    engine.process(&msgs).unwrap();
    let net = engine
        .network_bytes(2, &["pump-0".to_string()])
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(net.len() > 4096 * 4, "a network spans chunks");
    let m4 = Manifest {
        generation: 4,
        snapshot_offset: 50,
        devices: BTreeMap::from([("pump-0".to_string(), reference(4, &net))]),
        ..m3.clone()
    };
    let mut m4 = m4;
    m4.devices.get_mut("pump-0").unwrap().offset = 49;
    other
        .write(&m4, &[("pump-0".into(), net.clone())], Some(&m3))
        .unwrap();
    let mut fresh = Engine::new(Arc::new(c.clone())).unwrap();
    let restored = detector::store::restore(&mut other, 2, 50, |devices| {
        fresh.restore_partition(2, devices)
    })
    .unwrap();
    assert!(restored.problems.is_empty(), "{:?}", restored.problems);
    assert_eq!(restored.manifest.unwrap().generation, 4);
    assert_eq!(fresh.device_offsets(2), vec![("pump-0".to_string(), 49)]);
    assert_eq!(
        fresh
            .network_bytes(2, &["pump-0".to_string()])
            .unwrap()
            .remove(0)
            .unwrap(),
        net
    );
}

#[test]
fn partitions_moving_between_two_instances_keep_scores_identical() {
    let Some(b) = Broker::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut c1 = config(&b, "move", "i1", dir.path());
    c1.checkpoint.store = StoreKind::Kafka;
    let mut c2 = c1.clone();
    c2.instance_id = "i2".into();
    // A dynamic member leaves the group when it stops, so its partitions move at once.
    c2.static_membership = false;
    create_topics(&c1);
    let mut garbage = load(&c1, records(6, 0, 40), 45);
    let i1 = start(&c1);
    i1.wait_until("the first stretch", |p| {
        p.enriched.load(Ordering::SeqCst) >= 240
    });
    let i2 = start(&c2);
    // The rebalance hands half the partitions to i2; it restores their snapshots.
    i2.wait_until("i2's share", |p| p.restored.load(Ordering::SeqCst) > 0);
    garbage += load(&c1, records(6, 40, 40), 45);
    i2.wait_until("i2 processing", |p| p.enriched.load(Ordering::SeqCst) > 0);
    let p2 = i2.stop(); // leaves: i1 takes everything back
    garbage += load(&c1, records(6, 80, 40), 45);
    let cmp = assert_exactly_once(&c1, garbage);
    let p1 = i1.stop();
    assert_eq!(cmp.records, 720 + garbage);
    assert!(p2.enriched.load(Ordering::SeqCst) > 0);
    assert!(
        p1.restored.load(Ordering::SeqCst) > 0,
        "i1 restored i2's snapshots"
    );
    assert_eq!(
        p1.enriched.load(Ordering::SeqCst) + p2.enriched.load(Ordering::SeqCst),
        cmp.enriched,
        "no transaction was aborted, so the counters add up"
    );
}

#[test]
fn a_fenced_incarnation_stops_at_once_and_its_successor_finishes_exactly_once() {
    let Some(b) = Broker::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = config(&b, "fence", "i1", dir.path());
    create_topics(&c);
    let garbage = load(&c, records(4, 0, 500), 60);
    let first = start(&c);
    first.wait_until("a few transactions", |p| {
        p.transactions.load(Ordering::SeqCst) >= 2
    });
    // Same instance id: its init_transactions fences the first incarnation.
    let second = start(&c);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !first.handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the fenced incarnation kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = first.handle.join().unwrap().unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("fenc"),
        "stopped because it was fenced: {err:#}"
    );
    let cmp = assert_exactly_once(&c, garbage);
    assert_eq!(cmp.records, 2000 + garbage);
    second.stop();
}
