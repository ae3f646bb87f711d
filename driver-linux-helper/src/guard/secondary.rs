//! The secondary's guard: the replica is read-only for everything but the receiver.
//!
//! [`SecondaryGuard::engage`] bind-mounts each replicated directory over
//! itself, read-only (a clone of the directory's mount, keeping its
//! `nosuid`/`nodev`/`noexec`/atime flags, made read-only before it is
//! attached, so that the copies mount propagation makes in other mount
//! namespaces are read-only too). Every path lookup of the directory now
//! ends on the read-only mount: opening a file for writing, creating,
//! unlinking, renaming or changing metadata there fails with `EROFS`. The receiver opened its directory
//! descriptors ([`ReplicaRoot::open`](crate::apply::ReplicaRoot::open)) before
//! the guard was engaged: they belong to the original, writable mount, and
//! its `*at()` calls resolve beneath them without crossing the new mount, so
//! the receiver keeps writing. Order matters: open the receiver's descriptors
//! after [`SecondaryGuard::remove_leftovers`] and before `engage`.
//!
//! This guards the directory's path, which is what applications use. A
//! process that holds a descriptor from before the guard, or another mount of
//! the same file system, is not stopped by it. A [`PrimaryGuard`] with
//! [`GuardPolicy::Deny`], run by the receiver's process (its pid is allowed),
//! refuses opens through other mounts too, and records writes through older
//! descriptors in the dirty log it is given (the replica's files that the
//! next resync must compare, whichever side keeps that list).
//!
//! # Crash safety
//!
//! The bind mount outlives the process that made it. A read-only mount of a
//! directory over itself (a mount whose mount point is the directory, whose
//! file system is its parent mount's, whose root is the directory's own path
//! in that file system, and that is read-only) is recognized as the guard's
//! ([`SecondaryGuard::is_engaged`]): [`SecondaryGuard::remove_leftovers`]
//! removes such mounts (all stacked ones) and `engage` calls it first.
//! [`SecondaryGuard::release`] removes exactly these mounts and nothing else
//! (if something else was mounted over the directory since, it is left alone
//! and reported); it is idempotent, and dropping the guard releases it. The
//! FUSE mount (on becoming primary) must only be mounted after the release.
//!
//! [`PrimaryGuard`]: super::PrimaryGuard
//! [`GuardPolicy::Deny`]: super::GuardPolicy::Deny

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, StatVfsMountFlags};
use rustix::mount::{MountFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};

use super::GuardError;
use super::location::{MountEntry, read_mountinfo};
use super::sys::make_mount_read_only;

/// A secondary's replicated directories made read-only; dropping it releases them.
#[derive(Debug)]
pub struct SecondaryGuard {
    /// Directories with a read-only bind mount of ours on top, in engage order.
    engaged: Vec<PathBuf>,
}

fn mount_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> GuardError + use<'a> {
    move |errno| GuardError::Mount {
        action,
        path: path.to_path_buf(),
        source: errno.into(),
    }
}

/// The topmost mount on `dir` if it is a read-only bind of `dir` over itself.
fn top_self_bind<'a>(dir: &[u8], mounts: &'a [MountEntry]) -> Option<&'a MountEntry> {
    let at_dir: Vec<&MountEntry> = mounts.iter().filter(|m| m.mount_point == dir).collect();
    let top = at_dir
        .iter()
        .find(|m| !at_dir.iter().any(|other| other.parent_id == m.mount_id))?;
    let parent = mounts.iter().find(|p| p.mount_id == top.parent_id)?;
    let parent_point = parent
        .mount_point
        .strip_suffix(b"/")
        .unwrap_or(&parent.mount_point);
    let within_parent = dir.strip_prefix(parent_point)?;
    let within_parent = if within_parent.is_empty() {
        within_parent
    } else {
        within_parent.strip_prefix(b"/")?
    };
    let mut expected_root = parent
        .root
        .strip_suffix(b"/")
        .unwrap_or(&parent.root)
        .to_vec();
    if !within_parent.is_empty() {
        expected_root.push(b'/');
        expected_root.extend_from_slice(within_parent);
    }
    if expected_root.is_empty() {
        expected_root.push(b'/');
    }
    (top.read_only && top.dev == parent.dev && top.root == expected_root).then_some(*top)
}

