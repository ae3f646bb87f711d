//! Checkers, local-failure failover, the split-brain witness and the cloud health check,
//! run as an operator would see them: two nodes in namespaces, each running
//! `safekitd --foreground`, a module without `<rfs>` whose `start_prim`
//! starts a watched process and a small web server.
//!
//! States are read with `safekit state -m mirror -lq`'s exit code (STOP 0,
//! WAIT 1, ALONE 2, PRIM 3, SECOND 4), reasons with `safekit log`, and the
//! health check with `curl` from the client namespace. The binaries must be
//! built first: `cargo build -p safekit-agent --bins` (same target directory).

use std::path::PathBuf;
use std::time::Duration;

use safekit_tests::{Cluster, Node, NodeProcess, require_root, wait_until, workspace_bin};

const MODULE: &str = "mirror";
const STOP: i32 = 0;
const WAIT: i32 = 1;
const ALONE: i32 = 2;
const PRIM: i32 = 3;
const SECOND: i32 = 4;
const SECRET: &str = "5f4dcc3b5aa765d61d8327deb882cf99aa11bb22cc33dd44ee55ff6677889900";
/// Long enough for a failover with timeout 1 s, a script run and a slow machine.
const STATE_WAIT: Duration = Duration::from_secs(30);
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

/// One node's SafeKit installation and agent.
struct MirrorNode<'a> {
    node: &'a Node,
    safe: PathBuf,
    var: PathBuf,
}

impl<'a> MirrorNode<'a> {
    /// Installs the module; `service_attrs` go on `<service>`, `extra` inside it.
    fn install(node: &'a Node, cluster: &Cluster, service_attrs: &str, extra: &str) -> Self {
        let safe = node.config_dir().join("safe");
        let var = node.state_dir().join("safevar");
        let module = safe.join("modules").join(MODULE);
        for dir in [
            module.join("conf"),
            module.join("bin"),
            var.join("cluster"),
            safe.join("private").join("bin"),
        ] {
            std::fs::create_dir_all(&dir).expect("create SafeKit directories");
        }
        let lans: String = (0..cluster.lan_count())
            .map(|lan| {
                let nodes: String = cluster
                    .nodes()
                    .iter()
                    .map(|peer| {
                        format!(
                            "<node name=\"{}\" addr=\"{}\"/>",
                            peer.name(),
                            peer.addr(lan)
                        )
                    })
                    .collect();
                format!("<lan name=\"{}\">{nodes}</lan>", lan_name(lan))
            })
            .collect();
        std::fs::write(
            var.join("cluster").join("cluster.xml"),
            format!("<cluster><lans>{lans}</lans></cluster>\n"),
        )
        .expect("write cluster.xml");
        let heartbeats: String = (0..cluster.lan_count())
            .map(|lan| format!("<heartbeat name=\"{}\"/>", lan_name(lan)))
            .collect();
        write_mode(&var.join("cluster").join("secret"), SECRET, 0o600);
        std::fs::write(
            module.join("conf").join("userconfig.xml"),
            format!(
                r#"<safe>
<service mode="mirror" defaultprim="alone" failover="on" {service_attrs}>
  <heart pulse="200ms" timeout="1000ms">
    {heartbeats}
  </heart>
  <user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"/>
  {extra}
</service>
</safe>
"#
            ),
        )
        .expect("write userconfig.xml");
        write_mode(&module.join("bin").join("start_prim"), START_PRIM, 0o755);
        write_mode(&module.join("bin").join("stop_prim"), STOP_PRIM, 0o755);
        let safekit = workspace_bin("safekit").expect("safekit is built");
        let link = safe.join("safekit");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(safekit, link).expect("link $SAFE/safekit");
        MirrorNode { node, safe, var }
    }

