//! Mirror cluster control plane, run like an operator's runbook: two nodes, each
//! running `safekitd --foreground`, a module without `<rfs>` whose `start_prim`
//! starts a small web server, a client reaching it through the virtual IP.
//!
//! States are checked as an operator would: `safekit state -m mirror -lq`'s
//! exit code inside the node (STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4), and
//! `safekit log` for the reasons. The binaries must be built first:
//! `cargo build -p safekit-agent --bins` (same target directory).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use safekit_tests::{Cluster, Node, NodeProcess, require_root, wait_until, workspace_bin};

const MODULE: &str = "mirror";
const STOP: i32 = 0;
const WAIT: i32 = 1;
const ALONE: i32 = 2;
const PRIM: i32 = 3;
const SECOND: i32 = 4;
const APP_PORT: u16 = 8080;
/// Heartbeat port of module id 1 (8888 + id - 1).
const HEART_PORT: u16 = 8888;
const SECRET: &str = "5f4dcc3b5aa765d61d8327deb882cf99aa11bb22cc33dd44ee55ff6677889900";
/// Long enough for a failover with timeout 1 s, a script run and a slow machine.
const STATE_WAIT: Duration = Duration::from_secs(30);

const START_PRIM: &str = r#"#!/bin/sh
# Starts the demo application: a web server answering with this node's name.
mkdir -p "$SAFEUSERVAR/www"
hostname > "$SAFEUSERVAR/www/whoami"
cd "$SAFEUSERVAR/www" || exit 1
setsid python3 -m http.server 8080 >/dev/null 2>&1 </dev/null &
echo $! > "$SAFEUSERVAR/app.pid"
"$SAFE/safekit" printi "start_prim: web server started as pid $!"
exit 0
"#;

const STOP_PRIM: &str = r#"#!/bin/sh
# Stops the demo application.
if [ -f "$SAFEUSERVAR/app.pid" ]; then
    kill "$(cat "$SAFEUSERVAR/app.pid")" 2>/dev/null
    rm -f "$SAFEUSERVAR/app.pid"
fi
exit 0
"#;

/// The client's probe: one HTTP GET of /whoami every 10 ms, each result
/// timestamped on a line (`<unix time> ok <node>` or `<unix time> fail`).
const PROBE: &str = r#"
import socket, sys, time
vip, port, out = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
while True:
    start = time.time()
    try:
        s = socket.create_connection((vip, port), timeout=0.2)
        s.settimeout(0.5)
        s.sendall(b"GET /whoami HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        body = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
        out.write("%.3f ok %s\n" % (start, body))
    except Exception:
        out.write("%.3f fail\n" % start)
    time.sleep(0.01)
"#;

/// One node's SafeKit installation and agent.
struct MirrorNode<'a> {
    node: &'a Node,
    safe: PathBuf,
    var: PathBuf,
}

