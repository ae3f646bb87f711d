//! `cargo xtask pjdfstest`: POSIX conformance of the replicated mount, against plain ext4 in the same run.
//!
//! The pjdfstest suite (crates.io `pjdfstest`, installed on first use under
//! `target/tools`) runs three times: on a plain directory, on our FUSE mount
//! with replication off, and on our mount replicating to a receiver over
//! loopback. Every test that passes on the plain directory must pass on both
//! mounts, except the ones listed in [`KNOWN_EXCEPTIONS`] (also in README.md,
//! with their reason). Each mount runs in a private mount namespace
//! (`unshare --mount`), so nothing leaks to the host even if this task dies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::run;

/// Tests that cannot pass through FUSE, with the reason.
const KNOWN_EXCEPTIONS: &[(&str, &str)] = &[(
    "link::link_count_max",
    "glibc cannot report LINK_MAX for a FUSE file system, so the test is skipped there",
)];

const CONFIG: &str = "[settings]\nnaptime = 0.01\n\n[dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"tests\", \"tests\"]]\n";

pub(crate) fn run_suite(root: &Path) -> anyhow::Result<()> {
    let pjdfstest = ensure_pjdfstest(root)?;
    let rfs = build_rfs(root)?;
    // Short paths: pjdfstest binds Unix sockets under the tested directory, and
    // a socket path is limited to 108 bytes.
    let work = PathBuf::from(format!("/var/tmp/skpjd-{}", std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot clean {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let config = work.join("pjdfstest.toml");
    std::fs::write(&config, CONFIG)?;
    let secret = work.join("secret");
    std::fs::write(&secret, "pjdfstest-secret-0123456789abcdef")?;

    let mut results = Vec::new();
    for (label, script) in [
        (
            "plain ext4",
            format!(
                "{pjd} -c {cfg} -p \"$DIR\"",
                pjd = pjdfstest.display(),
                cfg = config.display()
            ),
        ),
        (
            "mount, replication off",
            mount_script(&pjdfstest, &rfs, &config, None),
        ),
        (
            "mount, replicated",
            mount_script(&pjdfstest, &rfs, &config, Some(&secret)),
        ),
    ] {
        eprintln!("pjdfstest: running on {label}");
        let short = format!("d{}", results.len());
        let dir = work.join(&short);
        std::fs::create_dir_all(&dir)?;
        let output = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-euc",
                &script,
            ])
            .env("DIR", &dir)
            .env("REPLICA", work.join(format!("{short}-replica")))
            .output()
            .context("cannot run unshare (util-linux)")?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let summary = stdout
            .lines()
            .find(|l| l.starts_with("Summary:"))
            .unwrap_or("no summary")
            .to_owned();
        eprintln!("pjdfstest: {label}: {summary}");
        if !stdout.contains("Summary:") {
            bail!(
                "pjdfstest on {label} did not finish:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        results.push((label, parse(&stdout)));
    }

    let (_, plain) = &results[0];
    let mut regressions = Vec::new();
    for (label, outcome) in &results[1..] {
        for (test, status) in plain {
            if status != "ok" {
                continue;
            }
            let got = outcome.get(test).map(String::as_str).unwrap_or("missing");
            if got != "ok" && !KNOWN_EXCEPTIONS.iter().any(|(name, _)| name == test) {
                regressions.push(format!("{test}: ok on plain ext4, {got} on {label}"));
            }
        }
    }
    // Best effort: the directories hold only pjdfstest's leftovers.
    let _ = std::fs::remove_dir_all(&work);
    if !regressions.is_empty() {
        bail!(
            "pjdfstest regressions on the mount:\n{}",
            regressions.join("\n")
        );
    }
    eprintln!("pjdfstest: every test that passes on plain ext4 passes on both mounts");
    Ok(())
}

/// A script that mounts our file system over `$DIR`, runs the suite, and unmounts.
fn mount_script(pjdfstest: &Path, rfs: &Path, config: &Path, secret: Option<&Path>) -> String {
    let (receiver, replication) = match secret {
        Some(secret) => (
            format!(
                "mkdir -p \"$REPLICA\"; {rfs} receive --dir \"$REPLICA\" --listen 127.0.0.1:56999 --secret-file {secret} & RECV=$!; sleep 0.3\n",
                rfs = rfs.display(),
                secret = secret.display()
            ),
            format!(
                "--replication peer --peer 127.0.0.1:56999 --secret-file {} --dirty-log \"$REPLICA.dirty\"",
                secret.display()
            ),
        ),
        None => (String::new(), "--replication off".to_owned()),
    };
    format!(
        "{receiver}\
         {rfs} mount --dir \"$DIR\" {replication} & RFS=$!\n\
         for i in $(seq 1 100); do grep -q \" $DIR fuse\" /proc/mounts && break; sleep 0.1; done\n\
         grep -q \" $DIR fuse\" /proc/mounts || {{ echo 'mount did not appear' >&2; exit 1; }}\n\
         chmod 0777 \"$DIR\"\n\
         status=0; {pjd} -c {cfg} -p \"$DIR\" || status=$?\n\
         kill -TERM $RFS; wait $RFS || true\n\
         [ -n \"${{RECV:-}}\" ] && {{ kill -TERM $RECV; wait $RECV || true; }}\n\
         exit $status\n",
        rfs = rfs.display(),
        pjd = pjdfstest.display(),
        cfg = config.display(),
    )
}

/// Test name → status word (`ok`, `FAILED`, `skipped`...), from pjdfstest's output.
fn parse(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter(|l| l.contains("::"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?.to_owned();
            let status = words.next()?.to_owned();
            Some((name, status))
        })
        .collect()
}

fn ensure_pjdfstest(root: &Path) -> anyhow::Result<PathBuf> {
    let tools = root.join("target").join("tools");
    let binary = tools.join("bin").join("pjdfstest");
    if !binary.exists() {
        run(Command::new("cargo")
            .args(["install", "pjdfstest", "--locked", "--root"])
            .arg(&tools))
        .context("cannot install pjdfstest from crates.io")?;
    }
    Ok(binary)
}

fn build_rfs(root: &Path) -> anyhow::Result<PathBuf> {
    run(Command::new("cargo").args([
        "build",
        "-p",
        "safekit-linux-helper",
        "--bin",
        "safekit-rfs",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug").join("safekit-rfs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pjdfstest_lines() {
        let out = "chown::enoent_comp                      ok\nlink::link_count_max   skipped\nx::y FAILED\n\nSummary: 1 failed\n";
        let parsed = parse(out);
        assert_eq!(
            parsed.get("chown::enoent_comp").map(String::as_str),
            Some("ok")
        );
        assert_eq!(parsed.get("x::y").map(String::as_str), Some("FAILED"));
        assert_eq!(parsed.len(), 3);
    }
}
