//! Running a module's hook scripts the way SafeKit does.
//!
//! A module's `bin/` directory may hold executables named after SafeKit's
//! hooks (`prestart`, `start_prim`, `stop_prim`, `start_both`, `stop_both`,
//! `start_second`, `stop_second`, `transition`, `poststop`, ...). Existing
//! SafeKit scripts must keep working, so they get SafeKit's calling convention:
//!
//! - arguments `<current state> <next state> <action>`, preceded by `force` for
//!   the forced call of a stop script (see [`run_stop_sequence`]);
//! - environment `SAFE`, `SAFEBIN`, `SAFEVAR`, `SAFEMODULE`, `SAFEUSERBIN`,
//!   `SAFEUSERCONF`, `SAFEUSERVAR`, plus the module's `<user><var>` entries, on
//!   top of the agent's own environment; working directory `SAFEUSERBIN`;
//! - stdout and stderr appended to the module's application log, after a header
//!   line naming the script and its arguments;
//! - a timeout (`nicestoptimeout`, `forcestoptimeout`) after which the script's
//!   whole process group is killed with `SIGKILL`.
//!
//! A hook that is not present is a success (logged at debug level).
//!
//! [`transition_hooks`] says which hooks a change of state runs, in which
//! order (pure, unit-tested); [`ScriptQueue`] runs a module's scripts one at
//! a time in the order they were asked for.
//!
//! Each script runs in its own process group, so the timeout also kills what
//! the script started. A script that returns normally may leave processes
//! behind on purpose (a `start_prim` starting the application in the
//! background); those are left alone. The output goes straight to the log
//! file, not through a pipe, so such a background process can keep writing to
//! its inherited stdout after the script has returned.
//!
//! The application log is bounded like the module log (see
//! [`crate::modlog::rotate_if_over`]): it is rotated to `<name>.1` before a run
//! when it has grown past its limit. It should be written only through this
//! module.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::modlog::{Level, format_line, rotate_if_over};

/// The SafeKit environment of a module's scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptEnv {
    /// `SAFE`: the SafeKit installation directory.
    pub safe: PathBuf,
    /// `SAFEBIN`: the directory of SafeKit's helper commands.
    pub safebin: PathBuf,
    /// `SAFEVAR`: the node's variable data directory.
    pub safevar: PathBuf,
    /// `SAFEMODULE`: the module name (lets `safekit` omit `-m` in scripts).
    pub module: String,
    /// `SAFEUSERBIN`: the module's script directory; scripts are looked up and
    /// run there.
    pub userbin: PathBuf,
    /// `SAFEUSERCONF`: the module's configuration directory.
    pub userconf: PathBuf,
    /// `SAFEUSERVAR`: the module's variable data directory.
    pub uservar: PathBuf,
    /// The module's `<user><var name value>` entries, exported as is.
    pub user_vars: BTreeMap<String, String>,
}

impl ScriptEnv {
    /// The environment variables added for a script, in a stable order.
    pub fn variables(&self) -> Vec<(String, String)> {
        let path_var = |name: &str, path: &Path| (name.to_string(), path.display().to_string());
        let mut variables = vec![
            path_var("SAFE", &self.safe),
            path_var("SAFEBIN", &self.safebin),
            path_var("SAFEVAR", &self.safevar),
            ("SAFEMODULE".to_string(), self.module.clone()),
            path_var("SAFEUSERBIN", &self.userbin),
            path_var("SAFEUSERCONF", &self.userconf),
            path_var("SAFEUSERVAR", &self.uservar),
        ];
        variables.extend(
            self.user_vars
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        variables
    }
}

/// Where script output goes: the application log file and its size bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppLog {
    /// The application log file; created if missing.
    pub path: PathBuf,
    /// Size after which the file is rotated to `<path>.1` before a run.
    pub max_bytes: u64,
}

/// One call of a hook script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCall<'a> {
    /// The hook name, which is also the file name in `SAFEUSERBIN`
    /// (`start_prim`, `stop_prim`, `transition`, ...).
    pub name: &'a str,
    /// First argument: the current state (`STOP`, `WAIT`, `ALONE`, `PRIM`, `SECOND`).
    pub current_state: &'a str,
    /// Second argument: the next state.
    pub next_state: &'a str,
    /// Third argument: `start`, `stop`, `stopstart` or `stopwait`.
    pub action: &'a str,
    /// Whether this is the forced call of a stop script (`force` is then the
    /// first argument).
    pub force: bool,
    /// After this long the script's whole process group is killed.
    pub timeout: Duration,
}

