//! `safekit snapshot -m MODULE FILE.zip`: everything support asks for, in one zip.
//!
//! A snapshot gathers, for one module, what is needed to understand what the
//! cluster did and why, without access to the machine:
//!
//! - `logs/`: the module log (`SAFEVAR/modules/<AM>/log`, and its rotated
//!   `.1`) and the application log (`userlog.ulog`, and its `.1`);
//! - `history.txt`: the module log lines about resynchronization and checkers;
//! - `conf/`: the module's `userconfig.xml`, its `bin/` scripts (list and
//!   contents) and `SAFEVAR/cluster/cluster.xml`;
//! - `state/`: the persisted cluster state, raw and decoded to text;
//! - `system/`: agent and kernel versions, the mount table, the addresses;
//! - `live/state.txt`: `safekit state -m AM -v` if the agent answers (or why not);
//! - `README.txt`: an index of the above.
//!
//! It works from the files alone, so a snapshot can be taken when the agent is
//! down. Secrets never leave the node: `SAFEVAR/cluster/secret` is not
//! included, the value of every XML attribute whose name mentions `secret`,
//! `password` or `passwd` is replaced, and any line (of any part) that
//! contains the cluster secret's bytes is replaced by a marker.

use std::io::{Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Args;
use safekit_core::cluster::Persistent;
use safekit_protocol::admin::{AdminRequest, AdminResponse};

use crate::cli::control::{render_states, request};
use crate::daemon::load::NodePaths;
use crate::modlog::rotated_path;

/// What replaces a redacted XML attribute value.
pub const REDACTED_VALUE: &str = "REDACTED";

/// What replaces a line that contained the cluster secret.
pub const REDACTED_LINE: &str = "[line redacted: it contained the cluster secret]";

/// Attribute names (lowercase substrings) whose values are redacted in XML files.
const SECRET_ATTRIBUTES: [&str; 3] = ["secret", "password", "passwd"];

/// `safekit snapshot`.
#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// The module.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// The zip file to write (replaced if it exists).
    pub output: PathBuf,
    /// The installation directory `SAFE` (modules under `SAFE/modules`).
    #[arg(long, env = "SAFE", default_value = "/opt/safekit")]
    pub safe: PathBuf,
    /// The working directory `SAFEVAR` (cluster.xml, module state and logs).
    #[arg(long = "var", env = "SAFEVAR", default_value = "/var/safekit")]
    pub var: PathBuf,
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The module is installed nowhere on this node.
    #[error("unknown module {module:?}: neither {} nor {} exists", .safe_dir.display(), .var_dir.display())]
    UnknownModule {
        /// The module name given.
        module: String,
        /// `SAFE/modules/<AM>`.
        safe_dir: PathBuf,
        /// `SAFEVAR/modules/<AM>`.
        var_dir: PathBuf,
    },
    /// Not a plain module name.
    #[error("invalid module name {0:?}")]
    InvalidName(String),
    /// The zip file could not be written.
    #[error("cannot write {}: {reason}", .path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The written snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotSummary {
    /// The zip file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The entries, in order.
    pub entries: Vec<String>,
}

/// Takes the snapshot; `progress` receives one line per part added.
///
/// # Errors
/// [`SnapshotError`]: unknown module, or the zip could not be written (the
/// partial file is then removed).
pub fn run(
    args: &SnapshotArgs,
    progress: &mut dyn FnMut(&str),
) -> Result<SnapshotSummary, SnapshotError> {
    let module = args.module.as_str();
    if module.is_empty()
        || module == "."
        || module == ".."
        || module.contains('/')
        || module.contains('\0')
    {
        return Err(SnapshotError::InvalidName(args.module.clone()));
    }
    let paths = NodePaths {
        safe: args.safe.clone(),
        var: args.var.clone(),
    };
    let module_dir = paths.modules().join(module);
    let module_var = paths.module_var(module);
    if !module_dir.is_dir() && !module_var.is_dir() {
        return Err(SnapshotError::UnknownModule {
            module: args.module.clone(),
            safe_dir: module_dir,
            var_dir: module_var,
        });
    }
    let write_error = |reason: String| SnapshotError::Write {
        path: args.output.clone(),
        reason,
    };
    // Logs and configuration: readable by the owner only, like SAFEVAR.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&args.output)
        .map_err(|error| write_error(error.to_string()))?;
    let result = write_zip(file, &paths, module, progress);
    match result {
        Ok(entries) => {
            let bytes = std::fs::metadata(&args.output)
                .map_err(|error| write_error(error.to_string()))?
                .len();
            Ok(SnapshotSummary {
                path: args.output.clone(),
                bytes,
                entries,
            })
        }
        Err(reason) => {
            // Best effort: a half-written zip is of no use to anyone.
            let _ = std::fs::remove_file(&args.output);
            Err(write_error(reason))
        }
    }
}

