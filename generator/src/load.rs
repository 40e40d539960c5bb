//! Kafka producer: streams records into a keyed topic, one device per key, on the partition the
//! Java client's default partitioner would pick, with pacing, progress and bad-row accounting.
//!
//! The producer is a `BaseProducer` driven from the calling thread: delivery reports are served by
//! the same `poll` calls that pace the load, so there are no extra threads to coordinate and a
//! pause never busy-waits.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{self, IsTerminal, Read};
use std::num::NonZeroU32;
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;

use crate::partitioner::partition_for_key;
use crate::records::{InputRecord, RowError};

/// Bad rows logged individually; the rest are only counted.
pub const LOGGED_BAD_ROWS: usize = 20;
/// Bad rows kept in [`LoadSummary::bad_row_samples`].
pub const KEPT_BAD_ROWS: usize = 100;

/// How fast to send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    /// A steady number of records per second.
    RecordsPerSec(f64),
    /// Replay the data's own timestamps this many times faster than real time, measured from the
    /// first record's timestamp (records dated earlier than the send position go at once).
    Speedup(f64),
}

/// Where and how to load.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// `bootstrap.servers`, e.g. `localhost:9092`.
    pub bootstrap_servers: String,
    /// Destination topic.
    pub topic: String,
    /// Partitions for a topic this loader creates (an existing topic keeps its own count).
    pub partitions: i32,
    /// Replication factor for a topic this loader creates.
    pub replication_factor: i32,
    /// Pacing; `None` sends as fast as the broker accepts.
    pub rate: Option<Rate>,
    /// Extra librdkafka properties passed verbatim (SASL, SSL, batching...); they override the
    /// loader's own settings.
    pub kafka: BTreeMap<String, String>,
    /// Create the topic when it does not exist (otherwise a missing topic is an error).
    pub create_topic: bool,
    /// Show a progress bar (only ever drawn when stderr is a terminal).
    pub progress: bool,
    /// Bound on reaching the cluster and on topic creation.
    pub connect_timeout: Duration,
}

impl LoadOptions {
    /// Defaults (10 partitions, replication 1, unpaced, create the topic, progress on, 10 s
    /// connect timeout) for the given cluster and topic.
    pub fn new(bootstrap_servers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            topic: topic.into(),
            partitions: 10,
            replication_factor: 1,
            rate: None,
            kafka: BTreeMap::new(),
            create_topic: true,
            progress: true,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Checks every option, naming the offending one.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |what: String| Err(LoadError::Options(what));
        if self.bootstrap_servers.trim().is_empty() {
            return bad("bootstrap_servers is empty".into());
        }
        if self.topic.is_empty() || self.topic.len() > 249 {
            return bad(format!(
                "topic must be 1 to 249 characters, got {:?}",
                self.topic
            ));
        }
        if let Some(c) = self
            .topic
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return bad(format!(
                "topic {:?} contains {c:?}; Kafka allows only ASCII letters, digits, '.', '_' and '-'",
                self.topic
            ));
        }
        if self.partitions < 1 {
            return bad(format!("partitions must be >= 1, got {}", self.partitions));
        }
        if self.replication_factor < 1 {
            return bad(format!(
                "replication_factor must be >= 1, got {}",
                self.replication_factor
            ));
        }
        match self.rate {
            Some(Rate::RecordsPerSec(r)) if !(r.is_finite() && r > 0.0) => {
                return bad(format!(
                    "rate must be a positive number of records/s, got {r}"
                ));
            }
            Some(Rate::Speedup(s)) if !(s.is_finite() && s > 0.0) => {
                return bad(format!("speedup must be a positive factor, got {s}"));
            }
            _ => {}
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be positive".into());
        }
        Ok(())
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::new("localhost:9092", "telemetry")
    }
}

