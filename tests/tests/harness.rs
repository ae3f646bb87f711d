//! Tests of the namespace harness itself: what every scenario test relies on.
//!
//! They need root; they run in parallel (each builds its own cluster).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use safekit_tests::{
    Cluster, HarnessError, Node, leftovers, require_root, wait_until, with_timeout,
};

/// Whether one ping from `from` to `to` gets an answer.
fn ping(from: &Node, to: std::net::Ipv4Addr) -> bool {
    from.run(format!("ping -c1 -W1 {to}"))
        .expect("run ping")
        .success()
}

/// The number of ICMP echo requests the node's kernel has received so far.
fn echo_requests_received(node: &Node) -> u64 {
    let snmp = node
        .run_ok("cat /proc/net/snmp")
        .expect("read /proc/net/snmp");
    let mut icmp_lines = snmp.lines().filter(|line| line.starts_with("Icmp:"));
    let names = icmp_lines.next().expect("Icmp header line");
    let values = icmp_lines.next().expect("Icmp values line");
    let column = names
        .split_whitespace()
        .position(|name| name == "InEchos")
        .expect("InEchos column");
    values
        .split_whitespace()
        .nth(column)
        .expect("InEchos value")
        .parse()
        .expect("InEchos is a number")
}

fn wait_for_ping(from: &Node, to: std::net::Ipv4Addr) {
    wait_until(
        &format!("{} to reach {to}", from.name()),
        Duration::from_secs(15),
        Duration::from_millis(100),
        || ping(from, to),
    )
    .expect("ping succeeds again");
}

#[test]
fn two_nodes_and_a_client_ping_each_other_across_the_bridge() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .build()
        .expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    let client = cluster.client();

    assert!(ping(node1, node2.addr(0)), "node1 reaches node2");
    assert!(ping(node2, node1.addr(0)), "node2 reaches node1");
    assert!(ping(client, node1.addr(0)), "the client reaches node1");
    assert!(ping(client, node2.addr(0)), "the client reaches node2");

    assert_eq!(node1.run_ok("hostname").expect("hostname").trim(), "node1");
    assert_eq!(node2.run_ok("hostname").expect("hostname").trim(), "node2");
    assert_eq!(
        client.run_ok("hostname").expect("hostname").trim(),
        "client"
    );
    let addresses = node1
        .run_ok("ip -4 -o addr show dev eth0")
        .expect("ip addr");
    assert!(
        addresses.contains(&format!("{}/24", node1.addr(0))),
        "node1's eth0 has its address: {addresses}"
    );
    // The host's own network namespace holds none of the cluster's interfaces.
    let host_links = std::fs::read_dir("/sys/class/net")
        .expect("list host interfaces")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect::<Vec<_>>();
    for name in ["br0", "n1l0", "n2l0", "cl0"] {
        assert!(
            !host_links.contains(&name.to_owned()),
            "{name} is not on the host"
        );
    }
}

#[test]
fn the_same_path_holds_different_files_in_each_node() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .private_dir("/replicated/data")
        .build()
        .expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    let file = format!("/replicated/data/{}.txt", cluster.id());

    node1
        .run_ok(format!("echo one > {file}"))
        .expect("write on node1");
    node2
        .run_ok(format!("echo two > {file}"))
        .expect("write on node2");

    assert_eq!(
        node1.run_ok(format!("cat {file}")).expect("read on node1"),
        "one\n"
    );
    assert_eq!(
        node2.run_ok(format!("cat {file}")).expect("read on node2"),
        "two\n"
    );
    assert_eq!(
        std::fs::read_to_string(node1.host_path(&file)).expect("node1's backing file"),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(node2.host_path(&file)).expect("node2's backing file"),
        "two\n"
    );
    assert!(
        !std::path::Path::new(&file).exists(),
        "the host's own {file} is untouched"
    );
    // Each node's state, config and log directories are distinct host directories.
    assert_ne!(node1.state_dir(), node2.state_dir());
    assert!(node1.state_dir().is_dir() && node1.config_dir().is_dir() && node1.log_dir().is_dir());
}

