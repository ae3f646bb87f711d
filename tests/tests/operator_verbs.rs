//! Operator verbs and hook scripts, run like a runbook on two nodes:
//! `stopstart`, every SafeKit hook in `bin/` (in order, with SafeKit's
//! arguments), `config -m M` / `confcheck -m M` (validated whole, refused
//! while running, applied when stopped), `cluster config` and `level`.
//!
//! States are read as an operator reads them (`safekit state -m M -lq`'s exit
//! code), hook runs from a file every hook appends `<name> <args>` to. The
//! binaries must be built first: `cargo build -p safekit-agent --bins` (same
//! target directory).

use std::path::PathBuf;

use safekit_tests::agents::{
    ALONE, AgentNode, ModuleSpec, PRIM, SECOND, STOP, detail, first_start,
};
use safekit_tests::{Cluster, require_root};

const MODULE: &str = "verbs";

/// Every hook: appends its name and arguments to `$SAFEUSERVAR/hooks.log`.
const HOOK: &str = r#"#!/bin/sh
echo "$(basename "$0") $*" >> "$SAFEUSERVAR/hooks.log"
exit 0
"#;

/// `start_both` also records the `COLOR` variable of `<user>`, to see which configuration a start used.
const START_BOTH: &str = r#"#!/bin/sh
echo "$(basename "$0") $*" >> "$SAFEUSERVAR/hooks.log"
echo "color=${COLOR:-none}" >> "$SAFEUSERVAR/color.log"
exit 0
"#;

/// `safekit level -m M` shows what the module's `level` hook prints.
const LEVEL: &str = r#"#!/bin/sh
echo "demo application 1.2.3 on $SAFEMODULE"
"#;

const HOOKS: [&str; 13] = [
    "prestart",
    "transition",
    "start_prim",
    "stop_prim",
    "start_both",
    "stop_both",
    "start_sec",
    "stop_sec",
    "start_second",
    "stop_second",
    "poststop",
    "config",
    "postconfig",
];

const USER: &str = r#"<user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"/>"#;

fn module() -> ModuleSpec {
    let mut spec = ModuleSpec::new(MODULE).config(USER);
    for hook in HOOKS {
        let content = if hook == "start_both" {
            START_BOTH
        } else {
            HOOK
        };
        spec = spec.script(hook, content);
    }
    spec.script("level", LEVEL)
}

fn two_nodes() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .build()
        .expect("build the cluster")
}

