//! Mounting [`ReplicatedFs`] over a replicated directory, unmounting it, and
//! recovering the directory after a helper crashed.
//!
//! Mount over: the directory keeps its path. [`mount_over`] first opens the
//! underlying directory (`O_PATH | O_DIRECTORY`), refuses when what it opened
//! is already a FUSE file system (a live mount of another helper: serving it
//! through itself would deadlock), and only then mounts the FUSE file system
//! on the same path; the file system works beneath the descriptor.
//!
//! Stale mounts: when a helper dies without unmounting (kill -9, a crash), the
//! kernel keeps the mount but every access returns `ENOTCONN` ("Transport
//! endpoint is not connected"), and the directory is unusable until someone
//! unmounts it. [`recover_stale_mount`] detects exactly that answer on the
//! path and detaches the dead mount (`umount2(MNT_DETACH)`), after which the
//! underlying directory is visible again; [`mount_over`] calls it before
//! anything else, so the agent recovers a crashed helper by starting a new one
//! on the same directory (or by running `safekit-rfs recover --dir PATH`).
//!
//! Unmount: [`MountedDir::unmount`] unmounts and waits for the worker
//! threads. When files are still open through the mount (`EBUSY`) it detaches
//! the mount lazily so that the path is free at once; the remaining open
//! descriptors are served until the process exits and then get `ENOTCONN`
//! (the agent stops the application before it unmounts). `safekit-rfs`
//! unmounts this way on SIGTERM, SIGINT and the control socket's `unmount`.
//!
//! Activity log: a mount given one ([`MountConfig::activity_log`]) records
//! the files it changes in it, and (unless told otherwise) runs a small
//! background thread that calls [`ActivityLog::checkpoint`] every
//! [`CHECKPOINT_INTERVAL`], so that settled files leave the hot set; the
//! thread stops when the mount is unmounted (or dropped).

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use rustix::fs::{Mode, OFlags};

use crate::activity::ActivityLog;
use crate::fs::{FsOptions, FsStats, ReplicatedFs};
use crate::replicator::Replicator;
use crate::resync::locks::FileLocks;

/// `f_type` of a FUSE file system.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Number of FUSE worker threads (each with its own cloned `/dev/fuse` descriptor).
pub const WORKER_THREADS: usize = 4;

/// How often a mount's background thread checkpoints its activity log.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Everything [`mount_over_with`] needs besides the directory and the replicator.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Settings of the file system.
    pub fs: FsOptions,
    /// The module's lock table shared with its resync engine (see [`ReplicatedFs::with_file_locks`]).
    pub locks: Option<Arc<FileLocks>>,
    /// The module's activity log (see [`ReplicatedFs::with_activity_log`]).
    pub activity_log: Option<Arc<ActivityLog>>,
    /// How often the mount checkpoints the activity log from a background
    /// thread; `None` when someone else does (another mount of the same
    /// module sharing the log, or the caller). Ignored without a log.
    pub checkpoint_interval: Option<Duration>,
}

impl MountConfig {
    /// No lock table, no activity log.
    pub fn new(fs: FsOptions) -> Self {
        MountConfig {
            fs,
            locks: None,
            activity_log: None,
            checkpoint_interval: Some(CHECKPOINT_INTERVAL),
        }
    }
}

/// The thread that checkpoints an activity log periodically; stopped on drop.
#[derive(Debug)]
struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(log: Arc<ActivityLog>, interval: Duration) -> io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rfs-activity".to_owned())
            .spawn(move || {
                // Any message, or the sender dropped, stops the thread.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    match log.checkpoint() {
                        Ok(0) => {}
                        Ok(cold) => tracing::trace!(cold, "activity log checkpoint"),
                        Err(error) => {
                            tracing::warn!(%error, "activity log checkpoint failed; files stay hot");
                        }
                    }
                }
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the activity log checkpoint thread panicked");
        }
    }
}

/// Why a directory could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The directory could not be opened or examined.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A live FUSE mount already covers the directory.
    #[error("{0} is already covered by a live FUSE mount (another safekit-rfs?)")]
    AlreadyMounted(PathBuf),
    /// A stale mount could not be detached.
    #[error("cannot detach the stale mount on {path}: {source}")]
    Recover {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The kernel refused the mount.
    #[error("cannot mount over {path}: {source}")]
    Mount {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The kernel refused the unmount.
    #[error("cannot unmount {path}: {source}")]
    Unmount {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Raises this process's open-file limit to the most the kernel allows.
///
/// The file system keeps one `O_PATH` descriptor per inode the kernel
/// remembers (as virtiofsd does), so a tree of tens of thousands of files
/// needs far more than the usual soft limit; without this, an application
/// creating many files through the mount would get `EMFILE` from us. Returns
/// the new soft limit. Call it once at start, before mounting.
///
/// # Errors
/// Fails if the limit cannot be read or set.
pub fn raise_open_file_limit() -> io::Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    let kernel_max = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    let wanted = match (current.maximum, kernel_max) {
        // Root may raise the hard limit up to the kernel's own maximum.
        (_, Some(kernel_max)) if rustix::process::geteuid().is_root() => kernel_max,
        (Some(hard), _) => hard,
        (None, Some(kernel_max)) => kernel_max,
        (None, None) => return Ok(current.current.unwrap_or(u64::MAX)),
    };
    if current.current.is_some_and(|soft| soft >= wanted) {
        return Ok(wanted);
    }
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(wanted),
            maximum: Some(wanted.max(current.maximum.unwrap_or(0))),
        },
    );
    match (raised, current.maximum) {
        (Ok(()), _) => Ok(wanted),
        // Without CAP_SYS_RESOURCE (some containers), the soft limit can still
        // go up to the hard one; a service manager should set a high hard
        // limit (systemd: LimitNOFILE=1048576).
        (Err(_), Some(hard)) => {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                },
            )?;
            Ok(hard)
        }
        (Err(error), None) => Err(error.into()),
    }
}

