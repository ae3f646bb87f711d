//! `safekit module install|uninstall|list`: installing `.safe` module packages into `SAFE/modules`.
//!
//! A `.safe` package is a zip of a module folder: `conf/userconfig.xml`
//! (required), other `conf/` files, `bin/*` with their Unix modes. It is
//! built by `cargo xtask package`.
//!
//! `install -m NAME FILE` checks every entry (no `..`, no absolute path, no
//! symlink, only files and folders), extracts into a staging folder beside
//! the module (`SAFE/modules/.NAME.new.PID`), validates the configuration
//! with `safekit_core::config` (the package's userconfig.xml, against
//! `SAFEVAR/cluster/cluster.xml` when it exists), then puts it in place with
//! one atomic exchange (`renameat2(RENAME_EXCHANGE)`); the previous module
//! is removed only after that. A refused package leaves the installed module
//! untouched. An installed module's `conf/id` is kept when the package has
//! none, so reinstalling does not move the module's ports.
//!
//! `uninstall -m NAME` is refused while the agent reports the module in a
//! state other than STOP; with the agent down it proceeds. `list` asks the
//! agent and, when the agent is not running, lists `SAFE/modules` instead.
//!
//! `SAFE` comes from the environment (default `/opt/safekit`), like
//! `safekitd`; `SAFEVAR` as for every other verb.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use safekit_protocol::admin::{AdminRequest, AdminResponse};

use super::config_check::{self, ConfigCheckArgs};
use super::control::{ModuleCommand, request};
use crate::daemon::load::NodePaths;

/// The file every package must hold.
pub const USERCONFIG: &str = "conf/userconfig.xml";

/// `safekit module install`.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// The name the module gets (its folder `SAFE/modules/NAME`).
    #[arg(short = 'm', long = "module")]
    pub module: String,
    /// The `.safe` package (built by `cargo xtask package`).
    pub package: PathBuf,
}

/// `safekit module uninstall`.
#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// The module to remove from `SAFE/modules`.
    #[arg(short = 'm', long = "module")]
    pub module: String,
}

/// `SAFE` and `SAFEVAR` from the environment (defaults `/opt/safekit`, `/var/safekit`).
pub fn node_paths() -> NodePaths {
    let env = |name: &str, default: &str| {
        std::env::var_os(name).map_or_else(|| PathBuf::from(default), PathBuf::from)
    };
    NodePaths {
        safe: env("SAFE", "/opt/safekit"),
        var: env("SAFEVAR", "/var/safekit"),
    }
}

