//! `safekit`: the operator's command.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("no command implemented yet")
}