/// What a successful load did.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSummary {
    /// Topic written to.
    pub topic: String,
    /// The topic's partition count (as found in, or created on, the cluster).
    pub partitions: i32,
    /// Whether this load created the topic.
    pub created_topic: bool,
    /// Records acknowledged by the cluster.
    pub sent: u64,
    /// Rows that could not be parsed (all counted, none sent).
    pub bad_rows: u64,
    /// The first [`KEPT_BAD_ROWS`] bad rows with their line numbers.
    pub bad_row_samples: Vec<RowError>,
    /// Acknowledged records per partition (partitions that received none are absent).
    pub per_partition: BTreeMap<i32, u64>,
    /// Distinct device ids sent.
    pub devices: u64,
    /// Wall time from connecting to the last acknowledgement.
    pub seconds: f64,
    /// `sent / seconds`.
    pub records_per_sec: f64,
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sent:       {} records from {} devices to topic {} ({} partitions{})",
            self.sent,
            self.devices,
            self.topic,
            self.partitions,
            if self.created_topic { ", created" } else { "" }
        )?;
        writeln!(
            f,
            "time:       {:.3} s ({:.0} records/s)",
            self.seconds, self.records_per_sec
        )?;
        writeln!(f, "bad rows:   {}", self.bad_rows)?;
        for row in self.bad_row_samples.iter().take(LOGGED_BAD_ROWS) {
            writeln!(f, "  {row}")?;
        }
        if self.bad_rows > LOGGED_BAD_ROWS as u64 {
            writeln!(
                f,
                "  ... and {} more",
                self.bad_rows - LOGGED_BAD_ROWS as u64
            )?;
        }
        write!(f, "partitions:")?;
        for (p, n) in &self.per_partition {
            write!(f, " {p}={n}")?;
        }
        writeln!(f)
    }
}

/// Why a load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// An option is out of range.
    #[error("invalid load option: {0}")]
    Options(String),
    /// librdkafka refused the configuration (e.g. an unknown `-X` property).
    #[error("bad Kafka client configuration: {0}")]
    Config(KafkaError),
    /// No broker answered in time.
    #[error("cannot reach Kafka at {servers} within {timeout:?}: {reason}")]
    Unreachable {
        /// The bootstrap servers tried.
        servers: String,
        /// The connect timeout.
        timeout: Duration,
        /// librdkafka's last reported problem.
        reason: String,
    },
    /// The topic does not exist and creating it was not allowed.
    #[error("topic {topic} does not exist on {servers} (topic creation is disabled)")]
    TopicMissing {
        /// The topic.
        topic: String,
        /// The cluster.
        servers: String,
    },
    /// The topic does not exist and could not be created.
    #[error("cannot create topic {topic} on {servers}: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The cluster.
        servers: String,
        /// The broker's or client's reason.
        reason: String,
    },
    /// The input held no good record.
    #[error("nothing was sent: the input had no valid records ({bad_rows} bad rows{})",
        .first_bad.as_ref().map(|r| format!(", first: {r}")).unwrap_or_default())]
    NothingSent {
        /// Bad rows seen.
        bad_rows: u64,
        /// The first bad row, if any.
        first_bad: Option<RowError>,
    },
    /// Some records were not acknowledged.
    #[error("{failed} of {attempted} records were not delivered to {topic}; first failure: {first_error}")]
    Delivery {
        /// The topic.
        topic: String,
        /// Records that failed.
        failed: u64,
        /// Records handed to the producer.
        attempted: u64,
        /// The first failure's reason.
        first_error: String,
    },
    /// The producer hit an unrecoverable error (e.g. the idempotence guarantee was lost).
    #[error("fatal producer error: {0}")]
    Fatal(String),
}

/// Delivery accounting shared with librdkafka's callbacks (served on the loading thread by `poll`).
#[derive(Default)]
struct LoadContext {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
    /// Acknowledged records per partition, indexed by partition.
    per_partition: Mutex<Vec<u64>>,
    /// The latest client-level error, quoted when the cluster cannot be reached.
    last_error: Mutex<Option<String>>,
    /// Once connected, client errors are worth a warning (a broker dropping out mid-load).
    connected: AtomicBool,
}

