//! A restart of the agent after it was killed, run like an operator's runbook.
//!
//! `kill -9` of `safekitd` alone (not of the node) leaves the application
//! started by `start_prim`, the virtual IP and the custom checker's program
//! running. The next agent must clean them up before the module can start
//! again, so that a node that becomes SECOND never keeps a stale application
//! writing or answering on the virtual IP: also what a SECOND's own hooks
//! started, and for a module the new agent refuses to start. A start whose
//! record cannot be written is refused. The binaries must be built first:
//! `cargo build -p safekit-agent --bins` (same target directory).

use std::net::Ipv4Addr;

use safekit_tests::agents::{
    ALONE, AgentNode, ModuleSpec, PRIM, SECOND, STOP, first_start, wait_client_reaches,
};
use safekit_tests::{Cluster, Node, require_root};

const MODULE: &str = "mirror";

/// Starts the application in the background (a web server answering with
/// the node's name) and writes its pid file, as the demo module does.
const START_PRIM: &str = r#"#!/bin/sh
mkdir -p "$SAFEUSERVAR/www"
hostname > "$SAFEUSERVAR/www/whoami"
cd "$SAFEUSERVAR/www" || exit 1
setsid python3 -m http.server 8080 >/dev/null 2>&1 </dev/null &
echo $! > "$SAFEUSERVAR/app.pid"
"$SAFE/safekit" printi "start_prim: application started as pid $!"
exit 0
"#;

/// Stops the application from its pid file (`kill -9` when called with `force`).
const STOP_PRIM: &str = r#"#!/bin/sh
PIDFILE="$SAFEUSERVAR/app.pid"
[ -f "$PIDFILE" ] || exit 0
if [ "$1" = "force" ]; then
    kill -9 "$(cat "$PIDFILE")" 2>/dev/null
else
    kill "$(cat "$PIDFILE")" 2>/dev/null
fi
rm -f "$PIDFILE"
echo "stop_prim $*" >> "$SAFEUSERVAR/stop_prim.calls"
exit 0
"#;

/// A custom checker's program: writes its pid, then reports `custom.app` up every 500 ms.
const CHECK_APP: &str = r#"#!/bin/sh
echo $$ > "$SAFEUSERVAR/checker.pid"
while true; do
    "$SAFE/safekit" set -r custom.app -v up -i app >/dev/null 2>&1
    sleep 0.5
done
"#;

fn module(vip: Ipv4Addr) -> ModuleSpec {
    ModuleSpec::new(MODULE)
        .config(format!(
            r#"<vip>
    <interface_list>
      <interface check="off" arpreroute="on">
        <real_interface>
          <virtual_addr addr="{vip}" where="one_side_alias"/>
        </real_interface>
      </interface>
    </interface_list>
  </vip>
  <user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"/>
  <check><custom ident="app" when="prim" exec="check_app"/></check>"#
        ))
        .script("start_prim", START_PRIM)
        .script("stop_prim", STOP_PRIM)
        .script("check_app", CHECK_APP)
}

