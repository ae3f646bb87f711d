//! Running one request's file system calls with the caller's credentials.
//!
//! The kernel already checked the caller's permissions against the mount
//! (`default_permissions`, with the caller's full credentials). The daemon then
//! performs creating and changing calls with the caller's fsuid/fsgid, on the
//! worker thread only, so that new files get the caller's ownership and the
//! underlying file system applies the same rules a second time (sticky
//! directories, set-group-id directories, protected hard links).
//!
//! Supplementary groups are not in the FUSE request header. Reading them from
//! `/proc/<pid>/status` costs more than many requests, so a call first runs
//! with the primary group only; if it fails with `EACCES`/`EPERM` (which leaves
//! nothing changed), the caller's supplementary groups are read and set on the
//! thread and the call runs once more. The kernel's own check stays the
//! authority: the retry can only make the underlying file system agree with a
//! decision the kernel already took with the caller's real groups.

use std::io;

use crate::sys::ThreadCredsGuard;

/// Runs `f` with the caller's file system credentials (see the module docs).
///
/// # Errors
/// The error of `f`, or `EPERM` when the thread's credentials could not be switched.
pub fn as_caller<T>(
    uid: u32,
    gid: u32,
    pid: u32,
    mut f: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    if uid == 0 && gid == 0 {
        return f();
    }
    let mut guard = ThreadCredsGuard::switch(uid, gid)?;
    match f() {
        Err(error)
            if uid != 0 && matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
        {
            let groups = caller_groups(pid);
            if groups.iter().any(|g| *g != gid) {
                guard.set_groups(&groups)?;
                f()
            } else {
                Err(error)
            }
        }
        other => other,
    }
}

/// The supplementary groups of process (or thread) `pid`, empty if unknown.
fn caller_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line_is_parsed() {
        let status =
            "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 1000 \nVmPeak:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 24, 1000]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
    }
}