impl ScriptCall<'_> {
    /// The script's arguments.
    pub fn arguments(&self) -> Vec<&str> {
        let mut arguments = Vec::with_capacity(4);
        if self.force {
            arguments.push("force");
        }
        arguments.extend([self.current_state, self.next_state, self.action]);
        arguments
    }
}

/// How a script run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptOutcome {
    /// The hook is not present in `SAFEUSERBIN`; counts as a success.
    Absent,
    /// The script exited with status 0.
    Success,
    /// The script exited with this non-zero status.
    Failed(i32),
    /// The script did not finish within its timeout; its process group was
    /// killed.
    TimedOut,
    /// The script was killed by this signal (not by us).
    Killed(i32),
}

impl ScriptOutcome {
    /// Whether the run counts as successful (absent or exit status 0).
    pub fn is_success(self) -> bool {
        matches!(self, ScriptOutcome::Absent | ScriptOutcome::Success)
    }
}

impl std::fmt::Display for ScriptOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScriptOutcome::Absent => write!(f, "absent"),
            ScriptOutcome::Success => write!(f, "exit status 0"),
            ScriptOutcome::Failed(code) => write!(f, "exit status {code}"),
            ScriptOutcome::TimedOut => write!(f, "timed out, process group killed"),
            ScriptOutcome::Killed(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// Why a script could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The application log could not be opened or written.
    #[error("application log {path}: {source}")]
    Log {
        /// The application log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The script exists but could not be inspected or started (e.g. not
    /// executable).
    #[error("cannot run script {path}: {source}")]
    Spawn {
        /// The script.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Waiting for the script failed.
    #[error("waiting for script {path}: {source}")]
    Wait {
        /// The script.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Kills a script's process group if dropped while armed, so that cancelling
/// [`run_script`] does not leave the script running.
struct ProcessGroupGuard {
    process_group: Option<Pid>,
}

impl ProcessGroupGuard {
    fn kill(&mut self) {
        if let Some(process_group) = self.process_group.take() {
            // ESRCH (group already empty) is not an error here.
            let _ = killpg(process_group, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.process_group = None;
    }
}

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Opens the application log for appending (rotating it first if it is over
/// its limit) and writes `header`; returns the file for the script's output.
fn open_log_with_header(log: &AppLog, header: &str) -> Result<std::fs::File, ScriptError> {
    let log_error = |source| ScriptError::Log {
        path: log.path.clone(),
        source,
    };
    if let Some(parent) = log
        .path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(log_error)?;
    }
    rotate_if_over(&log.path, log.max_bytes, header.len() as u64).map_err(log_error)?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log.path)
        .map_err(log_error)?;
    file.write_all(header.as_bytes()).map_err(log_error)?;
    Ok(file)
}

fn append_to_log(log: &AppLog, line: &str) -> Result<(), ScriptError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log.path)
        .and_then(|mut file| file.write_all(line.as_bytes()))
        .map_err(|source| ScriptError::Log {
            path: log.path.clone(),
            source,
        })
}

async fn blocking<T: Send + 'static>(
    log: &AppLog,
    work: impl FnOnce() -> Result<T, ScriptError> + Send + 'static,
) -> Result<T, ScriptError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join_error| {
            Err(ScriptError::Log {
                path: log.path.clone(),
                source: io::Error::other(join_error),
            })
        })
}

