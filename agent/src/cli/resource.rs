//! `safekit set -r RESOURCE -v up|down [-i id]` and `safekit get -r RESOURCE`.
//!
//! A custom checker's program reports its resource with `set` (SafeKit's
//! names and options); `get` shows a resource's current value (`up`, `down`,
//! or `init` while no verdict is known). Both go to the local agent, which
//! refuses an unknown resource with the list of the module's resources.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use safekit_protocol::admin::{AdminRequest, AdminResponse};

use super::control::request;

/// `up` or `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResourceValue {
    /// The checked thing works.
    Up,
    /// It failed: the resource's rule fires.
    Down,
}

/// `safekit set`.
#[derive(Debug, Clone, Args)]
pub struct SetArgs {
    /// The module (default: $SAFEMODULE, set for checker programs and scripts).
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// The resource, `custom.<ident>` of a `<custom>` checker.
    #[arg(short = 'r', long = "resource")]
    pub resource: String,
    /// Its new value.
    #[arg(short = 'v', long = "value", value_enum)]
    pub value: ResourceValue,
    /// Who sets it (the checker's ident), shown in the module log.
    #[arg(short = 'i', long = "identity")]
    pub identity: Option<String>,
}

/// `safekit get`.
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// The module (default: $SAFEMODULE).
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// The resource (`custom.x`, `proc.app`, `intf.lan`, ...).
    #[arg(short = 'r', long = "resource")]
    pub resource: String,
}

fn answer(result: Result<AdminResponse, String>, print: bool) -> ExitCode {
    match result {
        Ok(AdminResponse::Ok { message }) => {
            if print {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
        Ok(AdminResponse::Refused { reason }) => {
            eprintln!("safekit: {reason}");
            ExitCode::FAILURE
        }
        Ok(other) => {
            eprintln!("safekit: unexpected answer from the agent: {other:?}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("safekit: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `safekit set`.
pub fn set(args: SetArgs) -> ExitCode {
    answer(
        request(&AdminRequest::SetResource {
            module: args.module,
            resource: args.resource,
            up: args.value == ResourceValue::Up,
            identity: args.identity,
        }),
        false,
    )
}

/// Runs `safekit get`: prints the value.
pub fn get(args: GetArgs) -> ExitCode {
    answer(
        request(&AdminRequest::GetResource {
            module: args.module,
            resource: args.resource,
        }),
        true,
    )
}
