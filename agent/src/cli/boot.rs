//! `safekit boot on|off|status [-m M]` and `safekit shutdown`: a module's
//! "start at boot" switch, and the clean stop the systemd unit runs.
//!
//! # The switch
//!
//! SafeKit's runtime switch `boot` (resource `usersetting.boot`) says whether
//! the agent starts the module when it starts. It is a small text file,
//! `SAFEVAR/modules/<AM>/usersetting.boot`, holding `on` or `off`, replaced
//! atomically (temporary file, fsync, rename, directory fsync), so it works
//! with the agent down and survives a crash in the middle of a change. No
//! file means `off`, SafeKit's default: an operator turns boot on once the
//! module runs correctly on both nodes.
//!
//! `<service boot="on|off">` in `userconfig.xml` overrides the switch;
//! `boot="ignore"` (the default) follows it; `boot="auto"` (SafeKit: restart
//! at boot if it was running) is not implemented and follows the switch.
//!
//! # When the agent starts
//!
//! Every start of the agent follows one rule, whatever the reason for the
//! start (machine boot, `systemctl start`, systemd's restart after a crash,
//! an agent killed with `kill -9` and started again): every module begins in
//! STOP; a module whose boot is on is then started with `start`, logged as
//! `Action start called by boot`, after `<service boot_delay>`; the others
//! stay STOP until an operator starts them. The persisted role is never
//! resumed directly: `start` goes through WAIT and the persisted generation
//! histories decide, with the peer, whether this node becomes PRIM, ALONE,
//! SECOND or stays WAIT (not up to date), exactly as for an operator's start.
//!
//! # `safekit shutdown`
//!
//! Stops every running module of the node (as `stop`, logged as called by
//! `shutdown`) and waits until each is STOP: stop_prim runs with its
//! timeouts, the virtual IP is released and a PRIM's peer takes over cleanly.
//! The systemd unit runs it as `ExecStop`, so stopping the service (and
//! shutting the machine down) never leaves applications running without
//! their agent. It does not change the boot switches.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use safekit_core::config::Boot;
use safekit_protocol::admin::{AdminRequest, AdminResponse, Caller, Verb};

use super::control::request;
use super::module::{installed, node_paths};
use crate::daemon::load::NodePaths;

/// The switch's file name in `SAFEVAR/modules/<AM>/`.
pub const SWITCH_FILE: &str = "usersetting.boot";

/// How long `safekit shutdown` waits for all modules to reach STOP: beyond
/// SafeKit's default `nicestoptimeout` plus `forcestoptimeout` (300 s each).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(660);

/// `safekit boot ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum BootCommand {
    /// Start the module when the agent starts (machine boot, service restart).
    On(BootModuleArg),
    /// Leave the module in STOP when the agent starts (the default).
    Off(BootModuleArg),
    /// Show the boot setting of one module, or of every module.
    Status(BootStatusArgs),
}

/// The module of `boot on|off`.
#[derive(Debug, Clone, Args)]
pub struct BootModuleArg {
    /// The application module (default: $SAFEMODULE, set for scripts).
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
}

/// `boot status [-m M]`.
#[derive(Debug, Clone, Args)]
pub struct BootStatusArgs {
    /// Only this module (default: every module installed in SAFE/modules).
    #[arg(short = 'm', long = "module")]
    pub module: Option<String>,
}

/// Why the switch file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BootFileError {
    /// A file system operation failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file holds something else than `on` or `off`.
    #[error("{path}: expected `on` or `off`, found {content:?}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What it holds (trimmed).
        content: String,
    },
}

/// `SAFEVAR/modules/<module>/usersetting.boot`.
pub fn switch_path(var: &Path, module: &str) -> PathBuf {
    var.join("modules").join(module).join(SWITCH_FILE)
}

/// The switch of `module`: `None` when never set (which means off).
///
/// # Errors
/// The file exists but cannot be read, or holds neither `on` nor `off`.
pub fn read_switch(var: &Path, module: &str) -> Result<Option<bool>, BootFileError> {
    let path = switch_path(var, module);
    match fs::read_to_string(&path) {
        Ok(content) => match content.trim() {
            "on" => Ok(Some(true)),
            "off" => Ok(Some(false)),
            other => Err(BootFileError::Invalid {
                path,
                content: other.to_string(),
            }),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BootFileError::Io {
            operation: "read",
            path,
            source,
        }),
    }
}

