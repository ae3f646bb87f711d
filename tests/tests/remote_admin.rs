//! `safekit -H`, the distributed admin channel, run like an operator's runbook:
//! two nodes, each running `safekitd --foreground`, driven from node1 only.
//!
//! The requests go through each node's web service port (9010), signed with
//! the cluster secret of the machine running `safekit`. What an operator
//! checks: the output of each node, headed by its name; the state each node
//! reaches; who the module log says called the action; and that a wrong
//! secret or an unreachable node gives one line and a non-zero exit status,
//! with nothing changed. The binaries must be built first:
//! `cargo build -p safekit-agent --bins` (same target directory).

use std::path::Path;

use safekit_tests::agents::{
    AgentNode, DEFAULT_SECRET, ModuleSpec, PRIM, SECOND, STOP, detail, write_mode,
};
use safekit_tests::{Cluster, Output, require_root};

const MODULE: &str = "mirror";

fn pair() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .build()
        .expect("build the cluster")
}

/// `safekit <args>` inside `node` with `SAFEVAR=var`.
fn safekit_with_var(node: &AgentNode<'_>, var: &Path, args: &str) -> Output {
    node.node()
        .run(format!(
            "SAFE={} SAFEVAR={} {}/safekit {args}",
            node.safe_dir().display(),
            var.display(),
            node.safe_dir().display()
        ))
        .expect("run safekit")
}

/// The lines of `output` under the header `--- <node> (...) ---`, up to the next header.
fn section<'a>(output: &'a str, node: &str) -> Vec<&'a str> {
    let header = format!("--- {node} (");
    output
        .lines()
        .skip_while(|line| !line.starts_with(&header))
        .skip(1)
        .take_while(|line| !line.starts_with("--- "))
        .collect()
}

#[test]
fn node1_runs_state_stop_start_and_log_on_node2() {
    if !require_root() {
        return;
    }
    let cluster = pair();
    let ([node1, node2], _agents) = ModuleSpec::new(MODULE).start_pair(&cluster);
    let node1_addr = cluster.node(1).addr(0);
    let node2_addr = cluster.node(2).addr(0);

    // `state` on every node of cluster.xml, each node's answer under its name.
    let all = node1.safekit_ok(&format!("-H '*' state -m {MODULE}"));
    assert!(
        all.contains(&format!("--- node1 ({node1_addr}) ---"))
            && all.contains(&format!("--- node2 ({node2_addr}) ---")),
        "{all}"
    );
    let state_of = |node: &str| {
        section(&all, node)
            .iter()
            .find(|line| line.starts_with(MODULE))
            .map(|line| line.split_whitespace().nth(1).unwrap_or("").to_string())
    };
    assert_eq!(state_of("node1").as_deref(), Some("PRIM"), "{all}");
    assert_eq!(state_of("node2").as_deref(), Some("SECOND"), "{all}");

    // `state -lq` on one node exits with that node's state code.
    let code = node1.safekit(&format!("-H node2 state -m {MODULE} -lq"));
    assert_eq!(code.status.code(), Some(SECOND), "{code:?}");

    // `state -v` shows node2's details.
    let verbose = node1.safekit_ok(&format!("-H node2 state -m {MODULE} -v"));
    assert!(
        detail(&verbose, "peer").starts_with("node1 "),
        "node2's details name its peer: {verbose}"
    );

    // Stop node2 from node1: node2 stops, node1 goes on ALONE, node2's log
    // names the remote caller.
    node1.safekit_ok(&format!("-H node2 stop -m {MODULE}"));
    node2.wait_state(STOP);
    let log2 = node2.module_log();
    assert!(
        log2.contains(&format!("called by admin@{node1_addr}")),
        "node2's module log: {log2}"
    );

    // And back: start node2 from node1.
    node1.safekit_ok(&format!("-H node2 start -m {MODULE}"));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);

    // node2's log and module list, read from node1.
    let remote_log = node1.safekit_ok(&format!("-H {node2_addr} log -m {MODULE}"));
    assert!(
        remote_log.contains(&format!("called by admin@{node1_addr}")),
        "{remote_log}"
    );
    let modules = node1.safekit_ok("-H node2 module list");
    assert_eq!(section(&modules, "node2"), [MODULE], "{modules}");

    // Scripts' messages and local-only commands are refused with -H, saying why.
    let printe = node1.safekit(&format!("-H node2 printe -m {MODULE} hello"));
    assert_eq!(printe.status.code(), Some(2), "{printe:?}");
    assert!(printe.stderr.contains("without -H"), "{printe:?}");
    let genkey = node1.safekit("-H node2 cluster genkey");
    assert_eq!(genkey.status.code(), Some(2), "{genkey:?}");
    assert!(!node2.log().contains("hello"), "printe did not reach node2");
}

