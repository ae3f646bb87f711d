//! The `safekit` verbs that talk to the local agent: control, state, log, print, module, cluster genkey.
//!
//! Every verb is one request on the admin socket `SAFEVAR/run/admin.sock`
//! (`SAFEVAR` from the environment, default `/var/safekit`), which only root
//! may use. The module comes from `-m` or, inside scripts, from `SAFEMODULE`.
//!
//! Exit status (all verbs): 0 done; 1 refused or failed, with the reason on
//! stderr in one line (agent down, unknown module, the state machine said no).
//! `state -q` is the exception: it exits with the state's code, STOP 0,
//! WAIT 1, ALONE 2, PRIM 3, SECOND 4, and 5 when the state cannot be read.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use safekit_protocol::admin::{
    AdminRequest, AdminResponse, Caller, ModuleStatus, PrintLevel, Verb, state_exit_code,
};

use crate::admin_socket;
use crate::daemon::load::{admin_socket_path, secret_path};

/// How long the command waits for the agent's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `state -q` exit status when the state cannot be read.
pub const STATE_UNKNOWN_EXIT: u8 = 5;

/// The module a verb applies to.
#[derive(Debug, Clone, Args)]
pub struct ModuleArg {
    /// The application module (default: $SAFEMODULE, set for scripts).
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// Identity of the caller when a script or checker runs the verb (shown in the module log).
    #[arg(short = 'i', long = "identity")]
    pub identity: Option<String>,
}

/// `safekit state`.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// Only this module (default: every module of the node).
    #[arg(short = 'm', long = "module")]
    pub module: Option<String>,
    /// Details: readiness, peer, LANs, virtual IP, resync progress, last transition and its reason.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Print only the state name (STOP, WAIT, ALONE, PRIM, SECOND).
    #[arg(short = 'l')]
    pub short: bool,
    /// Exit with the state's code: STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4 (5: unknown). Needs -m.
    #[arg(short = 'q', requires = "module")]
    pub exit_code: bool,
}

/// `safekit log`.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// The module.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// How many of the last lines to show.
    #[arg(short = 's', long = "size", default_value_t = 300)]
    pub lines: u32,
    /// The verbose log (adds the `I` information lines).
    #[arg(short = 'A', long = "all")]
    pub verbose: bool,
}

/// `safekit printe|printw|printi`.
#[derive(Debug, Clone, Args)]
pub struct PrintArgs {
    /// The module (default: $SAFEMODULE, set for scripts).
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// The message.
    pub message: Vec<String>,
}

/// `safekit module ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ModuleCommand {
    /// List the modules the agent runs (and those it could not start); with the agent down, those in SAFE/modules.
    List,
    /// Install a `.safe` package as SAFE/modules/NAME (validated first; a refused package changes nothing).
    Install(super::module::InstallArgs),
    /// Remove SAFE/modules/NAME (refused while the agent runs the module).
    Uninstall(super::module::UninstallArgs),
}

/// `safekit cluster ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Write a new random cluster secret to SAFEVAR/cluster/secret (mode 0600); copy it to every node.
    Genkey {
        /// Replace an existing secret (the nodes then need the new one to hear each other).
        #[arg(long)]
        force: bool,
    },
    /// Validate a cluster.xml (FILE, or SAFEVAR/cluster/cluster.xml), install it atomically and have the agent reload it; refused while a module runs.
    Config {
        /// The new cluster.xml [default: SAFEVAR/cluster/cluster.xml, reloaded as is].
        file: Option<PathBuf>,
    },
}

