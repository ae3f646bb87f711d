//! What a killed agent left running, recorded while it runs and cleaned up by the next one.
//!
//! The application started by `start_prim` (the systemd unit uses
//! `KillMode=process` on purpose, so that a restart of the agent does not
//! kill it), the virtual IPs on the interfaces and the custom checkers'
//! programs (each in a process group of its own) all outlive a `kill -9` or a
//! crash of `safekitd`. The next agent starts every module in STOP; without
//! this module the node could become SECOND while a stale application still
//! writes into the replicated directories or answers on the virtual IP.
//!
//! - While the agent runs, the module's runner keeps a [`Recorder`] up to
//!   date in `SAFEVAR/modules/<AM>/leftovers` (atomic, checksummed:
//!   [`crate::persist::LeftoverRecord`]): the application is marked as
//!   possibly running, with its state, before any start hook runs
//!   (`start_both`, `start_sec`, `start_second`, `start_prim`: a write that
//!   fails refuses the start) and cleared after a `stop_prim` succeeded (from
//!   SECOND, after its stop hooks succeeded); the virtual IPs held and the process groups of the
//!   custom checkers' programs are recorded as they change.
//! - When the agent starts, before the module can be started (by boot or by
//!   an operator), [`clean_up`] reads the previous instance's record and, if
//!   anything may be left: logs `the agent stopped without stopping the
//!   application: cleaning up` in the module log, removes the recorded
//!   virtual IPs that are still configured, kills the recorded checker
//!   process groups whose leader still exists with the recorded start time
//!   (`/proc/<pid>/stat` field 22, so a recycled pid is never killed), runs
//!   the forced stop hooks of the state left ([`stop_plan`]), then clears
//!   the record. An empty record (a clean stop) does nothing at all. A module
//!   the agent refuses at start gets the same clean-up ([`clean_up_refused`]).
//!
//! It must never kill a process it did not start, nor remove an address that
//! is not one of the module's virtual IPs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::modlog::{self, ModLog};
use crate::persist::{self, CheckerGroup, LeftoverRecord};
use crate::scripts::{self, AppLog, ScriptCall, ScriptEnv};
use crate::vip::Netlink;

/// The module log line that starts a clean-up after a crash of the agent.
pub const CLEANUP_MESSAGE: &str = "the agent stopped without stopping the application: cleaning up";

/// The file name of a module's record, beside its state file in `SAFEVAR/modules/<AM>/`.
pub const RECORD_FILE: &str = "leftovers";

/// The file of a module's record.
pub fn record_path(module_var: &Path) -> PathBuf {
    module_var.join(RECORD_FILE)
}

/// The file of a module's record, beside its state file `state_path`.
pub fn record_beside(state_path: &Path) -> PathBuf {
    state_path.with_file_name(RECORD_FILE)
}

/// The kernel's boot id, empty if unreadable.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// What `/proc/<pid>/stat` says about a process: its process group and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 5: the process group id.
    pub pgrp: i32,
    /// Field 22: the start time, in clock ticks since boot.
    pub start_time: u64,
}

