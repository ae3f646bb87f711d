//! Checkers, local-failure failover, the split-brain witness and the cloud health check,
//! run as an operator would see them: two nodes in namespaces, each running
//! `safekitd --foreground`, a module without `<rfs>` whose `start_prim`
//! starts a watched process and a small web server.
//!
//! States are read with `safekit state -m mirror -lq`'s exit code (STOP 0,
//! WAIT 1, ALONE 2, PRIM 3, SECOND 4), reasons with `safekit log`, and the
//! health check with `curl` from the client namespace. The binaries must be
//! built first: `cargo build -p safekit-agent --bins` (same target directory).

use safekit_tests::agents::{
    ALONE, AgentNode, ModuleSpec, PRIM, SECOND, STOP, WAIT, first_start, start_agents,
};
use safekit_tests::{Cluster, Node, NodeProcess, require_root};

const MODULE: &str = "mirror";
/// The watched process's name (a copy of `sleep`, so that `comm` is this).
const APP: &str = "watchedapp";

const START_PRIM: &str = r#"#!/bin/sh
# Starts the watched process and a web server on 8080; counts its runs.
echo start >> "$SAFEUSERVAR/starts"
cp /bin/sleep "$SAFEUSERVAR/watchedapp"
setsid "$SAFEUSERVAR/watchedapp" 100000 >/dev/null 2>&1 </dev/null &
mkdir -p "$SAFEUSERVAR/www"
cd "$SAFEUSERVAR/www" || exit 1
setsid python3 -m http.server 8080 >/dev/null 2>&1 </dev/null &
echo $! > "$SAFEUSERVAR/web.pid"
exit 0
"#;

const STOP_PRIM: &str = r#"#!/bin/sh
pkill -x watchedapp
if [ -f "$SAFEUSERVAR/web.pid" ]; then
    kill "$(cat "$SAFEUSERVAR/web.pid")" 2>/dev/null
    rm -f "$SAFEUSERVAR/web.pid"
fi
exit 0
"#;

