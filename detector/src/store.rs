//! Directory checkpoint store: one file per device, written atomically.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What a device checkpoint holds: the network's bytes and the input position they reflect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceCheckpoint {
    pub device: String,
    pub partition: i32,
    /// Offset of the last input record the network has processed.
    pub offset: i64,
    /// `htm::network::Network::to_bytes` (versioned and checksummed itself).
    pub network: Vec<u8>,
}

/// Checkpoints under `root/<topic>-<partition>/<device>.ckpt`.
#[derive(Clone, Debug)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store rooted at `root` (created when missing).
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create checkpoint directory {}", root.display()))?;
        Ok(DirStore {
            root: root.to_path_buf(),
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
        let dir = self.dir(topic, cp.partition);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = self.path(topic, cp.partition, &cp.device);
        let tmp = path.with_extension("ckpt.tmp");
        let bytes = htm::checkpoint::encode(cp);
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync directory {}", dir.display()))?;
        Ok(bytes.len())
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

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("10-001-0002-44201-1"), "10-001-0002-44201-1");
        assert_eq!(file_name("../x"), "%2E.%2Fx");
    }
}
