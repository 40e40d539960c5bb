//! The Kafka side of the detector: consume → compute → produce, checkpoints and offset
//! commits, rebalances. `processing = "exactly_once"` runs the transactional protocol of
//! [`crate::eos`] (documented there); this module holds the at-least-once protocol and what
//! both share.
//!
//! At-least-once protocol (nothing lost, scores never disturbed, output may repeat):
//! 1. a batch is polled and computed; enriched records and dead letters are produced with the
//!    idempotent producer;
//! 2. every `checkpoint.interval_secs`, on revocation and at shutdown, a *commit point*:
//!    (a) flush the producer and require every delivery acknowledged, and capture the
//!    consumer positions; (b) serialise every device whose network changed before (a),
//!    stamped with the offset of the last record it processed, and write the files durably;
//!    (c) commit the positions captured in (a).
//!    The periodic commit point spreads (b) over the following batches, each serialising
//!    for at most `checkpoint.max_pause_ms` while a background thread writes the files, and
//!    commits once all are durable; at revocation and shutdown it completes before returning.
//!
//! After a crash the group resumes at the last committed position. Every network is restored
//! from its checkpoint, which is never older than that position, so no record is skipped. A
//! checkpoint can be *newer* (crash between steps 2b and 2c): records at or below its stamp
//! are recognised and not fed to the network again (their output was acknowledged in 2a), so
//! scores stay bit-identical to an uninterrupted run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::config::{is_secret_property, Config, Processing};
use crate::engine::{BatchLimits, CheckpointStats, Engine, InMessage, Outcome};

/// Counters a caller (the demo, tests, metrics) can watch while the service runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Milliseconds from the service's start to its first consumed record (0 = none yet).
    pub first_record_ms: AtomicU64,
    pub consumed: AtomicU64,
    pub enriched: AtomicU64,
    pub dead_letters: AtomicU64,
    pub anomalies: AtomicU64,
    pub commits: AtomicU64,
    /// Networks in memory after the last batch.
    pub devices: AtomicU64,
    /// Networks restored from checkpoints so far.
    pub restored: AtomicU64,
    /// Networks dropped from memory to respect the memory bounds so far.
    pub evicted: AtomicU64,
    /// Heap bytes of the networks in memory after the last batch.
    pub resident_bytes: AtomicU64,
    /// Records fed to networks without output after a restore (exactly once).
    pub replayed: AtomicU64,
    /// Damaged checkpoints detected (and not used).
    pub corrupt_checkpoints: AtomicU64,
    /// Committed transactions (exactly once).
    pub transactions: AtomicU64,
    /// Aborted transactions (exactly once).
    pub aborts: AtomicU64,
    /// Partition snapshots written (exactly once).
    pub snapshots: AtomicU64,
    /// Fresh sessions started after a fenced or failed producer (exactly once).
    pub rejoins: AtomicU64,
    /// The longest a batch took so far, from its records in hand to its outputs sent, in ms.
    pub max_batch_ms: AtomicU64,
}

/// How long a batch should take (the system's requirement while networks fit in memory).
pub const BATCH_LIMIT: Duration = Duration::from_secs(10);

/// Records a batch's duration: histogram, the longest so far, and a warning when a batch past
/// [`BATCH_LIMIT`] is the longest yet (not one per batch while a backlog is caught up).
pub(crate) fn record_batch_time(took: Duration, records: usize, progress: &Progress) {
    let seconds = took.as_secs_f64();
    metrics::histogram!("detector_batch_seconds").record(seconds);
    let ms = took.as_millis() as u64;
    let longest = progress.max_batch_ms.fetch_max(ms, Ordering::Relaxed);
    if took > BATCH_LIMIT && ms > longest {
        warn!(records, seconds, "longest batch yet, over 10 s");
    }
}

struct State {
    engine: Engine,
    /// Next offset to consume per partition (what gets committed).
    positions: BTreeMap<i32, i64>,
    /// The positions a background checkpoint reflects, committed once its files are durable,
    /// and when it started.
    pending: Option<(BTreeMap<i32, i64>, Instant)>,
}

