//! The primary's guard: writes to the replicated files that do not come from
//! the daemon are recorded for resync, or refused.
//!
//! # What is watched
//!
//! One fanotify mark per underlying file system, `FAN_MARK_FILESYSTEM`. A
//! mount mark (`FAN_MARK_MOUNT`) would see the descriptors opened before the
//! FUSE mount (they belong to the original mount) but not a bind mount of the
//! directory elsewhere, which is another mount of the same file system; an
//! inode mark would see neither the subtree nor new files. A filesystem mark
//! sees every access to the file system's inodes, through any mount.
//!
//! The price: the guard receives events for the whole file system, and the
//! daemon's own writes beneath the FUSE mount are events too. Each event is
//! filtered first by process (the daemon's thread group and
//! [`PrimaryGuardOptions::allowed_pids`] are skipped before anything else),
//! then by device, then by path ([`location`](super::location)): events
//! outside the replicated directories are ignored. The kernel merges
//! identical queued notification events, so a stream of writes to one file
//! costs few wake-ups. Putting the replicated directories on a file system of
//! their own keeps the rest of the system out of the guard's path.
//!
//! # Record ([`GuardPolicy::Record`])
//!
//! A notification group reporting directory file handles and names
//! (`FAN_REPORT_DFID_NAME`) watches `FAN_MODIFY` (writes, truncates),
//! `FAN_ATTRIB` (mode, owner, times, xattrs), `FAN_CREATE`,
//! `FAN_DELETE`, `FAN_MOVED_FROM` and `FAN_MOVED_TO`, for files and
//! directories (`FAN_ONDIR`). Such a group opens no descriptor per event, so
//! the daemon's own stream of writes costs one queued event each (merged when
//! identical) and nothing more. For an event of another process, the
//! directory is opened from its handle (`open_by_handle_at`, through the
//! underlying directory's mount) and located; the entry's name completes the
//! path. A rename is recorded under both names, a delete under the old name.
//! On a file system that cannot report file handles (no fsid, no export
//! support), the guard falls back to a descriptor group with `FAN_MODIFY`
//! only, and says so in the log: namespace changes through a bypass are then
//! left to the resync's full comparison.
//!
//! Why not `FAN_CLOSE_WRITE`: its pid is that of whoever drops the last
//! reference to the open file, not of the writer. A child process forked by
//! the daemon holds copies of the daemon's descriptors until its `exec`
//! closes them; if the daemon closed its own copy in between, the child's
//! `exec` is the last close, and the daemon's own file would be reported as
//! changed by the child (the tests hit exactly this). The cost of leaving it
//! out: a bypass process that changes a file only through a shared writable
//! `mmap` is not seen (the kernel emits `FAN_MODIFY` for write calls and
//! truncates, not for page faults); the resync's full comparison finds it.
//!
//! The file is recorded whole in the dirty log, a `warn` is logged with pid
//! and path, and a [`GuardEvent`] is sent (once per process and file until
//! the dirty log forgets the file after a resync). The record happens after
//! the change (notification events are not permission events): a crash of
//! the node between the bypass write and the record loses the record.
//! A fanotify queue overflow (events lost) records every replicated
//! directory's root, which asks the resync for a full comparison.
//!
//! # Deny ([`GuardPolicy::Deny`])
//!
//! A second group, of class `FAN_CLASS_CONTENT`, watches `FAN_OPEN_PERM`:
//! another process opening a file of a replicated directory through the
//! underlying file system gets `EPERM`. fanotify's permission events do not
//! say whether an open is for reading or writing (nor does `FAN_PRE_ACCESS`,
//! the pre-content event of kernels >= 6.14, distinguish a read from a
//! write), so every bypass open is refused: under this policy the underlying
//! tree is the daemon's alone, applications go through the mount. A file
//! created with `O_CREAT` through a bypass exists (empty) before the open is
//! refused, and unlink, rename, mkdir and metadata changes have no permission
//! event at all: those are recorded, as under `Record`.
//!
//! Permission events (`FAN_OPEN_PERM`, `FAN_ACCESS_PERM`, `FAN_PRE_ACCESS`)
//! are only generated for files opened while a permission watcher exists on
//! the file system (the kernel decides at open time), so a descriptor opened
//! before the guard was engaged cannot be refused anything; its writes are
//! recorded as under `Record`. Engage the guard before the application
//! starts. This is also why `FAN_PRE_ACCESS` would add nothing here: every
//! descriptor it could apply to was opened after the guard started, and that
//! open was refused already.
//!
//! Every open on the file system waits for the guard's answer: the reader
//! thread answers allowed processes first, without any lookup, and never
//! opens a file on the guarded file system, logs or writes the dirty log
//! itself (any of these could wait for its own answer); a recorder thread
//! does that from a bounded queue. If the guard's process dies, the kernel
//! closes the group and allows what was waiting.