/// Parses the content of `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so the fields are
/// counted after the last `)`.
pub fn parse_proc_stat(content: &str) -> Option<ProcStat> {
    let after_name = &content[content.rfind(')')? + 1..];
    // Field 3 (the state) is the first one after the name.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    Some(ProcStat {
        pgrp: fields.get(5 - 3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// `/proc/<pid>/stat` of a live process, `None` when there is no such process.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .as_deref()
        .and_then(parse_proc_stat)
}

/// Whether the recorded group's leader still exists, is still the leader of
/// that group, and started when it was recorded: only then is it ours to kill.
pub fn is_same_group(group: &CheckerGroup) -> bool {
    proc_stat(group.pgid)
        .is_some_and(|stat| stat.pgrp == group.pgid && stat.start_time == group.start_time)
}

/// Keeps a module's [`LeftoverRecord`] on disk in step with what the module runs.
///
/// Every change is written (atomically, fsynced) before the method returns;
/// a write that fails is logged and the agent goes on (the safe side is
/// already taken: the next agent cleans up whatever an older record names),
/// except before a start ([`Recorder::application_starting`]), which the
/// caller refuses then.
#[derive(Debug, Clone)]
pub struct Recorder {
    inner: Arc<Mutex<LeftoverRecord>>,
    /// How many times [`Recorder::application_starting`] was called (changed
    /// under the lock of `inner`): a stop that ends after a new start must not
    /// clear the record.
    starts: Arc<AtomicU64>,
    path: PathBuf,
}

impl Recorder {
    /// A recorder writing to `path`, starting from an empty record (what a
    /// clean stop leaves; the runner then starts from what [`clean_up`] left
    /// with [`Recorder::start_from`]); nothing is written until something changes.
    pub fn new(path: PathBuf) -> Recorder {
        Recorder {
            inner: Arc::new(Mutex::new(LeftoverRecord {
                boot_id: boot_id(),
                agent_pid: std::process::id(),
                ..LeftoverRecord::default()
            })),
            starts: Arc::default(),
            path,
        }
    }

    /// Starts from `record` (what [`clean_up`] left on disk, e.g. an
    /// application whose forced stop failed), so that the next change keeps
    /// it. Nothing is written.
    pub fn start_from(&self, record: LeftoverRecord) {
        let mut inner = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *inner = LeftoverRecord {
            boot_id: boot_id(),
            agent_pid: std::process::id(),
            ..record
        };
    }

    /// The record as it is now (for tests and the log).
    pub fn current(&self) -> LeftoverRecord {
        match self.inner.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Applies `change` to the record and writes it if it changed (blocking).
    /// On a failed write the record in memory keeps the change (the next
    /// write carries it).
    fn update_blocking(
        &self,
        change: impl FnOnce(&mut LeftoverRecord),
    ) -> Result<(), persist::PersistError> {
        let mut record = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = record.clone();
        change(&mut record);
        if *record == before {
            return Ok(());
        }
        persist::write_leftovers(&self.path, &record).inspect_err(|error| {
            tracing::error!(%error, "cannot record what the module runs (leftovers)");
        })
    }

    /// [`Recorder::update_blocking`] on a blocking thread; the error as text.
    async fn update(
        &self,
        change: impl FnOnce(&mut LeftoverRecord) + Send + 'static,
    ) -> Result<(), String> {
        let recorder = self.clone();
        match tokio::task::spawn_blocking(move || recorder.update_blocking(change)).await {
            Ok(result) => result.map_err(|error| error.to_string()),
            Err(error) => {
                tracing::error!(%error, "cannot record what the module runs (leftovers)");
                Err(error.to_string())
            }
        }
    }

    /// Before any start hook (`start_both`, `start_sec`, `start_second`,
    /// `start_prim`) runs for `state`: the application may run from now on.
    ///
    /// # Errors
    /// The record could not be written: the caller must not start anything
    /// (a crash of the agent would leave it running unnoticed).
    pub async fn application_starting(&self, state: &str) -> Result<(), String> {
        let state = state.to_string();
        let starts = Arc::clone(&self.starts);
        self.update(move |record| {
            starts.fetch_add(1, Ordering::SeqCst);
            record.application = Some(state);
        })
        .await
    }

    /// A token for [`Recorder::application_stopped_unless_restarted`], taken
    /// when a stop is queued.
    pub fn start_count(&self) -> u64 {
        let _guard = self.inner.lock();
        self.starts.load(Ordering::SeqCst)
    }

    /// The application now runs in `state` (ALONE, PRIM, SECOND), if it runs at all.
    pub async fn application_state(&self, state: &str) {
        let state = state.to_string();
        let _ = self
            .update(move |record| {
                if record.application.is_some() {
                    record.application = Some(state);
                }
            })
            .await;
    }

    /// After a successful `stop_prim`: the application is stopped.
    pub async fn application_stopped(&self) {
        let _ = self.update(|record| record.application = None).await;
    }

    /// After the stop hooks of a module that ran no `stop_prim` (SECOND to
    /// STOP) all succeeded: the application is stopped, unless a start was
    /// recorded since `start_count` ([`Recorder::start_count`]) was taken.
    pub async fn application_stopped_unless_restarted(&self, start_count: u64) {
        let starts = Arc::clone(&self.starts);
        let _ = self
            .update(move |record| {
                if starts.load(Ordering::SeqCst) == start_count {
                    record.application = None;
                }
            })
            .await;
    }

    /// The virtual IPs now held, `(interface, address)`.
    pub async fn vips_held(&self, vips: &[(String, IpAddr)]) {
        let vips = vips.to_vec();
        let _ = self.update(move |record| record.vips = vips).await;
    }

    /// A custom checker's program started as process group `pgid` (its pid).
    /// Not recorded if the program already exited (nothing to clean up then).
    pub async fn group_started(&self, resource: &str, pgid: i32) {
        let resource = resource.to_string();
        let _ = self
            .update(move |record| {
                if let Some(stat) = proc_stat(pgid) {
                    record.checker_groups.retain(|group| group.pgid != pgid);
                    record.checker_groups.push(CheckerGroup {
                        resource,
                        pgid,
                        start_time: stat.start_time,
                    });
                }
            })
            .await;
    }

    /// A custom checker's process group was killed. Callable from a `Drop`:
    /// the write runs on a blocking thread of the current runtime (or here
    /// when there is none).
    pub fn group_ended(&self, pgid: i32) {
        let recorder = self.clone();
        let change = move || {
            let _ =
                recorder.update_blocking(|record| record.checker_groups.retain(|g| g.pgid != pgid));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(change)),
            Err(_) => change(),
        }
    }
}

/// What [`clean_up`] needs from the module's runner.
#[derive(Debug)]
pub struct Cleanup<'a> {
    /// The record's file ([`record_path`]).
    pub path: PathBuf,
    /// The module log.
    pub modlog: &'a ModLog,
    /// Netlink, to remove virtual IPs (`None`: unavailable, nothing removed).
    pub netlink: Option<&'a Netlink>,
    /// The module's configured virtual IPs: only these are ever removed.
    /// `None` for a module this agent refused (no usable configuration): the
    /// addresses of the record, written by this node's previous agent, are trusted.
    pub configured_vips: Option<Vec<IpAddr>>,
    /// The scripts' environment; `None` when the module has no `<user>` (scripts are not run).
    pub scripts: Option<(&'a ScriptEnv, &'a AppLog)>,
    /// `forcestoptimeout`.
    pub force_stop_timeout: Duration,
}

