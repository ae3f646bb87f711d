//! ACLs and extended attributes with `<rfs acl="on">` through a join and a
//! failback: what the operator sets on the primary is on the secondary.
//!
//! node1 `prim` with a few files carrying a POSIX ACL and a user extended
//! attribute, node2 `second`: the full reintegration copies them with their
//! ACLs. node2 loses power; node1, ALONE, grants a user access by ACL,
//! removes an attribute and adds one on the directory. node2 reboots and
//! `start`s: after the incremental reintegration, `getfattr` of every entry
//! is the same on both nodes. The binaries must be built first: `cargo build
//! -p safekit-agent --bins` (same target directory).

use std::time::Duration;

use safekit_tests::agents::{ALONE, AgentNode, ModuleSpec, PRIM, SECOND, wait_for_all};
use safekit_tests::{Cluster, require_root};

const MODULE: &str = "mirror";
const REPLICATED: &str = "/replicated/data";

fn module() -> ModuleSpec {
    ModuleSpec::new(MODULE)
        .config(format!(
            r#"<rfs acl="on">
    <replicated dir="{REPLICATED}" mode="read_only"/>
  </rfs>"#
        ))
        .state_wait(Duration::from_secs(120))
}

/// Every extended attribute (ACLs included) of every entry, by path.
fn attributes(node: &AgentNode<'_>) -> String {
    node.node()
        .run_ok(format!(
            "cd {REPLICATED} && find . | LC_ALL=C sort | xargs getfattr -h -d -m - -e hex 2>&1"
        ))
        .unwrap_or_else(|error| panic!("{}: getfattr: {error}", node.name()))
}

#[test]
fn with_acl_on_acls_set_while_the_secondary_was_down_reach_it_at_failback() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    let cluster = Cluster::builder()
        .nodes(2)
        .private_dir(REPLICATED)
        .build()
        .expect("build the cluster");
    let ([node1, node2], _agents) = module().start_on(&cluster);
    node1.safekit_ok_when_up(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    node1.run_in(
        REPLICATED,
        "mkdir shared && echo report > shared/report.txt && echo plan > shared/plan.txt \
         && setfacl -m u:nobody:rw shared/report.txt \
         && setfattr -n user.owner -v finance shared/plan.txt \
         && setfattr -n user.keep -v yes shared/report.txt",
    );
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok_when_up(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    wait_for_all(&[&node1, &node2], "node1 PRIM after the join", || {
        node1.state() == PRIM
    });
    let joined = attributes(&node1);
    assert!(
        joined.contains("system.posix_acl_access") && joined.contains("user.owner"),
        "the test's attributes are there: {joined}"
    );
    assert_eq!(attributes(&node2), joined, "after the full reintegration");

    // node2 loses power; node1, alone, changes attributes only.
    cluster.node(2).crash().expect("crash node2");
    node1.wait_state(ALONE);
    node1.run_in(
        REPLICATED,
        "setfacl -m u:daemon:r shared/plan.txt \
         && setfattr -x user.keep shared/report.txt \
         && setfattr -n user.project -v alpha shared",
    );
    let changed = attributes(&node1);
    assert_ne!(changed, joined);

    cluster.node(2).reboot().expect("reboot node2");
    let _agent2_again = node2.start_agent();
    node2.safekit_ok_when_up(&format!("start -m {MODULE}"));
    node2.wait_state(SECOND);
    wait_for_all(&[&node1, &node2], "node1 PRIM after the failback", || {
        node1.state() == PRIM
    });
    assert_eq!(attributes(&node2), changed, "after the failback");
}
