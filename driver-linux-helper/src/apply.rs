//! Applies replication operations beneath the replica's directories, and nowhere else.
//!
//! The receiver holds one directory descriptor per replicated directory
//! ([`ReplicaRoot`]), opened with `O_PATH | O_DIRECTORY` before anything is
//! mounted over it, and never uses an absolute path into the replica again.
//! Every operation resolves its parent directory beneath that descriptor and
//! then acts on one final component with an `*at()` call:
//!
//! - Parents are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)`, or, on kernels without `openat2`, one component at
//!   a time with `O_PATH | O_DIRECTORY | O_NOFOLLOW`. Either way a symlink in an
//!   intermediate component fails the operation (`ELOOP` or `ENOTDIR`), and `..`
//!   never reaches us ([`RelPath`] refuses it when decoding).
//! - Namespace operations never follow a symlink in the final component
//!   (`AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`, `linkat` without `AT_SYMLINK_FOLLOW`).
//! - Files are opened for writing only after an `O_PATH | O_NOFOLLOW` open shows
//!   a regular file, and then re-opened through `/proc/self/fd/N` (which names
//!   exactly that inode). A symlink fails with `ELOOP`, a FIFO, socket or device
//!   with `EPERM`: the receiver never blocks on a FIFO nor writes into a device.
//! - Modes are set explicitly after creation (the receiver's umask does not
//!   matter), after the owner (a `chown` clears set-id bits).
//! - Extended attributes are set through `/proc/self/fd/<parent>/<name>` with
//!   the `l*xattr` calls, an exact `*at()` equivalent that does not follow links.
//!
//! Write descriptors of hot files are kept in a small LRU cache so that a
//! stream of 4 KiB writes does not re-open the file each time; entries are
//! dropped when their name is unlinked, renamed or replaced.
//!
//! Durability: [`Op::Fsync`] calls `fsync`/`fdatasync` on the file, and also
//! `fsync` on every directory on its path whose entries changed since that
//! directory was last synced, so that a file created and then fsynced survives
//! a crash of the receiver under its name, as it does on the primary.
//!
//! Errors are `io::Error` carrying the errno of the call that failed.

use std::cell::Cell;
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{
    AtFlags, CWD, FallocateFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timespec,
    Timestamps, UTIME_OMIT,
};
use rustix::io::Errno;
use safekit_protocol::replication::{Op, RelPath, TimeSet, rename_flags};

/// How many write descriptors are kept open.
const OPEN_FILE_CACHE: usize = 32;

/// The replica's directories, one descriptor per replicated directory index.
#[derive(Debug)]
pub struct ReplicaRoot {
    dirs: Vec<OwnedFd>,
    open_files: Vec<CachedFile>,
    dirty_dirs: HashSet<(u16, RelPath)>,
    use_openat2: Cell<bool>,
}

#[derive(Debug)]
struct CachedFile {
    dir: u16,
    path: RelPath,
    fd: Arc<OwnedFd>,
}

/// A directory descriptor that is either one of the roots or freshly opened.
enum DirFd<'a> {
    Root(BorrowedFd<'a>),
    Opened(OwnedFd),
}

impl AsFd for DirFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DirFd::Root(fd) => *fd,
            DirFd::Opened(fd) => fd.as_fd(),
        }
    }
}

fn errno(errno: Errno) -> io::Error {
    io::Error::from(errno)
}

fn proc_fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn proc_child_path(parent: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut path = proc_fd_path(parent).into_bytes();
    path.push(b'/');
    path.extend_from_slice(name);
    path
}

fn uid(raw: Option<u32>) -> Option<rustix::fs::Uid> {
    // -1 means "leave unchanged" to chown(2); rustix wants it as `None`.
    raw.filter(|raw| *raw != u32::MAX)
        .map(rustix::fs::Uid::from_raw)
}

fn gid(raw: Option<u32>) -> Option<rustix::fs::Gid> {
    raw.filter(|raw| *raw != u32::MAX)
        .map(rustix::fs::Gid::from_raw)
}

fn permission_bits(mode: u32) -> Mode {
    Mode::from_raw_mode(mode & 0o7777)
}

fn timespec(time: Option<TimeSet>) -> io::Result<Timespec> {
    match time {
        None => Ok(Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        }),
        Some(TimeSet::At(at)) if at.nanos < 1_000_000_000 => Ok(Timespec {
            tv_sec: at.secs,
            tv_nsec: at.nanos.into(),
        }),
        Some(TimeSet::At(_)) => Err(errno(Errno::INVAL)),
    }
}

