//! The dirty log: a durable list of files that may differ between the two nodes.
//!
//! While the peer is absent (or went silent with operations unacknowledged),
//! the primary cannot replicate; instead it records here every file it
//! touched, and answers the application only after the record is on disk.
//! After a crash or on the peer's return, the reintegration reads this list
//! back ([`DirtyLog::load`]) and resynchronises just these files, then
//! [`DirtyLog::clear`]s it.
//!
//! # What a record says ([`Change`])
//!
//! - [`Change::Range`]: only this byte range of a regular file's data may
//!   differ (a write, a fallocate). The resync then hashes and compares only
//!   the blocks covering the file's recorded ranges, on both sides.
//! - [`Change::Attrs`]: only the entry's attributes (mode, owner, times,
//!   xattrs) may differ, not its data nor, for a directory, its entries. The
//!   times a namespace change ships for the parent directory are recorded so:
//!   the names the change created, removed or renamed have records of their
//!   own, so the resync compares just those names, not the parent's subtree.
//! - [`Change::Whole`]: anything about the name may differ (created, removed,
//!   renamed, truncated, or too many ranges): a file is compared whole, a
//!   directory as a subtree, a name gone on the primary is removed on the replica.
//!
//! [`records_of`] maps a replicated operation to its records.
//!
//! # File format (version 2)
//!
//! ```text
//! header:  b"SKDIRTY2"                                   (8 bytes)
//! record:  body_len: u32 LE | crc: u32 LE | body          (repeated)
//!          body = postcard(DirtyRecord { dir: u16, path: RelPath, change: Change })
//!          crc  = CRC-32C of body
//! ```
//!
//! Version 1 (`SKDIRTY1`, bodies `TouchedFile { dir, path, range }`, a missing
//! range meaning the whole file) is still read, and rewritten as version 2
//! when opened for appending.
//!
//! Records are only appended. A crash can leave a torn last record (short, or
//! with a bad CRC): [`DirtyLog::load`] stops at the first such record and
//! reports it, and [`DirtyLog::open`] cuts the file back to the last complete
//! record. A record is never lost once [`DirtyLog::record_changes`] returned.
//!
//! # Durability, group commit and dedupe
//!
//! [`DirtyLog::record_changes`] appends all new records of one call with one
//! `write`, and returns only once an `fdatasync` that started after that write
//! has succeeded. Concurrent callers share syncs (group commit): each append
//! takes a sequence number; one caller at a time leads a sync covering every
//! append made so far, the others wait for it, and whoever finds its record
//! still not covered when a sync ends leads the next one. So `n` concurrent
//! recorders cost about two syncs, not `n`.
//!
//! An in-memory index keeps a hot file from being recorded again: once a file
//! has a whole-file record, nothing more is written for it; a range inside one
//! already recorded for the file writes nothing; attributes of a file with any
//! record write nothing. A call that writes nothing costs no sync, unless a
//! record it relies on is still being synced: it then waits for that sync (a
//! covered change is only answered once the covering record is durable).
//!
//! Ranges are widened to [`RANGE_GRANULE`] (1 MiB) extents, as DRBD's activity
//! log does: random 8 KiB writes over a file then cost one record and one sync
//! per extent first touched, not per 64 KiB block. The price is at resync
//! time: every 64 KiB block of a recorded extent is hashed and compared on both
//! sides (16 per extent), which reads at most 1 MiB more per extent than the
//! written blocks and sends only the blocks that differ. A range that extends a
//! recorded one forward is recorded with as much again ahead of it, so a
//! sequential writer costs a number of records logarithmic in what it wrote.
//! After [`MAX_RANGES_PER_FILE`] range records, the next one is a whole-file
//! record.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use safekit_protocol::replication::{ByteRange, Op, RelPath, TouchedFile};
use serde::{Deserialize, Serialize};

/// The first bytes of a dirty log file.
pub const HEADER: &[u8; 8] = b"SKDIRTY2";

/// The first bytes of a version-1 dirty log (still read).
pub const HEADER_V1: &[u8; 8] = b"SKDIRTY1";

/// Range records kept per file before the file is recorded whole.
pub const MAX_RANGES_PER_FILE: u32 = 1024;

