//! The cluster: building the namespaces and bridges, faults between nodes,
//! failure output and cleanup (see the crate docs for the topology).

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use crate::node::{Context, Node, PrivateDir};
use crate::sys::{self, EventLog};
use crate::{HarnessError, Result, wait_until};

/// Prefix of every cluster id; also how stale namespaces of dead test processes are recognised.
const ID_PREFIX: &str = "skt-";
/// Environment variable: `always` prints the logs when the cluster is dropped, even on success.
const LOGS_VAR: &str = "SAFEKIT_TEST_LOGS";
/// At most this much of the end of each log file is printed on failure.
const LOG_TAIL_BYTES: usize = 64 * 1024;
/// Host-address byte of the client on LAN 0.
const CLIENT_HOST: u8 = 100;
/// Host-address byte of the first spare address ([`Cluster::spare_addr`]).
const SPARE_HOST: u8 = 200;

static CLUSTER_COUNTER: AtomicU64 = AtomicU64::new(0);
static REAP_STALE: Once = Once::new();

/// How to build a [`Cluster`]; from [`Cluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: usize,
    lans: usize,
    client: bool,
    private_dirs: Vec<PrivateDir>,
}

impl ClusterBuilder {
    /// Number of nodes, 1 to 99 (default 2).
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// Number of LANs, 1 to 8 (default 1): LAN 1 can be a dedicated
    /// replication/heartbeat network. Every node is on every LAN.
    pub fn lans(mut self, lans: usize) -> Self {
        self.lans = lans;
        self
    }

    /// Whether to add a client namespace on LAN 0 (default no).
    pub fn client(mut self, client: bool) -> Self {
        self.client = client;
        self
    }

    /// An absolute directory (e.g. `/replicated/data`) that each node sees
    /// with its own content. May be called several times.
    pub fn private_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.private_dirs.push(PrivateDir {
            path: path.into(),
            size: None,
        });
        self
    }

    /// Like [`ClusterBuilder::private_dir`], on a file system of `bytes`
    /// bytes per node (a tmpfs mounted on the node's backing directory), so
    /// that a test can fill the disk: writes past it fail with ENOSPC.
    pub fn private_dir_sized(mut self, path: impl Into<PathBuf>, bytes: u64) -> Self {
        self.private_dirs.push(PrivateDir {
            path: path.into(),
            size: Some(bytes),
        });
        self
    }

    /// Creates the cluster. On error, whatever was created is removed again.
    pub fn build(self) -> Result<Cluster> {
        if !(1..=99).contains(&self.nodes) {
            return Err(HarnessError::Setup(format!(
                "a cluster has 1 to 99 nodes, not {}",
                self.nodes
            )));
        }
        if !(1..=8).contains(&self.lans) {
            return Err(HarnessError::Setup(format!(
                "a cluster has 1 to 8 LANs, not {}",
                self.lans
            )));
        }
        for dir in &self.private_dirs {
            check_private_dir(&dir.path)?;
        }
        REAP_STALE.call_once(reap_stale);

        let id = format!(
            "{ID_PREFIX}{}-{}-{:04x}",
            std::process::id(),
            CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u16>()
        );
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&dir)
            .map_err(|source| HarnessError::io(format!("create {}", dir.display()), source))?;
        let random = rand::random::<u16>();
        let subnet = [100 + (random % 100) as u8, (random >> 8) as u8 & 0xf8];
        let ctx = Arc::new(Context {
            switch_netns: format!("{id}-switch"),
            events: EventLog::new(dir.join("harness.log")),
            counter: AtomicU64::new(1),
            private_dirs: self.private_dirs.clone(),
            id,
            dir,
        });
        ctx.events.note(&format!(
            "building cluster {}: {} node(s), {} LAN(s), client {}, private dirs {:?}",
            ctx.id, self.nodes, self.lans, self.client, self.private_dirs
        ));
        let mut cluster = Cluster {
            ctx,
            lans: self.lans,
            subnet,
            nodes: Vec::new(),
            client: None,
            namespaces: Vec::new(),
        };
        if let Err(error) = cluster.create(&self) {
            let id = cluster.ctx.id.clone();
            // Dropping the half-built cluster removes what was created.
            drop(cluster);
            return Err(HarnessError::Build {
                id,
                source: Box::new(error),
            });
        }
        cluster.ctx.events.note("cluster ready");
        Ok(cluster)
    }
}

