//! Detector configuration: a TOML file with documented defaults; CLI flags and environment
//! variables override single fields (see `main.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use htm::network::{NetworkParams, PRESETS};
use serde::{Deserialize, Serialize};

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// librdkafka properties, passed through verbatim to the consumer and the producer
    /// (`bootstrap.servers`, `security.protocol`, `sasl.*`, `ssl.*` …).
    pub kafka: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only (e.g. `session.timeout.ms`).
    pub kafka_consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only (e.g. `linger.ms`).
    pub kafka_producer: BTreeMap<String, String>,
    /// Consumer group id shared by all detector instances.
    pub group_id: String,
    /// This instance's stable identity, unique within the group and kept across restarts
    /// (e.g. the pod name of a StatefulSet). Required for exactly-once processing: it becomes
    /// the consumer's `group.instance.id` (static membership), so a restarted instance gets its
    /// partitions back without a rebalance. (Fencing of previous owners is per partition, see
    /// [`Config::transactional_id`].)
    pub instance_id: String,
    /// Delivery guarantee: `exactly_once` (transactions; read the output with
    /// `isolation.level=read_committed`) or `at_least_once` (idempotent producer, offsets
    /// committed after checkpoints; works on brokers without transactions).
    pub processing: Processing,
    /// Exactly once: join the group as a static member (`group.instance.id` = `instance_id`),
    /// so a restarted instance gets its partitions back without a rebalance. A static member
    /// does not leave the group when it stops; with `false` a stopping instance hands its
    /// partitions over at once, and a crashed one is replaced after `session.timeout.ms`.
    pub static_membership: bool,
    pub topics: Topics,
    pub htm: HtmConfig,
    /// `isAnomaly` is set when the anomaly likelihood is at least this (or on a spatial
    /// anomaly once the likelihood has left probation). 0.9999 is a log-likelihood of 0.4;
    /// NAB's tuned threshold is about 0.5.
    pub likelihood_threshold: f64,
    pub checkpoint: CheckpointConfig,
    pub batch: BatchConfig,
    pub metrics: MetricsConfig,
    pub memory: MemoryConfig,
    /// Threads computing networks (0 = one per core).
    pub workers: usize,
}

/// Bounds on the networks kept in memory. Past a bound, the least recently used networks are
/// checkpointed and dropped, and restored from their checkpoint on their next record — scores
/// are unchanged, only restores cost time. Exactly once, they go to a spill area of this process
/// (`<checkpoint.dir>/spill`) that partition snapshots read back (see `engine.rs`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Most networks in memory (0 = no bound).
    pub max_networks: usize,
    /// Most bytes of network state in memory, in MiB (0 = no bound). What the process holds
    /// beyond its start and its networks at the resident set's peaks (allocator pages around
    /// churned networks, the batch's records and outputs), sampled every 10 ms and measured
    /// before each wave of networks, counts against it, so the resident set's peaks stay near
    /// its size at start plus this.
    pub max_mb: u64,
}

/// Delivery guarantee of the service (see `service.rs` and `eos.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Processing {
    /// Each input record yields exactly one committed output record.
    ExactlyOnce,
    /// Nothing is lost; a crash may repeat output records (never disturbing scores).
    #[default]
    AtLeastOnce,
}

/// Where checkpoints are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// A directory (local disk or a shared volume).
    #[default]
    Dir,
    /// A compacted Kafka topic (exactly-once only), usable from any machine.
    Kafka,
}

/// Topic names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    pub input: String,
    pub output: String,
    pub dead_letter: String,
}

/// How device networks are built.
///
/// A stream has no look-ahead, so the value range cannot come from the data the way NAB takes
/// it from the whole file. The value encoder (RDSE) is unbounded — it adds buckets for values
/// outside the range as they appear — so the range only fixes the encoder's resolution
/// (range / 130 after 20 % padding each side). It is chosen, most specific first, from
/// `ranges."<device id>"`, then `ranges."<parameterCode>"` (EPA records), then `min`/`max`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HtmConfig {
    /// Network preset (`nab` or `nab-tm`).
    pub preset: String,
    /// Records per device before the likelihood leaves probation (NAB: 15 % of the file,
    /// at most 750).
    pub probation: usize,
    pub min: f64,
    pub max: f64,
    pub ranges: BTreeMap<String, Range>,
    /// Overrides merged into the preset's parameters, in the parameters' own layout, e.g.
    /// `[htm.params.sp] potential_pct = 0.85` or `[htm.params.likelihood] reestimation_period = 50`.
    pub params: Option<toml::Table>,
}