    fn start_agent(&self) -> NodeProcess {
        let safekitd = workspace_bin("safekitd").expect("safekitd is built");
        let agent = self
            .node
            .spawn(format!(
                "exec {} --foreground --safe {} --var {} --node {}",
                safekitd.display(),
                self.safe.display(),
                self.var.display(),
                self.node.name()
            ))
            .expect("spawn safekitd");
        wait_until(
            &format!("{}'s agent to answer", self.node.name()),
            STATE_WAIT,
            Duration::from_millis(50),
            || self.safekit("module list").success(),
        )
        .unwrap_or_else(|error| panic!("{error}: {}", agent.output()));
        agent
    }

    fn safekit(&self, args: &str) -> safekit_tests::Output {
        self.node
            .run(format!(
                "SAFE={} SAFEVAR={} {}/safekit {args}",
                self.safe.display(),
                self.var.display(),
                self.safe.display()
            ))
            .expect("run safekit")
    }

    fn safekit_ok(&self, args: &str) -> String {
        let output = self.safekit(args);
        assert!(
            output.success(),
            "{}: safekit {args} failed: {}{}\n{}",
            self.node.name(),
            output.stdout,
            output.stderr,
            self.diagnostics()
        );
        output.stdout
    }

    fn state(&self) -> i32 {
        self.safekit(&format!("state -m {MODULE} -lq"))
            .status
            .code()
            .unwrap_or(-1)
    }

    fn wait_state(&self, code: i32) {
        self.wait_for(&format!("state {code}"), || self.state() == code);
    }

    fn wait_for(&self, what: &str, condition: impl FnMut() -> bool) {
        if let Err(error) = wait_until(
            &format!("{}: {what}", self.node.name()),
            STATE_WAIT,
            Duration::from_millis(50),
            condition,
        ) {
            panic!("{error} (state {})\n{}", self.state(), self.diagnostics());
        }
    }

    fn verbose(&self) -> String {
        self.safekit_ok(&format!("state -m {MODULE} -v"))
    }

    fn log(&self) -> String {
        self.safekit(&format!("log -m {MODULE} -A -s 1000")).stdout
    }

    /// How many times `start_prim` ran on this node.
    fn starts(&self) -> usize {
        std::fs::read_to_string(self.var.join("modules").join(MODULE).join("starts"))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    /// The watched process runs (a killed one may stay a zombie until reaped: not counted).
    fn app_running(&self) -> bool {
        self.node
            .run(format!(
                "ps -e -o stat=,comm= | awk '$1 !~ /^Z/ && $2 == \"{APP}\" {{ found = 1 }} END {{ exit !found }}'"
            ))
            .expect("run ps")
            .success()
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- {} state -v:\n{}\n--- module log:\n{}",
            self.node.name(),
            self.safekit(&format!("state -m {MODULE} -v")).stdout,
            std::fs::read_to_string(self.var.join("modules").join(MODULE).join("log"))
                .unwrap_or_default()
        )
    }
}

fn lan_name(lan: usize) -> &'static str {
    ["default", "repli"][lan]
}

fn write_mode(path: &std::path::Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).expect("write file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn two_nodes(lans: usize) -> Cluster {
    Cluster::builder()
        .nodes(2)
        .lans(lans)
        .client(true)
        .build()
        .expect("build the cluster")
}

/// node1 `prim` (ALONE), node2 `second` (SECOND), node1 PRIM.
fn first_start(node1: &MirrorNode<'_>, node2: &MirrorNode<'_>) {
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    node2.wait_for("peer seen ALONE", || {
        node2.verbose().contains("node1 ALONE")
    });
    node2.safekit_ok(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
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
    let node1 = MirrorNode::install(cluster.node(1), &cluster, "", "");
    let node2 = MirrorNode::install(cluster.node(2), &cluster, "", "");
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
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
    let node1 = MirrorNode::install(cluster.node(1), &cluster, attrs, &errd);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, attrs, &errd);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);
    node1.wait_for("the checker to see the process up", || {
        node1
            .verbose()
            .lines()
            .any(|line| line.contains(&format!("checker proc.{APP}")) && line.contains(" up for "))
    });
    assert_eq!(node1.starts(), 1);

    // Two kills: two local restarts, node1 stays primary.
    for round in 1..=2 {
        assert!(node1.app_running(), "round {round}: the process runs");
        node1
            .node
            .run_ok(format!("pkill -9 -x {APP}"))
            .expect("kill the watched process");
        node1.wait_for(&format!("restart number {round}"), || {
            node1.starts() == round + 1 && node1.app_running() && node1.state() == PRIM
        });
        let log = node1.log();
        assert!(
            log.contains(&format!("Rule errd.{APP} fired: resource proc.{APP} down (0 process(es), at least 1 wanted): action restart ({round}/2 of maxloop")),
            "the log says which rule fired and why: {log}"
        );
        assert!(
            log.contains(&format!("Action restart called by errd.{APP}")),
            "{log}"
        );
    }
    assert_eq!(node2.state(), SECOND, "no failover for a local restart");

    // The third kill within loop_interval is one more than maxloop: node1 stops, node2 takes over.
    node1
        .node
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
    assert_eq!(node1.starts(), 3, "no third restart");
    assert_eq!(node2.starts(), 1, "node2 runs the application");
}