impl<'a> MirrorNode<'a> {
    fn install(node: &'a Node, cluster: &Cluster, vip: Ipv4Addr, secret: &str) -> MirrorNode<'a> {
        Self::install_with(node, cluster, vip, secret, "")
    }

    /// Like [`MirrorNode::install`], with `extra` XML added inside `<service>`.
    fn install_with(
        node: &'a Node,
        cluster: &Cluster,
        vip: Ipv4Addr,
        secret: &str,
        extra: &str,
    ) -> MirrorNode<'a> {
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
        // LAN 0 is "default" (production, the client's); LAN 1, if any, "repli".
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
        write_mode(&var.join("cluster").join("secret"), secret, 0o600);
        std::fs::write(
            module.join("conf").join("userconfig.xml"),
            format!(
                r#"<safe>
<service mode="mirror" defaultprim="alone" failover="on">
  <heart pulse="200ms" timeout="1000ms">
    {heartbeats}
  </heart>
  <vip>
    <interface_list>
      <interface check="off" arpreroute="on">
        <real_interface>
          <virtual_addr addr="{vip}" where="one_side_alias"/>
        </real_interface>
      </interface>
    </interface_list>
  </vip>
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

    /// Runs `safekit <args>` inside the node as root.
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

    /// `safekit state -m mirror -lq`'s exit code.
    fn state(&self) -> i32 {
        self.safekit(&format!("state -m {MODULE} -lq"))
            .status
            .code()
            .unwrap_or(-1)
    }

    fn wait_state(&self, code: i32) {
        if let Err(error) = wait_until(
            &format!("{} in state {code}", self.node.name()),
            STATE_WAIT,
            Duration::from_millis(50),
            || self.state() == code,
        ) {
            panic!("{error} (now {})\n{}", self.state(), self.diagnostics());
        }
    }

    /// Waits until `state -v` shows the peer as `expected` (e.g. `node1 ALONE`).
    fn wait_peer(&self, expected: &str) {
        wait_until(
            &format!("{} to see its peer as {expected}", self.node.name()),
            STATE_WAIT,
            Duration::from_millis(50),
            || {
                detail(
                    &self.safekit(&format!("state -m {MODULE} -v")).stdout,
                    "peer",
                ) == expected
            },
        )
        .unwrap_or_else(|error| panic!("{error}\n{}", self.diagnostics()));
    }

    fn log(&self) -> String {
        self.safekit(&format!("log -m {MODULE} -A -s 1000")).stdout
    }

    /// The module log, read from the file (works when the agent is down).
    fn log_file(&self) -> String {
        std::fs::read_to_string(self.var.join("modules").join(MODULE).join("log"))
            .unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- {} state -v:\n{}\n--- module log:\n{}",
            self.node.name(),
            self.safekit(&format!("state -m {MODULE} -v")).stdout,
            self.log_file()
        )
    }
}

/// The value of a `key  value` line of `safekit state -v`.
fn detail(verbose: &str, key: &str) -> String {
    verbose
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(key))
        .map(|value| value.trim().to_string())
        .unwrap_or_default()
}

fn lan_name(lan: usize) -> &'static str {
    ["default", "repli"][lan]
}

fn write_mode(path: &std::path::Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).expect("write file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// What the client gets from the application through the virtual IP.
fn client_reaches(client: &Node, vip: Ipv4Addr) -> Option<String> {
    let output = client
        .run(format!("curl -s -m 1 http://{vip}:{APP_PORT}/whoami"))
        .expect("run curl");
    output.success().then(|| output.stdout.trim().to_string())
}

fn wait_client_reaches(client: &Node, vip: Ipv4Addr, node: &str) {
    wait_until(
        &format!("the client to reach {node} through {vip}"),
        STATE_WAIT,
        Duration::from_millis(50),
        || client_reaches(client, vip).as_deref() == Some(node),
    )
    .unwrap_or_else(|error| panic!("{error}: last answer {:?}", client_reaches(client, vip)));
}

fn two_nodes() -> (Cluster, Ipv4Addr) {
    two_nodes_on(1)
}

fn two_nodes_on(lans: usize) -> (Cluster, Ipv4Addr) {
    let cluster = Cluster::builder()
        .nodes(2)
        .lans(lans)
        .client(true)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    (cluster, vip)
}

/// node1 `prim` (ALONE), node2 `second` (SECOND), node1 PRIM.
fn first_start(node1: &MirrorNode<'_>, node2: &MirrorNode<'_>) {
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    // As an operator would, check that node2 sees node1 primary before `second`.
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
}

#[test]
fn first_start_then_failover_on_kill_9_moves_the_vip_and_the_application() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes();
    let node1 = MirrorNode::install(cluster.node(1), &cluster, vip, SECRET);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, vip, SECRET);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    assert_eq!(node1.state(), STOP, "a module starts in STOP");

    first_start(&node1, &node2);
    wait_client_reaches(cluster.client(), vip, "node1");
    let verbose = node1.safekit_ok(&format!("state -m {MODULE} -v"));
    assert!(
        verbose.contains("PRIM") && verbose.contains("node2 SECOND"),
        "{verbose}"
    );
    assert!(verbose.contains(&format!("{vip} set on")), "{verbose}");
    let log1 = node1.log();
    assert!(log1.contains("Action prim called by root"), "{log1}");
    assert!(log1.contains("start_prim"), "{log1}");
    assert!(
        log1.contains("start_prim: web server started"),
        "printi from the script reaches the verbose log: {log1}"
    );

    // The client probes the VIP every 10 ms while node1 loses power.
    let probe = Probe::start(cluster.client(), vip, "kill9");
    probe.wait_for("node1");

    cluster.node(1).crash().expect("crash node1");
    node2.wait_state(ALONE);
    wait_client_reaches(cluster.client(), vip, "node2");
    probe.wait_for("node2");
    let log2 = node2.log();
    assert!(
        log2.contains("Action alone called by heart: no heartbeat"),
        "{log2}"
    );
    let verbose2 = node2.safekit_ok(&format!("state -m {MODULE} -v"));
    assert!(verbose2.contains(&format!("{vip} set on")), "{verbose2}");
    println!(
        "client-visible interruption on kill -9 of node1 (pulse 200 ms, timeout 1000 ms): {:.0} ms",
        probe.interruption("node1", "node2")
    );

    // Failback: node1 comes back and is started; it joins as SECOND while the
    // application keeps answering on node2.
    let answers_before_failback = probe.answers().len();
    cluster.node(1).reboot().expect("reboot node1");
    let _agent1 = node1.start_agent();
    node1.safekit_ok(&format!("start -m {MODULE}"));
    node1.wait_state(SECOND);
    node2.wait_state(PRIM);
    probe.wait_for_more(answers_before_failback + 20);
    let during_failback = &probe.answers()[answers_before_failback..];
    assert!(
        during_failback.iter().all(|answer| answer == "ok node2"),
        "the application never stopped on node2 during the failback: {during_failback:?}"
    );
    probe.stop();
}