/// The module of these tests: `service_attrs` go on `<service>`, `extra` inside it.
fn module(service_attrs: &str, extra: &str) -> ModuleSpec {
    ModuleSpec::new(MODULE)
        .service_attrs(service_attrs)
        .config(r#"<user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"/>"#)
        .config(extra)
        .script("start_prim", START_PRIM)
        .script("stop_prim", STOP_PRIM)
}

/// How many times `start_prim` ran on `node`.
fn starts(node: &AgentNode<'_>) -> usize {
    std::fs::read_to_string(node.module_var_dir().join("starts"))
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

/// The watched process runs (a killed one may stay a zombie until reaped: not counted).
fn app_running(node: &AgentNode<'_>) -> bool {
    node.node()
        .run(format!(
            "ps -e -o stat=,comm= | awk '$1 !~ /^Z/ && $2 == \"{APP}\" {{ found = 1 }} END {{ exit !found }}'"
        ))
        .expect("run ps")
        .success()
}

/// Waits until `state -v` shows checker `checker` (e.g. `tcp.web`) up on `node`.
fn wait_checker_up(node: &AgentNode<'_>, what: &str, checker: &str) {
    node.wait_for(what, || {
        node.verbose()
            .lines()
            .any(|line| line.contains(&format!("checker {checker}")) && line.contains(" up for "))
    });
}

/// Both nodes with the client as their split-brain witness (one router both
/// nodes should reach), started as PRIM and SECOND, the witness seen by both.
fn start_with_witness(cluster: &Cluster) -> ([AgentNode<'_>; 2], [NodeProcess; 2]) {
    let witness = cluster.client().addr(0);
    let check =
        format!(r#"<check><splitbrain ident="witness" exec="ping" arg="{witness}"/></check>"#);
    let (nodes, agents) = module("", &check).start_pair(cluster);
    for node in &nodes {
        wait_checker_up(node, "the witness to be seen", "splitbrain.witness");
    }
    (nodes, agents)
}

fn two_nodes(lans: usize) -> Cluster {
    Cluster::builder()
        .nodes(2)
        .lans(lans)
        .client(true)
        .build()
        .expect("build the cluster")
}

/// The HTTP status of `http://<addr>:9010/var/modules/<module>/ready.txt`, from `from` (0: no connection).
fn ready_status(from: &Node, addr: impl std::fmt::Display, module: &str) -> u16 {
    let output = from
        .run(format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -m 2 http://{addr}:9010/var/modules/{module}/ready.txt"
        ))
        .expect("run curl");
    output.stdout.trim().parse().unwrap_or(0)
}

#[test]
fn ready_txt_answers_200_on_the_primary_only_and_follows_a_failover() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let ([node1, node2], _agents) = module("", "").start_on(&cluster);
    let client = cluster.client();
    let (addr1, addr2) = (cluster.node(1).addr(0), cluster.node(2).addr(0));
    assert_eq!(
        ready_status(client, addr1, MODULE),
        404,
        "STOP is not ready"
    );

    first_start(&node1, &node2);
    assert_eq!(
        ready_status(client, addr1, MODULE),
        200,
        "the primary is ready"
    );
    assert_eq!(
        ready_status(client, addr2, MODULE),
        404,
        "the secondary is not"
    );
    assert_eq!(ready_status(client, addr1, "nosuchmodule"), 404);
    let other_path = client
        .run(format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -m 2 http://{addr1}:9010/var/modules/{MODULE}/other.txt"
        ))
        .expect("run curl");
    assert_eq!(other_path.stdout.trim(), "404");
    // Bound to the node's cluster.xml addresses only, not to the wildcard address.
    assert_eq!(
        ready_status(cluster.node(1), "127.0.0.1", MODULE),
        0,
        "nothing listens on loopback"
    );

    // Failover: node1 stops, node2 goes ALONE; the load balancer's answer follows.
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node2.wait_state(ALONE);
    node2.wait_for("ready.txt 200 on node2", || {
        ready_status(client, addr2, MODULE) == 200
    });
    assert_eq!(
        ready_status(client, addr1, MODULE),
        404,
        "a stopped node is not ready"
    );
}

#[test]
fn a_killed_process_is_restarted_then_maxloop_fails_over() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let errd = format!(
        r#"<errd polltimer="1"><proc name="{APP}" atleast="1" action="restart" class="prim"/></errd>"#
    );
    let attrs = r#"maxloop="2" loop_interval="24""#;
    let ([node1, node2], _agents) = module(attrs, &errd).start_pair(&cluster);
    wait_checker_up(
        &node1,
        "the checker to see the process up",
        &format!("proc.{APP}"),
    );
    assert_eq!(starts(&node1), 1);

    // Two kills: two local restarts, node1 stays primary.
    for round in 1..=2 {
        assert!(app_running(&node1), "round {round}: the process runs");
        node1
            .node()
            .run_ok(format!("pkill -9 -x {APP}"))
            .expect("kill the watched process");
        node1.wait_for(&format!("restart number {round}"), || {
            starts(&node1) == round + 1 && app_running(&node1) && node1.state() == PRIM
        });
        let log = node1.log();
        assert!(
            log.contains(&format!("Rule errd fired: resource proc.{APP} down (0 process(es), at least 1 wanted): action restart ({round}/2 of maxloop")),
            "the log says which rule fired and why: {log}"
        );
        assert!(log.contains("Action restart called by errd"), "{log}");
    }
    assert_eq!(node2.state(), SECOND, "no failover for a local restart");

    // The third kill within loop_interval is one more than maxloop: node1 stops, node2 takes over.
    node1
        .node()
        .run_ok(format!("pkill -9 -x {APP}"))
        .expect("kill the watched process");
    node1.wait_state(STOP);
    node2.wait_state(ALONE);
    let log = node1.log();
    assert!(log.contains("Action stop called by maxloop"), "{log}");
    assert!(
        log.contains("more than maxloop 2: the module stops"),
        "{log}"
    );
    assert_eq!(starts(&node1), 3, "no third restart");
    assert_eq!(starts(&node2), 1, "node2 runs the application");
}

