//! Where a file lives inside its file system, whatever mount it was reached through.
//!
//! A fanotify event hands us a descriptor of the file that was touched, opened
//! through the same mount as the access that caused the event. `readlink` of
//! `/proc/self/fd/N` names the file *through that mount*: for a bind mount of
//! the replicated directory elsewhere, the name is under the bind mount, not
//! under the replicated directory; for a descriptor opened before the FUSE
//! mount went over the directory, the name is the directory's path, which now
//! shows the FUSE mount. Neither can be compared with the replicated
//! directory's path as a plain string, nor be `stat`ed by name.
//!
//! So both sides are turned into a [`FsLocation`]: the device of the file
//! system plus the path *inside that file system* (from its root), computed
//! from the descriptor's mount id (`statx(STATX_MNT_ID)`), that mount's entry
//! in `/proc/thread-self/mountinfo` (its mount point and the directory of the
//! file system it shows), and the `readlink` name. Two locations on the same
//! device compare as paths, whatever mount they were reached through.
//!
//! `/proc/thread-self`, not `/proc/self`: mount namespaces are per thread, and
//! `/proc/self` shows the namespace of the process's main thread (the tests run
//! each case in a thread with a private mount namespace).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use rustix::fs::{AtFlags, StatxFlags};
use safekit_protocol::replication::RelPath;

/// What `readlink` appends to the name of an unlinked file.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount id (first field).
    pub mount_id: u64,
    /// The parent mount's id.
    pub parent_id: u64,
    /// The file system's device (`major:minor`).
    pub dev: (u32, u32),
    /// The directory of the file system that this mount shows (`/` for a whole mount).
    pub root: Vec<u8>,
    /// Where it is mounted, as seen by the reader.
    pub mount_point: Vec<u8>,
    /// Whether the mount itself is read-only (per-mount `ro` option).
    pub read_only: bool,
}

/// A file identified by its file system and its path from that file system's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsLocation {
    /// The file system's device (`major:minor`).
    pub dev: (u32, u32),
    /// Absolute path from the root of the file system (starts with `/`).
    pub path_in_fs: Vec<u8>,
}

impl FsLocation {
    /// The entry `name` of this directory; the directory itself for an empty name or `.`.
    pub fn child(&self, name: &[u8]) -> FsLocation {
        if name.is_empty() || name == b"." {
            return self.clone();
        }
        FsLocation {
            dev: self.dev,
            path_in_fs: join(&self.path_in_fs, name),
        }
    }

    /// The path of `self` below `dir`, if `self` is `dir` or beneath it.
    pub fn relative_to(&self, dir: &FsLocation) -> Option<Vec<u8>> {
        if self.dev != dir.dev {
            return None;
        }
        let rest = strip_dir_prefix(&self.path_in_fs, &dir.path_in_fs)?;
        Some(rest.to_vec())
    }
}

/// `path` without the leading `dir` and the `/` after it; `None` when `path` is not within `dir`.
fn strip_dir_prefix<'a>(path: &'a [u8], dir: &[u8]) -> Option<&'a [u8]> {
    let dir = trim_trailing_slash(dir);
    let rest = path.strip_prefix(dir)?;
    if rest.is_empty() {
        return Some(rest);
    }
    rest.strip_prefix(b"/")
}

fn trim_trailing_slash(path: &[u8]) -> &[u8] {
    path.strip_suffix(b"/").unwrap_or(path)
}

/// Joins an absolute directory and a relative rest (either may be empty).
fn join(dir: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut joined = trim_trailing_slash(dir).to_vec();
    if !rest.is_empty() {
        joined.push(b'/');
        joined.extend_from_slice(rest);
    }
    if joined.is_empty() {
        joined.push(b'/');
    }
    joined
}

/// Decodes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut idx = 0;
    while idx < field.len() {
        if field[idx] == b'\\'
            && let Some(digits) = field.get(idx + 1..idx + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                idx += 4;
                continue;
            }
        }
        out.push(field[idx]);
        idx += 1;
    }
    out
}

/// Parses the text of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    text.split(|b| *b == b'\n')
        .filter_map(parse_mountinfo_line)
        .collect()
}

fn parse_mountinfo_line(line: &[u8]) -> Option<MountEntry> {
    let mut fields = line.split(|b| *b == b' ');
    let number = |field: &[u8]| std::str::from_utf8(field).ok()?.parse::<u64>().ok();
    let mount_id = number(fields.next()?)?;
    let parent_id = number(fields.next()?)?;
    let (major, minor) = std::str::from_utf8(fields.next()?).ok()?.split_once(':')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let options = fields.next()?;
    let read_only = options.split(|b| *b == b',').any(|option| option == b"ro");
    Some(MountEntry {
        mount_id,
        parent_id,
        dev,
        root,
        mount_point,
        read_only,
    })
}

/// Reads the calling thread's mount table.
///
/// # Errors
/// The read of `/proc/thread-self/mountinfo` failed.
pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read(
        "/proc/thread-self/mountinfo",
    )?))
}