/// A set of nodes (network + mount namespaces) joined by bridges, with an
/// optional client; everything is removed when it is dropped.
#[derive(Debug)]
pub struct Cluster {
    ctx: Arc<Context>,
    lans: usize,
    /// `10.subnet[0].(subnet[1] + lan).0/24`.
    subnet: [u8; 2],
    nodes: Vec<Node>,
    client: Option<Node>,
    /// Every network namespace created so far, the switch first.
    namespaces: Vec<String>,
}

impl Cluster {
    /// Starts describing a cluster: 2 nodes, 1 LAN, no client, no private directory.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 2,
            lans: 1,
            client: false,
            private_dirs: Vec::new(),
        }
    }

    /// The unique prefix of every name this cluster uses (for [`leftovers`]).
    pub fn id(&self) -> &str {
        &self.ctx.id
    }

    /// The cluster's temporary directory on the host (node directories, harness log).
    pub fn dir(&self) -> &Path {
        &self.ctx.dir
    }

    /// Node `k`, 1-based as in `node1`.
    ///
    /// # Panics
    /// If there is no such node.
    #[track_caller]
    pub fn node(&self, k: usize) -> &Node {
        match k.checked_sub(1).and_then(|index| self.nodes.get(index)) {
            Some(node) => node,
            None => panic!("no node{k}: the cluster has {} node(s)", self.nodes.len()),
        }
    }

    /// All nodes, node1 first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The client.
    ///
    /// # Panics
    /// If the cluster was built without `.client(true)`.
    #[track_caller]
    pub fn client(&self) -> &Node {
        self.client
            .as_ref()
            .expect("the cluster was built without .client(true)")
    }

    /// Number of LANs.
    pub fn lan_count(&self) -> usize {
        self.lans
    }

    /// LAN `lan`'s network address and prefix length, e.g. `(10.123.8.0, 24)`.
    pub fn subnet(&self, lan: usize) -> (Ipv4Addr, u8) {
        (self.lan_addr(lan, 0), 24)
    }

    /// An address on LAN `lan` that no node or client uses, for virtual IPs:
    /// `spare_addr(0, 0)`, `spare_addr(0, 1)`, ... (up to 49).
    pub fn spare_addr(&self, lan: usize, index: u8) -> Ipv4Addr {
        assert!(index < 50, "spare addresses are numbered 0 to 49");
        self.lan_addr(lan, SPARE_HOST + index)
    }

    fn lan_addr(&self, lan: usize, host: u8) -> Ipv4Addr {
        assert!(
            lan < self.lans,
            "LAN {lan} does not exist ({} LAN(s))",
            self.lans
        );
        Ipv4Addr::new(10, self.subnet[0], self.subnet[1] + lan as u8, host)
    }

    /// Every node's and the client's log files and the harness's own log, as
    /// printed when a test fails.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for node in self.nodes.iter().chain(&self.client) {
            text.push_str(&format!(
                "===== {} (netns {}), logs in {} =====\n",
                node.name(),
                node.netns(),
                node.log_dir().display()
            ));
            let mut files = Vec::new();
            collect_files(&node.log_dir(), &mut files);
            files.sort();
            if files.is_empty() {
                text.push_str("(no log files)\n");
            }
            for file in files {
                text.push_str(&format!("----- {} -----\n", file.display()));
                text.push_str(&tail(&file));
            }
        }
        text.push_str(&format!(
            "===== harness: {} =====\n",
            self.ctx.events.path().display()
        ));
        text.push_str(&tail(self.ctx.events.path()));
        text
    }

    /// Two-way partition: nothing from `a` reaches `b` and nothing from `b`
    /// reaches `a`, on every LAN. Other traffic is untouched.
    pub fn partition(&self, a: &Node, b: &Node) -> Result<()> {
        self.ctx
            .events
            .note(&format!("partition {} <-> {}", a.name(), b.name()));
        self.add_fault_rules(&[drop_rule(a, b, true), drop_rule(b, a, true)])
    }

    /// One-way partition: `from`'s packets no longer reach `to`, while `to`'s
    /// packets still reach `from`, on every LAN. ARP is let through so that
    /// `to` can still resolve `from`'s address.
    pub fn partition_one_way(&self, from: &Node, to: &Node) -> Result<()> {
        self.ctx.events.note(&format!(
            "partition {} -> {} (one way)",
            from.name(),
            to.name()
        ));
        self.add_fault_rules(&[drop_rule(from, to, false)])
    }

    /// Removes every partition.
    pub fn heal(&self) -> Result<()> {
        self.ctx.events.note("heal every partition");
        self.nft("add table bridge harness\nflush table bridge harness\n")
    }

    /// Sets `node`'s link on LAN `lan` down; see [`Node::link_down`].
    pub fn link_down(&self, node: &Node, lan: usize) -> Result<()> {
        node.link_down(lan)
    }

    /// Plugs `node`'s link on LAN `lan` back in; see [`Node::link_up`].
    pub fn link_up(&self, node: &Node, lan: usize) -> Result<()> {
        node.link_up(lan)
    }

    fn add_fault_rules(&self, rules: &[String]) -> Result<()> {
        let mut script = String::from(
            "add table bridge harness\n\
             add chain bridge harness faults { type filter hook forward priority 0; policy accept; }\n",
        );
        for rule in rules {
            script.push_str(&format!("add rule bridge harness faults {rule}\n"));
        }
        self.nft(&script)
    }

    fn nft(&self, script: &str) -> Result<()> {
        sys::check(
            Command::new("ip").args(["netns", "exec", &self.ctx.switch_netns, "nft", "-f", "-"]),
            Some(script),
        )
        .map(drop)
    }

    /// Creates the switch, the nodes and the client.
    fn create(&mut self, builder: &ClusterBuilder) -> Result<()> {
        let switch = self.ctx.switch_netns.clone();
        self.add_netns(&switch)?;
        for lan in 0..self.lans {
            let bridge = format!("br{lan}");
            sys::ip(&switch, &["link", "add", "name", &bridge, "type", "bridge"])?;
            sys::ip(&switch, &["link", "set", "dev", &bridge, "up"])?;
        }
        for k in 1..=builder.nodes {
            let lans: Vec<(usize, Ipv4Addr)> = (0..self.lans)
                .map(|lan| (lan, self.lan_addr(lan, k as u8)))
                .collect();
            let node = self.create_node(&format!("node{k}"), &format!("n{k}l"), &lans)?;
            self.nodes.push(node);
        }
        if builder.client {
            let lans = [(0, self.lan_addr(0, CLIENT_HOST))];
            let client = self.create_node("client", "cl", &lans)?;
            self.client = Some(client);
        }
        Ok(())
    }

    fn add_netns(&mut self, netns: &str) -> Result<()> {
        sys::check(Command::new("ip").args(["netns", "add", netns]), None)?;
        self.namespaces.push(netns.to_owned());
        sys::ip(netns, &["link", "set", "dev", "lo", "up"]).map(drop)
    }

    fn create_node(
        &mut self,
        name: &str,
        port_prefix: &str,
        lans: &[(usize, Ipv4Addr)],
    ) -> Result<Node> {
        let mut node = Node::new(Arc::clone(&self.ctx), name)?;
        self.add_netns(&node.netns.clone())?;
        let switch = &self.ctx.switch_netns;
        for &(lan, addr) in lans {
            let iface = node.iface(lan);
            let port = format!("{port_prefix}{lan}");
            // Both ends are created directly in their namespaces: nothing
            // appears in the host's network namespace, even for a moment.
            sys::check(
                Command::new("ip").args([
                    "link",
                    "add",
                    "name",
                    &iface,
                    "netns",
                    &node.netns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &port,
                    "netns",
                    switch,
                ]),
                None,
            )?;
            sys::ip(
                switch,
                &[
                    "link",
                    "set",
                    "dev",
                    &port,
                    "master",
                    &format!("br{lan}"),
                    "up",
                ],
            )?;
            sys::ip(
                &node.netns,
                &["addr", "add", &format!("{addr}/24"), "dev", &iface],
            )?;
            sys::ip(&node.netns, &["link", "set", "dev", &iface, "up"])?;
            node.addrs.push(addr);
            node.ports.push(port);
        }
        node.boot()?;
        Ok(node)
    }

    /// Kills, unmounts and deletes everything; reports problems on stderr
    /// (this runs in `Drop`, possibly during a panic).
    fn teardown(&mut self) {
        let print_logs =
            std::thread::panicking() || std::env::var(LOGS_VAR).as_deref() == Ok("always");
        let mut problems = Vec::new();
        self.ctx.events.note("tearing down");
        // Stop the processes first, so that their logs are complete when printed.
        for node in self.nodes.iter().chain(&self.client) {
            if let Err(error) = node.kill_all() {
                problems.push(format!("{}: {error}", node.name()));
            }
        }
        if print_logs {
            eprintln!(
                "\n########## logs of cluster {} ##########\n{}########## end of logs of cluster {} ##########",
                self.ctx.id,
                self.logs(),
                self.ctx.id
            );
        }
        for node in self.nodes.iter_mut().chain(self.client.as_mut()) {
            node.destroy(&mut problems);
        }
        // Processes that left the namespaces but carry the cluster's mark.
        for (pid, _) in sys::marked_pids(&self.ctx.id) {
            sys::kill_pid(pid);
        }
        for netns in self.namespaces.iter().rev() {
            for pid in sys::netns_pids(netns) {
                sys::kill_pid(pid);
            }
            if let Err(error) = sys::delete_netns(netns) {
                problems.push(error.to_string());
            }
        }
        self.namespaces.clear();
        for node in self.nodes.iter_mut().chain(self.client.as_mut()) {
            node.unmount_host(&mut problems);
        }
        let gone = wait_until(
            "the cluster's processes to exit",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || sys::marked_pids(&self.ctx.id).is_empty(),
        );
        if let Err(error) = gone {
            problems.push(format!("{error}: {:?}", sys::marked_pids(&self.ctx.id)));
        }
        if let Err(error) = fs::remove_dir_all(&self.ctx.dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("remove {}: {error}", self.ctx.dir.display()));
        }
        if !problems.is_empty() {
            eprintln!(
                "safekit-tests: cleanup of cluster {} had problems:\n  {}",
                self.ctx.id,
                problems.join("\n  ")
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// What is left on the machine of the cluster whose [`Cluster::id`] is `id`:
/// network namespaces, host interfaces, mounts, processes, its temporary
/// directory. Empty once the cluster is dropped.
pub fn leftovers(id: &str) -> Vec<String> {
    if !id.starts_with(ID_PREFIX) {
        return vec![format!(
            "`{id}` is not a cluster id (they start with {ID_PREFIX})"
        )];
    }
    let mut found = Vec::new();
    let prefix = format!("{id}-");
    for netns in sys::netns_names() {
        if netns.starts_with(&prefix) {
            found.push(format!("network namespace {netns}"));
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for entry in entries.filter_map(|entry| entry.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(id) {
                found.push(format!("host interface {name}"));
            }
        }
    }
    if let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") {
        for line in mountinfo.lines().filter(|line| line.contains(id)) {
            found.push(format!("mount {line}"));
        }
    }
    for (pid, cmdline) in sys::marked_pids(id) {
        found.push(format!("process {pid}: {cmdline}"));
    }
    let dir = std::env::temp_dir().join(id);
    if dir.exists() {
        found.push(format!("directory {}", dir.display()));
    }
    found
}

/// `nft` rule text dropping frames from `from`'s bridge ports to `to`'s.
fn drop_rule(from: &Node, to: &Node, including_arp: bool) -> String {
    let set = |node: &Node| {
        let names: Vec<String> = node
            .ports
            .iter()
            .map(|port| format!("\"{port}\""))
            .collect();
        format!("{{ {} }}", names.join(", "))
    };
    let arp = if including_arp {
        ""
    } else {
        "ether type != arp "
    };
    format!(
        "iifname {} oifname {} {arp}drop comment \"{} -> {}\"",
        set(from),
        set(to),
        from.name(),
        to.name()
    )
}

/// Refuses private directories that would hide what the harness or the
/// system needs inside a node.
fn check_private_dir(path: &Path) -> Result<()> {
    use std::path::Component;
    let plain = path.is_absolute()
        && path.components().count() > 1
        && path
            .components()
            .all(|part| matches!(part, Component::RootDir | Component::Normal(_)));
    if !plain {
        return Err(HarnessError::Setup(format!(
            "a private directory must be an absolute path below / without `..`: {}",
            path.display()
        )));
    }
    let temp_dir = std::env::temp_dir();
    if temp_dir.starts_with(path) {
        return Err(HarnessError::Setup(format!(
            "private directory {} would hide the nodes' own directories under {} \
             (set TMPDIR elsewhere to use it)",
            path.display(),
            temp_dir.display()
        )));
    }
    if let Ok(exe) = std::env::current_exe()
        && exe.starts_with(path)
    {
        return Err(HarnessError::Setup(format!(
            "private directory {} would hide the test binaries ({})",
            path.display(),
            exe.display()
        )));
    }
    if ["/proc", "/sys", "/dev", "/run/netns"]
        .iter()
        .any(|system| path.starts_with(system) || Path::new(system).starts_with(path))
    {
        return Err(HarnessError::Setup(format!(
            "private directory {} would hide a system directory",
            path.display()
        )));
    }
    Ok(())
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => collect_files(&path, files),
            Ok(kind) if kind.is_file() => files.push(path),
            _ => {}
        }
    }
}