impl LoadContext {
    fn note_failure(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ClientContext for LoadContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka's reason already names the broker and the cause; the code adds nothing.
        let text = if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_string()
        };
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        // rdkafka hands each error event to this callback twice (client and producer poll).
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        if self.connected.load(Ordering::Relaxed) {
            tracing::warn!("kafka: {text}");
        } else {
            tracing::debug!("kafka: {text}");
        }
        // "All brokers down" follows the error that says why (refused, DNS, TLS...): keep that.
        let summary_only = matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown));
        if !summary_only || last.is_none() {
            *last = Some(text);
        }
    }
}

impl ProducerContext for LoadContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(msg) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                let p = msg.partition().max(0) as usize;
                let mut counts = self.per_partition.lock().unwrap_or_else(|e| e.into_inner());
                if counts.len() <= p {
                    counts.resize(p + 1, 0);
                }
                counts[p] += 1;
            }
            Err((err, msg)) => {
                self.note_failure(format!("partition {}: {err}", msg.partition()));
            }
        }
    }
}

/// Schedules sends. Times are seconds since the load started sending.
#[derive(Clone, Debug)]
struct Pacer {
    mode: Pace,
}

#[derive(Clone, Debug)]
enum Pace {
    Unpaced,
    Steady { interval: f64, next: f64 },
    Replay { speedup: f64, first_ts: Option<i64> },
}

/// A steady pacer that fell behind (slow broker) catches up by at most this much, so it never
/// releases a long burst.
const MAX_LAG_SECS: f64 = 0.05;
/// Pauses shorter than this are skipped (they would cost more than they hold back); the absolute
/// schedule keeps the average rate exact anyway.
const MIN_PAUSE_SECS: f64 = 0.001;

impl Pacer {
    fn new(rate: Option<Rate>) -> Self {
        let mode = match rate {
            None => Pace::Unpaced,
            Some(Rate::RecordsPerSec(r)) => Pace::Steady {
                interval: 1.0 / r,
                next: 0.0,
            },
            Some(Rate::Speedup(s)) => Pace::Replay {
                speedup: s,
                first_ts: None,
            },
        };
        Self { mode }
    }

    /// When the record with data timestamp `ts` is due, given that `now` seconds have passed.
    fn due(&mut self, ts: i64, now: f64) -> f64 {
        match &mut self.mode {
            Pace::Unpaced => now,
            Pace::Steady { interval, next } => {
                let due = next.max(now - MAX_LAG_SECS);
                *next = due + *interval;
                due
            }
            Pace::Replay { speedup, first_ts } => {
                let first = *first_ts.get_or_insert(ts);
                (ts - first) as f64 / *speedup
            }
        }
    }
}