use std::collections::HashSet;
use std::io::{PipeReader, PipeWriter};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use rustix::fs::{Mode, OFlags};
use safekit_protocol::replication::{RelPath, TouchedFile};

use super::location::{FsLocation, GuardedLocation, MountTable, classify};
use super::sys::{
    FanotifyEvent, FanotifyGroup, FidEvent, FidGroup, GroupClass, MaskFlags, open_by_handle,
    wait_readable,
};
use super::{GuardError, GuardEvent, GuardPolicy};
use crate::dirty::DirtyLog;

/// Reports remembered (to report a process and file once) before the memory is reset.
const MAX_REMEMBERED_REPORTS: usize = 4096;

/// Changes the reader may queue for the recorder before it notes that some were lost.
const WORK_QUEUE: usize = 65_536;

/// How the primary's guard works.
#[derive(Debug, Clone)]
pub struct PrimaryGuardOptions {
    /// Record or refuse bypass writes.
    pub policy: GuardPolicy,
    /// Processes besides the daemon's own that may write beneath the mount
    /// (e.g. a resync worker running as another process).
    pub allowed_pids: Vec<u32>,
    /// How many [`GuardEvent`]s wait for the receiver before new ones are dropped
    /// (and counted in [`GuardStats::dropped_reports`]).
    pub event_capacity: usize,
}

impl Default for PrimaryGuardOptions {
    fn default() -> Self {
        PrimaryGuardOptions {
            policy: GuardPolicy::Record,
            allowed_pids: Vec::new(),
            event_capacity: 1024,
        }
    }
}

/// Counters of a guard.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Events read from fanotify (all processes, all files of the file system).
    pub events: AtomicU64,
    /// Bypass changes to replicated files (recorded).
    pub bypass_writes: AtomicU64,
    /// Bypass opens refused.
    pub denied: AtomicU64,
    /// Times the fanotify queue overflowed (events lost).
    pub overflows: AtomicU64,
    /// Events of other processes whose file could not be located (not `ESTALE`).
    pub unresolved: AtomicU64,
    /// Dirty log records that failed.
    pub record_errors: AtomicU64,
    /// Reports dropped because the event channel was full.
    pub dropped_reports: AtomicU64,
}

/// A running primary guard; dropping it stops it.
#[derive(Debug)]
pub struct PrimaryGuard {
    stop: Option<PipeWriter>,
    reader: Option<JoinHandle<()>>,
    recorder: Option<JoinHandle<()>>,
    stats: Arc<GuardStats>,
}

/// Opens `fd` again (through `/proc/self/fd`, which names exactly its mount and
/// inode) as a normal read-only directory descriptor: fanotify marks need one.
fn reopen_directory(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn fd_name(fd: BorrowedFd<'_>) -> PathBuf {
    rustix::fs::readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()), Vec::new())
        .map(|name| {
            PathBuf::from(
                <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                    name.into_bytes(),
                ),
            )
        })
        .unwrap_or_else(|_| PathBuf::from(format!("fd {}", fd.as_raw_fd())))
}

fn own_pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// A guarded file system: where to open file handles, and how to recognize its events.
#[derive(Debug)]
struct Filesystem {
    dev: (u32, u32),
    fsid: u64,
    /// A readable descriptor of a guarded directory on it (marks and `open_by_handle_at` need one).
    mount_fd: OwnedFd,
}