#[test]
fn a_cut_link_stops_traffic_and_a_restored_link_carries_it_again() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(2).build().expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    assert!(
        ping(node1, node2.addr(0)),
        "node1 reaches node2 before the cut"
    );

    cluster.link_down(node2, 0).expect("link down");
    assert!(!ping(node1, node2.addr(0)), "node1 no longer reaches node2");
    assert_eq!(
        node2
            .run_ok("cat /sys/class/net/eth0/carrier")
            .expect("carrier")
            .trim(),
        "0",
        "node2 sees no carrier on eth0"
    );

    cluster.link_up(node2, 0).expect("link up");
    wait_for_ping(node1, node2.addr(0));
    assert_eq!(
        node2
            .run_ok("cat /sys/class/net/eth0/carrier")
            .expect("carrier")
            .trim(),
        "1"
    );
}

#[test]
fn a_two_way_partition_separates_two_nodes_only() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .lans(2)
        .client(true)
        .build()
        .expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    let client = cluster.client();

    cluster.partition(node1, node2).expect("partition");
    for lan in 0..2 {
        assert!(
            !ping(node1, node2.addr(lan)),
            "node1 -> node2 cut on LAN {lan}"
        );
        assert!(
            !ping(node2, node1.addr(lan)),
            "node2 -> node1 cut on LAN {lan}"
        );
    }
    assert!(
        ping(client, node1.addr(0)),
        "the client still reaches node1"
    );
    assert!(
        ping(client, node2.addr(0)),
        "the client still reaches node2"
    );

    cluster.heal().expect("heal");
    for lan in 0..2 {
        wait_for_ping(node1, node2.addr(lan));
        wait_for_ping(node2, node1.addr(lan));
    }
}

#[test]
fn a_one_way_partition_drops_one_direction_only() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .lans(2)
        .build()
        .expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);

    cluster
        .partition_one_way(node1, node2)
        .expect("partition node1 -> node2");
    for lan in 0..2 {
        // node2's echo requests reach node1 (node1's replies do not come back).
        let before = echo_requests_received(node1);
        assert!(
            !ping(node2, node1.addr(lan)),
            "node2 gets no reply on LAN {lan}"
        );
        assert_eq!(
            echo_requests_received(node1),
            before + 1,
            "node2's request reached node1 on LAN {lan}"
        );
        // node1's echo requests never reach node2.
        let before = echo_requests_received(node2);
        assert!(
            !ping(node1, node2.addr(lan)),
            "node1 gets no reply on LAN {lan}"
        );
        assert_eq!(
            echo_requests_received(node2),
            before,
            "node1's request did not reach node2 on LAN {lan}"
        );
    }

    cluster.heal().expect("heal");
    for lan in 0..2 {
        wait_for_ping(node1, node2.addr(lan));
        wait_for_ping(node2, node1.addr(lan));
    }
}

#[test]
fn spawned_processes_log_their_output_and_die_by_kill_minus_9() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(1).build().expect("build cluster");
    let node = cluster.node(1);

    let talker = node
        .spawn("echo started on $(hostname); exec sleep 1000")
        .expect("spawn");
    wait_until(
        "the process to write its first line",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || talker.output().contains("started on node1"),
    )
    .expect("output in the log file");
    assert!(talker.log_path().starts_with(node.log_dir()));
    assert!(talker.is_alive());
    talker.kill();
    let status = talker
        .wait(Duration::from_secs(10))
        .expect("exits after kill -9");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    assert!(!talker.is_alive());

    // A node crash: every process dies, including children started in the background.
    let parent = node
        .spawn("sleep 1000 & sleep 1001 & wait")
        .expect("spawn a parent with children");
    wait_until(
        "the children to start",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || node.pids().len() >= 3,
    )
    .expect("three processes in the node");
    node.kill_all().expect("kill every process of the node");
    assert!(
        cluster.logs().contains("started on node1"),
        "the logs printed on failure hold what the processes wrote"
    );
    assert!(!parent.is_alive());
    assert_eq!(
        node.pids(),
        Vec::<u32>::new(),
        "no process left in the node"
    );

    // The node still works after the crash.
    assert_eq!(
        node.run_ok("echo alive").expect("run after kill_all"),
        "alive\n"
    );
}

