//! SafeKit agents in the harness's nodes: a module installed on every node,
//! `safekitd --foreground` started in each, and `safekit` run inside a node as
//! an operator would.
//!
//! Every scenario test of the agent needs the same installation (the
//! cluster's `cluster.xml` built from the harness's topology, the shared
//! secret, a module's `userconfig.xml` and scripts), the same way to start an
//! agent and know it answers, and the same way to read what an operator reads
//! (`safekit state -m <module> -lq`'s exit code, `state -v`, the module log).
//! Written once here, the tests only say what differs: the module's
//! configuration and scripts, and what they check. A failed wait panics with
//! the node's `state -v` and module log, so the test runner shows why.
//!
//! ```no_run
//! use safekit_tests::agents::{ALONE, ModuleSpec};
//! use safekit_tests::{Cluster, require_root};
//!
//! if !require_root() {
//!     return;
//! }
//! let cluster = Cluster::builder().nodes(2).build().expect("build the cluster");
//! let [node1, node2] = ModuleSpec::new("mirror").install_on(&cluster);
//! let _agent1 = node1.start_agent();
//! let _agent2 = node2.start_agent();
//! node1.safekit_ok("prim -m mirror");
//! node1.wait_state(ALONE);
//! ```
//!
//! # Layout
//!
//! Node `k`'s installation is `$SAFE = <config_dir>/safe` (the module in
//! `modules/<name>/{conf,bin}`, `safekit` linked as `$SAFE/safekit`) and
//! `$SAFEVAR = <state_dir>/safevar` (`cluster/cluster.xml`, `cluster/secret`).
//! Both are host paths, which are the same inside the node (see the crate's
//! "File systems"). LAN 0 is named `default` and LAN 1 `repli`
//! ([`lan_name`]); the module has one heartbeat per LAN of the cluster.
//!
//! The binaries `safekit` and `safekitd` must be built in the same target
//! directory as the test (`cargo build -p safekit-agent --bins`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Cluster, Node, NodeProcess, Output, wait_until, workspace_bin};

/// `safekit state -m <module> -lq`'s exit code for STOP.
pub const STOP: i32 = 0;
/// `safekit state -m <module> -lq`'s exit code for WAIT.
pub const WAIT: i32 = 1;
/// `safekit state -m <module> -lq`'s exit code for ALONE.
pub const ALONE: i32 = 2;
/// `safekit state -m <module> -lq`'s exit code for PRIM.
pub const PRIM: i32 = 3;
/// `safekit state -m <module> -lq`'s exit code for SECOND.
pub const SECOND: i32 = 4;

/// The cluster secret unless [`ModuleSpec::secret`] gives another.
pub const DEFAULT_SECRET: &str = "5f4dcc3b5aa765d61d8327deb882cf99aa11bb22cc33dd44ee55ff6677889900";

/// The default bound of every wait: a failover with timeout 1 s, a script
/// run and a slow machine.
pub const DEFAULT_STATE_WAIT: Duration = Duration::from_secs(30);

/// How often a wait polls.
const POLL: Duration = Duration::from_millis(50);

/// The name of LAN `lan` in `cluster.xml` and in the heartbeats: `default`, `repli`.
pub fn lan_name(lan: usize) -> &'static str {
    ["default", "repli"][lan]
}

/// One module to install on nodes: its `userconfig.xml` and scripts.
///
/// The `<service>` is always `mode="mirror" defaultprim="alone"
/// failover="on"` with a `<heart pulse="200ms" timeout="1000ms">` holding a
/// heartbeat per LAN; the rest comes from [`ModuleSpec::service_attrs`] and
/// [`ModuleSpec::config`].
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    name: String,
    service_attrs: String,
    config: String,
    scripts: Vec<(String, String)>,
    secret: String,
    state_wait: Duration,
}

impl ModuleSpec {
    /// A module called `name`, with nothing but its heartbeats.
    pub fn new(name: impl Into<String>) -> Self {
        ModuleSpec {
            name: name.into(),
            service_attrs: String::new(),
            config: String::new(),
            scripts: Vec::new(),
            secret: DEFAULT_SECRET.to_string(),
            state_wait: DEFAULT_STATE_WAIT,
        }
    }