/// What the notification group watches when it reports file handles and names.
fn fid_mask() -> MaskFlags {
    MaskFlags::FAN_MODIFY
        | MaskFlags::FAN_ATTRIB
        | MaskFlags::FAN_CREATE
        | MaskFlags::FAN_DELETE
        | MaskFlags::FAN_MOVED_FROM
        | MaskFlags::FAN_MOVED_TO
        | MaskFlags::FAN_ONDIR
}

/// What the fallback descriptor group watches.
fn descriptor_mask() -> MaskFlags {
    MaskFlags::FAN_MODIFY
}

/// The fanotify groups of one guard.
#[derive(Debug, Default)]
struct Groups {
    /// Notification events with directory handles and names.
    fid: Option<FidGroup>,
    /// Notification events with descriptors, for file systems the first cannot watch.
    descriptors: Option<FanotifyGroup>,
    /// `FAN_OPEN_PERM` under [`GuardPolicy::Deny`].
    permission: Option<FanotifyGroup>,
}

impl Groups {
    /// Marks the file system of `fs` in every group the policy needs.
    fn mark(&mut self, fs: &Filesystem, policy: GuardPolicy) -> Result<(), GuardError> {
        let fid_marked = match self.fid.as_ref() {
            Some(group) => match group.mark_filesystem(fs.mount_fd.as_fd(), fid_mask()) {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(%error, dev = ?fs.dev, "this file system cannot report file handles to fanotify; the guard sees data writes only, not namespace changes");
                    false
                }
            },
            None => false,
        };
        if !fid_marked {
            if self.descriptors.is_none() {
                self.descriptors = Some(
                    FanotifyGroup::new(GroupClass::Notification).map_err(GuardError::Fanotify)?,
                );
            }
            if let Some(group) = self.descriptors.as_ref() {
                group
                    .mark_filesystem(fs.mount_fd.as_fd(), descriptor_mask())
                    .map_err(GuardError::Fanotify)?;
            }
        }
        if policy == GuardPolicy::Deny {
            if self.permission.is_none() {
                self.permission =
                    Some(FanotifyGroup::new(GroupClass::Permission).map_err(GuardError::Fanotify)?);
            }
            if let Some(group) = self.permission.as_ref() {
                group
                    .mark_filesystem(fs.mount_fd.as_fd(), MaskFlags::FAN_OPEN_PERM)
                    .map_err(GuardError::Fanotify)?;
            }
        }
        Ok(())
    }
}

