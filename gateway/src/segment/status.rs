//! `moat segment status`: what both sides have pinned, read without changing anything. Each
//! side reports its own part ([`GatewayStatus`], [`GuardStatus`]); this module puts them
//! together in the shape `--json` has always had (the gateway side's fields at the top, the
//! guard's under `inference`).

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use super::{
    gateway::{GatewayPins, GatewayStatus},
    inference::{GuardPins, GuardStatus},
    pin_paths::Pins,
};

#[derive(Debug, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub gateway: GatewayStatus,
    /// The inference-host guard (installed or not).
    pub inference: GuardStatus,
}

/// Reads the pinned state of both sides; never changes it.
pub fn status(pins: &Pins) -> Result<Status> {
    Ok(Status {
        gateway: super::gateway::status(&GatewayPins::new(pins))?,
        inference: super::inference::status(&GuardPins::new(pins))?,
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.gateway, self.inference)
    }
}

/// An id in the text report, `-` when there is none.
pub(super) fn or_dash(v: Option<u32>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