/// Sends `records` to `opts.topic` and waits until every one is acknowledged.
///
/// Checks the cluster first (bounded by `opts.connect_timeout`), creates the topic when it is
/// missing and `opts.create_topic` is set, and reads the topic's real partition count from the
/// cluster. Each record goes to `partition_for_key(device id, partitions)` with the device id as
/// key and [`InputRecord::write_json`] as value, through an idempotent producer, so each device's
/// records keep their order. Bad rows are counted, logged (the first [`LOGGED_BAD_ROWS`]) and
/// kept (the first [`KEPT_BAD_ROWS`]), never sent. `total_hint` (rows, good and bad) gives the
/// progress bar a length and an ETA.
///
/// Fails when nothing could be sent, or when any record was not delivered.
pub fn load<I>(
    opts: &LoadOptions,
    records: I,
    total_hint: Option<u64>,
) -> Result<LoadSummary, LoadError>
where
    I: Iterator<Item = Result<InputRecord, RowError>>,
{
    opts.validate()?;
    let started = Instant::now();
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &opts.bootstrap_servers)
        .set("enable.idempotence", "true")
        // Matches `partition_for_key` for any record sent without an explicit partition.
        .set("partitioner", "murmur2_random")
        .set("client.id", "generator-load");
    for (k, v) in &opts.kafka {
        config.set(k, v);
    }
    let producer: BaseProducer<LoadContext> = config
        .create_with_context(LoadContext::default())
        .map_err(LoadError::Config)?;
    let ctx = Arc::clone(producer.context());

    let deadline = started + opts.connect_timeout;
    let (partitions, created_topic) = match find_topic(&producer, &ctx, opts, deadline)? {
        Some(n) => (n, false),
        None if !opts.create_topic => {
            return Err(LoadError::TopicMissing {
                topic: opts.topic.clone(),
                servers: opts.bootstrap_servers.clone(),
            })
        }
        None => {
            create_topic(&config, opts, deadline)?;
            let n = wait_for_topic(&producer, &ctx, opts, deadline)?;
            (n, true)
        }
    };
    if partitions != opts.partitions && !created_topic {
        tracing::info!(
            "topic {} has {partitions} partitions (not {}); keys are spread over {partitions}",
            opts.topic,
            opts.partitions
        );
    }
    ctx.connected.store(true, Ordering::Relaxed);
    let nparts = NonZeroU32::new(partitions as u32).expect("a found topic has partitions");

    let bar = progress_bar(opts.progress, total_hint);
    let mut sent = Sending {
        producer: &producer,
        ctx: &ctx,
        topic: &opts.topic,
        nparts,
        bar: &bar,
        payload: Vec::with_capacity(1024),
        pacer: Pacer::new(opts.rate),
        attempted: 0,
        rows: 0,
        bad_rows: 0,
        bad_row_samples: Vec::new(),
        devices: HashSet::new(),
        send_start: Instant::now(),
    };
    for item in records {
        if !sent.one(item) {
            // A fatal producer error: everything after would fail too; reported below.
            break;
        }
    }
    bar.set_position(sent.rows);
    bar.set_message("flushing");
    // Undelivered messages fail after `message.timeout.ms`, so this wait is bounded.
    loop {
        let fatal = match producer.flush(Duration::from_millis(200)) {
            Ok(()) => producer.client().fatal_error().map(|(_, why)| why),
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                match producer.client().fatal_error() {
                    Some((_, why)) => Some(why),
                    None => continue,
                }
            }
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = fatal {
            bar.abandon();
            return Err(LoadError::Fatal(why));
        }
        break;
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let delivered = ctx.delivered.load(Ordering::Relaxed);
    let reported = ctx.failed.load(Ordering::Relaxed);
    // A completed flush leaves no message without a report; count any that lack one as failed.
    let unreported = sent.attempted.saturating_sub(delivered + reported);
    let failed = reported + unreported;
    if failed > 0 {
        let first_error = ctx
            .first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "no delivery report".to_string());
        return Err(LoadError::Delivery {
            topic: opts.topic.clone(),
            failed,
            attempted: sent.attempted,
            first_error,
        });
    }
    if delivered == 0 {
        return Err(LoadError::NothingSent {
            bad_rows: sent.bad_rows,
            first_bad: sent.bad_row_samples.first().cloned(),
        });
    }
    let per_partition = ctx
        .per_partition
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(p, &n)| (p as i32, n))
        .collect();
    Ok(LoadSummary {
        topic: opts.topic.clone(),
        partitions,
        created_topic,
        sent: delivered,
        bad_rows: sent.bad_rows,
        bad_row_samples: sent.bad_row_samples,
        per_partition,
        devices: sent.devices.len() as u64,
        seconds,
        records_per_sec: delivered as f64 / seconds.max(1e-9),
    })
}

/// The send loop's state (one struct so the per-record step stays a small method).
struct Sending<'a> {
    producer: &'a BaseProducer<LoadContext>,
    ctx: &'a LoadContext,
    topic: &'a str,
    nparts: NonZeroU32,
    bar: &'a ProgressBar,
    /// Reused JSON buffer: librdkafka copies the payload, so one buffer serves every record.
    payload: Vec<u8>,
    pacer: Pacer,
    attempted: u64,
    rows: u64,
    bad_rows: u64,
    bad_row_samples: Vec<RowError>,
    devices: HashSet<String>,
    send_start: Instant,
}

