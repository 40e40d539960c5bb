//! Partition snapshots in a compacted Kafka topic (`checkpoint.store = "kafka"`), so that any
//! instance on any machine can restore any partition.
//!
//! Layout: snapshots of input partition `p` go to partition `p mod N` of the checkpoint topic
//! (N = its partition count; it is created with the input's count, `cleanup.policy=compact`).
//! Keys, unique per content so compaction never drops a live value:
//! * `<p>/manifest#<generation>`: the [`Manifest`], framed and checksummed;
//! * `<p>/<device>#<generation>#<i>/<n>`: chunk `i` of `n` of a device's network, each at most
//!   `checkpoint.chunk_bytes` so no message nears the broker's size limit.
//!
//! A snapshot is written in its own transaction (chunks, then manifest, then tombstones for
//! what neither it nor the previous generation needs) with the transactional producer of the
//! input partition, right after a data transaction committed. Own transaction rather than the data
//! one: a snapshot is only worth writing every few seconds while data commits every batch, and
//! a failed snapshot must not cost the data (the previous snapshot stays valid; the next owner
//! replays a little more). Readers use `read_committed`, so an aborted or unfinished snapshot
//! is never seen; a fenced previous owner cannot commit one. Reading a partition at assignment
//! consumes it from the beginning to its end, keeping the newest value per key and honouring
//! tombstones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::config::Config;
use crate::eos::reader_config;
use crate::service::{client_config, redact, send, DeliveryContext};
use crate::store::{FoundManifest, Manifest, SnapshotStore};

/// Longest wait for a checkpoint partition to be read to its end.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const TX_TIMEOUT: Duration = Duration::from_secs(60);

/// Snapshots in a compacted topic.
pub struct KafkaSnapshots {
    topic: String,
    input_topic: String,
    /// Partitions of the checkpoint topic.
    partitions: i32,
    chunk_bytes: usize,
    /// The transactional producer of each owned partition.
    writers: BTreeMap<i32, Arc<ThreadedProducer<DeliveryContext>>>,
    reader: BaseConsumer<ReaderContext>,
    /// Live keys per input partition (what the topic holds after compaction).
    keys: BTreeMap<i32, BTreeSet<String>>,
    /// Values read at `open`, kept until the partition's first write (restoring needs them,
    /// running does not).
    values: BTreeMap<i32, BTreeMap<String, Vec<u8>>>,
}

fn manifest_key(p: i32, generation: u64) -> String {
    format!("{p}/manifest#{generation}")
}

fn chunk_key(p: i32, device: &str, generation: u64, i: usize, n: usize) -> String {
    format!("{p}/{device}#{generation}#{i}/{n}")
}

/// A parsed key (without its partition prefix).
#[derive(Debug, PartialEq)]
enum Key<'a> {
    Manifest(u64),
    Chunk {
        device: &'a str,
        generation: u64,
        i: usize,
        n: usize,
    },
}

/// Splits `<p>/...` into p and the parsed rest. Devices may contain `/` and `#`: the suffix is
/// parsed from the right, and only a chunk's last field holds a `/`.
fn parse_key(key: &str) -> Option<(i32, Key<'_>)> {
    let (p, rest) = key.split_once('/')?;
    let p: i32 = p.parse().ok()?;
    let (head, last) = rest.rsplit_once('#')?;
    if let Some((i, n)) = last.split_once('/') {
        let (device, generation) = head.rsplit_once('#')?;
        return Some((
            p,
            Key::Chunk {
                device,
                generation: generation.parse().ok()?,
                i: i.parse().ok()?,
                n: n.parse().ok()?,
            },
        ));
    }
    (head == "manifest").then_some(())?;
    Some((p, Key::Manifest(last.parse().ok()?)))
}

