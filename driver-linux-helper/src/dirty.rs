//! The dirty log: a durable list of files that may differ between the two nodes.
//!
//! While the peer is absent (or went silent with operations unacknowledged),
//! the primary cannot replicate; instead it records here every file it
//! touched, and answers the application only after the record is on disk.
//! After a crash or on the peer's return, the reintegration reads this list
//! back ([`DirtyLog::load`]) and resynchronises just these files, then
//! [`DirtyLog::clear`]s it.
//!
//! # File format (version 1)
//!
//! ```text
//! header:  b"SKDIRTY1"                                   (8 bytes)
//! record:  body_len: u32 LE | crc: u32 LE | body          (repeated)
//!          body = postcard(TouchedFile { dir: u16, path: RelPath, range: Option<ByteRange> })
//!          crc  = CRC-32C of body
//! ```
//!
//! Records are only appended. A record with `range: None` means "the whole
//! file (or the name itself) may differ"; a record with a range means only
//! that byte range. A crash can leave a torn last record (short, or with a bad
//! CRC): [`DirtyLog::load`] stops at the first such record and reports it, and
//! [`DirtyLog::open`] cuts the file back to the last complete record. A record
//! is never lost once [`DirtyLog::record`] returned.
//!
//! # Durability and dedupe
//!
//! [`DirtyLog::record`] writes all new records of one call with one `write`
//! and one `fdatasync` before it returns. An in-memory index keeps a hot file
//! from being recorded again: once a file has a whole-file record, nothing more
//! is written for it; after [`MAX_RANGES_PER_FILE`] range records, the next one
//! is a whole-file record.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use safekit_protocol::replication::{RelPath, TouchedFile};

/// The first bytes of a dirty log file.
pub const HEADER: &[u8; 8] = b"SKDIRTY1";

/// Range records kept per file before the file is recorded whole.
pub const MAX_RANGES_PER_FILE: u32 = 16;

/// A record body larger than this is treated as torn (a path is at most a few KiB).
const MAX_RECORD_LEN: u32 = 1 << 20;

/// Why the dirty log could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The file system refused.
    #[error("dirty log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file exists but is not a dirty log.
    #[error("dirty log {0}: not a dirty log (bad header)")]
    BadHeader(PathBuf),
}

/// What [`DirtyLog::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedDirtyLog {
    /// The records, in the order they were written.
    pub files: Vec<TouchedFile>,
    /// Whether a torn or corrupt record was found (and ignored) after the last good one.
    pub torn_tail: bool,
    /// The length of the valid prefix of the file.
    pub valid_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    Whole,
    Ranges(u32),
}

#[derive(Debug)]
struct Inner {
    file: File,
    seen: HashMap<(u16, RelPath), Recorded>,
}