/// What [`clean_up`] did, for tests and the caller's log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// A record of the previous agent named something possibly left running.
    pub cleaned: bool,
    /// Virtual IPs removed, `(interface, address)`.
    pub vips_removed: Vec<(String, IpAddr)>,
    /// Checker process groups killed.
    pub groups_killed: Vec<i32>,
    /// The forced stop hooks of the recorded state ran and succeeded (absent ones count as success).
    pub application_stopped: bool,
    /// The record left on disk: the runner's [`Recorder`] starts from it
    /// ([`Recorder::start_from`]), so that a failed stop stays recorded.
    pub record: LeftoverRecord,
}

/// The recorded state of an unreadable record: every forced stop hook runs.
pub const UNKNOWN_STATE: &str = "UNKNOWN";

/// At agent start, before the module can be started: cleans up what the
/// previous agent's record says may still run (see the module
/// documentation), then clears the record. Does nothing for an empty or
/// missing record.
///
/// # Cancel safety
/// Not meant to be cancelled: the runner awaits it before its loop.
pub async fn clean_up(cleanup: Cleanup<'_>) -> CleanupReport {
    let path = cleanup.path.clone();
    let read = tokio::task::spawn_blocking(move || persist::read_leftovers(&path)).await;
    let record = match read {
        Ok(Ok(None)) => return CleanupReport::default(),
        Ok(Ok(Some(record))) if record.is_empty() => return CleanupReport::default(),
        Ok(Ok(Some(record))) => record,
        Ok(Err(error)) => {
            // Unknown: the safe side is to stop an application that may run.
            cleanup.modlog.log(
                modlog::Level::Critical,
                format!("Unreadable record of what the previous agent ran ({error}): assuming the application may be running"),
            );
            LeftoverRecord {
                application: Some(UNKNOWN_STATE.into()),
                ..LeftoverRecord::default()
            }
        }
        Err(error) => {
            tracing::error!(%error, "cannot read the leftovers record");
            return CleanupReport::default();
        }
    };
    let mut report = CleanupReport {
        cleaned: true,
        ..CleanupReport::default()
    };
    let what = match &record.application {
        Some(state) => format!("application started in {state}"),
        None => "no application".to_string(),
    };
    tracing::warn!(previous_agent = record.agent_pid, %what, vips = record.vips.len(), checker_groups = record.checker_groups.len(), "cleaning up after a crash of the agent");
    cleanup.modlog.log(
        modlog::Level::Critical,
        format!(
            "{CLEANUP_MESSAGE} (previous agent pid {}: {what}, {} virtual IP(s), {} checker program(s))",
            record.agent_pid,
            record.vips.len(),
            record.checker_groups.len()
        ),
    );
    remove_vips(&cleanup, &record, &mut report).await;
    kill_groups(&cleanup, &record, &mut report);
    let mut stop_failed = false;
    if let Some(state) = &record.application {
        stop_failed = !stop_application(&cleanup, state).await;
        report.application_stopped = !stop_failed;
    }
    // Clear the record; an application whose forced stop failed stays recorded,
    // so that the next agent (and the runner's recorder) keeps it.
    let cleared = LeftoverRecord {
        application: if stop_failed {
            record.application.clone()
        } else {
            None
        },
        boot_id: boot_id(),
        agent_pid: std::process::id(),
        ..LeftoverRecord::default()
    };
    report.record = cleared.clone();
    let path = cleanup.path.clone();
    match tokio::task::spawn_blocking(move || persist::write_leftovers(&path, &cleared)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "cannot clear the leftovers record"),
        Err(error) => tracing::error!(%error, "cannot clear the leftovers record"),
    }
    cleanup.modlog.log(
        if stop_failed {
            modlog::Level::Critical
        } else {
            modlog::Level::Event
        },
        if stop_failed {
            "Clean-up after the agent's crash: a forced stop hook failed, the application may still be running (see the application log)".to_string()
        } else {
            "Clean-up after the agent's crash done".to_string()
        },
    );
    report
}