/// The client's view of the application: [`PROBE`] running in the client namespace.
struct Probe {
    file: PathBuf,
    process: NodeProcess,
}

impl Probe {
    fn start(client: &Node, vip: Ipv4Addr, name: &str) -> Probe {
        let file = client.log_dir().join(format!("probe-{name}.txt"));
        let script = client.log_dir().join("probe.py");
        std::fs::write(&script, PROBE).expect("write probe");
        let process = client
            .spawn(format!(
                "exec python3 {} {vip} {APP_PORT} {}",
                script.display(),
                file.display()
            ))
            .expect("start the probe");
        Probe { file, process }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.file).unwrap_or_default()
    }

    /// Each probe's result, `ok <node>` or `fail`, in order.
    fn answers(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|line| line.split_once(' ').map(|(_, answer)| answer.to_string()))
            .collect()
    }

    fn wait_for(&self, node: &str) {
        wait_until(
            &format!("the probe to reach {node}"),
            STATE_WAIT,
            Duration::from_millis(20),
            || self.text().contains(&format!("ok {node}")),
        )
        .expect("the probe gets an answer");
    }

    fn wait_for_more(&self, count: usize) {
        wait_until(
            "more probe results",
            STATE_WAIT,
            Duration::from_millis(20),
            || self.answers().len() >= count,
        )
        .expect("the probe keeps running");
    }

    /// Milliseconds between `from`'s last answer and `to`'s first one.
    fn interruption(&self, from: &str, to: &str) -> f64 {
        let text = self.text();
        let times = |wanted: String| -> Vec<f64> {
            text.lines()
                .filter(|line| line.ends_with(&wanted))
                .filter_map(|line| line.split_whitespace().next()?.parse().ok())
                .collect()
        };
        let last_from = times(format!("ok {from}"))
            .into_iter()
            .fold(f64::MIN, f64::max);
        let first_to = times(format!("ok {to}"))
            .into_iter()
            .fold(f64::MAX, f64::min);
        assert!(
            first_to > last_from,
            "{to} answered only after {from} stopped"
        );
        (first_to - last_from) * 1000.0
    }

    fn stop(self) {
        self.process.kill();
    }
}