/// An open dirty log, shared by every thread of a mount.
#[derive(Debug)]
pub struct DirtyLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DirtyLogError + '_ {
    move |source| DirtyLogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DirtyLog {
    /// Opens the log at `path`, creating it (durably) if needed; keeps its records and
    /// cuts a torn tail.
    ///
    /// # Errors
    /// I/O errors, or [`DirtyLogError::BadHeader`] if the file is something else.
    pub fn open(path: &Path) -> Result<Self, DirtyLogError> {
        let exists = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_error(path))?;
        let mut seen = HashMap::new();
        let length = file.metadata().map_err(io_error(path))?.len();
        // A crash while creating the file can leave part of the header: start afresh.
        let header_only_partly = length < HEADER.len() as u64 && {
            let mut start = Vec::new();
            file.read_to_end(&mut start).map_err(io_error(path))?;
            HEADER.starts_with(&start)
        };
        if !exists || header_only_partly {
            file.set_len(0).map_err(io_error(path))?;
            file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
            file.write_all(HEADER).map_err(io_error(path))?;
            file.sync_all().map_err(io_error(path))?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|dir| dir.sync_all())
                    .map_err(io_error(path))?;
            }
        } else {
            let loaded = Self::load(path)?;
            for touched in &loaded.files {
                note(&mut seen, touched);
            }
            if loaded.torn_tail {
                tracing::warn!(path = %path.display(), "dirty log has a torn last record; cutting it");
                file.set_len(loaded.valid_len).map_err(io_error(path))?;
                file.sync_all().map_err(io_error(path))?;
            }
        }
        file.seek(SeekFrom::End(0)).map_err(io_error(path))?;
        Ok(DirtyLog {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner { file, seen }),
        })
    }

    /// Reads a log back (after a crash, or to resync), tolerating a torn last record.
    ///
    /// # Errors
    /// I/O errors, or [`DirtyLogError::BadHeader`].
    pub fn load(path: &Path) -> Result<LoadedDirtyLog, DirtyLogError> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .map_err(io_error(path))?;
        parse(&bytes).ok_or_else(|| DirtyLogError::BadHeader(path.to_path_buf()))
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `files` durably: returns once every new record is on disk.
    /// Files already recorded (see the module doc) write nothing and cost no sync.
    ///
    /// # Errors
    /// The write or sync failed; the in-memory index then forgets these files so a
    /// later call retries them.
    pub fn record(&self, files: &[TouchedFile]) -> io::Result<usize> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = Vec::new();
        let mut noted = Vec::new();
        for touched in files {
            let key = (touched.dir, touched.path.clone());
            let record = match (inner.seen.get(&key), touched.range) {
                (Some(Recorded::Whole), _) => continue,
                (Some(Recorded::Ranges(n)), Some(_)) if *n >= MAX_RANGES_PER_FILE => TouchedFile {
                    range: None,
                    ..touched.clone()
                },
                _ => touched.clone(),
            };
            let previous = inner.seen.get(&key).copied();
            note(&mut inner.seen, &record);
            noted.push((key, previous));
            let body = postcard::to_allocvec(&record).map_err(io::Error::other)?;
            let body_len = u32::try_from(body.len()).map_err(io::Error::other)?;
            batch.extend_from_slice(&body_len.to_le_bytes());
            batch.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            batch.extend_from_slice(&body);
        }
        if batch.is_empty() {
            return Ok(0);
        }
        let length_before = inner.file.stream_position()?;
        let result = inner
            .file
            .write_all(&batch)
            .and_then(|()| inner.file.sync_data());
        if let Err(error) = result {
            // Cut a partial batch so that later records are not hidden behind a torn one.
            let _ = inner.file.set_len(length_before);
            let _ = inner.file.seek(SeekFrom::Start(length_before));
            for (key, previous) in noted {
                match previous {
                    Some(state) => inner.seen.insert(key, state),
                    None => inner.seen.remove(&key),
                };
            }
            return Err(error);
        }
        Ok(noted.len())
    }

    /// Whether a file has any record.
    pub fn contains(&self, dir: u16, path: &RelPath) -> bool {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.seen.contains_key(&(dir, path.clone()))
    }

    /// Empties the log durably (after a successful resync).
    ///
    /// # Errors
    /// The truncate, write or sync failed.
    pub fn clear(&self) -> io::Result<()> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.file.set_len(HEADER.len() as u64)?;
        inner.file.seek(SeekFrom::End(0))?;
        inner.file.sync_all()?;
        inner.seen.clear();
        Ok(())
    }
}

fn note(seen: &mut HashMap<(u16, RelPath), Recorded>, touched: &TouchedFile) {
    let key = (touched.dir, touched.path.clone());
    let next = match (seen.get(&key), touched.range) {
        (_, None) | (Some(Recorded::Whole), _) => Recorded::Whole,
        (Some(Recorded::Ranges(n)), Some(_)) => Recorded::Ranges(n.saturating_add(1)),
        (None, Some(_)) => Recorded::Ranges(1),
    };
    seen.insert(key, next);
}

/// Parses a whole log; `None` if the header is wrong.
fn parse(bytes: &[u8]) -> Option<LoadedDirtyLog> {
    let mut rest = bytes.strip_prefix(HEADER.as_slice())?;
    let mut files = Vec::new();
    let mut valid_len = HEADER.len() as u64;
    let torn_tail = loop {
        if rest.is_empty() {
            break false;
        }
        let Some(record) = parse_record(rest) else {
            break true;
        };
        let (touched, used) = record;
        files.push(touched);
        rest = &rest[used..];
        valid_len += used as u64;
    };
    Some(LoadedDirtyLog {
        files,
        torn_tail,
        valid_len,
    })
}

