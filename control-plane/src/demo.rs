//! The zero-setup demo: embedded librdkafka mock clusters, an in-memory
//! registry, and records routed among them.

use crate::cli::args::DemoArgs;

/// Runs the demo, printing what happens.
pub async fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("the demo is being written")
}
