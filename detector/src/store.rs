//! Checkpoint stores.
//!
//! * [`DirStore`]: one file per device, the newest state only (at-least-once processing).
//! * Partition snapshots (exactly-once processing): a [`Manifest`] per partition and
//!   generation lists every device network of the partition, all reflecting exactly the input
//!   records below `snapshot_offset`. A snapshot writes only the networks that changed since
//!   the previous generation; unchanged ones stay referenced from older generations. Stores
//!   keep the last two generations (and everything they reference) so a damaged newest
//!   snapshot falls back to the one before. [`DirSnapshots`] keeps them in a directory,
//!   `kafka_store::KafkaSnapshots` in a compacted topic; [`restore`] picks the newest usable one.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

/// What a device checkpoint holds: the network's bytes and the input position they reflect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceCheckpoint {
    pub device: String,
    pub partition: i32,
    /// Offset of the last input record the network has processed.
    pub offset: i64,
    /// `htm::network::Network::to_bytes` (versioned and checksummed itself). Encoded as one
    /// block rather than byte by byte; the bytes on disk are the same either way.
    #[serde(with = "serde_bytes")]
    pub network: Vec<u8>,
}

/// Checkpoints under `root/<topic>-<partition>/<device>.ckpt`.
#[derive(Clone, Debug)]
pub struct DirStore {
    root: PathBuf,
    /// Whether a save is durable before it returns (fsync of file and directory).
    durable: bool,
}

impl DirStore {
    /// A store rooted at `root` (created when missing).
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create checkpoint directory {}", root.display()))?;
        Ok(DirStore {
            root: root.to_path_buf(),
            durable: true,
        })
    }

    /// A store whose saves need not survive a machine crash, only be read back by this
    /// process (the exactly-once spill area, trusted only within the process's life): no
    /// fsync, which makes evictions much cheaper. Writes stay atomic (temp file + rename).
    pub fn open_scratch(root: &Path) -> Result<Self> {
        Ok(DirStore {
            durable: false,
            ..Self::open(root)?
        })
    }

    fn dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.root.join(format!("{}-{partition}", file_name(topic)))
    }

    fn path(&self, topic: &str, partition: i32, device: &str) -> PathBuf {
        self.dir(topic, partition)
            .join(format!("{}.ckpt", file_name(device)))
    }

    /// Writes a checkpoint so that a crash at any moment leaves either the old or the new file:
    /// temp file, fsync, rename over the old one, fsync the directory. Returns the bytes written.
    pub fn save(&self, topic: &str, cp: &DeviceCheckpoint) -> Result<usize> {
        let bytes = self.save_unsynced(topic, cp)?;
        self.sync_partition(topic, cp.partition)?;
        Ok(bytes)
    }

    /// [`DirStore::save`] but for the directory's fsync: the rename is durable only after
    /// [`DirStore::sync_partition`], which serves many files at once.
    pub fn save_unsynced(&self, topic: &str, cp: &DeviceCheckpoint) -> Result<usize> {
        let dir = self.dir(topic, cp.partition);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = self.path(topic, cp.partition, &cp.device);
        let tmp = path.with_extension("ckpt.tmp");
        let bytes = htm::checkpoint::encode(cp);
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| if self.durable { f.sync_all() } else { Ok(()) })
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        Ok(bytes.len())
    }

    /// Makes the renames of a partition's saved files durable (fsync of its directory).
    pub fn sync_partition(&self, topic: &str, partition: i32) -> Result<()> {
        if self.durable {
            let dir = self.dir(topic, partition);
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync directory {}", dir.display()))?;
        }
        Ok(())
    }

    /// Reads a device's checkpoint; `Ok(None)` when it has none. A damaged file is an error
    /// naming the file, never silently used.
    pub fn load(
        &self,
        topic: &str,
        partition: i32,
        device: &str,
    ) -> Result<Option<DeviceCheckpoint>> {
        let path = self.path(topic, partition, device);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let cp: DeviceCheckpoint = htm::checkpoint::decode(&bytes)
            .with_context(|| format!("checkpoint {}", path.display()))?;
        anyhow::ensure!(
            cp.device == device && cp.partition == partition,
            "checkpoint {} belongs to device {:?} partition {}",
            path.display(),
            cp.device,
            cp.partition
        );
        Ok(Some(cp))
    }
}

