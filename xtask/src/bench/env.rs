//! The bench's two-node test bed: network namespaces, loop devices, file systems.
//!
//! Two servers have two disks, so each bench node keeps its data on an ext4
//! file system of its own (an image file, written in full, on a loop device), and both
//! images live on the same backing store: a directory of the machine's disk,
//! or a tmpfs (RAM), which isolates our CPU and protocol cost from disk
//! contention. The nodes talk over a veth pair between two network namespaces;
//! only the helpers' network namespace changes (`nsenter --net`), never their
//! mount namespace, so fio on the host sees the FUSE mount.
//!
//! Every name carries the bench's pid (`safekit-bench-<pid>`,
//! `skbench-<pid>-n1`), so [`sweep_stale`] can remove what a bench killed
//! outright left behind. [`Env`] undoes everything it created when dropped,
//! on success, error and panic alike.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::Store;

/// Node addresses on the veth pair (only inside the bench's namespaces).
pub(crate) const NODE1_ADDR: &str = "10.254.0.1";
pub(crate) const NODE2_ADDR: &str = "10.254.0.2";

/// Runs a command quietly; returns its stdout, or an error with its stderr.
pub(crate) fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot start `{program}` (is it installed?)"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Like [`sh`], for cleanup: failures are printed, not returned.
fn sh_quiet(program: &str, args: &[&str]) -> bool {
    match sh(program, args) {
        Ok(_) => true,
        Err(error) => {
            eprintln!("bench cleanup: {error:#}");
            false
        }
    }
}

/// Fails unless we are root (loop devices, mounts, namespaces).
pub(crate) fn require_root() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").context("cannot read /proc")?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    if uid != "0" {
        bail!("the bench needs root (loop devices, mounts, network namespaces): run it as root");
    }
    Ok(())
}

/// Fails with the apt package to install when a tool is missing.
pub(crate) fn require_tools() -> anyhow::Result<()> {
    let tools = [
        ("fio", "fio"),
        ("mkfs.ext4", "e2fsprogs"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("dd", "coreutils"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
        ("sync", "coreutils"),
    ];
    let mut missing = Vec::new();
    for (tool, package) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            missing.push(format!("{tool} (apt-get install -y {package})"));
        }
    }
    if !missing.is_empty() {
        bail!("missing tools: {}", missing.join(", "));
    }
    Ok(())
}

/// Fails with the apt command to install when a tool of the failover bench
/// is missing: keepalived (the comparison; not in CI) and python3 (the demo
/// application and the client's probe). The namespace harness checks its own
/// tools (ip, nft, nsenter, ...) when it builds a cluster.
pub(crate) fn require_failover_tools() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (tool, package) in [("keepalived", "keepalived"), ("python3", "python3")] {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            missing.push((tool, package));
        }
    }
    if !missing.is_empty() {
        let tools: Vec<&str> = missing.iter().map(|(tool, _)| *tool).collect();
        let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
        bail!(
            "the failover bench needs {} (missing): apt-get install -y {}",
            tools.join(" and "),
            packages.join(" ")
        );
    }
    Ok(())
}

/// Host paths and names of one bench run (one backing store).
#[derive(Debug)]
pub(crate) struct Env {
    pub(crate) store: Store,
    /// What the images live on, for the report.
    pub(crate) backing: String,
    /// Node 1's file system (holds `plain/` and `data/`).
    pub(crate) node1: PathBuf,
    /// Node 2's file system (holds `data/`).
    pub(crate) node2: PathBuf,
    /// Logs, secret, control sockets (not on the nodes' file systems).
    pub(crate) misc: PathBuf,
    /// Network namespace names of node 1 and node 2.
    pub(crate) netns: [String; 2],
    /// Whether the loop devices do direct I/O on their image files.
    pub(crate) direct_io: bool,
    /// Root of everything this run created on the host.
    base: PathBuf,
    tmpfs: Option<PathBuf>,
    loops: Vec<String>,
    mounts: Vec<PathBuf>,
    netns_created: Vec<String>,
}

/// Root directory of this bench process's files under `parent`.
pub(crate) fn bench_base(parent: &Path) -> PathBuf {
    parent.join(format!("safekit-bench-{}", std::process::id()))
}

impl Env {
    /// Creates both nodes on `store` (images under `parent` for the disk store,
    /// on a tmpfs mounted under it for RAM). On error, what was made is undone.
    pub(crate) fn setup(store: Store, parent: &Path, image_mib: u64) -> anyhow::Result<Env> {
        let base = bench_base(parent).join(store.name());
        let pid = std::process::id();
        let mut env = Env {
            store,
            backing: String::new(),
            node1: base.join("node1"),
            node2: base.join("node2"),
            misc: base.join("misc"),
            netns: [format!("skbench-{pid}-n1"), format!("skbench-{pid}-n2")],
            direct_io: false,
            base: base.clone(),
            tmpfs: None,
            loops: Vec::new(),
            mounts: Vec::new(),
            netns_created: Vec::new(),
        };
        env.build(parent, image_mib)?;
        Ok(env)
    }