/// Runs one hook script and waits for it (at most `call.timeout`).
///
/// # Errors
/// [`ScriptError`] when the script exists but cannot be started, or when the
/// application log cannot be written. A script that runs and fails is not an
/// error: see [`ScriptOutcome`].
///
/// # Cancel safety
/// Dropping the future kills the script's whole process group (as a timeout
/// would) and loses the outcome.
pub async fn run_script(
    env: &ScriptEnv,
    log: &AppLog,
    call: &ScriptCall<'_>,
) -> Result<ScriptOutcome, ScriptError> {
    let script_path = env.userbin.join(call.name);
    match tokio::fs::metadata(&script_path).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(script = call.name, module = %env.module, path = %script_path.display(), "script absent, nothing to run");
            return Ok(ScriptOutcome::Absent);
        }
        Err(source) => {
            return Err(ScriptError::Spawn {
                path: script_path,
                source,
            });
        }
    }
    let arguments = call.arguments();
    let header = format_line(
        SystemTime::now(),
        Level::Script,
        &format!(
            "==== {} {} (module {}, timeout {} s)",
            call.name,
            arguments.join(" "),
            env.module,
            call.timeout.as_secs_f64()
        ),
    );
    let log_for_open = log.clone();
    let output = blocking(log, move || open_log_with_header(&log_for_open, &header)).await?;
    let output_for_stderr = output.try_clone().map_err(|source| ScriptError::Log {
        path: log.path.clone(),
        source,
    })?;

    let mut command = tokio::process::Command::new(&script_path);
    command
        .args(&arguments)
        .envs(env.variables())
        .current_dir(&env.userbin)
        .stdin(Stdio::null())
        .stdout(Stdio::from(output))
        .stderr(Stdio::from(output_for_stderr))
        .process_group(0);
    let mut child = command.spawn().map_err(|source| ScriptError::Spawn {
        path: script_path.clone(),
        source,
    })?;
    let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let mut guard = ProcessGroupGuard {
        process_group: pid.map(Pid::from_raw),
    };
    tracing::info!(script = call.name, module = %env.module, args = ?arguments, pid, "script started");

    let outcome = match tokio::time::timeout(call.timeout, child.wait()).await {
        Ok(Ok(status)) => {
            guard.disarm();
            match (status.code(), status.signal()) {
                (Some(0), _) => ScriptOutcome::Success,
                (Some(code), _) => ScriptOutcome::Failed(code),
                (None, Some(signal)) => ScriptOutcome::Killed(signal),
                (None, None) => ScriptOutcome::Failed(-1),
            }
        }
        Ok(Err(source)) => {
            return Err(ScriptError::Wait {
                path: script_path,
                source,
            });
        }
        Err(_elapsed) => {
            guard.kill();
            // Reap the leader; the rest of the group is reparented and reaped
            // by init.
            let _ = child.wait().await;
            ScriptOutcome::TimedOut
        }
    };
    tracing::info!(script = call.name, module = %env.module, %outcome, "script finished");
    let footer = format_line(
        SystemTime::now(),
        Level::Script,
        &format!("==== {} {}: {outcome}", call.name, arguments.join(" ")),
    );
    let log_for_footer = log.clone();
    blocking(log, move || append_to_log(&log_for_footer, &footer)).await?;
    Ok(outcome)
}

/// Runs a stop hook the way SafeKit does: first the graceful call with
/// `nice_timeout`, then the call with `force` as first argument with
/// `force_timeout`. Returns both outcomes, graceful first.
///
/// # Errors
/// As [`run_script`]; the forced call is skipped if the graceful call errors.
///
/// # Cancel safety
/// As [`run_script`].
pub async fn run_stop_sequence(
    env: &ScriptEnv,
    log: &AppLog,
    graceful: &ScriptCall<'_>,
    force_timeout: Duration,
) -> Result<(ScriptOutcome, ScriptOutcome), ScriptError> {
    let graceful_call = ScriptCall {
        force: false,
        ..graceful.clone()
    };
    let graceful_outcome = run_script(env, log, &graceful_call).await?;
    let forced_call = ScriptCall {
        force: true,
        timeout: force_timeout,
        ..graceful.clone()
    };
    let forced_outcome = run_script(env, log, &forced_call).await?;
    Ok((graceful_outcome, forced_outcome))
}

/// A hook the runner runs on a state change, besides `start_prim`/`stop_prim`
/// (which the state machine drives itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The hook's file name in `SAFEUSERBIN`.
    pub name: &'static str,
    /// First argument: the state being left.
    pub current_state: &'static str,
    /// Second argument: the state being entered.
    pub next_state: &'static str,
    /// Third argument: `start`, `stop` or `stopstart`.
    pub action: &'static str,
    /// A stop hook: graceful call first, then `force` if it failed.
    pub stop: bool,
}

/// The `start_X`/`stop_X` hook pairs beside `start_prim`/`stop_prim`, with
/// the (mirror) states in which X is "on", outermost first.
const HOOK_PAIRS: [(&str, &str, &[&str]); 3] = [
    ("start_both", "stop_both", &["ALONE", "PRIM", "SECOND"]),
    ("start_sec", "stop_sec", &["ALONE", "SECOND"]),
    ("start_second", "stop_second", &["SECOND"]),
];

