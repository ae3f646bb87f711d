//! Reading the node's configuration at start: cluster.xml, the cluster secret and every module.
//!
//! Layout (documented in `safekitd --help` too):
//! - `SAFEVAR/cluster/cluster.xml`: the nodes and their addresses per LAN
//!   (SafeKit keeps it there as well);
//! - `SAFEVAR/cluster/secret`: the cluster secret, mode 0600, written by
//!   `safekit cluster genkey`; heartbeats are authenticated with it;
//! - `SAFE/modules/<AM>/conf/userconfig.xml` and `SAFE/modules/<AM>/bin/`: a
//!   module; `SAFE/modules/<AM>/conf/id`, when present, holds the module id
//!   (a decimal number), otherwise the id is the module's 1-based position in
//!   the sorted list of module folders. The id sets the module's ports.
//!
//! Every module is validated completely (with cluster.xml and its `bin/`
//! listing) before anything starts; a module with errors is reported with
//! every error and not started, the others run.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use safekit_core::cluster::{DefaultPrim, Lan, ModuleParams};
use safekit_core::config::{
    self, ClusterConfig, Mode, ModuleId, ModulePorts, Platform, UserConfig, ValidationContext,
};

/// The node-wide files and names.
#[derive(Debug, Clone)]
pub struct NodePaths {
    /// `SAFE`.
    pub safe: PathBuf,
    /// `SAFEVAR`.
    pub var: PathBuf,
}

impl NodePaths {
    /// `SAFEVAR/cluster/cluster.xml`.
    pub fn cluster_xml(&self) -> PathBuf {
        self.var.join("cluster").join("cluster.xml")
    }

    /// `SAFEVAR/cluster/secret`.
    pub fn secret(&self) -> PathBuf {
        secret_path(&self.var)
    }

    /// `SAFEVAR/run/admin.sock`: the admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        admin_socket_path(&self.var)
    }

    /// `SAFEVAR/boot`: the persisted boot counter carried by heartbeats.
    pub fn boot_counter(&self) -> PathBuf {
        self.var.join("boot")
    }

    /// `SAFE/modules`.
    pub fn modules(&self) -> PathBuf {
        self.safe.join("modules")
    }

    /// `SAFEVAR/modules/<AM>`: the module's working files (state, logs).
    pub fn module_var(&self, module: &str) -> PathBuf {
        self.var.join("modules").join(module)
    }
}

/// `SAFEVAR/run/admin.sock`.
pub fn admin_socket_path(var: &Path) -> PathBuf {
    var.join("run").join("admin.sock")
}

/// `SAFEVAR/cluster/secret`.
pub fn secret_path(var: &Path) -> PathBuf {
    var.join("cluster").join("secret")
}

/// Why the node cannot start at all (a module's own problems only skip that module).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// cluster.xml is invalid.
    #[error("{path} is invalid:\n{errors}")]
    Cluster {
        /// The file.
        path: PathBuf,
        /// Every error, one per line.
        errors: String,
    },
    /// This node is not in cluster.xml, or the cluster is not a pair.
    #[error("{0}")]
    Membership(String),
    /// The secret is missing, empty or readable by others.
    #[error("cluster secret {path}: {reason}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One heartbeat LAN of a module, with the addresses to use on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanEndpoints {
    /// The LAN's name.
    pub name: String,
    /// Where this node listens (its own address on the LAN, heartbeat port).
    pub local: SocketAddr,
    /// Where the peer listens.
    pub peer: SocketAddr,
}

/// A module that passed validation, with everything its runner needs.
#[derive(Debug, Clone)]
pub struct ModuleSetup {
    /// The module name (its folder name).
    pub name: String,
    /// Its id.
    pub id: ModuleId,
    /// Its ports.
    pub ports: ModulePorts,
    /// The parsed, validated configuration.
    pub config: UserConfig,
    /// `SAFE/modules/<AM>`.
    pub dir: PathBuf,
    /// The state machine's parameters.
    pub params: ModuleParams,
    /// Heartbeat endpoints, one per LAN of `params.lans`.
    pub lans: Vec<LanEndpoints>,
    /// Warnings found while validating.
    pub warnings: Vec<String>,
}