#[test]
fn a_wrong_secret_or_an_unreachable_node_is_refused_in_one_line() {
    if !require_root() {
        return;
    }
    let cluster = pair();
    let ([node1, node2], agents) = ModuleSpec::new(MODULE).start_pair(&cluster);
    let node1_addr = cluster.node(1).addr(0);

    // A SAFEVAR on node1 whose secret is not the cluster's.
    let wrong_var = node1.node().state_dir().join("wrong-safevar");
    std::fs::create_dir_all(wrong_var.join("cluster")).expect("create the wrong SAFEVAR");
    std::fs::copy(
        node1.var_dir().join("cluster").join("cluster.xml"),
        wrong_var.join("cluster").join("cluster.xml"),
    )
    .expect("copy cluster.xml");
    let wrong_secret: String = DEFAULT_SECRET.chars().rev().collect();
    write_mode(
        &wrong_var.join("cluster").join("secret"),
        &wrong_secret,
        0o600,
    );

    let refused = safekit_with_var(&node1, &wrong_var, &format!("-H node2 stop -m {MODULE}"));
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let lines: Vec<&str> = refused.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {refused:?}");
    assert!(
        lines[0].contains("node2") && lines[0].contains("authentication failed"),
        "{refused:?}"
    );
    // Nothing ran on node2, and its agent log records the refusal and who tried.
    assert_eq!(node2.state(), SECOND);
    assert_eq!(node1.state(), PRIM);
    assert!(!node2.module_log().contains("Action stop"));
    let agent2_log = agents[1].output();
    assert!(
        agent2_log
            .lines()
            .any(|line| line.contains("remote admin request refused")
                && line.contains(&node1_addr.to_string())),
        "node2's agent log: {agent2_log}"
    );

    // An address where no node listens: one line, non-zero.
    let nobody = cluster.spare_addr(0, 7);
    let absent = node1.safekit(&format!("-H {nobody} state"));
    assert_eq!(absent.status.code(), Some(1), "{absent:?}");
    assert_eq!(absent.stderr.lines().count(), 1, "{absent:?}");
    assert!(absent.stderr.contains("unreachable"), "{absent:?}");

    // node2's agent stopped: "*" still answers for node1, says node2 is
    // unreachable, and exits non-zero; `state -lq` gives "unknown" (5).
    agents[1].kill();
    let all = node1.safekit(&format!("-H '*' state -m {MODULE}"));
    assert_eq!(all.status.code(), Some(1), "{all:?}");
    assert!(
        section(&all.stdout, "node1")
            .iter()
            .any(|line| line.starts_with(MODULE)),
        "{all:?}"
    );
    assert_eq!(
        all.stderr.lines().collect::<Vec<_>>().len(),
        1,
        "one line for node2: {all:?}"
    );
    assert!(
        all.stderr.contains("node2") && all.stderr.contains("unreachable"),
        "{all:?}"
    );
    let code = node1.safekit(&format!("-H node2 state -m {MODULE} -lq"));
    assert_eq!(code.status.code(), Some(5), "{code:?}");
}
