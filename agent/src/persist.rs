//! Atomic, durable storage of the agent's small state files.
//!
//! The role, the generation history and the up-to-date flag must survive
//! `kill -9` and a power cut: a node that reads back a half-written file could
//! believe it is up to date when it is not. So a state file is only ever
//! replaced whole: the new content is written to a temporary file in the same
//! directory, fsynced, renamed over the old file, and the directory is fsynced.
//! After a crash the file holds either the old or the new content, never a mix.
//!
//! The content is opaque bytes (the caller serializes). On disk it is framed by
//! a 16-byte header so that truncation or corruption is detected on read
//! instead of being silently parsed:
//!
//! ```text
//! offset 0  4 bytes  magic "SKST"
//! offset 4  1 byte   format version (1)
//! offset 5  3 bytes  reserved, zero
//! offset 8  4 bytes  payload length, little endian
//! offset 12 4 bytes  CRC-32C of the payload, little endian
//! offset 16 ...      payload
//! ```
//!
//! The functions are blocking (file I/O and fsync): call them from
//! `tokio::task::spawn_blocking` in async code. One writer per file is assumed
//! (the agent owns its state directory); the temporary file name is fixed per
//! target so that a crash leaves at most one stale temporary file, which the
//! next write replaces.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Magic bytes at the start of every state file.
const MAGIC: &[u8; 4] = b"SKST";
/// The only format version written and understood.
const FORMAT_VERSION: u8 = 1;
/// Size of the header in front of the payload.
const HEADER_LEN: usize = 16;
/// Upper bound on a state file's payload: these files are small, a larger
/// length field is corruption, not data.
pub const MAX_PAYLOAD_LEN: usize = 16 * 1024 * 1024;

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file system operation failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done (e.g. "write", "fsync", "rename").
        operation: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file exists but its content is not a valid state file.
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The corrupt file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The payload given to [`write_atomic`] is larger than [`MAX_PAYLOAD_LEN`].
    #[error("state for {path} is too large: {len} bytes (max {MAX_PAYLOAD_LEN})")]
    TooLarge {
        /// The target file.
        path: PathBuf,
        /// The payload length.
        len: usize,
    },
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PersistError {
    let path = path.to_path_buf();
    move |source| PersistError::Io {
        operation,
        path,
        source,
    }
}

/// The fixed temporary file name used while replacing `path`.
fn temp_path(path: &Path) -> PathBuf {
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{file_name}.tmp"))
}

/// The directory holding `path` (the current directory for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Encodes `payload` with the header described in the module documentation.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&[0, 0, 0]);
    let len = u32::try_from(payload.len()).expect("payload length checked against MAX_PAYLOAD_LEN");
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Decodes a state file's bytes, returning the payload or why it is invalid.
pub fn decode(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    if &bytes[0..4] != MAGIC {
        return Err("bad magic (not a safekit state file)".to_string());
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(format!(
            "unsupported format version {} (expected {FORMAT_VERSION})",
            bytes[4]
        ));
    }
    if bytes[5..8] != [0, 0, 0] {
        return Err("reserved header bytes are not zero".to_string());
    }
    let len_field: [u8; 4] = bytes[8..12].try_into().expect("slice of 4 bytes");
    let crc_field: [u8; 4] = bytes[12..16].try_into().expect("slice of 4 bytes");
    let len = u32::from_le_bytes(len_field) as usize;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != len {
        return Err(format!(
            "length mismatch: header says {len} bytes, file holds {}",
            payload.len()
        ));
    }
    let expected_crc = u32::from_le_bytes(crc_field);
    let actual_crc = crc32c::crc32c(payload);
    if expected_crc != actual_crc {
        return Err(format!(
            "checksum mismatch: header {expected_crc:08x}, content {actual_crc:08x}"
        ));
    }
    Ok(payload)
}

/// Replaces `path` with `payload`, atomically and durably.
///
/// When this returns `Ok`, the new content is on stable storage and a reader
/// sees either the old content or the new one, even after a crash at any point.
///
/// # Errors
/// [`PersistError::Io`] naming the failed step and path, or
/// [`PersistError::TooLarge`]. On error the old file is left in place.
pub fn write_atomic(path: &Path, payload: &[u8]) -> Result<(), PersistError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(PersistError::TooLarge {
            path: path.to_path_buf(),
            len: payload.len(),
        });
    }
    let temp = temp_path(path);
    let result = write_temp_and_rename(path, &temp, &encode(payload));
    if result.is_err() {
        // Best effort: do not leave a temporary file behind on failure.
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_temp_and_rename(path: &Path, temp: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(temp)
        .map_err(io_error("create", temp))?;
    file.write_all(bytes).map_err(io_error("write", temp))?;
    file.sync_all().map_err(io_error("fsync", temp))?;
    drop(file);
    fs::rename(temp, path).map_err(io_error("rename", path))?;
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|dir_file| dir_file.sync_all())
        .map_err(io_error("fsync directory", dir))?;
    Ok(())
}

/// Reads the payload of a state file written by [`write_atomic`].
///
/// Returns `Ok(None)` when the file does not exist (a node's first start).
///
/// # Errors
/// [`PersistError::Corrupt`] when the file is truncated, has a wrong magic,
/// version, length or checksum; [`PersistError::Io`] when it cannot be read.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, PersistError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error("open", path)(error)),
    };
    let mut bytes = Vec::new();
    // Read at most one byte past the largest valid file, so a huge corrupt
    // file cannot exhaust memory.
    (&mut file)
        .take((HEADER_LEN + MAX_PAYLOAD_LEN + 1) as u64)
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    match decode(&bytes) {
        Ok(payload) => Ok(Some(payload.to_vec())),
        Err(reason) => Err(PersistError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_returns_the_payload() {
        let payload = b"role=PRIM generation=7";
        assert_eq!(decode(&encode(payload)).unwrap(), payload);
        assert_eq!(decode(&encode(b"")).unwrap(), b"");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let encoded = encode(b"up_to_date=true");
        for byte_idx in 0..encoded.len() {
            for bit in 0..8 {
                let mut damaged = encoded.clone();
                damaged[byte_idx] ^= 1 << bit;
                assert!(
                    decode(&damaged).is_err(),
                    "flip of bit {bit} in byte {byte_idx} not detected"
                );
            }
        }
    }

    #[test]
    fn truncation_is_detected() {
        let encoded = encode(b"generation history");
        for len in 0..encoded.len() {
            assert!(decode(&encoded[..len]).is_err(), "truncated to {len}");
        }
    }
}
