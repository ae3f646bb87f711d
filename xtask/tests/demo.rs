//! `cargo xtask demo` as CI runs it: non-interactive (stdin closed), from the
//! build to the teardown. The test reads what a user reads: the steps in
//! order, the state tables, and the summary (interruption measured, every
//! acknowledged write present); then checks that nothing was left behind.
//! Needs root, python3 and the namespace harness's tools, like the scenario tests.

use std::process::{Command, Stdio};

/// The text after `prefix` on the first line that contains it.
fn after<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.split_once(prefix).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no line with {prefix:?} in the demo's output:\n{text}"))
}

/// Runs `xtask demo <args>` with stdin closed; its stdout, and everything for messages.
fn run_demo(args: &[&str]) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("demo")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run `xtask demo`");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let all = format!(
        "{stdout}\n--- stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the demo failed:\n{all}");
    (stdout, all)
}

/// The two `safekit state` lines printed after the step starting with `step`.
fn state_table<'a>(stdout: &'a str, step: &str) -> Vec<&'a str> {
    let at = stdout
        .find(&format!("\n{step}"))
        .unwrap_or_else(|| panic!("no step {step:?}:\n{stdout}"));
    stdout[at..]
        .lines()
        .filter(|line| line.starts_with("   | ") && !line.contains("replication:"))
        .take(2)
        .collect()
}

/// What every run of the demo must show: the runbook in order, the states,
/// the summary, a clean teardown.
fn check_walk_through(stdout: &str, all: &str) {
    let steps = [
        "1. Install the demo module",
        "2. node1: `safekit prim -m demo`",
        "3. node2: `safekit second -m demo`",
        "4. client: writes numbered records",
        "5. node1: power cut",
        "6. failover: node2",
        "7. node1 restarted",
        "8. node2: `safekit swap -m demo`",
        "9. client: stops writing",
    ];
    let mut from = 0;
    for step in steps {
        let at = stdout[from..]
            .find(&format!("\n{step}"))
            .unwrap_or_else(|| panic!("step {step:?} missing or out of order:\n{all}"));
        from += at + 1;
    }
    // `safekit state` of both nodes after each step.
    let table = state_table(stdout, "6. failover");
    assert!(
        table[0].contains("node1") && table[0].contains("no answer: agent not running"),
        "{all}"
    );
    assert!(
        table[1].contains("node2") && table[1].contains("ALONE"),
        "{all}"
    );
    let table = state_table(stdout, "7. node1 restarted");
    assert!(
        table[0].contains("node1") && table[0].contains("SECOND"),
        "{all}"
    );
    assert!(
        table[1].contains("node2") && table[1].contains("PRIM"),
        "{all}"
    );
    let table = state_table(stdout, "8. node2");
    assert!(
        table[0].contains("node1") && table[0].contains("PRIM"),
        "{all}"
    );
    assert!(
        table[1].contains("node2") && table[1].contains("SECOND"),
        "{all}"
    );

    // The summary.
    let interruption = after(
        stdout,
        "client-visible interruption on failover (power cut of node1): ",
    );
    let milliseconds: f64 = interruption
        .trim_end_matches(" ms")
        .parse()
        .unwrap_or_else(|_| panic!("not a duration in ms: {interruption:?}\n{all}"));
    assert!(milliseconds > 0.0, "{all}");
    after(
        stdout,
        "client-visible interruption on swap (node2 -> node1): ",
    );
    let writes = after(stdout, "writes: ");
    let acked = writes
        .split_once("acknowledged (node1 ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(counts, _)| counts.to_owned())
        .unwrap_or_else(|| panic!("no acknowledged counts in {writes:?}"));
    let counts: Vec<u64> = acked
        .split(", node2 ")
        .map(|count| count.parse().expect("a count"))
        .collect();
    assert!(
        counts.len() == 2 && counts.iter().all(|count| *count > 0),
        "both nodes acknowledged writes: {all}"
    );

    // Teardown left nothing: the harness's view of the cluster, and the demo's scratch directory.
    let cluster = after(stdout, "teardown: cluster ");
    assert!(cluster.ends_with(" removed, nothing left behind"), "{all}");
    let id = cluster.split_whitespace().next().expect("a cluster id");
    assert_eq!(safekit_tests::leftovers(id), Vec::<String>::new());
    let data = after(stdout, "data in ");
    let scratch = std::path::Path::new(data.trim())
        .parent()
        .expect("the data directory is in the demo's scratch directory");
    assert!(!scratch.exists(), "{} was left behind", scratch.display());
}

#[test]
fn without_replication_the_demo_still_walks_through_failover_and_swap() {
    if !safekit_tests::require_root() {
        return;
    }
    let (stdout, all) = run_demo(&["--no-replicate"]);
    check_walk_through(&stdout, &all);
    assert!(
        stdout.contains(
            "every acknowledged write survived: yes (each on the disk of the node that acknowledged it)"
        ),
        "{all}"
    );
    assert!(
        stdout.contains("replication: off (--no-replicate)"),
        "the demo says what it does not do: {all}"
    );
}

#[test]
fn the_demo_replicates_and_the_new_primary_has_every_record_the_old_one_acknowledged() {
    if !safekit_tests::require_root() {
        return;
    }
    let (stdout, all) = run_demo(&[]);
    check_walk_through(&stdout, &all);
    // After the power cut, node2 serves every record node1 had acknowledged;
    // at the end, node1 (primary again after the swap) serves all of them.
    let after_failover = after(&stdout, "records node1 acknowledged are on node2");
    assert!(after_failover.is_empty(), "{all}");
    assert!(
        stdout.contains("every acknowledged write survived: yes (on the final primary)"),
        "{all}"
    );
    assert!(!stdout.contains("replication: off"), "{all}");
}
