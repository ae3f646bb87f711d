//! Heartbeat under load: a PRIM/SECOND pair with `<heart pulse="700ms"
//! timeout="3000ms">`, a process checker and a replicated directory keeps
//! its states while both nodes have every core saturated (stress-ng) and
//! their disks busy (fio) for 60 s, as an operator would check it: the
//! states polled every second with `safekit state -m mirror -lq`, the module
//! logs free of checker actions and heartbeat losses during the window, and
//! the largest heartbeat gap read from `safekit state -v` (printed, so that
//! the CI log records it).
//!
//! node1 writes through the replicated mount (so every write also goes
//! through the replication to node2); node2 writes to a private directory
//! outside the replicated one. Needs `stress-ng` and `fio`. The binaries
//! must be built first: `cargo build -p safekit-agent --bins` (same target
//! directory).

use std::time::{Duration, Instant};

use safekit_tests::agents::{AgentNode, ModuleSpec, PRIM, SECOND, first_start, start_agents};
use safekit_tests::{Cluster, NodeProcess, require_root};

const MODULE: &str = "mirror";
/// The replicated directory (a private directory of each node).
const REPLICATED: &str = "/replicated/data";
/// node2's fio directory, outside the replicated one.
const SCRATCH: &str = "/scratch/fio";
/// The watched process's name (a copy of `sleep`, so that `comm` is this).
const APP: &str = "loadapp";
/// How long the load lasts.
const LOAD_SECONDS: u64 = 60;

const START_PRIM: &str = r#"#!/bin/sh
cp /bin/sleep "$SAFEUSERVAR/loadapp"
setsid "$SAFEUSERVAR/loadapp" 100000 >/dev/null 2>&1 </dev/null &
exit 0
"#;

const STOP_PRIM: &str = r#"#!/bin/sh
pkill -x loadapp
exit 0
"#;

