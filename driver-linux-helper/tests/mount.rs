//! End-to-end tests of the FUSE mount over a directory (needs root and /dev/fuse).
//!
//! Each test mounts [`ReplicatedFs`] over a directory of its own temporary
//! tree with a replicator that records what it is given, acts through the
//! mount as an application would, then checks the underlying directory
//! (through a descriptor opened before the mount: `/proc/self/fd/N/...`
//! names the covered directory, not the mount) and the recorded operations.
//! The mount is unmounted by a guard even when a test fails.
//!
//! [`ReplicatedFs`]: safekit_linux_helper::fs::ReplicatedFs

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags};
use safekit_linux_helper::activity::{ActivityLog, StreamPosition};
use safekit_linux_helper::fs::{FsOptions, SyncMode};
use safekit_linux_helper::mount::{self, MountConfig, MountedDir};
use safekit_linux_helper::replicator::{ReplicateOutcome, Replicator, WaitFor};
use safekit_protocol::replication::{Op, RelPath, TimeSet, rename_flags};

/// Records every operation and answers as a peer that confirmed it.
#[derive(Default)]
struct Recorder {
    ops: Mutex<Vec<(Op, WaitFor)>>,
}

impl Replicator for Recorder {
    fn replicate(&self, op: Op, wait_for: WaitFor) -> ReplicateOutcome {
        self.ops.lock().expect("recorder lock").push((op, wait_for));
        if wait_for == WaitFor::Queued {
            ReplicateOutcome::Queued
        } else {
            ReplicateOutcome::Confirmed
        }
    }
}

impl Recorder {
    fn take(&self) -> Vec<(Op, WaitFor)> {
        std::mem::take(&mut *self.ops.lock().expect("recorder lock"))
    }
}

/// A `SetAttr` that only carries times.
fn is_times_only(op: &Op) -> bool {
    matches!(
        op,
        Op::SetAttr {
            mode: None,
            uid: None,
            gid: None,
            mtime: Some(_),
            ..
        }
    )
}

fn rel(path: &str) -> RelPath {
    RelPath::parse(path.as_bytes()).expect("valid test path")
}

/// A directory with the file system mounted over it; unmounts on drop.
struct Fixture {
    // Field order: the mount goes before the temporary tree is removed.
    mount: Option<MountedDir>,
    under: OwnedFd,
    dir: PathBuf,
    recorder: Arc<Recorder>,
    _tmp: tempfile::TempDir,
}

impl Fixture {
    fn new(mode: SyncMode, replicate_xattrs: bool) -> Fixture {
        Self::with_setup(mode, replicate_xattrs, |_| {})
    }

    /// `setup` prepares the directory before the mount.
    fn with_setup(mode: SyncMode, replicate_xattrs: bool, setup: impl FnOnce(&Path)) -> Fixture {
        Self::build(mode, replicate_xattrs, setup, |_| {})
    }

    /// Like [`Fixture::with_setup`]; `configure` completes the mount's configuration.
    fn build(
        mode: SyncMode,
        replicate_xattrs: bool,
        setup: impl FnOnce(&Path),
        configure: impl FnOnce(&mut MountConfig),
    ) -> Fixture {
        assert!(
            rustix::process::geteuid().is_root(),
            "these tests need root (CI runs them as root)"
        );
        let tmp = tempfile::tempdir().expect("temp dir");
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let dir = tmp.path().join("data");
        fs::create_dir(&dir).expect("create data dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod data dir");
        setup(&dir);
        let under = rustix::fs::open(
            &dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open the directory before the mount");
        let recorder = Arc::new(Recorder::default());
        let options = FsOptions {
            dir_index: 3,
            mode,
            replicate_xattrs,
        };
        let mut config = MountConfig::new(options);
        configure(&mut config);
        let mount = mount::mount_over_with(&dir, recorder.clone(), config)
            .expect("mount over the directory");
        Fixture {
            mount: Some(mount),
            under,
            dir,
            recorder,
            _tmp: tmp,
        }
    }

    /// A path through the mount.
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The same path in the underlying (covered) directory.
    fn under(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{}", self.under.as_raw_fd(), rel))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take()
            && let Err(error) = mount.unmount()
        {
            eprintln!("unmount failed: {error}");
        }
    }
}

/// A `safekit-rfs` child process: killed on drop, and its mount (live or
/// stale) detached, so a failing test leaves nothing behind.
struct HelperGuard {
    child: std::process::Child,
    dir: PathBuf,
}

impl Drop for HelperGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if mountinfo.contains(&format!(" {} ", self.dir.display())) {
            let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Runs `script` with `sh` as uid/gid 65534 (nobody), returns whether it succeeded.
fn as_nobody(script: &str) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .status()
        .expect("run setpriv (util-linux)")
        .success()
}

#[test]
fn changes_through_the_mount_reach_the_underlying_tree_and_are_replicated() {
    let fx = Fixture::new(SyncMode::Strict, false);
    fs::create_dir(fx.path("sub")).expect("mkdir");
    fs::write(fx.path("sub/a"), b"hello").expect("create and write");
    fs::rename(fx.path("sub/a"), fx.path("b")).expect("rename");
    fs::hard_link(fx.path("b"), fx.path("sub/hard")).expect("link");
    std::os::unix::fs::symlink("b", fx.path("sym")).expect("symlink");
    fs::set_permissions(fx.path("b"), fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::chown(fx.path("b"), Some(1234), Some(5678)).expect("chown");
    fs::OpenOptions::new()
        .write(true)
        .open(fx.path("b"))
        .expect("open")
        .set_len(2)
        .expect("truncate");
    fs::write(fx.path("gone"), b"x").expect("create");
    fs::remove_file(fx.path("gone")).expect("unlink");
    fs::create_dir(fx.path("empty")).expect("mkdir");
    fs::remove_dir(fx.path("empty")).expect("rmdir");

    // The underlying tree.
    assert_eq!(fs::read(fx.under("b")).expect("read b underneath"), b"he");
    assert_eq!(
        fs::read(fx.under("sub/hard")).expect("read link underneath"),
        b"he"
    );
    let meta = fs::metadata(fx.under("b")).expect("stat b underneath");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.nlink()),
        (0o640, 1234, 5678, 2)
    );
    assert_eq!(
        fs::read_link(fx.under("sym")).expect("readlink underneath"),
        Path::new("b")
    );
    assert!(
        !fx.under("sub/a").exists() && !fx.under("gone").exists() && !fx.under("empty").exists()
    );
    // The inode numbers seen through the mount are the underlying ones.
    assert_eq!(fs::metadata(fx.path("b")).expect("stat").ino(), meta.ino());