#[test]
fn swap_stop_and_the_not_up_to_date_rule() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes();
    let node1 = MirrorNode::install(cluster.node(1), &cluster, vip, SECRET);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, vip, SECRET);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);
    wait_client_reaches(cluster.client(), vip, "node1");

    // Swap: the roles are exchanged and the application follows.
    node1.safekit_ok(&format!("swap -m {MODULE}"));
    node2.wait_state(PRIM);
    node1.wait_state(SECOND);
    wait_client_reaches(cluster.client(), vip, "node2");

    // Stop on the PRIM: the SECOND takes over as ALONE, "remote stop".
    node2.safekit_ok(&format!("stop -m {MODULE}"));
    node2.wait_state(STOP);
    node1.wait_state(ALONE);
    wait_client_reaches(cluster.client(), vip, "node1");
    let log1 = node1.log();
    assert!(
        log1.contains("Action alone called by heart: remote stop"),
        "{log1}"
    );

    // node2 joins again, then is stopped as SECOND; node1 (ALONE) is stopped too.
    node2.safekit_ok(&format!("start -m {MODULE}"));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
    node2.safekit_ok(&format!("stop -m {MODULE}"));
    node2.wait_state(STOP);
    node1.wait_state(ALONE);
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    assert_eq!(
        client_reaches(cluster.client(), vip),
        None,
        "nothing serves once both stopped"
    );

    // node2 alone is not up to date: a plain start waits and never serves.
    node2.safekit_ok(&format!("start -m {MODULE}"));
    node2.wait_state(WAIT);
    wait_until(
        "node2 to say why it waits",
        STATE_WAIT,
        Duration::from_millis(50),
        || {
            node2
                .safekit(&format!("state -m {MODULE} -v"))
                .stdout
                .contains("not up to date")
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", node2.diagnostics()));
    assert_eq!(
        client_reaches(cluster.client(), vip),
        None,
        "a WAIT node serves nothing"
    );

    // `prim` forces it, and the log says who forced it.
    node2.safekit_ok(&format!("prim -m {MODULE}"));
    node2.wait_state(ALONE);
    wait_client_reaches(cluster.client(), vip, "node2");
    let log2 = node2.log();
    assert!(log2.contains("Action prim called by root"), "{log2}");
}

#[test]
fn forged_heartbeats_and_non_root_users_are_refused() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes();
    let node1 = MirrorNode::install(cluster.node(1), &cluster, vip, SECRET);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, vip, SECRET);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);

    // A heartbeat in the right format, claiming to be node2 stopping, but
    // signed with another secret, sent from the client to node1.
    let forged = safekit_protocol::heartbeat::encode(
        b"not the cluster secret, an attacker's guess",
        &safekit_protocol::heartbeat::Heartbeat {
            module: MODULE.into(),
            sender: "node2".into(),
            lan: "default".into(),
            boot: u64::MAX,
            seq: u64::MAX,
            status: safekit_protocol::heartbeat::NodeStatus {
                state: safekit_protocol::heartbeat::ModuleState::Stop,
                detail: safekit_protocol::heartbeat::Detail::None,
                stopping: true,
                handover: false,
                swap_requested: false,
                up_to_date: true,
                resync_interrupted: false,
                replication_degraded: false,
                was_primary: true,
                resync_percent: 0,
                generations: Vec::new(),
                resync_request: None,
                resync_serve: None,
            },
        },
    )
    .expect("encode the forged heartbeat");
    let forged_file = cluster.client().log_dir().join("forged.bin");
    std::fs::write(&forged_file, forged).expect("write the forged packet");
    cluster
        .client()
        .run_ok(format!(
            "python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
             [s.sendto(open(sys.argv[1],\"rb\").read(), (sys.argv[2], {HEART_PORT})) for _ in range(20)]' {} {}",
            forged_file.display(),
            cluster.node(1).addr(0)
        ))
        .expect("send forged heartbeats");
    wait_until(
        "node1 to log the forged heartbeat",
        STATE_WAIT,
        Duration::from_millis(50),
        || node1.log().contains("Heartbeat refused"),
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", node1.diagnostics()));
    let log1 = node1.log();
    assert!(log1.contains("authentication failed"), "{log1}");
    assert_eq!(node1.state(), PRIM, "a forged heartbeat changes nothing");
    assert_eq!(node2.state(), SECOND);

    // A non-root local user cannot use the admin socket.
    let output = cluster
        .node(1)
        .run(format!(
            "SAFEVAR={} setpriv --reuid=65534 --regid=65534 --clear-groups {}/safekit stop -m {MODULE}",
            node1.var.display(),
            node1.safe.display()
        ))
        .expect("run safekit as nobody");
    assert!(
        !output.success(),
        "nobody's stop must fail: {}",
        output.stdout
    );
    assert!(
        output.stderr.contains("permission denied") || output.stderr.contains("refused"),
        "one-line reason: {}",
        output.stderr
    );
    assert_eq!(node1.state(), PRIM, "nobody's stop had no effect");

    // A module that does not exist: one line, non-zero.
    let output = node1.safekit("start -m nosuchmodule");
    assert!(!output.success());
    assert!(
        output.stderr.contains("unknown module nosuchmodule"),
        "{}",
        output.stderr
    );
}

#[test]
fn link_down_fails_over_and_the_split_brain_heals_with_one_primary() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes();
    let node1 = MirrorNode::install(cluster.node(1), &cluster, vip, SECRET);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, vip, SECRET);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);
    wait_client_reaches(cluster.client(), vip, "node1");

    // node1's only link is cut: each side loses the other and runs ALONE.
    let probe = Probe::start(cluster.client(), vip, "linkdown");
    probe.wait_for("node1");
    cluster
        .link_down(cluster.node(1), 0)
        .expect("cut node1's link");
    node2.wait_state(ALONE);
    node1.wait_state(ALONE);
    wait_client_reaches(cluster.client(), vip, "node2");
    probe.wait_for("node2");
    println!(
        "client-visible interruption on link down of node1 (pulse 200 ms, timeout 1000 ms): {:.0} ms",
        probe.interruption("node1", "node2")
    );
    probe.stop();
    assert!(
        node2
            .log()
            .contains("Action alone called by heart: no heartbeat")
    );

    // The cable is back: exactly one side stays primary, the other becomes SECOND.
    cluster
        .link_up(cluster.node(1), 0)
        .expect("plug node1 back");
    wait_until(
        "one PRIM and one SECOND after the split brain",
        STATE_WAIT,
        Duration::from_millis(50),
        || {
            let states = [node1.state(), node2.state()];
            states == [PRIM, SECOND] || states == [SECOND, PRIM]
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}\n{}", node1.diagnostics(), node2.diagnostics()));
    let (winner, loser) = if node1.state() == PRIM {
        (&node1, &node2)
    } else {
        (&node2, &node1)
    };
    let loser_log = loser.log();
    assert!(
        loser_log.contains("Split brain recovery"),
        "the losing side says what it did: {loser_log}"
    );
    wait_client_reaches(cluster.client(), vip, winner.node.name());
}

#[test]
fn losing_only_the_production_lan_keeps_prim_and_second() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes_on(2);
    let node1 = MirrorNode::install(cluster.node(1), &cluster, vip, SECRET);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, vip, SECRET);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    first_start(&node1, &node2);

    cluster
        .link_down(cluster.node(1), 0)
        .expect("cut node1's production link");
    for node in [&node1, &node2] {
        wait_until(
            &format!("{} to report the production LAN down", node.node.name()),
            STATE_WAIT,
            Duration::from_millis(50),
            || {
                detail(
                    &node.safekit(&format!("state -m {MODULE} -v")).stdout,
                    "lan default",
                )
                .starts_with("down")
            },
        )
        .unwrap_or_else(|error| panic!("{error}\n{}", node.diagnostics()));
    }
    assert_eq!(
        node1.state(),
        PRIM,
        "no failover while the other LAN carries heartbeats"
    );
    assert_eq!(node2.state(), SECOND);
    let verbose = node2.safekit_ok(&format!("state -m {MODULE} -v"));
    assert!(detail(&verbose, "lan repli").starts_with("up"), "{verbose}");
}