impl PrimaryGuard {
    /// Starts guarding the directories `dirs` (index, descriptor of the
    /// underlying directory opened before the FUSE mount went over it, e.g. by
    /// [`open_underlying`](crate::mount::open_underlying)). Records go to `dirty`.
    /// Returns the guard and the receiving end of its reports.
    ///
    /// Call it from a thread of the mount namespace the directories were
    /// opened in; the reader thread stays in that namespace.
    ///
    /// # Errors
    /// [`GuardError::Dir`] or [`GuardError::Unreachable`] when a directory cannot
    /// be located, [`GuardError::Fanotify`] when the kernel refuses a group or a
    /// mark, [`GuardError::Thread`].
    pub fn engage(
        dirs: &[(u16, BorrowedFd<'_>)],
        dirty: Arc<DirtyLog>,
        options: PrimaryGuardOptions,
    ) -> Result<(PrimaryGuard, Receiver<GuardEvent>), GuardError> {
        let mut mounts = MountTable::load().map_err(|source| GuardError::Dir {
            path: PathBuf::from("/proc/thread-self/mountinfo"),
            source,
        })?;
        let mut located = Vec::with_capacity(dirs.len());
        let mut filesystems: Vec<Filesystem> = Vec::new();
        let mut groups = Groups {
            fid: match FidGroup::new() {
                Ok(group) => Some(group),
                Err(error) => {
                    tracing::warn!(%error, "fanotify cannot report file handles here; the guard sees data writes only, not namespace changes");
                    None
                }
            },
            ..Groups::default()
        };
        for (index, fd) in dirs {
            let dir_error = |source| GuardError::Dir {
                path: fd_name(*fd),
                source,
            };
            let location: FsLocation = mounts
                .locate(*fd)
                .map_err(dir_error)?
                .ok_or_else(|| GuardError::Unreachable(fd_name(*fd)))?;
            if !filesystems.iter().any(|fs| fs.dev == location.dev) {
                let mount_fd = reopen_directory(*fd).map_err(dir_error)?;
                let fsid = rustix::fs::fstatvfs(&mount_fd)
                    .map_err(|errno| dir_error(errno.into()))?
                    .f_fsid;
                let fs = Filesystem {
                    dev: location.dev,
                    fsid,
                    mount_fd,
                };
                groups.mark(&fs, options.policy)?;
                filesystems.push(fs);
            }
            tracing::info!(
                dir = index,
                path = %fd_name(*fd).display(),
                policy = ?options.policy,
                "guarding the underlying directory"
            );
            located.push(GuardedLocation {
                index: *index,
                location,
            });
        }
        let (stop_reader, stop_writer) = std::io::pipe().map_err(GuardError::Thread)?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(options.event_capacity.max(1));
        let (work_sender, work_receiver) = std::sync::mpsc::sync_channel(WORK_QUEUE);
        let work_lost = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(GuardStats::default());
        let mut allowed: HashSet<i32> = options
            .allowed_pids
            .iter()
            .filter_map(|pid| i32::try_from(*pid).ok())
            .collect();
        allowed.insert(own_pid());
        let recorder = Recorder {
            work: work_receiver,
            work_lost: work_lost.clone(),
            dir_indices: located.iter().map(|dir| dir.index).collect(),
            dirty,
            sender,
            reported: HashSet::new(),
            stats: stats.clone(),
        };
        let reader = Reader {
            groups,
            stop: stop_reader,
            dirs: located,
            filesystems,
            mounts,
            allowed,
            policy: options.policy,
            work: work_sender,
            work_lost,
            stats: stats.clone(),
        };
        let recorder = std::thread::Builder::new()
            .name("safekit-guard-rec".to_owned())
            .spawn(move || recorder.run())
            .map_err(GuardError::Thread)?;
        // If the reader cannot start, dropping it ends the recorder (its channel closes).
        let reader = std::thread::Builder::new()
            .name("safekit-guard".to_owned())
            .spawn(move || reader.run())
            .map_err(GuardError::Thread)?;
        Ok((
            PrimaryGuard {
                stop: Some(stop_writer),
                reader: Some(reader),
                recorder: Some(recorder),
                stats,
            },
            receiver,
        ))
    }

    /// The guard's counters.
    pub fn stats(&self) -> Arc<GuardStats> {
        self.stats.clone()
    }

    /// Stops the guard and waits for its thread; accesses waiting for an answer are allowed.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        // Closing the write end makes the reader's poll see a hang-up; the
        // reader's end drops its work channel, which ends the recorder.
        drop(self.stop.take());
        for thread in [self.reader.take(), self.recorder.take()]
            .into_iter()
            .flatten()
        {
            if thread.join().is_err() {
                tracing::error!("a guard thread panicked");
            }
        }
    }
}

impl Drop for PrimaryGuard {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// What the reader hands to the recorder.
#[derive(Debug)]
enum Work {
    /// Another process changed a replicated file.
    Changed { pid: u32, dir: u16, path: RelPath },
    /// Another process was refused the opening of a replicated file.
    Denied { pid: u32, dir: u16, path: RelPath },
    /// fanotify lost events.
    Overflow,
    /// A permission event could not be answered.
    RespondFailed(std::io::Error),
}

/// The reader thread: reads the groups and answers permission events.
///
/// It must never wait on anything that could itself wait for a permission
/// answer: an open of a file on a guarded file system by this thread would
/// wait for this thread. So it does not log, write the dirty log or send
/// reports; it only reads `/proc` and opens `O_PATH` descriptors (which
/// generate no permission event), and hands everything else to the
/// [`Recorder`] through a bounded queue. When that queue is full, it notes
/// that work was lost, and the recorder records every directory's root.
struct Reader {
    groups: Groups,
    stop: PipeReader,
    dirs: Vec<GuardedLocation>,
    filesystems: Vec<Filesystem>,
    mounts: MountTable,
    allowed: HashSet<i32>,
    policy: GuardPolicy,
    work: SyncSender<Work>,
    work_lost: Arc<AtomicBool>,
    stats: Arc<GuardStats>,
}

impl Reader {
    fn run(mut self) {
        let result = self.serve();
        let policy = self.policy;
        let work = self.work.clone();
        // Dropping the groups allows every access still waiting for an answer;
        // only then may this thread log.
        drop(self);
        if let Err(error) = result {
            tracing::error!(%error, "guard: reading fanotify events failed; guard stopped");
        }
        tracing::info!(policy = ?policy, "guard stopped");
        drop(work);
    }