/// The zip being built, with the redaction applied to every entry.
struct Builder<W: Write + Seek> {
    zip: zip::ZipWriter<W>,
    secrets: Vec<Vec<u8>>,
    index: Vec<(String, String)>,
}

impl<W: Write + Seek> Builder<W> {
    fn add(
        &mut self,
        name: &str,
        description: &str,
        content: &[u8],
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), String> {
        let content = redact_secret_lines(content, &self.secrets);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(0o600);
        self.zip
            .start_file(name, options)
            .map_err(|error| format!("zip entry {name}: {error}"))?;
        self.zip
            .write_all(&content)
            .map_err(|error| format!("zip entry {name}: {error}"))?;
        progress(&format!("added {name} ({} bytes)", content.len()));
        self.index.push((name.to_owned(), description.to_owned()));
        Ok(())
    }

    /// Adds `path` if it exists; records why not otherwise.
    fn add_file(
        &mut self,
        name: &str,
        description: &str,
        path: &Path,
        transform: fn(&[u8]) -> Vec<u8>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<bool, String> {
        match std::fs::read(path) {
            Ok(bytes) => {
                self.add(name, description, &transform(&bytes), progress)?;
                Ok(true)
            }
            Err(error) => {
                let note = format!("{description}: not included, {}: {error}", path.display());
                progress(&format!("skipped {name} ({error})"));
                self.index.push((format!("({name})"), note));
                Ok(false)
            }
        }
    }
}

fn write_zip<W: Write + Seek>(
    out: W,
    paths: &NodePaths,
    module: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<String>, String> {
    let mut builder = Builder {
        zip: zip::ZipWriter::new(out),
        secrets: secret_needles(&paths.secret()),
        index: Vec::new(),
    };
    let module_dir = paths.modules().join(module);
    let module_var = paths.module_var(module);
    let keep = |bytes: &[u8]| bytes.to_vec();
    let xml = |bytes: &[u8]| redact_xml_attributes(&String::from_utf8_lossy(bytes)).into_bytes();

    // Logs.
    let log = module_var.join("log");
    let log_1 = rotated_path(&log);
    builder.add_file("logs/module.log", "module log", &log, keep, progress)?;
    if log_1.exists() {
        builder.add_file(
            "logs/module.log.1",
            "module log, previous (rotated) file",
            &log_1,
            keep,
            progress,
        )?;
    }
    let userlog = module_var.join("userlog.ulog");
    let userlog_1 = rotated_path(&userlog);
    builder.add_file(
        "logs/userlog.ulog",
        "application log (script output)",
        &userlog,
        keep,
        progress,
    )?;
    if userlog_1.exists() {
        builder.add_file(
            "logs/userlog.ulog.1",
            "application log, previous (rotated) file",
            &userlog_1,
            keep,
            progress,
        )?;
    }
    let history = history_lines(&[&log_1, &log]);
    builder.add(
        "history.txt",
        "module log lines about resynchronization and checkers, oldest first",
        history.as_bytes(),
        progress,
    )?;

    // Configuration.
    builder.add_file(
        "conf/userconfig.xml",
        "the module's userconfig.xml (secret and password attributes redacted)",
        &module_dir.join("conf").join("userconfig.xml"),
        xml,
        progress,
    )?;
    builder.add(
        "conf/bin.txt",
        "the module's bin/ scripts: list, then each one's contents",
        scripts_text(&module_dir.join("bin")).as_bytes(),
        progress,
    )?;
    builder.add_file(
        "conf/cluster.xml",
        "SAFEVAR/cluster/cluster.xml (secret and password attributes redacted)",
        &paths.cluster_xml(),
        xml,
        progress,
    )?;

    // Persisted state.
    let state = module_var.join("state");
    if builder.add_file(
        "state/state.raw",
        "the persisted cluster state file, as stored",
        &state,
        keep,
        progress,
    )? {
        builder.add(
            "state/state.txt",
            "the persisted cluster state, decoded",
            decode_state(&state).as_bytes(),
            progress,
        )?;
    }

    // System.
    builder.add(
        "system/versions.txt",
        "agent and kernel versions",
        versions_text().as_bytes(),
        progress,
    )?;
    builder.add_file(
        "system/mounts.txt",
        "mount table (/proc/self/mounts)",
        Path::new("/proc/self/mounts"),
        keep,
        progress,
    )?;
    builder.add(
        "system/addresses.txt",
        "network addresses of this node",
        addresses_text().as_bytes(),
        progress,
    )?;

    // Live state.
    builder.add(
        "live/state.txt",
        "`safekit state -m MODULE -v` from the running agent, or why it did not answer",
        live_state(module).as_bytes(),
        progress,
    )?;

    // Index.
    let mut readme = format!(
        "safekit support snapshot of module {module}\n\
         agent version {}\n\
         SAFE={}\nSAFEVAR={}\n\n\
         Redaction: SAFEVAR/cluster/secret is not included; the values of XML attributes\n\
         named like secret/password/passwd read \"{REDACTED_VALUE}\"; any line containing\n\
         the cluster secret reads \"{REDACTED_LINE}\".\n\nContents:\n",
        env!("CARGO_PKG_VERSION"),
        paths.safe.display(),
        paths.var.display(),
    );
    for (name, description) in &builder.index {
        readme.push_str(&format!("  {name:<22} {description}\n"));
    }
    builder.add("README.txt", "this index", readme.as_bytes(), progress)?;

    let entries = builder
        .index
        .iter()
        .filter(|(name, _)| !name.starts_with('('))
        .map(|(name, _)| name.clone())
        .collect();
    let mut out = builder
        .zip
        .finish()
        .map_err(|error| format!("finishing the zip: {error}"))?;
    out.flush().map_err(|error| error.to_string())?;
    Ok(entries)
}

/// The byte strings whose presence makes a line secret: the secret file's
/// contents, raw and trimmed (as the agent uses it).
fn secret_needles(path: &Path) -> Vec<Vec<u8>> {
    let Ok(raw) = std::fs::read(path) else {
        return Vec::new();
    };
    let mut needles = Vec::new();
    let trimmed = raw.trim_ascii().to_vec();
    if !trimmed.is_empty() {
        needles.push(trimmed);
    }
    if !raw.is_empty() && !needles.contains(&raw) {
        needles.push(raw);
    }
    needles
}

/// Replaces every line of `content` that contains one of `secrets` with [`REDACTED_LINE`].
pub fn redact_secret_lines(content: &[u8], secrets: &[Vec<u8>]) -> Vec<u8> {
    let contains = |haystack: &[u8], needle: &[u8]| {
        !needle.is_empty()
            && haystack
                .windows(needle.len())
                .any(|window| window == needle)
    };
    if !secrets.iter().any(|secret| contains(content, secret)) {
        return content.to_vec();
    }
    let mut out = Vec::with_capacity(content.len());
    for (i, line) in content.split(|&byte| byte == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        if secrets.iter().any(|secret| contains(line, secret)) {
            out.extend_from_slice(REDACTED_LINE.as_bytes());
        } else {
            out.extend_from_slice(line);
        }
    }
    // A secret spanning lines (a multi-line secret file) is caught by its
    // trimmed form only if on one line; drop anything still matching.
    if secrets.iter().any(|secret| contains(&out, secret)) {
        return REDACTED_LINE.as_bytes().to_vec();
    }
    out
}

/// Replaces the value of every XML attribute whose name contains `secret`,
/// `password` or `passwd` (any case) with [`REDACTED_VALUE`].
pub fn redact_xml_attributes(xml: &str) -> String {
    let bytes = xml.as_bytes();
    let mut out = String::with_capacity(xml.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'=' {
            i += 1;
            continue;
        }
        // The attribute name: the word before `=` (spaces allowed between).
        let mut name_end = i;
        while name_end > 0 && bytes[name_end - 1].is_ascii_whitespace() {
            name_end -= 1;
        }
        let mut name_start = name_end;
        while name_start > 0 && is_name_byte(bytes[name_start - 1]) {
            name_start -= 1;
        }
        // The quoted value after `=`.
        let mut value_start = i + 1;
        while value_start < bytes.len() && bytes[value_start].is_ascii_whitespace() {
            value_start += 1;
        }
        let Some(&quote) = bytes.get(value_start) else {
            break;
        };
        if quote != b'"' && quote != b'\'' {
            i += 1;
            continue;
        }
        let Some(value_len) = bytes[value_start + 1..].iter().position(|&b| b == quote) else {
            break;
        };
        let value_end = value_start + 1 + value_len;
        let name = xml[name_start..name_end].to_ascii_lowercase();
        if SECRET_ATTRIBUTES.iter().any(|word| name.contains(word)) {
            out.push_str(&xml[copied..=value_start]);
            out.push_str(REDACTED_VALUE);
            copied = value_end;
        }
        i = value_end + 1;
    }
    out.push_str(&xml[copied..]);
    out
}

fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b':' | b'.')
}