#[test]
fn tcp_checker_restarts_an_application_that_stops_listening() {
    if !require_root() {
        return;
    }
    let cluster = two_nodes(1);
    let check = r#"<check><tcp ident="web" action="restart" interval="1" timeout="1"><to addr="127.0.0.1" port="8080"/></tcp></check>"#;
    let node1 = MirrorNode::install(cluster.node(1), &cluster, "", check);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, "", check);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);
    node1.wait_for("the TCP checker to see the port up", || {
        node1
            .verbose()
            .lines()
            .any(|line| line.contains("checker tcp.web") && line.contains(" up for "))
    });
    node1
        .node
        .run_ok(format!(
            "kill $(cat {}/modules/{MODULE}/web.pid)",
            node1.var.display()
        ))
        .expect("kill the web server");
    node1.wait_for("the web server to be restarted", || {
        node1.starts() == 2 && node1.state() == PRIM
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
    // The client is the witness: one router both nodes should reach.
    let witness = cluster.client().addr(0);
    let check =
        format!(r#"<check><splitbrain ident="witness" exec="ping" arg="{witness}"/></check>"#);
    let node1 = MirrorNode::install(cluster.node(1), &cluster, "", &check);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, "", &check);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);
    for node in [&node1, &node2] {
        node.wait_for("the witness to be seen", || {
            node.verbose().lines().any(|line| {
                line.contains("checker splitbrain.witness") && line.contains(" up for ")
            })
        });
    }

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
        !node1.app_running()
    });
    assert!(node2.app_running(), "node2 runs the application");
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
    let witness = cluster.client().addr(0);
    let check =
        format!(r#"<check><splitbrain ident="witness" exec="ping" arg="{witness}"/></check>"#);
    let node1 = MirrorNode::install(cluster.node(1), &cluster, "", &check);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, "", &check);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);
    for node in [&node1, &node2] {
        node.wait_for("the witness to be seen", || {
            node.verbose().lines().any(|line| {
                line.contains("checker splitbrain.witness") && line.contains(" up for ")
            })
        });
    }
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
        node.wait_for("the application to stop", || !node.app_running());
    }
    assert_eq!(
        (node1.state(), node2.state()),
        (WAIT, WAIT),
        "neither goes ALONE"
    );
}

#[test]
fn interface_checker_moves_the_application_when_the_nic_loses_its_link() {
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
        MirrorNode::install(node, &cluster, r#"maxloop="1""#, &check)
    };
    let node1 = install(1);
    let node2 = install(2);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);
    cluster
        .link_down(cluster.node(1), 0)
        .expect("node1's eth0 down");
    node2.wait_state(ALONE);
    node1.wait_for("node1 to give the application up", || {
        matches!(node1.state(), STOP | WAIT | SECOND) && !node1.app_running()
    });
    let log = node1.log();
    assert!(
        log.contains(
            "Rule interface_failure fired: resource intf.default down (eth0 has no carrier)"
        ),
        "{log}"
    );
    assert_eq!(node2.state(), ALONE, "node2 runs the application");
}
