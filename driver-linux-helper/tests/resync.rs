//! Reintegration end to end on loopback: a sender and a receiver on two temporary
//! directories, no mount. "Live" application changes are made the way the FUSE
//! layer makes them: under the same [`FileLocks`], the local change, then
//! `replicate()`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use safekit_linux_helper::activity::{ActivityLog, StreamPosition};
use safekit_linux_helper::dirty::{DirtyLog, RANGE_GRANULE};
use safekit_linux_helper::replicator::{ReplicateOutcome, Replicator, WaitFor};
use safekit_linux_helper::resync::{
    FileLocks, ResyncConfig, ResyncEngine, ResyncError, ResyncKind, ResyncOutcome, ResyncStats,
};
use safekit_linux_helper::transport::{Receiver, ReplicationEvent, Role, Sender, SenderConfig};
use safekit_protocol::replication::{Op, RelPath};

const SECRET: &[u8] = b"cluster secret for resync tests";
const MODULE: &str = "mirror";
const PATIENCE: Duration = Duration::from_secs(30);
const BLOCK: u64 = 64 * 1024;

fn p(path: &str) -> RelPath {
    RelPath::parse(path.as_bytes()).expect("valid test path")
}

fn open_dir(path: &Path) -> OwnedFd {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open directory")
}

/// A tiny deterministic PRNG (xorshift64*), so that failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Two directories, a receiver on one, a sender and engine on the other.
struct Pair {
    tmp: tempfile::TempDir,
    primary: PathBuf,
    replica: PathBuf,
    receiver: Option<Receiver>,
    addr: SocketAddr,
    sender: Arc<Sender>,
    events: Mutex<mpsc::Receiver<ReplicationEvent>>,
    locks: Arc<FileLocks>,
}

impl Pair {
    fn new(initial_role: Role) -> Pair {
        let tmp = tempfile::tempdir().expect("tempdir");
        let primary = tmp.path().join("primary");
        let replica = tmp.path().join("replica");
        fs::create_dir(&primary).expect("mkdir primary");
        fs::create_dir(&replica).expect("mkdir replica");
        let receiver =
            Receiver::bind_serving_resync("127.0.0.1:0", SECRET, MODULE, vec![open_dir(&replica)])
                .expect("bind receiver");
        let addr = receiver.local_addr();
        let dirty =
            Arc::new(DirtyLog::open(&tmp.path().join("dirty.log")).expect("open dirty log"));
        let mut config = SenderConfig::new(addr, SECRET, MODULE, dirty);
        config.replication_timeout = Duration::from_secs(10);
        config.initial_role = initial_role;
        let sender = Sender::new(config).expect("sender");
        let events = sender.subscribe();
        let pair = Pair {
            tmp,
            primary,
            replica,
            receiver: Some(receiver),
            addr,
            sender: Arc::new(sender),
            events: Mutex::new(events),
            locks: Arc::new(FileLocks::new()),
        };
        if initial_role == Role::Replicating {
            pair.wait_connected();
        }
        pair
    }

    fn wait_connected(&self) {
        loop {
            match self.events.lock().expect("events").recv_timeout(PATIENCE) {
                Ok(ReplicationEvent::Connected { .. }) => return,
                Ok(_) => {}
                Err(error) => panic!("no connection: {error}"),
            }
        }
    }

    fn replicate_again(&self) {
        self.sender.set_role(Role::Replicating);
        self.wait_connected();
    }

    fn config(&self) -> ResyncConfig {
        let mut config = ResyncConfig::new(self.tmp.path().join("resync.cursor"));
        config.workers = 3;
        config
    }

    fn engine(&self, config: ResyncConfig) -> ResyncEngine {
        ResyncEngine::new(
            config,
            Arc::clone(&self.sender),
            vec![open_dir(&self.primary)],
            Arc::clone(&self.locks),
        )
    }

    fn resync(&self, kind: ResyncKind) -> ResyncStats {
        match self.engine(self.config()).run(kind) {
            Ok(ResyncOutcome::Completed { stats }) => stats,
            Err(error) => panic!("resync failed: {error}"),
        }
    }

    fn local(&self, path: &str) -> PathBuf {
        self.primary.join(path)
    }

    /// A change while the peer is absent: local, then `replicate()` records it as dirty.
    fn alone(&self, op: Op) {
        assert_eq!(
            self.sender.replicate(op, WaitFor::Applied),
            ReplicateOutcome::Alone
        );
    }

    /// A live write, as the FUSE layer does it.
    fn live_write(&self, path: &str, offset: u64, data: &[u8]) -> bool {
        let rel = p(path);
        let _guard = self.locks.data(0, &rel);
        let Ok(file) = fs::OpenOptions::new().write(true).open(self.local(path)) else {
            return false;
        };
        file.write_all_at(data, offset).expect("local write");
        let outcome = self.sender.replicate(
            Op::Write {
                dir: 0,
                path: rel,
                offset,
                data: data.to_vec(),
            },
            WaitFor::Applied,
        );
        assert_live(outcome);
        true
    }

    fn live_create(&self, path: &str, data: &[u8]) {
        let rel = p(path);
        {
            let namespace = self.locks.namespace();
            fs::File::create(self.local(path)).expect("local create");
            fs::set_permissions(self.local(path), fs::Permissions::from_mode(0o640))
                .expect("chmod");
            let outcome = self.sender.replicate(
                Op::Create {
                    dir: 0,
                    path: rel,
                    mode: 0o640,
                    uid: 0,
                    gid: 0,
                    exclusive: true,
                },
                WaitFor::Applied,
            );
            assert_live(outcome);
            namespace.created(0, &p(path));
        }
        assert!(self.live_write(path, 0, data));
    }

    fn live_rename(&self, from: &str, to: &str) {
        let namespace = self.locks.namespace();
        fs::rename(self.local(from), self.local(to)).expect("local rename");
        let outcome = self.sender.replicate(
            Op::Rename {
                dir: 0,
                from: p(from),
                to: p(to),
                flags: 0,
            },
            WaitFor::Applied,
        );
        assert_live(outcome);
        namespace.renamed(0, &p(from), &p(to), 0);
    }