#[test]
fn tcp_checker_restarts_an_application_that_stops_listening() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let check = r#"<check><tcp ident="web" action="restart" interval="1" timeout="1"><to addr="127.0.0.1" port="8080"/></tcp></check>"#;
    let ([node1, node2], _agents) = module("", check).start_pair(&cluster);
    wait_checker_up(&node1, "the TCP checker to see the port up", "tcp.web");
    node1
        .node()
        .run_ok(format!(
            "kill $(cat {}/modules/{MODULE}/web.pid)",
            node1.var_dir().display()
        ))
        .expect("kill the web server");
    node1.wait_for("the web server to be restarted", || {
        starts(&node1) == 2 && node1.state() == PRIM
    });
    let log = node1.log();
    assert!(
        log.contains("Rule t_web fired: resource tcp.web down (127.0.0.1:8080"),
        "{log}"
    );
    assert!(log.contains("Action restart called by t_web"), "{log}");
    assert_eq!(node2.state(), SECOND);
}

#[test]
fn the_witness_decides_which_side_of_a_partition_runs_alone() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let ([node1, node2], _agents) = start_with_witness(&cluster);

    // node1 loses node2 and the witness; node2 still reaches the witness.
    cluster
        .partition(cluster.node(1), cluster.node(2))
        .expect("cut node1 <-> node2");
    cluster
        .partition(cluster.node(1), cluster.client())
        .expect("cut node1 <-> witness");
    node2.wait_state(ALONE);
    node1.wait_state(WAIT);
    node1.wait_for("node1 to stop its application: no split brain", || {
        !app_running(&node1)
    });
    assert!(app_running(&node2), "node2 runs the application");
    let log1 = node1.log();
    assert!(
        log1.contains("Resource splitbrain.witness set to down"),
        "{log1}"
    );
}

#[test]
fn with_no_witness_reachable_neither_side_runs_alone() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let ([node1, node2], _agents) = start_with_witness(&cluster);
    for (a, b) in [(1, 2), (1, 0), (2, 0)] {
        let to = if b == 0 {
            cluster.client()
        } else {
            cluster.node(b)
        };
        cluster.partition(cluster.node(a), to).expect("partition");
    }
    node1.wait_state(WAIT);
    node2.wait_state(WAIT);
    for node in [&node1, &node2] {
        node.wait_for("the application to stop", || !app_running(node));
    }
    assert_eq!(
        (node1.state(), node2.state()),
        (WAIT, WAIT),
        "neither goes ALONE"
    );
}

