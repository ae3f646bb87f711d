//! `safekit config check PATH`: validates a module's configuration offline.
//!
//! PATH is a `userconfig.xml`, a `cluster.xml`, or a module folder
//! (`conf/userconfig.xml`, `bin/`). Reading files is done here; parsing and
//! validation are `safekit_core::config`'s. Every problem is printed, one per
//! line (`file:line:col: element <x> attribute <y>: message`); without errors
//! a short summary of the module follows.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use safekit_core::config::{
    CheckerKind, ClusterConfig, ConfigErrors, Diagnostic, Mode, ModuleId, ModulePorts, Platform,
    UserConfig, ValidationContext, format_duration, parse_cluster, parse_userconfig,
    root_element_name, validate, validate_cluster,
};

/// Arguments of `safekit config check`.
#[derive(Debug, Args)]
pub struct ConfigCheckArgs {
    /// A userconfig.xml, a cluster.xml, or a module folder holding conf/userconfig.xml.
    pub path: PathBuf,
    /// The cluster.xml to check the module against [default: conf/cluster.xml of a module folder, or cluster.xml beside the file].
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// The module id, for the ports shown in the summary.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(ModuleId::MAX)))]
    pub id: u16,
    /// Also reject paths of the other platform (default: accept both /path and c:\path).
    #[arg(long, value_enum)]
    pub platform: Option<PlatformArg>,
}

/// `--platform` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PlatformArg {
    Linux,
    Windows,
}

/// What `config check` found: the text to print and whether there was an error.
#[derive(Debug)]
pub struct CheckReport {
    pub output: String,
    pub has_errors: bool,
}

/// Runs the check.
///
/// # Errors
/// When a file cannot be read; problems in the files are in the report.
pub fn run(args: &ConfigCheckArgs) -> Result<CheckReport> {
    let mut diagnostics: Vec<Diagnostic> = Vec::new();
    let (userconfig_path, cluster_path, bin_dir) = if args.path.is_dir() {
        let conf = args.path.join("conf");
        let cluster = args.cluster.clone().or_else(|| {
            [conf.join("cluster.xml"), args.path.join("cluster.xml")]
                .into_iter()
                .find(|candidate| candidate.is_file())
        });
        (
            Some(conf.join("userconfig.xml")),
            cluster,
            Some(args.path.join("bin")),
        )
    } else {
        let text = read(&args.path)?;
        if root_element_name(&text).as_deref() == Some("cluster") {
            (None, Some(args.path.clone()), None)
        } else {
            let beside = args
                .path
                .parent()
                .map(|dir| dir.join("cluster.xml"))
                .filter(|candidate| candidate.is_file() && *candidate != args.path);
            (
                Some(args.path.clone()),
                args.cluster.clone().or(beside),
                None,
            )
        }
    };

    let cluster = match &cluster_path {
        Some(path) => {
            let text = read(path)?;
            keep(
                parse_cluster(&path.display().to_string(), &text),
                &mut diagnostics,
            )
        }
        None => None,
    };
    let Some(userconfig_path) = userconfig_path else {
        // A cluster.xml on its own.
        if let Some(cluster) = &cluster {
            diagnostics.extend(validate_cluster(cluster));
        }
        return Ok(report(diagnostics, |output| {
            if let Some(cluster) = &cluster {
                summarize_cluster(cluster, output);
            }
        }));
    };
    let text = read(&userconfig_path)?;
    let config = keep(
        parse_userconfig(&userconfig_path.display().to_string(), &text),
        &mut diagnostics,
    );
    let bin_files = match &bin_dir {
        Some(dir) => Some(list_files(dir)?),
        None => None,
    };
    if let Some(config) = &config {
        let context = ValidationContext {
            cluster: cluster.as_ref(),
            module_bin: bin_files.as_deref(),
            platform: args.platform.map(|platform| match platform {
                PlatformArg::Linux => Platform::Linux,
                PlatformArg::Windows => Platform::Windows,
            }),
        };
        diagnostics.extend(validate(config, &context));
        if let Some(bin_dir) = &bin_dir {
            diagnostics.extend(custom_programs_not_executable(config, bin_dir));
        }
    } else if let Some(cluster) = &cluster {
        diagnostics.extend(validate_cluster(cluster));
    }
    let id = ModuleId::new(args.id).context("module id out of range")?;
    Ok(report(diagnostics, |output| {
        if let Some(config) = &config {
            summarize_module(
                config,
                cluster.as_ref(),
                cluster_path.as_deref(),
                id,
                output,
            );
        }
    }))
}

