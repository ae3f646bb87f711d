//! `cargo xtask install|uninstall`: put the agent on a machine in SafeKit's layout, and take it off.
//!
//! What `install` puts where (`SAFE` = `--prefix`, default `/opt/safekit`;
//! `SAFEVAR` = `--var`, default `/var/safekit`):
//!
//! | path | mode | what |
//! |---|---|---|
//! | `SAFE/{safekit,safekitd,safekit-rfs}` | 0755 | the binaries (release build unless `--debug`) |
//! | `SAFE/modules/` | 0755 | installed modules (`safekit module install`) |
//! | `SAFE/private/bin/` | 0755 | `SAFEBIN`, as the scripts' environment names it |
//! | `SAFE/web/conf/httpd.conf` | 0644 | `Define httpport 9010` (the `ready.txt` health check); kept if edited |
//! | `SAFEVAR/` | 0755 | |
//! | `SAFEVAR/cluster/` | 0700 | `cluster.xml` and the cluster secret |
//! | `SAFEVAR/modules/` | 0700 | per-module state, logs, boot switch |
//! | `SAFEVAR/run/` | 0755 | the admin socket (itself root-only) |
//! | `/usr/bin/safekit` | link | to `SAFE/safekit` |
//! | `/etc/systemd/system/safekit.service` | 0644 | `packaging/systemd/safekit.service` with the paths above |
//!
//! Both tasks are idempotent and print one line per thing they did or found
//! already done. With `--destdir DIR` every path is under `DIR` (for tests and
//! packagers; links and the unit still name the final paths) and `systemctl`
//! is never called. Without it, `systemctl daemon-reload` (install) or
//! `systemctl disable --now safekit` (uninstall) run when systemd is the init
//! system (`/run/systemd/system` exists), and the task says so when it is not.
//!
//! `uninstall` removes what `install` put there; it keeps `SAFEVAR` (state,
//! logs, cluster secret), installed modules and an edited `httpd.conf` unless
//! `--purge` is given, and never removes a `/usr/bin/safekit` that is not its link.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;

/// The unit file, with the default paths.
pub const UNIT_TEMPLATE: &str = include_str!("../../packaging/systemd/safekit.service");

/// The binaries installed in `SAFE`.
pub const BINARIES: [&str; 3] = ["safekit", "safekitd", "safekit-rfs"];

/// `SAFE/web/conf/httpd.conf` as installed.
pub const HTTPD_CONF: &str = "# SafeKit web service: the health check GET /var/modules/<AM>/ready.txt.\n\
# Define httpport <port> (SafeKit's default 9010); Define httpaddr <address>\n\
# (repeatable) binds other addresses than this node's cluster.xml ones.\n\
Define httpport 9010\n";

/// Where the unit goes (below the destdir).
pub const UNIT_PATH: &str = "/etc/systemd/system/safekit.service";

/// Where the command's link goes (below the destdir).
pub const USR_BIN_LINK: &str = "/usr/bin/safekit";

/// The directory whose presence says systemd is the running init (sd_booted).
const SYSTEMD_RUNNING: &str = "/run/systemd/system";

/// `cargo xtask install`.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Install under this directory instead of `/` (packagers, tests); systemctl is not called.
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// SAFE: where the binaries, modules and web configuration go.
    #[arg(long, default_value = "/opt/safekit")]
    pub prefix: PathBuf,
    /// SAFEVAR: cluster configuration, module state and logs, the admin socket.
    #[arg(long = "var", default_value = "/var/safekit")]
    pub var: PathBuf,
    /// Install the debug build instead of the release build.
    #[arg(long)]
    pub debug: bool,
}

/// `cargo xtask uninstall`.
#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// The `--destdir` given to install.
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// The `--prefix` given to install.
    #[arg(long, default_value = "/opt/safekit")]
    pub prefix: PathBuf,
    /// The `--var` given to install.
    #[arg(long = "var", default_value = "/var/safekit")]
    pub var: PathBuf,
    /// Also remove SAFEVAR (cluster secret, state, logs), installed modules and an edited httpd.conf.
    #[arg(long)]
    pub purge: bool,
}

