//! `safekit-rfs`: runs the replicated mount of one module (primary or secondary side).
//!
//! - `safekit-rfs mount --dir PATH [--dir PATH2] [--mode strict|fsync-only]
//!   [--control SOCKET] [--replication off|peer --peer ADDR --secret-file F
//!   --module NAME --dirty-log FILE] [--activity-log FILE] [--acl]` mounts
//!   [`ReplicatedFs`] over each directory in the foreground, until
//!   SIGTERM/SIGINT or the control socket's `unmount`, then unmounts cleanly.
//!   With `--activity-log`, the files with changes in flight are recorded
//!   there (see `safekit_linux_helper::activity`); the files found hot when
//!   it is opened (a crash) stay hot until a resync covered them.
//! - `safekit-rfs receive --dir PATH [--dir PATH2] --listen ADDR --secret-file F
//!   --module NAME` is the secondary side: applies the primary's stream beneath
//!   the directories until SIGTERM/SIGINT.
//! - `safekit-rfs recover --dir PATH` detaches the stale mount a crashed helper
//!   left (the mount command does this by itself too).
//!
//! [`ReplicatedFs`]: safekit_linux_helper::fs::ReplicatedFs

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use safekit_linux_helper::activity::{ActivityLog, StreamPosition};
use safekit_linux_helper::control::{self, ControlRequest, ControlState};
use safekit_linux_helper::fs::{FsOptions, FsStats, SyncMode};
use safekit_linux_helper::mount::{self, MountConfig, MountedDir};
use safekit_linux_helper::replicator::{ReplicationOff, Replicator};
use safekit_linux_helper::transport::{Role, Sender, SenderConfig};

#[derive(Debug, Parser)]
#[command(
    name = "safekit-rfs",
    about = "replicated directories: FUSE mount over, replication sender and receiver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Every write and namespace operation waits for the peer.
    Strict,
    /// Only fsync, O_SYNC/O_DSYNC writes and close wait for the peer (writeback cache).
    FsyncOnly,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ReplicationArg {
    /// No replication (benchmarks, a module without a peer yet).
    Off,
    /// Replicate to `--peer`.
    Peer,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount over each directory and serve in the foreground.
    Mount {
        /// A replicated directory (repeat for several; the order gives the directory index).
        #[arg(long = "dir", required = true)]
        dirs: Vec<PathBuf>,
        /// When a change counts as done.
        #[arg(long, value_enum, default_value = "strict")]
        mode: ModeArg,
        /// Path of the control socket (root only).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Where operations go.
        #[arg(long, value_enum, default_value = "off")]
        replication: ReplicationArg,
        /// The peer's replication address (with `--replication peer`).
        #[arg(long)]
        peer: Option<SocketAddr>,
        /// File holding the per-cluster secret (with `--replication peer`).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Module name (part of the peer authentication).
        #[arg(long, default_value = "mirror")]
        module: String,
        /// Where files touched while the peer is absent are recorded (with `--replication peer`).
        #[arg(long)]
        dirty_log: Option<PathBuf>,
        /// Stop waiting for a silent peer after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        replication_timeout_ms: u64,
        /// Also replicate extended attributes and ACLs (`acl="on"`).
        #[arg(long)]
        acl: bool,
        /// Record the files with changes in flight in this activity log (one per module).
        #[arg(long)]
        activity_log: Option<PathBuf>,
        /// Files the activity log keeps hot before it evicts settled ones.
        #[arg(long, default_value_t = 1024)]
        activity_log_files: usize,
    },
    /// Apply a primary's replication stream beneath the directories (secondary side).
    Receive {
        /// A replicated directory (same order as on the primary).
        #[arg(long = "dir", required = true)]
        dirs: Vec<PathBuf>,
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// File holding the per-cluster secret.
        #[arg(long)]
        secret_file: PathBuf,
        /// Module name (part of the peer authentication).
        #[arg(long, default_value = "mirror")]
        module: String,
    },
    /// Detach the stale mount a crashed helper left on a directory.
    Recover {
        /// The directory.
        #[arg(long = "dir", required = true)]
        dirs: Vec<PathBuf>,
    },
}

/// What the control socket reports.
struct HelperState {
    mounts: Vec<(PathBuf, Arc<FsStats>)>,
    sender: Option<Arc<Sender>>,
}

impl ControlState for HelperState {
    fn stats(&self) -> Vec<(PathBuf, Arc<FsStats>)> {
        self.mounts.clone()
    }