/// The mount table by mount id, re-read when an unknown mount id shows up.
#[derive(Debug, Default)]
pub struct MountTable {
    by_id: HashMap<u64, MountEntry>,
}

impl MountTable {
    /// Reads the calling thread's mount table.
    ///
    /// # Errors
    /// As [`read_mountinfo`].
    pub fn load() -> io::Result<Self> {
        let mut table = MountTable::default();
        table.refresh()?;
        Ok(table)
    }

    fn refresh(&mut self) -> io::Result<()> {
        self.by_id = read_mountinfo()?
            .into_iter()
            .map(|entry| (entry.mount_id, entry))
            .collect();
        Ok(())
    }

    fn entry(&mut self, mount_id: u64) -> io::Result<Option<&MountEntry>> {
        if !self.by_id.contains_key(&mount_id) {
            self.refresh()?;
        }
        Ok(self.by_id.get(&mount_id))
    }

    /// Where the file open as `fd` lives in its file system; `None` when its
    /// name is not reachable from this thread's root (another namespace, a
    /// detached mount, an anonymous inode).
    ///
    /// # Errors
    /// `statx`, `readlink` or the mount table read failed.
    pub fn locate(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<FsLocation>> {
        let stat = rustix::fs::statx(
            fd.as_fd(),
            c"",
            AtFlags::EMPTY_PATH,
            StatxFlags::MNT_ID | StatxFlags::NLINK,
        )?;
        let mut name =
            rustix::fs::readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()), Vec::new())?
                .into_bytes();
        if stat.stx_nlink == 0
            && let Some(stripped) = name.strip_suffix(DELETED_SUFFIX)
        {
            name = stripped.to_vec();
        }
        if !name.starts_with(b"/") {
            return Ok(None);
        }
        let Some(mount) = self.entry(stat.stx_mnt_id)? else {
            return Ok(None);
        };
        let Some(within_mount) = strip_dir_prefix(&name, &mount.mount_point) else {
            return Ok(None);
        };
        Ok(Some(FsLocation {
            dev: (stat.stx_dev_major, stat.stx_dev_minor),
            path_in_fs: join(&mount.root, within_mount),
        }))
    }
}

/// A replicated directory as the guard compares against it.
#[derive(Debug, Clone)]
pub struct GuardedLocation {
    /// The directory's index in the module's list.
    pub index: u16,
    /// Where it lives.
    pub location: FsLocation,
}

/// Which replicated directory `file` is in and its path there; `None` when it is in none.
pub fn classify(file: &FsLocation, dirs: &[GuardedLocation]) -> Option<(u16, RelPath)> {
    dirs.iter().find_map(|dir| {
        let rest = file.relative_to(&dir.location)?;
        // A name that is not a valid relative path (cannot happen for a real
        // file) counts as "the whole directory" so that nothing is missed.
        let path = RelPath::parse(&rest).unwrap_or_else(|_| RelPath::root());
        Some((dir.index, path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 0:40 / /srv/fs rw,nosuid shared:20 - tmpfs tmpfs rw
36 22 0:40 /data /mnt/elsewhere\\040copy rw shared:20 - tmpfs tmpfs rw
37 35 0:40 /data /srv/fs/data ro master:3 - tmpfs tmpfs rw
garbage line
";

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes_and_the_read_only_option() {
        let entries = parse_mountinfo(SAMPLE);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[2].mount_point, b"/mnt/elsewhere copy");
        assert_eq!(entries[2].root, b"/data");
        assert_eq!(entries[2].dev, (0, 40));
        assert!(!entries[2].read_only);
        assert!(entries[3].read_only);
        assert_eq!(entries[3].parent_id, 35);
    }

    #[test]
    fn paths_through_a_bind_mount_and_the_original_mount_meet_in_the_file_system() {
        let dir = GuardedLocation {
            index: 3,
            location: FsLocation {
                dev: (0, 40),
                path_in_fs: join(b"/", b"data"),
            },
        };
        // Reached through a bind mount of `/data` elsewhere: root `/data`, rest `sub/f`.
        let through_bind = FsLocation {
            dev: (0, 40),
            path_in_fs: join(b"/data", b"sub/f"),
        };
        let (index, path) = classify(&through_bind, std::slice::from_ref(&dir)).expect("inside");
        assert_eq!(index, 3);
        assert_eq!(path.to_bytes(), b"sub/f");
        let sibling = FsLocation {
            dev: (0, 40),
            path_in_fs: b"/database/f".to_vec(),
        };
        assert_eq!(classify(&sibling, std::slice::from_ref(&dir)), None);
        let other_fs = FsLocation {
            dev: (8, 1),
            path_in_fs: b"/data/f".to_vec(),
        };
        assert_eq!(classify(&other_fs, std::slice::from_ref(&dir)), None);
        let whole_fs = GuardedLocation {
            index: 0,
            location: FsLocation {
                dev: (0, 40),
                path_in_fs: b"/".to_vec(),
            },
        };
        let (_, path) = classify(&sibling, &[whole_fs]).expect("inside the root");
        assert_eq!(path.to_bytes(), b"database/f");
    }
}