/// The table of contents of one partition snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Input topic.
    pub topic: String,
    pub partition: i32,
    /// Increases with every snapshot of the partition.
    pub generation: u64,
    /// Every listed network reflects exactly the partition's records below this offset: the
    /// input position to resume from.
    pub snapshot_offset: i64,
    /// Every device of the partition and where its network is stored.
    pub devices: BTreeMap<String, BlobRef>,
}

/// Where a device's network is stored and what it must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Generation of the snapshot that wrote the blob (a later one may still refer to it).
    pub generation: u64,
    /// Offset of the last input record the network processed (-1: none).
    pub offset: i64,
    pub len: u64,
    /// CRC-32 of the blob: a blob from another writer or generation, or a damaged one, is
    /// refused rather than used.
    pub crc32: u32,
}

impl Manifest {
    /// The blobs this manifest needs: (device, generation).
    pub fn blobs(&self) -> impl Iterator<Item = (&str, u64)> {
        self.devices.iter().map(|(d, r)| (d.as_str(), r.generation))
    }
}

/// A manifest as found in a store: decoded, or why it could not be.
#[derive(Clone, Debug)]
pub struct FoundManifest {
    pub generation: u64,
    pub manifest: std::result::Result<Manifest, String>,
    /// File or key, for messages.
    pub location: String,
}

/// Storage of partition snapshots. Called from one thread at a time.
pub trait SnapshotStore: Send {
    /// Reads what the store holds for a partition (at assignment): its manifests, newest
    /// first, each decoded or with the reason it could not be.
    fn open(&mut self, partition: i32) -> Result<Vec<FoundManifest>>;
    /// A device's blob of a generation; `None` when missing or incomplete.
    fn blob(&mut self, partition: i32, device: &str, generation: u64) -> Result<Option<Vec<u8>>>;
    /// Writes the new blobs, then the manifest (so a crash never leaves a manifest whose blobs
    /// are missing), then removes manifests and blobs of the partition that neither `manifest`
    /// nor `keep` needs. Returns the bytes written.
    fn write(
        &mut self,
        manifest: &Manifest,
        blobs: &[(String, Vec<u8>)],
        keep: Option<&Manifest>,
    ) -> Result<usize>;
    /// Forgets what was cached for a partition (after revocation).
    fn close(&mut self, partition: i32);
    /// The transactional producer that owns the partition (stores writing to Kafka use it,
    /// so a fenced owner cannot write snapshots either).
    fn set_writer(&mut self, _partition: i32, _producer: std::sync::Arc<crate::eos::TxProducer>) {}
}

/// What [`restore`] chose for a partition.
#[derive(Debug, Default)]
pub struct Restored {
    /// The snapshot installed; `None`: start from the partition's first retained record.
    pub manifest: Option<Manifest>,
    /// Highest generation present in the store (the next snapshot is numbered above it).
    pub max_generation: u64,
    /// Damaged or unusable snapshots met on the way, described (already logged).
    pub problems: Vec<String>,
}