/// The lines of the module logs (oldest file first) about resynchronization or checkers.
fn history_lines(logs: &[&Path]) -> String {
    const WORDS: [&str; 4] = ["resync", "checker", "reintegrat", "check "];
    let mut out = String::new();
    for path in logs {
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        for line in String::from_utf8_lossy(&bytes).lines() {
            let lower = line.to_ascii_lowercase();
            if WORDS.iter().any(|word| lower.contains(word)) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if out.is_empty() {
        out.push_str("(no resynchronization or checker lines in the module log)\n");
    }
    out
}

/// The list of scripts in `bin`, then each one's contents.
fn scripts_text(bin: &Path) -> String {
    let mut names: Vec<PathBuf> = match std::fs::read_dir(bin) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .collect(),
        Err(error) => return format!("{}: {error}\n", bin.display()),
    };
    names.sort();
    let mut out = format!("{}:\n", bin.display());
    for path in &names {
        let mode = std::fs::metadata(path).map_or(0, |metadata| {
            std::os::unix::fs::PermissionsExt::mode(&metadata.permissions())
        });
        out.push_str(&format!("  {:o}  {}\n", mode & 0o7777, file_name(path)));
    }
    for path in &names {
        out.push_str(&format!("\n===== {} =====\n", file_name(path)));
        match std::fs::read(path) {
            Ok(bytes) => {
                out.push_str(&String::from_utf8_lossy(&bytes));
                if !bytes.ends_with(b"\n") {
                    out.push('\n');
                }
            }
            Err(error) => out.push_str(&format!("(unreadable: {error})\n")),
        }
    }
    out
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
}

/// The persisted state decoded to text, or why it could not be.
fn decode_state(path: &Path) -> String {
    match crate::persist::read(path) {
        Ok(Some(payload)) => match Persistent::decode(&payload) {
            Ok(persistent) => format!("{persistent:#?}\n"),
            Err(error) => format!("cannot decode the cluster state: {error}\n"),
        },
        Ok(None) => "no state file\n".to_owned(),
        Err(error) => format!("cannot read the state file: {error}\n"),
    }
}

/// Agent version and the kernel's `uname -a` fields.
fn versions_text() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_or_else(
            |error| format!("({path}: {error})"),
            |text| text.trim().to_owned(),
        )
    };
    format!(
        "agent: safekit {}\n\
         uname: {} {} {} {} {}\n\
         /proc/version: {}\n",
        env!("CARGO_PKG_VERSION"),
        read("/proc/sys/kernel/ostype"),
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/osrelease"),
        read("/proc/sys/kernel/version"),
        std::env::consts::ARCH,
        read("/proc/version"),
    )
}