/// Writes the switch of `module` atomically: after a crash the file holds
/// the old or the new value, never a mix.
///
/// # Errors
/// Any failed file system operation, with the path.
pub fn write_switch(var: &Path, module: &str, on: bool) -> Result<(), BootFileError> {
    let path = switch_path(var, module);
    let dir = path
        .parent()
        .expect("a switch path has a module folder")
        .to_path_buf();
    let io_error = |operation: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| BootFileError::Io {
            operation,
            path,
            source,
        }
    };
    fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
    let temporary = dir.join(format!(".{SWITCH_FILE}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(io_error("create", &temporary))?;
    file.write_all(if on { b"on\n" } else { b"off\n" })
        .map_err(io_error("write", &temporary))?;
    file.sync_all().map_err(io_error("fsync", &temporary))?;
    drop(file);
    fs::rename(&temporary, &path).map_err(io_error("rename", &path))?;
    File::open(&dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error("fsync", &dir))?;
    Ok(())
}

/// Whether the agent starts a module, from its `<service boot>` attribute
/// and its switch, with the reason in words (for `boot status`, `state -v`
/// and the agent's log).
pub fn effective(configured: Boot, switch: Option<bool>) -> (bool, String) {
    match configured {
        Boot::On => (true, "on (userconfig.xml boot=\"on\")".into()),
        Boot::Off => (false, "off (userconfig.xml boot=\"off\")".into()),
        Boot::Ignore | Boot::Auto => {
            let on = switch.unwrap_or(false);
            let word = if on { "on" } else { "off" };
            let note = match (configured, switch) {
                (Boot::Auto, _) => {
                    " (userconfig.xml boot=\"auto\" is not supported: the switch decides)"
                }
                (_, None) => " (default)",
                _ => "",
            };
            (on, format!("{word}{note}"))
        }
    }
}

/// The `<service boot>` attribute of an installed module, `ignore` when the
/// configuration cannot be read (the agent refuses such a module anyway).
pub fn configured_boot(paths: &NodePaths, module: &str) -> Boot {
    let file = paths
        .modules()
        .join(module)
        .join("conf")
        .join("userconfig.xml");
    fs::read_to_string(&file)
        .ok()
        .and_then(|text| safekit_core::config::parse_userconfig("userconfig.xml", &text).ok())
        .map_or(Boot::Ignore, |config| config.service.boot)
}

fn check_module(paths: &NodePaths, module: &str) -> Result<(), String> {
    let simple = !module.is_empty()
        && module != "."
        && module != ".."
        && !module.contains('/')
        && !module.contains('\0');
    if !simple {
        return Err(format!("invalid module name {module:?}"));
    }
    if !installed(paths)?.iter().any(|name| name == module) {
        return Err(format!(
            "module {module} is not installed in {}",
            paths.modules().display()
        ));
    }
    Ok(())
}

fn agent_running(paths: &NodePaths) -> bool {
    std::os::unix::net::UnixStream::connect(paths.admin_socket()).is_ok()
}

/// Runs one `safekit boot` verb; 0 done, 1 refused or failed (reason on stderr).
pub fn run(command: BootCommand) -> ExitCode {
    let paths = node_paths();
    let result = match command {
        BootCommand::On(arg) => set(&paths, &arg.module, true),
        BootCommand::Off(arg) => set(&paths, &arg.module, false),
        BootCommand::Status(args) => status(&paths, args.module.as_deref()).map(|lines| {
            for line in lines {
                println!("{line}");
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("safekit: boot: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// `boot on|off -m module`: writes the switch, then tells the agent if it runs.
fn set(paths: &NodePaths, module: &str, on: bool) -> Result<(), String> {
    check_module(paths, module)?;
    write_switch(&paths.var, module, on).map_err(|error| error.to_string())?;
    let word = if on { "on" } else { "off" };
    let (effective_on, description) = effective(configured_boot(paths, module), Some(on));
    if effective_on != on {
        println!("boot {word} for {module}, but {description}");
    } else {
        println!("boot {word} for {module}");
    }
    if !agent_running(paths) {
        println!("(the agent is not running: the setting applies when it starts)");
        return Ok(());
    }
    match request(&AdminRequest::Boot {
        module: module.to_string(),
        on,
    }) {
        Ok(AdminResponse::Ok { .. }) => Ok(()),
        // The file is the setting; a module the agent does not run (invalid
        // configuration) still gets it for its next start.
        Ok(AdminResponse::Refused { reason }) => {
            println!("(the agent did not take note: {reason})");
            Ok(())
        }
        Ok(other) => Err(format!("unexpected answer from the agent: {other:?}")),
        Err(error) => {
            println!("(the agent could not be told: {error})");
            Ok(())
        }
    }
}

/// `boot status [-m module]`: one `<module>: on|off[ (why)]` line per module.
///
/// # Errors
/// Unknown module, unreadable switch file or module folder.
pub fn status(paths: &NodePaths, module: Option<&str>) -> Result<Vec<String>, String> {
    let modules = match module {
        Some(module) => {
            check_module(paths, module)?;
            vec![module.to_string()]
        }
        None => installed(paths)?,
    };
    let mut lines = Vec::new();
    for module in modules {
        let switch = read_switch(&paths.var, &module).map_err(|error| error.to_string())?;
        let (_, description) = effective(configured_boot(paths, &module), switch);
        lines.push(format!("{module}: {description}"));
    }
    Ok(lines)
}

/// `safekit shutdown`: stops every running module and waits until all are STOP.
pub fn shutdown() -> ExitCode {
    let paths = node_paths();
    if !agent_running(&paths) {
        println!("the agent is not running: nothing to stop");
        return ExitCode::SUCCESS;
    }
    let running = match states() {
        Ok(states) => states
            .into_iter()
            .filter(|(_, state)| state != "STOP")
            .map(|(module, _)| module)
            .collect::<Vec<_>>(),
        Err(reason) => {
            eprintln!("safekit: shutdown: {reason}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for module in &running {
        match request(&AdminRequest::Control {
            module: module.clone(),
            verb: Verb::Stop,
            caller: Caller::Agent {
                identity: "shutdown".into(),
            },
        }) {
            Ok(AdminResponse::Ok { .. }) => println!("stopping {module}"),
            Ok(AdminResponse::Refused { reason }) => {
                eprintln!("safekit: shutdown: stop {module}: {reason}");
                failed = true;
            }
            Ok(other) => {
                eprintln!("safekit: shutdown: stop {module}: unexpected answer {other:?}");
                failed = true;
            }
            Err(error) => {
                eprintln!("safekit: shutdown: stop {module}: {error}");
                failed = true;
            }
        }
    }
    let started = Instant::now();
    loop {
        match states() {
            Ok(states) => {
                let still: Vec<String> = states
                    .into_iter()
                    .filter(|(module, state)| running.contains(module) && state != "STOP")
                    .map(|(module, state)| format!("{module} ({state})"))
                    .collect();
                if still.is_empty() {
                    break;
                }
                if started.elapsed() > SHUTDOWN_WAIT {
                    eprintln!(
                        "safekit: shutdown: still running after {} s: {}",
                        SHUTDOWN_WAIT.as_secs(),
                        still.join(", ")
                    );
                    return ExitCode::FAILURE;
                }
            }
            Err(reason) => {
                eprintln!("safekit: shutdown: {reason}");
                return ExitCode::FAILURE;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "shutdown: {} module(s) stopped{}",
        running.len(),
        if running.is_empty() {
            String::new()
        } else {
            format!(": {}", running.join(", "))
        }
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Every module's state, from the agent.
fn states() -> Result<Vec<(String, String)>, String> {
    match request(&AdminRequest::State {
        module: None,
        verbose: false,
    })? {
        AdminResponse::States(states) => Ok(states
            .into_iter()
            .map(|status| (status.module, status.state))
            .collect()),
        AdminResponse::Refused { reason } => Err(reason),
        other => Err(format!("unexpected answer from the agent: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_round_trips_and_defaults_to_off() {
        let var = tempfile::tempdir().expect("temporary SAFEVAR");
        assert_eq!(read_switch(var.path(), "m").expect("read"), None);
        write_switch(var.path(), "m", true).expect("write on");
        assert_eq!(read_switch(var.path(), "m").expect("read"), Some(true));
        assert_eq!(
            fs::read_to_string(switch_path(var.path(), "m")).expect("read the file"),
            "on\n"
        );
        write_switch(var.path(), "m", false).expect("write off");
        assert_eq!(read_switch(var.path(), "m").expect("read"), Some(false));
        let leftovers: Vec<_> = fs::read_dir(var.path().join("modules").join("m"))
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, [SWITCH_FILE], "no temporary file is left");
    }

    #[test]
    fn garbage_in_the_switch_file_is_an_error_naming_the_file() {
        let var = tempfile::tempdir().expect("temporary SAFEVAR");
        write_switch(var.path(), "m", true).expect("write");
        fs::write(switch_path(var.path(), "m"), "yes\n").expect("overwrite");
        let error = read_switch(var.path(), "m")
            .expect_err("garbage refused")
            .to_string();
        assert!(
            error.contains(SWITCH_FILE) && error.contains("\"yes\""),
            "{error}"
        );
    }

    #[test]
    fn the_configuration_overrides_the_switch() {
        assert_eq!(
            effective(Boot::Ignore, None),
            (false, "off (default)".into())
        );
        assert_eq!(effective(Boot::Ignore, Some(true)), (true, "on".into()));
        assert!(!effective(Boot::Off, Some(true)).0);
        assert!(effective(Boot::On, Some(false)).0);
        assert!(effective(Boot::Auto, Some(true)).0);
        assert!(!effective(Boot::Auto, None).0);
    }
}