/// The pid written by the application or the checker in `$SAFEUSERVAR/<file>`.
fn pid_from(node: &AgentNode<'_>, file: &str) -> u32 {
    let path = node.module_var_dir().join(file);
    node.wait_for(&format!("{} to be written", path.display()), || {
        std::fs::read_to_string(&path).is_ok_and(|text| text.trim().parse::<u32>().is_ok())
    });
    std::fs::read_to_string(&path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid")
}

/// Whether process `pid` of the node runs (exists and is not a zombie).
fn alive(node: &Node, pid: u32) -> bool {
    let state = node
        .run_ok(format!(
            "sed -n 's/^State:[[:space:]]*\\([A-Z]\\).*/\\1/p' /proc/{pid}/status 2>/dev/null; true"
        ))
        .expect("read the process state");
    let state = state.trim();
    !state.is_empty() && state != "Z"
}

/// Whether the node holds `vip` on one of its interfaces.
fn holds(node: &Node, vip: Ipv4Addr) -> bool {
    node.run_ok("ip -o addr show")
        .expect("ip addr")
        .contains(&format!(" {vip}/"))
}

#[test]
fn a_restarted_agent_stops_what_its_killed_predecessor_left_running() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    let ([node1, node2], [agent1, _agent2]) = module(vip).start_on(&cluster);

    // Given node1 PRIM with its application, its checker program and the VIP.
    first_start(&node1, &node2);
    wait_client_reaches(cluster.client(), vip, "node1");
    let app_pid = pid_from(&node1, "app.pid");
    let checker_pid = pid_from(&node1, "checker.pid");
    assert!(alive(node1.node(), app_pid) && alive(node1.node(), checker_pid));

    // When only node1's agent is killed (the node itself keeps running).
    agent1.kill();
    node2.wait_state(ALONE);
    node2.wait_for("node2 to hold the VIP", || holds(node2.node(), vip));
    // The agent's death alone stops nothing: this is what must be cleaned up.
    assert!(
        alive(node1.node(), app_pid),
        "the application survives the agent"
    );
    assert!(
        alive(node1.node(), checker_pid),
        "the checker survives the agent"
    );
    assert!(holds(node1.node(), vip), "the VIP survives the agent");

    // Then the restarted agent cleans up before the module can start.
    let _agent1 = node1.start_agent();
    node1.wait_for("the clean-up to finish", || {
        node1
            .module_log()
            .contains("Clean-up after the agent's crash done")
    });
    let log = node1.module_log();
    assert!(
        log.contains("the agent stopped without stopping the application: cleaning up"),
        "{log}"
    );
    assert!(
        log.contains("Virtual IP")
            && log.contains(&format!("{vip} left by the previous agent removed from")),
        "{log}"
    );
    assert!(
        log.contains("Checker program custom.app")
            && log.contains("left by the previous agent killed"),
        "{log}"
    );
    let calls = std::fs::read_to_string(node1.module_var_dir().join("stop_prim.calls"))
        .expect("stop_prim ran");
    assert!(calls.contains("stop_prim force PRIM STOP stop"), "{calls}");
    assert!(
        !alive(node1.node(), app_pid),
        "the stale application is gone"
    );
    assert!(
        !alive(node1.node(), checker_pid),
        "the stale checker is gone"
    );
    assert!(!holds(node1.node(), vip), "node1 no longer holds the VIP");
    assert!(holds(node2.node(), vip), "node2 keeps the VIP");
    assert_eq!(node2.state(), ALONE, "node2 keeps running the application");
    wait_client_reaches(cluster.client(), vip, "node2");

    // The operator starts node1 again: it joins as SECOND, node2 PRIM.
    node1.safekit_ok(&format!("start -m {MODULE}"));
    node1.wait_state(SECOND);
    node2.wait_state(PRIM);
    assert!(!holds(node1.node(), vip), "a SECOND holds no VIP");
    wait_client_reaches(cluster.client(), vip, "node2");
    let cleanups = node1
        .module_log()
        .matches("the agent stopped without stopping the application")
        .count();
    assert_eq!(cleanups, 1, "one crash, one clean-up");
}

#[test]
fn a_clean_stop_leaves_nothing_for_the_next_agent_to_clean_up() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    let ([node1, node2], [agent1, _agent2]) = module(vip).start_on(&cluster);
    first_start(&node1, &node2);
    pid_from(&node1, "checker.pid");

    // A clean stop of node1 (its application stopped by stop_prim), then its agent killed.
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node2.wait_state(ALONE);
    agent1.kill();
    let calls_before = std::fs::read_to_string(node1.module_var_dir().join("stop_prim.calls"))
        .expect("stop_prim ran at the stop");

    let _agent1 = node1.start_agent();
    node1.safekit_ok(&format!("start -m {MODULE}"));
    node1.wait_state(SECOND);
    let log = node1.module_log();
    assert!(
        !log.contains("the agent stopped without stopping the application"),
        "{log}"
    );
    let calls_after = std::fs::read_to_string(node1.module_var_dir().join("stop_prim.calls"))
        .expect("stop_prim calls");
    assert_eq!(calls_before, calls_after, "no stop_prim after a clean stop");
}

/// A SECOND's own hook starts a program (a cache warmer, say) and writes its pid.
const START_SECOND: &str = r#"#!/bin/sh
setsid sleep 1000 >/dev/null 2>&1 </dev/null &
echo $! > "$SAFEUSERVAR/second.pid"
exit 0
"#;

