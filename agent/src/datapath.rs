//! The seam between a module's runner and its replicated directories.
//!
//! The state machine decides *what* the data path does ([`ReplicationRole`],
//! resynchronizations, setting diverged files aside); a [`DataPath`] does it.
//! The runner calls these methods from its task, so they must return quickly:
//! anything long (mounting, a resynchronization, a connection to the peer)
//! runs on the implementation's own threads and reports back through the
//! [`DataPathEvent`] sender it was given at construction.
//!
//! [`NoDataPath`] serves modules without `<rfs>`: roles are accepted and do
//! nothing, a resynchronization completes at once (there is nothing to copy),
//! and nothing is ever set aside.
//!
//! [`linux::LinuxDataPath`] is the implementation over `safekit_linux_helper`
//! (mount over the replicated directories, replication sender on the primary,
//! receiver on the secondary, dirty-file recording when alone).
//!
//! # Reintegration: secondary-driven, primary-served
//!
//! The resync engine runs on the **primary**, through its replication sender,
//! so resync data and live writes travel in one ordered stream (see
//! `safekit_linux_helper::resync`). The joining SECOND's
//! [`DataPath::start_resync`] only checks that its receiver listens; its
//! machine asks for the resync in its heartbeats, the primary's machine answers
//! with [`DataPath::serve_resync`], and the primary's data path reports
//! [`DataPathEvent::ServeProgress`] then [`DataPathEvent::Served`] (after the
//! engine's final durable barrier) or [`DataPathEvent::ServeFailed`]. The
//! outcome reaches the SECOND in the primary's heartbeats (the handshake is
//! documented in `safekit_core::cluster`).

use std::path::PathBuf;

use safekit_core::cluster::{GenerationId, ReplicationRole, ResyncKind};
use safekit_protocol::heartbeat::ResyncProgressStatus;
use tokio::sync::mpsc::UnboundedSender;

/// What a data path reports to its module's runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPathEvent {
    /// Resynchronization progress in percent (a SECOND whose data path copies by itself).
    ResyncProgress(u8),
    /// The resynchronization finished: the replicated directories equal the primary's.
    ResyncCompleted,
    /// The resynchronization failed.
    ResyncFailed(String),
    /// Primary: progress of the reintegration served for `attempt`.
    ServeProgress {
        /// The attempt of [`DataPath::serve_resync`].
        attempt: u64,
        /// The engine's progress.
        progress: ResyncProgressStatus,
    },
    /// Primary: the reintegration served for `attempt` completed.
    Served {
        /// The attempt of [`DataPath::serve_resync`].
        attempt: u64,
        /// Final counters.
        progress: ResyncProgressStatus,
    },
    /// Primary: the reintegration served for `attempt` failed.
    ServeFailed {
        /// The attempt of [`DataPath::serve_resync`].
        attempt: u64,
        /// Why.
        reason: String,
    },
    /// The replication connection to the peer broke (send timeout, reset).
    PeerLost,
    /// Something the module log must show (a write that bypassed the
    /// interceptor, a heal of the replica); no state change.
    Notice {
        /// Logged as critical rather than as an event.
        critical: bool,
        /// The line.
        message: String,
    },
}

/// Counters for `safekit state -v`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPathStats {
    /// The role currently applied.
    pub role: Option<ReplicationRole>,
    /// Free-form `key: value` details (operations replicated, bytes, dirty files).
    pub details: Vec<(String, String)>,
}

/// Why a data-path request failed.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    /// Switching roles failed (mount, connect, bind).
    #[error("cannot switch the data path to {role:?}: {reason}")]
    Role {
        /// The requested role.
        role: ReplicationRole,
        /// Why.
        reason: String,
    },
    /// A resynchronization could not be started.
    #[error("cannot start the resynchronization: {0}")]
    Resync(String),
    /// Diverged files could not be set aside.
    #[error("cannot set diverged files aside: {0}")]
    SetAside(String),
}

/// The data path of one module, driven by its runner.
pub trait DataPath: Send + std::fmt::Debug {
    /// Switches the role (off, primary replicating to the peer, alone recording
    /// dirty files, secondary receiving). Idempotent.
    ///
    /// # Errors
    /// [`DataPathError::Role`]; the runner logs it and reports the peer lost
    /// when the role needed the peer.
    fn set_role(&mut self, role: ReplicationRole) -> Result<(), DataPathError>;

    /// SECOND: prepares to receive a resynchronization from the peer. A data
    /// path that copies by itself reports [`DataPathEvent::ResyncProgress`] and
    /// the outcome later; one served by the primary just checks it can receive.
    ///
    /// # Errors
    /// [`DataPathError::Resync`] when it cannot even start.
    fn start_resync(&mut self, kind: ResyncKind) -> Result<(), DataPathError>;

    /// Primary (role already `Primary`): brings the peer's replica up to date
    /// while live writes keep flowing; reports [`DataPathEvent::ServeProgress`],
    /// then [`DataPathEvent::Served`] or [`DataPathEvent::ServeFailed`] with
    /// `attempt`. A serve still running is stopped first.
    ///
    /// # Errors
    /// [`DataPathError::Resync`] when it cannot even start.
    fn serve_resync(&mut self, kind: ResyncKind, attempt: u64) -> Result<(), DataPathError>;

    /// Moves the files changed here since `since` (every differing file when
    /// `None`) into a dated folder; returns that folder, or `None` when there
    /// was nothing to keep.
    ///
    /// # Errors
    /// [`DataPathError::SetAside`].
    fn set_aside(&mut self, since: Option<GenerationId>) -> Result<Option<PathBuf>, DataPathError>;

    /// Current counters.
    fn stats(&self) -> DataPathStats;

    /// Tells whether the module is PRIM (its peer an in-sync SECOND), after
    /// every event the runner handled. A data path may then repair the
    /// peer's replica on its own (the Linux one heals writes that bypassed
    /// its mount); the default ignores it.
    fn set_peer_in_sync(&mut self, _in_sync: bool) {}
}

/// The data path of a module without `<rfs>`: nothing is replicated.
#[derive(Debug)]
pub struct NoDataPath {
    events: UnboundedSender<DataPathEvent>,
    role: Option<ReplicationRole>,
}

impl NoDataPath {
    /// A data path that reports to `events`.
    pub fn new(events: UnboundedSender<DataPathEvent>) -> Self {
        NoDataPath { events, role: None }
    }
}

impl DataPath for NoDataPath {
    fn set_role(&mut self, role: ReplicationRole) -> Result<(), DataPathError> {
        self.role = Some(role);
        Ok(())
    }