    fn live_unlink(&self, path: &str) {
        let namespace = self.locks.namespace();
        fs::remove_file(self.local(path)).expect("local unlink");
        let outcome = self.sender.replicate(
            Op::Unlink {
                dir: 0,
                path: p(path),
            },
            WaitFor::Applied,
        );
        assert_live(outcome);
        namespace.removed(0, &p(path));
    }
}

/// A live operation is confirmed, or, when the replica could not apply it yet
/// (its directory is not there before the resync created it), recorded dirty
/// for the resync; the sender never leaves `Replicating` in these tests.
fn assert_live(outcome: ReplicateOutcome) {
    assert!(
        matches!(
            outcome,
            ReplicateOutcome::Confirmed | ReplicateOutcome::Alone
        ),
        "{outcome:?}"
    );
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Option<(i64, i64)>,
    rdev: u64,
    content: Vec<u8>,
}

/// Every entry beneath `root` with what a user would compare; `with_times` adds mtimes.
fn snapshot(root: &Path, with_times: bool) -> BTreeMap<PathBuf, Entry> {
    let mut entries = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).expect("lstat");
        let file_type = meta.file_type();
        let (kind, content) = if file_type.is_dir() {
            for child in fs::read_dir(&path).expect("readdir") {
                todo.push(rel.join(child.expect("entry").file_name()));
            }
            ("dir", Vec::new())
        } else if file_type.is_symlink() {
            (
                "symlink",
                fs::read_link(&path)
                    .expect("readlink")
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else if file_type.is_file() {
            ("file", fs::read(&path).expect("read"))
        } else {
            ("special", Vec::new())
        };
        let is_root = rel.as_os_str().is_empty();
        entries.insert(
            rel,
            Entry {
                kind,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                size: if kind == "dir" { 0 } else { meta.size() },
                // The replicated directory's own times belong to its parent's life.
                mtime: (with_times && !is_root && kind != "symlink")
                    .then(|| (meta.mtime(), meta.mtime_nsec())),
                rdev: meta.rdev(),
                content,
            },
        );
    }
    entries
}

fn assert_same_trees(pair: &Pair, with_times: bool) {
    let primary = snapshot(&pair.primary, with_times);
    let replica = snapshot(&pair.replica, with_times);
    if primary != replica {
        for (path, entry) in &primary {
            match replica.get(path) {
                None => eprintln!("missing on the replica: {path:?}"),
                Some(other) if other != entry && other.content != entry.content => {
                    let diffs: Vec<usize> = entry
                        .content
                        .iter()
                        .zip(&other.content)
                        .enumerate()
                        .filter(|(_, (a, b))| a != b)
                        .map(|(i, _)| i)
                        .collect();
                    eprintln!(
                        "{path:?}: {} bytes differ, first at {:?}, last at {:?}",
                        diffs.len(),
                        diffs.first(),
                        diffs.last()
                    );
                }
                Some(other) if other != entry => eprintln!(
                    "differs: {path:?}: primary {:?} size {} mtime {:?} / replica {:?} size {} mtime {:?} (content equal: {})",
                    entry.kind,
                    entry.size,
                    entry.mtime,
                    other.kind,
                    other.size,
                    other.mtime,
                    entry.content == other.content
                ),
                Some(_) => {}
            }
        }
        for path in replica.keys().filter(|path| !primary.contains_key(*path)) {
            eprintln!("extra on the replica: {path:?}");
        }
        panic!("the trees differ");
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32, owner: u32) {
    fs::write(path, data).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    std::os::unix::fs::chown(path, Some(owner), Some(owner + 1)).expect("chown");
}

/// A tree of `dirs` directories of `files` small files each, plus `big` files of `big_size` bytes.
fn populate(root: &Path, rng: &mut Rng, dirs: usize, files: usize, big: usize, big_size: usize) {
    for d in 0..dirs {
        let dir = root.join(format!("d{d:02}"));
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).expect("chmod dir");
        for f in 0..files {
            let len = 1000 + rng.below(7000) as usize;
            write_file(
                &dir.join(format!("f{f:03}")),
                &rng.bytes(len),
                0o600 + (f as u32 % 3) * 0o40,
                1000 + f as u32 % 4,
            );
        }
    }
    for b in 0..big {
        write_file(
            &root.join(format!("big{b}")),
            &rng.bytes(big_size),
            0o644,
            2000,
        );
    }
}

fn total_bytes(root: &Path) -> u64 {
    snapshot(root, false)
        .values()
        .filter(|entry| entry.kind == "file")
        .map(|entry| entry.size)
        .sum()
}

