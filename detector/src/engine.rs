//! The compute core of the detector, free of Kafka: decodes input messages, keeps exactly one
//! network per device, restores networks from checkpoints on first sight, computes in parallel
//! across devices while keeping each device's records in offset order, and renders enriched
//! records.
//!
//! Memory bounds (`[memory]`): a batch's devices are computed in waves; room is made before each
//! wave by writing out and dropping the least recently used networks (at least once to their
//! checkpoint files, exactly once to a spill area only this process trusts).
//!
//! Periodic checkpoints are spread over batches so that none pauses long: a checkpoint
//! ([`Engine::begin_checkpoint`]) lists the devices changed so far; each batch then serialises
//! some of them within a time slice ([`Engine::advance_checkpoint`]) and hands the bytes to a
//! background writer; [`Engine::finish_checkpoint`] tells when all of them are durable. A
//! device serialised late reflects more records than the checkpoint's start, which is harmless:
//! what matters is that every record before the start is in a durable file. An eviction of a
//! device being written waits for that write, so files never go back in time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use generator::records::{rfc3339, InputRecord};
use htm::network::{Inference, Network};
use rayon::prelude::*;
use serde_json::{Map, Value};
use tracing::info;

use crate::allocator::in_network_heap;
use crate::config::{BatchConfig, Config, Processing};
use crate::store::{DeviceCheckpoint, DirStore};

/// One input message, as consumed.
#[derive(Clone, Debug, PartialEq)]
pub struct InMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// How the next batch is read (see [`Engine::batch_limits`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchLimits {
    pub max_records: usize,
    /// Longest wait for the batch to fill.
    pub max_wait: Duration,
    /// Once a record came, the batch ends when no other comes within this.
    pub gap: Duration,
}

impl BatchLimits {
    /// The gap of a normal batch: it takes what is already buffered.
    pub const GAP: Duration = Duration::from_millis(5);
}

/// What becomes of one input message.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// An enriched record for the output topic.
    Enriched {
        partition: i32,
        offset: i64,
        device: String,
        payload: Vec<u8>,
        is_anomaly: bool,
    },
    /// A record that cannot be processed, for the dead-letter topic with its reason.
    DeadLetter {
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        reason: String,
    },
    /// Already reflected in the device's restored checkpoint (a replay after a crash between
    /// checkpoint and offset commit): its enriched record was produced before.
    AlreadyProcessed { partition: i32, offset: i64 },
}

impl Outcome {
    pub fn partition_offset(&self) -> (i32, i64) {
        match self {
            Outcome::Enriched {
                partition, offset, ..
            }
            | Outcome::DeadLetter {
                partition, offset, ..
            }
            | Outcome::AlreadyProcessed { partition, offset } => (*partition, *offset),
        }
    }
}

/// A device's records in a batch: (index in the batch, record), in offset order.
type DeviceRecords = Vec<(usize, InputRecord)>;

struct Device {
    network: Network,
    /// Offset of the last record the network processed.
    offset: i64,
    dirty: bool,
    /// Batch number of the last use, for least-recently-used eviction.
    last_used: u64,
    /// Heap bytes of the network after its last use.
    bytes: usize,
}

impl Device {
    /// Its network's checkpoint, stamped with the offset it reflects.
    fn checkpoint(&self, partition: i32, device: String) -> DeviceCheckpoint {
        DeviceCheckpoint {
            device,
            partition,
            offset: self.offset,
            network: self.network.to_bytes(),
        }
    }
}

/// Checkpointing figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CheckpointStats {
    pub devices: usize,
    pub bytes: usize,
}

/// A checkpoint whose files a background thread is writing.
struct Writing {
    /// The devices it writes: one of them evicted meanwhile must wait for it, or its newer
    /// file could be overwritten by this older state.
    devices: HashSet<(i32, String)>,
    /// Serialised bytes it holds until written.
    bytes: usize,
    /// Its result (in a mutex only so that the engine stays `Sync`).
    done: Mutex<Receiver<Result<CheckpointStats>>>,
}

/// Checkpoint files written at once (fsync-bound, not CPU-bound). The writers are long-lived:
/// a thread per write would leave the allocator a heap per short-lived thread to reclaim.
const WRITER_THREADS: usize = 4;
/// Evicted networks serialised and written together: bounds the transient buffers.
const EVICTION_CHUNK: usize = 32;

/// Per-device networks of the partitions this instance owns.
pub struct Engine {
    config: Arc<Config>,
    store: DirStore,
    /// partition → device → state. A device lives in exactly one partition (its key's).
    partitions: BTreeMap<i32, HashMap<String, Device>>,
    pool: rayon::ThreadPool,
    /// Checkpoint file writers.
    io: Arc<rayon::ThreadPool>,
    restored: u64,
    evicted: u64,
    /// Batches processed: the clock of least-recently-used eviction.
    batches: u64,
    /// Whether a device not in memory is looked up in the per-device checkpoint directory
    /// (at least once). Exactly-once processing restores whole partitions from partition
    /// snapshots instead (`restore_partition`): there the directory is only a spill area for
    /// networks evicted by the memory bounds, trusted only through `spilled`.
    lazy_restore: bool,
    /// Devices evicted during this process's life, with the offset their written network
    /// reflects: reopening one must find exactly that, never a missing or older file (which
    /// would silently start the device over). Exactly once, a spill file not listed here (left
    /// by an earlier process, or of a partition rewound since) may hold uncommitted state and
    /// is never read.
    spilled: HashMap<(i32, String), i64>,
    /// Devices of the checkpoint in progress not serialised yet (`None`: none in progress).
    round: Option<VecDeque<(i32, String)>>,
    /// Background writes of the checkpoint's serialised devices.
    writing: Vec<Writing>,
    /// Combined result of the writes joined so far, not yet collected.
    written: Option<Result<CheckpointStats>>,
    /// The resident set when the engine started, before any network.
    rss_baseline: Option<usize>,
    /// The resident set's peaks, sampled under a byte bound.
    rss_peak: Option<crate::allocator::ResidentPeak>,
    /// Bytes the process gained beyond its networks' own (pages the allocator keeps around
    /// freed blocks, the batch's records and outputs), as of the last wave: taken out of
    /// `memory.max_mb`.
    overhead: usize,
    /// Under memory pressure, the records the next batch may take (see
    /// [`Engine::batch_limits`]); `None` when batches keep to `batch.max_records`.
    pressure: Option<usize>,
}

