//! Checkpoint framing: a versioned, checksummed envelope around a bincode 2 payload.
//!
//! Layout (little endian): magic `HTMCKPT\0` (8 bytes) · format version (u32) · payload length
//! (u64) · CRC-32 of the payload (u32) · payload. The version changes whenever the serialised
//! layout of a network changes, so an old blob is refused with a clear message instead of
//! being misread.

use serde::{de::DeserializeOwned, Serialize};

/// Leading bytes of every checkpoint.
pub const MAGIC: &[u8; 8] = b"HTMCKPT\0";
/// Version of the serialised network layout written by this build.
pub const FORMAT_VERSION: u32 = 6;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("checkpoint too short: {0} bytes, the header alone is {HEADER_LEN}")]
    TooShort(usize),
    #[error("not an HTM checkpoint (bad magic bytes)")]
    BadMagic,
    #[error("checkpoint format version {found} is not supported by this build (it reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error(
        "checkpoint truncated or padded: header declares {declared} payload bytes, found {actual}"
    )]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("checkpoint corrupt: CRC-32 {actual:#010x} does not match recorded {expected:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("checkpoint payload does not decode: {0}")]
    Decode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Frames `value` as a checkpoint.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(value, config())
        .expect("in-memory serialisation of plain data cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks the envelope and decodes the payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CheckpointError> {
    if bytes.len() < HEADER_LEN {
        return Err(CheckpointError::TooShort(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(CheckpointError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let declared = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
    let expected = u32::from_le_bytes(bytes[20..24].try_into().unwrap());
    let payload = &bytes[HEADER_LEN..];
    if declared != payload.len() as u64 {
        return Err(CheckpointError::LengthMismatch {
            declared,
            actual: payload.len() as u64,
        });
    }
    let actual = crc32fast::hash(payload);
    if actual != expected {
        return Err(CheckpointError::Checksum { expected, actual });
    }
    let (value, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CheckpointError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CheckpointError::Decode(format!(
            "{} trailing bytes after the network",
            payload.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_kind_of_damage_is_named() {
        let v: Vec<u32> = (0..100).collect();
        let bytes = encode(&v);
        assert_eq!(decode::<Vec<u32>>(&bytes).unwrap(), v);

        assert_eq!(
            decode::<Vec<u32>>(&bytes[..10]),
            Err(CheckpointError::TooShort(10))
        );

        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode::<Vec<u32>>(&bad), Err(CheckpointError::BadMagic));

        let mut bad = bytes.clone();
        bad[8] = 99;
        assert!(matches!(
            decode::<Vec<u32>>(&bad),
            Err(CheckpointError::UnsupportedVersion { found: 99, .. })
        ));

        assert!(matches!(
            decode::<Vec<u32>>(&bytes[..bytes.len() - 1]),
            Err(CheckpointError::LengthMismatch { .. })
        ));

        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(matches!(
            decode::<Vec<u32>>(&bad),
            Err(CheckpointError::Checksum { .. })
        ));
    }
}