/// Runs one `safekit module` verb and returns the exit status (0 done, 1 refused or failed).
pub fn run(command: ModuleCommand) -> ExitCode {
    let paths = node_paths();
    let result = match command {
        ModuleCommand::List => list(&paths).map(|names| {
            for name in names {
                println!("{name}");
            }
        }),
        ModuleCommand::Install(args) => install(&paths, &args.module, &args.package).map(|dir| {
            println!("module {} installed in {}", args.module, dir.display());
        }),
        ModuleCommand::Uninstall(args) => uninstall(&paths, &args.module).map(|()| {
            println!("module {} uninstalled", args.module);
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("safekit: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the agent is listening on its admin socket.
fn agent_running(paths: &NodePaths) -> bool {
    std::os::unix::net::UnixStream::connect(paths.admin_socket()).is_ok()
}

/// The modules: the agent's list, or the folders of `SAFE/modules` when the agent is down.
///
/// # Errors
/// A one-line reason.
pub fn list(paths: &NodePaths) -> Result<Vec<String>, String> {
    if agent_running(paths) {
        return match request(&AdminRequest::ModuleList) {
            Ok(AdminResponse::Modules(names)) => Ok(names),
            Ok(AdminResponse::Refused { reason }) => Err(reason),
            Ok(other) => Err(format!("unexpected answer from the agent: {other:?}")),
            Err(error) => Err(error),
        };
    }
    eprintln!(
        "safekit: agent not running; modules installed in {}:",
        paths.modules().display()
    );
    installed(paths)
}

/// The module folders of `SAFE/modules` (those holding `conf/userconfig.xml`), sorted.
///
/// # Errors
/// When `SAFE/modules` exists but cannot be read.
pub fn installed(paths: &NodePaths) -> Result<Vec<String>, String> {
    let dir = paths.modules();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(format!("cannot list {}: {error}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join(USERCONFIG).is_file())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// A module name is one path component of letters, digits, `_` and `-`.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid module name `{name}`: use letters, digits, `_` and `-` (at most 64)"
        ))
    }
}

/// One entry of a package, checked.
enum Entry {
    Dir(PathBuf),
    File {
        index: usize,
        path: PathBuf,
        mode: u32,
    },
}

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// Lists and checks the package's entries without writing anything.
fn check_entries<R: Read + io::Seek>(
    archive: &mut zip::ZipArchive<R>,
) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for index in 0..archive.len() {
        let file = archive
            .by_index(index)
            .map_err(|error| format!("broken package: entry {index}: {error}"))?;
        let name = file
            .name()
            .map_err(|error| format!("broken package: entry {index}: {error}"))?
            .into_owned();
        let relative = Path::new(&name);
        let escapes = name.starts_with('/')
            || name.starts_with('\\')
            || name.contains('\\')
            || relative
                .components()
                .any(|component| !matches!(component, Component::Normal(_) | Component::CurDir));
        if escapes || file.enclosed_name().is_none() {
            return Err(format!(
                "refused package: entry `{name}` is absolute or leaves the module folder"
            ));
        }
        let mode = file.unix_mode();
        if file.is_symlink() {
            return Err(format!(
                "refused package: entry `{name}` is a symbolic link"
            ));
        }
        let kind = mode.map(|mode| mode & S_IFMT).filter(|kind| *kind != 0);
        let path: PathBuf = relative
            .components()
            .filter(|component| matches!(component, Component::Normal(_)))
            .collect();
        if path.as_os_str().is_empty() {
            continue;
        }
        if file.is_dir() {
            if kind.is_some_and(|kind| kind != S_IFDIR) {
                return Err(format!("refused package: entry `{name}` is not a folder"));
            }
            entries.push(Entry::Dir(path));
        } else {
            if kind.is_some_and(|kind| kind != S_IFREG) {
                return Err(format!(
                    "refused package: entry `{name}` is not a regular file"
                ));
            }
            // No set-id bits from a package.
            let mode = mode.map_or(0o644, |mode| mode & 0o777);
            entries.push(Entry::File { index, path, mode });
        }
    }
    if !entries
        .iter()
        .any(|entry| matches!(entry, Entry::File { path, .. } if path == Path::new(USERCONFIG)))
    {
        return Err(format!("refused package: it has no {USERCONFIG}"));
    }
    Ok(entries)
}

fn extract<R: Read + io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    entries: &[Entry],
    into: &Path,
) -> Result<(), String> {
    for entry in entries {
        match entry {
            Entry::Dir(path) => {
                let dir = into.join(path);
                fs::create_dir_all(&dir)
                    .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
            }
            Entry::File { index, path, mode } => {
                let target = into.join(path);
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)
                        .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
                }
                let mut source = archive
                    .by_index(*index)
                    .map_err(|error| format!("broken package: entry {index}: {error}"))?;
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(*mode)
                    .open(&target)
                    .map_err(|error| {
                        format!(
                            "cannot write {} (duplicate entry?): {error}",
                            target.display()
                        )
                    })?;
                io::copy(&mut source, &mut out).map_err(|error| {
                    format!("broken package: cannot extract {}: {error}", path.display())
                })?;
                // The umask may have cleared bits the package sets.
                out.set_permissions(fs::Permissions::from_mode(*mode))
                    .and_then(|()| out.sync_all())
                    .map_err(|error| format!("cannot write {}: {error}", target.display()))?;
            }
        }
    }
    Ok(())
}