/// Picks the newest snapshot of `partition` that is intact, whose blobs are all present with
/// the recorded length and CRC, which `install` accepts, and which is not ahead of the
/// committed offset `committed`. Every damaged snapshot met is logged and listed in
/// `problems`; none is ever used. `install` receives (device, offset, network bytes) and
/// must make the networks live (or fail without effect).
pub fn restore(
    store: &mut dyn SnapshotStore,
    partition: i32,
    committed: i64,
    mut install: impl FnMut(Vec<(String, i64, Vec<u8>)>) -> Result<()>,
) -> Result<Restored> {
    let found = store.open(partition)?;
    let mut out = Restored {
        max_generation: found.iter().map(|f| f.generation).max().unwrap_or(0),
        ..Restored::default()
    };
    'candidates: for f in found {
        let m = match f.manifest {
            Ok(m) => m,
            Err(reason) => {
                out.problems
                    .push(format!("manifest {}: {reason}", f.location));
                continue;
            }
        };
        if m.partition != partition {
            out.problems.push(format!(
                "manifest {} belongs to partition {}",
                f.location, m.partition
            ));
            continue;
        }
        if m.snapshot_offset > committed {
            // Only possible when the group's offsets were moved back by hand.
            warn!(
                partition,
                generation = m.generation,
                snapshot_offset = m.snapshot_offset,
                committed,
                "snapshot is ahead of the committed offset; using an older one"
            );
            continue;
        }
        let mut devices = Vec::with_capacity(m.devices.len());
        for (device, r) in &m.devices {
            let bytes = match store.blob(partition, device, r.generation)? {
                Some(b) => b,
                None => {
                    out.problems.push(format!(
                        "snapshot {} of partition {partition}: network of {device:?} (generation {}) is missing",
                        m.generation, r.generation
                    ));
                    continue 'candidates;
                }
            };
            if bytes.len() as u64 != r.len || crc32fast::hash(&bytes) != r.crc32 {
                out.problems.push(format!(
                    "snapshot {} of partition {partition}: network of {device:?} (generation {}) is corrupt \
                     ({} bytes, CRC-32 {:#010x}; expected {} bytes, {:#010x})",
                    m.generation,
                    r.generation,
                    bytes.len(),
                    crc32fast::hash(&bytes),
                    r.len,
                    r.crc32
                ));
                continue 'candidates;
            }
            devices.push((device.clone(), r.offset, bytes));
        }
        if let Err(e) = install(devices) {
            out.problems.push(format!(
                "snapshot {} of partition {partition}: {e:#}",
                m.generation
            ));
            continue;
        }
        out.manifest = Some(m);
        break;
    }
    for p in &out.problems {
        error!(partition, "corrupt checkpoint, not used: {p}");
    }
    Ok(out)
}

/// Partition snapshots in a directory: `root/<topic>-<partition>/snapshots/` holds
/// `manifest-<generation>.ckpt` (framed and checksummed like every checkpoint) and
/// `<device>@<generation>.net` (a network's bytes). Every file is written to a temporary name,
/// synced and renamed into place; the directory is synced before the manifest is renamed.
/// Several instances may share the directory (one owner per partition at a time).
#[derive(Clone, Debug)]
pub struct DirSnapshots {
    root: PathBuf,
    topic: String,
}

const MANIFEST_PREFIX: &str = "manifest-";
const MANIFEST_SUFFIX: &str = ".ckpt";
const BLOB_SUFFIX: &str = ".net";

impl DirSnapshots {
    /// Snapshots of `topic`'s partitions under `root` (created when missing).
    pub fn open(root: &Path, topic: &str) -> Result<Self> {
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create checkpoint directory {}", root.display()))?;
        Ok(DirSnapshots {
            root: root.to_path_buf(),
            topic: topic.to_string(),
        })
    }

    /// The directory of a partition's snapshots.
    pub fn partition_dir(&self, partition: i32) -> PathBuf {
        self.root
            .join(format!("{}-{partition}", file_name(&self.topic)))
            .join("snapshots")
    }

    fn manifest_path(&self, partition: i32, generation: u64) -> PathBuf {
        self.partition_dir(partition).join(format!(
            "{MANIFEST_PREFIX}{generation:020}{MANIFEST_SUFFIX}"
        ))
    }

    /// Where a device's blob of a generation lives.
    pub fn blob_path(&self, partition: i32, device: &str, generation: u64) -> PathBuf {
        self.partition_dir(partition)
            .join(format!("{}@{generation}{BLOB_SUFFIX}", file_name(device)))
    }

