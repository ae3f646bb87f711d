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
//!   the directories until SIGTERM/SIGINT, and answers the primary's resync
//!   requests (listings, block hashes).
//! - `safekit-rfs resync --dir PATH [--dir PATH2] --peer ADDR --secret-file F
//!   --module NAME --dirty-log FILE [--full] [--checksum] [--xattrs] [--nbrei N]` runs one
//!   reintegration of the (unmounted) directories to a peer's `receive`, prints
//!   its counters on one `resync: key=value...` line and exits (benchmarks, manual repair).
//! - `safekit-rfs dirty-add --dirty-log FILE [--dir-index N] [--range OFF+LEN]... PATH...` records
//!   paths (relative to the replicated directory) in a dirty log, as the mount
//!   does for changes made while the peer is absent (benchmarks, manual repair).
//! - `safekit-rfs recover --dir PATH` detaches the stale mount a crashed helper
//!   left (the mount command does this by itself too).
//!
//! [`ReplicatedFs`]: safekit_linux_helper::fs::ReplicatedFs

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use rustix::fs::{Mode, OFlags};
use safekit_linux_helper::activity::{ActivityLog, StreamPosition};
use safekit_linux_helper::control::{self, ControlRequest, ControlState};
use safekit_linux_helper::fs::{FsOptions, FsStats, SyncMode};
use safekit_linux_helper::mount::{self, MountConfig, MountedDir};
use safekit_linux_helper::replicator::{ReplicationOff, Replicator};
use safekit_linux_helper::resync::{
    FileLocks, ResyncConfig, ResyncEngine, ResyncKind, ResyncOutcome,
};
use safekit_linux_helper::transport::{Role, Sender, SenderConfig};
use safekit_protocol::replication::{ByteRange, RelPath, TouchedFile};

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
    /// Run one resync of the directories to a peer's `receive`, print its counters, exit.
    Resync {
        /// A replicated directory (same order as on the peer; not mounted meanwhile).
        #[arg(long = "dir", required = true)]
        dirs: Vec<PathBuf>,
        /// The peer's replication address.
        #[arg(long)]
        peer: SocketAddr,
        /// File holding the per-cluster secret.
        #[arg(long)]
        secret_file: PathBuf,
        /// Module name (part of the peer authentication).
        #[arg(long, default_value = "mirror")]
        module: String,
        /// The dirty log whose files an incremental resync compares (cleared on completion).
        #[arg(long)]
        dirty_log: PathBuf,
        /// The resync cursor file (default: the dirty log's path with `.cursor` appended).
        #[arg(long)]
        cursor: Option<PathBuf>,
        /// Compare the whole tree instead of the dirty log's files.
        #[arg(long)]
        full: bool,
        /// With `--full`: compare the blocks of every file, not only of those whose size or mtime differ.
        #[arg(long)]
        checksum: bool,
        /// Compare and ship extended attributes too (as with `<rfs acl="on">`).
        #[arg(long)]
        xattrs: bool,
        /// Parallel file workers.
        #[arg(long, default_value_t = 6)]
        nbrei: usize,
        /// Give up when the peer does not answer the connection within this many seconds.
        #[arg(long, default_value_t = 20)]
        connect_timeout_s: u64,
    },
    /// Record paths in a dirty log (as changes made while the peer was absent).
    DirtyAdd {
        /// The dirty log (created when missing).
        #[arg(long)]
        dirty_log: PathBuf,
        /// The replicated directory index the paths are beneath.
        #[arg(long, default_value_t = 0)]
        dir_index: u16,
        /// Record only these byte ranges of each path (`OFFSET+LEN`, repeatable),
        /// as writes made while the peer was absent are recorded.
        #[arg(long = "range")]
        ranges: Vec<String>,
        /// Paths relative to the replicated directory.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
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
            let fds = open_dirs(&dirs)?;
            let receiver = safekit_linux_helper::transport::Receiver::bind_serving_resync(
                listen, secret, module, fds,
            )
            .with_context(|| format!("cannot listen on {listen}"))?;
            tracing::info!(addr = %receiver.local_addr(), "receiving");
            let signal = stop_signals.wait().context("cannot wait for signals")?;
            tracing::info!(?signal, "stopping");
            drop(receiver);
            Ok(())
        }
        Command::DirtyAdd {
            dirty_log,
            dir_index,
            ranges,
            paths,
        } => {
            let log = safekit_linux_helper::dirty::DirtyLog::open(&dirty_log)
                .with_context(|| format!("cannot open the dirty log {}", dirty_log.display()))?;
            let ranges = ranges
                .iter()
                .map(|range| {
                    let (offset, len) = range
                        .split_once('+')
                        .and_then(|(o, l)| Some((o.parse().ok()?, l.parse().ok()?)))
                        .with_context(|| format!("range {range:?} is not OFFSET+LEN"))?;
                    Ok(Some(ByteRange { offset, len }))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ranges = if ranges.is_empty() {
                vec![None]
            } else {
                ranges
            };
            let mut files = Vec::new();
            for path in &paths {
                let rel = RelPath::parse(path.as_os_str().as_bytes())
                    .with_context(|| format!("{} is not a relative path", path.display()))?;
                for range in &ranges {
                    files.push(TouchedFile {
                        dir: dir_index,
                        path: rel.clone(),
                        range: *range,
                    });
                }
            }
            let recorded = log
                .record(&files)
                .with_context(|| format!("cannot write the dirty log {}", dirty_log.display()))?;
            println!("dirty-add: recorded={recorded} paths={}", files.len());
            Ok(())
        }
        Command::Resync {
            dirs,
            peer,
            secret_file,
            module,
            dirty_log,
            cursor,
            full,
            checksum,
            xattrs,
            nbrei,
            connect_timeout_s,
        } => run_resync(ResyncArgs {
            dirs,
            peer,
            secret_file,
            module,
            dirty_log,
            cursor,
            full,
            checksum,
            xattrs,
            nbrei,
            connect_timeout: Duration::from_secs(connect_timeout_s),
        }),
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

/// `safekit-rfs resync`'s options.
struct ResyncArgs {
    dirs: Vec<PathBuf>,
    peer: SocketAddr,
    secret_file: PathBuf,
    module: String,
    dirty_log: PathBuf,
    cursor: Option<PathBuf>,
    full: bool,
    checksum: bool,
    xattrs: bool,
    nbrei: usize,
    connect_timeout: Duration,
}

/// Connects a sender to the peer, runs one resync, prints its counters.
fn run_resync(args: ResyncArgs) -> anyhow::Result<()> {
    let secret = read_secret(&args.secret_file)?;
    let source = open_dirs(&args.dirs)?;
    let dirty = safekit_linux_helper::dirty::DirtyLog::open(&args.dirty_log)
        .with_context(|| format!("cannot open the dirty log {}", args.dirty_log.display()))?;
    let mut sender_config = SenderConfig::new(args.peer, secret, args.module, Arc::new(dirty));
    sender_config.replication_timeout = Duration::from_secs(10);
    let sender =
        Arc::new(Sender::new(sender_config).context("cannot start the replication sender")?);
    if !sender.wait_connected(args.connect_timeout) {
        bail!(
            "no connection to {} within {:?}",
            args.peer,
            args.connect_timeout
        );
    }
    let cursor = args.cursor.unwrap_or_else(|| {
        let mut name = args.dirty_log.clone().into_os_string();
        name.push(".cursor");
        PathBuf::from(name)
    });
    let mut config = ResyncConfig::new(cursor);
    config.workers = args.nbrei.max(1);
    config.checksum_all = args.checksum;
    config.xattrs = args.xattrs;
    let engine = ResyncEngine::new(
        config,
        Arc::clone(&sender),
        source,
        Arc::new(FileLocks::new()),
    );
    let kind = if args.full {
        ResyncKind::Full
    } else {
        ResyncKind::Incremental { extra: Vec::new() }
    };
    let started = Instant::now();
    let outcome = engine.run(kind).context("the resync failed")?;
    let seconds = started.elapsed().as_secs_f64();
    let ResyncOutcome::Completed { stats } = outcome;
    println!(
        "resync: kind={} seconds={seconds:.3} files_examined={} files_sent={} blocks_compared={} \
         file_blocks={} files_by_range={} files_whole={} \
         blocks_sent={} holes_sent={} bytes_sent={} entries_deleted={} renames_replayed={} dirs_created={} attr_updates={} xattr_updates={} \
         extra_passes={} deferred={} stream_bytes={}",
        if args.full { "full" } else { "incremental" },
        stats.files_examined,
        stats.files_sent,
        stats.blocks_compared,
        stats.file_blocks,
        stats.files_by_range,
        stats.files_whole,
        stats.blocks_sent,
        stats.holes_sent,
        stats.bytes_sent,
        stats.entries_deleted,
        stats.renames_replayed,
        stats.dirs_created,
        stats.attr_updates,
        stats.xattr_updates,
        stats.extra_passes,
        stats.deferred,
        sender.stats().bytes,
    );
    Ok(())
}

/// Opens each directory `O_PATH | O_DIRECTORY` (the form the resync code reads and applies beneath).
fn open_dirs(dirs: &[PathBuf]) -> anyhow::Result<Vec<OwnedFd>> {
    dirs.iter()
        .map(|dir| {
            rustix::fs::open(
                dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot open {}", dir.display()))
        })
        .collect()
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