/// At agent start, for a module this agent refused (invalid configuration,
/// heartbeat socket that cannot bind, ...: it has no runner, so
/// [`clean_up`] would never run): when the previous agent's record (in
/// `env.uservar`) is not empty, runs the same clean-up with the scripts of
/// `env.userbin` and `force_stop_timeout`, trusting the recorded virtual IPs
/// (the record is this node's own). Logs a critical line in the module log
/// when it cannot run or did not stop everything.
pub async fn clean_up_refused(
    env: &ScriptEnv,
    modlog: &ModLog,
    force_stop_timeout: Duration,
) -> CleanupReport {
    let path = record_path(&env.uservar);
    let probe = path.clone();
    let nothing_left = tokio::task::spawn_blocking(move || match persist::read_leftovers(&probe) {
        Ok(None) => true,
        Ok(Some(record)) => record.is_empty(),
        Err(_) => false,
    })
    .await
    .unwrap_or(false);
    if nothing_left {
        return CleanupReport::default();
    }
    let netlink = match Netlink::connect() {
        Ok(netlink) => Some(netlink),
        Err(error) => {
            tracing::error!(%error, "netlink unavailable: the recorded virtual IPs cannot be removed");
            None
        }
    };
    let applog = AppLog {
        path: env.uservar.join("userlog.ulog"),
        max_bytes: 2048 * 1024,
    };
    let report = clean_up(Cleanup {
        path,
        modlog,
        netlink: netlink.as_ref(),
        configured_vips: None,
        scripts: Some((env, &applog)),
        force_stop_timeout,
    })
    .await;
    if report.cleaned && (report.record.application.is_some() || netlink.is_none()) {
        modlog.log(
            modlog::Level::Critical,
            "Module not started and its clean-up after the agent's crash incomplete: the application may still be running",
        );
    }
    report
}