#[test]
fn interface_checker_waits_while_the_nic_has_no_link_and_rejoins_when_it_is_back() {
    if !require_root() {
        return;
    }
    // LAN 0 carries the production traffic, LAN 1 a second heartbeat.
    let cluster = two_nodes(2);
    let install = |k: usize| {
        let node = cluster.node(k);
        let check = format!(
            r#"<check><intf ident="default" interval="1"><to local_addr="{}"/></intf></check>"#,
            node.addr(0)
        );
        module(r#"maxloop="3""#, &check).install(&cluster, node)
    };
    let node1 = install(1);
    let node2 = install(2);
    let _agents = start_agents([&node1, &node2]);
    first_start(&node1, &node2);
    wait_checker_up(&node1, "the link to be seen up", "intf.default");

    // The link goes: SafeKit's interface rule is `wait`: node1 hands over and waits.
    cluster
        .link_down(cluster.node(1), 0)
        .expect("node1's eth0 down");
    node2.wait_state(ALONE);
    node1.wait_state(WAIT);
    node1.wait_for("node1 to give the application up", || !app_running(&node1));
    let log = node1.log();
    assert!(
        log.contains(
            "Rule interface_failure fired: resource intf.default down (eth0 has no carrier)"
        ),
        "{log}"
    );
    assert!(
        log.contains("Action wait called by interface_failure"),
        "{log}"
    );
    assert_eq!(
        node1
            .safekit_ok(&format!("get -m {MODULE} -r intf.default"))
            .trim(),
        "down"
    );
    // Still waiting while the link stays down (the second heartbeat LAN keeps the peer in view).
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(node1.state(), WAIT, "held in WAIT while the link is down");
    assert_eq!(node2.state(), ALONE, "node2 runs the application");

    // The link is back: the implicit wakeup starts node1 again, as SECOND of node2.
    cluster
        .link_up(cluster.node(1), 0)
        .expect("node1's eth0 up");
    node1.wait_state(SECOND);
    node2.wait_state(PRIM);
    let log = node1.log();
    assert!(
        log.contains("Action wakeup called by Implicit_wakeup: intf.default up again"),
        "{log}"
    );
    assert!(app_running(&node2), "node2 still runs the application");
}

/// A custom checker program: reports `custom.app` down while the flag file
/// `$SAFEUSERVAR/app_down` exists, up otherwise, every 200 ms.
const CUSTOM_CHECKER: &str = r#"#!/bin/sh
while true; do
    if [ -e "$SAFEUSERVAR/app_down" ]; then value=down; else value=up; fi
    "$SAFE/safekit" set -r custom.app -v "$value" -i app || echo "set failed"
    sleep 0.2
done
"#;

#[test]
fn custom_checker_reports_with_safekit_set_and_its_rule_fails_over() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let check = r#"<check><custom ident="app" exec="check_app" action="stopstart"/></check>"#;
    let ([node1, node2], _agents) = module("", check)
        .script("check_app", CUSTOM_CHECKER)
        .start_pair(&cluster);
    let get = |node: &AgentNode<'_>| {
        node.safekit_ok(&format!("get -m {MODULE} -r custom.app"))
            .trim()
            .to_string()
    };
    // when="prim" (the default): the program runs on the primary only.
    node1.wait_for("the custom checker to report up", || get(&node1) == "up");
    assert_eq!(get(&node2), "init", "no program on the secondary");
    wait_checker_up(&node1, "state -v to show the checker up", "custom.app");

    // Setting an unknown resource is refused with the resources that can be set.
    let refused = node1.safekit(&format!("set -m {MODULE} -r custom.nope -v down"));
    assert!(!refused.success(), "an unknown resource is refused");
    assert!(
        refused.stderr.contains("unknown resource custom.nope")
            && refused.stderr.contains("custom.app"),
        "{}",
        refused.stderr
    );

    // The program sees the failure: its rule c_app (stopstart) moves the application.
    std::fs::write(node1.module_var_dir().join("app_down"), "").expect("flag");
    node2.wait_state(ALONE);
    node1.wait_state(SECOND);
    let log = node1.log();
    assert!(
        log.contains("Rule c_app fired: resource custom.app down (set to down by app)"),
        "the log names the rule and the resource: {log}"
    );
    assert!(log.contains("Action stop called by c_app"), "{log}");
    // node2's own program runs now that it is primary; node1's was stopped.
    node2.wait_for("node2's checker to report up", || get(&node2) == "up");
    assert_eq!(
        get(&node1),
        "init",
        "node1 is SECOND: its program is stopped"
    );
    let program_on_node1 = node1
        .node()
        .run("pgrep -f '[c]heck_app'")
        .expect("run pgrep");
    assert!(!program_on_node1.success(), "node1's program was killed");
    assert!(app_running(&node2), "node2 runs the application");
}

#[test]
fn an_explicit_wait_rule_on_a_custom_resource_holds_the_node_until_it_is_up() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    // The checker's own action is SafeKit's default, noaction: only the rule acts.
    // The rule acts once its condition held for handle_time (2 s here; SafeKit's default is 15 s).
    let config = r#"<check><custom ident="app" exec="check_app"/></check>
<failover period="1s" handle_time="2s"><![CDATA[
app_down: if (custom.app == down) then wait();
]]></failover>"#;
    let ([node1, node2], _agents) = module("", config)
        .script("check_app", CUSTOM_CHECKER)
        .start_pair(&cluster);
    wait_checker_up(&node1, "the custom checker to report up", "custom.app");

    let flag = node1.module_var_dir().join("app_down");
    std::fs::write(&flag, "").expect("flag");
    node2.wait_state(ALONE);
    node1.wait_state(WAIT);
    let log = node1.log();
    assert!(
        log.contains(
            "Rule app_down fired: resource custom.app down (set to down by app): action wait"
        ) && log.contains("(the condition held for handle_time 2 s)"),
        "{log}"
    );
    assert!(log.contains("Action wait called by app_down"), "{log}");
    assert!(!app_running(&node1), "node1 gave the application up");
    // The program keeps running in WAIT: it is what reports the resource up again.
    assert_eq!(
        node1
            .safekit_ok(&format!("get -m {MODULE} -r custom.app"))
            .trim(),
        "down"
    );

    std::fs::remove_file(&flag).expect("remove the flag");
    node1.wait_state(SECOND);
    assert!(
        node1
            .log()
            .contains("Action wakeup called by Implicit_wakeup: custom.app up again"),
        "{}",
        node1.log()
    );
    node2.wait_state(PRIM);
}

