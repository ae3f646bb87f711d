//! `safekit config -m M`, `safekit confcheck -m M`, `safekit cluster config [FILE]`:
//! validate an edited configuration completely, then have the agent apply it.
//!
//! A configuration is checked whole before anything is applied (DESIGN.md
//! section 6): every error is printed, the command exits 1, and the running
//! module (or the installed cluster.xml) is left untouched. The agent applies
//! a module's configuration only while the module is STOP (it rebuilds the
//! module's setup, so that the next `start` uses it) and says which state
//! it is in otherwise; `cluster config` is refused while any module runs.
//!
//! Exit status: 0 valid (and applied, or the agent is not running and will
//! read it at its next start); 1 invalid or refused, with every error or the
//! reason; `config check` keeps its own (0, 1, 2 when a file cannot be read).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use safekit_core::config::{ModuleId, parse_cluster, root_element_name, validate_cluster};
use safekit_protocol::admin::{AdminRequest, AdminResponse, Caller};

use super::config_check::{self, ConfigCheckArgs, PlatformArg};
use crate::daemon::load::{self, NodePaths};

/// `safekit config`: apply a module's edited configuration, or check files offline.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: Option<ConfigCommand>,
    /// Validate and apply SAFE/modules/M/conf/userconfig.xml (the module must be STOP).
    #[arg(short = 'm', long = "module", required = true)]
    pub module: Option<String>,
}

/// `safekit config check`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a userconfig.xml, a cluster.xml or a module folder offline; print every problem.
    Check(ConfigCheckArgs),
}

/// `safekit confcheck`.
#[derive(Debug, Clone, Args)]
pub struct ConfcheckArgs {
    /// The module whose SAFE/modules/M/conf/userconfig.xml is validated (nothing is applied).
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("safekit: {message}");
    ExitCode::FAILURE
}

fn caller() -> Caller {
    Caller::Local {
        uid: nix::unistd::getuid().as_raw(),
        name: String::new(),
    }
}

