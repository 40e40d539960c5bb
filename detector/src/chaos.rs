//! Tools of the exactly-once chaos harness (`scripts/chaos.sh`, `detector-chaos`) and of the
//! broker tests: load telemetry with garbage mixed in, wait until a group has committed a
//! whole topic, read topics `read_committed`, and compare a run with a golden run per input
//! record.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use generator::partition_for_key;
use generator::records::InputRecord;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::service::{send, DeliveryContext};

/// Creates topics (ignoring ones that exist).
pub fn create_topics(bootstrap: &str, topics: &[&str], partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    for r in rt.block_on(admin.create_topics(&new, &AdminOptions::new()))? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("creating topic {t}: {code}"),
        }
    }
    Ok(())
}

/// The kinds of invalid messages [`load_with_garbage`] mixes in.
pub const GARBAGE_KINDS: usize = 4;

/// An invalid message of kind `i % GARBAGE_KINDS` for a device: (key, value) = non-JSON, a
/// record missing its value, a valid record under another device's key, an empty value.
pub fn garbage(i: usize, rec: &InputRecord) -> (String, Vec<u8>) {
    let key = rec.device_id.clone();
    match i % GARBAGE_KINDS {
        0 => (key, format!("not json #{i} {{{{").into_bytes()),
        1 => {
            let payload = format!(
                "{{\"deviceId\": {:?}, \"timestamp\": \"2014-01-01T00:00:00Z\"}}",
                rec.device_id
            );
            (key, payload.into_bytes())
        }
        2 => (format!("{key}-wrong-key"), rec.to_json().into_bytes()),
        _ => (key, Vec::new()),
    }
}

/// What [`load_with_garbage`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub valid: u64,
    pub garbage: u64,
}

/// Produces `records` to `topic` (key = device id, partition = the Java client's choice for
/// the key) with one garbage message after every `garbage_every`-th record (0: none).
pub fn load_with_garbage(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    records: impl IntoIterator<Item = InputRecord>,
    garbage_every: usize,
) -> Result<Loaded> {
    let n = NonZeroU32::new(partitions as u32).context("partitions must be positive")?;
    let producer: ThreadedProducer<DeliveryContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create_with_context(DeliveryContext::default())?;
    let mut loaded = Loaded::default();
    for (i, rec) in records.into_iter().enumerate() {
        let p = partition_for_key(rec.device_id.as_bytes(), n) as i32;
        let json = rec.to_json();
        send(
            &producer,
            BaseRecord::to(topic)
                .partition(p)
                .key(rec.device_id.as_bytes())
                .payload(json.as_bytes()),
        )?;
        loaded.valid += 1;
        if garbage_every > 0 && (i + 1) % garbage_every == 0 {
            let (key, payload) = garbage(loaded.garbage as usize, &rec);
            let mut r = BaseRecord::to(topic).partition(p).key(key.as_bytes());
            if !payload.is_empty() {
                r = r.payload(&payload[..]);
            }
            send(&producer, r)?;
            loaded.garbage += 1;
        }
    }
    producer.flush(Duration::from_secs(60))?;
    if let Some(e) = producer.context().first_failure() {
        bail!("some records were not delivered: {e}");
    }
    Ok(loaded)
}

struct Quiet;
impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!("{error}: {reason}");
        }
    }
}
impl ConsumerContext for Quiet {}

fn reader(bootstrap: &str, group: &str, isolation: &str) -> Result<BaseConsumer<Quiet>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create_with_context(Quiet)?)
}

fn partition_count(c: &BaseConsumer<Quiet>, topic: &str) -> Result<i32> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(20))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| anyhow!("no topic {topic}"))?;
    if let Some(e) = t.error() {
        bail!("topic {topic}: {e:?}");
    }
    Ok(t.partitions().len() as i32)
}

/// End offsets (high watermarks) of every partition of a topic.
pub fn end_offsets(bootstrap: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
    let c = reader(bootstrap, "detector-chaos-watermarks", "read_committed")?;
    let n = partition_count(&c, topic)?;
    let mut out = BTreeMap::new();
    for p in 0..n {
        let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(20))?;
        out.insert(p, high);
    }
    Ok(out)
}

