//! `cargo xtask demo`: the README's first command. On a machine with nothing
//! configured it builds the agent, creates two nodes and a client in network
//! namespaces (the `safekit-tests` harness), installs the `demo` module
//! (`modules/demo/`: a small record store behind a virtual IP) and walks
//! through the runbook of the seeds: start as primary, second node joins,
//! client writes through the VIP, primary killed, failover, node restarted,
//! reintegration, swap. Each step prints what happened and `safekit state` of
//! both nodes; the summary gives the client-visible interruptions and whether
//! every acknowledged write survived. Everything is removed at the end (on
//! Ctrl-C too), unless `--keep` holds the cluster until Enter or Ctrl-C.
//!
//! The records live in a replicated directory (`<rfs>`): node2 joins with a
//! full resynchronization, node1 rejoins with an incremental one, and the
//! demo checks that node2 serves every record node1 acknowledged before its
//! power cut. `--no-replicate` shows the same runbook without `<rfs>` (each
//! node keeps its own records), to compare.

/// `println!` that ignores a closed stdout (`cargo xtask demo | head`): the
/// demo must still tear its cluster down.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` likewise.
macro_rules! eout {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub(crate) mod client;
mod keep;
pub(crate) mod node;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use safekit_tests::{Cluster, NodeProcess};

use client::{Writer, acked_by, interruption, stored_records};
use keep::{Input, KeptNode};
use node::{ALONE, DemoNode, ModuleSettings, PRIM, SECOND, STOP, WAIT};

pub(crate) use keep::shell;

/// The module's name in `SAFE/modules/`.
pub(crate) const MODULE: &str = "demo";
/// The demo application's port.
const PORT: u16 = 8080;
/// Writes each phase waits for before going on.
const WRITES_PER_PHASE: usize = 25;

/// `cargo xtask demo`'s options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DemoArgs {
    /// Leave the cluster up at the end, until Enter or Ctrl-C, to explore it
    /// with `cargo xtask shell node1` from another terminal.
    #[arg(long)]
    keep: bool,
    /// Wait for Enter between steps.
    #[arg(long)]
    pause: bool,
    /// Do not replicate the application's data (no `<rfs>`): each node keeps
    /// its own records.
    #[arg(long)]
    no_replicate: bool,
    /// Do not run `cargo build` first; use the binaries next to xtask's own.
    #[arg(long)]
    no_build: bool,
}

pub(crate) fn run(root: &Path, args: DemoArgs) -> anyhow::Result<()> {
    // First, before any thread starts: Ctrl-C must tear down, not leave namespaces.
    let mut input = Input::catch_signals()?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo needs root: it creates network and mount namespaces (run `sudo -E cargo xtask demo`)"
        );
    }
    let bin_dir = std::env::current_exe()
        .context("find xtask's own binary")?
        .parent()
        .context("xtask's binary has no directory")?
        .to_path_buf();
    if !args.no_build {
        build(&bin_dir)?;
    }
    for binary in ["safekit", "safekitd"] {
        if !bin_dir.join(binary).is_file() {
            bail!(
                "{} is not built: run `cargo build -p safekit-agent --bins` (or drop --no-build)",
                bin_dir.join(binary).display()
            );
        }
    }
    if !tool_exists("python3") {
        bail!("the demo application and its client need python3 (apt-get install python3)");
    }
    // Panics naming the Debian package of any missing tool (ip, nsenter, nft, ...).
    safekit_tests::require_root();

    let scratch = Scratch::create()?;
    let data_dir = scratch.path.join("data");
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .private_dir(&data_dir)
        .build()
        .context("create the demo's namespaces")?;
    let cluster_id = cluster.id().to_owned();
    let settings = ModuleSettings {
        vip: cluster.spare_addr(0, 0),
        data_dir,
        port: PORT,
        replicate: !args.no_replicate,
    };
    let result = Demo::walk(&cluster, root, &bin_dir, &settings, &args, &mut input);
    match &result {
        Ok(demo) if args.keep => {
            let nodes: Vec<KeptNode> = demo
                .nodes
                .iter()
                .map(|node| KeptNode {
                    name: node.name().to_owned(),
                    netns: node.node.netns().to_owned(),
                    safekit: Some((node.safe.clone(), node.var.clone())),
                })
                .chain(std::iter::once(KeptNode {
                    name: "client".into(),
                    netns: cluster.client().netns().to_owned(),
                    safekit: None,
                }))
                .collect();
            keep::write_keep_file(&scratch.path, &cluster_id, &nodes)?;
            out!("\nThe cluster is still up (--keep). From another terminal:");
            out!(
                "  cargo xtask shell node1    a shell in node1: safekit state -m demo -v, safekit log -m demo, safekit swap -m demo"
            );
            out!("  cargo xtask shell node2    the same in node2");
            out!(
                "  cargo xtask shell client   the client: curl -s http://{}:{PORT}/records",
                settings.vip
            );
            out!("Press Enter (or Ctrl-C) here to tear it down.");
            input.wait_for_teardown();
        }
        Ok(_) => {}
        Err(_) if keep::interrupted() => {}
        Err(_) => out!("\nThe demo failed (the reason follows); tearing down."),
    }
    let outcome = if keep::interrupted() {
        Err(anyhow::anyhow!(
            "interrupted: the demo was stopped by a signal"
        ))
    } else {
        result.and_then(|demo| demo.outcome)
    };
    drop(cluster);
    drop(scratch);
    let left = safekit_tests::leftovers(&cluster_id);
    if left.is_empty() {
        out!("teardown: cluster {cluster_id} removed, nothing left behind");
    } else {
        out!("teardown: left behind: {}", left.join("; "));
    }
    outcome
}