/// The node's addresses, from netlink (as the agent sees them), else `ip -o addr`.
fn addresses_text() -> String {
    let from_netlink = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| error.to_string())
        .and_then(|runtime| {
            runtime.block_on(async {
                let netlink = crate::vip::Netlink::connect().map_err(|error| error.to_string())?;
                netlink
                    .list_addresses()
                    .await
                    .map_err(|error| error.to_string())
            })
        });
    match from_netlink {
        Ok(addresses) => {
            let mut out = String::new();
            for address in addresses {
                out.push_str(&format!(
                    "{}: {} {}/{}\n",
                    address.index, address.ifname, address.addr, address.prefix_len
                ));
            }
            if out.is_empty() {
                out.push_str("(no addresses)\n");
            }
            out
        }
        Err(netlink_error) => match std::process::Command::new("ip")
            .args(["-o", "addr"])
            .output()
        {
            Ok(output) if output.status.success() => {
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
            Ok(output) => format!(
                "netlink: {netlink_error}; ip -o addr failed: {}\n",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => format!("netlink: {netlink_error}; ip -o addr: {error}\n"),
        },
    }
}

/// `safekit state -m MODULE -v` from the agent, or a note that it did not answer.
fn live_state(module: &str) -> String {
    match request(&AdminRequest::State {
        module: Some(module.to_owned()),
        verbose: true,
    }) {
        Ok(AdminResponse::States(states)) => render_states(&states, true),
        Ok(AdminResponse::Refused { reason }) => format!("the agent refused: {reason}\n"),
        Ok(other) => format!("unexpected answer from the agent: {other:?}\n"),
        Err(error) => format!("the agent did not answer: {error}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_and_password_attributes_are_redacted_and_others_kept() {
        let xml =
            r#"<a user="bob" password="hunter2" dbPasswd = 'x y' secretKey="k"><b name="n"/></a>"#;
        assert_eq!(
            redact_xml_attributes(xml),
            r#"<a user="bob" password="REDACTED" dbPasswd = 'REDACTED' secretKey="REDACTED"><b name="n"/></a>"#
        );
    }

    #[test]
    fn lines_with_the_secret_are_replaced() {
        let secrets = vec![b"s3cr3t-s3cr3t-s3cr3t".to_vec()];
        let out = redact_secret_lines(b"one\nkey=s3cr3t-s3cr3t-s3cr3t here\nthree", &secrets);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            format!("one\n{REDACTED_LINE}\nthree")
        );
    }
}