#[test]
fn full_resync_from_empty_makes_identical_trees_and_ships_each_byte_once() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(7);
    populate(&pair.primary, &mut rng, 4, 25, 2, 3 * 1024 * 1024 + 123);
    fs::create_dir_all(pair.local("deep/er/still")).expect("mkdir -p");
    write_file(&pair.local("deep/er/still/leaf"), b"leaf", 0o604, 7);
    write_file(&pair.local("empty"), b"", 0o600, 0);
    std::os::unix::fs::symlink("d00/f000", pair.local("link")).expect("symlink");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        pair.local("fifo"),
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o620),
        0,
    )
    .expect("mkfifo");
    // The replica holds leftovers: an extra tree, and a directory where the primary has a file.
    fs::create_dir_all(pair.replica.join("stale/sub")).expect("mkdir stale");
    fs::write(pair.replica.join("stale/sub/x"), b"x").expect("write stale");
    fs::create_dir(pair.replica.join("empty")).expect("mkdir conflicting");

    let snapshots = Arc::new(Mutex::new(Vec::new()));
    let engine = {
        let snapshots = Arc::clone(&snapshots);
        pair.engine(pair.config())
            .on_progress(Box::new(move |progress| {
                snapshots.lock().expect("snapshots").push(*progress);
            }))
    };
    let stats = match engine.run(ResyncKind::Full) {
        Ok(ResyncOutcome::Completed { stats }) => stats,
        Err(error) => panic!("resync failed: {error}"),
    };

    assert_same_trees(&pair, true);
    let bytes = total_bytes(&pair.primary);
    let last = *snapshots
        .lock()
        .expect("snapshots")
        .last()
        .expect("progress reported");
    assert_eq!(last.stats, stats);
    assert_eq!(
        (last.files_done, last.bytes_done),
        (last.files_total, last.bytes_total)
    );
    assert_eq!(last.bytes_total, bytes);
    assert_eq!(last.percent(), 100);
    assert_eq!(stats.bytes_sent, bytes, "every byte shipped exactly once");
    assert_eq!(
        stats.files_sent,
        100 + 2 + 4,
        "files, big files, leaf, empty, link, fifo"
    );
    assert_eq!(
        stats.entries_deleted, 4,
        "stale/sub/x, stale/sub, stale, the conflicting dir"
    );
    assert!(
        !pair.tmp.path().join("resync.cursor").exists(),
        "cursor removed on completion"
    );

    // Nothing changed: a second full pass ships nothing.
    let again = pair.resync(ResyncKind::Full);
    assert_eq!(again.bytes_sent, 0);
    assert_eq!(again.files_sent, 0);
    assert_eq!(again.entries_deleted, 0);
}

#[test]
fn incremental_resync_ships_only_changed_files_and_blocks() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(11);
    populate(&pair.primary, &mut rng, 10, 50, 2, 8 * 1024 * 1024);
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);

    // The peer goes away; 1% of the 502 files change while the primary is alone.
    pair.sender.set_role(Role::Alone);
    let mut changed_bytes = 0u64;
    for d in 0..2 {
        let path = format!("d{d:02}/f010");
        let extra = rng.bytes(3000);
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(pair.local(&path))
            .expect("open");
        let offset = file.metadata().expect("stat").len();
        file.write_all(&extra).expect("append");
        changed_bytes += offset + 3000;
        pair.alone(Op::Write {
            dir: 0,
            path: p(&path),
            offset,
            data: extra,
        });
    }
    {
        let path = "d03/f020";
        let data = rng.bytes(100);
        fs::OpenOptions::new()
            .write(true)
            .open(pair.local(path))
            .expect("open")
            .write_all_at(&data, 500)
            .expect("rewrite");
        changed_bytes += fs::metadata(pair.local(path)).expect("stat").len();
        pair.alone(Op::Write {
            dir: 0,
            path: p(path),
            offset: 500,
            data,
        });
    }
    // A namespace change also ships its directories' new mtime, as the FUSE layer does.
    let dir_times = |dir: &str| Op::SetAttr {
        dir: 0,
        path: p(dir),
        mode: None,
        uid: None,
        gid: None,
        atime: None,
        mtime: None,
    };
    fs::remove_file(pair.local("d04/f000")).expect("delete");
    pair.alone(Op::Unlink {
        dir: 0,
        path: p("d04/f000"),
    });
    pair.alone(dir_times("d04"));
    fs::rename(pair.local("d05/f001"), pair.local("d06/renamed")).expect("rename");
    changed_bytes += fs::metadata(pair.local("d06/renamed")).expect("stat").len();
    pair.alone(Op::Rename {
        dir: 0,
        from: p("d05/f001"),
        to: p("d06/renamed"),
        flags: 0,
    });
    pair.alone(dir_times("d05"));
    pair.alone(dir_times("d06"));
    // Inside a big file: one block rewritten in the middle.
    let middle = 4 * 1024 * 1024 + 10;
    let data = rng.bytes(4096);
    fs::OpenOptions::new()
        .write(true)
        .open(pair.local("big0"))
        .expect("open")
        .write_all_at(&data, middle)
        .expect("rewrite big");
    pair.alone(Op::Write {
        dir: 0,
        path: p("big0"),
        offset: middle,
        data,
    });

    pair.replicate_again();
    let stats = pair.resync(ResyncKind::Incremental { extra: Vec::new() });

    assert_same_trees(&pair, true);
    // 2 appended + 1 rewritten + the renamed file's new name + the big file.
    assert_eq!(stats.files_sent, 5, "{stats:?}");
    assert_eq!(
        stats.entries_deleted, 2,
        "the deleted file and the renamed file's old name"
    );
    // The big file: one 64 KiB block (the 4 KiB write straddles no boundary).
    let small_blocks: u64 = 2 + 1 + 1 + 2;
    assert!(
        stats.blocks_sent <= small_blocks + 1,
        "only changed blocks shipped: {stats:?}"
    );
    assert!(
        stats.bytes_sent <= changed_bytes + BLOCK,
        "shipped {} bytes for {} changed: {stats:?}",
        stats.bytes_sent,
        changed_bytes
    );
    // Only the blocks covering the recorded ranges were hashed: the small files'
    // few blocks, and of the big file's 128 only those of the recorded extent
    // (the dirty log widens ranges to RANGE_GRANULE extents).
    assert!(
        stats.file_blocks >= 8 * 1024 * 1024 / BLOCK,
        "the big file's blocks counted: {stats:?}"
    );
    assert!(
        stats.blocks_compared <= 4 + RANGE_GRANULE / BLOCK,
        "only the blocks covering the recorded ranges compared: {stats:?}"
    );
    // The renamed file's new name is absent on the replica: created and sent, not compared.
    assert_eq!(
        (stats.files_by_range, stats.files_whole),
        (4, 0),
        "the written files compared over their ranges: {stats:?}"
    );
    // The recorded names and the three directories' own metadata, not the
    // directories' 50 files each.
    assert!(
        stats.files_examined <= 8,
        "only recorded names examined: {stats:?}"
    );
    assert!(
        DirtyLog::load(&pair.tmp.path().join("dirty.log"))
            .expect("load dirty log")
            .files
            .is_empty(),
        "dirty log cleared on completion"
    );
}