    fn build(&mut self, parent: &Path, image_mib: u64) -> anyhow::Result<()> {
        let images = self.base.join("images");
        for dir in [&images, &self.node1, &self.node2, &self.misc] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        match self.store {
            Store::Disk => {
                let fs = sh("df", &["--output=source,fstype", &path_str(parent)?])
                    .ok()
                    .and_then(|out| {
                        out.lines()
                            .nth(1)
                            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    })
                    .unwrap_or_else(|| "?".to_owned());
                self.backing = format!("disk: image files in {} ({fs})", parent.display());
            }
            Store::Ram => {
                sh(
                    "mount",
                    &[
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={}M,mode=0700", 2 * image_mib + 64),
                        "skbench",
                        &path_str(&images)?,
                    ],
                )?;
                self.tmpfs = Some(images.clone());
                self.backing = "RAM: image files on a tmpfs".to_owned();
            }
        }
        let mut dio = true;
        for (index, mount_point) in [self.node1.clone(), self.node2.clone()].iter().enumerate() {
            let image = images.join(format!("node{}.ext4", index + 1));
            let image_str = path_str(&image)?;
            // Written in full (not sparse), and never discarded: the first
            // target would otherwise pay for allocating the image's blocks in
            // the backing store (tmpfs pages, host ext4 extents) and the
            // later ones not, or each again after a trim.
            sh(
                "dd",
                &[
                    "if=/dev/zero",
                    &format!("of={image_str}"),
                    "bs=4M",
                    &format!("count={}", image_mib / 4),
                    "conv=fsync",
                    "status=none",
                ],
            )?;
            sh(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                    &image_str,
                ],
            )?;
            let device = sh(
                "losetup",
                &["--find", "--show", "--direct-io=on", &image_str],
            )?
            .trim()
            .to_owned();
            if device.is_empty() {
                bail!("losetup gave no device for {image_str}");
            }
            self.loops.push(device.clone());
            let flag = sh(
                "losetup",
                &["--noheadings", "--output", "DIO", "--list", &device],
            )
            .unwrap_or_default();
            dio &= flag.trim() == "1";
            sh("mount", &["-t", "ext4", &device, &path_str(mount_point)?])?;
            self.mounts.push(mount_point.clone());
        }
        self.direct_io = dio;
        self.backing.push_str(if dio {
            ", loop devices with direct I/O"
        } else {
            ", loop devices through the page cache"
        });
        self.make_dirs()?;
        // The network: node1 <-veth-> node2.
        for ns in self.netns.clone() {
            sh("ip", &["netns", "add", &ns])?;
            self.netns_created.push(ns.clone());
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let [ns1, ns2] = self.netns.clone();
        sh(
            "ip",
            &[
                "-n", &ns1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
                &ns2,
            ],
        )?;
        for (ns, addr) in [(&ns1, NODE1_ADDR), (&ns2, NODE2_ADDR)] {
            sh(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            sh("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        }
        // Wait for the link (DAD is irrelevant for IPv4; carrier is immediate on veth).
        for _ in 0..50 {
            if self.ping(1).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("node1 cannot ping node2 over the veth pair")
    }

    fn make_dirs(&self) -> anyhow::Result<()> {
        for dir in [self.plain_dir(), self.data_dir(1), self.data_dir(2)] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(())
    }

    /// The baseline directory on node 1's file system.
    pub(crate) fn plain_dir(&self) -> PathBuf {
        self.node1.join("plain")
    }

    /// The replicated directory of node `k` (1 or 2).
    pub(crate) fn data_dir(&self, k: usize) -> PathBuf {
        if k == 1 {
            self.node1.join("data")
        } else {
            self.node2.join("data")
        }
    }

    /// `nsenter --net=<node k's namespace>` followed by the program.
    pub(crate) fn in_node(&self, k: usize, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.netns[k - 1]));
        command.arg(program);
        command
    }

    /// Pings node 2 from node 1 `count` times; the round-trip times in µs.
    pub(crate) fn ping(&self, count: u32) -> anyhow::Result<Vec<f64>> {
        let out = sh(
            "nsenter",
            &[
                &format!("--net=/run/netns/{}", self.netns[0]),
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                "0.01",
                "-W",
                "1",
                NODE2_ADDR,
            ],
        )?;
        let rtts: Vec<f64> = out
            .lines()
            .filter_map(|l| l.split("time=").nth(1))
            .filter_map(|t| t.split_whitespace().next())
            .filter_map(|t| t.parse::<f64>().ok())
            .map(|ms| ms * 1000.0)
            .collect();
        if rtts.is_empty() {
            bail!("no ping answer from node2");
        }
        Ok(rtts)
    }

    /// Empties the nodes' directories (beneath any mount: call it with the
    /// helpers stopped). No trim: the images stay fully allocated.
    pub(crate) fn clean(&self) -> anyhow::Result<()> {
        for dir in [self.plain_dir(), self.data_dir(1), self.data_dir(2)] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot empty {}", dir.display()))?;
            }
        }
        let _ = std::fs::remove_file(self.node1.join("dirty.log"));
        self.make_dirs()?;
        for fs in [&self.node1, &self.node2] {
            sh("sync", &["-f", &path_str(fs)?])?;
        }
        Ok(())
    }