    /// More attributes of `<service>` (e.g. `maxloop="2"`).
    pub fn service_attrs(mut self, attrs: impl Into<String>) -> Self {
        self.service_attrs = attrs.into();
        self
    }

    /// Adds XML inside `<service>`, after `<heart>` (`<vip>`, `<rfs>`, checkers...).
    pub fn config(mut self, xml: impl AsRef<str>) -> Self {
        self.config.push_str(xml.as_ref());
        self.config.push('\n');
        self
    }

    /// Adds an executable script `bin/<name>` to the module (e.g. `start_prim`).
    pub fn script(mut self, name: impl Into<String>, content: impl Into<String>) -> Self {
        self.scripts.push((name.into(), content.into()));
        self
    }

    /// The cluster secret (hex), [`DEFAULT_SECRET`] otherwise.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = secret.into();
        self
    }

    /// The bound of every wait of the installed nodes, [`DEFAULT_STATE_WAIT`] otherwise.
    pub fn state_wait(mut self, timeout: Duration) -> Self {
        self.state_wait = timeout;
        self
    }

    /// The module's `userconfig.xml` for `cluster`.
    pub fn userconfig(&self, cluster: &Cluster) -> String {
        let heartbeats: String = (0..cluster.lan_count())
            .map(|lan| format!("<heartbeat name=\"{}\"/>", lan_name(lan)))
            .collect();
        format!(
            "<safe>\n<service mode=\"mirror\" defaultprim=\"alone\" failover=\"on\" {}>\n  \
             <heart pulse=\"200ms\" timeout=\"1000ms\">\n    {heartbeats}\n  </heart>\n{}</service>\n</safe>\n",
            self.service_attrs, self.config
        )
    }

    /// Installs the module on nodes 1 to `N` of `cluster` (`let [node1, node2] = ...`).
    ///
    /// Panics if a file cannot be written or the binaries are not built.
    pub fn install_on<'c, const N: usize>(&self, cluster: &'c Cluster) -> [AgentNode<'c>; N] {
        std::array::from_fn(|index| self.install(cluster, cluster.node(index + 1)))
    }

    /// Installs the module on nodes 1 to `N` of `cluster` and starts their
    /// agents (modules in STOP). The agents stop when the returned processes
    /// are dropped or killed.
    pub fn start_on<'c, const N: usize>(
        &self,
        cluster: &'c Cluster,
    ) -> ([AgentNode<'c>; N], [NodeProcess; N]) {
        let nodes = self.install_on(cluster);
        let agents = start_agents(nodes.each_ref());
        (nodes, agents)
    }

    /// Installs the module on nodes 1 and 2 of `cluster`, starts their agents
    /// and [`first_start`]s them: node1 PRIM, node2 SECOND. The agents stop
    /// when the returned processes are dropped or killed.
    pub fn start_pair<'c>(&self, cluster: &'c Cluster) -> ([AgentNode<'c>; 2], [NodeProcess; 2]) {
        let ([node1, node2], agents) = self.start_on(cluster);
        first_start(&node1, &node2);
        ([node1, node2], agents)
    }

    /// Installs SafeKit and the module on `node`, one of `cluster`'s nodes.
    ///
    /// Panics if a file cannot be written or the binaries are not built.
    pub fn install<'c>(&self, cluster: &Cluster, node: &'c Node) -> AgentNode<'c> {
        let safe = node.config_dir().join("safe");
        let var = node.state_dir().join("safevar");
        let module = safe.join("modules").join(&self.name);
        for dir in [
            module.join("conf"),
            module.join("bin"),
            var.join("cluster"),
            safe.join("private").join("bin"),
        ] {
            std::fs::create_dir_all(&dir).expect("create SafeKit directories");
        }
        std::fs::write(
            var.join("cluster").join("cluster.xml"),
            cluster_xml(cluster),
        )
        .expect("write cluster.xml");
        write_mode(&var.join("cluster").join("secret"), &self.secret, 0o600);
        std::fs::write(
            module.join("conf").join("userconfig.xml"),
            self.userconfig(cluster),
        )
        .expect("write userconfig.xml");
        for (name, content) in &self.scripts {
            write_mode(&module.join("bin").join(name), content, 0o755);
        }
        let safekit = workspace_bin("safekit").expect("safekit is built");
        let link = safe.join("safekit");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(safekit, link).expect("link $SAFE/safekit");
        AgentNode {
            node,
            safe,
            var,
            module: self.name.clone(),
            state_wait: self.state_wait,
        }
    }
}