    fn role(&self) -> String {
        match &self.sender {
            None => "replication-off".to_owned(),
            Some(sender) => match sender.stats().role {
                Role::Replicating => "primary-replicating".to_owned(),
                Role::Alone => "primary-alone".to_owned(),
                Role::Off => "replication-off".to_owned(),
            },
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Block the stop signals in every thread (threads inherit the mask); one
    // thread waits for them and turns them into an unmount request.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGHUP);
    stop_signals
        .thread_block()
        .context("cannot block the stop signals")?;

    let cli = Cli::parse();
    match mount::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    match cli.command {
        Command::Recover { dirs } => {
            for dir in dirs {
                let detached = mount::recover_stale_mount(&dir)?;
                println!(
                    "{}: {}",
                    dir.display(),
                    if detached {
                        "stale mount detached"
                    } else {
                        "no stale mount"
                    }
                );
            }
            Ok(())
        }
        Command::Receive {
            dirs,
            listen,
            secret_file,
            module,
        } => {
            let secret = read_secret(&secret_file)?;
            let paths: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
            let root = safekit_linux_helper::apply::ReplicaRoot::open(&paths)
                .context("cannot open the replicated directories")?;
            let receiver =
                safekit_linux_helper::transport::Receiver::bind(listen, secret, module, root)
                    .with_context(|| format!("cannot listen on {listen}"))?;
            tracing::info!(addr = %receiver.local_addr(), "receiving");
            let signal = stop_signals.wait().context("cannot wait for signals")?;
            tracing::info!(?signal, "stopping");
            drop(receiver);
            Ok(())
        }
        Command::Mount {
            dirs,
            mode,
            control: control_path,
            replication,
            peer,
            secret_file,
            module,
            dirty_log,
            replication_timeout_ms,
            acl,
            activity_log,
            activity_log_files,
        } => {
            let (requests_tx, requests_rx) = mpsc::channel();
            // Bind the control socket first: its file must be private from the start.
            let listener = match &control_path {
                Some(path) => Some(control::bind(path)?),
                None => None,
            };
            let sender = match replication {
                ReplicationArg::Off => None,
                ReplicationArg::Peer => {
                    let peer = peer.context("--replication peer needs --peer ADDR")?;
                    let secret = read_secret(
                        secret_file
                            .as_deref()
                            .context("--replication peer needs --secret-file")?,
                    )?;
                    let dirty_path =
                        dirty_log.context("--replication peer needs --dirty-log FILE")?;
                    let dirty = safekit_linux_helper::dirty::DirtyLog::open(&dirty_path)
                        .with_context(|| {
                            format!("cannot open the dirty log {}", dirty_path.display())
                        })?;
                    let mut config = SenderConfig::new(peer, secret, module, Arc::new(dirty));
                    config.replication_timeout = Duration::from_millis(replication_timeout_ms);
                    Some(Arc::new(
                        Sender::new(config).context("cannot start the replication sender")?,
                    ))
                }
            };
            let replicator: Arc<dyn Replicator> = match &sender {
                Some(sender) => sender.clone(),
                None => Arc::new(ReplicationOff),
            };
            let activity_log = match &activity_log {
                Some(path) => {
                    let position: Option<Arc<dyn StreamPosition>> = match &sender {
                        Some(sender) => Some(sender.clone()),
                        None => None,
                    };
                    let log = ActivityLog::open(path, activity_log_files, position).with_context(
                        || format!("cannot open the activity log {}", path.display()),
                    )?;
                    let recovered = log.hot_files().len();
                    if recovered > 0 {
                        tracing::warn!(
                            recovered,
                            path = %path.display(),
                            "the activity log holds files from before a crash; they stay hot until a resync covers them"
                        );
                    }
                    Some(Arc::new(log))
                }
                None => None,
            };
            let sync_mode = match mode {
                ModeArg::Strict => SyncMode::Strict,
                ModeArg::FsyncOnly => SyncMode::FsyncOnly,
            };
            let mut mounted: Vec<MountedDir> = Vec::new();
            for (index, dir) in dirs.iter().enumerate() {
                let dir_index = u16::try_from(index).context("too many directories")?;
                let options = FsOptions {
                    dir_index,
                    mode: sync_mode,
                    replicate_xattrs: acl,
                };
                let mut config = MountConfig::new(options);
                config.activity_log = activity_log.clone();
                if index > 0 {
                    // The first mount (unmounted last) checkpoints the shared log.
                    config.checkpoint_interval = None;
                }
                match mount::mount_over_with(dir, replicator.clone(), config) {
                    Ok(m) => mounted.push(m),
                    Err(error) => {
                        for m in mounted.into_iter().rev() {
                            let _ = m.unmount();
                        }
                        return Err(error.into());
                    }
                }
            }
            let state = HelperState {
                mounts: mounted
                    .iter()
                    .map(|m| (m.path().to_path_buf(), m.stats()))
                    .collect(),
                sender: sender.clone(),
            };
            if let Some(listener) = listener {
                control::serve(listener, Arc::new(state), requests_tx.clone());
            }
            {
                let requests_tx = requests_tx.clone();
                std::thread::Builder::new()
                    .name("rfs-signals".to_owned())
                    .spawn(move || {
                        if let Ok(signal) = stop_signals.wait() {
                            tracing::info!(?signal, "stop signal received");
                            let _ = requests_tx.send(ControlRequest::Unmount);
                        }
                    })
                    .context("cannot start the signal thread")?;
            }
            println!("ready");
            let request = requests_rx.recv();
            tracing::info!(?request, "unmounting");
            let mut failed = false;
            for m in mounted.into_iter().rev() {
                if let Err(error) = m.unmount() {
                    tracing::error!(%error, "unmount failed");
                    failed = true;
                }
            }
            if let Some(path) = control_path {
                let _ = std::fs::remove_file(path);
            }
            if failed {
                bail!("some directories could not be unmounted");
            }
            Ok(())
        }
    }
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut secret = std::fs::read(path)
        .with_context(|| format!("cannot read the secret file {}", path.display()))?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.is_empty() {
        bail!("the secret file {} is empty", path.display());
    }
    Ok(secret)
}