#[test]
fn a_virtual_ip_removed_by_hand_makes_the_primary_fail_over() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let vip = cluster.spare_addr(0, 0);
    let config = format!(
        r#"<vip><interface_list><interface><real_interface>
  <virtual_addr addr="{vip}" where="one_side_alias" check="on"/>
</real_interface></interface></interface_list></vip>"#
    );
    let ([node1, node2], _agents) = module("", &config).start_pair(&cluster);
    let checker = format!("ip.{vip}");
    wait_checker_up(&node1, "the VIP checker to see the address", &checker);

    node1
        .node()
        .run_ok(format!(
            "cidr=$(ip -o -4 addr show dev eth0 | awk '{{print $4}}' | grep '^{vip}/') && ip addr del \"$cidr\" dev eth0"
        ))
        .expect("delete the virtual IP by hand");
    node2.wait_state(ALONE);
    node1.wait_for("node1 to be back as SECOND", || node1.state() == SECOND);
    let log = node1.log();
    assert!(
        log.contains(&format!("Rule ip_failure fired: resource {checker} down")),
        "{log}"
    );
    assert!(log.contains("Action stop called by ip_failure"), "{log}");
    let on_node2 = node2
        .node()
        .run(format!("ip -o addr show | grep -w {vip}"))
        .expect("ip addr");
    assert!(on_node2.success(), "the virtual IP moved to node2");
}

#[test]
fn interface_check_on_holds_the_node_in_wait_while_the_vip_link_is_down() {
    if !require_root() {
        return;
    }
    // LAN 0 carries the virtual IP, LAN 1 a second heartbeat.
    let cluster = two_nodes(2);
    let vip = cluster.spare_addr(0, 0);
    let config = format!(
        r#"<vip><interface_list><interface check="on"><real_interface>
  <virtual_addr addr="{vip}" where="one_side_alias"/>
</real_interface></interface></interface_list></vip>"#
    );
    let ([node1, node2], _agents) = module("", &config).start_pair(&cluster);
    // SafeKit's name: intf.<network of the virtual IP>.
    let (network, _) = cluster.subnet(0);
    let checker = format!("intf.{network}");
    wait_checker_up(
        &node1,
        "the generated interface checker to see the link",
        &checker,
    );
    wait_checker_up(
        &node2,
        "node2's interface checker to see the link",
        &checker,
    );

    cluster
        .link_down(cluster.node(1), 0)
        .expect("node1's eth0 down");
    node2.wait_state(ALONE);
    node1.wait_state(WAIT);
    let log = node1.log();
    assert!(
        log.contains(&format!(
            "Rule interface_failure fired: resource {checker} down (eth0 has no carrier)"
        )),
        "{log}"
    );
    assert!(
        log.contains("Action wait called by interface_failure"),
        "{log}"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(node1.state(), WAIT, "held in WAIT while the link is down");
    assert_eq!(node2.state(), ALONE, "node2 runs the application");
    let on_node2 = node2
        .node()
        .run(format!("ip -o addr show | grep -w {vip}"))
        .expect("ip addr");
    assert!(on_node2.success(), "the virtual IP moved to node2");

    cluster
        .link_up(cluster.node(1), 0)
        .expect("node1's eth0 up");
    node1.wait_state(SECOND);
    node2.wait_state(PRIM);
    assert!(
        node1.log().contains(&format!(
            "Action wakeup called by Implicit_wakeup: {checker} up again"
        )),
        "{}",
        node1.log()
    );
    assert!(app_running(&node2), "node2 still runs the application");
}

/// A custom checker program that reports `custom.app` up only once the flag
/// file `$SAFEUSERVAR/report` exists; until then the resource stays `init`.
const LATE_CHECKER: &str = r#"#!/bin/sh
while true; do
    if [ -e "$SAFEUSERVAR/report" ]; then
        "$SAFE/safekit" set -r custom.app -v up -i app || echo "set failed"
    fi
    sleep 0.2
done
"#;

#[test]
fn a_start_waits_while_a_resource_of_a_wait_rule_is_init() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let config = r#"<check><custom ident="app" exec="check_app" when="pre"/></check>
<failover><![CDATA[
app_down: if (custom.app == down) then wait();
]]></failover>"#;
    // prim and second are explicit operator choices: they go on at once.
    let ([node1, node2], _agents) = module("", config)
        .script("check_app", LATE_CHECKER)
        .start_pair(&cluster);
    let get = |node: &AgentNode<'_>| {
        node.safekit_ok(&format!("get -m {MODULE} -r custom.app"))
            .trim()
            .to_string()
    };
    assert_eq!(get(&node2), "init");

    // A plain start: node2 stays in WAIT while custom.app is init.
    node2.safekit_ok(&format!("stop -m {MODULE}"));
    node2.wait_state(STOP);
    node2.safekit_ok(&format!("start -m {MODULE}"));
    node2.wait_state(WAIT);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(node2.state(), WAIT, "held while custom.app is init");
    let verbose = node2.verbose();
    assert!(
        verbose.contains("waiting for the first verdict of custom.app (init)")
            && verbose.contains("Transient"),
        "state -v says what it waits for: {verbose}"
    );
    assert_eq!(node1.state(), ALONE, "node1 runs the application meanwhile");

    // The program reports: the start goes on, node2 joins as SECOND.
    std::fs::write(node2.module_var_dir().join("report"), "").expect("flag");
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
    assert_eq!(get(&node2), "up");
    let log = node2.log();
    assert!(
        log.contains("waiting for the first verdict of custom.app (used by a wait rule)"),
        "{log}"
    );
}

