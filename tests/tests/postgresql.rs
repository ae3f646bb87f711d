//! The PostgreSQL module (`modules/postgresql`) through a failover under load.
//!
//! The module's own `userconfig.xml` and scripts are installed on two nodes
//! (only the VIP, the client subnet and the heartbeat timings differ), so
//! this is what an operator would run: node1 `prim` initialises the cluster
//! in the replicated directory and starts PostgreSQL, node2 `start`s and
//! becomes SECOND after a full reintegration. From the client, through the
//! VIP, pgbench runs its TPC-B load while a second loop inserts sequence
//! numbers one transaction at a time and writes down each id whose COMMIT
//! was acknowledged. node1 loses power mid-run (every process killed, cables
//! pulled); node2 goes ALONE and starts PostgreSQL on its copy (crash
//! recovery). Then, through the VIP: every acknowledged id is there, and
//! pgbench's balances add up to its history. node1 reboots and `start`s:
//! SECOND after an incremental reintegration, PostgreSQL not running there.
//! Last, a `swap`: node2's stop_prim shuts PostgreSQL down (fast) and node1
//! serves the same data through the VIP.
//!
//! Needs PostgreSQL's server and client (Debian: `postgresql-15`,
//! `postgresql-client-15`, `postgresql-client-common`; `.ci/run` installs
//! them) and the binaries built in the same target directory:
//! `cargo build -p safekit-agent -p safekit-linux-helper --bins`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use safekit_tests::agents::{
    ALONE, AgentNode, ModuleSpec, PRIM, SECOND, detail, start_agents, wait_for_all,
};
use safekit_tests::{Cluster, Node, require_root, wait_until};

const MODULE: &str = "postgresql";
/// The module's replicated directory (a private directory of each node).
const REPLICATED: &str = "/var/lib/safekit-postgresql";
/// PostgreSQL's socket directory: private to each node, as on two machines.
const SOCKET_DIR: &str = "/run/postgresql";
/// The database, role and password the client uses.
const DB: &str = "bench";
/// Bound of every wait for a state: initdb, a full reintegration of a fresh
/// cluster, crash recovery, on a busy machine.
const STATE_WAIT: Duration = Duration::from_secs(120);
/// How long the load runs before node1 loses power.
const LOAD_BEFORE_CRASH: Duration = Duration::from_secs(8);

/// `modules/postgresql` in the workspace.
fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("modules")
        .join(MODULE)
}

/// pgbench's balances (accounts, tellers, branches), the sum of its
/// history's deltas and the history's length.
const PGBENCH_SUMS: &str = "SELECT (SELECT sum(abalance) FROM pgbench_accounts), \
     (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), \
     (SELECT coalesce(sum(delta), 0) FROM pgbench_history), (SELECT count(*) FROM pgbench_history)";

/// The heartbeat of the test: pulse 200 ms, failover after 3 s of silence
/// (the shipped 700 ms / 30 s would make the test slow). 3 s stays above the
/// default replication timeout (2 s), as the configuration check asks.
const TEST_HEART: &str = r#"<heart pulse="200ms" timeout="3000ms">"#;

