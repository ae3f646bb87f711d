//! Small system helpers: running host commands, finding processes by namespace
//! or environment, the root check, and the cluster's own event log.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use crate::{HarnessError, Result};

/// Environment variable set on every process the harness starts; its value is the cluster id.
pub(crate) const MARKER_VAR: &str = "SAFEKIT_HARNESS_CLUSTER";

/// Commands the harness and its tests need, with the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("mount", "mount"),
    ("ping", "iputils-ping"),
    ("tc", "iproute2"),
    ("pgrep", "procps"),
    ("sh", "dash"),
    ("sleep", "coreutils"),
];

/// Checks that the tests can run: root, and the tools of [`crate`]'s docs installed.
///
/// Returns `true` when the test should go on. When not root, it panics with a
/// clear message, unless `SAFEKIT_SKIP_ROOT_TESTS=1` is set: then it prints
/// that the test is skipped and returns `false`. CI runs as root, so scenario
/// tests never skip silently there. A missing tool always panics, naming the
/// Debian package to install.
#[track_caller]
pub fn require_root() -> bool {
    if !nix::unistd::geteuid().is_root() {
        if std::env::var("SAFEKIT_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED: this test needs root (network and mount namespaces); \
                 SAFEKIT_SKIP_ROOT_TESTS=1 is set"
            );
            return false;
        }
        panic!(
            "this test needs root (it creates network and mount namespaces); \
             run it as root, or set SAFEKIT_SKIP_ROOT_TESTS=1 to skip it"
        );
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .map(|(tool, package)| format!("`{tool}` (apt-get install {package})"))
        .collect();
    assert!(
        missing.is_empty(),
        "the namespace tests need these missing tools: {}",
        missing.join(", ")
    );
    true
}

/// The path of a binary built by cargo in this workspace (e.g. `safekitd`),
/// next to the test binary's own `deps/` directory.
///
/// Errors if it is not built yet, saying which command builds it. Scenario
/// tests run it inside a node with `node.spawn(format!("{} ...", path.display()))`.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|source| HarnessError::io("find the test binary", source))?;
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| HarnessError::Setup(format!("no target dir above {}", exe.display())))?;
    let path = profile_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Setup(format!(
            "{} is not built; build it first (e.g. `cargo build --workspace --bins`)",
            path.display()
        )))
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// The command line of `command` as a human would type it (for messages and logs).
pub(crate) fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| shell_quote(&part.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `text` for `sh` if it needs it.
pub(crate) fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Runs a short host command to completion; its stdout on success.
pub(crate) fn check(command: &mut Command, stdin: Option<&str>) -> Result<String> {
    let line = command_line(command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| HarnessError::Spawn {
        command: line.clone(),
        source,
    })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was set to piped");
        pipe.write_all(input.as_bytes())
            .map_err(|source| HarnessError::io(format!("write the input of `{line}`"), source))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| HarnessError::io(format!("wait for `{line}`"), source))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    if let Some(input) = stdin {
        stderr.push_str(&format!("\n(input was:\n{input})"));
    }
    Err(HarnessError::CommandFailed {
        command: line,
        status: output.status.to_string(),
        stderr,
    })
}

/// `ip -n <netns> <args>`.
pub(crate) fn ip(netns: &str, args: &[&str]) -> Result<String> {
    check(Command::new("ip").arg("-n").arg(netns).args(args), None)
}

/// Deletes a named network namespace; already gone is fine.
pub(crate) fn delete_netns(netns: &str) -> Result<()> {
    if !Path::new("/run/netns").join(netns).exists() {
        return Ok(());
    }
    check(Command::new("ip").args(["netns", "delete", netns]), None).map(drop)
}

/// Names of the named network namespaces (`/run/netns`).
pub(crate) fn netns_names() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the live processes whose network namespace is the named `netns`
/// (what `ip netns pids` prints).
pub(crate) fn netns_pids(netns: &str) -> Vec<i32> {
    let Ok(target) = fs::metadata(Path::new("/run/netns").join(netns)) else {
        return Vec::new();
    };
    all_pids()
        .into_iter()
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|ns| ns.dev() == target.dev() && ns.ino() == target.ino())
        })
        .collect()
}

/// Pids (and command lines) of the processes carrying `MARKER_VAR=<cluster_id>`.
pub(crate) fn marked_pids(cluster_id: &str) -> Vec<(i32, String)> {
    let marker = format!("{MARKER_VAR}={cluster_id}");
    all_pids()
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|byte| *byte == 0)
                    .any(|entry| entry == marker.as_bytes())
            })
        })
        .map(|pid| (pid, cmdline(pid)))
        .collect()
}

/// Pids of the children of `pid`.
pub(crate) fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|text| {
            text.split_whitespace()
                .filter_map(|child| child.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the live members of process group `pgid`.
pub(crate) fn group_members(pgid: u32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            // /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                    .and_then(|group| group.parse::<u32>().ok())
                    == Some(pgid)
            })
        })
        .collect()
}

/// The command line of a process, for messages.
pub(crate) fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|byte| *byte == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends SIGKILL to one process; a process already gone is fine.
pub(crate) fn kill_pid(pid: i32) {
    // ESRCH (already exited) is the only expected error, and harmless.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The harness's own log of what it did to a cluster, printed with the nodes'
/// logs when a test fails.
#[derive(Debug)]
pub(crate) struct EventLog {
    start: Instant,
    file: Mutex<Option<File>>,
    path: PathBuf,
}

impl EventLog {
    pub(crate) fn new(path: PathBuf) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok();
        Self {
            start: Instant::now(),
            file: Mutex::new(file),
            path,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line, stamped with the seconds since the cluster was created.
    pub(crate) fn note(&self, line: &str) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let mut guard = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(file) = guard.as_mut() {
            // The log is a debugging aid: losing a line must not fail the test.
            let _ = writeln!(file, "[{elapsed:8.3}s] {line}");
        }
    }
}
