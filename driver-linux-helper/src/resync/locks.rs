//! The lock table that makes "read a block, ship it" atomic with respect to live writes.
//!
//! Both the FUSE file system and the resync engine change the replica only
//! through the one ordered replication stream. Order in the stream is only
//! meaningful if, for one file, "change (or read) locally" and "enqueue the
//! operation" happen as one step: otherwise the resync could read a block,
//! a live write could change it locally and ship itself, and the resync's
//! older copy of the block would then arrive after it and win. [`FileLocks`]
//! provides that step:
//!
//! - [`FileLocks::data`]`(dir, path)` — for every operation that changes a
//!   file's content or attributes (write, truncate, fallocate, setattr,
//!   xattrs): hold the guard from before the local change until the operation
//!   was handed to the replicator (`replicate()` returned). It takes the
//!   namespace lock shared and one of [`STRIPES`] mutexes chosen by hashing
//!   `(dir, path)` (a collision only costs some false sharing).
//! - [`FileLocks::namespace`]`()` — for every operation that creates, removes
//!   or renames names (create, mknod, mkdir, symlink, link, unlink, rmdir,
//!   rename): hold it exclusively the same way, and report a successful
//!   rename or removal on the guard ([`NamespaceGuard::renamed`],
//!   [`NamespaceGuard::removed`]) before dropping it.
//!
//! The resync engine takes the same locks around (read block, enqueue write)
//! and around (check the primary lacks a name, enqueue its removal). A file
//! whose resync is in progress is *tracked*: a rename reported on the
//! namespace guard moves the tracked path (also when a parent directory is
//! renamed), so the resync goes on under the new name, and a removal (or a
//! rename over it) marks it vanished, so its resync stops; the live rename or
//! unlink already in the stream then decides the replica's state.
//!
//! A file renamed *before* its resync began (or a directory renamed before
//! its subtree was compared) would carry the replica's stale copy to the new
//! name, where the resync may already have passed. While a resync runs, the
//! table therefore knows which names are still *at risk* (not yet brought up
//! to date: in a full resync every name until finished, in an incremental one
//! the recorded names and everything beneath recorded directories) and
//! collects the new name of every rename of an at-risk name for a re-check at
//! the end; a rename of a name already finished moves its status with it, so
//! an application that keeps renaming does not keep the resync from ending.
//! A create reported with [`NamespaceGuard::created`] is in sync from birth:
//! the FUSE layer must ship `Create { exclusive: true }` when it created the
//! file, so that a stale name on the replica fails (and is recorded dirty)
//! instead of being reused.
//!
//! Lock order: a FUSE thread that has its own locks takes them first, then
//! these. No thread holds a data guard while taking [`FileLocks::namespace`],
//! and no thread takes a second data guard while holding one (the namespace
//! lock is a writer-preferring `RwLock`; re-entering it shared could deadlock).
//! Hard links are not supported (as in SafeKit): two names of one inode are
//! two files here.

use std::collections::BTreeSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use safekit_protocol::replication::{RelPath, rename_flags};

/// Number of data mutexes.
pub const STRIPES: usize = 256;

/// The lock table of one module (shared by its FUSE mounts and its resync engine).
#[derive(Debug)]
pub struct FileLocks {
    namespace: RwLock<()>,
    stripes: Vec<Mutex<()>>,
    tracked: Mutex<Vec<Arc<Tracked>>>,
    collect: Mutex<Option<Collect>>,
}

/// A name as an ordered key: the names beneath a directory sort right after it.
type NameKey = (u16, Vec<Vec<u8>>);

fn key(dir: u16, path: &RelPath) -> NameKey {
    (dir, path.components().to_vec())
}

/// What a running resync needs to hear about renames.
#[derive(Debug)]
struct Collect {
    /// Finished names (full resync) or names still to do (incremental).
    set: BTreeSet<NameKey>,
    set_means_synced: bool,
    recheck: Vec<(u16, RelPath)>,
}