    fn start_resync(&mut self, _kind: ResyncKind) -> Result<(), DataPathError> {
        // Nothing is replicated, so the (empty) copy is complete at once. The
        // event is queued: the runner sees it after the current actions.
        self.events
            .send(DataPathEvent::ResyncCompleted)
            .map_err(|_| DataPathError::Resync("the module runner is gone".into()))
    }

    fn serve_resync(&mut self, _kind: ResyncKind, attempt: u64) -> Result<(), DataPathError> {
        self.events
            .send(DataPathEvent::Served {
                attempt,
                progress: ResyncProgressStatus {
                    percent: 100,
                    ..ResyncProgressStatus::default()
                },
            })
            .map_err(|_| DataPathError::Resync("the module runner is gone".into()))
    }

    fn set_aside(
        &mut self,
        _since: Option<GenerationId>,
    ) -> Result<Option<PathBuf>, DataPathError> {
        Ok(None)
    }

    fn stats(&self) -> DataPathStats {
        DataPathStats {
            role: self.role,
            details: vec![(
                "replication".into(),
                "none (no <rfs> in userconfig.xml)".into(),
            )],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_without_rfs_completes_at_once() {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut path = NoDataPath::new(sender);
        path.set_role(ReplicationRole::Secondary).expect("role");
        path.start_resync(ResyncKind::Full).expect("starts");
        assert_eq!(
            receiver.try_recv().ok(),
            Some(DataPathEvent::ResyncCompleted)
        );
        assert_eq!(path.set_aside(None).expect("nothing to set aside"), None);
        assert_eq!(path.stats().role, Some(ReplicationRole::Secondary));
    }

    #[test]
    fn serving_without_rfs_is_served_at_once() {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut path = NoDataPath::new(sender);
        path.set_role(ReplicationRole::Primary).expect("role");
        path.serve_resync(ResyncKind::Full, 7).expect("serves");
        assert!(matches!(
            receiver.try_recv().ok(),
            Some(DataPathEvent::Served { attempt: 7, .. })
        ));
    }

    #[test]
    fn diverged_folder_names_sort_by_date() {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_764_149_405);
        assert_eq!(diverged_stamp(time), "20251126-093005");
    }
}

/// `YYYYmmdd-HHMMSS` (UTC) for the folder diverged files are moved into.
pub fn diverged_stamp(time: std::time::SystemTime) -> String {
    // "YYYY-MM-DD HH:MM:SS.mmm"
    let text = crate::modlog::format_timestamp(time);
    let (date, clock) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    let clock = clock.split('.').next().unwrap_or("");
    format!("{}-{}", date.replace('-', ""), clock.replace(':', ""))
}

/// The in-process Linux data path of a module with `<rfs>`, over `safekit_linux_helper`.
///
/// - primary (`Primary`, `Alone`): the FUSE file system is mounted over every
///   replicated directory (sharing the module's [`FileLocks`] with the resync
///   engine), replicating through a [`Sender`] to the peer's replication port
///   (role `Replicating`), or recording every touched file in the dirty log
///   `SAFEVAR/modules/<AM>/dirty` (role `Alone`). The underlying directories
///   are opened before mounting, for the resync engine to read beneath the mount.
///   Every mount shares the module's activity log `SAFEVAR/modules/<AM>/activity`
///   (files with writes possibly in flight, recorded before they are shipped;
///   the first mount checkpoints it);
/// - serving a reintegration ([`DataPath::serve_resync`]): a
///   [`ResyncEngine`] on its own thread, `nbrei` workers, `reiallowedbw`
///   bandwidth, cursor `SAFEVAR/modules/<AM>/resync.cursor`, incremental from the
///   dirty log plus the files of this node's activity log and of the peer's
///   (the engine asks the receiver), or full; it waits for the sender's
///   connection first. Once served, the files this node's activity log kept
///   pinned since a crash may leave it;
/// - secondary: no mount; a [`Receiver`] on this node's replication port
///   applies the primary's stream beneath the directories and answers the
///   engine's questions, including which files this node's activity log held
///   when the receiver started (after a crash as primary, the files it may
///   have changed without shipping the change); it clears that log when the
///   engine says its resync completed. [`DataPath::start_resync`] only checks
///   it listens;
/// - off: nothing mounted, nothing listening, no engine.
///
/// The guard (`safekit_linux_helper::guard`, `<rfs guard="record|deny|off">`,
/// default `record`): on a primary, a fanotify [`PrimaryGuard`] is
/// engaged on the underlying directories after they are opened and before
/// the mount goes over them; a write that reaches them without the mount (a
/// descriptor opened before the mount, another mount of the file system) is
/// recorded in the dirty log, logged (tracing and module log), counted in
/// `state -v`, and healed on the peer while the module is PRIM by an
/// incremental pass of the resync engine over the dirty log (before that,
/// the next reintegration compares it). On a secondary, [`SecondaryGuard`]
/// makes the directories read-only for applications once the receiver has
/// opened its descriptors (leftovers of a crash removed first); it is
/// released before mounting (becoming primary) and when going off.
///
/// [`PrimaryGuard`]: safekit_linux_helper::guard::PrimaryGuard
/// [`SecondaryGuard`]: safekit_linux_helper::guard::SecondaryGuard
///
/// Setting diverged files aside moves the whole current content of each
/// replicated directory into `SAFEVAR/modules/<AM>/diverged/<YYYYmmdd-HHMMSS>/<dir name>`
/// (simple and honest: a full resync follows and restores the primary's
/// tree). Entries are renamed when the two are on the same mount, else copied
/// (mode, owner, symlinks; device nodes and FIFOs are not kept) and removed.
/// Not beside the directory: a replicated directory is often a mount point
/// of its own, and its parent may not be ours to write.
#[cfg(feature = "linux-datapath")]
pub mod linux {
    use std::net::SocketAddr;
    use std::os::fd::OwnedFd;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use safekit_core::cluster::{GenerationId, ReplicationRole, ResyncKind};
    use safekit_linux_helper::activity::{ActivityLog, StreamPosition};
    use safekit_linux_helper::dirty::DirtyLog;
    use safekit_linux_helper::fs::{FsOptions, SyncMode};
    use safekit_linux_helper::guard::{
        GuardEvent, GuardPolicy, GuardStats, PrimaryGuard, PrimaryGuardOptions, SecondaryGuard,
    };
    use safekit_linux_helper::mount::{self, CHECKPOINT_INTERVAL, MountConfig, MountedDir};
    use safekit_linux_helper::replicator::Replicator;
    use safekit_linux_helper::resync::{
        FileLocks, ResyncConfig, ResyncEngine, ResyncHandle, ResyncKind as EngineKind,
        ResyncOutcome, ResyncProgress,
    };
    use safekit_linux_helper::transport::{Receiver, ReplicationEvent, Role, Sender, SenderConfig};
    use safekit_protocol::heartbeat::ResyncProgressStatus;
    use tokio::sync::mpsc::UnboundedSender;

