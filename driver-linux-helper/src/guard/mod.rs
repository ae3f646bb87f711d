//! The guard of the replicated directories: nothing may change them behind the
//! interceptor's back.
//!
//! The FUSE mount over a replicated directory sees every change made through
//! the directory's path, but not changes that reach the underlying file
//! system another way. Two such ways exist on a primary: a process that kept
//! a file (or a directory) open from before the mount went over the directory
//! (its descriptor points beneath the mount), and another mount of the same
//! file system (a bind mount of the directory elsewhere, the block device
//! mounted twice). On a secondary, any process but the receiver writing into
//! the replica makes it diverge from the primary.
//!
//! - [`PrimaryGuard`] watches the underlying file system with fanotify and
//!   either records every file written by a process other than the daemon in
//!   the [`DirtyLog`](crate::dirty::DirtyLog), so the next resync heals it
//!   ([`GuardPolicy::Record`]), or refuses such processes the opening of the
//!   replicated files ([`GuardPolicy::Deny`]). See [`primary`] for what each
//!   policy can and cannot see.
//! - [`SecondaryGuard`] makes each replicated directory read-only for every
//!   process with a read-only bind mount of the directory over itself, after
//!   the receiver opened its directory descriptors; the receiver works beneath
//!   those descriptors (the original, writable mount) and keeps writing.
//!
//! fanotify is used through `nix`'s safe API where it reaches ([`sys`]):
//! `fanotify-rs` lacks filesystem marks with permission classes, responses
//! and the info records of file-handle groups. nix does not parse info
//! records either, so [`sys`] parses those bytes itself and calls
//! `open_by_handle_at` through `libc` (the guard's only `unsafe`, with its
//! `SAFETY` argument). Mapping an event back to a replicated directory,
//! whatever mount it came through, is [`location`]'s job.
//!
//! Order at start: on a primary, open the underlying directory, engage the
//! [`PrimaryGuard`], then mount over the directory and start the
//! application (descriptors opened before the guard can be recorded but not
//! refused). On a secondary, [`SecondaryGuard::remove_leftovers`], open the
//! receiver's descriptors, then [`SecondaryGuard::engage`]; release it before
//! mounting over the directory to become primary.

pub mod location;
pub mod primary;
pub mod secondary;
pub mod sys;

use std::io;
use std::path::PathBuf;

use safekit_protocol::replication::RelPath;

pub use primary::{GuardStats, PrimaryGuard, PrimaryGuardOptions};
pub use secondary::SecondaryGuard;

/// What the primary's guard does with a write that bypasses the interceptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuardPolicy {
    /// Let it happen, record the file in the dirty log, report it.
    #[default]
    Record,
    /// Refuse other processes the opening of replicated files (`EPERM`), report it;
    /// writes through descriptors opened before the guard are still recorded.
    Deny,
}

impl std::str::FromStr for GuardPolicy {
    type Err = String;

    /// `record` or `deny` (as a configuration or command-line value).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "record" => Ok(GuardPolicy::Record),
            "deny" => Ok(GuardPolicy::Deny),
            other => Err(format!(
                "unknown guard policy {other:?} (expected \"record\" or \"deny\")"
            )),
        }
    }
}

impl std::fmt::Display for GuardPolicy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            GuardPolicy::Record => "record",
            GuardPolicy::Deny => "deny",
        })
    }
}

/// One access that bypassed the interceptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardEvent {
    /// The process (thread group) that made it; 0 for a lost-events report
    /// (fanotify queue overflow), which names the directory's root.
    pub pid: u32,
    /// The replicated directory's index.
    pub dir: u16,
    /// The file beneath it.
    pub path: RelPath,
    /// Whether the access was refused (it then changed nothing).
    pub denied: bool,
}

/// Why a guard could not be engaged or released.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// fanotify refused (no `CAP_SYS_ADMIN`, a kernel without the events asked for).
    #[error("fanotify: {0}")]
    Fanotify(#[source] io::Error),
    /// A replicated directory could not be examined.
    #[error("replicated directory {path}: {source}")]
    Dir {
        /// The directory (or the descriptor's name).
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A directory descriptor's name is not reachable from this mount namespace.
    #[error("replicated directory {0} is not reachable from this mount namespace")]
    Unreachable(PathBuf),
    /// A mount or unmount was refused.
    #[error("{action} {path}: {source}")]
    Mount {
        /// What was tried.
        action: &'static str,
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The reader thread could not be started.
    #[error("cannot start the guard thread: {0}")]
    Thread(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_back_what_they_print() {
        for policy in [GuardPolicy::Record, GuardPolicy::Deny] {
            assert_eq!(policy.to_string().parse::<GuardPolicy>(), Ok(policy));
        }
        assert!("refuse".parse::<GuardPolicy>().is_err());
    }
}
