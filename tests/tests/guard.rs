//! The guard of the replicated directories, end to end: nothing changes a
//! replica behind the replication's back.
//!
//! node1 `prim` and node2 `second` with `<rfs>` over a private directory of
//! each node, paired PRIM/SECOND. On node2 (SECOND) an application write into
//! the replicated directory fails (read-only), while node1's replicated
//! writes still land there. On node1 (PRIM), a process that opened a file of
//! the replicated directory before the agent mounted over it writes through
//! that descriptor, beneath the mount (a bypass): the guard detects it (module
//! log, `state -v`) and the agent heals it (node2's copy ends identical).
//!
//! The binaries must be built first: `cargo build -p safekit-agent --bins`
//! (same target directory).

use std::time::Duration;

use safekit_tests::agents::{ALONE, AgentNode, ModuleSpec, PRIM, SECOND, assert_same_tree, detail};
use safekit_tests::{Cluster, require_root};

const MODULE: &str = "guarded";
/// The replicated directory (a private directory of each node).
const REPLICATED: &str = "/replicated/data";
/// Bound of every wait: a first full reintegration of a few files, a slow machine.
const STATE_WAIT: Duration = Duration::from_secs(60);

/// The module of these tests: `<rfs>` over [`REPLICATED`], with `attrs` (e.g. `guard="deny"`).
fn module(attrs: &str) -> ModuleSpec {
    ModuleSpec::new(MODULE)
        .config(format!(
            r#"<rfs replication_timeout="500ms" nbrei="2" {attrs}>
    <replicated dir="{REPLICATED}" mode="read_only"/>
  </rfs>"#
        ))
        .state_wait(STATE_WAIT)
}

/// Two nodes, [`REPLICATED`] private to each.
fn two_nodes() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .private_dir(REPLICATED)
        .build()
        .expect("build the cluster")
}

/// Two nodes, [`REPLICATED`] private to each on a small file system of its
/// own: under `deny` the guard answers every open of that file system, which
/// must not be the host's.
fn two_nodes_own_fs() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .private_dir_sized(REPLICATED, 64 << 20)
        .build()
        .expect("build the cluster")
}

/// node1 `prim` and writes `base.txt`, node2 `second`; waits for PRIM/SECOND.
fn pair_up(node1: &AgentNode<'_>, node2: &AgentNode<'_>) {
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    node1.run_in(REPLICATED, "echo base > base.txt");
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
    assert_same_tree("after the first reintegration", &tree(node1), &tree(node2));
}

/// The replicated tree's digest, seen inside the node.
fn tree(node: &AgentNode<'_>) -> String {
    node.tree_digest(REPLICATED)
}

/// A file of the replicated directory, read inside the node.
fn read(node: &AgentNode<'_>, name: &str) -> String {
    node.node()
        .run_ok(format!("cat {REPLICATED}/{name}"))
        .unwrap_or_else(|error| panic!("{}: read {name}: {error}", node.name()))
}