impl Sending<'_> {
    /// Handles one row; `false` when the producer has failed fatally.
    fn one(&mut self, item: Result<InputRecord, RowError>) -> bool {
        self.rows += 1;
        if self.rows.is_multiple_of(16) {
            // Serves delivery reports: a zero-timeout poll handles one event (a batch of
            // reports), and until served each report pins its message in the producer's queue.
            self.producer.poll(Duration::ZERO);
            self.bar.set_position(self.rows);
        }
        let rec = match item {
            Ok(rec) => rec,
            Err(bad) => {
                self.bad_row(bad);
                return true;
            }
        };
        self.pause_until_due(rec.timestamp);
        self.payload.clear();
        rec.write_json(&mut self.payload);
        let key = rec.key();
        let partition = partition_for_key(key.as_bytes(), self.nparts) as i32;
        let mut record = BaseRecord::to(self.topic)
            .key(key)
            .payload(&self.payload[..])
            .partition(partition);
        self.attempted += 1;
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                // Back-pressure: let in-flight batches drain, then retry; never drop.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((err, _)) => {
                    self.ctx
                        .note_failure(format!("device {key} (partition {partition}): {err}"));
                    if self.producer.client().fatal_error().is_some() {
                        return false;
                    }
                    break;
                }
            }
        }
        if !self.devices.contains(key) {
            self.devices.insert(key.to_string());
        }
        true
    }

    fn bad_row(&mut self, bad: RowError) {
        self.bad_rows += 1;
        if self.bad_rows <= LOGGED_BAD_ROWS as u64 {
            self.bar
                .suspend(|| tracing::warn!("bad row skipped: {bad}"));
            if self.bad_rows == LOGGED_BAD_ROWS as u64 {
                self.bar.suspend(|| {
                    tracing::warn!("further bad rows are counted but not logged individually")
                });
            }
        }
        if self.bad_row_samples.len() < KEPT_BAD_ROWS {
            self.bad_row_samples.push(bad);
        }
    }

    /// Waits (serving delivery reports meanwhile) until the pacer says the record is due.
    fn pause_until_due(&mut self, ts: i64) {
        let now = self.send_start.elapsed().as_secs_f64();
        let due = self.pacer.due(ts, now);
        if due - now >= MIN_PAUSE_SECS {
            // `poll` blocks on the event queue for the whole timeout: a sleep that also handles
            // acknowledgements.
            self.producer.poll(Duration::from_secs_f64(due - now));
        }
    }
}

/// How long to serve client events after a failed metadata request, to learn why it failed.
const ERROR_DRAIN: Duration = Duration::from_millis(50);

/// Looks the topic up, retrying until `deadline` while no broker answers.
/// `Some(partitions)` if it exists, `None` if the cluster says it does not.
fn find_topic(
    producer: &BaseProducer<LoadContext>,
    ctx: &LoadContext,
    opts: &LoadOptions,
    deadline: Instant,
) -> Result<Option<i32>, LoadError> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // All-topics metadata: asking for the one topic could auto-create it with the broker's
        // default partition count.
        let result = producer
            .client()
            .fetch_metadata(None, Timeout::After(remaining));
        if result.is_err() {
            // Serves the queued client errors that explain the failure (connection refused, DNS,
            // TLS, authentication...); one zero-timeout poll would handle only one event.
            producer.poll(ERROR_DRAIN);
        }
        let last_problem = match result {
            Ok(md) => match md.topics().iter().find(|t| t.name() == opts.topic) {
                None => return Ok(None),
                Some(t) => match t.error() {
                    None if !t.partitions().is_empty() => {
                        return Ok(Some(t.partitions().len() as i32))
                    }
                    Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                        return Ok(None)
                    }
                    // E.g. leader not yet elected: transient, retry.
                    err => format!("topic {} not ready: {err:?}", opts.topic),
                },
            },
            Err(e) => ctx.last_error().unwrap_or_else(|| e.to_string()),
        };
        if Instant::now() >= deadline {
            return Err(LoadError::Unreachable {
                servers: opts.bootstrap_servers.clone(),
                timeout: opts.connect_timeout,
                reason: last_problem,
            });
        }
        thread::sleep(Duration::from_millis(100).min(remaining));
    }
}