/// The shipped `conf/userconfig.xml` for this cluster: the VIP and the
/// client subnet filled in, the heartbeat timings of [`TEST_HEART`];
/// everything else (checkers, `<rfs>`, `<user>` and its variables) as shipped.
fn userconfig(vip: Ipv4Addr, clients: &str) -> String {
    let shipped = std::fs::read_to_string(module_dir().join("conf/userconfig.xml"))
        .expect("read modules/postgresql/conf/userconfig.xml");
    let placeholders = [
        ("VIRTUAL_TO_BE_DEFINED".to_string(), vip.to_string()),
        (
            r#"<var name="PG_CLIENTS" value=""/>"#.to_string(),
            format!(r#"<var name="PG_CLIENTS" value="{clients}"/>"#),
        ),
        (
            r#"<heart pulse="700" timeout="30000">"#.to_string(),
            TEST_HEART.to_string(),
        ),
    ];
    placeholders
        .iter()
        .fold(shipped, |config, (placeholder, value)| {
            assert!(
                config.contains(placeholder.as_str()),
                "the shipped userconfig.xml has {placeholder}"
            );
            config.replace(placeholder.as_str(), value)
        })
}

/// Installs the module on node1 and node2: the harness's installation (its
/// `cluster.xml` names the LAN `default`, as the shipped heartbeat does), the
/// shipped scripts of `bin/`, and [`userconfig`].
fn install<'c>(cluster: &'c Cluster, vip: Ipv4Addr, clients: &str) -> [AgentNode<'c>; 2] {
    let mut spec = ModuleSpec::new(MODULE).state_wait(STATE_WAIT);
    for entry in std::fs::read_dir(module_dir().join("bin")).expect("list the module's bin/") {
        let path = entry.expect("read bin/").path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .expect("script names are UTF-8")
            .to_string();
        let content = std::fs::read_to_string(&path).expect("read a script");
        spec = spec.script(name, content);
    }
    let nodes: [AgentNode<'c>; 2] = spec.install_on(cluster);
    let config = userconfig(vip, clients);
    for node in &nodes {
        let path = node
            .safe_dir()
            .join("modules")
            .join(MODULE)
            .join("conf")
            .join("userconfig.xml");
        std::fs::write(&path, &config)
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
        let folder = path
            .parent()
            .and_then(Path::parent)
            .expect("the module folder");
        node.safekit_ok(&format!("config check {}", folder.display()));
    }
    nodes
}

/// Runs `sql` with psql inside `node` as root through the VIP (as the
/// client's role) and returns its unaligned output.
fn psql(node: &Node, vip: Ipv4Addr, sql: &str) -> String {
    node.run_ok(format!(
        "PGPASSWORD={DB} psql -X -q -At -v ON_ERROR_STOP=1 -h {vip} -U {DB} -d {DB} -c \"{sql}\""
    ))
    .unwrap_or_else(|error| panic!("{}: psql {sql}: {error}", node.name()))
    .trim()
    .to_string()
}

/// Waits until the node's module is Ready in `state -v` (its start_prim returned).
fn wait_ready(node: &AgentNode<'_>) {
    node.wait_for("readiness Ready (start_prim done)", || {
        detail(&node.verbose_unchecked(), "readiness") == "Ready"
    });
}

/// Whether PostgreSQL (a process called `postgres`) runs in the node.
fn postgres_runs(node: &AgentNode<'_>) -> bool {
    node.node()
        .run("pgrep -x postgres")
        .expect("run pgrep")
        .success()
}

/// The client's loop: one INSERT per connection and transaction through the
/// VIP, until the file `stop` exists; each id whose COMMIT was acknowledged
/// (psql exited 0) is appended to `acked` with the time it was acknowledged.
fn insert_loop(vip: Ipv4Addr, dir: &Path) -> String {
    let (acked, stop) = (dir.join("acked"), dir.join("stop"));
    format!(
        "export PGPASSWORD={DB} PGCONNECT_TIMEOUT=2; i=0; \
         while [ ! -e {stop} ]; do i=$((i + 1)); \
           if psql -X -q -h {vip} -U {DB} -d {DB} -c \"INSERT INTO acked VALUES ($i)\" 2>/dev/null; \
           then echo \"$i $(date +%s.%N)\" >> {acked}; else sleep 0.05; fi; \
         done",
        stop = stop.display(),
        acked = acked.display()
    )
}

/// The acknowledged ids and the time (s since the epoch) of each acknowledgement.
fn read_acked(path: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (id, time) = line.split_once(' ')?;
            Some((id.parse().ok()?, time.parse().ok()?))
        })
        .collect()
}

fn epoch_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