#[test]
fn run_reports_failures_and_bounds_the_time_a_command_takes() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(1).build().expect("build cluster");
    let node = cluster.node(1);

    let output = node.run("echo out; echo err >&2; exit 3").expect("run");
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(output.stdout, "out\n");
    assert_eq!(output.stderr, "err\n");
    let error = node
        .run_ok("echo nope >&2; false")
        .expect_err("run_ok fails");
    assert!(error.to_string().contains("nope"), "{error}");

    // A background child holding stdout open does not keep `run` waiting.
    let output = node.run("sleep 1000 & echo parent done").expect("run");
    assert_eq!(output.stdout, "parent done\n");

    let error = node
        .run_timeout("sleep 1000", Duration::from_millis(300))
        .expect_err("times out");
    assert!(matches!(error, HarnessError::Timeout { .. }), "{error}");
    // Only the background `sleep 1000` started above is left: the timed-out one was killed.
    assert_eq!(
        node.pids().len(),
        1,
        "processes left in the node: {:?}",
        node.pids()
    );
}

#[test]
fn wait_until_and_with_timeout_give_up_at_their_bound() {
    let mut polls = 0;
    let error = wait_until(
        "never",
        Duration::from_millis(50),
        Duration::from_millis(10),
        || {
            polls += 1;
            false
        },
    )
    .expect_err("the condition never holds");
    assert!(matches!(error, HarnessError::Timeout { .. }), "{error}");
    assert!(
        polls <= 7,
        "polls are bounded by timeout / interval + 2: {polls}"
    );

    let mut countdown = 3;
    wait_until(
        "countdown",
        Duration::from_secs(10),
        Duration::from_millis(1),
        || {
            countdown -= 1;
            countdown == 0
        },
    )
    .expect("the condition holds on the third poll");

    assert_eq!(
        with_timeout("quick work", Duration::from_secs(10), || 42).expect("finishes"),
        42
    );
    let error = with_timeout("slow work", Duration::from_millis(20), || {
        std::thread::sleep(Duration::from_secs(5))
    })
    .expect_err("too slow");
    assert!(matches!(error, HarnessError::Timeout { .. }), "{error}");

    let error = safekit_tests::workspace_bin("no-such-binary").expect_err("not built");
    assert!(error.to_string().contains("not built"), "{error}");
}

#[test]
fn nothing_is_left_after_the_cluster_is_dropped() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .lans(2)
        .client(true)
        .private_dir("/replicated/data")
        .build()
        .expect("build cluster");
    let id = cluster.id().to_owned();
    cluster.node(1).spawn("sleep 1000").expect("spawn");
    // A daemon that leaves the process group of what was spawned.
    cluster
        .node(2)
        .run_ok("setsid sleep 1001 > /dev/null 2>&1 < /dev/null &")
        .expect("start a daemon");
    cluster
        .partition(cluster.node(1), cluster.node(2))
        .expect("partition");

    let alive = leftovers(&id);
    assert!(
        alive
            .iter()
            .any(|item| item.starts_with("network namespace")),
        "leftovers() sees the live cluster's namespaces: {alive:?}"
    );
    assert!(
        alive.iter().any(|item| item.contains("sleep 1001")),
        "leftovers() sees the daemon: {alive:?}"
    );

    drop(cluster);
    assert_eq!(leftovers(&id), Vec::<String>::new());
}

#[test]
fn a_panicking_test_body_still_cleans_up() {
    if !require_root() {
        return;
    }
    let id = Arc::new(Mutex::new(String::new()));
    let id_in_body = Arc::clone(&id);
    let outcome = std::panic::catch_unwind(move || {
        let cluster = Cluster::builder()
            .nodes(2)
            .private_dir("/replicated/data")
            .build()
            .expect("build cluster");
        *id_in_body.lock().expect("id lock") = cluster.id().to_owned();
        cluster
            .node(1)
            .spawn("echo this line is printed with the failure; exec sleep 1000")
            .expect("spawn");
        panic!("deliberate failure inside a test body");
    });
    assert!(outcome.is_err(), "the body panicked");
    let id = id.lock().expect("id lock").clone();
    assert!(!id.is_empty(), "the cluster was built before the panic");
    assert_eq!(leftovers(&id), Vec::<String>::new());
}

