//! Reintegration: bring the secondary's replica up to the primary's tree while the application runs.
//!
//! [`ResyncEngine`] runs on the primary, reads the primary's underlying tree
//! through its directory descriptors ([`tree`]) and brings the replica up to
//! date **through the replication stream itself**: every change it makes is an
//! ordinary [`Op`] (`Create`, `Write`, `Truncate`, `SetAttr`, `Mkdir`,
//! `Unlink`...) queued by the [`Sender`], and every question it asks about the
//! replica (a listing, block hashes, a barrier) is a request queued in the same
//! stream, answered by the receiver after it applied everything queued before
//! ([`serve`], [`safekit_protocol::resync`]).
//!
//! # Correct while the application writes
//!
//! - One ordered stream: a resync block can never overtake a live write queued
//!   before it, nor be overtaken by one queued after it.
//! - Reading a block and queueing it is atomic with respect to live writes of
//!   that file: both sides hold the file's [`FileLocks::data`] guard around
//!   (local read or change, queue). Whatever order the two take the lock in,
//!   the stream carries them in that order, and the later one carries the
//!   newer bytes.
//! - Block hashes are compared without the lock: the receiver's hashes
//!   describe the replica at the request's place in the stream, and every
//!   local change after that place is shipped after the request, so a block
//!   found equal (even to a block read while a write was landing) ends equal
//!   once the later operations are applied; a block found different is re-read
//!   under the lock before it is shipped.
//! - Renames and removals: a file being resynced is *tracked* in the
//!   [`FileLocks`]; a live rename (reported by the FUSE layer on its
//!   [`NamespaceGuard`]) moves the tracked name, so the resync continues under
//!   the new name, and a live unlink (or rename over it) makes it vanish: the
//!   resync of that file simply stops and the live operation, already in the
//!   stream, decides. Each time the lock is taken the engine also checks that
//!   the name still leads to the inode it reads (a change behind the FUSE
//!   layer's back also stops the file). A file renamed *before* its resync
//!   started would carry the replica's stale copy to its new name: the lock
//!   table collects the new names of such renames (of names not yet brought up
//!   to date) and the final stage re-checks them (see [`locks`]). Removing a
//!   name from the replica is decided under the namespace lock held shared:
//!   the primary is checked to lack the name, then the removal is queued, and
//!   no live create can come in between.
//!
//! # Incremental and full
//!
//! - Incremental ([`ResyncKind::Incremental`]): only the dirty log's files plus
//!   given extra files (this node's activity log's after a crash) plus the
//!   files of the *receiving* node's activity log, asked first
//!   (`ActivityFiles`): when the replica crashed as primary, those are the
//!   files it may have changed without shipping the change, which no log of
//!   this node knows. What is compared of each recorded name follows its
//!   records ([`crate::dirty::Change`]): a name that no longer exists on the
//!   primary is removed from the replica (a directory with its contents); a
//!   directory recorded whole (created, renamed: a renamed directory lands
//!   there) is compared as a subtree, one recorded for its attributes only
//!   (the times a create, delete or rename in it shipped) by its own
//!   metadata, its changed entries having records of their own; a file
//!   recorded with ranges only (writes while alone, failed applies) has only
//!   the blocks covering those ranges hashed and compared, on both sides,
//!   plus its size and attributes; a file recorded whole (created, renamed,
//!   truncated, too many ranges, any activity-log entry) is compared block by
//!   block in full, and so is a file whose replica size the ranges cannot
//!   explain. [`ResyncStats`] counts the files of each kind and the blocks
//!   compared against the blocks of the files compared.
//!   Small files (compared over at most one block) are asked about in
//!   batches (`ChecksumsBatch`, [`Run::ask_batch`]) a few batches ahead of
//!   the workers, so that a file costs no round trip of its own; the names in
//!   a batch are read with the namespace held shared, which keeps them right
//!   at the question's place in the stream as a file's data lock does for a
//!   single question.
//! - Full ([`ResyncKind::Full`]): every directory of the primary is listed
//!   and compared with the replica's listing (type, size, mtime, mode, owner):
//!   extra entries are removed, missing ones created, and files whose size or
//!   mtime differ, or that were modified shortly before or during the run
//!   ([`QUICK_CHECK_MARGIN`]), compared block by block (all files with
//!   [`ResyncConfig::checksum_all`]).
//! - Blocks are fixed-size ([`ResyncConfig::block_size`], 64 KiB by default)
//!   at fixed offsets, hashed with SHA-256 on both sides. Fixed blocks rather
//!   than rsync's rolling checksum: the data path replicates in-place updates,
//!   which keep offsets, and both sides hold an older version of the *same*
//!   file, so insertions that shift data (what rolling hashes are for) are not
//!   the case to optimise; fixed blocks need no weak-hash search, hash in
//!   parallel and stream. 64 KiB keeps the hash traffic at 0.05% of the data
//!   while a changed 4 KiB page costs one 64 KiB block. Differing neighbouring
//!   blocks are coalesced into writes of up to [`ResyncConfig::max_write`].
//!
//! # Resuming, completion
//!
//! Finished files are recorded in a durable [`cursor::ResyncCursor`] in
//! batches, each after a durable barrier (the receiver applied and synced
//! everything before it); an interrupted run of the same kind skips them
//! unless the dirty log recorded them again since. [`ResyncEngine::run`]
//! returns [`ResyncOutcome::Completed`] only after a final durable barrier
//! taken with the namespace lock held exclusively (no live change can slip in
//! between), and after re-checking files the dirty log recorded during the run
//! (operations the peer failed to apply, e.g. a live create in a directory
//! the resync had not created yet) and names collected by the lock table; at
//! most [`MAX_EXTRA_PASSES`] such passes, then it fails rather than loop. On completion it clears the dirty
//! log (when [`ResyncConfig::clear_dirty_log`]), removes the cursor and tells
//! the receiver (`ForgetActivity`, best effort) that it may clear its activity
//! log. Any error leaves all three, and the replica must not be considered up
//! to date.
//!
//! Holes: a run of blocks to ship that is a hole in the primary's file
//! (`SEEK_DATA`) is shipped as a hole punched in the replica's file
//! (`Fallocate`), so sparse files (VM images, core files) stay sparse
//! instead of filling the secondary's disk with zeros. File systems that
//! report preallocated, never-written extents as holes (ext4 does) make a
//! preallocation a hole on the replica: same bytes, space not reserved there.
//!
//! Extended attributes (ACLs included) are compared and shipped with
//! [`ResyncConfig::xattrs`] (`<rfs acl="on">`, which also replicates them
//! live): for every file a worker settles, every file a full resync finds
//! equal by size and mtime, and every directory the run touched, one
//! `Xattrs` question each, asked and applied under the entry's data guard.
//!
//! Renames made while the peer was absent are recorded as history
//! ([`Change::RenameSource`] then [`Change::RenameTarget`]) and replayed on
//! the replica first (`Run::replay_renames`) when the target is a
//! directory or a file of more than one block: a rotated log directory or a
//! renamed big file is then compared in place, not copied again.
//!
//! Known limits: hard links are copied as separate files; a symlink's
//! extended attributes are not compared; a directory renamed during the run
//! while not yet compared is re-compared whole.

pub mod cursor;
pub mod locks;
pub(crate) mod records;
pub mod serve;
pub(crate) mod tree;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::fs::Stat;
use safekit_protocol::replication::{Op, RelPath, TimeSet, rename_flags};
use safekit_protocol::resync::{
    BlockHash, ChecksumItem, DirEntry, EntryKind, EntryMeta, FileChecksums, MAX_BLOCKS_PER_REQUEST,
    MAX_FILES_PER_BATCH, ReplyBody, RequestBody,
};

use crate::dirty::{Change, DirtyLog, DirtyRecord, merge_runs};
use crate::replicator::{ReplicateOutcome, Replicator, WaitFor};
use crate::transport::{RequestFailed, RequestTicket, Role, Sender};
pub use cursor::{CursorStart, ResyncCursor};
pub use locks::{DataGuard, FileLocks, NamespaceGuard};

/// Passes over files recorded dirty during a run before giving up (the
/// receiver keeps failing to apply something).
pub const MAX_EXTRA_PASSES: u64 = 8;

/// Settings of a resync.
#[derive(Debug, Clone)]
pub struct ResyncConfig {
    /// Parallel file workers (`nbrei`).
    pub workers: usize,
    /// Comparison block size.
    pub block_size: u32,
    /// Largest write shipped (neighbouring differing blocks are coalesced up to this).
    pub max_write: usize,
    /// Bytes per second of resync data (`None`: unlimited). Live replication is never throttled.
    pub bandwidth: Option<u64>,
    /// The resync queues an operation only while the stream's unacknowledged
    /// bytes stay within this bound, so that it never fills the sender's whole
    /// window (`SenderConfig::max_inflight_bytes`) and live writes keep room.
    pub max_in_flight: usize,
    /// How long to wait for one answer of the receiver.
    pub request_timeout: Duration,
    /// The cursor file (primary side).
    pub cursor_path: PathBuf,
    /// Compare the blocks of every file in a full resync, not only of those whose size or mtime differ.
    pub checksum_all: bool,
    /// Compare and ship extended attributes (`<rfs acl="on">`: the data path
    /// replicates them live) of the files and directories it compares.
    pub xattrs: bool,
    /// Clear the dirty log on completion.
    pub clear_dirty_log: bool,
    /// Finished files are confirmed (durable barrier) and written to the cursor
    /// once this many are waiting...
    pub confirm_files: usize,
    /// ...or once the oldest waited this long.
    pub confirm_interval: Duration,
}

impl ResyncConfig {
    /// Defaults: 6 workers, 64 KiB blocks, 1 MiB writes, unlimited, 60 s per answer.
    pub fn new(cursor_path: PathBuf) -> Self {
        ResyncConfig {
            workers: 6,
            block_size: 64 * 1024,
            max_write: 1024 * 1024,
            bandwidth: None,
            max_in_flight: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(60),
            cursor_path,
            checksum_all: false,
            xattrs: false,
            clear_dirty_log: true,
            confirm_files: 128,
            confirm_interval: Duration::from_secs(1),
        }
    }
}

/// What to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncKind {
    /// The dirty log's files plus `extra` (the activity log's after a crash).
    Incremental {
        /// More files to compare.
        extra: Vec<(u16, RelPath)>,
    },
    /// The whole tree.
    Full,
}

/// What a resync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncStats {
    /// Files whose metadata was compared.
    pub files_examined: u64,
    /// Files created or whose data was shipped.
    pub files_sent: u64,
    /// Files skipped because an interrupted attempt finished them.
    pub files_resumed: u64,
    /// Blocks whose hashes were compared.
    pub blocks_compared: u64,
    /// Blocks of the files whose blocks were compared: what comparing each of
    /// them whole would have hashed (compare with `blocks_compared`).
    pub file_blocks: u64,
    /// Files compared only over the blocks covering the dirty log's recorded
    /// ranges (or by metadata alone, when only attributes were recorded).
    pub files_by_range: u64,
    /// Files compared whole: no range recorded (created, renamed, truncated,
    /// too many ranges, an activity-log entry after a crash), a size the
    /// ranges do not explain, or a full resync's quick check failed.
    pub files_whole: u64,
    /// Blocks shipped.
    pub blocks_sent: u64,
    /// Blocks shipped as holes punched in the replica's file (sparse files).
    pub holes_sent: u64,
    /// Data bytes shipped.
    pub bytes_sent: u64,
    /// Entries removed from the replica.
    /// Renames made while the peer was absent replayed on the replica
    /// (so that a renamed directory or big file is compared, not copied).
    pub renames_replayed: u64,
    pub entries_deleted: u64,
    /// Directories created on the replica.
    pub dirs_created: u64,
    /// Attribute-only updates.
    pub attr_updates: u64,
    /// Extended attributes set or removed on the replica (with `xattrs`).
    pub xattr_updates: u64,
    /// Passes over files the dirty log recorded during the run.
    pub extra_passes: u64,
    /// Operations not shipped in time (recorded dirty, compared again at the end).
    pub deferred: u64,
}