#[test]
fn every_acknowledged_commit_survives_a_crash_of_the_primary_under_pgbench_load() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    let servers = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|entry| entry.path().join("bin/pg_ctl").exists())
        })
        .unwrap_or(false);
    assert!(
        servers && Path::new("/usr/bin/pgbench").exists() && Path::new("/usr/bin/psql").exists(),
        "PostgreSQL is not installed: apt-get install postgresql-15 postgresql-client-15 postgresql-client-common"
    );
    let started = Instant::now();
    let cluster = Cluster::builder()
        .nodes(2)
        .client(true)
        .private_dir(REPLICATED)
        .private_dir(SOCKET_DIR)
        .build()
        .expect("build the cluster");
    let vip = cluster.spare_addr(0, 0);
    let (network, prefix) = cluster.subnet(0);
    let [node1, node2] = install(&cluster, vip, &format!("{network}/{prefix}"));
    let _agents = start_agents([&node1, &node2]);
    let client = cluster.client();

    // node1 `prim`: start_prim initialises the cluster (initdb) and starts PostgreSQL.
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    wait_ready(&node1);
    assert!(postgres_runs(&node1), "{}", node1.diagnostics());
    assert!(
        node1
            .module_log()
            .contains("initialising a new cluster (initdb)"),
        "{}",
        node1.diagnostics()
    );
    // The client's role and database, created locally as postgres (peer authentication).
    node1.run_in(
        "/",
        &format!(
            "runuser -u postgres -- psql -X -q -h {SOCKET_DIR} -v ON_ERROR_STOP=1 \
             -c \"CREATE ROLE {DB} LOGIN PASSWORD '{DB}'\" -c \"CREATE DATABASE {DB} OWNER {DB}\""
        ),
    );

    // node2 `start`: full reintegration of the data directory, then SECOND.
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok(&format!("start -m {MODULE}"));
    node2.wait_state(SECOND);
    wait_for_all(&[&node1, &node2], "node1 PRIM", || node1.state() == PRIM);
    assert!(
        !postgres_runs(&node2),
        "PostgreSQL runs on the SECOND\n{}",
        node2.diagnostics()
    );
    let joined = started.elapsed();

    // From the client, through the VIP: pgbench's tables and the acknowledged-ids table.
    client
        .run_timeout(
            format!("PGPASSWORD={DB} pgbench -q -i -s 1 -h {vip} -U {DB} {DB}"),
            STATE_WAIT,
        )
        .map(|output| assert!(output.success(), "pgbench -i: {}", output.stderr))
        .expect("run pgbench -i");
    psql(client, vip, "CREATE TABLE acked (id bigint PRIMARY KEY)");

    // The load: pgbench with 4 clients, and the loop of acknowledged inserts.
    let work = client.state_dir();
    std::fs::create_dir_all(&work).expect("create the client's directory");
    let pgbench = client
        .spawn(format!(
            "PGPASSWORD={DB} exec timeout 120 pgbench -n -c 4 -j 2 -T 60 -h {vip} -U {DB} {DB}"
        ))
        .expect("spawn pgbench");
    let inserts = client
        .spawn(insert_loop(vip, &work))
        .expect("spawn the insert loop");
    std::thread::sleep(LOAD_BEFORE_CRASH);

    // Power cut of node1 mid-run.
    assert!(
        pgbench.is_alive() && inserts.is_alive(),
        "the load runs until the crash: pgbench {}",
        pgbench.output()
    );
    let acked_before_crash = read_acked(&work.join("acked")).len();
    let crash_time = epoch_seconds();
    let crashed = Instant::now();
    cluster.node(1).crash().expect("crash node1");
    node2.wait_state(ALONE);
    wait_ready(&node2);
    let failover = crashed.elapsed();
    assert!(postgres_runs(&node2), "{}", node2.diagnostics());
    // node2's PostgreSQL started from a copy of a server that was never shut
    // down: its log shows crash recovery.
    let server_log = std::fs::read_to_string(node2.module_var_dir().join("postgresql.log"))
        .expect("read node2's postgresql.log");
    assert!(
        server_log.contains("automatic recovery in progress"),
        "{server_log}"
    );
    for line in server_log.lines().filter(|line| {
        line.contains("redo") || line.contains("checkpoint") || line.contains("ready to accept")
    }) {
        eprintln!("node2's postgresql.log: {line}");
    }
    // The inserts go on through the VIP, now to node2's PostgreSQL.
    wait_until(
        "an insert acknowledged by node2",
        STATE_WAIT,
        Duration::from_millis(100),
        || {
            read_acked(&work.join("acked"))
                .last()
                .is_some_and(|(_, time)| *time > crash_time)
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", node2.diagnostics()));
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(work.join("stop"), "").expect("stop the insert loop");
    inserts
        .wait(Duration::from_secs(30))
        .expect("the insert loop stops");
    pgbench.kill();

    // Every acknowledged id is on node2, read through the VIP.
    let acked = read_acked(&work.join("acked"));
    let present: BTreeSet<u64> = psql(client, vip, "SELECT id FROM acked ORDER BY id")
        .lines()
        .map(|line| line.parse().expect("an id"))
        .collect();
    let missing: Vec<u64> = acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged ids missing after failover: {missing:?} ({} acknowledged, {} present)",
        acked.len(),
        present.len()
    );
    let interruption = acked
        .windows(2)
        .filter(|pair| pair[0].1 <= crash_time && pair[1].1 > crash_time)
        .map(|pair| pair[1].1 - pair[0].1)
        .next()
        .expect("acknowledgements before and after the crash");

    // pgbench's own invariants: every transaction updated an account, a
    // teller and a branch by its delta and recorded it in the history, in one
    // transaction; after crash recovery the balances still add up.
    let sums = psql(client, vip, PGBENCH_SUMS);
    let numbers: Vec<i64> = sums
        .split('|')
        .map(|number| number.parse().expect("a number"))
        .collect();
    assert!(
        numbers[0] == numbers[3] && numbers[1] == numbers[3] && numbers[2] == numbers[3],
        "pgbench's balances (accounts, tellers, branches) differ from its history's deltas: {sums}"
    );
    assert!(numbers[4] > 0, "pgbench ran no transaction: {sums}");
    // pgbench counts the transactions it saw committed: all are in the history.
    let pgbench_output = pgbench.output();
    let processed: Option<i64> = pgbench_output
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|number| number.parse().ok());
    if let Some(processed) = processed {
        assert!(
            numbers[4] >= processed,
            "pgbench saw {processed} transactions committed, the history holds {}",
            numbers[4]
        );
    }

    // Failback: node1 reboots and `start`s: incremental reintegration, SECOND,
    // PostgreSQL not running there; node2 PRIM.
    cluster.node(1).reboot().expect("reboot node1");
    let _agent1_again = node1.start_agent();
    let rejoin = Instant::now();
    node1.safekit_ok(&format!("start -m {MODULE}"));
    node1.wait_state(SECOND);
    wait_for_all(&[&node1, &node2], "node2 PRIM", || node2.state() == PRIM);
    let failback = rejoin.elapsed();
    let log2 = node2.module_log();
    assert!(
        log2.contains("Reintegration of node1 served from this node (incremental"),
        "{}",
        node2.diagnostics()
    );
    if let Some(stats) = log2
        .lines()
        .rfind(|line| line.contains("Reintegration served in"))
    {
        eprintln!("node2's module log: {stats}");
    }
    assert!(
        !postgres_runs(&node1),
        "PostgreSQL runs on the SECOND\n{}",
        node1.diagnostics()
    );
    // Still serving through the VIP, with the data.
    assert_eq!(
        psql(client, vip, "SELECT count(*) FROM acked"),
        present.len().to_string()
    );

    // swap: node2's stop_prim shuts PostgreSQL down (fast), node1 starts it
    // on its reintegrated copy; the data follows through the VIP.
    node2.safekit_ok(&format!("swap -m {MODULE}"));
    node1.wait_state(PRIM);
    node2.wait_state(SECOND);
    wait_ready(&node1);
    assert!(
        node2
            .module_log()
            .contains("stop_prim: PostgreSQL stopped (fast shutdown)"),
        "{}",
        node2.diagnostics()
    );
    assert!(postgres_runs(&node1), "{}", node1.diagnostics());
    assert!(!postgres_runs(&node2), "{}", node2.diagnostics());
    assert_eq!(
        psql(client, vip, "SELECT count(*) FROM acked"),
        present.len().to_string()
    );
    // node1's copy, reintegrated incrementally, holds the same pgbench data.
    assert_eq!(psql(client, vip, PGBENCH_SUMS), sums);

    eprintln!(
        "postgresql: {} ids acknowledged ({acked_before_crash} before the crash), {} present on node2, none missing; \
         pgbench history {} transactions (pgbench saw {processed:?} committed), balances consistent",
        acked.len(),
        present.len(),
        numbers[4]
    );
    eprintln!(
        "timings: node1 alone + node2 joined {:.1} s, failover to ALONE (PostgreSQL recovered) {:.2} s, \
         client-visible interruption (last ack before the crash to first after) {interruption:.2} s, \
         failback (incremental) to PRIM/SECOND {:.2} s, whole test {:.1} s",
        joined.as_secs_f64(),
        failover.as_secs_f64(),
        failback.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