#[test]
fn state_survives_kill_9_of_both_agents() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes();
    let node1 = MirrorNode::install(cluster.node(1), &cluster, vip, SECRET);
    let node2 = MirrorNode::install(cluster.node(2), &cluster, vip, SECRET);
    let agent1 = node1.start_agent();
    let agent2 = node2.start_agent();
    first_start(&node1, &node2);
    // node2 stops as SECOND, node1 runs on ALONE then stops: node1 holds the newer data.
    node2.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(ALONE);
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    agent1.kill();
    agent2.kill();

    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();
    assert_eq!(
        node1.state(),
        STOP,
        "a restarted agent starts its modules in STOP"
    );
    node2.safekit_ok(&format!("start -m {MODULE}"));
    wait_until(
        "node2 to wait, not up to date",
        STATE_WAIT,
        Duration::from_millis(50),
        || {
            node2
                .safekit(&format!("state -m {MODULE} -v"))
                .stdout
                .contains("not up to date")
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", node2.diagnostics()));
    node1.safekit_ok(&format!("start -m {MODULE}"));
    node1.wait_state(PRIM);
    node2.wait_state(SECOND);
    wait_client_reaches(cluster.client(), vip, "node1");
}

#[test]
fn an_invalid_module_is_reported_and_not_started_while_the_others_run() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes();
    let node1 = MirrorNode::install(cluster.node(1), &cluster, vip, SECRET);
    let broken = node1.safe.join("modules").join("broken").join("conf");
    std::fs::create_dir_all(&broken).expect("create the broken module");
    std::fs::write(
        broken.join("userconfig.xml"),
        "<safe><service mode=\"mirror\"><heart pulse=\"0ms\"><heartbeat name=\"nosuchlan\"/></heart></service></safe>\n",
    )
    .expect("write the broken userconfig.xml");
    let _agent1 = node1.start_agent();

    let modules = node1.safekit_ok("module list");
    assert!(modules.lines().any(|line| line == MODULE), "{modules}");
    assert!(
        modules.contains("broken (not started: invalid configuration)"),
        "{modules}"
    );
    let output = node1.safekit("start -m broken");
    assert!(!output.success());
    assert_eq!(
        output.stderr.trim().lines().count(),
        1,
        "one line: {}",
        output.stderr
    );
    assert!(
        output.stderr.contains("invalid configuration"),
        "{}",
        output.stderr
    );
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
}