    use super::{DataPath, DataPathError, DataPathEvent, DataPathStats, diverged_stamp};

    /// How long a serve waits for the replication connection before failing.
    const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

    /// Files the activity log keeps hot before it evicts settled ones.
    const ACTIVITY_FILES: usize = 1024;

    /// How long the healer waits for more guard reports before it heals
    /// (a burst of bypass writes is healed in one pass).
    const HEAL_QUIET: Duration = Duration::from_millis(300);

    /// How long the healer waits after a failed heal before it tries again.
    const HEAL_RETRY: Duration = Duration::from_secs(2);

    /// What the Linux data path of one module needs.
    #[derive(Debug, Clone)]
    pub struct LinuxDataPathConfig {
        /// The module (part of the replication handshake).
        pub module: String,
        /// The `<replicated dir>` paths, in configuration order (their index is the `dir` of every operation).
        pub dirs: Vec<PathBuf>,
        /// Where this node's receiver listens (own address on the replication LAN, replication port).
        pub local: SocketAddr,
        /// The peer's receiver.
        pub peer: SocketAddr,
        /// The cluster secret.
        pub secret: Vec<u8>,
        /// The dirty log file; the resync cursor and the activity log live beside it.
        pub dirty_log: PathBuf,
        /// `<rfs replication_timeout>`.
        pub replication_timeout: Duration,
        /// `<rfs sync_mode>`.
        pub sync_mode: SyncMode,
        /// `<rfs acl="on">`: replicate extended attributes.
        pub replicate_xattrs: bool,
        /// `<rfs nbrei>`: parallel resync workers.
        pub resync_workers: usize,
        /// `<rfs reiallowedbw>` in bytes per second (`None`: unlimited).
        pub resync_bandwidth: Option<u64>,
        /// `<rfs reitimeout>`: how long the engine waits for one answer of the receiver.
        pub resync_timeout: Duration,
        /// `<rfs guard>` (our extension): the primary guard's policy (the
        /// secondary's read-only guard goes with either); `None`: no guard.
        pub guard: Option<GuardPolicy>,
    }

    /// A reintegration being served.
    #[derive(Debug)]
    struct ServeJob {
        attempt: u64,
        handle: ResyncHandle,
        cancelled: Arc<AtomicBool>,
    }

    /// See the module documentation.
    #[derive(Debug)]
    pub struct LinuxDataPath {
        config: LinuxDataPathConfig,
        events: UnboundedSender<DataPathEvent>,
        role: Option<ReplicationRole>,
        sender: Option<Arc<Sender>>,
        mounts: Vec<MountedDir>,
        /// The underlying directories beneath `mounts`, opened before mounting (for the engine).
        sources: Vec<OwnedFd>,
        locks: Arc<FileLocks>,
        /// The activity log shared by `mounts` (open while they are).
        activity: Option<Arc<ActivityLog>>,
        receiver: Option<Receiver>,
        serving: Option<ServeJob>,
        /// Secondary: the replicated directories made read-only for applications.
        secondary_guard: Option<SecondaryGuard>,
        /// Primary: the fanotify guard of the underlying directories and its healer.
        primary_guard: Option<Guarding>,
        /// Primary: the peer's replica equals ours but for what the dirty log
        /// holds (the module is PRIM: its peer is an in-sync SECOND; cleared
        /// at once when the replication connection breaks). Heals run only
        /// then: otherwise the dirty log is the next reintegration's.
        in_sync: Arc<AtomicBool>,
        /// The last [`DataPath::set_peer_in_sync`] (stored in `in_sync` when it changes).
        peer_in_sync: bool,
        /// Held by every engine run (serve or heal): one at a time.
        engine_lock: Arc<Mutex<()>>,
        /// Heal counters, kept across role changes.
        heals: Arc<HealStats>,
    }

    /// A running primary guard and the thread that logs its reports and heals.
    #[derive(Debug)]
    struct Guarding {
        guard: PrimaryGuard,
        policy: GuardPolicy,
        stats: Arc<GuardStats>,
        stop: Arc<AtomicBool>,
        /// The heal running now, to stop it.
        running: Arc<Mutex<Option<ResyncHandle>>>,
        healer: Option<std::thread::JoinHandle<()>>,
    }

    impl Guarding {
        fn stop(mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(handle) = lock(&self.running).as_ref() {
                handle.stop();
            }
            // Stopping the guard closes its report channel: the healer sees it too.
            self.guard.stop();
            if let Some(healer) = self.healer.take()
                && healer.join().is_err()
            {
                tracing::error!("the guard's healer thread panicked");
            }
        }
    }

    /// What `safekit state -v` shows of the heals.
    #[derive(Debug, Default)]
    struct HealStats {
        /// Heal passes completed.
        completed: AtomicU64,
        /// Heal passes failed.
        failed: AtomicU64,
        /// Bypass writes reported and not healed yet.
        pending: AtomicU64,
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn status(progress: &ResyncProgress) -> ResyncProgressStatus {
        ResyncProgressStatus {
            percent: progress.percent(),
            files_done: progress.files_done,
            files_total: progress.files_total,
            bytes_done: progress.bytes_done,
            bytes_total: progress.bytes_total,
            bytes_sent: progress.bytes_sent,
            rate: if progress.rate.is_finite() && progress.rate > 0.0 {
                progress.rate as u64
            } else {
                0
            },
            eta_secs: progress.eta.map(|eta| eta.as_secs()),
        }
    }

    impl LinuxDataPath {
        /// A data path that reports to `events`; nothing is mounted or bound yet.
        pub fn new(config: LinuxDataPathConfig, events: UnboundedSender<DataPathEvent>) -> Self {
            LinuxDataPath {
                config,
                events,
                role: None,
                sender: None,
                mounts: Vec::new(),
                sources: Vec::new(),
                locks: Arc::new(FileLocks::new()),
                activity: None,
                receiver: None,
                serving: None,
                secondary_guard: None,
                primary_guard: None,
                in_sync: Arc::new(AtomicBool::new(false)),
                peer_in_sync: false,
                engine_lock: Arc::new(Mutex::new(())),
                heals: Arc::new(HealStats::default()),
            }
        }