fn hooks_log(node: &AgentNode<'_>) -> Vec<String> {
    std::fs::read_to_string(node.module_var_dir().join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `hooks.log` has `expected` appended after its first `from`
/// lines, then asserts nothing else ran; returns the new length.
fn expect_hooks(node: &AgentNode<'_>, from: usize, expected: &[&str]) -> usize {
    node.wait_for(&format!("hooks {expected:?}"), || {
        hooks_log(node).len() >= from + expected.len()
    });
    let lines = hooks_log(node);
    assert_eq!(
        lines[from..],
        *expected,
        "{}: hooks run (whole log: {lines:#?})",
        node.name()
    );
    lines.len()
}

fn userconfig_path(node: &AgentNode<'_>) -> PathBuf {
    node.safe_dir()
        .join("modules")
        .join(MODULE)
        .join("conf")
        .join("userconfig.xml")
}

#[test]
fn stopstart_on_prim_fails_over_then_the_node_comes_back_second() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_pair(&cluster);

    let output = node1.safekit(&format!("stopstart -m {MODULE}"));
    assert!(
        output.success(),
        "stopstart: {}{}",
        output.stdout,
        output.stderr
    );
    assert!(output.stdout.contains("stopstart"), "{}", output.stdout);
    // The peer takes over (ALONE, perhaps briefly), then this node starts again and joins it.
    node1.wait_state(SECOND);
    node2.wait_state(PRIM);
    let peer_log = node2.log();
    assert!(
        peer_log.contains("SECOND (up to date) -> ALONE"),
        "node2 took over: {peer_log}"
    );
    // What the operator reads: state and readiness, the copy in sync, the last transition.
    node1.wait_for("SECOND Ready", || {
        node1
            .safekit_ok(&format!("state -m {MODULE}"))
            .contains("SECOND (Ready)")
    });
    let verbose = node1.verbose();
    assert!(
        !verbose.contains("not known to be up to date"),
        "an in-sync SECOND: {verbose}"
    );
    assert_eq!(detail(&verbose, "data"), "in sync with the primary node2");
    assert!(
        detail(&verbose, "last transition")
            .starts_with("SECOND (resynchronizing) -> SECOND (up to date)"),
        "{verbose}"
    );
    let log = node1.log();
    assert!(
        log.contains("Command stopstart received from root"),
        "{log}"
    );
    assert!(log.contains("Action stop called by root"), "{log}");
    assert!(log.contains("Action start called by root"), "{log}");

    // On a stopped module, stopstart is a start.
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    node1.safekit_ok(&format!("stopstart -m {MODULE}"));
    node1.wait_state(SECOND);
}

#[test]
fn hooks_run_in_order_with_safekit_arguments_on_start_failover_and_stop() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_on(&cluster);

    first_start(&node1, &node2);
    let seen1 = expect_hooks(
        &node1,
        0,
        &[
            "prestart STOP WAIT start",
            "transition STOP WAIT start",
            "transition WAIT ALONE start",
            "start_both WAIT ALONE start",
            "start_sec WAIT ALONE start",
            "start_prim WAIT ALONE start",
            "transition ALONE PRIM start",
            "stop_sec ALONE PRIM start",
        ],
    );
    let seen2 = expect_hooks(
        &node2,
        0,
        &[
            "prestart STOP WAIT start",
            "transition STOP WAIT start",
            "transition WAIT SECOND start",
            "start_both WAIT SECOND start",
            "start_sec WAIT SECOND start",
            "start_second WAIT SECOND start",
        ],
    );

    // Failover: node1 stops, node2 leaves SECOND and starts the application.
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    node2.wait_state(ALONE);
    let seen1 = expect_hooks(
        &node1,
        seen1,
        &[
            "stop_prim PRIM STOP stop",
            "transition PRIM STOP stop",
            "stop_both PRIM STOP stop",
            "poststop PRIM STOP stop",
        ],
    );
    let seen2 = expect_hooks(
        &node2,
        seen2,
        &[
            "transition SECOND ALONE start",
            "stop_second SECOND ALONE start",
            "start_prim SECOND ALONE start",
        ],
    );

    // A forced stop of the ALONE node: stop scripts get `force` at once.
    node2.safekit_ok(&format!("forcestop -m {MODULE}"));
    node2.wait_state(STOP);
    expect_hooks(
        &node2,
        seen2,
        &[
            "stop_prim force ALONE STOP stop",
            "transition ALONE STOP stop",
            "stop_sec force ALONE STOP stop",
            "stop_both force ALONE STOP stop",
            "poststop ALONE STOP stop",
        ],
    );
    assert_eq!(hooks_log(&node1).len(), seen1, "node1 ran nothing more");
}

#[test]
fn config_is_validated_whole_refused_while_running_and_applied_when_stopped() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes();
    let spec = module();
    let ([node1, node2], _agents) = spec.start_pair(&cluster);
    let original = spec.userconfig(&cluster);
    let path = userconfig_path(&node1);
    let color_log = node1.module_var_dir().join("color.log");

    // Two errors in the edited file: both reported, nothing applied.
    let invalid = original
        .replace("failover=\"on\"", "failover=\"maybe\"")
        .replace("<user ", "<bogus/>\n  <user ");
    std::fs::write(&path, &invalid).expect("edit userconfig.xml");
    let confcheck = node1.safekit(&format!("confcheck -m {MODULE}"));
    assert_eq!(confcheck.status.code(), Some(1), "{}", confcheck.stdout);
    let refused = node1.safekit(&format!("config -m {MODULE}"));
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stdout);
    for expected in ["failover", "bogus", "nothing applied"] {
        assert!(
            refused.stderr.contains(expected),
            "config -m: {expected} missing from: {}",
            refused.stderr
        );
    }
    assert_eq!(node1.state(), PRIM, "the running module is untouched");
    assert!(!node1.log().contains("Configuration applied"));

    // A valid change is refused while the module runs, with its state and what to do.
    let changed = original.replace(
        USER,
        r#"<user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"><var name="COLOR" value="blue"/></user>"#,
    );
    assert_ne!(changed, original, "the test changes the configuration");
    std::fs::write(&path, &changed).expect("edit userconfig.xml");
    let confcheck = node1.safekit_ok(&format!("confcheck -m {MODULE}"));
    assert!(!confcheck.contains("error"), "{confcheck}");
    let running = node1.safekit(&format!("config -m {MODULE}"));
    assert_eq!(running.status.code(), Some(1), "{}", running.stdout);
    assert!(
        running.stderr.contains("PRIM") && running.stderr.contains("stop it first"),
        "{}",
        running.stderr
    );
    assert_eq!(node1.state(), PRIM);
    assert_eq!(
        std::fs::read_to_string(&color_log).expect("start_both ran"),
        "color=none\n"
    );

    // Stopped, it is applied (config and postconfig hooks run), and the next start uses it.
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    node2.wait_state(ALONE);
    let before = hooks_log(&node1).len();
    let applied = node1.safekit_ok(&format!("config -m {MODULE}"));
    assert!(applied.contains("applied"), "{applied}");
    expect_hooks(
        &node1,
        before,
        &["config STOP STOP config", "postconfig STOP STOP config"],
    );
    assert!(node1.log().contains("Configuration applied by root"));
    node1.safekit_ok(&format!("start -m {MODULE}"));
    node1.wait_state(SECOND);
    node1.wait_for("start_both with the new variable", || {
        std::fs::read_to_string(&color_log).unwrap_or_default() == "color=none\ncolor=blue\n"
    });
}