fn parse_record(bytes: &[u8]) -> Option<(TouchedFile, usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    if len > MAX_RECORD_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let body = bytes.get(8..8 + len as usize)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let (touched, rest): (TouchedFile, _) = postcard::take_from_bytes(body).ok()?;
    if !rest.is_empty() || touched.path.validate().is_err() {
        return None;
    }
    Some((touched, 8 + len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekit_protocol::replication::ByteRange;

    fn whole(path: &str) -> TouchedFile {
        TouchedFile {
            dir: 0,
            path: RelPath::parse(path.as_bytes()).expect("valid"),
            range: None,
        }
    }

    fn ranged(path: &str, offset: u64) -> TouchedFile {
        TouchedFile {
            dir: 1,
            path: RelPath::parse(path.as_bytes()).expect("valid"),
            range: Some(ByteRange { offset, len: 4096 }),
        }
    }

    #[test]
    fn records_survive_reopen_and_hot_files_are_recorded_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        assert_eq!(log.record(&[whole("a"), whole("b/c")]).expect("record"), 2);
        assert_eq!(log.record(&[whole("a"), whole("a")]).expect("record"), 0);
        assert_eq!(
            log.record(&[ranged("big", 0), ranged("big", 4096)])
                .expect("record"),
            2
        );
        drop(log);
        let loaded = DirtyLog::load(&path).expect("load");
        assert!(!loaded.torn_tail);
        assert_eq!(
            loaded.files,
            vec![
                whole("a"),
                whole("b/c"),
                ranged("big", 0),
                ranged("big", 4096)
            ]
        );
        let log = DirtyLog::open(&path).expect("reopen");
        assert!(log.contains(0, &RelPath::parse(b"a").expect("valid")));
        assert_eq!(
            log.record(&[whole("a")]).expect("record"),
            0,
            "dedupe index rebuilt from the file"
        );
    }

    #[test]
    fn many_ranges_of_one_file_become_one_whole_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        for block in 0..100u64 {
            log.record(&[ranged("hot", block * 4096)]).expect("record");
        }
        let loaded = DirtyLog::load(&path).expect("load");
        assert_eq!(loaded.files.len(), MAX_RANGES_PER_FILE as usize + 1);
        assert_eq!(loaded.files.last().expect("records").range, None);
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        log.record(&[whole("kept")]).expect("record");
        log.record(&[whole("torn")]).expect("record");
        drop(log);
        let full_len = std::fs::metadata(&path).expect("stat").len();
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for tearing");
        file.set_len(full_len - 3).expect("tear");
        drop(file);
        let loaded = DirtyLog::load(&path).expect("load");
        assert!(loaded.torn_tail);
        assert_eq!(loaded.files, vec![whole("kept")]);
        let log = DirtyLog::open(&path).expect("reopen");
        log.record(&[whole("after")]).expect("record after tear");
        let loaded = DirtyLog::load(&path).expect("load");
        assert!(!loaded.torn_tail);
        assert_eq!(loaded.files, vec![whole("kept"), whole("after")]);
    }

    #[test]
    fn clear_empties_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        log.record(&[whole("a")]).expect("record");
        log.clear().expect("clear");
        assert_eq!(DirtyLog::load(&path).expect("load").files, vec![]);
        assert_eq!(
            log.record(&[whole("a")]).expect("record"),
            1,
            "recorded again after clear"
        );
    }

    #[test]
    fn a_torn_header_starts_a_fresh_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        std::fs::write(&path, &HEADER[..3]).expect("write");
        let log = DirtyLog::open(&path).expect("open");
        log.record(&[whole("a")]).expect("record");
        assert_eq!(DirtyLog::load(&path).expect("load").files, vec![whole("a")]);
    }

    #[test]
    fn something_else_is_not_a_dirty_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        std::fs::write(&path, b"hello").expect("write");
        assert!(matches!(
            DirtyLog::open(&path),
            Err(DirtyLogError::BadHeader(_))
        ));
    }
}
