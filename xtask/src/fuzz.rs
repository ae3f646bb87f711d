//! `cargo xtask fuzz`: runs each cargo-fuzz target under `fuzz/` for a bounded time.
//!
//! Only a stable toolchain exists on our machines; `RUSTC_BOOTSTRAP=1` lets
//! cargo-fuzz use the sanitizer flags it needs. cargo-fuzz is installed on first
//! use (`cargo install cargo-fuzz --locked`).

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::run as run_command;

pub(crate) fn run(root: &Path, seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let fuzz_dir = root.join("fuzz");
    if !fuzz_dir.join("Cargo.toml").exists() {
        anyhow::bail!("no fuzz/Cargo.toml: nothing to fuzz");
    }
    ensure_cargo_fuzz()?;
    let targets = list_targets(&fuzz_dir)?;
    for target in targets
        .iter()
        .filter(|t| only.is_none_or(|o| o == t.as_str()))
    {
        // libFuzzer writes new inputs into the first corpus directory, so the
        // writable corpus comes first and the committed seeds after it.
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut command = Command::new("cargo");
        command
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target])
            .arg(&corpus);
        let seeds = fuzz_dir.join("seeds").join(target);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        command.args(["--", &format!("-max_total_time={seconds}")]);
        run_command(&mut command).with_context(|| {
            format!("fuzz target {target} found a crash (see fuzz/artifacts/{target})")
        })?;
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let found = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        run_command(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
            .context("cannot install cargo-fuzz")?;
    }
    Ok(())
}

fn list_targets(fuzz_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut targets = Vec::new();
    let dir = fuzz_dir.join("fuzz_targets");
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            targets.push(stem.to_string_lossy().into_owned());
        }
    }
    targets.sort();
    Ok(targets)
}
