//! Mirror replication end to end: two nodes with `<rfs>` pair up, replicate
//! live, fail over and reintegrate, checked as an operator would.
//!
//! node1 `prim` with data (ALONE, FUSE mount over the replicated directory,
//! changes recorded in the dirty log), node2 `second`: node1 serves node2's
//! reintegration through its replication stream (a full one the first time),
//! then node2 is SECOND and node1 PRIM. Writes on node1 are then on node2 when
//! they return. node1 loses power: node2 takes over ALONE with every
//! acknowledged write. node1 reboots and `start`s: node2 serves an incremental
//! reintegration and node1 becomes SECOND with the same tree.
//!
//! Trees are compared inside each node: type, path, mode, owner and symlink
//! target of every entry, and the SHA-256 of every regular file. The binaries
//! must be built first: `cargo build -p safekit-agent --bins` (same target
//! directory).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use safekit_tests::agents::{
    ALONE, AgentNode, ModuleSpec, PRIM, SECOND, assert_same_tree, wait_for_all, wait_one_primary,
};
use safekit_tests::{Cluster, require_root, wait_until};

const MODULE: &str = "mirror";
/// The replicated directory (a private directory of each node).
const REPLICATED: &str = "/replicated/data";
/// `reiallowedbw`: the first (full) reintegration of about 6 MiB lasts about 3 s,
/// long enough to watch its progress in `safekit state -v` on both nodes.
const RESYNC_KBPS: u32 = 2048;
/// Bound of every wait for a state: failover with timeout 1 s, a resync of a few MiB, a slow machine.
const STATE_WAIT: Duration = Duration::from_secs(60);