impl Collect {
    /// Whether `path` (or, for a directory, something beneath it) may still be stale on the replica.
    fn at_risk(&self, dir: u16, path: &RelPath) -> bool {
        if self.set_means_synced {
            return !self.set.contains(&key(dir, path));
        }
        let components = path.components();
        (0..=components.len()).any(|depth| self.set.contains(&(dir, components[..depth].to_vec())))
            || !self.under(dir, path).is_empty()
    }

    /// The entries at or beneath `path`.
    fn under(&self, dir: u16, path: &RelPath) -> Vec<NameKey> {
        let prefix = path.components();
        self.set
            .range((Bound::Included(key(dir, path)), Bound::Unbounded))
            .take_while(|(d, components)| *d == dir && components.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn set_status(&mut self, dir: u16, path: &RelPath, at_risk: bool) {
        if at_risk != self.set_means_synced {
            self.set.insert(key(dir, path));
        } else {
            self.set.remove(&key(dir, path));
        }
    }

    /// Forgets every entry at or beneath `path`.
    fn forget_under(&mut self, dir: u16, path: &RelPath) {
        for entry in self.under(dir, path) {
            self.set.remove(&entry);
        }
    }
}

/// A file whose resync is in progress; its current name follows renames.
#[derive(Debug)]
pub(crate) struct Tracked {
    dir: u16,
    state: Mutex<TrackedState>,
}

#[derive(Debug)]
struct TrackedState {
    path: RelPath,
    vanished: bool,
}

/// Held around a data change and its `replicate()` call.
#[derive(Debug)]
pub struct DataGuard<'a> {
    // Field order is drop order: the stripe is released before the namespace.
    _stripe: MutexGuard<'a, ()>,
    _namespace: RwLockReadGuard<'a, ()>,
}

/// Held around a change of names and its `replicate()` call.
#[derive(Debug)]
pub struct NamespaceGuard<'a> {
    locks: &'a FileLocks,
    _namespace: RwLockWriteGuard<'a, ()>,
}

/// The namespace held shared without a file (the resync's removal checks).
#[derive(Debug)]
pub(crate) struct SharedNamespace<'a> {
    _namespace: RwLockReadGuard<'a, ()>,
}

impl Default for FileLocks {
    fn default() -> Self {
        Self::new()
    }
}

fn is_under(path: &RelPath, prefix: &RelPath) -> bool {
    path.components().starts_with(prefix.components())
}

fn rebase(path: &RelPath, from: &RelPath, to: &RelPath) -> Option<RelPath> {
    let mut components = to.components().to_vec();
    components.extend_from_slice(&path.components()[from.components().len()..]);
    RelPath::from_components(components).ok()
}

impl FileLocks {
    /// An empty table.
    pub fn new() -> Self {
        FileLocks {
            namespace: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            tracked: Mutex::new(Vec::new()),
            collect: Mutex::new(None),
        }
    }

    fn stripe(&self, dir: u16, path: &RelPath) -> MutexGuard<'_, ()> {
        let mut hasher = DefaultHasher::new();
        (dir, path).hash(&mut hasher);
        let index = (hasher.finish() % STRIPES as u64) as usize;
        self.stripes[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks file `path` of replicated directory `dir` for a data change.
    pub fn data(&self, dir: u16, path: &RelPath) -> DataGuard<'_> {
        let namespace = self
            .namespace
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        DataGuard {
            _stripe: self.stripe(dir, path),
            _namespace: namespace,
        }
    }

