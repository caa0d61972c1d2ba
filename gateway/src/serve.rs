//! `moat serve`: the daemon.

use crate::config::Config;

pub fn run(_config: Config) -> anyhow::Result<()> {
    Ok(())
}
