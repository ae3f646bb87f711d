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

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use rustix::fs::{Mode, OFlags};

use crate::fs::{FsOptions, FsStats, ReplicatedFs};
use crate::replicator::Replicator;
use crate::resync::locks::FileLocks;

/// `f_type` of a FUSE file system.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Number of FUSE worker threads (each with its own cloned `/dev/fuse` descriptor).
pub const WORKER_THREADS: usize = 4;

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
    mount_over_inner(path, replicator, options, None)
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
    mount_over_inner(path, replicator, options, Some(locks))
}

fn mount_over_inner(
    path: &Path,
    replicator: Arc<dyn Replicator>,
    options: FsOptions,
    locks: Option<Arc<FileLocks>>,
) -> Result<MountedDir, MountError> {
    recover_stale_mount(path)?;
    let fd = open_underlying(path)?;
    let mut fs = ReplicatedFs::new(fd, replicator, options).map_err(|source| MountError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(locks) = locks {
        fs = fs.with_file_locks(locks);
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
    tracing::info!(path = %path.display(), mode = ?options.mode, "mounted");
    Ok(MountedDir {
        path: path.to_path_buf(),
        session: Some(session),
        stats,
    })
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