/// The module: a process checker on [`APP`] and `<rfs>` over [`REPLICATED`].
fn module() -> ModuleSpec {
    ModuleSpec::new(MODULE)
        .config(r#"<user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"/>"#)
        .config(format!(
            r#"<errd polltimer="1"><proc name="{APP}" atleast="1" action="restart" class="prim"/></errd>"#
        ))
        .config(format!(
            r#"<rfs nbrei="3">
    <replicated dir="{REPLICATED}" mode="read_only"/>
  </rfs>"#
        ))
        .script("start_prim", START_PRIM)
        .script("stop_prim", STOP_PRIM)
        .state_wait(Duration::from_secs(60))
}

/// Installs [`module`] on both nodes with pulse 700 ms and timeout 3000 ms.
fn install(cluster: &Cluster) -> [AgentNode<'_>; 2] {
    let spec = module();
    let nodes: [AgentNode<'_>; 2] = spec.install_on(cluster);
    let default_heart = r#"<heart pulse="200ms" timeout="1000ms">"#;
    let userconfig = spec.userconfig(cluster);
    assert!(
        userconfig.contains(default_heart),
        "the harness's <heart> changed: {userconfig}"
    );
    let userconfig = userconfig.replace(default_heart, r#"<heart pulse="700ms" timeout="3000ms">"#);
    for node in &nodes {
        let path = node
            .safe_dir()
            .join("modules")
            .join(MODULE)
            .join("conf")
            .join("userconfig.xml");
        std::fs::write(&path, &userconfig)
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    }
    nodes
}

/// The `heartbeat` lines of `safekit state -v` (one per LAN that received any).
fn heartbeat_lines(node: &AgentNode<'_>) -> Vec<String> {
    node.verbose()
        .lines()
        .map(str::trim_start)
        .filter_map(|line| line.strip_prefix("heartbeat"))
        .map(|rest| rest.trim().to_string())
        .collect()
}

/// The lines of `node`'s module log written after its first `from` bytes
/// that report a checker action or a heartbeat loss.
fn alarms_since(node: &AgentNode<'_>, from: usize) -> Vec<String> {
    let log = node.module_log();
    log.get(from..)
        .unwrap_or(&log)
        .lines()
        .filter(|line| {
            line.contains("Action ")
                || line.contains(" fired")
                || line.contains("no heartbeat")
                || (line.contains("Heartbeat on LAN") && line.contains(" lost"))
        })
        .map(str::to_string)
        .collect()
}

/// Starts the load on `node`: stress-ng on every core and fio in `dir`, for [`LOAD_SECONDS`].
fn start_load(node: &AgentNode<'_>, dir: &str) -> [NodeProcess; 2] {
    node.node()
        .run_ok(format!("mkdir -p {dir}"))
        .unwrap_or_else(|error| panic!("{}: mkdir {dir}: {error}", node.name()));
    let stress = node
        .node()
        .spawn(format!(
            "exec stress-ng --cpu 0 --timeout {LOAD_SECONDS}s --metrics-brief"
        ))
        .expect("spawn stress-ng");
    let fio = node
        .node()
        .spawn(format!(
            "exec fio --name=w --rw=randwrite --bs=64k --size=128m --time_based \
             --runtime={LOAD_SECONDS} --ioengine=psync --fsync=16 --fallocate=none \
             --directory={dir}"
        ))
        .expect("spawn fio");
    [stress, fio]
}

/// Waits for a load process to finish (it ends by itself) and asserts it succeeded.
fn assert_load_ran(node: &AgentNode<'_>, what: &str, process: &NodeProcess) {
    let status = process.wait(Duration::from_secs(30));
    let output = process.output();
    match status {
        Ok(status) => assert!(
            status.success(),
            "{}: {what} failed ({status}): {output}",
            node.name()
        ),
        Err(error) => {
            process.kill();
            panic!("{}: {what} did not end: {error}: {output}", node.name());
        }
    }
}

#[test]
fn heartbeats_and_checkers_keep_their_timing_with_cpu_and_disk_saturated() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    let cluster = Cluster::builder()
        .nodes(2)
        .private_dir(REPLICATED)
        .private_dir(SCRATCH)
        .build()
        .expect("build the cluster");
    let [node1, node2] = install(&cluster);
    let _agents = start_agents([&node1, &node2]);
    first_start(&node1, &node2);
    node1.wait_for("the process checker to see the application", || {
        node1
            .verbose()
            .lines()
            .any(|line| line.contains(&format!("checker proc.{APP}")) && line.contains(" up for "))
    });
    let logged = [node1.module_log().len(), node2.module_log().len()];

    let load1 = start_load(&node1, REPLICATED);
    let load2 = start_load(&node2, SCRATCH);
    let start = Instant::now();
    let mut changes = Vec::new();
    let mut polls = 0;
    while start.elapsed() < Duration::from_secs(LOAD_SECONDS) {
        let tick = Instant::now();
        let states = [node1.state(), node2.state()];
        polls += 1;
        if states != [PRIM, SECOND] {
            changes.push(format!(
                "{:.1} s: {states:?}",
                start.elapsed().as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
    }
    for (node, load) in [(&node1, &load1), (&node2, &load2)] {
        assert_load_ran(node, "stress-ng", &load[0]);
        assert_load_ran(node, "fio", &load[1]);
    }

    let gaps = [heartbeat_lines(&node1), heartbeat_lines(&node2)];
    for (node, lines, load) in [(&node1, &gaps[0], &load1), (&node2, &gaps[1], &load2)] {
        let written: Vec<String> = load[1]
            .output()
            .lines()
            .filter(|line| line.trim_start().starts_with("WRITE:"))
            .map(|line| line.trim().to_string())
            .collect();
        println!(
            "{} heartbeat after {LOAD_SECONDS} s of load: {lines:?}; fio {written:?}",
            node.name()
        );
    }
    assert!(
        changes.is_empty(),
        "states other than [PRIM, SECOND] (node1, node2) seen in {polls} polls: {changes:?}\n{}\n{}",
        node1.diagnostics(),
        node2.diagnostics()
    );
    for (node, from) in [(&node1, logged[0]), (&node2, logged[1])] {
        let alarms = alarms_since(node, from);
        assert!(
            alarms.is_empty(),
            "{}: checker actions or heartbeat losses under load: {alarms:?}",
            node.name()
        );
    }
    for (node, lines) in [(&node1, &gaps[0]), (&node2, &gaps[1])] {
        assert!(
            lines
                .iter()
                .any(|line| line.starts_with("lan default:") && line.contains("largest gap")),
            "{}: no heartbeat reception in state -v: {lines:?}",
            node.name()
        );
    }
    assert_eq!([node1.state(), node2.state()], [PRIM, SECOND]);
}