        fn dir_paths(&self) -> Vec<&Path> {
            self.config.dirs.iter().map(PathBuf::as_path).collect()
        }

        /// Makes the replicated directories writable again (secondary guard off).
        fn release_secondary_guard(&mut self) {
            if let Some(mut guard) = self.secondary_guard.take()
                && let Err(error) = guard.release()
            {
                tracing::error!(module = %self.config.module, %error, "cannot release the read-only guard of the replicated directories");
                self.notice(
                    true,
                    format!("Cannot make the replicated directories writable again: {error}"),
                );
            }
        }

        /// Opens a replicated directory itself (what a mount or the receiver
        /// works beneath): the dead FUSE mount of a crashed run is detached,
        /// then the read-only guard mounts left by a crashed secondary.
        fn open_dir(dir: &Path) -> Result<OwnedFd, String> {
            mount::recover_stale_mount(dir).map_err(|error| error.to_string())?;
            SecondaryGuard::remove_leftovers(&[dir]).map_err(|error| error.to_string())?;
            mount::open_underlying(dir).map_err(|error| error.to_string())
        }

        fn set_in_sync(&mut self, in_sync: bool) {
            self.peer_in_sync = in_sync;
            self.in_sync.store(in_sync, Ordering::SeqCst);
        }

        fn notice(&self, critical: bool, message: String) {
            let _ = self
                .events
                .send(DataPathEvent::Notice { critical, message });
        }

        fn stop_primary_guard(&mut self) {
            if let Some(guarding) = self.primary_guard.take() {
                guarding.stop();
            }
        }

        /// Engages the fanotify guard on the underlying directories (opened,
        /// not yet mounted over) and starts its healer. A guard the kernel
        /// refuses is reported, and the primary runs unguarded.
        fn engage_primary_guard(&mut self, sender: &Arc<Sender>) {
            let Some(policy) = self.config.guard else {
                return;
            };
            if self.primary_guard.is_some() {
                return;
            }
            let dirs: Vec<(u16, std::os::fd::BorrowedFd<'_>)> = self
                .sources
                .iter()
                .enumerate()
                .filter_map(|(index, fd)| {
                    u16::try_from(index)
                        .ok()
                        .map(|index| (index, std::os::fd::AsFd::as_fd(fd)))
                })
                .collect();
            let options = PrimaryGuardOptions {
                policy,
                ..PrimaryGuardOptions::default()
            };
            let (guard, reports) = match PrimaryGuard::engage(
                &dirs,
                Arc::clone(sender.dirty_log()),
                options,
            ) {
                Ok(engaged) => engaged,
                Err(error) => {
                    tracing::error!(module = %self.config.module, %error, "the replicated directories are not guarded");
                    self.notice(
                        true,
                        format!("Writes bypassing the replication are not detected: {error}"),
                    );
                    return;
                }
            };
            let sources = match self
                .sources
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(sources) => sources,
                Err(error) => {
                    tracing::error!(module = %self.config.module, %error, "cannot keep the replicated directories for healing");
                    Vec::new()
                }
            };
            let stats = guard.stats();
            let stop = Arc::new(AtomicBool::new(false));
            let running = Arc::new(Mutex::new(None));
            let healer = Healer {
                module: self.config.module.clone(),
                dirs: self.config.dirs.clone(),
                reports,
                guard_stats: Arc::clone(&stats),
                sender: Arc::clone(sender),
                sources,
                locks: Arc::clone(&self.locks),
                cursor: self.beside_dirty_log("heal.cursor"),
                workers: self.config.resync_workers.max(1),
                request_timeout: self.config.resync_timeout,
                xattrs: self.config.replicate_xattrs,
                in_sync: Arc::clone(&self.in_sync),
                engine_lock: Arc::clone(&self.engine_lock),
                stop: Arc::clone(&stop),
                running: Arc::clone(&running),
                heals: Arc::clone(&self.heals),
                events: self.events.clone(),
            };
            let healer = match std::thread::Builder::new()
                .name(format!("guard-heal-{}", self.config.module))
                .spawn(move || healer.run())
            {
                Ok(thread) => Some(thread),
                Err(error) => {
                    tracing::error!(module = %self.config.module, %error, "cannot start the guard's healer: bypass writes wait for the next reintegration");
                    None
                }
            };
            self.primary_guard = Some(Guarding {
                guard,
                stats,
                stop,
                running,
                healer,
                policy,
            });
        }

        fn role_error(role: ReplicationRole, reason: impl ToString) -> DataPathError {
            DataPathError::Role {
                role,
                reason: reason.to_string(),
            }
        }

        fn beside_dirty_log(&self, name: &str) -> PathBuf {
            self.config.dirty_log.with_file_name(name)
        }

        fn stop_serving(&mut self) {
            if let Some(job) = self.serving.take() {
                tracing::debug!(
                    attempt = job.attempt,
                    "stopping the reintegration served (if it still runs)"
                );
                job.cancelled.store(true, Ordering::SeqCst);
                job.handle.stop();
            }
        }

        fn unmount_all(&mut self) {
            self.stop_serving();
            self.set_in_sync(false);
            for mounted in self.mounts.drain(..) {
                let path = mounted.path().to_path_buf();
                if let Err(error) = mounted.unmount() {
                    tracing::error!(path = %path.display(), %error, "unmount failed");
                }
            }
            // After the unmount: writes through the mount until then are the daemon's.
            self.stop_primary_guard();
            self.sources.clear();
            self.activity = None;
        }

        /// Opens this node's activity log for the mounts (files it held are
        /// kept pinned until a served reintegration covered them).
        fn open_activity(
            &mut self,
            role: ReplicationRole,
            sender: &Arc<Sender>,
        ) -> Result<Arc<ActivityLog>, DataPathError> {
            if let Some(log) = &self.activity {
                return Ok(Arc::clone(log));
            }
            let path = self.beside_dirty_log("activity");
            let position: Arc<dyn StreamPosition> = sender.clone();
            let log =
                ActivityLog::open(&path, ACTIVITY_FILES, Some(position)).map_err(|error| {
                    Self::role_error(role, format!("activity log {}: {error}", path.display()))
                })?;
            let recovered = log.hot_files().len();
            if recovered > 0 {
                tracing::warn!(
                    recovered,
                    path = %path.display(),
                    "the activity log holds files from before a crash; the next reintegration compares them"
                );
            }
            let log = Arc::new(log);
            self.activity = Some(Arc::clone(&log));
            Ok(log)
        }