    // The operations, in order, with the paths relative to the directory.
    let recorded = fx.recorder.take();
    // Strict mode: each application call ends with an operation that waits
    // until the peer applied it (earlier ones of the same call are queued).
    assert_eq!(
        recorded.last().map(|(_, wait)| *wait),
        Some(WaitFor::Applied)
    );
    assert!(recorded.iter().all(|(_, wait)| *wait != WaitFor::Durable));
    // Time-only updates (new nodes, changed directories) are checked in their own test.
    let ops: Vec<Op> = recorded
        .into_iter()
        .map(|(op, _)| op)
        .filter(|op| !is_times_only(op))
        .collect();
    let summary: Vec<String> = ops
        .iter()
        .map(|op| match op {
            Op::Mkdir { path, .. } => {
                format!("mkdir {}", String::from_utf8_lossy(&path.to_bytes()))
            }
            Op::Create { path, .. } => {
                format!("create {}", String::from_utf8_lossy(&path.to_bytes()))
            }
            Op::Write {
                path, offset, data, ..
            } => {
                format!(
                    "write {} {offset} {}",
                    String::from_utf8_lossy(&path.to_bytes()),
                    String::from_utf8_lossy(data)
                )
            }
            Op::Rename {
                from, to, flags, ..
            } => format!(
                "rename {} {} {flags}",
                String::from_utf8_lossy(&from.to_bytes()),
                String::from_utf8_lossy(&to.to_bytes())
            ),
            Op::Link { existing, new, .. } => format!(
                "link {} {}",
                String::from_utf8_lossy(&existing.to_bytes()),
                String::from_utf8_lossy(&new.to_bytes())
            ),
            Op::Symlink { path, target, .. } => {
                format!(
                    "symlink {} {}",
                    String::from_utf8_lossy(&path.to_bytes()),
                    String::from_utf8_lossy(target)
                )
            }
            Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                ..
            } => format!(
                "setattr {} {:?} {uid:?} {gid:?}",
                String::from_utf8_lossy(&path.to_bytes()),
                mode.map(|m| format!("{:o}", m & 0o7777))
            ),
            Op::Truncate { path, size, .. } => format!(
                "truncate {} {size}",
                String::from_utf8_lossy(&path.to_bytes())
            ),
            Op::Unlink { path, .. } => {
                format!("unlink {}", String::from_utf8_lossy(&path.to_bytes()))
            }
            Op::Rmdir { path, .. } => {
                format!("rmdir {}", String::from_utf8_lossy(&path.to_bytes()))
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            "mkdir sub",
            "create sub/a",
            "write sub/a 0 hello",
            "rename sub/a b 0",
            "link b sub/hard",
            "symlink sym b",
            "setattr b Some(\"640\") None None",
            "setattr b None Some(1234) Some(5678)",
            "truncate b 2",
            "create gone",
            "write gone 0 x",
            "unlink gone",
            "mkdir empty",
            "rmdir empty",
        ]
    );
    assert!(
        ops.iter().all(|op| op.dir() == 3),
        "every operation names the directory index"
    );
    // Creations carry the mode and owner the file actually got.
    let Op::Create { mode, uid, gid, .. } = &ops[1] else {
        panic!("second op is the create")
    };
    assert_eq!((*mode & 0o7777, *uid, *gid), (0o644, 0, 0));
}