#[test]
fn each_node_sees_only_its_own_processes() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(2).build().expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    let app1 = node1.spawn("exec sleep 1234").expect("spawn on node1");
    let app2 = node2.spawn("exec sleep 1234").expect("spawn on node2");
    wait_until(
        "both sleeps to run",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            node1
                .run_ok("pgrep -x sleep")
                .is_ok_and(|pids| pids.lines().count() == 1)
                && node2
                    .run_ok("pgrep -x sleep")
                    .is_ok_and(|pids| pids.lines().count() == 1)
        },
    )
    .expect("each node sees its own sleep, nothing else");

    // A stop script's `pkill` on node1 does not touch node2.
    node1
        .run_ok("pkill -x -f 'sleep 1234'")
        .expect("pkill on node1");
    app1.wait(Duration::from_secs(10))
        .expect("node1's sleep ended");
    assert!(app2.is_alive(), "node2's sleep survives node1's pkill");
}

#[test]
fn terminate_lets_a_process_stop_cleanly() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(1).build().expect("build cluster");
    let node = cluster.node(1);
    let app = node
        .spawn("trap 'echo stopping cleanly; exit 0' TERM; echo ready; sleep 1000 & wait")
        .expect("spawn");
    wait_until(
        "the process to be ready",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || app.output().contains("ready"),
    )
    .expect("ready");
    app.terminate();
    let status = app
        .wait(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "its own exit status: {status}");
    assert!(
        app.output().contains("stopping cleanly"),
        "{}",
        app.output()
    );
}

#[test]
fn a_crashed_node_is_silent_and_a_rebooted_one_starts_clean() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .private_dir("/replicated/data")
        .build()
        .expect("build cluster");
    let node2 = cluster.node(2);
    let client = cluster.client();
    let vip = cluster.spare_addr(0, 0);
    node2
        .run_ok("echo kept > /replicated/data/file")
        .expect("write a file");
    // What an agent leaves behind: a virtual IP, a mount over the replicated directory, a process.
    node2
        .run_ok(format!("ip addr add {vip}/24 dev eth0"))
        .expect("add the VIP");
    node2
        .run_ok("mount -t tmpfs none /replicated/data")
        .expect("mount over");
    let agent = node2.spawn("exec sleep 1000").expect("spawn");
    assert!(ping(client, vip), "the client reaches the VIP");

    node2.crash().expect("crash node2");
    assert!(!agent.is_alive());
    assert!(
        !ping(client, vip),
        "a crashed node does not answer on the VIP"
    );
    assert!(!ping(client, node2.addr(0)), "nor on its own address");

    node2.reboot().expect("reboot node2");
    wait_for_ping(client, node2.addr(0));
    assert!(!ping(client, vip), "the VIP is gone after the reboot");
    assert_eq!(
        node2
            .run_ok("cat /replicated/data/file")
            .expect("read after reboot"),
        "kept\n",
        "the mount over the directory is gone, its files are back"
    );
    assert_eq!(node2.run_ok("hostname").expect("hostname").trim(), "node2");
    assert_eq!(
        node2.pids(),
        Vec::<u32>::new(),
        "no process survives the reboot"
    );
}