        fn ensure_sender(&mut self, role: ReplicationRole) -> Result<Arc<Sender>, DataPathError> {
            if let Some(sender) = &self.sender {
                return Ok(Arc::clone(sender));
            }
            let dirty = DirtyLog::open(&self.config.dirty_log)
                .map_err(|error| Self::role_error(role, format!("dirty log: {error}")))?;
            let mut sender_config = SenderConfig::new(
                self.config.peer,
                self.config.secret.clone(),
                self.config.module.clone(),
                Arc::new(dirty),
            );
            sender_config.replication_timeout = self.config.replication_timeout;
            sender_config.initial_role = Role::Alone;
            let sender =
                Arc::new(Sender::new(sender_config).map_err(|error| {
                    Self::role_error(role, format!("replication sender: {error}"))
                })?);
            let reports = sender.subscribe();
            let events = self.events.clone();
            let in_sync = Arc::clone(&self.in_sync);
            std::thread::Builder::new()
                .name(format!("repl-events-{}", self.config.module))
                .spawn(move || {
                    // Ends when the sender is dropped (its subscribers go with it).
                    while let Ok(report) = reports.recv() {
                        match report {
                            ReplicationEvent::PeerLost { reason } => {
                                in_sync.store(false, Ordering::SeqCst);
                                tracing::warn!(%reason, "replication peer lost");
                                if events.send(DataPathEvent::PeerLost).is_err() {
                                    return;
                                }
                            }
                            ReplicationEvent::Connected { peer } => {
                                tracing::info!(%peer, "replication connected");
                            }
                            ReplicationEvent::FileOutOfSync { dir, path, errno } => {
                                tracing::warn!(
                                    dir,
                                    ?path,
                                    errno,
                                    "file out of sync, recorded for the next resync"
                                );
                            }
                        }
                    }
                })
                .map_err(|error| Self::role_error(role, error))?;
            self.sender = Some(Arc::clone(&sender));
            Ok(sender)
        }

        fn become_primary(&mut self, role: ReplicationRole) -> Result<(), DataPathError> {
            self.receiver = None;
            // The read-only guard goes before the mount goes over the directory.
            self.release_secondary_guard();
            if role != ReplicationRole::Primary {
                self.set_in_sync(false);
            }
            if role == ReplicationRole::Alone {
                // Only a replicating sender can carry a resync.
                self.stop_serving();
            }
            let sender = self.ensure_sender(role)?;
            sender.set_role(if role == ReplicationRole::Primary {
                Role::Replicating
            } else {
                Role::Alone
            });
            if self.mounts.is_empty() {
                self.stop_primary_guard();
                self.sources.clear();
                let activity = self.open_activity(role, &sender)?;
                // The engine and the guard read beneath the mount: open the
                // directories before mounting over them, and engage the guard
                // before the application can use the mount.
                for dir in &self.config.dirs {
                    match Self::open_dir(dir) {
                        Ok(source) => self.sources.push(source),
                        Err(reason) => {
                            self.unmount_all();
                            return Err(Self::role_error(role, reason));
                        }
                    }
                }
                self.engage_primary_guard(&sender);
                for (index, dir) in self.config.dirs.iter().enumerate() {
                    let options = FsOptions {
                        dir_index: u16::try_from(index).map_err(|_| {
                            Self::role_error(role, "too many replicated directories")
                        })?,
                        mode: self.config.sync_mode,
                        replicate_xattrs: self.config.replicate_xattrs,
                    };
                    let replicator: Arc<dyn Replicator> = sender.clone();
                    let mounted = mount::mount_over_with(
                        dir,
                        replicator,
                        MountConfig {
                            fs: options,
                            locks: Some(Arc::clone(&self.locks)),
                            activity_log: Some(Arc::clone(&activity)),
                            // One checkpoint thread for the module's log: the first mount's.
                            checkpoint_interval: (index == 0).then_some(CHECKPOINT_INTERVAL),
                        },
                    );
                    match mounted {
                        Ok(mounted) => self.mounts.push(mounted),
                        Err(error) => {
                            self.unmount_all();
                            return Err(Self::role_error(role, error));
                        }
                    }
                }
            }
            Ok(())
        }

        fn become_secondary(&mut self) -> Result<(), DataPathError> {
            self.unmount_all();
            self.sender = None;
            if self.receiver.is_some() {
                // Released meanwhile (diverged files set aside)?
                self.engage_secondary_guard();
                return Ok(());
            }
            let role = ReplicationRole::Secondary;
            // The receiver's descriptors must be on the writable mount.
            self.release_secondary_guard();
            let mut dirs = Vec::new();
            for dir in &self.config.dirs {
                dirs.push(Self::open_dir(dir).map_err(|reason| Self::role_error(role, reason))?);
            }
            let activity = self.beside_dirty_log("activity");
            let receiver = match ActivityLog::load(&activity) {
                Ok(_) => Receiver::bind_serving_resync_with_activity(
                    self.config.local,
                    self.config.secret.clone(),
                    self.config.module.clone(),
                    dirs,
                    &activity,
                ),
                Err(error) => {
                    tracing::error!(
                        path = %activity.display(),
                        %error,
                        "activity log unreadable: files this node changed without shipping them before a crash will not be compared"
                    );
                    Receiver::bind_serving_resync(
                        self.config.local,
                        self.config.secret.clone(),
                        self.config.module.clone(),
                        dirs,
                    )
                }
            }
            .map_err(|error| {
                Self::role_error(role, format!("listen on {}: {error}", self.config.local))
            })?;
            self.receiver = Some(receiver);
            self.engage_secondary_guard();
            Ok(())
        }

        /// Once the receiver's descriptors are open, makes the paths read-only
        /// for applications (a refusal is reported; the secondary runs unguarded).
        fn engage_secondary_guard(&mut self) {
            if self.secondary_guard.is_some() || self.config.guard.is_none() {
                return;
            }
            match SecondaryGuard::engage(&self.dir_paths()) {
                Ok(guard) => self.secondary_guard = Some(guard),
                Err(error) => {
                    tracing::error!(module = %self.config.module, %error, "the replica is not read-only for applications");
                    self.notice(
                        true,
                        format!("The replicated directories are not read-only on this secondary: {error}"),
                    );
                }
            }
        }

        /// The engine's kind: incremental covers the dirty log, plus the activity
        /// log's files when one exists (files possibly in flight at a crash).
        fn engine_kind(&self, kind: ResyncKind) -> EngineKind {
            match kind {
                ResyncKind::Full => EngineKind::Full,
                ResyncKind::Incremental { .. } => {
                    if let Some(log) = &self.activity {
                        return EngineKind::Incremental {
                            extra: log.hot_files(),
                        };
                    }
                    let activity = self.beside_dirty_log("activity");
                    let extra = match ActivityLog::load(&activity) {
                        Ok(extra) => extra,
                        Err(error) => {
                            tracing::warn!(path = %activity.display(), %error, "activity log unreadable; incremental resync without it");
                            Vec::new()
                        }
                    };
                    EngineKind::Incremental { extra }
                }
            }
        }
    }