/// The hooks of a change of state from `from` to `to` (names as `safekit
/// state` prints them), in the order they run: `transition`, the stop hooks
/// of the pairs left (innermost first), the start hooks of the pairs entered
/// (outermost first), and `poststop` when the module stops. A change within
/// one state (SECOND resynchronizing to SECOND up to date) runs nothing.
pub fn transition_hooks(from: &'static str, to: &'static str, action: &'static str) -> Vec<Hook> {
    if from == to {
        return Vec::new();
    }
    let hook = |name, stop| Hook {
        name,
        current_state: from,
        next_state: to,
        action,
        stop,
    };
    let mut hooks = vec![hook("transition", false)];
    for (_, stop_name, states) in HOOK_PAIRS.iter().rev() {
        if states.contains(&from) && !states.contains(&to) {
            hooks.push(hook(stop_name, true));
        }
    }
    for (start_name, _, states) in HOOK_PAIRS {
        if !states.contains(&from) && states.contains(&to) {
            hooks.push(hook(start_name, false));
        }
    }
    if to == "STOP" {
        hooks.push(hook("poststop", false));
    }
    hooks
}

/// The action argument of the scripts a `restart` runs (SafeKit's reference
/// lists only `start`, `stop`, `stopstart` and `stopwait`; a restart's scripts
/// get `<state> <state> restart`, so they can tell it from a real stop).
pub const RESTART_ACTION: &str = "restart";

/// The hooks a `restart` runs besides `stop_prim`/`start_prim`, in order:
/// `stop_both` then `start_both` (SafeKit runs only the application scripts,
/// `stop_prim;start_prim` and `stop_both;start_both`), with the arguments
/// `<state> <state> restart`. They run between `stop_prim` and `start_prim` on
/// ALONE/PRIM, and alone on SECOND; no other state runs the application.
pub fn restart_hooks(state: &'static str) -> Vec<Hook> {
    if !["ALONE", "PRIM", "SECOND"].contains(&state) {
        return Vec::new();
    }
    [("stop_both", true), ("start_both", false)]
        .into_iter()
        .map(|(name, stop)| Hook {
            name,
            current_state: state,
            next_state: state,
            action: RESTART_ACTION,
            stop,
        })
        .collect()
}

type ScriptJob = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs a module's scripts one after the other, in the order they were
/// queued, so that `start_both` has finished before `start_prim` starts and
/// `poststop` runs after the stop hooks. A job is a whole script run (with
/// its logging and its report); one that hangs holds the queue until its
/// timeout kills it.
#[derive(Debug, Clone)]
pub struct ScriptQueue {
    jobs: tokio::sync::mpsc::UnboundedSender<ScriptJob>,
}

impl ScriptQueue {
    /// A queue and its worker task (which ends when every clone is dropped).
    pub fn spawn() -> ScriptQueue {
        let (jobs, mut receiver) = tokio::sync::mpsc::unbounded_channel::<ScriptJob>();
        tokio::spawn(async move {
            while let Some(job) = receiver.recv().await {
                job.await;
            }
        });
        ScriptQueue { jobs }
    }

    /// Queues `job` after every job queued before it.
    pub fn push(&self, job: impl std::future::Future<Output = ()> + Send + 'static) {
        if self.jobs.send(Box::pin(job)).is_err() {
            tracing::error!("the script queue has stopped: script not run");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_calls_get_force_as_first_argument() {
        let call = ScriptCall {
            name: "stop_prim",
            current_state: "PRIM",
            next_state: "STOP",
            action: "stop",
            force: true,
            timeout: Duration::from_secs(300),
        };
        assert_eq!(call.arguments(), ["force", "PRIM", "STOP", "stop"]);
        let graceful = ScriptCall {
            force: false,
            ..call
        };
        assert_eq!(graceful.arguments(), ["PRIM", "STOP", "stop"]);
    }

    #[test]
    fn environment_has_safekit_variables_then_user_vars() {
        let env = ScriptEnv {
            safe: "/opt/safekit".into(),
            safebin: "/opt/safekit/private/bin".into(),
            safevar: "/opt/safekit/var".into(),
            module: "mirror".into(),
            userbin: "/opt/safekit/private/modules/mirror/bin".into(),
            userconf: "/opt/safekit/private/modules/mirror/conf".into(),
            uservar: "/opt/safekit/var/modules/mirror".into(),
            user_vars: BTreeMap::from([("APP_PORT".to_string(), "8080".to_string())]),
        };
        let names: Vec<String> = env.variables().into_iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "SAFE",
                "SAFEBIN",
                "SAFEVAR",
                "SAFEMODULE",
                "SAFEUSERBIN",
                "SAFEUSERCONF",
                "SAFEUSERVAR",
                "APP_PORT"
            ]
        );
        assert!(
            env.variables()
                .contains(&("SAFEMODULE".into(), "mirror".into()))
        );
    }
    fn names(hooks: &[Hook]) -> Vec<String> {
        hooks
            .iter()
            .map(|hook| {
                format!(
                    "{} {} {} {}",
                    hook.name, hook.current_state, hook.next_state, hook.action
                )
            })
            .collect()
    }

