//! One node of a test cluster (or the client): run and kill processes inside it.

use std::fs::{self, OpenOptions};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::sys::{self, EventLog, MARKER_VAR, shell_quote};
use crate::{DEFAULT_RUN_TIMEOUT, HarnessError, Result};

/// What every node of a cluster shares.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) id: String,
    pub(crate) switch_netns: String,
    pub(crate) dir: PathBuf,
    pub(crate) events: EventLog,
    pub(crate) counter: AtomicU64,
    /// Directories each node sees with its own content, bind-mounted at boot.
    pub(crate) private_dirs: Vec<PrivateDir>,
}

/// A directory each node sees with its own content.
#[derive(Debug, Clone)]
pub(crate) struct PrivateDir {
    /// Where the nodes see it.
    pub(crate) path: PathBuf,
    /// The size of its file system, if limited (a tmpfs on the backing directory).
    pub(crate) size: Option<u64>,
}

impl Context {
    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }
}

/// The output of a finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Output {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// One node of a [`crate::Cluster`] (or its client): a network namespace, a
/// mount namespace, a hostname and host-side directories of its own.
#[derive(Debug)]
pub struct Node {
    pub(crate) ctx: Arc<Context>,
    pub(crate) name: String,
    pub(crate) netns: String,
    pub(crate) addrs: Vec<Ipv4Addr>,
    pub(crate) ports: Vec<String>,
    pub(crate) dir: PathBuf,
    pub(crate) anchor: Mutex<Option<Anchor>>,
    pub(crate) processes: Mutex<Vec<Arc<Tracked>>>,
    /// File systems mounted on the host (under the cluster's directory) for
    /// sized private directories; unmounted when the cluster is dropped.
    pub(crate) host_mounts: Vec<PathBuf>,
}

/// The processes that hold a node's mount, UTS and PID namespaces open:
/// `unshare` (our child) and the node's init, its child, pid 1 in the node.
#[derive(Debug)]
pub(crate) struct Anchor {
    /// Host pid of the node's init (a perl loop ignoring SIGCHLD, so
    /// that orphans it adopts are reaped by the kernel).
    init: u32,
    /// `unshare --fork --kill-child`: killing it kills the init, and with the
    /// init every process of the node's PID namespace.
    unshare: Child,
}

impl Node {
    pub(crate) fn new(ctx: Arc<Context>, name: &str) -> Result<Self> {
        let netns = format!("{}-{name}", ctx.id);
        let dir = ctx.dir.join(name);
        let mut node = Self {
            ctx,
            name: name.to_owned(),
            netns,
            addrs: Vec::new(),
            ports: Vec::new(),
            dir,
            anchor: Mutex::new(None),
            processes: Mutex::new(Vec::new()),
            host_mounts: Vec::new(),
        };
        for sub in [
            node.state_dir(),
            node.config_dir(),
            node.log_dir(),
            node.private_root(),
        ] {
            fs::create_dir_all(&sub)
                .map_err(|source| HarnessError::io(format!("create {}", sub.display()), source))?;
        }
        // From here on, an error drops `node`, whose `Drop` unmounts what was mounted.
        for dir in &node.ctx.private_dirs.clone() {
            let backing = node.host_path(&dir.path);
            fs::create_dir_all(&backing).map_err(|source| {
                HarnessError::io(format!("create {}", backing.display()), source)
            })?;
            if let Some(bytes) = dir.size {
                sys::check(
                    Command::new("mount")
                        .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0755")])
                        .arg(&node.netns)
                        .arg(&backing),
                    None,
                )?;
                node.host_mounts.push(backing);
            }
        }
        Ok(node)
    }