/// After creating the topic, waits until its metadata shows every partition with a leader.
fn wait_for_topic(
    producer: &BaseProducer<LoadContext>,
    ctx: &LoadContext,
    opts: &LoadOptions,
    deadline: Instant,
) -> Result<i32, LoadError> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = producer
            .client()
            .fetch_metadata(Some(&opts.topic), Timeout::After(remaining));
        if result.is_err() {
            producer.poll(ERROR_DRAIN);
        }
        let problem = match result {
            Ok(md) => match md.topics().iter().find(|t| t.name() == opts.topic) {
                Some(t)
                    if t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions().iter().all(|p| p.leader() >= 0) =>
                {
                    return Ok(t.partitions().len() as i32)
                }
                Some(t) => format!("topic not ready yet: {:?}", t.error()),
                None => "topic not in metadata yet".to_string(),
            },
            Err(e) => ctx.last_error().unwrap_or_else(|| e.to_string()),
        };
        if Instant::now() >= deadline {
            return Err(LoadError::CreateTopic {
                topic: opts.topic.clone(),
                servers: opts.bootstrap_servers.clone(),
                reason: format!(
                    "created but not usable within {:?}: {problem}",
                    opts.connect_timeout
                ),
            });
        }
        thread::sleep(Duration::from_millis(100).min(remaining));
    }
}

fn create_topic(
    config: &ClientConfig,
    opts: &LoadOptions,
    deadline: Instant,
) -> Result<(), LoadError> {
    let fail = |reason: String| LoadError::CreateTopic {
        topic: opts.topic.clone(),
        servers: opts.bootstrap_servers.clone(),
        reason,
    };
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(|e| fail(e.to_string()))?;
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let topic = NewTopic::new(
        &opts.topic,
        opts.partitions,
        TopicReplication::Fixed(opts.replication_factor),
    );
    let admin_opts = AdminOptions::new()
        .request_timeout(Some(remaining))
        .operation_timeout(Some(remaining));
    let results = block_on(admin.create_topics([&topic], &admin_opts)).map_err(|e| {
        fail(match e {
            KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut) => format!(
                "no answer to CreateTopics within {:.1} s (create the topic beforehand if \
                 the cluster does not allow it)",
                remaining.as_secs_f64()
            ),
            e => e.to_string(),
        })
    })?;
    for result in results {
        match result {
            Ok(_) => {}
            // Someone else created it meanwhile: fine, its metadata decides the partition count.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(fail(code.to_string())),
        }
    }
    tracing::info!(
        "created topic {} ({} partitions, replication {})",
        opts.topic,
        opts.partitions,
        opts.replication_factor
    );
    Ok(())
}

/// Runs a future to completion on this thread. The admin client's futures are completed by its
/// own background thread, so parking until woken is all the executor they need.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        thread::park();
    }
}

const BAR_TEMPLATE: &str = "{bar:40.cyan/blue} {pos}/{len} rows  {rate}  ETA {eta}  {msg}";
const SPINNER_TEMPLATE: &str = "{spinner} {pos} rows  {rate}  {elapsed}  {msg}";

/// The progress style, with a whole-number rate (indicatif's `{per_sec}` prints four decimals).
fn progress_style(template: &str) -> Result<ProgressStyle, indicatif::style::TemplateError> {
    Ok(ProgressStyle::with_template(template)?.with_key(
        "rate",
        |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0} rows/s", state.per_sec());
        },
    ))
}