struct Shared {
    config: Arc<Config>,
    state: Mutex<State>,
    producer: ThreadedProducer<DeliveryContext>,
    progress: Arc<Progress>,
}

/// Producer context counting failed deliveries.
#[derive(Default)]
pub struct DeliveryContext {
    failures: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl DeliveryContext {
    /// The first delivery failure, if any.
    pub fn first_failure(&self) -> Option<String> {
        self.first_failure.lock().unwrap().clone()
    }
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failures.fetch_add(1, Ordering::SeqCst);
            let mut first = self.first_failure.lock().unwrap();
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

struct GroupContext {
    shared: Arc<Shared>,
}

impl ClientContext for GroupContext {
    fn stats(&self, stats: Statistics) {
        for topic in stats.topics.values() {
            for (p, s) in &topic.partitions {
                if *p >= 0 && s.consumer_lag >= 0 {
                    metrics::gauge!("detector_partition_lag", "partition" => p.to_string())
                        .set(s.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        info!(
            ?partitions,
            "partitions revoked: checkpointing and committing before letting go"
        );
        // The poll loop never holds the lock while polling, and rebalance callbacks run inside
        // poll, so this cannot deadlock.
        if let Err(e) = commit_point(&self.shared, consumer, Some(&partitions)) {
            // Nothing was committed for them: the next owner replays from the last commit and
            // the checkpoints, so this loses nothing, at the cost of duplicates.
            error!("commit at revocation failed: {e:#}");
        }
        let mut state = self.shared.state.lock().unwrap();
        state.engine.drop_partitions(&partitions);
        for p in &partitions {
            state.positions.remove(p);
        }
        metrics::gauge!("detector_devices_resident").set(state.engine.devices() as f64);
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            info!(
                ?partitions,
                "partitions assigned: networks restore from checkpoints on first record"
            );
        }
    }
}

/// Flushes the producer and requires every record so far acknowledged: the precondition of
/// committing any position.
fn flush_acknowledged(shared: &Shared) -> Result<()> {
    // `flush` on a threaded producer waits in 100 ms steps; watching the queue drain is as
    // safe (every record produced so far is acknowledged or failed at zero) and much quicker.
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.producer.in_flight_count() > 0 {
        if Instant::now() > deadline {
            bail!("records not acknowledged by the broker within 60 s; not committing");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let ctx = shared.producer.context();
    if ctx.failures.load(Ordering::SeqCst) > 0 {
        let first = ctx
            .first_failure
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default();
        bail!("records were not acknowledged by the broker (first error: {first}); not committing");
    }
    Ok(())
}

fn commit_positions(
    shared: &Shared,
    consumer: &BaseConsumer<GroupContext>,
    positions: &BTreeMap<i32, i64>,
) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (&p, &next) in positions {
        tpl.add_partition_offset(&shared.config.topics.input, p, Offset::Offset(next))?;
    }
    if tpl.count() > 0 {
        consumer
            .commit(&tpl, CommitMode::Sync)
            .context("committing input offsets")?;
    }
    Ok(())
}

fn record_checkpoint(started: Instant, stats: CheckpointStats, progress: &Progress) {
    metrics::histogram!("detector_checkpoint_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("detector_checkpoint_bytes_total").increment(stats.bytes as u64);
    metrics::counter!("detector_checkpoint_devices_total").increment(stats.devices as u64);
    progress.commits.fetch_add(1, Ordering::SeqCst);
}

/// Starts the periodic commit point: flush, capture the positions and list the changed
/// networks; [`complete_commit`] serialises them over the next batches and commits the
/// positions once their files are durable. Skipped while the previous one is in progress.
fn begin_commit(shared: &Shared) -> Result<()> {
    if shared.state.lock().unwrap().pending.is_some() {
        return Ok(());
    }
    flush_acknowledged(shared)?;
    let started = Instant::now();
    let mut state = shared.state.lock().unwrap();
    state.engine.begin_checkpoint(None);
    state.pending = Some((state.positions.clone(), started));
    Ok(())
}

/// Advances the commit point in progress by one slice, and commits its positions once its
/// files are durable (completes it at once with `wait`). A failed write is an error: nothing
/// is committed and the service stops, so a restart replays from the previous commit.
fn complete_commit(
    shared: &Shared,
    consumer: &BaseConsumer<GroupContext>,
    progress: &Progress,
    wait: bool,
) -> Result<()> {
    let mut state = shared.state.lock().unwrap();
    if !wait && state.pending.is_some() {
        let slice = Duration::from_millis(shared.config.checkpoint.max_pause_ms);
        state.engine.advance_checkpoint(Some(slice))?;
    }
    let Some(done) = state.engine.finish_checkpoint(wait) else {
        return Ok(());
    };
    let pending = state.pending.take();
    drop(state);
    let stats = done.context("writing checkpoints")?;
    if let Some((positions, started)) = pending {
        commit_positions(shared, consumer, &positions)?;
        record_checkpoint(started, stats, progress);
    }
    Ok(())
}

/// Flush, checkpoint changed networks, commit positions (for `only` partitions, or all), all
/// before returning: at revocation and at shutdown. A background commit point completes first.
fn commit_point(
    shared: &Shared,
    consumer: &BaseConsumer<GroupContext>,
    only: Option<&[i32]>,
) -> Result<()> {
    complete_commit(shared, consumer, &shared.progress, true)?;
    flush_acknowledged(shared)?;
    let started = Instant::now();
    let mut state = shared.state.lock().unwrap();
    let stats = state.engine.checkpoint_dirty(only)?;
    let positions: BTreeMap<i32, i64> = state
        .positions
        .iter()
        .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
        .map(|(&p, &o)| (p, o))
        .collect();
    drop(state);
    commit_positions(shared, consumer, &positions)?;
    record_checkpoint(started, stats, &shared.progress);
    Ok(())
}

pub(crate) fn client_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// The shared properties plus a role's own.
pub(crate) fn role_config(config: &Config, role: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = client_config(config);
    for (k, v) in role {
        c.set(k, v);
    }
    c
}

/// An error text with the values of secret properties replaced (librdkafka may quote them).
pub(crate) fn redact(config: &Config, e: &dyn std::fmt::Display) -> String {
    let mut text = e.to_string();
    for map in [
        &config.kafka,
        &config.kafka_consumer,
        &config.kafka_producer,
    ] {
        for (k, v) in map {
            if is_secret_property(k) && !v.is_empty() {
                text = text.replace(v.as_str(), "<redacted>");
            }
        }
    }
    text
}

/// Exactly once: fresh sessions started after a lost one (see `eos::SessionLost`) tolerated
/// within the window before the service gives up.
const MAX_SESSION_RESTARTS: usize = 5;
const SESSION_RESTART_WINDOW: Duration = Duration::from_secs(300);

/// Runs the service until `stop` is set (then checkpoints, commits and returns), with the
/// configured delivery guarantee.
pub fn run(config: Arc<Config>, stop: Arc<AtomicBool>, progress: Arc<Progress>) -> Result<()> {
    match config.processing {
        Processing::ExactlyOnce => {
            let mut restarts: Vec<Instant> = Vec::new();
            loop {
                match crate::eos::run(config.clone(), stop.clone(), progress.clone()) {
                    Err(e)
                        if e.downcast_ref::<crate::eos::SessionLost>()
                            .is_some_and(|lost| !lost.fenced || !config.static_membership) =>
                    {
                        // A fresh session recovers like a restart; one failing again and
                        // again is a problem for the operator.
                        restarts.retain(|t| t.elapsed() < SESSION_RESTART_WINDOW);
                        if restarts.len() >= MAX_SESSION_RESTARTS {
                            return Err(e.context(format!(
                                "{MAX_SESSION_RESTARTS} sessions lost within {} s",
                                SESSION_RESTART_WINDOW.as_secs()
                            )));
                        }
                        restarts.push(Instant::now());
                        warn!("{e:#}; starting a fresh session");
                        metrics::counter!("detector_sessions_restarted_total").increment(1);
                        progress.rejoins.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_secs(1));
                        if stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                    }
                    other => return other,
                }
            }
        }
        Processing::AtLeastOnce => run_at_least_once(config, stop, progress),
    }
}

fn run_at_least_once(
    config: Arc<Config>,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Result<()> {
    let mut pc = role_config(&config, &config.kafka_producer);
    pc.set("enable.idempotence", "true");
    set_default(&mut pc, "linger.ms", "5");
    let producer: ThreadedProducer<DeliveryContext> = pc
        .create_with_context(DeliveryContext::default())
        .map_err(|e| anyhow!("creating the Kafka producer: {}", redact(&config, &e)))?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        state: Mutex::new(State {
            engine: Engine::new(config.clone())?,
            positions: BTreeMap::new(),
            pending: None,
        }),
        producer,
        progress: progress.clone(),
    });
    let mut cc = role_config(&config, &config.kafka_consumer);
    cc.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    set_default(&mut cc, "auto.offset.reset", "earliest");
    set_default(&mut cc, "statistics.interval.ms", "5000");
    let consumer: BaseConsumer<GroupContext> = cc
        .create_with_context(GroupContext {
            shared: shared.clone(),
        })
        .map_err(|e| anyhow!("creating the Kafka consumer: {}", redact(&config, &e)))?;
    consumer
        .subscribe(&[&config.topics.input])
        .with_context(|| format!("subscribing to {}", config.topics.input))?;
    info!(topic = %config.topics.input, group = %config.group_id, "detector running");

    let interval = Duration::from_secs_f64(config.checkpoint.interval_secs);
    let service_started = Instant::now();
    let mut last_commit = Instant::now();
    let mut batch: Vec<InMessage> = Vec::with_capacity(config.batch.max_records);
    while !stop.load(Ordering::SeqCst) {
        let limits = shared.state.lock().unwrap().engine.batch_limits();
        poll_batch(&consumer, &limits, &mut batch, |_| Ok(()))?;
        if !batch.is_empty() {
            if progress.first_record_ms.load(Ordering::Relaxed) == 0 {
                let ms = service_started.elapsed().as_millis().max(1) as u64;
                progress.first_record_ms.store(ms, Ordering::Relaxed);
            }
            process_batch(&shared, &batch, &progress)?;
        }
        if last_commit.elapsed() >= interval {
            begin_commit(&shared)?;
            last_commit = Instant::now();
        }
        complete_commit(&shared, &consumer, &progress, false)?;
    }
    info!("stopping: final checkpoint and commit");
    commit_point(&shared, &consumer, None)?;
    consumer.unsubscribe();
    Ok(())
}

/// Sets a property unless the configuration set it.
pub(crate) fn set_default(c: &mut ClientConfig, key: &str, value: &str) {
    if c.get(key).is_none() {
        c.set(key, value);
    }
}

fn is_fatal(e: &KafkaError) -> bool {
    matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal))
}

/// Fills `batch` (cleared first) with up to `max_records` messages: waits up to `max_wait` for
/// the first, then takes what comes with no gap longer than `gap`. `after_poll` runs after
/// every poll, where rebalance callbacks have just run. A fatal consumer error is an error; others are
/// logged and end the batch.
pub(crate) fn poll_batch<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    limits: &BatchLimits,
    batch: &mut Vec<InMessage>,
    mut after_poll: impl FnMut(&mut Vec<InMessage>) -> Result<()>,
) -> Result<()> {
    batch.clear();
    let deadline = Instant::now() + limits.max_wait;
    while batch.len() < limits.max_records {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = if batch.is_empty() {
            left
        } else {
            left.min(limits.gap)
        };
        let polled = consumer.poll(wait);
        after_poll(batch)?;
        match polled {
            Some(Ok(m)) => batch.push(InMessage {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
            }),
            Some(Err(e)) => {
                if is_fatal(&e) {
                    bail!("fatal consumer error: {e}");
                }
                warn!("consumer error: {e}");
                break;
            }
            None => break,
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Ok(())
}

fn process_batch(shared: &Shared, batch: &[InMessage], progress: &Progress) -> Result<()> {
    let started = Instant::now();
    let mut state = shared.state.lock().unwrap();
    let restored_before = state.engine.restored();
    let outcomes = state.engine.process(batch)?;
    for o in &outcomes {
        produce_outcome(&shared.producer, &shared.config, o, progress)?;
        match o {
            Outcome::Enriched { is_anomaly, .. } => {
                progress.enriched.fetch_add(1, Ordering::Relaxed);
                if *is_anomaly {
                    progress.anomalies.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("detector_anomalies_total").increment(1);
                }
            }
            Outcome::DeadLetter { .. } => {
                progress.dead_letters.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("detector_dead_letters_total").increment(1);
            }
            Outcome::AlreadyProcessed { .. } => {}
        }
    }
    for o in &outcomes {
        let (p, off) = o.partition_offset();
        state.positions.insert(p, off + 1);
    }
    progress
        .consumed
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    metrics::counter!("detector_records_in_total").increment(batch.len() as u64);
    metrics::counter!("detector_records_out_total").increment(outcomes.len() as u64);
    metrics::gauge!("detector_devices_resident").set(state.engine.devices() as f64);
    progress
        .devices
        .store(state.engine.devices() as u64, Ordering::Relaxed);
    progress
        .restored
        .store(state.engine.restored(), Ordering::Relaxed);
    progress
        .evicted
        .store(state.engine.evicted(), Ordering::Relaxed);
    let resident = state.engine.resident_bytes() as u64;
    progress.resident_bytes.store(resident, Ordering::Relaxed);
    metrics::gauge!("detector_resident_bytes").set(resident as f64);
    metrics::gauge!("detector_memory_overhead_bytes").set(state.engine.memory_overhead() as f64);
    metrics::counter!("detector_networks_evicted_total").absolute(state.engine.evicted());
    metrics::counter!("detector_networks_restored_total").absolute(state.engine.restored());
    let took = started.elapsed();
    record_batch_time(took, batch.len(), progress);
    let restores = state.engine.restored() - restored_before;
    let seconds = took.as_secs_f64();
    debug!(records = batch.len(), restores, seconds, "batch processed");
    Ok(())
}

/// Produces an outcome's record: enriched to the output topic keyed by device, dead letter
/// to the dead-letter topic with its reason and source in headers.
pub(crate) fn produce_outcome<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &ThreadedProducer<C>,
    cfg: &Config,
    o: &Outcome,
    _progress: &Progress,
) -> Result<()> {
    match o {
        Outcome::Enriched {
            device, payload, ..
        } => send(
            producer,
            BaseRecord::to(&cfg.topics.output)
                .key(device.as_bytes())
                .payload(payload),
        ),
        Outcome::DeadLetter {
            partition,
            offset,
            key,
            payload,
            reason,
        } => {
            warn!(partition, offset, %reason, "dead letter");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(reason.as_bytes()),
                })
                .insert(Header {
                    key: "source.topic",
                    value: Some(cfg.topics.input.as_bytes()),
                })
                .insert(Header {
                    key: "source.partition",
                    value: Some(partition.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "source.offset",
                    value: Some(offset.to_string().as_bytes()),
                });
            let empty: &[u8] = &[];
            let mut rec = BaseRecord::to(&cfg.topics.dead_letter)
                .payload(payload.as_deref().unwrap_or(empty))
                .headers(headers);
            if let Some(k) = key {
                rec = rec.key(k.as_slice());
            }
            send(producer, rec)
        }
        Outcome::AlreadyProcessed { .. } => Ok(()),
    }
}

/// Sends, waiting for queue space when the local queue is full (back-pressure, not loss).
pub(crate) fn send<'a, C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &ThreadedProducer<C>,
    mut rec: BaseRecord<'a, [u8], [u8]>,
) -> Result<()> {
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(anyhow!("producing: {e}")),
        }
    }
}

/// Fails with a clear message when no broker answers at the configured address in `timeout`.
pub fn check_broker(config: &Config, timeout: Duration) -> Result<()> {
    let servers = config
        .kafka
        .get("bootstrap.servers")
        .cloned()
        .unwrap_or_default();
    let probe: BaseConsumer = client_config(config)
        .create()
        .context("creating a Kafka client")?;
    probe
        .fetch_metadata(None, timeout)
        .map(|_| ())
        .map_err(|e| anyhow!("Kafka broker unreachable at {servers}: {e}"))
}