impl ReplicaRoot {
    /// Wraps directory descriptors (index = replicated directory index), opened
    /// by the caller with `O_PATH | O_DIRECTORY` before any mount.
    pub fn new(dirs: Vec<OwnedFd>) -> Self {
        ReplicaRoot {
            dirs,
            open_files: Vec::new(),
            dirty_dirs: HashSet::new(),
            use_openat2: Cell::new(true),
        }
    }

    /// Opens each directory with `O_PATH | O_DIRECTORY | O_CLOEXEC` (call before mounting over them).
    ///
    /// # Errors
    /// The first directory that cannot be opened.
    pub fn open(paths: &[&Path]) -> io::Result<Self> {
        let dirs = paths
            .iter()
            .map(|path| {
                rustix::fs::open(
                    *path,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self::new(dirs))
    }

    /// Applies one operation.
    ///
    /// # Errors
    /// The errno of the failing call; `EBADF` for an unknown directory index,
    /// `ELOOP` for a symlink where a directory or a regular file is required,
    /// `EPERM` for a FIFO, socket or device as the target of a write, `EINVAL`
    /// for malformed arguments (mknod of a directory, nanoseconds out of range).
    pub fn apply(&mut self, op: &Op) -> io::Result<()> {
        match op {
            Op::Create {
                dir,
                path,
                mode,
                uid: owner,
                gid: group,
                exclusive,
            } => self.create(*dir, path, *mode, *owner, *group, *exclusive),
            Op::Mkdir {
                dir,
                path,
                mode,
                uid: owner,
                gid: group,
            } => {
                self.invalidate(*dir, path);
                let (parent, name) = self.parent(*dir, path)?;
                rustix::fs::mkdirat(&parent, name, permission_bits(*mode)).map_err(errno)?;
                let fd = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)?;
                rustix::fs::fchown(&fd, uid(Some(*owner)), gid(Some(*group))).map_err(errno)?;
                rustix::fs::fchmod(&fd, permission_bits(*mode)).map_err(errno)?;
                self.mark_dirty(*dir, path);
                Ok(())
            }
            Op::Mknod {
                dir,
                path,
                mode,
                rdev,
                uid: owner,
                gid: group,
            } => {
                let file_type = FileType::from_raw_mode(*mode);
                if !matches!(
                    file_type,
                    FileType::Fifo
                        | FileType::CharacterDevice
                        | FileType::BlockDevice
                        | FileType::Socket
                        | FileType::RegularFile
                ) {
                    return Err(errno(Errno::INVAL));
                }
                self.invalidate(*dir, path);
                let (parent, name) = self.parent(*dir, path)?;
                rustix::fs::mknodat(&parent, name, file_type, permission_bits(*mode), *rdev)
                    .map_err(errno)?;
                rustix::fs::chownat(
                    &parent,
                    name,
                    uid(Some(*owner)),
                    gid(Some(*group)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno)?;
                chmod_nofollow(&parent, name, *mode)?;
                self.mark_dirty(*dir, path);
                Ok(())
            }
            Op::Symlink {
                dir,
                path,
                target,
                uid: owner,
                gid: group,
            } => {
                self.invalidate(*dir, path);
                let (parent, name) = self.parent(*dir, path)?;
                rustix::fs::symlinkat(target.as_slice(), &parent, name).map_err(errno)?;
                rustix::fs::chownat(
                    &parent,
                    name,
                    uid(Some(*owner)),
                    gid(Some(*group)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(errno)?;
                self.mark_dirty(*dir, path);
                Ok(())
            }
            Op::Link { dir, existing, new } => {
                self.invalidate(*dir, new);
                let (old_parent, old_name) = self.parent(*dir, existing)?;
                let (new_parent, new_name) = self.parent(*dir, new)?;
                rustix::fs::linkat(
                    &old_parent,
                    old_name,
                    &new_parent,
                    new_name,
                    AtFlags::empty(),
                )
                .map_err(errno)?;
                self.mark_dirty(*dir, new);
                Ok(())
            }
            Op::Unlink { dir, path } => {
                self.invalidate(*dir, path);
                let (parent, name) = self.parent(*dir, path)?;
                rustix::fs::unlinkat(&parent, name, AtFlags::empty()).map_err(errno)?;
                self.mark_dirty(*dir, path);
                Ok(())
            }
            Op::Rmdir { dir, path } => {
                self.invalidate(*dir, path);
                let (parent, name) = self.parent(*dir, path)?;
                rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR).map_err(errno)?;
                self.dirty_dirs.remove(&(*dir, path.clone()));
                self.mark_dirty(*dir, path);
                Ok(())
            }
            Op::Rename {
                dir,
                from,
                to,
                flags,
            } => {
                if flags & !(rename_flags::NOREPLACE | rename_flags::EXCHANGE) != 0 {
                    return Err(errno(Errno::INVAL));
                }
                self.invalidate(*dir, from);
                self.invalidate(*dir, to);
                let (from_parent, from_name) = self.parent(*dir, from)?;
                let (to_parent, to_name) = self.parent(*dir, to)?;
                let mut rename = RenameFlags::empty();
                if flags & rename_flags::NOREPLACE != 0 {
                    rename |= RenameFlags::NOREPLACE;
                }
                if flags & rename_flags::EXCHANGE != 0 {
                    rename |= RenameFlags::EXCHANGE;
                }
                rustix::fs::renameat_with(&from_parent, from_name, &to_parent, to_name, rename)
                    .map_err(errno)?;
                self.mark_dirty(*dir, from);
                self.mark_dirty(*dir, to);
                self.rename_dirty_dirs(*dir, from, to);
                Ok(())
            }
            Op::Write {
                dir,
                path,
                offset,
                data,
            } => {
                let fd = self.writable(*dir, path)?;
                let mut written = 0usize;
                while written < data.len() {
                    let at = offset
                        .checked_add(written as u64)
                        .ok_or_else(|| errno(Errno::FBIG))?;
                    match rustix::io::pwrite(&*fd, &data[written..], at) {
                        Ok(0) => return Err(errno(Errno::NOSPC)),
                        Ok(n) => written += n,
                        Err(Errno::INTR) => {}
                        Err(error) => return Err(errno(error)),
                    }
                }
                Ok(())
            }
            Op::Truncate { dir, path, size } => {
                let fd = self.writable(*dir, path)?;
                rustix::fs::ftruncate(&*fd, *size).map_err(errno)
            }
            Op::Fallocate {
                dir,
                path,
                mode,
                offset,
                len,
            } => {
                let fd = self.writable(*dir, path)?;
                let flags = FallocateFlags::from_bits(u32::from_ne_bytes(mode.to_ne_bytes()))
                    .ok_or_else(|| errno(Errno::OPNOTSUPP))?;
                match rustix::fs::fallocate(&*fd, flags, *offset, *len) {
                    // A replica file system that cannot punch holes gets the
                    // same bytes as zeros (up to the file's end: KEEP_SIZE).
                    Err(Errno::OPNOTSUPP)
                        if flags == FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE =>
                    {
                        write_zeros(&fd, *offset, *len)
                    }
                    other => other.map_err(errno),
                }
            }
            Op::SetAttr {
                dir,
                path,
                mode,
                uid: owner,
                gid: group,
                atime,
                mtime,
            } => self.set_attr(*dir, path, *mode, *owner, *group, *atime, *mtime),
            Op::SetXattr {
                dir,
                path,
                name,
                value,
                flags,
            } => {
                let flags =
                    rustix::fs::XattrFlags::from_bits(u32::from_ne_bytes(flags.to_ne_bytes()))
                        .ok_or_else(|| errno(Errno::INVAL))?;
                let (target, follow) = self.xattr_target(*dir, path)?;
                if follow {
                    rustix::fs::setxattr(target.as_slice(), name.as_slice(), value, flags)
                } else {
                    rustix::fs::lsetxattr(target.as_slice(), name.as_slice(), value, flags)
                }
                .map_err(errno)
            }
            Op::RemoveXattr { dir, path, name } => {
                let (target, follow) = self.xattr_target(*dir, path)?;
                if follow {
                    rustix::fs::removexattr(target.as_slice(), name.as_slice())
                } else {
                    rustix::fs::lremovexattr(target.as_slice(), name.as_slice())
                }
                .map_err(errno)
            }
            Op::Fsync {
                dir,
                path,
                datasync,
            } => self.fsync(*dir, path, *datasync),
        }
    }

    fn root(&self, dir: u16) -> io::Result<BorrowedFd<'_>> {
        self.dirs
            .get(usize::from(dir))
            .map(AsFd::as_fd)
            .ok_or_else(|| errno(Errno::BADF))
    }

    /// Opens directory `path` (`O_PATH`) beneath replicated directory `dir`, following no symlink.
    fn resolve_dir(&self, dir: u16, path: &RelPath) -> io::Result<DirFd<'_>> {
        let root = self.root(dir)?;
        if path.components().is_empty() {
            return Ok(DirFd::Root(root));
        }
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if self.use_openat2.get() {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            // No O_NOFOLLOW here: RESOLVE_NO_SYMLINKS refuses every symlink, the last one too, with ELOOP.
            let openat2_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            match rustix::fs::openat2(root, path.to_bytes(), openat2_flags, Mode::empty(), resolve)
            {
                Ok(fd) => return Ok(DirFd::Opened(fd)),
                Err(Errno::NOSYS) => {
                    tracing::debug!("openat2 unavailable; resolving one component at a time");
                    self.use_openat2.set(false);
                }
                Err(error) => return Err(errno(error)),
            }
        }
        let mut current: Option<OwnedFd> = None;
        for component in path.components() {
            let base = current.as_ref().map_or(root, AsFd::as_fd);
            let next = rustix::fs::openat(base, component.as_slice(), flags, Mode::empty())
                .map_err(|error| {
                    // O_PATH|O_NOFOLLOW opens a symlink itself; O_DIRECTORY then says ENOTDIR.
                    // Say ELOOP when it was a symlink, as openat2 does.
                    if error == Errno::NOTDIR
                        && rustix::fs::statat(base, component.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                            .is_ok_and(|stat| {
                                FileType::from_raw_mode(stat.st_mode) == FileType::Symlink
                            })
                    {
                        errno(Errno::LOOP)
                    } else {
                        errno(error)
                    }
                })?;
            current = Some(next);
        }
        Ok(DirFd::Opened(
            current.expect("path has at least one component"),
        ))
    }

    /// The parent directory of `path` and its last component; the root itself has no parent (`EINVAL`).
    fn parent<'p>(&self, dir: u16, path: &'p RelPath) -> io::Result<(DirFd<'_>, &'p [u8])> {
        let (last, parent_components) = path
            .components()
            .split_last()
            .ok_or_else(|| errno(Errno::INVAL))?;
        let parent_path = RelPath::from_components(parent_components.to_vec())
            .map_err(|_| errno(Errno::INVAL))?;
        let parent = self.resolve_dir(dir, &parent_path)?;
        Ok((parent, last.as_slice()))
    }

    fn create(
        &mut self,
        dir: u16,
        path: &RelPath,
        mode: u32,
        owner: u32,
        group: u32,
        exclusive: bool,
    ) -> io::Result<()> {
        self.invalidate(dir, path);
        let (parent, name) = self.parent(dir, path)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&parent, name, flags, permission_bits(mode)) {
            Ok(fd) => fd,
            Err(Errno::EXIST) if !exclusive => open_regular(&parent, name, OFlags::WRONLY)?,
            Err(error) => return Err(errno(error)),
        };
        rustix::fs::fchown(&fd, uid(Some(owner)), gid(Some(group))).map_err(errno)?;
        rustix::fs::fchmod(&fd, permission_bits(mode)).map_err(errno)?;
        drop(parent);
        self.mark_dirty(dir, path);
        self.remember(dir, path, Arc::new(fd));
        Ok(())
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one argument per field of Op::SetAttr"
    )]
    fn set_attr(
        &mut self,
        dir: u16,
        path: &RelPath,
        mode: Option<u32>,
        owner: Option<u32>,
        group: Option<u32>,
        atime: Option<TimeSet>,
        mtime: Option<TimeSet>,
    ) -> io::Result<()> {
        let times = Timestamps {
            last_access: timespec(atime)?,
            last_modification: timespec(mtime)?,
        };
        if path.components().is_empty() {
            // The replicated directory itself: act through its descriptor's magic link.
            let root = self.root(dir)?;
            let target = proc_fd_path(root);
            if owner.is_some() || group.is_some() {
                rustix::fs::chownat(
                    CWD,
                    target.as_str(),
                    uid(owner),
                    gid(group),
                    AtFlags::empty(),
                )
                .map_err(errno)?;
            }
            if let Some(mode) = mode {
                rustix::fs::chmodat(
                    CWD,
                    target.as_str(),
                    permission_bits(mode),
                    AtFlags::empty(),
                )
                .map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                rustix::fs::utimensat(CWD, target.as_str(), &times, AtFlags::empty())
                    .map_err(errno)?;
            }
            return Ok(());
        }
        if let Some(fd) = self.cached(dir, path) {
            // A regular file written just before (a resync's data, then its
            // times): through its open descriptor, no path resolution.
            if owner.is_some() || group.is_some() {
                rustix::fs::fchown(&*fd, uid(owner), gid(group)).map_err(errno)?;
            }
            if let Some(mode) = mode {
                rustix::fs::fchmod(&*fd, permission_bits(mode)).map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                rustix::fs::futimens(&*fd, &times).map_err(errno)?;
            }
            return Ok(());
        }
        let (parent, name) = self.parent(dir, path)?;
        if owner.is_some() || group.is_some() {
            rustix::fs::chownat(
                &parent,
                name,
                uid(owner),
                gid(group),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        if let Some(mode) = mode {
            chmod_nofollow(&parent, name, mode)?;
        }
        if atime.is_some() || mtime.is_some() {
            rustix::fs::utimensat(&parent, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno)?;
        }
        Ok(())
    }

    /// A path naming exactly the target for the `*xattr` calls, and whether to follow it
    /// (only for the root's own magic link).
    fn xattr_target(&self, dir: u16, path: &RelPath) -> io::Result<(XattrTarget, bool)> {
        if path.components().is_empty() {
            let root = self.root(dir)?;
            return Ok((
                XattrTarget {
                    path: proc_fd_path(root).into_bytes(),
                    _parent: None,
                },
                true,
            ));
        }
        let (parent, name) = self.parent(dir, path)?;
        let parent = match parent {
            DirFd::Root(fd) => fd.try_clone_to_owned()?,
            DirFd::Opened(fd) => fd,
        };
        Ok((
            XattrTarget {
                path: proc_child_path(parent.as_fd(), name),
                _parent: Some(parent),
            },
            false,
        ))
    }

    fn fsync(&mut self, dir: u16, path: &RelPath, datasync: bool) -> io::Result<()> {
        let cached = self.cached(dir, path);
        let fd: Arc<OwnedFd> = match cached {
            Some(fd) => fd,
            None if path.components().is_empty() => Arc::new(self.readable_dir(dir, path)?),
            None => {
                let (parent, name) = self.parent(dir, path)?;
                let probe = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)?;
                let file_type =
                    FileType::from_raw_mode(rustix::fs::fstat(&probe).map_err(errno)?.st_mode);
                match file_type {
                    FileType::RegularFile => Arc::new(reopen(&probe, OFlags::RDONLY)?),
                    FileType::Directory => {
                        Arc::new(reopen(&probe, OFlags::RDONLY | OFlags::DIRECTORY)?)
                    }
                    FileType::Symlink => return Err(errno(Errno::LOOP)),
                    _ => return Err(errno(Errno::PERM)),
                }
            }
        };
        if datasync {
            rustix::fs::fdatasync(&*fd).map_err(errno)?;
        } else {
            rustix::fs::fsync(&*fd).map_err(errno)?;
        }
        // Make the names on the way durable too, deepest first.
        let components = path.components();
        for depth in (0..=components.len()).rev() {
            let prefix = RelPath::from_components(components[..depth].to_vec())
                .map_err(|_| errno(Errno::INVAL))?;
            if self.dirty_dirs.remove(&(dir, prefix.clone())) && depth < components.len() {
                let dir_fd = self.readable_dir(dir, &prefix)?;
                rustix::fs::fsync(&dir_fd).map_err(errno)?;
            }
        }
        Ok(())
    }

    fn readable_dir(&self, dir: u16, path: &RelPath) -> io::Result<OwnedFd> {
        let fd = self.resolve_dir(dir, path)?;
        reopen(&fd, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// A write descriptor for the regular file `path`, from the cache or freshly opened.
    fn writable(&mut self, dir: u16, path: &RelPath) -> io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.cached(dir, path) {
            return Ok(fd);
        }
        let (parent, name) = self.parent(dir, path)?;
        let fd = Arc::new(open_regular(&parent, name, OFlags::WRONLY)?);
        drop(parent);
        self.remember(dir, path, Arc::clone(&fd));
        Ok(fd)
    }

    fn cached(&mut self, dir: u16, path: &RelPath) -> Option<Arc<OwnedFd>> {
        let index = self
            .open_files
            .iter()
            .position(|entry| entry.dir == dir && &entry.path == path)?;
        let entry = self.open_files.remove(index);
        let fd = Arc::clone(&entry.fd);
        self.open_files.insert(0, entry);
        Some(fd)
    }

    fn remember(&mut self, dir: u16, path: &RelPath, fd: Arc<OwnedFd>) {
        self.open_files
            .retain(|entry| !(entry.dir == dir && &entry.path == path));
        self.open_files.insert(
            0,
            CachedFile {
                dir,
                path: path.clone(),
                fd,
            },
        );
        self.open_files.truncate(OPEN_FILE_CACHE);
    }

    /// Forgets cached descriptors of `path` and of everything beneath it (its name is about to change).
    fn invalidate(&mut self, dir: u16, path: &RelPath) {
        let prefix = path.components();
        self.open_files
            .retain(|entry| !(entry.dir == dir && entry.path.components().starts_with(prefix)));
    }

    /// Records that the directory holding `path` has changed entries.
    fn mark_dirty(&mut self, dir: u16, path: &RelPath) {
        if let Some((parent, _)) = path.split_last() {
            self.dirty_dirs.insert((dir, parent));
        }
    }

    /// A renamed directory keeps its unsynced entries: move their records to the new name,
    /// and count the moved name itself as unsynced (a directory moved there may hold some).
    fn rename_dirty_dirs(&mut self, dir: u16, from: &RelPath, to: &RelPath) {
        let moved: Vec<(u16, RelPath)> = self
            .dirty_dirs
            .iter()
            .filter(|(d, path)| *d == dir && path.components().starts_with(from.components()))
            .cloned()
            .collect();
        for key in moved {
            self.dirty_dirs.remove(&key);
            let mut components = to.components().to_vec();
            components.extend_from_slice(&key.1.components()[from.components().len()..]);
            if let Ok(renamed) = RelPath::from_components(components) {
                self.dirty_dirs.insert((dir, renamed));
            }
        }
        self.dirty_dirs.insert((dir, to.clone()));
    }

    /// Number of cached write descriptors (for tests and stats).
    pub fn cached_files(&self) -> usize {
        self.open_files.len()
    }
}

/// A `/proc/self/fd/...` path, keeping alive the descriptor it names.
struct XattrTarget {
    path: Vec<u8>,
    _parent: Option<OwnedFd>,
}

impl XattrTarget {
    fn as_slice(&self) -> &[u8] {
        &self.path
    }
}

/// Re-opens the inode behind an `O_PATH` descriptor with real access flags.
fn reopen(fd: &impl AsFd, flags: OFlags) -> io::Result<OwnedFd> {
    rustix::fs::open(
        proc_fd_path(fd.as_fd()).as_str(),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)
}

/// Opens an existing regular file `name` in `parent`; refuses symlinks (`ELOOP`) and special files (`EPERM`).
fn open_regular(parent: &impl AsFd, name: &[u8], access: OFlags) -> io::Result<OwnedFd> {
    let probe = rustix::fs::openat(
        parent,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)?;
    match FileType::from_raw_mode(rustix::fs::fstat(&probe).map_err(errno)?.st_mode) {
        FileType::RegularFile => reopen(&probe, access | OFlags::NONBLOCK),
        FileType::Symlink => Err(errno(Errno::LOOP)),
        _ => Err(errno(Errno::PERM)),
    }
}

/// `chmod` of `name` in `parent` without following a symlink (a symlink's mode is left alone,
/// as Linux ignores it).
/// Writes zeros over `[offset, offset + len)` of `fd`, not past its end.
fn write_zeros(fd: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let size = rustix::fs::fstat(fd).map_err(errno)?.st_size;
    let end = offset
        .saturating_add(len)
        .min(u64::try_from(size).unwrap_or(0));
    let zeros = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < end {
        let chunk = usize::try_from((end - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
        let written = rustix::io::pwrite(fd, &zeros[..chunk], at).map_err(errno)?;
        if written == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        at += written as u64;
    }
    Ok(())
}

fn chmod_nofollow(parent: &impl AsFd, name: &[u8], mode: u32) -> io::Result<()> {
    let probe = rustix::fs::openat(
        parent,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)?;
    if FileType::from_raw_mode(rustix::fs::fstat(&probe).map_err(errno)?.st_mode)
        == FileType::Symlink
    {
        return Ok(());
    }
    rustix::fs::chmodat(
        CWD,
        proc_fd_path(probe.as_fd()).as_str(),
        permission_bits(mode),
        AtFlags::empty(),
    )
    .map_err(errno)
}

#[cfg(test)]
mod tests;