    /// Moves every entry of `dir` into `folder` (created); `false` when `dir` is empty.
    fn move_aside(dir: &Path, folder: &Path) -> std::io::Result<bool> {
        let entries = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            return Ok(false);
        }
        std::fs::create_dir_all(folder)?;
        for entry in entries {
            let target = folder.join(entry.file_name());
            match std::fs::rename(entry.path(), &target) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc_exdev()) => {
                    copy_entry(&entry.path(), &target)?;
                    if entry.file_type()?.is_dir() {
                        std::fs::remove_dir_all(entry.path())?;
                    } else {
                        std::fs::remove_file(entry.path())?;
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }

    fn libc_exdev() -> i32 {
        nix::errno::Errno::EXDEV as i32
    }

    /// Copies one entry (recursively for a directory), keeping mode, owner and symlinks.
    fn copy_entry(source: &Path, target: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::symlink_metadata(source)?;
        let kind = metadata.file_type();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(source)?, target)?;
        } else if kind.is_dir() {
            std::fs::create_dir(target)?;
            for entry in std::fs::read_dir(source)? {
                let entry = entry?;
                copy_entry(&entry.path(), &target.join(entry.file_name()))?;
            }
            std::fs::set_permissions(target, metadata.permissions())?;
        } else if kind.is_file() {
            std::fs::copy(source, target)?;
        } else {
            tracing::warn!(path = %source.display(), "special file not kept aside");
            return Ok(());
        }
        std::os::unix::fs::lchown(target, Some(metadata.uid()), Some(metadata.gid()))
    }

    impl DataPath for LinuxDataPath {
        fn set_role(&mut self, role: ReplicationRole) -> Result<(), DataPathError> {
            let result = match role {
                ReplicationRole::Off => {
                    self.unmount_all();
                    self.sender = None;
                    self.receiver = None;
                    self.release_secondary_guard();
                    Ok(())
                }
                ReplicationRole::Primary | ReplicationRole::Alone => self.become_primary(role),
                ReplicationRole::Secondary => self.become_secondary(),
            };
            self.role = result.is_ok().then_some(role);
            result
        }

        fn start_resync(&mut self, kind: ResyncKind) -> Result<(), DataPathError> {
            if self.receiver.is_none() {
                return Err(DataPathError::Resync(
                    "the replication receiver is not listening".into(),
                ));
            }
            tracing::info!(
                ?kind,
                local = %self.config.local,
                "receiver armed: the primary serves the reintegration"
            );
            Ok(())
        }

        fn serve_resync(&mut self, kind: ResyncKind, attempt: u64) -> Result<(), DataPathError> {
            let sender = match (&self.sender, self.role) {
                (Some(sender), Some(ReplicationRole::Primary)) if !self.mounts.is_empty() => {
                    Arc::clone(sender)
                }
                _ => {
                    return Err(DataPathError::Resync(
                        "this node is not replicating to its peer".into(),
                    ));
                }
            };
            self.stop_serving();
            self.set_in_sync(false);
            if let Some(guarding) = &self.primary_guard
                && let Some(heal) = lock(&guarding.running).as_ref()
            {
                heal.stop();
            }
            let sources = self
                .sources
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| DataPathError::Resync(format!("replicated directory: {error}")))?;
            let mut config = ResyncConfig::new(self.beside_dirty_log("resync.cursor"));
            config.workers = self.config.resync_workers.max(1);
            config.bandwidth = self.config.resync_bandwidth;
            config.request_timeout = self.config.resync_timeout;
            config.xattrs = self.config.replicate_xattrs;
            let engine_kind = self.engine_kind(kind);
            let progress_events = self.events.clone();
            let engine = ResyncEngine::new(
                config,
                Arc::clone(&sender),
                sources,
                Arc::clone(&self.locks),
            )
            .on_progress(Box::new(move |progress| {
                let _ = progress_events.send(DataPathEvent::ServeProgress {
                    attempt,
                    progress: status(progress),
                });
            }));
            let handle = engine.handle();
            let cancelled = Arc::new(AtomicBool::new(false));
            let events = self.events.clone();
            let stop = Arc::clone(&cancelled);
            let activity = self.activity.clone();
            let engine_lock = Arc::clone(&self.engine_lock);
            std::thread::Builder::new()
                .name(format!("resync-{}", self.config.module))
                .spawn(move || {
                    let outcome = {
                        let _one_engine = lock(&engine_lock);
                        serve(&engine, &sender, engine_kind, &stop)
                    };
                    let progress = engine.handle().progress();
                    let event = match outcome {
                        Ok(ResyncOutcome::Completed { stats }) => {
                            // The files pinned since a crash were compared: they may go cold.
                            if let Some(log) = &activity {
                                log.unpin_recovered();
                            }
                            tracing::info!(
                                attempt,
                                ?stats,
                                elapsed_ms = progress.elapsed.as_millis(),
                                "reintegration served"
                            );
                            // The operator's evidence of what the reintegration cost.
                            let _ = events.send(DataPathEvent::Notice {
                                critical: false,
                                message: format!(
                                    "Reintegration served in {:.1} s: {} files examined, {} sent \
                                     ({} resumed), {} blocks sent, {} bytes sent, {} entries \
                                     deleted, {} attribute updates; {} blocks compared of {} in \
                                     the files compared ({} files over their recorded ranges, {} \
                                     whole)",
                                    progress.elapsed.as_secs_f64(),
                                    stats.files_examined,
                                    stats.files_sent,
                                    stats.files_resumed,
                                    stats.blocks_sent,
                                    stats.bytes_sent,
                                    stats.entries_deleted,
                                    stats.attr_updates,
                                    stats.blocks_compared,
                                    stats.file_blocks,
                                    stats.files_by_range,
                                    stats.files_whole,
                                ),
                            });
                            DataPathEvent::Served {
                                attempt,
                                progress: ResyncProgressStatus {
                                    percent: 100,
                                    eta_secs: Some(0),
                                    ..status(&progress)
                                },
                            }
                        }
                        Err(reason) => {
                            tracing::warn!(attempt, %reason, "reintegration not served");
                            DataPathEvent::ServeFailed { attempt, reason }
                        }
                    };
                    let _ = events.send(event);
                })
                .map_err(|error| DataPathError::Resync(format!("resync thread: {error}")))?;
            tracing::info!(attempt, ?kind, "serving the reintegration");
            self.serving = Some(ServeJob {
                attempt,
                handle,
                cancelled,
            });
            Ok(())
        }