/// Removes the recorded virtual IPs that are configured and still present.
async fn remove_vips(cleanup: &Cleanup<'_>, record: &LeftoverRecord, report: &mut CleanupReport) {
    if record.vips.is_empty() {
        return;
    }
    let Some(netlink) = cleanup.netlink else {
        cleanup.modlog.log(
            modlog::Level::Critical,
            "Virtual IPs of the previous agent not removed: netlink unavailable",
        );
        return;
    };
    for (ifname, addr) in &record.vips {
        if let Some(configured) = &cleanup.configured_vips
            && !configured.contains(addr)
        {
            cleanup.modlog.log(
                modlog::Level::Event,
                format!(
                    "Address {addr} on {ifname} left alone: no longer a virtual IP of this module"
                ),
            );
            continue;
        }
        match netlink.remove_address(ifname, *addr).await {
            Ok(true) => {
                cleanup.modlog.log(
                    modlog::Level::Event,
                    format!("Virtual IP {addr} left by the previous agent removed from {ifname}"),
                );
                report.vips_removed.push((ifname.clone(), *addr));
            }
            Ok(false) => {}
            Err(error) => cleanup.modlog.log(
                modlog::Level::Critical,
                format!("Virtual IP {addr} left by the previous agent not removed from {ifname}: {error}"),
            ),
        }
    }
}

/// Kills the recorded checker process groups that are provably the same processes.
fn kill_groups(cleanup: &Cleanup<'_>, record: &LeftoverRecord, report: &mut CleanupReport) {
    if record.checker_groups.is_empty() {
        return;
    }
    if record.boot_id != boot_id() {
        cleanup.modlog.log(
            modlog::Level::Info,
            "Checker programs of the previous agent: the machine rebooted since, nothing to kill",
        );
        return;
    }
    for group in &record.checker_groups {
        if !is_same_group(group) {
            cleanup.modlog.log(
                modlog::Level::Info,
                format!(
                    "Checker program {} (process group {}) of the previous agent is gone",
                    group.resource, group.pgid
                ),
            );
            continue;
        }
        match killpg(Pid::from_raw(group.pgid), Signal::SIGKILL) {
            Ok(()) => {
                cleanup.modlog.log(
                    modlog::Level::Event,
                    format!(
                        "Checker program {} (process group {}) left by the previous agent killed",
                        group.resource, group.pgid
                    ),
                );
                report.groups_killed.push(group.pgid);
            }
            Err(error) => cleanup.modlog.log(
                modlog::Level::Critical,
                format!(
                    "Checker program {} (process group {}) not killed: {error}",
                    group.resource, group.pgid
                ),
            ),
        }
    }
}

/// The forced stop hooks of leaving `state` for STOP, in the order SafeKit
/// runs them: `stop_prim` first when the application runs there (ALONE,
/// PRIM), then the stop hooks of the pairs left, innermost first
/// (`stop_second`, `stop_sec`, `stop_both`: [`scripts::transition_hooks`]).
/// An unknown state (unreadable record) runs all of them, as PRIM.
pub fn stop_plan(state: &str) -> (&'static str, Vec<&'static str>) {
    let (current, known): (&'static str, bool) = match state {
        "ALONE" => ("ALONE", true),
        "PRIM" => ("PRIM", true),
        "SECOND" => ("SECOND", true),
        _ => ("PRIM", false),
    };
    if !known {
        return (
            current,
            vec!["stop_prim", "stop_second", "stop_sec", "stop_both"],
        );
    }
    let mut names = Vec::new();
    if current != "SECOND" {
        names.push("stop_prim");
    }
    names.extend(
        scripts::transition_hooks(current, "STOP", "stop")
            .into_iter()
            .filter(|hook| hook.stop)
            .map(|hook| hook.name),
    );
    (current, names)
}

