//! The inode store: what the kernel's node ids stand for beneath the underlying directory.
//!
//! Each entry holds an `O_PATH | O_NOFOLLOW` descriptor of one underlying inode
//! (never a path), the number of kernel lookups that reference it, and the
//! names it is known under (parent node id + name), from which its
//! [`RelPath`] is computed when an operation must be replicated.
//!
//! Node ids: for inodes on the underlying directory's own file system the node
//! id is the underlying inode number (so `st_ino` and `d_ino` seen through the
//! mount equal those of the plain directory, and hard links share one entry);
//! the root is node 1, as FUSE requires; inodes on another file system mounted
//! beneath the directory get synthetic ids with the high bit set. An inode
//! number cannot be reused while its entry exists, because the entry's
//! descriptor keeps the inode alive.
//!
//! Invariant: the names of an entry are only read or changed while the file
//! system's namespace lock is held (shared for reading and for adding a name
//! found by lookup, exclusive for rename/unlink/link/create), so a computed
//! path and the replicated operation that uses it agree with the tree.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustix::fs::FileType;
use safekit_protocol::replication::RelPath;

/// The FUSE node id of the root directory.
pub const ROOT_ID: u64 = 1;

/// First synthetic node id for inodes of another file system beneath the directory.
const FOREIGN_BASE: u64 = 1 << 63;

/// One name of an inode: the parent directory's node id and the entry name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Node id of the parent directory.
    pub parent: u64,
    /// Name inside the parent.
    pub name: Vec<u8>,
}

/// One underlying inode known to the kernel.
#[derive(Debug)]
pub struct Inode {
    /// The kernel's node id for it.
    pub nodeid: u64,
    /// `O_PATH | O_NOFOLLOW` descriptor of the underlying inode.
    pub fd: OwnedFd,
    /// (st_ino, st_dev) of the underlying inode.
    pub key: (u64, u64),
    /// The file type (fixed for the life of an inode).
    pub kind: FileType,
    lookups: AtomicU64,
    links: Mutex<Vec<Link>>,
    /// Serializes "change the local file, then enqueue its replication" per
    /// inode, so that two changes to one file reach the peer in the order they
    /// were applied locally.
    pub op_lock: Mutex<()>,
    /// An operation on this inode was replicated without durability since the
    /// last durable confirmation: an fsync must ask the peer again.
    pub needs_durable: AtomicBool,
    /// The fsync-only mode shipped writes of this inode without waiting: a
    /// close must wait until the peer applied them.
    pub unconfirmed_writes: AtomicBool,
    /// Checked since its last attribute change: no set-id bits, no file
    /// capabilities (so a write by an unprivileged caller has nothing to clear).
    pub privs_clear: AtomicBool,
    /// Data changes moved the mtime since it was last shipped (at close or fsync).
    pub mtime_dirty: AtomicBool,
}

impl Inode {
    /// The names this inode is known under.
    pub fn links(&self) -> Vec<Link> {
        self.links
            .lock()
            .expect("inode links lock poisoned")
            .clone()
    }

    /// Adds a name (no-op when already known).
    pub fn add_link(&self, parent: u64, name: &[u8]) {
        let mut links = self.links.lock().expect("inode links lock poisoned");
        if !links.iter().any(|l| l.parent == parent && l.name == name) {
            links.push(Link {
                parent,
                name: name.to_vec(),
            });
        }
    }

    /// Forgets a name (after unlink or as the source of a rename).
    pub fn remove_link(&self, parent: u64, name: &[u8]) {
        let mut links = self.links.lock().expect("inode links lock poisoned");
        links.retain(|l| !(l.parent == parent && l.name == name));
    }

    /// Replaces a name by another (rename).
    pub fn move_link(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8]) {
        let mut links = self.links.lock().expect("inode links lock poisoned");
        links.retain(|l| !(l.parent == parent && l.name == name));
        if !links
            .iter()
            .any(|l| l.parent == new_parent && l.name == new_name)
        {
            links.push(Link {
                parent: new_parent,
                name: new_name.to_vec(),
            });
        }
    }
}

/// Maps node ids to inodes; see the module documentation.
#[derive(Debug)]
pub struct InodeStore {
    map: RwLock<HashMap<u64, Arc<Inode>>>,
    foreign: Mutex<HashMap<(u64, u64), u64>>,
    next_foreign: AtomicU64,
    root_key: (u64, u64),
}

impl InodeStore {
    /// A store holding the root directory (its lookup count never drops).
    pub fn new(root_fd: OwnedFd, root_key: (u64, u64)) -> Self {
        let root = Arc::new(Inode {
            nodeid: ROOT_ID,
            fd: root_fd,
            key: root_key,
            kind: FileType::Directory,
            lookups: AtomicU64::new(1 << 40),
            links: Mutex::new(Vec::new()),
            op_lock: Mutex::new(()),
            needs_durable: AtomicBool::new(false),
            unconfirmed_writes: AtomicBool::new(false),
            privs_clear: AtomicBool::new(false),
            mtime_dirty: AtomicBool::new(false),
        });
        let mut map = HashMap::new();
        map.insert(ROOT_ID, root);
        InodeStore {
            map: RwLock::new(map),
            foreign: Mutex::new(HashMap::new()),
            next_foreign: AtomicU64::new(FOREIGN_BASE + 2),
            root_key,
        }
    }