    #[test]
    fn entering_alone_runs_transition_then_the_start_hooks_outermost_first() {
        assert_eq!(
            names(&transition_hooks("WAIT", "ALONE", "start")),
            [
                "transition WAIT ALONE start",
                "start_both WAIT ALONE start",
                "start_sec WAIT ALONE start"
            ]
        );
        assert_eq!(
            names(&transition_hooks("WAIT", "SECOND", "start")),
            [
                "transition WAIT SECOND start",
                "start_both WAIT SECOND start",
                "start_sec WAIT SECOND start",
                "start_second WAIT SECOND start"
            ]
        );
    }

    #[test]
    fn failover_and_failback_only_run_the_hooks_of_the_sets_left_or_entered() {
        assert_eq!(
            names(&transition_hooks("SECOND", "ALONE", "start")),
            [
                "transition SECOND ALONE start",
                "stop_second SECOND ALONE start"
            ]
        );
        assert_eq!(
            names(&transition_hooks("ALONE", "PRIM", "start")),
            ["transition ALONE PRIM start", "stop_sec ALONE PRIM start"]
        );
        assert_eq!(
            names(&transition_hooks("PRIM", "ALONE", "start")),
            ["transition PRIM ALONE start", "start_sec PRIM ALONE start"]
        );
    }

    #[test]
    fn stopping_runs_the_stop_hooks_innermost_first_then_poststop() {
        let hooks = transition_hooks("SECOND", "STOP", "stopstart");
        assert_eq!(
            names(&hooks),
            [
                "transition SECOND STOP stopstart",
                "stop_second SECOND STOP stopstart",
                "stop_sec SECOND STOP stopstart",
                "stop_both SECOND STOP stopstart",
                "poststop SECOND STOP stopstart"
            ]
        );
        let stops: Vec<bool> = hooks.iter().map(|hook| hook.stop).collect();
        assert_eq!(stops, [false, true, true, true, false]);
        assert_eq!(
            names(&transition_hooks("WAIT", "STOP", "stop")),
            ["transition WAIT STOP stop", "poststop WAIT STOP stop"]
        );
        assert!(transition_hooks("SECOND", "SECOND", "start").is_empty());
    }

    #[test]
    fn restart_runs_stop_both_then_start_both_with_the_restart_arguments() {
        for state in ["ALONE", "PRIM", "SECOND"] {
            let hooks = restart_hooks(state);
            assert_eq!(
                names(&hooks),
                [
                    format!("stop_both {state} {state} restart"),
                    format!("start_both {state} {state} restart")
                ]
            );
            let stops: Vec<bool> = hooks.iter().map(|hook| hook.stop).collect();
            assert_eq!(stops, [true, false]);
        }
        assert!(restart_hooks("WAIT").is_empty());
        assert!(restart_hooks("STOP").is_empty());
    }

    #[tokio::test]
    async fn the_queue_runs_jobs_one_after_the_other_in_order() {
        let queue = ScriptQueue::spawn();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (done, finished) = tokio::sync::oneshot::channel();
        for index in 0..3u64 {
            let order = order.clone();
            queue.push(async move {
                // The first job yields longest: a concurrent runner would finish it last.
                for _ in 0..(3 - index) * 10 {
                    tokio::task::yield_now().await;
                }
                order.lock().expect("not poisoned").push(index);
            });
        }
        queue.push(async move {
            let _ = done.send(());
        });
        finished.await.expect("the last job ran");
        assert_eq!(*order.lock().expect("not poisoned"), [0, 1, 2]);
    }
}