/// Recorded ranges are widened to multiples of this extent (16 of the resync's
/// default 64 KiB blocks; see the module doc).
pub const RANGE_GRANULE: u64 = 1024 * 1024;

/// A record body larger than this is treated as torn (a path is at most a few KiB).
const MAX_RECORD_LEN: u32 = 1 << 20;

/// What may differ about a recorded name (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Change {
    /// Anything: content, existence, type (for a directory, its subtree).
    Whole,
    /// Only this byte range of a regular file's data.
    Range(ByteRange),
    /// Only the entry's attributes (mode, owner, times, xattrs).
    Attrs,
    /// Renamed away while the peer was absent: as [`Change::Whole`] for
    /// what to compare, and the first half of a rename's history (the next
    /// record, a [`Change::RenameTarget`], names where it went), which the
    /// resync replays on the replica before comparing, so that a renamed
    /// directory or big file is not copied again.
    RenameSource,
    /// Where the [`Change::RenameSource`] just before went; as [`Change::Whole`].
    RenameTarget,
}

impl Change {
    /// A half of a rename's history (always appended, never covered).
    pub fn is_rename(self) -> bool {
        matches!(self, Change::RenameSource | Change::RenameTarget)
    }
}

/// One record of the dirty log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirtyRecord {
    /// The replicated directory.
    pub dir: u16,
    /// The name beneath it.
    pub path: RelPath,
    /// What may differ.
    pub change: Change,
}

impl From<TouchedFile> for DirtyRecord {
    fn from(touched: TouchedFile) -> Self {
        DirtyRecord {
            dir: touched.dir,
            path: touched.path,
            change: touched.range.map_or(Change::Whole, Change::Range),
        }
    }
}

impl From<&DirtyRecord> for TouchedFile {
    /// The coarser view: attributes-only records become whole-file ones.
    fn from(record: &DirtyRecord) -> Self {
        TouchedFile {
            dir: record.dir,
            path: record.path.clone(),
            range: match record.change {
                Change::Range(range) => Some(range),
                Change::Whole | Change::Attrs | Change::RenameSource | Change::RenameTarget => None,
            },
        }
    }
}

/// The records an operation needs when it cannot be confirmed by the peer:
/// its changed range for a write or fallocate, attributes only for a
/// `SetAttr` or an xattr change (and the existing name of a hard link), the
/// whole name otherwise (a fsync names its whole file: while it is
/// unconfirmed, the file may not be on the peer's disk).
pub fn records_of(op: &Op) -> Vec<DirtyRecord> {
    let dir = op.dir();
    let record = |path: &RelPath, change| DirtyRecord {
        dir,
        path: path.clone(),
        change,
    };
    match op {
        Op::Write {
            path, offset, data, ..
        } => vec![record(
            path,
            Change::Range(ByteRange {
                offset: *offset,
                len: data.len() as u64,
            }),
        )],
        Op::Fallocate {
            path, offset, len, ..
        } => vec![record(
            path,
            Change::Range(ByteRange {
                offset: *offset,
                len: *len,
            }),
        )],
        Op::SetAttr { path, .. } | Op::SetXattr { path, .. } | Op::RemoveXattr { path, .. } => {
            vec![record(path, Change::Attrs)]
        }
        Op::Link { existing, new, .. } => {
            vec![record(existing, Change::Attrs), record(new, Change::Whole)]
        }
        other => other
            .paths()
            .into_iter()
            .map(|path| record(path, Change::Whole))
            .collect(),
    }
}

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
    pub records: Vec<DirtyRecord>,
    /// The same, in the coarser form of the replication protocol (attributes
    /// records as whole-file ones).
    pub files: Vec<TouchedFile>,
    /// Whether a torn or corrupt record was found (and ignored) after the last good one.
    pub torn_tail: bool,
    /// The length of the valid prefix of the file.
    pub valid_len: u64,
    /// The file is in the version-1 format.
    pub version1: bool,
}

/// What the in-memory index knows of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Recorded {
    Attrs,
    /// Recorded ranges, merged, sorted, as `(start, end)`; and the number of range records.
    Ranges(Vec<(u64, u64)>, u32),
    Whole,
}