#[test]
fn recorded_small_files_are_settled_in_one_step_whatever_differs() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(23);
    fs::create_dir(pair.local("s")).expect("mkdir");
    for (name, len) in [
        ("rewritten", 3000),
        ("shrunk", 2000),
        ("chmod", 1000),
        ("same", 500),
    ] {
        write_file(&pair.local(&format!("s/{name}")), &rng.bytes(len), 0o644, 0);
    }
    write_file(&pair.local("s/grown"), &[], 0o644, 0);
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);

    // While alone: a rewrite in the middle, a truncate below the replica's
    // size, a mode change, a file that grows from empty, and a name recorded
    // although nothing about it changed.
    pair.sender.set_role(Role::Alone);
    let data = rng.bytes(200);
    fs::OpenOptions::new()
        .write(true)
        .open(pair.local("s/rewritten"))
        .expect("open")
        .write_all_at(&data, 1000)
        .expect("rewrite");
    pair.alone(Op::Write {
        dir: 0,
        path: p("s/rewritten"),
        offset: 1000,
        data,
    });
    fs::OpenOptions::new()
        .write(true)
        .open(pair.local("s/shrunk"))
        .expect("open")
        .set_len(100)
        .expect("truncate");
    pair.alone(Op::Truncate {
        dir: 0,
        path: p("s/shrunk"),
        size: 100,
    });
    fs::set_permissions(pair.local("s/chmod"), fs::Permissions::from_mode(0o600)).expect("chmod");
    pair.alone(Op::SetAttr {
        dir: 0,
        path: p("s/chmod"),
        mode: Some(0o600),
        uid: None,
        gid: None,
        atime: None,
        mtime: None,
    });
    let data = rng.bytes(10);
    fs::write(pair.local("s/grown"), &data).expect("grow");
    pair.alone(Op::Write {
        dir: 0,
        path: p("s/grown"),
        offset: 0,
        data,
    });
    let unchanged = fs::read(pair.local("s/same")).expect("read");
    pair.alone(Op::Write {
        dir: 0,
        path: p("s/same"),
        offset: 0,
        data: unchanged,
    });

    pair.replicate_again();
    let stats = pair.resync(ResyncKind::Incremental { extra: Vec::new() });

    assert_same_trees(&pair, true);
    // A one-block file with a recorded data change is sent whole without
    // comparing (the recorded write that changed nothing included); one
    // recorded for its attributes only is not sent.
    assert_eq!(
        stats.files_sent, 4,
        "the rewritten, shrunk, grown and rewritten-unchanged files' data, not the chmod: {stats:?}"
    );
    assert_eq!(
        stats.bytes_sent,
        3000 + 100 + 10 + 500,
        "each sent file once, whole: {stats:?}"
    );
    assert_eq!(stats.blocks_compared, 0, "nothing hashed: {stats:?}");
    assert_eq!(
        stats.attr_updates, 5,
        "times or mode of each (the sent ones' times): {stats:?}"
    );
}

/// Bytes a file occupies on disk.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn sparse_files_stay_sparse_and_a_hole_punched_while_alone_is_punched_on_the_replica() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(41);
    // 64 MiB with 1 MiB of data at 8 MiB and 100 KiB at the end.
    let sparse = pair.local("disk.img");
    let file = fs::File::create(&sparse).expect("create");
    file.set_len(64 << 20).expect("size");
    file.write_all_at(&rng.bytes(1 << 20), 8 << 20)
        .expect("data");
    file.write_all_at(&rng.bytes(100 << 10), (64 << 20) - (100 << 10))
        .expect("tail");
    // A dense file: a hole is punched in it while alone.
    write_file(&pair.local("dense"), &rng.bytes(4 << 20), 0o644, 0);
    drop(file);

    let stats = pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);
    let replica_sparse = pair.replica.join("disk.img");
    assert!(
        allocated(&replica_sparse) <= allocated(&sparse) + (1 << 20),
        "the replica's copy stays sparse: {} bytes allocated for the primary's {}",
        allocated(&replica_sparse),
        allocated(&sparse)
    );
    assert!(stats.holes_sent > 0, "{stats:?}");
    assert!(
        stats.bytes_sent < (8 << 20),
        "holes are not shipped as zeros: {stats:?}"
    );

    pair.sender.set_role(Role::Alone);
    let dense = fs::OpenOptions::new()
        .write(true)
        .open(pair.local("dense"))
        .expect("open");
    rustix::fs::fallocate(
        &dense,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        1 << 20,
        2 << 20,
    )
    .expect("punch");
    drop(dense);
    pair.alone(Op::Fallocate {
        dir: 0,
        path: p("dense"),
        mode: 0x03,
        offset: 1 << 20,
        len: 2 << 20,
    });
    pair.replicate_again();
    let stats = pair.resync(ResyncKind::Incremental { extra: Vec::new() });
    assert_same_trees(&pair, true);
    assert_eq!(
        stats.holes_sent, 32,
        "the 2 MiB hole, 64 KiB blocks: {stats:?}"
    );
    assert_eq!(stats.bytes_sent, 0, "no zeros shipped: {stats:?}");
    assert!(
        allocated(&pair.replica.join("dense")) <= (2 << 20) + (256 << 10),
        "the hole is punched on the replica too: {} bytes allocated",
        allocated(&pair.replica.join("dense"))
    );
}

/// `path`'s user extended attributes, by name.
fn user_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]).expect("listxattr");
    names.truncate(n);
    names
        .split(|b| *b == 0)
        .filter(|name| name.starts_with(b"user."))
        .map(|name| {
            let name = String::from_utf8(name.to_vec()).expect("utf-8 name");
            let mut value = vec![0u8; 4096];
            let n = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..]).expect("getxattr");
            value.truncate(n);
            (name, value)
        })
        .collect()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).expect("setxattr");
}