impl Engine {
    pub fn new(config: Arc<Config>) -> Result<Self> {
        let lazy_restore = config.processing == Processing::AtLeastOnce;
        let store = if lazy_restore {
            DirStore::open(&config.checkpoint.dir)?
        } else {
            DirStore::open_scratch(&config.checkpoint.dir.join("spill"))?
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers)
            .thread_name(|i| format!("htm-worker-{i}"))
            .build()?;
        let io = rayon::ThreadPoolBuilder::new()
            .num_threads(WRITER_THREADS)
            .thread_name(|i| format!("checkpoint-writer-{i}"))
            .build()?;
        let rss_peak = (config.memory.max_mb > 0)
            .then(crate::allocator::ResidentPeak::start)
            .flatten();
        Ok(Engine {
            config,
            store,
            partitions: BTreeMap::new(),
            pool,
            io: Arc::new(io),
            restored: 0,
            evicted: 0,
            batches: 0,
            lazy_restore,
            spilled: HashMap::new(),
            round: None,
            writing: Vec::new(),
            written: None,
            rss_baseline: crate::allocator::resident_bytes(),
            rss_peak,
            overhead: 0,
            pressure: None,
        })
    }

    /// Bytes the process held beyond its start and its networks' own bytes at the resident
    /// set's peak before the last wave of networks (measured only under a byte bound).
    pub fn memory_overhead(&self) -> usize {
        self.overhead
    }

    /// Networks in memory.
    pub fn devices(&self) -> usize {
        self.partitions.values().map(HashMap::len).sum()
    }

    /// Networks restored from checkpoints so far.
    pub fn restored(&self) -> u64 {
        self.restored
    }

    /// Networks dropped from memory to stay within the memory bounds so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Heap bytes of the networks in memory (as of their last use).
    pub fn resident_bytes(&self) -> usize {
        self.partitions
            .values()
            .flat_map(|d| d.values())
            .map(|d| d.bytes)
            .sum()
    }