/// `cluster.xml`: every node's address on every LAN of `cluster`.
fn cluster_xml(cluster: &Cluster) -> String {
    let lans: String = (0..cluster.lan_count())
        .map(|lan| {
            let nodes: String = cluster
                .nodes()
                .iter()
                .map(|peer| {
                    format!(
                        "<node name=\"{}\" addr=\"{}\"/>",
                        peer.name(),
                        peer.addr(lan)
                    )
                })
                .collect();
            format!("<lan name=\"{}\">{nodes}</lan>", lan_name(lan))
        })
        .collect();
    format!("<cluster><lans>{lans}</lans></cluster>\n")
}

/// Writes `content` to `path` with permissions `mode`; panics on failure.
pub fn write_mode(path: &Path, content: &str, mode: u32) {
    std::fs::write(path, content)
        .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("chmod {}: {error}", path.display()));
}

/// One node's SafeKit installation of one module, and the operator's commands on it.
///
/// Every method panics (with the node's diagnostics) when the command cannot
/// run or a wait times out: these are the steps of a scenario test.
#[derive(Debug)]
pub struct AgentNode<'c> {
    node: &'c Node,
    safe: PathBuf,
    var: PathBuf,
    module: String,
    state_wait: Duration,
}

impl<'c> AgentNode<'c> {
    /// The harness's node.
    pub fn node(&self) -> &'c Node {
        self.node
    }

    /// The node's name (`node1`).
    pub fn name(&self) -> &'c str {
        self.node.name()
    }

    /// `$SAFE`: the installation (a host path, the same inside the node).
    pub fn safe_dir(&self) -> &Path {
        &self.safe
    }

    /// `$SAFEVAR`: the agent's state.
    pub fn var_dir(&self) -> &Path {
        &self.var
    }

    /// `$SAFEVAR/modules/<module>`: the module's state, `$SAFEUSERVAR` of its scripts.
    pub fn module_var_dir(&self) -> PathBuf {
        self.var.join("modules").join(&self.module)
    }

    /// The bound of every wait.
    pub fn state_wait(&self) -> Duration {
        self.state_wait
    }

    /// Spawns `safekitd --foreground` in the node and waits until it answers
    /// `safekit state` over its admin socket (`module list` would not do: it
    /// also works offline). Dropping or killing the process stops the agent.
    pub fn start_agent(&self) -> NodeProcess {
        let safekitd = workspace_bin("safekitd").expect("safekitd is built");
        let agent = self
            .node
            .spawn(format!(
                "exec {} --foreground --safe {} --var {} --node {}",
                safekitd.display(),
                self.safe.display(),
                self.var.display(),
                self.node.name()
            ))
            .expect("spawn safekitd");
        wait_until(
            &format!("{}'s agent to answer", self.node.name()),
            self.state_wait,
            POLL,
            || self.safekit("state").success(),
        )
        .unwrap_or_else(|error| panic!("{error}: {}", agent.output()));
        agent
    }

    /// Runs `safekit <args>` inside the node as root.
    pub fn safekit(&self, args: &str) -> Output {
        self.node
            .run(format!(
                "SAFE={} SAFEVAR={} {}/safekit {args}",
                self.safe.display(),
                self.var.display(),
                self.safe.display()
            ))
            .expect("run safekit")
    }

    /// Runs `safekit <args>`, asserts it succeeds, returns its stdout.
    pub fn safekit_ok(&self, args: &str) -> String {
        let output = self.safekit(args);
        assert!(
            output.success(),
            "{}: safekit {args} failed: {}{}\n{}",
            self.node.name(),
            output.stdout,
            output.stderr,
            self.diagnostics()
        );
        output.stdout
    }

    /// Like [`AgentNode::safekit_ok`], once the agent answers on its admin
    /// socket: [`AgentNode::start_agent`] returns once `safekit module list`
    /// works, which reads the installation without the agent, so a command
    /// sent right after may find no admin socket yet.
    pub fn safekit_ok_when_up(&self, args: &str) -> String {
        let mut output = None;
        self.wait_for(&format!("the agent to take `safekit {args}`"), || {
            let run = self.safekit(args);
            let answered = !run.stderr.contains("agent not running");
            output = Some(run);
            answered
        });
        let output = output.expect("ran at least once");
        assert!(
            output.success(),
            "{}: safekit {args} failed: {}{}
{}",
            self.node.name(),
            output.stdout,
            output.stderr,
            self.diagnostics()
        );
        output.stdout
    }

    /// `safekit state -m <module> -lq`'s exit code ([`STOP`]...[`SECOND`]; -1 if killed).
    pub fn state(&self) -> i32 {
        self.safekit(&format!("state -m {} -lq", self.module))
            .status
            .code()
            .unwrap_or(-1)
    }

    /// `safekit state -m <module> -v`, asserted to succeed.
    pub fn verbose(&self) -> String {
        self.safekit_ok(&format!("state -m {} -v", self.module))
    }

    /// `safekit state -m <module> -v`'s stdout, whether it succeeds or not
    /// (in a wait, where the agent may not answer yet).
    pub fn verbose_unchecked(&self) -> String {
        self.safekit(&format!("state -m {} -v", self.module)).stdout
    }

    /// Waits for state `code` and returns how long it took.
    pub fn wait_state(&self, code: i32) -> Duration {
        let start = Instant::now();
        self.wait_for(&format!("state {code}"), || self.state() == code);
        start.elapsed()
    }

    /// Waits until `condition` holds, or panics with the state and diagnostics.
    pub fn wait_for(&self, what: &str, condition: impl FnMut() -> bool) {
        if let Err(error) = wait_until(
            &format!("{}: {what}", self.node.name()),
            self.state_wait,
            POLL,
            condition,
        ) {
            panic!("{error} (state {})\n{}", self.state(), self.diagnostics());
        }
    }

    /// Waits until `state -v` shows the peer as `expected` (e.g. `node1 ALONE`).
    pub fn wait_peer(&self, expected: &str) {
        self.wait_for(&format!("its peer seen as {expected}"), || {
            self.verbose_unchecked()
                .lines()
                .filter_map(|line| line.trim_start().strip_prefix("peer"))
                .any(|value| value.trim() == expected)
        });
    }

    /// The module's verbose log, through `safekit log -A -s 1000`.
    pub fn log(&self) -> String {
        self.safekit(&format!("log -m {} -A -s 1000", self.module))
            .stdout
    }

    /// The module log, read from its file (works when the agent is down).
    pub fn module_log(&self) -> String {
        std::fs::read_to_string(self.module_var_dir().join("log")).unwrap_or_default()
    }

    /// `state -v` and the module log, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- {} state -v:\n{}\n--- module log:\n{}",
            self.node.name(),
            self.verbose_unchecked(),
            self.module_log()
        )
    }

    /// Runs `shell` inside the node in directory `dir`; panics if it fails.
    pub fn run_in(&self, dir: &str, shell: &str) {
        self.node
            .run_ok(format!("cd {dir} && {shell}"))
            .unwrap_or_else(|error| panic!("{}: {shell}: {error}", self.node.name()));
    }

    /// The tree below `dir`, seen inside the node: every entry's type, path,
    /// mode, owner and link target, then every regular file's SHA-256.
    pub fn tree_digest(&self, dir: &str) -> String {
        self.node
            .run_ok(format!(
                "cd {dir} && find . -mindepth 1 -printf '%y %p %m %u %g %l\\n' | LC_ALL=C sort \
                 && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum"
            ))
            .unwrap_or_else(|error| panic!("{}: list the tree: {error}", self.node.name()))
    }
}