#[test]
fn cluster_config_refuses_an_invalid_file_and_a_running_module_and_reloads_when_stopped() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_on(&cluster);
    let installed = node1.var_dir().join("cluster").join("cluster.xml");
    let before = std::fs::read(&installed).expect("read cluster.xml");
    let candidate = node1.var_dir().join("new-cluster.xml");

    // Two errors: both printed, the installed file unchanged byte for byte.
    let text = String::from_utf8(before.clone()).expect("utf-8 cluster.xml");
    let invalid = text
        .replacen("<lan name=", "<lan colour=\"red\" name=", 1)
        .replacen("<node name=", "<node weight=\"3\" name=", 1);
    std::fs::write(&candidate, &invalid).expect("write the candidate");
    let refused = node1.safekit(&format!("cluster config {}", candidate.display()));
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stdout);
    for expected in ["colour", "weight", "unchanged"] {
        assert!(
            refused.stderr.contains(expected),
            "{expected} missing from: {}",
            refused.stderr
        );
    }
    assert_eq!(std::fs::read(&installed).expect("read cluster.xml"), before);

    // A valid file is refused while a module runs, naming it, and not installed.
    let valid = text.replace("><lan", ">\n  <lan");
    std::fs::write(&candidate, &valid).expect("write the candidate");
    first_start(&node1, &node2);
    let running = node1.safekit(&format!("cluster config {}", candidate.display()));
    assert_eq!(running.status.code(), Some(1), "{}", running.stdout);
    assert!(
        running.stderr.contains(&format!("{MODULE} (PRIM)")),
        "{}",
        running.stderr
    );
    assert_eq!(std::fs::read(&installed).expect("read cluster.xml"), before);

    // Stopped: installed and reloaded; the module starts with it.
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    let applied = node1.safekit_ok(&format!("cluster config {}", candidate.display()));
    assert!(applied.contains("reloaded"), "{applied}");
    assert_eq!(
        std::fs::read_to_string(&installed).expect("read cluster.xml"),
        valid
    );
    assert!(node1.log().contains("Configuration applied by root"));
    node1.safekit_ok(&format!("start -m {MODULE}"));
    node1.wait_state(SECOND);
}

#[test]
fn level_prints_versions_with_or_without_the_agent_and_the_module_hook() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes();
    let [node1, _node2] = module().install_on(&cluster);

    let offline = node1.safekit_ok(&format!("level -m {MODULE}"));
    for expected in [
        "heartbeat protocol",
        "version 2",
        "replication protocol",
        "open source",
        "not running",
        "demo application 1.2.3 on verbs",
    ] {
        assert!(
            offline.contains(expected),
            "{expected} missing from:\n{offline}"
        );
    }
    assert!(
        offline
            .lines()
            .any(|line| line.split_whitespace().eq(["id", "1"])),
        "module id missing from:\n{offline}"
    );

    let _agent = node1.start_agent();
    let online = node1.safekit_ok("level");
    assert!(online.contains("agent (safekitd):"), "{online}");
    assert!(!online.contains("not running"), "{online}");
    assert_eq!(
        online.matches(env!("CARGO_PKG_VERSION")).count(),
        2,
        "command and agent versions: {online}"
    );
    let unknown = node1.safekit("level -m nosuchmodule");
    assert_eq!(unknown.status.code(), Some(1), "{}", unknown.stdout);
}

