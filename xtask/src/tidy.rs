//! Project conventions, checked by code instead of by reviewers' memory.
//!
//! - every Rust source file starts with a `//!` module doc saying why it exists;
//! - every `unsafe` block or impl has a `// SAFETY:` comment just above it;
//! - no `#[ignore]` and no `#[should_panic]` (a test states today's behaviour);
//! - the I/O-free crates (`safekit-protocol`, `safekit-core`) depend on none of
//!   tokio, libc, nix, rustix or fuser, and no driver crate depends on the agent.
//!
//! `cargo xtask tidy` runs these checks; so does `cargo test -p xtask`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Crates that must stay free of I/O, and what they must never pull in.
const IO_FREE_CRATES: &[&str] = &["safekit-protocol", "safekit-core"];
const IO_CRATES: &[&str] = &["tokio", "libc", "nix", "rustix", "fuser"];
const DRIVER_CRATES: &[&str] = &["safekit-linux-helper", "safekit-driver-windows"];

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let mut problems = source_problems(root)?;
    problems.extend(boundary_problems(root)?);
    if problems.is_empty() {
        eprintln!("tidy: ok");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("tidy: {problem}");
    }
    bail!("{} convention problem(s) found", problems.len())
}

fn source_problems(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for file in rust_files(root)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let shown = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        problems.extend(check_source(&shown, &text));
    }
    Ok(problems)
}

/// The conventions of one source file.
fn check_source(name: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let first_code_line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if !first_code_line.starts_with("//!") {
        problems.push(format!("{name}: does not start with a `//!` module doc"));
    }
    let lines: Vec<&str> = text.lines().collect();
    for (idx, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let needle_ignore = concat!("#[", "ignore");
        let needle_panic = concat!("#[", "should_panic");
        if trimmed.starts_with(needle_ignore) || trimmed.starts_with(needle_panic) {
            problems.push(format!("{name}:{}: ignored or should_panic test", idx + 1));
        }
        if has_unsafe_block(trimmed) && !safety_comment_above(&lines, idx) {
            problems.push(format!(
                "{name}:{}: `unsafe` without a `// SAFETY:` comment above it",
                idx + 1
            ));
        }
    }
    problems
}

fn has_unsafe_block(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    (code.contains("unsafe {") || code.contains("unsafe impl"))
        && !code.contains("\"unsafe")
        && !code.contains("forbid(unsafe")
}

fn safety_comment_above(lines: &[&str], idx: usize) -> bool {
    if lines[idx].contains("SAFETY:") {
        return true;
    }
    lines[..idx]
        .iter()
        .rev()
        .take(12)
        .take_while(|l| {
            let t = l.trim_start();
            t.starts_with("//") || t.starts_with("#[") || !t.ends_with(';') || t.is_empty()
        })
        .any(|l| l.contains("SAFETY:"))
}

fn rust_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if entry.file_type()?.is_dir() {
                if name.starts_with('.')
                    || name.starts_with("target")
                    || name == "corpus"
                    || name == "artifacts"
                {
                    continue;
                }
                stack.push(path);
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn boundary_problems(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for krate in IO_FREE_CRATES {
        let deps = normal_dependencies(root, krate)?;
        for forbidden in IO_CRATES {
            if deps.iter().any(|d| d == forbidden) {
                problems.push(format!(
                    "{krate} depends on {forbidden}: it must stay free of I/O"
                ));
            }
        }
    }
    for krate in DRIVER_CRATES {
        if normal_dependencies(root, krate)?
            .iter()
            .any(|d| d == "safekit-agent")
        {
            problems.push(format!(
                "{krate} depends on safekit-agent: drivers must not reach the agent"
            ));
        }
    }
    Ok(problems)
}

/// Names of every crate in the normal (non-dev, non-build) dependency tree of `krate`.
fn normal_dependencies(root: &Path, krate: &str) -> anyhow::Result<Vec<String>> {
    let output = Command::new("cargo")
        .current_dir(root)
        .args([
            "tree",
            "--offline",
            "-p",
            krate,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .context("cannot run cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree -p {krate} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_follows_its_conventions() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask is in the root");
        run(root).expect("tidy problems: run `cargo xtask tidy` for the list");
    }

    #[test]
    fn a_file_without_module_doc_is_reported() {
        let problems = check_source("x.rs", "fn main() {}\n");
        assert_eq!(
            problems,
            vec!["x.rs: does not start with a `//!` module doc".to_string()]
        );
    }

    #[test]
    fn unsafe_without_safety_comment_is_reported() {
        let text = "//! doc\nfn f() {\n    let x = 1;\n    unsafe { g() };\n}\n";
        assert_eq!(check_source("x.rs", text).len(), 1);
        let text =
            "//! doc\nfn f() {\n    // SAFETY: g has no preconditions.\n    unsafe { g() };\n}\n";
        assert!(check_source("x.rs", text).is_empty());
    }
}