#[test]
fn with_xattrs_a_resync_copies_extended_attributes_and_the_changes_made_while_alone() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(43);
    fs::create_dir(pair.local("docs")).expect("mkdir");
    for name in ["a", "b", "c"] {
        write_file(
            &pair.local(&format!("docs/{name}")),
            &rng.bytes(3000),
            0o644,
            0,
        );
    }
    set_xattr(&pair.local("docs/a"), "user.color", b"red");
    set_xattr(&pair.local("docs/b"), "user.owner", b"finance");
    set_xattr(&pair.local("docs"), "user.tag", b"v1");
    let resync = |kind| {
        let mut config = pair.config();
        config.xattrs = true;
        match pair.engine(config).run(kind) {
            Ok(ResyncOutcome::Completed { stats }) => stats,
            Err(error) => panic!("resync failed: {error}"),
        }
    };
    let same_xattrs = |what: &str| {
        for path in ["docs", "docs/a", "docs/b", "docs/c"] {
            assert_eq!(
                user_xattrs(&pair.replica.join(path)),
                user_xattrs(&pair.local(path)),
                "{path} after {what}"
            );
        }
    };
    let stats = resync(ResyncKind::Full);
    assert_same_trees(&pair, true);
    same_xattrs("the full resync");
    assert_eq!(stats.xattr_updates, 3, "{stats:?}");

    // While alone: one value changed, one removed, one added, the directory's changed.
    pair.sender.set_role(Role::Alone);
    let changes: [(&str, &str, Option<&[u8]>); 4] = [
        ("docs/a", "user.color", Some(b"blue")),
        ("docs/b", "user.owner", None),
        ("docs/c", "user.new", Some(b"yes")),
        ("docs", "user.tag", Some(b"v2")),
    ];
    for (path, name, value) in changes {
        let op = match value {
            Some(value) => {
                set_xattr(&pair.local(path), name, value);
                Op::SetXattr {
                    dir: 0,
                    path: p(path),
                    name: name.as_bytes().to_vec(),
                    value: value.to_vec(),
                    flags: 0,
                }
            }
            None => {
                rustix::fs::lremovexattr(pair.local(path), name).expect("removexattr");
                Op::RemoveXattr {
                    dir: 0,
                    path: p(path),
                    name: name.as_bytes().to_vec(),
                }
            }
        };
        pair.alone(op);
    }
    pair.replicate_again();
    let stats = resync(ResyncKind::Incremental { extra: Vec::new() });
    assert_same_trees(&pair, true);
    same_xattrs("the incremental resync");
    assert_eq!(stats.xattr_updates, 4, "{stats:?}");
    assert_eq!(
        stats.bytes_sent, 0,
        "no data sent for attribute changes: {stats:?}"
    );
}

#[test]
fn a_file_with_its_own_ranges_keeps_them_under_a_directory_recorded_whole() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(47);
    fs::create_dir(pair.local("db")).expect("mkdir");
    write_file(&pair.local("db/table"), &rng.bytes(8 << 20), 0o644, 0);
    for index in 0..20 {
        write_file(
            &pair.local(&format!("db/other{index}")),
            &rng.bytes(5000),
            0o644,
            0,
        );
    }
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);

    // While alone: one page written in the middle of a big file, and its
    // directory recorded whole.
    pair.sender.set_role(Role::Alone);
    let page = rng.bytes(8192);
    fs::OpenOptions::new()
        .write(true)
        .open(pair.local("db/table"))
        .expect("open")
        .write_all_at(&page, 3 << 20)
        .expect("write");
    pair.alone(Op::Write {
        dir: 0,
        path: p("db/table"),
        offset: 3 << 20,
        data: page,
    });
    // The directory recorded whole (as after a crash of the primary, when
    // the activity log names it).
    pair.sender
        .dirty_log()
        .record_changes(&[safekit_linux_helper::dirty::DirtyRecord {
            dir: 0,
            path: p("db"),
            change: safekit_linux_helper::dirty::Change::Whole,
        }])
        .expect("record the directory");
    pair.replicate_again();
    let stats = pair.resync(ResyncKind::Incremental { extra: Vec::new() });
    assert_same_trees(&pair, true);
    assert!(
        stats.blocks_compared <= RANGE_GRANULE / BLOCK + 20,
        "the big file compared over its recorded extent, not whole, under the walked directory: {stats:?}"
    );
    assert_eq!(stats.blocks_sent, 1, "{stats:?}");
}

#[test]
fn a_directory_and_a_big_file_renamed_while_alone_are_not_copied_again() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(53);
    fs::create_dir(pair.local("logs")).expect("mkdir");
    write_file(&pair.local("logs/app.log"), &rng.bytes(4 << 20), 0o644, 0);
    for index in 0..10 {
        write_file(
            &pair.local(&format!("logs/small{index}")),
            &rng.bytes(3000),
            0o644,
            0,
        );
    }
    write_file(&pair.local("data.bin"), &rng.bytes(4 << 20), 0o644, 0);
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);

    // While alone: the log directory rotated (renamed, a new one made with a
    // new file), the big file renamed, and a small file renamed too.
    pair.sender.set_role(Role::Alone);
    let rename = |from: &str, to: &str| {
        fs::rename(pair.local(from), pair.local(to)).expect("rename");
        pair.alone(Op::Rename {
            dir: 0,
            from: p(from),
            to: p(to),
            flags: 0,
        });
    };
    rename("logs", "logs.1");
    fs::create_dir(pair.local("logs")).expect("mkdir");
    pair.alone(Op::Mkdir {
        dir: 0,
        path: p("logs"),
        mode: 0o755,
        uid: 0,
        gid: 0,
    });
    let fresh = rng.bytes(1000);
    fs::write(pair.local("logs/app.log"), &fresh).expect("write");
    pair.alone(Op::Create {
        dir: 0,
        path: p("logs/app.log"),
        mode: 0o644,
        uid: 0,
        gid: 0,
        exclusive: true,
    });
    pair.alone(Op::Write {
        dir: 0,
        path: p("logs/app.log"),
        offset: 0,
        data: fresh,
    });
    rename("data.bin", "data.bin.1");
    rename("logs.1/small3", "logs.1/small3.old");

    pair.replicate_again();
    let stats = pair.resync(ResyncKind::Incremental { extra: Vec::new() });
    assert_same_trees(&pair, true);
    assert_eq!(
        stats.renames_replayed, 2,
        "the directory and the big file (the small file's rename is not worth it): {stats:?}"
    );
    assert!(
        stats.bytes_sent < (1 << 20),
        "neither the 4 MiB log nor the 4 MiB file copied again: {stats:?}"
    );
}

