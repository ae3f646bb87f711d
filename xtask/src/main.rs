//! `cargo xtask`: the project's build system.
//!
//! Every task echoes the commands it runs and fails with a message that says
//! what to do next. `cargo xtask test` is exactly what CI runs (see `.ci/run`).
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod fuzz;
mod install;
mod package;
mod pjdfs;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test and run the SafeKit re-implementation"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the whole test suite as CI does: format, lints, unit, data-path and namespace scenario tests, fuzzers briefly.
    Test {
        /// Seconds each fuzz target runs (0 skips fuzzing).
        #[arg(long, default_value_t = 20)]
        fuzz_seconds: u64,
        /// Skip `cargo fmt --check` and clippy (faster local iterations).
        #[arg(long)]
        no_lint: bool,
    },
    /// Run the fuzz targets under `fuzz/` for a while each.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run only this target.
        target: Option<String>,
    },
    /// Run the pjdfstest POSIX suite on plain ext4 and on our mount (off and replicated), and compare.
    Pjdfstest,
    /// Check the project's conventions (module docs, SAFETY comments, crate boundaries).
    Tidy,
    /// Benchmark the data path (plain, mount, replicated), reintegration vs rsync and failover vs keepalived into BENCHMARKS.md; needs root, fio, rsync, keepalived.
    Bench(bench::BenchArgs),
    /// Walk through a failover on two nodes and a client in namespaces (root, python3): the README's demo.
    Demo(demo::DemoArgs),
    /// Build one `.safe` package per folder of `modules/` into target/packages/ (for `safekit module install`).
    Package,
    /// Open a shell inside a node (node1, node2, client) of a cluster kept by `cargo xtask demo --keep`.
    Shell {
        /// The node: node1, node2 or client.
        node: String,
    },
    /// Build (release) and install the agent in SafeKit's layout with its systemd unit (root; --destdir for packagers).
    Install(install::InstallArgs),
    /// Remove what `install` put there (SAFEVAR, modules and edited files only with --purge).
    Uninstall(install::UninstallArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    std::env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    match cli.task {
        Task::Test {
            fuzz_seconds,
            no_lint,
        } => test(&root, fuzz_seconds, no_lint),
        Task::Fuzz { seconds, target } => fuzz::run(&root, seconds, target.as_deref()),
        Task::Tidy => tidy::run(&root),
        Task::Pjdfstest => pjdfs::run_suite(&root),
        Task::Bench(args) => bench::run(&root, args),
        Task::Demo(args) => demo::run(&root, args),
        Task::Shell { node } => demo::shell(&node),
        Task::Package => package::run(&root, &root.join("target").join("packages")).map(drop),
        Task::Install(args) => install::run_install(&root, args),
        Task::Uninstall(args) => install::run_uninstall(args),
    }
}

fn test(root: &Path, fuzz_seconds: u64, no_lint: bool) -> anyhow::Result<()> {
    if !no_lint {
        run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))
            .context("code is not formatted: run `cargo fmt --all`")?;
        run(Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .context("clippy found problems")?;
    }
    run(Command::new("cargo").args(["test", "--workspace", "--no-fail-fast"]))
        .context("some tests failed (their output is above)")?;
    pjdfs::run_suite(root).context("the mount is less POSIX than plain ext4")?;
    if fuzz_seconds > 0 {
        fuzz::run(root, fuzz_seconds, None)?;
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}

/// Runs a command, echoing it first, and fails if it does not exit 0.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("cannot start `{}`", describe(command)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(command));
    }
    Ok(())
}

pub(crate) fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the project root")
        .to_path_buf()
}