/// The module of these tests: `<rfs>` over [`REPLICATED`], resync bandwidth [`RESYNC_KBPS`].
fn module() -> ModuleSpec {
    ModuleSpec::new(MODULE)
        .config(format!(
            r#"<rfs replication_timeout="500ms" nbrei="3" reiallowedbw="{RESYNC_KBPS}">
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

/// Runs a shell command inside the node, in the replicated directory.
fn in_data(node: &AgentNode<'_>, shell: &str) {
    node.run_in(REPLICATED, shell);
}

/// The replicated tree's digest, seen inside the node.
fn tree(node: &AgentNode<'_>) -> String {
    node.tree_digest(REPLICATED)
}

/// node1 `prim` (ALONE) and writes `shell`'s data, node2 `second` (SECOND).
fn pair_up_with_data(node1: &AgentNode<'_>, node2: &AgentNode<'_>, shell: &str) {
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    in_data(node1, shell);
    // As an operator would, check that node2 sees node1 primary before `second`.
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
}

/// `returning`, back with its agent, is `start`ed: `primary` serves its
/// reintegration, then `returning` is SECOND and `primary` PRIM.
fn rejoin(returning: &AgentNode<'_>, primary: &AgentNode<'_>) {
    returning.safekit_ok(&format!("start -m {MODULE}"));
    returning.wait_state(SECOND);
    wait_for_all(
        &[returning, primary],
        &format!(
            "{} PRIM after {}'s reintegration",
            primary.name(),
            returning.name()
        ),
        || primary.state() == PRIM,
    );
}

/// The `resync` line of `safekit state -v`, if any.
fn resync_line(node: &AgentNode<'_>) -> Option<String> {
    node.safekit(&format!("state -m {MODULE} -v"))
        .stdout
        .lines()
        .find(|line| line.trim_start().starts_with("resync"))
        .map(str::to_string)
}

/// The first `N%` of a line.
fn percent(line: &str) -> Option<u8> {
    line.split_whitespace()
        .find_map(|word| word.trim_end_matches(',').strip_suffix('%'))
        .and_then(|number| number.parse().ok())
}

#[test]
fn prim_then_second_pairs_up_replicates_live_fails_over_and_reintegrates_incrementally() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_on(&cluster);

    // node1 runs alone with data: a few hundred KiB in small files, a 4 MiB file, a link.
    node1.safekit_ok(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    in_data(
        &node1,
        "mkdir -p docs/deep && for i in $(seq 1 60); do head -c $((i * 997)) /dev/urandom > docs/f$i; done \
         && echo hello > docs/deep/hello.txt && chmod 600 docs/deep/hello.txt \
         && head -c 4194304 /dev/urandom > big.bin && ln -s docs/deep/hello.txt link && sync",
    );

    // node2 joins: node1 serves a full reintegration, then PRIM/SECOND.
    let start = Instant::now();
    // As an operator would, check that node2 sees node1 primary before `second`.
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    // The progress is visible on both nodes while it runs.
    let (mut seen_on_node1, mut seen_on_node2) = (None, None);
    wait_until(
        "the reintegration's progress in state -v on both nodes",
        STATE_WAIT,
        Duration::from_millis(20),
        || {
            if seen_on_node1.is_none() {
                seen_on_node1 = resync_line(&node1).filter(|line| {
                    line.contains("serving the peer (full)")
                        && percent(line).is_some_and(|done| done > 0)
                });
            }
            if seen_on_node2.is_none() {
                seen_on_node2 = resync_line(&node2).filter(|line| {
                    line.contains(", files ") && percent(line).is_some_and(|done| done > 0)
                });
            }
            seen_on_node1.is_some() && seen_on_node2.is_some()
        },
    )
    .unwrap_or_else(|error| {
        panic!(
            "{error}: node1 {seen_on_node1:?}, node2 {seen_on_node2:?}\n{}\n{}",
            node1.diagnostics(),
            node2.diagnostics()
        )
    });
    eprintln!("progress on node1: {seen_on_node1:?}\nprogress on node2: {seen_on_node2:?}");
    wait_for_all(
        &[&node1, &node2],
        "node2 SECOND in sync and node1 PRIM",
        || node1.state() == PRIM,
    );
    let first_resync = start.elapsed();
    assert_same_tree("after the full reintegration", &tree(&node1), &tree(&node2));
    assert!(
        node1
            .module_log()
            .contains("Reintegration of node2 served from this node (full)"),
        "{}",
        node1.diagnostics()
    );
    assert!(
        node2.module_log().contains("Reintegration completed"),
        "{}",
        node2.diagnostics()
    );

    // Live replication: every change on node1 is on node2 once the command returned.
    in_data(
        &node1,
        "echo appended >> docs/f1 && printf XXXX | dd of=big.bin bs=1 seek=1000000 conv=notrunc status=none \
         && rm docs/f2 && mv docs/f3 docs/f3.renamed && mkdir new && head -c 100000 /dev/urandom > new/n1",
    );
    let acknowledged = tree(&node1);
    assert_same_tree("live replication", &acknowledged, &tree(&node2));

    // Power cut of node1: node2 takes over with every acknowledged write.
    let crashed = Instant::now();
    cluster.node(1).crash().expect("crash node1");
    node2.wait_state(ALONE);
    let failover = crashed.elapsed();
    assert_same_tree("after failover", &acknowledged, &tree(&node2));

    // node2 runs alone and changes things (recorded for node1's reintegration).
    in_data(
        &node2,
        "echo while-alone >> docs/f4 && rm docs/f5 && head -c 50000 /dev/urandom > alone.bin \
         && printf YYYY | dd of=big.bin bs=1 seek=3000000 conv=notrunc status=none && sync",
    );

    // node1 comes back and starts: incremental reintegration, node1 SECOND, node2 PRIM.
    cluster.node(1).reboot().expect("reboot node1");
    let _agent1_again = node1.start_agent();
    let start = Instant::now();
    rejoin(&node1, &node2);
    let failback = start.elapsed();
    assert!(
        node2
            .module_log()
            .contains("Reintegration of node1 served from this node (incremental"),
        "{}",
        node2.diagnostics()
    );
    assert_same_tree(
        "after the incremental reintegration",
        &tree(&node2),
        &tree(&node1),
    );

    // swap: roles exchanged without a resync; node1's writes reach node2 again.
    node2.safekit_ok(&format!("swap -m {MODULE}"));
    node1.wait_state(PRIM);
    node2.wait_state(SECOND);
    in_data(&node1, "echo after-swap > swapped.txt");
    assert_same_tree("after swap", &tree(&node1), &tree(&node2));

    eprintln!(
        "timings: first (full) reintegration to PRIM/SECOND {:.2} s, failover {:.2} s, failback (incremental) to PRIM/SECOND {:.2} s",
        first_resync.as_secs_f64(),
        failover.as_secs_f64(),
        failback.as_secs_f64()
    );
}

#[test]
fn after_a_split_brain_the_loser_keeps_its_files_aside_and_resyncs_from_the_winner() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_on(&cluster);
    pair_up_with_data(
        &node1,
        &node2,
        "echo base > shared.txt && mkdir dir && echo inner > dir/inner.txt",
    );
    node1.wait_state(PRIM);

    // node1's cable is pulled: both run ALONE and both change the data.
    cluster
        .link_down(cluster.node(1), 0)
        .expect("cut node1's link");
    node2.wait_state(ALONE);
    node1.wait_state(ALONE);
    for node in [&node1, &node2] {
        let name = node.name();
        in_data(
            node,
            &format!("echo {name} > only-on-{name}.txt && echo {name} >> shared.txt"),
        );
    }

    // Healed: one side stays primary, the other keeps its data aside and resyncs.
    cluster
        .link_up(cluster.node(1), 0)
        .expect("plug node1 back");
    let (winner, loser) = wait_one_primary(&node1, &node2);
    let (winner_name, loser_name) = (winner.name(), loser.name());
    assert_same_tree("after the split brain", &tree(winner), &tree(loser));
    let listing = tree(loser);
    assert!(
        listing.contains(&format!("only-on-{winner_name}.txt"))
            && !listing.contains(&format!("only-on-{loser_name}.txt")),
        "the loser holds the winner's tree: {listing}"
    );

    // The log says where the loser's files went, and they are all there.
    let log = loser.module_log();
    let folder = log
        .lines()
        .find_map(|line| line.split_once("files changed here were moved to "))
        .map(|(_, folder)| PathBuf::from(folder.trim()))
        .unwrap_or_else(|| panic!("the loser's log says where its files are\n{log}"));
    let kept = folder.join(format!(
        "0-{}",
        REPLICATED.rsplit('/').next().unwrap_or("data")
    ));
    let read = |name: &str| {
        std::fs::read_to_string(kept.join(name))
            .unwrap_or_else(|error| panic!("{}: {error}", kept.join(name).display()))
    };
    assert_eq!(
        read(&format!("only-on-{loser_name}.txt")),
        format!("{loser_name}\n")
    );
    assert_eq!(read("shared.txt"), format!("base\n{loser_name}\n"));
    assert_eq!(read("dir/inner.txt"), "inner\n");
}

/// The number after `word ` in a line (`sent 1234`).
fn number_after(line: &str, word: &str) -> Option<u64> {
    let (_, rest) = line.split_once(&format!("{word} "))?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_reintegration_interrupted_by_a_killed_secondary_is_served_again_without_starting_over() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    let cluster = two_nodes();
    let ([node1, node2], [_agent1, agent2]) = module().start_on(&cluster);
    const TOTAL: u64 = 8 * 1024 * 1024;
    // node2 joins; its agent is killed once about half the data was sent.
    pair_up_with_data(
        &node1,
        &node2,
        &format!("head -c {TOTAL} /dev/urandom > big.bin && sync"),
    );
    let mut sent_before_kill = 0;
    wait_until(
        "half of the data sent",
        STATE_WAIT,
        Duration::from_millis(20),
        || {
            sent_before_kill = resync_line(&node1)
                .and_then(|line| number_after(&line, "sent"))
                .unwrap_or(0);
            sent_before_kill >= TOTAL / 2
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", node1.diagnostics()));
    agent2.kill();

    // The primary keeps running alone; node2 comes back and is served again.
    let _agent2_again = node2.start_agent();
    rejoin(&node2, &node1);
    assert_same_tree(
        "after the resumed reintegration",
        &tree(&node1),
        &tree(&node2),
    );

    let log = node1.module_log();
    let served: Vec<u64> = log
        .lines()
        .filter(|line| line.contains("Reintegration of node2 served up to generation"))
        .filter_map(|line| {
            line.rsplit_once(" files, ")
                .and_then(|(_, rest)| number_after(&format!("x {rest}"), "x"))
        })
        .collect();
    assert_eq!(served.len(), 1, "one attempt completed\n{log}");
    let total_sent = sent_before_kill + served[0];
    eprintln!(
        "resync bytes: {sent_before_kill} before the kill, {} after, {TOTAL} of data",
        served[0]
    );
    assert!(
        total_sent < 2 * TOTAL,
        "the interrupted reintegration did not start over: {total_sent} bytes for {TOTAL}\n{log}"
    );
}

/// The files count of the last "Reintegration of `peer` served up to generation" line of a log.
fn last_served_files(log: &str, peer: &str) -> Option<u64> {
    let served = format!("Reintegration of {peer} served up to generation");
    log.lines()
        .rev()
        .filter(|line| line.contains(&served))
        .find_map(|line| {
            line.rsplit_once(": ")
                .and_then(|(_, rest)| number_after(&format!("x {rest}"), "x"))
        })
}

/// node1, primary, crashes while a writer keeps appending to and rewriting
/// files through its mount. The crash can catch a write applied on node1's
/// disk that never reached node2 (it was not acknowledged, so it is not in
/// node2's tree nor in node2's dirty log): only node1's activity log, written
/// before the write was shipped, knows that file. To make that divergence
/// certain rather than a matter of when the crash lands, the test adds, on
/// node1's disk after the crash, one such unshipped write to two of the files
/// the writer was writing (files it writes continuously, hence hot in the
/// activity log). node1 comes back: the incremental reintegration served by
/// node2 compares node1's activity files too, and the trees end identical
/// while the reintegration examined a handful of files, not the 300 others.
#[test]
fn a_primary_crashed_mid_write_is_resynced_from_its_activity_log_files_only() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    const UNTOUCHED: u64 = 300;
    let cluster = two_nodes();
    let ([node1, node2], _agents) = module().start_on(&cluster);
    pair_up_with_data(
        &node1,
        &node2,
        &format!(
            "mkdir bulk hot && for i in $(seq 1 {UNTOUCHED}); do echo \"untouched $i\" > bulk/f$i; done && sync"
        ),
    );
    wait_for_all(
        &[&node1, &node2],
        "node1 PRIM after the first reintegration",
        || node1.state() == PRIM,
    );
    let full_files = last_served_files(&node1.module_log(), "node2");
    assert!(
        full_files.is_some_and(|files| files >= UNTOUCHED),
        "the first (full) reintegration counts the whole tree: {full_files:?}\n{}",
        node1.diagnostics()
    );

    // A writer appends to one file and rewrites three others, as fast as it can, through the mount.
    let _writer = cluster
        .node(1)
        .spawn(format!(
            "cd {REPLICATED} && i=0; while :; do i=$((i+1)); printf '%s\\n' \"$i\" >> hot/appended; \
             for k in 1 2 3; do printf 'iteration %s of w%s\\n' \"$i\" \"$k\" > hot/w$k; done; done"
        ))
        .expect("start the writer");
    wait_for_all(
        &[&node1, &node2],
        "the writer's appends replicated to node2",
        || {
            node2
                .node()
                .run(format!("wc -l < {REPLICATED}/hot/appended"))
                .ok()
                .and_then(|output| output.stdout.trim().parse::<u64>().ok())
                .is_some_and(|lines| lines >= 100)
        },
    );

    // Power cut of node1 mid-write: node2 takes over with what it acknowledged.
    cluster.node(1).crash().expect("crash node1");
    node2.wait_state(ALONE);
    let survivor = tree(&node2);

    // node1 reboots; its disk holds writes node2 never received.
    cluster.node(1).reboot().expect("reboot node1");
    in_data(
        &node1,
        "printf 'applied, never shipped\\n' >> hot/appended && printf 'rewritten, never shipped\\n' > hot/w2",
    );
    assert_ne!(
        tree(&node1),
        survivor,
        "node1's tree differs from node2's before the reintegration"
    );
    let _agent1_again = node1.start_agent();
    rejoin(&node1, &node2);
    assert_eq!(node1.state(), SECOND, "{}", node1.diagnostics());
    assert_same_tree(
        "after the reintegration of the crashed primary",
        &survivor,
        &tree(&node1),
    );
    assert_same_tree(
        "node2 unchanged by the reintegration",
        &survivor,
        &tree(&node2),
    );

    // An incremental run over a handful of files, not the tree.
    let log = node2.module_log();
    assert!(
        log.contains("Reintegration of node1 served from this node (incremental"),
        "{}",
        node2.diagnostics()
    );
    let files = last_served_files(&log, "node1");
    eprintln!("reintegration after the crash: {files:?} files examined, full one {full_files:?}");
    assert!(
        files.is_some_and(|files| (2..=10).contains(&files)),
        "the incremental reintegration examined the activity log's files only: {files:?} files\n{log}"
    );
}