/// Waits until `group` has committed offsets at the end of every partition of `topic`
/// (everything processed and committed); returns the committed offsets.
pub fn wait_committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<i32, i64>> {
    let ends = end_offsets(bootstrap, topic)?;
    let c = reader(bootstrap, group, "read_committed")?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut tpl = TopicPartitionList::new();
        for &p in ends.keys() {
            tpl.add_partition(topic, p);
        }
        let mut committed = BTreeMap::new();
        if let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(10)) {
            for e in got.elements() {
                if let Offset::Offset(o) = e.offset() {
                    committed.insert(e.partition(), o);
                }
            }
        }
        if ends
            .iter()
            .all(|(p, &end)| end == 0 || committed.get(p).is_some_and(|&c| c >= end))
        {
            return Ok(committed);
        }
        if Instant::now() > deadline {
            bail!(
                "group {group} committed {committed:?} of {topic}, whose ends are {ends:?}, \
                 after {timeout:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A message read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

/// Everything committed on a topic, read with `isolation.level=read_committed`.
pub fn read_committed(bootstrap: &str, topic: &str) -> Result<Vec<Read>> {
    read_topic(bootstrap, topic, "read_committed")
}

/// Every record of `topic`, aborted and still-open transactions' included: what a verify
/// that found records missing reads to tell a transaction left open or aborted from a
/// record never produced.
pub fn read_uncommitted(bootstrap: &str, topic: &str) -> Result<Vec<Read>> {
    read_topic(bootstrap, topic, "read_uncommitted")
}

fn read_topic(bootstrap: &str, topic: &str, isolation: &str) -> Result<Vec<Read>> {
    let c = reader(bootstrap, "detector-chaos-reader", isolation)?;
    let n = partition_count(&c, topic)?;
    let mut tpl = TopicPartitionList::new();
    let mut pending = 0;
    for p in 0..n {
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(20))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            pending += 1;
        }
    }
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    c.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while pending > 0 {
        if Instant::now() > deadline {
            bail!("reading {topic}: {pending} partitions did not reach their end");
        }
        match c.poll(Duration::from_millis(500)) {
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
                out.push(Read {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            Some(Err(KafkaError::PartitionEOF(_))) => pending -= 1,
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// Input (partition, offset) → the payloads of its enriched records.
pub type BySource = BTreeMap<(i32, i64), Vec<Vec<u8>>>;

/// Input (partition, offset) → enriched payloads, from the output topic's records (each says
/// where it came from).
pub fn enriched_by_source(out: &[Read]) -> Result<BySource> {
    let mut map: BTreeMap<(i32, i64), Vec<Vec<u8>>> = BTreeMap::new();
    for r in out {
        let payload = r.payload.clone().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&payload)
            .with_context(|| format!("output record {}:{} is not JSON", r.partition, r.offset))?;
        let p = v["partition"]
            .as_i64()
            .context("output record without partition")?;
        let o = v["offset"]
            .as_i64()
            .context("output record without offset")?;
        map.entry((p as i32, o)).or_default().push(payload);
    }
    Ok(map)
}

/// Input (partition, offset) → number of dead letters for it.
pub fn dead_by_source(dead: &[Read]) -> Result<BTreeMap<(i32, i64), u64>> {
    let mut map = BTreeMap::new();
    for r in dead {
        let p: i32 = r
            .headers
            .get("source.partition")
            .and_then(|s| s.parse().ok())
            .context("dead letter without source.partition")?;
        let o: i64 = r
            .headers
            .get("source.offset")
            .and_then(|s| s.parse().ok())
            .context("dead letter without source.offset")?;
        *map.entry((p, o)).or_insert(0) += 1;
    }
    Ok(map)
}

/// A run compared with the golden run, per input record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Input records.
    pub records: u64,
    /// Input records with an enriched record.
    pub enriched: u64,
    /// Input records enriched in the golden run but not in this one.
    pub lost: u64,
    /// Extra copies (enriched or dead letter) beyond the first.
    pub duplicated: u64,
    /// Input records enriched with a payload differing from the golden one (or enriched here
    /// but not in the golden run).
    pub mismatched: u64,
    /// Input records with a dead letter.
    pub dead_letters: u64,
    /// Input records with both an enriched record and a dead letter, or neither.
    pub unaccounted: u64,
}

impl Comparison {
    /// No loss, no duplicate, no mismatch, every record accounted for, and as many dead
    /// letters as expected.
    pub fn ok(&self, expected_dead_letters: u64) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.mismatched == 0
            && self.unaccounted == 0
            && self.dead_letters == expected_dead_letters
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "records={} enriched={} lost={} duplicated={} mismatched={} dead_letters={}",
            self.records,
            self.enriched,
            self.lost,
            self.duplicated,
            self.mismatched,
            self.dead_letters
        )
    }
}

/// Compares a run's output and dead letters with the golden run's output. `input_ends` are
/// the input topic's end offsets (its records are offsets 0..end: a non-transactional
/// producer wrote them).
/// The input records with no outcome or two kinds (see [`Comparison::unaccounted`]).
pub fn unaccounted(
    input_ends: &BTreeMap<i32, i64>,
    out: &BySource,
    dead: &BTreeMap<(i32, i64), u64>,
) -> Vec<(i32, i64)> {
    let mut keys = Vec::new();
    for (&p, &end) in input_ends {
        for o in 0..end {
            let k = (p, o);
            if out.contains_key(&k) == dead.contains_key(&k) {
                keys.push(k);
            }
        }
    }
    keys
}

pub fn compare(
    input_ends: &BTreeMap<i32, i64>,
    golden: &BySource,
    out: &BySource,
    dead: &BTreeMap<(i32, i64), u64>,
) -> Comparison {
    let mut c = Comparison {
        records: input_ends.values().map(|&e| e.max(0) as u64).sum(),
        ..Comparison::default()
    };
    for (key, copies) in out {
        c.enriched += 1;
        c.duplicated += copies.len() as u64 - 1;
        match golden.get(key).and_then(|g| g.first()) {
            Some(g) if copies.iter().all(|x| x == g) => {}
            _ => c.mismatched += 1,
        }
    }
    for key in golden.keys() {
        if !out.contains_key(key) {
            c.lost += 1;
        }
    }
    for n in dead.values() {
        c.dead_letters += 1;
        c.duplicated += n - 1;
    }
    c.unaccounted = unaccounted(input_ends, out, dead).len() as u64;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_counts_loss_duplicates_mismatches_and_dead_letters() {
        let ends = BTreeMap::from([(0, 4), (1, 2)]);
        let golden = BTreeMap::from([
            ((0, 0), vec![b"a".to_vec()]),
            ((0, 1), vec![b"b".to_vec()]),
            ((0, 3), vec![b"d".to_vec()]),
            ((1, 0), vec![b"e".to_vec()]),
            ((1, 1), vec![b"f".to_vec()]),
        ]);
        let dead = BTreeMap::from([((0, 2), 1)]);
        let perfect = compare(&ends, &golden, &golden, &dead);
        assert!(perfect.ok(1), "{perfect}");
        assert_eq!(perfect.records, 6);
        assert_eq!(perfect.enriched, 5);

        let mut out = golden.clone();
        out.remove(&(0, 1));
        out.get_mut(&(1, 0)).unwrap().push(b"e".to_vec());
        out.insert((1, 1), vec![b"F".to_vec()]);
        let dead2 = BTreeMap::from([((0, 2), 2)]);
        let c = compare(&ends, &golden, &out, &dead2);
        assert_eq!((c.lost, c.duplicated, c.mismatched), (1, 2, 1), "{c}");
        assert_eq!(c.unaccounted, 1, "(0, 1) has no outcome at all");
        assert!(!c.ok(1));
    }

    #[test]
    fn garbage_kinds_are_all_invalid() {
        let rec = InputRecord {
            device_id: "d".into(),
            timestamp: 0,
            value: 1.0,
            fields: None,
        };
        for i in 0..GARBAGE_KINDS {
            let (key, payload) = garbage(i, &rec);
            match InputRecord::from_json(&payload) {
                Err(_) => {}
                Ok(r) => assert_ne!(r.device_id, key, "kind {i} must not be a valid record"),
            }
        }
    }
}