/// A module that could not be loaded.
#[derive(Debug, Clone)]
pub struct RejectedModule {
    /// The module name.
    pub name: String,
    /// Every problem, one per entry.
    pub errors: Vec<String>,
}

/// Reads and validates cluster.xml.
///
/// # Errors
/// [`LoadError::Read`] or [`LoadError::Cluster`].
pub fn load_cluster(paths: &NodePaths) -> Result<ClusterConfig, LoadError> {
    let path = paths.cluster_xml();
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
        path: path.clone(),
        source,
    })?;
    let file_name = path.display().to_string();
    let cluster =
        config::parse_cluster(&file_name, &text).map_err(|errors| LoadError::Cluster {
            path: path.clone(),
            errors: errors.to_string(),
        })?;
    let problems: Vec<String> = config::validate_cluster(&cluster)
        .into_iter()
        .filter(|diagnostic| diagnostic.is_error())
        .map(|diagnostic| diagnostic.to_string())
        .collect();
    if !problems.is_empty() {
        return Err(LoadError::Cluster {
            path,
            errors: problems.join("\n"),
        });
    }
    Ok(cluster)
}

/// Reads the cluster secret; refuses a file that others may read.
///
/// # Errors
/// [`LoadError::Secret`].
pub fn load_secret(paths: &NodePaths) -> Result<Vec<u8>, LoadError> {
    let path = paths.secret();
    let secret_error = |reason: String| LoadError::Secret {
        path: path.clone(),
        reason,
    };
    let metadata = std::fs::metadata(&path).map_err(|error| {
        secret_error(format!(
            "{error} (create one with `safekit cluster genkey` and copy it to every node)"
        ))
    })?;
    if metadata.mode() & 0o077 != 0 {
        return Err(secret_error(format!(
            "mode {:o} lets other users read it; it must be 0600",
            metadata.mode() & 0o777
        )));
    }
    let text = std::fs::read(&path).map_err(|error| secret_error(error.to_string()))?;
    let secret: Vec<u8> = text.trim_ascii().to_vec();
    if secret.len() < 16 {
        return Err(secret_error(
            "shorter than 16 bytes; run `safekit cluster genkey`".into(),
        ));
    }
    Ok(secret)
}

/// The peer of `node` in a two-node cluster.
///
/// # Errors
/// [`LoadError::Membership`] if `node` is not in cluster.xml or the cluster
/// does not have exactly two nodes (mirror modules are pairs).
pub fn peer_of(cluster: &ClusterConfig, node: &str) -> Result<String, LoadError> {
    let names = cluster.node_names();
    if !names.contains(&node) {
        return Err(LoadError::Membership(format!(
            "node {node:?} is not in cluster.xml (nodes: {}); pass --node NAME",
            names.join(", ")
        )));
    }
    let others: Vec<&str> = names.iter().copied().filter(|name| *name != node).collect();
    match others.as_slice() {
        [peer] => Ok((*peer).to_string()),
        _ => Err(LoadError::Membership(format!(
            "cluster.xml has {} nodes; a mirror cluster has exactly 2",
            names.len()
        ))),
    }
}

/// Loads every module folder of `SAFE/modules`, sorted by name: the valid
/// ones ready to run, the invalid ones with their errors.
pub fn load_modules(
    paths: &NodePaths,
    cluster: &ClusterConfig,
    node: &str,
    peer: &str,
) -> (Vec<ModuleSetup>, Vec<RejectedModule>) {
    let mut names: Vec<String> = match std::fs::read_dir(paths.modules()) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().join("conf").join("userconfig.xml").is_file())
            .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
            // `safekit module install` stages a package in `.NAME.new.PID`.
            .filter(|name| !name.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    let mut loaded = Vec::new();
    let mut rejected = Vec::new();
    let mut used_ids = BTreeSet::new();
    for (position, name) in names.iter().enumerate() {
        let dir = paths.modules().join(name);
        match load_module(&dir, name, position, cluster, node, peer) {
            Ok(setup) if !used_ids.insert(setup.id) => rejected.push(RejectedModule {
                name: name.clone(),
                errors: vec![format!(
                    "module id {} is already used by another module; write a free id in {}",
                    setup.id.get(),
                    dir.join("conf").join("id").display()
                )],
            }),
            Ok(setup) => loaded.push(setup),
            Err(errors) => rejected.push(RejectedModule {
                name: name.clone(),
                errors,
            }),
        }
    }
    (loaded, rejected)
}