    fn entries(&self, partition: i32) -> Result<Vec<String>> {
        let dir = self.partition_dir(partition);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        let mut names = Vec::new();
        for e in rd {
            let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
            if let Some(n) = e.file_name().to_str() {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}

fn manifest_generation(name: &str) -> Option<u64> {
    name.strip_prefix(MANIFEST_PREFIX)?
        .strip_suffix(MANIFEST_SUFFIX)?
        .parse()
        .ok()
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} into place", tmp.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

impl SnapshotStore for DirSnapshots {
    fn open(&mut self, partition: i32) -> Result<Vec<FoundManifest>> {
        let mut gens: Vec<u64> = self
            .entries(partition)?
            .iter()
            .filter_map(|n| manifest_generation(n))
            .collect();
        gens.sort_unstable_by_key(|&g| std::cmp::Reverse(g));
        let mut out = Vec::with_capacity(gens.len());
        for generation in gens {
            let path = self.manifest_path(partition, generation);
            let manifest = match fs::read(&path) {
                Ok(bytes) => htm::checkpoint::decode::<Manifest>(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        if m.generation == generation && m.topic == self.topic {
                            Ok(m)
                        } else {
                            Err(format!(
                                "holds generation {} of topic {:?}",
                                m.generation, m.topic
                            ))
                        }
                    }),
                Err(e) => Err(format!("unreadable: {e}")),
            };
            out.push(FoundManifest {
                generation,
                manifest,
                location: path.display().to_string(),
            });
        }
        Ok(out)
    }

    fn blob(&mut self, partition: i32, device: &str, generation: u64) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(partition, device, generation);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn write(
        &mut self,
        manifest: &Manifest,
        blobs: &[(String, Vec<u8>)],
        keep: Option<&Manifest>,
    ) -> Result<usize> {
        let p = manifest.partition;
        let dir = self.partition_dir(p);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut bytes = 0;
        for (device, blob) in blobs {
            write_file_synced(&self.blob_path(p, device, manifest.generation), blob)?;
            bytes += blob.len();
        }
        // The blobs' names must be durable before a manifest can refer to them.
        sync_dir(&dir)?;
        let encoded = htm::checkpoint::encode(manifest);
        write_file_synced(&self.manifest_path(p, manifest.generation), &encoded)?;
        sync_dir(&dir)?;
        bytes += encoded.len();

        // Garbage: whatever neither the new nor the kept snapshot needs.
        let mut needed: BTreeSet<String> = BTreeSet::new();
        let mut gens = vec![manifest.generation];
        for m in std::iter::once(manifest).chain(keep) {
            for (d, g) in m.blobs() {
                needed.insert(format!("{}@{g}{BLOB_SUFFIX}", file_name(d)));
            }
        }
        gens.extend(keep.map(|k| k.generation));
        for name in self.entries(p)? {
            let garbage = match manifest_generation(&name) {
                Some(g) => !gens.contains(&g),
                // A temporary file is left over from a crash mid-write.
                None => {
                    (name.ends_with(BLOB_SUFFIX) && !needed.contains(&name))
                        || name.ends_with(".tmp")
                }
            };
            if garbage {
                let path = dir.join(&name);
                if let Err(e) = fs::remove_file(&path) {
                    warn!("cannot remove old checkpoint {}: {e}", path.display());
                }
            }
        }
        Ok(bytes)
    }

    fn close(&mut self, _partition: i32) {}
}

/// A file-system-safe, collision-free rendering of a name: ASCII letters, digits, `.`, `-`
/// and `_` stay, every other byte becomes `%XX`.
fn file_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(device: &str, offset: i64) -> DeviceCheckpoint {
        DeviceCheckpoint {
            device: device.into(),
            partition: 3,
            offset,
            network: vec![1, 2, 3],
        }
    }

    #[test]
    fn save_load_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        assert_eq!(store.load("t", 3, "a/b").unwrap(), None);
        store.save("t", &cp("a/b", 5)).unwrap();
        store.save("t", &cp("a/b", 9)).unwrap();
        assert_eq!(store.load("t", 3, "a/b").unwrap(), Some(cp("a/b", 9)));
        assert_eq!(
            store.load("t", 3, "a%2Fb").unwrap(),
            None,
            "escaping is collision-free"
        );
    }

    #[test]
    fn network_bytes_encode_as_they_did_byte_by_byte() {
        // The layout of checkpoints written before the block encoding.
        #[derive(Serialize)]
        struct ByteByByte {
            device: String,
            partition: i32,
            offset: i64,
            network: Vec<u8>,
        }
        let network: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let old = ByteByByte {
            device: "d".into(),
            partition: 1,
            offset: 42,
            network: network.clone(),
        };
        let new = DeviceCheckpoint {
            device: "d".into(),
            partition: 1,
            offset: 42,
            network,
        };
        let bytes = htm::checkpoint::encode(&old);
        assert_eq!(htm::checkpoint::encode(&new), bytes);
        assert_eq!(
            htm::checkpoint::decode::<DeviceCheckpoint>(&bytes).unwrap(),
            new
        );
    }