#[test]
fn nodes_can_be_driven_from_several_threads_at_once() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(3).build().expect("build cluster");
    std::thread::scope(|scope| {
        let workers: Vec<_> = cluster
            .nodes()
            .iter()
            .map(|node| {
                let cluster = &cluster;
                scope.spawn(move || {
                    (0..5)
                        .map(|_| {
                            node.run_ok("hostname").expect("hostname").trim().to_owned()
                                + &ping(node, cluster.node(1).addr(0)).to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (index, worker) in workers.into_iter().enumerate() {
            let answers = worker.join().expect("worker");
            assert_eq!(answers, vec![format!("node{}true", index + 1); 5]);
        }
    });
}

#[test]
fn a_sized_private_directory_fills_up() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .private_dir_sized("/replicated/small", 1024 * 1024)
        .build()
        .expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    let id = cluster.id().to_owned();

    let full = node1
        .run("dd if=/dev/zero of=/replicated/small/big bs=64k count=32")
        .expect("run dd");
    assert!(!full.success(), "2 MiB do not fit in 1 MiB");
    assert!(
        full.stderr.contains("No space left on device"),
        "{}",
        full.stderr
    );
    // node2's disk is its own: still empty.
    node2
        .run_ok("dd if=/dev/zero of=/replicated/small/half bs=64k count=8")
        .expect("512 KiB fit on node2");
    assert_eq!(
        std::fs::metadata(node2.host_path("/replicated/small/half"))
            .expect("node2's file, seen from the host")
            .len(),
        512 * 1024
    );

    // The data survives a reboot, and the disk is unmounted with the cluster.
    node2.reboot().expect("reboot");
    node2
        .run_ok("test -s /replicated/small/half")
        .expect("the file is still there");
    drop(cluster);
    assert_eq!(leftovers(&id), Vec::<String>::new());
}

#[test]
fn private_directories_that_would_hide_the_harness_are_refused() {
    for bad in ["relative/dir", "/", "/proc/x", "/a/../b"] {
        let error = Cluster::builder()
            .private_dir(bad)
            .build()
            .expect_err("refused");
        assert!(
            error.to_string().contains("private directory"),
            "{bad}: {error}"
        );
    }
    let error = Cluster::builder()
        .private_dir(std::env::temp_dir())
        .build()
        .expect_err("refused");
    assert!(error.to_string().contains("would hide"), "{error}");
}

#[test]
fn a_cluster_that_fails_half_way_through_its_build_leaves_nothing() {
    if !require_root() {
        return;
    }
    // The mount point cannot be created: /etc/hostname is a file. This fails
    // while booting node1, after the switch, node1's namespace and its anchor exist.
    let error = Cluster::builder()
        .nodes(2)
        .private_dir("/etc/hostname/data")
        .build()
        .expect_err("the build fails");
    let HarnessError::Build { id, source } = error else {
        panic!("not a build error: {error}");
    };
    assert!(
        source.to_string().contains("/etc/hostname/data"),
        "{source}"
    );
    assert_eq!(leftovers(&id), Vec::<String>::new());
}

#[test]
fn a_rate_limited_link_drops_a_flood_and_a_cleared_one_does_not() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(2).build().expect("build cluster");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    let flood = format!("ping -f -c 100 -s 1000 -W 1 {}", node2.addr(0));
    let received = |output: &safekit_tests::Output| -> u32 {
        // "100 packets transmitted, 37 received, ..."
        output
            .stdout
            .split(", ")
            .find_map(|part| part.strip_suffix(" received"))
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("no ping summary in {output:?}"))
    };

    node2
        .limit_rate(0, 64)
        .expect("limit node2's link to 64 kbit/s");
    let limited = node1.run(&flood).expect("flood through the limit");
    assert!(
        received(&limited) < 100,
        "64 kbit/s cannot carry a flood of 1 KB pings: {}",
        limited.stdout
    );

    node2.clear_rate_limit(0).expect("clear the limit");
    let free = node1.run(&flood).expect("flood without limit");
    assert_eq!(received(&free), 100, "{}", free.stdout);
}

#[test]
fn orphans_of_a_node_are_reaped_by_its_init() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder().nodes(1).build().expect("build cluster");
    let node = cluster.node(1);
    // A start script that backgrounds a daemon and exits leaves the daemon to
    // the node's init; when the daemon dies it must not stay a zombie.
    node.run_ok("sh -c 'sleep 0.2 &' ; exit 0")
        .expect("start an orphan");
    wait_until(
        "the orphan to exit and be reaped",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            node.run_ok("ps -eo stat=,comm=").is_ok_and(|ps| {
                !ps.lines().any(|l| l.trim_start().starts_with('Z')) && !ps.contains("sleep")
            })
        },
    )
    .expect("no zombie left in the node");
}