/// The final paths and where they are written.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `--destdir`, if any.
    pub destdir: Option<PathBuf>,
    /// `SAFE` as the installed system sees it.
    pub safe: PathBuf,
    /// `SAFEVAR` as the installed system sees it.
    pub var: PathBuf,
}

impl Layout {
    /// A layout, refusing paths the unit file could not carry.
    ///
    /// # Errors
    /// A relative path, or one with characters systemd would interpret.
    pub fn new(destdir: Option<PathBuf>, safe: PathBuf, var: PathBuf) -> anyhow::Result<Layout> {
        for (what, path) in [("--prefix", &safe), ("--var", &var)] {
            let text = path.to_str().unwrap_or("");
            if !path.is_absolute()
                || text.is_empty()
                || text == "/"
                || text
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '%' | '"' | '\'' | '\\' | '$'))
            {
                bail!(
                    "{what} {}: give an absolute path other than / without spaces, quotes, `%`, `$` or `\\`",
                    path.display()
                );
            }
        }
        if safe.starts_with(&var) || var.starts_with(&safe) {
            bail!(
                "--prefix {} and --var {} must not contain one another",
                safe.display(),
                var.display()
            );
        }
        Ok(Layout { destdir, safe, var })
    }

    /// Where the final path `path` is written.
    pub fn host(&self, path: &Path) -> PathBuf {
        match &self.destdir {
            Some(destdir) => destdir.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_path_buf(),
        }
    }

    /// `SAFE` on the host.
    pub fn safe_dir(&self) -> PathBuf {
        self.host(&self.safe)
    }

    /// `SAFEVAR` on the host.
    pub fn var_dir(&self) -> PathBuf {
        self.host(&self.var)
    }

    /// The directories install creates, with their modes, parents first.
    pub fn directories(&self) -> Vec<(PathBuf, u32)> {
        let safe = self.safe_dir();
        let var = self.var_dir();
        vec![
            (safe.clone(), 0o755),
            (safe.join("modules"), 0o755),
            (safe.join("private"), 0o755),
            (safe.join("private").join("bin"), 0o755),
            (safe.join("web"), 0o755),
            (safe.join("web").join("conf"), 0o755),
            (var.clone(), 0o755),
            (var.join("cluster"), 0o700),
            (var.join("modules"), 0o700),
            (var.join("run"), 0o755),
        ]
    }

    /// `SAFE/web/conf/httpd.conf` on the host.
    pub fn httpd_conf(&self) -> PathBuf {
        self.safe_dir().join("web").join("conf").join("httpd.conf")
    }

    /// The unit file on the host.
    pub fn unit(&self) -> PathBuf {
        self.host(Path::new(UNIT_PATH))
    }

    /// The `/usr/bin/safekit` link on the host.
    pub fn usr_bin_link(&self) -> PathBuf {
        self.host(Path::new(USR_BIN_LINK))
    }
}

/// The unit file for `layout`'s paths.
pub fn unit_text(layout: &Layout) -> String {
    // Through placeholders, so that a SAFE path holding the text of the
    // default SAFEVAR (or the reverse) is not rewritten twice.
    UNIT_TEMPLATE
        .replace("/opt/safekit", "\u{1}SAFE\u{1}")
        .replace("/var/safekit", "\u{1}SAFEVAR\u{1}")
        .replace("\u{1}SAFE\u{1}", &layout.safe.to_string_lossy())
        .replace("\u{1}SAFEVAR\u{1}", &layout.var.to_string_lossy())
}

