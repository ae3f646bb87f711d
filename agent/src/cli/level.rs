//! `safekit level [-m M]`: versions, protocol versions, build features and licence.
//!
//! Operators and support compare these between the two nodes before a
//! rolling upgrade. The local part (this command's own build) needs nothing
//! but the binary; the agent's part is asked over the admin socket, and when
//! the agent does not answer the command says so and still exits 0 with the
//! local facts. With `-m`, the module's name, id and version (a `<macro>` or
//! `<user><var>` named `VERSION`, if its configuration has one) follow, then
//! the output of the module's `level` hook when `bin/level` exists.
//!
//! Exit status: 0 printed (even with the agent down); 1 the module is unknown
//! or its configuration cannot be read.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use safekit_protocol::admin::{AdminRequest, AdminResponse};

use crate::daemon::load::{self, NodePaths};

/// How long the module's `level` hook may run.
pub const LEVEL_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// `safekit level`.
#[derive(Debug, Clone, Args)]
pub struct LevelArgs {
    /// Also the module's name, id, version and the output of its `level` hook.
    #[arg(short = 'm', long = "module")]
    pub module: Option<String>,
}

/// The facts of this build, as `key: value` pairs (the agent answers the same for itself).
pub fn build_facts() -> Vec<(String, String)> {
    let features: Vec<&str> = [("linux-datapath", cfg!(feature = "linux-datapath"))]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
    vec![
        ("version".into(), env!("CARGO_PKG_VERSION").into()),
        (
            "heartbeat protocol".into(),
            format!("version {}", safekit_protocol::heartbeat::HEARTBEAT_VERSION),
        ),
        (
            "replication protocol".into(),
            format!("version {}", safekit_protocol::auth::PROTOCOL_VERSION),
        ),
        (
            "build features".into(),
            if features.is_empty() {
                "none".into()
            } else {
                features.join(", ")
            },
        ),
        (
            "licence".into(),
            format!("open source ({})", env!("CARGO_PKG_LICENSE")),
        ),
    ]
}