    /// Processes a batch; returns one outcome per message, in the batch's order (so every
    /// partition's outcomes are in offset order).
    pub fn process(&mut self, batch: &[InMessage]) -> Result<Vec<Outcome>> {
        let started = Instant::now();
        let threshold = self.config.likelihood_threshold;
        let restored_before = self.restored;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        // Decode, and group record indices by device, keeping batch (= offset) order.
        let mut groups: HashMap<(i32, String), DeviceRecords> = HashMap::new();
        let mut group_order: Vec<(i32, String)> = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match decode(m) {
                Ok(rec) => {
                    let k = (m.partition, rec.device_id.clone());
                    let g = groups.entry(k.clone()).or_default();
                    if g.is_empty() {
                        group_order.push(k);
                    }
                    g.push((i, rec));
                }
                Err(reason) => {
                    outcomes[i] = Some(Outcome::DeadLetter {
                        partition: m.partition,
                        offset: m.offset,
                        key: m.key.clone(),
                        payload: m.payload.clone(),
                        reason,
                    })
                }
            }
        }
        // Networks in memory go first: a later wave's restores may evict them.
        group_order
            .sort_by_key(|(p, d)| !self.partitions.get(p).is_some_and(|m| m.contains_key(d)));
        // Devices are computed in waves small enough for the memory bounds; a device's records
        // of the batch all fall in one wave, so its order is kept.
        let wave = self.wave_size();
        let evicted_before = self.evicted;
        for devices in group_order.chunks(wave) {
            self.batches += 1;
            let now = self.batches;
            // Make room before the wave, so the bounds hold while it computes too; the wave's
            // devices in memory are marked used so they stay.
            let mut incoming = 0;
            for (p, d) in devices {
                match self.partitions.get_mut(p).and_then(|m| m.get_mut(d)) {
                    Some(state) => state.last_used = now,
                    None => incoming += 1,
                }
            }
            // What the process holds besides networks grows within a batch (its outputs,
            // checkpoints in flight): measured before every wave, not only between batches.
            // Only here, so the last wave's peak still counts for the next batch's first.
            self.measure_overhead();
            let average = self.resident_bytes().checked_div(self.devices());
            self.enforce_memory_bounds(now, incoming, incoming * average.unwrap_or(0))?;
            self.compute_wave(batch, devices, &groups, threshold, &mut outcomes)?;
            // Networks grow as they learn.
            self.enforce_memory_bounds(now, 0, 0)?;
        }
        if self.evicted != evicted_before {
            // Evicted networks were freed on writer threads; let compute threads settle them.
            self.pool
                .broadcast(|_| crate::allocator::collect_freed_by_other_threads());
        }
        let restores = self.restored - restored_before;
        let limits = &self.config.batch;
        let records = batch.len();
        let pressure = under_pressure(self.pressure.is_some(), records, restores, limits)
            .then(|| grown_batch(records, started.elapsed(), limits));
        match (self.pressure, pressure) {
            (None, Some(next)) => info!(records, restores, next, "memory pressure: batches grow"),
            (Some(_), None) => info!(
                records,
                restores, "memory pressure over: batches shrink back"
            ),
            _ => {}
        }
        self.pressure = pressure;
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every message has an outcome"))
            .collect())
    }

    /// Updates [`Engine::memory_overhead`] from the resident set's peak since the last
    /// measurement (only under a byte bound), so that the bound holds for the peaks rather
    /// than for the quieter moments between waves.
    fn measure_overhead(&mut self) {
        if let (Some(base), Some(peak)) = (self.rss_baseline, &self.rss_peak) {
            self.overhead = peak
                .take()
                .saturating_sub(base)
                .saturating_sub(self.resident_bytes());
        }
    }

    /// Limits for the next batch: `batch.max_records`, or under memory pressure a larger batch
    /// (see [`grown_batch`]), with waits to fill it that prefer a full batch.
    pub fn batch_limits(&self) -> BatchLimits {
        let normal = &self.config.batch;
        let Some(records) = self.pressure else {
            return BatchLimits {
                max_records: normal.max_records,
                max_wait: Duration::from_millis(normal.max_wait_ms),
                gap: BatchLimits::GAP,
            };
        };
        let scale = records as f64 / normal.max_records as f64;
        let wait = (normal.max_wait_ms as f64 * scale).clamp(normal.max_wait_ms as f64, 10_000.0);
        BatchLimits {
            max_records: records,
            max_wait: Duration::from_millis(wait as u64),
            // Rides over the pause between two fetches of a backlog.
            gap: Duration::from_millis(100),
        }
    }

    /// How many devices one wave may hold: all of them without memory bounds, else half of what
    /// the bounds allow, so the previous wave's networks can stay if there is room.
    fn wave_size(&self) -> usize {
        let m = &self.config.memory;
        let by_count = match m.max_networks {
            0 => usize::MAX,
            n => (n / 2).max(1),
        };
        let devices = self.devices();
        let average = self.resident_bytes().checked_div(devices).unwrap_or(0);
        let by_bytes = match (m.max_mb, average) {
            (0, _) => usize::MAX,
            // No network measured yet: one device, then waves sized from its size.
            (_, 0) => 1,
            (_, avg) => (self.max_bytes() / avg / 2).max(1),
        };
        by_count.min(by_bytes)
    }

    /// Restores or creates the wave's networks, then computes them in parallel.
    fn compute_wave(
        &mut self,
        batch: &[InMessage],
        wave: &[(i32, String)],
        groups: &HashMap<(i32, String), DeviceRecords>,
        threshold: f64,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<()> {
        let now = self.batches;
        self.ensure_devices(wave, groups)?;
        let members: HashSet<&(i32, String)> = wave.iter().collect();
        // Compute: devices in parallel, each device's records in order.
        let mut work: Vec<(&mut Device, &DeviceRecords, i32)> = Vec::new();
        for (&partition, devices) in self.partitions.iter_mut() {
            for (device, state) in devices.iter_mut() {
                let key = (partition, device.clone());
                if members.contains(&key) {
                    work.push((state, &groups[&key], partition));
                }
            }
        }
        let results: Vec<Vec<(usize, Outcome)>> = self.pool.install(|| {
            work.into_par_iter()
                .map(|(state, records, partition)| {
                    state.last_used = now;
                    let out: Vec<(usize, Outcome)> = records
                        .iter()
                        .map(|(i, rec)| {
                            let offset = batch[*i].offset;
                            if offset <= state.offset {
                                return (*i, Outcome::AlreadyProcessed { partition, offset });
                            }
                            let (ts, value) = htm_input(rec);
                            let network = &mut state.network;
                            let computed = in_network_heap(|| network.compute(ts, value));
                            let inf = match computed {
                                Ok(inf) => inf,
                                Err(e) => {
                                    let m = &batch[*i];
                                    let outcome = Outcome::DeadLetter {
                                        partition,
                                        offset,
                                        key: m.key.clone(),
                                        payload: m.payload.clone(),
                                        reason: e.to_string(),
                                    };
                                    return (*i, outcome);
                                }
                            };
                            state.offset = offset;
                            state.dirty = true;
                            // A fresh stream's running range is narrow, so spatial anomalies
                            // only count once the likelihood has left probation.
                            let is_anomaly = inf.likelihood >= threshold
                                || (inf.spatial_anomaly && state.network.likelihood_ready());
                            let payload = enriched_json(rec, &inf, is_anomaly, partition, offset);
                            let outcome = Outcome::Enriched {
                                partition,
                                offset,
                                device: rec.device_id.clone(),
                                payload,
                                is_anomaly,
                            };
                            (*i, outcome)
                        })
                        .collect();
                    state.bytes = state.network.heap_bytes();
                    out
                })
                .collect()
        });
        for (i, o) in results.into_iter().flatten() {
            outcomes[i] = Some(o);
        }
        Ok(())
    }

    /// Makes sure every device of the wave has its one network: in memory, restored, or new.
    /// Missing ones are opened in parallel (building or decoding a network takes milliseconds).
    fn ensure_devices(
        &mut self,
        wave: &[(i32, String)],
        groups: &HashMap<(i32, String), DeviceRecords>,
    ) -> Result<()> {
        let missing: Vec<&(i32, String)> = wave
            .iter()
            .filter(|(p, d)| !self.partitions.get(p).is_some_and(|m| m.contains_key(d)))
            .collect();
        let spilled: Vec<Option<i64>> = missing.iter().map(|k| self.spilled.remove(k)).collect();
        let opened: Vec<Result<(Device, bool)>> = self.pool.install(|| {
            missing
                .par_iter()
                .zip(spilled)
                .map(|(key, spilled)| {
                    let first = &groups[key][0].1;
                    self.open_device(key.0, &key.1, first, spilled)
                })
                .collect()
        });
        for (key, opened) in missing.into_iter().zip(opened) {
            let (state, restored) = opened?;
            self.restored += u64::from(restored);
            self.partitions
                .entry(key.0)
                .or_default()
                .insert(key.1.clone(), state);
        }
        Ok(())
    }

    /// A device's network from its checkpoint (true) or new from the configured preset.
    fn open_device(
        &self,
        partition: i32,
        device: &str,
        first: &InputRecord,
        spilled: Option<i64>,
    ) -> Result<(Device, bool)> {
        let topic = &self.config.topics.input;
        let stored = if self.lazy_restore || spilled.is_some() {
            self.store.load(topic, partition, device)?
        } else {
            None
        };
        if let Some(expected) = spilled {
            let found = stored.as_ref().map(|cp| cp.offset);
            anyhow::ensure!(
                found == Some(expected),
                "evicted network of device {device:?} of partition {partition} should reflect \
                 offset {expected}, found {}",
                found.map_or("no network".into(), |o| format!("offset {o}"))
            );
        }
        let restored = stored.is_some();
        let (network, offset) = match stored {
            Some(cp) => {
                let network =
                    in_network_heap(|| Network::from_bytes(&cp.network)).with_context(|| {
                        format!("restoring device {device:?} of partition {partition}")
                    })?;
                (network, cp.offset)
            }
            None => {
                let code = first.fields.as_ref().map(|f| f.parameter_code.as_str());
                let params = self.config.network_params(Some(device), code)?;
                (in_network_heap(|| Network::new(params))?, -1)
            }
        };
        let state = Device {
            bytes: network.heap_bytes(),
            network,
            offset,
            dirty: false,
            last_used: self.batches,
        };
        Ok((state, restored))
    }

    /// Checkpoints every device that changed since its last checkpoint, in the given
    /// partitions (all when `None`), and returns once the files are durable (after any
    /// checkpoint in progress). Cost follows the devices that changed, not all devices.
    pub fn checkpoint_dirty(&mut self, only: Option<&[i32]>) -> Result<CheckpointStats> {
        let mut stats = self
            .finish_checkpoint(true)
            .transpose()?
            .unwrap_or_default();
        self.begin_checkpoint(only);
        let now = self
            .finish_checkpoint(true)
            .transpose()?
            .unwrap_or_default();
        stats.devices += now.devices;
        stats.bytes += now.bytes;
        Ok(stats)
    }

    /// Starts a checkpoint of every device changed so far (in `only` partitions, or all):
    /// nothing is serialised yet, see [`Engine::advance_checkpoint`]. Completes a checkpoint
    /// still in progress first, so a device's files are written in order.
    pub fn begin_checkpoint(&mut self, only: Option<&[i32]>) {
        self.complete_checkpoint();
        let queue = self
            .partitions
            .iter()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .flat_map(|(&p, devices)| {
                devices
                    .iter()
                    .filter(|(_, d)| d.dirty)
                    .map(move |(k, _)| (p, k.clone()))
            })
            .collect();
        self.round = Some(queue);
    }

    /// Serialises devices of the checkpoint in progress, in parallel, for about `slice` (all
    /// that are left when `None`), and starts a background write of them. The serialised
    /// networks wait in memory for the writer: past the room the memory bound leaves, they
    /// are written at once instead.
    pub fn advance_checkpoint(&mut self, slice: Option<Duration>) -> Result<()> {
        let in_flight: usize = self.writing.iter().map(|w| w.bytes).sum();
        let room = self
            .max_bytes()
            .saturating_sub(self.resident_bytes() + in_flight);
        let Some(queue) = self.round.as_mut() else {
            return Ok(());
        };
        let started = Instant::now();
        let (store, topic, io) = (&self.store, &self.config.topics.input, &self.io);
        // Enough devices per step to keep every worker busy, few enough to stop near `slice`.
        let step = self.pool.current_num_threads();
        let mut checkpoints: Vec<DeviceCheckpoint> = Vec::new();
        let mut held = 0;
        let mut written = CheckpointStats::default();
        let mut result = Ok(());
        // At least one step per call, so a checkpoint always progresses.
        let mut first = true;
        while !queue.is_empty() && (first || slice.is_none_or(|s| started.elapsed() < s)) {
            first = false;
            // Taken out of their maps to be serialised in parallel, then put back. A device
            // evicted since the start was written then; one of a revoked partition is no
            // longer ours.
            let mut jobs: Vec<(i32, String, Device)> = Vec::new();
            while jobs.len() < step {
                let Some((p, k)) = queue.pop_front() else {
                    break;
                };
                let Some(devices) = self.partitions.get_mut(&p) else {
                    continue;
                };
                if devices.get(&k).is_some_and(|d| d.dirty) {
                    let state = devices.remove(&k).expect("present");
                    jobs.push((p, k, state));
                }
            }
            let serialised: Vec<DeviceCheckpoint> = self.pool.install(|| {
                jobs.par_iter_mut()
                    .map(|(partition, device, state)| {
                        state.dirty = false;
                        state.checkpoint(*partition, device.clone())
                    })
                    .collect()
            });
            for (p, k, state) in jobs {
                self.partitions.entry(p).or_default().insert(k, state);
            }
            held += serialised.iter().map(|c| c.network.len()).sum::<usize>();
            checkpoints.extend(serialised);
            if held > room {
                match write_checkpoints(io, store, topic, &checkpoints) {
                    Ok(now) => {
                        written.devices += now.devices;
                        written.bytes += now.bytes;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                checkpoints.clear();
                held = 0;
            }
        }
        if queue.is_empty() {
            self.round = None;
            // A checkpoint with nothing to write still completes.
            self.add_written(Ok(CheckpointStats::default()));
        }
        if written.devices > 0 {
            self.add_written(Ok(written));
        }
        result?;
        if !checkpoints.is_empty() {
            let devices = checkpoints
                .iter()
                .map(|c| (c.partition, c.device.clone()))
                .collect();
            let store = self.store.clone();
            let topic = self.config.topics.input.clone();
            let io = self.io.clone();
            let (tx, done) = std::sync::mpsc::channel();
            self.io.spawn(move || {
                // The receiver may be gone only when the engine is: nothing left to tell.
                let _ = tx.send(write_checkpoints(&io, &store, &topic, &checkpoints));
            });
            self.writing.push(Writing {
                devices,
                bytes: held,
                done: Mutex::new(done),
            });
        }
        Ok(())
    }

    /// The combined result of the checkpoint in progress once all its devices are durable:
    /// `None` while some are still to serialise or being written (unless `wait`, which
    /// completes it now), or when there is nothing to collect.
    pub fn finish_checkpoint(&mut self, wait: bool) -> Option<Result<CheckpointStats>> {
        if wait {
            self.complete_checkpoint();
        } else {
            let mut running = Vec::new();
            for mut w in std::mem::take(&mut self.writing) {
                let done = w.done.get_mut().unwrap_or_else(|e| e.into_inner());
                match done.try_recv() {
                    Ok(result) => self.add_written(result),
                    Err(TryRecvError::Empty) => running.push(w),
                    Err(TryRecvError::Disconnected) => self.add_written(Err(writer_panicked())),
                }
            }
            self.writing = running;
        }
        if self.round.is_some() || !self.writing.is_empty() {
            return None;
        }
        self.written.take()
    }

    /// Serialises what is left of the checkpoint in progress and waits for every write, keeping
    /// the results (an error included) for `finish_checkpoint`.
    fn complete_checkpoint(&mut self) {
        if let Err(e) = self.advance_checkpoint(None) {
            self.add_written(Err(e));
        }
        self.join_writing();
    }

    /// Waits for every background write, keeping the results for `finish_checkpoint`.
    fn join_writing(&mut self) {
        for w in std::mem::take(&mut self.writing) {
            self.join(w);
        }
    }

    fn join(&mut self, writing: Writing) {
        let done = writing.done.into_inner().unwrap_or_else(|e| e.into_inner());
        let result = done.recv().unwrap_or_else(|_| Err(writer_panicked()));
        self.add_written(result);
    }

    /// Adds a write's result to those not collected yet: stats add up, the first error stays.
    fn add_written(&mut self, result: Result<CheckpointStats>) {
        self.written = Some(match (self.written.take(), result) {
            (None, r) => r,
            (Some(Err(e)), _) | (Some(Ok(_)), Err(e)) => Err(e),
            (Some(Ok(a)), Ok(b)) => Ok(CheckpointStats {
                devices: a.devices + b.devices,
                bytes: a.bytes + b.bytes,
            }),
        });
    }

    /// The bound on networks' bytes (`usize::MAX` for none): `memory.max_mb` less what the
    /// process holds beyond its networks, so that the resident set stays near its start plus
    /// the budget whatever the allocator keeps around churned networks. At least a quarter of
    /// the budget is left to networks.
    fn max_bytes(&self) -> usize {
        match self.config.memory.max_mb {
            0 => usize::MAX,
            mb => {
                let budget = (mb as usize) << 20;
                budget.saturating_sub(self.overhead).max(budget / 4)
            }
        }
    }

    /// Checkpoints and drops least-recently-used networks until the memory bounds hold with
    /// room for `reserve_count` more networks of `reserve_bytes`. Networks used in the current
    /// wave (`now`) stay, so a bound below one wave's devices is exceeded for that wave rather
    /// than thrashing.
    fn enforce_memory_bounds(
        &mut self,
        now: u64,
        reserve_count: usize,
        reserve_bytes: usize,
    ) -> Result<()> {
        let bounds = &self.config.memory;
        let max_networks = if bounds.max_networks == 0 {
            usize::MAX
        } else {
            bounds.max_networks
        };
        let max_bytes = self.max_bytes();
        let fits = |count: usize, bytes: usize| {
            count + reserve_count <= max_networks && bytes + reserve_bytes <= max_bytes
        };
        let (mut count, mut bytes) = (self.devices(), self.resident_bytes());
        if fits(count, bytes) {
            return Ok(());
        }
        let mut lru: Vec<(u64, i32, String)> = self
            .partitions
            .iter()
            .flat_map(|(&p, d)| d.iter().map(move |(k, v)| (v.last_used, p, k.clone())))
            .filter(|(used, _, _)| *used < now)
            .collect();
        lru.sort();
        let mut victims: Vec<(i32, String, Device)> = Vec::new();
        for (_, partition, device) in lru {
            if fits(count, bytes) {
                break;
            }
            let devices = self
                .partitions
                .get_mut(&partition)
                .expect("listed partition");
            let state = devices.remove(&device).expect("listed device");
            let key = (partition, device);
            if self.writing.iter().any(|w| w.devices.contains(&key)) {
                self.join_writing();
            }
            self.spilled.insert(key.clone(), state.offset);
            count -= 1;
            bytes -= state.bytes;
            self.evicted += 1;
            victims.push((key.0, key.1, state));
            if victims.len() == EVICTION_CHUNK {
                self.write_evicted(std::mem::take(&mut victims))?;
            }
        }
        self.write_evicted(victims)
    }

    /// Writes evicted networks (serialised in parallel, then a few files at a time). Exactly
    /// once, the spill area holds nothing of a device yet, clean or not.
    fn write_evicted(&self, victims: Vec<(i32, String, Device)>) -> Result<()> {
        let lazy_restore = self.lazy_restore;
        let checkpoints: Vec<DeviceCheckpoint> = self.pool.install(|| {
            victims
                .into_par_iter()
                .filter(|(_, _, state)| state.dirty || !lazy_restore)
                .map(|(partition, device, state)| state.checkpoint(partition, device))
                .collect()
        });
        write_checkpoints(
            &self.io,
            &self.store,
            &self.config.topics.input,
            &checkpoints,
        )?;
        Ok(())
    }

    /// Forgets the networks of partitions this instance no longer owns (checkpoint first).
    pub fn drop_partitions(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.remove(p);
        }
        self.spilled.retain(|(p, _), _| !partitions.contains(p));
    }

    /// Partitions with networks in memory.
    pub fn partitions(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// The devices of a partition (in memory or spilled), sorted, each with the offset of the
    /// last record its network processed (-1 for none).
    pub fn device_offsets(&self, partition: i32) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = self
            .partitions
            .get(&partition)
            .map(|d| d.iter().map(|(k, s)| (k.clone(), s.offset)).collect())
            .unwrap_or_default();
        out.extend(
            self.spilled
                .iter()
                .filter(|((p, _), _)| *p == partition)
                .map(|((_, d), off)| (d.clone(), *off)),
        );
        out.sort();
        out
    }

    /// Serialises the networks of the given devices of a partition, in parallel (a spilled one
    /// is read back); `None` for a device this engine does not hold.
    pub fn network_bytes(
        &self,
        partition: i32,
        devices: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let empty = HashMap::new();
        let map = self.partitions.get(&partition).unwrap_or(&empty);
        let topic = &self.config.topics.input;
        self.pool.install(|| {
            devices
                .par_iter()
                .map(|d| {
                    if let Some(s) = map.get(d) {
                        return Ok(Some(s.network.to_bytes()));
                    }
                    let Some(&offset) = self.spilled.get(&(partition, d.clone())) else {
                        return Ok(None);
                    };
                    let cp = self
                        .store
                        .load(topic, partition, d)?
                        .with_context(|| format!("spilled network of device {d:?} is missing"))?;
                    anyhow::ensure!(
                        cp.offset == offset,
                        "spilled network of device {d:?} reflects offset {}, expected {offset}",
                        cp.offset
                    );
                    Ok(Some(cp.network))
                })
                .collect()
        })
    }

    /// Replaces the partition's networks by restored ones, given as (device, offset of the
    /// last record processed, `Network::to_bytes`). All or nothing: an undecodable network is
    /// an error naming it, and then the partition is left empty. Networks are decoded in waves
    /// under the memory bounds; those past them go to the spill area.
    pub fn restore_partition(
        &mut self,
        partition: i32,
        devices: Vec<(String, i64, Vec<u8>)>,
    ) -> Result<()> {
        self.drop_partitions(&[partition]);
        let result = self.restore_waves(partition, devices);
        if result.is_err() {
            self.drop_partitions(&[partition]);
        }
        result
    }

    fn restore_waves(
        &mut self,
        partition: i32,
        mut devices: Vec<(String, i64, Vec<u8>)>,
    ) -> Result<()> {
        while !devices.is_empty() {
            let wave: Vec<_> = devices
                .drain(..self.wave_size().min(devices.len()))
                .collect();
            self.batches += 1;
            let now = self.batches;
            let decoded: Vec<Result<(String, Device)>> = self.pool.install(|| {
                wave.into_par_iter()
                    .map(|(device, offset, bytes)| {
                        let network = in_network_heap(|| Network::from_bytes(&bytes));
                        let network = network.with_context(|| {
                            format!("restoring device {device:?} of partition {partition}")
                        })?;
                        let state = Device {
                            bytes: network.heap_bytes(),
                            network,
                            offset,
                            dirty: false,
                            last_used: now,
                        };
                        Ok((device, state))
                    })
                    .collect()
            });
            let map = self.partitions.entry(partition).or_default();
            for d in decoded {
                let (device, state) = d?;
                map.insert(device, state);
                self.restored += 1;
            }
            // Bumping the clock makes this wave evictable by the next one.
            self.batches += 1;
            self.enforce_memory_bounds(self.batches, 0, 0)?;
        }
        Ok(())
    }
}

/// Whether the batch after one of `records` that restored `restores` networks may grow. It
/// starts after a full batch in which a quarter of the records or more needed a restore (a
/// restore costs about ten records' compute): devices interleave beyond the memory bounds while
/// a backlog is read, and a batch of many records per device restores each network once for
/// all of them. It ends when a batch comes back short of even `max_records` (the backlog is
/// read) or needs no restore (the networks fit).
fn under_pressure(was: bool, records: usize, restores: u64, limits: &BatchConfig) -> bool {
    if limits.pressure_max_records <= limits.max_records {
        return false;
    }
    if was {
        records >= limits.max_records && restores > 0
    } else {
        records >= limits.max_records && restores.saturating_mul(4) >= records as u64
    }
}

/// The records of the next batch under memory pressure, from the last batch's `records` and
/// the time it took: as many as `batch.pressure_batch_secs` allows at its pace, at most twice
/// its records (a bigger batch restores fewer networks per record, so its pace is a guess),
/// within `batch.max_records` and `batch.pressure_max_records`.
fn grown_batch(records: usize, took: Duration, limits: &BatchConfig) -> usize {
    let per_second = records as f64 / took.as_secs_f64().max(1e-3);
    let fits = (per_second * limits.pressure_batch_secs).min(usize::MAX as f64) as usize;
    fits.min(records.saturating_mul(2))
        .min(limits.pressure_max_records)
        .max(limits.max_records)
}

fn writer_panicked() -> anyhow::Error {
    anyhow::anyhow!("a checkpoint writer panicked")
}

/// Writes device checkpoints, a few files at a time, durably when it returns (a partition's
/// directory is synced once for all its files, not once per file).
fn write_checkpoints(
    io: &rayon::ThreadPool,
    store: &DirStore,
    topic: &str,
    checkpoints: &[DeviceCheckpoint],
) -> Result<CheckpointStats> {
    let sizes: Vec<Result<usize>> = io.install(|| {
        checkpoints
            .par_iter()
            .with_max_len(1)
            .map(|cp| store.save_unsynced(topic, cp))
            .collect()
    });
    let mut stats = CheckpointStats::default();
    for s in sizes {
        stats.bytes += s?;
        stats.devices += 1;
    }
    let partitions: BTreeSet<i32> = checkpoints.iter().map(|c| c.partition).collect();
    for p in partitions {
        store.sync_partition(topic, p)?;
    }
    Ok(stats)
}

/// Parses a message into a record; the error is the dead-letter reason.
fn decode(m: &InMessage) -> std::result::Result<InputRecord, String> {
    let payload = m.payload.as_deref().ok_or("empty message value")?;
    let rec = InputRecord::from_json(payload).map_err(|e| format!("undecodable record: {e}"))?;
    let key = m.key.as_deref().ok_or_else(|| {
        format!(
            "message has no key; expected the device id {:?}",
            rec.device_id
        )
    })?;
    if key != rec.device_id.as_bytes() {
        // The key chose the partition: a mismatch could put one device on two partitions.
        return Err(format!(
            "message key {:?} differs from the record's device id {:?}",
            String::from_utf8_lossy(key),
            rec.device_id
        ));
    }
    Ok(rec)
}

/// The (timestamp, value) a network sees. The date encoder wants local wall-clock time: EPA
/// records carry it (dateLocal/timeLocal), others only have UTC.
fn htm_input(rec: &InputRecord) -> (i64, f64) {
    let local = rec.fields.as_ref().and_then(|f| {
        let text = format!("{} {}", f.date_local, f.time_local);
        chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%d %H:%M")
            .ok()
            .map(|t| t.and_utc().timestamp())
    });
    (local.unwrap_or(rec.timestamp), rec.value)
}

/// Input fields + `deviceId`, `timestamp`, `value` + the enrichment, as JSON.
fn enriched_json(
    rec: &InputRecord,
    inf: &Inference,
    is_anomaly: bool,
    partition: i32,
    offset: i64,
) -> Vec<u8> {
    let mut map = match &rec.fields {
        Some(f) => match serde_json::to_value(f) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        None => Map::new(),
    };
    let num = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    let opt = |x: Option<f64>| x.map_or(Value::Null, num);
    map.insert("deviceId".into(), Value::String(rec.device_id.clone()));
    map.insert("timestamp".into(), Value::String(rfc3339(rec.timestamp)));
    map.insert("value".into(), num(rec.value));
    map.insert("prediction".into(), opt(inf.prediction));
    map.insert("error".into(), opt(inf.error));
    map.insert("anomaly".into(), num(inf.raw_anomaly));
    map.insert("predictionNext".into(), opt(inf.prediction_next));
    map.insert("anomalyLikelihood".into(), num(inf.likelihood));
    map.insert("logLikelihood".into(), num(inf.log_likelihood));
    map.insert("spatialAnomaly".into(), Value::Bool(inf.spatial_anomaly));
    map.insert("isAnomaly".into(), Value::Bool(is_anomaly));
    map.insert("partition".into(), Value::from(partition));
    map.insert("offset".into(), Value::from(offset));
    serde_json::to_vec(&Value::Object(map)).expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Arc<Config> {
        let mut c = Config::default();
        c.checkpoint.dir = dir.to_path_buf();
        c.htm.probation = 30;
        c.workers = 2;
        Arc::new(c)
    }

    /// An engine holding at most `max_networks` networks, with further config edits.
    fn bounded_engine(
        dir: &std::path::Path,
        max_networks: usize,
        edit: impl FnOnce(&mut Config),
    ) -> Engine {
        let mut c = (*config(dir)).clone();
        c.memory.max_networks = max_networks;
        edit(&mut c);
        Engine::new(Arc::new(c)).unwrap()
    }

    fn message(partition: i32, offset: i64, device: &str, i: i64, value: f64) -> InMessage {
        let rec = InputRecord {
            device_id: device.into(),
            timestamp: 1_388_534_400 + 3600 * i,
            value,
            fields: None,
        };
        InMessage {
            partition,
            offset,
            key: Some(device.as_bytes().to_vec()),
            payload: Some(rec.to_json().into_bytes()),
        }
    }

    /// Three devices on two partitions, interleaved as a broker would deliver them.
    fn stream(len: i64) -> Vec<InMessage> {
        let mut out = Vec::new();
        let mut offsets = [0i64; 2];
        for i in 0..len {
            for (d, p) in [("a", 0), ("b", 1), ("c", 0)] {
                let v = 50.0
                    + 20.0 * ((i % 24) as f64 / 24.0 * std::f64::consts::TAU).sin()
                    + (d.len() as f64) * (i % 7) as f64;
                out.push(message(p, offsets[p as usize], d, i, v));
                offsets[p as usize] += 1;
            }
        }
        out
    }

    fn enriched(outcomes: &[Outcome]) -> Vec<(i32, i64, String)> {
        outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Enriched {
                    partition,
                    offset,
                    payload,
                    ..
                } => Some((
                    *partition,
                    *offset,
                    String::from_utf8(payload.clone()).unwrap(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_network_per_device_outcomes_in_batch_order_and_bad_input_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::new(config(dir.path())).unwrap();
        let mut batch = stream(40);
        batch.push(InMessage {
            partition: 1,
            offset: 900,
            key: Some(b"x".to_vec()),
            payload: Some(b"{not json".to_vec()),
        });
        let mut wrong_key = message(0, 901, "a", 41, 1.0);
        wrong_key.key = Some(b"b".to_vec());
        batch.push(wrong_key);
        let mut no_key = message(0, 902, "a", 41, 1.0);
        no_key.key = None;
        batch.push(no_key);

        let outcomes = engine.process(&batch).unwrap();
        assert_eq!(outcomes.len(), batch.len());
        for (o, m) in outcomes.iter().zip(&batch) {
            assert_eq!(
                o.partition_offset(),
                (m.partition, m.offset),
                "outcomes follow the batch order"
            );
        }
        assert_eq!(engine.devices(), 3);
        let reasons: Vec<&str> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::DeadLetter { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reasons.len(), 3);
        assert!(reasons[0].contains("undecodable"), "{}", reasons[0]);
        assert!(reasons[1].contains("differs"), "{}", reasons[1]);
        assert!(reasons[2].contains("no key"), "{}", reasons[2]);
        let out = enriched(&outcomes);
        assert_eq!(out.len(), 120);
        let v: Value = serde_json::from_str(&out[0].2).unwrap();
        for field in [
            "deviceId",
            "timestamp",
            "value",
            "prediction",
            "error",
            "anomaly",
            "predictionNext",
            "anomalyLikelihood",
            "logLikelihood",
            "isAnomaly",
            "partition",
            "offset",
        ] {
            assert!(v.get(field).is_some(), "enriched record lacks {field}: {v}");
        }
    }

    #[test]
    fn scores_do_not_depend_on_batching_or_on_a_restore_from_checkpoints() {
        let data = stream(60);
        let reference = uninterrupted(&data);

        // Same stream in small batches, with a checkpoint and a brand-new engine (a restart)
        // after 100 records.
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::new(config(dir.path())).unwrap();
        let mut got = Vec::new();
        for chunk in data[..100].chunks(7) {
            got.extend(enriched(&engine.process(chunk).unwrap()));
        }
        let stats = engine.checkpoint_dirty(None).unwrap();
        assert_eq!(stats.devices, 3);
        assert_eq!(
            engine.checkpoint_dirty(None).unwrap().devices,
            0,
            "nothing changed since"
        );
        drop(engine);
        let mut engine = Engine::new(config(dir.path())).unwrap();
        for chunk in data[100..].chunks(11) {
            got.extend(enriched(&engine.process(chunk).unwrap()));
        }
        assert_eq!(engine.restored(), 3);
        assert_eq!(got, reference);
    }

    #[test]
    fn a_memory_bound_far_below_the_device_count_keeps_scores_bit_identical() {
        let data = stream(20);
        let reference = uninterrupted(&data);

        let dir = tempfile::tempdir().unwrap();
        let mut engine = bounded_engine(dir.path(), 2, |_| {});
        let mut got = Vec::new();
        // Every batch holds all three devices: they are computed one per wave, and the bound
        // holds after every batch.
        for chunk in data.chunks(6) {
            got.extend(enriched(&engine.process(chunk).unwrap()));
            assert!(engine.devices() <= 2);
        }
        // One eviction per batch: the two networks in memory are computed first, then the
        // third is restored in place of the least recently used.
        assert_eq!(engine.evicted(), 10);
        // Every evicted network that saw records again came back from its checkpoint.
        assert!(engine.restored() > 0 && engine.restored() + 3 >= engine.evicted());
        assert_eq!(got, reference);
    }

    #[test]
    fn batches_grow_while_interleaved_devices_thrash_and_scores_stay_bit_identical() {
        let data = stream(31);
        let reference = uninterrupted(&data);
        let dir = tempfile::tempdir().unwrap();
        let mut engine = bounded_engine(dir.path(), 1, |c| {
            c.batch.max_records = 3;
            c.batch.pressure_max_records = 30;
            // Time never limits these tiny batches: they double up to pressure_max_records.
            c.batch.pressure_batch_secs = 3600.0;
        });
        let (mut got, mut sizes) = (Vec::new(), Vec::new());
        let mut rest = &data[..90];
        while !rest.is_empty() {
            let n = engine.batch_limits().max_records.min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            sizes.push(n);
            got.extend(enriched(&engine.process(chunk).unwrap()));
        }
        // The first batch creates the networks; the second restores two of its three: pressure.
        assert_eq!(sizes, [3, 3, 6, 12, 24, 30, 12]);
        // Each batch restores the two networks it does not hold once, not once per record.
        assert_eq!(engine.restored(), 12);
        // A batch short of max_records: the backlog is read, batches shrink back.
        got.extend(enriched(&engine.process(&data[90..92]).unwrap()));
        assert_eq!(engine.batch_limits().max_records, 3);
        got.extend(enriched(&engine.process(&data[92..]).unwrap()));
        assert_eq!(got, reference);
    }

    #[test]
    fn an_evicted_network_whose_file_went_missing_is_an_error_not_a_fresh_start() {
        let data = stream(4);
        let dir = tempfile::tempdir().unwrap();
        let mut engine = bounded_engine(dir.path(), 1, |_| {});
        engine.process(&data[..3]).unwrap();
        assert_eq!(engine.evicted(), 2);
        // Device "a" (partition 0) was evicted first; its file disappears.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("telemetry-0"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() == "a.ckpt")
            .collect();
        assert_eq!(files.len(), 1);
        std::fs::remove_file(&files[0]).unwrap();
        let err = engine.process(&data[3..]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("\"a\"") && msg.contains("no network"), "{msg}");
    }

    #[test]
    fn grown_batches_keep_to_the_time_set_for_them() {
        let limits = BatchConfig {
            max_records: 5000,
            max_wait_ms: 200,
            pressure_max_records: 100_000,
            pressure_batch_secs: 5.0,
        };
        let secs = Duration::from_secs_f64;
        // Fast: at most twice the last batch, whatever its pace would allow.
        assert_eq!(grown_batch(5000, secs(0.5), &limits), 10_000);
        // At 2,500 records/s, 5 s hold 12,500 records.
        assert_eq!(grown_batch(10_000, secs(4.0), &limits), 12_500);
        // Slower than the target: shrinks, but never below max_records.
        assert_eq!(grown_batch(40_000, secs(20.0), &limits), 10_000);
        assert_eq!(grown_batch(10_000, secs(60.0), &limits), 5000);
        // Never beyond pressure_max_records.
        assert_eq!(grown_batch(80_000, secs(1.0), &limits), 100_000);
        assert_eq!(grown_batch(80_000, Duration::ZERO, &limits), 100_000);
    }

    #[test]
    fn pressure_needs_full_thrashing_batches_and_ends_when_short_or_fitting() {
        let limits = BatchConfig {
            max_records: 100,
            max_wait_ms: 200,
            pressure_max_records: 1000,
            pressure_batch_secs: 5.0,
        };
        assert!(!under_pressure(false, 100, 24, &limits), "few restores");
        assert!(under_pressure(false, 100, 25, &limits));
        assert!(
            !under_pressure(false, 99, 99, &limits),
            "a short batch is no backlog"
        );
        assert!(under_pressure(true, 1000, 1, &limits));
        assert!(under_pressure(true, 100, 1, &limits));
        assert!(!under_pressure(true, 99, 50, &limits), "backlog read");
        assert!(!under_pressure(true, 1000, 0, &limits), "networks fit");
        let off = BatchConfig {
            pressure_max_records: 100,
            ..limits
        };
        assert!(!under_pressure(false, 100, 100, &off));
    }

    #[test]
    fn background_checkpoints_and_evictions_leave_the_newest_state_on_disk() {
        let data = stream(40);
        let reference = uninterrupted(&data);
        let dir = tempfile::tempdir().unwrap();
        let mut c = (*config(dir.path())).clone();
        c.memory.max_networks = 1;
        let c = Arc::new(c);
        let mut engine = Engine::new(c.clone()).unwrap();
        let mut got = Vec::new();
        let mut written = 0;
        for chunk in data[..90].chunks(5) {
            got.extend(enriched(&engine.process(chunk).unwrap()));
            // A checkpoint starts after every batch; the next batch evicts the device it is
            // writing, which must not let the older state land after the newer one.
            engine.begin_checkpoint(None);
            engine.advance_checkpoint(Some(Duration::ZERO)).unwrap();
            if let Some(done) = engine.finish_checkpoint(false) {
                written += done.unwrap().devices;
            }
        }
        written += engine
            .finish_checkpoint(true)
            .map_or(0, |d| d.unwrap().devices);
        assert!(written > 0);
        assert!(engine.finish_checkpoint(true).is_none(), "all collected");
        drop(engine);
        let mut engine = Engine::new(c).unwrap();
        for chunk in data[90..].chunks(7) {
            got.extend(enriched(&engine.process(chunk).unwrap()));
        }
        assert!(
            engine.restored() >= 3,
            "every device restarts from its file"
        );
        assert_eq!(got, reference);
    }

    #[test]
    fn a_checkpoint_spread_over_batches_covers_every_record_before_its_start() {
        let data = stream(40);
        let reference: HashMap<(i32, i64), String> = uninterrupted(&data)
            .into_iter()
            .map(|(p, o, e)| ((p, o), e))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let mut engine = Engine::new(c.clone()).unwrap();
        let mut got = enriched(&engine.process(&data[..45]).unwrap());
        let mut start: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &data[..45] {
            start.insert(m.partition, m.offset + 1);
        }
        engine.begin_checkpoint(None);
        // One step (two devices, one per worker) per slice: the third device is serialised
        // after the next batch, so its file reflects records past the start.
        engine.advance_checkpoint(Some(Duration::ZERO)).unwrap();
        assert!(
            engine.finish_checkpoint(false).is_none(),
            "a device is left"
        );
        got.extend(enriched(&engine.process(&data[45..60]).unwrap()));
        engine.advance_checkpoint(Some(Duration::ZERO)).unwrap();
        let done = engine.finish_checkpoint(true).expect("complete").unwrap();
        assert_eq!(done.devices, 3);
        assert!(engine.finish_checkpoint(true).is_none(), "all collected");

        // Crash after committing the positions of the start: replay from them.
        drop(engine);
        let mut engine = Engine::new(c).unwrap();
        let replay: Vec<InMessage> = data
            .iter()
            .filter(|m| m.offset >= start[&m.partition])
            .cloned()
            .collect();
        let outcomes = engine.process(&replay).unwrap();
        let skipped = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::AlreadyProcessed { .. }))
            .count();
        assert_eq!(skipped, 5, "the late device's records of the second batch");
        got.extend(enriched(&outcomes));
        let mut covered = HashSet::new();
        for (p, o, e) in got {
            assert_eq!(reference[&(p, o)], e, "partition {p} offset {o}");
            covered.insert((p, o));
        }
        assert_eq!(covered.len(), reference.len(), "every record enriched");
    }

    /// The enriched records of one engine fed the whole stream in one batch.
    fn uninterrupted(data: &[InMessage]) -> Vec<(i32, i64, String)> {
        let dir = tempfile::tempdir().unwrap();
        enriched(
            &Engine::new(config(dir.path()))
                .unwrap()
                .process(data)
                .unwrap(),
        )
    }

    /// Exactly once: what a partition snapshot would hold, spilled networks included.
    fn snapshot(engine: &Engine, partition: i32) -> Vec<(String, i64, Vec<u8>)> {
        let devices = engine.device_offsets(partition);
        let names: Vec<String> = devices.iter().map(|(d, _)| d.clone()).collect();
        let bytes = engine.network_bytes(partition, &names).unwrap();
        devices
            .into_iter()
            .zip(bytes)
            .map(|((d, off), b)| (d, off, b.expect("every listed device has bytes")))
            .collect()
    }

    #[test]
    fn exactly_once_memory_bounds_spill_into_snapshots_and_never_reuse_stale_spills() {
        let data = stream(40);
        let reference = uninterrupted(&data);

        let dir = tempfile::tempdir().unwrap();
        let mut c = (*config(dir.path())).clone();
        c.processing = Processing::ExactlyOnce;
        c.memory.max_networks = 1;
        let c = Arc::new(c);
        let mut engine = Engine::new(c.clone()).unwrap();
        let mut got = Vec::new();
        for chunk in data[..60].chunks(6) {
            got.extend(enriched(&engine.process(chunk).unwrap()));
            assert!(engine.devices() <= 1);
        }
        assert!(engine.evicted() > 10, "evictions: {}", engine.evicted());
        // Partition 0 holds devices a and c, at most one of them in memory: the snapshot
        // still lists both.
        let snapshots = [snapshot(&engine, 0), snapshot(&engine, 1)];
        assert_eq!(snapshots[0].len(), 2);
        assert_eq!(snapshots[1].len(), 1);
        // Work that never commits: it overwrites the spill files with newer state.
        engine.process(&data[60..90]).unwrap();
        drop(engine);

        // A new process restores the snapshots (under the bound) and continues from them;
        // the newer spill files on disk are not its own and must not be read.
        let mut engine = Engine::new(c).unwrap();
        for (p, devices) in snapshots.into_iter().enumerate() {
            engine.restore_partition(p as i32, devices).unwrap();
            assert!(engine.devices() <= 1);
        }
        assert_eq!(engine.device_offsets(0).len(), 2);
        for chunk in data[60..].chunks(9) {
            got.extend(enriched(&engine.process(chunk).unwrap()));
        }
        assert_eq!(got, reference);
    }

    #[test]
    fn records_already_in_a_checkpoint_are_not_learned_twice() {
        let data = stream(30);
        let reference = uninterrupted(&data);

        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::new(config(dir.path())).unwrap();
        engine.process(&data[..60]).unwrap();
        engine.checkpoint_dirty(None).unwrap();
        drop(engine); // crash before the offsets were committed: replay from record 45
        let mut engine = Engine::new(config(dir.path())).unwrap();
        let outcomes = engine.process(&data[45..]).unwrap();
        let skipped = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::AlreadyProcessed { .. }))
            .count();
        assert_eq!(skipped, 15);
        assert_eq!(enriched(&outcomes), reference[60..].to_vec());
    }
}