/// Stops the SECOND's program and records the call.
const STOP_SECOND: &str = r#"#!/bin/sh
PIDFILE="$SAFEUSERVAR/second.pid"
[ -f "$PIDFILE" ] && kill -9 "$(cat "$PIDFILE")" 2>/dev/null
rm -f "$PIDFILE"
echo "stop_second $*" >> "$SAFEUSERVAR/stop_second.calls"
exit 0
"#;

#[test]
fn a_restarted_agent_stops_what_the_start_second_hook_of_its_predecessor_started() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    let ([node1, node2], [_agent1, agent2]) = module(vip)
        .script("start_second", START_SECOND)
        .script("stop_second", STOP_SECOND)
        .start_on(&cluster);

    // Given node2 SECOND, with the program its start_second hook started.
    first_start(&node1, &node2);
    let program = pid_from(&node2, "second.pid");
    assert!(alive(node2.node(), program));

    // When node2's agent is killed, the program survives it.
    agent2.kill();
    assert!(
        alive(node2.node(), program),
        "the program survives the agent"
    );

    // Then the restarted agent runs stop_second force, not stop_prim.
    let _agent2 = node2.start_agent();
    node2.wait_for("the clean-up to finish", || {
        node2
            .module_log()
            .contains("Clean-up after the agent's crash done")
    });
    let log = node2.module_log();
    assert!(
        log.contains("the agent stopped without stopping the application: cleaning up"),
        "{log}"
    );
    let calls = std::fs::read_to_string(node2.module_var_dir().join("stop_second.calls"))
        .expect("stop_second ran");
    assert!(
        calls.contains("stop_second force SECOND STOP stop"),
        "{calls}"
    );
    assert!(!alive(node2.node(), program), "the stale program is gone");
    assert!(
        !node2.module_var_dir().join("stop_prim.calls").exists(),
        "a SECOND ran no application: no stop_prim"
    );
    node1.wait_state(ALONE);
}

#[test]
fn a_module_the_restarted_agent_refuses_is_cleaned_up_all_the_same() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    let ([node1, node2], [agent1, _agent2]) = module(vip).start_on(&cluster);
    first_start(&node1, &node2);
    wait_client_reaches(cluster.client(), vip, "node1");
    let app_pid = pid_from(&node1, "app.pid");

    // node1's agent is killed, and its module's configuration broken meanwhile.
    agent1.kill();
    node2.wait_state(ALONE);
    let userconfig = node1
        .safe_dir()
        .join("modules")
        .join(MODULE)
        .join("conf")
        .join("userconfig.xml");
    std::fs::write(&userconfig, "<safe><service mode=\"nonsense\">").expect("break userconfig");

    // The new agent refuses the module but still stops what the old one left.
    let _agent1 = node1.start_agent();
    node1.wait_for("the clean-up to finish", || {
        node1
            .module_log()
            .contains("Clean-up after the agent's crash done")
    });
    let log = node1.module_log();
    assert!(log.contains("Invalid configuration"), "{log}");
    let calls = std::fs::read_to_string(node1.module_var_dir().join("stop_prim.calls"))
        .expect("stop_prim ran");
    assert!(calls.contains("stop_prim force PRIM STOP stop"), "{calls}");
    assert!(
        !alive(node1.node(), app_pid),
        "the stale application is gone"
    );
    assert!(!holds(node1.node(), vip), "node1 no longer holds the VIP");
    wait_client_reaches(cluster.client(), vip, "node2");
}

#[test]
fn a_start_that_cannot_be_recorded_is_refused_and_runs_nothing() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    let ([node1, _node2], [_agent1, _agent2]) = module(vip).start_on(&cluster);

    // The record cannot be written: its path is a directory that is not empty.
    let record = node1.module_var_dir().join("leftovers");
    std::fs::create_dir_all(record.join("blocker")).expect("block the record");

    let output = node1.safekit(&format!("prim -m {MODULE}"));
    node1.wait_for("the start to be refused", || {
        node1
            .module_log()
            .contains("cannot record what the module runs")
    });
    node1.wait_state(STOP);
    let answer = format!("{}{}", output.stdout, output.stderr);
    assert!(
        answer.contains("cannot record what the module runs") && answer.contains("start refused"),
        "the command's answer says why: {answer}"
    );
    assert!(
        !node1.module_var_dir().join("app.pid").exists(),
        "start_prim did not run"
    );
    assert!(!holds(node1.node(), vip), "no VIP left behind");
    std::fs::remove_dir_all(&record).expect("unblock the record");
}
