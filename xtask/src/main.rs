//! `cargo xtask`: the project's build system (test, demo, bench, package, install).
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("no task yet")
}
