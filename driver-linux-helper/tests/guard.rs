//! Tests of the guard of the replicated directories (needs root; fanotify and mounts).
//!
//! Every test runs in a thread of its own that first enters a private mount
//! namespace (`unshare(CLONE_NEWNS)`, propagation private), and works on a
//! tmpfs mounted there: nothing it mounts is visible to the host, and the
//! fanotify filesystem mark covers that tmpfs only. The processes a test
//! starts inherit the thread's namespace. The namespace, and every mount in
//! it, goes away when the thread ends, even when the test fails; the guards
//! and the FUSE mount are stopped by their `Drop` before that.
//!
//! The interceptor is either the real FUSE mount ([`mount::mount_over`]),
//! whose worker threads write beneath the directory from this process, or a
//! tmpfs mounted over the directory with this process writing beneath it
//! through the held descriptor, as the daemon does. The application that
//! bypasses the interceptor is a child `sh`, the guard lets this process
//! through. Each test checks the guard's reports, the dirty log and the
//! files, and orders its checks through the event queue (a later bypass write
//! is reported after every earlier event was handled), never by sleeping.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use safekit_linux_helper::apply::ReplicaRoot;
use safekit_linux_helper::dirty::DirtyLog;
use safekit_linux_helper::fs::{FsOptions, SyncMode};
use safekit_linux_helper::guard::{
    GuardEvent, GuardPolicy, PrimaryGuard, PrimaryGuardOptions, SecondaryGuard,
};
use safekit_linux_helper::mount;
use safekit_linux_helper::replicator::ReplicationOff;
use safekit_protocol::replication::{Op, RelPath, TouchedFile};

/// How long a test waits for a report that must come (a failure bound, not a measurement).
const REPORT_WAIT: Duration = Duration::from_secs(30);

fn rel(path: &str) -> RelPath {
    RelPath::parse(path.as_bytes()).expect("valid test path")
}

/// Runs `test` with a fresh tmpfs (its path is the argument) in a private mount namespace.
fn in_private_mount_namespace(test: impl FnOnce(&Path) + Send) {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests need root (CI runs them as root)"
    );
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .expect("unshare the mount namespace");
                rustix::mount::mount_change(
                    "/",
                    MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
                )
                .expect("make every mount private");
                let tmp = tempfile::tempdir().expect("temp dir");
                let root = tmp.path().join("fs");
                fs::create_dir(&root).expect("create the tmpfs mount point");
                rustix::mount::mount("tmpfs", &root, "tmpfs", MountFlags::empty(), c"mode=0755")
                    .expect("mount a tmpfs");
                /// Detaches every mount under the temporary directory, deepest first,
                /// so that the directory can be removed.
                struct Unmount(PathBuf);
                impl Drop for Unmount {
                    fn drop(&mut self) {
                        let prefix = self.0.to_string_lossy().into_owned();
                        let text =
                            fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
                        let mut points: Vec<&str> = text
                            .lines()
                            .filter_map(|line| line.split(' ').nth(4))
                            .filter(|point| point.starts_with(prefix.as_str()))
                            .collect();
                        points.sort_by_key(|point| std::cmp::Reverse(point.len()));
                        for point in points {
                            let _ = rustix::mount::unmount(point, UnmountFlags::DETACH);
                        }
                    }
                }
                let _unmount = Unmount(tmp.path().to_path_buf());
                test(&root);
            })
            .join()
    });
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A replicated directory `data` on the test's tmpfs, covered by a mount (the
/// interceptor's place), with a bind mount of it elsewhere, and the
/// underlying directory's descriptor opened before the cover.
struct Primary {
    root: PathBuf,
    elsewhere: PathBuf,
    under: OwnedFd,
    dirty_path: PathBuf,
    dirty: Arc<DirtyLog>,
}