/// A custom checker program: reports `custom.x` down while the flag file
/// `$SAFEUSERVAR/x_down` exists, up otherwise, every 200 ms.
const CUSTOM_X_CHECKER: &str = r#"#!/bin/sh
while true; do
    if [ -e "$SAFEUSERVAR/x_down" ]; then value=down; else value=up; fi
    "$SAFE/safekit" set -r custom.x -v "$value" -i x || echo "set failed"
    sleep 0.2
done
"#;

#[test]
fn a_rule_on_a_remote_resource_acts_on_the_peers_checker_verdict() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    // custom.x is checked on the secondary only (node2); the rule on the
    // primary (node1) restarts its application when the peer's custom.x is down.
    let config = r#"<check><custom ident="x" exec="check_x" when="second"/></check>
<failover><![CDATA[
peer_x_down: if (remote.custom.x == down) then restart();
]]></failover>"#;
    let ([node1, node2], [_agent1, agent2]) = module("", config)
        .script("check_x", CUSTOM_X_CHECKER)
        .start_pair(&cluster);
    wait_checker_up(&node2, "node2's custom checker to report up", "custom.x");
    node1.wait_for("node1 to show node2's custom.x up", || {
        safekit_tests::agents::detail(&node1.verbose(), "remote resources") == "custom.x up"
    });
    // While the peer's resource is up, the rule does not fire.
    assert_eq!(starts(&node1), 1, "node1's application started once");
    assert!(
        !node1.log().contains("Rule peer_x_down fired"),
        "{}",
        node1.log()
    );
    // node2 reads node1's custom.x, which is not checked on a primary: init.
    assert_eq!(
        safekit_tests::agents::detail(&node2.verbose(), "remote resources"),
        "custom.x init"
    );

    // node2's checker sees the failure: node1's rule restarts node1's application.
    std::fs::write(node2.module_var_dir().join("x_down"), "").expect("flag");
    node1.wait_for("node1's application to be restarted by the rule", || {
        starts(&node1) == 2
    });
    let log = node1.log();
    assert!(
        log.contains(
            "Rule peer_x_down fired: resource remote.custom.x down (the peer's value is down): action restart"
        ),
        "the log names the rule and the peer's resource: {log}"
    );
    assert!(
        log.contains("Action restart called by peer_x_down"),
        "{log}"
    );
    assert_eq!(node1.state(), PRIM, "a restart keeps the state");
    assert_eq!(node2.state(), SECOND);
    assert!(
        !node2.log().contains("Rule peer_x_down fired"),
        "node2's rule reads node1's init value: {}",
        node2.log()
    );

    // The peer lost: its values are unknown again, and the rule no longer holds.
    agent2.kill();
    node1.wait_state(ALONE);
    node1.wait_for("node1 to forget node2's resources", || {
        safekit_tests::agents::detail(&node1.verbose(), "remote resources")
            == "unknown (no resources heard from the peer)"
    });
    assert!(app_running(&node1), "node1 runs the application");
}