#[test]
fn second_right_after_the_peer_turned_alone_waits_for_its_heartbeat() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_on(&cluster);
    node1.wait_peer("node2 STOP");
    node2.wait_peer("node1 STOP");

    // The peer is not primary: refused, saying why.
    let refused = node2.safekit(&format!("second -m {MODULE}"));
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stdout);
    assert!(refused.stderr.contains("not primary"), "{}", refused.stderr);
    assert_eq!(node2.state(), STOP);

    // Right after node1 turns ALONE, before node2 has heard it: accepted.
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    assert_eq!(node1.state(), ALONE);
    node2.safekit_ok(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
}

/// Waits until the last line of `hooks.log` is `last` (the hooks of a change
/// run after the state is shown); returns the log's length.
fn settled_hooks(node: &AgentNode<'_>, last: &str) -> usize {
    node.wait_for(&format!("last hook {last:?}"), || {
        hooks_log(node).last().map(String::as_str) == Some(last)
    });
    hooks_log(node).len()
}

#[test]
fn wait_verbs_return_once_the_state_is_reached_and_restart_runs_the_application_scripts() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_pair(&cluster);

    // A SECOND never becomes ALONE: timeout, exit 1, the current state in the line.
    let timeout = node2.safekit(&format!("waitstate -m {MODULE} ALONE -t 2"));
    assert_eq!(timeout.status.code(), Some(1), "{}", timeout.stdout);
    assert!(
        timeout.stderr.contains("timeout")
            && timeout.stderr.contains(&format!("{MODULE} is SECOND")),
        "{}",
        timeout.stderr
    );
    let bad = node2.safekit(&format!("waitstate -m {MODULE} PRIMARY"));
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);

    // stop then waitstop: once it returns, the module is stopped.
    node2.safekit_ok(&format!("stop -m {MODULE}"));
    node2.safekit_ok(&format!("waitstop -m {MODULE} -t 60"));
    assert_eq!(node2.state(), STOP);
    node1.wait_state(ALONE);

    // start on node2 while node1 is primary, then waitstate SECOND: SECOND and Ready.
    node2.safekit_ok(&format!("start -m {MODULE}"));
    let reached = node2.safekit_ok(&format!("waitstate -m {MODULE} SECOND -t 60"));
    assert!(reached.contains("SECOND (Ready)"), "{reached}");
    let state = node2.safekit_ok(&format!("state -m {MODULE}"));
    assert!(state.contains("SECOND (Ready)"), "{state}");
    let started = node1.safekit_ok(&format!("waitstart -m {MODULE} -t 60"));
    assert!(started.contains("(Ready)"), "{started}");

    // restart on the primary: stop_prim, stop_both, start_both, start_prim; the state is kept.
    node1.wait_state(PRIM);
    let seen1 = settled_hooks(&node1, "stop_sec ALONE PRIM start");
    let restart = node1.safekit_ok(&format!("restart -m {MODULE}"));
    assert!(restart.contains("PRIM"), "{restart}");
    expect_hooks(
        &node1,
        seen1,
        &[
            "stop_prim PRIM PRIM restart",
            "stop_both PRIM PRIM restart",
            "start_both PRIM PRIM restart",
            "start_prim PRIM PRIM restart",
        ],
    );
    node1.safekit_ok(&format!("waitstate -m {MODULE} PRIM -t 60"));

    // restart on the secondary: its application scripts are stop_both and start_both.
    let seen2 = settled_hooks(&node2, "start_second WAIT SECOND start");
    node2.safekit_ok(&format!("restart -m {MODULE}"));
    expect_hooks(
        &node2,
        seen2,
        &[
            "stop_both SECOND SECOND restart",
            "start_both SECOND SECOND restart",
        ],
    );
    assert_eq!(node2.state(), SECOND);
    assert_eq!(node1.state(), PRIM);
}
