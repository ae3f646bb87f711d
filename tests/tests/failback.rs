//! Failback after the secondary's crash: the incremental reintegration sends
//! only what changed while the primary ran alone (issue 5).
//!
//! node1 `prim` with a 10,000-file tree (100 directories of 100 files of
//! 1-4 KiB, and two 8 MiB files), node2 `second`: a full reintegration copies
//! it. node2 loses power; node1, ALONE, changes 1% of the files (25 appended,
//! 25 rewritten in the middle, 25 deleted, 25 renamed, half of them into
//! another directory) and one 64 KiB block in the middle of each big file.
//! node2 reboots and `start`s: node1 serves an incremental reintegration, the
//! trees are identical again (content, type, mode, owner, size, mtime), and
//! the engine's figures (`reintegration served` in node1's agent output)
//! show that it sent only the changed files and, of the big files, only
//! about the changed blocks. The binaries must be built first: `cargo build
//! -p safekit-agent --bins` (same target directory).

use std::path::Path;
use std::time::{Duration, Instant};

use safekit_tests::agents::{ALONE, AgentNode, ModuleSpec, PRIM, SECOND, wait_for_all};
use safekit_tests::{Cluster, require_root};

const MODULE: &str = "mirror";
/// The replicated directory (a private directory of each node).
const REPLICATED: &str = "/replicated/data";
/// Directories of the tree, and files in each.
const DIRS: usize = 100;
const FILES_PER_DIR: usize = 100;
/// The big files and their size.
const BIG_FILES: usize = 2;
const BIG_SIZE: usize = 8 << 20;
/// The block rewritten in the middle of each big file.
const BLOCK: usize = 64 << 10;
/// Bound of every wait for a state: a full reintegration of 10,000 files on a slow machine.
const STATE_WAIT: Duration = Duration::from_secs(180);

/// The module: `<rfs>` over [`REPLICATED`].
fn module() -> ModuleSpec {
    ModuleSpec::new(MODULE)
        .config(format!(
            r#"<rfs replication_timeout="500ms" nbrei="3">
    <replicated dir="{REPLICATED}" mode="read_only"/>
  </rfs>"#
        ))
        .state_wait(STATE_WAIT)
}

/// A small deterministic generator of file contents (xorshift64).
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Writes the tree into `root` (node1's copy of [`REPLICATED`], before its
/// agent mounts it) and returns its size in bytes.
fn create_tree(root: &Path) -> u64 {
    let mut bytes = Bytes(0x9e37_79b9_7f4a_7c15);
    let mut total = 0u64;
    for dir in 0..DIRS {
        let path = root.join(format!("d{dir}"));
        std::fs::create_dir_all(&path).expect("create a directory of the tree");
        for file in 0..FILES_PER_DIR {
            let len = 1024 + (bytes.next() % 3073) as usize;
            std::fs::write(path.join(format!("f{file}")), bytes.fill(len))
                .expect("write a file of the tree");
            total += len as u64;
        }
    }
    for big in 0..BIG_FILES {
        std::fs::write(root.join(format!("big{big}.bin")), bytes.fill(BIG_SIZE))
            .expect("write a big file");
        total += BIG_SIZE as u64;
    }
    total
}

/// Directories whose entries the changes add, remove or rename (see [`changes`]).
const DIRS_WITH_NEW_ENTRIES: u64 = 11;

/// The 1% of changes, run in node1's mount while it is ALONE: 25 files
/// appended (d0-d24), 25 rewritten in the middle (d25-d49), 25 deleted
/// (5 in each of d50-d54), 25 renamed (5 in each of d55-d57 in place, 5 of
/// each of d58-d59 into d60), and a block in the middle of each big file.
fn changes() -> String {
    let middle_block = BIG_SIZE / 2 / BLOCK;
    format!(
        "for i in $(seq 0 24); do echo appended-while-alone >> d$i/f0; done \
         && for i in $(seq 25 49); do printf REWRITTEN-IN-THE-MIDDLE | dd of=d$i/f1 bs=1 seek=700 conv=notrunc status=none; done \
         && for i in $(seq 50 54); do for f in $(seq 10 14); do rm d$i/f$f; done; done \
         && for i in $(seq 55 57); do for f in $(seq 10 14); do mv d$i/f$f d$i/renamed$f; done; done \
         && for i in 58 59; do for f in $(seq 10 14); do mv d$i/f$f d60/moved-from-d$i-f$f; done; done \
         && for b in $(seq 0 {last}); do head -c {BLOCK} /dev/urandom | dd of=big$b.bin bs={BLOCK} seek={middle_block} conv=notrunc status=none; done \
         && sync",
        last = BIG_FILES - 1,
    )
}

/// The replicated tree seen inside the node: type, path, mode, owner, size
/// and mtime of every entry, link targets, and every regular file's SHA-256.
fn tree(node: &AgentNode<'_>) -> String {
    let listing = node
        .node()
        .run_ok(format!(
            "cd {REPLICATED} && find . -mindepth 1 -printf '%y %p %m %u %g %s %T@ %l\\n' | LC_ALL=C sort"
        ))
        .unwrap_or_else(|error| panic!("{}: list the tree: {error}", node.name()));
    format!("{listing}{}", node.tree_digest(REPLICATED))
}

/// Asserts two [`tree`]s are identical, printing the first difference.
fn assert_same(what: &str, expected: &str, actual: &str) {
    if expected != actual {
        let difference = expected
            .lines()
            .zip(actual.lines())
            .find(|(left, right)| left != right);
        panic!(
            "{what}: trees differ (first difference {difference:?}; {} vs {} lines)",
            expected.lines().count(),
            actual.lines().count()
        );
    }
}

/// `field: N` in the last `reintegration served` line of an agent's output.
fn served_figure(output: &str, field: &str) -> u64 {
    let line = output
        .lines()
        .rfind(|line| line.contains("reintegration served"))
        .unwrap_or_else(|| panic!("no `reintegration served` line in:\n{output}"));
    let key = format!("{field}: ");
    line.split(&key)
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|number| number.parse().ok())
        })
        .unwrap_or_else(|| panic!("no `{field}` in: {line}"))
}

