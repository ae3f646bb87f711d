//! The small unsafe wrappers the FUSE data path needs, and nothing else.
//!
//! Everything else in the crate is safe code over `rustix`/`nix`; what those
//! crates do not cover lives here, one syscall per function, each with its
//! `// SAFETY:` argument. Today that is the per-thread switch of the file
//! system credentials (`setfsuid`/`setfsgid`), which `rustix` does not offer.
//!
//! Why `setfsuid`/`setfsgid` as raw syscalls: the kernel keeps credentials per
//! thread, but glibc's `setresuid`/`setgroups` broadcast the change to every
//! thread of the process (POSIX semantics), which would make one request's
//! caller the owner of every other worker's files. The file system ids only
//! govern permission checks and the owner of new files, which is exactly what a
//! file server needs, and they never touch the signal or ptrace identity of the
//! daemon. Changing the fsuid away from 0 drops the file capabilities
//! (`CAP_DAC_OVERRIDE`, `CAP_CHOWN`, `CAP_FOWNER`...) from the effective set of
//! this thread; switching back to 0 restores them.

use rustix::process::{Gid, Uid};

/// Sets the calling thread's file system user id and returns the previous one.
fn set_thread_fsuid(uid: u32) -> u32 {
    // SAFETY: `setfsuid` takes one integer argument, touches no memory of ours,
    // and only changes the calling thread's credentials (raw syscall, not the
    // glibc broadcast). It cannot fail in a way that leaves memory unsafe; it
    // returns the previous fsuid.
    let previous = unsafe { libc::syscall(libc::SYS_setfsuid, libc::c_long::from(uid)) };
    // The kernel returns the previous id, which always fits in 32 bits.
    u32::try_from(previous).unwrap_or(u32::MAX)
}

/// Sets the calling thread's file system group id and returns the previous one.
fn set_thread_fsgid(gid: u32) -> u32 {
    // SAFETY: as for `set_thread_fsuid`: one integer argument, no memory, the
    // calling thread only.
    let previous = unsafe { libc::syscall(libc::SYS_setfsgid, libc::c_long::from(gid)) };
    u32::try_from(previous).unwrap_or(u32::MAX)
}

/// The calling thread's current file system ids, read without changing them.
fn current_fs_ids() -> (u32, u32) {
    // `setfsuid(-1)` is the documented way to read the current value: an
    // invalid id is refused and the current one returned.
    (set_thread_fsuid(u32::MAX), set_thread_fsgid(u32::MAX))
}

/// While alive, the calling thread acts on files as another user (fsuid/fsgid,
/// and optionally supplementary groups); dropping it switches back.
///
/// The guard must be dropped on the thread that created it (it is `!Send`).
#[derive(Debug)]
pub struct ThreadCredsGuard {
    saved_uid: u32,
    saved_gid: u32,
    saved_groups: Option<Vec<Gid>>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl ThreadCredsGuard {
    /// Switches the calling thread to `uid`/`gid` for file system access.
    ///
    /// The group is switched first and restored last: once the fsuid is not 0
    /// the thread may have lost the capabilities a later change would need.
    ///
    /// # Errors
    /// `EPERM` when the kernel refused the change (the process lacks
    /// `CAP_SETUID`/`CAP_SETGID`); the thread's ids are then unchanged.
    pub fn switch(uid: u32, gid: u32) -> std::io::Result<Self> {
        let (saved_uid, saved_gid) = current_fs_ids();
        set_thread_fsgid(gid);
        if current_fs_ids().1 != gid {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        set_thread_fsuid(uid);
        if current_fs_ids().0 != uid {
            set_thread_fsgid(saved_gid);
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(ThreadCredsGuard {
            saved_uid,
            saved_gid,
            saved_groups: None,
            _not_send: std::marker::PhantomData,
        })
    }

    /// Also sets the calling thread's supplementary groups (raw `setgroups`,
    /// this thread only); they are restored when the guard drops.
    ///
    /// # Errors
    /// The `setgroups` error (`EPERM` without `CAP_SETGID`, `EINVAL` for too many groups).
    pub fn set_groups(&mut self, groups: &[u32]) -> std::io::Result<()> {
        if self.saved_groups.is_none() {
            self.saved_groups = Some(rustix::process::getgroups()?);
        }
        let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
        rustix::thread::set_thread_groups(&groups)?;
        Ok(())
    }
}

impl Drop for ThreadCredsGuard {
    fn drop(&mut self) {
        if let Some(groups) = self.saved_groups.take()
            && let Err(error) = rustix::thread::set_thread_groups(&groups)
        {
            // Continuing with a caller's groups would let later requests act
            // with them: abort, the peer sees a clean loss.
            tracing::error!(%error, "cannot restore the supplementary groups of a worker thread");
            std::process::abort();
        }
        set_thread_fsuid(self.saved_uid);
        set_thread_fsgid(self.saved_gid);
        if current_fs_ids() != (self.saved_uid, self.saved_gid) {
            tracing::error!("cannot restore the file system ids of a worker thread");
            std::process::abort();
        }
    }
}

thread_local! {
    static OWN_UMASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives the calling thread its own file system context (`unshare(CLONE_FS)`:
/// cwd, root and umask) with umask 0, once per thread.
///
/// The FUSE kernel module already applied the caller's umask to every mode it
/// sends, so the worker must create files with exactly that mode; clearing the
/// umask of the whole process would change it for everything else in it (the
/// agent's threads, a test harness).
///
/// # Errors
/// The `unshare` error (`EINVAL`/`ENOMEM`); the thread's umask is then unchanged.
pub fn clear_thread_umask() -> std::io::Result<()> {
    if OWN_UMASK.with(std::cell::Cell::get) {
        return Ok(());
    }
    // SAFETY: only `CLONE_FS` is unshared: this thread gets a private copy of
    // its cwd, root directory and umask. File descriptor tables and memory stay
    // shared, so no descriptor or pointer held anywhere becomes invalid, and the
    // daemon never uses relative paths from the cwd.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }?;
    rustix::process::umask(rustix::fs::Mode::empty());
    OWN_UMASK.with(|own| own.set(true));
    Ok(())
}

/// The effective user id of the process (0 when the helper runs as root).
pub fn effective_uid() -> Uid {
    rustix::process::geteuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_changes_only_the_calling_thread_and_restores() {
        if !effective_uid().is_root() {
            panic!("this test needs root (CI runs as root)");
        }
        let before = current_fs_ids();
        // A thread created before the switch (a new thread would inherit the ids).
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            go_rx.recv().expect("main thread signals");
            current_fs_ids()
        });
        let guard = ThreadCredsGuard::switch(65534, 65534).expect("root may switch");
        assert_eq!(current_fs_ids(), (65534, 65534));
        go_tx.send(()).expect("other thread waits");
        assert_eq!(
            other.join().expect("thread runs"),
            before,
            "another thread keeps its ids"
        );
        drop(guard);
        assert_eq!(current_fs_ids(), before);
    }
}
