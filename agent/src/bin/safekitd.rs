//! `safekitd`: the per-node agent daemon (see `safekit_agent::daemon` for its structure).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use safekit_agent::daemon::{self, DaemonOptions};

/// The safekit agent: runs every module installed on this node.
///
/// Files: SAFEVAR/cluster/cluster.xml (nodes and LANs), SAFEVAR/cluster/secret
/// (cluster secret, mode 0600, from `safekit cluster genkey`),
/// SAFE/modules/<AM>/{conf/userconfig.xml,conf/id,bin/} (modules; the id file
/// is optional, default: position in the sorted module list),
/// SAFEVAR/modules/<AM>/{state,log,userlog.ulog} (durable state and logs),
/// SAFEVAR/run/admin.sock (the `safekit` command's socket, root only).
///
/// Exit status: 0 after SIGTERM/SIGINT, 1 if the node cannot start (the
/// reason is printed in one line).
#[derive(Debug, Parser)]
#[command(name = "safekitd", version, about, long_about = None)]
struct Args {
    /// Stay in the foreground, logging to stderr (the only mode so far; systemd runs it this way too).
    #[arg(long)]
    foreground: bool,
    /// The installation directory SAFE (modules live in SAFE/modules).
    #[arg(long, env = "SAFE", default_value = "/opt/safekit")]
    safe: PathBuf,
    /// The variable data directory SAFEVAR (cluster config, state, logs, admin socket).
    #[arg(long = "var", env = "SAFEVAR", default_value = "/var/safekit")]
    var: PathBuf,
    /// This node's name in cluster.xml (default: the host name).
    #[arg(long)]
    node: Option<String>,
}

/// The log filter when `RUST_LOG` is not set.
///
/// `fuser::reply` is silenced: fuser 0.18 answers every FUSE_INTERRUPT with
/// ENOSYS, and when the interrupted request has already been answered (the
/// usual case: PostgreSQL's processes are signalled constantly) the kernel
/// refuses that answer with ENOENT, which fuser logs at ERROR. The
/// interrupted request itself completed normally and was replicated. Our own
/// failures are logged by our code, not through this target.
const DEFAULT_LOG_FILTER: &str = "info,fuser::reply=off";

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .init();
    // The in-process data path keeps a descriptor per inode of the mounts.
    #[cfg(feature = "linux-datapath")]
    if let Err(error) = safekit_linux_helper::mount::raise_open_file_limit() {
        eprintln!("safekitd: cannot raise the open-file limit: {error}");
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("safekitd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let node = match args.node {
        Some(node) => node,
        None => nix::unistd::gethostname()
            .context("cannot read the host name; pass --node")?
            .into_string()
            .map_err(|_| anyhow::anyhow!("the host name is not UTF-8; pass --node"))?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(DaemonOptions {
        safe: args.safe,
        var: args.var,
        node,
    }))?;
    Ok(())
}