/// The replicated directory of the `<rfs>` scenario.
const REPLICATED: &str = "/replicated/data";

fn mounted_over(node: &Node, dir: &str) -> bool {
    node.run_ok("cat /proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(dir) && line.contains("safekit-rfs"))
}

#[test]
fn with_rfs_the_primary_serves_its_data_through_the_mount_and_releases_it_on_stop() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .private_dir(REPLICATED)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    let rfs = format!(
        r#"<rfs replication_timeout="500ms"><replicated dir="{REPLICATED}" mode="read_only"/></rfs>"#
    );
    let node1 = MirrorNode::install_with(cluster.node(1), &cluster, vip, SECRET, &rfs);
    let node2 = MirrorNode::install_with(cluster.node(2), &cluster, vip, SECRET, &rfs);
    let _agent1 = node1.start_agent();
    let _agent2 = node2.start_agent();

    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    assert!(
        mounted_over(cluster.node(1), REPLICATED),
        "the data path is mounted over {REPLICATED}"
    );
    cluster
        .node(1)
        .run_ok(format!(
            "echo acknowledged > {REPLICATED}/a.txt && sync {REPLICATED}/a.txt"
        ))
        .expect("write through the mount");
    assert_eq!(
        cluster
            .node(1)
            .run_ok(format!("cat {REPLICATED}/a.txt"))
            .expect("read back"),
        "acknowledged\n"
    );
    let verbose = node1.safekit_ok(&format!("state -m {MODULE} -v"));
    assert!(
        detail(&verbose, "replication").starts_with("Alone"),
        "{verbose}"
    );

    // node2 joins: node1 serves the (full) reintegration, then both pair up.
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    node1.wait_state(PRIM);
    assert_eq!(
        std::fs::read_to_string(cluster.node(2).host_path(REPLICATED).join("a.txt"))
            .expect("a.txt was resynchronized to node2"),
        "acknowledged\n"
    );

    // Stopping the primary hands over to the in-sync secondary.
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    node2.wait_state(ALONE);
    assert!(
        !mounted_over(cluster.node(1), REPLICATED),
        "a stopped module leaves no mount"
    );
    assert_eq!(
        std::fs::read_to_string(cluster.node(1).host_path(REPLICATED).join("a.txt"))
            .expect("the file is in the directory itself"),
        "acknowledged\n"
    );
}