impl KafkaSnapshots {
    /// Connects, creating the checkpoint topic (compacted, as many partitions as the input)
    /// when it does not exist.
    pub fn open(config: &Config) -> Result<Self> {
        let topic = config.checkpoint_topic();
        let reader: BaseConsumer<ReaderContext> = reader_config(config)
            .set("group.id", format!("{}-checkpoint-reader", config.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            // Some brokers answer a fetch with a whole partition, far past fetch.max.bytes.
            .set("receive.message.max.bytes", "2000000000")
            .create_with_context(ReaderContext)
            .map_err(|e| anyhow!("creating the checkpoint reader: {}", redact(config, &e)))?;
        let partitions = match topic_partitions(&reader, &topic)? {
            Some(n) => n,
            None => {
                let n = topic_partitions(&reader, &config.topics.input)?.unwrap_or(1);
                create_topic(config, &topic, n)?;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if let Some(n) = topic_partitions(&reader, &topic)? {
                        break n;
                    }
                    if Instant::now() > deadline {
                        bail!("checkpoint topic {topic} does not appear after creation");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        info!(%topic, partitions, "Kafka checkpoint store");
        Ok(KafkaSnapshots {
            topic,
            input_topic: config.topics.input.clone(),
            partitions,
            chunk_bytes: config.checkpoint.chunk_bytes,
            writers: BTreeMap::new(),
            reader,
            keys: BTreeMap::new(),
            values: BTreeMap::new(),
        })
    }

    fn topic_partition(&self, p: i32) -> i32 {
        p.rem_euclid(self.partitions)
    }

    /// Reads a checkpoint-topic partition to its end: the newest value of every live key of
    /// input partition `p`.
    fn read(&self, p: i32) -> Result<BTreeMap<String, Vec<u8>>> {
        let cp = self.topic_partition(p);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, cp, Offset::Beginning)?;
        self.reader.assign(&tpl)?;
        let prefix = format!("{p}/");
        let mut live: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let deadline = Instant::now() + READ_TIMEOUT;
        let result = loop {
            if Instant::now() > deadline {
                break Err(anyhow!(
                    "reading {}/{cp} did not reach its end within {READ_TIMEOUT:?} \
                     (an open transaction of a dead instance? restart it)",
                    self.topic
                ));
            }
            match self.reader.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                        continue;
                    };
                    if !key.starts_with(&prefix) {
                        continue;
                    }
                    match m.payload() {
                        Some(v) if !v.is_empty() => {
                            live.insert(key.to_string(), v.to_vec());
                        }
                        _ => {
                            live.remove(key);
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break Ok(live),
                Some(Err(e)) => warn!("reading checkpoints: {e}"),
                None => {}
            }
        };
        self.reader.unassign()?;
        result
    }
}

/// The reader's context: reaching a partition's end is how a read finishes, not an error.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            warn!("checkpoint reader: {error}: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {}

fn topic_partitions<C: ConsumerContext>(
    reader: &BaseConsumer<C>,
    topic: &str,
) -> Result<Option<i32>> {
    let md = reader
        .fetch_metadata(Some(topic), Duration::from_secs(20))
        .with_context(|| format!("reading metadata of {topic}"))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .filter(|&n| n > 0))
}

fn create_topic(config: &Config, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(config)
        .create()
        .map_err(|e| anyhow!("creating an admin client: {}", redact(config, &e)))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Broker-default replication first; a broker too old for that gets 1.
    for replication in [-1, 1] {
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
            .set("cleanup.policy", "compact")
            .set("segment.bytes", "67108864")
            .set("min.cleanable.dirty.ratio", "0.1");
        let res = rt.block_on(admin.create_topics(&[new], &AdminOptions::new()))?;
        match res.into_iter().next() {
            Some(Ok(_)) => {
                info!(%topic, partitions, "created the compacted checkpoint topic");
                return Ok(());
            }
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(()),
            Some(Err((_, code))) if replication == -1 => {
                warn!("creating {topic} with the broker's default replication: {code}; trying 1");
            }
            Some(Err((_, code))) => bail!("creating checkpoint topic {topic}: {code}"),
            None => bail!("creating checkpoint topic {topic}: no answer"),
        }
    }
    unreachable!("the last attempt returns")
}

impl SnapshotStore for KafkaSnapshots {
    fn open(&mut self, partition: i32) -> Result<Vec<FoundManifest>> {
        let live = self.read(partition)?;
        let mut manifests = Vec::new();
        for (key, value) in &live {
            if let Some((_, Key::Manifest(generation))) = parse_key(key) {
                let manifest = htm::checkpoint::decode::<Manifest>(value)
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        if m.generation == generation && m.topic == self.input_topic {
                            Ok(m)
                        } else {
                            Err(format!(
                                "holds generation {} of topic {:?}",
                                m.generation, m.topic
                            ))
                        }
                    });
                manifests.push(FoundManifest {
                    generation,
                    manifest,
                    location: format!("{}:{key}", self.topic),
                });
            }
        }
        manifests.sort_by_key(|m| std::cmp::Reverse(m.generation));
        self.keys.insert(partition, live.keys().cloned().collect());
        self.values.insert(partition, live);
        Ok(manifests)
    }

    fn blob(&mut self, partition: i32, device: &str, generation: u64) -> Result<Option<Vec<u8>>> {
        let Some(values) = self.values.get(&partition) else {
            return Ok(None);
        };
        let first = format!("{partition}/{device}#{generation}#0/");
        let Some((key, _)) = values.range(first.clone()..).next() else {
            return Ok(None);
        };
        if !key.starts_with(&first) {
            return Ok(None);
        }
        let Some((_, Key::Chunk { n, .. })) = parse_key(key) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for i in 0..n {
            match values.get(&chunk_key(partition, device, generation, i, n)) {
                Some(chunk) => out.extend_from_slice(chunk),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    fn write(
        &mut self,
        manifest: &Manifest,
        blobs: &[(String, Vec<u8>)],
        keep: Option<&Manifest>,
    ) -> Result<usize> {
        let p = manifest.partition;
        let cp = self.topic_partition(p);
        self.values.remove(&p);
        let producer = self
            .writers
            .get(&p)
            .cloned()
            .ok_or_else(|| anyhow!("no transactional producer for partition {p}"))?;
        let mut written: Vec<String> = Vec::new();
        let mut bytes = 0;
        producer
            .begin_transaction()
            .context("beginning a checkpoint transaction")?;
        let result = (|| -> Result<Vec<String>> {
            for (device, blob) in blobs {
                let n = blob.len().div_ceil(self.chunk_bytes).max(1);
                for i in 0..n {
                    let key = chunk_key(p, device, manifest.generation, i, n);
                    let end = ((i + 1) * self.chunk_bytes).min(blob.len());
                    let chunk = &blob[i * self.chunk_bytes..end];
                    send(
                        &producer,
                        BaseRecord::to(&self.topic)
                            .partition(cp)
                            .key(key.as_bytes())
                            .payload(chunk),
                    )?;
                    bytes += chunk.len();
                    written.push(key);
                }
            }
            let key = manifest_key(p, manifest.generation);
            let encoded = htm::checkpoint::encode(manifest);
            send(
                &producer,
                BaseRecord::to(&self.topic)
                    .partition(cp)
                    .key(key.as_bytes())
                    .payload(&encoded),
            )?;
            bytes += encoded.len();
            written.push(key);
            // Tombstones for what neither snapshot needs, so compaction can reclaim it.
            let mut needed: BTreeSet<(String, u64)> = BTreeSet::new();
            let mut gens = vec![manifest.generation];
            for m in std::iter::once(manifest).chain(keep) {
                needed.extend(m.blobs().map(|(d, g)| (d.to_string(), g)));
            }
            gens.extend(keep.map(|k| k.generation));
            let mut dead = Vec::new();
            for key in self.keys.get(&p).into_iter().flatten() {
                let garbage = match parse_key(key) {
                    Some((_, Key::Manifest(g))) => !gens.contains(&g),
                    Some((
                        _,
                        Key::Chunk {
                            device, generation, ..
                        },
                    )) => !needed.contains(&(device.to_string(), generation)),
                    None => false,
                };
                if garbage && !written.contains(key) {
                    send(
                        &producer,
                        BaseRecord::<[u8], [u8]>::to(&self.topic)
                            .partition(cp)
                            .key(key.as_bytes()),
                    )?;
                    dead.push(key.clone());
                }
            }
            producer
                .commit_transaction(TX_TIMEOUT)
                .context("committing a checkpoint transaction")?;
            Ok(dead)
        })();
        match result {
            Ok(dead) => {
                let keys = self.keys.entry(p).or_default();
                for k in dead {
                    keys.remove(&k);
                }
                keys.extend(written);
                Ok(bytes)
            }
            Err(e) => {
                if let Err(abort) = producer.abort_transaction(TX_TIMEOUT) {
                    warn!("aborting the checkpoint transaction failed: {abort}");
                }
                Err(e)
            }
        }
    }

    fn close(&mut self, partition: i32) {
        self.keys.remove(&partition);
        self.values.remove(&partition);
        self.writers.remove(&partition);
    }

    fn set_writer(&mut self, partition: i32, producer: Arc<ThreadedProducer<DeliveryContext>>) {
        self.writers.insert(partition, producer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_even_with_separators_in_device_names() {
        assert_eq!(
            parse_key(&manifest_key(3, 17)),
            Some((3, Key::Manifest(17)))
        );
        for device in ["pump-1", "a/b#c", "manifest", "x#1#2/3"] {
            let key = chunk_key(12, device, 9, 2, 5);
            assert_eq!(
                parse_key(&key),
                Some((
                    12,
                    Key::Chunk {
                        device,
                        generation: 9,
                        i: 2,
                        n: 5
                    }
                )),
                "{key}"
            );
        }
        assert_eq!(parse_key("garbage"), None);
        assert_eq!(parse_key("1/other#x"), None);
    }
}