    fn serve(&mut self) -> std::io::Result<()> {
        loop {
            let ready = {
                let mut fds = vec![self.stop.as_fd()];
                // Permission events first: accesses are waiting for them.
                fds.extend(self.groups.permission.as_ref().map(AsFd::as_fd));
                fds.extend(self.groups.fid.as_ref().map(AsFd::as_fd));
                fds.extend(self.groups.descriptors.as_ref().map(AsFd::as_fd));
                wait_readable(&fds)?
            };
            if ready.first().copied().unwrap_or(true) {
                return Ok(());
            }
            if let Some(group) = self.groups.permission.as_ref() {
                let events = group.read()?;
                for event in &events {
                    self.handle_permission(event);
                }
            }
            if let Some(group) = self.groups.fid.as_mut() {
                let events = group.read()?;
                for event in &events {
                    self.handle_fid(event);
                }
            }
            if let Some(group) = self.groups.descriptors.as_ref() {
                let events = group.read()?;
                for event in &events {
                    self.handle_descriptor(event);
                }
            }
        }
    }

    /// Queues work for the recorder without ever waiting.
    fn forward(&self, work: Work) {
        match self.work.try_send(work) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => self.work_lost.store(true, Ordering::Release),
        }
    }

    fn respond(&self, event: &FanotifyEvent, allow: bool) {
        let Some(group) = self.groups.permission.as_ref() else {
            return;
        };
        if let Err(error) = group.respond(event, allow) {
            self.forward(Work::RespondFailed(error));
        }
    }

