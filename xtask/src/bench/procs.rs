//! Starting, watching and stopping the `safekit-rfs` processes of one target.
//!
//! Node 1 runs `safekit-rfs mount` over its replicated directory (replication
//! off, or to node 2), node 2 runs `safekit-rfs receive`. Both are started
//! through `nsenter --net`, which execs the helper: the child's pid is the
//! helper's pid, so its CPU time can be read from `/proc/<pid>/stat` and it is
//! stopped by that pid (SIGTERM, then SIGKILL).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::TargetKind;
use super::env::{Env, NODE2_ADDR, is_mount_point, path_str, sh};

/// Replication port on node 2.
const PORT: u16 = 7600;
/// How long a helper may take to start or to stop.
const START_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// One running helper.
#[derive(Debug)]
pub(crate) struct Helper {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Helper {
    pub(crate) fn spawn(
        name: &'static str,
        mut command: std::process::Command,
        log: PathBuf,
    ) -> anyhow::Result<Helper> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out
            .try_clone()
            .context("cannot duplicate a log descriptor")?;
        command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Helper {
            name,
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a line of the log says the helper is ready.
    pub(crate) fn wait_for(&mut self, ready: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.log_text().lines().any(&ready) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("cannot wait for a helper")?
            {
                self.child = None;
                bail!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if start.elapsed() > START_STOP_TIMEOUT {
                bail!(
                    "{} not ready after {START_STOP_TIMEOUT:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// User + system CPU seconds used so far (all threads), or `None` once it exited.
    pub(crate) fn cpu_seconds(&self, ticks_per_second: f64) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the command name (which may hold spaces): state is field 3.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / ticks_per_second)
    }

    /// Whether it is still running.
    pub(crate) fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, wait; SIGKILL after the timeout. Errors when it did not stop cleanly.
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        if child.try_wait().ok().flatten().is_none() {
            let _ = kill(pid, Signal::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().context("cannot wait for a helper")? {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "{} exited with {status}:\n{}",
                    self.name,
                    tail(&self.log_text())
                );
            }
            if start.elapsed() > START_STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not stop within {START_STOP_TIMEOUT:?} of SIGTERM; killed. Its log ends:\n{}",
                    self.name,
                    tail(&self.log_text())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The helpers of one target (none for the plain directory).
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) node1: Option<Helper>,
    pub(crate) node2: Option<Helper>,
    control: Option<PathBuf>,
    mount_point: PathBuf,
}

/// Starts what `target` needs and waits until it serves (and, when it
/// replicates, until a first change was confirmed by node 2).
pub(crate) fn start(target: TargetKind, env: &Env, rfs: &Path) -> anyhow::Result<Running> {
    let mount_point = env.data_dir(1);
    let mut running = Running {
        node1: None,
        node2: None,
        control: None,
        mount_point: mount_point.clone(),
    };
    let mode = match target {
        TargetKind::Plain => return Ok(running),
        TargetKind::Off | TargetKind::Strict => "strict",
        TargetKind::FsyncOnly => "fsync-only",
    };
    let secret = env.misc.join("secret");
    if !secret.exists() {
        std::fs::write(&secret, random_hex()).context("cannot write the secret file")?;
    }
    let replicated = target.replicated();
    if replicated {
        let mut command = env.in_node(2, rfs);
        command
            .args(["receive", "--dir"])
            .arg(env.data_dir(2))
            .args([
                "--listen",
                &format!("{NODE2_ADDR}:{PORT}"),
                "--secret-file",
                &path_str(&secret)?,
                "--module",
                "bench",
            ]);
        let mut helper = Helper::spawn(
            "safekit-rfs receive (node2)",
            command,
            env.misc.join(format!("node2-{}.log", target.slug())),
        )?;
        // The helper's own line after the bind, or the receiver library's.
        helper.wait_for(|l| l.contains(": receiving") || l.contains("receiver listening"))?;
        running.node2 = Some(helper);
    }
    let control = env.misc.join(format!("control-{}.sock", target.slug()));
    let mut command = env.in_node(1, rfs);
    command.args(["mount", "--dir"]).arg(&mount_point).args([
        "--mode",
        mode,
        "--control",
        &path_str(&control)?,
    ]);
    if replicated {
        command.args([
            "--replication",
            "peer",
            "--peer",
            &format!("{NODE2_ADDR}:{PORT}"),
            "--secret-file",
            &path_str(&secret)?,
            "--module",
            "bench",
            "--dirty-log",
            &path_str(&env.node1.join("dirty.log"))?,
        ]);
    } else {
        command.args(["--replication", "off"]);
    }
    let mut helper = Helper::spawn(
        "safekit-rfs mount (node1)",
        command,
        env.misc.join(format!("node1-{}.log", target.slug())),
    )?;
    helper.wait_for(|l| l.trim() == "ready")?;
    running.node1 = Some(helper);
    running.control = Some(control);
    if !is_mount_point(&mount_point) {
        bail!(
            "safekit-rfs said ready but {} is not a mount point",
            mount_point.display()
        );
    }
    if replicated {
        // A first change, so that the connection is up before any job runs.
        let probe = mount_point.join(".bench-probe");
        std::fs::write(&probe, b"probe").context("cannot write through the mount")?;
        std::fs::File::open(&probe)
            .and_then(|f| f.sync_all())
            .context("cannot fsync through the mount")?;
        std::fs::remove_file(&probe).context("cannot unlink through the mount")?;
        let stats = running.stats()?;
        if stats.alone > 0 || stats.confirmed == 0 {
            bail!(
                "replication did not start: {} operations confirmed by node2, {} recorded alone",
                stats.confirmed,
                stats.alone
            );
        }
    }
    Ok(running)
}

fn random_hex() -> String {
    let bytes = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        let mut buf = [0u8; 16];
        std::io::Read::read_exact(&mut f, &mut buf).map(|()| buf)
    });
    match bytes {
        Ok(buf) => buf.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => format!("bench-{}-secret", std::process::id()),
    }
}

/// The counters of node 1's mount that tell whether replication happened.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MountStats {
    pub(crate) confirmed: u64,
    pub(crate) alone: u64,
    pub(crate) errors: u64,
}

impl Running {
    /// Asks node 1's helper for its counters over the control socket.
    pub(crate) fn stats(&self) -> anyhow::Result<MountStats> {
        let path = self.control.as_ref().context("no helper runs")?;
        let mut stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"stats\n")?;
        let mut stats = MountStats::default();
        for line in BufReader::new(stream).lines() {
            let line = line.context("control socket")?;
            if line == "end" {
                return Ok(stats);
            }
            for pair in line.split_whitespace() {
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let value: u64 = value.parse().unwrap_or(0);
                match key {
                    "confirmed" => stats.confirmed += value,
                    "alone" => stats.alone += value,
                    "errors" => stats.errors += value,
                    _ => {}
                }
            }
        }
        bail!("the control socket closed before `end`")
    }

    /// CPU seconds of node 1's and node 2's helpers so far.
    pub(crate) fn cpu(&self, ticks: f64) -> (Option<f64>, Option<f64>) {
        (
            self.node1.as_ref().and_then(|h| h.cpu_seconds(ticks)),
            self.node2.as_ref().and_then(|h| h.cpu_seconds(ticks)),
        )
    }

    /// Whether every helper still runs.
    pub(crate) fn alive(&mut self) -> bool {
        self.node1.as_mut().is_none_or(Helper::running)
            && self.node2.as_mut().is_none_or(Helper::running)
    }

    /// Stops node 1 (it unmounts), then node 2; detaches a mount left behind.
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        let first = self.node1.as_mut().map_or(Ok(()), Helper::stop);
        let second = self.node2.as_mut().map_or(Ok(()), Helper::stop);
        if is_mount_point(&self.mount_point) {
            let _ = sh("umount", &["-l", &path_str(&self.mount_point)?]);
        }
        first.and(second)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("bench: {error:#}");
        }
    }
}

/// The last lines of a log, for error messages.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