#[test]
fn permissions_are_enforced_and_new_files_belong_to_their_creator() {
    let fx = Fixture::with_setup(SyncMode::Strict, false, |dir| {
        fs::write(dir.join("rootfile"), b"root data").expect("create before mount");
        fs::set_permissions(dir.join("rootfile"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
    });
    let root_file = fx.path("rootfile");
    assert!(
        !as_nobody(&format!("echo evil >> '{}'", root_file.display())),
        "nobody must not write a root-owned 0644 file"
    );
    assert!(
        as_nobody(&format!("cat '{}' > /dev/null", root_file.display())),
        "but may read it"
    );
    assert_eq!(
        fs::read(fx.under("rootfile")).expect("read underneath"),
        b"root data"
    );

    assert!(
        as_nobody(&format!("echo mine > '{}'", fx.path("nobodys").display())),
        "nobody creates a file"
    );
    let meta = fs::metadata(fx.under("nobodys")).expect("stat underneath");
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    let created = fx
        .recorder
        .take()
        .into_iter()
        .find_map(|(op, _)| match op {
            Op::Create { path, uid, gid, .. } if path == rel("nobodys") => Some((uid, gid)),
            _ => None,
        })
        .expect("the create was replicated");
    assert_eq!(created, (65534, 65534));
    // Nobody may not remove root's file from a directory it can write? It can
    // (0777, not sticky); but it may not chmod it.
    assert!(!as_nobody(&format!("chmod 666 '{}'", root_file.display())));
}

#[test]
fn files_that_existed_before_the_mount_can_be_read_and_written() {
    let fx = Fixture::with_setup(SyncMode::Strict, false, |dir| {
        fs::create_dir(dir.join("old")).expect("mkdir before mount");
        fs::write(dir.join("old/file"), b"before").expect("write before mount");
    });
    assert_eq!(
        fs::read(fx.path("old/file")).expect("read through the mount"),
        b"before"
    );
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(fx.path("old/file"))
        .expect("open for append");
    file.write_all(b" after").expect("append");
    drop(file);
    assert_eq!(
        fs::read(fx.under("old/file")).expect("read underneath"),
        b"before after"
    );
    let writes: Vec<(RelPath, u64, Vec<u8>)> = fx
        .recorder
        .take()
        .into_iter()
        .filter_map(|(op, _)| match op {
            Op::Write {
                path, offset, data, ..
            } => Some((path, offset, data)),
            _ => None,
        })
        .collect();
    assert_eq!(
        writes,
        vec![(rel("old/file"), 6, b" after".to_vec())],
        "append ships the real offset"
    );
}

#[test]
fn concurrent_writers_to_different_files_all_arrive() {
    let fx = Fixture::new(SyncMode::Strict, false);
    let chunk = 64 * 1024;
    let threads: Vec<_> = (0..4u8)
        .map(|i| {
            let path = fx.path(&format!("w{i}"));
            std::thread::spawn(move || {
                let mut file = fs::File::create(path).expect("create");
                for round in 0..16u8 {
                    file.write_all(&vec![i.wrapping_mul(31).wrapping_add(round); chunk])
                        .expect("write");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer thread");
    }
    let ops = fx.recorder.take();
    for i in 0..4u8 {
        let expected: Vec<u8> = (0..16u8)
            .flat_map(|round| vec![i.wrapping_mul(31).wrapping_add(round); chunk])
            .collect();
        assert_eq!(
            fs::read(fx.under(&format!("w{i}"))).expect("read underneath"),
            expected
        );
        // Replaying the recorded writes of this file gives the same bytes.
        let mut replay = Vec::new();
        for (op, _) in &ops {
            if let Op::Write {
                path, offset, data, ..
            } = op
                && *path == rel(&format!("w{i}"))
            {
                let end = *offset as usize + data.len();
                if replay.len() < end {
                    replay.resize(end, 0);
                }
                replay[*offset as usize..end].copy_from_slice(data);
            }
        }
        assert_eq!(replay, expected, "replayed writes of w{i}");
    }
}

#[test]
fn a_one_mebibyte_write_arrives_in_one_operation() {
    let fx = Fixture::new(SyncMode::Strict, false);
    let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
    let mut file = fs::File::create(fx.path("big")).expect("create");
    file.write_all(&data).expect("one write of 1 MiB");
    drop(file);
    let writes: Vec<usize> = fx
        .recorder
        .take()
        .into_iter()
        .filter_map(|(op, _)| match op {
            Op::Write { data, .. } => Some(data.len()),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![1 << 20]);
    assert_eq!(fs::read(fx.under("big")).expect("read underneath"), data);
}

#[test]
fn fsync_and_sync_writes_wait_until_durable_and_times_are_concrete() {
    let fx = Fixture::new(SyncMode::Strict, false);
    let mut file = fs::File::create(fx.path("f")).expect("create");
    file.write_all(b"data").expect("write");
    file.sync_all().expect("fsync");
    drop(file);
    let mut sync_file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(fx.path("f"))
        .expect("open O_DSYNC");
    sync_file.write_all(b"D").expect("sync write");
    drop(sync_file);
    // touch: utimensat with UTIME_NOW is shipped as the time the file got.
    rustix::fs::utimensat(
        rustix::fs::CWD,
        fx.path("f").as_path(),
        &rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
        },
        rustix::fs::AtFlags::empty(),
    )
    .expect("touch");
    let ops = fx.recorder.take();
    assert!(
        ops.iter().any(
            |(op, wait)| matches!(op, Op::Fsync { path, .. } if *path == rel("f"))
                && *wait == WaitFor::Durable
        ),
        "{ops:?}"
    );
    assert!(
        ops.iter().any(
            |(op, wait)| matches!(op, Op::Write { data, .. } if data == b"D")
                && *wait == WaitFor::Durable
        ),
        "an O_DSYNC write waits until durable: {ops:?}"
    );
    let meta = fs::metadata(fx.under("f")).expect("stat underneath");
    let mtime = ops
        .iter()
        .rev()
        .find_map(|(op, _)| match op {
            Op::SetAttr {
                mtime: Some(TimeSet::At(t)),
                ..
            } => Some(*t),
            _ => None,
        })
        .expect("touch was replicated with a concrete time");
    assert_eq!(
        (mtime.secs, i64::from(mtime.nanos)),
        (meta.mtime(), meta.mtime_nsec())
    );
}

#[test]
fn rename_flags_exchange_and_noreplace_are_kept() {
    let fx = Fixture::new(SyncMode::Strict, false);
    fs::write(fx.path("x"), b"X").expect("create x");
    fs::write(fx.path("y"), b"Y").expect("create y");
    let dir = rustix::fs::open(&fx.dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
        .expect("open mount dir");
    rustix::fs::renameat_with(&dir, "x", &dir, "y", rustix::fs::RenameFlags::EXCHANGE)
        .expect("exchange");
    let refused =
        rustix::fs::renameat_with(&dir, "x", &dir, "y", rustix::fs::RenameFlags::NOREPLACE);
    assert_eq!(refused, Err(rustix::io::Errno::EXIST));
    assert_eq!(fs::read(fx.under("x")).expect("x underneath"), b"Y");
    assert_eq!(fs::read(fx.under("y")).expect("y underneath"), b"X");
    // The file that now is `x` is still writable by its new name, and the write names it so.
    fs::OpenOptions::new()
        .append(true)
        .open(fx.path("x"))
        .expect("open x")
        .write_all(b"!")
        .expect("append");
    let ops: Vec<Op> = fx.recorder.take().into_iter().map(|(op, _)| op).collect();
    assert!(ops.contains(&Op::Rename {
        dir: 3,
        from: rel("x"),
        to: rel("y"),
        flags: rename_flags::EXCHANGE
    }));
    assert!(
        !ops.iter()
            .any(|op| matches!(op, Op::Rename { flags, .. } if *flags == rename_flags::NOREPLACE))
    );
    assert_eq!(
        ops.iter().rev().find(|op| matches!(op, Op::Write { .. })),
        Some(&Op::Write {
            dir: 3,
            path: rel("x"),
            offset: 1,
            data: b"!".to_vec()
        })
    );
    assert_eq!(fs::read(fx.under("x")).expect("x underneath"), b"Y!");
}

#[test]
fn xattrs_are_replicated_only_when_acl_replication_is_on() {
    for replicate in [false, true] {
        let fx = Fixture::new(SyncMode::Strict, replicate);
        fs::write(fx.path("f"), b"").expect("create");
        rustix::fs::setxattr(
            fx.path("f").as_path(),
            "user.k",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("setxattr");
        let mut buf = [0u8; 8];
        let n = rustix::fs::getxattr(fx.under("f").as_path(), "user.k", &mut buf[..])
            .expect("getxattr underneath");
        assert_eq!(&buf[..n], b"v");
        let n = rustix::fs::getxattr(fx.path("f").as_path(), "user.k", &mut buf[..])
            .expect("getxattr through mount");
        assert_eq!(&buf[..n], b"v");
        rustix::fs::removexattr(fx.path("f").as_path(), "user.k").expect("removexattr");
        let ops: Vec<Op> = fx.recorder.take().into_iter().map(|(op, _)| op).collect();
        let shipped = ops
            .iter()
            .filter(|op| matches!(op, Op::SetXattr { .. } | Op::RemoveXattr { .. }))
            .count();
        assert_eq!(shipped, if replicate { 2 } else { 0 }, "{ops:?}");
    }
}

#[test]
fn fsync_only_mode_queues_writes_and_waits_on_close_and_fsync() {
    let fx = Fixture::new(SyncMode::FsyncOnly, false);
    // Write-only open: the writeback cache needs the daemon to read pages too.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(fx.path("f"))
        .expect("create");
    file.write_all(b"abc").expect("write");
    file.write_all(b"def").expect("write");
    drop(file);
    let ops = fx.recorder.take();
    let written: Vec<WaitFor> = ops
        .iter()
        .filter_map(|(op, wait)| matches!(op, Op::Write { .. }).then_some(*wait))
        .collect();
    assert!(
        !written.is_empty() && written.iter().all(|w| *w == WaitFor::Queued),
        "{ops:?}"
    );
    let last_write = ops
        .iter()
        .rposition(|(op, _)| matches!(op, Op::Write { .. }))
        .expect("writes");
    assert!(
        ops[last_write..]
            .iter()
            .any(|(op, wait)| *wait == WaitFor::Applied && op.main_path() == &rel("f")),
        "close waits until the peer applied the queued writes: {ops:?}"
    );
    assert_eq!(fs::read(fx.under("f")).expect("read underneath"), b"abcdef");
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(fx.path("f"))
        .expect("open");
    file.write_all(b"g").expect("write");
    file.sync_data().expect("fdatasync");
    assert!(
        fx.recorder
            .take()
            .iter()
            .any(|(op, wait)| op.is_fsync() && *wait == WaitFor::Durable)
    );
    assert_eq!(
        fs::read(fx.under("f")).expect("read underneath"),
        b"abcdefg"
    );
}

#[test]
fn a_crashed_helper_leaves_a_mount_that_the_next_mount_recovers() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    fs::create_dir(&dir).expect("mkdir");
    fs::write(dir.join("kept"), b"kept").expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_safekit-rfs"))
        .args(["mount", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start safekit-rfs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready line");
    let mut child = HelperGuard {
        child,
        dir: dir.clone(),
    };
    assert_eq!(line.trim(), "ready");
    assert_eq!(
        fs::read(dir.join("kept")).expect("read through the helper's mount"),
        b"kept"
    );
    child.child.kill().expect("kill -9");
    child.child.wait().expect("reap");
    assert_eq!(
        fs::read_dir(&dir).map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::ENOTCONN)),
        "a dead helper's mount answers ENOTCONN"
    );
    let recorder = Arc::new(Recorder::default());
    let options = FsOptions {
        dir_index: 0,
        mode: SyncMode::Strict,
        replicate_xattrs: false,
    };
    let mounted = mount::mount_over(&dir, recorder, options)
        .expect("mounting again recovers the stale mount");
    let mut text = String::new();
    fs::File::open(dir.join("kept"))
        .expect("open")
        .read_to_string(&mut text)
        .expect("read");
    assert_eq!(text, "kept");
    mounted.unmount().expect("unmount");
    assert!(
        !fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .contains(dir.to_str().expect("utf-8 path")),
        "nothing stays mounted"
    );
}

#[test]
fn the_helper_unmounts_cleanly_on_sigterm() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    fs::create_dir(&dir).expect("mkdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_safekit-rfs"))
        .args(["mount", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start safekit-rfs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready line");
    let mut child = HelperGuard {
        child,
        dir: dir.clone(),
    };
    // A second helper on the same directory is refused (it would serve the
    // first one's mount through itself).
    let options = FsOptions {
        dir_index: 0,
        mode: SyncMode::Strict,
        replicate_xattrs: false,
    };
    let second = mount::mount_over(&dir, Arc::new(Recorder::default()), options);
    assert!(
        matches!(second, Err(mount::MountError::AlreadyMounted(_))),
        "{second:?}"
    );
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.child.id()).expect("pid fits"))
        .expect("pid not 0");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("send SIGTERM");
    let status = child.child.wait().expect("wait");
    assert!(status.success(), "exit status {status}");
    assert!(
        !fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .contains(dir.to_str().expect("utf-8"))
    );
}

#[test]
fn a_write_by_another_user_clears_the_set_user_id_bit_on_both_sides() {
    let fx = Fixture::with_setup(SyncMode::Strict, false, |dir| {
        fs::write(dir.join("suid"), b"").expect("create before mount");
        fs::set_permissions(dir.join("suid"), fs::Permissions::from_mode(0o4777))
            .expect("chmod u+s");
    });
    assert!(
        as_nobody(&format!("echo x >> '{}'", fx.path("suid").display())),
        "nobody may write a 0777 file"
    );
    let mode = fs::metadata(fx.under("suid"))
        .expect("stat underneath")
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o777, "the set-user-id bit is gone");
    let shipped = fx.recorder.take().into_iter().find_map(|(op, _)| match op {
        Op::SetAttr {
            mode: Some(mode), ..
        } => Some(mode & 0o7777),
        _ => None,
    });
    assert_eq!(shipped, Some(0o777), "and the peer is told");
}

#[test]
fn the_peer_gets_the_times_of_new_nodes_changed_directories_and_written_files() {
    let fx = Fixture::new(SyncMode::Strict, false);
    fs::create_dir(fx.path("d")).expect("mkdir");
    fs::write(fx.path("d/f"), b"content").expect("create, write, close");
    std::os::unix::fs::symlink("f", fx.path("d/l")).expect("symlink");
    let ops: Vec<Op> = fx.recorder.take().into_iter().map(|(op, _)| op).collect();
    // The last time shipped for each path is the time the node has here.
    let last_mtime = |path: &str| {
        ops.iter()
            .rev()
            .find_map(|op| match op {
                Op::SetAttr {
                    path: p,
                    mtime: Some(TimeSet::At(t)),
                    ..
                } if *p == rel(path) => Some((t.secs, i64::from(t.nanos))),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no mtime shipped for {path:?}: {ops:?}"))
    };
    for path in ["", "d", "d/f", "d/l"] {
        let meta = fs::symlink_metadata(fx.under(path)).expect("stat underneath");
        assert_eq!(
            last_mtime(path),
            (meta.mtime(), meta.mtime_nsec()),
            "mtime of {path:?}"
        );
    }
}

/// Everything a tree comparison looks at, for one entry.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    mtime: (i64, i64),
    content: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn snapshot(root: &Path) -> Vec<Entry> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<Entry>) {
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let meta = fs::symlink_metadata(&path).expect("stat");
        let content = if meta.file_type().is_symlink() {
            fs::read_link(&path)
                .expect("readlink")
                .into_os_string()
                .into_encoded_bytes()
        } else if meta.is_file() {
            fs::read(&path).expect("read")
        } else {
            Vec::new()
        };
        let mut xattrs = Vec::new();
        if !meta.file_type().is_symlink() {
            let mut names = vec![0u8; 4096];
            let n = rustix::fs::listxattr(path.as_path(), &mut names[..]).expect("listxattr");
            for name in names[..n]
                .split(|b| *b == 0)
                .filter(|n| n.starts_with(b"user."))
            {
                let name = String::from_utf8_lossy(name).into_owned();
                let mut value = vec![0u8; 4096];
                let len = rustix::fs::getxattr(path.as_path(), name.as_str(), &mut value[..])
                    .expect("getxattr");
                value.truncate(len);
                xattrs.push((name, value));
            }
            xattrs.sort();
        }
        out.push(Entry {
            path: rel.to_owned(),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.len(),
            nlink: meta.nlink(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            content,
            xattrs,
        });
        if meta.is_dir() {
            let mut names: Vec<String> = fs::read_dir(&path)
                .expect("read_dir")
                .map(|e| {
                    e.expect("entry")
                        .file_name()
                        .into_string()
                        .expect("utf-8 test names")
                })
                .collect();
            names.sort();
            for name in names {
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                walk(root, &child, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, "", &mut out);
    out
}

#[test]
fn replicated_to_a_receiver_on_loopback_the_two_trees_are_identical() {
    use safekit_linux_helper::apply::ReplicaRoot;
    use safekit_linux_helper::dirty::DirtyLog;
    use safekit_linux_helper::transport::{Receiver, Sender, SenderConfig};

    let tmp = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let (primary, replica) = (tmp.path().join("primary"), tmp.path().join("replica"));
    for dir in [&primary, &replica] {
        fs::create_dir(dir).expect("mkdir");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let secret = b"loopback test secret".to_vec();
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        secret.clone(),
        "mirror",
        ReplicaRoot::open(&[replica.as_path()]).expect("open replica"),
    )
    .expect("receiver listens");
    let dirty = Arc::new(DirtyLog::open(&tmp.path().join("dirty.log")).expect("dirty log"));
    let sender = Arc::new(
        Sender::new(SenderConfig::new(
            receiver.local_addr(),
            secret,
            "mirror",
            dirty,
        ))
        .expect("sender starts"),
    );
    while !sender.stats().connected {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let under = rustix::fs::open(
        &primary,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open primary before the mount");
    let options = FsOptions {
        dir_index: 0,
        mode: SyncMode::Strict,
        replicate_xattrs: true,
    };
    let mounted = mount::mount_over(&primary, sender.clone(), options).expect("mount");
    // Unmount even if the workload fails.
    struct Unmount(Option<MountedDir>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if let Some(m) = self.0.take() {
                let _ = m.unmount();
            }
        }
    }
    let mut mounted = Unmount(Some(mounted));

    let p = |rel: &str| primary.join(rel);
    fs::create_dir_all(p("a/b")).expect("mkdir -p");
    fs::write(p("a/b/file"), b"first version").expect("create");
    let mut sparse = fs::File::create(p("sparse")).expect("create sparse");
    sparse.write_all(b"head").expect("write");
    std::os::unix::fs::FileExt::write_at(&sparse, b"tail", 1 << 20).expect("write after a hole");
    sparse.sync_all().expect("fsync");
    drop(sparse);
    fs::rename(p("a/b/file"), p("a/moved")).expect("rename");
    fs::hard_link(p("a/moved"), p("hard")).expect("link");
    std::os::unix::fs::symlink("a/moved", p("sym")).expect("symlink");
    fs::set_permissions(p("a/moved"), fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(p("hard"), Some(4321), Some(8765)).expect("chown");
    fs::OpenOptions::new()
        .write(true)
        .open(p("sparse"))
        .expect("open")
        .set_len(600_000)
        .expect("truncate");
    rustix::fs::setxattr(
        p("a/moved").as_path(),
        "user.tag",
        b"blue",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("setxattr");
    fs::write(p("a/b/gone"), b"x").expect("create");
    fs::remove_file(p("a/b/gone")).expect("unlink");
    assert!(as_nobody(&format!(
        "echo nobody > '{}'",
        p("by-nobody").display()
    )));
    let dir = fs::File::open(&primary).expect("open the directory");
    dir.sync_all()
        .expect("fsyncdir: everything before it is on the replica");

    let underneath = PathBuf::from(format!("/proc/self/fd/{}/.", under.as_raw_fd()));
    let (ours, theirs) = (snapshot(&underneath), snapshot(&replica));
    assert_eq!(
        ours.len(),
        theirs.len(),
        "same entries: {ours:#?} vs {theirs:#?}"
    );
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b);
    }
    assert_eq!(sender.stats().apply_errors, 0);
    drop(mounted.0.take().map(MountedDir::unmount));
}

/// The files the activity log at `path` holds hot on disk (read from another handle).
fn hot_on_disk(path: &Path) -> Vec<(u16, RelPath)> {
    ActivityLog::load(path).expect("load the activity log")
}

#[test]
fn with_an_activity_log_every_changed_name_is_on_disk_before_the_call_returns() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let log_path = tmp.path().join("activity.log");
    let log = Arc::new(ActivityLog::open(&log_path, 64, None).expect("open the activity log"));
    let fx = Fixture::build(
        SyncMode::Strict,
        false,
        |dir| {
            for name in ["existing", "gone", "attr"] {
                fs::write(dir.join(name), b"before the mount").expect("write before the mount");
            }
        },
        |config| {
            config.activity_log = Some(log.clone());
            config.checkpoint_interval = None;
        },
    );
    let hot = |path: &str| hot_on_disk(&log_path).contains(&(3, rel(path)));

    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(fx.path("existing"))
        .expect("open an existing file");
    assert!(!hot("existing"), "opening changes nothing");
    file.write_all(b"changed").expect("write");
    assert!(hot("existing"), "on disk as hot once the write returned");
    drop(file);

    fs::set_permissions(fx.path("attr"), fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(hot("attr"));
    fs::create_dir(fx.path("d")).expect("mkdir");
    assert!(hot("d"));
    fs::write(fx.path("d/new"), b"new").expect("create");
    assert!(hot("d/new"));
    fs::rename(fx.path("d/new"), fx.path("d/renamed")).expect("rename");
    assert!(hot("d/new") && hot("d/renamed"), "both names of a rename");
    std::os::unix::fs::symlink("d/renamed", fx.path("sym")).expect("symlink");
    assert!(hot("sym"));
    fs::remove_file(fx.path("gone")).expect("unlink");
    assert!(hot("gone"));
    // Every change was shipped too.
    let ops = fx.recorder.take();
    assert!(ops.iter().any(|(op, _)| matches!(
        op,
        Op::Create {
            exclusive: true,
            ..
        }
    )));

    // Without a replication stream a file settles when its change returned;
    // it leaves at the second checkpoint that saw no write of it.
    log.checkpoint().expect("checkpoint");
    log.checkpoint().expect("checkpoint");
    assert_eq!(log.hot_files(), vec![]);
    assert_eq!(hot_on_disk(&log_path), vec![]);
}

#[test]
fn the_mounts_checkpoint_thread_lets_settled_files_go_cold_and_stops_at_unmount() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let log_path = tmp.path().join("activity.log");
    let log = Arc::new(ActivityLog::open(&log_path, 64, None).expect("open the activity log"));
    let mut fx = Fixture::build(
        SyncMode::Strict,
        false,
        |_| {},
        |config| {
            config.activity_log = Some(log.clone());
            config.checkpoint_interval = Some(std::time::Duration::from_millis(10));
        },
    );
    fs::write(fx.path("file"), b"data").expect("create and write");
    // Recorded before the call returned; the thread then checkpoints it away.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !log.hot_files().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the checkpoint thread never made the settled file cold"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(hot_on_disk(&log_path), vec![]);
    fx.mount
        .take()
        .expect("mounted")
        .unmount()
        .expect("unmount");
    assert_eq!(
        Arc::strong_count(&log),
        1,
        "neither the file system nor the checkpoint thread keeps the log after unmount"
    );
}

/// A mount over `primary` replicating to a receiver on loopback over `replica`.
struct Replicated {
    mount: Option<MountedDir>,
    sender: Arc<safekit_linux_helper::transport::Sender>,
    _receiver: safekit_linux_helper::transport::Receiver,
}

impl Replicated {
    fn start(
        primary: &Path,
        replica: &Path,
        dirty_log: &Path,
        configure: impl FnOnce(&Arc<safekit_linux_helper::transport::Sender>, &mut MountConfig),
    ) -> Replicated {
        use safekit_linux_helper::dirty::DirtyLog;
        use safekit_linux_helper::transport::{Receiver, Sender, SenderConfig};
        let secret = b"loopback test secret".to_vec();
        let replica_fd = rustix::fs::open(
            replica,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open replica");
        let receiver = Receiver::bind_serving_resync(
            "127.0.0.1:0",
            secret.clone(),
            "mirror",
            vec![replica_fd],
        )
        .expect("receiver listens");
        let dirty = Arc::new(DirtyLog::open(dirty_log).expect("dirty log"));
        let sender = Arc::new(
            Sender::new(SenderConfig::new(
                receiver.local_addr(),
                secret,
                "mirror",
                dirty,
            ))
            .expect("sender starts"),
        );
        while !sender.stats().connected {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut config = MountConfig::new(FsOptions {
            dir_index: 0,
            mode: SyncMode::Strict,
            replicate_xattrs: false,
        });
        configure(&sender, &mut config);
        let mount = mount::mount_over_with(primary, sender.clone(), config).expect("mount");
        Replicated {
            mount: Some(mount),
            sender,
            _receiver: receiver,
        }
    }
}

impl Drop for Replicated {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take()
            && let Err(error) = mount.unmount()
        {
            eprintln!("unmount failed: {error}");
        }
    }
}

fn two_dirs(tmp: &Path) -> (PathBuf, PathBuf) {
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let (primary, replica) = (tmp.join("primary"), tmp.join("replica"));
    for dir in [&primary, &replica] {
        fs::create_dir(dir).expect("mkdir");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    (primary, replica)
}

#[test]
fn a_written_file_leaves_the_activity_log_once_the_peer_acknowledged_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (primary, replica) = two_dirs(tmp.path());
    let log_path = tmp.path().join("activity.log");
    // The file exists on both sides: only the write can record it.
    for dir in [&primary, &replica] {
        fs::write(dir.join("file"), b"").expect("create before the mount");
    }
    let mut log = None;
    let mut replicated = Replicated::start(
        &primary,
        &replica,
        &tmp.path().join("dirty.log"),
        |sender, config| {
            let position: Arc<dyn StreamPosition> = sender.clone();
            let opened = Arc::new(
                ActivityLog::open(&log_path, 64, Some(position)).expect("open the activity log"),
            );
            config.activity_log = Some(opened.clone());
            config.checkpoint_interval = None;
            log = Some(opened);
        },
    );
    let log = log.expect("log opened");
    let file_key = (0, rel("file"));

    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(primary.join("file"))
        .expect("open");
    assert!(!hot_on_disk(&log_path).contains(&file_key));
    file.write_all(b"replicated").expect("write");
    assert!(
        hot_on_disk(&log_path).contains(&file_key),
        "hot on disk while the file is being written"
    );
    drop(file);
    // fsync of the directory returns once the peer made everything before it durable.
    fs::File::open(&primary)
        .expect("open the directory")
        .sync_all()
        .expect("fsyncdir");
    assert_eq!(
        fs::read(replica.join("file")).expect("replica has the file"),
        b"replicated"
    );
    let (issued, settled) = replicated.sender.stream_position();
    assert_eq!(issued, settled, "everything shipped is acknowledged");

    log.checkpoint().expect("checkpoint");
    log.checkpoint().expect("checkpoint");
    assert!(!log.hot_files().contains(&file_key));
    assert!(!hot_on_disk(&log_path).contains(&file_key));
    drop(replicated.mount.take().map(MountedDir::unmount));
}

/// Kind, mode, owner, size and content of every entry beneath `root` (no times).
fn contents(root: &Path) -> Vec<(String, u32, u32, u64, Vec<u8>)> {
    snapshot(root)
        .into_iter()
        .map(|entry| {
            let size = if entry.mode & libc::S_IFMT == libc::S_IFDIR {
                0
            } else {
                entry.size
            };
            (entry.path, entry.mode, entry.uid, size, entry.content)
        })
        .collect()
}

#[test]
fn a_full_resync_while_applications_rename_create_and_delete_through_the_mount_ends_identical() {
    use safekit_linux_helper::resync::{
        FileLocks, ResyncConfig, ResyncEngine, ResyncKind, ResyncOutcome,
    };
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let tmp = tempfile::tempdir().expect("temp dir");
    let (primary, replica) = two_dirs(tmp.path());
    let big_size: u64 = 16 << 20;
    let block = |i: u64| -> Vec<u8> {
        (0..64 * 1024u64)
            .map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8)
            .collect()
    };
    {
        let big = fs::File::create(primary.join("big")).expect("create big");
        for i in 0..big_size / (64 * 1024) {
            big.write_all_at(&block(i), i * 64 * 1024)
                .expect("write big");
        }
    }
    // The replica starts with a stale copy of the big file (every 8th block differs).
    fs::copy(primary.join("big"), replica.join("big")).expect("copy");
    {
        let stale = fs::OpenOptions::new()
            .write(true)
            .open(replica.join("big"))
            .expect("open the replica's copy");
        for i in (0..big_size / (64 * 1024)).step_by(8) {
            stale
                .write_all_at(b"stale", i * 64 * 1024)
                .expect("stale write");
        }
    }
    for d in 0..3 {
        fs::create_dir(primary.join(format!("d{d}"))).expect("mkdir");
        for f in 0..10 {
            fs::write(
                primary.join(format!("d{d}/f{f}")),
                format!("file {d}/{f}").repeat(100 * (f + 1)),
            )
            .expect("populate");
        }
    }
    let primary_fd = rustix::fs::open(
        &primary,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open primary before the mount");
    let locks = Arc::new(FileLocks::new());
    let mut replicated = Replicated::start(
        &primary,
        &replica,
        &tmp.path().join("dirty.log"),
        |_, config| config.locks = Some(locks.clone()),
    );
    let engine = ResyncEngine::new(
        ResyncConfig::new(tmp.path().join("resync.cursor")),
        replicated.sender.clone(),
        vec![primary_fd],
        locks.clone(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let big_name = Arc::new(Mutex::new(String::from("big")));
    let rewrites = Arc::new(AtomicU64::new(0));
    let rewriter = {
        let (primary, stop, big_name, rewrites) = (
            primary.clone(),
            stop.clone(),
            big_name.clone(),
            rewrites.clone(),
        );
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                let name = big_name.lock().expect("name");
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(primary.join(name.as_str()))
                    .expect("open the big file through the mount");
                let offset = (round * 7919 * 4096) % (big_size - 8192);
                file.write_all_at(&[round as u8; 8192], offset)
                    .expect("write through the mount");
                rewrites.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let namer = {
        let (primary, stop, big_name) = (primary.clone(), stop.clone(), big_name.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                let name = primary.join(format!("d{}/new{round}", round % 3));
                fs::write(&name, format!("new {round}").repeat(1000)).expect("create");
                match round % 3 {
                    0 => fs::remove_file(&name).expect("unlink"),
                    1 => fs::rename(
                        &name,
                        primary.join(format!("d{}/moved{round}", (round + 1) % 3)),
                    )
                    .expect("rename"),
                    _ => {}
                }
                if round % 4 == 1 {
                    // Rename a file that was there before, maybe before its resync.
                    let (d, f) = ((round / 4) % 3, (round / 4) % 10);
                    let from = primary.join(format!("d{d}/f{f}"));
                    if from.exists() {
                        fs::rename(&from, primary.join(format!("d{}/r{round}", (d + 1) % 3)))
                            .expect("rename an old file");
                    }
                }
                if round.is_multiple_of(2) {
                    // Rename the big file, sometimes while it is being resynced.
                    let mut current = big_name.lock().expect("name");
                    let next = if current.as_str() == "big" {
                        "big.renamed"
                    } else {
                        "big"
                    };
                    fs::rename(primary.join(current.as_str()), primary.join(next))
                        .expect("rename big");
                    *current = next.to_owned();
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let outcome = engine.run(ResyncKind::Full);
    stop.store(true, Ordering::SeqCst);
    rewriter.join().expect("rewriter");
    namer.join().expect("namer");
    assert!(
        matches!(outcome, Ok(ResyncOutcome::Completed { .. })),
        "{outcome:?}"
    );
    assert!(
        rewrites.load(Ordering::Relaxed) > 0,
        "the writer ran during the resync"
    );
    // Everything shipped before is on the replica once the directory's fsync returned.
    fs::File::open(&primary)
        .expect("open the directory")
        .sync_all()
        .expect("fsyncdir");
    // Unmounted, the directory shows the underlying tree.
    replicated
        .mount
        .take()
        .expect("mounted")
        .unmount()
        .expect("unmount");
    assert_eq!(contents(&primary), contents(&replica));
}