fn canonical(dir: &Path) -> Result<PathBuf, GuardError> {
    std::fs::canonicalize(dir).map_err(|source| GuardError::Dir {
        path: dir.to_path_buf(),
        source,
    })
}

fn mounts_of(dir: &Path) -> Result<Vec<MountEntry>, GuardError> {
    read_mountinfo().map_err(|source| GuardError::Dir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Unmounts the top mount on `dir`, lazily when it is busy.
fn unmount_top(dir: &Path) -> Result<(), GuardError> {
    match rustix::mount::unmount(dir, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => {
            tracing::warn!(dir = %dir.display(), "read-only guard mount busy; detaching it");
            rustix::mount::unmount(dir, UnmountFlags::DETACH).map_err(mount_error("detach", dir))
        }
        Err(errno) => Err(mount_error("unmount", dir)(errno)),
    }
}

/// Removes the guard's read-only mounts from `dir`; returns how many.
fn remove_self_binds(dir: &Path) -> Result<usize, GuardError> {
    let mut removed = 0;
    while top_self_bind(dir.as_os_str().as_bytes(), &mounts_of(dir)?).is_some() {
        unmount_top(dir)?;
        removed += 1;
    }
    Ok(removed)
}

/// The per-mount flags of the mount `dir` is on, to keep them on the read-only bind.
fn kept_flags(dir: &Path) -> Result<MountFlags, GuardError> {
    let stat = rustix::fs::statvfs(dir).map_err(|errno| GuardError::Dir {
        path: dir.to_path_buf(),
        source: errno.into(),
    })?;
    let pairs = [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(from, _)| stat.f_flag.contains(*from))
        .fold(MountFlags::empty(), |flags, (_, to)| flags | *to))
}

/// Mounts a read-only bind of `dir` over itself.
///
/// Preferred: clone the directory's mount detached (`open_tree`), make the
/// clone read-only (`mount_setattr`; the clone keeps the original's other
/// flags), then attach it (`move_mount`). When the parent mount is shared,
/// the attach propagates copies of the mount to its peers and slaves (other
/// mount namespaces of the node), and copies keep the read-only flag, so the
/// directory is read-only there too. The classic `mount --bind` then `mount
/// -o remount,bind,ro` would propagate writable copies (the remount changes
/// this mount only); it is the fallback for kernels before 5.12.
fn attach_read_only_bind(dir: &Path) -> Result<(), GuardError> {
    let tree = match rustix::mount::open_tree(
        CWD,
        dir,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    ) {
        Ok(tree) => tree,
        Err(rustix::io::Errno::NOSYS) => return classic_read_only_bind(dir),
        Err(errno) => return Err(mount_error("clone the mount of", dir)(errno)),
    };
    // Dropping `tree` unattached frees the clone: nothing to undo on error.
    match make_mount_read_only(tree.as_fd()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::ENOSYS) => {
            return classic_read_only_bind(dir);
        }
        Err(source) => {
            return Err(GuardError::Mount {
                action: "make read-only a clone of",
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        CWD,
        dir,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(mount_error("attach a read-only mount over", dir))
}

/// `mount --bind dir dir` then `mount -o remount,bind,ro dir`.
fn classic_read_only_bind(dir: &Path) -> Result<(), GuardError> {
    let flags = kept_flags(dir)? | MountFlags::BIND | MountFlags::RDONLY;
    rustix::mount::mount_bind(dir, dir).map_err(mount_error("bind-mount", dir))?;
    if let Err(errno) = rustix::mount::mount_remount(dir, flags, "") {
        // Do not leave a writable bind mount behind.
        if let Err(error) = unmount_top(dir) {
            tracing::error!(%error, "cannot remove the bind mount whose remount failed");
        }
        return Err(mount_error("make read-only", dir)(errno));
    }
    Ok(())
}

impl SecondaryGuard {
    /// Removes read-only guard mounts left on `dirs` by a guard that was never
    /// released (its process crashed); returns how many were removed. Call it
    /// at start, before the receiver opens its descriptors.
    ///
    /// # Errors
    /// A directory cannot be examined or a mount cannot be removed.
    pub fn remove_leftovers(dirs: &[&Path]) -> Result<usize, GuardError> {
        let mut removed = 0;
        for dir in dirs {
            let dir = canonical(dir)?;
            let count = remove_self_binds(&dir)?;
            if count > 0 {
                tracing::warn!(dir = %dir.display(), count, "removed a read-only guard mount left by a previous run");
            }
            removed += count;
        }
        Ok(removed)
    }

    /// Whether `dir` is covered by a read-only guard mount now.
    ///
    /// # Errors
    /// The directory or the mount table cannot be read.
    pub fn is_engaged(dir: &Path) -> Result<bool, GuardError> {
        let dir = canonical(dir)?;
        Ok(top_self_bind(dir.as_os_str().as_bytes(), &mounts_of(&dir)?).is_some())
    }

    /// Makes each of `dirs` read-only for every process (see the module
    /// documentation); leftovers of a previous run are removed first. On error,
    /// the directories already done are released again.
    ///
    /// # Errors
    /// A directory cannot be examined, or the kernel refuses a mount.
    pub fn engage(dirs: &[&Path]) -> Result<SecondaryGuard, GuardError> {
        let mut guard = SecondaryGuard {
            engaged: Vec::new(),
        };
        for dir in dirs {
            if let Err(error) = guard.engage_one(dir) {
                if let Err(release_error) = guard.release() {
                    tracing::error!(%release_error, "cannot undo a partly engaged guard");
                }
                return Err(error);
            }
        }
        Ok(guard)
    }

    fn engage_one(&mut self, dir: &Path) -> Result<(), GuardError> {
        let dir = canonical(dir)?;
        let leftovers = remove_self_binds(&dir)?;
        if leftovers > 0 {
            tracing::warn!(
                dir = %dir.display(),
                leftovers,
                "removed a read-only guard mount left by a previous run; descriptors opened before now may be read-only"
            );
        }
        attach_read_only_bind(&dir)?;
        tracing::info!(dir = %dir.display(), "replicated directory read-only for applications");
        self.engaged.push(dir);
        Ok(())
    }

    /// The directories this guard made read-only (until released).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.engaged
    }

    /// Removes the guard's read-only mounts; calling it again does nothing.
    ///
    /// # Errors
    /// A mount could not be removed (the directory stays in the guard, so a
    /// later call retries it).
    pub fn release(&mut self) -> Result<(), GuardError> {
        let mut first_error = None;
        let mut kept = Vec::new();
        while let Some(dir) = self.engaged.pop() {
            let outcome = mounts_of(&dir).and_then(|mounts| {
                if top_self_bind(dir.as_os_str().as_bytes(), &mounts).is_some() {
                    unmount_top(&dir)
                } else {
                    tracing::warn!(dir = %dir.display(), "the guard's read-only mount is not on top any more (gone, or covered by another mount); left as it is");
                    Ok(())
                }
            });
            match outcome {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "replicated directory writable again")
                }
                Err(error) => {
                    kept.push(dir);
                    first_error.get_or_insert(error);
                }
            }
        }
        self.engaged = kept;
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for SecondaryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.release() {
            tracing::error!(%error, "releasing the secondary guard on drop failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::location::parse_mountinfo;

    #[test]
    fn a_read_only_bind_of_a_directory_over_itself_is_recognized() {
        let mounts = parse_mountinfo(
            b"\
22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /srv rw - tmpfs tmpfs rw
41 40 0:50 /data /srv/data ro - tmpfs tmpfs rw
42 41 0:50 /data /srv/data ro - tmpfs tmpfs rw
50 22 0:50 /other /mnt/x ro - tmpfs tmpfs rw
51 22 8:1 /srv2/y /srv2/y rw - ext4 /dev/sda1 rw
",
        );
        let top = top_self_bind(b"/srv/data", &mounts).expect("guard mount");
        assert_eq!(top.mount_id, 42, "the topmost of two stacked guard mounts");
        assert!(
            top_self_bind(b"/mnt/x", &mounts).is_none(),
            "a bind of another directory"
        );
        assert!(top_self_bind(b"/srv2/y", &mounts).is_none(), "writable");
        assert!(
            top_self_bind(b"/srv", &mounts).is_none(),
            "a mount of a file system"
        );
    }
}