/// Size of the race test's big file in MiB (default 1024: issue 5's 1 GiB
/// race, about 20 s in a debug build with SHA-256 optimized, see the workspace
/// `Cargo.toml`); set it lower for a quick local run.
const RACE_MIB_VAR: &str = "SAFEKIT_RESYNC_RACE_MIB";

#[test]
fn resync_while_writers_rewrite_create_rename_and_delete_ends_identical() {
    let pair = Arc::new(Pair::new(Role::Replicating));
    let mut rng = Rng(23);
    let big_mib: usize = std::env::var(RACE_MIB_VAR)
        .ok()
        .map(|v| {
            v.parse()
                .expect("SAFEKIT_RESYNC_RACE_MIB is a number of MiB")
        })
        .unwrap_or(1024);
    let big_size = big_mib * 1024 * 1024;
    eprintln!("race over a {big_mib} MiB file");
    {
        let mut file = fs::File::create(pair.local("big")).expect("create big");
        for _ in 0..big_mib {
            file.write_all(&rng.bytes(1024 * 1024)).expect("write big");
        }
    }
    populate(&pair.primary, &mut rng, 3, 20, 0, 0);
    // The replica starts with a stale copy of the big file (every 16th block differs).
    fs::copy(pair.local("big"), pair.replica.join("big")).expect("copy");
    for block in (0..(big_size as u64 / BLOCK)).step_by(16) {
        fs::OpenOptions::new()
            .write(true)
            .open(pair.replica.join("big"))
            .expect("open replica")
            .write_all_at(b"stale", block * BLOCK)
            .expect("stale write");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let big_name = Arc::new(Mutex::new(String::from("big")));
    let rewrites = Arc::new(AtomicU64::new(0));
    let rewriter = {
        let (pair, stop, big_name, rewrites) = (
            Arc::clone(&pair),
            Arc::clone(&stop),
            Arc::clone(&big_name),
            Arc::clone(&rewrites),
        );
        std::thread::spawn(move || {
            let mut rng = Rng(99);
            while !stop.load(Ordering::SeqCst) {
                let len = 1 + rng.below(64 * 1024) as usize;
                let offset = rng.below(big_size as u64 - len as u64);
                let data = rng.bytes(len);
                // The FUSE layer knows the current name; so do we, under the locks.
                let name = big_name.lock().expect("name").clone();
                if pair.live_write(&name, offset, &data) {
                    rewrites.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let namer = {
        let (pair, stop, big_name) = (Arc::clone(&pair), Arc::clone(&stop), Arc::clone(&big_name));
        std::thread::spawn(move || {
            let mut rng = Rng(5);
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                let name = format!("d0{}/new{round}", round % 3);
                let len = 1 + rng.below(200_000) as usize;
                pair.live_create(&name, &rng.bytes(len));
                match round % 3 {
                    0 => pair.live_unlink(&name),
                    1 => pair.live_rename(&name, &format!("d0{}/moved{round}", (round + 1) % 3)),
                    _ => {}
                }
                if round.is_multiple_of(2) {
                    // Renaming an existing file, sometimes the big one while it is being resynced.
                    let mut current = big_name.lock().expect("name");
                    let next = if current.as_str() == "big" {
                        "big.renamed"
                    } else {
                        "big"
                    };
                    pair.live_rename(&current, next);
                    *current = next.to_owned();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let stats = pair.resync(ResyncKind::Full);
    stop.store(true, Ordering::SeqCst);
    rewriter.join().expect("rewriter");
    namer.join().expect("namer");
    assert!(stats.bytes_sent > 0);
    assert!(
        rewrites.load(Ordering::Relaxed) > 0,
        "the writer ran during the resync"
    );
    // The stream kept the replica equal after the resync (times aside: live
    // writes set each side's own mtime).
    assert_same_trees(&pair, false);
    // A final pass settles the times.
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);
}

#[test]
fn an_interrupted_resync_resumes_without_starting_over() {
    let mut pair = Pair::new(Role::Replicating);
    let mut rng = Rng(31);
    populate(&pair.primary, &mut rng, 0, 0, 24, 2 * 1024 * 1024);
    let total = total_bytes(&pair.primary);

    let mut config = pair.config();
    config.bandwidth = Some(16 * 1024 * 1024);
    // Compare every file's blocks, so that only the cursor can spare the finished ones;
    // confirm each finished file at once.
    config.checksum_all = true;
    config.confirm_files = 1;
    let engine = pair.engine(config);
    let handle = engine.handle();
    let receiver = Arc::new(Mutex::new(pair.receiver.take()));
    let cutter = {
        let receiver = Arc::clone(&receiver);
        std::thread::spawn(move || {
            while handle.progress().bytes_sent < total / 2 {
                std::thread::sleep(Duration::from_millis(5));
            }
            // The receiving node goes away mid-resync.
            drop(receiver.lock().expect("receiver").take());
        })
    };
    let first = engine.run(ResyncKind::Full);
    cutter.join().expect("cutter");
    let error = first.expect_err("the resync cannot complete without its peer");
    assert!(
        matches!(error, ResyncError::Link(_) | ResyncError::NotReplicating),
        "{error}"
    );
    let sent_first = engine.handle().progress().bytes_sent;
    assert!(sent_first >= total / 2);
    assert!(
        pair.tmp.path().join("resync.cursor").exists(),
        "the cursor is kept"
    );

    // The receiver comes back on the same address; the resync runs again.
    pair.receiver = Some(
        Receiver::bind_serving_resync(pair.addr, SECRET, MODULE, vec![open_dir(&pair.replica)])
            .expect("rebind receiver"),
    );
    pair.replicate_again();
    let mut config = pair.config();
    config.checksum_all = true;
    let second = match pair.engine(config).run(ResyncKind::Full) {
        Ok(ResyncOutcome::Completed { stats }) => stats,
        Err(error) => panic!("resumed resync failed: {error}"),
    };
    assert_same_trees(&pair, true);
    assert!(second.files_resumed > 0, "{second:?}");
    assert!(
        sent_first + second.bytes_sent < total + total / 2,
        "{} + {} bytes shipped for {} (should be well under two copies)",
        sent_first,
        second.bytes_sent,
        total
    );
}

/// A stream position the test controls.
#[derive(Default)]
struct FakeStream {
    issued: AtomicU64,
    settled: AtomicU64,
}

impl StreamPosition for FakeStream {
    fn stream_position(&self) -> (u64, u64) {
        (
            self.issued.load(Ordering::SeqCst),
            self.settled.load(Ordering::SeqCst),
        )
    }
}

#[test]
fn the_activity_log_survives_a_crash_and_names_the_files_in_flight() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("activity.log");
    let stream = Arc::new(FakeStream::default());
    let log = ActivityLog::open(
        &path,
        4,
        Some(Arc::clone(&stream) as Arc<dyn StreamPosition>),
    )
    .expect("open");
    stream.issued.store(10, Ordering::SeqCst);
    // a and b written, their replicate() returned, but not acknowledged yet (settled < 10).
    drop(log.note_write(0, &p("a")).expect("note"));
    drop(log.note_write(0, &p("b")).expect("note"));
    let length = fs::metadata(&path).expect("stat").len();
    for _ in 0..1000 {
        drop(log.note_write(0, &p("a")).expect("note hot"));
    }
    assert_eq!(
        fs::metadata(&path).expect("stat").len(),
        length,
        "a hot file costs no write"
    );
    // c, d, e in flight (tickets held); the set is full of unsettled files and grows.
    let c = log.note_write(0, &p("c")).expect("note");
    let d = log.note_write(1, &p("d")).expect("note");
    let e = log.note_write(0, &p("dir/e")).expect("note");
    assert_eq!(log.hot_files().len(), 5);
    // a and b are acknowledged now; f's arrival evicts settled files only.
    stream.settled.store(10, Ordering::SeqCst);
    let f = log.note_write(0, &p("f")).expect("note");
    let hot = log.hot_files();
    assert!(
        !hot.contains(&(0, p("a"))) && !hot.contains(&(0, p("b"))),
        "{hot:?}"
    );
    drop((c, d));
    // Crash: no clean close, tickets e and f still held.
    std::mem::forget(e);
    std::mem::forget(f);
    std::mem::forget(log);

    let recovered = ActivityLog::load(&path).expect("load");
    assert_eq!(
        recovered,
        vec![(0, p("c")), (0, p("dir/e")), (0, p("f")), (1, p("d"))]
    );
    // Reopened, the recovered files stay pinned until a resync covered them.
    stream.issued.store(20, Ordering::SeqCst);
    stream.settled.store(20, Ordering::SeqCst);
    let log = ActivityLog::open(
        &path,
        4,
        Some(Arc::clone(&stream) as Arc<dyn StreamPosition>),
    )
    .expect("reopen");
    log.checkpoint().expect("checkpoint");
    log.checkpoint().expect("checkpoint");
    assert_eq!(ActivityLog::load(&path).expect("load"), recovered);
    log.unpin_recovered();
    log.checkpoint().expect("checkpoint");
    assert_eq!(ActivityLog::load(&path).expect("load"), vec![]);
}

#[test]
fn after_a_primary_crash_the_activity_logs_files_are_resynced() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(41);
    populate(&pair.primary, &mut rng, 2, 10, 1, 1024 * 1024);
    pair.resync(ResyncKind::Full);
    let activity_path = pair.tmp.path().join("activity.log");
    let log = ActivityLog::open(
        &activity_path,
        64,
        Some(Arc::clone(&pair.sender) as Arc<dyn StreamPosition>),
    )
    .expect("open activity log");
    // Written locally, then the primary crashed before the operation was shipped.
    let ticket = log.note_write(0, &p("big0")).expect("note");
    let data = rng.bytes(10_000);
    fs::OpenOptions::new()
        .write(true)
        .open(pair.local("big0"))
        .expect("open")
        .write_all_at(&data, 300_000)
        .expect("local write");
    std::mem::forget(ticket);
    std::mem::forget(log);

    let in_flight = ActivityLog::load(&activity_path).expect("load");
    assert_eq!(in_flight, vec![(0, p("big0"))]);
    let stats = pair.resync(ResyncKind::Incremental { extra: in_flight });
    assert_same_trees(&pair, true);
    assert_eq!(
        stats.files_examined, 1,
        "only the activity log's file: {stats:?}"
    );
    assert_eq!(
        stats.files_whole, 1,
        "the activity log names no ranges: the file is compared whole: {stats:?}"
    );
    assert_eq!(stats.blocks_compared, stats.file_blocks, "{stats:?}");
    assert!(stats.blocks_sent <= 2, "{stats:?}");
}

#[test]
fn concurrent_first_writes_are_all_on_disk_when_note_write_returns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("activity.log");
    let stream = Arc::new(FakeStream::default());
    let log = ActivityLog::open(
        &path,
        1000,
        Some(Arc::clone(&stream) as Arc<dyn StreamPosition>),
    )
    .expect("open");
    let tickets = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let (log, tickets, path) = (&log, &tickets, &path);
            scope.spawn(move || {
                for file in 0..50 {
                    let ticket = log
                        .note_write(0, &p(&format!("t{thread}/f{file}")))
                        .expect("note");
                    // Returned: the record is durable; a crash now must not lose it.
                    let on_disk = ActivityLog::load(path).expect("load");
                    assert!(on_disk.contains(&(0, p(&format!("t{thread}/f{file}")))));
                    tickets.lock().expect("tickets").push(ticket);
                }
            });
        }
    });
    assert_eq!(ActivityLog::load(&path).expect("load").len(), 400);
}

#[test]
fn a_stopped_resync_reports_it_and_the_next_run_completes() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(53);
    populate(&pair.primary, &mut rng, 0, 0, 8, 1024 * 1024);
    let total = total_bytes(&pair.primary);
    let mut config = pair.config();
    // Slow enough that the whole copy would take half a minute.
    config.bandwidth = Some(256 * 1024);
    config.max_write = 64 * 1024;
    let engine = pair.engine(config);
    let handle = engine.handle();
    let stopper = std::thread::spawn(move || {
        while handle.progress().bytes_sent == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.stop();
    });
    let outcome = engine.run(ResyncKind::Full);
    stopper.join().expect("stopper");
    assert!(matches!(outcome, Err(ResyncError::Stopped)), "{outcome:?}");
    assert!(engine.handle().progress().bytes_sent < total);
    let stats = pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);
    assert!(stats.bytes_sent <= total);
}

/// The small files of an incremental resync are asked about in batches: the
/// names in a batch must stay right while live writes, renames (also over
/// files of the batch) and deletes of those very files go on.
#[test]
fn incremental_resync_of_small_files_while_they_are_rewritten_renamed_and_deleted_ends_identical() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let pair = Arc::new(Pair::new(Role::Replicating));
    let mut rng = Rng(31);
    populate(&pair.primary, &mut rng, 4, 100, 0, 0);
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);

    // While alone, 300 small files change: the dirty log names them all.
    pair.sender.set_role(Role::Alone);
    let mut names = Vec::new();
    for index in 0..300 {
        let name = format!("d{:02}/f{:03}", index % 4, index / 4);
        let data = rng.bytes(100);
        fs::OpenOptions::new()
            .write(true)
            .open(pair.local(&name))
            .expect("open")
            .write_all_at(&data, 10)
            .expect("rewrite");
        pair.alone(Op::Write {
            dir: 0,
            path: p(&name),
            offset: 10,
            data,
        });
        names.push(name);
    }
    pair.replicate_again();

    // The churn starts once the resync runs (its first progress report): a
    // recorded file renamed live before that would carry the replica's stale
    // copy to a name no log records.
    let started = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (pair, stop, started) = (Arc::clone(&pair), Arc::clone(&stop), Arc::clone(&started));
        std::thread::spawn(move || {
            let mut rng = Rng(77);
            let mut round = 0u64;
            while !started.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            while !stop.load(Ordering::SeqCst) && names.len() > 2 {
                round += 1;
                let i = rng.below(names.len() as u64) as usize;
                match rng.below(4) {
                    0 | 1 => {
                        let len = 1 + rng.below(8000) as usize;
                        assert!(pair.live_write(&names[i], 0, &rng.bytes(len)));
                    }
                    2 => {
                        let to = format!("d{:02}/r{round}", round % 4);
                        pair.live_rename(&names[i], &to);
                        names[i] = to;
                    }
                    _ => {
                        // Over another recorded file, or a delete.
                        let j = (i + 1) % names.len();
                        if round.is_multiple_of(2) {
                            pair.live_rename(&names[i], &names[j]);
                            names[i] = names[j].clone();
                        } else {
                            pair.live_unlink(&names[j]);
                        }
                        names.remove(j);
                    }
                }
            }
            round
        })
    };
    let engine = {
        let started = Arc::clone(&started);
        pair.engine(pair.config())
            .on_progress(Box::new(move |_| started.store(true, Ordering::SeqCst)))
    };
    let outcome = engine.run(ResyncKind::Incremental { extra: Vec::new() });
    stop.store(true, Ordering::SeqCst);
    assert!(
        matches!(outcome, Ok(ResyncOutcome::Completed { .. })),
        "{outcome:?}"
    );
    let rounds = churn.join().expect("churn");
    eprintln!("{rounds} live operations during the resync");
    assert_same_trees(&pair, false);
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, true);
}