/// `cargo xtask install`: builds, then installs.
///
/// # Errors
/// The build or any file operation failed (with the path).
pub fn run_install(root: &Path, args: InstallArgs) -> anyhow::Result<()> {
    let layout = Layout::new(args.destdir, args.prefix, args.var)?;
    let mut build = Command::new("cargo");
    build.args([
        "build",
        "-p",
        "safekit-agent",
        "-p",
        "safekit-linux-helper",
        "--bins",
    ]);
    if !args.debug {
        build.arg("--release");
    }
    crate::run(&mut build).context("the build failed: fix it, then run install again")?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let bins = target.join(if args.debug { "debug" } else { "release" });
    install(&layout, &bins, &mut |line| println!("{line}"))?;
    systemctl(&layout, &["daemon-reload"], &mut |line| println!("{line}"));
    println!(
        "next: write {}/cluster/cluster.xml, run `safekit cluster genkey` (copy the secret to every node), \
         install modules with `safekit module install`, then `systemctl enable --now safekit` \
         and `safekit boot on -m <module>` for the modules to start with the machine",
        layout.var.display()
    );
    Ok(())
}

/// `cargo xtask uninstall`.
///
/// # Errors
/// A file operation failed (with the path).
pub fn run_uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    let layout = Layout::new(args.destdir, args.prefix, args.var)?;
    systemctl(
        &layout,
        &["disable", "--now", "safekit.service"],
        &mut |line| {
            println!("{line}");
        },
    );
    uninstall(&layout, args.purge, &mut |line| println!("{line}"))?;
    systemctl(&layout, &["daemon-reload"], &mut |line| println!("{line}"));
    Ok(())
}

/// Runs `systemctl <args>` when installing to `/` on a machine whose init is systemd; says why not otherwise.
fn systemctl(layout: &Layout, args: &[&str], log: &mut dyn FnMut(String)) {
    let shown = format!("systemctl {}", args.join(" "));
    if layout.destdir.is_some() {
        log(format!("--destdir: `{shown}` not run"));
        return;
    }
    if !Path::new(SYSTEMD_RUNNING).is_dir() {
        log(format!(
            "systemd is not the running init ({SYSTEMD_RUNNING} missing): `{shown}` not run"
        ));
        return;
    }
    let mut command = Command::new("systemctl");
    command.args(args);
    match crate::run(&mut command) {
        Ok(()) => log(format!("ran `{shown}`")),
        Err(error) => log(format!("`{shown}` failed: {error:#}")),
    }
}

/// Installs the binaries found in `bins` and the rest of the layout.
///
/// # Errors
/// A missing binary, or a file operation that failed (with the path).
pub fn install(layout: &Layout, bins: &Path, log: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    for binary in BINARIES {
        let path = bins.join(binary);
        if !path.is_file() {
            bail!("{} is not built: build it first", path.display());
        }
    }
    for (dir, mode) in layout.directories() {
        ensure_dir(&dir, mode, log)?;
    }
    let safe = layout.safe_dir();
    for binary in BINARIES {
        let content =
            fs::read(bins.join(binary)).with_context(|| format!("cannot read {binary}"))?;
        put_file(&safe.join(binary), &content, 0o755, log)?;
    }
    let httpd_conf = layout.httpd_conf();
    match fs::read(&httpd_conf) {
        Ok(content) if content == HTTPD_CONF.as_bytes() => {
            log(format!("unchanged {}", httpd_conf.display()));
        }
        Ok(_) => log(format!("kept {} (edited)", httpd_conf.display())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            put_file(&httpd_conf, HTTPD_CONF.as_bytes(), 0o644, log)?;
        }
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", httpd_conf.display()));
        }
    }
    let link = layout.usr_bin_link();
    let target = layout.safe.join("safekit");
    ensure_parent(&link, log)?;
    match fs::symlink_metadata(&link) {
        Ok(metadata) if metadata.file_type().is_symlink() => {
            let current = fs::read_link(&link)
                .with_context(|| format!("cannot read the link {}", link.display()))?;
            if current == target {
                log(format!(
                    "unchanged {} -> {}",
                    link.display(),
                    target.display()
                ));
            } else {
                fs::remove_file(&link)
                    .with_context(|| format!("cannot remove {}", link.display()))?;
                std::os::unix::fs::symlink(&target, &link)
                    .with_context(|| format!("cannot create {}", link.display()))?;
                log(format!(
                    "replaced {} -> {} (was -> {})",
                    link.display(),
                    target.display(),
                    current.display()
                ));
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a link: move it away, then run install again",
            link.display()
        ),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("cannot create {}", link.display()))?;
            log(format!("linked {} -> {}", link.display(), target.display()));
        }
        Err(error) => {
            return Err(error).with_context(|| format!("cannot inspect {}", link.display()));
        }
    }
    let unit = layout.unit();
    ensure_parent(&unit, log)?;
    put_file(&unit, unit_text(layout).as_bytes(), 0o644, log)?;
    Ok(())
}

