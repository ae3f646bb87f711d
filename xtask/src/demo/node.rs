//! One demo node's SafeKit installation: the SAFE/SAFEVAR layout of
//! `agent/src/daemon/mod.rs`, the `demo` module from `modules/demo/`, the
//! agent (`safekitd --foreground`) and the `safekit` command run inside the node.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use safekit_tests::{Cluster, Node, NodeProcess};

use super::{MODULE, wait_for};

/// `safekit state -m demo -lq` exit codes.
pub(crate) const STOP: i32 = 0;
pub(crate) const WAIT: i32 = 1;
pub(crate) const ALONE: i32 = 2;
pub(crate) const PRIM: i32 = 3;
pub(crate) const SECOND: i32 = 4;

/// What the module's `conf/userconfig.xml` template needs filled in.
#[derive(Debug, Clone)]
pub(crate) struct ModuleSettings {
    pub(crate) vip: Ipv4Addr,
    pub(crate) data_dir: PathBuf,
    pub(crate) port: u16,
    /// Whether to add the `<rfs>` element replicating `data_dir`.
    pub(crate) replicate: bool,
}

impl ModuleSettings {
    /// The module's userconfig.xml: the template with its placeholders filled.
    pub(crate) fn userconfig(&self, template: &str) -> anyhow::Result<String> {
        let rfs = if self.replicate {
            format!(
                r#"<rfs replication_timeout="500ms"><replicated dir="{}" mode="read_only"/></rfs>"#,
                self.data_dir.display()
            )
        } else {
            "<!-- no <rfs>: the data is not replicated (cargo xtask demo --no-replicate) -->"
                .to_owned()
        };
        let filled = template
            .replace("@VIP@", &self.vip.to_string())
            .replace("@DATA_DIR@", &self.data_dir.display().to_string())
            .replace("@PORT@", &self.port.to_string())
            .replace("<!--@RFS@-->", &rfs);
        if let Some(placeholder) = unknown_placeholder(&filled) {
            bail!(
                "modules/demo/conf/userconfig.xml has a placeholder the demo does not know: {placeholder}"
            );
        }
        Ok(filled)
    }
}

/// One node's installation and agent.
#[derive(Debug)]
pub(crate) struct DemoNode<'a> {
    pub(crate) node: &'a Node,
    pub(crate) safe: PathBuf,
    pub(crate) var: PathBuf,
    bin_dir: PathBuf,
}

