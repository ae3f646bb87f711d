//! The FUSE file system mounted over a replicated directory.
//!
//! [`ReplicatedFs`] is a pass-through file system in the style of virtiofsd's
//! `PassthroughFs`: it holds a descriptor of the underlying directory opened
//! *before* the mount covered it, and reaches everything beneath it one
//! component at a time (`openat(parent, name, O_PATH | O_NOFOLLOW)`); open
//! files are re-opened through `/proc/self/fd/N` of the inode's `O_PATH`
//! descriptor, never by a path. Neither `..` (the kernel never sends it, and
//! names are checked) nor a symlink (never followed) leads out of the tree.
//!
//! After each successful local change the file system builds the matching
//! [`Op`] (paths relative to the replicated directory, from the inode store's
//! names) and calls [`Replicator::replicate`]; the application gets its answer
//! only when that call returned. What it waits for depends on the [`SyncMode`].
//!
//! Ordering: the peer must apply changes in the order they happened here. Two
//! locks give that order without serializing independent writers:
//! - the namespace lock: shared by data operations and lookups, exclusive for
//!   operations that change names (create, link, unlink, rename...), each held
//!   from before the local change until `replicate` returned, so a path used
//!   in an operation is the file's path at the moment the operation happened;
//! - each inode's `op_lock`, held the same way, so that two changes to one
//!   file are enqueued in the order they were applied.
//!
//! Resync and crash recovery: with [`ReplicatedFs::with_file_locks`] every
//! change also holds the module's resync lock table ([`FileLocks`]: the data
//! lock of the file for a data change, the namespace lock for a change of
//! names) from before the local change until `replicate` returned, after this
//! layer's own locks, and reports creates, renames and removals on the
//! namespace guard. With [`ReplicatedFs::with_activity_log`] every name a
//! change touches (the file of a data change; the new, removed or both
//! renamed names of a namespace change) is recorded in the activity log
//! ([`ActivityLog::note_write`]) before the local change, and its ticket kept
//! until `replicate` returned; when the log cannot be written the request
//! fails with `EIO` and nothing is changed. The parents whose mtime a
//! namespace change ships are not recorded: after a crash only their times
//! may differ, and recording a directory would make the incremental resync
//! compare its whole subtree.
//!
//! Caller credentials: `default_permissions` makes the kernel check every
//! request with the caller's credentials; creating and changing calls then run
//! with the caller's fsuid/fsgid on the worker thread ([`creds`]).

mod creds;
pub mod inode;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, SeekFrom, Stat, Timespec, Timestamps, UTIME_NOW, UTIME_OMIT,
};
use safekit_protocol::replication::{Op, RelPath, TimeSet, Timestamp, rename_flags};

use crate::activity::{ActivityLog, ActivityTicket};
use crate::replicator::{ReplicateOutcome, Replicator, WaitFor};
use crate::resync::locks::{DataGuard, FileLocks, NamespaceGuard};
use inode::{Inode, InodeStore, ROOT_ID};

/// How long the kernel may cache entries and attributes. Nothing but this
/// daemon changes the tree while it is mounted, so the cache is only bounded
/// to limit the effect of a change made beneath the mount by someone else.
const TTL: Duration = Duration::from_secs(1);

/// Largest write request the kernel sends (its own cap is 1 MiB here).
pub const MAX_WRITE: u32 = 1 << 20;

/// When a change counts as done for the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Every write and every namespace operation returns after the peer applied
    /// it; fsync, fdatasync and `O_SYNC`/`O_DSYNC` writes after the peer made
    /// them durable. No writeback cache.
    #[default]
    Strict,
    /// Only fsync/fdatasync, `O_SYNC`/`O_DSYNC` writes and close wait for the
    /// peer; every other change (writes, and namespace and attribute changes)
    /// is queued in order without waiting, and the kernel's
    /// writeback cache batches small writes. A crash of the primary loses
    /// writes that were not followed by fsync or close.
    FsyncOnly,
}

/// Settings of one mounted replicated directory.
#[derive(Debug, Clone, Copy)]
pub struct FsOptions {
    /// Index of the directory in the module's `<replicated>` list (the `dir` of every [`Op`]).
    pub dir_index: u16,
    /// When a change counts as done.
    pub mode: SyncMode,
    /// Replicate extended attribute changes (`acl="on"`); they are always applied locally.
    pub replicate_xattrs: bool,
}

/// Counters of one mount, read by the control socket.
#[derive(Debug, Default)]
pub struct FsStats {
    /// Requests that changed the tree and were handed to the replicator.
    pub replicated_ops: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Operations the peer confirmed.
    pub confirmed: AtomicU64,
    /// Operations queued without waiting.
    pub queued: AtomicU64,
    /// Operations recorded as dirty because the peer was absent.
    pub alone: AtomicU64,
    /// Operations not replicated because replication is off.
    pub off: AtomicU64,
    /// Changes to files that have no name any more (unlinked but open): not replicated.
    pub unnamed: AtomicU64,
    /// Requests that failed locally.
    pub errors: AtomicU64,
}

impl FsStats {
    /// A one-line `key=value` rendering.
    pub fn render(&self) -> String {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "replicated_ops={} writes={} bytes_written={} confirmed={} queued={} alone={} off={} unnamed={} errors={}",
            v(&self.replicated_ops),
            v(&self.writes),
            v(&self.bytes_written),
            v(&self.confirmed),
            v(&self.queued),
            v(&self.alone),
            v(&self.off),
            v(&self.unnamed),
            v(&self.errors)
        )
    }
}

/// A directory snapshot: (d_ino, type, name) per entry.
type DirEntries = Vec<(u64, fuser::FileType, Vec<u8>)>;

/// An open file or directory.
#[derive(Debug)]
struct Handle {
    inode: Arc<Inode>,
    fd: OwnedFd,
    /// Opened `O_SYNC`/`O_DSYNC`: every write waits until the peer made it durable.
    sync: bool,
    /// Opened for writing (so `ftruncate` may use it).
    writable: bool,
    /// Directory snapshot taken at offset 0: (d_ino, type, name).
    entries: Mutex<Option<DirEntries>>,
}

/// The FUSE file system over one replicated directory. See the module documentation.
pub struct ReplicatedFs {
    store: InodeStore,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    proc_fd: OwnedFd,
    namespace: RwLock<()>,
    replicator: Arc<dyn Replicator>,
    options: FsOptions,
    stats: Arc<FsStats>,
    file_locks: Option<Arc<FileLocks>>,
    activity: Option<Arc<ActivityLog>>,
}

/// Held around a data change and its `replicate()` call: the resync's data
/// lock of the file and its activity-log ticket (each when configured).
struct DataHold<'a> {
    _ticket: Option<ActivityTicket<'a>>,
    _guard: Option<DataGuard<'a>>,
}