/// Removes what [`install`] put there (see the module doc for what stays without `purge`).
///
/// # Errors
/// A file operation that failed (with the path).
pub fn uninstall(layout: &Layout, purge: bool, log: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    remove_file(&layout.unit(), log)?;
    let link = layout.usr_bin_link();
    if let Ok(metadata) = fs::symlink_metadata(&link) {
        let ours = metadata.file_type().is_symlink()
            && fs::read_link(&link).is_ok_and(|target| target == layout.safe.join("safekit"));
        if ours {
            remove_file(&link, log)?;
        } else {
            log(format!(
                "kept {}: not a link to {}",
                link.display(),
                layout.safe.join("safekit").display()
            ));
        }
    }
    let safe = layout.safe_dir();
    for binary in BINARIES {
        remove_file(&safe.join(binary), log)?;
    }
    let httpd_conf = layout.httpd_conf();
    match fs::read(&httpd_conf) {
        Ok(content) if purge || content == HTTPD_CONF.as_bytes() => {
            remove_file(&httpd_conf, log)?;
        }
        Ok(_) => log(format!(
            "kept {} (edited; --purge removes it)",
            httpd_conf.display()
        )),
        Err(_) => {}
    }
    let modules = safe.join("modules");
    if purge && modules.is_dir() {
        remove_tree(&modules, log)?;
    }
    let var = layout.var_dir();
    if purge {
        remove_tree(&var, log)?;
    } else if var.exists() {
        log(format!(
            "kept {} (cluster secret, module state and logs; --purge removes it)",
            var.display()
        ));
    }
    // Directories, deepest first, only when empty.
    let mut dirs: Vec<PathBuf> = layout
        .directories()
        .into_iter()
        .map(|(dir, _)| dir)
        .filter(|dir| !dir.starts_with(&var))
        .collect();
    dirs.reverse();
    for dir in dirs {
        remove_empty_dir(&dir, log);
    }
    if modules.is_dir() {
        log(format!(
            "kept {} (installed modules; --purge removes them)",
            modules.display()
        ));
    }
    // Under a destdir, the parents install created (etc/systemd/system, usr/bin, opt, var).
    if let Some(destdir) = &layout.destdir {
        for path in [
            layout.unit(),
            layout.usr_bin_link(),
            layout.safe_dir(),
            layout.var_dir(),
        ] {
            let mut parent = path.parent();
            while let Some(dir) = parent {
                if dir == destdir || !dir.starts_with(destdir) || fs::remove_dir(dir).is_err() {
                    break;
                }
                parent = dir.parent();
            }
        }
    }
    Ok(())
}

fn ensure_dir(dir: &Path, mode: u32, log: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    match fs::metadata(dir) {
        Ok(metadata) if metadata.is_dir() => {
            if metadata.permissions().mode() & 0o7777 != mode {
                fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                    .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
                log(format!("mode {mode:04o} set on {}", dir.display()));
            }
            Ok(())
        }
        Ok(_) => bail!("{} exists and is not a directory", dir.display()),
        Err(_) => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
            log(format!("created {} ({mode:04o})", dir.display()));
            Ok(())
        }
    }
}

