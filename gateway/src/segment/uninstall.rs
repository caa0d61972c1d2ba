//! `moat segment uninstall`: the one way moat's kernel enforcement is removed from a host.

use anyhow::Result;

use super::{gateway, inference, pin_paths::Pins};

/// Removes every pin of this schema version — the inference guard's and the gateway side's,
/// links first, so enforcement stops before the maps go. Returns how many pins were removed.
pub fn uninstall(pins: &Pins) -> Result<usize> {
    let guard = inference::uninstall(pins)?;
    Ok(guard + gateway::uninstall(pins)?)
}