/// A file changed while alone and renamed after the peer is back, before the
/// resync runs: the rename moves the peer's stale copy to the new name, so
/// the new name must be compared too (the dirty log named only the old one).
#[test]
fn a_recorded_file_renamed_before_the_resync_is_compared_under_its_new_name() {
    let pair = Pair::new(Role::Replicating);
    let mut rng = Rng(31);
    populate(&pair.primary, &mut rng, 2, 10, 0, 0);
    pair.resync(ResyncKind::Full);
    assert_same_trees(&pair, false);

    // Given a file rewritten while the peer was away...
    pair.sender.set_role(Role::Alone);
    let data = rng.bytes(2000);
    fs::OpenOptions::new()
        .write(true)
        .open(pair.local("d00/f003"))
        .expect("open")
        .write_all_at(&data, 100)
        .expect("rewrite");
    pair.alone(Op::Write {
        dir: 0,
        path: p("d00/f003"),
        offset: 100,
        data,
    });
    // ...and the peer back, the file renamed (into another directory) before the resync.
    pair.replicate_again();
    pair.live_rename("d00/f003", "d01/moved");
    pair.live_rename("d01", "renamed-dir");

    let stats = pair.resync(ResyncKind::Incremental { extra: Vec::new() });
    assert!(stats.files_sent >= 1, "the moved file was sent: {stats:?}");
    assert_same_trees(&pair, false);
}