    /// The inode behind a node id, if the kernel still references it.
    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.map
            .read()
            .expect("inode map lock poisoned")
            .get(&nodeid)
            .cloned()
    }

    /// Number of inodes the kernel references.
    pub fn len(&self) -> usize {
        self.map.read().expect("inode map lock poisoned").len()
    }

    /// Whether only the root is known.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }

    fn nodeid_for(&self, key: (u64, u64)) -> u64 {
        if key == self.root_key {
            return ROOT_ID;
        }
        let (ino, dev) = key;
        if dev == self.root_key.1 && ino > ROOT_ID && ino < FOREIGN_BASE {
            return ino;
        }
        let mut foreign = self.foreign.lock().expect("foreign id lock poisoned");
        *foreign
            .entry(key)
            .or_insert_with(|| self.next_foreign.fetch_add(1, Ordering::Relaxed))
    }

    /// The entry of the underlying inode `key`, if the kernel references it.
    pub fn find(&self, key: (u64, u64)) -> Option<Arc<Inode>> {
        let nodeid = if key == self.root_key {
            ROOT_ID
        } else if key.1 == self.root_key.1 && key.0 > ROOT_ID && key.0 < FOREIGN_BASE {
            key.0
        } else {
            *self
                .foreign
                .lock()
                .expect("foreign id lock poisoned")
                .get(&key)?
        };
        self.get(nodeid).filter(|inode| inode.key == key)
    }

    /// Records one kernel lookup of the inode `fd` (with `key` and `kind`),
    /// found as `name` in `parent`; returns its entry. When the inode is
    /// already known, `fd` is dropped and the existing entry gains a lookup.
    pub fn lookup(
        &self,
        fd: OwnedFd,
        key: (u64, u64),
        kind: FileType,
        parent: u64,
        name: &[u8],
    ) -> Arc<Inode> {
        let nodeid = self.nodeid_for(key);
        let mut map = self.map.write().expect("inode map lock poisoned");
        if let Some(existing) = map.get(&nodeid)
            && existing.key == key
        {
            existing.lookups.fetch_add(1, Ordering::Relaxed);
            existing.add_link(parent, name);
            return existing.clone();
        }
        let inode = Arc::new(Inode {
            nodeid,
            fd,
            key,
            kind,
            lookups: AtomicU64::new(1),
            links: Mutex::new(vec![Link {
                parent,
                name: name.to_vec(),
            }]),
            op_lock: Mutex::new(()),
            needs_durable: AtomicBool::new(false),
            unconfirmed_writes: AtomicBool::new(false),
            privs_clear: AtomicBool::new(false),
            mtime_dirty: AtomicBool::new(false),
        });
        map.insert(nodeid, inode.clone());
        inode
    }

    /// The kernel dropped `n` lookups of `nodeid`; the entry goes away at zero.
    pub fn forget(&self, nodeid: u64, n: u64) {
        if nodeid == ROOT_ID {
            return;
        }
        let mut map = self.map.write().expect("inode map lock poisoned");
        let gone = match map.get(&nodeid) {
            Some(inode) => {
                let before = inode.lookups.load(Ordering::Relaxed);
                let after = before.saturating_sub(n);
                inode.lookups.store(after, Ordering::Relaxed);
                after == 0
            }
            None => false,
        };
        if gone {
            // The Arc may live on in an open handle; its descriptor closes with the last one.
            map.remove(&nodeid);
        }
    }

    /// The path of `inode` relative to the root, through any of its names whose
    /// ancestors are all still known; `None` when it has no such name (an
    /// unlinked file still open, for example).
    pub fn path_of(&self, inode: &Inode) -> Option<RelPath> {
        if inode.nodeid == ROOT_ID {
            return Some(RelPath::root());
        }
        let map = self.map.read().expect("inode map lock poisoned");
        'links: for link in inode.links() {
            let mut components = vec![link.name.clone()];
            let mut parent = link.parent;
            // Bounded walk: a cycle would be a bug, never loop forever on it.
            for _ in 0..4096 {
                if parent == ROOT_ID {
                    components.reverse();
                    return RelPath::from_components(components).ok();
                }
                let Some(dir) = map.get(&parent) else {
                    continue 'links;
                };
                let Some(up) = dir.links().into_iter().next() else {
                    continue 'links;
                };
                components.push(up.name);
                parent = up.parent;
            }
        }
        None
    }

    /// The path of the entry `name` inside directory `parent`.
    pub fn child_path(&self, parent: &Inode, name: &[u8]) -> Option<RelPath> {
        self.path_of(parent)?.join(name).ok()
    }
}
