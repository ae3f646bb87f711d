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

/// What a module may have left running, recorded so that a restart after a
/// crash of the agent can clean it up (`SAFEVAR/modules/<AM>/leftovers`,
/// written with [`write_atomic`]; see `crate::daemon::leftovers`).
///
/// The application started by `start_prim`, the virtual IPs and the custom
/// checkers' programs all outlive a `kill -9` of the agent; this record is the
/// only way the next agent knows about them. An empty record
/// ([`LeftoverRecord::is_empty`]) is what a clean stop leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeftoverRecord {
    /// `Some(state)` from just before a start hook (`start_both`, `start_sec`,
    /// `start_second`, `start_prim`) runs until the stop hooks succeeded: what
    /// the hooks started may be running, in `state` (`PRIM`, `ALONE`, `SECOND`).
    pub application: Option<String>,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`) when written:
    /// process ids of another boot mean nothing.
    pub boot_id: String,
    /// The pid of the agent that wrote the record (for the log).
    pub agent_pid: u32,
    /// Virtual IPs held: `(interface, address)`.
    pub vips: Vec<(String, std::net::IpAddr)>,
    /// Process groups of running custom checker programs.
    pub checker_groups: Vec<CheckerGroup>,
}

/// A custom checker program's process group, as recorded in a [`LeftoverRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckerGroup {
    /// The checker's resource (`custom.<ident>`).
    pub resource: String,
    /// The process group id, which is the pid of the program (its leader).
    pub pgid: i32,
    /// The leader's start time (`/proc/<pid>/stat` field 22, clock ticks since
    /// boot): a recycled pid has another one.
    pub start_time: u64,
}

impl LeftoverRecord {
    /// Nothing may be left running: what a clean stop leaves.
    pub fn is_empty(&self) -> bool {
        self.application.is_none() && self.vips.is_empty() && self.checker_groups.is_empty()
    }

    /// The payload: one fact per line (`application PRIM`, `boot_id ...`,
    /// `agent_pid N`, `vip IFNAME ADDR`, `group PGID START_TIME RESOURCE`),
    /// readable in a support snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let mut text = String::new();
        if let Some(state) = &self.application {
            text.push_str(&format!("application {state}\n"));
        }
        text.push_str(&format!("boot_id {}\n", self.boot_id));
        text.push_str(&format!("agent_pid {}\n", self.agent_pid));
        for (ifname, addr) in &self.vips {
            text.push_str(&format!("vip {ifname} {addr}\n"));
        }
        for group in &self.checker_groups {
            text.push_str(&format!(
                "group {} {} {}\n",
                group.pgid, group.start_time, group.resource
            ));
        }
        text.into_bytes()
    }

    /// Parses what [`LeftoverRecord::encode`] wrote.
    ///
    /// # Errors
    /// The first line that is not understood, with why.
    pub fn decode(payload: &[u8]) -> Result<LeftoverRecord, String> {
        let text = std::str::from_utf8(payload).map_err(|error| format!("not UTF-8: {error}"))?;
        let mut record = LeftoverRecord::default();
        for (index, line) in text.lines().enumerate() {
            // A resource name comes last and may hold anything but a line break.
            let fields: Vec<&str> = match line.strip_prefix("group ") {
                Some(rest) => std::iter::once("group")
                    .chain(rest.splitn(3, ' '))
                    .collect(),
                None => line.split(' ').collect(),
            };
            let bad = |what: &str| format!("line {}: {what}: {line:?}", index + 1);
            match fields.as_slice() {
                ["application", state] => record.application = Some((*state).to_string()),
                ["boot_id", id] => record.boot_id = (*id).to_string(),
                ["agent_pid", pid] => {
                    record.agent_pid = pid.parse().map_err(|_| bad("bad pid"))?;
                }
                ["vip", ifname, addr] => record.vips.push((
                    (*ifname).to_string(),
                    addr.parse().map_err(|_| bad("bad address"))?,
                )),
                ["group", pgid, start_time, resource] => {
                    record.checker_groups.push(CheckerGroup {
                        resource: (*resource).to_string(),
                        pgid: pgid.parse().map_err(|_| bad("bad process group"))?,
                        start_time: start_time.parse().map_err(|_| bad("bad start time"))?,
                    });
                }
                _ => return Err(bad("unknown line")),
            }
        }
        Ok(record)
    }
}

/// Reads a module's [`LeftoverRecord`]; `Ok(None)` when there is none.
///
/// # Errors
/// As [`read`], and [`PersistError::Corrupt`] when the payload does not parse.
pub fn read_leftovers(path: &Path) -> Result<Option<LeftoverRecord>, PersistError> {
    let Some(payload) = read(path)? else {
        return Ok(None);
    };
    LeftoverRecord::decode(&payload)
        .map(Some)
        .map_err(|reason| PersistError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })
}

/// Replaces a module's [`LeftoverRecord`], atomically and durably.
///
/// # Errors
/// As [`write_atomic`].
pub fn write_leftovers(path: &Path, record: &LeftoverRecord) -> Result<(), PersistError> {
    write_atomic(path, &record.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LeftoverRecord {
        LeftoverRecord {
            application: Some("ALONE".into()),
            boot_id: "0f4a6d1e-8c1b-4a7e-9d55-5c8e2b7c1a90".into(),
            agent_pid: 4242,
            vips: vec![
                ("eth0".into(), "10.0.0.50".parse().unwrap()),
                ("eth1".into(), "fd00::50".parse().unwrap()),
            ],
            checker_groups: vec![CheckerGroup {
                resource: "custom.app".into(),
                pgid: 1234,
                start_time: 987_654,
            }],
        }
    }

    #[test]
    fn a_leftover_record_survives_a_write_and_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leftovers");
        assert_eq!(read_leftovers(&path).unwrap(), None, "no record yet");
        write_leftovers(&path, &record()).unwrap();
        let read_back = read_leftovers(&path).unwrap().unwrap();
        assert_eq!(read_back, record());
        assert!(!read_back.is_empty());

        // A clean stop clears the application, the VIPs and the groups.
        let cleared = LeftoverRecord {
            boot_id: read_back.boot_id.clone(),
            ..LeftoverRecord::default()
        };
        write_leftovers(&path, &cleared).unwrap();
        let read_back = read_leftovers(&path).unwrap().unwrap();
        assert!(read_back.is_empty(), "{read_back:?}");
        assert_eq!(read_back.application, None);
    }

    #[test]
    fn a_damaged_leftover_record_is_an_error_not_an_empty_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leftovers");
        write_leftovers(&path, &record()).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_leftovers(&path),
            Err(PersistError::Corrupt { .. })
        ));
        // A valid frame around a payload that is not a record.
        write_atomic(&path, b"application PRIM\nvip eth0 not-an-address\n").unwrap();
        let error = read_leftovers(&path).unwrap_err().to_string();
        assert!(error.contains("line 2: bad address"), "{error}");
    }

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
