//! Reading a replicated tree beneath its directory descriptor, on either node.
//!
//! The resync engine reads the primary's underlying tree, and the receiver
//! answers questions about the replica's, both through a directory descriptor
//! opened before any mount and never by absolute path. Paths are resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! (one component at a time with `O_NOFOLLOW` where `openat2` is missing), the
//! final component is examined with `lstat` semantics, and a file is opened for
//! reading only after an `O_PATH | O_NOFOLLOW` probe showed a regular file, so
//! neither a symlink nor a FIFO can redirect or block a reader.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use safekit_protocol::replication::{RelPath, Timestamp};
use safekit_protocol::resync::{BlockHash, DirEntry, EntryKind, EntryMeta, Xattr};
use sha2::Digest;

fn errno(error: Errno) -> io::Error {
    io::Error::from(error)
}

/// Whether an error means "there is nothing at this path" (as opposed to a failure).
pub(crate) fn is_absent(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}

/// Opens directory `path` beneath `root` with `flags` (plus `O_DIRECTORY | O_CLOEXEC`),
/// following no symlink.
pub(crate) fn open_dir(root: BorrowedFd<'_>, path: &RelPath, flags: OFlags) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let bytes = path.to_bytes();
    let target: &[u8] = if bytes.is_empty() { b"." } else { &bytes };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(root, target, flags, Mode::empty(), resolve) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOSYS) => {}
        Err(error) => return Err(errno(error)),
    }
    let mut current = rustix::fs::openat(root, ".", flags, Mode::empty()).map_err(errno)?;
    for component in path.components() {
        current = rustix::fs::openat(
            &current,
            component.as_slice(),
            flags | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(errno)?;
    }
    Ok(current)
}

/// The metadata of a `Stat` (and a symlink's target).
pub(crate) fn meta(stat: &Stat, link_target: Vec<u8>) -> EntryMeta {
    let kind = match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        _ => EntryKind::Special,
    };
    EntryMeta {
        kind,
        size: u64::try_from(stat.st_size).unwrap_or(0),
        mtime: Timestamp {
            secs: stat.st_mtime,
            nanos: u32::try_from(stat.st_mtime_nsec).unwrap_or(0),
        },
        mode: stat.st_mode,
        uid: stat.st_uid,
        gid: stat.st_gid,
        rdev: stat.st_rdev,
        link_target,
    }
}

fn link_target(parent: &impl AsFd, name: &[u8], stat: &Stat) -> io::Result<Vec<u8>> {
    if FileType::from_raw_mode(stat.st_mode) == FileType::Symlink {
        Ok(rustix::fs::readlinkat(parent, name, Vec::new())
            .map_err(errno)?
            .into_bytes())
    } else {
        Ok(Vec::new())
    }
}