/// The last [`LOG_TAIL_BYTES`] of a file, ending with a newline.
fn tail(path: &Path) -> String {
    let raw = match fs::read(path) {
        Ok(raw) => raw,
        Err(error) => return format!("(cannot read: {error})\n"),
    };
    let start = raw.len().saturating_sub(LOG_TAIL_BYTES);
    let mut text = String::new();
    if start > 0 {
        text.push_str(&format!("(... first {start} bytes omitted ...)\n"));
    }
    text.push_str(&String::from_utf8_lossy(&raw[start..]));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// Removes namespaces and directories left by test processes that died
/// without cleaning up (killed outright): their names hold their pid.
fn reap_stale() {
    let dead = |name: &str| -> bool {
        name.strip_prefix(ID_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for netns in sys::netns_names() {
        if dead(&netns) {
            for pid in sys::netns_pids(&netns) {
                sys::kill_pid(pid);
            }
            if let Err(error) = sys::delete_netns(&netns) {
                eprintln!("safekit-tests: could not remove stale namespace {netns}: {error}");
            }
        }
    }
    let temp_dir = std::env::temp_dir();
    // Sized private directories are tmpfs mounts under the cluster's directory.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount_point in mountinfo.lines().filter_map(|line| line.split(' ').nth(4)) {
        let stale = Path::new(mount_point)
            .strip_prefix(&temp_dir)
            .ok()
            .and_then(|rest| rest.components().next())
            .is_some_and(|first| dead(&first.as_os_str().to_string_lossy()));
        if stale {
            let _ = nix::mount::umount2(mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    if let Ok(entries) = fs::read_dir(&temp_dir) {
        for entry in entries.filter_map(|entry| entry.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}