    /// The node's name and hostname: `node1`, `node2`, ..., or `client`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of its network namespace (for `ip netns exec` when debugging).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its IPv4 address on LAN `lan` (0-based), on interface [`Node::iface`].
    ///
    /// # Panics
    /// If the node is not on that LAN (the client is only on LAN 0).
    #[track_caller]
    pub fn addr(&self, lan: usize) -> Ipv4Addr {
        match self.addrs.get(lan) {
            Some(addr) => *addr,
            None => panic!(
                "{} has no address on LAN {lan} (it is on {} LAN(s))",
                self.name,
                self.addrs.len()
            ),
        }
    }

    /// Its addresses, one per LAN it is on.
    pub fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }

    /// The name, inside the node, of its interface on LAN `lan`: `eth<lan>`.
    pub fn iface(&self, lan: usize) -> String {
        format!("eth{lan}")
    }

    /// Host directory for the node's state (give it to the agent).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Host directory for the node's configuration files.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// Host directory for the node's logs; every file here is printed when a test fails.
    /// [`Node::spawn`] writes its processes' output here.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    pub(crate) fn private_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Where, on the host, this node's copy of `path` lives, for a `path` under
    /// one of the cluster's private directories: `/replicated/data/f` seen
    /// inside node1 is `host_path("/replicated/data/f")` seen from the test.
    pub fn host_path(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        self.private_root()
            .join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Host pid of the node's init (the target of `nsenter`), if the node is up.
    fn init_pid(&self) -> Option<u32> {
        lock(&self.anchor).as_ref().map(|anchor| anchor.init)
    }

    /// A command that runs `shell` (a `sh -c` command line) inside the node.
    fn command(&self, shell: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            // The node is up from `build` to drop, except in the middle of a
            // `reboot`; a command started then fails (nsenter rejects pid 0).
            .arg(format!("--target={}", self.init_pid().unwrap_or(0)))
            .args([
                "--mount", "--uts", "--net", "--pid", "--", "sh", "-c", shell,
            ])
            .env(MARKER_VAR, &self.ctx.id)
            .current_dir("/")
            .stdin(Stdio::null())
            .process_group(0);
        command
    }

    /// Runs a short shell command inside the node and returns its output,
    /// killing it after [`DEFAULT_RUN_TIMEOUT`].
    ///
    /// A non-zero exit is not an error here (check [`Output::success`]); see
    /// [`Node::run_ok`]. Errors: the command could not start, or timed out.
    pub fn run(&self, shell: impl AsRef<str>) -> Result<Output> {
        self.run_timeout(shell, DEFAULT_RUN_TIMEOUT)
    }

    /// Runs a short shell command inside the node and returns its stdout;
    /// a non-zero exit is an error carrying its stderr.
    pub fn run_ok(&self, shell: impl AsRef<str>) -> Result<String> {
        let shell = shell.as_ref();
        let output = self.run(shell)?;
        if output.success() {
            Ok(output.stdout)
        } else {
            let mut stderr = output.stderr.trim().to_owned();
            if stderr.is_empty() {
                stderr = output.stdout.trim().to_owned();
            }
            Err(HarnessError::CommandFailed {
                command: format!("{}$ {shell}", self.name),
                status: output.status.to_string(),
                stderr,
            })
        }
    }

    /// Like [`Node::run`], with its own time bound. On timeout the command's
    /// whole process group is killed and [`HarnessError::Timeout`] returned.
    pub fn run_timeout(&self, shell: impl AsRef<str>, timeout: Duration) -> Result<Output> {
        let shell = shell.as_ref();
        let what = format!("{}$ {shell}", self.name);
        // Output goes to files, not pipes: a background child that keeps the
        // descriptors open must not make `run` wait for it.
        let scratch = self.ctx.dir.join("scratch");
        fs::create_dir_all(&scratch)
            .map_err(|source| HarnessError::io(format!("create {}", scratch.display()), source))?;
        let sequence = self.ctx.next();
        let out_path = scratch.join(format!("run-{sequence}.out"));
        let err_path = scratch.join(format!("run-{sequence}.err"));
        let open = |path: &Path| {
            fs::File::create(path)
                .map_err(|source| HarnessError::io(format!("create {}", path.display()), source))
        };
        let mut command = self.command(shell);
        command.stdout(open(&out_path)?).stderr(open(&err_path)?);
        let child = command.spawn().map_err(|source| HarnessError::Spawn {
            command: what.clone(),
            source,
        })?;
        let pid = child.id();
        let state = Mutex::new(ChildState { child, exit: None });
        let exit = wait_child(&state, timeout)?;
        let read = |path: &Path| {
            let text = fs::read(path)
                .map(|raw| String::from_utf8_lossy(&raw).into_owned())
                .unwrap_or_default();
            // The scratch files are only a transport; a leftover is removed with the cluster.
            let _ = fs::remove_file(path);
            text
        };
        let stdout = read(&out_path);
        let stderr = read(&err_path);
        match exit {
            Some(status) => {
                self.ctx.events.note(&format!(
                    "{what} -> {status}{}{}",
                    excerpt("stdout", &stdout),
                    excerpt("stderr", &stderr)
                ));
                Ok(Output {
                    status,
                    stdout,
                    stderr,
                })
            }
            None => {
                lock(&state).kill(Signal::SIGKILL);
                // After SIGKILL the exit is immediate; bound the wait anyway.
                let _ = wait_child(&state, Duration::from_secs(10));
                // The command itself (nsenter's child) may outlive nsenter by a moment.
                let _ = crate::wait_until(
                    &format!("the process group of `{what}` to exit"),
                    Duration::from_secs(10),
                    Duration::from_millis(5),
                    || sys::group_members(pid).is_empty(),
                );
                self.ctx
                    .events
                    .note(&format!("{what} -> killed after {timeout:?} (pid {pid})"));
                Err(HarnessError::Timeout {
                    what: format!("`{what}` to finish"),
                    after: timeout,
                })
            }
        }
    }

    /// Starts a long-running shell command inside the node, its stdout and
    /// stderr appended to a log file in [`Node::log_dir`].
    ///
    /// The process keeps running when the handle is dropped; it is killed by
    /// [`NodeProcess::kill`], [`Node::kill_all`] or when the cluster is dropped.
    pub fn spawn(&self, shell: impl AsRef<str>) -> Result<NodeProcess> {
        let shell = shell.as_ref();
        let sequence = self.ctx.next();
        let program = shell
            .split_whitespace()
            .find(|word| {
                !word.contains('=')
                    && !["exec", "env", "nohup", "setsid", "nice", "sudo"].contains(word)
            })
            .and_then(|word| word.rsplit('/').next())
            .unwrap_or("sh");
        let program: String = program
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect();
        let program = if program.is_empty() {
            "sh".to_owned()
        } else {
            program
        };
        let log_path = self.log_dir().join(format!("{sequence:03}-{program}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| HarnessError::io(format!("open {}", log_path.display()), source))?;
        let log_err = log
            .try_clone()
            .map_err(|source| HarnessError::io(format!("dup {}", log_path.display()), source))?;
        let what = format!("{}$ {shell}", self.name);
        let child = self
            .command(shell)
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                command: what.clone(),
                source,
            })?;
        let pid = child.id();
        self.ctx.events.note(&format!(
            "{what} & -> pid {pid}, log {}",
            log_path.display()
        ));
        let tracked = Arc::new(Tracked {
            pid,
            what,
            log_path,
            state: Mutex::new(ChildState { child, exit: None }),
        });
        lock(&self.processes).push(Arc::clone(&tracked));
        Ok(NodeProcess { tracked })
    }

    /// Pids of every process in the node except the harness's anchor
    /// (whatever was spawned, and anything those processes started).
    pub fn pids(&self) -> Vec<u32> {
        let anchor: Vec<u32> = lock(&self.anchor)
            .iter()
            .flat_map(|anchor| [anchor.init, anchor.unshare.id()])
            .collect();
        sys::netns_pids(&self.netns)
            .into_iter()
            .filter_map(|pid| u32::try_from(pid).ok())
            .filter(|pid| !anchor.contains(pid))
            .collect()
    }

    /// `kill -9` of every process of the node (spawned ones, their children,
    /// daemons they started), then waits until they are gone.
    ///
    /// The node itself (namespaces, addresses, mounts, links, directories)
    /// stays as it is, so its kernel still answers pings, also on a virtual IP
    /// it held: see [`Node::crash`] for a power cut, [`Node::reboot`] for a
    /// fresh start.
    pub fn kill_all(&self) -> Result<()> {
        self.ctx
            .events
            .note(&format!("{}: kill -9 every process", self.name));
        let tracked: Vec<Arc<Tracked>> = lock(&self.processes).clone();
        for process in &tracked {
            process.lock().kill(Signal::SIGKILL);
        }
        for pid in self.pids() {
            sys::kill_pid(pid as i32);
        }
        for process in &tracked {
            wait_child(&process.state, Duration::from_secs(10))?;
        }
        // Every tracked process is reaped now: forget them.
        lock(&self.processes).retain(|process| process.lock().exit.is_none());
        crate::wait_until(
            &format!("every process of {} to exit", self.name),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                let left = self.pids();
                left.iter().for_each(|pid| sys::kill_pid(*pid as i32));
                left.is_empty()
            },
        )
    }

    /// Sets the node's link on LAN `lan` down (as if its cable were pulled):
    /// the switch-side end goes down and the node sees NO-CARRIER.
    pub fn link_down(&self, lan: usize) -> Result<()> {
        self.set_link(lan, "down")
    }

    /// Plugs the node's link on LAN `lan` back in.
    pub fn link_up(&self, lan: usize) -> Result<()> {
        self.set_link(lan, "up")
    }

    /// Makes the node's link on LAN `lan` slow: at most `kbit_per_second`
    /// kbit/s in each direction (a `tc` token bucket filter on both ends of
    /// the veth; `netem` is not available on our machines). Packets beyond
    /// what the bucket can queue (about 50 ms worth) are dropped.
    pub fn limit_rate(&self, lan: usize, kbit_per_second: u32) -> Result<()> {
        let port = self.port(lan)?;
        self.ctx.events.note(&format!(
            "{}: link on LAN {lan} limited to {kbit_per_second} kbit/s",
            self.name
        ));
        let rate = format!("{kbit_per_second}kbit");
        // The bucket must hold at least one full frame.
        let burst = (u64::from(kbit_per_second) * 1000 / 8 / 100)
            .max(2000)
            .to_string();
        for (netns, dev) in [
            (self.ctx.switch_netns.as_str(), port.as_str()),
            (self.netns.as_str(), self.iface(lan).as_str()),
        ] {
            sys::check(
                Command::new("tc")
                    .args(["-n", netns, "qdisc", "replace", "dev", dev])
                    .args([
                        "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms",
                    ]),
                None,
            )?;
        }
        Ok(())
    }

    /// Removes the rate limit of [`Node::limit_rate`] on LAN `lan`.
    pub fn clear_rate_limit(&self, lan: usize) -> Result<()> {
        let port = self.port(lan)?;
        self.ctx.events.note(&format!(
            "{}: link on LAN {lan} no longer limited",
            self.name
        ));
        for (netns, dev) in [
            (self.ctx.switch_netns.as_str(), port.as_str()),
            (self.netns.as_str(), self.iface(lan).as_str()),
        ] {
            let qdiscs = sys::check(
                Command::new("tc").args(["-n", netns, "qdisc", "show", "dev", dev]),
                None,
            )?;
            if qdiscs.contains("qdisc tbf") {
                sys::check(
                    Command::new("tc").args(["-n", netns, "qdisc", "del", "dev", dev, "root"]),
                    None,
                )?;
            }
        }
        Ok(())
    }

    fn port(&self, lan: usize) -> Result<&String> {
        self.ports
            .get(lan)
            .ok_or_else(|| HarnessError::Setup(format!("{} is not on LAN {lan}", self.name)))
    }

    fn set_link(&self, lan: usize, state: &str) -> Result<()> {
        let port = self.port(lan)?;
        self.ctx
            .events
            .note(&format!("{}: link on LAN {lan} {state}", self.name));
        sys::ip(&self.ctx.switch_netns, &["link", "set", "dev", port, state]).map(drop)
    }

    /// Kills every process of the node including the anchor, and reaps them.
    /// Errors are reported, not returned: this runs during cleanup.
    pub(crate) fn destroy(&mut self, problems: &mut Vec<String>) {
        if let Err(error) = self.kill_all() {
            problems.push(format!("{}: {error}", self.name));
        }
        if let Err(error) = self.stop_anchor() {
            problems.push(format!("{}: {error}", self.name));
        }
    }

    /// Unmounts the host-side file systems of sized private directories.
    pub(crate) fn unmount_host(&mut self, problems: &mut Vec<String>) {
        for mount in self.host_mounts.drain(..) {
            if let Err(error) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
                problems.push(format!("unmount {}: {error}", mount.display()));
            }
        }
    }

    /// Kills the anchor (and so everything in the node's PID namespace) and
    /// waits until no process is left in the node's network namespace.
    fn stop_anchor(&self) -> Result<()> {
        if let Some(mut anchor) = lock(&self.anchor).take() {
            sys::kill_pid(anchor.init as i32);
            // Killing an already-exited child is harmless; `wait` reaps it.
            let _ = anchor.unshare.kill();
            anchor.unshare.wait().map_err(|source| {
                HarnessError::io(format!("{}: reap the anchor", self.name), source)
            })?;
        }
        crate::wait_until(
            &format!("every process of {} to exit", self.name),
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                let left = sys::netns_pids(&self.netns);
                left.iter().for_each(|pid| sys::kill_pid(*pid));
                left.is_empty()
            },
        )
    }

    /// Boots the node: starts its anchor (fresh mount, UTS and PID
    /// namespaces), sets its hostname, bind-mounts its private directories.
    pub(crate) fn boot(&self) -> Result<()> {
        let anchor = start_anchor(&self.netns, &self.ctx)?;
        *lock(&self.anchor) = Some(anchor);
        let mut setup = vec![format!("hostname {}", shell_quote(&self.name))];
        for dir in &self.ctx.private_dirs {
            create_host_mount_point(&dir.path)?;
            setup.push(format!(
                "mount --bind {} {}",
                shell_quote(&self.host_path(&dir.path).to_string_lossy()),
                shell_quote(&dir.path.to_string_lossy())
            ));
        }
        self.run_ok(setup.join(" && ")).map(drop)
    }

    /// Simulates a power cut: every process is killed (as [`Node::kill_all`])
    /// and every link goes down, so the node no longer answers anything, not
    /// even pings to a virtual IP it held. Bring it back with [`Node::reboot`].
    pub fn crash(&self) -> Result<()> {
        self.ctx.events.note(&format!("{}: crash", self.name));
        self.kill_all()?;
        for lan in 0..self.ports.len() {
            self.link_down(lan)?;
        }
        Ok(())
    }

    /// Reboots the node, as after a crash: every process is killed, the node
    /// gets fresh mount, UTS and PID namespaces (mounts made by its processes,
    /// such as a FUSE mount, are gone; the private directories keep their
    /// files), its interfaces get back exactly the harness's addresses (a
    /// virtual IP is gone), its own nftables rules and neighbour cache are
    /// flushed, and its links are up. Its directories on the host are kept.
    pub fn reboot(&self) -> Result<()> {
        self.ctx.events.note(&format!("{}: reboot", self.name));
        self.kill_all()?;
        self.stop_anchor()?;
        for (lan, addr) in self.addrs.iter().enumerate() {
            let iface = self.iface(lan);
            sys::ip(&self.netns, &["addr", "flush", "dev", &iface])?;
            sys::ip(
                &self.netns,
                &["addr", "add", &format!("{addr}/24"), "dev", &iface],
            )?;
            sys::ip(&self.netns, &["link", "set", "dev", &iface, "up"])?;
            self.link_up(lan)?;
        }
        sys::ip(&self.netns, &["neigh", "flush", "all"])?;
        sys::check(
            Command::new("ip").args(["netns", "exec", &self.netns, "nft", "flush", "ruleset"]),
            None,
        )?;
        self.boot()
    }
}