/// `lstat` of `path` beneath `root`: `None` when nothing is there.
///
/// # Errors
/// Failures other than absence.
pub(crate) fn lstat(root: BorrowedFd<'_>, path: &RelPath) -> io::Result<Option<(Stat, EntryMeta)>> {
    let Some((parent_path, name)) = path.split_last() else {
        let fd = open_dir(root, path, OFlags::PATH)?;
        let stat = rustix::fs::fstat(&fd).map_err(errno)?;
        let meta = meta(&stat, Vec::new());
        return Ok(Some((stat, meta)));
    };
    let parent = match open_dir(root, &parent_path, OFlags::PATH) {
        Ok(parent) => parent,
        Err(error) if is_absent(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    let stat = match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(None),
        Err(error) => return Err(errno(error)),
    };
    let target = link_target(&parent, name, &stat)?;
    let meta = meta(&stat, target);
    Ok(Some((stat, meta)))
}

/// Opens the regular file `path` beneath `root` for reading; `None` when the
/// path is absent or is not a regular file.
///
/// # Errors
/// Failures other than absence.
pub(crate) fn open_regular(
    root: BorrowedFd<'_>,
    path: &RelPath,
) -> io::Result<Option<(OwnedFd, Stat)>> {
    let Some((parent_path, name)) = path.split_last() else {
        return Ok(None);
    };
    let parent = match open_dir(root, &parent_path, OFlags::PATH) {
        Ok(parent) => parent,
        Err(error) if is_absent(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    let probe = match rustix::fs::openat(
        &parent,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(probe) => probe,
        Err(Errno::NOENT) => return Ok(None),
        Err(error) => return Err(errno(error)),
    };
    let stat = rustix::fs::fstat(&probe).map_err(errno)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    // Without touching the access time: a resync reading a file must not
    // dirty its inode (a journal write per file on both nodes).
    let reopen = |flags: OFlags| {
        rustix::fs::open(
            format!("/proc/self/fd/{}", probe.as_raw_fd()).as_str(),
            flags | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let fd = match reopen(OFlags::NOATIME) {
        // Only the owner (or CAP_FOWNER) may ask for it.
        Err(Errno::PERM) => reopen(OFlags::empty()),
        other => other,
    }
    .map_err(errno)?;
    Ok(Some((fd, stat)))
}

/// The entries of directory `path` beneath `root`, sorted by name, with `lstat` metadata.
///
/// # Errors
/// The directory cannot be opened or read.
pub(crate) fn list_dir(root: BorrowedFd<'_>, path: &RelPath) -> io::Result<Vec<DirEntry>> {
    list_dir_page(root, path, None, usize::MAX).map(|(entries, _)| entries)
}

/// Like [`list_dir`], but only the first `limit` entries named after
/// `start_after`, and whether more follow (names are read and sorted first,
/// so only the page's entries cost an `lstat`).
///
/// # Errors
/// The directory cannot be opened or read.
pub(crate) fn list_dir_page(
    root: BorrowedFd<'_>,
    path: &RelPath,
    start_after: Option<&[u8]>,
    limit: usize,
) -> io::Result<(Vec<DirEntry>, bool)> {
    let fd = open_dir(root, path, OFlags::RDONLY)?;
    let mut dir = rustix::fs::Dir::read_from(&fd).map_err(errno)?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(errno)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." || start_after.is_some_and(|after| name <= after) {
            continue;
        }
        names.push(name.to_vec());
    }
    names.sort();
    let more = names.len() > limit;
    names.truncate(limit);
    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        let name = name.as_slice();
        let stat = match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            // Removed while we listed: it is simply not there.
            Err(Errno::NOENT) => continue,
            Err(error) => return Err(errno(error)),
        };
        let target = link_target(&fd, name, &stat)?;
        entries.push(DirEntry {
            name: name.to_vec(),
            meta: meta(&stat, target),
        });
    }
    Ok((entries, more))
}

/// Reads up to `buf.len()` bytes at `offset`, short only at end of file.
///
/// # Errors
/// The read failed.
pub(crate) fn read_at(fd: &impl AsFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(error) => return Err(errno(error)),
        }
    }
    Ok(done)
}

/// The extended attributes of `path` beneath `root` (not following a
/// symlink), sorted by name; `None` when nothing is there. A file system
/// without extended attributes has none.
///
/// # Errors
/// Failures other than absence.
pub(crate) fn xattrs(root: BorrowedFd<'_>, path: &RelPath) -> io::Result<Option<Vec<Xattr>>> {
    // A path naming exactly the entry through a held descriptor: the parent's
    // magic link and the final name (`l*` calls do not follow it), or the
    // root's own magic link.
    let (target, _parent) = match path.split_last() {
        None => (
            format!("/proc/self/fd/{}", root.as_raw_fd()).into_bytes(),
            None,
        ),
        Some((parent_path, name)) => {
            let parent = match open_dir(root, &parent_path, OFlags::PATH) {
                Ok(parent) => parent,
                Err(error) if is_absent(&error) => return Ok(None),
                Err(error) => return Err(error),
            };
            let mut target = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
            target.extend_from_slice(name);
            (target, Some(parent))
        }
    };
    let target = std::ffi::OsStr::from_bytes(&target);
    let names = loop {
        let size = match rustix::fs::llistxattr_query(target) {
            Ok(size) => size,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::NOTSUP) => return Ok(Some(Vec::new())),
            Err(error) => return Err(errno(error)),
        };
        let mut names = vec![0u8; size];
        match rustix::fs::llistxattr(target, &mut names[..]) {
            Ok(n) => {
                names.truncate(n);
                break names;
            }
            // Grew meanwhile: ask again.
            Err(Errno::RANGE) => continue,
            Err(Errno::NOENT) => return Ok(None),
            Err(error) => return Err(errno(error)),
        }
    };
    let mut found = Vec::new();
    for name in names.split(|b| *b == 0).filter(|name| !name.is_empty()) {
        let name_os = std::ffi::OsStr::from_bytes(name);
        let value = loop {
            let size = match rustix::fs::lgetxattr_query(target, name_os) {
                Ok(size) => size,
                // Removed meanwhile.
                Err(Errno::NODATA) => break None,
                Err(error) => return Err(errno(error)),
            };
            let mut value = vec![0u8; size];
            match rustix::fs::lgetxattr(target, name_os, &mut value[..]) {
                Ok(n) => {
                    value.truncate(n);
                    break Some(value);
                }
                Err(Errno::RANGE) => continue,
                Err(Errno::NODATA) => break None,
                Err(error) => return Err(errno(error)),
            }
        };
        if let Some(value) = value {
            found.push(Xattr {
                name: name.to_vec(),
                value,
            });
        }
    }
    found.sort();
    Ok(Some(found))
}

