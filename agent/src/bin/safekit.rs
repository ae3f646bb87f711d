//! `safekit`: the operator's command.
//!
//! Verbs are grouped as clap subcommands; each group's work lives in
//! `safekit_agent::cli::<group>`, this file only parses and dispatches.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use safekit_agent::cli::apply::{self, ConfigArgs};
use safekit_agent::cli::control::{self, AgentCommand};
use safekit_agent::cli::snapshot::{self, SnapshotArgs};

/// Control and inspect safekit application modules.
#[derive(Debug, Parser)]
#[command(name = "safekit", version, about)]
struct Cli {
    /// Run the verb on other nodes: "*" (every node of cluster.xml) or "node1,node2" (names,
    /// addresses, host[:port]); signed with the cluster secret, through each node's port 9010.
    #[arg(short = 'H', value_name = "NODES")]
    hosts: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply a module's edited configuration (`config -m M`: validated whole, module STOP), or check files offline (`config check PATH`).
    Config(ConfigArgs),
    #[command(flatten)]
    Agent(AgentCommand),
    /// Write a support zip for a module: logs, configuration, state, system facts (secrets redacted).
    Snapshot(SnapshotArgs),
}

/// Exit status: 0 success, 1 the checked input has errors, 2 the command could not run.
/// Agent verbs: see `safekit_agent::cli::control` (0 done, 1 refused or failed,
/// `state -q`: the state's code). With `-H`: see `safekit_agent::cli::remote`.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("safekit: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(hosts) = &cli.hosts {
        return Ok(match cli.command {
            Command::Agent(command) => safekit_agent::cli::remote::run(hosts, command),
            _ => {
                eprintln!(
                    "safekit: -H: this command works on the files of the node it runs on: run it there without -H"
                );
                ExitCode::from(2)
            }
        });
    }
    match cli.command {
        Command::Agent(command) => Ok(control::run(command)),
        Command::Snapshot(args) => {
            let summary = snapshot::run(&args, &mut |line| println!("{line}"))?;
            println!(
                "snapshot written to {} ({} bytes)",
                summary.path.display(),
                summary.bytes
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(args) => apply::run_config(&args),
    }
}