fn ensure_parent(path: &Path, log: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    let parent = path.parent().expect("an installed path has a parent");
    if !parent.is_dir() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        log(format!("created {}", parent.display()));
    }
    Ok(())
}

/// Writes `content` at `path` with `mode` unless it is already there; a new
/// content goes to a temporary file renamed over the old one (a running
/// binary cannot be written in place).
fn put_file(
    path: &Path,
    content: &[u8],
    mode: u32,
    log: &mut dyn FnMut(String),
) -> anyhow::Result<()> {
    if let Ok(current) = fs::read(path) {
        let current_mode = fs::metadata(path)
            .map(|metadata| metadata.permissions().mode() & 0o7777)
            .unwrap_or(0);
        if current == content && current_mode == mode {
            log(format!("unchanged {}", path.display()));
            return Ok(());
        }
    }
    let existed = path.exists();
    let name = path
        .file_name()
        .expect("an installed file has a name")
        .to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.xtask-install"));
    fs::write(&temporary, content)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("cannot install {}", path.display()))?;
    log(format!(
        "{} {} ({mode:04o})",
        if existed { "updated" } else { "installed" },
        path.display()
    ));
    Ok(())
}

fn remove_file(path: &Path, log: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            log(format!("removed {}", path.display()));
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot remove {}", path.display())),
    }
}

fn remove_tree(path: &Path, log: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => {
            log(format!("removed {} and everything in it", path.display()));
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot remove {}", path.display())),
    }
}

