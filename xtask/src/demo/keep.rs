//! What lets a user interact with the demo: Ctrl-C (tears the cluster down
//! cleanly instead of leaving namespaces behind), Enter (for `--pause` and
//! `--keep`), and `cargo xtask shell <node>` into a cluster kept by `--keep`.
//!
//! A kept cluster lives as long as the `cargo xtask demo --keep` process: its
//! namespaces carry that process's pid, and the harness removes the
//! namespaces of dead processes, so the demo waits in the foreground and
//! tears everything down when it is told to. It writes `keep.txt` in its
//! scratch directory (`$TMPDIR/safekit-demo-<pid>/`), one line per node
//! (`<name> <netns> <SAFE> <SAFEVAR>`), which is how `shell` finds the nodes.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};

use anyhow::{Context, bail};
use nix::sys::signal::{SigSet, Signal};

/// Set once SIGINT, SIGTERM or SIGHUP arrived: every wait of the demo stops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Prefix of the demo's scratch directories in `$TMPDIR`.
pub(crate) const SCRATCH_PREFIX: &str = "safekit-demo-";

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// What the user did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Enter,
    /// stdin is closed (not a terminal, e.g. CI): nobody will press Enter.
    EndOfInput,
    Signal,
}

/// The user's input: signals always, stdin lines once [`Input::read_stdin`] ran.
#[derive(Debug)]
pub(crate) struct Input {
    sender: Sender<Event>,
    events: Receiver<Event>,
    reading_stdin: bool,
    stdin_closed: bool,
}

impl Input {
    /// Blocks SIGINT, SIGTERM and SIGHUP in this thread (call it before
    /// starting any other thread, which inherits the mask) and receives them
    /// on a thread of its own. Child processes start with an empty mask (the
    /// standard library resets it), so they still get their signals.
    pub(crate) fn catch_signals() -> anyhow::Result<Input> {
        let mut signals = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            signals.add(signal);
        }
        signals
            .thread_block()
            .context("block SIGINT/SIGTERM/SIGHUP")?;
        let (sender, events) = channel();
        let signal_sender = sender.clone();
        std::thread::Builder::new()
            .name("demo-signals".into())
            .spawn(move || {
                while let Ok(signal) = signals.wait() {
                    eout!("\n{signal} received: tearing the demo cluster down");
                    INTERRUPTED.store(true, Ordering::Relaxed);
                    if signal_sender.send(Event::Signal).is_err() {
                        break;
                    }
                }
            })
            .context("start the signal thread")?;
        Ok(Input {
            sender,
            events,
            reading_stdin: false,
            stdin_closed: false,
        })
    }

    fn read_stdin(&mut self) {
        if self.reading_stdin {
            return;
        }
        self.reading_stdin = true;
        let sender = self.sender.clone();
        // If the thread cannot start, Enter is simply never seen; Ctrl-C still works.
        let _ = std::thread::Builder::new()
            .name("demo-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    if line.is_err() || sender.send(Event::Enter).is_err() {
                        break;
                    }
                }
                let _ = sender.send(Event::EndOfInput);
            });
    }

    /// Waits for Enter (`--pause`); returns at once when stdin is closed.
    pub(crate) fn pause(&mut self) -> anyhow::Result<()> {
        if self.stdin_closed {
            return Ok(());
        }
        self.read_stdin();
        eprint!("      (press Enter to go on) ");
        match self.events.recv() {
            Ok(Event::Enter) => Ok(()),
            Ok(Event::EndOfInput) | Err(_) => {
                self.stdin_closed = true;
                Ok(())
            }
            Ok(Event::Signal) => bail!("interrupted"),
        }
    }

    /// Waits for Enter, or a signal when stdin is closed.
    pub(crate) fn wait_for_teardown(&mut self) {
        self.read_stdin();
        loop {
            match self.events.recv() {
                Ok(Event::EndOfInput) => {
                    if !self.stdin_closed {
                        self.stdin_closed = true;
                        out!(
                            "(stdin is closed: stop this process with Ctrl-C or `kill {}` to tear down)",
                            std::process::id()
                        );
                    }
                }
                Ok(Event::Enter | Event::Signal) | Err(_) => return,
            }
        }
    }
}

/// One node of a kept cluster, as `keep.txt` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeptNode {
    pub(crate) name: String,
    pub(crate) netns: String,
    /// `SAFE` and `SAFEVAR`; `None` for the client.
    pub(crate) safekit: Option<(PathBuf, PathBuf)>,
}

pub(crate) fn write_keep_file(
    scratch: &Path,
    cluster_id: &str,
    nodes: &[KeptNode],
) -> anyhow::Result<()> {
    let mut text = format!("cluster {cluster_id}\n");
    for node in nodes {
        text.push_str(&format!("node {} {}", node.name, node.netns));
        if let Some((safe, var)) = &node.safekit {
            text.push_str(&format!(" {} {}", safe.display(), var.display()));
        }
        text.push('\n');
    }
    let path = scratch.join("keep.txt");
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
}