impl<'a> DemoNode<'a> {
    /// Installs the agent's directories, the cluster configuration and the
    /// demo module (from `module_dir`, normally `modules/demo`) for `node`.
    pub(crate) fn install(
        node: &'a Node,
        cluster: &Cluster,
        module_dir: &Path,
        settings: &ModuleSettings,
        secret: &str,
        bin_dir: &Path,
    ) -> anyhow::Result<DemoNode<'a>> {
        let safe = node.config_dir().join("safe");
        let var = node.state_dir().join("safevar");
        let module = safe.join("modules").join(MODULE);
        for dir in [module.join("conf"), module.join("bin"), var.join("cluster")] {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let peers: String = cluster
            .nodes()
            .iter()
            .map(|peer| format!("<node name=\"{}\" addr=\"{}\"/>", peer.name(), peer.addr(0)))
            .collect();
        write_file(
            &var.join("cluster").join("cluster.xml"),
            &format!("<cluster><lans><lan name=\"default\">{peers}</lan></lans></cluster>\n"),
            0o644,
        )?;
        write_file(&var.join("cluster").join("secret"), secret, 0o600)?;
        let template_path = module_dir.join("conf").join("userconfig.xml");
        let template = std::fs::read_to_string(&template_path)
            .with_context(|| format!("read {}", template_path.display()))?;
        write_file(
            &module.join("conf").join("userconfig.xml"),
            &settings.userconfig(&template)?,
            0o644,
        )?;
        let scripts = module_dir.join("bin");
        for entry in
            std::fs::read_dir(&scripts).with_context(|| format!("read {}", scripts.display()))?
        {
            let entry = entry.with_context(|| format!("read {}", scripts.display()))?;
            let content = std::fs::read_to_string(entry.path())
                .with_context(|| format!("read {}", entry.path().display()))?;
            write_file(&module.join("bin").join(entry.file_name()), &content, 0o755)?;
        }
        let link = safe.join("safekit");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(bin_dir.join("safekit"), &link)
            .with_context(|| format!("link {}", link.display()))?;
        Ok(DemoNode {
            node,
            safe,
            var,
            bin_dir: bin_dir.to_path_buf(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        self.node.name()
    }

    /// Starts `safekitd --foreground` in the node and waits until it answers.
    pub(crate) fn start_agent(&self) -> anyhow::Result<NodeProcess> {
        let agent = self.node.spawn(format!(
            "exec {} --foreground --safe {} --var {} --node {}",
            self.bin_dir.join("safekitd").display(),
            self.safe.display(),
            self.var.display(),
            self.node.name()
        ))?;
        wait_for(
            &format!("{}'s agent to answer", self.name()),
            Duration::from_secs(30),
            || {
                // `state` goes through the agent's socket (`module list` also works offline).
                self.safekit("state").is_ok_and(|output| output.success())
            },
        )
        .with_context(|| format!("the agent's output: {}", agent.output()))?;
        Ok(agent)
    }

    /// Runs `safekit <args>` inside the node, as an operator would.
    pub(crate) fn safekit(&self, args: &str) -> anyhow::Result<safekit_tests::Output> {
        Ok(self.node.run(format!(
            "SAFE={safe} SAFEVAR={var} {safe}/safekit {args}",
            safe = self.safe.display(),
            var = self.var.display(),
        ))?)
    }

    /// Runs `safekit <args>` and fails with its message if it fails.
    pub(crate) fn safekit_ok(&self, args: &str) -> anyhow::Result<String> {
        let output = self.safekit(args)?;
        if !output.success() {
            bail!(
                "{}: `safekit {args}` failed: {}{}",
                self.name(),
                output.stdout,
                output.stderr
            );
        }
        Ok(output.stdout)
    }

    /// `safekit state -m demo -lq`'s exit code (-1 if the agent is unreachable).
    pub(crate) fn state(&self) -> i32 {
        self.safekit(&format!("state -m {MODULE} -lq"))
            .ok()
            .and_then(|output| output.status.code())
            .unwrap_or(-1)
    }

    pub(crate) fn wait_state(&self, code: i32) -> anyhow::Result<()> {
        wait_for(
            &format!("{} to be {}", self.name(), state_name(code)),
            Duration::from_secs(30),
            || self.state() == code,
        )
        .with_context(|| self.diagnostics())
    }

    /// One line per module: `safekit state -m demo` as the node prints it.
    pub(crate) fn state_line(&self) -> String {
        match self.safekit(&format!("state -m {MODULE}")) {
            Ok(output) if output.success() => output.stdout.trim_end().to_owned(),
            Ok(output) if output.stderr.contains("agent not running") => {
                "(no answer: agent not running)".to_owned()
            }
            Ok(output) => format!(
                "(no answer: {})",
                output.stderr.lines().next().unwrap_or("no message")
            ),
            Err(error) => format!("(no answer: {error})"),
        }
    }

    /// A `key  value` line of `safekit state -m demo -v` (empty if absent).
    pub(crate) fn detail(&self, key: &str) -> String {
        self.safekit(&format!("state -m {MODULE} -v"))
            .map(|output| {
                output
                    .stdout
                    .lines()
                    .find_map(|line| {
                        // `    {key:<16} {value}`: a longer key ("resync engine")
                        // starting with `key` is followed by one space and a word.
                        let rest = line.trim_start().strip_prefix(key)?;
                        (rest.starts_with("  ") || (key.len() >= 16 && rest.starts_with(' ')))
                            .then(|| rest.trim().to_owned())
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// The module's verbose log, read from its file (works with the agent down).
    pub(crate) fn log_file(&self) -> String {
        std::fs::read_to_string(self.var.join("modules").join(MODULE).join("log"))
            .unwrap_or_default()
    }

    /// `state -v` and the end of the module log, for error messages.
    pub(crate) fn diagnostics(&self) -> String {
        let verbose = self
            .safekit(&format!("state -m {MODULE} -v"))
            .map(|output| output.stdout + &output.stderr)
            .unwrap_or_else(|error| error.to_string());
        let log = self.log_file();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- {} `safekit state -m {MODULE} -v`:\n{verbose}\n--- end of its module log:\n{}",
            self.name(),
            tail.join("\n")
        )
    }
}

/// The first `@NAME@` left in `text` (NAME in capitals and underscores).
fn unknown_placeholder(text: &str) -> Option<&str> {
    text.match_indices('@').find_map(|(start, _)| {
        let rest = &text[start + 1..];
        let end = rest.find('@')?;
        let name = &rest[..end];
        let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        plain.then(|| &text[start..start + end + 2])
    })
}

pub(crate) fn state_name(code: i32) -> &'static str {
    match code {
        STOP => "STOP",
        WAIT => "WAIT",
        ALONE => "ALONE",
        PRIM => "PRIM",
        SECOND => "SECOND",
        _ => "unknown",
    }
}

fn write_file(path: &Path, content: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