    /// Which replicated file a descriptor event is about.
    fn classify_fd(&mut self, event: &FanotifyEvent) -> Option<(u16, RelPath)> {
        let fd = event.fd()?;
        match self.mounts.locate(fd) {
            Ok(Some(location)) => classify(&location, &self.dirs),
            Ok(None) => None,
            Err(_) => {
                self.stats.unresolved.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn handle_permission(&mut self, event: &FanotifyEvent) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        if !event.check_version() || self.allowed.contains(&event.pid()) {
            self.respond(event, true);
            return;
        }
        let found = self.classify_fd(event);
        self.respond(event, found.is_none());
        if let Some((dir, path)) = found {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            let pid = u32::try_from(event.pid()).unwrap_or(0);
            self.forward(Work::Denied { pid, dir, path });
        }
    }

    fn handle_descriptor(&mut self, event: &FanotifyEvent) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        if event.mask().contains(MaskFlags::FAN_Q_OVERFLOW) {
            self.stats.overflows.fetch_add(1, Ordering::Relaxed);
            self.forward(Work::Overflow);
            return;
        }
        if !event.check_version() || self.allowed.contains(&event.pid()) {
            return;
        }
        if let Some((dir, path)) = self.classify_fd(event) {
            self.changed(event.pid(), dir, path);
        }
    }

    fn handle_fid(&mut self, event: &FidEvent) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        if event.mask & MaskFlags::FAN_Q_OVERFLOW.bits() != 0 {
            self.stats.overflows.fetch_add(1, Ordering::Relaxed);
            self.forward(Work::Overflow);
            return;
        }
        if self.allowed.contains(&event.pid) || event.handle.is_empty() {
            return;
        }
        let Some(fs) = self.filesystems.iter().find(|fs| fs.fsid == event.fsid) else {
            return;
        };
        // ESTALE: the directory is gone, and its own removal was an event of its
        // parent; anything else is counted.
        let location = open_by_handle(fs.mount_fd.as_fd(), event.handle_type, &event.handle)
            .and_then(|parent| self.mounts.locate(parent.as_fd()));
        let location = match location {
            Ok(Some(location)) => location.child(&event.name),
            Ok(None) => return,
            Err(error) => {
                if error.raw_os_error() != Some(libc::ESTALE) {
                    self.stats.unresolved.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        };
        if let Some((dir, path)) = classify(&location, &self.dirs) {
            self.changed(event.pid, dir, path);
        }
    }

    /// A change of a replicated file by another process.
    fn changed(&mut self, pid: i32, dir: u16, path: RelPath) {
        self.stats.bypass_writes.fetch_add(1, Ordering::Relaxed);
        let pid = u32::try_from(pid).unwrap_or(0);
        self.forward(Work::Changed { pid, dir, path });
    }
}

/// The recorder thread: writes the dirty log, logs and sends the reports.
struct Recorder {
    work: Receiver<Work>,
    work_lost: Arc<AtomicBool>,
    dir_indices: Vec<u16>,
    dirty: Arc<DirtyLog>,
    sender: SyncSender<GuardEvent>,
    reported: HashSet<(u32, u16, RelPath, bool)>,
    stats: Arc<GuardStats>,
}

impl Recorder {
    fn run(mut self) {
        while let Ok(work) = self.work.recv() {
            if self.work_lost.swap(false, Ordering::Acquire) {
                self.events_lost("the guard's work queue was full");
            }
            match work {
                Work::Changed { pid, dir, path } => {
                    let newly_recorded = self.record(dir, &path);
                    self.report(pid, dir, path, false, newly_recorded);
                }
                Work::Denied { pid, dir, path } => self.report(pid, dir, path, true, false),
                Work::Overflow => self.events_lost("the fanotify queue overflowed"),
                Work::RespondFailed(error) => {
                    tracing::error!(%error, "guard: cannot answer a permission event");
                }
            }
        }
        if self.work_lost.swap(false, Ordering::Acquire) {
            self.events_lost("the guard's work queue was full");
        }
    }

    /// Records a file whole; returns whether the dirty log did not have it yet.
    fn record(&self, dir: u16, path: &RelPath) -> bool {
        let touched = TouchedFile {
            dir,
            path: path.clone(),
            range: None,
        };
        match self.dirty.record(&[touched]) {
            Ok(written) => written > 0,
            Err(error) => {
                self.stats.record_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    %error,
                    dir,
                    path = %String::from_utf8_lossy(&path.to_bytes()),
                    "guard: cannot record a bypass write in the dirty log"
                );
                false
            }
        }
    }

    /// Some changes were not seen: every directory's root is recorded, which
    /// asks the resync for a full comparison.
    fn events_lost(&mut self, why: &str) {
        tracing::warn!(
            why,
            "guard: events lost; every replicated directory is recorded for a full comparison"
        );
        for dir in self.dir_indices.clone() {
            let newly_recorded = self.record(dir, &RelPath::root());
            self.report(0, dir, RelPath::root(), false, newly_recorded);
        }
    }

    fn report(&mut self, pid: u32, dir: u16, path: RelPath, denied: bool, force: bool) {
        let key = (pid, dir, path, denied);
        if !force && self.reported.contains(&key) {
            return;
        }
        if self.reported.len() >= MAX_REMEMBERED_REPORTS {
            self.reported.clear();
        }
        let (pid, dir, path, denied) = key;
        tracing::warn!(
            pid,
            dir,
            path = %String::from_utf8_lossy(&path.to_bytes()),
            denied,
            "access to a replicated file bypassing the replicated mount"
        );
        self.reported.insert((pid, dir, path.clone(), denied));
        match self.sender.try_send(GuardEvent {
            pid,
            dir,
            path,
            denied,
        }) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.dropped_reports.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