/// Starts a node's anchor and waits until its init runs in the new namespaces.
fn start_anchor(netns: &str, ctx: &Context) -> Result<Anchor> {
    let mut command = Command::new("ip");
    command
        .args([
            "netns", "exec", netns, "unshare", "--mount", "--uts", "--pid",
        ])
        .args([
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "slave",
        ])
        // The node's init ignores SIGCHLD, so the kernel reaps the orphans it
        // adopts (a daemon started by `start_prim` whose parent exited). A
        // shell's `trap '' CHLD` does not reliably survive `exec`, so perl
        // (Essential on Debian) sets the disposition itself and stays pid 1.
        .args([
            "--",
            "perl",
            "-e",
            "$SIG{CHLD} = 'IGNORE'; while (1) { sleep 3600 }",
        ])
        .env(MARKER_VAR, &ctx.id)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let line = sys::command_line(&command);
    let mut unshare = command.spawn().map_err(|source| HarnessError::Spawn {
        command: line.clone(),
        source,
    })?;
    let pid = unshare.id();
    let mut init = None;
    let ready = crate::wait_until(
        &format!("the anchor of {netns} (pid {pid}) to start"),
        Duration::from_secs(10),
        Duration::from_millis(2),
        || {
            // `ip netns exec` execs `unshare`, which forks the init once the
            // namespaces exist; the init then execs perl.
            init = sys::children(pid).into_iter().find(|child| {
                fs::read_to_string(format!("/proc/{child}/comm"))
                    .is_ok_and(|comm| comm.trim() == "perl")
            });
            init.is_some()
        },
    );
    match (ready, init) {
        (Ok(()), Some(init)) => {
            ctx.events
                .note(&format!("{line} & -> pid {pid}, node init pid {init}"));
            Ok(Anchor { init, unshare })
        }
        (result, _) => {
            let _ = unshare.kill();
            let _ = unshare.wait();
            Err(result.err().unwrap_or_else(|| {
                HarnessError::Setup(format!("the anchor of {netns} did not start"))
            }))
        }
    }
}

