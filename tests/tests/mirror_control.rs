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

use safekit_tests::agents::{
    ALONE, DEFAULT_STATE_WAIT as STATE_WAIT, ModuleSpec, PRIM, SECOND, STOP, WAIT, WHOAMI_PORT,
    client_reaches, detail, first_start, start_agents, wait_client_reaches, wait_one_primary,
};
use safekit_tests::{Cluster, Node, NodeProcess, require_root, wait_until};

const MODULE: &str = "mirror";
/// Heartbeat port of module id 1 (8888 + id - 1).
const HEART_PORT: u16 = 8888;

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

/// The module of these tests: the virtual IP `vip`, the web server's
/// scripts, and `extra` XML inside `<service>`.
fn module(vip: Ipv4Addr, extra: &str) -> ModuleSpec {
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
  <user nicestoptimeout="10" forcestoptimeout="10" logging="userlog"/>"#
        ))
        .config(extra)
        .script("start_prim", START_PRIM)
        .script("stop_prim", STOP_PRIM)
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

#[test]
fn first_start_then_failover_on_kill_9_moves_the_vip_and_the_application() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes();
    let ([node1, node2], _agents) = module(vip, "").start_on(&cluster);
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
                "exec python3 {} {vip} {WHOAMI_PORT} {}",
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
    let ([node1, node2], _agents) = module(vip, "").start_pair(&cluster);
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
    node2.wait_for("say why it waits", || {
        node2.verbose_unchecked().contains("not up to date")
    });
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
    let ([node1, node2], _agents) = module(vip, "").start_pair(&cluster);

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
    node1.wait_for("log the forged heartbeat", || {
        node1.log().contains("Heartbeat refused")
    });
    let log1 = node1.log();
    assert!(log1.contains("authentication failed"), "{log1}");
    assert_eq!(node1.state(), PRIM, "a forged heartbeat changes nothing");
    assert_eq!(node2.state(), SECOND);

    // A non-root local user cannot use the admin socket.
    let output = cluster
        .node(1)
        .run(format!(
            "SAFEVAR={} setpriv --reuid=65534 --regid=65534 --clear-groups {}/safekit stop -m {MODULE}",
            node1.var_dir().display(),
            node1.safe_dir().display()
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
    let ([node1, node2], _agents) = module(vip, "").start_pair(&cluster);
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
    let (winner, loser) = wait_one_primary(&node1, &node2);
    let loser_log = loser.log();
    assert!(
        loser_log.contains("Split brain recovery"),
        "the losing side says what it did: {loser_log}"
    );
    wait_client_reaches(cluster.client(), vip, winner.name());
}

#[test]
fn losing_only_the_production_lan_keeps_prim_and_second() {
    if !require_root() {
        return;
    }
    let (cluster, vip) = two_nodes_on(2);
    let ([node1, node2], _agents) = module(vip, "").start_pair(&cluster);

    cluster
        .link_down(cluster.node(1), 0)
        .expect("cut node1's production link");
    for node in [&node1, &node2] {
        node.wait_for("report the production LAN down", || {
            detail(&node.verbose_unchecked(), "lan default").starts_with("down")
        });
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
    let ([node1, node2], [agent1, agent2]) = module(vip, "").start_pair(&cluster);
    // node2 stops as SECOND, node1 runs on ALONE then stops: node1 holds the newer data.
    node2.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(ALONE);
    node1.safekit_ok(&format!("stop -m {MODULE}"));
    node1.wait_state(STOP);
    agent1.kill();
    agent2.kill();

    let _agents = start_agents([&node1, &node2]);
    assert_eq!(
        node1.state(),
        STOP,
        "a restarted agent starts its modules in STOP"
    );
    node2.safekit_ok(&format!("start -m {MODULE}"));
    node2.wait_for("wait, not up to date", || {
        node2.verbose_unchecked().contains("not up to date")
    });
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
    let [node1] = module(vip, "").install_on(&cluster);
    let broken = node1.safe_dir().join("modules").join("broken").join("conf");
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
    let ([node1, node2], _agents) = module(vip, &rfs).start_on(&cluster);

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
