//! The activity log: which files may have operations in flight, known after a crash without a scan.
//!
//! Like DRBD's activity log (a bounded set of "hot" extents written to
//! metadata before the first write into an extent), this is a bounded set of
//! hot *files*. Before the first write to a file is shipped, the FUSE layer
//! calls [`ActivityLog::note_write`]; if the file is not hot yet, its identity
//! is appended to the log file and synced **before** the call returns, so a
//! file with operations in flight is always on disk as hot. A file that is
//! already hot costs a hash-map lookup and no I/O: the cost of the log is
//! amortized over every write while a file stays hot.
//!
//! A file leaves the set (a `Cold` record, written in batches) only when it is
//! *settled*: no write of it is between `note_write` and the end of its
//! `replicate()` call (the [`ActivityTicket`] is dropped), and every operation
//! issued up to that point is acknowledged by the peer or recorded durably in
//! the dirty log ([`StreamPosition`]). That happens when the set is full and a
//! new file needs room (the least recently used settled files are evicted,
//! [`EVICT_BATCH`] at a time, in the same write as the new file's record) or at
//! [`ActivityLog::checkpoint`], which the owner calls periodically and which
//! drops settled files that were not written since the previous checkpoint.
//! If no file can be evicted the set grows past its bound rather than block
//! the application (logged).
//!
//! After a crash of either node, [`ActivityLog::load`] returns the hot set:
//! the only files (besides the dirty log's) that may differ between the
//! nodes, which the incremental resync then compares (when the crashed node
//! comes back as the replica, its receiver reports them to the primary's
//! engine, see [`crate::resync::serve::ReceiverActivity`], and clears the log
//! with [`ActivityLog::clear`] once that resync completed). A reopened log keeps
//! the files it loaded *pinned* (they never leave the set) until
//! [`ActivityLog::unpin_recovered`] is called once a resync covered them, so a
//! second crash before that resync loses nothing.
//!
//! Group commit: records are appended to an in-memory batch; the first
//! writer that needs its record on disk writes and syncs the whole batch while
//! the others wait for it, so concurrent first writes to many files share one
//! `fdatasync`. A file whose record is not yet on disk counts as hot for
//! nobody: every writer of it waits for the batch.
//!
//! "Acknowledged" means applied in the peer's page cache; a file that went
//! cold here while its last writes were not yet on the peer's disk is
//! covered by the sender instead: it keeps such files until a durable barrier
//! and records them in the dirty log when the peer is lost (see
//! [`crate::transport::Sender`]).
//!
//! File format: magic `SKACTIV1`, then append-only records (see
//! `resync::records`) `Hot(dir, path)` / `Cold(dir, path)`; the file is
//! rewritten compactly when it holds many more records than hot files.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use safekit_protocol::replication::RelPath;
use serde::{Deserialize, Serialize};

use crate::resync::records;
use crate::transport::Sender;

const MAGIC: &[u8; 8] = b"SKACTIV1";

/// Settled files evicted at once when the set is full.
pub const EVICT_BATCH: usize = 64;

/// Where the replication stream is, for deciding when a hot file is settled.
pub trait StreamPosition: Send + Sync {
    /// `(issued, settled)`: operations below `issued` are queued; those below
    /// `settled` are acknowledged or recorded durably in the dirty log.
    fn stream_position(&self) -> (u64, u64);
}

impl StreamPosition for Sender {
    fn stream_position(&self) -> (u64, u64) {
        Sender::stream_position(self)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    Hot { dir: u16, path: RelPath },
    Cold { dir: u16, path: RelPath },
}

#[derive(Debug, Clone, Copy)]
struct HotFile {
    in_flight: u32,
    /// Settled once the stream's settled position reaches this.
    settle_at: u64,
    last_used: u64,
    pinned: bool,
    /// The batch holding its `Hot` record.
    epoch: u64,
}

#[derive(Debug)]
struct Inner {
    /// `None` while a writer writes a batch.
    file: Option<File>,
    hot: HashMap<(u16, RelPath), HotFile>,
    records: usize,
    tick: u64,
    last_checkpoint_tick: u64,
    /// Encoded records not written yet, and the epoch they will get.
    batch: Vec<u8>,
    batch_epoch: u64,
    /// Every batch up to this one was written (or failed, see `failed`).
    written_epoch: u64,
    /// Recent batches whose write failed.
    failed: Vec<u64>,
}

/// The activity log of one module (primary side).
pub struct ActivityLog {
    path: PathBuf,
    capacity: usize,
    position: Option<Arc<dyn StreamPosition>>,
    inner: Mutex<Inner>,
    written: Condvar,
}

impl std::fmt::Debug for ActivityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Held by a writer from `note_write` until its `replicate()` returned.
#[derive(Debug)]
pub struct ActivityTicket<'a> {
    log: &'a ActivityLog,
    key: (u16, RelPath),
}

