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
//! An implementation over `safekit_linux_helper` (mount over the replicated
//! directories, replication sender on the primary, receiver on the
//! secondary, dirty-file recording when alone) plugs in here without any
//! change to the runner.

use std::path::PathBuf;

use safekit_core::cluster::{GenerationId, ReplicationRole, ResyncKind};
use tokio::sync::mpsc::UnboundedSender;

/// What a data path reports to its module's runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPathEvent {
    /// Resynchronization progress in percent.
    ResyncProgress(u8),
    /// The resynchronization finished: the replicated directories equal the primary's.
    ResyncCompleted,
    /// The resynchronization failed.
    ResyncFailed(String),
    /// The replication connection to the peer broke (send timeout, reset).
    PeerLost,
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

    /// Starts a resynchronization from the peer; progress and the outcome
    /// arrive later as [`DataPathEvent`]s.
    ///
    /// # Errors
    /// [`DataPathError::Resync`] when it cannot even start.
    fn start_resync(&mut self, kind: ResyncKind) -> Result<(), DataPathError>;

    /// Moves the files changed here since `since` (every differing file when
    /// `None`) into a dated folder; returns that folder, or `None` when there
    /// was nothing to keep.
    ///
    /// # Errors
    /// [`DataPathError::SetAside`].
    fn set_aside(&mut self, since: Option<GenerationId>) -> Result<Option<PathBuf>, DataPathError>;

    /// Current counters.
    fn stats(&self) -> DataPathStats;
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
}

/// The in-process Linux data path of a module with `<rfs>`, over `safekit_linux_helper`.
///
/// - primary (`Primary`, `Alone`): the FUSE file system is mounted over every
///   replicated directory, replicating through a [`Sender`] to the peer's
///   replication port (role `Replicating`), or recording every touched file in
///   the dirty log `SAFEVAR/modules/<AM>/dirty` (role `Alone`);
/// - secondary: no mount; a [`Receiver`] on this node's replication port
///   applies the primary's stream beneath the directories (and answers resync
///   requests);
/// - off: nothing mounted, nothing listening.
///
/// Resynchronization is not available yet (issue 5): [`DataPath::start_resync`]
/// fails, so a SECOND that needs one goes WAIT (resynchronization failed)
/// instead of claiming data it does not have.
#[cfg(feature = "linux-datapath")]
pub mod linux {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use safekit_core::cluster::{GenerationId, ReplicationRole, ResyncKind};
    use safekit_linux_helper::dirty::DirtyLog;
    use safekit_linux_helper::fs::{FsOptions, SyncMode};
    use safekit_linux_helper::mount::{self, MountedDir};
    use safekit_linux_helper::replicator::Replicator;
    use safekit_linux_helper::transport::{Receiver, ReplicationEvent, Role, Sender, SenderConfig};
    use tokio::sync::mpsc::UnboundedSender;

    use super::{DataPath, DataPathError, DataPathEvent, DataPathStats};

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
        /// The dirty log file.
        pub dirty_log: PathBuf,
        /// `<rfs replication_timeout>`.
        pub replication_timeout: Duration,
        /// `<rfs sync_mode>`.
        pub sync_mode: SyncMode,
        /// `<rfs acl="on">`: replicate extended attributes.
        pub replicate_xattrs: bool,
    }

    /// See the module documentation.
    #[derive(Debug)]
    pub struct LinuxDataPath {
        config: LinuxDataPathConfig,
        events: UnboundedSender<DataPathEvent>,
        role: Option<ReplicationRole>,
        sender: Option<Arc<Sender>>,
        mounts: Vec<MountedDir>,
        receiver: Option<Receiver>,
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
                receiver: None,
            }
        }

        fn role_error(role: ReplicationRole, reason: impl ToString) -> DataPathError {
            DataPathError::Role {
                role,
                reason: reason.to_string(),
            }
        }

        fn unmount_all(&mut self) {
            for mounted in self.mounts.drain(..) {
                let path = mounted.path().to_path_buf();
                if let Err(error) = mounted.unmount() {
                    tracing::error!(path = %path.display(), %error, "unmount failed");
                }
            }
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
            std::thread::Builder::new()
                .name(format!("repl-events-{}", self.config.module))
                .spawn(move || {
                    // Ends when the sender is dropped (its subscribers go with it).
                    while let Ok(report) = reports.recv() {
                        match report {
                            ReplicationEvent::PeerLost { reason } => {
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
            let sender = self.ensure_sender(role)?;
            sender.set_role(if role == ReplicationRole::Primary {
                Role::Replicating
            } else {
                Role::Alone
            });
            if self.mounts.is_empty() {
                for (index, dir) in self.config.dirs.iter().enumerate() {
                    let options = FsOptions {
                        dir_index: u16::try_from(index).map_err(|_| {
                            Self::role_error(role, "too many replicated directories")
                        })?,
                        mode: self.config.sync_mode,
                        replicate_xattrs: self.config.replicate_xattrs,
                    };
                    let replicator: Arc<dyn Replicator> = sender.clone();
                    match mount::mount_over(dir, replicator, options) {
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
                return Ok(());
            }
            let role = ReplicationRole::Secondary;
            let mut dirs = Vec::new();
            for dir in &self.config.dirs {
                mount::recover_stale_mount(dir).map_err(|error| Self::role_error(role, error))?;
                dirs.push(
                    mount::open_underlying(dir).map_err(|error| Self::role_error(role, error))?,
                );
            }
            let receiver = Receiver::bind_serving_resync(
                self.config.local,
                self.config.secret.clone(),
                self.config.module.clone(),
                dirs,
            )
            .map_err(|error| {
                Self::role_error(role, format!("listen on {}: {error}", self.config.local))
            })?;
            self.receiver = Some(receiver);
            Ok(())
        }
    }

    impl DataPath for LinuxDataPath {
        fn set_role(&mut self, role: ReplicationRole) -> Result<(), DataPathError> {
            let result = match role {
                ReplicationRole::Off => {
                    self.unmount_all();
                    self.sender = None;
                    self.receiver = None;
                    Ok(())
                }
                ReplicationRole::Primary | ReplicationRole::Alone => self.become_primary(role),
                ReplicationRole::Secondary => self.become_secondary(),
            };
            self.role = result.is_ok().then_some(role);
            result
        }

        fn start_resync(&mut self, kind: ResyncKind) -> Result<(), DataPathError> {
            Err(DataPathError::Resync(format!(
                "{kind:?} resynchronization is not available yet in this agent"
            )))
        }

        fn set_aside(
            &mut self,
            _since: Option<GenerationId>,
        ) -> Result<Option<PathBuf>, DataPathError> {
            Err(DataPathError::SetAside(
                "setting diverged files aside is not available yet in this agent".into(),
            ))
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

    impl Drop for LinuxDataPath {
        fn drop(&mut self) {
            self.unmount_all();
        }
    }
}