impl Primary {
    /// Prepares the tree; `before_cover` runs before the directory is covered
    /// (a process that opens files then keeps them across the mount).
    fn new(root: &Path, before_cover: impl FnOnce(&Path)) -> Primary {
        let data = root.join("data");
        fs::create_dir_all(data.join("sub")).expect("create the replicated directory");
        fs::write(data.join("app.log"), b"original").expect("create a file");
        let elsewhere = root.join("elsewhere");
        fs::create_dir(&elsewhere).expect("create the bind mount point");
        rustix::mount::mount_bind(&data, &elsewhere).expect("bind mount the directory elsewhere");
        before_cover(&data);
        let under = mount::open_underlying(&data).expect("open the underlying directory");
        rustix::mount::mount("cover", &data, "tmpfs", MountFlags::empty(), c"mode=0755")
            .expect("cover the directory (stands in for the interceptor)");
        let state = root.join("state");
        fs::create_dir(&state).expect("create the state directory");
        let dirty_path = state.join("dirty");
        let dirty = Arc::new(DirtyLog::open(&dirty_path).expect("open the dirty log"));
        Primary {
            root: root.to_path_buf(),
            elsewhere,
            under,
            dirty_path,
            dirty,
        }
    }

    fn engage(&self, policy: GuardPolicy) -> (PrimaryGuard, Receiver<GuardEvent>) {
        PrimaryGuard::engage(
            &[(0, self.under.as_fd())],
            self.dirty.clone(),
            PrimaryGuardOptions {
                policy,
                ..PrimaryGuardOptions::default()
            },
        )
        .expect("engage the guard")
    }

    /// A file of the underlying (covered) directory, named through the held descriptor.
    fn under(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{}", self.under.as_raw_fd(), rel))
    }

    fn recorded(&self) -> Vec<TouchedFile> {
        DirtyLog::load(&self.dirty_path)
            .expect("load the dirty log")
            .files
    }
}

fn whole(path: &str) -> TouchedFile {
    TouchedFile {
        dir: 0,
        path: rel(path),
        range: None,
    }
}

fn next_report(reports: &Receiver<GuardEvent>) -> GuardEvent {
    reports
        .recv_timeout(REPORT_WAIT)
        .expect("the guard reports the bypass")
}

/// Runs `sh -c script` with `args`; returns (success, stderr).
fn sh(script: &str, args: &[&Path]) -> (bool, String, u32) {
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sh");
    let pid = child.id();
    let output = child.wait_with_output().expect("wait for sh");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        pid,
    )
}