/// A snapshot of progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResyncProgress {
    /// Files finished.
    pub files_done: u64,
    /// Files to examine (known once planning finished).
    pub files_total: u64,
    /// Bytes of files finished.
    pub bytes_done: u64,
    /// Bytes of the files to examine.
    pub bytes_total: u64,
    /// Data bytes shipped so far.
    pub bytes_sent: u64,
    /// Since the start.
    pub elapsed: Duration,
    /// `bytes_done` per second.
    pub rate: f64,
    /// Estimated time left.
    pub eta: Option<Duration>,
    /// Counters so far.
    pub stats: ResyncStats,
}

impl ResyncProgress {
    /// Percent done by bytes (by files when there are no bytes), 0..=100.
    pub fn percent(&self) -> u8 {
        let (done, total) = if self.bytes_total > 0 {
            (self.bytes_done, self.bytes_total)
        } else {
            (self.files_done, self.files_total)
        };
        if total == 0 {
            return 0;
        }
        u8::try_from((done.min(total) * 100) / total).unwrap_or(100)
    }
}

/// How a resync ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncOutcome {
    /// The replica equals the primary's tree (as of the final barrier); the
    /// stream keeps it so from there on.
    Completed {
        /// What was done.
        stats: ResyncStats,
    },
}

/// Why a resync did not complete (the replica is not up to date).
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// The stream to the peer is down or not replicating.
    #[error("replication link: {0}")]
    Link(#[from] RequestFailed),
    /// An operation was not shipped (the sender went alone).
    #[error("the sender stopped replicating")]
    NotReplicating,
    /// The primary's tree or the cursor could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The receiver could not answer about a path.
    #[error("the receiver cannot read {path}: errno {errno}")]
    Remote {
        /// The path.
        path: String,
        /// Its errno.
        errno: i32,
    },
    /// The receiver answered something else than asked.
    #[error("unexpected answer from the receiver")]
    Protocol,
    /// [`ResyncHandle::stop`] was called.
    #[error("stopped")]
    Stopped,
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ResyncError {
    let what = what.into();
    move |source| ResyncError::Io { what, source }
}

fn show(path: &RelPath) -> String {
    String::from_utf8_lossy(&path.to_bytes()).into_owned()
}

#[derive(Debug, Default)]
struct Counters {
    files_examined: AtomicU64,
    files_sent: AtomicU64,
    files_resumed: AtomicU64,
    blocks_compared: AtomicU64,
    file_blocks: AtomicU64,
    files_by_range: AtomicU64,
    files_whole: AtomicU64,
    blocks_sent: AtomicU64,
    holes_sent: AtomicU64,
    bytes_sent: AtomicU64,
    entries_deleted: AtomicU64,
    renames_replayed: AtomicU64,
    dirs_created: AtomicU64,
    attr_updates: AtomicU64,
    xattr_updates: AtomicU64,
    extra_passes: AtomicU64,
    deferred: AtomicU64,
    files_done: AtomicU64,
    files_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    started: Mutex<Option<Instant>>,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    fn reset(&self) {
        for counter in [
            &self.files_examined,
            &self.files_sent,
            &self.files_resumed,
            &self.blocks_compared,
            &self.file_blocks,
            &self.files_by_range,
            &self.files_whole,
            &self.blocks_sent,
            &self.holes_sent,
            &self.bytes_sent,
            &self.entries_deleted,
            &self.renames_replayed,
            &self.dirs_created,
            &self.attr_updates,
            &self.xattr_updates,
            &self.extra_passes,
            &self.deferred,
            &self.files_done,
            &self.files_total,
            &self.bytes_done,
            &self.bytes_total,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> ResyncStats {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ResyncStats {
            files_examined: v(&self.files_examined),
            files_sent: v(&self.files_sent),
            files_resumed: v(&self.files_resumed),
            blocks_compared: v(&self.blocks_compared),
            file_blocks: v(&self.file_blocks),
            files_by_range: v(&self.files_by_range),
            files_whole: v(&self.files_whole),
            blocks_sent: v(&self.blocks_sent),
            holes_sent: v(&self.holes_sent),
            bytes_sent: v(&self.bytes_sent),
            entries_deleted: v(&self.entries_deleted),
            renames_replayed: v(&self.renames_replayed),
            dirs_created: v(&self.dirs_created),
            attr_updates: v(&self.attr_updates),
            xattr_updates: v(&self.xattr_updates),
            extra_passes: v(&self.extra_passes),
            deferred: v(&self.deferred),
        }
    }

    fn progress(&self) -> ResyncProgress {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let elapsed = self
            .started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(Duration::ZERO, |start| start.elapsed());
        let bytes_done = v(&self.bytes_done);
        let bytes_total = v(&self.bytes_total);
        let rate = if elapsed.as_secs_f64() > 0.0 {
            bytes_done as f64 / elapsed.as_secs_f64()
        } else {
            0.0
        };
        let eta = (rate > 0.0)
            .then(|| Duration::from_secs_f64(bytes_total.saturating_sub(bytes_done) as f64 / rate));
        ResyncProgress {
            files_done: v(&self.files_done),
            files_total: v(&self.files_total),
            bytes_done,
            bytes_total,
            bytes_sent: v(&self.bytes_sent),
            elapsed,
            rate,
            eta,
            stats: self.stats(),
        }
    }
}

/// Controls a running resync from another thread.
#[derive(Debug, Clone)]
pub struct ResyncHandle {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl ResyncHandle {
    /// Asks the resync to stop soon; `run` then returns [`ResyncError::Stopped`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The current progress.
    pub fn progress(&self) -> ResyncProgress {
        self.counters.progress()
    }
}

/// A callback for progress snapshots (called about five times a second and at the end).
pub type ProgressCallback = Box<dyn Fn(&ResyncProgress) + Send + Sync>;

/// The resync engine of one module (primary side).
pub struct ResyncEngine {
    config: ResyncConfig,
    sender: Arc<Sender>,
    source: Vec<OwnedFd>,
    locks: Arc<FileLocks>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    on_progress: Option<ProgressCallback>,
}

impl std::fmt::Debug for ResyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResyncEngine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Token bucket on resync data bytes.
#[derive(Debug)]
struct Throttle {
    rate: Option<u64>,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// Takes `bytes` tokens, sleeping (in short slices, so that `stop` is
    /// honoured) while the bucket is in debt.
    fn take(&self, bytes: usize, stop: &AtomicBool) {
        let Some(rate) = self.rate.filter(|rate| *rate > 0) else {
            return;
        };
        let rate = rate as f64;
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            // Burst of a tenth of a second.
            let burst = rate / 10.0;
            let (tokens, last) = *state;
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(burst);
            let tokens = tokens - bytes as f64;
            *state = (tokens, now);
            (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / rate))
        };
        if let Some(wait) = wait {
            let until = Instant::now() + wait;
            while !stop.load(Ordering::SeqCst) {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                std::thread::sleep((until - now).min(Duration::from_millis(50)));
            }
        }
    }
}

/// A file job for a worker.
#[derive(Debug)]
struct Job {
    dir: u16,
    path: RelPath,
    /// The replica's entry when known (`Some(None)`: known to be absent).
    remote: Option<Option<EntryMeta>>,
    /// The replica's parent directory is known to exist.
    parent_known: bool,
    /// What to compare.
    scope: Scope,
    /// Already tracked (by the batch that asked about it); tracked by the worker otherwise.
    tracking: Option<Tracking>,
    /// The replica's answer about the first chunk, asked in a batch.
    prefetch: Option<Prefetch>,
}

/// A tracked file, untracked when dropped (also when its job is dropped unrun).
#[derive(Debug)]
struct Tracking {
    locks: Arc<FileLocks>,
    tracked: Arc<locks::Tracked>,
}

impl Tracking {
    fn new(locks: &Arc<FileLocks>, dir: u16, path: &RelPath) -> Self {
        Tracking {
            locks: Arc::clone(locks),
            tracked: locks.track(dir, path),
        }
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.locks.untrack(&self.tracked);
    }
}

/// The replica's metadata and the hashes of blocks `first_block .. first_block
/// + count` of a file, as a batched question found them.
#[derive(Debug)]
struct Prefetch {
    first_block: u64,
    count: u64,
    meta: Option<EntryMeta>,
    hashes: Vec<BlockHash>,
}

/// Files asked about in one batched question (see [`Run::ask_batch`]): the
/// small files of an incremental resync, whose comparison is one chunk of at
/// most one block, so that a file costs no round trip of its own.
const BATCH_FILES: usize = 128;

/// Batched questions in flight while the workers compare the files of earlier ones.
const BATCHES_IN_FLIGHT: usize = 2;

/// A batch of jobs asked about, `(job, first block, count)`, with its ticket.
type AskedBatch = (RequestTicket, Vec<(Job, u64, u64)>);

/// What [`Run::ship_blocks`] shipped of a file.
#[derive(Debug, Default)]
struct Shipped {
    /// Data or holes.
    any: bool,
    /// Holes (punched in the replica's file).
    punched: bool,
}

/// `fallocate(2)` mode of a shipped hole: `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
const PUNCH_HOLE_KEEP_SIZE: i32 = 0x02 | 0x01;

/// What [`Run::settle_file`] needs to know of how a file was brought up to date.
struct Settled<'r> {
    /// The file's size when its comparison started.
    size: u64,
    /// The replica's file as it answered (`None`: created by this resync).
    remote: Option<&'r EntryMeta>,
    /// The mode, owner and group the replica's file was created with, when created here.
    created_with: Option<(u32, u32, u32)>,
    /// Some of its data was shipped.
    sent_any: bool,
    /// Some of its blocks were shipped as holes (the replica's size may be short).
    punched: bool,
}

/// What an incremental resync compares of one name, from its dirty records.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Everything: a file's every block, a directory's subtree.
    Whole,
    /// A file's blocks covering these `(start, end)` byte runs (sorted,
    /// merged), and its size and attributes.
    Ranges(Vec<(u64, u64)>),
    /// Only the entry's attributes (and its existence and type).
    Attrs,
}

impl Scope {
    fn of(change: Change) -> Scope {
        match change {
            Change::Whole | Change::RenameSource | Change::RenameTarget => Scope::Whole,
            Change::Range(range) => {
                Scope::Ranges(vec![(range.offset, range.offset.saturating_add(range.len))])
            }
            Change::Attrs => Scope::Attrs,
        }
    }

    fn merge(self, other: Scope) -> Scope {
        match (self, other) {
            (Scope::Whole, _) | (_, Scope::Whole) => Scope::Whole,
            (Scope::Ranges(mut a), Scope::Ranges(b)) => {
                a.extend(b);
                Scope::Ranges(merge_runs(a))
            }
            (Scope::Ranges(a), Scope::Attrs) | (Scope::Attrs, Scope::Ranges(a)) => Scope::Ranges(a),
            (Scope::Attrs, Scope::Attrs) => Scope::Attrs,
        }
    }
}