impl std::fmt::Debug for ReplicatedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedFs")
            .field("options", &self.options)
            .field("inodes", &self.store.len())
            .finish()
    }
}

type Res<T> = Result<T, Errno>;

fn errno(error: impl Into<io::Error>) -> Errno {
    Errno::from(error.into())
}

fn raw(error: rustix::io::Errno) -> io::Error {
    io::Error::from(error)
}

fn key_of(st: &Stat) -> (u64, u64) {
    (st.st_ino, st.st_dev)
}

fn check_name(name: &OsStr) -> Res<&[u8]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    if bytes.len() > 255 {
        return Err(Errno::from_i32(libc::ENAMETOOLONG));
    }
    Ok(bytes)
}

fn fuse_kind(kind: FileType) -> fuser::FileType {
    match kind {
        FileType::Directory => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::Socket => fuser::FileType::Socket,
        FileType::CharacterDevice => fuser::FileType::CharDevice,
        FileType::BlockDevice => fuser::FileType::BlockDevice,
        _ => fuser::FileType::RegularFile,
    }
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = u32::try_from(nanos).unwrap_or(0);
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nanos))
    }
}

/// (seconds, nanoseconds) of atime, mtime and ctime.
#[allow(
    clippy::unnecessary_cast,
    reason = "the field types differ between rustix backends and targets"
)]
fn stat_times(st: &Stat) -> [(i64, i64); 3] {
    [
        (st.st_atime as i64, st.st_atime_nsec as i64),
        (st.st_mtime as i64, st.st_mtime_nsec as i64),
        (st.st_ctime as i64, st.st_ctime_nsec as i64),
    ]
}

fn timestamp((secs, nanos): (i64, i64)) -> Timestamp {
    Timestamp {
        secs,
        nanos: u32::try_from(nanos).unwrap_or(0),
    }
}

fn timespec_of(time: Option<TimeOrNow>) -> Timespec {
    match time {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(d.subsec_nanos()),
            },
            Err(before) => {
                let d = before.duration();
                let mut secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let mut nanos = i64::from(d.subsec_nanos());
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Timespec {
                    tv_sec: secs,
                    tv_nsec: nanos,
                }
            }
        },
    }
}

fn pwrite_all(fd: impl AsFd, data: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(&fd, &data[done..], offset + done as u64) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) if done > 0 => {
                tracing::trace!(error = %e, "short write");
                break;
            }
            Err(e) => return Err(raw(e)),
        }
    }
    Ok(done)
}

impl ReplicatedFs {
    /// A file system over the directory `dir_fd` (opened `O_PATH | O_DIRECTORY`
    /// before anything was mounted over it), replicating through `replicator`.
    ///
    /// # Errors
    /// When the directory cannot be examined or `/proc/self/fd` cannot be opened.
    pub fn new(
        dir_fd: OwnedFd,
        replicator: Arc<dyn Replicator>,
        options: FsOptions,
    ) -> io::Result<Self> {
        let st = rustix::fs::fstat(&dir_fd).map_err(raw)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let proc_fd = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(raw)?;
        Ok(ReplicatedFs {
            store: InodeStore::new(dir_fd, key_of(&st)),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            proc_fd,
            namespace: RwLock::new(()),
            replicator,
            options,
            stats: Arc::new(FsStats::default()),
            file_locks: None,
            activity: None,
        })
    }

    /// Shares the module's lock table with its resync engine: every change
    /// then also holds [`FileLocks::data`] or [`FileLocks::namespace`] from
    /// before the local change until `replicate` returned, and reports renames
    /// and removals, so a resync block can never overtake a live write.
    pub fn with_file_locks(mut self, locks: Arc<FileLocks>) -> Self {
        self.file_locks = Some(locks);
        self
    }

    /// Records every name a change touches in the module's activity log
    /// before the change (see the module documentation), so that after a
    /// crash the files with operations in flight are known without a scan.
    pub fn with_activity_log(mut self, log: Arc<ActivityLog>) -> Self {
        self.activity = Some(log);
        self
    }