/// Creates a private directory's mount point on the host if it is missing.
fn create_host_mount_point(dir: &Path) -> Result<()> {
    let _serialised = lock(&MOUNT_POINTS);
    fs::create_dir_all(dir)
        .map_err(|source| HarnessError::io(format!("create mount point {}", dir.display()), source))
}

/// Serialises the host-side creation of mount points shared by clusters.
static MOUNT_POINTS: Mutex<()> = Mutex::new(());

impl Drop for Node {
    /// A node that never joined its cluster (its creation failed half-way)
    /// cleans up after itself; for the others the cluster already did.
    fn drop(&mut self) {
        let mut problems = Vec::new();
        if lock(&self.anchor).is_some() {
            self.destroy(&mut problems);
        }
        self.unmount_host(&mut problems);
        if !problems.is_empty() {
            eprintln!(
                "safekit-tests: cleanup of {} had problems:\n  {}",
                self.netns,
                problems.join("\n  ")
            );
        }
    }
}

/// A spawned process, as [`Node::spawn`] returns it.
#[derive(Debug, Clone)]
pub struct NodeProcess {
    tracked: Arc<Tracked>,
}

#[derive(Debug)]
pub(crate) struct Tracked {
    pid: u32,
    what: String,
    log_path: PathBuf,
    state: Mutex<ChildState>,
}