/// A process that opened `file` for reading and writing and waits for the order to write.
struct HeldOpen {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HeldOpen {
    fn open(file: &Path) -> HeldOpen {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec 3<>"$1"; echo opened; read data; printf %s "$data" >&3 && echo written"#)
            .arg("sh")
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the holder");
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read from the holder");
        assert_eq!(line, "opened\n", "the holder opened the file");
        HeldOpen {
            child,
            stdin,
            stdout,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes `data` at offset 0 through the held descriptor; returns whether it worked.
    fn write(mut self, data: &str) -> bool {
        writeln!(self.stdin, "{data}").expect("order the write");
        let mut rest = String::new();
        self.stdout
            .read_to_string(&mut rest)
            .expect("read the outcome");
        let status = self.child.wait().expect("wait for the holder");
        status.success() && rest == "written\n"
    }
}

impl Drop for HeldOpen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_write_through_a_descriptor_kept_across_the_mount_is_recorded_for_resync() {
    in_private_mount_namespace(|root| {
        let mut holder = None;
        let primary = Primary::new(root, |data| {
            holder = Some(HeldOpen::open(&data.join("app.log")))
        });
        let holder = holder.expect("holder started");
        let (guard, reports) = primary.engage(GuardPolicy::Record);
        let holder_pid = holder.pid();
        assert!(
            holder.write("BYPASS"),
            "the bypass write itself is not refused"
        );
        let report = next_report(&reports);
        assert_eq!(
            report,
            GuardEvent {
                pid: holder_pid,
                dir: 0,
                path: rel("app.log"),
                denied: false
            }
        );
        assert_eq!(primary.recorded(), vec![whole("app.log")]);
        assert_eq!(
            fs::read(primary.under("app.log")).expect("read the file"),
            b"BYPASSal"
        );
        assert!(
            guard
                .stats()
                .bypass_writes
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
    });
}

#[test]
fn a_write_through_a_bind_mount_elsewhere_is_recorded_with_its_path_in_the_directory() {
    in_private_mount_namespace(|root| {
        let primary = Primary::new(root, |_| {});
        let (_guard, reports) = primary.engage(GuardPolicy::Record);
        let target = primary.elsewhere.join("sub/new.dat");
        let (ok, stderr, pid) = sh(r#"printf data > "$1""#, &[&target]);
        assert!(ok, "write through the bind mount: {stderr}");
        assert_eq!(
            next_report(&reports),
            GuardEvent {
                pid,
                dir: 0,
                path: rel("sub/new.dat"),
                denied: false
            }
        );
        assert_eq!(primary.recorded(), vec![whole("sub/new.dat")]);
    });
}

#[test]
fn unlink_rename_mkdir_and_chmod_through_a_bypass_are_recorded() {
    in_private_mount_namespace(|root| {
        let primary = Primary::new(root, |_| {});
        fs::write(primary.under("sub/inner"), b"x").expect("daemon creates a file");
        let (_guard, reports) = primary.engage(GuardPolicy::Record);
        let (ok, stderr, _) = sh(
            r#"rm "$1/app.log" && mv "$1/sub" "$1/moved" && mkdir "$1/newdir" && chmod 600 "$1/moved/inner""#,
            &[&primary.elsewhere],
        );
        assert!(ok, "namespace changes through the bind mount: {stderr}");
        // Each command is a process of its own: check the paths, and that none is the daemon.
        let mut reported: Vec<(Vec<u8>, bool)> = (0..5)
            .map(|_| next_report(&reports))
            .inspect(|report| assert_ne!(report.pid, std::process::id()))
            .map(|report| (report.path.to_bytes(), report.denied))
            .collect();
        reported.sort();
        let expected_paths: [&[u8]; 5] = [b"app.log", b"moved", b"moved/inner", b"newdir", b"sub"];
        assert_eq!(
            reported,
            expected_paths
                .iter()
                .map(|path| (path.to_vec(), false))
                .collect::<Vec<_>>()
        );
        let mut recorded = primary.recorded();
        recorded.sort_by_key(|touched| touched.path.to_bytes());
        assert_eq!(
            recorded,
            expected_paths
                .iter()
                .map(|path| whole(std::str::from_utf8(path).expect("utf-8")))
                .collect::<Vec<_>>()
        );
    });
}

#[test]
fn the_daemons_own_writes_and_files_outside_the_directory_are_not_flagged() {
    in_private_mount_namespace(|root| {
        let primary = Primary::new(root, |_| {});
        let (_guard, reports) = primary.engage(GuardPolicy::Record);
        // The daemon (this process) writes beneath the mount, as the FUSE layer does.
        fs::write(primary.under("own.txt"), b"mine").expect("daemon write");
        fs::write(primary.under("app.log"), b"rewritten by the daemon").expect("daemon write");
        // Another process writes on the same file system, outside the directory.
        let outside = primary.root.join("outside.txt");
        let (ok, stderr, _) = sh(r#"printf x > "$1""#, &[&outside]);
        assert!(ok, "write outside: {stderr}");
        // A bypass write comes after both in the event queue: the first report must be it.
        let marker = primary.elsewhere.join("marker");
        let (ok, stderr, pid) = sh(r#"printf x > "$1""#, &[&marker]);
        assert!(ok, "bypass write: {stderr}");
        let report = next_report(&reports);
        assert_eq!((report.pid, report.path), (pid, rel("marker")));
        assert_eq!(primary.recorded(), vec![whole("marker")]);
        assert!(reports.try_recv().is_err(), "nothing else reported");
    });
}

#[test]
fn under_the_deny_policy_a_bypass_write_fails_with_eperm_and_changes_nothing() {
    in_private_mount_namespace(|root| {
        let mut holder = None;
        let primary = Primary::new(root, |data| {
            holder = Some(HeldOpen::open(&data.join("app.log")))
        });
        let holder = holder.expect("holder started");
        let (_guard, reports) = primary.engage(GuardPolicy::Deny);
        let target = primary.elsewhere.join("app.log");
        let (ok, stderr, pid) = sh(r#"printf BYPASS >> "$1""#, &[&target]);
        assert!(!ok, "the bypass write must fail");
        assert!(
            stderr.contains("Operation not permitted"),
            "EPERM expected, got: {stderr}"
        );
        assert_eq!(
            fs::read(primary.under("app.log")).expect("read the file"),
            b"original",
            "the file is unchanged"
        );
        assert_eq!(
            next_report(&reports),
            GuardEvent {
                pid,
                dir: 0,
                path: rel("app.log"),
                denied: true
            }
        );
        assert!(
            primary.recorded().is_empty(),
            "nothing changed, nothing to resync"
        );
        // The daemon itself still works beneath the mount.
        fs::write(primary.under("app.log"), b"daemon").expect("the daemon may write");
        // A descriptor opened before the guard cannot be refused (the kernel
        // decides at open time): its write is recorded instead.
        let holder_pid = holder.pid();
        assert!(
            holder.write("OLD"),
            "a write through an old descriptor goes through"
        );
        assert_eq!(
            next_report(&reports),
            GuardEvent {
                pid: holder_pid,
                dir: 0,
                path: rel("app.log"),
                denied: false
            }
        );
        assert_eq!(primary.recorded(), vec![whole("app.log")]);
    });
}

#[test]
fn with_the_real_fuse_mount_only_the_bypass_write_is_flagged() {
    in_private_mount_namespace(|root| {
        let data = root.join("data");
        fs::create_dir(&data).expect("create the replicated directory");
        fs::write(data.join("held.log"), b"original").expect("create a file");
        let holder = HeldOpen::open(&data.join("held.log"));
        let under = mount::open_underlying(&data).expect("open the underlying directory");
        let dirty_path = root.join("dirty");
        let dirty = Arc::new(DirtyLog::open(&dirty_path).expect("open the dirty log"));
        let (_guard, reports) =
            PrimaryGuard::engage(&[(0, under.as_fd())], dirty, PrimaryGuardOptions::default())
                .expect("engage the guard");
        let mounted = mount::mount_over(
            &data,
            Arc::new(ReplicationOff),
            FsOptions {
                dir_index: 0,
                mode: SyncMode::Strict,
                replicate_xattrs: false,
            },
        )
        .expect("mount over the directory");
        // An application writes through the mount: the daemon writes beneath it.
        let app_file = data.join("through-the-mount.txt");
        let (ok, stderr, _) = sh(r#"printf hello > "$1""#, &[&app_file]);
        assert!(ok, "write through the mount: {stderr}");
        assert_eq!(
            fs::read(format!(
                "/proc/self/fd/{}/through-the-mount.txt",
                under.as_raw_fd()
            ))
            .expect("read beneath the mount"),
            b"hello"
        );
        // Then the process that kept its descriptor across the mount writes.
        let holder_pid = holder.pid();
        assert!(holder.write("BYPASS"), "the bypass write goes through");
        let report = next_report(&reports);
        assert_eq!(
            report,
            GuardEvent {
                pid: holder_pid,
                dir: 0,
                path: rel("held.log"),
                denied: false
            },
            "the daemon's write through the mount came first and was not reported"
        );
        assert_eq!(
            DirtyLog::load(&dirty_path).expect("load").files,
            vec![whole("held.log")]
        );
        mounted.unmount().expect("unmount");
    });
}

#[test]
fn with_the_real_fuse_mount_the_deny_policy_lets_applications_work_through_the_mount() {
    in_private_mount_namespace(|root| {
        let data = root.join("data");
        fs::create_dir(&data).expect("create the replicated directory");
        fs::write(data.join("app.log"), b"original").expect("create a file");
        let elsewhere = root.join("elsewhere");
        fs::create_dir(&elsewhere).expect("create the bind mount point");
        rustix::mount::mount_bind(&data, &elsewhere).expect("bind mount the directory elsewhere");
        let under = mount::open_underlying(&data).expect("open the underlying directory");
        let dirty_path = root.join("dirty");
        let dirty = Arc::new(DirtyLog::open(&dirty_path).expect("open the dirty log"));
        let (_guard, reports) = PrimaryGuard::engage(
            &[(0, under.as_fd())],
            dirty,
            PrimaryGuardOptions {
                policy: GuardPolicy::Deny,
                ..PrimaryGuardOptions::default()
            },
        )
        .expect("engage the guard");
        let mounted = mount::mount_over(
            &data,
            Arc::new(ReplicationOff),
            FsOptions {
                dir_index: 0,
                mode: SyncMode::Strict,
                replicate_xattrs: false,
            },
        )
        .expect("mount over the directory");
        // Through the mount, the daemon opens the underlying files: allowed.
        let (ok, stderr, _) = sh(
            r#"printf ' appended' >> "$1/app.log" && printf new > "$1/new.txt" && cat "$1/app.log""#,
            &[&data],
        );
        assert!(ok, "writes through the mount work under Deny: {stderr}");
        // Around the mount, through the bind mount: refused.
        let (ok, stderr, pid) = sh(r#"printf BYPASS >> "$1/app.log""#, &[&elsewhere]);
        assert!(
            !ok && stderr.contains("Operation not permitted"),
            "{stderr}"
        );
        assert_eq!(
            next_report(&reports),
            GuardEvent {
                pid,
                dir: 0,
                path: rel("app.log"),
                denied: true
            }
        );
        assert_eq!(
            fs::read(data.join("app.log")).expect("read through the mount"),
            b"original appended"
        );
        mounted.unmount().expect("unmount");
        assert!(DirtyLog::load(&dirty_path).expect("load").files.is_empty());
    });
}

#[test]
fn a_replicated_directory_that_is_the_root_of_its_file_system_is_guarded() {
    in_private_mount_namespace(|root| {
        // The usual production layout: the replicated directory is a file system
        // of its own, and the FUSE mount is stacked on its mount point.
        fs::write(root.join("held.log"), b"original").expect("create a file");
        let holder = HeldOpen::open(&root.join("held.log"));
        let under = mount::open_underlying(root).expect("open the underlying directory");
        let dirty_path = root.with_file_name("dirty");
        let dirty = Arc::new(DirtyLog::open(&dirty_path).expect("open the dirty log"));
        let (_guard, reports) =
            PrimaryGuard::engage(&[(7, under.as_fd())], dirty, PrimaryGuardOptions::default())
                .expect("engage the guard");
        let mounted = mount::mount_over(
            root,
            Arc::new(ReplicationOff),
            FsOptions {
                dir_index: 7,
                mode: SyncMode::Strict,
                replicate_xattrs: false,
            },
        )
        .expect("mount over the directory");
        let (ok, stderr, _) = sh(r#"printf hello > "$1""#, &[&root.join("app.txt")]);
        assert!(ok, "write through the mount: {stderr}");
        let holder_pid = holder.pid();
        assert!(holder.write("BYPASS"), "the bypass write goes through");
        assert_eq!(
            next_report(&reports),
            GuardEvent {
                pid: holder_pid,
                dir: 7,
                path: rel("held.log"),
                denied: false
            }
        );
        mounted.unmount().expect("unmount");
        assert_eq!(
            DirtyLog::load(&dirty_path).expect("load").files,
            vec![TouchedFile {
                dir: 7,
                path: rel("held.log"),
                range: None
            }]
        );
    });
}

#[test]
fn on_the_secondary_a_deny_guard_also_stops_writes_through_other_mounts() {
    in_private_mount_namespace(|root| {
        let data = root.join("data");
        fs::create_dir(&data).expect("create the replica");
        fs::write(data.join("a.txt"), b"one").expect("create a file");
        let elsewhere = root.join("elsewhere");
        fs::create_dir(&elsewhere).expect("create the bind mount point");
        rustix::mount::mount_bind(&data, &elsewhere).expect("bind mount the replica elsewhere");
        let mut receiver = ReplicaRoot::open(&[&data]).expect("the receiver opens its directory");
        let under = mount::open_underlying(&data).expect("open the directory");
        let dirty = Arc::new(DirtyLog::open(&root.join("dirty")).expect("open the dirty log"));
        // The receiver runs in this process: the guard lets its pid through.
        let (_deny, reports) = PrimaryGuard::engage(
            &[(0, under.as_fd())],
            dirty,
            PrimaryGuardOptions {
                policy: GuardPolicy::Deny,
                ..PrimaryGuardOptions::default()
            },
        )
        .expect("engage the deny guard");
        let _read_only = SecondaryGuard::engage(&[&data]).expect("engage the read-only guard");
        let (ok, stderr, _) = sh(r#"printf x >> "$1""#, &[&data.join("a.txt")]);
        assert!(!ok && stderr.contains("Read-only file system"), "{stderr}");
        let (ok, stderr, pid) = sh(r#"printf x >> "$1""#, &[&elsewhere.join("a.txt")]);
        assert!(
            !ok && stderr.contains("Operation not permitted"),
            "{stderr}"
        );
        assert_eq!(
            next_report(&reports),
            GuardEvent {
                pid,
                dir: 0,
                path: rel("a.txt"),
                denied: true
            }
        );
        receiver
            .apply(&Op::Write {
                dir: 0,
                path: rel("a.txt"),
                offset: 3,
                data: b" two".to_vec(),
            })
            .expect("the receiver still applies");
        assert_eq!(fs::read(data.join("a.txt")).expect("read"), b"one two");
    });
}

/// The errno of an `io::Result`'s error.
fn errno<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    result
        .expect_err("must be refused")
        .raw_os_error()
        .expect("an OS error")
}

#[test]
fn the_secondary_replica_is_read_only_for_applications_but_not_for_the_receiver() {
    in_private_mount_namespace(|root| {
        let data = root.join("data");
        fs::create_dir(&data).expect("create the replica");
        fs::write(data.join("a.txt"), b"one").expect("create a file");
        let mut receiver = ReplicaRoot::open(&[&data]).expect("the receiver opens its directory");
        let mut guard = SecondaryGuard::engage(&[&data]).expect("engage");
        assert!(SecondaryGuard::is_engaged(&data).expect("mount table"));

        let erofs = libc::EROFS;
        assert_eq!(
            errno(fs::OpenOptions::new().write(true).open(data.join("a.txt"))),
            erofs
        );
        assert_eq!(errno(fs::write(data.join("new.txt"), b"x")), erofs);
        assert_eq!(errno(fs::remove_file(data.join("a.txt"))), erofs);
        assert_eq!(
            errno(fs::rename(data.join("a.txt"), data.join("b.txt"))),
            erofs
        );
        assert_eq!(errno(fs::create_dir(data.join("d"))), erofs);
        let (ok, stderr, _) = sh(r#"printf x >> "$1""#, &[&data.join("a.txt")]);
        assert!(!ok && stderr.contains("Read-only file system"), "{stderr}");
        assert_eq!(fs::read(data.join("a.txt")).expect("reads work"), b"one");

        for op in [
            Op::Write {
                dir: 0,
                path: rel("a.txt"),
                offset: 0,
                data: b"ONE".to_vec(),
            },
            Op::Create {
                dir: 0,
                path: rel("created.txt"),
                mode: 0o644,
                uid: 0,
                gid: 0,
                exclusive: true,
            },
            Op::Rename {
                dir: 0,
                from: rel("created.txt"),
                to: rel("renamed.txt"),
                flags: 0,
            },
            Op::Unlink {
                dir: 0,
                path: rel("renamed.txt"),
            },
            Op::Mkdir {
                dir: 0,
                path: rel("made"),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
        ] {
            receiver
                .apply(&op)
                .unwrap_or_else(|e| panic!("the receiver applies {op:?}: {e}"));
        }
        assert_eq!(fs::read(data.join("a.txt")).expect("read"), b"ONE");
        assert!(data.join("made").is_dir());
        assert!(!data.join("renamed.txt").exists());

        guard.release().expect("release");
        guard.release().expect("a second release does nothing");
        assert!(!SecondaryGuard::is_engaged(&data).expect("mount table"));
        fs::write(data.join("after.txt"), b"writable").expect("writable again");
        fs::remove_file(data.join("a.txt")).expect("unlink works again");
    });
}

#[test]
fn the_read_only_mount_also_reaches_where_the_file_system_is_shared() {
    in_private_mount_namespace(|root| {
        let data = root.join("data");
        fs::create_dir(&data).expect("create the replica");
        // A peer of the replica's file system mount (as another mount namespace
        // of the node receiving its mounts would be).
        rustix::mount::mount_change(root, MountPropagationFlags::SHARED)
            .expect("make the tmpfs mount shared");
        let peer = root.with_file_name("peer");
        fs::create_dir(&peer).expect("create the peer mount point");
        rustix::mount::mount_bind(root, &peer).expect("bind the file system elsewhere");
        let mut guard = SecondaryGuard::engage(&[&data]).expect("engage");
        assert_eq!(errno(fs::write(data.join("x"), b"x")), libc::EROFS);
        assert_eq!(
            errno(fs::write(peer.join("data/x"), b"x")),
            libc::EROFS,
            "the propagated copy is read-only too"
        );
        guard.release().expect("release");
        fs::write(peer.join("data/x"), b"x").expect("writable again through the peer");
        fs::write(data.join("y"), b"y").expect("writable again");
    });
}

fn mounts_on(dir: &Path) -> usize {
    let text = fs::read_to_string("/proc/thread-self/mountinfo").expect("mountinfo");
    let dir = dir.to_str().expect("utf-8 test path");
    text.lines()
        .filter(|line| line.split(' ').nth(4) == Some(dir))
        .count()
}

#[test]
fn a_read_only_mount_left_by_a_crash_is_removed_on_the_next_start() {
    in_private_mount_namespace(|root| {
        let data = root.join("data");
        fs::create_dir(&data).expect("create the replica");
        let crashed = SecondaryGuard::engage(&[&data]).expect("engage");
        // A crash: the process is gone, its mount stays.
        std::mem::forget(crashed);
        assert_eq!(errno(fs::write(data.join("x"), b"x")), libc::EROFS);
        assert_eq!(mounts_on(&data), 1);

        // Engaging again (a restart) replaces the leftover instead of stacking a second mount.
        let again = SecondaryGuard::engage(&[&data]).expect("engage after a crash");
        assert_eq!(mounts_on(&data), 1);
        std::mem::forget(again);

        assert_eq!(
            SecondaryGuard::remove_leftovers(&[&data]).expect("remove leftovers"),
            1
        );
        assert_eq!(mounts_on(&data), 0);
        fs::write(data.join("x"), b"x").expect("writable again");
        assert_eq!(
            SecondaryGuard::remove_leftovers(&[&data]).expect("nothing left"),
            0
        );
    });
}