fn module_id(dir: &Path, position: usize) -> Result<ModuleId, String> {
    let id_path = dir.join("conf").join("id");
    let raw = match std::fs::read_to_string(&id_path) {
        Ok(text) => text
            .trim()
            .parse::<u16>()
            .map_err(|error| format!("{}: not a module id: {error}", id_path.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            u16::try_from(position + 1).map_err(|_| "too many modules".to_string())?
        }
        Err(error) => return Err(format!("{}: {error}", id_path.display())),
    };
    ModuleId::new(raw).ok_or_else(|| {
        format!(
            "{}: module id {raw} out of range 1..={}",
            id_path.display(),
            ModuleId::MAX
        )
    })
}

fn load_module(
    dir: &Path,
    name: &str,
    position: usize,
    cluster: &ClusterConfig,
    node: &str,
    peer: &str,
) -> Result<ModuleSetup, Vec<String>> {
    let conf = dir.join("conf").join("userconfig.xml");
    let text = std::fs::read_to_string(&conf)
        .map_err(|error| vec![format!("cannot read {}: {error}", conf.display())])?;
    let file_name = conf.display().to_string();
    let config = config::parse_userconfig(&file_name, &text).map_err(|errors| {
        errors
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    let bin: Vec<String> = std::fs::read_dir(dir.join("bin"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let context = ValidationContext {
        cluster: Some(cluster),
        module_bin: Some(&bin),
        platform: Some(Platform::Linux),
    };
    let diagnostics = config::validate(&config, &context);
    let errors: Vec<String> = diagnostics
        .iter()
        .filter(|diagnostic| diagnostic.is_error())
        .map(ToString::to_string)
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    let warnings = diagnostics
        .iter()
        .filter(|diagnostic| !diagnostic.is_error())
        .map(ToString::to_string)
        .collect();
    if config.service.mode != Mode::Mirror {
        return Err(vec![format!(
            "{file_name}: mode {:?} is not supported by this agent yet (mirror only)",
            config.service.mode
        )]);
    }
    let id = module_id(dir, position).map_err(|error| vec![error])?;
    let ports = config.ports(id);
    let heart = config.service.heart.clone().unwrap_or_default();
    // Without <heartbeat> entries every LAN of cluster.xml carries heartbeats.
    let lan_specs: Vec<Lan> = if heart.heartbeat.is_empty() {
        cluster
            .lans
            .lan
            .iter()
            .map(|lan| Lan {
                name: lan.name.clone(),
                flow: false,
            })
            .collect()
    } else {
        heart
            .heartbeat
            .iter()
            .map(|heartbeat| Lan {
                name: heartbeat.name.clone(),
                flow: heartbeat.ident.as_deref() == Some("flow"),
            })
            .collect()
    };
    let mut lans = Vec::new();
    let mut errors = Vec::new();
    for lan in &lan_specs {
        match lan_endpoints(cluster, &lan.name, node, peer, ports.heartbeat) {
            Ok(endpoints) => lans.push(endpoints),
            Err(error) => errors.push(format!("{file_name}: heartbeat LAN {}: {error}", lan.name)),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let defaultprim = match &config.service.defaultprim {
        config::DefaultPrim::Alone => DefaultPrim::Alone,
        config::DefaultPrim::Lastprim => DefaultPrim::LastPrim,
        config::DefaultPrim::Node(node) => DefaultPrim::Node(node.clone()),
    };
    let witness = config.service.check.as_ref().is_some_and(|check| {
        check
            .checkers
            .iter()
            .any(|checker| checker.kind == config::CheckerKind::Splitbrain)
    });
    let params = ModuleParams {
        module: name.to_string(),
        node: node.to_string(),
        peer: peer.to_string(),
        pulse: heart.pulse,
        timeout: heart.timeout,
        failover: config.service.failover,
        defaultprim,
        lans: lan_specs,
        witness,
    };
    Ok(ModuleSetup {
        name: name.to_string(),
        id,
        ports,
        config,
        dir: dir.to_path_buf(),
        params,
        lans,
        warnings,
    })
}

fn lan_endpoints(
    cluster: &ClusterConfig,
    lan_name: &str,
    node: &str,
    peer: &str,
    port: u16,
) -> Result<LanEndpoints, String> {
    let lan = cluster
        .lan(lan_name)
        .ok_or_else(|| "not a <lan> of cluster.xml".to_string())?;
    let address_of = |name: &str, local: bool| -> Result<IpAddr, String> {
        let entry = lan
            .node
            .iter()
            .find(|entry| entry.name == name)
            .ok_or_else(|| format!("node {name} has no address on it"))?;
        let text = if local {
            entry.laddr.as_deref().unwrap_or(&entry.addr)
        } else {
            &entry.addr
        };
        let text = text.trim_start_matches('[').trim_end_matches(']');
        text.parse::<IpAddr>()
            .map_err(|_| format!("address {text:?} of node {name} is not an IP address (host names are not resolved yet)"))
    };
    Ok(LanEndpoints {
        name: lan_name.to_string(),
        local: SocketAddr::new(address_of(node, true)?, port),
        peer: SocketAddr::new(address_of(peer, false)?, port),
    })
}

/// What the agent keeps to rebuild a stopped module's setup when an operator
/// applies a changed configuration (`safekit config -m M`, `safekit cluster config`).
pub struct ReloadContext {
    /// `SAFE` and `SAFEVAR`.
    pub paths: NodePaths,
    /// This node.
    pub node: String,
    /// Its peer.
    pub peer: String,
    /// The cluster secret (for a rebuilt data path).
    pub secret: std::sync::Arc<[u8]>,
    /// The cluster.xml in force.
    pub cluster: std::sync::Mutex<ClusterConfig>,
}

impl std::fmt::Debug for ReloadContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("ReloadContext")
            .field("paths", &self.paths)
            .field("node", &self.node)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Reads and validates one module again, as [`load_modules`] did at start
/// (same id rule: `conf/id`, else its position among the module folders).
///
/// # Errors
/// Every problem, one per entry.
pub fn reload_module(
    paths: &NodePaths,
    name: &str,
    cluster: &ClusterConfig,
    node: &str,
    peer: &str,
) -> Result<ModuleSetup, Vec<String>> {
    let position = module_position(paths, name).map_err(|error| vec![error])?;
    load_module(
        &paths.modules().join(name),
        name,
        position,
        cluster,
        node,
        peer,
    )
}

/// The modules installed on this node: folders of SAFE/modules holding a
/// `conf/userconfig.xml` (staging folders, named with a leading dot, skipped), sorted.
pub fn installed_modules(paths: &NodePaths) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(paths.modules())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.path().join("conf").join("userconfig.xml").is_file())
                .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The module's position among the module folders (what its id is without `conf/id`).
fn module_position(paths: &NodePaths, name: &str) -> Result<usize, String> {
    installed_modules(paths)
        .iter()
        .position(|candidate| candidate == name)
        .ok_or_else(|| {
            format!(
                "{}: no conf/userconfig.xml",
                paths.modules().join(name).display()
            )
        })
}

/// The id the agent gives module `name` (`conf/id`, else its position).
///
/// # Errors
/// The module has no configuration, or its `conf/id` is invalid.
pub fn module_id_of(paths: &NodePaths, name: &str) -> Result<ModuleId, String> {
    let position = module_position(paths, name)?;
    module_id(&paths.modules().join(name), position)
}

/// The environment of a module's scripts (SafeKit's variables and the `<user><var>` entries).
pub fn script_env(paths: &NodePaths, setup: &ModuleSetup) -> crate::scripts::ScriptEnv {
    crate::scripts::ScriptEnv {
        safe: paths.safe.clone(),
        safebin: paths.safe.join("private").join("bin"),
        safevar: paths.var.clone(),
        module: setup.name.clone(),
        userbin: setup.dir.join("bin"),
        userconf: setup.dir.join("conf"),
        uservar: paths.module_var(&setup.name),
        user_vars: setup
            .config
            .service
            .user
            .iter()
            .flat_map(|user| user.var.iter())
            .map(|var| (var.name.clone(), var.value.clone()))
            .collect(),
    }
}

/// Why a new setup cannot replace a module's running one without restarting
/// the agent: what the heartbeat threads (bound at start) depend on changed.
pub fn needs_agent_restart(old: &ModuleSetup, new: &ModuleSetup) -> Option<String> {
    if old.id != new.id {
        return Some(format!(
            "the module id changed ({} -> {}), which moves its ports",
            old.id.get(),
            new.id.get()
        ));
    }
    if old.lans != new.lans {
        return Some("the heartbeat LANs or their addresses changed".into());
    }
    if old.params.pulse != new.params.pulse {
        return Some(format!(
            "the heartbeat pulse changed ({} ms -> {} ms)",
            old.params.pulse.as_millis(),
            new.params.pulse.as_millis()
        ));
    }
    if old.params.peer != new.params.peer {
        return Some(format!(
            "the peer changed ({} -> {})",
            old.params.peer, new.params.peer
        ));
    }
    None
}

/// The time after which a script that has not returned is killed, by hook.
#[derive(Debug, Clone, Copy)]
pub struct ScriptTimeouts {
    /// `start_prim` (SafeKit has no start timeout; a hung start keeps the module Transient this long).
    pub start: Duration,
    /// `nicestoptimeout`.
    pub nice_stop: Duration,
    /// `forcestoptimeout`.
    pub force_stop: Duration,
}

impl ModuleSetup {
    /// Script timeouts from `<user>` (defaults when absent).
    pub fn script_timeouts(&self) -> ScriptTimeouts {
        let user = self.config.service.user.clone().unwrap_or_default();
        ScriptTimeouts {
            start: Duration::from_secs(600),
            nice_stop: user.nicestoptimeout,
            force_stop: user.forcestoptimeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const CLUSTER: &str = r#"<cluster><lans>
<lan name="default"><node name="node1" addr="10.0.0.1"/><node name="node2" addr="10.0.0.2"/></lan>
<lan name="repli"><node name="node1" addr="10.0.1.1"/><node name="node2" addr="10.0.1.2"/></lan>
</lans></cluster>"#;

    const MODULE: &str = r#"<safe><service mode="mirror">
<heart pulse="200ms" timeout="1000ms"><heartbeat name="default"/><heartbeat name="repli"/></heart>
</service></safe>"#;

    fn node_dirs() -> (tempfile::TempDir, NodePaths) {
        let root = tempfile::tempdir().expect("temp dir");
        let paths = NodePaths {
            safe: root.path().join("safe"),
            var: root.path().join("var"),
        };
        std::fs::create_dir_all(paths.var.join("cluster")).expect("mkdir");
        std::fs::write(paths.cluster_xml(), CLUSTER).expect("write cluster.xml");
        (root, paths)
    }

    fn add_module(paths: &NodePaths, name: &str, userconfig: &str, id: Option<&str>) {
        let conf = paths.modules().join(name).join("conf");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(conf.join("userconfig.xml"), userconfig).expect("write userconfig.xml");
        if let Some(id) = id {
            std::fs::write(conf.join("id"), id).expect("write id");
        }
    }

    #[test]
    fn modules_get_ids_by_position_or_from_their_id_file_and_ports_from_ids() {
        let (_root, paths) = node_dirs();
        add_module(&paths, "alpha", MODULE, None);
        add_module(&paths, "beta", MODULE, Some("7\n"));
        let cluster = load_cluster(&paths).expect("valid cluster.xml");
        let (loaded, rejected) = load_modules(&paths, &cluster, "node1", "node2");
        assert!(rejected.is_empty(), "{rejected:?}");
        let ids: Vec<(String, u16, u16)> = loaded
            .iter()
            .map(|module| (module.name.clone(), module.id.get(), module.ports.heartbeat))
            .collect();
        assert_eq!(
            ids,
            [
                ("alpha".to_string(), 1, 8888),
                ("beta".to_string(), 7, 8894)
            ]
        );
        let alpha = &loaded[0];
        assert_eq!(alpha.params.peer, "node2");
        assert_eq!(alpha.params.timeout, Duration::from_millis(1000));
        let endpoints: Vec<String> = alpha
            .lans
            .iter()
            .map(|lan| format!("{} {} -> {}", lan.name, lan.local, lan.peer))
            .collect();
        assert_eq!(
            endpoints,
            [
                "default 10.0.0.1:8888 -> 10.0.0.2:8888",
                "repli 10.0.1.1:8888 -> 10.0.1.2:8888"
            ]
        );
    }

    #[test]
    fn an_invalid_module_or_a_duplicate_id_is_rejected_with_its_errors_and_the_rest_loads() {
        let (_root, paths) = node_dirs();
        add_module(&paths, "good", MODULE, None);
        add_module(
            &paths,
            "unknownlan",
            r#"<safe><service mode="mirror"><heart><heartbeat name="nosuchlan"/></heart></service></safe>"#,
            None,
        );
        add_module(&paths, "zduplicate", MODULE, Some("1"));
        let cluster = load_cluster(&paths).expect("valid cluster.xml");
        let (loaded, rejected) = load_modules(&paths, &cluster, "node1", "node2");
        assert_eq!(
            loaded
                .iter()
                .map(|module| module.name.as_str())
                .collect::<Vec<_>>(),
            ["good"]
        );
        let reasons: Vec<(String, String)> = rejected
            .iter()
            .map(|module| (module.name.clone(), module.errors.join("; ")))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert_eq!(reasons[0].0, "unknownlan");
        assert!(reasons[0].1.contains("nosuchlan"), "{reasons:?}");
        assert_eq!(reasons[1].0, "zduplicate");
        assert!(reasons[1].1.contains("already used"), "{reasons:?}");
    }

    #[test]
    fn this_node_must_be_in_cluster_xml() {
        let (_root, paths) = node_dirs();
        let cluster = load_cluster(&paths).expect("valid cluster.xml");
        assert_eq!(peer_of(&cluster, "node2").expect("member"), "node1");
        let error = peer_of(&cluster, "node3").expect_err("not a member");
        assert!(error.to_string().contains("not in cluster.xml"), "{error}");
    }

    #[test]
    fn the_secret_must_exist_be_long_enough_and_be_private() {
        let (_root, paths) = node_dirs();
        let missing = load_secret(&paths).expect_err("no secret yet");
        assert!(
            missing.to_string().contains("safekit cluster genkey"),
            "{missing}"
        );
        std::fs::write(paths.secret(), "0123456789abcdef0123456789abcdef\n").expect("write secret");
        std::fs::set_permissions(paths.secret(), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let readable = load_secret(&paths).expect_err("readable by others");
        assert!(readable.to_string().contains("0600"), "{readable}");
        std::fs::set_permissions(paths.secret(), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        assert_eq!(
            load_secret(&paths).expect("valid secret"),
            b"0123456789abcdef0123456789abcdef"
        );
        std::fs::write(paths.secret(), "short\n").expect("write secret");
        assert!(load_secret(&paths).is_err(), "a short secret is refused");
    }
}