/// An expected value range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

/// Network checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// `dir` or `kafka` (exactly-once only).
    pub store: StoreKind,
    /// Directory of the `dir` store.
    pub dir: PathBuf,
    /// Compacted topic of the `kafka` store; empty means `<topics.input>-checkpoints`.
    pub topic: String,
    /// Largest message of the `kafka` store; bigger networks are split into chunks.
    pub chunk_bytes: usize,
    /// Seconds between checkpoints (at least once: each also commits input offsets).
    pub interval_secs: f64,
    /// At least once: the most milliseconds a batch spends serialising networks for a
    /// checkpoint; a checkpoint of many changed networks is spread over batches, so it delays
    /// records by about this much instead of by the time to serialise them all.
    pub max_pause_ms: u64,
}

/// Batching of the consume → compute → produce loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records taken into one batch.
    pub max_records: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub max_wait_ms: u64,
    /// Most records of a batch under memory pressure: after a full batch in which a quarter of
    /// the records or more needed their network restored (devices interleave beyond the memory
    /// bounds), batches grow to this so each restored network serves several records. Back to
    /// `max_records` once the backlog is read or the networks fit. At most `max_records` turns
    /// it off.
    pub pressure_max_records: usize,
    /// Seconds a batch grown under memory pressure should take to compute: each such batch is
    /// sized from the pace of the one before (at most doubling). Catching up a backlog beyond
    /// the memory bounds trades batch latency for throughput (10 s per batch holds while the
    /// networks fit; a restore costs about ten records' compute, so fewer, bigger batches
    /// catch up faster); this keeps such batches bounded in time on any host, well within the
    /// consumer's `max.poll.interval.ms` (300 s by default).
    pub pressure_batch_secs: f64,
}

/// Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address; loopback by default. Empty disables the endpoint.
    pub addr: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kafka: BTreeMap::from([(
                "bootstrap.servers".to_string(),
                "localhost:9092".to_string(),
            )]),
            kafka_consumer: BTreeMap::new(),
            kafka_producer: BTreeMap::new(),
            group_id: "htm-detector".into(),
            instance_id: String::new(),
            processing: Processing::default(),
            static_membership: true,
            topics: Topics::default(),
            htm: HtmConfig::default(),
            likelihood_threshold: 0.9999,
            checkpoint: CheckpointConfig::default(),
            batch: BatchConfig::default(),
            metrics: MetricsConfig::default(),
            memory: MemoryConfig::default(),
            workers: 0,
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            input: "telemetry".into(),
            output: "telemetry-enriched".into(),
            dead_letter: "telemetry-dead-letter".into(),
        }
    }
}