    #[test]
    fn damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        store.save("t", &cp("dev", 1)).unwrap();
        let path = store.path("t", 3, "dev");
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = format!("{:#}", store.load("t", 3, "dev").unwrap_err());
        assert!(err.contains("dev.ckpt") && err.contains("corrupt"), "{err}");
    }

    fn manifest(generation: u64, offset: i64, devices: &[(&str, u64, &[u8])]) -> Manifest {
        Manifest {
            topic: "t".into(),
            partition: 3,
            generation,
            snapshot_offset: offset,
            devices: devices
                .iter()
                .map(|(d, g, b)| {
                    let r = BlobRef {
                        generation: *g,
                        offset: offset - 1,
                        len: b.len() as u64,
                        crc32: crc32fast::hash(b),
                    };
                    (d.to_string(), r)
                })
                .collect(),
        }
    }

    #[test]
    fn snapshots_keep_two_generations_and_restore_falls_back_on_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DirSnapshots::open(dir.path(), "t").unwrap();
        assert!(store.open(3).unwrap().is_empty());
        let m1 = manifest(1, 10, &[("a", 1, b"a1"), ("b/x", 1, b"b1")]);
        store
            .write(
                &m1,
                &[("a".into(), b"a1".to_vec()), ("b/x".into(), b"b1".to_vec())],
                None,
            )
            .unwrap();
        let m2 = manifest(2, 20, &[("a", 2, b"a2"), ("b/x", 1, b"b1")]);
        store
            .write(&m2, &[("a".into(), b"a2".to_vec())], Some(&m1))
            .unwrap();
        let m3 = manifest(3, 30, &[("a", 3, b"a3"), ("b/x", 1, b"b1")]);
        store
            .write(&m3, &[("a".into(), b"a3".to_vec())], Some(&m2))
            .unwrap();
        let found = store.open(3).unwrap();
        let gens: Vec<u64> = found.iter().map(|f| f.generation).collect();
        assert_eq!(gens, [3, 2], "older generations are removed");
        assert_eq!(
            store.blob(3, "a", 1).unwrap(),
            None,
            "unreferenced blob removed"
        );
        assert_eq!(
            store.blob(3, "b/x", 1).unwrap().unwrap(),
            b"b1",
            "still referenced"
        );

        let installed = std::cell::RefCell::new(Vec::new());
        let install = |d: Vec<(String, i64, Vec<u8>)>| {
            *installed.borrow_mut() = d;
            Ok(())
        };
        let r = restore(&mut store, 3, 30, install).unwrap();
        assert_eq!(r.manifest.unwrap().generation, 3);
        assert!(r.problems.is_empty());
        assert_eq!(installed.borrow()[0], ("a".to_string(), 29, b"a3".to_vec()));

        // Not ahead of the committed offset: generation 3 is skipped silently.
        let r = restore(&mut store, 3, 25, install).unwrap();
        assert_eq!(r.manifest.unwrap().generation, 2);
        assert!(r.problems.is_empty());

        // A damaged blob of the newest generation: reported, the previous one used.
        fs::write(store.blob_path(3, "a", 3), b"A3").unwrap();
        let r = restore(&mut store, 3, 30, install).unwrap();
        assert_eq!(r.manifest.unwrap().generation, 2);
        assert_eq!(r.problems.len(), 1);
        assert!(r.problems[0].contains("corrupt"), "{:?}", r.problems);
        assert_eq!(installed.borrow()[0].2, b"a2");

        // An installer refusing a network (undecodable) counts as damage too; with the other
        // generation's manifest truncated nothing is usable.
        let path = store.manifest_path(3, 2);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let r = restore(&mut store, 3, 30, |_| Ok(())).unwrap();
        assert!(r.manifest.is_none());
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        assert_eq!(r.max_generation, 3);
        let r = restore(&mut store, 3, 30, |_| anyhow::bail!("undecodable")).unwrap();
        assert!(r.manifest.is_none());
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("10-001-0002-44201-1"), "10-001-0002-44201-1");
        assert_eq!(file_name("../x"), "%2E.%2Fx");
    }
}