fn progress_bar(enabled: bool, total: Option<u64>) -> ProgressBar {
    if !enabled || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
            BAR_TEMPLATE,
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            SPINNER_TEMPLATE,
        ),
    };
    if let Ok(style) = progress_style(template) {
        bar.set_style(style);
    }
    // Keeps the rate and ETA fresh while a paced load is sleeping between records.
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// Counts the data rows of a CSV file (lines after the header, ignoring a final newline), as a
/// cheap progress-bar total; quoted fields spanning lines make it an overestimate.
pub fn count_data_lines(path: impl AsRef<Path>) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let (mut newlines, mut last) = (0u64, b'\n');
    let mut any = false;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        any = true;
        newlines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[n - 1];
    }
    let lines = newlines + u64::from(any && last != b'\n');
    Ok(lines.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_pacer_spaces_records_and_limits_catch_up() {
        let mut p = Pacer::new(Some(Rate::RecordsPerSec(100.0)));
        let dues: Vec<f64> = (0..5).map(|_| p.due(0, 0.0)).collect();
        for (i, d) in dues.iter().enumerate() {
            assert!((d - i as f64 * 0.01).abs() < 1e-12, "{dues:?}");
        }
        // Fell 1 s behind: the next record goes now (minus the allowed lag), not 95 records at once.
        let due = p.due(0, 1.05);
        assert!((due - 1.0).abs() < 1e-12, "{due}");
        assert!((p.due(0, 1.05) - 1.01).abs() < 1e-12);
    }

    #[test]
    fn replay_pacer_follows_data_time() {
        let mut p = Pacer::new(Some(Rate::Speedup(3600.0)));
        assert_eq!(p.due(1_000_000, 5.0), 0.0);
        assert!((p.due(1_000_000 + 7200, 0.0) - 2.0).abs() < 1e-12);
        // Earlier than the first record: due immediately (in the past).
        assert!(p.due(1_000_000 - 3600, 0.5) < 0.0);
        let mut none = Pacer::new(None);
        assert_eq!(none.due(42, 1.5), 1.5);
    }

    #[test]
    fn options_are_validated_by_name() {
        let ok = LoadOptions::new("h:1", "telemetry");
        assert!(ok.validate().is_ok());
        let cases: Vec<(LoadOptions, &str)> = vec![
            (
                LoadOptions {
                    partitions: 0,
                    ..ok.clone()
                },
                "partitions",
            ),
            (
                LoadOptions {
                    replication_factor: 0,
                    ..ok.clone()
                },
                "replication_factor",
            ),
            (
                LoadOptions {
                    rate: Some(Rate::RecordsPerSec(0.0)),
                    ..ok.clone()
                },
                "rate",
            ),
            (
                LoadOptions {
                    rate: Some(Rate::Speedup(f64::NAN)),
                    ..ok.clone()
                },
                "speedup",
            ),
            (
                LoadOptions {
                    topic: "a b".into(),
                    ..ok.clone()
                },
                "topic",
            ),
            (
                LoadOptions {
                    bootstrap_servers: " ".into(),
                    ..ok.clone()
                },
                "bootstrap_servers",
            ),
            (
                LoadOptions {
                    connect_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                "connect_timeout",
            ),
        ];
        for (opts, name) in cases {
            let err = opts.validate().expect_err(name).to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn progress_templates_parse() {
        for t in [BAR_TEMPLATE, SPINNER_TEMPLATE] {
            assert!(progress_style(t).is_ok(), "{t}");
        }
        // Not a terminal under test (or progress off): the bar is hidden, never drawn.
        assert!(progress_bar(false, Some(10)).is_hidden());
    }

    #[test]
    fn counts_data_lines_with_or_without_final_newline() {
        let dir = std::env::temp_dir().join(format!("gen-count-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cases = [
            ("h\na\nb\n", 2),
            ("h\na\nb", 2),
            ("h\n", 0),
            ("", 0),
            ("h", 0),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.join(format!("{i}.csv"));
            std::fs::write(&path, text).expect("write");
            assert_eq!(count_data_lines(&path).expect("count"), *want, "{text:?}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