/// The verbs handled by the agent (flattened into the `safekit` command).
#[derive(Debug, Clone, Subcommand)]
pub enum AgentCommand {
    /// Start the module: primary only if its data is up to date, otherwise WAIT for the peer.
    Start(ModuleArg),
    /// Stop the module: stop_prim, remove the virtual IP, stop replication; a PRIM's peer takes over.
    Stop(ModuleArg),
    /// Stop, running stop_prim with `force`, for when a plain stop has no effect.
    Forcestop(ModuleArg),
    /// Restart the application scripts (PRIM/ALONE: stop_prim, stop_both, start_both, start_prim; SECOND: stop_both, start_both); the state is kept.
    Restart(ModuleArg),
    /// Exchange the PRIM and SECOND roles.
    Swap(ModuleArg),
    /// Force a start as primary (ALONE), even when this node's data is not known to be up to date.
    Prim(ModuleArg),
    /// Force a start as primary even after an interrupted reintegration (data may be inconsistent).
    Primforce(ModuleArg),
    /// Force a start as secondary; refused unless the peer is primary.
    Second(ModuleArg),
    /// Show module states (exit codes of -q: STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4, 5 unknown).
    State(StateArgs),
    /// Show the end of a module's log.
    Log(LogArgs),
    /// Write an error message to the module log (for scripts).
    Printe(PrintArgs),
    /// Write a warning message to the module log (for scripts).
    Printw(PrintArgs),
    /// Write an information message to the verbose module log (for scripts).
    Printi(PrintArgs),
    /// Installed modules.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Start at boot: whether the agent starts a module when it starts (persistent; works with the agent down).
    #[command(subcommand)]
    Boot(super::boot::BootCommand),
    /// Stop every running module and wait until all are STOP (the systemd unit's ExecStop).
    Shutdown,
    /// Set a custom checker's resource: `set -r custom.<ident> -v up|down -i <ident>` (for checker programs).
    Set(super::resource::SetArgs),
    /// Show a resource's value: up, down or init.
    Get(super::resource::GetArgs),
    /// Stop the module, then start it again (on PRIM the peer takes over first, so this node comes back SECOND).
    Stopstart(ModuleArg),
    /// Versions of the command and the agent, protocol versions, build features, licence; with -m, the module's too.
    Level(super::level::LevelArgs),
    /// Validate SAFE/modules/M/conf/userconfig.xml as `config -m M` would, without applying it.
    Confcheck(super::apply::ConfcheckArgs),
    /// Block until the module's start has completed (ALONE, PRIM, SECOND, UP Ready, or WAIT); -t SECONDS: exit 1 on timeout.
    Waitstart(super::wait::WaitArgs),
    /// Block until the module is STOP; -t SECONDS: exit 1 on timeout.
    Waitstop(super::wait::WaitArgs),
    /// Block until the module is in one of the STATEs (comma-separated), stable; -t SECONDS: exit 1 on timeout.
    Waitstate(super::wait::WaitStateArgs),
}

fn safevar() -> PathBuf {
    std::env::var_os("SAFEVAR").map_or_else(|| PathBuf::from("/var/safekit"), PathBuf::from)
}

/// Sends one request to the local agent (with `safekit -H`, to the node being addressed).
///
/// # Errors
/// A one-line reason: agent not running, permission denied, timeout.
pub fn request(request: &AdminRequest) -> Result<AdminResponse, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))?;
    // `safekit -H`: the request goes to the node `cli::remote` is working on.
    if let Some(remote) = crate::remote_admin::current_target() {
        return runtime
            .block_on(crate::remote_admin::send(
                &remote.target,
                &remote.secret,
                request,
                REQUEST_TIMEOUT,
            ))
            .map_err(|error| error.to_string());
    }
    let path = admin_socket_path(&safevar());
    runtime
        .block_on(admin_socket::request::<AdminRequest, AdminResponse>(
            &path,
            request,
            REQUEST_TIMEOUT,
        ))
        .map_err(|error| error.to_string())
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("safekit: {message}");
    ExitCode::FAILURE
}

