//! Exactly-once processing: Kafka transactions, partition snapshots and silent replay.
//!
//! # Promise
//! Read with `isolation.level=read_committed`, the output topic holds exactly one enriched
//! record per valid input record and the dead-letter topic one record per invalid one, and
//! every score is bit-identical to an uninterrupted single-instance run — whatever happens:
//! an instance killed at any moment, a broker restart, partitions moving between instances.
//!
//! # Protocol
//! * **Identity and fencing.** `instance_id` is the consumer's `group.instance.id` (static
//!   membership: a restarted instance takes its place back without a rebalance). Each owned
//!   input partition has its own transactional producer, `transactional.id` =
//!   `<group>.<input topic>.<partition>`: at assignment the new owner's `init_transactions`
//!   fences whoever wrote for the partition before (a previous incarnation, a zombie evicted by
//!   the coordinator) and aborts its open transaction, *before* the committed offset is read.
//!   Fencing thus does not rely on the coordinator's generation checks alone (KIP-447): a
//!   coordinator that hands one partition to two members at once (observed with a static
//!   leader rejoining; KAFKA-13435 on Kafka before 3.2) still cannot make both commit.
//! * **Transactions per batch.** Poll a batch (read_committed), compute, then for each
//!   partition with output: `begin_transaction` → produce its enriched records and dead
//!   letters → `send_offsets_to_transaction(next offset, group metadata)` →
//!   `commit_transaction`. Output and input progress become visible together or not at all.
//!   An abortable error aborts the transaction and *rewinds* the partitions not committed
//!   (networks restored from their snapshot, consumer seeked back, see below); a fatal error
//!   (fenced) ends the session at once without writing anything more. When a producer failed
//!   fatally, or was fenced while the instance is a dynamic group member (a newer owner took
//!   a partition over), the instance starts a fresh session — rejoins the group, restores
//!   snapshots — as a restart would. A static member that is fenced stops: the fencer may be
//!   a newer incarnation of itself, which a fresh session would fence in turn.
//! * **Partition snapshots**, written only between transactions, so they never contain
//!   uncommitted state: every `checkpoint.interval_secs`, at revocation and at shutdown, for
//!   each owned partition, the networks that changed since the previous snapshot and then a
//!   manifest {partition, generation, `snapshot_offset` = next offset after the last record
//!   every network reflects, device → blob}. Devices are written before the manifest, which
//!   is written atomically, so a snapshot is partition-consistent: no device is newer than
//!   its manifest. The last two generations are kept (`store.rs`, `kafka_store.rs`).
//! * **Assignment.** For each assigned partition: read the committed offset C and the
//!   newest intact snapshot S ≤ C; install its networks, seek the partition to S and
//!   *replay* S..C: those records are fed to the networks without emitting anything (their
//!   output was committed already); from C on, processing is normal. A damaged snapshot
//!   (CRC, missing blob, undecodable network) is logged, counted
//!   (`detector_checkpoint_corrupt_total`) and skipped for the previous generation, or, when
//!   none is usable, the partition replays from its first retained record. A partition
//!   without a committed offset starts fresh where `auto.offset.reset` says.
//! * **Revocation** (eager protocols, `range` by default) writes the revoked partitions'
//!   snapshots and drops their networks before the callback returns, so a device never has
//!   two live networks. A lost assignment (evicted by the coordinator) writes nothing: another
//!   instance may own the partitions already.
//!
//! Determinism does the rest: a network's state is a function of the records it was fed in
//! order, so snapshot + replay rebuilds exactly the state of an uninterrupted run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use crate::config::{Config, StoreKind};
use crate::engine::{Engine, InMessage, Outcome};
use crate::kafka_store::KafkaSnapshots;
use crate::service::{
    client_config, poll_batch, produce_outcome, redact, role_config, set_default, DeliveryContext,
    Progress,
};
use crate::store::{self, BlobRef, DirSnapshots, Manifest, SnapshotStore};

/// How long a transactional or group call may block (a broker restart fits in it).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive aborted transactions tolerated before giving up (and letting a restart retry).
const MAX_ABORTS_IN_A_ROW: u32 = 5;

/// The transactional producer of the service (also writes the Kafka store's snapshots).
pub type TxProducer = ThreadedProducer<DeliveryContext>;