/// Custom checker programs that exist in `bin/` but cannot be run (no execute
/// permission, or not a file); a missing one is reported by the validator.
fn custom_programs_not_executable(config: &UserConfig, bin_dir: &Path) -> Vec<Diagnostic> {
    use std::os::unix::fs::PermissionsExt as _;
    let checkers = config
        .service
        .check
        .iter()
        .flat_map(|check| check.checkers.iter())
        .filter(|checker| checker.kind == CheckerKind::Custom);
    let mut diagnostics = Vec::new();
    for checker in checkers {
        let Some(exec) = checker.exec.as_deref() else {
            continue;
        };
        let path = crate::checkers::custom::program_path(bin_dir, exec);
        let Ok(metadata) = fs::metadata(&path) else {
            // Absent: the validator's "not in the module's bin/ folder" (or an absolute path of another host).
            continue;
        };
        let problem = if !metadata.is_file() {
            Some("is not a file")
        } else if metadata.permissions().mode() & 0o111 == 0 {
            Some("is not executable (chmod +x)")
        } else {
            None
        };
        if let Some(problem) = problem {
            diagnostics.push(checker.origin.attribute_error(
                "exec",
                format!(
                    "custom checker {}: {} {problem}: the checker's program could not run",
                    checker.resource_ident(),
                    path.display()
                ),
            ));
        }
    }
    diagnostics
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn list_files(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn keep<T>(parsed: Result<T, ConfigErrors>, diagnostics: &mut Vec<Diagnostic>) -> Option<T> {
    match parsed {
        Ok(value) => Some(value),
        Err(errors) => {
            diagnostics.extend(errors.diagnostics);
            None
        }
    }
}

fn report(diagnostics: Vec<Diagnostic>, summarize: impl FnOnce(&mut String)) -> CheckReport {
    let mut output = String::new();
    for diagnostic in &diagnostics {
        let _ = writeln!(output, "{diagnostic}");
    }
    let n_errors = diagnostics
        .iter()
        .filter(|diagnostic| diagnostic.is_error())
        .count();
    if n_errors > 0 {
        let _ = writeln!(
            output,
            "{n_errors} error(s): the configuration must not be applied"
        );
    } else {
        summarize(&mut output);
    }
    CheckReport {
        output,
        has_errors: n_errors > 0,
    }
}

fn summarize_cluster(cluster: &ClusterConfig, output: &mut String) {
    let _ = writeln!(
        output,
        "cluster: OK, membership port {}/udp",
        cluster.lans.port
    );
    for lan in &cluster.lans.lan {
        let nodes: Vec<String> = lan
            .node
            .iter()
            .map(|node| format!("{} {}", node.name, node.addr))
            .collect();
        let _ = writeln!(output, "  lan {}: {}", lan.name, nodes.join(", "));
    }
}

fn summarize_module(
    config: &UserConfig,
    cluster: Option<&ClusterConfig>,
    cluster_path: Option<&Path>,
    id: ModuleId,
    output: &mut String,
) {
    let service = &config.service;
    let mode = match service.mode {
        Mode::Mirror => "mirror",
        Mode::Farm => "farm",
        Mode::Light => "light",
    };
    let _ = writeln!(output, "module: OK");
    let _ = writeln!(output, "  mode: {mode}");
    match (cluster, cluster_path) {
        (Some(cluster), Some(path)) => {
            let _ = writeln!(
                output,
                "  nodes: {} (from {})",
                cluster.node_names().join(", "),
                path.display()
            );
        }
        _ => {
            let _ = writeln!(
                output,
                "  nodes: unknown (no cluster.xml; LAN names and subnets not checked)"
            );
        }
    }
    if let Some(heart) = &service.heart {
        let lans: Vec<&str> = heart
            .heartbeat
            .iter()
            .map(|heartbeat| heartbeat.name.as_str())
            .collect();
        let _ = writeln!(
            output,
            "  heartbeats: {} (pulse {}, timeout {})",
            lans.join(", "),
            format_duration(heart.pulse),
            format_duration(heart.timeout)
        );
    }
    let vips: Vec<&str> = service
        .virtual_addrs()
        .map(|addr| addr.addr.as_str())
        .collect();
    let _ = writeln!(
        output,
        "  vip: {}",
        if vips.is_empty() {
            "none".to_owned()
        } else {
            vips.join(", ")
        }
    );
    let dirs: Vec<&str> = service
        .rfs
        .iter()
        .flat_map(|rfs| rfs.replicated.iter())
        .map(|replicated| replicated.dir.as_str())
        .collect();
    let _ = writeln!(
        output,
        "  replicated dirs: {}",
        if dirs.is_empty() {
            "none".to_owned()
        } else {
            dirs.join(", ")
        }
    );
    let mut checkers: Vec<String> = service
        .check
        .iter()
        .flat_map(|check| check.checkers.iter())
        .map(|checker| format!("{}.{}", checker.kind.element(), checker.resource_ident()))
        .collect();
    checkers.extend(
        service
            .errd
            .iter()
            .flat_map(|errd| errd.proc.iter())
            .map(|proc| format!("proc.{}", proc.name)),
    );
    let _ = writeln!(
        output,
        "  checkers: {}",
        if checkers.is_empty() {
            "none".to_owned()
        } else {
            checkers.join(", ")
        }
    );
    let ports = config.ports(id);
    let _ = writeln!(
        output,
        "  ports (module id {}): {}",
        id.get(),
        describe_ports(config, ports)
    );
}

fn describe_ports(config: &UserConfig, ports: ModulePorts) -> String {
    match config.service.mode {
        Mode::Mirror => {
            format!(
                "heartbeat {}/udp, replication {}/tcp",
                ports.heartbeat, ports.replication
            )
        }
        Mode::Farm => format!("farm {}/udp", ports.farm),
        Mode::Light => "none".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A module folder whose `<check>` holds a custom checker running `bin/check_app`.
    fn module_with_custom_checker(program: Option<u32>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temporary directory");
        fs::create_dir_all(dir.path().join("conf")).expect("conf/");
        fs::create_dir_all(dir.path().join("bin")).expect("bin/");
        fs::write(
            dir.path().join("conf/userconfig.xml"),
            "<safe>\n<service mode=\"mirror\">\n<heart><heartbeat name=\"default\"/></heart>\n<user/>\n<check><custom ident=\"app\" exec=\"check_app\"/></check>\n</service>\n</safe>\n",
        )
        .expect("userconfig.xml");
        if let Some(mode) = program {
            let path = dir.path().join("bin/check_app");
            fs::write(&path, "#!/bin/sh\n").expect("program");
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        dir
    }

    fn check(dir: &tempfile::TempDir) -> CheckReport {
        run(&ConfigCheckArgs {
            path: dir.path().to_path_buf(),
            cluster: None,
            id: 1,
            platform: None,
        })
        .expect("the check runs")
    }

    #[test]
    fn a_custom_checker_program_that_cannot_run_is_refused() {
        let report = check(&module_with_custom_checker(Some(0o644)));
        assert!(report.has_errors, "{}", report.output);
        assert!(
            report.output.contains(
                "userconfig.xml:5:28: element <custom> attribute exec: custom checker app:"
            ) && report.output.contains("check_app is not executable"),
            "{}",
            report.output
        );

        let report = check(&module_with_custom_checker(None));
        assert!(report.has_errors, "{}", report.output);
        assert!(
            report
                .output
                .contains("`check_app` is not in the module's bin/ folder"),
            "{}",
            report.output
        );

        let report = check(&module_with_custom_checker(Some(0o755)));
        assert!(!report.has_errors, "{}", report.output);
        assert!(
            report.output.contains("checkers: custom.app"),
            "{}",
            report.output
        );
    }
}