    /// Locks the names of every replicated directory for a change of names.
    pub fn namespace(&self) -> NamespaceGuard<'_> {
        NamespaceGuard {
            locks: self,
            _namespace: self
                .namespace
                .write()
                .unwrap_or_else(PoisonError::into_inner),
        }
    }

    pub(crate) fn shared_namespace(&self) -> SharedNamespace<'_> {
        SharedNamespace {
            _namespace: self
                .namespace
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Starts following `path` (its resync begins).
    pub(crate) fn track(&self, dir: u16, path: &RelPath) -> Arc<Tracked> {
        let tracked = Arc::new(Tracked {
            dir,
            state: Mutex::new(TrackedState {
                path: path.clone(),
                vanished: false,
            }),
        });
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&tracked));
        tracked
    }

    /// Stops following a file.
    pub(crate) fn untrack(&self, tracked: &Arc<Tracked>) {
        self.tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|other| !Arc::ptr_eq(other, tracked));
    }

    /// Locks a tracked file under its current name; `None` when it vanished.
    pub(crate) fn lock_tracked(&self, tracked: &Tracked) -> Option<(DataGuard<'_>, RelPath)> {
        let namespace = self
            .namespace
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let path = {
            let state = tracked.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.vanished {
                return None;
            }
            state.path.clone()
        };
        Some((
            DataGuard {
                _stripe: self.stripe(tracked.dir, &path),
                _namespace: namespace,
            },
            path,
        ))
    }

    /// A resync starts: `pending` are the names to bring up to date
    /// (incremental), or `None` for "every name" (full).
    pub(crate) fn start_collecting(&self, pending: Option<Vec<(u16, RelPath)>>) {
        let collect = match pending {
            Some(pending) => Collect {
                set: pending.iter().map(|(dir, path)| key(*dir, path)).collect(),
                set_means_synced: false,
                recheck: Vec::new(),
            },
            None => Collect {
                set: BTreeSet::new(),
                set_means_synced: true,
                recheck: Vec::new(),
            },
        };
        *self.collect.lock().unwrap_or_else(PoisonError::into_inner) = Some(collect);
    }

    /// The resync ended (completed or not).
    pub(crate) fn stop_collecting(&self) {
        *self.collect.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Names to re-check (renamed while at risk), emptied.
    pub(crate) fn take_recheck(&self) -> Vec<(u16, RelPath)> {
        self.collect
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .map(|collect| std::mem::take(&mut collect.recheck))
            .unwrap_or_default()
    }

    /// `path` is up to date on the replica (call with its lock held).
    pub(crate) fn mark_finished(&self, dir: u16, path: &RelPath) {
        if let Some(collect) = self
            .collect
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            collect.set_status(dir, path, false);
        }
    }

    fn for_each_tracked(&self, dir: u16, mut f: impl FnMut(&mut TrackedState)) {
        let tracked = self.tracked.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in tracked.iter().filter(|entry| entry.dir == dir) {
            f(&mut entry.state.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }
}

impl Tracked {
    /// The file's current name; `None` once it vanished. Stable while the
    /// namespace is held (shared or exclusively): only renames and removals,
    /// which hold it exclusively, change it.
    pub(crate) fn current(&self) -> Option<RelPath> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (!state.vanished).then(|| state.path.clone())
    }

    /// Marks the file vanished (its name no longer names it, as far as we can tell).
    pub(crate) fn set_vanished(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .vanished = true;
    }
}