/// Runs `safekit config ...`.
///
/// # Errors
/// `config check` when a file cannot be read (exit 2 in `main`).
pub fn run_config(args: &ConfigArgs) -> anyhow::Result<ExitCode> {
    if let Some(ConfigCommand::Check(check)) = &args.command {
        let report = config_check::run(check)?;
        print!("{}", report.output);
        return Ok(if report.has_errors {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let Some(module) = &args.module else {
        return Ok(fail("config: give -m MODULE, or `config check PATH`"));
    };
    Ok(apply_module(&super::module::node_paths(), module))
}

/// Validates SAFE/modules/M as the agent will (module folder, bin/, the
/// installed cluster.xml); returns the report text and whether it has errors.
///
/// # Errors
/// A one-line reason when the module does not exist or a file cannot be read.
pub fn check_module(paths: &NodePaths, module: &str) -> Result<(String, bool), String> {
    let cluster_xml = paths.var.join("cluster").join("cluster.xml");
    check_module_with(paths, module, cluster_xml.is_file().then_some(cluster_xml))
}

/// [`check_module`] against the cluster.xml `cluster` (none: no cluster check).
fn check_module_with(
    paths: &NodePaths,
    module: &str,
    cluster: Option<PathBuf>,
) -> Result<(String, bool), String> {
    let dir = paths.modules().join(module);
    if !dir.join("conf").join("userconfig.xml").is_file() {
        return Err(format!(
            "unknown module {module}: no {}",
            dir.join("conf").join("userconfig.xml").display()
        ));
    }
    let id = load::module_id_of(paths, module).map_or(1, ModuleId::get);
    let report = config_check::run(&ConfigCheckArgs {
        path: dir,
        cluster,
        id,
        platform: Some(PlatformArg::Linux),
    })
    .map_err(|error| format!("{error:#}"))?;
    Ok((report.output, report.has_errors))
}

fn apply_module(paths: &NodePaths, module: &str) -> ExitCode {
    let (report, has_errors) = match check_module(paths, module) {
        Ok(checked) => checked,
        Err(error) => return fail(format_args!("config: {error}")),
    };
    if has_errors {
        eprint!("{report}");
        return fail(format_args!(
            "config: configuration of {module} refused; nothing applied, the running module is unchanged"
        ));
    }
    match super::control::request(&AdminRequest::ApplyConfig {
        module: module.to_string(),
        caller: caller(),
    }) {
        Ok(AdminResponse::Ok { message }) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Ok(AdminResponse::Refused { reason }) => fail(format_args!("config: {reason}")),
        Ok(other) => fail(format_args!("unexpected answer from the agent: {other:?}")),
        Err(error) => {
            println!(
                "configuration of {module} is valid; the agent is not running ({error}): it reads it when it starts"
            );
            ExitCode::SUCCESS
        }
    }
}

/// Runs `safekit confcheck -m M`: validation only.
pub fn confcheck(args: &ConfcheckArgs) -> ExitCode {
    match check_module(&super::module::node_paths(), &args.module) {
        Ok((report, false)) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Ok((report, true)) => {
            print!("{report}");
            ExitCode::FAILURE
        }
        Err(error) => fail(format_args!("confcheck: {error}")),
    }
}

/// Every error of a cluster.xml's text, one per entry (empty: valid).
pub fn cluster_errors(file_name: &str, text: &str) -> Vec<String> {
    match root_element_name(text).as_deref() {
        Some("cluster") | None => {}
        Some(other) => {
            return vec![format!(
                "{file_name}: not a cluster.xml (root element <{other}>, expected <cluster>)"
            )];
        }
    }
    match parse_cluster(file_name, text) {
        Ok(cluster) => validate_cluster(&cluster)
            .into_iter()
            .filter(|diagnostic| diagnostic.is_error())
            .map(|diagnostic| diagnostic.to_string())
            .collect(),
        Err(errors) => errors.diagnostics.iter().map(ToString::to_string).collect(),
    }
}

/// Writes `bytes` to `target` atomically: a temporary file beside it, fsync,
/// rename over `target`, fsync of the directory.
///
/// # Errors
/// The failed step and path; `target` is then unchanged.
pub fn install_atomically(target: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = target
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", target.display()))?;
    std::fs::create_dir_all(dir).map_err(|error| format!("create {}: {error}", dir.display()))?;
    let temporary = dir.join(format!(
        ".{}.new.{}",
        target
            .file_name()
            .map_or("file".into(), |name| name.to_string_lossy()),
        std::process::id()
    ));
    let written = std::fs::File::create(&temporary).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(format!("write {}: {error}", temporary.display()));
    }
    if let Err(error) = std::fs::rename(&temporary, target) {
        let _ = std::fs::remove_file(&temporary);
        return Err(format!("install {}: {error}", target.display()));
    }
    std::fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| format!("sync {}: {error}", dir.display()))
}

/// Every installed module's errors with the candidate cluster.xml `candidate` (empty: all valid).
fn module_errors_with(paths: &NodePaths, candidate: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    for module in load::installed_modules(paths) {
        match check_module_with(paths, &module, Some(candidate.to_path_buf())) {
            Ok((_, false)) => {}
            Ok((report, true)) => errors.push(format!(
                "module {module} is not valid with {}:\n{}",
                candidate.display(),
                report.trim_end()
            )),
            Err(error) => errors.push(format!("module {module}: {error}")),
        }
    }
    errors
}

/// Puts `previous` back as `installed` (none: there was no file, it is removed).
fn restore(installed: &Path, previous: Option<&[u8]>) -> Result<(), String> {
    match previous {
        Some(bytes) => install_atomically(installed, bytes),
        None => std::fs::remove_file(installed)
            .map_err(|error| format!("remove {}: {error}", installed.display())),
    }
}

/// Runs `safekit cluster config [FILE]`.
pub fn cluster_config(file: Option<&Path>) -> ExitCode {
    let paths = super::module::node_paths();
    cluster_config_at(&paths, file)
}

fn cluster_config_at(paths: &NodePaths, file: Option<&Path>) -> ExitCode {
    let installed = paths.var.join("cluster").join("cluster.xml");
    let source: PathBuf = file.map_or_else(|| installed.clone(), Path::to_path_buf);
    let text = match std::fs::read_to_string(&source) {
        Ok(text) => text,
        Err(error) => {
            return fail(format_args!(
                "cluster config: cannot read {}: {error}",
                source.display()
            ));
        }
    };
    let errors = cluster_errors(&source.display().to_string(), &text);
    if !errors.is_empty() {
        for error in &errors {
            eprintln!("{error}");
        }
        return fail(format_args!(
            "cluster config: {} refused ({} error(s)); {} is unchanged",
            source.display(),
            errors.len(),
            installed.display()
        ));
    }
    // Every module must accept the candidate (as the agent will check): nothing is installed otherwise.
    let errors = module_errors_with(paths, &source);
    if !errors.is_empty() {
        for error in &errors {
            eprintln!("{error}");
        }
        return fail(format_args!(
            "cluster config: {} refused: {} module(s) not valid with it; {} is unchanged",
            source.display(),
            errors.len(),
            installed.display()
        ));
    }
    // Nothing is installed while a module runs: the file on disk stays the one in force.
    let agent_up = match super::control::request(&AdminRequest::State {
        module: None,
        verbose: false,
    }) {
        Ok(AdminResponse::States(states)) => {
            let running: Vec<String> = states
                .iter()
                .filter(|status| status.state != "STOP" || status.readiness == "Transient")
                .map(|status| format!("{} ({})", status.module, status.state))
                .collect();
            if !running.is_empty() {
                return fail(format_args!(
                    "cluster config: modules still running: {}; stop them first (safekit stop -m M); {} is unchanged",
                    running.join(", "),
                    installed.display()
                ));
            }
            true
        }
        Ok(AdminResponse::Refused { reason }) => {
            return fail(format_args!("cluster config: {reason}"));
        }
        Ok(other) => return fail(format_args!("unexpected answer from the agent: {other:?}")),
        Err(_) => false,
    };
    let same_file = std::fs::canonicalize(&source).ok() == std::fs::canonicalize(&installed).ok();
    // A copy of the file in force, put back if the agent refuses the new one.
    let previous = match std::fs::read(&installed) {
        Ok(bytes) => Some(bytes),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            return fail(format_args!(
                "cluster config: cannot read {}: {error}",
                installed.display()
            ));
        }
    };
    if !same_file {
        if let Err(error) = install_atomically(&installed, text.as_bytes()) {
            return fail(format_args!("cluster config: {error}"));
        }
        println!("{} installed as {}", source.display(), installed.display());
    }
    if !agent_up {
        println!(
            "the agent is not running: it reads {} when it starts",
            installed.display()
        );
        return ExitCode::SUCCESS;
    }
    match super::control::request(&AdminRequest::ApplyClusterConfig { caller: caller() }) {
        Ok(AdminResponse::Ok { message }) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Ok(AdminResponse::Refused { reason }) => {
            refused_by_agent(&installed, same_file, previous.as_deref(), &reason)
        }
        Ok(other) => refused_by_agent(
            &installed,
            same_file,
            previous.as_deref(),
            &format!("unexpected answer from the agent: {other:?}"),
        ),
        Err(error) => refused_by_agent(
            &installed,
            same_file,
            previous.as_deref(),
            &error.to_string(),
        ),
    }
}