/// If `path` is a dead FUSE mount (`statfs` answers `ENOTCONN`), detaches it. Returns whether it did.
///
/// # Errors
/// [`MountError::Recover`] when the detach failed.
pub fn recover_stale_mount(path: &Path) -> Result<bool, MountError> {
    // statfs always reaches the FUSE daemon (stat may be answered from the
    // kernel's attribute cache), so a dead connection shows at once.
    match rustix::fs::statfs(path) {
        Err(rustix::io::Errno::NOTCONN) => {
            tracing::warn!(path = %path.display(), "stale mount of a dead helper found; detaching it");
            rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
                MountError::Recover {
                    path: path.to_path_buf(),
                    source: e.into(),
                }
            })?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Opens the directory that will be mounted over, refusing a FUSE file system.
///
/// # Errors
/// [`MountError::Open`] or [`MountError::AlreadyMounted`].
pub fn open_underlying(path: &Path) -> Result<OwnedFd, MountError> {
    let open_error = |e: rustix::io::Errno| MountError::Open {
        path: path.to_path_buf(),
        source: e.into(),
    };
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(open_error)?;
    let fs = rustix::fs::fstatfs(&fd).map_err(open_error)?;
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's integer type differs between targets"
    )]
    if fs.f_type as i64 == FUSE_SUPER_MAGIC {
        return Err(MountError::AlreadyMounted(path.to_path_buf()));
    }
    Ok(fd)
}

/// A replicated directory with [`ReplicatedFs`] mounted over it. Dropping it unmounts.
#[derive(Debug)]
pub struct MountedDir {
    path: PathBuf,
    session: Option<BackgroundSession>,
    stats: Arc<FsStats>,
    checkpointer: Option<Checkpointer>,
}

/// Mounts a [`ReplicatedFs`] over `path` (see the module documentation).
///
/// # Errors
/// Any [`MountError`].
pub fn mount_over(
    path: &Path,
    replicator: Arc<dyn Replicator>,
    options: FsOptions,
) -> Result<MountedDir, MountError> {
    mount_over_with(path, replicator, MountConfig::new(options))
}

/// Like [`mount_over`], sharing the module's lock table with its resync
/// engine (see [`ReplicatedFs::with_file_locks`]).
///
/// # Errors
/// Any [`MountError`].
pub fn mount_over_with_locks(
    path: &Path,
    replicator: Arc<dyn Replicator>,
    options: FsOptions,
    locks: Arc<FileLocks>,
) -> Result<MountedDir, MountError> {
    let mut config = MountConfig::new(options);
    config.locks = Some(locks);
    mount_over_with(path, replicator, config)
}

/// Mounts a [`ReplicatedFs`] over `path` with everything [`MountConfig`]
/// holds: the lock table shared with the resync engine, the activity log and
/// its checkpoint thread.
///
/// # Errors
/// Any [`MountError`].
pub fn mount_over_with(
    path: &Path,
    replicator: Arc<dyn Replicator>,
    mount_config: MountConfig,
) -> Result<MountedDir, MountError> {
    let MountConfig {
        fs: options,
        locks,
        activity_log,
        checkpoint_interval,
    } = mount_config;
    recover_stale_mount(path)?;
    let fd = open_underlying(path)?;
    let mut fs = ReplicatedFs::new(fd, replicator, options).map_err(|source| MountError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(locks) = locks {
        fs = fs.with_file_locks(locks);
    }
    if let Some(log) = &activity_log {
        fs = fs.with_activity_log(Arc::clone(log));
    }
    let stats = fs.stats();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("safekit-rfs".to_owned()),
        MountOption::Subtype("safekit-rfs".to_owned()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(WORKER_THREADS);
    config.clone_fd = true;
    let session = fuser::Session::new(fs, path, &config)
        .and_then(fuser::Session::spawn)
        .map_err(|source| MountError::Mount {
            path: path.to_path_buf(),
            source,
        })?;
    let mut mounted = MountedDir {
        path: path.to_path_buf(),
        session: Some(session),
        stats,
        checkpointer: None,
    };
    if let (Some(log), Some(interval)) = (activity_log, checkpoint_interval) {
        // On failure `mounted` is dropped, which unmounts.
        mounted.checkpointer =
            Some(
                Checkpointer::start(log, interval).map_err(|source| MountError::Mount {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
    }
    tracing::info!(path = %path.display(), mode = ?options.mode, "mounted");
    Ok(mounted)
}

impl MountedDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mount's counters.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Unmounts and waits for the worker threads.
    ///
    /// # Errors
    /// [`MountError::Unmount`] when the kernel refused both the unmount and the lazy detach.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), MountError> {
        // No checkpoint after the mount is gone (the owner may close the log).
        drop(self.checkpointer.take());
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = self.path.clone();
        match session.umount_and_join() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(path = %path.display(), "files still open through the mount; detaching it lazily");
                // The session is gone (its threads keep serving the open files
                // until the process exits); free the path now.
                rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH).map_err(
                    |e| MountError::Unmount {
                        path: path.clone(),
                        source: e.into(),
                    },
                )?;
                tracing::info!(path = %path.display(), "unmounted (detached)");
                return Ok(());
            }
            Err(source) => {
                return Err(MountError::Unmount {
                    path: path.clone(),
                    source,
                });
            }
        }
        tracing::info!(path = %path.display(), "unmounted");
        Ok(())
    }
}

impl Drop for MountedDir {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_inner() {
            tracing::error!(%error, "unmount on drop failed");
        }
    }
}