/// A partition this instance owns.
#[derive(Debug)]
struct Part {
    /// Next offset the networks have not seen (`None` until known: fresh start).
    position: Option<i64>,
    /// Records below this offset were committed earlier: replayed without output.
    replay_until: i64,
    /// The snapshot the partition's networks were last saved in (or restored from).
    manifest: Option<Manifest>,
    /// Highest snapshot generation known for the partition.
    generation: u64,
    /// Offset of the first record processed after a fresh start (no committed offset): where
    /// a rewind goes back to.
    origin: Option<i64>,
}

struct State {
    engine: Engine,
    store: Box<dyn SnapshotStore>,
    parts: BTreeMap<i32, Part>,
    /// The transactional producer of each owned partition.
    producers: BTreeMap<i32, Arc<TxProducer>>,
    /// Partitions revoked since the poll loop last looked: their polled records are dropped.
    revoked: Vec<i32>,
    /// In-memory networks may hold state that is not committed (an aborted transaction not
    /// rewound yet) or this instance is fenced: no snapshot may be written.
    poisoned: bool,
    /// A failure inside a rebalance callback, raised by the poll loop.
    fatal: Option<anyhow::Error>,
}

struct Shared {
    config: Arc<Config>,
    state: Mutex<State>,
    progress: Arc<Progress>,
}

struct EosContext {
    shared: Arc<Shared>,
}

impl ClientContext for EosContext {}

impl ConsumerContext for EosContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Err(e) = on_assign(&self.shared, consumer, tpl) {
                    error!("restoring assigned partitions failed: {e:#}");
                    let mut st = self.shared.state.lock().unwrap();
                    st.fatal.get_or_insert(e);
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    let mut st = self.shared.state.lock().unwrap();
                    st.fatal.get_or_insert(anyhow!("assigning partitions: {e}"));
                }
            }
            _ => {
                if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    warn!("rebalance error: {:?}", RDKafkaErrorCode::from(err));
                }
                on_revoke(&self.shared, consumer, tpl);
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    warn!("unassigning partitions: {e}");
                }
            }
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// Restores every assigned partition and sets its start offset in `tpl`.
fn on_assign(
    shared: &Shared,
    consumer: &BaseConsumer<EosContext>,
    tpl: &mut TopicPartitionList,
) -> Result<()> {
    let topic = shared.config.topics.input.clone();
    let partitions = partitions_of(tpl);
    info!(
        ?partitions,
        "partitions assigned: fencing previous owners, restoring snapshots"
    );
    // First take over each partition's transactional id: this fences whoever still writes for
    // it and aborts its open transaction, so the committed offsets read next are final.
    let mut producers = Vec::with_capacity(partitions.len());
    for &p in &partitions {
        let id = shared.config.transactional_id(p);
        producers.push((p, Arc::new(transactional_producer(&shared.config, &id)?)));
    }
    let committed = committed_offsets(consumer, &topic, &partitions)?;
    let mut st = shared.state.lock().unwrap();
    for (p, producer) in producers {
        st.store.set_writer(p, producer.clone());
        st.producers.insert(p, producer);
    }
    for p in partitions {
        let start = restore_partition(&mut st, &shared.progress, p, committed[&p])?;
        tpl.set_partition_offset(&topic, p, start)?;
    }
    Ok(())
}