/// The agent did not apply the new file: the previous one is put back, so
/// that the installed file is the one the agent runs with.
fn refused_by_agent(
    installed: &Path,
    same_file: bool,
    previous: Option<&[u8]>,
    reason: &str,
) -> ExitCode {
    if same_file {
        // The operator edited the installed file in place: there is no other copy to put back.
        return fail(format_args!(
            "cluster config: {reason} (the agent still runs with its previous cluster configuration; {} is read at its next start)",
            installed.display()
        ));
    }
    match restore(installed, previous) {
        Ok(()) => fail(format_args!(
            "cluster config: {reason}; the previous {} is back in place",
            installed.display()
        )),
        Err(error) => fail(format_args!(
            "cluster config: {reason}; and the previous file could not be put back ({error}): {} is the new file, read at the next agent start",
            installed.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_of_a_cluster_xml_is_reported() {
        let valid = r#"<cluster><lans><lan name="default"><node name="node1" addr="10.0.0.1"/><node name="node2" addr="10.0.0.2"/></lan></lans></cluster>"#;
        assert!(cluster_errors("cluster.xml", valid).is_empty());
        let wrong_root = cluster_errors("userconfig.xml", "<safe><service/></safe>");
        assert_eq!(wrong_root.len(), 1, "{wrong_root:?}");
        assert!(
            wrong_root[0].contains("not a cluster.xml"),
            "{wrong_root:?}"
        );
        let two_problems = r#"<cluster><lans><lan name="default" bogus="1"><node name="node1" addr="10.0.0.1" color="red"/></lan></lans></cluster>"#;
        let errors = cluster_errors("cluster.xml", two_problems);
        assert!(errors.len() >= 2, "{errors:?}");
        assert!(
            errors.iter().all(|error| error.starts_with("cluster.xml:")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_cluster_xml_dropping_a_lan_a_module_uses_is_refused_and_nothing_is_installed() {
        let root = tempfile::tempdir().expect("temp dir");
        let paths = NodePaths {
            safe: root.path().join("safe"),
            var: root.path().join("var"),
        };
        let in_force = r#"<cluster><lans>
<lan name="default"><node name="node1" addr="10.0.0.1"/><node name="node2" addr="10.0.0.2"/></lan>
<lan name="repli"><node name="node1" addr="10.0.1.1"/><node name="node2" addr="10.0.1.2"/></lan>
</lans></cluster>"#;
        let installed = paths.var.join("cluster").join("cluster.xml");
        install_atomically(&installed, in_force.as_bytes()).expect("install cluster.xml");
        let conf = paths.modules().join("mirror").join("conf");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(
            conf.join("userconfig.xml"),
            r#"<safe><service mode="mirror"><heart><heartbeat name="default"/><heartbeat name="repli"/></heart></service></safe>"#,
        )
        .expect("userconfig.xml");
        assert!(
            module_errors_with(&paths, &installed).is_empty(),
            "the module is valid with the file in force"
        );
        // The candidate is a valid cluster.xml by itself, but drops the LAN `repli` the module uses.
        let candidate = root.path().join("new-cluster.xml");
        std::fs::write(
            &candidate,
            r#"<cluster><lans><lan name="default"><node name="node1" addr="10.0.0.1"/><node name="node2" addr="10.0.0.2"/></lan></lans></cluster>"#,
        )
        .expect("candidate");
        assert!(
            cluster_errors(
                "new-cluster.xml",
                &std::fs::read_to_string(&candidate).expect("read")
            )
            .is_empty()
        );
        let errors = module_errors_with(&paths, &candidate);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("module mirror"), "{errors:?}");
        assert!(errors[0].contains("repli"), "{errors:?}");
        // The command refuses before asking the agent anything, and leaves the file in force.
        assert_eq!(
            cluster_config_at(&paths, Some(&candidate)),
            ExitCode::FAILURE
        );
        assert_eq!(std::fs::read_to_string(&installed).expect("read"), in_force);
    }

    #[test]
    fn restoring_puts_the_previous_file_back_or_removes_a_new_one() {
        let root = tempfile::tempdir().expect("temp dir");
        let target = root.path().join("cluster").join("cluster.xml");
        install_atomically(&target, b"new").expect("install");
        restore(&target, Some(b"old")).expect("restore");
        assert_eq!(std::fs::read(&target).expect("read"), b"old");
        restore(&target, None).expect("remove");
        assert!(!target.exists());
    }

    #[test]
    fn an_atomic_install_replaces_the_file_and_leaves_no_temporary() {
        let root = tempfile::tempdir().expect("temp dir");
        let target = root.path().join("cluster").join("cluster.xml");
        install_atomically(&target, b"one").expect("first install");
        install_atomically(&target, b"two").expect("second install");
        assert_eq!(std::fs::read(&target).expect("read"), b"two");
        let entries: Vec<String> = std::fs::read_dir(target.parent().expect("parent"))
            .expect("list")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, ["cluster.xml"]);
    }
}
