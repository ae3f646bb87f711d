//! `cargo xtask package`: one `.safe` package per folder of `modules/`, into `target/packages/`.
//!
//! A `.safe` package is a zip of the module folder's `conf/` (with the
//! required `conf/userconfig.xml`) and `bin/`, files keeping their Unix
//! modes; `safekit module install -m NAME FILE.safe` installs it. A module
//! whose userconfig.xml does not parse and validate (`safekit_core::config`,
//! without a cluster.xml) is skipped with the reason printed.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use safekit_core::config::{ValidationContext, parse_userconfig, validate};
use zip::write::SimpleFileOptions;

/// The folders of a module that go into its package.
const PACKAGED_DIRS: [&str; 2] = ["conf", "bin"];

/// What `package` did for each module.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Packages written.
    pub built: Vec<PathBuf>,
    /// Modules skipped, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Builds the packages of every folder of `root/modules` into `out`.
///
/// # Errors
/// When a folder cannot be read or a package cannot be written.
pub fn run(root: &Path, out: &Path) -> anyhow::Result<Outcome> {
    let modules = root.join("modules");
    let mut names = Vec::new();
    for entry in
        fs::read_dir(&modules).with_context(|| format!("cannot list {}", modules.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", modules.display()))?;
        if entry.path().is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut outcome = Outcome::default();
    for name in names {
        let dir = modules.join(&name);
        if let Err(reason) = check(&dir) {
            eprintln!("xtask: skipping module {name}: {reason}");
            outcome.skipped.push((name, reason));
            continue;
        }
        let package = out.join(format!("{name}.safe"));
        write_package(&dir, &package)
            .with_context(|| format!("cannot write {}", package.display()))?;
        eprintln!("xtask: {}", package.display());
        outcome.built.push(package);
    }
    if outcome.built.is_empty() {
        bail!("no module of {} could be packaged", modules.display());
    }
    Ok(outcome)
}

/// Whether the module's userconfig.xml parses and validates; the first error otherwise.
fn check(dir: &Path) -> Result<(), String> {
    let path = dir.join("conf").join("userconfig.xml");
    let text = fs::read_to_string(&path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let config = parse_userconfig(&path.display().to_string(), &text).map_err(|errors| {
        errors
            .errors()
            .next()
            .map_or_else(|| "does not parse".to_string(), ToString::to_string)
    })?;
    let bin: Vec<String> = match fs::read_dir(dir.join("bin")) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    let context = ValidationContext {
        cluster: None,
        module_bin: Some(&bin),
        platform: None,
    };
    match validate(&config, &context)
        .into_iter()
        .find(|diagnostic| diagnostic.is_error())
    {
        Some(error) => Err(error.to_string()),
        None => Ok(()),
    }
}

/// Every file under `dir`, relative, sorted (symlinks are refused: packages hold none).
fn files(base: &Path, dir: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            bail!(
                "{} is a symbolic link; packages hold only files",
                path.display()
            );
        } else if kind.is_dir() {
            files(base, &path, found)?;
        } else if kind.is_file() {
            found.push(
                path.strip_prefix(base)
                    .expect("listed under the module folder")
                    .to_path_buf(),
            );
        }
    }
    Ok(())
}

/// Zips `conf/` and `bin/` of the module folder `dir` into `package` (written atomically).
pub fn write_package(dir: &Path, package: &Path) -> anyhow::Result<()> {
    let mut found = Vec::new();
    for sub in PACKAGED_DIRS {
        if dir.join(sub).is_dir() {
            files(dir, &dir.join(sub), &mut found)?;
        }
    }
    let partial = package.with_extension("safe.partial");
    let mut zip = zip::ZipWriter::new(fs::File::create(&partial)?);
    for relative in &found {
        let path = dir.join(relative);
        let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
        let options = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(mode);
        let name = relative
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        zip.start_file(name, options)?;
        zip.write_all(
            &fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
        )?;
    }
    zip.finish()?.sync_all()?;
    fs::rename(&partial, package)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekit_agent::daemon::load::NodePaths;

    fn project_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask is in the root")
            .to_path_buf()
    }

    #[test]
    fn packages_of_the_shipped_modules_are_accepted_by_module_install() {
        let scratch = tempfile::tempdir().expect("temp dir");
        let out = scratch.path().join("packages");
        let outcome = run(&project_root(), &out).expect("packaging works");
        let names: Vec<String> = outcome
            .built
            .iter()
            .map(|path| {
                path.file_name()
                    .expect("a file")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert!(
            names.contains(&"mirror.safe".to_string()),
            "built: {names:?}"
        );
        assert!(names.contains(&"demo.safe".to_string()), "built: {names:?}");
        assert!(outcome.skipped.is_empty(), "skipped: {:?}", outcome.skipped);

        let paths = NodePaths {
            safe: scratch.path().join("safe"),
            var: scratch.path().join("var"),
        };
        for module in ["mirror", "demo"] {
            let installed = safekit_agent::cli::module::install(
                &paths,
                module,
                &out.join(format!("{module}.safe")),
            )
            .expect("the package installs");
            let source = project_root().join("modules").join(module);
            for file in ["conf/userconfig.xml", "bin/start_prim", "bin/stop_prim"] {
                assert_eq!(
                    fs::read(installed.join(file)).expect("installed file"),
                    fs::read(source.join(file)).expect("source file"),
                    "{module}/{file}"
                );
                let mode =
                    |path: &Path| fs::metadata(path).expect("file").permissions().mode() & 0o777;
                assert_eq!(
                    mode(&installed.join(file)),
                    mode(&source.join(file)),
                    "{module}/{file} mode"
                );
            }
        }
        assert_eq!(
            safekit_agent::cli::module::installed(&paths).expect("listing"),
            vec!["demo".to_string(), "mirror".to_string()]
        );
    }

    #[test]
    fn a_module_whose_config_does_not_validate_is_skipped_with_its_reason() {
        let scratch = tempfile::tempdir().expect("temp dir");
        let module = scratch.path().join("modules").join("broken");
        fs::create_dir_all(module.join("conf")).expect("mkdir");
        fs::write(
            module.join("conf").join("userconfig.xml"),
            "<safe><service mode=\"nonsense\"/></safe>",
        )
        .expect("write");
        let good = scratch.path().join("modules").join("good");
        fs::create_dir_all(good.join("conf")).expect("mkdir");
        fs::copy(
            project_root().join("modules/mirror/conf/userconfig.xml"),
            good.join("conf").join("userconfig.xml"),
        )
        .expect("copy");
        let out = scratch.path().join("packages");
        let outcome = run(scratch.path(), &out).expect("packaging works");
        assert_eq!(outcome.built, vec![out.join("good.safe")]);
        assert_eq!(outcome.skipped.len(), 1, "{:?}", outcome.skipped);
        assert_eq!(outcome.skipped[0].0, "broken");
        assert!(!out.join("broken.safe").exists());
    }
}