impl Default for HtmConfig {
    fn default() -> Self {
        HtmConfig {
            preset: "nab".into(),
            probation: 750,
            min: 0.0,
            max: 100.0,
            ranges: BTreeMap::new(),
            params: None,
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            store: StoreKind::default(),
            dir: PathBuf::from("checkpoints"),
            topic: String::new(),
            chunk_bytes: 512 * 1024,
            interval_secs: 5.0,
            max_pause_ms: 50,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 5000,
            max_wait_ms: 200,
            pressure_max_records: 100_000,
            pressure_batch_secs: 90.0,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            addr: "127.0.0.1:9898".into(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file; errors name the file and, for syntax or type errors,
    /// the line and column.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values a type cannot express, and that a network can be built from the HTM part.
    pub fn validate(&self) -> Result<()> {
        if !self.kafka.contains_key("bootstrap.servers") {
            bail!("kafka.\"bootstrap.servers\" is required");
        }
        for (name, topic) in [
            ("topics.input", &self.topics.input),
            ("topics.output", &self.topics.output),
            ("topics.dead_letter", &self.topics.dead_letter),
        ] {
            if topic.is_empty() {
                bail!("{name} must not be empty");
            }
        }
        if self.group_id.is_empty() {
            bail!("group_id must not be empty");
        }
        if !(0.0..=1.0).contains(&self.likelihood_threshold) {
            bail!(
                "likelihood_threshold = {} must be within [0, 1]",
                self.likelihood_threshold
            );
        }
        if self.checkpoint.interval_secs.is_nan() || self.checkpoint.interval_secs <= 0.0 {
            bail!("checkpoint.interval_secs must be positive");
        }
        if self.processing == Processing::ExactlyOnce && self.instance_id.trim().is_empty() {
            bail!(
                "instance_id is required when processing = \"exactly_once\" \
                 (a stable name per instance, e.g. the pod name)"
            );
        }
        if self.checkpoint.store == StoreKind::Kafka && self.processing != Processing::ExactlyOnce {
            bail!("checkpoint.store = \"kafka\" requires processing = \"exactly_once\"");
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.checkpoint.chunk_bytes) {
            bail!("checkpoint.chunk_bytes must be between 1 KiB and 16 MiB");
        }
        if self.batch.max_records == 0 {
            bail!("batch.max_records must be at least 1");
        }
        if !(self.batch.pressure_batch_secs > 0.0 && self.batch.pressure_batch_secs <= 3600.0) {
            bail!(
                "batch.pressure_batch_secs = {} must be above 0 and at most 3600",
                self.batch.pressure_batch_secs
            );
        }
        if !PRESETS.contains(&self.htm.preset.as_str()) {
            bail!(
                "htm.preset = {:?} is unknown; known presets: {}",
                self.htm.preset,
                PRESETS.join(", ")
            );
        }
        for (key, r) in std::iter::once((
            "min/max",
            &Range {
                min: self.htm.min,
                max: self.htm.max,
            },
        ))
        .chain(self.htm.ranges.iter().map(|(k, r)| (k.as_str(), r)))
        {
            if !(r.min.is_finite() && r.max.is_finite() && r.min < r.max) {
                bail!(
                    "htm range {key}: min ({}) must be below max ({})",
                    r.min,
                    r.max
                );
            }
        }
        // Build one network's parameters now so a bad override fails at start, not at the
        // first record.
        let params = self.network_params(None, None)?;
        htm::network::Network::new(params).context("htm parameters")?;
        Ok(())
    }

    /// The checkpoint topic of the `kafka` store.
    pub fn checkpoint_topic(&self) -> String {
        if self.checkpoint.topic.is_empty() {
            format!("{}-checkpoints", self.topics.input)
        } else {
            self.checkpoint.topic.clone()
        }
    }

    /// The `transactional.id` of the producer writing for an input partition: whoever takes
    /// the partition over fences its previous owner (a zombie, or an instance the coordinator
    /// wrongly left it to), independently of the group protocol's own fencing.
    pub fn transactional_id(&self, partition: i32) -> String {
        format!("{}.{}.{partition}", self.group_id, self.topics.input)
    }

    /// The configuration as TOML with the values of secret librdkafka properties (names
    /// containing `password`, `secret` or `key`) replaced, safe to log.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        for map in [&mut c.kafka, &mut c.kafka_consumer, &mut c.kafka_producer] {
            for (k, v) in map.iter_mut() {
                if is_secret_property(k) {
                    *v = "<redacted>".into();
                }
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("<config not printable: {e}>"))
    }

    /// The value range for a device (see [`HtmConfig`]).
    pub fn range_for(&self, device: Option<&str>, parameter_code: Option<&str>) -> Range {
        device
            .and_then(|d| self.htm.ranges.get(d))
            .or_else(|| parameter_code.and_then(|p| self.htm.ranges.get(p)))
            .copied()
            .unwrap_or(Range {
                min: self.htm.min,
                max: self.htm.max,
            })
    }

    /// Network parameters for a device: preset, range, probation, then overrides.
    pub fn network_params(
        &self,
        device: Option<&str>,
        parameter_code: Option<&str>,
    ) -> Result<NetworkParams> {
        let r = self.range_for(device, parameter_code);
        // NAB sizes probation as 15 % of a file; `probation / 0.15` rows reproduces it.
        let rows = (self.htm.probation as f64 / 0.15).ceil() as usize;
        let params = NetworkParams::preset(&self.htm.preset, r.min, r.max, rows)?;
        let Some(overrides) = &self.htm.params else {
            return Ok(params);
        };
        let mut merged = toml::Table::try_from(&params).context("serialising preset parameters")?;
        merge(&mut merged, overrides);
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e| anyhow::anyhow!("htm.params: {e}"))
    }
}

/// Whether a librdkafka property holds a secret (never logged).
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["password", "secret", "key"].iter().any(|w| n.contains(w))
}