#[derive(Debug)]
struct Inner {
    file: File,
    seen: HashMap<(u16, RelPath), Recorded>,
    /// Recorded names a running resync has brought up to date (see
    /// [`DirtyLog::mark_settled`]); in memory only.
    settled: HashSet<(u16, RelPath)>,
    /// Sequence number of the last append.
    appended: u64,
    /// Every append up to this one is durable.
    synced: u64,
    /// The file length once every append up to `synced` is in it.
    synced_len: u64,
    /// A caller is running a sync (without the lock).
    syncing: bool,
    /// Appends cut after a failed sync, as `(first, last)` sequence numbers.
    lost: Vec<(u64, u64)>,
}

/// Counters of a dirty log, since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirtyLogStats {
    /// Records appended.
    pub records: u64,
    /// `fdatasync` calls made for appends.
    pub syncs: u64,
}

/// An open dirty log, shared by every thread of a mount.
#[derive(Debug)]
pub struct DirtyLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Signalled when a sync ends.
    synced: Condvar,
    /// The same file, synced by a group-commit leader without holding `inner`.
    sync_handle: File,
    records: AtomicU64,
    syncs: AtomicU64,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DirtyLogError + '_ {
    move |source| DirtyLogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn encode(record: &DirtyRecord, out: &mut Vec<u8>) -> io::Result<()> {
    let body = postcard::to_allocvec(record).map_err(io::Error::other)?;
    let body_len = u32::try_from(body.len()).map_err(io::Error::other)?;
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => File::open(parent).and_then(|dir| dir.sync_all()),
        None => Ok(()),
    }
}