#[test]
fn the_secondary_replica_is_read_only_and_a_write_bypassing_the_primary_mount_is_healed() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE and bind mounts, fanotify)"
    );
    let cluster = two_nodes();
    let [node1, node2] = module("").install_on(&cluster);

    // Before the agent mounts over the directory on node1, a process opens a
    // file there and keeps it open; it writes through it when told to.
    let go = node1.node().state_dir().join("bypass-go");
    let done = node1.node().state_dir().join("bypass-done");
    let _holder = node1
        .node()
        .spawn(format!(
            "exec sh -c 'exec 3>>{REPLICATED}/held.txt; \
             while [ ! -e {go} ]; do sleep 0.05; done; \
             echo written-beneath-the-mount >&3 && touch {done}; exec sleep 3600'",
            go = go.display(),
            done = done.display()
        ))
        .expect("spawn the process holding a file open");
    let held = node1.node().host_path(format!("{REPLICATED}/held.txt"));
    node1.wait_for("the holder to open held.txt", || held.exists());

    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    pair_up(&node1, &node2);

    // (a) On the SECOND, applications cannot write into the replica...
    let attempt = node2
        .node()
        .run(format!("echo app > {REPLICATED}/app.txt"))
        .expect("run the application write");
    assert!(
        !attempt.success(),
        "an application write on the SECOND succeeded\n{}",
        node2.diagnostics()
    );
    assert!(
        attempt.stderr.contains("Read-only file system")
            || attempt.stderr.contains("Operation not permitted"),
        "the write failed for another reason: {}",
        attempt.stderr
    );
    let attempt = node2
        .node()
        .run(format!("rm {REPLICATED}/base.txt"))
        .expect("run the application delete");
    assert!(
        !attempt.success(),
        "an application delete on the SECOND succeeded"
    );
    assert_eq!(read(&node2, "base.txt"), "base\n");
    assert!(
        detail(&node2.verbose(), "guard ").contains("read-only"),
        "state -v on the SECOND shows the guard\n{}",
        node2.verbose()
    );
    // ...while the primary's replicated writes still land there.
    node1.run_in(REPLICATED, "echo live > live.txt && echo more >> base.txt");
    assert_eq!(read(&node2, "live.txt"), "live\n");
    assert_eq!(read(&node2, "base.txt"), "base\nmore\n");

    // (b) On the PRIM, a write beneath the mount through the old descriptor.
    std::fs::write(&go, "").expect("tell the holder to write");
    node1.wait_for("the bypass write", || done.exists());
    // Beneath the mount (the mount's own view catches up when its attribute cache expires).
    assert_eq!(
        std::fs::read_to_string(&held).expect("read held.txt beneath node1's mount"),
        "written-beneath-the-mount\n"
    );
    node1.wait_for("the guard to report the bypass write", || {
        node1
            .module_log()
            .contains("held.txt bypassing the replication")
    });
    let guard = detail(&node1.verbose(), "guard ");
    assert!(
        !guard.contains("bypass writes 0,") && guard.contains("bypass writes"),
        "state -v on the PRIM counts the bypass write: {guard}"
    );
    // Healed without any reintegration asked for: node2's copy catches up.
    node2.wait_for("the bypass write to be healed on node2", || {
        read(&node2, "held.txt") == "written-beneath-the-mount\n"
    });
    assert!(
        node1.module_log().contains("healed on the peer"),
        "{}",
        node1.diagnostics()
    );
    node1.wait_for("node1's mount to show the healed file too", || {
        tree(&node1) == tree(&node2)
    });
    assert_same_tree("after the heal", &tree(&node1), &tree(&node2));
    assert_eq!(node1.state(), PRIM);
    assert_eq!(node2.state(), SECOND);
}

#[test]
fn with_guard_deny_other_mounts_of_the_primary_replica_cannot_open_its_files() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE and bind mounts, fanotify)"
    );
    let cluster = two_nodes_own_fs();
    let [node1, node2] = module(r#"guard="deny""#).install_on(&cluster);
    // Another mount of node1's replicated directory, made before the agent
    // mounts over it (inside node1's mount namespace, gone with it).
    let alias = node1.node().state_dir().join("alias");
    std::fs::create_dir_all(&alias).expect("create the alias mount point");
    node1
        .node()
        .run_ok(format!("mount --bind {REPLICATED} {}", alias.display()))
        .expect("bind-mount the replicated directory elsewhere");
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    pair_up(&node1, &node2);

    for shell in [
        format!("cat {}/base.txt", alias.display()),
        format!("echo bypass >> {}/base.txt", alias.display()),
    ] {
        let attempt = node1.node().run(&shell).expect("run the bypass");
        assert!(
            !attempt.success() && attempt.stderr.contains("Operation not permitted"),
            "{shell}: a bypass open on the PRIM was not refused: {}{}\n{}",
            attempt.stdout,
            attempt.stderr,
            node1.diagnostics()
        );
    }
    node1.wait_for("the guard to report the refusal", || {
        node1
            .module_log()
            .contains("was refused the opening of /replicated/data/base.txt")
    });
    let guard = detail(&node1.verbose(), "guard ");
    assert!(
        guard.starts_with("deny") && !guard.contains("denied 0,"),
        "state -v on the PRIM counts the refusals: {guard}"
    );
    // The application, through the mount, is not the guard's business.
    node1.run_in(REPLICATED, "echo app >> base.txt");
    assert_eq!(read(&node1, "base.txt"), "base\napp\n");
    assert_eq!(read(&node2, "base.txt"), "base\napp\n");
    assert_same_tree("after the refusals", &tree(&node1), &tree(&node2));
}