/// The names of `records` in first-seen order, each with what to compare of it.
fn scopes(records: Vec<DirtyRecord>) -> Vec<(u16, RelPath, Scope)> {
    let mut order = Vec::new();
    let mut by_name: HashMap<(u16, RelPath), Scope> = HashMap::new();
    for record in records {
        let key = (record.dir, record.path);
        let scope = Scope::of(record.change);
        match by_name.remove(&key) {
            Some(before) => {
                by_name.insert(key, before.merge(scope));
            }
            None => {
                order.push(key.clone());
                by_name.insert(key, scope);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|key| {
            let scope = by_name.remove(&key)?;
            Some((key.0, key.1, scope))
        })
        .collect()
}

/// Renames replayed by one run at most (each costs questions with the
/// namespace held): past that, the comparison copies.
const MAX_REPLAYED_RENAMES: usize = 10_000;

/// The renames `records` hold, in order: `(dir, from, to)` of each
/// [`Change::RenameSource`] record followed by its [`Change::RenameTarget`].
fn rename_history(records: &[DirtyRecord]) -> Vec<(u16, RelPath, RelPath)> {
    records
        .windows(2)
        .filter_map(|pair| match (pair[0].change, pair[1].change) {
            (Change::RenameSource, Change::RenameTarget) if pair[0].dir == pair[1].dir => {
                Some((pair[0].dir, pair[0].path.clone(), pair[1].path.clone()))
            }
            _ => None,
        })
        .collect()
}

fn whole_record((dir, path): (u16, RelPath)) -> DirtyRecord {
    DirtyRecord {
        dir,
        path,
        change: Change::Whole,
    }
}

/// A cursor confirmation in flight: its barrier's ticket and the files it confirms.
type Confirmation = (RequestTicket, Vec<(u16, RelPath)>);

/// One run's shared state.
struct Run<'a> {
    engine: &'a ResyncEngine,
    /// The cursor (`None` for the extra passes of the final stage).
    cursor: Option<Mutex<ResyncCursor>>,
    /// Finished files waiting for a durable barrier before entering the cursor.
    unconfirmed: Mutex<(Vec<(u16, RelPath)>, Instant)>,
    /// The durable barrier asked and not yet answered, with the finished
    /// files it confirms (see [`Run::confirm`]).
    confirming: Mutex<Option<Confirmation>>,
    /// Files the dirty log recorded again since the cursor's start: never skipped.
    redirtied: HashSet<(u16, RelPath)>,
    throttle: Throttle,
    failure: Mutex<Option<ResyncError>>,
    /// Directories whose mtime is set at the end.
    touched_dirs: Mutex<HashSet<(u16, RelPath)>>,
    /// Files modified after this `(secs, nanos)` are compared by blocks even when
    /// size and mtime match (see [`QUICK_CHECK_MARGIN`]).
    quick_check_before: (i64, u32),
    /// Files an incremental run compares on their own records: a walk of a
    /// recorded directory above them leaves them to that (their recorded
    /// ranges, not the whole file).
    recorded_files: Mutex<HashSet<(u16, RelPath)>>,
}

/// A full resync trusts "same size and mtime" only for files last modified
/// this long before it started: a live write during the resync lands on both
/// sides within one coarse clock tick often enough to give equal mtimes to
/// files whose older content still differs.
pub const QUICK_CHECK_MARGIN: Duration = Duration::from_secs(2);

fn quick_check_before() -> (i64, u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(QUICK_CHECK_MARGIN);
    (
        i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        now.subsec_nanos(),
    )
}

enum FileEnd {
    Done,
    Vanished,
}

impl ResyncEngine {
    /// An engine shipping through `sender`, reading the primary's tree beneath
    /// `source` (index = replicated directory, opened before any mount), and
    /// taking `locks` (the same table the FUSE layer takes).
    pub fn new(
        config: ResyncConfig,
        sender: Arc<Sender>,
        source: Vec<OwnedFd>,
        locks: Arc<FileLocks>,
    ) -> Self {
        ResyncEngine {
            config,
            sender,
            source,
            locks,
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(Counters::default()),
            on_progress: None,
        }
    }

    /// Calls `callback` with progress snapshots during [`ResyncEngine::run`].
    pub fn on_progress(mut self, callback: ProgressCallback) -> Self {
        self.on_progress = Some(callback);
        self
    }

    /// A handle to stop the run or read its progress from another thread.
    pub fn handle(&self) -> ResyncHandle {
        ResyncHandle {
            stop: Arc::clone(&self.stop),
            counters: Arc::clone(&self.counters),
        }
    }

    /// Runs a resync to completion (blocking; run it on its own thread).
    /// Start it only once the sender is `Replicating`: live changes then flow
    /// in the stream while this brings the rest up to date.
    ///
    /// # Errors
    /// See [`ResyncError`]; the replica is then not up to date, and a later
    /// run of the same kind resumes.
    pub fn run(&self, kind: ResyncKind) -> Result<ResyncOutcome, ResyncError> {
        self.counters.reset();
        self.stop.store(false, Ordering::SeqCst);
        *self
            .counters
            .started
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let dirty_path = self.sender.dirty_log().path().to_path_buf();
        let dirty = DirtyLog::load(&dirty_path).map_err(|error| ResyncError::Io {
            what: format!("dirty log {}", dirty_path.display()),
            source: io::Error::other(error.to_string()),
        })?;
        let full = kind == ResyncKind::Full;
        let cursor = ResyncCursor::open(
            &self.config.cursor_path,
            CursorStart {
                full,
                block_size: self.config.block_size,
                dirty_records: dirty.files.len() as u64,
            },
        )
        .map_err(io_error("resync cursor"))?;
        let since = usize::try_from(cursor.start().dirty_records).unwrap_or(usize::MAX);
        let redirtied = dirty
            .records
            .iter()
            .skip(since)
            .map(|record| (record.dir, record.path.clone()))
            .collect();
        let run = Run::new(
            self,
            Some(Mutex::new(cursor)),
            redirtied,
            quick_check_before(),
        );
        let mut seen_records = dirty.records.len();
        let mut records = dirty.records;
        if let ResyncKind::Incremental { extra } = &kind {
            // The activity logs name files, not ranges: compared whole.
            records.extend(extra.iter().cloned().map(whole_record));
            records.extend(self.peer_activity_files()?.into_iter().map(whole_record));
        }
        let paths: Vec<(u16, RelPath)> = records
            .iter()
            .map(|record| (record.dir, record.path.clone()))
            .collect();
        self.locks.start_collecting((!full).then_some(paths));
        self.sender.dirty_log().forget_settled();
        struct StopCollecting<'a>(&'a FileLocks, &'a DirtyLog);
        impl Drop for StopCollecting<'_> {
            fn drop(&mut self) {
                self.0.stop_collecting();
                self.1.forget_settled();
            }
        }
        let _stop_collecting = StopCollecting(&self.locks, self.sender.dirty_log());
        let done = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            if let Some(callback) = &self.on_progress {
                let done = &done;
                scope.spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        callback(&self.counters.progress());
                        std::thread::sleep(Duration::from_millis(200));
                    }
                });
            }
            let result = (|| {
                if full {
                    run.full()?;
                } else {
                    run.incremental(records)?;
                }
                run.finish(&dirty_path, &mut seen_records)
            })();
            done.store(true, Ordering::SeqCst);
            result
        });
        if let Some(callback) = &self.on_progress {
            callback(&self.counters.progress());
        }
        match result {
            Ok(()) => {
                if let Some(cursor) = run.cursor {
                    cursor
                        .into_inner()
                        .unwrap_or_else(PoisonError::into_inner)
                        .finish()
                        .map_err(io_error("remove the resync cursor"))?;
                }
                self.forget_peer_activity();
                let stats = self.counters.stats();
                tracing::info!(?stats, "resync completed");
                Ok(ResyncOutcome::Completed { stats })
            }
            Err(error) => {
                tracing::warn!(%error, "resync did not complete");
                Err(error)
            }
        }
    }

    /// The files of the receiving node's activity log: those it may have
    /// changed as primary without shipping the change before it crashed.
    fn peer_activity_files(&self) -> Result<Vec<(u16, RelPath)>, ResyncError> {
        let ticket = self.sender.send_request(RequestBody::ActivityFiles)?;
        match self
            .sender
            .wait_reply(ticket, self.config.request_timeout)?
        {
            ReplyBody::ActivityFiles(files) => {
                let files: Vec<(u16, RelPath)> = files
                    .into_iter()
                    .filter(|(dir, path)| {
                        usize::from(*dir) < self.source.len() && path.validate().is_ok()
                    })
                    .collect();
                if !files.is_empty() {
                    tracing::info!(
                        files = files.len(),
                        "the replica's activity log lists files possibly changed there: comparing them too"
                    );
                }
                Ok(files)
            }
            // A receiver that does not answer resync questions fails at the next one.
            ReplyBody::Failed { errno } if errno == libc::ENOTSUP => Ok(Vec::new()),
            ReplyBody::Failed { errno } => Err(ResyncError::Remote {
                path: String::new(),
                errno,
            }),
            _ => Err(ResyncError::Protocol),
        }
    }

    /// Tells the receiving node that the resync completed, so that it clears its
    /// activity log. Best effort: if this is lost, the next resync compares
    /// those files again.
    fn forget_peer_activity(&self) {
        let reply = self
            .sender
            .send_request(RequestBody::ForgetActivity)
            .map_err(ResyncError::from)
            .and_then(|ticket| {
                self.sender
                    .wait_reply(ticket, self.config.request_timeout)
                    .map_err(ResyncError::from)
            });
        match reply {
            Ok(ReplyBody::ActivityForgotten) => {}
            Ok(other) => tracing::warn!(
                ?other,
                "the replica did not clear its activity log; the next resync compares its files again"
            ),
            Err(error) => tracing::warn!(
                %error,
                "the replica did not clear its activity log; the next resync compares its files again"
            ),
        }
    }

    fn root(&self, dir: u16) -> Result<BorrowedFd<'_>, ResyncError> {
        self.source
            .get(usize::from(dir))
            .map(AsFd::as_fd)
            .ok_or_else(|| ResyncError::Io {
                what: format!("replicated directory {dir}"),
                source: io::Error::from_raw_os_error(libc::EBADF),
            })
    }
}

/// What to compare of a file of `size` bytes whose replica has `remote_size`:
/// the scope actually used (ranges cannot explain a replica larger than the
/// file, since a truncate is recorded whole, nor, with attributes only, a
/// different size: such a file is compared whole) and the checksum requests,
/// `(first block, count)` of at most `per_request` blocks, over the blocks
/// both sides have that cover the recorded ranges (or all of them).
fn plan_chunks(
    scope: &Scope,
    size: u64,
    remote_size: u64,
    block_size: u64,
    per_request: u64,
) -> (&Scope, Vec<(u64, u64)>) {
    let compare_blocks = blocks(size.min(remote_size), block_size);
    let scope = match scope {
        Scope::Ranges(_) if remote_size > size => &Scope::Whole,
        Scope::Attrs if remote_size != size => &Scope::Whole,
        scope => scope,
    };
    let runs: Vec<(u64, u64)> = match scope {
        Scope::Whole => vec![(0, compare_blocks)],
        Scope::Attrs => Vec::new(),
        Scope::Ranges(runs) => {
            let mut wanted: Vec<(u64, u64)> = runs
                .iter()
                .filter(|(start, end)| end > start)
                .map(|&(start, end)| (start / block_size, (end - 1) / block_size + 1))
                .collect();
            // The replica's last, partial block when the file grew.
            if remote_size < size && !remote_size.is_multiple_of(block_size) {
                let partial = remote_size / block_size;
                wanted.push((partial, partial + 1));
            }
            merge_runs(wanted)
                .into_iter()
                .map(|(first, end)| (first, end.min(compare_blocks)))
                .filter(|(first, end)| end > first)
                .collect()
        }
    };
    let per_request = per_request.max(1);
    let chunks = runs
        .into_iter()
        .flat_map(|(first, end)| {
            (first..end)
                .step_by(usize::try_from(per_request).unwrap_or(1))
                .map(move |start| (start, (end - start).min(per_request)))
        })
        .collect();
    (scope, chunks)
}