    /// Undoes everything, in reverse order; reports problems on stderr.
    fn teardown(&mut self) {
        // A FUSE mount left by a helper that did not stop cleanly.
        if is_mount_point(&self.data_dir(1))
            && let Ok(path) = path_str(&self.data_dir(1))
        {
            sh_quiet("umount", &["-l", &path]);
        }
        while let Some(mount_point) = self.mounts.pop() {
            if let Ok(path) = path_str(&mount_point)
                && sh("umount", &[&path]).is_err()
            {
                sh_quiet("umount", &["-l", &path]);
            }
        }
        while let Some(device) = self.loops.pop() {
            sh_quiet("losetup", &["-d", &device]);
        }
        while let Some(ns) = self.netns_created.pop() {
            sh_quiet("ip", &["netns", "del", &ns]);
        }
        if let Some(tmpfs) = self.tmpfs.take()
            && let Ok(path) = path_str(&tmpfs)
            && sh("umount", &[&path]).is_err()
        {
            sh_quiet("umount", &["-l", &path]);
        }
        if self.base.exists()
            && let Err(error) = std::fs::remove_dir_all(&self.base)
        {
            eprintln!(
                "bench cleanup: cannot remove {}: {error}",
                self.base.display()
            );
        }
        if let Some(parent) = self.base.parent() {
            // Empty once every store's run is done; fails harmlessly otherwise.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.teardown();
    }
}

pub(crate) fn path_str(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Mount points of the host's mount namespace.
fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect()
}

pub(crate) fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

/// Whether `pid` is a live bench (an `xtask` process).
fn bench_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "xtask")
}

/// Removes what a bench that died without cleaning up (kill -9) left under
/// `parent` and in the namespace list: its helpers, mounts, loop devices,
/// namespaces and files. Best effort; problems are printed.
pub(crate) fn sweep_stale(parent: &Path) {
    let me = std::process::id();
    let dead = |pid: u32| pid != me && !bench_alive(pid);
    if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("safekit-bench-")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !dead(pid) {
                continue;
            }
            let base = entry.path();
            eprintln!(
                "bench: removing what a dead bench (pid {pid}) left in {}",
                base.display()
            );
            kill_processes_mentioning(&base);
            let mut mounts: Vec<PathBuf> = mount_points()
                .into_iter()
                .filter(|m| m.starts_with(&base))
                .collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for mount in mounts {
                if let Ok(path) = path_str(&mount) {
                    sh_quiet("umount", &["-l", &path]);
                }
            }
            if let Ok(list) = sh(
                "losetup",
                &["--noheadings", "--output", "NAME,BACK-FILE", "--list"],
            ) {
                for line in list.lines() {
                    let mut fields = line.split_whitespace();
                    if let (Some(dev), Some(file)) = (fields.next(), fields.next())
                        && Path::new(file).starts_with(&base)
                    {
                        sh_quiet("losetup", &["-d", dev]);
                    }
                }
            }
            if let Err(error) = std::fs::remove_dir_all(&base) {
                eprintln!("bench: cannot remove {}: {error}", base.display());
            }
        }
    }
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for line in list.lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(pid) = name
                .strip_prefix("skbench-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if dead(pid) {
                sh_quiet("ip", &["netns", "del", name]);
            }
        }
    }
}

/// SIGKILL, by pid, to every process whose command line mentions `path`
/// (the helpers a dead bench started).
fn kill_processes_mentioning(path: &Path) {
    let Ok(needle) = path_str(path) else { return };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The machine, for the report.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    pub(crate) date: String,
    pub(crate) fio: String,
    pub(crate) commit: String,
    /// The helper that was measured, and when it was built.
    pub(crate) rfs: String,
}

impl Machine {
    pub(crate) fn probe(root: &Path, rfs: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0);
        let root_str = root.to_string_lossy().into_owned();
        let commit = sh("git", &["-C", &root_str, "rev-parse", "--short", "HEAD"])
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let dirty = sh(
            "git",
            &[
                "-C",
                &root_str,
                "status",
                "--porcelain",
                "--",
                "driver-linux-helper",
            ],
        )
        .is_ok_and(|s| !s.trim().is_empty());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model,
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|k| k.trim().to_owned())
                .unwrap_or_default(),
            date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .map(|d| d.trim().to_owned())
                .unwrap_or_default(),
            fio: sh("fio", &["--version"])
                .map(|v| v.trim().to_owned())
                .unwrap_or_default(),
            rfs: format!(
                "{} (built {})",
                rfs.display(),
                sh(
                    "date",
                    &["-u", "-r", &rfs.to_string_lossy(), "+%Y-%m-%d %H:%M UTC"]
                )
                .map(|d| d.trim().to_owned())
                .unwrap_or_else(|_| "?".to_owned())
            ),
            commit: if dirty {
                format!("{commit} + uncommitted changes in driver-linux-helper")
            } else {
                commit
            },
        }
    }
}
