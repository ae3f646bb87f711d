//! `safekit`: the operator's command.
//!
//! Verbs are grouped as clap subcommands; each group's work lives in
//! `safekit_agent::cli::<group>`, this file only parses and dispatches.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use safekit_agent::cli::config_check::{self, ConfigCheckArgs};
use safekit_agent::cli::control::{self, AgentCommand};
use safekit_agent::cli::snapshot::{self, SnapshotArgs};

/// Control and inspect safekit application modules.
#[derive(Debug, Parser)]
#[command(name = "safekit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with module configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    #[command(flatten)]
    Agent(AgentCommand),
    /// Write a support zip for a module: logs, configuration, state, system facts (secrets redacted).
    Snapshot(SnapshotArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a userconfig.xml, a cluster.xml or a module folder offline; print every problem.
    Check(ConfigCheckArgs),
}

/// Exit status: 0 success, 1 the checked input has errors, 2 the command could not run.
/// Agent verbs: see `safekit_agent::cli::control` (0 done, 1 refused or failed,
/// `state -q`: the state's code).
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
        Command::Config(ConfigCommand::Check(args)) => {
            let report = config_check::run(&args)?;
            print!("{}", report.output);
            Ok(if report.has_errors {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
