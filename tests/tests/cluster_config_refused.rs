//! `safekit cluster config` never leaves a cluster.xml installed that the
//! running agent did not take: when the agent refuses the new file (here a
//! heartbeat address changes, which needs an agent restart), the previous
//! file is put back byte for byte and no module is reconfigured.
//!
//! The binaries must be built first: `cargo build -p safekit-agent --bins`
//! (same target directory).

use safekit_tests::agents::{ModuleSpec, STOP};
use safekit_tests::{Cluster, require_root};

const MODULE: &str = "clusterconf";

#[test]
fn a_file_the_agent_refuses_is_not_left_installed() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .build()
        .expect("build the cluster");
    let ([node1, _node2], _agents) = ModuleSpec::new(MODULE).start_on(&cluster);
    assert_eq!(node1.state(), STOP);
    let installed = node1.var_dir().join("cluster").join("cluster.xml");
    let before = std::fs::read_to_string(&installed).expect("read cluster.xml");

    // The peer's heartbeat address moves: valid for every module, but the
    // agent must restart to bind it, so it refuses the new file.
    let peer_addr = before
        .split("name=\"node2\"")
        .nth(1)
        .and_then(|rest| rest.split("addr=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .expect("node2's address in cluster.xml")
        .to_string();
    let moved = format!(
        "{}.99",
        peer_addr.rsplit_once('.').expect("an IPv4 address").0
    );
    assert_ne!(moved, peer_addr);
    let candidate = node1.var_dir().join("moved-cluster.xml");
    std::fs::write(&candidate, before.replace(&peer_addr, &moved)).expect("write the candidate");
    let refused = node1.safekit(&format!("cluster config {}", candidate.display()));
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("restart the agent"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("previous"), "{}", refused.stderr);
    assert_eq!(
        std::fs::read_to_string(&installed).expect("read cluster.xml"),
        before,
        "the file the agent refused is still installed"
    );
    assert!(
        !node1.log().contains("Configuration applied"),
        "a module was reconfigured although the file was refused"
    );

    // The file in force is still accepted as it is.
    let same = node1.safekit_ok("cluster config");
    assert!(same.contains("reloaded"), "{same}");
}