impl Drop for ActivityTicket<'_> {
    fn drop(&mut self) {
        let issued = self.log.issued();
        let mut inner = self.log.lock();
        if let Some(hot) = inner.hot.get_mut(&self.key) {
            hot.in_flight = hot.in_flight.saturating_sub(1);
            hot.settle_at = hot.settle_at.max(issued);
        }
    }
}

impl ActivityLog {
    /// The hot set persisted at `path` (empty if the file does not exist): after
    /// a crash, the files that may differ between the nodes.
    ///
    /// # Errors
    /// The file cannot be read, or is not an activity log.
    pub fn load(path: &Path) -> io::Result<Vec<(u16, RelPath)>> {
        let Some((records, _)) = records::load::<Record>(path, MAGIC)? else {
            if path.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not an activity log", path.display()),
                ));
            }
            return Ok(Vec::new());
        };
        Ok(replay(&records))
    }

    /// Forgets every file of the log at `path` (durably; nothing to do when
    /// there is no log): called on a node that was resynchronized as a
    /// replica, whose files the resync made equal to the primary's. Must not
    /// be called while an [`ActivityLog`] is open on `path`.
    ///
    /// # Errors
    /// The file cannot be rewritten.
    pub fn clear(path: &Path) -> io::Result<()> {
        if !path.exists() {
            return Ok(());
        }
        records::rewrite::<Record>(path, MAGIC, &[]).map(drop)
    }

    /// Opens (or creates) the log; files found hot are kept pinned until
    /// [`ActivityLog::unpin_recovered`]. `position` tells when a file is
    /// settled; without one (replication off), a file settles when its ticket drops.
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub fn open(
        path: &Path,
        capacity: usize,
        position: Option<Arc<dyn StreamPosition>>,
    ) -> io::Result<Self> {
        let recovered = Self::load(path)?;
        let records: Vec<Record> = recovered
            .iter()
            .map(|(dir, path)| Record::Hot {
                dir: *dir,
                path: path.clone(),
            })
            .collect();
        let file = records::rewrite(path, MAGIC, &records)?;
        let hot = recovered
            .into_iter()
            .map(|key| {
                (
                    key,
                    HotFile {
                        in_flight: 0,
                        settle_at: 0,
                        last_used: 0,
                        pinned: true,
                        epoch: 0,
                    },
                )
            })
            .collect();
        Ok(ActivityLog {
            path: path.to_path_buf(),
            capacity: capacity.max(1),
            position,
            inner: Mutex::new(Inner {
                file: Some(file),
                hot,
                records: records.len(),
                tick: 1,
                last_checkpoint_tick: 0,
                batch: Vec::new(),
                batch_epoch: 1,
                written_epoch: 0,
                failed: Vec::new(),
            }),
            written: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issued(&self) -> u64 {
        self.position
            .as_ref()
            .map_or(0, |position| position.stream_position().0)
    }

    fn settled(&self) -> u64 {
        self.position
            .as_ref()
            .map_or(u64::MAX, |position| position.stream_position().1)
    }

    /// Call before a file's local change and its `replicate()`; keep the
    /// ticket until `replicate()` returned. Syncs the log only when the file
    /// is not hot yet.
    ///
    /// # Errors
    /// The log could not be written: the file is not known to be hot, so the
    /// caller must not ship the change (fail it with EIO).
    pub fn note_write(&self, dir: u16, path: &RelPath) -> io::Result<ActivityTicket<'_>> {
        let key = (dir, path.clone());
        let settled = self.settled();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if let Some(hot) = inner.hot.get_mut(&key) {
            hot.in_flight += 1;
            hot.last_used = tick;
            let epoch = hot.epoch;
            let ticket = ActivityTicket { log: self, key };
            // Another writer queued its record: wait until it is on disk too.
            drop(self.wait_written(inner, epoch)?);
            return Ok(ticket);
        }
        let mut evicted = Vec::new();
        if inner.hot.len() >= self.capacity {
            let mut candidates: Vec<(u64, (u16, RelPath))> = inner
                .hot
                .iter()
                .filter(|(_, hot)| is_settled(hot, settled))
                .map(|(key, hot)| (hot.last_used, key.clone()))
                .collect();
            candidates.sort_by_key(|(last_used, _)| *last_used);
            let excess = inner.hot.len() + 1 - self.capacity;
            evicted = candidates
                .into_iter()
                .take(excess.max(EVICT_BATCH.min(self.capacity)))
                .map(|(_, key)| key)
                .collect();
            if evicted.is_empty() {
                tracing::debug!(
                    hot = inner.hot.len(),
                    "activity log full of unsettled files; growing past its bound"
                );
            }
        }
        for (dir, path) in &evicted {
            let record = Record::Cold {
                dir: *dir,
                path: path.clone(),
            };
            records::encode(&record, &mut inner.batch)?;
            inner.hot.remove(&(*dir, path.clone()));
        }
        records::encode(
            &Record::Hot {
                dir,
                path: path.clone(),
            },
            &mut inner.batch,
        )?;
        inner.records += evicted.len() + 1;
        let epoch = inner.batch_epoch;
        inner.hot.insert(
            key.clone(),
            HotFile {
                in_flight: 1,
                settle_at: 0,
                last_used: tick,
                pinned: false,
                epoch,
            },
        );
        let ticket = ActivityTicket { log: self, key };
        drop(self.wait_written(inner, epoch)?);
        Ok(ticket)
    }

    /// Waits until batch `epoch` is on disk, writing it (and whatever else is
    /// batched) if no other thread is writing.
    fn wait_written<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        epoch: u64,
    ) -> io::Result<MutexGuard<'a, Inner>> {
        loop {
            if inner.failed.contains(&epoch) {
                return Err(io::Error::other(format!(
                    "activity log {}: a write failed",
                    self.path.display()
                )));
            }
            if inner.written_epoch >= epoch {
                return Ok(inner);
            }
            let Some(mut file) = inner.file.take() else {
                inner = self
                    .written
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let bytes = std::mem::take(&mut inner.batch);
            let writing = inner.batch_epoch;
            inner.batch_epoch += 1;
            drop(inner);
            let result = records::append(&mut file, &bytes);
            inner = self.lock();
            inner.file = Some(file);
            if let Err(error) = &result {
                tracing::error!(%error, path = %self.path.display(), "cannot write the activity log");
                // Its files are not known to be hot: forget them so that a later write retries.
                inner.hot.retain(|_, hot| hot.epoch != writing);
                inner.failed.push(writing);
                if inner.failed.len() > 64 {
                    inner.failed.remove(0);
                }
            }
            inner.written_epoch = writing;
            if result.is_ok()
                && let Err(error) = self.maybe_compact(&mut inner)
            {
                tracing::warn!(%error, path = %self.path.display(), "cannot compact the activity log");
            }
            self.written.notify_all();
        }
    }

    /// Drops settled files not written since the previous checkpoint, in one
    /// synced batch; returns how many left the set.
    ///
    /// # Errors
    /// The log could not be written (the files stay hot).
    pub fn checkpoint(&self) -> io::Result<usize> {
        let settled = self.settled();
        let mut inner = self.lock();
        let since = inner.last_checkpoint_tick;
        let cold: Vec<(u16, RelPath)> = inner
            .hot
            .iter()
            .filter(|(_, hot)| is_settled(hot, settled) && hot.last_used <= since)
            .map(|(key, _)| key.clone())
            .collect();
        inner.last_checkpoint_tick = inner.tick;
        if cold.is_empty() {
            return Ok(0);
        }
        for (dir, path) in &cold {
            let record = Record::Cold {
                dir: *dir,
                path: path.clone(),
            };
            records::encode(&record, &mut inner.batch)?;
            inner.hot.remove(&(*dir, path.clone()));
        }
        inner.records += cold.len();
        let epoch = inner.batch_epoch;
        drop(self.wait_written(inner, epoch)?);
        Ok(cold.len())
    }

    /// Lets the files recovered at open leave the set (a resync covered them).
    pub fn unpin_recovered(&self) {
        for hot in self.lock().hot.values_mut() {
            hot.pinned = false;
        }
    }

    /// The files currently hot.
    pub fn hot_files(&self) -> Vec<(u16, RelPath)> {
        let mut files: Vec<_> = self.lock().hot.keys().cloned().collect();
        sort_files(&mut files);
        files
    }

    fn maybe_compact(&self, inner: &mut Inner) -> io::Result<()> {
        if inner.records <= 4 * inner.hot.len() + 256 {
            return Ok(());
        }
        let records: Vec<Record> = inner
            .hot
            .keys()
            .map(|(dir, path)| Record::Hot {
                dir: *dir,
                path: path.clone(),
            })
            .collect();
        inner.file = Some(records::rewrite(&self.path, MAGIC, &records)?);
        inner.records = records.len();
        Ok(())
    }
}

fn is_settled(hot: &HotFile, settled: u64) -> bool {
    hot.in_flight == 0 && !hot.pinned && hot.settle_at <= settled
}

fn replay(records: &[Record]) -> Vec<(u16, RelPath)> {
    let mut hot = std::collections::HashSet::new();
    for record in records {
        match record {
            Record::Hot { dir, path } => {
                hot.insert((*dir, path.clone()));
            }
            Record::Cold { dir, path } => {
                hot.remove(&(*dir, path.clone()));
            }
        }
    }
    let mut hot: Vec<_> = hot.into_iter().collect();
    sort_files(&mut hot);
    hot
}

fn sort_files(files: &mut [(u16, RelPath)]) {
    files.sort_by(|a, b| (a.0, a.1.components()).cmp(&(b.0, b.1.components())));
}