impl Tracked {
    fn lock(&self) -> MutexGuard<'_, ChildState> {
        lock(&self.state)
    }
}

#[derive(Debug)]
struct ChildState {
    child: Child,
    /// Set once the child is reaped; until then its pid (and process group id)
    /// cannot be reused, so signalling the group is safe.
    exit: Option<ExitStatus>,
}

impl ChildState {
    /// Sends `signal` to the command's process group.
    ///
    /// The group leader is `nsenter`, which waits for the command (its child,
    /// inside the node's PID namespace) and exits the same way. SIGKILL goes
    /// to the whole group; any other signal skips `nsenter`, which would die
    /// of it at once instead of waiting for the command to handle it.
    fn kill(&mut self, signal: Signal) {
        if self.exit.is_some() {
            return;
        }
        let leader = self.child.id();
        if signal == Signal::SIGKILL {
            // ESRCH: the whole group is gone already, which is what we want.
            let _ = killpg(Pid::from_raw(leader as i32), signal);
        } else {
            for member in sys::group_members(leader) {
                if member != leader as i32 {
                    // ESRCH: that member exited meanwhile.
                    let _ = nix::sys::signal::kill(Pid::from_raw(member), signal);
                }
            }
        }
    }
}

/// Waits up to `timeout` for the child to exit: `Some(status)` if it did.
///
/// The lock is taken for each poll only, so another thread can signal the
/// child while this one waits.
fn wait_child(state: &Mutex<ChildState>, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    // Bounded: at most timeout/1ms polls, in practice far fewer as the pause grows.
    let max_polls = timeout.as_millis().max(1) + 1;
    for _ in 0..max_polls {
        {
            let mut guard = lock(state);
            if guard.exit.is_some() {
                break;
            }
            match guard.child.try_wait() {
                Ok(Some(status)) => {
                    guard.exit = Some(status);
                    break;
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(HarnessError::io(
                        format!("wait for pid {}", guard.child.id()),
                        source,
                    ));
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(lock(state).exit)
}

impl NodeProcess {
    /// Its pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.tracked.pid
    }

    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.tracked.log_path
    }

    /// What it has written so far.
    pub fn output(&self) -> String {
        fs::read(&self.tracked.log_path)
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default()
    }

    /// Whether it is still running (an exited process is reaped here).
    pub fn is_alive(&self) -> bool {
        matches!(wait_child(&self.tracked.state, Duration::ZERO), Ok(None))
    }

    /// `kill -9` of the process and of its process group (its children);
    /// returns once they are gone (or after 10 s if the kernel is slow to
    /// let them go, e.g. blocked in a file system).
    pub fn kill(&self) {
        let was_running = lock(&self.tracked.state).exit.is_none();
        self.signal(Signal::SIGKILL);
        // The outcome is visible to the caller through `is_alive` and `wait`.
        let _ = wait_child(&self.tracked.state, Duration::from_secs(10));
        if was_running {
            let _ = crate::wait_until(
                &format!("the process group of `{}` to exit", self.tracked.what),
                Duration::from_secs(10),
                Duration::from_millis(5),
                || sys::group_members(self.tracked.pid).is_empty(),
            );
        }
    }

    /// SIGTERM to the process and its process group: a polite stop.
    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Sends `signal` to the process and its process group (nothing if it was reaped already).
    pub fn signal(&self, signal: Signal) {
        self.tracked.lock().kill(signal);
    }

    /// Waits up to `timeout` for it to exit and returns how it exited.
    pub fn wait(&self, timeout: Duration) -> Result<ExitStatus> {
        wait_child(&self.tracked.state, timeout)?.ok_or_else(|| HarnessError::Timeout {
            what: format!("`{}` (pid {}) to exit", self.tracked.what, self.tracked.pid),
            after: timeout,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data behind.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A one-line excerpt of a command's output for the event log.
fn excerpt(stream: &str, text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push_str(" ...");
    }
    format!("\n    {stream}: {}", short.replace('\n', "\n    "))
}