    /// Records `path` in the activity log (if any) before a change of it;
    /// keep the ticket until `replicate` returned.
    fn note(&self, path: &RelPath) -> Res<Option<ActivityTicket<'_>>> {
        let Some(log) = &self.activity else {
            return Ok(None);
        };
        match log.note_write(self.options.dir_index, path) {
            Ok(ticket) => Ok(Some(ticket)),
            Err(error) => {
                tracing::error!(%error, ?path, "cannot record the file in the activity log; change refused");
                Err(Errno::EIO)
            }
        }
    }

    /// Records each of `paths` in the activity log (see [`Self::note`]).
    fn note_all(&self, paths: &[&Option<RelPath>]) -> Res<Vec<ActivityTicket<'_>>> {
        let mut tickets = Vec::new();
        for path in paths.iter().filter_map(|path| path.as_ref()) {
            tickets.extend(self.note(path)?);
        }
        Ok(tickets)
    }

    /// Takes the resync's data lock on `inode` (see [`Self::with_file_locks`])
    /// and, when `change`, records it in the activity log: call after this
    /// layer's own locks, before the local change; hold until `replicate` returned.
    fn data_hold(&self, inode: &Inode, change: bool) -> Res<DataHold<'_>> {
        let note = change && self.activity.is_some();
        if self.file_locks.is_none() && !note {
            return Ok(DataHold {
                _ticket: None,
                _guard: None,
            });
        }
        let Some(path) = self.store.path_of(inode) else {
            // No name: nothing will be shipped.
            return Ok(DataHold {
                _ticket: None,
                _guard: None,
            });
        };
        let guard = self
            .file_locks
            .as_ref()
            .map(|locks| locks.data(self.options.dir_index, &path));
        let ticket = if note { self.note(&path)? } else { None };
        Ok(DataHold {
            _ticket: ticket,
            _guard: guard,
        })
    }

    /// The resync's namespace lock (see [`Self::with_file_locks`]).
    fn names_lock(&self) -> Option<NamespaceGuard<'_>> {
        self.file_locks.as_ref().map(|locks| locks.namespace())
    }

    /// The counters of this mount (shared; they keep counting after the call).
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    fn inode(&self, ino: INodeNo) -> Res<Arc<Inode>> {
        self.store.get(ino.0).ok_or(Errno::ESTALE)
    }

    fn handle(&self, fh: FileHandle) -> Res<Arc<Handle>> {
        self.handles
            .read()
            .expect("handle table lock poisoned")
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .expect("handle table lock poisoned")
            .insert(fh, Arc::new(handle));
        fh
    }

    fn proc_name(fd: &impl AsRawFd) -> String {
        fd.as_raw_fd().to_string()
    }

    /// A new descriptor of `inode` with `flags`, through its `/proc/self/fd` magic link.
    fn reopen(&self, inode: &Inode, flags: OFlags) -> io::Result<OwnedFd> {
        let flags = (flags | OFlags::CLOEXEC) & !OFlags::NOFOLLOW;
        rustix::fs::openat(
            &self.proc_fd,
            Self::proc_name(&inode.fd),
            flags,
            Mode::empty(),
        )
        .map_err(raw)
    }

    fn attr(&self, inode: &Inode, st: &Stat) -> FileAttr {
        let ino = if inode.nodeid == ROOT_ID {
            st.st_ino
        } else {
            inode.nodeid
        };
        let times = stat_times(st);
        FileAttr {
            ino: INodeNo(ino),
            size: u64::try_from(st.st_size).unwrap_or(0),
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
            atime: system_time(times[0].0, times[0].1),
            mtime: system_time(times[1].0, times[1].1),
            ctime: system_time(times[2].0, times[2].1),
            crtime: UNIX_EPOCH,
            kind: fuse_kind(FileType::from_raw_mode(st.st_mode)),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: u32::try_from(st.st_rdev).unwrap_or(0),
            blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
            flags: 0,
        }
    }

    fn as_caller<T>(&self, req: &Request, f: impl FnMut() -> io::Result<T>) -> Res<T> {
        creds::as_caller(req.uid(), req.gid(), req.pid(), f).map_err(errno)
    }

    /// Hands `op` to the replicator and records what happened.
    fn ship(&self, inode: Option<&Inode>, op: Op, wait_for: WaitFor) {
        self.stats.replicated_ops.fetch_add(1, Ordering::Relaxed);
        let is_fsync = op.is_fsync();
        if let Some(inode) = inode
            && !is_fsync
        {
            inode.needs_durable.store(true, Ordering::Relaxed);
        }
        let outcome = self.replicator.replicate(op, wait_for);
        tracing::trace!(?outcome, ?wait_for, "replicated");
        match outcome {
            ReplicateOutcome::Confirmed => {
                self.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                if let Some(inode) = inode {
                    if wait_for == WaitFor::Durable {
                        inode.needs_durable.store(false, Ordering::Relaxed);
                    }
                    if wait_for != WaitFor::Queued {
                        inode.unconfirmed_writes.store(false, Ordering::Relaxed);
                    }
                }
            }
            ReplicateOutcome::Queued => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                if let Some(inode) = inode {
                    inode.unconfirmed_writes.store(true, Ordering::Relaxed);
                }
            }
            ReplicateOutcome::Alone => {
                self.stats.alone.fetch_add(1, Ordering::Relaxed);
            }
            ReplicateOutcome::Off => {
                self.stats.off.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Ships an operation on `inode` built from its current path, or counts it
    /// as unnamed when the file has no name any more.
    fn ship_at(&self, inode: &Inode, wait_for: WaitFor, build: impl FnOnce(RelPath) -> Op) {
        match self.store.path_of(inode) {
            Some(path) => self.ship(Some(inode), build(path), wait_for),
            None => {
                self.stats.unnamed.fetch_add(1, Ordering::Relaxed);
                // Normal for a file unlinked while open. A file that still has
                // links we never saw (a hard link made before the mount whose
                // known name was removed) is now out of sync with the peer.
                let nlink = rustix::fs::fstat(&inode.fd)
                    .map(|st| st.st_nlink)
                    .unwrap_or(0);
                if nlink > 0 && inode.kind != FileType::Directory {
                    tracing::warn!(
                        nodeid = inode.nodeid,
                        nlink,
                        "change to a file whose remaining names are unknown was not replicated; resync needed"
                    );
                } else {
                    tracing::trace!(
                        nodeid = inode.nodeid,
                        "change to an unlinked file is not replicated"
                    );
                }
            }
        }
    }

    /// A `SetAttr` that gives the peer's copy of `inode` the times it has
    /// here: the mtime, and the atime too when `with_atime` (a new node).
    fn times_op(&self, inode: &Inode, with_atime: bool) -> Option<Op> {
        let st = rustix::fs::fstat(&inode.fd).ok()?;
        let path = self.store.path_of(inode)?;
        let [atime, mtime, _] = stat_times(&st);
        Some(Op::SetAttr {
            dir: self.options.dir_index,
            path,
            mode: None,
            uid: None,
            gid: None,
            atime: with_atime.then(|| TimeSet::At(timestamp(atime))),
            mtime: Some(TimeSet::At(timestamp(mtime))),
        })
    }

    /// Ships a namespace operation (built for `main`), then the times of the
    /// nodes it created and the mtime of the directories it changed, so that
    /// the peer's times match ours; only the last operation waits as the mode
    /// says (acknowledgements are cumulative).
    fn ship_namespace(&self, main: Option<(&Inode, Op)>, new_nodes: &[&Inode], dirs: &[&Inode]) {
        let Some((main_inode, op)) = main else {
            self.stats.unnamed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut ops: Vec<(&Inode, Op)> = vec![(main_inode, op)];
        for node in new_nodes {
            ops.extend(self.times_op(node, true).map(|op| (*node, op)));
        }
        let mut seen = Vec::new();
        for dir in dirs {
            if !seen.contains(&dir.nodeid) {
                seen.push(dir.nodeid);
                ops.extend(self.times_op(dir, false).map(|op| (*dir, op)));
            }
        }
        let last = ops.len() - 1;
        for (i, (inode, op)) in ops.into_iter().enumerate() {
            let wait = if i == last {
                self.data_wait()
            } else {
                WaitFor::Queued
            };
            self.ship(Some(inode), op, wait);
        }
    }

    /// Ships the file's mtime if data changes moved it since it was last shipped.
    fn ship_file_times(&self, inode: &Inode, wait: WaitFor) -> bool {
        if !inode.mtime_dirty.swap(false, Ordering::Relaxed) {
            return false;
        }
        match self.times_op(inode, false) {
            Some(op) => {
                self.ship(Some(inode), op, wait);
                true
            }
            None => false,
        }
    }

    /// The wait of a change in the current mode: every change but fsync,
    /// `O_SYNC`/`O_DSYNC` writes and close.
    fn data_wait(&self) -> WaitFor {
        match self.options.mode {
            SyncMode::Strict => WaitFor::Applied,
            SyncMode::FsyncOnly => WaitFor::Queued,
        }
    }

    fn count_error<T>(&self, result: Res<T>) -> Res<T> {
        if result.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Opens `name` in `parent` as `O_PATH`, records the lookup and returns the entry.
    fn lookup_child(&self, parent: &Inode, name: &[u8]) -> Res<(Arc<Inode>, Stat)> {
        let fd = rustix::fs::openat(
            &parent.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        let inode = self.store.lookup(
            fd,
            key_of(&st),
            FileType::from_raw_mode(st.st_mode),
            parent.nodeid,
            name,
        );
        Ok((inode, st))
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<FileAttr> {
        let parent = self.inode(parent)?;
        let name = check_name(name)?;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let (inode, st) = self.lookup_child(&parent, name)?;
        Ok(self.attr(&inode, &st))
    }

    fn do_getattr(&self, ino: INodeNo) -> Res<FileAttr> {
        let inode = self.inode(ino)?;
        let st = rustix::fs::fstat(&inode.fd).map_err(errno)?;
        Ok(self.attr(&inode, &st))
    }

    /// Sets the inode's times (as the caller) without following a symlink.
    fn set_times(&self, req: &Request, inode: &Inode, times: &Timestamps) -> Res<()> {
        if inode.kind == FileType::Symlink {
            let link = inode.links().into_iter().next().ok_or(Errno::ENOENT)?;
            let parent = self.store.get(link.parent).ok_or(Errno::ENOENT)?;
            return self.as_caller(req, || {
                rustix::fs::utimensat(
                    &parent.fd,
                    link.name.as_slice(),
                    times,
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(raw)
            });
        }
        let name = Self::proc_name(&inode.fd);
        self.as_caller(req, || {
            rustix::fs::utimensat(&self.proc_fd, name.as_str(), times, AtFlags::empty())
                .map_err(raw)
        })
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one argument per field of the FUSE request"
    )]
    fn do_setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Res<FileAttr> {
        let inode = self.inode(ino)?;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let _op = inode.op_lock.lock().expect("inode op lock poisoned");
        let _data = self.data_hold(&inode, true)?;
        inode.privs_clear.store(false, Ordering::Relaxed);
        let mode_before = rustix::fs::fstat(&inode.fd).map_err(errno)?.st_mode;
        if uid.is_some() || gid.is_some() {
            let (u, g) = (
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
            );
            self.as_caller(req, || {
                rustix::fs::chownat(
                    &inode.fd,
                    "",
                    u,
                    g,
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(raw)
            })?;
        }
        if let Some(mode) = mode {
            if inode.kind == FileType::Symlink {
                return Err(Errno::from_i32(libc::EOPNOTSUPP));
            }
            let name = Self::proc_name(&inode.fd);
            self.as_caller(req, || {
                rustix::fs::chmodat(
                    &self.proc_fd,
                    name.as_str(),
                    Mode::from_raw_mode(mode & 0o7777),
                    AtFlags::empty(),
                )
                .map_err(raw)
            })?;
        }
        if let Some(size) = size {
            let handle = fh
                .and_then(|fh| self.handle(fh).ok())
                .filter(|h| h.writable);
            // As the caller: truncation by an unprivileged caller clears the
            // set-id bits (the underlying file system does it for us).
            match handle {
                Some(handle) => {
                    self.as_caller(req, || rustix::fs::ftruncate(&handle.fd, size).map_err(raw))?;
                }
                None => {
                    if inode.kind != FileType::RegularFile {
                        return Err(Errno::EINVAL);
                    }
                    self.as_caller(req, || {
                        let fd = self.reopen(&inode, OFlags::WRONLY)?;
                        rustix::fs::ftruncate(&fd, size).map_err(raw)
                    })?;
                }
            }
        }
        if atime.is_some() || mtime.is_some() {
            let times = Timestamps {
                last_access: timespec_of(atime),
                last_modification: timespec_of(mtime),
            };
            self.set_times(req, &inode, &times)?;
        }
        let st = rustix::fs::fstat(&inode.fd).map_err(errno)?;
        let wait = self.data_wait();
        if let Some(size) = size {
            self.ship_at(&inode, wait, |path| Op::Truncate {
                dir: self.options.dir_index,
                path,
                size,
            });
        }
        if size.is_some() && mtime.is_none() {
            // The truncation moved the mtime; shipped at the next close or fsync.
            inode.mtime_dirty.store(true, Ordering::Relaxed);
        }
        // Set-id bits cleared as a side effect (chown, truncate) are shipped too.
        let mode_changed = mode.is_some() || st.st_mode != mode_before;
        if mode_changed || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            let op = |path| Op::SetAttr {
                dir: self.options.dir_index,
                path,
                mode: mode_changed.then_some(st.st_mode),
                uid,
                gid,
                atime: atime.map(|_| TimeSet::At(timestamp(stat_times(&st)[0]))),
                mtime: mtime.map(|_| TimeSet::At(timestamp(stat_times(&st)[1]))),
            };
            self.ship_at(&inode, wait, op);
        }
        Ok(self.attr(&inode, &st))
    }

    /// Creates a node with `make` (run with the caller's credentials), then
    /// records its lookup and ships the operation `op_for` builds from its stat.
    fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnMut(&Inode, &[u8]) -> io::Result<()>,
        op_for: impl FnOnce(RelPath, &Stat) -> Op,
    ) -> Res<FileAttr> {
        let parent = self.inode(parent)?;
        let name = check_name(name)?;
        let mut make = make;
        crate::sys::clear_thread_umask().map_err(errno)?;
        let _ns = self.namespace.write().expect("namespace lock poisoned");
        let names = self.names_lock();
        let path = self.store.child_path(&parent, name);
        let _tickets = self.note_all(&[&path])?;
        self.as_caller(req, || make(&parent, name))?;
        if let (Some(names), Some(path)) = (&names, &path) {
            names.created(self.options.dir_index, path);
        }
        let (inode, st) = self.lookup_child(&parent, name)?;
        let main = path.map(|path| (&*inode, op_for(path, &st)));
        self.ship_namespace(main, &[&inode], &[&parent]);
        Ok(self.attr(&inode, &st))
    }

    fn do_link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
    ) -> Res<FileAttr> {
        let inode = self.inode(ino)?;
        let newparent = self.inode(newparent)?;
        let newname = check_name(newname)?;
        let _ns = self.namespace.write().expect("namespace lock poisoned");
        let names = self.names_lock();
        let existing = self.store.path_of(&inode);
        let new = self.store.child_path(&newparent, newname);
        let _tickets = self.note_all(&[&new])?;
        if req.uid() == 0 {
            rustix::fs::linkat(&inode.fd, "", &newparent.fd, newname, AtFlags::EMPTY_PATH)
                .map_err(errno)?;
        } else {
            let name = Self::proc_name(&inode.fd);
            self.as_caller(req, || {
                rustix::fs::linkat(
                    &self.proc_fd,
                    name.as_str(),
                    &newparent.fd,
                    newname,
                    AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(raw)
            })?;
        }
        if let (Some(names), Some(new)) = (&names, &new) {
            names.created(self.options.dir_index, new);
        }
        let (inode, st) = self.lookup_child(&newparent, newname)?;
        let main = existing.zip(new).map(|(existing, new)| {
            let op = Op::Link {
                dir: self.options.dir_index,
                existing,
                new,
            };
            (&*inode, op)
        });
        self.ship_namespace(main, &[], &[&newparent]);
        Ok(self.attr(&inode, &st))
    }

    fn do_remove(&self, req: &Request, parent: INodeNo, name: &OsStr, dir: bool) -> Res<()> {
        let parent = self.inode(parent)?;
        let name = check_name(name)?;
        let _ns = self.namespace.write().expect("namespace lock poisoned");
        let names = self.names_lock();
        let st = rustix::fs::statat(&parent.fd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        let path = self.store.child_path(&parent, name);
        let _tickets = self.note_all(&[&path])?;
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        self.as_caller(req, || {
            rustix::fs::unlinkat(&parent.fd, name, flags).map_err(raw)
        })?;
        if let Some(victim) = self.find(key_of(&st)) {
            victim.remove_link(parent.nodeid, name);
        }
        let dir_index = self.options.dir_index;
        if let (Some(names), Some(path)) = (&names, &path) {
            names.removed(dir_index, path);
        }
        let main = path.map(|path| {
            let op = if dir {
                Op::Rmdir {
                    dir: dir_index,
                    path,
                }
            } else {
                Op::Unlink {
                    dir: dir_index,
                    path,
                }
            };
            (&*parent, op)
        });
        self.ship_namespace(main, &[], &[&parent]);
        Ok(())
    }

    /// The entry of an underlying inode, if the kernel references it.
    fn find(&self, key: (u64, u64)) -> Option<Arc<Inode>> {
        self.store.find(key)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one argument per field of the FUSE request"
    )]
    fn do_rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let parent = self.inode(parent)?;
        let newparent = self.inode(newparent)?;
        let name = check_name(name)?;
        let newname = check_name(newname)?;
        let _ns = self.namespace.write().expect("namespace lock poisoned");
        let names = self.names_lock();
        let src = rustix::fs::statat(&parent.fd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        let dst = rustix::fs::statat(&newparent.fd, newname, AtFlags::SYMLINK_NOFOLLOW).ok();
        let from = self.store.child_path(&parent, name);
        let to = self.store.child_path(&newparent, newname);
        let _tickets = self.note_all(&[&from, &to])?;
        let mut rflags = rustix::fs::RenameFlags::empty();
        let mut wire_flags = 0;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            rflags |= rustix::fs::RenameFlags::NOREPLACE;
            wire_flags |= rename_flags::NOREPLACE;
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            rflags |= rustix::fs::RenameFlags::EXCHANGE;
            wire_flags |= rename_flags::EXCHANGE;
        }
        self.as_caller(req, || {
            rustix::fs::renameat_with(&parent.fd, name, &newparent.fd, newname, rflags).map_err(raw)
        })?;
        let src_key = key_of(&src);
        let dst_key = dst.as_ref().map(key_of);
        let moved = self.find(src_key);
        if dst_key != Some(src_key) {
            if let Some(target) = dst_key.and_then(|k| self.find(k)) {
                if wire_flags & rename_flags::EXCHANGE != 0 {
                    target.move_link(newparent.nodeid, newname, parent.nodeid, name);
                } else {
                    target.remove_link(newparent.nodeid, newname);
                }
            }
            if let Some(moved) = &moved {
                moved.move_link(parent.nodeid, name, newparent.nodeid, newname);
            }
        }
        if let (Some(names), Some(from), Some(to)) = (&names, &from, &to) {
            names.renamed(self.options.dir_index, from, to, wire_flags);
        }
        let main = from.zip(to).map(|(from, to)| {
            let op = Op::Rename {
                dir: self.options.dir_index,
                from,
                to,
                flags: wire_flags,
            };
            (moved.as_deref().unwrap_or(&parent), op)
        });
        self.ship_namespace(main, &[], &[&parent, &newparent]);
        Ok(())
    }

    /// Flags for the underlying descriptor of an open file.
    fn open_flags(&self, flags: i32) -> OFlags {
        let requested = OFlags::from_bits_retain(flags as u32);
        // O_APPEND: the kernel sends the offset of each write (it knows the size,
        // all changes go through it), and the replicated offset must be that one.
        // O_DIRECT: our buffers are not aligned.
        let mut out = requested
            & !(OFlags::CREATE
                | OFlags::EXCL
                | OFlags::NOCTTY
                | OFlags::TRUNC
                | OFlags::APPEND
                | OFlags::DIRECT);
        if self.options.mode == SyncMode::FsyncOnly
            && (requested & OFlags::RWMODE) == OFlags::WRONLY
        {
            // With the writeback cache the kernel reads pages of write-only files.
            out = (out & !OFlags::RWMODE) | OFlags::RDWR;
        }
        out
    }

    fn do_open(&self, ino: INodeNo, flags: OpenFlags) -> Res<u64> {
        let inode = self.inode(ino)?;
        if inode.kind != FileType::RegularFile {
            return Err(if inode.kind == FileType::Directory {
                Errno::EISDIR
            } else {
                Errno::ENXIO
            });
        }
        let oflags = self.open_flags(flags.0);
        let fd = self.reopen(&inode, oflags).map_err(errno)?;
        Ok(self.add_handle(Handle {
            inode,
            fd,
            sync: flags.0 & libc::O_DSYNC != 0,
            writable: (oflags & OFlags::RWMODE) != OFlags::RDONLY,
            entries: Mutex::new(None),
        }))
    }

    fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Res<(FileAttr, u64)> {
        let parent = self.inode(parent)?;
        let name = check_name(name)?;
        let requested = OFlags::from_bits_retain(flags as u32);
        let base = self.open_flags(flags) | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let plain = (base & !OFlags::RWMODE) | (requested & OFlags::RWMODE);
        let perm = Mode::from_raw_mode(mode & 0o7777);
        crate::sys::clear_thread_umask().map_err(errno)?;
        let _ns = self.namespace.write().expect("namespace lock poisoned");
        let names = self.names_lock();
        let path = self.store.child_path(&parent, name);
        // Recorded whether it creates the file or truncates an existing one.
        let _tickets = self.note_all(&[&path])?;
        let (fd, created) = self.as_caller(req, || {
            match rustix::fs::openat(&parent.fd, name, base | OFlags::CREATE | OFlags::EXCL, perm) {
                Ok(fd) => Ok((fd, true)),
                Err(rustix::io::Errno::EXIST) if !requested.contains(OFlags::EXCL) => {
                    let trunc = requested & OFlags::TRUNC;
                    match rustix::fs::openat(&parent.fd, name, base | trunc, Mode::empty()) {
                        Ok(fd) => Ok((fd, false)),
                        Err(rustix::io::Errno::ACCESS) if base != plain => {
                            rustix::fs::openat(&parent.fd, name, plain | trunc, Mode::empty())
                                .map(|fd| (fd, false))
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
            .map_err(raw)
        })?;
        if created && let (Some(names), Some(path)) = (&names, &path) {
            names.created(self.options.dir_index, path);
        }
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Errno::EISDIR);
        }
        let path_fd = rustix::fs::openat(
            &self.proc_fd,
            Self::proc_name(&fd),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let inode = self.store.lookup(
            path_fd,
            key_of(&st),
            FileType::RegularFile,
            parent.nodeid,
            name,
        );
        match path {
            Some(path) if created => {
                let op = Op::Create {
                    dir: self.options.dir_index,
                    path,
                    mode: st.st_mode,
                    uid: st.st_uid,
                    gid: st.st_gid,
                    exclusive: true,
                };
                self.ship_namespace(Some((&inode, op)), &[&inode], &[&parent]);
            }
            Some(path) if requested.contains(OFlags::TRUNC) => {
                let op = Op::Truncate {
                    dir: self.options.dir_index,
                    path,
                    size: 0,
                };
                self.ship_namespace(Some((&inode, op)), &[], &[]);
                inode.mtime_dirty.store(true, Ordering::Relaxed);
            }
            Some(_) => {}
            None => {
                self.stats.unnamed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let attr = self.attr(&inode, &st);
        let oflags = rustix::fs::fcntl_getfl(&fd).map_err(errno)?;
        let fh = self.add_handle(Handle {
            inode,
            fd,
            sync: flags & libc::O_DSYNC != 0,
            writable: (oflags & OFlags::RWMODE) != OFlags::RDONLY,
            entries: Mutex::new(None),
        });
        Ok((attr, fh))
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Res<Vec<u8>> {
        let handle = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(&handle.fd, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(errno(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn do_write(
        &self,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
    ) -> Res<u32> {
        let handle = self.handle(fh)?;
        let inode = &handle.inode;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let _op = inode.op_lock.lock().expect("inode op lock poisoned");
        let _data = self.data_hold(inode, true)?;
        let written = pwrite_all(&handle.fd, data, offset).map_err(errno)?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_written
            .fetch_add(written as u64, Ordering::Relaxed);
        // Raw bit: rustix's `OFlags::DSYNC` is the full O_SYNC value.
        let sync = handle.sync || flags.0 & libc::O_DSYNC != 0;
        let wait = if sync {
            WaitFor::Durable
        } else {
            self.data_wait()
        };
        self.ship_at(inode, wait, |path| Op::Write {
            dir: self.options.dir_index,
            path,
            offset,
            data: data[..written].to_vec(),
        });
        inode.mtime_dirty.store(true, Ordering::Relaxed);
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            self.kill_privs(inode, wait)?;
        }
        Ok(u32::try_from(written).unwrap_or(u32::MAX))
    }

    /// A write by an unprivileged caller clears the set-user-id bit, the
    /// set-group-id bit of a group-executable file, and file capabilities, as
    /// the kernel would (we asked for `FUSE_HANDLE_KILLPRIV_V2`, which makes
    /// this our job and spares a `getxattr` round trip per write). Runs with
    /// the inode's `op_lock` held; the changes are replicated.
    fn kill_privs(&self, inode: &Inode, wait: WaitFor) -> Res<()> {
        if inode.privs_clear.load(Ordering::Relaxed) {
            return Ok(());
        }
        let st = rustix::fs::fstat(&inode.fd).map_err(errno)?;
        let mode = st.st_mode;
        let mut cleared = mode & !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            cleared &= !libc::S_ISGID;
        }
        let name = Self::proc_name(&inode.fd);
        if cleared != mode {
            rustix::fs::chmodat(
                &self.proc_fd,
                name.as_str(),
                Mode::from_raw_mode(cleared & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
            self.ship_at(inode, wait, |path| Op::SetAttr {
                dir: self.options.dir_index,
                path,
                mode: Some(cleared),
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
            });
        }
        let path = format!("/proc/self/fd/{name}");
        match rustix::fs::removexattr(path.as_str(), "security.capability") {
            Ok(()) => {
                if self.options.replicate_xattrs {
                    self.ship_at(inode, wait, |path| Op::RemoveXattr {
                        dir: self.options.dir_index,
                        path,
                        name: b"security.capability".to_vec(),
                    });
                }
            }
            Err(rustix::io::Errno::NODATA | rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(errno(e)),
        }
        inode.privs_clear.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn do_flush(&self, fh: FileHandle) -> Res<()> {
        let handle = self.handle(fh)?;
        let inode = &handle.inode;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let _op = inode.op_lock.lock().expect("inode op lock poisoned");
        let _data = self.data_hold(inode, inode.mtime_dirty.load(Ordering::Relaxed))?;
        // The file's mtime, moved by the writes since the last close, so the
        // peer's copy matches ours once the application closed it. In the
        // strict mode the data is already on the peer and the mtime needs no
        // wait of its own (it is applied before anything shipped later); in
        // the fsync-only mode this is the close barrier.
        let wait = match self.options.mode {
            SyncMode::Strict => WaitFor::Queued,
            SyncMode::FsyncOnly => WaitFor::Applied,
        };
        if self.ship_file_times(inode, wait) && wait == WaitFor::Applied {
            return Ok(());
        }
        if self.options.mode == SyncMode::FsyncOnly
            && inode.unconfirmed_writes.load(Ordering::Relaxed)
        {
            // A change-nothing operation on the file: once the peer applied it,
            // it applied every queued write before it (acknowledgements are cumulative).
            self.ship_at(inode, WaitFor::Applied, |path| Op::SetAttr {
                dir: self.options.dir_index,
                path,
                mode: None,
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
            });
        }
        Ok(())
    }

    fn do_release(&self, fh: FileHandle) {
        let handle = self
            .handles
            .write()
            .expect("handle table lock poisoned")
            .remove(&fh.0);
        if let Some(handle) = handle
            && handle.writable
        {
            // Writes through a shared mapping may arrive after the last flush.
            let _ns = self.namespace.read().expect("namespace lock poisoned");
            let _op = handle.inode.op_lock.lock().expect("inode op lock poisoned");
            let dirty = handle.inode.mtime_dirty.load(Ordering::Relaxed);
            let Ok(_data) = self.data_hold(&handle.inode, dirty) else {
                // Logged by `note`; the mtime is not shipped.
                return;
            };
            self.ship_file_times(&handle.inode, WaitFor::Queued);
        }
    }

    fn do_fsync(&self, fh: FileHandle, datasync: bool) -> Res<()> {
        let handle = self.handle(fh)?;
        let inode = &handle.inode;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let _op = inode.op_lock.lock().expect("inode op lock poisoned");
        let _data = self.data_hold(inode, inode.mtime_dirty.load(Ordering::Relaxed))?;
        if datasync {
            rustix::fs::fdatasync(&handle.fd).map_err(errno)?;
        } else {
            rustix::fs::fsync(&handle.fd).map_err(errno)?;
        }
        self.ship_file_times(inode, WaitFor::Queued);
        if inode.needs_durable.load(Ordering::Relaxed) {
            self.ship_at(inode, WaitFor::Durable, |path| Op::Fsync {
                dir: self.options.dir_index,
                path,
                datasync,
            });
        }
        Ok(())
    }

    fn do_opendir(&self, ino: INodeNo) -> Res<u64> {
        let inode = self.inode(ino)?;
        if inode.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let fd = rustix::fs::openat(
            &inode.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        Ok(self.add_handle(Handle {
            inode,
            fd,
            sync: false,
            writable: false,
            entries: Mutex::new(None),
        }))
    }

    fn do_readdir(&self, fh: FileHandle, offset: u64, reply: &mut ReplyDirectory) -> Res<()> {
        let handle = self.handle(fh)?;
        let mut entries = handle
            .entries
            .lock()
            .expect("directory snapshot lock poisoned");
        if offset == 0 || entries.is_none() {
            let mut list = Vec::new();
            for entry in rustix::fs::Dir::read_from(&handle.fd).map_err(errno)? {
                let entry = entry.map_err(errno)?;
                let kind = fuse_kind(entry.file_type());
                list.push((entry.ino(), kind, entry.file_name().to_bytes().to_vec()));
            }
            *entries = Some(list);
        }
        let list = entries.as_ref().expect("snapshot filled above");
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(start) {
            if reply.add(
                INodeNo(*ino),
                (i + 1) as u64,
                *kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        Ok(())
    }

    fn do_fsyncdir(&self, fh: FileHandle, datasync: bool) -> Res<()> {
        let handle = self.handle(fh)?;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        rustix::fs::fsync(&handle.fd).map_err(errno)?;
        self.ship_at(&handle.inode, WaitFor::Durable, |path| Op::Fsync {
            dir: self.options.dir_index,
            path,
            datasync,
        });
        Ok(())
    }

    /// The path naming the inode for the path-based `*xattr` calls, and whether
    /// the call must not follow it (a symlink is named through its parent).
    fn xattr_path(&self, inode: &Inode) -> Res<(std::ffi::OsString, bool)> {
        if inode.kind == FileType::Symlink {
            let link = inode.links().into_iter().next().ok_or(Errno::ENOENT)?;
            let parent = self.store.get(link.parent).ok_or(Errno::ENOENT)?;
            let mut path = format!("/proc/self/fd/{}/", parent.fd.as_raw_fd()).into_bytes();
            path.extend_from_slice(&link.name);
            return Ok((std::ffi::OsString::from_vec(path), true));
        }
        Ok((
            format!("/proc/self/fd/{}", inode.fd.as_raw_fd()).into(),
            false,
        ))
    }

    fn do_getxattr(&self, ino: INodeNo, name: &OsStr, size: u32) -> Res<Result<Vec<u8>, u32>> {
        let inode = self.inode(ino)?;
        let (path, nofollow) = self.xattr_path(&inode)?;
        if size == 0 {
            let n = if nofollow {
                rustix::fs::lgetxattr_query(path.as_os_str(), name)
            } else {
                rustix::fs::getxattr_query(path.as_os_str(), name)
            }
            .map_err(errno)?;
            return Ok(Err(u32::try_from(n).unwrap_or(u32::MAX)));
        }
        let mut buf = vec![0u8; size as usize];
        let n = if nofollow {
            rustix::fs::lgetxattr(path.as_os_str(), name, &mut buf[..])
        } else {
            rustix::fs::getxattr(path.as_os_str(), name, &mut buf[..])
        }
        .map_err(errno)?;
        buf.truncate(n);
        Ok(Ok(buf))
    }

    fn do_listxattr(&self, ino: INodeNo, size: u32) -> Res<Result<Vec<u8>, u32>> {
        let inode = self.inode(ino)?;
        let (path, nofollow) = self.xattr_path(&inode)?;
        if size == 0 {
            let n = if nofollow {
                rustix::fs::llistxattr_query(path.as_os_str())
            } else {
                rustix::fs::listxattr_query(path.as_os_str())
            }
            .map_err(errno)?;
            return Ok(Err(u32::try_from(n).unwrap_or(u32::MAX)));
        }
        let mut buf = vec![0u8; size as usize];
        let n = if nofollow {
            rustix::fs::llistxattr(path.as_os_str(), &mut buf[..])
        } else {
            rustix::fs::listxattr(path.as_os_str(), &mut buf[..])
        }
        .map_err(errno)?;
        buf.truncate(n);
        Ok(Ok(buf))
    }

    fn do_setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Res<()> {
        let inode = self.inode(ino)?;
        let xflags = rustix::fs::XattrFlags::from_bits(flags as u32).ok_or(Errno::EINVAL)?;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let _op = inode.op_lock.lock().expect("inode op lock poisoned");
        let _data = self.data_hold(&inode, self.options.replicate_xattrs)?;
        inode.privs_clear.store(false, Ordering::Relaxed);
        let (path, nofollow) = self.xattr_path(&inode)?;
        self.as_caller(req, || {
            if nofollow {
                rustix::fs::lsetxattr(path.as_os_str(), name, value, xflags)
            } else {
                rustix::fs::setxattr(path.as_os_str(), name, value, xflags)
            }
            .map_err(raw)
        })?;
        if self.options.replicate_xattrs {
            self.ship_at(&inode, self.data_wait(), |path| Op::SetXattr {
                dir: self.options.dir_index,
                path,
                name: name.as_bytes().to_vec(),
                value: value.to_vec(),
                flags,
            });
        }
        Ok(())
    }

    fn do_removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr) -> Res<()> {
        let inode = self.inode(ino)?;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let _op = inode.op_lock.lock().expect("inode op lock poisoned");
        let _data = self.data_hold(&inode, self.options.replicate_xattrs)?;
        let (path, nofollow) = self.xattr_path(&inode)?;
        self.as_caller(req, || {
            if nofollow {
                rustix::fs::lremovexattr(path.as_os_str(), name)
            } else {
                rustix::fs::removexattr(path.as_os_str(), name)
            }
            .map_err(raw)
        })?;
        if self.options.replicate_xattrs {
            self.ship_at(&inode, self.data_wait(), |path| Op::RemoveXattr {
                dir: self.options.dir_index,
                path,
                name: name.as_bytes().to_vec(),
            });
        }
        Ok(())
    }

    fn do_fallocate(&self, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Res<()> {
        let handle = self.handle(fh)?;
        let inode = &handle.inode;
        let flags = rustix::fs::FallocateFlags::from_bits(mode as u32)
            .ok_or(Errno::from_i32(libc::EOPNOTSUPP))?;
        let _ns = self.namespace.read().expect("namespace lock poisoned");
        let _op = inode.op_lock.lock().expect("inode op lock poisoned");
        let _data = self.data_hold(inode, true)?;
        rustix::fs::fallocate(&handle.fd, flags, offset, length).map_err(errno)?;
        self.ship_at(inode, self.data_wait(), |path| Op::Fallocate {
            dir: self.options.dir_index,
            path,
            mode,
            offset,
            len: length,
        });
        inode.mtime_dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn do_lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> Res<i64> {
        let handle = self.handle(fh)?;
        let offset_u = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let pos = match whence {
            libc::SEEK_DATA => SeekFrom::Data(offset_u),
            libc::SEEK_HOLE => SeekFrom::Hole(offset_u),
            libc::SEEK_SET => SeekFrom::Start(offset_u),
            libc::SEEK_END => SeekFrom::End(offset),
            _ => return Err(Errno::EINVAL),
        };
        let at = rustix::fs::seek(&handle.fd, pos).map_err(errno)?;
        i64::try_from(at).map_err(|_| Errno::EOVERFLOW)
    }
}

impl fuser::Filesystem for ReplicatedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS) {
            tracing::debug!(?unsupported, "kernel lacks parallel directory operations");
        }
        // We clear set-id bits ourselves (see `kill_privs`); in exchange the
        // kernel stops asking for `security.capability` before every write.
        if let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2) {
            tracing::debug!(?unsupported, "kernel lacks FUSE_HANDLE_KILLPRIV_V2");
        }
        if self.options.mode == SyncMode::FsyncOnly
            && let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
        {
            tracing::warn!(
                ?unsupported,
                "kernel refused the writeback cache; fsync-only mode runs without it"
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        tracing::trace!(?parent, ?name, "lookup");
        match self.do_lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        tracing::trace!(?ino, nlookup, "forget");
        self.store.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        tracing::trace!(?ino, "getattr");
        match self.do_getattr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        tracing::trace!(?ino, ?mode, ?uid, ?gid, ?size, "setattr");
        match self.count_error(self.do_setattr(req, ino, mode, uid, gid, size, atime, mtime, fh)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        tracing::trace!(?ino, "readlink");
        let result = self
            .inode(ino)
            .and_then(|inode| rustix::fs::readlinkat(&inode.fd, "", Vec::new()).map_err(errno));
        match result {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        tracing::trace!(?parent, ?name, mode, rdev, "mknod");
        let dir = self.options.dir_index;
        let result = self.make_node(
            req,
            parent,
            name,
            |parent, name| {
                rustix::fs::mknodat(
                    &parent.fd,
                    name,
                    FileType::from_raw_mode(mode),
                    Mode::from_raw_mode(mode & 0o7777),
                    u64::from(rdev),
                )
                .map_err(raw)
            },
            |path, st| Op::Mknod {
                dir,
                path,
                mode: st.st_mode,
                rdev: st.st_rdev,
                uid: st.st_uid,
                gid: st.st_gid,
            },
        );
        match self.count_error(result) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        tracing::trace!(?parent, ?name, mode, "mkdir");
        let dir = self.options.dir_index;
        let result = self.make_node(
            req,
            parent,
            name,
            |parent, name| {
                rustix::fs::mkdirat(&parent.fd, name, Mode::from_raw_mode(mode & 0o7777))
                    .map_err(raw)
            },
            |path, st| Op::Mkdir {
                dir,
                path,
                mode: st.st_mode,
                uid: st.st_uid,
                gid: st.st_gid,
            },
        );
        match self.count_error(result) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tracing::trace!(?parent, ?name, "unlink");
        match self.count_error(self.do_remove(req, parent, name, false)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tracing::trace!(?parent, ?name, "rmdir");
        match self.count_error(self.do_remove(req, parent, name, true)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        tracing::trace!(?parent, ?link_name, ?target, "symlink");
        let dir = self.options.dir_index;
        let target_bytes = target.as_os_str().as_bytes().to_vec();
        let result = self.make_node(
            req,
            parent,
            link_name,
            |parent, name| rustix::fs::symlinkat(target, &parent.fd, name).map_err(raw),
            |path, st| Op::Symlink {
                dir,
                path,
                target: target_bytes.clone(),
                uid: st.st_uid,
                gid: st.st_gid,
            },
        );
        match self.count_error(result) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?parent, ?name, ?newparent, ?newname, ?flags, "rename");
        match self.count_error(self.do_rename(req, parent, name, newparent, newname, flags)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        tracing::trace!(?ino, ?newparent, ?newname, "link");
        match self.count_error(self.do_link(req, ino, newparent, newname)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        tracing::trace!(?ino, flags = flags.0, "open");
        match self.count_error(self.do_open(ino, flags)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        tracing::trace!(?ino, offset, size, "read");
        match self.do_read(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        tracing::trace!(?ino, offset, len = data.len(), "write");
        match self.count_error(self.do_write(fh, offset, data, write_flags, flags)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?ino, "flush");
        match self.do_flush(fh) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?ino, "release");
        self.do_release(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?ino, datasync, "fsync");
        match self.count_error(self.do_fsync(fh, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        tracing::trace!(?ino, "opendir");
        match self.do_opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        tracing::trace!(?ino, offset, "readdir");
        match self.do_readdir(fh, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?ino, "releasedir");
        self.handles
            .write()
            .expect("handle table lock poisoned")
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?ino, datasync, "fsyncdir");
        match self.count_error(self.do_fsyncdir(fh, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let result = self
            .inode(INodeNo(ROOT_ID))
            .and_then(|root| rustix::fs::fstatvfs(&root.fd).map_err(errno));
        match result {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                u32::try_from(st.f_bsize).unwrap_or(4096),
                u32::try_from(st.f_namemax).unwrap_or(255),
                u32::try_from(st.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?ino, ?name, "setxattr");
        match self.count_error(self.do_setxattr(req, ino, name, value, flags)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        tracing::trace!(?ino, ?name, size, "getxattr");
        match self.do_getxattr(ino, name, size) {
            Ok(Ok(data)) => reply.data(&data),
            Ok(Err(size)) => reply.size(size),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        tracing::trace!(?ino, size, "listxattr");
        match self.do_listxattr(ino, size) {
            Ok(Ok(data)) => reply.data(&data),
            Ok(Err(size)) => reply.size(size),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tracing::trace!(?ino, ?name, "removexattr");
        match self.count_error(self.do_removexattr(req, ino, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Not called with `default_permissions`; answered correctly anyway.
        let result = self.inode(ino).and_then(|inode| {
            let name = Self::proc_name(&inode.fd);
            let access = rustix::fs::Access::from_bits_truncate(mask.bits() as u32);
            self.as_caller(req, || {
                rustix::fs::accessat(&self.proc_fd, name.as_str(), access, AtFlags::EACCESS)
                    .map_err(raw)
            })
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        tracing::trace!(?parent, ?name, mode, flags, "create");
        match self.count_error(self.do_create(req, parent, name, mode, flags)) {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(?ino, offset, length, mode, "fallocate");
        match self.count_error(self.do_fallocate(fh, offset, length, mode)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        tracing::trace!(?ino, offset, whence, "lseek");
        match self.do_lseek(fh, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }
}