/// Runs `safekit level`.
pub fn run(args: &LevelArgs) -> ExitCode {
    println!("safekit command:");
    for (key, value) in build_facts() {
        println!("    {key:<22} {value}");
    }
    match super::control::request(&AdminRequest::Level) {
        Ok(AdminResponse::Ok { message }) => {
            println!("agent (safekitd):");
            for line in message.lines() {
                match line.split_once(": ") {
                    Some((key, value)) => println!("    {key:<22} {value}"),
                    None => println!("    {line}"),
                }
            }
        }
        Ok(AdminResponse::Refused { reason }) => println!("agent (safekitd): {reason}"),
        Ok(other) => println!("agent (safekitd): unexpected answer {other:?}"),
        Err(error) => println!("agent (safekitd): not running or not reachable ({error})"),
    }
    let Some(module) = &args.module else {
        return ExitCode::SUCCESS;
    };
    let paths = super::module::node_paths();
    match module_facts(&paths, module) {
        Ok(facts) => {
            println!("module {module}:");
            for (key, value) in facts {
                println!("    {key:<22} {value}");
            }
        }
        Err(error) => {
            eprintln!("safekit: level: module {module}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let hook = paths.modules().join(module).join("bin").join("level");
    if hook.exists() {
        println!("module {module} level hook (bin/level):");
        match run_level_hook(&paths, module, &hook) {
            Ok(output) => {
                for line in output.lines() {
                    println!("    {line}");
                }
            }
            Err(error) => println!("    {error}"),
        }
    }
    ExitCode::SUCCESS
}

/// The module's name, id and version, read from its files.
///
/// # Errors
/// A one-line reason: no such module, unreadable or unparsable configuration.
pub fn module_facts(paths: &NodePaths, module: &str) -> Result<Vec<(String, String)>, String> {
    let conf = paths
        .modules()
        .join(module)
        .join("conf")
        .join("userconfig.xml");
    let text = std::fs::read_to_string(&conf)
        .map_err(|error| format!("cannot read {}: {error}", conf.display()))?;
    let config = safekit_core::config::parse_userconfig(&conf.display().to_string(), &text)
        .map_err(|errors| {
            format!(
                "{} is invalid ({} problem(s); see safekit confcheck -m {module})",
                conf.display(),
                errors.diagnostics.len()
            )
        })?;
    let id = load::module_id_of(paths, module)?;
    let version = config
        .r#macro
        .iter()
        .map(|entry| (&entry.name, &entry.value))
        .chain(
            config
                .service
                .user
                .iter()
                .flat_map(|user| user.var.iter())
                .map(|var| (&var.name, &var.value)),
        )
        .find(|(name, _)| name.eq_ignore_ascii_case("version"))
        .map_or_else(
            || "none in userconfig.xml (no VERSION macro or variable)".to_string(),
            |(_, value)| value.clone(),
        );
    Ok(vec![
        ("name".into(), module.to_string()),
        ("id".into(), id.get().to_string()),
        (
            "mode".into(),
            format!("{:?}", config.service.mode).to_lowercase(),
        ),
        ("version".into(), version),
        ("configuration".into(), conf.display().to_string()),
    ])
}

/// Runs `bin/level` with the module's SafeKit environment and returns what it printed.
fn run_level_hook(paths: &NodePaths, module: &str, hook: &Path) -> Result<String, String> {
    let userbin = paths.modules().join(module).join("bin");
    let env = crate::scripts::ScriptEnv {
        safe: paths.safe.clone(),
        safebin: paths.safe.join("private").join("bin"),
        safevar: paths.var.clone(),
        module: module.to_string(),
        userbin: userbin.clone(),
        userconf: paths.modules().join(module).join("conf"),
        uservar: paths.module_var(module),
        user_vars: std::collections::BTreeMap::new(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))?;
    runtime.block_on(async {
        let child = tokio::process::Command::new(hook)
            .envs(env.variables())
            .current_dir(&userbin)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("cannot run {}: {error}", hook.display()))?;
        let pid = child.id();
        match tokio::time::timeout(LEVEL_HOOK_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(output)) => {
                let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&output.stderr));
                if !output.status.success() {
                    text.push_str(&format!("(bin/level: {})\n", output.status));
                }
                Ok(text)
            }
            Ok(Err(error)) => Err(format!("waiting for {}: {error}", hook.display())),
            Err(_) => {
                if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Err(format!(
                    "bin/level did not finish within {} s: killed",
                    LEVEL_HOOK_TIMEOUT.as_secs()
                ))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_facts_name_the_versions_and_the_licence() {
        let facts = build_facts();
        let get = |key: &str| {
            facts
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("version"), env!("CARGO_PKG_VERSION"));
        assert_eq!(get("heartbeat protocol"), "version 2");
        assert_eq!(get("replication protocol"), "version 1");
        assert!(get("licence").starts_with("open source ("), "{facts:?}");
    }

    #[test]
    fn module_facts_read_the_id_and_a_version_variable() {
        let root = tempfile::tempdir().expect("temp dir");
        let paths = NodePaths {
            safe: root.path().join("safe"),
            var: root.path().join("var"),
        };
        let conf = paths.modules().join("app").join("conf");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(
            conf.join("userconfig.xml"),
            r#"<safe><service mode="mirror"><user><var name="VERSION" value="4.2"/></user></service></safe>"#,
        )
        .expect("write userconfig.xml");
        std::fs::write(conf.join("id"), "7\n").expect("write id");
        let facts = module_facts(&paths, "app").expect("readable module");
        assert!(facts.contains(&("id".into(), "7".into())), "{facts:?}");
        assert!(
            facts.contains(&("version".into(), "4.2".into())),
            "{facts:?}"
        );
        let missing = module_facts(&paths, "nosuch").expect_err("no such module");
        assert!(missing.contains("cannot read"), "{missing}");
    }
}
