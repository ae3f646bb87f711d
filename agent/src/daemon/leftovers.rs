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
//!   possibly running before `start_prim` runs and cleared after a
//!   `stop_prim` succeeded; the virtual IPs held and the process groups of the
//!   custom checkers' programs are recorded as they change.
//! - When the agent starts, before the module can be started (by boot or by
//!   an operator), [`clean_up`] reads the previous instance's record and, if
//!   anything may be left: logs `the agent stopped without stopping the
//!   application: cleaning up` in the module log, removes the recorded
//!   virtual IPs that are still configured, kills the recorded checker
//!   process groups whose leader still exists with the recorded start time
//!   (`/proc/<pid>/stat` field 22, so a recycled pid is never killed), runs
//!   `stop_prim force` and the other stop hooks of the state left, then clears
//!   the record. An empty record (a clean stop) does nothing at all.
//!
//! It must never kill a process it did not start, nor remove an address that
//! is not one of the module's virtual IPs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
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
/// already taken: the next agent cleans up whatever an older record names).
#[derive(Debug, Clone)]
pub struct Recorder {
    inner: Arc<Mutex<LeftoverRecord>>,
    path: PathBuf,
}

impl Recorder {
    /// A recorder writing to `path`, starting from an empty record (what
    /// [`clean_up`] leaves); nothing is written until something changes.
    pub fn new(path: PathBuf) -> Recorder {
        Recorder {
            inner: Arc::new(Mutex::new(LeftoverRecord {
                boot_id: boot_id(),
                agent_pid: std::process::id(),
                ..LeftoverRecord::default()
            })),
            path,
        }
    }

    /// Applies `change` to the record and writes it if it changed (blocking).
    fn update_blocking(&self, change: impl FnOnce(&mut LeftoverRecord)) {
        let mut record = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = record.clone();
        change(&mut record);
        if *record == before {
            return;
        }
        if let Err(error) = persist::write_leftovers(&self.path, &record) {
            tracing::error!(%error, "cannot record what the module runs (leftovers)");
        }
    }

    /// [`Recorder::update_blocking`] on a blocking thread.
    async fn update(&self, change: impl FnOnce(&mut LeftoverRecord) + Send + 'static) {
        let recorder = self.clone();
        if let Err(error) =
            tokio::task::spawn_blocking(move || recorder.update_blocking(change)).await
        {
            tracing::error!(%error, "cannot record what the module runs (leftovers)");
        }
    }

    /// Before `start_prim` runs in `state`: the application may be running from now on.
    pub async fn application_starting(&self, state: &str) {
        let state = state.to_string();
        self.update(move |record| record.application = Some(state))
            .await;
    }

    /// The application now runs in `state` (ALONE to PRIM and back), if it runs at all.
    pub async fn application_state(&self, state: &str) {
        let state = state.to_string();
        self.update(move |record| {
            if record.application.is_some() {
                record.application = Some(state);
            }
        })
        .await;
    }

    /// After a successful `stop_prim`: the application is stopped.
    pub async fn application_stopped(&self) {
        self.update(|record| record.application = None).await;
    }

    /// The virtual IPs now held, `(interface, address)`.
    pub async fn vips_held(&self, vips: &[(String, IpAddr)]) {
        let vips = vips.to_vec();
        self.update(move |record| record.vips = vips).await;
    }

    /// A custom checker's program started as process group `pgid` (its pid).
    /// Not recorded if the program already exited (nothing to clean up then).
    pub async fn group_started(&self, resource: &str, pgid: i32) {
        let resource = resource.to_string();
        self.update(move |record| {
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
    pub configured_vips: Vec<IpAddr>,
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
    /// `stop_prim force` ran and succeeded (or the module has no stop_prim).
    pub application_stopped: bool,
}

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
                application: Some("PRIM".into()),
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
    // so that the next agent tries again.
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
            "Clean-up after the agent's crash: stop_prim force failed, the application may still be running (see the application log)".to_string()
        } else {
            "Clean-up after the agent's crash done".to_string()
        },
    );
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
        if !cleanup.configured_vips.contains(addr) {
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

/// Runs `stop_prim force <state> STOP stop`, then the other stop hooks of
/// leaving `state` (`stop_sec`, `stop_both`), all forced with
/// `forcestoptimeout`, in the order a stop runs them. Returns whether
/// `stop_prim` succeeded (absent counts as success).
async fn stop_application(cleanup: &Cleanup<'_>, state: &str) -> bool {
    let Some((env, applog)) = cleanup.scripts else {
        return true;
    };
    let current: &'static str = match state {
        "ALONE" => "ALONE",
        _ => "PRIM",
    };
    let mut names = vec!["stop_prim"];
    names.extend(
        scripts::transition_hooks(current, "STOP", "stop")
            .into_iter()
            .filter(|hook| hook.stop)
            .map(|hook| hook.name),
    );
    let mut stop_prim_ok = true;
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
        if name == "stop_prim" {
            stop_prim_ok = success;
        }
    }
    stop_prim_ok
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

        recorder.application_starting("ALONE").await;
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
            configured_vips: Vec::new(),
            scripts: Some((&env, &applog)),
            force_stop_timeout: Duration::from_secs(30),
        };

        // A clean stop left an empty record: nothing runs.
        let recorder = Recorder::new(path.clone());
        recorder.application_starting("PRIM").await;
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
        recorder.application_starting("ALONE").await;
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

    fn modlog_text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    }
}