impl NamespaceGuard<'_> {
    /// Reports a successful rename of `from` to `to` with [`rename_flags`].
    pub fn renamed(&self, dir: u16, from: &RelPath, to: &RelPath, flags: u32) {
        let exchange = flags & rename_flags::EXCHANGE != 0;
        if let Some(collect) = self
            .locks
            .collect
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            let from_at_risk = collect.at_risk(dir, from);
            let to_at_risk = collect.at_risk(dir, to);
            if exchange {
                if from_at_risk || to_at_risk {
                    collect.recheck.push((dir, from.clone()));
                    collect.recheck.push((dir, to.clone()));
                    collect.set_status(dir, from, true);
                    collect.set_status(dir, to, true);
                }
            } else {
                // The target's old entries are gone; the source's move with it.
                collect.forget_under(dir, to);
                for entry in collect.under(dir, from) {
                    collect.set.remove(&entry);
                    let mut components = to.components().to_vec();
                    components.extend_from_slice(&entry.1[from.components().len()..]);
                    collect.set.insert((dir, components));
                }
                collect.set_status(dir, to, from_at_risk);
                collect.set_status(dir, from, false);
                if from_at_risk {
                    collect.recheck.push((dir, to.clone()));
                }
            }
        }
        self.locks.for_each_tracked(dir, |state| {
            if state.vanished {
                return;
            }
            if is_under(&state.path, from) {
                if let Some(moved) = rebase(&state.path, from, to) {
                    state.path = moved;
                }
            } else if is_under(&state.path, to) {
                if exchange {
                    if let Some(moved) = rebase(&state.path, to, from) {
                        state.path = moved;
                    }
                } else {
                    state.vanished = true;
                }
            }
        });
    }

    /// Reports a successful create (of a file, directory, node or symlink the
    /// FUSE layer created and shipped as new).
    pub fn created(&self, dir: u16, path: &RelPath) {
        if let Some(collect) = self
            .locks
            .collect
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            collect.set_status(dir, path, false);
        }
    }

    /// Reports a successful unlink or rmdir of `path`.
    pub fn removed(&self, dir: u16, path: &RelPath) {
        if let Some(collect) = self
            .locks
            .collect
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            collect.forget_under(dir, path);
            collect.set_status(dir, path, false);
        }
        self.locks.for_each_tracked(dir, |state| {
            if is_under(&state.path, path) {
                state.vanished = true;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &str) -> RelPath {
        RelPath::parse(path.as_bytes()).expect("valid path")
    }

    #[test]
    fn tracked_files_follow_renames_and_stop_on_removal() {
        let locks = FileLocks::new();
        let moved = locks.track(0, &p("a/file"));
        let replaced = locks.track(0, &p("b"));
        let removed = locks.track(0, &p("c"));
        let other_dir = locks.track(1, &p("a/file"));
        {
            let namespace = locks.namespace();
            namespace.renamed(0, &p("a"), &p("x/y"), 0);
            namespace.renamed(0, &p("d"), &p("b"), 0);
            namespace.removed(0, &p("c"));
        }
        assert_eq!(
            locks.lock_tracked(&moved).map(|(_, path)| path),
            Some(p("x/y/file"))
        );
        assert!(locks.lock_tracked(&replaced).is_none());
        assert!(locks.lock_tracked(&removed).is_none());
        assert_eq!(
            locks.lock_tracked(&other_dir).map(|(_, path)| path),
            Some(p("a/file"))
        );
        let swapped = locks.track(0, &p("m"));
        locks
            .namespace()
            .renamed(0, &p("n"), &p("m"), rename_flags::EXCHANGE);
        assert_eq!(
            locks.lock_tracked(&swapped).map(|(_, path)| path),
            Some(p("n"))
        );
    }

    #[test]
    fn renames_of_names_not_yet_up_to_date_are_collected_for_a_recheck() {
        let locks = FileLocks::new();
        // Full resync: every name is at risk until finished.
        locks.start_collecting(None);
        locks.mark_finished(0, &p("done"));
        {
            let namespace = locks.namespace();
            namespace.renamed(0, &p("done"), &p("done2"), 0);
            namespace.renamed(0, &p("todo"), &p("todo2"), 0);
            namespace.created(0, &p("new"));
            namespace.renamed(0, &p("new"), &p("new2"), 0);
        }
        assert_eq!(locks.take_recheck(), vec![(0, p("todo2"))]);
        // The finished status moved with the name.
        locks.namespace().renamed(0, &p("done2"), &p("done3"), 0);
        assert_eq!(locks.take_recheck(), vec![]);

        // Incremental: only the recorded names (and what is beneath recorded directories).
        locks.start_collecting(Some(vec![(0, p("dirty")), (0, p("tree"))]));
        {
            let namespace = locks.namespace();
            namespace.renamed(0, &p("clean"), &p("clean2"), 0);
            namespace.renamed(0, &p("tree/child"), &p("elsewhere"), 0);
            namespace.renamed(0, &p("a/b"), &p("dirty"), 0);
        }
        assert_eq!(locks.take_recheck(), vec![(0, p("elsewhere"))]);
        locks.mark_finished(0, &p("elsewhere"));
        locks.stop_collecting();
        locks.namespace().renamed(0, &p("tree"), &p("tree2"), 0);
        assert_eq!(locks.take_recheck(), vec![]);
    }
}