/// Runs one agent verb and returns the process's exit status.
pub fn run(command: AgentCommand) -> ExitCode {
    let control = |verb: Verb, arg: ModuleArg| {
        let caller = match arg.identity {
            Some(identity) => Caller::Agent { identity },
            None => Caller::Local {
                uid: nix::unistd::getuid().as_raw(),
                name: String::new(),
            },
        };
        match request(&AdminRequest::Control {
            module: arg.module,
            verb,
            caller,
        }) {
            Ok(AdminResponse::Ok { message }) => {
                if !message.is_empty() {
                    println!("{message}");
                }
                ExitCode::SUCCESS
            }
            Ok(AdminResponse::Refused { reason }) => {
                fail(format_args!("{}: {reason}", verb.name()))
            }
            Ok(other) => fail(format_args!("unexpected answer from the agent: {other:?}")),
            Err(error) => fail(error),
        }
    };
    match command {
        AgentCommand::Start(arg) => control(Verb::Start, arg),
        AgentCommand::Stop(arg) => control(Verb::Stop, arg),
        AgentCommand::Forcestop(arg) => control(Verb::ForceStop, arg),
        AgentCommand::Restart(arg) => control(Verb::Restart, arg),
        AgentCommand::Swap(arg) => control(Verb::Swap, arg),
        AgentCommand::Prim(arg) => control(Verb::Prim, arg),
        AgentCommand::Primforce(arg) => control(Verb::PrimForce, arg),
        AgentCommand::Second(arg) => control(Verb::Second, arg),
        AgentCommand::State(args) => state(&args),
        AgentCommand::Log(args) => log(&args),
        AgentCommand::Printe(args) => print(args, PrintLevel::Error),
        AgentCommand::Printw(args) => print(args, PrintLevel::Warning),
        AgentCommand::Printi(args) => print(args, PrintLevel::Info),
        AgentCommand::Module(command) => super::module::run(command),
        AgentCommand::Cluster(ClusterCommand::Genkey { force }) => match genkey(force) {
            Ok(path) => {
                println!(
                    "new cluster secret written to {}; copy it (mode 0600) to every node and restart the agents",
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => fail(error),
        },
        AgentCommand::Boot(command) => super::boot::run(command),
        AgentCommand::Shutdown => super::boot::shutdown(),
        AgentCommand::Set(args) => super::resource::set(args),
        AgentCommand::Get(args) => super::resource::get(args),
        AgentCommand::Stopstart(arg) => control(Verb::StopStart, arg),
        AgentCommand::Level(args) => super::level::run(&args),
        AgentCommand::Confcheck(args) => super::apply::confcheck(&args),
        AgentCommand::Cluster(ClusterCommand::Config { file }) => {
            super::apply::cluster_config(file.as_deref())
        }
        AgentCommand::Waitstart(args) => super::wait::waitstart(&args),
        AgentCommand::Waitstop(args) => super::wait::waitstop(&args),
        AgentCommand::Waitstate(args) => super::wait::waitstate(&args),
    }
}

/// Renders states as `safekit state` prints them.
pub fn render_states(states: &[ModuleStatus], verbose: bool) -> String {
    let mut out = String::new();
    for status in states {
        let readiness = match status.readiness.as_str() {
            "NotReady" => "Not ready",
            other => other,
        };
        let state = format!("{} ({readiness})", status.state);
        out.push_str(&format!(
            "{:<20} {state:<20} node {}\n",
            status.module, status.node
        ));
        if verbose {
            for (key, value) in &status.details {
                out.push_str(&format!("    {key:<16} {value}\n"));
            }
        }
    }
    out
}

fn state(args: &StateArgs) -> ExitCode {
    let unknown = |message: String| {
        eprintln!("safekit: {message}");
        if args.exit_code {
            ExitCode::from(STATE_UNKNOWN_EXIT)
        } else {
            ExitCode::FAILURE
        }
    };
    let states = match request(&AdminRequest::State {
        module: args.module.clone(),
        verbose: args.verbose,
    }) {
        Ok(AdminResponse::States(states)) => states,
        Ok(AdminResponse::Refused { reason }) => return unknown(reason),
        Ok(other) => return unknown(format!("unexpected answer from the agent: {other:?}")),
        Err(error) => return unknown(error),
    };
    if args.short {
        for status in &states {
            println!("{}", status.state);
        }
    } else {
        print!("{}", render_states(&states, args.verbose));
    }
    if args.exit_code {
        let code = states
            .first()
            .map_or(i32::from(STATE_UNKNOWN_EXIT), |status| {
                state_exit_code(&status.state)
            });
        return ExitCode::from(u8::try_from(code).unwrap_or(STATE_UNKNOWN_EXIT));
    }
    ExitCode::SUCCESS
}

fn log(args: &LogArgs) -> ExitCode {
    match request(&AdminRequest::Log {
        module: args.module.clone(),
        lines: args.lines,
        verbose: args.verbose,
    }) {
        Ok(AdminResponse::Log(lines)) => {
            let mut stdout = std::io::stdout().lock();
            for line in lines {
                // A closed pipe (`| head`) is not an error worth reporting.
                if writeln!(stdout, "{line}").is_err() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Ok(AdminResponse::Refused { reason }) => fail(reason),
        Ok(other) => fail(format_args!("unexpected answer from the agent: {other:?}")),
        Err(error) => fail(error),
    }
}

fn print(args: PrintArgs, level: PrintLevel) -> ExitCode {
    match request(&AdminRequest::Print {
        module: args.module,
        level,
        message: args.message.join(" "),
    }) {
        Ok(AdminResponse::Ok { .. }) => ExitCode::SUCCESS,
        Ok(AdminResponse::Refused { reason }) => fail(reason),
        Ok(other) => fail(format_args!("unexpected answer from the agent: {other:?}")),
        Err(error) => fail(error),
    }
}

/// Writes 32 random bytes, hex-encoded, to `SAFEVAR/cluster/secret` with mode 0600.
fn genkey(force: bool) -> Result<PathBuf, String> {
    let path = secret_path(&safevar());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
    }
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(&path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{} exists; use --force to replace it", path.display())
        } else {
            format!("cannot write {}: {error}", path.display())
        }
    })?;
    file.write_all(format!("{hex}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    Ok(path)
}
