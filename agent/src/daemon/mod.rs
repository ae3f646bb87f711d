//! `safekitd`: the agent daemon, one per node, hosting every module installed on it.
//!
//! # Structure
//!
//! ```text
//!  admin socket ──(Control, with the caller's identity)──┐
//!  heartbeat receiver threads (per module, per LAN) ──────┤
//!  script tasks (outcomes) ───────────────────────────────┼──► module runner ──► Machine::handle
//!  data path (resync progress, peer lost) ────────────────┤      (one tokio task     │
//!  ticks at Machine::next_deadline ───────────────────────┘       per module)        ▼
//!                                                              actions: persist, scripts,
//!  heartbeat sender thread ◄── heartbeat payload ◄─────────────  VIP + ARP, data path, logs
//!  safekit state          ◄── published status   ◄─────────────
//! ```
//!
//! Each module's [`runner::Runner`] loop is the only place where that module's
//! decisions are made (by the I/O-free `safekit_core::cluster::Machine` it
//! owns); every other task or thread only translates between the world and
//! events or actions. Heartbeats run on OS threads ([`heartbeat`]) so that
//! load on the runtime never delays them.
//!
//! # Start-up
//!
//! 1. Read `SAFEVAR/cluster/cluster.xml` and the cluster secret, find this
//!    node and its peer ([`load`]); any problem there stops the agent with a
//!    one-line reason.
//! 2. Increment the boot counter (`SAFEVAR/boot`), carried by heartbeats so
//!    that the peer's replay guard accepts this new run.
//! 3. Load and validate every module completely; invalid ones are logged with
//!    every error and not started; what a killed agent left running for
//!    them is cleaned up all the same ([`leftovers::clean_up_refused`]), as
//!    for a module whose heartbeat socket cannot bind in step 4.
//! 4. Per module: read its persisted state (`SAFEVAR/modules/<AM>/state`),
//!    open its logs, bind its heartbeat sockets, start its threads and runner.
//!    A module always starts in STOP; its runner first cleans up what a killed
//!    agent left running for it ([`leftovers`]), before any command.
//! 5. Modules whose boot is on (`safekit boot on`, `<service boot="on">`)
//!    are then started with `start` by the caller `boot`, the others stay
//!    STOP: one rule for a machine boot and a restart after a crash alike
//!    ([`boot`], [`crate::cli::boot`]).
//! 6. Serve the admin socket (`SAFEVAR/run/admin.sock`, root only).
//!
//! SIGTERM or SIGINT end the agent without stopping the applications (like a
//! kill of SafeKit's agent processes); `safekit stop` stops a module cleanly,
//! and `safekit shutdown` every module (the systemd unit's `ExecStop`).

pub mod admin;
pub mod boot;
pub mod heartbeat;
pub mod leftovers;
pub mod load;
pub mod runner;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use safekit_core::cluster::{Machine, Persistent};
use safekit_protocol::admin::ModuleStatus;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::admin_socket::AdminListener;
use crate::datapath::NoDataPath;
use crate::modlog::{self, ModLog};
use load::NodePaths;
use runner::{ModuleHandle, Registry, Runner, RunnerEvent, RunnerParts};

/// Size bound of each module log file.
pub const MODULE_LOG_BYTES: u64 = 4 * 1024 * 1024;