        fn set_aside(
            &mut self,
            _since: Option<GenerationId>,
        ) -> Result<Option<PathBuf>, DataPathError> {
            if !self.mounts.is_empty() {
                return Err(DataPathError::SetAside(
                    "the replicated directories are still mounted".into(),
                ));
            }
            // Moving needs the paths writable; going SECOND engages the guard again.
            self.release_secondary_guard();
            let stamp = diverged_stamp(std::time::SystemTime::now());
            let base = self.beside_dirty_log("diverged").join(&stamp);
            let mut kept = None;
            for (index, dir) in self.config.dirs.iter().enumerate() {
                mount::recover_stale_mount(dir)
                    .map_err(|error| DataPathError::SetAside(error.to_string()))?;
                let name = dir.file_name().map_or_else(
                    || format!("dir{index}"),
                    |name| name.to_string_lossy().into_owned(),
                );
                let folder = base.join(format!("{index}-{name}"));
                match move_aside(dir, &folder) {
                    Ok(true) => {
                        tracing::warn!(dir = %dir.display(), folder = %folder.display(), "diverged files set aside");
                        kept = Some(base.clone());
                    }
                    Ok(false) => {}
                    Err(error) => {
                        return Err(DataPathError::SetAside(format!(
                            "{} -> {}: {error}",
                            dir.display(),
                            folder.display()
                        )));
                    }
                }
            }
            Ok(kept)
        }

        fn set_peer_in_sync(&mut self, in_sync: bool) {
            let in_sync = in_sync && self.role == Some(ReplicationRole::Primary);
            if in_sync != self.peer_in_sync {
                self.set_in_sync(in_sync);
            }
        }