/// Runs the forced stop hooks of leaving `state` ([`stop_plan`]), each with
/// `force <state> STOP stop` and `forcestoptimeout`. Returns whether all
/// succeeded (an absent hook counts as success).
async fn stop_application(cleanup: &Cleanup<'_>, state: &str) -> bool {
    let Some((env, applog)) = cleanup.scripts else {
        return true;
    };
    let (current, names) = stop_plan(state);
    let mut all_ok = true;
    for name in names {
        let call = ScriptCall {
            name,
            current_state: current,
            next_state: "STOP",
            action: "stop",
            force: true,
            timeout: cleanup.force_stop_timeout,
        };
        let success = match scripts::run_script(env, applog, &call).await {
            Ok(scripts::ScriptOutcome::Absent) => true,
            Ok(outcome) => {
                cleanup.modlog.log(
                    if outcome.is_success() {
                        modlog::Level::Script
                    } else {
                        modlog::Level::Critical
                    },
                    format!("Script {name} {}: {outcome}", call.arguments().join(" ")),
                );
                outcome.is_success()
            }
            Err(error) => {
                cleanup
                    .modlog
                    .log(modlog::Level::Critical, format!("Script {name}: {error}"));
                false
            }
        };
        all_ok &= success;
    }
    all_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_and_group_are_read_after_the_command_name() {
        // A command name with spaces and parentheses must not shift the fields.
        let stat = "4242 (evil) name (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(
            parse_proc_stat(stat),
            Some(ProcStat {
                pgrp: 4242,
                start_time: 987_654
            })
        );
        assert_eq!(parse_proc_stat("4242 (cut) S 1 2"), None);
        assert_eq!(parse_proc_stat("no name here"), None);
    }

    #[test]
    fn a_live_group_matches_only_with_its_own_start_time() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pgid = i32::try_from(child.id()).expect("pid fits");
        let stat = proc_stat(pgid).expect("the child is alive");
        assert_eq!(stat.pgrp, pgid, "leader of its own group");
        let group = CheckerGroup {
            resource: "custom.app".into(),
            pgid,
            start_time: stat.start_time,
        };
        assert!(is_same_group(&group));
        // The same pid with another start time is a recycled pid: not ours.
        let recycled = CheckerGroup {
            start_time: stat.start_time + 1,
            ..group.clone()
        };
        assert!(!is_same_group(&recycled));
        // A process that is not the leader of the recorded group is not ours
        // either: a child left in this test's process group.
        let mut member = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let member_pid = i32::try_from(member.id()).expect("pid fits");
        let member_stat = proc_stat(member_pid).expect("the child is alive");
        assert_ne!(member_stat.pgrp, member_pid, "not a group leader");
        let not_leader = CheckerGroup {
            resource: "custom.app".into(),
            pgid: member_pid,
            start_time: member_stat.start_time,
        };
        assert!(!is_same_group(&not_leader));
        member.kill().expect("kill sleep");
        member.wait().expect("reap sleep");
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        assert!(!is_same_group(&group), "a process that exited is gone");
    }

    #[tokio::test]
    async fn the_recorder_marks_the_application_until_a_clean_stop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = record_path(dir.path());
        let recorder = Recorder::new(path.clone());
        let read = || persist::read_leftovers(&path).expect("readable");
        assert_eq!(read(), None, "nothing written before anything runs");

        recorder
            .application_starting("ALONE")
            .await
            .expect("record written");
        assert_eq!(
            read().expect("written").application.as_deref(),
            Some("ALONE")
        );
        recorder.application_state("PRIM").await;
        let vip: IpAddr = "10.0.0.50".parse().expect("address");
        recorder.vips_held(&[("eth0".into(), vip)]).await;
        let record = read().expect("written");
        assert_eq!(record.application.as_deref(), Some("PRIM"));
        assert_eq!(record.vips, vec![("eth0".to_string(), vip)]);
        assert_eq!(record.agent_pid, std::process::id());

        recorder.vips_held(&[]).await;
        recorder.application_stopped().await;
        assert!(read().expect("written").is_empty());
        // A state change of a stopped application records nothing.
        recorder.application_state("PRIM").await;
        assert!(read().expect("written").is_empty());
    }

    #[tokio::test]
    async fn a_clean_record_triggers_nothing_and_a_dirty_one_is_cleaned_and_cleared() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = record_path(dir.path());
        let modlog = ModLog::open(dir.path().join("log"), 1 << 20).expect("module log");
        let userbin = dir.path().join("bin");
        std::fs::create_dir_all(&userbin).expect("bin");
        let env = ScriptEnv {
            safe: dir.path().into(),
            safebin: dir.path().into(),
            safevar: dir.path().into(),
            module: "m".into(),
            userbin: userbin.clone(),
            userconf: dir.path().into(),
            uservar: dir.path().into(),
            user_vars: Default::default(),
        };
        let applog = AppLog {
            path: dir.path().join("userlog.ulog"),
            max_bytes: 1 << 20,
        };
        let marker = dir.path().join("stop_prim.args");
        let script = format!("#!/bin/sh\necho \"$@\" >> {}\n", marker.display());
        std::fs::write(userbin.join("stop_prim"), script).expect("stop_prim");
        std::fs::set_permissions(
            userbin.join("stop_prim"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let cleanup = || Cleanup {
            path: path.clone(),
            modlog: &modlog,
            netlink: None,
            configured_vips: Some(Vec::new()),
            scripts: Some((&env, &applog)),
            force_stop_timeout: Duration::from_secs(30),
        };

        // A clean stop left an empty record: nothing runs.
        let recorder = Recorder::new(path.clone());
        recorder
            .application_starting("PRIM")
            .await
            .expect("record written");
        recorder.application_stopped().await;
        assert_eq!(clean_up(cleanup()).await, CleanupReport::default());
        assert!(
            !marker.exists(),
            "stop_prim must not run after a clean stop"
        );

        // A crash while ALONE, with a checker program still running.
        let mut child = {
            use std::os::unix::process::CommandExt;
            std::process::Command::new("sleep")
                .arg("30")
                .process_group(0)
                .spawn()
                .expect("spawn sleep")
        };
        let pgid = i32::try_from(child.id()).expect("pid fits");
        recorder
            .application_starting("ALONE")
            .await
            .expect("record written");
        recorder.group_started("custom.app", pgid).await;
        let report = clean_up(cleanup()).await;
        assert!(report.cleaned && report.application_stopped, "{report:?}");
        assert_eq!(report.groups_killed, vec![pgid]);
        let status = child.wait().expect("reap sleep");
        assert!(
            !status.success(),
            "the checker program was killed: {status:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&marker).expect("stop_prim ran"),
            "force ALONE STOP stop\n"
        );
        modlog.flush().await;
        assert!(
            modlog_text(dir.path()).contains(CLEANUP_MESSAGE),
            "{}",
            modlog_text(dir.path())
        );
        assert!(
            persist::read_leftovers(&path)
                .expect("readable")
                .expect("written")
                .is_empty()
        );

        // Cleared: the next start triggers nothing.
        assert_eq!(clean_up(cleanup()).await, CleanupReport::default());
        assert_eq!(
            std::fs::read_to_string(&marker)
                .expect("stop_prim ran")
                .lines()
                .count(),
            1
        );
    }

    /// A module's script environment in `dir` (scripts in `dir/bin`).
    fn test_env(dir: &Path) -> (ScriptEnv, AppLog) {
        let userbin = dir.join("bin");
        std::fs::create_dir_all(&userbin).expect("bin");
        let env = ScriptEnv {
            safe: dir.into(),
            safebin: dir.into(),
            safevar: dir.into(),
            module: "m".into(),
            userbin,
            userconf: dir.into(),
            uservar: dir.into(),
            user_vars: Default::default(),
        };
        let applog = AppLog {
            path: dir.join("userlog.ulog"),
            max_bytes: 1 << 20,
        };
        (env, applog)
    }

    /// A hook `name` that appends `name <arguments>` to `dir/calls` and exits with `status`.
    fn write_hook(dir: &Path, name: &str, status: i32) {
        let script = format!(
            "#!/bin/sh\necho \"{name} $*\" >> {}\nexit {status}\n",
            dir.join("calls").display()
        );
        let path = dir.join("bin").join(name);
        std::fs::write(&path, script).expect("hook");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }

    #[test]
    fn each_recorded_state_is_stopped_by_its_own_hooks_in_safekit_order() {
        assert_eq!(stop_plan("PRIM"), ("PRIM", vec!["stop_prim", "stop_both"]));
        assert_eq!(
            stop_plan("ALONE"),
            ("ALONE", vec!["stop_prim", "stop_sec", "stop_both"])
        );
        // A SECOND runs no application: no stop_prim, its own hooks innermost first.
        assert_eq!(
            stop_plan("SECOND"),
            ("SECOND", vec!["stop_second", "stop_sec", "stop_both"])
        );
        assert_eq!(
            stop_plan(UNKNOWN_STATE).1,
            vec!["stop_prim", "stop_second", "stop_sec", "stop_both"]
        );
    }

    #[tokio::test]
    async fn a_second_that_crashed_gets_its_second_hooks_forced_not_stop_prim() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = record_path(dir.path());
        let modlog = ModLog::open(dir.path().join("log"), 1 << 20).expect("module log");
        let (env, applog) = test_env(dir.path());
        for hook in ["stop_prim", "stop_second", "stop_sec", "stop_both"] {
            write_hook(dir.path(), hook, 0);
        }
        // SECOND's start hooks are about to run, then the agent crashes.
        let recorder = Recorder::new(path.clone());
        recorder
            .application_starting("SECOND")
            .await
            .expect("record written");
        let report = clean_up(Cleanup {
            path: path.clone(),
            modlog: &modlog,
            netlink: None,
            configured_vips: Some(Vec::new()),
            scripts: Some((&env, &applog)),
            force_stop_timeout: Duration::from_secs(30),
        })
        .await;
        assert!(report.cleaned && report.application_stopped, "{report:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("calls")).expect("hooks ran"),
            "stop_second force SECOND STOP stop\n\
             stop_sec force SECOND STOP stop\n\
             stop_both force SECOND STOP stop\n"
        );
        assert!(report.record.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn the_stop_hooks_of_a_second_clear_the_record_unless_it_started_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = record_path(dir.path());
        let recorder = Recorder::new(path.clone());
        let read = || {
            persist::read_leftovers(&path)
                .expect("readable")
                .expect("written")
        };
        recorder
            .application_starting("SECOND")
            .await
            .expect("record written");
        let stop_queued = recorder.start_count();
        recorder
            .application_stopped_unless_restarted(stop_queued)
            .await;
        assert!(read().is_empty(), "stopped cleanly: nothing recorded");

        // A start recorded while the stop hooks ran keeps the record.
        let stop_queued = recorder.start_count();
        recorder
            .application_starting("SECOND")
            .await
            .expect("record written");
        recorder
            .application_stopped_unless_restarted(stop_queued)
            .await;
        assert_eq!(read().application.as_deref(), Some("SECOND"));
    }

    #[tokio::test]
    async fn a_failed_forced_stop_survives_the_next_change_of_the_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = record_path(dir.path());
        let modlog = ModLog::open(dir.path().join("log"), 1 << 20).expect("module log");
        let (env, applog) = test_env(dir.path());
        write_hook(dir.path(), "stop_prim", 1);
        let previous = Recorder::new(path.clone());
        previous
            .application_starting("PRIM")
            .await
            .expect("record written");

        let report = clean_up(Cleanup {
            path: path.clone(),
            modlog: &modlog,
            netlink: None,
            configured_vips: Some(Vec::new()),
            scripts: Some((&env, &applog)),
            force_stop_timeout: Duration::from_secs(30),
        })
        .await;
        assert!(!report.application_stopped, "{report:?}");
        assert_eq!(report.record.application.as_deref(), Some("PRIM"));

        // The new agent's recorder starts from it: a checker starting keeps the application.
        let recorder = Recorder::new(path.clone());
        recorder.start_from(report.record);
        let mut child = {
            use std::os::unix::process::CommandExt;
            std::process::Command::new("sleep")
                .arg("30")
                .process_group(0)
                .spawn()
                .expect("spawn sleep")
        };
        let pgid = i32::try_from(child.id()).expect("pid fits");
        recorder.group_started("custom.app", pgid).await;
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        let record = persist::read_leftovers(&path)
            .expect("readable")
            .expect("written");
        assert_eq!(record.application.as_deref(), Some("PRIM"), "{record:?}");
        assert_eq!(record.checker_groups.len(), 1);
        assert_eq!(record.agent_pid, std::process::id());
    }

    fn modlog_text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    }
}