/// How the daemon was started.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// `SAFE`.
    pub safe: PathBuf,
    /// `SAFEVAR`.
    pub var: PathBuf,
    /// This node's name in cluster.xml.
    pub node: String,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The node's configuration is unusable.
    #[error(transparent)]
    Load(#[from] load::LoadError),
    /// A state file could not be read or written.
    #[error("state file: {0}")]
    Persist(#[from] crate::persist::PersistError),
    /// The admin socket could not be created.
    #[error(transparent)]
    AdminSocket(#[from] crate::admin_socket::AdminSocketError),
    /// A module's log could not be opened.
    #[error(transparent)]
    ModLog(#[from] crate::modlog::ModLogError),
    /// A module's heartbeat socket or thread could not be set up.
    #[error("module {module}: heartbeat on LAN {lan} ({addr}): {source}")]
    Heartbeat {
        /// The module.
        module: String,
        /// The LAN.
        lan: String,
        /// The local address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be created.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// [`DaemonError`] when the node cannot start (cluster.xml, secret, admin socket).
pub async fn run(options: DaemonOptions) -> Result<(), DaemonError> {
    let span = tracing::info_span!("node", node = %options.node);
    async move {
        let registry = start(&options).await?;
        let listener = AdminListener::bind(load::admin_socket_path(&options.var), None).await?;
        let registry = Arc::new(registry);
        // Modules whose boot is on are started now (see `boot`); the others stay STOP.
        boot::start_modules(&registry);
        crate::health_http::start_for_node(
            &options.safe,
            &options.var,
            &options.node,
            Arc::clone(&registry),
        )
        .await;
        let serve = listener.serve(move |peer, request| {
            let registry = Arc::clone(&registry);
            async move { admin::handle(&registry, peer, request).await }
        });
        tracing::info!("agent ready");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(DaemonError::Thread)?;
        tokio::select! {
            () = serve => {}
            _ = terminate.recv() => tracing::info!("SIGTERM: agent exits"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: agent exits"),
        }
        Ok(())
    }
    .instrument(span)
    .await
}

async fn start(options: &DaemonOptions) -> Result<Registry, DaemonError> {
    let paths = NodePaths {
        safe: options.safe.clone(),
        var: options.var.clone(),
    };
    let cluster = load::load_cluster(&paths)?;
    let peer = load::peer_of(&cluster, &options.node)?;
    let secret: Arc<[u8]> = load::load_secret(&paths)?.into();
    let boot = next_boot(&paths)?;
    tracing::info!(peer = %peer, boot, "cluster configuration loaded");
    let (modules, rejected) = load::load_modules(&paths, &cluster, &options.node, &peer);
    let mut registry = Registry {
        node: options.node.clone(),
        boot: boot::BootSettings::new(paths.var.clone()),
        ..Registry::default()
    };
    for module in &rejected {
        tracing::error!(module = %module.name, errors = %module.errors.join("\n"), "invalid module configuration: module not started");
        let log = ModLog::open(paths.module_var(&module.name).join("log"), MODULE_LOG_BYTES);
        if let Ok(log) = &log {
            log.log(
                modlog::Level::Critical,
                format!(
                    "Invalid configuration, module not started:\n{}",
                    module.errors.join("\n")
                ),
            );
        }
        clean_up_refused(&paths, &module.name, None, log.as_ref().ok()).await;
        registry
            .rejected
            .insert(module.name.clone(), module.errors.clone());
    }
    let origin = Instant::now();
    let mut handles = BTreeMap::new();
    for setup in modules {
        if setup.config.service.rfs.is_some() && !cfg!(feature = "linux-datapath") {
            let error = "<rfs> needs the data path: this agent was built without the `linux-datapath` feature".to_string();
            tracing::error!(module = %setup.name, %error, "module not started");
            let log = ModLog::open(paths.module_var(&setup.name).join("log"), MODULE_LOG_BYTES);
            clean_up_refused(&paths, &setup.name, Some(&setup), log.as_ref().ok()).await;
            registry.rejected.insert(setup.name.clone(), vec![error]);
            continue;
        }
        let module_span = tracing::info_span!("module", module = %setup.name);
        let _entered = module_span.enter();
        for warning in &setup.warnings {
            tracing::warn!(%warning, "configuration warning");
        }
        let module_var = paths.module_var(&setup.name);
        std::fs::create_dir_all(&module_var).map_err(|source| {
            DaemonError::Persist(crate::persist::PersistError::Io {
                operation: "create directory",
                path: module_var.clone(),
                source,
            })
        })?;
        let state_path = module_var.join("state");
        let persistent = match crate::persist::read(&state_path)? {
            Some(bytes) => match Persistent::decode(&bytes) {
                Ok(persistent) => persistent,
                Err(error) => {
                    // Unknown state: the safe side is "not up to date".
                    tracing::error!(%error, "unreadable module state: starting as not up to date");
                    Persistent::default()
                }
            },
            None => Persistent::default(),
        };
        let modlog = ModLog::open(module_var.join("log"), MODULE_LOG_BYTES)?;
        let machine = Machine::new(
            setup.params.clone(),
            persistent,
            origin.elapsed(),
            rand::random::<u64>(),
        );
        let heartbeat_status = Arc::new(Mutex::new(heartbeat::Outgoing::new(
            machine.heartbeat_payload(),
        )));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (datapath_tx, mut datapath_rx) = mpsc::unbounded_channel();
        let forward_tx = events_tx.clone();
        tokio::spawn(async move {
            while let Some(report) = datapath_rx.recv().await {
                if forward_tx.send(RunnerEvent::DataPath(report)).is_err() {
                    return;
                }
            }
        });
        let mut heartbeat_error = None;
        for lan in &setup.lans {
            let events = events_tx.clone();
            let spawned = heartbeat::spawn_receiver(
                heartbeat::ReceiverConfig {
                    module: setup.name.clone(),
                    peer: setup.params.peer.clone(),
                    lan: lan.clone(),
                },
                Arc::clone(&secret),
                modlog.clone(),
                move |received, extensions| {
                    events
                        .send(RunnerEvent::Heartbeat(received, extensions.resources))
                        .is_ok()
                },
            )
            .map_err(|source| DaemonError::Heartbeat {
                module: setup.name.clone(),
                lan: lan.name.clone(),
                addr: lan.local,
                source,
            });
            if let Err(error) = spawned {
                heartbeat_error = Some(error.to_string());
                break;
            }
        }
        if let Some(error) = heartbeat_error {
            // This module cannot hear its peer: it is not started, the others are.
            tracing::error!(%error, "module not started");
            modlog.log(
                modlog::Level::Critical,
                format!("Module not started: {error}"),
            );
            clean_up_refused(&paths, &setup.name, Some(&setup), Some(&modlog)).await;
            registry.rejected.insert(setup.name.clone(), vec![error]);
            continue;
        }
        heartbeat::spawn_sender(
            heartbeat::SenderConfig {
                module: setup.name.clone(),
                node: options.node.clone(),
                boot,
                pulse: setup.params.pulse,
                lans: setup.lans.clone(),
            },
            Arc::clone(&secret),
            Arc::clone(&heartbeat_status),
        )
        .map_err(DaemonError::Thread)?;
        let script_env = load::script_env(&paths, &setup);
        let (status_tx, status_rx) = watch::channel(ModuleStatus {
            module: setup.name.clone(),
            node: options.node.clone(),
            state: "STOP".into(),
            readiness: "NotReady".into(),
            details: Vec::new(),
        });
        let name = setup.name.clone();
        registry.boot.add(
            &name,
            setup.config.service.boot,
            setup.config.service.boot_delay,
        );
        let datapath = data_path(&setup, &secret, &module_var, datapath_tx);
        let runner = Runner::new(
            setup,
            RunnerParts {
                machine,
                origin,
                events: events_tx.clone(),
                modlog: modlog.clone(),
                script_env,
                state_path,
                datapath,
                status: status_tx,
                heartbeat_status,
            },
        );
        tokio::spawn(runner.run(events_rx).instrument(module_span.clone()));
        handles.insert(
            name.clone(),
            ModuleHandle {
                name,
                events: events_tx,
                status: status_rx,
                modlog,
            },
        );
    }
    registry.modules = handles;
    registry.reload = Some(Arc::new(load::ReloadContext {
        paths,
        node: options.node.clone(),
        peer,
        secret,
        cluster: Mutex::new(cluster),
    }));
    Ok(registry)
}

/// The crash clean-up of a module refused at start, which has no runner
/// ([`leftovers::clean_up_refused`]): its scripts are in `SAFE/modules/<AM>/bin`,
/// its record in `SAFEVAR/modules/<AM>`; `setup` when its configuration is valid.
async fn clean_up_refused(
    paths: &NodePaths,
    name: &str,
    setup: Option<&load::ModuleSetup>,
    log: Option<&ModLog>,
) {
    let env = match setup {
        Some(setup) => load::script_env(paths, setup),
        None => crate::scripts::ScriptEnv {
            safe: paths.safe.clone(),
            safebin: paths.safe.join("private").join("bin"),
            safevar: paths.var.clone(),
            module: name.to_string(),
            userbin: paths.modules().join(name).join("bin"),
            userconf: paths.modules().join(name).join("conf"),
            uservar: paths.module_var(name),
            user_vars: Default::default(),
        },
    };
    let force_stop = setup.map_or_else(
        || safekit_core::config::User::default().forcestoptimeout,
        |setup| setup.script_timeouts().force_stop,
    );
    match log {
        Some(log) => {
            leftovers::clean_up_refused(&env, log, force_stop).await;
            log.flush().await;
        }
        None => {
            let record = crate::persist::read_leftovers(&leftovers::record_path(&env.uservar));
            if record.is_err() || matches!(record, Ok(Some(record)) if !record.is_empty()) {
                tracing::error!(
                    module = name,
                    "module log unavailable: no clean-up after the agent's crash, the application may still be running"
                );
            }
        }
    }
}

/// The module's data path: none without `<rfs>`, the in-process Linux one with it.
#[cfg_attr(not(feature = "linux-datapath"), allow(unused_variables))]
fn data_path(
    setup: &load::ModuleSetup,
    secret: &Arc<[u8]>,
    module_var: &std::path::Path,
    events: mpsc::UnboundedSender<crate::datapath::DataPathEvent>,
) -> Box<dyn crate::datapath::DataPath> {
    #[cfg(feature = "linux-datapath")]
    if let Some(rfs) = &setup.config.service.rfs {
        use crate::datapath::linux::{LinuxDataPath, LinuxDataPathConfig};
        use safekit_core::config::{RfsGuard, SyncMode};
        use safekit_linux_helper::guard::GuardPolicy;
        // Replication runs on the `ident="flow"` heartbeat LAN (or the legacy
        // `<rfs><flow name>`), else on the first heartbeat LAN.
        let flow_index = rfs
            .flow
            .as_ref()
            .and_then(|flow| setup.lans.iter().position(|lan| lan.name == flow.name))
            .or_else(|| setup.params.lans.iter().position(|lan| lan.flow))
            .unwrap_or(0);
        let (local, peer) = setup.lans.get(flow_index).map_or_else(
            || {
                let unspecified =
                    std::net::SocketAddr::from(([0, 0, 0, 0], setup.ports.replication));
                (unspecified, unspecified)
            },
            |lan| {
                (
                    std::net::SocketAddr::new(lan.local.ip(), setup.ports.replication),
                    std::net::SocketAddr::new(lan.peer.ip(), setup.ports.replication),
                )
            },
        );
        return Box::new(LinuxDataPath::new(
            LinuxDataPathConfig {
                module: setup.name.clone(),
                dirs: rfs
                    .replicated
                    .iter()
                    .map(|dir| PathBuf::from(&dir.dir))
                    .collect(),
                local,
                peer,
                secret: secret.to_vec(),
                dirty_log: module_var.join("dirty"),
                replication_timeout: rfs.replication_timeout,
                sync_mode: match rfs.sync_mode {
                    SyncMode::Write => safekit_linux_helper::fs::SyncMode::Strict,
                    SyncMode::Fsync => safekit_linux_helper::fs::SyncMode::FsyncOnly,
                },
                replicate_xattrs: rfs.acl,
                resync_workers: usize::try_from(rfs.nbrei).unwrap_or(6),
                resync_bandwidth: rfs.reiallowedbw.map(|kbps| u64::from(kbps) * 1024),
                resync_timeout: rfs.reitimeout,
                guard: match rfs.guard {
                    RfsGuard::Record => Some(GuardPolicy::Record),
                    RfsGuard::Deny => Some(GuardPolicy::Deny),
                    RfsGuard::Off => None,
                },
            },
            events,
        ));
    }
    Box::new(NoDataPath::new(events))
}

/// Reads, increments and durably writes the boot counter.
fn next_boot(paths: &NodePaths) -> Result<u64, DaemonError> {
    let path = paths.boot_counter();
    let previous = crate::persist::read(&path)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map_or(0, u64::from_le_bytes);
    let boot = previous + 1;
    crate::persist::write_atomic(&path, &boot.to_le_bytes())?;
    Ok(boot)
}