#[test]
fn after_the_secondary_crashed_failback_resends_only_the_changed_files_and_blocks() {
    assert!(
        require_root(),
        "this scenario needs root (namespaces, FUSE mounts)"
    );
    let cluster = Cluster::builder()
        .nodes(2)
        .private_dir(REPLICATED)
        .build()
        .expect("build the cluster");
    let started = Instant::now();
    let total_bytes = create_tree(&cluster.node(1).host_path(REPLICATED));
    let files = DIRS * FILES_PER_DIR + BIG_FILES;
    eprintln!(
        "tree of {files} files, {total_bytes} bytes, written in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let ([node1, node2], agents) = module().start_on(&cluster);

    // node1 alone with the tree, node2 joins: a full reintegration copies it.
    node1.safekit_ok_when_up(&format!("prim -m {MODULE}"));
    node1.wait_state(ALONE);
    let start = Instant::now();
    node2.wait_peer("node1 ALONE");
    node2.safekit_ok_when_up(&format!("second -m {MODULE}"));
    node2.wait_state(SECOND);
    wait_for_all(
        &[&node1, &node2],
        "node1 PRIM after the full reintegration",
        || node1.state() == PRIM,
    );
    let full = start.elapsed();
    assert_same("after the full reintegration", &tree(&node1), &tree(&node2));

    // node2 loses power; node1 runs alone and changes 1% of the files.
    cluster.node(2).crash().expect("crash node2");
    node1.wait_state(ALONE);
    node1.run_in(REPLICATED, &changes());
    let changed = tree(&node1);

    // node2 comes back and starts: node1 serves an incremental reintegration.
    cluster.node(2).reboot().expect("reboot node2");
    let _agent2_again = node2.start_agent();
    let start = Instant::now();
    node2.safekit_ok_when_up(&format!("start -m {MODULE}"));
    node2.wait_state(SECOND);
    wait_for_all(&[&node1, &node2], "node1 PRIM after the failback", || {
        node1.state() == PRIM
    });
    let failback = start.elapsed();
    assert!(
        node1
            .module_log()
            .contains("Reintegration of node2 served from this node (incremental"),
        "{}",
        node1.diagnostics()
    );
    assert_same("after the failback", &changed, &tree(&node2));
    assert_same("node1 after the failback", &changed, &tree(&node1));

    let output = agents[0].output();
    let examined = served_figure(&output, "files_examined");
    let sent = served_figure(&output, "files_sent");
    let bytes_sent = served_figure(&output, "bytes_sent");
    eprintln!(
        "failback: {examined} files examined, {sent} sent, {bytes_sent} bytes sent (tree {files} files, {total_bytes} bytes)"
    );
    eprintln!(
        "timings: full reintegration to PRIM/SECOND {:.2} s, failback (incremental) to PRIM/SECOND {:.2} s",
        full.as_secs_f64(),
        failback.as_secs_f64()
    );
    // The changed files: 25 appended, 25 rewritten, 25 renamed (new names), 2 big files.
    assert!(
        (77..=110).contains(&sent),
        "files sent {sent}: expected the 77 changed files (and a few directories)"
    );
    // Only the recorded names: the 100 changed files, the 25 rename targets,
    // the two big files, and the directories whose entries changed (their own
    // metadata only, not their subtrees; at most every directory and the top).
    // Comparing whole directories would examine about DIRS_WITH_NEW_ENTRIES * 100.
    let examined_bound = 100 + 25 + BIG_FILES as u64 + DIRS as u64 + 1;
    assert!(
        examined_bound < DIRS_WITH_NEW_ENTRIES * FILES_PER_DIR as u64,
        "the bound must tell names from whole directories"
    );
    let blocks_compared = served_figure(&output, "blocks_compared");
    let file_blocks = served_figure(&output, "file_blocks");
    eprintln!("blocks compared {blocks_compared} of {file_blocks} in the files compared");
    assert!(
        examined <= examined_bound,
        "files examined {examined} of a {files}-file tree: expected at most {examined_bound}"
    );
    // Every changed small file whole (at most 4 KiB + the appended line), and
    // about one block of each big file (a few blocks of slack each).
    let bound = 100 * 4200 + BIG_FILES as u64 * 4 * BLOCK as u64;
    assert!(
        bytes_sent >= BIG_FILES as u64 * BLOCK as u64
            && bytes_sent < bound
            && bytes_sent < total_bytes / 20,
        "bytes sent {bytes_sent}: expected under {bound} (tree {total_bytes} bytes)"
    );
}