/// The first start of a pair, as an operator does it: `node1` `prim`
/// (ALONE), `node2` `second` once it sees `node1` ALONE, then `node2` SECOND
/// and `node1` PRIM.
pub fn first_start(node1: &AgentNode<'_>, node2: &AgentNode<'_>) {
    node1.safekit_ok(&format!("prim -m {}", node1.module));
    node1.wait_state(ALONE);
    node2.wait_peer(&format!("{} ALONE", node1.name()));
    node2.safekit_ok(&format!("second -m {}", node2.module));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
}

/// The value of a `key  value` line of `safekit state -v` (empty if none).
pub fn detail(verbose: &str, key: &str) -> String {
    verbose
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(key))
        .map(|value| value.trim().to_string())
        .unwrap_or_default()
}

/// Asserts two [`AgentNode::tree_digest`]s are identical, printing the first difference.
pub fn assert_same_tree(what: &str, expected: &str, actual: &str) {
    if expected != actual {
        let difference = expected
            .lines()
            .zip(actual.lines())
            .find(|(left, right)| left != right);
        panic!(
            "{what}: trees differ (first difference {difference:?}; {} vs {} lines)",
            expected.lines().count(),
            actual.lines().count()
        );
    }
}

/// Starts the agent of each node (see [`AgentNode::start_agent`]); the agents
/// stop when the returned processes are dropped or killed.
pub fn start_agents<const N: usize>(nodes: [&AgentNode<'_>; N]) -> [NodeProcess; N] {
    nodes.map(AgentNode::start_agent)
}

/// Waits until `condition` holds, or panics with every node's diagnostics
/// (for a condition on several nodes). Bounded by the first node's wait.
pub fn wait_for_all(nodes: &[&AgentNode<'_>], what: &str, condition: impl FnMut() -> bool) {
    let timeout = nodes
        .first()
        .map_or(DEFAULT_STATE_WAIT, |node| node.state_wait);
    if let Err(error) = wait_until(what, timeout, POLL, condition) {
        let diagnostics: Vec<String> = nodes.iter().map(|node| node.diagnostics()).collect();
        panic!("{error}\n{}", diagnostics.join("\n"));
    }
}

/// After a split brain heals, waits until one of the two nodes is PRIM and
/// the other SECOND, and returns them as `(winner, loser)`.
pub fn wait_one_primary<'a, 'c>(
    node1: &'a AgentNode<'c>,
    node2: &'a AgentNode<'c>,
) -> (&'a AgentNode<'c>, &'a AgentNode<'c>) {
    wait_for_all(
        &[node1, node2],
        "one PRIM and one SECOND after the split brain",
        || {
            let states = [node1.state(), node2.state()];
            states == [PRIM, SECOND] || states == [SECOND, PRIM]
        },
    );
    if node1.state() == PRIM {
        (node1, node2)
    } else {
        (node2, node1)
    }
}

/// Port of the small web application the scenario modules' `start_prim`
/// starts (`python3 -m http.server`, serving the node's name as `/whoami`).
pub const WHOAMI_PORT: u16 = 8080;

/// The node name the client gets from the `/whoami` application through `vip`
/// (one attempt, 1 s), or `None` when nothing answers.
pub fn client_reaches(client: &Node, vip: std::net::Ipv4Addr) -> Option<String> {
    let output = client
        .run(format!("curl -s -m 1 http://{vip}:{WHOAMI_PORT}/whoami"))
        .expect("run curl");
    output.success().then(|| output.stdout.trim().to_string())
}

/// Waits ([`DEFAULT_STATE_WAIT`]) until the client reaches `node`'s
/// application through `vip`; panics with the last answer otherwise.
pub fn wait_client_reaches(client: &Node, vip: std::net::Ipv4Addr, node: &str) {
    wait_until(
        &format!("the client to reach {node} through {vip}"),
        DEFAULT_STATE_WAIT,
        Duration::from_millis(50),
        || client_reaches(client, vip).as_deref() == Some(node),
    )
    .unwrap_or_else(|error| panic!("{error}: last answer {:?}", client_reaches(client, vip)));
}