/// `cargo xtask shell <node>`: an interactive shell inside a node of the
/// cluster kept by a running `cargo xtask demo --keep`.
pub(crate) fn shell(name: &str) -> anyhow::Result<()> {
    let (cluster_id, nodes) = find_kept()?;
    let Some(node) = nodes.iter().find(|node| node.name == name) else {
        let names: Vec<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
        bail!(
            "no node {name} in the kept demo cluster (it has {})",
            names.join(", ")
        );
    };
    let init = node_init(&node.netns)
        .with_context(|| format!("{name} of the kept demo cluster is not running"))?;
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--target={init}"))
        .args([
            "--mount", "--uts", "--net", "--pid", "--", "bash", "--norc", "-i",
        ])
        // The demo's teardown kills every process carrying this mark.
        .env("SAFEKIT_HARNESS_CLUSTER", &cluster_id)
        .env("PS1", format!("[{name}] \\w# "))
        .current_dir("/");
    if let Some((safe, var)) = &node.safekit {
        let path = std::env::var("PATH").unwrap_or_default();
        command
            .env("SAFE", safe)
            .env("SAFEVAR", var)
            .env("PATH", format!("{}:{path}", safe.display()));
        out!(
            "{name}: `safekit state -m demo -v`, `safekit log -m demo`, `safekit swap -m demo` work here; exit to leave"
        );
    } else {
        out!("{name}: try `curl -s http://<vip>:8080/records`; exit to leave");
    }
    let status = command.status().context("run nsenter")?;
    if !status.success() {
        bail!("the shell in {name} ended with {status}");
    }
    Ok(())
}

/// The kept demo cluster: the newest `keep.txt` whose demo process still runs.
fn find_kept() -> anyhow::Result<(String, Vec<KeptNode>)> {
    let temp_dir = std::env::temp_dir();
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(&temp_dir).with_context(|| format!("read {}", temp_dir.display()))?
    {
        let Ok(entry) = entry else { continue };
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(SCRATCH_PREFIX) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists();
        let keep = entry.path().join("keep.txt");
        if let (true, Ok(text)) = (alive, std::fs::read_to_string(&keep)) {
            let modified = entry.metadata().and_then(|meta| meta.modified()).ok();
            found.push((modified, text));
        }
    }
    found.sort();
    let Some((_, text)) = found.pop() else {
        bail!(
            "no demo cluster is up: start one with `cargo xtask demo --keep` (in another terminal)"
        );
    };
    parse_keep_file(&text)
}

fn parse_keep_file(text: &str) -> anyhow::Result<(String, Vec<KeptNode>)> {
    let mut cluster_id = None;
    let mut nodes = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["cluster", id] => cluster_id = Some((*id).to_owned()),
            ["node", name, netns, rest @ ..] => nodes.push(KeptNode {
                name: (*name).to_owned(),
                netns: (*netns).to_owned(),
                safekit: match rest {
                    [safe, var] => Some((PathBuf::from(safe), PathBuf::from(var))),
                    _ => None,
                },
            }),
            _ => bail!("unexpected line in the demo's keep.txt: {line}"),
        }
    }
    let cluster_id = cluster_id.context("the demo's keep.txt names no cluster")?;
    Ok((cluster_id, nodes))
}

/// Host pid of the node's init: the process of its network namespace that
/// is pid 1 in its own PID namespace (`NSpid: <host pid> 1`).
fn node_init(netns: &str) -> anyhow::Result<u32> {
    let output = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .context("run `ip netns pids`")?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                status.lines().any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.first() == Some(&"NSpid:") && fields.len() == 3 && fields[2] == "1"
                })
            })
        })
        .context("no init process in its namespace")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keep_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("xtask-keep-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let nodes = vec![
            KeptNode {
                name: "node1".into(),
                netns: "skt-1-0-abcd-node1".into(),
                safekit: Some(("/t/node1/safe".into(), "/t/node1/safevar".into())),
            },
            KeptNode {
                name: "client".into(),
                netns: "skt-1-0-abcd-client".into(),
                safekit: None,
            },
        ];
        write_keep_file(&dir, "skt-1-0-abcd", &nodes).expect("write keep.txt");
        let text = std::fs::read_to_string(dir.join("keep.txt")).expect("read keep.txt");
        std::fs::remove_dir_all(&dir).expect("remove the test directory");
        let (id, parsed) = parse_keep_file(&text).expect("parse keep.txt");
        assert_eq!(id, "skt-1-0-abcd");
        assert_eq!(parsed, nodes);
    }
}
