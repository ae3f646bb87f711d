//! `safekitd`: the per-node agent daemon.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the daemon is not implemented yet")
}