/// `cargo build` of the binaries the demo runs, into the target directory xtask runs from.
pub(crate) fn build(bin_dir: &Path) -> anyhow::Result<()> {
    let profile = bin_dir
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("debug");
    let target_dir = bin_dir
        .parent()
        .context("xtask's binary is not in a target directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "-p",
            "safekit-agent",
            "--bins",
            "--target-dir",
        ])
        .arg(target_dir);
    if profile == "release" {
        command.arg("--release");
    }
    crate::run(&mut command).context("cannot build the agent for the demo")
}

fn tool_exists(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// `$TMPDIR/safekit-demo-<pid>/`: the mount point of the data directory and
/// `keep.txt`; removed when dropped (after the cluster).
#[derive(Debug)]
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create() -> anyhow::Result<Scratch> {
        reap_stale_scratch();
        let path =
            std::env::temp_dir().join(format!("{}{}", keep::SCRATCH_PREFIX, std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Scratch { path })
    }
}

/// Removes the scratch directories of demos that died without cleaning up
/// (killed outright); the harness removes their namespaces likewise.
fn reap_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dead = name
            .strip_prefix(keep::SCRATCH_PREFIX)
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if dead {
            // Best effort: a directory still in use as a mount point stays.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eout!("cannot remove {}: {error}", self.path.display());
        }
    }
}

/// Polls `done` every 50 ms until it holds; fails after `timeout` or on Ctrl-C.
pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if done() {
            return Ok(());
        }
        if keep::interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

/// The walk-through, step by step.
struct Demo<'a> {
    cluster: &'a Cluster,
    nodes: [DemoNode<'a>; 2],
    settings: &'a ModuleSettings,
    /// Kept so that the agents are visible as what they are; the cluster kills them.
    agents: Vec<NodeProcess>,
    step: usize,
    pause: bool,
    /// `Ok` when every acknowledged write survived.
    outcome: anyhow::Result<()>,
}

