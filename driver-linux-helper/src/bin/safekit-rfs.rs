//! `safekit-rfs`: runs the replicated mount of one module (primary or secondary side).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the replicated mount is not implemented yet")
}
