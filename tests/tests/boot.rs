//! `safekit boot on|off|status`: start at boot, as an operator checks it.
//!
//! One rule whatever restarted the agent (a node rebooted, an agent killed
//! with `kill -9` and started again): a module whose boot is on is started by
//! the agent itself (`Action start called by boot`) and rejoins its peer; a
//! module whose boot is off stays STOP. The switch is a file, so it is set
//! and shown with the agent down too. `safekit shutdown`, which the systemd
//! unit runs to stop the service, stops the running modules cleanly.

use safekit_tests::agents::{
    ALONE, AgentNode, ModuleSpec, PRIM, SECOND, STOP, detail, first_start,
};
use safekit_tests::{Cluster, require_root};

/// The module started at boot.
const ON: &str = "bootmod";
/// The module left in STOP at boot.
const OFF: &str = "stopmod";

fn boot_status(node: &AgentNode<'_>) -> Vec<String> {
    node.safekit_ok("boot status")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn boot_on_comes_back_after_reboot_and_kill_9_boot_off_stays_stop() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .build()
        .expect("build the cluster");
    let [on1, on2] = ModuleSpec::new(ON).install_on(&cluster);
    let [off1, off2] = ModuleSpec::new(OFF).install_on(&cluster);
    assert_eq!(
        boot_status(&on1),
        ["bootmod: off (default)", "stopmod: off (default)"],
        "boot is off until an operator turns it on"
    );
    let unknown = on1.safekit("boot on -m nosuchmodule");
    assert!(
        !unknown.success() && unknown.stderr.contains("not installed"),
        "{unknown:?}"
    );

    let _agent1 = on1.start_agent();
    let agent2 = on2.start_agent();
    assert_eq!(
        [on1.state(), off1.state()],
        [STOP, STOP],
        "boot off: started agents leave modules in STOP"
    );
    first_start(&on1, &on2);
    first_start(&off1, &off2);

    // Set while the agent runs: the agent logs who changed it, state -v shows it.
    let said = on1.safekit_ok(&format!("boot on -m {ON}"));
    assert!(said.contains("boot on for bootmod"), "{said}");
    on1.safekit_ok(&format!("boot off -m {OFF}"));
    assert_eq!(detail(&on1.verbose(), "usersetting.boot"), "on");
    assert_eq!(detail(&off1.verbose(), "usersetting.boot"), "off");
    assert!(
        on1.module_log().contains("Boot set on by root"),
        "{}",
        on1.diagnostics()
    );
    assert_eq!(boot_status(&on1), ["bootmod: on", "stopmod: off"]);
    assert!(!on1.module_log().contains("called by boot"));

    // node1 reboots: node2 takes over both modules; node1's agent starts again.
    cluster.node(1).reboot().expect("reboot node1");
    on2.wait_state(ALONE);
    off2.wait_state(ALONE);
    let _agent1 = on1.start_agent();
    on1.wait_state(SECOND);
    on2.wait_state(PRIM);
    assert!(
        on1.log().contains("Action start called by boot"),
        "{}",
        on1.diagnostics()
    );
    assert!(
        off1.log().contains("Boot: off, module left in STOP"),
        "{}",
        off1.diagnostics()
    );
    assert_eq!(off1.state(), STOP, "boot off: stopmod stays STOP on node1");
    assert_eq!(off2.state(), ALONE);

    // node2's agent is killed with kill -9; its switch is set while it is down.
    agent2.kill();
    let offline = on2.safekit_ok(&format!("boot on -m {ON}"));
    assert!(offline.contains("agent is not running"), "{offline}");
    assert_eq!(boot_status(&on2), ["bootmod: on", "stopmod: off (default)"]);
    on1.wait_state(ALONE);
    let _agent2 = on2.start_agent();
    on2.wait_state(SECOND);
    on1.wait_state(PRIM);
    assert!(
        on2.log().contains("Action start called by boot"),
        "{}",
        on2.diagnostics()
    );
    assert_eq!(
        off2.state(),
        STOP,
        "boot off: stopmod, ALONE before the kill -9, stays STOP"
    );
    assert!(
        off2.log()
            .contains("Boot: off (default), module left in STOP"),
        "{}",
        off2.diagnostics()
    );

    // `safekit shutdown` (the systemd unit's ExecStop) stops every running
    // module cleanly, waits for STOP, and leaves the boot switches as they are.
    let shutdown = on1.safekit_ok("shutdown");
    assert!(
        shutdown.contains("1 module(s) stopped: bootmod"),
        "{shutdown}"
    );
    assert_eq!([on1.state(), off1.state()], [STOP, STOP]);
    on2.wait_state(ALONE);
    assert!(
        on1.log().contains("Action stop called by shutdown"),
        "{}",
        on1.diagnostics()
    );
    assert_eq!(boot_status(&on1), ["bootmod: on", "stopmod: off"]);
}