/// The group's committed offsets (`None`: nothing committed), retried through coordinator
/// moves.
fn committed_offsets(
    consumer: &BaseConsumer<EosContext>,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, Option<i64>>> {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    let mut attempt = 0;
    let got = loop {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(20)) {
            Ok(got) => break got,
            Err(e) if attempt < 5 => {
                attempt += 1;
                warn!("reading committed offsets failed ({e}); retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e).context("reading the group's committed offsets"),
        }
    };
    let mut out = BTreeMap::new();
    for e in got.elements() {
        if let Some(err) = e.error().err() {
            bail!("committed offset of partition {}: {err}", e.partition());
        }
        let off = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        out.insert(e.partition(), off);
    }
    for &p in partitions {
        out.entry(p).or_insert(None);
    }
    Ok(out)
}

/// Installs the newest usable snapshot of `p` (or nothing) and returns where to consume from.
fn restore_partition(
    st: &mut State,
    progress: &Progress,
    p: i32,
    committed: Option<i64>,
) -> Result<Offset> {
    st.engine.drop_partitions(&[p]);
    st.store.close(p);
    if let Some(producer) = st.producers.get(&p) {
        st.store.set_writer(p, producer.clone());
    }
    let Some(c) = committed else {
        // Nothing of this partition was ever committed: nothing to restore or replay.
        st.parts.insert(
            p,
            Part {
                position: None,
                replay_until: i64::MIN,
                manifest: None,
                generation: st
                    .store
                    .open(p)?
                    .iter()
                    .map(|f| f.generation)
                    .max()
                    .unwrap_or(0),
                origin: None,
            },
        );
        info!(partition = p, "no committed offset: starting fresh");
        return Ok(Offset::Invalid);
    };
    let engine = &mut st.engine;
    let restored = store::restore(st.store.as_mut(), p, c, |devices| {
        engine.restore_partition(p, devices)
    })?;
    if !restored.problems.is_empty() {
        let n = restored.problems.len() as u64;
        metrics::counter!("detector_checkpoint_corrupt_total").increment(n);
        progress.corrupt_checkpoints.fetch_add(n, Ordering::SeqCst);
    }
    let (start, position) = match &restored.manifest {
        Some(m) => {
            info!(
                partition = p,
                generation = m.generation,
                devices = m.devices.len(),
                snapshot_offset = m.snapshot_offset,
                committed = c,
                "restored snapshot; replaying {} records without output",
                c - m.snapshot_offset
            );
            progress
                .restored
                .fetch_add(m.devices.len() as u64, Ordering::SeqCst);
            (Offset::Offset(m.snapshot_offset), Some(m.snapshot_offset))
        }
        None => {
            st.engine.drop_partitions(&[p]);
            if restored.problems.is_empty() {
                info!(
                    partition = p,
                    committed = c,
                    "no snapshot: replaying from the first retained record"
                );
            } else {
                error!(
                    partition = p,
                    committed = c,
                    "no intact snapshot: replaying from the first retained record"
                );
            }
            (Offset::Beginning, None)
        }
    };
    st.parts.insert(
        p,
        Part {
            position,
            replay_until: c,
            manifest: restored.manifest,
            generation: restored.max_generation,
            origin: None,
        },
    );
    Ok(start)
}

fn on_revoke(shared: &Shared, consumer: &BaseConsumer<EosContext>, tpl: &TopicPartitionList) {
    let partitions = partitions_of(tpl);
    let lost = consumer.assignment_lost();
    let mut st = shared.state.lock().unwrap();
    if lost {
        warn!(
            ?partitions,
            "assignment lost: dropping networks without a snapshot"
        );
    } else if st.poisoned {
        warn!(
            ?partitions,
            "partitions revoked while state is not committed: dropping networks"
        );
    } else {
        info!(
            ?partitions,
            "partitions revoked: writing snapshots before letting go"
        );
        for &p in &partitions {
            if let Err(e) = snapshot_partition(&mut st, shared, p) {
                // The previous snapshot stays valid: the next owner replays a little more.
                warn!(partition = p, "snapshot at revocation failed: {e:#}");
            }
        }
    }
    st.engine.drop_partitions(&partitions);
    for &p in &partitions {
        st.parts.remove(&p);
        st.store.close(p);
        st.producers.remove(&p);
        st.revoked.push(p);
    }
    shared
        .progress
        .devices
        .store(st.engine.devices() as u64, Ordering::Relaxed);
}

/// Writes a snapshot of partition `p` if anything changed since its last one.
fn snapshot_partition(st: &mut State, shared: &Shared, p: i32) -> Result<()> {
    if st.poisoned {
        return Ok(());
    }
    let Some(part) = st.parts.get(&p) else {
        return Ok(());
    };
    let Some(position) = part.position else {
        return Ok(());
    };
    let devices = st.engine.device_offsets(p);
    let prev = part.manifest.as_ref();
    let changed: Vec<String> = devices
        .iter()
        .filter(|(d, off)| prev.and_then(|m| m.devices.get(d)).map(|r| r.offset) != Some(*off))
        .map(|(d, _)| d.clone())
        .collect();
    if changed.is_empty() && prev.is_some_and(|m| m.snapshot_offset == position) {
        return Ok(());
    }
    let started = Instant::now();
    let generation = part.generation + 1;
    let bytes = st.engine.network_bytes(p, &changed)?;
    let mut refs: BTreeMap<String, BlobRef> = BTreeMap::new();
    for (device, offset) in &devices {
        if let Some(r) = prev.and_then(|m| m.devices.get(device)) {
            if r.offset == *offset {
                refs.insert(device.clone(), *r);
            }
        }
    }
    let offsets: BTreeMap<&String, i64> = devices.iter().map(|(d, o)| (d, *o)).collect();
    let mut blobs = Vec::with_capacity(changed.len());
    for (device, b) in changed.iter().zip(bytes) {
        let b = b.ok_or_else(|| anyhow!("device {device:?} vanished"))?;
        refs.insert(
            device.clone(),
            BlobRef {
                generation,
                offset: offsets[device],
                len: b.len() as u64,
                crc32: crc32fast::hash(&b),
            },
        );
        blobs.push((device.clone(), b));
    }
    let manifest = Manifest {
        topic: shared.config.topics.input.clone(),
        partition: p,
        generation,
        snapshot_offset: position,
        devices: refs,
    };
    let prev = part.manifest.clone();
    let written = st.store.write(&manifest, &blobs, prev.as_ref());
    if written.is_err() {
        let fatal = st.producers.get(&p).and_then(|x| x.client().fatal_error());
        if let Some((code, reason)) = fatal {
            st.poisoned = true;
            bail!("fatal producer error while writing a snapshot: {code:?} {reason}");
        }
    }
    let written = written?;
    let part = st.parts.get_mut(&p).expect("checked above");
    part.generation = generation;
    part.manifest = Some(manifest);
    metrics::histogram!("detector_checkpoint_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("detector_checkpoint_bytes_total").increment(written as u64);
    metrics::counter!("detector_checkpoint_devices_total").increment(blobs.len() as u64);
    shared.progress.snapshots.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// A transactional producer with `init_transactions` done: any other producer with the same
/// `transactional_id` is fenced and its open transaction aborted.
pub fn transactional_producer(config: &Config, transactional_id: &str) -> Result<TxProducer> {
    let mut pc = role_config(config, &config.kafka_producer);
    pc.set("transactional.id", transactional_id);
    pc.set("enable.idempotence", "true");
    set_default(&mut pc, "linger.ms", "5");
    set_default(
        &mut pc,
        "transaction.timeout.ms",
        &(CALL_TIMEOUT.as_millis() as u64 * 2).to_string(),
    );
    let producer: TxProducer = pc
        .create_with_context(DeliveryContext::default())
        .map_err(|e| {
            anyhow!(
                "creating the transactional producer: {}",
                redact(config, &e)
            )
        })?;
    let mut attempt = 0;
    loop {
        match producer.init_transactions(CALL_TIMEOUT) {
            Ok(()) => break,
            Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < 10 => {
                attempt += 1;
                warn!("init_transactions: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => bail!("init_transactions failed: {e}"),
        }
    }
    tracing::debug!(transactional_id, "transactional producer ready");
    Ok(producer)
}

fn snapshot_store(config: &Config) -> Result<Box<dyn SnapshotStore>> {
    Ok(match config.checkpoint.store {
        StoreKind::Dir => Box::new(DirSnapshots::open(
            &config.checkpoint.dir,
            &config.topics.input,
        )?),
        StoreKind::Kafka => Box::new(KafkaSnapshots::open(config)?),
    })
}

/// Runs the exactly-once service until `stop` is set; then writes final snapshots.
pub fn run(config: Arc<Config>, stop: Arc<AtomicBool>, progress: Arc<Progress>) -> Result<()> {
    let store = snapshot_store(&config)?;
    let engine = Engine::new(config.clone())?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        state: Mutex::new(State {
            engine,
            store,
            parts: BTreeMap::new(),
            producers: BTreeMap::new(),
            revoked: Vec::new(),
            poisoned: false,
            fatal: None,
        }),
        progress: progress.clone(),
    });
    let mut cc = role_config(&config, &config.kafka_consumer);
    cc.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed");
    set_default(&mut cc, "auto.offset.reset", "earliest");
    set_default(&mut cc, "partition.assignment.strategy", "range");
    if config.static_membership {
        cc.set("group.instance.id", &config.instance_id);
    }
    let consumer: BaseConsumer<EosContext> = cc
        .create_with_context(EosContext {
            shared: shared.clone(),
        })
        .map_err(|e| anyhow!("creating the Kafka consumer: {}", redact(&config, &e)))?;
    consumer
        .subscribe(&[&config.topics.input])
        .with_context(|| format!("subscribing to {}", config.topics.input))?;
    info!(
        topic = %config.topics.input,
        group = %config.group_id,
        instance = %config.instance_id,
        "detector running (exactly once)"
    );
    let result = main_loop(&shared, &consumer, &stop);
    match &result {
        Ok(()) => {
            info!("stopping: final snapshots");
            let mut st = shared.state.lock().unwrap();
            let parts: Vec<i32> = st.parts.keys().copied().collect();
            for p in parts {
                if let Err(e) = snapshot_partition(&mut st, &shared, p) {
                    warn!(partition = p, "final snapshot failed: {e:#}");
                }
            }
        }
        Err(_) => {
            // Whatever is in memory may be uncommitted: leave no trace of it.
            shared.state.lock().unwrap().poisoned = true;
        }
    }
    drop(consumer); // closes: the revoke callback drops the networks
    result
}

fn main_loop(
    shared: &Arc<Shared>,
    consumer: &BaseConsumer<EosContext>,
    stop: &AtomicBool,
) -> Result<()> {
    let config = &shared.config;
    let progress = &shared.progress;
    let interval = Duration::from_secs_f64(config.checkpoint.interval_secs);
    let started = Instant::now();
    let mut last_snapshot = Instant::now();
    let mut aborts_in_a_row = 0;
    let mut batch: Vec<InMessage> = Vec::with_capacity(config.batch.max_records);
    while !stop.load(Ordering::SeqCst) {
        let limits = shared.state.lock().unwrap().engine.batch_limits();
        let polled = poll_batch(consumer, &limits, &mut batch, |batch| {
            let mut st = shared.state.lock().unwrap();
            if let Some(e) = st.fatal.take() {
                return Err(e);
            }
            if !st.revoked.is_empty() {
                let revoked: BTreeSet<i32> = st.revoked.drain(..).collect();
                batch.retain(|m| !revoked.contains(&m.partition));
            }
            Ok(())
        });
        if let Err(e) = polled {
            shared.state.lock().unwrap().poisoned = true;
            return Err(e);
        }
        if !batch.is_empty() {
            if progress.first_record_ms.load(Ordering::Relaxed) == 0 {
                let ms = started.elapsed().as_millis().max(1) as u64;
                progress.first_record_ms.store(ms, Ordering::Relaxed);
            }
            match process_batch(shared, consumer, &batch) {
                Ok(()) => aborts_in_a_row = 0,
                Err(TxError::Abortable(e, partitions)) => {
                    aborts_in_a_row += 1;
                    progress.aborts.fetch_add(1, Ordering::SeqCst);
                    metrics::counter!("detector_transactions_aborted_total").increment(1);
                    warn!("transaction aborted ({e:#}); rewinding");
                    if aborts_in_a_row > MAX_ABORTS_IN_A_ROW {
                        shared.state.lock().unwrap().poisoned = true;
                        bail!("{aborts_in_a_row} transactions aborted in a row; last: {e:#}");
                    }
                    rewind(shared, consumer, &partitions)?;
                }
                Err(TxError::Fatal(e)) => {
                    shared.state.lock().unwrap().poisoned = true;
                    return Err(e);
                }
            }
        }
        if last_snapshot.elapsed() >= interval {
            let mut st = shared.state.lock().unwrap();
            let parts: Vec<i32> = st.parts.keys().copied().collect();
            for p in parts {
                if let Err(e) = snapshot_partition(&mut st, shared, p) {
                    if st.poisoned {
                        return Err(e);
                    }
                    warn!(partition = p, "snapshot failed: {e:#}");
                }
            }
            last_snapshot = Instant::now();
        }
    }
    Ok(())
}

/// Why a transaction did not commit.
enum TxError {
    /// Aborted: rewind these partitions and go on.
    Abortable(anyhow::Error, Vec<i32>),
    /// Fenced or broken: stop at once.
    Fatal(anyhow::Error),
}

/// A partition's transactional producer is unusable: fenced (another owner took the
/// partition over, e.g. after this instance missed a rebalance) or hit by a fatal error (e.g.
/// a sequence desynchronisation after a broker restart). The session ends without writing
/// anything more and [`crate::service::run`] starts a fresh one, as a restart would.
#[derive(Debug, thiserror::Error)]
#[error("{what}: the session's producer is {}", if *.fenced { "fenced" } else { "failed" })]
pub struct SessionLost {
    what: String,
    /// Fenced by whoever uses the partition's transactional id now. With static membership
    /// that may be a newer incarnation of this very instance, which a fresh session would
    /// fence in turn: then the instance stops instead.
    pub fenced: bool,
}

impl SessionLost {
    fn new(what: String, code: Option<RDKafkaErrorCode>) -> Self {
        SessionLost {
            what,
            fenced: code.is_some_and(is_producer_fencing),
        }
    }
}

/// `SessionLost` when the producer has a fatal error, else `other`.
fn fatal_or(producer: &TxProducer, what: &str, other: anyhow::Error) -> anyhow::Error {
    match producer.client().fatal_error() {
        Some((code, reason)) => {
            SessionLost::new(format!("{what}: {code:?}: {reason}"), Some(code)).into()
        }
        None => other,
    }
}

fn is_producer_fencing(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

fn classify(producer: &TxProducer, e: KafkaError, what: &str) -> TxError {
    if let Some((code, reason)) = producer.client().fatal_error() {
        let lost = SessionLost::new(format!("{what}: {code:?}: {reason}"), Some(code));
        return TxError::Fatal(lost.into());
    }
    let code = e.rdkafka_error_code();
    if code.is_some_and(is_producer_fencing) {
        return TxError::Fatal(SessionLost::new(format!("{what}: {e}"), code).into());
    }
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => TxError::Fatal(anyhow!("{what}: {e}")),
        // Another live process has this instance id: this one must stop.
        _ if code == Some(RDKafkaErrorCode::FencedInstanceId) => {
            TxError::Fatal(anyhow!("{what}: fenced: {e}"))
        }
        _ => TxError::Abortable(anyhow!("{what}: {e}"), Vec::new()),
    }
}

/// Computes a batch and commits its output with its input offsets in one transaction.
fn process_batch(
    shared: &Shared,
    consumer: &BaseConsumer<EosContext>,
    batch: &[InMessage],
) -> std::result::Result<(), TxError> {
    let started = Instant::now();
    let config = &shared.config;
    let progress = &shared.progress;
    let mut st = shared.state.lock().unwrap();
    // Only partitions still owned (the poll loop already dropped revoked ones).
    let owned: Vec<InMessage>;
    let batch = if batch.iter().all(|m| st.parts.contains_key(&m.partition)) {
        batch
    } else {
        owned = batch
            .iter()
            .filter(|m| st.parts.contains_key(&m.partition))
            .cloned()
            .collect();
        &owned
    };
    let outcomes = st
        .engine
        .process(batch)
        .map_err(|e| TxError::Fatal(e.context("computing a batch")))?;
    // Networks now hold this batch: uncommitted until the transaction commits.
    st.poisoned = true;
    let mut live: Vec<&Outcome> = Vec::with_capacity(outcomes.len());
    let mut replayed = 0u64;
    for o in &outcomes {
        let (p, off) = o.partition_offset();
        let Some(part) = st.parts.get_mut(&p) else {
            continue;
        };
        if part.position.is_none() {
            part.origin = Some(off);
        }
        part.position = Some(off + 1);
        if off >= part.replay_until {
            live.push(o);
        } else {
            replayed += 1;
        }
    }
    progress.replayed.fetch_add(replayed, Ordering::Relaxed);
    progress
        .consumed
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    // One transaction per partition with output, by the partition's own producer.
    let mut by_partition: BTreeMap<i32, Vec<&Outcome>> = BTreeMap::new();
    for o in live {
        by_partition
            .entry(o.partition_offset().0)
            .or_default()
            .push(o);
    }
    let pending: Vec<i32> = by_partition.keys().copied().collect();
    for (n, (&p, outs)) in by_partition.iter().enumerate() {
        let part = &st.parts[&p];
        let pos = part.position.expect("set above");
        let producer = st
            .producers
            .get(&p)
            .cloned()
            .ok_or_else(|| TxError::Fatal(anyhow!("no producer for partition {p}")))?;
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&config.topics.input, p, Offset::Offset(pos))
            .map_err(|e| TxError::Fatal(e.into()))?;
        if let Err(e) = transaction(&producer, consumer, config, outs, &offsets, progress) {
            // This partition and those after it did not commit: their networks must go back.
            let uncommitted = pending[n..].to_vec();
            return Err(match e {
                TxError::Abortable(e, _) => TxError::Abortable(e, uncommitted),
                fatal => fatal,
            });
        }
        progress.transactions.fetch_add(1, Ordering::SeqCst);
        let mut enriched = 0;
        let mut dead = 0;
        for o in outs {
            match o {
                Outcome::Enriched { is_anomaly, .. } => {
                    enriched += 1;
                    if *is_anomaly {
                        progress.anomalies.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("detector_anomalies_total").increment(1);
                    }
                }
                Outcome::DeadLetter { .. } => dead += 1,
                Outcome::AlreadyProcessed { .. } => {}
            }
        }
        progress.enriched.fetch_add(enriched, Ordering::SeqCst);
        progress.dead_letters.fetch_add(dead, Ordering::SeqCst);
        metrics::counter!("detector_dead_letters_total").increment(dead);
        metrics::counter!("detector_records_out_total").increment(outs.len() as u64);
    }
    st.poisoned = false;
    metrics::counter!("detector_records_in_total").increment(batch.len() as u64);
    metrics::counter!("detector_records_replayed_total").increment(replayed);
    metrics::gauge!("detector_devices_resident").set(st.engine.devices() as f64);
    progress
        .devices
        .store(st.engine.devices() as u64, Ordering::Relaxed);
    crate::service::record_batch_time(started.elapsed(), batch.len(), progress);
    Ok(())
}

/// One partition's transaction: output, then the input offset, then commit (or abort).
fn transaction(
    producer: &TxProducer,
    consumer: &BaseConsumer<EosContext>,
    config: &Config,
    outs: &[&Outcome],
    offsets: &TopicPartitionList,
    progress: &Progress,
) -> std::result::Result<(), TxError> {
    producer
        .begin_transaction()
        .map_err(|e| classify(producer, e, "begin_transaction"))?;
    let result = (|| {
        for o in outs {
            produce_outcome(producer, config, o, progress)
                .map_err(|e| TxError::Abortable(e.context("producing"), Vec::new()))?;
        }
        let group = consumer
            .group_metadata()
            .ok_or_else(|| TxError::Abortable(anyhow!("no consumer group metadata"), Vec::new()))?;
        producer
            .send_offsets_to_transaction(offsets, &group, CALL_TIMEOUT)
            .map_err(|e| classify(producer, e, "send_offsets_to_transaction"))?;
        commit(producer)
    })();
    match result {
        Err(TxError::Abortable(e, _)) => match producer.abort_transaction(CALL_TIMEOUT) {
            Ok(()) => Err(TxError::Abortable(e, Vec::new())),
            Err(abort) => Err(TxError::Fatal(fatal_or(
                producer,
                "abort_transaction",
                anyhow!("abort_transaction failed ({abort}) after: {e:#}"),
            ))),
        },
        other => other,
    }
}

/// Commits, retrying what librdkafka calls retriable (e.g. a timeout during a broker restart).
fn commit(producer: &TxProducer) -> std::result::Result<(), TxError> {
    let mut attempt = 0;
    loop {
        match producer.commit_transaction(CALL_TIMEOUT) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < 3 => {
                attempt += 1;
                warn!("commit_transaction: {e}; retrying");
            }
            Err(e) => return Err(classify(producer, e, "commit_transaction")),
        }
    }
}

/// After an aborted transaction: the partitions go back to their snapshots and the consumer
/// to the matching offsets, as if they had been revoked and assigned again.
fn rewind(shared: &Shared, consumer: &BaseConsumer<EosContext>, partitions: &[i32]) -> Result<()> {
    let topic = &shared.config.topics.input;
    let partitions: Vec<i32> = {
        let st = shared.state.lock().unwrap();
        partitions
            .iter()
            .copied()
            .filter(|p| st.parts.contains_key(p))
            .collect()
    };
    let committed = committed_offsets(consumer, topic, &partitions)?;
    let mut st = shared.state.lock().unwrap();
    for p in partitions {
        let origin = st.parts.get(&p).and_then(|part| part.origin);
        let start = restore_partition(&mut st, &shared.progress, p, committed[&p])?;
        let start = match (start, origin) {
            // A fresh partition goes back to where it started.
            (Offset::Invalid, Some(o)) => Offset::Offset(o),
            (Offset::Invalid, None) => continue,
            (o, _) => o,
        };
        consumer
            .seek(topic, p, start, Duration::from_secs(10))
            .with_context(|| format!("seeking partition {p} back"))?;
    }
    st.poisoned = false;
    Ok(())
}

/// A consumer configuration without group membership, for reading topics directly.
pub fn reader_config(config: &Config) -> ClientConfig {
    let mut c = client_config(config);
    for (k, v) in &config.kafka_consumer {
        c.set(k, v);
    }
    c
}