/// Blocks per checksum question: at most 16 MiB of the replica's data hashed per answer.
fn blocks_per_request(block_size: u64) -> u64 {
    u64::from(
        MAX_BLOCKS_PER_REQUEST.min(
            u32::try_from((16u64 << 20) / block_size.max(1))
                .unwrap_or(1)
                .max(1),
        ),
    )
}

fn blocks(size: u64, block_size: u64) -> u64 {
    size.div_ceil(block_size)
}

fn perm(mode: u32) -> u32 {
    mode & 0o7777
}

fn same_attrs(a: &EntryMeta, b: &EntryMeta) -> bool {
    perm(a.mode) == perm(b.mode) && a.uid == b.uid && a.gid == b.gid
}

fn same_inode(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

impl<'a> Run<'a> {
    fn new(
        engine: &'a ResyncEngine,
        cursor: Option<Mutex<ResyncCursor>>,
        redirtied: HashSet<(u16, RelPath)>,
        quick_check_before: (i64, u32),
    ) -> Self {
        Run {
            engine,
            cursor,
            unconfirmed: Mutex::new((Vec::new(), Instant::now())),
            confirming: Mutex::new(None),
            redirtied,
            throttle: Throttle {
                rate: engine.config.bandwidth,
                state: Mutex::new((0.0, Instant::now())),
            },
            failure: Mutex::new(None),
            touched_dirs: Mutex::new(HashSet::new()),
            quick_check_before,
            recorded_files: Mutex::new(HashSet::new()),
        }
    }

    /// `path` is up to date on the replica (call with its lock held): for
    /// the lock table's rename tracking, and for the dirty log (a live rename
    /// of it needs no record any more).
    fn mark_finished(&self, dir: u16, path: &RelPath) {
        self.engine.locks.mark_finished(dir, path);
        self.engine.sender.dirty_log().mark_settled(dir, path);
    }

    fn check_stop(&self) -> Result<(), ResyncError> {
        if self.engine.stop.load(Ordering::SeqCst) {
            return Err(ResyncError::Stopped);
        }
        if self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return Err(ResyncError::Stopped);
        }
        Ok(())
    }

    fn counters(&self) -> &Counters {
        &self.engine.counters
    }

    fn ask(&self, body: RequestBody) -> Result<ReplyBody, ResyncError> {
        let ticket = self.engine.sender.send_request(body)?;
        Ok(self
            .engine
            .sender
            .wait_reply(ticket, self.engine.config.request_timeout)?)
    }

    fn submit(&self, op: Op) -> Result<(), ResyncError> {
        let sender = &self.engine.sender;
        let bytes = match &op {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        };
        self.wait_room(bytes)?;
        match sender.replicate(op, WaitFor::Queued) {
            ReplicateOutcome::Queued | ReplicateOutcome::Confirmed => Ok(()),
            // Not shipped within the replication timeout, but the sender still
            // replicates: the file is in the dirty log, and the final stage
            // compares it again.
            ReplicateOutcome::Alone if sender.stats().role == Role::Replicating => {
                bump(&self.counters().deferred, 1);
                Ok(())
            }
            ReplicateOutcome::Alone | ReplicateOutcome::Off => Err(ResyncError::NotReplicating),
        }
    }

    /// Waits until `bytes` more stay within [`ResyncConfig::max_in_flight`]
    /// (the rest of the sender's window is left to live writes).
    fn wait_room(&self, bytes: usize) -> Result<(), ResyncError> {
        let sender = &self.engine.sender;
        while !sender.wait_for_room(
            bytes,
            self.engine.config.max_in_flight,
            Duration::from_millis(500),
        ) {
            self.check_stop()?;
            if sender.stats().role != Role::Replicating {
                return Err(ResyncError::NotReplicating);
            }
        }
        Ok(())
    }

    fn barrier(&self, durable: bool) -> Result<(), ResyncError> {
        match self.ask(RequestBody::Barrier { durable })? {
            ReplyBody::Barrier => Ok(()),
            ReplyBody::Failed { errno } => Err(ResyncError::Remote {
                path: String::new(),
                errno,
            }),
            _ => Err(ResyncError::Protocol),
        }
    }

    fn remote_stat(&self, dir: u16, path: &RelPath) -> Result<Option<EntryMeta>, ResyncError> {
        match self.ask(RequestBody::Stat {
            dir,
            path: path.clone(),
        })? {
            ReplyBody::Stat(meta) => Ok(meta),
            ReplyBody::Failed { errno } => Err(ResyncError::Remote {
                path: show(path),
                errno,
            }),
            _ => Err(ResyncError::Protocol),
        }
    }

    /// The replica's listing of a directory; `None` when it is not a directory there.
    fn remote_list(&self, dir: u16, path: &RelPath) -> Result<Option<Vec<DirEntry>>, ResyncError> {
        let mut entries: Vec<DirEntry> = Vec::new();
        loop {
            let start_after = entries.last().map(|entry| entry.name.clone());
            match self.ask(RequestBody::ListDir {
                dir,
                path: path.clone(),
                start_after,
            })? {
                ReplyBody::ListDir {
                    entries: page,
                    more,
                } => {
                    entries.extend(page);
                    if !more {
                        return Ok(Some(entries));
                    }
                }
                ReplyBody::Failed {
                    errno: libc::ENOENT | libc::ENOTDIR | libc::ELOOP,
                } => {
                    return Ok(None);
                }
                ReplyBody::Failed { errno } => {
                    return Err(ResyncError::Remote {
                        path: show(path),
                        errno,
                    });
                }
                _ => return Err(ResyncError::Protocol),
            }
        }
    }

    fn local_lstat(
        &self,
        dir: u16,
        path: &RelPath,
    ) -> Result<Option<(Stat, EntryMeta)>, ResyncError> {
        tree::lstat(self.engine.root(dir)?, path).map_err(io_error(format!("lstat {}", show(path))))
    }

    fn note_dir(&self, dir: u16, path: &RelPath) {
        self.touched_dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((dir, path.clone()));
    }

    fn note_parent(&self, dir: u16, path: &RelPath) {
        if let Some((parent, _)) = path.split_last() {
            self.note_dir(dir, &parent);
        }
    }

    /// Removes `path` (of type `remote.kind`) from the replica, contents first.
    /// The caller holds the namespace shared and checked the primary.
    fn delete_remote(
        &self,
        dir: u16,
        path: &RelPath,
        remote: &EntryMeta,
    ) -> Result<(), ResyncError> {
        if remote.kind == EntryKind::Dir {
            for child in self.remote_list(dir, path)?.unwrap_or_default() {
                let child_path = path.join(&child.name).map_err(|_| ResyncError::Protocol)?;
                self.delete_remote(dir, &child_path, &child.meta)?;
            }
            self.submit(Op::Rmdir {
                dir,
                path: path.clone(),
            })?;
        } else {
            self.submit(Op::Unlink {
                dir,
                path: path.clone(),
            })?;
        }
        bump(&self.counters().entries_deleted, 1);
        self.note_parent(dir, path);
        Ok(())
    }

    /// Removes the replica's `path` unless the primary has an entry of the same type there.
    /// Returns whether it was removed.
    fn remove_unless_present(
        &self,
        dir: u16,
        path: &RelPath,
        remote: &EntryMeta,
    ) -> Result<bool, ResyncError> {
        let _namespace = self.engine.locks.shared_namespace();
        if let Some((_, local)) = self.local_lstat(dir, path)?
            && local.kind == remote.kind
        {
            return Ok(false);
        }
        self.delete_remote(dir, path, remote)?;
        Ok(true)
    }

    /// Makes directory `path` exist on the replica (ancestors first); `false`
    /// when the primary no longer has it.
    fn ensure_dir(&self, dir: u16, path: &RelPath) -> Result<bool, ResyncError> {
        let Some((parent, _)) = path.split_last() else {
            return Ok(true);
        };
        let remote = self.remote_stat(dir, path)?;
        if remote
            .as_ref()
            .is_some_and(|meta| meta.kind == EntryKind::Dir)
        {
            return Ok(true);
        }
        if !self.ensure_dir(dir, &parent)? {
            return Ok(false);
        }
        let _namespace = self.engine.locks.shared_namespace();
        let Some((_, local)) = self.local_lstat(dir, path)? else {
            return Ok(false);
        };
        if local.kind != EntryKind::Dir {
            return Ok(false);
        }
        if let Some(remote) = remote {
            self.delete_remote(dir, path, &remote)?;
        }
        self.mkdir(dir, path, &local)?;
        Ok(true)
    }

    /// Gives the replica's directory `path` the primary's mode and owner (its
    /// mtime is set at the end); `false` when the replica has no directory there.
    fn sync_dir_attrs(&self, dir: u16, path: &RelPath) -> Result<bool, ResyncError> {
        bump(&self.counters().files_examined, 1);
        let Some(remote) = self.remote_stat(dir, path)? else {
            return Ok(false);
        };
        if remote.kind != EntryKind::Dir {
            return Ok(false);
        }
        let _namespace = self.engine.locks.shared_namespace();
        if let Some((_, local)) = self.local_lstat(dir, path)?
            && local.kind == EntryKind::Dir
            && !same_attrs(&remote, &local)
        {
            self.set_attrs(dir, path, &local, false)?;
        }
        self.note_dir(dir, path);
        Ok(true)
    }

    fn mkdir(&self, dir: u16, path: &RelPath, local: &EntryMeta) -> Result<(), ResyncError> {
        self.submit(Op::Mkdir {
            dir,
            path: path.clone(),
            mode: perm(local.mode),
            uid: local.uid,
            gid: local.gid,
        })?;
        bump(&self.counters().dirs_created, 1);
        self.note_parent(dir, path);
        self.note_dir(dir, path);
        Ok(())
    }

    /// Brings a symlink or special file to the primary's state.
    fn reconcile_other(
        &self,
        dir: u16,
        path: &RelPath,
        remote: Option<&EntryMeta>,
    ) -> Result<(), ResyncError> {
        bump(&self.counters().files_examined, 1);
        let _namespace = self.engine.locks.shared_namespace();
        let Some((_, local)) = self.local_lstat(dir, path)? else {
            return Ok(());
        };
        let same = remote.is_some_and(|remote| {
            remote.kind == local.kind
                && match local.kind {
                    EntryKind::Symlink => remote.link_target == local.link_target,
                    _ => remote.mode == local.mode && remote.rdev == local.rdev,
                }
        });
        if same {
            if remote.is_some_and(|remote| {
                !same_attrs(remote, &local)
                    || (local.kind != EntryKind::Symlink && remote.mtime != local.mtime)
            }) {
                self.set_attrs(dir, path, &local, local.kind != EntryKind::Symlink)?;
            }
            self.mark_finished(dir, path);
            return Ok(());
        }
        self.mark_finished(dir, path);
        if let Some(remote) = remote {
            self.delete_remote(dir, path, remote)?;
        }
        let op = match local.kind {
            EntryKind::Symlink => Op::Symlink {
                dir,
                path: path.clone(),
                target: local.link_target.clone(),
                uid: local.uid,
                gid: local.gid,
            },
            _ => Op::Mknod {
                dir,
                path: path.clone(),
                mode: local.mode,
                rdev: local.rdev,
                uid: local.uid,
                gid: local.gid,
            },
        };
        self.submit(op)?;
        if local.kind != EntryKind::Symlink {
            self.set_attrs(dir, path, &local, true)?;
        }
        bump(&self.counters().files_sent, 1);
        self.note_parent(dir, path);
        Ok(())
    }

    fn set_attrs(
        &self,
        dir: u16,
        path: &RelPath,
        local: &EntryMeta,
        with_mtime: bool,
    ) -> Result<(), ResyncError> {
        let is_symlink = local.kind == EntryKind::Symlink;
        self.submit(Op::SetAttr {
            dir,
            path: path.clone(),
            mode: (!is_symlink).then_some(perm(local.mode)),
            uid: Some(local.uid),
            gid: Some(local.gid),
            atime: None,
            mtime: with_mtime.then_some(TimeSet::At(local.mtime)),
        })?;
        bump(&self.counters().attr_updates, 1);
        Ok(())
    }

    /// Records a finished file; every so often confirms a batch with a durable barrier
    /// and writes it to the cursor.
    fn finished(&self, dir: u16, path: &RelPath, bytes: u64) -> Result<(), ResyncError> {
        bump(&self.counters().files_done, 1);
        bump(&self.counters().bytes_done, bytes);
        if self.cursor.is_none() {
            return Ok(());
        }
        let due = {
            let mut unconfirmed = self
                .unconfirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            unconfirmed.0.push((dir, path.clone()));
            let config = &self.engine.config;
            unconfirmed.0.len() >= config.confirm_files
                || unconfirmed.1.elapsed() >= config.confirm_interval
        };
        if due { self.confirm() } else { Ok(()) }
    }

    /// Asks for a durable barrier behind the finished files without waiting
    /// for it: they enter the cursor when its answer arrives (looked for at
    /// the next confirmation, and at the end). The receiver flushes beside
    /// its apply loop, so neither side pauses. One confirmation at a time:
    /// while the previous one is unanswered, finished files keep
    /// accumulating for the next.
    fn confirm(&self) -> Result<(), ResyncError> {
        self.settle_confirmations(false)?;
        let mut confirming = self
            .confirming
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if confirming.is_some() {
            return Ok(());
        }
        let batch = {
            let mut unconfirmed = self
                .unconfirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            unconfirmed.1 = Instant::now();
            std::mem::take(&mut unconfirmed.0)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let ticket = self
            .engine
            .sender
            .send_request(RequestBody::Barrier { durable: true })?;
        *confirming = Some((ticket, batch));
        Ok(())
    }

    /// Writes the outstanding confirmation's files to the cursor if its
    /// barrier was answered (with `wait`, after waiting for the answer).
    fn settle_confirmations(&self, wait: bool) -> Result<(), ResyncError> {
        let Some(cursor) = &self.cursor else {
            return Ok(());
        };
        let mut confirming = self
            .confirming
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((ticket, _)) = confirming.as_ref() else {
            return Ok(());
        };
        let sender = &self.engine.sender;
        let reply = if wait {
            sender.wait_reply(*ticket, self.engine.config.request_timeout)
        } else {
            match sender.try_reply(ticket) {
                Some(reply) => reply,
                None => return Ok(()),
            }
        };
        let (_, batch) = confirming.take().expect("a confirmation is outstanding");
        drop(confirming);
        match reply? {
            ReplyBody::Barrier => cursor
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .mark_done(&batch)
                .map_err(io_error("resync cursor")),
            ReplyBody::Failed { errno } => Err(ResyncError::Remote {
                path: String::new(),
                errno,
            }),
            _ => Err(ResyncError::Protocol),
        }
    }

    /// Drops the outstanding confirmation, consuming its answer (the run
    /// completes and its cursor is removed).
    fn discard_confirmation(&self) {
        let outstanding = self
            .confirming
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((ticket, _)) = outstanding {
            let _ = self
                .engine
                .sender
                .wait_reply(ticket, self.engine.config.request_timeout);
        }
    }

    fn skip_resumed(&self, dir: u16, path: &RelPath, bytes: u64) -> bool {
        let Some(cursor) = &self.cursor else {
            return false;
        };
        if self.redirtied.contains(&(dir, path.clone())) {
            return false;
        }
        let done = cursor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_done(dir, path);
        if done {
            bump(&self.counters().files_resumed, 1);
            bump(&self.counters().files_done, 1);
            bump(&self.counters().bytes_done, bytes);
        }
        done
    }

    fn fail(&self, error: ResyncError) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if failure.is_none() {
            *failure = Some(error);
        }
    }

    /// Runs `produce` (which queues jobs) with the workers draining the queue.
    fn with_workers(
        &self,
        produce: impl FnOnce(&dyn Fn(Job) -> Result<(), ResyncError>) -> Result<(), ResyncError>,
    ) -> Result<(), ResyncError> {
        let workers = self.engine.config.workers.max(1);
        let (tx, rx) = mpsc::sync_channel::<Job>(workers * 2);
        let rx = Mutex::new(rx);
        let produced = std::thread::scope(|scope| {
            for _ in 0..workers {
                let rx = &rx;
                scope.spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = job else { return };
                        if self.check_stop().is_err() {
                            continue;
                        }
                        let (dir, path) = (job.dir, job.path.clone());
                        if let Err(error) = self.sync_file(job) {
                            tracing::debug!(%error, path = %show(&path), dir, "file resync failed");
                            self.fail(error);
                        }
                    }
                });
            }
            let queue = |job: Job| -> Result<(), ResyncError> {
                self.check_stop()?;
                tx.send(job).map_err(|_| ResyncError::Stopped)
            };
            let produced = produce(&queue);
            drop(tx);
            produced
        });
        if let Some(error) = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return Err(error);
        }
        if self.engine.stop.load(Ordering::SeqCst) {
            return Err(ResyncError::Stopped);
        }
        produced
    }

    /// Compares the names of `records`: a name gone on the primary is removed
    /// from the replica, a directory recorded whole is compared as a subtree,
    /// one recorded for its attributes only by its own metadata, a file over
    /// its recorded ranges (or whole).
    fn incremental(&self, records: Vec<DirtyRecord>) -> Result<(), ResyncError> {
        self.replay_renames(&rename_history(&records))?;
        let mut missing = Vec::new();
        let mut dirs = Vec::new();
        let mut attr_dirs = Vec::new();
        let mut others = Vec::new();
        let mut files = Vec::new();
        for (dir, path, scope) in scopes(records) {
            match self.local_lstat(dir, &path)? {
                None => missing.push((dir, path)),
                Some((_, meta)) => match meta.kind {
                    EntryKind::Dir if scope == Scope::Whole => dirs.push((dir, path)),
                    EntryKind::Dir => attr_dirs.push((dir, path)),
                    EntryKind::File => files.push((dir, path, meta.size, scope)),
                    EntryKind::Symlink | EntryKind::Special => others.push((dir, path)),
                },
            }
        }
        *self
            .recorded_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = files
            .iter()
            .map(|(dir, path, _, _)| (*dir, path.clone()))
            .collect();
        let counters = self.counters();
        bump(
            &counters.files_total,
            (missing.len() + dirs.len() + attr_dirs.len() + others.len() + files.len()) as u64,
        );
        bump(&counters.bytes_total, files.iter().map(|f| f.2).sum());
        // Removals first, deepest first, so that a directory is emptied before it goes.
        missing.sort_by_key(|(_, path)| std::cmp::Reverse(path.components().len()));
        for (dir, path) in &missing {
            self.check_stop()?;
            if let Some(remote) = self.remote_stat(*dir, path)? {
                self.remove_unless_present(*dir, path, &remote)?;
            }
            self.mark_finished(*dir, path);
            self.note_parent(*dir, path);
            bump(&counters.files_done, 1);
        }
        // Directories whose attributes (the times a namespace change in them
        // shipped) were recorded: their own metadata only; the changed names
        // have records of their own. One missing on the replica is compared
        // as a subtree.
        for (dir, path) in attr_dirs {
            self.check_stop()?;
            if self.sync_dir_attrs(dir, &path)? {
                self.mark_finished(dir, &path);
                bump(&counters.files_done, 1);
            } else {
                dirs.push((dir, path));
            }
        }
        // Subtrees of recorded directories (a recorded ancestor covers its descendants).
        dirs.sort_by_key(|(_, path)| path.components().len());
        let mut roots: Vec<(u16, RelPath)> = Vec::new();
        for (dir, path) in dirs {
            if roots
                .iter()
                .any(|(d, root)| *d == dir && path.components().starts_with(root.components()))
            {
                bump(&counters.files_done, 1);
                continue;
            }
            roots.push((dir, path));
        }
        for (dir, path) in &others {
            self.check_stop()?;
            if let Some((parent, _)) = path.split_last()
                && !self.ensure_dir(*dir, &parent)?
            {
                continue;
            }
            let remote = self.remote_stat(*dir, path)?;
            self.reconcile_other(*dir, path, remote.as_ref())?;
            self.note_parent(*dir, path);
            bump(&counters.files_done, 1);
        }
        let walked = self.with_workers(|queue| {
            for (dir, path) in &roots {
                self.check_stop()?;
                self.note_parent(*dir, path);
                if self.ensure_dir(*dir, path)? {
                    self.walk(*dir, path.clone(), queue)?;
                }
                bump(&counters.files_done, 1);
            }
            // Small files are asked about in batches (one round trip for
            // many), a few batches ahead of the workers; the others ask
            // about themselves.
            let block_size = u64::from(self.engine.config.block_size);
            let per_request = blocks_per_request(block_size);
            let batch_files = BATCH_FILES
                .min(MAX_FILES_PER_BATCH as usize)
                .min(usize::try_from(per_request).unwrap_or(1));
            let mut batch: Vec<(Job, u64, u64)> = Vec::new();
            let mut asked: VecDeque<AskedBatch> = VecDeque::new();
            for (dir, path, size, scope) in files {
                if self.skip_resumed(dir, &path, size) {
                    continue;
                }
                self.note_parent(dir, &path);
                let chunks = plan_chunks(&scope, size, size, block_size, per_request).1;
                let job = Job {
                    dir,
                    path,
                    remote: None,
                    parent_known: false,
                    scope,
                    tracking: None,
                    prefetch: None,
                };
                match chunks.as_slice() {
                    // A file of at most one block with a recorded data change:
                    // its one block differs but for a rare coincidence, so it
                    // is sent whole (see `sync_small`) and only its replica's
                    // metadata is asked, not a hash the receiver would read
                    // the file for.
                    _ if size <= block_size && job.scope != Scope::Attrs => {
                        batch.push((job, 0, 0));
                    }
                    [] => batch.push((job, 0, 0)),
                    [(first, count)] if *count <= 1 => batch.push((job, *first, *count)),
                    _ => queue(job)?,
                }
                if batch.len() >= batch_files {
                    asked.push_back(self.ask_batch(std::mem::take(&mut batch))?);
                    while asked.len() > BATCHES_IN_FLIGHT {
                        if let Some(oldest) = asked.pop_front() {
                            self.queue_batch(oldest, queue)?;
                        }
                    }
                }
            }
            if !batch.is_empty() {
                asked.push_back(self.ask_batch(batch)?);
            }
            while let Some(oldest) = asked.pop_front() {
                self.queue_batch(oldest, queue)?;
            }
            Ok(())
        });
        walked?;
        for (dir, path) in &roots {
            self.mark_finished(*dir, path);
        }
        Ok(())
    }

    /// Replays on the replica, in order, the renames made while the peer was
    /// absent, where the replica still has the source (of the same type) and
    /// not the target: a renamed directory or big file is then compared in
    /// place instead of removed and copied again. Only a head start for the
    /// comparison: both names are recorded whole and compared afterwards
    /// whatever happened here (a rename not replayed, or refused by the
    /// replica, leaves the removal and the copy to it). Each replay is decided
    /// and queued with the namespace held exclusively, so that no live change
    /// of these names comes between the questions and the rename.
    fn replay_renames(&self, renames: &[(u16, RelPath, RelPath)]) -> Result<(), ResyncError> {
        let block_size = u64::from(self.engine.config.block_size);
        for (dir, from, to) in renames.iter().take(MAX_REPLAYED_RENAMES) {
            self.check_stop()?;
            let _namespace = self.engine.locks.namespace();
            // Worth two questions only when copying would cost more.
            let Some((_, local)) = self.local_lstat(*dir, to)? else {
                continue;
            };
            if !(local.kind == EntryKind::Dir
                || local.kind == EntryKind::File && local.size > block_size)
            {
                continue;
            }
            if self
                .remote_stat(*dir, from)?
                .is_none_or(|source| source.kind != local.kind)
                || self.remote_stat(*dir, to)?.is_some()
            {
                continue;
            }
            if let Some((parent, _)) = to.split_last()
                && !parent.components().is_empty()
                && self
                    .remote_stat(*dir, &parent)?
                    .is_none_or(|meta| meta.kind != EntryKind::Dir)
            {
                continue;
            }
            self.submit(Op::Rename {
                dir: *dir,
                from: from.clone(),
                to: to.clone(),
                flags: rename_flags::NOREPLACE,
            })?;
            bump(&self.counters().renames_replayed, 1);
        }
        Ok(())
    }

    /// Tracks the files of `batch` and asks the replica about all of them in
    /// one question, placed in the stream with the namespace held shared: no
    /// rename or removal comes between reading their current names and
    /// queueing the question, so each name in it is the file's name at the
    /// question's place in the stream (as a single file's question, asked
    /// under its data lock, has it). Files that vanished are dropped.
    fn ask_batch(&self, batch: Vec<(Job, u64, u64)>) -> Result<AskedBatch, ResyncError> {
        let mut jobs = Vec::with_capacity(batch.len());
        for (mut job, first, count) in batch {
            job.tracking = Some(Tracking::new(&self.engine.locks, job.dir, &job.path));
            jobs.push((job, first, count));
        }
        let _namespace = self.engine.locks.shared_namespace();
        let mut files = Vec::with_capacity(jobs.len());
        jobs.retain(|(job, first, count)| {
            let current = job
                .tracking
                .as_ref()
                .and_then(|tracking| tracking.tracked.current());
            let Some(current) = current else {
                return false;
            };
            files.push(ChecksumItem {
                dir: job.dir,
                path: current,
                first_block: *first,
                count: u32::try_from(*count).unwrap_or(1),
            });
            true
        });
        let ticket = self
            .engine
            .sender
            .send_request(RequestBody::ChecksumsBatch {
                block_size: self.engine.config.block_size,
                files,
            })?;
        Ok((ticket, jobs))
    }

    /// Waits for the answer to a batched question and queues its jobs, each
    /// with its file's answer (a file the replica could not answer about, or
    /// a whole batch refused, asks again on its own).
    fn queue_batch(
        &self,
        (ticket, jobs): AskedBatch,
        queue: &dyn Fn(Job) -> Result<(), ResyncError>,
    ) -> Result<(), ResyncError> {
        let answers = match self
            .engine
            .sender
            .wait_reply(ticket, self.engine.config.request_timeout)?
        {
            ReplyBody::ChecksumsBatch(answers) if answers.len() == jobs.len() => answers
                .into_iter()
                .map(|answer| match answer {
                    FileChecksums::Found { meta, hashes } => Some((meta, hashes)),
                    FileChecksums::Failed { .. } => None,
                })
                .collect(),
            ReplyBody::Failed { .. } => vec![None; jobs.len()],
            _ => return Err(ResyncError::Protocol),
        };
        for ((mut job, first_block, count), answer) in jobs.into_iter().zip(answers) {
            job.prefetch = answer.map(|(meta, hashes)| Prefetch {
                first_block,
                count,
                meta,
                hashes,
            });
            queue(job)?;
        }
        Ok(())
    }

    fn full(&self) -> Result<(), ResyncError> {
        // Count first, for progress and ETA (a local walk: readdir and lstat only).
        let counters = self.counters();
        for dir in 0..self.engine.source.len() {
            let dir = u16::try_from(dir).map_err(|_| ResyncError::Protocol)?;
            let mut stack = vec![RelPath::root()];
            while let Some(path) = stack.pop() {
                self.check_stop()?;
                let Ok(entries) = tree::list_dir(self.engine.root(dir)?, &path) else {
                    continue;
                };
                for entry in entries {
                    let child = path.join(&entry.name).map_err(|_| ResyncError::Protocol)?;
                    bump(&counters.files_total, 1);
                    if entry.meta.kind == EntryKind::File {
                        bump(&counters.bytes_total, entry.meta.size);
                    }
                    if entry.meta.kind == EntryKind::Dir {
                        stack.push(child);
                    }
                }
            }
        }
        self.with_workers(|queue| {
            for dir in 0..self.engine.source.len() {
                let dir = u16::try_from(dir).map_err(|_| ResyncError::Protocol)?;
                self.walk(dir, RelPath::root(), queue)?;
            }
            Ok(())
        })
    }

    /// Compares the subtree at `top` (which exists on the replica as a directory).
    fn walk(
        &self,
        dir: u16,
        top: RelPath,
        queue: &dyn Fn(Job) -> Result<(), ResyncError>,
    ) -> Result<(), ResyncError> {
        let counters = self.counters();
        let checksum_all = self.engine.config.checksum_all;
        let mut stack = vec![top];
        while let Some(path) = stack.pop() {
            self.check_stop()?;
            let local = match tree::list_dir(self.engine.root(dir)?, &path) {
                Ok(local) => local,
                Err(error) if tree::is_absent(&error) => continue,
                Err(error) => return Err(io_error(format!("list {}", show(&path)))(error)),
            };
            let remote = self.remote_list(dir, &path)?.unwrap_or_default();
            self.note_dir(dir, &path);
            let mut remote_iter = remote.into_iter().peekable();
            let mut pairs: Vec<(Option<DirEntry>, Option<DirEntry>)> = Vec::new();
            let mut local_iter = local.into_iter().peekable();
            loop {
                let order = match (local_iter.peek(), remote_iter.peek()) {
                    (None, None) => break,
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some(l), Some(r)) => l.name.cmp(&r.name),
                };
                match order {
                    std::cmp::Ordering::Less => pairs.push((local_iter.next(), None)),
                    std::cmp::Ordering::Greater => pairs.push((None, remote_iter.next())),
                    std::cmp::Ordering::Equal => {
                        pairs.push((local_iter.next(), remote_iter.next()));
                    }
                }
            }
            for (local, mut remote) in pairs {
                self.check_stop()?;
                let name = local
                    .as_ref()
                    .or(remote.as_ref())
                    .map(|entry| entry.name.clone())
                    .unwrap_or_default();
                let child = path.join(&name).map_err(|_| ResyncError::Protocol)?;
                let Some(local) = local else {
                    if let Some(remote) = remote {
                        self.remove_unless_present(dir, &child, &remote.meta)?;
                    }
                    continue;
                };
                if let Some(r) = &remote
                    && r.meta.kind != local.meta.kind
                    && self.remove_unless_present(dir, &child, &r.meta)?
                {
                    remote = None;
                }
                let remote = remote.map(|entry| entry.meta);
                match local.meta.kind {
                    EntryKind::File
                        if self
                            .recorded_files
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .contains(&(dir, child.clone())) => {}
                    EntryKind::File => {
                        let size = local.meta.size;
                        let recent = (local.meta.mtime.secs, local.meta.mtime.nanos)
                            >= self.quick_check_before;
                        let differs = recent
                            || remote.as_ref().is_none_or(|r| {
                                checksum_all
                                    || r.size != local.meta.size
                                    || r.mtime != local.meta.mtime
                            });
                        if !differs {
                            bump(&counters.files_examined, 1);
                            {
                                let _guard = self.engine.locks.data(dir, &child);
                                if let Some(r) = &remote
                                    && !same_attrs(r, &local.meta)
                                    && let Some((_, now)) = self.local_lstat(dir, &child)?
                                {
                                    self.set_attrs(dir, &child, &now, true)?;
                                }
                                self.sync_xattrs(dir, &child)?;
                                self.mark_finished(dir, &child);
                            }
                            self.finished(dir, &child, size)?;
                        } else if !self.skip_resumed(dir, &child, size) {
                            queue(Job {
                                dir,
                                path: child,
                                remote: Some(remote),
                                parent_known: true,
                                scope: Scope::Whole,
                                tracking: None,
                                prefetch: None,
                            })?;
                        }
                    }
                    EntryKind::Dir => {
                        match &remote {
                            None => {
                                let _namespace = self.engine.locks.shared_namespace();
                                match self.local_lstat(dir, &child)? {
                                    Some((_, now)) if now.kind == EntryKind::Dir => {
                                        self.mkdir(dir, &child, &now)?;
                                    }
                                    _ => continue,
                                }
                            }
                            Some(r) if !same_attrs(r, &local.meta) => {
                                self.set_attrs(dir, &child, &local.meta, false)?;
                            }
                            Some(_) => {}
                        }
                        bump(&counters.files_examined, 1);
                        bump(&counters.files_done, 1);
                        stack.push(child);
                    }
                    EntryKind::Symlink | EntryKind::Special => {
                        let up_to_date = remote.as_ref().is_some_and(|r| {
                            r.kind == local.meta.kind
                                && r.link_target == local.meta.link_target
                                && r.mode == local.meta.mode
                                && r.rdev == local.meta.rdev
                                && same_attrs(r, &local.meta)
                                && (r.kind == EntryKind::Symlink || r.mtime == local.meta.mtime)
                        });
                        if up_to_date {
                            bump(&counters.files_examined, 1);
                        } else {
                            self.reconcile_other(dir, &child, remote.as_ref())?;
                        }
                        bump(&counters.files_done, 1);
                    }
                }
            }
        }
        Ok(())
    }

    /// Brings one regular file up to date (a worker's job).
    fn sync_file(&self, mut job: Job) -> Result<(), ResyncError> {
        let tracking = match job.tracking.take() {
            Some(tracking) => tracking,
            None => Tracking::new(&self.engine.locks, job.dir, &job.path),
        };
        let result = self.sync_tracked(&job, &tracking.tracked);
        match result {
            Ok(FileEnd::Done) | Ok(FileEnd::Vanished) => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn sync_tracked(&self, job: &Job, tracked: &locks::Tracked) -> Result<FileEnd, ResyncError> {
        if let Some(end) = self.sync_small(job, tracked)? {
            return Ok(end);
        }
        let dir = job.dir;
        let root = self.engine.root(dir)?;
        let counters = self.counters();
        let config = &self.engine.config;
        let block_size = u64::from(config.block_size);
        bump(&counters.files_examined, 1);
        // Open the file under its lock and remember which inode it is.
        let (fd, opened) = {
            let Some((_guard, current)) = self.engine.locks.lock_tracked(tracked) else {
                return Ok(FileEnd::Vanished);
            };
            match tree::open_regular(root, &current)
                .map_err(io_error(format!("open {}", show(&current))))?
            {
                Some(found) => found,
                None => return Ok(FileEnd::Vanished),
            }
        };
        let size = u64::try_from(opened.st_size).unwrap_or(0);
        // Re-takes the lock and checks the name still leads to our inode.
        let relock = || -> Result<Option<(DataGuard<'_>, RelPath)>, ResyncError> {
            let Some((guard, current)) = self.engine.locks.lock_tracked(tracked) else {
                return Ok(None);
            };
            match tree::lstat(root, &current)
                .map_err(io_error(format!("lstat {}", show(&current))))?
            {
                Some((stat, _)) if same_inode(&stat, &opened) => Ok(Some((guard, current))),
                _ => {
                    tracked.set_vanished();
                    Ok(None)
                }
            }
        };
        let per_request = blocks_per_request(block_size);
        // The replica's metadata, unless the walk listed it. One question gives
        // it and the hashes of the first chunk to compare (planned as if the
        // replica had the file's size: the common case, and the only one in
        // which those hashes are used), saving a round trip per file.
        let mut prefetched: Option<(u64, u64, u64, Vec<BlockHash>)> = None;
        let remote = match (&job.remote, &job.prefetch) {
            (Some(remote), _) => remote.clone(),
            (None, Some(asked)) => {
                if let Some(meta) = asked.meta.as_ref().filter(|m| m.kind == EntryKind::File) {
                    prefetched = Some((
                        meta.size,
                        asked.first_block,
                        asked.count,
                        asked.hashes.clone(),
                    ));
                }
                asked.meta.clone()
            }
            (None, None) => {
                let (first_block, count) =
                    plan_chunks(&job.scope, size, size, block_size, per_request)
                        .1
                        .first()
                        .copied()
                        .unwrap_or((0, 0));
                let ticket = {
                    let Some((_guard, current)) = self.engine.locks.lock_tracked(tracked) else {
                        return Ok(FileEnd::Vanished);
                    };
                    self.engine.sender.send_request(RequestBody::Checksums {
                        dir,
                        path: current,
                        block_size: config.block_size,
                        first_block,
                        count: u32::try_from(count).unwrap_or(MAX_BLOCKS_PER_REQUEST),
                    })?
                };
                match self
                    .engine
                    .sender
                    .wait_reply(ticket, config.request_timeout)?
                {
                    ReplyBody::Checksums { meta, hashes } => {
                        if let Some(meta) = meta.as_ref().filter(|m| m.kind == EntryKind::File) {
                            prefetched = Some((meta.size, first_block, count, hashes));
                        }
                        meta
                    }
                    ReplyBody::Failed { .. } => {
                        let current = match self.engine.locks.lock_tracked(tracked) {
                            Some((_guard, current)) => current,
                            None => return Ok(FileEnd::Vanished),
                        };
                        self.remote_stat(dir, &current)?
                    }
                    _ => return Err(ResyncError::Protocol),
                }
            }
        };
        let mut created = false;
        // The mode and owner the replica's file has once created here.
        let mut created_with = (0, 0, 0);
        let remote = match remote {
            Some(meta) if meta.kind == EntryKind::File => Some(meta),
            other => {
                let current = match self.engine.locks.lock_tracked(tracked) {
                    Some((_guard, current)) => current,
                    None => return Ok(FileEnd::Vanished),
                };
                if let Some(other) = &other {
                    if !self.remove_unless_present(dir, &current, other)? {
                        // The primary has a non-file there now; the live stream handles it.
                        return Ok(FileEnd::Vanished);
                    }
                } else if !job.parent_known
                    && let Some((parent, _)) = current.split_last()
                    && !self.ensure_dir(dir, &parent)?
                {
                    return Ok(FileEnd::Vanished);
                }
                let Some((_guard, current)) = relock()? else {
                    return Ok(FileEnd::Vanished);
                };
                let stat = rustix::fs::fstat(&fd).map_err(|e| ResyncError::Io {
                    what: format!("fstat {}", show(&current)),
                    source: e.into(),
                })?;
                self.submit(Op::Create {
                    dir,
                    path: current,
                    mode: perm(stat.st_mode),
                    uid: stat.st_uid,
                    gid: stat.st_gid,
                    exclusive: false,
                })?;
                created = true;
                created_with = (perm(stat.st_mode), stat.st_uid, stat.st_gid);
                None
            }
        };
        let remote_size = remote.as_ref().map_or(0, |meta| meta.size);
        let mut shipped = Shipped::default();
        let compare_blocks = blocks(size.min(remote_size), block_size);
        let (scope, chunks) = if remote.is_some() {
            plan_chunks(&job.scope, size, remote_size, block_size, per_request)
        } else {
            (&job.scope, Vec::new())
        };
        if remote.is_some() {
            self.count_compared(scope, size);
        }
        // The prefetched hashes answer the first chunk when the plan did not change.
        let mut ready: Option<(u64, u64, Vec<BlockHash>)> = match prefetched {
            Some((prefetched_size, first, count, hashes))
                if prefetched_size == remote_size
                    && remote_size == size
                    && chunks.first() == Some(&(first, count)) =>
            {
                Some((first, count, hashes))
            }
            _ => None,
        };
        let mut chunks = chunks.into_iter();
        if ready.is_some() {
            chunks.next();
        }
        let in_flight = if *scope == Scope::Whole { 2 } else { 8 };
        let mut differing: Vec<u64> = Vec::new();
        let mut requested: VecDeque<(u64, u64, RequestTicket)> = VecDeque::new();
        let mut buf = vec![0u8; usize::try_from(block_size).unwrap_or(usize::MAX)];
        loop {
            while requested.len() < in_flight {
                let Some((first_block, count)) = chunks.next() else {
                    break;
                };
                // Under the lock, so that the name in the request is the file's name
                // at the request's place in the stream.
                let Some((guard, current)) = self.engine.locks.lock_tracked(tracked) else {
                    return Ok(FileEnd::Vanished);
                };
                let ticket = self.engine.sender.send_request(RequestBody::Checksums {
                    dir,
                    path: current,
                    block_size: config.block_size,
                    first_block,
                    count: u32::try_from(count).unwrap_or(MAX_BLOCKS_PER_REQUEST),
                })?;
                drop(guard);
                requested.push_back((first_block, count, ticket));
            }
            let (first, count, hashes) = match ready.take() {
                Some(ready) => ready,
                None => {
                    let Some((first, count, ticket)) = requested.pop_front() else {
                        break;
                    };
                    self.check_stop()?;
                    let hashes = match self
                        .engine
                        .sender
                        .wait_reply(ticket, config.request_timeout)?
                    {
                        ReplyBody::Checksums { hashes, .. } => hashes,
                        ReplyBody::Failed { .. } => Vec::new(),
                        _ => return Err(ResyncError::Protocol),
                    };
                    (first, count, hashes)
                }
            };
            for index in 0..count {
                let block = first + index;
                let n = tree::read_at(&fd, &mut buf, block * block_size)
                    .map_err(io_error("read a block"))?;
                bump(&counters.blocks_compared, 1);
                let equal = usize::try_from(index)
                    .ok()
                    .and_then(|index| hashes.get(index))
                    .is_some_and(|remote| *remote == tree::hash(&buf[..n]));
                if !equal {
                    differing.push(block);
                }
            }
            // Ship what differs in this chunk before comparing further.
            if !self.ship_blocks(dir, &fd, &differing, &relock, &mut shipped)? {
                return Ok(FileEnd::Vanished);
            }
            differing.clear();
        }
        // Blocks the replica does not have at all.
        let tail: Vec<u64> = (compare_blocks..blocks(size, block_size)).collect();
        if !self.ship_blocks(dir, &fd, &tail, &relock, &mut shipped)? {
            return Ok(FileEnd::Vanished);
        }
        // Size and attributes, under the lock, as they are now.
        let finished_path = {
            let Some((_guard, current)) = relock()? else {
                return Ok(FileEnd::Vanished);
            };
            let stat = rustix::fs::fstat(&fd).map_err(|e| ResyncError::Io {
                what: format!("fstat {}", show(&current)),
                source: e.into(),
            })?;
            let settled = Settled {
                size,
                remote: remote.as_ref(),
                created_with: created.then_some(created_with),
                sent_any: shipped.any,
                punched: shipped.punched,
            };
            self.settle_file(dir, &current, &tree::meta(&stat, Vec::new()), &settled)?;
            current
        };
        self.finished(dir, &finished_path, size)?;
        Ok(FileEnd::Done)
    }

    /// Counts a file of `size` bytes compared over `scope` (its blocks, and
    /// whether whole or over ranges).
    fn count_compared(&self, scope: &Scope, size: u64) {
        let counters = self.counters();
        bump(
            &counters.file_blocks,
            blocks(size, u64::from(self.engine.config.block_size)),
        );
        bump(
            if *scope == Scope::Whole {
                &counters.files_whole
            } else {
                &counters.files_by_range
            },
            1,
        );
    }

    /// Ships a file's size and attributes as they are `now` (its data guard
    /// held), after its differing blocks, and marks it finished.
    fn settle_file(
        &self,
        dir: u16,
        current: &RelPath,
        now: &EntryMeta,
        settled: &Settled<'_>,
    ) -> Result<(), ResyncError> {
        let counters = self.counters();
        let created = settled.created_with.is_some();
        let remote_size = settled.remote.map_or(0, |meta| meta.size);
        // The size is right without a truncate when the replica had the
        // file's size, or when it was created here and every block up to
        // the size was shipped; shipped blocks end inside the file, and a
        // file that changed size meanwhile has `now.size != size`.
        let size_settled =
            now.size == settled.size && (created || now.size == remote_size) && !settled.punched;
        if !size_settled {
            self.submit(Op::Truncate {
                dir,
                path: current.clone(),
                size: now.size,
            })?;
        }
        let attrs_differ = settled
            .remote
            .is_none_or(|r| !same_attrs(r, now) || r.mtime != now.mtime);
        if created || settled.sent_any || now.size != remote_size || attrs_differ {
            // The mtime, and the mode and owner only where they differ
            // from the replica's (as created, or as it answered: a live
            // change since is in `now` and shipped after that answer).
            // A change of owner clears set-id bits: the mode goes with it.
            let (mode, uid, gid) = match (settled.remote, settled.created_with) {
                (Some(r), _) => (perm(r.mode), r.uid, r.gid),
                (None, created_with) => created_with.unwrap_or_default(),
            };
            let owner_differs = now.uid != uid || now.gid != gid;
            self.submit(Op::SetAttr {
                dir,
                path: current.clone(),
                mode: (owner_differs || perm(now.mode) != mode).then_some(perm(now.mode)),
                uid: owner_differs.then_some(now.uid),
                gid: owner_differs.then_some(now.gid),
                atime: None,
                mtime: Some(TimeSet::At(now.mtime)),
            })?;
            bump(&counters.attr_updates, 1);
        }
        if created || settled.sent_any {
            bump(&counters.files_sent, 1);
        }
        self.sync_xattrs(dir, current)?;
        self.note_parent(dir, current);
        self.mark_finished(dir, current);
        Ok(())
    }

    /// With [`ResyncConfig::xattrs`], makes the replica's extended attributes
    /// of `path` the primary's (call with its data guard held, so that no
    /// live change of them comes between the question and the changes).
    /// Asked even of an entry this resync created: it may have inherited a
    /// default ACL there.
    fn sync_xattrs(&self, dir: u16, path: &RelPath) -> Result<(), ResyncError> {
        if !self.engine.config.xattrs {
            return Ok(());
        }
        let local = tree::xattrs(self.engine.root(dir)?, path).map_err(io_error(format!(
            "list the extended attributes of {}",
            show(path)
        )))?;
        let Some(local) = local else {
            return Ok(());
        };
        let remote = match self.ask(RequestBody::Xattrs {
            dir,
            path: path.clone(),
        })? {
            ReplyBody::Xattrs(remote) => remote,
            // Gone on the replica: the stream's operations decide.
            ReplyBody::Failed {
                errno: libc::ENOENT,
            } => return Ok(()),
            ReplyBody::Failed { errno } => {
                return Err(ResyncError::Remote {
                    path: show(path),
                    errno,
                });
            }
            _ => return Err(ResyncError::Protocol),
        };
        for xattr in &local {
            if remote
                .iter()
                .find(|r| r.name == xattr.name)
                .is_none_or(|r| r.value != xattr.value)
            {
                self.submit(Op::SetXattr {
                    dir,
                    path: path.clone(),
                    name: xattr.name.clone(),
                    value: xattr.value.clone(),
                    flags: 0,
                })?;
                bump(&self.counters().xattr_updates, 1);
            }
        }
        for extra in remote
            .iter()
            .filter(|r| !local.iter().any(|l| l.name == r.name))
        {
            self.submit(Op::RemoveXattr {
                dir,
                path: path.clone(),
                name: extra.name.clone(),
            })?;
            bump(&self.counters().xattr_updates, 1);
        }
        Ok(())
    }

    /// A file of at most one block whose replica, also a file of at most one
    /// block, was asked about in a batch: brought up to date in one hold of
    /// its data guard (one open, one read, no inode re-check). Its data is
    /// sent whole unless the batch asked for its hash (none is asked when
    /// the dirty log recorded a data change) and the hash matches. `None`
    /// when the file does not qualify; the general path then handles it.
    fn sync_small(
        &self,
        job: &Job,
        tracked: &locks::Tracked,
    ) -> Result<Option<FileEnd>, ResyncError> {
        let Some(prefetch) = &job.prefetch else {
            return Ok(None);
        };
        let Some(remote) = prefetch.meta.as_ref().filter(|m| m.kind == EntryKind::File) else {
            return Ok(None);
        };
        let block_size = u64::from(self.engine.config.block_size);
        if job.scope == Scope::Attrs || prefetch.first_block != 0 || remote.size > block_size {
            return Ok(None);
        }
        let root = self.engine.root(job.dir)?;
        let counters = self.counters();
        // Room first: live writes of this file must not wait behind a slow link.
        self.wait_room(usize::try_from(block_size).unwrap_or(usize::MAX))?;
        let Some((guard, current)) = self.engine.locks.lock_tracked(tracked) else {
            return Ok(Some(FileEnd::Vanished));
        };
        let Some((fd, stat)) = tree::open_regular(root, &current)
            .map_err(io_error(format!("open {}", show(&current))))?
        else {
            return Ok(Some(FileEnd::Vanished));
        };
        let now = tree::meta(&stat, Vec::new());
        if now.size > block_size {
            return Ok(None);
        }
        bump(&counters.files_examined, 1);
        self.count_compared(&job.scope, now.size);
        let data = tree::read_vec_at(&fd, usize::try_from(now.size).unwrap_or(0), 0)
            .map_err(io_error("read a block"))?;
        let n = data.len();
        let size = n as u64;
        let mut sent_any = false;
        if size > 0 {
            let compared = prefetch.count > 0 && remote.size > 0;
            if compared {
                bump(&counters.blocks_compared, 1);
            }
            let same = compared
                && remote.size == size
                && prefetch.hashes.first() == Some(&tree::hash(&data));
            if !same {
                self.submit(Op::Write {
                    dir: job.dir,
                    path: current.clone(),
                    offset: 0,
                    data,
                })?;
                sent_any = true;
                bump(&counters.blocks_sent, 1);
                bump(&counters.bytes_sent, size);
            }
        }
        // The size is what was read (the guard keeps writers out meanwhile).
        let now = EntryMeta { size, ..now };
        let settled = Settled {
            size,
            remote: Some(remote),
            created_with: None,
            sent_any,
            punched: false,
        };
        self.settle_file(job.dir, &current, &now, &settled)?;
        drop(guard);
        self.finished(job.dir, &current, size)?;
        Ok(Some(FileEnd::Done))
    }

    /// Ships `blocks` (sorted), coalescing neighbours up to `max_write`;
    /// `false` if the file vanished. A run of blocks that is a hole in the
    /// primary's file (`SEEK_DATA` finds no data in it) is shipped as a hole
    /// punched in the replica's file, not as zeros: sparse files stay sparse.
    fn ship_blocks<'l>(
        &'l self,
        dir: u16,
        fd: &OwnedFd,
        blocks_to_send: &[u64],
        relock: &dyn Fn() -> Result<Option<(DataGuard<'l>, RelPath)>, ResyncError>,
        shipped: &mut Shipped,
    ) -> Result<bool, ResyncError> {
        let config = &self.engine.config;
        let block_size = u64::from(config.block_size);
        let per_write = (config.max_write as u64 / block_size).max(1);
        let hole = |block: u64| tree::is_hole(fd, block * block_size, block_size);
        let mut index = 0;
        while index < blocks_to_send.len() {
            self.check_stop()?;
            let first = blocks_to_send[index];
            let first_is_hole = hole(first);
            let mut count = 1u64;
            while index + (count as usize) < blocks_to_send.len()
                && blocks_to_send[index + count as usize] == first + count
                && count < per_write
                && hole(first + count) == first_is_hole
            {
                count += 1;
            }
            index += count as usize;
            let len = usize::try_from(count * block_size).unwrap_or(usize::MAX);
            if first_is_hole {
                let Some((_guard, current)) = relock()? else {
                    return Ok(false);
                };
                // Checked again under the lock: a live write may have filled it.
                if tree::is_hole(fd, first * block_size, count * block_size) {
                    self.submit(Op::Fallocate {
                        dir,
                        path: current,
                        mode: PUNCH_HOLE_KEEP_SIZE,
                        offset: first * block_size,
                        len: count * block_size,
                    })?;
                    shipped.any = true;
                    shipped.punched = true;
                    bump(&self.counters().holes_sent, count);
                    continue;
                }
            }
            self.throttle.take(len, &self.engine.stop);
            // Wait for room before taking the lock, so that live writes of this
            // file do not wait behind a slow link.
            self.wait_room(len)?;
            let Some((_guard, current)) = relock()? else {
                return Ok(false);
            };
            let data = tree::read_vec_at(fd, len, first * block_size)
                .map_err(io_error(format!("read {}", show(&current))))?;
            let n = data.len();
            if n == 0 {
                // The file shrank meanwhile; the final truncate settles the size.
                break;
            }
            self.submit(Op::Write {
                dir,
                path: current,
                offset: first * block_size,
                data,
            })?;
            shipped.any = true;
            let counters = self.counters();
            bump(&counters.blocks_sent, blocks(n as u64, block_size));
            bump(&counters.bytes_sent, n as u64);
        }
        Ok(true)
    }

    /// Final stage: directory times, a durable barrier with the namespace held
    /// exclusively, and extra passes over files recorded dirty during the run.
    fn finish(
        &self,
        dirty_path: &std::path::Path,
        seen_records: &mut usize,
    ) -> Result<(), ResyncError> {
        loop {
            self.check_stop()?;
            let pending = std::mem::take(
                &mut self
                    .unconfirmed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .0,
            );
            let dirs: Vec<(u16, RelPath)> = std::mem::take(
                &mut *self
                    .touched_dirs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            )
            .into_iter()
            .collect();
            // Their extended attributes, each under its own data guard.
            if self.engine.config.xattrs {
                for (dir, path) in &dirs {
                    let _guard = self.engine.locks.data(*dir, path);
                    if self
                        .local_lstat(*dir, path)?
                        .is_some_and(|(_, local)| local.kind == EntryKind::Dir)
                    {
                        self.sync_xattrs(*dir, path)?;
                    }
                }
            }
            {
                let _namespace = self.engine.locks.shared_namespace();
                for (dir, path) in dirs {
                    if let Some((_, local)) = self.local_lstat(dir, &path)?
                        && local.kind == EntryKind::Dir
                    {
                        self.submit(Op::SetAttr {
                            dir,
                            path,
                            mode: None,
                            uid: None,
                            gid: None,
                            atime: None,
                            mtime: Some(TimeSet::At(local.mtime)),
                        })?;
                    }
                }
            }
            let namespace = self.engine.locks.namespace();
            self.barrier(true)?;
            let dirty = DirtyLog::load(dirty_path).map_err(|error| ResyncError::Io {
                what: format!("dirty log {}", dirty_path.display()),
                source: io::Error::other(error.to_string()),
            })?;
            let recheck = self.engine.locks.take_recheck();
            if dirty.records.len() <= *seen_records && recheck.is_empty() {
                // The cursor goes: the outstanding confirmation (answered
                // before the barrier, the receiver flushes in order) needs
                // no record.
                self.discard_confirmation();
                self.engine.locks.stop_collecting();
                if self.engine.config.clear_dirty_log {
                    self.engine
                        .sender
                        .dirty_log()
                        .clear()
                        .map_err(io_error("clear the dirty log"))?;
                }
                drop(namespace);
                return Ok(());
            }
            drop(namespace);
            self.settle_confirmations(true)?;
            // The barrier made the pending files durable on the replica: a
            // run interrupted from here on skips them.
            if let Some(cursor) = &self.cursor
                && !pending.is_empty()
            {
                cursor
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .mark_done(&pending)
                    .map_err(io_error("resync cursor"))?;
            }
            if self.counters().extra_passes.load(Ordering::Relaxed) >= MAX_EXTRA_PASSES {
                return Err(ResyncError::Remote {
                    path: format!(
                        "{} files",
                        dirty.records.len().saturating_sub(*seen_records) + recheck.len()
                    ),
                    errno: libc::EAGAIN,
                });
            }
            let mut again: Vec<DirtyRecord> =
                dirty.records[(*seen_records).min(dirty.records.len())..].to_vec();
            again.extend(recheck.into_iter().map(whole_record));
            *seen_records = dirty.records.len();
            bump(&self.counters().extra_passes, 1);
            tracing::info!(
                files = again.len(),
                "files recorded dirty during the resync; another pass"
            );
            let extra = Run::new(self.engine, None, HashSet::new(), self.quick_check_before);
            extra.incremental(again)?;
            self.touched_dirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(
                    extra
                        .touched_dirs
                        .into_inner()
                        .unwrap_or_else(PoisonError::into_inner),
                );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 64 * 1024;

    #[test]
    fn recorded_ranges_plan_only_the_blocks_covering_them() {
        let scope = Scope::Ranges(vec![(10, 20), (5 * B + 1, 7 * B), (100 * B, 100 * B + 1)]);
        let (used, chunks) = plan_chunks(&scope, 128 * B, 128 * B, B, 256);
        assert_eq!(used, &scope);
        assert_eq!(chunks, vec![(0, 1), (5, 2), (100, 1)]);
    }

    #[test]
    fn a_grown_file_also_compares_the_replicas_partial_last_block() {
        let scope = Scope::Ranges(vec![(10 * B, 12 * B)]);
        let (_, chunks) = plan_chunks(&scope, 12 * B, 3 * B + 7, B, 256);
        // Blocks from 4 on are shipped as the tail, not compared.
        assert_eq!(chunks, vec![(3, 1)]);
    }

    #[test]
    fn sizes_the_records_cannot_explain_fall_back_to_the_whole_file() {
        let ranges = Scope::Ranges(vec![(0, 1)]);
        let (used, chunks) = plan_chunks(&ranges, 4 * B, 6 * B, B, 3);
        assert_eq!(used, &Scope::Whole);
        assert_eq!(chunks, vec![(0, 3), (3, 1)]);
        let (used, chunks) = plan_chunks(&Scope::Attrs, 4 * B, 4 * B, B, 3);
        assert_eq!((used, chunks), (&Scope::Attrs, vec![]));
        let (used, _) = plan_chunks(&Scope::Attrs, 4 * B, 4 * B - 1, B, 3);
        assert_eq!(used, &Scope::Whole);
    }

    #[test]
    fn records_of_one_name_merge_into_one_scope() {
        let p = |s: &str| RelPath::parse(s.as_bytes()).expect("valid");
        let record = |path: &str, change| DirtyRecord {
            dir: 0,
            path: p(path),
            change,
        };
        let range =
            |offset, len| Change::Range(safekit_protocol::replication::ByteRange { offset, len });
        let merged = scopes(vec![
            record("f", range(0, 10)),
            record("d", Change::Attrs),
            record("f", Change::Attrs),
            record("f", range(5, 10)),
            record("g", range(0, 1)),
            record("g", Change::Whole),
        ]);
        assert_eq!(
            merged,
            vec![
                (0, p("f"), Scope::Ranges(vec![(0, 15)])),
                (0, p("d"), Scope::Attrs),
                (0, p("g"), Scope::Whole),
            ]
        );
    }
}