fn merge(base: &mut toml::Table, overrides: &toml::Table) {
    for (k, v) in overrides {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("detector.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.range_for(None, Some("44201")).max, 0.1);
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.metrics.addr, "127.0.0.1:9898");
    }

    #[test]
    fn unknown_key_and_bad_type_name_the_place() {
        let err = format!("{:#}", Config::parse("group_idd = \"x\"").unwrap_err());
        assert!(err.contains("group_idd"), "{err}");
        let err = format!("{:#}", Config::parse("\n\nworkers = \"two\"").unwrap_err());
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let err = format!(
            "{:#}",
            Config::parse("likelihood_threshold = 2.0").unwrap_err()
        );
        assert!(err.contains("likelihood_threshold"), "{err}");
        let err = format!(
            "{:#}",
            Config::parse("[htm]\npreset = \"fast\"").unwrap_err()
        );
        assert!(err.contains("nab-tm"), "{err}");
        let err = format!(
            "{:#}",
            Config::parse("[htm.ranges.44201]\nmin = 1.0\nmax = 0.5").unwrap_err()
        );
        assert!(err.contains("44201"), "{err}");
        let err = format!(
            "{:#}",
            Config::parse("[batch]\npressure_batch_secs = 0.0").unwrap_err()
        );
        assert!(err.contains("batch.pressure_batch_secs"), "{err}");
    }

    #[test]
    fn exactly_once_needs_an_instance_id_and_kafka_store_needs_exactly_once() {
        let err = format!(
            "{:#}",
            Config::parse("processing = \"exactly_once\"").unwrap_err()
        );
        assert!(err.contains("instance_id"), "{err}");
        let c = Config::parse("processing = \"exactly_once\"\ninstance_id = \"i1\"").unwrap();
        assert_eq!(c.processing, Processing::ExactlyOnce);
        assert_eq!(c.transactional_id(3), "htm-detector.telemetry.3");
        assert_eq!(c.checkpoint_topic(), "telemetry-checkpoints");
        let err = format!(
            "{:#}",
            Config::parse("[checkpoint]\nstore = \"kafka\"").unwrap_err()
        );
        assert!(err.contains("requires processing"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_from_config_dumps() {
        let c = Config::parse(
            "[kafka]\n\"bootstrap.servers\" = \"b:9092\"\n\"sasl.password\" = \"hunter2\"\n\
             \"ssl.key.password\" = \"k3y\"\n[kafka_producer]\n\"sasl.oauthbearer.client.secret\" = \"s3\"\n",
        )
        .unwrap();
        let dump = c.redacted_toml();
        for secret in ["hunter2", "k3y", "s3\""] {
            assert!(!dump.contains(secret), "{dump}");
        }
        assert!(dump.contains("b:9092"), "{dump}");
        assert!(is_secret_property("SASL.PASSWORD"));
        assert!(!is_secret_property("bootstrap.servers"));
    }

    #[test]
    fn ranges_pick_device_then_parameter_then_default() {
        let c = Config::parse(
            "[htm]\nmin = 0.0\nmax = 10.0\n[htm.ranges.44201]\nmin = 0.0\nmax = 0.1\n\
             [htm.ranges.\"10-001-0002-44201-1\"]\nmin = 0.0\nmax = 0.2\n",
        )
        .unwrap();
        assert_eq!(
            c.range_for(Some("10-001-0002-44201-1"), Some("44201")).max,
            0.2
        );
        assert_eq!(c.range_for(Some("other"), Some("44201")).max, 0.1);
        assert_eq!(c.range_for(Some("other"), None).max, 10.0);
    }

    #[test]
    fn parameter_overrides_merge_into_the_preset() {
        let c = Config::parse("[htm.params.sp]\npotential_pct = 0.5\n").unwrap();
        let p = c.network_params(None, None).unwrap();
        assert_eq!(p.sp.potential_pct, 0.5);
        assert_eq!(
            p.sp.column_count, 2048,
            "other fields keep the preset's values"
        );
        let err = format!(
            "{:#}",
            Config::parse("[htm.params.sp]\npotential_pct = \"high\"\n").unwrap_err()
        );
        assert!(err.contains("potential_pct"), "{err}");
    }
}
