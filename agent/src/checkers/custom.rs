//! Custom checkers' programs: long-running programs of the module that report a resource.
//!
//! SafeKit's `<custom ident when exec arg action/>` runs `exec` (relative to
//! `SAFEUSERBIN`, the module's `bin/`) while the checker's `when` holds; the
//! program watches whatever it likes and calls `safekit set -r
//! custom.<ident> -v up|down -i <ident>`, which reaches the runner as an
//! observation ([`super::CheckerSet::set`]). This module only keeps the
//! programs running at the right times:
//!
//! - [`CustomPrograms::sync`] starts the programs whose checker is active in
//!   the module's state (or whose resource a `wait` rule waits for), and stops
//!   the others by killing their whole process group;
//! - a program that exits is started again after a back-off (1 s, doubling up
//!   to 30 s; back to 1 s once it has run for a minute), each exit logged in
//!   the module log;
//! - its output goes to the application log, with the scripts' environment
//!   (`SAFE`, `SAFEMODULE`, `SAFEUSERBIN`, ...);
//! - its process group is recorded durably while it runs, so that the next
//!   agent kills it if this one is killed ([`crate::daemon::leftovers`]).
//!
//! It must never decide anything about the module: values go through
//! `safekit set`, decisions through the checker set and the core's rules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use safekit_core::cluster::State;
use tokio::fs::OpenOptions;

use super::{CheckerSpec, Probe};
use crate::daemon::leftovers::Recorder;
use crate::modlog::{self, ModLog};
use crate::scripts::{AppLog, ScriptEnv};

/// The first delay before a program that exited is started again.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between two starts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A program that ran this long is healthy again: the back-off starts over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The running programs of one module's custom checkers, by resource.
#[derive(Debug, Default)]
pub struct CustomPrograms {
    running: BTreeMap<String, tokio::task::JoinHandle<()>>,
}

/// What a program needs besides its checker.
#[derive(Debug, Clone)]
pub struct ProgramContext {
    /// The scripts' environment (the program runs in `SAFEUSERBIN` with it).
    pub env: ScriptEnv,
    /// Where its output goes.
    pub applog: AppLog,
    /// Where its exits are logged.
    pub modlog: ModLog,
    /// Where its process group is recorded while it runs, so that the next
    /// agent can kill it after a crash ([`crate::daemon::leftovers`]).
    pub leftovers: Option<Recorder>,
}

impl CustomPrograms {
    /// Starts the programs that must run in `state` and stops the others.
    ///
    /// A program runs while its checker's class holds in `state`, or while
    /// the module waits for its resource (so that it can report it up again).
    /// Scripts running (transient states) do not stop it.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn sync(
        &mut self,
        specs: &[CheckerSpec],
        context: &ProgramContext,
        state: State,
        waiting_for: &BTreeSet<String>,
    ) {
        // Checkers removed by a new configuration.
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|resource| !specs.iter().any(|spec| &spec.resource == *resource))
            .cloned()
            .collect();
        for resource in gone {
            if let Some(task) = self.running.remove(&resource) {
                task.abort();
            }
        }
        for spec in specs {
            let Probe::Custom { exec, args } = &spec.probe else {
                continue;
            };
            let wanted = spec.class.active_in(state) || waiting_for.contains(&spec.resource);
            let running = self
                .running
                .get(&spec.resource)
                .is_some_and(|task| !task.is_finished());
            if wanted && !running {
                let task = tokio::spawn(supervise(
                    spec.resource.clone(),
                    exec.clone(),
                    args.clone(),
                    context.clone(),
                ));
                self.running.insert(spec.resource.clone(), task);
            } else if !wanted && let Some(task) = self.running.remove(&spec.resource) {
                // Aborting drops the task's group guard, which kills the program's process group.
                task.abort();
                context.modlog.log(
                    modlog::Level::Info,
                    format!("Custom checker {}: {exec} stopped ({state})", spec.resource),
                );
            }
        }
    }
}

impl Drop for CustomPrograms {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

/// Kills a program's process group when dropped (the supervising task ended
/// or was aborted), and removes it from the module's leftovers record.
struct GroupGuard(Option<Pid>, Option<Recorder>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            // ESRCH: the group is already gone.
            let _ = killpg(group, Signal::SIGKILL);
            if let Some(recorder) = &self.1 {
                recorder.group_ended(group.as_raw());
            }
        }
    }
}

/// The path of `exec`: absolute as is, else under `SAFEUSERBIN`.
pub fn program_path(userbin: &std::path::Path, exec: &str) -> PathBuf {
    let path = std::path::Path::new(exec);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        userbin.join(exec.trim_start_matches("./"))
    }
}

/// Runs the program, and again after a back-off each time it exits; never returns by itself.
///
/// # Cancel safety
/// Meant to be aborted: the program's process group is killed then.
async fn supervise(resource: String, exec: String, args: Vec<String>, context: ProgramContext) {
    let path = program_path(&context.env.userbin, &exec);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let mut guard = GroupGuard(None, context.leftovers.clone());
        let outcome = match spawn(&path, &args, &context).await {
            Ok(mut child) => {
                guard.0 = child
                    .id()
                    .and_then(|pid| i32::try_from(pid).ok())
                    .map(Pid::from_raw);
                if let (Some(recorder), Some(group)) = (&context.leftovers, guard.0) {
                    recorder.group_started(&resource, group.as_raw()).await;
                }
                tracing::info!(%resource, program = %path.display(), pid = ?child.id(), "custom checker started");
                context.modlog.log(
                    modlog::Level::Info,
                    format!("Custom checker {resource}: {exec} started"),
                );
                match child.wait().await {
                    Ok(status) => format!("exited ({status})"),
                    Err(error) => format!("cannot be waited for: {error}"),
                }
            }
            Err(error) => format!("cannot be started: {error}"),
        };
        // Whatever the program left behind in its group goes with it.
        drop(guard);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        context.modlog.log(
            modlog::Level::Critical,
            format!(
                "Custom checker {resource}: {} {outcome}; started again in {} s",
                path.display(),
                backoff.as_secs()
            ),
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn spawn(
    path: &std::path::Path,
    args: &[String],
    context: &ProgramContext,
) -> std::io::Result<tokio::process::Child> {
    // Opened off the runtime's threads (a slow disk must not stall the agent).
    let output = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&context.applog.path)
        .await?
        .into_std()
        .await;
    let errors = output.try_clone()?;
    tokio::process::Command::new(path)
        .args(args)
        .envs(context.env.variables())
        .current_dir(&context.env.userbin)
        .stdin(Stdio::null())
        .stdout(Stdio::from(output))
        .stderr(Stdio::from(errors))
        .process_group(0)
        .spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_the_module_bin() {
        let userbin = std::path::Path::new("/opt/safekit/modules/m/bin");
        assert_eq!(
            program_path(userbin, "check_app"),
            userbin.join("check_app")
        );
        assert_eq!(
            program_path(userbin, "./check_app"),
            userbin.join("check_app")
        );
        assert_eq!(
            program_path(userbin, "/usr/local/bin/probe"),
            PathBuf::from("/usr/local/bin/probe")
        );
    }
}