fn remove_empty_dir(dir: &Path, log: &mut dyn FnMut(String)) {
    if fs::remove_dir(dir).is_ok() {
        log(format!("removed {}", dir.display()));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::process::{Child, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    /// The directory holding the workspace's built `safekit`, `safekitd`, `safekit-rfs`.
    fn built_binaries() -> PathBuf {
        let safekitd = safekit_tests::workspace_bin("safekitd").expect(
            "safekitd is built (cargo build -p safekit-agent -p safekit-linux-helper --bins)",
        );
        let dir = safekitd
            .parent()
            .expect("a binary has a folder")
            .to_path_buf();
        for binary in BINARIES {
            assert!(
                dir.join(binary).is_file(),
                "{binary} is built in {}",
                dir.display()
            );
        }
        dir
    }

    fn default_layout(destdir: &Path) -> Layout {
        Layout::new(
            Some(destdir.to_path_buf()),
            PathBuf::from("/opt/safekit"),
            PathBuf::from("/var/safekit"),
        )
        .expect("the default paths are valid")
    }

    fn install_quietly(layout: &Layout) -> Vec<String> {
        let mut lines = Vec::new();
        install(layout, &built_binaries(), &mut |line| lines.push(line)).expect("install");
        lines
    }

    /// Every entry under `dir`, relative, with its type and mode (`d 0700`, `f 0755`, `l -> target`).
    fn tree(dir: &Path) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            for entry in fs::read_dir(dir).expect("list") {
                let path = entry.expect("entry").path();
                let relative = path
                    .strip_prefix(root)
                    .expect("below the root")
                    .to_string_lossy()
                    .into_owned();
                let metadata = fs::symlink_metadata(&path).expect("stat");
                let mode = metadata.mode() & 0o7777;
                if metadata.file_type().is_symlink() {
                    let target = fs::read_link(&path).expect("readlink");
                    out.insert(relative, format!("l -> {}", target.display()));
                } else if metadata.is_dir() {
                    out.insert(relative, format!("d {mode:04o}"));
                    walk(root, &path, out);
                } else {
                    out.insert(relative, format!("f {mode:04o}"));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    /// The unit's `Key=value` lines (a key may repeat), by section.
    fn unit_keys(text: &str) -> BTreeMap<(String, String), Vec<String>> {
        let mut section = String::new();
        let mut keys: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line
                .strip_prefix('[')
                .and_then(|rest| rest.strip_suffix(']'))
            {
                section = name.to_string();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line without `=`: {line}"));
            keys.entry((section.clone(), key.to_string()))
                .or_default()
                .push(value.to_string());
        }
        keys
    }

    #[test]
    fn install_lays_out_safekit_and_is_idempotent() {
        let destdir = tempfile::tempdir().expect("destdir");
        let layout = default_layout(destdir.path());
        let first = install_quietly(&layout);
        assert!(
            first.iter().any(|line| line.starts_with("installed ")),
            "{first:?}"
        );
        let expected: BTreeMap<String, String> = [
            ("etc", "d 0755"),
            ("etc/systemd", "d 0755"),
            ("etc/systemd/system", "d 0755"),
            ("etc/systemd/system/safekit.service", "f 0644"),
            ("opt", "d 0755"),
            ("opt/safekit", "d 0755"),
            ("opt/safekit/modules", "d 0755"),
            ("opt/safekit/private", "d 0755"),
            ("opt/safekit/private/bin", "d 0755"),
            ("opt/safekit/safekit", "f 0755"),
            ("opt/safekit/safekit-rfs", "f 0755"),
            ("opt/safekit/safekitd", "f 0755"),
            ("opt/safekit/web", "d 0755"),
            ("opt/safekit/web/conf", "d 0755"),
            ("opt/safekit/web/conf/httpd.conf", "f 0644"),
            ("usr", "d 0755"),
            ("usr/bin", "d 0755"),
            ("usr/bin/safekit", "l -> /opt/safekit/safekit"),
            ("var", "d 0755"),
            ("var/safekit", "d 0755"),
            ("var/safekit/cluster", "d 0700"),
            ("var/safekit/modules", "d 0700"),
            ("var/safekit/run", "d 0755"),
        ]
        .into_iter()
        .map(|(path, what)| (path.to_string(), what.to_string()))
        .collect();
        // Parents created by create_dir_all follow the umask; compare types for those.
        let actual = tree(destdir.path());
        let mut actual_normalized = actual.clone();
        for parent in [
            "etc",
            "etc/systemd",
            "etc/systemd/system",
            "opt",
            "usr",
            "usr/bin",
            "var",
        ] {
            if let Some(value) = actual_normalized.get_mut(parent) {
                assert!(value.starts_with("d "), "{parent} is a directory: {value}");
                *value = "d 0755".into();
            }
        }
        assert_eq!(actual_normalized, expected);
        for binary in BINARIES {
            assert_eq!(
                fs::read(layout.safe_dir().join(binary)).expect("installed binary"),
                fs::read(built_binaries().join(binary)).expect("built binary"),
                "{binary} is the built one"
            );
        }
        let httpd = fs::read_to_string(layout.httpd_conf()).expect("httpd.conf");
        assert!(
            httpd
                .lines()
                .any(|line| line.trim() == "Define httpport 9010"),
            "{httpd}"
        );

        // Again: nothing changes, every line says so.
        let second = install_quietly(&layout);
        assert!(
            second.iter().all(|line| line.starts_with("unchanged ")),
            "second install changed something: {second:?}"
        );
        assert_eq!(tree(destdir.path()), actual);

        // An edited httpd.conf is kept by install and by uninstall without --purge.
        fs::write(layout.httpd_conf(), "Define httpport 9011\n").expect("edit httpd.conf");
        let third = install_quietly(&layout);
        assert!(
            third
                .iter()
                .any(|line| line.starts_with("kept ") && line.contains("httpd.conf"))
        );
        assert_eq!(
            fs::read_to_string(layout.httpd_conf()).expect("httpd.conf"),
            "Define httpport 9011\n"
        );
    }

    #[test]
    fn uninstall_leaves_only_what_purge_removes() {
        let destdir = tempfile::tempdir().expect("destdir");
        let layout = default_layout(destdir.path());
        install_quietly(&layout);
        // What an operator's use adds: a cluster file, module state, an installed module.
        fs::write(
            layout.var_dir().join("cluster").join("cluster.xml"),
            "<cluster/>\n",
        )
        .expect("cluster.xml");
        fs::create_dir_all(layout.var_dir().join("modules").join("m")).expect("module var");
        fs::create_dir_all(layout.safe_dir().join("modules").join("m").join("conf"))
            .expect("module");
        let mut lines = Vec::new();
        uninstall(&layout, false, &mut |line| lines.push(line)).expect("uninstall");
        let left: Vec<String> = tree(destdir.path()).into_keys().collect();
        let allowed = |path: &str| {
            path.starts_with("var")
                || path == "opt"
                || path == "opt/safekit"
                || path.starts_with("opt/safekit/modules")
        };
        assert!(
            left.iter().all(|path| allowed(path)),
            "uninstall left {left:?}\n{lines:#?}"
        );
        assert!(left.contains(&"var/safekit/cluster/cluster.xml".to_string()));
        assert!(left.contains(&"opt/safekit/modules/m/conf".to_string()));
        // Again: nothing more to do, still no error.
        uninstall(&layout, false, &mut |_| {}).expect("uninstall twice");
        let mut purged = Vec::new();
        uninstall(&layout, true, &mut |line| purged.push(line)).expect("uninstall --purge");
        assert_eq!(
            tree(destdir.path()),
            BTreeMap::new(),
            "--purge leaves nothing: {purged:#?}"
        );
        // Without the modules and edits, a plain uninstall right after install leaves only SAFEVAR.
        install_quietly(&layout);
        uninstall(&layout, false, &mut |_| {}).expect("uninstall");
        let left: Vec<String> = tree(destdir.path()).into_keys().collect();
        assert!(left.iter().all(|path| path.starts_with("var")), "{left:?}");
    }

    #[test]
    fn a_foreign_usr_bin_safekit_is_neither_replaced_nor_removed() {
        let destdir = tempfile::tempdir().expect("destdir");
        let layout = default_layout(destdir.path());
        fs::create_dir_all(layout.usr_bin_link().parent().expect("usr/bin")).expect("usr/bin");
        fs::write(layout.usr_bin_link(), "#!/bin/sh\n").expect("a foreign safekit");
        let error = install(&layout, &built_binaries(), &mut |_| {})
            .expect_err("install refuses to replace a file");
        assert!(error.to_string().contains("not a link"), "{error:#}");
        uninstall(&layout, true, &mut |_| {}).expect("uninstall");
        assert_eq!(
            fs::read_to_string(layout.usr_bin_link()).expect("still there"),
            "#!/bin/sh\n"
        );
    }

    #[test]
    fn the_unit_runs_safekitd_in_the_foreground_with_the_installed_paths() {
        let layout = Layout::new(None, PathBuf::from("/srv/sk"), PathBuf::from("/var/lib/sk"))
            .expect("valid paths");
        let text = unit_text(&layout);
        assert!(
            !text.contains("/opt/safekit") && !text.contains("/var/safekit"),
            "{text}"
        );
        let keys = unit_keys(&text);
        let one = |section: &str, key: &str| -> String {
            let values = keys
                .get(&(section.to_string(), key.to_string()))
                .unwrap_or_else(|| panic!("[{section}] {key} missing:\n{text}"));
            assert_eq!(values.len(), 1, "[{section}] {key} once");
            values[0].clone()
        };
        assert_eq!(
            one("Service", "ExecStart"),
            "/srv/sk/safekitd --foreground --safe /srv/sk --var /var/lib/sk"
        );
        assert_eq!(
            one("Service", "Environment"),
            "SAFE=/srv/sk SAFEVAR=/var/lib/sk"
        );
        assert_eq!(one("Service", "ExecStop"), "/srv/sk/safekit shutdown");
        assert_eq!(one("Service", "Restart"), "on-failure");
        assert_eq!(one("Service", "KillMode"), "process");
        let nofile: u64 = one("Service", "LimitNOFILE").parse().expect("a number");
        assert!(nofile >= 1_048_576, "LimitNOFILE {nofile}");
        assert!(
            one("Unit", "After")
                .split_whitespace()
                .any(|unit| unit == "network-online.target")
        );
        assert!(
            one("Unit", "Wants")
                .split_whitespace()
                .any(|unit| unit == "network-online.target")
        );
        assert_eq!(one("Install", "WantedBy"), "multi-user.target");
    }

    #[test]
    fn paths_the_unit_cannot_carry_are_refused() {
        for (safe, var) in [
            ("opt/safekit", "/var/safekit"),
            ("/opt/safe kit", "/var/safekit"),
            ("/opt/safekit", "/var/%n"),
            ("/", "/var/safekit"),
            ("/var/safekit/opt", "/var/safekit"),
        ] {
            assert!(
                Layout::new(None, PathBuf::from(safe), PathBuf::from(var)).is_err(),
                "{safe} {var} accepted"
            );
        }
    }

    /// systemd's own checker (Debian's `systemd` package provides
    /// `systemd-analyze` even where systemd is not pid 1). It checks that the
    /// binaries exist, so the unit is rendered with the destdir's real paths.
    #[test]
    fn systemd_analyze_verify_accepts_the_unit() {
        let destdir = tempfile::tempdir().expect("destdir");
        let layout = default_layout(destdir.path());
        install_quietly(&layout);
        let on_host = Layout::new(None, layout.safe_dir(), layout.var_dir()).expect("valid paths");
        let unit = destdir.path().join("safekit.service");
        fs::write(&unit, unit_text(&on_host)).expect("write the unit");
        let verify = |unit: &Path| {
            let output = Command::new("systemd-analyze")
                .arg("verify")
                .arg(unit)
                .output()
                .expect("run systemd-analyze (Debian package systemd)");
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let (success, stderr) = verify(&unit);
        assert!(
            success && stderr.trim().is_empty(),
            "systemd-analyze verify: {stderr}"
        );
        // The check itself sees a broken unit.
        fs::write(
            &unit,
            unit_text(&on_host).replace("KillMode=process", "KillMode=nonsense"),
        )
        .expect("write a broken unit");
        let (_, stderr) = verify(&unit);
        assert!(stderr.contains("kill mode"), "{stderr}");
    }

    /// Kills the agent on drop, even when an assertion failed.
    struct Agent(Child);

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn the_installed_agent_starts_from_the_destdir_and_answers() {
        if !safekit_tests::require_root() {
            return;
        }
        let destdir = tempfile::tempdir().expect("destdir");
        let layout = default_layout(destdir.path());
        install_quietly(&layout);
        let safe = layout.safe_dir();
        let var = layout.var_dir();
        // The health check on a free loopback port, not 9010 (other tests, other services).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        fs::write(layout.httpd_conf(), format!("Define httpport {port}\n")).expect("httpd.conf");
        fs::write(
            var.join("cluster").join("cluster.xml"),
            "<cluster><lans><lan name=\"default\">\
             <node name=\"node1\" addr=\"127.0.0.1\"/><node name=\"node2\" addr=\"127.0.0.2\"/>\
             </lan></lans></cluster>\n",
        )
        .expect("cluster.xml");
        let safekit = |args: &[&str]| {
            Command::new(safe.join("safekit"))
                .args(args)
                .env("SAFE", &safe)
                .env("SAFEVAR", &var)
                .env("RUST_BACKTRACE", "0")
                .output()
                .expect("run the installed safekit")
        };
        let genkey = safekit(&["cluster", "genkey"]);
        assert!(genkey.status.success(), "{genkey:?}");
        let agent = Agent(
            Command::new(safe.join("safekitd"))
                .args(["--foreground", "--node", "node1"])
                .env("SAFE", &safe)
                .env("SAFEVAR", &var)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the installed safekitd"),
        );
        let started = Instant::now();
        loop {
            let state = safekit(&["state"]);
            if state.status.success() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the installed agent never answered `safekit state`: {state:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(var.join("run").join("admin.sock").exists());
        drop(agent);
    }
}