/// Validates the extracted module with `safekit_core::config` (via `config check`).
fn validate(paths: &NodePaths, staged: &Path) -> Result<(), String> {
    let cluster = paths.cluster_xml();
    let report = config_check::run(&ConfigCheckArgs {
        path: staged.to_path_buf(),
        cluster: cluster.is_file().then_some(cluster),
        id: 1,
        platform: None,
    })
    .map_err(|error| format!("refused package: {error:#}"))?;
    if !report.has_errors {
        return Ok(());
    }
    let staged_prefix = format!("{}/", staged.display());
    let first = report
        .output
        .lines()
        .find(|line| line.contains("error"))
        .unwrap_or("invalid configuration")
        .replace(&staged_prefix, "");
    Err(format!("refused package: invalid configuration: {first}"))
}

/// Removes a folder on drop unless disarmed (the staging folder on every failure path).
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Installs `package` as `SAFE/modules/NAME`; returns the module folder.
///
/// # Errors
/// A one-line reason; the installed module, if any, is then unchanged.
pub fn install(paths: &NodePaths, name: &str, package: &Path) -> Result<PathBuf, String> {
    check_name(name)?;
    let file = fs::File::open(package)
        .map_err(|error| format!("cannot read {}: {error}", package.display()))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(|error| {
        format!(
            "refused package: {} is not a zip file: {error}",
            package.display()
        )
    })?;
    let entries = check_entries(&mut archive)?;

    let modules = paths.modules();
    fs::create_dir_all(&modules)
        .map_err(|error| format!("cannot create {}: {error}", modules.display()))?;
    let target = modules.join(name);
    let staged = modules.join(format!(".{name}.new.{}", std::process::id()));
    if staged.exists() {
        fs::remove_dir_all(&staged)
            .map_err(|error| format!("cannot remove {}: {error}", staged.display()))?;
    }
    fs::create_dir(&staged)
        .map_err(|error| format!("cannot create {}: {error}", staged.display()))?;
    let mut cleanup = Cleanup(Some(staged.clone()));
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))
        .map_err(|error| format!("cannot write {}: {error}", staged.display()))?;
    extract(&mut archive, &entries, &staged)?;
    validate(paths, &staged)?;

    // Keep the module id (hence its ports) of the installed module.
    let old_id = target.join("conf").join("id");
    let new_id = staged.join("conf").join("id");
    if old_id.is_file() && !new_id.exists() {
        fs::copy(&old_id, &new_id)
            .map_err(|error| format!("cannot keep {}: {error}", old_id.display()))?;
    }

    if target.exists() {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staged,
            rustix::fs::CWD,
            &target,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .map_err(|error| format!("cannot replace {}: {error}", target.display()))?;
        // `staged` now holds the previous module; the cleanup removes it.
    } else {
        fs::rename(&staged, &target)
            .map_err(|error| format!("cannot install {}: {error}", target.display()))?;
        cleanup.0 = None;
    }
    drop(cleanup);
    Ok(target)
}

/// Removes `SAFE/modules/NAME`, unless the agent reports the module running.
///
/// # Errors
/// A one-line reason (not installed, running, I/O).
pub fn uninstall(paths: &NodePaths, name: &str) -> Result<(), String> {
    check_name(name)?;
    let target = paths.modules().join(name);
    if !target.is_dir() {
        return Err(format!(
            "module {name} is not installed ({} not found)",
            target.display()
        ));
    }
    if agent_running(paths) {
        match request(&AdminRequest::State {
            module: Some(name.to_string()),
            verbose: false,
        }) {
            Ok(AdminResponse::States(states)) => {
                if let Some(status) = states.iter().find(|status| status.state != "STOP") {
                    return Err(format!(
                        "module {name} is {}: stop it first (safekit stop -m {name})",
                        status.state
                    ));
                }
            }
            // The agent does not run this module (not loaded, or rejected).
            Ok(AdminResponse::Refused { .. }) => {}
            Ok(other) => return Err(format!("unexpected answer from the agent: {other:?}")),
            Err(error) => return Err(format!("cannot ask the agent whether {name} runs: {error}")),
        }
    }
    let doomed = paths
        .modules()
        .join(format!(".{name}.old.{}", std::process::id()));
    fs::rename(&target, &doomed)
        .map_err(|error| format!("cannot remove {}: {error}", target.display()))?;
    fs::remove_dir_all(&doomed)
        .map_err(|error| format!("cannot remove {}: {error}", doomed.display()))
}