        fn stats(&self) -> DataPathStats {
            let mut details = Vec::new();
            if let Some(sender) = &self.sender {
                let stats = sender.stats();
                details.push((
                    "replication".into(),
                    format!(
                        "{:?}, peer {} {}, ops {}, bytes {}, in flight {}, recorded alone {}, peer losses {}",
                        stats.role,
                        self.config.peer,
                        if stats.connected { "connected" } else { "not connected" },
                        stats.ops,
                        stats.bytes,
                        stats.in_flight_ops,
                        stats.recorded_alone,
                        stats.peer_losses
                    ),
                ));
            }
            if let Some(receiver) = &self.receiver {
                let stats = receiver.stats();
                details.push((
                    "replication".into(),
                    format!(
                        "receiving on {}, connections {}, ops applied {}, apply errors {}",
                        self.config.local,
                        stats.connections_accepted,
                        stats.ops_applied,
                        stats.apply_errors
                    ),
                ));
            }
            if let Some(job) = &self.serving {
                let progress = job.handle.progress();
                details.push((
                    "resync engine".into(),
                    format!("attempt {:016x}: {:?}", job.attempt, progress.stats),
                ));
            }
            if let Some(guarding) = &self.primary_guard {
                let stats = &guarding.stats;
                details.push((
                    "guard".into(),
                    format!(
                        "{}, bypass writes {}, denied {}, not healed yet {}, heals {} (failed {}), lost events {}, unresolved {}",
                        guarding.policy,
                        stats.bypass_writes.load(Ordering::Relaxed),
                        stats.denied.load(Ordering::Relaxed),
                        self.heals.pending.load(Ordering::Relaxed),
                        self.heals.completed.load(Ordering::Relaxed),
                        self.heals.failed.load(Ordering::Relaxed),
                        stats.overflows.load(Ordering::Relaxed),
                        stats.unresolved.load(Ordering::Relaxed),
                    ),
                ));
            }
            if let Some(guard) = &self.secondary_guard {
                details.push((
                    "guard".into(),
                    format!(
                        "read-only for applications: {}",
                        guard
                            .dirs()
                            .iter()
                            .map(|dir| dir.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            if let Some(log) = &self.activity {
                details.push((
                    "activity log".into(),
                    format!(
                        "{} files with writes possibly in flight",
                        log.hot_files().len()
                    ),
                ));
            }
            for mounted in &self.mounts {
                details.push((
                    format!("mount {}", mounted.path().display()),
                    mounted.stats().render(),
                ));
            }
            DataPathStats {
                role: self.role,
                details,
            }
        }
    }

    /// Waits for the replication connection, then runs the engine.
    fn serve(
        engine: &ResyncEngine,
        sender: &Sender,
        kind: EngineKind,
        stop: &AtomicBool,
    ) -> Result<ResyncOutcome, String> {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        // Woken as soon as it connects; `stop` is looked at every 50 ms.
        while !sender.wait_connected(Duration::from_millis(50)) {
            if stop.load(Ordering::SeqCst) {
                return Err("stopped".into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no replication connection to the peer within {} s",
                    CONNECT_PATIENCE.as_secs()
                ));
            }
        }
        engine.run(kind).map_err(|error| error.to_string())
    }

    impl Drop for LinuxDataPath {
        fn drop(&mut self) {
            self.unmount_all();
            self.release_secondary_guard();
        }
    }

    /// The primary guard's reports, logged, and the heals they call for.
    ///
    /// A bypass write is in the dirty log (the guard recorded it) but not on
    /// the peer. While the module is PRIM (`in_sync`: the peer is an in-sync
    /// SECOND), the healer runs an incremental resync of the dirty log's
    /// files once the reports pause, which ships what differs and clears the
    /// log (the engine runs beside live writes, one engine at a time through
    /// `engine_lock`). Otherwise the file waits in the dirty log for the next
    /// reintegration, which compares it. A heal that fails is retried; the
    /// file stays in the dirty log meanwhile.
    struct Healer {
        module: String,
        dirs: Vec<PathBuf>,
        reports: std::sync::mpsc::Receiver<GuardEvent>,
        guard_stats: Arc<GuardStats>,
        sender: Arc<Sender>,
        sources: Vec<OwnedFd>,
        locks: Arc<FileLocks>,
        cursor: PathBuf,
        workers: usize,
        request_timeout: Duration,
        /// `<rfs acl="on">`: heals compare extended attributes too.
        xattrs: bool,
        in_sync: Arc<AtomicBool>,
        engine_lock: Arc<Mutex<()>>,
        stop: Arc<AtomicBool>,
        running: Arc<Mutex<Option<ResyncHandle>>>,
        heals: Arc<HealStats>,
        events: UnboundedSender<DataPathEvent>,
    }

    impl Healer {
        fn run(self) {
            use std::sync::mpsc::RecvTimeoutError;
            let mut healed_writes = 0;
            let mut retry_at: Option<Instant> = None;
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                match self.reports.recv_timeout(HEAL_QUIET) {
                    Ok(event) => {
                        self.report(&event);
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                // Counted by the guard even when a report was dropped.
                let writes = self.guard_stats.bypass_writes.load(Ordering::SeqCst)
                    + self.guard_stats.overflows.load(Ordering::SeqCst);
                self.heals
                    .pending
                    .store(writes.saturating_sub(healed_writes), Ordering::Relaxed);
                if writes == healed_writes
                    || retry_at.is_some_and(|at| Instant::now() < at)
                    || !self.in_sync.load(Ordering::SeqCst)
                    || !self.sender.stats().connected
                {
                    continue;
                }
                match self.heal() {
                    Some(true) => {
                        healed_writes = writes;
                        retry_at = None;
                        self.heals.completed.fetch_add(1, Ordering::Relaxed);
                        self.heals.pending.store(0, Ordering::Relaxed);
                    }
                    Some(false) => {
                        retry_at = Some(Instant::now() + HEAL_RETRY);
                        self.heals.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    // Not in sync any more: the reintegration covers it.
                    None => {}
                }
            }
        }

        fn report(&self, event: &GuardEvent) {
            let dir = self.dirs.get(usize::from(event.dir)).map_or_else(
                || format!("#{}", event.dir),
                |dir| dir.display().to_string(),
            );
            let path = String::from_utf8_lossy(&event.path.to_bytes()).into_owned();
            let lost = event.pid == 0 && event.path.components().is_empty();
            if lost {
                tracing::warn!(module = %self.module, %dir, "guard events lost: the next heal compares the whole directory");
            } else {
                tracing::warn!(module = %self.module, %dir, %path, pid = event.pid, denied = event.denied, "write bypassing the replication");
            }
            let message = if event.denied {
                format!(
                    "Guard: process {} was refused the opening of {dir}/{path} beneath the replication",
                    event.pid
                )
            } else if lost {
                format!(
                    "Guard: events lost under {dir}; the replica is compared whole at the next heal"
                )
            } else {
                format!(
                    "Guard: process {} wrote {dir}/{path} bypassing the replication; the replica is out of sync for it until healed",
                    event.pid
                )
            };
            let _ = self.events.send(DataPathEvent::Notice {
                critical: true,
                message,
            });
        }

        /// One incremental pass over the dirty log; `None` when the peer is not in sync.
        fn heal(&self) -> Option<bool> {
            let _one_engine = lock(&self.engine_lock);
            if !self.in_sync.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let sources = match self
                .sources
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(sources) if !sources.is_empty() => sources,
                Ok(_) => return Some(false),
                Err(error) => {
                    tracing::error!(module = %self.module, %error, "cannot heal: replicated directory");
                    return Some(false);
                }
            };
            let mut config = ResyncConfig::new(self.cursor.clone());
            config.workers = self.workers;
            config.request_timeout = self.request_timeout;
            config.xattrs = self.xattrs;
            let engine = ResyncEngine::new(
                config,
                Arc::clone(&self.sender),
                sources,
                Arc::clone(&self.locks),
            );
            *lock(&self.running) = Some(engine.handle());
            let outcome = engine.run(EngineKind::Incremental { extra: Vec::new() });
            *lock(&self.running) = None;
            match outcome {
                Ok(ResyncOutcome::Completed { stats }) => {
                    tracing::info!(module = %self.module, ?stats, "writes bypassing the replication healed");
                    let _ = self.events.send(DataPathEvent::Notice {
                        critical: false,
                        message: "Guard: the files written bypassing the replication are healed on the peer".into(),
                    });
                    Some(true)
                }
                Err(error) => {
                    tracing::warn!(module = %self.module, %error, "heal of writes bypassing the replication failed; retried");
                    Some(false)
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn diverged_files_are_moved_with_modes_and_links_and_the_directory_is_left_empty() {
            use std::os::unix::fs::PermissionsExt;
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().join("data");
            std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
            std::fs::write(dir.join("sub").join("a.txt"), "a").expect("write");
            std::fs::set_permissions(
                dir.join("sub").join("a.txt"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("chmod");
            std::os::unix::fs::symlink("sub/a.txt", dir.join("link")).expect("symlink");
            let folder = tmp.path().join("aside").join("0-data");
            assert!(move_aside(&dir, &folder).expect("moved"));
            assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 0);
            assert_eq!(
                std::fs::read_to_string(folder.join("link")).expect("through the link"),
                "a"
            );
            // The copy used across mounts keeps the same things.
            let copy = tmp.path().join("copy");
            copy_entry(&folder, &copy).expect("copy");
            let mode = std::fs::metadata(copy.join("sub").join("a.txt"))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            assert_eq!(
                std::fs::read_link(copy.join("link")).expect("readlink"),
                PathBuf::from("sub/a.txt")
            );
            assert!(!move_aside(&dir, &tmp.path().join("none")).expect("empty"));
        }
    }
}

/// The `resync` line of `safekit state -v`: the reintegration received
/// (SECOND) or served (primary), with the primary engine's figures.
pub fn render_resync(machine: &safekit_core::cluster::Machine) -> String {
    use safekit_protocol::heartbeat::ServePhase;
    let figures = |progress: &ResyncProgressStatus| {
        format!(
            "files {}/{}, bytes {}/{}, sent {}, rate {}/s, ETA {}",
            progress.files_done,
            progress.files_total,
            progress.bytes_done,
            progress.bytes_total,
            progress.bytes_sent,
            progress.rate,
            progress
                .eta_secs
                .map_or_else(|| "unknown".to_string(), |secs| format!("{secs} s"))
        )
    };
    if let Some(serve) = machine.serving() {
        let kind = if serve.full { "full" } else { "incremental" };
        return match serve.phase {
            ServePhase::Running(progress) => format!(
                "serving the peer ({kind}): {}%, {}",
                progress.percent,
                figures(&progress)
            ),
            ServePhase::Served { progress, .. } => format!(
                "served to the peer ({kind}), waiting for it to report in sync: {}",
                figures(&progress)
            ),
            ServePhase::Failed => format!("serving the peer ({kind}): failed"),
        };
    }
    match machine.resync_progress() {
        Some(progress) => format!("{}%, {}", machine.resync_percent(), figures(&progress)),
        None => format!("{}%", machine.resync_percent()),
    }
}