/// Whether `[offset, offset + len)` of `fd` holds no data (a hole, or
/// beyond the end): `SEEK_DATA` finds none before its end. `false` when the
/// file system cannot tell (it then reports everything as data).
pub(crate) fn is_hole(fd: &impl AsFd, offset: u64, len: u64) -> bool {
    match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(offset)) {
        Ok(next_data) => next_data >= offset.saturating_add(len),
        // No data at or after `offset`.
        Err(Errno::NXIO) => true,
        Err(_) => false,
    }
}

/// Up to `len` bytes at `offset`, short only at end of file, read into a new
/// buffer's spare capacity (no zeroing first: this is the resync's data path).
///
/// # Errors
/// The read failed.
pub(crate) fn read_vec_at(fd: &impl AsFd, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut data: Vec<u8> = Vec::with_capacity(len);
    while data.len() < len {
        let filled = data.len();
        let spare = &mut data.spare_capacity_mut()[..len - filled];
        match rustix::io::pread(fd, spare, offset + filled as u64) {
            Ok(([], _)) => break,
            Ok((read, _)) => {
                let n = read.len();
                // SAFETY: `pread` initialized the first `n` bytes of the spare
                // capacity (the `read` slice it returned), right after the
                // `filled` bytes already initialized, and `filled + n <= len`
                // is within the capacity reserved above.
                unsafe { data.set_len(filled + n) };
            }
            Err(Errno::INTR) => {}
            Err(error) => return Err(errno(error)),
        }
    }
    Ok(data)
}

/// The strong hash of a block.
pub(crate) fn hash(block: &[u8]) -> BlockHash {
    sha2::Sha256::digest(block).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_vec_at_reads_what_is_there_up_to_the_length_asked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("f");
        std::fs::write(&path, b"0123456789").expect("write");
        let file = std::fs::File::open(&path).expect("open");
        assert_eq!(read_vec_at(&file, 3, 4).expect("read"), b"456");
        assert_eq!(read_vec_at(&file, 100, 0).expect("read"), b"0123456789");
        assert_eq!(read_vec_at(&file, 100, 8).expect("read"), b"89");
        assert!(read_vec_at(&file, 5, 10).expect("read").is_empty());
        assert!(read_vec_at(&file, 0, 0).expect("read").is_empty());
    }

    #[test]
    fn holes_are_told_apart_from_data() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("sparse");
        let file = std::fs::File::create(&path).expect("create");
        file.set_len(8 << 20).expect("size");
        std::os::unix::fs::FileExt::write_all_at(&file, &[1u8; 4096], 4 << 20).expect("data");
        assert!(is_hole(&file, 0, 1 << 20), "the start is a hole");
        assert!(!is_hole(&file, 4 << 20, 4096), "the data is not");
        assert!(
            !is_hole(&file, 3 << 20, 2 << 20),
            "a range holding data is not"
        );
        assert!(is_hole(&file, 6 << 20, 1 << 20), "after the data");
        assert!(is_hole(&file, 9 << 20, 1 << 20), "beyond the end");
    }
}
