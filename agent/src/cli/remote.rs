//! `safekit -H NODES <verb>`: one verb run on several nodes, as SafeKit's distributed mode.
//!
//! `NODES` is `"*"` (every node of this machine's cluster.xml), or a comma
//! list of node names of cluster.xml, addresses or host names, each with an
//! optional `:port` (`[v6]:port`), or `http://host[:port]`; the port defaults
//! to this machine's `Define httpport` (9010). Each node's output is headed by
//! `--- <name> (<address>) ---`. Requests are signed with this machine's
//! cluster secret (`SAFEVAR/cluster/secret`, readable by root only) and go
//! through each node's web service ([`crate::remote_admin`]).
//!
//! Remote verbs: the control verbs, `state` (with `-v`, `-l`, and `-q` for a
//! single node), `log`, `module list`, `get`, `waitstart`, `waitstop`,
//! `waitstate` (client-side loops over `state`). The others act on the files or
//! the log of the node they run on (`printe`, `set`, `module install`,
//! `config`, `boot`, `cluster`...) or mix local facts in their output
//! (`level`) and are refused with `-H`, saying why.
//!
//! Exit status: with one node, the verb's own status on that node (so
//! `safekit -H node2 state -m M -lq` exits with node2's state code); with
//! several, 0 when every node succeeded and 1 otherwise. A node that cannot be
//! reached or refuses the request (wrong secret) gives one line saying which
//! and why, and counts as failed. 2: the command could not be sent at all
//! (bad `-H` list, verb refused with `-H`, no readable cluster secret).

use std::process::ExitCode;

use safekit_protocol::admin::{AdminRequest, AdminResponse};

use super::control::{self, AgentCommand, ModuleCommand};
use crate::daemon::load::{self, LoadError};
use crate::remote_admin::{self, ClientContext};

/// Exit status when the command could not be sent at all.
const CANNOT_RUN: u8 = 2;

/// Runs `command` on every node of `hosts`; returns the exit status (see the module doc).
pub fn run(hosts: &str, command: AgentCommand) -> ExitCode {
    match prepare(hosts, &command) {
        Ok(contexts) => {
            let single = contexts.len() == 1;
            let mut every_node_succeeded = true;
            let mut last = ExitCode::SUCCESS;
            for context in contexts {
                println!("--- {} ---", context.target.label());
                last = remote_admin::with_target(context, || run_one(command.clone()));
                every_node_succeeded &= last == ExitCode::SUCCESS;
            }
            if single {
                last
            } else if every_node_succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(reason) => {
            eprintln!("safekit: -H: {reason}");
            ExitCode::from(CANNOT_RUN)
        }
    }
}

/// Checks the verb, reads the targets, the port and the secret.
fn prepare(hosts: &str, command: &AgentCommand) -> Result<Vec<ClientContext>, String> {
    remote_support(command)?;
    let paths = super::module::node_paths();
    let cluster = match load::load_cluster(&paths) {
        Ok(cluster) => Some(cluster),
        Err(LoadError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            None
        }
        Err(error) => return Err(error.to_string()),
    };
    let httpd_conf = paths.safe.join("web").join("conf").join("httpd.conf");
    let port = crate::health_http::config(&httpd_conf, &[])?.port;
    let targets = remote_admin::parse_targets(hosts, cluster.as_ref(), port)?;
    if let AgentCommand::State(args) = command
        && args.exit_code
        && targets.len() > 1
    {
        return Err("state -q returns one node's state: name a single node".into());
    }
    let secret = load::load_secret(&paths).map_err(|error| {
        if nix::unistd::geteuid().is_root() {
            error.to_string()
        } else {
            format!("{error} (safekit -H signs requests with the cluster secret: run it as root)")
        }
    })?;
    Ok(targets
        .into_iter()
        .map(|target| ClientContext {
            target,
            secret: secret.clone(),
        })
        .collect())
}

/// Whether `command` can run on another node, and if not why.
fn remote_support(command: &AgentCommand) -> Result<(), String> {
    match command {
        AgentCommand::Start(_)
        | AgentCommand::Stop(_)
        | AgentCommand::Forcestop(_)
        | AgentCommand::Restart(_)
        | AgentCommand::Swap(_)
        | AgentCommand::Prim(_)
        | AgentCommand::Primforce(_)
        | AgentCommand::Second(_)
        | AgentCommand::Stopstart(_)
        | AgentCommand::State(_)
        | AgentCommand::Get(_)
        | AgentCommand::Log(_)
        | AgentCommand::Module(ModuleCommand::List)
        | AgentCommand::Waitstart(_)
        | AgentCommand::Waitstop(_)
        | AgentCommand::Waitstate(_) => Ok(()),
        AgentCommand::Printe(_) | AgentCommand::Printw(_) | AgentCommand::Printi(_) => Err(
            "printe, printw and printi write to the log of the node they run on, for its scripts: run them without -H".into(),
        ),
        AgentCommand::Module(_) => Err(
            "module install and uninstall change the files of the node they run on: run them on each node without -H".into(),
        ),
        AgentCommand::Cluster(_) => Err(
            "cluster commands change the files of the node they run on: run them on each node without -H".into(),
        ),
        #[allow(unreachable_patterns)] // Verbs added later stay local until listed above.
        _ => Err("this command works on the node it runs on only: run it there without -H".into()),
    }
}

/// Runs the verb with every request going to the current node.
fn run_one(command: AgentCommand) -> ExitCode {
    match command {
        // Locally, `module list` falls back to SAFE/modules when the agent is
        // down; remotely only the node's agent can answer.
        AgentCommand::Module(ModuleCommand::List) => {
            match control::request(&AdminRequest::ModuleList) {
                Ok(AdminResponse::Modules(names)) => {
                    for name in names {
                        println!("{name}");
                    }
                    ExitCode::SUCCESS
                }
                Ok(AdminResponse::Refused { reason }) => fail(reason),
                Ok(other) => fail(format!("unexpected answer from the agent: {other:?}")),
                Err(error) => fail(error),
            }
        }
        other => control::run(other),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("safekit: {message}");
    ExitCode::FAILURE
}