impl std::fmt::Debug for Demo<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Demo")
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl<'a> Demo<'a> {
    fn walk(
        cluster: &'a Cluster,
        root: &Path,
        bin_dir: &Path,
        settings: &'a ModuleSettings,
        args: &DemoArgs,
        input: &mut Input,
    ) -> anyhow::Result<Demo<'a>> {
        let secret = random_secret()?;
        let module_dir = root.join("modules").join(MODULE);
        let install = |k: usize| {
            DemoNode::install(
                cluster.node(k),
                cluster,
                &module_dir,
                settings,
                &secret,
                bin_dir,
            )
        };
        let mut demo = Demo {
            cluster,
            nodes: [install(1)?, install(2)?],
            settings,
            agents: Vec::new(),
            step: 0,
            pause: args.pause,
            outcome: Ok(()),
        };
        demo.intro();
        demo.run_steps(input).map(|()| demo)
    }

    fn node1(&self) -> &DemoNode<'a> {
        &self.nodes[0]
    }

    fn node2(&self) -> &DemoNode<'a> {
        &self.nodes[1]
    }

    fn intro(&self) {
        let vip = self.settings.vip;
        out!(
            "SafeKit demo: a mirror cluster of two nodes and a client, each a network namespace on this machine"
        );
        out!(
            "  node1 {}, node2 {}, client {}; virtual IP {vip}; heartbeats every 200 ms, failover after 1000 ms of silence",
            self.cluster.node(1).addr(0),
            self.cluster.node(2).addr(0),
            self.cluster.client().addr(0)
        );
        out!(
            "  module `{MODULE}` (modules/demo/): a record store on port {PORT}, started by start_prim on the primary, data in {}",
            self.settings.data_dir.display()
        );
        if self.settings.replicate {
            out!(
                "  replication: <rfs> replicates {} synchronously to the SECOND",
                self.settings.data_dir.display()
            );
        } else {
            out!("  replication: off (--no-replicate): each node keeps its own records");
        }
    }

    fn step(&mut self, input: &mut Input, title: &str) -> anyhow::Result<()> {
        if self.pause && self.step > 0 {
            input.pause()?;
        }
        self.step += 1;
        out!("\n{}. {title}", self.step);
        Ok(())
    }

    fn say(&self, text: &str) {
        out!("   {text}");
    }

    /// `safekit state -m demo` of both nodes, run inside each node.
    fn states(&self) {
        for node in &self.nodes {
            out!("   | {:<6}{}", node.name(), node.state_line());
            if self.settings.replicate {
                let replication = node.detail("replication");
                if !replication.is_empty() {
                    out!("   | {:<6}  replication: {replication}", "");
                }
            }
        }
    }

    /// What the client gets for `GET <path>` through the virtual IP.
    fn client_get(&self, path: &str) -> Option<String> {
        let output = self
            .cluster
            .client()
            .run(format!(
                "python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=1).read().decode())' http://{}:{PORT}{path}",
                self.settings.vip
            ))
            .ok()?;
        output.success().then_some(output.stdout)
    }

    fn wait_client_reaches(&self, node: &str) -> anyhow::Result<()> {
        wait_for(
            &format!("the client to reach {node} through {}", self.settings.vip),
            Duration::from_secs(30),
            || {
                self.client_get("/whoami")
                    .is_some_and(|answer| answer.trim() == node)
            },
        )
    }

    fn run_steps(&mut self, input: &mut Input) -> anyhow::Result<()> {
        let vip = self.settings.vip;
        self.step(
            input,
            "Install the demo module on both nodes and start their agents (safekitd)",
        )?;
        for k in 0..2 {
            let agent = self.nodes[k].start_agent()?;
            self.agents.push(agent);
            self.nodes[k].wait_state(STOP)?;
        }
        self.say("both agents answer; a module starts in STOP");
        self.states();

        self.step(
            input,
            "node1: `safekit prim -m demo`: start as primary (ALONE: no peer yet)",
        )?;
        self.node1().safekit_ok(&format!("prim -m {MODULE}"))?;
        let started = Instant::now();
        self.node1().wait_state(ALONE)?;
        self.wait_client_reaches("node1")?;
        self.say(&format!(
            "node1 is ALONE after {:.1} s: start_prim started the application, node1 holds {vip}; the client reaches node1",
            started.elapsed().as_secs_f64()
        ));
        self.states();

        self.step(
            input,
            "node2: `safekit second -m demo`: the second node joins",
        )?;
        self.node2().safekit_ok(&format!("second -m {MODULE}"))?;
        self.join_as_second()?;
        self.states();

        self.step(
            input,
            &format!("client: writes numbered records through {vip}:{PORT} every 20 ms"),
        )?;
        let writer = Writer::start(self.cluster.client(), vip, PORT)?;
        writer.wait_acks("node1", WRITES_PER_PHASE)?;
        self.say(&format!(
            "{} records acknowledged by node1 so far (each fsynced before the answer)",
            acked_by(&writer.attempts(), "node1").len()
        ));
        self.states();

        self.step(
            input,
            "node1: power cut (every process killed, cables pulled) while the client writes",
        )?;
        let crash_time = unix_now();
        let crashed = Instant::now();
        self.cluster.node(1).crash().context("crash node1")?;
        self.say("node1 is gone: no heartbeat, no answer on the virtual IP");
        self.states();

        self.step(input, "failover: node2 stops hearing node1 and takes over")?;
        self.node2().wait_state(ALONE)?;
        let took_over = crashed.elapsed();
        writer.wait_acks("node2", WRITES_PER_PHASE)?;
        let failover_gap = interruption(&writer.attempts(), crash_time, "node1", "node2")
            .context("the client never moved from node1 to node2")?;
        self.say(&format!(
            "node2 is ALONE {:.1} s after the power cut and serves {vip}; the client saw no acknowledgement for {failover_gap:.0} ms",
            took_over.as_secs_f64()
        ));
        if self.settings.replicate {
            self.check_replicated_after_failover(&writer)?;
        }
        self.states();

        self.step(
            input,
            "node1 restarted: reboot, agent started, `safekit start -m demo`",
        )?;
        self.cluster.node(1).reboot().context("reboot node1")?;
        let agent = self.node1().start_agent()?;
        self.agents.push(agent);
        self.node1().safekit_ok(&format!("start -m {MODULE}"))?;
        let resynced = self.wait_joined(self.node1(), self.node2(), false)?;
        let failed_before = failed(&writer);
        writer.wait_acks("node2", WRITES_PER_PHASE)?;
        let how = match (self.settings.replicate, resynced) {
            (false, _) => "no data to resynchronize",
            (true, true) => "node1 got what changed while it was down",
            (true, false) => "resynchronized at once",
        };
        self.say(&format!(
            "reintegration ({how}): node1 is SECOND, node2 PRIM; the application kept running on node2 ({} failed writes meanwhile)",
            failed(&writer) - failed_before
        ));
        self.states();

        self.step(
            input,
            "node2: `safekit swap -m demo`: the roles are exchanged",
        )?;
        let swap_time = unix_now();
        self.node2().safekit_ok(&format!("swap -m {MODULE}"))?;
        self.node1().wait_state(PRIM)?;
        self.node2().wait_state(SECOND)?;
        writer.wait_acks("node1", WRITES_PER_PHASE)?;
        let swap_gap = interruption(&writer.attempts(), swap_time, "node2", "node1")
            .context("the client never moved from node2 to node1")?;
        self.say(&format!(
            "node1 is PRIM again, node2 SECOND: stop_prim on node2, the VIP moved, start_prim on node1; no acknowledgement for {swap_gap:.0} ms"
        ));
        self.states();

        self.step(
            input,
            "client: stops writing; every acknowledged record is looked up",
        )?;
        writer.stop()?;
        let attempts = writer.attempts();
        let survived = self.check_writes(&attempts)?;

        let acked1 = acked_by(&attempts, "node1").len();
        let acked2 = acked_by(&attempts, "node2").len();
        out!("\nSummary");
        out!(
            "  client-visible interruption on failover (power cut of node1): {failover_gap:.0} ms"
        );
        out!("  client-visible interruption on swap (node2 -> node1): {swap_gap:.0} ms");
        out!(
            "  writes: {} attempted, {} acknowledged (node1 {acked1}, node2 {acked2}), {} failed while the service moved",
            attempts.len(),
            acked1 + acked2,
            attempts
                .iter()
                .filter(|attempt| attempt.acked_by.is_none())
                .count()
        );
        let how = if self.settings.replicate {
            "on the final primary"
        } else {
            "each on the disk of the node that acknowledged it"
        };
        out!(
            "  every acknowledged write survived: {} ({how})",
            if survived { "yes" } else { "NO" }
        );
        if !self.settings.replicate {
            out!(
                "  replication: off (--no-replicate): node1's records are not on node2 and vice versa"
            );
        }
        if !survived {
            self.outcome = Err(anyhow::anyhow!(
                "some acknowledged writes were lost (listed above)"
            ));
        }
        Ok(())
    }

    /// Step 3's wait: node2 SECOND and node1 PRIM, or (with `<rfs>`) a clear
    /// message when node2 cannot get up to date.
    fn join_as_second(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let resynced = self.wait_joined(self.node2(), self.node1(), true)?;
        if self.node2().state() != SECOND {
            self.states();
            bail!(
                "node2 cannot join as SECOND: its resynchronization did not complete \
                 (see the states above and node2's module log; --no-replicate runs the demo without <rfs>)"
            );
        }
        let resync = if !self.settings.replicate {
            "nothing to resynchronize: no replicated directory"
        } else if resynced {
            "resynchronized"
        } else {
            "resynchronized at once: the directory is empty"
        };
        self.say(&format!(
            "node2 is SECOND, node1 PRIM after {:.1} s ({resync}); node2 now watches node1's heartbeats",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Waits until `joiner` is SECOND and `primary` PRIM (the primary turns
    /// PRIM once the joiner is up to date), printing each new resynchronization
    /// progress line either node reports meanwhile; `true` if there was one.
    /// With `give_up_without_resync`, also returns when the joiner waits
    /// because the agent cannot resynchronize.
    fn wait_joined(
        &self,
        joiner: &DemoNode<'a>,
        primary: &DemoNode<'a>,
        give_up_without_resync: bool,
    ) -> anyhow::Result<bool> {
        let mut seen: Vec<String> = Vec::new();
        wait_for(
            &format!(
                "{} to join as SECOND and {} to be PRIM",
                joiner.name(),
                primary.name()
            ),
            Duration::from_secs(60),
            || {
                if self.settings.replicate {
                    for node in [joiner, primary] {
                        let resync = node.detail("resync");
                        if !resync.is_empty() && !seen.contains(&resync) && seen.len() < 20 {
                            self.say(&format!("{} resync: {resync}", node.name()));
                            seen.push(resync);
                        }
                    }
                }
                let joined = joiner.state() == SECOND && primary.state() == PRIM;
                let stuck = give_up_without_resync
                    && self.settings.replicate
                    && joiner.state() == WAIT
                    && joiner
                        .log_file()
                        .contains("resynchronization is not available yet");
                joined || stuck
            },
        )
        .with_context(|| format!("{}\n{}", joiner.diagnostics(), primary.diagnostics()))?;
        Ok(!seen.is_empty())
    }

    /// With `<rfs>`: node2, now primary, serves every record node1 acknowledged.
    fn check_replicated_after_failover(&self, writer: &Writer) -> anyhow::Result<()> {
        let acked = acked_by(&writer.attempts(), "node1");
        let served = stored_records(&self.client_get("/records").unwrap_or_default());
        let missing: Vec<u64> = acked.difference(&served).copied().collect();
        if missing.is_empty() {
            self.say(&format!(
                "all {} records node1 acknowledged are on node2",
                acked.len()
            ));
            Ok(())
        } else {
            bail!(
                "{} of the {} records node1 acknowledged are missing on node2 after failover: {:?}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(20)]
            )
        }
    }

    /// Prints, per node, whether the records it acknowledged are stored; `true` if all are.
    fn check_writes(&self, attempts: &[client::Attempt]) -> anyhow::Result<bool> {
        let mut survived = true;
        if self.settings.replicate {
            let served = stored_records(
                &self
                    .client_get("/records")
                    .context("the client cannot read the records through the VIP")?,
            );
            for node in &self.nodes {
                let acked = acked_by(attempts, node.name());
                let missing: Vec<u64> = acked.difference(&served).copied().collect();
                self.say(&format!(
                    "{} acknowledged {} records: {} of them on the final primary, {} missing",
                    node.name(),
                    acked.len(),
                    acked.len() - missing.len(),
                    missing.len()
                ));
                if !missing.is_empty() {
                    self.say(&format!("missing: {:?}", &missing[..missing.len().min(20)]));
                }
                survived &= missing.is_empty();
            }
            return Ok(survived);
        }
        let path = |node: &DemoNode<'_>| {
            node.node
                .host_path(&self.settings.data_dir)
                .join("records.txt")
        };
        let stored: Vec<_> = self
            .nodes
            .iter()
            .map(|node| {
                std::fs::read_to_string(path(node))
                    .map(|text| stored_records(&text))
                    .with_context(|| format!("read {}", path(node).display()))
            })
            .collect::<anyhow::Result<_>>()?;
        for (k, node) in self.nodes.iter().enumerate() {
            let acked = acked_by(attempts, node.name());
            let missing: Vec<u64> = acked.difference(&stored[k]).copied().collect();
            let other = &self.nodes[1 - k];
            let on_other = acked.intersection(&stored[1 - k]).count();
            self.say(&format!(
                "{} acknowledged {} records: {} of them in its records.txt, {} missing; {} on {} (not replicated)",
                node.name(),
                acked.len(),
                acked.len() - missing.len(),
                missing.len(),
                on_other,
                other.name()
            ));
            if !missing.is_empty() {
                self.say(&format!("missing: {:?}", &missing[..missing.len().min(20)]));
            }
            survived &= missing.is_empty();
        }
        Ok(survived)
    }
}

fn failed(writer: &Writer) -> usize {
    writer
        .attempts()
        .iter()
        .filter(|attempt| attempt.acked_by.is_none())
        .count()
}

/// A fresh 32-byte cluster secret, in hex.
fn random_secret() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}