impl DirtyLog {
    /// Opens the log at `path`, creating it (durably) if needed; keeps its records and
    /// cuts a torn tail. A version-1 log is rewritten (atomically) as version 2.
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
            HEADER.starts_with(&start) || HEADER_V1.starts_with(&start)
        };
        if !exists || header_only_partly {
            file.set_len(0).map_err(io_error(path))?;
            file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
            file.write_all(HEADER).map_err(io_error(path))?;
            file.sync_all().map_err(io_error(path))?;
            sync_parent(path).map_err(io_error(path))?;
        } else {
            let loaded = Self::load(path)?;
            seen = index_of(&loaded.records);
            if loaded.version1 {
                // Rewrite in the current format, then replace the old file.
                let mut bytes = HEADER.to_vec();
                for record in &loaded.records {
                    encode(record, &mut bytes).map_err(io_error(path))?;
                }
                let mut temp_name = path.as_os_str().to_owned();
                temp_name.push(".v2");
                let temp = PathBuf::from(temp_name);
                let mut out = File::create(&temp).map_err(io_error(path))?;
                out.write_all(&bytes)
                    .and_then(|()| out.sync_all())
                    .map_err(io_error(path))?;
                std::fs::rename(&temp, path).map_err(io_error(path))?;
                sync_parent(path).map_err(io_error(path))?;
                file = out;
                tracing::info!(path = %path.display(), records = loaded.records.len(), "dirty log converted to version 2");
            } else if loaded.torn_tail {
                tracing::warn!(path = %path.display(), "dirty log has a torn last record; cutting it");
                file.set_len(loaded.valid_len).map_err(io_error(path))?;
                file.sync_all().map_err(io_error(path))?;
            }
        }
        let synced_len = file.seek(SeekFrom::End(0)).map_err(io_error(path))?;
        let sync_handle = file.try_clone().map_err(io_error(path))?;
        Ok(DirtyLog {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                seen,
                settled: HashSet::new(),
                appended: 0,
                synced: 0,
                synced_len,
                syncing: false,
                lost: Vec::new(),
            }),
            synced: Condvar::new(),
            sync_handle,
            records: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
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

    /// Records `files` durably (a file without a range as a whole-file record);
    /// see [`DirtyLog::record_changes`].
    ///
    /// # Errors
    /// See [`DirtyLog::record_changes`].
    pub fn record(&self, files: &[TouchedFile]) -> io::Result<usize> {
        let records: Vec<DirtyRecord> = files.iter().cloned().map(DirtyRecord::from).collect();
        self.record_changes(&records)
    }

    /// Records `records` durably: returns once every new record is on disk, sharing the
    /// sync with concurrent callers (see the module doc). Records already covered write
    /// nothing and cost no sync of their own (they wait for the covering record's).
    /// Returns the number of records written.
    ///
    /// # Errors
    /// The write or sync failed; the in-memory index then forgets these records (after
    /// a failed sync, it is rebuilt from the file) so a later call retries them.
    pub fn record_changes(&self, records: &[DirtyRecord]) -> io::Result<usize> {
        let mut inner = self.lock();
        let mut batch = Vec::new();
        let mut noted: Vec<((u16, RelPath), Option<Recorded>)> = Vec::new();
        for wanted in records {
            let key = (wanted.dir, wanted.path.clone());
            // A change to a name the running resync already brought up to date
            // is new to it: always appended, so that its final stage sees it.
            let previous = if inner.settled.remove(&key) {
                None
            } else {
                inner.seen.get(&key).cloned()
            };
            let Some(record) = to_write(previous.as_ref(), wanted) else {
                continue;
            };
            let next = next_state(previous.as_ref(), &record);
            inner.seen.insert(key.clone(), next);
            noted.push((key, previous));
            if let Err(error) = encode(&record, &mut batch) {
                forget(&mut inner, noted);
                return Err(error);
            }
        }
        if batch.is_empty() {
            // Nothing new; but a record covering these may still be on its way to the
            // disk: wait for every append made so far (no sync at all if none is pending).
            let wanted = inner.appended;
            return self.wait_durable(inner, wanted).map(|_| 0);
        }
        let length_before = inner.file.stream_position()?;
        if let Err(error) = inner.file.write_all(&batch) {
            // Cut a partial batch so that later records are not hidden behind a torn one
            // (appends are made under the lock: the end of the file is this batch).
            let _ = inner.file.set_len(length_before);
            let _ = inner.file.seek(SeekFrom::Start(length_before));
            forget(&mut inner, noted);
            return Err(error);
        }
        inner.appended += 1;
        let sequence = inner.appended;
        self.records
            .fetch_add(noted.len() as u64, Ordering::Relaxed);
        // On a failed sync, the index was rebuilt from what the file still holds.
        self.wait_durable(inner, sequence).map(|_| noted.len())
    }

    /// Returns once append `sequence` is durable, leading a sync if none running
    /// covers it; an error if a failed sync cut it.
    fn wait_durable<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        sequence: u64,
    ) -> io::Result<MutexGuard<'a, Inner>> {
        loop {
            if inner
                .lost
                .iter()
                .any(|&(first, last)| first <= sequence && sequence <= last)
            {
                return Err(io::Error::other(
                    "the dirty log sync failed; the record was cut",
                ));
            }
            if inner.synced >= sequence {
                return Ok(inner);
            }
            if inner.syncing {
                inner = self
                    .synced
                    .wait(inner)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            // Lead: sync every append made so far, without holding the lock.
            inner.syncing = true;
            let target = inner.appended;
            let target_len = inner.file.stream_position();
            drop(inner);
            self.syncs.fetch_add(1, Ordering::Relaxed);
            let result = target_len.and_then(|len| self.sync_handle.sync_data().map(|()| len));
            inner = self.lock();
            inner.syncing = false;
            match result {
                Ok(len) => {
                    inner.synced = inner.synced.max(target);
                    inner.synced_len = inner.synced_len.max(len);
                }
                Err(error) => {
                    // Cut every append not known durable: whatever follows must not sit
                    // behind a record the disk may not hold.
                    let (first, last) = (inner.synced + 1, inner.appended);
                    let synced_len = inner.synced_len;
                    let _ = inner.file.set_len(synced_len);
                    let _ = inner.file.seek(SeekFrom::Start(synced_len));
                    inner.lost.push((first, last));
                    inner.synced = last;
                    // Other callers must not take a cut record as covering their change:
                    // the index becomes what the file still holds.
                    inner.seen = match Self::load(&self.path) {
                        Ok(loaded) => index_of(&loaded.records),
                        Err(_) => HashMap::new(),
                    };
                    self.synced.notify_all();
                    tracing::error!(%error, "dirty log sync failed; unsynced records cut");
                    if first <= sequence && sequence <= last {
                        return Err(error);
                    }
                    continue;
                }
            }
            self.synced.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counters since the log was opened.
    pub fn stats(&self) -> DirtyLogStats {
        DirtyLogStats {
            records: self.records.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
        }
    }

    /// Whether a file has a record the running resync (if any) has not settled.
    pub fn contains(&self, dir: u16, path: &RelPath) -> bool {
        let inner = self.lock();
        let key = (dir, path.clone());
        inner.seen.contains_key(&key) && !inner.settled.contains(&key)
    }

    /// Whether `path` or anything beneath it has a record the running resync
    /// (if any) has not settled.
    pub fn contains_at_or_under(&self, dir: u16, path: &RelPath) -> bool {
        let prefix = path.components();
        let inner = self.lock();
        inner.seen.keys().any(|key| {
            key.0 == dir && key.1.components().starts_with(prefix) && !inner.settled.contains(key)
        })
    }

    /// A running resync brought the recorded name `path` up to date: until a
    /// new change to it is recorded, it no longer counts as recorded for
    /// [`DirtyLog::contains`] and [`DirtyLog::contains_at_or_under`] (so that
    /// a live rename of it needs no record: the peer's copy it moves is
    /// current). The records stay in the file until [`DirtyLog::clear`].
    pub fn mark_settled(&self, dir: u16, path: &RelPath) {
        let mut inner = self.lock();
        if inner.seen.contains_key(&(dir, path.clone())) {
            inner.settled.insert((dir, path.clone()));
        }
    }

    /// Forgets every [`DirtyLog::mark_settled`] (a resync starts or ends).
    pub fn forget_settled(&self) {
        self.lock().settled.clear();
    }

    /// Empties the log (after a successful resync).
    ///
    /// # Errors
    /// The truncate, write or sync failed.
    pub fn clear(&self) -> io::Result<()> {
        let mut inner = self.lock();
        while inner.syncing {
            inner = self
                .synced
                .wait(inner)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        // Not synced: if a crash brings the old records back, the next resync
        // compares those files again (they are in sync: nothing is sent), and
        // a record appended later is synced with its own fdatasync, which
        // makes the new length durable too.
        inner.file.set_len(HEADER.len() as u64)?;
        inner.file.seek(SeekFrom::End(0))?;
        inner.seen.clear();
        inner.settled.clear();
        // Pending appends were cleared with the rest: nothing is left to wait for.
        inner.synced = inner.appended;
        inner.synced_len = HEADER.len() as u64;
        self.synced.notify_all();
        Ok(())
    }
}

/// The index of what `records` say, in order.
fn index_of(records: &[DirtyRecord]) -> HashMap<(u16, RelPath), Recorded> {
    let mut seen = HashMap::new();
    for record in records {
        let key = (record.dir, record.path.clone());
        let next = next_state(seen.get(&key), record);
        seen.insert(key, next);
    }
    seen
}

/// Drops what a failed call noted from the index (in reverse, so that a name noted
/// twice is forgotten whole); a later call records it again.
fn forget(inner: &mut Inner, noted: Vec<((u16, RelPath), Option<Recorded>)>) {
    for (key, previous) in noted.into_iter().rev() {
        match previous {
            Some(state) => inner.seen.insert(key, state),
            None => inner.seen.remove(&key),
        };
    }
}

/// `[offset, offset + len)` widened to [`RANGE_GRANULE`] boundaries.
fn granules(range: ByteRange) -> (u64, u64) {
    let start = range.offset - range.offset % RANGE_GRANULE;
    let end = range.offset.saturating_add(range.len.max(1));
    let end = end.div_ceil(RANGE_GRANULE).saturating_mul(RANGE_GRANULE);
    (start, end.max(start))
}

/// The record to write for `wanted` given what is recorded already, or `None` if covered.
fn to_write(previous: Option<&Recorded>, wanted: &DirtyRecord) -> Option<DirtyRecord> {
    let with = |change| DirtyRecord {
        change,
        ..wanted.clone()
    };
    match (previous, wanted.change) {
        (_, Change::RenameSource | Change::RenameTarget) => Some(wanted.clone()),
        (Some(Recorded::Whole), _) => None,
        (_, Change::Whole) => Some(wanted.clone()),
        (Some(_), Change::Attrs) => None,
        (None, Change::Attrs) => Some(wanted.clone()),
        (Some(Recorded::Ranges(_, count)), Change::Range(_)) if *count >= MAX_RANGES_PER_FILE => {
            Some(with(Change::Whole))
        }
        (previous, Change::Range(range)) => {
            let (start, end) = granules(range);
            let runs: &[(u64, u64)] = match previous {
                Some(Recorded::Ranges(runs, _)) => runs,
                _ => &[],
            };
            if runs.iter().any(|&(a, b)| a <= start && end <= b) {
                return None;
            }
            // Touching or overlapping runs merge; growing a run forward records as
            // much again ahead (a sequential writer then costs few records).
            let mut merged = (start, end);
            for &(a, b) in runs {
                if a <= merged.1 && merged.0 <= b {
                    if merged.1 > b {
                        let grown = merged.1 - a.min(merged.0);
                        merged.1 = merged.1.saturating_add(grown);
                    }
                    merged = (merged.0.min(a), merged.1.max(b));
                }
            }
            Some(with(Change::Range(ByteRange {
                offset: merged.0,
                len: merged.1 - merged.0,
            })))
        }
    }
}

/// The index state after `record` was written.
fn next_state(previous: Option<&Recorded>, record: &DirtyRecord) -> Recorded {
    match (previous, record.change) {
        (Some(Recorded::Whole), _)
        | (_, Change::Whole | Change::RenameSource | Change::RenameTarget) => Recorded::Whole,
        (Some(state), Change::Attrs) => state.clone(),
        (None, Change::Attrs) => Recorded::Attrs,
        (previous, Change::Range(range)) => {
            let (mut runs, count) = match previous {
                Some(Recorded::Ranges(runs, count)) => (runs.clone(), *count),
                _ => (Vec::new(), 0),
            };
            let end = range.offset.saturating_add(range.len);
            runs.push((range.offset, end));
            Recorded::Ranges(merge_runs(runs), count.saturating_add(1))
        }
    }
}

/// Sorts and merges overlapping or touching `(start, end)` runs.
pub fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (start, end) in runs {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Parses a whole log; `None` if the header is wrong.
fn parse(bytes: &[u8]) -> Option<LoadedDirtyLog> {
    let (mut rest, version1) = match bytes.strip_prefix(HEADER.as_slice()) {
        Some(rest) => (rest, false),
        None => (bytes.strip_prefix(HEADER_V1.as_slice())?, true),
    };
    let mut records = Vec::new();
    let mut valid_len = HEADER.len() as u64;
    let torn_tail = loop {
        if rest.is_empty() {
            break false;
        }
        let Some((record, used)) = parse_record(rest, version1) else {
            break true;
        };
        records.push(record);
        rest = &rest[used..];
        valid_len += used as u64;
    };
    Some(LoadedDirtyLog {
        files: records.iter().map(TouchedFile::from).collect(),
        records,
        torn_tail,
        valid_len,
        version1,
    })
}

fn parse_record(bytes: &[u8], version1: bool) -> Option<(DirtyRecord, usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    if len > MAX_RECORD_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let body = bytes.get(8..8 + len as usize)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let (record, rest) = if version1 {
        let (touched, rest): (TouchedFile, _) = postcard::take_from_bytes(body).ok()?;
        (DirtyRecord::from(touched), rest)
    } else {
        postcard::take_from_bytes::<DirtyRecord>(body).ok()?
    };
    if !rest.is_empty() || record.path.validate().is_err() {
        return None;
    }
    Some((record, 8 + len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekit_protocol::replication::ByteRange;
    use std::sync::Arc;

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

    fn ranged_at(path: &str, offset: u64, len: u64) -> TouchedFile {
        TouchedFile {
            dir: 1,
            path: RelPath::parse(path.as_bytes()).expect("valid"),
            range: Some(ByteRange { offset, len }),
        }
    }

    fn record(path: &str, change: Change) -> DirtyRecord {
        DirtyRecord {
            dir: 0,
            path: RelPath::parse(path.as_bytes()).expect("valid"),
            change,
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
            1,
            "the second range lies in the first one's granule"
        );
        drop(log);
        let loaded = DirtyLog::load(&path).expect("load");
        assert!(!loaded.torn_tail);
        assert_eq!(
            loaded.files,
            vec![whole("a"), whole("b/c"), ranged_at("big", 0, RANGE_GRANULE)]
        );
        let log = DirtyLog::open(&path).expect("reopen");
        assert!(log.contains(0, &RelPath::parse(b"a").expect("valid")));
        assert_eq!(
            log.record(&[whole("a"), ranged("big", 8192)])
                .expect("record"),
            0,
            "dedupe index rebuilt from the file"
        );
    }

    #[test]
    fn ranges_are_kept_apart_and_a_sequential_writer_costs_few_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        // Scattered writes: one record each, exactly the granules written.
        for block in [3u64, 40, 17] {
            log.record(&[ranged_at("scattered", block << 20, 4096)])
                .expect("record");
        }
        // 64 MiB written sequentially in 128 KiB writes.
        let mut written = 0;
        for offset in (0..64u64 << 20).step_by(128 << 10) {
            written += log
                .record(&[ranged_at("sequential", offset, 128 << 10)])
                .expect("record");
        }
        let loaded = DirtyLog::load(&path).expect("load");
        let scattered: Vec<_> = loaded
            .files
            .iter()
            .filter(|f| f.path.to_bytes() == b"scattered")
            .map(|f| f.range.expect("ranged"))
            .collect();
        assert_eq!(
            scattered,
            [3u64, 40, 17]
                .iter()
                .map(|b| ByteRange {
                    offset: b << 20,
                    len: RANGE_GRANULE
                })
                .collect::<Vec<_>>()
        );
        assert!(
            written <= 16,
            "a sequential writer of 512 writes wrote {written} records"
        );
        let covered = merge_runs(
            loaded
                .files
                .iter()
                .filter(|f| f.path.to_bytes() == b"sequential")
                .map(|f| f.range.expect("ranged"))
                .map(|r| (r.offset, r.offset + r.len))
                .collect(),
        );
        assert_eq!(covered.len(), 1);
        assert!(covered[0].0 == 0 && covered[0].1 >= 64 << 20, "{covered:?}");
    }

    #[test]
    fn attributes_records_never_hide_data_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        let range = Change::Range(ByteRange {
            offset: 0,
            len: RANGE_GRANULE,
        });
        let written = log
            .record_changes(&[
                record("d", Change::Attrs),
                record("d", Change::Attrs),
                record("f", Change::Attrs),
                record("f", range),
                record("f", Change::Attrs),
                record("d", Change::Whole),
            ])
            .expect("record");
        assert_eq!(written, 4);
        let loaded = DirtyLog::load(&path).expect("load");
        assert_eq!(
            loaded.records,
            vec![
                record("d", Change::Attrs),
                record("f", Change::Attrs),
                record("f", range),
                record("d", Change::Whole),
            ]
        );
    }

    #[test]
    fn operations_map_to_names_ranges_and_attributes() {
        let p = |s: &str| RelPath::parse(s.as_bytes()).expect("valid");
        let rename = Op::Rename {
            dir: 0,
            from: p("a/x"),
            to: p("b/y"),
            flags: 0,
        };
        assert_eq!(
            records_of(&rename),
            vec![record("a/x", Change::Whole), record("b/y", Change::Whole)]
        );
        let times = Op::SetAttr {
            dir: 0,
            path: p("a"),
            mode: None,
            uid: None,
            gid: None,
            atime: None,
            mtime: None,
        };
        assert_eq!(records_of(&times), vec![record("a", Change::Attrs)]);
        let write = Op::Write {
            dir: 0,
            path: p("f"),
            offset: 10,
            data: vec![1; 5],
        };
        assert_eq!(
            records_of(&write),
            vec![record("f", Change::Range(ByteRange { offset: 10, len: 5 }))]
        );
    }

    #[test]
    fn many_ranges_of_one_file_become_one_whole_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        for block in 0..u64::from(MAX_RANGES_PER_FILE) + 50 {
            log.record(&[ranged("hot", block << 21)]).expect("record");
        }
        let loaded = DirtyLog::load(&path).expect("load");
        assert_eq!(loaded.files.len(), MAX_RANGES_PER_FILE as usize + 1);
        assert_eq!(loaded.files.last().expect("records").range, None);
    }

    #[test]
    fn a_version1_log_is_read_and_converted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let mut bytes = HEADER_V1.to_vec();
        for touched in [whole("old"), ranged("old-big", 0)] {
            let body = postcard::to_allocvec(&touched).expect("encode");
            bytes.extend_from_slice(&u32::try_from(body.len()).expect("small").to_le_bytes());
            bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            bytes.extend_from_slice(&body);
        }
        std::fs::write(&path, &bytes).expect("write");
        let before = DirtyLog::load(&path).expect("load v1");
        assert!(before.version1);
        assert_eq!(before.files, vec![whole("old"), ranged("old-big", 0)]);
        let log = DirtyLog::open(&path).expect("open converts");
        log.record(&[whole("new")]).expect("record");
        let after = DirtyLog::load(&path).expect("load v2");
        assert!(!after.version1 && !after.torn_tail);
        assert_eq!(
            after.files,
            vec![whole("old"), ranged("old-big", 0), whole("new")]
        );
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
    fn covered_records_cost_no_sync_and_concurrent_recorders_share_syncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = Arc::new(DirtyLog::open(&path).expect("open"));
        log.record(&[ranged_at("f", 8192, 8192)]).expect("record");
        assert_eq!(
            log.stats(),
            DirtyLogStats {
                records: 1,
                syncs: 1
            }
        );
        // Anywhere else in the same extent: covered, nothing written, no sync.
        for offset in (0..RANGE_GRANULE).step_by(8192) {
            assert_eq!(
                log.record(&[ranged_at("f", offset, 8192)]).expect("record"),
                0
            );
        }
        assert_eq!(
            log.stats(),
            DirtyLogStats {
                records: 1,
                syncs: 1
            }
        );

        let threads: Vec<_> = (0..8)
            .map(|thread| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for file in 0..50 {
                        let name = format!("t{thread}/f{file}");
                        assert_eq!(log.record(&[whole(&name)]).expect("record"), 1);
                        // Durable once answered: the file holds it.
                        let loaded = DirtyLog::load(log.path()).expect("load");
                        assert!(loaded.files.contains(&whole(&name)), "{name}");
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("recorder");
        }
        let stats = log.stats();
        assert_eq!(stats.records, 1 + 8 * 50);
        assert!(stats.syncs <= stats.records, "{stats:?}");
        assert_eq!(
            DirtyLog::load(&path).expect("load").records.len(),
            1 + 8 * 50
        );
    }

    #[test]
    fn a_settled_name_counts_as_recorded_again_only_after_a_new_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        let name = RelPath::parse(b"docs/a").expect("valid");
        let docs = RelPath::parse(b"docs").expect("valid");
        log.record(&[whole("docs/a")]).expect("record");
        assert!(log.contains(0, &name) && log.contains_at_or_under(0, &docs));

        // A resync brought it up to date: a live rename of it (or of its
        // directory) needs no record.
        log.mark_settled(0, &name);
        assert!(!log.contains(0, &name) && !log.contains_at_or_under(0, &docs));

        // Changed again: appended even though the old record covers it, so
        // that the resync's final stage sees a new record.
        assert_eq!(log.record(&[whole("docs/a")]).expect("record"), 1);
        assert!(log.contains(0, &name));
        assert_eq!(DirtyLog::load(&path).expect("load").records.len(), 2);

        // A new run starts with nothing settled.
        log.mark_settled(0, &name);
        log.forget_settled();
        assert!(log.contains(0, &name));
    }

    #[test]
    fn a_rename_s_history_is_always_appended_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dirty");
        let log = DirtyLog::open(&path).expect("open");
        log.record(&[whole("a"), whole("b")]).expect("record");
        let rename = [
            record("a", Change::RenameSource),
            record("b", Change::RenameTarget),
        ];
        // Covered by the whole records, but history: written anyway, twice.
        assert_eq!(log.record_changes(&rename).expect("record"), 2);
        assert_eq!(log.record_changes(&rename).expect("record"), 2);
        let records = DirtyLog::load(&path).expect("load").records;
        assert_eq!(records.len(), 6);
        assert_eq!(records[2..4], rename);
        // A later write to the target is covered (the target counts as whole).
        assert_eq!(log.record(&[whole("b")]).expect("record"), 0);
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
